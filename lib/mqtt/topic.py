# Topic names and topic filters: validation and matching (MQTT 4.7).
# Callers pass str; both functions are allocation-free on the match path
# except for the split of the filter, which callers may cache.


def valid_topic(t):
    # A topic name for PUBLISH: non-empty, no wildcards.
    return bool(t) and "+" not in t and "#" not in t


def valid_filter(f):
    # A topic filter: '#' only as the last whole level, '+' only whole levels.
    if not f:
        return False
    n = len(f)
    i = 0
    while i < n:
        c = f[i]
        if c == "#":
            return i == n - 1 and (i == 0 or f[i - 1] == "/")
        if c == "+":
            if (i > 0 and f[i - 1] != "/") or (i + 1 < n and f[i + 1] != "/"):
                return False
        i += 1
    return True


def matches(f, t):
    # True when topic t matches filter f. Topics starting with '$' are not
    # matched by a filter starting with a wildcard (MQTT-4.7.2-1).
    if t and t[0] == "$" and f and (f[0] == "+" or f[0] == "#"):
        return False
    fi = 0
    ti = 0
    fn = len(f)
    tn = len(t)
    while fi < fn:
        c = f[fi]
        if c == "#":
            return True
        if c == "+":
            # consume one topic level
            while ti < tn and t[ti] != "/":
                ti += 1
            fi += 1
        else:
            if ti >= tn or t[ti] != c:
                # "a/#" matches "a": filter is at "/#" and topic ended
                return ti == tn and f[fi:] == "/#"
            fi += 1
            ti += 1
            continue
        # after '+': both must be at a '/' or at the end
        if fi == fn:
            return ti == tn
        # f[fi] is '/'
        if ti == tn:
            return f[fi:] == "/#"
        fi += 1
        ti += 1
    return ti == tn


def split_shared(f):
    # "$share/group/filter" -> ("group", "filter"); otherwise (None, f).
    # Returns (None, None) for a malformed shared filter.
    if not f.startswith("$share/"):
        return None, f
    rest = f[7:]
    i = rest.find("/")
    if i <= 0:
        return None, None
    g = rest[:i]
    if "+" in g or "#" in g:
        return None, None
    flt = rest[i + 1 :]
    if not valid_filter(flt):
        return None, None
    return g, flt
