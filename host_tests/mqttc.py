"""A tiny MQTT test client for the broker behaviour tests, built on our
codec (lib/mqtt) and brokerproc.Raw.

    c = Client(port, "cid", version=5, props={0x11: 60})   # sends CONNECT, reads CONNACK
    c.connack                           # the decoded Connack
    c.subscribe([("a/#", 1)])           # -> list of SUBACK reason codes
    c.publish("a/b", b"x", qos=2)       # runs the QoS 1/2 flow, -> final ack
    m = c.expect(PUBLISH)               # next packet, asserted to be a PUBLISH
    c.ack(m)                            # PUBACK, or PUBREC/PUBREL/PUBCOMP
    assert c.poll(0.3) is None          # nothing arrives for 0.3 s
    c.expect(DISCONNECT); assert c.closed()

Packets are decoded objects (mqtt.packets.Publish, Ack, ...). recv_raw()
gives the exact bytes. Packets that arrive while publish() waits for its
acknowledgement are kept and handed out by the next recv()/expect().
"""
import os
import socket
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_LIB = os.path.join(os.path.dirname(_HERE), "lib")
if _LIB not in sys.path:
    sys.path.insert(0, _LIB)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from mqtt import packets as P  # noqa: E402
from mqtt.errors import MQTTError  # noqa: E402
from mqtt.packets import (  # noqa: E402,F401
    CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE,
    UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH, Connect, Publish, Ack, Subscribe, Unsubscribe,
    Disconnect, Empty,
)
import brokerproc  # noqa: E402
from brokerproc import BrokerProc, Raw, TEST_USER, TEST_PASSWORD, connect  # noqa: E402,F401

# The default of username/password below: the test user every BrokerProc
# knows (the broker runs as a board ships, anonymous clients refused).
# Pass username=None for an anonymous CONNECT.
CREDENTIALS = object()

# Property identifiers used by the tests.
PFI = 0x01
EXPIRY = 0x02
CONTENT_TYPE = 0x03
RESPONSE_TOPIC = 0x08
CORRELATION = 0x09
SUBID = 0x0B
SESSION_EXPIRY = 0x11
ASSIGNED_ID = 0x12
SERVER_KEEP_ALIVE = 0x13
REASON_STRING = 0x1F
RECEIVE_MAX = 0x21
TOPIC_ALIAS_MAX = 0x22
TOPIC_ALIAS = 0x23
USER = 0x26
MAX_PACKET = 0x27
WILL_DELAY = 0x18

# Subscription option bits (v5 3.8.3.1).
NL = 0x04
RAP = 0x08


def RH(n):
    return n << 4


class Closed(AssertionError):
    pass


def split(raw):
    """(first byte, body bytes) of one whole packet."""
    i = 1
    while raw[i] & 0x80:
        i += 1
    return raw[0], raw[i + 1:]


def decode(raw, version):
    first, body = split(raw)
    return P.decode(first, body, 0, len(body), version)


def enc(pkt, version):
    return P.encode(pkt, version)


def wait_for(pred, timeout=5.0, step=0.05):
    """Polls pred() until it is true; returns its last value."""
    end = time.time() + timeout
    while True:
        v = pred()
        if v or time.time() >= end:
            return v
        time.sleep(step)


