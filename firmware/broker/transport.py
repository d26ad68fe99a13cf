# Byte transports under the MQTT connection: plain TCP here; TLS
# (tls.py) and WebSocket wrap or replace it without the protocol code knowing.
#
# Interface every transport provides:
#   await t.recv_into(mv) -> n   bytes read into mv; 0 means end of stream
#   await t.send(mv)             writes all of mv (backpressure: waits)
#   t.close()
#   t.peer                       "ip:port" of the remote end
# and, where a read or a partial write needs no state of its own (TCP,
# TLS), so that a reader can use the broker's shared read buffer:
#   t.read_now(mv) -> n          as recv_into, or None: nothing has come
#   await t.readable()           until read_now has something to say
#   t.write_now(buf, off, n) -> k  writes what goes of buf[off:off + n]
#                                without waiting
#
# We talk to the socket directly instead of through asyncio.Stream because
# Stream.write() copies into an unbounded bytes buffer on every call, and
# Stream.readinto() waits for readability before every read. Here a read is
# tried first and the task waits on the poller only when nothing is there.
import asyncio
import gc
import select
import socket
import time
import micropython
from micropython import const
from asyncio import core

_EAGAIN = 11
_SUBSCRIBE = const(0x82)  # first bytes of SUBSCRIBE and UNSUBSCRIBE
_UNSUBSCRIBE = const(0xA2)
_PEEK = getattr(socket, "MSG_PEEK", 0)
_EVENTS = (0, select.POLLIN, select.POLLOUT, select.POLLIN | select.POLLOUT)
_FAULT = ~(select.POLLIN | select.POLLOUT)
_TURN = const(16)  # readers of one turn put in order at most (a board has 5 to 10 sockets)
DRAIN_IN_MS = const(500)  # drain_in()


class TcpTransport:
    raw = None  # the TCP socket under a TLS one, closed with it
    # On a listener with use_identity_as_username: the common name of the
    # client's certificate, "" when it has none (listeners.py).
    cert_user = None

    def __init__(self, sock, peer):
        self.sock = sock
        self.peer = peer

    def read_now(self, mv):
        # What the socket has, read into mv: n > 0, 0 at the end of the
        # stream, None when nothing is there yet (a non-blocking socket's
        # readinto says so on every port; then await readable()).
        return self.sock.readinto(mv)

    def readable(self):
        # Allocates nothing: recv_into, a coroutine, costs 112 B per call
        # on the twin, and a reader that keeps up waits once per read.
        wait_io(self.sock, 0)
        return until_woken

    async def recv_into(self, mv):
        n = self.read_now(mv)
        while n is None:
            await self.readable()
            n = self.read_now(mv)
        return n

    async def send(self, mv):
        off = 0
        end = len(mv)
        while off < end:
            n = self.write_now(mv, off, end - off)
            if n:
                off += n
            else:
                wait_io(self.sock, 1)
                yield

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def write_now(self, buf, off, n):
        # Writes what the socket takes at once of buf[off:off + n]; 0 when
        # it would block. (Offset and length go to the stream's write, so
        # no memoryview and no slice of one is made for a write.)
        try:
            n = self.sock.write(buf, off, n)
        except OSError as e:
            if e.args[0] != _EAGAIN:
                raise e  # (machine code has no bare raise)
            n = None
        return n or 0

    def close(self):
        # A task still waiting on this socket is woken, to find it closed
        # (close_socket); callers cancel theirs first. Allocates nothing: a
        # tuple of the two sockets found no heap once, and the connection
        # stayed in the tables with its socket open, its slot lost for good.
        close_socket(self.sock)
        close_socket(self.raw)


def forget(s):
    # The poller entry WakeOrder keeps for s between waits, if s has one.
    core._io_queue.forget(s)


def close_socket(s):
    if s is not None:
        forget(s)
        try:
            s.close()
        except Exception:
            pass


async def drain_in(t, mv):
    # Reads what the peer still sends into mv and drops it, until it closes
    # or DRAIN_IN_MS have gone by. A socket closed with input unread sends a
    # reset, and a reset can make the peer's TCP drop our last words (a
    # refusal, a DISCONNECT, an error page) before the peer has read them.
    # Plain TCP only (a TcpTransport without TLS under it): over TLS the
    # wait would hold one of the listener's few TLS sessions
    # (max_tls_connections, 20-25 KB each), and the next TLS client would
    # be refused meanwhile.
    if getattr(t, "raw", 0) is not None:
        return
    end = time.ticks_add(time.ticks_ms(), DRAIN_IN_MS)
    try:
        while True:
            left = time.ticks_diff(end, time.ticks_ms())
            if left <= 0 or not await asyncio.wait_for_ms(t.recv_into(mv), left):
                return
    except Exception:
        pass  # the time is up, a reset, or no heap to wait with: close now


