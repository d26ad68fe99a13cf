# A stand-in for MicroPython's `machine` module, for running the real
# firmware/board.py under the unix port (whose own `machine` has no WDT,
# reset or reset_cause). Constants follow the esp32 port.
PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

cause = PWRON_RESET  # what reset_cause() reports; tests set it
resets = []  # one entry per reset() call
wdts = []  # every WDT made, newest last
timers = []


class Reset(BaseException):
    # Raised by reset() so a test sees it and nothing swallows it.
    pass


def reset_cause():
    return cause


def reset():
    resets.append(1)
    raise Reset()


def unique_id():
    return b"\xde\xad\xbe\xef\x12\x34"


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.feeds = 0
        wdts.append(self)

    def feed(self):
        self.feeds += 1


class Timer:
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1, mode=PERIODIC, period=1000, callback=None):
        self.id = id
        self.mode = mode
        self.period = period
        self.callback = callback
        self.running = True
        timers.append(self)

    def deinit(self):
        self.running = False

    def fire(self):
        # Test helper: what the hardware does every period.
        if self.running and self.callback:
            self.callback(self)
