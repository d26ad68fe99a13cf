# Flash wear of the store, measured on LittleFS over the RAM flash.
#
#   micropython -X heapsize=16M mp_store_bench.py [MESSAGES] [BOARD ...]
#   micropython -X heapsize=16M mp_store_bench.py wear MESSAGES BOARD
#   micropython -X heapsize=16M mp_store_bench.py baseline MESSAGES BOARD
#   micropython -X heapsize=16M mp_store_bench.py files BOARD
#   micropython -X heapsize=16M mp_store_bench.py split MESSAGES BOARD
#
# For each board (esp32: 512 blocks, progsize 32; pico_w: 212 blocks,
# progsize 256, as the ports format them), each workload and commit batches
# of 1, 10 and 100 messages, prints one line:
#   BENCH board workload batch msgs bytes/msg est_blocks/msg erases/msg
#         progbytes/msg max_block_erases blocks_touched compactions
# A message is one 64-byte value under a 20-byte key.
#   queue:    store-and-forward. Each message is put under a fresh key and
#             deleted (in a later batch) once 32 newer ones are queued, as
#             with max_queued_messages=32. One put + one delete per message.
#   retained: each message overwrites one of 64 retained topics in turn.
# The store sits in /flash/data next to a cold namespace of 40 retained
# messages of 1 KiB written once at the start, which compaction must not
# keep rewriting.
# "wear" runs the queue workload in batches of 1 for MESSAGES messages (a
# comma-separated list: one line at each count, in one run) and prints how
# the erases spread over the blocks (dynamic wear levelling):
#   WEAR board msgs erases/msg blocks max_erases mean_erases never_erased
#        median_erases
# "baseline" runs the queue workload (batches of 1 and 10) through three
# simple designs, for comparison, and prints
#   BASE board design batch msgs erases/msg
#   rewrite: the whole live state, with the 40 KiB of cold retained
#            messages, to a temp file renamed over the old (Mosquitto's
#            autosave);
#   append:  each batch appended to one log file;
#   newfile: each batch in a new file (removed once 32 newer exist).
# "files" measures what one durable small write costs on LittleFS, by file
# size and way of writing, and prints
#   FILE board size way erases/write
#   new:       a new file each time, written under its final name;
#   rename:    a new file written under a temp name, then renamed;
#   overwrite: one of 16 existing files rewritten in turn;
#   with 16 files kept alive in the directory, as the store's slots are.
# "split" runs the queue workload with values of 64, 200, 400 and 1000
# bytes, in batches of 1 and 10, and prints
#   SPLIT board size batch way erases/msg
#   cost-model: the store as shipped (_split_pays decides whether a batch
#               is cut into inline parts);
#   whole:      split_max=0, no batch is cut (esp32, batch 1, small values);
#   always-cut: every batch that can be cut is (esp32, batch 1, 1000 B).
import gc
import os
import sys

import flashsim
from broker.store import Store

INLINE = {"esp32": 128, "pico_w": 512}
VALUE = bytes(range(64))


def key(prefix, n):
    k = "%s/%018d" % (prefix, n)
    return k[:20]


def run(board, workload, batch, msgs, value=VALUE, split_max=2048, always_cut=False, marks=()):
    gc.collect()
    dev = flashsim.new(board)
    flashsim.mount(dev, board, fmt=True)
    st = Store("/flash/data", 1 << 20, inline_max=INLINE[board], split_max=split_max)
    if always_cut:
        st._split_pays = lambda m, cap, pend: True
    st.open()
    cold = bytes(1024)
    for i in range(40):
        st.put(key("c", i), cold)
        if i % 10 == 9:
            st.commit()
    st.compact()
    for k in st.stats:
        st.stats[k] = 0
    dev.reset_counters()
    wear0 = list(dev.erase_count)
    n = 0
    pending = []
    while n < msgs:
        for j in range(batch):
            if workload == "queue":
                k = key("q", n)
                st.put(k, value)
                pending.append(k)
                if len(pending) > 32:
                    st.delete(pending.pop(0))
            else:
                st.put(key("r", n % 64), value)
            n += 1
        st.commit()
        if n in marks:
            spread(board, n, [dev.erase_count[i] - wear0[i] for i in range(dev.nblocks)])
    s = st.stats
    wear = [dev.erase_count[i] - wear0[i] for i in range(dev.nblocks)]
    touched = sum(1 for w in wear if w)
    print(
        "BENCH %s %s %d %d %.1f %.4f %.4f %.0f %d %d %d"
        % (
            board,
            workload,
            batch,
            n,
            s["bytes_written"] / n,
            s["block_writes"] / n,
            dev.erases / n,
            dev.prog_bytes / n,
            max(wear),
            touched,
            s["compactions"],
        )
    )
    flashsim.unmount()
    return wear


