# The board's entry point: a board runs /main.py from source at boot, so
# what it does lives in gateway.py (frozen, or a .mpy) and this stays one
# call. Replace this file to run something else at boot.
import gateway

gateway.start()
