"""The board layer, the flash log ring, main.py and the board profiles.

firmware/board.py, logring.py and main.py run here unchanged under the
MicroPython unix port, with host_tests/fakes/ first on MICROPYPATH so that
`import network` and `import machine` get the fakes (a scripted radio and
access points, a WDT and timer that record what they are asked). Each test
runs a short MicroPython script whose asserts are the checks; the script
prints OK at its end. Nothing here needs hardware; what only hardware can
show is listed in boards/README.md.
"""
import json
import os
import textwrap

import pytest

from conftest import REPO, run_mp

FAKES = REPO / "host_tests" / "fakes"
MP_PATH = os.pathsep.join([str(FAKES), str(REPO / "firmware"), str(REPO / "lib"), ".frozen"])
PROFILES = sorted((REPO / "boards").glob("*.json"))

# Every script starts from a fresh fake world with one AP, "home".
PRE = """
import network, machine, board, time, sys
network.reset()
network.aps["home"] = "password1"
"""


def mp(code, cwd=None, pre=PRE):
    r = run_mp(pre + textwrap.dedent(code) + "\nprint('OK')\n", heap="4M", timeout=60, cwd=cwd,
               env={"MICROPYPATH": MP_PATH})
    assert r.returncode == 0 and r.stdout.rstrip().endswith("OK"), (
        "MicroPython script failed (exit %d):\n%s%s" % (r.returncode, r.stdout, r.stderr))
    return r.stdout


def test_fakes_stand_in_for_the_radio():
    mp("""
    assert board.network.__file__.endswith("fakes/network.py"), board.network.__file__
    assert board.machine.__file__.endswith("fakes/machine.py"), board.machine.__file__
    """)


# ---------------------------------------------------------------- backoff


def test_backoff_grows_and_is_capped():
    mp("""
    b = board.Backoff(1000, 60000, rand=lambda n: n)   # always the ceiling
    seq = [b.next_ms() for _ in range(10)]
    assert seq == [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000, 60000], seq
    assert b.ceiling(500) == 60000          # no big integers, still capped
    b.reset()
    assert b.next_ms() == 1000
    d = board.Backoff()                      # the documented defaults
    assert (d.base, d.cap) == (1000, 60000)
    assert board.NET_DEFAULTS["backoff_base_ms"] == 1000 and board.NET_DEFAULTS["backoff_cap_ms"] == 60000
    """)


def test_backoff_full_jitter_stays_within_bounds():
    # Real random numbers: every wait lies in 0..min(cap, base * 2**n), and
    # the waits spread over that range (full jitter, not a fixed delay).
    mp("""
    b = board.Backoff(1000, 60000)
    for n in range(12):
        c = b.ceiling(n)
        xs = []
        for _ in range(300):
            b.attempt = n
            xs.append(b.next_ms())
        assert min(xs) >= 0 and max(xs) <= c, (n, c, min(xs), max(xs))
        assert max(xs) > c * 0.8 and min(xs) < c * 0.2, (n, c, min(xs), max(xs))
        mean = sum(xs) / len(xs)
        assert 0.35 * c < mean < 0.65 * c, (n, c, mean)
    """)


# ---------------------------------------------------------------- station link


def test_link_reconnects_after_a_drop():
    # Deterministic: poll(now) with a made-up clock.
    mp("""
    w = network.WLAN(network.STA_IF)
    w.active(True)
    link = board.StaLink(w, "home", "password1", board.Backoff(1000, 60000), 20000)
    t = 0
    for _ in range(10):
        t += link.poll(t)
        if link.up:
            break
    assert link.up and link.attempts == 1, (link.state, link.attempts)
    assert link.poll(t) == link.check_ms          # a good link is only checked

    w.drop()
    d = link.poll(t)                               # notices the drop
    assert link.state == board.DOWN and link.drops == 1
    assert 0 <= d <= 1000, d                       # first retry within base
    assert link.poll(t) == d                       # not due yet: waits
    t += d
    for _ in range(10):
        t += link.poll(t)
        if link.up:
            break
    assert link.up and link.attempts == 2
    joins = [c for c in network.calls if c[0] == "connect"]
    assert joins == [("connect", ("home", "password1"))] * 2, joins
    assert ("disconnect", (network.STA_IF,)) in network.calls   # before rejoining
    """)


