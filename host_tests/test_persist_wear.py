"""What a retained message costs the flash, on the shipped esp32 config
(persistence on), counted by the broker itself: $SYS store/commits and
store/bytes written (sys_interval 1, so the values are at most a second
old).

- the same retained value again (payload, QoS and properties) writes
  nothing;
- retained QoS 0 values, which nobody acknowledged, wait for the autosave:
  at most one write per topic per autosave_interval, and the latest value
  is what a power cut after it leaves;
- a clean stop writes what waits for the autosave;
- a SUBSCRIBE a persistent session already has, options and identifier
  the same, writes nothing.
"""
import time

from brokerproc import BrokerProc
from mqttc import Client, sys_round, sys_value, sys_wait


def store_counters(port):
    # The counters of a $SYS round that came after this call. (A fixed
    # 1.2 s wait could read the round before when housekeeping ran late.)
    sys_round(port)
    return int(sys_value(port, "store/commits")), int(sys_value(port, "store/bytes written"))


def retained_payload(port, topic):
    c = Client(port, "reader-%d" % time.monotonic_ns(), version=5)
    try:
        c.subscribe([(topic, 0)])
        m = c.poll(2)
        return None if m is None else bytes(m.payload)
    finally:
        c.close()


def test_the_same_retained_value_again_writes_nothing():
    with BrokerProc(config={"sys_interval": 1}) as b:
        c = Client(b.port, "sensor-a", version=5)
        assert c.publish("site/a/temp", b"21.5", qos=1, retain=True).reason == 0
        commits, written = store_counters(b.port)
        assert commits >= 1 and written > 0, (commits, written)
        for _ in range(50):
            assert c.publish("site/a/temp", b"21.5", qos=1, retain=True).reason == 0
        assert store_counters(b.port) == (commits, written)
        # A changed value is written (and counted) before its PUBACK.
        assert c.publish("site/a/temp", b"21.6", qos=1, retain=True).reason == 0
        commits2, written2 = store_counters(b.port)
        assert commits2 > commits and written2 > written
        c.close()


def test_a_subscribe_a_persistent_session_already_has_writes_nothing_and_still_sends_the_retained_value():
    # The session's record was written again each time: 117 B (v5) and
    # 119 B (3.1.1) of flash for nothing that changed (outside wear probe).
    with BrokerProc(config={"sys_interval": 1}) as b:
        pub = Client(b.port, "wear-sub-pub", version=5)
        assert pub.publish("wear/sub/x", b"kept", qos=1, retain=True).reason == 0
        for v in (5, 4):
            props = {0x11: 3600} if v == 5 else None
            c = Client(b.port, "wear-sub-%d" % v, version=v, clean=False, props=props)
            # (QoS 0: a retained value sent at QoS 1 to a persistent session
            # is written, as in flight.)
            sub = ([("wear/sub/#", 0)], {0x0B: 3} if v == 5 else None)
            assert c.subscribe(*sub) == [0]
            assert [m.payload for m in c.messages(1, timeout=3)] == [b"kept"]
            before = store_counters(b.port)
            for _ in range(5):
                assert c.subscribe(*sub) == [0]
                # Retain Handling 0: the retained value comes again each time.
                assert [m.payload for m in c.messages(1, timeout=3)] == [b"kept"]
            assert store_counters(b.port) == before, v
            # Other options are a change: written.
            assert c.subscribe([("wear/sub/#", 2)], {0x0B: 3} if v == 5 else None) == [2]
            assert c.messages(1, timeout=3)
            assert store_counters(b.port)[1] > before[1], v
            c.disconnect()
        b.restart()  # the changed options were written: QoS 2 now
        c = Client(b.port, "wear-sub-5", version=5, clean=False, props={0x11: 3600})
        assert c.connack.session_present
        pub = Client(b.port, "wear-sub-pub2", version=5)
        pub.publish("wear/sub/y", b"after", qos=2)
        m = c.get()
        assert (m.payload, m.qos) == (b"after", 2)
        c.close()


