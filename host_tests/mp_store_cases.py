# Store behaviours on the host filesystem (MicroPython side).
#
#   micropython mp_store_cases.py DIR CASE
#
# Each case prints "OK CASE ..." or fails with an exception (exit status 1).
import os
import sys

from broker.store import Store, StoreFull
from mp_oom import crumble

DIR = sys.argv[1]
CASE = sys.argv[2]


def state(st):
    d = {}
    for k, v in st.items():
        assert k not in d, "key twice in items(): " + k
        assert type(v) is bytes or type(v) is bytearray and 10 + len(k.encode()) + len(v) > 256, (k, type(v))
        d[k] = v
    # keys() gives the same keys, reading no value (a restore that ran out
    # of heap reads them so: persist.py)
    assert sorted(st.keys()) == sorted(d), "keys() is not what items() gives"
    return d


def check(st, want):
    # Compare items() with want without holding a second copy of the data.
    seen = 0
    for k, v in st.items():
        assert want.get(k) == v, "key %s: %r" % (k, v[:20])
        seen += 1
    assert seen == len(want), (seen, len(want))
    assert sorted(st.keys()) == sorted(want), "keys() is not what items() gives"


def reopen(**kw):
    st = Store(DIR, kw.pop("max_bytes", 1 << 20), **kw)
    rep = st.open()
    return st, rep


def exact_used(d):
    return sum(10 + len(k.encode()) + len(v) for k, v in d.items())


def case_round_trip():
    st, rep = reopen()
    assert rep["recovered"] == 0 and state(st) == {}
    st.put("r/a", b"alpha")
    st.put("s/b", b"")
    st.put("q/c", b"\x00\xff" * 300)
    st.put("é/unicode", b"u")
    assert st.pending > 0
    seq = st.commit()
    assert seq > 0 and st.pending == 0
    st.delete("s/b")
    st.put("r/a", b"alpha2")
    st.commit()
    want = {"r/a": b"alpha2", "q/c": b"\x00\xff" * 300, "é/unicode": b"u"}
    assert state(st) == want
    st, rep = reopen()
    assert state(st) == want, state(st)
    assert rep["recovered"] == 3 and rep["dropped"] == 0, rep
    assert st.used_bytes == exact_used(want)
    # After a compaction and another reopen: the same.
    st.compact()
    assert state(st) == want
    st, rep = reopen()
    assert state(st) == want
    assert st.used_bytes == exact_used(want)
    print("OK round_trip", rep)


def case_overwrite():
    st, rep = reopen(slots=4)
    for i in range(50):
        st.put("r/x", b"v%d" % i)
        if i % 3 == 0:
            st.put("r/y", b"y%d" % i)
        st.commit()
    st, rep = reopen(slots=4)
    assert state(st) == {"r/x": b"v49", "r/y": b"y48"}, state(st)
    assert st.used_bytes == exact_used(state(st))
    print("OK overwrite", st.stats)


def case_staged_not_durable():
    st, rep = reopen()
    st.put("a/1", b"1")
    st.commit()
    st.put("a/2", b"2")
    st.delete("a/1")
    # No commit: a restart loses the staged changes, nothing else.
    st, rep = reopen()
    assert state(st) == {"a/1": b"1"}
    st.put("a/3", b"3")
    st.discard()
    assert st.pending == 0
    assert st.commit() == 0
    st, rep = reopen()
    assert state(st) == {"a/1": b"1"}
    print("OK staged_not_durable")


def case_value_copied():
    # A bytearray or memoryview given to put() is copied: the broker may
    # reuse its receive buffer before the commit.
    st, rep = reopen()
    buf = bytearray(b"payload")
    st.put("q/1", buf)
    st.put("q/2", memoryview(buf)[:3])
    buf[0] = ord("X")
    st.commit()
    st, rep = reopen()
    assert state(st) == {"q/1": b"payload", "q/2": b"pay"}, state(st)
    print("OK value_copied")


def case_bad_key():
    st, rep = reopen()
    for bad in ("", "k" * 2000):
        try:
            st.put(bad, b"x")
        except ValueError:
            continue
        raise AssertionError("accepted a bad key")
    print("OK bad_key")


