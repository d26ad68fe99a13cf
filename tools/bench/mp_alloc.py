# Heap allocated per forwarded message, measured inside the broker on the
# board twin. Runs under MicroPython (not CPython):
#
#   build/twin/micropython -X heapsize=110000 tools/bench/mp_alloc.py \
#       [--board esp32] [--messages 2000] [--cases 1,10,5:1,b1] [--payload 64] [--where] [--collections] [--json]
#
# The broker is started as app.start() starts it, from the board profile's
# shipped config (persistence on, with its store in a temporary folder;
# authentication on, with the test user in a password file), without its
# listener and its once-a-second housekeeping. Its clients are real
# Connection objects made by server._serve(), as the accept loop makes
# them, over a transport that is broker.transport.TcpTransport except for
# read_now() and readable(): those hand out CONNECT, SUBSCRIBE and then back-to-back
# 64-byte QoS 0 PUBLISH packets (filling the read buffer as a loaded
# socket does, so packets are split across reads), and its socket's write()
# takes and counts everything. So what runs per message is the broker's own
# code: framing in Connection.run, the handlers, route, put_message /
# Message.put into the output buffer, the flusher and Output.write_now.
#
# Per round: gc.collect(), gc.disable(), mem_alloc() before, the publisher is
# given R messages, and when every subscriber's socket has taken all R,
# mem_alloc() after. Rounds are sized so that the broker's own heap check
# (heap.py) never collects during one (checked: the free heap at the end of
# every round is above the point where it would). Result per case:
# sum(after - before) / messages.
#
# Cases: "N" = one publisher to N subscribers, 3.1.1; "5:N" the same in
# MQTT 5.0; a "b" prefix = backlog: the publisher's socket always has more
# (the reader never waits), so output buffers fill and messages wait in the
# session queues, as under a burst. Without it the reader lets the flusher
# run after each read, as when the broker keeps up. A "/1" suffix: QoS 1
# both ways (publisher and subscriptions), each subscriber answering every
# PUBLISH with its PUBACK as soon as the broker writes it (AckSock).
#
# --where: also wraps the functions of the path to count what each
# allocates (inclusive, the wrappers' own argument tuples taken out).
#
# --collections: then, with the collector on at the profile's gc_threshold
# (as the board runs), as many messages again, counting the collections. Each
# comes after gc_threshold bytes allocated, and that count includes the
# frames of Python functions too large for the C stack (tools/frames.py),
# freed on return and so invisible to mem_alloc(): gc_threshold times the
# collections per message is what the message costs in collections.
# Output: one line "ALLOC {json}" (--json: only that line).
import sys

sys.path[:] = [".frozen"] + [p for p in sys.path if p != ".frozen"]
import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import micropython  # noqa: E402

_here = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
ROOT = _here + "/../.."
TEST_USER = "sensor"  # as host_tests/brokerproc.py
TEST_PASSWORD = "test-password"


def args(argv):
    a = {"board": "esp32", "messages": 2000, "cases": "1,10,5:1,b1", "payload": 64, "where": False,
         "json": False, "round": 0, "verbose": False, "collections": False}
    i = 1
    while i < len(argv):
        k = argv[i][2:]
        if k in ("where", "json", "verbose", "collections"):
            a[k] = True
        elif k in a:
            a[k] = argv[i + 1] if k in ("board", "cases") else int(argv[i + 1])
            i += 1
        else:
            raise SystemExit("mp_alloc: unknown argument %s" % argv[i])
        i += 1
    return a


A = args(sys.argv)
say = (lambda *x: None) if A["json"] else print

import pwhash  # noqa: E402
from mqtt import packets as K  # noqa: E402
from broker.config import build, load_json, unload  # noqa: E402

DATA = "/tmp/mp_alloc_%d" % (time.ticks_us() & 0xFFFFFF)
profile = load_json("%s/boards/%s.json" % (ROOT, A["board"]))
os.mkdir(DATA)
with open(DATA + "/passwd", "w") as f:
    f.write("%s:%s\n" % (TEST_USER, pwhash.make_hash(TEST_PASSWORD, pwhash.ITERATIONS.get(A["board"], 1000))))
