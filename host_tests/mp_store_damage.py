# Damaged store files on the host filesystem (MicroPython side): a segment
# and a log slot cut at every byte, and with a bit flipped in every byte.
#
#   micropython mp_store_damage.py DIR
#
# open() must succeed every time, recover every whole record (for a log,
# the unit is the batch: a damaged batch is dropped whole, the batches after
# it are kept) and report what it dropped. A compaction afterwards must
# leave a store that reopens clean. Prints "RESULT ..." counts.
import os
import struct
import sys

from broker.store import Store

DIR = sys.argv[1]
SAVE = DIR + "_orig"
OPTS = {"slots": 16, "inline_max": 120}


def val(k, n):
    b = k.encode()
    return (b * (n // len(b) + 1))[:n]


# Namespace "a": 12 records folded into segment sa61; namespace "b": 3.
SEG = [("a/%02d" % i, val("a%d" % i, 5 + 9 * i)) for i in range(12)]
OTHER = [("b/%d" % i, val("b%d" % i, 30)) for i in range(3)]
# Live log batches on top: the second one is the victim in the log tests.
BATCHES = [
    [("put", "a/03", b"new3"), ("put", "c/1", b"c1")],
    [("put", "a/05", b"new5"), ("del", "a/06", None), ("put", "b/9", b"b9")],
    [("put", "c/2", b"c2"), ("del", "a/07", None)],
]


def apply(d, batches):
    for b in batches:
        for op, k, v in b:
            if op == "put":
                d[k] = v
            else:
                d.pop(k, None)
    return d


def build():
    rm(DIR)
    st = Store(DIR, 1 << 20, **OPTS)
    st.open()
    for k, v in SEG + OTHER:
        st.put(k, v)
    st.commit()
    st.compact()
    for b in BATCHES:
        for op, k, v in b:
            if op == "put":
                st.put(k, v)
            else:
                st.delete(k)
        st.commit()
    # Keep a copy of every file, to restore before each damage.
    rm(SAVE)
    os.mkdir(SAVE)
    for n in os.listdir(DIR):
        write(SAVE + "/" + n, read(DIR + "/" + n))


def rm(d):
    try:
        for n in os.listdir(d):
            os.remove(d + "/" + n)
        os.rmdir(d)
    except OSError:
        pass


def read(p):
    with open(p, "rb") as f:
        return f.read()


def write(p, data):
    with open(p, "wb") as f:
        f.write(data)


def restore():
    rm(DIR)
    os.mkdir(DIR)
    for n in os.listdir(SAVE):
        write(DIR + "/" + n, read(SAVE + "/" + n))


def frames(data):
    # (start, end, key or None) of each frame of an undamaged segment.
    out = []
    pos = 0
    while pos < len(data):
        m, t, blen = struct.unpack_from("<BBH", data, pos)
        end = pos + blen + 8
        key = None
        if t == 0x52:
            kl = struct.unpack_from("<H", data, pos + 4)[0]
            key = data[pos + 6 : pos + 6 + kl].decode()
        out.append((pos, end, key))
        pos = end
    return out


def state(st):
    d = {}
    for k, v in st.items():
        assert k not in d, "key twice: " + k
        d[k] = v
    return d


def expect(seg_keys, skip_batch=None):
    d = dict(kv for kv in SEG if kv[0] in seg_keys)
    d.update(OTHER)
    bs = [b for i, b in enumerate(BATCHES) if i != skip_batch]
    return apply(d, bs)


def opened():
    st = Store(DIR, 1 << 20, **OPTS)
    rep = st.open()
    return st, rep


def heal(st, want):
    # Compaction rewrites the damaged parts; the store then reopens clean.
    st.compact()
    st, rep = opened()
    assert rep["dropped"] == 0, rep
    assert state(st) == want


def seg_cases():
    name = DIR + "/s61"
    orig = read(name)
    fr = frames(orig)
    ends = [e for s, e, k in fr]
    all_keys = [k for s, e, k in fr if k]
    cuts = 0
    for t in range(len(orig)):
        restore()
        write(name, orig[:t])
        st, rep = opened()
        whole = [k for s, e, k in fr if k and e <= t]
        want = expect(whole)
        got = state(st)
        assert got == want, (t, sorted(got), sorted(want))
        dropped = 0 if (t == 0 or t in ends) else 1
        assert rep["dropped"] == dropped, (t, rep)
        if t % 17 == 0:
            heal(st, want)
        cuts += 1
    flips = 0
    for i in range(len(orig)):
        restore()
        b = bytearray(orig)
        b[i] ^= 1 << (i % 8)
        write(name, b)
        st, rep = opened()
        hit = [k for s, e, k in fr if s <= i < e][0]
        want = expect([k for k in all_keys if k != hit])
        got = state(st)
        assert got == want, (i, sorted(got), sorted(want))
        assert rep["dropped"] == 1, (i, rep)
        if i % 13 == 0:
            heal(st, want)
        flips += 1
    return cuts, flips


def log_cases():
    # The second live batch is in slot l1 (one part: it fits inline).
    name = DIR + "/l1"
    orig = read(name)
    all_keys = [k for k, v in SEG]
    full = expect(all_keys)
    cuts = 0
    for t in range(len(orig)):
        restore()
        write(name, orig[:t])
        st, rep = opened()
        want = expect(all_keys, skip_batch=1)
        got = state(st)
        assert got == want, (t, sorted(got), sorted(want))
        assert rep["dropped"] == (1 if t else 0), (t, rep)
        if t % 11 == 0:
            heal(st, want)
        cuts += 1
    flips = 0
    for i in range(len(orig)):
        restore()
        b = bytearray(orig)
        b[i] ^= 1 << (i % 8)
        write(name, b)
        st, rep = opened()
        got = state(st)
        assert got == expect(all_keys, skip_batch=1), (i, sorted(got))
        assert rep["dropped"] == 1, (i, rep)
        flips += 1
    restore()
    st, rep = opened()
    assert state(st) == full and rep["dropped"] == 0
    return cuts, flips


def temp_cases():
    # A segment write cut short leaves t<xx>: removed, old segment used.
    restore()
    write(DIR + "/t61", read(DIR + "/s61")[:40])
    st, rep = opened()
    assert rep["removed"] == 1 and rep["dropped"] == 0, rep
    assert state(st) == expect([k for k, v in SEG])
    assert "t61" not in os.listdir(DIR)


build()
sc, sf = seg_cases()
lc, lf = log_cases()
temp_cases()
rm(DIR)
rm(SAVE)
print("RESULT segment_cuts=%d segment_flips=%d log_cuts=%d log_flips=%d" % (sc, sf, lc, lf))
