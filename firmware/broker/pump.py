# Output scheduling: messages into a connection's output buffer, each
# written there for its receiver (Message.put), with its packet identifier,
# within the client's Receive Maximum and Maximum Packet Size. Called by
# route.deliver for a client with nothing queued, and by the flusher
# (Connection.pump) to drain a session's queue as the output empties.
import gc
import micropython
from micropython import const
from broker import log
from broker.message import put_packed
from broker.outbuf import reserve
from broker.session import Delivery, RELEASED, qos_of, retain_of, seq_of, subids_of, stored_of

SENT = const(1)  # it is in the output (or held for its commit)
WAIT = const(0)  # no room now: try again once the output drains or acks come
GONE = const(2)  # it will never go: expired, or too big for this client


@micropython.native  # (tools/frames.py: its frame on the C stack)
def put_message(b, c, s, msg, qos, retain, subids, seq, stored):
    # One message for c: seq is its queue entry's sequence number (0: it
    # was never queued), stored whether that entry is on flash. Returns
    # SENT, WAIT or GONE.
    if c.held or c.resend is not None:
        # A QoS 2 PUBLISH waits for its commit, or the messages in flight
        # before a resumption wait to be sent again: what follows waits
        # too, to keep the order (MQTT-4.6.0). A message routed between a
        # CONNECT and the writer's first turn went out ahead of them.
        return WAIT
    now = 0  # (the clock is read only for a message that expires)
    if msg.expires is not None:
        now = b.now()
        if msg.expired(now):
            b.stats_expired += 1
            return GONE
    inf = s.inflight
    if qos and len(inf) >= (c.send_max or b.cfg["max_inflight_messages"]):
        return WAIT
    v = c.version
    topic_out = c.topic_out  # (read once: a lookup at each read)
    if topic_out is None:
        t = msg.topic
    else:
        t = topic_out(msg.topic)  # a bridge link's: None, the upstream has no such topic
        if t is None:
            b.stats_dropped += 1
            return GONE
    alias, send_topic = c.out_alias(t) if c.alias_out_max else (0, True)
    whole = len(msg.payload) <= b.wpool.size >> 1
    n = _size(c, msg, t, qos, subids, alias, send_topic, whole)
    if n < 0 and send_topic and alias:
        # The new alias's 3 bytes took it over the client's Maximum Packet
        # Size: it goes without one (an alias is the sender's choice,
        # 3.3.2.3.4), rather than not at all.
        alias = 0
        n = _size(c, msg, t, qos, subids, 0, True, whole)
    if n < 0:
        b.stats_dropped += 1
        return GONE
    p = b.persist
    durable = qos and p is not None and s.expiry
    pid = s.next_pid() if qos else 0
    if qos == 2 and durable:
        # Exactly once across a power cut needs this packet identifier on
        # flash before the PUBLISH leaves: a receiver would take the same
        # message under a new identifier as new. It waits in a buffer of
        # its own until the commit, and the queue behind it waits too.
        pkt = _alone(b, msg, t, n, v, qos, retain, pid, subids, alias, send_topic, now, whole)
        if pkt is None:
            return WAIT
        d = Delivery(msg, qos, retain, subids, b.next_seq())
        if not _sent(p, s, pid, d, seq if stored else 0):
            # No room in the store for that: it waits, queued. (Sent, a
            # power cut would send it again as queued, under a new
            # identifier: twice for its receiver.)
            return WAIT
        p.hold(c, pkt if whole else (pkt, msg.payload), True)
    else:
        # Laid out first, then made in flight, then let out (olen or big
        # moves): a MemoryError before it is out leaves nothing sent, and
        # route.deliver queues the message instead (pump keeps its queue
        # entry for the next try). Made in flight only once it was out,
        # an acknowledged message was dropped for want of 32 B (outside
        # bridge probe: 15 of 300 in one run under a CPU hog).
        ob = reserve(c, n)
        pkt = tail = None
        if ob is not None:
            o = msg.put(ob, c.olen, t, v, qos, retain, False, pid, subids, alias, send_topic, now, whole)
        elif c.olen or c.big is not None:
            return WAIT
        else:
            # A head larger than the whole buffer goes out on its own.
            pkt = _alone(b, msg, t, n, v, qos, retain, pid, subids, alias, send_topic, now, whole)
            if pkt is None:
                return WAIT
            if not whole:
                tail = [msg.payload]
        if qos:
            if not isinstance(inf, dict):
                inf = s.in_flight()  # (the shared () until the first one)
            d = inf[pid] = Delivery(msg, qos, retain, subids, b.next_seq())
        if pkt is None:
            c.olen = o
            if not whole:
                c.big = msg.payload
        else:
            c.big = pkt
            c.tail = tail
        if durable:
            p.sent(s, pid, d, seq if stored else 0)
    if stored and not durable:
        # Its session no longer persists: the queue entry's record goes.
        p.dequeued(s, msg, seq)
    if alias and send_topic:
        c.take_alias(t, alias)
    if topic_out is not None:
        c.went_out(t)
    s.full_since = None  # progress: not stuck
    b.stats_msgs_sent += 1
    return SENT


