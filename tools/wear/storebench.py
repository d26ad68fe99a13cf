#!/usr/bin/env python3
"""The flash store's measured figures in docs/store.md, from one recorded run.

    .venv/bin/python tools/wear/storebench.py [--wear] [--docs-only]

Runs the store's benchmarks on the board twin (host_tests/mp_store_bench.py
on the simulated LittleFS flash of each board, host_tests/mp_store_ram.py
on the host filesystem), records what they print in docs/storebench.json
and writes the tables of docs/store.md between their markers from that
record. About a minute. The wear-levelling run (160,000 messages, about
two minutes) is repeated only with --wear; without it the recorded one is
kept. --docs-only writes the docs from the record without measuring.
host_tests/test_doc_figures.py fails when the text differs from what the
record renders.
"""
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tools" / "wear"))
import docregion  # noqa: E402
import lifetime  # noqa: E402

RECORD = "docs/storebench.json"
COMMAND = "`tools/wear/storebench.py`"
DOC = "docs/store.md"
BOARDS = ["esp32", "pico_w"]
INLINE = {"esp32": 128, "pico_w": 512}  # mp_store_bench.py's inline_max: the filesystems' own limits
MESSAGES = 3000  # write amplification
BASELINE_MESSAGES = 1000
SPLIT_MESSAGES = 1000
RAM_RECORDS = [500, 2000]
WEAR_MARKS = [20000, 40000, 100000, 160000]
SIZES = [64, 200, 400, 1000]
RAW = 84  # bytes of one message: a 20-byte key and a 64-byte value
BENCH_PY = "host_tests/mp_store_bench.py"
# What the figures depend on: a change here since the commit is marked "+changes" in the record.
WATCHED = ("lib", "firmware", BENCH_PY, "host_tests/mp_store_ram.py", "host_tests/flashsim.py")


def _twin(args, heap="16M"):
    return docregion.twin_run(str(args[0]), args[1:], heap=heap)


def _lines(out, tag):
    return [line.split()[1:] for line in out.splitlines() if line.startswith(tag + " ")]


def _files(board):
    return [{"board": b, "size": int(s), "way": w, "erases": float(e)}
            for b, s, w, e in _lines(_twin([BENCH_PY, "files", board]), "FILE")]


def _bench():
    return [{"board": r[0], "workload": r[1], "batch": int(r[2]), "msgs": int(r[3]), "bytes": float(r[4]),
             "est_blocks": float(r[5]), "erases": float(r[6])}
            for r in _lines(_twin([BENCH_PY, MESSAGES]), "BENCH")]


def _baseline(board):
    return [{"board": b, "design": d, "batch": int(n), "msgs": int(m), "erases": float(e)}
            for b, d, n, m, e in _lines(_twin([BENCH_PY, "baseline", BASELINE_MESSAGES, board]), "BASE")]


def _split(board):
    return [{"board": b, "size": int(s), "batch": int(n), "way": w, "erases": float(e)}
            for b, s, n, w, e in _lines(_twin([BENCH_PY, "split", SPLIT_MESSAGES, board]), "SPLIT")]


def _ram():
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in RAM_RECORDS:
            d = Path(tmp) / ("st%d" % n)
            _twin(["host_tests/mp_store_ram.py", d, "build", n], heap="110K")
            r = dict(kv.split("=") for kv in _lines(_twin(["host_tests/mp_store_ram.py", d, "measure", n],
                                                          heap="110K"), "RESULT")[-1])
            rows.append(dict({k: int(v) for k, v in r.items()}, written=n))
    return rows


def _wear():
    out = _twin([BENCH_PY, "wear", ",".join(map(str, WEAR_MARKS)), "pico_w"])
    return [{"board": r[0], "msgs": int(r[1]), "blocks": int(r[3]), "max": int(r[4]), "mean": float(r[5]),
             "never": int(r[6]), "median": int(r[7])} for r in _lines(out, "WEAR")]


