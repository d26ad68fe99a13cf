# firmware/broker/acl.py: Mosquitto acl_file syntax and our access rules.
# Each named test runs one entry of CASES; the last test runs every entry
# again under the MicroPython unix port.
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "lib")
FIRMWARE = os.path.join(ROOT, "firmware")
# The board twin (conftest builds it first), with the code frozen into it.
from conftest import MICROPYTHON as _TWIN  # noqa: E402
MICROPYTHON = str(_TWIN)
for p in (LIB, FIRMWARE):
    if p not in sys.path:
        sys.path.insert(0, p)

from broker.acl import Acl, covers  # noqa: E402
from mqtt.topic import matches  # noqa: E402

# name -> (acl_file text, [(op, client_id, username, topic or filter, allowed)])
# op: "w" can_write, "r" can_read, "s" can_subscribe. username None = anonymous.
CASES = {
    "no_access_word_is_readwrite": (
        "user u\ntopic a/b\n",
        [("w", "c", "u", "a/b", True), ("r", "c", "u", "a/b", True), ("w", "c", "u", "a/c", False)],
    ),
    "access_words": (
        "user u\ntopic read r/#\ntopic write w/#\ntopic readwrite rw/#\n",
        [
            ("r", "c", "u", "r/x", True),
            ("w", "c", "u", "r/x", False),
            ("w", "c", "u", "w/x", True),
            ("r", "c", "u", "w/x", False),
            ("r", "c", "u", "rw/x", True),
            ("w", "c", "u", "rw/x", True),
        ],
    ),
    "deny_overrides": (
        "user u\ntopic deny house/secret\ntopic readwrite house/#\n"
        "user v\ntopic readwrite house/#\ntopic deny house/+/private\n"
        "pattern deny house/%u/locked\n",
        [
            ("w", "c", "u", "house/secret", False),
            ("r", "c", "u", "house/secret", False),
            ("w", "c", "u", "house/hall", True),
            ("w", "c", "v", "house/kitchen/private", False),
            ("r", "c", "v", "house/kitchen/public", True),
            # a pattern deny beats a user's own grant
            ("w", "c", "v", "house/v/locked", False),
            ("w", "c", "u", "house/v/locked", True),
        ],
    ),
    "pattern_client_id": (
        "pattern write devices/%c/out\npattern read devices/%c/in/#\n",
        [
            ("w", "dev1", None, "devices/dev1/out", True),
            ("w", "dev1", "anyuser", "devices/dev1/out", True),
            ("w", "dev1", None, "devices/dev2/out", False),
            ("r", "dev1", None, "devices/dev1/in/cmd", True),
            ("r", "dev1", None, "devices/dev2/in/cmd", False),
            ("w", "dev1", None, "devices/dev1/in/cmd", False),
        ],
    ),
    "pattern_username": (
        "pattern readwrite users/%u/#\npattern read ids/%c-%u\n",
        [
            ("w", "c1", "alice", "users/alice/x", True),
            ("w", "c1", "alice", "users/bob/x", False),
            ("r", "c1", "alice", "ids/c1-alice", True),
            # no username, no %u lines
            ("w", "c1", None, "users/None/x", False),
            ("w", "c1", None, "users/%u/x", False),
        ],
    ),
    "anonymous_lines_before_first_user": (
        "topic read public/#\ntopic write anon/in\nuser alice\ntopic readwrite alice/#\n",
        [
            ("r", "c", None, "public/news", True),
            ("w", "c", None, "anon/in", True),
            ("w", "c", None, "alice/x", False),
            # named users do not get the anonymous lines
            ("r", "c", "alice", "public/news", False),
            ("w", "c", "alice", "alice/x", True),
            ("w", "c", "bob", "alice/x", False),
        ],
    ),
    "unknown_user_gets_patterns_only": (
        "user alice\ntopic readwrite #\npattern read self/%u\n",
        [
            ("r", "c", "mallory", "self/mallory", True),
            ("r", "c", "mallory", "anything", False),
            ("r", "c", "alice", "anything", True),
        ],
    ),
    "no_grant_is_denied": (
        "user alice\ntopic read a/#\n",
        [("r", "c", "alice", "b", False), ("w", "c", "alice", "a/x", False), ("r", "c", None, "a/x", False)],
    ),
    "empty_file_denies_everything": (
        "# nothing\n\n",
        [("r", "c", None, "a", False), ("w", "c", "u", "a", False), ("s", "c", "u", "#", False)],
    ),
    "sys_not_writable": (
        "topic readwrite #\ntopic readwrite $SYS/#\ntopic write $SYS\n"
        "user admin\ntopic readwrite $SYS/#\ntopic readwrite #\ntopic write $SYSTEM/#\n"
        "pattern write $SYS/%c\n",
        [
            ("w", "c", None, "$SYS/broker/uptime", False),
            ("w", "c", None, "$SYS", False),
            ("w", "c", "admin", "$SYS/broker/load", False),
            ("w", "c", "admin", "$SYS/c", False),
            ("r", "c", "admin", "$SYS/broker/load", True),
            ("w", "c", "admin", "$SYSTEM/x", True),
            ("w", "c", "admin", "normal", True),
        ],
    ),
    "sys_needs_dollar_grant": (
        "user u\ntopic read #\nuser admin\ntopic read $SYS/#\n",
        [
            ("r", "c", "u", "$SYS/broker/uptime", False),
            ("s", "c", "u", "$SYS/#", False),
            ("s", "c", "u", "#", True),
            ("r", "c", "admin", "$SYS/broker/uptime", True),
            ("s", "c", "admin", "$SYS/#", True),
            ("s", "c", "admin", "#", False),
        ],
    ),
    "substitution_cannot_widen": (
        "pattern readwrite devices/%c/#\npattern readwrite home/%u\n",
        [
            ("w", "dev1", None, "devices/dev1/x", True),
            ("w", "#", None, "devices/other/x", False),
            ("w", "#", None, "devices/#/x", False),
            ("w", "+", None, "devices/other/x", False),
            ("w", "a/b", None, "devices/a/b/x", False),
            ("w", "", None, "devices//x", False),
            ("s", "+", None, "devices/+/#", False),
            ("s", "#", None, "devices/#", False),
            ("w", "c", "+", "home/bob", False),
            ("w", "c", "a/b", "home/a/b", False),
            ("w", "c", "", "home/", False),
            ("w", "c", "bob", "home/bob", True),
            ("w", "a$b", None, "devices/a$b/x", True),
        ],
    ),
    "leading_dollar_cannot_reach_sys": (
        # $-topics are for grants that start with "$" themselves: a client
        # id "$SYS" read $SYS/#, the dashboard's client list among it.
        "pattern read %c/#\npattern read %u/x\n",
        [
            ("s", "dev1", None, "dev1/#", True),
            ("s", "$SYS", None, "$SYS/#", False),
            ("r", "$SYS", None, "$SYS/broker/dashboard/state", False),
            ("r", "c", "$SYS", "$SYS/x", False),
            ("r", "c", "bob", "bob/x", True),
        ],
    ),
    "unsafe_value_fails_closed_on_deny_pattern": (
        "topic readwrite open/#\npattern deny open/%c/#\n",
        [
            ("w", "dev1", None, "open/x", True),
            ("w", "dev1", None, "open/dev1/x", False),
            # the deny line cannot be applied to "a/b" safely: refuse
            ("w", "a/b", None, "open/x", False),
        ],
    ),
    "percent_u_in_client_id_stays_literal": (
        "pattern readwrite clients/%c/#\n",
        [
            ("w", "%u", "bob", "clients/%u/x", True),
            ("w", "%u", "bob", "clients/bob/x", False),
        ],
    ),
    "subscribe_covered_by_grant": (
        "user u\ntopic read sensors/+/temp\ntopic read logs/#\ntopic write cmd/#\n",
        [
            ("s", "c", "u", "sensors/+/temp", True),
            ("s", "c", "u", "sensors/kitchen/temp", True),
            ("s", "c", "u", "logs/#", True),
            ("s", "c", "u", "logs/a/+", True),
            ("s", "c", "u", "logs", True),
            ("s", "c", "u", "sensors/#", False),
            ("s", "c", "u", "sensors/+/+", False),
            ("s", "c", "u", "#", False),
            ("s", "c", "u", "cmd/#", False),
        ],
    ),
    "subscribe_and_deny": (
        "user u\ntopic read house/#\ntopic deny house/secret/#\n",
        [
            ("s", "c", "u", "house/secret/#", False),
            ("s", "c", "u", "house/secret/a", False),
            # only partly denied: allowed, and each message is filtered
            ("s", "c", "u", "house/#", True),
            ("r", "c", "u", "house/hall", True),
            ("r", "c", "u", "house/secret/a", False),
        ],
    ),
    "comments_and_blanks": (
        "# comment\n\n   # indented comment\n\t\nuser u\n  topic   read   a/b  \n",
        [("r", "c", "u", "a/b", True), ("w", "c", "u", "a/b", False)],
    ),
    "user_listed_twice": (
        "user u\ntopic read a\nuser v\ntopic read b\nuser u\ntopic read c\n",
        [("r", "c", "u", "a", True), ("r", "c", "u", "c", True), ("r", "c", "u", "b", False)],
    ),
    "spaces_in_topic_and_username": (
        "user John Smith\ntopic read my home/living room\n",
        [("r", "c", "John Smith", "my home/living room", True), ("r", "c", "John", "my home/living room", False)],
    ),
    "lone_access_word_is_topic": (
        "user u\ntopic read\n",
        [("w", "c", "u", "read", True), ("r", "c", "u", "read", True)],
    ),
}


