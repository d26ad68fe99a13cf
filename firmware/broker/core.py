# The broker's shared state: configuration, the session table, the
# subscription and retained tables, buffers, the clock, counters, and the
# one task that sends output (flush_all). What acts on that state lives in
# modules of its own:
#   route.py           a message to its receivers' queues (Mosquitto: database.c)
#   pump.py            queued messages into a connection's output
#   backpressure.py    publishers wait for the queues they fill
#   keepalive.py       keep-alive, connect timeout, stuck subscribers
#   session_expiry.py  delayed wills, session expiry, making room in the table
#   heap.py            the one place that decides "is the heap short?"
#   handle_*.py        the packet handlers; conn.py a connection; persist.py flash
import asyncio
import gc
import time
import micropython
from micropython import const
from broker import log
from broker.subs import Subs
from broker.retain import Retained
from broker.outbuf import Pool
from broker.heap import Heap
from broker.session import Session
from broker.route import route, EVERY
from broker.message import Raw
from broker.transport import until_woken
from asyncio import core as aio

# Heap above the clients' floor that offline sessions make way for, for a
# new client: it and a few subscriptions (an idle one with one is 733 B).
_CLIENT_ROOM = const(2048)


def _offline(s, keep):
    # Whether s may make way for another client: offline, not a bridge's,
    # not keep (the session that client resumes).
    return s.conn is None and s.bridge is None and s is not keep


def _holds(s):
    # Whether ending s would lose an acknowledged message or QoS 2 state,
    # or send a delayed will early.
    return s.queue or s.inflight or s.qos2_in or s.pending_retained or s.will is not None


def _held_by(s):
    # At least the heap a session without messages holds: itself and its
    # subscriptions (a filter as a key and in the tree, and its Sub). Low
    # rather than high: an offline session with one short filter measured
    # about 300 B (docs/memory.md).
    n = 160
    for k in s.subs:
        n += 2 * len(k) + 64
    return n


class Closed(Exception):
    # Raised inside a handler to end the connection once its reply is sent.
    pass


class Wakeup:
    # asyncio's Event for one waiting task (the flusher), without the
    # coroutine Event.wait() makes at every wait: 48 B per message that a
    # subscriber keeps up with. `due` is the Event's state: await wait()
    # only while it is False, and set it False when served.
    def __init__(self):
        self.due = False
        self.task = None

    def set(self):
        self.due = True
        t = self.task
        if t is not None:
            self.task = None
            aio._task_queue.push(t)

    def wait(self):
        t = self.task = aio.cur_task
        t.data = self  # Task.cancel() takes it off through remove()
        return until_woken

    def remove(self, task):
        if self.task is task:
            self.task = None


