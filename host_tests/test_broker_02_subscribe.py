"""SUBSCRIBE / UNSUBSCRIBE: wildcards, $ topics, overlapping and shared
subscriptions, subscription options and SUBACK/UNSUBACK codes
(MQTT 3.1.1 3.8-3.11, 4.7; MQTT 5.0 3.8-3.11, 4.7, 4.8)."""
import contextlib
import os
import signal
import time

import pytest

from brokerfixtures import broker, still_alive  # noqa: F401
from mqttc import BrokerProc, Client, Publish, Subscribe, Unsubscribe, DISCONNECT, SESSION_EXPIRY, SUBID, NL, RAP, RH,\
    PUBACK, PUBLISH, SUBACK, UNSUBACK, RECEIVE_MAX

CONFIG = {"max_subscriptions": 32}




@pytest.fixture
def pub(broker):
    c = Client(broker.port, "s02-pub", version=5)
    yield c
    c.close()


def topics_of(msgs):
    return sorted(m.topic for m in msgs)


# ---------------------------------------------------------------- wildcards


@pytest.mark.parametrize("version", [4, 5])
def test_plus_wildcard_matches_exactly_one_level(broker, pub, version):
    s = Client(broker.port, "s02-plus-%d" % version, version=version)
    s.subscribe([("w%d/+/x" % version, 0)])
    p = "w%d/" % version
    for t in ("a/x", "b/x", "a/b/x", "x", "a/x/y", "/x"):
        pub.publish(p + t, t, qos=1)
    got = s.messages(timeout=0.5)
    assert topics_of(got) == [p + "/x", p + "a/x", p + "b/x"]
    s.close()


@pytest.mark.parametrize("version", [4, 5])
def test_hash_wildcard_matches_parent_and_all_children(broker, pub, version):
    s = Client(broker.port, "s02-hash-%d" % version, version=version)
    s.subscribe([("h%d/#" % version, 0)])
    p = "h%d" % version
    for t in (p, p + "/a", p + "/a/b/c", p + "x", "z/" + p):
        pub.publish(t, b"1", qos=1)
    assert topics_of(s.messages(timeout=0.5)) == sorted([p, p + "/a", p + "/a/b/c"])
    s.close()


def test_plus_matches_empty_level(broker, pub):
    s = Client(broker.port, "s02-plus-empty", version=5)
    s.subscribe([("pe/+/z", 0)])
    pub.publish("pe//z", b"1", qos=1)
    m = s.get()
    assert m.topic == "pe//z"
    s.close()


def test_dollar_topics_not_matched_by_leading_wildcards(broker, pub):
    # MQTT-4.7.2-1: filters starting with # or + do not match $ topics.
    s = Client(broker.port, "s02-dollar", version=5)
    s.subscribe([("#", RH(2)), ("+/d02/x", 0)])
    d = Client(broker.port, "s02-dollar2", version=5)
    d.subscribe([("$d02/#", 0)])
    pub.publish("$d02/x", b"dollar", qos=1)
    pub.publish("d02/x", b"plain", qos=1)
    got = d.messages(timeout=0.5)
    assert [m.payload for m in got] == [b"dollar"]
    seen = s.messages(timeout=0.5)
    assert [m.topic for m in seen if m.topic.startswith("$")] == []
    assert b"plain" in [m.payload for m in seen]
    s.close()
    d.close()


# ---------------------------------------------------------------- overlapping


def test_v5_overlapping_subscriptions_deliver_a_copy_per_subscription_at_its_qos(broker, pub):
    # As Mosquitto does for 5.0 clients (MQTT-3.3.4-3 lets a server send
    # either one copy or one per subscription).
    s = Client(broker.port, "s02-ovl", version=5)
    s.subscribe([("ovl/#", 0), ("ovl/+", 2), ("ovl/a", 1)])
    pub.publish("ovl/a", b"x", qos=2)
    got = s.messages(3, timeout=5)
    assert sorted(m.qos for m in got) == [0, 1, 2]
    assert s.poll(0.3) is None
    s.close()


def test_v311_overlapping_subscriptions_deliver_one_copy_at_highest_qos(broker, pub):
    # 3.1.1 MQTT-3.3.5-1: one copy, respecting the highest granted QoS
    # (Mosquitto 2.0.11 sends its first match's).
    s = Client(broker.port, "s02-ovl4", version=4)
    s.subscribe([("ovl4/#", 1), ("ovl4/a", 0), ("ovl4/+", 0)])
    pub.publish("ovl4/a", b"x", qos=1)
    got = s.messages(1, timeout=5)
    assert got[0].qos == 1
    assert s.poll(0.3) is None
    s.close()


