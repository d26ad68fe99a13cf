"""The suite never skips quietly.

A test that needs a program asks conftest.need() for it: with CI=true a
missing one fails the test, naming it and how make test installs it;
elsewhere the test is skipped with the same words. No other skip for a
missing tool may come back: the tests below run need() in a pytest of its
own, and look for skip calls in host_tests/. Nor does the harness hand a
test a restarted broker before that start said it was ready.
"""
import os
import re
import subprocess
import sys

from conftest import REPO

HERE = REPO / "host_tests"
# Skips that are not about a missing tool, each with its reason.
KNOWN_SKIPS = {
    # Behaviour, not a tool: when the broker closed the slow subscriber
    # there are no drops of its own to count (the broker core's test).
    ("test_broker_13_limits.py", 'pytest.skip("slow subscriber was disconnected; nothing to count")'),
}
INNER = """
from conftest import need

def test_needs_a_missing_tool():
    need("no-such-tool-here")
"""


def _inner(tmp_path, ci):
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "--confcutdir", str(HERE), str(tmp_path / "test_inner.py")],
                          capture_output=True, text=True, timeout=300, cwd=str(HERE), env=env)


def test_a_missing_tool_fails_under_ci(tmp_path):
    r = _inner(tmp_path, ci=True)
    assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout + r.stderr
    assert "CI=true: no-such-tool-here is not installed" in r.stdout, r.stdout


def test_a_missing_tool_skips_elsewhere_saying_which(tmp_path):
    r = _inner(tmp_path, ci=False)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout + r.stderr
    assert "no-such-tool-here is not installed" in r.stdout, r.stdout


def test_no_other_skips_in_the_suite():
    found = set()
    pat = re.compile(r"pytest\.skip\(.*\)|pytest\.mark\.skip(if)?\b.*|pytest\.importorskip\(.*\)")
    for p in sorted(HERE.glob("*.py")):
        if p.name in ("conftest.py", "test_suite_rules.py"):
            continue
        for m in pat.finditer(p.read_text()):
            found.add((p.name, m.group(0).strip()))
    assert found <= KNOWN_SKIPS, "skips not through conftest.need(): %s" % sorted(found - KNOWN_SKIPS)


def test_a_restarted_broker_is_ready_only_once_its_own_start_says_so(tmp_path):
    # BrokerProc keeps one log across restarts. A broker listens a moment
    # before it logs "broker ready": once, the restart took the previous
    # start's line and returned, and the test read a log its broker had not
    # finished writing. This stand-in listens a second before it says so.
    from brokerproc import BrokerProc

    script = tmp_path / "slow_ready.py"
    script.write_text(
        "import sys, socket, time\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(socket.getaddrinfo('127.0.0.1', port)[0][-1])\n"
        "s.listen(4)\n"
        "print('listening')\n"
        "time.sleep(1)\n"
        "print('broker ready')\n"
        "while True:\n"
        "    time.sleep(1)\n")
    b = BrokerProc(script=str(script))
    try:
        b.start()
        assert b.log().count("broker ready") == 1, b.log()
        b.kill9()
        b.start()
        assert b.log().count("broker ready") == 2, b.log()
    finally:
        b.kill9()
