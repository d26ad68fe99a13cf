"""Capacity, measured on the board twin: how many retained topics, offline
sessions, queued messages and live clients fit in each board's heap.

    make capacity                       (make memreport runs it too)
    .venv/bin/python tools/bench/capacity.py [--boards esp32,pico_w] [--out docs/capacity.json] [--no-docs]
    .venv/bin/python tools/bench/capacity.py --docs-only

Each measurement starts the broker afresh on the twin (tools/twin.py) at the
board profile's `heap`, with its shipped config as host_tests/brokerproc.py
runs it (persistence on, clients logging in from a password file, each from
a loopback address of its own, the connection-rate limit on), sys_interval
1, and the limit under test raised to its configurable maximum, so that the
heap, not the limit, stops it. A watcher client subscribed to $SYS/broker/#
is connected throughout (it counts as a live client). Items go in until the
broker refuses one:

  retained topics   site/sensor/NNN/temp with 4-byte values (issue 18's hub),
                    retained QoS 1 from a 5.0 client, one at a time (each
                    waits for its PUBACK), until a PUBACK says 0x80 or more
                    (heap.py's message floor, min_free_heap, or the store
                    full) or the connection is closed. Count: $SYS retained
                    messages/count. Then every one is deleted (an empty
                    retained PUBLISH) and one more is published.
  offline sessions  5.0 clients with Session Expiry 3600 and one QoS 1
                    subscription to alerts/#, each leaving with DISCONNECT,
                    until a CONNECT or SUBSCRIBE is refused, a socket is
                    closed unanswered, or a full table evicts a session
                    ($SYS clients/evicted, "evicting" in the log). Count: $SYS
                    clients/total less clients/connected.
  queued messages   one such offline session; 16-byte QoS 1 alerts for it
                    until a PUBACK says 0x80 or more. Count: the PUBACKs
                    0x00. Then the session comes back (again, while each
                    return brings more, up to 5 times) and must get each
                    of them.
  live clients      idle 5.0 clients (keepalive 0), once with the shipped
                    max_connections and once with max_connections and
                    max_sessions raised (what the heap alone allows; each
                    client has a session), until one is refused. Count: $SYS
                    clients/connected, the watcher included (bytes each:
                    over the others). Then they all leave and one more
                    must get in.

What stopped each is the broker's own answer: the reason code (and 5.0
reason string) and its log line ("refused ...", "store full", "evicting").
A refusal in a PUBACK or CONNACK, or a socket closed before CONNACK, is
tried again once after a second; the second in a row ends the fill. A fill also ends after STEP_SECONDS. Heap used and free are
$SYS/broker/heap/used and /free (after a collection), read at the start and
at the stop; bytes per item is their difference over the items added.
Nothing is estimated or scaled. Warnings, errors, MemoryErrors and
tracebacks in the broker's log are recorded with each measurement, and so is
how the broker ended: a broker that dies (or closes the watcher) ends its
measurement, marked "failed", and the next one starts. Each broker's log is
kept in build/capacity/<board>-<measurement>.log.

Results go to docs/capacity.json; tools/bench/capdocs.py writes the
capacity section of docs/memory.md from it (--no-docs: leave it). By
default the boards of capdocs.MEASURED are measured (about 3 minutes); a
partial run keeps the other boards' last results.
"""
import json
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "lib"), str(REPO / "host_tests")]
from brokerproc import BrokerProc, profile as board_profile  # noqa: E402
from mqtt.packets import NAMES  # noqa: E402
from mqttc import Client, Closed, Disconnect, DISCONNECT, PUBLISH, SESSION_EXPIRY, REASON_STRING  # noqa: E402
import memreport  # noqa: E402
from memreport import _commit, _now  # noqa: E402
import capdocs  # noqa: E402

OUT = REPO / "docs" / "capacity.json"
LOGS = REPO / "build" / "capacity"  # each measurement's broker log, kept
CMD = "make capacity"
STEP_SECONDS = 100  # a measurement that runs longer stops, "time limit"
EXPIRY = 3600  # Session Expiry of the offline sessions
# The configurable maximum of each limit (firmware/broker/config.py; for
# max_queued_bytes, 0: no bound).
RAISED = {"max_retained_messages": 100000, "max_retained_bytes": (1 << 30) - 1, "max_sessions": 10000,
          "max_queued_messages": 100000, "max_queued_bytes": 0, "max_connections": 1000}
# $SYS values not worth keeping with a measurement's stop.
_SYS_SKIP = {"version", "uptime", "loop/longest stall ms", "bytes/received", "bytes/sent"}
# Log lines worth keeping with a measurement, and those that are a problem.
_NOTE = re.compile(r"^[WE] ")
_PROBLEM = re.compile(r"MemoryError|Traceback|out of memory|^E ")