def _sent(p, s, pid, d, seq):
    # p.sent() for a QoS 2 PUBLISH that waits for its commit, with d in
    # flight first, taken back (del takes no heap) when the store has no
    # room for its record or no heap. Made after the record, an entry that
    # found no heap left a record of a message never sent, and the retry
    # sent it under a second identifier: twice after a power cut.
    inf = s.in_flight()
    inf[pid] = d
    try:
        if p.sent(s, pid, d, seq):
            return True
    except MemoryError:
        del inf[pid]
        raise
    del inf[pid]
    return False


@micropython.native  # (tools/frames.py: its frame on the C stack)
def _size(c, msg, t, qos, subids, alias, send_topic, whole):
    # The size of msg's PUBLISH for c (of its head alone when not whole: a
    # payload larger than half the write buffer goes out from the message
    # itself, never copied); -1 when it is too big for this client as it
    # connected this time (MQTT-3.1.2-24, -25): discarded as if sent, and
    # counted as dropped by the caller.
    n = msg.size(t, c.version, qos, subids, alias, send_topic, whole)
    if n + (0 if whole else len(msg.payload)) > c.max_out:
        return -1
    return n


def _alone(b, msg, t, n, v, qos, retain, pid, subids, alias, send_topic, now, whole):
    # The PUBLISH (or its head) in a buffer of its own; None when the heap
    # has no room for it even after a collection.
    for _ in range(2):
        try:
            pkt = bytearray(n)
            msg.put(pkt, 0, t, v, qos, retain, False, pid, subids, alias, send_topic, now, whole)
            return pkt
        except MemoryError:
            gc.collect()
    log.warning("no heap to send a %d byte message; it waits", n)
    return None


@micropython.native  # (tools/frames.py: its frame on the C stack)
def pump(b, c, s):
    # Moves queued messages into c's output while there is room. True when
    # it stopped for lack of room in the output (more may follow once it
    # is written), False when nothing more can go now.
    if c.resend is not None and not resend(b, c, s):
        return c.held == 0 and (c.olen > 0 or c.big is not None)
    q = s.queue
    p = b.persist
    while True:
        if s.pending_retained and (not s.ahead or not q):
            # Retained messages for a new subscription go out before what
            # was queued after its SUBSCRIBE (route.deliver queues while
            # they wait): a live message newer than a topic's retained one
            # must not be overtaken by it (MQTT-4.6.0-6), or the receiver
            # is left with the old value. Mosquitto queues them at the
            # SUBSCRIBE, to the same effect.
            s.put("ahead", 0)
            r = _retained(b, c, s)
            if s.pending_retained:
                return r
        if not q:
            return False
        inf = q[1]
        st = stored_of(inf)
        if st and p is not None and p.crowded(c):
            return False
        r = put_message(b, c, s, q[0], qos_of(inf), retain_of(inf), subids_of(inf), seq_of(inf), st)
        if r == WAIT:
            return c.held == 0 and (c.olen > 0 or c.big is not None)
        if r == GONE and st and p is not None:
            p.dequeued(s, q[0], seq_of(inf))
        s.pop()


def _retained(b, c, s):
    # Retained messages for a new subscription, one at a time as the output
    # takes them: a subscriber to "site/#" on a hub with 200 retained
    # topics holds a list of topic references, not 200 queue entries.
    pend = s.pending_retained
    acl = b.acl
    ret = b.retained
    packed = ret.msgs  # topic -> packed bytes or Message (retain.py)
    while pend:
        sub, chunks = pend[0]
        q = sub.opts & 3
        # Retained values without properties that go out at QoS 0, with
        # nothing to add for this receiver, are written from their packed
        # bytes in runs (_put_packed): about three times as fast as making
        # a Message for each.
        plain = c.topic_out is None and not c.alias_out_max and not (c.version == 5 and sub.subid)
        while chunks:
            topics = chunks[-1]
            if acl is not None:
                # (again when a chunk is taken up again: no harm done)
                for i in range(len(topics) - 1, -1, -1):
                    if not acl.can_read(s.client_id, s.username, topics[i]):
                        topics.pop(i)
            while topics:
                if plain and _put_packed(c, topics, packed, q):
                    return c.held == 0 and (c.olen > 0 or c.big is not None)
                if not topics:
                    break
                m = ret.get(topics[-1], b.now())
                if m is None:
                    topics.pop()
                    continue
                r = put_message(b, c, s, m, q if q < m.qos else m.qos, True,
                                (sub.subid,) if sub.subid else None, 0, False)
                if r == WAIT:
                    return c.held == 0 and (c.olen > 0 or c.big is not None)
                topics.pop()
            chunks.pop()
        pend.pop(0)
    s.pending_retained = None
    return False


