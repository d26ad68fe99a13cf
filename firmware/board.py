# The board layer: the only module that imports `network` and `machine`.
# Everything that decides something (network settings check, reconnect
# backoff, the station link's state machine, watchdog clamp, reset-cause
# names) is plain Python, so host_tests run this file under the unix port
# with fake `network` and `machine` modules from host_tests/fakes/.
#
# Network settings live in the config's "network" object (see NET_DEFAULTS)
# and passwords in secrets.json, so a config can be shown without secrets.
# Error messages name the key and never print a password.
import sys
import time
import random
from micropython import const

from broker import log
from broker.config import ConfigError

try:
    import network
except ImportError:  # the unix port: no radio, the host's network is used
    network = None
try:
    import machine
except ImportError:
    machine = None

# Reconnect policy for station mode, "full jitter" exponential backoff:
# the n-th retry (n = 0, 1, ...) waits a uniformly random time in
# 0 .. min(cap, base * 2**n) ms.
# - base 1 s: most failed associations are transient (AP busy, a missed
#   beacon) and a quick retry usually works.
# - cap 60 s: a home router takes 30-120 s to reboot; a minute bounds how
#   long the broker stays offline once the AP is back, and keeps a failing
#   gateway from trying more than about once every 30 s on average.
# - full jitter: after a power cut every gateway on the site boots at the
#   same moment; random waits spread their attempts out instead of hitting
#   the AP in lockstep.
_BACKOFF_BASE_MS = const(1000)
_BACKOFF_CAP_MS = const(60000)
# An attempt that has not given an IP within this time is abandoned.
# WPA2 plus DHCP takes 2-5 s; the CYW43 on rp2 sometimes needs 10 s.
_CONNECT_TIMEOUT_MS = const(20000)
_POLL_MS = const(250)  # how often a connect in progress is checked
_CHECK_MS = const(2000)  # how often a working link is checked
# wifi_up() returns after this long even without a link, so the broker
# starts and keep_wifi() goes on trying in the background.
_BOOT_WAIT_MS = const(30000)
# The RP2040/RP2350 watchdog counts down a 24-bit value at 2 ticks per us
# (an erratum of the RP2040, kept on the RP2350 port): 0xFFFFFF / 2000 us
# is 8388 ms. machine.WDT on rp2 rejects anything longer.
RP2_WDT_MAX_MS = const(8388)

NET_DEFAULTS = {
    "mode": "sta",  # "sta" joins an AP, "ap" is one, "none" leaves the radio off
    "ssid": None,  # the AP to join ("sta") or the AP's own name ("ap")
    "channel": 6,  # "ap" only; 1..13
    "hostname": None,  # None: "mqtt-" + the last 3 bytes of machine.unique_id()
    "country": None,  # two letters, e.g. "DE"; sets the allowed channels
    "watchdog_ms": 8000,  # 0 turns the watchdog off; clamped to 8388 on rp2
    "boot_wait_ms": _BOOT_WAIT_MS,
    "connect_timeout_ms": _CONNECT_TIMEOUT_MS,
    "backoff_base_ms": _BACKOFF_BASE_MS,
    "backoff_cap_ms": _BACKOFF_CAP_MS,
}
_MODES = ("sta", "ap", "none")
# key: (lo, hi) for the integer settings.
_NET_INTS = {
    "channel": (1, 13),
    "watchdog_ms": (0, 3600000),
    "boot_wait_ms": (0, 3600000),
    "connect_timeout_ms": (1000, 600000),
    "backoff_base_ms": (1, 600000),
    "backoff_cap_ms": (1, 3600000),
}


def _err(key, msg):
    return ConfigError("config key 'network.%s': %s" % (key, msg))


def _secret_err(key, msg):
    return ConfigError("secrets key '%s': %s" % (key, msg))


def _check_password(key, pw, required):
    # WPA2-PSK takes 8..63 characters or 64 hex digits; "" means an open
    # network. Only lengths are reported, never the password.
    if pw is None:
        if required:
            raise _secret_err(key, "missing; give 8 to 63 characters, or \"\" for an open network")
        return ""
    if not isinstance(pw, str):
        raise _secret_err(key, "expected a string")
    n = len(pw)
    if n and not (8 <= n <= 63 or n == 64):
        raise _secret_err(key, "WPA2 needs 8 to 63 characters, got %d" % n)
    return pw


