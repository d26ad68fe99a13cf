# Data representations of MQTT (spec 1.5): two- and four-byte integers,
# variable byte integers, UTF-8 strings and binary data.
#
# Readers take a buffer (bytes, bytearray or memoryview), an offset and the
# end of the packet, and return (value, new_offset). They never read past
# `end` and raise MQTTError(MALFORMED) instead. Writers append to a
# bytearray, which the callers size once.
from mqtt.errors import MQTTError, MALFORMED

MAX_VARINT = 268435455


def varint_len(n):
    return 1 if n < 128 else 2 if n < 16384 else 3 if n < 2097152 else 4


def put_varint(out, n, most=4):
    # most: bytes at most, MQTT's 4 (MAX_VARINT); the broker's store
    # writes 32-bit values in 5 (persist.py).
    if n < 0 or n >> 7 * most:
        raise MQTTError(MALFORMED, "variable byte integer out of range")
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def get_varint(buf, off, end, most=4):
    n = 0
    shift = 0
    while True:
        if off >= end:
            raise MQTTError(MALFORMED, "truncated variable byte integer")
        b = buf[off]
        off += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, off
        shift += 7
        if shift >= 7 * most:
            raise MQTTError(MALFORMED, "variable byte integer longer than %d bytes" % most)


def get_u8(buf, off, end):
    if off >= end:
        raise MQTTError(MALFORMED, "truncated byte")
    return buf[off], off + 1


def get_u16(buf, off, end):
    if off + 2 > end:
        raise MQTTError(MALFORMED, "truncated two byte integer")
    return (buf[off] << 8) | buf[off + 1], off + 2


def get_u32(buf, off, end):
    if off + 4 > end:
        raise MQTTError(MALFORMED, "truncated four byte integer")
    return (buf[off] << 24) | (buf[off + 1] << 16) | (buf[off + 2] << 8) | buf[off + 3], off + 4


def put_u16(out, n):
    out.append((n >> 8) & 0xFF)
    out.append(n & 0xFF)


def put_u32(out, n):
    out.append((n >> 24) & 0xFF)
    out.append((n >> 16) & 0xFF)
    out.append((n >> 8) & 0xFF)
    out.append(n & 0xFF)


def utf8_valid(buf, off, end):
    # Well-formed UTF-8 (RFC 3629) without U+0000 and without the UTF-16
    # surrogates U+D800..U+DFFF (MQTT-1.5.4-1, -2). MicroPython's own
    # decoder accepts encoded surrogates, so both interpreters use this.
    i = off
    while i < end:
        b = buf[i]
        if b < 0x80:
            if b == 0:
                return False
            i += 1
            continue
        if b < 0xC2:
            return False
        if b < 0xE0:
            n = 1
            lo = 0x80
            hi = 0xBF
        elif b < 0xF0:
            n = 2
            lo = 0xA0 if b == 0xE0 else 0x80
            hi = 0x9F if b == 0xED else 0xBF
        elif b < 0xF5:
            n = 3
            lo = 0x90 if b == 0xF0 else 0x80
            hi = 0x8F if b == 0xF4 else 0xBF
        else:
            return False
        if i + n >= end:
            return False
        c = buf[i + 1]
        if c < lo or c > hi:
            return False
        j = i + 2
        i += n + 1
        while j < i:
            c = buf[j]
            if c < 0x80 or c > 0xBF:
                return False
            j += 1
    return True


def get_str(buf, off, end):
    n, off = get_u16(buf, off, end)
    e = off + n
    if e > end:
        raise MQTTError(MALFORMED, "string runs past the packet")
    try:
        s = str(buf[off:e], "utf-8")
    except UnicodeError:
        raise MQTTError(MALFORMED, "invalid UTF-8 string")
    # As many characters as bytes means plain ASCII: then only U+0000 can
    # be wrong, and the byte-by-byte check (slow in MicroPython) is skipped.
    if len(s) == n:
        if "\x00" in s:
            raise MQTTError(MALFORMED, "U+0000 in a string")
    elif not utf8_valid(buf, off, e):
        raise MQTTError(MALFORMED, "invalid UTF-8 string")
    return s, e


def get_bin(buf, off, end):
    n, off = get_u16(buf, off, end)
    e = off + n
    if e > end:
        raise MQTTError(MALFORMED, "binary data runs past the packet")
    return bytes(buf[off:e]), e


def put_str(out, s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    if len(b) > 65535:
        raise MQTTError(MALFORMED, "string longer than 65535 bytes")
    put_u16(out, len(b))
    out.extend(b)


def put_bin(out, b):
    if len(b) > 65535:
        raise MQTTError(MALFORMED, "binary data longer than 65535 bytes")
    put_u16(out, len(b))
    out.extend(b)
