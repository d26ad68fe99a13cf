"""Throughput, latency, retained recall and connection capacity of our
broker against Mosquitto and amqtt, all in one run.

    python tools/bench/bench.py [--seconds 3] [--repeat 2]
        [--brokers ours,mosquitto,amqtt] [--amqtt build/bench-venv/bin/amqtt]
        [--scenarios fanin,fanout,...] [--out build/bench/bench.json]

Our broker runs under the MicroPython unix port with the esp32 profile and
heap="220K" (BrokerProc). Changes to the profile for the benchmark, all
printed in the report:
  max_connections 8 -> 12   fan-in/fan-out need 11 clients (a real ESP32
                            has sockets for about 8)
  max_retained_messages 64 -> 128   the retained scenario stores 100
  persistence off           (BrokerProc's default for host runs)
  log_level warning
The connection-capacity scenario uses the esp32 profile as is
(max_connections 8) and the unix profile.

Each scenario runs `repeat` times per broker, brokers interleaved, and the
best run is kept (the host has 2 cores shared with other jobs). Loss,
duplicates and reordering are summed over all runs.
"""
import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE)]
import loadgen  # noqa: E402
from brokers import Ours, Mosquitto, Amqtt, cpu_seconds, rss_kb  # noqa: E402

BENCH_CONFIG = {"max_connections": 12, "max_retained_messages": 128}
THROUGHPUT = ("fanin", "fanout", "qos1", "qos2")
ALL = ("fanin", "fanout", "qos1", "qos2", "latency", "retained", "conncap")

# The targets of issue 6: (scenario, key, op, value)
TARGETS = {
    "fanin": ("rate", ">=", 50000),
    "fanout": ("rate", ">=", 100000),
    "qos1": ("rate", ">=", 20000),
    "qos2": ("rate", ">=", 12000),
    "latency": ("p99_ms", "<=", 1.0),
    "retained": ("median_ms", "<=", 10.0),
}


def metric(scn):
    # (key, higher is better)
    if scn == "latency":
        return "p99_ms", False
    if scn == "retained":
        return "median_ms", False
    if scn == "conncap":
        return "accepted", True
    return "rate", True


def better(scn, a, b):
    k, hi = metric(scn)
    if b is None or b.get(k) is None:
        return True
    if a.get(k) is None:
        return False
    return a[k] > b[k] if hi else a[k] < b[k]


def run_one(scn, broker, seconds):
    pid = broker.pid
    c0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    kw = {}
    if scn == "conncap":
        kw = {}
    r = asyncio.run(loadgen.run_scenario(scn, broker.port, seconds, **kw))
    dt = time.perf_counter() - t0
    c1 = cpu_seconds(pid)
    if c0 is not None and c1 is not None:
        r["broker_cpu"] = (c1 - c0) / dt
    r["wall"] = dt
    return r


def run_bench(brokers, scenarios, seconds, repeat, log=print):
    """brokers: list of started broker objects (label attribute). Returns
    {scenario: {label: best result with loss totals}}."""
    res = {}
    for scn in scenarios:
        if scn == "conncap":
            continue
        res[scn] = {}
        for rep in range(repeat):
            for b in brokers:
                lab = b.label
                try:
                    r = run_one(scn, b, seconds)
                except Exception as e:  # a broker that fails a scenario is reported, not fatal
                    r = {"error": "%s: %s" % (type(e).__name__, e)}
                    if hasattr(b, "log"):
                        tail = [x for x in b.log().splitlines() if x[:2] in ("W ", "E ")][-5:]
                        if tail:
                            r["error"] += " | broker log: " + " / ".join(tail)
                prev = res[scn].get(lab)
                tot = {k: (prev or {}).get("total_" + k, 0) + r.get(k, 0)
                       for k in ("lost", "dups", "reordered", "closed_by_broker")}
                runs = (prev or {}).get("runs", [])
                k, _ = metric(scn)
                runs = runs + [r.get(k)]
                if "error" in r and prev is not None:
                    best = prev
                elif prev is None or "error" in prev or better(scn, r, prev):
                    best = r
                else:
                    best = prev
                best = dict(best)
                for kk, v in tot.items():
                    best["total_" + kk] = v
                best["runs"] = runs
                res[scn][lab] = best
                log("  %-9s %-18s run %d: %s" % (scn, lab, rep + 1, _short(scn, r)))
    return res


