"""The acl_file at the broker, line kind by line kind: `user`, `topic
read|write|readwrite|deny`, `pattern` with %c and %u, deny winning wherever
it stands, anonymous clients getting the lines before the first `user`.
Checked at SUBSCRIBE (v5 SUBACK 0x87, 3.1.1 0x80), at PUBLISH (v5
PUBACK/PUBREC 0x87; 3.1.1 acknowledged and dropped), at delivery, for
retained messages sent on subscribe, for wills, and $SYS read-only for
everyone (docs/security.md, "The ACL file")."""
import subprocess
import sys

import pytest

from mqttc import PUBACK, PUBREC, BrokerProc, Client, collect

from conftest import REPO

ACL = """\
# Lines before the first "user" line: anonymous clients.
topic read public/#
topic write anon/in

user alice
topic deny home/alarm/code
topic readwrite home/#
topic read sensors/+/temp
topic write sensors/alice/cmd
topic read $SYS/broker/uptime

user bob
topic read home/#
topic write bob/out
topic readwrite public/#

user root
topic readwrite #
topic readwrite $SYS/#

user carol

# Every client, anonymous ones included; %u lines never apply to those.
pattern write devices/%c/status
pattern readwrite users/%u/#
pattern deny users/%u/private/#
pattern deny secret/#
"""

USERS = [("alice", "pa"), ("bob", "pb"), ("root", "pr"), ("carol", "pc")]
PW = dict(USERS)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("acl")
    pf = d / "passwords"
    for i, (u, p) in enumerate(USERS):
        subprocess.run([sys.executable, str(REPO / "tools" / "passwd"), "-B", "unix"] + (["-c"] if i == 0 else [])
                       + ["-b", str(pf), u, p], check=True, capture_output=True)
    af = d / "acl"
    af.write_text(ACL)
    cfg = {"password_file": str(pf), "acl_file": str(af), "allow_anonymous": True, "sys_interval": 1}
    with BrokerProc(board="esp32", config=cfg) as b:
        yield b


@pytest.fixture(autouse=True)
def still_alive(broker):
    yield
    assert broker.alive(), "broker died:\n" + broker.log()[-3000:]
    assert "Traceback" not in broker.log(), broker.log()[-3000:]


_n = [0]


def cl(broker, user=None, version=5, cid=None, **kw):
    _n[0] += 1
    cid = cid or "%s-%d" % (user or "anon", _n[0])
    if user is None:
        return Client(broker.port, cid, version=version, username=None, **kw)
    return Client(broker.port, cid, version=version, username=user, password=PW[user].encode(), **kw)


def delivered(sub, topic, timeout=0.5):
    """Topics of the PUBLISHes sub receives until none comes for timeout."""
    return [m.topic for m in sub.messages(timeout=timeout)]


# ---------------------------------------------------------------- user + topic


def test_user_readwrite_grant_allows_publish_and_subscribe(broker):
    a = cl(broker, "alice")
    assert a.subscribe([("home/#", 1)]) == [1]
    assert a.publish("home/kitchen/light", b"on", qos=1).reason == 0
    m = a.get()
    assert (m.topic, m.payload) == ("home/kitchen/light", b"on")
    a.close()


def test_topic_read_grant_allows_subscribe_but_not_publish_v5(broker):
    b = cl(broker, "bob")
    assert b.subscribe([("home/#", 1), ("home/+/light", 0)]) == [1, 0]
    assert b.publish("home/kitchen/light", b"x", qos=1).reason == 0x87
    assert b.publish("home/kitchen/light", b"x", qos=2, complete=False).reason == 0x87
    assert delivered(b, "home/#") == []
    b.close()


def test_topic_write_grant_allows_publish_but_not_subscribe(broker):
    a = cl(broker, "alice")
    watcher = cl(broker, "root")
    watcher.subscribe([("sensors/#", 1)])
    assert a.subscribe([("sensors/alice/cmd", 1)]) == [0x87]
    assert a.publish("sensors/alice/cmd", b"go", qos=1).reason == 0
    assert delivered(watcher, "sensors/#") == ["sensors/alice/cmd"]
    a.close()
    watcher.close()


