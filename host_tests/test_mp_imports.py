"""Every module of lib/ and firmware/ imports under the MicroPython unix port.

This catches what the stub-based type check cannot see: names that exist in
the stubs but not at run time (`os.fsync`, `Server.serve_forever`, `import
typing`, ...) when they are used at import time, plus syntax MicroPython
rejects. One test per module, named after it. Skipped: firmware/boot.py and
firmware/main.py (they start the board), and modules that import `network`
or `machine` at top level (the unix port has no network, and only a minimal
machine); the device tests cover those.
"""
import os
import re

import pytest

from conftest import REPO, run_mp

SKIP_FILES = {os.path.join("firmware", "boot.py"), os.path.join("firmware", "main.py")}
# An unindented import of network or machine: `import network`,
# `import os, machine`, `from machine import Pin`, `import machine as m`.
BOARD_ONLY = re.compile(r"^(?:import\s+(?:[\w.]+(?:\s+as\s+\w+)?\s*,\s*)*(?:network|machine)\b"
                        r"|from\s+(?:network|machine)\b)", re.M)


def discover():
    mods = []
    for top in ("lib", "firmware"):
        root = REPO / top
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                if os.path.relpath(path, REPO) in SKIP_FILES:
                    continue
                with open(path) as f:
                    if BOARD_ONLY.search(f.read()):
                        continue
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                if parts:
                    mods.append(".".join(parts))
    return mods


MODULES = discover()


def test_modules_are_found():
    # An empty list would leave test_import with nothing to run.
    assert "broker.app" in MODULES and "mqtt.packets" in MODULES, MODULES


@pytest.mark.parametrize("module", MODULES)
def test_import(module):
    # Imported from source, which MicroPython compiles on the fly: that needs
    # far more heap than loading the .mpy a board gets, so the heap here is
    # roomy (the unix board profile's); memory budgets are other tests' job.
    r = run_mp("import %s\nprint('imported', %r)\n" % (module, module), heap="4M", timeout=30)
    assert r.returncode == 0 and ("imported " + module) in r.stdout, (
        "import %s failed under MicroPython (exit %d):\n%s%s" % (module, r.returncode, r.stdout, r.stderr))