def _short(scn, r):
    if "error" in r:
        return "ERROR " + r["error"]
    k, _ = metric(scn)
    v = r.get(k)
    s = "%s=%s" % (k, ("%.3f" % v) if isinstance(v, float) else v)
    if "lost" in r:
        s += " lost=%d dups=%d reord=%d" % (r.get("lost", 0), r.get("dups", 0), r.get("reordered", 0))
    if r.get("publisher_reconnects"):
        s += " publisher reconnects=%d" % r["publisher_reconnects"]
    if r.get("closed_by_broker"):
        s += " CLOSED BY BROKER=%d" % r["closed_by_broker"]
    if "broker_cpu" in r:
        s += " cpu broker=%.0f%% gen=%.0f%%" % (100 * r["broker_cpu"], 100 * r.get("loadgen_cpu", 0))
    return s


def run_conncap(targets, bound, log=print):
    """targets: list of (label, broker factory or started broker, own)."""
    out = {}
    for label, b, own in targets:
        try:
            if own:
                b.start()
            r = asyncio.run(loadgen.conncap(b.port, bound=bound))
            r["rss_kb"] = rss_kb(b.pid)
        except Exception as e:
            r = {"error": "%s: %s" % (type(e).__name__, e)}
        finally:
            if own:
                b.cleanup()
        out[label] = r
        log("  conncap   %-18s %s" % (label, r))
    return out


def versions(amqtt_exe=None):
    import platform
    import subprocess

    v = {"python": "CPython " + platform.python_version()}
    try:
        mp = subprocess.run([str(REPO / ".venv" / "bin" / "micropython"), "-c",
                             "import sys; print(sys.version.split(';')[1].strip())"],
                            capture_output=True, text=True, timeout=10).stdout.strip()
        v["micropython"] = mp
    except Exception:
        v["micropython"] = "?"
    v["mosquitto"] = Mosquitto.get_version() if Mosquitto.available() else "not installed"
    if amqtt_exe:
        v["amqtt"] = Amqtt(amqtt_exe).get_version()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, cwd=str(REPO)).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "firmware", "lib"], capture_output=True,
                               text=True, timeout=10, cwd=str(REPO)).stdout.strip()
        v["commit"] = head + (" + uncommitted changes in firmware/ or lib/" if dirty else "")
    except Exception:
        v["commit"] = "?"
    v["nproc"] = os.cpu_count()
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    v["cpu"] = cpu
    try:
        v["loadavg_before"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    return v


def table(res, cap, labels):
    """Text table: value per broker, and how many times better ours is."""
    ours = labels[0]
    others = labels[1:]
    head = ["scenario", "unit"] + labels + ["ours vs %s" % o for o in others] + ["loss/dup/reord (ours)"]
    rows = []
    units = {"fanin": "msg/s", "fanout": "deliveries/s", "qos1": "msg/s", "qos2": "msg/s",
             "latency": "p99 ms (p50)", "retained": "ms, median (best)"}
    for scn in res:
        k, hi = metric(scn)
        row = [scn, units.get(scn, k)]
        for lab in labels:
            r = res[scn].get(lab)
            if r is None or "error" in r:
                row.append("error" if r else "-")
                continue
            v = r.get(k)
            if scn == "latency":
                row.append("%.2f (%.2f)" % (v, r["p50_ms"]))
            elif scn == "retained":
                row.append("%.1f (%.1f)" % (v, r["best_ms"]) if v is not None else "incomplete")
            else:
                row.append("%d" % round(v))
        ro = res[scn].get(ours) or {}
        for o in others:
            r = res[scn].get(o) or {}
            a, b = ro.get(k), r.get(k)
            if not a or not b:
                row.append("-")
            else:
                row.append("%.2fx" % ((a / b) if hi else (b / a)))
        row.append("%d/%d/%d" % (ro.get("total_lost", 0), ro.get("total_dups", 0), ro.get("total_reordered", 0)))
        rows.append(row)
    if cap:
        row = ["conncap", "clients accepted"]
        for lab in labels:
            found = [c for c in cap if c.startswith(lab.split(" (")[0])]
            row.append(" / ".join("%s" % cap[c].get("accepted", "err") for c in found) or "-")
        row += ["-"] * len(others) + ["-"]
        rows.append(row)
    return head, rows


def fmt_table(head, rows, md=False):
    if md:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            out.append("| " + " | ".join(r) + " |")
        return "\n".join(out)
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(n) for x, n in zip(r, w))  # noqa: E731
    return "\n".join([line(head), line(["-" * n for n in w])] + [line(r) for r in rows])