def measure(wear, old):
    jobs = [_bench] + [lambda b=b: _files(b) for b in BOARDS] + [lambda b=b: _split(b) for b in BOARDS] + \
        [lambda b=b: _baseline(b) for b in BOARDS] + [_ram]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda f: f(), jobs))
    blocks = json.loads(_twin(["import flashsim, json\nprint(json.dumps(dict((b, v['blocks']) for b, v in "
                               "flashsim.BOARDS.items())))\n"]))
    rec = dict(docregion.stamp(WATCHED), blocks={b: blocks[b] for b in BOARDS}, bench=done[0],
               files=done[1] + done[2], split=done[3] + done[4],
               baseline=done[5] + done[6], ram=done[7], messages=MESSAGES, baseline_messages=BASELINE_MESSAGES,
               split_messages=SPLIT_MESSAGES)
    if wear or not old or "wear" not in old:
        rec["wear"] = dict(docregion.stamp(WATCHED), rows=_wear())
    else:
        rec["wear"] = old["wear"]
    return rec


# ---- rendering ----

def _bench_row(rec, board, workload, batch):
    for r in rec["bench"]:
        if (r["board"], r["workload"], r["batch"]) == (board, workload, batch):
            return r
    raise KeyError((board, workload, batch))


def worst(rec, board, batch):
    """Erases per message of the dearer workload."""
    return max(_bench_row(rec, board, w, batch)["erases"] for w in ("queue", "retained"))


def files_md(rec):
    cost = {(r["board"], r["size"], r["way"]): r["erases"] for r in rec["files"]}
    sizes = sorted({r["size"] for r in rec["files"]})
    ways = [("new", "new file"), ("rename", "temp + rename"), ("overwrite", "overwrite existing")]
    out = ["The measured cost of one durable small write follows, from `mp_store_bench.py files BOARD` "
           "(erases per write, with 16 such files alive in the directory; an overwrite in bold where the file "
           "is stored inline):", "",
           "| file size | " + " | ".join("%s: %s" % (b, w) for b in BOARDS for _, w in ways) + " |",
           "|---" * (1 + len(BOARDS) * len(ways)) + "|"]
    for s in sizes:
        cells = []
        for b in BOARDS:
            for w, _ in ways:
                c = "%.3f" % cost[(b, s, w)]
                cells.append("**%s**" % c if w == "overwrite" and s <= INLINE[b] else c)
        out.append("| %d B | %s |" % (s, " | ".join(cells)))
    ratios = [cost[("pico_w", s, "new")] / cost[("pico_w", s, "overwrite")] for s in sizes if s <= INLINE["pico_w"]]
    out += ["", "- A new file costs three metadata commits: the create, the close, and the remove later. Rewriting "
            "an existing file costs one, at `close()`. On the Pico W each metadata commit is padded to the "
            "256-byte program size, so there a new file costs %.1f to %.1f times an overwrite." % (min(ratios),
                                                                                                 max(ratios)),
            "- Files above the inline limit cost one block erase whatever you do. The limit is %d bytes on esp32 "
            "(the platform notes say about 120) and %d on rp2 (`INLINE` in mp_store_bench.py; the first size "
            "above it costs a whole erase)." % (INLINE["esp32"], INLINE["pico_w"])]
    return "\n".join(out)


def split_md(rec):
    c = {(r["board"], r["size"], r["batch"], r["way"]): r["erases"] for r in rec["split"]}
    out = ["Measured with the queue workload below, %d messages per cell (`mp_store_bench.py split %d BOARD`), "
           "erases per message:" % (rec["split_messages"], rec["split_messages"]), "",
           "| value size | esp32 batch 1 | esp32 batch 10 | pico_w batch 1 | pico_w batch 10 |",
           "|---|---|---|---|---|"]
    for s in SIZES:
        cells = []
        for b in BOARDS:
            for n in (1, 10):
                cell = "%.3f" % c[(b, s, n, "cost-model")]
                if (b, s, n, "whole") in c:
                    cell += " (%.3f written whole)" % c[(b, s, n, "whole")]
                if (b, s, n, "always-cut") in c:
                    cell += " (%.3f if always cut)" % c[(b, s, n, "always-cut")]
                cells.append(cell)
        out.append("| %d B | %s |" % (s, " | ".join(cells)))
    out += ["", "(\"Written whole\" is `split_max=0`; \"always cut\" is the cost model turned off.)"]
    return "\n".join(out)


