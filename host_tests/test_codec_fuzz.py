"""Property tests for the codec (lib/mqtt) with Hypothesis.

* Round trips: packets of every type with valid fields, both protocol
  versions, encode -> frame -> decode gives the same packet.
* Framing: streams of packets split at random points (and one byte at a
  time, and all at once) come back whole and in order, through Framer and
  through frame() walking a buffer.
* Mutation: random bytes and mutated valid packets (bit flips, inserted and
  deleted bytes, rewritten Remaining Length, truncation) never raise
  anything but MQTTError, and its reason is one the codec documents.

Example counts are bounded so that the whole file runs in a few seconds.
"""
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = os.path.join(os.path.dirname(HERE), "lib")
for _p in (LIB, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from mqtt import packets as K  # noqa: E402
from mqtt import props as P  # noqa: E402
from mqtt.errors import MQTTError  # noqa: E402
from framer import Framer  # noqa: E402
from test_codec_vectors import SPEC_PROPERTIES  # noqa: E402  (5.0 Table 2-4, from the spec)

# Reasons lib/mqtt/errors.py documents for decoding; 0x99 is listed there
# for payload checks. Anything else escaping decode is a bug.
DOCUMENTED_REASONS = {0x81, 0x82, 0x84, 0x95, 0x99}

# Reason codes each packet may carry (5.0 §3.2.2.2, §3.4.2.1, §3.5.2.1,
# §3.6.2.1, §3.7.2.1, §3.9.3, §3.11.3, §3.14.2.1, §3.15.2.1).
CONNACK_V5 = [0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
              0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]
PUBACK_V5 = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
PUBREL_V5 = [0x00, 0x92]
SUBACK_V5 = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
UNSUBACK_V5 = [0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]
DISCONNECT_V5 = [0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
                 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2]
AUTH_V5 = [0x00, 0x18, 0x19]

# ---------------------------------------------------------------- strategies

# UTF-8 strings the spec allows: no surrogates, no U+0000 (§1.5.4).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)
TOPIC = TEXT.filter(lambda s: s and "+" not in s and "#" not in s)
BIN = st.binary(max_size=12)
PID = st.integers(1, 65535)
NONZERO = (0x0B, 0x21, 0x23, 0x27)

_VALUES = {
    "byte": st.integers(0, 1),  # every byte property is a 0/1 flag
    "u16": st.integers(0, 65535),
    "u32": st.integers(0, 0xFFFFFFFF),
    "varint": st.integers(1, 268435455),
    "str": TEXT,
    "bin": BIN,
    "pair": st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3),
}


@st.composite
def properties(draw, ctx):
    allowed = sorted(pid for pid, (_, where) in SPEC_PROPERTIES.items() if ctx in where)
    chosen = draw(st.lists(st.sampled_from(allowed), unique=True, max_size=4))
    out = {}
    for pid in chosen:
        strat = _VALUES[SPEC_PROPERTIES[pid][0]]
        if pid in NONZERO:
            strat = strat.filter(bool)
        if pid == 0x0B and ctx == "PUBLISH":
            out[pid] = draw(st.lists(strat, min_size=1, max_size=3))
        else:
            out[pid] = draw(strat)
    return out or None


def _props(draw, version, ctx):
    return draw(properties(ctx)) if version == 5 else None


@st.composite
def connect(draw, version):
    level = version if version == 5 else draw(st.sampled_from([3, 4]))
    user = draw(st.booleans())
    pw = draw(st.booleans()) and (user or version == 5)
    c = K.Connect(client_id=draw(TEXT), version=level, clean=draw(st.booleans()),
                  keepalive=draw(st.integers(0, 65535)),
                  username=draw(TEXT) if user else None, password=draw(BIN) if pw else None,
                  props=_props(draw, version, "CONNECT"))
    if draw(st.booleans()):
        c.will_topic = draw(TOPIC)
        c.will_payload = draw(BIN)
        c.will_qos = draw(st.integers(0, 2))
        c.will_retain = draw(st.booleans())
        c.will_props = _props(draw, version, "WILL")
    return c


