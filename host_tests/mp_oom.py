# For tests on the twin: an allocation that fails as it does on a
# fragmented heap, where no free piece is large enough.


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
