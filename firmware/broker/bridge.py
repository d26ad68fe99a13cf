# Bridges: the gateway connects out to upstream brokers as an MQTT client
# (Mosquitto's `connection` sections; config key "bridges", checked by
# config._check_bridges). Per bridge one supervisor task connects, fails
# over and backs off; while a link is up a reader and a writer task serve
# it on a raw non-blocking socket, as Connection does for clients.
# docs/bridge.md has example configs and the reasons behind the choices.
#
#   out  Local messages matching an out/both pattern reach tap() through the
#        broker's taps and go upstream with the remote prefix. A QoS 1/2
#        message that cannot go out at once is kept in the store (key "b"
#        name \0 seq) until the upstream acknowledges it: store-and-forward,
#        at most max_queued messages, surviving a restart. RAM holds only the
#        head of that queue; the rest waits on flash.
#   in   The bridge subscribes upstream to in/both patterns and routes what
#        arrives with itself as origin. Its QoS 1/2 acknowledgements wait for
#        the store commit, through Persist.hold(), as a client's do.
#   loops  A message the bridge routed is never sent back out (origin check
#        in tap()). Upstream, v5 subscriptions carry No Local; 3.1.1 connects
#        with Mosquitto's bridge protocol level (0x84, try_private), which
#        Mosquitto and EMQX answer with the same no-echo rule; if the
#        upstream refuses it we reconnect as plain 3.1.1 and drop echoes of
#        what we just sent ourselves.
import asyncio
import gc
import random
import socket
import time
from asyncio import core
from binascii import crc32
from micropython import const
from mqtt import props as P
from mqtt import wire
from mqtt.errors import MQTTError
from mqtt.packets import (frame, check_flags, decode, decode_ack, decode_publish, encode, encode_publish,
                          Connect, Subscribe)
from mqtt.topic import matches
from broker import log
from broker.message import Message
from broker.outbuf import Output
from broker.transport import TcpTransport

_PUBLISH = const(3)
_PUBACK = const(4)
_PUBREC = const(5)
_PUBREL = const(6)
_PUBCOMP = const(7)
_SUBACK = const(9)
_UNSUBACK = const(11)
_PINGRESP = const(13)
_DISCONNECT = const(14)
_SENT = const(1)
_RELEASED = const(2)
_BIG = const(268435455)
_NEVER = 0xFFFFFFFF
# The head of the outbound queue kept in RAM while the rest waits on flash:
# enough to keep a full in-flight window moving, small enough for an ESP32.
_RAM_MSGS = const(24)
_RAM_BYTES = const(4096)
_ECHOES = const(16)  # messages remembered for the plain 3.1.1 echo check
_CONNECT_MS = const(10000)  # TCP, TLS and CONNACK together
_TICK_MS = const(1000)


def _pack(rtb, msg, qos):
    # Flash record of an outbound message, already in its upstream form:
    # qos, retain, expires (u32, 0 = never), remote topic, properties, payload.
    out = bytearray()
    out.append(qos)
    out.append(1 if msg.retain else 0)
    wire.put_u32(out, int(msg.expires) if msg.expires is not None else 0)
    wire.put_str(out, rtb)
    out.extend(P.encode(msg.props))
    out.extend(msg.payload)
    return out


def _unpack(b):
    n = len(b)
    exp, off = wire.get_u32(b, 2, n)
    topic, off = wire.get_str(b, off, n)
    pr, off = P.decode(b, off, n, _PUBLISH)
    m = Message(topic, bytes(b[off:]), b[0], bool(b[1]), pr)
    if exp:
        m.expires = exp
    return m


def _hostname(cfg, name):
    # The board layer has set the host name by now (board.check_net picks
    # "mqtt-" + chip id bytes when the config gives none); the unix port has
    # no network module and falls back to the bridge's name.
    net = cfg.get("network")
    h = net.get("hostname") if isinstance(net, dict) else None
    if h:
        return h
    try:
        import network

        return network.hostname()
    except Exception:
        return name


