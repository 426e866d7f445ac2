/* Backup job: a copy-before-write filter above the source keeps the
 * point-in-time view in the target while the copy engine copies the rest
 * (sync full/top) or nothing (sync none: fleecing).
 *
 * Graph changes (insert filter, remove filter) happen on the control
 * thread between lam_drain_begin/end: at creation and in clean().  The job
 * thread only does I/O through the filter's child edges. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/backup.h"
#include "jobs/cbw.h"
#include "lamina/driver.h"

typedef struct BackupJob {
    LamJob common;
    LamNode *source;
    LamNode *target;
    LamNode *filter;        /* our copy-before-write node (one reference) */
    LamBlockCopy *bcs;
    LamSyncMode sync;
    int max_workers;
    int64_t max_chunk;
    /* Fleecing: the target's backing edge onto the source, whose shared
     * permissions we widened to let the filter write the source. */
    LamChild *relaxed_edge;
    uint64_t relaxed_old_shared;
    bool own_target;        /* drive-backup: we opened the target */
    /* The job's own uses of its nodes ("backup job 'id'"), taking nothing
     * and sharing everything: they make the nodes busy for blockdev-del
     * and show the job in graph queries. */
    LamChild *job_root_filter;
    LamChild *job_root_target;
} BackupJob;

void lam_backup_params_init(LamBackupParams *p)
{
    memset(p, 0, sizeof(*p));
    p->sync = LAM_SYNC_FULL;
    p->auto_finalize = true;
    p->auto_dismiss = true;
    p->on_source_error = LAM_ONERR_REPORT;
    p->on_target_error = LAM_ONERR_REPORT;
    p->max_workers = 64;
}

static void backup_progress(void *opaque, int64_t bytes)
{
    lam_job_progress_update(opaque, bytes);
}

static int backup_run(LamJob *job, LamError **errp)
{
    BackupJob *b = (BackupJob *)job;
    if (b->sync == LAM_SYNC_NONE) {
        /* Only copy-before-write copies; idle until cancelled. */
        while (!lam_job_is_cancelled(job)) {
            lam_job_sleep_ns(job, -1);
        }
        return 0;
    }
    if (b->sync == LAM_SYNC_TOP) {
        int64_t removed = lam_block_copy_reset_unallocated(b->bcs, job);
        if (removed < 0) {
            return removed == -ECANCELED ? 0 : (int)removed;
        }
        lam_job_progress_set_remaining(job, lam_block_copy_dirty_bytes(b->bcs));
    }
    int ret = lam_block_copy_run(b->bcs, job, b->max_workers, b->max_chunk,
                                 job->on_source_error, job->on_target_error, errp);
    if (ret == -ECANCELED) {
        return 0; /* the job layer turns a cancel into -ECANCELED */
    }
    /* No flush of the target here, as in QEMU: completion means every
     * cluster reached the target node; durability comes with the target's
     * flush or close (blockdev-del, quit), when its owner chooses to pay
     * for it (docs/jobs.md "Durability"). */
    return ret;
}

/* Removes the filter: its parents go back to the source. */
static void backup_clean(LamJob *job)
{
    BackupJob *b = (BackupJob *)job;
    if (!b->filter) {
        return;
    }
    lam_drain_begin();
    lam_root_detach(b->job_root_filter);
    lam_root_detach(b->job_root_target);
    b->job_root_filter = b->job_root_target = NULL;
    LamError *err = NULL;
    LamChild *fc = lam_cbw_source(b->filter);
    /* The filter is going away: it takes nothing any more, so its users
     * can move below it (giving up permissions never conflicts). */
    lam_child_set_perm(fc, 0, LAM_PERM_ALL, NULL);
    /* Back onto what the filter sits on: the source, or the filter of a
     * backup started after ours (filters stack, as in QEMU). */
    if (lam_node_replace(b->filter, fc->node, &err) < 0) {
        lam_warn("backup job '%s': could not remove the filter: %s",
                 job->id ? job->id : "", err->msg);
        lam_error_free(err);
    }
    if (b->relaxed_edge) {
        lam_child_set_perm(b->relaxed_edge, b->relaxed_edge->perm, b->relaxed_old_shared,
                           NULL);
        b->relaxed_edge = NULL;
    }
    LamNode *f = b->filter;
    b->filter = NULL;
    b->bcs = NULL;
    lam_node_unref(f);
    lam_drain_end();
}

