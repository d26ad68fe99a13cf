"""Large messages on a small heap: a payload larger than the write buffer
goes out from the message itself after its head, never copied, so that
every message the broker acknowledged reaches every session it was queued
for, even when the heap is too fragmented for one more copy of it
(README "Memory")."""
import socket
import threading
import time

from brokerproc import BrokerProc
from mqttc import Client, Closed, flood

BIG = 4000  # well over the esp32 profile's 1,024 B write buffer


def _publish_until_refused(port, topic, n):
    """Publishes up to n large QoS 1 messages; returns the payloads the
    broker acknowledged (it may refuse or close once its heap is short)."""
    p = Client(port, "big-pub", version=5)
    acked = []
    for i in range(n):
        payload = bytes([65 + i % 26]) * BIG
        try:
            r = p.publish("%s/%d" % (topic, i), payload, qos=1)
        except (Closed, AssertionError, OSError, socket.timeout):
            break
        if r.reason >= 0x80:
            break
        acked.append(payload)
    try:
        p.close()
    except OSError:
        pass
    return acked


def test_every_acknowledged_large_message_reaches_every_offline_session():
    # (max_queued_bytes lifted: the heap, not the queues' byte bound, stops the publisher.)
    with BrokerProc(board="esp32", config={"max_queued_bytes": 0}) as b:
        for i in range(3):
            c = Client(b.port, "big-off%d" % i, version=4, clean=False)
            c.subscribe([("big/#", 1)])
            c.disconnect()
        acked = _publish_until_refused(b.port, "big", 40)
        assert len(acked) >= 5, "the broker took only %d messages of %d bytes" % (len(acked), BIG)
        for i in range(3):
            c = Client(b.port, "big-off%d" % i, version=4, clean=False)
            got = [m.payload for m in c.messages(timeout=2.0)]
            c.disconnect()
            assert got == acked, "session %d got %d of %d acknowledged messages" % (i, len(got), len(acked))
        # Nothing was dropped for lack of heap, and no one disconnected.
        assert "out of memory" not in b.log() and "no heap" not in b.log()
        assert "Traceback" not in b.log()


def test_unacknowledged_large_messages_are_sent_again_with_dup_on_resumption():
    with BrokerProc(board="esp32") as b:
        sub = Client(b.port, "big-resume", version=5, clean=False, props={0x11: 300})
        sub.subscribe([("bigr/#", 1)])
        pub = Client(b.port, "bigr-pub", version=5)
        payloads = [bytes([97 + i]) * (BIG + i) for i in range(3)]
        for i, pl in enumerate(payloads):
            assert pub.publish("bigr/%d" % i, pl, qos=1).reason == 0
        first = sub.messages(n=3, timeout=3.0, ack=False)
        assert [m.payload for m in first] == payloads
        assert not any(m.dup for m in first)
        sub.close()  # no PUBACK sent: all three stay in flight
        sub = Client(b.port, "big-resume", version=5, clean=False, props={0x11: 300})
        assert sub.connack.session_present
        again = sub.messages(n=3, timeout=3.0)
        assert [m.payload for m in again] == payloads
        assert [m.pid for m in again] == [m.pid for m in first]
        assert all(m.dup for m in again)
        # Acknowledged now: a further resumption sends nothing again.
        sub.close()
        sub = Client(b.port, "big-resume", version=5, clean=False, props={0x11: 300})
        assert sub.messages(timeout=0.5) == []
        sub.close()
        pub.close()


def test_large_message_and_small_ones_after_it_keep_their_order():
    with BrokerProc(board="esp32") as b:
        sub = Client(b.port, "big-order", version=4)
        sub.subscribe([("ord/#", 1)])
        pub = Client(b.port, "ord-pub", version=4)
        sent = []
        for i in range(12):
            pl = (b"L%d" % i) * 1500 if i % 3 == 0 else b"s%d" % i
            pub.publish("ord/x", pl, qos=1 if i % 2 else 0)
            sent.append(pl)
        got = [m.payload for m in sub.messages(n=12, timeout=3.0)]
        assert got == sent
        sub.close()
        pub.close()


