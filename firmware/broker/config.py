# Configuration: one JSON object. Keys follow mosquitto.conf where the
# concept is the same. A board profile (boards/<name>.json, "config" part)
# replaces the defaults below; the user's file replaces those. Any unknown
# key or bad value stops the start with ConfigError naming the key, before
# a socket is opened.
import json


class ConfigError(Exception):
    pass


_U16 = 65535
_BIG = 268435455
# The most a byte count compared for every message may be: a small int on
# a 32-bit board (2**30 and more is a big int, which takes heap each time).
_SMALL = (1 << 30) - 1

# key: (default, kind, lo, hi). kind: "int", "bool", "str", "str?", "list",
# "dict", "level", "dest". Range checks apply to ints.
SCHEMA = {
    "port": (1883, "int", 0, _U16),
    "bind_address": ("0.0.0.0", "str", 0, 0),
    "listeners": ([], "list", 0, 0),
    "allow_anonymous": (False, "bool", 0, 0),
    "password_file": (None, "str?", 0, 0),
    "acl_file": (None, "str?", 0, 0),
    "max_connections": (8, "int", 1, 1000),
    "max_sessions": (16, "int", 1, 10000),
    "max_inflight_messages": (10, "int", 1, _U16),
    "max_queued_messages": (32, "int", 0, 100000),
    "max_queued_bytes": (0, "int", 0, _SMALL),
    "queue_qos0_messages": (False, "bool", 0, 0),
    "max_packet_size": (8192, "int", 64, _BIG),
    "max_keepalive": (_U16, "int", 1, _U16),
    "max_topic_length": (256, "int", 1, _U16),
    "max_topic_levels": (16, "int", 1, 1000),
    "max_subscriptions": (16, "int", 1, 10000),
    "max_retained_messages": (64, "int", 0, 100000),
    "max_retained_bytes": (16384, "int", 0, _SMALL),
    "max_topic_alias": (10, "int", 0, _U16),
    "retain_available": (True, "bool", 0, 0),
    "persistence": (False, "bool", 0, 0),
    "persistence_location": ("data", "str", 0, 0),
    "store_max_bytes": (262144, "int", 4096, 1 << 30),
    "store_inline_max": (120, "int", 0, 4096),
    "persistent_client_expiration": (0, "int", 0, 0xFFFFFFFF),
    "autosave_interval": (60, "int", 1, 86400),
    "connect_timeout": (10, "int", 1, 3600),
    "max_tls_connections": (1, "int", 0, 1000),
    "sys_interval": (10, "int", 0, 3600),
    "min_free_heap": (16384, "int", 0, 1 << 30),
    "gc_threshold": (0, "int", 0, 1 << 30),
    "write_buffer_size": (1024, "int", 128, 1 << 20),
    "read_buffer_size": (512, "int", 64, 1 << 20),
    "log_level": ("info", "level", 0, 0),
    "log_dest": ("stdout", "dest", 0, 0),
    "bridges": ([], "list", 0, 0),
    "network": ({}, "dict", 0, 0),
    "max_connection_rate": (30, "int", 0, 10000),
    "tcp_send_buffer": (0, "int", 0, 1 << 24),
}

_LEVELS = ("debug", "info", "warning", "error")
_DESTS = ("stdout", "file")


def _check(key, v):
    default, kind, lo, hi = SCHEMA[key]
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError("config key '%s': expected an integer, got %r" % (key, v))
        if v < lo or v > hi:
            raise ConfigError("config key '%s': %d is outside %d..%d" % (key, v, lo, hi))
    elif kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError("config key '%s': expected true or false, got %r" % (key, v))
    elif kind == "str":
        if not isinstance(v, str):
            raise ConfigError("config key '%s': expected a string, got %r" % (key, v))
    elif kind == "str?":
        if v is not None and not isinstance(v, str):
            raise ConfigError("config key '%s': expected a string or null, got %r" % (key, v))
    elif kind == "list":
        if not isinstance(v, list):
            raise ConfigError("config key '%s': expected a list, got %r" % (key, v))
    elif kind == "dict":
        if not isinstance(v, dict):
            raise ConfigError("config key '%s': expected an object, got %r" % (key, v))
    elif kind == "level":
        if v not in _LEVELS:
            raise ConfigError("config key '%s': expected one of %s, got %r" % (key, ", ".join(_LEVELS), v))
    elif kind == "dest":
        # (gateway._log_ring: "file" adds the flash log; a typo had turned it off unsaid)
        if not isinstance(v, str) or [d for d in v.replace("+", ",").split(",") if d.strip() not in _DESTS]:
            raise ConfigError("config key '%s': expected stdout, file or both (\"stdout,file\"), got %r"
                              % (key, v))