static void backup_free(LamJob *job)
{
    BackupJob *b = (BackupJob *)job;
    if (b->filter) {
        backup_clean(job);
    }
    if (b->own_target && b->target) {
        /* Closing makes the drive-backup target durable, as QEMU's close
         * does (the job itself does not flush). */
        lam_node_flush_all(b->target);
        lam_node_unref(b->target);
    }
    b->target = NULL;
}

static const LamJobDriver backup_driver = {
    .type = "backup",
    .instance_size = sizeof(BackupJob),
    .block_job = true,
    .run = backup_run,
    .clean = backup_clean,
    .free = backup_free,
};

static bool chain_contains(LamNode *top, LamNode *needle)
{
    for (LamNode *n = top; n; n = lam_node_backing_node(n)) {
        if (n == needle) {
            return true;
        }
    }
    return false;
}

/* A node a job uses directly has a root edge "<type> job '<id>'". */
static bool node_busy(LamNode *bs, LamError **errp)
{
    for (LamChild *c = lam_node_parents(bs); c; c = c->next_parent) {
        const char *p = (!c->parent && c->user) ? strstr(c->user, " job '") : NULL;
        if (p) {
            lam_error_setg(errp, "Node '%s' is busy: block device is in use by block job: %.*s",
                           lam_node_name(bs), (int)(p - c->user), c->user);
            return true;
        }
    }
    return false;
}

/* In a fleecing layout (target backed by source) the target's backing
 * edge must let the filter write the source, as QEMU's permission
 * propagation does when the target's users share writes. */
static void relax_fleecing_edge(BackupJob *b)
{
    for (LamChild *c = lam_node_parents(b->source); c; c = c->next_parent) {
        if (c->parent && chain_contains(b->target, c->parent) &&
            !(c->shared & LAM_PERM_WRITE)) {
            b->relaxed_edge = c;
            b->relaxed_old_shared = c->shared;
            lam_child_set_perm(c, c->perm,
                               c->shared | LAM_PERM_WRITE | LAM_PERM_RESIZE, NULL);
            return;
        }
    }
}

