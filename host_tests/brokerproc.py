"""Start the real broker as a process on the board twin.

    with BrokerProc(board="esp32", config={"max_connections": 2}) as b:
        b.port            # ephemeral port it listens on (127.0.0.1)
        b.log()           # everything it printed so far
        b.kill9()         # power cut: SIGKILL
        b.restart()       # same config, same port, same store directory
        b.store_keys()    # once stopped: the keys of the records on "flash"

The broker runs as a board runs it: on the twin (build/twin/micropython,
MicroPython v1.28.0 built 32-bit with the broker frozen in, tools/twin.py)
with the board profile's `heap`, and with the profile's shipped config:
persistence on, anonymous clients refused, the connection-rate limit on.
The test's own changes to that are only these:
  - it listens on 127.0.0.1 (a board: 0.0.0.0) on an ephemeral port;
  - the store lives in a temporary folder;
  - a password file holds the test user (TEST_USER / TEST_PASSWORD, hashed
    with the board's iteration count), unless the config names its own;
  - log_level debug.
A test about another setting passes it in `config` and says why.

Test clients come from the loopback addresses 127.0.0.2-127.0.0.254 in
turn (source_address()), as sensors on a LAN come from addresses of their
own; a test about per-address limits passes one address explicitly.

code="mpy" runs the compiled .mpy files from build/host on the stock twin
(a board that loads the broker from its filesystem) instead.
variant="tlsheap" runs it on the twin whose Mbed TLS allocates from the
MicroPython heap, as on the rp2 port (tools/twin.py). `binary` names
another MicroPython to run it on (the benchmark's 64-bit host runs:
.venv/bin/micropython with code="mpy"), and `script` another entry point
taking tools/mp_host.py's arguments (the benchmark's profiler).
"""
import ast
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "lib"))
import twin  # noqa: E402
import pwhash  # noqa: E402

TWIN = twin.VARIANTS["broker"][0]
TWIN_STOCK = twin.VARIANTS["stock"][0]
TEST_USER = "sensor"
TEST_PASSWORD = "test-password"
_built = {}


def twin_binary(variant="broker"):
    """The twin's path, built (once per test session) if out of date. A
    twin that cannot be built fails the test: it is never skipped."""
    if variant not in _built:
        _built[variant] = twin.build(variant)
    return _built[variant]


def build_host():
    if "host" not in _built:
        subprocess.run([sys.executable, str(REPO / "tools" / "build.py"), "--target", "host", "-q"],
                       check=True, cwd=str(REPO))
        _built["host"] = True


_addrs = itertools.cycle(range(2, 255))


def source_address():
    """The next loopback address for a test client, (host, 0) for bind()."""
    return ("127.0.0.%d" % next(_addrs), 0)


def connect(port, timeout=5, source=None):
    """A TCP socket to the broker on 127.0.0.1:port from source_address()
    (or from `source`, an address string)."""
    src = (source, 0) if source else source_address()
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=src)


def write_password_file(path, users, board="esp32"):
    """users: {name: password}; hashed as tools/passwd does for the board."""
    it = pwhash.ITERATIONS.get(board, pwhash.DEFAULT_ITERATIONS)
    with open(path, "w") as f:
        for name, pw in users.items():
            f.write("%s:%s\n" % (name, pwhash.make_hash(pw, it)))


