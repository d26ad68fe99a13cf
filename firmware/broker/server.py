# Listening sockets and our own accept loop. asyncio.start_server is not
# used: a MemoryError inside its accept loop kills the loop for good and
# new clients then hang in the backlog (PLATFORM.md). Here every accept is
# guarded, and a connection is refused while the heap is short.
import asyncio
import gc
import socket
from asyncio import core
from broker import log
from broker.transport import TcpTransport, peer_str
from broker.conn import Connection


def listen(host, port, backlog=4):
    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    s = socket.socket(ai[0], socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(ai[-1])
    s.listen(backlog)
    s.setblocking(False)
    return s


def _admit(broker, cs):
    # One socket over max_connections is let in so that it can be told
    # "quota exceeded" in a CONNACK; past that, sockets are closed at once.
    cfg = broker.cfg
    # Bridge uplinks use sockets from the same lwIP pool.
    if len(broker.conns) + len(cfg["bridges"]) > cfg["max_connections"]:
        return "too many sockets"
    if gc.mem_free() < cfg["min_free_heap"]:
        gc.collect()
        if gc.mem_free() < cfg["min_free_heap"]:
            return "low memory (%d bytes free)" % gc.mem_free()
    return None


async def accept_loop(broker, ls, wrap=None):
    # wrap(broker, sock, peer) -> coroutine serving the socket, for
    # transports that need a handshake first (TLS, WebSocket).
    while True:
        yield core._io_queue.queue_read(ls)
        try:
            cs, addr = ls.accept()
        except OSError:
            continue
        try:
            peer = peer_str(addr)
            why = _admit(broker, cs)
            if why is not None:
                broker.stats_refused += 1
                log.warning("refused connection from %s: %s", peer, why)
                cs.close()
                continue
            cs.setblocking(False)
            try:
                cs.setsockopt(6, 1, 1)  # TCP_NODELAY: no 40 ms Nagle stalls
            except OSError:
                pass
            if wrap is not None:
                asyncio.create_task(wrap(broker, cs, peer))
            else:
                c = Connection(broker, TcpTransport(cs, peer))
                broker.conns.append(c)
                asyncio.create_task(c.run())
        except MemoryError:
            try:
                cs.close()
            except Exception:
                pass
            gc.collect()
            broker.stats_refused += 1
            log.warning("refused a connection: out of memory")
        except Exception as e:
            try:
                cs.close()
            except Exception:
                pass
            log.error("accept failed: %r", e)
