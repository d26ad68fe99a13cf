"""Fixtures shared by the broker test modules: one broker per module,
configured by the module's CONFIG dict, and a check after every test that
it is still alive. Use: `from brokerfixtures import broker, still_alive`.
A module with a `broker` fixture of its own, not used by every test,
imports `broker_survives` instead."""
import pytest

from brokerproc import BrokerProc


@pytest.fixture(scope="module")
def broker(request):
    cfg = getattr(request.module, "CONFIG", {})
    with BrokerProc(board="esp32", config=cfg) as b:
        yield b


@pytest.fixture(autouse=True)
def still_alive(broker):
    yield
    assert broker.alive(), "broker died:\n" + broker.log()[-3000:]


@pytest.fixture(autouse=True)
def broker_survives(request):
    # After each test that used the module's `broker`: alive, and no
    # traceback in its log.
    yield
    if "broker" in request.fixturenames:
        b = request.getfixturevalue("broker")
        assert b.alive(), "broker died:\n" + b.log()[-3000:]
        assert "Traceback" not in b.log(), b.log()[-3000:]
