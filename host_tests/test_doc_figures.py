"""Numbers that cannot go stale (issue 17).

README.md, boards/README.md and docs/ quote memory, speed and flash figures.
Each measured one comes from a command, the text says which, and it is
written from that command's record, between markers:

- tools/wear/storebench.py -> docs/storebench.json -> docs/store.md
- tools/bench/dashsizes.py -> docs/dashboard.json -> docs/dashboard.md
- tools/bench/partsmem.py  -> docs/partsmem.json  -> docs/security.md, lib/README.md

(`make doc-figures` runs the three; make memreport, make capacity, make
bench, make sim-docs and tools/wear/lifetime.py have tests of their own.)
These tests fail when such a part is not what its record renders, when a
record was taken with other inputs than the current ones, when the
reasoning of boards/README.md no longer holds by docs/memory.json, and
when a figure with a unit (bytes, KB, ms, µs, msg/s, days, years, %) stands
in the listed docs outside a generated part without an entry in ALLOWED
saying why it may (a spec constant, a config value, a measurement on a
board the text names, ...). Nothing is measured here.
"""
import json
import re
import sys

import pytest

from conftest import REPO

sys.path[:0] = [str(REPO / "tools"), str(REPO / "tools" / "wear"), str(REPO / "tools" / "bench"),
                str(REPO / "lib")]
import codepath  # noqa: E402
import dashsizes  # noqa: E402
import docregion  # noqa: E402
import partsmem  # noqa: E402
import pwhash  # noqa: E402
import storebench  # noqa: E402

TOOLS = [storebench, dashsizes, partsmem]


def fix(tool):
    path = ".venv/bin/python " + str(REPO.joinpath(tool.__file__).relative_to(REPO))
    return "run `%s --docs-only` when only the text is behind, `%s` to measure again" % (path, path)


# ---------------------------------------------------------------- generated parts


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.__name__)
def test_generated_parts_are_what_the_record_renders(tool):
    rec = docregion.load(tool.RECORD)
    bad = docregion.stale(tool.REGIONS, rec, tool.COMMAND, tool.RECORD)
    assert not bad, "%s; %s" % ("; ".join("%s, part %s: %s" % (r.doc, r.name, why) for r, why in bad), fix(tool))


def test_the_dashboard_record_is_of_the_current_page():
    rec = docregion.load(dashsizes.RECORD)["sizes"]
    mk = dashsizes.mkpage()
    _, written, minified, gz = mk.render()
    now = {"written": written, "minified": minified, "gzip": gz, "window": 1 << mk.WBITS}
    then = {k: rec[k] for k in now}
    assert then == now, "www/dashboard.html changed since docs/dashboard.json (%s -> %s): %s" % (
        then, now, fix(dashsizes))


def test_the_records_were_taken_with_the_current_settings():
    rec = docregion.load(partsmem.RECORD)
    assert rec["iterations"] == pwhash.ITERATIONS, "pwhash.ITERATIONS changed: " + fix(partsmem)
    assert rec["users"] == partsmem.USERS, fix(partsmem)
    rec = docregion.load(storebench.RECORD)
    then = (rec["messages"], rec["baseline_messages"], rec["split_messages"], [r["written"] for r in rec["ram"]],
            [r["msgs"] for r in rec["wear"]["rows"]])
    now = (storebench.MESSAGES, storebench.BASELINE_MESSAGES, storebench.SPLIT_MESSAGES, storebench.RAM_RECORDS,
           storebench.WEAR_MARKS)
    assert then == now, "tools/wear/storebench.py's settings changed since its record: " + fix(storebench) + \
        (" --wear" if then[-1] != now[-1] else "")


# ---------------------------------------------------------------- reasoning against docs/memory.json


def profile(board):
    return json.loads((REPO / "boards" / (board + ".json")).read_text())


def memory(board):
    return json.loads((REPO / "docs" / "memory.json").read_text())["boards"][board]


