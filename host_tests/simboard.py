"""A simulated board on a pseudo-terminal, for mpremote and tools/deploy.py.

    with SimBoard(tmp_path, firmware="stock", board="pico_w", aps={"workshop": "pw"}) as sb:
        sb.port      # the serial port: a pty link, as /dev/ttyACM0 is
        sb.fs        # the folder that is the board's filesystem (/ on the board)
        sb.boots()   # how many times it has booted (a reset is a boot)

socat gives the board twin a pseudo-terminal; the twin runs
host_tests/simboard_boot.py, which mounts `fs` at /, runs /main.py if
there is one and then leaves a REPL, as a board does after Ctrl-C (and,
as a board's, the REPL keeps what arrived while main.py was stopping:
simboard_noflush.c, built here with gcc -m32).
machine.reset() ends the twin and a shell loop starts it again: `mpremote
reset` reboots the board into /main.py. Ctrl-C on the line interrupts
main.py (the pty passes it on as SIGINT and keeps what follows it: isig,
noflsh), so `mpremote connect PORT resume ...` works while the broker runs.

firmware="stock" is build/twin/micropython-stock (asyncio and ssl only: a
stock MicroPython firmware); firmware="frozen" has the broker frozen in
(firmware built with manifest.py). The heap is the board profile's. Wi-Fi
and the watchdog are the fakes of host_tests/fakes/; `aps` lists the
access points in range.

Every process is stopped by PID: socat, and the shell and twin under it.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

import brokerproc  # noqa: E402

_LOOP = """trap : INT
while :; do
  echo boot >> "$SIMBOARD_BOOTS"
  LD_PRELOAD="$SIMBOARD_PRELOAD" "$SIMBOARD_MP" -X heapsize="$SIMBOARD_HEAP" -i "$SIMBOARD_BOOT"
  sleep 0.2
done
"""


def _noflush():
    # host_tests/simboard_noflush.c built for the 32-bit twin, once.
    src = HERE / "simboard_noflush.c"
    out = REPO / "build" / "twin" / "simboard_noflush.so"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["gcc", "-m32", "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError("cannot build %s (gcc-multilib, make sysdeps): %s" % (out, r.stderr.strip()))
    return out


def _descendants(pid):
    out = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class SimBoard:
    def __init__(self, work, firmware="stock", board="unix", aps=None):
        if not shutil.which("socat"):
            raise RuntimeError("socat is not installed: the simulated board needs it (make sysdeps)")
        self.work = Path(work)
        self.fs = self.work / "board_fs"
        self.port = str(self.work / "dev0")
        self.firmware = firmware
        self.heap = brokerproc.profile(board)["heap"]
        self.aps = aps or {}
        self.proc = None

    def start(self, timeout=10):
        self.fs.mkdir(parents=True, exist_ok=True)
        loop = self.work / "boot_loop.sh"
        loop.write_text(_LOOP)
        mp = brokerproc.twin_binary("stock" if self.firmware == "stock" else "broker")
        env = dict(os.environ, SIMBOARD_MP=str(mp), SIMBOARD_HEAP=str(self.heap),
                   SIMBOARD_BOOT=str(HERE / "simboard_boot.py"), SIMBOARD_FS=str(self.fs),
                   SIMBOARD_FAKES=str(HERE / "fakes"), SIMBOARD_APS=json.dumps(self.aps),
                   SIMBOARD_BOOTS=str(self.work / "boots"), SIMBOARD_PRELOAD=str(_noflush()))
        env.pop("MICROPYPATH", None)
        self.proc = subprocess.Popen(
            ["socat", "PTY,link=%s,raw,echo=0" % self.port,
             "EXEC:sh %s,pty,stderr,setsid,ctty,raw,echo=0,isig=1,noflsh=1" % loop],
            cwd=str(self.work), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while not (os.path.exists(self.port) and self.boots()):
            if self.proc.poll() is not None:
                raise RuntimeError("socat exited with %s" % self.proc.returncode)
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError("the simulated board made no pty within %d s" % timeout)
            time.sleep(0.05)
        return self

    def boots(self):
        try:
            return len((self.work / "boots").read_text().split())
        except OSError:
            return 0

    def stop(self):
        if self.proc is None:
            return
        kids = _descendants(self.proc.pid)
        _kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            _kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for k in kids:  # the loop and the twin, if the hang-up did not end them
            _kill(k, signal.SIGKILL)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
