"""Heap per idle client holding one subscription, on the board twin at a
board's heap with its shipped config: the one-number form of benchmem.py
(idle_clients()).

    .venv/bin/python tools/bench/heap_per_client.py [--board esp32] [--n1 2] [--n2 N] [--version 4|5]
        [--keepalive 60]

The broker's own gc.mem_alloc() (from $SYS/broker/heap/used, sys_interval 1)
is read with n1 and with n2 clients connected, each subscribed to a topic of
its own; the growth over n2 - n1 is the figure, so the buffer pools (filled
before the first count) and other one-time costs do not count. n2 defaults
to the shipped max_connections less the probe's connection (esp32: 7);
a larger n2 raises max_connections for the measurement, and says so.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmem import idle_clients  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="esp32")
    ap.add_argument("--n1", type=int, default=2)
    ap.add_argument("--n2", type=int, default=0)
    ap.add_argument("--version", type=int, choices=(4, 5), action="append")
    ap.add_argument("--keepalive", type=int, default=60)
    a = ap.parse_args()
    r = idle_clients(a.board, a.n1, a.n2 or None, tuple(a.version or (4,)), a.keepalive)
    if "max_connections" in r["config"]:
        print("(max_connections raised to %d for %d clients and the probe)" % (r["config"]["max_connections"],
                                                                               r["n2"]))


if __name__ == "__main__":
    main()
