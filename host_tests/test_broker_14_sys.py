"""$SYS/broker/... topics with sys_interval 1 (Mosquitto's names)."""
import re

import pytest

from mqttc import BrokerProc, Client, sys_value, sys_wait
from brokerproc import profile

# The GC heap the twin gets: the board's (-X heapsize rounds it to blocks).
HEAP_BYTES = profile("esp32")["heap"]


@pytest.fixture(scope="module")
def broker():
    with BrokerProc(board="esp32", config={"sys_interval": 1}) as b:
        # First publication comes one interval after start.
        assert sys_wait(b.port, "version", lambda v: True, timeout=4) is not None
        yield b


@pytest.fixture(autouse=True)
def still_alive(broker):
    yield
    assert broker.alive(), "broker died:\n" + broker.log()[-3000:]


NAMES = ["clients/connected", "messages/received", "messages/sent", "uptime", "version",
         "heap/used", "heap/free"]


def test_sys_topics_are_published_as_retained_messages(broker):
    c = Client(broker.port, "sys-all", version=5)
    c.subscribe([("$SYS/broker/#", 0)])
    got = {m.topic: m for m in c.messages(timeout=0.4)}
    for n in NAMES:
        m = got.get("$SYS/broker/" + n)
        assert m is not None, "missing $SYS/broker/%s (have %s)" % (n, sorted(got))
        assert m.retain is True and m.payload
    c.close()


def test_sys_version_names_the_broker(broker):
    assert sys_value(broker.port, "version").strip()


def test_sys_uptime_increases(broker):
    a = sys_value(broker.port, "uptime")
    assert re.fullmatch(r"\d+ seconds", a), a
    b = sys_wait(broker.port, "uptime", lambda v: int(v.split()[0]) > int(a.split()[0]))
    assert int(b.split()[0]) > int(a.split()[0])


def test_sys_clients_connected_follows_connections(broker):
    # The reading client itself counts as connected.
    base = int(sys_wait(broker.port, "clients/connected", lambda v: True))
    extra = [Client(broker.port, "sys-cc-%d" % i, version=4) for i in range(3)]
    v = sys_wait(broker.port, "clients/connected", lambda v: int(v) == base + 3)
    assert int(v) == base + 3
    for c in extra:
        c.disconnect()
    v = sys_wait(broker.port, "clients/connected", lambda v: int(v) == base)
    assert int(v) == base


def test_sys_clients_maximum_is_the_most_connected_at_once():
    # As Mosquitto's: it said max_connections, a config value. (A broker of
    # its own: the most at once counts every client since the start.)
    with BrokerProc(config={"sys_interval": 1}) as b:
        cs = [Client(b.port, "sys-peak-%d" % i) for i in range(4)]
        for c in cs:
            c.close()
        assert int(sys_wait(b.port, "clients/connected", lambda v: int(v) == 1)) == 1  # the reader
        # 4, and the $SYS reader when it came before they left.
        assert sys_wait(b.port, "clients/maximum", lambda v: True) in ("4", "5")


def test_sys_messages_received_counts_publishes(broker):
    before = int(sys_wait(broker.port, "messages/received", lambda v: True))
    p = Client(broker.port, "sys-rx", version=5)
    for i in range(5):
        p.publish("sysrx/t", b"x", qos=1)
    p.close()
    v = sys_wait(broker.port, "messages/received", lambda v: int(v) >= before + 5)
    assert int(v) >= before + 5
    assert int(v) < before + 5 + 20  # not wildly off


def test_sys_messages_sent_counts_deliveries(broker):
    s = Client(broker.port, "sys-tx-sub", version=5)
    s.subscribe([("systx/t", 1)])
    before = int(sys_wait(broker.port, "messages/sent", lambda v: True))
    p = Client(broker.port, "sys-tx", version=5)
    for i in range(4):
        p.publish("systx/t", b"x", qos=1)
    assert len(s.messages(4)) == 4
    v = sys_wait(broker.port, "messages/sent", lambda v: int(v) >= before + 4)
    assert int(v) >= before + 4
    p.close()
    s.close()


def test_sys_heap_used_and_free_are_plausible_and_change(broker):
    # The baseline from a $SYS round with no client connected but a
    # reader of $SYS: a value published before the earlier tests' clients
    # had gone still held their connections and buffers, as much heap as
    # the 6 connections below take (seen once: +784 B instead of +4.9 KB).
    assert int(sys_wait(broker.port, "clients/connected", lambda v: int(v) <= 1, timeout=6)) <= 1
    used = int(sys_value(broker.port, "heap/used"))
    free = int(sys_value(broker.port, "heap/free"))
    assert 0 < used < HEAP_BYTES and 0 < free < HEAP_BYTES
    assert HEAP_BYTES * 0.9 <= used + free <= HEAP_BYTES, (used, free)
    # Holding 6 more connections costs heap, and it shows.
    cs = [Client(broker.port, "sys-heap-%d" % i, version=4) for i in range(6)]
    v = sys_wait(broker.port, "heap/used", lambda v: int(v) > used + 1000)
    assert int(v) > used + 1000
    for c in cs:
        c.disconnect()


def test_sys_topics_not_delivered_to_hash_subscription(broker):
    c = Client(broker.port, "sys-hash", version=4)
    c.subscribe([("#", 0)])
    got = c.messages(timeout=1.5)
    assert [m.topic for m in got if m.topic.startswith("$SYS")] == []
    c.close()


def test_sys_values_are_republished_only_when_changed(broker):
    c = Client(broker.port, "sys-ver", version=5)
    c.subscribe([("$SYS/broker/version", 0)])
    first = c.messages(timeout=0.3)
    assert len(first) == 1 and first[0].retain
    assert c.poll(2.2) is None, "unchanged version published again"
    c.close()
