// Mbed TLS settings of the "tlsheap" board twin (tools/twin.py --variant
// tlsheap). The unix port's own settings keep Mbed TLS on the C library's
// calloc, outside the MicroPython heap; the rp2 port sets
// MICROPY_MBEDTLS_CONFIG_BARE_METAL, so a Pico W pays for each TLS
// connection out of its Python heap (m_tracked_calloc). This header is the
// unix port's configuration with that one change, and with the host's
// entropy source, as the unix coverage build does it.
#ifndef MICROPY_INCLUDED_MBEDTLS_CONFIG_H
#define MICROPY_INCLUDED_MBEDTLS_CONFIG_H

#define MBEDTLS_CIPHER_MODE_CTR
#define MBEDTLS_TIMING_C
#define MICROPY_MBEDTLS_CONFIG_BARE_METAL (1)

#include "extmod/mbedtls/mbedtls_config_common.h"

// Bare metal means "the port supplies entropy"; the host has /dev/urandom.
#undef MBEDTLS_ENTROPY_HARDWARE_ALT
#undef MBEDTLS_NO_PLATFORM_ENTROPY

#endif
