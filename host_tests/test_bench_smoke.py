"""Smoke test of the benchmark (tools/bench): a tiny run against our broker
and Mosquitto (no amqtt here: that is `make bench`). Checks that the table
has numbers and that QoS 1 and QoS 2 lost, duplicated and reordered nothing."""
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import need

REPO = Path(__file__).resolve().parent.parent


def test_bench_tiny_run(tmp_path):
    need("mosquitto")
    brokers = "ours,mosquitto"
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench" / "bench.py"), "--brokers", brokers,
         "--scenarios", "fanin,fanout,qos1,qos2,latency,retained,conncap", "--seconds", "0.4",
         "--repeat", "1", "--cap-bound", "12", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = p.stdout
    # the table: a row per scenario with a number for every broker
    for scn in ("fanin", "fanout", "qos1", "qos2"):
        row = [l for l in text.splitlines() if l.startswith(scn + " ")]
        assert row, text
        assert re.search(r"\s\d+\s", row[-1]), row
    d = json.loads(out.read_text())
    for lab in d["labels"]:
        for scn in ("fanin", "fanout", "qos1", "qos2", "latency", "retained"):
            r = d["results"][scn][lab]
            assert "error" not in r, (scn, lab, r)
        for scn in ("fanin", "fanout", "qos1", "qos2"):
            assert d["results"][scn][lab]["rate"] > 0, (scn, lab)
        for scn in ("qos1", "qos2"):
            r = d["results"][scn][lab]
            assert r["total_lost"] == 0 and r["total_dups"] == 0 and r["total_reordered"] == 0, (scn, lab, r)
            assert r["lost_acked"] == 0 and r["bad_acks"] == 0, (scn, lab, r)
        assert d["results"]["latency"][lab]["p99_ms"] is not None
        assert d["results"]["retained"][lab]["complete_rounds"] > 0
    # our QoS 0 paths lose nothing either (backpressure, not drops)
    for scn in ("fanin", "fanout"):
        assert d["results"][scn]["ours"]["total_lost"] == 0, d["results"][scn]["ours"]
    cap = d["conncap"]
    esp = [v for k, v in cap.items() if k.startswith("ours esp32")][0]
    assert esp["accepted"] == 8 and "CONNACK" in esp["refusal"], esp
    assert cap["mosquitto"]["accepted"] == 12


def test_mosquitto_conf_nodelay(tmp_path):
    need("mosquitto")
    sys.path.insert(0, str(REPO / "tools" / "bench"))
    from brokers import Mosquitto

    with Mosquitto() as m:
        conf = Path(m.tmp.name, "mosquitto.conf").read_text()
        assert "set_tcp_nodelay true" in conf and "127.0.0.1" in conf
