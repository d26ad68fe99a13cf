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
        if t.startswith("$SYS"):
            # Only the broker writes $SYS (into self.sys, never to flash).
            return False
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
        # Restore from flash without writing back ($SYS: see set()).
        if not msg.topic.startswith("$SYS"):
            self.msgs[msg.topic] = msg

    def match(self, flt, now):
        # Yields live retained messages matching a filter; drops expired.
        if flt[0] == "$":
            for t in self.sys:
                if matches(flt, t):
                    yield self.sys[t]
        dead = None
        for t in self.msgs:
            m = self.msgs[t]
            if m.expired(now):
                if dead is None:
                    dead = []
                dead.append(t)
            elif matches(flt, t):
                yield m
        if dead:
            for t in dead:
                del self.msgs[t]
                if self.on_change:
                    self.on_change(t, None)
