"""Instructions the board twin runs per forwarded message, counted by valgrind.

Timings on this 2-core machine move by a tenth from one run to the next;
valgrind's count of instructions does not (two runs of one commit agree to
the instruction). So a change to the publish path can be weighed exactly,
and two commits compared, before a benchmark says what it is worth.

How: the twin's binary is stripped, so its objects are linked once more,
unstripped, into build/twin/obj-callgrind (a link, not a build). Then
mp_alloc.py runs one case under `valgrind --tool=callgrind`, at M and at 2M
messages; the difference over M is what a message costs, start-up and the
case's set-up taken out. Left out too is mp_alloc.py's own measuring: the
functions of gc.mem_alloc() (a walk of the allocation table) and of the
collections it makes between rounds. The broker's own allocations stay in,
and so does the fake clients' Python code in mp_alloc.py (the publisher's
reads, the subscriber's PUBACKs): the same for two commits, so a
difference between them is the broker's.

    python tools/bench/instr_per_msg.py [--case 1/1] [--messages 2000] [--top 20] [--heap 110000]

--case is an mp_alloc.py case (1/1: QoS 1, one publisher to one subscriber,
3.1.1). --top lists the C functions of the VM that run most per message:
lookups (mp_map_lookup), bytecode (mp_execute_bytecode), calls. Needs
valgrind (Debian's valgrind package; `make test` does not use this tool).
--heap is the twin's heap (the esp32's by default). At the esp32 heap
mp_alloc.py's rounds for ten subscribers shrink to one message each, and
the flusher writes to every subscriber after every message; with
--heap 400000 a backlog case (b10) batches as `make bench` does, a write
per ten or so deliveries.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "tools"), str(REPO / "host_tests")]  # (brokerproc: the board profiles)
import brokerproc  # noqa: E402
import twin  # noqa: E402

OBJ = twin.OUT / "obj-callgrind"
# mp_alloc.py's measuring, not the broker's work (see above).
HARNESS = ("gc_info", "gc_mark_subtree", "gc_collect_start", "gc_collect_end", "gc_collect_root",
           "gc_sweep", "gc_mem_alloc", "gc_mem_free")


def unstripped():
    # The broker twin linked again without stripping: the same objects.
    twin.build("broker")
    src, _ = twin._source()
    if OBJ.exists():
        shutil.rmtree(OBJ)
    shutil.copytree(twin.OUT / "obj-broker", OBJ, symlinks=True)
    (OBJ / "micropython").unlink()
    cmd = ["make", "-C", str(src / "ports" / "unix"), "BUILD=%s" % OBJ, "VARIANT_DIR=%s" % twin.VARIANT_DIR,
           "FROZEN_MANIFEST=%s" % twin.VARIANTS["broker"][1], "STRIP="] + twin.MAKE_FLAGS
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("instr_per_msg: linking failed:\n" + (r.stdout + r.stderr)[-2000:])
    return OBJ / "micropython"


def per_function(binary, case, messages, out, heap):
    # {function: instructions} of one mp_alloc.py run under callgrind.
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s" % out, str(binary),
           "-X", "heapsize=%d" % heap, "tools/bench/mp_alloc.py", "--board", "esp32",
           "--messages", str(messages), "--cases", case, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
    if r.returncode != 0 or "ALLOC " not in r.stdout:
        sys.exit("instr_per_msg: mp_alloc.py failed under valgrind:\n" + (r.stdout + r.stderr)[-2000:])
    # A case that failed (its set-up timed out: logins hash for seconds
    # under valgrind) did less work than a full run, and the difference of
    # two runs would mean nothing.
    res = json.loads(r.stdout.split("ALLOC ", 1)[1].splitlines()[0])["cases"][case]
    if "error" in res:
        sys.exit("instr_per_msg: case %s failed under valgrind (%d messages): %s" % (case, messages, res["error"]))
    ann = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", "--tree=none",
                          "--inclusive=no", out], capture_output=True, text=True, check=True).stdout
    cost = {}
    for line in ann.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*?)( \[.*\])?$", line)
        if m and "PROGRAM TOTALS" not in line:
            name = m.group(2).split(":")[-1].split("'")[0]
            cost[name] = cost.get(name, 0) + int(m.group(1).replace(",", ""))
    return cost


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="1/1")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--top", type=int, default=0)
    ap.add_argument("--heap", type=int, default=brokerproc.profile("esp32")["heap"])
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("instr_per_msg: needs valgrind (apt-get install valgrind)")
    binary = unstripped()
    with tempfile.TemporaryDirectory(prefix="instr_") as tmp:
        one = per_function(binary, a.case, a.messages, os.path.join(tmp, "one"), a.heap)
        two = per_function(binary, a.case, 2 * a.messages, os.path.join(tmp, "two"), a.heap)
    per = {k: (two.get(k, 0) - one.get(k, 0)) / a.messages for k in set(one) | set(two)}
    broker = sum(v for k, v in per.items() if k not in HARNESS)
    print("instr_per_msg: case %s, %d messages: %.0f instructions per message on the twin "
          "(mp_alloc.py's own measuring left out)" % (a.case, a.messages, broker))
    for k, v in sorted(((k, v) for k, v in per.items() if k not in HARNESS), key=lambda kv: -kv[1])[:a.top]:
        print("  %9.0f  %5.1f %%  %s" % (v, 100 * v / broker, k))


if __name__ == "__main__":
    main()
