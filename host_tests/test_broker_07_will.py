"""Will messages (MQTT 3.1.1 3.1.2.5, 3.1.3.3; MQTT 5.0 3.1.2.5, 3.1.3.2,
3.14.2.1)."""
import time

import pytest

from brokerfixtures import broker, still_alive  # noqa: F401
from mqttc import (BrokerProc, Client, Connect, SESSION_EXPIRY, WILL_DELAY, CONTENT_TYPE, USER,
                   RESPONSE_TOPIC, CONNACK, TEST_USER, TEST_PASSWORD)

CONFIG = {}




def watcher(broker, topic, qos=1):
    w = Client(broker.port, "w07-watch-" + topic.replace("/", "-"), version=5)
    w.subscribe([(topic, qos | 0x20)])  # Retain Handling 2: live messages only
    return w


def willer(broker, cid, topic, version=5, props=None, will_props=None, **kw):
    return Client(broker.port, cid, version=version, props=props, will_topic=topic,
                  will_payload=b"bye " + cid.encode(), will_props=will_props, **kw)


@pytest.mark.parametrize("version", [4, 5])
def test_will_is_published_when_socket_closes_without_disconnect(broker, version):
    t = "will/close%d" % version
    w = watcher(broker, t)
    c = willer(broker, "w07-close%d" % version, t, version=version)
    c.close()
    m = w.get(timeout=3)
    assert (m.topic, m.payload) == (t, b"bye w07-close%d" % version)
    w.close()


def test_will_is_published_on_keepalive_expiry(broker):
    t = "will/ka"
    w = watcher(broker, t)
    c = willer(broker, "w07-ka", t, version=4, keepalive=1)
    t0 = time.time()
    m = w.get(timeout=4)
    assert m.payload == b"bye w07-ka"
    assert time.time() - t0 >= 1.3
    c.close()
    w.close()


@pytest.mark.parametrize("version", [4, 5])
def test_will_is_published_on_protocol_error(broker, version):
    t = "will/proto%d" % version
    w = watcher(broker, t)
    c = willer(broker, "w07-proto%d" % version, t, version=version)
    c.send(Connect("again", version=version))  # second CONNECT
    m = w.get(timeout=3)
    assert m.payload == b"bye w07-proto%d" % version
    c.close()
    w.close()


@pytest.mark.parametrize("version", [4, 5])
def test_will_is_published_on_malformed_packet(broker, version):
    t = "will/malformed%d" % version
    w = watcher(broker, t)
    c = willer(broker, "w07-malf%d" % version, t, version=version)
    c.send_raw(b"\x00\x00")  # reserved packet type
    m = w.get(timeout=3)
    assert m.payload == b"bye w07-malf%d" % version
    c.close()
    w.close()


@pytest.mark.parametrize("version", [4, 5])
def test_will_is_not_published_after_normal_disconnect(broker, version):
    t = "will/normal%d" % version
    w = watcher(broker, t)
    c = willer(broker, "w07-normal%d" % version, t, version=version)
    assert c.disconnect()
    assert w.poll(0.6) is None
    w.close()


def test_will_is_published_after_disconnect_with_will_message_0x04(broker):
    t = "will/dis04"
    w = watcher(broker, t)
    c = willer(broker, "w07-dis04", t, version=5)
    c.disconnect(reason=0x04)
    m = w.get(timeout=3)
    assert m.payload == b"bye w07-dis04"
    w.close()


@pytest.mark.parametrize("reason", [0x80, 0x83, 0x95])
def test_will_is_published_after_a_disconnect_with_an_error_reason_code(broker, reason):
    # Only 0x00 discards the will (MQTT-3.1.2-10): it was kept for every
    # code but 0x04, as Mosquitto 2.0.11 does (outside probe).
    t = "will/err%x" % reason
    w = watcher(broker, t)
    c = willer(broker, "w07-err%x" % reason, t, version=5)
    c.disconnect(reason=reason)
    m = w.get(timeout=3)
    assert m.payload == b"bye w07-err%x" % reason
    w.close()


