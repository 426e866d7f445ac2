/* lamina-img rebase.
 *
 * Safe mode keeps the guest-visible content: every cluster the overlay
 * does not allocate itself and whose content differs between the old
 * backing chain and the new backing file is copied into the overlay before
 * the header is changed.  Unsafe mode (-u) changes the header only. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* Length from off that reads as zeroes both through the image's old chain
 * and in the new backing file (0 if either has data there), or -1. */
static int64_t zero_both(ImgImage *ov, ImgImage *nb, int64_t nb_size,
                         int64_t off, int64_t bytes)
{
    int64_t pa = 0, pb = bytes, map;
    LamNode *file;
    int depth;
    int st = lam_co_block_status_above(ov->root, NULL, off, bytes, &pa, &map,
                                       &file, &depth);
    if (st < 0) {
        img_error("error while reading image metadata: %s", strerror(-st));
        return -1;
    }
    if (!((st & LAM_BS_ZERO) || depth == 0) || pa <= 0) {
        return 0;
    }
    if (nb && off < nb_size) {
        st = lam_co_block_status_above(nb->root, NULL, off,
                                       min64(bytes, nb_size - off), &pb, &map,
                                       &file, &depth);
        if (st < 0) {
            img_error("error while reading image metadata: %s", strerror(-st));
            return -1;
        }
        if (!((st & LAM_BS_ZERO) || depth == 0) || pb <= 0) {
            return 0;
        }
    }
    return min64(pa, pb);
}

/* Copies what differs between the old chain and the new backing. */
static int copy_differences(ImgImage *ov, ImgImage *nb)
{
    int64_t size = lam_node_length(ov->node);
    int64_t nb_size = nb ? lam_node_length(nb->node) : 0;
    int64_t gran = img_cluster_size(ov->node);
    int64_t chunk = IMG_CHUNK;
    int ret = 0;

    if (size < 0 || nb_size < 0) {
        img_error("Could not get the size of the images");
        return -1;
    }
    if (gran <= 0) {
        gran = 65536;
    }
    if (gran > chunk) {
        chunk = gran;
    }
    uint8_t *a = img_alloc_buf(chunk), *b = img_alloc_buf(chunk);
    if (!a || !b) {
        img_error("Out of memory");
        free(a);
        free(b);
        return -1;
    }
    for (int64_t off = 0; off < size;) {
        int64_t pnum = 0, map;
        LamNode *file;
        int64_t want = min64(IMG_BIG_CHUNK, size - off);
        int st = lam_co_block_status(ov->root, off, want, &pnum, &map, &file);
        if (st < 0) {
            img_error("error while reading image metadata: %s", strerror(-st));
            ret = -1;
            break;
        }
        if (pnum <= 0 || pnum > want) {
            pnum = want;
        }
        if (st & LAM_BS_ALLOCATED) {
            off += pnum;
            img_progress_set(off * 100.0 / size);
            continue;
        }
        /* Both sides reading as zeroes need no comparison. */
        int64_t zn = zero_both(ov, nb, nb_size, off, pnum);
        if (zn < 0) {
            ret = -1;
            break;
        }
        if (zn > 0) {
            off += zn;
            img_progress_set(off * 100.0 / size);
            continue;
        }
        /* Compare whole clusters so writes never need copy-on-write. */
        int64_t start = off / gran * gran;
        int64_t end = min64((off + pnum + gran - 1) / gran * gran, size);
        if (end - start > chunk) {
            end = start + chunk;
        }
        int64_t n = end - start;
        int r = lam_co_pread(ov->root, start, n, a, 0);
        if (r >= 0) {
            memset(b, 0, n);
            if (start < nb_size) {
                r = lam_co_pread(nb->root, start, min64(n, nb_size - start), b, 0);
            }
        }
        if (r < 0) {
            img_error("error while reading from old backing file: %s", strerror(-r));
            ret = -1;
            break;
        }
        for (int64_t p = 0; p < n; p += gran) {
            int64_t l = min64(gran, n - p);
            if (memcmp(a + p, b + p, l) == 0) {
                continue;
            }
            /* Coalesce consecutive differing clusters. */
            int64_t q = p + l;
            while (q < n && memcmp(a + q, b + q, min64(gran, n - q))) {
                q += min64(gran, n - q);
            }
            r = lam_co_pwrite(ov->root, start + p, q - p, a + p, 0);
            if (r < 0) {
                img_error("error while writing to COW image: %s", strerror(-r));
                ret = -1;
                goto out;
            }
            p = q - gran;
        }
        off = end;
        img_progress_set(off * 100.0 / size);
    }
out:
    free(a);
    free(b);
    return ret;
}

