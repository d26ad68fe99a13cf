# Listeners that need a handshake before MQTT starts: TLS (a DER
# certificate and key, TLS 1.2 through MicroPython's tls module, client
# certificates optional) and WebSocket (HTTP upgrade on path /mqtt).
# Imported only when such a listener is configured, so a plain-TCP gateway
# carries none of it. A websockets listener also serves the dashboard page
# at a plain GET / (dashboard.py).
import asyncio
import time
from broker import log
from broker.transport import TcpTransport
from broker.tls import TlsTransport
from broker.conn import Connection
from broker.handle_connect import busy, login

_WS_PATHS = ("/mqtt", "/")
# {task: TcpTransport} of the TLS connections (on listeners with
# use_identity_as_username) whose client certificate has not been seen
# yet; module-wide, as tasks are unique, and not a closure cell of serve(),
# which would take a slot in every connection's frame.
_pending = {}


def _der(L, key):
    # DER only: the rp2 and unix ports before 1.29 cannot parse PEM.
    try:
        with open(L[key], "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError("listener on port %d: '%s' %s: %s" % (L["port"], key, L[key], e))


def _tls_context(L):
    try:
        import tls
    except ImportError:  # MicroPython 1.22: the same API, named ssl
        import ssl as tls

    ctx = tls.SSLContext(tls.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(_der(L, "certfile"), _der(L, "keyfile"))
        if L.get("require_certificate"):
            ctx.load_verify_locations(_der(L, "cafile"))
    except ValueError as e:
        raise ValueError("listener on port %d: %s (certfile, keyfile and cafile must be DER: "
                         "openssl x509|pkey -outform DER)" % (L["port"], e))
    if L.get("require_certificate"):
        # The handshake fails unless the client's certificate is signed by
        # the CA in cafile (Mosquitto: require_certificate).
        ctx.verify_mode = tls.CERT_REQUIRED
    if L.get("use_identity_as_username"):
        from broker.x509 import common_name

        def on_cert(cert, depth):
            # Called by the TLS library, inside a read of the socket whose
            # handshake it runs, for each certificate of the client's
            # chain (the client's own at depth 0) before it checks the
            # chain; a chain it refuses then fails the handshake, so the
            # name never reaches a CONNECT. The read runs in the task that
            # serves that socket: that is how the name finds its
            # connection. Must not raise.
            if depth == 0:
                try:
                    t = _pending.pop(asyncio.current_task(), None)
                    if t is not None:
                        t.cert_user = common_name(cert) or ""
                except Exception:
                    pass
            return 0

        try:
            ctx.verify_callback = on_cert
        except AttributeError:
            raise ValueError("listener on port %d: 'use_identity_as_username' needs MicroPython "
                             "1.23 or later (tls verify_callback)" % L["port"])
    return ctx


def wrapper(L, cfg):
    ctx = _tls_context(L) if "certfile" in L else None
    ws = L["protocol"] == "websockets"
    limit = cfg["max_tls_connections"]
    live = [0]  # TLS sessions open on this listener

    async def serve(broker, cs, peer):
        # The socket counts in broker.conn_waiting (server._serve) until it
        # is a Connection c in broker.conns, or a full table ends its
        # handshake (server._end_handshake). (Few locals: this coroutine
        # lives as long as the connection.)
        t = None
        c = None
        key = None  # this socket's entry in pending
        counted = False
        try:
            broker.handshakes[asyncio.current_task()] = time.ticks_ms()
            if ctx is not None:
                if live[0] >= limit:
                    # Each TLS session costs 20-25 KB (on Pico W from the
                    # Python heap): the board profile caps how many.
                    log.warning("refused TLS connection from %s: %d sessions open", peer, live[0])
                    broker.stats_refused += 1
                    cs.close()
                    return
                live[0] += 1
                counted = True
                t = ctx.wrap_socket(cs, server_side=True, do_handshake_on_connect=False)
                t = TlsTransport(t, peer)
                # After a failed handshake, closing the TLS socket leaves the
                # TCP socket open: the transport closes both.
                t.raw = cs
                if L.get("use_identity_as_username"):
                    # No user until the certificate callback names one.
                    t.cert_user = ""
            else:
                t = TcpTransport(cs, peer)
            if ws:
                key = asyncio.create_task(_upgrade(t, cfg, broker, L, peer))
                if t.cert_user is not None:
                    # The TLS handshake runs in the upgrade's first reads.
                    _pending[key] = t
                t = await asyncio.wait_for(key, cfg["connect_timeout"])
                # The handshake is over (a request was read): the task goes.
                _pending.pop(key, None)
                key = None
                if t is None:
                    return
            elif t.cert_user is not None:
                # The TLS handshake runs in the first reads of c.run(),
                # which runs in this task.
                key = asyncio.current_task()
                _pending[key] = t
            c = Connection(broker, t)
            broker.conn_waiting -= 1  # a socket of conns from here on
            del broker.handshakes[asyncio.current_task()]
            broker.conns.append(c)
            await c.run()
        except asyncio.CancelledError:
            # Its handshake ended for a newcomer (server._end_handshake),
            # or the broker stops.
            _close(t, cs)
        except Exception as e:
            if c is not None:
                # c.run() never started (MemoryError): no teardown of its
                # own will take it out of the table.
                broker.drop_connection(c)
            log.info("handshake with %s failed: %r", peer, e)
            _close(t, cs)
        finally:
            if key is not None:
                _pending.pop(key, None)
            # (None: a full table ended it, and counted it off already; 0:
            # it was never entered, the dict had no heap to grow.)
            if c is None and broker.handshakes.pop(asyncio.current_task(), 0) is not None:
                broker.conn_waiting -= 1
            if counted:
                live[0] -= 1

    return serve


def _close(t, cs):
    # The transport if there is one (after a failed TLS handshake, closing
    # the TLS socket leaves the TCP one open: the transport closes both).
    if t is not None:
        t.close()
    else:
        try:
            cs.close()
        except Exception:
            pass


def _basic_checker(L, broker, peer):
    # "http_basic": true asks for HTTP Basic credentials on the WebSocket
    # upgrade, checked as an MQTT CONNECT's are (handle_connect.login: the
    # same password file and login throttle); a refusal is held back as
    # long as a CONNACK's would be.
    if not L.get("http_basic"):
        return None

    async def check(user, password):
        wait = await login(broker, peer, user, password)
        if wait < 0:
            return True
        await asyncio.sleep_ms(wait)
        return False

    return check


async def _upgrade(t, cfg, broker, L, peer):
    from broker import http, websocket

    basic = _basic_checker(L, broker, peer)
    buf = bytearray(1024)  # request head limit; browsers send ~500 B
    req = await http.read_request(t, buf)
    buf = None
    if req is None:
        t.close()
        return None
    path = req[1]
    q = path.find("?")
    query = path[q + 1 :] if q >= 0 else ""
    if q >= 0:
        path = path[:q]
    if path == "/" and "upgrade" not in req[2]:
        # A browser asking for the page rather than a WebSocket.
        from broker import dashboard

        await dashboard.serve_page(t, req)
        dashboard.ensure(broker)
        t.close()
        return None
    if path not in _WS_PATHS:
        await http.respond(t, 404, "Not Found", (("Connection", "close"),))
        t.close()
        return None
    if basic is not None and busy(broker, None) is not None:
        # No room for another client: say so before hashing a password.
        await http.respond(t, 503, "Service Unavailable", (("Connection", "close"),))
        t.close()
        return None
    w = await websocket.upgrade(t, req, check_basic=basic)
    if w is None:
        t.close()
        return None
    if t.cert_user is not None:
        w.cert_user = t.cert_user  # wss:// with use_identity_as_username
    if query == "dashboard":
        # The page's own connection (after a broker restart the page
        # reconnects without fetching itself again).
        from broker import dashboard

        dashboard.ensure(broker)
    return w
