"""Fixtures shared by the broker test modules: one broker per module,
configured by the module's CONFIG dict, and a check after every test that
it is still alive. Use: `from brokerfixtures import broker, still_alive`."""
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
