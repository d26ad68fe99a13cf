"""The codec (lib/mqtt) against paho-mqtt 2.2.0, both protocol versions.

* paho.mqtt.properties.Properties: pack() output equals our properties
  encoding byte for byte, and each side decodes the other's bytes.
* paho.mqtt._packet decoders (decode_publish, decode_connack, ...): they
  read what our encoder writes, with the same fields.
* A real paho Client talks to a tiny socket server in this file that frames
  and decodes with our codec and answers with our encoder: what paho sends
  (CONNECT with will and credentials, SUBSCRIBE with v5 options, PUBLISH at
  QoS 0/1/2 with properties, acknowledgements, UNSUBSCRIBE, DISCONNECT) is
  decoded field by field and must re-encode to paho's exact bytes; what we
  send (CONNACK, SUBACK, PUBLISH, PUBREL, UNSUBACK, DISCONNECT) must reach
  paho's callbacks with the right values.
"""
import os
import socket
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import paho.mqtt.client as mqtt
from paho.mqtt import _packet as paho_packet
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = os.path.join(os.path.dirname(HERE), "lib")
for _p in (LIB, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from mqtt import packets as K  # noqa: E402
from mqtt import props as P  # noqa: E402
from test_codec_fuzz import packets_of, properties  # noqa: E402
from test_codec_vectors import SPEC_PROPERTIES  # noqa: E402

_PAHO_TYPE = {"CONNECT": PacketTypes.CONNECT, "CONNACK": PacketTypes.CONNACK, "PUBLISH": PacketTypes.PUBLISH,
              "PUBACK": PacketTypes.PUBACK, "PUBREC": PacketTypes.PUBREC, "PUBREL": PacketTypes.PUBREL,
              "PUBCOMP": PacketTypes.PUBCOMP, "SUBSCRIBE": PacketTypes.SUBSCRIBE, "SUBACK": PacketTypes.SUBACK,
              "UNSUBSCRIBE": PacketTypes.UNSUBSCRIBE, "UNSUBACK": PacketTypes.UNSUBACK,
              "DISCONNECT": PacketTypes.DISCONNECT, "AUTH": PacketTypes.AUTH, "WILL": PacketTypes.WILLMESSAGE}
_OUR_TYPE = {"WILL": P.WILL, **{n: K.NAMES.index(n) for n in _PAHO_TYPE if n != "WILL"}}
_NAMES = {pid: name.replace(" ", "") for name, pid in Properties(PacketTypes.PUBLISH).names.items()}


def to_paho(ctx, props):
    pp = Properties(_PAHO_TYPE[ctx])
    for pid, v in (props or {}).items():
        setattr(pp, _NAMES[pid], list(v) if isinstance(v, list) else v)
    return pp


def from_paho(ctx, pp):
    # paho Properties -> our dict form (None when empty).
    if pp is None:
        return None
    out = {}
    for pid, name in _NAMES.items():
        if hasattr(pp, name):
            v = getattr(pp, name)
            if pid == 0x26:
                v = [tuple(x) for x in v]
            elif pid == 0x0B and ctx != "PUBLISH":
                (v,) = v
            elif isinstance(v, (bytes, bytearray)):
                v = bytes(v)
            out[pid] = v
    return out or None


def _no_bom(obj):
    # paho's readUTF refuses U+FEFF, which MQTT allows ([MQTT-1.5.4-3]);
    # keep it out of what paho has to read.
    if isinstance(obj, str):
        return "\ufeff" not in obj
    if isinstance(obj, dict):
        return all(_no_bom(k) and _no_bom(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_no_bom(x) for x in obj)
    return True


# ---------------------------------------------------------------- properties

_SAMPLE = {"byte": 1, "u16": 7, "u32": 100000, "varint": 300, "str": "é-x", "bin": b"\x00\xff", "pair": None}


def _every_property(ctx):
    out = {}
    for pid, (kind, where) in SPEC_PROPERTIES.items():
        if ctx in where:
            v = _SAMPLE[kind]
            if kind == "pair":
                v = [("k", "1"), ("k", "2"), ("é", "")]
            if pid == 0x0B and ctx == "PUBLISH":
                v = [1, 268435455]
            out[pid] = v
    return out


CONTEXTS = list(_PAHO_TYPE)


@pytest.mark.parametrize("ctx", CONTEXTS)
def test_paho_properties_pack_equals_our_encoding_for_every_allowed_property(ctx):
    props = _every_property(ctx)
    ours = bytes(P.encode(props))
    assert to_paho(ctx, props).pack() == ours
    got, off = P.decode(ours, 0, len(ours), _OUR_TYPE[ctx])
    assert (got, off) == (props, len(ours))
    back = Properties(_PAHO_TYPE[ctx])
    back.unpack(ours)
    assert from_paho(ctx, back) == props


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CONTEXTS).flatmap(lambda c: st.tuples(st.just(c), properties(c))))
def test_random_properties_encode_like_paho_and_decode_paho_output(cp):
    ctx, props = cp
    assume(_no_bom(props))
    assume(not props or props.get(0x27, 1) <= 268435455)  # paho caps Maximum Packet Size at the varint range
    ours = bytes(P.encode(props))
    assert to_paho(ctx, props).pack() == ours
    assert P.decode(ours, 0, len(ours), _OUR_TYPE[ctx])[0] == props
    back = Properties(_PAHO_TYPE[ctx])
    back.unpack(ours)
    assert from_paho(ctx, back) == props


