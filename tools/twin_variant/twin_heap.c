// The board twin's heap lies below 2**31, as a board's RAM does (below
// 2**30 there). glibc maps a block larger than its mmap threshold (128 KiB)
// near the top of a 32-bit address space; every heap above the esp32's
// went there. id() of an object at or above 2**31 is no small int, so each
// call, and each poll of a socket (modselect.c keys its map so), made an
// int object that no board makes: 60 to 150 B per message. Without mmap,
// glibc takes every block from brk, just above the binary (near 2**30 for
// a 32-bit PIE: id() is negative there, a small int all the same).
#include <malloc.h>

__attribute__((constructor)) static void twin_heap_low(void) {
    mallopt(M_MMAP_MAX, 0);
}