def _merge(cfg, layer, where):
    if not isinstance(layer, dict):
        raise ConfigError("%s: expected a JSON object" % where)
    for k in layer:
        if k not in SCHEMA:
            raise ConfigError("%s: unknown config key '%s'" % (where, k))
        _check(k, layer[k])
        cfg[k] = layer[k]


def build(profile_cfg=None, user_cfg=None, overrides=None):
    # Returns a complete, checked config dict.
    cfg = {}
    for k in SCHEMA:
        d = SCHEMA[k][0]
        cfg[k] = list(d) if isinstance(d, list) else (dict(d) if isinstance(d, dict) else d)
    # (None: no such layer. [] or false is a config file that is not an
    # object: it had been taken for none.)
    if profile_cfg is not None:
        _merge(cfg, profile_cfg, "board profile")
    if user_cfg is not None:
        _merge(cfg, user_cfg, "config file")
    if overrides is not None:
        _merge(cfg, overrides, "command line")
    _check_listeners(cfg)
    _check_bridges(cfg)
    return cfg


def _check_listeners(cfg):
    ls = cfg["listeners"]
    if not ls:
        ls.append({"port": cfg["port"], "bind_address": cfg["bind_address"], "protocol": "mqtt"})
    for i, L in enumerate(ls):
        where = "config key 'listeners'[%d]" % i
        if not isinstance(L, dict):
            raise ConfigError("%s: expected an object" % where)
        for k in L:
            if k not in _LISTENER_KEYS:
                raise ConfigError("%s: unknown key '%s'" % (where, k))
        p = L.get("port")
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= _U16:
            raise ConfigError("%s: 'port' must be an integer 0..65535" % where)
        if not isinstance(L.setdefault("bind_address", cfg["bind_address"]), str):
            raise ConfigError("%s: 'bind_address' must be a string" % where)
        L.setdefault("protocol", "mqtt")
        if L["protocol"] not in ("mqtt", "websockets"):
            raise ConfigError("%s: 'protocol' must be mqtt or websockets" % where)
        for k in ("http_basic", "require_certificate", "use_identity_as_username"):
            if k in L and not isinstance(L[k], bool):
                raise ConfigError("%s: '%s' must be true or false" % (where, k))
        for k in ("certfile", "keyfile", "cafile"):
            if k in L and (not isinstance(L[k], str) or not L[k]):
                raise ConfigError("%s: '%s' must be the path of a DER file" % (where, k))
        if L.get("http_basic") and cfg["password_file"] is None:
            raise ConfigError("%s: 'http_basic' needs a password_file" % where)
        if ("certfile" in L) != ("keyfile" in L):
            raise ConfigError("%s: 'certfile' and 'keyfile' go together" % where)
        # Client certificates, as Mosquitto's listener options: the CA in
        # cafile must have signed the client's certificate.
        if L.get("require_certificate") and ("certfile" not in L or "cafile" not in L):
            raise ConfigError("%s: 'require_certificate' needs 'certfile', 'keyfile' and 'cafile'" % where)
        if "cafile" in L and not L.get("require_certificate"):
            raise ConfigError("%s: 'cafile' checks client certificates only with "
                              "'require_certificate': true" % where)
        if L.get("use_identity_as_username") and not L.get("require_certificate"):
            raise ConfigError("%s: 'use_identity_as_username' needs 'require_certificate': true" % where)


_LISTENER_KEYS = ("port", "bind_address", "protocol", "certfile", "keyfile", "http_basic",
                  "require_certificate", "cafile", "use_identity_as_username")


_BRIDGE = {  # key: default (None: required)
    "name": None, "addresses": None, "topics": None, "protocol_version": 4, "cleansession": False,
    "keepalive": 60, "username": None, "password": None, "cafile": None, "clientid": None,
    "restart_timeout": [5, 30], "max_queued": 1000, "try_private": True, "bridge_cycle_interval": 0,
    "bridge_max_packet_size": 0,
}