class WatcherGone(RuntimeError):
    pass


class SysWatch:
    """A client subscribed to $SYS/broker/#, read by a thread of its own:
    the latest value the broker published under each name."""

    def __init__(self, port):
        self.c = Client(port, "capacity-watch", version=5, keepalive=0)
        self.v = {}
        self.n = 0  # heap/used values received
        self.gone = False
        self.cv = threading.Condition()
        self.c.subscribe([("$SYS/broker/#", 0)])
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.gone:
            try:
                p = self.c.poll(0.2)
            except (AssertionError, OSError):  # closed, or a packet mqttc cannot read
                p = None
                self.gone = True
            with self.cv:
                if p is not None and p.type == PUBLISH:
                    name = p.topic[len("$SYS/broker/"):]
                    self.v[name] = bytes(p.payload).decode()
                    if name == "heap/used":
                        self.n += 1
                self.cv.notify_all()

    def now(self):
        # The broker's values as of this call. It publishes each second
        # what changed, heap/used near the end: the second heap value after
        # the call was taken after it; with none for 3.5 s the heap has not
        # changed, and what came last still holds.
        with self.cv:
            n0 = self.n
            self.cv.wait_for(lambda: self.n >= n0 + 2 or self.gone, timeout=3.5)
            if self.gone:
                raise WatcherGone("the broker closed the $SYS watcher's connection")
            return dict(self.v)

    def latest(self, name):
        with self.cv:
            return int(self.v.get(name, 0))

    def close(self):
        self.gone = True
        self.t.join()
        self.c.close()


class LogTail:
    """The broker's log lines written since the last call."""

    def __init__(self, b):
        self.path = b.logpath
        self.off = 0

    def new(self):
        with open(self.path, "rb") as f:
            f.seek(self.off)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits
        self.off += end
        return data[:end].decode(errors="replace").splitlines()


def _heap(v):
    return {"used": int(v["heap/used"]), "free": int(v["heap/free"])}


def _answer(p):
    # A refusal as the broker gave it: packet, reason code, reason string.
    why = (p.props or {}).get(REASON_STRING)
    return "%s 0x%02X" % (NAMES[p.type], p.reason) + (" (%s)" % why if why else "")


def _closed(got):
    # A connection the broker closed: its DISCONNECT among the packets got
    # last, if it sent one.
    d = [p for p in got if p.type == DISCONNECT]
    return _answer(d[0]) if d else "connection closed"


def _lost(e, c):
    # What a connection that failed under a client (c, or None before its
    # CONNACK) tells of the broker: closed (with its DISCONNECT, if any),
    # or no answer in time (mqttc says which packet it waited for).
    if isinstance(e, socket.timeout) or not isinstance(e, (Closed, OSError)):
        return "no answer: %s" % (e or "timed out")
    return _closed(c.stash) if c else "closed before CONNACK"


def _uncaught(lines):
    # An exception that ended one of the broker's tasks: "uncaught
    # MemoryError in accept_loop", or None.
    task = re.compile(r"coro= <generator object '(\w+)'")
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            m = task.search(lines[i - 1]) if i else None
            end = next((x for x in lines[i + 1:] if not x.startswith(" ")), "?")
            return "uncaught %s in %s" % (end.split(":")[0], m.group(1) if m else "the broker")
    return None


def _refused_by(lines):
    # The limit a refusal came from, by the broker's last log line about
    # one (an uncaught exception first: what came after it is its doing).
    why = _uncaught(lines)
    if why:
        return why
    for line in reversed(lines):
        if "store full" in line:
            return "store (store_max_bytes)"
        if "heap low: evicting" in line:
            return "heap (min_free_heap / 2: evicts the oldest offline session)"
        if "evicting" in line:
            return "max_sessions (evicts the oldest offline session)"
        if "refused" in line or "out of memory" in line:
            if "too many connections" in line or "too many sockets" in line:
                return "max_connections"
            if "session table full" in line:
                return "max_sessions"
            if "low memory" in line:
                return "heap (min_free_heap / 2)"
            if "out of memory" in line:
                return "MemoryError in the broker"
    return None


