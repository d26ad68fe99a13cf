# Incoming PUBLISH (MQTT 3.3, 4.3): topic and alias resolution, checks,
# authorization, routing, and the QoS 1/2 acknowledgements. QoS 2 follows
# the spec's method B (4.3.3): the message is routed when it arrives and
# only its packet identifier is kept until PUBREL, which saves holding the
# message in RAM. Mosquitto holds it until PUBREL instead; receivers see
# exactly one copy either way.
import gc
import micropython
from micropython import const
from mqtt.errors import MQTTError
from mqtt.packets import decode_publish
from mqtt.wire import utf8_valid
from mqtt.topic import valid_topic
from broker import log
from broker.message import Message, as_sent
from broker.handle_connect import topic_fits
from broker.route import route, would_hold
from broker.backpressure import Paused

_TOPIC_ALIAS = const(0x23)
_EXPIRY = const(0x02)
_PFI = const(0x01)
_RESPONSE_TOPIC = const(0x08)
_SUBSCRIPTION_ID = const(0x0B)
# A packet buffer of its own (conn.py, Connection._read_big) up to this
# size is kept for the next large packet; over it, the message keeps its
# payload in it.
BIG_KEEP = const(4096)

# An acknowledgement's first byte is (3 + qos) << 4: PUBACK (0x40) at QoS 1,
# PUBREC (0x50) at QoS 2. Connection.ack drops the reason code for 3.1.1.


def _ack_before_copy(c, mark, t, pid, reason):
    # The copy is obuf[mark:olen], and `big` when its payload goes out by
    # reference (larger than half the buffer: then it came first).
    copy = bytes(memoryview(c.obuf)[mark : c.olen])
    payload = c.big
    c.olen = mark
    c.big = None
    p = c.broker.persist
    c.ack(t << 4, pid, reason)
    if p is not None and p.dirty():
        # The acknowledgement waits for the store's commit (Connection.ack):
        # the copy waits behind it, and the queue behind that.
        p.hold(c, copy if payload is None else (copy, payload), True)
    elif payload is None:
        c.send(copy)
    else:
        c.send_split(copy, payload)


def refuse_for_heap(c, qos, pid):
    # A v5 client's QoS 1/2 message that the heap cannot take: 0x97.
    c.broker.stats_dropped += 1
    c.ack((3 + qos) << 4, pid, 0x97)


def _heap_short(c, qos, pid, need):
    # A v5 client's QoS 1/2 message is refused with 0x97; anything else
    # waits, unread, until the queues drain and the heap recovers: no
    # client is disconnected for it.
    b = c.broker
    if qos and c.refuses():
        refuse_for_heap(c, qos, pid)
        return
    heap = b.heap
    if c.topic_in is not None:
        c.pause = lambda: heap.room_for_client(need)  # (see _admit)
    else:
        c.pause = lambda: heap.room_for(need)
    raise Paused()


def drop_from_link(c, qos, pid, reason, why):
    # A message from a bridge's upstream that a client would be closed
    # for (here, and conn.py's oversized one), or refused for (a topic past
    # the limits): acknowledged (qos 0: not) and dropped, and said in the
    # log. Closed for it, the link came up again only to be sent it again
    # (QoS 1/2, or a retained value on every SUBSCRIBE), and went down,
    # for good.
    c.broker.stats_dropped += 1
    if qos:
        c.ack((3 + qos) << 4, pid, reason)  # (3.1.1: a plain PUBACK or PUBREC)
    log.warning("%s: dropped a message from the upstream: %s", c.client_label(), why)


def _decode_short(c, qos, mv, off, end):
    # No heap to decode it (its topic and properties become objects of
    # several times their bytes): as a message the heap cannot take, with
    # its packet identifier read in place. QoS 0 is dropped, as at most
    # once allows: waiting, it was decoded again every 50 ms, for good
    # where the heap never has that much free (8 KB of 1,600 user
    # properties decode to 34 to 45 KB), with its reader and PINGREQs held.
    gc.collect()
    if not qos:
        c.broker.stats_dropped += 1
        return
    o = off + 2 + (mv[off] << 8 | mv[off + 1])
    if o + 2 > end:
        raise MQTTError(0x81, "packet identifier past the packet")
    pid = mv[o] << 8 | mv[o + 1]
    _heap_short(c, qos, pid, ((end - off) << 2) + 320)