def test_subscription_must_be_covered_by_one_read_grant(broker):
    a = cl(broker, "alice")
    # topic read sensors/+/temp
    assert a.subscribe([("sensors/+/temp", 0), ("sensors/hall/temp", 0), ("sensors/#", 0), ("#", 0),
                        ("sensors/hall/+", 0)]) == [0, 0, 0x87, 0x87, 0x87]
    a.close()


def test_refused_subscribe_is_0x80_in_v311(broker):
    b = cl(broker, "bob", version=4)
    assert b.subscribe([("home/#", 1), ("bob/out", 0), ("secret/x", 0)]) == [1, 0x80, 0x80]
    b.close()


def test_refused_publish_in_v311_is_acknowledged_and_dropped(broker):
    watcher = cl(broker, "root")
    watcher.subscribe([("home/#", 2)])
    b = cl(broker, "bob", version=4)
    assert b.publish("home/door", b"open", qos=1).reason == 0  # PUBACK, no reason in 3.1.1
    assert b.publish("home/door", b"open", qos=2).type == 7  # full QoS 2 flow, PUBCOMP
    b.publish("home/door", b"open", qos=0)
    assert delivered(watcher, "home/#") == []
    assert b.ping()  # still connected
    b.close()
    watcher.close()


def test_refused_publish_in_v5_gets_0x87_and_is_not_routed(broker):
    watcher = cl(broker, "root")
    watcher.subscribe([("home/#", 2)])
    b = cl(broker, "bob")
    ack = b.publish("home/door", b"open", qos=1)
    assert ack.type == PUBACK and ack.reason == 0x87
    rec = b.publish("home/door", b"open", qos=2, complete=False)
    assert rec.type == PUBREC and rec.reason == 0x87
    assert delivered(watcher, "home/#") == []
    assert b.publish("bob/out", b"ok", qos=1).reason == 0x10  # allowed, nobody listens
    b.close()
    watcher.close()


def test_user_without_lines_gets_nothing_but_patterns(broker):
    c = cl(broker, "carol", cid="carol-dev")
    assert c.subscribe([("public/#", 0), ("users/carol/#", 0)]) == [0x87, 0]
    assert c.publish("public/x", b"x", qos=1).reason == 0x87
    assert c.publish("devices/carol-dev/status", b"up", qos=1).reason == 0x10
    c.close()


def test_user_cannot_write_outside_its_own_lines_and_patterns(broker):
    b = cl(broker, "bob")
    assert b.publish("home/x", b"x", qos=1).reason == 0x87
    assert b.publish("users/alice/inbox", b"x", qos=1).reason == 0x87
    b.close()


# ---------------------------------------------------------------- deny


def test_deny_line_wins_over_a_broader_grant_written_after_it(broker):
    a = cl(broker, "alice")
    assert a.publish("home/alarm/code", b"1234", qos=1).reason == 0x87
    assert a.subscribe([("home/alarm/code", 0), ("home/alarm/+", 0), ("home/alarm/#", 0)]) == [0x87, 0, 0]
    a.close()


def test_denied_topic_is_filtered_at_delivery_inside_a_granted_subscription(broker):
    a = cl(broker, "alice")
    assert a.subscribe([("home/#", 1)]) == [1]
    b = cl(broker, "bob")
    assert b.subscribe([("home/#", 1)]) == [1]
    root = cl(broker, "root")
    for t in ("home/alarm/code", "home/hall/light"):
        assert root.publish(t, b"v", qos=1).reason == 0
    assert delivered(a, "home/#") == ["home/hall/light"]
    assert delivered(b, "home/#") == ["home/alarm/code", "home/hall/light"]
    for c in (a, b, root):
        c.close()


@pytest.mark.parametrize("version", [5, 4])
def test_denied_topic_is_filtered_at_delivery_for_qos_0_passing_straight_through(broker, version):
    # A QoS 0 message goes from the read buffer straight into a plain
    # subscriber's output (route._copy): the ACL holds there too.
    a = cl(broker, "alice", version=version)
    assert a.subscribe([("home/#", 0)]) == [0]
    root = cl(broker, "root", version=version)
    for t in ("home/alarm/code", "home/hall/light"):
        root.publish(t, b"v", qos=0)
    root.ping()
    assert delivered(a, "home/#") == ["home/hall/light"]
    for c in (a, root):
        c.close()


