"""PUBLISH QoS 0/1/2 in and out: packet identifiers, acknowledgement flows,
delivery QoS, duplicate suppression and redelivery on session resumption
(MQTT 3.1.1 3.3-3.7, 4.3, 4.4, 4.6; MQTT 5.0 the same sections)."""
import pytest

from brokerfixtures import broker, still_alive  # noqa: F401
from mqttc import (BrokerProc, Client, Publish, Ack, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP,
                   DISCONNECT, SESSION_EXPIRY, decode)

CONFIG = {"max_inflight_messages": 10}




@pytest.fixture
def pub(broker):
    c = Client(broker.port, "q03-pub", version=5)
    yield c
    c.close()


# ---------------------------------------------------------------- inbound flows


def test_v311_qos0_is_forwarded_byte_exact_without_packet_identifier(broker, pub):
    s = Client(broker.port, "q03-q0", version=4)
    s.subscribe([("q0/t", 2)])
    pub.publish("q0/t", b"hi", qos=0)
    assert s.recv_raw() == b"\x30\x08\x00\x04q0/thi"
    s.close()


def test_v311_qos1_publish_gets_puback_with_same_packet_identifier(broker):
    c = Client(broker.port, "q03-q1in", version=4)
    c.send_raw(b"\x32\x09\x00\x04q1/t\x12\x34x")
    assert c.recv_raw() == b"\x40\x02\x12\x34"
    c.close()


def test_v311_qos2_publish_gets_pubrec_then_pubcomp(broker):
    c = Client(broker.port, "q03-q2in", version=4)
    c.send_raw(b"\x34\x09\x00\x04q2/t\xab\xcdx")
    assert c.recv_raw() == b"\x50\x02\xab\xcd"
    c.send_raw(b"\x62\x02\xab\xcd")
    assert c.recv_raw() == b"\x70\x02\xab\xcd"
    c.close()


def test_v5_qos1_puback_with_subscriber_has_no_reason_code(broker):
    s = Client(broker.port, "q03-q1v5s", version=5)
    s.subscribe([("q1v5/t", 1)])
    c = Client(broker.port, "q03-q1v5", version=5)
    c.send_raw(b"\x32\x0b\x00\x06q1v5/t\x00\x07\x00x")
    assert c.recv_raw() == b"\x40\x02\x00\x07"
    s.close()
    c.close()


def _remaining(n):
    out = b""
    while True:
        n, d = n >> 7, n & 0x7F
        out += bytes((d | (0x80 if n else 0),))
        if not n:
            return out


@pytest.mark.parametrize("size", [1, 520, 4000])
@pytest.mark.parametrize("durable", [False, True], ids=["clean", "durable"])
@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [1, 2])
def test_a_client_subscribed_to_its_own_topic_gets_its_acknowledgement_before_the_copy(broker, version, qos, durable,
                                                                                      size):
    # As from Mosquitto: PUBACK/PUBREC first, then the message coming back.
    # Paho's test client disconnects as soon as its own message is back,
    # and fails when its PUBACK is still unread (client_test5
    # test_client_topic_alias, about one run in five before). A durable
    # session's acknowledgement waits for the store's commit (its copy is
    # in flight on flash); the copy waits behind it. A payload larger than
    # half the write buffer (520) goes out from the message itself, and a
    # packet larger than the read buffer (4000) is read apart: the copy
    # came first for both (outside probe).
    cid = "q03-self-%d%d%s%d" % (version, qos, "d" if durable else "", size)
    if not durable:
        c = Client(broker.port, cid, version=version)
    elif version == 5:
        c = Client(broker.port, cid, version=5, clean=False, props={SESSION_EXPIRY: 300})
    else:
        c = Client(broker.port, cid, version=4, clean=False)
    topic = cid.encode()
    c.subscribe([(topic.decode(), 1)])
    first = 0x30 | (qos << 1)
    for i in range(1, 6):
        pid = bytes((0x10, i))
        body = b"\x00" + bytes((len(topic),)) + topic + pid + (b"\x00" if version == 5 else b"") + b"x" * size
        c.send_raw(bytes((first,)) + _remaining(len(body)) + body)
        ack = c.recv_raw()
        assert ack == bytes((0x40 if qos == 1 else 0x50, 2)) + pid, "round %d: %r" % (i, ack[:40])
        back = decode(c.recv_raw(), version)
        assert back.type == PUBLISH and back.topic == cid and len(back.payload) == size, "round %d: %r" % (i, back)
        c.send_raw(b"\x40\x02" + bytes((back.pid >> 8, back.pid & 0xFF)))
        if qos == 2:
            c.send_raw(b"\x62\x02" + pid)
            assert c.recv_raw() == b"\x70\x02" + pid
    c.close()
    if durable:
        Client(broker.port, cid, version=version).close()  # a clean start drops the session


