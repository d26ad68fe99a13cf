# The output side of an MQTT connection, shared by client connections
# (conn.py) and bridge links (bridge.py), and the buffer pools behind it.
#
# Packets are queued without ever blocking:
#   obuf  packets as they are queued, up to its size (a pooled buffer,
#         held only while there is output)
#   big   one packet, or one large payload, that does not fit in obuf; it
#         goes out on its own right after obuf, from the object itself
#   tail  what is queued while `big` waits (a list), sent right after it
#
# Sending: kick() puts the connection on the broker's dirty list, and the
# broker's one flusher task (Broker.flush_all) moves queued messages in and
# writes what the socket takes at once, for every dirty connection, after
# the task that queued them yields. Only a connection whose socket would
# block gets a writer task of its own, until it has drained: an idle or a
# keeping-up connection has no writer task, and a reader's whole batch of
# packets goes out in one write per receiver. Readers stop reading while
# the output is backed up (room() is False), so the tail stays small.
import asyncio
import gc
import micropython
from micropython import const
from broker import log

_PIECE = const(1024)  # bytes of a large payload written at a time (as TLS records: tls.py)


def ack_packet(first, pid, reason=0):
    # PUBACK, PUBREC, PUBREL or PUBCOMP as bytes, for when it cannot be
    # written into an output buffer in place (Output.send_ack).
    if reason:
        return bytes((first, 3, pid >> 8, pid & 0xFF, reason))
    return bytes((first, 2, pid >> 8, pid & 0xFF))


class Pool:
    # Spare buffers of one size. Busy connections hold one each; idle ones
    # give theirs back, and a few spares are kept to spare the allocator.
    def __init__(self, size, keep):
        self.size = size
        self.keep = keep
        self.free = []

    def fill(self):
        # The spares, made at start while the heap is still in one piece:
        # low in the heap and kept for good, they are there when it has
        # filled up in crumbs. A broker in use holds them anyway (a
        # connection with output takes one, and gives it back as a spare).
        while len(self.free) < self.keep:
            self.free.append(bytearray(self.size))

    def get(self, again=True):
        # A buffer, or None when the heap has no block that large even
        # after a collection (it may be fragmented: free, but not in one
        # piece). Callers then do without one, or give up the connection.
        # Not again: one try (the allocator's own collection), for a
        # caller that asks again later.
        if self.free:
            return self.free.pop()
        for _ in range(2 if again else 1):
            try:
                return bytearray(self.size)
            except MemoryError:
                if again:
                    gc.collect()
        return None

    def put(self, buf):
        if len(buf) == self.size and len(self.free) < self.keep:
            self.free.append(buf)


