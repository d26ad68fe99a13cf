# The broker's entry point on a Linux host, run by the MicroPython unix
# port (not CPython), normally the board twin (tools/twin.py):
#   build/twin/micropython -X heapsize=110000 tools/mp_host.py --board esp32 \
#       [--code frozen|mpy|src] [--config FILE] [--port N] [--bind ADDR] [--set KEY=JSON ...]
# It loads boards/<board>.json, the config file and the overrides, checks
# them, and runs the same broker a board runs. The code comes from:
#   frozen  the modules frozen into the twin (as from a board's flash);
#   mpy     the compiled .mpy files in build/host (as copied to a board);
#   src     the sources in lib/ and firmware/.
# Without --code: frozen when the binary has the broker frozen in, else mpy
# when build/host exists, else src.
#
# --fault-file PATH is for tests only: while PATH exists, every store commit
# fails with the error it names ("memory": MemoryError, "full": StoreFull,
# as from a full filesystem), the way a board's flash or heap would fail.
import sys
import json

_here = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
ROOT = _here + "/.."


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
                code = "mpy"
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


def main(argv):
    board = "unix"
    cfgfile = None
    over = {}
    code = None
    fault = None
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--board":
            board = argv[i + 1]
            i += 1
        elif a == "--config":
            cfgfile = argv[i + 1]
            i += 1
        elif a == "--port":
            over["port"] = int(argv[i + 1])
            i += 1
        elif a == "--bind":
            over["bind_address"] = argv[i + 1]
            i += 1
        elif a == "--set":
            k, v = argv[i + 1].split("=", 1)
            over[k] = json.loads(v)
            i += 1
        elif a == "--src":
            code = "src"
        elif a == "--code":
            code = argv[i + 1]
            i += 1
        elif a == "--fault-file":
            fault = argv[i + 1]
            i += 1
        else:
            print("mp_host: unknown argument %s" % a)
            return 2
        i += 1
    try:
        code = _paths(code)
    except ValueError as e:
        print("mp_host: %s" % e)
        return 2
    print("code: %s" % code)
    from broker.config import build, load_json, ConfigError

    try:
        profile = load_json("%s/boards/%s.json" % (ROOT, board))
        user = load_json(cfgfile) if cfgfile else None
        cfg = build(profile.get("config"), user, over)
    except ConfigError as e:
        print("config error: %s" % e)
        return 2
    # The schema is needed only to build the config: give its heap back.
    del sys.modules["broker.config"]
    if fault:
        _inject_faults(fault)
    from broker import app

    try:
        app.run(cfg, profile)
    except KeyboardInterrupt:
        print("stopped")
    except (ValueError, OSError) as e:
        # A password or ACL file that does not parse, a port in use: say
        # what, without a traceback.
        print("error: %s" % e)
        return 2
    return 0


sys.exit(main(sys.argv))
