# The subscription table. Filters without wildcards sit in a dict keyed by
# the filter, so most publishes find their receivers with one lookup;
# wildcard filters are matched one by one (a gateway has tens, not
# thousands). Shared subscriptions ($share/group/filter) are grouped so
# that each message goes to one member of each group.
from mqtt.topic import matches


class Sub:
    # Defaults on the class: a plain subscription stores four fields.
    subid = 0  # subscription identifier (v5), 0 when none
    group = None  # share group, None unless shared
    prefix = None

    def __init__(self, session, flt, opts, subid, group):
        self.session = session
        self.filter = flt  # without the $share/group/ prefix
        self.opts = opts  # subscription options byte
        if subid:
            self.subid = subid
        if group is not None:
            self.group = group
        # "a/b/#" (no '+'): matched with str methods instead of the
        # character loop of topic.matches: prefix "a/b/" or exactly "a/b".
        if flt[-1] == "#" and "+" not in flt:
            self.prefix = flt[:-1]

    def match(self, t):
        p = self.prefix
        if p is None:
            return matches(self.filter, t)
        if not p:
            return t[0] != "$"  # "#" matches all but $ topics
        return t.startswith(p) or t == p[:-1]


def _wild(f):
    return "+" in f or "#" in f


class Subs:
    def __init__(self):
        self.exact = {}  # filter -> [Sub]
        self.wild = []  # [Sub]
        self.shared = {}  # (group, filter) -> [Sub, next index]
        self.count = 0

    def add(self, sub):
        if sub.group is not None:
            k = (sub.group, sub.filter)
            g = self.shared.get(k)
            if g is None:
                self.shared[k] = [[sub], 0]
            else:
                g[0].append(sub)
        elif _wild(sub.filter):
            self.wild.append(sub)
        else:
            lst = self.exact.get(sub.filter)
            if lst is None:
                self.exact[sub.filter] = [sub]
            else:
                lst.append(sub)
        self.count += 1

    def remove(self, sub):
        if sub.group is not None:
            k = (sub.group, sub.filter)
            g = self.shared.get(k)
            if g is not None and sub in g[0]:
                g[0].remove(sub)
                if not g[0]:
                    del self.shared[k]
                self.count -= 1
        elif _wild(sub.filter):
            if sub in self.wild:
                self.wild.remove(sub)
                self.count -= 1
        else:
            lst = self.exact.get(sub.filter)
            if lst is not None and sub in lst:
                lst.remove(sub)
                if not lst:
                    del self.exact[sub.filter]
                self.count -= 1

    def match(self, topic, out):
        # Appends every matching non-shared Sub to out.
        out.extend(self.exact.get(topic, ()))
        for s in self.wild:
            if s.match(topic):
                out.append(s)

    def match_shared(self, topic, out, turn=True):
        # Appends one Sub per matching share group: round robin over the
        # members, skipping those whose client is offline when another is
        # online (an offline member still queues if it is the only one),
        # and those with messages waiting when another online one has none:
        # a member that stopped reading kept its turns, and its full queue
        # refused them while the others had room (outside soak probe).
        # turn=False: who would get it, the turn not taken (a look before
        # routing: taken there too, one member got every message).
        for k in self.shared:
            if not matches(k[1], topic):
                continue
            g = self.shared[k]
            members = g[0]
            n = len(members)
            pick = None
            for i in range(n):
                s = members[(g[1] + i) % n]
                if s.session.conn is not None and (pick is None or not s.session.queue):
                    pick = s
                    nxt = (g[1] + i + 1) % n
                    if not s.session.queue:
                        break
            if pick is None:
                pick = members[g[1] % n]
                nxt = (g[1] + 1) % n
            if turn:
                g[1] = nxt
            out.append(pick)