def _acl(tmp_path, text):
    p = tmp_path / "acl"
    p.write_text(text)
    return Acl.load(str(p))


def _check(acl, op, cid, user, name):
    if op == "w":
        return acl.can_write(cid, user, name)
    if op == "r":
        return acl.can_read(cid, user, name)
    return acl.can_subscribe(cid, user, name)


def run_case(tmp_path, name):
    text, checks = CASES[name]
    acl = _acl(tmp_path, text)
    got = [(op, cid, user, t, _check(acl, op, cid, user, t)) for op, cid, user, t, _ in checks]
    assert got == [tuple(c) for c in checks]


def test_acl_topic_line_without_access_word_is_readwrite(tmp_path):
    run_case(tmp_path, "no_access_word_is_readwrite")


def test_acl_read_write_readwrite_grant_only_that(tmp_path):
    run_case(tmp_path, "access_words")


def test_acl_deny_line_overrides_grant(tmp_path):
    run_case(tmp_path, "deny_overrides")


def test_acl_pattern_substitutes_client_id(tmp_path):
    run_case(tmp_path, "pattern_client_id")


def test_acl_pattern_substitutes_username_and_skips_anonymous(tmp_path):
    run_case(tmp_path, "pattern_username")


def test_acl_anonymous_gets_lines_before_first_user(tmp_path):
    run_case(tmp_path, "anonymous_lines_before_first_user")


