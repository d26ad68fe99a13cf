# Backpressure: a publisher's reader stops reading while what it publishes
# cannot be taken, so TCP slows the publisher down instead of the broker
# dropping messages or running out of heap:
#   - a connected session its message went to is past half of
#     max_queued_messages or of max_queued_bytes (Session.past_half):
#     wait until that session drains. Only that
#     publisher waits; others, publishing to other sessions, go on. A
#     session whose queue makes no progress for _STALL_MS stops holding
#     publishers back (it then drops messages), and keepalive.py
#     disconnects it after _STUCK_MS. Not when that session's drain needs
#     this very reader (holds_back());
#   - the heap is below its message floor, or the store cannot take what a
#     QoS 1/2 message needs: wait until it recovers (handle_publish raises
#     Paused before the message is taken).
import asyncio
import time
from micropython import const

_STALL_MS = const(2000)
STUCK_MS = const(10000)
WAIT_BYTES = const(1)  # Connection.heap_wait: too few bytes free
WAIT_PIECE = const(2)  # the bytes free, but in no piece as large (handle_connect.held_longest)
_RECOVER_MS = const(50)  # how often a paused publisher looks again


class Paused(Exception):
    # Raised by a handler that cannot take its packet now, once it has set
    # the connection's `pause` to what to wait for: the reader keeps the
    # packet unread and hands it over again after waiting.
    pass


def busy(s, now_ms):
    # True while s's queue is past half full and its writer is making
    # progress (put_message clears full_since on progress).
    if s.conn is None:
        return False
    if s.past_half():
        if s.full_since is None:
            s.full_since = now_ms
        elif time.ticks_diff(now_ms, s.full_since) > _STALL_MS:
            return False
        return True
    s.full_since = None
    return False


def holds_back(c, s):
    # Should c's reader wait for session s to drain? Not when the drain
    # needs c's reader itself: s is c's own session (a client subscribed to
    # what it publishes sends the PUBACKs for its copies on this reader), or
    # s's reader waits, through a chain of such waits, for c's session (two
    # clients publishing to each other). Either wait would last until the
    # stall timer gives up, and the queue would then drop messages.
    own = c.session
    for _ in range(16):  # more than a board has sockets
        if s is own:
            return False
        w = s.conn
        s = w.waiting_for if w is not None else None
        if s is None:
            return True
    return True


async def wait_for_session(s):
    i = 0
    while busy(s, time.ticks_ms()):
        await asyncio.sleep_ms(0 if i < 8 else 1)
        i += 1


async def wait_recovered(b, ready):
    # Until ready() (the heap or the store can take the message again).
    # Always waits a while first: what paused may not be what ready()
    # measures (a heap with room, but not in one piece).
    while True:
        await asyncio.sleep_ms(_RECOVER_MS)
        if ready():
            return