# ---------------------------------------------------------------- paho's decoders

PROTO = {4: mqtt.MQTTv311, 5: mqtt.MQTTv5}


def _split(raw):
    h, n = K.frame(raw, 0, len(raw), 1 << 22)
    return raw[0], raw[h:h + n]


def _paho_view(pkt, version):
    # What paho's decoder makes of our encoding, in our field names.
    first, body = _split(K.encode(pkt, version))
    proto = PROTO[version]
    t = pkt.type
    if t == K.PUBLISH:
        r = paho_packet.decode_publish(first, body, proto)
        return K.Publish(r.topic.decode("utf-8"), bytes(r.payload), r.qos, r.retain, r.dup, r.mid,
                         from_paho("PUBLISH", r.properties))
    if t == K.CONNACK:
        r = paho_packet.decode_connack(first, body, proto)
        return K.Connack(bool(r.flags & 1), r.rc, from_paho("CONNACK", r.properties))
    if t == K.SUBACK:
        r = paho_packet.decode_suback(first, body, proto)
        if version != 5:
            assert list(r.granted_qos) == [c.value for c in r.reason_codes]
        return K.Suback(r.mid, [c.value for c in r.reason_codes], from_paho("SUBACK", r.properties))
    if t == K.UNSUBACK:
        r = paho_packet.decode_unsuback(first, body, proto)
        reasons = [c.value for c in r.reason_codes] if version == 5 else None
        return K.Unsuback(r.mid, reasons, from_paho("UNSUBACK", r.properties))
    if t == K.DISCONNECT:
        r = paho_packet.decode_disconnect(first, body, proto)
        return K.Disconnect(r.reason.value if r.reason is not None else 0, from_paho("DISCONNECT", r.properties))
    fn = {K.PUBACK: paho_packet.decode_puback, K.PUBREC: paho_packet.decode_pubrec,
          K.PUBREL: paho_packet.decode_pubrel, K.PUBCOMP: paho_packet.decode_pubcomp}[t]
    r = fn(first, body, proto)
    return K.Ack(t, r.mid, r.reason.value, from_paho(K.NAMES[t], r.properties))


def _paho_knows_reasons(pkt):
    # paho's ReasonCode table lacks some codes the spec allows (for
    # example CONNACK 0x99 Payload format invalid, 5.0 §3.2.2.2); such
    # packets cannot go through paho's decoder at all.
    if pkt.type == K.PUBLISH:
        return True
    codes = getattr(pkt, "reasons", None) or [getattr(pkt, "reason", 0)]
    for c in codes:
        try:
            ReasonCode(_PAHO_TYPE[K.NAMES[pkt.type]], identifier=c)
        except Exception:
            return False
    return True


PAHO_DECODED = [(t, v) for v in (4, 5) for t in (K.CONNACK, K.PUBLISH, K.PUBACK, K.PUBREC, K.PUBREL, K.PUBCOMP,
                                                 K.SUBACK, K.UNSUBACK, K.DISCONNECT)]


@pytest.mark.parametrize("t,version", PAHO_DECODED,
                         ids=["%s-v%s" % (K.NAMES[t], "5" if v == 5 else "3.1.1") for t, v in PAHO_DECODED])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_paho_decoder_reads_what_we_encode(t, version, data):
    pkt = data.draw(packets_of(t, version))
    assume(_no_bom(pkt.__dict__))
    # paho caps Maximum Packet Size at the varint range; the spec does not.
    assume(not (getattr(pkt, "props", None) or {}).get(0x27, 1) > 268435455)
    assume(not (t == K.CONNACK and version == 5 and pkt.reason == 1))
    assume(version != 5 or _paho_knows_reasons(pkt))
    assert _paho_view(pkt, version) == pkt