def test_failed_joins_back_off_then_recover():
    mp("""
    network.aps["home"] = "another-password"       # our password is now wrong
    w = network.WLAN(network.STA_IF)
    w.active(True)
    link = board.StaLink(w, "home", "password1", board.Backoff(1000, 8000, rand=lambda n: n), 20000)
    t = 0
    waits = []
    while len(waits) < 6:
        d = link.poll(t)
        if link.state == board.DOWN and d >= 1000:
            waits.append(d)
        t += d
    assert waits == [1000, 2000, 4000, 8000, 8000, 8000], waits
    network.aps["home"] = "password1"              # fixed on the AP side
    for _ in range(20):
        t += link.poll(t)
        if link.up:
            break
    assert link.up and link.backoff.attempt == 0
    """)


def test_join_that_hangs_is_abandoned_after_the_timeout():
    mp("""
    network.connect_polls = 10 ** 6                # the join never completes
    w = network.WLAN(network.STA_IF)
    w.active(True)
    link = board.StaLink(w, "home", "password1", board.Backoff(1000, 60000, rand=lambda n: 7), 5000)
    t = 0
    assert link.poll(t) == link.poll_ms and link.state == board.CONNECTING
    t = 4999
    assert link.poll(t) == link.poll_ms            # still within the timeout
    t = 5000
    assert link.poll(t) == 7 and link.state == board.DOWN
    """)


def test_wifi_up_and_keep_wifi_coroutine_rejoin():
    # The real entry points with real time and asyncio: wifi_up joins at
    # boot; keep_wifi, created before asyncio.run() as main.py does, rejoins
    # after a drop.
    mp("""
    import asyncio
    net = {"ssid": "home", "hostname": "gw-test", "backoff_base_ms": 20, "backoff_cap_ms": 100}
    sec = {"wifi_password": "password1"}
    assert board.wifi_up(net, sec) is True
    assert network.hostname() == "gw-test"
    assert board.ifconfig()[0] == "192.168.1.50"
    w = network.WLAN(network.STA_IF)
    assert ("config", (network.STA_IF, {"pm": w.PM_NONE})) in network.calls   # power save off

    async def scenario():
        await asyncio.sleep_ms(50)
        w.drop()
        assert not w.isconnected()
        for _ in range(100):
            await asyncio.sleep_ms(50)
            if w.isconnected():
                return True
        return False

    asyncio.create_task(board.keep_wifi(net, sec))
    assert asyncio.run(scenario()) is True
    assert board._sta.drops == 1
    assert len([c for c in network.calls if c[0] == "connect"]) == 2
    """)


def test_wifi_up_returns_after_boot_wait_without_an_ap():
    mp("""
    network.connect_polls = 1                      # each failed try takes one 250 ms poll
    net = {"ssid": "elsewhere", "boot_wait_ms": 1000, "backoff_base_ms": 10, "backoff_cap_ms": 40}
    t0 = time.ticks_ms()
    assert board.wifi_up(net, {}) is False
    took = time.ticks_diff(time.ticks_ms(), t0)
    assert 1000 <= took < 4000, took                # the bound, with room for a loaded host
    assert board._sta.attempts >= 3, board._sta.attempts   # kept retrying meanwhile
    """)


# ---------------------------------------------------------------- access point


def test_access_point_mode_applies_ssid_password_channel():
    out = mp("""
    net = {"mode": "ap", "ssid": "gateway-7", "channel": 11, "hostname": "gw7", "country": "DE"}
    assert board.net_up(net, {"ap_password": "ap-secret-1"}) is True
    ap = network.WLAN(network.AP_IF)
    assert ap.active()
    assert ap._cfg == {"ssid": "gateway-7", "key": "ap-secret-1", "channel": 11,
                       "security": network.AUTH_WPA2_PSK}, ap._cfg
    assert network.hostname() == "gw7" and network.country() == "DE"
    assert not network.WLAN(network.STA_IF).active()     # station left off
    assert board.ifconfig()[0] == "192.168.4.1"

    network.reset()
    board.ap_up({"mode": "ap", "ssid": "open-gw"}, {"ap_password": ""})
    ap = network.WLAN(network.AP_IF)
    assert ap._cfg["security"] == network.AUTH_OPEN and "key" not in ap._cfg
    assert ap._cfg["channel"] == 6                        # the default
    """)
    assert "is open" in out   # an open AP is worth a warning


