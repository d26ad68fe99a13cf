"""Load generator for MQTT brokers: CPython asyncio on raw sockets.

Packets come from the project's own codec (lib/mqtt): CONNECT and SUBSCRIBE
through packets.encode(), PUBLISH templates through encode_publish(), laid
out once and patched in place (sequence number, publisher id, send time)
before each batch goes out in one write. Received bytes are read in large
chunks (asyncio Protocol.data_received) and split with packets.frame().

Every payload carries (publisher id, sequence number, send time in ns), so
every scenario checks loss, duplicates and reordering per publisher at
every subscriber.

Clients log in with the credentials given to run_scenario() (none: anonymous)
and connect from the loopback addresses 127.0.0.2-127.0.0.254 in turn
(host_tests/brokerproc.source_address), as sensors on a LAN come from
addresses of their own: a broker's per-address connection-rate limit stays on
and sees what it would see there.

    python tools/bench/loadgen.py --port 1883 --scenario fanin --seconds 3 [--user U --password P]

Scenarios (run_scenario(name, port, ...) -> dict):
  fanin     10 publishers -> 1 subscriber, QoS 0, one topic
  fanout    1 publisher -> 10 subscribers, QoS 0 (deliveries/s)
  qos1      1 publisher -> 1 subscriber, QoS 1, 10 PUBLISH in flight
  qos2      1 publisher -> 1 subscriber, QoS 2, 10 in flight (until PUBCOMP)
  latency   QoS 0 at a fixed rate (200 msg/s), p50/p99 of send->receive
  retained  100 retained messages, time for a new '#' subscriber to get all
  conncap   clients connected until a clean refusal (or the bound)
"""
import argparse
import asyncio
import json
import os
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _p in ("lib", "host_tests"):
    if str(REPO / _p) not in sys.path:
        sys.path.insert(0, str(REPO / _p))
from mqtt import packets as K  # noqa: E402
from mqtt.packets import frame, encode_publish  # noqa: E402
from brokerproc import source_address  # noqa: E402

PAYLOAD = 64
_HDR = struct.Struct(">HIQ")  # publisher id, sequence, send time (perf_counter_ns)
_MAXP = 1 << 28


class Refused(Exception):
    pass


# (user, password) every client logs in with, or None: set by run_scenario()
# for the broker under test.
_auth = None


# ---------------------------------------------------------------- tracking

class Tracker:
    """Loss, duplicates and reordering of one subscriber, per publisher."""

    def __init__(self, npub):
        self.expect = [0] * npub
        self.missing = [set() for _ in range(npub)]
        self.got = 0  # unique messages
        self.total = 0  # every delivery, duplicates included
        self.dups = 0
        self.reordered = 0
        self.lat = None  # list of latencies (ns) when measuring

    def see(self, pub, seq):
        self.total += 1
        e = self.expect[pub]
        if seq == e:
            self.expect[pub] = e + 1
            self.got += 1
        elif seq > e:
            self.missing[pub].update(range(e, seq))
            self.expect[pub] = seq + 1
            self.got += 1
        else:
            m = self.missing[pub]
            if seq in m:
                m.discard(seq)
                self.reordered += 1
                self.got += 1
            else:
                self.dups += 1

    def lost(self, sent):
        # sent: list of messages each publisher sent
        n = 0
        for p, s in enumerate(sent):
            n += len(self.missing[p]) + max(0, s - self.expect[p])
        return n


# ---------------------------------------------------------------- client

