/* QMP argument handling for blockdev-backup, drive-backup and
 * blockdev-create: turns validated QMP arguments into job starts, with
 * QEMU's error strings.  Control thread. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/backup.h"
#include "lamina/driver.h"

void backup_own_target(LamJob *job); /* backup.c */

static LamNode *lookup(const char *name, LamError **errp)
{
    LamNode *bs = name ? lam_node_find(name) : NULL;
    if (!bs) {
        lam_error_setg(errp, "Cannot find device='%s' nor node-name='%s'", name ? name : "",
                       name ? name : "");
    }
    return bs;
}

static int parse_onerr(json_t *args, const char *key, LamOnError *out, LamError **errp)
{
    const char *v = lam_opt_str(args, key, "report");
    if (lam_on_error_parse(v, out) < 0) {
        lam_error_setg(errp, "Parameter '%s' does not accept value '%s'", key, v);
        return -EINVAL;
    }
    return 0;
}

/* Fills p from the members common to blockdev-backup and drive-backup. */
static int parse_backup_args(json_t *args, LamBackupParams *p, LamNode *source,
                             LamError **errp)
{
    LamError *err = NULL;
    lam_backup_params_init(p);
    p->job_id = lam_opt_str(args, "job-id", NULL);
    if (!p->job_id) {
        /* QSD has no device names to default to. */
        lam_error_setg(errp, "Invalid job ID ''");
        return -EINVAL;
    }
    const char *sync = lam_opt_str(args, "sync", NULL);
    const char *bitmap = lam_opt_str(args, "bitmap", NULL);
    if (!sync) {
        lam_error_setg(errp, "Parameter 'sync' is missing");
        return -EINVAL;
    }
    if (!strcmp(sync, "full")) {
        p->sync = LAM_SYNC_FULL;
    } else if (!strcmp(sync, "top")) {
        p->sync = LAM_SYNC_TOP;
    } else if (!strcmp(sync, "none")) {
        p->sync = LAM_SYNC_NONE;
    } else if (!strcmp(sync, "incremental") || !strcmp(sync, "bitmap")) {
        if (!bitmap) {
            lam_error_setg(errp, "must provide a valid bitmap name for '%s' sync mode", sync);
        } else {
            lam_error_setg(errp, "Bitmap '%s' could not be found", bitmap);
        }
        return -EINVAL;
    } else {
        lam_error_setg(errp, "Parameter 'sync' does not accept value '%s'", sync);
        return -EINVAL;
    }
    if (bitmap) {
        if (p->sync == LAM_SYNC_NONE) {
            lam_error_setg(errp, "sync mode 'none' does not produce meaningful bitmap outputs");
        } else {
            lam_error_setg(errp, "Bitmap '%s' could not be found", bitmap);
        }
        return -EINVAL;
    }
    if (json_object_get(args, "bitmap-mode")) {
        lam_error_setg(errp, "Cannot specify bitmap sync mode without a bitmap");
        return -EINVAL;
    }
    p->compress = lam_opt_bool(args, "compress", false, &err);
    p->speed = lam_opt_int(args, "speed", 0, &err);
    p->auto_finalize = lam_opt_bool(args, "auto-finalize", true, &err);
    p->auto_dismiss = lam_opt_bool(args, "auto-dismiss", true, &err);
    p->filter_node_name = lam_opt_str(args, "filter-node-name", NULL);
    p->on_cbw_error = lam_opt_str(args, "on-cbw-error", NULL);
    p->discard_source = lam_opt_bool(args, "discard-source", false, &err);
    json_t *perf = json_object_get(args, "x-perf");
    if (perf) {
        p->use_copy_range = lam_opt_bool(perf, "use-copy-range", false, &err);
        int64_t mw = lam_opt_int(perf, "max-workers", 64, &err);
        p->min_cluster_size = lam_opt_int(perf, "min-cluster-size", 0, &err);
        if (!err && (p->min_cluster_size < 0 ||
                     (p->min_cluster_size & (p->min_cluster_size - 1)) ||
                     p->min_cluster_size > (64 << 20))) {
            lam_error_setg(&err, "min-cluster-size needs to be a power of 2");
        }
        p->max_chunk = lam_opt_int(perf, "max-chunk", 0, &err);
        if (!err && (mw < 1 || mw > 2147483647)) {
            lam_error_setg(&err, "max-workers must be between 1 and 2147483647");
        }
        if (!err && p->max_chunk < 0) {
            lam_error_setg(&err, "max-chunk must be zero (which means no limit) or positive");
        }
        p->max_workers = (int)(mw > 64 ? 64 : mw);
        if (!err && p->max_chunk > 0 && p->max_chunk < 65536) {
            lam_error_setg(&err, "Required max-chunk (%lld) is less than backup cluster size (65536)",
                           (long long)p->max_chunk);
        }
    }
    if (err) {
        lam_error_propagate(errp, err);
        return -EINVAL;
    }
    if (parse_onerr(args, "on-source-error", &p->on_source_error, errp) < 0 ||
        parse_onerr(args, "on-target-error", &p->on_target_error, errp) < 0) {
        return -EINVAL;
    }
    (void)source;
    return 0;
}

