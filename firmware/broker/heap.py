# The one place that decides whether the heap is short. Two floors, both
# from min_free_heap:
#   messages  min_free_heap       below it no new message is taken:
#                                 publishers are paused (TCP backpressure)
#                                 or told 0x97 (v5 QoS 1/2), big packets
#                                 wait, until the queues drain
#   clients   min_free_heap / 2   below it no new connection or session is
#                                 taken (server.py, handle_connect.py)
# Messages stop first, so a board whose heap fills with queued messages
# keeps serving the clients already connected and still lets a new one in
# (a dashboard, a $SYS reader); and a MemoryError is never what tells us.
#
# Some heap is kept aside for the work that frees heap: a store commit (its
# acknowledgements and deletes hold heap until it is written) and a
# session's end. A heap full of queued messages for offline sessions is
# legitimate, and in crumbs it had 7 KB free but no 152 B in one piece for
# the commit: every PUBACK then waited for good (esp32 heap, 27 sessions
# with full queues expiring while others came). It is kept in pieces of
# 256 B, made again as soon as the heap has them: a piece of 2 KB, or of
# 512 B, was rarely there again under that load, and the next commit that
# failed for heap waited for good. (They may take a hole that a 512 B read
# buffer wanted: the commit comes first, and a reader waits for a buffer.)
import gc
import time
from micropython import const
from broker import log

_PIECE = const(256)  # bytes kept aside: _PIECES pieces (a commit needs some hundreds,
_PIECES = const(8)  # its largest piece 152 B)
_GONE = bytearray(0)  # a piece used, not yet made again
_TELL_MS = const(60000)  # may_tell(): at most one line a minute


def unload(name):
    # Forgets module broker.<name>, code that has run and is not needed
    # again (the config's checks, the restore, the dashboard's page): its
    # functions and the globals they use go back to the heap once nothing
    # else holds them. A later import loads it again.
    import sys
    import broker

    sys.modules.pop("broker." + name, None)
    if name in broker.__dict__:
        del broker.__dict__[name]