@st.composite
def connack(draw, version):
    reason = draw(st.sampled_from(CONNACK_V5 if version == 5 else [0, 1, 2, 3, 4, 5]))
    return K.Connack(draw(st.booleans()), reason, _props(draw, version, "CONNACK"))


@st.composite
def publish(draw, version):
    qos = draw(st.integers(0, 2))
    return K.Publish(draw(TOPIC), draw(st.binary(max_size=40)), qos, draw(st.booleans()),
                     draw(st.booleans()) if qos else False, draw(PID) if qos else 0,
                     _props(draw, version, "PUBLISH"))


@st.composite
def ack(draw, version, t):
    name = K.NAMES[t]
    reason = 0
    if version == 5:
        reason = draw(st.sampled_from(PUBREL_V5 if t in (K.PUBREL, K.PUBCOMP) else PUBACK_V5))
    return K.Ack(t, draw(PID), reason, _props(draw, version, name))


@st.composite
def subscribe(draw, version):
    if version == 5:
        opt = st.builds(lambda q, nl, rap, rh: q | nl << 2 | rap << 3 | rh << 4,
                        st.integers(0, 2), st.integers(0, 1), st.integers(0, 1), st.integers(0, 2))
    else:
        opt = st.integers(0, 2)
    topics = draw(st.lists(st.tuples(TEXT.filter(bool), opt), min_size=1, max_size=4))
    return K.Subscribe(draw(PID), topics, _props(draw, version, "SUBSCRIBE"))


@st.composite
def suback(draw, version):
    codes = SUBACK_V5 if version == 5 else [0, 1, 2, 0x80]
    return K.Suback(draw(PID), draw(st.lists(st.sampled_from(codes), min_size=1, max_size=5)),
                    _props(draw, version, "SUBACK"))


@st.composite
def unsubscribe(draw, version):
    return K.Unsubscribe(draw(PID), draw(st.lists(TEXT.filter(bool), min_size=1, max_size=4)),
                         _props(draw, version, "UNSUBSCRIBE"))


@st.composite
def unsuback(draw, version):
    if version != 5:
        return K.Unsuback(draw(PID))
    return K.Unsuback(draw(PID), draw(st.lists(st.sampled_from(UNSUBACK_V5), min_size=1, max_size=5)),
                      _props(draw, version, "UNSUBACK"))


@st.composite
def disconnect(draw, version):
    if version != 5:
        return K.Disconnect()
    return K.Disconnect(draw(st.sampled_from(DISCONNECT_V5)), _props(draw, version, "DISCONNECT"))


@st.composite
def auth(draw, version):
    return K.Auth(draw(st.sampled_from(AUTH_V5)), _props(draw, version, "AUTH"))


def packets_of(t, version):
    if t == K.CONNECT:
        return connect(version)
    if t == K.CONNACK:
        return connack(version)
    if t == K.PUBLISH:
        return publish(version)
    if K.PUBACK <= t <= K.PUBCOMP:
        return ack(version, t)
    if t == K.SUBSCRIBE:
        return subscribe(version)
    if t == K.SUBACK:
        return suback(version)
    if t == K.UNSUBSCRIBE:
        return unsubscribe(version)
    if t == K.UNSUBACK:
        return unsuback(version)
    if t in (K.PINGREQ, K.PINGRESP):
        return st.just(K.Empty(t))
    if t == K.DISCONNECT:
        return disconnect(version)
    return auth(version)


def any_packet(version):
    types = range(1, 16) if version == 5 else range(1, 15)
    return st.one_of([packets_of(t, version) for t in types])


VERSION_PACKETS = st.sampled_from([4, 5]).flatmap(lambda v: st.tuples(st.just(v), any_packet(v)))


def decode_one(raw, version, max_size=1 << 20):
    r = K.frame(raw, 0, len(raw), max_size)
    assert r is not None
    h, n = r
    assert h + n == len(raw)
    return K.decode(raw[0], raw, h, h + n, version)


