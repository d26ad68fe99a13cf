# Persist.load(): the broker's state back from the store at start (what
# persist.py writes, its keys and records described there). Code that runs
# once: persist.py imports it for the restore and drops it after, so none
# of it stays in the heap the broker runs in.
import gc
import json
import binascii
from micropython import const
from mqtt import wire
from broker import log
from broker.message import Message
from broker.persist import _same
from broker.session import Session, Delivery, info, seq_of
from broker.subs import Sub

_FEED_EVERY = const(16)  # records restored between watchdog feeds and collections
# While restoring, the heap is collected after every this many bytes
# allocated: each record read leaves garbage between the objects kept, and
# collected only every _FEED_EVERY records, that garbage spread what was
# kept over the whole heap. Measured on the esp32 heap: 173 retained
# messages with 206-byte topics, all taken while running, then restored
# only 167, with 24 KB free but no piece of 1,784 bytes for the table.
_RESTORE_GC_BYTES = const(1024)
# A payload of at least this many bytes, in a record read as a bytearray of
# its own (Store.items()), stays in it when restored, as a packet past
# handle_publish.BIG_KEEP read at run time stays in the buffer it was read
# into, rather than need a second piece of its size. (A smaller one is copied
# out and packed, as at run time: kept whole, a 4-byte value on a long
# topic took 300 B more.)
_KEEP_IN_RECORD = const(4097)  # (past handle_publish.BIG_KEEP, as at run time)


def _unpack(b):
    n = len(b)
    exp, off = wire.get_u32(b, 2, n)
    topic, off = wire.get_str(b, off, n)
    pn, off = wire.get_varint(b, off, n)
    if off + pn > n:
        raise ValueError("properties past the record's end")
    pay = memoryview(b)[off + pn:]
    if type(b) is not bytearray or len(pay) < _KEEP_IN_RECORD:
        pay = bytes(pay)
    m = Message(topic, pay, b[0], bool(b[1]))
    if pn:
        # As the message was stored: the properties it goes on with.
        m.pbody = bytes(b[off : off + pn])
    if exp:
        m.expires = exp
    return m


def _shared(kept, m):
    # The Message already restored for the same message as m (a large
    # retained value and its queued copy), or m.
    if type(kept) is Message and type(m.payload) is memoryview and _same(kept, m):
        return kept
    return m


def _read_varints(b, off):
    # A tuple: slices of it (the subscription identifiers) are kept, and a
    # list's took 16 B more each, as many as the queues held.
    out = []
    n = len(b)
    while off < n:
        v, off = wire.get_varint(b, off, n, 5)
        out.append(v)
    return tuple(out)


def load(p, wdt):
    # Restores what the store holds. Running out of heap part way
    # leaves the rest on flash, untouched, and the broker still starts:
    # a boot loop would lose everything. A long restore or compaction
    # feeds the watchdog as it goes.
    if wdt is not None:
        p.store.feed = wdt.feed
    gc.collect()
    gc.threshold(_RESTORE_GC_BYTES)
    try:
        _load(p, wdt)
    except MemoryError:
        # Once more from nothing: what the first try held is garbage
        # now, and a collected heap is less fragmented.
        b = p.b
        b.sessions.clear()
        b.retained.clear()
        b.subs.__init__()
        p.store.discard()
        gc.collect()
        try:
            _load(p, wdt)
        except MemoryError:
            gc.collect()
            p.failed += 1
            log.error("store: out of memory while restoring; the rest stays on flash")
            _past_the_rest(p)
    gc.threshold(-1)  # app.start() sets the board's own


