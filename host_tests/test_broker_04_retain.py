"""Retained messages (MQTT 3.1.1 3.3.1.3; MQTT 5.0 3.3.1.3)."""
import pytest

from brokerfixtures import broker, still_alive  # noqa: F401
from mqttc import MAX_PACKET, RECEIVE_MAX, SESSION_EXPIRY, BrokerProc, Client, RAP

CONFIG = {}




@pytest.fixture
def pub(broker):
    c = Client(broker.port, "r04-pub", version=5)
    yield c
    c.close()


def retained(port, flt, version=5, qos=2, cid="r04-reader"):
    c = Client(port, cid, version=version)
    c.subscribe([(flt, qos)])
    got = c.messages(timeout=0.3)
    c.close()
    return got


@pytest.mark.parametrize("version,raw", [(4, b"\x31\x09\x00\x05ret/av1"),
                                         (5, b"\x31\x0a\x00\x05ret/a\x00v1")])
def test_retained_message_is_sent_on_subscribe_with_retain_flag(broker, pub, version, raw):
    # Written from the retained table's packed value; a v5 PUBLISH still
    # carries its Property Length (0).
    pub.publish("ret/a", b"v1", qos=1, retain=True)
    c = Client(broker.port, "r04-exact%d" % version, version=version)
    c.subscribe([("ret/a", 0)])
    assert c.recv_raw() == raw
    c.close()


def test_retained_message_is_replaced_by_newer_one(broker, pub):
    pub.publish("ret/b", b"old", qos=1, retain=True)
    pub.publish("ret/b", b"new", qos=1, retain=True)
    got = retained(broker.port, "ret/b")
    assert [(m.payload, m.retain) for m in got] == [(b"new", True)]


def test_retained_message_is_deleted_by_empty_payload(broker, pub):
    pub.publish("ret/c", b"gone soon", qos=1, retain=True)
    assert len(retained(broker.port, "ret/c")) == 1
    pub.publish("ret/c", b"", qos=1, retain=True)
    assert retained(broker.port, "ret/c") == []


def test_empty_retained_publish_is_forwarded_to_current_subscribers(broker, pub):
    # 3.1.1 3.3.1.3: a zero-byte retained PUBLISH is processed as normal.
    s = Client(broker.port, "r04-empty-live", version=5)
    s.subscribe([("ret/d", 1)])
    pub.publish("ret/d", b"", qos=1, retain=True)
    m = s.get()
    assert m.payload == b"" and m.retain is False
    s.close()


def test_non_retained_publish_is_not_stored(broker, pub):
    pub.publish("ret/e", b"live only", qos=1, retain=False)
    assert retained(broker.port, "ret/e") == []


def test_non_retained_publish_does_not_replace_retained(broker, pub):
    pub.publish("ret/f", b"kept", qos=1, retain=True)
    pub.publish("ret/f", b"passing", qos=1, retain=False)
    assert [m.payload for m in retained(broker.port, "ret/f")] == [b"kept"]


def test_retained_messages_match_wildcard_subscription(broker, pub):
    for t in ("retw/a", "retw/b/c", "other/x"):
        pub.publish(t, t.encode(), qos=1, retain=True)
    got = retained(broker.port, "retw/#")
    assert sorted(m.topic for m in got) == ["retw/a", "retw/b/c"]
    assert all(m.retain for m in got)


def test_retained_message_is_delivered_at_minimum_of_its_qos_and_granted(broker, pub):
    pub.publish("ret/q", b"q2", qos=2, retain=True)
    assert [m.qos for m in retained(broker.port, "ret/q", qos=1)] == [1]
    assert [m.qos for m in retained(broker.port, "ret/q", qos=2)] == [2]
    pub.publish("ret/q0", b"q0", qos=0, retain=True)
    assert [m.qos for m in retained(broker.port, "ret/q0", qos=2)] == [0]


@pytest.mark.parametrize("version", [4, 5])
def test_normal_forwarding_clears_retain_flag(broker, pub, version):
    # 3.1.1 MQTT-3.3.1-9; 5.0 3.3.1.3 with Retain As Published 0.
    s = Client(broker.port, "r04-clear%d" % version, version=version)
    s.subscribe([("ret/live%d" % version, 1)])
    pub.publish("ret/live%d" % version, b"x", qos=1, retain=True)
    m = s.get()
    assert m.retain is False
    s.close()


