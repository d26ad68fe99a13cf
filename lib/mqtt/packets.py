# The 15 MQTT control packets (spec 3.1.1 ch. 3 and 5.0 ch. 3): encode and
# decode for both protocol versions.
#
# `decode(first_byte, buf, off, end, version)` turns one whole packet body
# (the bytes after the fixed header) into a packet object; `encode(pkt,
# version)` does the reverse, fixed header included. Protocol version is 4
# for 3.1.1 (3 for 3.1, handled as 3.1.1) and 5 for 5.0.
#
# The broker's publish path does not build objects: it uses
# decode_publish() and decode_ack(), which return tuples, and
# encode_publish(), which lays a message out once for many receivers.
from mqtt.compat import const, micropython
from mqtt.errors import MQTTError, MALFORMED, PROTOCOL_ERROR, UNSUPPORTED_VERSION
from mqtt import wire, props as P

CONNECT = const(1)
CONNACK = const(2)
PUBLISH = const(3)
PUBACK = const(4)
PUBREC = const(5)
PUBREL = const(6)
PUBCOMP = const(7)
SUBSCRIBE = const(8)
SUBACK = const(9)
UNSUBSCRIBE = const(10)
UNSUBACK = const(11)
PINGREQ = const(12)
PINGRESP = const(13)
DISCONNECT = const(14)
AUTH = const(15)

NAMES = (
    "RESERVED", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "AUTH",
)

# Reason codes each acknowledgement may carry (v5 3.4.2.1, 3.5.2.1, ...).
PUBACK_REASONS = (0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99)
_PUBREL_REASONS = (0x00, 0x92)
_SUBACK_REASONS = (0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2)
_UNSUBACK_REASONS = (0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91)
_AUTH_REASONS = (0x00, 0x18, 0x19)
_DISCONNECT_REASONS = (
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
    0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
)
_CONNACK_REASONS = (
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
    0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
)
# v5 CONNACK reason -> 3.1.1 return code, as Mosquitto maps them.
_V3_CONNACK = {0x00: 0, 0x84: 1, 0x85: 2, 0x86: 4, 0x87: 5, 0x8A: 5}


def v3_connack_code(reason):
    return _V3_CONNACK.get(reason, 3)


class Packet:
    type = 0

    def __eq__(self, other):
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __repr__(self):
        return "%s%r" % (NAMES[self.type], self.__dict__)


class Connect(Packet):
    type = CONNECT

    def __init__(self, client_id="", version=4, clean=True, keepalive=60, username=None, password=None,
                 will_topic=None, will_payload=b"", will_qos=0, will_retain=False, will_props=None,
                 props=None):
        self.client_id = client_id
        self.version = version
        self.clean = clean
        self.keepalive = keepalive
        self.username = username
        self.password = password
        self.will_topic = will_topic
        self.will_payload = will_payload
        self.will_qos = will_qos
        self.will_retain = will_retain
        self.will_props = will_props
        self.props = props


class Connack(Packet):
    type = CONNACK

    def __init__(self, session_present=False, reason=0, props=None):
        self.session_present = session_present
        self.reason = reason
        self.props = props


