# What a stock MicroPython firmware for the esp32 and rp2 ports freezes
# that the broker uses: asyncio, and ssl over the C `tls` module. The
# stock twin (tools/twin.py) has only this, like a board that loads the
# broker from .mpy files; manifest_twin.py adds the broker to it.
include("$(MPY_DIR)/extmod/asyncio")
require("ssl")
