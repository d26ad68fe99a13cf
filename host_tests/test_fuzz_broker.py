"""Fuzzing the running broker (tools/fuzz/fuzz.py) under MicroPython with
the esp32 profile's heap: random bytes, mutated packets of every type in
both versions, invalid UTF-8, wildcard and $share abuse, property abuse,
slow-drip CONNECTs and half-open sockets, while a normal subscriber and a
normal publisher keep working.

One run per module (FUZZ_SECONDS, default 45, plus about 15 s of checks);
the seed is fixed unless FUZZ_SEED is set (FUZZ_SEED=random picks one), and is printed and written with
the report to host_tests/artifacts/fuzz-<seed>.txt. Replay one case by hand:
`.venv/bin/python tools/fuzz/fuzz.py --seed S --only N`; a longer run:
`.venv/bin/python tools/fuzz/fuzz.py --seed S --seconds 600 [--persistence]`.
"""
import os
import random
import sys
from pathlib import Path

import pytest

from brokerproc import BrokerProc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools" / "fuzz"))
import fuzz  # noqa: E402

SECONDS = float(os.environ.get("FUZZ_SECONDS", "45"))
# A fixed default keeps `make test` deterministic; FUZZ_SEED=random (or any
# number) explores. Seed 3997896285 leaves one subscription and one retained
# message behind after cleanup: an open bug, see the closing note.
SEED = os.environ.get("FUZZ_SEED") or "790185167"
if SEED == "random":
    SEED = str(random.randrange(1 << 32))
# The esp32 profile persists to flash; BrokerProc turns that off unless
# FUZZ_PERSISTENCE=1 (see the closing note of issue 9: with it on, the
# 220 KB host heap runs out under fuzzing).
CONFIG = {"sys_interval": 1, "persistence": os.environ.get("FUZZ_PERSISTENCE") == "1", "allow_anonymous": True}


@pytest.fixture(scope="module")
def run():
    print("\nfuzz seed %s (FUZZ_SEED=%s to replay)" % (SEED, SEED))
    b = BrokerProc(board="esp32", config=CONFIG).start()
    try:
        rep = fuzz.fuzz(b.port, SEED, seconds=SECONDS, broker=b)
        alive = b.alive()
        log = b.log()
    finally:
        b.stop()
        b.tmp.cleanup()
    if not alive or [f for f in rep.findings if f[0].startswith("log:")]:
        # Find the guilty case on fresh brokers and minimize it.
        fuzz.investigate(rep, SEED, "esp32", None, CONFIG, budget=80)
    text = rep.text()
    art = HERE / "artifacts"
    art.mkdir(exist_ok=True)
    (art / ("fuzz-%s.txt" % SEED)).write_text(text + "\n")
    if rep.findings or not alive:
        (art / ("fuzz-%s-broker.log" % SEED)).write_text(log)
    print(text)
    rep.alive = alive
    rep.log = log
    return rep


def findings(rep, *prefixes):
    out = [f for f in rep.findings if f[0].startswith(prefixes)]
    return "\n".join("%s: %s%s" % (w, d, "\n  " + c.describe() if c is not None else "") for w, d, c in out)


def test_fuzzing_runs_thousands_of_seeded_cases(run):
    assert run.cases >= 1000, "only %d cases (seed %s)" % (run.cases, SEED)
    assert set(run.by_kind) == set(fuzz.KINDS), run.by_kind


def test_broker_stays_alive_through_fuzzing(run):
    assert run.alive, "broker died (seed %s):\n%s\n%s" % (SEED, findings(run, "crash"), run.log[-3000:])


def test_broker_log_has_no_traceback_and_no_internal_error(run):
    assert "Traceback" not in run.log, run.log[run.log.index("Traceback") - 500:][:3000]
    assert not findings(run, "log:", "minimized", "not reproduced"), "seed %s:\n%s" % (
        SEED, findings(run, "log:", "minimized", "not reproduced"))


def test_broker_answers_are_valid_mqtt(run):
    assert not findings(run, "invalid answer"), findings(run, "invalid answer")


def test_normal_clients_sessions_stay_intact_while_fuzzed(run):
    assert run.ticks >= SECONDS * 0.6, "the normal publisher published only %d ticks" % run.ticks
    assert not findings(run, "normal", "session", "new client", "setup"), "seed %s:\n%s" % (
        SEED, findings(run, "normal", "session", "new client", "setup"))
    assert run.ticks_seen == run.ticks


def test_slowloris_and_half_open_sockets_are_closed_by_connect_timeout(run):
    assert [r for r in run.slow if r[0] == "slowloris"], "the slowloris phase did not run"
    assert not findings(run, "slow client"), findings(run, "slow client")


def test_heap_returns_to_its_baseline_after_fuzzing(run):
    assert run.heap_base is not None and run.heap_end is not None
    assert not findings(run, "heap"), findings(run, "heap")
    assert run.counts_end[0] == "0" and run.counts_end[2] == "0", \
        "sessions or subscriptions left after cleanup: %s" % (run.counts_end,)
