"""What a hostile client must not reach, with the shipped defaults (issue
14): $SYS by any path, the CPU of a full broker, dead entries in the
connection table, store keys it can make too long, messages queued for
another user's session, and the dashboard's client list."""
import time

import pytest

from brokerfixtures import broker, still_alive  # noqa: F401
from mqttc import BrokerProc, Client, collect

CONFIG = {}  # the shipped defaults


# ---------------------------------------------------------------- $SYS


def sys_payloads(port, topic, seconds=0.6):
    c = Client(port, "sys-look-%d" % time.monotonic_ns(), version=5)
    c.subscribe([(topic, 0)])
    got = [m.payload for m in collect(c, seconds)]
    c.close()
    return got


@pytest.mark.parametrize("version", [5, 4])
def test_a_will_under_sys_is_refused_and_never_published_retained_or_stored(version):
    # The report: a retained will on $SYS/broker/version, then the
    # socket dropped, forged the broker's version, on flash too.
    with BrokerProc(board="esp32") as b:
        watch = Client(b.port, "sys-watch", version=5)
        watch.subscribe([("$SYS/#", 0)])
        collect(watch, 0.3)
        for topic in ("$SYS/broker/version", "$SYS", "$SYS/forged/new"):
            c = Client(b.port, "willer", version=version, will_topic=topic, will_payload=b"FORGED",
                       will_qos=1, will_retain=True, expect_ok=False)
            # Refused as a will the client may not write (Mosquitto: not authorized).
            assert c.connack.reason == (0x87 if version == 5 else 0x05), c.connack
            c.close()
        assert b"FORGED" not in [m.payload for m in collect(watch, 1.0)]
        watch.close()
        assert b"FORGED" not in sys_payloads(b.port, "$SYS/#")
        b.restart()  # what is on flash comes back
        assert b"FORGED" not in sys_payloads(b.port, "$SYS/#")
        assert b.alive()


# ---------------------------------------------------------------- client id


@pytest.mark.parametrize("version,code", [(5, 0x85), (4, 0x02)])
def test_client_id_longer_than_128_bytes_is_refused(broker, version, code):
    # 128 bytes is the limit (README, "Choices"): "q" + id + "\0" + a
    # sequence number must stay a valid store key. Counted in UTF-8 bytes.
    ok = Client(broker.port, "\u00e9" * 64, version=version, clean=True)
    ok.disconnect()
    for cid in ("x" * 129, "\u00e9" * 65, "y" * 1000):
        c = Client(broker.port, cid, version=version, expect_ok=False)
        assert c.connack.reason == code, (len(cid), c.connack)
        assert c.closed()


def test_a_long_client_id_cannot_disconnect_other_publishers(broker):
    # The report: a persistent session under a 1 KB id made store
    # keys the store refuses ("s" + id fits its 1024 bytes, "q" + id + "\0"
    # + sequence does not); the ValueError came up in the publisher's
    # handler and disconnected it.
    long = Client(broker.port, "L" * 1022, version=5, props={0x11: 600}, expect_ok=False)
    if long.connack.reason == 0:
        long.subscribe([("longid/#", 1)])
        long.close()
    pub = Client(broker.port, "longid-pub", version=5)
    for i in range(3):
        assert pub.publish("longid/t", b"%d" % i, qos=1).reason in (0, 0x10)
    pub.disconnect()
    assert "ValueError" not in broker.log()
