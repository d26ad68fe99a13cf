"""The memory figures in the docs, written from the last `make memreport`.

    .venv/bin/python tools/bench/memreport.py --docs-only   rewrite them from docs/memory.json

render(results) returns the generated text for each place; write(results)
puts it there: all of docs/memory.md but its capacity section (written by
tools/bench/capdocs.py between markers of its own, kept as it is), and the
part between the markers

    <!-- memreport:begin (...) -->  ...  <!-- memreport:end -->

in README.md (section Memory) and boards/README.md (the profile table,
with each board's code path). host_tests/test_memory_docs.py fails when
that text differs from what render() makes of docs/memory.json, so a
figure in these files is always that of the last recorded run.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO / "tools")]
import codepath  # noqa: E402

BEGIN = "<!-- memreport:begin (written by make memreport from docs/memory.json; do not edit) -->"
END = "<!-- memreport:end -->"
BOARD_ORDER = ["esp32", "esp32s3", "pico_w", "pico2_w", "unix"]
_NAMES = {"mpy": ".mpy files", "frozen": "frozen into the firmware"}


def _n(x):
    return "{:,}".format(x)


def _b(x):
    return "%s B" % _n(x)


def _boards(res):
    got = res.get("boards") or {}
    return [(b, got[b]) for b in BOARD_ORDER if b in got]


def _size(n):
    # A profile's byte count as people write it.
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % k == 0 and n >= k:
            return "%d %s" % (n // k, unit)
    return _n(n)


def _profile(board):
    import json

    return json.loads((REPO / "boards" / (board + ".json")).read_text())


def _stamp(res):
    rec = [r for _, r in _boards(res)]
    commits = sorted({r.get("commit", "?") for r in rec})
    dates = sorted({r.get("date", "?")[:10] for r in rec})
    return "Measured by `%s` at commit %s, %s, on the board twin (%s)." % (
        res.get("command", "make memreport"), ", ".join(commits), ", ".join(dates), res.get("twin", "?"))


def code_path(rec):
    # -> (path, the numbers that decided it), as tools/deploy.py decides.
    fits, why = codepath.mpy_verdict(rec)
    return ("mpy" if fits else "frozen"), why


def _start(part):
    if part.get("start_used") is None:
        return "does not start: %s" % part.get("error", "?")
    return "%s used, %s free" % (_n(part["start_used"]), _n(part["start_free"]))


def readme_block(res):
    out = ["Per board, with its heap and shipped config (persistence on, password file, rate limit on); "
           "each cost is the broker's own `gc.mem_alloc()` after a collection, divided over several "
           "clients or messages:", ""]
    out.append("| board | heap | after start, frozen | after start, `.mpy` | idle client 3.1.1 / 5.0 "
               "| subscription | retained message | queued message | TLS connection |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for b, r in _boards(res):
        f = r["frozen"]
        tls = _b(r["tls_connection"])
        if r["tls_from"] != "python heap":
            tls += " (Mbed TLS buffers outside the Python heap)"
        out.append("| %s | %s | %s | %s | %s / %s | %s | %s | %s | %s |" % (
            b, _n(r["heap"]), _start(f), _start(r["mpy"]), _b(f["idle_client_v4"]), _b(f["idle_client_v5"]),
            _b(f["subscription"]), _b(f["retained_message"]), _b(f["queued_message"]), tls))
    out.append("")
    out.append("Retained messages are counted after delivery to a 3.1.1 and a 5.0 subscriber, queued ones "
               "(QoS 1, 64 B) for an offline persistent session. Where each board's code comes from, "
               "decided from these figures: [boards/README.md](boards/README.md#memory-and-code-path). "
               + _stamp(res))
    return "\n".join(out)


def boards_block(res):
    recs = dict(_boards(res))
    out = ["| profile | board | heap | C stack | sockets | TLS | `.mpy` arch | filesystem | flashing "
           "| code path (make deploy) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in BOARD_ORDER:
        p = _profile(b)
        fl = p.get("flash") or {}
        if fl.get("tool") == "esptool":
            flash = "esptool, %s" % fl["offset"]
        elif fl.get("tool") == "uf2":
            flash = "UF2 (drive %s)" % fl["drive"]
        else:
            flash = "none"
        path = _NAMES[code_path(recs[b])[0]] if b in recs else "not measured"
        out.append("| `%s` | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            b, p["description"], _n(p["heap"]), _n(p["c_stack"]), p["sockets"], p["tls_sessions"],
            p["mpy_arch"], _size(p["fs_size"]) if b != "unix" else "host disk", flash, path))
    out.append("")
    out.append("The code path: `.mpy` files are copied to the filesystem and loaded into the heap at start; "
               "where that would leave less than `min_free_heap` plus `max_connections` idle clients, "
               "`make deploy` refuses and the code runs from flash instead, frozen into the firmware "
               "(`make firmware`) or from a ROMFS image. The figures that decided it:")
    out.append("")
    for b, r in _boards(res):
        path, why = code_path(r)
        out.append("- **%s**: %s; %s." % (b, _NAMES[path], why))
    out.append("")
    out.append(_stamp(res) + " All figures: [docs/memory.md](../docs/memory.md).")
    return "\n".join(out)


def memory_md(res):
    out = ["# Memory, measured on the board twin", "",
           "This file is written by `make memreport` (tools/bench/memreport.py, then tools/bench/memdocs.py) "
           "from [memory.json](memory.json); do not edit it. " + _stamp(res) + " Its last section, "
           "[how many fit](#capacity-how-many-fit), is written by `make capacity` (tools/bench/capacity.py, "
           "then tools/bench/capdocs.py; `make memreport` runs it too) from [capacity.json](capacity.json).", "",
           "How: the broker runs on the twin (`tools/twin.py`: MicroPython v1.28.0's unix port built 32-bit, "
           "with a board's object layout) with the profile's `heap` and its shipped config, clients logging in "
           "from a password file, each from a loopback address of its own; `sys_interval` is 1. Every figure "
           "is the broker's own `gc.mem_alloc()` after `gc.collect()`, read from `$SYS/broker/heap/used` "
           "(the start: its `broker ready` log line), as a difference over several clients or messages "
           "divided by their count, after a warm-up; where several rounds ran, the median is kept. "
           "The `.mpy` start runs the stock twin (asyncio and ssl only) on `build/host`'s `.mpy` files, made "
           "for x86: the twin cannot load machine code made for armv6m or xtensawin. A board's `.mpy` files "
           "hold the same bytecode, and machine code for its own arch for the functions marked "
           "`@micropython.native`, which goes to executable memory outside the heap on the twin and on "
           "the ESP32 boards, but into the heap on the rp2 boards (not counted here: `make sizes` gives "
           "its bytes). "
           "The per-board table and the code paths are in the [README](../README.md#memory) and "
           "[boards/README.md](../boards/README.md#memory-and-code-path).", ""]
    out.append("## Per board, in detail")
    out.append("")
    out.append("| board | clients measured | idle 3.1.1 rounds | idle 5.0 rounds | subscriptions | "
               "retained: stored only / delivered (rounds) | queued rounds | TLS, Mbed TLS outside / inside "
               "the heap |")
    out.append("|---|---|---|---|---|---|---|---|")
    for b, r in _boards(res):
        f = r["frozen"]
        out.append("| %s | %d | %s | %s | %d (%s each) | %s / %s (%s; %d messages) | %s (%d messages) | %s / %s |" % (
            b, f["clients_n"], ", ".join(_n(x) for x in f["idle_client_v4_rounds"]),
            ", ".join(_n(x) for x in f["idle_client_v5_rounds"]), f["subscriptions_n"], _b(f["subscription"]),
            _b(f["retained_stored"]), _b(f["retained_message"]),
            ", ".join(_n(x) for x in f["retained_message_rounds"]), f["retained_n"],
            ", ".join(_n(x) for x in f["queued_message_rounds"]), f["queued_n"],
            _b(r["tls_outside_heap"]), _b(r["tls_in_heap"])))
    out.append("")
    out.append("TLS: the twin's Mbed TLS allocates with the C library, outside the MicroPython heap, as the "
               "ESP32's does (from the IDF heap); `tools/twin.py --variant tlsheap` builds it with "
               "`MICROPY_MBEDTLS_CONFIG_BARE_METAL` as the rp2 port does, where a Pico W pays for each TLS "
               "connection out of its Python heap. Each board's table entry is the one of its port.")
    out.append("")
    imp = res.get("import") or {}
    if "core_modules" in imp:
        out.append("Importing the broker's modules from `.mpy` files (the stock twin, a bare interpreter): "
                   "%s for the core, %s more for persistence (`persist`, `store`)."
                   % (_b(imp["core_modules"]), _b(imp["persist_store_modules"])))
        out.append("")
    tot = res.get("mpy_total") or {}
    if tot:
        out.append("`.mpy` bytes of all modules (`tools/build.py --sizes`): %s."
                   % ", ".join("%s %s" % (a, _b(n)) for a, n in sorted(tot.items())))
        out.append("")
    return "\n".join(out)


def render(res):
    return {"README.md": readme_block(res), "boards/README.md": boards_block(res),
            "docs/memory.md": memory_md(res)}


def splice(text, block, name, begin=BEGIN, end=END):
    # text with the part between the markers replaced by block.
    i = text.find(begin)
    j = text.find(end)
    if i < 0 or j < i:
        raise ValueError("%s has no %s ... %s markers" % (name, begin, end))
    return text[: i + len(begin)] + "\n" + block + "\n" + text[j:]


def generated(text, name, begin=BEGIN, end=END):
    # The part between the markers.
    i = text.find(begin)
    j = text.find(end)
    if i < 0 or j < i:
        raise ValueError("%s has no %s ... %s markers" % (name, begin, end))
    return text[i + len(begin) + 1 : j - 1]


def own_part(text):
    # -> (what of docs/memory.md is ours, the capacity section after it
    # that tools/bench/capdocs.py writes, or "").
    import capdocs  # (imported here: capdocs imports this module)

    i = text.find(capdocs.BEGIN)
    if i < 0:
        return text, ""
    return text[:i], text[i:]


def write(res):
    done = []
    for name, block in render(res).items():
        p = REPO / name
        if name == "docs/memory.md":
            tail = own_part(p.read_text())[1] if p.exists() else ""
            p.write_text(block + "\n" + ("\n" + tail if tail else ""))
        elif name.startswith("docs/"):
            p.write_text(block + "\n")
        else:
            p.write_text(splice(p.read_text(), block, name))
        done.append(p)
    return done
