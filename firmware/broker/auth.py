# Who may connect: the password_file and a per-address brake on guessing.
#
# PasswordFile holds "username:$p256$..." lines (lib/pwhash.py, made by
# tools/passwd). A plain "username:password" line stops the start: Mosquitto
# 2 only warns about those, but a board's flash is easy to read out, so we
# insist that `tools/passwd -U` hashes them first.
#
# LoginThrottle makes each further failed login from one address wait
# longer, so a guesser gets a handful of tries a minute instead of several a
# second. docs/security.md explains both and the numbers chosen.
import os

import pwhash
from broker.addrtable import AddrTable
from broker.conffile import read_lines
from mqtt.compat import const, ticks_diff, ticks_ms


class PasswordFile:
    # PasswordFile(path) and PasswordFile.load(path) do the same;
    # PasswordFile() starts empty (see add()).
    def __init__(self, path=None):
        self._users = {}  # username -> (iterations, salt, digest)
        self._dummy = None
        self.iterations = 0  # the count used for unknown users
        if path is not None:
            self._read(path)
        self._finish()

    @classmethod
    def load(cls, path):
        return cls(path)

    def _read(self, path):
        # ValueError names the file and the line for anything it cannot
        # use; the message never quotes a password or a hash.
        read_lines(path, "password_file", lambda line: self._add_line(line, path))

    def _add_line(self, line, path):
        line = line.rstrip("\r\n")
        s = line.strip()
        if not s or s[0] == "#":
            return
        i = line.find(":")
        if i <= 0:
            raise ValueError("expected username:hash")
        user = line[:i]
        pw = line[i + 1 :]
        if pw.startswith(pwhash.PREFIX):
            try:
                entry = pwhash.parse(pw)
            except ValueError as e:
                raise ValueError("user '%s': %s" % (user, e))
        elif pw.startswith("$6$") or pw.startswith("$7$"):
            raise ValueError("user '%s': this is a Mosquitto SHA-512 hash, which the boards cannot "
                             "check; set the password again with tools/passwd" % user)
        else:
            raise ValueError("user '%s': plain-text password; refusing to start. Hash the file "
                             "with: tools/passwd -U %s" % (user, path))
        if user in self._users:
            raise ValueError("user '%s' is listed twice" % user)
        self._users[user] = entry

    def add(self, username, hashstr):
        # For callers that build the table without a file (tests, the REPL).
        self._users[username] = pwhash.parse(hashstr)
        self._finish()

    def _finish(self):
        # Unknown users are checked against a random hash that nothing
        # matches, at the iteration count most users have, so that a wrong
        # username costs as long as a wrong password.
        counts = {}
        best = pwhash.DEFAULT_ITERATIONS
        top = 0
        for it, _, _ in self._users.values():
            c = counts.get(it, 0) + 1
            counts[it] = c
            if c > top or (c == top and it > best):
                top = c
                best = it
        self.iterations = best
        self._dummy = (best, os.urandom(pwhash.SALT_BYTES), os.urandom(pwhash.HASH_BYTES))

    def __len__(self):
        return len(self._users)

    def __contains__(self, username):
        return username in self._users

    def check_steps(self, username, password, every=0):
        # A generator: None after every `every` PBKDF2 iterations, then True
        # when username is listed and password (bytes or str) matches. A
        # missing username or password still runs one full PBKDF2.
        entry = self._users.get(username) if username is not None else None
        known = entry is not None and password is not None
        if not known:
            entry = self._dummy
        if password is None:
            password = b""
        for ok in pwhash.check_steps(password, entry[0], entry[1], entry[2], every):
            if ok is None:
                yield None
            else:
                yield ok and known

    def name(self, username):
        # The file's own copy of a user name it lists: the sessions of one
        # user then share one string instead of one each.
        for k in self._users:
            if k == username:
                return k
        return username


_TABLE = const(16)
_FIRST_MS = const(1000)
_CAP_MS = const(30000)
_QUIET_MS = const(600000)


class LoginThrottle:
    # Per source address: after the first failed login the next try is free,
    # after the second it waits 1 s, then 2, 4, 8, 16 and at most 30 s,
    # counted from the last failure. A success, or no failure for quiet_ms,
    # forgets the address. At most `size` addresses are tracked; a new one
    # pushes out the one whose last failure is oldest, so a flood of
    # addresses cannot grow the heap.
    def __init__(self, size=_TABLE, first_ms=_FIRST_MS, cap_ms=_CAP_MS, quiet_ms=_QUIET_MS):
        self.size = size
        self.first_ms = first_ms
        self.cap_ms = cap_ms
        self.quiet_ms = quiet_ms
        self.failures = 0  # all failed logins since start, for $SYS
        # Per address: failures in a row, ticks_ms of the last one.
        self._t = AddrTable(size, 2)
        # Addresses whose login is being hashed now: at most one each
        # (handle_connect.login).
        self.checking = []

    def _live(self, addr, now):
        # addr's slot, or -1 (also when it has been quiet long enough).
        t = self._t
        i = t.find(addr)
        if i < 0:
            return -1
        d = ticks_diff(now, t.v[2 * i + 1])
        # d < 0 means the tick counter wrapped past the entry: long quiet.
        if d < 0 or d >= self.quiet_ms:
            t.remove(i)
            return -1
        return i

    def _wait_ms(self, n):
        # Wait owed after n failures in a row.
        if n < 2:
            return 0
        w = self.first_ms
        n -= 2
        while n and w < self.cap_ms:
            w <<= 1
            n -= 1
        return w if w < self.cap_ms else self.cap_ms

    def delay_ms(self, addr):
        # Milliseconds the next login from addr must wait before it is checked.
        now = ticks_ms()
        i = self._live(addr, now)
        if i < 0:
            return 0
        v = self._t.v
        left = self._wait_ms(v[2 * i]) - ticks_diff(now, v[2 * i + 1])
        return left if left > 0 else 0

    def failed(self, addr):
        self.failures += 1
        now = ticks_ms()
        t = self._t
        v = t.v
        i = self._live(addr, now)
        if i < 0:
            if len(t) >= self.size:
                old = -1
                age = -1
                for j in t.slots():
                    d = ticks_diff(now, v[2 * j + 1])
                    if d < 0:
                        d = self.quiet_ms
                    if d > age:
                        age = d
                        old = j
                t.remove(old)
            i = t.add(addr)
        v[2 * i] += 1
        v[2 * i + 1] = now

    def succeeded(self, addr):
        i = self._t.find(addr)
        if i >= 0:
            self._t.remove(i)

    def __len__(self):
        return len(self._t)
