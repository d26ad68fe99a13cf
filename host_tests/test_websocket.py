"""MQTT-over-WebSocket transport (firmware/broker/websocket.py, http.py).

A MicroPython echo server (mp_ws_echo.py) runs under the unix port with a
110 KB heap; each test talks to it over a raw socket with hand-made frames
and checks the exact bytes that come back. After every test a fresh, well
behaved client must still get its echo. A few checks run MicroPython
snippets against a fake inner transport (heap cost, frame serialisation),
and one runs the Node `ws` client against the server.
"""
import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import time

import pytest

from conftest import free_port, node_env, node_ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "host_tests")
NODE_DIR = os.path.join(HERE, "node")
# The board twin (conftest builds it first), with the code frozen into it.
from conftest import MICROPYTHON as _TWIN  # noqa: E402
MICROPYTHON = str(_TWIN)
MP_ENV = dict(os.environ, MICROPYPATH=".frozen")
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

OP_CONT, OP_TEXT, OP_BIN, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


# ---------------------------------------------------------------- server


class Server:
    def __init__(self, log, *args):
        self.port = free_port()
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(
            [MICROPYTHON, "-X", "heapsize=110K", os.path.join(HERE, "mp_ws_echo.py"), str(self.port)] + list(args),
            cwd=ROOT,
            env=MP_ENV,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 15
        while self.ready() is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("echo server did not start:\n" + self.output().decode())
            time.sleep(0.02)

    def ready(self):
        # Its whole READY line, once there: print() writes each argument
        # on its own, so "READY" came a moment before "py" (a fixture that
        # looked then found no "READY py", once, on a busy machine).
        for line in self.output().splitlines(keepends=True):
            if line.startswith(b"READY") and line.endswith(b"\n"):
                return line.rstrip()
        return None

    def output(self):
        with open(self.log, "rb") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(str(tmp_path_factory.mktemp("ws") / "echo.log"))
    try:
        assert srv.ready() == b"READY native"  # the viper unmask compiled
        yield srv
    finally:
        srv.stop()  # (a failed check above left it running)
    out = srv.output().decode()
    assert not [l for l in out.splitlines() if l.startswith("ERR ")] and "Traceback" not in out, out


@pytest.fixture(scope="module")
def py_server(tmp_path_factory):
    srv = Server(str(tmp_path_factory.mktemp("wspy") / "echo.log"), "--py-unmask")
    try:
        assert srv.ready() == b"READY py"
        yield srv
    finally:
        srv.stop()
    out = srv.output().decode()
    assert not [l for l in out.splitlines() if l.startswith("ERR ")] and "Traceback" not in out, out


@pytest.fixture(autouse=True)
def fresh_client_still_works(request):
    # Every case, hostile or not, must leave the server serving others.
    yield
    if "server" in request.fixturenames:
        assert_echo_works(request.getfixturevalue("server").port)


# ---------------------------------------------------------------- client


def mask_bytes(payload, key):
    return bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def frame(op, payload=b"", fin=True, mask=True, rsv=0, length=None, key=None):
    n = len(payload) if length is None else length
    out = bytearray([(0x80 if fin else 0) | (rsv << 4) | op])
    mbit = 0x80 if mask else 0
    if n < 126:
        out.append(mbit | n)
    elif n < 65536:
        out.append(mbit | 126)
        out += struct.pack(">H", n)
    else:
        out.append(mbit | 127)
        out += struct.pack(">Q", n)
    if mask:
        key = os.urandom(4) if key is None else key
        out += key
        payload = mask_bytes(payload, key)
    return bytes(out) + payload


def request(
    path="/mqtt",
    method="GET",
    key=RFC_KEY,
    version="13",
    protocol="mqtt",
    upgrade="websocket",
    connection="Upgrade",
    host="127.0.0.1",
    extra=(),
):
    lines = ["%s %s HTTP/1.1" % (method, path)]
    for name, value in (
        ("Host", host),
        ("Upgrade", upgrade),
        ("Connection", connection),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
        ("Sec-WebSocket-Protocol", protocol),
    ):
        if value is not None:
            lines.append("%s: %s" % (name, value))
    lines += ["%s: %s" % kv for kv in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def close(self):
        self.sock.close()

    def _more(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def recv_exact(self, n):
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self):
        # -> (status, headers with lowercased names, body)
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = self.recv_exact(int(headers.get("content-length", "0")))
        return status, headers, body

    def read_frame(self):
        b0, b1 = self.recv_exact(2)
        assert not b1 & 0x80, "server frames must not be masked"
        assert not b0 & 0x70, "server set reserved bits"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self.recv_exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self.recv_exact(8))[0]
        return bool(b0 & 0x80), b0 & 0x0F, self.recv_exact(n)

    def read_data(self, n):
        # The server echoes a byte stream: collect n bytes of binary frames.
        out = b""
        while len(out) < n:
            fin, op, payload = self.read_frame()
            assert op == OP_BIN and fin, (op, fin)
            out += payload
        assert len(out) == n
        return out

    def expect_close(self, code):
        # Next frame is a close with `code` (None: empty payload), then the
        # server ends TCP.
        fin, op, payload = self.read_frame()
        assert (fin, op) == (True, OP_CLOSE), (fin, op, payload)
        if code is None:
            assert payload == b""
        else:
            assert struct.unpack(">H", payload[:2])[0] == code, payload
        self.expect_eof()

    def expect_eof(self):
        try:
            assert self.sock.recv(1) == b""
        except ConnectionResetError:
            pass


def ws_client(port, **kw):
    c = Client(port)
    c.send(request(**kw))
    status, headers, _ = c.response()
    assert status == 101, (status, headers)
    return c


def assert_echo_works(port):
    c = ws_client(port)
    data = os.urandom(50)
    c.send(frame(OP_BIN, data))
    assert c.read_data(50) == data
    c.send(frame(OP_CLOSE, struct.pack(">H", 1000)))
    c.expect_close(1000)
    c.close()


def refused(port, raw):
    c = Client(port)
    c.send(raw)
    status, headers, body = c.response()
    c.expect_eof()
    c.close()
    return status, headers


# ---------------------------------------------------------------- handshake


def test_upgrade_returns_accept_key_from_rfc_example(server):
    assert base64.b64encode(hashlib.sha1(RFC_KEY.encode() + GUID).digest()).decode() == RFC_ACCEPT
    c = Client(server.port)
    c.send(request())
    status, headers, body = c.response()
    assert status == 101
    assert headers["sec-websocket-accept"] == RFC_ACCEPT
    assert headers["upgrade"].lower() == "websocket"
    assert "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-protocol"] == "mqtt"
    assert "sec-websocket-extensions" not in headers
    assert "content-length" not in headers and body == b""
    c.close()


