"""Smoke test of the sensor-network simulation (tools/sim): a few seconds,
one fault (broker kill -9 and restart with persistence), then the report's
accounting: no acknowledged message lost, the counts add up."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_sim_kill9_accounting(tmp_path):
    p = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sim" / "sim.py"), "--board", "esp32", "--seconds", "4",
         "--sensors", "2", "--rate", "10", "--qos", "1", "--retain", "--fault", "kill9@2:0.5",
         "--drain", "8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    t = rep["totals"]
    assert rep["kills"], rep["faults"]
    assert t["generated"] >= 60
    assert t["acknowledged"] > 0
    assert t["lost_acknowledged"] == 0
    sub = rep["subscribers"]["sub0"]
    assert sub["lost_acknowledged"] == 0
    # every acknowledged message was delivered: delivered >= acknowledged
    assert sub["delivered"] >= t["acknowledged"]
    # accounting adds up per sensor
    for s in rep["sensors"].values():
        assert s["sent"] <= s["generated"]
        assert s["acknowledged"] <= s["sent"]
        assert s["sent"] + s["pending_left"] + s["dropped_in_sensor_buffer"] >= s["generated"] - 1
    # retained state survived the kill
    assert all(v["ok"] for v in rep["retained"].values()), rep["retained"]
    assert (tmp_path / "summary.md").exists()
    assert rep["heap_used_max"] is not None
