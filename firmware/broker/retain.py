# Retained messages: the last retained PUBLISH per topic (MQTT 3.3.1.3).
# A dict keyed by topic; subscribe-time lookup walks it, which is fine for
# the few hundred topics a gateway holds. The flash copy is kept by
# persist.py through the on_change hook.
#
# A gateway holds hundreds of these (a value per sensor), so the common
# one, without properties or expiry, is kept packed: one bytes object, its
# payload then its QoS, next to its topic. A Message is made from it only
# while it is being sent (get()), and not even then when it goes out at
# QoS 0 with nothing added: pump.py writes it from the packed bytes
# (message.put_packed).
import gc
from micropython import const
from mqtt.topic import matches
from broker import log
from broker.message import Message

_CHUNK = const(16)


def _packed(msg):
    # msg as the table keeps it: packed bytes, or the Message itself (also
    # for a payload kept in the buffer its packet was read into, rather
    # than copy a large one).
    if not msg.pbody and msg.expires is None and type(msg.payload) is bytes:
        return msg.payload + bytes((msg.qos,))
    return msg


def _message(topic, v):
    if type(v) is bytes:
        return Message(topic, memoryview(v)[:-1], v[-1], True)
    return v


class Retained:
    def __init__(self, limit, byte_limit):
        self.msgs = {}  # topic -> packed bytes or Message
        self.sys = {}  # $SYS topics: outside the limits and never stored
        self.limit = limit  # topics (max_retained_messages)
        # Payload bytes (max_retained_bytes): payloads live in the heap,
        # and nothing drains them. Bounded by topics only, five topics of
        # 8 KB held an ESP32's heap below the messages' floor, and a 3.1.1
        # publisher, which cannot be refused, waited for good (outside
        # probe: 1 to 8 KB messages, a fifth of them retained).
        self.byte_limit = byte_limit
        self.bytes = 0  # payload bytes held
        self.dropped = 0
        self.on_change = None  # callable(topic, msg or None) -> bool accepted

    def full_for(self, topic, size):
        # Would a value of size bytes for topic be refused for the limits?
        # A new topic past the topics', or payloads past the bytes'. One no
        # larger than the value it replaces is always taken: also when what
        # was restored is past a limit lowered since (or new).
        if topic in self.msgs:
            old = self.size(topic)
            return size > old and self.bytes - old + size > self.byte_limit
        return len(self.msgs) >= self.limit or self.bytes + size > self.byte_limit

    def clear(self):
        self.msgs.clear()
        self.bytes = 0

    def _drop(self, t):
        self.bytes -= self.size(t)
        del self.msgs[t]
        if self.on_change:
            self.on_change(t, None)

    def set(self, msg):
        # Stores msg (retain flag set), or deletes on an empty payload.
        # Returns False when it was not stored (limit or store full).
        t = msg.topic
        if t.startswith("$SYS"):
            # Only the broker writes $SYS (into self.sys, never to flash).
            return False
        n = len(msg.payload)
        if not n:
            if t in self.msgs:
                self._drop(t)
            return True
        if self.full_for(t, n):
            self.dropped += 1
            return False
        new = t not in self.msgs
        try:
            v = _packed(msg)
            if new:
                # Its slot first: a new topic may grow the table, one piece
                # of heap of 8 B a slot (1.8 KB at 168 topics) that a
                # fragmented heap may not have with tens of KB free. Then
                # it is not kept, as past the limit, and nothing is stored.
                self.msgs[t] = None
        except MemoryError:
            gc.collect()
            self.dropped += 1
            return False
        try:
            ok = self.on_change is None or self.on_change(t, msg)
        except Exception as e:
            # No heap to pack its record (a few KB of properties in one
            # piece), or a key the store cannot take: not kept, as when the
            # store refuses it, rather than the publisher cut off (and its
            # slot left holding None).
            if isinstance(e, MemoryError):
                gc.collect()
            else:
                log.warning("retained %r not stored: %r", t[:40], e)
            ok = False
        if not ok:
            if new:
                del self.msgs[t]
            self.dropped += 1
            return False
        if not new:
            self.bytes -= self.size(t)
        self.msgs[t] = v
        self.bytes += n
        return True

    def load(self, msg):
        # Restore from flash without writing back ($SYS: see set()).
        t = msg.topic
        if not t.startswith("$SYS"):
            if t in self.msgs:
                self.bytes -= self.size(t)
            self.msgs[t] = _packed(msg)
            self.bytes += len(msg.payload)

    def peek(self, topic):
        # The stored message of a topic as a Message, expired or not; None.
        v = self.msgs.get(topic)
        return None if v is None else _message(topic, v)

    def size(self, topic):
        # Payload bytes of a topic's retained message.
        v = self.msgs[topic]
        return len(v) - 1 if type(v) is bytes else len(v.payload)

    def get(self, topic, now):
        # The live retained message of a topic, or None (an expired one is
        # dropped here).
        v = self.msgs.get(topic)
        if v is None:
            return self.sys.get(topic)
        if type(v) is not bytes and v.expired(now):
            self._drop(topic)
            return None
        return _message(topic, v)

    def topics(self, flt):
        # The topics with a retained message that flt matches, for delivery
        # one at a time (pump.py): a list of chunks of at most _CHUNK, last
        # chunk first, each last topic first, as pump takes them from the
        # ends. Chunks, because 200 topics in one list is one 1 KB block,
        # which a fragmented heap may not have.
        # Every topic is compared with the filter's literal head (before its
        # first wildcard) at C speed; matches() sees only those that start
        # with it, and none for "#", which takes all but the $ topics.
        w = len(flt)
        for ch in "+#":
            i = flt.find(ch)
            if 0 <= i < w:
                w = i
        if w and w == len(flt) - 1 and flt[w] == "#":
            w -= 1  # "a/#" also matches "a": its head is "a", not "a/"
        head = flt if w == len(flt) else flt[:w]  # (no copy of a plain filter)
        every = flt == "#"
        out = []
        chunk = None
        for d in (self.sys, self.msgs) if flt[0] == "$" else (self.msgs,):
            for t in d:
                if t.startswith(head) and (t[0] != "$" if every else matches(flt, t)):
                    if chunk is None or len(chunk) == _CHUNK:
                        chunk = []
                        out.append(chunk)
                    chunk.append(t)
        for chunk in out:
            chunk.reverse()
        out.reverse()
        return out
