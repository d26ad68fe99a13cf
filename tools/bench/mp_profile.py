# Runs the broker under the MicroPython unix port with timing wrappers
# around the functions of the publish path (monkey-patched at run time:
# nothing under firmware/ is changed). Every second it writes
#   CONFIG.json.profile.json = {"stats": {"fn": [microseconds, calls]}, ...} Started by tools/bench/profile.py:
#   micropython -X heapsize=220K mp_profile.py ROOT BOARD CONFIG.json PORT
import sys
import json
import time

ROOT, BOARD, CFGFILE, PORT = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
sys.path[:0] = [ROOT + "/build/host/lib", ROOT + "/build/host"]

from broker.config import build, load_json  # noqa: E402

cfg = build(load_json("%s/boards/%s.json" % (ROOT, BOARD)).get("config"), load_json(CFGFILE), {"port": PORT})
del sys.modules["broker.config"]

from broker import app, core, conn, handle_publish, handle_other, subs, session, message, transport  # noqa: E402

ticks_us = time.ticks_us
ticks_diff = time.ticks_diff
STATS = {}
COUNT = {"recv_into": 0, "recv_bytes": 0, "send": 0, "send_bytes": 0, "relieve": 0}


def timed(name, f):
    st = STATS.setdefault(name, [0, 0])

    def w(*a):
        t = ticks_us()
        r = f(*a)
        st[0] += ticks_diff(ticks_us(), t)
        st[1] += 1
        return r

    return w


def _calibrate():
    # Cost of the wrapper itself, per call (subtracted by profile.py).
    def empty(a, b):
        return a

    w = timed("_calib", empty)
    n = 20000
    t = ticks_us()
    for i in range(n):
        empty(i, 0)
    base = ticks_diff(ticks_us(), t)
    STATS["_calib"] = [0, 0]
    t = ticks_us()
    for i in range(n):
        w(i, 0)
    tot = ticks_diff(ticks_us(), t)
    # Inner ticks pair is what gets attributed to a parent as extra time.
    return (tot - base) / n


OVERHEAD_US = _calibrate()
del STATS["_calib"]

# The publish path, outermost first. Names that a newer firmware lacks are
# skipped (and listed in the PROFILE line).
MISSING = []


def wrap(obj, name, label=None):
    f = getattr(obj, name, None)
    if f is None:
        MISSING.append(name)
        return
    setattr(obj, name, timed(label or name, f))


wrap(conn.Connection, "dispatch", "Connection.dispatch")
wrap(conn, "frame")
wrap(conn, "check_flags")
wrap(conn, "on_publish")
wrap(conn, "on_packet", "on_packet (acks etc.)")
wrap(handle_publish, "decode_publish")
wrap(handle_publish, "check_topic")
wrap(handle_publish, "Message", "Message()")
wrap(handle_publish, "_ack", "_ack (PUBACK/PUBREC)")
wrap(handle_publish, "_heap_short", "_heap_short (gc.mem_free)")
wrap(handle_other, "_on_ack")
wrap(handle_other, "decode_ack")
wrap(core.Broker, "route", "Broker.route")
wrap(core.Broker, "_route_many", "Broker._route_many")
wrap(core.Broker, "deliver", "Broker.deliver")
wrap(core.Broker, "pump", "Broker.pump")
wrap(core.Broker, "congested", "Broker.congested")
wrap(subs.Subs, "match", "Subs.match")
wrap(session.Session, "enqueue", "Session.enqueue")
wrap(session.Session, "next_pid", "Session.next_pid")
wrap(message.Message, "wire", "Message.wire")
wrap(conn.Connection, "send", "Connection.send")
wrap(conn.Connection, "room", "Connection.room")

_recv = transport.TcpTransport.recv_into
_send = transport.TcpTransport.send
_relieve = core.Broker.relieve


async def recv_into(self, mv):
    n = await _recv(self, mv)
    COUNT["recv_into"] += 1
    COUNT["recv_bytes"] += n or 0
    return n


async def send(self, mv):
    COUNT["send"] += 1
    COUNT["send_bytes"] += len(mv)
    await _send(self, mv)


async def relieve(self, me):
    COUNT["relieve"] += 1
    await _relieve(self, me)


transport.TcpTransport.recv_into = recv_into
transport.TcpTransport.send = send
core.Broker.relieve = relieve

import asyncio  # noqa: E402
import os  # noqa: E402

OUT = CFGFILE + ".profile.json"


async def _dump():
    # Written every second (the file is replaced whole): the CPython side
    # reads it after the load; no output is needed at exit.
    while True:
        await asyncio.sleep(1)
        with open(OUT + ".tmp", "w") as f:
            f.write(json.dumps({"stats": STATS, "count": COUNT, "overhead_us": OVERHEAD_US, "missing": MISSING}))
        os.rename(OUT + ".tmp", OUT)


_start = app.start


def start(cfg, wdt=None):
    b = _start(cfg, wdt)
    asyncio.create_task(_dump())
    return b


app.start = start
try:
    app.run(cfg)
except KeyboardInterrupt:
    pass