def test_v5_overlapping_subscriptions_each_carry_their_own_identifier(broker, pub):
    s = Client(broker.port, "s02-subids", version=5)
    s.subscribe([("sid/#", 0)], props={SUBID: 11})
    s.subscribe([("sid/+", 1)], props={SUBID: 22})
    s.subscribe([("sid/a", 0)])  # no identifier
    pub.publish("sid/a", b"x", qos=1)
    got = s.messages(3, timeout=5)
    assert sorted(((m.props or {}).get(SUBID, [0]), m.qos) for m in got) == [([0], 0), ([11], 0), ([22], 1)], got
    assert s.poll(0.3) is None
    s.close()


def test_v5_overlapping_subscriptions_each_keep_their_own_retain_as_published(broker, pub):
    s = Client(broker.port, "s02-ovl-rap", version=5)
    s.subscribe([("orap/#", 1 | 0x08), ("orap/t", 1)])
    pub.publish("orap/t", b"kept", qos=1, retain=True)
    got = s.messages(2, timeout=5)
    assert sorted(m.retain for m in got) == [False, True]
    pub.publish("orap/t", b"", qos=1, retain=True)
    s.close()


def test_filters_of_one_subscribe_matching_a_message_each_deliver_a_copy_with_their_shared_identifier(broker, pub):
    s = Client(broker.port, "s02-subids1", version=5)
    s.subscribe([("sid1/#", 0), ("sid1/+", 1)], props={SUBID: 9})
    pub.publish("sid1/a", b"x", qos=1)
    got = s.messages(2, timeout=5)
    assert sorted((m.props[SUBID], m.qos) for m in got) == [([9], 0), ([9], 1)]
    assert s.poll(0.3) is None
    s.close()


def test_subscription_identifier_is_sent_with_matching_message(broker, pub):
    s = Client(broker.port, "s02-subid1", version=5)
    s.subscribe([("sid1/+", 1)], props={SUBID: 268435455})
    pub.publish("sid1/a", b"x", qos=1)
    m = s.get()
    assert m.props[SUBID] == [268435455]
    s.close()


def test_resubscribe_replaces_subscription_options(broker, pub):
    s = Client(broker.port, "s02-resub", version=5)
    s.subscribe([("resub/t", 2)])
    assert s.subscribe([("resub/t", 0)]) == [0]
    pub.publish("resub/t", b"x", qos=2)
    got = s.messages(timeout=0.5)
    assert len(got) == 1 and got[0].qos == 0
    s.close()


# ---------------------------------------------------------------- options


def test_no_local_suppresses_own_messages(broker):
    a = Client(broker.port, "s02-nl-a", version=5)
    b = Client(broker.port, "s02-nl-b", version=5)
    a.subscribe([("nl/t", 1 | NL)])
    a.publish("nl/t", b"mine", qos=1)
    b.publish("nl/t", b"theirs", qos=1)
    got = a.messages(timeout=0.5)
    assert [m.payload for m in got] == [b"theirs"]
    a.close()
    b.close()


def test_without_no_local_own_messages_are_delivered(broker):
    a = Client(broker.port, "s02-nl-off", version=5)
    a.subscribe([("nloff/t", 1)])
    a.publish("nloff/t", b"mine", qos=1)
    got = a.messages(timeout=0.5)
    assert [m.payload for m in got] == [b"mine"]
    a.close()


def test_no_local_on_shared_subscription_is_protocol_error(broker):
    # 5.0 MQTT-3.8.3-4.
    a = Client(broker.port, "s02-nl-share", version=5)
    a.send(Subscribe(1, [("$share/g/nls/t", NL)]))
    d = a.expect(DISCONNECT)
    assert d.reason == 0x82
    assert a.closed()


