#!/usr/bin/env python3
"""Network fuzzer for the broker, run under CPython against the real broker
on the board twin, with a board's shipped defaults (persistence on,
anonymous clients refused, the connection-rate limit on) at its heap.

    .venv/bin/python tools/fuzz/fuzz.py                     # starts its own broker, 60 s
    .venv/bin/python tools/fuzz/fuzz.py --seed 42 --cases 20000 --seconds 600
    .venv/bin/python tools/fuzz/fuzz.py --port 1883 --user u --password p   # a broker already running
    .venv/bin/python tools/fuzz/fuzz.py --seed 42 --only 1234 --show   # one case, as hex

What it sends, one TCP connection per case, from many loopback source
addresses (127.77.x.y, so the connection-rate limit and its bounded table
see an address flood without refusing the fuzzer):

  random      random bytes, with or without a valid CONNECT first
  valid       a valid CONNECT and a few valid packets of any type (both
              versions), the baseline
  mutated     a valid packet of any type and either version, mutated: bit
              flips, interesting bytes, truncation, junk appended, the
              remaining length lying (shorter, longer, huge, 5 bytes), two
              packets spliced
  utf8        invalid UTF-8, U+0000 and surrogates in every string field
  topics      wildcards and $share abuse in PUBLISH/SUBSCRIBE/UNSUBSCRIBE
              topics, reserved subscription options, too long, too deep
  props       v5 property abuse: duplicates, ids not allowed in the packet,
              unknown ids, lengths that lie, out-of-range values
  protocol    packets out of order: before CONNECT, a second CONNECT, acks
              for unknown ids, QoS 2 id reuse, server-only packets
  big         packets around and over max_packet_size, and claims of huge
              ones that never arrive
Cases that need a session log in as the test user; a few log in with a
wrong password or none. Each case is sent whole, in random chunks, or followed by a half-close,
and the answer is read for a moment; answers that our codec cannot decode
are findings. Alongside: slow-drip (slowloris) clients that send CONNECT one
byte per second, and a burst of idle half-open sockets; all must be closed
by the broker within connect_timeout.

While it runs, a normal subscriber (persistent v5 session, QoS 1) and a
normal publisher (3.1.1, QoS 1, one message a second) stay connected. At
the end it checks: the broker is alive; no traceback and no internal
error in its log; every tick reached the subscriber over its original
connection; the session survives a reconnect (session present, subscription
delivers); a new client connects; the heap ($SYS/broker/heap/used) is back
within a margin of its baseline (when it is not, the warm-up's cases run
again, and it must not grow further nor stay over twice the margin: the
broker's tables are bounded, so only a leak keeps growing), the session table is empty again, and,
once the broker has stopped, its store holds no record (check_store()).

A crash or an internal error is reproduced case by case on a fresh broker
and the guilty case minimized (delta debugging); findings print the case
bytes as hex. Every case is regenerated from (seed, index), so
`--seed S --only N` replays one. Exit status: 0 clean, 1 findings.
"""
import argparse
import os
import random
import re
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
for p in (os.path.join(REPO, "lib"), os.path.join(REPO, "host_tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from mqtt.errors import MQTTError  # noqa: E402
from framer import Framer  # noqa: E402
import mqtt.packets as K  # noqa: E402
from brokerproc import TEST_PASSWORD, TEST_USER  # noqa: E402

# The login of the fuzzer's clients: the test user every BrokerProc knows
# (the broker runs with its board's shipped defaults: anonymous clients
# refused). main() sets these for a broker run elsewhere (--user).
USER = TEST_USER
PASSWORD = TEST_PASSWORD.encode()
# The broker's config besides its board's shipped defaults (persistence
# on, anonymous clients refused, the connection-rate limit on): $SYS every
# second, so that the heap and session checks read current values.
CONFIG = {"sys_interval": 1}

KINDS = ("random", "valid", "mutated", "utf8", "topics", "props", "protocol", "big")
WEIGHTS = (8, 10, 30, 10, 12, 14, 10, 6)

# ---------------------------------------------------------------- wire


def vbi(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def u16(n):
    return bytes(((n >> 8) & 0xFF, n & 0xFF))


def u32(n):
    return bytes(((n >> 24) & 0xFF, (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF))


def s(x):
    if isinstance(x, str):
        x = x.encode("utf-8", "surrogatepass")
    return u16(len(x) & 0xFFFF) + x


def pkt(first, body):
    return bytes((first,)) + vbi(len(body)) + body


def props(items):
    """items: list of (id, raw value bytes); None -> no properties."""
    body = b"".join(vbi(i) + v for i, v in items)
    return vbi(len(body)) + body


# Property id -> (wire type, packets where it belongs).
PROP = {
    0x01: ("byte", "P W"), 0x02: ("u32", "P W"), 0x03: ("str", "P W"), 0x08: ("str", "P W"),
    0x09: ("bin", "P W"), 0x0B: ("vbi", "P S"), 0x11: ("u32", "C A D"), 0x12: ("str", "A"),
    0x13: ("u16", "A"), 0x15: ("str", "C A U"), 0x16: ("bin", "C A U"), 0x17: ("byte", "C"),
    0x18: ("u32", "W"), 0x19: ("byte", "C"), 0x1A: ("str", "A"), 0x1C: ("str", "A D"),
    0x1F: ("str", "A K S D U"), 0x21: ("u16", "C A"), 0x22: ("u16", "C A"), 0x23: ("u16", "P"),
    0x24: ("byte", "A"), 0x25: ("byte", "A"), 0x26: ("pair", "*"), 0x27: ("u32", "C A"),
    0x28: ("byte", "A"), 0x29: ("byte", "A"), 0x2A: ("byte", "A"),
}

BAD_UTF8 = [b"\xc0\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xff", b"\xfe\xff", b"\xf4\x90\x80\x80",
            b"\xe0\x80\xaf", b"\xc3", b"\x80", b"a\x00b", b"\x00", b"\xf0\x9f\x98", b"\xef\xbf\xbe"]

TOPICS = ["a", "a/b", "fz/t", "fz/x/y", "sensors/t1", "/", "//", "/a", "a/", "a//b", "\u00fc/\u20ac",
          "$SYS/broker/uptime", "$SYS", "$SYS/x", "$foo/bar", "$", "$share/g/a", " ", "a b/c",
          "x" * 300, "/".join(["l"] * 40), "fz/" + "z" * 250]
BAD_TOPICS = ["", "+", "#", "a/+", "a/#", "+/a", "a+", "#a", "a/#/b", "fz/\x00", "$share/g/#"]
FILTERS = ["#", "+", "a/#", "a/+/c", "+/+", "/#", "fz/#", "$SYS/#", "$SYS/broker/+", "$share/g/a",
           "$share/g/#", "$share/g/+/x", "$share/g/$SYS/#", "$share//a", "$share/g", "$share/g/",
           "$share/+/a", "$share/#/a", "$share/g+/a", "$share", "$share/", "$share/g/a/#", "a/#/b",
           "a+", "#/a", "++", "", "a//#", "\u00fc/#", "x" * 300, "/".join(["+"] * 40), "$foo/#",
           "$share/" + "g" * 200 + "/a"]


def rand_str(rng, n=None):
    n = rng.randrange(0, 12) if n is None else n
    return "".join(rng.choice("abcxyz019/-_ $+#\u00e9") for _ in range(n))


def prop_value(rng, kind, wild=False):
    if kind == "byte":
        return bytes((rng.choice((0, 1, 2, 255) if wild else (0, 1)),))
    if kind == "u16":
        return u16(rng.choice((0, 1, 2, 10, 65535) if wild else (1, 2, 5)))
    if kind == "u32":
        return u32(rng.choice((0, 1, 60, 0xFFFFFFFF, 0x7FFFFFFF) if wild else (5, 60, 300)))
    if kind == "vbi":
        return vbi(rng.choice((0, 1, 268435455, 268435456, 127, 128) if wild else (1, 7)))
    if kind == "str":
        return s(rng.choice(BAD_UTF8) if wild and rng.random() < 0.4 else rand_str(rng))
    if kind == "bin":
        return s(os.urandom(0) + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))))
    # pair
    if wild and rng.random() < 0.3:
        return s(rng.choice(BAD_UTF8)) + s("v")
    return s(rand_str(rng)) + s(rand_str(rng, rng.randrange(0, 60)))


def valid_props(rng, letter, n=None):
    ids = [i for i, (_, where) in PROP.items() if letter in where.split() or where == "*"]
    # Never ask for what the broker refuses outright.
    ids = [i for i in ids if i not in (0x15, 0x16)]
    if letter == "P":
        ids = [i for i in ids if i not in (0x0B, 0x23)]
    out = []
    seen = set()
    for _ in range(rng.randrange(0, 4) if n is None else n):
        i = rng.choice(ids)
        if i in seen and i != 0x26:
            continue
        seen.add(i)
        out.append((i, prop_value(rng, PROP[i][0])))
    return out


# ---------------------------------------------------------------- packets


def connect(version=4, cid="fz", clean=True, keepalive=60, user=None, pw=None, will=None, pr=None,
            name="MQTT", flags_extra=0):
    f = (0x02 if clean else 0) | flags_extra
    body_p = b""
    if will is not None:
        wt, wp, wq, wr, wpr = will
        f |= 0x04 | (wq << 3) | (0x20 if wr else 0)
        body_p = (props(wpr or []) if version == 5 else b"") + s(wt) + s(wp)
    if user is not None:
        f |= 0x80
    if pw is not None:
        f |= 0x40
    vh = s(name) + bytes((version, f)) + u16(keepalive) + (props(pr or []) if version == 5 else b"")
    pl = s(cid) + body_p + (s(user) if user is not None else b"") + (s(pw) if pw is not None else b"")
    return pkt(0x10, vh + pl)


def publish(version, topic, payload=b"", qos=0, retain=False, dup=False, pid=1, pr=None):
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = s(topic) + (u16(pid) if qos else b"") + (props(pr or []) if version == 5 else b"") + payload
    return pkt(first, body)


def subscribe(version, pid, subs, pr=None):
    body = u16(pid) + (props(pr or []) if version == 5 else b"")
    for f, o in subs:
        body += s(f) + bytes((o,))
    return pkt(0x82, body)


def unsubscribe(version, pid, filters, pr=None):
    body = u16(pid) + (props(pr or []) if version == 5 else b"")
    for f in filters:
        body += s(f)
    return pkt(0xA2, body)


def ack(t, version, pid, reason=None, pr=None):
    first = (t << 4) | (2 if t == 6 else 0)
    body = u16(pid)
    if version == 5 and (reason is not None or pr is not None):
        body += bytes((reason or 0,))
        if pr is not None:
            body += props(pr)
    return pkt(first, body)


def disconnect(version, reason=None, pr=None):
    if version == 5 and (reason is not None or pr is not None):
        return pkt(0xE0, bytes((reason or 0,)) + (props(pr) if pr is not None else b""))
    return b"\xe0\x00"


def auth(reason=0, pr=None):
    return pkt(0xF0, bytes((reason,)) + props(pr or []))


def creds(rng):
    """(user, password) of a case's CONNECT: the test user's mostly, so
    that the case gets a session; now and then none (refused as
    anonymous) or a wrong one, so that refusals and the login throttle are
    fuzzed too."""
    r = rng.random()
    if r < 0.04:
        return None, None
    if r < 0.07:
        return USER, b"wrong"
    if r < 0.08:
        return "nobody", PASSWORD
    return USER, PASSWORD


def good_connect(rng, version, persistent_ok=False):
    # Client ids from a small pool, so sessions are reused, not piled up.
    cid = "fz%d" % rng.randrange(8)
    user, pw = creds(rng)
    pr = valid_props(rng, "C") if version == 5 else None
    if pr is not None:
        pr = [(i, v) for i, v in pr if i != 0x11 or persistent_ok]
        if rng.random() < 0.3:
            pr.append((0x22, u16(rng.choice((0, 2, 10)))))  # topic alias maximum
    will = None
    if rng.random() < 0.2:
        will = ("fz/will/%d" % rng.randrange(4), b"bye", rng.randrange(3), rng.random() < 0.2,
                valid_props(rng, "W") if version == 5 else None)
    return connect(version, cid, clean=not persistent_ok or rng.random() < 0.7,
                   keepalive=rng.choice((0, 5, 60, 65535)), user=user, pw=pw, will=will, pr=pr)


def valid_packet(rng, version, allow_server=False):
    t = rng.choice(("pub0", "pub1", "pub2", "sub", "unsub", "ping", "puback", "pubrec", "pubrel",
                    "pubcomp", "disc") + (("auth", "connack", "suback", "unsuback", "pingresp")
                                          if allow_server else ()))
    pid = rng.choice((1, 2, 7, 65535, rng.randrange(1, 65536)))
    if t.startswith("pub") and t[3:].isdigit():
        q = int(t[3:])
        pr = valid_props(rng, "P") if version == 5 else None
        return publish(version, rng.choice(TOPICS), bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))),
                       q, rng.random() < 0.15, q > 0 and rng.random() < 0.1, pid, pr)
    if t == "sub":
        n = rng.randrange(1, 4)
        return subscribe(version, pid, [(rng.choice(FILTERS[:12]), rng.randrange(3) |
                                         (rng.choice((0, 0x04, 0x08, 0x10, 0x20)) if version == 5 else 0))
                                        for _ in range(n)],
                         ([(0x0B, vbi(rng.randrange(1, 100)))] if version == 5 and rng.random() < 0.3 else None))
    if t == "unsub":
        return unsubscribe(version, pid, [rng.choice(FILTERS[:12]) for _ in range(rng.randrange(1, 4))])
    if t == "ping":
        return b"\xc0\x00"
    if t in ("puback", "pubrec", "pubrel", "pubcomp"):
        code = {"puback": 4, "pubrec": 5, "pubrel": 6, "pubcomp": 7}[t]
        return ack(code, version, pid, rng.choice((None, 0, 0x10, 0x80, 0x92)) if version == 5 else None)
    if t == "disc":
        return disconnect(version, rng.choice((None, 0, 4)) if version == 5 else None)
    if t == "auth":
        return auth(rng.choice((0, 0x18, 0x19)), [(0x15, s("SCRAM"))])
    if t == "connack":
        return b"\x20\x02\x00\x00"
    if t == "suback":
        return pkt(0x90, u16(pid) + b"\x00")
    if t == "unsuback":
        return pkt(0xB0, u16(pid))
    return b"\xd0\x00"