class _Link(Output):
    # One connection to the upstream: transport, buffers, its two tasks.
    # Persist.hold() may keep it after it is gone; `closing` then tells the
    # committer not to send. Defaults live on the class (smaller instances).
    closing = False
    pos = 0
    have = 0
    reader = None
    writer = None
    present = False  # the upstream kept our session
    max_out = _BIG  # upstream's Maximum Packet Size
    max_qos = 2
    retain_ok = True
    echo = False  # plain 3.1.1: drop echoes of our own messages
    keepalive = None  # the upstream's Server Keep Alive (v5), if it set one

    def __init__(self, br, t, version):
        b = br.b
        self.t = t
        self.version = version
        self.wpool = b.wpool
        self.obuf = b.wpool.get()  # obuf, olen, big, tail: see outbuf.py
        self.rbuf = b.rpool.get()
        self.rmv = memoryview(self.rbuf)
        self.maxp = b.cfg["max_packet_size"]
        self.wake = asyncio.Event()
        self.dead = asyncio.Event()
        self.last_rx = self.last_tx = self.pinged = time.ticks_ms()
        self.send_max = b.cfg["max_inflight_messages"]

    def pool(self):
        return self.wpool

    def close_soon(self):
        self.closing = True
        self.dead.set()
        self.wake.set()

    async def packet(self):
        # The next whole packet as (first byte, buffer, body start, body end).
        # The view stays valid until the next call.
        buf = self.rbuf
        mv = self.rmv
        while True:
            pos = self.pos
            have = self.have
            r = frame(buf, pos, have, self.maxp)
            if r is not None:
                h, n = r
                total = h + n
                if pos + total <= have:
                    self.pos = pos + total
                    return buf[pos], mv, pos + h, pos + total
                if total > len(buf):
                    return await self._big(pos, have, h, total)
            if pos:
                rest = have - pos
                if rest:
                    buf[0:rest] = mv[pos:have]
                self.pos = 0
                self.have = have = rest
            n = await self.t.recv_into(mv[have:])
            if not n:
                raise OSError(104)  # closed by the upstream
            self.have = have + n
            self.last_rx = time.ticks_ms()

    async def _big(self, pos, have, h, total):
        # A packet larger than the read buffer gets a buffer of its own.
        big = bytearray(total)
        bmv = memoryview(big)
        got = have - pos
        big[0:got] = self.rmv[pos:have]
        while got < total:
            n = await self.t.recv_into(bmv[got:])
            if not n:
                raise OSError(104)
            got += n
        self.pos = self.have = 0
        self.last_rx = time.ticks_ms()
        return big[0], bmv, h, total

    def release(self, b):
        self.closing = True
        for task in (self.reader, self.writer):
            if task is not None and task is not asyncio.current_task():
                try:
                    task.cancel()
                except Exception:
                    pass
        self.t.close()
        if self.obuf is not None:
            b.wpool.put(self.obuf)
            b.rpool.put(self.rbuf)
            self.obuf = self.rbuf = self.rmv = None


