# tools/passwd: mosquitto_passwd's options on our $p256$ format. Most tests
# run the script as a user would; the prompt and crash tests load it in
# process so getpass and os.replace can be replaced.
import importlib.machinery
import importlib.util
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "lib")
FIRMWARE = os.path.join(ROOT, "firmware")
TOOL = os.path.join(ROOT, "tools", "passwd")
# The board twin (conftest builds it first), with the code frozen into it.
from conftest import MICROPYTHON as _TWIN  # noqa: E402
MICROPYTHON = str(_TWIN)
for p in (LIB, FIRMWARE):
    if p not in sys.path:
        sys.path.insert(0, p)

import pwhash  # noqa: E402
from broker.auth import PasswordFile  # noqa: E402


def _check(pf, user, password):
    # PasswordFile.check_steps run to its verdict, as the broker's login() does.
    for ok in pf.check_steps(user, password):
        if ok is not None:
            return ok


def passwd(*args, cwd=None):
    # Run from an unrelated directory: the tool must find lib/ by itself.
    return subprocess.run(
        [TOOL] + [str(a) for a in args],
        capture_output=True,
        text=True,
        cwd=cwd or "/",
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def entries(path):
    out = {}
    for line in open(path).read().splitlines():
        if line and not line.startswith("#"):
            u, h = line.split(":", 1)
            out[u] = h
    return out


@pytest.fixture
def tool():
    loader = importlib.machinery.SourceFileLoader("passwd_tool", TOOL)
    spec = importlib.util.spec_from_loader("passwd_tool", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_passwd_is_an_executable_python3_script():
    assert os.access(TOOL, os.X_OK)
    assert open(TOOL).readline().strip() == "#!/usr/bin/env python3"


def test_passwd_create_then_verify(tmp_path):
    f = tmp_path / "pw"
    r = passwd("-c", "-b", f, "alice", "s3cret")
    assert r.returncode == 0, r.stderr
    e = entries(f)
    assert list(e) == ["alice"]
    assert e["alice"].startswith("$p256$%d$" % pwhash.DEFAULT_ITERATIONS)
    assert pwhash.verify("s3cret", e["alice"])
    assert not pwhash.verify("s3creT", e["alice"])
    pf = PasswordFile.load(str(f))
    assert _check(pf, "alice", b"s3cret") and not _check(pf, "alice", b"x")


def test_passwd_file_is_private(tmp_path):
    f = tmp_path / "pw"
    f.write_text("")
    os.chmod(f, 0o644)
    assert passwd("-b", f, "alice", "pw").returncode == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert passwd("-c", "-b", tmp_path / "new", "bob", "pw").returncode == 0
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o600


def test_passwd_create_overwrites_existing_file(tmp_path):
    f = tmp_path / "pw"
    passwd("-c", "-b", f, "alice", "a")
    assert passwd("-c", "-b", f, "bob", "b").returncode == 0
    assert list(entries(f)) == ["bob"]


def test_passwd_adds_and_updates_users_keeping_the_rest(tmp_path):
    f = tmp_path / "pw"
    passwd("-c", "-b", f, "alice", "a1")
    with open(f, "a") as fh:
        fh.write("# kept comment\n\n")
    assert passwd("-b", f, "bob", "b1").returncode == 0
    old_alice = entries(f)["alice"]
    assert passwd("-b", f, "bob", "b2").returncode == 0
    lines = open(f).read().splitlines()
    assert lines[0] == "alice:" + old_alice
    assert lines[1:3] == ["# kept comment", ""]
    assert lines[3].startswith("bob:")
    assert len(lines) == 4
    assert pwhash.verify("b2", entries(f)["bob"])
    assert not pwhash.verify("b1", entries(f)["bob"])


def test_passwd_delete_user(tmp_path):
    f = tmp_path / "pw"
    passwd("-c", "-b", f, "alice", "a")
    passwd("-b", f, "bob", "b")
    r = passwd("-D", f, "alice")
    assert r.returncode == 0, r.stderr
    assert list(entries(f)) == ["bob"]


def test_passwd_delete_unknown_user_fails(tmp_path):
    f = tmp_path / "pw"
    passwd("-c", "-b", f, "alice", "a")
    before = f.read_text()
    r = passwd("-D", f, "carol")
    assert r.returncode != 0
    assert "carol" in r.stderr and "not in" in r.stderr
    assert f.read_text() == before


def test_passwd_missing_file_without_c_fails(tmp_path):
    r = passwd("-b", tmp_path / "absent", "alice", "a")
    assert r.returncode != 0
    assert "does not exist" in r.stderr and "-c" in r.stderr
    assert not (tmp_path / "absent").exists()
    r = passwd("-U", tmp_path / "absent")
    assert r.returncode != 0 and "does not exist" in r.stderr


def test_passwd_upgrade_plain_file(tmp_path):
    f = tmp_path / "pw"
    hashed = pwhash.make_hash("already", 10)
    f.write_text("# users\nalice:plain one\n\nbob:pa:ss:word\ncarol:%s\r\ndave: spaced \n" % hashed)
    r = passwd("-U", f)
    assert r.returncode == 0, r.stderr
    lines = f.read_text().splitlines()
    assert lines[0] == "# users" and lines[2] == ""
    e = entries(f)
    assert e["carol"] == hashed  # left alone, not hashed twice
    assert pwhash.verify("plain one", e["alice"])
    assert pwhash.verify("pa:ss:word", e["bob"])
    assert pwhash.verify(" spaced ", e["dave"])
    pf = PasswordFile.load(str(f))
    assert _check(pf, "alice", b"plain one") and _check(pf, "carol", b"already")
    # A second run changes nothing.
    before = f.read_text()
    assert passwd("-U", f).returncode == 0
    assert f.read_text() == before


def test_passwd_upgrade_warns_about_mosquitto_hashes(tmp_path):
    f = tmp_path / "pw"
    f.write_text("old:$7$101$c2FsdA==$aGFzaA==\nnew:pw\n")
    r = passwd("-U", f)
    assert r.returncode == 0
    assert "line 1" in r.stderr and "old" in r.stderr
    e = entries(f)
    assert e["old"] == "$7$101$c2FsdA==$aGFzaA=="
    assert pwhash.verify("pw", e["new"])


def test_passwd_iteration_count_option(tmp_path):
    f = tmp_path / "pw"
    assert passwd("-I", "1234", "-c", "-b", f, "alice", "a").returncode == 0
    assert entries(f)["alice"].startswith("$p256$1234$")
    assert passwd("-B", "pico_w", "-b", f, "bob", "b").returncode == 0
    assert entries(f)["bob"].startswith("$p256$%d$" % pwhash.ITERATIONS["pico_w"])
    f.write_text("carol:plain\n")
    assert passwd("-U", "-I", "77", f).returncode == 0
    assert entries(f)["carol"].startswith("$p256$77$")


@pytest.mark.parametrize(
    "args",
    [
        ["-I", "0"],
        ["-I", "ten"],
        ["-I", "99999999"],
        ["-B", "esp8266"],
        ["-I", "5", "-B", "esp32"],
    ],
)
def test_passwd_rejects_bad_iteration_options(tmp_path, args):
    r = passwd(*args, "-c", "-b", tmp_path / "pw", "alice", "a")
    assert r.returncode != 0 and r.stderr.startswith("passwd: ")
    assert not (tmp_path / "pw").exists()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-c"],
        ["-c", "-D", "F", "u"],
        ["-b", "F", "u"],
        ["-D", "-b", "F", "u", "p"],
        ["-U", "F", "extra"],
        ["-Z", "F", "u"],
        ["F"],
    ],
)
def test_passwd_bad_command_line_prints_usage(tmp_path, args):
    args = [str(tmp_path / "pw") if a == "F" else a for a in args]
    r = passwd(*args)
    assert r.returncode != 0
    assert "usage: passwd" in r.stderr


