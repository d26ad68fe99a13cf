# Every packet after CONNECT except PUBLISH: the QoS 1/2 acknowledgements
# of outgoing messages, SUBSCRIBE/UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH.
from micropython import const
from mqtt.errors import MQTTError
from mqtt.packets import decode, decode_ack, encode, Suback, Unsuback
from mqtt.topic import valid_filter, split_shared
from mqtt import props as P
from broker.session import RELEASED
from broker.subs import Sub
from broker.core import Closed

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


def on_packet(c, first, mv, off, end):
    t = first >> 4
    if _PUBACK <= t <= _PUBCOMP:
        _on_ack(c, t, mv, off, end)
    elif t == _PINGREQ:
        if off != end:
            raise MQTTError(0x81, "PINGREQ has a body")
        c.send(b"\xd0\x00")
    elif t == _SUBSCRIBE:
        _on_subscribe(c, decode(first, mv, off, end, c.version))
    elif t == _UNSUBSCRIBE:
        _on_unsubscribe(c, decode(first, mv, off, end, c.version))
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


def _on_ack(c, t, mv, off, end):
    b = c.broker
    s = c.session
    if end - off == 2:
        # The usual form, in both versions: no reason code, no properties.
        pid = mv[off] << 8 | mv[off + 1]
        if not pid:
            raise MQTTError(0x82, "packet identifier 0")
        reason = 0
    else:
        pid, reason, _ = decode_ack(t, mv, off, end, c.version)
    p = b.persist if s.expiry else None
    if t == _PUBREL:
        found = s.qos2_in and s.qos2_in.pop(pid, None) is not None
        if found and p is not None and s.expiry:  # stored only then (handle_publish)
            p.qos2_released(s, pid)
        _reply(c, 0x70, pid, 0x92 if c.version == 5 and not found else 0)
        return
    d = s.inflight.get(pid) if s.inflight else None
    if t == _PUBACK or t == _PUBCOMP:
        if d is not None and (d.qos == 1) == (t == _PUBACK):
            del s.inflight[pid]
            if p is not None:
                p.acked(s, pid, d)
            c.kick()  # room in the window for what is queued
        return
    # PUBREC
    if d is None or d.qos != 2:
        c.send_ack(0x62, pid, 0x92 if c.version == 5 else 0)
        return
    if reason >= 0x80:
        # The receiver refused it: the flow ends here (MQTT-4.3.3 v5).
        del s.inflight[pid]
        if p is not None:
            p.acked(s, pid, d)
        c.kick()
        return
    if d.state != RELEASED:
        d.state = RELEASED
        if p is not None:
            p.released(s, pid, d)
    _reply(c, 0x62, pid, 0)


def _reply(c, first, pid, reason):
    # PUBREL and PUBCOMP end a QoS 2 flow on the peer's side, which then
    # forgets the packet identifier; they go out only once our matching
    # state change is on flash, or a power cut could resurrect the flow.
    p = c.broker.persist
    if p is not None and p.dirty():
        p.hold(c, bytes((first, 3, pid >> 8, pid & 0xFF, reason) if reason else (first, 2, pid >> 8, pid & 0xFF)))
    else:
        c.send_ack(first, pid, reason)


def _sub_reason(c, cfg, flt, opts, group):
    if group is None and flt is None:
        return 0x8F  # malformed $share
    if not valid_filter(flt) or len(flt) > cfg["max_topic_length"]:
        return 0x8F
    if flt.count("/") >= cfg["max_topic_levels"] and not flt.startswith("$SYS/"):
        # $SYS names are ours: a low level limit must not hide them.
        return 0x8F
    if group is not None and opts & 0x04:
        # No Local on a shared subscription is a Protocol Error (3.8.3.1).
        raise MQTTError(0x82, "No Local on a shared subscription")
    return -1


def _on_subscribe(c, pkt):
    b = c.broker
    cfg = b.cfg
    s = c.session
    subid = 0
    if pkt.props:
        subid = pkt.props.get(P.SUBSCRIPTION_ID, 0)
    reasons = []
    retained = []
    for full, opts in pkt.topics:
        group, flt = split_shared(full)
        r = _sub_reason(c, cfg, flt, opts, group)
        if r < 0 and b.acl is not None and not b.acl.can_subscribe(s.client_id, s.username, flt):
            r = 0x87 if c.version == 5 else 0x80
        existed = full in s.subs
        if r < 0 and not existed and len(s.subs) >= cfg["max_subscriptions"]:
            r = 0x97 if c.version == 5 else 0x80
        if r >= 0:
            reasons.append(r if c.version == 5 or r < 0x80 else 0x80)
            continue
        old = s.subs.get(full)
        if old is not None:
            b.subs.remove(old)
        sub = Sub(s, flt, opts, subid, group)
        s.subs[full] = sub
        b.subs.add(sub)
        reasons.append(opts & 3)
        # Retained messages on subscribe (3.3.1.3): Retain Handling 0 sends
        # them, 1 only for a new subscription, 2 never; never for shares.
        rh = (opts >> 4) & 3
        if group is None and (rh == 0 or (rh == 1 and not existed)):
            retained.append(sub)
    if b.persist is not None and s.expiry:
        b.persist.session_changed(s)
    c.send(encode(Suback(pkt.pid, reasons), c.version))
    for sub in retained:
        # Sent after the SUBACK, one at a time as the output takes them
        # (pump.py): the session holds the list of topics, not the messages.
        topics = b.retained.topics(sub.filter)
        if topics:
            if s.pending_retained is None:
                s.pending_retained = []
            s.pending_retained.append((sub, topics))
    c.kick()


def _on_unsubscribe(c, pkt):
    b = c.broker
    s = c.session
    reasons = []
    for full in pkt.filters:
        sub = s.subs.pop(full, None)
        if sub is not None:
            b.subs.remove(sub)
            reasons.append(0)
        else:
            reasons.append(0x11)
    if b.persist is not None and s.expiry:
        b.persist.session_changed(s)
    c.send(encode(Unsuback(pkt.pid, reasons if c.version == 5 else None), c.version))


def _on_disconnect(c, pkt):
    s = c.session
    if c.version == 5 and pkt.props and P.SESSION_EXPIRY in pkt.props:
        se = pkt.props[P.SESSION_EXPIRY]
        if c.session_expiry_set == 0 and se != 0:
            # MQTT-3.14.2-2: cannot turn an ending session into a kept one.
            raise MQTTError(0x82, "session expiry set at DISCONNECT after 0 at CONNECT")
        s.expiry = se
    # 0x04 asks the server to publish the will anyway (3.14.2.1).
    c.normal_close = pkt.reason != 0x04
    c.closing = True
    raise Closed()