def ram_md(rec):
    out = ["Measured by `mp_store_ram.py` on the twin (32-bit, as on the boards; "
           "`test_open_needs_bounded_ram` runs it too). The GC runs before every file read and the live heap is "
           "sampled:", "",
           "| store opened | data | peak during `open()` | held after `open()` | peak during `items()` |",
           "|---|---|---|---|---|"]
    for r in rec["ram"]:
        what = "%d records" % r["written"]
        if r["records"] != r["written"]:
            what += " (%d live after 20 log batches)" % r["records"]
        out.append("| %s | %s B | %s B | %s B | %s B |" % (what, format(r["data_bytes"], ","), format(r["peak"], ","),
                                                      format(r["held"], ","), format(r["items_peak"], ",")))
    return "\n".join(out)


def amplification_md(rec):
    out = ["| board | workload | batch | bytes written / msg | est. blocks / msg | **erases / msg** |",
           "|---|---|---|---|---|---|"]
    for r in rec["bench"]:
        out.append("| %s | %s | %d | %.0f | %.3f | **%.3f** |" % (r["board"], r["workload"], r["batch"], r["bytes"],
                                                                 r["est_blocks"], r["erases"]))
    inline = [r["erases"] for r in rec["files"]
              if r["board"] == "pico_w" and r["way"] == "overwrite" and r["size"] <= INLINE["pico_w"]]
    out += ["", "The estimate is close on esp32. On rp2 an inline write really costs %.2f to %.2f erases "
            "(the overwrites in the first table) rather than 0.06, because every metadata commit there is padded "
            "to 256 bytes. The constant is the agreed one; read rp2's estimate as a lower bound." % (min(inline),
                                                                                                   max(inline))]
    return "\n".join(out)


def _num(x):
    return "%.2f" % x if x >= 10 else "%.3f" % x


def baseline_md(rec):
    c = {(r["board"], r["design"], r["batch"]): r["erases"] for r in rec["baseline"]}
    designs = [("rewrite", "whole state (with the 40 KiB cold part) to a temp file + rename (Mosquitto autosave)"),
               ("append", "append each batch to one log file"), ("newfile", "a new file per batch")]
    out = ["The same queue workload through simpler designs (`mp_store_bench.py baseline %d BOARD`), erases per "
           "message:" % rec["baseline_messages"], "",
           "| design | esp32 batch 1 | esp32 batch 10 | pico_w batch 1 | pico_w batch 10 |", "|---|---|---|---|---|"]
    for d, what in designs:
        out.append("| %s | %s |" % (what, " | ".join(_num(c[(b, d, n)]) for b in BOARDS for n in (1, 10))))
    out.append("| **this store** (also logs the deletes, compacts, and recovers from any cut; %d messages) | %s |" % (
        rec["messages"], " | ".join("**%.3f**" % _bench_row(rec, b, "queue", n)["erases"]
                                    for b in BOARDS for n in (1, 10))))
    big = [r["bytes"] for r in rec["bench"] if r["batch"] == 100]
    out += ["", "At 100 messages a batch the store writes %.0f to %.0f bytes per %d-byte message, %.1f to %.1f "
            "times the raw data. Only the data itself remains to save there." % (
                min(big), max(big), RAW, min(big) / RAW, max(big) / RAW)]
    return "\n".join(out)


