/* Default cache sizes: the L2 cache covers the whole disk up to 32 MiB of
 * tables; the refcount cache is a quarter of it, at least 4 clusters. */
#ifndef LAMINA_QCOW2_CACHE_SIZES_H
#define LAMINA_QCOW2_CACHE_SIZES_H

#include <stdint.h>

#define QCOW2_DEFAULT_L2_CACHE_MAX (32ll * 1024 * 1024)

static inline void qc_cache_sizes(int64_t cs, int64_t size, int64_t l2_entries,
                                  int64_t l2_bytes, int64_t rb_bytes, int *n_l2,
                                  int *n_rb)
{
    int64_t tables = (size + cs * l2_entries - 1) / (cs * l2_entries) + 1;
    int64_t l2 = l2_bytes > 0 ? l2_bytes / cs : tables;
    int64_t max = QCOW2_DEFAULT_L2_CACHE_MAX / cs;
    if (l2_bytes <= 0 && l2 > max) {
        l2 = max;
    }
    if (l2 < 4) {
        l2 = 4;
    }
    if (l2 > 65536) {
        l2 = 65536;
    }
    int64_t rb = rb_bytes > 0 ? rb_bytes / cs : l2 / 4;
    if (rb < 4) {
        rb = 4;
    }
    if (rb > 16384) {
        rb = 16384;
    }
    *n_l2 = (int)l2;
    *n_rb = (int)rb;
}

#endif
