/* lamina-img check.  Exit codes as qemu-img: 0 clean, 1 check failed,
 * 2 corruptions, 3 leaks only, 63 format without checks. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"

static void print_msgs(LamCheckResult *r)
{
    if (r->msgs && *r->msgs) {
        fflush(stdout);
        size_t n = strlen(r->msgs);
        fputs(r->msgs, stderr);
        if (r->msgs[n - 1] != '\n') {
            fputc('\n', stderr);
        }
    }
}

static void print_human(const LamCheckResult *r)
{
    if (!r->corruptions && !r->leaks && !r->check_errors) {
        img_printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions) {
            img_printf("\n%d errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image "
                       "may corrupt it.\n", r->corruptions);
        }
        if (r->leaks) {
            img_printf("\n%d leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n",
                       r->leaks);
        }
        if (r->check_errors) {
            img_printf("\n%d internal errors have occurred during the check.\n",
                       r->check_errors);
        }
    }
    if (r->total_clusters != 0 && r->allocated_clusters != 0) {
        double a = r->allocated_clusters;
        img_printf("%lld/%lld = %0.2f%% allocated, %0.2f%% fragmented, "
                   "%0.2f%% compressed clusters\n",
                   (long long)r->allocated_clusters, (long long)r->total_clusters,
                   a * 100.0 / r->total_clusters,
                   r->fragmented_clusters * 100.0 / a,
                   r->compressed_clusters * 100.0 / a);
    }
    if (r->image_end_offset > 0) {
        img_printf("Image end offset: %lld\n", (long long)r->image_end_offset);
    }
}

static void set_nz(json_t *o, const char *k, int64_t v)
{
    if (v) {
        json_object_set_new(o, k, json_integer(v));
    }
}

static void print_json(const LamCheckResult *r, const char *filename,
                       const char *format)
{
    json_t *o = json_object();
    set_nz(o, "image-end-offset", r->image_end_offset);
    set_nz(o, "compressed-clusters", r->compressed_clusters);
    set_nz(o, "total-clusters", r->total_clusters);
    set_nz(o, "corruptions-fixed", r->corruptions_fixed);
    set_nz(o, "corruptions", r->corruptions);
    json_object_set_new(o, "check-errors", json_integer(r->check_errors));
    set_nz(o, "leaks", r->leaks);
    set_nz(o, "leaks-fixed", r->leaks_fixed);
    set_nz(o, "allocated-clusters", r->allocated_clusters);
    json_object_set_new(o, "filename", json_string(filename));
    json_object_set_new(o, "format", json_string(format));
    set_nz(o, "fragmented-clusters", r->fragmented_clusters);
    img_print_json(o);
    json_decref(o);
}

int img_check(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, 'O'},
        {"repair", required_argument, NULL, 'r'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    LamCheckMode mode = LAM_CHECK_NONE;
    bool share = false;
    int json = 0, c, ret;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:hr:T:qU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'U': share = true; break;
        case 'q': img_quiet = true; break;
        case 'T': break; /* cache mode: accepted, not used */
        case 'r':
            if (!strcmp(optarg, "leaks")) {
                mode = LAM_FIX_LEAKS;
            } else if (!strcmp(optarg, "all")) {
                mode = LAM_FIX_LEAKS | LAM_FIX_ERRORS;
            } else {
                img_error("Unknown option value for -r (expecting 'leaks' or "
                          "'all'): %s", optarg);
                return 1;
            }
            break;
        case 'O':
            json = img_parse_output(optarg);
            if (json < 0) {
                return 1;
            }
            break;
        case 'h':
            printf("usage: lamina-img check [-q] [-f fmt] [--output=ofmt] "
                   "[-r [leaks | all]] [-U] filename\n");
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
    if (share && mode) {
        img_error("--force-share/-U is not allowed when repairing");
        return 1;
    }
    const char *filename = argv[optind];
    ImgImage im;
    int of = IMG_OPEN_CHECK | IMG_OPEN_NO_BACKING | (share ? IMG_OPEN_SHARE : 0);
    if (mode) {
        of |= IMG_OPEN_RW;
    }
    if (img_open(&im, filename, fmt, of, NULL, NULL) < 0) {
        return 1;
    }

    LamCheckResult r, r2;
    memset(&r, 0, sizeof(r));
    ret = lam_node_check(im.node, &r, mode);
    if (ret == -ENOTSUP || (ret == 0 && !r.supported)) {
        print_msgs(&r);
        img_error("This image format does not support checks");
        free(r.msgs);
        img_close(&im);
        return 63;
    }
    print_msgs(&r);
    if (ret == 0 && mode && (r.leaks_fixed || r.corruptions_fixed)) {
        if (!json) {
            img_printf("The following inconsistencies were found and repaired:\n\n"
                       "    %d leaked clusters\n    %d corruptions\n\n"
                       "Double checking the fixed image now...\n",
                       r.leaks_fixed, r.corruptions_fixed);
        }
        memset(&r2, 0, sizeof(r2));
        ret = lam_node_check(im.node, &r2, LAM_CHECK_NONE);
        print_msgs(&r2);
        r2.leaks_fixed = r.leaks_fixed;
        r2.corruptions_fixed = r.corruptions_fixed;
        free(r.msgs);
        r = r2;
    }
    if (ret < 0) {
        img_error("Check failed: %s", strerror(-ret));
        free(r.msgs);
        img_close(&im);
        return 1;
    }
    if (json) {
        if (!img_quiet) {
            print_json(&r, filename, lam_node_format(im.node));
        }
    } else {
        print_human(&r);
    }
    free(r.msgs);
    if (mode) {
        lam_node_flush_all(im.node);
    }
    img_close(&im);
    if (r.check_errors) {
        img_error("Check failed");
        return 1;
    }
    if (r.corruptions) {
        return 2;
    }
    if (r.leaks) {
        return 3;
    }
    return 0;
}
