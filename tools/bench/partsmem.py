#!/usr/bin/env python3
"""The heap of single parts of the broker, measured on the board twin.

    .venv/bin/python tools/bench/partsmem.py [--docs-only]

Each figure is gc.mem_alloc() on the 32-bit twin, after gc.collect(),
around one part: a user of the password file, a full login-throttle
table, PBKDF2's garbage per iteration and the live heap between its
iterations, a TLS listener's context (Mbed TLS outside the Python heap, as
on an ESP32, and inside it, as on the rp2 port: `tools/twin.py --variant
tlsheap`, built on first use), and the MQTT codec (lib/mqtt): its import
from source, .mpy and frozen, and the largest PUBLISH encode_publish()
builds in a board's heap. Records docs/partsmem.json and writes the
figures into docs/security.md and lib/README.md between their markers
from that record. Some seconds (and the tlsheap twin's build, once).
--docs-only writes the docs from the record without measuring;
host_tests/test_doc_figures.py fails when the text differs from what the
record renders.
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "lib"))
import docregion  # noqa: E402
import pwhash  # noqa: E402

RECORD = "docs/partsmem.json"
COMMAND = "`tools/bench/partsmem.py`"
USERS = 33
USER = "sensor-%02d"  # 9-character user names
THROTTLE = 16  # LoginThrottle's table size (auth._TABLE)
CODEC = "errors, wire, props, packets, topic"

HELD = r"""
import gc, json, sys

def held(fn):
    # Heap still held after fn(), which returns what it made (kept alive).
    gc.collect()
    a = gc.mem_alloc()
    keep = fn()
    gc.collect()
    n = gc.mem_alloc() - a
    keep = None
    return n
"""

AUTH_SCRIPT = HELD + r"""
import pwhash
from broker.auth import PasswordFile, LoginThrottle

out = {}
PasswordFile(sys.argv[1])  # anything loaded on first use, loaded once
one = held(lambda: PasswordFile(sys.argv[1]))
many = held(lambda: PasswordFile(sys.argv[2]))
out["user"] = (many - one) // (int(sys.argv[3]) - 1)

def full():
    t = LoginThrottle()
    for i in range(t.size):
        t.failed("192.168.100.%d" % (i + 101))
    return t
full()
# The table is allocated whole when the throttle is made (addrtable.py):
# the heap a full one holds is the throttle's.
out["throttle_full"] = held(full)

salt = b"0123456789ab"
def garbage(n):
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    pwhash.pbkdf2_sha256("password", salt, n)
    b = gc.mem_alloc() - a
    gc.enable()
    return b
garbage(10)
out["pbkdf2_garbage_per_iteration"] = (garbage(300) - garbage(100)) // 200
gc.collect()
base = gc.mem_alloc()
peak = 0
for _ in pwhash.pbkdf2_steps("password", salt, 200, 32, 1):
    gc.collect()
    peak = max(peak, gc.mem_alloc() - base)
out["pbkdf2_live_peak"] = peak
print(json.dumps(out))
"""

TLS_SCRIPT = HELD + r"""
from broker import listeners, x509

d = sys.argv[1]
plain = {"port": 8883, "certfile": d + "/server.der", "keyfile": d + "/server.key.der"}
ca = dict(plain, cafile=d + "/ca.der", require_certificate=True)
ident = dict(ca, use_identity_as_username=True)
listeners._tls_context(ident)  # anything loaded on first use, loaded once
print(json.dumps({k: held(lambda: listeners._tls_context(L))
                  for k, L in (("plain", plain), ("ca", ca), ("identity", ident))}))
"""

IMPORT_SCRIPT = HELD + r"""
def imp():
    from mqtt import errors, wire, props, packets, topic
    return packets
