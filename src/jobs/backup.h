/* Backup jobs (blockdev-backup, drive-backup) and blockdev-create jobs. */
#ifndef LAMINA_JOBS_BACKUP_H
#define LAMINA_JOBS_BACKUP_H

#include "jobs/job.h"
#include "lamina/block.h"

typedef enum { LAM_SYNC_TOP, LAM_SYNC_FULL, LAM_SYNC_NONE } LamSyncMode;

typedef struct LamBackupParams {
    const char *job_id;
    LamSyncMode sync;
    bool compress;
    int64_t speed;
    bool auto_finalize;
    bool auto_dismiss;
    const char *filter_node_name;    /* NULL: implicit, auto-named */
    LamOnError on_source_error;
    LamOnError on_target_error;
    const char *on_cbw_error;        /* NULL: break-guest-write */
    int max_workers;                 /* x-perf.max-workers (default 64) */
    int64_t max_chunk;               /* x-perf.max-chunk (0: engine default) */
    int64_t min_cluster_size;        /* x-perf.min-cluster-size (0: default) */
    bool discard_source;             /* discard what was copied (9.1) */
    bool use_copy_range;             /* x-perf.use-copy-range: copy offload */
} LamBackupParams;

void lam_backup_params_init(LamBackupParams *p);

/* Starts a backup of source into target: inserts a copy-before-write
 * filter above source (its parents move onto it) for the job's lifetime,
 * then copies in the background per sync mode.  Control thread. */
LamJob *lam_backup_start(LamNode *source, LamNode *target, const LamBackupParams *p,
                         LamError **errp);

/* QMP argument handling (the QMP handlers are thin wrappers). */
int lam_qmp_blockdev_backup(json_t *args, LamError **errp);
int lam_qmp_drive_backup(json_t *args, LamError **errp);
int lam_qmp_blockdev_create(json_t *args, LamError **errp);

#endif
