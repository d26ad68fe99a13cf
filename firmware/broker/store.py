# Key-value store with group commit for the broker's persistent state, made
# for LittleFS on the boards' NOR flash. docs/store.md has the design, the
# measured flash wear and the recovery rules; this is the short version.
#
# Files in the store's directory:
#   l0 .. l<slots-1>  log slots. Each commit() overwrites the next slot with
#                     one batch frame (all the batch's puts and deletes, a
#                     sequence number, a CRC32). Overwriting an existing small
#                     file is ONE LittleFS metadata commit, the cheapest
#                     durable write there is; a new file per commit would cost
#                     three (create, close, remove later).
#   s<xx>             one segment (snapshot) per namespace xx = the key's first
#                     byte in hex. It holds the namespace's live records as of
#                     the sequence number in its header. Compaction rewrites
#                     only the namespaces the logs touched, so cold data (say
#                     retained messages) is not rewritten when hot data
#                     (queued messages) churns: the Mosquitto lesson.
#   t<xx>             a segment being written; renamed over s<xx> when whole.
#
# Recovery: per namespace, the segment's records, then every log op with a
# sequence number above that segment's. A slot whose CRC fails is dropped
# alone: LittleFS's close() is atomic, so the slot being overwritten at a
# power cut keeps its old (already folded) content, and a bad slot can only
# come from damage, where the later batches are still good and are kept.
#
# RAM: the store keeps only the keys written since the last compaction (an
# index into the log slots) and one reusable record buffer; segments are
# streamed a record at a time, never loaded whole.
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
# A batch body starts with the sequence number (u32); each op is op, key
# length (u16), value length (u16), key, value.
_OPH = const(5)
# What one live record costs in a segment: frame, key length, key, value.
# used_bytes and max_bytes count in these units.
_REC = const(10)
_MAXLEN = const(65535)
_ENOSPC = const(28)
_CHUNK = const(128)
_INLINE_COST = 0.06


class StoreFull(Exception):
    pass


def _keybytes(key):
    kb = key.encode()
    if not kb or len(kb) > _MAXLEN:
        raise ValueError("bad key")
    return kb


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


