# Bridges: the gateway connects out to upstream brokers as an MQTT client
# (Mosquitto's `connection` sections; config key "bridges", checked by
# config._check_bridges). docs/bridge.md has example configs and the
# reasons behind the choices.
#
# A bridge is a client context on the broker's own machinery, as in
# Mosquitto (bridge.c): its link upstream is a Connection (conn.py) whose
# session is a local session like any client's. That session subscribes
# locally to the bridge's out/both patterns, so local messages reach it
# through route(), wait in its queue (on flash when persistence is on) and
# go up through pump(), with its packet identifiers, in-flight state,
# resend on resumption and persistence. What comes down is handled by
# handle_publish and handle_other as a client's PUBLISH and
# acknowledgements are. Only this is the bridge's own:
#   - connecting out: the addresses, failover, backoff and TLS of the link,
#     and a client's side of CONNECT, CONNACK, SUBSCRIBE and keep-alive;
#   - topic mapping both ways (topic_out, topic_in);
#   - loops: No Local both ways (3.1.1 upstream: Mosquitto's bridge
#     protocol level 0x84, or plain 3.1.1 with echoes dropped; see
#     docs/bridge.md);
#   - its state topic, $SYS/broker/connection/<name>/state, "1" or "0",
#     retained here and upstream (there with a will).
import asyncio
import random
import time
from micropython import const
from mqtt import props as P
from mqtt.errors import MQTTError
from mqtt.packets import decode, encode, Connect, Subscribe, PUBACK_REASONS
from mqtt.topic import matches
from broker import log
from broker.conn import Connection
from broker.core import Closed
from broker.message import Message
from broker.pump import resend_inflight
from broker.route import route
from broker.session import Session, NEVER, RELEASED
from broker.subs import Sub
from broker.tls import TlsTransport, client_context, client_tls
from broker.transport import TcpTransport, close_socket, connect_out

_CONNACK = const(2)
_PUBLISH = const(3)
_PUBACK = const(4)
_PUBREC = const(5)
_SUBACK = const(9)
_UNSUBACK = const(11)
_PINGRESP = const(13)
_DISCONNECT = const(14)
_NO_LOCAL = const(0x04)
_RAP = const(0x08)
_ECHOES = const(16)  # messages remembered for the plain 3.1.1 echo check
# 3.1.1 CONNACK return codes (v5 reason codes are logged in hex)
_REFUSALS = ("", "protocol version", "client id", "server unavailable", "bad user name or password", "not authorized")
_CONNECT_MS = const(10000)  # TCP, TLS and CONNACK together


def _hostname(cfg, name):
    # Set by the board layer by now (board.check_net: "mqtt-" + chip id bytes
    # unless configured); the unix port, with no network module: the name.
    net = cfg.get("network")
    h = net.get("hostname") if isinstance(net, dict) else None
    if h:
        return h
    try:
        import network

        return network.hostname()
    except Exception:
        return name


def _swap(topic, old, new):
    # topic with its prefix old replaced by new. "#" matches the level above
    # it too: "site/b3/cmd/" + "#" matches "site/b3/cmd", which is new less
    # its last "/" ("cmd/" -> "cmd", not a "cmd/" nobody uses); "" if none.
    if topic.startswith(old):
        return new + topic[len(old):]
    return new[:-1] if new[-1:] == "/" else new


class Link(Connection):
    # The connection to the upstream: a client connection seen from the
    # other side. Packets only a server sends (CONNACK, SUBACK, PINGRESP)
    # are the bridge's; the rest goes to the usual handlers.
    echo = False  # plain 3.1.1 upstream: drop echoes of our own messages
    error = None  # why the link failed to write, for the log

    def __init__(self, br, t, version):
        Connection.__init__(self, br.b, t)
        self.br = br
        self.went_out = br.went_out
        if version != 4:
            self.version = version
        self.up = asyncio.Event()  # set at CONNACK

    def close_soon(self, error=None):
        if error is not None:
            self.error = error
        Connection.close_soon(self)

    def topic_out(self, topic):
        return self.br.topic_out(topic)

    def topic_in(self, topic, retain):
        return self.br.topic_in(topic, retain)

    def dispatch(self, first, mv, off, end):
        t = first >> 4
        if self.session is None:
            if t != _CONNACK:
                raise MQTTError(0x82, "expected CONNACK")
            self.br.connack(self, decode(first, mv, off, end, self.version))
            return
        if t == _SUBACK or t == _UNSUBACK or t == _PINGRESP:
            self.broker.stats_pkts_recv += 1
            return
        if t == _DISCONNECT:
            d = decode(first, mv, off, end, self.version)
            log.warning("bridge %s: the upstream disconnected us: 0x%02X", self.br.name, d.reason)
            raise Closed()
        if (t == _PUBACK or t == _PUBREC) and self.version == 5 and end - off > 2 and mv[off + 2] >= 0x80:
            # Refused upstream: the flow ends (MQTT 4.3); so too for 0x95, no
            # PUBACK code (MQTT-3.4.2-1), Mosquitto 2.0.11's for a message
            # over its message_size_limit (closed for it, the link resent it).
            br = self.br
            n = br.refused = br.refused + 1
            self.session.dropped += 1
            if not n & (n - 1):  # the 1st, 2nd, 4th...: no line a message, the log may be on flash
                log.warning("bridge %s: the upstream refused a message: 0x%02X (%d so far)", br.name, mv[off + 2], n)
            if mv[off + 2] not in PUBACK_REASONS:
                mv[off + 2] = 0x80
        Connection.dispatch(self, first, mv, off, end)


