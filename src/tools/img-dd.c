/* lamina-img dd: copies a range of an image into a new image.
 *
 * Same arithmetic as qemu-img dd: the copy covers input bytes
 * [skip * bs, count * bs) (count counts from the start of the input, the
 * skipped blocks included), or up to the end of the input without count.
 * A skip past that end is reported and gives an empty output. */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"
#include "tools/img-fmtopts.h"

static int parse_count(const char *s, int64_t *out)
{
    char *end;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || v < 0) {
        return -1;
    }
    *out = v;
    return 0;
}

int img_dd(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL, *out_fmt = "raw", *in_name = NULL, *out_name = NULL;
    int64_t bs = 512, count = -1, skip = 0;
    bool share = false;
    int c, ret = 1;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:O:hU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': out_fmt = optarg; break;
        case 'U': share = true; break;
        case 'h':
            printf("usage: lamina-img dd [-U] [-f fmt] [-O output_fmt] "
                   "[bs=block_size] [count=blocks] [skip=blocks] if=input "
                   "of=output\n");
            return 0;
        default:
            img_help_hint();
            return 1;
        }
    }
    for (int i = optind; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "bs=", 3)) {
            if (img_parse_size(a + 3, &bs) < 0 || bs <= 0) {
                img_error("Invalid bs specified. You may use k, M, G, T, P or "
                          "E suffixes for ");
                img_error("kilobytes, megabytes, gigabytes, terabytes, "
                          "petabytes and exabytes.");
                return 1;
            }
        } else if (!strncmp(a, "count=", 6)) {
            if (parse_count(a + 6, &count) < 0) {
                img_error("invalid number: '%s'", a + 6);
                return 1;
            }
        } else if (!strncmp(a, "skip=", 5)) {
            if (parse_count(a + 5, &skip) < 0) {
                img_error("invalid number: '%s'", a + 5);
                return 1;
            }
        } else if (!strncmp(a, "if=", 3)) {
            in_name = a + 3;
        } else if (!strncmp(a, "of=", 3)) {
            out_name = a + 3;
        } else {
            img_error("unrecognized operand %s", a);
            img_help_hint();
            return 1;
        }
    }
    if (!in_name || !out_name || !*in_name || !*out_name) {
        img_error("Must specify both input and output files");
        return 1;
    }
    ImgImage in, out;
    if (img_open(&in, in_name, fmt, share ? IMG_OPEN_SHARE : 0, NULL, NULL) < 0) {
        return 1;
    }
    int64_t size = lam_node_length(in.node);
    if (size < 0) {
        img_error("Failed to get size for '%s'", in_name);
        img_close(&in);
        return 1;
    }
    if (count >= 0 && count <= INT64_MAX / bs && count * bs < size) {
        size = count * bs;
    }
    int64_t in_pos;
    if (skip > INT64_MAX / bs || skip * bs > size) {
        img_error("%s: cannot skip to specified offset", in_name);
        in_pos = size;
    } else {
        in_pos = skip * bs;
    }
    json_t *o = json_object();
    int r = img_do_create(out_name, out_fmt, size - in_pos, o, false, true);
    json_decref(o);
    if (r < 0) {
        img_close(&in);
        return 1;
    }
    if (img_open(&out, out_name, out_fmt, IMG_OPEN_RW | IMG_OPEN_NO_BACKING,
                 NULL, NULL) < 0) {
        img_close(&in);
        return 1;
    }
    int64_t chunk = bs > IMG_CHUNK ? bs : IMG_CHUNK;
    uint8_t *buf = img_alloc_buf(chunk);
    if (!buf) {
        img_error("Out of memory");
        goto out;
    }
    for (int64_t p = in_pos; p < size;) {
        int64_t n = size - p < chunk ? size - p : chunk;
        r = lam_co_pread(in.root, p, n, buf, 0);
        if (r < 0) {
            img_error("error while reading from input image file: %s", strerror(-r));
            goto out;
        }
        /* The new image reads as zeroes already: keep it sparse. */
        if (!lam_buf_is_zero(buf, n)) {
            r = lam_co_pwrite(out.root, p - in_pos, n, buf, 0);
            if (r < 0) {
                img_error("error while writing to output image file: %s",
                          strerror(-r));
                goto out;
            }
        }
        p += n;
    }
    ret = lam_node_flush_all(out.node) < 0 ? 1 : 0;
out:
    free(buf);
    img_close(&out);
    img_close(&in);
    return ret;
}
