"""`make run`'s command (tools/broker): starts the broker under the unix
port with the board's heap, stops cleanly on SIGTERM and SIGINT, ends with
the command or `make run` when either is killed with SIGKILL, and refuses
a bad config with an error that names the key, before opening a socket."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from brokerproc import twin_binary
from mqttc import connect_bytes
from conftest import REPO, free_port

BROKER = [sys.executable, str(REPO / "tools" / "broker")]


def _start(args, cwd):
    # cwd: a test's own directory, where `make run` keeps its store ("data",
    # under the current directory), not the checkout.
    return subprocess.Popen(BROKER + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL, cwd=str(cwd))


def _make_run(port, tmp_path):
    # `make run` itself, as a user (or an outside test) starts it, with its
    # store in the test's directory (a config file that names it).
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"persistence_location": str(tmp_path / "data"), "bind_address": "127.0.0.1"}))
    return subprocess.Popen(["make", "--no-print-directory", "run", "PORT=%d" % port, "CONFIG=%s" % cfg],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, cwd=str(REPO))


class _Output:
    """The broker's output, read to its end by a thread of its own. The
    broker listens a moment before it logs "broker ready": a signal sent
    as soon as the port took a connection could stop it before the notices
    a test reads, so tests wait for that line (wait_ready())."""

    def __init__(self, proc):
        self.lines = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.reader.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)
            if "broker ready" in line:
                self.ready.set()

    def wait_ready(self, timeout=20):
        end = time.time() + timeout
        while not self.ready.wait(0.05):
            assert self.reader.is_alive(), "the broker ended before it was ready:\n" + self.text()
            assert time.time() < end, "not ready within %d s:\n%s" % (timeout, self.text())

    def text(self, proc=None):
        # All of it, once proc (when given) has ended.
        if proc is not None:
            proc.wait(10)
            self.reader.join(10)
        return "".join(self.lines)


def _stop_with(sig, cwd, make=False):
    port = free_port()
    p = _make_run(port, cwd) if make else _start(["--board", "esp32", "--port", str(port)], cwd)
    try:
        o = _Output(p)
        o.wait_ready()
        p.send_signal(sig)
        rc = p.wait(10)
        out = o.text(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return rc, out


def test_sigterm_stops_the_broker_cleanly(tmp_path):
    rc, out = _stop_with(signal.SIGTERM, tmp_path)
    assert rc == 0, out
    assert "stopped" in out and "Traceback" not in out, out


def test_sigint_stops_the_broker_cleanly(tmp_path):
    rc, out = _stop_with(signal.SIGINT, tmp_path)
    assert rc == 0, out
    assert "stopped" in out and "Traceback" not in out, out


def test_sigterm_of_make_run_stops_the_broker_cleanly(tmp_path):
    # make passes SIGTERM on to its recipe's command.
    rc, out = _stop_with(signal.SIGTERM, tmp_path, make=True)
    assert "stopped" in out and "Traceback" not in out, out


@pytest.mark.parametrize("started_by", ["the command", "make run"])
def test_sigkill_of_what_started_the_broker_kills_it_and_frees_its_port(tmp_path, started_by):
    # A power cut as a test makes one, on the PID it started: the broker
    # must not live on behind the wrapper, or behind make, holding the port
    # (make passes SIGKILL on to nobody).
    port = free_port()
    if started_by == "make run":
        p = _make_run(port, tmp_path)
    else:
        p = _start(["--board", "esp32", "--port", str(port)], tmp_path)
    below = []  # make's child, the wrapper: killed here if the test fails
    try:
        _Output(p).wait_ready()
        if started_by == "make run":
            below = [int(x) for x in Path("/proc/%d/task/%d/children" % (p.pid, p.pid)).read_text().split()]
        p.kill()
        p.wait(10)
        end = time.time() + 10
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the broker still listens on %d after %s was killed" % (port, started_by))
        q = _start(["--board", "esp32", "--port", str(port)], tmp_path)  # and it starts again there
        try:
            _Output(q).wait_ready()
        finally:
            q.send_signal(signal.SIGINT)
            assert q.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for pid in below:  # (SIGKILL of the wrapper ends the broker: tools/broker)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_local_run_says_anonymous_clients_are_allowed(tmp_path):
    port = free_port()
    p = _start(["--board", "esp32", "--port", str(port)], tmp_path)
    o = _Output(p)
    try:
        o.wait_ready()
    finally:
        p.send_signal(signal.SIGINT)
    out = o.text(p)
    assert "anonymous clients are allowed" in out
    # On the board twin with the esp32 profile's heap, code frozen in.
    assert "build/twin/micropython -X heapsize=110000" in out and "--code frozen" in out


def test_local_run_serves_a_burst_of_connections_from_one_loopback_address_at_once(tmp_path):
    # A test suite on this machine connects far faster than the boards'
    # max_connection_rate (30 per 10 s per address, then each one held back
    # up to 1 s): local-only mode turns it off, as it lets anonymous
    # clients in.
    port = free_port()
    p = _start(["--board", "esp32", "--port", str(port)], tmp_path)
    o = _Output(p)
    try:
        o.wait_ready()
        for i in range(80):
            s = socket.create_connection(("127.0.0.1", port), timeout=3)
            s.sendall(connect_bytes("burst-%d" % i, version=4, username=None))
            ack = s.recv(4)
            s.sendall(b"\xe0\x00")  # DISCONNECT
            s.close()
            assert ack == b"\x20\x02\x00\x00", "connection %d: CONNACK %r" % (i, ack)
    finally:
        p.send_signal(signal.SIGINT)
    out = o.text(p)
    assert "connection rate from" not in out, out[-2000:]


def test_config_file_port_and_bind_address_apply_without_port_and_bind_options(tmp_path):
    # They were always replaced by the command's defaults, 1883 and
    # 127.0.0.1. (127.0.0.2 is this machine too, on Linux.)
    port = free_port()
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"port": port, "bind_address": "127.0.0.2"}))
    p = _start(["--config", str(f)], tmp_path)
    o = _Output(p)
    try:
        o.wait_ready()
        socket.create_connection(("127.0.0.2", port), timeout=3).close()
    finally:
        p.send_signal(signal.SIGINT)
    out = o.text(p)
    assert "listening on 127.0.0.2:%d " % port in out, out


def _refused(tmp_path, cfg):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(cfg))
    port = free_port()
    p = subprocess.run(BROKER + ["--port", str(port), "--config", str(f)], capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=str(tmp_path))
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


def test_config_key_given_twice_is_refused_naming_the_key(tmp_path):
    # The last one was taken, silently.
    f = tmp_path / "twice.json"
    f.write_text('{"max_connections": 4, "max_connections": 40}')
    p = subprocess.run(BROKER + ["--config", str(f)], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL, cwd=str(tmp_path))
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "config file %s: key 'max_connections' given twice" % f in out, out


def test_config_that_is_not_utf8_is_refused_with_the_file_named(tmp_path):
    # It was a raw traceback (UnicodeError) and exit 1.
    f = tmp_path / "latin1.json"
    f.write_bytes(b'{"log_dest": "caf\xe9"}')
    p = subprocess.run(BROKER + ["--config", str(f)], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "config file %s is not UTF-8 text" % f in out, out
    assert "Traceback" not in out, out


def test_password_file_that_is_not_utf8_is_refused_naming_the_file_and_line(tmp_path):
    # The error said nothing at all: "error: ".
    pw = tmp_path / "passwd"
    pw.write_bytes(b"caf\xe9:$7$101$c2FsdA==$aGFzaA==\n")
    rc, out = _refused(tmp_path, {"password_file": str(pw)})
    assert rc == 2 and "password_file %s line 1: not UTF-8 text" % pw in out, out


def test_persistence_location_that_cannot_be_made_is_refused_naming_the_key_and_path(tmp_path):
    # It was "error: [Errno 2] ENOENT" for /proc/nope, naming neither.
    (tmp_path / "a_file").write_text("")
    where = str(tmp_path / "a_file" / "store")
    rc, out = _refused(tmp_path, {"persistence": True, "persistence_location": where})
    assert rc == 2 and "persistence_location %s: cannot use it (" % where in out, out


def test_listener_that_cannot_listen_stops_the_start_naming_its_address_and_port(tmp_path):
    # Two listeners on one port: it was "error: [Errno 98] EADDRINUSE".
    port = free_port()
    rc, out = _refused(tmp_path, {"listeners": [{"port": port}, {"port": port}]})
    assert rc == 2 and "listener 127.0.0.1:%d: cannot listen there (" % port in out, out


def test_min_free_heap_that_leaves_no_room_for_a_client_stops_the_start(tmp_path):
    # More than the esp32's 110,000 B heap: it said "broker ready", then
    # refused every client.
    rc, out = _refused(tmp_path, {"min_free_heap": 200000})
    assert rc == 2 and "min_free_heap 200000 leaves no room for a client" in out, out
    assert "listening" not in out and "ready" not in out, out


GC_LOOP = """
import gc
keep = [[i, str(i)] for i in range(800)]
print("collecting")
try:
    while True:
        gc.collect()
