#!/usr/bin/env python3
"""Check lib/ and firmware/ against the APIs the boards really have.

Two passes, run for each port (esp32, rp2):

1. pyright against that port's MicroPython stubs only. The stubs are
   installed into typings/<port>/ (one folder per port: installed side by
   side they overwrite each other), serve as pyright's typeshed, and pyright
   is pointed at an empty site-packages so neither CPython's standard library
   nor the venv's packages can satisfy an import. Only the rules that catch
   a missing module, attribute or name, or a call that matches no signature,
   are on, so untyped code needs no annotations; and what pyright merely
   infers about untyped code (attributes of the project's own classes, of
   None, "X is not callable") is dropped, see inference_noise().
   Catches: `import hmac`, `import logging`, `time.monotonic`,
   `asyncio.get_running_loop`, `socket.sockaddr` (unix port only),
   `hashlib.sha256().copy()`, `import esp32` on rp2, undefined names.

2. "port-lint", a small AST pass for what the stubs declare but the boards
   lack: modules that exist in the stubs only so that type checkers work
   (`typing`, `abc`, `enum`, `__future__`, ...) and names missing from
   MicroPython's asyncio (`Queue`, `Semaphore`, `TaskGroup`, ...; the list of
   what asyncio has was read from the 1.29 unix port, and asyncio is the same
   frozen Python on every port).

Deliberate uses, allowed:
- In both passes: an import inside a `try` statement (body or handlers)
  that has an `except ImportError` or a bare except; an attribute inside one
  that catches ImportError or AttributeError; anything under
  `if TYPE_CHECKING:` / `if False:`. This covers the usual CPython fallback.
- `asyncio.core` (MicroPython's asyncio internals, present on every port)
  is missing from the stubs; a small overlay stub lets any attribute of it
  through, so `from asyncio import core; core._io_queue` checks clean.
- STUB_GAPS: the few methods every port has that the stubs lack.
- Any other line that must use a port-specific API on purpose (a unix-only
  call, a feature test) ends with
  `# pyright: ignore[reportAttributeAccessIssue]` (the rule the error
  names) for pass 1, or `# port-lint: ok` for pass 2.

Usage: tools/typecheck.py [--port esp32|rp2]... [FILE...]
Without FILEs every .py under lib/ and firmware/ is checked.
Run it with the venv's Python (make check does).
"""
import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TYPINGS = REPO / "typings"
CONFIGS = REPO / "build" / "typecheck"
SOURCE_DIRS = ("lib", "firmware")

STDLIB_STUBS = "micropython-stdlib-stubs==1.29.0.post2"
PORTS = {
    "esp32": ["micropython-esp32-stubs==1.29.0.post1", STDLIB_STUBS],
    "rp2": ["micropython-rp2-stubs==1.29.0.post1", STDLIB_STUBS],
}

# pyright: everything off except the rules that find missing APIs.
PYRIGHT_RULES = {
    "typeCheckingMode": "off",
    "reportMissingImports": "error",
    "reportAttributeAccessIssue": "error",
    "reportUndefinedVariable": "error",
    "reportCallIssue": "error",
    "reportMissingModuleSource": "none",  # stub-only modules are the norm here
}

CORE_OVERLAY = (
    "# Written by tools/typecheck.py: MicroPython's asyncio internals, which\n"
    "# the stubs lack. Any attribute is allowed; the module itself exists on\n"
    "# every port.\n"
    "from typing import Any\n\n"
    "def __getattr__(name: str) -> Any: ...\n"
)

# Modules the stubs carry (for the type checker's own use) that the boards
# do not have.
NOT_ON_BOARDS = {
    "typing", "typing_extensions", "abc", "enum", "types", "dataclasses",
    "__future__", "collections.abc", "_typeshed", "_collections_abc", "_ast",
    "_codecs", "_decimal", "sre_compile", "sre_constants", "sre_parse",
    "mypy_extensions", "_mpy_shed",
}
# Everything MicroPython 1.29's asyncio package exposes (dir() plus its lazy
# attributes, unix port). Any other asyncio.X is an error.
ASYNCIO_HAS = {
    "CancelledError", "Event", "IOQueue", "Lock", "Loop", "SingletonGenerator",
    "StreamReader", "StreamWriter", "Task", "TaskQueue", "ThreadSafeFlag",
    "TimeoutError", "core", "create_task", "cur_task", "current_task", "event",
    "gather", "get_event_loop", "new_event_loop", "open_connection", "run",
    "run_until_complete", "select", "sleep", "sleep_ms", "start_server",
    "stream", "sys", "ticks", "ticks_add", "ticks_diff", "wait_for",
    "wait_for_ms", "__version__", "__name__", "__file__", "__path__", "__dict__",
}
ASYNCIO_NAMES = ("asyncio", "uasyncio")
# A try whose handler names one of these guards what its body uses.
GUARD_IMPORT = {"ImportError", "ModuleNotFoundError"}
GUARD_ATTR = GUARD_IMPORT | {"AttributeError"}


