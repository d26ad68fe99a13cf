# Runs the broker on this host under the MicroPython unix port; what it
# does and its arguments: tools/hostrun.py, which the board twin has frozen
# in (this file is compiled from source, so it stays a few lines).
import sys

_tools = sys.argv[0].rsplit("/", 1)[0] if "/" in sys.argv[0] else "."
sys.path[:] = [".frozen"] + [p for p in sys.path if p != ".frozen"] + [_tools]
from hostrun import main  # noqa: E402

sys.exit(main(sys.argv, _tools + "/.."))
