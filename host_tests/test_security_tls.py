"""The TLS listener next to a plain one: a throwaway EC P-256 certificate
made with openssl (DER for the broker, PLATFORM.md; PEM for the clients),
CPython's ssl (raw socket and paho) and mosquitto_pub/sub --cafile talking
to plain-TCP clients, the max_tls_connections cap, and bad traffic on the
TLS port."""
import os
import socket
import ssl
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest

from mqttc import CONNACK, BrokerProc, Client, Connect, P, Publish, Raw, Subscribe, connect_bytes, decode
from brokerproc import cli_args, connect, paho_connect, source_address
from conftest import free_port
from mqtt.packets import frame

TLS_CAP = 2


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")

    def run(*a):
        subprocess.run(a, check=True, capture_output=True, cwd=str(d))

    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-nodes", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    run("openssl", "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der")
    run("openssl", "pkey", "-in", "key.pem", "-outform", "DER", "-out", "key.der")
    return {k: str(d / k) for k in ("cert.pem", "cert.der", "key.der")}


@pytest.fixture(scope="module")
def broker(certs):
    plain, tls = free_port(), free_port()
    cfg = {"listeners": [{"port": plain},
                         {"port": tls, "certfile": certs["cert.der"], "keyfile": certs["key.der"]}],
           "max_tls_connections": TLS_CAP, "connect_timeout": 2}
    with BrokerProc(board="esp32", port=plain, config=cfg) as b:
        b.tls_port = tls
        b.cafile = certs["cert.pem"]
        yield b


@pytest.fixture(autouse=True)
def still_alive(broker):
    yield
    assert broker.alive(), "broker died:\n" + broker.log()[-3000:]
    assert "Traceback" not in broker.log(), broker.log()[-3000:]


def tls_socket(broker, timeout=5):
    ctx = ssl.create_default_context(cafile=broker.cafile)
    s = connect(broker.tls_port, timeout)
    return ctx.wrap_socket(s, server_hostname="127.0.0.1")


def tls_client(broker, cid, version=5, **kw):
    """A mqttc.Client whose socket is a TLS socket to the TLS listener."""
    c = Client(broker.port, cid, version=version, connect=False)
    c.raw.close()
    c.raw = Raw.__new__(Raw)
    c.raw.s = tls_socket(broker)
    c.raw.buf = b""
    c.send_raw(connect_bytes(cid, version=version, **kw))
    c.connack = c.expect(CONNACK)
    assert c.connack.reason == 0, c.connack
    return c


def tls_refused(broker, timeout=3):
    """True when a TLS client to the TLS port cannot get an MQTT session:
    the handshake fails or the socket is closed before any CONNACK."""
    try:
        s = tls_socket(broker, timeout)
    except (ssl.SSLError, OSError):
        return True
    try:
        s.sendall(connect_bytes("probe", 4))
        s.settimeout(timeout)
        d = s.recv(16)
        return d == b""
    except (ssl.SSLError, OSError):
        return True
    finally:
        s.close()


def wait_until(pred, timeout=5, step=0.1):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


# ---------------------------------------------------------------- listeners


def test_plain_and_tls_listeners_both_listen(broker):
    log = broker.log()
    assert "listening on 127.0.0.1:%d (mqtt)" % broker.port in log
    assert "listening on 127.0.0.1:%d (mqtt, tls)" % broker.tls_port in log


def test_raw_ssl_client_speaks_tls12_and_exchanges_messages_with_a_plain_client(broker):
    t = tls_client(broker, "tls-raw")
    assert t.raw.s.version() == "TLSv1.2"
    p = Client(broker.port, "plain-raw", version=4)
    assert t.subscribe([("x/tls", 1)]) == [1]
    assert p.subscribe([("x/plain", 1)]) == [1]
    assert p.publish("x/tls", b"to tls", qos=1).reason == 0
    assert t.get().payload == b"to tls"
    assert t.publish("x/plain", b"to plain", qos=2).type == P.PUBCOMP
    assert p.get().payload == b"to plain"
    t.disconnect()
    p.disconnect()


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_paho_over_tls_exchanges_messages_with_a_plain_client(broker, version):
    got = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-tls-%d" % version, protocol=version)
    c.tls_set(ca_certs=broker.cafile)
    subacked = []
    c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
    c.on_subscribe = lambda cl, u, mid, codes, props=None: subacked.append(mid)
    paho_connect(c, broker.tls_port, keepalive=30)
    c.loop_start()
    try:
        assert wait_until(c.is_connected), "paho did not connect over TLS"
        c.subscribe("paho/tls", 1)
        plain = Client(broker.port, "plain-for-paho-%d" % version, version=5)
        plain.subscribe([("paho/plain", 1)])
        assert wait_until(lambda: subacked), "paho's SUBSCRIBE got no SUBACK"
        assert plain.publish("paho/tls", b"hello paho", qos=1).reason == 0
        assert wait_until(lambda: got), "paho got nothing over TLS"
        assert got[0] == ("paho/tls", b"hello paho")
        c.publish("paho/plain", b"hello plain", qos=1).wait_for_publish(5)
        m = plain.get()
        assert (m.topic, m.payload) == ("paho/plain", b"hello plain")
        plain.disconnect()
    finally:
        c.disconnect()
        c.loop_stop()


