"""A full store refuses what it cannot keep, says so (v5 0x97), and keeps
everything it already acknowledged (MQTT 5 3.4.2.1; README "The promise")."""
from brokerproc import BrokerProc
from rawclient import Client, K


def test_full_store_refuses_retained_publish_with_quota_exceeded_and_keeps_older_ones():
    cfg = {"persistence": True, "store_max_bytes": 4096, "max_retained_messages": 1000}
    b = BrokerProc(board="esp32", config=cfg).start()
    try:
        c = Client(b.port, "filler", version=5)
        acked, refused = [], []
        for i in range(60):
            c.send(K.Publish("full/%d" % i, b"v%03d" % i + b"x" * 120, 1, True, False, i + 1))
            p = c.recv()
            assert p.type == K.PUBACK and p.pid == i + 1, p
            (refused if p.reason == 0x97 else acked).append(i)
            if len(refused) >= 3:
                break
        c.close()
        assert refused, "a 4 KB store took %d retained messages of 130 B" % len(acked)
        assert acked, "the store refused even the first message"
        b.kill9()
        b.start()
        s = Client(b.port, "checker", version=5)
        s.send(K.Subscribe(1, [("full/#", 0)]))
        got = set()
        while True:
            p = s.recv(timeout=1.5)
            if p is None or p.type == K.SUBACK:
                continue
            got.add(int(p.topic.split("/")[1]))
            if got >= set(acked):
                break
        s.close()
        assert set(acked) <= got, "acknowledged retained messages lost: %s" % sorted(set(acked) - got)
        # It keeps serving.
        Client(b.port, "after", version=4).close()
    finally:
        b.kill9()
        b.tmp.cleanup()
