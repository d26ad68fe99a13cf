# Session state (MQTT 4.1): what outlives a connection. Subscriptions,
# messages queued for delivery, outgoing QoS 1/2 messages awaiting their
# acknowledgements, and the packet identifiers of incoming QoS 2 messages
# awaiting PUBREL.
from micropython import const

NEVER = const(0xFFFFFFFF)
# Outgoing in-flight states.
SENT = const(1)  # PUBLISH sent, waiting PUBACK (QoS 1) or PUBREC (QoS 2)
RELEASED = const(2)  # PUBREL sent, waiting PUBCOMP


class Session:
    # Defaults on the class: an attribute still at its default takes no
    # room in the instance's table (handle_connect assigns only what
    # differs), which keeps an idle session small.
    conn = None
    version = 4
    expiry = 0  # session expiry interval, seconds (NEVER = never)
    gone_at = None  # time.time() when the connection closed
    will = None  # Message or None
    will_delay = 0
    will_at = None  # time.time() when a delayed will is due
    username = None
    _pid = 0
    dropped = 0  # messages dropped for this session
    full_since = None  # ticks_ms when the queue passed half full

    def __init__(self, client_id):
        self.client_id = client_id
        self.subs = {}  # full filter (with $share prefix) -> Sub
        self.queue = []  # [msg, qos, retain, subids] waiting to be sent
        self.inflight = {}  # pid -> [msg, qos, retain, subids, state]
        self.qos2_in = {}  # pid -> True: QoS 2 received, PUBREL pending

    def put(self, name, v):
        # Assigns v unless the attribute already reads v (see above).
        if getattr(self, name) != v:
            setattr(self, name, v)

    def next_pid(self):
        p = self._pid
        inf = self.inflight
        for _ in range(65535):
            p = p + 1 if p < 65535 else 1
            if p not in inf:
                self._pid = p
                return p
        return 0

    def enqueue(self, msg, qos, retain, subids, limit):
        # Bounded queue. When full, the oldest QoS 0 message makes room;
        # with none, a QoS 0 newcomer is dropped, then a QoS 1/2 one.
        # Returns False when msg was dropped.
        q = self.queue
        if len(q) >= limit:
            for i in range(len(q)):
                if q[i][1] == 0:
                    q.pop(i)
                    self.dropped += 1
                    break
            else:
                self.dropped += 1
                return False
        q.append([msg, qos, retain, subids])
        return True