def test_retained_qos0_updates_are_written_once_per_autosave_interval():
    # A short autosave_interval (shipped: 60 s) so that the test sees one.
    with BrokerProc(config={"sys_interval": 1, "autosave_interval": 3}) as b:
        c = Client(b.port, "sensor-b", version=5)
        commits, _ = store_counters(b.port)
        for i in range(100):
            c.publish("site/b/temp", b"%d" % i, qos=0, retain=True)
        c.ping()  # all 100 handled
        # Written with the next autosave: one commit, or two if the burst
        # straddled one.
        v = sys_wait(b.port, "store/commits", lambda x: int(x) > commits, timeout=8)
        time.sleep(3.5)  # one more autosave interval: nothing new to write
        done, _ = store_counters(b.port)
        assert commits < done <= commits + 2, (commits, v, done)
        c.close()
        b.kill9()  # a power cut after the autosave
        b.start()
        assert retained_payload(b.port, "site/b/temp") == b"99"


def test_a_clean_stop_writes_the_retained_qos0_value_waiting_for_its_autosave():
    # autosave_interval an hour: only the clean stop can write it.
    with BrokerProc(config={"sys_interval": 1, "autosave_interval": 3600}) as b:
        c = Client(b.port, "sensor-c", version=5)
        commits, _ = store_counters(b.port)
        c.publish("site/c/state", b"open", qos=0, retain=True)
        c.ping()
        assert store_counters(b.port)[0] == commits  # waiting, not written
        c.close()
        b.restart()  # SIGINT: the broker's clean stop, then the same store
        assert retained_payload(b.port, "site/c/state") == b"open"


MANY_VALUES = {"max_retained_bytes": 1 << 16}


def _many_values(c, n):
    # n retained QoS 0 values of about 515 B: n = 60 is about 31 KB, more
    # than one staged batch of the store holds (16 KB), and more than the
    # retained payloads the esp32 keeps (MANY_VALUES raises that).
    for i in range(n):
        c.publish("site/many/%03d" % i, bytes([i]) * (500 + i % 31), qos=0, retain=True)
    c.ping()  # all handled


def _retained_count(port, flt):
    c = Client(port, "counter-%d" % time.monotonic_ns(), version=5)
    try:
        c.subscribe([(flt, 0)])
        return {m.topic: bytes(m.payload) for m in c.messages(timeout=1.0)}
    finally:
        c.close()


def test_an_autosave_larger_than_one_batch_writes_every_value_before_a_power_cut():
    # They used to go in one batch: put() refused what did not fit ("store
    # full" in the log), and after a power cut only about half came back.
    with BrokerProc(config=dict(MANY_VALUES, sys_interval=1, autosave_interval=2)) as b:
        c = Client(b.port, "sensor-many", version=5)
        _many_values(c, 60)
        c.close()
        payloads = sum(500 + i % 31 for i in range(60))
        sys_wait(b.port, "store/bytes used", lambda v: int(v) >= payloads, timeout=20)
        seen = None
        for _ in range(10):  # until a $SYS round finds no new commit
            now = store_counters(b.port)
            if now == seen:
                break
            seen = now
        b.kill9()
        b.start()
        got = _retained_count(b.port, "site/many/#")
        assert sorted(got) == ["site/many/%03d" % i for i in range(60)]
        assert all(got["site/many/%03d" % i] == bytes([i]) * (500 + i % 31) for i in range(60))
        assert "store full" not in b.log()


def test_a_clean_stop_writes_every_value_waiting_for_its_autosave_in_as_many_batches_as_it_takes():
    with BrokerProc(config=dict(MANY_VALUES, sys_interval=1, autosave_interval=3600)) as b:
        c = Client(b.port, "sensor-many2", version=5)
        _many_values(c, 60)
        c.close()
        b.restart()  # SIGINT: the broker's clean stop, then the same store
        got = _retained_count(b.port, "site/many/#")
        assert sorted(got) == ["site/many/%03d" % i for i in range(60)]
        assert "store full" not in b.log()
