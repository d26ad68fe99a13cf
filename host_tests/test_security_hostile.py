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