def _load(p, wdt):
    b = p.b
    p.report = p.store.open()
    log.info("store opened: %s", p.report)
    sessions = 0
    msgs = {}  # mid -> Message
    # Per session, flat pairs in the order read (_pair): a tuple for each
    # record, next to the queues built from them, took 36 B an entry on top:
    # 30 sessions of 32 messages, held while running in the esp32's heap,
    # came back in part.
    queued = {}  # cid -> [mid, info, ...]: its queue itself, once its messages are in (_queue)
    nqueued = 0
    inflight = {}  # cid -> [pid, Delivery, ...], each Delivery's msg its message id until then
    ninflight = 0
    qos2 = {}  # cid -> [pid, PUBREC reason, ...]
    wills = {}  # cid -> (Message, delay, expiry)
    # One str per client id for all its records: hundreds of queued
    # messages each kept a copy of it until the end of the restore.
    cids = {}
    # Running, a large retained message for persistent sessions is one
    # Message, the retained value and the queues' (retain._packed); on
    # flash it is two records. Restored as two, it needed twice the
    # heap it had: topic -> large Message restored from an "m" record.
    big = {}
    retained = 0
    n = 0
    for key, val in p.store.items():
        n += 1
        if n % _FEED_EVERY == 0:
            # What is kept would otherwise be strewn across the heap
            # between the garbage of reading it (see Store.open()); and
            # a long restore must not trip the watchdog.
            gc.collect()
            if wdt is not None:
                wdt.feed()
        k = key[0]
        try:
            if k == "r":
                m = _unpack(val)
                val = None
                b.retained.load(_shared(big.get(m.topic), m))
                retained += 1
            elif k == "m":
                mid = int(key[1:])
                m = _unpack(val)
                val = None
                kept = b.retained.msgs.get(m.topic)
                if not (type(kept) is Message and kept.mid):  # (one record each)
                    m = _shared(kept, m)
                if m.retain and type(m.payload) is memoryview:
                    o = big.get(m.topic)
                    if o is None or o.mid < mid:
                        big[m.topic] = m
                m.mid = mid
                msgs[mid] = m
                if mid > p.mid:
                    p.mid = mid
            elif k == "w":
                vn = len(val)  # (n counts the records)
                delay, off = wire.get_varint(val, 0, vn, 5)
                exp, off = wire.get_varint(val, off, vn, 5)
                wills[key[1:]] = (_unpack(memoryview(val)[off:]), delay, exp - 1 if exp else None)
            elif k == "s":
                # Made at once: the decoded record is garbage right
                # after, not kept with every other one to the end.
                cid = key[1:]
                _session(p, cids.setdefault(cid, cid), json.loads(val))
                sessions += 1
            elif k == "q":
                cid, seq = _cid_key(key, cids)
                f = val[0]
                v = _read_varints(val, 1)
                _pair(queued, cid, v[0], info(f & 3, f & 4, int(seq), v[1:], True))
                nqueued += 1
            elif k == "i":
                cid, pid = _cid_key(key, cids)
                f = val[1]
                v = _read_varints(val, 2)
                d = Delivery(v[1], f & 3, bool(f & 4), v[2:] or None, v[0])
                d.state = val[0]
                d.stored = True
                _pair(inflight, cid, int(pid), d)
                ninflight += 1
            elif k == "x":
                cid, pid = _cid_key(key, cids)
                _pair(qos2, cid, int(pid), val[0] if val else 0)
            elif k == "c":
                b.clock = p.clock_saved = wire.get_u32(val, 0, 4)[0]
        except MemoryError:
            # Not the record's fault, and never a reason to drop it:
            # load() starts again from nothing, or leaves the rest on
            # flash.
            raise
        except Exception as e:
            log.warning("store: dropped unreadable record %r: %r", key, e)
            p.failed += 1
    for cid in wills:
        s = b.sessions.get(cid)
        if s is None or s.will is not None:
            # No session (it ended), or one written before wills had
            # records of their own, which holds its will.
            p.store.delete("w" + cid)
        else:
            s.will, s.will_delay, s.will_expiry = wills[cid]
            s.will_stored = s.will
    wills = None
    for s in b.sessions.values():
        # On the broker clock, whose record may come after theirs.
        cut = s.gone_at is None
        if cut:
            # Its client was connected at a power cut: gone from now,
            # and written so, or each restart began its expiry again
            # (and it looked just gone when a full table chose one to
            # evict).
            s.gone_at = b.clock
        if cut or s.will is not None and s.will_stored is None:
            # (A will inline in its record is written out of it now, or
            # a will published later would come back after a cut.)
            if not p.session_fits(s, 0):
                _commit_at_start(p)
            p.session_changed(s)
        if s.will is not None:
            s.will_at = s.gone_at + min(s.will_delay, s.expiry) if s.will_delay else b.clock
    top = 0
    for cid in queued:
        top = max(top, _queue(p, msgs, cid, queued[cid]))
    queued = None
    for cid in inflight:
        x = inflight[cid]
        for i in range(0, len(x), 2):
            d = x[i + 1]
            top = max(top, d.seq)
            r = _owner(p, msgs, cid, d.msg, "i%s\0%d" % (cid, x[i]))
            if r is not None:
                d.msg = r[1]
                r[0].in_flight()[x[i]] = d
    inflight = None
    for cid in qos2:
        s = b.sessions.get(cid)
        x = qos2[cid]
        for i in range(0, len(x) if s is not None else 0, 2):
            s.qos2()[x[i]] = x[i + 1]
    big = None
    for mid in msgs:
        m = msgs[mid]
        if not m.refs:
            # A message no queue refers to any more (its Message may be
            # a retained value: it has no record of its own now).
            p.store.delete("m" + str(mid))
            m.mid = 0
    b.seq = top
    b.retained.on_change = p.retained_changed
    _commit_at_start(p)
    log.info("restored %d retained, %d sessions, %d queued, %d in flight, clock %d",
             retained, sessions, nqueued, ninflight, b.clock)


