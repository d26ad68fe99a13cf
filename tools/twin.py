#!/usr/bin/env python3
"""Build the board twin: MicroPython v1.28.0's unix port, 32-bit, with
asyncio, ssl and this project's code frozen in (manifest_twin.py).

    tools/twin.py            build what is out of date of both binaries:
        build/twin/micropython        the broker frozen in (manifest_twin.py):
                                      a board flashed with our firmware
        build/twin/micropython-stock  only what a stock firmware freezes
                                      (asyncio, ssl): a board that loads
                                      the broker from .mpy files
    tools/twin.py --path [--stock]    print a binary's path (built if needed)
    tools/twin.py --check             exit 0 when both are current, 1 when not
    tools/twin.py --variant tlsheap   build/twin/micropython-tlsheap, on demand
                                      only (make memreport): the broker frozen
                                      in, and Mbed TLS allocating from the
                                      MicroPython heap as on the rp2 port
                                      (tools/twin_mbedtls_tlsheap.h); the
                                      other two keep Mbed TLS outside it, as
                                      the ESP32 does (its IDF heap)

A 32-bit build has a board's object layout (4-byte pointers, 16-byte GC
blocks), and frozen code runs from the binary as it runs from a board's
flash, so `-X heapsize=<board heap>` gives the heap a board has.

The source, in this order:
  1. MICROPYTHON_SRC: a MicroPython checkout or unpacked release (its
     objects go to build/twin/obj, its mpy-cross is built in place);
  2. ../shared/micropython/micropython-1.28.0.tar.gz beside the project
     (or MICROPYTHON_TARBALL), unpacked into build/twin/src;
  3. the v1.28.0 release tarball from GitHub, where the network allows.

It is rebuilt only when the code, a manifest, the source or the flags
changed (a hash of all of them is kept in build/twin/inputs.sha256).
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "build" / "twin"
# variant -> (binary, its manifest, does it freeze the project's code)
VARIANTS = {
    "broker": (OUT / "micropython", REPO / "manifest_twin.py", True),
    "stock": (OUT / "micropython-stock", REPO / "tools" / "twin_stock_manifest.py", False),
    "tlsheap": (OUT / "micropython-tlsheap", REPO / "manifest_twin.py", True),
}
# The variants `make twin` builds; the others are built when asked for.
DEFAULT_VARIANTS = ("broker", "stock")
TLSHEAP_CONFIG = REPO / "tools" / "twin_mbedtls_tlsheap.h"
BINARY = VARIANTS["broker"][0]
VERSION = "1.28.0"
TARBALL_NAME = "micropython-%s.tar.gz" % VERSION
SHARED_TARBALL = REPO.parent / "shared" / "micropython" / TARBALL_NAME
RELEASE_URL = ("https://github.com/micropython/micropython/releases/download/v%s/micropython-%s.tar.xz"
               % (VERSION, VERSION))
# -m32 through CFLAGS_EXTRA/LDFLAGS_EXTRA is what makes a 32-bit unix build
# in this release; btree and ffi are not on the boards and ffi needs a
# 32-bit libffi.
MAKE_FLAGS = ["CFLAGS_EXTRA=-m32", "LDFLAGS_EXTRA=-m32", "MICROPY_PY_BTREE=0", "MICROPY_PY_FFI=0"]
# The port's standard variant but for Ctrl-C, which a board takes between
# bytecodes, and a heap below 2**31, where a board's RAM lies
# (tools/twin_variant/mpconfigvariant.h and twin_heap.c say why).
VARIANT_DIR = REPO / "tools" / "twin_variant"
# What is frozen: lib/ and firmware/ as the manifest lists them.
CODE_DIRS = [REPO / "lib", REPO / "firmware"]
HOST_RUNNER = REPO / "tools" / "hostrun.py"


class TwinError(Exception):
    pass


def _say(msg):
    print("twin: %s" % msg, flush=True)


def _inputs(src_id, variant):
    # A hash of everything that goes into the binary.
    _, manifest, project = VARIANTS[variant]
    h = hashlib.sha256()
    h.update(("%s\n%s\n" % (src_id, " ".join(MAKE_FLAGS))).encode())
    files = [manifest, VARIANTS["stock"][1], VARIANT_DIR / "mpconfigvariant.h", VARIANT_DIR / "mpconfigvariant.mk",
             VARIANT_DIR / "twin_heap.c"]
    if variant == "tlsheap":
        files.append(TLSHEAP_CONFIG)
    if project:
        for d in CODE_DIRS:
            files += sorted(p for p in d.rglob("*.py") if "__pycache__" not in p.parts)
        files.append(HOST_RUNNER)
    for p in files:
        h.update(str(p.relative_to(REPO)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def _source():
    # (directory of the MicroPython tree, identity for the stamp)
    env = os.environ.get("MICROPYTHON_SRC")
    if env:
        d = Path(env).resolve()
        if not (d / "ports" / "unix" / "Makefile").exists():
            raise TwinError("MICROPYTHON_SRC=%s is not a MicroPython source tree (no ports/unix/Makefile)" % env)
        return d, "src:%s" % d
    tarball = Path(os.environ.get("MICROPYTHON_TARBALL") or SHARED_TARBALL)
    if not tarball.exists():
        tarball = _fetch()
    return _unpack(tarball), "tar:%s:%d+poll-fix" % (tarball.name, tarball.stat().st_size)


def _fetch():
    dest = OUT / ("micropython-%s.tar.xz" % VERSION)
    if dest.exists():
        return dest
    _say("no local source; fetching %s" % RELEASE_URL)
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(RELEASE_URL, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        raise TwinError(
            "cannot get the MicroPython v%s source (%s). Provide it one of two ways:\n"
            "  MICROPYTHON_SRC=/path/to/micropython   a checkout of tag v%s with its submodules\n"
            "  put %s at %s (or set MICROPYTHON_TARBALL=/path/to/it)"
            % (VERSION, e, VERSION, TARBALL_NAME, SHARED_TARBALL))
    tmp.rename(dest)
    return dest


def _unpack(tarball):
    root = OUT / "src"
    mark = root / ".from"
    ident = "%s %d poll-fix" % (tarball.resolve(), tarball.stat().st_size)
    if mark.exists() and mark.read_text() == ident:
        return _tree(root)
    _say("unpacking %s" % tarball)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with tarfile.open(tarball) as t:
        t.extractall(root, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(root)
    _fix_poll(_tree(root))
    mark.write_text(ident)
    return _tree(root)


# A unix-port-only bug of MicroPython 1.28 (extmod/modselect.c, the POSIX
# poll optimisation the boards do not use): when the pollfd array moves,
# every registered object's pollfd pointer is rebased, including the NULL
# one of an object without a file descriptor (a TLS socket), which then
# points into nowhere; the next poll of it crashes the process (SIGSEGV,
# seen with one TLS client among 20 sockets). The twin gets the one-line
# fix, applied to the unpacked release only; a MICROPYTHON_SRC checkout is
# built as it is.
_POLL_BUG = """                    if (!poll_obj) {"""
_POLL_FIX = """                    if (!poll_obj || !poll_obj->pollfd) {"""


def _fix_poll(tree):
    f = tree / "extmod" / "modselect.c"
    text = f.read_text()
    if _POLL_BUG in text:
        f.write_text(text.replace(_POLL_BUG, _POLL_FIX, 1))
        _say("patched extmod/modselect.c (pollfd rebase of objects without a file descriptor)")


def _tree(root):
    # The release tarballs hold one folder, micropython-X.Y.Z/.
    for d in [root] + sorted(root.iterdir()):
        if (d / "ports" / "unix" / "Makefile").exists():
            return d
    raise TwinError("%s holds no MicroPython source tree" % root)


def _check_compiler():
    probe = subprocess.run(["gcc", "-m32", "-x", "c", "-o", "/dev/null", "-"], input=b"int main(void){return 0;}",
                           capture_output=True)
    if probe.returncode != 0:
        raise TwinError("gcc cannot build 32-bit programs; install Debian's gcc-multilib "
                        "(make sysdeps does): %s" % probe.stderr.decode(errors="replace").strip()[:300])


def _stamp(variant):
    return OUT / ("%s.inputs.sha256" % variant)


def build(variant="broker"):
    # -> the binary's path, built first when an input changed.
    binary, manifest, _ = VARIANTS[variant]
    src, src_id = _source()
    want = _inputs(src_id, variant)
    stamp = _stamp(variant)
    if binary.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return binary
    _check_compiler()
    obj = OUT / ("obj-%s" % variant)
    cmd = ["make", "-C", str(src / "ports" / "unix"), "-j%d" % (os.cpu_count() or 2),
           "BUILD=%s" % obj, "VARIANT_DIR=%s" % VARIANT_DIR, "FROZEN_MANIFEST=%s" % manifest] + MAKE_FLAGS
    if variant == "tlsheap":
        # m_tracked_calloc exists only with MICROPY_TRACKED_ALLOC, which the
        # unix port turns on only for ffi (off here). The config file's
        # name is a C string literal: the backslashes keep its quotes
        # through the shell that make runs the compiler from.
        cmd = [("CFLAGS_EXTRA=-m32 -DMICROPY_TRACKED_ALLOC=1" if c == "CFLAGS_EXTRA=-m32" else c) for c in cmd]
        cmd.append('MBEDTLS_CONFIG_FILE=\\"%s\\"' % TLSHEAP_CONFIG)
    # mpy-cross first, on its own: the port's make would build it with
    # the port's BUILD and flags, which are passed down to sub-makes.
    mpy_cross = ["make", "-C", str(src / "mpy-cross"), "-j%d" % (os.cpu_count() or 2)]
    # make does not see a change of flags: objects built with other flags go.
    flags = obj / ".flags"
    if obj.exists() and (not flags.exists() or flags.read_text() != " ".join(cmd[4:])):
        shutil.rmtree(obj)
    _say("building %s (about 40 s on 2 cores): %s" % (binary.name, " ".join(cmd)))
    log = OUT / ("build-%s.log" % variant)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(mpy_cross, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode == 0:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise TwinError("build failed (full log: %s):\n%s" % (log, "\n".join(tail)))
    # Copied beside it and renamed over it: a running twin keeps its file.
    tmp = binary.with_name(binary.name + ".new")
    shutil.copy2(obj / "micropython", tmp)
    os.replace(tmp, binary)
    flags.write_text(" ".join(cmd[4:]))
    stamp.write_text(want + "\n")
    _say("built %s" % binary)
    return binary


def current():
    try:
        src, src_id = _source()
    except TwinError:
        return False
    for v in DEFAULT_VARIANTS:
        binary = VARIANTS[v][0]
        st = _stamp(v)
        if not (binary.exists() and st.exists() and st.read_text().strip() == _inputs(src_id, v)):
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", action="store_true", help="print the binary's path")
    ap.add_argument("--stock", action="store_true", help="with --path: the stock binary")
    ap.add_argument("--check", action="store_true", help="exit 1 unless both binaries are current")
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="build (or with --path: print) this one only")
    a = ap.parse_args()
    if a.check:
        return 0 if current() else 1
    try:
        if a.path:
            print(build(a.variant or ("stock" if a.stock else "broker")))
        elif a.variant:
            build(a.variant)
        else:
            for v in DEFAULT_VARIANTS:
                build(v)
    except TwinError as e:
        print("twin: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
