#!/usr/bin/env python3
"""Put MicroPython on a board, then deploy the broker onto it.

    flash.py --board esp32 --port /dev/ttyUSB0 --firmware micropython.bin
             [--config c.json] [--secrets s.json] [--no-erase] [--dry-run]

esptool boards (the profile's "flash" is {"tool": "esptool", "chip": ...,
"offset": ...}): erase the whole flash, write the firmware at the
profile's offset (0x1000 on the ESP32, 0x0 on the S3), then run deploy.py.
erase-flash also wipes the filesystem, so config and secrets must be
deployed again; --no-erase writes the firmware alone and keeps it.

uf2 boards (Pico W, Pico 2 W) are flashed by copying a file to the USB
drive the ROM bootloader shows; this prints how and exits 0.
"""
import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy  # noqa: E402

BAUD = 460800
_ERASE_TIMEOUT = 180  # a 16 MiB chip takes about a minute to erase
_WRITE_TIMEOUT = 300
_BOOT_WAIT = 30  # seconds a fresh board may take to make its filesystem


def esptool_commands(profile, port, firmware, erase=True, baud=BAUD):
    f = profile["flash"]
    cmds = []
    if erase:
        cmds.append(["esptool", "--chip", f["chip"], "--port", port, "erase-flash"])
    cmds.append(["esptool", "--chip", f["chip"], "--port", port, "--baud", str(baud),
                 "write-flash", f["offset"], str(firmware)])
    return cmds


def uf2_instructions(profile, port):
    drive = profile["flash"].get("drive", "RPI-RP2")
    return "\n".join([
        "%s is flashed by copying a .uf2 file; nothing to run here." % profile["name"],
        "  1. Unplug the board. Hold its BOOTSEL button and plug it in; let go.",
        "  2. A USB drive named %s appears." % drive,
        "  3. Copy the firmware to it, e.g.  cp FIRMWARE.uf2 /media/$USER/%s/" % drive,
        "     The board reboots into MicroPython by itself; its filesystem is kept.",
        "  4. Deploy the broker:  make deploy BOARD=%s PORT=%s" % (profile["name"], port or "/dev/ttyACM0"),
        "To wipe the filesystem as well, copy flash_nuke.uf2 first (from the",
        "Raspberry Pi documentation), then the firmware.",
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", required=True, help="profile name in boards/")
    ap.add_argument("--port", help="serial port, e.g. /dev/ttyUSB0")
    ap.add_argument("--firmware", help="MicroPython firmware file (.bin for esptool boards)")
    ap.add_argument("--config", help="passed on to deploy.py")
    ap.add_argument("--secrets", help="passed on to deploy.py")
    ap.add_argument("--no-erase", action="store_true", help="keep the filesystem: write the firmware only")
    ap.add_argument("--no-deploy", action="store_true", help="flash only")
    ap.add_argument("--baud", type=int, default=BAUD)
    ap.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    args = ap.parse_args(argv)
    try:
        profile = deploy.load_profile(args.board)
        fl = profile.get("flash") or {}
        if fl.get("tool") == "uf2":
            print(uf2_instructions(profile, args.port))
            return 0
        if fl.get("tool") != "esptool":
            raise deploy.DeployError("board %s has no flash method (its profile's \"flash\" is %r)"
                                     % (profile["name"], fl or None))
        if not args.dry_run:
            deploy.check_port(args.port)
        if not args.firmware:
            raise deploy.DeployError("no firmware given: pass --firmware (make: FIRMWARE=), the .bin "
                                     "from micropython.org/download for %s" % profile["name"])
        if not args.dry_run and not Path(args.firmware).is_file():
            raise deploy.DeployError("firmware file %s does not exist" % args.firmware)
        cmds = esptool_commands(profile, args.port or "PORT", args.firmware, not args.no_erase, args.baud)
        esptool = deploy.tool("esptool")
        for c in cmds:
            print(shlex.join(c))
            if args.dry_run:
                continue
            t = _ERASE_TIMEOUT if "erase-flash" in c else _WRITE_TIMEOUT
            try:
                r = subprocess.run([esptool] + c[1:], timeout=t)
            except subprocess.TimeoutExpired:
                raise deploy.DeployError("esptool did not finish within %d s" % t)
            if r.returncode != 0:
                raise deploy.DeployError("esptool failed (exit %d). Hold BOOT while it connects if the "
                                         "board has no auto-reset circuit" % r.returncode)
        if args.no_deploy:
            return 0
        if not args.no_erase and not args.config:
            print("flash: the filesystem was erased and no --config was given: the board has no "
                  "/config.json, so main.py will not start the broker until you deploy one")
        dargs = ["--board", args.board]
        if args.port:
            dargs += ["--port", args.port]
        for opt in ("config", "secrets"):
            if getattr(args, opt):
                dargs += ["--" + opt, getattr(args, opt)]
        if args.dry_run:
            print("then: tools/deploy.py " + shlex.join(dargs))
            return deploy.main(dargs + ["--dry-run"])
        time.sleep(2)  # esptool's hard reset: let MicroPython start
        return deploy.main(dargs + ["--wait", str(_BOOT_WAIT)])
    except deploy.DeployError as e:
        print("flash: error: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
