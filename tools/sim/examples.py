#!/usr/bin/env python3
"""The example of docs/sim.md, run for real: can a Pico W carry 4 sensors
at 10 msg/s with retained state?

    make sim-docs
    build/bench-venv/bin/python tools/sim/examples.py [--docs-only]

Runs tools/sim/sim.py four times on the pico_w profile (RUNS: the same 20 s
network, with and without duty cycling, faults, retain and a QoS 0
subscriber), records what each run reported in docs/sim.json, with the
commit, the date and the machine's load, and from it writes the part of
docs/sim.md between its sim-examples markers, and docs/sim.png, the plot
of the run `make sim` makes. It needs matplotlib for the plot (make
sim-docs runs it with the bench venv's Python). --docs-only writes
docs/sim.md again from docs/sim.json, without running anything.

host_tests/test_sim_docs.py fails when that part of docs/sim.md is not
what render() makes of docs/sim.json, when the record is of other runs or
of other profile settings than the current ones, and when docs/sim.png is
not the recorded run's.
"""
import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import sim  # noqa: E402

BOARD = "pico_w"
SECONDS = 20
# (what the run is, sim.py's arguments besides --board and --seconds). The
# second is `make sim`'s default run (mk/bench.mk: kill -9 at 40 % of the
# run, a 3 s stall of sub0 at 70 %); its plot becomes docs/sim.png.
RUNS = [
    ("all sensors always connected", "--retain --drain 5"),
    ("duty cycle 3 s/1 s, kill -9 at 8 s, 3 s subscriber stall at 14 s (= `make sim`)",
     "--retain --awake 3 --asleep 1 --fault kill9@8 --fault stall@14:sub0:3"),
    ("duty cycle, no retain", "--awake 3 --asleep 1"),
    ("duty cycle, retained, subscriber at QoS 0", "--awake 3 --asleep 1 --retain --sub-qos 0"),
]
PLOTTED = 1  # RUNS index of the plotted run
# Profile settings the table depends on; the test compares them with the
# current profile.
PROFILE_KEYS = ("max_connections", "max_connection_rate", "max_queued_messages", "max_inflight_messages",
                "store_max_bytes", "persistence", "autosave_interval", "allow_anonymous", "min_free_heap")
RECORD = REPO / "docs" / "sim.json"
DOC = REPO / "docs" / "sim.md"
PNG = REPO / "docs" / "sim.png"
OUT = REPO / "build" / "sim-examples"
BEGIN = "<!-- sim-examples:begin (written by tools/sim/examples.py from docs/sim.json; do not edit) -->"
END = "<!-- sim-examples:end -->"
# What a run keeps in the record: sim.py's report without its samples.
KEEP = ("config", "duration_s", "totals", "subscribers", "retained", "kills", "heap_used_max", "heap_free_min",
        "store_used_max", "store_bytes_written", "store_commits", "store_erases_estimated", "store_erases_per_s",
        "store_counted_s", "fs_size", "heap", "connections_needed", "verdict")


def _commit():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=str(REPO)).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "lib", "firmware", "tools/sim",
                            "host_tests/brokerproc.py"], capture_output=True, text=True, cwd=str(REPO)).stdout
    return head + ("+changes" if dirty.strip() else "")


def run_one(i, args):
    out = OUT / str(i + 1)
    if out.exists():
        shutil.rmtree(out)
    load = os.getloadavg()[0]
    cmd = [sys.executable, str(HERE / "sim.py"), "--board", BOARD, "--seconds", str(SECONDS),
           "--out", str(out)] + args.split()
    print("sim-docs: run %d of %d: %s" % (i + 1, len(RUNS), " ".join(cmd[2:])), flush=True)
    p = subprocess.run(cmd, cwd=str(REPO), timeout=SECONDS + 180, capture_output=True, text=True)
    sys.stdout.write("".join("  " + x + "\n" for x in p.stdout.splitlines()))
    rep_path = out / "report.json"
    if not rep_path.exists():
        raise SystemExit("sim-docs: run %d wrote no report (exit %d):\n%s" % (i + 1, p.returncode, p.stderr[-3000:]))
    rep = json.loads(rep_path.read_text())
    kept = {k: rep.get(k) for k in KEEP}
    kept["exit"] = p.returncode
    kept["load_before"] = round(load, 2)
    kept["broker_log_problems"] = [x for x in (out / "broker.log").read_text(errors="replace").splitlines()
                                   if "Traceback" in x or "MemoryError" in x or x.startswith("E ")]
    return kept


def measure():
    runs = []
    for i, (name, args) in enumerate(RUNS):
        r = run_one(i, args)
        r["name"] = name
        r["args"] = args
        runs.append(r)
    png = OUT / str(PLOTTED + 1) / "sim.png"
    if not png.exists():
        raise SystemExit("sim-docs: no plot (matplotlib missing?): run it as `make sim-docs`")
    prof = sim.board_profile(BOARD)
    return {
        "command": "make sim-docs", "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(), "board": BOARD, "seconds": SECONDS,
        "profile": dict({"heap": prof["heap"], "fs_size": prof["fs_size"]},
                        **{k: prof["config"][k] for k in PROFILE_KEYS}),
        "png_sha256": hashlib.sha256(png.read_bytes()).hexdigest(),
        "runs": runs,
    }, png


def _n(x):
    return "{:,}".format(x)


def _s(ms):
    # An age: milliseconds below a second, else seconds.
    if ms is None:
        return "-"
    return "%.0f ms" % ms if ms < 1000 else "%.1f s" % (ms / 1000.0)


