"""Fuzzing the running broker (tools/fuzz/fuzz.py) on the board twin with
the esp32 board's shipped defaults at its heap: persistence on, anonymous
clients refused (the fuzzer's clients log in as the test user, a few cases
with no or wrong credentials), the connection-rate limit on. Random bytes,
mutated packets of every type in both versions, invalid UTF-8, wildcard
and $share abuse, property abuse, slow-drip CONNECTs and half-open
sockets, while a normal subscriber and a normal publisher keep working.
Afterwards heap, session table and store are back at their baseline.

Seeds: the fixed ones below, then RANDOM_SEEDS new random ones, all
printed at the start; a seed that ever fails joins FIXED_SEEDS, its bug
fixed. FUZZ_SEED=S runs only seed S (FUZZ_SEED=random: one random seed),
FUZZ_SECONDS sets each seed's share. The report goes to
host_tests/artifacts/fuzz-<seeds>.txt; findings name seed and case.
Replay one case by hand: `.venv/bin/python tools/fuzz/fuzz.py --seed S
--only N`; a longer run: `.venv/bin/python tools/fuzz/fuzz.py --seed S
--seconds 600`.
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

# 790185167: the default since the fuzzer was written. Each other one
# failed once; the bug it found is fixed and has a test of its own:
# 3997896285  left a retained message on a '$' topic (mutated from
#             "$foo/bar") that no filter reaches: the cleanup now clears
#             every topic a case sent a retained message or will to; later
#             a store commit out of heap lost its batch (test_store.py,
#             ..._keeps_the_batch_for_the_next);
# 1187        a MemoryError growing the store's record buffer left it None
#             and wedged the store (test_store.py, ..._leaves_the_store_usable);
# 90210       a session resumed with Session Expiry 0 left its queued and
#             in-flight records on flash (test_broker_05_session.py,
#             ..._leaves_nothing_on_flash);
# 424242      a writer that found no free heap piece for its output buffer
#             dropped the normal subscriber (test_broker_16_backpressure.py,
#             test_a_writer_without_an_output_buffer_waits...);
# 1278507185  (its share of a make test run) a PUBACK held for a commit
#             found no output buffer and its client was closed (the same
#             test).
# 1379710798  (60 s alone) the heap stayed 6 KB above its baseline; the
#             same seed again 3 KB, four runs on one broker did not add
#             up: bounded tables reaching their size, not a leak. The
#             check now runs the warm-up's cases again and fails when the
#             heap grows further or stays over twice the margin.
# A seed's cases change with the generator, so these are fixed seeds to
# run, not replays of the old failures: those are the tests named.
FIXED_SEEDS = ["790185167", "3997896285", "1187", "90210", "424242", "1278507185", "1379710798",
               "3730514751"]  # (a will's delay over 2^28 - 1 s broke its teardown: 899f2a2)
RANDOM_SEEDS = 2
_env = os.environ.get("FUZZ_SEED")
if _env:
    SEEDS = [str(random.randrange(1 << 32)) if _env == "random" else _env]
else:
    SEEDS = FIXED_SEEDS + [str(random.randrange(1 << 32)) for _ in range(RANDOM_SEEDS)]
# One session (one broker, one warm-up and baseline, one set of checks at
# the end) runs the seeds one after the other: the first longest, with the
# slow-client phase (it needs connect_timeout + 4 s) over the last
# stretch; about 95 s in all.
_secs = os.environ.get("FUZZ_SECONDS")
SECONDS = [float(_secs)] * len(SEEDS) if _secs else [20.0] + [7.0] * (len(SEEDS) - 1)


@pytest.fixture(scope="module")
def run(request):
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\nfuzz seeds: %s (replay one: FUZZ_SEED=<seed>)" % ", ".join(
            "%s (%s)" % (s, "fixed" if s in FIXED_SEEDS else "random") for s in SEEDS), flush=True)
    b = BrokerProc(board="esp32", config=fuzz.CONFIG).start()
    try:
        rep = fuzz.fuzz(b.port, SEEDS, seconds=SECONDS, broker=b)
        alive = b.alive()
        log = b.log()
        if alive:
            fuzz.check_store(rep, b)
    finally:
        b.stop()
        b.tmp.cleanup()
    if not alive or [f for f in rep.findings if f[0].startswith("log:")]:
        # Find the guilty case on fresh brokers and minimize it.
        fuzz.investigate(rep, "esp32", None, fuzz.CONFIG, budget=80)
    text = rep.text()
    art = HERE / "artifacts"
    art.mkdir(exist_ok=True)
    name = "fuzz-%s" % "-".join(SEEDS)
    (art / (name + ".txt")).write_text(text + "\n")
    if rep.findings or not alive:
        (art / (name + "-broker.log")).write_text(log)
    rep.alive = alive
    rep.log = log
    return rep


def findings(rep, *prefixes):
    out = [f for f in rep.findings if f[0].startswith(prefixes)]
    return "\n".join("%s: %s%s" % (w, d, "\n  " + c.describe() if c is not None else "") for w, d, c in out)


def test_fuzzing_runs_every_kind_of_case_of_every_seed(run):
    # About 80 cases a second on a quiet host (four workers, each waiting
    # up to 0.25 s for an answer; every login costs the broker a PBKDF2);
    # far fewer means the broker stalled.
    assert run.cases >= 40 * sum(SECONDS), "only %d cases (seeds %s)" % (run.cases, run.seed)
    assert set(run.by_kind) == set(fuzz.KINDS), run.by_kind
    assert set(run.by_seed) == set(SEEDS), run.by_seed


def test_broker_stays_alive_through_fuzzing(run):
    assert run.alive, "broker died (seed %s):\n%s\n%s" % (run.seed, findings(run, "crash"), run.log[-3000:])


def test_broker_log_has_no_traceback_and_no_internal_error(run):
    assert "Traceback" not in run.log, run.log[run.log.index("Traceback") - 500:][:3000]
    assert not findings(run, "log:", "minimized", "not reproduced"), "seed %s:\n%s" % (
        run.seed, findings(run, "log:", "minimized", "not reproduced"))


def test_broker_answers_are_valid_mqtt(run):
    assert not findings(run, "invalid answer"), findings(run, "invalid answer")


def test_normal_clients_sessions_stay_intact_while_fuzzed(run):
    assert run.ticks >= sum(SECONDS) * 0.6, "the normal publisher published only %d ticks" % run.ticks
    assert not findings(run, "normal", "session", "new client", "setup"), "seed %s:\n%s" % (
        run.seed, findings(run, "normal", "session", "new client", "setup"))
    assert run.ticks_seen == run.ticks


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