CFG = build(profile.get("config"), {"persistence_location": DATA + "/store", "password_file": DATA + "/passwd",
                                    "bind_address": "127.0.0.1", "port": 0}, None)
build = load_json = None
unload()
SHIPPED_MAX = CFG["max_connections"]

from broker import app, server, transport  # noqa: E402


async def _idle(*a):
    pass


# Started as a board starts it, minus the listener and the housekeeping.
app.listen = lambda host, port: None
app.accept_loop = _idle
app._housekeeping = _idle


@micropython.viper
def _copy(dst: ptr8, src: ptr8, pos: int, n: int, size: int) -> int:
    # n bytes of the ring src[0:size] from pos into dst; returns the new pos.
    i = 0
    while i < n:
        dst[i] = src[pos]
        pos += 1
        if pos == size:
            pos = 0
        i += 1
    return pos


class FakeSock:
    # What the transport reads: `left` more bytes of `src`, from `pos`,
    # cycling through it. What the broker writes: counted, never kept.
    closed = False
    pace = True  # let other tasks run before each read
    paced = False  # and they have, for the next one

    def __init__(self):
        self.src = b""
        self.pos = 0
        self.left = 0
        self.ev = asyncio.Event()
        self.out = 0
        self.writes = 0
        self.reads = 0

    def give(self, data, n=None):
        self.src = data
        self.pos = 0
        self.left = len(data) if n is None else n
        self.ev.set()

    def write(self, buf, off, n):
        # (TcpTransport.write_now's call: buf[off:off + n])
        self.out += n
        self.writes += 1
        return n

    def setblocking(self, flag):
        pass

    def setsockopt(self, *a):
        pass

    def close(self):
        self.closed = True
        self.ev.set()


class AckSock(FakeSock):
    # A subscriber that answers each QoS 1 PUBLISH the broker writes to it
    # with a PUBACK, read back from a ring made once: the fake allocates
    # nothing per message, so what is counted is the broker's.
    def __init__(self):
        FakeSock.__init__(self)
        self.src = bytearray(4096)

    def give(self, data, n=None):
        # CONNECT and SUBSCRIBE, at the start: into the ring.
        self.src[0 : len(data)] = data
        self.pos = 0
        self.left = len(data)
        self.ev.set()

    def write(self, mv, off, n):
        ring = self.src
        i = off
        end = off + n
        while i < end:
            first = mv[i]
            j = i + 1
            rem = 0
            shift = 0
            while True:
                x = mv[j]
                rem |= (x & 0x7F) << shift
                shift += 7
                j += 1
                if x < 128:
                    break
            if first & 0xF6 == 0x32:  # PUBLISH, QoS 1
                k = j + 2 + (mv[j] << 8 | mv[j + 1])
                w = (self.pos + self.left) & 4095
                ring[w] = 0x40
                ring[(w + 1) & 4095] = 2
                ring[(w + 2) & 4095] = mv[k]
                ring[(w + 3) & 4095] = mv[k + 1]
                self.left += 4
            i = j + rem
        if self.left:
            self.ev.set()
        return FakeSock.write(self, mv, off, n)


class FeedTransport(transport.TcpTransport):
    # TcpTransport with read_now reading from the FakeSock's feed; its
    # write_now, send and close are TcpTransport's own. Like TcpTransport's,
    # read_now returns at once when there is something to read, and
    # readable() makes nothing while there is (an Event.wait() when the
    # feed is empty: once per round).
    def readable(self):
        s = self.sock
        if s.left or s.closed:
            s.paced = True
            return asyncio.sleep_ms(0)
        s.ev.clear()
        return s.ev.wait()

    def read_now(self, mv):
        s = self.sock
        if not s.left:
            return 0 if s.closed else None
        if s.pace and not s.paced:
            return None  # other tasks run first (readable)
        s.paced = False
        n = len(mv)
        if n > s.left:
            n = s.left
        s.pos = _copy(mv, s.src, s.pos, n, len(s.src))
        s.left -= n
        s.reads += 1
        return n