def test_publish_whose_head_alone_exceeds_the_write_buffer_is_delivered():
    # About 1.5 KB of user properties make the head larger than the 1 KB
    # write buffer: it goes out on its own, and what follows is not stuck.
    with BrokerProc(board="esp32") as b:
        sub = Client(b.port, "bighead-sub", version=5)
        sub.subscribe([("bh/t", 0)])
        pub = Client(b.port, "bighead-pub", version=5)
        up = [("k%d" % i, "v" * 100) for i in range(14)]
        pub.publish("bh/t", b"x" * 2000, 0, props={0x26: up})
        pub.publish("bh/t", b"small", 0)
        got = sub.messages(n=2, timeout=3.0)
        assert [len(m.payload) for m in got] == [2000, 5]
        assert got[0].props.get(0x26) == up
        sub.close()
        pub.close()


def test_topic_alias_is_only_used_after_the_client_was_sent_it():
    # Messages that wait for room in the write buffer must not register an
    # alias the client never received (a v5 client would see an unknown
    # alias: a protocol error).
    with BrokerProc(board="esp32") as b:
        sub = Client(b.port, "alias-sub", version=5, props={0x22: 10})
        sub.subscribe([("al/#", 0)])
        pub = Client(b.port, "alias-pub", version=5)
        sent = []
        for i in range(6):
            t = "al/%s" % "abc"[i % 3]
            pub.publish(t, bytes([97 + i]) * 900, 0)
            sent.append((t, bytes([97 + i]) * 900))
        known = {}
        got = []
        for m in sub.messages(n=6, timeout=3.0):
            a = (m.props or {}).get(0x23)
            t = m.topic
            if a is not None:
                if t:
                    known[a] = t
                else:
                    assert a in known, "alias %d used before the client learned it" % a
                    t = known[a]
            got.append((t, m.payload))
        assert got == sent
        sub.close()
        pub.close()


def test_messages_near_max_packet_size_are_taken_after_persistent_sessions_came_and_went():
    # Four persistent sessions subscribe and go, then a publisher sends two
    # retained messages of 7.1 and 7.6 KB (the esp32's max_packet_size is
    # 8 KB) on two topics. With 52 KB free, the heap had no piece of 7 KB
    # left for the second one: each session's objects had been made high
    # in the free heap, amid the garbage of its login. 3.1.1 publishers
    # waited for good (8 of 8 runs) and v5 ones were told 0x97 for the
    # fourth message (11 of 12 runs; large-retained probe).
    sizes = (7100, 7600, 7300, 7500)
    topics = ("bigr/" + "t" * 150, "bigr/" + "u" * 120)
    for version in (4, 5):
        # (max_queued_bytes lifted: the sessions' queues take every large message.)
        with BrokerProc(board="esp32", config={"max_queued_bytes": 0}) as b:
            for i in range(4):
                c = Client(b.port, "bigr-off%d" % i, version=version, clean=False,
                           props={0x11: 3600} if version == 5 else None)
                c.subscribe([("bigr/#", 1)])
                c.disconnect()
            p = Client(b.port, "bigr-pub", version=version)
            for i, n in enumerate(sizes):
                ack = p.publish(topics[i % 2], bytes([65 + i]) * n, qos=1, retain=True, timeout=10)
                assert ack.reason == 0, (version, i, ack)
            p.disconnect()
            c = Client(b.port, "bigr-off0", version=version, clean=False,
                       props={0x11: 3600} if version == 5 else None)
            got = [len(m.payload) for m in c.messages(timeout=2.0)]
            c.disconnect()
            assert got == list(sizes), (version, got)
            assert "Traceback" not in b.log()