async def connect_out(host, port):
    # A TCP connection out (a bridge's uplink), with TCP_NODELAY; its socket
    # is closed when it fails.
    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    s = socket.socket(ai[0], socket.SOCK_STREAM)
    try:
        s.setblocking(False)
        try:
            s.connect(ai[-1])
        except OSError as e:
            import errno

            if e.args[0] != errno.EINPROGRESS:
                raise
        wait_io(s, 1)
        await until_woken
        try:
            s.setsockopt(6, 1, 1)  # TCP_NODELAY
        except OSError:
            pass
    except BaseException:
        close_socket(s)
        raise
    return s


class _Wait:
    # Awaited once the task is on a queue that wakes it (wait_io(), or
    # core.Wakeup): yields to asyncio once, and ends when the task runs
    # again. One for all tasks, as asyncio's sleep_ms() has: the first
    # step is taken at once by the task that awaits it.
    def __init__(self):
        self.fresh = False
        self.done = StopIteration()

    def __iter__(self):
        self.fresh = True
        return self

    def __next__(self):
        if self.fresh:
            self.fresh = False
            return None
        self.done.__traceback__ = None
        raise self.done


until_woken = _Wait()


def wait_io(s, idx):
    # asyncio's queue_read (idx 0) / queue_write (1), on the WakeOrder
    # queue this module installs; then the caller yields, or awaits
    # until_woken.
    core._io_queue._enqueue(s, idx)


class WakeOrder(core.IOQueue):
    # asyncio's IOQueue, but among the readers woken in one turn, those
    # whose socket starts with a SUBSCRIBE or UNSUBSCRIBE go first. The
    # poller lists readable sockets in the order of its own table, not in
    # the order their data came, and asyncio runs the readers in that
    # order: a PUBLISH sent on one connection just after a SUBSCRIBE on
    # another was often routed before the subscription existed. A client
    # that subscribes and then has a message published expects it
    # (Mosquitto's epoll lists sockets in the order their data came).
    # Readers woken in different turns keep their order (asyncio's queue
    # is first in, first out for equal times), so only a turn with more
    # than one reader costs anything: a one-byte peek per reader (and, if
    # one subscribes, the others of the turn put back at the end).
    def __init__(self):
        super().__init__()
        # This turn's readers, task then socket, in a list made once: the
        # loop must not allocate (a MemoryError here would end asyncio).
        self.woken = [None] * (2 * _TURN)

    # Two changes to how asyncio keeps its entries ([reader, writer,
    # socket] and the poller's), both so that a wait allocates nothing:
    # - keyed by the socket, not id(s), which makes an int at every call
    #   where the heap lies at or above 2**31 (a board's RAM lies below,
    #   as the twin's heap does: tools/twin_variant/twin_heap.c);
    # - kept between waits, the poller asked for no events while no task
    #   waits (asyncio drops both after every wakeup and makes them again
    #   at the next wait). close_socket() takes them out.
    def _enqueue(self, s, idx):
        sm = self.map.get(s)
        if sm is None:
            self._add(s, idx)
        else:
            if sm[idx] is not None:
                _second(idx)
            # The poller first: should it fail, no task is left waiting.
            self.poller.modify(s, _asked(sm) | _EVENTS[idx + 1])
            sm[idx] = core.cur_task
        core.cur_task.data = self

    def _add(self, s, idx):
        sm = [None, None, s]
        sm[idx] = core.cur_task
        self.map[s] = sm
        try:
            self.poller.register(s, _EVENTS[idx + 1])
        except BaseException as e:
            # No entry is left to wake a task that does not wait. And
            # MicroPython's poll map can be left with an entry without its
            # object (modselect.c: "This case is not handled"), which the
            # next poll() dereferences: _unpoll completes and removes it.
            # The error stays the caller's, who closes that socket or waits.
            del self.map[s]
            sm = None  # the list too, for _unpoll's collection
            if isinstance(e, MemoryError):
                _unpoll(self.poller, s)
            raise

    def _dequeue(self, s):
        del self.map[s]
        self.poller.unregister(s)

    def forget(self, s):
        # A task still waiting on s is woken, to find it closed (else it
        # would wait for good: nothing polls s any more).
        sm = self.map.get(s)
        if sm is not None:
            self._dequeue(s)
            if sm[0] is not None:
                core._task_queue.push(sm[0])
            if sm[1] is not None:
                core._task_queue.push(sm[1])

    def remove(self, task):
        # Task.cancel(): that task's wait goes, and only it. asyncio's own
        # drops the socket's entry, and with it the wait of the task on the
        # other side (a reader cancelled stalled its connection's writer).
        for s in self.map:
            sm = self.map[s]
            if sm[0] is task or sm[1] is task:
                if sm[0] is task:
                    sm[0] = None
                if sm[1] is task:
                    sm[1] = None
                self.poller.modify(s, _asked(sm))

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def wait_io_event(self, dt):
        tq = core._task_queue
        w = self.woken
        n = 0
        for s, ev in self.poller.ipoll(dt):
            sm = self.map[s]
            t = sm[0]
            if t is not None and ev & ~select.POLLOUT:
                sm[0] = None
                tq.push(t)
                if n < 2 * _TURN:
                    w[n] = t
                    w[n + 1] = s
                    n += 2
            t = sm[1]
            if t is not None and ev & ~select.POLLIN:
                sm[1] = None
                tq.push(t)
            if sm[0] is None and sm[1] is None and ev & _FAULT:
                # An error or a hang-up that no task waits for: the poller
                # reports it whatever it is asked, so at every turn.
                self._dequeue(s)
            else:
                self.poller.modify(s, _asked(sm))
        if n > 2:
            _subscriptions_first(tq, w, n)
        for i in range(0, n, 2):
            w[i] = w[i + 1] = None  # no task or socket kept beyond its turn


