# What a board does at boot, called by /main.py: it reads the files deploy
# wrote, brings the network up through board.py, starts the watchdog and
# hands over to the broker. Frozen into the firmware with the broker, it
# costs no heap for its code, where the same lines in /main.py, which a
# board compiles from source, held 2.8 KB of the heap for good.
# Files, relative to the current directory (/ on a board at boot, the
# simulated board's directory on the host):
#   board.json    the board profile, boards/<name>.json
#   config.json   broker config (broker/config.py keys); its "network" object
#                 holds the settings board.NET_DEFAULTS lists
#   secrets.json  {"wifi_password": ..., "ap_password": ...}
# log_dest "stdout,file" (or "file" alone) adds the flash log ring.
# When something goes wrong:
#   - bad config: logged and the broker is not started; the board waits at
#     the REPL for a fixed config.json (for MAINTENANCE_MS if the watchdog
#     already runs, then it resets and tries again);
#   - Ctrl-C, e.g. mpremote connecting for a deploy: the watchdog is fed
#     from a timer for MAINTENANCE_MS, so the copy is not cut off; after
#     that the watchdog resets the board into the broker again;
#   - any other exception, or run() returning: logged, and the board resets
#     after RESTART_DELAY_MS (long enough to break in with Ctrl-C, and no
#     tight reboot loop that hammers the flash or the AP).
import gc
import os
import sys
import time

import board
from broker import log
from broker.config import ConfigError

PROFILE = "board.json"
CONFIG = "config.json"
SECRETS = "secrets.json"
RESET_NOTE = "reset.txt"  # why we reset ourselves; rp2 reports it as "watchdog"
RESTART_DELAY_MS = 10000
MAINTENANCE_MS = 600000
LOG_DIR = "log"
LOG_FILES = 2
LOG_FILE_BYTES = 4096


def _read(path):
    try:
        os.stat(path)
    except OSError:
        return None
    from broker.config import load_json

    return load_json(path)


def _config():
    # The board's name, the broker config built from its profile and
    # config.json, and the secrets. Neither the rest of the profile nor
    # broker.config is kept (config.unload()).
    from broker.config import build, unload

    profile = _read(PROFILE) or {}
    cfg = build(profile.get("config"), _read(CONFIG))
    secrets = _read(SECRETS) or {}
    unload()
    return profile.get("name", "?"), cfg, secrets


def _take_note():
    try:
        with open(RESET_NOTE) as f:
            s = f.read()
        os.remove(RESET_NOTE)
        return s.strip()
    except OSError:
        return None


def _leave_note(why):
    # A small file is stored inline in LittleFS metadata: cheap to write.
    try:
        with open(RESET_NOTE, "w") as f:
            f.write(why[:120])
    except OSError:
        pass


def _log_ring(cfg):
    dests = [d.strip() for d in cfg["log_dest"].replace("+", ",").split(",")]
    if "file" not in dests:
        return None
    import logring

    ring = logring.LogRing(LOG_DIR, LOG_FILES, LOG_FILE_BYTES)
    if "stdout" in dests:
        log.add_sink(ring)
    else:
        log.set_sinks([ring])
    return ring


def _log_exception(e):
    import io

    buf = io.StringIO()
    sys.print_exception(e, buf)
    for line in buf.getvalue().split("\n"):
        if line:
            log.error("%s", line)
    return repr(e)


def _maintenance(wdt, ring, why):
    if wdt is not None and board.feed_for(wdt, MAINTENANCE_MS):
        log.warning("%s: watchdog fed for %d s, then the board resets", why, MAINTENANCE_MS // 1000)
    if ring:
        ring.flush()


def _restart(why, ring, wdt):
    log.error("restarting in %d s (%s)", RESTART_DELAY_MS // 1000, why)
    if ring:
        ring.flush()
    _leave_note(why)
    end = time.ticks_add(time.ticks_ms(), RESTART_DELAY_MS)
    try:
        while time.ticks_diff(end, time.ticks_ms()) > 0:
            if wdt is not None:
                wdt.feed()
            time.sleep_ms(200)
    except KeyboardInterrupt:
        _maintenance(wdt, ring, "interrupted")
        return
    board.reset()


def start(app=None):
    # app: the module with run(cfg, wdt); broker.app unless a test
    # passes a stand-in.
    ring = None
    wdt = None
    try:
        name, cfg, secrets = _config()
        log.set_level(cfg["log_level"])
        ring = _log_ring(cfg)
        note = _take_note()
        log.info("boot: board %s, reset cause %s%s", name,
                 board.reset_cause(), " (before: %s)" % note if note else "")
        net = board.check_net(cfg["network"], secrets)
        board.net_up(cfg["network"], secrets)
        wdt = board.watchdog(net["watchdog_ms"])
        import asyncio

        # Tasks created before the broker's asyncio.run() run alongside it.
        asyncio.create_task(board.keep_wifi(cfg["network"], secrets))
        if ring:
            asyncio.create_task(ring.run())
        if app is None:
            from broker import app
        secrets = None
        gc.collect()
        app.run(cfg, wdt)
        why = "broker.app.run() returned"
        log.error("%s", why)
    except ConfigError as e:
        log.error("config: %s", e)
        log.error("broker not started: fix config.json or secrets.json (mpremote cp), then reset")
        _maintenance(wdt, ring, "bad config")
        return
    except KeyboardInterrupt:
        log.warning("interrupted")
        _maintenance(wdt, ring, "interrupted")
        return
    except (Exception, SystemExit) as e:
        if isinstance(e, getattr(app, "StartError", ())):
            # A config that cannot work on this board (broker.app.start):
            # restarted into every 10 s, it rejoined Wi-Fi and wrote the
            # log ring to flash each time.
            log.error("broker not started: %s", e)
            _maintenance(wdt, ring, "bad config")
            return
        # SystemExit: the broker stopped itself on a state it cannot go on
        # from (transport.py); a restart clears it.
        why = _log_exception(e)
    _restart(why, ring, wdt)