class Publish(Packet):
    type = PUBLISH

    def __init__(self, topic, payload=b"", qos=0, retain=False, dup=False, pid=0, props=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.pid = pid
        self.props = props


class Ack(Packet):
    # PUBACK, PUBREC, PUBREL and PUBCOMP share one layout.
    def __init__(self, type, pid, reason=0, props=None):
        self.type = type
        self.pid = pid
        self.reason = reason
        self.props = props


class Subscribe(Packet):
    type = SUBSCRIBE

    def __init__(self, pid, topics, props=None):
        # topics: list of (filter, options); options is the subscription
        # options byte (QoS in bits 0-1; v5 adds No Local, Retain As
        # Published and Retain Handling).
        self.pid = pid
        self.topics = topics
        self.props = props


class Suback(Packet):
    type = SUBACK

    def __init__(self, pid, reasons, props=None):
        self.pid = pid
        self.reasons = reasons
        self.props = props


class Unsubscribe(Packet):
    type = UNSUBSCRIBE

    def __init__(self, pid, filters, props=None):
        self.pid = pid
        self.filters = filters
        self.props = props


class Unsuback(Packet):
    type = UNSUBACK

    def __init__(self, pid, reasons=None, props=None):
        # reasons is None in 3.1.1, which has no payload.
        self.pid = pid
        self.reasons = reasons
        self.props = props


class Empty(Packet):
    # PINGREQ and PINGRESP.
    def __init__(self, type):
        self.type = type


class Disconnect(Packet):
    type = DISCONNECT

    def __init__(self, reason=0, props=None):
        self.reason = reason
        self.props = props


class Auth(Packet):
    type = AUTH

    def __init__(self, reason=0, props=None):
        self.reason = reason
        self.props = props


# ---------------------------------------------------------------- framing

def frame(buf, off, end, max_size):
    # Looks for one packet at buf[off:end]. Returns (header_length,
    # remaining_length) once the fixed header is complete, or None when
    # more bytes are needed. The remaining length is checked against
    # max_size (the whole packet's size) here, before anyone allocates.
    if end - off < 2:
        return None
    n = buf[off + 1]
    if n < 128:
        # Fast path: a one-byte remaining length (packets under 130 bytes).
        if 2 + n > max_size:
            raise MQTTError(0x95, "packet of %d bytes is over the limit of %d" % (2 + n, max_size))
        return 2, n
    n = 0
    shift = 0
    i = off + 1
    while True:
        if i >= end:
            return None
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift >= 28:
            raise MQTTError(MALFORMED, "remaining length longer than 4 bytes")
    h = i - off
    if h + n > max_size:
        raise MQTTError(0x95, "packet of %d bytes is over the limit of %d" % (h + n, max_size))
    return h, n


def check_flags(first):
    # Fixed header flags (spec 2.2.2): PUBREL, SUBSCRIBE and UNSUBSCRIBE
    # carry 0b0010, PUBLISH its own flags, every other packet 0.
    t = first >> 4
    f = first & 0x0F
    if t == PUBLISH:
        if f & 0x06 == 0x06:
            raise MQTTError(MALFORMED, "PUBLISH with QoS 3")
        if f & 0x08 and not f & 0x06:
            raise MQTTError(MALFORMED, "PUBLISH QoS 0 with DUP set")
    elif t == PUBREL or t == SUBSCRIBE or t == UNSUBSCRIBE:
        if f != 2:
            raise MQTTError(MALFORMED, "%s flags must be 0010" % NAMES[t])
    elif t == 0:
        raise MQTTError(MALFORMED, "reserved packet type 0")
    elif f:
        raise MQTTError(MALFORMED, "%s flags must be 0000" % NAMES[t])
    return t


# ---------------------------------------------------------------- decode

def _utf8(buf, off, e):
    # str(buf[off:e], "utf-8"), for decode_publish: in its machine code a
    # slice is an object on the heap; in bytecode the VM makes the slice of
    # a memoryview (the broker's read buffer) on the C stack.
    return str(buf[off:e], "utf-8")


@micropython.native  # (tools/frames.py: its frame on the C stack)
def decode_publish(first, buf, off, end, version):
    # Returns (topic, pid, props, payload_offset). topic may be "" in v5
    # when a Topic Alias stands for it; the caller resolves that.
    # The topic read of wire.get_str, inline: this is the hottest path.
    if off + 2 > end:
        raise MQTTError(MALFORMED, "truncated two byte integer")
    n = (buf[off] << 8) | buf[off + 1]
    off += 2
    e = off + n
    if e > end:
        raise MQTTError(MALFORMED, "string runs past the packet")
    try:
        topic = _utf8(buf, off, e)
    except UnicodeError:
        raise MQTTError(MALFORMED, "invalid UTF-8 string")
    if len(topic) == n:
        if "\x00" in topic:
            raise MQTTError(MALFORMED, "U+0000 in a string")
    elif not wire.utf8_valid(buf, off, e):
        raise MQTTError(MALFORMED, "invalid UTF-8 string")
    off = e
    pid = 0
    if first & 0x06:
        if off + 2 > end:
            raise MQTTError(MALFORMED, "truncated two byte integer")
        pid = (buf[off] << 8) | buf[off + 1]
        off += 2
        if pid == 0:
            raise MQTTError(PROTOCOL_ERROR, "PUBLISH with packet identifier 0")
    pr = None
    if version == 5:
        pr, off = P.decode(buf, off, end, PUBLISH)
    return topic, pid, pr, off


def decode_ack(t, buf, off, end, version):
    # PUBACK, PUBREC, PUBREL, PUBCOMP -> (pid, reason, props)
    pid, off = wire.get_u16(buf, off, end)
    if pid == 0:
        raise MQTTError(PROTOCOL_ERROR, "%s with packet identifier 0" % NAMES[t])
    reason = 0
    pr = None
    if version == 5:
        if off < end:
            reason = buf[off]
            off += 1
            ok = _PUBREL_REASONS if t == PUBREL or t == PUBCOMP else PUBACK_REASONS
            if reason not in ok:
                raise MQTTError(PROTOCOL_ERROR, "%s reason 0x%02X not allowed" % (NAMES[t], reason))
            if off < end:
                pr, off = P.decode(buf, off, end, t)
    if off != end:
        raise MQTTError(MALFORMED, "%s has trailing bytes" % NAMES[t])
    return pid, reason, pr


def _decode_connect(buf, off, end):
    name, off = wire.get_str(buf, off, end)
    level, off = wire.get_u8(buf, off, end)
    if name == "MQTT":
        if level != 4 and level != 5:
            raise MQTTError(UNSUPPORTED_VERSION, "protocol level %d" % level)
    elif name == "MQIsdp":
        if level != 3:
            raise MQTTError(UNSUPPORTED_VERSION, "protocol MQIsdp level %d" % level)
    else:
        # Not MQTT at all: no CONNACK, which would answer it as MQTT
        # (MQTT-3.1.2-1 lets the server just disconnect, as Mosquitto does).
        raise MQTTError(PROTOCOL_ERROR, "protocol name %r" % name)
    flags, off = wire.get_u8(buf, off, end)
    if flags & 0x01:
        raise MQTTError(MALFORMED, "CONNECT reserved flag set")
    will = flags & 0x04
    wqos = (flags >> 3) & 3
    wretain = bool(flags & 0x20)
    if wqos == 3:
        raise MQTTError(MALFORMED, "will QoS 3")
    if not will and (wqos or wretain):
        raise MQTTError(MALFORMED, "will QoS or retain without a will")
    has_user = flags & 0x80
    has_pass = flags & 0x40
    if has_pass and not has_user and level != 5:
        raise MQTTError(MALFORMED, "password without user name")
    keepalive, off = wire.get_u16(buf, off, end)
    c = Connect(version=level, clean=bool(flags & 0x02), keepalive=keepalive)
    if level == 5:
        c.props, off = P.decode(buf, off, end, CONNECT)
    c.client_id, off = wire.get_str(buf, off, end)
    if will:
        if level == 5:
            c.will_props, off = P.decode(buf, off, end, P.WILL)
        c.will_topic, off = wire.get_str(buf, off, end)
        c.will_payload, off = wire.get_bin(buf, off, end)
        c.will_qos = wqos
        c.will_retain = wretain
    if has_user:
        c.username, off = wire.get_str(buf, off, end)
    if has_pass:
        c.password, off = wire.get_bin(buf, off, end)
    if off != end:
        raise MQTTError(MALFORMED, "CONNECT has trailing bytes")
    return c


def _reason_props(buf, off, end, t, version, allowed):
    # Shared tail of DISCONNECT and AUTH: optional reason, optional props.
    reason = 0
    pr = None
    if version == 5 and off < end:
        reason = buf[off]
        off += 1
        if reason not in allowed:
            raise MQTTError(PROTOCOL_ERROR, "%s reason 0x%02X not allowed" % (NAMES[t], reason))
        if off < end:
            pr, off = P.decode(buf, off, end, t)
    if off != end:
        raise MQTTError(MALFORMED, "%s has trailing bytes" % NAMES[t])
    return reason, pr


def _id_and_props(t, buf, off, end, version):
    # The packet identifier and (5.0) properties that open a SUBSCRIBE,
    # SUBACK, UNSUBSCRIBE or UNSUBACK, and the offset of what follows.
    pid, off = wire.get_u16(buf, off, end)
    if pid == 0:
        raise MQTTError(PROTOCOL_ERROR, "%s with packet identifier 0" % NAMES[t])
    pr = None
    if version == 5:
        pr, off = P.decode(buf, off, end, t)
    return pid, pr, off


def filters_head(t, buf, off, end, version):
    # A SUBSCRIBE's or UNSUBSCRIBE's (type t) packet identifier, its
    # properties, and the offset of its first topic filter, for
    # subscribe_filters() or unsubscribe_filters().
    pid, pr, off = _id_and_props(t, buf, off, end, version)
    if off >= end:
        raise MQTTError(PROTOCOL_ERROR, "%s with no topic filter" % NAMES[t])
    return pid, pr, off


def subscribe_filters(buf, off, end, version):
    # The (filter, options) pairs of a SUBSCRIBE from off, one at a time,
    # each checked as it comes. The broker takes them so, never all at
    # once: as a list, the objects of 900 short filters in under 8 KB
    # outgrew the 64 KB an ESP32 has free.
    while off < end:
        f, off = wire.get_str(buf, off, end)
        o, off = wire.get_u8(buf, off, end)
        if version == 5:
            if o & 0xC0:
                raise MQTTError(MALFORMED, "reserved subscription option bits set")
            if o & 3 == 3 or (o >> 4) & 3 == 3:
                # QoS 3 or Retain Handling 3: a Protocol Error (3.8.3.1)
                raise MQTTError(PROTOCOL_ERROR, "bad subscription options 0x%02X" % o)
        elif o & 0xFC or o & 3 == 3:
            raise MQTTError(MALFORMED, "bad requested QoS byte 0x%02X" % o)
        yield f, o


def unsubscribe_filters(buf, off, end):
    # The topic filters of an UNSUBSCRIBE from off, one at a time (as
    # subscribe_filters).
    while off < end:
        f, off = wire.get_str(buf, off, end)
        yield f


def decode(first, buf, off, end, version):
    # One packet body -> packet object. For CONNECT the version comes from
    # the packet itself (Connect.version).
    t = check_flags(first)
    if t == CONNECT:
        return _decode_connect(buf, off, end)
    if t == PUBLISH:
        topic, pid, pr, poff = decode_publish(first, buf, off, end, version)
        return Publish(topic, bytes(buf[poff:end]), (first >> 1) & 3, bool(first & 1),
                       bool(first & 8), pid, pr)
    if PUBACK <= t <= PUBCOMP:
        pid, reason, pr = decode_ack(t, buf, off, end, version)
        return Ack(t, pid, reason, pr)
    if t == PINGREQ or t == PINGRESP:
        if off != end:
            raise MQTTError(MALFORMED, "%s has a body" % NAMES[t])
        return Empty(t)
    if t == DISCONNECT:
        reason, pr = _reason_props(buf, off, end, t, version, _DISCONNECT_REASONS)
        return Disconnect(reason, pr)
    if t == AUTH:
        if version != 5:
            raise MQTTError(PROTOCOL_ERROR, "AUTH in MQTT 3.1.1")
        reason, pr = _reason_props(buf, off, end, t, version, _AUTH_REASONS)
        return Auth(reason, pr)
    if t == CONNACK:
        flags, off = wire.get_u8(buf, off, end)
        if flags & 0xFE:
            raise MQTTError(MALFORMED, "CONNACK reserved flags set")
        reason, off = wire.get_u8(buf, off, end)
        pr = None
        if version == 5:
            if reason not in _CONNACK_REASONS:
                raise MQTTError(PROTOCOL_ERROR, "CONNACK reason 0x%02X not allowed" % reason)
            pr, off = P.decode(buf, off, end, CONNACK)
        elif reason > 5:
            raise MQTTError(PROTOCOL_ERROR, "CONNACK return code %d" % reason)
        if off != end:
            raise MQTTError(MALFORMED, "CONNACK has trailing bytes")
        return Connack(bool(flags), reason, pr)
    if t == SUBSCRIBE or t == UNSUBSCRIBE:
        pid, pr, off = filters_head(t, buf, off, end, version)
        if t == SUBSCRIBE:
            return Subscribe(pid, list(subscribe_filters(buf, off, end, version)), pr)
        return Unsubscribe(pid, list(unsubscribe_filters(buf, off, end)), pr)
    pid, pr, off = _id_and_props(t, buf, off, end, version)
    if t == SUBACK:
        reasons = list(buf[off:end])
        if not reasons:
            raise MQTTError(PROTOCOL_ERROR, "SUBACK with no reason code")
        ok = _SUBACK_REASONS if version == 5 else (0, 1, 2, 0x80)
        for r in reasons:
            if r not in ok:
                raise MQTTError(PROTOCOL_ERROR, "SUBACK reason 0x%02X not allowed" % r)
        return Suback(pid, reasons, pr)
    # UNSUBACK
    if version != 5:
        if off != end:
            raise MQTTError(MALFORMED, "UNSUBACK has trailing bytes")
        return Unsuback(pid)
    reasons = list(buf[off:end])
    if not reasons:
        raise MQTTError(PROTOCOL_ERROR, "UNSUBACK with no reason code")
    for r in reasons:
        if r not in _UNSUBACK_REASONS:
            raise MQTTError(PROTOCOL_ERROR, "UNSUBACK reason 0x%02X not allowed" % r)
    return Unsuback(pid, reasons, pr)


# ---------------------------------------------------------------- encode

def _finish(first, body):
    out = bytearray()
    out.append(first)
    wire.put_varint(out, len(body))
    out.extend(body)
    return bytes(out)


def _props(out, pr, t, version):
    if version == 5:
        P.check_for(pr, t)
        out.extend(P.encode(pr))


def encode_publish(topic_b, payload, qos, retain, dup, pid, props_body, version):
    # One PUBLISH packet. topic_b is the encoded topic (bytes); props_body
    # the encoded properties without length (v5), or None. Returns a
    # bytearray so the broker can patch the packet identifier in place at
    # offset pid_offset(...).
    out = publish_head(topic_b, len(payload), qos, retain, dup, pid, props_body, version)
    out.extend(payload)
    return out


def publish_head(topic_b, n, qos, retain, dup, pid, props_body, version):
    # A PUBLISH up to (not including) its payload of n bytes: the broker
    # sends a large payload straight from the message after this, so the
    # payload is never copied into a second buffer.
    plen = 0
    if version == 5:
        plen = len(props_body) if props_body else 0
    rem = 2 + len(topic_b) + (2 if qos else 0) + n
    if version == 5:
        rem += wire.varint_len(plen) + plen
    out = bytearray()
    out.append(0x30 | (8 if dup else 0) | (qos << 1) | (1 if retain else 0))
    wire.put_varint(out, rem)
    wire.put_u16(out, len(topic_b))
    out.extend(topic_b)
    if qos:
        wire.put_u16(out, pid)
    if version == 5:
        wire.put_varint(out, plen)
        if plen:
            out.extend(props_body)
    return out


def encode(pkt, version=4):
    t = pkt.type
    out = bytearray()
    if t == CONNECT:
        c = pkt
        version = c.version
        name = b"MQIsdp" if version == 3 else b"MQTT"
        wire.put_bin(out, name)
        out.append(version)
        flags = 0x02 if c.clean else 0
        if c.will_topic is not None:
            flags |= 0x04 | (c.will_qos << 3) | (0x20 if c.will_retain else 0)
        if c.username is not None:
            flags |= 0x80
        if c.password is not None:
            flags |= 0x40
        out.append(flags)
        wire.put_u16(out, c.keepalive)
        _props(out, c.props, CONNECT, version)
        wire.put_str(out, c.client_id)
        if c.will_topic is not None:
            _props(out, c.will_props, P.WILL, version)
            wire.put_str(out, c.will_topic)
            wire.put_bin(out, c.will_payload)
        if c.username is not None:
            wire.put_str(out, c.username)
        if c.password is not None:
            wire.put_bin(out, c.password)
        return _finish(0x10, out)
    if t == CONNACK:
        out.append(1 if pkt.session_present else 0)
        if version == 5:
            out.append(pkt.reason)
            _props(out, pkt.props, CONNACK, version)
        else:
            out.append(pkt.reason)
        return _finish(0x20, out)
    if t == PUBLISH:
        body = None
        if version == 5:
            P.check_for(pkt.props, PUBLISH)
            body = P.encode_body(pkt.props)
        topic_b = pkt.topic.encode("utf-8") if isinstance(pkt.topic, str) else pkt.topic
        if len(topic_b) > 65535:
            raise MQTTError(MALFORMED, "topic longer than 65535 bytes")
        return bytes(encode_publish(topic_b, pkt.payload, pkt.qos, pkt.retain, pkt.dup, pkt.pid,
                                    body, version))
    if PUBACK <= t <= PUBCOMP:
        wire.put_u16(out, pkt.pid)
        if version == 5 and (pkt.reason or pkt.props):
            out.append(pkt.reason)
            if pkt.props:
                _props(out, pkt.props, t, version)
        return _finish((t << 4) | (2 if t == PUBREL else 0), out)
    if t == SUBSCRIBE:
        wire.put_u16(out, pkt.pid)
        _props(out, pkt.props, t, version)
        for f, o in pkt.topics:
            wire.put_str(out, f)
            out.append(o)
        return _finish(0x82, out)
    if t == SUBACK:
        wire.put_u16(out, pkt.pid)
        _props(out, pkt.props, t, version)
        out.extend(bytes(pkt.reasons))
        return _finish(0x90, out)
    if t == UNSUBSCRIBE:
        wire.put_u16(out, pkt.pid)
        _props(out, pkt.props, t, version)
        for f in pkt.filters:
            wire.put_str(out, f)
        return _finish(0xA2, out)
    if t == UNSUBACK:
        wire.put_u16(out, pkt.pid)
        if version == 5:
            _props(out, pkt.props, t, version)
            out.extend(bytes(pkt.reasons or ()))
        return _finish(0xB0, out)
    if t == PINGREQ or t == PINGRESP:
        return bytes((t << 4, 0))
    if t == DISCONNECT or t == AUTH:
        if version == 5 and (pkt.reason or pkt.props):
            out.append(pkt.reason)
            if pkt.props:
                _props(out, pkt.props, t, version)
        return _finish(t << 4, out)
    raise MQTTError(MALFORMED, "unknown packet type %d" % t)


def pid_offset(topic_len, rem_len):
    # Where the packet identifier sits in a PUBLISH laid out by
    # encode_publish(): after the fixed header and the topic.
    return 1 + wire.varint_len(rem_len) + 2 + topic_len
