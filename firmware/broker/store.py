# Key-value store with group commit for the broker's persistent state, made
# for LittleFS on the boards' NOR flash. docs/store.md has the design, the
# measured flash wear and the recovery rules; this is the short version.
#
# Files in the store's directory:
#   l0 .. l<slots-1>  log slots. commit() writes the batch (its puts and
#                     deletes) over the next free slot: one whole-file
#                     overwrite, one open…write…close. Overwriting an
#                     existing small file is ONE LittleFS metadata commit,
#                     the cheapest durable write there is (a new file per
#                     commit costs three: create, close, remove later). A
#                     batch too big to be stored inline in metadata but
#                     under split_max bytes is cut into inline-sized parts
#                     in consecutive slots, since a few inline commits cost
#                     less than erasing a block. Each part carries the
#                     batch's sequence number, part p of m, and a CRC32.
#   s<xx>             one segment (snapshot) per namespace xx = the key's
#                     first byte in hex: the namespace's live records as of
#                     the sequence number in its header. Compaction rewrites
#                     only the namespaces the logs touched, so cold data (say
#                     retained messages) is not rewritten when hot data
#                     (queued messages) churns: the Mosquitto lesson.
#   t<xx>             a segment being written; renamed over s<xx> when whole.
#
# Recovery: per namespace, the segment's records, then every op of every
# whole batch (all m parts there, each CRC good) newer than the last
# completed compaction and newer than that segment, in sequence order. A
# bad or incomplete batch is dropped alone: on LittleFS a slot being
# overwritten at a power cut keeps its old, already folded content, so only
# the batch in progress can be incomplete, and a bad CRC anywhere else
# means damage, where the later batches are still good and are kept.
#
# RAM: the store keeps the keys written since the last compaction (an index
# into the log slots, bounded by index_max) and one reusable record buffer;
# segments are streamed a record at a time, never loaded whole.
import gc
import os
import struct
from binascii import crc32
from micropython import const

_MAGIC = const(0xB5)
_T_BATCH = const(0x42)
_T_HEAD = const(0x48)
_T_REC = const(0x52)
_T_END = const(0x45)
_OP_PUT = const(0x50)
_OP_DEL = const(0x44)
_VERSION = const(1)
# A frame is magic, type, body length (u16), body, CRC32 of all before it.
_FRAME = const(8)
# A part of a batch is a frame whose body is the sequence number (u32), its
# age (u8: how many sequence numbers after the last completed compaction),
# part, parts (u8 each), then a slice of the batch's ops. An op is op, key
# length (u16), value length (u16), key, value; ops may straddle parts.
_OPS = const(11)  # offset of the payload in a part
_PART = const(15)  # a part's bytes besides its payload
_OPH = const(5)
_AGE_MAX = const(250)
# What one live record costs in a segment: frame, key length, key, value.
# used_bytes and max_bytes count in these units.
_REC = const(10)
_MAXLEN = const(65535)
_ENOSPC = const(28)
_CHUNK = const(128)


class StoreFull(Exception):
    pass