def test_acl_unknown_user_gets_patterns_only(tmp_path):
    run_case(tmp_path, "unknown_user_gets_patterns_only")


def test_acl_no_matching_grant_is_denied(tmp_path):
    run_case(tmp_path, "no_grant_is_denied")


def test_acl_empty_file_denies_everything(tmp_path):
    run_case(tmp_path, "empty_file_denies_everything")


def test_sys_topics_not_writable(tmp_path):
    run_case(tmp_path, "sys_not_writable")


def test_sys_topics_need_a_dollar_grant_to_read(tmp_path):
    run_case(tmp_path, "sys_needs_dollar_grant")


def test_acl_wildcard_or_slash_in_id_cannot_widen_access(tmp_path):
    run_case(tmp_path, "substitution_cannot_widen")


def test_acl_client_id_or_username_starting_with_dollar_cannot_reach_sys(tmp_path):
    run_case(tmp_path, "leading_dollar_cannot_reach_sys")


def test_acl_unsafe_id_with_deny_pattern_fails_closed(tmp_path):
    run_case(tmp_path, "unsafe_value_fails_closed_on_deny_pattern")


def test_acl_client_id_reading_percent_u_stays_literal(tmp_path):
    run_case(tmp_path, "percent_u_in_client_id_stays_literal")


def test_acl_subscribe_allowed_only_when_grant_covers_filter(tmp_path):
    run_case(tmp_path, "subscribe_covered_by_grant")


def test_acl_subscribe_refused_when_deny_covers_it_partial_deny_filters_delivery(tmp_path):
    run_case(tmp_path, "subscribe_and_deny")


def test_acl_comments_and_blank_lines_ignored(tmp_path):
    run_case(tmp_path, "comments_and_blanks")


def test_acl_user_may_appear_twice(tmp_path):
    run_case(tmp_path, "user_listed_twice")


