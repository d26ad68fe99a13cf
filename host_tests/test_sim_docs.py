"""The example of docs/sim.md is the one tools/sim/examples.py recorded.

docs/sim.json is what the last `make sim-docs` recorded; the part of
docs/sim.md between its sim-examples markers is written from it. These
tests fail when that part is not what examples.render() makes of the
record (a figure edited by hand, or a record without its text), when the
record holds other runs than examples.RUNS or was taken with other
profile settings than the current ones, when docs/sim.png is not the
recorded run's plot, and when the prose below the table quotes a figure
the record does not have. Nothing is simulated here. Fix: `make sim-docs`
(runs the four simulations again, about 2 minutes), or
`build/bench-venv/bin/python tools/sim/examples.py --docs-only` when only
the text is behind.
"""
import hashlib
import json
import re
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools" / "sim"))
import examples  # noqa: E402

FIX = "run make sim-docs (or tools/sim/examples.py --docs-only when only the text is behind)"


def record():
    return json.loads(examples.RECORD.read_text())


def test_docs_table_is_the_last_recorded_run():
    got = examples.generated(examples.DOC.read_text())
    assert got == examples.render(record()), "docs/sim.md does not match docs/sim.json: " + FIX


def test_the_record_is_of_the_example_runs_on_the_current_profile():
    rec = record()
    assert [(r["name"], r["args"]) for r in rec["runs"]] == examples.RUNS, "examples.RUNS changed: " + FIX
    assert (rec["board"], rec["seconds"]) == (examples.BOARD, examples.SECONDS), FIX
    prof = json.loads((REPO / "boards" / (examples.BOARD + ".json")).read_text())
    now = dict({"heap": prof["heap"], "fs_size": prof["fs_size"]},
               **{k: prof["config"][k] for k in examples.PROFILE_KEYS})
    assert rec["profile"] == now, "boards/%s.json changed since the last make sim-docs: %s" % (examples.BOARD, FIX)


def test_the_plot_is_the_recorded_runs():
    got = hashlib.sha256(examples.PNG.read_bytes()).hexdigest()
    assert got == record()["png_sha256"], "docs/sim.png is not the plot of docs/sim.json's run: " + FIX


def _figures(text):
    text = re.sub(r"0x[0-9A-Fa-f]+", "", text)
    return set(re.findall(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?", text))


def test_the_answer_quotes_only_the_recorded_figures():
    # Below the table the prose says what the runs show; every figure it
    # quotes must be one the generated part holds, so a new run whose
    # figures change cannot leave the old ones standing there.
    doc = examples.DOC.read_text()
    answer = doc[doc.index(examples.END):]
    missing = _figures(answer) - _figures(examples.render(record()))
    assert not missing, "docs/sim.md quotes figures that are not in docs/sim.json's run: %s" % sorted(missing)
    for stale in ("64-bit", "host heap", "360,000"):
        assert stale not in doc, stale