class Store:
    def __init__(
        self,
        path,
        max_bytes,
        slots=16,
        log_max=8192,
        index_max=256,
        max_batch=16384,
        inline_max=120,
    ):
        # slots: log files before a compaction is forced. log_max: bytes of
        # live logs before a compaction. index_max: keys written since the
        # last compaction (the RAM index) before a compaction. max_batch:
        # largest staged batch, in bytes. inline_max: the filesystem's inline
        # file limit, used only for the stats' block estimate (esp32 ~120,
        # rp2 ~500).
        self.path = path.rstrip("/")
        self.max_bytes = max_bytes
        self.slots = min(slots, 64)
        self.log_max = log_max
        self.index_max = index_max
        self.max_batch = min(max_batch, _MAXLEN - _FRAME)
        self.inline_max = inline_max
        self.stats = {
            "bytes_written": 0,
            "files_written": 0,
            "block_writes": 0.0,
            "commits": 0,
            "compactions": 0,
            "records_dropped": 0,
        }
        self._staged = []
        self._pend = 0  # encoded bytes of the staged ops
        self._pend_put = 0  # record bytes the staged puts would add
        self._idx = {}  # key -> slot << 16 | offset of its op, or -1 if deleted
        self._segs = {}  # namespace byte -> [seq, live bytes, damaged]
        self._live = []  # (seq, slot) of slots holding unfolded ops, by seq
        self._next = 0  # next slot to write
        self._seq = 0  # last sequence number used
        self._logb = 0  # bytes of live log slots
        self._used = 0
        self._buf = bytearray(256)
        self._hb = bytearray(16)
        self._opened = False

    # ---- public API ----

    def open(self):
        # Recover the committed state. Removes temp files and bad log slots;
        # never rewrites data. Returns counts for the log.
        rep = {"recovered": 0, "dropped": 0, "dropped_bytes": 0, "removed": 0, "logs": 0}
        self._rep = rep
        self._staged = []
        self._pend = self._pend_put = 0
        self._idx = {}
        self._segs = {}
        self._live = []
        self._next = 0
        self._seq = 0
        self._logb = 0
        _mkdirs(self.path)
        names = [e[0] for e in os.ilistdir(self.path)]
        slots = []
        segs = []
        for name in names:
            c = name[:1]
            if c == "t":
                self._remove(name)
                rep["removed"] += 1
            elif c == "l" and name[1:].isdigit():
                slots.append(int(name[1:]))
            elif c == "s" and len(name) == 3:
                try:
                    segs.append(int(name[1:], 16))
                except ValueError:
                    pass
        del names
        # Segment sequence numbers first: they decide which log ops apply.
        for ns in segs:
            seq = self._seg_seq(ns)
            self._segs[ns] = [seq, 0, 0]
            if seq > self._seq:
                self._seq = seq
        # Log slots in sequence order.
        found = []
        for i in slots:
            seq = self._slot_seq(i)
            if seq >= 0:
                found.append((seq, i))
        found.sort()
        idx = self._idx
        for seq, i in found:
            if seq > self._seq:
                self._seq = seq
            live = False
            for op, key, off, vlen in self._ops(i, False):
                s = self._segs.get(_ns(key))
                if s is not None and seq <= s[0]:
                    continue
                live = True
                idx[key] = (i << 16 | off) if op == _OP_PUT else -1
            if live:
                self._live.append((seq, i))
                self._logb += os.stat(self._slot(i))[6]
                if i >= self._next:
                    self._next = i + 1
        rep["logs"] = len(self._live)
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
        for seq, i in self._live:
            for op, key, off, vlen in self._ops(i, False):
                if op == _OP_PUT and idx.get(key) == (i << 16 | off):
                    used += _REC + len(key.encode()) + vlen
                    recs += 1
        self._used = used
        rep["recovered"] = recs
        self.stats["records_dropped"] += rep["dropped"]
        self._opened = True
        return rep

    def items(self):
        # The committed state, one (key, value) at a time. Do not commit
        # while iterating: compaction replaces the files being read.
        idx = self._idx
        for ns in sorted(self._segs):
            for typ, n, key in self._seg_records(ns, True):
                if typ == _T_REC and key not in idx:
                    b = self._buf
                    yield key, bytes(b[6 + (b[4] | b[5] << 8) : n - 4])
        for seq, i in list(self._live):
            for op, key, off, vlen in self._ops(i, True):
                if op == _OP_PUT and idx.get(key) == (i << 16 | off):
                    yield key, bytes(self._buf[:vlen])

    def put(self, key, value):
        kb = _keybytes(key)
        if type(value) is not bytes:
            value = bytes(value)
        n = _REC + len(kb) + len(value)
        op = _OPH + len(kb) + len(value)
        if len(value) > _MAXLEN or _FRAME + 4 + op > self.max_batch:
            raise StoreFull("record too large")
        self._room(op)
        if self._used + self._pend_put + n > self.max_bytes:
            if self._live:
                self.compact()
            if self._used + self._pend_put + n > self.max_bytes:
                raise StoreFull("store full")
        self._staged.append((key, kb, value))
        self._pend += op
        self._pend_put += n

    def delete(self, key):
        kb = _keybytes(key)
        op = _OPH + len(kb)
        self._room(op)
        self._staged.append((key, kb, None))
        self._pend += op

    def pending(self):
        return self._pend

    def discard(self):
        self._staged = []
        self._pend = self._pend_put = 0

    def used_bytes(self):
        return self._used

    def commit(self):
        # All staged changes in one file write, or none of them: on StoreFull
        # (or any OSError) the batch is dropped and the stored state is as
        # before. Returns the batch's sequence number (0: nothing staged).
        staged = self._staged
        if not staged:
            return 0
        pend = self._pend
        self.discard()
        if (
            self._next >= self.slots
            or self._logb >= self.log_max
            or len(self._idx) >= self.index_max
        ):
            self.compact()
        self._seq += 1
        seq = self._seq
        i = self._next
        blen = 4 + pend
        h = self._hb
        struct.pack_into("<BBHI", h, 0, _MAGIC, _T_BATCH, blen, seq)
        crc = crc32(memoryview(h)[:8])
        oh = memoryview(h)[8:]
        for key, kb, v in staged:
            crc = self._crc_op(oh, kb, v, crc)
        p = self._slot(i)
        f = None
        try:
            f = open(p, "wb")
            f.write(memoryview(h)[:8])
            for key, kb, v in staged:
                self._pack_op(kb, v)
                f.write(oh[:_OPH])
                f.write(kb)
                if v:
                    f.write(v)
            struct.pack_into("<I", h, 0, crc)
            f.write(memoryview(h)[:4])
            f.close()
            f = None
        except Exception as e:
            # The slot being written holds nothing live, so it can go.
            self._abandon(f, p)
            _full(e)
            raise
        self._wrote(blen + _FRAME)
        idx = self._idx
        off = 8
        loc = i << 16
        for key, kb, v in staged:
            if v is None:
                idx[key] = -1
                off += _OPH + len(kb)
            else:
                idx[key] = loc | off
                self._used += _REC + len(kb) + len(v)
                off += _OPH + len(kb) + len(v)
        self._live.append((seq, i))
        self._next = i + 1
        self._logb += blen + _FRAME
        self.stats["commits"] += 1
        return seq

    def compact(self):
        # Fold the live log slots into the segments of the namespaces they
        # touch. Crash-safe at every step: a segment is written under a temp
        # name and renamed over the old one, and the slots are only reused
        # after every touched segment has been replaced.
        idx = self._idx
        if not idx and not self._live:
            dirty = 0
            for ns in self._segs:
                dirty |= self._segs[ns][2]
            if not dirty:
                return
        touched = {}
        for key in idx:
            touched[_ns(key)] = 1
        for ns in self._segs:
            if self._segs[ns][2]:
                touched[ns] = 1
        seq = self._seq
        for ns in sorted(touched):
            self._segs[ns] = [seq, self._rewrite(ns, seq), 0]
        touched = None
        # Slots past a smaller `slots` setting are emptied out for good.
        for name in [e[0] for e in os.ilistdir(self.path)]:
            if name[:1] == "l" and name[1:].isdigit() and int(name[1:]) >= self.slots:
                self._remove(name)
        self._idx = {}
        self._live = []
        self._next = 0
        self._logb = 0
        used = 0
        for ns in self._segs:
            used += self._segs[ns][1]
        self._used = used
        self.stats["compactions"] += 1

    # ---- internals ----

    def _room(self, op):
        if self._pend + op > self.max_batch - _FRAME - 4:
            raise StoreFull("batch full: commit first")

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
            st["block_writes"] += _INLINE_COST
        else:
            st["block_writes"] += (size + 4095) // 4096

    def _drop(self, nbytes):
        rep = self._rep
        rep["dropped"] += 1
        rep["dropped_bytes"] += nbytes

    def _pack_op(self, kb, v):
        struct.pack_into(
            "<BHH", self._hb, 8, _OP_DEL if v is None else _OP_PUT, len(kb), len(v) if v else 0
        )

    def _crc_op(self, oh, kb, v, crc):
        self._pack_op(kb, v)
        crc = crc32(oh[:_OPH], crc)
        crc = crc32(kb, crc)
        if v:
            crc = crc32(v, crc)
        return crc

    def _grow(self, n):
        if len(self._buf) < n:
            self._buf = None
            self._buf = bytearray((n + 63) & ~63)
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

    # A log slot: seq if it holds one whole batch, -1 otherwise. A bad slot
    # is dropped and removed; an empty one (a creation cut short) is not
    # counted.
    def _slot_seq(self, i):
        p = self._slot(i)
        try:
            size = os.stat(p)[6]
        except OSError:
            return -1
        if size == 0:
            return -1
        seq = -1
        try:
            f = open(p, "rb")
            try:
                h = memoryview(self._hb)[:8]
                if _readn(f, h) == 8:
                    m, t, blen, s = struct.unpack_from("<BBHI", h)
                    if m == _MAGIC and t == _T_BATCH and blen + _FRAME == size and blen >= 4:
                        crc = self._crc_file(f, blen - 4, crc32(h))
                        if crc is not None and _readn(f, h[:4]) == 4:
                            if struct.unpack_from("<I", h)[0] == crc:
                                seq = s
            finally:
                f.close()
        except OSError:
            seq = -1
        if seq < 0:
            self._drop(size)
            self._remove("l%d" % i)
        return seq

    def _ops(self, i, values):
        # Ops of a checked slot: (op, key, offset, value length); with
        # `values` the value is in self._buf[:vlen] while the op is current.
        f = open(self._slot(i), "rb")
        try:
            size = os.stat(self._slot(i))[6]
            end = size - 4
            off = 8
            f.seek(8)
            h = memoryview(self._hb)[:_OPH]
            while off + _OPH <= end:
                if _readn(f, h) < _OPH:
                    return
                op, kl, vl = struct.unpack_from("<BHH", h)
                if off + _OPH + kl + vl > end:
                    return
                b = self._grow(kl)
                _readn(f, memoryview(b)[:kl])
                try:
                    key = str(memoryview(b)[:kl], "utf-8")
                except UnicodeError:
                    return
                if values and op == _OP_PUT:
                    b = self._grow(vl)
                    _readn(f, memoryview(b)[:vl])
                elif vl:
                    f.seek(off + _OPH + kl + vl)
                yield op, key, off, vl
                off += _OPH + kl + vl
        finally:
            f.close()

    def _seg_seq(self, ns):
        # The sequence number a segment covers: from its head frame, or from
        # its end frame when the head is damaged; -1 when neither is whole.
        seq = -1
        for typ, n, key in self._seg_records(ns, True):
            if typ == _T_HEAD or typ == _T_END:
                seq = key
                if typ == _T_HEAD:
                    break
        return seq

    def _seg_records(self, ns, quiet=False):
        # Every whole, valid frame of a segment: (type, frame length, key)
        # with the frame in self._buf[:n]; for head and end frames `key` is
        # the sequence number. Damaged stretches are skipped by searching for
        # the next frame whose CRC holds; each stretch counts as one dropped
        # record, and the namespace is marked for a rewrite.
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
                    if 6 + kl > n - 4:
                        key = None
                    else:
                        try:
                            key = str(memoryview(b)[6 : 6 + kl], "utf-8")
                        except UnicodeError:
                            key = None
                    if key is None:
                        if not quiet:
                            self._drop(n)
                    else:
                        recs += 1
                        yield typ, n, key
                elif typ == _T_HEAD:
                    yield typ, n, struct.unpack_from("<I", b, 4)[0]
                elif typ == _T_END:
                    ended = struct.unpack_from("<I", b, 4)[0] == recs
                    yield typ, n, struct.unpack_from("<I", b, 8)[0]
                pos += n
            if bad >= 0:
                pos = bad
            if pos < size and not quiet:
                self._drop(size - pos)
            if not quiet and (pos < size or not ended):
                self._segs[ns][2] = 1
        finally:
            f.close()

    def _frame_at(self, f, pos, size):
        # Length of the valid segment frame at pos (now in self._buf), or 0.
        h = memoryview(self._hb)[:4]
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
            f.seek(pos)
            b = self._grow(n)
            if _readn(f, memoryview(b)[:n]) < n:
                return 0
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
        b = memoryview(self._hb)
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
        f = None
        count = 0
        live = 0
        total = 0
        try:
            f = open(tmp, "wb")
            struct.pack_into("<BBHIB", h, 0, _MAGIC, _T_HEAD, 5, seq, _VERSION)
            struct.pack_into("<I", h, 9, crc32(memoryview(h)[:9]))
            f.write(memoryview(h)[:13])
            total += 13
            if ns in self._segs:
                for typ, n, key in self._seg_records(ns, True):
                    if typ == _T_REC and key not in idx:
                        f.write(memoryview(self._buf)[:n])
                        count += 1
                        live += n
            for s, i in self._live:
                for op, key, off, vl in self._ops(i, True):
                    if op != _OP_PUT or idx.get(key) != (i << 16 | off):
                        continue
                    kb = key.encode()
                    if kb[0] != ns:
                        continue
                    n = _REC + len(kb) + vl
                    struct.pack_into("<BBHH", h, 0, _MAGIC, _T_REC, n - _FRAME, len(kb))
                    v = memoryview(self._buf)[:vl]
                    crc = crc32(v, crc32(kb, crc32(memoryview(h)[:6])))
                    f.write(memoryview(h)[:6])
                    f.write(kb)
                    f.write(v)
                    struct.pack_into("<I", h, 0, crc)
                    f.write(memoryview(h)[:4])
                    count += 1
                    live += n
            total += live
            struct.pack_into("<BBHII", h, 0, _MAGIC, _T_END, 8, count, seq)
            struct.pack_into("<I", h, 12, crc32(memoryview(h)[:12]))
            f.write(memoryview(h)[:16])
            total += 16
            f.close()
            f = None
            os.rename(tmp, self._segp(ns))
        except Exception as e:
            self._abandon(f, tmp)
            _full(e)
            raise
        self._wrote(total)
        return live


def _full(e):
    if isinstance(e, OSError) and e.args and e.args[0] == _ENOSPC:
        raise StoreFull("filesystem full")


def _ns(key):
    return key.encode()[0]


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
