"""Heap allocated per message over real sockets, one message at a time.

    .venv/bin/python tools/bench/lockstep_alloc.py [--qos 0|1] [--messages 5000] [--board esp32]

mp_alloc.py counts what the broker's handlers allocate, over fake sockets
that never wait; this counts everything a message costs when its clients
keep up with it, waits on asyncio's poller and wake-ups of the flusher
included. The broker runs on the twin as tools/mp_host.py runs it (board
profile, shipped config, persistence and authentication on), with a heap
large enough (64 MB) that the collector never has to run: a task turns it
off and writes gc.mem_alloc() to a file every 100 ms. A raw-socket
subscriber and publisher (3.1.1, topic t/x, 64-byte payload) then go in
lock step: PUBLISH, the delivery read, its PUBACK (QoS 1), the
publisher's PUBACK read, so every read on both sides waits. Result: the
growth of mem_alloc() over the messages, after 500 to warm up, per message.
"""
import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "host_tests"))
from brokerproc import BrokerProc  # noqa: E402
from mqttc import Client, Publish  # noqa: E402

# The broker's runner, plus the task that reports the heap (MicroPython).
WATCH = r"""
import sys
import os
TOOLS = os.getenv("LOCKSTEP_TOOLS")
sys.path[:] = [".frozen"] + [p for p in sys.path if p != ".frozen"] + [TOOLS]
import gc
import asyncio
from broker import app

_start = app.start


async def watch(path):
    f = open(path, "w")
    while True:
        await asyncio.sleep_ms(100)
        gc.disable()
        f.write("%d\n" % gc.mem_alloc())
        f.flush()


def start(cfg, wdt=None):
    b = _start(cfg, wdt)
    asyncio.create_task(watch(os.getenv("LOCKSTEP_OUT")))
    return b


app.start = start
from hostrun import main
sys.exit(main(sys.argv, TOOLS + "/.."))
"""


def measure(qos, messages, board):
    with tempfile.TemporaryDirectory(prefix="lockstep_") as tmp:
        script = os.path.join(tmp, "watch.py")
        out = os.path.join(tmp, "heap.txt")
        with open(script, "w") as f:
            f.write(WATCH)
        os.environ["LOCKSTEP_OUT"] = out
        os.environ["LOCKSTEP_TOOLS"] = str(REPO / "tools")
        b = BrokerProc(board=board, heap=64000000, script=script).start()
        try:
            sub = Client(b.port, "lockstep-sub", version=4)
            pub = Client(b.port, "lockstep-pub", version=4)
            for c in (sub, pub):  # one small packet at a time, each answered
                c.raw.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sub.subscribe([("t/x", qos)])
            payload = b"p" * 64

            def one(i):
                pub.send(Publish("t/x", payload, qos, pid=i % 65535 + 1))  # (no pid at QoS 0)
                sub.ack(sub.recv())
                if qos:
                    pub.recv()  # its PUBACK

            def heap():
                time.sleep(0.35)  # past the next report
                with open(out) as f:
                    return int(f.read().split()[-1])

            for i in range(500):
                one(i)
            before = heap()
            t = time.time()
            for i in range(messages):
                one(i)
            secs = time.time() - t
            after = heap()
            idle = heap() - after  # what the reporting task itself costs
            sub.close()
            pub.close()
        finally:
            b.kill9()
    return {"qos": qos, "messages": messages, "bytes_per_msg": (after - before) / messages,
            "idle_bytes_per_report": idle, "msgs_per_s": messages / secs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qos", type=int, choices=(0, 1), default=0)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--board", default="esp32")
    a = ap.parse_args()
    r = measure(a.qos, a.messages, a.board)
    print("lockstep QoS %d, %d messages: %.1f B of heap per message (the reporting task: %d B per 0.35 s)"
          % (r["qos"], r["messages"], r["bytes_per_msg"], r["idle_bytes_per_report"]))


if __name__ == "__main__":
    main()