class Step:
    """One measurement on a broker of its own: the watcher, the log, the
    clock, and the record it fills."""

    def __init__(self, board, name, raised):
        self.board = board
        self.name = name
        self.rec = {"raised": raised}
        self.b = BrokerProc(board=board, config=dict(raised, sys_interval=1))

    def __enter__(self):
        self.w = None
        self.t0 = time.time()
        try:
            self.b.start()
            self.tail = LogTail(self.b)
            self.w = SysWatch(self.b.port)
            self.rec["start"] = _heap(self.w.now())
        except BaseException:
            self._end()
            raise
        self.t0 = time.time()
        self.deadline = self.t0 + STEP_SECONDS
        return self

    def client(self, cid, **kw):
        # A 5.0 client as the test user; a refusal in its CONNACK is the
        # caller's to read.
        return Client(self.b.port, cid, version=5, keepalive=0, expect_ok=False, **kw)

    def fill(self, add):
        # add(i) puts item i into the broker: None when it was taken, else
        # (the broker's answer, final). A refusal that is not final is
        # tried again once the broker has had a second to give back what
        # it holds only for a while (an output buffer stays with a busy
        # connection until the next second's housekeeping: a burst of new
        # clients is refused before the heap is full of idle ones); the
        # second refusal in a row ends the fill. -> items taken.
        n, again = 0, False
        while time.time() < self.deadline:
            r = add(n)
            if r is None:
                n += 1
                self.rec["taken"] = n  # so far: what a broker that dies leaves
                again = False
                continue
            self.rec.setdefault("first_refused_at", n)
            self.rec["refusals"] = self.rec.get("refusals", 0) + 1
            if r[1] or again:
                self.rec["refusal"] = r[0]
                return n
            self.w.now()
            again = True
        self.rec["refusal"] = None
        return n

    def stopped(self, by=None):
        # The $SYS values at the stop, and the limit that stopped the fill:
        # `by`, or what the broker's log says of the refusal.
        v = self.w.now()
        self.rec["stop"] = _heap(v)
        self.rec["sys_at_stop"] = {k: v[k] for k in sorted(v) if k not in _SYS_SKIP}
        what = self.rec["refusal"]
        self.rec["stopped_by"] = by or _refused_by(self.tail.new()) or (
            "time limit (%d s)" % STEP_SECONDS if what is None else "not told (%s)" % what)
        return v

    def count(self, n, before=0):
        # n counted at the stop, `before` of them there at the start.
        r = self.rec
        r["count"] = n
        r["per_item"] = round((r["stop"]["used"] - r["start"]["used"]) / (n - before)) if n > before else None

    def __exit__(self, kind, exc, tb):
        self._end()
        if isinstance(exc, WatcherGone):
            # The broker ended the watcher's connection, or died: what was
            # measured so far stays, marked.
            self.rec["failed"] = self.rec["broker_exit"] if self.died else str(exc)
            return True
        return False

    def _end(self):
        # Stops the watcher and the broker, keeps the log, and records
        # what the log says and how the broker ended.
        self.rec["seconds"] = round(time.time() - self.t0, 1)
        self.died = died = self.b.proc is not None and not self.b.alive()
        try:
            if self.w is not None:
                self.w.close()
        finally:
            self.b.stop()
        log = self.b.log()
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / ("%s-%s.log" % (self.board, self.name))).write_text(log)
        notes = [x for x in log.splitlines() if _NOTE.match(x)]
        self.rec["log_warnings"] = notes[:12] + (["... %d more" % (len(notes) - 12)] if len(notes) > 12 else [])
        self.rec["problems"] = [x for x in log.splitlines() if _PROBLEM.search(x)][:20]
        code = self.b.proc.returncode if self.b.proc is not None else None
        if died:
            self.rec["broker_exit"] = "the broker died: %s" % (
                signal.Signals(-code).name if code is not None and code < 0 else "exit code %s" % code)
        else:
            self.rec["broker_exit"] = "stopped by Ctrl-C, exit code %s" % code
        self.b.tmp.cleanup()


def _publisher(st, cid, topic, payload, retain, taken):
    # add() for Step.fill: QoS 1 PUBLISHes from one 5.0 client, one at a
    # time (a sensor's value waits for its PUBACK); the indexes acknowledged
    # with 0x00 go to `taken`. A closed connection is final.
    c = [st.client(cid)]

    def add(i):
        try:
            a = c[0].publish(topic(i), payload(i), qos=1, retain=retain)
        except (AssertionError, OSError) as e:
            return _lost(e, c[0]), True
        if a.reason >= 0x80:
            return _answer(a), False
        taken.append(i)
        return None

    return add, c


