"""A sensor network on the host: our broker as a board runs it, N
simulated sensors, M subscribers, and injected faults.

    python tools/sim/sim.py [--board pico_w] [--seconds 20] [--sensors 4]
        [--rate 10] [--qos 1] [--retain] [--awake 4 --asleep 2]
        [--subscribers 1] [--fault kill9@8] [--fault stall@5:sub0:3]
        [--fault drop@12:sensor1] [--out build/sim]

The broker runs on the board twin (build/twin/micropython: MicroPython
v1.28.0 built 32-bit with the broker frozen in, tools/twin.py) with the
board profile's heap and shipped config, as host_tests/brokerproc.py
starts it: persistence on, password authentication, the connection-rate
limit on. The sim adds sys_interval 1 (and log_level info, the shipped
level); every client logs in as brokerproc.TEST_USER from a loopback
address of its own, as sensors on a LAN have addresses of their own.

Sensors (MQTT 5, persistent sessions, one topic each: sensors/<i>/data)
take readings at --rate all the time. With --asleep > 0 they duty-cycle:
awake for --awake s, then DISCONNECT and sleep for --asleep s (staggered),
keeping readings in a local buffer (--buffer, oldest dropped) that they
upload on waking. A PUBLISH is acknowledged when its PUBACK (QoS 1) or
PUBCOMP (QoS 2) comes back with a reason below 0x80; unacknowledged ones
are resent with DUP after a reconnect, as a real client does.

Subscribers (MQTT 5, persistent sessions) take sensors/+/data at --sub-qos;
sub0 also takes $SYS/broker/# for heap and store figures.
Their sockets have a small receive buffer (--rcvbuf) so that a stall
(the client stops reading) reaches the broker soon, as on a real network.

Faults, at T seconds after start:
  drop@T:NAME        NAME's socket is aborted (no DISCONNECT); it reconnects
  stall@T:NAME:D     NAME stops reading for D seconds
  kill9@T[:D]        the broker gets SIGKILL and is started again after D s
                     (default 1) on the same port and store (persistence on)

Accounting (report.json, summary.md): readings generated, PUBLISHes sent and
resent, acknowledged, refused by the broker, delivered per subscriber
(unique), duplicates, and lost = acknowledged but never delivered to a
subscriber that was subscribed. The store's $SYS counters (bytes written,
commits, block erases estimated) start again at 0 when the broker does;
the report sums them over its lives. The run fails (exit 1) when an
acknowledged message was lost.
"""
import argparse
import asyncio
import collections
import json
import socket
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO / "lib"), str(REPO / "host_tests"), str(REPO / "tools" / "wear")]
from mqtt import packets as K  # noqa: E402
from framer import Framer  # noqa: E402
from brokerproc import BrokerProc, TEST_USER, TEST_PASSWORD, profile as board_profile, source_address  # noqa: E402
import lifetime  # noqa: E402

PAYLOAD = struct.Struct(">HIQ")  # sensor, seq, time the reading was taken (ns)
PAYLOAD_SIZE = 32
EXPIRY = 3600


class Link(asyncio.Protocol):
    def __init__(self, node):
        self.node = node
        self.f = Framer()
        self.t = None

    def connection_made(self, t):
        self.t = t

    def data_received(self, d):
        self.f.feed(d)
        while True:
            try:
                p = self.f.next(5)
            except Exception as e:  # a malformed packet from the broker is a finding
                self.node.sim.note("%s: bad packet from broker: %r" % (self.node.name, e))
                self.t.abort()
                return
            if p is None:
                break
            self.node.on_packet(self, p)

    def connection_lost(self, exc):
        self.node.on_lost(self)