def test_the_boards_tls_reasoning_holds_by_the_memory_record():
    # boards/README.md, "Why these numbers": one TLS session on the ESP32
    # and the Pico W, four on the ESP32-S3, three on the Pico 2 W; on the
    # Pico W one TLS connection fits in min_free_heap; on the Pico 2 W three
    # fit next to the broker loaded from .mpy files and min_free_heap.
    # README.md: a TLS connection's input buffer alone is over 16 KiB.
    sessions = {b: profile(b)["tls_sessions"] for b in ("esp32", "esp32s3", "pico_w", "pico2_w")}
    assert sessions == {"esp32": 1, "esp32s3": 4, "pico_w": 1, "pico2_w": 3}, \
        "boards/README.md quotes these tls_sessions: %s" % sessions
    for board in ("pico_w", "pico2_w"):
        tls = memory(board)["tls_in_heap"]
        assert tls > 16 * 1024
        p = profile(board)
        floor = p["config"]["min_free_heap"]
        if board == "pico_w":
            assert tls <= floor, "pico_w: a TLS connection (%d B, docs/memory.json) no longer fits in " \
                                 "min_free_heap %d: fix boards/README.md or the profile" % (tls, floor)
        # After a start on the board's code path (tools/codepath.py: .mpy
        # files where they fit, else frozen).
        path = "mpy" if codepath.mpy_verdict(memory(board))[0] else "frozen"
        free = memory(board)[path]["start_free"]
        need = p["tls_sessions"] * tls + floor
        assert need <= free, "%s: %d TLS sessions x %d B + min_free_heap %d > %d B free after a start (%s, " \
                             "docs/memory.json): fix boards/README.md or the profile" % (
                                 board, p["tls_sessions"], tls, floor, free, path)


def test_the_config_values_the_docs_quote_are_the_profiles():
    kib = 1024
    quoted = [  # (board, where in the profile, value as the docs say it)
        ("esp32s3", ("heap",), 2 * kib * kib), ("esp32s3", ("config", "store_max_bytes"), kib * kib),
        ("esp32s3", ("fs_size",), 6 * kib * kib), ("pico_w", ("heap",), 180000), ("pico2_w", ("heap",), 450000),
        ("pico_w", ("config", "store_max_bytes"), 256 * kib), ("pico_w", ("fs_size",), 848 * kib),
        ("pico2_w", ("config", "store_max_bytes"), kib * kib), ("pico2_w", ("fs_size",), 2560 * kib),
        ("pico_w", ("c_stack",), 7936), ("pico_w", ("config", "min_free_heap"), 32768),
        ("esp32", ("config", "store_inline_max"), 120), ("pico_w", ("config", "store_inline_max"), 500),
        ("unix", ("heap",), 4000000),
    ]
    for board, keys, want in quoted:
        v = profile(board)
        for k in keys:
            v = v[k]
        assert v == want, "boards/%s.json %s is %r; README.md / boards/README.md say %r" % (
            board, ".".join(keys), v, want)


# ---------------------------------------------------------------- hand-written figures

SCANNED = ["README.md", "boards/README.md", "docs/store.md", "docs/security.md", "docs/dashboard.md",
           "docs/bridge.md", "lib/README.md", "tools/README.md", "host_tests/README.md"]
# Parts written from a record: their tests check them (test_memory_docs.py,
# test_store_lifetime.py, and the ones above).
GENERATED = {"memreport", "lifetime"} | {r.name for t in TOOLS for r in t.REGIONS}
REGION = re.compile(r"<!-- ([\w-]+):begin .*?-->.*?<!-- \1:end -->", re.S)
FIGURE = re.compile(r"(?<![\w.$/-])(\d[\d,.]*(?:\s*(?:–|-|to)\s*\d[\d,.]*)?)(?:\s*|-)"
                    r"(KiB|KB|kB|MiB|MB|bytes|byte|B|ms|µs|us|msg/s|years|year|days|day|%)(?![\w/])")