def _past_the_rest(p):
    # After a restore that stopped part way, what stays on flash must
    # not be written over: new message ids and queue sequence numbers
    # start past all of theirs, and retained values are written as
    # usual. Before, the ids began again from those restored, so a new
    # message's record replaced an acknowledged one not restored, and
    # a new retained value acknowledged was never written (outside
    # power-cut probe).
    b = p.b
    b.retained.on_change = p.retained_changed
    p.partial = True
    keys = p.store.keys()
    try:
        for key in keys:
            k = key[0]
            if k == "m":
                p.mid = max(p.mid, int(key[1:]))
            elif k == "q":
                b.seq = max(b.seq, int(key[key.index("\0") + 1:]))
    except Exception:  # (no heap to read them, or a key not ours)
        p.mid += 1000000
        b.seq += 1000000
        try:
            log.warning("store: keys not read; ids start a million on")
        except MemoryError:
            pass
    finally:
        keys.close()  # (its file)


def _commit_at_start(p):
    # What the restore staged, written now; a failure must not stop the
    # start (a board would restart into it again): the committer tries
    # again, as for any commit.
    if p.store.pending:
        try:
            p.store.commit()
        except Exception as e:
            log.warning("store: commit at start failed: %r; retrying", e)
            p.flag.set()


def _session(p, cid, d):
    # A session from its record (session_changed).
    b = p.b
    s = Session(cid)
    s.version = d["v"]
    s.expiry = d["e"]
    s.on_flash = True
    s.gone_at = d.get("g") or None  # (see _load: the clock may not be read yet)
    s.username = d.get("u")
    for e in d["s"]:
        full = e[0]
        if type(e[1]) is str:
            # Written before 2026-12: [full, filter, opts, subid, group].
            flt, opts, subid, group = e[1], e[2], e[3], e[4]
        else:
            opts = e[1]
            subid = e[2] if len(e) > 2 else 0
            flt, group = (e[3], e[4]) if len(e) > 3 else (None, None)
        if flt is None or flt == full:
            flt = full  # one str, as when it was subscribed
        sub = Sub(s, flt, opts, subid, group)
        s.subs[full] = sub
        b.subs.add(sub)
    w = d.get("w")
    if w is not None:
        # Written before wills had records of their own ("w" cid).
        s.will = _unpack(binascii.a2b_base64(w[0]))
        s.will_delay = w[1]
        if len(w) > 2:
            s.will_expiry = w[2]
    b.sessions[cid] = s


def _cid_key(key, cids):
    # A per-session record's key, kind + cid + NUL + its own key, as (cid,
    # own key); cid is the one string all of the session's records share.
    cid, own = key[1:].split("\0")
    return cids.setdefault(cid, cid), own


def _pair(table, cid, a, b):
    # Appends a, b to table[cid], a flat list of pairs.
    x = table.get(cid)
    if x is None:
        x = table[cid] = []
    x.append(a)
    x.append(b)


def _queue(p, msgs, cid, q):
    # Session cid's queue from its records: q, (mid, info) pairs as read,
    # becomes it in place, [Message, info, ...] in sequence order. Kept
    # even past max_queued_messages (a smaller limit than when they were
    # stored): each was acknowledged. Returns the highest seq.
    for i in range(3, len(q), 2):
        if seq_of(q[i]) < seq_of(q[i - 2]):
            order = sorted(range(0, len(q), 2), key=lambda j: seq_of(q[j + 1]))
            q[:] = [q[j + d] for j in order for d in (0, 1)]
            break
    s = p.b.sessions.get(cid)
    top = nbytes = i = 0
    while i < len(q):
        top = max(top, seq_of(q[i + 1]))
        m = msgs.get(q[i])
        if s is None or m is None:
            # Its session or message gone: the record goes too.
            p.store.delete("q%s\0%d" % (cid, seq_of(q[i + 1])))
            if m is None:
                p.failed += 1
            del q[i : i + 2]
            continue
        m.refs += 1
        q[i] = m
        nbytes += len(m.payload)
        i += 2
    if s is not None and q:
        s.queue = q
        s.queued_bytes = nbytes
    return top


def _owner(p, msgs, cid, mid, key):
    # (session, message) of a restored queue or in-flight record, the
    # message now referred to once more; None when either is gone: the
    # record goes too.
    s = p.b.sessions.get(cid)
    m = msgs.get(mid)
    if s is None or m is None:
        p.store.delete(key)
        if m is None:
            p.failed += 1
        return None
    m.refs += 1
    return s, m
