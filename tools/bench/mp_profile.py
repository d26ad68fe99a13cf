# Runs the broker exactly as tools/mp_host.py runs it (same arguments; on
# the twin the frozen code), with timing wrappers around the functions of
# the publish path, patched in at run time: nothing under firmware/ is
# changed. Started by tools/bench/profile.py through BrokerProc:
#
#   build/twin/micropython -X heapsize=110000 tools/bench/mp_profile.py --board esp32 \
#       --code frozen --config CONFIG.json --port N
#
# Every second it writes CONFIG.json.profile.json:
#   {"stats": {"fn": [inclusive us, self us, calls, wrapped calls made]},
#    "count": {...}, "missing": [...]}
# Self time is measured, not inferred from a call tree: each wrapper adds
# its inclusive time to the wrapped call it was made from, which subtracts
# it; profile.py then takes out the cost of the wrappers of the calls a
# function made (the wrappers' cost per call: the instrumented broker's CPU
# per message less the plain one's, over the wrapped calls per message).
# Times are ticks_us (wall clock): time the host gives to other processes
# lands in whatever function was running.
import sys

_here = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
MP_HOST = _here + "/../mp_host.py"
CFGFILE = sys.argv[sys.argv.index("--config") + 1]
sys.path[:] = [".frozen"] + [p for p in sys.path if p != ".frozen"]

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import asyncio  # noqa: E402
import mp_path  # noqa: E402
from broker import app, conn, transport  # noqa: E402

ticks_us = time.ticks_us
ticks_diff = time.ticks_diff
STATS = {}
TSTACK = [0]  # per open wrapped call: time spent in the wrapped calls it made
NSTACK = [0]  # and how many it made
COUNT = {"recv_into": 0, "recv_bytes": 0, "write_now": 0, "write_bytes": 0, "send": 0, "send_bytes": 0,
         "pauses": 0}
MISSING = []


def timed(name, f):
    # st: inclusive us, self us before the wrapper cost, calls, wrapped calls made
    st = STATS.setdefault(name, [0, 0, 0, 0])
    tst = TSTACK
    nst = NSTACK

    def w(*a):
        tst.append(0)
        nst.append(0)
        t = ticks_us()
        try:
            return f(*a)
        finally:
            dt = ticks_diff(ticks_us(), t)
            st[0] += dt
            st[1] += dt - tst.pop()
            st[2] += 1
            st[3] += nst.pop()
            tst[-1] += dt
            nst[-1] += 1

    return w


mp_path.wrap_all(mp_path.PUBLISH + mp_path.MORE, timed, MISSING)

# Reads, writes of writer tasks, and publisher pauses: counted (they are
# coroutines; what they cost shows in the time outside the wrappers).
_read = transport.TcpTransport.read_now
_send = transport.TcpTransport.send
_wn = transport.TcpTransport.write_now
_wait_s = conn.wait_for_session
_wait_r = conn.wait_recovered


def read_now(self, mv):
    n = _read(self, mv)
    if n is not None:  # a read, not a look that found nothing yet
        COUNT["recv_into"] += 1
        COUNT["recv_bytes"] += n
    return n


async def send(self, mv):
    COUNT["send"] += 1
    COUNT["send_bytes"] += len(mv)
    await _send(self, mv)


def write_now(self, buf, off, n):
    n = _wn(self, buf, off, n)
    COUNT["write_now"] += 1
    COUNT["write_bytes"] += n
    return n


async def wait_for_session(s):
    COUNT["pauses"] += 1
    await _wait_s(s)


async def wait_recovered(b, ready):
    COUNT["pauses"] += 1
    await _wait_r(b, ready)


transport.TcpTransport.read_now = read_now
transport.TcpTransport.send = send
transport.TcpTransport.write_now = write_now
conn.wait_for_session = wait_for_session
conn.wait_recovered = wait_recovered

OUT = CFGFILE + ".profile.json"


async def _dump():
    # Written every second, the file replaced whole: the CPython side
    # reads it after the load.
    while True:
        await asyncio.sleep(1)
        with open(OUT + ".tmp", "w") as f:
            f.write(json.dumps({"stats": STATS, "count": COUNT, "missing": MISSING}))
        os.rename(OUT + ".tmp", OUT)


_start = app.start


def start(cfg, wdt=None):
    b = _start(cfg, wdt)
    asyncio.create_task(_dump())
    return b


app.start = start
# mp_host.py finds the modules already imported (and patched) in
# sys.modules, and runs the broker as always.
sys.argv[0] = MP_HOST
with open(MP_HOST) as _f:
    _code = _f.read()
exec(_code, {"__name__": "__main__"})