print(json.dumps(held(imp)))
"""

PUBLISH_SCRIPT = r"""
import sys
from mqtt import errors, wire, props, packets, topic
payload = bytes(int(sys.argv[1]))
packet = packets.encode_publish(b"sensors/kitchen/t", payload, 1, False, False, 1, None, 4)
print("built", len(packet))
"""


def _profile(board):
    return json.loads((REPO / "boards" / (board + ".json")).read_text())


def _openssl(d, *args):
    subprocess.run(["openssl", *args], cwd=str(d), check=True, capture_output=True)


def certificates(d):
    """A CA and a server certificate signed by it, P-256, in DER."""
    if not shutil.which("openssl"):
        raise SystemExit("partsmem: openssl is missing (make sysdeps installs it)")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-days", "30", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=ca")
    _openssl(d, "x509", "-in", "ca.pem", "-outform", "DER", "-out", "ca.der")
    _openssl(d, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=gateway")
    _openssl(d, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "30", "-out", "server.pem")
    _openssl(d, "x509", "-in", "server.pem", "-outform", "DER", "-out", "server.der")
    _openssl(d, "pkey", "-in", "server.key", "-outform", "DER", "-out", "server.key.der")


def _json(out):
    return json.loads(out.strip().splitlines()[-1])


def auth(tmp):
    files = []
    for n in (1, USERS):
        p = Path(tmp) / ("passwd%d" % n)
        p.write_text("".join("%s:%s\n" % (USER % i, pwhash.make_hash("pw%d" % i, 10)) for i in range(n)))
        files.append(p)
    return _json(docregion.twin_run(AUTH_SCRIPT, args=files + [USERS], heap="1M"))


def tls(tmp):
    certificates(tmp)
    return {"outside": _json(docregion.twin_run(TLS_SCRIPT, args=[tmp], heap=_profile("esp32")["heap"])),
            "inside": _json(docregion.twin_run(TLS_SCRIPT, args=[tmp], heap=_profile("pico_w")["heap"],
                                               binary="tlsheap"))}


# Where the codec comes from: (twin binary, MICROPYPATH).
CODEC_FROM = {"source": ("stock", (".frozen", str(REPO / "lib"))),
              "mpy": ("stock", (".frozen", str(REPO / "build" / "host" / "lib"))),
              "frozen": ("broker", (".frozen",))}


def largest_publish(source, heap):
    # The largest payload (in steps of 256 bytes) encode_publish() makes a
    # packet of, from a fresh payload, in a fresh interpreter.
    binary, path = CODEC_FROM[source]
    lo, hi = 0, heap // 256

    def fits(n):
        try:
            docregion.twin_run(PUBLISH_SCRIPT, args=[n * 256], heap=heap, path=path, binary=binary, timeout=60)
            return True
        except SystemExit:
            return False
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def codec():
    subprocess.run([sys.executable, str(REPO / "tools" / "build.py"), "--target", "host", "-q"], check=True,
                   cwd=str(REPO))
    heap = _profile("esp32")["heap"]
    out = {"import": {k: _json(docregion.twin_run(IMPORT_SCRIPT, heap=heap, path=p, binary=b))
                      for k, (b, p) in CODEC_FROM.items()},
           "heap": heap}
    out["largest_publish"] = {k: largest_publish(k, heap) for k in ("mpy", "frozen")}
    return out


def measure():
    with tempfile.TemporaryDirectory(prefix="partsmem_") as tmp:
        return dict(docregion.stamp(), auth=auth(tmp), tls=tls(tmp), codec=codec(), users=USERS,
                    iterations=pwhash.ITERATIONS)


# ---- rendering ----

def _b(n):
    return format(n, ",")


def _by(rec):
    return "(`tools/bench/partsmem.py` on the 32-bit twin, commit %s, %s)" % (rec["commit"], rec["date"])


def user_md(rec):
    return ("The broker reads the file line by line and keeps only the decoded salt and hash of each user: %s bytes "
            "of heap per user with 9-character user names %s." % (_b(rec["auth"]["user"]), _by(rec)))


def pbkdf2_md(rec):
    a = rec["auth"]
    per = a["pbkdf2_garbage_per_iteration"]
    counts = sorted({n for b, n in rec["iterations"].items() if b != "unix"})
    return ("Each iteration leaves %s bytes of garbage on the 32-bit twin (two hash objects, two digests and two "
            "ints): %s for a login at %s iterations, so a login runs several GC passes. Between iterations the "
            "live heap grows by at most %s bytes (the generator and its hash state) %s." % (
                _b(per), " and ".join("%s KB" % _b(round(per * n / 1000)) for n in counts),
                " and ".join(_b(n) for n in counts), _b(a["pbkdf2_live_peak"]), _by(rec)))


def throttle_md(rec):
    return ("The table is allocated whole at start, so that no entry made later cuts the free heap into "
            "pieces (`firmware/broker/addrtable.py`): %d addresses, %s bytes of heap, full or empty %s." % (
        THROTTLE, _b(rec["auth"]["throttle_full"]), _by(rec)))


def tls_md(rec):
    t = rec["tls"]
    return "\n".join([
        "A listener's TLS context (a P-256 certificate and key) holds this much of the Python heap, once per "
        "listener %s:" % _by(rec), "",
        "| Mbed TLS allocates | plain | with a CA (`require_certificate`) | with the identity callback too |",
        "|---|---|---|---|",
        "| outside the Python heap (the twin; the ESP32, from its IDF heap) | %s |" % " | ".join(
            _b(t["outside"][k]) for k in ("plain", "ca", "identity")),
        "| from the Python heap (the tlsheap twin; the rp2 port) | %s |" % " | ".join(
            _b(t["inside"][k]) for k in ("plain", "ca", "identity"))])


def codec_md(rec):
    c = rec["codec"]
    i = c["import"]
    return ("Importing the codec (`%s`) holds %s bytes of heap from source, %s from `.mpy` files and %s frozen "
            "into the firmware. In a %s-byte heap (esp32's) the largest PUBLISH `encode_publish` builds from a "
            "fresh payload has a payload of about %s bytes with the codec from `.mpy` files and %s with it "
            "frozen: payload and packet must each fit in one free block %s." % (
                CODEC, _b(i["source"]), _b(i["mpy"]), _b(i["frozen"]), _b(c["heap"]),
                _b(c["largest_publish"]["mpy"]), _b(c["largest_publish"]["frozen"]), _by(rec)))


SEC = "docs/security.md"
REGIONS = [docregion.Region("passwd-user-heap", SEC, user_md), docregion.Region("pbkdf2-heap", SEC, pbkdf2_md),
           docregion.Region("throttle-heap", SEC, throttle_md), docregion.Region("tls-context-heap", SEC, tls_md),
           docregion.Region("codec-heap", "lib/README.md", codec_md)]


def main():
    return docregion.main(sys.modules[__name__], lambda a: measure())


if __name__ == "__main__":
    sys.exit(main())
