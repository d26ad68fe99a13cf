# One client connection: a reader task that frames packets in place in the
# broker's shared read buffer and hands them to the handlers. Output goes
# through outbuf.Output: the broker's flusher writes it, and a writer task
# exists only while the socket would block.
#
# Handlers are plain functions, not coroutines: calling a coroutine per
# packet would allocate a generator per packet. When the output backs up,
# or a session this client publishes to fills up, or the heap or the store
# cannot take a message, the reader stops reading (backpressure.py), which
# pushes back on a client that sends faster than it can be served.
import asyncio
import gc
import time
import micropython
from micropython import const
from mqtt.errors import MQTTError
from mqtt.packets import frame, check_flags, encode, Disconnect
from broker import log
from broker.core import Closed
from broker.transport import drain_in
from broker.outbuf import Output, ack_packet
from broker.backpressure import Paused, holds_back, wait_for_session, wait_recovered, WAIT_BYTES, WAIT_PIECE
from broker.pump import pump
from broker.handle_connect import asked_version, on_connect, refuse
from broker.handle_publish import on_publish, refuse_for_heap, drop_from_link, BIG_KEEP
from broker.route import would_hold
from broker.handle_other import on_packet

_PUBLISH = const(3)
_CONNECT = const(1)
_TURN_PASSES = const(8)  # reader passes between two turns for the other tasks
_LINGER_STEP_MS = const(100)  # _drain_out(): how soon a cut-short refusal goes
_ANY = const(0x3FFFFFFF)  # no limit on a packet's size (_take); a small int
_NO_HEAP_V5 = b"\x20\x03\x00\x97\x00"  # CONNACK 0x97 (quota exceeded)
_NO_HEAP_V3 = b"\x20\x02\x00\x03"  # CONNACK 3 (server unavailable)


def _pick(at, got, mv, o, a, n):
    # mv[o:o + n] holds bytes a..a + n of a packet read in pieces. Copies
    # into got those at the offsets in at: a PUBLISH's topic length (the
    # first two), then its packet identifier, found from that length.
    for k in range(4):
        i = at[k] - a
        if at[k] and 0 <= i < n:
            got[k] = mv[o + i]
            if k == 1:
                at[2] = at[1] + 1 + (got[0] << 8 | got[1])
                at[3] = at[2] + 1


def _drop_big(c, mv, pos, h, total):
    # A 3.1.1 bridge link's packet over max_packet_size, whole at
    # mv[pos:pos + total]: a PUBLISH is acknowledged and dropped. Closed
    # for it, the link came up again only to be sent it again (QoS 1/2, or
    # a retained value at every SUBSCRIBE), for good.
    at = [h, h + 1, 0, 0]
    got = bytearray(4)
    _pick(at, got, mv, pos, 0, total)
    _dropped(c, mv[pos], at, got, total)


async def _drop_big_read(c, mv, pos, h, have, total):
    # _drop_big for a packet whose first bytes are mv[pos:have]: the rest
    # is read into mv and dropped as it comes.
    at = [h, h + 1, 0, 0]
    got = bytearray(4)
    first = mv[pos]
    _pick(at, got, mv, pos, 0, have - pos)
    a = have - pos
    while a < total:
        n = await c.t.recv_into(mv[0 : min(total - a, len(mv))])
        if not n:
            raise OSError(104)
        _pick(at, got, mv, 0, a, n)
        a += n
        c.broker.stats_bytes_recv += n
        await asyncio.sleep_ms(0)  # (a turn for the others: it may be large)
    c.last_rx = c.broker.now_ms()  # (a whole packet: see run())
    _dropped(c, first, at, got, total)


def _dropped(c, first, at, got, total):
    # (Unacknowledged when its packet identifier was past its end.)
    qos = (first >> 1) & 3 if at[3] and at[3] < total else 0
    drop_from_link(c, qos, got[2] << 8 | got[3], 0, "%d B, over max_packet_size" % total)