class Bridge:
    def __init__(self, b, c):
        self.b = b
        self.c = c
        self.name = c["name"]
        self.addrs = c["addresses"]
        self.v5 = c["protocol_version"] == 5
        self.private = c["try_private"] and not self.v5
        self.cid = c["clientid"] or "%s.%s" % (_hostname(b.cfg, self.name), self.name)
        self.state_topic = "$SYS/broker/connection/%s/state" % self.name
        # Upstream the state topic names the client id: gateways of a fleet
        # share bridge names, their client ids differ (Mosquitto's default).
        self.up_state = "$SYS/broker/connection/%s/state" % self.cid
        self.outs = []  # (local filter, qos, local prefix, remote prefix)
        self.ins = []  # (remote filter, qos, local prefix, remote prefix)
        for pat, d, q, lp, rp in c["topics"]:
            if d != "in":
                self.outs.append((lp + pat, q, lp, rp))
            if d != "out":
                self.ins.append((rp + pat, q, lp, rp))
        self.echoes = []  # remote topics just sent, for the plain 3.1.1 echo check
        self.waiting = None  # set of local topics: our retained values the outage kept for the upstream
        self.link = None
        self.ctx = None
        self.sent = self.received = self.refused = self.connects = 0
        self.s = self._session()

    def _session(self):
        # The bridge's local session: restored from the store when there is
        # one (its queue, in-flight and QoS 2 state), with the config's
        # out patterns as its subscriptions.
        b = self.b
        cid = "$bridge/" + self.name
        s = b.sessions.get(cid)
        if s is None:
            s = b.sessions[cid] = Session(cid)
        for k in s.subs:
            b.subs.remove(s.subs[k])
        s.subs = {}
        s.bridge = self
        s.expiry = NEVER
        s.gone_at = b.now()
        s.limit, s.byte_limit = self.c["max_queued"], 0  # (session.py)
        for f, q, lp, rp in self.outs:
            if f not in s.subs:
                sub = s.subs[f] = Sub(s, f, q | _NO_LOCAL | _RAP, 0, None)
                b.subs.add(sub)
        if b.persist is not None:
            b.persist.session_changed(s)
        return s

    # ------------------------------------------------------------ topics

    def topic_out(self, topic):
        for f, q, lp, rp in self.outs:
            if matches(f, topic):
                return _swap(topic, lp, rp) or None
        return topic

    def went_out(self, t):
        # A PUBLISH on upstream topic t is on its way (once: pump.py).
        if self.link is not None and self.link.echo:
            e = self.echoes
            e.append(t)
            if len(e) > _ECHOES:
                e.pop(0)
        self.sent += 1

    def topic_in(self, topic, retain):
        if self.echoes and topic in self.echoes:
            # Plain 3.1.1 sends our own messages back: one echo dropped
            # per message just sent on that topic.
            self.echoes.remove(topic)
            return None
        for f, q, lp, rp in self.ins:
            if matches(f, topic):
                t = _swap(topic, rp, lp) or None
                if retain and t is not None and self.waiting and t in self.waiting:
                    # Older than ours, which the outage kept and which is to
                    # replace it upstream: dropped. (Pruned when hit, kept
                    # when no heap: a scan per message took 0.5 ms.)
                    self.waiting = self.s.retained_waiting(self.waiting)
                    if t in self.waiting:
                        return None
                return t
        return None

    # ------------------------------------------------------------ link

    def _connect_packet(self, version):
        c = self.c
        pw = c["password"]
        props = None
        if version == 5:
            props = {P.RECEIVE_MAXIMUM: self.b.cfg["max_inflight_messages"],
                     P.MAXIMUM_PACKET_SIZE: self.b.cfg["max_packet_size"]}
            if not c["cleansession"]:
                props[P.SESSION_EXPIRY] = NEVER
        level = 5 if version == 5 else (0x84 if self.private else 4)
        return encode(Connect(self.cid, level, c["cleansession"], c["keepalive"], c["username"],
                              pw.encode() if pw is not None else None, self.up_state, b"0", 1, True,
                              props=props))

    async def _open(self, host, port):
        s = await connect_out(host, port)
        try:  # a MemoryError here too must not leave the socket open
            peer = "%s:%d" % (host, port)
            if not self.c["cafile"]:
                return TcpTransport(s, peer)
            if self.ctx is None:
                self.ctx = client_context(self.c["cafile"])
            return TlsTransport(client_tls(self.ctx, s, host), peer)
        except BaseException:
            close_socket(s)
            raise

    def connack(self, L, ca):
        # The upstream's answer to our CONNECT: the link goes up, and runs
        # as a client connection of the bridge's session from here.
        if ca.reason:
            if self.private and ca.reason == 1:
                # Not a Mosquitto-style bridge upstream: plain 3.1.1.
                self.private = False
                log.info("bridge %s: %s refused the bridge protocol level; using plain 3.1.1",
                         self.name, L.t.peer)
            r = ca.reason
            L.error = "refused: CONNACK 0x%02X" % r if r > 5 else "refused: CONNACK %d, %s" % (r, _REFUSALS[r])
            raise MQTTError(ca.reason, "CONNACK refused")
        pr = ca.props or {}
        c = self.c
        rm = pr.get(P.RECEIVE_MAXIMUM)
        if rm and rm < self.b.cfg["max_inflight_messages"]:
            L.send_max = rm
        # The smaller of ours for the upstream (3.1.1 cannot learn its) and
        # its CONNACK's; pump.py drops a larger message.
        mp = c["bridge_max_packet_size"]
        if P.MAXIMUM_PACKET_SIZE in pr and not 0 < mp <= pr[P.MAXIMUM_PACKET_SIZE]:
            mp = pr[P.MAXIMUM_PACKET_SIZE]
        if mp:
            L.max_out = mp
        L.keepalive = pr.get(P.SERVER_KEEP_ALIVE, c["keepalive"])
        L.echo = L.version == 4 and not self.private and bool(self.ins) and bool(self.outs)
        s = self.s
        if not ca.session_present:
            # The upstream forgot its half of our QoS 2 exchanges: a new
            # message may come under one of their packet ids, and a PUBREL
            # we owe it would answer nothing.
            p = self.b.persist
            for pid in s.qos2_in:
                if p is not None:
                    p.qos2_released(s, pid)
            s.qos2_in = ()
            inf = s.inflight
            if inf:  # () until the first send
                for pid in [k for k in inf if inf[k].state == RELEASED]:
                    d = inf.pop(pid)
                    if p is not None:
                        p.acked(s, pid, d)
        if s.conn is not None:
            s.conn.close_soon()
        s.conn = L
        L.session = s
        self.link = L
        # Our state upstream, retained (its will says "0"), while there is room.
        m = Message(self.up_state, b"1", 0, True)
        n = m.size(m.topic, L.version, 0, None, 0, True)
        ob = L.reserve(n)
        if ob is not None:
            L.olen = m.put(ob, L.olen, m.topic, L.version, 0, True, False, 0, None, 0, True, 0)
        resend_inflight(L, s)
        if self.ins:
            # Behind what the outage kept for the upstream (in flight, and
            # what the output takes of the queue now), whose retained values
            # the upstream's older ones must not replace (topic_in). v5: No
            # Local, Retain As Published, Retain Handling 0, as 3.1.1.
            self.waiting = self.s.retained_waiting()  # (None: no heap for it; theirs are taken)
            L.pump()
            o = 0x0C if L.version == 5 else 0
            L.send(encode(Subscribe(s.next_pid(), [(f, q | o) for f, q, lp, rp in self.ins]), L.version))
        L.kick()
        L.up.set()

    async def _open_link(self, host, port):
        # A new link, up to its CONNACK. The reader task runs on; returns
        # (link, its task). (A SYN dropped waited the kernel's 2 minutes.)
        t0 = time.ticks_ms()
        t = await asyncio.wait_for_ms(self._open(host, port), _CONNECT_MS)
        L = Link(self, t, 5 if self.v5 else 4)
        L.send(self._connect_packet(L.version))
        task = asyncio.create_task(L.run())
        while not L.up.is_set():
            if task.done():
                raise OSError(L.error or "closed before CONNACK: %r" % (L.disconnect_reason,))
            if time.ticks_diff(time.ticks_ms(), t0) > _CONNECT_MS:
                L.close_soon()
                await task
                raise OSError("no CONNACK")
            await asyncio.sleep_ms(20)
        self.connects += 1
        log.info("bridge %s: connected to %s:%d as %s", self.name, host, port, self.cid)
        return L, task

    async def _serve(self, host, port):
        # One link and those that replace it every bridge_cycle_interval:
        # each new one is up (TCP, TLS, CONNACK) before the old one goes,
        # and takes over the upstream session from it (connack() closes the
        # old link), so what is queued or in flight moves across, QoS 2
        # included. Some networks drop long-lived connections silently.
        L, task = await self._open_link(host, port)
        self._state(b"1")
        cycle = self.c["bridge_cycle_interval"] * 1000
        born = pinged = sent = now = time.ticks_ms()
        while True:
            ka = L.keepalive * 1000
            while not task.done():
                last = now
                await asyncio.sleep_ms(1000)
                now = time.ticks_ms()
                if cycle and time.ticks_diff(now, born) >= cycle:
                    break
                if L.wrote:  # (not in broker.conns: keepalive.check leaves it)
                    L.wrote = False
                    sent = last  # (out after the look before: silent at most ka / 2)
                if not ka:
                    continue
                rx = time.ticks_diff(now, L.last_rx)
                # (A reader that waits may hold a reply unread: dropped for
                # that, the link came back to the same wait and resent.)
                if rx > ka + (ka >> 1) and not L.waits_on_broker():
                    log.warning("bridge %s: no reply from %s:%d within keep-alive; reconnecting",
                                self.name, host, port)
                    L.close_soon()
                elif (rx >= ka >> 1 or time.ticks_diff(now, sent) >= ka >> 1) and time.ticks_diff(now, pinged) >= ka >> 1:
                    # The upstream must hear from us within keep-alive too (MQTT-3.1.2-23):
                    # with only its messages coming down, Mosquitto dropped the link.
                    L.send(b"\xc0\x00")  # PINGREQ: one, while its PINGRESP may wait unread
                    pinged = now
            if task.done():
                break
            log.info("bridge %s: cycling the link to %s:%d", self.name, host, port)
            born = time.ticks_ms()
            try:
                L, task = await self._open_link(host, port)
            except Exception as e:
                # The old link goes on; the next try comes a cycle later.
                log.warning("bridge %s: new link to %s:%d failed: %r", self.name, host, port, e)
        await task
        self.link = None
        self.echoes, self.waiting = [], None
        self._state(b"0")
        log.info("bridge %s: link to %s:%d closed", self.name, host, port)

    async def run(self):
        # The supervisor: connect, serve, fail over, back off. Never ends.
        base, cap = [int(x * 1000) for x in self.c["restart_timeout"]]
        delay = base
        n = len(self.addrs)
        i = random.getrandbits(8) % n
        while True:
            host, port = self.addrs[i]
            private = self.private
            up = self.connects
            try:
                await self._serve(host, port)
            except Exception as e:
                log.warning("bridge %s: connecting to %s:%d failed: %r", self.name, host, port, e)
            if self.connects != up:
                # It was up: try the next address after a short wait.
                delay = wait = base
                i = (i + 1) % n
            elif private and not self.private:
                wait = 0  # same address again, as plain 3.1.1
            else:
                i = (i + 1) % n
                # Mosquitto's restart_timeout with a cap: "decorrelated
                # jitter", a random wait between base and three times the last.
                hi = delay * 3
                delay = base + (random.getrandbits(30) % (hi - base + 1)) if hi > base else base
                wait = delay = min(delay, cap)
            await asyncio.sleep_ms(wait)

    def _state(self, v):
        # $SYS/broker/connection/<name>/state, "1" or "0", retained locally.
        m = Message(self.state_topic, v, 0, True)
        self.b.retained.sys[self.state_topic] = m
        route(self.b, m, None, False)

    def sys_values(self, v):
        s = self.s
        k = "connection/%s/" % self.name
        v.extend(((k + "messages/sent", self.sent), (k + "messages/received", self.received),
                  (k + "messages/dropped", s.dropped), (k + "messages/queued", s.queued() + len(s.inflight)),
                  (k + "connects", self.connects)))


def start_bridges(b):
    # app.start(): one Bridge and one supervisor task per config entry.
    bridges = []
    for c in b.cfg["bridges"]:
        br = Bridge(b, c)
        br._state(b"0")
        asyncio.create_task(br.run())
        bridges.append(br)
        log.notice("bridge %s: to %s as %s", br.name, ", ".join("%s:%d" % (h, p) for h, p in br.addrs), br.cid)
    prev = b.sys_extra

    def values():
        v = list(prev()) if prev is not None else []
        for br in bridges:
            br.sys_values(v)
        return v

    b.sys_extra = values
    b.bridges = bridges
    return bridges
