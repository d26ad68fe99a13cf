"""MQTT 5.0 features carried in properties: message expiry, topic aliases in
both directions, Receive Maximum in both directions, Maximum Packet Size,
forwarded application properties, payload format, reason codes
(MQTT 5.0 3.1.2.11, 3.2.2.3, 3.3.2.3, 3.4.2.1, 4.9)."""
import time

import pytest

from brokerfixtures import broker, still_alive  # noqa: F401
from mqttc import (BrokerProc, Client, Publish, Subscribe, Unsubscribe, Ack, enc, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP,
                   DISCONNECT, SESSION_EXPIRY, EXPIRY, TOPIC_ALIAS, TOPIC_ALIAS_MAX, RECEIVE_MAX,
                   MAX_PACKET, PFI, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION, USER, SUBID)

CONFIG = {"max_inflight_messages": 3, "max_topic_alias": 4}




@pytest.fixture
def pub(broker):
    c = Client(broker.port, "p12-pub", version=5)
    yield c
    c.close()


# ---------------------------------------------------------------- message expiry


def test_queued_message_is_dropped_when_expired_and_survivor_carries_remaining_interval(broker, pub):
    s = Client(broker.port, "p12-exp", version=5, clean=False, props={SESSION_EXPIRY: 60})
    s.subscribe([("exp/t", 1)])
    s.disconnect()
    pub.publish("exp/t", b"short", qos=1, props={EXPIRY: 1})
    pub.publish("exp/t", b"long", qos=1, props={EXPIRY: 30})
    pub.publish("exp/t", b"never", qos=1)
    time.sleep(2.2)
    s = Client(broker.port, "p12-exp", version=5, clean=False, props={SESSION_EXPIRY: 60})
    got = s.messages(n=2, timeout=5)
    assert [m.payload for m in got] == [b"long", b"never"] and s.poll(0.3) is None
    left = got[0].props[EXPIRY]
    assert 26 <= left <= 28, left  # 30 s minus the ~2.2 s it waited
    assert EXPIRY not in (got[1].props or {})
    s.disconnect(props={SESSION_EXPIRY: 0})


def test_live_message_carries_message_expiry_interval(broker, pub):
    s = Client(broker.port, "p12-explive", version=5)
    s.subscribe([("explive/t", 0)])
    pub.publish("explive/t", b"x", qos=0, props={EXPIRY: 100})
    m = s.get()
    assert 99 <= m.props[EXPIRY] <= 100
    s.close()


def test_a_message_expiry_interval_of_0_means_no_expiry_live_retained_and_queued(broker, pub):
    # Taken as "expired at once", it was dropped for every receiver, with
    # PUBACK 0x00. Mosquitto 2.0.11 takes 0 as no expiry and delivers it
    # everywhere; so do we, without the property.
    live = Client(broker.port, "p12-exp0-live", version=5)
    live.subscribe([("exp0/#", 1)])
    off = Client(broker.port, "p12-exp0-off", version=5, clean=False, props={SESSION_EXPIRY: 60})
    off.subscribe([("exp0/#", 1)])
    off.close()
    assert pub.publish("exp0/a", b"zero", qos=1, retain=True, props={EXPIRY: 0}).reason == 0
    m = live.get()
    assert (m.topic, m.payload, EXPIRY in (m.props or {})) == ("exp0/a", b"zero", False)
    late = Client(broker.port, "p12-exp0-late", version=5)
    late.subscribe([("exp0/a", 1)])
    assert late.get().payload == b"zero"  # retained
    off = Client(broker.port, "p12-exp0-off", version=5, clean=False, props={SESSION_EXPIRY: 60})
    assert off.get().payload == b"zero"  # queued
    off.disconnect(props={SESSION_EXPIRY: 0})
    pub.publish("exp0/a", b"", qos=1, retain=True)
    live.close()
    late.close()


