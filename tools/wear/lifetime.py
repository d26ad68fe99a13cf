#!/usr/bin/env python3
"""Flash lifetime of each board on a sensor hub's real write pattern.

    tools/wear/lifetime.py [--hours 6] [--boards esp32,esp32s3,pico_w,pico2_w] [--write]

Runs tools/wear/mp_hub_wear.py (the broker's own persistence code on a
simulated flash formatted as the board's LittleFS, driven through its
packet handlers on a simulated clock) on the board twin for each board,
and projects the flash lifetime at 100,000 erase cycles per block.

LittleFS levels wear dynamically over the blocks it allocates, and moves a
metadata pair once it has been erased block_cycles (100, MicroPython's
setting) times, so the erases of a day spread over the blocks that do not
hold static files. That pool is assumed to be the filesystem minus what holds
code, config and logs: 256 KiB (64 blocks), or 208 KiB (52) on the Pico W's
848 KiB.

--write records the run in docs/lifetime.json and rewrites the table in
docs/store.md between its lifetime markers; host_tests/test_store_lifetime.py
fails when that table no longer matches a new run.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tools"))
import twin  # noqa: E402

BOARDS = ["esp32", "esp32s3", "pico_w", "pico2_w"]
CYCLES = 100000
STATIC_BLOCKS = 64  # 256 KiB of code, config and logs
RECORD = REPO / "docs" / "lifetime.json"
DOC = REPO / "docs" / "store.md"
BEGIN = "<!-- lifetime:begin (tools/wear/lifetime.py --write) -->"
END = "<!-- lifetime:end -->"


def pool_blocks(board, blocks):
    # The wear-levelling pool: the filesystem's blocks minus the static ones.
    return blocks - (STATIC_BLOCKS if board != "pico_w" else 52)


def run_board(board, hours):
    r = subprocess.run([str(twin.build()), "-X", "heapsize=16M", "tools/wear/mp_hub_wear.py", board,
                        str(int(hours * 3600))], capture_output=True, text=True, cwd=str(REPO),
                       env={"MICROPYPATH": ".frozen:host_tests"}, timeout=1800)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode or not lines:
        raise SystemExit("lifetime: %s failed:\n%s\n%s" % (board, r.stdout[-2000:], r.stderr[-2000:]))
    m = json.loads(lines[-1])
    pool = m["pool_blocks"] = pool_blocks(board, m["blocks"])
    m["years"] = round(CYCLES * pool / m["erases_per_day"] / 365, 1)
    return m


def table(results, hours):
    out = [BEGIN,
           "Measured by `tools/wear/lifetime.py --hours %g --write` (a simulated %g hours of the hub, "
           "per board):" % (hours, hours), "",
           "| board | erases / day | commits / day | bytes written / day | most erased block (in the run) "
           "| wear pool (blocks) | lifetime at 100,000 cycles |",
           "|---|---|---|---|---|---|---|"]
    for m in results:
        days = m["seconds"] / 86400
        out.append("| %s | %d | %d | %d | %d | %d of %d | %.1f years |" % (
            m["board"], round(m["erases_per_day"]), round(m["commits"] / days),
            round(m["bytes_written"] / days), m["hottest_block_erases"], m["pool_blocks"], m["blocks"],
            m["years"]))
    out.append(END)
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=6)
    ap.add_argument("--boards", default=",".join(BOARDS))
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    results = [run_board(bd, a.hours) for bd in a.boards.split(",")]
    t = table(results, a.hours)
    print(t)
    if a.write:
        RECORD.write_text(json.dumps({"hours": a.hours, "results": results}, indent=1, sort_keys=True) + "\n")
        doc = DOC.read_text()
        if BEGIN in doc:
            doc = doc[:doc.index(BEGIN)] + t + doc[doc.index(END) + len(END):]
        else:
            doc += "\n" + t + "\n"
        DOC.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