class Store:
    def __init__(
        self,
        path,
        max_bytes,
        slots=64,
        log_max=16384,
        index_max=128,
        max_batch=16384,
        inline_max=120,
        split_max=2048,
        batch_keys=0,
    ):
        # slots: log files; when they are used up, compact. log_max: bytes
        # of live logs before a compaction. index_max: keys written since
        # the last compaction (the RAM index, a dict of about 12 bytes per
        # key on a 32-bit board) before a compaction. max_batch:
        # largest staged batch in bytes. inline_max: the largest file
        # LittleFS keeps inline in metadata (esp32 about 120, rp2 about
        # 500); parts are cut to fit it. split_max: largest batch that is
        # cut into inline parts rather than written as one file.
        # batch_keys: ops a batch is expected to hold (see _make_room); a
        # batch that would take the index past it is written after a
        # compaction, which empties the index.
        self.path = path.rstrip("/")
        self.max_bytes = max_bytes
        self.slots = max(1, min(slots, 255))
        self.log_max = log_max
        self.index_max = index_max
        self.max_batch = min(max_batch, _MAXLEN - _FRAME)
        self.inline_max = inline_max
        self.split_max = split_max
        self.batch_keys = batch_keys
        self.stats = {
            "bytes_written": 0,
            "files_written": 0,
            "block_writes": 0.0,
            "commits": 0,
            "compactions": 0,
            "records_dropped": 0,
        }
        self._staged = [None] * batch_keys
        del self._staged[:]  # keeps its room (see _make_room)
        # Read by the publish path for every QoS 1/2 message: attributes, not
        # methods (a call costs more there than the check it serves).
        self.pending = 0  # encoded bytes of the staged ops
        self._pend_put = 0  # record bytes the staged puts would add
        self._idx = _Index()  # key -> slot << 16 | offset of its op; -1: deleted
        self._segs = {}  # namespace byte -> [seq, live bytes, damaged]
        self._live = []  # (seq, first slot, parts) of unfolded batches
        self._next = 0  # next slot to write
        self._seq = 0  # last sequence number used
        self._base = 0  # sequence number of the last completed compaction
        self._logb = 0  # bytes in live log parts
        self._big = []  # slots holding a file too big to be inline
        self._extra = False  # slot files past `slots` (it was larger once)
        self._tns = {}  # namespaces written since the last compaction
        # Bytes of records on flash: exact after open() and compaction; in
        # between, an overwritten or deleted record counts until the next one.
        self.used_bytes = 0
        self._rep = None
        self._buf = bytearray(256)  # records being read, in pieces of this
        self._src = None  # the segment file and offset of the record being read
        self._src_pos = -1  # (-1: it is in _buf whole)
        self._vr = None  # the log parts whose op is being read (_ops)
        self._hb = bytearray(16)  # frame headers being written
        self._rb = bytearray(16)  # frame headers being read
        self._pb = None  # a part being built
        self._pb_mv = None
        self._compacting = False
        self.feed = None  # called every few records of a long rewrite or read (a watchdog)

    # ---- public API ----

    def open(self):
        # Recover the committed state. Removes temp files and bad or partial
        # log parts; never rewrites data. Returns counts for the log.
        rep = {"recovered": 0, "dropped": 0, "dropped_bytes": 0, "removed": 0, "batches": 0}
        self._rep = rep
        self.discard()
        self._idx = _Index()
        self._segs = {}
        self._live = []
        self._next = 0
        self._seq = 0
        self._base = 0
        self._logb = 0
        self._big = []
        self._extra = False
        self._tns = {}
        _mkdirs(self.path)
        slots = []
        segs = []
        for name in [e[0] for e in os.ilistdir(self.path)]:
            c = name[:1]
            if c == "t":
                self._remove(name)
                rep["removed"] += 1
            elif c == "l" and name[1:].isdigit():
                slots.append(int(name[1:]))
                self._extra = self._extra or slots[-1] >= self.slots
            elif c == "s" and len(name) == 3:
                try:
                    segs.append(int(name[1:], 16))
                except ValueError:
                    pass
        # Segment sequence numbers first: they decide which log ops apply.
        for ns in segs:
            seq = self._seg_seq(ns)
            self._segs[ns] = [seq, 0, 0]
            self._seq = max(self._seq, seq)
        # Log parts, grouped into batches in sequence order. Every part
        # names the last compaction completed before it was written; all
        # batches up to the newest such compaction are folded already.
        found = []
        for n, i in enumerate(slots):
            if n & 7 == 7:
                # Reading a slot leaves garbage, and MicroPython allocates
                # onward from its last allocation until a collection: what
                # is kept (the part heads) would end up strewn across the
                # free heap. Measured on the esp32 host heap after a power
                # cut with 64 slots: 69 KB free, largest free block 1.1 KB.
                gc.collect()
            h = self._part_head(i)
            if h is not None:
                found.append(h)
                self._seq = max(self._seq, h[0])
                self._base = max(self._base, h[0] - h[1])
        found.sort()
        idx = self._idx
        a = 0
        while a < len(found):
            seq, age, part, count, i = found[a]
            b = a
            while b < len(found) and found[b][0] == seq:
                b += 1
            if seq <= self._base:
                a = b
                continue
            whole = b - a == count
            for j in range(a, b):
                whole = whole and found[j][2] == j - a and found[j][4] == i + j - a
            if not whole:
                # The batch in progress at a cut (or damage): drop it all.
                # Unless a newer batch holds one of its slots: slots are
                # reused only once what they held is folded (or was dropped
                # before), so this is a stale remnant, not a loss.
                start = found[a][4] - found[a][2]
                stale = False
                for h in found:
                    stale = stale or (h[0] > seq and start <= h[4] < start + count)
                if not stale:
                    self._drop(0)
                for j in range(a, b):
                    self._remove("l%d" % found[j][4])
                    rep["removed"] += 1
                a = b
                continue
            live = False
            for op, key, loc, vlen in self._ops(i, count):
                s = self._segs.get(_ns(key))
                if s is not None and seq <= s[0]:
                    continue
                live = True
                idx[key] = loc if op == _OP_PUT else -1
                self._tns[_ns(key)] = 1
            if live:
                self._live.append((seq, i, count))
                self._next = max(self._next, i + count)
                for j in range(i, i + count):
                    self._logb += os.stat(self._slot(j))[6]
            rep["batches"] += 1
            a = b
        found = None
        # Stream the segments: check every record, count the live bytes.
        used = 0
        recs = 0
        for ns in segs:
            s = self._segs[ns]
            live = 0
            for typ, n, key in self._seg_records(ns):
                if typ == _T_REC and key not in idx:
                    live += n
                    recs += 1
            s[1] = live
            used += live
        # The logs' live puts.
        for seq, i, m in self._live:
            for op, key, loc, vlen in self._ops(i, m):
                if op == _OP_PUT and idx.get(key) == loc:
                    used += _REC + len(key.encode()) + vlen
                    recs += 1
        self.used_bytes = used
        rep["recovered"] = recs
        self.stats["records_dropped"] += rep["dropped"]
        self._make_room()
        return rep

    def _make_room(self):
        # The staging list (made in __init__) and the RAM index get room for
        # batch_keys keys now, while the heap is still in one piece,
        # and keep it: discard() and compaction empty them in place. A
        # commit then needs no large piece of heap, even when the heap has
        # filled up in crumbs with queued messages (measured on the esp32
        # heap: the index's growth to 97 slots, 776 B, failed with 17 KB
        # free, and every acknowledgement that would drain the heap waited
        # for that commit). Int keys never collide with the store's str keys.
        idx = self._idx
        n = self.batch_keys
        for i in range(n):
            idx[-1 - i] = 0
        for i in range(n):
            del idx[-1 - i]

    def items(self):
        # The committed state, one (key, value) at a time: the value is
        # bytes, or a bytearray when its record is larger than the read
        # buffer (read straight into it, not copied again). A value the
        # flash fails to read back (its CRC held when it was checked) is
        # dropped and counted, with the rest of its batch in a log, so that
        # the broker still starts. Do not commit while iterating:
        # compaction replaces the files being read.
        idx = self._idx
        for ns in sorted(self._segs):
            for typ, n, key in self._seg_records(ns, True):
                if typ == _T_REC and key not in idx:
                    b = self._buf
                    k = 6 + (b[4] | b[5] << 8)
                    if self._src_pos >= 0:  # (larger than the buffer)
                        b = bytearray(n - 4 - k)
                        try:
                            self._frame_read(k, memoryview(b))
                        except OSError:
                            self._unread(n)
                            continue
                        yield key, b
                    else:
                        yield key, bytes(b[k : n - 4])
        for seq, i, m in list(self._live):
            for op, key, loc, vlen in self._ops(i, m, True):
                if op == _OP_PUT and idx.get(key) == loc:
                    b = self._buf if vlen <= len(self._buf) else bytearray(vlen)
                    try:
                        self._vr.value(memoryview(b)[:vlen])
                    except OSError:
                        self._unread(vlen)
                        break  # (its reader is part way into a value)
                    yield key, bytes(memoryview(b)[:vlen]) if b is self._buf else b

    def keys(self):
        # The committed keys, as items() gives them, no value read.
        idx = self._idx
        for ns in sorted(self._segs):
            for typ, _, key in self._seg_records(ns, True):
                if typ == _T_REC and key not in idx:
                    yield key
        for _, i, m in list(self._live):
            for op, key, loc, _ in self._ops(i, m):
                if op == _OP_PUT and idx.get(key) == loc:
                    yield key

    def put(self, key, value):
        # value: bytes-like (copied unless bytes), or a tuple of bytes
        # pieces stored as one value and not copied: a message's record is
        # its small head and its payload as the broker holds it, so a large
        # payload is never copied to be stored.
        kb = _keybytes(key)
        if type(value) is not bytes and type(value) is not tuple:
            value = bytes(value)
        vn = _vlen(value)
        n = _REC + len(kb) + vn
        op = _OPH + len(kb) + vn
        if vn > _MAXLEN or _PART + op > self.max_batch:
            raise StoreFull("record too large")
        self._room(op)
        if self.used_bytes + self._pend_put + n > self.max_bytes:
            if self._live and not self._compacting:
                self.compact()
            if self.used_bytes + self._pend_put + n > self.max_bytes:
                raise StoreFull("store full")
        self._staged.append((key, kb, value))
        self.pending += op
        self._pend_put += n

    def delete(self, key):
        # Deletes may go past max_batch (they make room), up to the format's
        # limit of 64 KB per batch.
        kb = _keybytes(key)
        op = _OPH + len(kb)
        if self.pending + op > _MAXLEN - _OPS:
            raise StoreFull("batch full: commit first")
        self._staged.append((key, kb, None))
        self.pending += op

    def batch_room(self):
        # Bytes of records an empty batch takes.
        return self.max_batch - _PART

    def batch_left(self):
        # Bytes of records put() still takes before the next commit.
        return self.max_batch - _PART - self.pending

    def takes(self, key, value):
        # Whether the staged batch has room for this put() (else: commit
        # first).
        return _OPH + len(_keybytes(key)) + _vlen(value) <= self.batch_left()

    def staged_ops(self):
        return len(self._staged)

    def discard(self):
        del self._staged[:]
        self.pending = self._pend_put = 0

    def commit(self):
        # All staged changes, durably, or none of them: on StoreFull (or
        # any other error) the stored state is as before and the batch
        # stays staged, to be committed by a later call (the broker retries:
        # what it acknowledges waits for that). Returns the batch's sequence
        # number (0: nothing staged).
        # (Nothing can be staged meanwhile: commit does not yield.)
        if not self._staged:
            return 0
        seq = self._commit(self._staged, self.pending)
        self.discard()
        return seq

    def _commit(self, staged, pend):
        # (An error after the batch was written, while the index is updated,
        # leaves it staged too: its ops are idempotent, so writing it again
        # is harmless.)
        for key, kb, v in staged:
            self._tns[kb[0]] = 1
        cap = self.inline_max - _PART
        m = (pend + cap - 1) // cap if cap > 15 else 0
        if (
            _PART + pend <= self.inline_max
            or _PART + pend > self.split_max
            or not 1 < m <= self.slots
            or not self._split_pays(m, cap, pend)
        ):
            cap = pend
            m = 1
        if (
            self._next + m > self.slots
            or self._logb >= self.log_max
            or self._index_full()
            or self._seq + 1 - self._base > _AGE_MAX
        ):
            self.compact()
        self._seq += 1
        seq = self._seq
        i = self._next
        try:
            if m == 1:
                self._write_part(i, seq, 0, 1, staged, pend)
            else:
                self._write_split(i, seq, m, cap, staged)
        except Exception:
            # Parts already written are an incomplete batch, which open()
            # would drop; remove them now.
            for p in range(m):
                self._remove("l%d" % (i + p))
            raise
        idx = self._idx
        pos = 0
        for key, kb, v in staged:
            loc = (i + pos // cap) << 16 | (_OPS + pos % cap)
            if v is None:
                idx[key] = -1
                pos += _OPH + len(kb)
            else:
                idx[key] = loc
                vn = _vlen(v)
                self.used_bytes += _REC + len(kb) + vn
                pos += _OPH + len(kb) + vn
        self._live.append((seq, i, m))
        self._logb += pend + m * _PART
        self._next = i + m
        self.stats["commits"] += 1
        return seq

    def compact(self):
        # Fold the live log batches into the segments of the namespaces
        # they touch, all at once (compact_steps() does it in steps).
        for _ in self.compact_steps():
            pass

    def compaction_due(self):
        # True when the next commit would compact first: the caller may
        # run compact_steps() before it, in steps, instead.
        return (
            self._next + 4 > self.slots
            or self._logb >= self.log_max
            or self._index_full()
            or self._seq + 2 - self._base > _AGE_MAX
        )

    def _index_full(self):
        n = len(self._idx)
        return n >= self.index_max or (self.batch_keys and n + len(self._staged) > self.batch_keys)

    def compact_steps(self):
        # compact() as a generator that rewrites one namespace per step, so
        # that the broker's other tasks run in between (the committer
        # yields at each step). Crash-safe at every step: a segment is
        # written under a temp name and renamed over the old one, and the
        # slots are reused only after every touched segment has been
        # replaced. Nothing may be committed until it has run to its end.
        idx = self._idx
        touched = {}
        for key in idx:
            touched[_ns(key)] = 1
        for ns in self._segs:
            if self._segs[ns][2]:
                touched[ns] = 1
        seq = self._seq
        self._compacting = True
        try:
            for ns in sorted(touched):
                live = self._rewrite(ns, seq)
                sg = self._segs.get(ns)
                if sg is None:
                    self._segs[ns] = [seq, live, 0]
                else:
                    sg[0] = seq
                    sg[1] = live
                    sg[2] = 0
                yield
        finally:
            self._compacting = False
        touched = None
        # Slots past a smaller `slots` setting: remove every slot file (all
        # are folded now), so that no batch is left in pieces.
        if self._extra:
            for name in [e[0] for e in os.ilistdir(self.path)]:
                if name[:1] == "l" and name[1:].isdigit():
                    self._remove(name)
            self._extra = False
        # Stale slots holding whole blocks go: only inline ones are kept for
        # reuse, so old logs cannot pile up on flash.
        for i in self._big:
            self._remove("l%d" % i)
        del self._big[:]
        if self._live:
            self.stats["compactions"] += 1
        # Containers are emptied, not made anew: made anew they landed,
        # long-lived, in the heap the broker had freed for this commit
        # (heap.py's pieces), and a heap in crumbs lost them for good.
        idx.clear()
        _empty(self._tns)
        del self._live[:]
        self._next = 0
        self._logb = 0
        self._base = seq
        used = 0
        for ns in self._segs:
            used += self._segs[ns][1]
        self.used_bytes = used

    # ---- internals ----

    def _split_pays(self, m, cap, pend):
        # Estimated block erases of m inline parts against one file of
        # pend bytes. An inline write costs a share of a metadata block
        # (measured: about 0.01 + size / 2000); parts also use up slots
        # sooner, so compactions (rewriting the namespaces touched since
        # the last one) come more often. A batch of many parts in front of
        # a big hot namespace is cheaper written whole.
        comp = 0.3
        for ns in self._tns:
            s = self._segs.get(ns)
            if s is not None:
                comp += s[1] / 4096
        whole = pend + _PART
        every = min(self.slots, max(1, self.log_max // whole))
        split = m * (0.01 + (cap + _PART) / 2000 + comp / self.slots)
        return split < (whole + 4095) // 4096 + comp / every

    def _room(self, op):
        if self.pending + op > self.max_batch - _PART:
            raise StoreFull("batch full: commit first")

    def _head(self, blen, seq, p, m):
        struct.pack_into(
            "<BBHIBBB", self._hb, 0, _MAGIC, _T_BATCH, blen, seq, seq - self._base, p, m
        )

    def _write_part(self, i, seq, p, m, staged, n):
        # One part file: the whole batch (staged ops, n bytes, streamed
        # without a buffer) or, for a split batch, a payload slice.
        h = self._hb
        mv = memoryview(h)
        ob = memoryview(self._rb)[:_OPH]
        self._head(_OPS - 4 + n, seq, p, m)
        crc = crc32(mv[:_OPS])
        if staged is None:
            crc = crc32(self._pb_mv[:n], crc)
        else:
            for key, kb, v in staged:
                _pack_op(self._rb, kb, v)
                crc = crc32(kb, crc32(ob, crc))
                if type(v) is tuple:
                    for x in v:
                        crc = crc32(x, crc)
                elif v:
                    crc = crc32(v, crc)
        path = self._slot(i)
        f = None
        try:
            f = open(path, "wb")
            f.write(mv[:_OPS])
            if staged is None:
                f.write(self._pb_mv[:n])
            else:
                for key, kb, v in staged:
                    _pack_op(self._rb, kb, v)
                    f.write(ob)
                    f.write(kb)
                    if type(v) is tuple:
                        for x in v:
                            f.write(x)
                    elif v:
                        f.write(v)
            struct.pack_into("<I", h, 0, crc)
            f.write(mv[:4])
            # close() is the commit point: LittleFS makes the new content
            # visible atomically, or keeps the old.
            f.close()
            f = None
        except Exception as e:
            # The slot being written holds nothing live, so it can go.
            self._abandon(f, path)
            _full(e)
            raise
        if n + _PART > self.inline_max and i not in self._big:
            self._big.append(i)
        self._wrote(n + _PART)

    def _write_split(self, i, seq, m, cap, staged):
        # The batch's op stream cut into m parts of cap bytes (the last one
        # shorter), each built in a small buffer and written whole.
        if self._pb is None or len(self._pb) < cap:
            self._pb = bytearray(cap)
            self._pb_mv = memoryview(self._pb)
        pb = self._pb
        ob = bytearray(_OPH)
        fill = 0
        p = 0
        for key, kb, v in staged:
            _pack_op(ob, kb, v)
            for piece in (ob, kb) + (v if type(v) is tuple else (v,)):
                if not piece:
                    continue
                src = memoryview(piece)
                j = 0
                n = len(piece)
                while j < n:
                    k = min(cap - fill, n - j)
                    pb[fill : fill + k] = src[j : j + k]
                    fill += k
                    j += k
                    if fill == cap:
                        self._write_part(i + p, seq, p, m, None, fill)
                        p += 1
                        fill = 0
        if fill:
            self._write_part(i + p, seq, p, m, None, fill)

    def _slot(self, i):
        return "%s/l%d" % (self.path, i)

    def _segp(self, ns, c="s"):
        return "%s/%s%02x" % (self.path, c, ns)

    def _remove(self, name):
        try:
            os.remove(self.path + "/" + name)
        except OSError:
            pass

    def _abandon(self, f, p):
        # After a failed write (no space, I/O error, MemoryError, a power
        # cut in the simulator): close what is open, now rather than in a
        # GC finaliser, and remove the remains.
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        try:
            os.remove(p)
        except OSError:
            pass

    def _wrote(self, size):
        st = self.stats
        st["bytes_written"] += size
        st["files_written"] += 1
        if size <= self.inline_max:
            st["block_writes"] += 0.06
        else:
            st["block_writes"] += (size + 4095) // 4096

    def _drop(self, nbytes):
        rep = self._rep
        rep["dropped"] += 1
        rep["dropped_bytes"] += nbytes

    def _unread(self, nbytes):
        # A record dropped after open() (items()): counted in the stats too.
        self._drop(nbytes)
        self.stats["records_dropped"] += 1

    def _grow(self, n):
        # The read buffer grows only to hold a key (records are read and
        # copied through it in pieces: see _frame_at), at least doubling;
        # on a heap too fragmented for that, to just what is needed. The
        # old one is kept until a new one is had (callers hold it too, so
        # dropping it first would free nothing): without a buffer the store
        # could not read at all, and a MemoryError leaves it as it was.
        k = len(self._buf)
        if k < n:
            want = (n + 255) & ~255
            try:
                b = bytearray(max(want, 2 * k))
            except MemoryError:
                b = bytearray(want)
            self._buf = b
        return self._buf

    def _crc_file(self, f, n, crc):
        # CRC32 of the next n bytes of f, read in small pieces; None if short.
        b = memoryview(self._buf)[:_CHUNK]
        while n > 0:
            k = _readn(f, b[: min(n, _CHUNK)])
            if k == 0:
                return None
            crc = crc32(b[:k], crc)
            n -= k
        return crc

    def _part_head(self, i):
        # (seq, age, part, parts, slot) of a log slot holding a whole,
        # valid part, else None. A bad slot is dropped and removed; an empty
        # one (its creation cut short) is removed without counting.
        p = self._slot(i)
        try:
            size = os.stat(p)[6]
        except OSError:
            return None
        head = None
        if size:
            try:
                f = open(p, "rb")
                try:
                    h = memoryview(self._rb)[:_OPS]
                    if _readn(f, h) == _OPS:
                        m, t, blen, seq, age, part, count = struct.unpack_from("<BBHIBBB", h)
                        if m == _MAGIC and t == _T_BATCH and blen + _FRAME == size and part < count:
                            crc = self._crc_file(f, size - _OPS - 4, crc32(h))
                            if crc is not None and _readn(f, h[:4]) == 4:
                                if struct.unpack_from("<I", h)[0] == crc:
                                    head = (seq, age, part, count, i)
                                    if size > self.inline_max:
                                        self._big.append(i)
                finally:
                    f.close()
            except OSError:
                head = None
            if head is None:
                self._drop(size)
        if head is None:
            self._remove("l%d" % i)
            self._rep["removed"] += 1
        return head

    def _ops(self, i, m, values=False):
        # The ops of a whole batch in parts i .. i+m-1: (op, key, location,
        # value length), the location being slot << 16 | offset of the op's
        # first byte. With `values`, while an op is current its value can
        # be read, in pieces, with self._vr.value(); what is not read is
        # skipped.
        r = _Parts(self, i, m)
        self._vr = r
        try:
            h = memoryview(self._rb)[:_OPH]
            while True:
                loc = r.loc()
                if loc < 0 or r.read(h) < _OPH:
                    return
                op, kl, vl = struct.unpack_from("<BHH", h)
                b = self._grow(kl)
                if r.read(memoryview(b)[:kl]) < kl:
                    return
                try:
                    key = str(memoryview(b)[:kl], "utf-8")
                except UnicodeError:
                    return
                if not values:
                    if not r.skip(vl):
                        return
                    yield op, key, loc, vl
                    continue
                if not r.has(vl):
                    return
                r.vleft = vl
                yield op, key, loc, vl
                if not r.skip(r.vleft):
                    return
        finally:
            self._vr = None
            r.close()

    def _seg_seq(self, ns):
        # The sequence number a segment covers: from its head frame, or from
        # its end frame when the head is damaged; -1 when neither is whole.
        seq = -1
        g = self._seg_records(ns, True)
        try:
            for typ, n, key in g:
                if typ == _T_HEAD or typ == _T_END:
                    seq = key
                    if typ == _T_HEAD:
                        break
        finally:
            g.close()
        return seq

    def _seg_records(self, ns, quiet=False):
        # Every whole, valid frame of a segment: (type, frame length, key);
        # for head and end frames `key` is the sequence number. While a
        # record is current, _frame_read() and _frame_copy() read it.
        # Damaged stretches are skipped by searching for the next frame
        # whose CRC holds; unless quiet, each stretch counts as one dropped
        # record and the namespace is marked for a rewrite.
        p = self._segp(ns)
        try:
            size = os.stat(p)[6]
            f = open(p, "rb")
        except OSError:
            return
        try:
            pos = 0
            bad = -1
            ended = False
            recs = 0
            while pos + _FRAME <= size:
                n = self._frame_at(f, pos, size)
                if n == 0:
                    if bad < 0:
                        bad = pos
                    pos = self._next_magic(f, pos + 1, size)
                    continue
                if bad >= 0:
                    if not quiet:
                        self._drop(pos - bad)
                    bad = -1
                b = self._buf
                typ = b[1]
                if typ == _T_REC:
                    kl = b[4] | b[5] << 8
                    key = None
                    if 6 + kl <= n - 4:
                        try:
                            key = str(memoryview(b)[6 : 6 + kl], "utf-8")
                        except UnicodeError:
                            pass
                    if key is None:
                        if not quiet:
                            self._drop(n)
                    else:
                        recs += 1
                        self._src = f
                        yield typ, n, key
                elif typ == _T_HEAD:
                    yield typ, n, struct.unpack_from("<I", b, 4)[0]
                elif typ == _T_END:
                    ended = struct.unpack_from("<I", b, 4)[0] == recs
                    yield typ, n, struct.unpack_from("<I", b, 8)[0]
                pos += n
            if bad >= 0:
                pos = bad
            if not quiet:
                if pos < size:
                    self._drop(size - pos)
                if pos < size or not ended:
                    self._segs[ns][2] = 1
        finally:
            self._src = None
            f.close()

    def _frame_read(self, k, mv):
        # Bytes k .. k + len(mv) of the current segment record into mv.
        n = len(mv)
        if self._src_pos < 0:
            mv[:] = memoryview(self._buf)[k : k + n]
            return
        f = self._src
        f.seek(self._src_pos + k)
        if _readn(f, mv) < n:
            raise OSError(5)  # (its CRC held a moment ago)

    def _frame_copy(self, out, n):
        # Writes the current segment record, n bytes, to the file out. One
        # larger than the buffer is read a second time, in pieces, and its
        # CRC checked again: LittleFS checks no file data, and a bad read
        # copied would be lost once the old segment is gone.
        b = memoryview(self._buf)
        if self._src_pos < 0:
            out.write(b[:n])
            return
        k = 0
        crc = 0
        while k < n - 4:
            m = min(n - 4 - k, len(b))
            self._frame_read(k, b[:m])
            crc = crc32(b[:m], crc)
            out.write(b[:m])
            k += m
        h = memoryview(self._rb)[:4]
        self._frame_read(k, h)
        if struct.unpack_from("<I", h)[0] != crc:
            raise OSError(5)
        out.write(h)

    def _frame_at(self, f, pos, size):
        # Length of the valid segment frame at pos, or 0. The frame is now
        # in self._buf, or, larger than that, its head and key: the rest is
        # read from the file in pieces (_frame_read). Read whole, a record
        # wanted one piece of heap its size at each compaction, which a
        # heap in crumbs lacked, and every commit, with every
        # acknowledgement behind it, waited until the heap changed (outside
        # probe: offline sessions and four messages of 2 to 7 KB stalled
        # the broker until they came back).
        self._src_pos = -1
        h = memoryview(self._rb)[:4]
        f.seek(pos)
        if _readn(f, h) < 4:
            return 0
        m, t, blen = struct.unpack_from("<BBH", h)
        n = blen + _FRAME
        if m != _MAGIC or (t != _T_REC and t != _T_HEAD and t != _T_END) or pos + n > size:
            return 0
        if n > len(self._buf):
            # Check the CRC in small pieces before growing the buffer, so a
            # damaged length cannot make us allocate a large buffer.
            crc = self._crc_file(f, blen, crc32(h))
            if crc is None or _readn(f, h) < 4 or struct.unpack_from("<I", h)[0] != crc:
                return 0
            f.seek(pos + 4)
            if _readn(f, h[:2]) < 2:
                return 0
            k = min(6 + (h[0] | h[1] << 8), n)
            b = self._grow(k)
            f.seek(pos)
            if _readn(f, memoryview(b)[:k]) < k:
                return 0
            self._src_pos = pos
            return n
        b = self._buf
        mv = memoryview(b)
        b[0:4] = h
        if _readn(f, mv[4:n]) < n - 4:
            return 0
        if crc32(mv[: n - 4]) != struct.unpack_from("<I", b, n - 4)[0]:
            return 0
        return n

    def _next_magic(self, f, pos, size):
        b = memoryview(self._rb)
        while pos < size:
            f.seek(pos)
            k = _readn(f, b)
            if k == 0:
                break
            for j in range(k):
                if b[j] == _MAGIC:
                    return pos + j
            pos += k
        return size

    def _rewrite(self, ns, seq):
        # Write namespace ns's live records (segment records not overridden
        # by the logs, then the logs' live puts) as a new segment covering
        # seq. Returns the live bytes.
        idx = self._idx
        tmp = self._segp(ns, "t")
        h = self._hb
        mv = memoryview(h)
        f = None
        count = 0
        live = 0
        try:
            f = open(tmp, "wb")
            struct.pack_into("<BBHIB", h, 0, _MAGIC, _T_HEAD, 5, seq, _VERSION)
            struct.pack_into("<I", h, 9, crc32(mv[:9]))
            f.write(mv[:13])
            if ns in self._segs:
                for typ, n, key in self._seg_records(ns, True):
                    if typ == _T_REC and key not in idx:
                        self._frame_copy(f, n)
                        count += 1
                        live += n
                        if count & 15 == 0 and self.feed is not None:
                            self.feed()
            for s, i, m in self._live:
                for op, key, loc, vl in self._ops(i, m, True):
                    if op != _OP_PUT or idx.get(key) != loc:
                        continue
                    kb = key.encode()
                    if kb[0] != ns:
                        continue
                    n = _REC + len(kb) + vl
                    struct.pack_into("<BBHH", h, 0, _MAGIC, _T_REC, n - _FRAME, len(kb))
                    crc = crc32(kb, crc32(mv[:6]))
                    f.write(mv[:6])
                    f.write(kb)
                    b = memoryview(self._buf)
                    k = vl
                    while k:  # (in pieces, as _frame_copy)
                        got = min(k, len(b))
                        self._vr.value(b[:got])
                        crc = crc32(b[:got], crc)
                        f.write(b[:got])
                        k -= got
                    struct.pack_into("<I", h, 0, crc)
                    f.write(mv[:4])
                    count += 1
                    live += n
            struct.pack_into("<BBHII", h, 0, _MAGIC, _T_END, 8, count, seq)
            struct.pack_into("<I", h, 12, crc32(mv[:12]))
            f.write(mv[:16])
            f.close()
            f = None
            os.rename(tmp, self._segp(ns))
        except Exception as e:
            self._abandon(f, tmp)
            _full(e)
            raise
        self._wrote(13 + live + 16)
        return live


def _keybytes(key):
    kb = key.encode()
    if not kb or len(kb) > 1024:
        raise ValueError("bad key")
    return kb


def _ns(key):
    return key.encode()[0]


def _full(e):
    if isinstance(e, OSError) and e.args and e.args[0] == _ENOSPC:
        raise StoreFull("filesystem full")


def _readn(f, mv):
    # readinto until mv is full or the file ends; returns the count read.
    n = 0
    want = len(mv)
    while n < want:
        r = f.readinto(mv[n:])
        if not r:
            break
        n += r
    return n


def _mkdirs(path):
    try:
        os.stat(path)
        return
    except OSError:
        pass
    i = path.rfind("/")
    if i > 0:
        _mkdirs(path[:i])
    os.mkdir(path)


class _Index:
    # The RAM index: a dict per eighth of the keys, by their hash. One dict
    # grows in one piece of heap: a commit whose batch took it past its
    # 97 slots wanted 1,016 B at once, a heap in crumbs had none with
    # 28 KB free, and every acknowledgement waited for that commit for
    # good (outside probe, persistent sessions expiring with their queues).
    # Each part grows in pieces an eighth that size.
    def __init__(self):
        self.parts = [{}, {}, {}, {}, {}, {}, {}, {}]

    def __setitem__(self, key, v):
        self.parts[hash(key) & 7][key] = v

    def __delitem__(self, key):
        del self.parts[hash(key) & 7][key]

    def __contains__(self, key):
        return key in self.parts[hash(key) & 7]

    def get(self, key, default=None):
        return self.parts[hash(key) & 7].get(key, default)

    def __len__(self):
        n = 0
        for p in self.parts:
            n += len(p)
        return n

    def __iter__(self):
        for p in self.parts:
            for key in p:
                yield key

    def clear(self):
        for p in self.parts:
            _empty(p)


def _empty(d):
    # Empties dict d in place: it keeps its table, so the next cycle does
    # not grow it again through ever larger allocations (dict.clear()
    # would free it).
    while d:
        d.popitem()


class _Parts:
    # The payloads of a batch's part files, read as one stream.
    def __init__(self, st, i, m):
        self.st = st
        self.i = i
        self.end = i + m
        self.f = None
        self.off = 0
        self.left = 0
        self.vleft = 0  # bytes of the current op's value not yet read (value())

    def _step(self):
        # Move on to the next part; False when there is none.
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.i >= self.end:
            return False
        path = self.st._slot(self.i)
        self.i += 1
        self.left = os.stat(path)[6] - _OPS - 4
        self.off = _OPS
        self.f = open(path, "rb")
        self.f.seek(_OPS)
        return True

    def loc(self):
        # Location of the next byte, or -1 at the end of the batch.
        while self.left <= 0:
            if not self._step():
                return -1
        return (self.i - 1) << 16 | self.off

    def read(self, mv):
        n = 0
        want = len(mv)
        while n < want:
            if self.left <= 0 and not self._step():
                break
            k = _readn(self.f, mv[n : n + min(want - n, self.left)])
            if k == 0:
                break
            n += k
            self.off += k
            self.left -= k
        return n

    def value(self, mv):
        # The next len(mv) bytes of the current op's value (Store._ops)
        # into mv. They were there (has()): short, the flash failed a read.
        n = len(mv)
        if n > self.vleft or self.read(mv) < n:
            raise OSError(5)
        self.vleft -= n

    def has(self, n):
        # Whether n more bytes are there: in this part and the ones after.
        k = self.left
        j = self.i
        while k < n and j < self.end:
            k += os.stat(self.st._slot(j))[6] - _OPS - 4
            j += 1
        return k >= n

    def skip(self, n):
        while n > 0:
            if self.left <= 0 and not self._step():
                return False
            k = min(n, self.left)
            self.off += k
            self.left -= k
            n -= k
            self.f.seek(self.off)
        return True

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def _vlen(v):
    # Bytes of a staged value (None: a delete).
    if v is None:
        return 0
    if type(v) is tuple:
        n = 0
        for x in v:
            n += len(x)
        return n
    return len(v)


def _pack_op(buf, kb, v):
    struct.pack_into("<BHH", buf, 0, _OP_DEL if v is None else _OP_PUT, len(kb), _vlen(v))
