# Every packet after CONNECT except PUBLISH: the QoS 1/2 acknowledgements
# of outgoing messages, SUBSCRIBE/UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH.
import gc
import micropython
from micropython import const
from mqtt.errors import MQTTError
from mqtt.packets import check_flags, decode, decode_ack, encode, filters_head, subscribe_filters, unsubscribe_filters, \
    Suback, Unsuback
from mqtt.topic import valid_filter, split_shared
from mqtt import props as P
from broker.session import RELEASED, SENT
from broker.subs import Sub
from broker.core import Closed
from broker.backpressure import Paused
from broker.outbuf import kick

_PUBACK = const(4)
_PUBREC = const(5)
_PUBREL = const(6)
_PUBCOMP = const(7)
_SUBSCRIBE = const(8)
_UNSUBSCRIBE = const(10)
_PINGREQ = const(12)
_DISCONNECT = const(14)
_AUTH = const(15)
_CONNECT = const(1)


@micropython.native  # (tools/frames.py: its frame on the C stack)
def on_packet(c, first, mv, off, end):
    # PUBACK, PUBREC, PUBREL or PUBCOMP in the usual form, in both versions
    # (no reason code, no properties, the flags the spec requires) goes to
    # _on_ack with no other call: one of these comes for every QoS 1/2
    # message. Anything else has its fixed header checked first.
    t = first >> 4
    if _PUBACK <= t <= _PUBCOMP and end - off == 2 and first & 0x0F == (2 if t == _PUBREL else 0):
        pid = mv[off] << 8 | mv[off + 1]
        if not pid:
            raise MQTTError(0x82, "packet identifier 0")
        _on_ack(c, t, pid, 0)
    else:
        check_flags(first)
        _on_other(c, first, mv, off, end)


@micropython.native  # (tools/frames.py: its frame on the C stack)
def _on_other(c, first, mv, off, end):
    t = first >> 4
    if _PUBACK <= t <= _PUBCOMP:
        pid, reason, _ = decode_ack(t, mv, off, end, c.version)
        _on_ack(c, t, pid, reason)
    elif t == _PINGREQ:
        if off != end:
            raise MQTTError(0x81, "PINGREQ has a body")
        c.send(b"\xd0\x00")
    elif t == _SUBSCRIBE:
        _on_subscribe(c, mv, off, end)
    elif t == _UNSUBSCRIBE:
        _on_unsubscribe(c, mv, off, end)
    elif t == _DISCONNECT:
        _on_disconnect(c, decode(first, mv, off, end, c.version))
    elif t == _CONNECT:
        raise MQTTError(0x82, "second CONNECT")
    elif t == _AUTH:
        decode(first, mv, off, end, c.version)
        # Enhanced authentication is not offered, so no AUTH may follow.
        raise MQTTError(0x82 if c.version == 5 else 0x81, "AUTH without an authentication method")
    else:
        # CONNACK, SUBACK, UNSUBACK, PINGRESP only flow server to client.
        raise MQTTError(0x82, "packet type %d from a client" % t)


@micropython.native  # (tools/frames.py: its frame on the C stack)
def _on_ack(c, t, pid, reason):
    # PUBACK, PUBREC, PUBREL or PUBCOMP (type t) for pid, with its reason.
    s = c.session
    if t == _PUBREL:
        q = s.qos2_in
        found = q and q.pop(pid, None) is not None
        if found and s.expiry and c.broker.persist is not None:  # stored only then (handle_publish)
            c.broker.persist.qos2_released(s, pid)
        c.ack(0x70, pid, 0 if found else 0x92)
    elif t == _PUBREC:
        _on_pubrec(c, s, pid, reason)
    else:
        d = s.inflight.get(pid) if s.inflight else None
        if d is not None and (d.qos == 1) == (t == _PUBACK):
            _flow_ended(c, s, pid, d)


@micropython.native  # (tools/frames.py: its frame on the C stack)
def _flow_ended(c, s, pid, d):
    # A QoS 1 message acknowledged, or a QoS 2 one completed or refused.
    del s.inflight[pid]
    if c.resend and pid in c.resend:
        c.resend.remove(pid)  # (acknowledged before it was sent again)
    s.full_since = None  # progress: not stuck
    if s.expiry and c.broker.persist is not None:
        c.broker.persist.acked(s, pid, d)
    kick(c)  # room in the window for what is queued


