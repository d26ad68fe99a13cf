#!/usr/bin/env python3
"""Reproducers for the broker bugs found while writing the issue 9 tests and
fuzzing. Each starts its own broker (esp32 profile heap), prints what it
saw, and exits 1 while the bug is there, 0 once it is fixed.

    .venv/bin/python tools/fuzz/repro.py tls-leak        # failed TLS handshake keeps its socket
    .venv/bin/python tools/fuzz/repro.py sys-forge       # clients can publish into $SYS without an acl_file
    .venv/bin/python tools/fuzz/repro.py stuck-session   # a queued 4 KB message that can never be sent
    .venv/bin/python tools/fuzz/repro.py all
"""
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(REPO, "lib"), os.path.join(REPO, "host_tests")]

from brokerproc import BrokerProc, free_port  # noqa: E402
from mqttc import Client, connect_bytes, sys_value  # noqa: E402


def tls_leak():
    d = tempfile.mkdtemp(prefix="repro_tls_")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout",
        "key.pem", "-out", "cert.pem", "-days", "1", "-nodes", "-subj", "/CN=localhost")
    run("openssl", "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der")
    run("openssl", "pkey", "-in", "key.pem", "-outform", "DER", "-out", "key.der")
    plain, tls = free_port(), free_port()
    cfg = {"listeners": [{"port": plain}, {"port": tls, "certfile": d + "/cert.der", "keyfile": d + "/key.der"}],
           "max_tls_connections": 2, "max_connection_rate": 0}
    with BrokerProc(board="esp32", port=plain, config=cfg) as b:
        fds = lambda: len(os.listdir("/proc/%d/fd" % b.proc.pid))  # noqa: E731
        before = fds()
        s = socket.create_connection(("127.0.0.1", tls), timeout=3)
        s.sendall(connect_bytes("plain-on-tls", 4))  # 101000044d5154540402003c0004...
        try:
            closed = s.recv(16) == b""
        except socket.timeout:
            closed = False
        except ConnectionResetError:
            closed = True
        s.close()
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", tls), timeout=3)
            try:
                ssl.create_default_context().wrap_socket(s, server_hostname="localhost")  # rejects the cert
            except ssl.SSLError:
                pass
            s.close()
        time.sleep(1)
        after = fds()
        print("tls-leak: plain MQTT on the TLS port closed by the broker within 3 s: %s" % closed)
        print("tls-leak: broker fds before %d, after 6 failed handshakes %d" % (before, after))
        return 0 if closed and after <= before else 1


def sys_forge():
    with BrokerProc(board="esp32", config={"sys_interval": 1}) as b:
        time.sleep(1.3)
        w = Client(b.port, "forger", version=5)
        ack = w.publish("$SYS/broker/clients/connected", b"999", qos=1, retain=True)
        r = Client(b.port, "reader", version=5)
        r.subscribe([("$SYS/broker/clients/connected", 0)])
        got = [m.payload for m in r.messages(timeout=0.5, n=2)]
        print("sys-forge: PUBACK reason 0x%02x; a new subscriber receives %s" % (ack.reason, got))
        return 1 if b"999" in got else 0


def stuck_session():
    with BrokerProc(board="esp32", config={"sys_interval": 1}) as b:
        for i in range(3):
            c = Client(b.port, "off%d" % i, version=4, clean=False)
            c.subscribe([("big/#", 1)])
            c.disconnect()
        p = Client(b.port, "pub", version=5)
        for i in range(40):
            try:
                r = p.publish("big/%d" % i, bytes([65 + i % 26]) * 4000, qos=1)
            except AssertionError as e:
                print("stuck-session: publish %d: %s" % (i, e))
                break
            if r.reason:
                print("stuck-session: publish %d: PUBACK 0x%02x" % (i, r.reason))
                break
        p.close()
        time.sleep(1.5)
        print("stuck-session: heap used %s free %s" % (sys_value(b.port, "heap/used"), sys_value(b.port, "heap/free")))
        got = 0
        for attempt in range(3):
            try:
                c = Client(b.port, "off0", version=4, clean=False)
                n = len(c.messages(timeout=1.0))
                got += n
                print("stuck-session: off0 reconnect %d: session present %s, %d messages" %
                      (attempt, c.connack.session_present, n))
                c.close()
            except AssertionError as e:
                print("stuck-session: off0 reconnect %d: %s" % (attempt, e))
            time.sleep(0.5)
        print("\n".join("  log: " + x for x in b.log().splitlines() if "connected" not in x)[-1500:])
        return 0 if got else 1


CASES = {"tls-leak": tls_leak, "sys-forge": sys_forge, "stuck-session": stuck_session}


def main(argv):
    names = list(CASES) if not argv or argv[0] == "all" else argv
    rc = 0
    for n in names:
        r = CASES[n]()
        print("%s: %s" % (n, "BUG PRESENT" if r else "ok"))
        rc |= r
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
