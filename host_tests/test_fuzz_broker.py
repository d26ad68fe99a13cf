"""Fuzzing the running broker (tools/fuzz/fuzz.py) on the board twin with
the esp32 board's shipped defaults at its heap: persistence on, anonymous
clients refused (the fuzzer's clients log in as the test user, a few cases
with no or wrong credentials), the connection-rate limit on. Random bytes,
mutated packets of every type in both versions, invalid UTF-8, wildcard
and $share abuse, property abuse, slow-drip CONNECTs and half-open
sockets, while a normal subscriber and a normal publisher keep working.
Afterwards heap, session table and store are back at their baseline.

Seeds: the fixed ones below (the first with the slow-client phase), then
RANDOM_SEEDS new random ones, each printed and in the test ids; a seed
that ever fails joins FIXED_SEEDS, its bug fixed. FUZZ_SEED=S runs only
seed S (FUZZ_SEED=random: one random seed), FUZZ_SECONDS sets every run's
length. Reports go to host_tests/artifacts/fuzz-<seed>.txt. Replay one
case by hand: `.venv/bin/python tools/fuzz/fuzz.py --seed S --only N`; a
longer run: `.venv/bin/python tools/fuzz/fuzz.py --seed S --seconds 600`.
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

# 790185167: the default since the fuzzer was written. 3997896285 left a
# retained message on a '$' topic (mutated from "$foo/bar") that the
# cleanup could not reach by a filter: the cleanup now clears every topic
# the cases sent a retained message or a retained will to.
FIXED_SEEDS = ["790185167", "3997896285"]
RANDOM_SEEDS = 2
_env = os.environ.get("FUZZ_SEED")
if _env:
    SEEDS = [str(random.randrange(1 << 32)) if _env == "random" else _env]
else:
    SEEDS = FIXED_SEEDS + [str(random.randrange(1 << 32)) for _ in range(RANDOM_SEEDS)]
# The first seed runs longest and with the slow-client phase (it needs
# connect_timeout + 4 s); the others are shorter, to keep `make test` near
# two minutes of fuzzing in all.
_secs = os.environ.get("FUZZ_SECONDS")


def seconds(seed):
    return float(_secs) if _secs else (20.0 if seed == SEEDS[0] else 10.0)


@pytest.fixture(scope="module", params=SEEDS, ids=["seed-%s" % s for s in SEEDS])
def run(request):
    seed = request.param
    kind = "fixed" if seed in FIXED_SEEDS else "random"
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\nfuzz seed %s (%s; replay: FUZZ_SEED=%s)" % (seed, kind, seed), flush=True)
    b = BrokerProc(board="esp32", config=fuzz.CONFIG).start()
    slow = seed == SEEDS[0]
    try:
        rep = fuzz.fuzz(b.port, seed, seconds=seconds(seed), broker=b, slow=slow,
                        warmup=500 if slow else 100)
        alive = b.alive()
        log = b.log()
        if alive:
            fuzz.check_store(rep, b)
    finally:
        b.stop()
        b.tmp.cleanup()
    if not alive or [f for f in rep.findings if f[0].startswith("log:")]:
        # Find the guilty case on fresh brokers and minimize it.
        fuzz.investigate(rep, seed, "esp32", None, fuzz.CONFIG, budget=80)
    text = rep.text()
    art = HERE / "artifacts"
    art.mkdir(exist_ok=True)
    (art / ("fuzz-%s.txt" % seed)).write_text(text + "\n")
    if rep.findings or not alive:
        (art / ("fuzz-%s-broker.log" % seed)).write_text(log)
    rep.alive = alive
    rep.log = log
    rep.slow_phase = slow
    return rep


def findings(rep, *prefixes):
    out = [f for f in rep.findings if f[0].startswith(prefixes)]
    return "\n".join("%s: %s%s" % (w, d, "\n  " + c.describe() if c is not None else "") for w, d, c in out)


def test_fuzzing_runs_every_kind_of_case_at_speed(run):
    # About 80 cases a second on a quiet host (four workers, each waiting
    # up to 0.25 s for an answer; every login costs the broker a PBKDF2);
    # far fewer means the broker stalled.
    assert run.cases >= 40 * seconds(run.seed), "only %d cases (seed %s)" % (run.cases, run.seed)
    assert set(run.by_kind) == set(fuzz.KINDS), run.by_kind


def test_broker_stays_alive_through_fuzzing(run):
    assert run.alive, "broker died (seed %s):\n%s\n%s" % (run.seed, findings(run, "crash"), run.log[-3000:])


def test_broker_log_has_no_traceback_and_no_internal_error(run):
    assert "Traceback" not in run.log, run.log[run.log.index("Traceback") - 500:][:3000]
    assert not findings(run, "log:", "minimized", "not reproduced"), "seed %s:\n%s" % (
        run.seed, findings(run, "log:", "minimized", "not reproduced"))


def test_broker_answers_are_valid_mqtt(run):
    assert not findings(run, "invalid answer"), findings(run, "invalid answer")


def test_normal_clients_sessions_stay_intact_while_fuzzed(run):
    assert run.ticks >= seconds(run.seed) * 0.6, "the normal publisher published only %d ticks" % run.ticks
    assert not findings(run, "normal", "session", "new client", "setup"), "seed %s:\n%s" % (
        run.seed, findings(run, "normal", "session", "new client", "setup"))
    assert run.ticks_seen == run.ticks


@pytest.mark.parametrize("run", SEEDS[:1], indirect=True, ids=["seed-%s" % SEEDS[0]])
def test_slowloris_and_half_open_sockets_are_closed_by_connect_timeout(run):
    assert [r for r in run.slow if r[0] == "slowloris"], "the slowloris phase did not run"
    assert not findings(run, "slow client"), findings(run, "slow client")


def test_heap_sessions_and_store_return_to_their_baseline_after_fuzzing(run):
    assert run.heap_base is not None and run.heap_end is not None
    assert not findings(run, "heap"), findings(run, "heap")
    # Sessions, connections, subscriptions, retained messages: none of the
    # fuzzer's left (the normal clients' ended too).
    assert run.counts_end == ("0", "0", "0", "0"), \
        "left after cleanup (%s): %s" % (", ".join(fuzz.COUNTS), run.counts_end)
    assert run.store_end == [], findings(run, "store")
