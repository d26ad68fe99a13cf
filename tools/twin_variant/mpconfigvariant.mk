# The board twin's variant (see mpconfigvariant.h); tools/twin.py passes the
# frozen manifest and the 32-bit flags.

# The heap from brk, below 2**31 as on a board (twin_heap.c says why).
SRC_C += $(VARIANT_DIR)/twin_heap.c