class Output:
    # Subclasses set `broker` and `t` (the transport), and provide pump()
    # and close_soon(error=None).
    obuf = None
    olen = 0
    big = None
    tail = None
    writer = None  # the task sending what the socket did not take at once
    dirty = False  # on the broker's dirty list
    gone = False  # its transport is closed: nothing more goes out
    wrote = False  # bytes went out since keepalive.py (a bridge link: bridge.py) last looked
    drained = None  # Event set whenever the output empties; made when
    # someone first waits for it, since most connections never do

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def kick(self):
        # Marked only once on the flusher's list: when that list could not
        # grow (MemoryError), a later kick tries again, and the output (a
        # CONNACK) is not left unsent for good.
        if not self.dirty:
            self.broker.kick(self)
            self.dirty = True

    def send(self, data):
        # Queues a control packet. Never fails.
        n = len(data)
        if self.big is not None:
            # By reference: every sender passes an object of its own, and
            # a large payload here must not be copied.
            if self.tail is None:
                self.tail = [data]
            else:
                self.tail.append(data)
        else:
            ob = self.obuf
            if ob is None:
                ob = self.obuf = self.broker.wpool.get()
            o = self.olen
            if ob is not None and o + n <= len(ob):
                ob[o : o + n] = data
                self.olen = o + n
            else:
                self.big = data
        self.kick()

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def send_ack(self, first, pid, reason=0):
        # PUBACK, PUBREC, PUBREL or PUBCOMP (first byte given), with a
        # reason code when it is not 0: written in place, no packet object.
        ob = self.reserve(5 if reason else 4)
        if ob is None:
            self.send(ack_packet(first, pid, reason))
            return
        o = self.olen
        ob[o] = first
        ob[o + 2] = pid >> 8
        ob[o + 3] = pid & 0xFF
        if reason:
            ob[o + 1] = 3
            ob[o + 4] = reason
            self.olen = o + 5
        else:
            ob[o + 1] = 2
            self.olen = o + 4
        self.kick()

    def send_split(self, head, payload):
        # A PUBLISH as its head and its payload: the payload goes out from
        # the message itself, so a large one is never copied (a fragmented
        # heap may not have that much in one piece).
        fits = self.big is None and self.room(len(head))
        self.send(head)
        if fits and self.big is None:
            self.big = payload
        else:
            # (or the head itself went to `big`: no buffer could be had)
            self.send(payload)

    def room(self, n):
        if self.big is not None:
            return False
        if self.obuf is None:
            return n <= self.broker.wpool.size  # what a buffer would have
        return self.olen + n <= len(self.obuf)

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def reserve(self, n):
        # The output buffer, when n more bytes fit at olen; else None. A
        # full buffer is written out at once when the socket takes it, so
        # that a burst goes out in buffer-sized writes rather than waiting
        # in the session's queue for the flusher.
        if self.big is not None:
            return None
        ob = self.obuf
        if ob is None:
            if n > self.broker.wpool.size:
                return None
            ob = self.obuf = self.broker.wpool.get()
            if ob is None:
                return None
        if self.olen + n <= len(ob):
            return ob
        if self.writer is not None or self.gone or n > len(ob) or not self._write_out():
            return None
        return ob if self.olen + n <= len(ob) else None

    def _write_out(self):
        # write_now() for reserve(), False on a socket error (the flusher
        # finds the connection and closes it). Its own function: a try in
        # reserve() would put reserve's frame on the heap (tools/frames.py).
        try:
            self.write_now()
            return True
        except OSError:
            return False

    def pending(self):
        return self.olen or self.big is not None

    def write_now(self):
        # Writes what the socket takes without waiting. True when all of
        # the output is out. Transports that cannot write synchronously
        # (WebSocket) always leave it to the writer task. (hasattr, then a
        # method call: getattr() would make a bound method, 16 B of heap for
        # every write.)
        t = self.t
        if not hasattr(t, "write_now"):
            return not self.pending()
        n = self.olen
        if n:
            ob = self.obuf
            k = t.write_now(ob, 0, n)
            self.broker.stats_bytes_sent += k
            if k < n:
                if k:
                    ob[0 : n - k] = memoryview(ob)[k:n]
                    self.olen = n - k
                    self.wrote = True
                return False
            self.olen = 0
            self.wrote = True
        return self.big is None or self._write_big(t)

    def _write_big(self, t):
        # write_now() for `big` and its tail, to transport t.
        while self.big is not None:
            x = self.big
            k = t.write_now(x, 0, len(x))
            self.broker.stats_bytes_sent += k
            if k:
                self.wrote = True
            if k < len(x):
                if k:
                    self.big = memoryview(x)[k:]
                return False
            y = self.tail
            if y:
                self.big = y.pop(0)
                if not y:
                    self.tail = None
            else:
                self.big = None
        return True

    async def flush(self, t):
        # Writes to transport t what is queued, in order: obuf, then big
        # and its tail. Returns the bytes written, 0 when nothing waited.
        n = self.olen
        if n:
            ob = self.obuf
            mv = memoryview(ob)
            await t.send(mv[:n])
            # Senders may have appended while we waited.
            rest = self.olen - n
            if rest:
                ob[0:rest] = mv[n : n + rest]
            self.olen = rest
            return n
        x = self.big
        if x is None:
            return 0
        y = self.tail
        self.big = self.tail = None
        n = await self._send_big(t, x)
        if y is not None:
            for d in y:
                n += await self._send_big(t, d)
        return n

    async def _send_big(self, t, x):
        # In pieces of _PIECE bytes, each counted as progress when it has
        # gone (keepalive.py): a subscriber reading an 8 KB payload slowly
        # is not taken for one that stopped. Memoryviews, so that nothing
        # is copied.
        mv = memoryview(x)
        n = len(x)
        for i in range(0, n, _PIECE):
            await t.send(mv[i : i + _PIECE])
            self.wrote = True
        return n

    def service(self):
        # The flusher's work for this connection: fill the output from the
        # session's queue and write what goes out at once; leave the rest
        # to a writer task. A socket error (OSError) is the flusher's to
        # handle (Broker.flush_now): no try here, which would put this
        # frame on the heap (tools/frames.py).
        if self.writer is not None or self.gone:
            return  # its writer task is on it, or it is closed
        for _ in range(8):
            more = self.pump()
            if not self.write_now():
                self._start_writer()
                return
            if not more:
                self._drained()
                return
        # More to send: after the other connections have had their turn.
        self.kick()

    def pump(self):
        # Fills the output from the session's queue. True when it stopped
        # for lack of room (more goes once the output is written); False
        # when nothing more can go now. Subclasses with a queue override it.
        return False

    def _drained(self):
        # The output buffer stays while the connection is busy (handing it
        # back after every flush made a burst to ten receivers throw away
        # eight buffers a round); release() gives it back once idle.
        d = self.drained
        if d is not None:
            d.set()

    def release(self):
        # Called once a second (keepalive.py): an idle connection holds no
        # output buffer.
        ob = self.obuf
        if ob is not None and not self.olen and self.big is None and self.writer is None:
            self.obuf = None
            self.broker.wpool.put(ob)

    def _start_writer(self):
        try:
            self.writer = asyncio.create_task(self._writer())
        except MemoryError:
            # Tried again at the next kick; the peer waits meanwhile.
            self.writer = None
            self.dirty = False
            self.broker.kick(self)

    async def _writer(self):
        b = self.broker
        try:
            while True:
                more = self.pump()
                n = await self.flush(self.t)
                if not n and not more:
                    break
                if n:
                    b.stats_bytes_sent += n
                    self.wrote = True
        except asyncio.CancelledError:
            pass
        except Exception as e:
            # The peer is gone or stuck: end the connection.
            self.write_failed(e)
        self.writer = None
        self._drained()

    def write_failed(self, e):
        # A write raised: nothing more goes out on this transport, and the
        # connection ends. Trying again would fail again: a bridge uplink
        # whose connect was refused spun the CPU for the second its close
        # waits for output to drain.
        log.debug("write to %s failed: %r", self.t.peer, e)
        self.gone = True
        self.close_soon(e)
        self._drained()

    def wait_drained(self):
        # An Event to wait on until the output has gone out.
        d = self.drained
        if d is None:
            d = self.drained = asyncio.Event()
        d.clear()
        if self.gone or (not self.pending() and self.writer is None):
            d.set()
        else:
            self.kick()
        return d


# Output's per-delivery methods, for route.py, pump.py and the
# acknowledgements (handle_other.py) to call as functions: c.kick() on a
# Connection misses in the connection's own attributes and in its class's
# before it finds kick in Output's, and a miss walks a nearly full table
# (MicroPython grows one only when it is full): about 400 instructions
# each on the twin, 1,500 a delivery for these two, and 490 a QoS 1
# acknowledgement (tools/bench/instr_per_msg.py).
reserve = Output.reserve
kick = Output.kick
