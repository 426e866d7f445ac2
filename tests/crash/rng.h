/* A small deterministic PRNG (splitmix64): the same seed gives the same
 * workload and the same cut points on every machine. */
#ifndef LAMINA_CRASH_RNG_H
#define LAMINA_CRASH_RNG_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct Rng {
    uint64_t s;
} Rng;

static inline void rng_seed(Rng *r, uint64_t seed)
{
    r->s = seed ^ 0x6a09e667f3bcc909ULL;
}

static inline uint64_t rng_next(Rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [0, n); n > 0. */
static inline uint64_t rng_below(Rng *r, uint64_t n)
{
    return n ? rng_next(r) % n : 0;
}

static inline void rng_fill(Rng *r, uint8_t *buf, size_t len)
{
    while (len >= 8) {
        uint64_t v = rng_next(r);
        memcpy(buf, &v, 8);
        buf += 8;
        len -= 8;
    }
    if (len) {
        uint64_t v = rng_next(r);
        memcpy(buf, &v, len);
    }
}

#endif
