"""Client certificates on TLS listeners (Mosquitto's listener options
require_certificate, cafile, use_identity_as_username), on the twin with
certificates made by openssl here: a CA, a server certificate and client
certificates it signed, and a client certificate another CA signed. The
broker gets DER files (PLATFORM.md); clients get PEM. Clients are
CPython's ssl (through mqttc) and mosquitto_pub."""
import socket
import ssl
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest

from brokerfixtures import broker_survives  # noqa: F401
from brokerproc import TEST_PASSWORD, TEST_USER, BrokerProc, free_port, source_address
from conftest import REPO
from mqttc import CONNACK, Client, Raw, collect, connect_bytes, wait_for

sys.path.insert(0, str(REPO / "firmware"))
from broker import config, x509  # noqa: E402

ACL = """\
user sensor-7
topic readwrite sensors/7/#
user %s
topic readwrite #
""" % TEST_USER


def _openssl(d, *a):
    subprocess.run(("openssl",) + a, check=True, capture_output=True, cwd=str(d))


def _key(d, name):
    _openssl(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out",
             name + ".key")
    _openssl(d, "pkey", "-in", name + ".key", "-outform", "DER", "-out", name + ".key.der")


def _ca(d, name):
    _key(d, name)
    _openssl(d, "req", "-x509", "-new", "-key", name + ".key", "-out", name + ".pem", "-days", "2",
             "-subj", "/CN=%s" % name)
    _openssl(d, "x509", "-in", name + ".pem", "-outform", "DER", "-out", name + ".der")


def _signed(d, name, ca, subj, ext=None):
    _key(d, name)
    _openssl(d, "req", "-new", "-key", name + ".key", "-out", name + ".csr", "-subj", subj)
    a = ["x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
         "-CAcreateserial", "-out", name + ".pem", "-days", "2"]
    if ext:
        (d / (name + ".ext")).write_text(ext)
        a += ["-extfile", name + ".ext"]
    _openssl(d, *a)
    _openssl(d, "x509", "-in", name + ".pem", "-outform", "DER", "-out", name + ".der")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "otherca")
    _signed(d, "server", "ca", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _signed(d, "sensor7", "ca", "/O=acme/CN=sensor-7")
    _signed(d, "nocn", "ca", "/O=acme/OU=no common name")
    _signed(d, "mallory", "otherca", "/CN=%s" % TEST_USER)  # a name the ACL trusts, wrong CA
    return d


@pytest.fixture(scope="module")
def broker(certs, tmp_path_factory):
    # TLS listeners beside the plain one: one takes the certificate's name
    # as the user, one only requires a certificate, and a websockets one
    # (wss://) takes the name too. The shipped
    # defaults otherwise (max_tls_connections 1 per listener).
    (certs / "acl").write_text(ACL)
    ident, only, wss = free_port(), free_port(), free_port()
    tls = {"certfile": str(certs / "server.der"), "keyfile": str(certs / "server.key.der"),
           "cafile": str(certs / "ca.der"), "require_certificate": True}
    cfg = {"acl_file": str(certs / "acl"),
           "listeners": [{"port": 0}, dict(tls, port=ident, use_identity_as_username=True),
                         dict(tls, port=only),
                         dict(tls, port=wss, protocol="websockets", use_identity_as_username=True)]}
    b = BrokerProc(board="esp32", config=cfg)
    b.config["listeners"][0]["port"] = b.port
    with b:
        b.ident, b.only, b.wss = ident, only, wss
        yield b


def tls_socket(certs, port, cert=None):
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(certs / (cert + ".pem")), str(certs / (cert + ".key")))
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=source_address())
    return ctx.wrap_socket(s, server_hostname="127.0.0.1")


def tls_client(certs, port, cert, cid, version=5, **kw):
    """A mqttc.Client over TLS to port with client certificate `cert` (a
    name in certs, or None); CONNECT anonymous unless username is given."""
    kw.setdefault("username", None)
    c = Client.__new__(Client)
    c.version, c.client_id, c._pid, c.stash = version, cid, 0, []
    c.raw = Raw.__new__(Raw)
    c.raw.s = tls_socket(certs, port, cert)
    c.raw.buf = b""
    c.send_raw(connect_bytes(cid, version=version, **kw))
    c.connack = c.expect(CONNACK)
    return c


def refused_in_handshake(certs, port, cert):
    """True when the TLS handshake (or the read right after it, where
    TLS 1.2 clients learn of the server's alert) fails: no CONNACK."""
    try:
        s = tls_socket(certs, port, cert)
    except (ssl.SSLError, OSError):
        return True
    try:
        s.sendall(connect_bytes("probe", 4))
        return s.recv(16) == b""
    except (ssl.SSLError, OSError):
        return True
    finally:
        s.close()


