#!/usr/bin/env python3
"""Build MicroPython firmware with the broker frozen in, for a board profile.

    make firmware BOARD=esp32 MICROPYTHON_SRC=/path/to/micropython [FIRMWARE_FLAGS=--dry-run]
    tools/firmware.py --board esp32 --src /path/to/micropython [--dry-run]

Frozen code runs from flash and takes no heap to load; on the ESP32 WROOM
the broker does not start from .mpy files at all (docs/memory.json, `make
memreport`), so this is how it gets there. The port's own build does the
work, with FROZEN_MANIFEST=manifest.py (lib/ and firmware/ but main.py,
after the port's own frozen modules):

    esp32, esp32s3   make -C SRC/ports/esp32 BOARD=ESP32_GENERIC[_S3] ...  (ESP-IDF)
    pico_w, pico2_w  make -C SRC/ports/rp2 BOARD=RPI_PICO[2]_W ...        (pico-sdk, arm-none-eabi-gcc)

Before anything runs it checks that the port's SDK is there, and where it
is not says exactly what is missing and how to get it. The firmware is
copied to build/firmware/<board>/; flash it with `make flash` (esp32) or a
BOOTSEL copy (rp2), then `make deploy` copies main.py and the settings
only: it sees the frozen broker.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "manifest.py"
VERSION = "1.28.0"  # the board twin's, which the memory figures are measured on
# profile -> (port, BOARD, BOARD_VARIANT, firmware file in the build folder)
TARGETS = {
    "esp32": ("esp32", "ESP32_GENERIC", None, "firmware.bin"),
    "esp32s3": ("esp32", "ESP32_GENERIC_S3", "SPIRAM_OCT", "firmware.bin"),
    "pico_w": ("rp2", "RPI_PICO_W", None, "firmware.uf2"),
    "pico2_w": ("rp2", "RPI_PICO2_W", None, "firmware.uf2"),
}
_BUILD_TIMEOUT = 3600


class Missing(Exception):
    pass


def source_version(src):
    # "1.28.0" from py/mpconfig.h, or None.
    try:
        text = (src / "py" / "mpconfig.h").read_text()
    except OSError:
        return None
    parts = [re.search(r"#define MICROPY_VERSION_%s \((\d+)\)" % k, text) for k in ("MAJOR", "MINOR", "MICRO")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def check_source(src, port, board):
    if src is None:
        raise Missing(
            "MICROPYTHON_SRC is not set: give a MicroPython source tree with its submodules, e.g.\n"
            "  git clone --depth 1 --branch v%s https://github.com/micropython/micropython ~/micropython\n"
            "  make firmware BOARD=%s MICROPYTHON_SRC=~/micropython" % (VERSION, board))
    if not (src / "ports" / port / "Makefile").exists():
        raise Missing("MICROPYTHON_SRC=%s has no ports/%s/Makefile: it is not a MicroPython source tree "
                      "(or lacks that port)" % (src, port))


def check_sdk(port, src, mp_board, env):
    """Raises Missing naming what the port's build needs and is not there."""
    missing = []
    if port == "esp32":
        if not env.get("IDF_PATH"):
            missing.append("IDF_PATH is not set (ESP-IDF is not installed, or its export.sh was not sourced)")
        if not shutil.which("idf.py", path=env.get("PATH")):
            missing.append("idf.py is not on PATH")
        if missing:
            raise Missing(
                "cannot build the esp32 port: %s.\n"
                "Get ESP-IDF (MicroPython v%s's ports/esp32/README.md names the versions it supports, v5.5.1 "
                "recommended):\n"
                "  git clone -b v5.5.1 --recursive https://github.com/espressif/esp-idf.git ~/esp-idf\n"
                "  ~/esp-idf/install.sh esp32,esp32s3\n"
                "  . ~/esp-idf/export.sh        (in the shell that runs make firmware)\n"
                "  make -C %s/ports/esp32 submodules BOARD=%s" % ("; ".join(missing), VERSION, src, mp_board))
        return
    if not shutil.which("arm-none-eabi-gcc", path=env.get("PATH")):
        missing.append("arm-none-eabi-gcc is not on PATH (the Arm cross compiler)")
    if not shutil.which("cmake", path=env.get("PATH")):
        missing.append("cmake is not on PATH")
    if not (src / "lib" / "pico-sdk" / "README.md").exists():
        missing.append("the pico-sdk is not in %s/lib/pico-sdk (the rp2 port builds with that submodule)" % src)
    if missing:
        raise Missing(
            "cannot build the rp2 port: %s.\n"
            "Get them (Debian/Ubuntu):\n"
            "  sudo apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi cmake\n"
            "  make -C %s/ports/rp2 submodules BOARD=%s     (fetches lib/pico-sdk and the other submodules)"
            % ("; ".join(missing), src, mp_board))


def commands(board, src):
    port, mp_board, variant, _ = TARGETS[board]
    make = ["make", "-C", str(src / "ports" / port), "BOARD=%s" % mp_board]
    if variant:
        make.append("BOARD_VARIANT=%s" % variant)
    make.append("FROZEN_MANIFEST=%s" % MANIFEST)
    return [["make", "-C", str(src / "mpy-cross")], make]


def built_firmware(board, src):
    port, mp_board, variant, name = TARGETS[board]
    build = "build-%s-%s" % (mp_board, variant) if variant else "build-%s" % mp_board
    return src / "ports" / port / build / name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", required=True, help="profile name: %s" % ", ".join(sorted(TARGETS)))
    ap.add_argument("--src", default=os.environ.get("MICROPYTHON_SRC") or None,
                    help="MicroPython source tree (make: MICROPYTHON_SRC=)")
    ap.add_argument("--dry-run", action="store_true", help="check, then print the commands without running them")
    a = ap.parse_args(argv)
    if a.board not in TARGETS:
        print("firmware: error: no firmware build for board %r (one of %s)" % (a.board, ", ".join(sorted(TARGETS))),
              file=sys.stderr)
        return 2
    port, mp_board, _, name = TARGETS[a.board]
    src = Path(a.src).expanduser().resolve() if a.src else None
    try:
        check_source(src, port, a.board)
        check_sdk(port, src, mp_board, os.environ)
    except Missing as e:
        print("firmware: error: %s" % e, file=sys.stderr)
        return 2
    v = source_version(src)
    if v != VERSION:
        print("firmware: note: %s is MicroPython %s; the memory figures (docs/memory.json) are for v%s"
              % (src, v or "of unknown version", VERSION))
    out = ROOT / "build" / "firmware" / a.board / name
    for c in commands(a.board, src):
        print(shlex.join(c), flush=True)
        if a.dry_run:
            continue
        try:
            r = subprocess.run(c, timeout=_BUILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            print("firmware: error: %s took more than %d s" % (c[2], _BUILD_TIMEOUT), file=sys.stderr)
            return 1
        if r.returncode != 0:
            print("firmware: error: the build failed (exit %d); its output is above" % r.returncode, file=sys.stderr)
            return 1
    print("then: copy %s to %s" % (built_firmware(a.board, src), out))
    if a.dry_run:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built_firmware(a.board, src), out)
    if port == "esp32":
        print("firmware: %s; flash it with: make flash BOARD=%s PORT=/dev/ttyUSB0 FIRMWARE=%s"
              % (out, a.board, out.relative_to(ROOT)))
    else:
        print("firmware: %s; hold BOOTSEL while plugging the board in and copy it to the drive that appears"
              % out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
