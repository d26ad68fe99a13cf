# One client connection: a reader task that frames packets in place in a
# preallocated buffer and hands them to the handlers, and a writer task
# that drains a preallocated output buffer and the session's queue.
#
# Handlers are plain functions, not coroutines: calling a coroutine per
# packet would allocate a generator per packet. When the output buffer
# fills, the reader stops reading until the writer has drained it, which
# pushes back on a client that sends faster than it reads.
import asyncio
import gc
from micropython import const
from mqtt.errors import MQTTError
from mqtt.packets import frame, check_flags, encode, Disconnect
from broker import log
from broker.core import Closed
from broker.outbuf import Output
from broker.handle_connect import on_connect
from broker.handle_publish import on_publish
from broker.handle_other import on_packet

_PUBLISH = const(3)
_CONNECT = const(1)
_BIG_KEEP = const(4096)  # largest packet buffer kept for reuse
_NO_BUF_MS = const(20)  # wait before trying again for an output buffer


class Connection(Output):
    # Defaults live on the class: an instance stores only what differs,
    # which keeps an idle connection's attribute table small.
    # obuf (from broker.wpool while there is output), olen, big and tail:
    # see outbuf.py.
    resend = None  # packet ids to send again on session resumption
    drained = None  # Event set by the writer once obuf is empty; made when
    # someone first waits for it, since most connections never do
    session = None
    version = 4
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
    writer = None
    reader = None
    session_expiry_set = 0
    held = 0  # packets persist.py holds for this connection until a commit
    linger_ms = 0  # delay before a refusal goes out (failed login)
    deferred = None  # that refusal

    def __init__(self, broker, transport):
        self.broker = broker
        self.t = transport
        self.wake = asyncio.Event()
        self.last_rx = self.born = broker.now_ms()
        # Set here, not left to the class default: assigning it first at
        # teardown would grow the attribute table when the heap may be out.
        self.closing = False

    # ------------------------------------------------------------ output

    def pool(self):
        return self.broker.wpool

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

    async def writer_loop(self):
        t = self.t
        b = self.broker
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while True:
                    s = self.session
                    if s is not None and self.big is None and (s.queue or self.resend):
                        try:
                            b.pump(self, s)
                        except MemoryError:
                            # No free piece of the heap for an output buffer
                            # (fragmented): wait for one, the queue kept,
                            # rather than drop the client.
                            await asyncio.sleep_ms(_NO_BUF_MS)
                            continue
                    n = await self.flush(t)
                    if not n:
                        break
                    b.stats_bytes_sent += n
                # Drained: an idle connection holds no output buffer.
                if self.obuf is not None:
                    b.wpool.put(self.obuf)
                    self.obuf = None
                if self.drained is not None:
                    self.drained.set()
                if self.closing:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The peer is gone or stuck: end the reader too.
            log.debug("write to %s failed: %r", self.t.peer, e)
            self.close_soon()
        if self.drained is not None:
            self.drained.set()

    def _drain_event(self):
        # The Event to wait on until the writer has emptied obuf; the
        # writer is woken to do so.
        d = self.drained
        if d is None:
            d = self.drained = asyncio.Event()
        d.clear()
        self.wake.set()
        return d

    # ------------------------------------------------------------ input

    async def run(self):
        # The reader; the connection lives as long as this coroutine.
        # Reads land in the broker's shared buffer and are handled at once
        # (no await in between), so an idle connection holds no buffer. Only
        # a packet split across reads gets a buffer of its own from the pool
        # until it is complete. Transports that cannot hand over whole reads
        # synchronously (shared_ok False) keep their own buffer.
        b = self.broker
        self.reader = asyncio.current_task()
        smv = b.rmv
        pool = b.rpool
        psize = pool.size
        own = not getattr(self.t, "shared_ok", True)
        buf = mv = None
        have = 0
        maxp = b.cfg["max_packet_size"]
        again = False  # packets left in buf after a backpressure pause
        try:
            # In here, so that a MemoryError still ends in finish().
            self.writer = asyncio.create_task(self.writer_loop())
            if own:
                buf = pool.get()
                mv = memoryview(buf)
            while not self.closing:
                if again:
                    cur = mv
                    n = 0
                elif buf is None:
                    n = await self.t.recv_into(smv)
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
                if n:
                    self.last_rx = b.now_ms()
                    b.stats_bytes_recv += n
                pos = 0
                paused = False
                while not self.closing:
                    r = frame(cur, pos, have, maxp)
                    if r is None:
                        break
                    h, rem = r
                    total = h + rem
                    if pos + total > have:
                        if total > psize:
                            # Would not fit a partial buffer: read it whole.
                            await self._read_big(cur, pos, have, h, total)
                            pos = have
                            paused = b.pressure
                        break
                    first = cur[pos]
                    self.dispatch(first, cur, pos + h, pos + total)
                    pos += total
                    if b.pressure and first >> 4 == _PUBLISH:
                        # A queue this message went to is filling up.
                        paused = True
                        break
                rest = have - pos
                again = paused and rest > 0
                if rest == 0:
                    have = 0
                    if buf is not None and not own:
                        pool.put(buf)
                        buf = mv = None
                elif cur is smv:
                    # Part of a packet (or, after a pause, whole packets not
                    # yet handled): keep it in a buffer of our own. Pooled
                    # buffers are as large as the shared one, so it fits.
                    buf = pool.get()
                    mv = memoryview(buf)
                    buf[0:rest] = smv[pos:have]
                    have = rest
                elif pos:
                    buf[0:rest] = mv[pos:have]
                    have = rest
                if paused and not self.closing:
                    await b.relieve(self.session)
                if not self.room(256) and not self.closing:
                    # Output is backed up: stop reading until it drains.
                    await self._drain_event().wait()
        except MQTTError as e:
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
        if buf is not None:
            pool.put(buf)
        await self.finish()

    async def _read_big(self, mv, pos, have, h, total):
        # Reads one packet that is larger than the receive buffer into a
        # buffer of its own. Its size was already checked against
        # max_packet_size; here we also check the heap can spare it.
        # Packets up to _BIG_KEEP bytes reuse one spare buffer: a fresh
        # one per packet, garbage right after, chops the free heap into
        # holes between the messages that are kept (measured: 35 KB free
        # in blocks of at most 1 KB after a burst of 1 KB messages).
        b = self.broker
        big = b.spare_big
        if big is not None and len(big) >= total:
            b.spare_big = None
        else:
            floor = b.cfg["min_free_heap"] // 2
            if gc.mem_free() - total < floor:
                gc.collect()
                if gc.mem_free() - total < floor:
                    raise MQTTError(0x97, "no heap for a %d byte packet" % total)
            big = bytearray((total + 255) & ~255 if total <= _BIG_KEEP else total)
        try:
            bmv = memoryview(big)
            got = have - pos
            big[0:got] = mv[pos:have]
            while got < total:
                n = await self.t.recv_into(bmv[got:total])
                if not n:
                    raise OSError(104)
                got += n
                b.stats_bytes_recv += n
            self.last_rx = b.now_ms()
            # Handlers copy what they keep (as they do from the shared
            # read buffer), so the buffer is free again afterwards.
            self.dispatch(big[0], bmv, h, total)
        finally:
            if len(big) <= _BIG_KEEP and (b.spare_big is None or len(b.spare_big) < len(big)):
                b.spare_big = big

    def dispatch(self, first, mv, off, end):
        b = self.broker
        b.stats_pkts_recv += 1
        t = first >> 4
        if self.session is None:
            if t != _CONNECT:
                raise MQTTError(0x82, "first packet is not CONNECT")
            check_flags(first)
            on_connect(self, mv, off, end)
            return
        if t == _PUBLISH:
            # The fixed-header rules of check_flags() for PUBLISH, inline:
            # QoS 3, or DUP on QoS 0, is malformed.
            if first & 6 == 6 or (first & 8 and not first & 6):
                check_flags(first)
            on_publish(self, first, mv, off, end)
        else:
            check_flags(first)
            on_packet(self, first, mv, off, end)

    # ------------------------------------------------------------ closing

    def protocol_error(self, reason, msg=""):
        # MQTT 5 tells the client why (DISCONNECT with a reason code);
        # 3.1.1 has no such packet and just closes (MQTT-4.8.0-1). Never
        # raises: it runs in the reader's exception handlers, where a
        # MemoryError would end the reader without its teardown.
        try:
            self.disconnect_reason = reason  # its first assignment may need heap
            log.info("closing %s (%s): 0x%02X %s", self.t.peer, self.client_label(), reason, msg)
            if self.version == 5 and self.session is not None and not self.closing:
                pkt = None
                if msg and self.problem_info:
                    pkt = encode(Disconnect(reason, {0x1F: msg[:100]}), 5)
                    if len(pkt) > self.max_out:
                        # The reason string must not push a packet past the
                        # client's Maximum Packet Size (MQTT-3.14.2-3).
                        pkt = None
                self.send(pkt or encode(Disconnect(reason), 5))
        except MemoryError:
            gc.collect()
        self.closing = True

    def client_label(self):
        return self.session.client_id if self.session is not None else "-"

    def close_soon(self):
        # Ends the connection from outside the reader (take-over, keep-alive
        # expiry, write failure).
        self.closing = True
        self.wake.set()
        if self.reader is not None:  # None once finish() has begun
            try:
                self.reader.cancel()
            except Exception:
                pass

    async def finish(self):
        # Let the writer flush what is queued (a CONNACK refusal or a
        # DISCONNECT), with a bound, then tear down.
        self.closing = True
        self.reader = None  # close_soon() must not cancel us from here on
        try:
            await self._drain_out()
        except MemoryError:
            gc.collect()
        self.t.close()
        try:
            self.broker.connection_closed(self)
        except MemoryError:
            # Persisting the session may need heap we lack; the connection
            # must leave the tables all the same.
            gc.collect()
            self.broker.drop_connection(self)

    async def _drain_out(self):
        if self.linger_ms:
            await asyncio.sleep_ms(self.linger_ms)
        if self.deferred is not None:
            self.send(self.deferred)
        w = self.writer
        if w is not None:
            if not w.done():
                try:
                    await asyncio.wait_for_ms(self._drain_event().wait(), 1000)
                except Exception:
                    pass
            try:
                w.cancel()
            except Exception:
                pass
