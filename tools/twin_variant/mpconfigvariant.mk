# The board twin's variant (see mpconfigvariant.h); tools/twin.py passes the
# frozen manifest and the 32-bit flags.

# The heap from brk, below 2**31 as on a board (twin_heap.c says why).
SRC_C += $(VARIANT_DIR)/twin_heap.c

# Frozen code compiled for this machine's 32-bit x86, as a board's firmware
# build compiles it for the board's (the esp32 port passes -march=xtensawin):
# the functions marked @micropython.native become machine code.
MPY_CROSS_FLAGS += -march=x86
