# The broker's entry point on a Linux host, run by the MicroPython unix
# port (not CPython):
#   micropython -X heapsize=110000 tools/mp_host.py --board esp32 \
#       [--config FILE] [--port N] [--bind ADDR] [--set KEY=JSON ...]
# It loads boards/<board>.json, the config file and the overrides, checks
# them, and runs the same broker a board runs. Uses compiled .mpy files
# from build/host when present (as a board would), else the sources.
import sys
import json

_here = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
ROOT = _here + "/.."


def _paths(use_src):
    import os

    b = ROOT + "/build/host"
    try:
        os.stat(b + "/broker")
        ok = not use_src
    except OSError:
        ok = False
    if ok:
        sys.path[:0] = [b + "/lib", b]
    else:
        sys.path[:0] = [ROOT + "/lib", ROOT + "/firmware"]


def main(argv):
    board = "unix"
    cfgfile = None
    over = {}
    use_src = False
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
            use_src = True
        else:
            print("mp_host: unknown argument %s" % a)
            return 2
        i += 1
    _paths(use_src)
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
