/* lamina-img info */
#include <ctype.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tools/img-common.h"

/* Builds qemu's ImageInfo object for an open image. */
static json_t *image_info(ImgImage *im, LamError **errp)
{
    LamNode *bs = im->node;
    json_t *drv = json_object();
    json_t *info = json_object();
    const char *bf = lam_node_backing_file(bs);
    const char *bfmt = lam_node_backing_format(bs);
    int64_t len = lam_node_length(bs);

    if (len < 0) {
        lam_error_setg(errp, "Could not get the size of '%s'", im->filename);
        json_decref(drv);
        json_decref(info);
        return NULL;
    }
    if (lam_node_get_info(bs, drv, errp) < 0) {
        json_decref(drv);
        json_decref(info);
        return NULL;
    }
    /* Internal snapshots, when the driver lists them (qemu's SnapshotInfo). */
    json_t *snaps = json_object_get(drv, "snapshots");
    if (json_is_array(snaps) && json_array_size(snaps) > 0) {
        json_object_set(info, "snapshots", snaps);
    }
    if (bf && bfmt) {
        json_object_set_new(info, "backing-filename-format", json_string(bfmt));
    }
    json_object_set_new(info, "virtual-size", json_integer(len));
    const char *fn = lam_node_filename(bs);
    json_object_set_new(info, "filename", json_string(fn && *fn ? fn : im->filename));
    json_t *cs = json_object_get(drv, "cluster-size");
    if (cs) {
        json_object_set(info, "cluster-size", cs);
    }
    json_object_set_new(info, "format", json_string(lam_node_format(bs)));
    int64_t actual = lam_node_allocated_size(bs);
    if (actual >= 0) {
        json_object_set_new(info, "actual-size", json_integer(actual));
    }
    json_t *fs = json_object_get(drv, "format-specific");
    if (fs) {
        json_object_set(info, "format-specific", fs);
    }
    if (bf) {
        char *full = lam_path_combine(json_string_value(json_object_get(info, "filename")), bf);
        json_object_set_new(info, "full-backing-filename", json_string(full));
        free(full);
        json_object_set_new(info, "backing-filename", json_string(bf));
    }
    json_t *dirty = json_object_get(drv, "dirty-flag");
    json_object_set_new(info, "dirty-flag", json_boolean(json_is_true(dirty)));
    json_decref(drv);
    return info;
}

static void dump_value(json_t *v, int indent);

static void print_key(const char *k, int indent)
{
    printf("%*s", indent * 4, "");
    for (const char *p = k; *p; p++) {
        putchar(*p == '-' ? ' ' : *p);
    }
    putchar(':');
}

static void dump_scalar(json_t *v)
{
    if (json_is_string(v)) {
        printf("%s", json_string_value(v));
    } else if (json_is_integer(v)) {
        printf("%lld", (long long)json_integer_value(v));
    } else if (json_is_real(v)) {
        printf("%g", json_real_value(v));
    } else if (json_is_boolean(v)) {
        printf("%s", json_is_true(v) ? "true" : "false");
    } else {
        printf("null");
    }
}

static void dump_object(json_t *o, int indent)
{
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        print_key(k, indent);
        if (json_is_object(v) || json_is_array(v)) {
            putchar('\n');
            dump_value(v, indent + 1);
        } else {
            putchar(' ');
            dump_scalar(v);
            putchar('\n');
        }
    }
}

static void dump_value(json_t *v, int indent)
{
    if (json_is_object(v)) {
        dump_object(v, indent);
    } else if (json_is_array(v)) {
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e) {
            printf("%*s[%zu]:", indent * 4, "", i);
            if (json_is_object(e) || json_is_array(e)) {
                putchar('\n');
                dump_value(e, indent + 1);
            } else {
                putchar(' ');
                dump_scalar(e);
                putchar('\n');
            }
        }
    } else {
        printf("%*s", indent * 4, "");
        dump_scalar(v);
        putchar('\n');
    }
}

static long long jint(json_t *o, const char *k)
{
    return (long long)json_integer_value(json_object_get(o, k));
}

static void print_snapshots(json_t *snaps)
{
    size_t i;
    json_t *sn;

    printf("Snapshot list:\n");
    printf("%-9s %-16s %8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
           "VM CLOCK", "ICOUNT");
    json_array_foreach(snaps, i, sn) {
        char size[32], date[32] = "", clock[48], icount[32] = "";
        time_t t = (time_t)jint(sn, "date-sec");
        struct tm tm;
        long long ns = jint(sn, "vm-clock-sec") * 1000000000LL + jint(sn, "vm-clock-nsec");
        long long ms = ns / 1000000;

        img_size_to_str(jint(sn, "vm-state-size"), size, sizeof(size));
        if (localtime_r(&t, &tm)) {
            strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
        }
        snprintf(clock, sizeof(clock), "%02lld:%02lld:%02lld.%03lld",
                 ms / 3600000, (ms / 60000) % 60, (ms / 1000) % 60, ms % 1000);
        if (json_object_get(sn, "icount")) {
            snprintf(icount, sizeof(icount), "%lld", jint(sn, "icount"));
        }
        printf("%-9s %-16s %8s%20s%13s%11s\n",
               json_string_value(json_object_get(sn, "id")),
               json_string_value(json_object_get(sn, "name")), size, date, clock,
               icount);
    }
}

