# Broker state on flash, through store.Store (a crash-safe key-value log
# with group commit). What is kept, one record per key:
#   "c"                 the broker clock (core.py), so expiries survive a reboot
#   "r" topic           retained message
#   "s" cid             session: expiry, subscriptions (JSON)
#   "w" cid             its will, its delay and expiry: written only when
#                       the will changes, so that a SUBSCRIBE rewrites the
#                       session's record but not a will of up to
#                       max_packet_size
#   "m" mid             a message queued or in flight for one or more
#                       sessions, stored once however many refer to it
#   "q" cid \0 seq      a QoS 1/2 delivery queued for a session: mid, QoS,
#                       retain, subscription identifiers
#   "i" cid \0 pid      an outgoing QoS 1/2 delivery in flight, its state
#                       and its sequence number (the resend order)
#   "x" cid \0 pid      an incoming QoS 2 packet id awaiting PUBREL; value: its
#                       PUBREC's reason code when not 0 (else empty)
# U+0000 cannot occur in MQTT strings, so it separates key parts safely.
# Times (message expiry, when a session's client left, a delayed will) are
# on the broker clock.
#
# The promise: an acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP) that
# promises something is held back until the change it promises is
# committed. Changes made while handling one batch of packets share one
# commit. A commit that fails keeps its batch (Store.commit) and everything
# held waits while the committer retries; meanwhile handle_publish takes no
# QoS 1/2 message that would need the flash (healthy()).
#
# Wear: an unchanged retained message writes nothing; a retained QoS 0
# value (nobody acknowledged it) is written at most once per
# autosave_interval and at a clean stop, whatever its publish rate.
import asyncio
import gc
import json
from micropython import const
from mqtt import wire
from broker import log, session_expiry
from broker.heap import unload
from broker.session import SENT, RELEASED, info
from broker.session import qos_of, retain_of, seq_of, subids_of, stored_of
from broker.store import Store, StoreFull

_RETRY_MS = const(100)  # first retry of a failed commit; doubles up to _RETRY_MAX_MS
_RETRY_MAX_MS = const(5000)
_CLOCK_IDLE = const(3600)  # with nothing else written, the clock is written this often
_ROOM_S = const(30)  # a full store compacts to find freed room at most this often (Persist._want_room)
_HELD_MAX = const(64)  # answers held for a commit past which their reader waits (Persist.hold)
# Store ops one commit is expected to hold, for which the store makes room
# at start (Store._make_room). Measured on the esp32 heap: a session
# draining 300 queued QoS 1 messages commits batches of up to 80 (a round
# of the pump sends max_inflight_messages, 20, each a queue record deleted
# and an in-flight record put, while the PUBACKs of the last round delete
# in-flight and message records).
_BATCH_KEYS = const(96)
_CROWDED = const(32)  # staged ops past which more work waits for the commit (a third)
# The most one subscription's queue or in-flight record takes in a batch:
# op head, a key of the client id (up to 128 bytes, handle_connect.py) and
# a sequence number, and a value of a few varints (Persist.healthy).
_PER_SUB = const(176)
# Bytes of records a batch with records already staged takes in all: what
# staged records keep alive in the heap until the commit (a payload
# acknowledged or replaced meanwhile) stays as it was before max_batch grew
# to take the largest message, which an empty batch takes (_batch_left).
_BATCH_SOFT = const(16384)


def _pack(msg):
    # qos, retain, expires (u32 on the broker clock, 0 = never), topic,
    # properties, then the payload: as (head, payload) pieces, so that the
    # store writes the payload from the message itself (Store.put).
    out = bytearray()
    out.append(msg.qos)
    out.append(1 if msg.retain else 0)
    # (At most the u32's top: clock + an interval near 2**32 lost its high
    # bits, and came back expired. Cut there, it ends as many seconds short
    # as the broker clock read then.)
    wire.put_u32(out, min(msg.expires, 0xFFFFFFFF) if msg.expires is not None else 0)
    wire.put_str(out, memoryview(msg.topic))
    wire.put_varint(out, len(msg.pbody))
    out.extend(msg.pbody)
    return (bytes(out), msg.payload)


