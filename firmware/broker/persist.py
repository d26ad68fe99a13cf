# Broker state on flash, through store.Store (a crash-safe key-value log
# with group commit). What is kept, one record per key:
#   "r" topic               retained message
#   "s" cid                 session: expiry, subscriptions, will (JSON)
#   "q" cid \0 seq          a QoS 1/2 message queued for a session
#   "i" cid \0 pid          an outgoing QoS 1/2 message in flight, and its state
#   "x" cid \0 pid          an incoming QoS 2 packet id awaiting PUBREL
# U+0000 cannot occur in MQTT strings, so it separates key parts safely.
#
# The promise: an acknowledgement (PUBACK, PUBREC) that promises something
# is held back until the change it promises is committed. Changes made
# while handling one batch of packets share one commit.
import asyncio
import gc
import json
import time
import binascii
from mqtt import props as P
from mqtt import wire
from broker import log
from broker.message import Message
from broker.session import Session, SENT, RELEASED
from broker.subs import Sub
from broker.store import Store, StoreFull

_RETRY_MS = 200  # a commit that ran out of heap is tried again after this
_RETRIES = 10  # times, before its batch is given up


def _pack(msg):
    # qos, retain, expires (u32, 0 = never), topic, properties, payload
    out = bytearray()
    out.append(msg.qos)
    out.append(1 if msg.retain else 0)
    wire.put_u32(out, int(msg.expires) if msg.expires is not None else 0)
    wire.put_str(out, msg.topic_b)
    out.extend(P.encode(msg.props))
    out.extend(msg.payload)
    return bytes(out)


def _unpack(b):
    qos = b[0]
    retain = bool(b[1])
    exp, off = wire.get_u32(b, 2, len(b))
    topic, off = wire.get_str(b, off, len(b))
    pr, off = P.decode(b, off, len(b), 3)
    m = Message(topic, bytes(b[off:]), qos, retain, pr)
    if exp:
        m.expires = exp
    return m


def _b64(b):
    return binascii.b2a_base64(b).decode().strip()


