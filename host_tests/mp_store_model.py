# Runs a sequence of store operations from a JSON file (MicroPython side);
# the pytest side compares what it prints with a Python dict model.
#
#   micropython mp_store_model.py STEPS.jsonl
#
# The file's first line is {"dir": ..., "opts": {Store options}, "dump":
# "all" or "reopen"}; each further line is one step: ["put", key, hexvalue],
# ["del", key], ["commit"], ["compact"], ["reopen"] (a restart: staged
# changes are lost). Steps are read one at a time, so a long run needs
# little heap. After every commit (with "dump": "all"), compact and reopen
# it prints one JSON line:
#   {"step": n, "used": used_bytes, "items": {key: hexvalue}}
# and last "DONE" with the stats summed over all sessions.
import json
import sys
from binascii import hexlify, unhexlify

from broker.store import Store

src = open(sys.argv[1])
job = json.loads(src.readline())
opts = job["opts"]
path = job["dir"]
every = job.get("dump", "all") == "all"
job = None


total = {}


def new(old=None):
    if old is not None:
        for k, v in old.stats.items():
            total[k] = total.get(k, 0) + v
    st = Store(path, 1 << 24, **opts)
    rep = st.open()
    assert rep["dropped"] == 0, rep
    return st


def dump(n, st):
    items = {}
    for k, v in st.items():
        assert k not in items, "key twice in items(): " + k
        items[k] = hexlify(v).decode()
    print(json.dumps({"step": n, "used": st.used_bytes, "items": items}))


st = new()
n = -1
for line in src:
    n += 1
    s = json.loads(line)
    op = s[0]
    if op == "put":
        st.put(s[1], unhexlify(s[2]))
    elif op == "del":
        st.delete(s[1])
    elif op == "commit":
        st.commit()
        if every:
            dump(n, st)
    elif op == "compact":
        st.compact()
        dump(n, st)
    elif op == "reopen":
        st = new(st)
        dump(n, st)
src.close()
st = new(st)
print("DONE", json.dumps(total))