# ---------------------------------------------------------------- round trips

TYPE_VERSIONS = [(t, v) for v in (4, 5) for t in range(1, 16) if not (t == K.AUTH and v == 4)]


@pytest.mark.parametrize("t,version", TYPE_VERSIONS,
                         ids=["%s-v%s" % (K.NAMES[t], "5" if v == 5 else "3.1.1") for t, v in TYPE_VERSIONS])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_packet_round_trips_through_encode_and_decode(t, version, data):
    pkt = data.draw(packets_of(t, version))
    raw = K.encode(pkt, version)
    assert decode_one(raw, version) == pkt
    # and through the memoryview path the broker uses
    buf = bytearray(raw)
    h, n = K.frame(buf, 0, len(buf), 1 << 20)
    assert K.decode(buf[0], memoryview(buf), h, h + n, version) == pkt


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([4, 5]).flatmap(lambda v: st.tuples(st.just(v), publish(v))))
def test_encode_publish_matches_encode_and_patches_packet_id_in_place(vp):
    version, pkt = vp
    body = P.encode_body(pkt.props) if version == 5 and pkt.props else None
    topic_b = pkt.topic.encode("utf-8")
    out = K.encode_publish(topic_b, pkt.payload, pkt.qos, pkt.retain, pkt.dup, pkt.pid, body, version)
    assert bytes(out) == K.encode(pkt, version)
    if pkt.qos:
        h, n = K.frame(out, 0, len(out), 1 << 20)
        at = K.pid_offset(len(topic_b), n)
        out[at:at + 2] = b"\x12\x34"
        assert decode_one(bytes(out), version).pid == 0x1234


# ---------------------------------------------------------------- framing

STREAMS = st.sampled_from([4, 5]).flatmap(
    lambda v: st.tuples(st.just(v), st.lists(any_packet(v), min_size=1, max_size=8)))


def _drain(fr, version, out):
    while True:
        p = fr.next(version)
        if p is None:
            return
        out.append(p)


@settings(max_examples=50, deadline=None)
@given(STREAMS, st.data())
def test_stream_split_at_random_points_gives_back_every_packet_in_order(vs, data):
    version, pkts = vs
    stream = b"".join(K.encode(p, version) for p in pkts)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=12))))
    fr = Framer()
    out = []
    prev = 0
    for c in cuts + [len(stream)]:
        fr.feed(stream[prev:c])
        prev = c
        _drain(fr, version, out)
    assert out == pkts
    assert fr.next_raw() is None


@settings(max_examples=25, deadline=None)
@given(STREAMS)
def test_stream_fed_one_byte_at_a_time_gives_back_every_packet(vs):
    version, pkts = vs
    stream = b"".join(K.encode(p, version) for p in pkts)
    fr = Framer()
    out = []
    for i in range(len(stream)):
        fr.feed(stream[i:i + 1])
        _drain(fr, version, out)
    assert out == pkts


@settings(max_examples=25, deadline=None)
@given(STREAMS)
def test_many_packets_in_one_feed_and_frame_walking_one_buffer(vs):
    version, pkts = vs
    stream = b"".join(K.encode(p, version) for p in pkts)
    fr = Framer()
    fr.feed(stream)
    out = []
    _drain(fr, version, out)
    assert out == pkts
    # frame() over the same buffer, packet by packet, as the broker does
    buf = bytearray(stream)
    off = 0
    walked = []
    while off < len(buf):
        h, n = K.frame(buf, off, len(buf), 1 << 20)
        walked.append(K.decode(buf[off], memoryview(buf), off + h, off + h + n, version))
        off += h + n
    assert walked == pkts
    # and every proper prefix of the last packet is "need more", never an error
    last = K.encode(pkts[-1], version)
    for k in range(len(last)):
        r = K.frame(last, 0, k, 1 << 20)
        assert r is None or sum(r) > k