def _kib(n):
    return "%d MiB" % (n // 1024) if n % 1024 == 0 else "%d KiB" % n


def _life(seconds):
    days = seconds / 86400
    return "%.1f years" % (days / 365) if days >= 365 else "%.0f days" % days


def model_md(rec):
    pool = {b: lifetime.pool_blocks(b, rec["blocks"][b]) for b in BOARDS}
    e = {(b, n): worst(rec, b, n) for b in BOARDS for n in (1, 10, 100)}
    out = ["**Formula.** lifetime = B × C / (R × e)", "",
           "- C = %s erase cycles per 4 KiB block (the boards' flash datasheets; PLATFORM.md)." % format(
               lifetime.CYCLES, ","),
           "- B = blocks in the wear-levelling pool. LittleFS levels wear dynamically, so only blocks that are "
           "free or get rewritten share the erases; blocks holding static files never do. Assumed "
           "(`lifetime.pool_blocks()`):"]
    for b in BOARDS:
        n, static = rec["blocks"][b], rec["blocks"][b] - pool[b]
        out.append("  - %s (%s, %d blocks): %d, with %d blocks (%s) of code, certificates, config and cold "
                   "data%s" % (b, _kib(4 * n), n, pool[b], static, _kib(4 * static), "." if b == BOARDS[-1] else ";"))
    out += ["- R = acknowledged messages per second, each stored once (and deleted once when delivered).",
            "- e = measured erases per message, the worse of the two workloads (the write amplification table "
            "above):"]
    for b in BOARDS:
        out.append("  - %s: %.3f at batch 1, %.3f at batch 10, %.3f at batch 100%s" % (
            b, e[(b, 1)], e[(b, 10)], e[(b, 100)], "." if b == BOARDS[-1] else ";"))
    out += ["- Batch size depends on load, because a commit covers whatever arrived while the previous one ran. "
            "A batch larger than R would hold acknowledgements back for more than a second, so those cells are "
            "left empty.", "", "| | batch 1 | batch 10 | batch 100 |", "|---|---|---|---|"]
    for b in BOARDS:
        for rate in (1, 10, 100):
            cells = [_life(pool[b] * lifetime.CYCLES / (rate * e[(b, n)])) if n <= rate else "—"
                     for n in (1, 10, 100)]
            out.append("| **%s, %d msg/s** | %s |" % (b, rate, " | ".join(cells)))
    auto = {(r["board"]): r["erases"] for r in rec["baseline"] if r["design"] == "rewrite" and r["batch"] == 1}
    out += ["", "For comparison, the Mosquitto-style autosave (%s) lasts %s at 1 msg/s." % (
        ", ".join("%.1f erases per message on %s" % (auto[b], b) for b in BOARDS),
        " and ".join("%s on %s" % (_life(pool[b] * lifetime.CYCLES / auto[b]), b) for b in BOARDS))]
    return "\n".join(out)


def levelling_md(rec):
    w = rec["wear"]
    rows = w["rows"]
    out = ["**Is the levelling even?** The pico_w queue workload ran at batch 1 for %s messages "
           "(`mp_store_bench.py wear %s pico_w`, recorded by `tools/wear/storebench.py --wear` at commit %s, %s):" % (
               format(rows[-1]["msgs"], ","), ",".join(str(r["msgs"]) for r in rows), w["commit"],
               w["date"]), "",
           "| messages | mean erases per block | max | median |", "|---|---|---|---|"]
    for r in rows:
        out.append("| %s | %.0f | %d | %d |" % (format(r["msgs"], ","), r["mean"], r["max"], r["median"]))
    last = rows[-1]
    lead = last["max"] - last["mean"]
    out += ["", "The erases go mostly to the store directory's metadata pair. LittleFS moves that pair to other "
            "blocks after `block_cycles` = 100 erases, the value MicroPython sets, so the hottest block leads the "
            "mean, by %.0f erases at the end of the run. The ratio of maximum to mean falls as the run goes on "
            "(%s). Against %s cycles that lead is %.1f%%, so the formula uses the mean. %s" % (
                lead, ", ".join("%.1f" % (r["max"] / r["mean"]) for r in rows), format(lifetime.CYCLES, ","),
                100 * lead / lifetime.CYCLES,
                "Every block was erased at least once." if last["never"] == 0 else
                "%d of %d blocks were never erased." % (last["never"], last["blocks"]))]
    return "\n".join(out)


REGIONS = [docregion.Region("store-files", DOC, files_md), docregion.Region("store-split", DOC, split_md),
           docregion.Region("store-ram", DOC, ram_md), docregion.Region("store-amplification", DOC, amplification_md),
           docregion.Region("store-baseline", DOC, baseline_md), docregion.Region("store-model", DOC, model_md),
           docregion.Region("store-levelling", DOC, levelling_md)]


def main():
    old = docregion.load(RECORD) if (REPO / RECORD).exists() else None
    return docregion.main(sys.modules[__name__], lambda a: measure(a.wear, old),
                          [(["--wear"], {"action": "store_true",
                                         "help": "run the wear-levelling benchmark again (about 2 minutes)"})])


if __name__ == "__main__":
    sys.exit(main())
