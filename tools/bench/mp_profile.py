# Runs the broker under the MicroPython unix port with timing wrappers
# around the functions of the publish path (monkey-patched at run time:
# nothing under firmware/ is changed). On SIGINT it prints one line
#   PROFILE {"fn": [microseconds, calls], ...}
# and exits. Started by tools/bench/profile.py:
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

# The publish path, outermost first.
conn.Connection.dispatch = timed("Connection.dispatch", conn.Connection.dispatch)
conn.frame = timed("frame", conn.frame)
conn.check_flags = timed("check_flags", conn.check_flags)
conn.on_publish = timed("on_publish", conn.on_publish)
conn.on_packet = timed("on_packet (acks etc.)", conn.on_packet)
handle_publish.decode_publish = timed("decode_publish", handle_publish.decode_publish)
handle_publish.check_topic = timed("check_topic", handle_publish.check_topic)
handle_publish.Message = timed("Message()", handle_publish.Message)
handle_publish._ack = timed("_ack (PUBACK/PUBREC)", handle_publish._ack)
handle_other._on_ack = timed("_on_ack", handle_other._on_ack)
handle_other.decode_ack = timed("decode_ack", handle_other.decode_ack)
core.Broker.route = timed("Broker.route", core.Broker.route)
core.Broker._route_many = timed("Broker._route_many", core.Broker._route_many)
core.Broker.deliver = timed("Broker.deliver", core.Broker.deliver)
core.Broker.pump = timed("Broker.pump", core.Broker.pump)
core.Broker.congested = timed("Broker.congested", core.Broker.congested)
subs.Subs.match = timed("Subs.match", subs.Subs.match)
session.Session.enqueue = timed("Session.enqueue", session.Session.enqueue)
session.Session.next_pid = timed("Session.next_pid", session.Session.next_pid)
message.Message.wire = timed("Message.wire", message.Message.wire)
conn.Connection.send = timed("Connection.send", conn.Connection.send)
conn.Connection.room = timed("Connection.room", conn.Connection.room)

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

try:
    app.run(cfg)
except KeyboardInterrupt:
    pass
out = {"stats": STATS, "count": COUNT, "overhead_us": OVERHEAD_US}
print("PROFILE " + json.dumps(out))
