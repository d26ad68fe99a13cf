"""Smoke test of the benchmark tools (tools/bench), in well under a minute:
one tiny run of each tool under one run id, as `make bench` runs them
(bench.py with ours on the twin and Mosquitto, profile.py, benchmem.py's
idle-client and per-message allocation counts; no amqtt: that is `make
bench`), then report.py on their files; and one scenario of ours on the
host. Checks that the tables have numbers, that QoS 1 and 2 lost nothing,
that our broker logged no MemoryError, that the profiler and the allocation
count still find every function of the publish path they wrap (a renamed
function fails here, not silently in the report), and that the report is
written only from files of one run."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import brokerproc
from conftest import need

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "tools" / "bench"
RUN = "smoke"


def tool(name, *args, timeout=120):
    p = subprocess.run([sys.executable, str(BENCH / name)] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    need("mosquitto")  # make test installs it; a missing one fails under CI=true
    brokers = "ours,mosquitto"
    out = {"dir": d}
    out["bench"] = tool("bench.py", "--brokers", brokers, "--platforms", "twin", "--seconds", "0.4",
                        "--repeat", "1", "--cap-bound", "12", "--run-id", RUN, "--out", d / "bench.json",
                        "--scenarios", "fanin,fanout,qos1,qos2,latency,retained,conncap")
    out["profile"] = tool("profile.py", "--seconds", "0.3", "--scenarios", "fanin", "--no-perf",
                          "--run-id", RUN, "--out", d / "profile.json")
    out["benchmem"] = tool("benchmem.py", "--only", "idle,alloc", "--messages", "100", "--run-id", RUN,
                            "--out", d / "benchmem.json")
    return out


def data(run, name):
    return json.loads((run["dir"] / name).read_text())


def test_bench_tiny_run_on_the_twin(run):
    text, d = run["bench"], data(run, "bench.json")
    # the table: a row per scenario with a number for every broker
    for scn in ("fanin", "fanout", "qos1", "qos2"):
        row = [line for line in text.splitlines() if line.startswith(scn + " ")]
        assert row, text
        assert re.search(r"\s\d+\s", row[-1]), row
    for lab in ["ours twin"] + d["others"]:
        for scn in ("fanin", "fanout", "qos1", "qos2", "latency", "retained"):
            r = d["results"][scn][lab]
            assert r["ok_runs"] == 1, (scn, lab, r)
        for scn in ("fanin", "fanout", "qos1", "qos2"):
            assert d["results"][scn][lab]["rate"] > 0, (scn, lab)
        for scn in ("qos1", "qos2"):
            r = d["results"][scn][lab]
            assert r["total_lost"] == 0 and r["total_dups"] == 0 and r["total_reordered"] == 0, (scn, lab, r)
            assert r["total_lost_acked"] == 0 and r["total_bad_acks"] == 0, (scn, lab, r)
        assert d["results"]["latency"][lab]["p99_ms"] is not None
        assert d["results"]["retained"][lab]["complete_rounds"] > 0
    ours = {scn: d["results"][scn]["ours twin"] for scn in d["results"]}
    # our QoS 0 paths lose nothing either (backpressure, not drops), and
    # nothing ran out of memory at the board's heap
    for scn in ("fanin", "fanout"):
        assert ours[scn]["total_lost"] == 0, ours[scn]
    assert all(r["total_memory_errors"] == 0 for r in ours.values()), ours
    assert d["heaps"]["ours twin"] == 110000
    cap = d["conncap"]
    shipped = cap["ours twin, shipped (max_connections 8)"]
    assert shipped["accepted"] == 8 and "CONNACK" in shipped["refusal"], shipped
    assert cap["ours twin, max_connections 12 (heap is the limit)"]["accepted"] == 12
    assert cap["mosquitto"]["accepted"] == 12
    # the targets are checked and printed
    assert re.search(r"target twin\s+fanin rate\s+>= 50000", text), text
    assert any(t["what"] == "messages lost, all scenarios" for t in d["targets"])


def test_profile_wraps_the_publish_path(run):
    s = data(run, "profile.json")["scenarios"]["fanin"]
    assert s["plain"]["cpu_us_per_msg"] > 0
    sec = s["sections"]
    assert "error" not in sec, sec
    assert sec["not_wrapped"] == [], "mp_profile.py wraps functions the broker no longer has"
    fns = {r["fn"]: r for r in sec["rows"]}
    for fn in ("Connection.dispatch", "on_publish", "decode_publish", "route", "_copy (a QoS 0 message as it came)",
               "Output.reserve", "Output.kick", "Output.write_now"):
        assert fns[fn]["calls_per_msg"] > 0, fn


def test_memory_tools(run):
    m = data(run, "benchmem.json")
    idle = m["idle"]
    assert "error" not in idle, idle
    for v in ("v4", "v5"):
        assert 100 < idle[v]["per_client"] < 10000, idle
    al = m["alloc"]
    assert "error" not in al, al
    assert al["heap"] > 100000 and al["persistence"] and al["auth"], al
    for case in ("1", "10", "b1", "5:1"):
        c = al["cases"][case]
        assert "error" not in c, c
        assert c["messages"] >= 100 and c["per_msg"] > 0, c
    # the count runs the real path: every function it wraps is there and
    # is called per message
    for case, w in al["where"].items():
        fns = {r["fn"]: r for r in w["rows"]}
        for fn in ("Connection.dispatch", "Connection._take", "on_publish", "route",
                   "_copy (a QoS 0 message as it came)", "Output.reserve", "Output.kick",
                   "Output.write_now"):
            assert fns[fn]["calls_per_msg"] > 0, (case, fn)
    assert {t["what"] for t in m["targets"]} >= {"idle 3.1.1 client + 1 subscription, B",
                                                 "heap allocated per message, keeping up 1->1, B"}
    assert "target twin" in run["benchmem"]


def test_report_from_one_run(run, tmp_path):
    md, png = tmp_path / "b.md", tmp_path / "b.png"
    tool("report.py", "--dir", run["dir"], "--md", md, "--png", png)
    page = md.read_text()
    for part in ("## Summary", "### Ours on the twin", "## Where the time goes", "### Heap per idle client",
                 "### Heap allocated per forwarded message", "## Method", "## How to run"):
        assert part in page, part
    assert "run %s" % RUN in page and "mixes runs" not in page
    # files of another run are refused
    other = tmp_path / "other"
    shutil.copytree(run["dir"], other)
    m = json.loads((other / "benchmem.json").read_text())
    m["run_id"] = "another"
    (other / "benchmem.json").write_text(json.dumps(m))
    p = subprocess.run([sys.executable, str(BENCH / "report.py"), "--dir", str(other), "--md", str(md)],
                       capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert p.returncode != 0 and "not from one run" in p.stdout + p.stderr


def test_bench_on_the_host(tmp_path):
    # ours on the 64-bit host MicroPython, code from .mpy, the unix profile's heap
    out = tmp_path / "bench.json"
    text = tool("bench.py", "--brokers", "ours", "--platforms", "host", "--seconds", "0.3", "--repeat", "1",
                "--scenarios", "fanin,qos1", "--out", out)
    d = json.loads(out.read_text())
    assert d["heaps"]["ours host"] == brokerproc.profile("unix")["heap"]
    for scn in ("fanin", "qos1"):
        assert d["results"][scn]["ours host"]["rate"] > 0, d["results"][scn]
    assert "ours on the host" in text


def test_mosquitto_conf_nodelay(tmp_path):
    need("mosquitto")
    sys.path.insert(0, str(BENCH))
    from brokers import Mosquitto

    with Mosquitto() as m:
        conf = Path(m.tmp.name, "mosquitto.conf").read_text()
        assert "set_tcp_nodelay true" in conf and "127.0.0.1" in conf