def _default_hostname():
    try:
        uid = machine.unique_id()
        return "mqtt-" + "".join("%02x" % b for b in uid[-3:])
    except Exception:
        return "mqtt-broker"


def check_net(net_cfg, secrets=None):
    # Returns a complete, checked copy of the network settings, with the
    # password to use under "password". Raises ConfigError naming the key.
    if net_cfg is None:
        net_cfg = {}
    if not isinstance(net_cfg, dict):
        raise ConfigError("config key 'network': expected an object")
    if secrets is None:
        secrets = {}
    if not isinstance(secrets, dict):
        raise ConfigError("secrets file: expected a JSON object")
    net = dict(NET_DEFAULTS)
    for k in net_cfg:
        if k not in NET_DEFAULTS:
            raise _err(k, "unknown key (known: %s)" % ", ".join(sorted(NET_DEFAULTS)))
        net[k] = net_cfg[k]
    mode = net["mode"]
    if mode not in _MODES:
        raise _err("mode", "expected one of %s, got %r" % (", ".join(_MODES), mode))
    for k in _NET_INTS:
        v = net[k]
        lo, hi = _NET_INTS[k]
        if isinstance(v, bool) or not isinstance(v, int):
            raise _err(k, "expected an integer, got %r" % (v,))
        if v < lo or v > hi:
            raise _err(k, "%d is outside %d..%d" % (v, lo, hi))
    if net["backoff_cap_ms"] < net["backoff_base_ms"]:
        raise _err("backoff_cap_ms", "must not be less than backoff_base_ms")
    ssid = net["ssid"]
    if mode != "none":
        if ssid is None:
            raise _err("ssid", "required for network mode '%s'" % mode)
        if not isinstance(ssid, str) or not 1 <= len(ssid.encode()) <= 32:
            raise _err("ssid", "expected a name of 1 to 32 bytes, got %r" % (ssid,))
    h = net["hostname"]
    if h is None:
        h = net["hostname"] = _default_hostname()
    if not isinstance(h, str) or not 1 <= len(h) <= 32 or h[0] == "-" or h[-1] == "-":
        raise _err("hostname", "expected 1 to 32 letters, digits or '-', got %r" % (h,))
    for c in h:
        if not (c.isalpha() or c.isdigit() or c == "-") or ord(c) > 127:
            raise _err("hostname", "expected 1 to 32 letters, digits or '-', got %r" % (h,))
    cc = net["country"]
    if cc is not None and (not isinstance(cc, str) or len(cc) != 2 or not cc.isalpha()):
        raise _err("country", "expected two letters such as \"DE\", got %r" % (cc,))
    if mode == "sta":
        net["password"] = _check_password("wifi_password", secrets.get("wifi_password"), False)
    elif mode == "ap":
        net["password"] = _check_password("ap_password", secrets.get("ap_password"), True)
    else:
        net["password"] = ""
    return net


# ---- reconnect backoff and the station link state machine (pure logic)


def _rand_upto(n):
    # A uniform integer in 0..n. getrandbits exists on every port; n is at
    # most 3600000, so the modulo bias is below 0.4 %.
    return random.getrandbits(30) % (n + 1)


class Backoff:
    def __init__(self, base_ms=_BACKOFF_BASE_MS, cap_ms=_BACKOFF_CAP_MS, rand=None):
        self.base = base_ms
        self.cap = cap_ms
        self.attempt = 0
        self._rand = rand or _rand_upto

    def ceiling(self, attempt):
        # min(cap, base * 2**attempt), without building a big integer.
        c = self.base
        for _ in range(attempt):
            c <<= 1
            if c >= self.cap:
                return self.cap
        return c if c < self.cap else self.cap

    def next_ms(self):
        d = self._rand(self.ceiling(self.attempt))
        self.attempt += 1
        return d

    def reset(self):
        self.attempt = 0


DOWN = const(0)
CONNECTING = const(1)
UP = const(2)
STATE_NAMES = ("down", "connecting", "up")

_status_names = None


