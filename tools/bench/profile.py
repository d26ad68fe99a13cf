"""Where our broker's time goes per message, on the board twin.

Two views of the same scenarios (fan-in, fan-out, QoS 1 by default), each
with the broker on the twin at the esp32 heap and the bench's config
(bench.OURS_CONFIG: the shipped one, raised only as far as the scenarios
need):

1. Plain: the uninstrumented broker. Broker CPU per message delivered
   (from /proc/PID/stat), and `perf record` of it when perf is there: the
   twin binary is stripped, so its sample addresses are named from the
   linker map the build leaves (build/twin/obj-broker/micropython.map).
2. Sections: the broker under tools/bench/mp_profile.py, which wraps the
   functions of the publish path with ticks_us timers at run time
   (firmware/ is not touched). Per function: self time, measured (each
   wrapper subtracts the wrapped calls it made), less the cost of the
   wrappers of the calls it made (per call: the instrumented CPU per
   message less the plain one, over the wrapped calls per message), as a
   share of the broker's own time; the rest ran outside the wrapped
   functions (the reader and flusher loops, asyncio, socket reads). The
   shares applied to the plain broker's CPU per message give microseconds
   per message. Also reads, socket writes and publisher pauses per message.

The broker runs on one CPU and the load generator on the others (when
there are two or more), in both views.

    python tools/bench/profile.py [--seconds 3] [--scenarios fanin,fanout,qos1]
        [--out build/bench/profile.json] [--no-perf]
"""
import argparse
import asyncio
import bisect
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
from brokers import Ours, cpu_seconds  # noqa: E402
from bench import OURS_CONFIG  # noqa: E402
from brokerproc import twin_binary  # noqa: E402


def load(b, scn, seconds):
    # Runs the scenario against started broker b: (result, broker CPU s,
    # messages delivered). The broker and the load generator run on CPUs
    # of their own where there are two: a socket write that wakes the
    # generator then does not hand the broker's CPU to it in the middle of
    # a timed function.
    mine = os.sched_getaffinity(0)
    pin = len(mine) >= 2
    if pin:
        cpus = sorted(mine)
        os.sched_setaffinity(b.pid, {cpus[0]})
        os.sched_setaffinity(0, set(cpus[1:]))
    try:
        c0 = cpu_seconds(b.pid)
        r = asyncio.run(loadgen.run_scenario(scn, b.port, seconds, auth=b.credentials))
        cpu = cpu_seconds(b.pid) - c0
    finally:
        if pin:
            os.sched_setaffinity(0, mine)
    return r, cpu, max(1, r.get("delivered") or 0)


def sections(scn, seconds, plain_us):
    """The instrumented run; plain_us: the plain broker's CPU per message."""
    with Ours("twin", OURS_CONFIG, script=str(HERE / "mp_profile.py")) as b:
        r, cpu, n = load(b, scn, seconds)
        time.sleep(1.3)  # the next stats dump
        try:
            prof = json.loads(Path(b.bp.cfgpath + ".profile.json").read_text())
        except (OSError, ValueError):
            raise RuntimeError("no profile stats written: " + b.log()[-2000:])
    st = {k: v for k, v in prof["stats"].items() if v[2]}
    calls = sum(v[2] for v in st.values())
    kids = sum(v[3] for v in st.values())
    total = 1e6 * cpu
    # What a wrapped call costs, all told: the instrumented broker's CPU per
    # message beyond the plain one's, over the wrapped calls per message. A
    # wrapper's cost lands in the function it was called from (or outside
    # all of them, for the outermost calls), and is taken out there.
    ov = max(0.0, (total / n - plain_us) / (calls / n))
    own = max(1.0, total - calls * ov)
    rows = []
    raw = 0
    for name, (incl, self_raw, k, made) in st.items():
        raw += self_raw
        rows.append({"fn": name, "self_us": max(0.0, self_raw - made * ov), "incl_us_per_msg": incl / n,
                     "calls_per_msg": k / n, "us_per_call": incl / k})
    rows.append({"fn": "(outside the wrapped functions: reader and flusher loops, asyncio, socket reads)",
                 "self_us": max(0.0, total - raw - (calls - kids) * ov), "incl_us_per_msg": 0,
                 "calls_per_msg": 0, "us_per_call": 0})
    for row in rows:
        row["share"] = 100 * row.pop("self_us") / own
        row["cpu_us_per_msg"] = row["share"] * plain_us / 100
    rows.sort(key=lambda x: -x["share"])
    c = prof["count"]
    return {
        "scenario": scn, "rate_instrumented": r.get("rate"), "delivered": n,
        "broker_cpu_s": cpu, "cpu_us_per_msg_instrumented": total / n, "wrapped_calls_per_msg": calls / n,
        "wrapper_overhead_us_per_call": ov, "shares_sum": sum(x["share"] for x in rows),
        "reads_per_msg": c["recv_into"] / n, "bytes_per_read": c["recv_bytes"] / max(1, c["recv_into"]),
        "writes_per_msg": (c["write_now"] + c["send"]) / n,
        "bytes_per_write": (c["write_bytes"] + c["send_bytes"]) / max(1, c["write_now"] + c["send"]),
        "pauses_per_msg": c["pauses"] / n,
        "rows": rows, "lost": r.get("lost"), "not_wrapped": prof.get("missing", []),
    }


