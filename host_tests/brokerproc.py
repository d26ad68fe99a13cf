"""Start the real broker as a process under the MicroPython unix port.

    with BrokerProc(board="esp32", config={"max_connections": 2}) as b:
        b.port            # ephemeral port it listens on (127.0.0.1)
        b.log()           # everything it printed so far
        b.kill9()         # power cut: SIGKILL
        b.restart()       # same config, same port, same store directory

The heap is the board profile's `host_heap` (what the 64-bit unix port needs
to mimic the board's free heap) unless `heap` is given. The broker runs from
the compiled .mpy files in build/host, as a board runs them; they are
rebuilt once per test session.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MICROPYTHON = REPO / ".venv" / "bin" / "micropython"
_built = False


def build_host():
    global _built
    if not _built:
        subprocess.run([sys.executable, str(REPO / "tools" / "build.py"), "--target", "host", "-q"],
                       check=True, cwd=str(REPO))
        _built = True


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def profile(board):
    return json.loads((REPO / "boards" / ("%s.json" % board)).read_text())


class BrokerProc:
    def __init__(self, board="esp32", config=None, heap=None, port=None, datadir=None):
        self.board = board
        self.heap = heap or profile(board).get("host_heap") or 2 * profile(board)["heap"]
        self.port = port or free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="broker_")
        self.datadir = datadir or os.path.join(self.tmp.name, "data")
        cfg = {"bind_address": "127.0.0.1", "allow_anonymous": True, "persistence": False,
               "max_connection_rate": 0,
               "persistence_location": self.datadir, "log_level": "debug"}
        cfg.update(config or {})
        self.config = cfg
        self.cfgpath = os.path.join(self.tmp.name, "config.json")
        self.logpath = os.path.join(self.tmp.name, "broker.log")
        self.proc = None
        self._logf = None

    def start(self, wait=True):
        build_host()
        with open(self.cfgpath, "w") as f:
            json.dump(self.config, f)
        self._logf = open(self.logpath, "ab")
        cmd = [str(MICROPYTHON), "-X", "heapsize=%s" % self.heap, str(REPO / "tools" / "mp_host.py"),
               "--board", self.board, "--config", self.cfgpath, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.tmp.name)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=10):
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("broker exited with %s:\n%s" % (self.proc.returncode, self.log()))
            if "broker ready" in self.log():
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise RuntimeError("broker not ready after %ss:\n%s" % (timeout, self.log()))

    def log(self):
        try:
            return Path(self.logpath).read_text(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        # SIGINT is Ctrl-C: MicroPython raises KeyboardInterrupt.
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._logf:
            self._logf.close()
            self._logf = None

    def kill9(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(5)
        if self._logf:
            self._logf.close()
            self._logf = None

    def restart(self):
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.tmp.cleanup()


class Raw:
    """A raw MQTT socket for byte-exact exchanges."""

    def __init__(self, port, timeout=5):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def recv_packet(self, timeout=5):
        """One whole packet (bytes, fixed header included), or None at EOF."""
        self.s.settimeout(timeout)
        while True:
            p = self._take()
            if p is not None:
                return p
            try:
                d = self.s.recv(65536)
            except ConnectionResetError:
                d = b""
            if not d:
                return None
            self.buf += d

    def _take(self):
        b = self.buf
        if len(b) < 2:
            return None
        n, mul, i = 0, 1, 1
        while True:
            if i >= len(b):
                return None
            n += (b[i] & 0x7F) * mul
            mul *= 128
            i += 1
            if not b[i - 1] & 0x80:
                break
        if len(b) < i + n:
            return None
        self.buf = b[i + n:]
        return b[: i + n]

    def closed(self, timeout=5):
        """True when the broker closes the connection (after any packets)."""
        end = time.time() + timeout
        while time.time() < end:
            try:
                p = self.recv_packet(timeout=max(0.1, end - time.time()))
            except socket.timeout:
                return False
            if p is None:
                return True
        return False

    def close(self):
        self.s.close()
