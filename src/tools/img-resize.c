/* lamina-img resize */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"

int img_resize(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"shrink", no_argument, NULL, 'S'},
        {"preallocation", required_argument, NULL, 'P'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    bool shrink = false;
    LamPrealloc prealloc = LAM_PREALLOC_OFF;
    int c;

    if (argc < 3) {
        img_error("Expecting image file name and size");
        img_help_hint();
        return 1;
    }
    /* The size goes last and may start with '-': take it out before option
     * parsing so it isn't read as an option. */
    const char *size_arg = argv[argc - 1];
    argc--;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:hqt:", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'q': img_quiet = true; break;
        case 't': break;
        case 'S': shrink = true; break;
        case 'P':
            if (lam_prealloc_parse(optarg, &prealloc) < 0) {
                img_error("Invalid preallocation mode '%s'", optarg);
                return 1;
            }
            break;
        case 'h':
            printf("usage: lamina-img resize [-f fmt] [--preallocation=prealloc] "
                   "[-q] [--shrink] filename [+ | -]size\n");
            return 0;
        default:
            img_help_hint();
            return 1;
        }
    }
    if (optind != argc - 1) {
        img_error("Expecting image file name and size");
        img_help_hint();
        return 1;
    }
    int rel = 0;
    if (size_arg[0] == '+') {
        rel = 1;
        size_arg++;
    } else if (size_arg[0] == '-') {
        rel = -1;
        size_arg++;
    }
    int64_t n;
    if (img_parse_size(size_arg, &n) < 0) {
        img_report_bad_size();
        return 1;
    }
    ImgImage im;
    if (img_open(&im, argv[optind], fmt, IMG_OPEN_RW | IMG_OPEN_RESIZE |
                 IMG_OPEN_NO_BACKING, NULL, NULL) < 0) {
        return 1;
    }
    int ret = 1;
    int64_t cur = lam_node_length(im.node);
    if (cur < 0) {
        img_error("Could not get the size of '%s'", argv[optind]);
        goto out;
    }
    int64_t total = rel == 0 ? n : cur + rel * n;
    if (total <= 0) {
        img_error("New image size must be positive");
        goto out;
    }
    if (total < cur) {
        if (!shrink) {
            img_error("Use the --shrink option to perform a shrink operation.");
            goto out;
        }
        lam_warn("Shrinking an image will delete all data beyond the shrunken "
                 "image's end. Before performing such an operation, make sure "
                 "there is no important data there.");
    }
    if (total < cur && prealloc != LAM_PREALLOC_OFF) {
        img_error("Preallocation can only be used for growing images");
        goto out;
    }
    LamError *err = NULL;
    if (lam_co_truncate(im.root, total, true, prealloc, &err) < 0) {
        img_error_free(err, NULL);
        goto out;
    }
    if (lam_node_flush_all(im.node) < 0) {
        img_error("Could not flush '%s'", argv[optind]);
        goto out;
    }
    img_printf("Image resized.\n");
    ret = 0;
out:
    img_close(&im);
    return ret;
}