class Node:
    def __init__(self, sim, name, rcvbuf=None):
        self.sim = sim
        self.name = name
        self.link = None
        self.connack = None
        self.rcvbuf = rcvbuf
        self.connects = 0
        self.refused = 0
        self.conn_lost = 0
        self.session_lost = 0
        self.stalled_until = 0
        self.addr = source_address()

    @property
    def connected(self):
        return self.link is not None

    async def connect(self):
        loop = asyncio.get_running_loop()
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if self.rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            s.bind(self.addr)
            s.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", self.sim.port)), 2)
            _, link = await loop.create_connection(lambda: Link(self), sock=s)
        except (OSError, asyncio.TimeoutError):
            try:
                s.close()
            except Exception:
                pass
            return False
        self.connack = loop.create_future()
        link.t.write(K.encode(K.Connect(self.name, 5, False, 0, TEST_USER, TEST_PASSWORD.encode(),
                                        props={0x11: EXPIRY}), 5))
        self.link = link
        try:
            ack = await asyncio.wait_for(self.connack, 3)
        except (asyncio.TimeoutError, ConnectionError):
            self.drop_link(link)
            self.refused += 1
            return False
        if ack.reason != 0:
            self.refused += 1
            self.sim.note_once("%s refused: CONNACK 0x%02X" % (self.name, ack.reason))
            self.drop_link(link)
            return False
        self.connects += 1
        if self.connects > 1 and not ack.session_present:
            self.session_lost += 1
            self.sim.note("%s: session not present after reconnect" % self.name)
        self.on_connected(ack.session_present)
        return True

    def drop_link(self, link):
        if self.link is link:
            self.link = None
        if link.t is not None and not link.t.is_closing():
            link.t.abort()

    def send(self, pkt):
        if self.link is not None:
            self.link.t.write(K.encode(pkt, 5))

    def on_lost(self, link):
        if self.connack is not None and not self.connack.done():
            self.connack.set_exception(ConnectionError("closed"))
        if self.link is link:
            self.link = None
            self.conn_lost += 1

    def abort(self):
        if self.link is not None:
            self.link.t.abort()

    async def stall(self, seconds):
        if self.link is None:
            return
        t = self.link.t
        t.pause_reading()
        self.stalled_until = time.monotonic() + seconds
        await asyncio.sleep(seconds)
        if not t.is_closing():
            t.resume_reading()

    def disconnect(self):
        if self.link is not None:
            link = self.link
            link.t.write(b"\xe0\x00")
            self.link = None
            link.t.close()


class Sensor(Node):
    def __init__(self, sim, idx, rate, qos, retain, awake, asleep, buffer):
        super().__init__(sim, "sensor%d" % idx)
        self.idx = idx
        self.rate = rate
        self.qos = qos
        self.retain = retain
        self.awake = awake
        self.asleep = asleep
        self.buffer = buffer
        self.topic = "sensors/%d/data" % idx
        self.seq = 0
        self.pending = collections.deque()
        self.inflight = {}  # pid -> [seq, state]  state 0 PUBLISH sent, 1 PUBREL sent
        self.pid = 0
        self.generated = 0
        self.sent = 0
        self.resent = 0
        self.acked = set()
        self.rejected = 0
        self.dropped_local = 0
        self.last_acked = -1
        self.sent_seqs = set()
        self.retry = []  # (due, seq): refused by the broker, sent again later
        self.retries = {}  # seq -> times refused
        self.taken = {}  # seq -> time.time_ns() of the reading
        self.given_up = 0

    def payload(self, seq):
        b = bytearray(PAYLOAD_SIZE)
        PAYLOAD.pack_into(b, 0, self.idx, seq, self.taken.get(seq, 0))
        return bytes(b)

    def is_awake(self, t):
        if self.asleep <= 0:
            return True
        cycle = self.awake + self.asleep
        phase = (t + self.idx * cycle / max(1, self.sim.n_sensors)) % cycle
        return phase < self.awake

    def next_pid(self):
        for _ in range(65535):
            self.pid = self.pid % 65535 + 1
            if self.pid not in self.inflight:
                return self.pid
        raise RuntimeError("no packet identifier free")

    def publish_pkt(self, pid, seq, dup=False):
        return K.Publish(self.topic, self.payload(seq), self.qos, self.retain, dup, pid if self.qos else 0)

    def on_connected(self, present):
        # Resend what was not acknowledged (MQTT-4.4.0-1): PUBLISH with DUP,
        # or PUBREL for QoS 2 messages already past PUBREC.
        for pid in sorted(self.inflight):
            seq, st = self.inflight[pid]
            if st == 1 and present:
                self.send(K.Ack(K.PUBREL, pid))
            else:
                self.inflight[pid][1] = 0
                self.send(self.publish_pkt(pid, seq, dup=present))
            self.resent += 1

    def on_packet(self, link, p):
        t = p.type
        if t == K.CONNACK:
            if self.connack and not self.connack.done():
                self.connack.set_result(p)
        elif t == K.PUBACK or t == K.PUBCOMP:
            e = self.inflight.pop(p.pid, None)
            if e is None:
                return
            if p.reason < 0x80:
                self.acked.add(e[0])
                self.last_acked = max(self.last_acked, e[0])
            else:
                self.refused_pub(e[0], p.reason)
        elif t == K.PUBREC:
            e = self.inflight.get(p.pid)
            if e is None:
                self.send(K.Ack(K.PUBREL, p.pid, 0x92))
                return
            if p.reason >= 0x80:
                del self.inflight[p.pid]
                self.refused_pub(e[0], p.reason)
                return
            e[1] = 1
            self.send(K.Ack(K.PUBREL, p.pid))
        elif t == K.DISCONNECT:
            self.sim.note("%s: DISCONNECT 0x%02X from broker" % (self.name, p.reason))

    def refused_pub(self, seq, reason):
        # 0x97 (quota exceeded) and the like: try again later, a few times.
        self.rejected += 1
        self.sim.note_once("%s: PUBLISH refused with 0x%02X" % (self.name, reason))
        n = self.retries.get(seq, 0) + 1
        self.retries[seq] = n
        if n <= self.sim.a.retries:
            self.retry.append((time.monotonic() + 0.5, seq))
        else:
            self.given_up += 1

    def generate(self, now):
        # Readings at `rate`, whether awake or not.
        due = int((now - self.sim.t0) * self.rate)
        while self.generated < due:
            self.pending.append(self.seq)
            self.taken[self.seq] = time.time_ns()
            self.seq += 1
            self.generated += 1
            if len(self.pending) > self.buffer:
                self.pending.popleft()
                self.dropped_local += 1

    def pump(self):
        if self.retry:
            now = time.monotonic()
            due = [x for x in self.retry if x[0] <= now]
            if due:
                self.retry = [x for x in self.retry if x[0] > now]
                for _, seq in sorted(due, reverse=True):
                    self.pending.appendleft(seq)
        window = 10 if self.qos else 1 << 30
        while self.pending and len(self.inflight) < window and self.link is not None:
            if self.link.t.get_write_buffer_size() > 65536:
                break
            seq = self.pending.popleft()
            pid = self.next_pid() if self.qos else 0
            if self.qos:
                self.inflight[pid] = [seq, 0]
            self.send(self.publish_pkt(pid, seq))
            if seq in self.sent_seqs:
                self.resent += 1
            else:
                self.sent += 1
                self.sent_seqs.add(seq)

    def idle(self):
        return not self.pending and not self.inflight and not self.retry

    async def run(self):
        while not self.sim.done:
            now = time.monotonic()
            if self.sim.generating:
                self.generate(now)
            if self.sim.generating:
                awake = self.is_awake(now - self.sim.t0)
            else:
                awake = not self.idle()  # draining: only those with work stay
            if not awake:
                if self.link is not None and not self.inflight:
                    self.disconnect()  # go to sleep, session kept
                if self.link is None:
                    await asyncio.sleep(0.05)
                    continue
            if self.link is None:
                if self.sim.generating or not self.idle():
                    if not await self.connect():
                        await asyncio.sleep(0.3)
                        continue
                else:
                    await asyncio.sleep(0.05)
                    continue
            self.pump()
            await asyncio.sleep(0.02)
        if self.link is not None:
            self.disconnect()