_handed_out = set()  # ports free_port() gave in this process


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago, from below the
    kernel's ephemeral range (ip_local_port_range, 32768 up by default):
    one the kernel handed out could go to a client socket's own end before
    the broker bound it (EADDRINUSE, a whole TLS module in one run). Not
    one given lately in this process (the last few thousand): a test that
    asks for two ports before it binds either could get one twice."""
    lo = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo = int(f.read().split()[0])
    except (OSError, ValueError):
        pass
    rnd = random.Random()
    if len(_handed_out) > lo // 4:
        _handed_out.clear()  # (those are long bound, or given up)
    for _ in range(200):
        p = rnd.randrange(lo // 2, lo)
        if p in _handed_out:
            continue  # free still, maybe, but given to a listener not yet bound
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            _handed_out.add(p)
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port in %d..%d" % (lo // 2, lo - 1))


def profile(board):
    return json.loads((REPO / "boards" / ("%s.json" % board)).read_text())


class BrokerProc:
    def __init__(self, board="esp32", config=None, heap=None, port=None, datadir=None, code="frozen",
                 faults=False, variant=None, binary=None, script=None):
        self.board = board
        # faults: the broker's store commits fail while fault_file exists
        # (tools/mp_host.py --fault-file); set_fault("memory"/"full"/None).
        self.faults = faults
        self.variant = variant
        self.binary = binary
        self.script = script or str(REPO / "tools" / "mp_host.py")
        self.heap = heap or profile(board)["heap"]
        self.code = code
        self.port = port or free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="broker_")
        self.datadir = datadir or os.path.join(self.tmp.name, "data")
        cfg = {"bind_address": "127.0.0.1", "persistence_location": self.datadir, "log_level": "debug"}
        config = config or {}
        if "password_file" not in config:
            pf = os.path.join(self.tmp.name, "passwd")
            write_password_file(pf, {TEST_USER: TEST_PASSWORD}, board)
            cfg["password_file"] = pf
        cfg.update(config)
        self.config = cfg
        self.cfgpath = os.path.join(self.tmp.name, "config.json")
        self.fault_file = os.path.join(self.tmp.name, "fault")
        self.logpath = os.path.join(self.tmp.name, "broker.log")
        self.proc = None
        self._logf = None
        self._log_from = 0

    def start(self, wait=True):
        if self.code == "mpy":
            build_host()
            mp = self.binary or twin_binary("stock")
        else:
            mp = self.binary or twin_binary(self.variant or "broker")
        with open(self.cfgpath, "w") as f:
            json.dump(self.config, f)
        # The log is kept across restarts: wait_ready() must look only at
        # this start's lines, or it takes the last start's "broker ready".
        self._log_from = len(self.log())
        self._logf = open(self.logpath, "ab")
        cmd = [str(mp), "-X", "heapsize=%s" % self.heap, self.script,
               "--board", self.board, "--code", self.code, "--config", self.cfgpath, "--port", str(self.port)]
        if self.faults:
            cmd += ["--fault-file", self.fault_file]
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
            if "broker ready" in self.log()[self._log_from:]:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise RuntimeError("broker not ready after %ss:\n%s" % (timeout, self.log()))

    def set_fault(self, kind):
        """kind: "memory" or "full" makes every store commit fail so; None
        heals it (BrokerProc(faults=True) only)."""
        if kind is None:
            try:
                os.remove(self.fault_file)
            except FileNotFoundError:
                pass
        else:
            with open(self.fault_file, "w") as f:
                f.write(kind)

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

    def store_keys(self):
        """The keys of the records in the store, read with the broker's
        own store code on the twin. Call it once the broker has stopped."""
        assert not self.alive(), "store_keys() reads the store of a stopped broker"
        if not os.path.isdir(self.datadir):
            return []
        script = os.path.join(self.tmp.name, "store_keys.py")
        with open(script, "w") as f:
            f.write("import sys\nfrom broker.store import Store\nst = Store(sys.argv[1], 1 << 30)\n"
                    "st.open()\nfor k, v in st.items():\n    print(repr(k))\n")
        r = subprocess.run([str(twin_binary()), script, self.datadir], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, MICROPYPATH=".frozen"))
        if r.returncode:
            raise RuntimeError("reading the store failed: %s" % (r.stdout + r.stderr)[-2000:])
        return sorted(ast.literal_eval(line) for line in r.stdout.splitlines())

    def restart(self):
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.tmp.cleanup()


class Raw:
    """A raw MQTT socket for byte-exact exchanges, from source_address()
    unless `source` names the address."""

    def __init__(self, port, timeout=5, source=None):
        self.s = connect(port, timeout, source)
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


def cli_args(port, user=TEST_USER, password=TEST_PASSWORD):
    """Connection arguments for mosquitto_pub / mosquitto_sub: the broker at
    127.0.0.1:port, the test user, the next source address."""
    args = ["-h", "127.0.0.1", "-p", str(port), "-A", source_address()[0]]
    if user is not None:
        args += ["-u", user, "-P", password]
    return args


def paho_connect(client, port, user=TEST_USER, password=TEST_PASSWORD, host="127.0.0.1", **kw):
    """client.connect() for a paho client, as the test user (user=None:
    anonymous) from the next source address; kw go to connect()."""
    if user is not None:
        client.username_pw_set(user, password)
    return client.connect(host, port, bind_address=source_address()[0], **kw)


def paho_subscribe(client, topic, qos):
    """client.subscribe() for a paho client whose loop runs, returned from
    once its SUBACK came: a PUBLISH sent after it, from any client, finds
    the subscription (one still in paho's thread could come after it)."""
    acked = threading.Event()
    client.on_subscribe = lambda *a: acked.set()
    r, _ = client.subscribe(topic, qos=qos)
    assert r == 0, "paho could not send the SUBSCRIBE: %s" % r
    assert acked.wait(5), "no SUBACK for %s" % (topic,)
