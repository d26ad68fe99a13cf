# Session state (MQTT 4.1): what outlives a connection. Subscriptions,
# messages queued for delivery, outgoing QoS 1/2 messages awaiting their
# acknowledgements, and the packet identifiers of incoming QoS 2 messages
# awaiting PUBREL.
#
# A queued message costs two list slots and no object of its own: a gateway
# holds hundreds of them (16 offline sessions x 32 alerts), and an object
# per entry would cost 48 bytes more each on a 32-bit board. The queue is
# [msg, info, msg, info, ...]; info() packs the delivery's QoS, retain flag,
# whether it is on flash, and its sequence number into one small int, or is
# (that int, subscription identifiers) in the rare case it has some. A
# message in flight is a Delivery: at most the Receive Maximum of them per
# session.
import micropython
from micropython import const

NEVER = const(0xFFFFFFFF)
# Outgoing in-flight states.
SENT = const(1)  # PUBLISH sent, waiting PUBACK (QoS 1) or PUBREC (QoS 2)
RELEASED = const(2)  # PUBREL sent, waiting PUBCOMP


def info(qos, retain, seq, subids=None, stored=False):
    # A queue entry's second slot. seq orders a session's QoS 1/2
    # deliveries (Broker.next_seq); stored: it has a record on flash.
    i = seq << 4 | (8 if stored else 0) | (4 if retain else 0) | qos
    return i if not subids else (i, subids)


def qos_of(i):
    return (i if type(i) is int else i[0]) & 3


def retain_of(i):
    return bool((i if type(i) is int else i[0]) & 4)


def stored_of(i):
    return bool((i if type(i) is int else i[0]) & 8)


def seq_of(i):
    return (i if type(i) is int else i[0]) >> 4


def subids_of(i):
    return None if type(i) is int else i[1]


class Delivery:
    # An outgoing QoS 1/2 message in flight, under its packet identifier.
    # Fields at their class default take no room in the instance.
    state = SENT
    stored = False  # it has a record on flash
    queued = 0  # else the seq of the queue record that stands for it (persist.sent)
    retain = False
    subids = None

    def __init__(self, msg, qos, retain, subids, seq):
        self.msg = msg
        self.qos = qos
        # Taken when it is sent, so that a resend on resumption keeps the
        # order it went out in (MQTT-4.6.0-1): not its queue entry's, since
        # retained messages for a new subscription go out ahead of entries
        # queued before them (pump.py).
        self.seq = seq
        if retain:
            self.retain = True
        if subids:
            self.subids = subids


