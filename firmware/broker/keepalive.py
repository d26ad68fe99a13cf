# For every connection (Mosquitto: keepalive.c). When its time runs out
# (expire, app.py), a client silent for 1.5x its keep-alive (MQTT-3.1.2-24)
# is closed. Once a second (check), so are a socket that sent no CONNECT
# within connect_timeout and a subscriber that stopped reading while its
# queue stayed full (backpressure.py), or held messages while others
# waited for heap; an idle one gives its output buffer back (outbuf.py),
# and one whose queue waits with its output empty, or whose output a
# MemoryError left unsent, is kicked (what waited for heap goes again).
# And clients whose big packets wait on each other's crumbs of heap lose
# one of them.
import time
from broker import log
from broker.backpressure import STUCK_MS
from broker.handle_connect import end_held


def expire(b, now_ms, soon):
    # Every housekeeping wake-up (app.py): a client silent for 1.5 times its
    # keep-alive is closed (v5: DISCONNECT 0x8D), unless what it waits for
    # is the broker (a paused reader's packets wait unread). Returns the ms
    # until the next one runs out, or soon if that is sooner, so that the
    # loop wakes for it then.
    for c in b.conns:
        if c.keepalive and not c.closing and c.session is not None:
            left = c.keepalive * 1500 - time.ticks_diff(now_ms, c.last_rx)
            if left >= 0:
                if left < soon:
                    soon = left + 1
            elif not c.waits_on_broker():
                c.protocol_error(0x8D, "keep alive timeout")
                # Closed once the DISCONNECT is out, not after the half
                # second that drains what a client still sends (conn.py,
                # _drain_in): this one sends nothing, and its connection is
                # to close at 1.5 times its keep-alive (MQTT-3.1.2-22).
                c.told = False
                c.close_soon()
    return soon


def check(b):
    now_ms = time.ticks_ms()
    cto = b.cfg["connect_timeout"] * 1000
    short = b.heap.refused_lately(now_ms)
    for c in b.conns:
        c.release()
        if c.closing:
            continue
        if c.pending() and not c.dirty and c.writer is None:
            c.kick()  # output a MemoryError left unsent (core.flush_now)
        s = c.session
        if s is not None:
            s.shrink()
            if c.wrote:
                c.wrote = False
                s.full_since = None  # progress: not stuck
            elif (short and s.full_since is None
                  and (s.inflight or c.big is not None or c.writer is not None
                       or s.queue and c.pending())
                  and c.pause is None and not c.heap_wait and not c.held):
                # A publisher waits for heap while this client holds
                # messages (unacknowledged, a large payload in its output or
                # part way out, or queued behind an output its socket does
                # not take): two dashboards that stopped reading, each with
                # 8 KB messages in flight, kept a sensor's 8 KB PUBLISH
                # waiting until their keep-alive ran out, and for good with
                # keep-alive 0. Counted as a full queue, it is closed after
                # STUCK_MS unless it moves on (a write, an acknowledgement).
                # Not while its own reader waits (its acknowledgements wait
                # unread behind a packet the heap cannot take), nor while
                # the broker holds its output for a commit.
                s.full_since = now_ms
        if s is None:
            if time.ticks_diff(now_ms, c.born) > cto:
                log.info("%s sent no CONNECT in %d s; closing", c.t.peer, cto // 1000)
                c.close_soon()
        elif s.full_since is not None and time.ticks_diff(now_ms, s.full_since) > STUCK_MS:
            # It has lost messages, or held heap others need, for a while
            # already; free its connection (its session stays).
            c.protocol_error(0x97, "not reading: no progress with its messages for %d s" % (STUCK_MS // 1000))
            c.close_soon()
        elif (s.queue or s.pending_retained or c.resend) and not c.pending() and c.writer is None:
            # Messages wait with the output empty: one that waited for
            # heap (pump.put_message, or an output buffer the heap had no
            # piece for) is tried again. Retained values for a new
            # subscription too: they waited for good, and a hub's eighth
            # client got none of its 200. And what is to go again on a
            # resumption (pump.resend), once the heap has a piece for it.
            c.kick()
    # Clients whose big packets wait for pieces of heap that their own
    # buffers, connections and sessions break up: none goes on until one
    # leaves. Of two or more held over STUCK_MS so, the one held longest
    # goes, as for a newcomer: a live one sends again after reconnecting,
    # and nothing it was told was taken is lost. One a second, until the
    # rest find their pieces. (Clients gone during a WebSocket fuzz held
    # 30 KB this way, with the bytes free, until a newcomer came.)
    end_held(b, "its buffers go to the others", True)
