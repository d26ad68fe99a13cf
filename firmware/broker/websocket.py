# MQTT over WebSocket (RFC 6455) as a byte transport: WsTransport wraps any
# transport from transport.py and offers the same interface, so the MQTT code
# never knows. MQTT rides in binary messages as a plain byte stream: a packet
# may span frames and a frame may hold several packets (MQTT 3.1.1 and 5.0
# section 6: the receiver "MUST NOT assume that MQTT Control Packets are
# aligned on WebSocket frame boundaries"), so recv_into returns payload bytes
# with the framing stripped, as they arrive, and send() puts each call in one
# binary frame.
#
# Handshake, upgrade(): the caller reads the request with http.read_request
# (and checks the path), upgrade() validates it, answers 101 or an error, and
# returns a WsTransport or None. Failures answer 400 (RFC 6455 4.2.1), 405
# for a method other than GET, 426 with "Sec-WebSocket-Version: 13" for
# another or a missing version (4.4), 401 with a Basic challenge when
# check_basic (a coroutine function: user, password -> True to let in) is
# set and the credentials are missing or wrong.
#
# Subprotocols: MQTT clients must offer "mqtt" (MQTT 3.1.1 section 6, MQTT 5
# section 6); old clients offer "mqttv3.1". We answer with the first offered
# name that is in `protocols`. RFC 6455 4.2.2 lets a server that agrees to
# none of the offered names accept anyway without the header, but the client
# then has to give up (browsers and the Node `ws` client do), and mosquitto
# (libwebsockets) drops such clients too. So an offer with no match gets a
# clear 400 here. A client that offers nothing is accepted, without the
# header: the MQTT rule binds the client, and refusing helps nobody.
#
# Frames (section 5): client frames must be masked; no extension is ever
# negotiated, so reserved bits must be 0; text frames end the connection
# with 1003 since MQTT is binary only; control frames are at most 125 bytes
# and never fragmented; a ping gets a pong with the same payload; pongs are
# ignored; a close gets a close with the same code, then recv_into returns
# 0. A frame is never held whole: its payload goes to the caller as it
# arrives, so neither a frame nor a fragmented message has a size limit of
# our own; the MQTT reader bounds each packet by max_packet_size as on TCP.
# (A frame of 20 packets of 500 B, 10 KB in all, was refused with 1009 when
# frames were bounded by max_packet_size.) Only a length of 2**30 or more
# ends the connection with 1009: it would not fit a small int on a board,
# and no client sends one.
#
# Memory: per connection a few ints and one 32-byte buffer (receive header,
# its mask, send header). Payload is unmasked in place in the caller's
# buffer, never copied, the key phase carried from one read to the next;
# nothing is allocated from a length field; only ping and close payloads
# (at most 125 bytes, rare) get a buffer of their own.
#
# Writes: the reader answers pings and closes while a writer task may be in
# the middle of a frame, so frames are serialised by a busy bit. A second
# writer waits in short sleeps; that only happens when both sides want the
# socket at once, and it costs no heap the rest of the time, unlike a Lock.
import binascii
import hashlib
import micropython
from asyncio import sleep_ms
from micropython import const

from broker.http import respond, tokens
from mqtt.wire import utf8_valid

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_PROTOCOLS = ("mqtt", "mqttv3.1")

_OP_CONT = const(0)
_OP_TEXT = const(1)
_OP_BIN = const(2)
_OP_CLOSE = const(8)
_OP_PING = const(9)
_OP_PONG = const(10)

# Layout of the per-connection buffer.
_MASK = const(14)  # [0:14] receive header, [14:18] its masking key
_TX = const(18)  # [18:32] send header, plus a payload of up to 12 bytes
_BUFLEN = const(32)

# _st bits
_IN_MSG = const(1)  # a fragmented message is open
_RX_END = const(2)  # nothing more to read: recv_into returns 0
_TX_BUSY = const(4)  # a frame is being written
_TX_DEAD = const(8)  # close sent, or a write broke off mid-frame

_EPIPE = const(32)
_SPIN_MS = const(5)
# Frame headers read in one call (only frames without payload loop) between
# two turns for the other tasks.
_TURN_FRAMES = const(8)

CLOSE_NORMAL = const(1000)
CLOSE_PROTOCOL_ERROR = const(1002)
CLOSE_UNSUPPORTED_DATA = const(1003)
CLOSE_NO_STATUS = const(1005)
CLOSE_INVALID_DATA = const(1007)
CLOSE_TOO_BIG = const(1009)


