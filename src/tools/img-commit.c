/* lamina-img commit.
 *
 * The base is opened on its own, read-write, and the top image is opened
 * with its chain re-pointed at that node (blockdev-add references), so the
 * data is read through the top and written to the base over one graph.
 * Emptying the top afterwards (unless -d) re-creates it with the same
 * options and backing file: its content then equals what was committed. */
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"
#include "tools/img-fmtopts.h"

#define BASE_NODE_NAME "lamina-img-commit-base"
#define MAX_CHAIN 64

typedef struct Layer {
    char *filename;
    char *format;
} Layer;

/* qemu-img -o options that re-create the top image as it was. */
static json_t *recreate_opts(LamNode *top)
{
    json_t *o = json_object(), *info = json_object();
    char buf[32];

    if (lam_node_get_info(top, info, NULL) == 0) {
        json_t *cs = json_object_get(info, "cluster-size");
        json_t *d = json_object_get(json_object_get(info, "format-specific"), "data");
        if (cs) {
            snprintf(buf, sizeof(buf), "%lld", (long long)json_integer_value(cs));
            json_object_set_new(o, "cluster_size", json_string(buf));
        }
        if (json_is_string(json_object_get(d, "compat"))) {
            json_object_set(o, "compat", json_object_get(d, "compat"));
        }
        if (json_is_string(json_object_get(d, "compression-type"))) {
            json_object_set(o, "compression_type", json_object_get(d, "compression-type"));
        }
        if (json_is_integer(json_object_get(d, "refcount-bits"))) {
            snprintf(buf, sizeof(buf), "%lld",
                     (long long)json_integer_value(json_object_get(d, "refcount-bits")));
            json_object_set_new(o, "refcount_bits", json_string(buf));
        }
        if (json_is_boolean(json_object_get(d, "lazy-refcounts"))) {
            json_object_set_new(o, "lazy_refcounts", json_string(
                json_is_true(json_object_get(d, "lazy-refcounts")) ? "on" : "off"));
        }
        if (json_is_true(json_object_get(d, "extended-l2"))) {
            json_object_set_new(o, "extended_l2", json_string("on"));
        }
    }
    json_decref(info);
    const char *bf = lam_node_backing_file(top);
    const char *bfmt = lam_node_backing_format(top);
    LamNode *bn = lam_node_backing_node(top);
    if (bf) {
        json_object_set_new(o, "backing_file", json_string(bf));
        if (!bfmt && bn) {
            bfmt = lam_node_format(bn);
        }
        if (bfmt) {
            json_object_set_new(o, "backing_fmt", json_string(bfmt));
        }
    }
    return o;
}

static int copy_to_base(ImgImage *top, ImgImage *base, int64_t size)
{
    uint8_t *buf = img_alloc_buf(IMG_CHUNK);
    int ret = 0;

    if (!buf) {
        img_error("Out of memory");
        return -1;
    }
    for (int64_t off = 0; off < size;) {
        int64_t pnum = 0, map;
        LamNode *file;
        int depth = 0;
        int64_t want = size - off < IMG_BIG_CHUNK ? size - off : IMG_BIG_CHUNK;
        int st = lam_co_block_status_above(top->root, base->node, off, want,
                                           &pnum, &map, &file, &depth);
        if (st < 0) {
            img_error("Block status failed: %s", strerror(-st));
            ret = -1;
            break;
        }
        if (pnum <= 0 || pnum > want) {
            pnum = want;
        }
        if (depth > 0) {
            int r;
            if (st & LAM_BS_ZERO) {
                r = lam_co_pwrite_zeroes(base->root, off, pnum, 0);
            } else {
                if (pnum > IMG_CHUNK) {
                    pnum = IMG_CHUNK;
                }
                r = lam_co_pread(top->root, off, pnum, buf, 0);
                if (r >= 0) {
                    r = lam_co_pwrite(base->root, off, pnum, buf, 0);
                }
            }
            if (r < 0) {
                img_error("Error while committing at offset %lld: %s",
                          (long long)off, strerror(-r));
                ret = -1;
                break;
            }
        }
        off += pnum;
        img_progress_set(off * 100.0 / size);
    }
    free(buf);
    return ret;
}