class Client(asyncio.Protocol):
    """One MQTT connection. Frames input with packets.frame() and keeps
    counters; subclasses or callbacks decide what to do with packets."""

    def __init__(self, loop, name, version=4):
        self.loop = loop
        self.name = name
        self.version = version
        self.buf = bytearray()
        self.t = None
        self.connack = loop.create_future()
        self.closed = loop.create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.on_publish = None  # f(first, buf, off, end)
        self.on_ack = None  # f(type, pid)
        self.suback = None
        self.out = bytearray()  # acks gathered during one data_received

    # asyncio.Protocol
    def connection_made(self, t):
        self.t = t

    def connection_lost(self, exc):
        if not self.connack.done():
            self.connack.set_exception(Refused("closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(exc)
        self.can_write.set()

    def pause_writing(self):
        self.can_write.clear()

    def resume_writing(self):
        self.can_write.set()

    def data_received(self, data):
        b = self.buf
        b += data
        n = len(b)
        pos = 0
        onp = self.on_publish
        while n - pos >= 2:
            r = frame(b, pos, n, _MAXP)
            if r is None:
                break
            h, rem = r
            end = pos + h + rem
            if end > n:
                break
            first = b[pos]
            t = first >> 4
            if t == 3:
                if onp is not None:
                    onp(first, b, pos + h, end)
            elif 4 <= t <= 7:
                pid = (b[pos + h] << 8) | b[pos + h + 1]
                if self.on_ack is not None:
                    self.on_ack(t, pid)
            elif t == 2:
                if not self.connack.done():
                    self.connack.set_result(b[pos + h + 1])
            elif t == 9:
                if self.suback is not None and not self.suback.done():
                    self.suback.set_result(bytes(b[pos + h + 2:end]))
            pos = end
        if pos:
            del b[:pos]
        if self.out:
            self.t.write(bytes(self.out))
            del self.out[:]

    # helpers
    def write(self, data):
        self.t.write(data)

    async def subscribe(self, flt, qos):
        self.suback = self.loop.create_future()
        self.write(K.encode(K.Subscribe(1, [(flt, qos)]), self.version))
        r = await asyncio.wait_for(self.suback, 5)
        if r and r[-1] >= 0x80:
            raise Refused("SUBACK 0x%02X for %s" % (r[-1], flt))

    def close(self):
        if self.t is not None and not self.t.is_closing():
            try:
                self.t.write(b"\xe0\x00")  # DISCONNECT
            except Exception:
                pass
            self.t.close()


def connect_packet(cid, version=4, clean=True, keepalive=0, auth=None):
    user, pw = auth or (None, None)
    return K.encode(K.Connect(cid, version, clean, keepalive=keepalive, username=user,
                              password=pw.encode() if pw is not None else None), version)


async def connect(port, cid, version=4, clean=True, timeout=5, host="127.0.0.1"):
    loop = asyncio.get_running_loop()
    src = source_address() if host == "127.0.0.1" else None
    tr, c = await asyncio.wait_for(
        loop.create_connection(lambda: Client(loop, cid, version), host, port, local_addr=src), timeout)
    c.write(connect_packet(cid, version, clean, auth=_auth))
    rc = await asyncio.wait_for(c.connack, timeout)
    if rc != 0:
        c.t.close()
        raise Refused("CONNACK 0x%02X" % rc)
    return c


def publish_template(topic, qos, retain=False, size=PAYLOAD):
    # -> (packet bytearray, payload offset, pid offset or None)
    tb = topic.encode()
    pkt = encode_publish(tb, bytes(size), qos, retain, False, 1 if qos else 0, None, 4)
    i = 1
    while pkt[i] & 0x80:
        i += 1
    poff = i + 1 + 2 + len(tb)
    pidoff = None
    if qos:
        pidoff = poff
        poff += 2
    return pkt, poff, pidoff


def _payload_at(b, off, end, qos):
    # offset of the payload in a received PUBLISH body (3.1.1)
    tl = (b[off] << 8) | b[off + 1]
    return off + 2 + tl + (2 if qos else 0)


# ---------------------------------------------------------------- scenarios

def _subscriber_cb(sub, tracker, flow=None, lat=False):
    # QoS 0/1/2 receiver: checks sequence, acknowledges, counts.
    out = sub.out
    unpack = _HDR.unpack_from

    def on_publish(first, b, off, end):
        qos = (first >> 1) & 3
        tl = (b[off] << 8) | b[off + 1]
        p = off + 2 + tl
        if qos:
            pid_hi = b[p]
            pid_lo = b[p + 1]
            p += 2
            out.append(0x40 if qos == 1 else 0x50)
            out.append(2)
            out.append(pid_hi)
            out.append(pid_lo)
        pub, seq, ts = unpack(b, p)
        tracker.see(pub, seq)
        if lat:
            tracker.lat.append(time.perf_counter_ns() - ts)

    def on_ack(t, pid):
        if t == 6:  # PUBREL -> PUBCOMP
            out.extend(bytes((0x70, 2, pid >> 8, pid & 0xFF)))

    sub.on_publish = on_publish
    sub.on_ack = on_ack


class Flow:
    """Keeps sent - received under a window so the broker's queues, not
    the sockets, hold the backlog (and QoS 0 is not dropped for speed)."""

    def __init__(self, window, trackers):
        self.window = window
        self.trackers = trackers
        self.sent = 0
        self.ev = asyncio.Event()
        self.stop = False

    def outstanding(self):
        # worst subscriber
        lo = min(t.total for t in self.trackers)
        return self.sent - lo

    async def wait_room(self):
        while self.outstanding() >= self.window and not self.stop:
            self.ev.clear()
            try:
                await asyncio.wait_for(self.ev.wait(), 0.05)
            except asyncio.TimeoutError:
                pass


def _wrap_wake(sub, flow):
    # after each received chunk, wake publishers waiting on the window
    orig = sub.data_received

    def dr(data):
        orig(data)
        if flow.outstanding() < flow.window:
            flow.ev.set()

    sub.data_received = dr


DRAIN_QUIET = 2.0  # s without a delivery that ends the drain
DRAIN_MAX = 10.0  # s the drain may take at most, however slow the progress


async def _drain(done, progress):
    # After the load: waits for the last deliveries until done(), or until
    # DRAIN_QUIET s pass without progress() moving. A broker that still
    # delivers but slowly is cut off after DRAIN_MAX s; returns True then
    # (what was still on its way counts as lost, and the report says so).
    last = -1
    t0 = time.perf_counter()
    quiet_until = t0 + DRAIN_QUIET
    while not done():
        now = time.perf_counter()
        if now >= quiet_until:
            return False
        if now - t0 >= DRAIN_MAX:
            return True
        p = progress()
        if p != last:
            last = p
            quiet_until = now + DRAIN_QUIET
        await asyncio.sleep(0.02)
    return False


async def _qos0_load(port, npub, nsub, seconds, window, batch, tag):
    topic = "bench/%s" % tag
    subs = []
    trackers = []
    for i in range(nsub):
        s = await connect(port, "%s-s%d" % (tag, i))
        tr = Tracker(npub)
        _subscriber_cb(s, tr)
        await s.subscribe(topic, 0)
        subs.append(s)
        trackers.append(tr)
    pubs = []
    for i in range(npub):
        pubs.append(await connect(port, "%s-p%d" % (tag, i)))
    flow = Flow(window, trackers)
    for s in subs:
        _wrap_wake(s, flow)
    tmpl, poff, _ = publish_template(topic, 0)
    L = len(tmpl)
    sent = [0] * npub
    stop = [False]
    pack = _HDR.pack_into

    async def publisher(i, c):
        buf = bytearray(tmpl * batch)
        seq = 0
        while not stop[0]:
            await flow.wait_room()
            if stop[0] or c.t.is_closing():
                break
            while not c.can_write.is_set() and not stop[0]:
                try:
                    await asyncio.wait_for(c.can_write.wait(), 0.1)
                except asyncio.TimeoutError:
                    pass
            if stop[0]:
                break
            now = time.perf_counter_ns()
            o = poff
            for k in range(batch):
                pack(buf, o, i, seq + k, now)
                o += L
            c.write(bytes(buf))
            seq += batch
            sent[i] = seq
            flow.sent += batch
            await asyncio.sleep(0)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    got0 = sum(t.total for t in trackers)
    tasks = [asyncio.ensure_future(publisher(i, c)) for i, c in enumerate(pubs)]
    await asyncio.sleep(seconds)
    stop[0] = True
    flow.stop = True
    got1 = sum(t.total for t in trackers)
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    flow.ev.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    closed = sum(1 for c in pubs + subs if c.closed.done())
    total_sent = sum(sent)
    cut = await _drain(lambda: all(t.got >= total_sent for t in trackers),
                       lambda: sum(t.total for t in trackers))
    for c in pubs + subs:
        c.close()
    lost = sum(t.lost(sent) for t in trackers)
    return {
        "closed_by_broker": closed,
        "rate": (got1 - got0) / (t1 - t0),
        "sent": total_sent,
        "delivered": sum(t.total for t in trackers),
        "expected": total_sent * nsub,
        "lost": lost,
        "dups": sum(t.dups for t in trackers),
        "reordered": sum(t.reordered for t in trackers),
        "drain_cut": cut,
        "loadgen_cpu": (cpu1 - cpu0) / (t1 - t0),
        "seconds": t1 - t0,
    }


async def fanin(port, seconds=3.0, window=400, batch=20, npub=10):
    r = await _qos0_load(port, npub, 1, seconds, window, batch, "fanin")
    r["unit"] = "msg/s"
    return r


async def fanout(port, seconds=3.0, window=300, batch=20, nsub=10):
    r = await _qos0_load(port, 1, nsub, seconds, window, batch, "fanout")
    r["unit"] = "deliveries/s"
    return r


async def qos_window(port, qos, seconds=3.0, window=10):
    tag = "qos%d" % qos
    topic = "bench/%s" % tag
    sub = await connect(port, tag + "-s")
    tr = Tracker(1)
    _subscriber_cb(sub, tr)
    await sub.subscribe(topic, qos)
    pub = await connect(port, tag + "-p")
    tmpl, poff, pidoff = publish_template(topic, qos)
    inflight = {}  # pid -> seq
    state = {"seq": 0, "acked": 0, "free": list(range(window, 0, -1)), "bad": 0}
    stop = [False]
    done_ev = asyncio.Event()
    pack = _HDR.pack_into

    def send_one():
        pid = state["free"].pop()
        seq = state["seq"]
        state["seq"] = seq + 1
        b = bytearray(tmpl)
        b[pidoff] = pid >> 8
        b[pidoff + 1] = pid & 0xFF
        pack(b, poff, 0, seq, time.perf_counter_ns())
        inflight[pid] = seq
        return b

    def on_ack(t, pid):
        if t == 5:  # PUBREC -> PUBREL
            if pid in inflight:
                pub.out.extend(bytes((0x62, 2, pid >> 8, pid & 0xFF)))
            else:
                state["bad"] += 1
            return
        if (t == 4 and qos == 1) or (t == 7 and qos == 2):
            if inflight.pop(pid, None) is None:
                state["bad"] += 1
                return
            state["acked"] += 1
            state["free"].append(pid)
            if not stop[0]:
                pub.out.extend(send_one())
            elif not inflight:
                done_ev.set()

    pub.on_ack = on_ack
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    got0 = tr.total
    first = bytearray()
    for _ in range(window):
        first.extend(send_one())
    pub.write(bytes(first))
    await asyncio.sleep(seconds)
    stop[0] = True
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    acked = state["acked"]
    got1 = tr.total
    try:
        await asyncio.wait_for(done_ev.wait(), 3)
    except asyncio.TimeoutError:
        pass
    cut = await _drain(lambda: tr.got >= state["seq"], lambda: tr.total)
    closed = int(pub.closed.done()) + int(sub.closed.done())
    pub.close()
    sub.close()
    return {
        "closed_by_broker": closed,
        # deliveries at the subscriber while publishing (a broker may
        # acknowledge faster than it delivers, and build a backlog)
        "rate": (got1 - got0) / (t1 - t0),
        "ack_rate": acked / (t1 - t0),
        "unit": "msg/s",
        "sent": state["seq"],
        "acked": state["acked"],
        "unacked": len(inflight),
        "delivered": tr.total,
        "expected": state["seq"],
        "lost": tr.lost([state["seq"]]),
        "lost_acked": max(0, state["acked"] - tr.got),
        "dups": tr.dups,
        "reordered": tr.reordered,
        "bad_acks": state["bad"],
        "drain_cut": cut,
        "loadgen_cpu": (cpu1 - cpu0) / (t1 - t0),
        "seconds": t1 - t0,
    }


async def latency(port, seconds=3.0, rate=200):
    topic = "bench/latency"
    sub = await connect(port, "lat-s")
    tr = Tracker(1)
    tr.lat = []
    _subscriber_cb(sub, tr, lat=True)
    await sub.subscribe(topic, 0)
    pub = await connect(port, "lat-p")
    tmpl, poff, _ = publish_template(topic, 0)
    n = int(seconds * rate)
    period = 1.0 / rate
    t0 = time.perf_counter()
    for seq in range(n):
        due = t0 + seq * period
        d = due - time.perf_counter()
        if d > 0:
            await asyncio.sleep(d)
        b = bytearray(tmpl)
        _HDR.pack_into(b, poff, 0, seq, time.perf_counter_ns())
        pub.write(b)
    end = time.perf_counter() + 2
    while tr.got < n and time.perf_counter() < end:
        await asyncio.sleep(0.01)
    pub.close()
    sub.close()
    lat = sorted(tr.lat)

    def pct(p):
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))] / 1e6

    return {
        "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": lat[-1] / 1e6 if lat else None,
        "rate_target": rate, "sent": n, "delivered": tr.total, "expected": n,
        "lost": tr.lost([n]), "dups": tr.dups, "reordered": tr.reordered,
    }