# ---------------------------------------------------------------- mutation


def mutate(rng, data):
    b = bytearray(data)
    op = rng.choice(("flip", "flip", "byte", "truncate", "append", "len_short", "len_long", "len_huge",
                     "len5", "splice", "insert", "delete", "dup"))
    if not b:
        return bytes(rng.randrange(256) for _ in range(4)), op
    if op == "flip":
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == "byte":
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01, 0x10, 0xC0, 0x23))
    elif op == "truncate":
        b = b[: rng.randrange(len(b))]
    elif op == "append":
        b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    elif op == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    elif op == "delete":
        i = rng.randrange(len(b))
        del b[i : i + rng.randrange(1, 8)]
    elif op == "dup":
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randrange(1, 16))
        b[j:j] = b[i:j]
    elif op in ("len_short", "len_long", "len_huge", "len5"):
        # Rewrite the remaining length of the first packet.
        n, i = 0, 1
        while i < len(b) and i < 5:
            i += 1
            if not b[i - 1] & 0x80:
                break
        body = bytes(b[i:])
        real = len(body)
        if op == "len_short":
            lie = vbi(max(0, real - rng.randrange(1, 6)))
        elif op == "len_long":
            lie = vbi(real + rng.choice((1, 2, 10, 200, 5000)))
        elif op == "len_huge":
            lie = rng.choice((b"\xff\xff\xff\x7f", b"\x80\x80\x80\x01", vbi(268435455), vbi(9000),
                              vbi(70000)))
        else:
            lie = rng.choice((b"\xff\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x00", b"\xff\xff\xff\xff"))
        b = bytearray(b[:1]) + lie + body
    else:  # splice: the head of this packet, the tail of a copy shifted
        i = rng.randrange(len(b))
        j = rng.randrange(len(b))
        b = b[:i] + b[j:]
    return bytes(b), op


