# Just enough HTTP/1.1 for the WebSocket upgrade and a small status page:
# read one request head, write one response. Works over any transport
# (transport.py's interface), so TLS listeners get it for free.
#
# The request head is read into a buffer the caller owns (the connection's
# receive buffer can serve) and is bounded by it: a head that does not fit is
# answered 431 and dropped. Bytes that arrive after the blank line are handed
# back as `extra`, because a WebSocket client may send its first frame right
# behind the upgrade request, in the same TCP segment.
#
# Timeouts are the caller's job: wrap read_request in asyncio.wait_for (a
# 431 waits up to transport.DRAIN_IN_MS more, for the rest of the head).
from broker.transport import drain_in

_CRLF2 = b"\r\n\r\n"
_CLOSE = (("Connection", "close"),)


async def read_request(t, buf):
    # Returns (method, path, headers, extra), headers keyed by lowercased
    # name, or None once the request was refused (an error response has then
    # been sent) or the peer went away before finishing its head.
    mv = memoryview(buf)
    cap = len(buf)
    have = 0
    while True:
        if have == cap:
            await respond(t, 431, "Request Header Fields Too Large", _CLOSE)
            # The rest of the head is unread: closed now, the reset could
            # make the client's TCP drop the 431 before it was read.
            await drain_in(t, mv)
            return None
        n = await t.recv_into(mv[have:])
        if not n:
            return None
        # The terminator may straddle two reads: look 3 bytes back.
        start = have - 3 if have > 3 else 0
        have += n
        end = buf.find(_CRLF2, start, have)
        if end >= 0:
            break
    req = _parse(bytes(mv[:end]))
    if req is None:
        await respond(t, 400, "Bad Request", _CLOSE)
        return None
    if req == 505:
        await respond(t, 505, "HTTP Version Not Supported", _CLOSE)
        return None
    end += 4
    return req + (bytes(mv[end:have]) if have > end else b"",)


def _parse(head):
    # -> (method, path, headers), None when malformed, 505 for a version
    # other than HTTP/1.x.
    try:
        head = str(head, "utf-8")
    except UnicodeError:
        return None
    lines = head.split("\r\n")
    rl = lines[0].split(" ")
    if len(rl) != 3 or not rl[0] or not rl[1]:
        return None
    if not rl[2].startswith("HTTP/"):
        return None
    if rl[2] not in ("HTTP/1.1", "HTTP/1.0"):
        return 505
    path = rl[1]
    if path[:7].lower() == "http://" or path[:8].lower() == "https://":
        # The absolute form, which a server must take (RFC 9112 3.2.2): what
        # follows its authority, which ends at the first "/" or "?".
        j = path.find("//") + 2
        while j < len(path) and path[j] not in "/?":
            j += 1
        path = path[j:] if path[j : j + 1] == "/" else "/" + path[j:]
    headers = {}
    for i in range(1, len(lines)):
        line = lines[i]
        c = line.find(":")
        # RFC 7230 3.2.4: no folded lines, no space before the colon.
        if c <= 0 or line[0] in " \t" or line[c - 1] in " \t":
            return None
        name = line[:c].lower()
        value = line[c + 1 :].strip()
        old = headers.get(name)
        if old is not None and name == "host":
            return None  # two Host lines: 400 (RFC 9112 3.2)
        # Repeated list headers (Connection, Sec-WebSocket-Protocol) combine.
        headers[name] = value if old is None else old + ", " + value
    if rl[2] == "HTTP/1.1" and "host" not in headers:
        return None  # RFC 9112 3.2: 400 for an HTTP/1.1 request without Host
    return rl[0], path, headers


async def respond(t, status, reason, headers=(), body=b""):
    # headers: (name, value) pairs or a dict. Content-Length is added for
    # every status that can carry a body; don't pass it.
    if isinstance(body, str):
        body = body.encode()
    if isinstance(headers, dict):
        headers = headers.items()
    h = "HTTP/1.1 %d %s\r\n" % (status, reason)
    for k, v in headers:
        h += "%s: %s\r\n" % (k, v)
    if status >= 200 and status != 204 and status != 304:
        h += "Content-Length: %d\r\n" % len(body)
    h = (h + "\r\n").encode()
    if body and len(body) <= 256:
        # One write for small error pages; large bodies are not copied.
        await t.send(h + body)
        return
    await t.send(h)
    if body:
        await t.send(body)


def tokens(value):
    # Comma-separated header value -> list of lowercased, stripped tokens.
    if not value:
        return []
    return [v.strip().lower() for v in value.split(",")]
