/* lamina-img compare.  Exit 0 identical, 1 different, 2 error (as
 * qemu-img).  Mismatch offsets are reported at 512-byte granularity. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"

#define CMP_SECTOR 512

/* Status of [off, off+bytes) through the chain: *zero if it reads as
 * zeroes, *alloc if some layer allocates it.  Returns the extent length. */
static int64_t status(ImgImage *im, int64_t off, int64_t bytes, bool *zero,
                      bool *alloc)
{
    int64_t pnum = 0, map;
    LamNode *file;
    int depth = 0;
    int st = lam_co_block_status_above(im->root, NULL, off, bytes, &pnum, &map,
                                       &file, &depth);
    if (st < 0) {
        return st;
    }
    if (pnum <= 0 || pnum > bytes) {
        pnum = bytes;
    }
    *zero = (st & LAM_BS_ZERO) || depth == 0;
    *alloc = depth > 0;
    return pnum;
}

/* First differing offset (rounded down to 512) or -1. */
static int64_t first_diff(const uint8_t *a, const uint8_t *b, int64_t n)
{
    if (memcmp(a, b, n) == 0) {
        return -1;
    }
    for (int64_t i = 0; i < n; i += CMP_SECTOR) {
        int64_t l = n - i < CMP_SECTOR ? n - i : CMP_SECTOR;
        if (memcmp(a + i, b + i, l)) {
            return i;
        }
    }
    return -1;
}

static int64_t first_nonzero(const uint8_t *a, int64_t n)
{
    for (int64_t i = 0; i < n; i += CMP_SECTOR) {
        int64_t l = n - i < CMP_SECTOR ? n - i : CMP_SECTOR;
        if (!lam_buf_is_zero(a + i, l)) {
            return i;
        }
    }
    return -1;
}

/* Checks that the tail [from, to) of the longer image reads as zeroes. */
static int check_tail(ImgImage *im, int64_t from, int64_t to, uint8_t *buf,
                      bool strict, int64_t total, int64_t *done)
{
    for (int64_t off = from; off < to;) {
        bool z, al;
        int64_t n = status(im, off, to - off < IMG_BIG_CHUNK ? to - off : IMG_BIG_CHUNK,
                           &z, &al);
        if (n < 0) {
            img_error("Error while reading offset %lld of %s: %s",
                      (long long)off, im->filename, strerror((int)-n));
            return 2;
        }
        if (strict && al) {
            printf("Strict mode: Offset %lld block status mismatch!\n",
                   (long long)off);
            return 1;
        }
        if (!z) {
            if (n > IMG_CHUNK) {
                n = IMG_CHUNK;
            }
            int r = lam_co_pread(im->root, off, n, buf, 0);
            if (r < 0) {
                img_error("Error while reading offset %lld of %s: %s",
                          (long long)off, im->filename, strerror(-r));
                return 2;
            }
            int64_t d = first_nonzero(buf, n);
            if (d >= 0) {
                img_printf("Content mismatch at offset %lld!\n", (long long)(off + d));
                return 1;
            }
        }
        off += n;
        *done += n;
        img_progress_set(*done * 100.0 / total);
    }
    return 0;
}

int img_compare(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt1 = NULL, *fmt2 = NULL;
    bool strict = false, progress = false, share = false;
    int c, ret = 2;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:F:T:hpqsU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt1 = optarg; break;
        case 'F': fmt2 = optarg; break;
        case 'T': break;
        case 'p': progress = true; break;
        case 'q': img_quiet = true; break;
        case 's': strict = true; break;
        case 'U': share = true; break;
        case 'h':
            printf("usage: lamina-img compare [-f fmt] [-F fmt] [-p] [-q] [-s] "
                   "[-U] filename1 filename2\n");
            return 0;
        default:
            img_help_hint();
            return 2;
        }
    }
    if (optind != argc - 2) {
        img_error("Expecting two image file names");
        img_help_hint();
        return 2;
    }
    if (img_quiet) {
        progress = false;
    }
    ImgImage a, b;
    int of = share ? IMG_OPEN_SHARE : 0;
    if (img_open(&a, argv[optind], fmt1, of, NULL, NULL) < 0) {
        return 2;
    }
    if (img_open(&b, argv[optind + 1], fmt2, of, NULL, NULL) < 0) {
        img_close(&a);
        return 2;
    }
    uint8_t *ba = img_alloc_buf(IMG_CHUNK), *bb = img_alloc_buf(IMG_CHUNK);
    int64_t la = lam_node_length(a.node), lb = lam_node_length(b.node);
    if (!ba || !bb) {
        img_error("Out of memory");
        goto out;
    }
    if (la < 0 || lb < 0) {
        img_error("Can't get size of %s", la < 0 ? a.filename : b.filename);
        goto out;
    }
    int64_t common = la < lb ? la : lb, total = la > lb ? la : lb, done = 0;
    img_progress_start(progress);
    for (int64_t off = 0; off < common;) {
        bool za, aa, zb, ab;
        /* Ask about big ranges: zero ranges are passed over whole, only
         * ranges that must be read are cut to the buffer size. */
        int64_t want = common - off < IMG_BIG_CHUNK ? common - off : IMG_BIG_CHUNK;
        int64_t na = status(&a, off, want, &za, &aa);
        int64_t nb = na >= 0 ? status(&b, off, want, &zb, &ab) : 0;
        if (na < 0 || nb < 0) {
            img_error("Error while reading offset %lld: %s", (long long)off,
                      strerror((int)-(na < 0 ? na : nb)));
            goto out;
        }
        int64_t n = na < nb ? na : nb;
        if (strict && aa != ab) {
            printf("Strict mode: Offset %lld block status mismatch!\n", (long long)off);
            ret = 1;
            goto out;
        }
        if (!(za && zb)) {
            if (n > IMG_CHUNK) {
                n = IMG_CHUNK;
            }
            int r = lam_co_pread(a.root, off, n, ba, 0);
            if (r >= 0) {
                r = lam_co_pread(b.root, off, n, bb, 0);
            }
            if (r < 0) {
                img_error("Error while reading offset %lld: %s", (long long)off,
                          strerror(-r));
                goto out;
            }
            int64_t d = first_diff(ba, bb, n);
            if (d >= 0) {
                img_printf("Content mismatch at offset %lld!\n", (long long)(off + d));
                ret = 1;
                goto out;
            }
        }
        off += n;
        done += n;
        img_progress_set(done * 100.0 / total);
    }
    if (la != lb) {
        if (strict) {
            printf("Strict mode: Image size mismatch!\n");
            ret = 1;
            goto out;
        }
        img_printf("Warning: Image size mismatch!\n");
        ret = check_tail(la > lb ? &a : &b, common, total, ba, false, total, &done);
        if (ret) {
            goto out;
        }
    }
    img_progress_set(100.0);
    img_printf("Images are identical.\n");
    ret = 0;
out:
    img_progress_end();
    free(ba);
    free(bb);
    img_close(&b);
    img_close(&a);
    return ret;
}
