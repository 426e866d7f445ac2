/* Bitmap with byte-range helpers (see bitmap.h). */
#include <stdlib.h>

#include "jobs/bitmap.h"

LamBitmap *lam_bitmap_new(int64_t len, int64_t gran)
{
    if (len < 0 || gran <= 0) {
        return NULL;
    }
    LamBitmap *b = calloc(1, sizeof(*b));
    if (!b) {
        return NULL;
    }
    b->len = len;
    b->gran = gran;
    b->nbits = (len + gran - 1) / gran;
    b->words = calloc((size_t)(b->nbits + 63) / 64 + 1, sizeof(uint64_t));
    if (!b->words) {
        free(b);
        return NULL;
    }
    return b;
}

void lam_bitmap_free(LamBitmap *b)
{
    if (b) {
        free(b->words);
        free(b);
    }
}

/* Bit range [*first, *end) covering the byte range, clipped. */
static bool bit_range(const LamBitmap *b, int64_t off, int64_t bytes, int64_t *first,
                      int64_t *end)
{
    if (off < 0) {
        bytes += off;
        off = 0;
    }
    if (bytes <= 0 || off >= b->len) {
        return false;
    }
    if (bytes > b->len - off) {
        bytes = b->len - off;
    }
    *first = off / b->gran;
    *end = (off + bytes + b->gran - 1) / b->gran;
    return true;
}

static void change(LamBitmap *b, int64_t off, int64_t bytes, bool set)
{
    int64_t i, end;
    if (!bit_range(b, off, bytes, &i, &end)) {
        return;
    }
    while (i < end) {
        uint64_t *w = &b->words[i / 64];
        int sh = (int)(i % 64);
        int64_t n = end - i < 64 - sh ? end - i : 64 - sh;
        uint64_t mask = (n == 64 ? ~0ULL : ((1ULL << n) - 1)) << sh;
        uint64_t before = *w;
        *w = set ? (before | mask) : (before & ~mask);
        int delta = __builtin_popcountll(*w) - __builtin_popcountll(before);
        b->nset += delta;
        i += n;
    }
}

void lam_bitmap_set(LamBitmap *b, int64_t off, int64_t bytes)
{
    change(b, off, bytes, true);
}

void lam_bitmap_reset(LamBitmap *b, int64_t off, int64_t bytes)
{
    change(b, off, bytes, false);
}

bool lam_bitmap_get(const LamBitmap *b, int64_t off)
{
    if (off < 0 || off >= b->len) {
        return false;
    }
    int64_t i = off / b->gran;
    return (b->words[i / 64] >> (i % 64)) & 1;
}

static int64_t next_bit(const LamBitmap *b, int64_t i, bool want_set)
{
    while (i < b->nbits) {
        uint64_t w = b->words[i / 64];
        if (!want_set) {
            w = ~w;
        }
        w &= ~0ULL << (i % 64);
        if (w) {
            int64_t bit = (i / 64) * 64 + __builtin_ctzll(w);
            return bit < b->nbits ? bit : b->nbits;
        }
        i = (i / 64 + 1) * 64;
    }
    return b->nbits;
}

int64_t lam_bitmap_next_set(const LamBitmap *b, int64_t off)
{
    if (off < 0) {
        off = 0;
    }
    if (off >= b->len || b->nset == 0) {
        return -1;
    }
    int64_t bit = next_bit(b, off / b->gran, true);
    return bit >= b->nbits ? -1 : bit * b->gran;
}

int64_t lam_bitmap_next_clear(const LamBitmap *b, int64_t off)
{
    if (off < 0) {
        off = 0;
    }
    if (off >= b->len) {
        return b->len;
    }
    int64_t bit = next_bit(b, off / b->gran, false);
    int64_t r = bit * b->gran;
    return r > b->len ? b->len : r;
}

int64_t lam_bitmap_count_bytes(const LamBitmap *b)
{
    int64_t bytes = b->nset * b->gran;
    if (b->nbits && lam_bitmap_get(b, (b->nbits - 1) * b->gran)) {
        bytes -= b->nbits * b->gran - b->len; /* partial last bit */
    }
    return bytes;
}

bool lam_bitmap_any(const LamBitmap *b, int64_t off, int64_t bytes)
{
    int64_t first, end;
    if (!bit_range(b, off, bytes, &first, &end)) {
        return false;
    }
    return next_bit(b, first, true) < end;
}