@pytest.mark.parametrize("name", ["a:b", "#root", " lead", "trail ", ""])
def test_passwd_rejects_unusable_usernames(tmp_path, name):
    r = passwd("-c", "-b", tmp_path / "pw", name, "pw")
    assert r.returncode != 0 and "username" in r.stderr
    assert not (tmp_path / "pw").exists()


def test_passwd_rejects_empty_password(tmp_path):
    r = passwd("-c", "-b", tmp_path / "pw", "alice", "")
    assert r.returncode != 0 and "empty password" in r.stderr


def test_passwd_prompts_twice(tool, tmp_path, monkeypatch):
    prompts = []
    answers = iter(["typed pw", "typed pw"])

    def fake(prompt="Password: "):
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(tool.getpass, "getpass", fake)
    f = tmp_path / "pw"
    assert tool.main(["-c", str(f), "alice"]) == 0
    assert len(prompts) == 2
    assert pwhash.verify("typed pw", entries(f)["alice"])


def test_passwd_prompt_mismatch_fails_and_writes_nothing(tool, tmp_path, monkeypatch, capsys):
    answers = iter(["one", "two"])
    monkeypatch.setattr(tool.getpass, "getpass", lambda prompt="": next(answers))
    f = tmp_path / "pw"
    assert tool.main(["-c", str(f), "alice"]) == 1
    assert "do not match" in capsys.readouterr().err
    assert not f.exists()


def test_passwd_write_is_atomic(tool, tmp_path, monkeypatch):
    f = tmp_path / "pw"
    assert tool.main(["-c", "-b", str(f), "alice", "a"]) == 0
    before = f.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tool.os, "replace", crash)
    with pytest.raises(OSError):
        tool.main(["-b", str(f), "bob", "b"])
    assert f.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["pw"]  # no temp file left behind


MP_SCRIPT = r"""
from broker.auth import PasswordFile
def _check(pf, user, password):
    for ok in pf.check_steps(user, password, 16):
        if ok is not None:
            return ok
pf = PasswordFile.load(PWFILE)
print(len(pf), _check(pf, "alice", b"from the tool"), _check(pf, "bob", "zweites"), _check(pf, "alice", b"nope"))
"""


def test_passwd_file_loads_in_broker_under_micropython(tmp_path):
    f = tmp_path / "pw"
    assert passwd("-B", "esp32", "-c", "-b", f, "alice", "from the tool").returncode == 0
    assert passwd("-I", "50", "-b", f, "bob", "zweites").returncode == 0
    script = tmp_path / "mp.py"
    script.write_text("PWFILE = %r\n" % str(f) + MP_SCRIPT)
    env = dict(os.environ, MICROPYPATH=".frozen")
    out = subprocess.run(
        [MICROPYTHON, "-X", "heapsize=110K", str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "True", "True", "False"]
