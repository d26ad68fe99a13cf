# A stand-in for MicroPython's `network` module, for running the real
# firmware/board.py under the unix port. It models one radio and a small
# world of access points that a test sets up:
#     import network
#     network.aps["home"] = "password1"   # an AP in range and its password
#     network.connect_polls = 2           # isconnected() calls a join takes
#     network.WLAN(network.STA_IF).drop() # the link goes away
# Every call is recorded in network.calls as (name, args) for assertions.
# Constants follow the rp2 (CYW43) port.
STA_IF = 0
AP_IF = 1
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_GOT_IP = 3
STAT_CONNECT_FAIL = -1
STAT_NO_AP_FOUND = -2
STAT_WRONG_PASSWORD = -3
AUTH_OPEN = 0
AUTH_WPA2_PSK = 3

aps = {}
connect_polls = 2
calls = []
_state = {"hostname": "mpy", "country": "XX"}
_ifaces = {}


def reset():
    # Forget everything: a fresh radio and an empty world.
    global connect_polls
    aps.clear()
    del calls[:]
    _ifaces.clear()
    connect_polls = 2
    _state["hostname"] = "mpy"
    _state["country"] = "XX"


def hostname(name=None):
    if name is None:
        return _state["hostname"]
    calls.append(("hostname", (name,)))
    _state["hostname"] = name


def country(cc=None):
    if cc is None:
        return _state["country"]
    calls.append(("country", (cc,)))
    _state["country"] = cc


class _WLAN:
    PM_NONE = 16
    PM_PERFORMANCE = 0xA11142

    def __init__(self, iface):
        self.iface = iface
        self._active = False
        self._cfg = {}
        self._status = STAT_IDLE
        self._ssid = None
        self._key = None
        self._polls = 0
        self._connected = False

    def active(self, on=None):
        if on is None:
            return self._active
        calls.append(("active", (self.iface, bool(on))))
        self._active = bool(on)
        if not on:
            self._connected = False
            self._status = STAT_IDLE

    def config(self, *args, **kw):
        if args:
            return self._cfg.get(args[0])
        calls.append(("config", (self.iface, kw)))
        for k in kw:
            if k not in ("ssid", "essid", "key", "password", "channel", "security",
                         "pm", "reconnects", "dhcp_hostname", "hostname", "max_clients"):
                raise ValueError("unknown config param")
            self._cfg[k] = kw[k]

    def connect(self, ssid=None, key=None, bssid=None):
        if self.iface != STA_IF:
            raise OSError("connect() on AP interface")
        if not self._active:
            raise OSError("STA must be active")
        if self._status == STAT_CONNECTING:
            # esp32 says "Wifi Internal State Error"; the link must
            # disconnect() before connecting again.
            raise OSError("Wifi Internal State Error")
        calls.append(("connect", (ssid, key)))
        self._ssid = ssid
        self._key = key
        self._polls = 0
        self._connected = False
        self._status = STAT_CONNECTING

    def disconnect(self):
        calls.append(("disconnect", (self.iface,)))
        self._connected = False
        self._status = STAT_IDLE

    def _advance(self):
        # A join in progress finishes after connect_polls isconnected() calls.
        if self._status != STAT_CONNECTING:
            return
        self._polls += 1
        if self._polls < connect_polls:
            return
        if self._ssid not in aps:
            self._status = STAT_NO_AP_FOUND
        elif aps[self._ssid] != (self._key or ""):
            self._status = STAT_WRONG_PASSWORD
        else:
            self._status = STAT_GOT_IP
            self._connected = True

    def isconnected(self):
        if self.iface == AP_IF:
            return self._active
        self._advance()
        return self._connected

    def status(self, param=None):
        if param is not None:
            return self._cfg.get(param)
        return self._status

    def ifconfig(self, *args):
        if self.iface == AP_IF:
            return ("192.168.4.1", "255.255.255.0", "192.168.4.1", "0.0.0.0")
        if self._connected:
            return ("192.168.1.50", "255.255.255.0", "192.168.1.1", "192.168.1.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    # ---- test helpers

    def drop(self):
        # The AP went away for a moment (the driver reports a failed link).
        self._connected = False
        self._status = STAT_CONNECT_FAIL


def WLAN(iface=STA_IF):
    w = _ifaces.get(iface)
    if w is None:
        w = _ifaces[iface] = _WLAN(iface)
    return w
