# CONNECT -> CONNACK (MQTT 3.1.1 3.1/3.2, 5.0 3.1/3.2): protocol version,
# client identifier, credentials, will, session take-over and resumption,
# and the limits of a small board (session table, heap), checked before
# any password is. login() is also HTTP Basic's on a WebSocket upgrade.
import asyncio
import binascii
import gc
import os
import time
from micropython import const
from mqtt.errors import MQTTError
from mqtt.packets import decode, encode, Connack, Disconnect, v3_connack_code
from mqtt import props as P
from mqtt.topic import valid_topic
from mqtt.wire import utf8_valid
from broker import log
from broker.session import Session, NEVER, SENT, stored_of, seq_of
from broker.message import Message
from broker.backpressure import Paused, STUCK_MS, WAIT_PIECE
from broker.core import Closed
from broker.pump import resend_inflight

# Longest client id, in UTF-8 bytes. Persistence keys a session's records
# "q"/"i"/"x" + id + "\0" + a number of up to 10 digits, and the store
# takes keys of at most 1024 bytes (store.py); 128 leaves room to spare and
# is far above the 23 the spec requires servers to allow.
_MAX_CLIENT_ID = const(128)
_MAX_CLIENT_ID_V31 = const(23)
# PBKDF2 iterations hashed between two turns of the other clients: about
# 4 ms on an ESP32 (a whole login of 1,000 iterations takes 250 ms).
_HASH_SLICE = const(16)
_CHECKING_MS = const(10)  # how often a login waiting for another from its address looks again
_NO_HEAP = const(-2)  # login_wait when the hash ran out of heap
_NAME_LOGGED = const(64)  # characters of a refused user name in its log line
# v5 refusals with no 3.1.1 return code of their own: a will topic that is
# not valid, will retain without retain, a will payload that is not UTF-8.
_V3_NO_CODE = (0x90, 0x9A, 0x99)


def refuse(c, reason, why):
    b = c.broker
    b.stats_refused += 1
    log.info("refused %s: 0x%02X %s", c.t.peer, reason, why)
    if c.version == 5:
        pr = {P.REASON_STRING: why} if why else None
        pkt = encode(Connack(False, reason, pr), 5)
        if len(pkt) > c.max_out:
            # No reason string past the client's limit (MQTT-3.2.2-19).
            pkt = encode(Connack(False, reason), 5)
    elif reason in _V3_NO_CODE:
        # No 3.1.1 return code fits: closed without a CONNACK
        # (MQTT-3.2.2-6), as Mosquitto does.
        c.disconnect_reason = reason
        raise Closed()
    else:
        pkt = encode(Connack(False, v3_connack_code(reason)), 4)
    if c.linger_ms:
        c.deferred = pkt  # sent by Connection.finish() after the delay
    else:
        c.send(pkt)
    c.disconnect_reason = reason
    c.told = True
    raise Closed()


def check_topic(cfg, topic):
    # Topic name rules plus the board's limits on length and depth.
    return valid_topic(topic) and topic_fits(cfg, topic)


def topic_fits(cfg, topic):
    # A valid topic within the board's limits on length and depth (MQTT
    # allows 65,535 bytes and any depth: going past them is no protocol
    # error, and a PUBLISH is refused for it, not its connection closed).
    return len(topic) <= cfg["max_topic_length"] and topic.count("/") < cfg["max_topic_levels"]


def busy(b, cid):
    # Why a connection for client id cid (None: not known yet) cannot be
    # served now, as (reason code, text); None when it can.
    cfg = b.cfg
    old = b.sessions.get(cid) if cid is not None else None
    if not room_for_newcomer(b, old):
        return 0x89, "server busy: low memory"
    if old is not None and old.bridge is not None:
        return 0x85, "client id of a bridge"
    if old is None or old.conn is None:
        # (a take-over frees the connection it takes)
        if b.connected_count() >= cfg["max_connections"] and held_longest(b) is None:
            return 0x97, "too many connections"
        if old is None and cid is not None and not b.session_room():
            return 0x97, "session table full"
    return None


def room_for_newcomer(b, old=None):
    # Whether the heap takes one more client: above the clients' floor, or
    # below it when an offline session that holds nothing (never old, the
    # one it resumes) or a client held too long can make way for it once it
    # has logged in (Broker.heap_for_client, on_connect). Asked at accept
    # (server.py) and at CONNECT (busy) alike: refused at accept alone, the
    # client whose return would drain the heap was kept out by publishers
    # paused on it.
    return b.heap.room_for_client() or held_longest(b) is not None or b.oldest_offline(old, True) is not None


