# WebSocket echo server for host tests, run by the MicroPython unix port:
#   MICROPYPATH=.frozen:lib:firmware micropython mp_ws_echo.py PORT [--py-unmask]
# Prints "READY py" or "READY native" (which unmask loop runs) once listening. Every byte received through a WsTransport
# is sent back in a binary frame of its own (one frame per recv_into).
# Paths: /auth wants Basic user:pass, /heap
# answers 200 with gc.mem_alloc() after a collection, anything else is an
# echo. On each end of a connection it prints
# "END close_sent close_rcvd"; an unexpected exception prints "ERR ...".
import gc
import socket
import sys

import asyncio
from asyncio import core

from broker import http, websocket
from broker.transport import TcpTransport, peer_str

if "--py-unmask" in sys.argv:
    websocket._unmask = websocket._unmask_py


async def _check(user, password):
    return user == "user" and password == "pass"


async def handle(sock, addr):
    t = TcpTransport(sock, peer_str(addr))
    ws = None
    buf = bytearray(1024)
    try:
        req = await asyncio.wait_for(http.read_request(t, buf), 10)
        if req is None:
            return
        path = req[1]
        if path == "/heap":
            gc.collect()
            await http.respond(t, 200, "OK", (("Connection", "close"),), str(gc.mem_alloc()))
            return
        ws = await websocket.upgrade(
            t,
            req,
            check_basic=_check if path == "/auth" else None,
        )
        # The parsed head (headers dict, strings) would otherwise live as
        # long as this coroutine: about 1 KB per connection.
        req = None
        if ws is None:
            return
        mv = memoryview(buf)
        while True:
            n = await ws.recv_into(mv)
            if not n:
                break
            await ws.send(mv[:n])
    except asyncio.TimeoutError:
        print("TIMEOUT")
    except OSError as e:
        print("OSERROR", e)
    except Exception as e:
        print("ERR", repr(e))
        sys.print_exception(e)
    finally:
        if ws is not None:
            ws.close()
            print("END", ws.close_sent, ws.close_rcvd)
        else:
            t.close()


async def serve(port):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    ls.listen(16)
    ls.setblocking(False)
    print("READY", "py" if websocket._unmask is websocket._unmask_py else "native")
    while True:
        yield core._io_queue.queue_read(ls)
        try:
            s, addr = ls.accept()
        except OSError:
            continue
        s.setblocking(False)
        s.setsockopt(6, 1, 1)  # TCP_NODELAY
        asyncio.create_task(handle(s, addr))


asyncio.run(serve(int(sys.argv[1])))