def test_expired_retained_message_is_not_sent_to_new_subscriber(broker, pub):
    pub.publish("expret/t", b"fleeting", qos=1, retain=True, props={EXPIRY: 1})
    pub.publish("expret/u", b"lasting", qos=1, retain=True, props={EXPIRY: 60})
    time.sleep(2.2)
    s = Client(broker.port, "p12-expret", version=5)
    s.subscribe([("expret/+", 1)])
    got = s.messages(n=1, timeout=5)
    assert [m.payload for m in got] == [b"lasting"] and s.poll(0.3) is None
    assert got[0].props[EXPIRY] <= 58
    pub.publish("expret/u", b"", qos=1, retain=True)
    s.close()


# ---------------------------------------------------------------- topic alias in


def test_topic_alias_set_then_used_with_empty_topic(broker, pub):
    s = Client(broker.port, "p12-ta-sub", version=5)
    s.subscribe([("ta/+", 1)])
    pub.publish("ta/x", b"1", qos=1, props={TOPIC_ALIAS: 2})
    pub.publish("", b"2", qos=1, props={TOPIC_ALIAS: 2})
    pub.publish("ta/y", b"3", qos=1, props={TOPIC_ALIAS: 2})  # remapped
    pub.publish("", b"4", qos=1, props={TOPIC_ALIAS: 2})
    got = s.messages(4)
    assert [(m.topic, m.payload) for m in got] == [("ta/x", b"1"), ("ta/x", b"2"), ("ta/y", b"3"),
                                                   ("ta/y", b"4")]
    # The alias is the publisher's: it is never forwarded.
    assert all(TOPIC_ALIAS not in (m.props or {}) for m in got)
    s.close()


def test_unknown_topic_alias_gets_disconnect_0x82(broker):
    c = Client(broker.port, "p12-ta-unknown", version=5)
    c.send(Publish("", b"x", 0, False, False, 0, {TOPIC_ALIAS: 3}))
    d = c.expect(DISCONNECT)
    assert d.reason == 0x82
    assert c.closed()


def test_topic_alias_0_gets_disconnect_0x81_as_from_mosquitto(broker):
    # MQTT-3.3.2-8 forbids it and names no reason code; Mosquitto 2.0.11
    # answers 0x81 (Malformed Packet).
    c = Client(broker.port, "p12-ta-zero", version=5)
    c.send_raw(b"\x30\x0e\x00\x07ta/zero\x03\x23\x00\x00x")
    d = c.expect(DISCONNECT)
    assert d.reason == 0x81
    assert c.closed()


@pytest.mark.parametrize("props,what", [
    ({SUBID: 7}, "subscription identifier"),  # MQTT-3.3.4-6
    ({RESPONSE_TOPIC: "reply/+"}, "response topic with +"),  # MQTT-3.3.2-14
    ({RESPONSE_TOPIC: "reply/#"}, "response topic with #"),
], ids=["subid", "response-plus", "response-hash"])
def test_publish_with_a_property_a_client_must_not_send_gets_disconnect_0x82(broker, still_alive, props, what):
    # The spec makes each a Protocol Error; the message is not routed, and
    # the rest of the broker goes on. (Mosquitto 2.0.11 forwarded them.)
    sub = Client(broker.port, "p12-bad-sub", version=5)
    sub.subscribe([("bad/props", 1)])
    c = Client(broker.port, "p12-bad-pub", version=5)
    c.send(Publish("bad/props", b"x", 1, False, False, 1, props))
    d = c.expect(DISCONNECT)
    assert d.reason == 0x82, what
    assert c.closed()
    assert sub.messages(timeout=0.5) == [], what
    # The same message without that property is taken and delivered.
    ok = Client(broker.port, "p12-ok-pub", version=5)
    ok.publish("bad/props", b"y", qos=1, props={RESPONSE_TOPIC: "reply/plain"})
    m = sub.get()
    assert m.payload == b"y" and m.props[RESPONSE_TOPIC] == "reply/plain"
    sub.close()
    ok.close()


def test_topic_alias_over_maximum_gets_disconnect_0x94(broker):
    c = Client(broker.port, "p12-ta-max", version=5)
    assert c.connack.props[TOPIC_ALIAS_MAX] == 4
    c.send(Publish("ta/over", b"x", 0, False, False, 0, {TOPIC_ALIAS: 5}))
    d = c.expect(DISCONNECT)
    assert d.reason == 0x94
    assert c.closed()