def test_random_key_gets_matching_accept(server):
    key = base64.b64encode(os.urandom(16)).decode()
    c = Client(server.port)
    c.send(request(key=key))
    status, headers, _ = c.response()
    assert status == 101
    assert headers["sec-websocket-accept"] == base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    c.close()


def test_first_offered_known_subprotocol_is_chosen(server):
    c = Client(server.port)
    c.send(request(protocol="foo, mqttv3.1, mqtt"))
    status, headers, _ = c.response()
    assert status == 101 and headers["sec-websocket-protocol"] == "mqttv3.1"
    c.close()


def test_subprotocols_in_repeated_headers_are_combined(server):
    c = Client(server.port)
    c.send(request(protocol="chat", extra=[("Sec-WebSocket-Protocol", "mqtt")]))
    status, headers, _ = c.response()
    assert status == 101 and headers["sec-websocket-protocol"] == "mqtt"
    c.close()


def test_no_subprotocol_offered_is_accepted_without_header(server):
    c = Client(server.port)
    c.send(request(protocol=None))
    status, headers, _ = c.response()
    assert status == 101 and "sec-websocket-protocol" not in headers
    c.close()


def test_only_unknown_subprotocols_get_400(server):
    status, headers = refused(server.port, request(protocol="chat, MQTT"))
    assert status == 400


def test_missing_version_gets_426(server):
    status, headers = refused(server.port, request(version=None))
    assert status == 426 and headers["sec-websocket-version"] == "13"


def test_other_version_gets_426(server):
    status, headers = refused(server.port, request(version="8"))
    assert status == 426 and headers["sec-websocket-version"] == "13"


