# The flash cost of a sensor hub's real write pattern, measured with the
# broker's own code (MicroPython side; run by tools/wear/lifetime.py on the
# board twin):
#
#   micropython mp_hub_wear.py BOARD SECONDS
#
# A Broker with persistence on a simulated flash formatted as BOARD's
# LittleFS (host_tests/flashsim.py) is driven through its packet handlers,
# as a client's packets drive it, on a simulated clock:
#   - 8 sensors publish a new retained QoS 0 value every 10 s;
#   - one QoS 1 alert a minute goes to a persistent v5 session that is
#     connected and acknowledges it at once (an alarm panel);
#   - a dashboard (clean session) subscribes to everything.
# Commits happen as the broker's committer makes them: after each packet's
# handling. Prints one JSON line: erases, bytes written, commits, the
# erases of the most worn block, and the figures per day.
import time
import sys
import json
import gc

import flashsim
from mqtt import packets as P
from broker.config import build
from broker.core import Broker
from broker.conn import Connection
from broker.persist import Persist

BOARD = sys.argv[1]
SECONDS = int(sys.argv[2])
SENSORS = 8
SENSOR_EVERY = 10
ALERT_EVERY = 60


class Wire:
    # A transport that takes everything written and keeps it to be read.
    peer = "sim"

    def __init__(self):
        self.out = bytearray()

    def write_now(self, buf, off, n):
        self.out.extend(memoryview(buf)[off : off + n])
        return n

    def close(self):
        pass


def packets(buf):
    # Whole packets in buf, as (first byte, body); buf is emptied.
    out = []
    i = 0
    while i < len(buf):
        n = 0
        m = 1
        j = i + 1
        while True:
            x = buf[j]
            n += (x & 0x7F) * m
            m <<= 7
            j += 1
            if not x & 0x80:
                break
        out.append((buf[i], bytes(buf[j : j + n])))
        i = j + n
    buf[:] = b""
    return out


def feed(c, pkt, version):
    # One client packet through the reader's dispatch, as conn.run does.
    raw = P.encode(pkt, version)
    h = 2 if raw[1] < 128 else 3
    c.dispatch(raw[0], memoryview(raw), h, len(raw))


def settle(b):
    # The committer's work, then the flusher's.
    p = b.persist
    if p.store.pending:
        p._commit()
        p._release()
    b.flush_now()


dev = flashsim.new(BOARD)
flashsim.mount(dev, BOARD, fmt=True)
prof = json.load(open("boards/%s.json" % BOARD))
# Connections cost no flash: enough for the 11 clients here.
cfg = build(prof["config"], {"allow_anonymous": True, "persistence_location": "/flash/data",
                             "max_connections": 16}, None)
b = Broker(cfg)
b.persist = Persist(b, cfg["persistence_location"], cfg["store_max_bytes"])
b.persist.load()
dev.reset_counters()
for i in range(dev.nblocks):
    dev.erase_count[i] = 0
st0 = dict(b.persist.store.stats)


def client(cid, version, clean, props=None, subs=()):
    w = Wire()
    c = Connection(b, w)
    feed(c, P.Connect(cid, version, clean, 60, props=props), version)
    settle(b)
    for i, (f, q) in enumerate(subs):
        feed(c, P.Subscribe(i + 1, [(f, q)]), version)
        settle(b)
    packets(w.out)
    return c, w


panel, panel_w = client("panel", 5, False, {0x11: 86400}, [("alerts/#", 1)])
dash, dash_w = client("dashboard", 4, True, None, [("#", 0)])
sensors = [client("sensor%d" % i, 4, True)[0] for i in range(SENSORS)]
alarm = client("alarm", 5, True)[0]
pid = 0
for t in range(SECONDS):
    # A simulated second: now() reads the clock plus the real time since
    # _tick0, which must not count (the clock saved with each commit is
    # now(): run to run, the bytes written would differ).
    b.clock += 1
    b._tick0 = time.ticks_ms()
    b._rem_ms = 0
    b.persist.tick()
    if t % SENSOR_EVERY == 0:
        for i, c in enumerate(sensors):
            v = b"%d.%d" % (20 + (t // SENSOR_EVERY + i) % 7, t % 10)
            feed(c, P.Publish("site/sensor/%03d/temp" % i, v, 0, True), 4)
            settle(b)
    if t % ALERT_EVERY == 0:
        pid = pid % 65535 + 1
        feed(alarm, P.Publish("alerts/door", b"open %d" % t, 1, False, False, pid), 5)
        settle(b)
        # The panel acknowledges what reached it.
        for first, body in packets(panel_w.out):
            if first >> 4 == 3:
                n = (body[0] << 8) | body[1]
                feed(panel, P.Ack(P.PUBACK, (body[2 + n] << 8) | body[3 + n]), 5)
                settle(b)
    dash_w.out[:] = b""
    if t % 600 == 0:
        gc.collect()
settle(b)
s = b.persist.store.stats
days = SECONDS / 86400
out = {
    "board": BOARD,
    "seconds": SECONDS,
    "erases": dev.erases,
    "bytes_written": s["bytes_written"] - st0.get("bytes_written", 0),
    "commits": s["commits"] - st0.get("commits", 0),
    "hottest_block_erases": max(dev.erase_count),
    "erases_per_day": dev.erases / days,
    "blocks": dev.nblocks,
}
print(json.dumps(out))