def _record_max(n, topic):
    # At most the bytes of the largest record a message makes, n the bytes
    # of its PUBLISH after the fixed header (topic, packet identifier,
    # properties, payload): its retained record, whose key repeats the
    # topic and whose frame and head take 19 bytes. A topic is up to 4
    # bytes a character, and twice over when it came as an alias.
    return n + (len(topic) << 3) + 19


def _entry(s):
    # At most the bytes of a queue, in-flight or received record of s: its
    # client id at up to 4 bytes a character, and at most 128 bytes.
    return min(48 + (len(s.client_id) << 2), _PER_SUB)


def _same(a, b):
    # Two retained messages that would be stored alike.
    return (a.qos == b.qos and a.pbody == b.pbody and a.expires == b.expires
            and a.payload == b.payload)


def _varints(out, *ns):
    # MQTT's variable byte integers, up to 5 bytes rather than 4: a will
    # delay or expiry is up to 2^32 - 1 s, and a sequence number passes
    # 2^28 after years. At 4 the encoder refused them, and the session's
    # teardown stopped part way. Values under 2^28 are the same bytes, as
    # older records hold them (restore.py reads both).
    for n in ns:
        wire.put_varint(out, n, 5)


def _list_of(room):
    # An empty list with room for `room` items before it grows.
    a = [None] * room
    del a[:]
    return a


