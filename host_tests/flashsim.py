# RAM flash for MicroPython's LittleFS (the extended block interface), with
# counters and a power-cut switch. MicroPython-side test helper: the store's
# tests mount os.VfsLfs2 on it inside the unix port to count the real erases
# and programs the store causes, and to cut power at any single operation.
#
# NOR semantics: erase sets a block to 0xFF; program can only clear bits
# (new = old & data), as on the boards' SPI flash. A power cut raises
# PowerCut from inside LittleFS; the device keeps the bytes it had at that
# instant and the caller throws the mounted filesystem away and mounts a new
# one on a revived device (same bytes), like a reboot. The dead device
# answers every later call with EIO, so a file object of the dead
# filesystem that is closed late (by the GC finaliser, say) cannot change
# the bytes after the cut.
import os

BLOCK = 4096

# Board geometry and LittleFS settings used by the MicroPython ports:
# esp32 formats with the defaults (progsize 32, so a 128 B cache), rp2 with
# progsize=256 (a 1 KiB cache). The cache size bounds the inline file size.
BOARDS = {
    "esp32": {"blocks": 512, "progsize": 32},
    "esp32s3": {"blocks": 1536, "progsize": 32},
    "pico_w": {"blocks": 212, "progsize": 256},
    "pico2_w": {"blocks": 640, "progsize": 256},
}


_FF = b"\xff" * BLOCK


class PowerCut(Exception):
    pass


class FlashSim:
    def __init__(self, blocks, block_size=BLOCK, data=None, wear=None):
        self.bs = block_size
        self.nblocks = blocks
        if data is None:
            # Erased, without a second image's worth of bytes first: the
            # bench makes one per run, and at 2 MiB each a 16 MiB heap ran
            # out once (see test_store.SIM_HEAP).
            data = bytearray(blocks * block_size)
            for i in range(0, len(data), block_size):
                data[i : i + block_size] = _FF
        self.data = data
        self.erase_count = wear if wear is not None else [0] * blocks
        self.reset_counters()
        self.cut_at = 0  # operation number (1-based) that loses power; 0 = never
        self.torn = False  # on the cut, apply a prefix of the operation first
        self.dead = False

    def revive(self):
        # The same flash after the power comes back, as a new device object.
        return FlashSim(self.nblocks, self.bs, self.data, self.erase_count)

    def reset_counters(self):
        self.erases = 0
        self.progs = 0
        self.prog_bytes = 0
        self.reads = 0
        self.ops = 0

    def arm(self, k, torn=False):
        # Lose power at the k-th program or erase from now on.
        self.ops = 0
        self.cut_at = k
        self.torn = torn

    def disarm(self):
        self.cut_at = 0

    def _tick(self):
        self.ops += 1
        if self.cut_at and self.ops == self.cut_at:
            self.dead = True
            return True
        return False

    # A dead device does nothing and allocates nothing (the GC may close a
    # dead filesystem's files while the heap is locked): it returns -EIO.
    def readblocks(self, block, buf, off=0):
        if self.dead:
            return -5
        a = block * self.bs + off
        n = len(buf)
        buf[:] = self.data[a : a + n]
        self.reads += 1

    def writeblocks(self, block, buf, off=None):
        if self.dead:
            return -5
        if off is None:
            # Simple interface (not used by LittleFS with ioctl 6): erase first.
            off = 0
            self._erase(block)
        a = block * self.bs + off
        n = len(buf)
        cut = self._tick()
        if cut:
            if self.torn:
                n = n // 2
                self._prog(a, buf, n)
            raise PowerCut("prog", block, off)
        self._prog(a, buf, n)
        self.progs += 1
        self.prog_bytes += n

    def _prog(self, a, buf, n):
        d = self.data
        if d[a : a + n] == _FF[:n]:
            d[a : a + n] = buf[:n]
            return
        for i in range(n):
            d[a + i] &= buf[i]

    def _erase(self, block):
        a = block * self.bs
        self.data[a : a + self.bs] = _FF

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.nblocks
        if op == 5:  # block size
            return self.bs
        if op == 6:  # erase one block
            if self.dead:
                return -5
            cut = self._tick()
            if cut:
                if self.torn:
                    # An interrupted erase leaves the block half erased.
                    a = arg * self.bs
                    h = self.bs // 2
                    self.data[a : a + h] = _FF[:h]
                raise PowerCut("erase", arg)
            self._erase(arg)
            self.erases += 1
            self.erase_count[arg] += 1
            return 0
        return 0  # init, deinit, sync


def mount(dev, board, where="/flash", fmt=False):
    # Mount a LittleFS on dev at `where` with the board's settings.
    ps = BOARDS[board]["progsize"]
    if fmt:
        os.VfsLfs2.mkfs(dev, progsize=ps)
    fs = os.VfsLfs2(dev, progsize=ps)
    os.mount(fs, where)
    return fs


def unmount(where="/flash"):
    try:
        os.umount(where)
    except Exception:
        pass


def new(board):
    return FlashSim(BOARDS[board]["blocks"])