class Client:
    def __init__(self, port, client_id="", version=5, clean=True, keepalive=60, props=None,
                 will_topic=None, will_payload=b"", will_qos=0, will_retain=False, will_props=None,
                 username=CREDENTIALS, password=CREDENTIALS, connect=True, expect_ok=True, rcvbuf=None,
                 source=None):
        self.port = port
        self.version = version
        self.client_id = client_id
        self._pid = 0
        self.stash = []
        if username is CREDENTIALS:
            username = TEST_USER
            if password is CREDENTIALS:
                password = TEST_PASSWORD
        if password is CREDENTIALS:
            password = None
        if isinstance(password, str):
            password = password.encode()
        if rcvbuf is None:
            self.raw = Raw(port, source=source)
        else:
            # A small receive buffer, set before connecting, for slow readers.
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.settimeout(5)
            s.bind((source, 0) if source else brokerproc.source_address())
            s.connect(("127.0.0.1", port))
            self.raw = Raw.__new__(Raw)
            self.raw.s = s
            self.raw.buf = b""
        self.connack = None
        if connect:
            self.send(Connect(client_id, version=version, clean=clean, keepalive=keepalive,
                              username=username, password=password, will_topic=will_topic,
                              will_payload=will_payload, will_qos=will_qos, will_retain=will_retain,
                              will_props=will_props, props=props))
            self.connack = self.expect(CONNACK)
            if expect_ok:
                assert self.connack.reason == 0, "CONNACK refused: %r" % self.connack

    # ------------------------------------------------------------ plumbing

    def next_pid(self):
        self._pid = self._pid % 65535 + 1
        return self._pid

    def send(self, pkt):
        self.raw.send(P.encode(pkt, self.version))

    def send_raw(self, data):
        self.raw.send(data)

    def recv_raw(self, timeout=5):
        """Exact bytes of the next packet; None at EOF; socket.timeout if none."""
        return self.raw.recv_packet(timeout)

    def recv(self, timeout=5):
        """Next decoded packet; raises Closed at EOF, socket.timeout if none."""
        if self.stash:
            return self.stash.pop(0)
        raw = self.raw.recv_packet(timeout)
        if raw is None:
            raise Closed("connection closed by the broker")
        return self._decode(raw)

    def _decode(self, raw):
        try:
            return decode(raw, self.version)
        except MQTTError as e:
            raise AssertionError("broker sent an invalid v%d packet %r: %s" % (self.version, raw, e))

    def poll(self, timeout=0.3):
        """The next packet, or None when nothing comes within timeout."""
        try:
            return self.recv(timeout)
        except socket.timeout:
            return None

    def expect(self, t, timeout=5):
        try:
            p = self.recv(timeout)
        except socket.timeout:
            raise AssertionError("no %s within %ss" % (P.NAMES[t], timeout))
        assert p.type == t, "expected %s, got %r" % (P.NAMES[t], p)
        return p

    def _wait(self, t, pid, timeout=5):
        # Waits for an ack of type t and pid, keeping other packets.
        end = time.time() + timeout
        held = []
        try:
            while True:
                left = end - time.time()
                if left <= 0:
                    raise AssertionError("no %s for pid %d within %ss" % (P.NAMES[t], pid, timeout))
                if self.stash:
                    p = self.stash.pop(0)
                else:
                    try:
                        raw = self.raw.recv_packet(left)
                    except socket.timeout:
                        continue
                    if raw is None:
                        raise Closed("connection closed waiting for %s" % P.NAMES[t])
                    p = self._decode(raw)
                if p.type == t and getattr(p, "pid", None) == pid:
                    return p
                held.append(p)
        finally:
            self.stash[:0] = held

    def closed(self, timeout=5):
        """True when the broker closes the connection within timeout (any
        packets before the close are discarded)."""
        self.stash = []
        return self.raw.closed(timeout)

    def close(self):
        try:
            self.raw.close()
        except OSError:
            pass

    # ------------------------------------------------------------ MQTT

    def subscribe(self, topics, props=None, pid=None):
        """topics: [(filter, options)] or a single filter string (QoS 0)."""
        if isinstance(topics, str):
            topics = [(topics, 0)]
        pid = pid or self.next_pid()
        self.send(Subscribe(pid, list(topics), props))
        a = self._wait(SUBACK, pid)
        return a.reasons

    def unsubscribe(self, filters, props=None):
        if isinstance(filters, str):
            filters = [filters]
        pid = self.next_pid()
        self.send(Unsubscribe(pid, list(filters), props))
        return self._wait(UNSUBACK, pid).reasons

    def publish(self, topic, payload=b"", qos=0, retain=False, props=None, dup=False, pid=None,
                complete=True, timeout=5):
        """Sends a PUBLISH; for QoS 1 returns the PUBACK, for QoS 2 the
        PUBREC (complete=False) or the PUBCOMP after sending PUBREL."""
        if isinstance(payload, str):
            payload = payload.encode()
        if qos and pid is None:
            pid = self.next_pid()
        self.send(Publish(topic, payload, qos, retain, dup, pid or 0, props))
        if qos == 1:
            return self._wait(PUBACK, pid, timeout)
        if qos == 2:
            rec = self._wait(PUBREC, pid, timeout)
            if not complete or rec.reason >= 0x80:
                return rec
            self.send(Ack(PUBREL, pid))
            return self._wait(PUBCOMP, pid, timeout)
        return None

    def ack(self, m):
        """Acknowledges a received PUBLISH as a well-behaved client."""
        if m.qos == 1:
            self.send(Ack(PUBACK, m.pid))
        elif m.qos == 2:
            self.send(Ack(PUBREC, m.pid))
            self._wait(PUBREL, m.pid)
            self.send(Ack(PUBCOMP, m.pid))

    def get(self, timeout=5, ack=True):
        """Next PUBLISH (acknowledged unless ack=False)."""
        m = self.expect(PUBLISH, timeout)
        if ack:
            self.ack(m)
        return m

    def messages(self, n=None, timeout=0.5, ack=True):
        """PUBLISHes until n are read, or until none comes for `timeout`."""
        out = []
        while n is None or len(out) < n:
            try:
                p = self.recv(timeout)
            except socket.timeout:
                break
            assert p.type == PUBLISH, "expected PUBLISH, got %r" % p
            if ack:
                self.ack(p)
            out.append(p)
        return out

    def raw_publish(self, timeout=5):
        """Next packet's exact bytes, asserted to be a PUBLISH (for tests
        that check timing and must not depend on the properties decoding)."""
        raw = self.raw.recv_packet(timeout)
        assert raw is not None, "connection closed"
        assert raw[0] >> 4 == PUBLISH, "expected PUBLISH, got %r" % raw
        return raw

    def ping(self, timeout=5):
        self.send(Empty(PINGREQ))
        return self.expect(PINGRESP, timeout)

    def disconnect(self, reason=0, props=None):
        self.send(Disconnect(reason, props))
        ok = self.raw.closed(3)
        self.close()
        return ok