@pytest.mark.parametrize(
    "key",
    [
        None,
        "",
        "dGhlIHNhbXBsZSBub25jZQ",  # no padding
        "dGhlIHNhbXBsZSBub25j",  # 15 bytes
        base64.b64encode(os.urandom(20)).decode(),
        "dGhlIHNhbXBsZSBub25j!Q==",  # not base64
        "!!!!!!!!!!!!!!!!!!!!!!==",
    ],
)
def test_bad_key_gets_400(server, key):
    status, _ = refused(server.port, request(key=key))
    assert status == 400


def test_missing_upgrade_header_gets_400(server):
    assert refused(server.port, request(upgrade=None))[0] == 400


def test_upgrade_to_other_protocol_gets_400(server):
    assert refused(server.port, request(upgrade="h2c"))[0] == 400


def test_connection_without_upgrade_token_gets_400(server):
    assert refused(server.port, request(connection="keep-alive"))[0] == 400


def test_missing_host_gets_400(server):
    assert refused(server.port, request(host=None))[0] == 400


def test_header_tokens_are_case_insensitive_and_listed(server):
    c = Client(server.port)
    c.send(request(upgrade="WebSocket", connection="keep-alive, UPGRADE"))
    assert c.response()[0] == 101
    c.close()


def test_header_names_are_case_insensitive(server):
    raw = request().replace(b"Sec-WebSocket-Key", b"sec-websocket-KEY").replace(b"Upgrade:", b"UPGRADE:")
    c = Client(server.port)
    c.send(raw)
    status, headers, _ = c.response()
    assert status == 101 and headers["sec-websocket-accept"] == RFC_ACCEPT
    c.close()


def test_post_gets_405(server):
    status, headers = refused(server.port, request(method="POST"))
    assert status == 405 and headers["allow"] == "GET"


def test_request_head_bigger_than_buffer_gets_431(server):
    raw = request(extra=[("X-Filler", "a" * 1200)])
    c = Client(server.port)
    try:
        c.send(raw)
    except ConnectionResetError:
        pass
    status, _, _ = c.response()
    assert status == 431
    c.expect_eof()
    c.close()


def test_a_431_ends_in_a_clean_close_not_a_reset(server):
    # The server reads 1 KB of a 60 KB head and answers 431. Closed with
    # the rest unread, its socket sent a reset, which a client's TCP may
    # take for a reason to drop the 431 unread (Windows' does). The rest is
    # now read and dropped until the client closes, or for half a second.
    c = Client(server.port)
    c.send(request(extra=[("X-Filler", "a" * 60000)]))
    status, _, _ = c.response()
    assert status == 431
    assert c.sock.recv(1) == b""  # a FIN: ConnectionResetError before
    c.close()


def test_request_head_arriving_byte_by_byte_is_accepted(server):
    c = Client(server.port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i, b in enumerate(request()):
        c.send(bytes([b]))
        if i % 16 == 0:
            time.sleep(0.002)
    assert c.response()[0] == 101
    data = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
    c.send(frame(OP_BIN, data))
    assert c.read_data(len(data)) == data
    c.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /mqtt\r\nHost: x\r\n\r\n",
        b"GET  /mqtt HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /mqtt HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET /mqtt HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /mqtt HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET /mqtt FTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /mqtt HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    ],
)
def test_malformed_request_gets_400(server, raw):
    assert refused(server.port, raw)[0] == 400


def test_http2_request_line_gets_505(server):
    assert refused(server.port, b"GET /mqtt HTTP/2.0\r\nHost: x\r\n\r\n")[0] == 505


def test_client_leaving_during_request_head_is_harmless(server):
    c = Client(server.port)
    c.send(request()[:40])
    c.close()


def test_basic_auth_required_gets_401(server):
    status, headers = refused(server.port, request(path="/auth"))
    assert status == 401 and headers["www-authenticate"] == 'Basic realm="mqtt"'


