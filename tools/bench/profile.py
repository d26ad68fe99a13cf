"""Where our broker's time goes per message.

Two views of the same scenarios (fan-in, fan-out, QoS 1 by default):

1. Sections: the broker runs under tools/bench/mp_profile.py, which wraps
   the functions of the publish path with time.ticks_us() timers at run
   time (firmware/ is not touched). Reported per message delivered:
   inclusive microseconds and calls of each function, reads and writes
   per message, and the wrapper's own cost per call.
2. Sampling: the plain broker (no wrappers) under `perf record` (C level:
   the MicroPython VM, its allocator and GC, the kernel's socket calls),
   when perf is available.

Broker CPU per message comes from /proc/PID/stat around each run.

    python tools/bench/profile.py [--seconds 3] [--scenarios fanin,fanout,qos1]
        [--out build/bench/profile.json] [--no-perf]
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE)]
import loadgen  # noqa: E402
from brokers import Ours, wait_port, cpu_seconds, ensure_built  # noqa: E402
from bench import BENCH_CONFIG  # noqa: E402
from brokerproc import free_port, MICROPYTHON  # noqa: E402

# Direct children of each wrapped function (for self time).
TREE = {
    "Connection.dispatch": ["check_flags", "on_publish", "on_packet (acks etc.)"],
    "on_publish": ["decode_publish", "check_topic", "Message()", "Broker.route", "_ack (PUBACK/PUBREC)",
                   "_heap_short (gc.mem_free)"],
    "Broker.route": ["Subs.match", "Broker.deliver", "Broker._route_many"],
    "Broker._route_many": ["Broker.deliver"],
    "Broker.deliver": ["Session.enqueue"],
    "_ack (PUBACK/PUBREC)": ["Connection.send"],
    "on_packet (acks etc.)": ["_on_ack"],
    "_on_ack": ["decode_ack", "Connection.send"],
    "Broker.pump": ["Session.next_pid", "Message.wire", "Connection.room"],
}


def delivered(r):
    return r.get("delivered") or 0


def sections(scn, seconds, board="esp32", heap="220K"):
    ensure_built()
    tmp = tempfile.TemporaryDirectory(prefix="bench_prof_")
    cfg = {"bind_address": "127.0.0.1", "allow_anonymous": True, "persistence": False,
           "log_level": "warning"}
    cfg.update(BENCH_CONFIG)
    cfgp = os.path.join(tmp.name, "c.json")
    Path(cfgp).write_text(json.dumps(cfg))
    port = free_port()
    logp = os.path.join(tmp.name, "log.txt")
    with open(logp, "wb") as logf:
        p = subprocess.Popen([str(MICROPYTHON), "-X", "heapsize=%s" % heap, str(HERE / "mp_profile.py"),
                              str(REPO), board, cfgp, str(port)], stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=tmp.name)
        try:
            if not wait_port(port, p):
                raise RuntimeError("profiled broker did not start: " + Path(logp).read_text()[-2000:])
            c0 = cpu_seconds(p.pid)
            t0 = time.perf_counter()
            r = asyncio.run(loadgen.run_scenario(scn, port, seconds))
            wall = time.perf_counter() - t0
            cpu = cpu_seconds(p.pid) - c0
            time.sleep(1.3)  # the next stats dump
            try:
                prof = json.loads(Path(cfgp + ".profile.json").read_text())
            except (OSError, ValueError):
                prof = None
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
    text = Path(logp).read_text(errors="replace")
    tmp.cleanup()
    if prof is None:
        raise RuntimeError("no profile stats written: " + text[-2000:])
    n = max(1, delivered(r))
    st = prof["stats"]
    ov = prof["overhead_us"]
    rows = []
    for name, (us, calls) in st.items():
        if not calls:
            continue
        kids = TREE.get(name, [])
        child_us = sum(st.get(k, [0, 0])[0] for k in kids)
        child_calls = sum(st.get(k, [0, 0])[1] for k in kids)
        self_us = us - child_us - child_calls * ov
        rows.append({"fn": name, "calls_per_msg": calls / n, "incl_us_per_msg": us / n,
                     "self_us_per_msg": max(0.0, self_us) / n, "us_per_call": us / calls})
    rows.sort(key=lambda x: -x["self_us_per_msg"])
    c = prof["count"]
    return {
        "scenario": scn, "rate_instrumented": r.get("rate"), "delivered": n,
        "broker_cpu_s": cpu, "wall_s": wall, "cpu_us_per_msg_instrumented": 1e6 * cpu / n,
        "wrapper_overhead_us_per_call": ov,
        "reads_per_msg": c["recv_into"] / n, "bytes_per_read": c["recv_bytes"] / max(1, c["recv_into"]),
        "writes_per_msg": c["send"] / n, "bytes_per_write": c["send_bytes"] / max(1, c["send"]),
        "relieve_per_msg": c["relieve"] / n,
        "rows": rows, "lost": r.get("lost"), "dups": r.get("dups"), "not_wrapped": prof.get("missing", []),
    }


def plain_cpu(scn, seconds, perf=True, board="esp32", heap="220K"):
    """CPU per message of the uninstrumented broker; perf samples if asked."""
    out = {"scenario": scn}
    with Ours(board, BENCH_CONFIG, heap=heap) as b:
        pp = None
        pdata = None
        if perf and shutil.which("perf"):
            pdata = tempfile.mktemp(prefix="bench_perf_", suffix=".data")
            pp = subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-o", pdata, "-p", str(b.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        c0 = cpu_seconds(b.pid)
        t0 = time.perf_counter()
        r = asyncio.run(loadgen.run_scenario(scn, b.port, seconds))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(b.pid) - c0
        if pp is not None:
            pp.send_signal(signal.SIGINT)
            try:
                pp.wait(20)
            except subprocess.TimeoutExpired:
                pp.kill()
                pp.wait(5)
    n = max(1, delivered(r))
    out.update({"rate": r.get("rate"), "delivered": n, "broker_cpu_s": cpu, "wall_s": wall,
                "cpu_us_per_msg": 1e6 * cpu / n})
    if pdata and os.path.exists(pdata):
        out["perf"] = perf_top(pdata)
        os.unlink(pdata)
    return out


def perf_top(pdata, n=25):
    # Self samples per symbol, as percentages.
    try:
        rep = subprocess.run(["perf", "report", "-i", pdata, "--stdio", "--no-children", "-g", "none",
                              "--sort", "dso,symbol", "--percent-limit", "0.5"],
                             capture_output=True, text=True, timeout=120).stdout
    except Exception as e:
        return [{"error": repr(e)}]
    rows = []
    for line in rep.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line:
            continue
        parts = line.split()
        try:
            pct = float(parts[0].rstrip("%"))
        except ValueError:
            continue
        dso = parts[1]
        sym = " ".join(p for p in parts[3:] if p != "-") if len(parts) > 3 else "?"
        rows.append({"pct": pct, "dso": dso, "symbol": sym})
        if len(rows) >= n:
            break
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--scenarios", default="fanin,fanout,qos1")
    ap.add_argument("--out", default=str(REPO / "build" / "bench" / "profile.json"))
    ap.add_argument("--no-perf", action="store_true")
    a = ap.parse_args()
    res = {"sections": {}, "plain": {}}
    for scn in a.scenarios.split(","):
        pl = plain_cpu(scn, a.seconds, perf=not a.no_perf)
        res["plain"][scn] = pl
        print("profile %-7s plain: %.0f msg/s, broker CPU %.1f us/msg" % (scn, pl["rate"], pl["cpu_us_per_msg"]))
        for row in (pl.get("perf") or [])[:12]:
            print("    perf %5.1f%%  %-28s %s" % (row.get("pct", 0), row.get("dso", "")[:28], row.get("symbol", "")))
        try:
            s = sections(scn, a.seconds)
        except Exception as e:  # reported, and the other scenarios still run
            print("profile %-7s instrumented run failed: %s" % (scn, e))
            res["sections"][scn] = {"error": str(e)[-1500:]}
            continue
        res["sections"][scn] = s
        print("profile %-7s instrumented: %.0f msg/s, %.1f us/msg CPU; wrapper %.2f us/call; "
              "reads/msg %.3f (%.0f B each), writes/msg %.3f (%.0f B each)" % (
                  scn, s["rate_instrumented"], s["cpu_us_per_msg_instrumented"], s["wrapper_overhead_us_per_call"],
                  s["reads_per_msg"], s["bytes_per_read"], s["writes_per_msg"], s["bytes_per_write"]))
        for row in s["rows"][:12]:
            print("    %-24s self %6.2f us/msg  incl %6.2f us/msg  %5.2f calls/msg  %6.2f us/call" % (
                row["fn"], row["self_us_per_msg"], row["incl_us_per_msg"], row["calls_per_msg"], row["us_per_call"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print("profile: results in %s" % a.out)


if __name__ == "__main__":
    main()