def _on_pubrec(c, s, pid, reason):
    d = s.inflight.get(pid) if s.inflight else None
    if d is None or d.qos != 2:
        c.send_ack(0x62, pid, 0x92 if c.version == 5 else 0)
    elif reason >= 0x80:
        # The receiver refused it: the flow ends here (MQTT-4.3.3 v5).
        _flow_ended(c, s, pid, d)
    else:
        if d.state != RELEASED and not _released(c, s, pid, d):
            return
        c.ack(0x62, pid, 0)


def _released(c, s, pid, d):
    # d's receiver sent its PUBREC: d is RELEASED, on flash first for a
    # persistent session. False when the store is full: after a power cut
    # the PUBLISH would go again behind the PUBREL, and its receiver, done
    # with the identifier, would take it twice. No PUBREL then: the PUBREC
    # comes again when the PUBLISH is sent again, at the client's next
    # connection. (Out of _on_pubrec: its frame stays off the heap.)
    p = c.broker.persist
    durable = s.expiry and p is not None and d.stored
    if durable and not p.inflight_fits(s):
        c.pause = lambda: not p.dirty()
        raise Paused()
    d.state = RELEASED
    if durable and not p.released(s, pid, d):
        d.state = SENT
        return False
    s.full_since = None
    return True


def _sub_reason(c, cfg, flt, opts, group):
    if group is None and flt is None:
        return 0x8F  # malformed $share
    if len(flt) > cfg["max_topic_length"]:  # (its form: _check_filter, split_shared)
        return 0x8F
    if flt.count("/") >= cfg["max_topic_levels"] and not flt.startswith("$SYS/"):
        # $SYS names are ours: a low level limit must not hide them.
        return 0x8F
    if group is not None and opts & 0x04:
        # No Local on a shared subscription is a Protocol Error (3.8.3.1).
        raise MQTTError(0x82, "No Local on a shared subscription")
    return -1


def _record_room(c, p, s, more):
    # The record of a persistent session is staged again for this packet:
    # when the batch for the next commit has no room for it, the packet
    # waits, unread, until that batch is written (Persist.session_fits).
    if p is not None and s.expiry and not p.session_fits(s, more):
        c.pause = lambda: not p.dirty()
        raise Paused()


def _answer(c, p, s, pkt, first):
    # SUBACK or UNSUBACK: for a persistent session, once its record is on
    # flash, as any acknowledgement (Connection.ack). `first` holds what
    # follows (the retained messages after a SUBACK) behind it. One past
    # the client's Maximum Packet Size, many filters' codes in it, must not
    # go (MQTT-3.1.2-24) and has no shorter form: the client is told 0x95
    # and closed; what the packet changed stands, as after a lost SUBACK.
    if len(pkt) > c.max_out:
        c.protocol_error(0x95, "its SUBACK or UNSUBACK is past its maximum packet size")
    elif p is not None and s.expiry and p.dirty():
        p.hold(c, pkt, first)
    else:
        c.send(pkt)


def _check_filter(c, cfg, full, opts):
    # For each filter of a SUBSCRIBE (opts: its options) or an UNSUBSCRIBE
    # (None), before any of the packet's is taken: a filter the spec forbids
    # (MQTT-4.7.1-2, -3, 4.7.3-1) is a protocol violation, which closes the
    # connection (MQTT-4.8.0-1), in 5.0 after DISCONNECT 0x81, as Mosquitto
    # does (5.0's 0x8F is for a filter correctly formed but not taken). A
    # 3.1 SUBACK has no failure code, so there a filter past our own limits
    # (length, levels, a $share without a filter) closes it too; 3.1.1 and
    # 5.0 answer those 0x80 and 0x8F. Refusals by the ACL or
    # max_subscriptions answer 0x80 (0x87, 0x97) in all three, rather than
    # close a client that would only come back.
    if not valid_filter(full):
        raise MQTTError(0x81, "topic filter not valid")
    if c.v31 and opts is not None:
        group, flt = split_shared(full)
        if _sub_reason(c, cfg, flt, opts, group) == 0x8F:
            raise MQTTError(0x8F, "topic filter not taken, and 3.1 cannot say so")