int lam_qmp_blockdev_backup(json_t *args, LamError **errp)
{
    LamNode *source = lookup(lam_opt_str(args, "device", NULL), errp);
    if (!source) {
        return -ENOENT;
    }
    LamNode *target = lookup(lam_opt_str(args, "target", NULL), errp);
    if (!target) {
        return -ENOENT;
    }
    LamBackupParams p;
    if (parse_backup_args(args, &p, source, errp) < 0) {
        return -EINVAL;
    }
    return lam_backup_start(source, target, &p, errp) ? 0 : -EINVAL;
}

/* Creates the drive-backup target image (mode absolute-paths). */
static int create_target(LamNode *source, const char *filename, const char *fmt,
                         LamSyncMode *sync, LamError **errp)
{
    int64_t size = lam_node_length(source);
    if (size < 0) {
        lam_error_setg_errno(errp, (int)size, "Could not get the size of '%s'",
                             lam_node_name(source));
        return (int)size;
    }
    json_t *fo = json_object();
    const LamDriver *drv = lam_driver_find(fmt);
    if (drv && drv->supports_backing) {
        if (*sync == LAM_SYNC_TOP) {
            LamNode *bk = lam_node_backing_node(source);
            if (bk && lam_node_backing_file(source)) {
                json_object_set_new(fo, "backing-file",
                                    json_string(lam_node_backing_file(source)));
                json_object_set_new(fo, "backing-fmt", json_string(lam_node_format(bk)));
            } else {
                *sync = LAM_SYNC_FULL; /* nothing below: top is full */
            }
        } else if (*sync == LAM_SYNC_NONE && *lam_node_filename(source)) {
            json_object_set_new(fo, "backing-file", json_string(lam_node_filename(source)));
            json_object_set_new(fo, "backing-fmt", json_string(lam_node_format(source)));
        }
    }
    fprintf(stderr, "Formatting '%s', fmt=%s size=%lld\n", filename, fmt, (long long)size);
    int ret = lam_create_image(filename, fmt, size, fo, errp);
    json_decref(fo);
    return ret;
}