def test_topic_alias_does_not_outlive_the_connection(broker):
    c = Client(broker.port, "p12-ta-conn", version=5)
    c.publish("ta/conn", b"x", qos=1, props={TOPIC_ALIAS: 1})
    c.close()
    c = Client(broker.port, "p12-ta-conn", version=5)
    c.send(Publish("", b"x", 0, False, False, 0, {TOPIC_ALIAS: 1}))
    assert c.expect(DISCONNECT).reason == 0x82


# ---------------------------------------------------------------- topic alias out


@pytest.mark.parametrize("qos", [0, 1])
def test_broker_uses_topic_alias_towards_client_with_topic_alias_maximum(broker, pub, qos):
    # QoS 0 too, which otherwise goes to receivers as it came (Paho's
    # interoperability suite, test_server_topic_alias, publishes QoS 0).
    s = Client(broker.port, "p12-tao%d" % qos, version=5, props={TOPIC_ALIAS_MAX: 2})
    s.subscribe([("tao%d/#" % qos, 1)])
    pub.publish("tao%d/a" % qos, b"1", qos=qos)
    pub.publish("tao%d/a" % qos, b"2", qos=qos)
    got = s.messages(2)
    a = got[0].props[TOPIC_ALIAS]
    assert 1 <= a <= 2
    assert got[0].topic == "tao%d/a" % qos
    assert got[1].topic == "" and got[1].props[TOPIC_ALIAS] == a
    assert got[1].payload == b"2"
    s.close()


def test_broker_never_exceeds_client_topic_alias_maximum(broker, pub):
    s = Client(broker.port, "p12-tao1", version=5, props={TOPIC_ALIAS_MAX: 1})
    s.subscribe([("tao1/#", 0)])
    for t in ("tao1/a", "tao1/b", "tao1/c", "tao1/b", "tao1/a"):
        pub.publish(t, t.encode(), qos=1)
    got = s.messages(5)
    seen = {}
    for m in got:
        a = (m.props or {}).get(TOPIC_ALIAS)
        assert a in (None, 1)
        if m.topic:
            if a:
                seen[a] = m.topic
            assert m.payload == m.topic.encode()
        else:
            assert a and seen[a].encode() == m.payload
    s.close()


def test_no_topic_alias_towards_client_without_topic_alias_maximum(broker, pub):
    s = Client(broker.port, "p12-tao0", version=5)
    s.subscribe([("tao0/a", 0)])
    pub.publish("tao0/a", b"1", qos=1)
    pub.publish("tao0/a", b"2", qos=1)
    for m in s.messages(2):
        assert m.topic == "tao0/a" and TOPIC_ALIAS not in (m.props or {})
    s.close()


def test_topic_aliases_towards_client_restart_on_new_connection(broker, pub):
    s = Client(broker.port, "p12-tao-re", version=5, props={TOPIC_ALIAS_MAX: 2})
    s.subscribe([("taore/a", 0)])
    pub.publish("taore/a", b"1", qos=1)
    assert s.get().topic == "taore/a"
    s.close()
    s = Client(broker.port, "p12-tao-re", version=5, props={TOPIC_ALIAS_MAX: 2})
    s.subscribe([("taore/a", 0)])
    pub.publish("taore/a", b"2", qos=1)
    m = s.get()
    assert m.topic == "taore/a", "alias from the old connection reused: %r" % m
    s.close()


# ---------------------------------------------------------------- receive maximum


def test_more_qos2_than_receive_maximum_without_pubrel_gets_disconnect_0x93(broker):
    # 5.0 3.3.4: more unacknowledged QoS 2 PUBLISHes than the Receive
    # Maximum we sent (3) is a Protocol Error with 0x93.
    c = Client(broker.port, "p12-rm-in", version=5)
    assert c.connack.props[RECEIVE_MAX] == 3
    for pid in (1, 2, 3):
        c.send(Publish("rm/in", b"x", 2, False, False, pid))
        assert c.expect(PUBREC).pid == pid
    c.send(Publish("rm/in", b"x", 2, False, False, 4))
    d = c.expect(DISCONNECT)
    assert d.reason == 0x93
    assert c.closed()