class Subscriber(Node):
    def __init__(self, sim, idx, qos, n_sensors, monitor, rcvbuf):
        super().__init__(sim, "sub%d" % idx, rcvbuf)
        self.qos = qos
        self.monitor = monitor
        self.got = [set() for _ in range(n_sensors)]
        self.dups = 0
        self.out_of_order = 0
        self.last = [-1] * n_sensors
        self.lat = []
        self.subscribed_at = None

    def on_connected(self, present):
        if not present:
            topics = [("sensors/+/data", self.qos)]
            if self.monitor:
                topics.append(("$SYS/broker/#", 0))
            self.send(K.Subscribe(1, topics))
            if self.subscribed_at is None:
                self.subscribed_at = time.monotonic()

    def on_packet(self, link, p):
        t = p.type
        if t == K.CONNACK:
            if self.connack and not self.connack.done():
                self.connack.set_result(p)
        elif t == K.PUBLISH:
            if p.qos == 1:
                self.send(K.Ack(K.PUBACK, p.pid))
            elif p.qos == 2:
                self.send(K.Ack(K.PUBREC, p.pid))
            if p.topic.startswith("$SYS/"):
                self.sim.sys_value(p.topic[12:], p.payload)
                return
            if len(p.payload) < PAYLOAD.size:
                return
            i, seq, ts = PAYLOAD.unpack_from(p.payload)
            if i >= len(self.got):
                return
            g = self.got[i]
            if seq in g:
                self.dups += 1
                return
            g.add(seq)
            if seq < self.last[i]:
                self.out_of_order += 1
            self.last[i] = max(self.last[i], seq)
            if not p.retain:
                self.lat.append((time.time_ns() - ts) / 1e6)
        elif t == K.PUBREL:
            self.send(K.Ack(K.PUBCOMP, p.pid))
        elif t == K.SUBACK:
            bad = [r for r in p.reasons if r >= 0x80]
            if bad:
                self.sim.note("%s: SUBACK refused %s" % (self.name, bad))
        elif t == K.DISCONNECT:
            self.sim.note("%s: DISCONNECT 0x%02X from broker" % (self.name, p.reason))

    def delivered(self):
        return sum(len(g) for g in self.got)

    async def run(self):
        while not self.sim.done:
            if self.link is None:
                if not await self.connect():
                    await asyncio.sleep(0.3)
                    continue
            await asyncio.sleep(0.05)
        if self.link is not None:
            self.disconnect()