# ---------------------------------------------------------------- a live paho client

class FakeBroker:
    """One-connection MQTT server built on our codec, run in a thread.

    Every packet received is kept as (raw bytes, decoded packet); `answer`
    (broker, packet) decides what to send back.
    """

    def __init__(self, answer):
        self.answer = answer
        self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.srv.settimeout(10)
        self.port = self.srv.getsockname()[1]
        self.version = 4
        self.conn = None
        self.received = []
        self.errors = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def send(self, pkt):
        self.conn.sendall(K.encode(pkt, self.version))

    def _run(self):
        try:
            self.conn, _ = self.srv.accept()
            self.conn.settimeout(10)
            buf = bytearray()
            while True:
                data = self.conn.recv(4096)
                if not data:
                    return
                buf += data
                while True:
                    r = K.frame(buf, 0, len(buf), 1 << 20)
                    if r is None or r[0] + r[1] > len(buf):
                        break
                    h, n = r
                    raw = bytes(buf[:h + n])
                    del buf[:h + n]
                    pkt = K.decode(raw[0], raw, h, h + n, self.version)
                    if pkt.type == K.CONNECT:
                        self.version = 5 if pkt.version == 5 else 4
                    with self.lock:
                        self.received.append((raw, pkt))
                    self.answer(self, pkt)
                    if pkt.type == K.DISCONNECT:
                        return
        except Exception as e:  # reported by the test
            self.errors.append(e)
        finally:
            if self.conn is not None:
                self.conn.close()
            self.srv.close()

    def packets(self, t=None):
        with self.lock:
            return [p for _, p in self.received if t is None or p.type == t]

    def wait_for(self, cond, timeout=5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            time.sleep(0.005)
        return False


def default_answer(b, p):
    v5 = b.version == 5
    if p.type == K.CONNECT:
        b.send(K.Connack(False, 0))
    elif p.type == K.SUBSCRIBE:
        b.send(K.Suback(p.pid, [o & 3 for _, o in p.topics]))
    elif p.type == K.UNSUBSCRIBE:
        b.send(K.Unsuback(p.pid, [0] * len(p.filters) if v5 else None))
    elif p.type == K.PUBLISH and p.qos == 1:
        b.send(K.Ack(K.PUBACK, p.pid))
    elif p.type == K.PUBLISH and p.qos == 2:
        b.send(K.Ack(K.PUBREC, p.pid))
    elif p.type == K.PUBREL:
        b.send(K.Ack(K.PUBCOMP, p.pid))
    elif p.type == K.PUBREC:
        b.send(K.Ack(K.PUBREL, p.pid))
    elif p.type == K.PINGREQ:
        b.send(K.Empty(K.PINGRESP))


class Events:
    def __init__(self):
        self.ev = {}
        self.data = {}

    def hit(self, name, value):
        self.data.setdefault(name, []).append(value)
        self.ev.setdefault(name, threading.Event()).set()

    def wait(self, name, timeout=5.0):
        e = self.ev.setdefault(name, threading.Event())
        assert e.wait(timeout), "no %s callback" % name
        return self.data[name]


def make_client(version, ev, client_id="paho-1"):
    kw = {} if version == 5 else {"clean_session": True}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=PROTO[version], **kw)
    c.on_connect = lambda cl, u, flags, rc, props: ev.hit("connect", (flags, rc, props))
    c.on_subscribe = lambda cl, u, mid, rcs, props: ev.hit("subscribe", (mid, rcs, props))
    c.on_unsubscribe = lambda cl, u, mid, rcs, props: ev.hit("unsubscribe", (mid, rcs, props))
    c.on_publish = lambda cl, u, mid, rc, props: ev.hit("publish", mid)
    c.on_message = lambda cl, u, msg: ev.hit("message", msg)
    c.on_disconnect = lambda cl, u, flags, rc, props: ev.hit("disconnect", (rc, props))
    return c


def finish(client, broker):
    client.disconnect()
    broker.thread.join(5)
    client.loop_stop()
    assert not broker.errors, broker.errors


def assert_reencodes_to_pahos_bytes(broker):
    # Our encoder writes exactly what paho wrote for every packet it sent.
    for raw, pkt in broker.received:
        assert K.encode(pkt, broker.version) == raw, pkt


VERSIONS = pytest.mark.parametrize("version", [4, 5], ids=["v3.1.1", "v5"])


