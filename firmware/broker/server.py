# Listening sockets and our own accept loop. asyncio.start_server is not
# used: a MemoryError inside its accept loop kills the loop for good and
# new clients then hang in the backlog (PLATFORM.md). Here every accept is
# guarded, and a connection is refused while the heap is short, or while
# its source address connects too often (ConnRate).
import asyncio
import gc
import socket
import time
from micropython import const
from broker import log
from broker.addrtable import AddrTable
from broker.transport import TcpTransport, peer_str, wait_io
from broker.conn import Connection
from broker.handle_connect import end_held, room_for_newcomer

_WINDOW_MS = const(10000)  # max_connection_rate counts connections per this
_OOM_WAIT_MS = const(100)  # the listener's pause when the poller found no heap
_TABLE = const(16)  # source addresses tracked at most
_SLOW_MAX_MS = const(1000)  # longest delay before a slowed connection is served
_FIELDS = const(5)
_NEWCOMER_MS = const(1000)  # a socket this young keeps its place (_make_room)
_FULL = "too many sockets"


class ConnRate:
    # Connections per source address, as a leaky bucket (GCRA): each
    # connection fills the address's bucket by _WINDOW_MS / rate ms and the
    # bucket drains by 1 ms per ms. With `rate` = max_connection_rate:
    #   level <= 1 window    (up to `rate` connections in a burst, or a
    #                        steady rate per 10 s): served at once
    #   1 to 2 windows       slowed: served after a delay growing from 0 to
    #                        _SLOW_MAX_MS with the excess
    #   more than 2 windows  refused: closed at once, unread
    # Refused connections fill the bucket too (up to 3 windows), so a client
    # that keeps hammering stays refused until it backs off: 10 s of quiet
    # brings it back to slowed, 20 s to normal. Each address is logged at
    # most once per window while it is slowed or refused.
    # At most _TABLE addresses are tracked; a new one pushes out the one
    # whose bucket is lowest, so a flood of source addresses cannot grow the
    # heap. Counters (for $SYS): slowed, refused.
    def __init__(self, rate, size=_TABLE):
        self.step = _WINDOW_MS // rate if rate else 0
        self.rate = rate
        self.size = size
        self.slowed = 0
        self.refused = 0
        # Per address, _FIELDS fields from slot * _FIELDS: level ms at the
        # last connection, its ticks_ms, ticks_ms of the last log line, kind
        # logged (1 slowed, 2 refused), refused since that line.
        self._t = AddrTable(size, _FIELDS)

    def _level(self, o, now):
        v = self._t.v
        d = time.ticks_diff(now, v[o + 1])
        if d < 0:  # the tick counter wrapped past the entry: long quiet
            return 0
        x = v[o] - d
        return x if x > 0 else 0

    def check(self, ip):
        # -> 0 to serve now, a delay in ms (> 0) to serve later, or -1 to
        # refuse.
        if not self.step:
            return 0
        now = time.ticks_ms()
        t = self._t
        i = t.find(ip)
        if i < 0:
            # Addresses whose bucket has drained are forgotten: a gateway's
            # sensors each connect now and then, and need no entry between.
            low = -1
            lv = 0
            for j in t.slots():
                x = self._level(j * _FIELDS, now)
                if x == 0:
                    t.remove(j)
                elif low < 0 or x < lv:
                    low = j
                    lv = x
            if len(t) >= self.size:
                t.remove(low)
            i = t.add(ip)
            t.v[i * _FIELDS + 1] = t.v[i * _FIELDS + 2] = now
        o = i * _FIELDS
        v = t.v
        level = self._level(o, now)
        w = _WINDOW_MS
        if level < 3 * w:
            level += self.step
        v[o] = level
        v[o + 1] = now
        if level <= w:
            v[o + 3] = 0  # back to normal: the next episode is logged again
            return 0
        kind = 1 if level <= 2 * w else 2
        if kind > v[o + 3] or time.ticks_diff(now, v[o + 2]) >= w:
            # Once per window, and again when it turns from slowed to refused.
            v[o + 2] = now
            if kind == 1:
                log.warning("connection rate from %s over %d per 10 s: slowing it", ip, self.rate)
            elif v[o + 3] == 2:
                log.warning("connection rate from %s over %d per 10 s: still refusing it (%d refused "
                            "since the last report)", ip, 2 * self.rate, v[o + 4])
            else:
                log.warning("connection rate from %s over %d per 10 s: refusing it", ip, 2 * self.rate)
            v[o + 3] = kind
            v[o + 4] = 0
        if kind == 1:
            self.slowed += 1
            ms = (level - w) * _SLOW_MAX_MS // w
            return ms if ms > 0 else 1
        self.refused += 1
        v[o + 4] += 1
        return -1

    def __len__(self):
        return len(self._t)


