# Password hashing for the broker's password_file: HMAC-SHA256 (RFC 2104)
# and PBKDF2-HMAC-SHA256 (RFC 8018), written on hashlib.sha256 alone because
# the boards have neither `hmac` nor `hashlib.pbkdf2_hmac`. The same module
# runs under CPython, where tools/passwd uses it to write the file.
#
# A stored hash is one string (docs/security.md describes it):
#   $p256$<iterations>$<salt, base64>$<PBKDF2-HMAC-SHA256 output, base64>
# Mosquitto's "$7$" lines use PBKDF2-SHA512, which the boards cannot compute,
# so ours carry an id of their own and are never mistaken for those.
import binascii
import hashlib
import os

from mqtt.compat import const

PREFIX = "$p256$"
SALT_BYTES = const(12)
HASH_BYTES = const(32)
MIN_ITERATIONS = const(1)
# A file with a larger count would stall a board for minutes per login.
MAX_ITERATIONS = const(10000000)

# Iterations per board, chosen so one login costs about 250 ms of CPU on
# that board. Host timings and the board estimates behind them are in
# docs/security.md; correct them once someone measures on hardware.
ITERATIONS = {
    "esp32": 1000,
    "esp32s3": 1000,
    "pico_w": 500,
    "pico2_w": 1000,
    "unix": 10000,
}
# What tools/passwd uses without -I or -B: the ESP32 figure.
DEFAULT_ITERATIONS = const(1000)

_BLOCK = const(64)
_sha256 = hashlib.sha256
# CPython's hash objects can be copied; MicroPython's cannot (checked on
# 1.22-1.29), so there each HMAC re-hashes the 64-byte key pads instead.
_HAS_COPY = hasattr(_sha256(), "copy")


def _bytes(s):
    if isinstance(s, str):
        return s.encode("utf-8")
    return bytes(s)


def _pads(key):
    # The HMAC inner and outer key blocks (RFC 2104 section 2).
    if len(key) > _BLOCK:
        key = _sha256(key).digest()
    key = key + bytes(_BLOCK - len(key))
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def pbkdf2_steps(password, salt, iterations, dklen=32, every=0):
    # RFC 8018 section 5.2 with PRF = HMAC-SHA256, as a generator: yields
    # None after every `every` iterations (0: never), then the derived key.
    # The broker hashes a login in such slices between other clients' work
    # (a full check takes about 250 ms on an ESP32).
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    if dklen < 1:
        raise ValueError("dklen must be at least 1")
    ipad, opad = _pads(_bytes(password))
    salt = _bytes(salt)
    sha = _sha256
    frm = int.from_bytes
    out = b""
    blk = 1
    left = every
    copy = _HAS_COPY
    while len(out) < dklen:
        h = sha(ipad)
        h.update(salt)
        h.update(blk.to_bytes(4, "big"))
        o = sha(opad)
        o.update(h.digest())
        u = o.digest()
        # U1 ^ U2 ^ ... kept as one big int: a single C-level XOR per round
        # instead of 32 interpreted byte operations.
        acc = frm(u, "big")
        n = iterations - 1
        ih = sha(ipad)
        oh = sha(opad)
        while n:
            if copy:
                h = ih.copy()  # pyright: ignore[reportAttributeAccessIssue]
                h.update(u)
                o = oh.copy()  # pyright: ignore[reportAttributeAccessIssue]
            else:
                h = sha(ipad)
                h.update(u)
                o = sha(opad)
            o.update(h.digest())
            u = o.digest()
            acc ^= frm(u, "big")
            n -= 1
            if every:
                left -= 1
                if not left:
                    left = every
                    yield None
        out += acc.to_bytes(HASH_BYTES, "big")
        blk += 1
    yield out[:dklen]


def pbkdf2_sha256(password, salt, iterations, dklen=32):
    for key in pbkdf2_steps(password, salt, iterations, dklen):
        return key


def _b64(b):
    return binascii.b2a_base64(b)[:-1].decode()


def _unb64(s, what):
    try:
        raw = binascii.a2b_base64(s)
    except ValueError:
        raise ValueError("bad base64 in the %s" % what)
    # a2b_base64 skips characters it does not know; insist on the exact text.
    if not raw or _b64(raw) != s:
        raise ValueError("bad base64 in the %s" % what)
    return raw


def parse(hashstr):
    # "$p256$iter$salt$hash" -> (iterations, salt, digest); ValueError if the
    # string is not of that form. The message never quotes the string.
    if not hashstr.startswith(PREFIX):
        raise ValueError("not a %s hash" % PREFIX)
    parts = hashstr[len(PREFIX):].split("$")
    if len(parts) != 3:
        raise ValueError("expected %s<iterations>$<salt>$<hash>" % PREFIX)
    it = parts[0]
    if not it.isdigit() or len(it) > 8:
        raise ValueError("bad iteration count")
    it = int(it)
    if it < MIN_ITERATIONS or it > MAX_ITERATIONS:
        raise ValueError("iteration count outside %d..%d" % (MIN_ITERATIONS, MAX_ITERATIONS))
    salt = _unb64(parts[1], "salt")
    digest = _unb64(parts[2], "hash")
    if len(digest) != HASH_BYTES:
        raise ValueError("hash is %d bytes, expected %d" % (len(digest), HASH_BYTES))
    return it, salt, digest


def make_hash(password, iterations=DEFAULT_ITERATIONS, salt=None):
    if iterations < MIN_ITERATIONS or iterations > MAX_ITERATIONS:
        raise ValueError("iteration count outside %d..%d" % (MIN_ITERATIONS, MAX_ITERATIONS))
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    salt = _bytes(salt)
    if not salt:
        raise ValueError("empty salt")
    dk = pbkdf2_sha256(password, salt, iterations, HASH_BYTES)
    return "%s%d$%s$%s" % (PREFIX, iterations, _b64(salt), _b64(dk))


def same_bytes(a, b):
    # Compares every byte whatever the first difference, so the time taken
    # does not tell an attacker how much of a guess was right.
    if len(a) != len(b):
        return False
    d = 0
    for i in range(len(a)):
        d |= a[i] ^ b[i]
    return d == 0


def check_steps(password, iterations, salt, digest, every=0):
    # check() in slices: yields None after every `every` iterations, then
    # the verdict (True or False).
    for key in pbkdf2_steps(password, salt, iterations, len(digest), every):
        if key is not None:
            yield same_bytes(key, digest)
            return
        yield None


def check(password, iterations, salt, digest):
    # verify() for an already parsed hash.
    for ok in check_steps(password, iterations, salt, digest):
        return ok


def verify(password, hashstr):
    # True when password matches hashstr. ValueError if hashstr is malformed.
    it, salt, digest = parse(hashstr)
    return check(password, it, salt, digest)
