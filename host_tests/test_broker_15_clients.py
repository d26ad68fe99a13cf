"""Interoperability with real clients: paho-mqtt 2.2 (MQTT 3.1.1 and 5.0)
and Debian's mosquitto_pub / mosquitto_sub."""
import os
import queue
import subprocess
import tempfile
import threading
import time

import pytest
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqttc import BrokerProc
from brokerproc import TEST_USER, TEST_PASSWORD, cli_args, paho_subscribe, source_address

PAHO_VERSION = {4: mqtt.MQTTv311, 5: mqtt.MQTTv5}
CLI_VERSION = {4: "mqttv311", 5: "mqttv5"}

@pytest.fixture(scope="module")
def broker():
    with BrokerProc(board="esp32", config={}) as b:
        yield b


@pytest.fixture(autouse=True)
def still_alive(broker):
    yield
    assert broker.alive(), "broker died:\n" + broker.log()[-3000:]


class Paho:
    """A paho client with its network loop in a thread; messages land in
    a queue."""

    def __init__(self, port, cid, version):
        self.version = version
        self.q = queue.Queue()
        self.connected = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid,
                             protocol=PAHO_VERSION[version])
        self.c.on_message = lambda c, u, m: self.q.put(m)
        self.c.on_connect = lambda c, u, f, rc, props: self.connected.set()
        self.c.username_pw_set(TEST_USER, TEST_PASSWORD)
        self.c.connect("127.0.0.1", port, keepalive=30, bind_address=source_address()[0])
        self.c.loop_start()
        assert self.connected.wait(5), "paho %s did not connect" % cid

    def subscribe(self, topic, qos):
        paho_subscribe(self.c, topic, qos)

    def publish(self, topic, payload, qos, props=None, retain=False):
        info = self.c.publish(topic, payload, qos, retain=retain, properties=props)
        info.wait_for_publish(5)
        assert info.is_published()

    def get(self, timeout=5):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("paho received nothing within %ss" % timeout)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("va,vb", [(4, 5), (4, 4), (5, 5)])
def test_paho_clients_exchange_messages_both_ways(broker, va, vb, qos):
    a = Paho(broker.port, "paho-a-%d%d%d" % (va, vb, qos), va)
    b = Paho(broker.port, "paho-b-%d%d%d" % (va, vb, qos), vb)
    ta, tb = "paho/%d%d%d/to-a" % (va, vb, qos), "paho/%d%d%d/to-b" % (va, vb, qos)
    a.subscribe(ta, qos)
    b.subscribe(tb, qos)
    for i in range(3):
        a.publish(tb, b"a%d" % i, qos)
        b.publish(ta, b"b%d" % i, qos)
    got_b = [b.get() for _ in range(3)]
    got_a = [a.get() for _ in range(3)]
    assert [(m.topic, m.payload, m.qos) for m in got_b] == [(tb, b"a%d" % i, qos) for i in range(3)]
    assert [(m.topic, m.payload, m.qos) for m in got_a] == [(ta, b"b%d" % i, qos) for i in range(3)]
    a.close()
    b.close()


def test_paho_v5_properties_reach_paho_v5_subscriber(broker):
    a = Paho(broker.port, "paho-props-a", 5)
    b = Paho(broker.port, "paho-props-b", 5)
    b.subscribe("pahoprops/t", 1)
    pr = Properties(PacketTypes.PUBLISH)
    pr.UserProperty = [("k1", "v1"), ("k2", "v2")]
    pr.ContentType = "text/plain"
    pr.ResponseTopic = "pahoprops/reply"
    pr.CorrelationData = b"\x01\x02"
    a.publish("pahoprops/t", b"hello", 1, props=pr)
    m = b.get()
    assert m.payload == b"hello"
    assert m.properties.UserProperty == [("k1", "v1"), ("k2", "v2")]
    assert m.properties.ContentType == "text/plain"
    assert m.properties.ResponseTopic == "pahoprops/reply"
    assert m.properties.CorrelationData == b"\x01\x02"
    a.close()
    b.close()


def _cli(*args, timeout=15):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_to_paho_subscriber(broker, version, qos):
    t = "mpub/%d/%d" % (version, qos)
    s = Paho(broker.port, "mpub-sub-%d%d" % (version, qos), 5)
    s.subscribe(t, 2)
    r = _cli("mosquitto_pub", *cli_args(broker.port), "-V", CLI_VERSION[version],
             "-i", "mpub-%d%d" % (version, qos), "-t", t, "-q", str(qos), "-m", "from mosquitto_pub")
    assert r.returncode == 0, r.stderr
    m = s.get()
    assert (m.topic, m.payload, m.qos) == (t, b"from mosquitto_pub", qos)
    s.close()


def test_mosquitto_pub_large_payload_from_file(broker):
    s = Paho(broker.port, "mpub-big-sub", 4)
    s.subscribe("mpub/big", 1)
    data = bytes(range(256)) * 20  # 5120 bytes, larger than the read buffer
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        r = _cli("mosquitto_pub", *cli_args(broker.port), "-t", "mpub/big", "-q", "1",
                 "-f", f.name)
    finally:
        os.unlink(f.name)
    assert r.returncode == 0, r.stderr
    assert s.get().payload == data
    s.close()


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_to_mosquitto_sub(broker, version, qos):
    t = "msub/%d/%d" % (version, qos)
    sub = subprocess.Popen(["mosquitto_sub", *cli_args(broker.port), "-V",
                            CLI_VERSION[version], "-i", "msub-%d%d" % (version, qos), "-t", t, "-q",
                            str(qos), "-C", "3", "-W", "10", "-F", "%q %p"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL)
    p = Paho(broker.port, "msub-pub-%d%d" % (version, qos), 5)
    try:
        # Publish until mosquitto_sub has its 3 messages: its SUBSCRIBE may
        # not be in yet when the first messages go out.
        i = 0
        end = time.time() + 10
        while sub.poll() is None and time.time() < end:
            p.publish(t, b"m%d" % i, qos)
            i += 1
            time.sleep(0.05)
        out, err = sub.communicate(timeout=5)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
        p.close()
    assert sub.returncode == 0, (sub.returncode, err)
    lines = out.split()
    assert len(lines) == 6, out
    qs, payloads = lines[0::2], lines[1::2]
    assert qs == [str(qos)] * 3
    k = int(payloads[0][1:])
    assert payloads == ["m%d" % (k + j) for j in range(3)]


@pytest.mark.parametrize("version", [4, 5])
def test_mosquitto_retained_message_reaches_mosquitto_sub(broker, version):
    t = "mret/%d" % version
    r = _cli("mosquitto_pub", *cli_args(broker.port), "-V", CLI_VERSION[version], "-t", t,
             "-q", "1", "-r", "-m", "kept")
    assert r.returncode == 0, r.stderr
    r = _cli("mosquitto_sub", *cli_args(broker.port), "-V", CLI_VERSION[version], "-t", t,
             "-C", "1", "-W", "5", "-F", "%r %t %p")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", t, "kept"]
    _cli("mosquitto_pub", *cli_args(broker.port), "-t", t, "-r", "-n")
