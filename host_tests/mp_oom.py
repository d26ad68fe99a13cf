# For tests on the twin: an allocation that fails as it does on a
# fragmented heap, where no free piece is large enough (fail_first), and
# such a heap itself (crumble).
import gc


def fail_first(fn, n, nbytes):
    # (wrapped, left): wrapped calls fn, but its first n calls raise
    # MemoryError instead; left[0] counts the failures still to come.
    left = [n]

    def wrapped(*args):
        if left[0]:
            left[0] -= 1
            raise MemoryError("memory allocation failed, allocating %d bytes" % nbytes)
        return fn(*args)

    return wrapped, left


def crumble(piece):
    # Fills the heap with 400 B pieces and frees every other one: bytes
    # free, but no piece of `piece` bytes. Returns what holds the rest.
    gc.collect()
    keep = []
    try:
        while True:
            keep.append(bytearray(400))
    except MemoryError:
        pass
    for i in range(0, len(keep), 2):
        keep[i] = None
    gc.collect()
    try:
        bytearray(piece)
        raise AssertionError("the heap is not in crumbs")
    except MemoryError:
        pass
    return keep