int img_commit(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL, *base_arg = NULL;
    bool drop = false, progress = false;
    int c, ret = 1, nlayers = 0;
    Layer layers[MAX_CHAIN], base_l = {0};
    ImgImage top = {0}, base = {0};
    json_t *ropts = NULL, *extra = NULL;
    char *top_fmt = NULL;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:b:dpqt:r:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'b': base_arg = optarg; drop = true; break; /* implies -d */
        case 'd': drop = true; break;
        case 'p': progress = true; break;
        case 'q': img_quiet = true; break;
        case 't': case 'r': break;
        case 'h':
            printf("usage: lamina-img commit [-q] [-f fmt] [-b base] [-d] [-p] "
                   "filename\n");
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
    const char *filename = argv[optind];
    /* As in qemu-img, -b implies -d: the layers between top and base are
     * stale after the commit, and keeping the top keeps it valid. */

    /* Pass 1: learn the chain. */
    if (img_open(&top, filename, fmt, 0, NULL, NULL) < 0) {
        return 1;
    }
    LamNode *bn = lam_node_backing_node(top.node);
    if (!bn) {
        img_error("Image does not have a backing file");
        goto out;
    }
    for (LamNode *n = bn; n; n = lam_node_backing_node(n)) {
        const char *fn = lam_node_filename(n);
        bool is_base = true;
        if (base_arg) {
            char *rel = lam_path_combine(filename, base_arg);
            is_base = img_same_file(fn, base_arg) || img_same_file(fn, rel);
            free(rel);
        }
        if (is_base) {
            base_l.filename = strdup(fn);
            base_l.format = strdup(lam_node_format(n));
            break;
        }
        if (nlayers == MAX_CHAIN) {
            break;
        }
        layers[nlayers].filename = strdup(fn);
        layers[nlayers].format = strdup(lam_node_format(n));
        nlayers++;
    }
    if (!base_l.filename) {
        img_error("Did not find '%s' in the backing chain of '%s'", base_arg, filename);
        goto out;
    }
    top_fmt = strdup(lam_node_format(top.node));
    ropts = recreate_opts(top.node);
    img_close(&top);

    /* Pass 2: base read-write, top re-pointed at it. */
    if (img_open(&base, base_l.filename, base_l.format,
                 IMG_OPEN_RW | IMG_OPEN_RESIZE, NULL, NULL) < 0) {
        goto out;
    }
    LamError *err = NULL;
    if (lam_node_set_name(base.node, BASE_NODE_NAME, &err) < 0) {
        img_error_free(err, NULL);
        goto out;
    }
    json_t *ref = json_string(BASE_NODE_NAME);
    for (int i = nlayers - 1; i >= 0; i--) {
        json_t *l = json_pack("{s:s, s:{s:s, s:s}, s:o}", "driver", layers[i].format,
                              "file", "driver", "file", "filename",
                              layers[i].filename, "backing", ref);
        ref = l;
    }
    extra = json_pack("{s:o}", "backing", ref);
    if (img_open(&top, filename, top_fmt, IMG_OPEN_SHARE, extra, NULL) < 0) {
        goto out;
    }
    int64_t tsize = lam_node_length(top.node);
    int64_t bsize = lam_node_length(base.node);
    if (tsize < 0 || bsize < 0) {
        img_error("Could not get the image sizes");
        goto out;
    }
    if (tsize > bsize) {
        if (lam_co_truncate(base.root, tsize, false, LAM_PREALLOC_OFF, &err) < 0) {
            img_error_free(err, "Could not resize the base image: ");
            goto out;
        }
    }
    img_progress_start(progress && !img_quiet);
    int r = copy_to_base(&top, &base, tsize);
    if (r == 0) {
        img_progress_set(100.0);
    }
    img_progress_end();
    if (r < 0) {
        goto out;
    }
    if (lam_co_flush(base.root) < 0 || lam_node_flush_all(base.node) < 0) {
        img_error("Could not flush the base image");
        goto out;
    }
    img_close(&top);
    img_close(&base);

    if (!drop) {
        json_t *fo = img_fmt_translate(top_fmt, ropts, &err);
        if (!fo || lam_create_image(filename, top_fmt, tsize, fo, &err) < 0) {
            img_error_free(err, "Could not empty %s: ", filename);
            json_decref(fo);
            goto out;
        }
        json_decref(fo);
    }
    img_printf("Image committed.\n");
    ret = 0;
out:
    if (top.node) {
        img_close(&top);
    }
    if (base.node) {
        img_close(&base);
    }
    for (int i = 0; i < nlayers; i++) {
        free(layers[i].filename);
        free(layers[i].format);
    }
    free(base_l.filename);
    free(base_l.format);
    free(top_fmt);
    json_decref(ropts);
    json_decref(extra);
    return ret;
}
