/* A plain bitmap over a byte range with a fixed granularity: bit i covers
 * bytes [i*gran, (i+1)*gran).  Not thread safe: its owner locks. */
#ifndef LAMINA_JOBS_BITMAP_H
#define LAMINA_JOBS_BITMAP_H

#include <stdbool.h>
#include <stdint.h>

typedef struct LamBitmap {
    int64_t len;       /* bytes covered */
    int64_t gran;      /* bytes per bit, > 0 */
    int64_t nbits;
    int64_t nset;      /* number of set bits */
    uint64_t *words;
} LamBitmap;

/* NULL on allocation failure or bad arguments. */
LamBitmap *lam_bitmap_new(int64_t len, int64_t gran);
void lam_bitmap_free(LamBitmap *b);
/* Byte ranges are rounded out to whole bits and clipped to len. */
void lam_bitmap_set(LamBitmap *b, int64_t off, int64_t bytes);
void lam_bitmap_reset(LamBitmap *b, int64_t off, int64_t bytes);
bool lam_bitmap_get(const LamBitmap *b, int64_t off);
/* Byte offset (bit-aligned) of the first set bit at or after off, -1 if none. */
int64_t lam_bitmap_next_set(const LamBitmap *b, int64_t off);
/* First clear bit at or after off, or len if none. */
int64_t lam_bitmap_next_clear(const LamBitmap *b, int64_t off);
/* Bytes covered by set bits (the last bit counts only up to len). */
int64_t lam_bitmap_count_bytes(const LamBitmap *b);
/* True if any bit in the byte range is set. */
bool lam_bitmap_any(const LamBitmap *b, int64_t off, int64_t bytes);

#endif