def case_store_full():
    # max_bytes counts records as stored (10 bytes + key + value).
    st, rep = reopen(max_bytes=1000, slots=8)
    n = 0
    try:
        while True:
            st.put("q/%03d" % n, bytes(90))
            n += 1
            st.commit()
    except StoreFull:
        pass
    assert n == 9, n  # 9 * 105 = 945 fits, a tenth would not
    assert st.pending == 0
    committed = state(st)
    assert len(committed) == 9
    # Nothing already stored is damaged, and nothing was half written.
    st, rep = reopen(max_bytes=1000, slots=8)
    assert state(st) == committed and rep["dropped"] == 0
    assert st.used_bytes == 945
    # Deleting makes room again: put() compacts to reclaim it.
    st.delete("q/000")
    st.delete("q/001")
    st.commit()
    st.put("q/new", bytes(90))
    st.put("q/new2", bytes(90))
    st.commit()
    st, rep = reopen(max_bytes=1000, slots=8)
    got = state(st)
    assert "q/000" not in got and got["q/new2"] == bytes(90) and len(got) == 9
    # A record larger than max_bytes on its own is refused outright.
    try:
        st.put("q/huge", bytes(2000))
        raise AssertionError("no StoreFull")
    except StoreFull:
        pass
    # A staged batch is bounded too.
    st2 = Store(DIR + "b", 1 << 20, max_batch=1024)
    st2.open()
    st2.put("a/1", bytes(600))
    try:
        st2.put("a/2", bytes(600))
        raise AssertionError("no StoreFull for the batch")
    except StoreFull:
        pass
    st2.commit()
    print("OK store_full")


def case_split_batches():
    # Batches cut into inline-sized parts, ops straddling parts, and a
    # batch past split_max written whole: all read back the same.
    st, rep = reopen(inline_max=64, split_max=2048, slots=64)
    want = {}
    for n in (1, 2, 5, 17, 40):
        for i in range(n):
            k = "p/%d/%d" % (n, i)
            v = bytes([n + i]) * (7 * i + n)
            st.put(k, v)
            want[k] = v
        st.commit()
    st.put("p/big", bytes(3000))
    want["p/big"] = bytes(3000)
    st.commit()
    check(st, want)
    st, rep = reopen(inline_max=64, split_max=2048, slots=64)
    check(st, want)
    assert rep["dropped"] == 0, rep
    assert st.used_bytes == exact_used(want)
    st.compact()
    st, rep = reopen(inline_max=64, split_max=2048, slots=64)
    check(st, want)
    print("OK split_batches", st.stats)


def case_fewer_slots():
    # Reopening with fewer slots keeps the data in the slots past the new
    # count until the next compaction, which then removes those files.
    st, rep = reopen(slots=16)
    for i in range(10):
        st.put("a/%d" % i, b"%d" % i)
        st.commit()
    st, rep = reopen(slots=4)
    want = dict(("a/%d" % i, b"%d" % i) for i in range(10))
    assert state(st) == want
    st.put("a/x", b"x")
    st.commit()
    want["a/x"] = b"x"
    assert state(st) == want
    st, rep = reopen(slots=4)
    assert state(st) == want
    assert max(int(n[1:]) for n in os.listdir(DIR) if n[0] == "l") < 4
    print("OK fewer_slots")


def case_memory_error_growing_the_read_buffer():
    # A MemoryError while the record buffer grows (reading a key longer
    # than any before, here in a compaction) must leave the store usable:
    # it once left the buffer None, and every later commit failed with a
    # TypeError (fuzz seed 1187).
    from broker import store

    st, rep = reopen()
    want = {}
    for i in range(3):
        k = "r/%d/%s" % (i, "k" * (300 + 200 * i))
        want[k] = bytes([i]) * 30
        st.put(k, want[k])
        st.commit()
    real = bytearray

    def short(n):
        if n > 256:
            raise MemoryError("memory allocation failed, allocating %d bytes" % n)
        return real(n)

    store.bytearray = short  # module globals come before builtins
    st._buf = real(256)  # as after open(): the next large record grows it
    try:
        st.compact()
        raise AssertionError("no MemoryError")
    except MemoryError:
        pass
    finally:
        del store.bytearray
    check(st, want)
    st.put("r/x", b"x" * 900)
    want["r/x"] = b"x" * 900
    st.commit()
    st.compact()
    check(st, want)
    st, rep = reopen()
    check(st, want)
    print("OK memory_error_growing_the_read_buffer")


