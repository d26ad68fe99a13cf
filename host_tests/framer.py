# Incremental framing for the test clients and host tools (not shipped to
# boards: the broker does not use it): feed it bytes as they arrive,
# take whole packets out. The broker frames in place in its own receive
# buffer with packets.frame(); this class is the simple owner-of-a-buffer
# version of the same rule.
from mqtt.packets import frame, decode


class Framer:
    def __init__(self, max_size=268435460):
        self.max_size = max_size
        self.buf = bytearray()
        self.off = 0

    def feed(self, data):
        if self.off:
            del self.buf[: self.off]
            self.off = 0
        self.buf.extend(data)

    def next_raw(self):
        # -> (first_byte, body memoryview) or None; the view is valid
        # until the next feed().
        b = self.buf
        r = frame(b, self.off, len(b), self.max_size)
        if r is None:
            return None
        h, n = r
        start = self.off + h
        if start + n > len(b):
            return None
        first = b[self.off]
        self.off = start + n
        return first, memoryview(b)[start : start + n]

    def next(self, version=4):
        # -> decoded packet object or None
        r = self.next_raw()
        if r is None:
            return None
        first, body = r
        return decode(first, body, 0, len(body), version)