@pytest.mark.parametrize("sub_version", [4, 5])
@pytest.mark.parametrize("granted", [0, 1, 2])
@pytest.mark.parametrize("published", [0, 1, 2])
def test_delivery_qos_is_minimum_of_published_and_granted(broker, pub, sub_version, granted, published):
    t = "minq/%d/%d/%d" % (sub_version, granted, published)
    s = Client(broker.port, "q03-minq-%d%d%d" % (sub_version, granted, published), version=sub_version)
    assert s.subscribe([(t, granted)]) == [granted]
    pub.publish(t, b"m", qos=published)
    m = s.expect(PUBLISH)
    assert m.qos == min(granted, published)
    assert (m.pid != 0) == (m.qos > 0)
    s.ack(m)
    s.close()


def test_outgoing_qos1_messages_in_flight_have_distinct_nonzero_identifiers(broker, pub):
    s = Client(broker.port, "q03-pids", version=5)
    s.subscribe([("pids/t", 1)])
    for i in range(5):
        pub.publish("pids/t", b"%d" % i, qos=1)
    got = s.messages(5, ack=False)
    pids = [m.pid for m in got]
    assert len(set(pids)) == 5 and 0 not in pids
    assert [m.payload for m in got] == [b"%d" % i for i in range(5)]
    s.close()


def test_outgoing_qos2_flow_pubrec_gets_pubrel_with_same_identifier(broker, pub):
    s = Client(broker.port, "q03-out2", version=5)
    s.subscribe([("out2/t", 2)])
    pub.publish("out2/t", b"x", qos=2)
    m = s.expect(PUBLISH)
    assert m.qos == 2 and m.dup is False
    s.send(Ack(PUBREC, m.pid))
    rel = s.expect(PUBREL)
    assert rel.pid == m.pid
    s.send(Ack(PUBCOMP, m.pid))
    assert s.poll(0.3) is None
    s.ping()
    s.close()


def test_messages_from_one_publisher_are_delivered_in_order(broker, pub):
    s = Client(broker.port, "q03-order", version=5)
    s.subscribe([("order/t", 2)])
    for i in range(20):
        pub.publish("order/t", b"%d" % i, qos=(i % 3))
    got = s.messages(20, timeout=2)
    assert [m.payload for m in got] == [b"%d" % i for i in range(20)]
    s.close()


# ---------------------------------------------------------------- QoS 2 receiver


@pytest.mark.parametrize("version", [4, 5])
def test_qos2_resent_with_dup_before_pubrel_is_not_delivered_twice(broker, version):
    s = Client(broker.port, "q03-dup-s%d" % version, version=5)
    s.subscribe([("dup%d/t" % version, 2)])
    c = Client(broker.port, "q03-dup-p%d" % version, version=version)
    c.send(Publish("dup%d/t" % version, b"once", 2, False, False, 7))
    assert c.expect(PUBREC).pid == 7
    c.send(Publish("dup%d/t" % version, b"once", 2, False, True, 7))
    assert c.expect(PUBREC).pid == 7
    c.send(Ack(PUBREL, 7))
    assert c.expect(PUBCOMP).pid == 7
    got = s.messages(timeout=0.5)
    assert [m.payload for m in got] == [b"once"]
    # After PUBCOMP the identifier is free: the same pid is a new message.
    c.send(Publish("dup%d/t" % version, b"again", 2, False, False, 7))
    assert c.expect(PUBREC).pid == 7
    c.send(Ack(PUBREL, 7))
    assert c.expect(PUBCOMP).pid == 7
    assert [m.payload for m in s.messages(timeout=0.5)] == [b"again"]
    s.close()
    c.close()


def test_v5_qos2_resent_before_pubrel_gets_the_reason_code_of_its_first_pubrec(broker):
    # 0x10 (no matching subscribers) the first time: the resend is the same
    # message, answered the same, not as if someone had taken it.
    c = Client(broker.port, "q03-dup10", version=5)
    for dup, want in ((False, 0x10), (True, 0x10)):
        c.send(Publish("dup10/nobody", b"x", 2, False, dup, 8))
        r = c.expect(PUBREC)
        assert (r.pid, r.reason) == (8, want), r
    c.send(Ack(PUBREL, 8))
    assert c.expect(PUBCOMP).reason == 0
    c.close()


