# RAM the store needs while opening a large store (MicroPython side).
#
#   micropython mp_store_ram.py DIR build RECORDS
#   micropython mp_store_ram.py DIR measure RECORDS
#
# build: RECORDS records (20-byte keys, 64-byte values) in 4 namespaces,
# folded into segments, plus 20 live log batches on top.
# measure: opens the store with every file read wrapped, so that before each
# read the GC runs and the live heap is sampled; prints
#   RESULT records=N data_bytes=B peak=P held=H items_peak=I
# (bytes of live heap above what was in use before open(): the most at any
# read, what the store object holds after open(), the most while iterating
# items() without keeping the values).
import gc
import sys

import broker.store as store_mod
from broker.store import Store

DIR = sys.argv[1]
MODE = sys.argv[2]
N = int(sys.argv[3])
VALUE = bytes(range(64))
peak = [0]
base = [0]


def key(i):
    return ("%s/%017d" % ("abcd"[i % 4], i))[:20]


class Probe:
    # A file that samples the live heap before each read.
    def __init__(self, f):
        self.f = f

    def readinto(self, b):
        sample()
        return self.f.readinto(b)

    def read(self, n=-1):
        sample()
        return self.f.read(n)

    def seek(self, *a):
        return self.f.seek(*a)

    def write(self, b):
        return self.f.write(b)

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def sample():
    gc.collect()
    used = gc.mem_alloc() - base[0]
    if used > peak[0]:
        peak[0] = used


_open = open


def probe_open(p, mode="r"):
    return Probe(_open(p, mode))


if MODE == "build":
    st = Store(DIR, 1 << 24)
    st.open()
    for i in range(N):
        st.put(key(i), VALUE)
        if i % 50 == 49:
            st.commit()
    st.commit()
    st.compact()
    for i in range(20):
        st.put(key(i * 7), b"updated")
        st.delete(key(i * 7 + 1))
        st.commit()
    print("BUILT", st.stats)
else:
    store_mod.open = probe_open
    gc.collect()
    base[0] = gc.mem_alloc()
    st = Store(DIR, 1 << 24)
    rep = st.open()
    assert rep["recovered"] == N - 20, rep
    gc.collect()
    held = gc.mem_alloc() - base[0]
    open_peak = peak[0]
    peak[0] = 0
    n = 0
    size = 0
    for k, v in st.items():
        n += 1
        size += len(k) + len(v)
    assert n == N - 20, n
    print(
        "RESULT records=%d data_bytes=%d peak=%d held=%d items_peak=%d"
        % (n, size, open_peak, held, peak[0])
    )