def test_will_qos_and_retain_are_honoured(broker):
    t = "will/qosret"
    w = watcher(broker, t, qos=2)
    c = willer(broker, "w07-qr", t, version=5, will_qos=2, will_retain=True)
    c.close()
    m = w.get(timeout=3)
    assert m.qos == 2 and m.retain is False
    # Stored as retained: a later subscriber gets it with the retain flag.
    r = Client(broker.port, "w07-qr-reader", version=5)
    r.subscribe([(t, 1)])
    m = r.get()
    assert (m.payload, m.retain, m.qos) == (b"bye w07-qr", True, 1)
    r.publish(t, b"", qos=1, retain=True)
    r.close()
    w.close()


def test_will_properties_are_forwarded(broker):
    t = "will/props"
    w = watcher(broker, t)
    wp = {CONTENT_TYPE: "text/plain", RESPONSE_TOPIC: "will/resp", USER: [("z", "1"), ("a", "2")]}
    c = willer(broker, "w07-props", t, version=5, will_props=wp)
    c.close()
    m = w.get(timeout=3)
    assert m.props[CONTENT_TYPE] == "text/plain"
    assert m.props[RESPONSE_TOPIC] == "will/resp"
    assert m.props[USER] == [("z", "1"), ("a", "2")]
    w.close()


def test_v5_will_is_published_on_session_takeover(broker):
    # 5.0 3.1.4 / 3.1.3.2.2: the old connection is closed by the server
    # (not by DISCONNECT) and its Will Delay Interval is 0.
    t = "will/takeover"
    w = watcher(broker, t)
    c = willer(broker, "w07-take", t, version=5)
    c2 = Client(broker.port, "w07-take", version=5)
    m = w.get(timeout=3)
    assert m.payload == b"bye w07-take"
    c2.disconnect()
    c.close()
    w.close()


# ---------------------------------------------------------------- Will Delay Interval


def test_will_delay_interval_delays_the_will(broker):
    t = "will/delay"
    w = watcher(broker, t)
    c = willer(broker, "w07-delay", t, version=5, clean=True, props={SESSION_EXPIRY: 60},
               will_props={WILL_DELAY: 2})
    c.close()
    t0 = time.time()
    assert w.poll(1.2) is None, "will sent before its delay"
    raw = w.raw_publish(timeout=3)  # properties are checked elsewhere
    assert raw.endswith(b"bye w07-delay")
    assert time.time() - t0 >= 1.8
    Client(broker.port, "w07-delay", version=5).disconnect()
    w.close()


def test_will_delay_is_cancelled_when_client_reconnects_in_time(broker):
    t = "will/cancel"
    w = watcher(broker, t)
    c = willer(broker, "w07-cancel", t, version=5, clean=False, props={SESSION_EXPIRY: 60},
               will_props={WILL_DELAY: 2})
    c.close()
    time.sleep(0.5)
    c = Client(broker.port, "w07-cancel", version=5, clean=False, props={SESSION_EXPIRY: 60})
    assert c.connack.session_present is True
    assert w.poll(2.8) is None, "will sent although the client came back"
    c.disconnect(props={SESSION_EXPIRY: 0})
    w.close()


@pytest.mark.parametrize("live", [False, True])
def test_will_delay_is_cancelled_by_a_new_connection_with_clean_start_too(broker, live):
    # MQTT-3.1.2-8: a new connection for the client id before the Will
    # Delay Interval has passed means no will, whatever Clean Start says
    # (Mosquitto 2.0.11 sends none). Ending the old session sent it: a
    # sensor restarting with a clean session raised a false "offline".
    # live: the old connection is still open and is taken over.
    t = "will/cleancancel%d" % live
    w = watcher(broker, t)
    cid = "w07-cleancancel%d" % live
    c = willer(broker, cid, t, version=5, clean=False, props={SESSION_EXPIRY: 60},
               will_props={WILL_DELAY: 2})
    if not live:
        c.close()
        time.sleep(0.5)
    c2 = Client(broker.port, cid, version=5, clean=True, props={SESSION_EXPIRY: 60})
    assert c2.connack.session_present is False
    assert w.poll(3) is None, "will sent although the client came back"
    c2.disconnect(props={SESSION_EXPIRY: 0})
    c.close()
    w.close()