def test_pattern_deny_wins_over_a_users_readwrite_everything(broker):
    r = cl(broker, "root")
    assert r.publish("secret/plans", b"x", qos=1).reason == 0x87
    assert r.subscribe([("secret/#", 0), ("#", 0)]) == [0x87, 0]
    assert r.publish("open/plans", b"x", qos=1).reason == 0
    msgs = delivered(r, "#")
    assert "secret/plans" not in msgs and "open/plans" in msgs
    r.close()


def test_retained_messages_on_subscribe_follow_the_acl(broker):
    root = cl(broker, "root")
    for t in ("home/alarm/code", "home/garage/door", "public/weather"):
        assert root.publish(t, b"r-" + t.encode(), qos=1, retain=True).reason == 0
    a = cl(broker, "alice")
    assert a.subscribe([("home/#", 1)]) == [1]
    got = [(m.topic, m.retain) for m in a.messages(timeout=0.5)]
    assert ("home/garage/door", True) in got
    assert "home/alarm/code" not in [t for t, _ in got]
    anon = cl(broker)
    assert anon.subscribe([("public/#", 0), ("home/#", 0)]) == [0, 0x87]
    got = [m.topic for m in anon.messages(timeout=0.5)]
    assert got == ["public/weather"]
    for t in ("home/alarm/code", "home/garage/door", "public/weather"):
        root.publish(t, b"", qos=1, retain=True)
    for c in (root, a, anon):
        c.close()


# ---------------------------------------------------------------- anonymous


def test_anonymous_client_gets_the_lines_before_the_first_user(broker):
    for v in (5, 4):
        anon = cl(broker, version=v)
        assert anon.subscribe([("public/#", 0), ("home/#", 0), ("anon/in", 0)]) == \
            [0, 0x87 if v == 5 else 0x80, 0x87 if v == 5 else 0x80]
        root = cl(broker, "root")
        root.subscribe([("anon/#", 1), ("home/#", 1)])
        anon.publish("anon/in", b"hi", qos=1)
        anon.publish("home/x", b"no", qos=1)
        assert delivered(root, "#") == ["anon/in"]
        anon.close()
        root.close()


def test_anonymous_client_gets_c_patterns_but_never_u_patterns(broker):
    anon = cl(broker, cid="sensor-9")
    assert anon.publish("devices/sensor-9/status", b"up", qos=1).reason == 0x10
    assert anon.publish("devices/sensor-8/status", b"up", qos=1).reason == 0x87
    # users/%u/#: no username, so the pattern is not the anonymous client's
    assert anon.subscribe([("users/+/x", 0), ("users/None/#", 0), ("users/%u/#", 0)]) == [0x87] * 3
    anon.close()


# ---------------------------------------------------------------- pattern


def test_pattern_c_grants_a_client_its_own_topic_only(broker):
    a = cl(broker, "alice", cid="dev1")
    watcher = cl(broker, "root")
    watcher.subscribe([("devices/#", 1)])
    assert a.publish("devices/dev1/status", b"up", qos=1).reason == 0
    assert a.publish("devices/dev2/status", b"up", qos=1).reason == 0x87
    assert a.subscribe([("devices/dev1/status", 0)]) == [0x87]  # write only
    assert delivered(watcher, "devices/#") == ["devices/dev1/status"]
    a.close()
    watcher.close()


def test_pattern_c_is_not_widened_by_a_client_id_with_slash_or_wildcards(broker):
    # pattern write devices/%c/status: a client id holding '/', '+' or '#'
    # would reach other clients' topics, so such an id gets nothing from it.
    watcher = cl(broker, "root")
    watcher.subscribe([("devices/#", 1)])
    for cid, topic in (("dev1/x", "devices/dev1/x/status"), ("+", "devices/dev1/status"),
                       ("#", "devices/dev1/status"), ("#", "devices/x/status")):
        c = cl(broker, "alice", cid=cid)
        assert c.publish(topic, b"x", qos=1).reason == 0x87, (cid, topic)
        c.close()
    assert delivered(watcher, "devices/#") == []
    watcher.close()


