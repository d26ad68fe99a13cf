# The dashboard: a page served at GET / on a websockets listener, and the
# state it shows, published as JSON on $SYS/broker/dashboard/state every
# 2 s while a client that may read it subscribes. See docs/dashboard.md.
#
# The page (www/dashboard.html) is an MQTT-over-WebSocket client of its
# own: it connects to /mqtt like any client, subscribes to $SYS/broker/#,
# and needs nothing else from the broker. Its bytes live in the generated
# module dashboard_page.py, gzip-compressed at build time by
# www/mkpage, and go out as they are with Content-Encoding: gzip, so the
# browser inflates them and the board never does. Only a client that
# says it refuses gzip gets the page inflated here, in 512-byte pieces.
#
# Why the lists (clients, subscriptions, retained topics) travel over MQTT
# and not as GET /api/state: the page already holds its WebSocket, so a
# state update costs one PUBLISH on it (the JSON, built into one bounded
# buffer, and its wire copy), and nothing at all while nobody watches. A
# polled GET would cost a socket per poll (Pico W has 5 TCP connections
# in all, ESP32 about 8), a 1 KB request-head buffer and a connection
# task each time, on top of the same JSON. And over MQTT the broker's
# logins and ACL decide who may read it (may_read()).
#
# Imported only when a websockets listener sees a plain GET / or the
# page's upgrade (/mqtt?dashboard).
import asyncio
import gc
import json
import sys
import time
from micropython import const
from broker import log
from broker.heap import unload
from broker.http import respond
from broker.message import Message
from broker.route import deliver

TOPIC = "$SYS/broker/dashboard/state"
_PERIOD_MS = const(2000)
_BUDGET = const(4096)  # JSON bytes at most (less on a short heap); long lists are cut short
_MAX_STR = const(64)  # client ids, filters and topics are cut to this
_PAGE = "broker.dashboard_page"

_task = None


# ------------------------------------------------------------ the page


def _gzip_ok(value):
    # Accept-Encoding: absent means anything goes (RFC 9110 12.5.3);
    # otherwise gzip, x-gzip or * with a q other than 0.
    if value is None:
        return True
    for item in value.split(","):
        parts = item.split(";")
        name = parts[0].strip().lower()
        if name not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for p in parts[1:]:
            p = p.strip()
            if p[:2] == "q=":
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        return q > 0
    return False


async def serve_page(t, req):
    # Answers one request for the page and returns; the caller closes t.
    method, _path, h, _extra = req
    if method != "GET" and method != "HEAD":
        await respond(t, 405, "Method Not Allowed", (("Allow", "GET, HEAD"), ("Connection", "close")))
        return
    gz = _gzip_ok(h.get("accept-encoding"))
    __import__(_PAGE)
    P = sys.modules[_PAGE]
    try:
        await _send_page(t, P, gz, method == "HEAD")
    finally:
        # The bytes are a constant of that module: in flash when frozen, in
        # the heap when loaded from a .mpy. Unloading it gives those back
        # between page views (a view then reads the .mpy again).
        P = None
        unload("dashboard_page")


async def _send_page(t, P, gz, head_only):
    body = P.GZ
    h = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "Content-Length: %d\r\n"
        "%s"
        "Vary: Accept-Encoding\r\n"
        "Cache-Control: no-cache\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Referrer-Policy: no-referrer\r\n"
        "Content-Security-Policy: %s\r\n"
        "Connection: close\r\n\r\n"
        % (len(body) if gz else P.RAW_LEN, "Content-Encoding: gzip\r\n" if gz else "", P.CSP)
    )
    await t.send(h.encode())
    h = None
    if head_only:
        return
    if gz:
        await t.send(memoryview(body))
        return
    import io
    import deflate

    d = deflate.DeflateIO(io.BytesIO(body), deflate.GZIP, P.WBITS)
    buf = bytearray(512)
    mv = memoryview(buf)
    while True:
        n = d.readinto(buf)
        if not n:
            break
        await t.send(mv[:n])


# ------------------------------------------------------------ the state


class _Out:
    # JSON written into one buffer of fixed size: the whole state costs that
    # buffer and the final copy, however many clients or topics there are.
    def __init__(self, n):
        self.b = bytearray(n)
        self.n = 0

    def put(self, s, limit):
        # Appends s (str or bytes) if the result stays within limit bytes.
        if isinstance(s, str):
            s = s.encode()
        k = len(s)
        n = self.n
        if n + k > limit:
            return False
        self.b[n : n + k] = s
        self.n = n + k
        return True

    def item(self, first, obj, limit):
        # One list entry: a comma unless first, then obj as compact JSON.
        n = self.n
        if not first and not self.put(b",", limit):
            return False
        if self.put(json.dumps(obj, separators=_SEP), limit):
            return True
        self.n = n
        return False


_SEP = (",", ":")


def _cut(s):
    if s is None or len(s) <= _MAX_STR:
        return s
    return s[: _MAX_STR - 1] + "\u2026"