static void print_human(json_t *info)
{
    char sz[64];
    int64_t vsize = json_integer_value(json_object_get(info, "virtual-size"));
    json_t *v;

    printf("image: %s\n", json_string_value(json_object_get(info, "filename")));
    printf("file format: %s\n", json_string_value(json_object_get(info, "format")));
    img_size_to_str(vsize, sz, sizeof(sz));
    printf("virtual size: %s (%lld bytes)\n", sz, (long long)vsize);
    v = json_object_get(info, "actual-size");
    if (v) {
        img_size_to_str(json_integer_value(v), sz, sizeof(sz));
        printf("disk size: %s\n", sz);
    } else {
        printf("disk size: unavailable\n");
    }
    v = json_object_get(info, "cluster-size");
    if (v) {
        printf("cluster_size: %lld\n", (long long)json_integer_value(v));
    }
    if (json_is_true(json_object_get(info, "dirty-flag"))) {
        printf("cleanly shut down: no\n");
    }
    v = json_object_get(info, "backing-filename");
    if (v) {
        const char *bf = json_string_value(v);
        const char *full = json_string_value(json_object_get(info, "full-backing-filename"));
        printf("backing file: %s", bf);
        if (full && strcmp(full, bf)) {
            printf(" (actual path: %s)", full);
        }
        printf("\n");
        v = json_object_get(info, "backing-filename-format");
        if (v) {
            printf("backing file format: %s\n", json_string_value(v));
        }
    }
    v = json_object_get(info, "snapshots");
    if (json_is_array(v)) {
        print_snapshots(v);
    }
    v = json_object_get(info, "format-specific");
    if (v) {
        json_t *data = json_object_get(v, "data");
        printf("Format specific information:\n");
        if (data) {
            dump_value(data, 1);
        }
    }
}

int img_info(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, 'O'},
        {"backing-chain", no_argument, NULL, 'B'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    bool chain = false, share = false;
    int json = 0, c;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:hU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'U': share = true; break;
        case 'B': chain = true; break;
        case 'O':
            json = img_parse_output(optarg);
            if (json < 0) {
                return 1;
            }
            break;
        case 'h':
            printf("usage: lamina-img info [-f fmt] [--output=ofmt] "
                   "[--backing-chain] [-U] filename\n");
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

    json_t *list = json_array();
    char *filename = strdup(argv[optind]);
    char *cur_fmt = fmt ? strdup(fmt) : NULL;
    int ret = 0;

    /* Each layer is opened on its own without its backing file, so info
     * works even when a backing file is missing. */
    while (filename) {
        ImgImage im;
        LamError *err = NULL;
        size_t i;
        json_t *e;

        json_array_foreach(list, i, e) {
            if (!strcmp(json_string_value(json_object_get(e, "filename")), filename)) {
                img_error("Backing file '%s' creates an infinite loop.", filename);
                ret = 1;
                goto out;
            }
        }
        if (img_open(&im, filename, cur_fmt,
                     IMG_OPEN_NO_BACKING | (share ? IMG_OPEN_SHARE : 0), NULL,
                     NULL) < 0) {
            ret = 1;
            goto out;
        }
        json_t *info = image_info(&im, &err);
        img_close(&im);
        if (!info) {
            img_error_free(err, NULL);
            ret = 1;
            goto out;
        }
        json_array_append_new(list, info);
        free(filename);
        free(cur_fmt);
        filename = NULL;
        cur_fmt = NULL;
        if (chain) {
            json_t *full = json_object_get(info, "full-backing-filename");
            json_t *bfmt = json_object_get(info, "backing-filename-format");
            if (full) {
                filename = strdup(json_string_value(full));
                cur_fmt = bfmt ? strdup(json_string_value(bfmt)) : NULL;
            }
        }
    }

    if (json) {
        img_print_json(chain ? list : json_array_get(list, 0));
    } else {
        size_t i;
        json_t *e;
        json_array_foreach(list, i, e) {
            if (i) {
                printf("\n");
            }
            print_human(e);
        }
    }
out:
    free(filename);
    free(cur_fmt);
    json_decref(list);
    return ret;
}