def test_client_that_answers_each_pubrec_still_reads_the_disconnect_0x93(broker):
    # Paho's interop test_flow_control2: the client sends more QoS 2
    # PUBLISHes than the Receive Maximum at once, then answers each PUBREC
    # with a PUBREL as it reads them, and must still read our DISCONNECT.
    # The broker reads and drops that input before closing: a socket closed
    # with input unread resets the connection, and the client's PUBREL
    # then fails (EPIPE) before it reaches the DISCONNECT.
    c = Client(broker.port, "p12-rm-pubrel", version=5)
    c.send_raw(b"".join(enc(Publish("rm/rel", b"x", 2, False, False, pid), 5) for pid in (1, 2, 3, 4)))
    got = []
    while True:
        p = c.recv(timeout=5)
        got.append(p.type)
        if p.type == DISCONNECT:
            break
        time.sleep(0.1)  # the broker has closed (before: its reset comes back)
        c.send(Ack(PUBREL, p.pid))
    assert got == [PUBREC, PUBREC, PUBREC, DISCONNECT] and p.reason == 0x93
    assert c.closed()


def test_qos2_within_receive_maximum_after_pubrel_is_accepted(broker):
    c = Client(broker.port, "p12-rm-in-ok", version=5)
    for i in range(8):
        r = c.publish("rm/ok", b"x", qos=2)
        assert r.type == PUBCOMP and r.reason == 0
    c.close()


def test_outgoing_in_flight_window_respects_client_receive_maximum(broker, pub):
    s = Client(broker.port, "p12-rm-out", version=5, props={RECEIVE_MAX: 1})
    s.subscribe([("rm/out", 1)])
    for i in range(3):
        pub.publish("rm/out", b"%d" % i, qos=1)
    m = s.expect(PUBLISH)
    assert m.payload == b"0"
    assert s.poll(0.4) is None, "second message sent before the first was acknowledged"
    s.send(Ack(PUBACK, m.pid))
    m = s.expect(PUBLISH)
    assert m.payload == b"1"
    assert s.poll(0.3) is None
    s.send(Ack(PUBACK, m.pid))
    assert s.expect(PUBLISH).payload == b"2"
    s.close()


def test_qos2_counts_against_receive_maximum_until_pubcomp(broker, pub):
    s = Client(broker.port, "p12-rm-out2", version=5, props={RECEIVE_MAX: 1})
    s.subscribe([("rm/out2", 2)])
    pub.publish("rm/out2", b"a", qos=2)
    pub.publish("rm/out2", b"b", qos=2)
    m = s.expect(PUBLISH)
    assert m.payload == b"a"
    s.send(Ack(PUBREC, m.pid))
    assert s.expect(PUBREL).pid == m.pid
    assert s.poll(0.4) is None, "next message sent before PUBCOMP"
    s.send(Ack(PUBCOMP, m.pid))
    assert s.expect(PUBLISH).payload == b"b"
    s.close()


def test_qos0_is_not_limited_by_client_receive_maximum(broker, pub):
    s = Client(broker.port, "p12-rm-q0", version=5, props={RECEIVE_MAX: 1})
    s.subscribe([("rm/q0", 1)])
    pub.publish("rm/q0", b"held", qos=1)
    for i in range(3):
        pub.publish("rm/q0", b"%d" % i, qos=0)
    got = s.messages(timeout=0.4, ack=False)
    assert [m.payload for m in got][:1] == [b"held"]
    assert sorted(m.payload for m in got[1:]) == [b"0", b"1", b"2"]
    s.close()


# ---------------------------------------------------------------- maximum packet size


