"""The benchmark's memory figures (make bench), measured on the board twin (32-bit, code
frozen in, a board profile's heap, the shipped config):

  idle     heap per idle client holding one subscription, 3.1.1 and 5.0,
           at the esp32 heap (idle_clients(): the growth of the broker's
           own gc.mem_alloc() from n1 to n2 connected clients, over n2 - n1,
           after a warm-up that fills the buffer pools and grows the tables)
  alloc    heap allocated per forwarded 64-byte QoS 0 message, counted
           inside the broker with the collector off (mp_alloc.py)
  boards   per board profile: heap after start, idle client, per extra
           subscription, per retained and per queued message
  import   heap taken by importing the broker, frozen and from .mpy
  sizes    .mpy bytes per module and architecture (tools/build.py --sizes)

and the issue 15 targets on the first two. Heap figures are the broker's
gc.mem_alloc() after gc.collect(), read from $SYS/broker/heap/used
(sys_interval 1, the only config change besides those named).

    python tools/bench/benchmem.py [--only idle,alloc,boards,import,sizes] [--boards esp32,pico_w]
        [--messages 2000] [--out build/bench/benchmem.json]
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "lib")]
from brokers import Ours, ensure_built  # noqa: E402
from loadgen import connect_packet  # noqa: E402
import brokerproc  # noqa: E402
from mqtt import packets as K  # noqa: E402
from framer import Framer  # noqa: E402  (host_tests/, on the path through brokers)
from memreport import module_sizes  # noqa: E402

IDLE_MAX = 900  # issue 15: an idle 3.1.1 client with one subscription, bytes
ALLOC_MAX = 200  # issue 15: heap allocated per forwarded 64-byte QoS 0 message
AUTH = (brokerproc.TEST_USER, brokerproc.TEST_PASSWORD)


class Client:
    """A blocking MQTT client on a raw socket, logged in as the test user,
    from the next loopback source address."""

    def __init__(self, port, cid, version=4, clean=True, keepalive=0, timeout=5):
        self.version = version
        self.s = brokerproc.connect(port, timeout)
        self.f = Framer()
        self.s.sendall(connect_packet(cid, version, clean, keepalive, AUTH))
        p = self.next(K.CONNACK, timeout)
        if p.reason != 0:
            raise ConnectionError("CONNACK 0x%02X" % p.reason)

    def next(self, want, timeout=5):
        # Reads until a packet of type `want` arrives; returns it.
        end = time.time() + timeout
        while time.time() < end:
            p = self.f.next(self.version)
            if p is not None:
                if p.type == want:
                    return p
                continue
            self.s.settimeout(max(0.01, end - time.time()))
            d = self.s.recv(4096)
            if not d:
                raise ConnectionError("closed by the broker")
            self.f.feed(d)
        raise TimeoutError("no packet of type %d" % want)

    def request(self, pkt, want):
        self.s.sendall(K.encode(pkt, self.version))
        return self.next(want)

    def close(self):
        try:
            self.s.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.s.close()


class HeapProbe(Client):
    """A client subscribed to $SYS/broker/heap/used (sys_interval 1)."""

    def __init__(self, port):
        super().__init__(port, "heapprobe")
        self.vals = []
        self.s.sendall(K.encode(K.Subscribe(1, [("$SYS/broker/heap/used", 0)])))

    def settled(self, wait=2.3):
        # $SYS is published every second, a value only when it changed: the
        # last value seen up to now + wait.
        end = time.time() + wait
        while True:
            p = self.f.next()
            if p is not None:
                if p.type == K.PUBLISH:
                    self.vals.append(int(p.payload))
                continue
            left = end - time.time()
            if left <= 0:
                break
            self.s.settimeout(left)
            try:
                d = self.s.recv(4096)
            except socket.timeout:
                break
            if not d:
                raise ConnectionError("probe closed")
            self.f.feed(d)
        if not self.vals:
            raise RuntimeError("no $SYS/broker/heap/used")
        return self.vals[-1]


def warm_up(port, n, version=4):
    """One-time costs paid before counting: fills the broker's spare-buffer
    pools (two read, two write buffers: two readers hold a split packet at
    the same time, and two subscribers have output waiting at the same
    time), and grows its tables (sessions, connections, subscriptions) to n
    clients with a subscription each, which then leave: tables do not
    shrink, so the clients counted next pay only for themselves. The
    connection-rate limiter's table (16 source addresses, server.py) is
    filled too: every client comes from an address of its own."""
    for i in range(16):
        Client(port, "warm-addr%d" % i, version).close()
    for rnd in range(2):
        held = [Client(port, "warm%d-%d" % (rnd, i), version) for i in range(max(2, n))]
        for i, c in enumerate(held):
            c.request(K.Subscribe(1, [("warm/%d" % i if i > 1 else "warm/t", 0)]), K.SUBACK)
        a, b = held[0], held[1]
        pkt = K.encode(K.Publish("warm/t", bytes(64), 0, False))
        for c in (a, b):
            c.s.sendall(pkt[:10])
        time.sleep(0.3)
        for c in (a, b):
            c.s.sendall(pkt[10:])
        for c in (a, b):
            c.next(K.PUBLISH)
            c.next(K.PUBLISH)
        for c in held:
            c.close()
        time.sleep(0.5)


def idle_clients(board="esp32", n1=2, n2=None, versions=(4, 5), keepalive=60, config=None, log=print):
    """Heap per idle client holding one subscription, on the twin at the
    board's heap. n2 defaults to what the shipped max_connections allows
    next to the probe."""
    pc = brokerproc.profile(board)["config"]
    maxc = pc["max_connections"]
    n2 = n2 or maxc - 1
    cfg = {"sys_interval": 1}
    if n2 + 1 > maxc:
        cfg["max_connections"] = n2 + 1
        cfg["max_sessions"] = max(pc["max_sessions"], n2 + 1)
    cfg.update(config or {})
    out = {"board": board, "heap": brokerproc.profile(board)["heap"], "n1": n1, "n2": n2, "keepalive": keepalive,
           "config": cfg}
    with Ours("twin", cfg, board=board) as b:
        out["heap_after_start"] = _ready(b.log())
        probe = HeapProbe(b.port)
        warm_up(b.port, n2)
        for v in versions:
            held = []

            def more(k):
                while len(held) < k:
                    c = Client(b.port, "idle%d-%d" % (v, len(held)), v, keepalive=keepalive)
                    c.request(K.Subscribe(1, [("sensors/idle/%d" % len(held), 1)]), K.SUBACK)
                    held.append(c)
                return probe.settled()

            h1 = more(n1)
            h2 = more(n2)
            r = out["v%d" % v] = {"h1": h1, "h2": h2, "per_client": (h2 - h1) / (n2 - n1)}
            log("idle client v%s + 1 subscription on the twin (%s, heap %d): %.0f B (heap %d at %d clients, "
                "%d at %d)" % ("3.1.1" if v == 4 else "5.0", board, out["heap"], r["per_client"], h1, n1, h2, n2))
            for c in held:
                c.close()
            time.sleep(0.5)
        probe.close()
        out["memory_errors"] = len(re.findall(r"MemoryError|out of memory", b.log()))
    return out


def _ready(text):
    m = re.search(r"broker ready; heap used (\d+)", text)
    return int(m.group(1)) if m else None


def run_mp_alloc(board, messages, extra=()):
    heap = brokerproc.profile(board)["heap"]
    cmd = [str(brokerproc.twin_binary()), "-X", "heapsize=%d" % heap, str(HERE / "mp_alloc.py"),
           "--board", board, "--messages", str(messages), "--json"] + list(extra)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(REPO))
    line = [x for x in p.stdout.splitlines() if x.startswith("ALLOC ")]
    if p.returncode != 0 or not line:
        raise RuntimeError("mp_alloc.py failed (%d): %s" % (p.returncode, (p.stdout + p.stderr)[-1500:]))
    r = json.loads(line[-1][6:])
    r["command"] = " ".join(os.path.relpath(x, REPO) if x.startswith(str(REPO)) else x for x in cmd)
    return r


def alloc_per_message(board="esp32", messages=2000, where_cases="1,10", log=print):
    """Runs mp_alloc.py on the twin at the board's heap: the counts, then
    (where_cases) a second run with its per-function wrappers, whose own
    garbage makes rounds smaller, for the breakdown."""
    r = run_mp_alloc(board, messages)
    # MicroPython's dicts keep no order: the cases as asked for.
    r["cases"] = {k: r["cases"][k] for k in r["order"] if k in r["cases"]}
    for case, c in r["cases"].items():
        if "error" in c:
            log("allocated per message on the twin, case %s: ERROR %s" % (case, c["error"]))
            continue
        log("allocated per message on the twin, %s %s 1->%d: %.0f B/msg, %.0f B/delivery (%d messages, "
            "%.2f reads/msg)" % (c["mode"], c["version"], c["subscribers"], c["per_msg"], c["per_delivery"],
                                 c["messages"], c["reads"]))
    if where_cases:
        w = run_mp_alloc(board, max(100, messages // 4), ["--where", "--cases", where_cases])
        r["where"] = {}
        for case, c in w["cases"].items():
            if "where" in c:
                r["where"]["%s %s 1->%d" % (c["mode"], c["version"], c["subscribers"])] = {
                    "rows": c["where"], "reads": c["reads"], "messages": c["messages"]}
        r["where_command"] = w["command"]
    return r


def targets(idle, alloc):
    out = []
    if idle and "v4" in idle:
        v = idle["v4"]["per_client"]
        out.append({"platform": "twin", "what": "idle 3.1.1 client + 1 subscription, B", "target": "<= %d" % IDLE_MAX,
                    "value": v, "met": v <= IDLE_MAX})
    for case, c in ((alloc or {}).get("cases") or {}).items():
        if c["version"] != "3.1.1":
            continue
        per = "per_msg" if c["subscribers"] == 1 else "per_delivery"
        v = c[per]
        out.append({"platform": "twin", "what": "heap allocated %s, %s 1->%d, B" % (
            "per message" if per == "per_msg" else "per delivery", c["mode"], c["subscribers"]),
            "target": "<= %d" % ALLOC_MAX, "value": v, "met": v <= ALLOC_MAX})
    return out


def measure_board(board, log=print):
    """Heap after start, per idle client (3.1.1, one subscription), per extra
    subscription, per retained and per queued message, on the twin at the
    board's heap and shipped config."""
    prof = brokerproc.profile(board)
    pc = prof["config"]
    r = {"board": board, "heap": prof["heap"], "persistence": pc.get("persistence", False)}
    cfg = {"sys_interval": 1}
    with Ours("twin", cfg, board=board) as b:
        r["heap_after_start"] = _ready(b.log())
        probe = HeapProbe(b.port)
        n = max(2, min(6, pc["max_connections"] - 2))
        warm_up(b.port, n + 1)
        h0 = probe.settled()
        held = [Client(b.port, "c%d" % i, keepalive=60) for i in range(n)]
        for i, c in enumerate(held):
            c.request(K.Subscribe(1, [("mem/idle/%d" % i, 1)]), K.SUBACK)
        h1 = probe.settled()
        r["idle_client"] = (h1 - h0) / n
        r["idle_n"] = n
        # subscriptions: one client, k more exact filters
        w = held[0]
        k = min(12, pc.get("max_subscriptions", 16) - 2)
        for i in range(k):
            w.request(K.Subscribe(i + 2, [("mem/sub/%02d" % i, 1)]), K.SUBACK)
        h2 = probe.settled()
        r["subscription"], r["subscriptions_n"] = (h2 - h1) / k, k
        # retained: R messages of 64 B on distinct topics, QoS 1
        nret = min(40, pc["max_retained_messages"] - 4)
        for i in range(nret):
            w.request(K.Publish("mem/ret/%03d" % i, bytes(64), 1, True, pid=i + 1), K.PUBACK)
        h3 = probe.settled()
        r["retained_message"], r["retained_n"] = (h3 - h2) / nret, nret
        # queued: an offline persistent session, QoS 1
        sl = held[1]
        sl.close()
        sl = Client(b.port, "sleeper", 4, clean=False)
        sl.request(K.Subscribe(1, [("mem/q", 1)]), K.SUBACK)
        sl.close()
        time.sleep(0.3)
        h4 = probe.settled()
        nq = max(1, min(24, pc["max_queued_messages"] - 2))
        for i in range(nq):
            w.request(K.Publish("mem/q", bytes(64), 1, False, pid=i + 1), K.PUBACK)
        h5 = probe.settled()
        r["queued_message"], r["queued_n"] = (h5 - h4) / nq, nq
        for c in held:
            c.close()
        probe.close()
    log("benchmem %-7s heap %d: start %s B, idle client %.0f B, subscription %.0f B, retained %.0f B, "
        "queued %.0f B" % (board, r["heap"], r["heap_after_start"], r["idle_client"], r["subscription"],
                           r["retained_message"], r["queued_message"]))
    return r


