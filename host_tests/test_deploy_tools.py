"""tools/deploy.py, tools/flash.py, mk/device.mk, package.json, manifest.py.

The simulated board is the MicroPython unix port behind a pseudo-terminal
(socat), with its current directory as the board's filesystem; mpremote
talks to it as to a board, every command with `resume` (without it the soft
reset ends the unix process). Deploying to it, then running what was
deployed with the unix port and an MQTT client, is the end-to-end test.
Every subprocess has a timeout; every process started is stopped by PID.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import MICROPYTHON, REPO, free_port

PY = str(REPO / ".venv" / "bin" / "python")
if not os.path.exists(PY):
    PY = sys.executable
DEPLOY = str(REPO / "tools" / "deploy.py")
FLASH = str(REPO / "tools" / "flash.py")
MPREMOTE = str(REPO / ".venv" / "bin" / "mpremote")
APP = REPO / "firmware" / "broker" / "app.py"

sys.path.insert(0, str(REPO / "tools"))
import deploy  # noqa: E402


def run(cmd, timeout=180, cwd=REPO, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(cwd),
                          stdin=subprocess.DEVNULL, **kw)


def _kill(pid, sig=signal.SIGTERM):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def sim_board(tmp_path):
    """(filesystem dir, port path) of a simulated board; stopped afterwards."""
    if not shutil.which("socat"):
        pytest.skip("socat is not installed (make sysdeps)")
    fs = tmp_path / "board_fs"
    fs.mkdir()
    port = tmp_path / "dev0"
    p = subprocess.Popen(
        ["socat", "PTY,link=%s,raw,echo=0" % port,
         "EXEC:%s,pty,stderr,setsid,ctty,raw,echo=0" % MICROPYTHON],
        cwd=str(fs), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while not port.exists():
            assert p.poll() is None, "socat exited with %s" % p.returncode
            assert time.monotonic() < end, "socat made no pty within 10 s"
            time.sleep(0.05)
        r = run([MPREMOTE, "connect", str(port), "resume", "exec", "import os; print(os.getcwd())"], timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == str(fs), r.stdout + r.stderr
        yield fs, str(port)
    finally:
        children = []
        try:
            with open("/proc/%d/task/%d/children" % (p.pid, p.pid)) as f:
                children = [int(x) for x in f.read().split()]
        except OSError:
            pass
        _kill(p.pid)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            _kill(p.pid, signal.SIGKILL)
            p.wait(5)
        for c in children:  # the unix port, if the hang-up did not end it
            _kill(c, signal.SIGKILL)


@pytest.fixture
def snapshot(tmp_path):
    """A copy of the sources, so that edits others make to the working tree
    while a test runs cannot change what a second deploy sees."""
    root = tmp_path / "checkout"
    for d in ("lib", "firmware", "boards"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "package.json", root / "package.json")
    return root


def do_deploy(port, *extra, board="unix", timeout=180):
    r = run([PY, DEPLOY, "--board", board, "--port", port, "--no-reset", *extra], timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def summary(out):
    # "deploy: N copied, M unchanged, K removed ..." -> (N, M, K)
    line = [x for x in out.splitlines() if x.startswith("deploy: ") and " copied, " in x][-1]
    words = line.split()
    return int(words[1]), int(words[3]), int(words[5])


def write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


# ---------------------------------------------------------------- deploy end to end


def test_deploy_copies_everything_then_only_what_changed(sim_board, snapshot, tmp_path):
    fs, port = sim_board
    root = ["--root", str(snapshot)]
    cfg = write_json(tmp_path / "config.json", {"network": {"mode": "none"}, "log_dest": "stdout,file"})
    sec = write_json(tmp_path / "secrets.json", {"wifi_password": "password1"})
    (fs / "board.py").write_text("raise Exception('stale source')\n")  # would shadow board.mpy
    (fs / "mqtt").mkdir()                                                # would shadow lib/mqtt
    (fs / "mqtt" / "topic.py").write_text("raise Exception('stale copy')\n")

    out = do_deploy(port, "--config", cfg, "--secrets", sec, *root)
    n_files = len(deploy.source_files(snapshot)) + 3   # + board.json, config.json, secrets.json
    assert summary(out) == (n_files, 0, 0), out
    for rel in ("main.py", "board.mpy", "logring.mpy", "broker/config.mpy", "broker/log.mpy",
                "lib/mqtt/topic.mpy", "board.json", "config.json", "secrets.json", ".deploy.json"):
        assert (fs / rel).is_file(), rel
    assert not (fs / "main.mpy").exists() and not (fs / "board.py").exists()
    assert not (fs / "mqtt").exists()
    assert json.loads((fs / "board.json").read_text()) == json.loads((snapshot / "boards" / "unix.json").read_text())
    assert (fs / "main.py").read_text() == (snapshot / "firmware" / "main.py").read_text()
    manifest = json.loads((fs / ".deploy.json").read_text())
    assert manifest["board"] == "unix" and len(manifest["files"]) == n_files

    # Nothing changed: nothing is copied, not even the manifest.
    before = (fs / ".deploy.json").stat().st_mtime_ns
    out = do_deploy(port, "--config", cfg, "--secrets", sec, *root)
    assert summary(out) == (0, n_files, 0), out
    assert (fs / ".deploy.json").stat().st_mtime_ns == before

    # One file changed: exactly that one. Secrets not given stay on the board.
    cfg = write_json(tmp_path / "config.json", {"network": {"mode": "none"}, "log_dest": "stdout"})
    out = do_deploy(port, "--config", cfg, *root)
    assert summary(out)[0] == 1 and "copied config.json" in out, out
    assert json.loads((fs / "config.json").read_text())["log_dest"] == "stdout"
    assert (fs / "secrets.json").is_file()
    assert "secrets.json" in json.loads((fs / ".deploy.json").read_text())["files"]


def test_deploy_copies_one_changed_module_and_removes_a_deleted_one(sim_board, snapshot):
    fs, port = sim_board
    root = snapshot
    out = do_deploy(port, "--root", str(root))
    n = summary(out)[0]

    with open(root / "firmware" / "logring.py", "a") as f:
        f.write("\nDEPLOY_TEST = 1\n")
    (root / "firmware" / "extra_mod.py").write_text("X = 1\n")
    out = do_deploy(port, "--root", str(root))
    assert summary(out) == (2, n - 1, 0), out
    assert "copied logring.mpy" in out and "copied extra_mod.mpy" in out

    (root / "firmware" / "extra_mod.py").unlink()
    out = do_deploy(port, "--root", str(root))
    assert summary(out) == (0, n, 1) and "removed extra_mod.mpy" in out, out
    assert not (fs / "extra_mod.mpy").exists()


def test_deploy_checks_config_before_touching_the_board(sim_board, tmp_path):
    fs, port = sim_board
    bad = write_json(tmp_path / "bad.json", {"network": {"mode": "none"}, "max_connections": 0})
    t0 = time.monotonic()
    r = run([PY, DEPLOY, "--board", "esp32", "--port", port, "--config", bad, "--no-reset"], timeout=60)
    assert r.returncode != 0 and "'max_connections'" in r.stderr, r.stdout + r.stderr
    cfg = write_json(tmp_path / "c.json", {"network": {"ssid": "home"}})
    sec = write_json(tmp_path / "s.json", {"wifi_password": "hunter2"})
    r = run([PY, DEPLOY, "--board", "esp32", "--port", port, "--config", cfg, "--secrets", sec, "--no-reset"],
            timeout=60)
    assert r.returncode != 0 and "'wifi_password'" in r.stderr and "hunter2" not in r.stderr + r.stdout
    assert time.monotonic() - t0 < 30
    assert os.listdir(fs) == []


ENTRY = """
import sys, json
from broker import config, app
print("app from", app.__file__)
prof = json.load(open("board.json"))
cfg = config.build(prof["config"], json.load(open("config.json")), {"port": int(sys.argv[1])})
app.run(cfg, prof)
"""


def _mqtt_roundtrip(port, deadline=20):
    mqtt = pytest.importorskip("paho.mqtt.client")
    got = threading.Event()
    subscribed = threading.Event()
    msgs = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="deploy-test")
    c.on_message = lambda cl, ud, m: (msgs.append((m.topic, m.payload)), got.set())
    c.on_subscribe = lambda *a: subscribed.set()
    end = time.monotonic() + deadline
    while True:
        try:
            c.connect("127.0.0.1", port, keepalive=30)
            break
        except OSError:
            assert time.monotonic() < end, "the broker did not accept connections within %d s" % deadline
            time.sleep(0.2)
    c.loop_start()
    try:
        c.subscribe("deploy/#", qos=1)
        assert subscribed.wait(10), "no SUBACK"
        c.publish("deploy/test", b"hello board", qos=1)
        assert got.wait(10), "no message came back"
        assert msgs[0] == ("deploy/test", b"hello board")
    finally:
        c.disconnect()
        c.loop_stop()


def _stop(proc):
    _kill(proc.pid, signal.SIGINT)  # MicroPython turns SIGINT into KeyboardInterrupt
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        _kill(proc.pid, signal.SIGKILL)
        return proc.communicate(timeout=10)


@pytest.mark.skipif(not APP.exists(), reason="firmware/broker/app.py is not there yet")
def test_deployed_tree_runs_the_broker(sim_board, snapshot, tmp_path):
    fs, port = sim_board
    cfg = write_json(tmp_path / "config.json", {"network": {"mode": "none"}})
    do_deploy(port, "--config", cfg, "--root", str(snapshot))
    (tmp_path / "entry").mkdir()
    entry = tmp_path / "entry" / "host_entry.py"
    entry.write_text(ENTRY)
    tcp = free_port()
    env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(fs / "lib"), str(fs), ".frozen"]))
    prof = json.loads((REPO / "boards" / "unix.json").read_text())
    proc = subprocess.Popen([str(MICROPYTHON), "-X", "heapsize=%d" % prof["heap"], str(entry), str(tcp)],
                            cwd=str(fs), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _mqtt_roundtrip(tcp)
    finally:
        out, _ = _stop(proc)
    assert "app from" in out and "app.mpy" in out, out   # ran the deployed .mpy, not the sources


@pytest.mark.skipif(not APP.exists(), reason="firmware/broker/app.py is not there yet")
def test_deployed_main_py_boots_the_broker(sim_board, snapshot, tmp_path):
    # The board's own entry point, on the unix port: no radio, no watchdog.
    fs, port = sim_board
    tcp = free_port()
    cfg = write_json(tmp_path / "config.json", {"network": {"mode": "none"}, "port": tcp,
                                                "log_dest": "stdout,file"})
    do_deploy(port, "--config", cfg, "--root", str(snapshot))
    env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(fs / "lib"), str(fs), ".frozen"]))
    proc = subprocess.Popen([str(MICROPYTHON), "main.py"], cwd=str(fs), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _mqtt_roundtrip(tcp)
    finally:
        out, _ = _stop(proc)
    assert "boot: board unix" in out, out
    assert "boot: board unix" in (fs / "log" / "0.log").read_text()


def test_mip_installs_package_json_on_the_simulated_board(sim_board, snapshot):
    fs, port = sim_board
    r = run([MPREMOTE, "connect", port, "resume", "mip", "install", "--target", "miplib",
             str(snapshot / "package.json")], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for dest, src in json.loads((snapshot / "package.json").read_text())["urls"]:
        assert (fs / "miplib" / dest).read_bytes() == (snapshot / src).read_bytes(), dest


# ---------------------------------------------------------------- package.json, manifest.py


def test_package_json_lists_every_file():
    pkg = json.loads((REPO / "package.json").read_text())
    assert set(pkg) == {"urls", "deps", "version"} and pkg["deps"] == []
    srcs = sorted(src for _, src in pkg["urls"])
    want = sorted(p.relative_to(REPO).as_posix() for p, _ in deploy.source_files())
    assert srcs == want, ("package.json is out of date: run `make package-json` "
                          "(tools/deploy.py --write-package-json)")
    assert pkg["urls"] == deploy.package_urls()
    dests = [d for d, _ in pkg["urls"]]
    assert len(set(dests)) == len(dests)
    assert ["mqtt/topic.py", "lib/mqtt/topic.py"] in pkg["urls"]
    assert ["broker/config.py", "firmware/broker/config.py"] in pkg["urls"]


def test_manifest_freezes_every_module_but_main():
    frozen = []
    calls = []

    def include(path, **kw):
        calls.append(("include", path))

    def package(name, files=None, base_path=".", opt=None):
        base = REPO / base_path / name
        assert base.is_dir(), base
        for p in base.rglob("*.py"):
            if "__pycache__" not in p.parts:
                frozen.append(p.relative_to(REPO).as_posix())

    def module(name, base_path=".", opt=None):
        assert (REPO / base_path / name).is_file(), name
        frozen.append((Path(base_path) / name).as_posix())

    g = {"include": include, "package": package, "module": module,
         "require": lambda *a, **k: None, "metadata": lambda *a, **k: None, "options": None}
    exec(compile((REPO / "manifest.py").read_text(), "manifest.py", "exec"), g)
    assert calls and calls[0] == ("include", "$(PORT_DIR)/boards/manifest.py")
    want = sorted(p.relative_to(REPO).as_posix() for p, d in deploy.source_files() if d != "main.py")
    assert sorted(frozen) == want


# ---------------------------------------------------------------- flash.py


@pytest.mark.parametrize("board,chip,offset", [("esp32", "esp32", "0x1000"), ("esp32s3", "esp32s3", "0x0")])
def test_flash_dry_run_prints_the_esptool_commands(board, chip, offset, tmp_path):
    r = run([PY, FLASH, "--board", board, "--port", "/dev/ttyUSB0", "--firmware", "micropython.bin",
             "--dry-run"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "esptool --chip %s --port /dev/ttyUSB0 erase-flash" % chip
    assert lines[1] == ("esptool --chip %s --port /dev/ttyUSB0 --baud 460800 write-flash %s micropython.bin"
                        % (chip, offset))
    assert "then: tools/deploy.py --board %s --port /dev/ttyUSB0" % board in lines
    assert any(x.startswith("mpremote connect /dev/ttyUSB0 resume fs cp") for x in lines)


def test_esptool_spells_the_commands_as_printed():
    # esptool 5 renamed erase_flash/write_flash to erase-flash/write-flash.
    r = run([str(REPO / ".venv" / "bin" / "esptool"), "--help"], timeout=60)
    assert r.returncode == 0
    for word in ("erase-flash", "write-flash", "--chip", "--port", "--baud"):
        assert word in r.stdout, word


@pytest.mark.parametrize("board,drive", [("pico_w", "RPI-RP2"), ("pico2_w", "RP2350")])
def test_flash_uf2_board_explains_bootsel_and_does_nothing(board, drive):
    t0 = time.monotonic()
    r = run([PY, FLASH, "--board", board, "--port", "/dev/ttyACM0", "--firmware", "fw.uf2"], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "BOOTSEL" in r.stdout and drive in r.stdout and "esptool" not in r.stdout
    assert "make deploy BOARD=%s PORT=/dev/ttyACM0" % board in r.stdout
    assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------- missing port

MISSING = "/dev/ttyNOPE9"


@pytest.mark.parametrize("cmd", [
    [PY, DEPLOY, "--board", "esp32", "--port", MISSING],
    [PY, DEPLOY, "--board", "pico_w", "--port", MISSING, "--config", "nonexistent.json"],
    [PY, FLASH, "--board", "esp32", "--port", MISSING, "--firmware", "fw.bin"],
    ["make", "-s", "deploy", "BOARD=esp32", "PORT=" + MISSING],
    ["make", "-s", "flash", "BOARD=esp32", "PORT=" + MISSING, "FIRMWARE=fw.bin"],
    ["make", "-s", "console", "PORT=" + MISSING],
], ids=["deploy", "deploy-before-config", "flash", "make-deploy", "make-flash", "make-console"])
def test_missing_port_fails_at_once_and_names_it(cmd):
    if cmd[0] == "make" and not (REPO / "Makefile").exists():
        pytest.skip("no Makefile yet")
    t0 = time.monotonic()
    r = run(cmd, timeout=30)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert took < 5, took
    msg = r.stdout + r.stderr
    assert "serial port %s does not exist" % MISSING in msg and "mpremote connect list" in msg, msg


@pytest.mark.parametrize("args,want", [
    (["deploy"], "PORT is not set"),
    (["console"], "PORT is not set"),
    (["deploy", "PORT=/dev/ttyUSB0"], "BOARD is not set"),
    (["flash", "BOARD=esp32", "PORT=/dev/ttyUSB0"], "FIRMWARE is not set"),
])
def test_make_targets_stop_at_once_without_their_values(args, want):
    if not (REPO / "Makefile").exists():
        pytest.skip("no Makefile yet")
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "BOARD", "FIRMWARE")}
    t0 = time.monotonic()
    r = run(["make", "-s", *args], timeout=30, env=env)
    assert r.returncode != 0 and want in r.stderr, r.stdout + r.stderr
    assert time.monotonic() - t0 < 5