def test_messages_near_max_packet_size_are_taken_after_sessions_came_and_went_during_a_flood():
    # As above, but another client floods small QoS 0 messages while six
    # sessions subscribe and go: what they keep is then made amid the
    # flood's garbage, anywhere in the heap the allocator has reached since
    # the last collection. With the esp32 collecting after every 55,000 B
    # allocated (half its heap), a 7 KB message then found no piece with
    # 35 to 43 KB free: 3.1.1 publishers waited for good, v5 ones got 0x97
    # (this test: 6 of 6 runs). After every 24,576 B, that reach is short
    # and the top of the heap stays in one piece.
    sizes = (7100, 7600, 7300, 7500)
    for version in (4, 5):
        # (max_queued_bytes lifted: the sessions' queues take every large message.)
        with BrokerProc(board="esp32", config={"max_queued_bytes": 0}) as b:
            stop = threading.Event()
            threads = flood(b.port, stop, seed=version)
            props = {0x11: 3600} if version == 5 else None
            for i in range(6):
                c = Client(b.port, "flood-off%d" % i, version=version, clean=False, props=props)
                for j in range(3):
                    c.subscribe([("floodbig/%d/#" % j, 1)])
                time.sleep(0.05)
                c.close()
            time.sleep(0.3)
            stop.set()
            for t in threads:
                t.join(5)
            time.sleep(0.5)  # (the broker sees the sessions and the flood go)
            topics = ("floodbig/0/" + "t" * 140, "floodbig/1/" + "u" * 90)
            p = Client(b.port, "flood-pub", version=version)
            for i, n in enumerate(sizes):
                ack = p.publish(topics[i % 2], bytes([65 + i]) * n, qos=1, retain=True, timeout=10)
                assert ack.reason == 0, (version, i, ack)
            p.disconnect()
            c = Client(b.port, "flood-off0", version=version, clean=False, props=props)
            got = [len(m.payload) for m in c.messages(timeout=2.0)]
            c.disconnect()
            assert got == list(sizes), (version, got)
            assert "Traceback" not in b.log()


def _publisher_for_an_offline_session(port, name):
    # A v5 publisher, once a persistent v5 session subscribed to name/# at
    # QoS 1 has gone offline: what it publishes there stays in the heap.
    c = Client(port, name + "-off", version=5, clean=False, props={0x11: 3600})
    c.subscribe([(name + "/#", 1)])
    c.disconnect()
    return Client(port, name + "-pub", version=5)


def test_a_large_message_is_refused_only_when_the_heap_cannot_hold_it_once():
    # A payload read into a buffer of its own is kept there, so its bytes
    # are taken once. They were counted a second time when the message was
    # admitted: v5 publishers were told 0x97 with room for two more such
    # messages above the floor (outside probe: 6 KB refused with 28 KB
    # free). Persistence off (this is about the heap alone): an offline
    # session holds what it is sent in the heap.
    size = 6000
    floor = 16384  # the esp32 profile's min_free_heap
    # (max_queued_bytes lifted: the heap, not the queue's byte bound, refuses.)
    with BrokerProc(board="esp32", config={"max_queued_bytes": 0, "persistence": False, "sys_interval": 1}) as b:
        p = _publisher_for_an_offline_session(b.port, "hold")
        taken = 0
        for i in range(12):
            if p.publish("hold/%d" % i, bytes([65 + i]) * size, qos=1).reason:
                break
            taken += 1
        p.disconnect()
        assert 0 < taken < 12, taken
        w = Client(b.port, "hold-watch", version=5)
        w.subscribe([("$SYS/broker/heap/free", 0)])
        free = int(next(m for m in w.messages(timeout=2.5)).payload)
        w.disconnect()
        assert free < floor + size + 1024, "a %d B message refused with %d B free" % (size, free)


def test_the_log_says_once_a_minute_why_messages_wait_for_heap():
    # Publishers stalled or told 0x97 for heap with nothing in the log to
    # say why (outside probe). One line names the floor; refusals that
    # follow within a minute add none (a hub at its floor would otherwise
    # write a board's log ring on flash all day). Persistence off: this is
    # about the heap alone.
    # (max_queued_bytes lifted: the heap, not the queue's byte bound, refuses.)
    with BrokerProc(board="esp32", config={"max_queued_bytes": 0, "persistence": False}) as b:
        p = _publisher_for_an_offline_session(b.port, "short")
        refused = 0
        for i in range(16):
            if p.publish("short/%d" % i, bytes([65 + i]) * 6000, qos=1).reason == 0x97:
                refused += 1
        p.disconnect()
        assert refused >= 3, refused
        lines = [ln for ln in b.log().splitlines() if "heap short" in ln]
        assert len(lines) == 1, lines
        assert "min_free_heap 16384" in lines[0], lines[0]
