"""CONNECT / CONNACK, session take-over, connect timeout and keep-alive
(MQTT 3.1.1 ch. 3.1, 3.2, 4.x; MQTT 5.0 ch. 3.1, 3.2, 4.13)."""
import time

import pytest

from brokerfixtures import broker, still_alive  # noqa: F401
from mqttc import (BrokerProc, Raw, Client, Connect, Empty, decode, CONNACK,
                   DISCONNECT, PINGREQ, PINGRESP, ASSIGNED_ID, SERVER_KEEP_ALIVE, RECEIVE_MAX,
                   MAX_PACKET, SESSION_EXPIRY, TOPIC_ALIAS_MAX, connect_bytes)
from mqtt import packets as P

CONFIG = {
    "connect_timeout": 1,
    "max_keepalive": 30,
    "max_inflight_messages": 7,
    "max_packet_size": 4096,
    "max_topic_alias": 5,
}




def connect_raw(port, client_id, version=4, **kw):
    r = Raw(port)
    r.send(connect_bytes(client_id, version=version, **kw))
    return r


# ---------------------------------------------------------------- CONNACK


def test_v311_connack_is_byte_exact(broker):
    r = connect_raw(broker.port, "c01-v311", version=4)
    assert r.recv_packet() == b"\x20\x02\x00\x00"
    r.close()


def test_v31_mqisdp_connect_is_accepted(broker):
    r = connect_raw(broker.port, "c01-v31", version=3)
    assert r.recv_packet() == b"\x20\x02\x00\x00"
    r.close()


def test_v31_client_id_longer_than_23_bytes_is_rejected_with_return_code_2(broker):
    # The 3.1 spec: ids of 1 to 23 characters, a longer one gets CONNACK 2
    # (Identifier Rejected). 3.1.1 and 5.0 may take more (below).
    r = connect_raw(broker.port, "c01-v31-" + "x" * 15, version=3)
    assert r.recv_packet() == b"\x20\x02\x00\x00"  # 23 bytes: taken
    r.close()
    r = connect_raw(broker.port, "c01-v31-" + "x" * 16, version=3)
    assert r.recv_packet() == b"\x20\x02\x00\x02"
    assert r.closed()
    r = connect_raw(broker.port, "c01-v311-" + "x" * 40, version=4)
    assert r.recv_packet() == b"\x20\x02\x00\x00"
    r.close()


def test_v31_connack_to_a_resumed_session_keeps_the_reserved_byte_zero(broker):
    # 3.1 has no Session Present flag: its first CONNACK byte is reserved.
    # A second clean-session-0 connect got 20 02 01 00 (Mosquitto: 00).
    for _ in range(2):
        r = connect_raw(broker.port, "c01-v31-kept", version=3, clean=False)
        assert r.recv_packet() == b"\x20\x02\x00\x00"
        r.close()


def test_v5_connack_is_byte_exact_and_carries_configured_limits(broker):
    r = connect_raw(broker.port, "c01-v5", version=5, keepalive=20)
    raw = r.recv_packet()
    # 20 len | flags 00 | reason 00 | props: RM=7, TAM=5, MPS=4096
    expect = bytes([0x20, 0x0E, 0x00, 0x00, 0x0B,
                    0x21, 0x00, 0x07,
                    0x22, 0x00, 0x05,
                    0x27, 0x00, 0x00, 0x10, 0x00])
    assert raw == expect
    ack = decode(raw, 5)
    assert ack.reason == 0 and ack.session_present is False
    assert ack.props[RECEIVE_MAX] == CONFIG["max_inflight_messages"]
    assert ack.props[MAX_PACKET] == CONFIG["max_packet_size"]
    assert ack.props[TOPIC_ALIAS_MAX] == CONFIG["max_topic_alias"]
    r.close()


def test_v5_client_asking_more_keepalive_than_max_gets_server_keep_alive(broker):
    c = Client(broker.port, "c01-ska", version=5, keepalive=100)
    assert c.connack.props[SERVER_KEEP_ALIVE] == CONFIG["max_keepalive"]
    c.close()