def _on_subscribe(c, mv, off, end):
    # The filters are taken from the packet one at a time, in two passes:
    # every one is checked before any is taken, and none outlives its turn.
    # Held as a list, a SUBSCRIBE of 900 short filters, under 8 KB, wanted
    # more heap than an ESP32 has: no SUBACK, the client closed (outside
    # probe). What fails in the second pass (No Local on a share, no heap)
    # takes back what the packet made before the connection is closed.
    b = c.broker
    cfg = b.cfg
    s = c.session
    p = b.persist
    v = c.version
    pid, props, at = filters_head(_SUBSCRIBE, mv, off, end, v)
    more = 0
    for full, opts in subscribe_filters(mv, at, end, v):
        _check_filter(c, cfg, full, opts)
        more += 2 * len(full) + 24
    _record_room(c, p, s, more)
    subid = 0
    if props:
        subid = props.get(P.SUBSCRIPTION_ID, 0)
    reasons = bytearray()  # (a list of 2,000 of them is 8 KB in one piece)
    retained = []
    made = []  # (filter, the subscription it replaced or None)
    fresh = {}  # filter -> the subscription this packet made for it
    try:
        for full, opts in subscribe_filters(mv, at, end, v):
            group, flt = split_shared(full)
            r = _sub_reason(c, cfg, flt, opts, group)
            if r < 0 and b.acl is not None and not b.acl.can_subscribe(s.client_id, s.username, flt):
                r = 0x87 if v == 5 else 0x80
            existed = full in s.subs
            if r < 0 and not existed and (len(s.subs) >= cfg["max_subscriptions"]
                                          or not b.heap.room_for_client(2 * len(full) + 128, False)):
                # Past the limit, or the heap's clients' floor: a subscription
                # lives as long as its session (offline sessions of many long
                # filters filled the heap, and SUBSCRIBE ended in MemoryError).
                r = 0x97 if v == 5 else 0x80
            if r >= 0:
                reasons.append(r if v == 5 or r < 0x80 else 0x80)
                continue
            # Retained messages on subscribe (3.3.1.3): Retain Handling 0
            # sends them, 1 only for a new subscription, 2 never; never for
            # shares.
            rh = (opts >> 4) & 3
            sub = fresh.get(full)
            if sub is not None:
                # Named again in this packet: the later options, on the
                # same subscription. A new one each time kept every earlier
                # one alive (made, retained) until the SUBACK: one filter
                # named 600 times ran the heap out, and a retained message
                # went out once for each.
                sub.opts = opts
                reasons.append(opts & 3)
                if group is None and rh == 0 and sub not in retained:
                    retained.append(sub)
                continue
            old = s.subs.get(full)
            if old is not None and old.opts == opts and old.subid == subid:
                # The same again: nothing changes, so nothing is written
                # (the session's record was, 117 B of flash each time).
                reasons.append(opts & 3)
                if group is None and rh == 0 and old not in retained:
                    retained.append(old)
                continue
            sub = None
            try:
                sub = Sub(s, flt, opts, subid, group)
                b.subs.add(sub)
                s.subs[full] = sub
            except MemoryError:
                # No piece of heap for it, though the heap is above the floor:
                # the list of one filter's subscribers grows in one piece (on
                # a 450 KB pico2_w, 1,024 sessions on alerts/# wanted 8 KB, and
                # the largest free piece was 2.6 KB). Refused as past the floor.
                if sub is not None:
                    b.subs.remove(sub)
                gc.collect()
                reasons.append(0x97 if v == 5 else 0x80)
                continue
            if old is not None:
                b.subs.remove(old)
                if old in retained:
                    # Named before in this packet, unchanged then: its
                    # retained values go once, as the later options say.
                    retained[retained.index(old)] = sub
            made.append((full, old))
            fresh[full] = sub
            reasons.append(opts & 3)
            if group is None and (rh == 0 or (rh == 1 and not existed)) and sub not in retained:
                retained.append(sub)
    except Exception:
        _take_back(c, s, made, reasons)
        raise
    if p is not None and s.expiry and made and not _stored(p, s):
        _take_back(c, s, made, reasons)
        retained = ()
    _answer(c, p, s, encode(Suback(pid, reasons), v), True)
    if c.closing:
        retained = ()  # (its SUBACK was past its Maximum Packet Size: closed unanswered)
    for sub in retained:
        # Sent after the SUBACK, one at a time as the output takes them
        # (pump.py): the session holds the list of topics, not the messages.
        topics = b.retained.topics(sub.filter)
        if topics:
            if s.pending_retained is None:
                s.pending_retained = []
                s.put("ahead", s.queued())
            s.pending_retained.append((sub, topics))
    c.kick()


