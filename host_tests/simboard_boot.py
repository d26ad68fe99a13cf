# What a simulated board (host_tests/simboard.py) runs at power-on, under
# the board twin: the part of a board's firmware that comes before
# /main.py. It
#   - puts the fake `network` and `machine` modules (host_tests/fakes/)
#     where the unix port has no radio and no reset;
#   - makes machine.reset() end this process: the simulation's boot loop
#     starts the twin again, which is the board rebooting;
#   - mounts the board's folder at / (VfsPosix), so /main.py, /lib, /data
#     and /passwd are the board's files, as on LittleFS;
#   - runs /main.py when there is one, then leaves a REPL on the serial line
#     (the twin runs this file with -i), as a board does after Ctrl-C.
# Settings come from the environment, set by simboard.py:
#   SIMBOARD_FS     the folder that is the board's filesystem
#   SIMBOARD_FAKES  host_tests/fakes
#   SIMBOARD_APS    JSON {ssid: password} of the access points in range
import os
import sys

sys.path[:] = [os.getenv("SIMBOARD_FAKES")]
import json  # noqa: E402
import machine  # noqa: E402
import network  # noqa: E402
import vfs  # noqa: E402


def _reboot():
    raise SystemExit(0)


machine.reset = _reboot
network.aps.update(json.loads(os.getenv("SIMBOARD_APS") or "{}"))
vfs.umount("/")
vfs.mount(vfs.VfsPosix(os.getenv("SIMBOARD_FS")), "/")
os.chdir("/")
sys.path[:] = ["", ".frozen", "/lib"]
try:
    os.stat("/main.py")
    _main = True
except OSError:
    _main = False
if _main:
    with open("/main.py") as _f:
        _src = _f.read()
    exec(_src, {"__name__": "__main__"})
    del _src