def test_v5_client_within_max_keepalive_gets_no_server_keep_alive(broker):
    c = Client(broker.port, "c01-ska2", version=5, keepalive=20)
    assert SERVER_KEEP_ALIVE not in (c.connack.props or {})
    c.close()


# ---------------------------------------------------------------- protocol errors


def test_v5_second_connect_gets_disconnect_0x82_then_close(broker):
    c = Client(broker.port, "c01-2nd5", version=5)
    c.send_raw(connect_bytes("c01-2nd5", version=5))
    d = c.expect(DISCONNECT)
    assert d.reason == 0x82
    assert c.closed()


def test_v311_second_connect_closes_connection(broker):
    c = Client(broker.port, "c01-2nd4", version=4)
    c.send_raw(connect_bytes("c01-2nd4", version=4))
    assert c.raw.recv_packet(5) is None  # closed, nothing sent


@pytest.mark.parametrize("first", [
    pytest.param(b"\xc0\x00", id="pingreq"),
    pytest.param(b"\x30\x05\x00\x01a\x68\x69", id="publish"),
    pytest.param(b"\x82\x06\x00\x01\x00\x01a\x00", id="subscribe"),
    pytest.param(b"\xe0\x00", id="disconnect"),
])
def test_first_packet_not_connect_closes_connection(broker, first):
    r = Raw(broker.port)
    r.send(first)
    assert r.recv_packet(5) is None
    r.close()


@pytest.mark.parametrize("level", [0, 2, 3, 6, 255])
def test_unsupported_protocol_level_gets_v311_connack_0x01_then_close(broker, level):
    # 3.1.1 MQTT-3.1.2-2: CONNACK return code 0x01, then disconnect.
    body = b"\x00\x04MQTT" + bytes([level, 0x02, 0x00, 0x3C]) + b"\x00\x03abc"
    r = Raw(broker.port)
    r.send(bytes([0x10, len(body)]) + body)
    assert r.recv_packet() == b"\x20\x02\x00\x01"
    assert r.closed()


@pytest.mark.parametrize("name,level", [(b"MQTX", 4), (b"MQTX", 5), (b"MQIsdp2", 3), (b"", 4)])
def test_a_connect_with_an_unknown_protocol_name_is_closed_without_a_connack(broker, name, level):
    # MQTT-3.1.2-1 (3.1.1 and 5.0): the server MAY disconnect a client whose
    # protocol name is wrong, and MUST NOT go on with it as MQTT; a CONNACK
    # would answer it as MQTT. Mosquitto closes without one; so do we.
    body = bytes([0, len(name)]) + name + bytes([level, 0x02, 0x00, 0x3C]) + (b"\x00" if level == 5 else b"") + b"\x00\x03abc"
    r = Raw(broker.port)
    r.send(bytes([0x10, len(body)]) + body)
    assert r.recv_packet(5) is None
    assert r.closed()


@pytest.mark.parametrize("level", [4, 5])
def test_mqisdp_at_a_level_other_than_3_gets_connack_0x01_then_close(broker, level):
    # The 3.1 name at another level is a version this broker does not speak
    # under that name: refused as an unsupported version, as Mosquitto does.
    body = b"\x00\x06MQIsdp" + bytes([level, 0x02, 0x00, 0x3C]) + b"\x00\x03abc"
    r = Raw(broker.port)
    r.send(bytes([0x10, len(body)]) + body)
    assert r.recv_packet() == b"\x20\x02\x00\x01"
    assert r.closed()


def test_connect_with_reserved_flag_set_is_closed(broker):
    # 3.1.1 MQTT-3.1.2-3 / 5.0 MQTT-3.1.2-3: reserved flag must be 0.
    body = b"\x00\x04MQTT\x04\x03\x00\x3C\x00\x03abc"
    r = Raw(broker.port)
    r.send(bytes([0x10, len(body)]) + body)
    assert r.closed()


# ---------------------------------------------------------------- client identifier


def test_v5_empty_client_id_gets_assigned_client_identifier(broker):
    a = Client(broker.port, "", version=5)
    b = Client(broker.port, "", version=5)
    ida = a.connack.props.get(ASSIGNED_ID)
    idb = b.connack.props.get(ASSIGNED_ID)
    assert ida and idb and ida != idb
    # The assigned identifier is the session's: both connections work.
    a.ping()
    b.ping()
    a.close()
    b.close()


