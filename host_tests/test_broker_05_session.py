"""Session state across connections: clean session / clean start, session
present, session expiry (MQTT 3.1.1 3.1.2.4, 3.2.2.2, 4.1; MQTT 5.0
3.1.2.4, 3.1.2.11.2, 3.14.2.2.2, 4.1)."""
import time

import pytest

from brokerfixtures import broker, still_alive  # noqa: F401
from mqttc import BrokerProc, Client, DISCONNECT, SESSION_EXPIRY, wait_for

CONFIG = {}




@pytest.fixture
def pub(broker):
    c = Client(broker.port, "s05-pub", version=5)
    yield c
    c.close()


def v5(port, cid, expiry=None, clean=False, **kw):
    props = {SESSION_EXPIRY: expiry} if expiry is not None else None
    return Client(port, cid, version=5, clean=clean, props=props, **kw)


# ---------------------------------------------------------------- 3.1.1


def test_v311_clean_session_0_resumes_with_session_present_byte_exact(broker, pub):
    c = Client(broker.port, "s05-v311", version=4, clean=False)
    assert c.connack.session_present is False
    c.subscribe([("s05/v311", 1)])
    c.close()
    from mqttc import Raw, connect_bytes
    r = Raw(broker.port)
    r.send(connect_bytes("s05-v311", version=4, clean=False))
    assert r.recv_packet() == b"\x20\x02\x01\x00"
    r.close()
    time.sleep(0.1)
    # The subscription outlived the connection: queued while offline.
    pub.publish("s05/v311", b"offline", qos=1)
    c = Client(broker.port, "s05-v311", version=4, clean=False)
    assert c.get().payload == b"offline"
    c.close()
    Client(broker.port, "s05-v311", version=4, clean=True).disconnect()


def test_v311_clean_session_1_discards_previous_session(broker, pub):
    c = Client(broker.port, "s05-v311c", version=4, clean=False)
    c.subscribe([("s05/v311c", 1)])
    c.disconnect()
    c = Client(broker.port, "s05-v311c", version=4, clean=True)
    assert c.connack.session_present is False
    pub.publish("s05/v311c", b"x", qos=1)
    assert c.poll(0.3) is None
    c.disconnect()
    # ... and a clean session is not kept either.
    c = Client(broker.port, "s05-v311c", version=4, clean=False)
    assert c.connack.session_present is False
    c.close()
    Client(broker.port, "s05-v311c", version=4, clean=True).disconnect()


def test_v311_offline_qos0_is_not_queued_by_default(broker, pub):
    c = Client(broker.port, "s05-q0", version=4, clean=False)
    c.subscribe([("s05/q0", 1)])
    c.disconnect()
    pub.publish("s05/q0", b"zero", qos=0)
    pub.publish("s05/q0", b"one", qos=1)
    c = Client(broker.port, "s05-q0", version=4, clean=False)
    assert [m.payload for m in c.messages(timeout=0.4)] == [b"one"]
    c.close()
    Client(broker.port, "s05-q0", version=4, clean=True).disconnect()


# ---------------------------------------------------------------- 5.0 expiry


def test_v5_session_expiry_0_ends_session_at_disconnect(broker, pub):
    c = v5(broker.port, "s05-e0", expiry=0)
    c.subscribe([("s05/e0", 1)])
    c.disconnect()
    c = v5(broker.port, "s05-e0", expiry=0)
    assert c.connack.session_present is False
    pub.publish("s05/e0", b"x", qos=1)
    assert c.poll(0.3) is None
    c.close()


def test_v5_absent_session_expiry_means_zero(broker, pub):
    c = v5(broker.port, "s05-enone")
    c.subscribe([("s05/enone", 1)])
    c.close()  # even without DISCONNECT
    time.sleep(0.2)
    c = v5(broker.port, "s05-enone")
    assert c.connack.session_present is False
    c.close()


def test_v5_session_expiry_keeps_session_and_queues_qos1(broker, pub):
    c = v5(broker.port, "s05-e60", expiry=60)
    c.subscribe([("s05/e60", 1)])
    c.disconnect()
    for i in range(3):
        pub.publish("s05/e60", b"q%d" % i, qos=1)
    pub.publish("s05/e60", b"zero", qos=0)  # not queued (queue_qos0_messages false)
    c = v5(broker.port, "s05-e60", expiry=60)
    assert c.connack.session_present is True
    got = c.messages(n=3, timeout=5)
    assert [m.payload for m in got] == [b"q0", b"q1", b"q2"] and c.poll(0.3) is None
    assert [m.dup for m in got] == [False] * 3  # never sent before
    # The subscription still works live.
    pub.publish("s05/e60", b"live", qos=1)
    assert c.get().payload == b"live"
    c.disconnect(props={SESSION_EXPIRY: 0})


