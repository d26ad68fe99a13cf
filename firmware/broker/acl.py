# What a connected client may publish and read: Mosquitto's acl_file.
#
#   # comment
#   topic [read|write|readwrite|deny] <filter>     anonymous clients
#   user <name>
#   topic [read|write|readwrite|deny] <filter>     that user
#   pattern [read|write|readwrite|deny] <filter>   everyone; %c = client id,
#                                                  %u = username
#
# No access word means readwrite. Differences from Mosquitto, on purpose:
# - A deny line wins over every grant, user and pattern lines alike
#   (Mosquitto lets a user's grant win over a pattern deny).
# - SUBSCRIBE is checked: the filter must be covered by one read grant, the
#   rule of Mosquitto's mosquitto_sub_matches_acl(). Its acl_file lets every
#   subscription through and relies on the per-message check alone.
# - %c or %u is never replaced by a value holding '+', '#' or '/', or by an
#   empty one: such a pattern grants nothing, and if it is a deny pattern the
#   request is refused. Mosquitto refuses '+' and '#' only.
# - Nobody may publish to $SYS, whatever the file says.
# docs/security.md has the full rules with examples.
from broker.conffile import read_lines
from mqtt.compat import const
from mqtt.topic import matches, valid_filter

_READ = const(1)
_WRITE = const(2)
_DENY = const(4)
_C = const(1)  # pattern uses %c
_U = const(2)  # pattern uses %u

_ACCESS = {"read": _READ, "write": _WRITE, "readwrite": _READ | _WRITE, "deny": _DENY}


def _unsafe(v):
    # A "$" first: a client id "$SYS" made "pattern read %c/#" a grant of
    # $SYS/#, the dashboard's client list among it (docs/security.md).
    return not v or "+" in v or "#" in v or "/" in v or v[0] == "$"


def _subst(flt, client_id, username):
    # One pass, so a client id that itself reads "%u" stays literal text.
    out = []
    i = 0
    n = len(flt)
    while True:
        j = flt.find("%", i)
        if j < 0 or j + 1 >= n:
            break
        c = flt[j + 1]
        if c == "c" or c == "u":
            out.append(flt[i:j])
            out.append(client_id if c == "c" else username)
            i = j + 2
        else:
            out.append(flt[i : j + 1])
            i = j + 1
    out.append(flt[i:])
    return "".join(out)


def covers(acl, sub):
    # True when every topic that filter sub matches is also matched by
    # filter acl (both already valid), so granting acl grants sub.
    if not acl or not sub or (acl[0] == "$") != (sub[0] == "$"):
        # Wildcards never match '$' topics, and a '$' filter matches no other.
        return False
    al = acl.split("/")
    sl = sub.split("/")
    n = len(sl)
    for i in range(len(al)):
        a = al[i]
        if a == "#":
            # also covers the parent level: "a/#" matches "a"
            return True
        if i >= n:
            return False
        s = sl[i]
        if s == "#":
            return False
        if a == "+":
            continue
        if s != a:
            return False
    return len(al) == n


class Acl:
    def __init__(self):
        self._users = {}  # username, None for anonymous -> [(access, filter)]
        self._patterns = []  # [(access, filter, _C|_U bits)]

    @classmethod
    def load(cls, path):
        # ValueError names the file and the line.
        acl = cls()
        user = None

        def take(line):
            nonlocal user
            user = acl.add_line(line, user)

        read_lines(path, "acl_file", take)
        return acl

    def add_line(self, line, user):
        # Applies one line; returns the user the next line belongs to.
        s = line.strip()
        if not s or s[0] == "#":
            return user
        parts = s.split(None, 1)
        kw = parts[0]
        rest = parts[1] if len(parts) > 1 else ""
        if kw == "user":
            if not rest:
                raise ValueError("'user' needs a username")
            return rest
        if kw != "topic" and kw != "pattern":
            raise ValueError("unknown keyword '%s' (expected user, topic or pattern)" % kw)
        if not rest:
            raise ValueError("'%s' needs a topic filter" % kw)
        parts = rest.split(None, 1)
        access = _ACCESS.get(parts[0])
        if access is not None and len(parts) > 1:
            flt = parts[1]
        else:
            # A lone word is the filter itself (as in Mosquitto): "topic read"
            # grants readwrite on the topic named "read".
            access = _READ | _WRITE
            flt = rest
        if "\0" in flt:  # (no topic holds U+0000: MQTT-4.7.3-2)
            raise ValueError("bad topic filter %r" % flt)
        if kw == "topic":
            if not valid_filter(flt):
                raise ValueError("bad topic filter '%s'" % flt)
            lst = self._users.get(user)
            if lst is None:
                lst = self._users[user] = []
            lst.append((access, flt))
        else:
            bits = (_C if "%c" in flt else 0) | (_U if "%u" in flt else 0)
            if not valid_filter(flt.replace("%c", "c").replace("%u", "u")):
                raise ValueError("bad topic filter '%s'" % flt)
            self._patterns.append((access, flt, bits))
        return user

    def _allowed(self, client_id, username, want, name, test):
        # Deny wins: look at every line that matches, refuse on any deny.
        granted = False
        lst = self._users.get(username)
        if lst:
            for access, flt in lst:
                if test(flt, name):
                    if access == _DENY:
                        return False
                    if access & want:
                        granted = True
        for access, flt, bits in self._patterns:
            if bits:
                if bits & _U and username is None:
                    # Anonymous clients have no %u; such lines are not theirs.
                    continue
                if (bits & _C and _unsafe(client_id)) or (bits & _U and _unsafe(username)):
                    if access == _DENY:
                        return False
                    continue
                flt = _subst(flt, client_id, username)
            if test(flt, name):
                if access == _DENY:
                    return False
                if access & want:
                    granted = True
        return granted

    def can_write(self, client_id, username, topic):
        # PUBLISH to a topic name (no wildcards). username None = anonymous.
        if topic == "$SYS" or topic.startswith("$SYS/"):
            return False
        return self._allowed(client_id, username, _WRITE, topic, matches)

    def can_read(self, client_id, username, topic):
        # Delivery of a message on a topic name to this client.
        return self._allowed(client_id, username, _READ, topic, matches)

    def can_subscribe(self, client_id, username, filt):
        # SUBSCRIBE to filt (without any "$share/<group>/" prefix): allowed
        # when one read grant covers all of filt and no deny covers it. A
        # deny that covers only part of filt is applied per message by
        # can_read().
        return self._allowed(client_id, username, _READ, filt, covers)
