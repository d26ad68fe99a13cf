"""Topic names and filters (lib/mqtt/topic.py): spec cases, MicroPython parity, properties.

The cases are in host_tests/vectors/topic.json (spec 3.1.1 / 5.0 §4.7 and
5.0 §4.8.2) so that mp_codec_runner.py runs the same ones in MicroPython.
"""
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIB = os.path.join(ROOT, "lib")
for _p in (LIB, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import mp_codec_runner as R  # noqa: E402
from mqtt import topic as T  # noqa: E402

TOPIC_JSON = os.path.join(HERE, "vectors", "topic.json")
CASES = list(R.load_file(TOPIC_JSON))
# The board twin (conftest builds it first), with the code frozen into it.
from conftest import MICROPYTHON as _TWIN  # noqa: E402
MICROPYTHON = str(_TWIN)


def _of(func):
    vs = [v for v in CASES if v["func"] == func]
    return pytest.mark.parametrize("v", vs, ids=[v["name"] for v in vs])


@_of("valid_topic")
def test_valid_topic_spec_case(v):
    assert T.valid_topic(*v["args"]) is v["expected"]


@_of("valid_filter")
def test_valid_filter_spec_case(v):
    assert T.valid_filter(*v["args"]) is v["expected"]


@_of("matches")
def test_matches_spec_case(v):
    assert T.matches(*v["args"]) is v["expected"]


@_of("split_shared")
def test_split_shared_spec_case(v):
    assert list(T.split_shared(*v["args"])) == v["expected"]


def test_topic_cases_cover_every_function_and_both_answers():
    for func in ("valid_topic", "valid_filter", "matches"):
        answers = {v["expected"] for v in CASES if v["func"] == func}
        assert answers == {True, False}, func
    assert any(v["expected"][0] for v in CASES if v["func"] == "split_shared")
    assert any(v["expected"] == [None, None] for v in CASES if v["func"] == "split_shared")


def test_dollar_topics_are_not_matched_by_leading_wildcards():
    # [MQTT-4.7.2-1]
    for f in ("#", "+", "+/#", "+/+", "+/monitor/Clients"):
        assert not T.matches(f, "$SYS/monitor/Clients")
    assert T.matches("$SYS/+/Clients", "$SYS/monitor/Clients")


# ---------------------------------------------------------------- MicroPython

@pytest.fixture(scope="module")
def mp_lines():
    env = dict(os.environ, MICROPYPATH=".frozen")
    p = subprocess.run([MICROPYTHON, "-X", "heapsize=110K", os.path.join(HERE, "mp_codec_runner.py"), TOPIC_JSON],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.stderr == ""
    out = {}
    for line in p.stdout.splitlines():
        name = line[:-3] if line.endswith(" OK") else line[:line.index(" FAIL ")]
        out[name] = line
    return out


def test_micropython_runs_every_topic_case(mp_lines):
    assert sorted(mp_lines) == sorted(v["name"] for v in CASES)


@pytest.mark.parametrize("v", CASES, ids=[v["name"] for v in CASES])
def test_micropython_topic_result_equals_cpython(v, mp_lines):
    assert mp_lines.get(v["name"]) == R.result_line(v)


# ---------------------------------------------------------------- properties
# Reference definitions written from §4.7 level by level, compared with the
# character-walking implementation on generated topics and filters.

def ref_valid_topic(t):
    return len(t) > 0 and "+" not in t and "#" not in t


def ref_valid_filter(f):
    if not f:
        return False
    levels = f.split("/")
    for i, lv in enumerate(levels):
        if lv == "#":
            if i != len(levels) - 1:
                return False
        elif lv != "+" and ("+" in lv or "#" in lv):
            return False
    return True


def ref_matches(f, t):
    if t.startswith("$") and f[:1] in ("+", "#"):
        return False
    fl = f.split("/")
    tl = t.split("/")
    for i, lv in enumerate(fl):
        if lv == "#":
            return True
        if i >= len(tl):
            return False
        if lv != "+" and lv != tl[i]:
            return False
    return len(fl) == len(tl)


LEVEL = st.sampled_from(["a", "b", "", "ab", "$SYS", "x y", "é"])
FILTER_LEVEL = st.one_of(LEVEL, st.just("+"))
TOPICS = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(bool)


@st.composite
def filters(draw):
    levels = draw(st.lists(FILTER_LEVEL, min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "#"


RAW = st.text(alphabet="ab/+#$ ", max_size=8)


@settings(max_examples=200, deadline=None)
@given(filters(), TOPICS)
def test_matches_agrees_with_a_level_by_level_reference(f, t):
    assert T.valid_filter(f)
    assert T.matches(f, t) == ref_matches(f, t)


@settings(max_examples=150, deadline=None)
@given(RAW)
def test_valid_filter_and_valid_topic_agree_with_reference(s):
    assert T.valid_filter(s) == ref_valid_filter(s)
    assert T.valid_topic(s) == ref_valid_topic(s)


@settings(max_examples=100, deadline=None)
@given(TOPICS)
def test_every_topic_is_a_filter_that_matches_itself(t):
    assert T.valid_topic(t)
    assert T.valid_filter(t)
    assert T.matches(t, t)
    assert T.matches("#", t) == (not t.startswith("$"))


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="gx1é", min_size=1, max_size=6), filters())
def test_split_shared_returns_share_name_and_filter(group, f):
    assert T.split_shared("$share/%s/%s" % (group, f)) == (group, f)
    assert T.split_shared(f) == (None, f)