@VERSIONS
def test_paho_connect_with_will_and_credentials_decodes_field_by_field(version):
    broker = FakeBroker(default_answer)
    ev = Events()
    c = make_client(version, ev, client_id="paho-c1")
    will_props = conn_props = None
    if version == 5:
        will_props = to_paho("WILL", {0x01: 1, 0x02: 60, 0x03: "text/plain", 0x18: 5, 0x26: [("w", "1")]})
        conn_props = to_paho("CONNECT", {0x11: 120, 0x17: 0, 0x19: 1, 0x21: 10, 0x22: 4, 0x26: [("a", "b")],
                                         0x27: 4096})
    c.will_set("w/t", b"bye", qos=1, retain=True, properties=will_props)
    c.username_pw_set("user", "pass")
    c.connect("127.0.0.1", broker.port, keepalive=30, properties=conn_props)
    c.loop_start()
    flags, rc, _ = ev.wait("connect")[0]
    assert rc == 0 and flags.session_present is False
    finish(c, broker)

    connect = broker.packets()[0]
    want = K.Connect("paho-c1", version=version, clean=True, keepalive=30, username="user", password=b"pass",
                     will_topic="w/t", will_payload=b"bye", will_qos=1, will_retain=True)
    if version == 5:
        want.will_props = {0x01: 1, 0x02: 60, 0x03: "text/plain", 0x18: 5, 0x26: [("w", "1")]}
        want.props = {0x11: 120, 0x17: 0, 0x19: 1, 0x21: 10, 0x22: 4, 0x26: [("a", "b")], 0x27: 4096}
    assert connect == want
    assert [p.type for p in broker.packets()] == [K.CONNECT, K.DISCONNECT]
    assert broker.packets()[-1] == K.Disconnect()
    assert_reencodes_to_pahos_bytes(broker)


@VERSIONS
def test_paho_subscribe_publish_unsubscribe_decode_and_reencode_exactly(version):
    broker = FakeBroker(default_answer)
    ev = Events()
    c = make_client(version, ev)
    c.connect("127.0.0.1", broker.port, keepalive=60)
    c.loop_start()
    ev.wait("connect")
    v5 = version == 5
    if v5:
        topics = [("a/+", SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True, retainHandling=1)),
                  ("b/#", SubscribeOptions(qos=2, retainHandling=2))]
        _, sub_mid = c.subscribe(topics, properties=to_paho("SUBSCRIBE", {0x0B: 7, 0x26: [("s", "1")]}))
    else:
        _, sub_mid = c.subscribe([("a/+", 1), ("b/#", 2)])
    mid, rcs, _ = ev.wait("subscribe")[0]
    assert mid == sub_mid and [r.value for r in rcs] == [1, 2]

    pub_props = {0x01: 1, 0x02: 60, 0x03: "text/plain", 0x08: "r/1", 0x09: b"\x00\x01", 0x26: [("k", "1"), ("k", "2")]}
    infos = [c.publish("t/0", b"zero", qos=0, retain=True),
             c.publish("t/1", b"one", qos=1, properties=to_paho("PUBLISH", pub_props) if v5 else None),
             c.publish("t/2", b"", qos=2)]
    for info in infos:
        info.wait_for_publish(5)
    _, unsub_mid = c.unsubscribe(["a/+", "b/#"], properties=to_paho("UNSUBSCRIBE", {0x26: [("u", "")]}) if v5 else None)
    assert ev.wait("unsubscribe")[0][0] == unsub_mid
    finish(c, broker)

    sub = broker.packets(K.SUBSCRIBE)
    opts = [1 | 1 << 2 | 1 << 3 | 1 << 4, 2 | 2 << 4] if v5 else [1, 2]
    assert sub == [K.Subscribe(sub_mid, [("a/+", opts[0]), ("b/#", opts[1])],
                               {0x0B: 7, 0x26: [("s", "1")]} if v5 else None)]
    pubs = broker.packets(K.PUBLISH)
    assert pubs == [K.Publish("t/0", b"zero", 0, True, False, 0),
                    K.Publish("t/1", b"one", 1, False, False, infos[1].mid, pub_props if v5 else None),
                    K.Publish("t/2", b"", 2, False, False, infos[2].mid)]
    assert broker.packets(K.PUBREL) == [K.Ack(K.PUBREL, infos[2].mid)]
    assert broker.packets(K.UNSUBSCRIBE) == [K.Unsubscribe(unsub_mid, ["a/+", "b/#"], {0x26: [("u", "")]} if v5 else None)]
    assert_reencodes_to_pahos_bytes(broker)