def test_mosquitto_clients_with_cafile_exchange_messages_with_plain_clients(broker):
    sub = subprocess.Popen(["mosquitto_sub", *cli_args(broker.tls_port), "--cafile",
                            broker.cafile, "-t", "mosq/tls", "-C", "1", "-W", "10", "-q", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        plain = Client(broker.port, "plain-mosq", version=4)
        plain.subscribe([("mosq/plain", 1)])
        # Publish until the TLS subscriber (connecting in the background) has it.
        ok = False
        for _ in range(40):
            plain.publish("mosq/tls", b"via plain", qos=1)
            try:
                out, err = sub.communicate(timeout=0.25)
                ok = True
                break
            except subprocess.TimeoutExpired:
                pass
        assert ok and sub.returncode == 0, "mosquitto_sub over TLS got nothing"
        assert out.strip() == "via plain"
        r = subprocess.run(["mosquitto_pub", *cli_args(broker.tls_port), "--cafile",
                            broker.cafile, "-t", "mosq/plain", "-m", "via tls", "-q", "1", "-V", "mqttv5"],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        assert plain.get().payload == b"via tls"
        plain.disconnect()
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)


def test_tls_client_without_the_ca_refuses_the_throwaway_certificate(broker):
    ctx = ssl.create_default_context()
    s = connect(broker.tls_port, 5)
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(s, server_hostname="127.0.0.1")
    s.close()
    # The broker shrugs off the aborted handshake.
    c = tls_client(broker, "after-abort")
    c.ping()
    c.disconnect()


# ---------------------------------------------------------------- the cap


def test_tls_session_cap_refuses_the_extra_client_while_others_keep_working(broker):
    held = [tls_client(broker, "tls-held-%d" % i) for i in range(TLS_CAP)]
    assert tls_refused(broker), "a TLS session past max_tls_connections was served"
    assert "refused TLS connection from 127.0.0." in broker.log()
    # The ones inside the cap and plain clients are unaffected.
    plain = Client(broker.port, "plain-during-cap", version=5)
    held[0].subscribe([("cap/t", 1)])
    plain.publish("cap/t", b"still here", qos=1)
    assert held[0].get().payload == b"still here"
    assert held[1].ping()
    # Closing one frees its slot.
    held[1].disconnect()
    try:
        c = _tls_client_once_free(broker, "tls-after-cap")
    except (AssertionError, OSError, ssl.SSLError):
        c = None
    assert c is not None, "a freed TLS slot was not given back"
    c.disconnect()
    held[0].disconnect()
    plain.disconnect()


def test_plain_mqtt_on_the_tls_port_does_not_harm_the_broker(broker):
    socks = []
    for i in range(TLS_CAP + 3):
        r = Raw(broker.tls_port)
        r.send(connect_bytes("plain-on-tls-%d" % i, 4))
        socks.append(r)
    # Nobody got a session, no TLS slot leaked, the plain port works. The
    # broker frees a slot when its handshake fails: each client is tried
    # until then, 5 s at most.
    cs = [_tls_client_once_free(broker, "tls-after-plain-%d" % i) for i in range(TLS_CAP)]
    p = Client(broker.port, "plain-after-plain", version=5)
    p.ping()
    for c in cs:
        c.disconnect()
    p.disconnect()
    for r in socks:
        r.close()
    assert "client plain-on-tls" not in broker.log()
    # Mbed TLS 3.6 (MicroPython 1.28) says UNEXPECTED_MESSAGE, later
    # versions INVALID_RECORD: either way the TLS layer refused it.
    assert "MBEDTLS_ERR_SSL_UNEXPECTED_MESSAGE" in broker.log() or "MBEDTLS_ERR_SSL_INVALID_RECORD" in broker.log()


def _tls_client_once_free(broker, cid):
    end = time.time() + 5
    while True:
        try:
            return tls_client(broker, cid)
        except (AssertionError, OSError, ssl.SSLError):
            if time.time() > end:
                raise
            time.sleep(0.2)


def _fds(broker):
    return len(os.listdir("/proc/%d/fd" % broker.proc.pid))


def test_failed_tls_handshake_closes_the_connection_and_frees_its_socket(broker):
    before = _fds(broker)
    r = Raw(broker.tls_port)
    r.send(connect_bytes("plain-on-tls", 4))
    closed = r.closed(3)
    r.close()
    for _ in range(3):
        # A TLS client that rejects the certificate aborts the handshake.
        s = connect(broker.tls_port, 5)
        with pytest.raises(ssl.SSLError):
            ssl.create_default_context().wrap_socket(s, server_hostname="127.0.0.1")
        s.close()
    assert closed, "plain MQTT on the TLS port: the connection was never closed"
    assert wait_until(lambda: _fds(broker) <= before), "sockets leaked: %d -> %d" % (before, _fds(broker))


def test_tls_handshake_on_the_plain_port_is_dropped(broker):
    ctx = ssl.create_default_context(cafile=broker.cafile)
    s = connect(broker.port, 5)
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(s, server_hostname="127.0.0.1")
    s.close()
    Client(broker.port, "plain-after-tls-on-plain", version=4).disconnect()


def test_silent_sockets_on_the_tls_port_give_their_slots_back_after_connect_timeout(broker):
    # connect_timeout is 2 s here: sockets that never send a byte hold a
    # TLS slot only that long.
    silent = [connect(broker.tls_port) for _ in range(TLS_CAP)]
    time.sleep(0.3)
    assert tls_refused(broker)
    c = None
    end = time.time() + 6
    while c is None and time.time() < end:
        time.sleep(0.5)
        try:
            c = tls_client(broker, "tls-after-silent")
        except (AssertionError, OSError, ssl.SSLError):
            pass
    assert c is not None, "silent sockets kept their TLS slots past connect_timeout"
    c.disconnect()
    for s in silent:
        s.close()


def test_truncated_tls_record_and_garbage_after_connect_end_only_that_connection(broker):
    keep = tls_client(broker, "tls-keeper")
    keep.subscribe([("keep/#", 0)])
    # A TLS client that sends garbage where a TLS record belongs.
    s = tls_socket(broker)
    s.sendall(connect_bytes("garbage-tls", 4))
    assert decode(_recv_packet(s), 4).type == CONNACK
    # Below the TLS layer: a record header with a lying length, then junk.
    sock = socket.socket(fileno=s.detach())
    sock.sendall(b"\x17\x03\x03\x40\x00" + b"\xAA" * 64)  # application-data record, lying length
    sock.close()
    p = Client(broker.port, "plain-keep", version=4)
    p.publish("keep/a", b"1")
    assert keep.get().payload == b"1"
    p.disconnect()
    keep.disconnect()


def _recv_packet(s, timeout=5):
    s.settimeout(timeout)
    buf = b""
    while len(buf) < 2 or len(buf) < 2 + buf[1]:
        d = s.recv(256)
        if not d:
            break
        buf += d
    return buf


def _packets(buf):
    # Whole MQTT packets at the front of buf: ([(first byte, body)], rest).
    out = []
    while True:
        f = frame(buf, 0, len(buf), 1 << 28)
        if f is None or len(buf) < f[0] + f[1]:
            return out, buf
        out.append((buf[0], buf[f[0]:f[0] + f[1]]))
        buf = buf[f[0] + f[1]:]


def test_a_tls_subscriber_that_reads_slowly_gets_every_message_whole_and_once(broker):
    # mbedTLS keeps a record that could not all go out and counts it sent
    # at the next write, returning that write's length: when the output
    # had grown meanwhile (a window of QoS 1 messages refilled as PUBACKs
    # came), bytes of the stream were skipped, and with a shorter write
    # sent twice. The broker's socket has the esp32's small send buffer,
    # so a subscriber that reads slowly leaves records half sent.
    n = 300
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.bind(source_address())
    raw.settimeout(30)
    raw.connect(("127.0.0.1", broker.tls_port))
    sub = ssl.create_default_context(cafile=broker.cafile).wrap_socket(raw, server_hostname="127.0.0.1")
    sub.sendall(connect_bytes("tls-slow", 4))
    sub.sendall(P.encode(Subscribe(1, [("slow/t", 1)])))
    pub = Client(broker.port, "tls-slow-pub", version=4)
    got, buf, sent = [], b"", 0
    end = time.time() + 60
    while (not got or got[-1] < n - 1) and time.time() < end:
        while sent < n and sent - len(got) < 60:
            # sizes from 40 to 1,500 B, each payload its index repeated
            body = (b"%05d" % sent) * (8 + sent * 37 % 293)
            pub.send(Publish("slow/t", body, 1, False, False, sent + 1))  # (its PUBACKs left unread)
            sent += 1
        time.sleep(0.01)  # reading slowly
        buf += sub.recv(700)
        pkts, buf = _packets(buf)
        for first, body in pkts:
            if first >> 4 == 3:
                tl = body[0] << 8 | body[1]
                assert body[2:2 + tl] == b"slow/t", body[:40]
                pid = body[2 + tl:4 + tl]
                payload = body[4 + tl:]
                i = int(payload[:5])
                assert payload == b"%05d" % i * (8 + i * 37 % 293), "message %d arrived damaged" % i
                got.append(i)
                sub.sendall(b"\x40\x02" + pid)
    pub.disconnect()
    sub.close()
    assert got == list(range(n)), "%d of %d, first out of order at %s" % (
        len(got), n, next((k for k, i in enumerate(got) if i != k), None))