def test_acl_topic_and_username_may_contain_spaces(tmp_path):
    run_case(tmp_path, "spaces_in_topic_and_username")


def test_acl_lone_access_word_is_the_topic_name(tmp_path):
    run_case(tmp_path, "lone_access_word_is_topic")


@pytest.mark.parametrize(
    "text,line",
    [
        ("user u\ntopic read a\nsubscribe a\n", 3),
        ("# c\nuser\n", 2),
        ("topic\n", 1),
        ("\n\npattern   \n", 3),
        ("user u\ntopic read a/#/b\n", 2),
        ("topic write a+\n", 1),
        ("pattern read x/%c#\n", 1),
    ],
)
def test_acl_bad_line_names_file_and_line(tmp_path, text, line):
    p = tmp_path / "bad.acl"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        Acl.load(str(p))
    msg = str(e.value)
    assert str(p) in msg and ("line %d:" % line) in msg, msg


def test_acl_missing_file_gives_clear_error(tmp_path):
    with pytest.raises(ValueError) as e:
        Acl.load(str(tmp_path / "none.acl"))
    assert "none.acl" in str(e.value) and "cannot open" in str(e.value)


# covers(acl, sub) against brute force: sub is covered when every topic it
# matches in a small universe is matched by acl. Level "c" never appears in
# filters, so it stands for "any other name", and topics go one level deeper
# than any filter.
_LEVELS = ["a", "b", "+", "#"]


def _filters(max_len=3):
    out = []

    def grow(prefix):
        if prefix:
            out.append("/".join(prefix))
        if len(prefix) == max_len or (prefix and prefix[-1] == "#"):
            return
        for lv in _LEVELS:
            grow(prefix + [lv])

    grow([])
    return out


def _topics(max_len=4):
    out = []

    def grow(prefix):
        if prefix:
            out.append("/".join(prefix))
        if len(prefix) == max_len:
            return
        for lv in ("a", "b", "c", ""):
            grow(prefix + [lv])

    grow([])
    return out


FILTERS = _filters()
TOPICS = _topics()


def test_covers_agrees_with_brute_force():
    # Every pair of filters up to three levels deep.
    diff = []
    for acl in FILTERS:
        for sub in FILTERS:
            want = all(matches(acl, t) for t in TOPICS if matches(sub, t))
            got = covers(acl, sub)
            assert want or not got, ("grants more than the acl", acl, sub)
            if got != want:
                diff.append((acl, sub))
    # The one narrower answer: "+/#" does cover "#" in effect, but like
    # Mosquitto an acl "+" never covers a subscription "#".
    assert diff == [("+/#", "#")]


def test_covers_handles_dollar_topics():
    assert covers("$SYS/#", "$SYS/broker/+")
    assert not covers("#", "$SYS/#")
    assert not covers("+/broker", "$SYS/broker")
    assert not covers("$SYS/#", "#")


MP_SCRIPT = r"""
import json
from broker.acl import Acl
cases = json.load(open(DATA))
for name in sorted(cases):
    text, checks = cases[name]
    f = open(ACLFILE, "w"); f.write(text); f.close()
    acl = Acl.load(ACLFILE)
    for i, (op, cid, user, t, want) in enumerate(checks):
        if op == "w":
            got = acl.can_write(cid, user, t)
        elif op == "r":
            got = acl.can_read(cid, user, t)
        else:
            got = acl.can_subscribe(cid, user, t)
        print(("ok " if got == want else "FAIL ") + "%s[%d]" % (name, i))
try:
    f = open(ACLFILE, "w"); f.write("user u\nbogus line\n"); f.close()
    Acl.load(ACLFILE)
    print("FAIL bad_line")
except ValueError as e:
    print(("ok " if "line 2:" in str(e) else "FAIL ") + "bad_line")
"""


def test_acl_cases_under_micropython(tmp_path):
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(CASES))
    script = tmp_path / "mp_acl.py"
    script.write_text("DATA = %r\nACLFILE = %r\n" % (str(data), str(tmp_path / "acl")) + MP_SCRIPT)
    env = dict(os.environ, MICROPYPATH=".frozen")
    out = subprocess.run(
        [MICROPYTHON, "-X", "heapsize=110K", str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert not [x for x in lines if not x.startswith("ok ")], lines
    assert len(lines) == sum(len(c[1]) for c in CASES.values()) + 1