def test_bad_network_config_names_the_key():
    cases = [
        ({"mode": "sta"}, {}, "'network.ssid'"),
        ({"ssid": "home", "mode": "mesh"}, {}, "'network.mode'"),
        ({"ssid": "home", "ssdi": "x"}, {}, "'network.ssdi'"),
        ({"mode": "ap", "ssid": "gw", "channel": 14}, {"ap_password": "password1"}, "'network.channel'"),
        ({"ssid": "home", "hostname": "bad_name!"}, {}, "'network.hostname'"),
        ({"ssid": "home", "watchdog_ms": "8000"}, {}, "'network.watchdog_ms'"),
        ({"ssid": "home", "country": "Germany"}, {}, "'network.country'"),
        ({"ssid": "x" * 33}, {}, "'network.ssid'"),
        ({"ssid": "home", "backoff_base_ms": 5000, "backoff_cap_ms": 1000}, {}, "'network.backoff_cap_ms'"),
        ({"ssid": "home"}, {"wifi_password": "hunter2"}, "'wifi_password'"),
        ({"mode": "ap", "ssid": "gw"}, {}, "'ap_password'"),
        ({"mode": "ap", "ssid": "gw"}, {"ap_password": 12345678}, "'ap_password'"),
        ("not an object", {}, "'network'"),
    ]
    out = mp("""
    import json
    from broker.config import ConfigError
    for net, sec, want in json.loads(%r):
        try:
            board.check_net(net, sec)
        except ConfigError as e:
            msg = str(e)
            assert want in msg, (want, msg)
            assert "hunter2" not in msg                     # never a password
            print("MSG", msg)
        else:
            raise AssertionError("accepted %%r" %% (net,))
    # wifi_up checks before it touches the radio
    try:
        board.wifi_up({"mode": "sta"}, {})
    except ConfigError:
        pass
    assert network.calls == [], network.calls
    """ % json.dumps(cases))
    assert out.count("MSG ") == len(cases)


# ---------------------------------------------------------------- watchdog, reset


def test_watchdog_is_clamped_on_rp2_only():
    out = mp("""
    w = board.watchdog(10000, platform="rp2")
    assert w.timeout == 8388 == board.RP2_WDT_MAX_MS, w.timeout
    assert board.watchdog(5000, platform="rp2").timeout == 5000
    assert board.watchdog(10000, platform="esp32").timeout == 10000
    n = len(machine.wdts)
    off = board.watchdog(0)
    off.feed()
    assert len(machine.wdts) == n                  # 0: no hardware watchdog
    assert board.wdt_timeout(60000, "rp2") == 8388 and board.wdt_timeout(60000, "esp32") == 60000
    """)
    assert "10000 ms is over the rp2 limit; using 8388 ms" in out


def test_feed_for_keeps_feeding_then_stops():
    mp("""
    w = board.watchdog(8000, platform="esp32")
    t = board.feed_for(w, 400, platform="esp32")   # 400 ms: room for a loaded host
    assert t.period == 1000 and t.id == 0          # esp32: a hardware timer
    t.fire(); t.fire()
    assert w.feeds == 2
    time.sleep_ms(450)
    t.fire()
    assert w.feeds == 2 and not t.running          # window over: the WDT may bite
    assert board.feed_for(board.watchdog(0), 100) is None
    assert board.feed_for(w, 100, platform="rp2").id == -1
    """)


def test_reset_cause_names():
    mp("""
    want = {machine.PWRON_RESET: "power_on", machine.HARD_RESET: "hard", machine.WDT_RESET: "watchdog",
            machine.DEEPSLEEP_RESET: "deepsleep", machine.SOFT_RESET: "soft", 99: "unknown"}
    for code in want:
        machine.cause = code
        assert board.reset_cause() == want[code], (code, board.reset_cause())

    class Rp2:                                     # rp2 has only these two
        PWRON_RESET = 1
        WDT_RESET = 3
    assert board.cause_name(3, Rp2) == "watchdog" and board.cause_name(2, Rp2) == "unknown"
    """)


