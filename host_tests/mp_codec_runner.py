# Checks the codec (lib/mqtt) against the JSON vectors in host_tests/vectors.
#
# Runs unchanged on the board twin (lib/mqtt frozen in) and under CPython:
#
#   MICROPYPATH=.frozen build/twin/micropython -X heapsize=110K \
#       host_tests/mp_codec_runner.py host_tests/vectors
#
# (the argument is a directory of *.json files or a single .json file) and
# prints one line per vector, "<name> OK" or "<name> FAIL <detail>"; the
# exit status is 1 when any vector failed. host_tests/test_codec_vectors.py
# and test_topic.py import this module for its loader and compare
# MicroPython's lines with CPython's, one test per vector.
#
# Vector files are {"about": ..., "groups": [{"spec": ..., "vectors": [...]}]}
# (topic.json has "func" and "cases" per group instead). A vector has:
#   name, version (3, 4 or 5), kind ("packet" when absent, "varint",
#   "string", "frame"), hex (a string, or a list of strings and
#   {"fill": "xx", "count": n} runs), and then either the expected result
#   (packet / value / codepoints / header / incomplete) or "reason": "0x81".
#   "encode": false marks a valid packet that is not in the encoder's
#   canonical form (decode only). "cuts": [[a, b], ...] expands into one
#   malformed vector per k in range(a, b): the first k bytes of the body
#   with the Remaining Length set to k, named <name>_at_<k>.
#   "max_size" is the packet size limit handed to frame() / Framer.
# Everything is built lazily, one file at a time, to fit a 110 KB heap.

import sys
import json
import gc
from binascii import unhexlify

try:
    import os
except ImportError:  # very old MicroPython
    import uos as os

from mqtt import packets as K
from mqtt import wire
from mqtt import topic as T
from mqtt.errors import MQTTError
from framer import Framer

NO_LIMIT = 268435460
# gc.collect() keeps MicroPython's small heap unfragmented between the big
# steps; under CPython it only costs time.
_MICROPYTHON = sys.implementation.name == "micropython"
TYPES = {}
for _i in range(1, 16):
    TYPES[K.NAMES[_i]] = _i


# ------------------------------------------------------------ data helpers

def hex_bytes(h):
    if isinstance(h, list):
        out = bytearray()
        for part in h:
            out.extend(hex_bytes(part))
        return bytes(out)
    if isinstance(h, dict):
        return unhexlify(h["fill"]) * h["count"]
    return unhexlify(h.replace(" ", ""))


def data_bytes(d):
    # {"hex": ...}, {"text": ...} or {"fill": ..., "count": ...}
    if "text" in d:
        return d["text"].encode("utf-8")
    if "fill" in d:
        return hex_bytes(d)
    return hex_bytes(d["hex"])


def varint(n):
    # Variable Byte Integer (spec 1.5.5), written here rather than taken
    # from the codec so that the expanded vectors do not trust it.
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            out.append(b | 128)
        else:
            out.append(b)
            return bytes(out)


def split_header(buf):
    # -> (header length, remaining length) of a well-formed vector.
    n = 0
    mul = 1
    i = 1
    while True:
        b = buf[i]
        i += 1
        n += (b & 127) * mul
        mul *= 128
        if b < 128:
            return i, n


def reason_of(v):
    r = v.get("reason")
    if r is None:
        return None
    return int(r, 16)


def conv_props(d):
    if d is None:
        return None
    out = {}
    for k in d:
        pid = int(k, 16)
        v = d[k]
        if pid == 0x26:
            v = [tuple(p) for p in v]
        elif isinstance(v, dict):
            v = data_bytes(v)
        out[pid] = v
    return out


def build(d):
    # Expected packet object from its JSON description.
    t = TYPES[d["type"]]
    f = {}
    for k in d:
        if k == "type":
            continue
        v = d[k]
        if k == "props" or k == "will_props":
            v = conv_props(v)
        elif k == "topics":
            v = [tuple(x) for x in v]
        elif isinstance(v, dict):
            v = data_bytes(v)
        f[k] = v
    if t == K.CONNECT:
        return K.Connect(**f)
    if t == K.CONNACK:
        return K.Connack(**f)
    if t == K.PUBLISH:
        return K.Publish(**f)
    if K.PUBACK <= t <= K.PUBCOMP:
        return K.Ack(t, **f)
    if t == K.SUBSCRIBE:
        return K.Subscribe(**f)
    if t == K.SUBACK:
        return K.Suback(**f)
    if t == K.UNSUBSCRIBE:
        return K.Unsubscribe(**f)
    if t == K.UNSUBACK:
        return K.Unsuback(**f)
    if t == K.PINGREQ or t == K.PINGRESP:
        return K.Empty(t)
    if t == K.DISCONNECT:
        return K.Disconnect(**f)
    return K.Auth(**f)