def test_v5_pubrel_for_unknown_identifier_gets_pubcomp_0x92(broker):
    c = Client(broker.port, "q03-rel92", version=5)
    c.send_raw(b"\x62\x02\x00\x63")
    assert c.recv_raw() == b"\x70\x03\x00\x63\x92"
    c.ping()
    c.close()


def test_v311_pubrel_for_unknown_identifier_gets_pubcomp(broker):
    # 3.1.1 MQTT-4.3.3-2 / 3.6.4: PUBREL is answered with PUBCOMP.
    c = Client(broker.port, "q03-rel4", version=4)
    c.send_raw(b"\x62\x02\x00\x63")
    assert c.recv_raw() == b"\x70\x02\x00\x63"
    c.close()


def test_v5_pubrec_for_unknown_identifier_gets_pubrel_0x92(broker):
    c = Client(broker.port, "q03-rec92", version=5)
    c.send_raw(b"\x50\x02\x00\x42")
    assert c.recv_raw() == b"\x62\x03\x00\x42\x92"
    c.close()


def test_puback_for_unknown_identifier_is_ignored(broker):
    c = Client(broker.port, "q03-ackunk", version=5)
    c.send_raw(b"\x40\x02\x00\x42")
    assert c.poll(0.3) is None
    c.ping()
    c.close()


# ---------------------------------------------------------------- malformed PUBLISH


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("data", [
    pytest.param(b"\x38\x05\x00\x01a\x00x", id="qos0-with-dup"),
    pytest.param(b"\x36\x07\x00\x01a\x00\x01\x00x", id="qos3"),
    pytest.param(b"\x32\x07\x00\x01a\x00\x00\x00x", id="qos1-pid0"),
    pytest.param(b"\x30\x07\x00\x03a/+\x00x", id="wildcard-topic"),
    pytest.param(b"\x30\x07\x00\x03a/#\x00x", id="hash-topic"),
])
def test_malformed_publish_closes_connection(broker, version, data):
    c = Client(broker.port, "q03-bad%d" % version, version=version)
    if version == 4:
        data = data[:1] + bytes([data[1] - 1]) + data[2:-2] + data[-1:]  # no property length
    c.send_raw(data)
    if version == 5:
        d = c.expect(DISCONNECT)
        assert d.reason in (0x81, 0x82, 0x90)
    assert c.closed()


def test_v5_publish_to_wildcard_topic_gets_disconnect_0x90(broker):
    # 5.0 MQTT-3.3.2-2, 4.13: Topic Name invalid.
    c = Client(broker.port, "q03-bad90", version=5)
    c.send_raw(b"\x30\x06\x00\x03a/+\x00")
    assert c.expect(DISCONNECT).reason == 0x90
    assert c.closed()


def test_v311_publish_with_empty_topic_closes(broker):
    c = Client(broker.port, "q03-empty4", version=4)
    c.send_raw(b"\x30\x03\x00\x00x")
    assert c.closed()


# ---------------------------------------------------------------- redelivery


def _persist(version):
    if version == 5:
        return dict(version=5, clean=False, props={SESSION_EXPIRY: 300})
    return dict(version=4, clean=False)


@pytest.mark.parametrize("version", [4, 5])
def test_unacked_qos1_is_redelivered_with_dup_on_session_resume(broker, pub, version):
    cid = "q03-redel1-%d" % version
    s = Client(broker.port, cid, **_persist(version))
    s.subscribe([("redel1/%d" % version, 1)])
    pub.publish("redel1/%d" % version, b"r1", qos=1)
    m = s.expect(PUBLISH)
    assert m.qos == 1 and m.dup is False
    s.close()  # no PUBACK
    s = Client(broker.port, cid, **_persist(version))
    assert s.connack.session_present is True
    m2 = s.expect(PUBLISH)
    assert (m2.pid, m2.payload, m2.dup, m2.qos) == (m.pid, b"r1", True, 1)
    s.send(Ack(PUBACK, m2.pid))
    s.close()
    # Acknowledged: not sent a third time.
    s = Client(broker.port, cid, **_persist(version))
    assert s.poll(0.4) is None
    s.close()
    Client(broker.port, cid, version=version, clean=True).disconnect()