# ---------------------------------------------------------------- log ring


def test_log_ring_is_bounded_and_writes_in_batches(tmp_path):
    mp("""
    import os, logring
    from broker import log
    ring = logring.LogRing("log", files=3, file_bytes=1024, batch_bytes=256, max_line=100, min_gap_ms=0)
    log.set_sinks([ring])
    for i in range(500):
        log.info("line %04d %s", i, "x" * 20)
    ring.flush()
    names = sorted(os.listdir("log"))
    assert names == ["0.log", "1.log", "2.log"], names
    for n in names:
        assert os.stat("log/" + n)[6] <= 1024, (n, os.stat("log/" + n)[6])
    assert ring.writes < 500 // 5, ring.writes     # batches, not a write per line
    text = "".join(open(p).read() for p in logring.paths("log"))
    nums = [int(l.split()[3]) for l in text.splitlines()]
    assert nums == sorted(nums) and nums[-1] == 499, nums[-5:]   # oldest first, newest kept
    assert nums[0] > 0                             # the oldest were rotated away
    """, cwd=tmp_path)


def test_log_ring_writes_errors_at_once_and_truncates(tmp_path):
    mp("""
    import os, logring
    from broker import log
    ring = logring.LogRing("log", files=2, file_bytes=4096, batch_bytes=1024, max_line=60)
    log.set_sinks([ring])
    log.info("quiet")
    assert ring.writes == 0                        # buffered
    log.error("crash: %s", "y" * 200)
    assert ring.writes == 1
    lines = open("log/0.log").read().splitlines()
    assert lines[0].endswith("I quiet") and "E crash" in lines[1], lines
    assert len(lines[1].split(" ", 1)[1]) == 60 and lines[1].endswith("..."), lines[1]
    """, cwd=tmp_path)


def test_log_ring_writes_a_flood_of_lines_at_most_once_each_min_gap_and_counts_what_it_drops(tmp_path):
    # A warning a message (each one a full store cannot take, say) made a
    # write, about one block erase, every batch_bytes of lines: at 100
    # lines a second, several a second.
    mp("""
    import os, time, logring
    from broker import log
    ring = logring.LogRing("log", files=2, file_bytes=4096, batch_bytes=512, max_line=100, min_gap_ms=300)
    log.set_sinks([ring])
    t0 = time.ticks_ms()
    i = 0
    while time.ticks_diff(time.ticks_ms(), t0) < 1000:
        log.warning("store full: %d not stored", i)
        i += 1
    elapsed = time.ticks_diff(time.ticks_ms(), t0)
    assert i > 1000, i
    assert 1 <= ring.writes <= elapsed // 300 + 1, (ring.writes, elapsed)
    assert ring.dropped > 0 and ring._n < 512 + 120, (ring.dropped, ring._n)   # the buffer stays a batch
    lost = ring.dropped
    time.sleep_ms(300)
    log.warning("calm again")
    assert ring.writes >= 2
    text = open("log/0.log").read()
    assert ("%d log lines lost" % lost) in text and text.endswith("W calm again\\n"), text[-200:]
    log.error("crash")                             # within the gap: kept, written at the next chance
    assert "crash" not in open("log/0.log").read()
    ring.flush()
    assert open("log/0.log").read().endswith("E crash\\n")
    for i in range(200):                           # a flood fills the batch, then the reason for a crash
        log.warning("flood %d", i)
    log.error("Traceback: the reason")
    ring.flush()                                   # (gateway._restart's, before the reset)
    assert open("log/0.log").read().endswith("E Traceback: the reason\\n")
    # ticks_ms wraps after 6.2 days: a last write "ahead" of now is long ago.
    ring._last = time.ticks_add(time.ticks_ms(), 1000)
    n = ring.writes
    log.error("after a quiet week")
    assert ring.writes == n + 1, (ring.writes, n)
    """, cwd=tmp_path)