int lam_qmp_drive_backup(json_t *args, LamError **errp)
{
    LamNode *source = lookup(lam_opt_str(args, "device", NULL), errp);
    if (!source) {
        return -ENOENT;
    }
    const char *filename = lam_opt_str(args, "target", NULL);
    const char *format = lam_opt_str(args, "format", NULL);
    const char *mode = lam_opt_str(args, "mode", "absolute-paths");
    if (!filename) {
        lam_error_setg(errp, "Parameter 'target' is missing");
        return -EINVAL;
    }
    if (format && !lam_driver_find(format)) {
        lam_error_setg(errp, "Unknown file format '%s'", format);
        return -EINVAL;
    }
    LamBackupParams p;
    if (parse_backup_args(args, &p, source, errp) < 0) {
        return -EINVAL;
    }
    bool existing = !strcmp(mode, "existing");
    if (!existing && strcmp(mode, "absolute-paths")) {
        lam_error_setg(errp, "Parameter 'mode' does not accept value '%s'", mode);
        return -EINVAL;
    }
    const char *fmt = format ? format : lam_node_format(source);
    if (!existing && create_target(source, filename, fmt, &p.sync, errp) < 0) {
        return -EIO;
    }
    LamNode *target;
    if (existing && !format) {
        target = lam_open_image(filename, NULL, LAM_O_RDWR, NULL, errp);
    } else {
        json_t *o;
        const LamDriver *drv = lam_driver_find(fmt);
        if (drv && drv->kind == LAM_DRV_PROTOCOL) {
            o = json_pack("{s:s, s:s}", "driver", fmt, "filename", filename);
        } else {
            o = json_pack("{s:s, s:{s:s, s:s}}", "driver", fmt, "file", "driver", "file",
                          "filename", filename);
            if (drv && drv->supports_backing && !existing) {
                if (p.sync == LAM_SYNC_NONE) {
                    /* The fleecing layout: backed by the live source. */
                    json_object_set_new(o, "backing", json_string(lam_node_name(source)));
                } else if (p.sync == LAM_SYNC_FULL) {
                    json_object_set_new(o, "backing", json_null());
                }
            }
        }
        target = lam_node_open(o, LAM_O_RDWR, errp);
        json_decref(o);
    }
    if (!target) {
        return -EIO;
    }
    LamJob *job = lam_backup_start(source, target, &p, errp);
    if (!job) {
        lam_node_unref(target);
        return -EINVAL;
    }
    backup_own_target(job);
    return 0;
}

/* ---- blockdev-create ---- */

/* Image creation opens and attaches nodes, which only the control thread
 * may do: the image is created when the command runs, and the job thread
 * reports the outcome, so the job shows QEMU's statuses and events. */
typedef struct CreateJob {
    LamJob common;
    int ret;
    LamError *err;
} CreateJob;

static int create_run(LamJob *job, LamError **errp)
{
    CreateJob *c = (CreateJob *)job;
    lam_job_progress_set_remaining(job, 1);
    if (c->ret == 0) {
        lam_job_progress_update(job, 1);
    } else if (c->err) {
        lam_error_propagate(errp, c->err);
        c->err = NULL;
    }
    return c->ret;
}

static void create_free(LamJob *job)
{
    CreateJob *c = (CreateJob *)job;
    lam_error_free(c->err);
}

static const LamJobDriver create_driver = {
    .type = "create",
    .instance_size = sizeof(CreateJob),
    .block_job = false,
    .run = create_run,
    .free = create_free,
};

int lam_qmp_blockdev_create(json_t *args, LamError **errp)
{
    const char *id = lam_opt_str(args, "job-id", NULL);
    json_t *options = json_object_get(args, "options");
    if (!id) {
        lam_error_setg(errp, "Parameter 'job-id' is missing");
        return -EINVAL;
    }
    if (!json_is_object(options)) {
        lam_error_setg(errp, "Parameter 'options' is missing");
        return -EINVAL;
    }
    /* blockdev-create jobs conclude and wait for job-dismiss. */
    CreateJob *c = (CreateJob *)lam_job_create(&create_driver, id, 0, true, false, errp);
    if (!c) {
        return -EINVAL;
    }
    c->ret = lam_create(options, &c->err);
    if (c->ret < 0 && !c->err) {
        lam_error_setg_errno(&c->err, c->ret, "Could not create image");
    }
    lam_job_start(&c->common);
    return 0;
}
