/* Translation of qemu-img "-o" creation options (cluster_size=64k) into
 * blockdev-create naming ("cluster-size": 65536), shared by create,
 * convert and measure. */
#include "tools/img-fmtopts.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { OPT_SIZE, OPT_INT, OPT_BOOL, OPT_STR, OPT_COMPAT } OptKind;

typedef struct FmtOpt {
    const char *name;   /* qemu-img spelling */
    const char *key;    /* blockdev-create spelling */
    OptKind kind;
    const char *help;
} FmtOpt;

static const FmtOpt qcow2_opts[] = {
    {"backing_file", "backing-file", OPT_STR, "File name of a base image"},
    {"backing_fmt", "backing-fmt", OPT_STR, "Image format of the base image"},
    {"cluster_size", "cluster-size", OPT_SIZE, "qcow2 cluster size"},
    {"compat", "version", OPT_COMPAT, "Compatibility level (v2 [0.10] or v3 [1.1])"},
    {"compression_type", "compression-type", OPT_STR,
     "Compression method used for image cluster compression"},
    {"extended_l2", "extended-l2", OPT_BOOL, "Extended L2 tables"},
    {"lazy_refcounts", "lazy-refcounts", OPT_BOOL, "Postpone refcount updates"},
    {"preallocation", "preallocation", OPT_STR,
     "Preallocation mode (allowed values: off, metadata, falloc, full)"},
    {"refcount_bits", "refcount-bits", OPT_INT, "Width of a reference count entry in bits"},
    {"size", "size", OPT_SIZE, "Virtual disk size"},
    {NULL},
};

static const FmtOpt raw_opts[] = {
    {"preallocation", "preallocation", OPT_STR,
     "Preallocation mode (allowed values: off, falloc, full)"},
    {"size", "size", OPT_SIZE, "Virtual disk size"},
    {NULL},
};

static const FmtOpt *opts_for(const char *fmt)
{
    if (!strcmp(fmt, "qcow2")) {
        return qcow2_opts;
    }
    if (!strcmp(fmt, "raw")) {
        return raw_opts;
    }
    return NULL;
}

bool img_fmt_supported(const char *fmt)
{
    return opts_for(fmt) != NULL;
}

void img_fmt_print_help(const char *fmt)
{
    const FmtOpt *o = opts_for(fmt);
    printf("Supported options:\n");
    for (; o && o->name; o++) {
        const char *t = o->kind == OPT_SIZE ? "size" : o->kind == OPT_INT ? "num"
                      : o->kind == OPT_BOOL ? "bool (on/off)" : "str";
        char left[64];
        snprintf(left, sizeof(left), "%s=<%s>", o->name, t);
        printf("  %-22s - %s\n", left, o->help);
    }
}

static int parse_bool(const char *s, bool *out)
{
    if (!strcmp(s, "on") || !strcmp(s, "true") || !strcmp(s, "yes")) {
        *out = true;
        return 0;
    }
    if (!strcmp(s, "off") || !strcmp(s, "false") || !strcmp(s, "no")) {
        *out = false;
        return 0;
    }
    return -1;
}

json_t *img_fmt_translate(const char *fmt, json_t *o, LamError **errp)
{
    const FmtOpt *tab = opts_for(fmt);
    json_t *out = json_object();
    const char *k;
    json_t *v;

    json_object_foreach(o, k, v) {
        const FmtOpt *f = tab;
        while (f && f->name && strcmp(f->name, k)) {
            f++;
        }
        if (!f || !f->name) {
            lam_error_setg(errp, "Invalid parameter '%s'", k);
            goto fail;
        }
        const char *s = json_string_value(v);
        switch (f->kind) {
        case OPT_SIZE: {
            int64_t n;
            if (img_parse_size(s, &n) < 0) {
                lam_error_setg(errp, "Parameter '%s' expects a non-negative "
                               "number below 2^64", k);
                goto fail;
            }
            json_object_set_new(out, f->key, json_integer(n));
            break;
        }
        case OPT_INT: {
            char *end;
            long long n = strtoll(s, &end, 0);
            if (!*s || *end) {
                lam_error_setg(errp, "Parameter '%s' expects a number", k);
                goto fail;
            }
            json_object_set_new(out, f->key, json_integer(n));
            break;
        }
        case OPT_BOOL: {
            bool b;
            if (parse_bool(s, &b) < 0) {
                lam_error_setg(errp, "Parameter '%s' expects 'on' or 'off'", k);
                goto fail;
            }
            json_object_set_new(out, f->key, json_boolean(b));
            break;
        }
        case OPT_COMPAT:
            if (!strcmp(s, "0.10") || !strcmp(s, "v2")) {
                json_object_set_new(out, f->key, json_string("v2"));
            } else if (!strcmp(s, "1.1") || !strcmp(s, "v3")) {
                json_object_set_new(out, f->key, json_string("v3"));
            } else {
                lam_error_setg(errp, "Invalid parameter '%s'", s);
                goto fail;
            }
            break;
        case OPT_STR:
            json_object_set_new(out, f->key, json_string(s));
            break;
        }
    }
    return out;

fail:
    json_decref(out);
    return NULL;
}

/* Appends " name=value" for one option of the "Formatting" line. */
static void add(char *buf, size_t len, const char *name, const char *val)
{
    size_t n = strlen(buf);
    if (n < len) {
        snprintf(buf + n, len - n, " %s=%s", name, val);
    }
}

void img_fmt_describe(const char *filename, const char *fmt, int64_t size,
                      json_t *o, char *buf, size_t len)
{
    char sz[32];
    const char *v;

    snprintf(buf, len, "Formatting '%s', fmt=%s", filename, fmt);
    snprintf(sz, sizeof(sz), "%lld", (long long)size);
    if (!strcmp(fmt, "qcow2")) {
        char cs[32];
        int64_t c = 65536;
        v = lam_opt_str(o, "cluster_size", NULL);
        if (v) {
            img_parse_size(v, &c);
        }
        snprintf(cs, sizeof(cs), "%lld", (long long)c);
        add(buf, len, "cluster_size", cs);
        add(buf, len, "extended_l2", lam_opt_str(o, "extended_l2", "off"));
        if ((v = lam_opt_str(o, "preallocation", NULL))) {
            add(buf, len, "preallocation", v);
        }
        add(buf, len, "compression_type", lam_opt_str(o, "compression_type", "zlib"));
        add(buf, len, "size", sz);
        if ((v = lam_opt_str(o, "compat", NULL))) {
            add(buf, len, "compat", v);
        }
        if ((v = lam_opt_str(o, "backing_file", NULL))) {
            add(buf, len, "backing_file", v);
        }
        if ((v = lam_opt_str(o, "backing_fmt", NULL))) {
            add(buf, len, "backing_fmt", v);
        }
        add(buf, len, "lazy_refcounts", lam_opt_str(o, "lazy_refcounts", "off"));
        add(buf, len, "refcount_bits", lam_opt_str(o, "refcount_bits", "16"));
    } else {
        add(buf, len, "size", sz);
        if ((v = lam_opt_str(o, "preallocation", NULL))) {
            add(buf, len, "preallocation", v);
        }
    }
}
