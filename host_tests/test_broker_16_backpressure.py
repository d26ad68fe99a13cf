"""Backpressure: publishers that write faster than a subscriber reads are
paused, not dropped, while the subscriber keeps reading (README "Queues and
backpressure"). Bursts of tiny packets make a pause leave many whole
packets behind in the shared read buffer."""
import socket
import threading

from brokerproc import BrokerProc
from rawclient import Client, K

PUBLISHERS = 5
EACH = 2000


def _burst(port, i, errors):
    try:
        c = Client(port, "bp-pub%d" % i, version=4)
        data = b"".join(K.encode(K.Publish("bp/%d" % i, b"%d" % n, 0), 4) for n in range(EACH))
        c.s.sendall(data)
        c.send(K.Empty(K.PINGREQ))
        assert c.recv(timeout=30).type == K.PINGRESP
        c.close()
    except Exception as e:  # reported by the test thread
        errors.append(e)


def test_bursts_of_tiny_messages_from_many_publishers_all_arrive_in_order():
    with BrokerProc(board="esp32", config={"max_connections": 8}) as b:
        sub = Client(b.port, "bp-sub", version=4)
        sub.send(K.Subscribe(1, [("bp/#", 0)]))
        assert sub.recv().type == K.SUBACK
        errors = []
        threads = [threading.Thread(target=_burst, args=(b.port, i, errors)) for i in range(PUBLISHERS)]
        for t in threads:
            t.start()
        got = {i: [] for i in range(PUBLISHERS)}
        total = 0
        try:
            while total < PUBLISHERS * EACH:
                p = sub.recv(timeout=10)
                assert p is not None, "broker closed the subscriber"
                got[int(p.topic[3:])].append(int(p.payload))
                total += 1
        except socket.timeout:
            pass
        for t in threads:
            t.join(30)
        log = b.log()
    assert not errors, errors
    assert "internal error" not in log and "Traceback" not in log, log[-2000:]
    for i in range(PUBLISHERS):
        assert got[i] == list(range(EACH)), "publisher %d: %d of %d, in order: %s" % (
            i, len(got[i]), EACH, got[i] == sorted(got[i]))