@pytest.mark.parametrize(
    "value",
    [
        "Basic " + base64.b64encode(b"user:wrong").decode(),
        "Basic " + base64.b64encode(b"nobody:pass").decode(),
        "Basic " + base64.b64encode(b"userpass").decode(),
        "Basic !!!not-base64",
        "Bearer " + base64.b64encode(b"user:pass").decode(),
    ],
)
def test_basic_auth_wrong_credentials_get_401(server, value):
    status, headers = refused(server.port, request(path="/auth", extra=[("Authorization", value)]))
    assert status == 401 and headers["www-authenticate"] == 'Basic realm="mqtt"'


def test_basic_auth_right_credentials_upgrade(server):
    cred = "basic " + base64.b64encode(b"user:pass").decode()
    c = ws_client(server.port, path="/auth", extra=[("Authorization", cred)])
    c.send(frame(OP_BIN, b"\xc0\x00"))
    assert c.read_data(2) == b"\xc0\x00"
    c.close()


def test_frame_pipelined_behind_upgrade_request_is_not_lost(server):
    data = os.urandom(40)
    c = Client(server.port)
    c.send(request() + frame(OP_BIN, data[:10]) + frame(OP_BIN, data[10:]))
    assert c.response()[0] == 101
    assert c.read_data(40) == data
    c.close()


# ---------------------------------------------------------------- frames


def test_unmasked_frame_closes_1002(server):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, b"abcd", mask=False))
    c.expect_close(1002)
    c.close()


@pytest.mark.parametrize("rsv", [1, 2, 4])
def test_reserved_bits_close_1002(server, rsv):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, b"", rsv=rsv))
    c.expect_close(1002)
    c.close()


@pytest.mark.parametrize("op", [3, 7, 0xB, 0xF])
def test_bad_opcode_closes_1002(server, op):
    c = ws_client(server.port)
    c.send(frame(op, b""))
    c.expect_close(1002)
    c.close()


def test_text_frame_closes_1003(server):
    c = ws_client(server.port)
    c.send(frame(OP_TEXT, b"hi")[:6])
    c.expect_close(1003)
    c.close()


def test_control_frame_over_125_bytes_closes_1002(server):
    c = ws_client(server.port)
    c.send(frame(OP_PING, b"p" * 126)[:6])
    c.expect_close(1002)
    c.close()


def test_fragmented_control_frame_closes_1002(server):
    c = ws_client(server.port)
    c.send(frame(OP_PING, b"", fin=False))
    c.expect_close(1002)
    c.close()


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))])
def test_ping_gets_pong_with_same_payload(server, payload):
    c = ws_client(server.port)
    c.send(frame(OP_PING, payload))
    assert c.read_frame() == (True, OP_PONG, payload)
    c.send(frame(OP_BIN, b"after"))
    assert c.read_data(5) == b"after"
    c.close()


def test_pong_is_ignored(server):
    c = ws_client(server.port)
    c.send(frame(OP_PONG, b"unsolicited") + frame(OP_BIN, b"x"))
    assert c.read_frame() == (True, OP_BIN, b"x")
    c.close()


def test_close_is_echoed_with_same_code_then_tcp_closes(server):
    c = ws_client(server.port)
    c.send(frame(OP_CLOSE, struct.pack(">H", 4001) + "adiós".encode()))
    c.expect_close(4001)
    c.close()


def test_empty_close_is_echoed_empty(server):
    c = ws_client(server.port)
    c.send(frame(OP_CLOSE, b""))
    c.expect_close(None)
    c.close()


@pytest.mark.parametrize(
    "payload",
    [b"\x03", struct.pack(">H", 999), struct.pack(">H", 1005), struct.pack(">H", 1006),
     struct.pack(">H", 1015), struct.pack(">H", 2000), struct.pack(">H", 5000)],
)
def test_close_with_invalid_code_closes_1002(server, payload):
    c = ws_client(server.port)
    c.send(frame(OP_CLOSE, payload))
    c.expect_close(1002)
    c.close()


@pytest.mark.parametrize("reason", [b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80",
                                    b"\xc3\x00\xa9"],
                         ids=["truncated", "surrogate", "overlong-2", "overlong-3", "past-10ffff", "split-by-nul"])
def test_close_with_invalid_utf8_reason_closes_1007(server, reason):
    # RFC 6455 8.1; MicroPython's own decoder takes all but the first.
    c = ws_client(server.port)
    c.send(frame(OP_CLOSE, struct.pack(">H", 1000) + reason))
    c.expect_close(1007)
    c.close()


