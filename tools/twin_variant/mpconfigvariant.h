// The board twin's build of the unix port (tools/twin.py): the standard
// variant, with two changes that make it behave as a board does: this one,
// and a heap below 2**31 (twin_heap.c, added by mpconfigvariant.mk).
#define MICROPY_CONFIG_ROM_LEVEL (MICROPY_CONFIG_ROM_LEVEL_EXTRA_FEATURES)

#include "variants/mpconfigvariant_common.h"

// Ctrl-C (SIGINT) raises KeyboardInterrupt between two bytecodes, as on the
// ESP32 and RP2 ports, not from the signal handler at whatever C code runs.
// Raised from inside a garbage collection, it left the collector's flag set:
// the heap stayed locked, the broker's final save failed with "heap is
// locked" and it exited 1 (a stop at a full heap, about one run in three).
#undef MICROPY_ASYNC_KBD_INTR
#define MICROPY_ASYNC_KBD_INTR (0)