def _publish_stop(st, pc):
    # What stopped a publish fill, from the broker's counters. A 5.0 QoS 1
    # PUBLISH refused before it is read (messages/received does not count
    # it: handle_publish.py's admission) met the heap's message floor
    # (min_free_heap, heap.py) or a failing store; one refused after it was
    # routed met the store's limit (store/records dropped), the retained
    # limit (retained messages/dropped) or a queue that could not take it,
    # here only a MemoryError that route.deliver caught (the queue's limit
    # is raised), which it does not log. A DISCONNECT means a MemoryError
    # reached the publisher's connection.
    v = st.w.now()
    what = st.rec["refusal"] or ""
    by = None
    routed = int(v["messages/received"]) - st.rec.get("taken", 0)
    if what.startswith("PUBACK") and routed < st.rec["refusals"]:
        by = "store (commit failing)" if v.get("store/commit failing") == "1" else "heap (min_free_heap)"
    elif what.startswith("PUBACK"):
        if int(v.get("store/records dropped", 0)):
            by = "store (store_max_bytes)"
        elif int(v["retained messages/dropped"]):
            by = "max_retained_messages"
        else:
            by = "MemoryError while queueing (caught, not logged)"
    elif what.startswith("DISCONNECT"):
        by = "MemoryError in the broker"
    return st.stopped(by)


def measure_retained(board, pc):
    raised = {"max_retained_messages": RAISED["max_retained_messages"]}
    with Step(board, "retained", raised) as st:
        topic = "site/sensor/%03d/temp".__mod__
        ok = []
        add, pub = _publisher(st, "capacity-pub", topic, lambda i: b"21.%d" % (i % 10), True, ok)
        st.fill(add)
        pub[0].close()
        v = _publish_stop(st, pc)
        st.count(int(v["retained messages/count"]))
        st.rec["acknowledged"] = len(ok)
        st.rec["retained_dropped"] = int(v["retained messages/dropped"])
        # Taken back: every value deleted (an empty retained PUBLISH), then
        # a value on a new topic.
        n = len(ok)
        gone = []
        add, pub = _publisher(st, "capacity-del", lambda i: topic(ok[i]) if i < n else "site/sensor/new/temp",
                              lambda i: b"" if i < n else b"21.5", True, gone)
        refused = None
        st.deadline = time.time() + STEP_SECONDS
        while len(gone) < n and refused is None and time.time() < st.deadline:
            refused = add(len(gone))
        deleted = len(gone)
        new = add(n) if refused is None else refused
        pub[0].close()
        v = st.w.now()
        st.rec["after_removal"] = dict(_heap(v), deleted=deleted, delete_refused=refused and refused[0],
                                       left=int(v["retained messages/count"]), new_one=new and new[0] or "taken")
    return st.rec


def _session(st, cid):
    # An offline session: CONNECT with Session Expiry, SUBSCRIBE alerts/#
    # at QoS 1, DISCONNECT. -> None, or what the broker refused.
    try:
        c = st.client(cid, props={SESSION_EXPIRY: EXPIRY})
    except (AssertionError, OSError) as e:
        return _lost(e, None)
    try:
        if c.connack.reason:
            return _answer(c.connack)
        r = c.subscribe([("alerts/#", 1)])[0]
        if r >= 0x80:
            return "SUBACK 0x%02X" % r
        c.send(Disconnect())
    except (AssertionError, OSError) as e:
        return _lost(e, c)
    finally:
        c.close()
    return None


def measure_sessions(board, pc):
    raised = {"max_sessions": RAISED["max_sessions"]}
    with Step(board, "sessions", raised) as st:
        seen = []

        def add(i):
            if i % 16 == 0:
                # A full table, or a heap at the clients' floor, would
                # evict the oldest offline session.
                seen.extend(st.tail.new())
                if st.w.latest("clients/evicted") or any("evicting" in x for x in seen):
                    return "a session evicted", True
            r = _session(st, "sleeper%05d" % i)
            return r and (r, False)

        st.rec["sessions_opened"] = st.fill(add)
        v = st.stopped(_refused_by(seen + st.tail.new()))
        st.count(int(v["clients/total"]) - int(v["clients/connected"]))
        st.rec["evicted"] = int(v.get("clients/evicted", 0))
        # Nothing is taken back: sessions leave by expiry, an hour here,
        # or evicted for a new client.
    return st.rec