def listen(host, port, backlog=4):
    # A failure names the listener: the errno alone (EADDRINUSE, an
    # addrinfo error) did not say which of them, or which address.
    try:
        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(ai[-1])
        s.listen(backlog)
    except OSError as e:
        raise OSError("listener %s:%d: cannot listen there (%s)" % (host, port, e))
    s.setblocking(False)
    return s


def _admit(broker, cs):
    # One socket over max_connections is let in so that it can be told
    # "quota exceeded" in a CONNACK; past that, sockets are closed at once.
    # Bridge uplinks use sockets from the same lwIP pool, and so do
    # sockets waiting: Broker.sockets_left().
    if broker.sockets_left() < 0:
        return _FULL
    # The heap, as at CONNECT (room_for_newcomer), and a piece for the
    # poller's tables.
    sockets = len(broker.conns) + broker.conn_waiting
    if not room_for_newcomer(broker) or not broker.heap.room_for_socket(sockets):
        return "low memory (%d bytes free)" % gc.mem_free()
    return None


def _make_room(broker):
    # A full table makes room for a newcomer by closing a connection
    # without a session: one already closing (a refusal gone out, its
    # teardown still to run: a client told 0x97 that came straight back
    # found no socket), else the oldest one that is a second old: a socket
    # that sent no CONNECT yet, or a refused login whose answer the login
    # throttle holds back. Those held every client out before (an outside
    # probe): nine sockets that sent one byte, for the 10 s of
    # connect_timeout, or ten wrong passwords, each answered 30 s late. A
    # client whose CONNECT comes within the second keeps its place. With
    # none such, a socket a second into a WebSocket handshake goes, and
    # last a client the broker has held for over STUCK_MS (end_held): it
    # sees no EOF, so four WebSocket clients gone while their large
    # PUBLISHes waited for heap kept four of eight sockets, and of eight
    # sensors back at once after Wi-Fi dropped, the three past the one
    # socket over were refused (WebSocket fuzzing; freed at CONNECT only,
    # one slot came free per socket let in).
    now = time.ticks_ms()
    old = None
    for c in broker.conns:
        if c.session is not None:
            continue
        if c.closing:
            old = c
            break
        if time.ticks_diff(now, c.born) >= _NEWCOMER_MS and (old is None or time.ticks_diff(c.born, old.born) < 0):
            old = c
    if old is None:
        return _end_handshake(broker, now) or end_held(broker)
    log.debug("table full: closing %s, there %d ms without a session", old.t.peer,
              time.ticks_diff(now, old.born))
    old.linger_ms = 0  # a refusal held back goes now
    old.close_soon()
    broker.drop_connection(old)
    return True


def _end_handshake(broker, now):
    # Seven sockets on the WebSocket port that sent nothing held every
    # client out for connect_timeout (an outside probe): they wait outside
    # conns. The oldest that is a second old is ended: its task cancelled
    # (listeners.py closes the socket), and it no longer counts. Its entry
    # stays, None, until the task has ended (listeners.serve).
    hs = broker.handshakes
    old = None
    for task in hs:
        t0 = hs[task]
        if t0 is not None and time.ticks_diff(now, t0) >= _NEWCOMER_MS and (
                old is None or time.ticks_diff(t0, hs[old]) < 0):
            old = task
    if old is None:
        return False
    log.debug("table full: ending a handshake there %d ms", time.ticks_diff(now, hs[old]))
    hs[old] = None
    broker.conn_waiting -= 1
    old.cancel()
    return True