def test_log_ring_survives_flash_errors_and_a_reboot(tmp_path):
    mp("""
    import os, logring
    ring = logring.LogRing("log", files=2, file_bytes=512, batch_bytes=128, max_line=60, min_gap_ms=0)
    ring("I before")
    ring.flush()
    os.remove("log/0.log"); os.rmdir("log")        # the folder is gone: writes fail
    ring("I lost one")
    ring("I lost two")
    ring.flush()                                   # must not raise
    assert ring.dropped == 2 and ring._buf == []
    os.mkdir("log")
    ring("E back")
    assert "2 log lines lost" in open("log/0.log").read()

    size = os.stat("log/0.log")[6]
    again = logring.LogRing("log", files=2, file_bytes=512, batch_bytes=128, max_line=60,
                            min_gap_ms=0)  # after a reboot
    assert again._size == size
    for i in range(40):
        again("I after reboot %d" % i)
    again.flush()
    for p in logring.paths("log"):
        assert os.stat(p)[6] <= 512, p
    """, cwd=tmp_path)


# ---------------------------------------------------------------- main.py


def _board_files(d, config, secrets, profile="esp32"):
    (d / "board.json").write_text((REPO / "boards" / (profile + ".json")).read_text())
    (d / "config.json").write_text(json.dumps(config))
    (d / "secrets.json").write_text(json.dumps(secrets))


MAIN_PRE = PRE + """
import gateway as main
calls = []
class App:
    def __init__(self, exc):
        self.exc = exc
    def run(self, cfg, wdt=None):
        calls.append((cfg, wdt))
        raise self.exc
"""


def test_main_brings_everything_up_then_runs_the_broker(tmp_path):
    _board_files(tmp_path, {"network": {"ssid": "home", "hostname": "gw1"}, "log_dest": "stdout,file",
                            "max_sessions": 5}, {"wifi_password": "password1"})
    out = mp("""
    machine.cause = machine.WDT_RESET
    main.start(App(KeyboardInterrupt()))           # Ctrl-C ends run(): maintenance
    cfg, wdt = calls[0]
    assert cfg["max_connections"] == 8 and cfg["max_sessions"] == 5   # profile, then config.json
    assert wdt is machine.wdts[-1] and wdt.timeout == 8000
    assert network.hostname() == "gw1" and network.WLAN(network.STA_IF).isconnected()
    assert machine.timers and machine.timers[-1].running              # feeding for maintenance
    assert machine.resets == []
    import os
    text = open("log/0.log").read()
    assert "board esp32, reset cause watchdog" in text and "interrupted" in text, text
    assert "password1" not in text
    """, cwd=tmp_path, pre=MAIN_PRE)
    assert "boot: board esp32, reset cause watchdog" in out


def test_main_logs_a_crash_and_resets_after_a_delay(tmp_path):
    _board_files(tmp_path, {"network": {"ssid": "home"}, "log_dest": "file"}, {"wifi_password": "password1"})
    mp("""
    main.RESTART_DELAY_MS = 300
    t0 = time.ticks_ms()
    try:
        main.start(App(ValueError("boom")))
    except machine.Reset:
        pass
    assert len(machine.resets) == 1
    assert time.ticks_diff(time.ticks_ms(), t0) >= 300
    assert machine.wdts[-1].feeds > 0                      # fed while waiting
    assert "boom" in open("reset.txt").read()
    text = open("log/0.log").read()
    assert "ValueError: boom" in text and "restarting in" in text, text

    # The next boot says why it came up, and forgets the note.
    main.start(App(KeyboardInterrupt()))
    import os
    assert "reset.txt" not in os.listdir()
    assert "(before: ValueError('boom'" in open("log/0.log").read()
    """, cwd=tmp_path, pre=MAIN_PRE)


def test_main_stops_in_maintenance_when_the_config_cannot_work_on_this_board(tmp_path):
    # broker.app.start's StartError (min_free_heap over the free heap, a
    # persistence_location it cannot use): restarted into every 10 s, the
    # board rejoined Wi-Fi and wrote its log ring to flash each time.
    _board_files(tmp_path, {"network": {"ssid": "home"}, "log_dest": "file"}, {"wifi_password": "password1"})
    mp("""
    class StartError(ValueError):
        pass
    app = App(StartError("min_free_heap 200000 leaves no room for a client"))
    app.StartError = StartError
    main.start(app)
    assert machine.resets == []
    assert machine.timers and machine.timers[-1].running              # feeding for maintenance
    text = open("log/0.log").read()
    assert "broker not started: min_free_heap 200000" in text and "restarting" not in text, text
    """, cwd=tmp_path, pre=MAIN_PRE)