def _check_bridges(cfg):
    # Checks each bridge and completes it with the defaults: addresses
    # become [host, port], topic lines [pattern, direction, qos, local
    # prefix, remote prefix] (Mosquitto's `topic` syntax, "" for empty).
    # (No mqtt import: tools/deploy.py checks configs under CPython.)
    def valid_filter(f):
        w = f.split("/")
        for j, x in enumerate(w):
            if ("#" in x and (x != "#" or j != len(w) - 1)) or ("+" in x and x != "+"):
                return False
        return bool(f)

    names = []
    out = []
    for i, B in enumerate(cfg["bridges"]):
        def err(k, msg):
            return ConfigError("config key 'bridges[%d].%s': %s" % (i, k, msg))

        if not isinstance(B, dict):
            raise ConfigError("config key 'bridges[%d]': expected an object" % i)
        for k in B:
            if k not in _BRIDGE:
                raise err(k, "unknown key")
        B = dict(B)  # the user's config stays as written
        out.append(B)
        for k in _BRIDGE:
            if k not in B:
                if k in ("name", "addresses", "topics"):
                    raise err(k, "required")
                B[k] = _BRIDGE[k]
        n = B["name"]
        if not isinstance(n, str) or not 0 < len(n) <= 32 or [c for c in n if c in "/+#\0 "]:
            raise err("name", "expected 1 to 32 characters without / + # or spaces, got %r" % (n,))
        if n in names:
            raise err("name", "%r names two bridges" % n)
        names.append(n)
        a = B["addresses"]
        if not isinstance(a, list) or not a:
            raise err("addresses", "expected a list of \"host:port\"")
        B["addresses"] = []
        for j, x in enumerate(a):
            h, _, p = x.rpartition(":") if isinstance(x, str) else ("", "", "")
            if not p.isdigit() or not h or not 0 < int(p) <= _U16:
                raise err("addresses[%d]" % j, "expected \"host:port\", got %r" % (x,))
            B["addresses"].append([h.strip("[]"), int(p)])
        t = B["topics"]
        if not isinstance(t, list) or not t:
            raise err("topics", "expected a list of topic lines")
        B["topics"] = []
        for j, line in enumerate(t):
            w = line.split() if isinstance(line, str) else []
            w = ["" if x == '""' else x for x in w]
            if len(w) not in (1, 2, 3, 5):
                raise err("topics[%d]" % j, "expected \"pattern [in|out|both] [qos] [local-prefix "
                          "remote-prefix]\", got %r" % (line,))
            w += ["out", "0", "", ""][len(w) - 1:] if len(w) < 5 else []
            pat, d, q, lp, rp = w
            if d not in ("in", "out", "both"):
                raise err("topics[%d]" % j, "direction must be in, out or both, got %r" % d)
            if q not in ("0", "1", "2"):
                raise err("topics[%d]" % j, "qos must be 0, 1 or 2, got %r" % q)
            if [c for c in lp + rp if c in "+#"]:
                raise err("topics[%d]" % j, "a prefix cannot hold wildcards")
            if not valid_filter(lp + pat) or not valid_filter(rp + pat):
                raise err("topics[%d]" % j, "not a valid topic filter: %r" % (line,))
            B["topics"].append([pat, d, int(q), lp, rp])
        for k, lo, hi in (("protocol_version", 4, 5), ("keepalive", 1, _U16), ("max_queued", 1, 1000000),
                          ("bridge_cycle_interval", 0, 0xFFFFFFFF), ("bridge_max_packet_size", 0, 268435455)):
            v = B[k]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise err(k, "expected an integer %d..%d, got %r" % (lo, hi, v))
        if 0 < B["bridge_max_packet_size"] < 256:
            # (a limit below a small PUBLISH of ours is a mistake)
            raise err("bridge_max_packet_size", "expected 0 (no limit) or 256 and up, got %r"
                      % B["bridge_max_packet_size"])
        for k in ("cleansession", "try_private"):
            if not isinstance(B[k], bool):
                raise err(k, "expected true or false, got %r" % (B[k],))
        for k in ("username", "password", "cafile", "clientid"):
            if B[k] is not None and (not isinstance(B[k], str) or not B[k]):
                raise err(k, "expected a non-empty string, got %r" % (B[k],))
        if B["password"] is not None and B["username"] is None and B["protocol_version"] == 4:
            raise err("password", "MQTT 3.1.1 sends a password only with a username")
        r = B["restart_timeout"]
        r = [r, r] if isinstance(r, (int, float)) and not isinstance(r, bool) else r
        if (not isinstance(r, list) or len(r) != 2 or [x for x in r if isinstance(x, bool)
                or not isinstance(x, (int, float)) or x <= 0] or r[0] > r[1]):
            raise err("restart_timeout", "expected seconds, or [base, cap] with 0 < base <= cap, got %r"
                      % (B["restart_timeout"],))
        B["restart_timeout"] = r
    cfg["bridges"] = out


def load_json(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("cannot read config file %s: %s" % (path, e))
    except UnicodeError:  # MicroPython's says nothing more
        raise ConfigError("config file %s is not UTF-8 text" % path)
    try:
        v = json.loads(text)
    except ValueError as e:
        raise ConfigError("config file %s is not valid JSON: %s" % (path, e))
    if not isinstance(v, dict):
        # (Its type, not the value: this reads secrets.json too.)
        raise ConfigError("config file %s: expected a JSON object, got %s" % (path, type(v).__name__))
    return v


def unload():
    # The schema and its checks are needed only to build the config: a
    # caller done building drops this module, and holds none of its
    # functions, to give back its heap (1.2 KB on the twin). ConfigError
    # may be kept: a class holds no reference to the module.
    from broker import heap

    heap.unload("config")