class Sim:
    def __init__(self, a):
        self.a = a
        self.n_sensors = a.sensors
        self.notes = []
        self._once = set()
        self.sys = {}
        self.samples = []
        self.events = []
        self.done = False
        self.generating = True
        self.broker = None
        self.port = None
        self.t0 = None
        self.kills = []

    def note(self, s):
        if len(self.notes) < 200:
            self.notes.append("%.2f s %s" % (time.monotonic() - (self.t0 or time.monotonic()), s))

    def note_once(self, s):
        if s not in self._once:
            self._once.add(s)
            self.note(s + " (first time)")

    def sys_value(self, k, v):
        try:
            v = v.decode()
        except Exception:
            return
        self.sys[k] = v

    def sysint(self, k):
        v = self.sys.get(k)
        try:
            x = float(v.split()[0])
        except (AttributeError, ValueError, IndexError):
            return None
        return int(x) if x == int(x) else x

    async def faults(self, nodes):
        loop = asyncio.get_running_loop()
        plan = []
        for f in self.a.fault or []:
            kind, _, rest = f.partition("@")
            parts = rest.split(":")
            plan.append((float(parts[0]), kind, parts[1:]))
        plan.sort()
        for at, kind, args in plan:
            d = self.t0 + at - time.monotonic()
            if d > 0:
                await asyncio.sleep(d)
            if self.done:
                return
            self.events.append((round(time.monotonic() - self.t0, 2), kind, ":".join(args)))
            if kind == "drop":
                nodes[args[0]].abort()
            elif kind == "stall":
                asyncio.ensure_future(nodes[args[0]].stall(float(args[1]) if len(args) > 1 else 3.0))
            elif kind == "kill9":
                delay = float(args[0]) if args else 1.0
                self.broker.kill9()
                t_kill = time.monotonic()
                await asyncio.sleep(delay)
                await loop.run_in_executor(None, self.broker.start)
                self.kills.append({"at": round(t_kill - self.t0, 2),
                                   "down_s": round(time.monotonic() - t_kill, 2)})
            else:
                self.note("unknown fault %s" % kind)

    async def sampler(self, sensors, subs):
        while not self.done:
            t = time.monotonic() - self.t0
            self.samples.append({
                "t": round(t, 2),
                "generated": sum(s.generated for s in sensors),
                "sent": sum(s.sent for s in sensors),
                "acked": sum(len(s.acked) for s in sensors),
                "delivered": subs[0].delivered() if subs else 0,
                "heap_used": self.sysint("heap/used"),
                "heap_free": self.sysint("heap/free"),
                "store_used": self.sysint("store/bytes used"),
                "store_written": self.sysint("store/bytes written"),
                "store_commits": self.sysint("store/commits"),
                "store_erases": self.sysint("store/block erases estimated"),
                "connected": self.sysint("clients/connected"),
                "sensors_connected": sum(1 for s in sensors if s.connected),
            })
            await asyncio.sleep(0.5)

    async def main(self):
        a = self.a
        prof = board_profile(a.board)
        # The shipped config (BrokerProc: persistence, password file, rate
        # limit), $SYS every second, and the shipped log level (BrokerProc's
        # is debug, which would slow the broker down).
        cfg = {"sys_interval": 1, "log_level": "info"}
        if a.max_connections:
            cfg["max_connections"] = a.max_connections
        self.broker = BrokerProc(board=a.board, config=cfg, heap=a.heap)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.broker.start)
        self.port = self.broker.port
        self.profile = prof
        self.cfg = dict(prof["config"], **cfg)
        try:
            return await self._run()
        finally:
            self.broker.stop()
            self.broker_log = self.broker.log()
            self.broker.tmp.cleanup()

    async def _run(self):
        a = self.a
        self.t0 = time.monotonic()
        subs = [Subscriber(self, i, a.sub_qos, a.sensors, i == 0, a.rcvbuf) for i in range(a.subscribers)]
        # Subscribers first, so that they are subscribed before data flows.
        for s in subs:
            for _ in range(20):
                if await s.connect():
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.2)
        self.t0 = time.monotonic()
        sensors = [Sensor(self, i, a.rate, a.qos, a.retain, a.awake, a.asleep, a.buffer) for i in range(a.sensors)]
        nodes = {n.name: n for n in sensors + subs}
        tasks = [asyncio.ensure_future(n.run()) for n in subs + sensors]
        tasks.append(asyncio.ensure_future(self.sampler(sensors, subs)))
        ftask = asyncio.ensure_future(self.faults(nodes))
        await asyncio.sleep(a.seconds)
        self.generating = False
        ftask.cancel()
        # Drain: sensors upload what they hold, subscribers take the rest.
        end = time.monotonic() + a.drain
        stable_since = time.monotonic()
        last = None
        while time.monotonic() < end:
            d = tuple(s.delivered() for s in subs)
            if d != last:
                last = d
                stable_since = time.monotonic()
            if all(s.idle() for s in sensors) and time.monotonic() - stable_since > 1.0:
                break
            await asyncio.sleep(0.1)
        self.t_end = time.monotonic() - self.t0
        self.done = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.2)
        # Retained state: what a fresh client gets for each sensor's topic.
        retained = await self.check_retained(sensors) if a.retain else None
        return self.report(sensors, subs, retained)

    async def check_retained(self, sensors):
        got = {}
        chk = Subscriber(self, 99, 0, len(sensors), False, None)
        chk.name = "retain-check"
        ok = False
        for _ in range(10):
            if await chk.connect_clean():
                ok = True
                break
            await asyncio.sleep(0.3)
        if not ok:
            return {"error": "could not connect"}
        await asyncio.sleep(0.5)
        for i, s in enumerate(sensors):
            got[i] = max(chk.got[i]) if chk.got[i] else None
        chk.disconnect()
        out = {}
        for i, s in enumerate(sensors):
            want = max(s.sent_seqs) if s.sent_seqs else None
            out[s.name] = {"retained_seq": got[i], "last_sent": want, "last_acked": s.last_acked,
                           "ok": got[i] is not None and got[i] >= s.last_acked}
        return out

    def report(self, sensors, subs, retained):
        a = self.a
        acked_all = [s.acked for s in sensors]
        per_sensor = {}
        for s in sensors:
            per_sensor[s.name] = {
                "generated": s.generated, "sent": s.sent, "resent": s.resent, "acknowledged": len(s.acked),
                "refused_by_broker": s.rejected, "given_up": s.given_up, "unacknowledged_left": len(s.inflight),
                "pending_left": len(s.pending), "dropped_in_sensor_buffer": s.dropped_local,
                "connects": s.connects, "connect_refusals": s.refused, "connections_lost": s.conn_lost,
                "sessions_lost": s.session_lost,
            }
        per_sub = {}
        lost_acked_total = 0
        for sb in subs:
            lost_acked = 0
            missing_sent = 0
            for i, s in enumerate(sensors):
                lost_acked += len(acked_all[i] - sb.got[i])
                missing_sent += len(s.sent_seqs - sb.got[i])
            lost_acked_total += lost_acked
            lat = sorted(sb.lat)
            per_sub[sb.name] = {
                "delivered": sb.delivered(), "duplicates": sb.dups, "out_of_order": sb.out_of_order,
                "lost_acknowledged": lost_acked, "not_delivered_of_sent": missing_sent,
                "connects": sb.connects, "connect_refusals": sb.refused, "connections_lost": sb.conn_lost,
                "sessions_lost": sb.session_lost,
                # age of a reading when it reached the subscriber
                "latency_ms_p50": lat[len(lat) // 2] if lat else None,
                "latency_ms_p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
                "latency_ms_max": lat[-1] if lat else None,
            }
        tot = {
            "generated": sum(s.generated for s in sensors),
            "sent": sum(s.sent for s in sensors),
            "resent": sum(s.resent for s in sensors),
            "acknowledged": sum(len(x) for x in acked_all),
            "refused_by_broker": sum(s.rejected for s in sensors),
            "given_up_after_refusals": sum(s.given_up for s in sensors),
            "dropped_in_sensor_buffer": sum(s.dropped_local for s in sensors),
            "delivered": sum(sb.delivered() for sb in subs),
            "duplicates": sum(sb.dups for sb in subs),
            "lost_acknowledged": lost_acked_total,
            "connect_refusals": sum(n.refused for n in sensors + subs),
        }
        heap = [x["heap_used"] for x in self.samples if x["heap_used"] is not None]
        free = [x["heap_free"] for x in self.samples if x["heap_free"] is not None]
        store = [x["store_used"] for x in self.samples if x["store_used"] is not None]
        written, _ = counted(self.samples, "store_written")
        commits, _ = counted(self.samples, "store_commits")
        erases, span = counted(self.samples, "store_erases")
        conns_needed = a.sensors + a.subscribers
        rep = {
            "config": {k: v for k, v in vars(a).items()},
            "board_limits": {k: self.cfg.get(k) for k in ("max_connections", "max_queued_messages",
                                                          "max_inflight_messages", "max_retained_messages",
                                                          "store_max_bytes", "min_free_heap")},
            "duration_s": round(self.t_end, 2),
            "totals": tot, "sensors": per_sensor, "subscribers": per_sub, "retained": retained,
            "faults": self.events, "kills": self.kills,
            "heap_used_max": max(heap) if heap else None, "heap_free_min": min(free) if free else None,
            "store_used_max": max(store) if store else None,
            "store_bytes_written": written,
            "store_commits": commits,
            "store_erases_estimated": round(erases, 2) if erases is not None else None,
            "store_erases_per_s": round(erases / span, 3) if erases is not None and span else None,
            "store_counted_s": span,
            "fs_size": self.profile.get("fs_size"),
            "heap": self.broker.heap,
            "connections_needed": conns_needed,
            "notes": self.notes, "samples": self.samples,
        }
        rep["verdict"] = verdict(rep, a)
        return rep


async def _connect_clean(self):
    # retain-check: clean start, no session kept
    loop = asyncio.get_running_loop()
    try:
        _, link = await asyncio.wait_for(
            loop.create_connection(lambda: Link(self), "127.0.0.1", self.sim.port, local_addr=self.addr), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    self.connack = loop.create_future()
    self.link = link
    link.t.write(K.encode(K.Connect(self.name, 5, True, 0, TEST_USER, TEST_PASSWORD.encode()), 5))
    try:
        ack = await asyncio.wait_for(self.connack, 3)
    except (asyncio.TimeoutError, ConnectionError):
        self.drop_link(link)
        return False
    if ack.reason:
        self.drop_link(link)
        return False
    self.send(K.Subscribe(1, [("sensors/+/data", 0)]))
    return True


Subscriber.connect_clean = _connect_clean


def counted(samples, key):
    # -> (what a $SYS counter counted over the run, seconds it was watched).
    # The broker's counters start again at 0 when it does (kill9), so a
    # value below the last one is counted from 0.
    total = None
    last = t0 = t1 = None
    for x in samples:
        v = x.get(key)
        if v is None:
            continue
        if last is None:
            total, t0 = 0, x["t"]
        else:
            total += v - last if v >= last else v
        last, t1 = v, x["t"]
    return total, (round(t1 - t0, 2) if total is not None else None)


def days_to_wear_out(rep):
    # Estimated erases per second spread over the wear-levelling pool of
    # tools/wear/lifetime.py (LittleFS levels wear dynamically over the
    # blocks that do not hold static files), 100,000 cycles per block.
    per_s = rep.get("store_erases_per_s")
    fs = rep.get("fs_size")
    if not per_s or not fs:
        return None, None
    pool = lifetime.pool_blocks(rep["config"]["board"], fs // 4096)
    return lifetime.CYCLES * pool / per_s / 86400.0, pool


def verdict(rep, a):
    t = rep["totals"]
    lines = []
    ok = True
    if t["lost_acknowledged"]:
        ok = False
        lines.append("LOST: %d acknowledged messages never reached a subscriber" % t["lost_acknowledged"])
    else:
        lines.append("no acknowledged message lost")
    expect = a.sensors * a.rate * a.seconds
    sub0 = next(iter(rep["subscribers"].values()), {})
    got = sub0.get("delivered", 0)
    share = got / expect if expect else 0
    lines.append("delivered %d of %d readings generated (%.1f%%) to sub0 in %.1f s (target rate %.0f msg/s in total)"
                 % (got, t["generated"], 100.0 * got / max(1, t["generated"]), rep["duration_s"],
                    a.sensors * a.rate))
    p99 = sub0.get("latency_ms_p99")
    if p99 is not None:
        lines.append("age of a reading at sub0: p50 %.0f ms, p99 %.0f ms, max %.0f ms (limit --max-age %.1f s)" % (
            sub0["latency_ms_p50"], p99, sub0["latency_ms_max"], a.max_age))
        if p99 > a.max_age * 1000:
            ok = False
    if t["dropped_in_sensor_buffer"]:
        ok = False
        lines.append("sensors dropped %d readings from their buffers (could not upload in time)"
                     % t["dropped_in_sensor_buffer"])
    if t["refused_by_broker"]:
        lines.append("the broker refused %d PUBLISHes with a reason >= 0x80 (a full queue: 0x97); the sensors "
                     "sent them again later, and gave up on %d" % (t["refused_by_broker"], t["given_up_after_refusals"]))
    lim = rep["board_limits"]
    if rep["connections_needed"] > (lim.get("max_connections") or 1 << 30):
        lines.append("needs %d connections at once if nobody sleeps, but max_connections is %d: "
                     "%d connection attempts were refused (clients retried)"
                     % (rep["connections_needed"], lim["max_connections"], t["connect_refusals"]))
    if rep["heap_free_min"] is not None:
        mf = lim.get("min_free_heap") or 0
        lines.append("heap: used at most %d B, free at least %d B (min_free_heap %d)" % (
            rep["heap_used_max"], rep["heap_free_min"], mf))
        if rep["heap_free_min"] < mf:
            ok = False
    if rep["store_used_max"] is not None:
        lines.append("store: at most %d B used of %d; %s B written during the run" % (
            rep["store_used_max"], lim.get("store_max_bytes") or 0, rep["store_bytes_written"]))
        days, pool = days_to_wear_out(rep)
        if days is not None:
            lines.append("flash: %d commits, %.1f block erases estimated by the store (%.2f/s over %.0f s); spread "
                         "over a wear pool of %d blocks that is about %.0f days to 100,000 erase cycles per block"
                         % (rep["store_commits"] or 0, rep["store_erases_estimated"], rep["store_erases_per_s"],
                            rep["store_counted_s"], pool, days))
    if rep["retained"]:
        bad = [k for k, v in rep["retained"].items() if isinstance(v, dict) and not v.get("ok")]
        if bad:
            ok = False
            lines.append("retained state stale or missing for %s" % ", ".join(bad))
        else:
            lines.append("retained state: every sensor's retained message is its last acknowledged reading or newer")
    if share < 0.99:
        ok = False
    return {"ok": ok, "lines": lines}


def summary_md(rep, png_name=None):
    a = rep["config"]
    t = rep["totals"]
    out = ["# Sensor network simulation", "",
           "Board profile **%s**, %d sensors at %s msg/s, QoS %d%s, %d subscriber(s) at QoS %d, "
           "%s s%s; faults: %s." % (
               a["board"], a["sensors"], a["rate"], a["qos"], ", retained" if a["retain"] else "",
               a["subscribers"], a["sub_qos"], a["seconds"],
               ", duty cycle %s s awake / %s s asleep" % (a["awake"], a["asleep"]) if a["asleep"] else "",
               ", ".join("%s@%s%s" % (k, at, (":" + x) if x else "") for at, k, x in rep["faults"]) or "none"),
           "", "Verdict: **%s**" % ("yes" if rep["verdict"]["ok"] else "no"), ""]
    for line in rep["verdict"]["lines"]:
        out.append("- " + line)
    out += ["", "| | count |", "|---|---|"]
    for k, v in t.items():
        out.append("| %s | %s |" % (k.replace("_", " "), v))
    out += ["", "| subscriber | delivered | duplicates | out of order | lost (acknowledged) | age p50 ms | age p99 ms |",
            "|---|---|---|---|---|---|---|"]
    for k, v in rep["subscribers"].items():
        out.append("| %s | %d | %d | %d | %d | %s | %s |" % (
            k, v["delivered"], v["duplicates"], v["out_of_order"], v["lost_acknowledged"],
            "%.1f" % v["latency_ms_p50"] if v["latency_ms_p50"] is not None else "-",
            "%.1f" % v["latency_ms_p99"] if v["latency_ms_p99"] is not None else "-"))
    if rep["kills"]:
        out += ["", "Broker kills: " + ", ".join("at %s s, down %s s" % (k["at"], k["down_s"]) for k in rep["kills"])]
    if png_name:
        out += ["", "![simulation](%s)" % png_name]
    if rep["notes"]:
        out += ["", "Notes (first %d):" % min(15, len(rep["notes"])), ""]
        out += ["- " + n for n in rep["notes"][:15]]
    return "\n".join(out) + "\n"


def plot(rep, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = rep["samples"]
    t = [x["t"] for x in s]
    fig, ax = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for k in ("generated", "sent", "acked", "delivered"):
        ax[0].plot(t, [x[k] for x in s], label=k)
    ax[0].set_ylabel("messages (cumulative)")
    ax[0].legend(loc="upper left", fontsize=8)
    hu = [(x["t"], x["heap_used"]) for x in s if x["heap_used"] is not None]
    hf = [(x["t"], x["heap_free"]) for x in s if x["heap_free"] is not None]
    if hu:
        ax[1].plot(*zip(*hu), label="heap used")
    if hf:
        ax[1].plot(*zip(*hf), label="heap free")
    mf = rep["board_limits"].get("min_free_heap")
    if mf:
        ax[1].axhline(mf, color="red", linestyle=":", label="min_free_heap")
    ax[1].set_ylabel("bytes ($SYS)")
    ax[1].legend(loc="upper left", fontsize=8)
    su = [(x["t"], x["store_used"]) for x in s if x["store_used"] is not None]
    if su:
        ax[2].plot(*zip(*su), label="store bytes used")
    ax2 = ax[2].twinx()
    ax2.plot(t, [x["sensors_connected"] for x in s], color="gray", drawstyle="steps-post", label="sensors connected")
    ax2.set_ylabel("sensors connected")
    ax[2].set_ylabel("store bytes")
    ax[2].set_xlabel("seconds")
    ax[2].legend(loc="upper left", fontsize=8)
    for at, kind, x in rep["faults"]:
        for a_ in ax:
            a_.axvline(at, color="black", alpha=0.3, linestyle="--")
        ax[0].text(at, ax[0].get_ylim()[1] * 0.9, kind, fontsize=8, rotation=90)
    c = rep["config"]
    fig.suptitle("%s: %d sensors x %s msg/s QoS %d%s, faults: %s" % (
        c["board"], c["sensors"], c["rate"], c["qos"], " retained" if c["retain"] else "",
        ", ".join(k for _, k, _ in rep["faults"]) or "none"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--board", default="pico_w")
    ap.add_argument("--heap", default=None, help="the twin's heap in bytes (default: the profile's, the board's)")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--drain", type=float, default=10, help="max seconds to finish uploads after the run")
    ap.add_argument("--sensors", type=int, default=4)
    ap.add_argument("--rate", type=float, default=10, help="readings per second per sensor")
    ap.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    ap.add_argument("--retain", action="store_true")
    ap.add_argument("--awake", type=float, default=4)
    ap.add_argument("--asleep", type=float, default=0)
    ap.add_argument("--buffer", type=int, default=500, help="readings a sensor holds while it cannot send")
    ap.add_argument("--max-age", type=float, default=5.0,
                    help="verdict: p99 age of a reading at delivery must stay under this many seconds")
    ap.add_argument("--retries", type=int, default=20, help="times a sensor resends a refused PUBLISH")
    ap.add_argument("--subscribers", type=int, default=1)
    ap.add_argument("--sub-qos", type=int, default=1, choices=(0, 1, 2))
    ap.add_argument("--rcvbuf", type=int, default=4096)
    ap.add_argument("--max-connections", type=int, default=0, help="override the profile's max_connections")
    ap.add_argument("--fault", action="append", help="drop@T:NAME, stall@T:NAME:D, kill9@T[:D]")
    ap.add_argument("--out", default=str(REPO / "build" / "sim"))
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    sim = Sim(a)
    rep = asyncio.run(sim.main())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1))
    png = out / "sim.png"
    has_png = plot(rep, png)
    (out / "summary.md").write_text(summary_md(rep, png.name if has_png else None))
    (out / "broker.log").write_text(getattr(sim, "broker_log", ""))
    t = rep["totals"]
    print("sim: %s, %d sensors x %s msg/s QoS %d%s, %d subscriber(s), %.1f s, faults: %s" % (
        a.board, a.sensors, a.rate, a.qos, " retained" if a.retain else "", a.subscribers, rep["duration_s"],
        ", ".join("%s@%s" % (k, at) for at, k, _ in rep["faults"]) or "none"))
    print("sim: generated %d, sent %d (+%d resent), acknowledged %d, refused %d, delivered %d, duplicates %d, "
          "lost (acknowledged) %d" % (t["generated"], t["sent"], t["resent"], t["acknowledged"],
                                      t["refused_by_broker"], t["delivered"], t["duplicates"], t["lost_acknowledged"]))
    for line in rep["verdict"]["lines"]:
        print("sim: " + line)
    print("sim: verdict %s; report in %s%s" % ("OK" if rep["verdict"]["ok"] else "NOT OK", out,
                                               "" if has_png else " (no matplotlib: no PNG)"))
    return 1 if t["lost_acknowledged"] else 0


if __name__ == "__main__":
    sys.exit(main())