def test_main_with_a_bad_config_does_not_start(tmp_path):
    _board_files(tmp_path, {"network": {"ssid": "home"}, "max_connections": 0}, {"wifi_password": "password1"})
    out = mp("""
    main.start(App(AssertionError("must not run")))
    assert calls == [] and machine.resets == [] and machine.wdts == []
    """, cwd=tmp_path, pre=MAIN_PRE)
    assert "config key 'max_connections'" in out

    _board_files(tmp_path, {"network": {"ssid": "home"}}, {"wifi_password": "short-7"})
    out = mp("""
    main.start(App(AssertionError("must not run")))
    assert calls == [] and network.calls == []
    """, cwd=tmp_path, pre=MAIN_PRE)
    assert "secrets key 'wifi_password'" in out and "short-7" not in out


# ---------------------------------------------------------------- board profiles

TOP_KEYS = {"name": str, "description": str, "heap": int, "c_stack": int, "sockets": int,
            "tls_sessions": int, "fs_size": int}
ARCHS = ("x86", "xtensawin", "armv6m", "armv7m", "armv7emsp")


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_is_complete_and_consistent(path):
    prof = json.loads(path.read_text())
    ref = json.loads((REPO / "boards" / "esp32.json").read_text())
    assert set(prof) == set(ref), "keys differ from esp32.json: %s" % (set(prof) ^ set(ref))
    assert set(prof["config"]) == set(ref["config"]), set(prof["config"]) ^ set(ref["config"])
    assert prof["name"] == path.stem
    for k, t in TOP_KEYS.items():
        assert isinstance(prof[k], t) and not isinstance(prof[k], bool), k
    assert prof["mpy_arch"] in ARCHS
    cfg = prof["config"]
    fl = prof["flash"]
    if path.stem == "unix":
        assert fl is None and prof["mpy_arch"] == "x86"
        return
    # Sockets: the listener takes one; rp2 counts only active connections,
    # and keeps one for a bridge uplink.
    assert cfg["max_connections"] <= prof["sockets"] - 1
    assert fl["tool"] in ("esptool", "uf2")
    if fl["tool"] == "esptool":
        assert fl["chip"] in ("esp32", "esp32s3") and fl["offset"] in ("0x1000", "0x0")
        assert prof["mpy_arch"] == "xtensawin"
    else:
        assert fl["drive"] and prof["mpy_arch"] == "armv6m"
        # TLS sessions come out of the Python heap on rp2: 25 KB each.
        assert prof["tls_sessions"] * 25000 <= prof["heap"] // 4
    if cfg["persistence"]:
        assert cfg["persistence_location"].startswith("/")
        assert cfg["store_max_bytes"] <= prof["fs_size"] // 2   # room for code, logs, wear levelling


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_config_builds_under_micropython(path):
    out = mp("""
    import json
    from broker.config import build
    prof = json.load(open(%r))
    cfg = build(prof["config"])
    for k in prof["config"]:
        assert cfg[k] == prof["config"][k], k
    print("built", prof["name"], cfg["max_connections"])
    """ % str(path), pre="")
    assert "built %s" % path.stem in out


def test_flash_offsets_and_arches_match_the_platform_facts():
    p = {x.stem: json.loads(x.read_text()) for x in PROFILES}
    assert p["esp32"]["flash"] == {"tool": "esptool", "chip": "esp32", "offset": "0x1000"}
    assert p["esp32s3"]["flash"] == {"tool": "esptool", "chip": "esp32s3", "offset": "0x0"}
    assert p["pico_w"]["flash"]["tool"] == "uf2" and p["pico2_w"]["flash"]["tool"] == "uf2"
    assert p["esp32"]["config"]["max_connections"] == 8
    assert p["pico_w"]["config"]["max_connections"] == 4 and p["pico2_w"]["config"]["max_connections"] == 4
    assert p["pico_w"]["config"]["store_max_bytes"] == 256 * 1024 and p["pico_w"]["fs_size"] == 848 * 1024
    assert p["pico2_w"]["fs_size"] == 2560 * 1024
    assert (p["pico_w"]["c_stack"], p["pico2_w"]["c_stack"], p["esp32"]["c_stack"]) == (7936, 12032, 15360)