def held_longest(b, piece=False):
    # On a full table or heap, the client whose reader the broker has held
    # longest (for heap or the store), at least STUCK_MS, or None: its slot
    # and buffers go to a new client once that one has logged in
    # (on_connect), and its socket to a new one when none is left
    # (server._make_room: a socket with no login yet may take it; the
    # broker was not serving that client anyway). A paused reader sees no
    # EOF, so seven 3.1.1 publishers paused on a heap full of an offline
    # session's queue, and then gone, held their slots for good, and that
    # session's client, whose return alone would free the heap, was
    # refused every time. A live one sends again after reconnecting:
    # nothing it was told was taken is lost. Bridge links are left alone.
    # piece: only of clients whose big packets wait for a piece of heap,
    # and only when two or more have waited so long (keepalive.check).
    now = b.now_ms()
    worst = None
    most = STUCK_MS
    n = 0
    for c in b.conns:
        if (c.session is not None and not c.closing and c.topic_in is None and c.waits_on_broker()
                and (not piece or c.heap_wait == WAIT_PIECE)):
            age = time.ticks_diff(now, c.last_rx)
            if age > STUCK_MS:
                n += 1
                if age > most:
                    worst, most = c, age
    return worst if n > 1 or not piece else None


def end_held(b, why="its slot goes to a new client", piece=False):
    # Closes the client of held_longest(b, piece), if any, so that its
    # socket, slot and buffers go to a newcomer (or to those it held up:
    # keepalive.check); True when there was one. Out of the table at once,
    # so that its socket counts as free (server._make_room) a moment before
    # its reader's teardown closes it.
    c = held_longest(b, piece)
    if c is None:
        return False
    c.protocol_error(0x97, "held by the broker for over %d s: %s" % (STUCK_MS // 1000, why))
    c.close_soon()
    b.conns.remove(c)
    return True


async def login(b, peer, username, password):
    # The one check of a user name and password against the password_file,
    # for an MQTT CONNECT and for HTTP Basic on a WebSocket upgrade alike.
    # Returns -1 when they check out, else the milliseconds the refusal is
    # to be held back. Each failure makes the next login from that address
    # wait longer (broker.throttle), and a login inside such a wait is
    # refused without the costly hash (docs/security.md). The hash runs in
    # slices of _HASH_SLICE iterations with the other clients served in
    # between.
    ip = peer.rsplit(":", 1)[0]
    th = b.throttle
    while ip in th.checking:
        # One login per address at a time. Logins sent together were all
        # hashed before the first failure was counted: guessing went as
        # many times faster as the address had sockets (outside probe).
        await asyncio.sleep_ms(_CHECKING_MS)
    wait = th.delay_ms(ip)
    if wait:
        b.stats_auth_failed += 1
        return wait
    ok = False
    th.checking.append(ip)
    try:
        for ok in b.auth.check_steps(username, password, _HASH_SLICE):
            if ok is None:
                await asyncio.sleep_ms(0)
    finally:
        th.checking.remove(ip)
    if ok:
        th.succeeded(ip)
        return -1
    b.stats_auth_failed += 1
    th.failed(ip)
    # The name as sent is the attacker's to choose: a line of 8 KB found no
    # heap on a board, and the address it was logged for was lost with it.
    log.warning("login failed for user %r from %s", username[:_NAME_LOGGED] if username else username, peer)
    return th.delay_ms(ip)


async def _login(c, user, password):
    try:
        c.login_wait = await login(c.broker, c.t.peer, user, password)
    except MemoryError:
        # The hash's slices allocate. Handed to the CONNECT as a verdict,
        # not raised: a client gone meanwhile leaves nothing to await this
        # task, and its error would reach the loop.
        gc.collect()
        c.login_wait = _NO_HEAP


def _recheck(b, s, username):
    # A resumed session may now belong to another user, or the acl_file
    # may have changed across a restart: what waits for it is checked
    # against the ACL again, for the user resuming it, before anything is
    # delivered. Messages it may not read are dropped and counted.
    acl = b.acl
    p = b.persist
    q = s.queue
    i = 0
    while i < len(q):
        if acl.can_read(s.client_id, username, q[i].topic):
            i += 2
            continue
        if p is not None and stored_of(q[i + 1]):
            p.dequeued(s, q[i], seq_of(q[i + 1]))
        s.drop(i)
        b.stats_dropped += 1
    inf = s.inflight
    for pid in [k for k in inf if inf[k].state == SENT]:
        d = inf[pid]
        if not acl.can_read(s.client_id, username, d.msg.topic):
            # Not sent again to this user (the client it went to has it).
            del inf[pid]
            b.stats_dropped += 1
            if p is not None:
                p.acked(s, pid, d)


def asked_version(mv, off, end):
    # The protocol version of a CONNECT that could not be decoded, so that
    # its refusal is a CONNACK the client can read: 5 when it says "MQTT"
    # level 5, else 4.
    return 5 if end - off > 6 and mv[off + 6] == 5 else 4


def _new_client_id(b):
    # An Assigned Client Identifier, not any session's (MQTT-3.2.2-16).
    # Random, as Mosquitto's are: a counter or a clock starts again at each
    # boot, and could give a name a restored session already has (it then
    # got that session and its messages).
    while True:
        cid = "auto-" + binascii.hexlify(os.urandom(8)).decode()
        if cid not in b.sessions:
            return cid


def on_connect(c, mv, off, end):
    b = c.broker
    cfg = b.cfg
    try:
        pkt = decode(0x10, mv, off, end, 4)
    except MQTTError as e:
        if e.reason == 0x84:
            c.version = asked_version(mv, off, end)
            refuse(c, 0x84, "unsupported protocol version")
        log.info("bad CONNECT from %s: %s", c.t.peer, e)
        c.disconnect_reason = e.reason
        raise Closed()
    v = 5 if pkt.version == 5 else 4
    if v != c.version:
        # Assigned only when it differs from the class default, as below:
        # an idle connection's attribute table stays small.
        c.version = v
    if pkt.version == 3:
        c.v31 = True
    pr = pkt.props or {}
    if P.MAXIMUM_PACKET_SIZE in pr:
        c.max_out = pr[P.MAXIMUM_PACKET_SIZE]
    if P.AUTH_METHOD in pr:
        refuse(c, 0x8C, "enhanced authentication is not supported")
    if P.AUTH_DATA in pr:
        refuse(c, 0x82, "authentication data without an authentication method")  # 3.1.2.11.10

    # Client identifier (MQTT-3.1.3-6..8).
    cid = pkt.client_id
    assigned = None
    if not cid:
        if v == 4 and (not pkt.clean or pkt.version == 3):
            refuse(c, 0x85, "empty client id needs clean session")
        cid = assigned = _new_client_id(b)
    else:
        # MQTT 3.1 allows 23 characters and says to reject a longer id
        # (return code 2); 3.1.1 and 5.0 let servers take more.
        most = _MAX_CLIENT_ID_V31 if pkt.version == 3 else _MAX_CLIENT_ID
        if len(cid.encode()) > most:
            refuse(c, 0x85, "client id longer than %d bytes" % most)

    # Room for it, before any password is hashed: a full broker spends no
    # CPU on logins it could not serve anyway.
    why = busy(b, cid)
    if why is not None:
        refuse(c, why[0], why[1])

    # Credentials. A failed login is answered late (the wait login() says).
    user = pkt.username
    cn = getattr(c.t, "cert_user", None)
    if cn is not None:
        # use_identity_as_username: the TLS handshake checked the client's
        # certificate; its common name is the user, whatever the CONNECT
        # says, and no password is asked for (Mosquitto does the same).
        if not cn:
            refuse(c, 0x86, "client certificate has no common name")
        user = cn
    elif user is not None and b.auth is not None:
        wait = c.login_wait
        if wait is None:
            # Hashed by a task of its own; this CONNECT is handled again,
            # from the top, once it is done (the packets after it wait).
            c.pause = asyncio.create_task(_login(c, user, pkt.password))
            raise Paused()
        c.login_wait = None
        if wait == _NO_HEAP:
            raise MemoryError  # answered as any CONNECT the heap cannot take
        if wait >= 0:
            c.linger_ms = wait
            refuse(c, 0x86, "bad user name or password")
    elif not cfg["allow_anonymous"]:
        # Anonymous, or a user name with no password file to check it in.
        b.stats_auth_failed += 1
        log.warning("refused anonymous client from %s", c.t.peer)
        refuse(c, 0x87, "not authorized")

    # Will.
    will = None
    wdelay = 0
    wexp = None
    if pkt.will_topic is not None:
        if not check_topic(cfg, pkt.will_topic):
            refuse(c, 0x90, "will topic is not valid")
        if pkt.will_topic.startswith("$SYS"):
            # $SYS is the broker's own (MQTT 4.7.2); a will there is refused
            # as Mosquitto refuses a will the client may not write.
            refuse(c, 0x87, "will topic under $SYS")
        if pkt.will_retain and not cfg["retain_available"]:
            refuse(c, 0x9A, "retain not available")
        wp = pkt.will_props or {}
        if wp.get(P.PAYLOAD_FORMAT) == 1 and not utf8_valid(pkt.will_payload, 0, len(pkt.will_payload)):
            refuse(c, 0x99, "will payload is not UTF-8")
        rt = wp.get(P.RESPONSE_TOPIC)
        if rt is not None and ("+" in rt or "#" in rt):
            # Its PUBLISH would carry it (MQTT-3.3.2-14), as a client's is refused for it.
            refuse(c, 0x82, "wildcard in the will's Response Topic")
        wdelay = wp.get(P.WILL_DELAY, 0)
        # Its Message Expiry Interval counts from when it is published
        # (MQTT 3.1.3.2.4): publish_will() sets it.
        will = Message(pkt.will_topic, pkt.will_payload, pkt.will_qos, pkt.will_retain, wp or None)
        wexp = wp.get(P.MESSAGE_EXPIRY)

    ka = pkt.keepalive
    ack_props = None
    if v == 5:
        ack_props = {}
        mk = cfg["max_keepalive"]
        if ka > mk or (ka == 0 and mk < 65535):
            ka = mk
            ack_props[P.SERVER_KEEP_ALIVE] = ka
        if assigned is not None:
            ack_props[P.ASSIGNED_CLIENT_ID] = assigned
        if cfg["max_inflight_messages"] < 65535:
            ack_props[P.RECEIVE_MAXIMUM] = cfg["max_inflight_messages"]
        ack_props[P.MAXIMUM_PACKET_SIZE] = cfg["max_packet_size"]
        if cfg["max_topic_alias"]:
            ack_props[P.TOPIC_ALIAS_MAXIMUM] = cfg["max_topic_alias"]
        if not cfg["retain_available"]:
            ack_props[P.RETAIN_AVAILABLE] = 0
    if c.max_out < 256 and len(encode(Connack(False, 0, ack_props), v)) > c.max_out:
        # Its Maximum Packet Size is below our CONNACK (an Assigned Client
        # Identifier cannot be left out): closed without one, as Mosquitto
        # does, rather than sent a packet past it (MQTT-3.1.2-24). Before
        # anything changes (a take-over, a will): it is refused.
        b.stats_refused += 1
        log.info("refused %s: its maximum packet size %d is below our CONNACK", c.t.peer, c.max_out)
        c.disconnect_reason = 0x95
        raise Closed()

    old = b.sessions.get(cid)
    if old is None and not b.new_session_allowed():
        # (room was there at busy(); a concurrent CONNECT took it)
        refuse(c, 0x97, "session table full")
    full = (old is None or old.conn is None) and b.connected_count() >= cfg["max_connections"]
    if full or not b.heap_for_client(old):
        # What the held client frees (its slot, its buffers) goes to this
        # one. A heap below the clients' floor is full too: those clients
        # hold part of it, and one of them may be the very client that
        # would drain it.
        if not end_held(b):
            # (taken meanwhile)
            refuse(c, 0x97 if full else 0x89, "too many connections" if full else "server busy: low memory")

    # Take-over (MQTT-3.1.4-3): the old connection goes, v5 with 0x8E.
    if old is not None and old.conn is not None:
        oc = old.conn
        log.info("client %s taken over from %s", cid, oc.t.peer)
        if oc.version == 5 and not oc.connack_held:
            # (One whose CONNACK waits for a commit is closed without a
            # word: the first packet a client gets is its CONNACK.)
            oc.send(encode(Disconnect(0x8E), 5))
        oc.session = None
        oc.normal_close = True
        old.conn = None
        old.gone_at = b.now() + 1
        if old.will is not None and old.will_delay == 0:
            b.publish_will(old)
        oc.close_soon()
    # A record delete staged here (a cancelled will, an ended session): the
    # CONNACK waits for its commit, below.
    staged = False
    if old is not None and old.will is not None:
        # A delayed will, and a new connection for its client id before
        # the delay has passed: the will is not sent (MQTT-3.1.2-8), with
        # Clean Start 1 too, as from Mosquitto. (Ending the old session
        # below would have sent it: a sensor that restarts with a clean
        # session raised a false "offline".)
        if b.persist is not None and old.will_stored is not None:
            # Its record goes now, and the CONNACK waits for that commit
            # below: sent at once, a power cut right after it brought the
            # cancelled will back from flash, and the restart published it
            # (power-cut campaign: 9 of 30 tries, cut within 2 ms).
            b.persist.will_cancelled(old)
            staged = True
        old.will = None
        old.will_at = None

    present = False
    if old is not None and (pkt.clean or not old.expiry):
        # A clean start; or the old session was to last only as long as the
        # connection just taken over (MQTT-3.1.2-6; expiry 0, 3.1.2.11),
        # so it ends with it, and nothing is resumed.
        staged = staged or old.on_flash
        b.end_session(old)
        old = None
    if old is not None:
        s = old
        present = True
        if b.acl is not None:
            _recheck(b, s, user)
    else:
        # A session's objects live as long as it does, and the allocator
        # puts each in the lowest free piece that fits: after the garbage
        # of a login and the packets before it (4 to 20 KB measured), that
        # was high in the free heap, and four sessions made that way left
        # it in pieces of at most 7 KB with 52 KB free. A 7 KB message then
        # found no buffer: v5 publishers were told 0x97 and 3.1.1 ones
        # waited for good (large-retained probe). Collected first, they sit
        # low. On the boards with a small heap only (gc_threshold set,
        # app.py): on megabytes a collection costs more and pieces are not
        # short.
        if cfg["gc_threshold"]:
            gc.collect()
        s = Session(cid)
    s.put("will", will)
    s.put("will_delay", wdelay)
    s.put("will_expiry", wexp)
    s.put("will_at", None)
    s.put("version", v)
    # The password file's copy of the name: one string for a user's sessions.
    s.put("username", b.auth.name(user) if b.auth is not None and user else user)
    kept = s.expiry
    if v == 5:
        s.put("expiry", pr.get(P.SESSION_EXPIRY, 0))
    else:
        s.put("expiry", 0 if pkt.clean else (cfg["persistent_client_expiration"] or NEVER))
    if s.expiry:
        c.session_expiry_set = s.expiry
    elif kept and b.persist is not None:
        # Resumed, but kept no longer than this connection: its records go
        # now, since what follows writes none for a session with expiry 0
        # and would leave these behind (a message sent, or acknowledged,
        # while the old record stays).
        staged = staged or s.on_flash
        b.persist.session_ended(s)

    # Limits the client asked for (v5).
    if P.RECEIVE_MAXIMUM in pr:
        c.send_max = min(pr[P.RECEIVE_MAXIMUM], cfg["max_inflight_messages"])
    if P.TOPIC_ALIAS_MAXIMUM in pr:
        c.alias_out_max = min(pr[P.TOPIC_ALIAS_MAXIMUM], cfg["max_topic_alias"])
    if pr.get(P.REQUEST_PROBLEM_INFO) == 0:
        c.problem_info = False
    if not c.alias_out_max:
        c.copies = c.version  # (a bridge's Link maps topics and keeps 0: it never gets here)

    # MQTT 3.1 has no Session Present flag: that byte is reserved, 0.
    ack = encode(Connack(present and pkt.version != 3, 0, ack_props), v)
    c.keepalive = ka
    s.put("gone_at", None)
    s.conn = c
    # The commit. Up to here a MemoryError leaves no session in the table
    # (Connection.dispatch answers it with CONNACK 0x97), and a delayed will
    # cancelled above stays cancelled, its delete staged; from here to the
    # CONNACK nothing allocates but a new session's table entry (and, for
    # a CONNACK held, what holding it takes, or it goes at once).
    b.sessions[cid] = s
    c.session = s  # its slot was made in Connection.__init__
    p = b.persist
    sent = False
    if staged and p is not None and p.dirty():
        # The client is told the old session is gone (MQTT-3.1.2-4) once
        # that is on flash, as any acknowledgement: a power cut right after
        # the CONNACK brought it back, queue and subscriptions, in 7 of 12
        # tries. So too a will it cancelled. Its next packets wait, unread,
        # until the CONNACK is out: nothing may go ahead of it.
        try:
            out = c.unheld
            c.connack_held = True
            p.hold(c, ack, True)
            c.pause = out
            sent = True
        except MemoryError:
            if c.connack_held:
                c.connack_held = False  # (in place: no heap needed)
    if not sent:
        c.send(ack)
    n = b.connected_count()
    if n > b.stats_peak:
        b.stats_peak = n
    log.info("client %s connected from %s (v%s, clean=%d, keepalive=%d)",
             cid, c.t.peer, "5" if v == 5 else "3.1.1", pkt.clean, ka)
    if present:
        resend_inflight(c, s)
    if b.persist is not None:
        b.persist.session_changed(s)
    c.kick()
