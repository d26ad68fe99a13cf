# Routing (Mosquitto: database.c, subs__process): a message to every
# matching subscription, plus one copy per matching share group. A 5.0
# session with overlapping subscriptions gets a copy per subscription, as
# Mosquitto sends; a 3.1.1 or 3.1 session (and a bridge's) one copy at the
# highest granted QoS (MQTT-3.3.5-1). A copy for a connected client with
# nothing queued goes straight into its output buffer (pump.put_message);
# the rest waits in the session's queue, on flash too when the session
# persists.
import gc
import micropython
from micropython import const
from broker.session import info, seq_of
from broker.message import Raw
from broker.pump import put_message, SENT, GONE
from broker.outbuf import reserve, kick

_NO_LOCAL = const(0x04)
_RAP = const(0x08)


class _Slicer:
    def __getitem__(self, k):
        return k


# Empties a scratch list and keeps its room, with no allocation: `del
# a[EVERY]`. `del a[:]` makes a slice (16 B) every time, once per message
# here, and MicroPython's slice() cannot be called.
EVERY = _Slicer()[:]
del _Slicer


@micropython.native  # (tools/frames.py: its frame on the C stack)
def route(b, msg, origin, keep=True):
    # Returns the number of copies of msg sent or queued. msg is a Message, or a
    # message.Raw (a QoS 0 message straight from the read buffer). keep: a
    # retained message replaces the stored one (False for $SYS, and where
    # the caller has set it already: handle_publish, the bridge).
    if msg.retain and keep:
        b.retained.set(msg)
    hits = b.hits
    del hits[EVERY]
    b.subs.match(msg.topic, hits)
    n = len(hits)
    if n > 1 and _overlap(hits):
        sent = _route_many(b, msg, origin, hits)
    else:
        # One subscription per session (the usual case): no bookkeeping.
        sent = 0
        # (With an ACL, deliver() checks it before its own _copy().)
        raw = type(msg) is Raw and b.acl is None
        for sub in hits:
            s = sub.session
            if sub.opts & _NO_LOCAL and s is origin:
                continue
            sent += 1
            if raw and not sub.subid and _copy(b, s, msg):
                continue
            q = sub.opts & 3
            deliver(b, s, msg, q if q < msg.qos else msg.qos, msg.retain and sub.opts & _RAP,
                    (sub.subid,) if sub.subid else None)
    if b.subs.shared:
        del hits[EVERY]
        b.subs.match_shared(msg.topic, hits)
        for sub in hits:
            q = sub.opts & 3
            deliver(b, sub.session, msg, q if q < msg.qos else msg.qos, msg.retain and sub.opts & _RAP,
                    (sub.subid,) if sub.subid else None)
            sent += 1
    return sent


def _copy(b, s, raw):
    # A Raw message, as it came, into s's output when its client takes it
    # so (connected, nothing queued or held, the sender's protocol version,
    # no topic mapping, no topic aliases: Connection.copies). Kept small: a
    # larger frame comes from the heap.
    c = s.conn
    if c is None or c.copies != raw.version or c.held or c.resend or s.queue or s.pending_retained:
        return False  # (or behind what waits)
    n = len(raw.src)
    if n > c.max_out:
        return False
    ob = reserve(c, n)
    if ob is None:
        return False
    n += c.olen  # where the copy ends in ob
    ob[c.olen : n] = raw.src
    c.olen = n
    s.full_since = None
    b.stats_msgs_sent += 1
    kick(c)
    return True


def _overlap(hits):
    # True when some session has two matching subscriptions.
    n = len(hits)
    for i in range(1, n):
        s = hits[i].session
        for j in range(i):
            if hits[j].session is s:
                return True
    return False


def _route_many(b, msg, origin, hits):
    # Some session has two matching subscriptions. A 5.0 session gets a copy
    # for each, with its own QoS, Retain As Published and identifier
    # (MQTT-3.3.4-3, -5); an older one, or a bridge's, one copy at the
    # highest QoS, retained if one subscription asks so. Returns the number
    # of copies.
    best = {}  # an older session -> [qos, retain] of its one copy
    sent = 0
    for sub in hits:
        s = sub.session
        if sub.opts & _NO_LOCAL and s is origin:
            continue
        q = sub.opts & 3
        if q > msg.qos:
            q = msg.qos
        r = msg.retain and sub.opts & _RAP
        if s.version == 5:
            deliver(b, s, msg, q, r, (sub.subid,) if sub.subid else None)
            sent += 1
            continue
        e = best.get(s)
        if e is None:
            best[s] = [q, r]
        else:
            e[0] = max(e[0], q)
            e[1] = e[1] or r
    for s in best:
        e = best[s]
        deliver(b, s, msg, e[0], e[1], None)
    return sent + len(best)