def connect_bytes(client_id="", version=4, **kw):
    """A CONNECT's bytes; with the test user's credentials unless username
    (or password) is given: username=None makes it anonymous."""
    if "username" not in kw:
        kw["username"] = TEST_USER
        kw.setdefault("password", TEST_PASSWORD.encode())
    return P.encode(Connect(client_id, version=version, **kw))


def collect(c, seconds):
    """Every PUBLISH c receives (and acknowledges) within the next
    `seconds`, bounded even when messages keep coming, as $SYS ones do."""
    end = time.time() + seconds
    out = []
    while True:
        left = end - time.time()
        if left <= 0:
            return out
        p = c.poll(left)
        if p is None:
            return out
        assert p.type == PUBLISH, p
        c.ack(p)
        out.append(p)


def flood(port, stop, pace=True, seed=0, sink=True):
    """Small QoS 0 messages from one client until stop (a threading.Event)
    is set, to another client that reads them (sink=False: to nobody):
    the garbage a broker makes between its collections, or (pace=False:
    fifty at a time, as fast as loopback takes them) a client whose socket
    always has data. Returns the threads, to join once stop is set."""
    import random
    import threading

    rnd = random.Random(seed)
    reader = None
    if sink:
        reader = Client(port, "flood-sink", version=5)
        reader.subscribe([("flood/#", 0)])
    src = Client(port, "flood-src", version=4)
    packets = [P.encode(Publish("flood/%d" % i, b"f" * rnd.randint(10, 200), 0, False, False, 0), 4)
               for i in range(50)]
    if not pace:
        packets = [b"".join(packets)]

    def send():
        i = 0
        try:
            while not stop.is_set():
                src.send_raw(packets[i % len(packets)])
                i += 1
                if pace and i % 20 == 0:
                    time.sleep(0.002)  # (the reader keeps up: nothing is dropped)
        finally:
            src.close()

    def drain():
        try:
            while not stop.is_set():
                try:
                    reader.recv_raw(timeout=0.3)
                except socket.timeout:
                    pass
        finally:
            reader.close()

    threads = [threading.Thread(target=send, daemon=True)]
    if sink:
        threads.append(threading.Thread(target=drain, daemon=True))
    for t in threads:
        t.start()
    return threads


_sys_n = [0]


def sys_value(port, name, timeout=3):
    """The current (retained) value of $SYS/broker/<name>, as a str; None
    when the broker has not published it within timeout. Uses a short-lived
    v5 client with a fresh id."""
    _sys_n[0] += 1
    c = Client(port, "sysreader-%d" % _sys_n[0], version=5)
    try:
        c.subscribe([("$SYS/broker/" + name, 0)])
        m = c.poll(timeout)
        return None if m is None else m.payload.decode()
    finally:
        c.close()


def sys_round(port, timeout=6):
    """Waits for a $SYS round (sys_interval 1) published after this call:
    a value read then is not older than what the test did before it. (The
    retained value there now may come from the round before.)"""
    up = sys_value(port, "uptime")
    assert up is not None, "the broker publishes no $SYS uptime"
    later = sys_wait(port, "uptime", lambda v: _uptime(v) > _uptime(up), timeout=timeout)
    assert later is not None and _uptime(later) > _uptime(up), "no $SYS round after uptime %r" % up


def _uptime(v):
    return int(v.split()[0])  # "12 seconds"


def sys_wait(port, name, pred, timeout=4):
    """Reads $SYS/broker/<name> until pred(value) holds; returns the last
    value read (None if never published)."""
    end = time.time() + timeout
    v = None
    while True:
        v = sys_value(port, name, timeout=max(0.2, min(1.5, end - time.time())))
        if v is not None and pred(v):
            return v
        if time.time() >= end:
            return v
        time.sleep(0.2)