def _stored(p, s):
    # The session's record staged with its new subscriptions; False when
    # the store refused it, or the heap has no piece to make it in (16
    # long filters are a record of 4 KB).
    try:
        return p.session_changed(s)
    except MemoryError:
        gc.collect()
        return False


def _take_back(c, s, made, reasons):
    # The subscriptions a SUBSCRIBE made are undone, and refused (v5 0x97,
    # 3.1.1 0x80): the session is left as it was. Either the session's
    # record with them could not be stored (the store is full, the record
    # is larger than one store batch, only with max_subscriptions raised
    # far, or no heap), and a power cut would lose them; or the packet
    # failed part way, and the connection is being closed without a SUBACK.
    subs = c.broker.subs
    for full, old in made:
        subs.remove(s.subs[full])
        if old is None:
            del s.subs[full]
        else:
            s.subs[full] = old
            subs.add(old)
    # Every code that granted one granted what was made (a filter named
    # again shares its first naming's subscription).
    no = 0x97 if c.version == 5 else 0x80
    for i in range(len(reasons)):
        if reasons[i] < 0x80:
            reasons[i] = no


def _on_unsubscribe(c, mv, off, end):
    # Filters one at a time, in two passes, as _on_subscribe.
    b = c.broker
    s = c.session
    p = b.persist
    v = c.version
    pid, _, at = filters_head(_UNSUBSCRIBE, mv, off, end, v)
    for full in unsubscribe_filters(mv, at, end):
        _check_filter(c, b.cfg, full, None)
    _record_room(c, p, s, 0)
    reasons = bytearray()
    gone = []
    for full in unsubscribe_filters(mv, at, end):
        sub = s.subs.pop(full, None)
        if sub is not None:
            b.subs.remove(sub)
            gone.append((full, sub, len(reasons)))
            reasons.append(0)
        else:
            # None such: 0x11, or 0x8F for a shared one no SUBSCRIBE could make.
            group, flt = split_shared(full)
            reasons.append(0x8F if flt is None else 0x11)
    if p is not None and s.expiry and gone and not _stored(p, s):
        # A power cut would bring them back (the store is full): they stay,
        # refused with 0x80. 3.1.1's UNSUBACK cannot refuse: closed
        # without one.
        for full, sub, i in gone:
            s.subs[full] = sub
            b.subs.add(sub)
            reasons[i] = 0x80
        if v < 5:
            raise MQTTError(0x80, "the store has no room for the unsubscribe")
    _answer(c, p, s, encode(Unsuback(pid, reasons if v == 5 else None), v), False)


def _on_disconnect(c, pkt):
    s = c.session
    if c.version == 5 and pkt.props and P.SESSION_EXPIRY in pkt.props:
        se = pkt.props[P.SESSION_EXPIRY]
        if c.session_expiry_set == 0 and se != 0:
            # MQTT-3.14.2-2: cannot turn an ending session into a kept one.
            raise MQTTError(0x82, "session expiry set at DISCONNECT after 0 at CONNECT")
        s.expiry = se
    # Only 0x00 discards the will (MQTT-3.1.2-10, 3.14.4-3): 0x04 asks
    # for it, and an error code (0x80 and up) ends the connection as a
    # failure would. (3.1.1 has no reason: 0.)
    c.normal_close = pkt.reason == 0
    c.closing = True
    raise Closed()
