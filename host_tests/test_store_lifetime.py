"""The flash lasts ten years on a wall (issue 13): the broker's own
persistence code on each board's simulated LittleFS, driven by a sensor
hub's write pattern (tools/wear/mp_hub_wear.py: 8 sensors re-publishing
retained QoS 0 values every 10 s, a QoS 1 alert a minute to a persistent
session, a dashboard), projected at 100,000 erase cycles. The table in
docs/store.md is this run's: it fails when the code's wear changes and the
table was not written again (tools/wear/lifetime.py --write)."""
import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools" / "wear"))
import lifetime  # noqa: E402


def test_esp32_and_pico_w_flash_last_ten_years_and_docs_quote_this_run():
    rec = json.loads(lifetime.RECORD.read_text())
    quoted = {m["board"]: m for m in rec["results"]}
    for board in ("esp32", "pico_w"):
        m = lifetime.run_board(board, rec["hours"])
        print("%s: %d erases/day, %.1f years" % (board, m["erases_per_day"], m["years"]))
        assert m["years"] >= 10, m
        q = quoted[board]
        for k in ("erases", "commits", "bytes_written", "hottest_block_erases"):
            assert m[k] == q[k], ("docs/lifetime.json is stale for %s (%s: ran %s, recorded %s): run "
                                  "tools/wear/lifetime.py --write" % (board, k, m[k], q[k]))
    doc = lifetime.DOC.read_text()
    assert lifetime.table(rec["results"], rec["hours"]) in doc, "docs/store.md lifetime table is stale"
