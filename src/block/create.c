/* Image creation and measurement entry points. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "block/block-int.h"

int lam_create(json_t *opts, LamError **errp)
{
    const char *name = lam_opt_str(opts, "driver", NULL);
    if (!name) {
        lam_error_setg(errp, "Parameter 'driver' is missing");
        return -EINVAL;
    }
    const LamDriver *drv = lam_driver_find(name);
    if (!drv) {
        lam_error_setg(errp, "Parameter 'driver' does not accept value '%s'", name);
        return -EINVAL;
    }
    if (!drv->create) {
        lam_error_setg(errp, "Driver '%s' does not support image creation", name);
        return -ENOTSUP;
    }
    return drv->create(opts, errp);
}

int lam_create_image(const char *filename, const char *fmt, int64_t size,
                     json_t *fmt_opts, LamError **errp)
{
    const LamDriver *drv = lam_driver_find(fmt);
    if (!drv) {
        lam_error_setg(errp, "Unknown file format '%s'", fmt);
        return -EINVAL;
    }
    const char *prealloc = lam_opt_str(fmt_opts, "preallocation", NULL);
    bool whole_file = drv->kind == LAM_DRV_PROTOCOL || !strcmp(fmt, "raw");
    /* The file is created empty for formats (they lay it out themselves)
     * and at full size for raw. */
    json_t *fopts = json_pack("{s:s, s:s, s:I}", "driver", "file", "filename",
                              filename, "size", (json_int_t)(whole_file ? size : 0));
    if (whole_file && prealloc) {
        json_object_set_new(fopts, "preallocation", json_string(prealloc));
    }
    int ret = lam_create(fopts, errp);
    json_decref(fopts);
    if (ret < 0 || whole_file) {
        return ret;
    }

    static unsigned counter;
    char node_name[32];
    snprintf(node_name, sizeof(node_name), "create%u", ++counter);
    json_t *oopts = json_pack("{s:s, s:s, s:s}", "driver", "file", "filename",
                              filename, "node-name", node_name);
    LamNode *file = lam_node_open(oopts, LAM_O_RDWR, errp);
    json_decref(oopts);
    if (!file) {
        return -EIO;
    }
    json_t *copts = fmt_opts ? json_deep_copy(fmt_opts) : json_object();
    json_object_set_new(copts, "driver", json_string(fmt));
    json_object_set_new(copts, "file", json_string(node_name));
    json_object_set_new(copts, "size", json_integer(size));
    ret = lam_create(copts, errp);
    json_decref(copts);
    lam_node_unref(file);
    return ret;
}

int lam_measure(const char *fmt, json_t *fmt_opts, LamNode *in, int64_t size,
                LamMeasure *out, LamError **errp)
{
    const LamDriver *drv = lam_driver_find(fmt);
    if (!drv) {
        lam_error_setg(errp, "Unknown file format '%s'", fmt);
        return -EINVAL;
    }
    if (!drv->measure) {
        lam_error_setg(errp, "Format driver '%s' does not support size measurement", fmt);
        return -ENOTSUP;
    }
    return drv->measure(fmt_opts, in, size, out, errp);
}