SPEC = "spec constant"
CONFIG = "config value"
CODE = "constant in the code"
BOARD = "board measurement, see text"
ONCE = "measured once, the text says where and that nothing repeats it"
ESTIMATE = "estimate, the text says so and what it rests on"

# (file, figure, why). Every entry must match something, and every reason
# must be true: a measured figure belongs in a record, not here.
ALLOWED = [
    ("README.md", "120 B", CONFIG + ": store_inline_max of boards/esp32.json (checked above)"),
    ("README.md", "500 B", CONFIG + ": store_inline_max of boards/pico_w.json (checked above)"),
    ("README.md", "128 bytes", CODE + ": the client id limit"),
    ("README.md", "1 to 23 bytes", SPEC + ": MQTT's client id range a server must take"),
    ("README.md", "65,535 bytes", SPEC + ": the longest topic MQTT allows (a two-byte length)"),
    ("README.md", "1024 bytes", CODE + ": the store's key limit"),
    ("README.md", "100 ms", CODE + ": persist._RETRY_MS and server._OOM_WAIT_MS"),
    ("README.md", "500 ms", CODE + ": transport.DRAIN_IN_MS"),
    ("README.md", "2 KB", CODE + ": heap._PIECE x _PIECES, the heap kept aside for the store's commit"),
    ("README.md", "256 B", CODE + ": heap._PIECE, one piece of the heap kept aside for the store's commit"),
    ("tools/README.md", "44 B", CODE + ": MicroPython's VM_MAX_STATE_ON_STACK on 32 bits (tools/frames.py)"),
    ("host_tests/README.md", "44 B", CODE + ": MicroPython's VM_MAX_STATE_ON_STACK on 32 bits (tools/frames.py)"),
    ("README.md", "16 KiB", SPEC + ": the largest TLS record, MicroPython's MBEDTLS_SSL_IN_CONTENT_LEN (checked "
                            "against docs/memory.json above)"),
    ("README.md", "250 ms", ESTIMATE + " (docs/security.md)"),
    ("boards/README.md", "110-150 KB", BOARD + ": PLATFORM.md's readings of an ESP32's free heap at boot"),
    ("boards/README.md", "40-50 KB", BOARD + ": PLATFORM.md's readings of what Wi-Fi takes on an ESP32"),
    ("boards/README.md", "8 MB", "hardware: the ESP32-S3 module's PSRAM (PLATFORM.md)"),
    ("boards/README.md", "2 MiB", CONFIG + ": esp32s3 heap (checked above)"),
    ("boards/README.md", "1 MiB", CONFIG + ": store_max_bytes of esp32s3 and pico2_w (checked above)"),
    ("boards/README.md", "6 MiB", CONFIG + ": esp32s3 fs_size (checked above)"),
    ("boards/README.md", "180 KB", CONFIG + ": pico_w heap (checked above)"),
    ("boards/README.md", "256 KiB", CONFIG + ": pico_w store_max_bytes (checked above)"),
    ("boards/README.md", "848 KiB", CONFIG + ": pico_w fs_size (checked above)"),
    ("boards/README.md", "4 KiB", "hardware: the flash block, and the log ring's file size (" + CODE + ")"),
    ("boards/README.md", "7936-byte", CONFIG + ": pico_w c_stack (checked above)"),
    ("boards/README.md", "450 KB", CONFIG + ": pico2_w heap (checked above)"),
    ("boards/README.md", "2.5 MiB", CONFIG + ": pico2_w fs_size (checked above)"),
    ("boards/README.md", "1-32 bytes", SPEC + ": an SSID's length (IEEE 802.11)"),
    ("boards/README.md", "3 bytes", CODE + ": the chip id bytes in the default host name"),
    ("boards/README.md", "128 KiB", "MicroPython's partitions-4MiB-romfs.csv: its ROMFS partition"),
    ("boards/README.md", "8388 ms", "hardware: the rp2 watchdog's longest timeout (PLATFORM.md)"),
    ("docs/store.md", "4 KiB", "hardware: the flash block"),
    ("docs/store.md", "1 KiB", CODE + ": the key limit; and the benchmark's cold values (its workload)"),
    ("docs/store.md", "64 KiB", SPEC + ": the record format's limit"),
    ("docs/store.md", "100 ms", CODE + ": persist._RETRY_MS"),
    ("docs/store.md", "10 bytes", SPEC + ": the record frame's overhead"),
    ("docs/store.md", "20-byte", "the benchmark's workload: its key size"),
    ("docs/store.md", "64-byte", "the benchmark's workload: its value size"),
    ("docs/store.md", "104-byte", SPEC + ": the format's size of one such batch"),
    ("docs/store.md", "1.3 KB", "arithmetic: index_max 128 keys, a 167-slot dict of 8-byte slots on 32-bit"),
    ("docs/store.md", "1,168 bytes", "a one-off MemoryError message from an old test run, told as history"),
    ("docs/store.md", "128-byte", CODE + ": the CRC check's piece size"),
    ("docs/store.md", "2 MiB", CONFIG + ": the esp32 filesystem the simulated flash holds"),
    ("docs/security.md", "32-byte", SPEC + ": PBKDF2-HMAC-SHA256's output length"),
    ("docs/security.md", "96-byte", SPEC + ": a 64-byte HMAC pad and a 32-byte digest"),
    ("docs/security.md", "4 ms", ESTIMATE + " (16 iterations at the ESP32 estimate)"),
    ("docs/security.md", "250 ms", "the design target of a login, and the estimate it rests on (see text)"),
    ("docs/security.md", "5 µs", ONCE + " (CPython on the same host)"),
    ("docs/security.md", "1.5 µs", ONCE + " (CPython's hashlib.pbkdf2_hmac)"),
    ("docs/security.md", "90%", ONCE + " (the hashing's share of an iteration)"),
    ("docs/security.md", "31–47 ms", ONCE + " (the unix row of the estimate table)"),
    ("docs/security.md", "50%", ESTIMATE + ": its error margin"),
    ("docs/security.md", "500 ms", ESTIMATE + " (an ESP32 file's count on a Pico W)"),
] + [
    # The host timings (measured once, by hand) and the board estimates
    # resting on them: docs/security.md, "How long a login takes".
    ("docs/security.md", fig, ONCE) for fig in ("9.7 µs", "4.4 µs", "0.4–0.5 ms", "2.3 ms", "3.5–4.7 ms",
                                                "8.3–9.5 ms", "35–48 ms", "91–105 ms", "3.1–4.7 µs", "4.35 µs")
] + [
    ("docs/security.md", fig, ESTIMATE) for fig in ("260 ms", "226 ms", "251 ms", "261 ms")
] + [
    ("docs/security.md", "6%", "arithmetic: 125 MHz against 133 MHz"),
    ("docs/security.md", "6.2 days", "MicroPython's ticks_ms period, halved (2^29 ms)"),
    ("docs/dashboard.md", "1 KB", CODE + ": the request head buffer and the state budget's floor"),
    ("docs/dashboard.md", "512 bytes", CODE + ": the inflating piece"),
    ("docs/dashboard.md", "2 KiB", CODE + ": the gzip window (mkpage WBITS)"),
    ("docs/dashboard.md", "32 KiB", SPEC + ": deflate's default window"),
    ("docs/dashboard.md", "4 KB", CODE + ": dashboard._BUDGET"),
    ("docs/dashboard.md", "250 ms", ESTIMATE + " (docs/security.md)"),
    ("docs/bridge.md", "3 bytes", CODE + ": the chip id bytes in the default host name"),
    ("lib/README.md", "2 bytes", SPEC + ": a short-form acknowledgement"),
    ("lib/README.md", "5-byte", SPEC + ": a Variable Byte Integer one byte too long"),
    ("lib/README.md", "65535 bytes", SPEC + ": the longest string or binary field"),
    ("lib/README.md", "268,435,455 bytes", SPEC + ": the largest Remaining Length"),
    ("lib/README.md", "16 KB", SPEC + ": the test vectors at the Remaining Length's 16383/16384 boundary"),
    ("tools/README.md", "4-byte", "the 32-bit object layout the twin is built for: pointer size"),
    ("tools/README.md", "16-byte", "the 32-bit object layout the twin is built for: GC block size"),
    ("tools/README.md", "40 %", CONFIG + ": make sim's default kill -9 time (mk/bench.mk SIM_ARGS)"),
    ("tools/README.md", "70 %", CONFIG + ": make sim's default stall time (mk/bench.mk SIM_ARGS)"),
    ("tools/README.md", "64-byte", "mp_alloc.py's workload: its message size"),
    ("tools/README.md", "2 MB", CONFIG + ": esp32s3 heap (checked above)"),
    ("tools/README.md", "4 MB", CONFIG + ": unix heap (checked above)"),
    ("host_tests/README.md", "16 KB", "the test's own floor (FLOOR in test_hub.py)"),
    ("host_tests/README.md", "14.5 KB", "the test's own floor (14848 in test_hub.py)"),
    ("host_tests/README.md", "2 ms", "the sampling period of host_tests/mp_heap_lowwater.py"),
    ("README.md", "8 KB", CODE + ": the 8192 in Persist's max_batch (4 x max_packet_size + 8192)"),
    ("README.md", "64 KB", CODE + ": the store format's largest batch, _MAXLEN in store.py"),
    ("README.md", "32 KB", CODE + ": half the store's largest batch, a message making two records"),
    ("README.md", "7.5 KB", "the payload sizes of test_large_retained_values_queued_for_a_session_are_all_restored_"
                            "after_a_power_cut (test_persist_limits.py)"),
]