def test_close_with_a_utf8_reason_holding_u0000_is_echoed(server):
    c = ws_client(server.port)
    c.send(frame(OP_CLOSE, struct.pack(">H", 1000) + b"bye\x00 \xc3\xa9"))
    c.expect_close(1000)
    c.close()


def test_a_frame_far_longer_than_the_read_buffer_is_streamed(server):
    # MQTT over WebSocket (MQTT 3.1.1 and 5.0 section 6): a frame may carry
    # many packets, so its length is not bounded by the packet limit. Its
    # payload comes out through the server's 1 KiB buffer as it arrives,
    # unmasked across reads.
    c = ws_client(server.port)
    data = os.urandom(200000)
    c.send(frame(OP_BIN, data))
    assert c.read_data(len(data)) == data
    c.close()


def test_a_fragmented_message_far_longer_than_the_read_buffer_is_streamed(server):
    c = ws_client(server.port)
    parts = [os.urandom(n) for n in (200, 60000, 3, 70000)]
    c.send(frame(OP_BIN, parts[0], fin=False))
    assert c.read_data(200) == parts[0]  # streamed, not held back
    c.send(frame(OP_CONT, parts[1], fin=False) + frame(OP_PING, b"between") + frame(OP_CONT, parts[2], fin=False))
    got = b""
    pong = False
    while len(got) < 60003 or not pong:
        fin, op, payload = c.read_frame()
        if op == OP_PONG:
            assert payload == b"between"
            pong = True
        else:
            assert op == OP_BIN
            got += payload
    assert got == parts[1] + parts[2]
    c.send(frame(OP_CONT, parts[3]))
    assert c.read_data(70000) == parts[3]
    c.close()


def test_64bit_length_just_under_2_to_the_30_is_accepted(server):
    # Only the header and a few bytes: they are echoed, nothing is held
    # for the rest.
    c = ws_client(server.port)
    key = os.urandom(4)
    c.send(frame(OP_BIN, length=(1 << 30) - 1, key=key)[:14] + mask_bytes(b"abcdef", key))
    assert c.read_data(6) == b"abcdef"
    c.close()


@pytest.mark.parametrize("n", [1 << 30, 1 << 31, 1 << 40])
def test_huge_64bit_length_closes_1009(server, n):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, length=n)[:14])
    c.expect_close(1009)
    c.close()


def test_64bit_length_with_top_bit_set_closes_1002(server):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, length=1 << 63)[:14])
    c.expect_close(1002)
    c.close()


def test_fragmented_message_is_reassembled_in_order(server):
    c = ws_client(server.port)
    parts = [os.urandom(n) for n in (7, 1, 300, 0, 42)]
    raw = frame(OP_BIN, parts[0], fin=False)
    raw += b"".join(frame(OP_CONT, p, fin=False) for p in parts[1:-1])
    raw += frame(OP_CONT, parts[-1])
    c.send(raw)
    want = b"".join(parts)
    assert c.read_data(len(want)) == want
    c.close()


def test_ping_between_fragments_is_answered(server):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, b"abc", fin=False))
    assert c.read_data(3) == b"abc"
    c.send(frame(OP_PING, b"mid"))
    assert c.read_frame() == (True, OP_PONG, b"mid")
    c.send(frame(OP_CONT, b"def"))
    assert c.read_data(3) == b"def"
    c.close()


def test_continuation_without_open_message_closes_1002(server):
    c = ws_client(server.port)
    c.send(frame(OP_CONT, b""))
    c.expect_close(1002)
    c.close()


def test_new_message_inside_open_message_closes_1002(server):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, b"ab", fin=False))
    assert c.read_data(2) == b"ab"
    c.send(frame(OP_BIN, b""))
    c.expect_close(1002)
    c.close()


def test_bytes_split_across_many_frames(server):
    # An MQTT CONNECT sent one byte per frame comes out as the same stream.
    connect = b"\x10\x16\x00\x04MQTT\x04\x02\x00\x3c\x00\x0aclient-one"
    c = ws_client(server.port)
    c.send(b"".join(frame(OP_BIN, connect[i : i + 1]) for i in range(len(connect))))
    assert c.read_data(len(connect)) == connect
    c.close()