def _admit(c, s, qos, pid, topic, retain, size, n, need):
    # The slow half of on_publish's check that a message can be taken, when
    # the heap or the store looks short: True when it can; False when it
    # was refused (and answered); raises Paused when it must wait. Apart
    # from on_publish so that on_publish itself makes no closures (each
    # captured variable would cost it a cell object per message).
    b = c.broker
    p = b.persist
    # An empty retained message deletes one: it frees heap, so it is
    # reckoned as the message it is for the receivers only.
    heap = b.heap
    if not heap.room_for(need) and would_hold(b, topic, qos, retain and size > 0, s):
        # It needs `need` bytes (on_publish; route() adds more per
        # receiver), and it would stay in the heap.
        if c.topic_in is None:
            _heap_short(c, qos, pid, need)
            return False
        # A bridge's link must not stop reading: behind the upstream's
        # messages come its acknowledgements, which alone drain the
        # bridge's queue, and with sensors publishing faster than the
        # upstream took, that queue is what filled the heap (outside
        # bridge probe: paused here, the link read nothing more for good).
        # QoS 0 is dropped, as at most once allows; QoS 1 and 2, as many
        # as the upstream has in flight, go on down to the clients' floor.
        if not qos:
            b.stats_dropped += 1
            return False
        if not heap.room_for_client(need):
            _heap_short(c, qos, pid, need)
            return False
    if not qos or p is None or p.healthy(n, topic):
        return True
    x = s if qos == 2 else None  # (its record that it received the message)
    # (Matched again when a pause is over: subscriptions change meanwhile.)
    rec = p.need(topic, retain, size, n, x)
    if p.too_large(rec):
        # The store can never keep it, and waiting would be for good. v5
        # is told 0x97 (a bridge's link too: the upstream drops it, as it
        # should). 3.1.1 cannot be told; closed, a client with a session
        # would send it again at every connection: it is acknowledged and
        # dropped, as for a full queue, and said so in the log.
        b.stats_dropped += 1
        c.ack((3 + qos) << 4, pid, 0x97)  # (3.1.1: a plain PUBACK or PUBREC)
        log.warning("%s: a QoS %d message of %d B on %s makes records past the store's largest batch;"
                    " dropped", c.client_label(), qos, n, topic[:40])
        return False
    if not p.batch_takes(rec):
        # The batch for the next commit has no room for its records: it
        # waits, unread, until the committer has written the batch out.
        c.pause = lambda: p.batch_takes(p.need(topic, retain, size, n, x))
        raise Paused()
    if not p.can_take(rec):
        # The store cannot take what this message would need (a commit is
        # failing, or it is full): v5 is told 0x97; 3.1.1 cannot be told,
        # so its message waits, unread and unacknowledged, until it can.
        if c.refuses():
            b.stats_dropped += 1
            c.ack((3 + qos) << 4, pid, 0x97)
            return False
        c.pause = lambda: p.can_take(p.need(topic, retain, size, n, x))
        raise Paused()
    return True


def part(mv, a, b):
    # mv[a:b], for native code: a slice written there is an object on the
    # heap, one per message; in bytecode the VM makes a memoryview's slice
    # on the C stack.
    return mv[a:b]


def _check_client_props(pr):
    # What a client's PUBLISH must not carry, each a Protocol Error (4.13).
    # A bridge's upstream is a server: it sends Subscription Identifiers.
    if _SUBSCRIPTION_ID in pr:
        raise MQTTError(0x82, "Subscription Identifier in a PUBLISH from a client")  # MQTT-3.3.4-6
    rt = pr.get(_RESPONSE_TOPIC)
    if rt is not None and ("+" in rt or "#" in rt):
        raise MQTTError(0x82, "wildcard in the Response Topic")  # MQTT-3.3.2-14


