"""The functions every forwarded message runs keep their frames off the heap.

On the boards' ports a call whose frame (locals, value stack, try blocks)
is over 44 B gets it from the heap and frees it on return: a walk of the
allocation table per call, and bytes that count towards gc.threshold.
Measured on the twin under loadgen's QoS 1 load there were 21 such frames
per message, and with none the twin forwarded about a quarter more
(tools/frames.py). These
functions were cut to fit; a new local or a try in one of them would put
it back on the heap, which these tests catch. Frame sizes come from the
twin's own mpy-cross, the compiler of the frozen code.
"""
import ast
import json
import subprocess
import sys

import pytest

from conftest import REPO, run_mp

sys.path.insert(0, str(REPO / "tools"))
import frames  # noqa: E402

# (file, function): called once or more per message on the QoS 0, 1 and 2
# paths (publisher's packet in, receiver's acknowledgement in, flush out,
# and the waits for the next read and the next flush between them).
HOT = [
    ("firmware/broker/core.py", "Wakeup.set"),
    ("firmware/broker/core.py", "Wakeup.wait"),
    ("firmware/broker/transport.py", "TcpTransport.read_now"),
    ("firmware/broker/transport.py", "TcpTransport.readable"),
    ("firmware/broker/transport.py", "WakeOrder._enqueue"),
    ("firmware/broker/transport.py", "_Wait.__next__"),
    ("firmware/broker/transport.py", "_asked"),
    ("firmware/broker/handle_other.py", "_on_pubrec"),
    ("firmware/broker/heap.py", "Heap.room_for"),
    ("firmware/broker/heap.py", "Heap.spend"),
    ("firmware/broker/message.py", "Message.__init__"),
    ("firmware/broker/outbuf.py", "Output.write_now"),
    ("firmware/broker/outbuf.py", "Output.service"),
    ("firmware/broker/route.py", "_copy"),
    ("firmware/broker/subs.py", "Subs.match"),
]


# (file, function): the larger functions of the same paths, too large to
# cut to 44 B, and small ones called for every packet, whose calls cost
# less as machine code (no code state to set up for a bytecode frame).
# Marked @micropython.native, they are machine code whose frames stay on
# the C stack at any size.
NATIVE = [
    ("firmware/broker/conn.py", "Connection._take"),
    ("firmware/broker/handle_publish.py", "on_publish"),
    ("firmware/broker/route.py", "route"),
    ("firmware/broker/route.py", "deliver"),
    ("firmware/broker/route.py", "_enqueue"),
    ("firmware/broker/pump.py", "put_message"),
    ("firmware/broker/pump.py", "_size"),
    ("firmware/broker/pump.py", "pump"),
    ("firmware/broker/message.py", "Message.size"),
    ("firmware/broker/message.py", "Message.put"),
    ("firmware/broker/core.py", "Broker.flush_now"),
    ("firmware/broker/handle_other.py", "on_packet"),
    ("firmware/broker/handle_other.py", "_on_ack"),
    ("firmware/broker/handle_other.py", "_flow_ended"),
    ("firmware/broker/conn.py", "Connection.dispatch"),
    ("firmware/broker/conn.py", "Connection.ack"),
    ("firmware/broker/outbuf.py", "Output.reserve"),
    ("firmware/broker/outbuf.py", "Output.send_ack"),
    ("firmware/broker/outbuf.py", "Output.kick"),
    ("firmware/broker/handle_other.py", "_on_other"),
    ("firmware/broker/message.py", "Message._props_len"),
    ("firmware/broker/session.py", "Session.enqueue"),
    ("firmware/broker/transport.py", "TcpTransport.write_now"),
    ("firmware/broker/tls.py", "TlsTransport.write_now"),
    ("firmware/broker/transport.py", "WakeOrder.wait_io_event"),
    ("lib/mqtt/packets.py", "decode_publish"),
    ("lib/mqtt/props.py", "decode"),
]


@pytest.fixture(scope="module")
def compiled():
    # (file, function) -> (frame bytes, native) as the twin compiles them
    cross, tool = frames._tree()
    out = {}
    for path in sorted({p for p, _ in HOT + NATIVE}):
        for name, n_state, n_exc, native in frames.functions(REPO / path, cross, tool):
            out[(path, name)] = (frames.frame_bytes(n_state, n_exc), native)
    return out


