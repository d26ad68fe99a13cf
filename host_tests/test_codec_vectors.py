"""Byte-exact vectors for the MQTT codec (lib/mqtt), under CPython and MicroPython.

The vectors live in host_tests/vectors/*.json (format described at the top
of mp_codec_runner.py). Each valid vector is decoded and compared field by
field, then the expected packet is encoded and compared byte for byte; each
malformed vector must raise MQTTError with the reason code it names. The
same vectors go through mp_codec_runner.py on the board twin (the 32-bit
MicroPython v1.28.0 with lib/mqtt frozen in) and every vector's result
there must equal CPython's.

Besides the vectors, this file generates a few exhaustive checks from the
spec text: every wrong fixed-header flag value for every packet type,
every property in every packet it may and may not appear in (5.0 Table
2-4), truncation at every byte, trailing bytes, and framing limits.
"""
import os
import subprocess
import sys
import tracemalloc

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIB = os.path.join(ROOT, "lib")
for _p in (LIB, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import mp_codec_runner as R  # noqa: E402
from mqtt import packets as K  # noqa: E402
from mqtt import props as P  # noqa: E402
from mqtt import wire  # noqa: E402
from mqtt.errors import MQTTError  # noqa: E402
from framer import Framer  # noqa: E402

VDIR = os.path.join(HERE, "vectors")
LARGE = os.path.join(VDIR, "large")
# The board twin (conftest builds it first): lib/mqtt as frozen into it,
# 32-bit, as a board runs it.
from conftest import MICROPYTHON  # noqa: E402
RUNNER = os.path.join(HERE, "mp_codec_runner.py")

ALL = R.load(VDIR) + R.load(LARGE)
CODEC = [v for v in ALL if v.get("kind") != "topic"]
PACKETS = [v for v in ALL if v.get("kind", "packet") == "packet"]
VALID = [v for v in PACKETS if "reason" not in v]
ENCODABLE = [v for v in VALID if v.get("encode", True)]
MALFORMED = [v for v in PACKETS if "reason" in v]
VARINTS = [v for v in ALL if v.get("kind") == "varint"]
STRINGS = [v for v in ALL if v.get("kind") == "string"]
FRAMES = [v for v in ALL if v.get("kind") == "frame"]


def _ids(vs):
    return [v["name"] for v in vs]


def _want(v):
    return int(v["reason"], 16)


def _frame_decode(buf, version, max_size=R.NO_LIMIT):
    h, n = K.frame(buf, 0, len(buf), max_size)
    assert h + n == len(buf), "vector holds %d bytes, frame() says %d" % (len(buf), h + n)
    return K.decode(buf[0], buf, h, h + n, version)


def _rebuild(first, body):
    # A packet with this first byte and body; the Remaining Length is
    # written by the test's own encoder (mp_codec_runner.varint).
    return bytes([first]) + R.varint(len(body)) + bytes(body)


def _raises(buf, version, max_size=R.NO_LIMIT):
    with pytest.raises(MQTTError) as ei:
        r = K.frame(buf, 0, len(buf), max_size)
        assert r is not None, "frame() wants more bytes"
        h, n = r
        K.decode(buf[0], buf, h, h + n, version)
    return ei.value.reason


# ---------------------------------------------------------------- vector data

def test_vector_names_are_unique():
    names = _ids(ALL)
    dups = sorted({n for n in names if names.count(n) > 1})
    assert not dups


@pytest.mark.parametrize("v", VALID, ids=_ids(VALID))
def test_vector_remaining_length_matches_its_bytes(v):
    # A check of the data itself, independent of the codec.
    buf = R.vector_bytes(v)
    h, n = R.split_header(buf)
    assert h + n == len(buf)


def test_every_packet_type_has_a_valid_vector_in_both_versions():
    have = {(R.TYPES[v["packet"]["type"]], v["version"]) for v in VALID}
    missing = [(K.NAMES[t], ver) for ver in (4, 5) for t in range(1, 16)
               if (t, ver) not in have and not (t == K.AUTH and ver == 4)]
    assert not missing


# 5.0 Table 2-4: identifier -> (wire type, packets it may appear in). "WILL"
# stands for the Will Properties of CONNECT. Written from the spec, not read
# from lib/mqtt/props.py.
ACKS = ("PUBACK", "PUBREC", "PUBREL", "PUBCOMP")
SPEC_PROPERTIES = {
    0x01: ("byte", ("PUBLISH", "WILL")),
    0x02: ("u32", ("PUBLISH", "WILL")),
    0x03: ("str", ("PUBLISH", "WILL")),
    0x08: ("str", ("PUBLISH", "WILL")),
    0x09: ("bin", ("PUBLISH", "WILL")),
    0x0B: ("varint", ("PUBLISH", "SUBSCRIBE")),
    0x11: ("u32", ("CONNECT", "CONNACK", "DISCONNECT")),
    0x12: ("str", ("CONNACK",)),
    0x13: ("u16", ("CONNACK",)),
    0x15: ("str", ("CONNECT", "CONNACK", "AUTH")),
    0x16: ("bin", ("CONNECT", "CONNACK", "AUTH")),
    0x17: ("byte", ("CONNECT",)),
    0x18: ("u32", ("WILL",)),
    0x19: ("byte", ("CONNECT",)),
    0x1A: ("str", ("CONNACK",)),
    0x1C: ("str", ("CONNACK", "DISCONNECT")),
    0x1F: ("str", ("CONNACK",) + ACKS + ("SUBACK", "UNSUBACK", "DISCONNECT", "AUTH")),
    0x21: ("u16", ("CONNECT", "CONNACK")),
    0x22: ("u16", ("CONNECT", "CONNACK")),
    0x23: ("u16", ("PUBLISH",)),
    0x24: ("byte", ("CONNACK",)),
    0x25: ("byte", ("CONNACK",)),
    0x26: ("pair", ("CONNECT", "CONNACK", "PUBLISH", "WILL") + ACKS
           + ("SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "DISCONNECT", "AUTH")),
    0x27: ("u32", ("CONNECT", "CONNACK")),
    0x28: ("byte", ("CONNACK",)),
    0x29: ("byte", ("CONNACK",)),
    0x2A: ("byte", ("CONNACK",)),
}


def test_every_v5_property_appears_in_a_valid_vector():
    seen = set()
    for v in VALID:
        p = v["packet"]
        for key in ("props", "will_props"):
            if p.get(key):
                seen.update(int(k, 16) for k in p[key])
    assert sorted(set(SPEC_PROPERTIES) - seen) == []


def test_vectors_cover_every_malformed_reason_the_codec_documents():
    reasons = {_want(v) for v in MALFORMED}
    assert {0x81, 0x82, 0x84, 0x95} <= reasons


# ---------------------------------------------------------------- valid vectors

@pytest.mark.parametrize("v", VALID, ids=_ids(VALID))
def test_valid_vector_decodes_to_expected_fields(v):
    got = _frame_decode(R.vector_bytes(v), v["version"])
    want = R.build(v["packet"])
    assert type(got) is type(want)
    assert got.__dict__ == want.__dict__


@pytest.mark.parametrize("v", VALID, ids=_ids(VALID))
def test_valid_vector_decodes_the_same_from_a_memoryview_at_an_offset(v):
    got = R.decode_view(R.vector_bytes(v), v["version"], R.NO_LIMIT)
    assert got == R.build(v["packet"])


@pytest.mark.parametrize("v", VALID, ids=_ids(VALID))
def test_valid_vector_comes_out_of_framer_only_after_its_last_byte(v):
    got = R.decode_bytewise(R.vector_bytes(v), v["version"], R.NO_LIMIT)
    assert got == R.build(v["packet"])


@pytest.mark.parametrize("v", ENCODABLE, ids=_ids(ENCODABLE))
def test_valid_vector_encodes_to_exact_bytes(v):
    assert K.encode(R.build(v["packet"]), v["version"]) == R.vector_bytes(v)


@pytest.mark.parametrize("v", [v for v in VALID if v["packet"]["type"] == "PUBLISH"],
                         ids=_ids([v for v in VALID if v["packet"]["type"] == "PUBLISH"]))
def test_publish_vector_matches_decode_publish_and_encode_publish(v):
    # The broker's fast path: decode_publish() tuples and encode_publish().
    buf = R.vector_bytes(v)
    want = R.build(v["packet"])
    h, n = K.frame(buf, 0, len(buf), R.NO_LIMIT)
    topic, pid, props, poff = K.decode_publish(buf[0], buf, h, h + n, v["version"])
    assert (topic, pid, props, buf[poff:]) == (want.topic, want.pid, want.props, want.payload)
    if v.get("encode", True):
        body = None
        if v["version"] == 5 and want.props:
            body = P.encode_body(want.props)
        out = K.encode_publish(want.topic.encode(), want.payload, want.qos, want.retain, want.dup,
                               want.pid, body, v["version"])
        assert bytes(out) == buf
        if want.qos:
            at = K.pid_offset(len(want.topic.encode()), len(buf) - h)
            assert buf[at:at + 2] == bytes([want.pid >> 8, want.pid & 255])


# ---------------------------------------------------------------- malformed vectors

@pytest.mark.parametrize("v", MALFORMED, ids=_ids(MALFORMED))
def test_malformed_vector_raises_expected_reason(v):
    limit = v.get("max_size", R.NO_LIMIT)
    assert _raises(R.vector_bytes(v), v["version"], limit) == _want(v)


@pytest.mark.parametrize("v", MALFORMED, ids=_ids(MALFORMED))
def test_malformed_vector_raises_the_same_through_framer_and_memoryview(v):
    buf = R.vector_bytes(v)
    limit = v.get("max_size", R.NO_LIMIT)
    reasons = []
    for fn in (R.decode_bytes, R.decode_view, R.decode_framer):
        with pytest.raises(MQTTError) as ei:
            fn(buf, v["version"], limit)
        reasons.append(ei.value.reason)
    assert len(set(reasons)) == 1


@pytest.mark.parametrize("v", VARINTS, ids=_ids(VARINTS))
def test_variable_byte_integer_vector(v):
    assert R.check_varint(v) is None, R.check_varint(v)
    if "reason" not in v:
        buf = R.vector_bytes(v)
        assert wire.get_varint(buf, 0, len(buf)) == (v["value"], len(buf))


@pytest.mark.parametrize("v", STRINGS, ids=_ids(STRINGS))
def test_utf8_string_vector(v):
    buf = R.vector_bytes(v)
    if "reason" in v:
        with pytest.raises(MQTTError) as ei:
            wire.get_str(buf, 0, len(buf))
        assert ei.value.reason == _want(v)
    else:
        s = "".join(chr(c) for c in v["codepoints"])
        assert wire.get_str(buf, 0, len(buf)) == (s, len(buf))
        out = bytearray()
        wire.put_str(out, s)
        assert bytes(out) == buf


@pytest.mark.parametrize("v", FRAMES, ids=_ids(FRAMES))
def test_frame_vector(v):
    buf = R.vector_bytes(v)
    limit = v.get("max_size", R.NO_LIMIT)
    if "reason" in v:
        with pytest.raises(MQTTError) as ei:
            K.frame(buf, 0, len(buf), limit)
        assert ei.value.reason == _want(v)
    elif v.get("incomplete"):
        assert K.frame(buf, 0, len(buf), limit) is None
    else:
        assert list(K.frame(buf, 0, len(buf), limit)) == v["header"]


# ---------------------------------------------------------------- generated checks

# A valid v5 body for each packet type, to put under wrong flags.
_V5_BODY = {
    K.CONNECT: bytes.fromhex("00044d515454 05 02 003c 00 0002 6331".replace(" ", "")),
    K.CONNACK: bytes.fromhex("000000"),
    K.PUBLISH: bytes.fromhex("0003612f62 0001 00 6869".replace(" ", "")),
    K.PUBACK: bytes.fromhex("0001"),
    K.PUBREC: bytes.fromhex("0001"),
    K.PUBREL: bytes.fromhex("0001"),
    K.PUBCOMP: bytes.fromhex("0001"),
    K.SUBSCRIBE: bytes.fromhex("0001 00 000161 00".replace(" ", "")),
    K.SUBACK: bytes.fromhex("0001 00 00".replace(" ", "")),
    K.UNSUBSCRIBE: bytes.fromhex("0001 00 000161".replace(" ", "")),
    K.UNSUBACK: bytes.fromhex("0001 00 00".replace(" ", "")),
    K.PINGREQ: b"",
    K.PINGRESP: b"",
    K.DISCONNECT: b"",
    K.AUTH: b"",
}
# Fixed header flags each type must carry (3.1.1 Table 2.2, 5.0 Table 2-2).
_FLAGS = {t: (2 if t in (K.PUBREL, K.SUBSCRIBE, K.UNSUBSCRIBE) else 0) for t in range(1, 16)}


def _publish_flags_valid(f):
    qos = (f >> 1) & 3
    return qos != 3 and not (f & 8 and qos == 0)


@pytest.mark.parametrize("t", range(1, 16), ids=[K.NAMES[t] for t in range(1, 16)])
def test_wrong_fixed_header_flags_are_malformed_for_every_flag_value(t):
    body = _V5_BODY[t]
    for f in range(16):
        buf = _rebuild((t << 4) | f, body)
        ok = _publish_flags_valid(f) if t == K.PUBLISH else f == _FLAGS[t]
        if ok:
            # The body must decode with correct flags, or the test proves nothing.
            _frame_decode(buf, 5)
        else:
            assert _raises(buf, 5) == 0x81, "flags %s" % bin(f)


def test_reserved_packet_type_0_is_malformed_with_any_flags():
    for f in range(16):
        for body in (b"", b"\x00\x01"):
            assert _raises(_rebuild(f, body), 4) == 0x81
            assert _raises(_rebuild(f, body), 5) == 0x81


def test_publish_qos0_with_dup_is_malformed():
    for version, body in ((4, b"\x00\x01a"), (5, b"\x00\x01a\x00")):
        assert _raises(_rebuild(0x38, body), version) == 0x81
        assert _raises(_rebuild(0x39, body), version) == 0x81
        _frame_decode(_rebuild(0x30, body), version)


def test_publish_qos3_is_malformed_with_and_without_dup_and_retain():
    body = b"\x00\x01a\x00\x01"
    for f in (0x36, 0x37, 0x3E, 0x3F):
        assert _raises(_rebuild(f, body), 4) == 0x81


def _cut_everywhere(v):
    buf = R.vector_bytes(v)
    h, n = R.split_header(buf)
    body = buf[h:]
    for k in range(len(body)):
        yield k, _rebuild(buf[0], body[:k])


def _valid_of(ptype):
    return [v for v in VALID if v["packet"]["type"] == ptype]


def test_truncated_connect_raises_malformed_at_every_byte():
    count = 0
    for v in _valid_of("CONNECT"):
        for k, buf in _cut_everywhere(v):
            assert _raises(buf, v["version"]) == 0x81, "%s cut at %d" % (v["name"], k)
            count += 1
    assert count > 300


def test_truncated_connack_raises_malformed_at_every_byte():
    for v in _valid_of("CONNACK"):
        for k, buf in _cut_everywhere(v):
            assert _raises(buf, v["version"]) == 0x81, "%s cut at %d" % (v["name"], k)


def test_truncated_publish_header_raises_malformed_at_every_byte():
    for v in _valid_of("PUBLISH"):
        want = R.build(v["packet"])
        header = len(R.vector_bytes(v)) - len(want.payload) - R.split_header(R.vector_bytes(v))[0]
        for k, buf in _cut_everywhere(v):
            if k < header:
                assert _raises(buf, v["version"]) == 0x81, "%s cut at %d" % (v["name"], k)


def test_truncated_stream_is_incomplete_at_every_byte_never_an_error():
    # A packet still arriving is not malformed: frame() and Framer wait.
    # (Vectors whose fault is the length field itself are left out.)
    for v in VALID + [v for v in MALFORMED if not v["name"].startswith("remaining_length_")]:
        buf = R.vector_bytes(v)
        for k in range(len(buf)):
            r = K.frame(buf, 0, k, R.NO_LIMIT)
            assert r is None or r[0] + r[1] > k, "%s: a packet after %d bytes" % (v["name"], k)


_FIXED_LAYOUT = ("CONNECT", "CONNACK", "PINGREQ", "PINGRESP")


def test_trailing_byte_after_a_complete_packet_is_malformed():
    checked = 0
    for v in VALID:
        t = v["packet"]["type"]
        ver = v["version"]
        fixed = (t in _FIXED_LAYOUT
                 or (ver != 5 and t in ACKS + ("UNSUBACK", "DISCONNECT"))
                 or (ver == 5 and t in ACKS + ("DISCONNECT", "AUTH") and v["packet"].get("props")))
        if not fixed:
            continue
        buf = R.vector_bytes(v)
        h, n = R.split_header(buf)
        assert _raises(_rebuild(buf[0], buf[h:] + b"\x00"), ver) == 0x81, v["name"]
        checked += 1
    assert checked >= 30


def test_frame_rejects_a_huge_remaining_length_before_reading_or_allocating():
    head = bytes.fromhex("30ffffff7f")  # claims 268,435,455 bytes
    tracemalloc.start()
    try:
        with pytest.raises(MQTTError) as ei:
            K.frame(head, 0, len(head), 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ei.value.reason == 0x95
    assert peak < 16384
    fr = Framer(1024)
    fr.feed(head)
    with pytest.raises(MQTTError) as ei:
        fr.next(5)
    assert ei.value.reason == 0x95


def test_frame_five_byte_remaining_length_is_malformed_without_a_fifth_byte():
    with pytest.raises(MQTTError) as ei:
        K.frame(bytes.fromhex("30ffffffff"), 0, 5, R.NO_LIMIT)
    assert ei.value.reason == 0x81


def test_frame_respects_offset_and_end():
    buf = bytes.fromhex("eeee c000 d000 ee".replace(" ", ""))
    assert K.frame(buf, 2, 4, 100) == (2, 0)
    assert K.frame(buf, 4, 6, 100) == (2, 0)
    assert K.frame(buf, 4, 5, 100) is None


def test_put_varint_refuses_values_outside_0_to_268435455():
    for n in (-1, 268435456):
        with pytest.raises(MQTTError) as ei:
            wire.put_varint(bytearray(), n)
        assert ei.value.reason == 0x81


def test_string_of_65535_bytes_round_trips_and_65536_is_refused():
    s = "a" * 65535
    out = bytearray()
    wire.put_str(out, s)
    assert out[:2] == b"\xff\xff"
    assert wire.get_str(bytes(out), 0, len(out)) == (s, len(out))
    with pytest.raises(MQTTError):
        wire.put_str(bytearray(), s + "a")


# Property values used to probe Table 2-4, one per wire type.
_VALUE = {
    "byte": (b"\x01", 1),
    "u16": (b"\x00\x01", 1),
    "u32": (b"\x00\x00\x00\x01", 1),
    "varint": (b"\x01", 1),
    "str": (b"\x00\x01a", "a"),
    "bin": (b"\x00\x01\x00", b"\x00"),
    "pair": (b"\x00\x01a\x00\x01b", [("a", "b")]),
}
_CONTEXTS = ("CONNECT", "WILL", "CONNACK", "PUBLISH") + ACKS + (
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "DISCONNECT", "AUTH")


def _packet_with_property(ctx, prop):
    # A v5 packet of the given kind whose only property is `prop` (bytes).
    pl = R.varint(len(prop)) + prop
    mqtt5 = bytes.fromhex("00044d51545405")
    if ctx == "CONNECT":
        return _rebuild(0x10, mqtt5 + b"\x02\x00\x3c" + pl + b"\x00\x02c1")
    if ctx == "WILL":
        return _rebuild(0x10, mqtt5 + b"\x06\x00\x3c\x00\x00\x02c1" + pl + b"\x00\x01w\x00\x00")
    if ctx == "CONNACK":
        return _rebuild(0x20, b"\x00\x00" + pl)
    if ctx == "PUBLISH":
        return _rebuild(0x30, b"\x00\x03a/b" + pl)
    if ctx in ACKS:
        t = R.TYPES[ctx]
        return _rebuild((t << 4) | _FLAGS[t], b"\x00\x01\x00" + pl)
    if ctx == "SUBSCRIBE":
        return _rebuild(0x82, b"\x00\x01" + pl + b"\x00\x01a\x00")
    if ctx == "SUBACK":
        return _rebuild(0x90, b"\x00\x01" + pl + b"\x00")
    if ctx == "UNSUBSCRIBE":
        return _rebuild(0xA2, b"\x00\x01" + pl + b"\x00\x01a")
    if ctx == "UNSUBACK":
        return _rebuild(0xB0, b"\x00\x01" + pl + b"\x00")
    if ctx == "DISCONNECT":
        return _rebuild(0xE0, b"\x00" + pl)
    return _rebuild(0xF0, b"\x00" + pl)


_ALLOWED = [(pid, ctx) for pid in SPEC_PROPERTIES for ctx in _CONTEXTS if ctx in SPEC_PROPERTIES[pid][1]]
_FORBIDDEN = [(pid, ctx) for pid in SPEC_PROPERTIES for ctx in _CONTEXTS if ctx not in SPEC_PROPERTIES[pid][1]]


@pytest.mark.parametrize("pid,ctx", _ALLOWED, ids=["0x%02X-%s" % x for x in _ALLOWED])
def test_property_decodes_in_every_packet_the_spec_allows(pid, ctx):
    raw, value = _VALUE[SPEC_PROPERTIES[pid][0]]
    pkt = _frame_decode(_packet_with_property(ctx, bytes([pid]) + raw), 5)
    got = pkt.will_props if ctx == "WILL" else pkt.props
    if pid == 0x0B and ctx == "PUBLISH":
        value = [value]  # repeatable in PUBLISH, so always a list there
    assert got == {pid: value}


@pytest.mark.parametrize("pid,ctx", _FORBIDDEN, ids=["0x%02X-%s" % x for x in _FORBIDDEN])
def test_property_is_refused_in_every_packet_the_spec_forbids(pid, ctx):
    # 5.0 §2.2.2.2 names the reason (0x81); the named vectors in
    # properties.json check it. Here: refused at all, everywhere.
    raw, _ = _VALUE[SPEC_PROPERTIES[pid][0]]
    _raises(_packet_with_property(ctx, bytes([pid]) + raw), 5)


@pytest.mark.parametrize("pkt", [
    K.Ack(K.PUBACK, 1, 0, {0x11: 5}),
    K.Publish("a", b"", props={0x12: "x"}),
    K.Connect("c", version=5, will_topic="w", will_props={0x11: 1}),
    K.Connect("c", version=5, props={0x18: 1}),
    K.Subscribe(1, [("a", 0)], props={0x1F: "x"}),
    K.Disconnect(0, {0x23: 1}),
], ids=["puback-session-expiry", "publish-assigned-id", "will-session-expiry", "connect-will-delay",
        "subscribe-reason-string", "disconnect-topic-alias"])
def test_encoder_refuses_a_property_the_packet_may_not_carry(pkt):
    with pytest.raises(MQTTError):
        K.encode(pkt, 5)


def test_v3_encoding_leaves_out_properties_and_v5_reason_codes():
    assert K.encode(K.Ack(K.PUBACK, 1, 0x80, {0x1F: "x"}), 4) == bytes.fromhex("40020001")
    assert K.encode(K.Disconnect(0x8E, {0x1F: "x"}), 4) == bytes.fromhex("e000")
    assert K.encode(K.Unsuback(1, [0]), 4) == bytes.fromhex("b0020001")


# ---------------------------------------------------------------- MicroPython

def _parse_lines(text):
    out = {}
    stray = []
    for line in text.splitlines():
        if line.endswith(" OK"):
            out[line[:-3]] = line
        elif " FAIL " in line:
            out[line[:line.index(" FAIL ")]] = line
        else:
            stray.append(line)
    return out, stray


def run_micropython(vdir, heap):
    env = dict(os.environ, MICROPYPATH=".frozen")
    p = subprocess.run([str(MICROPYTHON), "-X", "heapsize=" + heap, RUNNER, vdir], env=env,
                       capture_output=True, text=True, timeout=120)
    lines, stray = _parse_lines(p.stdout)
    return p.returncode, lines, stray + p.stderr.splitlines()


@pytest.fixture(scope="module")
def mp_results():
    rc1, lines, err1 = run_micropython(VDIR, "110K")
    rc2, more, err2 = run_micropython(LARGE, "1M")
    lines.update(more)
    return {"rc": (rc1, rc2), "lines": lines, "stray": err1 + err2}


def test_micropython_runner_reports_every_vector_and_nothing_else(mp_results):
    assert mp_results["stray"] == []
    assert all(rc in (0, 1) for rc in mp_results["rc"])
    assert sorted(mp_results["lines"]) == sorted(_ids(ALL))


@pytest.mark.parametrize("v", CODEC, ids=_ids(CODEC))
def test_micropython_result_equals_cpython_result(v, mp_results):
    assert mp_results["lines"].get(v["name"]) == R.result_line(v)