def test_several_packets_in_one_frame(server):
    packets = b"\x30\x07\x00\x03a/bhi" * 5 + b"\xc0\x00" + b"\x82\x06\x00\x01\x00\x01#\x00"
    c = ws_client(server.port)
    c.send(frame(OP_BIN, packets))
    assert c.read_data(len(packets)) == packets
    c.close()


def test_close_in_middle_of_message(server):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, b"half", fin=False))
    assert c.read_data(4) == b"half"
    c.send(frame(OP_CLOSE, struct.pack(">H", 1001)))
    c.expect_close(1001)
    c.close()


@pytest.mark.parametrize("n", [126, 300, 65535])
def test_16bit_length_frame(server, n):
    c = ws_client(server.port)
    data = os.urandom(n)
    c.send(frame(OP_BIN, data))
    assert c.read_data(n) == data
    c.close()


def test_64bit_length_frame(server):
    c = ws_client(server.port)
    data = os.urandom(70000)
    raw = frame(OP_BIN, data)
    assert raw[1] & 0x7F == 127
    c.send(raw)
    assert c.read_data(70000) == data
    c.close()


def test_zero_length_frames_are_skipped(server):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, b"") + frame(OP_BIN, b"") + frame(OP_BIN, b"z"))
    assert c.read_data(1) == b"z"
    c.close()


def test_frame_header_arriving_byte_by_byte(server):
    # A 16-bit-length header (8 bytes) and 3 payload bytes, one byte per
    # TCP segment, then the rest: unmasking resumes at key byte 3.
    c = ws_client(server.port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = os.urandom(300)
    raw = frame(OP_BIN, data)
    for b in raw[:11]:
        c.send(bytes([b]))
        time.sleep(0.002)
    c.send(raw[11:])
    assert c.read_data(300) == data
    c.close()


def test_tcp_close_mid_frame_is_harmless(server):
    c = ws_client(server.port)
    c.send(frame(OP_BIN, b"x" * 100)[:50])
    c.close()


def test_server_keeps_serving_after_bad_client(server):
    bad = [
        frame(OP_BIN, b"abcd", mask=False),
        frame(OP_TEXT, b"")[:6],
        frame(7, b""),
        frame(OP_BIN, length=1 << 40)[:14],
        b"\xff" * 6,
    ]
    for raw in bad * 4:
        c = ws_client(server.port)
        c.send(raw)
        fin, op, _ = c.read_frame()
        assert op == OP_CLOSE
        c.close()
    for _ in range(10):
        c = Client(server.port)
        c.send(b"GARBAGE\r\n\r\n")
        assert c.response()[0] == 400
        c.close()
    assert_echo_works(server.port)


def test_many_clients_at_once(server):
    clients = [ws_client(server.port) for _ in range(8)]
    datas = [os.urandom(1000) for _ in clients]
    for c, d in zip(clients, datas):
        c.send(frame(OP_BIN, d))
    for c, d in zip(clients, datas):
        assert c.read_data(1000) == d
    for c in clients:
        c.send(frame(OP_CLOSE, struct.pack(">H", 1000)))
        c.expect_close(1000)
        c.close()


def test_bytecode_unmask_matches_at_every_key_phase(py_server):
    # The pure-Python unmask (boards without the native emitter) over
    # lengths that end at every phase of the 4-byte key, split in reads.
    c = ws_client(py_server.port)
    for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 1023, 1024, 1025, 3001):
        data = os.urandom(n)
        c.send(frame(OP_BIN, data))
        assert c.read_data(n) == data
    data = os.urandom(70000)
    c.send(frame(OP_BIN, data))
    assert c.read_data(70000) == data
    c.send(frame(OP_CLOSE, struct.pack(">H", 1000)))
    c.expect_close(1000)
    c.close()


# ---------------------------------------------------------------- interop


def test_node_ws_client_interop(server):
    r = subprocess.run(
        [node_ready("ws"), os.path.join(NODE_DIR, "ws_echo_client.mjs"), "ws://127.0.0.1:%d/mqtt" % server.port],
        capture_output=True,
        text=True,
        timeout=60,
        env=node_env(),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"protocol": "mqtt", "pong": True, "echoed": [1, 1024, 70 * 1024], "closeCode": 1000}


