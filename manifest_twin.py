# The board twin's frozen modules (tools/twin.py, `make twin`): the unix
# port of MicroPython built 32-bit with this project frozen in, so the
# broker runs on the host the way it runs from a board's flash. It freezes
# what manifest.py freezes for a board, on top of what a board's own port
# manifest brings (asyncio, ssl). Relative paths are relative to this file.
include("tools/twin_stock_manifest.py")

package("mqtt", base_path="lib")
module("pwhash.py", base_path="lib")
package("broker", base_path="firmware")
module("board.py", base_path="firmware")
module("logring.py", base_path="firmware")
module("gateway.py", base_path="firmware")
# The host runner (tools/mp_host.py's code), frozen as a board freezes
# gateway.py, so that it takes none of the heap the broker is measured in.
module("hostrun.py", base_path="tools")
