/* lamina-img measure */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"
#include "tools/img-fmtopts.h"

int img_measure(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, 'J'},
        {"size", required_argument, NULL, 'S'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL, *out_fmt = "raw";
    int64_t size = -1;
    bool share = false;
    int json = 0, c, ret = 1;
    json_t *o = json_object(), *fo = NULL;
    ImgImage im = {0};
    LamError *err = NULL;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:O:o:l:hU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': out_fmt = optarg; break;
        case 'U': share = true; break;
        case 'l':
            img_error("Snapshots are not supported");
            goto out;
        case 'o':
            if (img_parse_o(o, optarg) < 0) {
                goto out;
            }
            break;
        case 'S':
            if (img_parse_size(optarg, &size) < 0) {
                img_report_bad_size();
                goto out;
            }
            break;
        case 'J':
            json = img_parse_output(optarg);
            if (json < 0) {
                goto out;
            }
            break;
        case 'h':
            printf("usage: lamina-img measure [--output=ofmt] [-O output_fmt] "
                   "[-o options] [--size N | [-f fmt] filename]\n");
            ret = 0;
            goto out;
        default:
            img_help_hint();
            goto out;
        }
    }
    if (json_object_get(o, "help")) {
        img_fmt_print_help(out_fmt);
        ret = 0;
        goto out;
    }
    if (argc - optind > 1) {
        img_error("At most one filename argument is allowed.");
        goto out;
    }
    const char *filename = optind < argc ? argv[optind] : NULL;
    if (filename && size >= 0) {
        img_error("--size N cannot be used together with a filename.");
        goto out;
    }
    if (!filename && size < 0) {
        img_error("Either --size N or one filename must be specified.");
        goto out;
    }
    if (!img_fmt_supported(out_fmt)) {
        img_error("Unknown file format '%s'", out_fmt);
        goto out;
    }
    fo = img_fmt_translate(out_fmt, o, &err);
    if (!fo) {
        img_error_free(err, NULL);
        goto out;
    }
    json_object_del(fo, "size");
    if (filename && img_open(&im, filename, fmt, share ? IMG_OPEN_SHARE : 0,
                             NULL, NULL) < 0) {
        goto out;
    }
    LamMeasure m = {0};
    if (lam_measure(out_fmt, fo, im.node, size, &m, &err) < 0) {
        img_error_free(err, NULL);
        goto out;
    }
    /* qemu-img reports persistent-bitmap space when both ends are qcow2. */
    bool bitmaps = im.node && !strcmp(lam_node_format(im.node), "qcow2") &&
                   !strcmp(out_fmt, "qcow2");
    if (json) {
        json_t *j = json_object();
        if (bitmaps) {
            json_object_set_new(j, "bitmaps", json_integer(0));
        }
        json_object_set_new(j, "required", json_integer(m.required));
        json_object_set_new(j, "fully-allocated", json_integer(m.fully_allocated));
        img_print_json(j);
        json_decref(j);
    } else {
        printf("required size: %lld\n", (long long)m.required);
        printf("fully allocated size: %lld\n", (long long)m.fully_allocated);
        if (bitmaps) {
            printf("bitmaps size: 0\n");
        }
    }
    ret = 0;
out:
    if (im.node) {
        img_close(&im);
    }
    json_decref(fo);
    json_decref(o);
    return ret;
}
