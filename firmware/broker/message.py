# An application message as the broker holds it: one object, shared by
# every queue it sits in, and written straight into each receiver's output
# buffer (put()): no encoded copy is made or kept per receiver.
import micropython
from micropython import const
from mqtt import props as P

# Properties forwarded unchanged to receivers (MQTT-3.3.2-*): everything a
# publisher set except Topic Alias (per connection), Subscription Identifier
# (per receiver) and Message Expiry (rewritten with the time left).
# Will Delay belongs to the will, not to the message it becomes.
_NOT_FORWARDED = (P.TOPIC_ALIAS, P.SUBSCRIPTION_ID, P.MESSAGE_EXPIRY, P.WILL_DELAY)
_EXPIRY = const(0x02)
_ALIAS = const(0x23)
_SUBID = const(0x0B)


def as_sent(props):
    # True when all of a PUBLISH's properties go on with its message (none
    # of _NOT_FORWARDED): the message keeps their bytes as they came
    # (Message.keep_props) rather than encode them again.
    for k in _NOT_FORWARDED:
        if k in props:
            return False
    return True


def props_start(mv, o, qos):
    # Where a v5 PUBLISH's properties begin (after their length), o being
    # where its topic's length is.
    o += 2 + (mv[o] << 8 | mv[o + 1]) + (2 if qos else 0)
    while mv[o] & 0x80:
        o += 1
    return o + 1


def _vlen(n):
    # Bytes of a variable byte integer.
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def _put_varint(ob, o, n):
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            ob[o] = b | 0x80
            o += 1
        else:
            ob[o] = b
            return o + 1


def put_bytes(ob, o, b):
    # b into ob at o; returns the offset after it. For native code: a slice
    # written there is an object on the heap, one per call; in bytecode the
    # VM makes a bytearray's (or memoryview's) slice on the C stack.
    n = o + len(b)
    ob[o:n] = b
    return n


def _put_head(ob, o, first, rem, t, tn):
    # A PUBLISH's fixed header and topic (t: tn bytes) into ob at o.
    ob[o] = first
    if rem < 128:  # (most messages: no call)
        ob[o + 1] = rem
        o += 2
    else:
        o = _put_varint(ob, o + 1, rem)
    ob[o] = tn >> 8
    ob[o + 1] = tn & 0xFF
    o += 2
    ob[o : o + tn] = t
    return o + tn


def put_packed(ob, o, end, topics, packed, q, v5, most):
    # Retained messages as the retained table packs them (retain.py: the
    # payload, then the QoS; no properties, no expiry) as PUBLISH packets
    # for a new subscription of QoS q, without making a Message: a
    # subscriber to "#" on a hub with a few hundred retained topics gets
    # them this way. Writes them into ob from o, taken from the end of
    # topics (and popped) while the next one is packed, goes out at QoS 0
    # (q is 0, or it was published at QoS 0), takes at most `most` bytes
    # and fits before end. Returns the offset after the last one written.
    while topics:
        t = topics[-1]
        v = packed.get(t)
        if type(v) is not bytes or (q and v[-1]):
            return o
        t = memoryview(t)
        tn = len(t)
        pn = len(v) - 1
        rem = 2 + tn + pn + (1 if v5 else 0)
        n = 1 + _vlen(rem) + rem
        # (one byte more than the packet: see below)
        if n > most or o + n >= end:
            return o
        o = _put_head(ob, o, 0x31, rem, t, tn)
        if v5:
            ob[o] = 0  # no properties
            o += 1
        # The payload and the QoS byte after it in one copy, without a slice
        # of v: the QoS lands past the packet, where the next one goes.
        ob[o : o + pn + 1] = v
        o += pn
        topics.pop()
    return o


