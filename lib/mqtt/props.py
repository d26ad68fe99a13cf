# MQTT 5.0 properties (spec 2.2.2.2): identifier, wire type, and the packets
# each may appear in. Decoded properties are a dict {identifier: value};
# User Property (0x26) is a list of (name, value) pairs and, in PUBLISH,
# Subscription Identifier (0x0B) is a list of ints, since both may repeat.
from mqtt.compat import const, micropython
from mqtt.errors import MQTTError, MALFORMED, PROTOCOL_ERROR
from mqtt import wire

PAYLOAD_FORMAT = const(0x01)
MESSAGE_EXPIRY = const(0x02)
CONTENT_TYPE = const(0x03)
RESPONSE_TOPIC = const(0x08)
CORRELATION_DATA = const(0x09)
SUBSCRIPTION_ID = const(0x0B)
SESSION_EXPIRY = const(0x11)
ASSIGNED_CLIENT_ID = const(0x12)
SERVER_KEEP_ALIVE = const(0x13)
AUTH_METHOD = const(0x15)
AUTH_DATA = const(0x16)
REQUEST_PROBLEM_INFO = const(0x17)
WILL_DELAY = const(0x18)
REQUEST_RESPONSE_INFO = const(0x19)
RESPONSE_INFO = const(0x1A)
SERVER_REFERENCE = const(0x1C)
REASON_STRING = const(0x1F)
RECEIVE_MAXIMUM = const(0x21)
TOPIC_ALIAS_MAXIMUM = const(0x22)
TOPIC_ALIAS = const(0x23)
MAXIMUM_QOS = const(0x24)
RETAIN_AVAILABLE = const(0x25)
USER_PROPERTY = const(0x26)
MAXIMUM_PACKET_SIZE = const(0x27)
WILDCARD_SUB_AVAILABLE = const(0x28)
SUB_ID_AVAILABLE = const(0x29)
SHARED_SUB_AVAILABLE = const(0x2A)

# Wire types.
_BYTE = const(1)
_U16 = const(2)
_U32 = const(3)
_VARINT = const(4)
_STR = const(5)
_BIN = const(6)
_PAIR = const(7)
# How each kind of value is read (a user property, _PAIR, is two strings).
_GET = {_BYTE: wire.get_u8, _U16: wire.get_u16, _U32: wire.get_u32, _VARINT: wire.get_varint,
        _STR: wire.get_str, _BIN: wire.get_bin}

# Packet masks: bit n is packet type n; bit 0 (type 0 is reserved) stands
# for the Will Properties of CONNECT.
WILL = const(0)
_CONNECT = const(1 << 1)
_CONNACK = const(1 << 2)
_PUBLISH = const(1 << 3)
_PUBACKS = const((1 << 4) | (1 << 5) | (1 << 6) | (1 << 7))
_SUBSCRIBE = const(1 << 8)
_SUBACK = const(1 << 9)
_UNSUBSCRIBE = const(1 << 10)
_UNSUBACK = const(1 << 11)
_DISCONNECT = const(1 << 14)
_AUTH = const(1 << 15)
_WILLM = const(1)

# identifier -> (wire type, packet mask, name), None where no property
# has that identifier: TABLE[pid] for pid < _IDS. A tuple of constants is
# in flash with the code; as a dict it took 256 B of heap.
_IDS = const(0x2B)
TABLE = (
    None,  # 0x00
    (_BYTE, _PUBLISH | _WILLM, "Payload Format Indicator"),  # 0x01
    (_U32, _PUBLISH | _WILLM, "Message Expiry Interval"),  # 0x02
    (_STR, _PUBLISH | _WILLM, "Content Type"),  # 0x03
    None,  # 0x04
    None,  # 0x05
    None,  # 0x06
    None,  # 0x07
    (_STR, _PUBLISH | _WILLM, "Response Topic"),  # 0x08
    (_BIN, _PUBLISH | _WILLM, "Correlation Data"),  # 0x09
    None,  # 0x0A
    (_VARINT, _PUBLISH | _SUBSCRIBE, "Subscription Identifier"),  # 0x0B
    None,  # 0x0C
    None,  # 0x0D
    None,  # 0x0E
    None,  # 0x0F
    None,  # 0x10
    (_U32, _CONNECT | _CONNACK | _DISCONNECT, "Session Expiry Interval"),  # 0x11
    (_STR, _CONNACK, "Assigned Client Identifier"),  # 0x12
    (_U16, _CONNACK, "Server Keep Alive"),  # 0x13
    None,  # 0x14
    (_STR, _CONNECT | _CONNACK | _AUTH, "Authentication Method"),  # 0x15
    (_BIN, _CONNECT | _CONNACK | _AUTH, "Authentication Data"),  # 0x16
    (_BYTE, _CONNECT, "Request Problem Information"),  # 0x17
    (_U32, _WILLM, "Will Delay Interval"),  # 0x18
    (_BYTE, _CONNECT, "Request Response Information"),  # 0x19
    (_STR, _CONNACK, "Response Information"),  # 0x1A
    None,  # 0x1B
    (_STR, _CONNACK | _DISCONNECT, "Server Reference"),  # 0x1C
    None,  # 0x1D
    None,  # 0x1E
    (_STR, _CONNACK | _PUBACKS | _SUBACK | _UNSUBACK | _DISCONNECT | _AUTH, "Reason String"),  # 0x1F
    None,  # 0x20
    (_U16, _CONNECT | _CONNACK, "Receive Maximum"),  # 0x21
    (_U16, _CONNECT | _CONNACK, "Topic Alias Maximum"),  # 0x22
    (_U16, _PUBLISH, "Topic Alias"),  # 0x23
    (_BYTE, _CONNACK, "Maximum QoS"),  # 0x24
    (_BYTE, _CONNACK, "Retain Available"),  # 0x25
    (  # 0x26
        _PAIR,
        _CONNECT | _CONNACK | _PUBLISH | _WILLM | _PUBACKS | _SUBSCRIBE | _SUBACK | _UNSUBSCRIBE | _UNSUBACK | _DISCONNECT | _AUTH,
        "User Property",
    ),
    (_U32, _CONNECT | _CONNACK, "Maximum Packet Size"),  # 0x27
    (_BYTE, _CONNACK, "Wildcard Subscription Available"),  # 0x28
    (_BYTE, _CONNACK, "Subscription Identifier Available"),  # 0x29
    (_BYTE, _CONNACK, "Shared Subscription Available"),  # 0x2A
)

