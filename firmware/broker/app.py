# Starts the broker from a checked config: persistence, authentication,
# listeners, bridges, and the once-a-second housekeeping. The board's
# main.py and the host runner (tools/mp_host.py) both call run().
import asyncio
import gc
import time
from micropython import const
from broker import log
from broker.core import Broker
from broker.server import listen, accept_loop
from broker import sys_tree, keepalive, session_expiry, transport


# The housekeeping runs once a second, and sooner when a client's keep-alive
# runs out before the next second (keepalive.expire): a silent client was
# closed up to a second past 1.5 times its keep-alive (MQTT-3.1.2-24). A
# fixed quarter-second tick did that too, but woke the loop four times as
# often for everyone, and the hub test's lowest heap free fell from 19.9 KB
# to 16.2 KB in 1 of 3 runs.
_TICK_MS = const(1000)


class StartError(ValueError):
    # A config that passed its checks but cannot work here (this board's
    # heap, its filesystem): the board stops in maintenance, as for a bad
    # config (gateway.py), rather than restart into it every 10 s.
    pass


async def _housekeeping(b, wdt):
    last = {}
    interval = b.cfg["sys_interval"]
    n = 0
    t0 = time.ticks_ms()  # when this second began
    nap = _TICK_MS
    t1 = t0
    while True:
        await asyncio.sleep_ms(nap)
        # How late this wake-up came: the longest time some task held the
        # loop (a compaction, a restore, a password hash) shows here, and
        # must stay well under the watchdog's timeout.
        t = time.ticks_ms()
        late = time.ticks_diff(t, t1) - nap
        if late > b.stall_ms:
            b.stall_ms = late
        nap = _TICK_MS
        try:
            if wdt is not None:
                wdt.feed()
            soon = keepalive.expire(b, t, _TICK_MS)
            if time.ticks_diff(t, t0) >= _TICK_MS:
                # Once a second, on the second; after a loop held up for two
                # seconds or more, the seconds missed are not made up.
                t0 = t if time.ticks_diff(t, t0) >= 2 * _TICK_MS else time.ticks_add(t0, _TICK_MS)
                b.advance_clock()
                b.heap.track()
                # Read only as differences within one PUBLISH (handle_publish):
                # set back, they stay small ints, which take no heap to count.
                b.queue_refusals = b.missed = 0
                keepalive.check(b)
                session_expiry.check(b)
                if b.persist is not None:
                    b.persist.tick()
                n += 1
                if interval and n >= interval:
                    n = 0
                    sys_tree.publish(b, last)
            now = time.ticks_ms()  # (soon counts from t, before the work above)
            second = time.ticks_diff(time.ticks_add(t0, _TICK_MS), now)
            nap = max(1, min(soon - time.ticks_diff(now, t), second))
        except MemoryError:
            gc.collect()
            log.warning("housekeeping: out of memory")
        except Exception as e:
            log.error("housekeeping failed: %r", e)
        t1 = time.ticks_ms()


def start(cfg, wdt=None):
    # Sets everything up and returns the Broker; the caller runs the loop.
    log.set_level(cfg["log_level"])
    transport.order_wakeups()
    try:
        b = Broker(cfg)
    except MemoryError:
        # (The buffers made at start: two spares of each size, and the read buffer.)
        raise StartError("read_buffer_size %d and write_buffer_size %d: no room in the heap for the buffers "
                         "made at start" % (cfg["read_buffer_size"], cfg["write_buffer_size"]))
    transport.shed = b.shed_buffers
    asyncio.create_task(b.flush_all())
    restored = 0  # heap taken by what the store restored
    if cfg["persistence"]:
        from broker.persist import Persist

        where = cfg["persistence_location"]
        try:
            b.persist = Persist(b, where, cfg["store_max_bytes"])
            gc.collect()
            restored = gc.mem_free()
            b.persist.load(wdt)
        except OSError as e:
            # The errno alone named neither the key nor the path.
            raise StartError("persistence_location %s: cannot use it (%s)" % (where, e))
        gc.collect()
        restored -= gc.mem_free()
    if cfg["password_file"]:
        from broker.auth import PasswordFile, LoginThrottle

        b.auth = PasswordFile.load(cfg["password_file"])
        b.throttle = LoginThrottle()
    if cfg["acl_file"]:
        from broker.acl import Acl

        b.acl = Acl.load(cfg["acl_file"])
    # heap.py's floors against the heap free now: below min_free_heap no
    # message is taken, below half of it no client is let in. With
    # min_free_heap at or above what is free there is no room for a
    # client: each would be refused, or could send nothing (200000 on the
    # esp32's 110 KB said "broker ready", then refused every client). What
    # the store restored counts as free: sessions expire or make way, and
    # a full store must not keep a board from starting.
    gc.collect()
    free = gc.mem_free() + restored
    if free <= cfg["min_free_heap"]:
        raise StartError("min_free_heap %d leaves no room for a client: the heap has %d B free at start, "
                         "what the store restored aside (a client is let in above half of it, its "
                         "messages taken above it)" % (cfg["min_free_heap"], free))
    for L in cfg["listeners"]:
        wrap = None
        if L["protocol"] == "websockets" or "certfile" in L:
            from broker.listeners import wrapper

            wrap = wrapper(L, cfg)
        s = listen(L["bind_address"], L["port"])
        asyncio.create_task(accept_loop(b, s, wrap))
        log.notice("listening on %s:%d (%s%s)", L["bind_address"], L["port"], L["protocol"],
                 ", tls" if "certfile" in L else "")
    if cfg["bridges"]:
        from broker.bridge import start_bridges

        start_bridges(b)
    if cfg["allow_anonymous"]:
        log.notice("anonymous clients are allowed")
    asyncio.create_task(_housekeeping(b, wdt))
    gc.collect()
    # No packet larger than what is free now, above the message floor, can
    # be read before more heap is freed (Heap.track).
    b.heap.most = gc.mem_free() - b.heap.message_floor
    if cfg["gc_threshold"]:
        # Collect after every gc_threshold bytes allocated, not only when
        # the heap is full: garbage then never spreads over the whole heap,
        # so what stays (retained messages, sessions) packs low and large
        # free pieces remain. The small-heap profiles set it: after 200
        # retained messages a Pico W had no piece for Mbed TLS's 16 KiB
        # record buffer with 112 KB free, and an ESP32 hub once none for a
        # returning session with 25 KB free. It costs throughput under
        # load (README, gc_threshold), so the boards with megabytes leave
        # it off.
        gc.threshold(cfg["gc_threshold"])
    log.notice("broker ready; heap used %d free %d", gc.mem_alloc(), gc.mem_free())
    return b


def run(cfg, wdt=None):
    box = []

    async def main():
        box.append(start(cfg, wdt))
        while True:
            await asyncio.sleep(3600)

    try:
        asyncio.run(main())
    finally:
        # A clean stop (Ctrl-C, SIGTERM through tools/broker) publishes the
        # wills of the sessions that end with it and writes what waits for
        # its autosave: retained QoS 0 values and the clock.
        if box and box[0].persist is not None:
            try:
                box[0].wills_at_stop()
                box[0].persist.shutdown()
            except Exception as e:
                log.error("store: final save failed: %r", e)
        asyncio.new_event_loop()