def vector_bytes(v):
    b = v.get("bytes")
    if b is None:
        b = hex_bytes(v["hex"])
    return b


# ------------------------------------------------------------ loading

def vector_files(vdir):
    # A directory's *.json files (not its subdirectories), or one file.
    if vdir.endswith(".json"):
        return [vdir]
    names = [n for n in os.listdir(vdir) if n.endswith(".json")]
    names.sort()
    return [vdir + "/" + n for n in names]


def _case_name(func, args):
    return "%s(%s)" % (func, ",".join(args))


def load_file(path):
    # Yields the vectors (dicts) of one file. Cut and topic vectors are
    # expanded on the fly; the parsed document is consumed as it goes so
    # that a small heap only ever holds one file and one vector's bytes.
    with open(path) as f:
        doc = json.load(f)
    groups = doc["groups"]
    doc = None
    groups.reverse()
    while groups:
        g = groups.pop()
        if "func" in g:
            func = g["func"]
            cases = g["cases"]
            cases.reverse()
            while cases:
                case = cases.pop()
                args = case[:-1]
                yield {"name": _case_name(func, args), "kind": "topic", "func": func,
                       "args": args, "expected": case[-1], "version": 5}
            continue
        vs = g["vectors"]
        g = None
        vs.reverse()
        while vs:
            v = vs.pop()
            cuts = v.get("cuts")
            if cuts is None:
                yield v
                continue
            buf = hex_bytes(v["hex"])
            h, n = split_header(buf)
            body = buf[h:]
            for a, b in cuts:
                for k in range(a, b):
                    yield {"name": "%s_at_%d" % (v["name"], k), "version": v["version"],
                           "bytes": buf[:1] + varint(k) + body[:k], "reason": v["reason"]}


def load(vdir):
    out = []
    for p in vector_files(vdir):
        out.extend(load_file(p))
    return out


# ------------------------------------------------------------ checks

def _outcome(fn):
    # -> ("ok", value) or ("err", reason); other exceptions propagate.
    try:
        return "ok", fn()
    except MQTTError as e:
        return "err", e.reason


def decode_bytes(buf, version, max_size):
    # Frame and decode a whole packet held in a bytes object.
    r = K.frame(buf, 0, len(buf), max_size)
    if r is None:
        return "incomplete"
    h, n = r
    if h + n != len(buf):
        return "frame length %d for %d bytes" % (h + n, len(buf))
    return K.decode(buf[0], buf, h, h + n, version)


def decode_view(buf, version, max_size):
    # The broker's way: frame in place inside a larger receive buffer and
    # decode from a memoryview at an offset.
    ba = bytearray(3 + len(buf))
    ba[0] = 0xEE
    ba[1] = 0xEE
    ba[2 : 2 + len(buf)] = buf
    ba[2 + len(buf)] = 0xEE
    end = 2 + len(buf)
    r = K.frame(ba, 2, end, max_size)
    if r is None:
        return "incomplete"
    h, n = r
    if 2 + h + n != end:
        return "frame length %d for %d bytes" % (h + n, len(buf))
    return K.decode(ba[2], memoryview(ba), 2 + h, 2 + h + n, version)


def decode_framer(buf, version, max_size):
    fr = Framer(max_size)
    fr.feed(buf)
    p = fr.next(version)
    if p is None:
        return "incomplete"
    if fr.next_raw() is not None:
        return "Framer found a second packet"
    return p


def decode_bytewise(buf, version, max_size):
    # Framer fed one byte at a time: nothing until the last byte.
    fr = Framer(max_size)
    last = len(buf) - 1
    for i in range(len(buf)):
        fr.feed(buf[i : i + 1])
        p = fr.next(version)
        if p is not None and i != last:
            return "Framer returned a packet after %d of %d bytes" % (i + 1, len(buf))
        if p is None and i == last:
            return "Framer returned nothing after all bytes"
    return p


def _diff(got, want):
    if not isinstance(got, K.Packet):
        return str(got)
    if type(got) is not type(want):
        return "got %s" % K.NAMES[got.type]
    gd = got.__dict__
    wd = want.__dict__
    keys = []
    for k in gd:
        if k not in keys:
            keys.append(k)
    for k in wd:
        if k not in keys:
            keys.append(k)
    keys.sort()
    bad = [k for k in keys if gd.get(k) != wd.get(k)]
    return "decoded fields differ: " + ",".join(bad)