class Message:
    # Defaults on the class keep each instance's attribute table small: a
    # gateway holds a few hundred of these. The topic is kept once, as str
    # (routing and the retained table need it); put() writes its UTF-8
    # bytes through a memoryview.
    expires = None  # broker clock (Broker.now()) second it expires; None: never
    pbody = b""  # the properties it goes on with, encoded as sent (no length)
    mid = 0  # id of its record on flash (persist.py); 0: not stored
    refs = 0  # stored queue and in-flight records that refer to it

    def __init__(self, topic, payload, qos, retain, props=None, expiry=None, now=0):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        if expiry:
            # (0, as from Mosquitto: no expiry. Taken as "expired at once",
            # it dropped a message for subscribers ready to take it, with
            # a PUBACK that said it was taken.)
            self.expires = now + expiry
        if props:
            self._forward(props)

    def _forward(self, props):
        # Keeps the properties that go on with the message, encoded now
        # (apart from __init__, whose frame would otherwise come from the
        # heap). Encoded at its first send instead, a message of 1,200 user
        # properties found no 6 KB piece for it, waited at the head of its
        # queue, and held the acknowledged messages behind it for good; as
        # a dict it also held five times the heap. Now a heap without that
        # piece refuses it when it comes (0x97). (A PUBLISH whose properties
        # all go on needs no encoding: keep_props.)
        fwd = None
        for k in props:
            if k not in _NOT_FORWARDED:
                if fwd is None:
                    fwd = {}
                fwd[k] = props[k]
        if fwd is not None:
            self.pbody = P.encode_body(fwd)

    def keep_props(self, props, mv, o, qos, poff, copy):
        # A PUBLISH's properties: props decoded, o where its topic's length
        # is in mv, poff where its payload begins. When all of them go on,
        # their bytes as they came: no encoding, and with copy False (a
        # large packet's own buffer) no second piece of heap their size
        # (1,600 user properties are 8 KB).
        if as_sent(props):
            raw = mv[props_start(mv, o, qos) : poff]
            self.pbody = bytes(raw) if copy else raw
        else:
            self._forward(props)

    def expired(self, now):
        return self.expires is not None and now >= self.expires

    def remaining(self, now):
        # Seconds left, at least 1 while not expired (MQTT-3.3.2-6).
        r = self.expires - now
        return r if r > 0 else 1

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def _props_len(self, alias, subids):
        n = len(self.pbody)
        if self.expires is not None:
            n += 5
        if alias:
            n += 3
        if subids:
            for s in subids:
                n += 1 + _vlen(s)
        return n

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def size(self, topic, version, qos, subids, alias, send_topic, payload=True):
        # Bytes put() writes with these arguments.
        n = (len(memoryview(topic)) if send_topic else 0) + 2
        if qos:
            n += 2
        if version == 5:
            p = self._props_len(alias, subids)
            n += _vlen(p) + p
        rem = n + len(self.payload)
        return (2 if rem < 128 else 1 + _vlen(rem)) + (rem if payload else n)  # (most: no call)

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def put(self, ob, o, topic, version, qos, retain, dup, pid, subids, alias, send_topic, now, payload=True):
        # Writes the PUBLISH for one receiver into ob at o (the caller has
        # checked the room with size()); returns the offset after it. topic
        # is the message's own, or what a bridge maps it to upstream. With
        # payload False only its head is written: the caller sends the
        # payload from the message itself.
        t = memoryview(topic) if send_topic else b""
        tn = len(t)
        n = tn + 2 + (2 if qos else 0)
        plen = 0
        if version == 5:
            plen = self._props_len(alias, subids)
            n += _vlen(plen) + plen
        pl = self.payload
        o = _put_head(ob, o, 0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0), n + len(pl), t, tn)
        if qos:
            ob[o] = pid >> 8
            ob[o + 1] = pid & 0xFF
            o += 2
        if version == 5:
            o = _put_varint(ob, o, plen)
            if self.expires is not None:
                r = self.remaining(now)
                ob[o] = _EXPIRY
                ob[o + 1] = (r >> 24) & 0xFF
                ob[o + 2] = (r >> 16) & 0xFF
                ob[o + 3] = (r >> 8) & 0xFF
                ob[o + 4] = r & 0xFF
                o += 5
            if alias:
                ob[o] = _ALIAS
                ob[o + 1] = alias >> 8
                ob[o + 2] = alias & 0xFF
                o += 3
            if subids:
                for s in subids:
                    ob[o] = _SUBID
                    o = _put_varint(ob, o + 1, s)
            b = self.pbody
            if b:
                o = put_bytes(ob, o, b)
        if payload:
            o = put_bytes(ob, o, pl)
        return o


class Raw:
    # A QoS 0 PUBLISH that is not retained, still in the read buffer. A
    # receiver that takes it as it came (at QoS 0, in the sender's protocol
    # version, with nothing to add) gets its bytes copied into its output;
    # a Message is made only when some receiver needs one (message()). One
    # per broker, reused: a message that passes straight through costs no
    # object of its own.
    qos = 0
    retain = False
    msg = None

    def set(self, topic, src, poff, props, version, now):
        # src: the whole packet; poff: where its payload starts in src.
        self.topic = topic
        self.src = src
        self.poff = poff
        self.props = props
        self.version = version
        self.now = now
        self.msg = None

    def clear(self):
        # Once routed: what it points at (a big packet's buffer, thousands
        # of decoded properties) must not stay held until the next one.
        self.topic = self.src = self.props = self.msg = None

    def message(self):
        m = self.msg
        if m is None:
            pr = self.props
            m = self.msg = Message(self.topic, bytes(self.src[self.poff:]), 0, False, None,
                                   pr.get(_EXPIRY) if pr is not None else None, self.now)
            if pr is not None:
                src = self.src
                o = 1
                while src[o] & 0x80:  # (the fixed header's remaining length)
                    o += 1
                m.keep_props(pr, src, o + 1, 0, self.poff, True)
        return m