class Session:
    # Defaults on the class: an attribute still at its default takes no
    # room in the instance's table (handle_connect assigns only what
    # differs), which keeps an idle session small. The containers start
    # as shared empty tuples and become a list or dict on first use.
    conn = None
    version = 4
    expiry = 0  # session expiry interval, seconds (NEVER = never)
    on_flash = False  # its record ("s" + client id) is in the store
    gone_at = None  # broker clock (Broker.now()) when the connection closed
    will = None  # Message or None
    will_stored = None  # the will whose record is on flash (persist.py)
    will_delay = 0
    will_at = None  # broker clock when a delayed will is due
    will_expiry = None  # the will's Message Expiry Interval, from when it goes out
    username = None
    _pid = 0
    dropped = 0  # messages dropped for this session
    full_since = None  # ticks_ms when the queue passed half full
    queue = ()  # [msg, info, ...], see above
    queued_bytes = 0  # the payload bytes of the messages in queue (max_queued_bytes)
    inflight = ()  # pid -> Delivery
    qos2_in = ()  # pid -> its PUBREC's reason code: QoS 2 received, PUBREL pending
    pending_retained = None  # [(Sub, [topic, ...])]: retained messages still to send
    ahead = 0  # queue entries that go before pending_retained (queued before its SUBSCRIBE)
    # Queue bounds, in messages and in payload bytes (a byte_limit of 0:
    # no byte bound; a limit of 0 queues nothing). Broker()
    # sets them from max_queued_messages and max_queued_bytes; a bridge's
    # own session has its max_queued and no byte bound: its queue is what
    # the gateway holds for the upstream through an outage, bounded by the
    # heap's message floor like everything else.
    limit = 32
    byte_limit = 0
    bridge = None  # the Bridge, for a bridge's own session: never evicted or taken over

    def __init__(self, client_id):
        self.client_id = client_id
        self.subs = {}  # full filter (with $share prefix) -> Sub

    def put(self, name, v):
        # Assigns v unless the attribute already reads v (see above).
        if getattr(self, name) != v:
            setattr(self, name, v)

    def queued(self):
        return len(self.queue) >> 1

    def push(self, msg, inf):
        # Appends a queue entry (no limit: see enqueue).
        q = self.queue
        if not isinstance(q, list):  # (the shared (), as in in_flight)
            q = self.queue = []
            # Its slot made now, before an entry is in: made by the += after
            # the appends, it could grow the attribute table and fail with
            # the entry already queued, which the retry then queued twice.
            self.queued_bytes = 0
        q.append(msg)
        q.append(inf)  # (a MemoryError here leaves half an entry: route._whole)
        self.queued_bytes += len(msg.payload)

    def pop(self):
        # Removes the first queue entry.
        self.drop(0)

    def drop(self, i):
        # Removes the queue entry at q[i], q[i + 1].
        q = self.queue
        n = len(q[i].payload)  # pyright: ignore[reportAttributeAccessIssue] (a list here)
        del q[i : i + 2]  # (its slice takes heap: counted after)
        self.queued_bytes -= n
        if i < self.ahead << 1:
            self.ahead -= 1

    def drop_qos0(self):
        # Removes the QoS 0 entries (never on flash); returns how many.
        q = self.queue
        n = 0
        i = 1
        while q and i < len(q):
            if qos_of(q[i]) == 0:
                self.drop(i - 1)
                n += 1
            else:
                i += 2
        self.dropped += n
        return n

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def enqueue(self, msg, inf):
        # Bounded queue (limit, byte_limit; as with Mosquitto's
        # max_queued_bytes, a queue under its byte bound takes one more
        # message of any size). When full, the oldest QoS 0 messages make
        # room (QoS 0 entries are never on flash), if they can; else the
        # newcomer is dropped. Returns False when msg was dropped. (The
        # bounds as full() reads them, kept in step: not a call of it, as
        # this runs for every message queued.)
        n = (len(self.queue) >> 1) - self.limit + 1  # entries to free
        b = self.queued_bytes - self.byte_limit + 1 if self.byte_limit else 0  # bytes to free
        if (n > 0 or b > 0) and not self._make_room(n, b):
            self.dropped += 1
            return False
        self.push(msg, inf)
        return True

    def full(self):
        # True when enqueue() would drop the next message, whatever its
        # size: a message that only such queues would keep does not stay
        # in the heap (route.would_hold).
        n = (len(self.queue) >> 1) - self.limit + 1
        b = self.queued_bytes - self.byte_limit + 1 if self.byte_limit else 0
        return (n > 0 or b > 0) and self._room_to(n, b) < 0

    def _room_to(self, n, b):
        # Where the oldest QoS 0 entries that free n entries and b bytes
        # end (their last entry's info slot; 0 for none); -1 when all of
        # them would not.
        q = self.queue
        end = 0  # the queue up to q[end] holds the QoS 0 entries to drop
        for i in range(1, len(q), 2):
            if n <= 0 and b <= 0:
                break
            if qos_of(q[i]) == 0:
                n -= 1
                b -= len(q[i - 1].payload)  # pyright: ignore[reportAttributeAccessIssue] (a list here)
                end = i
        return -1 if n > 0 or b > 0 else end

    def _make_room(self, n, b):
        # Drops the oldest QoS 0 entries that free n entries and b bytes,
        # or none when all of them would not: QoS 0 messages dropped for a
        # newcomer that is then refused anyway would be lost for nothing.
        end = self._room_to(n, b)
        if end < 0:
            return False
        q = self.queue
        i = 1
        while i <= end:
            if qos_of(q[i]) == 0:
                self.drop(i - 1)
                self.dropped += 1
                end -= 2
            else:
                i += 2
        return True

    def past_half(self):
        # Past half of either bound: a live subscriber's publishers wait
        # (backpressure.py).
        return len(self.queue) >> 1 >= self.limit >> 1 or 0 < self.byte_limit >> 1 <= self.queued_bytes

    def retained_waiting(self, short=None):
        # The topics of the retained messages queued or in flight here, as
        # a set (bridge.py: what the outage kept for the upstream); `short`
        # when the heap has no room for it.
        try:
            out = set()
            q = self.queue
            for i in range(1, len(q), 2):
                if retain_of(q[i]):
                    out.add(q[i - 1].topic)
            d = self.inflight
            if d:  # (the shared () until the first send)
                for pid in d:
                    if d[pid].retain:
                        out.add(d[pid].msg.topic)
            return out
        except MemoryError:
            return short

    def in_flight(self):
        # The dict, made when the container is still the shared () (only
        # shrink() gives an empty one back): a steady QoS 1/2 subscriber
        # whose window empties between messages keeps the one it has. (Its
        # deleted entries stay as markers that a lookup of a missing key
        # walks past, a table of at most the window's size, until shrink()
        # once a second; a new dict per message cost more.)
        d = self.inflight
        if not isinstance(d, dict):
            d = self.inflight = {}
        return d

    def qos2(self):
        d = self.qos2_in
        if not isinstance(d, dict):  # (as in_flight)
            d = self.qos2_in = {}
        return d

    def next_pid(self):
        p = self._pid
        inf = self.inflight
        for _ in range(65535):
            p = p + 1 if p < 65535 else 1
            if p not in inf:
                self._pid = p
                return p
        return 0

    def shrink(self):
        # Empty containers give their room back (push(), in_flight() and
        # qos2() make them again): a drained queue keeps the room of the
        # most it ever held, and an emptied dict its table. Sixteen
        # sessions that came back for their 32 messages each kept some
        # 300 B apiece. Not per message (a steady subscriber would make
        # them again each time): at the end of a connection, and once a
        # second (keepalive.check).
        if not self.queue:
            self.put("queue", ())
            self.put("ahead", 0)
        if not self.inflight:
            self.put("inflight", ())
        if not self.qos2_in:
            self.put("qos2_in", ())

    def clear(self):
        # The session is over: drop what it holds.
        self.subs = {}
        self.queue = ()
        self.put("queued_bytes", 0)
        self.inflight = ()
        self.qos2_in = ()
        self.pending_retained = None
        self.put("ahead", 0)