def test_retain_as_published_forwards_retain_flag(broker, pub):
    s = Client(broker.port, "r04-rap", version=5)
    s.subscribe([("ret/rap", 1 | RAP)])
    pub.publish("ret/rap", b"x", qos=1, retain=True)
    pub.publish("ret/rap", b"y", qos=1, retain=False)
    got = s.messages(2)
    assert [(m.payload, m.retain) for m in got] == [(b"x", True), (b"y", False)]
    s.close()


def test_retained_message_from_v5_reaches_v311_subscriber_without_properties(broker, pub):
    pub.publish("ret/v5", b"p", qos=0, retain=True, props={0x03: "text/plain", 0x26: [("k", "v")]})
    c = Client(broker.port, "r04-v311", version=4)
    c.subscribe([("ret/v5", 0)])
    assert c.recv_raw() == b"\x31\x09\x00\x06ret/v5p"
    c.close()


def test_retained_message_keeps_its_v5_properties(broker, pub):
    pub.publish("ret/props", b"p", qos=1, retain=True,
                props={0x03: "text/plain", 0x26: [("k", "v"), ("a", "b")]})
    got = retained(broker.port, "ret/props")
    assert len(got) == 1
    assert got[0].props[0x03] == "text/plain"
    assert got[0].props[0x26] == [("k", "v"), ("a", "b")]


@pytest.mark.parametrize("version,sub_qos", [(4, 0), (5, 0), (4, 1), (5, 2)])
def test_more_retained_messages_than_one_output_buffer_holds_all_arrive_once(broker, pub, version, sub_qos):
    # 40 retained messages of 100 bytes, half QoS 0 and half QoS 1: several
    # times the 1 KB write buffer, so delivery stops and resumes as it
    # drains. Each arrives once, retained, at the lower of its QoS and the
    # subscription's.
    for i in range(40):
        pub.publish("many/%02d" % i, b"%02d" % i * 50, qos=i & 1, retain=True)
    c = Client(broker.port, "r04-many", version=version)
    c.subscribe([("many/#", sub_qos)])
    got = c.messages(40, timeout=5)
    assert sorted((m.topic, m.payload, m.qos, m.retain) for m in got) == [
        ("many/%02d" % i, b"%02d" % i * 50, min(i & 1, sub_qos), True) for i in range(40)]
    assert c.messages(timeout=0.3) == []
    c.close()
    for i in range(40):
        pub.publish("many/%02d" % i, b"", qos=1, retain=True)


@pytest.mark.parametrize("version", [4, 5])
def test_live_messages_after_a_subscribe_are_not_overtaken_by_its_retained_ones(broker, pub, version):
    # 24 retained values of 300 bytes (more than the write buffer holds)
    # go out while the same topics get newer live messages, at QoS 1 and
    # QoS 0 (which may pass straight through). Per topic the old retained
    # value must come first: a receiver is left with what came last
    # (MQTT-4.6.0-6).
    n = 24
    for i in range(n):
        pub.publish("order/%02d" % i, b"OLD" + bytes(300), qos=1, retain=True)
    c = Client(broker.port, "r04-order", version=version)
    c.subscribe([("order/#", 1)])
    for i in range(n):
        pub.publish("order/%02d" % i, b"NEW", qos=i & 1)
    got = c.messages(2 * n, timeout=5)
    seen = {}
    for m in got:
        seen.setdefault(m.topic, []).append((m.payload[:3], m.retain))
    assert seen == {"order/%02d" % i: [(b"OLD", True), (b"NEW", False)] for i in range(n)}
    c.close()
    for i in range(n):
        pub.publish("order/%02d" % i, b"", qos=1, retain=True)


def test_messages_queued_before_a_subscribe_go_before_its_retained_ones(broker, pub):
    # A session's queue, held back by its Receive Maximum of 1, then a
    # SUBSCRIBE that sends a retained message: the queue goes first, as
    # Mosquitto orders them (the retained ones join the queue's end).
    c = Client(broker.port, "r04-ahead", version=5, clean=False, props={SESSION_EXPIRY: 60})
    c.subscribe([("ahead/#", 1)])
    c.disconnect()
    pub.publish("ahead/r", b"R", qos=1, retain=True)
    for i in range(3):
        pub.publish("ahead/%d" % i, b"%d" % i, qos=1)
    c = Client(broker.port, "r04-ahead", version=5, clean=False, props={SESSION_EXPIRY: 60, RECEIVE_MAX: 1})
    first = c.recv()  # in flight, not acknowledged yet: the rest wait
    c.subscribe([("ahead/#", 1)])
    c.ack(first)
    got = [first] + c.messages(4, timeout=5)
    assert [(m.payload, m.retain) for m in got] == [
        (b"R", False), (b"0", False), (b"1", False), (b"2", False), (b"R", True)]
    c.close()
    pub.publish("ahead/r", b"", qos=1, retain=True)
    Client(broker.port, "r04-ahead", version=5).close()  # the session ends