@pytest.mark.parametrize("path,name", HOT, ids=["%s:%s" % (p.rsplit("/", 1)[1], n) for p, n in HOT])
def test_hot_path_function_frame_fits_on_the_c_stack(compiled, path, name):
    assert (path, name) in compiled, "%s has no function %s" % (path, name)
    size, native = compiled[(path, name)]
    assert native or size <= frames.ON_STACK_MAX, (
        "%s %s: %d B of frame, over the %d B the VM keeps on the C stack; "
        "each call would take heap (tools/frames.py)" % (path, name, size, frames.ON_STACK_MAX))


@pytest.mark.parametrize("path,name", NATIVE, ids=["%s:%s" % (p.rsplit("/", 1)[1], n) for p, n in NATIVE])
def test_large_hot_path_function_is_compiled_to_machine_code(compiled, path, name):
    assert (path, name) in compiled, "%s has no function %s" % (path, name)
    size, native = compiled[(path, name)]
    assert native, ("%s %s is bytecode: its %d B frame comes from the heap at every call; "
                    "mark it @micropython.native (tools/frames.py)" % (path, name, size))


@pytest.mark.parametrize("case", ["1", "1/1", "5:1/1"])
def test_a_forwarded_message_sets_off_collections_for_its_garbage_only(case):
    # On the twin at the esp32 heap and gc_threshold, shipped config:
    # what a message adds towards the next collection (mp_alloc.py
    # --collections: the threshold times collections per message) against
    # the garbage it leaves (counted with the collector off). The rest is
    # frames taken from the heap. Before the hot path was machine code:
    # 620 B against 120 at QoS 0, 1,665 against 399 at QoS 1 (3.1.1) and
    # 2,034 against 447 at QoS 1 (5.0). What is left is the fake
    # subscriber's own write() and a few small frames.
    from brokerproc import profile, twin_binary

    cmd = [str(twin_binary()), "-X", "heapsize=%d" % profile("esp32")["heap"], "tools/bench/mp_alloc.py",
           "--board", "esp32", "--messages", "2000", "--cases", case, "--collections", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    line = [x for x in p.stdout.splitlines() if x.startswith("ALLOC ")]
    assert p.returncode == 0 and line, p.stdout + p.stderr
    r = json.loads(line[-1][6:])["cases"][case]
    assert r["collections_exact"], r
    assert r["counted_per_msg"] <= 1.5 * r["per_msg"], (
        "%.1f B/msg towards gc.threshold for %.1f B/msg of garbage: frames from the heap "
        "(tools/frames.py)" % (r["counted_per_msg"], r["per_msg"]))


SOCKET_WRITES = """
import gc, socket, sys
from broker.transport import TcpTransport
from broker.outbuf import Output

addr = socket.getaddrinfo("127.0.0.1", int(sys.argv[1]))[0][-1]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(addr)
srv.listen(1)
tx = socket.socket()
tx.connect(addr)
rx = srv.accept()[0]
tx.setblocking(False)
rx.setblocking(False)


class Out(Output):
    pass


o = Out()
o.t = TcpTransport(tx, "test")
o.broker = Out()  # (only its byte counter is used)
o.broker.stats_bytes_sent = 0
o.obuf = bytearray(1024)
sink = bytearray(4096)


def writes(k):
    # k writes of 1 to 500 bytes, each read back; (heap taken, all went out)
    n = 0
    ok = True
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    i = 0
    while i < k and ok:
        o.olen = 1 + i % 500
        n += o.olen
        ok = o.write_now() and not o.olen
        while rx.readinto(sink):
            pass
        i += 1
    a = gc.mem_alloc() - a
    gc.enable()
    return a, ok


writes(1)
o.broker.stats_bytes_sent = 0
a, ok = writes(200)
print(a, ok, o.broker.stats_bytes_sent == sum(1 + i % 500 for i in range(200)))
"""


def test_writing_a_connections_output_to_its_socket_takes_no_heap():
    # Output.write_now() runs for every receiver the flusher visits: 10
    # writes for a QoS 0 message to 10 subscribers that keep up. Each
    # took 48 B of heap (a bound method from getattr(), a memoryview of
    # the buffer and a slice of it): most of the garbage of such a
    # message (624 B, mp_alloc.py case 10). The stream's write(buf, off,
    # n) writes the part without any of them.
    from brokerproc import free_port

    r = run_mp(SOCKET_WRITES, args=(str(free_port()),))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["0", "True", "True"], r.stdout


KEPT_CONTAINERS = """
from broker.session import Session
from broker.message import Message
s = Session("c")
m = Message("t", b"four", 1, False)
d = s.in_flight()
d[1] = 1
del d[1]
q2 = s.qos2()
q2[1] = True
del q2[1]
s.push(m, 2)
s.pop()
q = s.queue
print(s.in_flight() is d, s.qos2() is q2, s.push(m, 4) or s.queue is q, s.queued_bytes)
s.pop()
s.shrink()
print(s.inflight, s.qos2_in, s.queue, s.queued_bytes)
"""


QUEUE_WITHOUT_HEAP = """
import gc
import micropython
from broker.session import Session, info
from broker.message import Message

m = Message("t", b"x" * 100, 0, False)


def locked(f):
    gc.collect()
    micropython.heap_lock()
    try:
        f(m, info(0, False, 0)) if f.__name__ != "pop" else f()
        return "ok"
    except MemoryError:
        return "MemoryError"
    finally:
        micropython.heap_unlock()


def state(s):
    q = s.queue
    exact = s.queued_bytes == sum(len(q[i].payload) for i in range(0, len(q), 2))
    return "%d %d %s" % (len(q) >> 1, s.queued_bytes, exact)


for extra in range(10):  # (the attribute table fills up at one of them)
    s = Session("c")
    for j in range(extra):
        setattr(s, "a%d" % j, j)
    first = locked(s.push)  # no list yet: nothing queued, nothing counted
    s.push(m, info(0, False, 0))
    s.push(m, info(0, False, 0))
    s.pop()
    again = locked(s.push)  # room in the list and the slot for the count
    out = locked(s.pop)  # the del's slice takes heap
    print(extra, first, state(s) if first == "ok" else "", again, out, state(s))
"""


def test_a_queue_entry_and_its_byte_count_change_together_when_the_heap_runs_out():
    # push() counted the bytes after the appends: the session's first
    # count grew its attribute table, and a MemoryError there left the
    # entry queued and uncounted, and route queued it again (twice
    # delivered). drop() counted before its del, whose slice takes heap
    # (outside review, with heap_lock on the twin).
    r = run_mp(QUEUE_WITHOUT_HEAP)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert len(rows) == 10, r.stdout
    for row in rows:
        assert row[1] == "MemoryError", row  # no list could be made
        assert row[-1] == "True", row  # the count is the queue's
        assert (row[2], row[3]) == ("ok", "MemoryError") or (row[2], row[3]) == ("ok", "ok"), row
        assert row[4:6] == (["2", "200"] if row[3] == "MemoryError" else ["1", "100"]), row


def test_a_session_keeps_its_emptied_containers_until_shrink():
    # A steady QoS 1/2 subscriber's window empties between messages, and
    # a backed-up one's queue between bursts: the dict or list it had is
    # used again, not made anew for every message (measured at QoS 1 on
    # the twin, mp_alloc.py: 36 B of garbage a message). shrink() (at the
    # end of a connection, once a second) gives the room back.
    r = run_mp(KEPT_CONTAINERS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["True True True 4", "() () () 0"], r.stdout


def _function_node(path, qual):
    tree = ast.parse((REPO / path).read_text())
    scope = tree.body
    for part in qual.split("."):
        node = next(n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        scope = node.body
    return node


@pytest.mark.parametrize("path,name", NATIVE, ids=["%s:%s" % (p.rsplit("/", 1)[1], n) for p, n in NATIVE])
def test_machine_code_function_uses_nothing_the_native_emitter_does_differently(path, name):
    # MicroPython v1.28's native emitter cannot compile a bare `raise`
    # (mpy-cross aborts on an assertion in py/emitnative.c, or says "native
    # raise") nor `raise ... from`, and compiles `del x` of a local as
    # `x = None` (no NameError after it). None of these may appear.
    found = []
    for n in ast.walk(_function_node(path, name)):
        if isinstance(n, ast.Raise) and (n.exc is None or n.cause is not None):
            found.append("line %d: %s" % (n.lineno, "bare raise" if n.exc is None else "raise ... from"))
        elif isinstance(n, ast.Delete) and any(isinstance(t, ast.Name) for t in n.targets):
            found.append("line %d: del of a local" % n.lineno)
    assert not found, "%s %s: %s" % (path, name, "; ".join(found))


def test_a_function_with_many_arguments_is_reported_on_the_heap():
    # The tool itself reads sizes as py/objfun.c reckons them (4 B a word,
    # 12 B a try): _alone's thirteen arguments alone are 52 B. And it
    # tells machine code apart: put_message, as large, is native.
    assert frames.frame_bytes(11, 0) == 44 and frames.frame_bytes(8, 1) == 44
    found = {n: (frames.frame_bytes(s, e), nat)
             for n, s, e, nat in frames.functions(REPO / "firmware/broker/pump.py", *frames._tree())}
    assert found["_alone"][0] > frames.ON_STACK_MAX and not found["_alone"][1]
    assert found["put_message"][1]


# A connected TCP pair for the scripts below, on the twin: a blocking
# client socket, and the accepted one in a TcpTransport (non-blocking), with
# small kernel buffers so that a writer soon has to wait.
PAIR = r"""
import asyncio
import gc
import socket
import sys
from asyncio import core
from broker import server
from broker.transport import TcpTransport

ls = server.listen("127.0.0.1", int(sys.argv[1]))


def pair():
    a = socket.socket()
    a.setsockopt(socket.SOL_SOCKET, 8, 4096)  # SO_RCVBUF
    a.connect(socket.getaddrinfo("127.0.0.1", int(sys.argv[1]))[0][-1])
    while True:
        try:
            s, _ = ls.accept()
            break
        except OSError:
            pass
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, 7, 4096)  # SO_SNDBUF
    return a, TcpTransport(s, "10.0.0.1:1")
"""

WAITS = PAIR + r"""
# A reader that keeps up with its socket waits once per read: 200 bytes,
# each written by another task once the reader has the one before, on the
# twin, with the collector off; the heap (the reader's, the writer's and
# the loop's) is read by the reader, from its first byte (after its first
# wait, which makes its entry) to its last. Then the transport closes.
N = 200
a, t = pair()
s = t.sock
mv = memoryview(bytearray(16))
seen = [0, 0, 0, False, 0]  # waits, heap at the first byte, at the last, done, bytes read


async def reader():
    got = 0
    while got < N:
        n = t.read_now(mv)
        while n is None:
            seen[0] += 1
            await t.readable()
            n = t.read_now(mv)
        if not got:
            gc.collect()
            gc.disable()
            seen[1] = gc.mem_alloc()
        got += n
        seen[4] = got
    seen[2] = gc.mem_alloc()
    seen[3] = True


async def writer():
    i = 0
    while not seen[3]:  # (no range object: nothing made per pass)
        # The first byte once the reader has waited (its entry is made),
        # each next one once it has the last.
        if i < N and seen[0] and seen[4] == i:
            a.send(b"x")
            i += 1
        await asyncio.sleep_ms(0)


async def main():
    asyncio.create_task(reader())
    await writer()
    gc.enable()
    print("waits", seen[0], "bytes", seen[2] - seen[1])
    print("entry", s in core._io_queue.map)
    t.close()
    print("closed", s in core._io_queue.map)
    a.close()


asyncio.run(main())
"""


@pytest.mark.parametrize("board", sorted(p.stem for p in (REPO / "boards").glob("*.json")))
def test_a_reader_waiting_for_its_socket_allocates_nothing(board):
    # asyncio's own IOQueue makes an entry (a list, a dict slot, a poller
    # entry) at every wait and drops it at every wakeup, and a coroutine
    # per read is 112 B: a QoS 1 message a subscriber kept up with cost
    # 1,237 B of heap over real sockets, 680 B without them. And a closed
    # transport leaves no entry behind (WakeOrder keeps one between waits).
    # At every profile's heap: a twin heap that glibc mapped at or above
    # 2**31 (any larger than the esp32's) made an int at each poll of a
    # socket, as no board does (tools/twin_variant/twin_heap.c).
    from brokerproc import profile
    from conftest import free_port, run_mp

    r = run_mp(WAITS, heap=profile(board)["heap"], args=[free_port()])
    assert r.returncode == 0, r.stdout + r.stderr
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    waits, _, allocated = got["waits"].partition(" bytes ")
    assert int(waits) >= 190, "the reader hardly waited: %s" % r.stdout
    assert int(allocated) == 0, "%s B allocated over %s waits" % (allocated, waits)
    assert (got["entry"], got["closed"]) == ("True", "False"), r.stdout


FLUSHES = r"""
# The flusher woken 200 times, once per kick, each with a connection to
# serve, on the twin with the collector off.
import asyncio
import gc
from broker import config
from broker.core import Broker

b = Broker(config.build({"persistence": False}))


class Out:
    dirty = False
    served = 0

    def service(self):
        Out.served += 1


async def main():
    asyncio.create_task(b.flush_all())
    c = Out()
    for _ in range(2):  # the flusher's two lists take their size
        b.kick(c)
        await asyncio.sleep_ms(0)
        await asyncio.sleep_ms(0)
    gc.collect()
    gc.disable()
    before = gc.mem_alloc()
    i = 0
    while i < 200:
        b.kick(c)
        i += 1
        await asyncio.sleep_ms(0)
        await asyncio.sleep_ms(0)
    print("served", Out.served, "bytes", gc.mem_alloc() - before)


asyncio.run(main())
"""


def test_the_flusher_waiting_for_output_allocates_nothing():
    # asyncio's Event.wait() makes a coroutine at every wait: 48 B per
    # message a subscriber keeps up with, and a heap without those 48 B
    # once stopped all output for good (core.Wakeup). And `del d[:]`
    # makes a slice object each time (route.EVERY).
    from conftest import run_mp

    r = run_mp(FLUSHES)
    assert r.returncode == 0, r.stdout + r.stderr
    got = r.stdout.strip().splitlines()[-1].split()
    assert got[0] == "served" and int(got[1]) == 202, r.stdout
    assert int(got[3]) == 0, "%s B allocated over 200 flushes" % got[3]


SHARED_WAITS = PAIR + r"""
# Two tasks wait on one socket, a reader and a writer (whose peer reads
# nothing yet). 1. The reader is cancelled: the writer's wait must stay,
# and it finishes once the peer reads. 2. A task waits to read; another
# closes the socket: the waiting task must be woken, to find it closed.
# 3. A second task that would wait to read on it too is refused.


async def read(t, out):
    mv = memoryview(bytearray(16))
    try:
        n = t.read_now(mv)
        while n is None:
            await t.readable()
            n = t.read_now(mv)
        out.append(n)
    except asyncio.CancelledError:
        out.append("cancelled")
    except OSError as e:
        out.append("OSError")


async def main():
    a, t = pair()
    big = bytearray(32768)
    done = []

    async def write():
        await t.send(big)
        done.append(True)

    got = []
    r = asyncio.create_task(read(t, got))
    w = asyncio.create_task(write())
    await asyncio.sleep_ms(50)
    print("writer waiting", not done)
    r.cancel()
    await asyncio.sleep_ms(10)
    a.setblocking(False)
    sink = bytearray(4096)
    for _ in range(2000):
        try:
            a.readinto(sink)
        except OSError:
            pass
        if done:
            break
        await asyncio.sleep_ms(2)
    print("reader", got, "writer done", bool(done))
    t.close()
    a.close()
    a, t = pair()
    got = []
    asyncio.create_task(read(t, got))
    await asyncio.sleep_ms(20)
    t.close()
    await asyncio.sleep_ms(20)
    print("closed under its reader", got)
    a.close()
    a, t = pair()
    got = []
    asyncio.create_task(read(t, got))
    await asyncio.sleep_ms(10)
    try:
        await t.readable()
        print("second reader waited")
    except RuntimeError:
        print("second reader refused")
    t.close()
    await asyncio.sleep_ms(10)
    print("first reader", got)
    a.close()


asyncio.run(main())
"""


def test_a_socket_two_tasks_wait_on_keeps_one_wait_when_the_other_is_cancelled_and_wakes_both_when_closed():
    # asyncio's IOQueue.remove() drops the socket's whole entry: cancelling
    # a connection's reader (close_soon) stalled its writer mid-send until
    # a timeout. And WakeOrder keeps entries between waits: closing a
    # socket must not leave a task waiting on it for good. A second reader
    # would have taken the first one's place, which then waited for good.
    from conftest import free_port, run_mp

    r = run_mp(SHARED_WAITS, args=[free_port()])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["writer waiting True", "reader ['cancelled'] writer done True",
                                     "closed under its reader ['OSError']", "second reader refused",
                                     "first reader ['OSError']"], r.stdout


OUTPUT_FUNCTIONS = """
from broker import outbuf, route, pump, handle_other
from broker.conn import Connection
from broker.bridge import Link

same = [getattr(k, n) is getattr(outbuf.Output, n) for k in (Connection, Link) for n in ("reserve", "kick")]
print(all(same), route.reserve is pump.reserve is outbuf.Output.reserve, route.kick is handle_other.kick is outbuf.Output.kick)
"""


def test_the_output_methods_called_as_functions_are_every_connections_own():
    # route.py, pump.py and handle_other.py call Output.reserve and
    # Output.kick as functions, saving two lookups that miss per call (outbuf.py): a
    # subclass that overrode either would be passed by without a word.
    r = run_mp(OUTPUT_FUNCTIONS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["True", "True", "True"], r.stdout