LamJob *lam_backup_start(LamNode *source, LamNode *target, const LamBackupParams *p,
                         LamError **errp)
{
    if (source == target) {
        lam_error_setg(errp, "Source and target cannot be the same");
        return NULL;
    }
    int64_t slen = lam_node_length(source), tlen = lam_node_length(target);
    if (slen < 0 || tlen < 0) {
        lam_error_setg(errp, "Could not get the size of the %s",
                       slen < 0 ? "source" : "target");
        return NULL;
    }
    if (slen != tlen) {
        lam_error_setg(errp, "Source and target image have different sizes");
        return NULL;
    }
    if (p->max_workers < 1) {
        lam_error_setg(errp, "max-workers must be between 1 and 2147483647");
        return NULL;
    }
    if (p->max_chunk < 0) {
        lam_error_setg(errp, "max-chunk must be zero (which means no limit) or positive");
        return NULL;
    }
    if (p->compress &&
        !(lam_node_driver(target)->supported_write_flags & LAM_REQ_WRITE_COMPRESSED)) {
        lam_error_setg(errp, "Compression is not supported for this drive %s",
                       lam_node_name(target));
        return NULL;
    }
    if (p->filter_node_name && lam_node_find(p->filter_node_name)) {
        lam_error_setg(errp, "Could not create node: Duplicate nodes with node-name='%s'",
                       p->filter_node_name);
        return NULL;
    }
    if (lam_node_is_read_only(target)) {
        lam_error_setg(errp, "Could not create node: Block node is read-only");
        return NULL;
    }
    if (node_busy(source, errp) || node_busy(target, errp)) {
        return NULL;
    }

    BackupJob *b = (BackupJob *)lam_job_create(&backup_driver, p->job_id, p->speed,
                                               p->auto_finalize, p->auto_dismiss, errp);
    if (!b) {
        return NULL;
    }
    b->common.on_source_error = p->on_source_error;
    b->common.on_target_error = p->on_target_error;
    b->source = source;
    b->target = target;
    b->sync = p->sync;
    b->max_workers = p->max_workers;
    b->max_chunk = p->max_chunk;

    lam_drain_begin();
    relax_fleecing_edge(b);
    json_t *fopts = json_pack("{s:s, s:s, s:s, s:b}", "driver", "copy-before-write", "file",
                              lam_node_name(source), "target", lam_node_name(target),
                              "x-job-filter", 1);
    if (p->filter_node_name) {
        json_object_set_new(fopts, "node-name", json_string(p->filter_node_name));
    }
    if (p->on_cbw_error) {
        json_object_set_new(fopts, "on-cbw-error", json_string(p->on_cbw_error));
    }
    if (p->min_cluster_size) {
        json_object_set_new(fopts, "min-cluster-size", json_integer(p->min_cluster_size));
    }
    LamError *err = NULL;
    b->filter = lam_node_open(fopts, LAM_O_RDWR, &err);
    json_decref(fopts);
    if (!b->filter) {
        lam_error_prepend(&err, "Could not create node: ");
        goto fail;
    }
    b->filter->implicit = p->filter_node_name == NULL;
    lam_cbw_set_compress(b->filter, p->compress);
    b->bcs = lam_cbw_block_copy(b->filter);
    lam_block_copy_set_discard_source(b->bcs, p->discard_source);
    lam_block_copy_set_offload(b->bcs, p->use_copy_range);
    lam_block_copy_set_progress(b->bcs, backup_progress, &b->common);
    lam_job_progress_set_remaining(&b->common, lam_block_copy_dirty_bytes(b->bcs));
    if (lam_node_replace(source, b->filter, &err) < 0) {
        goto fail;
    }
    /* While the filter has parents nobody else may write or resize the
     * source (QEMU's copy-before-write permissions): a writer that
     * bypassed the filter would break the point-in-time view. */
    LamChild *fc = lam_cbw_source(b->filter);
    LamChild *tc = lam_cbw_target(b->filter);
    if (lam_child_set_perm(fc, LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                           LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE_UNCHANGED, &err) < 0 ||
        lam_child_set_perm(tc, LAM_PERM_WRITE,
                           LAM_PERM_ALL & ~(uint64_t)LAM_PERM_RESIZE, &err) < 0) {
        lam_child_set_perm(fc, 0, LAM_PERM_ALL, NULL);
        lam_node_replace(b->filter, source, NULL);
        goto fail;
    }
    char user[300];
    snprintf(user, sizeof(user), "backup job '%s'", p->job_id ? p->job_id : "");
    b->job_root_filter = lam_root_attach(b->filter, user, 0, LAM_PERM_ALL, NULL);
    b->job_root_target = lam_root_attach(target, user, 0, LAM_PERM_ALL, NULL);
    lam_job_start_drained(&b->common);
    lam_drain_end();
    return &b->common;

fail:
    if (b->filter) {
        lam_node_unref(b->filter);
        b->filter = NULL;
    }
    if (b->relaxed_edge) {
        lam_child_set_perm(b->relaxed_edge, b->relaxed_edge->perm, b->relaxed_old_shared,
                           NULL);
        b->relaxed_edge = NULL;
    }
    lam_drain_end();
    lam_error_propagate(errp, err);
    lam_job_early_fail(&b->common);
    return NULL;
}

/* Marks a drive-backup target to be released with the job. */
void backup_own_target(LamJob *job)
{
    ((BackupJob *)job)->own_target = true;
}
