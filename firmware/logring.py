# A bounded ring of log files on flash, to read after a crash or a
# watchdog reset: `files` files of at most `file_bytes` bytes each, newest
# in <dir>/0.log, older ones in 1.log, 2.log, ... Add it as a sink:
#     ring = logring.LogRing("log"); log.add_sink(ring)
# and read it back with `mpremote exec "import logring; logring.dump()"`.
#
# Wear. LittleFS levels wear only over free blocks, and (PLATFORM.md,
# measured) appending with a close costs about one 4 KiB block erase per
# append, whatever its size. One write per log line at 10 lines a minute
# would be 5 million erases a year; a Pico W has 212 blocks, of which maybe
# 150 are free, rated for 100,000 erases each: 15 million in all, gone in
# three years and shared with the message store. So lines are buffered in
# RAM and written in batches of about batch_bytes (one erase per batch),
# and the rest is flushed at most once a minute by run(): at one batch a
# minute that is about 0.5 million erases a year, some 30 years of budget
# (debug logging at 100 lines a minute makes it a few batches a minute:
# years, not decades, so keep flash logging at "info" or above).
# Error lines are written at once, so the reason for a crash survives it,
# unless the last write was less than min_gap_ms ago: a flood (a warning a
# message, say for each message a full store cannot take) could make a
# batch a second, so writes are at least min_gap_ms apart (30 s: two a
# minute, 1 million erases a year, 15 years of budget even if the flood
# never ends). Meanwhile lines past a full batch are dropped and counted,
# as on a write error; error lines have a second batch of room, and wait
# for the next write (at most run()'s minute, or the flush before a reset).
# Rotation is os.rename, which only rewrites metadata and is atomic on
# LittleFS; the oldest file is replaced by the rename, never rewritten.
# The ring never grows: it holds at most files * file_bytes bytes.
import os
import time

_MAX_LINE = 200


def _name(d, i):
    return "%s/%d.log" % (d, i)


class LogRing:
    def __init__(self, path="log", files=2, file_bytes=4096, batch_bytes=1024, max_line=_MAX_LINE,
                 min_gap_ms=30000):
        if files < 1 or batch_bytes + max_line + 2 > file_bytes:
            raise ValueError("logring: need files >= 1 and batch_bytes + max_line < file_bytes")
        self.dir = path
        self.files = files
        self.file_bytes = file_bytes
        self.batch_bytes = batch_bytes
        self.max_line = max_line
        self._buf = []
        self._n = 0
        self.min_gap_ms = min_gap_ms
        self._last = None  # time.ticks_ms() of the last write
        self.writes = 0  # flash writes done (each about one erase)
        self.dropped = 0  # lines lost to write errors or to a flood
        try:
            os.mkdir(path)
        except OSError:
            pass  # exists
        try:
            self._size = os.stat(_name(path, 0))[6]
        except OSError:
            self._size = 0

    def __call__(self, line):
        # The sink: called by broker.log for every line. Never raises.
        if len(line) > self.max_line:
            line = line[: self.max_line - 3] + "..."
        # (Outside 0..gap: ticks_ms wraps after 6.2 days, and a quiet log's
        # last write may be older than that.)
        may = self._last is None or not 0 <= time.ticks_diff(time.ticks_ms(), self._last) < self.min_gap_ms
        # An error line has a second batch of room: the reason for a crash,
        # written by gateway._restart's flush, is not what a flood pushes out.
        if not may and self._n >= (self.batch_bytes << 1 if line[:2] == "E " else self.batch_bytes):
            self.dropped += 1
            return
        rec = "%d %s\n" % (time.time(), line)
        self._buf.append(rec)
        self._n += len(rec)
        if may and (self._n >= self.batch_bytes or line[:2] == "E "):
            self.flush()

    def flush(self):
        if not self._buf:
            return
        lines = len(self._buf)
        data = "".join(self._buf)
        del self._buf[:]
        self._n = 0
        if self.dropped:
            data = "%d ? %d log lines lost\n" % (time.time(), self.dropped) + data
        data = data.encode()
        try:
            if self._size and self._size + len(data) > self.file_bytes:
                self._rotate()
            with open(_name(self.dir, 0), "ab") as f:
                f.write(data)
            self._size += len(data)
            self._last = time.ticks_ms()
            self.writes += 1
            self.dropped = 0
        except OSError:
            # Full or failing flash: lose these lines, keep the broker up.
            self.dropped += lines

    def _rotate(self):
        for i in range(self.files - 1, 0, -1):
            try:
                os.rename(_name(self.dir, i - 1), _name(self.dir, i))
            except OSError:
                pass
        if self.files == 1:
            os.remove(_name(self.dir, 0))
        self._size = 0

    async def run(self, period_ms=60000):
        # Flushes what is buffered once a period, so quiet logs still land.
        import asyncio

        while True:
            await asyncio.sleep_ms(period_ms)
            self.flush()


def paths(path="log"):
    # The ring's files, oldest first.
    try:
        names = os.listdir(path)
    except OSError:
        return []
    nums = []
    for n in names:
        if n.endswith(".log") and n[:-4].isdigit():
            nums.append(int(n[:-4]))
    nums.sort()
    return [_name(path, i) for i in reversed(nums)]


def dump(path="log"):
    # Prints the ring, oldest line first.
    for p in paths(path):
        with open(p) as f:
            while True:
                s = f.read(512)
                if not s:
                    break
                print(s, end="")