@micropython.native  # (tools/frames.py: its frame on the C stack)
def on_publish(c, first, mv, off, end):
    b = c.broker
    cfg = b.cfg
    s = c.session
    # Read once (each read of an attribute is a lookup in machine code):
    # a bridge link's topic mapping (None for a client), and whether the
    # packet is in a large buffer of its own (Connection._read_big) that
    # its message keeps its payload in (one of a size kept for reuse
    # gives a copy).
    topic_in = c.topic_in
    big = c.big_in is not None and len(c.big_in) > BIG_KEEP
    qos = (first >> 1) & 3
    retain = first & 1
    try:
        topic, pid, pr, poff = decode_publish(first, mv, off, end, c.version)
    except MemoryError:
        _decode_short(c, qos, mv, off, end)
        return
    if pr is not None and topic_in is None:
        _check_client_props(pr)
    alias = pr is not None and _TOPIC_ALIAS in pr
    if alias:
        a = pr[_TOPIC_ALIAS]
        if a > cfg["max_topic_alias"]:
            raise MQTTError(0x94, "topic alias %d over the maximum" % a)
        if c.alias_in is None:
            c.alias_in = {}
        if topic:
            c.alias_in[a] = topic
        else:
            topic = c.alias_in.get(a)
            if topic is None:
                raise MQTTError(0x82, "unknown topic alias %d" % a)
    elif not topic:
        raise MQTTError(0x82, "empty topic without alias")
    if topic_in is not None:
        if retain and not cfg["retain_available"]:
            retain = 0  # the upstream's retained values come down as they are, kept by nobody
        # A bridge link: the upstream's topic to ours. None: not ours (or
        # the echo of our own message): acknowledged and dropped.
        topic = topic_in(topic, retain)
        if topic is None:
            if qos:
                c.ack((3 + qos) << 4, pid, 0)
            return
    if not valid_topic(topic) or not topic_fits(cfg, topic):
        if topic_in is not None:
            drop_from_link(c, qos, pid, 0x90, "a topic name not valid here (%s)" % topic[:40])
            return
        if not valid_topic(topic):
            raise MQTTError(0x90, "topic name not valid")
        # Past max_topic_length or max_topic_levels: refused, 0x90 to v5
        # (3.1.1: a plain acknowledgement), QoS 0 dropped. Closed for it, a
        # 3.1.1 client with a session sent it again at every connection,
        # and was closed again. A topic alias it set is forgotten: kept,
        # ten of them held up to ten packets' worth of heap.
        if alias and c.alias_in.get(a) is topic:
            del c.alias_in[a]
        b.stats_dropped += 1
        if qos:
            c.ack((3 + qos) << 4, pid, 0x90)
        return
    if retain and not cfg["retain_available"]:
        raise MQTTError(0x9A, "retain not available")  # (a link's was cleared above)
    if qos == 2 and pid in s.qos2_in:
        # A resent QoS 2 message we already routed: acknowledged only, as
        # the first time (0x10 when nobody took it).
        c.ack(0x50, pid, s.qos2_in[pid])
        return
    # Can it be taken now? If not, it is refused or stays unread (Paused)
    # before anything else happens to it.
    p = b.persist
    # The heap a message takes while it is handled: its payload, its topic,
    # its properties decoded (objects of several times their bytes: 250
    # user properties are 1.7 KB sent and 5.4 KB decoded) and kept as bytes
    # (Message.keep_props), and 320 bytes of objects around them. A payload
    # read into a large buffer of its own (big_in) is kept there: its bytes
    # are taken already. (Counted again, a 6 KB message was refused with
    # 28 KB free: outside probe.)
    need = ((poff - off) << 2) + 320
    if not big:
        need += end - poff
    if not b.heap.room_for(need) or (qos and p is not None and not p.healthy(end - off, topic)):
        if not _admit(c, s, qos, pid, topic, retain, end - poff, end - off, need):
            return
    b.stats_msgs_recv += 1
    if topic_in is not None:
        c.br.received += 1  # (here: a message held for heap is mapped again)
    if pr is not None and pr.get(_PFI) == 1 and not utf8_valid(mv, poff, end):
        # 5.0 3.3.2.3.2 lets a receiver that checks say so in the PUBACK or
        # PUBREC, or in a DISCONNECT: at QoS 0 that is the only way.
        if not qos:
            if topic_in is not None:
                drop_from_link(c, 0, 0, 0x99, "a payload not UTF-8 as its format says (%s)" % topic[:40])
                return
            raise MQTTError(0x99, "payload is not UTF-8")
        c.ack((3 + qos) << 4, pid, 0x99)
        return
    if "$" in topic and topic.startswith("$SYS"):
        # $SYS is the broker's own (MQTT 4.7.2): refused like an ACL denial.
        if qos:
            c.ack((3 + qos) << 4, pid, 0x87)
        return
    if b.acl is not None and s.bridge is None and not b.acl.can_write(s.client_id, s.username, topic):
        # v5 says why; 3.1.1 acknowledges and drops, as Mosquitto does.
        if qos:
            c.ack((3 + qos) << 4, pid, 0x87)
        return
    if qos == 2 and len(s.qos2_in) >= cfg["max_inflight_messages"] and topic_in is None:
        # v5 clients were told our Receive Maximum in CONNACK. 3.1.1 has no
        # such limit, so those get more room, but not without bound. A
        # bridge's upstream is not held to it: Mosquitto 2.0.11 ignores it
        # and resends its whole queue at once when the link resumes, and
        # closing the link for that lost messages each time.
        if c.version == 5:
            raise MQTTError(0x93, "receive maximum exceeded")
        if len(s.qos2_in) >= 4 * cfg["max_inflight_messages"] + 20:
            raise MQTTError(0x93, "too many QoS 2 messages awaiting PUBREL")
    if not qos and not retain and not alias and topic_in is None and not big:
        # Straight from the read buffer to the receivers that take it as it
        # came; a Message only if one of them needs it (route.py). The
        # packet's first byte is found from the shortest encoding of its
        # length; a longer one (legal in 3.1.1) goes the usual way, and so
        # does one in a large buffer (its Message keeps the payload there).
        rem = end - off
        start = off - (2 if rem < 128 else 3 if rem < 16384 else 4 if rem < 2097152 else 5)
        if mv[start] == first:
            msg = b.raw
            msg.set(topic, part(mv, start, end), poff - start, pr, c.version,
                    b.now() if pr is not None and _EXPIRY in pr else 0)  # (the clock: for an expiry only)
            try:
                n = route(b, msg, s)
                if msg.msg is not None:
                    # Some receiver needed a Message of it (to queue it,
                    # say): reckoned per receiver, as below. Copies made
                    # straight into output buffers hold no heap beyond them.
                    b.heap.spend(n << 7)
            finally:
                msg.clear()
            return
    # A packet read into a large buffer of its own (Connection._read_big:
    # big_in) keeps its payload there, not a copy: a large message then
    # needs one free piece of heap its size, not two at once, which a heap
    # in pieces often lacked. Its properties too (Message.keep_props).
    exp = pr.get(_EXPIRY) if pr is not None else None
    while True:
        try:
            msg = Message(topic, part(mv, poff, end) if big else bytes(part(mv, poff, end)),
                          qos, bool(retain), None, exp, b.now() if exp else 0)
            if pr is not None:
                msg.keep_props(pr, mv, off, qos, poff, not big)
            if big:
                c.big_in = None  # (taken: not reused)
            break
        except MemoryError:
            gc.collect()
        if not big and c.big_in is not None:
            # In a buffer of its own, of a size kept for reuse: the heap
            # has no piece for a copy of its payload, and the message keeps
            # it in the buffer, as a larger one does. (Waiting for the
            # floor instead, a message relayed to a live subscriber waited
            # for good where offline sessions' queues held the heap below
            # it, and the copy still had no piece.)
            big = True
            continue
        # Free heap, but not in one piece: as when it is short.
        b.stats_msgs_recv -= 1
        if not qos and pr is not None and not as_sent(pr):
            # A v5 QoS 0 message, whose properties must be encoded (an
            # expiry among thousands of user properties): dropped, as at
            # most once allows. Waiting, it was tried again every 50 ms for
            # good, with its reader held.
            b.stats_dropped += 1
            return
        _heap_short(c, qos, pid, need)
        return
    keep = True
    if retain and qos and c.refuses():
        # A v5 retained value is kept before anyone gets it. When it cannot
        # be (past max_retained_messages or max_retained_bytes, no heap to
        # pack its record, the store refused it), it is refused whole, not
        # delivered either, so that the publisher may try again with nobody
        # getting it twice (it was delivered and answered 0x97). QoS 0,
        # 3.1.1 and a bridge's link are not refused: delivered, not kept,
        # counted (a v5 link is told 0x97 after, below).
        if not b.retained.set(msg):
            c.ack((3 + qos) << 4, pid, 0x97)
            return
        keep = False
    refused = b.queue_refusals
    missed = b.missed
    kept = b.retained.dropped
    stored = p.failed if p is not None else 0
    mark = c.olen  # where copies for the publisher itself would start
    sent = b.stats_bytes_sent
    n = route(b, msg, s, keep)
    if b.stats_bytes_sent != sent:
        # Some output was written out meanwhile, maybe this client's: the
        # bytes from mark on may not start with a packet. No reordering.
        mark = c.olen
    b.heap.spend(n << 7)
    # (b.retained.dropped moves here only when route() kept a retained
    # value: for those not refused above.)
    reason = 0 if n or retain else 0x10
    if c.version == 5 and (b.queue_refusals != refused or b.retained.dropped != kept
                           or (p is not None and p.failed != stored)):
        # A full queue, the retained limit or a full store could not take
        # it: say so rather than promise it (3.1.1 has no way to say it;
        # there it is dropped and counted). Not when it is kept as the
        # retained value, which a refusal would deny; nor at QoS 2 when
        # some receiver took it: a PUBREC 0x97 ends the exchange, and the
        # resend that follows one lost (an outage, a power cut) would be
        # a new message to those who had it, a second copy.
        if not (retain and (not keep or b.retained.dropped == kept)) and (qos == 1 or b.missed - missed == n):
            reason = 0x97
    if qos == 2 and reason < 0x80:
        s.qos2()[pid] = reason
        if p is not None and s.expiry:
            p.qos2_received(s, pid, reason)
    if qos:
        # The PUBACK or PUBREC goes ahead of the copy of the message that
        # route() wrote into the publisher's own output from `mark` on (a
        # client that subscribes to what it publishes). A client may take
        # its own message coming back as the end of the exchange: Paho's
        # test client then disconnected with its PUBACK still unread. (When
        # output was written out during route(), the copy keeps its place.)
        if c.olen > mark and c.tail is None:
            _ack_before_copy(c, mark, 3 + qos, pid, reason)
        else:
            c.ack((3 + qos) << 4, pid, reason)
