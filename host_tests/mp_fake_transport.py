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
