"""The memory figures in the docs are those of the last `make memreport`.

docs/memory.json is what tools/bench/memreport.py recorded; README.md
(section Memory), boards/README.md (its profile table and code paths) and
docs/memory.md are written from it by tools/bench/memdocs.py. These tests
fail when the text differs from what that file gives (someone edited a
figure by hand, or the record changed without the docs), when the record
misses a board or was taken with other profile settings than the current
ones, and when a hand-written memory figure creeps back in next to the
generated ones. Fix: `make memreport` (measures again, about 20 minutes),
or `.venv/bin/python tools/bench/memreport.py --docs-only` when only the
text is behind.
"""
import json
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools" / "bench"))
import memdocs  # noqa: E402

RECORD = REPO / "docs" / "memory.json"
FIX = "run `.venv/bin/python tools/bench/memreport.py --docs-only` (or make memreport to measure again)"


def record():
    return json.loads(RECORD.read_text())


@pytest.mark.parametrize("name", ["README.md", "boards/README.md", "docs/memory.md"])
def test_docs_match_the_last_recorded_run(name):
    want = memdocs.render(record())[name]
    text = (REPO / name).read_text()
    # docs/memory.md: all of it but the capacity section (test_capacity_docs.py).
    got = memdocs.own_part(text)[0].rstrip("\n") if name.startswith("docs/") else memdocs.generated(text, name)
    want = want.rstrip("\n")
    assert got == want, "%s does not match docs/memory.json: %s" % (name, FIX)


def test_the_record_covers_every_board_with_its_current_profile():
    rec = record()["boards"]
    profiles = sorted(p.stem for p in (REPO / "boards").glob("*.json"))
    assert sorted(rec) == profiles, "docs/memory.json lacks boards: run make memreport"
    for board, r in rec.items():
        p = json.loads((REPO / "boards" / (board + ".json")).read_text())
        now = {"heap": p["heap"], "max_connections": p["config"]["max_connections"],
               "min_free_heap": p["config"]["min_free_heap"], "persistence": p["config"]["persistence"]}
        then = {k: r[k] for k in now}
        assert then == now, "boards/%s.json changed since the last make memreport: %s -> %s" % (board, then, now)


def _outside_markers(text):
    i = text.index(memdocs.BEGIN)
    j = text.index(memdocs.END)
    return text[:i] + text[j:]


def test_no_hand_written_memory_figures_beside_the_generated_ones():
    readme = (REPO / "README.md").read_text()
    mem = readme[readme.index("## Memory\n"):]
    mem = _outside_markers(mem[: mem.index("\n## ", 3)])
    assert not re.search(r"\d[\d,.]*\s*(KB|kB|KiB|B\b|bytes)", mem), mem
    boards = (REPO / "boards" / "README.md").read_text()
    assert "host_heap" not in boards and "host_heap" not in readme
    # The old 64-bit figures, quoted as if they were a board's.
    for stale in ("117 KB", "96 KB", "3.6 KB"):
        assert stale not in readme and stale not in boards, stale
