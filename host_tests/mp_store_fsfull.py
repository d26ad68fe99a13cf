# A full filesystem under the store (MicroPython side): LittleFS on a small
# RAM flash, filled up by another file.
#
#   micropython mp_store_fsfull.py BOARD
#
# A commit or compaction that runs out of space must raise StoreFull, leave
# no temp file, keep the stored state and keep the batch staged; once space
# is freed the store must work again. Prints "RESULT ...".
import os
import sys

import flashsim
from broker.store import Store, StoreFull

BOARD = sys.argv[1] if len(sys.argv) > 1 else "esp32"
DIR = "/flash/data"
OPTS = {"slots": 8, "inline_max": 128 if BOARD == "esp32" else 512}


def val(k, n):
    b = k.encode()
    return (b * (n // len(b) + 1))[:n]


def state(st):
    d = {}
    for k, v in st.items():
        d[k] = v
    return d


def opened():
    st = Store(DIR, 1 << 20, **OPTS)
    rep = st.open()
    return st, rep


def leftovers():
    return [n for n in os.listdir(DIR) if n[0] == "t"]


def fill():
    # Fill the filesystem with 1 KiB files until it refuses more.
    n = 0
    while True:
        p = "/flash/fill%d" % n
        try:
            with open(p, "wb") as f:
                f.write(bytes(1024))
        except OSError as e:
            assert e.args[0] == 28, e
            try:
                os.remove(p)
            except OSError:
                pass
            return n
        n += 1


dev = flashsim.FlashSim(40)
flashsim.mount(dev, BOARD, fmt=True)
st, rep = opened()
want = {}
for i in range(6):
    k = "r/%d" % i
    want[k] = val(k, 3000)
    st.put(k, want[k])
    st.commit()
st.compact()
for i in range(3):
    k = "q/%d" % i
    want[k] = val(k, 50)
    st.put(k, want[k])
    st.commit()
assert state(st) == want
fillers = fill()

refused = 0
# A big value needs new blocks: refused, and the batch stays staged for a
# later commit (the broker retries; what it acknowledged waits for that).
st.put("r/new", val("new", 6000))
try:
    st.commit()
    raise AssertionError("commit on a full filesystem did not raise")
except StoreFull:
    refused += 1
assert st.pending > 0 and state(st) == want and not leftovers()
# Tried again with more staged: still no room, nothing lost or applied.
st.put("q/9", b"x")
st.delete("r/0")
try:
    st.commit()
    raise AssertionError("commit on a full filesystem did not raise")
except StoreFull:
    refused += 1
assert st.pending > 0 and state(st) == want and not leftovers()
# A compaction needs room for the new segment next to the old one.
try:
    st.compact()
except StoreFull:
    refused += 1
assert state(st) == want and not leftovers()
# A reboot now: the staged batch was never promised; the state is intact.
st, rep = opened()
assert state(st) == want, sorted(state(st))
assert rep["dropped"] == 0, rep

# Free space: delete a few of the other files; the store works again.
for n in range(min(fillers, 16)):
    os.remove("/flash/fill%d" % n)
st.delete("r/1")
want.pop("r/1")
st.put("r/new", val("new", 6000))
want["r/new"] = val("new", 6000)
st.commit()
st.compact()
st, rep = opened()
assert state(st) == want and rep["dropped"] == 0
flashsim.unmount()
print("RESULT board=%s fillers=%d refused=%d" % (BOARD, fillers, refused))