# ---------------------------------------------------------------- use_identity_as_username


def test_certificate_signed_by_the_ca_logs_in_as_its_common_name_without_a_password(certs, broker):
    watch = Client(broker.port, "cc-watch", version=5)
    watch.subscribe([("sensors/#", 1)])
    c = tls_client(certs, broker.ident, "sensor7", "cc-1")
    assert c.connack.reason == 0
    assert c.publish("sensors/7/temp", b"21.5", qos=1).reason == 0
    # The ACL sees the user sensor-7: nothing outside sensors/7/#.
    assert c.publish("sensors/8/temp", b"forged", qos=1).reason == 0x87
    assert [(m.topic, m.payload) for m in collect(watch, 0.5)] == [("sensors/7/temp", b"21.5")]
    c.disconnect()
    watch.close()
    assert "client cc-1 connected" in broker.log()


def test_the_certificate_name_wins_over_the_user_name_in_the_connect(certs, broker):
    # The test user may write anywhere; the certificate says sensor-7.
    c = tls_client(certs, broker.ident, "sensor7", "cc-2", version=4, username=TEST_USER,
                   password=b"not checked")
    assert c.connack.reason == 0
    c.disconnect()
    c = tls_client(certs, broker.ident, "sensor7", "cc-3", username=TEST_USER, password=b"x")
    assert c.publish("other/topic", b"x", qos=1).reason == 0x87
    c.disconnect()


@pytest.mark.parametrize("port_attr", ["ident", "only"])
def test_client_without_a_certificate_is_refused_during_the_handshake(certs, broker, port_attr):
    assert refused_in_handshake(certs, getattr(broker, port_attr), None)


@pytest.mark.parametrize("port_attr", ["ident", "only"])
def test_certificate_signed_by_another_ca_is_refused_during_the_handshake(certs, broker, port_attr):
    # Its common name is the test user's: it must count for nothing.
    assert refused_in_handshake(certs, getattr(broker, port_attr), "mallory")
    assert wait_for(lambda: "client certificate refused: The certificate is not correctly signed by "
                            "the trusted CA" in broker.log(), 3)


@pytest.mark.parametrize("version,code", [(5, 0x86), (4, 0x04)])
def test_certificate_without_a_common_name_gets_bad_credentials(certs, broker, version, code):
    c = tls_client(certs, broker.ident, "nocn", "cc-nocn", version=version)
    assert c.connack.reason == code
    assert c.closed()


def test_mosquitto_pub_logs_in_with_its_certificate(certs, broker):
    watch = Client(broker.port, "cc-watch-cli", version=5)
    watch.subscribe([("sensors/7/#", 1)])
    r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.ident), "--cafile",
                        str(certs / "ca.pem"), "--cert", str(certs / "sensor7.pem"), "--key",
                        str(certs / "sensor7.key"), "-i", "cc-cli", "-q", "1", "-t", "sensors/7/cli",
                        "-m", "from mosquitto_pub"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert [m.payload for m in collect(watch, 0.5)] == [b"from mosquitto_pub"]
    watch.close()


def test_paho_over_wss_logs_in_with_its_certificate(certs, broker):
    watch = Client(broker.port, "cc-watch-wss", version=5)
    watch.subscribe([("sensors/#", 1)])
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cc-wss", protocol=mqtt.MQTTv5,
                    transport="websockets")
    c.tls_set(ca_certs=str(certs / "ca.pem"), certfile=str(certs / "sensor7.pem"),
              keyfile=str(certs / "sensor7.key"))
    c.connect("127.0.0.1", broker.wss, keepalive=30, bind_address=source_address()[0])
    c.loop_start()
    try:
        end = time.time() + 5
        while not c.is_connected() and time.time() < end:
            time.sleep(0.05)
        assert c.is_connected(), "paho did not connect over wss:// with its certificate"
        c.publish("other/wss", b"denied", qos=1).wait_for_publish(5)
        c.publish("sensors/7/wss", b"over wss", qos=1).wait_for_publish(5)
        assert [(m.topic, m.payload) for m in collect(watch, 0.5)] == [("sensors/7/wss", b"over wss")]
    finally:
        c.disconnect()
        c.loop_stop()
        watch.close()


# ---------------------------------------------------------------- require_certificate alone