def test_v5_session_is_discarded_after_its_expiry_interval(broker, pub):
    c = v5(broker.port, "s05-e1", expiry=1)
    c.subscribe([("s05/e1", 1)])
    c.disconnect()
    # Expiry is counted by the once-a-second check: wait for it to say so
    # rather than for a fixed time a late check could overrun.
    assert wait_for(lambda: "session s05-e1 expired" in broker.log(), timeout=8), broker.log()[-1500:]
    c = v5(broker.port, "s05-e1", expiry=60)
    assert c.connack.session_present is False
    pub.publish("s05/e1", b"x", qos=1)
    assert c.poll(0.3) is None
    c.disconnect(props={SESSION_EXPIRY: 0})


def test_v5_clean_start_discards_existing_session(broker, pub):
    c = v5(broker.port, "s05-cs", expiry=60)
    c.subscribe([("s05/cs", 1)])
    c.disconnect()
    pub.publish("s05/cs", b"queued", qos=1)
    c = v5(broker.port, "s05-cs", expiry=60, clean=True)
    assert c.connack.session_present is False
    assert c.poll(0.3) is None
    c.disconnect(props={SESSION_EXPIRY: 0})


def test_v5_session_expiry_lowered_to_0_at_disconnect_ends_session(broker, pub):
    c = v5(broker.port, "s05-dis0", expiry=60)
    c.subscribe([("s05/dis0", 1)])
    c.disconnect(props={SESSION_EXPIRY: 0})
    c = v5(broker.port, "s05-dis0", expiry=60)
    assert c.connack.session_present is False
    c.disconnect(props={SESSION_EXPIRY: 0})


def test_v5_session_expiry_raised_at_disconnect_keeps_session(broker, pub):
    c = v5(broker.port, "s05-disup", expiry=1)
    c.subscribe([("s05/disup", 1)])
    c.disconnect(props={SESSION_EXPIRY: 60})
    time.sleep(2.2)  # longer than the CONNECT's 1 s
    pub.publish("s05/disup", b"kept", qos=1)
    c = v5(broker.port, "s05-disup", expiry=60)
    assert c.connack.session_present is True
    assert c.get().payload == b"kept"
    c.disconnect(props={SESSION_EXPIRY: 0})


def test_v5_disconnect_setting_expiry_after_zero_is_protocol_error(broker):
    # 5.0 MQTT-3.14.2-2 / 3.14.2.2.2: Protocol Error -> DISCONNECT 0x82.
    c = v5(broker.port, "s05-dis-err", expiry=0)
    c.subscribe([("s05/diserr", 1)])
    c.send_raw(b"\xe0\x07\x00\x05\x11\x00\x00\x00\x3c")
    d = c.expect(DISCONNECT)
    assert d.reason == 0x82
    assert c.closed()
    c = v5(broker.port, "s05-dis-err", expiry=60)
    assert c.connack.session_present is False
    c.disconnect(props={SESSION_EXPIRY: 0})


def test_v5_takeover_with_clean_start_0_keeps_subscriptions(broker, pub):
    a = v5(broker.port, "s05-take", expiry=60)
    a.subscribe([("s05/take", 1)])
    b = v5(broker.port, "s05-take", expiry=60)
    assert b.connack.session_present is True
    pub.publish("s05/take", b"x", qos=1)
    assert b.get().payload == b"x"
    b.disconnect(props={SESSION_EXPIRY: 0})
    a.close()