def test_message_over_client_maximum_packet_size_is_not_sent_but_later_ones_are(broker, pub):
    s = Client(broker.port, "p12-mps", version=5, props={MAX_PACKET: 100})
    s.subscribe([("mps/t", 1)])
    pub.publish("mps/t", b"B" * 200, qos=1)
    pub.publish("mps/t", b"small", qos=1)
    got = s.messages(timeout=0.5)
    assert [m.payload for m in got] == [b"small"]
    s.close()


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_a_suback_or_unsuback_past_the_client_maximum_packet_size_is_not_sent(broker, kind):
    # MQTT-3.1.2-24. 30 filters make a 35-byte SUBACK or UNSUBACK: it went
    # to a client that takes 20 at most (outside conformance probe). There
    # is no shorter answer: DISCONNECT 0x95, Packet too large.
    # A retained value on one of the filters must not go either: its
    # SUBSCRIBE was never answered, not on this connection nor the next.
    keep = Client(broker.port, "p12-mps-ack-pub", version=5)
    assert keep.publish("mps/ack/07", b"r", qos=1, retain=True).reason == 0
    cid = "p12-mps-ack-" + kind
    props = {MAX_PACKET: 20, SESSION_EXPIRY: 60}
    s = Client(broker.port, cid, version=5, clean=False, props=props)
    filters = ["mps/ack/%02d" % i for i in range(30)]
    if kind == "subscribe":
        s.send(Subscribe(1, [(f, 0) for f in filters]))
    else:
        s.send(Unsubscribe(1, filters))
    d = s.recv(5)
    assert d.type == DISCONNECT and d.reason == 0x95, d
    assert s.closed()
    s = Client(broker.port, cid, version=5, clean=False, props=props)
    assert s.messages(timeout=0.5) == []
    # Few enough filters: answered as usual.
    assert s.subscribe([(f, 0) for f in filters[:10]]) == [0] * 10
    assert [m.payload for m in s.messages(1, timeout=3)] == [b"r"]
    s.disconnect(props={SESSION_EXPIRY: 0})
    assert keep.publish("mps/ack/07", b"", qos=1, retain=True).reason in (0, 0x10)
    keep.close()


def test_message_exactly_at_client_maximum_packet_size_is_sent(broker, pub):
    # PUBLISH QoS 0: 1 + 1 + (2 + 5) + 1 + payload = 100 with 90 bytes.
    s = Client(broker.port, "p12-mps-edge", version=5, props={MAX_PACKET: 100})
    s.subscribe([("mps/e", 0)])
    pub.publish("mps/e", b"E" * 90, qos=1)
    pub.publish("mps/e", b"F" * 91, qos=1)
    got = s.messages(timeout=0.5)
    assert [len(m.payload) for m in got] == [90]
    s.close()


@pytest.mark.parametrize("qos", [0, 1])
def test_a_message_that_fits_without_a_new_topic_alias_goes_without_one_rather_than_not_at_all(broker, pub, qos):
    # A topic alias is the sender's choice (3.3.2.3.4): the 3 bytes of a new
    # one must not take a message that fits over the client's Maximum
    # Packet Size. QoS 1: 1 + 1 + (2 + 6) + 2 + 1 + 90 = 103 bytes as it
    # came; QoS 0 has no packet identifier. The next topic gets the alias.
    size = 103 - (0 if qos else 2)
    pub.publish("mpa%d/r" % qos, b"R" * 90, qos=1, retain=True)
    s = Client(broker.port, "p12-mps-alias%d" % qos, version=5, props={MAX_PACKET: size, TOPIC_ALIAS_MAX: 2})
    # A retained message sent for a new subscription.
    s.subscribe([("mpa%d/r" % qos, qos)])
    m = s.get()
    assert (m.topic, m.payload, m.retain) == ("mpa%d/r" % qos, b"R" * 90, True)
    assert TOPIC_ALIAS not in (m.props or {})
    # Messages routed to it.
    s.subscribe([("mpa%d/a" % qos, qos), ("mpa%d/b" % qos, qos)])
    pub.publish("mpa%d/a" % qos, b"A" * 90, qos=1)
    pub.publish("mpa%d/b" % qos, b"small", qos=1)
    got = s.messages(2)
    assert [(m.topic, m.payload) for m in got] == [("mpa%d/a" % qos, b"A" * 90), ("mpa%d/b" % qos, b"small")]
    assert TOPIC_ALIAS not in (got[0].props or {})
    assert got[1].props[TOPIC_ALIAS] == 1
    pub.publish("mpa%d/r" % qos, b"", qos=1, retain=True)
    s.close()