def test_v5_client_whose_maximum_packet_size_is_below_the_connack_is_closed_without_one(broker):
    # The CONNACK with an Assigned Client Identifier is over 20 bytes; one
    # for a client with an identifier of its own fits.
    r = connect_raw(broker.port, "", version=5, props={MAX_PACKET: 20})
    assert r.closed()
    r = connect_raw(broker.port, "mps20", version=5, props={MAX_PACKET: 20})
    ack = r.recv_packet()
    assert ack[0] == 0x20 and len(ack) <= 20
    r.close()


def test_a_connect_refused_for_its_maximum_packet_size_takes_nothing_over(broker):
    # Refused before the take-over: the connected client keeps its
    # connection and session, and the refused CONNECT's will never goes.
    watcher = Client(broker.port, "mps-watcher", version=5)
    watcher.subscribe([("mps/will", 0)])
    victim = Client(broker.port, "mps-victim", version=5, props={SESSION_EXPIRY: 60})
    r = connect_raw(broker.port, "mps-victim", version=5, clean=False, props={MAX_PACKET: 12},
                    will_topic="mps/will", will_payload=b"ghost")
    assert r.closed()
    victim.ping()
    assert watcher.messages(timeout=1) == []
    victim.close()
    watcher.close()
    Client(broker.port, "mps-victim", version=5).close()  # the session ends


def test_v311_empty_client_id_with_clean_session_is_accepted(broker):
    r = connect_raw(broker.port, "", version=4, clean=True)
    assert r.recv_packet() == b"\x20\x02\x00\x00"
    r.send(b"\xc0\x00")
    assert r.recv_packet() == b"\xd0\x00"
    r.close()


def test_v311_empty_client_id_without_clean_session_gets_0x02_then_close(broker):
    r = connect_raw(broker.port, "", version=4, clean=False)
    assert r.recv_packet() == b"\x20\x02\x00\x02"
    assert r.closed()


# ---------------------------------------------------------------- take-over


def test_v5_session_takeover_sends_disconnect_0x8e_to_old_connection(broker):
    old = Client(broker.port, "c01-take5", version=5)
    new = Client(broker.port, "c01-take5", version=5)
    d = old.expect(DISCONNECT)
    assert d.reason == 0x8E
    assert old.closed()
    new.ping()
    new.close()


def test_v311_session_takeover_closes_old_connection(broker):
    old = Client(broker.port, "c01-take4", version=4)
    new = Client(broker.port, "c01-take4", version=4)
    assert old.raw.recv_packet(5) is None
    new.ping()
    new.close()


def test_session_takeover_new_connection_receives_messages(broker):
    old = Client(broker.port, "c01-take-sub", version=5, clean=False, props={0x11: 60})
    old.subscribe([("c01/take/t", 1)])
    new = Client(broker.port, "c01-take-sub", version=5, clean=False, props={0x11: 60})
    assert new.connack.session_present is True
    pub = Client(broker.port, "c01-take-pub", version=5)
    pub.publish("c01/take/t", b"after", qos=1)
    m = new.get()
    assert m.topic == "c01/take/t" and m.payload == b"after"
    new.disconnect(props={0x11: 0})
    pub.close()
    old.close()


# ---------------------------------------------------------------- timers


def test_socket_without_connect_is_closed_after_connect_timeout(broker):
    r = Raw(broker.port)
    t0 = time.time()
    assert r.closed(timeout=5)
    dt = time.time() - t0
    # connect_timeout is 1 s; the check runs once a second. The upper
    # bounds here leave 2 s for a loaded machine: they only prove a timer.
    assert 0.9 <= dt <= 4.5, dt
    r.close()


def test_partial_connect_is_closed_after_connect_timeout(broker):
    r = Raw(broker.port)
    r.send(b"\x10\x20\x00\x04MQ")  # half a CONNECT, then silence
    t0 = time.time()
    assert r.closed(timeout=5)
    assert time.time() - t0 <= 4.5
    r.close()