def status_name(code):
    # STAT_* constants differ per port (esp32: 200+, rp2: -3..3).
    global _status_names
    if _status_names is None:
        _status_names = {}
        if network is not None:
            for k in dir(network):
                if k.startswith("STAT_"):
                    _status_names[getattr(network, k)] = k[5:].lower()
    return _status_names.get(code, str(code))


def _fail_codes():
    codes = []
    for k in ("STAT_WRONG_PASSWORD", "STAT_NO_AP_FOUND", "STAT_CONNECT_FAIL",
              "STAT_BEACON_TIMEOUT", "STAT_ASSOC_FAIL", "STAT_HANDSHAKE_TIMEOUT"):
        v = getattr(network, k, None)
        if v is not None:
            codes.append(v)
    return codes


class StaLink:
    # Keeps a station interface joined to one AP. poll(now) does one step
    # and returns how many ms it wants to wait before the next step, so the
    # same logic runs from a blocking loop at boot and from a coroutine.
    #   DOWN        --due-->           CONNECTING (wlan.connect)
    #   CONNECTING  --got an IP-->     UP          (backoff reset)
    #   CONNECTING  --failed/timeout-> DOWN        (wait backoff.next_ms())
    #   UP          --link lost-->     DOWN        (backoff reset, first wait)
    def __init__(self, wlan, ssid, password, backoff=None,
                 connect_timeout_ms=_CONNECT_TIMEOUT_MS, poll_ms=_POLL_MS, check_ms=_CHECK_MS):
        self.wlan = wlan
        self.ssid = ssid
        self._pw = password
        self.backoff = backoff or Backoff()
        self.connect_timeout_ms = connect_timeout_ms
        self.poll_ms = poll_ms
        self.check_ms = check_ms
        self._fail = _fail_codes()
        self._due = None  # ticks at which DOWN tries again; None: at once
        self._deadline = 0
        self.attempts = 0
        self.drops = 0
        # After a soft reset the esp32 radio is still associated: keep it.
        self.state = UP if wlan.isconnected() else DOWN

    @property
    def up(self):
        return self.state == UP

    def poll(self, now):
        w = self.wlan
        st = self.state
        if st == UP:
            if w.isconnected():
                return self.check_ms
            self.drops += 1
            log.warning("wifi: link to '%s' lost (%s)", self.ssid, status_name(w.status()))
            self.backoff.reset()
            return self._retry_later(now)
        if st == DOWN:
            if self._due is not None:
                wait = time.ticks_diff(self._due, now)
                if wait > 0:
                    return wait
            return self._start(now)
        # CONNECTING
        if w.isconnected():
            self.state = UP
            self.backoff.reset()
            log.info("wifi: joined '%s' as %s", self.ssid, w.ifconfig()[0])
            return self.check_ms
        code = w.status()
        if code in self._fail:
            why = status_name(code)
        elif time.ticks_diff(now, self._deadline) >= 0:
            why = "no IP after %d ms" % self.connect_timeout_ms
        else:
            return self.poll_ms
        d = self._retry_later(now)
        log.warning("wifi: joining '%s' failed (%s); next try in %d ms", self.ssid, why, d)
        return d

    def _retry_later(self, now):
        # Stop the driver's own attempt (esp32 raises "Wifi Internal State
        # Error" on connect() while one is running) and wait.
        try:
            self.wlan.disconnect()
        except OSError:
            pass
        d = self.backoff.next_ms()
        self.state = DOWN
        self._due = time.ticks_add(now, d)
        return d

    def _start(self, now):
        self.attempts += 1
        try:
            self.wlan.connect(self.ssid, self._pw)
        except OSError as e:
            d = self._retry_later(now)
            log.warning("wifi: connect() to '%s' raised %r; next try in %d ms", self.ssid, e, d)
            return d
        self.state = CONNECTING
        self._deadline = time.ticks_add(now, self.connect_timeout_ms)
        return self.poll_ms


# ---- the radio


_sta = None  # the StaLink made by wifi_up(), reused by keep_wifi()


def _need_network():
    if network is None:
        raise OSError("this port has no network module (Wi-Fi)")