def case_memory_error_in_a_commit_keeps_the_batch():
    # A commit that runs out of heap (here in the compaction before it,
    # growing the record buffer for a long key) raises, and its batch stays staged: the
    # next commit writes it, with whatever was staged meanwhile (fuzz seed
    # 3997896285 once lost a batch so, and its deletions with it). The
    # broker's committer does the retrying (persist.py).
    from broker import store

    st, rep = reopen(slots=2)  # every third commit compacts first
    want = {}
    real = bytearray
    fails = [0]

    def short(n):
        if n > 256 and fails[0]:
            fails[0] -= 1
            raise MemoryError("memory allocation failed, allocating %d bytes" % n)
        return real(n)

    def put(k, n):
        k += "/" + "k" * 300  # (the buffer grows for a key: records go through it in pieces)
        want[k] = bytes([len(want)]) * n
        st.put(k, want[k])

    store.bytearray = short
    try:
        put("r/0", 900)
        st.commit()
        put("r/1", 700)
        st.commit()
        # Compacts first, and growing the record buffer fails (to twice
        # its size, and to just the size needed).
        st._buf = real(256)
        put("r/2", 500)
        fails[0] = 2
        c = st.stats["compactions"]
        try:
            st.commit()
            raise AssertionError("no MemoryError")
        except MemoryError:
            pass
        assert fails[0] == 0 and st.pending > 0 and st.stats["compactions"] == c
        k = "r/0/" + "k" * 300
        st.delete(k)
        del want[k]
        st.commit()
        assert st.pending == 0 and st.stats["compactions"] == c + 1
    finally:
        del store.bytearray
    assert st.pending == 0
    check(st, want)
    st, rep = reopen(slots=2)
    check(st, want)
    print("OK memory_error_in_a_commit_keeps_the_batch")


def case_a_batch_past_batch_keys_commits_in_a_heap_in_crumbs():
    # The RAM index grows as a batch's keys go in. As one dict it wanted
    # its new table in one piece (1,016 B past 96 keys), and a heap in
    # crumbs had none: the broker's commit failed for good (outside
    # probe). In eighths, its pieces fit between the crumbs.
    import gc

    st, rep = reopen(batch_keys=96, index_max=32)
    want = {}
    for i in range(150):
        k = "q%03d" % i
        want[k] = b"v%d" % i
        st.put(k, want[k])
    keep = crumble(1016)
    st.commit()
    keep = None
    gc.collect()
    assert st.pending == 0
    check(st, want)
    st, rep = reopen(batch_keys=96, index_max=32)
    check(st, want)
    print("OK a_batch_past_batch_keys_commits_in_a_heap_in_crumbs")


def case_a_compaction_makes_no_container_anew():
    # The broker keeps pieces of heap aside for the commit (heap.py) and
    # frees them for a commit that failed for heap. A compaction that made
    # its containers anew (the batches' list, the namespace set, segment
    # entries) put them, long-lived, into those holes, first fit: each
    # commit under a heap in crumbs lost one or two pieces for good, until
    # one found none and waited for good (esp32 heap full of expiring
    # sessions' queues, 1 run in 12). It empties and reuses them.
    st, rep = reopen()
    want = {}
    for r in range(2):
        for i in range(12):
            for k, v in (("a%d" % i, b"x" * (20 + r)), ("b%d" % i, b"y" * (20 + r))):
                st.put(k, v)
                want[k] = v
            st.commit()
        before = [st._live, st._tns, st._big] + [st._segs[ns] for ns in sorted(st._segs)]
        st.compact()
        after = [st._live, st._tns, st._big] + [st._segs[ns] for ns in sorted(st._segs)]
        if r:  # (the first compaction makes the segments' entries)
            assert len(before) == len(after) and all(x is y for x, y in zip(before, after)), "made anew"
        check(st, want)
    st, rep = reopen()
    check(st, want)
    print("OK a_compaction_makes_no_container_anew")