class Persist:
    def __init__(self, broker, path, max_bytes):
        self.b = broker
        # index_max bounds the RAM index of keys written since the last
        # compaction (about 64 B each on the 64-bit port; 32 keep its table
        # under 1 KB, which a fragmented heap can still find). inline_max is the
        # board's LittleFS inline file limit (esp32 ~120 B, rp2 ~500 B).
        self.store = Store(path, max_bytes, index_max=32,
                           inline_max=broker.cfg["store_inline_max"])
        self.held = []  # (connection, packet) acks waiting for the commit
        self.flag = asyncio.Event()
        self.seq = 0
        self.failed = 0
        self.report = None

    # ------------------------------------------------------------ start

    def load(self):
        # Restores what the store holds. Running out of heap part way
        # leaves the rest on flash, untouched, and the broker still starts:
        # a boot loop would lose everything.
        gc.collect()
        try:
            self._load()
        except MemoryError:
            # Once more from nothing: what the first try held is garbage
            # now, and a collected heap is less fragmented.
            b = self.b
            b.sessions.clear()
            b.retained.msgs.clear()
            b.subs.__init__()
            gc.collect()
            try:
                self._load()
            except MemoryError:
                gc.collect()
                self.failed += 1
                log.error("store: out of memory while restoring; the rest stays on flash")
        asyncio.create_task(self._committer())

    def _load(self):
        b = self.b
        self.report = self.store.open()
        log.info("store opened: %s", self.report)
        sessions = {}
        queued = []
        inflight = []
        qos2 = []
        retained = 0
        n = 0
        for key, val in self.store.items():
            n += 1
            if n & 15 == 0:
                # What is kept would otherwise be strewn across the heap
                # between the garbage of reading it (see Store.open()).
                gc.collect()
            k = key[0]
            try:
                if k == "r":
                    b.retained.load(_unpack(val))
                    retained += 1
                elif k == "s":
                    sessions[key[1:]] = json.loads(val)
                elif k == "q":
                    cid, seq = key[1:].split("\0")
                    queued.append((int(seq), cid, val))
                elif k == "i":
                    cid, pid = key[1:].split("\0")
                    inflight.append((cid, int(pid), val))
                elif k == "x":
                    cid, pid = key[1:].split("\0")
                    qos2.append((cid, int(pid)))
            except Exception as e:
                log.warning("store: dropped unreadable record %r: %r", key, e)
                self.failed += 1
        now = time.time()
        for cid in sessions:
            d = sessions[cid]
            s = Session(cid)
            s.version = d["v"]
            s.expiry = d["e"]
            s.gone_at = d.get("g") or now
            s.username = d.get("u")
            for full, flt, opts, subid, group in d["s"]:
                sub = Sub(s, flt, opts, subid, group)
                s.subs[full] = sub
                b.subs.add(sub)
            w = d.get("w")
            if w is not None:
                s.will = _unpack(binascii.a2b_base64(w[0]))
                s.will_delay = w[1]
                s.will_at = s.gone_at + min(w[1], s.expiry) if w[1] else now
            b.sessions[cid] = s
        queued.sort()
        lost = 0
        for seq, cid, val in queued:
            n += 1
            if n & 15 == 0:
                gc.collect()
            if seq >= self.seq:
                self.seq = seq + 1
            s = b.sessions.get(cid)
            if s is None:
                self.store.delete("q" + cid + "\0" + str(seq))
                continue
            # Kept even past max_queued_messages (a smaller limit than when
            # they were stored): each was acknowledged to its publisher.
            try:
                s.queue.append([_unpack(val[2:]), val[0], bool(val[1]), None, seq])
            except MemoryError:
                lost += 1
                self.store.delete("q" + cid + "\0" + str(seq))
        if lost:
            self.failed += lost
            log.warning("store: %d queued messages did not fit and were dropped", lost)
        for cid, pid, val in inflight:
            s = b.sessions.get(cid)
            if s is None:
                self.store.delete("i" + cid + "\0" + str(pid))
                continue
            m = _unpack(val[3:])
            s.inflight[pid] = [m, val[0], bool(val[1]), None, val[2]]
        for cid, pid in qos2:
            s = b.sessions.get(cid)
            if s is not None:
                s.qos2_in[pid] = True
        b.retained.on_change = self.retained_changed
        if self.store.pending():
            self.store.commit()
        log.info("restored %d retained, %d sessions, %d queued, %d in flight",
                 retained, len(sessions), len(queued), len(inflight))

    # ------------------------------------------------------------ commit

    def dirty(self):
        return self.store.pending() > 0

    def hold(self, c, pkt, publish=False):
        # publish: a QoS 2 PUBLISH, which pauses c's queue until released.
        if publish:
            c.held += 1
        self.held.append((c, pkt, publish))
        self.flag.set()

    def _put(self, key, val):
        try:
            self.store.put(key, val)
        except StoreFull:
            self.failed += 1
            log.warning("store full: %r not stored", key[:40])
            return False
        self.flag.set()
        return True

    def _del(self, key):
        self.store.delete(key)
        self.flag.set()

    def _give_up(self, e):
        # Nothing held is released: those clients will resend.
        log.error("store commit failed: %r", e)
        self.failed += 1
        for c, _, _ in self.held:
            c.held = 0
            c.close_soon()
        self.held = []

    async def _committer(self):
        short = 0  # commits in a row that ran out of heap
        while True:
            await self.flag.wait()
            self.flag.clear()
            # Let every packet already read be handled first, so that one
            # commit covers them all (group commit).
            await asyncio.sleep_ms(0)
            try:
                if self.store.pending():
                    # A commit (and a compaction) needs a few KB at once;
                    # collect first when the heap is short rather than fail.
                    if gc.mem_free() < 16384:
                        gc.collect()
                    self.store.commit()
            except MemoryError as e:
                # No piece of heap for a compaction: the store kept the
                # batch staged. Try again shortly, the acknowledgements that
                # wait for it still held: a fragmented heap mends as
                # connections end. Not for long, though: what is staged
                # and held keeps heap from the rest of the broker.
                short += 1
                if short <= _RETRIES:
                    if short == 1:
                        log.warning("store commit: out of memory; trying again")
                    await asyncio.sleep_ms(_RETRY_MS)
                    self.flag.set()
                    continue
                short = 0
                self.store.discard()
                self._give_up(e)
                continue
            except Exception as e:
                self._give_up(e)
                continue
            short = 0
            held = self.held
            self.held = []
            for c, pkt, publish in held:
                if publish:
                    c.held -= 1
                if c.closing:
                    continue
                try:
                    if type(pkt) is tuple:
                        c.send_split(pkt[0], pkt[1])  # a large PUBLISH: head, payload
                    else:
                        c.send(pkt)  # also wakes its writer for what waited
                except MemoryError:
                    # This task must not die: the client sends again (QoS
                    # 1/2 stays in flight on both sides).
                    gc.collect()
                    c.close_soon()

    # ------------------------------------------------------------ hooks

    def retained_changed(self, topic, msg):
        if msg is None:
            self._del("r" + topic)
            return True
        return self._put("r" + topic, _pack(msg))

    def session_changed(self, s):
        if not s.expiry:
            return
        d = {"v": s.version, "e": s.expiry, "g": s.gone_at, "u": s.username,
             "s": [[k, x.filter, x.opts, x.subid, x.group] for k, x in s.subs.items()]}
        if s.will is not None:
            d["w"] = [_b64(_pack(s.will)), s.will_delay]
        self._put("s" + s.client_id, json.dumps(d).encode())

    def session_ended(self, s):
        cid = s.client_id
        self._del("s" + cid)
        for e in s.queue:
            if len(e) > 4:
                self._del("q" + cid + "\0" + str(e[4]))
        for pid in s.inflight:
            self._del("i" + cid + "\0" + str(pid))
        for pid in s.qos2_in:
            self._del("x" + cid + "\0" + str(pid))

    def queued(self, s, msg, qos, retain, subids):
        # The entry just appended to s.queue gets a sequence number.
        e = s.queue[-1]
        seq = self.seq
        self.seq += 1
        e.append(seq)
        self._put("q" + s.client_id + "\0" + str(seq), bytes((qos, 1 if retain else 0)) + _pack(msg))

    def dequeued(self, s, e):
        if len(e) > 4:
            self._del("q" + s.client_id + "\0" + str(e[4]))

    def sent(self, s, pid, e):
        # Queue entry e went out as pid: its record moves to in-flight.
        self.dequeued(s, e)
        self._put("i" + s.client_id + "\0" + str(pid), bytes((e[1], 1 if e[2] else 0, SENT)) + _pack(e[0]))

    def released(self, s, pid):
        e = s.inflight.get(pid)
        if e is not None:
            self._put("i" + s.client_id + "\0" + str(pid), bytes((e[1], 1 if e[2] else 0, RELEASED)) + _pack(e[0]))

    def acked(self, s, pid):
        self._del("i" + s.client_id + "\0" + str(pid))

    def qos2_received(self, s, pid):
        self._put("x" + s.client_id + "\0" + str(pid), b"")

    def qos2_released(self, s, pid):
        self._del("x" + s.client_id + "\0" + str(pid))

    def sys_values(self):
        st = self.store.stats
        return [
            ("store/bytes written", st.get("bytes_written", 0)),
            ("store/block writes", st.get("block_writes", 0)),
            ("store/commits", st.get("commits", 0)),
            ("store/bytes used", self.store.used_bytes()),
            ("store/records dropped", st.get("records_dropped", 0) + self.failed),
        ]