def test_a_message_in_flight_over_the_resumed_connections_maximum_packet_size_is_not_sent_again(broker, pub):
    # MQTT-3.1.2-25: the Maximum Packet Size is the one of this connection;
    # the unacknowledged message's flow ends unsent, and the next arrives.
    s = Client(broker.port, "p12-mps-resume", version=5, clean=False, props={SESSION_EXPIRY: 60})
    s.subscribe([("mps/r", 1)])
    pub.publish("mps/r", b"B" * 200, qos=1)
    assert s.expect(PUBLISH).payload == b"B" * 200  # and not acknowledged
    s.close()
    s = Client(broker.port, "p12-mps-resume", version=5, clean=False,
               props={SESSION_EXPIRY: 60, MAX_PACKET: 100})
    assert s.connack.session_present
    pub.publish("mps/r", b"small", qos=1)
    assert [m.payload for m in s.messages(timeout=0.5)] == [b"small"]
    s.close()
    s = Client(broker.port, "p12-mps-resume", version=5, clean=False, props={SESSION_EXPIRY: 60})
    assert s.messages(timeout=0.4) == [], "the dropped message came back"
    s.close()


# ---------------------------------------------------------------- forwarded properties


APP_PROPS = {
    PFI: 1,
    CONTENT_TYPE: "application/json",
    RESPONSE_TOPIC: "reply/here",
    CORRELATION: b"\x00\x01\xffcorr",
    USER: [("b", "2"), ("a", "1"), ("b", "3"), ("", "")],
}


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("with_subid", [False, True])
def test_application_properties_are_forwarded_unchanged(broker, pub, qos, with_subid):
    s = Client(broker.port, "p12-fwd", version=5)
    s.subscribe([("fwd/t", qos)], props={SUBID: 5} if with_subid else None)
    pub.publish("fwd/t", b'{"a":1}', qos=qos, props=APP_PROPS)
    m = s.get()
    p = dict(m.props)
    if with_subid:
        assert p.pop(SUBID) == [5]
    assert p == APP_PROPS
    assert p[USER] == APP_PROPS[USER]  # order kept
    s.close()


def test_v5_properties_are_stripped_for_v311_subscriber(broker, pub):
    s = Client(broker.port, "p12-fwd4", version=4)
    s.subscribe([("fwd4/t", 1)])
    pub.publish("fwd4/t", b"p", qos=0, props=APP_PROPS)
    assert s.recv_raw() == b"\x30\x09\x00\x06fwd4/tp"
    s.close()


# ---------------------------------------------------------------- reason codes


def test_payload_format_utf8_with_invalid_payload_gets_puback_0x99_and_is_not_delivered(broker, pub):
    s = Client(broker.port, "p12-pfi", version=5)
    s.subscribe([("pfi/t", 1)])
    a = pub.publish("pfi/t", b"\xff\xfe bad", qos=1, props={PFI: 1})
    assert a.reason == 0x99
    assert s.poll(0.4) is None
    # Valid UTF-8 with the same indicator passes.
    a = pub.publish("pfi/t", "gr\u00fc\u00df".encode(), qos=1, props={PFI: 1})
    assert a.reason == 0
    assert s.get().payload == "gr\u00fc\u00df".encode()
    s.close()


def test_payload_format_utf8_with_invalid_payload_qos2_gets_pubrec_0x99(broker, pub):
    r = pub.publish("pfi/t2", b"\xc3\x28", qos=2, props={PFI: 1})
    assert r.type == PUBREC and r.reason == 0x99


