"""The capacity section of docs/memory.md is that of the last `make capacity`.

docs/capacity.json is what tools/bench/capacity.py recorded: per board, how
many retained topics, offline sessions, queued messages and live clients
fit on the twin. The part of docs/memory.md between its capacity markers is
written from it by tools/bench/capdocs.py. These tests fail when that part
is not what capdocs.render() makes of the record (a count edited by hand,
or a record without its text), when the record misses a board `make
capacity` measures or was taken with other profile settings than the
current ones, and when it no longer shows issue 18's hub fitting on an
esp32. Nothing is measured here. Fix: `make capacity` (measures again,
about 4 minutes), or `.venv/bin/python tools/bench/capacity.py --docs-only`
when only the text is behind.
"""
import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools" / "bench"))
import capdocs  # noqa: E402
import memdocs  # noqa: E402

FIX = "run `make capacity` (or `.venv/bin/python tools/bench/capacity.py --docs-only` when only the text is behind)"


def record():
    return json.loads(capdocs.RECORD.read_text())


def test_docs_section_is_the_last_recorded_run():
    got = capdocs.generated(capdocs.DOC.read_text())
    assert got == capdocs.render(record()), "docs/memory.md's capacity section does not match docs/capacity.json: " + FIX


def test_the_section_comes_after_what_memreport_writes():
    # memdocs writes docs/memory.md up to the section and keeps the rest.
    text = capdocs.DOC.read_text()
    assert text.count(capdocs.BEGIN) == 1 and text.count(capdocs.END) == 1, FIX
    tail = memdocs.own_part(text)[1]
    assert tail.startswith(capdocs.BEGIN) and tail.endswith(capdocs.END + "\n"), FIX


def test_the_record_covers_the_measured_boards_on_their_current_profile():
    rec = record()["boards"]
    missing = sorted(set(capdocs.MEASURED) - set(rec))
    assert not missing, "docs/capacity.json lacks %s: %s" % (", ".join(missing), FIX)
    for board, r in rec.items():
        p = json.loads((REPO / "boards" / (board + ".json")).read_text())
        now = dict({"heap": p["heap"]}, **{k: p["config"][k] for k in capdocs.PROFILE_KEYS})
        then = {k: r.get(k) for k in now}
        assert then == now, "boards/%s.json changed since the last make capacity: %s -> %s; %s" % (
            board, then, now, FIX)


def test_issue_18s_hub_fits_on_an_esp32():
    # Issue 18's sensor hub: 200 retained values, 16 sleeping sensors with
    # persistent sessions, 32 alerts queued for one of them.
    r = record()["boards"]["esp32"]
    for key, least in (("retained", 200), ("sessions", 16), ("queued", 32)):
        m = r[key]
        if key == "queued" and "count" not in m and "failed" not in m:
            continue  # not measured
        assert "failed" not in m, "esp32 %s: the measurement failed: %s" % (key, m["failed"])
        assert m["count"] >= least, "esp32 holds only %d %s (issue 18 needs %d); measured by make capacity" % (
            m["count"], capdocs.ITEMS[key][0], least)
