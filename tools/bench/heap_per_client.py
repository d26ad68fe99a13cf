"""Measure the broker's heap per idle connected client.

Starts the broker under the MicroPython unix port (board profile heap),
connects N idle MQTT clients over raw sockets, and reads the broker's own
gc.mem_alloc() from $SYS/broker/heap/used before and after.

    .venv/bin/python tools/bench/heap_per_client.py [--board esp32] [-n 6]
"""
import argparse
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "lib"), str(REPO / "host_tests")]
from brokerproc import BrokerProc  # noqa: E402
from mqtt import packets as K  # noqa: E402
from mqtt.framer import Framer  # noqa: E402


def connect(port, cid, version=4):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(K.encode(K.Connect(cid, version, keepalive=0), version))
    f = Framer()
    while True:
        f.feed(s.recv(100))
        p = f.next(version)
        if p is not None:
            assert p.reason == 0, p
            return s


def heap_used(port):
    s = connect(port, "heapprobe")
    s.sendall(K.encode(K.Subscribe(1, [("$SYS/broker/heap/used", 0)])))
    f = Framer()
    end = time.time() + 5
    while time.time() < end:
        f.feed(s.recv(4096))
        while True:
            p = f.next()
            if p is None:
                break
            if p.type == K.PUBLISH:
                s.close()
                return int(p.payload)
    raise RuntimeError("no $SYS/broker/heap/used")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="esp32")
    ap.add_argument("-n", type=int, default=6)
    ap.add_argument("--version", type=int, default=4)
    a = ap.parse_args()
    with BrokerProc(board=a.board, config={"sys_interval": 1, "log_level": "warning"}) as b:
        time.sleep(1.2)
        before = heap_used(b.port)
        socks = [connect(b.port, "idle%d" % i, a.version) for i in range(a.n)]
        time.sleep(2.2)
        after = heap_used(b.port)
        for s in socks:
            s.close()
    per = (after - before) / a.n
    print("board=%s clients=%d heap before=%d after=%d per idle client=%.0f B"
          % (a.board, a.n, before, after, per))


if __name__ == "__main__":
    main()
