# The broker's entry point on a Linux host, run by the MicroPython unix
# port (not CPython), normally the board twin (tools/twin.py), through
# tools/mp_host.py:
#   build/twin/micropython -X heapsize=110000 tools/mp_host.py --board esp32 \
#       [--code frozen|mpy|src] [--config FILE] [--port N] [--bind ADDR] [--set KEY=JSON ...]
# It loads boards/<board>.json, the config file and the overrides, checks
# them, and runs the same broker a board runs. The code comes from:
#   frozen  the modules frozen into the twin (as from a board's flash);
#   mpy     the compiled .mpy files in build/host (as copied to a board);
#   src     the sources in lib/ and firmware/.
# Without --code: frozen when the binary has the broker frozen in, else mpy
# when build/host exists and this binary runs its x86 machine code (the
# 32-bit twins), else src.
#
# The twin has this module frozen in, as a board has gateway.py: its code
# then takes none of the heap the broker's figures are read from (2.6 KB
# when compiled from source). Other binaries load it from tools/.
#
# --fault-file PATH is for tests only: while PATH exists, every store commit
# fails with the error it names ("memory": MemoryError, "full": StoreFull,
# as from a full filesystem), the way a board's flash or heap would fail.
import sys
import json

ROOT = "."  # the repository, set by main()


def _frozen():
    # True when this binary has the broker frozen in.
    saved = sys.path[:]
    sys.path[:] = [".frozen"]
    try:
        import broker  # noqa: F401

        return True
    except ImportError:
        return False
    finally:
        sys.path[:] = saved


def _paths(code):
    import os

    b = ROOT + "/build/host"
    if code is None:
        if _frozen():
            code = "frozen"
        else:
            try:
                os.stat(b + "/broker")
                # (the arch field of sys.implementation._mpy: 1 is x86)
                code = "mpy" if (sys.implementation._mpy >> 10) & 0xF == 1 else "src"
            except OSError:
                code = "src"
    if code == "frozen":
        if not _frozen():
            raise ValueError("--code frozen: this MicroPython has no frozen broker (build it: make twin)")
        # Frozen modules come first, whatever the current directory holds.
        sys.path[:] = [".frozen"] + [p for p in sys.path if p != ".frozen"]
    elif code == "mpy":
        sys.path[:0] = [b + "/lib", b]
    elif code == "src":
        sys.path[:0] = [ROOT + "/lib", ROOT + "/firmware"]
    else:
        raise ValueError("--code must be frozen, mpy or src, not %s" % code)
    return code


def _inject_faults(path):
    from broker import store

    commit = store.Store.commit

    def failing_commit(self):
        try:
            with open(path) as f:
                kind = f.read().strip()
        except OSError:
            return commit(self)
        if kind == "memory":
            raise MemoryError("injected by --fault-file")
        raise store.StoreFull("injected by --fault-file: filesystem full")

    store.Store.commit = failing_commit


def main(argv, root):
    global ROOT
    ROOT = root
    # Options that take a value; --port, --bind and --set are overrides.
    opt = {"--board": "unix", "--config": None, "--code": None, "--fault-file": None}
    over = {}
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--src":
            opt["--code"] = "src"
            i += 1
            continue
        if i + 1 == len(argv) or not (a in opt or a in ("--port", "--bind", "--set")):
            print("mp_host.py: unknown argument or missing value: %s" % a)
            return 2
        v = argv[i + 1]
        i += 2
        if a == "--port":
            over["port"] = int(v)
        elif a == "--bind":
            over["bind_address"] = v
        elif a == "--set":
            k, v = v.split("=", 1)
            over[k] = json.loads(v)
        else:
            opt[a] = v
    board, cfgfile, code, fault = opt["--board"], opt["--config"], opt["--code"], opt["--fault-file"]
    try:
        code = _paths(code)
    except ValueError as e:
        print("mp_host.py: %s" % e)
        return 2
    print("code: %s" % code)
    from broker.config import build, load_json, unload, ConfigError

    try:
        profile = load_json("%s/boards/%s.json" % (ROOT, board))
        user = load_json(cfgfile) if cfgfile else None
        base = dict(profile.get("config") or {})
        # The board's lwIP send buffer (boards/README.md): without it a
        # subscriber that stops reading fills the host kernel, not the heap.
        base["tcp_send_buffer"] = profile.get("tcp_send_buffer", 0)
        cfg = build(base, user, over)
    except ConfigError as e:
        print("config error: %s" % e)
        return 2
    # Keep only cfg: the profile and broker.config are not needed again.
    build = load_json = profile = user = over = opt = None
    unload()
    # unload too: a function holds its module's globals, and this frame
    # lives as long as the broker (1,168 B of broker.config stayed, which a
    # board's gateway.py, whose _config() returns, does not keep).
    unload = ConfigError = None
    if fault:
        _inject_faults(fault)
    from broker import app

    try:
        app.run(cfg)
    except KeyboardInterrupt:
        print("stopped")
    except (ValueError, OSError) as e:
        # A password or ACL file that does not parse, a port in use: say
        # what, without a traceback.
        print("error: %s" % e)
        return 2
    return 0