class Broker:
    conn_waiting = 0  # sockets open outside conns (sockets_left())

    def __init__(self, cfg):
        self.cfg = cfg
        Session.limit = cfg["max_queued_messages"]
        Session.byte_limit = cfg["max_queued_bytes"]
        self.rbuf = bytearray(cfg["read_buffer_size"])  # shared by all readers
        self.rmv = memoryview(self.rbuf)
        # What is left of a read (a split packet, or packets a pause left)
        # waits in a pooled buffer of the same size: it always fits, and the
        # steady state allocates nothing. Split packets larger than that are
        # read whole into an exact buffer instead.
        self.rpool = Pool(cfg["read_buffer_size"], 2)
        self.wpool = Pool(cfg["write_buffer_size"], 2)
        self.rpool.fill()
        self.wpool.fill()
        self.spare_big = None  # see Connection._read_big
        self.connect_big = None  # the one connection reading a big CONNECT (Connection._big_buffer)
        self.heap = Heap(cfg)
        self.sessions = {}  # client id -> Session
        self.conns = []  # live Connection objects, CONNECT seen or not
        # Sockets of a TLS or WebSocket listener before they are a
        # Connection (in a WebSocket handshake, say): task -> ticks_ms it
        # began (listeners.py). A full table may end one (server._make_room).
        self.handshakes = {}
        self.subs = Subs()
        self.retained = Retained(cfg["max_retained_messages"], cfg["max_retained_bytes"])
        self.persist = None  # persist.Persist when persistence is on
        self.auth = None
        self.throttle = None
        self.acl = None
        self.started = time.time()
        self.hits = []  # scratch list reused by route()
        self.seq = 0  # last sequence number given to a QoS 1/2 delivery
        self.congested = None  # a session route() found past half full
        # Connections with output to send, and what wakes the flusher for
        # them (outbuf.py).
        self.dirty = []
        self.spare_dirty = []
        self.flush_due = Wakeup()
        # The broker clock: seconds that only move forward while the broker
        # runs and that persist.py carries across restarts. Every expiry
        # (messages, sessions, delayed wills) is counted on it, so a board
        # without a real-time clock keeps them right across a reboot; the
        # time the board was off does not count.
        self.clock = 0
        self._rem_ms = 0
        self._tick0 = time.ticks_ms()
        self.raw = Raw()  # the QoS 0 message passing through (route.py)
        self.sys_extra = None  # callable -> [(name, value)] for $SYS
        self.passes = 0  # of all readers' loops (conn.py: every _TURN_PASSES, a turn for the rest)
        # Counters, named after the $SYS topics they feed.
        self.stats_msgs_recv = 0
        self.stats_msgs_sent = 0
        self.stats_pkts_recv = 0
        self.stats_bytes_recv = 0
        self.stats_bytes_sent = 0
        self.stats_dropped = 0
        # Receivers route() found that a full queue refused (QoS 1/2), and
        # that did not take the message at all (route.deliver).
        self.queue_refusals = 0
        self.missed = 0
        self.stats_refused = 0
        self.stats_expired = 0
        self.stats_auth_failed = 0
        self.stats_evicted = 0  # offline sessions evicted for a new one
        self.stats_peak = 0  # most clients connected at once
        self.stall_ms = 0  # longest the loop was held up (app.py)

    def shed_buffers(self):
        # Drops the spare pooled buffers (made again as connections need
        # them) and collects: for an allocation that must not fail when the
        # heap is free but in crumbs, as the poller's (transport.shed) and
        # the store's (persist.py), which every message that would drain
        # the heap waits for. Made at start, the spares are large pieces.
        del self.rpool.free[:]
        del self.wpool.free[:]
        self.spare_big = None
        gc.collect()

    # ------------------------------------------------------------ clock

    def now(self):
        # Broker clock, in seconds.
        return self.clock + (time.ticks_diff(time.ticks_ms(), self._tick0) + self._rem_ms) // 1000

    def advance_clock(self):
        # Called about once a second, well within the ticks wrap period.
        t = time.ticks_ms()
        d = time.ticks_diff(t, self._tick0) + self._rem_ms
        self.clock += d // 1000
        self._rem_ms = d % 1000
        self._tick0 = t

    def next_seq(self):
        # Sequence numbers order a session's QoS 1/2 deliveries, in RAM and
        # on flash: resend on resumption keeps the order they were queued.
        self.seq += 1
        return self.seq

    @staticmethod
    def now_ms():
        return time.ticks_ms()

    # ------------------------------------------------------------ output

    def kick(self, c):
        # c has output to send: the flusher sends it once the running task
        # yields, together with everything else queued meanwhile.
        self.dirty.append(c)
        self.flush_due.set()

    async def flush_all(self):
        # The one task that sends output (outbuf.py, Output.service).
        due = self.flush_due
        while True:
            if not due.due:
                await due.wait()
            due.due = False
            self.flush_now()
            if self.heap.low:
                # The heap was found short: connections with nothing to
                # send give their output buffers back now rather than at
                # the next second's release (keepalive.check). Seven idle
                # ones (1 KB each) took a hub under its message floor, to
                # 13 KB free, as its clients came. The spare packet buffer
                # goes too (Connection._read_big): one made for a message
                # let through below the floor stayed, up to 4 KB of it.
                self.heap.low = False
                self.spare_big = None
                for c in self.conns:
                    c.release()
            # Connections kicked again while served go in the next round,
            # after the other tasks have run.
            await asyncio.sleep_ms(0)

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def flush_now(self):
        d = self.dirty
        if not d:
            return
        # Two lists swapped: kicks made while serving land in the other.
        self.dirty = self.spare_dirty
        for c in d:
            c.dirty = False
            try:
                c.service()
            except MemoryError:
                # The connection stays on no list: its next kick retries.
                log.warning("out of memory sending to %s", c.t.peer)
            except OSError as e:
                c.write_failed(e)
            except Exception as e:
                log.error("sending to %s failed: %r", c.t.peer, e)
                c.close_soon()
        del d[EVERY]
        self.spare_dirty = d

    # ------------------------------------------------------------ sessions

    def connected_count(self):
        # Not those closing: one closed to give its slot to a newcomer
        # (end_held) counted until its teardown ran, up to a second for a
        # DISCONNECT to a peer gone, and the newcomer was refused meanwhile.
        n = 0
        for s in self.sessions.values():
            c = s.conn
            if c is not None and not c.closing:
                n += 1
        return n

    def sockets_left(self):
        # Sockets under max_connections: client connections, bridge
        # uplinks, and sockets waiting (a rate-limit delay, a handshake, a
        # closing connection reading out its client's last packets). One
        # over is let in, to be told "quota exceeded" (server._admit).
        cfg = self.cfg
        return cfg["max_connections"] - len(self.conns) - len(cfg["bridges"]) - self.conn_waiting

    def session_room(self):
        # Whether new_session_allowed() would find room, without evicting.
        return len(self.sessions) < self.cfg["max_sessions"] or self.oldest_offline() is not None

    def oldest_offline(self, keep=None, empty=False):
        # The offline session idle longest, never a bridge's nor keep; None.
        # empty: only one whose end loses nothing and sends nothing early:
        # no message, no QoS 2 state, no delayed will.
        old = None
        for s in self.sessions.values():
            if (_offline(s, keep) and (old is None or s.gone_at < old.gone_at)
                    and not (empty and _holds(s))):
                old = s
        return old

    def new_session_allowed(self):
        # Room for one more session: when the table is full, the offline
        # session idle longest makes way (logged, counted in $SYS) before
        # anyone is refused; one that holds nothing before one that holds
        # messages its publishers were told are taken (an older one with
        # queued messages went first, and they were lost: full-board
        # campaign). False when every session is connected.
        if len(self.sessions) < self.cfg["max_sessions"]:
            return True
        old = self.oldest_offline(None, True) or self.oldest_offline()
        if old is None:
            return False
        self._evict(old, "session table full")
        return True

    def heap_for_client(self, keep):
        # A heap without room above the clients' floor for a new client and
        # some subscriptions (_CLIENT_ROOM) makes way for it much as a full
        # table does: offline sessions that hold nothing (see oldest_offline)
        # go, idle longest first, never keep (the one it resumes), until it
        # has. Else one user's offline sessions, within every limit (32 of
        # 16 long filters each), shut everyone else out, even after a
        # restart, until they expired; or let the client in with no room
        # left to subscribe. None go when all of them together would not
        # make room. A session with messages stays: the heap it holds is
        # what its client's return drains (handle_connect's held clients
        # make way for that one). True when the heap has room for the
        # client itself.
        heap = self.heap
        if heap.room_for_client(_CLIENT_ROOM):
            return True
        short = heap.client_floor - heap.free() + _CLIENT_ROOM
        spare = 0
        for s in self.sessions.values():
            if _offline(s, keep) and not _holds(s):
                spare += _held_by(s)
        if spare < short:
            return heap.room_for_client()
        p = self.persist
        while not heap.room_for_client(_CLIENT_ROOM):
            old = self.oldest_offline(keep, True)
            if old is None or (p is not None and not p.room_to_end()):
                # (as for an expired session: deletes staged while a commit
                # waits for heap would take the last of it)
                break
            try:
                self._evict(old, "heap low")
            except MemoryError:
                gc.collect()
                break
        return heap.room_for_client()

    def _evict(self, s, why):
        # (gone_at is rounded up a second: 0 s, not -1 s, for one just gone)
        log.warning("%s: evicting %s, offline for %d s", why, s.client_id, max(0, self.now() - s.gone_at))
        self.stats_evicted += 1
        self.end_session(s)

    def connection_closed(self, c):
        if c in self.conns:
            self.conns.remove(c)
        s = c.session
        if s is None or s.conn is not c:
            return
        s.conn = None
        # A second on: the clock counts whole seconds, and an expiry or a
        # will delay must never end early.
        now = self.now() + 1
        s.gone_at = now
        if s.queue and not self.cfg["queue_qos0_messages"]:
            # QoS 0 that waited for a client now gone (a dashboard that
            # stopped reading) is not kept for its session, as none is
            # queued for an offline one: eight such sessions held the heap
            # below its floor, and a returning client got stale values.
            self.stats_dropped += s.drop_qos0()
        s.shrink()
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
            s.gone_at = self.now()

    def publish_will(self, s):
        w = s.will
        s.will = None
        s.will_at = None
        if self.persist is not None:
            self.persist.will_gone(s)
        if w is None or w.topic.startswith("$SYS"):
            # (refused at CONNECT; this catches a will restored from flash)
            return
        if self.acl is not None and not self.acl.can_write(s.client_id, s.username, w.topic):
            return
        if s.will_expiry:
            w.expires = self.now() + s.will_expiry
        self.stats_msgs_recv += 1
        route(self, w, None)

    def wills_at_stop(self):
        # A clean stop ends every connection without a DISCONNECT
        # (MQTT-3.1.2-8): the wills of sessions that end with it go now, to
        # the retained store and to queues on flash (no output goes out any
        # more); a kept session's will goes from its record at the restart.
        for c in self.conns:
            s = c.session
            if s is not None and s.conn is c and s.will is not None and not s.expiry and not c.normal_close:
                self.publish_will(s)

    def end_session(self, s):
        # Session over: its will (if still delayed) goes out now
        # (MQTT-3.1.3-9), its subscriptions and queue go.
        if s.will is not None and s.conn is None:
            self.publish_will(s)
        if self.persist is not None:
            self.persist.session_ended(s)
        for k in s.subs:
            self.subs.remove(s.subs[k])
        s.clear()
        if self.sessions.get(s.client_id) is s:
            del self.sessions[s.client_id]