@pytest.mark.parametrize("old_version,new_version", [(4, 4), (5, 5), (5, 4), (4, 5)])
def test_a_clean_session_taken_over_ends_with_its_connection_and_is_not_resumed(broker, pub, old_version,
                                                                                  new_version):
    # The old session lasts only as long as its connection (3.1.1 clean 1,
    # MQTT-3.1.2-6; v5 expiry 0, 3.1.2.11): the take-over closes that
    # connection, so the newcomer asking to resume finds no session, as
    # Mosquitto answers. It resumed the old one with session present 1.
    a = Client(broker.port, "s05-cleantake", version=old_version, clean=True)
    a.subscribe([("s05/cleantake", 1)])
    if new_version == 5:
        b = v5(broker.port, "s05-cleantake", expiry=60)
    else:
        b = Client(broker.port, "s05-cleantake", version=4, clean=False)
    assert b.connack.session_present is False
    pub.publish("s05/cleantake", b"x", qos=1)
    assert b.messages(timeout=0.5) == []
    if new_version == 5:
        b.disconnect(props={SESSION_EXPIRY: 0})
    else:
        b.close()
        Client(broker.port, "s05-cleantake", version=4, clean=True).close()  # its session ends
    a.close()


def test_v5_queued_messages_keep_publish_order_across_qos(broker, pub):
    c = v5(broker.port, "s05-order", expiry=60)
    c.subscribe([("s05/order", 2)])
    c.disconnect()
    for i in range(8):
        pub.publish("s05/order", b"%d" % i, qos=1 + i % 2)
    c = v5(broker.port, "s05-order", expiry=60)
    got = c.messages(8, timeout=2)
    assert [m.payload for m in got] == [b"%d" % i for i in range(8)]
    assert [m.qos for m in got] == [1 + i % 2 for i in range(8)]
    c.disconnect(props={SESSION_EXPIRY: 0})


def test_v311_session_can_be_resumed_by_v5_client(broker, pub):
    c = Client(broker.port, "s05-mix", version=4, clean=False)
    c.subscribe([("s05/mix", 1)])
    c.disconnect()
    pub.publish("s05/mix", b"x", qos=1)
    c = v5(broker.port, "s05-mix", expiry=60)
    assert c.connack.session_present is True
    assert c.get().payload == b"x"
    c.disconnect(props={SESSION_EXPIRY: 0})


def test_a_session_resumed_without_expiry_leaves_nothing_on_flash():
    # Found by fuzzing (seed 90210): a message queued for a kept session,
    # then delivered after a resumption that no longer keeps it (v5 clean
    # start 0, Session Expiry 0), stayed on flash for good; so did the
    # record of one in flight, acknowledged after such a resumption.
    with BrokerProc(board="esp32") as b:
        s = Client(b.port, "px", version=5, props={SESSION_EXPIRY: 600})
        assert s.subscribe([("leak/#", 1)]) == [1]
        p = Client(b.port, "px-pub", version=5)
        p.publish("leak/inflight", b"i", qos=1)
        assert s.get(ack=False).payload == b"i"  # in flight, on flash
        s.close()
        p.publish("leak/queued", b"q", qos=1)  # queued, on flash
        p.disconnect()
        s = Client(b.port, "px", version=5, clean=False)  # Session Expiry 0: ends at the disconnect
        assert s.connack.session_present
        assert sorted(m.payload for m in s.messages(2)) == [b"i", b"q"]
        s.disconnect()
        time.sleep(0.5)  # the store commits the session's end
        b.stop()
        # Only the broker's clock is left ("c", persist.py).
        assert b.store_keys() == ["c"]


def test_messages_in_flight_at_a_resumption_go_again_before_a_message_routed_right_after_it():
    # W went to a persistent session and was not acknowledged. The client
    # comes back and publishes M to the same topic in the same segment as
    # its CONNECT: M was routed before the writer's first turn and went
    # straight into the output, ahead of W's resend (MQTT-4.6.0: in the
    # order received). A fresh-clone run's power-cut test saw a message
    # overtake one acknowledged before it this way.
    from mqttc import Raw, connect_bytes, decode, enc, Publish as Pub, PUBLISH
    with BrokerProc(board="esp32") as b:
        props = {SESSION_EXPIRY: 600}
        sink = Client(b.port, "order-sink", version=5, clean=False, props=props)
        sink.subscribe([("order/t", 1)])
        pub = Client(b.port, "order-pub", version=5)
        assert pub.publish("order/t", b"W", qos=1).reason == 0
        assert sink.get(ack=False).payload == b"W"
        sink.close()  # W unacknowledged
        r = Raw(b.port)
        r.send(connect_bytes("order-sink", 5, clean=False, props=props)
               + enc(Pub("order/t", b"M", 1, False, False, 7), 5))
        got = []
        while len(got) < 2:
            raw = r.recv_packet(5)
            assert raw is not None, "closed; got %r" % got
            p = decode(raw, 5)
            if p.type == PUBLISH:
                got.append((bytes(p.payload), p.dup))
        assert got == [(b"W", True), (b"M", False)], got
        r.close()
        pub.close()


