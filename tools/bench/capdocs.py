"""The capacity section of docs/memory.md, written from the last `make capacity`.

    .venv/bin/python tools/bench/capacity.py --docs-only   rewrite it from docs/capacity.json

render(results) returns the section's text; write(results) puts it between
the markers

    <!-- capacity:begin (...) -->  ...  <!-- capacity:end -->

at the end of docs/memory.md (adding them the first time). memdocs.py
writes the rest of that file and keeps this part as it is.
host_tests/test_capacity_docs.py fails when the text differs from what
render() makes of docs/capacity.json, so a count in it is always that of
the last recorded run.
"""
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE)]
import memdocs  # noqa: E402
from memdocs import _n, _b  # noqa: E402

BEGIN = "<!-- capacity:begin (written by tools/bench/capdocs.py from docs/capacity.json; do not edit) -->"
END = "<!-- capacity:end -->"
DOC = REPO / "docs" / "memory.md"
RECORD = REPO / "docs" / "capacity.json"
BOARD_ORDER = memdocs.BOARD_ORDER
# What `make capacity` measures. The other boards' heaps (2 MB, 4 MB) take
# longer to fill, one acknowledged item at a time, than a step may run.
MEASURED = ["esp32", "pico_w", "pico2_w"]
# The profile settings a record was taken with (besides `heap`).
PROFILE_KEYS = ["min_free_heap", "max_connections", "max_sessions", "max_retained_messages", "max_queued_messages",
                "persistence", "store_max_bytes", "max_packet_size"]
# Each measurement: its name in the docs, and the shipped setting that
# limits it (None: that one is raised here too).
ITEMS = {
    "retained": ("retained topics", "max_retained_messages"),
    "sessions": ("offline sessions", "max_sessions"),
    "queued": ("queued messages", "max_queued_messages"),
    "clients": ("live clients, shipped `max_connections`", "max_connections"),
    "clients_heap": ("live clients, heap only", None),
}


_ADDR = re.compile(r"\d+\.\d+\.\d+\.\d+:\d+")


def _boards(res):
    got = res.get("boards") or {}
    return [(b, got[b]) for b in BOARD_ORDER if b in got]


def _fit(r):
    if "failed" in r:
        return "%s, then: %s" % (_n(r.get("taken", 0)), r["failed"])
    return _n(r["count"])


def _summary(r, key, limit):
    # A count in the summary table, with the shipped limit beside it.
    s = _fit(r[key])
    return s if limit is None or "failed" in r[key] else "%s (ships %s)" % (s, _n(r[limit]))


def _afterwards(key, r):
    # What the broker did once the items went away (or came back).
    a = r.get("after_removal")
    if a is None:
        return "kept (they expire after an hour)" if key == "sessions" and "failed" not in r else "-"
    if key == "retained":
        n = r["acknowledged"]
        s = "all %s deleted" % _n(n) if a["deleted"] == n else "%s of %s deleted (then %s)" % (
            _n(a["deleted"]), _n(n), a["delete_refused"] or "time limit")
        return s + "; a new topic: " + a["new_one"]
    if key == "queued":
        s = "%s of %s delivered in %d return%s" % (_n(a["distinct"]), _n(r["count"]), len(a["returns"]),
                                                  "" if len(a["returns"]) == 1 else "s")
        ends = [x["ended"] for x in a["returns"] if x["ended"] != "all delivered"]
        if ends:
            s += " (ended by: %s)" % "; ".join(ends)
        if a["duplicates"]:
            s += ", %s resent" % _n(a["duplicates"])
        if a["missing"]:
            s += ", %s not delivered" % _n(a["missing"])
        return s
    return "all left; one more: %s" % a["new_one"]