def _second(idx):
    # Two tasks may not wait to read (or to write) on one socket: only one
    # would be woken. (asyncio's own queue asserts the same.)
    raise RuntimeError("a second task waits to %s on one socket" % ("read", "write")[idx])


def _asked(sm):
    # The poller events for the tasks an entry holds (none: errors only).
    return _EVENTS[(sm[0] is not None) + 2 * (sm[1] is not None)]


def _subscriptions_first(tq, w, n):
    # Of the readers w[0:n] (task, socket, ...), queued in the order the
    # poller listed them: those whose socket does not start with a
    # SUBSCRIBE or UNSUBSCRIBE go to the back of the queue, when any does.
    moves = False
    for i in range(0, n, 2):
        if _subscribes(w[i + 1]):
            moves = True
            w[i] = None
    if moves:
        for i in range(0, n, 2):
            if w[i] is not None:
                tq.remove(w[i])
                tq.push(w[i])


def _subscribes(s):
    # True when a plain TCP socket's next byte starts a SUBSCRIBE or an
    # UNSUBSCRIBE. TLS sockets take no flags (their bytes are ciphertext
    # anyway); a listening socket has nothing to peek. A WebSocket's
    # binary frame starts with the same byte as a SUBSCRIBE: its reader
    # just goes early. No heap for the peeked byte: it is not known, and
    # the reader goes in turn.
    if not _PEEK or type(s) is not socket.socket:
        return False
    try:
        # The stubs know recv(bufsize) only; the unix, esp32 and lwIP
        # sockets all take the flags argument.
        b = s.recv(1, _PEEK)  # pyright: ignore[reportCallIssue]
    except Exception:  # closed, not connected, or no heap: not known
        return False
    return len(b) == 1 and (b[0] == _SUBSCRIBE or b[0] == _UNSUBSCRIBE)


def order_wakeups():
    # Asyncio's queue replaced before any socket waits on it: on import,
    # and again by app.start(), as asyncio.new_event_loop() (app.run's
    # end) puts asyncio's own back.
    if type(core._io_queue) is WakeOrder:
        return
    if core._io_queue.map:
        raise RuntimeError("order_wakeups: sockets already wait on asyncio's poller")
    core._io_queue = WakeOrder()  # pyright: ignore[reportAttributeAccessIssue]


order_wakeups()


# Frees what can be freed at once, for _unpoll's register(), which must not
# fail: a collection, or once the broker runs (app.py) Broker.shed_buffers,
# which gives up its spare pooled buffers too.
shed = gc.collect


def _unpoll(poller, s):
    for _ in range(3):
        shed()
        try:
            poller.register(s, select.POLLIN)
        except MemoryError:
            continue
        poller.unregister(s)
        return
    # No heap for 16 bytes even after collecting: the half-made entry
    # would crash the next poll(), so stop here instead, as a watchdog
    # reset would (main.py restarts the board; a host run ends).
    raise SystemExit("poller: out of heap with a half-registered socket")


def peer_str(addr):
    # The unix port gives a raw sockaddr bytearray; boards give (ip, port).
    if isinstance(addr, tuple):
        return "%s:%d" % (addr[0], addr[1])
    try:
        import socket

        # Both exist only on the unix port, the only port that gets here.
        a = socket.sockaddr(addr)  # pyright: ignore[reportAttributeAccessIssue]
        ip = socket.inet_ntop(a[0], a[1])  # pyright: ignore[reportAttributeAccessIssue]
        return "%s:%d" % (ip, a[2])
    except Exception:
        return "?"
