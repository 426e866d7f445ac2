/* The copy bitmap: byte ranges rounded to bits, searches, counts, a
 * partial last bit; checked against a plain bool array.  TAP output. */
#include <stdio.h>
#include <stdlib.h>

#include "jobs/bitmap.h"

static int ntest, nfail;

static void ok(int cond, const char *what)
{
    ntest++;
    printf("%s %d - %s\n", cond ? "ok" : "not ok", ntest, what);
    nfail += !cond;
}

int main(void)
{
    const int64_t gran = 4096, len = 1000 * 4096 + 100; /* partial last bit */
    LamBitmap *b = lam_bitmap_new(len, gran);
    int64_t nbits = (len + gran - 1) / gran;
    char *ref = calloc((size_t)nbits, 1);
    ok(b && b->nbits == nbits, "new: bit count rounds up");
    ok(lam_bitmap_next_set(b, 0) == -1 && lam_bitmap_next_clear(b, 0) == 0, "starts clear");
    lam_bitmap_set(b, 0, len);
    ok(lam_bitmap_count_bytes(b) == len, "all set counts exactly len bytes");
    lam_bitmap_reset(b, 0, len);
    unsigned seed = 7;
    int bad = 0;
    for (int i = 0; i < 20000; i++) {
        int64_t off = rand_r(&seed) % (len + 8192) - 4096;
        int64_t bytes = rand_r(&seed) % (64 * 4096);
        int set = rand_r(&seed) & 1;
        if (set) {
            lam_bitmap_set(b, off, bytes);
        } else {
            lam_bitmap_reset(b, off, bytes);
        }
        /* the reference: same rounding-out rule, clipped */
        int64_t s = off < 0 ? 0 : off, e = off + bytes > len ? len : off + bytes;
        if (bytes > 0 && e > s) {
            for (int64_t k = s / gran; k < (e + gran - 1) / gran; k++) {
                ref[k] = (char)set;
            }
        }
        int64_t q = rand_r(&seed) % len;
        int64_t want_set = -1, want_clear = len;
        for (int64_t k = q / gran; k < nbits; k++) {
            if (ref[k] && want_set < 0) {
                want_set = k * gran;
            }
            if (!ref[k] && want_clear == len) {
                want_clear = k * gran > len ? len : k * gran;
            }
        }
        int64_t cnt = 0;
        for (int64_t k = 0; k < nbits; k++) {
            cnt += ref[k] ? (k == nbits - 1 ? len - k * gran : gran) : 0;
        }
        if (lam_bitmap_next_set(b, q) != want_set || lam_bitmap_next_clear(b, q) != want_clear ||
            lam_bitmap_count_bytes(b) != cnt || lam_bitmap_get(b, q) != ref[q / gran] ||
            lam_bitmap_any(b, q, gran * 3) !=
                (ref[q / gran] || (q / gran + 1 < nbits && ref[q / gran + 1]) ||
                 (q / gran + 2 < nbits && ref[q / gran + 2]) ||
                 ((q % gran) && q / gran + 3 < nbits && ref[q / gran + 3]))) {
            bad++;
        }
    }
    ok(bad == 0, "20000 random set/reset operations match a reference model");
    ok(lam_bitmap_new(-1, 512) == NULL && lam_bitmap_new(100, 0) == NULL, "bad arguments");
    lam_bitmap_free(b);
    free(ref);
    printf("1..%d\n", ntest);
    return nfail ? 1 : 0;
}
