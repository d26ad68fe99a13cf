# The subject's common name (CN) in a DER X.509 certificate, for TLS
# listeners with use_identity_as_username. The TLS library has already
# checked the certificate against the CA; this only walks the DER to the
# subject: Certificate -> tbsCertificate -> [0] version (optional), serial,
# signature, issuer, validity, subject (RFC 5280 4.1). Runs on the boards
# and under CPython (its tests).

_CN_OID = b"\x06\x03\x55\x04\x03"  # OID 2.5.4.3, id-at-commonName
# UTF8String, PrintableString, IA5String: what certificates use for a CN.
_TEXT = (0x0C, 0x13, 0x16)


def _tlv(b, i, end):
    # The element at b[i]: (tag, first byte of its value, end of it).
    if i + 2 > end:
        raise ValueError("truncated")
    tag = b[i]
    n = b[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if not 0 < k < 4 or i + k > end:
            raise ValueError("bad length")
        n = 0
        for j in range(k):
            n = n << 8 | b[i + j]
        i += k
    if i + n > end:
        raise ValueError("truncated")
    return tag, i, i + n


def common_name(der):
    # The first CN of the subject as a str, or None when the certificate
    # has none that is text without U+0000. der: bytes or a memoryview.
    try:
        end = len(der)
        _, i, end = _tlv(der, 0, end)  # Certificate
        _, i, end = _tlv(der, i, end)  # tbsCertificate
        tag, _, e = _tlv(der, i, end)
        if tag == 0xA0:  # version
            i = e
        for _ in range(4):  # serial, signature, issuer, validity
            i = _tlv(der, i, end)[2]
        _, i, end = _tlv(der, i, end)  # subject: SEQUENCE OF SET OF
        while i < end:
            _, a, i = _tlv(der, i, end)  # a relative distinguished name
            while a < i:
                _, v, a = _tlv(der, a, i)  # SEQUENCE {type, value}
                if bytes(der[v : v + 5]) != _CN_OID:
                    continue
                tag, s, e = _tlv(der, v + 5, a)
                if tag not in _TEXT:
                    return None
                name = str(bytes(der[s:e]), "utf-8")
                return name if name and "\0" not in name else None
    except (ValueError, IndexError, UnicodeError):
        pass
    return None