def _unmask_py(buf, n, m, ph):
    # XOR buf[0:n] with the key in m[14:18], starting at key byte ph.
    k0 = m[_MASK + (ph & 3)]
    k1 = m[_MASK + ((ph + 1) & 3)]
    k2 = m[_MASK + ((ph + 2) & 3)]
    k3 = m[_MASK + ((ph + 3) & 3)]
    i = 0
    e = n - 3
    while i < e:
        buf[i] ^= k0
        buf[i + 1] ^= k1
        buf[i + 2] ^= k2
        buf[i + 3] ^= k3
        i += 4
    while i < n:
        buf[i] ^= m[_MASK + ((ph + i) & 3)]
        i += 1


_unmask = _unmask_py
# Viper unmasks about 20x faster. It is compiled from a string at import;
# where that fails (firmware without the viper emitter), the version above
# stays.
try:
    _g = {"micropython": micropython}
    exec(
        "@micropython.viper\n"
        "def f(buf, n: int, m, ph: int):\n"
        " b = ptr8(buf)\n"
        " k = ptr8(m)\n"
        " i = 0\n"
        " while i < n:\n"
        "  b[i] ^= k[14 + ((ph + i) & 3)]\n"
        "  i += 1\n",
        _g,
    )
    _unmask = _g["f"]
except Exception:
    pass
_g = None


def accept_key(key):
    # Sec-WebSocket-Accept for a Sec-WebSocket-Key (str or bytes).
    if isinstance(key, str):
        key = key.encode()
    return binascii.b2a_base64(hashlib.sha1(key + _GUID).digest()).strip().decode()


def _key_ok(key):
    # A valid key is base64 of 16 bytes: 22 alphabet characters and "==".
    if len(key) != 24 or not key.endswith("=="):
        return False
    for c in key[:22]:
        if not ("A" <= c <= "Z" or "a" <= c <= "z" or "0" <= c <= "9" or c in "+/"):
            return False
    try:
        return len(binascii.a2b_base64(key)) == 16
    except ValueError:
        return False


def _basic_credentials(value):
    # An Authorization header's Basic credentials as (user, password), or
    # None when it holds none.
    if not value:
        return None
    sp = value.find(" ")
    if sp < 0 or value[:sp].lower() != "basic":
        return None
    try:
        cred = str(binascii.a2b_base64(value[sp + 1 :].strip()), "utf-8")
    except (ValueError, UnicodeError):
        return None
    c = cred.find(":")
    if c < 0:
        return None
    return cred[:c], cred[c + 1 :]


async def _refuse(t, status, reason, extra=()):
    await respond(t, status, reason, extra + (("Connection", "close"),))


async def upgrade(t, req, protocols=_PROTOCOLS, check_basic=None):
    # req: what http.read_request returned. Returns a WsTransport, or None
    # after an error response; the caller then closes t. OSError from t
    # passes through.
    method, _path, h, extra = req
    if method != "GET":
        await _refuse(t, 405, "Method Not Allowed", (("Allow", "GET"),))
        return None
    if (
        "websocket" not in tokens(h.get("upgrade"))
        or "upgrade" not in tokens(h.get("connection"))
        or "host" not in h
    ):
        await _refuse(t, 400, "Bad Request")
        return None
    if h.get("sec-websocket-version") != "13":
        await _refuse(
            t,
            426,
            "Upgrade Required",
            (("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")),
        )
        return None
    key = h.get("sec-websocket-key", "")
    if not _key_ok(key):
        await _refuse(t, 400, "Bad Request")
        return None
    proto = None
    offered = h.get("sec-websocket-protocol")
    if offered:
        for p in offered.split(","):
            p = p.strip()
            if p in protocols:
                proto = p
                break
        if proto is None:
            await _refuse(t, 400, "Bad Request")
            return None
    if check_basic is not None:
        cred = _basic_credentials(h.get("authorization"))
        if cred is None or not await check_basic(cred[0], cred[1]):
            await _refuse(t, 401, "Unauthorized", (("WWW-Authenticate", 'Basic realm="mqtt"'),))
            return None
    hdrs = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_key(key)),
    ]
    if proto:
        hdrs.append(("Sec-WebSocket-Protocol", proto))
    await respond(t, 101, "Switching Protocols", hdrs)
    return WsTransport(t, extra)