def targets_check(res, labels):
    ours = labels[0]
    out = []
    for scn, (k, op, lim) in TARGETS.items():
        r = (res.get(scn) or {}).get(ours)
        if not r or r.get(k) is None:
            continue
        v = r[k]
        ok = v >= lim if op == ">=" else v <= lim
        out.append({"scenario": scn, "metric": k, "target": "%s %s" % (op, lim), "value": v, "met": ok})
    amq = [lab for lab in labels if lab.startswith("amqtt")]
    if amq:
        for scn in res:
            k, hi = metric(scn)
            a = (res[scn].get(ours) or {}).get(k)
            b = (res[scn].get(amq[0]) or {}).get(k)
            if a and b:
                x = a / b if hi else b / a
                out.append({"scenario": scn, "metric": "x amqtt", "target": ">= 5", "value": x, "met": x >= 5})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--brokers", default="ours,mosquitto,amqtt")
    ap.add_argument("--amqtt", default=str(REPO / "build" / "bench-venv" / "bin" / "amqtt"))
    ap.add_argument("--scenarios", default=",".join(ALL))
    ap.add_argument("--board", default="esp32")
    ap.add_argument("--heap", default="220K")
    ap.add_argument("--cap-bound", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a config key of our broker for the throughput scenarios")
    ap.add_argument("--out", default=str(REPO / "build" / "bench" / "bench.json"))
    a = ap.parse_args()
    for kv in a.set:
        k, _, v = kv.partition("=")
        BENCH_CONFIG[k] = json.loads(v)
    names = [x for x in a.brokers.split(",") if x]
    scenarios = [x for x in a.scenarios.split(",") if x]
    t_start = time.time()
    ver = versions(a.amqtt if "amqtt" in names else None)
    print("bench: %s; %s x %s" % (", ".join("%s=%s" % kv for kv in ver.items() if kv[0] != "loadavg_before"),
                                  ver["nproc"], ver["cpu"]))
    brokers = []
    try:
        for n in names:
            if n == "ours":
                b = Ours(a.board, BENCH_CONFIG, heap=a.heap, label="ours")
            elif n == "mosquitto":
                b = Mosquitto()
                b.label = "mosquitto"
            elif n == "amqtt":
                b = Amqtt(a.amqtt)
                b.label = "amqtt"
            else:
                raise SystemExit("unknown broker %s" % n)
            b.start()
            brokers.append(b)
        print("bench: brokers up: %s" % ", ".join("%s port %d pid %d" % (b.label, b.port, b.pid) for b in brokers))
        res = run_bench(brokers, scenarios, a.seconds, a.repeat)
        cap = {}
        if "conncap" in scenarios:
            targets = []
            for b in brokers:
                if b.label == "ours":
                    targets.append(("ours esp32 (max_connections 8)", Ours(a.board, {}, heap=a.heap), True))
                    targets.append(("ours unix (max_connections 200)", Ours("unix", {}), True))
                else:
                    targets.append((b.label, b, False))
            cap = run_conncap(targets, a.cap_bound)
    finally:
        for b in brokers:
            b.cleanup()
    labels = [b.label for b in brokers]
    head, rows = table(res, cap, labels)
    print()
    print(fmt_table(head, rows))
    tc = targets_check(res, labels)
    if tc:
        print()
        for t in tc:
            print("target %-9s %-8s %-9s measured %-10s %s" % (
                t["scenario"], t["metric"], t["target"], ("%.2f" % t["value"]) if isinstance(t["value"], float)
                else t["value"], "MET" if t["met"] else "NOT MET"))
    out = {"versions": ver, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "seconds": a.seconds, "repeat": a.repeat, "board": a.board, "heap": a.heap,
           "bench_config": BENCH_CONFIG, "labels": labels, "results": res, "conncap": cap, "targets": tc,
           "elapsed_s": time.time() - t_start,
           "command": "python tools/bench/bench.py " + " ".join(sys.argv[1:])}
    try:
        out["versions"]["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("\nbench: %.0f s; results in %s" % (time.time() - t_start, a.out))


if __name__ == "__main__":
    main()