@settings(max_examples=25, deadline=None)
@given(STREAMS, st.integers(2, 64))
def test_framer_limit_raises_packet_too_large_exactly_for_bigger_packets(vs, limit):
    version, pkts = vs
    fr = Framer(limit)
    for p in pkts:
        raw = K.encode(p, version)
        fr.feed(raw)
        if len(raw) > limit:
            with pytest.raises(MQTTError) as ei:
                fr.next(version)
            assert ei.value.reason == 0x95
            return
        assert fr.next(version) == p


# ---------------------------------------------------------------- mutation

def decode_stream(buf, version, max_size=4096):
    # Frames and decodes everything complete in buf; MQTTError propagates.
    off = 0
    while off < len(buf):
        r = K.frame(buf, off, len(buf), max_size)
        if r is None or off + r[0] + r[1] > len(buf):
            return
        h, n = r
        K.decode(buf[off], buf, off + h, off + h + n, version)
        off += h + n


def expect_only_mqtt_errors(fn, *args):
    try:
        fn(*args)
    except MQTTError as e:
        assert e.reason in DOCUMENTED_REASONS, "reason 0x%02X" % e.reason
        assert e.args[0] == e.reason


def decode_body_as_given(buf, version):
    # Decode whatever follows the first byte as the body, ignoring the
    # Remaining Length: exercises every reader with lengths that disagree.
    if len(buf) >= 1:
        K.decode(buf[0], buf, 1, len(buf), version)


@st.composite
def mutated(draw):
    version, pkt = draw(VERSION_PACKETS)
    raw = bytearray(K.encode(pkt, version))
    how = draw(st.sampled_from(["flip", "insert", "delete", "length", "truncate", "duplicate"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
    elif how == "insert":
        i = draw(st.integers(0, len(raw)))
        raw[i:i] = draw(st.binary(min_size=1, max_size=3))
    elif how == "delete":
        i = draw(st.integers(0, len(raw) - 1))
        del raw[i:i + draw(st.integers(1, 3))]
    elif how == "length":
        h = 1
        while raw[h] & 0x80:
            h += 1
        h += 1
        raw[1:h] = draw(st.binary(min_size=1, max_size=5))
    elif how == "truncate":
        del raw[draw(st.integers(0, len(raw) - 1)):]
    else:
        i = draw(st.integers(0, len(raw) - 1))
        raw[i:i] = raw[i:i + draw(st.integers(1, 6))]
    return version, bytes(raw)


@settings(max_examples=250, deadline=None)
@given(mutated())
def test_mutated_packet_raises_nothing_but_documented_mqtt_errors(vb):
    version, raw = vb
    expect_only_mqtt_errors(decode_stream, raw, version)
    expect_only_mqtt_errors(decode_body_as_given, raw, version)
    fr = Framer(4096)
    fr.feed(raw)
    expect_only_mqtt_errors(_drain, fr, version, [])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 5]), st.binary(max_size=64))
def test_random_bytes_raise_nothing_but_documented_mqtt_errors(version, raw):
    expect_only_mqtt_errors(decode_stream, raw, version)
    expect_only_mqtt_errors(decode_body_as_given, raw, version)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([4, 5]), st.integers(0, 255), st.binary(max_size=48))
def test_random_body_under_every_first_byte_raises_nothing_but_mqtt_errors(version, first, body):
    expect_only_mqtt_errors(K.decode, first, body, 0, len(body), version)
    expect_only_mqtt_errors(K.decode_publish, 0x32, body, 0, len(body), version)
    expect_only_mqtt_errors(K.decode_ack, K.PUBACK, body, 0, len(body), version)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=1, max_size=40))
def test_random_property_block_raises_nothing_but_mqtt_errors(block):
    for ptype in (P.WILL, K.CONNECT, K.CONNACK, K.PUBLISH, K.PUBACK, K.SUBSCRIBE, K.DISCONNECT, K.AUTH):
        expect_only_mqtt_errors(P.decode, block, 0, len(block), ptype)