# ---------------------------------------------------------------- cases


class Case:
    __slots__ = ("seed", "index", "kind", "version", "prefix", "data", "mode", "chunks", "detail",
                 "clean_prefix")

    def __init__(self, index, kind, version, prefix, data, mode, chunks, detail, clean_prefix):
        self.index = index
        self.kind = kind
        self.version = version
        self.prefix = prefix  # a valid CONNECT, or b""
        self.data = data  # the fuzzed bytes
        self.mode = mode  # close | wait | halfclose
        self.chunks = chunks  # 0: one send; else the number of pieces
        self.detail = detail
        self.clean_prefix = clean_prefix  # the broker's answers should decode

    def bytes(self):
        return self.prefix + self.data

    def describe(self):
        return "seed %s case %d (%s, v%d, %s, %s%s): %s" % (
            self.seed, self.index, self.kind, self.version, self.detail, self.mode,
            ", %d chunks" % self.chunks if self.chunks else "", self.bytes().hex())


def _persistent_connect(data):
    """True when data starts with a CONNECT that keeps a session beyond the
    connection under a client id outside the fuzzer's pool; such CONNECTs
    are re-rolled, so fuzzing does not fill the session table for good."""
    try:
        f = Framer()
        f.feed(data)
        r = f.next_raw()
        if r is None or r[0] != 0x10:
            return False
        first, body = r
        p = K.decode(first, body, 0, len(body), 4)
    except (MQTTError, Exception):
        return False
    if re.fullmatch(r"fz\d", p.client_id or ""):
        return False
    if p.version == 5:
        return bool((p.props or {}).get(0x11))
    return not p.clean


def retained_topics(data):
    """The topics a case's bytes may leave a retained message on (retained
    PUBLISHes, wills with retain), as our codec, the broker's, reads them.
    The cleanup clears them by name: no filter reaches a topic that
    starts with '$', and mutations make such topics."""
    out = set()
    f = Framer()
    f.feed(data)
    version = 4
    while True:
        try:
            r = f.next_raw()
        except MQTTError:
            return out  # the broker stops reading there too
        if r is None:
            return out
        first, body = r
        try:
            if first >> 4 == 1:
                p = K.decode(first, body, 0, len(body), 4)
                version = 5 if p.version == 5 else 4
                if p.will_topic and p.will_retain:
                    out.add(p.will_topic)
            elif first >> 4 == 3 and first & 1:
                out.add(K.decode_publish(first, body, 0, len(body), version)[0])
        except Exception:
            pass  # not a packet the broker would take either


def make_case(seed, index):
    rng = random.Random("%s:%d" % (seed, index))
    for _ in range(20):
        c = _make_case(rng, index)
        if not _persistent_connect(c.bytes()):
            break
    c.seed = seed
    return c