def test_a_subscribe_closed_for_no_local_on_a_share_takes_none_of_its_filters(broker, pub):
    # The filter before the faulty one was made, then the connection closed
    # without a SUBACK, and the persistent session kept it (to flash too):
    # the client was never told it had it.
    a = Client(broker.port, "s02-nl-partial", version=5, clean=False, props={SESSION_EXPIRY: 600})
    a.send(Subscribe(1, [("nlp/keep", 1), ("$share/g/nlp/b", NL | 1)]))
    assert a.expect(DISCONNECT).reason == 0x82
    assert a.closed()
    a = Client(broker.port, "s02-nl-partial", version=5, clean=False, props={SESSION_EXPIRY: 600})
    pub.publish("nlp/keep", b"x", qos=1)
    assert a.messages(timeout=0.4) == []
    a.close()
    Client(broker.port, "s02-nl-partial", version=5, clean=True).disconnect()


def test_retain_as_published_keeps_retain_flag(broker, pub):
    a = Client(broker.port, "s02-rap", version=5)
    a.subscribe([("rap/t", 1 | RAP)])
    b = Client(broker.port, "s02-norap", version=5)
    b.subscribe([("rap/t", 1)])
    pub.publish("rap/t", b"r", qos=1, retain=True)
    ma = a.get()
    mb = b.get()
    assert ma.retain is True
    assert mb.retain is False
    pub.publish("rap/t", b"", qos=1, retain=True)  # clean up
    a.close()
    b.close()


def _retained_on_subscribe(c, flt, opts):
    c.subscribe([(flt, opts)])
    return [m for m in c.messages(timeout=0.4) if m.retain]


def test_retain_handling_0_sends_retained_on_every_subscribe(broker, pub):
    pub.publish("rh0/t", b"kept", qos=1, retain=True)
    c = Client(broker.port, "s02-rh0", version=5)
    assert [m.payload for m in _retained_on_subscribe(c, "rh0/t", 1 | RH(0))] == [b"kept"]
    assert [m.payload for m in _retained_on_subscribe(c, "rh0/t", 1 | RH(0))] == [b"kept"]
    c.close()


def test_retain_handling_1_sends_retained_only_for_new_subscription(broker, pub):
    pub.publish("rh1/t", b"kept", qos=1, retain=True)
    c = Client(broker.port, "s02-rh1", version=5)
    assert [m.payload for m in _retained_on_subscribe(c, "rh1/t", 1 | RH(1))] == [b"kept"]
    assert _retained_on_subscribe(c, "rh1/t", 1 | RH(1)) == []
    c.close()


@pytest.mark.parametrize("first", [0, 2])
def test_a_filter_named_twice_in_one_subscribe_gets_its_retained_value_once(broker, pub, first):
    # Named first with Retain Handling 0 (its options unchanged, or
    # changed), then with Retain Handling 1 on the same subscription: the
    # value goes once, as the later options say. With the first naming
    # unchanged it did not go at all.
    pub.publish("rh01/t", b"kept", qos=1, retain=True)
    c = Client(broker.port, "s02-rh01-%d" % first, version=5)
    assert [m.payload for m in _retained_on_subscribe(c, "rh01/t", 0)] == [b"kept"]
    assert c.subscribe([("rh01/t", first), ("rh01/t", 1 | RH(1))]) == [first, 1]
    got = [m for m in c.messages(timeout=0.4) if m.retain]
    assert [(m.payload, m.qos) for m in got] == [(b"kept", 1)]
    c.close()


def test_retain_handling_2_never_sends_retained(broker, pub):
    pub.publish("rh2/t", b"kept", qos=1, retain=True)
    c = Client(broker.port, "s02-rh2", version=5)
    assert _retained_on_subscribe(c, "rh2/t", 1 | RH(2)) == []
    # ... but live messages still flow.
    pub.publish("rh2/t", b"live", qos=1)
    assert c.get().payload == b"live"
    c.close()


# ---------------------------------------------------------------- shared


def test_shared_subscription_delivers_each_message_to_exactly_one_member(broker, pub):
    a = Client(broker.port, "s02-sh-a", version=5)
    b = Client(broker.port, "s02-sh-b", version=5)
    a.subscribe([("$share/g1/sh/t", 1)])
    b.subscribe([("$share/g1/sh/t", 1)])
    for i in range(10):
        pub.publish("sh/t", b"%d" % i, qos=1)
    ga = [m.payload for m in a.messages(timeout=0.5)]
    gb = [m.payload for m in b.messages(timeout=0.5)]
    assert sorted(ga + gb, key=int) == [b"%d" % i for i in range(10)]
    assert ga and gb, "all messages went to one member"
    a.close()
    b.close()


