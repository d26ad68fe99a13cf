# Freezes the broker into a custom MicroPython firmware (see boards/README.md):
#     make -C ports/esp32 BOARD=ESP32_GENERIC FROZEN_MANIFEST=/path/to/repo/manifest.py
# Frozen bytecode runs from flash and costs no heap to load, unlike .mpy
# files copied to the filesystem. Relative paths are relative to this file.

# The port's own frozen modules come first: asyncio, and on esp32 the
# _boot/inisetup modules that make the filesystem. A FROZEN_MANIFEST
# replaces the board's manifest, so leaving this out breaks the firmware.
include("$(PORT_DIR)/boards/manifest.py")

package("mqtt", base_path="lib")
module("pwhash.py", base_path="lib")
package("broker", base_path="firmware")
module("board.py", base_path="firmware")
module("logring.py", base_path="firmware")
module("gateway.py", base_path="firmware")
# firmware/main.py is not frozen: a frozen main.py runs in place of /main.py,
# so it could not be changed without a new firmware. It is one call into
# gateway.py, frozen above. Copy it to the board:
#     mpremote connect PORT cp firmware/main.py :main.py