def setup(rec):
    p = rec["profile"]
    return ("All runs: the `%s` profile on the board twin (MicroPython v1.28.0 unix port, 32-bit, broker frozen in) "
            "with the profile's heap of %s B and its shipped config: persistence on, password authentication "
            "(allow_anonymous %s), max_connection_rate %d per 10 s per address, max_connections %d, "
            "max_queued_messages %d, max_inflight_messages %d, store_max_bytes %d KiB on a file system of %d KiB, "
            "autosave_interval %d s, min_free_heap %s B; sys_interval 1. Each run: 4 sensors x 10 msg/s, QoS 1, 1 subscriber with a "
            "persistent session, %d s, so %d connections when nobody sleeps." % (
                rec["board"], _n(p["heap"]), str(p["allow_anonymous"]).lower(), p["max_connection_rate"],
                p["max_connections"], p["max_queued_messages"], p["max_inflight_messages"],
                p["store_max_bytes"] // 1024, p["fs_size"] // 1024, p["autosave_interval"], _n(p["min_free_heap"]),
                rec["seconds"],
                rec["runs"][0]["connections_needed"]))


def _days(r):
    days, _ = sim.days_to_wear_out(r)
    return "%.0f" % days if days is not None else "-"


def table(rec):
    out = ["| run | extra arguments | delivered / generated | lost (acked) | age p99 | connect refusals "
           "| PUBLISH refused | heap used max / free min | store erases/s (est.) | days to 100,000 cycles "
           "| verdict |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["runs"]:
        t = r["totals"]
        s0 = r["subscribers"]["sub0"]
        ok = r["verdict"]["ok"]
        out.append("| %s | `%s` | %s/%s | %d | %s | %d | %d | %s / %s B | %s | %s | %s |" % (
            r["name"], r["args"], _n(s0["delivered"]), _n(t["generated"]), t["lost_acknowledged"],
            _s(s0["latency_ms_p99"]) if ok else "**%s**" % _s(s0["latency_ms_p99"]), t["connect_refusals"],
            t["refused_by_broker"], _n(r["heap_used_max"]), _n(r["heap_free_min"]),
            "%.2f" % r["store_erases_per_s"] if r["store_erases_per_s"] is not None else "-", _days(r),
            "yes" if ok else "**no**"))
    return out


def details(rec):
    out = []
    for i, r in enumerate(rec["runs"]):
        s0 = r["subscribers"]["sub0"]
        kills = "; ".join("kill -9 at %.1f s, broker down %.2f s" % (k["at"], k["down_s"]) for k in r["kills"])
        ret = r["retained"]
        if ret is None:
            ret = "not retained"
        elif all(isinstance(v, dict) and v.get("ok") for v in ret.values()):
            ret = "retained state current"
        else:
            ret = "retained state STALE"
        out.append("- Run %d: %sage p50 %s, max %s; duplicates %d, out of order %d, sessions lost %d; "
                   "%s commits, %s B written, %s erases estimated over %s s; %s; load average %.2f before."
                   % (i + 1, kills + "; " if kills else "", _s(s0["latency_ms_p50"]),
                      _s(s0["latency_ms_max"]), s0["duplicates"], s0["out_of_order"], s0["sessions_lost"],
                      _n(r["store_commits"] or 0), _n(r["store_bytes_written"] or 0), r["store_erases_estimated"],
                      r["store_counted_s"], ret, r["load_before"]))
        for line in r["broker_log_problems"][:3]:
            out.append("  broker.log: `%s`" % line)
    return out


def render(rec):
    pool = sim.lifetime.pool_blocks(rec["board"], rec["profile"]["fs_size"] // 4096)
    out = ["Measured by `%s` (tools/sim/examples.py) at commit %s, %s, on this %d-core host with other jobs "
           "running (load average before each run below): timings, the age above all, are this host's." % (
               rec["command"], rec["commit"], rec["date"], rec["cpus"]), "", setup(rec), ""]
    out += table(rec)
    out += ["", "Age: reading taken -> delivered to sub0. Refusals: CONNACK 0x97 (connection table full) and "
            "PUBLISH acknowledgements with a reason >= 0x80, each tried again by the client. Flash: the store's "
            "`$SYS/broker/store/block erases estimated`, summed over the broker's lives (it counts from 0 after "
            "a restart), per second of the run; days = %s cycles x %d blocks (the wear pool that "
            "tools/wear/lifetime.py assumes for %s) / erases per second / 86,400." % (
                _n(sim.lifetime.CYCLES), pool, rec["board"]), ""]
    out += details(rec)
    return "\n".join(out)


def splice(text, block):
    i = text.find(BEGIN)
    j = text.find(END)
    if i < 0 or j < i:
        raise SystemExit("sim-docs: %s has no %s ... %s markers" % (DOC, BEGIN, END))
    return text[: i + len(BEGIN)] + "\n" + block + "\n" + text[j:]


def generated(text):
    i = text.find(BEGIN)
    j = text.find(END)
    if i < 0 or j < i:
        raise ValueError("docs/sim.md has no sim-examples markers")
    return text[i + len(BEGIN) + 1: j - 1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs-only", action="store_true", help="write docs/sim.md from docs/sim.json, run nothing")
    a = ap.parse_args(argv)
    if a.docs_only:
        rec = json.loads(RECORD.read_text())
    else:
        rec, png = measure()
        RECORD.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
        shutil.copyfile(png, PNG)
    block = render(rec)
    DOC.write_text(splice(DOC.read_text(), block))
    print(block)
    lost = sum(r["totals"]["lost_acknowledged"] for r in rec["runs"])
    if lost:
        print("sim-docs: %d acknowledged messages lost: a broker bug (build/sim-examples/*/broker.log)" % lost)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