def rel(p):
    p = Path(p).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def source_files():
    out = []
    for d in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(REPO / d):
            dirnames[:] = sorted(x for x in dirnames if x != "__pycache__" and not x.startswith("."))
            out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return out


# ---------------------------------------------------------------- stubs

def ensure_stubs(port):
    """Install the port's pinned stubs into typings/<port>/ unless the pins
    recorded there already match. Returns the folder."""
    dest = TYPINGS / port
    pins = "\n".join(PORTS[port]) + "\n"
    stamp = dest / ".pins"
    if not (stamp.exists() and stamp.read_text() == pins):
        tmp = TYPINGS / (port + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print("typecheck: installing %s stubs into %s" % (port, rel(dest)))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
               "--no-deps", "--target", str(tmp), *PORTS[port]]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stdout + p.stderr)
            sys.exit("typecheck: pip could not install the %s stubs" % port)
        (tmp / ".pins").write_text(pins)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    core = dest / "stdlib" / "asyncio" / "core.pyi"
    if not core.exists() or core.read_text() != CORE_OVERLAY:
        core.write_text(CORE_OVERLAY)
    return dest


def empty_venv():
    # A venv-shaped folder with an empty site-packages: pyright then has no
    # interpreter search paths (CPython's stdlib would satisfy `import hmac`).
    v = TYPINGS / "novenv"
    (v / "lib" / "python3.11" / "site-packages").mkdir(parents=True, exist_ok=True)
    return v


# ---------------------------------------------------------------- guards

def _handler_names(h):
    if h.type is None:
        return None  # bare except
    types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
    return {t.id if isinstance(t, ast.Name) else getattr(t, "attr", "") for t in types}