def test_a_share_member_that_stopped_reading_leaves_its_turns_to_one_that_reads(broker, pub):
    # Round robin gave every other message to a member that acknowledged
    # nothing: they waited in its queue behind its Receive Maximum, and its
    # full queue refused them (PUBACK 0x97) while the other member had room
    # (outside soak probe: 48 of 200 refused). A member with messages
    # waiting is passed over for one with none.
    stuck = Client(broker.port, "s02-sh4-stuck", version=5, props={RECEIVE_MAX: 1})
    b = Client(broker.port, "s02-sh4-b", version=5)
    stuck.subscribe([("$share/g4/sh4/t", 1)])
    b.subscribe([("$share/g4/sh4/t", 1)])
    got = []
    for i in range(40):
        assert pub.publish("sh4/t", b"%d" % i, qos=1).reason == 0
        got += [m.payload for m in b.messages(timeout=0.05)]
    got += [m.payload for m in b.messages(timeout=0.5)]
    assert len(got) >= 38, "the member that reads got %d of 40" % len(got)
    stuck.close()
    b.close()


def test_shared_subscription_takes_turns_for_messages_the_store_looks_at_before_routing(broker, pub):
    # Messages of about max_packet_size make the publish path match the
    # topic before routing, to reckon their records (Persist._need): that
    # look took a turn of the share group too, so with two members one got
    # every message (review). Each gets every other one.
    a = Client(broker.port, "s02-sh3-a", version=5)
    b = Client(broker.port, "s02-sh3-b", version=5)
    a.subscribe([("$share/g3/sh3/t", 1)])
    b.subscribe([("$share/g3/sh3/t", 1)])
    ga, gb = [], []
    for i in range(6):
        assert pub.publish("sh3/t", b"%d" % i + bytes(8000), qos=1).reason == 0
        # (read as they come: six unacknowledged would fill the heap)
        ga += [m.payload[:1] for m in a.messages(timeout=0.3)]
        gb += [m.payload[:1] for m in b.messages(timeout=0.3)]
    assert sorted(ga + gb) == [b"%d" % i for i in range(6)]
    assert len(ga) == len(gb) == 3, (ga, gb)
    a.close()
    b.close()


def test_two_share_groups_each_get_one_copy(broker, pub):
    a = Client(broker.port, "s02-sh2-a", version=5)
    b = Client(broker.port, "s02-sh2-b", version=5)
    c = Client(broker.port, "s02-sh2-c", version=5)
    a.subscribe([("$share/ga/sh2/#", 1)])
    b.subscribe([("$share/ga/sh2/#", 1)])
    c.subscribe([("$share/gb/sh2/#", 1)])
    for i in range(6):
        pub.publish("sh2/x", b"%d" % i, qos=1)
    ga = [m.payload for m in a.messages(timeout=0.5)] + [m.payload for m in b.messages(timeout=0.3)]
    gc = [m.payload for m in c.messages(timeout=0.3)]
    want = [b"%d" % i for i in range(6)]
    assert sorted(ga, key=int) == want
    assert gc == want
    for x in (a, b, c):
        x.close()


def test_shared_and_normal_subscription_of_same_client_get_a_copy_each(broker, pub):
    # 5.0 4.8.2: a shared subscription is independent of normal ones.
    a = Client(broker.port, "s02-sh3", version=5)
    a.subscribe([("$share/g3/sh3/t", 1), ("sh3/t", 1)])
    pub.publish("sh3/t", b"x", qos=1)
    assert len(a.messages(timeout=0.5)) == 2
    a.close()


def test_shared_subscription_gets_no_retained_messages(broker, pub):
    # 5.0 4.8.2: retained messages are not sent for a new shared subscription.
    pub.publish("shr/t", b"kept", qos=1, retain=True)
    a = Client(broker.port, "s02-shr", version=5)
    a.subscribe([("$share/g/shr/t", 1)])
    assert a.messages(timeout=0.4) == []
    pub.publish("shr/t", b"", qos=1, retain=True)
    a.close()