def _problems(b, key, r):
    # The broker's troubles during one measurement, as its log tells them.
    lines = r.get("problems") or []
    if "failed" not in r and not lines:
        return None
    seen = {}  # line, a client's address left out -> how often
    for x in lines:
        if not x.startswith("I closing"):
            x = _ADDR.sub("<client>", x)
            seen[x] = seen.get(x, 0) + 1
    head = "- **%s, %s**: " % (b, ITEMS[key][0])
    if "failed" in r:
        head += "%s after %s. " % (r["failed"], _n(r.get("taken", 0)))
    if seen:
        head += "Log: " + "; ".join("`%s`%s" % (x, " (%d times)" % n if n > 1 else "")
                                    for x, n in list(seen.items())[:5])
    return head.rstrip()


def render(res):
    out = ["## Capacity: how many fit", "",
           "How many retained topics, offline sessions, queued messages and live clients each board holds, "
           "from [capacity.json](capacity.json) (tools/bench/capacity.py, then tools/bench/capdocs.py). "
           + memdocs._stamp(res), "",
           "Each count comes from a broker of its own, started afresh with the board's heap and shipped "
           "config (persistence on, clients logging in from a password file, each from a loopback address of "
           "its own), `sys_interval` 1, and the limit under test raised to its configurable maximum, so that "
           "the heap stops it (the shipped limit is in brackets). Items go in one at a time until the broker "
           "refuses one: retained topics `site/sensor/NNN/temp` with 4-byte values (retained QoS 1 from a "
           "5.0 client); offline sessions of 5.0 clients with Session Expiry 3600 and one QoS 1 subscription, "
           "each gone with DISCONNECT; 16-byte QoS 1 messages queued for one such session; idle 5.0 clients, "
           "with the shipped `max_connections` and with it and `max_sessions` raised. A watcher subscribed "
           "to `$SYS/broker/#` is connected throughout and counts among the live clients. Bytes each: the "
           "rise of `$SYS/broker/heap/used` over the items added; free heap: `$SYS/broker/heap/free` at the "
           "stop; what stopped it: the broker's answer and the limit its log names. A measurement stops after "
           "%d s." % res.get("step_seconds", 100), ""]
    out.append("| board | heap | " + " | ".join(name for name, _ in ITEMS.values()) + " |")
    out.append("|---" * (2 + len(ITEMS)) + "|")
    for b, r in _boards(res):
        out.append("| %s | %s | %s |" % (b, _n(r["heap"]), " | ".join(
            _summary(r, k, limit) for k, (_, limit) in ITEMS.items())))
    out.append("")
    out.append("| board | what | fit | bytes each | stopped by | the broker's answer | free heap at the stop "
               "| afterwards |")
    out.append("|---|---|---|---|---|---|---|---|")
    for b, r in _boards(res):
        for k, (name, _) in ITEMS.items():
            x = r[k]
            stop = x.get("stop")
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                b, name, _fit(x), _b(x["per_item"]) if x.get("per_item") else "-",
                x.get("stopped_by") or "-", x.get("refusal") or "-", _b(stop["free"]) if stop else "-",
                _afterwards(k, x)))
    out.append("")
    problems = [p for b, r in _boards(res) for k in ITEMS for p in [_problems(b, k, r[k])] if p]
    if problems:
        out.append("What the broker's log showed (the whole logs: `build/capacity/<board>-<measurement>.log` "
                   "after a run):")
        out.append("")
        out.extend(problems)
        out.append("")
    rest = [b for b in BOARD_ORDER if b not in dict(_boards(res))]
    if rest:
        out.append("Not measured: %s (`.venv/bin/python tools/bench/capacity.py --boards %s`)." % (
            ", ".join(rest), ",".join(rest)))
        out.append("")
    return "\n".join(out).rstrip("\n")


def generated(text):
    return memdocs.generated(text, "docs/memory.md", BEGIN, END)


def write(res):
    text = DOC.read_text()
    if BEGIN in text:
        text = memdocs.splice(text, render(res), "docs/memory.md", BEGIN, END)
    else:
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + render(res) + "\n" + END + "\n"
    DOC.write_text(text)
    return [DOC]
