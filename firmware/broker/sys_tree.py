# $SYS/broker/... topics, named as Mosquitto names them where it has them,
# published as retained messages every sys_interval seconds when changed.
import gc
import time
from broker.message import Message
from broker.route import route

VERSION = "mpbroker 0.1.0"


def _values(b):
    # Collect first, so heap/used is live data, not garbage not yet swept.
    gc.collect()
    alloc = gc.mem_alloc()
    free = gc.mem_free()
    v = [
        ("version", VERSION),
        ("uptime", "%d seconds" % (time.time() - b.started)),
        ("clients/connected", b.connected_count()),
        ("clients/total", len(b.sessions)),
        ("clients/maximum", b.stats_peak),  # (Mosquitto's: the most at once)
        ("clients/refused", b.stats_refused),
        ("clients/evicted", b.stats_evicted),
        ("messages/received", b.stats_msgs_recv),
        ("messages/sent", b.stats_msgs_sent),
        ("publish/messages/dropped", b.stats_dropped),
        ("messages/expired", b.stats_expired),
        ("bytes/received", b.stats_bytes_recv),
        ("bytes/sent", b.stats_bytes_sent),
        ("retained messages/count", len(b.retained.msgs)),
        ("retained messages/dropped", b.retained.dropped),
        ("subscriptions/count", b.subs.count),
        ("auth/failed", b.stats_auth_failed),
        ("heap/used", alloc),
        ("heap/free", free),
        ("loop/longest stall ms", b.stall_ms),
    ]
    if b.persist is not None:
        for k, x in b.persist.sys_values():
            v.append((k, x))
    if b.sys_extra is not None:
        for k, x in b.sys_extra():
            v.append((k, x))
    return v


def publish(b, last):
    # last: dict topic -> payload last published, so unchanged values are
    # not sent again. Below the messages' floor only values already kept
    # are replaced (about what they free): the first round, some 4 KB of
    # retained values, took a heap full of an offline session's queue
    # below the clients' floor, and that session's client could no longer
    # come back to drain it.
    short = b.heap.free() < b.heap.message_floor
    for k, x in _values(b):
        t = "$SYS/broker/" + k
        p = str(x).encode()
        old = last.get(t)
        if old == p or short and old is None:
            continue
        last[t] = p
        m = Message(t, p, 0, True)
        b.retained.sys[t] = m
        route(b, m, None, False)