@pytest.mark.parametrize("version", [4, 5])
def test_unacked_qos2_is_redelivered_with_dup_on_session_resume(broker, pub, version):
    cid = "q03-redel2-%d" % version
    s = Client(broker.port, cid, **_persist(version))
    s.subscribe([("redel2/%d" % version, 2)])
    pub.publish("redel2/%d" % version, b"r2", qos=2)
    m = s.expect(PUBLISH)
    assert m.qos == 2 and m.dup is False
    s.close()  # no PUBREC
    s = Client(broker.port, cid, **_persist(version))
    assert s.connack.session_present is True
    m2 = s.expect(PUBLISH)
    assert (m2.pid, m2.payload, m2.dup, m2.qos) == (m.pid, b"r2", True, 2)
    s.send(Ack(PUBREC, m2.pid))
    assert s.expect(PUBREL).pid == m.pid
    s.send(Ack(PUBCOMP, m.pid))
    assert s.poll(0.3) is None
    s.close()
    Client(broker.port, cid, version=version, clean=True).disconnect()


@pytest.mark.parametrize("version", [4, 5])
def test_qos2_after_pubrec_session_resume_gets_pubrel_not_publish(broker, pub, version):
    cid = "q03-redel3-%d" % version
    s = Client(broker.port, cid, **_persist(version))
    s.subscribe([("redel3/%d" % version, 2)])
    pub.publish("redel3/%d" % version, b"r3", qos=2)
    m = s.expect(PUBLISH)
    s.send(Ack(PUBREC, m.pid))
    assert s.expect(PUBREL).pid == m.pid
    s.close()  # no PUBCOMP
    s = Client(broker.port, cid, **_persist(version))
    assert s.connack.session_present is True
    rel = s.expect(PUBREL)
    assert rel.pid == m.pid
    s.send(Ack(PUBCOMP, m.pid))
    assert s.poll(0.3) is None
    s.close()
    Client(broker.port, cid, version=version, clean=True).disconnect()


def test_v311_qos2_inbound_state_survives_reconnect(broker):
    # 3.1.1 4.3.3: the receiver keeps the packet identifier until PUBREL,
    # also across a reconnect of a persistent session: a resent PUBLISH
    # with DUP is not delivered again.
    s = Client(broker.port, "q03-in2-s", version=5)
    s.subscribe([("in2/t", 2)])
    c = Client(broker.port, "q03-in2-p", version=4, clean=False)
    c.send(Publish("in2/t", b"once", 2, False, False, 9))
    assert c.expect(PUBREC).pid == 9
    c.close()
    c = Client(broker.port, "q03-in2-p", version=4, clean=False)
    assert c.connack.session_present is True
    c.send(Publish("in2/t", b"once", 2, False, True, 9))
    assert c.expect(PUBREC).pid == 9
    c.send(Ack(PUBREL, 9))
    assert c.expect(PUBCOMP).pid == 9
    assert [m.payload for m in s.messages(timeout=0.5)] == [b"once"]
    c.close()
    s.close()
    Client(broker.port, "q03-in2-p", version=4, clean=True).disconnect()


def test_resumed_session_resends_in_flight_first_then_queued_in_order(broker, pub):
    # 3.1.1 MQTT-4.4.0-1, 4.6: unacknowledged PUBLISHes are resent in
    # their original order (with DUP), then the messages queued offline.
    cid = "q03-order-resume"
    s = Client(broker.port, cid, version=4, clean=False)
    s.subscribe([("ordres/t", 1)])
    for i in range(3):
        pub.publish("ordres/t", b"f%d" % i, qos=1)
    first = s.messages(3, ack=False)
    s.disconnect()  # returns once the broker has closed: the session is offline
    for i in range(2):
        pub.publish("ordres/t", b"q%d" % i, qos=1)
    s = Client(broker.port, cid, version=4, clean=False)
    got = s.messages(5, timeout=2)
    assert [(m.payload, m.dup) for m in got] == [(b"f0", True), (b"f1", True), (b"f2", True),
                                                 (b"q0", False), (b"q1", False)]
    assert [m.pid for m in got[:3]] == [m.pid for m in first]
    s.close()
    Client(broker.port, cid, version=4, clean=True).disconnect()


def test_v311_outgoing_in_flight_window_is_max_inflight_messages(broker, pub):
    # 3.1.1 has no Receive Maximum: the broker's own window (10) applies.
    s = Client(broker.port, "q03-window", version=4)
    s.subscribe([("window/t", 1)])
    for i in range(12):
        pub.publish("window/t", b"%d" % i, qos=1)
    got = s.messages(timeout=0.5, ack=False)
    assert [m.payload for m in got] == [b"%d" % i for i in range(10)]
    s.send(Ack(PUBACK, got[0].pid))
    m = s.expect(PUBLISH)
    assert m.payload == b"10"
    s.close()