def _make_case(rng, index):
    kind = rng.choices(KINDS, WEIGHTS)[0]
    v = rng.choice((4, 5))
    # A fifth of the cases keep a session (pool ids only: cleaned up later).
    prefix = good_connect(rng, v, persistent_ok=rng.random() < 0.2)
    clean_prefix = True
    detail = ""
    if kind == "random":
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        if rng.random() < 0.3:
            data = bytes((rng.choice((0x10, 0x30, 0x82, 0xE0, 0xC0)),)) + data
        if rng.random() < 0.5:
            prefix = b""
    elif kind == "valid":
        data = b"".join(valid_packet(rng, v) for _ in range(rng.randrange(1, 6)))
    elif kind == "mutated":
        target = rng.random()
        if target < 0.3:
            # The CONNECT itself.
            pr = valid_props(rng, "C", 3) if v == 5 else None
            will = ("fz/w", b"w", 1, False, valid_props(rng, "W", 2) if v == 5 else None) \
                if rng.random() < 0.5 else None
            user, pw = creds(rng) if rng.random() < 0.7 else ("u" if rng.random() < 0.5 else None,
                                                               b"p" if rng.random() < 0.5 else None)
            base = connect(v, "fz%d" % rng.randrange(8), True, 30, user, pw, will, pr)
            prefix = b""
            clean_prefix = False
        else:
            base = valid_packet(rng, v, allow_server=True)
        data = base
        ops = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            data, op = mutate(rng, data)
            ops.append(op)
        detail = "+".join(ops)
        if rng.random() < 0.3:
            data += valid_packet(rng, v)  # does the stream recover or close?
    elif kind == "utf8":
        bad = rng.choice(BAD_UTF8)
        where = rng.choice(("cid", "user", "will", "pub", "sub", "unsub", "prop", "userprop", "pfi"))
        detail = where + ":" + bad.hex()
        data = b""
        if where == "cid":
            prefix, data = b"", connect(v, bad, user=USER, pw=PASSWORD)
            clean_prefix = False
        elif where == "user":
            prefix, data = b"", connect(v, "fz0", user=bad, pw=b"x")
            clean_prefix = False
        elif where == "will":
            prefix, data = b"", connect(v, "fz1", will=(b"fz/" + bad, b"x", 0, False, None), user=USER,
                                        pw=PASSWORD)
            clean_prefix = False
        elif where == "pub":
            data = publish(v, b"fz/" + bad, b"x", rng.randrange(3))
        elif where == "sub":
            data = subscribe(v, 3, [(b"fz/" + bad, 0)])
        elif where == "unsub":
            data = unsubscribe(v, 3, [b"fz/" + bad])
        elif where == "prop" and v == 5:
            data = publish(v, "fz/t", b"x", 1, pr=[(rng.choice((0x03, 0x08, 0x1F)), s(bad))])
        elif where == "userprop" and v == 5:
            data = subscribe(v, 3, [("fz/#", 0)], [(0x26, s(bad) + s("v"))])
        elif where == "pfi" and v == 5:
            data = publish(v, "fz/t", bad, 1, pr=[(0x01, b"\x01")])
        else:
            data = publish(v, b"fz/" + bad, b"x", 0)
    elif kind == "topics":
        op = rng.choice(("pub", "pub_bad", "sub", "sub_many", "sub_opts", "unsub", "sub_qos3"))
        detail = op
        if op == "pub":
            data = publish(v, rng.choice(TOPICS), b"t", rng.randrange(3), rng.random() < 0.3, pid=9)
        elif op == "pub_bad":
            data = publish(v, rng.choice(BAD_TOPICS + FILTERS), b"t", rng.randrange(3), pid=9)
        elif op == "sub":
            data = subscribe(v, 5, [(rng.choice(FILTERS), rng.randrange(3)) for _ in range(rng.randrange(1, 5))])
        elif op == "sub_many":
            data = subscribe(v, 5, [(rng.choice(FILTERS), 1) for _ in range(rng.choice((17, 40, 100)))])
        elif op == "sub_opts":
            data = subscribe(v, 5, [(rng.choice(FILTERS), rng.randrange(256))])
        elif op == "sub_qos3":
            data = subscribe(v, 5, [("fz/#", 3)])
        else:
            data = unsubscribe(v, 5, [rng.choice(FILTERS) for _ in range(rng.randrange(0, 5))])
        if rng.random() < 0.3:
            data += publish(v, "fz/t", b"after", 1, pid=10)
    elif kind == "props":
        v = 5
        prefix = good_connect(rng, 5)
        letter, build = rng.choice((
            ("P", lambda pr: publish(5, "fz/p", b"x", rng.randrange(3), rng.random() < 0.2, pid=4, pr=pr)),
            ("S", lambda pr: subscribe(5, 4, [("fz/#", 1)], pr)),
            ("U", lambda pr: unsubscribe(5, 4, ["fz/#"], pr)),
            ("K", lambda pr: ack(rng.choice((4, 5, 6, 7)), 5, 4, 0, pr)),
            ("D", lambda pr: disconnect(5, 0, pr)),
            ("C", None), ("W", None),
        ))
        op = rng.choice(("dup", "foreign", "unknown", "wild", "len_lie", "trunc", "many_user", "alias",
                         "subid"))
        detail = "%s:%s" % (letter, op)
        pr = valid_props(rng, letter, rng.randrange(0, 3))
        if op == "dup":
            i = rng.choice(list(PROP))
            pr += [(i, prop_value(rng, PROP[i][0]))] * 2
        elif op == "foreign":
            i = rng.choice(list(PROP))
            pr.append((i, prop_value(rng, PROP[i][0], True)))
        elif op == "unknown":
            pr.append((rng.choice((0x00, 0x04, 0x7F, 0x80, 0x2B, 0x3FFF)), b"\x00\x01a"))
        elif op == "wild":
            i = rng.choice(list(PROP))
            pr.append((i, prop_value(rng, PROP[i][0], True)))
        elif op == "many_user":
            pr += [(0x26, s("k" * rng.randrange(0, 200)) + s("v" * rng.randrange(0, 200)))
                   for _ in range(rng.choice((10, 50)))]
        elif op == "alias":
            pr = [(0x23, u16(rng.choice((0, 1, 2, 11, 65535))))]
        elif op == "subid":
            pr = [(0x0B, rng.choice((vbi(0), vbi(268435455), b"\xff\xff\xff\xff\x7f", vbi(5))))]
        if letter in ("C", "W"):
            body = connect(5, "fz%d" % rng.randrange(8), True, 30, USER, PASSWORD,
                           will=("fz/w", b"w", 0, False, pr) if letter == "W" else None,
                           pr=pr if letter == "C" else valid_props(rng, "C", 1))
            prefix, data = b"", body
            clean_prefix = False
        else:
            data = build(pr)
            if op == "alias" and letter == "P":
                # An alias-only publish (empty topic) too.
                data += publish(5, "", b"by alias", 0, pr=pr)
        if op == "len_lie":
            # A property length that claims more or less than is there.
            data = _lie_props(rng, data)
        elif op == "trunc":
            data = data[: max(2, len(data) - rng.randrange(1, 4))]
    elif kind == "protocol":
        op = rng.choice(("before_connect", "second_connect", "unknown_acks", "qos2_reuse", "pid0",
                         "server_only", "will_bad", "bad_proto", "reserved_flag", "disconnect_expiry",
                         "alias_unknown", "empty_topic", "ping_body", "v3"))
        detail = op
        data = b""
        if op == "before_connect":
            prefix = b""
            data = valid_packet(rng, v, True)
        elif op == "second_connect":
            data = good_connect(rng, v)
        elif op == "unknown_acks":
            data = b"".join(ack(rng.choice((4, 5, 6, 7)), v, rng.randrange(1, 65536)) for _ in range(5))
        elif op == "qos2_reuse":
            data = b"".join(publish(v, "fz/q2", b"%d" % i, 2, pid=77) for i in range(rng.randrange(2, 30)))
            if rng.random() < 0.5:
                data += ack(6, v, 77)
        elif op == "pid0":
            data = rng.choice((publish(v, "fz/t", b"x", 1, pid=0), subscribe(v, 0, [("fz/#", 0)]),
                               unsubscribe(v, 0, ["fz/#"]), ack(4, v, 0)))
        elif op == "server_only":
            data = rng.choice((b"\x20\x02\x00\x00", b"\x90\x03\x00\x01\x00", b"\xb0\x02\x00\x01", b"\xd0\x00",
                               b"\x00\x00", b"\x0f\x00"))
        elif op == "will_bad":
            prefix = b""
            clean_prefix = False
            f = rng.choice((0x04 | 0x18, 0x20, 0x08, 0x01 | 0x02))  # will QoS 3, retain w/o will, QoS w/o will, reserved
            data = connect(v, "fz2", flags_extra=f & ~0x04, will=("fz/w", b"x", 0, False, None) if f & 0x04 else None,
                           user=USER, pw=PASSWORD)
        elif op == "bad_proto":
            prefix = b""
            clean_prefix = False
            data = connect(rng.choice((0, 2, 3, 6, 255)), "fz3", name=rng.choice(("MQTT", "MQIsdp", "MQTX", "")),
                           user=USER, pw=PASSWORD)
        elif op == "reserved_flag":
            prefix = b""
            clean_prefix = False
            data = connect(v, "fz3", flags_extra=0x01, user=USER, pw=PASSWORD)
        elif op == "disconnect_expiry" and v == 5:
            data = disconnect(5, 0, [(0x11, u32(rng.choice((0, 60, 0xFFFFFFFF))))])
        elif op == "alias_unknown" and v == 5:
            data = publish(5, "", b"x", 1, pid=3, pr=[(0x23, u16(3))])
        elif op == "empty_topic":
            data = publish(v, "", b"x", rng.randrange(3), pid=3)
        elif op == "ping_body":
            data = b"\xc0\x01\x00"
        elif op == "v3":
            prefix = b""
            clean_prefix = False
            data = connect(3, "fz4", name="MQIsdp", user=USER, pw=PASSWORD)
        else:
            data = valid_packet(rng, v)
    else:  # big
        op = rng.choice(("near", "over", "claim", "many_small", "claim_then_close"))
        detail = op
        if op == "near":
            data = publish(v, "fz/big", bytes(rng.randrange(256) for _ in range(8100)), rng.randrange(3), pid=2)
        elif op == "over":
            data = publish(v, "fz/big", b"\xab" * rng.choice((8200, 20000, 70000)), 1, pid=2)
        elif op == "claim":
            data = b"\x32" + vbi(rng.choice((8000, 100000, 268435455))) + s("fz/big") + b"\x00\x01" + b"x" * 100
        elif op == "many_small":
            data = b"".join(publish(v, "fz/m", b"%d" % i, 0) for i in range(rng.choice((50, 200))))
        else:
            data = b"\x30" + vbi(5000) + s("fz/big") + b"y" * rng.randrange(10, 4000)
    mode = rng.choices(("close", "wait", "halfclose"), (3, 5, 2))[0]
    chunks = 0 if rng.random() < 0.75 else rng.randrange(2, 8)
    return Case(index, kind, v, prefix, data, mode, chunks, detail, clean_prefix and bool(prefix))


def _lie_props(rng, data):
    # Finds the property length after the variable header of a v5 packet
    # we built (PUBLISH: after topic/pid; others: after the pid) and bumps it.
    b = bytearray(data)
    i = 1
    while b[i] & 0x80:
        i += 1
    i += 1
    t = b[0] >> 4
    if t == 3:
        tl = (b[i] << 8) | b[i + 1]
        i += 2 + tl + (2 if b[0] & 0x06 else 0)
    elif t == 14:
        i += 1
    else:
        i += 2 + (1 if t in (4, 5, 6, 7) else 0)
    if i < len(b):
        b[i] = (b[i] + rng.choice((1, 2, 50, 127, -1 & 0xFF))) & 0x7F
    return bytes(b)


