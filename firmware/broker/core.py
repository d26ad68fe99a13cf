# The broker's shared state and the publish path: sessions, subscriptions,
# retained messages, routing a message to its receivers, and feeding each
# connection's writer from its session queue. Packet handlers live in
# handle_*.py; sockets in server.py; flash in persist.py.
import asyncio
import gc
import time
from micropython import const
from broker import log
from broker.session import Session, SENT, RELEASED, NEVER
from broker.subs import Subs
from broker.retain import Retained
from broker.message import Message
from mqtt.topic import matches

_NO_LOCAL = const(0x04)
_STALL_MS = const(2000)  # a queue with no progress this long stops holding publishers back
_STUCK_MS = const(10000)  # ...and this long disconnects its client
_RAP = const(0x08)


class Closed(Exception):
    # Raised inside a handler to end the connection once its reply is sent.
    pass


class Pool:
    # Spare buffers of one size. Busy connections hold one each; idle ones
    # give theirs back, and a few spares are kept to spare the allocator.
    def __init__(self, size, keep):
        self.size = size
        self.keep = keep
        self.free = []

    def get(self):
        return self.free.pop() if self.free else bytearray(self.size)

    def put(self, buf):
        if len(buf) == self.size and len(self.free) < self.keep:
            self.free.append(buf)


