"""A whole sensor hub in a board's heap (issue 18), on the twin with the
board's shipped defaults (persistence on, authentication on), all at once:

  - 200 retained topics (site/sensor/NNN/temp, 4-byte values, QoS 1);
  - 16 persistent sessions subscribed to alerts/#, offline, each holding
    the same 32 queued QoS 1 alerts (held once, queued 16 times);
  - the live clients the board's sockets allow (esp32: 8; pico_w: 4, one of
    them over TLS, with Mbed TLS in the Python heap as on an RP2040), each
    subscribed to site/# and receiving all 200 retained values; one of them
    watches $SYS/broker/heap/free throughout.

Then every session comes back and gets its 32 alerts, and gives back the
heap its queue held. Nothing in the log says the heap ran out, and at
least 16 KB stayed free whenever $SYS sampled it (once a second); sampled
every 2 ms, never less than 14.5 KB. The heap used at each stage is
printed (the figures of the closing note).
"""
import os
import pathlib
import socket
import ssl
import subprocess
import threading
import time

import pytest

from brokerproc import BrokerProc, free_port, profile, connect
from mqttc import Client, Raw, CONNACK, connect_bytes

HERE = pathlib.Path(__file__).parent
RETAINED = 200
SESSIONS = 16
ALERTS = 32
FLOOR = 16 * 1024