def outside_generated(name):
    # The text with each generated part blanked (its lines kept, so line
    # numbers stay those of the file), and the parts' names.
    text = (REPO / name).read_text()
    names = set(m.group(1) for m in REGION.finditer(text))
    return REGION.sub(lambda m: "\n" * m.group(0).count("\n"), text), names


def figures(name):
    text, _ = outside_generated(name)
    out = {}
    for m in FIGURE.finditer(text):
        out.setdefault(re.sub(r"\s+", " ", m.group(0)), []).append(text.count("\n", 0, m.start()) + 1)
    return out


def test_every_hand_written_figure_is_allowed_and_says_why():
    allowed = {(f, fig) for f, fig, _ in ALLOWED}
    unlisted = ["%s line %s: %r" % (name, ", ".join(map(str, lines)), fig)
                for name in SCANNED for fig, lines in figures(name).items() if (name, fig) not in allowed]
    assert not unlisted, (
        "figures with a unit outside the generated parts that ALLOWED in host_tests/test_doc_figures.py does not "
        "list:\n  %s\nA measured figure comes from a command: record it and write it from the record "
        "(tools/README.md, \"Measured figures in the docs\"), or refer to the generated docs (docs/memory.md, "
        "docs/benchmarks.md); a spec constant or config value goes into ALLOWED with its reason." %
        "\n  ".join(unlisted))


def test_the_allowlist_has_no_stale_entries():
    found = {(name, fig) for name in SCANNED for fig in figures(name)}
    stale = ["%s: %r" % (f, fig) for f, fig, _ in ALLOWED if (f, fig) not in found]
    assert not stale, "ALLOWED lists figures the docs no longer have; remove them: " + ", ".join(stale)
    assert len({(f, fig) for f, fig, _ in ALLOWED}) == len(ALLOWED), "ALLOWED lists a figure twice"
    assert all(why.strip() for _, _, why in ALLOWED)


def test_only_known_generators_write_between_markers():
    # A part between markers is skipped by the scan above, so only parts a
    # test checks against their record may be there.
    for name in SCANNED:
        unknown = outside_generated(name)[1] - GENERATED
        assert not unknown, "%s has generated parts nothing checks: %s" % (name, ", ".join(sorted(unknown)))
