"""boards/README.md, "From an unboxed board to a running broker": the
commands are read out of the README and run as written, against a
simulated board (host_tests/simboard.py), so the section and what the
tools do cannot drift apart.

What stands in for what:
  - the serial port (/dev/ttyUSB0, /dev/ttyACM0) is the simulated board's
    pty; its firmware is the one the section says (frozen or stock), and it
    must be the one the memory measurements call for (docs/memory.json);
  - the Wi-Fi network of config.json and secrets.json is an access point of
    the fake `network` module, and the board address is 127.0.0.1;
  - the broker listens on a free port on 127.0.0.1 instead of 1883 on all
    addresses: once the config line has run, "port" and "bind_address" are
    added to config.json, and mosquitto_sub gets `-p` with that port;
  - ~/micropython is the board twin's MicroPython source, which has no SDK:
    `make firmware` must then say what is missing (or, where the SDK is
    there, print its commands: FIRMWARE_FLAGS=--dry-run);
  - the commands run in a folder of their own that links to the checkout,
    so the files they write stay out of it; tools/ and boards/ are copies
    there, and in those profiles `mpy_arch` is x86: the simulated board
    is the 32-bit stock twin, which cannot load a .mpy file made for
    armv6m or xtensawin (the bytecode is the same; the machine code of the
    functions marked @micropython.native is made for x86 instead);
  - mosquitto_sub runs once the board's broker accepts connections (it
    boots after the deploy's reset), as a person would wait for it.
Lines marked `# needs:` are not run (the board itself, GitHub), except
`make firmware`, as above.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from conftest import REPO, free_port, need
from simboard import SimBoard
import deploy  # noqa: E402  (tools/, on sys.path through brokerproc)
import twin  # noqa: E402

README = REPO / "boards" / "README.md"
SECTION = "## From an unboxed board to a running broker"
BOARDS = {"ESP32 (WROOM, no PSRAM)": ("esp32", "/dev/ttyUSB0"), "Pico W": ("pico_w", "/dev/ttyACM0")}
LINKED = ("Makefile", "mk", "lib", "firmware", "docs", "host_tests", ".venv", "requirements.txt", "manifest.py",
          "package.json")


def section():
    text = README.read_text()
    i = text.index(SECTION)
    j = text.find("\n## ", i + len(SECTION))
    return text[i:j if j > 0 else len(text)]


def commands(title):
    """[(command, needs or None)] of the sh block under `### title`."""
    s = section()
    i = s.index("### " + title + "\n")
    block = re.search(r"```sh\n(.*?)```", s[i:], re.S).group(1)
    out = []
    for line in block.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cmd, _, note = line.partition("  # needs:")
        out.append((cmd.strip(), note.strip() or None))
    return out


def test_the_section_has_both_boards_in_ten_commands_or_fewer():
    for title in BOARDS:
        cmds = commands(title)
        assert 0 < len(cmds) <= 10, (title, cmds)
        assert any(c.startswith("make deploy ") for c, _ in cmds)
        assert any(c.startswith("mosquitto_sub -h <board address> ") and "-t '$SYS/#' -v" in c for c, _ in cmds)
        assert all(n is None for c, n in cmds if c.startswith(("make deploy", "mosquitto_sub", "tools/passwd")))


def _verdict(board):
    rec = json.loads((REPO / "docs" / "memory.json").read_text())["boards"][board]
    return deploy.mpy_verdict(rec)[0]


def _wait_listening(port, timeout=30):
    # The board boots after the deploy's reset; a person would wait too.
    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < end, "nothing listens on port %d %d s after the reset" % (port, timeout)
            time.sleep(0.2)


@pytest.mark.parametrize("title", list(BOARDS))
def test_newcomer_commands_run_against_a_simulated_board(title, tmp_path):
    board, dev = BOARDS[title]
    cmds = commands(title)
    frozen = any(c.startswith("make firmware BOARD=%s " % board) for c, _ in cmds)
    # The firmware the section asks for is the one the measurements call for.
    assert frozen == (_verdict(board) is False), (board, frozen)
    work = tmp_path / "work"
    work.mkdir()
    for name in LINKED:
        if (REPO / name).exists():
            (work / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "tools", work / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "boards", work / "boards")
    for p in (work / "boards").glob("*.json"):
        prof = json.loads(p.read_text())
        prof["mpy_arch"] = "x86"
        p.write_text(json.dumps(prof))
    tcp = free_port()
    sim = None
    env = dict(os.environ, FIRMWARE_FLAGS="--dry-run")
    env.pop("MICROPYTHON_SRC", None)
    try:
        for cmd, needs in cmds:
            if cmd.startswith("make firmware "):
                src = str(twin._source()[0])
                r = subprocess.run(["bash", "-c", cmd.replace("~/micropython", src)], cwd=str(work), env=env,
                                   capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
                said = r.stdout + r.stderr
                assert (r.returncode == 0 and "FROZEN_MANIFEST=" in said) or (
                    r.returncode != 0 and ("IDF_PATH is not set" in said or "idf.py is not on PATH" in said)
                    and "install.sh" in said) or (
                    r.returncode != 0 and "cannot build the rp2 port" in said and " submodules " in said), said
                continue
            if needs:
                continue
            if dev in cmd and sim is None:
                cfg = json.loads((work / "config.json").read_text())
                sec = json.loads((work / "secrets.json").read_text())
                sim = SimBoard(tmp_path / "sim", firmware="frozen" if frozen else "stock", board=board,
                               aps={cfg["network"]["ssid"]: sec["wifi_password"]}).start()
            run = cmd.replace(dev, sim.port) if sim else cmd
            if run.startswith("mosquitto_sub "):
                need("mosquitto_sub")
                run = run.replace("-h <board address>", "-h 127.0.0.1 -p %d" % tcp)
                _wait_listening(tcp)
            r = subprocess.run(["timeout", "120", "bash", "-c", run], cwd=str(work), env=env, capture_output=True,
                               text=True, timeout=180, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, "%s\n%s%s" % (cmd, r.stdout, r.stderr)
            if cmd.startswith("echo ") and cmd.endswith("> config.json"):
                cfg = json.loads((work / "config.json").read_text())
                cfg.update(port=tcp, bind_address="127.0.0.1")
                (work / "config.json").write_text(json.dumps(cfg))
            if cmd.startswith("make deploy "):
                assert ("code as %s" % ("frozen" if frozen else "mpy")) in r.stdout, r.stdout
                assert "deploy: board address " in r.stdout and "board reset" in r.stdout, r.stdout
            if cmd.startswith("mosquitto_sub "):
                lines = r.stdout.splitlines()
                assert len(lines) == 5 and all(x.startswith("$SYS/broker/") for x in lines), r.stdout
        assert sim is not None and sim.boots() == 2, "the board was not reset into the broker"
    finally:
        if sim:
            sim.stop()
