"""`make run`'s command (tools/broker): starts the broker under the unix
port with the board's heap, stops cleanly on SIGTERM and SIGINT, and refuses
a bad config with an error that names the key, before opening a socket."""
import json
import signal
import socket
import subprocess
import sys
import time

from conftest import REPO, free_port

BROKER = [sys.executable, str(REPO / "tools" / "broker")]


def _start(args):
    return subprocess.Popen(BROKER + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL)


def _wait_port(port, proc, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("broker did not listen on %d" % port)


def _stop_with(sig):
    port = free_port()
    p = _start(["--board", "esp32", "--port", str(port)])
    try:
        _wait_port(port, p)
        p.send_signal(sig)
        rc = p.wait(10)
        out = p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return rc, out


def test_sigterm_stops_the_broker_cleanly():
    rc, out = _stop_with(signal.SIGTERM)
    assert rc == 0, out
    assert "stopped" in out and "Traceback" not in out, out


def test_sigint_stops_the_broker_cleanly():
    rc, out = _stop_with(signal.SIGINT)
    assert rc == 0, out
    assert "stopped" in out and "Traceback" not in out, out


def test_local_run_says_anonymous_clients_are_allowed():
    port = free_port()
    p = _start(["--board", "esp32", "--port", str(port)])
    try:
        _wait_port(port, p)
    finally:
        p.send_signal(signal.SIGINT)
        out = p.communicate(timeout=10)[0]
    assert "anonymous clients are allowed" in out
    # On the board twin with the esp32 profile's heap, code frozen in.
    assert "build/twin/micropython -X heapsize=110000" in out and "--code frozen" in out


def _refused(tmp_path, cfg):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(cfg))
    port = free_port()
    p = subprocess.run(BROKER + ["--port", str(port), "--config", str(f)], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


def test_unknown_config_key_stops_the_start_naming_the_key(tmp_path):
    rc, out = _refused(tmp_path, {"max_conections": 3})
    assert rc == 2 and "max_conections" in out, out
    assert "listening" not in out


def test_bad_config_value_stops_the_start_naming_the_key(tmp_path):
    rc, out = _refused(tmp_path, {"max_connections": "many"})
    assert rc == 2 and "max_connections" in out, out
    rc, out = _refused(tmp_path, {"max_keepalive": 0})
    assert rc == 2 and "max_keepalive" in out, out


def test_config_that_is_not_json_is_refused_with_the_file_named(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text("{port: 1")
    p = subprocess.run(BROKER + ["--config", str(f)], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "broken.json" in p.stdout + p.stderr