def test_unsubscribed_share_member_gets_nothing(broker, pub):
    a = Client(broker.port, "s02-shu-a", version=5)
    b = Client(broker.port, "s02-shu-b", version=5)
    a.subscribe([("$share/gu/shu/t", 1)])
    b.subscribe([("$share/gu/shu/t", 1)])
    assert a.unsubscribe("$share/gu/shu/t") == [0]
    for i in range(4):
        pub.publish("shu/t", b"%d" % i, qos=1)
    assert a.messages(timeout=0.3) == []
    assert len(b.messages(n=4, timeout=5)) == 4 and b.poll(0.3) is None
    a.close()
    b.close()


# ---------------------------------------------------------------- SUBACK / UNSUBACK


def test_v5_suback_has_a_code_per_filter_and_0x8f_for_one_correctly_formed_but_not_taken(broker):
    # A shared filter without a filter part or share name (MQTT-4.8.2-1/2),
    # one past max_topic_levels.
    c = Client(broker.port, "s02-suback5", version=5)
    codes = c.subscribe([("ok/a", 1), ("$share/gx", 0), ("ok/b", 2), ("$share//x", 0), ("ok/c", 0),
                         ("l/" * 20 + "x", 0)])
    assert codes == [1, 0x8F, 2, 0x8F, 0, 0x8F]
    c.close()


def test_v311_suback_byte_exact_with_0x80_for_a_filter_it_does_not_take(broker):
    # A shared filter without a filter part: valid in 3.1.1 (which has no
    # shared subscriptions), refused here (MQTT-4.8.2-1).
    c = Client(broker.port, "s02-suback4", version=4)
    c.send(Subscribe(0x1234, [("ok4/a", 0), ("$share/g4", 1), ("ok4/b", 2)]))
    assert c.recv_raw() == b"\x90\x05\x12\x34\x00\x80\x02"
    c.close()


@pytest.mark.parametrize("version", [4, 5])
def test_a_subscribe_of_a_thousand_filters_gets_a_suback_with_a_code_for_each_and_an_unsubscribe_too(broker, pub, version):
    # 7 KB of short filters, under the esp32's 8 KB packet limit: held as a
    # list, their objects wanted more heap than the board has, and the
    # client was closed without a SUBACK. Those past max_subscriptions
    # (CONFIG: 32) are refused, 0x97 in 5.0 and 0x80 in 3.1.1.
    c = Client(broker.port, "s02-many-%d" % version, version=version)
    codes = c.subscribe([("m%d%03d" % (version, i), 1) for i in range(1000)])
    assert codes == [1] * 32 + [0x97 if version == 5 else 0x80] * 968
    pub.publish("m%d031" % version, b"in", qos=1)
    pub.publish("m%d032" % version, b"out", qos=1)
    assert [m.topic for m in c.messages(timeout=0.5)] == ["m%d031" % version]
    # And an UNSUBSCRIBE of them all: 0x11 for those never taken (5.0; a
    # 3.1.1 UNSUBACK has no codes).
    codes = c.unsubscribe(["m%d%03d" % (version, i) for i in range(1000)])
    assert codes == ([0] * 32 + [0x11] * 968 if version == 5 else None)
    pub.publish("m%d031" % version, b"gone", qos=1)
    assert c.messages(timeout=0.3) == []
    c.close()


@pytest.mark.parametrize("version", [4, 5])
def test_a_filter_named_a_thousand_times_in_one_subscribe_is_one_subscription(broker, pub, version):
    # Each naming made a new subscription and kept the one before alive
    # until the SUBACK: 600 of one filter ran the heap out, and a retained
    # message went out once for each. The later options win (MQTT-3.8.4-3).
    t = "r%d" % version
    pub.publish(t, b"kept", qos=1, retain=True)
    c = Client(broker.port, "s02-rep-%d" % version, version=version)
    codes = c.subscribe([(t, 1)] * 999 + [(t, 0)])
    assert codes == [1] * 999 + [0]
    got = c.messages(timeout=0.5)
    assert [(m.topic, m.payload, m.qos) for m in got] == [(t, b"kept", 0)]
    pub.publish(t, b"live", qos=1)
    assert [(m.payload, m.qos) for m in c.messages(timeout=0.5)] == [(b"live", 0)]
    pub.publish(t, b"", qos=1, retain=True)
    c.close()