class Bridge:
    def __init__(self, b, c):
        self.b = b
        self.c = c
        self.name = c["name"]
        self.p = b.persist
        self.kp = "b" + self.name + "\0"
        self.addrs = c["addresses"]
        self.v5 = c["protocol_version"] == 5
        self.private = c["try_private"] and not self.v5
        self.cid = c["clientid"] or "%s.%s" % (_hostname(b.cfg, self.name), self.name)
        self.state_topic = "$SYS/broker/connection/%s/state" % self.name
        # Upstream the state topic names the client id: gateways of a fleet
        # share bridge names, their client ids differ (Mosquitto's default).
        self.up_state = "$SYS/broker/connection/%s/state" % self.cid
        self.outs = []  # (local filter, qos, local prefix, remote prefix)
        self.ins = []  # (remote filter, qos, local prefix, remote prefix)
        for pat, d, q, lp, rp in c["topics"]:
            if d != "in":
                self.outs.append((lp + pat, q, lp, rp))
            if d != "out":
                self.ins.append((rp + pat, q, lp, rp))
        self.min_heap = b.cfg["min_free_heap"]
        # Outbound queue. q: RAM head, entries [seq or None (QoS 0), msg,
        # qos, remote topic bytes, on flash]. Stored messages with seq in
        # [spill_lo, seq) are on flash only, newer than everything in q.
        self.q = []
        self.ram_bytes = 0
        self.seq = 0
        self.spill_lo = 0
        self.nstored = 0  # QoS 1/2 messages not yet acknowledged upstream
        self.inflight = {}  # pid -> queue entry + [state]; seq None: our state notice
        self.qos2_in = {}  # pid -> True: QoS 2 routed, PUBREL pending
        self.pid = random.getrandbits(16) or 1  # see docs/bridge.md, restarts
        self.echoes = []  # (remote topic, crc32 of payload) just sent
        self.link = None
        self.subscribed = False
        self._last = None
        self.ctx = None
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self.connects = 0

    # ------------------------------------------------------------ store

    # The store module is loaded whenever persistence is on, and these run
    # only then: importing StoreFull here spares a bridge without
    # persistence the module.
    def _put(self, key, val):
        from broker.store import StoreFull

        st = self.p.store
        for _ in range(2):
            try:
                st.put(key, val)
                self.p.flag.set()
                return True
            except StoreFull as e:
                if not st.pending():
                    log.warning("bridge %s: store full: %s", self.name, e)
                    return False
                self._commit()
        return False

    def _del(self, key):
        from broker.store import StoreFull

        st = self.p.store
        try:
            st.delete(key)
        except StoreFull:
            # The staged batch is full: commit it now, then stage.
            self._commit()
            st.delete(key)
        self.p.flag.set()

    def _commit(self):
        try:
            self.p.store.commit()
        except Exception as e:
            log.error("bridge %s: store commit failed: %r", self.name, e)
            self.p.failed += 1

    def load(self):
        # After a restart: the messages still waiting for the upstream, the
        # oldest in RAM, the others left on flash; and the QoS 2 packet ids
        # awaiting PUBREL.
        p = self.p
        if p is None:
            return
        try:
            self._load(p.store)
        except MemoryError:
            gc.collect()
            log.error("bridge %s: out of memory restoring its queue; the rest stays on flash", self.name)
        except Exception as e:
            log.error("bridge %s: restoring its queue failed: %r", self.name, e)

    def _load(self, st):
        kp = self.kp
        n = len(kp)
        seqs = []
        for k, v in st.items():
            if k.startswith(kp):
                r = k[n:]
                if r[0] == "p":
                    self.qos2_in[int(r[1:])] = True
                else:
                    seqs.append(int(r))
        if not seqs:
            return
        seqs.sort()
        while len(seqs) > self.c["max_queued"]:
            self._del(kp + str(seqs.pop(0)))
            self.dropped += 1
        self.seq = seqs[-1] + 1
        # RAM takes the first _RAM_MSGS and any gap before the rest, so what
        # stays on flash is one run of sequence numbers [spill_lo, seq).
        k = len(seqs) - 1
        while k > 0 and seqs[k - 1] == seqs[k] - 1:
            k -= 1
        cut = max(min(len(seqs), _RAM_MSGS), k)
        self.spill_lo = seqs[cut] if cut < len(seqs) else self.seq
        want = {}
        for s in seqs[:cut]:
            want[s] = None
        self.nstored = len(seqs)
        seqs = None
        for key, v in st.items():
            if key.startswith(kp) and key[n] != "p":
                s = int(key[n:])
                if s in want:
                    want[s] = v
        for s in sorted(want):
            v = want[s]
            if v is None:
                self.nstored -= 1
                continue
            m = _unpack(v)
            self.q.append([s, m, v[0], m.topic_b, True])
            self.ram_bytes += len(m.payload) + len(m.topic_b)
        log.info("bridge %s: %d messages waiting for the upstream (%d in RAM)", self.name, self.nstored,
                 len(self.q))

    def _refill(self):
        # Moves the oldest flash-only messages into RAM, in order.
        st = self.p.store
        if st.pending():
            self._commit()  # items() shows committed records only
        lo = self.spill_lo
        hi = min(self.seq, lo + _RAM_MSGS - len(self.q))
        if hi <= lo:
            return
        kp = self.kp
        n = len(kp)
        got = {}
        for k, v in st.items():
            if k.startswith(kp) and k[n] != "p":
                s = int(k[n:])
                if lo <= s < hi:
                    got[s] = v
        q = self.q
        for s in range(lo, hi):
            v = got.pop(s, None)
            if v is not None:
                m = _unpack(v)
                size = len(m.payload) + len(m.topic_b)
                if q and self.ram_bytes + size > _RAM_BYTES:
                    break
                q.append([s, m, v[0], m.topic_b, True])
                self.ram_bytes += size
            else:
                self.nstored -= 1  # lost from the store (counted there)
            self.spill_lo = s + 1

    # ------------------------------------------------------------ out

    def tap(self, msg, origin):
        # Called by Broker.route() for each out pattern the topic matches,
        # inside the publisher's handler: it must not raise.
        if origin is self or msg is self._last:
            return
        self._last = msg  # one message matching several patterns goes once
        best = -1
        lp = rp = ""
        t = msg.topic
        for f, q, l, r in self.outs:
            if q > best and matches(f, t):
                best, lp, rp = q, l, r
        if best < 0:
            return
        try:
            self.forward(msg, msg.qos if msg.qos < best else best, (rp + t[len(lp):]).encode())
        except Exception as e:  # MemoryError included
            self.dropped += 1
            log.warning("bridge %s: could not queue %s: %r", self.name, t, e)

    def forward(self, msg, qos, rtb):
        L = self.link
        if not qos:
            # QoS 0 is never stored: sent while the link is up, else dropped.
            if L is None or len(self.q) >= 2 * _RAM_MSGS:
                self.dropped += 1
                return
            self.q.append([None, msg, 0, rtb, False])
            L.wake.set()
            return
        if self.nstored >= self.c["max_queued"]:
            self._drop_oldest()
            if self.nstored >= self.c["max_queued"]:
                self.dropped += 1  # all of them are in flight
                return
        seq = self.seq
        p = self.p
        # A message that can go out at once (link up, nothing waiting before
        # it, room in the in-flight window) stays in RAM: flash is written
        # for it only if the link drops before its acknowledgement.
        direct = (L is not None and not L.closing and not self.q and self.spill_lo == seq
                  and len(self.inflight) < L.send_max)
        flash = p is not None and not direct
        if flash and not self._put(self.kp + str(seq), _pack(rtb, msg, qos)):
            self.dropped += 1
            return
        self.seq = seq + 1
        self.nstored += 1
        size = len(msg.payload) + len(rtb)
        if flash:
            if self.spill_lo < seq or not self._ram_ok(size):
                return  # on flash only, for now
        elif not direct and not self._ram_ok(size):
            self._drop_oldest()  # RAM is all there is
        self.q.append([seq, msg, qos, rtb, flash])
        self.ram_bytes += size
        self.spill_lo = self.seq
        if L is not None:
            L.wake.set()

    def _ram_ok(self, size):
        n = len(self.q)
        if self.p is not None and n and (n >= _RAM_MSGS or self.ram_bytes + size > _RAM_BYTES):
            return False
        # mem_free() walks the heap: ask only now and then.
        return n < 8 or n & 7 or gc.mem_free() >= self.min_heap

    def _drop_oldest(self):
        q = self.q
        for i in range(len(q)):
            e = q[i]
            if e[0] is not None:
                q.pop(i)
                self.ram_bytes -= len(e[1].payload) + len(e[3])
                self._done(e[0], e[4])
                self.dropped += 1
                return
        if self.spill_lo < self.seq:
            self._done(self.spill_lo, True)
            self.spill_lo += 1
            self.dropped += 1

    def _done(self, seq, flash):
        # A QoS 1/2 message is acknowledged, dropped or expired.
        self.nstored -= 1
        if flash:
            self._del(self.kp + str(seq))

    def _next_pid(self):
        p = self.pid
        inf = self.inflight
        while True:
            p = p + 1 if p < 65535 else 1
            if p not in inf:
                self.pid = p
                return p

    def _publish(self, L, msg, qos, rtb, pid, dup, now):
        body = None
        if L.version == 5:
            body = msg.props_body()
            if msg.expires is not None:
                x = bytearray((P.MESSAGE_EXPIRY,))
                wire.put_u32(x, msg.remaining(now))
                body = bytes(x) + body
        return encode_publish(rtb, msg.payload, qos, msg.retain and L.retain_ok, dup, pid, body, L.version)

    def _pump(self, L):
        # Moves queued messages into the link's output while the in-flight
        # window and the buffer allow.
        q = self.q
        now = time.time()
        while not L.closing:
            if len(q) < L.send_max and self.spill_lo < self.seq and self.p is not None:
                self._refill()
            if not q:
                return
            e = q[0]
            seq, msg, qos, rtb, flash = e
            if msg.expires is not None and msg.expired(now):
                q.pop(0)
                if seq is not None:
                    self.ram_bytes -= len(msg.payload) + len(rtb)
                    self._done(seq, flash)
                self.b.stats_expired += 1
                continue
            if qos and len(self.inflight) >= L.send_max:
                return
            sq = qos if qos <= L.max_qos else L.max_qos
            pid = self._next_pid() if sq else 0
            pkt = self._publish(L, msg, sq, rtb, pid, False, now)
            if len(pkt) > L.max_out:
                log.warning("bridge %s: %d byte message on %s is over the upstream's limit; dropped",
                            self.name, len(pkt), msg.topic)
                pid = 0
            elif not L.put(pkt):
                return
            q.pop(0)
            if seq is not None:
                self.ram_bytes -= len(msg.payload) + len(rtb)
            if not pid:
                if seq is not None:
                    self._done(seq, flash)  # sent at QoS 0 (upstream's Maximum QoS), or too big
                if len(pkt) > L.max_out:
                    self.dropped += 1
                    continue
            else:
                e[2] = sq
                e.append(_SENT)  # the queue entry becomes the in-flight entry
                self.inflight[pid] = e
            self.sent += 1
            if L.echo:
                ec = self.echoes
                if len(ec) >= _ECHOES:
                    ec.pop(0)
                ec.append((rtb, crc32(msg.payload)))

    # ------------------------------------------------------------ in

    def _dispatch(self, L, first, mv, off, end):
        t = check_flags(first)
        if t == _PUBLISH:
            self._on_publish(L, first, mv, off, end)
        elif _PUBACK <= t <= _PUBCOMP:
            pid, reason, _ = decode_ack(t, mv, off, end, L.version)
            self._on_ack(L, t, pid, reason)
        elif t == _SUBACK:
            pk = decode(first, mv, off, end, L.version)
            for i in range(len(pk.reasons)):
                if pk.reasons[i] >= 0x80:
                    log.warning("bridge %s: upstream refused subscription %s (0x%02X)", self.name,
                                self.ins[i][0] if i < len(self.ins) else "?", pk.reasons[i])
        elif t == _PINGRESP or t == _UNSUBACK:
            pass
        elif t == _DISCONNECT:
            pk = decode(first, mv, off, end, L.version)
            raise MQTTError(pk.reason, "DISCONNECT from upstream")
        else:
            raise MQTTError(0x82, "packet type %d from the upstream" % t)

    def _on_ack(self, L, t, pid, reason):
        if t == _PUBREL:
            if self.qos2_in.pop(pid, None) is not None and self.p is not None:
                self._del(self.kp + "p" + str(pid))
            L.send(bytes((0x70, 2, pid >> 8, pid & 0xFF)))
            return
        e = self.inflight.get(pid)
        if t == _PUBREC:
            if e is None or e[2] != 2:
                L.send(bytes((0x62, 2, pid >> 8, pid & 0xFF)))
                return
            if reason < 0x80:
                e[5] = _RELEASED
                L.send(bytes((0x62, 2, pid >> 8, pid & 0xFF)))
                return
        elif e is None or (e[2] == 1) != (t == _PUBACK):
            return
        del self.inflight[pid]
        if reason >= 0x80:
            self.dropped += 1
            log.warning("bridge %s: upstream refused %s (0x%02X)", self.name, e[1].topic, reason)
        if e[0] is not None:
            self._done(e[0], e[4])
        L.wake.set()

    def _local_topic(self, topic):
        for f, q, lp, rp in self.ins:
            if matches(f, topic):
                return lp + topic[len(rp):]
        return None

    def _on_publish(self, L, first, mv, off, end):
        b = self.b
        qos = (first >> 1) & 3
        topic, pid, pr, poff = decode_publish(first, mv, off, end, L.version)
        if not topic:
            raise MQTTError(0x82, "PUBLISH without a topic")  # we allow no topic aliases
        if qos == 2 and pid in self.qos2_in:
            self._ack(L, _PUBREC, pid)  # resent; routed already
            return
        lt = self._local_topic(topic)
        if L.echo and lt is not None:
            ec = self.echoes
            k = (topic.encode(), crc32(mv[poff:end]))
            if k in ec:
                ec.remove(k)
                lt = None  # our own message coming back
        if lt is not None:
            msg = Message(lt, bytes(mv[poff:end]), qos, bool(first & 1), pr,
                          pr.get(P.MESSAGE_EXPIRY) if pr is not None else None)
            b.stats_msgs_recv += 1
            self.received += 1
            b.route(msg, self)
        if qos == 1:
            self._ack(L, _PUBACK, pid)
        elif qos == 2:
            self.qos2_in[pid] = True
            if self.p is not None:
                self._put(self.kp + "p" + str(pid), b"")
            self._ack(L, _PUBREC, pid)

    def _ack(self, L, t, pid):
        # Held until the store commit when the message changed what is on
        # flash (a queued copy, a retained message, our QoS 2 record).
        pkt = bytes((t << 4, 2, pid >> 8, pid & 0xFF))
        p = self.p
        if p is not None and p.dirty():
            p.hold(L, pkt)
        else:
            L.send(pkt)

    # ------------------------------------------------------------ link

    def _connect_packet(self, version):
        c = self.c
        pw = c["password"]
        props = None
        if version == 5:
            props = {P.RECEIVE_MAXIMUM: self.b.cfg["max_inflight_messages"],
                     P.MAXIMUM_PACKET_SIZE: self.b.cfg["max_packet_size"]}
            if not c["cleansession"]:
                props[P.SESSION_EXPIRY] = _NEVER
        level = 5 if version == 5 else (0x84 if self.private else 4)
        return encode(Connect(self.cid, level, c["cleansession"], c["keepalive"], c["username"],
                              pw.encode() if pw is not None else None, self.up_state, b"0", 1, True,
                              props=props))

    async def _open(self, host, port):
        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            try:
                s.connect(ai[-1])
            except OSError as e:
                import errno

                if e.args[0] != errno.EINPROGRESS:
                    raise
            yield core._io_queue.queue_write(s)
            try:
                s.setsockopt(6, 1, 1)  # TCP_NODELAY
            except OSError:
                pass
            if self.c["cafile"]:
                if self.ctx is None:
                    import ssl

                    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                    with open(self.c["cafile"], "rb") as f:
                        ctx.load_verify_locations(cadata=f.read())
                    ctx.verify_mode = ssl.CERT_REQUIRED
                    self.ctx = ctx
                s = self.ctx.wrap_socket(s, server_hostname=host, do_handshake_on_connect=False)
        except BaseException:
            s.close()
            raise
        return TcpTransport(s, "%s:%d" % (host, port))

    async def _connect(self, host, port):
        t = await self._open(host, port)
        version = 5 if self.v5 else 4
        L = _Link(self, t, version)
        try:
            await t.send(self._connect_packet(version))
            first, mv, off, end = await L.packet()
            if first >> 4 != 2:
                raise MQTTError(0x82, "expected CONNACK")
            ca = decode(first, mv, off, end, version)
            if ca.reason:
                if self.private and ca.reason == 1:
                    # Not a Mosquitto-style bridge upstream: plain 3.1.1.
                    self.private = False
                    log.info("bridge %s: %s:%d refused the bridge protocol level; using plain 3.1.1",
                             self.name, host, port)
                raise MQTTError(ca.reason, "CONNACK refused")
            L.present = ca.session_present
            pr = ca.props
            if pr:
                rm = pr.get(P.RECEIVE_MAXIMUM)
                if rm and rm < L.send_max:
                    L.send_max = rm
                L.max_out = pr.get(P.MAXIMUM_PACKET_SIZE, _BIG)
                L.max_qos = pr.get(P.MAXIMUM_QOS, 2)
                L.retain_ok = pr.get(P.RETAIN_AVAILABLE, 1) == 1
                ka = pr.get(P.SERVER_KEEP_ALIVE)
                if ka is not None:
                    L.keepalive = ka
            L.echo = version == 4 and not self.private and bool(self.ins) and bool(self.outs)
            return L
        except BaseException:
            L.release(self.b)
            raise

    async def run(self):
        # The supervisor: connect, serve, fail over, back off. Never ends.
        base, cap = self.c["restart_timeout"]
        base = int(base * 1000)
        cap = int(cap * 1000)
        delay = base
        n = len(self.addrs)
        i = random.getrandbits(8) % n
        while True:
            host, port = self.addrs[i]
            L = None
            private = self.private
            try:
                L = await asyncio.wait_for_ms(self._connect(host, port), _CONNECT_MS)
            except Exception as e:
                log.warning("bridge %s: connecting to %s:%d failed: %r", self.name, host, port, e)
            if L is not None:
                try:
                    await self._serve(L, host, port)
                except Exception as e:
                    log.error("bridge %s: %r", self.name, e)
                    self._teardown(L)
                delay = base
                wait = base
                i = (i + 1) % n  # fail over to the next address
            elif private and not self.private:
                wait = 0  # same address again, as plain 3.1.1
            else:
                i = (i + 1) % n
                # Mosquitto's restart_timeout with a cap: "decorrelated
                # jitter", a random wait between base and three times the last.
                hi = delay * 3
                delay = base + (random.getrandbits(30) % (hi - base + 1)) if hi > base else base
                if delay > cap:
                    delay = cap
                wait = delay
            await asyncio.sleep_ms(wait)

    async def _serve(self, L, host, port):
        self.link = L
        self.connects += 1
        log.info("bridge %s: connected to %s:%d as %s (session %s)", self.name, host, port, self.cid,
                 "resumed" if L.present else "new")
        if not L.present and self.qos2_in:
            # The upstream forgot its half of these QoS 2 exchanges: a new
            # message may come under one of their packet ids.
            if self.p is not None:
                for pid in self.qos2_in:
                    self._del(self.kp + "p" + str(pid))
            self.qos2_in = {}
        if self.ins and (L.version == 5 or not L.present or not self.subscribed):
            o = 0x1C if L.version == 5 else 0  # No Local, Retain As Published, Retain Handling 1
            L.send(encode(Subscribe(self._next_pid(), [(f, q | o) for f, q, lp, rp in self.ins]),
                          L.version))
            self.subscribed = True
        self._resume(L)
        pid = self._next_pid()
        m = Message(self.up_state, b"1", 1, True)
        L.send(self._publish(L, m, 1, m.topic_b, pid, False, 0))
        self.inflight[pid] = [None, m, 1, m.topic_b, False, _SENT]
        self._state(b"1")
        L.reader = asyncio.create_task(self._reader(L))
        L.writer = asyncio.create_task(self._writer(L))
        ka = (L.keepalive if L.keepalive is not None else self.c["keepalive"]) * 1000
        while not L.closing:
            try:
                await asyncio.wait_for_ms(L.dead.wait(), _TICK_MS)
            except asyncio.TimeoutError:
                pass
            if L.closing or not ka:
                continue
            now = time.ticks_ms()
            rx = time.ticks_diff(now, L.last_rx)
            if rx > ka + (ka >> 1):
                log.warning("bridge %s: no reply from %s:%d within keep-alive; reconnecting", self.name,
                            host, port)
                break
            if ((rx >= ka or time.ticks_diff(now, L.last_tx) >= ka)
                    and time.ticks_diff(now, L.pinged) >= ka):
                L.send(b"\xc0\x00")  # PINGREQ
                L.last_tx = L.pinged = now
        self._teardown(L)
        log.info("bridge %s: link to %s:%d closed", self.name, host, port)

    def _resume(self, L):
        # Unacknowledged messages go first, with DUP, under their packet
        # ids; a PUBREL again for those the upstream has received (QoS 2).
        inf = self.inflight
        if not inf:
            return
        now = time.time()
        for pid in sorted(inf, key=lambda k: -1 if inf[k][0] is None else inf[k][0]):
            e = inf[pid]
            if e[5] == _RELEASED:
                if L.present:
                    L.send(bytes((0x62, 2, pid >> 8, pid & 0xFF)))
                else:
                    # The upstream got it and then lost its session.
                    del inf[pid]
                    if e[0] is not None:
                        self._done(e[0], e[4])
            else:
                L.send(self._publish(L, e[1], e[2], e[3], pid, True, now))

    def _teardown(self, L):
        if self.link is L:
            self.link = None
        L.release(self.b)
        # QoS 0 messages and our own state notices do not wait for a link.
        q = self.q
        k = 0
        for e in q:
            if e[0] is not None:
                q[k] = e
                k += 1
            else:
                self.dropped += 1
        del q[k:]
        inf = self.inflight
        for pid in [p for p in inf if inf[p][0] is None]:
            del inf[pid]
        # What went out straight from RAM now waits for the next link: on
        # flash, so that a restart meanwhile does not lose it.
        if self.p is not None:
            for e in list(inf.values()) + q:
                if not e[4] and self._put(self.kp + str(e[0]), _pack(e[3], e[1], e[2])):
                    e[4] = True
        self.echoes = []
        self._state(b"0")

    async def _reader(self, L):
        b = self.b
        try:
            while not L.closing:
                first, mv, off, end = await L.packet()
                self._dispatch(L, first, mv, off, end)
                if b.pressure:
                    await b.relieve(None)
                while L.big is not None and not L.closing:
                    await asyncio.sleep_ms(5)  # our output is backed up: stop reading a while
        except asyncio.CancelledError:
            return
        except MemoryError:
            gc.collect()
            log.warning("bridge %s: out of memory reading from the upstream", self.name)
        except Exception as e:
            log.info("bridge %s: read: %r", self.name, e)
        L.close_soon()

    async def _writer(self, L):
        t = L.t
        try:
            while not L.closing:
                await L.wake.wait()
                L.wake.clear()
                while not L.closing:
                    if L.big is None:
                        self._pump(L)
                    if not await L.flush(t):
                        break
                    L.last_tx = time.ticks_ms()
        except asyncio.CancelledError:
            return
        except Exception as e:
            log.info("bridge %s: write: %r", self.name, e)
        L.close_soon()

    def _state(self, v):
        # $SYS/broker/connection/<name>/state, "1" or "0", retained locally.
        m = Message(self.state_topic, v, 0, True)
        self.b.retained.sys[self.state_topic] = m
        self.b.route(m, None, False)

    def sys_values(self, v):
        k = "connection/%s/" % self.name
        v.append((k + "messages/sent", self.sent))
        v.append((k + "messages/received", self.received))
        v.append((k + "messages/dropped", self.dropped))
        v.append((k + "messages/queued", self.nstored))
        v.append((k + "connects", self.connects))


def start_bridges(b):
    # Called by app.start(): one Bridge and one supervisor task per config
    # entry; out patterns become broker taps.
    gc.collect()
    a0 = gc.mem_alloc()
    bridges = []
    for c in b.cfg["bridges"]:
        br = Bridge(b, c)
        br.load()
        seen = []
        for f, q, lp, rp in br.outs:
            if f not in seen:
                seen.append(f)
                b.taps.append((f, br.tap))
        br._state(b"0")
        asyncio.create_task(br.run())
        bridges.append(br)
        log.notice("bridge %s: to %s as %s", br.name, ", ".join("%s:%d" % (h, p) for h, p in br.addrs),
                   br.cid)
    prev = b.sys_extra

    def values():
        v = list(prev()) if prev is not None else []
        for br in bridges:
            br.sys_values(v)
        return v

    b.sys_extra = values
    b.bridges = bridges
    gc.collect()
    log.info("bridges: %d set up, heap %d bytes", len(bridges), gc.mem_alloc() - a0)
    return bridges