def test_v5_keepalive_expiry_sends_disconnect_0x8d_after_one_and_a_half_times(broker):
    c = Client(broker.port, "c01-ka5", version=5, keepalive=1)
    t0 = time.time()
    d = c.expect(DISCONNECT, timeout=5)
    dt = time.time() - t0
    assert d.reason == 0x8D
    assert c.closed()
    assert 1.4 <= dt <= 4.5, dt


def test_v311_keepalive_expiry_closes_connection(broker):
    c = Client(broker.port, "c01-ka4", version=4, keepalive=1)
    t0 = time.time()
    assert c.raw.recv_packet(5) is None
    dt = time.time() - t0
    assert 1.4 <= dt <= 4.5, dt


@pytest.mark.parametrize("version", [4, 5])
def test_a_client_whose_connack_waited_for_a_commit_is_still_closed_for_its_keep_alive(broker, version):
    # A clean start over a persistent session ends it, and the CONNACK
    # waits until that is on flash (its reader paused behind it). The
    # pause stayed set once the CONNACK went, and a silent client then
    # counted as one the broker held: never closed for its keep-alive.
    props = {0x11: 3600} if version == 5 else None
    c = Client(broker.port, "c01-ka-held%d" % version, version=version, clean=False, props=props)
    c.subscribe([("c01/kaheld/#", 1)])
    c.disconnect()
    c = Client(broker.port, "c01-ka-held%d" % version, version=version, clean=True, keepalive=1)
    assert c.connack.reason == 0
    t0 = time.time()
    while c.raw.recv_packet(6) is not None:  # (v5: DISCONNECT 0x8D, then the close)
        pass
    dt = time.time() - t0
    assert 1.4 <= dt <= 4.5, dt


def test_silent_clients_are_closed_at_one_and_a_half_keep_alives_not_on_the_next_whole_second(broker):
    # MQTT-3.1.2-24 (5.0: MQTT-3.1.2-22): closed within 1.5 times the
    # keep-alive. Four clients connect a quarter second apart, so that a
    # check made once a second would find at least two of them 0.4 s or
    # more past their time.
    import threading

    took = {}

    def wait_close(i, c, t0, t1):
        d = c.expect(DISCONNECT, timeout=5)
        t = time.monotonic()
        assert c.closed(timeout=3)
        # Its time starts when the broker takes the CONNECT: after t0, and
        # before t1, the CONNACK (a login's hash took a while on a busy
        # machine). Early measured from t0, late from t1.
        took[i] = (d.reason, t - t0, t - t1, time.monotonic() - t1)

    threads = []
    for i in range(4):
        t0 = time.monotonic()
        c = Client(broker.port, "c01-ka-due%d" % i, version=5, keepalive=1)
        th = threading.Thread(target=wait_close, args=(i, c, t0, time.monotonic()))
        th.start()
        threads.append(th)
        time.sleep(0.25)
    for th in threads:
        th.join(10)
    assert sorted(took) == [0, 1, 2, 3], took
    for reason, since_connect, told, closed in took.values():
        assert reason == 0x8D
        assert 1.5 <= since_connect and told <= 1.85, took
        # and closed then, not after the half second that drains what a
        # client still sends (a silent one sends nothing)
        assert closed <= 1.95, took


@pytest.mark.parametrize("version", [4, 5])
def test_a_client_that_sends_a_packet_a_byte_at_a_time_is_closed_at_one_and_a_half_keep_alives(broker, version):
    # MQTT-3.1.2-24 counts Control Packets received: each byte counted, a
    # client that sent one of a PUBLISH a second was never closed, and held
    # one of the board's few slots for good (outside clock probe).
    c = Client(broker.port, "c01-ka-trickle%d" % version, version=version, keepalive=1)
    t0 = time.time()
    pkt = P.encode(P.Publish("c01/trickle/x", b"p" * 40), version)
    for i in range(len(pkt)):
        try:
            c.send_raw(pkt[i : i + 1])
        except OSError:
            break
        if c.raw.closed(timeout=0.4):
            break
    dt = time.time() - t0
    assert dt <= 4.5, "not closed after %.1f s of a byte every 0.4 s" % dt
    # (1.5 s after its CONNECT was read; t0 comes after the CONNACK, which
    # a busy machine may take a while to deliver.)
    assert 1.0 <= dt, dt