def plain(scn, seconds, perf=True):
    """CPU per message of the uninstrumented broker; perf samples if asked."""
    out = {"scenario": scn}
    with Ours("twin", OURS_CONFIG) as b:
        pp = pdata = None
        if perf and shutil.which("perf"):
            fd, pdata = tempfile.mkstemp(prefix="bench_perf_", suffix=".data")
            os.close(fd)
            pp = subprocess.Popen(["perf", "record", "-F", "1999", "-o", pdata, "-p", str(b.pid)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        r, cpu, n = load(b, scn, seconds)
        if pp is not None:
            pp.send_signal(signal.SIGINT)
            try:
                pp.wait(20)
            except subprocess.TimeoutExpired:
                pp.kill()
                pp.wait(5)
    out.update({"rate": r.get("rate"), "delivered": n, "broker_cpu_s": cpu, "cpu_us_per_msg": 1e6 * cpu / n,
                "lost": r.get("lost")})
    if pdata:
        out["perf"] = perf_top(pdata)
        os.unlink(pdata)
    return out


def text_symbols(mapfile):
    """(sorted start addresses, [(start, size, name)]) of the functions in
    a GNU ld map of a build with -ffunction-sections (.text.NAME sections)."""
    syms = []
    pending = None
    try:
        lines = open(mapfile).read().splitlines()
    except OSError:
        return [], []
    for line in lines:
        parts = line.split()
        if line.startswith(" .text.") and parts:
            pending = parts[0][len(".text."):]
            parts = parts[1:]
        if pending is not None and len(parts) >= 2 and parts[0].startswith("0x") and parts[1].startswith("0x"):
            start, size = int(parts[0], 16), int(parts[1], 16)
            if size:
                syms.append((start, size, pending))
            pending = None
    syms.sort()
    return [s[0] for s in syms], syms


def perf_top(pdata, n=20):
    # Self samples per function, as percentages; addresses in the stripped
    # twin named from its linker map.
    try:
        rep = subprocess.run(["perf", "report", "-i", pdata, "--stdio", "--no-children", "--sort", "dso,sym"],
                             capture_output=True, text=True, timeout=120).stdout
    except Exception as e:
        return [{"error": repr(e)}]
    starts, syms = text_symbols(Path(twin_binary()).parent / "obj-broker" / "micropython.map")
    agg = {}
    for line in rep.splitlines():
        parts = line.split()
        if len(parts) < 4 or line.lstrip().startswith("#") or not parts[0].endswith("%"):
            continue
        try:
            pct = float(parts[0].rstrip("%"))
        except ValueError:
            continue
        dso, sym = parts[1], " ".join(parts[3:])
        if sym.startswith("0x") and dso == "micropython" and starts:
            a = int(sym, 16)
            i = bisect.bisect_right(starts, a) - 1
            if i >= 0 and a < syms[i][0] + syms[i][1]:
                sym = syms[i][2]
        agg[(dso, sym)] = agg.get((dso, sym), 0.0) + pct
    rows = [{"pct": v, "dso": k[0], "symbol": k[1]} for k, v in agg.items()]
    rows.sort(key=lambda r: -r["pct"])
    return rows[:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--scenarios", default="fanin,fanout,qos1")
    ap.add_argument("--run-id", default=os.environ.get("BENCH_RUN_ID", ""))
    ap.add_argument("--out", default=str(REPO / "build" / "bench" / "profile.json"))
    ap.add_argument("--no-perf", action="store_true")
    a = ap.parse_args()
    res = {"run_id": a.run_id, "platform": "twin", "config": OURS_CONFIG, "scenarios": {}}
    for scn in a.scenarios.split(","):
        s = res["scenarios"][scn] = {}
        pl = s["plain"] = plain(scn, a.seconds, perf=not a.no_perf)
        print("profile %-7s plain: %.0f msg/s, broker CPU %.1f us/msg" % (scn, pl["rate"] or 0, pl["cpu_us_per_msg"]))
        for row in (pl.get("perf") or [])[:10]:
            print("    perf %5.1f%%  %-16s %s" % (row.get("pct", 0), row.get("dso", "")[:16], row.get("symbol", "")))
        try:
            sec = s["sections"] = sections(scn, a.seconds, pl["cpu_us_per_msg"])
        except Exception as e:  # reported, and the other scenarios still run
            print("profile %-7s instrumented run failed: %s" % (scn, e))
            s["sections"] = {"error": str(e)[-1500:]}
            continue
        print("profile %-7s instrumented: %.0f msg/s, %.1f us/msg CPU; wrapper %.2f us/call; reads/msg %.3f "
              "(%.0f B each), writes/msg %.3f (%.0f B each), pauses/msg %.3f" % (
                  scn, sec["rate_instrumented"] or 0, sec["cpu_us_per_msg_instrumented"],
                  sec["wrapper_overhead_us_per_call"], sec["reads_per_msg"], sec["bytes_per_read"],
                  sec["writes_per_msg"], sec["bytes_per_write"], sec["pauses_per_msg"]))
        for row in sec["rows"][:14]:
            print("    %5.1f%%  %6.2f us/msg  %5.2f calls/msg  %-40s" % (
                row["share"], row["cpu_us_per_msg"], row["calls_per_msg"], row["fn"]))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print("profile: results in %s" % a.out)


if __name__ == "__main__":
    main()
