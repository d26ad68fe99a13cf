"""Measure the broker's heap per idle connected client, once, on the twin.

Starts the broker on the board twin with the board's heap and shipped
config, connects N idle MQTT clients, and reads the broker's own
gc.mem_alloc() from $SYS/broker/heap/used before and after.

    .venv/bin/python tools/bench/heap_per_client.py [--board esp32] [-n N] [--version 4|5]

The one-number form of tools/bench/memreport.py (make memreport), whose
HeapProbe and Client it uses; N defaults to max_connections - 1 (the probe
is a client too). The figures in the docs come from make memreport only.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memreport import BrokerProc, Client, HeapProbe, board_profile  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--board", default="esp32")
    ap.add_argument("-n", type=int, default=None)
    ap.add_argument("--version", type=int, default=4)
    a = ap.parse_args()
    n = a.n or board_profile(a.board)["config"]["max_connections"] - 1
    with BrokerProc(board=a.board, config={"sys_interval": 1, "max_connections": max(n + 1, 2)}) as b:
        probe = HeapProbe(b.port)
        before = probe.settled(1)
        cs = [Client(b.port, "idle%d" % i, a.version) for i in range(n)]
        after = probe.settled(1 + n)
        for c in cs:
            c.close()
        probe.close()
    print("board=%s clients=%d heap before=%d after=%d per idle client=%.0f B"
          % (a.board, n, before, after, (after - before) / n))


if __name__ == "__main__":
    main()