def _serve(broker, cs, peer, wrap):
    cs.setblocking(False)
    try:
        cs.setsockopt(6, 1, 1)  # TCP_NODELAY: no 40 ms Nagle stalls
    except OSError:
        pass
    n = broker.cfg["tcp_send_buffer"]
    if n:
        # The board twin's: a board's lwIP takes about 6 KB of output per
        # socket, a host kernel megabytes, which hid every queue that a
        # subscriber that stops reading makes on a board (README).
        try:
            cs.setsockopt(1, 7, n)  # SOL_SOCKET, SO_SNDBUF (Linux)
        except OSError:
            pass
    if wrap is not None:
        # Counted from here: the handshake may take connect_timeout. The
        # wrapper stops counting it once it is a Connection in conns.
        broker.conn_waiting += 1
        try:
            asyncio.create_task(wrap(broker, cs, peer))
        except BaseException:
            broker.conn_waiting -= 1
            raise
    else:
        c = Connection(broker, TcpTransport(cs, peer))
        broker.conns.append(c)
        try:
            asyncio.create_task(c.run())
        except BaseException:
            # No task will ever end it (MemoryError): out of the table.
            broker.conns.remove(c)
            raise


async def _serve_later(broker, cs, peer, wrap, ms):
    # A slowed connection: its CONNECT waits in the socket until then.
    try:
        await asyncio.sleep_ms(ms)
    finally:
        broker.conn_waiting -= 1
    try:
        _serve(broker, cs, peer, wrap)
    except Exception as e:
        _drop(cs)
        log.error("accept failed: %r", e)


def _drop(cs):
    # A socket not served: closing it must not end the accept loop.
    try:
        cs.close()
    except Exception:
        pass


def _limiter(broker):
    # One per broker, shared by all listeners. Its counters are
    # broker.conn_rate.slowed / .refused (refusals also count in
    # stats_refused).
    r = getattr(broker, "conn_rate", None)
    if r is None:
        r = broker.conn_rate = ConnRate(broker.cfg["max_connection_rate"])
        broker.conn_waiting = 0
    return r


async def accept_loop(broker, ls, wrap=None):
    # wrap(broker, sock, peer) -> coroutine serving the socket, for
    # transports that need a handshake first (TLS, WebSocket).
    rate = _limiter(broker)
    said = time.ticks_add(time.ticks_ms(), -_WINDOW_MS)  # when a refusal was last logged
    unsaid = 0  # refusals since, not logged
    while True:
        try:
            wait_io(ls, 0)
        except MemoryError:
            # Nothing is accepted until the heap has room again; the
            # clients already served go on.
            gc.collect()
            await asyncio.sleep_ms(_OOM_WAIT_MS)
            continue
        yield
        try:
            cs, addr = ls.accept()
        except OSError:
            continue
        try:
            peer = peer_str(addr)
            ms = rate.check(peer.rsplit(":", 1)[0])
            if ms < 0:
                broker.stats_refused += 1
                cs.close()
                continue
            why = _admit(broker, cs)
            if why is _FULL and _make_room(broker):
                why = _admit(broker, cs)
            if why is not None:
                broker.stats_refused += 1
                # Logged once per window (a flood of sockets must not flood
                # the log: on a board, its ring on flash), and before the
                # close, which the client may take as the end of it.
                # (0 <=: after a quiet spell of over 6.2 days the ticks
                # wrapped, the difference is negative, and nothing was
                # logged until as long again.)
                if 0 <= time.ticks_diff(time.ticks_ms(), said) < _WINDOW_MS:
                    unsaid += 1
                else:
                    log.warning("refused connection from %s: %s%s", peer, why,
                                " (and %d more since the last report)" % unsaid if unsaid else "")
                    said = time.ticks_ms()
                    unsaid = 0
                cs.close()
                continue
            if ms:
                broker.conn_waiting += 1
                try:
                    asyncio.create_task(_serve_later(broker, cs, peer, wrap, ms))
                except BaseException:
                    broker.conn_waiting -= 1
                    raise
                continue
            _serve(broker, cs, peer, wrap)
        except MemoryError:
            _drop(cs)
            gc.collect()
            broker.stats_refused += 1
            log.warning("refused a connection: out of memory")
        except Exception as e:
            _drop(cs)
            log.error("accept failed: %r", e)
