# A fixed table of source addresses, each with a few small-integer fields,
# for the connection-rate limit (server.ConnRate) and the login throttle
# (auth.LoginThrottle). All of it is allocated when the table is made, at
# start. Entries made later (a dict entry, the address string, a list)
# landed wherever the allocator had got to, which a login's password hash
# sweeps through the whole heap, and stayed for minutes: measured on the
# twin, 20 failed logins from 10 addresses left 55 KB free but no piece
# for an 8 KB packet.
from mqtt.compat import const  # the login throttle runs under CPython in tests too

# Bytes kept of an address: all of an IPv4 one. Of an IPv6 one, its end,
# where the addresses of one network differ.
_KEY = const(16)


class AddrTable:
    def __init__(self, size, fields):
        self.size = size
        self.fields = fields
        self.used = 0
        self._key = bytearray(size * _KEY)
        self._len = bytearray(size)  # 0: a free slot
        # Slot i's fields are v[i * fields] to v[i * fields + fields - 1]:
        # small integers, stored without allocating.
        self.v = [0] * (size * fields)

    def __len__(self):
        return self.used

    def find(self, ip):
        # The slot holding ip, or -1.
        k = _key(ip)
        n = len(k)
        for i in range(self.size):
            if self._len[i] == n and self._key[i * _KEY : i * _KEY + n] == k:
                return i
        return -1

    def add(self, ip):
        # A free slot, now holding ip with its fields at 0; -1 when the
        # table is full (the caller removes one first).
        for i in range(self.size):
            if not self._len[i]:
                k = _key(ip)
                self._key[i * _KEY : i * _KEY + len(k)] = k
                self._len[i] = len(k)
                f = i * self.fields
                for j in range(f, f + self.fields):
                    self.v[j] = 0
                self.used += 1
                return i
        return -1

    def remove(self, i):
        self._len[i] = 0
        self.used -= 1

    def slots(self):
        # The slots in use.
        return [i for i in range(self.size) if self._len[i]]


def _key(ip):
    k = ip.encode() if ip else b"?"
    return k[-_KEY:]
