"""tools/deploy.py, tools/flash.py, tools/firmware.py, mk/device.mk,
package.json, manifest.py.

The simulated board (host_tests/simboard.py) is the board twin behind a
pseudo-terminal (socat) with a folder mounted as its filesystem; mpremote
talks to it as to a board, every command with `resume`. By default it is
the stock twin (asyncio and ssl only, like a stock MicroPython firmware:
the broker has to come from its filesystem); `firmware="frozen"` is
firmware with the broker frozen in. Deploying to it, then running what was
deployed with an MQTT client, is the end-to-end test. Which way the code
reaches a board comes from docs/memory.json (make memreport): the tests
of that read it, so they follow the last measurement.
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

import paho.mqtt.client as mqtt
import pytest

from conftest import MICROPYTHON_STOCK, REPO, free_port
from simboard import SimBoard

PY = str(REPO / ".venv" / "bin" / "python")
if not os.path.exists(PY):
    PY = sys.executable
DEPLOY = str(REPO / "tools" / "deploy.py")
FLASH = str(REPO / "tools" / "flash.py")
MPREMOTE = str(REPO / ".venv" / "bin" / "mpremote")
FIRMWARE = str(REPO / "tools" / "firmware.py")

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
    """(filesystem dir, port path) of a simulated board with stock firmware;
    stopped afterwards."""
    with SimBoard(tmp_path) as sb:
        r = run([MPREMOTE, "connect", sb.port, "resume", "exec", "import os; print(os.getcwd(), os.listdir())"],
                timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "/ []", r.stdout + r.stderr
        yield sb.fs, sb.port


@pytest.fixture
def snapshot(tmp_path):
    """A copy of the sources, so that edits others make to the working tree
    while a test runs cannot change what a second deploy sees."""
    root = tmp_path / "checkout"
    for d in ("lib", "firmware", "boards"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "package.json", root / "package.json")
    (root / "docs").mkdir()
    shutil.copy(REPO / "docs" / "memory.json", root / "docs" / "memory.json")
    return root


def do_deploy(port, *extra, board="unix", timeout=180, reset=False):
    r = run([PY, DEPLOY, "--board", board, "--port", port, *extra] + ([] if reset else ["--no-reset"]),
            timeout=timeout)
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


def _mqtt_roundtrip(port, deadline=20, user=None, password=None):
    got = threading.Event()
    subscribed = threading.Event()
    msgs = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="deploy-test")
    c.on_message = lambda cl, ud, m: (msgs.append((m.topic, m.payload)), got.set())
    c.on_subscribe = lambda *a: subscribed.set()
    if user:
        c.username_pw_set(user, password)
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


def _interrupt(port):
    # Ctrl-C into the board's main.py, as mpremote does: main.py flushes
    # its log ring to the filesystem and leaves the REPL.
    r = run([MPREMOTE, "connect", port, "resume", "exec", "print('at the REPL')"], timeout=30)
    assert r.returncode == 0 and "at the REPL" in r.stdout, r.stdout + r.stderr


def _stop(proc):
    _kill(proc.pid, signal.SIGINT)  # MicroPython turns SIGINT into KeyboardInterrupt
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        _kill(proc.pid, signal.SIGKILL)
        return proc.communicate(timeout=10)


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
    proc = subprocess.Popen([str(MICROPYTHON_STOCK), "-X", "heapsize=%d" % prof["heap"], str(entry), str(tcp)],
                            cwd=str(fs), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _mqtt_roundtrip(tcp)
    finally:
        out, _ = _stop(proc)
    assert "app from" in out and "app.mpy" in out, out   # ran the deployed .mpy, not the sources


def test_deployed_main_py_boots_the_broker(sim_board, snapshot, tmp_path):
    # deploy resets the board at its end; the board boots into /main.py,
    # which starts the broker from the deployed .mpy files.
    fs, port = sim_board
    tcp = free_port()
    cfg = write_json(tmp_path / "config.json", {"network": {"mode": "none"}, "port": tcp,
                                                "log_dest": "stdout,file"})
    out = do_deploy(port, "--config", cfg, "--root", str(snapshot), reset=True)
    assert "code as mpy" in out and "board reset" in out, out
    _mqtt_roundtrip(tcp)
    _interrupt(port)
    assert "boot: board unix" in (fs / "log" / "0.log").read_text()


def test_mip_installs_package_json_on_the_simulated_board(sim_board, snapshot):
    fs, port = sim_board
    r = run([MPREMOTE, "connect", port, "resume", "mip", "install", "--target", "miplib",
             str(snapshot / "package.json")], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for dest, src in json.loads((snapshot / "package.json").read_text())["urls"]:
        assert (fs / "miplib" / dest).read_bytes() == (snapshot / src).read_bytes(), dest


# ---------------------------------------------------------------- how the code reaches the board


def _records(root=REPO):
    return json.loads((root / "docs" / "memory.json").read_text())["boards"]


@pytest.mark.parametrize("board", ["esp32", "esp32s3", "pico_w", "pico2_w"])
def test_dry_run_shows_the_code_path_memreport_decided(board):
    fits, why = deploy.mpy_verdict(_records()[board])
    r = run([PY, DEPLOY, "--board", board, "--port", "/dev/ttyUSB0", "--dry-run"], timeout=120)
    if fits:
        assert r.returncode == 0 and "code as mpy: " + why in r.stdout, r.stdout + r.stderr
        assert any(x.endswith(":broker/app.mpy") for x in r.stdout.splitlines()), r.stdout
    else:
        # A dry run cannot see the firmware: it lists the frozen layout and says why.
        assert r.returncode == 0 and "do not fit this board (%s)" % why in r.stdout, r.stdout + r.stderr
        assert not any(".mpy" in x for x in r.stdout.splitlines() if " fs cp " in x), r.stdout


def test_deploy_refuses_mpy_that_does_not_fit_and_names_both_ways(sim_board, snapshot, tmp_path):
    # A stock firmware (no frozen broker, no ROMFS) and a measurement that
    # leaves too little heap: nothing is copied, and the message says why
    # and how to run the code from flash.
    fs, port = sim_board
    mem = json.loads((snapshot / "docs" / "memory.json").read_text())
    rec = mem["boards"]["unix"]
    rec["mpy"] = {"start_used": 3900000, "start_free": rec["min_free_heap"] + 1000}
    (snapshot / "docs" / "memory.json").write_text(json.dumps(mem))
    t0 = time.monotonic()
    r = run([PY, DEPLOY, "--board", "unix", "--port", port, "--root", str(snapshot), "--no-reset"], timeout=120)
    msg = r.stdout + r.stderr
    assert r.returncode == 2, msg
    assert "do not fit its heap: loaded from .mpy files it leaves %d B free" % (rec["min_free_heap"] + 1000) in msg
    assert "make firmware BOARD=unix MICROPYTHON_SRC=" in msg and "romfs query" in msg, msg
    assert "--code romfs" in msg, msg
    assert os.listdir(fs) == [], os.listdir(fs)
    assert time.monotonic() - t0 < 60


def test_deploy_refuses_where_the_measured_board_did_not_start_from_mpy():
    # The recorded esp32 run (make memreport): the .mpy start failed.
    rec = _records()["esp32"]
    fits, why = deploy.mpy_verdict(rec)
    if rec["mpy"].get("error"):
        assert fits is False and rec["mpy"]["error"] in why
    assert fits is False, "the ESP32 WROOM was expected not to fit .mpy files: %s" % why


def test_machine_code_an_rp2_board_copies_into_its_heap_counts_against_the_mpy_path():
    # The rp2 port puts the machine code of .mpy files in the Python heap;
    # the twin that measured the .mpy start put it outside. A start that
    # fits with 100 B to spare no longer fits with that code counted.
    rec = json.loads(json.dumps(_records()["pico2_w"]))
    fits, why = deploy.mpy_verdict(dict(rec, native_in_heap=0))
    need = int(why.rsplit("= ", 1)[1].split()[0])
    rec["mpy"] = dict(rec["mpy"], start_free=need + 100)
    assert deploy.mpy_verdict(dict(rec, native_in_heap=0))[0] is True
    fits, why = deploy.mpy_verdict(dict(rec, native_in_heap=24000))
    assert fits is False and "less 24000 B of machine code" in why, why


def test_romfs_needs_a_romfs_partition(sim_board):
    fs, port = sim_board
    r = run([MPREMOTE, "connect", port, "resume", "romfs", "query"], timeout=30)
    assert r.returncode == 0 and "ROMFS is not enabled on this device" in r.stdout, r.stdout + r.stderr
    r = run([PY, DEPLOY, "--board", "unix", "--port", port, "--code", "romfs", "--no-reset"], timeout=120)
    msg = r.stdout + r.stderr
    assert r.returncode == 2 and "has no ROMFS partition" in msg and "make firmware BOARD=unix" in msg, msg
    assert os.listdir(fs) == []


def test_deploy_to_frozen_firmware_copies_settings_only_and_boots(tmp_path, snapshot):
    # Firmware with the broker frozen in, esp32 profile (its .mpy files do
    # not fit): deploy sees the frozen broker, copies main.py, the profile
    # and the user's files, removes code copies that would shadow the
    # frozen modules, resets; the board boots into the broker.
    from brokerproc import TEST_PASSWORD, TEST_USER, write_password_file

    with SimBoard(tmp_path / "sim", firmware="frozen", board="esp32") as sb:
        (sb.fs / "broker").mkdir()
        (sb.fs / "broker" / "app.mpy").write_bytes(b"M stale")  # would be imported before .frozen
        (sb.fs / "lib" / "mqtt").mkdir(parents=True)
        (sb.fs / "lib" / "mqtt" / "topic.py").write_text("raise Exception('stale')\n")
        tcp = free_port()
        pw = tmp_path / "passwd"
        write_password_file(pw, {TEST_USER: TEST_PASSWORD}, "esp32")
        cfg = write_json(tmp_path / "config.json", {"network": {"mode": "none"}, "port": tcp,
                                                    "bind_address": "127.0.0.1", "password_file": "/passwd",
                                                    "log_dest": "stdout,file"})
        out = do_deploy(sb.port, "--config", cfg, "--passwd", str(pw), "--root", str(snapshot), board="esp32",
                        reset=True)
        assert "code as frozen: the firmware has the broker frozen in" in out, out
        files = sorted(str(p.relative_to(sb.fs)) for p in sb.fs.rglob("*") if p.is_file())
        assert not any(f.endswith(".mpy") for f in files), files
        assert {"main.py", "board.json", "config.json", "passwd", ".deploy.json"} <= set(files), files
        assert not (sb.fs / "lib" / "mqtt" / "topic.py").exists()
        _mqtt_roundtrip(tcp, user=TEST_USER, password=TEST_PASSWORD)
        assert sb.boots() == 2
        _interrupt(sb.port)
        log = (sb.fs / "log" / "0.log").read_text()
        assert "boot: board esp32" in log and "broker ready" in log, log
        # Again, nothing changed: nothing copied.
        out = do_deploy(sb.port, "--config", cfg, "--passwd", str(pw), "--root", str(snapshot), board="esp32")
        assert summary(out)[0] == 0, out


@pytest.mark.parametrize("cfg,passwd,want", [
    ({"network": {"mode": "none"}}, "sensor:$p256$1000$x$y\n", "names no password_file"),
    ({"network": {"mode": "none"}, "password_file": "passwd"}, "sensor:secret\n", "tools/passwd -U"),
])
def test_passwd_is_checked_before_the_board_is_touched(tmp_path, cfg, passwd, want):
    c = write_json(tmp_path / "c.json", cfg)
    (tmp_path / "pw").write_text(passwd)
    r = run([PY, DEPLOY, "--board", "pico_w", "--port", "/dev/ttyNOPE0", "--dry-run", "--config", c,
             "--passwd", str(tmp_path / "pw")], timeout=60)
    assert r.returncode == 2 and want in r.stderr, r.stdout + r.stderr


# ---------------------------------------------------------------- make firmware


def _mp_src():
    import twin

    return twin._source()[0]


def _env_without(*names, path=None):
    env = {k: v for k, v in os.environ.items() if k not in names}
    if path is not None:
        env["PATH"] = path
    return env


def test_make_firmware_needs_micropython_src():
    r = run(["make", "-s", "firmware", "BOARD=esp32"], timeout=60, env=_env_without("MICROPYTHON_SRC"))
    assert r.returncode != 0 and "MICROPYTHON_SRC is not set" in r.stderr, r.stdout + r.stderr
    assert "git clone --depth 1 --branch v1.28.0 https://github.com/micropython/micropython" in r.stderr


def test_make_firmware_names_what_the_esp32_build_lacks():
    env = _env_without("IDF_PATH", path="/usr/bin:/bin")
    r = run(["make", "-s", "firmware", "BOARD=esp32", "MICROPYTHON_SRC=%s" % _mp_src()], timeout=60, env=env)
    msg = r.stderr
    assert r.returncode != 0 and "IDF_PATH is not set" in msg and "idf.py is not on PATH" in msg, r.stdout + msg
    assert "install.sh" in msg and ". ~/esp-idf/export.sh" in msg, msg


def test_make_firmware_names_what_the_rp2_build_lacks():
    r = run(["make", "-s", "firmware", "BOARD=pico_w", "MICROPYTHON_SRC=%s" % _mp_src()], timeout=60,
            env=_env_without(path="/usr/bin:/bin"))
    msg = r.stderr
    assert r.returncode != 0 and "arm-none-eabi-gcc is not on PATH" in msg, r.stdout + msg
    assert "lib/pico-sdk" in msg and "gcc-arm-none-eabi" in msg and "ports/rp2 submodules BOARD=RPI_PICO_W" in msg


def test_make_firmware_runs_the_port_build_with_the_manifest(tmp_path):
    # With the SDK there (a stand-in idf.py and IDF_PATH), a dry run
    # prints the port's build with manifest.py frozen in.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "idf.py").write_text("#!/bin/sh\nexit 0\n")
    (fake / "idf.py").chmod(0o755)
    env = _env_without(path="%s:/usr/bin:/bin" % fake)
    env["IDF_PATH"] = str(tmp_path)
    src = _mp_src()
    r = run(["make", "-s", "firmware", "BOARD=esp32s3", "MICROPYTHON_SRC=%s" % src, "FIRMWARE_FLAGS=--dry-run"],
            timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("make -C %s/ports/esp32 BOARD=ESP32_GENERIC_S3 BOARD_VARIANT=SPIRAM_OCT FROZEN_MANIFEST=%s"
            % (src, REPO / "manifest.py")) in r.stdout, r.stdout
    assert "build-ESP32_GENERIC_S3-SPIRAM_OCT/firmware.bin" in r.stdout


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
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "BOARD", "FIRMWARE")}
    t0 = time.monotonic()
    r = run(["make", "-s", *args], timeout=30, env=env)
    assert r.returncode != 0 and want in r.stderr, r.stdout + r.stderr
    assert time.monotonic() - t0 < 5