def baseline(board, design, batch, msgs):
    gc.collect()
    dev = flashsim.new(board)
    flashsim.mount(dev, board, fmt=True)
    os.mkdir("/flash/data")
    cold = dict((key("c", i), bytes(1024)) for i in range(40))
    live = {}
    files = []
    dev.reset_counters()
    n = 0
    pending = []
    while n < msgs:
        ops = []
        for j in range(batch):
            k = key("q", n)
            live[k] = VALUE
            ops.append(k)
            pending.append(k)
            if len(pending) > 32:
                live.pop(pending.pop(0))
            n += 1
        if design == "rewrite":
            with open("/flash/data/tmp", "wb") as f:
                for k, v in cold.items():
                    f.write(k)
                    f.write(v)
                for k, v in live.items():
                    f.write(k)
                    f.write(v)
            os.rename("/flash/data/tmp", "/flash/data/state")
        elif design == "append":
            with open("/flash/data/log", "ab") as f:
                for k in ops:
                    f.write(k)
                    f.write(VALUE)
        else:
            p = "/flash/data/b%d" % n
            with open(p, "wb") as f:
                for k in ops:
                    f.write(k)
                    f.write(VALUE)
            files.append(p)
            if len(files) > 32:
                os.remove(files.pop(0))
    print("BASE %s %s %d %d %.4f" % (board, design, batch, n, dev.erases / n))
    flashsim.unmount()


def file_costs(board):
    data = bytes(range(256)) * 8
    for size in (60, 100, 128, 300, 500, 600):
        for way in ("new", "rename", "overwrite"):
            gc.collect()
            dev = flashsim.new(board)
            flashsim.mount(dev, board, fmt=True)
            os.mkdir("/flash/d")
            names = []
            for i in range(16):
                names.append("/flash/d/f%d" % i)
                with open(names[-1], "wb") as f:
                    f.write(data[:size])
            dev.reset_counters()
            n = 400
            for i in range(n):
                if way == "overwrite":
                    with open(names[i % 16], "wb") as f:
                        f.write(data[:size])
                    continue
                p = "/flash/d/n%d" % i
                with open("/flash/d/tmp" if way == "rename" else p, "wb") as f:
                    f.write(data[:size])
                if way == "rename":
                    os.rename("/flash/d/tmp", p)
                names.append(p)
                os.remove(names.pop(0))
            print("FILE %s %d %s %.3f" % (board, size, way, dev.erases / n))
            flashsim.unmount()


def split_costs(msgs, board):
    for size in (64, 200, 400, 1000):
        value = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        for batch in (1, 10):
            ways = ["cost model"]
            if batch == 1 and board == "esp32":
                ways.append("always cut" if size > 512 else "whole")
            for way in ways:
                wear = run(board, "queue", batch, msgs, value, 0 if way == "whole" else 2048, way == "always cut")
                print("SPLIT %s %d %d %s %.4f" % (board, size, batch, way.replace(" ", "-"), sum(wear) / msgs))


def spread(board, msgs, wear):
    total = sum(wear)
    w = sorted(wear)
    print(
        "WEAR %s %d %.4f %d %d %.2f %d %d"
        % (board, msgs, total / msgs, len(wear), w[-1], total / len(wear), wear.count(0), w[len(w) // 2])
    )


def wear_run(marks, board):
    run(board, "queue", 1, marks[-1], marks=marks)


if len(sys.argv) > 1 and sys.argv[1] == "wear":
    wear_run(sorted(int(m) for m in sys.argv[2].split(",")), sys.argv[3])
elif len(sys.argv) > 1 and sys.argv[1] == "files":
    file_costs(sys.argv[2])
elif len(sys.argv) > 1 and sys.argv[1] == "split":
    split_costs(int(sys.argv[2]), sys.argv[3])
elif len(sys.argv) > 1 and sys.argv[1] == "baseline":
    for design in ("rewrite", "append", "newfile"):
        for batch in (1, 10):
            baseline(sys.argv[3], design, batch, int(sys.argv[2]))
else:
    msgs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for board in sys.argv[2:] or ["esp32", "pico_w"]:
        for workload in ("queue", "retained"):
            for batch in (1, 10, 100):
                run(board, workload, batch, msgs)
