# For tests on the twin: a transport that keeps what the broker sends
# instead of writing to a socket. It has no write_now(), so output goes
# out through a connection's writer task.


class SentTransport:
    peer = "10.0.0.1:1"
    sent = b""  # everything sent, by every instance

    async def send(self, mv):
        SentTransport.sent += bytes(mv)

    def close(self):
        pass


def logged_in(b, client_id, t=None):
    # A Connection to broker b, on t (a SentTransport by default), whose
    # client has logged in with a new session `client_id`.
    from broker.conn import Connection
    from broker.session import Session

    c = Connection(b, t or SentTransport())
    s = Session(client_id)
    s.conn = c
    c.session = s
    b.sessions[client_id] = s
    b.conns.append(c)
    return c