def import_heap():
    """gc.mem_alloc() growth from importing the broker's core modules on
    the twin: frozen (build/twin/micropython), and from the .mpy files of
    build/host (build/twin/micropython-stock)."""
    ensure_built()
    code = r"""
import gc, sys
sys.path[:0] = %s
gc.collect(); a0 = gc.mem_alloc()
from broker import app, core, conn, server, handle_connect, handle_publish, handle_other, persist, store
gc.collect(); print('IMPORT', gc.mem_alloc() - a0)
"""
    out = {}
    for name, variant, path in (("frozen", "broker", [".frozen"]),
                                ("mpy", "stock", [str(REPO / "build/host/lib"), str(REPO / "build/host")])):
        p = subprocess.run([str(brokerproc.twin_binary(variant)), "-X", "heapsize=1000000", "-c", code % path],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"IMPORT (\d+)", p.stdout)
        out[name] = int(m.group(1)) if m else None
        if not m:
            out["error"] = (p.stdout + p.stderr)[-500:]
    return out


def guarded(name, f, res):
    try:
        res[name] = f()
    except Exception as e:  # one part failing still leaves the others
        res[name] = {"error": "%s: %s" % (type(e).__name__, e)}
        print("benchmem %s: ERROR %s" % (name, e))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="idle,alloc,boards,import,sizes")
    ap.add_argument("--boards", default="esp32,pico_w")
    ap.add_argument("--messages", type=int, default=2000, help="per case of the allocation count")
    ap.add_argument("--run-id", default=os.environ.get("BENCH_RUN_ID", ""))
    ap.add_argument("--out", default=str(REPO / "build" / "bench" / "benchmem.json"))
    a = ap.parse_args()
    parts = a.only.split(",")
    res = {"run_id": a.run_id, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "idle" in parts:
        guarded("idle", idle_clients, res)
    if "alloc" in parts:
        guarded("alloc", lambda: alloc_per_message(messages=a.messages), res)
    if "boards" in parts:
        res["boards"] = {}
        for bd in a.boards.split(","):
            guarded(bd, lambda: measure_board(bd), res["boards"])
    if "import" in parts:
        guarded("import", import_heap, res)
        print("benchmem import on the twin: %s" % res["import"])
    if "sizes" in parts:
        guarded("sizes", module_sizes, res)
    res["targets"] = targets(res.get("idle") if "error" not in (res.get("idle") or {}) else None,
                             res.get("alloc") if "error" not in (res.get("alloc") or {}) else None)
    for t in res["targets"]:
        print("target twin  %-52s %-6s measured %-8.0f %s" % (t["what"], t["target"], t["value"],
                                                              "MET" if t["met"] else "NOT MET"))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print("benchmem: results in %s" % a.out)


if __name__ == "__main__":
    main()