def _closed_then_published(broker, pub, cid, setup, pkt, topic, version=4):
    # A session sends pkt and must be closed for it (5.0: after DISCONNECT
    # 0x81); then the session is back, topic is published to, and what the
    # session got is returned (the session is ended afterwards).
    kw = {"props": {SESSION_EXPIRY: 60}} if version == 5 else {}
    c = Client(broker.port, cid, version=version, clean=False, **kw)
    if setup:
        c.subscribe(setup)
    c.send(pkt)
    if version == 5:
        d = c.recv()
        assert (d.type, d.reason) == (DISCONNECT, 0x81), d
    assert c.closed()
    c = Client(broker.port, cid, version=4, clean=False)
    pub.publish(topic, b"x", qos=1)
    got = c.messages(timeout=0.4)
    c.close()
    Client(broker.port, cid, version=4, clean=True).disconnect()
    return [m.topic for m in got]


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("bad", ["ok4/#/x", "a+", "", "$share/g+/x"])
def test_a_subscribe_with_a_filter_that_is_not_valid_closes_the_connection_and_takes_none(broker, pub, bad, version):
    # A protocol violation (MQTT-4.7.1-2, 4.7.3-1, 4.8.0-1): closed, as by
    # Mosquitto 2.0.11, with none of the packet's filters taken; 5.0 is
    # told DISCONNECT 0x81 first, as by Mosquitto (its SUBACK 0x8F is for
    # a filter correctly formed but not taken).
    pkt = Subscribe(7, [("v311ok/a", 1), (bad, 0)])
    assert _closed_then_published(broker, pub, "s02-v311-bad", None, pkt, "v311ok/a", version) == []


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("bad", ["u4/#/x", "a+", ""])
def test_an_unsubscribe_with_a_filter_that_is_not_valid_closes_the_connection_and_removes_none(broker, pub, bad,
                                                                                              version):
    pkt = Unsubscribe(8, ["u4ok/a", bad])
    assert _closed_then_published(broker, pub, "s02-v311-unbad", [("u4ok/a", 1)], pkt, "u4ok/a",
                                  version) == ["u4ok/a"]


def test_v31_subscribe_with_a_filter_that_is_not_valid_closes_the_connection(broker, pub):
    # A 3.1 SUBACK has no failure code (0x80 is 3.1.1's): closed, as by
    # Mosquitto, and none of the packet's filters is taken.
    from mqttc import Raw, connect_bytes, enc
    r = Raw(broker.port)
    r.send(connect_bytes("s02-v31-bad", version=3, clean=False))
    assert r.recv_packet() == b"\x20\x02\x00\x00"
    r.send(enc(Subscribe(9, [("v31ok/a", 1), ("v31/#/y", 0)]), 4))
    assert r.closed()
    c = Client(broker.port, "s02-v31-bad", version=4, clean=False)
    pub.publish("v31ok/a", b"x", qos=1)
    assert c.poll(0.5) is None
    c.close()
    Client(broker.port, "s02-v31-bad", version=4, clean=True).disconnect()
    # A valid one is granted as in 3.1.1.
    r = Raw(broker.port)
    r.send(connect_bytes("s02-v31-ok", version=3))
    assert r.recv_packet() == b"\x20\x02\x00\x00"
    r.send(enc(Subscribe(9, [("v31ok/#", 1)]), 4))
    assert r.recv_packet() == b"\x90\x03\x00\x09\x01"
    r.close()


def test_v311_unsuback_is_byte_exact(broker):
    c = Client(broker.port, "s02-unsuback4", version=4)
    c.subscribe([("u4/a", 0)])
    c.send(Unsubscribe(0x0102, ["u4/a"]))
    assert c.recv_raw() == b"\xb0\x02\x01\x02"
    c.close()


def test_v5_unsuback_0x11_when_no_subscription_existed(broker):
    c = Client(broker.port, "s02-unsuback5", version=5)
    c.subscribe([("u5/a", 0)])
    assert c.unsubscribe(["u5/never", "u5/a", "u5/a"]) == [0x11, 0x00, 0x11]
    c.close()


def test_v5_unsuback_0x8f_for_a_shared_filter_no_subscribe_could_make(broker):
    # As SUBSCRIBE answers them; they got 0x11 (outside probe).
    c = Client(broker.port, "s02-u8f", version=5)
    assert c.unsubscribe(["$share/g", "$share//x", "ok/+"]) == [0x8F, 0x8F, 0x11]
    c.close()


def test_unsubscribe_stops_delivery(broker, pub):
    c = Client(broker.port, "s02-unsub", version=5)
    c.subscribe([("us/a", 1), ("us/b", 1)])
    c.unsubscribe("us/a")
    pub.publish("us/a", b"a", qos=1)
    pub.publish("us/b", b"b", qos=1)
    assert [m.payload for m in c.messages(timeout=0.5)] == [b"b"]
    c.close()


