"""Optional HTTP Basic on the WebSocket upgrade ("http_basic": true on a
websockets listener), checked against the broker's password file."""
import base64
import os
import socket
import subprocess
import sys

from brokerproc import BrokerProc, free_port
from conftest import REPO


def _upgrade(port, auth=None):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = ("GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: mqtt\r\n")
    if auth is not None:
        head += "Authorization: Basic %s\r\n" % base64.b64encode(auth.encode()).decode()
    s.sendall((head + "\r\n").encode())
    line = s.recv(4096).split(b"\r\n", 1)[0]
    s.close()
    return line


def test_websocket_upgrade_asks_for_http_basic_and_checks_the_password_file(tmp_path):
    pw = tmp_path / "passwd"
    subprocess.run([sys.executable, str(REPO / "tools" / "passwd"), "-c", "-b", str(pw), "alice", "s3cret"],
                   check=True, capture_output=True)
    wsport = free_port()
    cfg = {"password_file": str(pw), "allow_anonymous": False,
           "listeners": [{"port": 0, "bind_address": "127.0.0.1"},
                         {"port": wsport, "bind_address": "127.0.0.1", "protocol": "websockets",
                          "http_basic": True}]}
    b = BrokerProc(board="esp32", config=cfg)
    b.config["listeners"][0]["port"] = b.port
    with b:
        assert b" 401 " in _upgrade(wsport)
        assert b" 401 " in _upgrade(wsport, "alice:wrong")
        assert b" 101 " in _upgrade(wsport, "alice:s3cret")
    assert os.path.exists(pw)
