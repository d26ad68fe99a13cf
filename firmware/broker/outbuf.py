# The output side of an MQTT connection, shared by client connections
# (conn.py) and bridge links (bridge.py). Packets are queued without ever
# blocking, and the connection's writer task sends them with flush():
#   obuf  packets as they are queued, up to its size (a pooled buffer)
#   big   one packet, or one large payload, that does not fit in obuf; it
#         goes out on its own right after obuf, from the object itself
#   tail  what is queued while `big` waits (a list), sent right after it
# Readers stop reading while the output is backed up (room() is False), so
# the tail stays small.


class Output:
    # Subclasses provide `wake` (an asyncio.Event their writer waits on)
    # and pool() (the broker's write buffer Pool).
    obuf = None
    olen = 0
    big = None
    tail = None

    def send(self, data):
        # Queues a control packet. Never fails.
        n = len(data)
        if self.big is not None:
            # By reference: every sender passes an object of its own, and
            # a large payload here must not be copied.
            if self.tail is None:
                self.tail = [data]
            else:
                self.tail.append(data)
        else:
            ob = self.obuf
            if ob is None:
                try:
                    ob = self.obuf = self.pool().get()
                except MemoryError:
                    # No free piece of heap for a buffer (fragmented): this
                    # packet goes out by itself, from its own bytes.
                    self.big = data
                    self.wake.set()
                    return
            o = self.olen
            if o + n <= len(ob):
                ob[o : o + n] = data
                self.olen = o + n
            else:
                self.big = data
        self.wake.set()

    def send_split(self, head, payload):
        # A PUBLISH as its head and its payload: the payload goes out from
        # the message itself, so a large one is never copied (a fragmented
        # heap may not have that much in one piece).
        fits = self.big is None and self.room(len(head))
        self.send(head)
        if fits and self.big is None:
            self.big = payload
        else:
            # (or the head itself went to `big`: no buffer could be had)
            self.send(payload)

    def room(self, n):
        if self.big is not None:
            return False
        if self.obuf is None:
            return n <= self.pool().size  # what a buffer would have
        return self.olen + n <= len(self.obuf)

    def put(self, pkt):
        # For a writer's pump: queues pkt if it fits, or alone in `big`
        # when nothing else waits. False: no room now; try after a flush.
        n = len(pkt)
        if self.room(n):
            ob = self.obuf
            if ob is None:
                ob = self.obuf = self.pool().get()
            ob[self.olen : self.olen + n] = pkt
            self.olen += n
            return True
        if self.olen or self.big is not None:
            return False
        self.big = pkt
        return True

    async def flush(self, t):
        # Writes to transport t what is queued, in order: obuf, then big
        # and its tail. Returns the bytes written, 0 when nothing waited.
        n = self.olen
        if n:
            ob = self.obuf
            mv = memoryview(ob)
            await t.send(mv[:n])
            # Senders may have appended while we waited.
            rest = self.olen - n
            if rest:
                ob[0:rest] = mv[n : n + rest]
            self.olen = rest
            return n
        x = self.big
        if x is None:
            return 0
        y = self.tail
        self.big = self.tail = None
        # A memoryview, so that a partial write resumes without copying.
        await t.send(memoryview(x))
        n = len(x)
        if y is not None:
            for d in y:
                await t.send(memoryview(d))
                n += len(d)
        return n