except KeyboardInterrupt:
    more = [0] * 1000
    print("interrupted; the heap still gives", len(more))
"""


def test_ctrl_c_during_a_garbage_collection_leaves_the_heap_usable(tmp_path):
    # The twin takes Ctrl-C between bytecodes, as a board does. The unix
    # port's own way, raising from the signal handler, left a collection's
    # flag set when the signal came during one: every allocation after it
    # failed with "heap is locked", and the broker's final save with it.
    # This program spends nearly all its time collecting.
    script = tmp_path / "gc_loop.py"
    script.write_text(GC_LOOP)
    for attempt in range(3):
        p = subprocess.Popen([str(twin_binary("broker")), "-X", "heapsize=110000", str(script)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert p.stdout.readline().strip() == "collecting"
            time.sleep(0.3)
            p.send_signal(signal.SIGINT)
            out = p.communicate(timeout=10)[0]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0 and "the heap still gives 1000" in out, "attempt %d: exit %s\n%s" % (
            attempt + 1, p.returncode, out)


@pytest.mark.parametrize("cfg,named", [
    # (outside config probe: each ended in a traceback, or was taken)
    ({"listeners": [{"port": 0, "bind_address": 5}]}, "'listeners'[0]: 'bind_address' must be a string"),
    ({"read_buffer_size": 65536}, "read_buffer_size 65536 and write_buffer_size 1024: no room in the heap"),
    ({"write_buffer_size": 1 << 20}, "write_buffer_size 1048576: no room in the heap"),
    ({"max_sessions": 0}, "config key 'max_sessions': 0 is outside 1..10000"),
    ({"log_dest": "stdout,flie"}, "config key 'log_dest': expected stdout, file or both"),
])
def test_a_config_value_the_start_cannot_use_stops_it_naming_the_key(tmp_path, cfg, named):
    rc, out = _refused(tmp_path, cfg)
    assert rc == 2 and named in out, out
    assert "Traceback" not in out and "listening" not in out, out


@pytest.mark.parametrize("text", ["[]", "null", "false", "0", '""'])
def test_a_config_file_that_is_json_but_not_an_object_is_refused(tmp_path, text):
    # A falsy one was taken for no file at all: the broker started on the
    # profile's defaults.
    f = tmp_path / "notobject.json"
    f.write_text(text)
    p = subprocess.run(BROKER + ["--port", str(free_port()), "--config", str(f)], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL, cwd=str(tmp_path))
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "config file %s: expected a JSON object" % f in out, out


def test_a_password_or_acl_file_the_broker_cannot_use_is_refused_naming_the_key_and_file(tmp_path):
    # A folder: "error: [Errno 21] EISDIR", naming neither.
    rc, out = _refused(tmp_path, {"password_file": str(tmp_path)})
    assert rc == 2 and "password_file %s: cannot read it (" % tmp_path in out, out
    # U+0000 is in no topic (MQTT-4.7.3-2): such a line grants nothing anyone can use.
    acl = tmp_path / "acl"
    acl.write_text("topic read a\0b\n")
    rc, out = _refused(tmp_path, {"acl_file": str(acl)})
    assert rc == 2 and "acl_file %s line 1: bad topic filter" % acl in out, out