@pytest.mark.parametrize("qos", [1, 2])
def test_a_message_in_flight_too_big_for_the_resumed_client_is_dropped_not_sent_again(broker, pub, qos):
    # MQTT-3.1.2-24/25: the Maximum Packet Size of the new CONNECT holds for
    # what is sent again on resumption; the message is discarded for that
    # client, and its flow ends (the next one is not held behind it).
    from mqttc import MAX_PACKET, PUBLISH
    cid = "s05-mps-q%d" % qos
    c = v5(broker.port, cid, expiry=60, clean=True)
    c.subscribe([("s05/mps/%d" % qos, qos)])
    pub.publish("s05/mps/%d" % qos, b"A" * 200, qos=qos)
    assert c.get(ack=False).payload == b"A" * 200
    c.close()  # in flight, unacknowledged
    time.sleep(0.1)
    c = Client(broker.port, cid, version=5, clean=False, props={SESSION_EXPIRY: 60, MAX_PACKET: 100})
    assert c.connack.session_present is True
    got = c.poll(0.5)
    assert got is None, "sent again past the client's Maximum Packet Size: %r" % (got,)
    pub.publish("s05/mps/%d" % qos, b"small", qos=qos)
    m = c.get()
    assert m.type == PUBLISH and m.payload == b"small" and not m.dup
    c.close()
    v5(broker.port, cid, expiry=0, clean=True).disconnect()


def test_messages_sent_again_on_resumption_keep_to_the_new_receive_maximum(broker, pub):
    # MQTT-3.3.4-9: no more unacknowledged QoS 1/2 PUBLISHes than the
    # Receive Maximum of this connection, resent ones included; the rest
    # follow as they are acknowledged, in their order.
    from mqttc import RECEIVE_MAX, PUBLISH
    c = v5(broker.port, "s05-rm", expiry=60, clean=True)
    c.subscribe([("s05/rm", 1)])
    for i in range(6):
        pub.publish("s05/rm", b"%d" % i, qos=1)
    assert [m.payload for m in c.messages(6, timeout=5, ack=False)] == [b"%d" % i for i in range(6)]
    c.close()  # six in flight
    time.sleep(0.1)
    c = Client(broker.port, "s05-rm", version=5, clean=False, props={SESSION_EXPIRY: 60, RECEIVE_MAX: 2})
    first = [c.get(ack=False) for _ in range(2)]
    assert c.poll(0.5) is None, "more than the Receive Maximum of 2 in flight"
    got = []
    for m in first:
        assert m.dup
        got.append(m.payload)
        c.ack(m)
    while len(got) < 6:
        m = c.get(ack=False)
        assert m.type == PUBLISH and m.dup
        got.append(m.payload)
        c.ack(m)
    assert got == [b"%d" % i for i in range(6)]
    assert c.poll(0.3) is None
    c.close()
    v5(broker.port, "s05-rm", expiry=0, clean=True).disconnect()


def test_qos0_messages_waiting_for_a_client_that_goes_are_not_kept_for_its_session():
    # Queued while it stopped reading, they stayed with its session once
    # it was gone, as none is queued for an offline one: eight such
    # dashboards held the heap below its floor, and a returning one got
    # stale values (outside field probe; Mosquitto keeps none).
    import socket as so
    import struct

    with BrokerProc(board="esp32") as b:
        d = Client(b.port, "stale-dash", version=4, clean=False, rcvbuf=1024)
        d.subscribe([("stale/t", 1)])
        pub = Client(b.port, "stale-pub", version=4)
        for i in range(120):
            pub.publish("stale/t", b"%03d" % i + b"x" * 300, qos=0)
        pub.ping()  # its PINGRESP: every PUBLISH before it was taken (queued behind the stalled output)
        d.raw.s.setsockopt(so.SOL_SOCKET, so.SO_LINGER, struct.pack("ii", 1, 0))
        d.close()
        assert wait_for(lambda: "client stale-dash disconnected" in b.log(), timeout=5)
        d = Client(b.port, "stale-dash", version=4, clean=False)
        assert d.connack.session_present
        assert d.messages(timeout=1) == []
        pub.publish("stale/t", b"fresh", qos=0)
        assert [m.payload for m in d.messages(1, timeout=3)] == [b"fresh"]
