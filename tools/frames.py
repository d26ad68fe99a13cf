#!/usr/bin/env python3
"""Which functions get their frame from the heap on a board.

    .venv/bin/python tools/frames.py [--all] [FILE.py ...]
        (default: firmware/broker/*.py and lib/mqtt/*.py)

MicroPython's VM (py/objfun.c, fun_bc_call) gives a called function's frame
(its locals, its value stack and 12 B per nested try/with) room on the C
stack when that takes at most 11 words: 44 B on a 32-bit board. A larger
frame comes from the heap: gc_alloc() before the call, gc_free() after.
On the ports the boards run (esp32, rp2: no MICROPY_ENABLE_PYSTACK) such a
call walks the allocation table from its lowest free block up to a free
run of the frame's size, and every byte of it counts towards gc.threshold.
Measured on the twin under `loadgen.py --scenario qos1`, before the hot
path was cut to fit: 21 heap frames per message, and a twin built with
every frame on the C stack (VM_MAX_STATE_ON_STACK raised, for diagnosis
only) forwarded about a quarter more.

A frame's words are the function's locals (arguments included) plus the
deepest its value stack gets: a call takes the callable, self for a
method, and each argument; a `for` loop holds 4 words for its iterator.

A generator (an `async def` too) always keeps its frame on the heap, in
the generator object made once per call; those are not listed.

A function marked @micropython.native is machine code, and keeps its
frame on the C stack at any size: listed as native. (What it costs:
flash for its code, RAM for it where it is loaded from .mpy or ROMFS (on
the rp2 boards from the Python heap), C stack for its frame, and a heap
object for every slice written in it, which bytecode makes on the C stack
for a memoryview or bytearray: the hot path's slices are in small
bytecode helpers, message.put_bytes, handle_publish.part and
packets._utf8.)

Prints one line per function whose frame would come from the heap
(--all: every function but generators): bytes, locals+stack words, try
depth, name.
The compiler is the twin's mpy-cross (tools/twin.py's MicroPython tree),
the one that compiles the frozen code, for the twin's 32-bit x86.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

GENERATOR = 0x01  # MP_SCOPE_FLAG_GENERATOR, in the prelude's scope flags
ON_STACK_MAX = 44  # VM_MAX_STATE_ON_STACK, 11 words of 4 B
WORD = 4
EXC_ENTRY = 12  # mp_exc_stack_t: handler, value stack pointer, saved exception


def frame_bytes(n_state, n_exc):
    return n_state * WORD + n_exc * EXC_ENTRY


def _tree():
    import twin

    src, _ = twin._source()
    cross = src / "mpy-cross" / "build" / "mpy-cross"
    if not cross.exists():
        subprocess.run(["make", "-C", str(src / "mpy-cross"), "-j2"], check=True,
                       stdout=subprocess.DEVNULL)
    return cross, src / "tools" / "mpy-tool.py"


def _dump(path, cross, tool, arch):
    # mpy-tool's listing of path compiled for arch
    with tempfile.TemporaryDirectory() as d:
        mpy = Path(d) / "m.mpy"
        subprocess.run([str(cross), "-march=" + arch, "-o", str(mpy), str(path)], check=True)
        return subprocess.run([sys.executable, str(tool), "-d", str(mpy)], check=True,
                              capture_output=True, text=True).stdout


def machine_code_bytes(arch, files=None):
    """Bytes of machine code that the functions marked @micropython.native
    in files (default: all of lib/ and firmware/) compile to for arch: what
    a board loading them from .mpy files (or ROMFS) copies into RAM."""
    cross, tool = _tree()
    files = files or sorted(p for d in ("lib", "firmware") for p in (REPO / d).rglob("*.py"))
    n = 0
    for f in files:
        for line in _dump(f, cross, tool, arch).splitlines():
            if line.startswith("  raw data: "):
                n += int(line.split()[2])
    return n


def functions(path, cross, tool):
    # -> [(qualified name, n_state, n_exc, native)] for every function in
    # path that is not a generator (compiled for the twin's x86)
    dump = _dump(path, cross, tool, "x86")
    out = []
    stack = []  # [name, children still to come]
    name = None
    native = False
    for line in dump.splitlines():
        if line.startswith("simple_name: "):
            name = line.split(": ", 1)[1]
            native = False
        elif line.startswith("  raw data: "):
            native = True  # (machine code: mpy-tool shows its bytes)
        elif line.startswith("  prelude: "):
            sig = [int(x) for x in line.split(": ", 1)[1].strip("()").split(",")]
            while stack and stack[-1][1] == 0:
                stack.pop()
            if stack:
                stack[-1][1] -= 1
            qual = ".".join([s[0] for s in stack if s[0] != "<module>"] + [name])
            if not sig[2] & GENERATOR:
                out.append((qual, sig[0], sig[1], native))
        elif line.startswith("  children: "):
            inner = line.split(": ", 1)[1].strip("[]")
            stack.append([name, len([c for c in inner.split(",") if c.strip()])])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    files = [Path(f) for f in a.files] or sorted((REPO / "firmware" / "broker").glob("*.py")) + sorted(
        (REPO / "lib" / "mqtt").glob("*.py"))
    cross, tool = _tree()
    for f in files:
        for qual, n_state, n_exc, native in functions(f, cross, tool):
            size = frame_bytes(n_state, n_exc)
            if native:
                if a.all:
                    print("  native               %s.%s" % (f.stem, qual))
            elif a.all or size > ON_STACK_MAX:
                print("%4d B  %2d words  try %d  %s.%s" % (size, n_state, n_exc, f.stem, qual))


if __name__ == "__main__":
    main()
