# Once a second, for every offline session (Mosquitto: will_delay.c,
# session_expiry.c): a delayed will whose time has come is published, and a
# session whose expiry interval has passed since its client left ends.
# Both count on the broker clock (core.py), which persists across restarts.
import gc
from broker import log
from broker.session import NEVER


def check(b):
    now = b.now()
    for s in b.sessions.values():
        if s.conn is None and s.will_at is not None and now >= s.will_at:
            b.publish_will(s)
    # One at a time, found again after each end, rather than listed: a
    # heap in crumbs had no piece for the list, and no session could end
    # (esp32 heap full of expired sessions' queues).
    p = b.persist
    while True:
        s = _due(b, now)
        if s is None or p is not None and not p.room_to_end():
            break  # the rest right after the commit
        try:
            b.end_session(s)
        except MemoryError:
            # Its deletes took what the heap had: those staged stay
            # done (persist.session_ended), the rest at the next tick,
            # after the commit has freed them.
            gc.collect()
            break
        log.info("session %s expired", s.client_id)


def _due(b, now):
    # An offline session whose expiry interval has passed, or None.
    for s in b.sessions.values():
        if (s.conn is None and s.expiry != NEVER and s.gone_at is not None
                and now - s.gone_at >= s.expiry):
            return s
    return None