def test_require_certificate_alone_still_asks_for_a_login(certs, broker):
    c = tls_client(certs, broker.only, "sensor7", "cc-only-anon")
    assert c.connack.reason == 0x87  # anonymous, as on any listener
    c.close()
    c = tls_client(certs, broker.only, "sensor7", "cc-only-user", username=TEST_USER,
                   password=TEST_PASSWORD.encode())
    assert c.connack.reason == 0
    assert c.publish("other/topic", b"x", qos=1).reason in (0, 0x10)  # the test user's rights
    c.disconnect()


def test_a_refused_tls_client_that_stays_connected_does_not_hold_the_tls_slot(certs, broker):
    # max_tls_connections 1 per listener. After a refusing CONNACK the
    # broker reads what a plain TCP client still sends before it closes
    # (conn._drain_in); over TLS that wait held the listener's one TLS
    # session, so the next TLS client was reset in its handshake (found by
    # a fresh-clone run of the suite: the login test above).
    a = tls_client(certs, broker.only, "sensor7", "cc-slot-anon")
    assert a.connack.reason == 0x87
    # a keeps its socket open and sends nothing more.
    b = tls_client(certs, broker.only, "sensor7", "cc-slot-user", username=TEST_USER,
                   password=TEST_PASSWORD.encode())
    assert b.connack.reason == 0
    b.disconnect()
    a.close()


def test_a_refused_handshake_leaves_the_tls_slot_free_and_logs_no_error(certs, broker):
    # max_tls_connections 1 per listener: a failed handshake gives it back.
    for _ in range(3):
        assert refused_in_handshake(certs, broker.ident, "mallory")
        assert refused_in_handshake(certs, broker.ident, None)
    c = tls_client(certs, broker.ident, "sensor7", "cc-after")
    assert c.connack.reason == 0
    c.disconnect()
    assert "\nE " not in broker.log(), broker.log()[-3000:]


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("listener,why", [
    ({"cafile": "ca.der"}, "'cafile' checks client certificates only with 'require_certificate': true"),
    ({"require_certificate": True}, "'require_certificate' needs 'certfile', 'keyfile' and 'cafile'"),
    ({"certfile": "s.der", "keyfile": "k.der", "require_certificate": True},
     "'require_certificate' needs 'certfile', 'keyfile' and 'cafile'"),
    ({"certfile": "s.der", "keyfile": "k.der", "use_identity_as_username": True},
     "'use_identity_as_username' needs 'require_certificate': true"),
    ({"certfile": "s.der", "keyfile": "k.der", "cafile": "c.der", "require_certificate": "yes"},
     "'require_certificate' must be true or false"),
    ({"certfile": "s.der", "keyfile": "k.der", "cafile": 7, "require_certificate": True},
     "'cafile' must be the path of a DER file"),
])
def test_bad_client_certificate_settings_stop_the_start_naming_the_key(listener, why):
    with pytest.raises(config.ConfigError) as e:
        config.build(None, {"listeners": [dict(listener, port=8883)]})
    assert str(e.value) == "config key 'listeners'[0]: " + why


def test_a_pem_cafile_stops_the_start_with_a_clear_error(certs):
    cfg = {"listeners": [{"port": 0}, {"port": free_port(), "certfile": str(certs / "server.der"),
                                       "keyfile": str(certs / "server.key.der"),
                                       "cafile": str(certs / "ca.pem"), "require_certificate": True}]}
    b = BrokerProc(board="esp32", config=cfg)
    b.config["listeners"][0]["port"] = b.port
    try:
        with pytest.raises(RuntimeError) as e:
            b.start()
        assert "cafile" in str(e.value) and "DER" in str(e.value), str(e.value)
        assert "Traceback" not in str(e.value)
    finally:
        b.stop()
        b.tmp.cleanup()


# ---------------------------------------------------------------- the common name


def test_common_name_is_read_from_the_subject_only(certs, tmp_path):
    der = lambda n: (certs / (n + ".der")).read_bytes()  # noqa: E731
    assert x509.common_name(der("sensor7")) == "sensor-7"  # not the issuer's "ca"
    assert x509.common_name(memoryview(der("sensor7"))) == "sensor-7"
    assert x509.common_name(der("nocn")) is None
    assert x509.common_name(der("sensor7")[:120]) is None
    assert x509.common_name(b"\x30\x82\xff\xff") is None
    # UTF-8, two CNs (the first counts), an RSA key.
    _openssl(tmp_path, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem", "-out",
             "c.pem", "-days", "1", "-utf8", "-subj", "/O=Gr\u00fc\u00dfe/CN=sens\u00f6r-\u00fc/CN=second")
    _openssl(tmp_path, "x509", "-in", "c.pem", "-outform", "DER", "-out", "c.der")
    assert x509.common_name((tmp_path / "c.der").read_bytes()) == "sens\u00f6r-\u00fc"