async def retained(port, count=100, rounds=10):
    # Publishes `count` retained messages (QoS 1, waits for every PUBACK),
    # then times new '#' subscribers from SUBSCRIBE to the last message.
    # A broker may close the publisher instead of acknowledging (ours does
    # for 3.1.1 when its heap budget is short): then, as a client would, we
    # reconnect and send the unacknowledged ones again, a few times.
    pkts = {}
    for i in range(count):
        tmpl, poff, pidoff = publish_template("bench/ret/%03d" % i, 1, retain=True)
        tmpl[pidoff] = (i + 1) >> 8
        tmpl[pidoff + 1] = (i + 1) & 0xFF
        _HDR.pack_into(tmpl, poff, i, 0, 0)
        pkts[i + 1] = bytes(tmpl)
    acks = set()
    pub_reconnects = 0
    pub = None
    for attempt in range(3):
        pub = await connect(port, "ret-p")
        ev = asyncio.Event()

        def on_ack(t, pid, ev=ev):
            acks.add(pid)
            if len(acks) >= count:
                ev.set()

        pub.on_ack = on_ack
        pub.write(b"".join(pkts[p] for p in sorted(pkts) if p not in acks))
        done = asyncio.ensure_future(ev.wait())
        await asyncio.wait([done, pub.closed], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        done.cancel()
        if len(acks) >= count:
            break
        pub_reconnects += 1
        pub.close()
        await asyncio.sleep(0.2)
    if len(acks) < count:
        raise Refused("retained publisher: %d of %d PUBACKs after %d connections" % (
            len(acks), count, attempt + 1))
    times = []
    got_counts = []
    dups = lost = reordered = 0
    for r in range(rounds):
        sub = await connect(port, "ret-s%d" % r)
        tr = Tracker(count)
        done = asyncio.Event()
        t_end = [0.0]
        _subscriber_cb(sub, tr)
        orig = sub.on_publish

        def onp(first, b, off, end, orig=orig, tr=tr, done=done, t_end=t_end):
            orig(first, b, off, end)
            if tr.got >= count and not done.is_set():
                t_end[0] = time.perf_counter()
                done.set()

        sub.on_publish = onp
        t0 = time.perf_counter()
        sub.write(K.encode(K.Subscribe(1, [("#", 0)]), 4))
        try:
            await asyncio.wait_for(done.wait(), 5)
            times.append((t_end[0] - t0) * 1000)
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(0.05)  # anything extra (duplicates) arrives
        got_counts.append(tr.got)
        dups += tr.dups
        reordered += tr.reordered
        lost += tr.lost([1] * count)
        sub.close()
    # clear them again
    clr = bytearray()
    for i in range(count):
        clr.extend(encode_publish(("bench/ret/%03d" % i).encode(), b"", 0, True, False, 0, None, 4))
    pub.write(bytes(clr))
    await asyncio.sleep(0.1)
    pub.close()
    times.sort()
    return {
        "best_ms": times[0] if times else None,
        "median_ms": times[len(times) // 2] if times else None,
        "count": count, "rounds": rounds, "complete_rounds": len(times),
        "received_min": min(got_counts) if got_counts else 0,
        "lost": lost, "dups": dups, "reordered": reordered, "publisher_reconnects": pub_reconnects,
        "rate": (count / (times[len(times) // 2] / 1000.0)) if times else 0.0,
        "unit": "msg/s",
    }


async def conncap(port, bound=300, version=4, timeout=3.0):
    # Connects clients one by one until one is refused (CONNACK != 0 or
    # the socket closes) or `bound` are connected. All stay connected
    # until the end.
    held = []
    how = "bound reached"
    t0 = time.perf_counter()
    try:
        for i in range(bound + 1):
            if i == bound:
                break
            try:
                c = await connect(port, "cap%d" % i, version, timeout=timeout)
            except Refused as e:
                how = str(e)
                break
            except (ConnectionError, OSError) as e:
                how = "socket error: %r" % (e,)
                break
            except asyncio.TimeoutError:
                how = "no CONNACK within %.0f s" % timeout
                break
            held.append(c)
        # Are they all still up? (a broker may accept and then drop)
        await asyncio.sleep(0.3)
        alive = sum(1 for c in held if not c.closed.done())
    finally:
        for c in held:
            c.close()
    await asyncio.sleep(0.2)
    return {"accepted": len(held), "alive": alive, "refusal": how, "bound": bound,
            "seconds": time.perf_counter() - t0}


SCENARIOS = ("fanin", "fanout", "qos1", "qos2", "latency", "retained", "conncap")


async def run_scenario(name, port, seconds=3.0, auth=None, **kw):
    # auth: (user, password) for every client of the scenario, or None.
    global _auth
    _auth = auth
    if name == "fanin":
        return await fanin(port, seconds, **kw)
    if name == "fanout":
        return await fanout(port, seconds, **kw)
    if name == "qos1":
        return await qos_window(port, 1, seconds, **kw)
    if name == "qos2":
        return await qos_window(port, 2, seconds, **kw)
    if name == "latency":
        return await latency(port, seconds, **kw)
    if name == "retained":
        return await retained(port, **kw)
    if name == "conncap":
        return await conncap(port, **kw)
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--scenario", choices=SCENARIOS, action="append")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--user")
    ap.add_argument("--password", default="")
    a = ap.parse_args()
    auth = (a.user, a.password) if a.user else None
    res = {}
    for s in a.scenario or SCENARIOS:
        res[s] = asyncio.run(run_scenario(s, a.port, a.seconds, auth=auth))
        if not a.json:
            print(s, res[s])
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