def _iface(kind):
    # MicroPython 1.24 added WLAN.IF_STA/IF_AP; STA_IF/AP_IF still work.
    return getattr(network, kind + "_IF")


def hostname(name=None):
    # Set (or read) the DHCP/mDNS host name. network.hostname() exists from
    # MicroPython 1.20; older esp32 firmware took it through config().
    if network is None:
        return None
    if hasattr(network, "hostname"):
        return network.hostname(name) if name else network.hostname()
    w = network.WLAN(_iface("STA"))
    if name:
        w.config(dhcp_hostname=name)
        return name
    return w.config("dhcp_hostname")


def _prepare(net):
    # Host name and country must be set before the interface goes up.
    hostname(net["hostname"])
    if net["country"] and hasattr(network, "country"):
        network.country(net["country"].upper())


def _make_sta(net):
    global _sta
    w = network.WLAN(_iface("STA"))
    _prepare(net)
    w.active(True)
    # Power saving makes the radio sleep between beacons: a server then
    # answers late and can miss packets, so turn it off where possible.
    pm = getattr(w, "PM_NONE", None)
    if pm is not None:
        try:
            w.config(pm=pm)
        except (ValueError, OSError, TypeError):
            pass
    # esp32 retries on its own after a drop; leave that to StaLink.
    try:
        w.config(reconnects=0)
    except (ValueError, OSError, TypeError):
        pass
    b = Backoff(net["backoff_base_ms"], net["backoff_cap_ms"])
    _sta = StaLink(w, net["ssid"], net["password"], b, net["connect_timeout_ms"])
    return _sta


def wifi_up(net_cfg, secrets=None, wait_ms=None):
    # Station mode. Blocks until the link is up or wait_ms (default
    # network.boot_wait_ms) has passed; returns True when up.
    net = check_net(net_cfg, secrets)
    if net["mode"] != "sta":
        raise _err("mode", "wifi_up() needs mode 'sta', got '%s'" % net["mode"])
    _need_network()
    link = _make_sta(net)
    if wait_ms is None:
        wait_ms = net["boot_wait_ms"]
    t0 = time.ticks_ms()
    log.info("wifi: joining '%s' as %s", net["ssid"], net["hostname"])
    while True:
        now = time.ticks_ms()
        d = link.poll(now)
        if link.up:
            return True
        left = wait_ms - time.ticks_diff(now, t0)
        if left <= 0:
            log.warning("wifi: no link after %d ms; the broker starts anyway and keeps trying", wait_ms)
            return False
        time.sleep_ms(d if d < left else left)


def ap_up(net_cfg, secrets=None):
    # Access-point mode: the board is the network (SSID, WPA2 password,
    # channel). Returns the interface.
    net = check_net(net_cfg, secrets)
    if net["mode"] != "ap":
        raise _err("mode", "ap_up() needs mode 'ap', got '%s'" % net["mode"])
    _need_network()
    ap = network.WLAN(_iface("AP"))
    _prepare(net)
    kw = {"ssid": net["ssid"], "channel": net["channel"]}
    pw = net["password"]
    if pw:
        kw["key"] = pw
        sec = getattr(network, "AUTH_WPA2_PSK", None)  # esp32; rp2 uses WPA2 when a key is set
    else:
        sec = getattr(network, "AUTH_OPEN", 0)
        log.warning("wifi: access point '%s' is open (ap_password is empty)", net["ssid"])
    if sec is not None:
        kw["security"] = sec
    ap.config(**kw)
    ap.active(True)
    log.info("wifi: access point '%s' on channel %d at %s", net["ssid"], net["channel"], ap.ifconfig()[0])
    return ap


def net_up(net_cfg, secrets=None):
    # Brings the network up the way the config says. Returns True when a
    # link is up (always for "ap"; never for "none").
    net = check_net(net_cfg, secrets)
    if net["mode"] == "none":
        log.info("wifi: network mode 'none'; radio left off")
        return False
    if network is None:
        log.warning("wifi: no network module on this port; using the host's network")
        return False
    if net["mode"] == "ap":
        ap_up(net_cfg, secrets)
        return True
    return wifi_up(net_cfg, secrets)