def _drain(st, cid, want):
    # The session cid comes back (again, up to 5 times, while each return
    # brings something new) and takes what is queued for it, until every
    # message of `want` came. A message that comes twice (QoS 1 resends
    # what was in flight when a connection ended) counts once. -> its
    # record of what came.
    want = set(want)
    got, seen, tries = [], set(), []
    while not want <= seen and len(tries) < 5:
        k, end, c = len(seen), "all delivered", None
        try:
            c = st.client(cid, clean=False, props={SESSION_EXPIRY: EXPIRY})
            if c.connack.reason:
                end = _answer(c.connack)
            while not c.connack.reason and not want <= seen:
                m = c.poll(5)
                if m is None or m.type == DISCONNECT:
                    end = _answer(m) if m else "nothing more within 5 s"
                    break
                if m.type == PUBLISH:
                    got.append(bytes(m.payload))
                    seen.add(got[-1])
                    c.ack(m)
            c.close()
        except (AssertionError, OSError) as e:
            end = _lost(e, c)
        tries.append({"new": len(seen) - k, "ended": end})
        if len(seen) == k:
            break
    return {"returns": tries, "delivered": len(got), "distinct": len(seen),
            "duplicates": len(got) - len(seen), "missing": len(want - seen)}


def measure_queued(board, pc):
    raised = {k: RAISED[k] for k in ("max_queued_messages", "max_queued_bytes")}
    with Step(board, "queued", raised) as st:
        r = _session(st, "sleeper")
        if r is not None:
            raise RuntimeError("the queue's session was refused: %s" % r)
        st.rec["start"] = _heap(st.w.now())  # with its session
        payload = b"alert %010d".__mod__
        ok = []
        add, pub = _publisher(st, "capacity-pub", lambda i: "alerts/door", payload, False, ok)
        st.fill(add)
        pub[0].close()
        _publish_stop(st, pc)
        st.count(len(ok))
        # It comes back and must get every acknowledged alert once.
        st.rec["after_removal"] = _drain(st, "sleeper", [payload(i) for i in ok])
    return st.rec


def measure_clients(board, pc, name, raised):
    with Step(board, name, raised) as st:
        cs = []

        def add(i):
            try:
                c = st.client("live%05d" % i)
            except (AssertionError, OSError) as e:
                return _lost(e, None), False
            if c.connack.reason:
                c.close()
                return _answer(c.connack), False
            cs.append(c)
            return None

        st.fill(add)
        v = st.stopped()
        st.count(int(v["clients/connected"]), 1)  # the watcher
        for c in cs:
            try:
                c.send(Disconnect())
            except OSError:
                pass  # one the broker closed meanwhile: its log says why
            c.close()
        left = st.w.now()
        r = add(len(cs))
        if r is None:
            cs[-1].close()
        st.rec["after_removal"] = dict(_heap(left), connected=int(left["clients/connected"]),
                                       new_one=r[0] if r else "taken")
    return st.rec


def measure_board(board, log=print):
    prof = board_profile(board)
    pc = prof["config"]
    t0 = time.time()
    rec = {"heap": prof["heap"], "commit": _commit(), "date": _now()}
    rec.update({k: pc[k] for k in capdocs.PROFILE_KEYS})
    rec["retained"] = measure_retained(board, pc)
    rec["sessions"] = measure_sessions(board, pc)
    rec["queued"] = measure_queued(board, pc)
    rec["clients"] = measure_clients(board, pc, "clients", {})
    rec["clients_heap"] = measure_clients(board, pc, "clients_heap", {
        "max_connections": RAISED["max_connections"], "max_sessions": RAISED["max_sessions"]})
    rec["seconds"] = round(time.time() - t0, 1)
    for k in capdocs.ITEMS:
        r = rec[k]
        log("capacity %s: %s %s, stopped by %s (%s); %s B each%s%s" % (
            board, k, r.get("count"), r.get("stopped_by"), r.get("refusal"), r.get("per_item"),
            "; PROBLEMS in the log: %d lines" % len(r["problems"]) if r["problems"] else "",
            "; FAILED: %s" % r["failed"] if "failed" in r else ""))
    log("capacity %s: %.0f s" % (board, rec["seconds"]))
    return rec


def main(argv=None):
    ap = memreport.cli(__doc__, capdocs.MEASURED, OUT)
    a = ap.parse_args(argv)
    if a.docs_only:
        for p in capdocs.write(json.loads(Path(a.out).read_text())):
            print("capacity: wrote %s" % p)
        return 0
    t0 = time.time()
    res = memreport.record(ap, a, CMD, measure_board, step_seconds=STEP_SECONDS)
    memreport.save(res, a.out, "capacity")
    if not a.no_docs:
        for p in capdocs.write(res):
            print("capacity: wrote %s" % p)
    bad = ["%s %s" % (bd, k) for bd in a.boards.split(",") for k in capdocs.ITEMS
           if res["boards"][bd][k]["problems"] or "failed" in res["boards"][bd][k]]
    if bad:
        print("capacity: the broker's log shows problems in %s (%s)" % (", ".join(bad), LOGS))
    print("capacity: %.0f s" % (time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