# Properties whose value must be 0 or 1.
_BOOLEAN = (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A)
# Properties that must not be 0.
_NONZERO = (0x0B, 0x21, 0x23, 0x27)


@micropython.native  # (tools/frames.py: its frame on the C stack)
def decode(buf, off, end, ptype):
    # Reads a property length and the properties; returns (dict or None,
    # offset after them). ptype is the packet type, or WILL.
    n, off = wire.get_varint(buf, off, end)
    pend = off + n
    if pend > end:
        raise MQTTError(MALFORMED, "properties run past the packet")
    if n == 0:
        return None, off
    mask = 1 << ptype
    props = {}
    while off < pend:
        pid, off = wire.get_varint(buf, off, pend)
        spec = TABLE[pid] if pid < _IDS else None
        if spec is None:
            raise MQTTError(MALFORMED, "unknown property 0x%02X" % pid)
        t = spec[0]
        if not spec[1] & mask:
            # "not valid for its packet type ... is a Malformed Packet" (2.2.2.2)
            raise MQTTError(MALFORMED, "property 0x%02X not allowed here" % pid)
        get = _GET.get(t)
        if get is not None:
            v, off = get(buf, off, pend)
        else:
            k, off = wire.get_str(buf, off, pend)
            v, off = wire.get_str(buf, off, pend)
            v = (k, v)
        if pid in _BOOLEAN and v > 1:
            raise MQTTError(PROTOCOL_ERROR, "property 0x%02X must be 0 or 1" % pid)
        if pid in _NONZERO and v == 0:
            # The spec calls a 0 a Protocol Error for the others; for a
            # Topic Alias it names no code, and Mosquitto answers Malformed.
            raise MQTTError(MALFORMED if pid == TOPIC_ALIAS else PROTOCOL_ERROR,
                            "property 0x%02X must not be 0" % pid)
        if pid == USER_PROPERTY:
            lst = props.get(pid)
            if lst is None:
                props[pid] = [v]
            else:
                lst.append(v)
        elif pid == SUBSCRIPTION_ID and ptype == 3:
            lst = props.get(pid)
            if lst is None:
                props[pid] = [v]
            else:
                lst.append(v)
        elif pid in props:
            raise MQTTError(PROTOCOL_ERROR, "property 0x%02X given twice" % pid)
        else:
            props[pid] = v
    return props, off


def _put_one(out, pid, t, v):
    wire.put_varint(out, pid)
    if t == _BYTE:
        out.append(v)
    elif t == _U16:
        wire.put_u16(out, v)
    elif t == _U32:
        wire.put_u32(out, v)
    elif t == _VARINT:
        wire.put_varint(out, v)
    elif t == _STR:
        wire.put_str(out, v)
    elif t == _BIN:
        wire.put_bin(out, v)
    else:
        wire.put_str(out, v[0])
        wire.put_str(out, v[1])


def encode_body(props):
    # The properties without their length prefix, in identifier order so
    # that both interpreters produce the same bytes.
    out = bytearray()
    if props:
        for pid in sorted(props):
            v = props[pid]
            t = TABLE[pid][0]
            if pid == USER_PROPERTY or (pid == SUBSCRIPTION_ID and isinstance(v, list)):
                for x in v:
                    _put_one(out, pid, t, x)
            else:
                _put_one(out, pid, t, v)
    return out


def encode(props):
    # Property length followed by the properties.
    body = encode_body(props)
    out = bytearray()
    wire.put_varint(out, len(body))
    out.extend(body)
    return out


def check_for(props, ptype):
    # Raises when a property may not appear in this packet type; encoders
    # call it so that tools cannot emit what a peer must reject.
    if props:
        mask = 1 << ptype
        for pid in props:
            spec = TABLE[pid] if 0 <= pid < _IDS else None
            if spec is None or not spec[1] & mask:
                raise MQTTError(PROTOCOL_ERROR, "property 0x%02X not allowed here" % pid)
