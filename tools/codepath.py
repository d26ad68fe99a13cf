"""Which way a board's code may take, from the last `make memreport`.

docs/memory.json (tools/bench/memreport.py) holds, per board profile, the
heap left after a start from .mpy files on the stock board twin and the
heap an idle client takes. tools/deploy.py refuses the .mpy copy where it
does not fit, and tools/bench/memdocs.py writes the same verdict into
boards/README.md: both ask mpy_verdict() here.
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMORY = "docs/memory.json"


def memory_record(board, root=ROOT):
    # This board's results of tools/bench/memreport.py, or None.
    try:
        data = json.loads((root / MEMORY).read_text())
    except (OSError, ValueError):
        return None
    return (data.get("boards") or {}).get(board)


def mpy_verdict(rec):
    """(fits, why) for copying the broker as .mpy files, from a board's
    memreport record: it fits when the heap free after a start from .mpy
    is at least min_free_heap plus max_connections idle clients (the
    dearer of 3.1.1 and 5.0), plus one TLS session where Mbed TLS takes
    its buffers from the Python heap (the rp2 boards). fits is None when
    there is no record."""
    if rec is None:
        return None, "no measurement for this board in %s (run `make memreport`)" % MEMORY
    fr = rec["frozen"]
    client = max(fr["idle_client_v4"], fr["idle_client_v5"])
    need = rec["min_free_heap"] + rec["max_connections"] * client
    tls = rec["tls_in_heap"] if rec.get("tls_from") == "python heap" else 0
    need += tls
    mpy = rec.get("mpy") or {}
    if mpy.get("start_free") is None:
        return False, ("loaded from .mpy files the broker did not even start in the board's %d B heap (%s)"
                       % (rec["heap"], mpy.get("error", "no result")))
    code = rec.get("native_in_heap", 0)  # machine code the board copies into its heap
    have = mpy["start_free"] - code
    return have >= need, ("loaded from .mpy files it leaves %d B free after start%s; it needs min_free_heap "
                          "%d B + %d clients x %d B%s = %d B" % (
                              have, " (less %d B of machine code, copied into the heap)" % code if code else "",
                              rec["min_free_heap"], rec["max_connections"], client,
                              " + one TLS session %d B" % tls if tls else "", need))