def _certs(d):
    def run(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", "key.pem",
        "-out", "cert.pem", "-days", "2", "-nodes", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    run("x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der")
    run("pkey", "-in", "key.pem", "-outform", "DER", "-out", "key.der")


class Watch:
    """The first live client: takes site/# like the others and, on the same
    connection, the broker's heap figures every second."""

    def __init__(self, c):
        self.c = c
        self.free = []
        self.used = None
        self.retained = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            p = self.c.poll(0.2)
            if p is None:
                continue
            if p.topic == "$SYS/broker/heap/free":
                self.free.append(int(p.payload))
            elif p.topic == "$SYS/broker/heap/used":
                self.used = int(p.payload)
            elif p.topic.startswith("site/"):
                self.retained.append(p.topic)

    def used_now(self):
        # heap/used as the broker publishes it (after a collection), once
        # the next second's value is in.
        self.used = None
        end = time.time() + 5
        while self.used is None and time.time() < end:
            time.sleep(0.05)
        time.sleep(1.1)
        return self.used

    def close(self):
        self.stop.set()
        self.t.join()
        self.c.close()


def _tls_client(port, cafile, cid):
    ctx = ssl.create_default_context(cafile=cafile)
    s = ctx.wrap_socket(connect(port, 10), server_hostname="127.0.0.1")
    c = Client.__new__(Client)
    c.port, c.version, c.client_id, c._pid, c.stash = port, 4, cid, 0, []
    c.raw = Raw.__new__(Raw)
    c.raw.s = s
    c.raw.buf = b""
    c.send_raw(connect_bytes(cid, 4))
    assert c.expect(CONNACK, 10).reason == 0
    return c


@pytest.mark.parametrize("board", ["esp32", "pico_w"])
def test_a_whole_hub_fits_in_the_boards_heap(board, tmp_path):
    stages, least = _hub(board, tmp_path)
    assert least >= FLOOR, "heap free fell to %d" % least
    # Drained, the sessions give back what their queues held, containers
    # included: each kept some 470 B of emptied queue and in-flight table,
    # and the hub used 1.2 KB more after they came back than while their
    # 512 entries were queued.
    assert stages["returned"] <= stages["sessions"] - 4096, stages


def test_the_hubs_heap_never_dips_far_under_its_floor_between_samples(tmp_path):
    # The same hub, with the heap free read every 2 ms rather than once a
    # second (mp_heap_lowwater.py). Seven clients that had just taken their
    # retained values held idle 1 KB output buffers until the next
    # second's release: 13.2 KB free, under the message floor (16 KB),
    # every run; the sample once a second found 16.2-19.9 KB. Idle buffers
    # now go back as soon as a look at the heap finds it short: 16.9 KB.
    stages, least = _hub("esp32", tmp_path, script=str(HERE / "mp_heap_lowwater.py"))
    print("lowest heap free, sampled every 2 ms: %d" % least)
    assert least >= 14848, "heap free fell to %d between the once-a-second samples" % least


def _hub(board, tmp_path, script=None):
    prof = profile(board)["config"]
    live = prof["max_connections"]
    cfg = {"sys_interval": 1}
    kw = {}
    tls = None
    if board == "pico_w":
        # One live client over TLS, paid for from the Python heap.
        _certs(str(tmp_path))
        tls = free_port()
        cfg["listeners"] = [{"port": None}, {"port": tls, "certfile": str(tmp_path / "cert.der"),
                                              "keyfile": str(tmp_path / "key.der")}]
        kw["variant"] = "tlsheap"
    b = BrokerProc(board=board, config=cfg, script=script, **kw)
    if tls:
        b.config["listeners"][0]["port"] = b.port
    b.start()
    stages = {}
    try:
        c = Client(b.port, "live0", version=4)
        c.subscribe([("$SYS/broker/heap/#", 0), ("site/#", 0)])
        w = Watch(c)
        stages["start"] = w.used_now()
        pub = Client(b.port, "pub", version=5)
        for i in range(RETAINED):
            assert pub.publish("site/sensor/%03d/temp" % i, b"21.%d" % (i % 10), qos=1, retain=True).reason == 0
        pub.close()
        stages["retained"] = w.used_now()
        for i in range(SESSIONS):
            c = Client(b.port, "sleeper%02d" % i, version=5, clean=False, props={0x11: 3600})
            c.subscribe([("alerts/#", 1)])
            c.disconnect()
        pub = Client(b.port, "pub", version=5)
        for i in range(ALERTS):
            assert pub.publish("alerts/%02d" % i, b"door %d open" % i, qos=1).reason == 0
        pub.close()
        stages["sessions"] = w.used_now()
        clients = []
        for i in range(1, live):
            if tls and i == 1:
                c = _tls_client(tls, str(tmp_path / "cert.pem"), "live%d" % i)
            else:
                c = Client(b.port, "live%d" % i, version=4 if i % 2 else 5)
            assert c.subscribe([("site/#", 0)]) == [0]
            clients.append(c)
        for c in clients:
            got = [m.topic for m in c.messages(n=RETAINED, timeout=5)]
            assert len(set(got)) == RETAINED, "%s got %d retained values" % (c.client_id, len(set(got)))
        end = time.time() + 5
        while len(set(w.retained)) < RETAINED and time.time() < end:
            time.sleep(0.05)
        assert len(set(w.retained)) == RETAINED
        stages["live clients"] = w.used_now()
        for c in clients:
            c.close()
        # The sessions come back, one at a time as a sensor wakes.
        for i in range(SESSIONS):
            c = Client(b.port, "sleeper%02d" % i, version=5, clean=False, props={0x11: 3600})
            assert c.connack.session_present
            got = [m.payload for m in c.messages(n=ALERTS, timeout=5)]
            assert got == [b"door %d open" % k for k in range(ALERTS)], (i, len(got))
            c.disconnect()
        stages["returned"] = w.used_now()
        w.close()
        log = b.log()
    except BaseException:
        print("broker exit code:", b.proc.poll())
        print(b.log()[-4000:])
        raise
    finally:
        b.stop()
        b.tmp.cleanup()
    print("\n%s heap used by stage (bytes): %s; least free %d" % (board, stages, min(w.free)))
    print("per retained topic %d, per queued entry %d (32 alerts x 16 sessions, with the sessions), "
          "per live client %d" % ((stages["retained"] - stages["start"]) / RETAINED,
                                  (stages["sessions"] - stages["retained"]) / (ALERTS * SESSIONS),
                                  (stages["live clients"] - stages["sessions"]) / (live - 1)))
    assert "MemoryError" not in log and "out of memory" not in log and "no heap" not in log, log[-3000:]
    return stages, min(w.free)
