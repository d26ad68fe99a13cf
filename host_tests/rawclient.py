"""A small synchronous MQTT client on a raw socket, built on the project's
own codec, for tests that must see every packet (acks, DUP flags, pids)."""
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
from mqtt import packets as K  # noqa: E402
from framer import Framer  # noqa: E402
from brokerproc import TEST_USER, TEST_PASSWORD, connect  # noqa: E402


class Client:
    # Connects as the test user unless username= is given (None: anonymous).
    def __init__(self, port, cid, version=5, clean=True, expiry=0, keepalive=0, timeout=5, **kw):
        self.version = version
        if "username" not in kw:
            kw["username"] = TEST_USER
            kw.setdefault("password", TEST_PASSWORD.encode())
        self.s = connect(port, timeout)
        self.f = Framer()
        props = {0x11: expiry} if version == 5 and expiry else None
        self.send(K.Connect(cid, version, clean, keepalive, props=props, **kw))
        self.connack = self.recv()
        if self.connack is None or self.connack.type != K.CONNACK:
            raise ConnectionError("no CONNACK: %r" % (self.connack,))

    def send(self, pkt):
        self.s.sendall(K.encode(pkt, self.version))

    def recv(self, timeout=5):
        """The next packet, or None when the broker closed the connection."""
        self.s.settimeout(timeout)
        while True:
            p = self.f.next(self.version)
            if p is not None:
                return p
            try:
                d = self.s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                d = b""
            if not d:
                return None
            self.f.feed(d)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass
