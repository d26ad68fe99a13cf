# Logging: a level and a list of sinks. No framework: the boards have no
# `logging` module and a handful of functions cost almost no heap.
# A sink is a callable taking one finished line (str); the console sink
# prints it. The board layer may add a flash ring sink.
from micropython import const

DEBUG = const(10)
INFO = const(20)
WARNING = const(30)
ERROR = const(40)
_NAMES = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
_TAGS = {DEBUG: "D", INFO: "I", WARNING: "W", ERROR: "E"}

level = INFO
_sinks = [print]


def set_level(name):
    global level
    level = _NAMES[name]


def add_sink(fn):
    _sinks.append(fn)


def set_sinks(fns):
    _sinks[:] = fns


def _emit(lv, fmt, args):
    # Never raises: a line the heap has no room for is dropped. Log calls
    # sit in the error paths of tasks that must not die (the store's
    # committer once died of its own warning, and nothing was written
    # again).
    try:
        try:
            line = (fmt % args) if args else fmt
        except Exception:
            line = fmt
        line = "%s %s" % (_TAGS[lv], line)
    except MemoryError:
        return
    for s in _sinks:
        try:
            s(line)
        except Exception:
            pass


def notice(fmt, *args):
    # Start-up and shutdown lines: shown whatever the level.
    _emit(INFO, fmt, args)


def debug(fmt, *args):
    if level <= DEBUG:
        _emit(DEBUG, fmt, args)


def info(fmt, *args):
    if level <= INFO:
        _emit(INFO, fmt, args)


def warning(fmt, *args):
    if level <= WARNING:
        _emit(WARNING, fmt, args)


def error(fmt, *args):
    if level <= ERROR:
        _emit(ERROR, fmt, args)