def test_a_resend_after_reconnect_keeps_the_order_retained_and_live_messages_went_out_in(broker, pub):
    # 10 retained values, of which a Receive Maximum of 8 lets 8 out; then
    # 10 live ones queue. Once those 8 are acknowledged, the last 2 retained
    # ones go out, then 6 live ones, none acknowledged before the client
    # drops. Resent on reconnect (MQTT-4.6.0-1), they keep that order, and
    # every topic ends on its live value.
    n = 10
    props = {SESSION_EXPIRY: 60, RECEIVE_MAX: 8}
    for i in range(n):
        pub.publish("resend/%02d" % i, b"OLD", qos=1, retain=True)
    c = Client(broker.port, "r04-resend", version=5, clean=False, props=props)
    c.subscribe([("resend/#", 1)])
    first = [c.recv() for _ in range(8)]
    for i in range(n):
        pub.publish("resend/%02d" % i, b"NEW", qos=1)
    for m in first:
        c.ack(m)
    sent = [(m.topic, m.payload) for m in (c.recv() for _ in range(8))]
    c.close()
    c = Client(broker.port, "r04-resend", version=5, clean=False, props=props)
    got = c.messages(12, timeout=5)
    assert [(m.topic, m.payload) for m in got[:8]] == sent and all(m.dup for m in got[:8])
    last = {}
    for m in got:
        last[m.topic] = m.payload
    assert last == {"resend/%02d" % i: b"NEW" for i in range(n)}
    c.close()
    Client(broker.port, "r04-resend", version=5).close()  # the session ends
    for i in range(n):
        pub.publish("resend/%02d" % i, b"", qos=1, retain=True)


def test_retained_message_over_client_maximum_packet_size_is_skipped_and_the_rest_arrive(broker, pub):
    pub.publish("retmps/big", b"B" * 200, qos=0, retain=True)
    pub.publish("retmps/small", b"small", qos=0, retain=True)
    c = Client(broker.port, "r04-mps", version=5, props={MAX_PACKET: 100})
    c.subscribe([("retmps/#", 0)])
    assert [(m.topic, m.payload) for m in c.messages(timeout=0.5)] == [("retmps/small", b"small")]
    c.close()


def test_hash_gets_every_retained_topic_except_dollar_ones_which_their_own_filter_gets(broker, pub):
    # "#" is answered without matching each topic (retain.topics): it must
    # still leave out topics that start with '$' (MQTT-4.7.2-1).
    for t in ("dollar/a", "$app/x", "dollar/b/c"):
        pub.publish(t, b"v", qos=1, retain=True)
    try:
        got = [m.topic for m in retained(broker.port, "#")]
        assert "dollar/a" in got and "dollar/b/c" in got
        assert [t for t in got if t.startswith("$")] == []
        assert [m.topic for m in retained(broker.port, "$app/#")] == ["$app/x"]
    finally:
        for t in ("dollar/a", "$app/x", "dollar/b/c"):
            pub.publish(t, b"", qos=1, retain=True)


def test_filter_with_a_literal_head_gets_only_the_topics_it_matches(broker, pub):
    # Topics sharing the filter's head before its wildcard, and more, are
    # compared whole: "head/+/c" is not "head/b/cd", nor "head/b/c/d".
    topics = ("head/b/c", "head/x/c", "head/b/cd", "head/b/c/d", "head", "heads/b/c")
    for t in topics:
        pub.publish(t, b"v", qos=0, retain=True)
    try:
        assert sorted(m.topic for m in retained(broker.port, "head/+/c")) == ["head/b/c", "head/x/c"]
        assert sorted(m.topic for m in retained(broker.port, "head/#")) == [
            "head", "head/b/c", "head/b/c/d", "head/b/cd", "head/x/c"]
    finally:
        for t in topics:
            pub.publish(t, b"", qos=0, retain=True)