class WsTransport:
    # t: the inner transport; extra: bytes that arrived behind the upgrade
    # request, read before the socket.
    def __init__(self, t, extra=None):
        self.t = t
        self._m = memoryview(bytearray(_BUFLEN))
        self._x = memoryview(extra) if extra else None
        self._left = 0  # payload bytes left in the current data frame
        self._ph = 0  # masking key index of the next payload byte
        self._st = 0
        self.close_sent = 0  # close code we sent: 0 none, 1005 one without code
        self.close_rcvd = 0  # close code the client sent (1005: no code)

    @property
    def peer(self):
        return self.t.peer

    async def recv_into(self, mv):
        empty = 0
        while not self._st & _RX_END:
            left = self._left
            if not left:
                # Control frames are handled in there and zero-length data
                # frames give nothing: loop until payload or the end.
                await self._header()
                empty += 1
                if empty >= _TURN_FRAMES:
                    # A read that finds bytes waiting returns at once, so
                    # a stream of empty frames or pongs never let another
                    # task run: one client that had not even logged in
                    # held every other client, keep-alive, the connect
                    # timeout and the watchdog for as long as it sent
                    # (hostile-input campaign: a 26 s stall).
                    empty = 0
                    await sleep_ms(0)
                continue
            n = len(mv)
            n = await self._recv(mv if n <= left else mv[:left])
            if not n:
                # TCP ended inside a frame: 1006, nobody to tell.
                self._st |= _RX_END
                return 0
            _unmask(mv, n, self._m, self._ph)
            self._ph = (self._ph + n) & 3
            self._left = left - n
            return n
        return 0

    async def _recv(self, buf):
        x = self._x
        if x is None:
            return await self.t.recv_into(buf)
        n = len(buf) if len(buf) < len(x) else len(x)
        buf[:n] = x[:n]
        self._x = x[n:] if n < len(x) else None
        return n

    async def _header(self):
        m = self._m
        # A masked header has at least 6 bytes, so asking for up to 6 never
        # takes payload; an unmasked one is refused on its first 2 bytes.
        got = 0
        while got < 2:
            n = await self._recv(m[got:6])
            if not n:
                self._st |= _RX_END
                return
            got += n
        b0 = m[0]
        b1 = m[1]
        op = b0 & 0x0F
        fin = b0 & 0x80
        n = b1 & 0x7F
        if not b1 & 0x80 or b0 & 0x70:
            return await self._fail(CLOSE_PROTOCOL_ERROR)
        if op >= _OP_CLOSE:
            if op > _OP_PONG or not fin or n > 125:
                return await self._fail(CLOSE_PROTOCOL_ERROR)
        elif op == _OP_TEXT:
            return await self._fail(CLOSE_UNSUPPORTED_DATA)
        elif op > _OP_BIN or (op == _OP_CONT) != bool(self._st & _IN_MSG):
            # Unknown opcode, a continuation with no message open, or a new
            # message inside an open one.
            return await self._fail(CLOSE_PROTOCOL_ERROR)
        hl = 6 if n < 126 else 8 if n == 126 else 14
        if got < hl and not await self._fill(m[got:hl]):
            self._st |= _RX_END
            return
        if n == 126:
            n = m[2] << 8 | m[3]
        elif n == 127:
            if m[2] & 0x80:
                return await self._fail(CLOSE_PROTOCOL_ERROR)
            if m[2] | m[3] | m[4] | m[5] or m[6] & 0xC0:
                # 2**30 or more: absurd, and too big for a small int.
                return await self._fail(CLOSE_TOO_BIG)
            n = m[6] << 24 | m[7] << 16 | m[8] << 8 | m[9]
        m[_MASK] = m[hl - 4]
        m[_MASK + 1] = m[hl - 3]
        m[_MASK + 2] = m[hl - 2]
        m[_MASK + 3] = m[hl - 1]
        if op >= _OP_CLOSE:
            return await self._control(op, n)
        if fin:
            self._st &= ~_IN_MSG
        else:
            self._st |= _IN_MSG
        self._left = n
        self._ph = 0

    async def _control(self, op, n):
        # n <= 125 was checked before this allocation.
        fr = bytearray(2 + n)
        p = memoryview(fr)[2:]
        if n and not await self._fill(p):
            self._st |= _RX_END
            return
        _unmask(p, n, self._m, 0)
        if op == _OP_PING:
            if not self._st & _TX_DEAD:
                fr[0] = 0x80 | _OP_PONG
                fr[1] = n
                await self._acquire()
                try:
                    await self.t.send(fr)
                except BaseException:
                    self._st |= _TX_DEAD
                    raise
                finally:
                    self._st &= ~_TX_BUSY
        elif op == _OP_CLOSE:
            if n == 0:
                self.close_rcvd = CLOSE_NO_STATUS
                await self._send_close(0)
            else:
                code = fr[2] << 8 | fr[3] if n >= 2 else 0
                self.close_rcvd = code
                if not _code_ok(code):
                    return await self._fail(CLOSE_PROTOCOL_ERROR)
                if not _utf8_ok(p[2:]):
                    # RFC 6455 8.1: the reason must be UTF-8.
                    return await self._fail(CLOSE_INVALID_DATA)
                await self._send_close(code)
            self._st |= _RX_END

    async def _fill(self, buf):
        # Fill buf exactly; False at end of stream.
        a = 0
        b = len(buf)
        while a < b:
            n = await self._recv(buf[a:])
            if not n:
                return False
            a += n
        return True

    async def _fail(self, code):
        # RFC 6455 7.1.7: fail the connection; the close frame is a courtesy.
        self._st |= _RX_END
        await self._send_close(code)

    async def _acquire(self):
        while self._st & _TX_BUSY:
            await sleep_ms(_SPIN_MS)
        if self._st & _TX_DEAD:
            raise OSError(_EPIPE)
        self._st |= _TX_BUSY

    def _close_frame(self, code):
        # Build a close frame in the send area; returns its length. code 0
        # means no status code.
        m = self._m
        m[_TX] = 0x80 | _OP_CLOSE
        if not code:
            m[_TX + 1] = 0
            return 2
        m[_TX + 1] = 2
        m[_TX + 2] = code >> 8
        m[_TX + 3] = code & 0xFF
        return 4

    async def _send_close(self, code):
        # Best effort: a peer that is gone or misbehaving doesn't get one.
        if self._st & _TX_DEAD:
            return
        try:
            await self._acquire()
        except OSError:
            return
        try:
            k = self._close_frame(code)
            self._st |= _TX_DEAD
            self.close_sent = code or CLOSE_NO_STATUS
            await self.t.send(self._m[_TX : _TX + k])
        except OSError:
            pass
        finally:
            self._st &= ~_TX_BUSY

    async def send(self, mv):
        # One binary frame; server frames are not masked.
        n = len(mv)
        await self._acquire()
        try:
            m = self._m
            m[_TX] = 0x80 | _OP_BIN
            if n < 126:
                m[_TX + 1] = n
                hl = 2
            elif n < 65536:
                m[_TX + 1] = 126
                m[_TX + 2] = n >> 8
                m[_TX + 3] = n & 0xFF
                hl = 4
            else:
                m[_TX + 1] = 127
                for i in range(8):
                    m[_TX + 9 - i] = (n >> (8 * i)) & 0xFF
                hl = 10
            if n <= _BUFLEN - _TX - hl:
                # Small packets (MQTT acks, PINGRESP) go out in one write.
                m[_TX + hl : _TX + hl + n] = mv
                await self.t.send(m[_TX : _TX + hl + n])
            else:
                await self.t.send(m[_TX : _TX + hl])
                await self.t.send(mv)
        except BaseException:
            # A frame cut short leaves the stream unframed: no more frames.
            self._st |= _TX_DEAD
            raise
        finally:
            self._st &= ~_TX_BUSY

    async def send_close(self, code=CLOSE_NORMAL):
        # Graceful close frame, waiting for the socket; call close() after.
        await self._send_close(code)

    def close(self, code=CLOSE_NORMAL):
        # Synchronous like every transport's close(). The close frame is one
        # non-blocking write straight to the socket when the inner transport
        # exposes it as .sock (TcpTransport does), skipped when a frame is
        # half written or a close was already sent.
        st = self._st
        self._st = st | _RX_END | _TX_DEAD
        if code and not st & (_TX_BUSY | _TX_DEAD):
            s = getattr(self.t, "sock", None)
            if s is not None:
                k = self._close_frame(code)
                self.close_sent = code
                try:
                    s.write(self._m[_TX : _TX + k])
                except Exception:
                    pass  # (a MemoryError for the slice too: the socket closes all the same)
        self.t.close()


def _code_ok(code):
    # Close codes a peer may send (RFC 6455 7.4, IANA registry).
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _utf8_ok(b):
    # RFC 3629 as wire.utf8_valid checks it: MicroPython's own decoder takes
    # encoded surrogates, overlong forms and code points past U+10FFFF.
    # U+0000, which that refuses for MQTT, may stand in a close reason: it
    # is read as a space (removed, the bytes around it joined up).
    b = bytes(b).replace(b"\0", b" ")
    return utf8_valid(b, 0, len(b))