int img_rebase(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL, *backing = NULL, *backing_fmt = NULL;
    bool unsafe = false, progress = false, share = false;
    int c, ret = 1;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:F:b:upqt:T:Uh", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'F': backing_fmt = optarg; break;
        case 'b': backing = optarg; break;
        case 'u': unsafe = true; break;
        case 'p': progress = true; break;
        case 'q': img_quiet = true; break;
        case 'U': share = true; break;
        case 't': case 'T': break;
        case 'h':
            printf("usage: lamina-img rebase [-U] [-q] [-f fmt] [-p] [-u] "
                   "-b backing_file [-F backing_fmt] filename\n");
            return 0;
        default:
            img_help_hint();
            return 1;
        }
    }
    if (optind != argc - 1) {
        img_error("Expecting one image file name");
        img_help_hint();
        return 1;
    }
    if (!backing) {
        img_error("Must specify backing file (-b) or use unsafe mode (-u)");
        return 1;
    }
    if (img_quiet) {
        progress = false;
    }
    const char *filename = argv[optind];
    bool remove = !*backing;
    if (remove) {
        backing = NULL;
        backing_fmt = NULL;
    }
    /* Checked before anything is copied: the header change needs it. */
    if (backing && !backing_fmt) {
        img_error("Could not change the backing file to '%s': backing format "
                  "must be specified", backing);
        return 1;
    }
    ImgImage ov, nb = {0};
    int of = IMG_OPEN_RW | (unsafe ? IMG_OPEN_NO_BACKING : 0) |
             (share ? IMG_OPEN_SHARE : 0);
    if (img_open(&ov, filename, fmt, of, NULL, NULL) < 0) {
        return 1;
    }
    char detected[64] = "";
    if (!unsafe) {
        if (backing) {
            char *full = lam_path_combine(filename, backing);
            LamError *err = NULL;
            int r = img_open(&nb, full, backing_fmt, IMG_OPEN_SHARE |
                             IMG_OPEN_QUIET_ERR, NULL, &err);
            free(full);
            if (r < 0) {
                img_error_free(err, "Could not open new backing file '%s': ",
                               backing);
                goto out;
            }
            snprintf(detected, sizeof(detected), "%s", lam_node_format(nb.node));
            if (!backing_fmt) {
                backing_fmt = detected;
            }
        }
        img_progress_start(progress);
        int r = copy_differences(&ov, backing ? &nb : NULL);
        if (r == 0) {
            img_progress_set(100.0);
        }
        img_progress_end();
        if (r < 0) {
            goto out;
        }
        if (lam_co_flush(ov.root) < 0) {
            img_error("Could not flush '%s'", filename);
            goto out;
        }
    }
    LamError *err = NULL;
    if (lam_node_change_backing_file(ov.node, backing, backing_fmt, &err) < 0) {
        if (backing) {
            img_error_free(err, "Could not change the backing file to '%s': ",
                           backing);
        } else {
            img_error_free(err, "Could not change the backing file: ");
        }
        goto out;
    }
    ret = 0;
out:
    if (nb.node) {
        img_close(&nb);
    }
    if (ret == 0 && lam_node_flush_all(ov.node) < 0) {
        img_error("Could not flush '%s'", filename);
        ret = 1;
    }
    img_close(&ov);
    return ret;
}
