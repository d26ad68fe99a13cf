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
from broker.handle_connect import on_connect
from broker.handle_publish import on_publish
from broker.handle_other import on_packet

_PUBLISH = const(3)
_CONNECT = const(1)


class Connection:
    def __init__(self, broker, transport):
        self.broker = broker
        self.t = transport
        cfg = broker.cfg
        self.rbuf = bytearray(cfg["read_buffer_size"])
        self.obuf = bytearray(cfg["write_buffer_size"])
        self.olen = 0
        self.big = None  # one packet larger than obuf, sent on its own
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.session = None
        self.version = 4
        self.keepalive = 0
        self.last_rx = broker.now_ms()
        self.born = self.last_rx
        self.max_out = 268435455  # client's Maximum Packet Size
        self.send_max = cfg["max_inflight_messages"]  # client's Receive Maximum
        self.alias_in = None  # alias -> topic (v5)
        self.alias_out = None  # topic -> alias (v5)
        self.alias_out_max = 0
        self.problem_info = True
        self.closing = False
        self.finishing = False
        self.normal_close = False
        self.disconnect_reason = None
        self.writer = None
        self.reader = None
        self.session_expiry_set = 0

    # ------------------------------------------------------------ output

    def send(self, data):
        # Queues a control packet. Never fails: a packet that does not fit
        # goes to `big` (at most one waits there); the reader then pauses
        # until the writer drains, so this stays bounded.
        n = len(data)
        o = self.olen
        if o + n <= len(self.obuf) and self.big is None:
            self.obuf[o : o + n] = data
            self.olen = o + n
        elif self.big is None:
            self.big = data
        else:
            self.big = bytes(self.big) + bytes(data)
        self.wake.set()

    def send_packet(self, pkt):
        self.send(encode(pkt, self.version))

    def room(self, n):
        return self.big is None and self.olen + n <= len(self.obuf)

    def out_alias(self, topic):
        # Outgoing topic aliases (v5): the first alias_out_max topics get
        # one; the first PUBLISH carries topic and alias, later ones only
        # the alias. Returns (alias or 0, send the topic?).
        m = self.alias_out
        if m is None:
            m = self.alias_out = {}
        a = m.get(topic)
        if a is not None:
            return a, False
        if len(m) < self.alias_out_max:
            a = len(m) + 1
            m[topic] = a
            return a, True
        return 0, True

    async def writer_loop(self):
        t = self.t
        mv = memoryview(self.obuf)
        s = self.session
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while True:
                    s = self.session
                    if s is not None and self.big is None:
                        self.broker.pump(self, s)
                    n = self.olen
                    if n:
                        await t.send(mv[:n])
                        # Handlers may have appended while we waited.
                        rest = self.olen - n
                        if rest:
                            self.obuf[0:rest] = mv[n : n + rest]
                        self.olen = rest
                        self.broker.stats_bytes_sent += n
                        continue
                    if self.big is not None:
                        b = self.big
                        self.big = None
                        await t.send(b)
                        self.broker.stats_bytes_sent += len(b)
                        continue
                    break
                self.drained.set()
                if self.closing:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The peer is gone or stuck: end the reader too.
            log.debug("write to %s failed: %r", self.t.peer, e)
            self.drained.set()
            self.close_soon()
        self.drained.set()

    # ------------------------------------------------------------ input

    async def run(self):
        # The reader; the connection lives as long as this coroutine.
        b = self.broker
        self.reader = asyncio.current_task()
        self.writer = asyncio.create_task(self.writer_loop())
        buf = self.rbuf
        mv = memoryview(buf)
        have = 0
        maxp = b.cfg["max_packet_size"]
        try:
            while not self.closing:
                n = await self.t.recv_into(mv[have:])
                if not n:
                    break
                have += n
                self.last_rx = b.now_ms()
                b.stats_bytes_recv += n
                pos = 0
                while not self.closing:
                    r = frame(buf, pos, have, maxp)
                    if r is None:
                        break
                    h, rem = r
                    total = h + rem
                    if pos + total > have:
                        if total > len(buf):
                            await self._read_big(mv, pos, have, h, total)
                            pos = have = 0
                        break
                    self.dispatch(buf[pos], mv, pos + h, pos + total)
                    pos += total
                if pos:
                    rest = have - pos
                    if rest:
                        buf[0:rest] = mv[pos:have]
                    have = rest
                if not self.room(256) and not self.closing:
                    # Output is backed up: stop reading until it drains.
                    self.drained.clear()
                    self.wake.set()
                    await self.drained.wait()
        except MQTTError as e:
            self.protocol_error(e.reason, e.msg)
        except Closed:
            pass
        except asyncio.CancelledError:
            pass
        except MemoryError:
            gc.collect()
            log.warning("out of memory serving %s; closing it", self.t.peer)
            self.disconnect_reason = 0x97
        except OSError as e:
            log.debug("read from %s failed: %r", self.t.peer, e)
        except Exception as e:
            log.error("error serving %s: %r", self.t.peer, e)
            self.protocol_error(0x83, "internal error")
        await self.finish()

    async def _read_big(self, mv, pos, have, h, total):
        # Reads one packet that is larger than the receive buffer into a
        # buffer of its own. Its size was already checked against
        # max_packet_size; here we also check the heap can spare it.
        b = self.broker
        gc.collect()
        if gc.mem_free() - total < b.cfg["min_free_heap"] // 2:
            raise MQTTError(0x97, "no heap for a %d byte packet" % total)
        big = bytearray(total)
        bmv = memoryview(big)
        got = have - pos
        big[0:got] = mv[pos:have]
        while got < total:
            n = await self.t.recv_into(bmv[got:])
            if not n:
                raise OSError(104)
            got += n
            b.stats_bytes_recv += n
        self.last_rx = b.now_ms()
        self.dispatch(big[0], bmv, h, total)

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
        check_flags(first)
        if t == _PUBLISH:
            on_publish(self, first, mv, off, end)
        else:
            on_packet(self, first, mv, off, end)

    # ------------------------------------------------------------ closing

    def protocol_error(self, reason, msg=""):
        # MQTT 5 tells the client why (DISCONNECT with a reason code);
        # 3.1.1 has no such packet and just closes (MQTT-4.8.0-1).
        log.info("closing %s (%s): 0x%02X %s", self.t.peer, self.client_label(), reason, msg)
        self.disconnect_reason = reason
        if self.version == 5 and self.session is not None and not self.closing:
            props = None
            if msg and self.problem_info:
                props = {0x1F: msg[:100]}
            self.send_packet(Disconnect(reason, props))
        self.closing = True

    def client_label(self):
        return self.session.client_id if self.session is not None else "-"

    def close_soon(self):
        # Ends the connection from outside the reader (take-over, keep-alive
        # expiry, write failure).
        self.closing = True
        self.wake.set()
        if self.reader is not None and not self.finishing:
            try:
                self.reader.cancel()
            except Exception:
                pass

    async def finish(self):
        # Let the writer flush what is queued (a CONNACK refusal or a
        # DISCONNECT), with a bound, then tear down.
        self.closing = True
        self.finishing = True
        w = self.writer
        if w is not None:
            self.wake.set()
            try:
                await asyncio.wait_for_ms(self.drained.wait(), 1000)
            except Exception:
                pass
            try:
                w.cancel()
            except Exception:
                pass
        self.t.close()
        self.broker.connection_closed(self)