class Persist:
    def __init__(self, broker, path, max_bytes):
        self.b = broker
        # index_max bounds the RAM index of keys written since the last
        # compaction. inline_max is the board's LittleFS inline file
        # limit (esp32 ~120 B, rp2 ~500 B).
        # max_batch: a batch takes what the largest message makes (its
        # retained record and its own, each of up to a packet with the
        # topic counted again, _record_max, and its queue entries). At a
        # fixed 16 KB, a retained message near the esp32's 8 KB limit for
        # persistent sessions had one record staged and the other refused.
        # (The store caps it at its format's 64 KB; past that, too_large.)
        self.store = Store(path, max_bytes, index_max=32, batch_keys=_BATCH_KEYS,
                           inline_max=broker.cfg["store_inline_max"],
                           max_batch=max(16384, 4 * broker.cfg["max_packet_size"] + 8192))
        # (connection, packet, is a PUBLISH) waiting for the commit. Two
        # lists, swapped at each release, made once with room for the
        # bound and never shrunk (del [:] keeps their room): grown from
        # empty after each commit, the list wanted 512 B in one piece on a
        # heap in crumbs, and the client whose answer it was got 0x97.
        self.held = _list_of(_HELD_MAX + 8)
        self.spare_held = _list_of(_HELD_MAX + 8)
        self.waiting = []  # connections whose pump waits for the commit (crowded)
        self.expire_waits = False  # a session due to end waits for the commit (room_to_end)
        self.flag = asyncio.Event()
        self.mid = 0  # last message id given
        self.partial = False  # the restore stopped part way (restore._past_the_rest)
        self.failed = 0  # records that could not be kept
        self.failing = False  # the last commit failed; retrying
        self.wants_heap = False  # it failed for want of heap
        self.freed = False  # records were deleted since the committer last compacted
        self.room_at = -_ROOM_S  # broker clock of that compaction
        self.compact_now = False  # the committer compacts at its next turn
        self.lazy = {}  # topic -> True: retained QoS 0 values waiting for autosave
        self.autosave = broker.cfg["autosave_interval"]
        self._since_save = 0
        self.clock_saved = 0
        self.report = None

    # ------------------------------------------------------------ start

    def load(self, wdt=None):
        # Restores what the store holds (restore.py). That code runs once,
        # here, and its module is dropped after it, as config.py is once
        # the config is built: kept, its functions and the names they use
        # held 288 B of the heap the broker runs in (esp32 twin).
        from broker import restore

        try:
            restore.load(self, wdt)
        finally:
            unload("restore")
        asyncio.create_task(self._committer())

    # ------------------------------------------------------------ commit

    def dirty(self):
        return self.store.pending > 0

    def healthy(self, n, topic):
        # True when the store surely takes a QoS 1/2 message on topic, n
        # the bytes of its PUBLISH after the fixed header: its last commit
        # went through, and both the store and the batch staged for the
        # next commit have room for the most the message could make (a
        # retained record, its own record, and a queue entry per
        # subscription), found without matching its topic. When not, the
        # publish path works out need(), which matches it, and asks
        # too_large(), batch_takes() and can_take(). With room for any
        # packet up to max_packet_size only, a retained 6.8 KB message for
        # persistent sessions was taken, its retained record staged and its
        # own record refused by the batch: the publisher was told 0x97 for
        # a value that stayed retained, and a power cut left it in place of
        # the last one acknowledged (outside power-cut probe, 3 of 6 seeds).
        # (Asked for every QoS 1/2 message: with nothing staged, as is usual
        # between clean sessions, it makes three calls, not nine as when
        # the store's byte counts were methods.)
        st = self.store
        if self.failing or st.pending and not self._uncrowded():
            return False
        most = (_record_max(n, topic) << 1) + (self.b.subs.count + 1) * _PER_SUB
        return st.used_bytes + st.pending + most <= st.max_bytes and most <= self._batch_left()

    def batch_takes(self, need):
        # Has the batch staged for the next commit room for a QoS 1/2
        # message's records, `need` bytes (need())? When not, the message
        # waits for the committer (a matter of milliseconds), unread:
        # refused or taken without its record, a burst of large messages
        # lost its tail. An empty batch takes anything put() takes. While
        # commits fail, can_take() says no instead (v5 is told 0x97).
        # Counted in ops too: each holds heap until the commit (its key,
        # its value and the objects around them), and a message for twenty
        # persistent sessions stages 21. Bounded in bytes only (16 KB), a
        # batch could hold hundreds of small queue records, past the keys
        # the store's index made room for (store.py, _make_room).
        st = self.store
        return (self.failing or not st.pending
                or (self._uncrowded() and need <= self._batch_left()))

    def too_large(self, need):
        # Are a QoS 1/2 message's records (need()) more than even an empty
        # batch holds? Then the store can never keep it, and waiting for a
        # commit would be for good (a packet past about a quarter of the 64 KB
        # batch, on a board whose max_packet_size allows it).
        return need > self.store.batch_room()

    def _batch_left(self):
        # Bytes of records the staged batch takes more of: an empty one,
        # the largest message (max_batch); else up to _BATCH_SOFT in all.
        st = self.store
        if not st.pending:
            return st.batch_room()
        return st.batch_left() - max(0, st.max_batch - _BATCH_SOFT)

    def can_take(self, need):
        # Can the store take a QoS 1/2 message whose records are `need`
        # bytes (need())? True when it needs none (not retained, no
        # persistent session subscribes to it, no QoS 2 record).
        if not need:
            return True
        st = self.store
        if self.failing:
            return False
        if st.used_bytes + st.pending + need <= st.max_bytes:
            return True
        self._want_room()
        return False

    def _want_room(self):
        # used_bytes counts deleted records until the next compaction,
        # which writes bring; a refusal writes nothing. So a store filled
        # once refused new topics after room was freed, until a restart
        # (outside power-cut probe). A refusal after deletes has the
        # committer compact, in steps, which finds that room; at most every
        # _ROOM_S seconds, since each rewrites the namespaces the log
        # touched.
        if self.freed and self.b.clock - self.room_at >= _ROOM_S:
            self.room_at = self.b.clock
            self.compact_now = True
            self.flag.set()

    def need(self, topic, retain, size, n, x=None):
        # Bytes of records a message on topic makes, of size bytes of
        # payload and n bytes after the fixed header: its retained record,
        # and its own record and a queue entry per copy held for a
        # persistent session. Its records hold its properties too. x: the
        # persistent session of a QoS 2 publisher, whose record that it
        # received the message (qos2_received) must be kept too: refused
        # for a full store, a power cut let the publisher's resend through
        # as a new message, a second copy for every subscriber.
        b = self.b
        rec = _record_max(n, topic)
        need = rec if retain and size else 0  # a delete makes room
        if x is not None and x.expiry:
            need += _entry(x)
        hits = b.hits
        del hits[:]
        b.subs.match(topic, hits)
        plain = len(hits)
        b.subs.match_shared(topic, hits, False)
        # A queue entry per copy route() makes: per matching subscription of
        # a 5.0 session, per older session however many of its plain ones
        # match, and per share group.
        held = None
        for i in range(len(hits)):
            sub = hits[i]
            s = sub.session
            if s.expiry and sub.opts & 3:
                if held is None:
                    held = []
                elif i < plain and s.version != 5 and s in held:
                    continue
                held.append(s)
                need += _entry(s)
        if held:
            need += rec
        return need

    def hold(self, c, pkt, publish=False):
        # publish: c's queue pauses behind it until released (a QoS 2
        # PUBLISH; a SUBACK, ahead of the retained messages).
        if len(self.held) >= _HELD_MAX - 1 and c.pause is None and c.reader is asyncio.current_task():
            # Answers held cost about 80 B each: 2,000 PUBRELs in one write
            # ran the heap out, and the broker then served no one. The
            # reader that holds the last one the bound allows waits, its
            # packets unread, until fewer are held. (Before the append: a
            # MemoryError after it would have the caller send the packet
            # a second time.)
            c.pause = self.room_to_hold
        self.held.append((c, pkt, publish))
        if publish:
            c.held += 1  # (after the append, which may fail)
        self.flag.set()

    def room_to_hold(self):
        return len(self.held) < _HELD_MAX

    def _put(self, key, val, lost=True):
        # lost=False: a refusal loses nothing (a record already on flash
        # stands for this one), so it is neither logged nor counted as a
        # record dropped.
        try:
            try:
                self.store.put(key, val)
            except MemoryError:
                self.b.shed_buffers()
                self.store.put(key, val)
        except StoreFull:
            if lost:
                self.failed += 1
                log.warning("store full: %r not stored", key[:40])
            return False
        self.flag.set()
        return True

    def _del(self, key):
        try:
            self.store.delete(key)
        except MemoryError:
            self.b.shed_buffers()
            self.store.delete(key)
        self.freed = True
        self.flag.set()

    async def _committer(self):
        wait = _RETRY_MS
        while True:
            try:
                await self.flag.wait()
            except MemoryError:
                # wait() makes a generator (44 B): a heap without one
                # ended this task, and nothing was written again.
                gc.collect()
                await asyncio.sleep_ms(_RETRY_MS)
            self.flag.clear()
            # Let every packet already read be handled first, so that one
            # commit covers them all (group commit).
            await asyncio.sleep_ms(0)
            try:
                try:
                    await self._compact_and_commit()
                except MemoryError:
                    # Once, then as any failed commit: with the pool's
                    # spares and the heap kept aside for it (heap.py).
                    # With that heap freed, no other task runs until this
                    # try is over: new connections took it between a
                    # compaction's steps, and the commit then waited for
                    # good (esp32 heap full of offline sessions' queues,
                    # which could not end until it was written).
                    self.b.shed_buffers()
                    self.b.heap.use_rescue()
                    await self._compact_and_commit(False)
            except Exception as e:
                # The batch stays staged and every acknowledgement it owes
                # stays held: retried until it goes through.
                if not self.failing:
                    try:  # (a log call's arguments take heap too)
                        if isinstance(e, MemoryError):
                            # Load shed, as when messages wait for heap
                            # (README, "When the board is full"), not a
                            # fault: a later try, after collections,
                            # finds the room.
                            log.warning("store commit waits for heap: %r; retrying", e)
                        else:
                            log.error("store commit failed: %r; retrying", e)
                    except MemoryError:
                        pass
                self.failing = True
                self.wants_heap = isinstance(e, MemoryError)
                gc.collect()
                await asyncio.sleep_ms(wait)
                wait = min(wait << 1, _RETRY_MAX_MS)
                self.flag.set()
                continue
            if self.failing:
                log.notice("store: commit went through again")
                self.failing = False
            wait = _RETRY_MS
            try:
                # The pieces kept aside are made again first, from what the
                # batch held: before the sends it released take the heap.
                self.b.heap.keep_rescue()
                self._after_commit()
            except Exception:
                # This task must not die, or nothing is written again. What
                # was left (a kick, an expiry) goes at the next commit or
                # housekeeping tick.
                gc.collect()

    def _after_commit(self):
        self._release()
        w = self.waiting
        while w:
            w.pop().kick()
        if self.expire_waits:
            # Sessions due to end waited for this commit: not a second
            # more, or a hub with many full queues frees them at one a
            # second while new ones come.
            self.expire_waits = False
            session_expiry.check(self.b)

    async def _compact_and_commit(self, steps_yield=True):
        if self.compact_now:
            # Asked for room (_want_room): deletes still staged go first,
            # to be folded in too.
            self._commit()
        if self.compact_now or (self.store.pending and self.store.compaction_due()):
            # In steps, one namespace each, so that the loop is not held
            # for the whole of it. (Deletes staged meanwhile are not in it.)
            self.freed = False
            for _ in self.store.compact_steps():
                if steps_yield:
                    await asyncio.sleep_ms(0)
            self.compact_now = False
        self._commit()

    def _uncrowded(self):
        # The staged batch holds under a third of the room the store made
        # for one (_CROWDED): more work may go into it before the commit.
        return self.store.staged_ops() < _CROWDED

    def room_to_end(self):
        # Whether a session may end now: its records' deletes go into the
        # batch (one per queued message, per message in flight and per
        # message record: a session with a full queue and window can stage
        # over 100), which must stay within the _BATCH_KEYS the store made
        # room for. When not, the session ends right after the commit
        # (expire_waits). While commits fail the batch only grows: sessions
        # end all the same (a full store: their deletes make room), but not
        # while the commit waits for heap and the heap is short (their
        # deletes took the last of it, and the commit could never be
        # written: esp32 heap, sessions with full queues). A batch short of
        # crowded still takes one session's end.
        if self._uncrowded():
            return True
        if self.failing and (not self.wants_heap or self.b.heap.room_for_client()):
            return True
        self.expire_waits = True
        return False

    def crowded(self, c):
        # True when the staged batch holds a third of the room the store
        # made for one: c's pump then stops, and is kicked once the batch
        # is written. Without this the pump went on staging while a
        # compaction ran in steps, and one batch held 160 ops (esp32 heap,
        # a session draining 300 queued messages). The PUBACKs of what is
        # in flight may still add two ops each.
        if self._uncrowded():
            return False
        if c not in self.waiting:
            self.waiting.append(c)
        return True

    def _commit(self):
        st = self.store
        if not st.pending:
            return
        b = self.b
        if b.now() != self.clock_saved:
            self._save_clock()
        # A commit (and a compaction) needs a few KB at once: collect
        # first when the heap is short rather than fail.
        if not b.heap.room_for_client():
            gc.collect()
        st.commit()

    def _save_clock(self):
        # The clock goes with every commit (a few bytes in a write made
        # anyway), or on its own once an hour (tick). A power cut loses the
        # uptime since: restored, the clock goes on from where it was saved,
        # and expiries counted on it stretch by that much. Saved only when
        # it was a minute stale, a retained message with an expiry of 30 s,
        # taken 25 s after a start, said 55 s left after a cut.
        # now(), not the clock housekeeping last advanced: a message
        # stamped with now() a second ahead of it said 31 s left of 30
        # after a cut.
        t = self.b.now()
        out = bytearray()
        wire.put_u32(out, t)
        if self.store.takes("c", out):  # else the next commit takes it
            self.store.put("c", out)
            self.clock_saved = t

    def _release(self):
        held = self.held
        spare = self.spare_held
        del spare[:]  # (emptied at the end of the last release, unless cut short)
        self.held = spare
        self.spare_held = held
        for c, pkt, publish in held:
            if publish:
                c.held -= 1
            if c.connack_held:
                c.connack_held = False  # (held first: this is the CONNACK)
            if c.closing:
                continue
            try:
                if type(pkt) is tuple:
                    c.send_split(pkt[0], pkt[1])  # a large PUBLISH: head, payload
                else:
                    c.send(pkt)  # also kicks its output for what waited
            except MemoryError:
                # This task must not die: the client sends again (QoS
                # 1/2 stays in flight on both sides).
                gc.collect()
                c.close_soon()
        del held[:]

    def tick(self):
        # Once a second (app.py): the autosave of retained QoS 0 values,
        # and the clock when nothing else was written for an hour.
        self._since_save += 1
        if self.lazy and self._since_save >= self.autosave:
            self._save_lazy()
        if self.b.clock - self.clock_saved >= _CLOCK_IDLE and not self.store.pending:
            self._save_clock()
            self.flag.set()

    def _save_lazy(self):
        # Writes the retained QoS 0 values that wait for their autosave, as
        # many as the staged batch takes: a few dozen values of 500 B are
        # more than one batch holds (put() refused the rest, and they were
        # never written). True when all are written; tick() goes on with
        # the rest each second, after the commit.
        r = self.b.retained
        st = self.store
        lazy = self.lazy
        while lazy:
            if not self._uncrowded():
                return False
            t = next(iter(lazy))
            m = r.peek(t)
            if m is None:
                self._del("r" + t)
            else:
                rec = _pack(m)
                if st.pending and not st.takes("r" + t, rec):
                    return False
                self._put("r" + t, rec)
            del lazy[t]
        self._since_save = 0
        return True

    def shutdown(self):
        # A clean stop: what waits for its autosave, and the clock. The
        # pooled buffers are of no more use: their heap goes to this.
        self.b.shed_buffers()
        self.b.advance_clock()
        while not self._save_lazy():
            self.store.commit()
        self._save_clock()
        self.store.commit()
        self._release()

    # ------------------------------------------------------------ hooks

    def retained_changed(self, topic, msg):
        old = self.b.retained.peek(topic)
        if msg is None:
            self.lazy.pop(topic, None)
            self._del("r" + topic)
            return True
        if old is not None and _same(old, msg) and topic not in self.lazy:
            return True  # the same value again: nothing to write
        if msg.qos == 0:
            # Nobody was promised anything: written with the next autosave.
            self.lazy[topic] = True
            return True
        if not self._put("r" + topic, _pack(msg)):
            return False  # (a QoS 0 value before it is still to be saved)
        self.lazy.pop(topic, None)
        return True

    def inflight_fits(self, s):
        # Has the batch staged for the next commit room for an in-flight
        # record of s (its key: the client id and a packet identifier; its
        # value under 40 B)? A PUBREC waits, unread, for the commit when
        # not: refused by a full batch, its PUBREL would wait for the
        # client's next connection.
        st = self.store
        return not st.pending or len(s.client_id) + 64 <= st.batch_left()

    def session_fits(self, s, more):
        # Has the batch staged for the next commit room for s's record grown
        # by about `more` bytes? A burst of SUBSCRIBEs stages the record
        # again for each, and past the batch put() refused it: a SUBACK went
        # out for a subscription that was not kept. When not, the packet
        # waits, unread, until the committer has written the batch. An
        # empty batch takes anything put() takes.
        st = self.store
        if not st.pending:
            return True
        n = 96 + more  # the record's fields besides its subscriptions
        for k in s.subs:
            n += 2 * len(k) + 24  # (a shared one: the filter twice, with its group and without)
        return n <= st.batch_left()

    def session_changed(self, s):
        # Stages s's record; False when the store refused it (too large for
        # a batch, or the store is full), so that the change can be taken
        # back rather than acknowledged.
        if not s.expiry:
            return True
        # Each subscription as [filter, options], with its identifier if
        # it has one, and [filter, options, identifier, filter without the
        # share prefix, group] if shared: the filter twice in every entry
        # made a 16-filter record twice as large, on flash at every
        # SUBSCRIBE, connect and disconnect, and in one piece of heap.
        subs = []
        for k, x in s.subs.items():
            if x.group is not None:
                subs.append([k, x.opts, x.subid, x.filter, x.group])
            elif x.subid:
                subs.append([k, x.opts, x.subid])
            else:
                subs.append([k, x.opts])
        d = {"v": s.version, "e": s.expiry, "g": s.gone_at, "u": s.username, "s": subs}
        if s.will is not s.will_stored:
            self._will(s)
        try:
            rec = json.dumps(d).encode()
        except MemoryError:
            # Free, but not in one piece: as _put() does.
            self.b.shed_buffers()
            rec = json.dumps(d).encode()
        if not self._put("s" + s.client_id, rec):
            return False
        s.on_flash = True
        return True

    def _will(self, s):
        # The will's record, as s.will now is: its delay and expiry, then
        # the will as a message record ("r", "m"), written from the message
        # itself.
        key = "w" + s.client_id
        w = s.will
        if w is None:
            self._del(key)
            s.will_stored = None
            return
        out = bytearray()
        _varints(out, s.will_delay, 0 if s.will_expiry is None else s.will_expiry + 1)
        h, pl = _pack(w)
        if self._put(key, (bytes(out) + h, pl)):
            s.will_stored = w

    def will_gone(self, s):
        # s's will went out (Broker.publish_will): a restore must not
        # publish it again.
        if s.will_stored is not None:
            self._will(s)

    def will_cancelled(self, s):
        # A new connection cancels s's delayed will (handle_connect.py):
        # its record goes. Staged while s still has the will, so that no
        # heap to stage it leaves s as it was, not the will forgotten in
        # RAM and still on flash.
        self._del("w" + s.client_id)
        s.will_stored = None

    def session_ended(self, s):
        # Each record's delete is marked done as it is staged, and the
        # session's own record goes last: after a MemoryError part way
        # (session_expiry.py), a second call goes on where this one
        # stopped.
        cid = s.client_id
        self.will_gone(s)
        q = s.queue
        for i in range(1, len(q), 2):
            inf = q[i]
            if stored_of(inf):
                # Not on flash any more (a resumed session kept only for
                # the connection ends its records here and goes on). Made
                # before the delete: a MemoryError between them would
                # have a second call unref the message twice.
                now = info(qos_of(inf), retain_of(inf), seq_of(inf), subids_of(inf))
                self.dequeued(s, q[i - 1], seq_of(inf))
                q[i] = now
        for pid in s.inflight:
            self.acked(s, pid, s.inflight[pid])  # (deletes what is on flash)
        # A session that never had a record (expiry 0 from the start, a
        # clean client) has none of "s" or "x" to delete: no commit for it.
        if s.on_flash:
            for pid in s.qos2_in:
                self._del("x" + cid + "\0" + str(pid))
            self._del("s" + cid)
            s.on_flash = False

    def _ref(self, msg):
        # One more record refers to msg: it is stored once, on first use.
        if not msg.mid:
            mid = self.mid + 1
            if not self._put("m" + str(mid), _pack(msg)):
                return False
            self.mid = msg.mid = mid
        msg.refs += 1
        return True

    def _unref(self, msg):
        # All or nothing: a MemoryError staging the delete leaves refs as
        # they were, so a caller that tries again (session_ended) does not
        # count one reference off twice and delete a record still in use.
        if msg.refs <= 1 and msg.mid:
            if not self.partial:
                # (After a restore that stopped part way, queues not
                # restored may refer to it: the next whole one deletes it.)
                self._del("m" + str(msg.mid))
            msg.mid = 0
            msg.refs = 0
        else:
            msg.refs -= 1

    def queued(self, s, msg, seq, qos, retain, subids):
        # A QoS 1/2 delivery just appended to s.queue with this seq; False
        # when the store refused its record.
        if not self._ref(msg):
            return False
        out = bytearray()
        out.append(qos | (4 if retain else 0))
        _varints(out, msg.mid, *(subids or ()))
        if not self._put("q" + s.client_id + "\0" + str(seq), out):
            self._unref(msg)
            return False
        return True

    def dequeued(self, s, msg, seq):
        # A stored queue entry that will never be sent (expired, too big).
        self._del("q" + s.client_id + "\0" + str(seq))
        self._unref(msg)

    def _inflight_record(self, s, pid, d, lost=True):
        out = bytearray()
        out.append(d.state)
        out.append(d.qos | (4 if d.retain else 0))
        _varints(out, d.seq, d.msg.mid, *(d.subids or ()))
        return self._put("i" + s.client_id + "\0" + str(pid), out, lost)

    def sent(self, s, pid, d, queued_seq):
        # d goes out as pid: an in-flight record takes over the reference to
        # the message from its queue record (queued_seq, if it has one).
        # False when the store has no room for it: a queue record then
        # stays and stands for it (d.queued), and a power cut sends the
        # message again as queued. Its delete came first, and a full store
        # lost acknowledged messages that way.
        if not queued_seq and not self._ref(d.msg):
            return False
        # (A QoS 2 message refused so waits and is tried again: each try
        # was logged and counted as a record dropped while nothing was.)
        if self._inflight_record(s, pid, d, not queued_seq):
            d.stored = True
            if queued_seq:
                self._del("q" + s.client_id + "\0" + str(queued_seq))
            return True
        if queued_seq:
            d.queued = queued_seq
        else:
            self._unref(d.msg)
        return False

    def released(self, s, pid, d):
        # False when d's record could not be rewritten (the store is full).
        return self._inflight_record(s, pid, d) if d.stored else True

    def acked(self, s, pid, d):
        if d.stored:
            self._del("i" + s.client_id + "\0" + str(pid))
            d.stored = False
            self._unref(d.msg)
        elif d.queued:
            self.dequeued(s, d.msg, d.queued)
            d.queued = 0

    def qos2_received(self, s, pid, reason):
        self._put("x" + s.client_id + "\0" + str(pid), bytes((reason,)) if reason else b"")

    def qos2_released(self, s, pid):
        self._del("x" + s.client_id + "\0" + str(pid))

    def sys_values(self):
        st = self.store.stats
        return [
            ("store/bytes written", st.get("bytes_written", 0)),
            ("store/commits", st.get("commits", 0)),
            # Counted from what the store wrote, with the measured cost of
            # each kind of write on the board's LittleFS (docs/store.md): an
            # estimate on a board, counted erases on the simulated flash.
            ("store/block erases estimated", "%.1f" % st.get("block_writes", 0)),
            ("store/bytes used", self.store.used_bytes),
            ("store/records dropped", st.get("records_dropped", 0) + self.failed),
            ("store/commit failing", 1 if self.failing else 0),
        ]