def test_no_local_applies_per_subscription_when_overlapping(broker):
    a = Client(broker.port, "s02-nl-ovl", version=5)
    a.subscribe([("nlo/#", 1 | NL), ("nlo/t", 0)])
    a.publish("nlo/t", b"mine", qos=1)
    a.publish("nlo/u", b"mine too", qos=1)
    got = a.messages(timeout=0.4)
    assert [(m.topic, m.qos) for m in got] == [("nlo/t", 0)]
    a.close()


def test_retained_message_on_subscribe_carries_subscription_identifier(broker, pub):
    pub.publish("ridr/t", b"kept", qos=1, retain=True)
    c = Client(broker.port, "s02-rid", version=5)
    c.subscribe([("ridr/#", 1)], props={SUBID: 77})
    m = c.get()
    assert m.retain and m.props[SUBID] == [77]
    pub.publish("ridr/t", b"", qos=1, retain=True)
    c.close()


def test_resumed_session_does_not_resend_retained_messages(broker, pub):
    pub.publish("rres/t", b"kept", qos=1, retain=True)
    c = Client(broker.port, "s02-rres", version=5, clean=False, props={0x11: 60})
    c.subscribe([("rres/t", 1)])
    assert c.get().payload == b"kept"
    c.close()
    c = Client(broker.port, "s02-rres", version=5, clean=False, props={0x11: 60})
    assert c.connack.session_present is True
    assert c.poll(0.4) is None
    c.disconnect(props={0x11: 0})
    pub.publish("rres/t", b"", qos=1, retain=True)


# ------------------------------------------- packets on different connections


@contextlib.contextmanager
def _all_in_one_turn(broker):
    # Holds the broker (SIGSTOP) while the packets are sent, so that they
    # all wait for the same turn of its event loop, as packets sent a few
    # microseconds apart do; the pauses between them put each in the
    # broker's socket before the next is sent.
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield lambda c, pkt: (c.send(pkt), time.sleep(0.02))
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


def _next(c, types):
    p = c.recv(timeout=3)
    assert p.type in types, "expected one of %s, got %r" % (types, p)
    return p


def _rounds(broker, version, tag):
    # Eight rounds, each with a fresh publisher a and receiver b: which of
    # two sockets the poller lists first depends on where their objects
    # landed, so one pair would test one order only.
    for i in range(8):
        a = Client(broker.port, "s02-%s-a%d" % (tag, i), version=version)
        b = Client(broker.port, "s02-%s-b%d" % (tag, i), version=version)
        yield "s02-%s-%d/%d" % (tag, version, i), a, b
        a.close()
        b.close()


@pytest.mark.parametrize("version", [4, 5])
def test_a_subscribe_sent_just_before_a_publish_on_another_connection_gets_it(broker, version):
    # Paho's interoperability suite (client_test5 test_subscribe_options)
    # subscribes on one connection and publishes on another at once.
    for topic, a, b in _rounds(broker, version, "ord"):
        with _all_in_one_turn(broker) as send:
            send(b, Subscribe(1, [(topic, 1)]))
            send(a, Publish(topic, b"after the subscribe", 1, False, False, 5))
        assert _next(a, (PUBACK,)).pid == 5
        got = [_next(b, (SUBACK, PUBLISH)), _next(b, (SUBACK, PUBLISH))]
        assert [p.type for p in got] == [SUBACK, PUBLISH], "%s: %r" % (topic, got)
        assert got[1].payload == b"after the subscribe"


@pytest.mark.parametrize("version", [4, 5])
def test_an_unsubscribe_sent_just_before_a_publish_on_another_connection_stops_it(broker, version):
    for topic, a, b in _rounds(broker, version, "unord"):
        b.subscribe([(topic, 1)])
        with _all_in_one_turn(broker) as send:
            send(b, Unsubscribe(2, [topic]))
            send(a, Publish(topic, b"after the unsubscribe", 1, False, False, 5))
        assert _next(a, (PUBACK,)).pid == 5
        assert _next(b, (UNSUBACK,)).pid == 2
        assert b.poll(0.3) is None, "%s: delivered after the UNSUBSCRIBE" % topic