def state(b, budget=0):
    # The JSON the page reads, as bytes, at most `budget` long:
    #  ver, up (s), auth (1: password_file, so logins are checked), max
    #  (max_connections), nc/ns (connected clients / sessions), nsub, nret
    #  (counts), heap [used, free], store [used, max, written, block
    #  writes] or null, m [msgs in, msgs out, bytes in, bytes out, dropped],
    #  clients [[id, user, address, version, connected, subs, queued,
    #  in flight]] (connected first), subs [[client id, filter, QoS]],
    #  ret [[topic, payload bytes]]. A list cut short by the budget has fewer
    #  entries than its count. No password or payload is ever included.
    from broker.sys_tree import VERSION

    gc.collect()
    used = gc.mem_alloc()
    free = gc.mem_free()
    cfg = b.cfg
    if not budget:
        # An update holds about twice its budget for a moment (buffer, then
        # payload and its wire copy): on a short heap the lists get shorter
        # rather than the broker running out.
        budget = (free - cfg["min_free_heap"]) // 8
        budget = _BUDGET if budget > _BUDGET else 1024 if budget < 1024 else budget
    st = None
    p = b.persist
    if p is not None:
        ss = p.store.stats
        st = [p.store.used_bytes, cfg["store_max_bytes"], ss.get("bytes_written", 0), ss.get("block_writes", 0)]
    o = _Out(budget)
    head = json.dumps(
        {
            "ver": VERSION,
            "up": int(time.time() - b.started),
            "auth": 1 if b.auth is not None else 0,
            "max": cfg["max_connections"],
            "nc": b.connected_count(),
            "ns": len(b.sessions),
            "nsub": b.subs.count,
            "nret": len(b.retained.msgs),
            "heap": [used, free],
            "store": st,
            "m": [b.stats_msgs_recv, b.stats_msgs_sent, b.stats_bytes_recv, b.stats_bytes_sent, b.stats_dropped],
        },
        separators=_SEP,
    )
    o.put(head[:-1], budget)
    head = None
    # Each list may fill the buffer up to its share, so that a long one
    # leaves room for the next; 16 bytes stay for the list ends.
    end = budget - 16
    o.put(',"clients":[', end)
    first = True
    for online in (True, False):
        for s in b.sessions.values():
            c = s.conn
            if (c is not None) != online:
                continue
            if not o.item(first, [
                _cut(s.client_id), _cut(s.username), c.t.peer if c is not None else None,
                s.version, 1 if online else 0, len(s.subs), s.queued(), len(s.inflight)], end * 4 // 10):
                break
            first = False
        else:
            continue
        break
    o.put('],"subs":[', end)
    first = True
    for s in b.sessions.values():
        for f in s.subs:
            if not o.item(first, [_cut(s.client_id), _cut(f), s.subs[f].opts & 3], end * 7 // 10):
                break
            first = False
        else:
            continue
        break
    o.put('],"ret":[', end)
    first = True
    r = b.retained
    for k in r.msgs:
        if not o.item(first, [_cut(k), r.size(k)], end):
            break
        first = False
    o.put("]}", budget)
    return bytes(memoryview(o.b)[: o.n])


def may_read(b, s):
    # The state names every client, user and address, so it goes only to a
    # connected client that logged in as a user the broker checked (with
    # the password_file, or by its TLS certificate), never to an anonymous
    # one or one whose user name nobody checked, and, with an acl_file,
    # only where the ACL grants read on TOPIC. docs/security.md.
    c = s.conn
    if c is None or s.username is None:
        return False
    if b.auth is None and getattr(c.t, "cert_user", None) is None:
        return False
    return b.acl is None or b.acl.can_read(s.client_id, s.username, TOPIC)


def readers(b, hits):
    # {session: subscription identifiers} of the subscriptions matching
    # TOPIC whose clients may_read() it. hits: a scratch list.
    del hits[:]
    b.subs.match(TOPIC, hits)
    out = {}
    for sub in hits:
        s = sub.session
        if s not in out:
            if not may_read(b, s):
                continue
            out[s] = []
        if sub.subid:
            out[s].append(sub.subid)
    del hits[:]
    return out


def ensure(b):
    # Starts the publisher once; called when the page is served or
    # connects. It stays, idle, checking every 2 s for a subscriber.
    global _task
    if _task is None:
        _task = asyncio.create_task(_run(b))
        log.info("dashboard: publishing %s while subscribed", TOPIC)


async def _run(b):
    hits = []
    while True:
        await asyncio.sleep_ms(_PERIOD_MS)
        try:
            to = readers(b, hits)
            if not to:
                continue
            m = Message(TOPIC, state(b), 0, False)
            for s in to:
                deliver(b, s, m, 0, False, to[s] or None)
            m = to = None
        except MemoryError:
            gc.collect()
            log.warning("dashboard: out of memory building the state")
        except Exception as e:
            log.error("dashboard: %r", e)