class Heap:
    def __init__(self, cfg):
        self.message_floor = cfg["min_free_heap"]
        self.most = 1 << 30  # the largest packet that can ever be read (app.start, track)
        self.client_floor = cfg["min_free_heap"] >> 1
        self._budget = 0  # bytes we may take before looking at the heap again
        self.low = False  # a look found it below the message floor (Broker.flush_all)
        self.refused_at = None  # ticks_ms when room_for() last said no
        self._told_at = None  # ticks_ms of the last line may_tell() allowed
        self.rescue = [_GONE] * _PIECES  # the pieces kept aside (keep_rescue)
        self.keep_rescue()  # made early: low in the heap

    def use_rescue(self):
        # Frees the pieces kept aside (those made again since they were
        # last used), for a retry of work that frees heap and failed for
        # want of it.
        r = self.rescue
        if r[0] is _GONE:
            return
        for i in range(_PIECES):
            r[i] = _GONE
        gc.collect()

    def free(self, need=0):
        # Free bytes, after a collection when what is free looks short of
        # need above the message floor: garbage not yet collected is not a
        # shortage. (Collecting sooner cost a fifth of the broker's time
        # under load: the allocator collects by itself when it must.)
        f = gc.mem_free()
        if f - need < self.message_floor:
            gc.collect()
            f = gc.mem_free()
            if f - need < self.message_floor:
                self.low = True  # (the flusher has idle buffers given back)
        return f

    def room_for_client(self, n=0, look=True):
        # True when n more bytes (a subscription) leave the clients' floor
        # free: what a client holds for long is taken down to it. look=False
        # (each topic of a SUBSCRIBE): bytes room_for() may still spend are
        # above the higher floor, so above this one too, and answer without
        # a look, which costs 23 us on the esp32 heap and 200 us on a PC's
        # 4 MB (gc.mem_free() walks the allocation table). Not for a new
        # client, whose heap the budget does not count.
        if not look and self._budget > n:
            self._budget -= n
            return True
        return self.free(n) - n >= self.client_floor

    def room_for_socket(self, sockets):
        # One free piece as large as the poller's tables may need to take
        # one socket more than `sockets` (the caller asks room_for_client()
        # too, unless room can be made once the client has logged in): the
        # select module's map and pollfd array and asyncio's map grow,
        # never shrink, and want about 16 B a socket in one piece. A heap
        # in crumbs has the bytes but not the piece, and a poller that
        # cannot take a socket ends the broker (transport._unpoll):
        # measured on the esp32 heap with max_connections raised, once in
        # four fills at 71 clients. The probe is garbage at once.
        for _ in range(2):
            try:
                bytearray((sockets + 8) << 4)
                return True
            except MemoryError:
                gc.collect()
        return False

    def room_for(self, n):
        # True when n more bytes (a message, a packet) leave the message
        # floor free. gc.mem_free() walks the whole allocation table, so it
        # is not asked per message: after each look, half of the headroom
        # above the floor may be spent first. Callers reckon a message at
        # its payload plus its objects.
        self._budget -= n
        if self._budget > 0:
            return True
        f = self.free(n) - n
        if f < self.message_floor:
            self._budget = 0
            self.refused_at = time.ticks_ms()
            if self.may_tell():
                self._say_short(f + n, n)
            return False
        self._budget = (f - self.message_floor) >> 1
        return True

    def may_tell(self):
        # True at most once a minute: for a log line that says why clients
        # wait for heap. Said, or nothing tells why publishers stall; not
        # each time, or a hub at its floor writes a board's log ring on
        # flash all day.
        now = time.ticks_ms()
        t = self._told_at
        if t is not None and 0 <= time.ticks_diff(now, t) < _TELL_MS:
            return False
        self._told_at = now
        return True

    def _say_short(self, free, n):
        # Apart from room_for(), whose frame must stay off the heap
        # (tools/frames.py): a try and the arguments did not fit.
        try:  # (its arguments take heap)
            log.warning("heap short: %d B free, and %d B more would go below min_free_heap %d; "
                        "publishers wait (v5 QoS 1/2: 0x97) until it recovers", free, n, self.message_floor)
        except MemoryError:
            pass

    def track(self):
        # Once a second (app.py): the largest packet that can ever be read
        # grows with the most heap seen free (restored queues drain,
        # sessions expire after the start).
        f = gc.mem_free() - self.message_floor
        if f > self.most:
            self.most = f
        if self._budget > f >> 1:
            self._budget = f >> 1  # (what clients and sessions took is not counted in it)
        self.keep_rescue()

    def keep_rescue(self):
        # Makes again the pieces kept aside once used: after each commit,
        # and once a second. Whatever else waits for heap: the commit comes
        # first, since what it frees is what the others wait for. (A try
        # that fails costs a collection, but only while they are missing:
        # a heap in crumbs, where the commit is what matters.)
        r = self.rescue
        if r[_PIECES - 1] is not _GONE:
            return  # all there (made in order, used all at once)
        for i in range(_PIECES):
            if r[i] is _GONE:
                try:
                    r[i] = bytearray(_PIECE)
                except MemoryError:
                    return

    def refused_lately(self, now_ms):
        # True while something waits for heap: a paused reader asks again
        # every 50 ms (backpressure.wait_recovered), one waiting for a piece
        # at least once a second (conn._big_buffer).
        t = self.refused_at
        if t is None:
            return False
        if 0 <= time.ticks_diff(now_ms, t) < 2000:
            return True
        # Forgotten once old: ticks wrap every 12.4 days, and a refusal
        # kept for good looked recent again half of that time, 6.2 days
        # on (outside leak probe: stuck-looking clients were closed then).
        self.refused_at = None
        return False

    def spend(self, n):
        # n bytes taken without asking (per receiver of a message).
        self._budget -= n