server.TcpTransport = FeedTransport
_peers = [1]


def client(b, cid, version, then=b"", sock=None):
    # A connection as the accept loop makes it, fed CONNECT and `then`.
    sock = sock or FakeSock()
    _peers[0] += 1
    server._serve(b, sock, "127.0.0.%d:%d" % (_peers[0] % 250 + 2, 40000 + _peers[0]), None)
    sock.give(K.encode(K.Connect(cid, version, True, keepalive=0, username=TEST_USER,
                                 password=TEST_PASSWORD.encode()), version) + then)
    return sock


async def until(cond, ms=60000):
    # (A bound against a hang only: under valgrind, tools/bench/
    # instr_per_msg.py, ten logins hash for more than 5 s.)
    t = time.ticks_ms()
    while not cond():
        if time.ticks_diff(time.ticks_ms(), t) > ms:
            raise RuntimeError("timed out")
        await asyncio.sleep_ms(1)


# ---------------------------------------------------------------- --where

STATS = {}
MISSING = []
OVH = [0]  # bytes of the wrappers' own argument tuples so far
TUPLE = []  # bytes a call f(*a) allocates for its tuple, by len(a)


def _calibrate():
    def f(*a):
        pass

    for k in range(16):
        t = tuple(range(k))
        n = 64
        gc.collect()
        gc.disable()
        a0 = gc.mem_alloc()
        i = 0
        while i < n:
            f(*t)
            i += 1
        a1 = gc.mem_alloc()
        gc.enable()
        TUPLE.append((a1 - a0 + n // 2) // n)


def counted(label, f):
    # f, counting what it allocates (its callees' included).
    st = STATS.setdefault(label, [0, 0])  # (one label may wrap several names)
    alloc = gc.mem_alloc
    ovh = OVH
    tup = TUPLE

    def w(*a):
        ovh[0] += tup[len(a)]
        o0 = ovh[0]
        m0 = alloc()
        r = f(*a)
        st[0] += alloc() - m0 - (ovh[0] - o0)
        st[1] += 1
        return r

    return w


def wrap_path():
    import mp_path

    _calibrate()
    mp_path.wrap_all(mp_path.PUBLISH, counted, MISSING)


def where(n_msgs, total):
    rows = []
    inner = 0
    for k, v in STATS.items():
        if k in ("Connection.dispatch", "Broker.flush_now"):
            inner += v[0]  # the two entry points: the reader's and the flusher's
        rows.append({"fn": k, "bytes_per_msg": v[0] / n_msgs, "calls_per_msg": v[1] / n_msgs})
    rows.append({"fn": "(outside these: the reader and flusher loops, socket reads, asyncio)",
                 "bytes_per_msg": (total - inner) / n_msgs, "calls_per_msg": 0})
    rows.sort(key=lambda r: -r["bytes_per_msg"])
    return rows, MISSING


def reset_stats():
    for v in STATS.values():
        v[0] = v[1] = 0


# ---------------------------------------------------------------- cases

def parse_case(c):
    backlog = c[0] == "b"
    if backlog:
        c = c[1:]
    qos = 0
    if "/" in c:
        c, q = c.split("/")
        qos = int(q)
    version = 4
    if ":" in c:
        v, c = c.split(":")
        version = int(v)
    return int(c), version, backlog, qos


async def measure(b, case, messages):
    nsub, version, backlog, qos = parse_case(case)
    topic = "bench/alloc/%s" % case
    # Raised only as far as the case needs (the esp32 ships with 8).
    b.cfg["max_connections"] = max(SHIPPED_MAX, nsub + 1)
    subs = []
    for i in range(nsub):
        subs.append(client(b, "s%d" % i, version, K.encode(K.Subscribe(1, [(topic, qos)]), version),
                           AckSock() if qos else None))
    # CONNACK and SUBACK written: 4 + 5 bytes (3.1.1), 5 + 6 (v5, empty properties)
    acks = 9 if version == 4 else 11
    await until(lambda: all(s.out >= acks for s in subs))
    pub = client(b, "p", version)
    await until(lambda: pub.out >= (4 if version == 4 else 5))
    pub.pace = not backlog
    block = b"".join(K.encode_publish(topic.encode(), bytes(A["payload"]), qos, False, False, i + 1 if qos else 0,
                                      b"" if version == 5 else None, version) for i in range(16))
    L = len(block) // 16
    floor2 = b.heap.message_floor << 1  # below this heap.free() collects
    per_round = 2
    done = 0
    allocated = 0
    reads = 0
    writes = 0
    lowest = None
    biggest = 0
    warm = True
    while done < messages:
        base = [s.out for s in subs]
        w0 = sum(s.writes for s in subs)
        r0 = pub.reads
        want = per_round * L
        gc.collect()
        gc.disable()
        ovh0 = OVH[0]
        f0 = gc.mem_free()
        a0 = last = gc.mem_alloc()
        pub.give(block, want)
        t0 = time.ticks_ms()
        collected = False
        i = 0
        while i < nsub:
            if subs[i].out - base[i] < want:
                # Between two steps of the broker's tasks: a collection
                # (heap.py collects when the heap looks short) shows as the
                # allocated bytes dropping by the garbage it freed.
                m = gc.mem_alloc()
                collected = collected or m < last - 4096
                last = m
                if time.ticks_diff(time.ticks_ms(), t0) > 60000:
                    gc.enable()
                    raise RuntimeError("subscriber %d got %d of %d bytes" % (i, subs[i].out - base[i], want))
                await asyncio.sleep_ms(0)
                continue
            i += 1
        raw = gc.mem_alloc() - a0
        collected = collected or a0 + raw < last - 4096
        a1 = a0 + raw - (OVH[0] - ovh0)  # without the --where wrappers' own
        free = gc.mem_free()
        gc.enable()
        if collected:
            # Not counted: the same again, smaller.
            if per_round == 1:
                raise RuntimeError("the heap is collected during a round of one message: it does not fit "
                                   "the room this heap leaves (%d B free before it)" % f0)
            say("  round of %d: the heap was collected during it; not counted" % per_round)
            per_round = per_round * 2 // 3
            continue
        if A["verbose"]:
            say("  round of %d: allocated %d, free at the end %d%s" % (per_round, a1 - a0, free,
                                                                      " (warm-up)" if warm else ""))
        if not warm:
            n = per_round
            done += n
            allocated += a1 - a0
            reads += pub.reads - r0
            writes += sum(s.writes for s in subs) - w0
            lowest = free if lowest is None else min(lowest, free)
            biggest = max(biggest, n)
        else:
            # The first round fills pools and grows tables once: not counted.
            warm = False
            reset_stats()
        # Rounds as large as the heap allows: up to the point where heap.py
        # would collect, less a margin.
        room = f0 - floor2 - 2048
        if A["round"]:
            per_round = A["round"]
        elif raw * 2 < room and per_round < 400:
            per_round *= 2
        elif raw > room and per_round > 1:
            per_round = per_round * 2 // 3
        if done + per_round > messages:
            per_round = max(1, messages - done)
    out = {"case": case, "subscribers": nsub, "version": "3.1.1" if version == 4 else "5.0", "qos": qos,
           "mode": "backlog" if backlog else "keeping up", "messages": done, "packet_bytes": L,
           "allocated": allocated, "per_msg": allocated / done, "per_delivery": allocated / done / nsub,
           "reads": reads / done, "writes": writes / done, "round": biggest, "lowest_free": lowest}
    if STATS:
        out["where"], out["not_wrapped"] = where(done, allocated)
    if A["collections"]:
        await collections(b, subs, pub, block, L, messages, out)
    for s in subs + [pub]:
        s.close()
    await until(lambda: not b.conns)
    return out


async def collections(b, subs, pub, block, L, messages, out):
    # --collections: `messages` more with the collector on at the profile's
    # gc_threshold, sampling mem_alloc() between two steps of the broker's
    # tasks: a collection shows as a drop, of the garbage it freed less what
    # the step allocated after it. So the count holds only where a step
    # allocates well under the garbage a collection frees (gc_threshold
    # times the share of garbage in what is counted): checked, and said.
    t = b.cfg["gc_threshold"]
    if not t:
        raise RuntimeError("--collections needs a board whose profile sets gc_threshold")
    base = [s.out for s in subs]
    want = messages * L
    gc.collect()  # (app.start set gc.threshold to t)
    n = 0
    step = 0
    last = gc.mem_alloc()
    pub.give(block, want)
    t0 = time.ticks_ms()
    i = 0
    while i < len(subs):
        m = gc.mem_alloc()
        if m < last - 1024:
            n += 1
        elif m - last > step:
            step = m - last
        last = m
        if subs[i].out - base[i] < want:
            if time.ticks_diff(time.ticks_ms(), t0) > 60000:
                raise RuntimeError("subscriber %d got %d of %d bytes" % (i, subs[i].out - base[i], want))
            await asyncio.sleep_ms(0)
            continue
        i += 1
    counted = t * n / messages
    # Garbage a collection frees: the threshold's share that is garbage
    # (out["per_msg"]: what a message leaves, counted with the collector off).
    freed = t * out["per_msg"] / counted if counted else 0
    exact = counted >= out["per_msg"] * 0.9 and step * 2 < freed
    out["collections"] = n
    out["collections_per_msg"] = n / messages
    out["counted_per_msg"] = counted
    out["threshold"] = t
    out["largest_step"] = step
    out["collections_exact"] = exact
    say("  %d collections over %d msgs at gc_threshold %d: %.1f B/msg counted towards it (largest step %d B%s)"
        % (n, messages, t, counted, step, "" if exact else "; too large for the drops to show: count not exact"))


def rmtree(p):
    for e in os.ilistdir(p):
        q = p + "/" + e[0]
        if e[1] == 0x4000:
            rmtree(q)
        else:
            os.remove(q)
    os.rmdir(p)


async def main():
    b = app.start(CFG)
    if A["where"]:
        wrap_path()
    gc.collect()
    res = {"board": A["board"], "heap": gc.mem_alloc() + gc.mem_free(), "payload": A["payload"],
           "messages": A["messages"], "persistence": CFG["persistence"], "auth": bool(CFG["password_file"]),
           "read_buffer_size": CFG["read_buffer_size"], "write_buffer_size": CFG["write_buffer_size"],
           "order": A["cases"].split(","), "cases": {}}
    for case in A["cases"].split(","):
        try:
            r = await measure(b, case, A["messages"])
        except Exception as e:
            res["cases"][case] = {"case": case, "error": "%s: %s" % (type(e).__name__, e)}
            say("mp_alloc %-5s failed: %r" % (case, e))
            for c in b.conns:
                c.t.sock.close()
            await until(lambda: not b.conns)
            continue
        res["cases"][case] = r
        say("mp_alloc %-5s %-10s %-5s QoS %d 1->%-2d %5d msgs: %6.1f B/msg, %6.1f B/delivery, %.3f reads/msg, "
            "%.3f writes/msg" % (case, r["mode"], r["version"], r["qos"], r["subscribers"], r["messages"],
                                 r["per_msg"], r["per_delivery"], r["reads"], r["writes"]))
    # Written out piece by piece: with the --where rows, the whole line as
    # one string is more than the board's heap has in one piece.
    gc.collect()
    sys.stdout.write("ALLOC ")
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


try:
    asyncio.run(main())
finally:
    rmtree(DATA)