class Connection(Output):
    # Defaults live on the class: an instance stores only what differs,
    # which keeps an idle connection's attribute table small.
    # obuf, olen, big, tail, writer, dirty, drained: see outbuf.py.
    resend = None  # packet ids to send again on session resumption
    session = None
    version = 4  # 4: MQTT 3.1.1, and 3.1 with v31 set; 5: MQTT 5.0
    v31 = False
    keepalive = 0
    send_max = 0  # the client's Receive Maximum if below ours (0: ours)
    max_out = 268435455  # client's Maximum Packet Size
    alias_in = None  # alias -> topic (v5)
    alias_out = None  # topic -> alias (v5)
    alias_out_max = 0
    problem_info = True
    closing = False
    normal_close = False
    disconnect_reason = None
    told = False  # a DISCONNECT or a refusing CONNACK says why it closes
    reader = None
    session_expiry_set = 0
    held = 0  # packets persist.py holds for this connection until a commit
    connack_held = False  # its CONNACK is one of them: no DISCONNECT may go first
    big_in = None  # the buffer (_read_big) of the packet being handled, until a message takes it
    linger_ms = 0  # delay before a refusal goes out (failed login)
    deferred = None  # that refusal
    # A bridge link (bridge.py) maps topics: topic_out(local topic) -> the
    # upstream's, topic_in(upstream topic) -> ours or None (not ours); and
    # is told went_out(upstream topic) of each PUBLISH on its way.
    topic_out = None
    topic_in = None

    def unheld(self):
        # (The pause of a reader whose CONNACK waits for a commit,
        # handle_connect: until persist has sent what it held for it.)
        return not self.held

    def waits_on_broker(self):
        # True while its reader waits for the broker (heap, or the store),
        # with what the client sent unread: its PINGREQs too, so that the
        # time does not count against its keep-alive. last_rx is set when
        # the wait begins, so that held_longest counts the time held, and
        # when it ends. A client gone meanwhile is not seen (no read, no
        # EOF): a full table gives its slot away (handle_connect.end_held).
        return bool(self.heap_wait) or callable(self.pause)

    def refuses(self):
        # Whether a message this client sent may be refused with a reason
        # code (v5) rather than wait, unread, until it can be taken (3.1.1
        # has no such code). A bridge's link waits too: the upstream is a
        # broker, which takes a refusal as final and drops the message
        # (Mosquitto 2.0.11 does), where a client would try again.
        return self.version == 5 and self.topic_in is None

    def __init__(self, broker, transport):
        self.broker = broker
        self.t = transport
        # The last whole packet in (keep-alive), or the start or end of a
        # wait for the broker (waits_on_broker).
        self.last_rx = self.born = broker.now_ms()
        # Set here, not left to the class defaults: assigning them first
        # later (closing at teardown, session when CONNECT commits) would
        # grow the attribute table when the heap may be out.
        self.closing = False
        self.gone = False
        self.wrote = False
        self.session = None
        # The output's state too: the CONNACK is the first output, and a
        # MemoryError between copying it into the buffer and counting it
        # (olen) lost it, and the DISCONNECT 0x97 that followed went out
        # in its place (esp32 heap full of queued messages).
        self.obuf = None
        self.olen = 0
        self.dirty = False
        # What the reader waits for before reading on (backpressure.py): set
        # by a handler before it raises Paused, or when a session fills up.
        self.pause = None
        self.waiting_for = None  # the session whose queue it waits for now
        # Its reader waits for heap to read a big packet: False, or
        # WAIT_BYTES (too few bytes free) or WAIT_PIECE (the bytes, but not
        # in one piece: handle_connect.held_longest).
        self.heap_wait = False
        self.login_wait = None  # a hashed login's verdict: -1 ok, else ms to hold the refusal
        # The protocol version whose QoS 0 messages this client takes as
        # they came (route._copy), decided at its CONNECT: 0 for none (topic
        # aliases, a bridge's topic mapping). It and login_wait are
        # attributes of every connection, not class defaults, for room:
        # MicroPython grows a table only when it is full. A client's 18
        # after its CONNECT (19 for 5.0) have a table of 23; with 17 theirs
        # was full, and every lookup that missed there (each method call,
        # each class default) scanned all of it (tools/bench/analysis.md,
        # "Calls per message").
        self.copies = 0

    # ------------------------------------------------------------ output

    def pump(self):
        s = self.session
        if s is None or self.closing or not (s.queue or self.resend is not None or s.pending_retained):
            return False
        if self.big is not None:
            return True  # there is room once the large one has gone
        return pump(self.broker, self, s)

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def ack(self, first, pid, reason):
        # A PUBACK, PUBREC, PUBREL or PUBCOMP (first byte given), with its
        # reason in v5 (3.1.1 and 3.1 have none). While the store has
        # changes not yet on flash it waits for them: acknowledged means
        # stored, and a PUBREL or PUBCOMP ends a QoS 2 flow on the peer's
        # side, which a power cut must not bring back.
        if self.version != 5:
            reason = 0
        p = self.broker.persist
        if p is not None and p.dirty():
            pkt = ack_packet(first, pid, reason)
            p.hold(self, pkt)
        else:
            self.send_ack(first, pid, reason)

    def out_alias(self, topic):
        # Outgoing topic aliases (v5): the first alias_out_max topics get
        # one; the first PUBLISH carries topic and alias, later ones only
        # the alias. Returns (alias or 0, send the topic?). A new alias is
        # recorded by take_alias() only once its PUBLISH is queued: one
        # that is dropped or waits must not leave the client an alias it
        # never learned.
        m = self.alias_out
        n = 0
        if m is not None:
            a = m.get(topic)
            if a is not None:
                return a, False
            n = len(m)
        if n < self.alias_out_max:
            return n + 1, True
        return 0, True

    def take_alias(self, topic, alias):
        if self.alias_out is None:
            self.alias_out = {}
        self.alias_out[topic] = alias

    # ------------------------------------------------------------ input

    async def run(self):
        # The reader; the connection lives as long as this coroutine.
        # Reads land in the broker's shared buffer and are handled at once
        # (no await in between), so an idle connection holds no buffer. Only
        # a packet split across reads, or packets left unread by a pause,
        # get a buffer of its own from the pool until they are handled.
        # Transports that may wait inside a read with part of it in the
        # caller's buffer (no read_now: WebSocket) keep their own buffer.
        # The packets themselves are taken in _take(): this coroutine's
        # frame lives as long as the connection, so it holds as few
        # variables as it can.
        b = self.broker
        self.reader = asyncio.current_task()
        smv = b.rmv
        own = not hasattr(self.t, "read_now")
        buf = mv = None
        have = 0
        try:
            if own:
                # In here, so that a MemoryError still ends in finish().
                buf = b.rpool.get()
                if buf is None:
                    raise MemoryError("no read buffer")
                mv = memoryview(buf)
            while not self.closing:
                if self.pause is not None and have:
                    cur = mv  # packets left in buf after a pause
                    n = 0
                elif buf is None:
                    # recv_into, without the coroutine it makes per read.
                    n = self.t.read_now(smv)
                    while n is None:
                        await self.t.readable()
                        n = self.t.read_now(smv)
                    if not n:
                        break
                    cur = smv
                    have = n
                else:
                    n = await self.t.recv_into(mv[have:])
                    if not n:
                        break
                    cur = mv
                    have += n
                b.stats_bytes_recv += n
                self.pause = None
                pos = self._take(cur, have)
                if pos > 0 or pos < -1:
                    # Whole packets in: only they count for the keep-alive
                    # (MQTT-3.1.2-24). Each byte counted, a client that sent
                    # one of a packet a second held its slot for good.
                    self.last_rx = b.now_ms()
                if pos < 0:
                    # A packet larger than a pooled buffer: read it whole.
                    await self._read_big(cur, -pos - 1, have)
                    pos = have
                n = have - pos
                if n == 0:
                    have = 0
                    if buf is not None and not own:
                        b.rpool.put(buf)
                        buf = mv = None
                elif cur is smv:
                    # Part of a packet (or, after a pause, whole packets not
                    # yet handled): keep it in a buffer of our own. Pooled
                    # buffers are as large as the shared one, so it fits.
                    buf = b.rpool.get()
                    if buf is None:
                        buf = await self._wait_for_buffer(smv[pos:have])
                    else:
                        buf[0:n] = smv[pos:have]
                    mv = memoryview(buf)
                    have = n
                elif pos:
                    buf[0:n] = mv[pos:have]
                    have = n
                if self.pause is not None and not self.closing:
                    await self._wait(self.pause)
                    if not have:
                        # Nothing left to handle (a CONNACK held for a
                        # commit paused it after its CONNECT): back to
                        # reading, no longer held by the broker. Left set,
                        # an idle client counted as held for good: never
                        # closed for its keep-alive, and its slot given to
                        # a newcomer after 10 s (held_longest).
                        self.pause = None
                if not self.room(256) and not self.closing:
                    # Output is backed up: stop reading until it drains.
                    await self.wait_drained().wait()
                b.passes += 1
                if b.passes >= _TURN_PASSES:
                    # read_now() returns at once while the socket has data,
                    # and only a read that finds none lets another task run:
                    # one client that published as fast as loopback let it
                    # kept every login and the housekeeping waiting (no
                    # CONNACK in 5 s). Here, with nothing of this reader's
                    # left in the shared buffer.
                    b.passes = 0
                    await asyncio.sleep_ms(0)
        except MQTTError as e:
            if e.reason == 0x95 and self.session is None and have and cur[0] >> 4 == _CONNECT:
                self._connect_too_large(cur, have, e.msg)
            else:
                self.protocol_error(e.reason, e.msg)
        except Closed:
            pass
        except asyncio.CancelledError:
            pass
        except MemoryError:
            gc.collect()
            try:
                log.warning("out of memory serving %s; closing it", self.t.peer)
            except MemoryError:
                pass
            self.protocol_error(0x97, "out of memory")
        except OSError as e:
            log.debug("read from %s failed: %r", self.t.peer, e)
        except Exception as e:
            try:
                log.error("error serving %s: %r", self.t.peer, e)
            except MemoryError:
                pass
            self.protocol_error(0x83, "internal error")
        try:
            if buf is not None:
                b.rpool.put(buf)
            await self.finish()
        except MemoryError:
            # finish() is a coroutine to be made: a heap without room for it
            # left the connection in the tables, its socket open and its
            # slot lost for good. It leaves without the waits.
            self.closing = True
            self.reader = None
            self._leave(False)

    async def _wait_for_buffer(self, part):
        # A pooled buffer holding `part`, once the heap has one: the shared
        # buffer is the other readers' while this one waits, so part is
        # kept meanwhile in a copy its size. (A publisher whose packet was
        # split across two reads was cut off with 0x97 while a heap full of
        # offline sessions' queues was free only in pieces under 512 B.)
        # A look that fails costs a collection, so they come 50 ms apart
        # and then up to a second apart. Cancelled when the connection is
        # closed; last_rx is set when the wait begins, so that a newcomer
        # may take the slot of one that waits long (held_longest), and when
        # it ends (waits_on_broker).
        b = self.broker
        part = bytes(part)  # (MemoryError: nothing to keep it in; closed)
        self.last_rx = b.now_ms()  # held from now (held_longest)
        self.heap_wait = WAIT_BYTES
        ms = 50
        try:
            while True:
                await asyncio.sleep_ms(ms)
                buf = b.rpool.get(False)
                if buf is not None:
                    buf[0 : len(part)] = part
                    self.last_rx = b.now_ms()
                    return buf
                ms = min(ms << 1, 1000)
        finally:
            self.heap_wait = False

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def _take(self, cur, have):
        # Hands the whole packets in cur[:have] to the handlers. Returns
        # where it stopped: at the end, at a partial packet, or at the
        # packet after which the reader must wait (self.pause says for
        # what); -1 - offset of a packet too large for a pooled buffer.
        b = self.broker
        maxp = b.cfg["max_packet_size"]
        pos = 0
        while not self.closing:
            if have - pos < 2:
                break  # all taken, or not even a fixed header yet
            rem = cur[pos + 1]
            if rem < 128 and rem + 2 <= maxp:
                # A one-byte remaining length, the usual case: no call.
                h = 2
            else:
                # A 3.1.1 bridge link's PUBLISH past maxp is read and
                # dropped: the upstream cannot be told it (v5 links tell it).
                r = frame(cur, pos, have, _ANY if self.topic_in is not None and self.version != 5 else maxp)
                if r is None:
                    break
                h, rem = r
                if h + rem > maxp:  # (only a 3.1.1 link's gets here)
                    if cur[pos] >> 4 != _PUBLISH:
                        raise MQTTError(0x95, "a %d B packet over max_packet_size" % (h + rem))
                    check_flags(cur[pos])
                    if pos + h + rem > have:
                        return -1 - pos  # dropped as it is read (_drop_big_read)
                    _drop_big(self, cur, pos, h, h + rem)
                    pos += h + rem
                    continue
            if pos + h + rem > have:
                if h + rem > b.rpool.size:
                    return -1 - pos
                break
            try:
                self.dispatch(cur[pos], cur, pos + h, pos + h + rem)
            except Paused:
                # Not taken: it stays, and is handed over again.
                break
            pos += h + rem
            if b.congested is not None:
                self._held_back()
            if self.pause is not None:
                break  # (set by _held_back, or by a handler for after its packet)
        return pos

    def _held_back(self):
        # A session the last message went to is filling up: this reader is
        # to wait for it (self.pause), unless it already waits for
        # something else, which comes first.
        b = self.broker
        s = b.congested
        b.congested = None
        if self.pause is None and holds_back(self, s):
            self.pause = s

    async def _wait(self, what):
        # A pause: for a condition to hold, a task to end (a login being
        # hashed), or a session to drain.
        if callable(what):
            self.last_rx = self.broker.now_ms()  # held from now (held_longest)
            await wait_recovered(self.broker, what)
            self.last_rx = self.broker.now_ms()  # (waits_on_broker)
        elif type(what) is asyncio.Task:
            await what
        else:
            self.waiting_for = what  # read by holds_back()
            try:
                await wait_for_session(what)
            finally:
                self.waiting_for = None

    async def _read_big(self, mv, pos, have):
        # Reads one packet that is larger than the receive buffer into a
        # buffer of its own, once the heap can spare it (until then the
        # client waits: TCP backpressure). Its size was already checked
        # against max_packet_size. Packets up to BIG_KEEP bytes reuse one
        # spare buffer: a fresh one per packet, garbage right after, chops
        # the free heap into holes between the messages that are kept
        # (measured: 35 KB free in blocks of at most 1 KB after a burst of
        # 1 KB messages). Sets self.pause when the reader must wait after.
        b = self.broker
        h, total = frame(mv, pos, have, _ANY)  # (_take checked its size)
        total += h
        if total > b.cfg["max_packet_size"]:
            await _drop_big_read(self, mv, pos, h, have, total)
            return
        big = b.spare_big
        if big is not None and len(big) >= total:
            b.spare_big = None
            big[0 : have - pos] = mv[pos:have]
        else:
            big = await self._big_buffer(mv, pos, h, have, total)
            if big is None:
                return  # refused, and its bytes read and dropped
        try:
            # Over BIG_KEEP, not kept for reuse: a message keeps its
            # payload in it (handle_publish), rather than copy it to a
            # second piece; a smaller one's too when the heap has no piece
            # for the copy.
            self.big_in = big
            bmv = memoryview(big)
            got = have - pos
            while got < total:
                n = await self.t.recv_into(bmv[got:total])
                if not n:
                    raise OSError(104)
                got += n
                b.stats_bytes_recv += n
            self.last_rx = b.now_ms()
            # Handlers copy what they keep (as they do from the shared
            # read buffer), so the buffer is free again afterwards, but for
            # one that a message took for its payload.
            while True:
                try:
                    self.dispatch(big[0], bmv, h, total)
                    break
                except Paused:
                    await self._wait(self.pause)
                    self.pause = None
            if b.congested is not None:
                self._held_back()
        finally:
            free = self.big_in is big  # (no message took it)
            self.big_in = None
            if b.connect_big is self:
                b.connect_big = None
            if free and len(big) <= BIG_KEEP and (b.spare_big is None or len(b.spare_big) < len(big)):
                b.spare_big = big

    async def _big_buffer(self, mv, pos, h, have, total):
        # A buffer for the packet whose first bytes are mv[pos:have] (total
        # bytes, h of fixed header), with those bytes in it, once the heap
        # has a piece that large. Until then it waits unread, as any message
        # the heap cannot take (README, "When the board is full"): a client
        # is not closed for it. A v5 QoS 1/2 PUBLISH is refused with 0x97
        # instead (None), and a CONNECT before any session gets its CONNACK
        # 0x97. Before a login, one such buffer at a time (connect_big):
        # five sockets that sent the first 100 bytes of an 8 KB CONNECT
        # held 40 KB of heap, with no password checked, for as long as
        # connect_timeout let them, and messages were refused meanwhile.
        b = self.broker
        part = mv[pos:have]
        kept = None  # the pooled buffer that holds part while this waits
        login = self.session is None  # a CONNECT: nobody has logged in yet
        ms = 0  # once no piece was found: how long until the next look
        try:
            while True:
                wait = WAIT_BYTES
                if (not login or b.connect_big is None) and (b.heap.room_for(total) or self._passes(part, h, total)):
                    try:
                        big = bytearray((total + 255) & ~255 if total <= BIG_KEEP else total)
                        big[0 : len(part)] = part
                        if login:
                            b.connect_big = self
                        if kept is not None:
                            self.last_rx = b.now_ms()  # the wait is over (waits_on_broker)
                        return big
                    except MemoryError:
                        # Free heap, but no piece this large (the allocator
                        # collected before it gave up). A shortage too
                        # (keepalive.check: who holds messages is stuck
                        # then); and each try costs collections, so the
                        # looks come further apart, up to a second: 20 a
                        # second each, clients gone in a WebSocket fuzz
                        # waited on each other's crumbs.
                        b.heap.refused_at = time.ticks_ms()
                        wait = WAIT_PIECE
                        ms = min(ms << 1, 1000) if ms else 100
                        if self.session is None and part[0] >> 4 == _CONNECT:
                            self._no_heap_for_connect(part, h, len(part))
                        if kept is None and b.heap.may_tell():  # (the first try)
                            try:  # (its arguments take heap)
                                log.warning("%s (%s): no piece of heap for a %d B packet, %d B free in "
                                            "smaller ones; it waits (v5 QoS 1/2: 0x97)", self.t.peer,
                                            self.client_label(), total, gc.mem_free())
                            except MemoryError:
                                pass
                if await self._refuse_big(part, h, total, mv):
                    return None
                if total > b.heap.most:
                    # It would wait for good (max_packet_size past what
                    # this heap can ever hold; a SUBSCRIBE hung until the
                    # keep-alive ran out).
                    raise MQTTError(0x95, "a %d byte packet: more than this heap can ever take" % total)
                if kept is None:
                    # The shared read buffer is the other readers' while
                    # this one waits: what it holds of this packet is kept
                    # aside, in a pooled buffer. A spare from start is there
                    # when a heap at its floor has no new piece of 512 B
                    # (a copy of its own closed 3.1.1 clients that way).
                    kept = b.rpool.get()
                    if kept is None:
                        raise MemoryError("no buffer to keep a waiting packet in")
                    kept[0 : len(part)] = part
                    part = memoryview(kept)[0 : len(part)]
                    self.last_rx = b.now_ms()  # held from now, once (held_longest)
                self.heap_wait = wait
                # (last_rx is set when the wait begins and when it is over,
                # not at each look: set at each look, a heap with the bytes
                # but no piece of them kept the client from ever counting
                # as held, and its slot was never given to a newcomer:
                # WebSocket fuzzing, clients gone while they waited held
                # every slot.)
                if wait == WAIT_PIECE:
                    await asyncio.sleep_ms(ms)
                else:
                    await wait_recovered(b, lambda: (not login or b.connect_big is None)
                                         and (b.heap.room_for(total) or self._passes(part, h, total)))
        finally:
            self.heap_wait = False
            if kept is not None:
                b.rpool.put(kept)

    def _passes(self, part, h, total):
        # True for a client's PUBLISH (its first bytes in part, topic
        # included) whose message would not stay in the heap: every
        # receiver takes it at once, or none keeps it (route.would_hold).
        # Its buffer is garbage once it is relayed: it may be taken below
        # the message floor, down to the clients', as a small one is
        # (handle_publish._admit). Held at the floor, it waited for good
        # where offline sessions' queues had filled the heap, though a
        # live subscriber read its topic.
        first = part[0]
        if self.session is None or self.topic_in is not None or first >> 4 != _PUBLISH:
            return False
        o = h + 2
        if o > len(part):
            return False
        n = part[h] << 8 | part[h + 1]
        if not n or o + n > len(part):
            return False  # (a topic alias, or a topic past what was read)
        b = self.broker
        try:
            topic = str(part[o : o + n], "utf-8")
            return not would_hold(b, topic, (first >> 1) & 3, first & 1, self.session) and b.heap.room_for_client(total)
        except (UnicodeError, MemoryError):
            return False  # (not UTF-8: on_publish closes it; or no heap even for this)

    async def _refuse_big(self, part, h, total, scratch):
        # True when the packet that starts with `part` is a v5 QoS 1/2
        # PUBLISH whose packet identifier is in part: it is answered 0x97,
        # and the rest of its bytes are read into scratch and dropped.
        first = part[0]
        qos = (first >> 1) & 3
        if not self.refuses() or self.session is None or first >> 4 != _PUBLISH or not qos:
            return False
        o = h + 2
        if o > len(part):
            return False
        o += part[h] << 8 | part[h + 1]
        if o + 2 > len(part) or not (part[o] or part[o + 1]):
            return False  # (a packet identifier of 0 is for on_publish to refuse)
        pid = part[o] << 8 | part[o + 1]
        left = total - len(part)
        while left:
            n = await self.t.recv_into(scratch[: min(left, len(scratch))])
            if not n:
                raise OSError(104)
            left -= n
            self.broker.stats_bytes_recv += n
        self.last_rx = self.broker.now_ms()
        refuse_for_heap(self, qos, pid)
        return True

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def dispatch(self, first, mv, off, end):
        # Called for every packet (machine code: a cheaper call).
        self.broker.stats_pkts_recv += 1
        if self.session is None:
            self._connect(first, mv, off, end)
        elif first >> 4 == _PUBLISH:
            # The fixed-header rules of check_flags() for PUBLISH, inline:
            # QoS 3, or DUP on QoS 0, is malformed.
            if first & 6 == 6 or (first & 8 and not first & 6):
                check_flags(first)
            on_publish(self, first, mv, off, end)
        else:
            on_packet(self, first, mv, off, end)  # (checks the flags)

    def _connect(self, first, mv, off, end):
        if first >> 4 != _CONNECT:
            raise MQTTError(0x82, "first packet is not CONNECT")
        check_flags(first)
        try:
            on_connect(self, mv, off, end)
        except MemoryError:
            if self.session is not None:
                raise  # after its CONNACK: closed as any other
            self._no_heap_for_connect(mv, off, end)

    def _no_heap_for_connect(self, mv, off, end):
        # A CONNECT (its body at mv[off:end], maybe not all read) that the
        # heap cannot take, before any session was made: the client is told
        # in a CONNACK of the version it asked for (0x97; 3.1.1: 3, server
        # unavailable), never with a DISCONNECT before one (MQTT-3.14.0-1).
        # A constant, sent without setting anything: encoding a refusal, or
        # a connection's first `version` or `told`, needed heap that was
        # not there, and the client got a bare close.
        gc.collect()
        log.info("refused %s: 0x97 out of memory", self.t.peer)
        self.broker.stats_refused += 1
        self.send(_NO_HEAP_V5 if asked_version(mv, off, end) == 5 else _NO_HEAP_V3)
        raise Closed()

    def _connect_too_large(self, mv, have, why):
        # A CONNECT over max_packet_size (mv[0:have], its first bytes): a
        # CONNACK in the version it asked for says so (v5 0x95; 3.1.1: 3,
        # server unavailable), and the rest it sends is read and dropped
        # (finish): closed unread, it got a reset and no answer.
        h = 1
        while h < have and mv[h] & 0x80:
            h += 1
        self.version = asked_version(mv, h + 1, have)
        try:
            refuse(self, 0x95, why)
        except Closed:
            pass

    # ------------------------------------------------------------ closing

    def protocol_error(self, reason, msg=""):
        # MQTT 5 tells the client why (DISCONNECT with a reason code);
        # 3.1.1 has no such packet and just closes (MQTT-4.8.0-1). Never
        # raises: it runs in the reader's exception handlers, where a
        # MemoryError would end the reader without its teardown.
        try:
            self.disconnect_reason = reason  # its first assignment may need heap
            log.info("closing %s (%s): 0x%02X %s", self.t.peer, self.client_label(), reason, msg)
            if self.version == 5 and self.session is not None and not self.closing and not self.connack_held:
                pkt = None
                if msg and self.problem_info:
                    pkt = encode(Disconnect(reason, {0x1F: msg[:100]}), 5)
                    if len(pkt) > self.max_out:
                        # The reason string must not push a packet past the
                        # client's Maximum Packet Size (MQTT-3.14.2-3).
                        pkt = None
                self.send(pkt or encode(Disconnect(reason), 5))
                self.told = True
        except MemoryError:
            gc.collect()
        self.closing = True

    def client_label(self):
        return self.session.client_id if self.session is not None else "-"

    def close_soon(self, error=None):
        # Ends the connection from outside the reader (take-over, keep-alive
        # expiry, write failure: error).
        # The reader is cancelled first: a kick can fail for heap, and a
        # paused reader left waiting would keep its slot for good.
        self.closing = True
        if self.reader is not None:  # None once finish() has begun
            try:
                self.reader.cancel()
            except Exception:
                pass
        try:
            self.kick()
        except MemoryError:
            pass  # (finish() writes what output waits)

    async def finish(self):
        # Let what is queued go out (a CONNACK refusal or a DISCONNECT),
        # with a bound, then tear down.
        self.closing = True
        self.reader = None  # close_soon() must not cancel us from here on
        try:
            await self._drain_out()
        except MemoryError:
            gc.collect()
        wait_in = self.told and not self.pending()
        self._leave(wait_in)
        if wait_in:
            try:
                if self.broker.sockets_left() > 1:
                    await self._drain_in()
            except MemoryError:
                pass  # (no heap to wait with: closed now)
            self.t.close()

    def _leave(self, wait_in):
        # Out of the broker's tables, whatever the heap has; the socket is
        # closed too unless what the client still sends is to be drained
        # first (wait_in).
        self.gone = True
        if not wait_in:
            self.t.close()
        try:
            self.release()
        except MemoryError:
            pass  # (a pool's list to grow: the buffer is garbage instead)
        try:
            self.broker.connection_closed(self)
        except MemoryError:
            # Persisting the session may need heap we lack; the connection
            # must leave the tables all the same.
            gc.collect()
            self.broker.drop_connection(self)

    async def _drain_in(self):
        # The client was told why it is closed (a DISCONNECT or a refusing
        # CONNACK, gone out): what it still sends is dropped until it
        # closes (transport.drain_in). Paho's interop suite
        # (test_flow_control2) answers each PUBREC before our DISCONNECT
        # 0x93 with a PUBREL, and lost the DISCONNECT to the reset of a
        # socket closed with those unread. The session is already closed;
        # the socket counts as waiting, and a broker with fewer than two
        # sockets left closes at once instead (a full one refuses a burst
        # of clients: each must find its socket).
        b = self.broker
        b.conn_waiting += 1
        await drain_in(self.t, b.rmv)
        b.conn_waiting -= 1

    async def _drain_out(self):
        # A refusal held back (linger_ms) waits in steps: a full table cuts
        # the wait short (server._make_room sets linger_ms to 0).
        end = time.ticks_add(time.ticks_ms(), self.linger_ms)
        while self.linger_ms and time.ticks_diff(end, time.ticks_ms()) > 0:
            await asyncio.sleep_ms(_LINGER_STEP_MS)
        if self.deferred is not None:
            self.send(self.deferred)
        if self.pending() or self.writer is not None:
            try:
                await asyncio.wait_for_ms(self.wait_drained().wait(), 1000)
            except Exception:
                # Timed out, or no heap for the Event to wait on: what goes
                # out at once still does (a refusing CONNACK got a bare
                # close), unless a writer task is part way through it.
                if self.writer is None:
                    try:
                        self.write_now()
                    except Exception:
                        pass
        w = self.writer
        if w is not None:
            try:
                w.cancel()
            except Exception:
                pass