def _put_packed(c, topics, packed, q):
    # Writes into c's output buffer, from the end of topics (popping them),
    # the packed retained values that go out as they are (message.
    # put_packed), until one does not. True when it stopped for lack of
    # room in the output; False: put_message takes the next one (it is not
    # packed, goes out at QoS 1 or 2, is too big for the buffer or for the
    # client, or a QoS 2 PUBLISH before it waits for its commit).
    if c.held:
        return False
    most = c.broker.wpool.size >> 1
    if c.max_out < most:
        most = c.max_out
    v5 = c.version == 5
    left = len(topics)
    full = False
    while topics:
        # Room for the largest one; a full buffer is written out first.
        ob = reserve(c, most)
        if ob is None:
            full = True
            break
        o = c.olen
        c.olen = put_packed(ob, o, len(ob), topics, packed, q, v5, most)
        if c.olen == o:
            break
    if len(topics) < left:
        c.session.full_since = None  # progress: not stuck
        c.broker.stats_msgs_sent += left - len(topics)
    return full


def resend_inflight(c, s):
    # On session resumption: the writer sends these first, in the order
    # they were first sent (MQTT-4.6.0-1), whatever their packet ids.
    inf = s.inflight
    if inf:
        c.resend = sorted(inf, key=lambda pid: inf[pid].seq)


def resend(b, c, s):
    # Before anything new, PUBLISH again with DUP the unacknowledged
    # QoS 1/2 messages, and PUBREL those already released (MQTT-4.4.0-1),
    # as fast as the output buffer takes them. True when all are out.
    # A QoS 2 PUBLISH or PUBREL whose state may not be on flash yet waits
    # for the commit (Persist.hold), as when it first went out: sent before
    # a power cut undoes that state, it would make the receiver take the
    # message twice. The client's Receive Maximum and Maximum Packet Size
    # are those it connected with this time.
    r = c.resend
    now = b.now()
    half = b.wpool.size >> 1
    p = b.persist if s.expiry else None
    most = c.send_max or b.cfg["max_inflight_messages"]
    while r:
        if c.held:
            return False
        pid = r[0]
        d = s.inflight.get(pid) if s.inflight else None
        if d is None:
            r.pop(0)  # acknowledged meanwhile
            continue
        wait = d.qos == 2 and p is not None and p.dirty()
        if d.state == RELEASED:
            pkt = bytes((0x62, 2, pid >> 8, pid & 0xFF))
            if wait:
                p.hold(c, pkt, True)
            elif not c.room(4):
                return False
            else:
                c.send(pkt)
        else:
            if len(s.inflight) - len(r) >= most:
                # Those sent again are in flight on this connection, and
                # within its Receive Maximum (MQTT-3.3.4-9): the rest go
                # as they are acknowledged (c.resend holds no acknowledged
                # ones: handle_other._flow_ended).
                return False
            m = d.msg
            t = m.topic if c.topic_out is None else c.topic_out(m.topic)
            whole = len(m.payload) <= half
            n = _size(c, m, t, d.qos, d.subids, 0, True, whole) if t is not None else -1
            if n < 0:
                # Its flow ends unsent.
                b.stats_dropped += 1
                del s.inflight[pid]
                if p is not None:
                    p.acked(s, pid, d)
                r.pop(0)
                continue
            ob = None if wait else reserve(c, n)
            if ob is None:
                if c.olen or c.big is not None:
                    return False
                pkt = _alone(b, m, t, n, c.version, d.qos, d.retain, pid, d.subids, 0, True, now, whole)
                if pkt is None:
                    return False
                pkt[0] |= 0x08
                if wait:
                    p.hold(c, pkt if whole else (pkt, m.payload), True)
                else:
                    c.big = pkt
                    if not whole:
                        c.tail = [m.payload]
            else:
                o = c.olen
                c.olen = m.put(ob, o, t, c.version, d.qos, d.retain, True, pid, d.subids, 0, True, now, whole)
                if not whole:
                    c.big = m.payload
            if c.topic_out is not None:
                c.went_out(t)
        r.pop(0)
    c.resend = None
    return True