def test_delayed_will_is_sent_when_session_ends_first(broker):
    # 5.0 3.1.3.2.2: sent when the delay passes or the session ends,
    # whichever is first.
    t = "will/sessend"
    w = watcher(broker, t)
    c = willer(broker, "w07-sessend", t, version=5, props={SESSION_EXPIRY: 1},
               will_props={WILL_DELAY: 30})
    c.close()
    raw = w.raw_publish(timeout=4)
    assert raw.endswith(b"bye w07-sessend")
    w.close()


def test_delayed_will_is_sent_at_once_when_session_expiry_is_zero(broker):
    t = "will/sess0"
    w = watcher(broker, t)
    c = willer(broker, "w07-sess0", t, version=5, props={SESSION_EXPIRY: 0},
               will_props={WILL_DELAY: 30})
    c.close()
    raw = w.raw_publish(timeout=2)
    assert raw.endswith(b"bye w07-sess0")
    w.close()


def test_will_delay_interval_is_not_forwarded_in_the_will_publish(broker):
    # 5.0 2.2.2.2: Will Delay Interval (0x18) belongs to the Will
    # Properties only; a PUBLISH carrying it is a Protocol Error for the
    # receiver. The other will properties are forwarded (3.1.3.2).
    t = "will/delayprop"
    w = watcher(broker, t)
    c = willer(broker, "w07-delayprop", t, version=5, props={SESSION_EXPIRY: 0},
               will_props={WILL_DELAY: 5, CONTENT_TYPE: "x/y"})
    c.close()
    m = w.get(timeout=2)
    assert m.payload == b"bye w07-delayprop"
    assert m.props == {CONTENT_TYPE: "x/y"}
    w.close()


def test_will_not_published_after_normal_disconnect_with_delay(broker):
    t = "will/delaynormal"
    w = watcher(broker, t)
    c = willer(broker, "w07-dn", t, version=5, props={SESSION_EXPIRY: 1},
               will_props={WILL_DELAY: 1})
    c.disconnect()
    assert w.poll(2.5) is None
    w.close()


@pytest.mark.parametrize("topic", ["w07/#", "w07/+/x", ""])
def test_a_will_topic_that_is_not_valid_is_refused_v5_0x90_and_v311_closed_without_connack(broker, topic):
    # 3.1.1 has no return code for it: the server closes without a CONNACK
    # (MQTT-3.2.2-6), as Mosquitto does; 5.0 says 0x90 (Topic Name invalid).
    for version in (5, 4):
        c = Client(broker.port, "w07-badwill%d" % version, version=version, connect=False)
        c.send(Connect("w07-badwill%d" % version, version, True, 60, TEST_USER, TEST_PASSWORD.encode(),
                       will_topic=topic, will_payload=b"x"))
        if version == 5:
            assert c.expect(CONNACK).reason == 0x90
            assert c.closed()
        else:
            assert c.recv_raw() is None, "3.1.1 got a packet instead of a close"
        c.close()


@pytest.mark.parametrize("rt", ["reply/+", "reply/#"])
def test_a_will_whose_response_topic_holds_a_wildcard_is_refused(broker, rt):
    # Its PUBLISH would carry the wildcard (MQTT-3.3.2-14), which a client's
    # own PUBLISH is closed for (0x82): the will was taken and went out so.
    watcher = Client(broker.port, "w07-rt-watch", version=5)
    watcher.subscribe([("w07/rt", 0)])
    c = Client(broker.port, "w07-rt", version=5, will_topic="w07/rt", will_payload=b"gone",
               will_props={RESPONSE_TOPIC: rt}, expect_ok=False)
    assert c.connack.reason == 0x82, c.connack
    assert c.closed()
    assert watcher.poll(1) is None  # no session, no will
    ok = Client(broker.port, "w07-rt", version=5, will_topic="w07/rt", will_payload=b"gone",
                will_props={RESPONSE_TOPIC: "reply/x"})
    ok.close()  # without DISCONNECT: the will goes, its Response Topic kept
    m = watcher.get()
    assert (m.payload, m.props[RESPONSE_TOPIC]) == (b"gone", "reply/x")
    watcher.close()
