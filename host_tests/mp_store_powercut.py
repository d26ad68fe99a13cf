# Power cut at every flash operation of a store workload (MicroPython side).
#
#   micropython mp_store_powercut.py BOARD MODE [STEP]
#
# MODE "clean": each program or erase either happens whole or not at all.
# MODE "torn": the cut operation is half applied (the first half of a
# program's bytes, the first half of a block erased).
# MODE "double": after each clean cut, cut the power again at every
# operation of the recovery (open, then one more commit): what the first
# open saw must survive, and the state must stay one of the allowed ones.
# For k = 1, 1+STEP, ... until the workload finishes without reaching k:
# start from the same freshly formatted flash, cut the power at operation
# k, then mount LittleFS again, open the store and check that every commit
# that returned is there and the one in progress is all there or not at
# all; then commit once more on the recovered store and check again.
# Prints one "RESULT ..." line; exits with status 1 on the first failure.
import gc
import sys

import flashsim
from broker.store import Store

BOARD = sys.argv[1] if len(sys.argv) > 1 else "esp32"
MODE = sys.argv[2] if len(sys.argv) > 2 else "clean"
TORN = MODE == "torn"
STEP = int(sys.argv[3]) if len(sys.argv) > 3 else 1
DIR = "/flash/data"
# The store as the broker would set it up on each board, with few slots so
# that the workload compacts several times.
OPTS = {"slots": 6, "log_max": 4096, "inline_max": 120 if BOARD == "esp32" else 500}


def val(tag, n):
    b = tag.encode()
    return (b * (n // len(b) + 1))[:n]


# Commits chosen to cross every kind of write: the first use of each slot
# (a create), slot overwrites, batches cut into inline parts, an inline and
# a multi-block value, deletes, a namespace emptied out and filled again,
# and several compactions.
BATCHES = [
    [("put", "a/1", val("one", 20))],
    [("put", "q/1", val("q1", 64)), ("put", "q/2", val("q2", 64)), ("put", "r/big", val("big", 600))],
    [("del", "q/1", None), ("put", "a/1", val("uno", 30))],
    [("put", "b/huge", val("huge", 5000))],
    [("put", "q/3", val("q3", 64))],
    [("del", "b/huge", None), ("put", "q/4", val("q4", 64))],
    [("del", "q/2", None), ("del", "q/3", None), ("del", "q/4", None)],
    [("put", "c/1", val("c1", 100)), ("put", "r/big", val("BIG", 700))],
    [("put", "a/2", val("two", 64))],
    [("put", "q/5", val("q5", 64)), ("del", "a/1", None)],
    [("put", "q/%d" % i, val("m%d" % i, 40)) for i in range(6, 14)],
    [("put", "b/huge", val("again", 4500)), ("del", "q/5", None)],
    [("del", "q/%d" % i, None) for i in range(6, 14)],
    [("put", "a/3", val("three", 300))],
    [("put", "c/1", val("c1b", 90)), ("put", "c/2", val("c2", 90)), ("del", "r/big", None)],
]


def models():
    states = [{}]
    cur = {}
    for b in BATCHES:
        cur = dict(cur)
        for op, k, v in b:
            if op == "put":
                cur[k] = v
            else:
                cur.pop(k, None)
        states.append(cur)
    return states


STATES = models()


def run_workload(progress):
    st = Store(DIR, 1 << 20, **OPTS)
    st.open()
    for b in BATCHES:
        for op, k, v in b:
            if op == "put":
                st.put(k, v)
            else:
                st.delete(k)
        progress[1] = 1
        st.commit()
        progress[0] += 1
        progress[1] = 0


def state():
    st = Store(DIR, 1 << 20, **OPTS)
    rep = st.open()
    d = {}
    for k, v in st.items():
        if k in d:
            raise AssertionError("key twice in items(): " + k)
        d[k] = v
    return st, rep, d


def recover(seen, prog2):
    # Open after a cut; note the state seen; commit one more batch.
    st, rep, d = state()
    seen.append(d)
    st.put("z/after", b"after")
    prog2[0] = 1
    st.commit()
    prog2[0] = 2
    return rep


def check_double(k, progress, dev):
    # Cut again at every operation j of the recovery itself.
    base = bytes(dev.data)
    j = 1
    n = 0
    while True:
        dev.data[:] = base
        d = dev.revive()
        d.arm(j)
        seen = []
        prog2 = [0]
        cut = False
        try:
            flashsim.mount(d, BOARD)
            recover(seen, prog2)
        except flashsim.PowerCut:
            cut = True
        flashsim.unmount()
        if not cut:
            break
        n += 1
        flashsim.mount(d.revive(), BOARD)
        st, rep, got = state()
        flashsim.unmount()
        done, inprog = progress
        allowed = [STATES[done]]
        if inprog:
            allowed.append(STATES[done + 1])
        if seen:
            allowed = [seen[0]]
        if prog2[0]:
            z = dict(allowed[0])
            z["z/after"] = b"after"
            allowed.append(z)
        if got not in allowed:
            print("FAIL k=%d j=%d: state after a cut during recovery" % (k, j))
            print(" got", sorted(got.keys()))
            print(" allowed", [sorted(a.keys()) for a in allowed])
            sys.exit(1)
        j += 1
    dev.data[:] = base
    return n


def check(k, progress):
    # After the cut: the flash must mount and the store open and hold the
    # state of the last returned commit, or of the one in progress.
    st, rep, d = state()
    done, inprog = progress
    ok = d == STATES[done] or (inprog and d == STATES[done + 1])
    if not ok:
        print("FAIL k=%d done=%d inprog=%d" % (k, done, inprog))
        print(" got", sorted(d.keys()))
        print(" want", sorted(STATES[done].keys()), "or", sorted(STATES[min(done + 1, len(STATES) - 1)].keys()))
        sys.exit(1)
    # The recovered store must take new commits and keep them.
    st.put("z/after", b"after")
    st.commit()
    st2, rep2, d2 = state()
    want = dict(d)
    want["z/after"] = b"after"
    if d2 != want:
        print("FAIL k=%d: commit after recovery lost or damaged" % k)
        sys.exit(1)
    return rep


def main():
    dev = flashsim.new(BOARD)
    flashsim.mount(dev, BOARD, fmt=True)
    flashsim.unmount()
    base = bytes(dev.data)
    storage = dev.data
    k = 1
    cuts = 0
    total_ops = 0
    in_commit = 0
    recovered_partial = 0
    second = 0
    while True:
        storage[:] = base
        gc.collect()
        d = flashsim.FlashSim(dev.nblocks, dev.bs, storage, dev.erase_count)
        d.arm(k, TORN)
        progress = [0, 0]
        cut = False
        try:
            flashsim.mount(d, BOARD)
            run_workload(progress)
        except flashsim.PowerCut:
            cut = True
        flashsim.unmount()
        if not cut:
            total_ops = d.ops
            break
        cuts += 1
        if progress[1]:
            in_commit += 1
        if MODE == "double":
            second += check_double(k, progress, d)
        d2 = d.revive()
        try:
            flashsim.mount(d2, BOARD)
        except OSError as e:
            print("FAIL k=%d: LittleFS does not mount: %r" % (k, e))
            sys.exit(1)
        rep = check(k, progress)
        if rep["dropped"] or rep["removed"]:
            recovered_partial += 1
        flashsim.unmount()
        k += STEP
    print(
        "RESULT board=%s mode=%s cut_points=%d second_cuts=%d ops=%d during_commit=%d with_cleanup=%d"
        % (BOARD, MODE, cuts, second, total_ops, in_commit, recovered_partial)
    )


main()