# ---------------------------------------------------------------- in-process


def run_mp(code):
    r = subprocess.run(
        [MICROPYTHON, "-X", "heapsize=1M", "-c", code],
        cwd=ROOT,
        env=MP_ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


FAKE = r"""
import gc, asyncio, os
from broker.websocket import WsTransport

def frame(op, payload, fin=True):
    key = os.urandom(4)
    n = len(payload)
    h = bytearray([(0x80 if fin else 0) | op])
    if n < 126:
        h.append(0x80 | n)
    else:
        h.append(0x80 | 126); h.append(n >> 8); h.append(n & 255)
    h += key
    return bytes(h) + bytes(b ^ key[i & 3] for i, b in enumerate(payload))

class Fake:
    # Inner transport: serves `data` in reads of up to `chunk` bytes; its
    # send writes 7 bytes at a time with a pause, like a slow socket.
    peer = "fake:1"
    def __init__(self, data, chunk=4096, slow=False, keep=True):
        self.data = data; self.pos = 0; self.chunk = chunk; self.keep = keep
        self.out = bytearray(); self.sent = 0; self.writes = 0
        self.slow = slow; self.closed = False
    async def recv_into(self, mv):
        n = min(len(mv), self.chunk, len(self.data) - self.pos)
        mv[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        await asyncio.sleep_ms(0)
        return n
    async def send(self, mv):
        self.sent += len(mv)
        self.writes += 1
        if not self.keep:
            return
        mv = bytes(mv)
        if not self.slow:
            self.out += mv
            return
        for i in range(0, len(mv), 7):
            self.out += mv[i:i + 7]
            await asyncio.sleep_ms(1)
    def close(self):
        self.closed = True
"""


def test_wstransport_heap_cost_is_small_and_nothing_is_kept_per_frame():
    out = run_mp(
        FAKE
        + r"""
buf = bytearray(512)
mv = memoryview(buf)
async def pump(ws):
    while True:
        n = await ws.recv_into(mv)
        if not n:
            return
        await ws.send(mv[:n])
async def measure(frames):
    data = b"".join(frame(2, bytes(40)) for _ in range(frames)) + frame(9, b"p") + frame(8, b"\x03\xe8")
    t = Fake(data, chunk=97, keep=False)
    gc.collect(); a = gc.mem_alloc()
    ws = WsTransport(t)
    gc.collect(); b = gc.mem_alloc()
    await pump(ws)
    gc.collect(); c = gc.mem_alloc()
    print("FRAMES", frames, "COST", b - a, "AFTER", c - a, "CLOSE", ws.close_rcvd, ws.close_sent)
async def main():
    WsTransport(Fake(b""))  # first use in a process interns names: not per connection
    await measure(100)
    await measure(400)
asyncio.run(main())
"""
    )
    got = {}
    for line in out.splitlines():
        w = line.split()
        if w and w[0] == "FRAMES":
            got[int(w[1])] = (int(w[3]), int(w[5]))
            assert "CLOSE 1000 1000" in line, out
    (cost, after), (_, after_more) = got[100], got[400]
    print("WsTransport heap cost under the twin: %d B; after 100 frames: %d B, after 400: %d B"
          % (cost, after, after_more))
    assert cost <= 320, out
    # Nothing kept per frame: 300 frames more keep no more. (Compared with
    # the cost itself, a block or two more came and went with the heap's
    # layout, whenever a module changed: the collector scans the C stack
    # conservatively and may still see a dead control-frame buffer.)
    assert after_more <= after + 32, out


def test_pong_waits_for_frame_in_flight():
    # A writer task is half way through a big frame on a slow socket when a
    # ping arrives: the pong must follow the frame, not split it.
    out = run_mp(
        FAKE
        + r"""
async def main():
    t = Fake(frame(9, b"PING"), slow=True)
    ws = WsTransport(t)
    payload = bytes(range(200))
    w = asyncio.create_task(ws.send(payload))
    await asyncio.sleep_ms(3)
    assert 0 < len(t.out) < 204, len(t.out)
    mv = memoryview(bytearray(64))
    r = asyncio.create_task(ws.recv_into(mv))
    await w
    await asyncio.sleep_ms(50)
    want = b"\x82\x7e\x00\xc8" + payload + b"\x8a\x04PING"
    print("OK" if bytes(t.out) == want else "BAD %r" % bytes(t.out))
    r.cancel()
asyncio.run(main())
"""
    )
    assert "OK" in out, out


def test_close_during_frame_in_flight_sends_no_close_frame():
    out = run_mp(
        FAKE
        + r"""
class Sock:
    def __init__(self): self.w = bytearray()
    def write(self, b): self.w += b; return len(b)
async def main():
    t = Fake(b"", slow=True)
    t.sock = Sock()
    ws = WsTransport(t)
    w = asyncio.create_task(ws.send(bytes(100)))
    await asyncio.sleep_ms(3)
    ws.close()
    busy_close = (bytes(t.sock.w), t.closed)
    t2 = Fake(b"")
    t2.sock = Sock()
    ws2 = WsTransport(t2)
    ws2.close(1001)
    try:
        await ws2.send(b"x")
        late = "sent"
    except OSError:
        late = "refused"
    print("RESULT", busy_close, bytes(t2.sock.w), ws2.close_sent, late, await ws2.recv_into(memoryview(bytearray(4))))
    w.cancel()
asyncio.run(main())
"""
    )
    assert "RESULT (b'', True) b'\\x88\\x02\\x03\\xe9' 1001 refused 0" in out, out


def test_send_frames_small_and_large_headers():
    # Payloads up to 12 bytes (every MQTT 3.1.1 ack) leave in one write with
    # their header; bigger ones as header, then the caller's buffer.
    out = run_mp(
        FAKE
        + r"""
async def main():
    t = Fake(b"")
    ws = WsTransport(t)
    for n in (0, 12, 13, 125, 126, 65535, 65536):
        t.out = bytearray()
        t.writes = 0
        await ws.send(bytes(n))
        print(n, bytes(t.out[:10]).hex(), len(t.out) - n, t.writes)
asyncio.run(main())
"""
    )
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["0"] == "8200 2 1"
    assert lines["12"].startswith("820c") and lines["12"].endswith(" 2 1")
    assert lines["13"].startswith("820d") and lines["13"].endswith(" 2 2")
    assert lines["125"].startswith("827d")
    assert lines["126"].startswith("827e007e") and lines["126"].endswith(" 4 2")
    assert lines["65535"].startswith("827effff")
    assert lines["65536"].startswith("827f0000000000010000") and lines["65536"].endswith(" 10 2")


def _heap(port):
    c = Client(port)
    c.send(b"GET /heap HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = c.response()
    c.close()
    assert status == 200
    return int(body)


def _echoed(port, n=8):
    # n upgraded connections, each of which had one message echoed.
    clients = [ws_client(port) for _ in range(n)]
    for c in clients:
        c.send(frame(OP_BIN, b"hi"))
        assert c.read_data(2) == b"hi"
    return clients


def _closed(clients):
    for c in clients:
        c.send(frame(OP_CLOSE, struct.pack(">H", 1000)))
        c.expect_close(1000)
        c.close()


def test_idle_connection_heap_in_echo_server(server):
    # Whole cost of an upgraded, idle connection in the echo server: task,
    # TcpTransport, WsTransport and the server's 1 KiB receive buffer. A
    # first round pays what the server grows once for that many sockets
    # and keeps: counted, 512 B were "left" when this test ran alone.
    _closed(_echoed(server.port))
    time.sleep(0.2)
    base = _heap(server.port)
    clients = _echoed(server.port)
    time.sleep(0.2)
    per = (_heap(server.port) - base) / 8
    _closed(clients)
    # The server sees the closes in its own time: polled, not slept on.
    end = time.monotonic() + 5
    left = _heap(server.port) - base
    while left >= 512 and time.monotonic() < end:
        time.sleep(0.05)
        left = _heap(server.port) - base
    print("echo server: %.0f B per idle WebSocket connection (1 KiB of it the echo buffer); %d B left after close" % (per, left))
    assert per < 3500
    assert left < 512
