"""Measure the broker's heap per idle connected client.

Starts the broker under the MicroPython unix port (board profile heap),
connects N idle MQTT clients over raw sockets, and reads the broker's own
gc.mem_alloc() from $SYS/broker/heap/used before and after.

    .venv/bin/python tools/bench/heap_per_client.py [--board esp32] [-n 6] [--version 4|5]

This is the one-number version of tools/bench/memreport.py, which measures
the same way (and also per subscription, retained and queued message) for
every board profile; both use HeapProbe from memreport.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memreport import HeapProbe, idle_clients  # noqa: E402
from brokers import Ours  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="esp32")
    ap.add_argument("-n", type=int, default=6)
    ap.add_argument("--version", type=int, default=4)
    a = ap.parse_args()
    with Ours(a.board, {"sys_interval": 1}) as b:
        probe = HeapProbe(b.port)
        before = probe.settled()
        socks = idle_clients(b.port, a.n, a.version)
        after = probe.settled()
        for s in socks:
            s.close()
        probe.close()
    per = (after - before) / a.n
    print("board=%s clients=%d heap before=%d after=%d per idle client=%.0f B"
          % (a.board, a.n, before, after, per))


if __name__ == "__main__":
    main()