def test_pattern_u_grants_a_user_its_own_tree_and_denies_its_private_part(broker):
    a = cl(broker, "alice")
    b = cl(broker, "bob")
    assert a.subscribe([("users/alice/#", 1), ("users/bob/#", 1), ("users/+/inbox", 1)]) == [1, 0x87, 0x87]
    assert a.publish("users/alice/notes", b"n", qos=1).reason == 0
    assert a.publish("users/alice/private/diary", b"d", qos=1).reason == 0x87
    assert b.publish("users/alice/notes", b"intrusion", qos=1).reason == 0x87
    assert delivered(a, "users/alice/#") == ["users/alice/notes"]
    a.close()
    b.close()


def test_shared_subscription_filter_is_checked_without_its_prefix(broker):
    b = cl(broker, "bob")
    assert b.subscribe([("$share/g/home/#", 1), ("$share/g/bob/out", 1), ("$share/g/#", 1)]) == [1, 0x87, 0x87]
    root = cl(broker, "root")
    root.publish("home/a", b"x", qos=1)
    assert delivered(b, "home/#") == ["home/a"]
    b.close()
    root.close()


# ---------------------------------------------------------------- $SYS


def test_nobody_may_publish_to_sys_even_with_a_readwrite_grant_on_it(broker):
    r = cl(broker, "root")
    assert r.subscribe([("$SYS/#", 0)]) == [0]
    collect(r, 0.3)  # the retained $SYS values
    w = cl(broker, "root")
    assert w.publish("$SYS/broker/uptime", b"forged", qos=1).reason == 0x87
    assert w.publish("$SYS", b"forged", qos=1).reason == 0x87
    assert w.publish("$SYS/new/topic", b"forged", qos=1, retain=True).reason == 0x87
    w3 = cl(broker, "root", version=4)
    w3.publish("$SYS/broker/version", b"forged", qos=1)
    got = [m.payload for m in collect(r, 1.5)]
    assert b"forged" not in got
    later = cl(broker, "root")
    later.subscribe([("$SYS/new/#", 0)])
    assert later.poll(0.3) is None, "a forged retained $SYS message was kept"
    for c in (r, w, w3, later):
        c.close()


def test_sys_is_readable_only_with_a_grant_starting_with_dollar(broker):
    a = cl(broker, "alice")
    # alice: topic read $SYS/broker/uptime; her home/# and # wildcards do
    # not reach '$' topics.
    assert a.subscribe([("$SYS/broker/uptime", 0), ("$SYS/broker/version", 0), ("$SYS/#", 0)]) == \
        [0, 0x87, 0x87]
    m = a.get(timeout=3)
    assert m.topic == "$SYS/broker/uptime"
    a.close()


# ---------------------------------------------------------------- will


def test_will_to_a_topic_the_client_may_not_write_is_not_published(broker):
    root = cl(broker, "root")
    root.subscribe([("home/#", 0), ("bob/#", 0)])
    b1 = cl(broker, "bob", will_topic="home/will", will_payload=b"bob died")
    b2 = cl(broker, "bob", will_topic="bob/out", will_payload=b"bob died too")
    b1.close()  # no DISCONNECT: the will is due
    b2.close()
    assert delivered(root, "#", timeout=1.0) == ["bob/out"]
    root.close()


# ---------------------------------------------------------------- start-up


def test_acl_file_with_a_bad_line_stops_the_start_naming_file_and_line(tmp_path):
    af = tmp_path / "acl"
    af.write_text("topic read public/#\nuser alice\ntopic readwrite home/#/x\n")
    b = BrokerProc(board="esp32", config={"acl_file": str(af)})
    try:
        with pytest.raises(RuntimeError) as e:
            b.start()
        assert "acl_file %s line 3" % af in str(e.value), str(e.value)
        assert "Traceback" not in str(e.value)
    finally:
        b.stop()
        b.tmp.cleanup()
