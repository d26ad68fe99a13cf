# The TLS transport: a TCP transport whose socket mbedTLS wraps, for the
# TLS listeners (listeners.py) and the bridges with a cafile. In a module of
# its own, so that a gateway with plain MQTT listeners and no bridge, which
# imports neither listeners.py nor bridge.py, holds none of it (192 B of the
# esp32 twin's heap at start).
import micropython
from micropython import const
from broker.transport import TcpTransport, forget

_TLS_RECORD = const(1024)  # bytes of a TLS record at most (TlsTransport.write_now; outbuf._PIECE)


def client_context(cafile):
    # A client's context that verifies the server against cafile (a
    # bridge's uplink), made once and kept: loading the CA takes heap.
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with open(cafile, "rb") as f:
        ctx.load_verify_locations(cadata=f.read())
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls(ctx, s, host):
    # A TLS client socket over s, whose connect waited on the poller: its
    # entry goes now, as only the TLS socket is closed later.
    forget(s)
    return ctx.wrap_socket(s, server_hostname=host, do_handshake_on_connect=False)


class TlsTransport(TcpTransport):
    def __init__(self, sock, peer):
        TcpTransport.__init__(self, sock, peer)
        # Bytes of the record mbedTLS holds after a write that would block;
        # set here, so that a write never grows the attribute table (a
        # MemoryError after bytes went out would lose count of them).
        self.held = 0

    @micropython.native  # (tools/frames.py: its frame on the C stack)
    def write_now(self, buf, off, n):
        # mbedTLS keeps a record that could not all go out, and the next
        # write sends the rest of it and returns its own length, whatever
        # the record's was: a write asking for more than the record lost
        # bytes of the stream, one asking for less sent some twice. So the
        # record is at most _TLS_RECORD bytes, and the write after one was
        # held asks for exactly its length: every caller writes again from
        # the first byte not yet out, with at least that many after it
        # (outbuf.py sends a large payload in pieces of as many).
        done = 0
        while done < n:
            m = self.held or min(n - done, _TLS_RECORD)
            k = TcpTransport.write_now(self, buf, off + done, m)
            if not k:
                self.held = m
                break
            self.held = 0
            done += k
        return done

    def read_now(self, mv):
        # A try of its own (its frame then takes heap on a board, as TLS
        # takes far more): mbedTLS refusing the client's certificate
        # (require_certificate) raises ValueError, here a failed read like
        # any other.
        try:
            return self.sock.readinto(mv)
        except ValueError as e:
            raise OSError("client certificate refused: %s" % str(e).strip())
