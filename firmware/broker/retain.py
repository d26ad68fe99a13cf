# Retained messages: the last retained PUBLISH per topic (MQTT 3.3.1.3).
# A dict keyed by topic; subscribe-time lookup walks it, which is fine for
# the few hundred topics a gateway holds. The flash copy is kept by
# persist.py through the on_change hook.
from mqtt.topic import matches


class Retained:
    def __init__(self, limit):
        self.msgs = {}
        self.sys = {}  # $SYS topics: outside the limit and never stored
        self.limit = limit
        self.dropped = 0
        self.on_change = None  # callable(topic, msg or None) -> bool accepted

    def set(self, msg):
        # Stores msg (retain flag set), or deletes on an empty payload.
        # Returns False when it was not stored (limit or store full).
        t = msg.topic
        if not msg.payload:
            if t in self.msgs:
                del self.msgs[t]
                if self.on_change:
                    self.on_change(t, None)
            return True
        if t not in self.msgs and len(self.msgs) >= self.limit:
            self.dropped += 1
            return False
        if self.on_change and not self.on_change(t, msg):
            self.dropped += 1
            return False
        self.msgs[t] = msg
        return True

    def load(self, msg):
        # Restore from flash without writing back.
        self.msgs[msg.topic] = msg

    def get(self, topic, now):
        # The live retained message of a topic, or None (an expired one is
        # dropped here).
        m = self.msgs.get(topic)
        if m is None:
            return self.sys.get(topic)
        if m.expired(now):
            del self.msgs[topic]
            if self.on_change:
                self.on_change(topic, None)
            return None
        return m

    def topics(self, flt):
        # The topics with a retained message that flt matches, for
        # delivery one at a time (pump.py).
        out = []
        if flt[0] == "$":
            for t in self.sys:
                if matches(flt, t):
                    out.append(t)
        for t in self.msgs:
            if matches(flt, t):
                out.append(t)
        # pump takes them from the end: reversed, they go out in this order.
        out.reverse()
        return out