def check_packet(v):
    buf = vector_bytes(v)
    ver = v["version"]
    want = reason_of(v)
    limit = v.get("max_size", NO_LIMIT)
    paths = [decode_bytes, decode_view, decode_framer]
    if want is None and len(buf) <= 300:
        paths.append(decode_bytewise)
    if want is not None:
        for fn in paths:
            kind, got = _outcome(lambda: fn(buf, ver, limit))
            if kind == "ok":
                return "%s: no error, want 0x%02X (%s)" % (fn.__name__, want, _short(got))
            if got != want:
                return "%s: reason 0x%02X, want 0x%02X" % (fn.__name__, got, want)
        return None
    expected = build(v["packet"])
    for fn in paths:
        kind, got = _outcome(lambda: fn(buf, ver, limit))
        if kind == "err":
            return "%s: raised 0x%02X" % (fn.__name__, got)
        if got != expected:
            return "%s: %s" % (fn.__name__, _diff(got, expected))
        got = None
        if _MICROPYTHON:
            gc.collect()
    if v.get("encode", True):
        kind, enc = _outcome(lambda: K.encode(expected, ver))
        if kind == "err":
            return "encode raised 0x%02X" % enc
        if enc != buf:
            return "encode gives %d bytes that differ from the vector's %d" % (len(enc), len(buf))
    return None


def _short(p):
    if isinstance(p, K.Packet):
        return K.NAMES[p.type]
    return str(p)


def check_varint(v):
    buf = vector_bytes(v)
    want = reason_of(v)
    kind, got = _outcome(lambda: wire.get_varint(buf, 0, len(buf)))
    if want is not None:
        if kind == "ok":
            return "no error, got %d" % got[0]
        return None if got == want else "reason 0x%02X, want 0x%02X" % (got, want)
    if kind == "err":
        return "raised 0x%02X" % got
    if got[0] != v["value"] or got[1] != len(buf):
        return "decoded %d using %d bytes" % (got[0], got[1])
    out = bytearray()
    wire.put_varint(out, v["value"])
    if bytes(out) != buf:
        return "put_varint gives %d bytes that differ" % len(out)
    if wire.varint_len(v["value"]) != len(buf):
        return "varint_len says %d" % wire.varint_len(v["value"])
    return None


def check_string(v):
    buf = vector_bytes(v)
    want = reason_of(v)
    kind, got = _outcome(lambda: wire.get_str(buf, 0, len(buf)))
    if want is not None:
        if kind == "ok":
            return "no error"
        return None if got == want else "reason 0x%02X, want 0x%02X" % (got, want)
    if kind == "err":
        return "raised 0x%02X" % got
    s = "".join([chr(c) for c in v["codepoints"]])
    if got[0] != s or got[1] != len(buf):
        return "decoded %d characters using %d bytes" % (len(got[0]), got[1])
    out = bytearray()
    wire.put_str(out, s)
    if bytes(out) != buf:
        return "put_str gives different bytes"
    return None


def check_frame(v):
    buf = vector_bytes(v)
    want = reason_of(v)
    limit = v.get("max_size", NO_LIMIT)
    kind, got = _outcome(lambda: K.frame(buf, 0, len(buf), limit))
    if want is not None:
        if kind == "ok":
            return "no error, got %s" % (got,)
        return None if got == want else "reason 0x%02X, want 0x%02X" % (got, want)
    if kind == "err":
        return "raised 0x%02X" % got
    if v.get("incomplete"):
        return None if got is None else "got %d,%d, want incomplete" % got
    if got is None:
        return "incomplete, want %d,%d" % tuple(v["header"])
    if list(got) != v["header"]:
        return "got %d,%d" % got
    return None


def check_topic(v):
    fn = getattr(T, v["func"])
    got = fn(*v["args"])
    want = v["expected"]
    if isinstance(want, list):
        got = list(got)
    if got != want:
        return "got %s" % (got,)
    return None


def check(v):
    k = v.get("kind", "packet")
    if k == "packet":
        return check_packet(v)
    if k == "varint":
        return check_varint(v)
    if k == "string":
        return check_string(v)
    if k == "frame":
        return check_frame(v)
    if k == "topic":
        return check_topic(v)
    return "unknown kind " + k


def result_line(v):
    try:
        d = check(v)
    except Exception as e:  # a crash in the codec is a finding, not a runner error
        d = "raised %s" % type(e).__name__
    return v["name"] + (" OK" if d is None else " FAIL " + d)


def run(vdir, out=None):
    # Checks every vector, one file at a time; returns the lines (or hands
    # each to out, e.g. print) and whether all passed.
    lines = []
    ok = True
    for p in vector_files(vdir):
        for v in load_file(p):
            line = result_line(v)
            if not line.endswith(" OK"):
                ok = False
            if out is None:
                lines.append(line)
            else:
                out(line)
        if _MICROPYTHON:
            gc.collect()
    return lines, ok


if __name__ == "__main__":
    _lines, _ok = run(sys.argv[1] if len(sys.argv) > 1 else "host_tests/vectors", print)
    sys.exit(0 if _ok else 1)