async def keep_wifi(net_cfg, secrets=None):
    # Background task: rejoins when the station link drops, and switches a
    # dropped access point back on. Never raises; logs and carries on.
    import asyncio

    net = check_net(net_cfg, secrets)
    if net["mode"] == "none" or network is None:
        return
    link = None
    ap = None
    while True:
        try:
            if net["mode"] == "ap":
                if ap is None:
                    ap = network.WLAN(_iface("AP"))
                if not ap.active():
                    log.warning("wifi: access point was down; switching it on")
                    ap.active(True)
                d = _CHECK_MS
            else:
                if link is None:
                    link = _sta if _sta is not None and _sta.ssid == net["ssid"] else _make_sta(net)
                d = link.poll(time.ticks_ms())
        except Exception as e:
            log.error("wifi: keep_wifi: %r", e)
            d = net["backoff_cap_ms"]
        await asyncio.sleep_ms(d)


def ifconfig():
    # (ip, netmask, gateway, dns) of the interface in use, or None.
    if network is None:
        return None
    for kind in ("STA", "AP"):
        w = network.WLAN(_iface(kind))
        if w.active():
            return w.ifconfig()
    return None


# ---- watchdog, reset


class _NoWatchdog:
    timeout_ms = 0

    def feed(self):
        pass


def wdt_timeout(timeout_ms, platform=None):
    p = platform or sys.platform
    if p == "rp2" and timeout_ms > RP2_WDT_MAX_MS:
        return RP2_WDT_MAX_MS
    return timeout_ms


def watchdog(timeout_ms, platform=None):
    # Starts the hardware watchdog and returns it (it has feed()). Once
    # started it cannot be stopped, not even by a soft reset. 0 or None
    # gives an object whose feed() does nothing.
    if not timeout_ms:
        log.warning("watchdog: off")
        return _NoWatchdog()
    ms = wdt_timeout(timeout_ms, platform)
    if ms != timeout_ms:
        log.warning("watchdog: %d ms is over the rp2 limit; using %d ms", timeout_ms, ms)
    if machine is None or not hasattr(machine, "WDT"):
        log.warning("watchdog: no machine.WDT on this port; off")
        return _NoWatchdog()
    w = machine.WDT(timeout=ms)
    log.info("watchdog: %d ms", ms)
    return w


def feed_for(wdt, ms, platform=None):
    # Keeps feeding wdt from a timer for ms, then stops, so the watchdog
    # resets the board. For maintenance: after Ctrl-C (mpremote) nothing
    # feeds it and the board would reset in the middle of a file copy.
    # A timer started here survives until the next soft reset; mpremote
    # with `resume` does not soft-reset.
    if isinstance(wdt, _NoWatchdog) or machine is None or not hasattr(machine, "Timer"):
        return None
    end = time.ticks_add(time.ticks_ms(), ms)

    def tick(t):
        if time.ticks_diff(end, time.ticks_ms()) > 0:
            wdt.feed()
        else:
            t.deinit()

    # esp32 needs a hardware timer id (0..3); rp2 has only virtual (-1).
    tid = 0 if (platform or sys.platform) == "esp32" else -1
    return machine.Timer(tid, mode=machine.Timer.PERIODIC, period=1000, callback=tick)


_CAUSES = (
    ("PWRON_RESET", "power_on"),
    ("HARD_RESET", "hard"),
    ("WDT_RESET", "watchdog"),
    ("DEEPSLEEP_RESET", "deepsleep"),
    ("SOFT_RESET", "soft"),
)


def cause_name(code, mod=None):
    # The constants differ per port, so compare with the port's own.
    mod = mod or machine
    for attr, name in _CAUSES:
        v = getattr(mod, attr, None)
        if v is not None and v == code:
            return name
    return "unknown"


def reset_cause():
    # One of "power_on", "watchdog", "soft", "hard", "deepsleep", "unknown".
    # On esp32 machine.reset() reads back as "soft"; on rp2 machine.reset()
    # uses the watchdog and reads back as "watchdog".
    if machine is None or not hasattr(machine, "reset_cause"):
        return "unknown"
    return cause_name(machine.reset_cause())


def reset():
    if machine is not None and hasattr(machine, "reset"):
        machine.reset()
    sys.exit(1)  # the unix port has no machine.reset()
