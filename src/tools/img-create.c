/* lamina-img create */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"
#include "tools/img-fmtopts.h"

/* Opens the backing file named by a new image (relative to the new image's
 * folder) to learn its size and validate it. */
static int probe_backing(const char *filename, const char *backing,
                         const char *backing_fmt, int64_t *size,
                         char *detected, size_t dlen)
{
    char *full = lam_path_combine(filename, backing);
    ImgImage bi;
    LamError *err = NULL;
    int ret = img_open(&bi, full, backing_fmt, IMG_OPEN_SHARE | IMG_OPEN_QUIET_ERR,
                       NULL, &err);
    free(full);
    if (ret < 0) {
        if (size) {
            img_error("%s: %s", filename, err ? err->msg : "error");
            fprintf(stderr, "Could not open backing image.\n");
        }
        lam_error_free(err);
        return -1;
    }
    if (size) {
        *size = lam_node_length(bi.node);
    }
    if (detected) {
        snprintf(detected, dlen, "%s", lam_node_format(bi.node));
    }
    img_close(&bi);
    return 0;
}

int img_do_create(const char *filename, const char *fmt, int64_t size,
                  json_t *o, bool unsafe, bool quiet)
{
    LamError *err = NULL;
    const char *backing = lam_opt_str(o, "backing_file", NULL);
    const char *backing_fmt = lam_opt_str(o, "backing_fmt", NULL);
    char line[1024];

    if (!img_fmt_supported(fmt)) {
        img_error("%s: Unknown file format '%s'", filename, fmt);
        return -1;
    }
    json_t *fo = img_fmt_translate(fmt, o, &err);
    if (!fo) {
        img_error_free(err, "%s: ", filename);
        return -1;
    }
    if (json_object_get(o, "size") && size < 0) {
        size = json_integer_value(json_object_get(fo, "size"));
    }
    json_object_del(fo, "size");
    if (backing && !strcmp(fmt, "raw")) {
        img_error("%s: Backing file not supported for file format '%s'",
                  filename, fmt);
        goto fail;
    }
    if (backing && !backing_fmt) {
        char det[64];
        img_error("%s: Backing file specified without backing format", filename);
        if (!unsafe && probe_backing(filename, backing, NULL, NULL, det,
                                     sizeof(det)) == 0) {
            fprintf(stderr, "Detected format of %s.\n", det);
        }
        goto fail;
    }
    if (backing && !unsafe) {
        int64_t bsize;
        if (probe_backing(filename, backing, backing_fmt, &bsize, NULL, 0) < 0) {
            goto fail;
        }
        if (size < 0) {
            size = bsize;
        }
    }
    if (size < 0) {
        img_error("%s: Image creation needs a size parameter", filename);
        goto fail;
    }
    img_fmt_describe(filename, fmt, size, o, line, sizeof(line));
    if (!quiet && !img_quiet) {
        printf("%s\n", line);
        fflush(stdout);
    }
    /* Like qemu-img: the line shows the size asked for, the image gets it
     * rounded up to whole 512-byte sectors. */
    size = (size + 511) / 512 * 512;
    if (lam_create_image(filename, fmt, size, fo, &err) < 0) {
        img_error_free(err, "%s: ", filename);
        goto fail;
    }
    json_decref(fo);
    return 0;

fail:
    json_decref(fo);
    return -1;
}

int img_create(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"object", required_argument, NULL, 'O'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = "raw", *backing = NULL, *backing_fmt = NULL;
    bool unsafe = false;
    json_t *o = json_object();
    int64_t size = -1;
    int c, ret = 1;

    optind = 1;
    while ((c = getopt_long(argc, argv, "F:b:f:ho:qu", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'b': backing = optarg; break;
        case 'F': backing_fmt = optarg; break;
        case 'u': unsafe = true; break;
        case 'q': img_quiet = true; break;
        case 'o':
            if (img_parse_o(o, optarg) < 0) {
                goto out;
            }
            break;
        case 'h':
            printf("usage: lamina-img create [-q] [-f fmt] [-b backing_file "
                   "[-F backing_fmt]] [-u] [-o options] filename [size]\n");
            ret = 0;
            goto out;
        default:
            img_help_hint();
            goto out;
        }
    }
    if (json_object_get(o, "help")) {
        img_fmt_print_help(fmt);
        ret = 0;
        goto out;
    }
    if (optind >= argc) {
        img_error("Expecting image file name");
        img_help_hint();
        goto out;
    }
    const char *filename = argv[optind++];
    if (optind < argc) {
        if (img_parse_size(argv[optind], &size) < 0) {
            img_report_bad_size();
            goto out;
        }
        optind++;
    }
    if (optind < argc) {
        img_error("Unexpected argument: %s", argv[optind]);
        goto out;
    }
    if (backing) {
        json_object_set_new(o, "backing_file", json_string(backing));
    }
    if (backing_fmt) {
        json_object_set_new(o, "backing_fmt", json_string(backing_fmt));
    }
    ret = img_do_create(filename, fmt, size, o, unsafe, false) < 0 ? 1 : 0;
out:
    json_decref(o);
    return ret;
}