def guarded_lines(tree):
    """Lines where a missing API is deliberate. Returns (imports, attrs):
    sets of line numbers inside a `try` statement (body and handlers) whose
    handlers catch ImportError (imports), or ImportError/AttributeError
    (attributes), or everything; plus lines under `if TYPE_CHECKING:` or
    `if False:` (both sets)."""
    imports, attrs = set(), set()
    for node in ast.walk(tree):
        lines = None
        if isinstance(node, ast.Try):
            lines = range(node.lineno, node.end_lineno + 1)
            for h in node.handlers:
                names = _handler_names(h)
                if names is None or names & GUARD_IMPORT:
                    imports.update(lines)
                if names is None or names & GUARD_ATTR:
                    attrs.update(lines)
        elif isinstance(node, ast.If):
            t = node.test
            if ((isinstance(t, ast.Constant) and not t.value)
                    or (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING")
                    or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")):
                lines = range(node.lineno, node.body[-1].end_lineno + 1)
                imports.update(lines)
                attrs.update(lines)
    return imports, attrs


_guard_cache = {}


def guards_for(path):
    path = Path(path).resolve()
    if path not in _guard_cache:
        try:
            _guard_cache[path] = guarded_lines(ast.parse(path.read_text(), str(path)))
        except (OSError, SyntaxError, ValueError):
            _guard_cache[path] = (set(), set())
    return _guard_cache[path]


# ---------------------------------------------------------------- pass 1

GUARDABLE = {"reportMissingImports": 0, "reportAttributeAccessIssue": 1}  # index into guards_for()
_ATTR_ON_CLASS = re.compile(r'Cannot (access|assign to) attribute "([^"]*)" for class "(?:type\[)?([\w.]+)')
# Methods every port has that the pinned stubs lack (checked on the unix
# port and in MicroPython's docs): class name -> attribute names.
STUB_GAPS = {"StringIO": {"getvalue"}, "BytesIO": {"getvalue"}}


def own_classes(files):
    """Names of the classes defined in the checked sources (and the tree)."""
    names = set()
    for f in set(files) | set(source_files()):
        try:
            tree = ast.parse(Path(f).read_text(), str(f))
        except SyntaxError:
            continue
        names.update(n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef))
    return names


def inference_noise(d, classes):
    """True for what pyright infers about untyped code rather than about the
    ports' APIs: attributes of the project's own classes (pyright cannot narrow
    a packet by its type tag, and takes `x = None` in a class body as x's
    type), attributes of None (an Optional not narrowed), assignments whose
    value type differs from an inferred one, and 'X is not callable' on
    inferred values. Also the few STUB_GAPS."""
    rule, msg = d.get("rule"), d["message"]
    first = msg.split("\n")[0]
    if rule == "reportAttributeAccessIssue":
        m = _ATTR_ON_CLASS.match(first)
        if m:
            kind, attr, cls = m.groups()
            if cls in classes or cls == "None" or attr in STUB_GAPS.get(cls, ()):
                return True
            if kind == "assign to" and "is unknown" not in msg:
                return True
    if rule == "reportCallIssue" and first.endswith("is not callable"):
        return True
    return False


def pyright(port, stubs, files):
    venv = empty_venv()
    cfg = dict(PYRIGHT_RULES)
    cfg.update({
        "typeshedPath": str(stubs),
        "stubPath": str(stubs),
        "extraPaths": [str(REPO / "lib"), str(REPO / "firmware")],
        "venvPath": str(venv.parent),
        "venv": venv.name,
        "pythonVersion": "3.11",
        "pythonPlatform": "Linux",
    })
    CONFIGS.mkdir(parents=True, exist_ok=True)
    path = CONFIGS / ("pyright-%s.json" % port)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    env = dict(os.environ, PYRIGHT_PYTHON_IGNORE_WARNINGS="1")  # no PyPI version query
    env.pop("PYRIGHT_PYTHON_FORCE_VERSION", None)  # always the bundled, pinned pyright
    cmd = [sys.executable, "-m", "pyright", "--outputjson", "-p", str(path), *map(str, files)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    try:
        report = json.loads(p.stdout)
    except ValueError:
        print("[%s] pyright failed to run (exit %d):\n%s%s" % (port, p.returncode, p.stdout, p.stderr))
        return False
    errors, allowed, noise = [], 0, 0
    classes = own_classes(files)
    for d in report.get("generalDiagnostics", []):
        if d.get("severity") != "error":
            continue
        if inference_noise(d, classes):
            noise += 1
            continue
        line = d["range"]["start"]["line"] + 1
        col = d["range"]["start"]["character"] + 1
        rule = d.get("rule", "")
        if rule in GUARDABLE and Path(d["file"]).exists():
            if line in guards_for(d["file"])[GUARDABLE[rule]]:
                allowed += 1
                continue
        msg = d["message"].replace("\n", "\n" + " " * 8)
        errors.append("[%s] %s:%d:%d - error: %s (%s)" % (port, rel(d["file"]), line, col, msg, rule or "pyright"))
    for e in errors:
        print(e)
    note = ", %d inside try/except ImportError or AttributeError (allowed)" % allowed if allowed else ""
    note += ", %d about inferred types of untyped code (ignored)" % noise if noise else ""
    print("[%s] pyright %s: %d error(s) in %d file(s)%s"
          % (port, report.get("version", "?"), len(errors), report["summary"]["filesAnalyzed"], note))
    return not errors


# ---------------------------------------------------------------- pass 2

def port_lint(path):
    src = Path(path).read_text()
    lines = src.splitlines()
    tree = ast.parse(src, str(path))
    g_imports, g_attrs = guards_for(path)
    problems = []
    aliases = set()  # local names bound to the asyncio module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name for a in node.names if a.name in ASYNCIO_NAMES)

    def report(node, guarded, msg):
        if node.lineno in guarded or "port-lint: ok" in lines[node.lineno - 1]:
            return
        problems.append((node.lineno, node.col_offset, msg))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in NOT_ON_BOARDS or a.name.split(".")[0] in NOT_ON_BOARDS:
                    report(node, g_imports, 'module "%s" does not exist on the boards' % a.name)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            m = node.module
            if m in NOT_ON_BOARDS or m.split(".")[0] in NOT_ON_BOARDS:
                report(node, g_imports, 'module "%s" does not exist on the boards' % m)
            elif m in ASYNCIO_NAMES:
                for a in node.names:
                    if a.name != "*" and a.name not in ASYNCIO_HAS:
                        report(node, g_imports, '"%s" is not in MicroPython\'s asyncio' % a.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in aliases and node.attr not in ASYNCIO_HAS):
            report(node, g_attrs, '"asyncio.%s" is not in MicroPython\'s asyncio' % node.attr)
    return ["%s:%d:%d - error: %s (port-lint)" % (rel(path), ln, col + 1, msg)
            for ln, col, msg in sorted(problems)]


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description="Type-check lib/ and firmware/ against the port stubs.")
    ap.add_argument("--port", action="append", choices=sorted(PORTS), help="repeatable; default: all")
    ap.add_argument("files", nargs="*", help="default: every .py under lib/ and firmware/")
    a = ap.parse_args(argv)
    files = [Path(f).resolve() for f in a.files] or source_files()
    if not files:
        print("typecheck: no files")
        return 0

    problems = []
    for f in files:
        try:
            problems += port_lint(f)
        except SyntaxError as e:
            problems.append("%s:%s - error: %s" % (rel(f), e.lineno, e.msg))
    for p in problems:
        print(p)
    ok = not problems

    for port in a.port or list(PORTS):
        ok = pyright(port, ensure_stubs(port), files) and ok

    n = len(files)
    if ok:
        print("typecheck: OK, %d file(s), ports %s" % (n, ", ".join(a.port or PORTS)))
        return 0
    print("typecheck: FAILED (%d file(s) checked)" % n)
    return 1


if __name__ == "__main__":
    sys.exit(main())