def test_payload_format_utf8_with_invalid_payload_at_qos0_gets_disconnect_0x99_and_is_not_delivered(broker):
    # QoS 0 has no acknowledgement to refuse it in: the spec's other answer
    # is DISCONNECT 0x99 (5.0 3.3.2.3.2), never a silent drop.
    s = Client(broker.port, "p12-pfi0", version=5)
    s.subscribe([("pfi/t0", 0)])
    p = Client(broker.port, "p12-pfi0-pub", version=5)
    p.send(Publish("pfi/t0", b"\xff\xfe bad", 0, False, False, None, {PFI: 1}))
    d = p.expect(DISCONNECT)
    assert d.reason == 0x99
    assert p.closed()
    assert s.poll(0.4) is None
    p = Client(broker.port, "p12-pfi0-pub", version=5)
    p.publish("pfi/t0", "gr\u00fc\u00df".encode(), qos=0, props={PFI: 1})
    assert s.get().payload == "gr\u00fc\u00df".encode()
    p.close()
    s.close()


def test_puback_0x10_when_no_matching_subscribers(broker):
    c = Client(broker.port, "p12-nosub", version=5)
    c.send_raw(b"\x32\x0c\x00\x07nosub/t\x00\x05\x00x")
    assert c.recv_raw() == b"\x40\x03\x00\x05\x10"
    c.close()


def test_pubrec_0x10_when_no_matching_subscribers(broker):
    c = Client(broker.port, "p12-nosub2", version=5)
    r = c.publish("nosub/t2", b"x", qos=2, complete=False)
    assert r.reason == 0x10
    c.send(Ack(PUBREL, r.pid))
    assert c.expect(PUBCOMP).pid == r.pid
    c.close()


def test_v311_puback_has_no_reason_code_when_no_subscribers(broker):
    c = Client(broker.port, "p12-nosub4", version=4)
    c.send_raw(b"\x32\x0b\x00\x07nosub/t\x00\x05x")
    assert c.recv_raw() == b"\x40\x02\x00\x05"
    c.close()


def test_disconnect_from_server_respects_client_maximum_packet_size(broker):
    # 5.0 MQTT-3.1.2-24/25: the server must not send a packet bigger than
    # the client's Maximum Packet Size; a Reason String that does not fit
    # is left out. Here a second CONNECT provokes DISCONNECT 0x82.
    c = Client(broker.port, "p12-mps-dis", version=5, props={MAX_PACKET: 16})
    c.send_raw(b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc")
    raw = c.recv_raw()
    assert raw is not None, "closed without DISCONNECT"
    assert len(raw) <= 16, "DISCONNECT of %d bytes to a client that allows 16: %r" % (len(raw), raw)
    assert raw[0] == 0xE0 and raw[2] == 0x82
    assert c.closed()


def test_message_resent_on_resume_carries_its_topic_not_an_old_alias(broker, pub):
    s = Client(broker.port, "p12-ta-resume", version=5, clean=False,
               props={SESSION_EXPIRY: 60, TOPIC_ALIAS_MAX: 2})
    s.subscribe([("tares/t", 1)])
    pub.publish("tares/t", b"1", qos=1)
    pub.publish("tares/t", b"2", qos=1)
    got = s.messages(2, ack=False)
    assert got[1].topic == ""  # aliased on the first connection
    s.close()
    s = Client(broker.port, "p12-ta-resume", version=5, clean=False,
               props={SESSION_EXPIRY: 60, TOPIC_ALIAS_MAX: 2})
    again = s.messages(2)
    assert [(m.topic, m.payload, m.dup) for m in again] == [("tares/t", b"1", True), ("tares/t", b"2", True)]
    s.disconnect(props={SESSION_EXPIRY: 0})


def test_pubrec_with_error_reason_ends_qos2_flow(broker, pub):
    # 5.0 4.3.3: a PUBREC with a reason code >= 0x80 ends the exchange: no
    # PUBREL, and the in-flight slot is free again (client RM = 1).
    s = Client(broker.port, "p12-rec80", version=5, props={RECEIVE_MAX: 1})
    s.subscribe([("rec80/t", 2)])
    pub.publish("rec80/t", b"a", qos=2)
    pub.publish("rec80/t", b"b", qos=2)
    m = s.expect(PUBLISH)
    assert m.payload == b"a"
    s.send(Ack(PUBREC, m.pid, 0x80))
    n = s.expect(PUBLISH)
    assert n.payload == b"b", n
    s.ack(n)
    assert s.poll(0.3) is None
    s.close()