# ---------------------------------------------------------------- running cases

SRC_NET = "127.77"
N_SRC = 200


def source_for(index):
    i = index % N_SRC
    return "%s.%d.%d" % (SRC_NET, i // 250, 1 + i % 250)


def run_case(case, port, timeout=0.25, log=None):
    """Sends one case on a fresh connection. Returns (outcome, local addr
    'ip:port' or None, answer bytes)."""
    src = source_for(case.index)
    sk = socket.socket()
    sk.settimeout(2)
    try:
        sk.bind((src, 0))
        sk.connect(("127.0.0.1", port))
    except OSError as e:
        sk.close()
        return "connect-failed:%s" % e.__class__.__name__, None, b""
    me = "%s:%d" % sk.getsockname()[:2]
    if log is not None:
        log(me, case)
    got = bytearray()
    outcome = "sent"
    try:
        data = case.bytes()
        if case.chunks:
            rng = random.Random(case.index)
            cuts = sorted(rng.randrange(1, max(2, len(data))) for _ in range(case.chunks - 1))
            last = 0
            for c in cuts + [len(data)]:
                if c > last:
                    sk.sendall(data[last:c])
                    time.sleep(0.002)
                last = c
        else:
            sk.sendall(data)
        if case.mode == "halfclose":
            sk.shutdown(socket.SHUT_WR)
        if case.mode in ("wait", "halfclose"):
            end = time.time() + (timeout if case.mode == "wait" else 3 * timeout)
            sk.settimeout(0.05)
            while time.time() < end:
                try:
                    d = sk.recv(65536)
                except socket.timeout:
                    continue
                if not d:
                    outcome = "closed"
                    break
                got += d
    except (ConnectionResetError, BrokenPipeError):
        outcome = "reset"
    except OSError as e:
        outcome = "error:%s" % e.__class__.__name__
    finally:
        try:
            sk.close()
        except OSError:
            pass
    return outcome, me, bytes(got)


def check_answer(case, answer):
    """None, or why the broker's answer to a case is not valid MQTT."""
    if not case.clean_prefix or not answer:
        return None
    f = Framer()
    f.feed(answer)
    try:
        while True:
            r = f.next_raw()
            if r is None:
                return None
            first, body = r
            if first >> 4 in (1, 3, 8, 10, 12):
                # PUBLISH may come from another client: check only what the
                # broker says to this one.
                if first >> 4 != 3:
                    return "client-only packet type %d from the broker" % (first >> 4)
                continue
            K.decode(first, body, 0, len(body), case.version)
    except MQTTError as e:
        return "undecodable answer (%s): %s" % (e, answer.hex())


# ---------------------------------------------------------------- normal clients


class NormalClient:
    """A well-behaved client on its own thread: acknowledges QoS 1,
    answers nothing else, records what arrives."""

    def __init__(self, port, cid, version, clean=True, props=None, keepalive=20, src="127.0.0.1"):
        # Logs in as USER (normal clients, observers and the cleanup).
        self.port, self.cid, self.version = port, cid, version
        self.clean, self.conn_props, self.keepalive, self.src = clean, props, keepalive, src
        self.lock = threading.Lock()
        self.msgs = []
        self.acks = {}
        self.connack = None
        self.closed = False
        self.error = None
        self.pid = 0

    def start(self):
        self.sk = socket.socket()
        self.sk.settimeout(5)
        self.sk.bind((self.src, 0))
        self.sk.connect(("127.0.0.1", self.port))
        self.sk.sendall(connect(self.version, self.cid, self.clean, self.keepalive, USER, PASSWORD,
                                pr=self.conn_props))
        self.f = Framer()
        self.connack = self._read_one(5)
        if self.connack is None or self.connack[0] >> 4 != 2:
            raise ConnectionError("%s: no CONNACK: %r" % (self.cid, self.connack))
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()
        return self

    def session_present(self):
        return bool(self.connack[1][0] & 1)

    def _read_one(self, timeout):
        end = time.time() + timeout
        while time.time() < end:
            r = self.f.next_raw()
            if r is not None:
                return r[0], bytes(r[1])
            try:
                d = self.sk.recv(65536)
            except socket.timeout:
                continue
            if not d:
                return None
            self.f.feed(d)
        return None

    def _loop(self):
        last_ping = time.time()
        try:
            self.sk.settimeout(0.2)
            while not self.closed:
                r = self.f.next_raw()
                if r is None:
                    try:
                        d = self.sk.recv(65536)
                    except socket.timeout:
                        d = None
                    if d == b"":
                        if not self.closed:
                            self.error = "connection closed by the broker"
                        return
                    if d:
                        self.f.feed(d)
                    if time.time() - last_ping > self.keepalive / 2:
                        self.sk.sendall(b"\xc0\x00")
                        last_ping = time.time()
                    continue
                first, body = r[0], bytes(r[1])
                t = first >> 4
                if t == 3:
                    topic, pid, pr, off = K.decode_publish(first, body, 0, len(body), self.version)
                    with self.lock:
                        self.msgs.append((topic, body[off:]))
                    q = (first >> 1) & 3
                    if q == 1:
                        self.sk.sendall(b"\x40\x02" + u16(pid))
                    elif q == 2:
                        self.sk.sendall(b"\x50\x02" + u16(pid))
                elif t == 6:
                    self.sk.sendall(b"\x70\x02" + body[:2])
                elif t in (4, 5, 7, 9, 11):
                    pid = (body[0] << 8) | body[1]
                    if t == 5:
                        self.sk.sendall(b"\x62\x02" + body[:2])
                        continue
                    with self.lock:
                        self.acks[pid] = (t, body)
                elif t == 14:
                    self.error = "DISCONNECT from the broker: %s" % body.hex()
                    return
        except OSError as e:
            if not self.closed:
                self.error = "socket error: %r" % e

    def _wait_ack(self, pid, timeout):
        end = time.time() + timeout
        while time.time() < end:
            with self.lock:
                if pid in self.acks:
                    return self.acks.pop(pid)
            if self.error:
                return None
            time.sleep(0.01)
        return None

    def next_pid(self):
        self.pid = self.pid % 65535 + 1
        return self.pid

    def subscribe(self, flt, qos, timeout=5):
        pid = self.next_pid()
        self.sk.sendall(subscribe(self.version, pid, [(flt, qos)]))
        return self._wait_ack(pid, timeout)

    def publish(self, topic, payload, qos=1, timeout=5, retain=False):
        pid = self.next_pid()
        self.sk.sendall(publish(self.version, topic, payload, qos, retain, pid=pid))
        return self._wait_ack(pid, timeout) if qos else True

    def close(self, clean=True):
        self.closed = True
        try:
            if clean:
                self.sk.sendall(b"\xe0\x00")
            self.sk.close()
        except OSError:
            pass


def sys_value(port, name, timeout=3):
    try:
        c = NormalClient(port, "fz-sys-%d" % random.randrange(1 << 30), 5, src="127.0.0.4").start()
    except (OSError, ConnectionError):
        return None
    try:
        c.subscribe("$SYS/broker/" + name, 0)
        end = time.time() + timeout
        while time.time() < end:
            with c.lock:
                for t, p in c.msgs:
                    if t == "$SYS/broker/" + name:
                        return p.decode()
            time.sleep(0.02)
        return None
    finally:
        c.close()


COUNTS = ("clients/total", "clients/connected", "subscriptions/count", "retained messages/count")


def counts(port, settle=1.3, timeout=6):
    """The broker's session, subscription and retained counts ($SYS), not
    counting the observer itself. One client watches all four topics and
    keeps the latest value of each: the retained copy it gets on
    subscribing may be up to sys_interval old (and, read by separate
    clients, could count an earlier observer), so it waits until no value
    has changed for `settle` seconds, longer than sys_interval."""
    try:
        c = NormalClient(port, "fz-sys-%d" % random.randrange(1 << 30), 5, src="127.0.0.4").start()
    except (OSError, ConnectionError):
        return (None,) * len(COUNTS)
    try:
        c.subscribe("$SYS/broker/#", 0)
        names = ["$SYS/broker/" + n for n in COUNTS]
        last = None
        since = time.time()
        end = since + timeout
        while time.time() < end:
            with c.lock:
                got = dict((t, p) for t, p in c.msgs if t in names)
            cur = tuple(got.get(n) for n in names)
            if cur != last:
                last, since = cur, time.time()
            elif None not in cur and time.time() - since >= settle:
                break
            time.sleep(0.05)
    finally:
        c.close()
    if last is None or None in last:
        return (None,) * len(COUNTS)
    # The observer is one session, one connection and one subscription.
    own = (1, 1, 1, 0)
    return tuple(str(int(v) - o) for v, o in zip(last, own))


def heap_used(port, samples=3):
    """The lowest of a few readings of $SYS/broker/heap/used (collected
    after a gc.collect() by the broker every sys_interval)."""
    vals = []
    for i in range(samples):
        if i:
            time.sleep(1.05)  # the next collection
        v = sys_value(port, "heap/used")
        if v is not None:
            vals.append(int(v))
    return min(vals) if vals else None


# ---------------------------------------------------------------- slow clients


def slowloris(port, n, interval, results, stop):
    """n sockets that each drip a valid CONNECT one byte per interval. Each
    records how long after it connected the broker closed it (None:
    never). A connect may wait in a full listen backlog; the broker's
    connect_timeout counts from its accept, so the clock starts then."""
    socks = []
    data = [connect(4, "fz-slow-%d" % i, keepalive=30, user=USER, pw=PASSWORD) for i in range(n)]
    for i in range(n):
        try:
            sk = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.5", 0))
            sk.settimeout(0)
            socks.append([sk, 0, None, time.time()])
        except OSError:
            results.append(("slowloris", i, "refused at connect"))
    while not stop.is_set() and any(x[2] is None for x in socks):
        for i, x in enumerate(socks):
            sk, pos, done, t0 = x
            if done is not None:
                continue
            try:
                if sk.recv(1024) == b"":
                    x[2] = time.time() - t0
                    continue
            except BlockingIOError:
                pass
            except OSError:
                x[2] = time.time() - t0
                continue
            if pos < len(data[i]):
                try:
                    sk.send(data[i][pos:pos + 1])
                    x[1] = pos + 1
                except OSError:
                    x[2] = time.time() - t0
        stop.wait(interval)
    for i, (sk, pos, done, _) in enumerate(socks):
        results.append(("slowloris", i, done, pos))
        sk.close()


def half_open(port, n, hold, results, stop):
    """n sockets opened at once; some send one byte of a fixed header, some
    nothing, some half-close their side. Each records how long after it
    connected the broker closed it (see slowloris())."""
    socks = []
    for i in range(n):
        try:
            sk = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.6", 0))
        except OSError:
            results.append(("halfopen", i, "refused at connect"))
            continue
        if i % 3 == 1:
            sk.sendall(b"\x10")
        elif i % 3 == 2:
            sk.sendall(b"\x10\x20\x00")
        sk.settimeout(0)
        socks.append([sk, None, time.time()])
    end = time.time() + hold
    while time.time() < end and not stop.is_set() and any(x[1] is None for x in socks):
        for x in socks:
            if x[1] is not None:
                continue
            try:
                if x[0].recv(1024) == b"":
                    x[1] = time.time() - x[2]
            except BlockingIOError:
                pass
            except OSError:
                x[1] = time.time() - x[2]
        stop.wait(0.1)
    for i, (sk, done, _) in enumerate(socks):
        results.append(("halfopen", i, done))
        sk.close()


# ---------------------------------------------------------------- the run


class Report:
    def __init__(self, seed):
        self.seed = seed
        self.cases = 0
        self.by_seed = {}
        self.by_kind = {}
        self.outcomes = {}
        self.findings = []  # (what, detail, case or None)
        self.heap_base = None
        self.heap_end = None
        self.heap_again = None  # after the warm-up's cases once more (only when heap_end is high)
        self.counts_base = self.counts_end = None
        self.store_end = None  # keys left in the store (check_store)
        self.ticks = 0
        self.ticks_seen = 0
        self.slow = []
        self.elapsed = 0.0

    def add(self, what, detail, case=None):
        self.findings.append((what, detail, case))

    def text(self):
        out = ["fuzz: seed %s, %d cases in %.1f s" % (self.seed, self.cases, self.elapsed)]
        if len(self.by_seed) > 1:
            out.append("  by seed: " + ", ".join("%s %d" % kv for kv in self.by_seed.items()))
        out.append("  by kind: " + ", ".join("%s %d" % kv for kv in sorted(self.by_kind.items())))
        out.append("  outcomes: " + ", ".join("%s %d" % kv for kv in sorted(self.outcomes.items())))
        out.append("  normal publisher ticks %d, subscriber got %d" % (self.ticks, self.ticks_seen))
        out.append("  heap used: baseline %s, after %s" % (self.heap_base, self.heap_end)
                   + (", after the warm-up's cases again %s" % self.heap_again if self.heap_again else ""))
        out.append("  %s: baseline %s, after %s" % (", ".join(COUNTS), self.counts_base, self.counts_end))
        if self.store_end is not None:
            out.append("  store records: baseline 0, after %d" % len(self.store_end))
        for r in self.slow:
            out.append("  %s" % (r,))
        if not self.findings:
            out.append("  findings: none")
        for what, detail, case in self.findings:
            out.append("  FINDING %s: %s" % (what, detail))
            if case is not None:
                out.append("    " + case.describe())
        return "\n".join(out)


def _warm_up(port, seed, n, retained):
    # The seed's n warm-up cases (indices past the fuzzing's), then the
    # retained messages they may have left cleared; adds their topics to
    # the set retained.
    for i in range(n):
        c = make_case(seed, 10 ** 9 + i)
        retained |= retained_topics(c.bytes())
        run_case(c, port, 0.05)
    _cleanup(port, retained)


def fuzz(port, seed, seconds=60.0, cases=None, workers=4, broker=None, slow=True, connect_timeout=10,
         heap_margin=4096, start_index=0, progress=None, warmup=500):
    """Fuzzes the broker on port. seed: one seed, or a list of them run one
    after the other in one session (one warm-up, one baseline, one set of
    checks at the end); seconds: for each seed, or a list. cases: at most
    this many per seed. broker: a brokerproc.BrokerProc (for its log and
    liveness), or None for a broker run elsewhere. Returns a Report."""
    seeds = [seed] if isinstance(seed, str) else list(seed)
    secs = list(seconds) if isinstance(seconds, (list, tuple)) else [seconds] * len(seeds)
    rep = Report(", ".join(seeds))
    t_start = time.time()
    # Normal clients, from an address of their own.
    sub = NormalClient(port, "fz-normal-sub", 5, clean=True, props=[(0x11, u32(600))],
                       src="127.0.0.2").start()
    if sub.subscribe("fz-normal/#", 1) is None:
        rep.add("setup", "normal subscriber got no SUBACK")
        return rep
    pub = NormalClient(port, "fz-normal-pub", 4, src="127.0.0.2").start()
    pub_stop = threading.Event()
    pub_fail = []

    def publisher():
        i = 0
        while not pub_stop.is_set():
            t = time.time()
            a = pub.publish("fz-normal/tick", b"%d" % i, 1, timeout=5)
            if a is None:
                pub_fail.append((i, time.time() - t_start, pub.error))
                if pub.error:
                    return
            else:
                i += 1
                rep.ticks = i
            pub_stop.wait(max(0.0, 1.0 - (time.time() - t)))

    # Warm-up (buffers, pools, the rate table fill), then the baseline heap.
    retained = set()  # topics the cases may have left retained messages on
    _warm_up(port, seeds[0], warmup, retained)
    rep.heap_base = heap_used(port)
    rep.counts_base = counts(port)
    pt = threading.Thread(target=publisher, daemon=True)
    pt.start()

    peers = {}  # "ip:port" -> case
    plock = threading.Lock()

    def note(me, case):
        with plock:
            peers[me] = case

    # One phase per seed, each until its deadline (or `cases` cases).
    phases = []
    t = time.time()
    for sd, n in zip(seeds, secs):
        t += n
        phases.append([sd, t, start_index])
    limit = start_index + cases if cases else None
    recent = []  # the last cases started, suspects if the broker dies
    inflight = {}
    stop = threading.Event()

    def worker(w):
        while not stop.is_set():
            with plock:
                now = time.time()
                ph = None
                for p in phases:
                    if now < p[1] and (limit is None or p[2] < limit):
                        ph = p
                        break
                if ph is None:
                    return
                i = ph[2]
                ph[2] += 1
            c = make_case(ph[0], i)
            with plock:
                recent.append(c)
                del recent[: -3 * workers]
                rep.by_seed[c.seed] = rep.by_seed.get(c.seed, 0) + 1
            inflight[w] = c
            topics = retained_topics(c.bytes())
            outcome, me, ans = run_case(c, port, log=note)
            with plock:
                retained.update(topics)
                rep.cases += 1
                rep.by_kind[c.kind] = rep.by_kind.get(c.kind, 0) + 1
                o = outcome
                rep.outcomes[o] = rep.outcomes.get(o, 0) + 1
            bad = check_answer(c, ans)
            if bad:
                rep.add("invalid answer", bad, c)
            if broker is not None and not broker.alive():
                stop.set()
                return
            if progress and rep.cases % 1000 == 0:
                progress(rep)

    slow_stop = threading.Event()
    slow_threads = []
    if slow:
        # In the last stretch of the first seed's run: slowloris and
        # half-open sockets against the fuzzing and the normal clients, for
        # connect_timeout + a margin. (They fill the socket budget, so most
        # cases meanwhile are refused at accept: the other seeds run on.)
        lead = max(0.0, secs[0] - (connect_timeout + 4))

        def slow_phase():
            if stop.wait(lead):
                return
            a = threading.Thread(target=slowloris, args=(port, 3, 1.0, rep.slow, slow_stop), daemon=True)
            b = threading.Thread(target=half_open, args=(port, 12, connect_timeout + 5, rep.slow, slow_stop),
                                 daemon=True)
            a.start()
            b.start()
            a.join(connect_timeout + 8)
            b.join(connect_timeout + 8)

        st = threading.Thread(target=slow_phase, daemon=True)
        st.start()
        slow_threads.append(st)
    ws = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(workers)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    for st in slow_threads:
        st.join(connect_timeout + 12)
    slow_stop.set()
    rep.elapsed = time.time() - t_start

    # ---- afterwards
    if broker is not None and not broker.alive():
        rep.add("crash", "broker exited with %s; last log lines:\n%s" % (
            broker.proc.returncode, "\n".join(broker.log().splitlines()[-15:])))
        rep.suspects = list(inflight.values()) + [c for c in recent if c not in inflight.values()]
        pub_stop.set()
        return rep
    for kind, i, *rest in rep.slow:
        done = rest[0]
        if done is None or (isinstance(done, float) and done > connect_timeout + 3):
            rep.add("slow client not closed", "%s socket %d: closed after %s s (connect_timeout %d)"
                    % (kind, i, done, connect_timeout))
    pub_stop.set()
    pt.join(6)  # its last tick acknowledged
    if pub_fail:
        rep.add("normal publisher", "ticks without PUBACK: %s" % pub_fail[:5])
    if sub.error:
        rep.add("normal subscriber", sub.error)
    end = time.time() + 2
    while True:
        with sub.lock:
            got = set(int(p) for t, p in sub.msgs if t == "fz-normal/tick")
        if len(got) >= rep.ticks or time.time() > end:
            break
        time.sleep(0.05)
    rep.ticks_seen = len(got)
    missing = sorted(set(range(rep.ticks)) - got)
    if missing:
        rep.add("normal subscriber", "missed ticks %s of %d" % (missing[:20], rep.ticks))
    # The session survives a reconnect, and a new client gets in.
    sub.close(clean=True)
    pub.close()
    try:
        again = NormalClient(port, "fz-normal-sub", 5, clean=False, props=[(0x11, u32(600))],
                             src="127.0.0.2").start()
        if not again.session_present():
            rep.add("session", "persistent session gone after fuzzing (session present 0)")
        fresh = NormalClient(port, "fz-fresh", 4, src="127.0.0.3").start()
        fresh.publish("fz-normal/after", b"after", 1)
        end = time.time() + 3
        while time.time() < end and not any(t == "fz-normal/after" for t, _ in again.msgs):
            time.sleep(0.02)
        if not any(t == "fz-normal/after" for t, _ in again.msgs):
            rep.add("session", "the resumed session's subscription did not deliver")
        again.close()
        # End the session so the heap comparison is like for like.
        NormalClient(port, "fz-normal-sub", 5, src="127.0.0.2").start().close()
        fresh.close()
    except (OSError, ConnectionError) as e:
        rep.add("new client", "could not connect after fuzzing: %r" % e)
    _cleanup(port, retained)
    rep.heap_end = heap_used(port)
    rep.counts_end = counts(port)
    if rep.heap_end is None:
        rep.add("heap", "could not read $SYS/broker/heap/used after fuzzing")
    elif rep.heap_base is not None and rep.heap_end - rep.heap_base > heap_margin:
        # Bounded tables (the login throttle's and the rate limiter's 16
        # addresses, the buffer pools) may have reached a size the warm-up
        # did not give them, and stay there by design. A leak grows again
        # with more cases: run the warm-up's cases a second time and look.
        _warm_up(port, seeds[0], warmup, retained)
        rep.heap_again = heap_used(port)
        if (rep.heap_again is None or rep.heap_again - rep.heap_end > heap_margin // 4
                or rep.heap_again - rep.heap_base > 2 * heap_margin):
            rep.add("heap", "heap used grew from %d to %d (margin %d), and to %s after %d more cases" % (
                rep.heap_base, rep.heap_end, heap_margin, rep.heap_again, warmup))
    if broker is not None:
        log = broker.log()
        for what, c in log_findings(log, peers):
            rep.add(what, "", c) if c is not None else rep.add(what, "(no case matched)")
    return rep


def _cleanup(port, retained=()):
    """Ends the fuzzer's sessions (its client id pool) and clears the
    retained messages it left (those '#' reaches, and by name the topics
    in `retained`), so heap, sessions and store can be compared."""
    for i in range(8):
        for v in (5, 4):
            try:
                NormalClient(port, "fz%d" % i, v, src="127.0.0.3").start().close()
            except (OSError, ConnectionError):
                pass
    try:
        c = NormalClient(port, "fz-clean", 5, src="127.0.0.3").start()
        for f in ("#", "$foo/#", "$/#", "$SYS/#", "$"):
            c.subscribe(f, 0)
        time.sleep(0.4)
        with c.lock:
            topics = set(t for t, p in c.msgs if p)
        c.close()
        # Topics no filter reaches ($share/... names) are cleared by name.
        todo = sorted(topics | set(retained) | set(TOPICS) | set(FILTERS))
        if os.environ.get("FUZZ_DEBUG"):
            print("cleanup clears", todo)
        c = None
        for t in todo:
            if not t or "+" in t or "#" in t:
                continue
            if c is None or c.error:
                c = NormalClient(port, "fz-clean", 5, src="127.0.0.3").start()
            c.publish(t, b"", 1, timeout=2, retain=True)
        if c is not None:
            c.close()
    except (OSError, ConnectionError):
        pass


_LOG_BAD = re.compile(r"^(E .*|Traceback.*)$")
_PEER = re.compile(r"(%s\.\d+\.\d+:\d+)" % re.escape(SRC_NET))


def log_findings(log, peers):
    """(what, case or None) for each traceback and error line in the log.
    peers: "ip:port" -> the case sent from there."""
    out = []
    lines = log.splitlines()
    for n, line in enumerate(lines):
        if not _LOG_BAD.match(line):
            continue
        m = _PEER.search(line)
        c = None
        if m and m.group(1) in peers:
            c = peers[m.group(1)]
        if line.startswith("Traceback"):
            line = "\n".join(lines[n : n + 12])
        out.append(("log: " + line[:1000], c))
    return out


# ---------------------------------------------------------------- reproduce, minimize


def reproduces(data, board="esp32", heap=None, config=None, broker=None):
    """Sends data on one connection to a broker (a fresh one unless given)
    and tells whether it died or logged an error or a traceback."""
    from brokerproc import BrokerProc

    own = broker is None
    b = broker or BrokerProc(board=board, heap=heap, config=dict(config or {}, max_connection_rate=0)).start()
    try:
        before = len(b.log())
        c = Case(0, "repro", 4, b"", data, "halfclose", 0, "", False)
        run_case(c, b.port, 0.3)
        time.sleep(0.3)
        tail = b.log()[before:]
        return (not b.alive()) or bool(re.search(r"^(E |Traceback)", tail, re.M))
    finally:
        if own:
            b.stop()
            b.tmp.cleanup()


def minimize(data, test, budget=200):
    """Delta debugging over bytes: the shortest data found for which
    test(data) holds, within `budget` tries."""
    n = 2
    tries = 0
    while len(data) >= 2 and tries < budget:
        chunk = max(1, len(data) // n)
        reduced = False
        for i in range(0, len(data), chunk):
            cand = data[:i] + data[i + chunk:]
            tries += 1
            if cand and test(cand):
                data = cand
                n = max(n - 1, 2)
                reduced = True
                break
            if tries >= budget:
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(data), n * 2)
    return data


# ---------------------------------------------------------------- CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", default=None, help="seed (default: random, printed)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--board", default="esp32")
    ap.add_argument("--heap", default=None, help="heap size (default: the board profile's heap)")
    ap.add_argument("--port", type=int, default=None, help="fuzz a broker already running there")
    ap.add_argument("--no-persistence", action="store_true", help="turn off the board's persistence")
    ap.add_argument("--user", default=None, help="log in as this user (default: the test user)")
    ap.add_argument("--password", default=None)
    ap.add_argument("--no-slow", action="store_true", help="no slowloris / half-open phase")
    ap.add_argument("--only", type=int, default=None, help="just run (or --show) case N")
    ap.add_argument("--show", action="store_true", help="print the case(s) instead of sending")
    ap.add_argument("--minimize", action="store_true", help="on a crash or error, minimize the case")
    ap.add_argument("--keep-log", action="store_true", help="keep the broker's log even when all is well")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else str(random.randrange(1 << 32))
    print("fuzz: seed %s" % seed, flush=True)
    if a.only is not None and a.show:
        print(make_case(seed, a.only).describe())
        return 0
    global USER, PASSWORD
    if a.user is not None:
        USER = a.user
        PASSWORD = (a.password or "").encode()
    cfg = dict(CONFIG, persistence=False) if a.no_persistence else dict(CONFIG)
    broker = None
    rep = None
    port = a.port
    if port is None:
        from brokerproc import BrokerProc

        broker = BrokerProc(board=a.board, heap=a.heap, config=cfg).start()
        port = broker.port
        print("fuzz: broker on port %d, board %s, heap %s, log %s" % (port, a.board, broker.heap, broker.logpath))
    try:
        if a.only is not None:
            c = make_case(seed, a.only)
            print(c.describe())
            print(run_case(c, port, 0.5))
            if broker is not None:
                time.sleep(0.3)
                print("alive" if broker.alive() else "BROKER DIED")
            return 0
        rep = fuzz(port, seed, a.seconds, a.cases, a.workers, broker, slow=not a.no_slow,
                   progress=lambda r: print("fuzz: %d cases" % r.cases, flush=True))
        if broker is not None:
            check_store(rep, broker)
            investigate(rep, a.board, a.heap, cfg, a.minimize)
        print(rep.text())
        return 1 if rep.findings else 0
    finally:
        if broker is not None:
            broker.stop()
            if a.keep_log or (rep is not None and rep.findings) or not rep_ok_log(broker.log()):
                print("fuzz: broker log kept at %s" % keep_log(broker, seed))
            broker.tmp.cleanup()


def check_store(rep, broker):
    """Stops the broker and compares its store with the baseline, a fresh
    store: no records but the broker's clock ("c"). None of the fuzzer's
    sessions, queued messages or retained messages may be left on flash
    after the cleanup."""
    broker.stop()
    rep.store_end = [k for k in broker.store_keys() if k != "c"]
    if rep.store_end:
        rep.add("store", "records left on flash after the cleanup: %s" % rep.store_end[:20])


def keep_log(broker, seed):
    d = os.path.join(REPO, "build", "fuzz")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "broker-seed-%s.log" % seed)
    with open(path, "w") as f:
        f.write(broker.log())
    return path