@micropython.native  # (tools/frames.py: its frame on the C stack)
def deliver(b, s, msg, qos, retain, subids):
    # One message for session s: straight into its client's output when
    # the client is connected with nothing queued, else into its queue.
    # (The try is here, not around a call: each call of a frame this size
    # takes heap, see tools/frames.py.)
    if b.acl is not None and s.bridge is None and not b.acl.can_read(s.client_id, s.username, msg.topic):
        b.missed += 1
        return
    seq = b.seq  # a copy placed below takes a later one (Broker.next_seq)
    try:
        c = s.conn
        retain = bool(retain)
        if type(msg) is Raw:
            if not subids and not retain and _copy(b, s, msg):
                return
            msg = msg.message()
        if c is not None and not s.queue and not s.pending_retained:
            # (Else behind what waits, retained messages too: pump.py.)
            r = put_message(b, c, s, msg, qos, retain, subids, 0, False)
            if r == SENT:
                # Straight into its output: sent by the flusher with the rest.
                kick(c)
                return
            if r == GONE:
                b.missed += 1
                return
        if c is None and qos == 0 and not b.cfg["queue_qos0_messages"]:
            s.dropped += 1
            b.stats_dropped += 1
            b.missed += 1
            return
        _enqueue(b, s, msg, qos, retain, subids)
        return
    except MemoryError:
        # (Nothing in here may take heap: a MemoryError out of it would end
        # the publisher's connection.)
        gc.collect()
        if not qos:
            b.stats_dropped += 1
            b.missed += 1
            return
        # This copy, not another copy of msg for s (a 5.0 session gets one
        # per matching subscription): the second found the first and was
        # dropped unsaid, its publisher told it was taken.
        c = s.inflight
        for r in c:
            if c[r].msg is msg and c[r].seq > seq:
                return  # out, in flight: it met the error after that
        c = s.queue
        for r in range(0, len(c), 2):
            if c[r] is msg and seq_of(c[r + 1]) > seq:
                return  # queued
    # Neither (put_message leaves nothing sent when it fails): queued, once
    # more, as when the output is full. Else counted like a full queue (v5
    # publishers are told 0x97); the other receivers still get it. (A try
    # after the first, not in it: one exception slot in the frame.)
    try:
        _enqueue(b, s, msg, qos, retain, subids)
    except MemoryError:
        b.stats_dropped += 1
        b.queue_refusals += 1
        b.missed += 1


@micropython.native  # (tools/frames.py: its frame on the C stack)
def _enqueue(b, s, msg, qos, retain, subids):
    p = b.persist
    durable = bool(qos and p is not None and s.expiry)
    seq = b.next_seq() if qos else 0
    d = s.dropped
    inf = info(qos, retain, seq, subids, durable)
    try:
        ok = s.enqueue(msg, inf)
    except MemoryError:
        ok = _enqueue_again(b, s, msg, inf, d)
    b.stats_dropped += s.dropped - d  # refused, or an old QoS 0 evicted
    if not ok:
        b.missed += 1
        if qos:
            b.queue_refusals += 1
        return
    if durable and not p.queued(s, msg, seq, qos, retain, subids):
        # Not on flash (the publisher was told, counted in p.failed): its
        # entry must not say so, or its going out would delete a record,
        # and count a reference off, that were never made.
        s.queue[-1] = info(qos, retain, seq, subids, False)
    c = s.conn
    if c is not None:
        if s.past_half():
            # Past half full: the publisher waits until it drains
            # (backpressure.py).
            b.congested = s
        kick(c)


def _enqueue_again(b, s, msg, inf, d):
    # After a MemoryError in s.enqueue(): a long queue's list grows in one
    # piece, which a heap in crumbs may not have although the bytes are
    # free, and the spare buffers are large pieces (outside bridge probe:
    # acknowledged messages for a bridge's queue of some hundred were
    # dropped so). Half an entry, left when the list could not grow
    # between its two appends, is taken back first, each time.
    _whole(s)
    b.shed_buffers()
    try:
        return s.enqueue(msg, inf)
    except MemoryError:
        _whole(s)
        b.stats_dropped += s.dropped - d  # (an old QoS 0 evicted for it)
        raise


def _whole(s):
    q = s.queue
    if q and len(q) & 1:
        q.pop()


def would_hold(b, topic, qos, retain, origin):
    # Would a message on topic from session origin stay in the heap after
    # route()? (retained, or queued for a receiver that is offline or
    # behind). A message every receiver takes at once costs only passing
    # garbage, so a full heap still lets those through. The origin's own
    # No Local subscriptions receive nothing: a bridge's, with its queue
    # to the upstream full, held every message from the upstream back.
    if retain:
        return True
    hits = b.hits
    del hits[EVERY]
    b.subs.match(topic, hits)
    b.subs.match_shared(topic, hits, False)
    for sub in hits:
        s = sub.session
        if sub.opts & _NO_LOCAL and s is origin:
            continue
        c = s.conn
        if c is None:
            # (A full queue drops it: it does not stay.)
            if (qos and sub.opts & 3 or b.cfg["queue_qos0_messages"]) and not s.full():
                return True
        elif s.queue or s.pending_retained or not c.room(512):
            return True
    return False
