# Once a second, for every offline session (Mosquitto: will_delay.c,
# session_expiry.c): a delayed will whose time has come is published, and a
# session whose expiry interval has passed since its client left ends.
# Both count on the broker clock (core.py), which persists across restarts.
import gc
from broker import log
from broker.session import NEVER


def check(b):
    now = b.now()
    dead = None
    for s in b.sessions.values():
        if s.conn is not None:
            continue
        if s.will_at is not None and now >= s.will_at:
            b.publish_will(s)
        if s.expiry != NEVER and s.gone_at is not None and now - s.gone_at >= s.expiry:
            if dead is None:
                dead = []
            dead.append(s)
    if dead:
        p = b.persist
        for s in dead:
            if p is not None and not p.room_to_end():
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