def rep_ok_log(log):
    return not re.search(r"^(E |Traceback)", log, re.M)


def investigate(rep, board="esp32", heap=None, cfg=None, do_minimize=True, budget=150):
    """After a run: finds the case that crashed the broker (replaying the
    suspects one by one on fresh brokers) and minimizes it, or minimizes
    the cases behind error lines in the log. Adds what it finds to rep."""
    cfg = cfg or {"sys_interval": 1}
    if getattr(rep, "suspects", None):
        culprit = find_culprit(rep.suspects, board, heap, cfg)
        if culprit is None:
            rep.add("crash case", "none of the suspects %s reproduces alone"
                    % ["%s:%d" % (c.seed, c.index) for c in rep.suspects])
            return
        rep.add("crash case", "reproduces on a fresh broker", culprit)
        if do_minimize:
            m = minimize(culprit.bytes(), lambda d: reproduces(d, board, heap, cfg), budget)
            rep.add("crash minimized", m.hex())
        return
    if do_minimize:
        done = set()
        for what, detail, c in list(rep.findings):
            if c is not None and what.startswith("log:") and (c.seed, c.index) not in done:
                done.add((c.seed, c.index))
                if reproduces(c.bytes(), board, heap, cfg):
                    m = minimize(c.bytes(), lambda d: reproduces(d, board, heap, cfg), budget)
                    rep.add("minimized", "%s -> %s" % (what[:100], m.hex()))
                else:
                    rep.add("not reproduced alone", what[:100], c)


def find_culprit(suspects, board, heap, cfg):
    for c in suspects:
        if reproduces(c.bytes(), board, heap, cfg):
            return c
    return None


if __name__ == "__main__":
    sys.exit(main())