@VERSIONS
def test_paho_callbacks_get_our_connack_suback_and_publishes(version):
    v5 = version == 5
    connack_props = {0x12: "srv-1", 0x13: 20, 0x21: 5, 0x22: 3, 0x25: 1, 0x26: [("s", "1")]} if v5 else None
    pub1_props = {0x01: 1, 0x02: 30, 0x03: "text/plain", 0x09: b"cd", 0x0B: [3, 4], 0x26: [("k", "v")]}

    def answer(b, p):
        if p.type == K.CONNECT:
            b.send(K.Connack(True, 0, connack_props))
        elif p.type == K.SUBSCRIBE:
            b.send(K.Suback(p.pid, [1, 0x87 if v5 else 0x80], {0x1F: "nope"} if v5 else None))
            b.send(K.Publish("s/0", b"r", 0, True, False, 0))
            b.send(K.Publish("s/1", b"\x00\xff", 1, False, False, 5, pub1_props if v5 else None))
            b.send(K.Publish("s/2", b"two", 2, False, True, 6))
        else:
            default_answer(b, p)

    broker = FakeBroker(answer)
    ev = Events()
    c = make_client(version, ev)
    c.connect("127.0.0.1", broker.port, keepalive=60)
    c.loop_start()
    flags, rc, props = ev.wait("connect")[0]
    assert flags.session_present is True and rc.value == 0
    if v5:
        assert from_paho("CONNACK", props) == connack_props
    c.subscribe([("s/#", 2), ("x", 1)])
    _, rcs, sprops = ev.wait("subscribe")[0]
    assert [r.value for r in rcs] == [1, 0x87 if v5 else 0x80]
    if v5:
        assert sprops.ReasonString == "nope"
    assert broker.wait_for(lambda: len(ev.data.get("message", [])) == 3)
    assert broker.wait_for(lambda: broker.packets(K.PUBCOMP))
    finish(c, broker)

    msgs = ev.data["message"]
    assert [(m.topic, m.payload, m.qos, m.retain) for m in msgs] == [
        ("s/0", b"r", 0, True), ("s/1", b"\x00\xff", 1, False), ("s/2", b"two", 2, False)]
    assert msgs[2].dup is True
    if v5:
        assert from_paho("PUBLISH", msgs[1].properties) == pub1_props
    assert broker.packets(K.PUBACK) == [K.Ack(K.PUBACK, 5)]
    assert broker.packets(K.PUBREC) == [K.Ack(K.PUBREC, 6)]
    assert broker.packets(K.PUBCOMP) == [K.Ack(K.PUBCOMP, 6)]
    assert_reencodes_to_pahos_bytes(broker)


@pytest.mark.parametrize("version,code,name", [(4, 5, "Not authorized"), (4, 4, "Bad user name or password"),
                                               (5, 0x86, "Bad user name or password"), (5, 0x9C, "Use another server")],
                         ids=["v3.1.1-rc5", "v3.1.1-rc4", "v5-0x86", "v5-0x9C"])
def test_paho_on_connect_reports_our_refusal_code(version, code, name):
    def answer(b, p):
        if p.type == K.CONNECT:
            b.send(K.Connack(False, code, {0x1C: "other:1883"} if code == 0x9C else None))

    broker = FakeBroker(answer)
    ev = Events()
    c = make_client(version, ev)
    c.connect("127.0.0.1", broker.port, keepalive=60)
    c.loop_start()
    flags, rc, props = ev.wait("connect")[0]
    c.loop_stop()
    c.disconnect()
    broker.thread.join(5)
    assert rc.getName() == name and flags.session_present is False
    if code == 0x9C:
        assert props.ServerReference == "other:1883"


def test_paho_on_disconnect_reports_our_v5_disconnect_reason_and_properties():
    def answer(b, p):
        if p.type == K.CONNECT:
            b.send(K.Connack(False, 0))
            b.send(K.Disconnect(0x8E, {0x1F: "taken over", 0x26: [("x", "y")]}))

    broker = FakeBroker(answer)
    ev = Events()
    c = make_client(5, ev)
    c.connect("127.0.0.1", broker.port, keepalive=60)
    c.loop_start()
    rc, props = ev.wait("disconnect")[0]
    c.loop_stop()
    broker.thread.join(5)
    assert rc.value == 0x8E
    assert from_paho("DISCONNECT", props) == {0x1F: "taken over", 0x26: [("x", "y")]}
