# Flash wear of the store, measured on LittleFS over the RAM flash.
#
#   micropython -X heapsize=16M mp_store_bench.py [MESSAGES] [BOARD ...]
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
import gc
import sys

import flashsim
from broker.store import Store

MSGS = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
BOARDS = sys.argv[2:] or ["esp32", "pico_w"]
INLINE = {"esp32": 128, "pico_w": 512}
VALUE = bytes(range(64))


def key(prefix, n):
    k = "%s/%018d" % (prefix, n)
    return k[:20]


def run(board, workload, batch, msgs):
    gc.collect()
    dev = flashsim.new(board)
    flashsim.mount(dev, board, fmt=True)
    st = Store("/flash/data", 1 << 20, inline_max=INLINE[board])
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
                st.put(k, VALUE)
                pending.append(k)
                if len(pending) > 32:
                    st.delete(pending.pop(0))
            else:
                st.put(key("r", n % 64), VALUE)
            n += 1
        st.commit()
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


for board in BOARDS:
    for workload in ("queue", "retained"):
        for batch in (1, 10, 100):
            run(board, workload, batch, MSGS)