def test_pingreq_keeps_connection_alive_past_keepalive(broker):
    c = Client(broker.port, "c01-ka-ping", version=4, keepalive=1)
    end = time.time() + 3.2
    while time.time() < end:
        c.send(Empty(PINGREQ))
        assert c.expect(PINGRESP).type == PINGRESP
        time.sleep(0.5)
    c.ping()
    c.close()


def test_keepalive_zero_connection_is_not_closed(broker):
    c = Client(broker.port, "c01-ka0", version=4, keepalive=0)
    assert c.poll(2.2) is None
    c.ping()
    c.close()


def test_server_keep_alive_is_enforced():
    # The keep-alive the server announced (max_keepalive 1) is the one it
    # enforces (5.0 3.2.2.3.14): silence for 1.5 s closes the connection.
    with BrokerProc(board="esp32", config={"max_keepalive": 1}) as b:
        c = Client(b.port, "c01-ska-enf", version=5, keepalive=60)
        assert c.connack.props[SERVER_KEEP_ALIVE] == 1
        t0 = time.time()
        assert c.expect(DISCONNECT, timeout=5).reason == 0x8D
        assert 1.4 <= time.time() - t0 <= 4.5
        assert b.alive()


# ---------------------------------------------------------------- other CONNECT checks


def test_v5_connect_with_authentication_method_gets_connack_0x8c(broker):
    # Enhanced authentication is not offered: 0x8C Bad authentication method.
    c = Client(broker.port, "c01-authm", version=5, props={0x15: "SCRAM-SHA-1"}, expect_ok=False)
    assert c.connack.reason == 0x8C
    assert c.closed()


def test_v5_authentication_data_without_a_method_gets_connack_0x82(broker):
    # 5.0 3.1.2.11.10: Authentication Data with no Authentication Method is
    # a Protocol Error.
    c = Client(broker.port, "c01-authd", version=5, props={0x16: b"token"}, expect_ok=False)
    assert c.connack.reason == 0x82
    assert c.closed()


def test_v5_auth_packet_without_authentication_method_is_protocol_error(broker):
    c = Client(broker.port, "c01-auth", version=5)
    c.send_raw(b"\xf0\x02\x18\x00")  # AUTH, Continue authentication
    assert c.expect(DISCONNECT).reason == 0x82
    assert c.closed()


def test_v311_password_without_user_name_is_closed(broker):
    # 3.1.1 MQTT-3.1.2-22.
    body = b"\x00\x04MQTT\x04\x42\x00\x3C\x00\x03abc\x00\x02pw"
    r = Raw(broker.port)
    r.send(bytes([0x10, len(body)]) + body)
    assert r.closed()


def test_will_qos_without_will_flag_is_closed(broker):
    # 3.1.1 MQTT-3.1.2-13 / 5.0 MQTT-3.1.2-11.
    body = b"\x00\x04MQTT\x04\x0a\x00\x3C\x00\x03abc"
    r = Raw(broker.port)
    r.send(bytes([0x10, len(body)]) + body)
    assert r.closed()


def test_v5_user_name_and_password_are_accepted_when_anonymous_allowed_without_password_file():
    # About another setting: anonymous clients allowed and no password
    # file; then any user name and password are let in, as in Mosquitto.
    with BrokerProc(board="esp32", config={"allow_anonymous": True, "password_file": None}) as b:
        c = Client(b.port, "c01-userpw", version=5, username="u", password=b"p")
        c.ping()
        c.close()


def test_connack_refusal_respects_client_maximum_packet_size(broker):
    # 5.0 MQTT-3.2.2-19: no Reason String when it would make the CONNACK
    # bigger than the client's Maximum Packet Size (here 16 bytes).
    r = connect_raw(broker.port, "c01-mps-ack", version=5, props={0x15: "X", MAX_PACKET: 16})
    raw = r.recv_packet()
    assert raw is not None, "closed without CONNACK"
    assert decode(raw, 5).reason == 0x8C
    assert len(raw) <= 16, "CONNACK of %d bytes to a client that allows 16: %r" % (len(raw), raw)
    assert r.closed()