class Broker:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rbuf = bytearray(cfg["read_buffer_size"])  # shared by all readers
        self.rmv = memoryview(self.rbuf)
        # What is left of a read (a split packet, or packets a pause left)
        # waits in a pooled buffer of the same size: it always fits, and the
        # steady state allocates nothing. Split packets larger than that are
        # read whole into an exact buffer instead.
        self.rpool = Pool(cfg["read_buffer_size"], 2)
        self.wpool = Pool(cfg["write_buffer_size"], 2)
        self.spare_big = None  # see Connection._read_big
        self.sessions = {}  # client id -> Session
        self.conns = []  # live Connection objects, CONNECT seen or not
        self.subs = Subs()
        self.retained = Retained(cfg["max_retained_messages"])
        self.persist = None  # persist.Persist when persistence is on
        self.auth = None
        self.throttle = None
        self.acl = None
        self.started = time.time()
        self.hits = []  # scratch list reused by route()
        self.pressure = False  # a connected session's queue is past half full
        # In-process receivers (the bridge): (filter, callback(msg, origin)).
        self.taps = []
        self.sys_extra = None  # callable -> [(name, value)] for $SYS
        # Counters, named after the $SYS topics they feed.
        self.stats_msgs_recv = 0
        self.stats_msgs_sent = 0
        self.stats_pkts_recv = 0
        self.stats_bytes_recv = 0
        self.stats_bytes_sent = 0
        self.stats_dropped = 0
        self.queue_refusals = 0  # QoS 1/2 messages a full queue refused
        self.stats_refused = 0
        self.stats_expired = 0
        self.stats_auth_failed = 0

    @staticmethod
    def now_ms():
        return time.ticks_ms()

    def connected_count(self):
        n = 0
        for s in self.sessions.values():
            if s.conn is not None:
                n += 1
        return n

    # ------------------------------------------------------------ routing

    def route(self, msg, origin, keep=True):
        # Delivers msg to every matching subscription: one copy per session
        # at the highest granted QoS, carrying every matching subscription
        # identifier, plus one copy per matching share group.
        # Returns the number of sessions it went to.
        if msg.retain and keep:
            self.retained.set(msg)
        hits = self.hits
        del hits[:]
        self.subs.match(msg.topic, hits)
        n = len(hits)
        if n == 1:
            sub = hits[0]
            s = sub.session
            if sub.opts & _NO_LOCAL and s is origin:
                return 0
            q = sub.opts & 3
            self.deliver(s, msg, q if q < msg.qos else msg.qos, msg.retain and sub.opts & _RAP,
                         (sub.subid,) if sub.subid else None)
            sent = 1
        elif n:
            sent = self._route_many(msg, origin, hits)
        else:
            sent = 0
        if self.taps:
            for f, cb in self.taps:
                if matches(f, msg.topic):
                    cb(msg, origin)
        if self.subs.shared:
            del hits[:]
            self.subs.match_shared(msg.topic, hits)
            for sub in hits:
                q = sub.opts & 3
                self.deliver(sub.session, msg, q if q < msg.qos else msg.qos,
                             msg.retain and sub.opts & _RAP, (sub.subid,) if sub.subid else None)
                sent += 1
        return sent

    def _route_many(self, msg, origin, hits):
        best = {}  # session -> [qos, retain, subids]
        for sub in hits:
            s = sub.session
            if sub.opts & _NO_LOCAL and s is origin:
                continue
            q = sub.opts & 3
            if q > msg.qos:
                q = msg.qos
            r = msg.retain and sub.opts & _RAP
            e = best.get(s)
            if e is None:
                best[s] = [q, r, [sub.subid] if sub.subid else None]
            else:
                if q > e[0]:
                    e[0] = q
                if r:
                    e[1] = r
                if sub.subid:
                    if e[2] is None:
                        e[2] = [sub.subid]
                    else:
                        e[2].append(sub.subid)
        for s in best:
            e = best[s]
            self.deliver(s, msg, e[0], e[1], e[2])
        return len(best)

    def deliver(self, s, msg, qos, retain, subids):
        c = s.conn
        if c is None:
            if qos == 0 and not self.cfg["queue_qos0_messages"]:
                return
            if self.acl is not None and not self.acl.can_read(s.client_id, s.username, msg.topic):
                return
            d = s.dropped
            ok = s.enqueue(msg, qos, bool(retain), subids, self.cfg["max_queued_messages"])
            self.stats_dropped += s.dropped - d  # refused, or an old QoS 0 evicted
            if not ok:
                if qos:
                    self.queue_refusals += 1
            elif qos and self.persist is not None:
                self.persist.queued(s, msg, qos, retain, subids)
            return
        if self.acl is not None and not self.acl.can_read(s.client_id, s.username, msg.topic):
            return
        q = s.queue
        lim = self.cfg["max_queued_messages"]
        if len(q) < lim:
            q.append([msg, qos, bool(retain), subids])  # Session.enqueue's fast path
        else:
            d = s.dropped
            ok = s.enqueue(msg, qos, bool(retain), subids, lim)
            self.stats_dropped += s.dropped - d
            if not ok:
                if qos:
                    self.queue_refusals += 1
                return
        if qos and self.persist is not None and s.expiry:
            self.persist.queued(s, msg, qos, retain, subids)
        if len(q) >= (lim >> 1) and s.full_since is None:
            # Past half full: publishers pause until this drains (backpressure).
            self.pressure = True
        c.wake.set()

    def congested(self, now_ms, me=None):
        # True while a connected session's queue is past half full and its
        # writer is making progress. A session whose writer has moved
        # nothing for _STALL_MS no longer holds publishers back: its queue
        # drops messages instead, and tick() disconnects it after _STUCK_MS.
        lim = self.cfg["max_queued_messages"] >> 1
        busy = False
        for s in self.sessions.values():
            if s.conn is None or s is me:
                # A publisher never waits on its own queue: it must keep
                # reading to take its acknowledgements.
                continue
            if len(s.queue) >= lim:
                if s.full_since is None:
                    s.full_since = now_ms
                elif time.ticks_diff(now_ms, s.full_since) > _STALL_MS:
                    continue
                busy = True
            else:
                s.full_since = None
        return busy

    async def relieve(self, me):
        # Called by a reader that has just routed messages into a queue
        # past half full: yield to the writers until the queues drain.
        i = 0
        while self.congested(time.ticks_ms(), me):
            await asyncio.sleep_ms(0 if i < 8 else 1)
            i += 1
        self.pressure = False

    def pump(self, c, s):
        # Moves queued messages into the connection's output buffer while
        # there is room and the client's Receive Maximum allows.
        if c.held:
            # A QoS 2 PUBLISH waits for its commit; what follows waits too,
            # to keep the order.
            return
        if c.resend is not None and not self._resend(c, s):
            return
        q = s.queue
        if not q:
            return
        now = time.time()
        v = c.version
        inf = s.inflight
        maxinf = self.cfg["max_inflight_messages"]
        while q:
            e = q[0]
            msg = e[0]
            qos = e[1]
            if msg.expires is not None and msg.expired(now):
                q.pop(0)
                self.stats_expired += 1
                if qos and self.persist is not None:
                    self.persist.dequeued(s, e)
                continue
            if qos and len(inf) >= (c.send_max or maxinf):
                return
            pid = s.next_pid() if qos else 0
            alias, send_topic = c.out_alias(msg.topic) if c.alias_out_max else (0, True)
            # A payload larger than half the write buffer goes out from the
            # message itself, after its head: no copy of it is made, and
            # no encoded copy is cached with the message, which would
            # double what a queue of large messages holds.
            split = len(msg.payload) > self.wpool.size >> 1
            pkt = None
            tries = 2  # a second one after a collection
            while pkt is None and tries:
                tries -= 1
                try:
                    if split:
                        pkt = msg.head(v, qos, e[2], pid, e[3], alias, send_topic, now)
                    else:
                        pkt = msg.wire(v, qos, e[2], pid, e[3], alias, send_topic, now)
                except MemoryError:
                    gc.collect()
            if pkt is None:
                # No room to lay it out, even after a collection: drop it
                # (counted) rather than leave the session stuck behind it.
                q.pop(0)
                self.stats_dropped += 1
                log.warning("dropped a %d byte message for %s: out of memory",
                            len(msg.payload), s.client_id)
                if qos and self.persist is not None:
                    self.persist.dequeued(s, e)
                continue
            n = len(pkt) + (len(msg.payload) if split else 0)
            if n > c.max_out:
                # Too big for this client (MQTT-3.1.2-24): discard as if sent.
                q.pop(0)
                self.stats_dropped += 1
                if qos and self.persist is not None:
                    self.persist.dequeued(s, e)
                continue
            p = self.persist
            if qos == 2 and p is not None and s.expiry:
                # Exactly once across a power cut needs this packet
                # identifier on flash before the PUBLISH leaves: a receiver
                # would take the same message under a new identifier as new.
                q.pop(0)
                s.full_since = None
                self.stats_msgs_sent += 1
                inf[pid] = [msg, qos, e[2], e[3], SENT]
                p.sent(s, pid, e)
                p.hold(c, (pkt, msg.payload) if split else pkt, True)
                if alias and send_topic:
                    c.take_alias(msg.topic, alias)
                return
            if split:
                # Behind other output it waits; alone, a head too large for
                # the buffer goes out on its own, then the payload.
                if c.big is not None or (c.olen and not c.room(len(pkt))):
                    return
                c.send_split(pkt, msg.payload)
            else:
                ob = c.obuf
                o = c.olen
                if ob is not None and c.big is None and o + n <= len(ob):
                    ob[o : o + n] = pkt  # the common case, without a call
                    c.olen = o + n
                elif not c.put(pkt):
                    return
            if alias and send_topic:
                c.take_alias(msg.topic, alias)
            q.pop(0)
            s.full_since = None  # progress: not stuck
            self.stats_msgs_sent += 1
            if qos:
                inf[pid] = [msg, qos, e[2], e[3], SENT]
                if p is not None and s.expiry:
                    p.sent(s, pid, e)

    def resend_inflight(self, c, s):
        # On session resumption: the writer sends these first (_resend).
        if s.inflight:
            c.resend = sorted(s.inflight)

    def _resend(self, c, s):
        # Before anything new, PUBLISH again with DUP the unacknowledged
        # QoS 1/2 messages, and PUBREL those already released
        # (MQTT-4.4.0-1), as fast as the output buffer takes them. True
        # when all are out.
        r = c.resend
        now = time.time()
        while r:
            pid = r[0]
            e = s.inflight.get(pid)
            if e is None:
                r.pop(0)  # acknowledged meanwhile
                continue
            if e[4] == RELEASED:
                if not c.room(4):
                    return False
                c.send(bytes((0x62, 2, pid >> 8, pid & 0xFF)))
            else:
                msg = e[0]
                if len(msg.payload) > self.wpool.size >> 1:
                    h = msg.head(c.version, e[1], e[2], pid, e[3], 0, True, now, True)
                    if c.big is not None or (c.olen and not c.room(len(h))):
                        return False
                    c.send_split(h, msg.payload)
                else:
                    pkt = msg.wire(c.version, e[1], e[2], pid, e[3], 0, True, now)  # a fresh copy (QoS > 0)
                    if not c.room(len(pkt)) and (c.olen or c.big is not None):
                        return False
                    pkt[0] |= 0x08
                    c.send(pkt)
            r.pop(0)
        c.resend = None
        return True

    # ------------------------------------------------------------ sessions

    def connection_closed(self, c):
        if c in self.conns:
            self.conns.remove(c)
        s = c.session
        if s is None or s.conn is not c:
            return
        s.conn = None
        now = time.time()
        s.gone_at = now
        if s.will is not None and not c.normal_close:
            if s.will_delay and s.expiry:
                s.will_at = now + min(s.will_delay, s.expiry)
            else:
                self.publish_will(s)
        elif c.normal_close:
            s.will = None
        if s.expiry == 0:
            self.end_session(s)
        elif self.persist is not None:
            self.persist.session_changed(s)
        log.info("client %s disconnected", s.client_id)

    def drop_connection(self, c):
        # The part of connection_closed() that needs no heap.
        if c in self.conns:
            self.conns.remove(c)
        s = c.session
        if s is not None and s.conn is c:
            s.conn = None
            s.gone_at = time.time()

    def publish_will(self, s):
        w = s.will
        s.will = None
        s.will_at = None
        if w is None or w.topic.startswith("$SYS"):
            # (refused at CONNECT; this catches a will restored from flash)
            return
        if self.acl is not None and not self.acl.can_write(s.client_id, s.username, w.topic):
            return
        self.stats_msgs_recv += 1
        self.route(w, None)

    def end_session(self, s):
        # Session over: its will (if still delayed) goes out now
        # (MQTT-3.1.3-9), its subscriptions and queue go.
        if s.will is not None and s.conn is None:
            self.publish_will(s)
        if self.persist is not None:
            self.persist.session_ended(s)
        for k in s.subs:
            self.subs.remove(s.subs[k])
        s.subs = {}
        s.queue = []
        s.inflight = {}
        if self.sessions.get(s.client_id) is s:
            del self.sessions[s.client_id]

    def tick(self):
        # Once a second: keep-alive, connect timeout, delayed wills and
        # session expiry.
        now_ms = time.ticks_ms()
        cto = self.cfg["connect_timeout"] * 1000
        for c in self.conns:
            if c.closing:
                continue
            if c.session is None:
                if time.ticks_diff(now_ms, c.born) > cto:
                    log.info("%s sent no CONNECT in %d s; closing", c.t.peer, cto // 1000)
                    c.close_soon()
            elif c.keepalive and time.ticks_diff(now_ms, c.last_rx) > c.keepalive * 1500:
                c.protocol_error(0x8D, "keep alive timeout")
                c.close_soon()
            elif c.session.full_since is not None and time.ticks_diff(now_ms, c.session.full_since) > _STUCK_MS:
                # A subscriber that stopped reading: it has lost messages for
                # a while already; free its connection (its session stays).
                c.protocol_error(0x97, "not reading: queue full")
                c.close_soon()
        now = time.time()
        dead = None
        for s in self.sessions.values():
            if s.conn is not None:
                continue
            if s.will_at is not None and now >= s.will_at:
                self.publish_will(s)
            if s.expiry != NEVER and s.gone_at is not None and now - s.gone_at >= s.expiry:
                if dead is None:
                    dead = []
                dead.append(s)
        if dead:
            for s in dead:
                log.info("session %s expired", s.client_id)
                self.end_session(s)



def make_message(topic, payload, qos, retain, props=None, topic_b=None):
    expiry = None
    if props is not None:
        expiry = props.get(0x02)
    return Message(topic, payload, qos, retain, props, expiry, topic_b)