def case_a_large_record_needs_no_large_piece_at_the_compaction():
    # A compaction read each live record whole into the store's buffer,
    # which grew then, to the largest record, from a heap that by then
    # could be in crumbs: the commit failed for want of that one piece, and
    # the broker's acknowledgements waited behind it. Records are read and
    # copied in pieces now: a large one is taken, compacted and read back
    # in a heap in crumbs, from a segment and from a log slot, and the
    # buffer never grows past what a key needs.
    import gc

    st, rep = reopen()
    want = {"small": b"s" * 20}
    st.put("small", want["small"])
    st.commit()
    big = b"B" * 4000

    def put(k, v):
        st.put(k, v)
        want[k] = v
        st.commit()

    def compact_in_crumbs(k):
        # A put in k's namespace (rewritten by the compaction), then the
        # compaction, in a heap in crumbs.
        keep = crumble(1024)
        put(k, b"t" * 20)
        st.compact()
        keep = None
        gc.collect()
        check(st, want)

    keep = crumble(1024)
    put("big1", big)  # (the value is in one piece already)
    keep = None
    gc.collect()
    compact_in_crumbs("b1")  # from the log
    compact_in_crumbs("b2")  # from the segment
    # Still in a log slot at a restart (a long key: the frame is 4,110 B),
    # then compacted twice in crumbs.
    put("k" * 100, big)
    st, rep = reopen()
    check(st, want)
    compact_in_crumbs("kk")
    compact_in_crumbs("kk")
    assert len(st._buf) <= 256, len(st._buf)
    st, rep = reopen()
    check(st, want)
    print("OK a_large_record_needs_no_large_piece_at_the_compaction")


def case_a_large_record_misread_in_a_compaction_keeps_the_old_segment():
    # A record larger than the read buffer is checked (CRC) and then read
    # again, in pieces, to be copied: LittleFS checks no file data, so the
    # second read is checked too. A bad one fails the compaction, which
    # keeps the old segment, rather than copy a record that the next open
    # would drop.
    st, rep = reopen()
    want = {"big": b"B" * 3000, "b1": b"x"}
    for k in want:
        st.put(k, want[k])
    st.commit()
    st.compact()  # "big" now in a segment
    st.put("b2", b"y")
    want["b2"] = b"y"
    st.commit()
    read = st._frame_read

    def misread(k, mv):
        read(k, mv)
        if k > 1000:
            mv[0] ^= 1

    st._frame_read = misread
    try:
        st.compact()
        raise AssertionError("a misread copy went through")
    except OSError:
        pass
    del st._frame_read
    check(st, want)
    st.compact()
    check(st, want)
    st, rep = reopen()
    check(st, want)
    assert rep["dropped"] == 0, rep
    print("OK a_large_record_misread_in_a_compaction_keeps_the_old_segment")


def case_a_large_value_the_flash_fails_to_read_back_is_dropped_and_the_rest_restored():
    # items() reads a large value after open() checked its CRC: should the
    # flash then fail to read it, that record is dropped and counted (with
    # the rest of its batch, in a log) and the restore goes on, rather than
    # stop the broker's start.
    from broker import store

    st, rep = reopen()
    st.put("seg/big", b"S" * 2000)
    st.put("seg/small", b"s")
    st.commit()
    st.compact()  # these two in a segment
    st.put("log/big", b"L" * 2000)
    st.put("log/small", b"l")
    st.commit()  # these two in a log slot, in this order
    st, rep = reopen()

    def fails(*a):
        raise OSError(5)

    st._frame_read = fails
    value = store._Parts.value
    store._Parts.value = fails
    try:
        got = sorted(k for k, v in st.items())
    finally:
        store._Parts.value = value
        del st._frame_read
    assert got == ["seg/small"], got
    assert st.stats["records_dropped"] == 2, st.stats
    st, rep = reopen()  # nothing was changed on flash
    assert sorted(k for k, v in st.items()) == ["log/big", "log/small", "seg/big", "seg/small"]
    print("OK a_large_value_the_flash_fails_to_read_back_is_dropped_and_the_rest_restored")


globals()["case_" + CASE]()
