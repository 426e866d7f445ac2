/* QMP commands of the job layer: job-*, block-job-*, query-jobs,
 * query-block-jobs, blockdev-backup, drive-backup, blockdev-create; and
 * the blockdev-add schemas of copy-before-write, snapshot-access and
 * blkdebug.
 *
 * Registered from a constructor (static tables, before main); the job
 * layer's main-loop fd is watched from the first command that needs it
 * (the loop exists by then).  Handlers run on the control thread. */
#include <poll.h>
#include <string.h>

#include "daemon/loop.h"
#include "jobs/backup.h"
#include "jobs/job.h"
#include "qmp/blockdev-schema.h"
#include "qmp/qmp.h"

static void on_job_fd(int fd, short revents, void *opaque)
{
    lam_job_dispatch();
}

/* Control thread only. */
static bool fd_watched;

static void ensure_watch(void)
{
    if (!fd_watched) {
        lam_loop_set_fd(lam_job_main_fd(), POLLIN, on_job_fd, NULL);
        fd_watched = true;
    }
}

static LamJob *find_block_job(json_t *args, const char *key, LamError **errp)
{
    const char *id = json_string_value(json_object_get(args, key));
    LamJob *job = id ? lam_job_find(id) : NULL;
    if (!job || !job->drv->block_job) {
        lam_error_set(errp, LAM_ERR_DEVICE_NOT_ACTIVE, "Block job '%s' not found",
                      id ? id : "");
        return NULL;
    }
    return job;
}

static LamJob *find_job(json_t *args, LamError **errp)
{
    const char *id = json_string_value(json_object_get(args, "id"));
    LamJob *job = id ? lam_job_find(id) : NULL;
    if (!job) {
        lam_error_setg(errp, "Job not found");
    }
    return job;
}

/* ---- job-* ---- */

#define JOB_CMD(fn, call)                                                     \
    static json_t *fn(json_t *args, QmpSession *s, LamError **errp)           \
    {                                                                         \
        ensure_watch();                                                       \
        LamJob *job = find_job(args, errp);                                   \
        if (job) {                                                            \
            call;                                                             \
        }                                                                     \
        return NULL;                                                          \
    }

JOB_CMD(cmd_job_pause, lam_job_user_pause(job, errp))
JOB_CMD(cmd_job_resume, lam_job_user_resume(job, errp))
JOB_CMD(cmd_job_cancel, lam_job_user_cancel(job, true, false, errp))
JOB_CMD(cmd_job_complete, lam_job_complete(job, errp))
JOB_CMD(cmd_job_finalize, lam_job_finalize(job, errp))
JOB_CMD(cmd_job_dismiss, lam_job_dismiss(job, errp))

/* ---- block-job-* ---- */

#define BLOCK_JOB_CMD(fn, key, call)                                          \
    static json_t *fn(json_t *args, QmpSession *s, LamError **errp)           \
    {                                                                         \
        ensure_watch();                                                       \
        LamJob *job = find_block_job(args, key, errp);                        \
        if (job) {                                                            \
            call;                                                             \
        }                                                                     \
        return NULL;                                                          \
    }

BLOCK_JOB_CMD(cmd_bj_pause, "device", lam_job_user_pause(job, errp))
BLOCK_JOB_CMD(cmd_bj_resume, "device", lam_job_user_resume(job, errp))
BLOCK_JOB_CMD(cmd_bj_complete, "device", lam_job_complete(job, errp))
BLOCK_JOB_CMD(cmd_bj_finalize, "id", lam_job_finalize(job, errp))
BLOCK_JOB_CMD(cmd_bj_dismiss, "id", lam_job_dismiss(job, errp))
BLOCK_JOB_CMD(cmd_bj_cancel, "device",
              lam_job_user_cancel(job, json_is_true(json_object_get(args, "force")), true,
                                  errp))
BLOCK_JOB_CMD(cmd_bj_set_speed, "device",
              lam_job_set_speed(job, json_integer_value(json_object_get(args, "speed")),
                                errp))

static json_t *cmd_query_jobs(json_t *args, QmpSession *s, LamError **errp)
{
    ensure_watch();
    return lam_query_jobs();
}

static json_t *cmd_query_block_jobs(json_t *args, QmpSession *s, LamError **errp)
{
    ensure_watch();
    return lam_query_block_jobs();
}

static json_t *cmd_blockdev_backup(json_t *args, QmpSession *s, LamError **errp)
{
    ensure_watch();
    lam_qmp_blockdev_backup(args, errp);
    return NULL;
}

static json_t *cmd_drive_backup(json_t *args, QmpSession *s, LamError **errp)
{
    ensure_watch();
    lam_qmp_drive_backup(args, errp);
    return NULL;
}

static json_t *cmd_blockdev_create(json_t *args, QmpSession *s, LamError **errp)
{
    ensure_watch();
    lam_qmp_blockdev_create(args, errp);
    return NULL;
}

/* ---- schemas ---- */

static const QmpMember id_members[] = {{"id", &qmp_t_str}, {NULL}};
static const QmpType id_type = {QMP_T_OBJECT, "object", id_members};
static const QmpMember device_members[] = {{"device", &qmp_t_str}, {NULL}};
static const QmpType device_type = {QMP_T_OBJECT, "object", device_members};
static const QmpMember cancel_members[] = {
    {"device", &qmp_t_str}, {"force", &qmp_t_bool, true, "false"}, {NULL}};
static const QmpType cancel_type = {QMP_T_OBJECT, "object", cancel_members};
static const QmpMember speed_members[] = {
    {"device", &qmp_t_str}, {"speed", &qmp_t_int}, {NULL}};
static const QmpType speed_type = {QMP_T_OBJECT, "object", speed_members};

static const char *const sync_values[] = {"top", "full", "none", "incremental", "bitmap", NULL};
static const QmpType sync_enum = {QMP_T_ENUM, "MirrorSyncMode", .values = sync_values};
static const char *const onerr_values[] = {"report", "ignore", "enospc", "stop", "auto", NULL};
static const QmpType onerr_enum = {QMP_T_ENUM, "BlockdevOnError", .values = onerr_values};
static const char *const bmode_values[] = {"on-success", "never", "always", NULL};
static const QmpType bmode_enum = {QMP_T_ENUM, "BitmapSyncMode", .values = bmode_values};
static const char *const cbwerr_values[] = {"break-guest-write", "break-snapshot", NULL};
static const QmpType cbwerr_enum = {QMP_T_ENUM, "OnCbwError", .values = cbwerr_values};
static const char *const mode_values[] = {"existing", "absolute-paths", NULL};
static const QmpType mode_enum = {QMP_T_ENUM, "NewImageMode", .values = mode_values};
static const QmpMember perf_members[] = {
    {"use-copy-range", &qmp_t_bool, true}, {"max-workers", &qmp_t_int, true},
    {"max-chunk", &qmp_t_int, true}, {"min-cluster-size", &qmp_t_size, true}, {NULL}};
static const QmpType perf_type = {QMP_T_OBJECT, "BackupPerf", perf_members};

#define BACKUP_COMMON                                                          \
    {"job-id", &qmp_t_str, true}, {"device", &qmp_t_str},                      \
    {"sync", &sync_enum}, {"speed", &qmp_t_int, true},                         \
    {"bitmap", &qmp_t_str, true}, {"bitmap-mode", &bmode_enum, true},          \
    {"compress", &qmp_t_bool, true}, {"on-source-error", &onerr_enum, true},   \
    {"on-target-error", &onerr_enum, true}, {"auto-finalize", &qmp_t_bool, true}, \
    {"auto-dismiss", &qmp_t_bool, true}, {"filter-node-name", &qmp_t_str, true}, \
    {"discard-source", &qmp_t_bool, true}, {"x-perf", &perf_type, true},       \
    {"on-cbw-error", &cbwerr_enum, true}

static const QmpMember blockdev_backup_members[] = {
    BACKUP_COMMON, {"target", &qmp_t_str}, {NULL}};
static const QmpType blockdev_backup_type = {QMP_T_OBJECT, "BlockdevBackup",
                                             blockdev_backup_members};
static const QmpMember drive_backup_members[] = {
    BACKUP_COMMON, {"target", &qmp_t_str}, {"format", &qmp_t_str, true},
    {"mode", &mode_enum, true}, {NULL}};
static const QmpType drive_backup_type = {QMP_T_OBJECT, "DriveBackup", drive_backup_members};
static const QmpMember create_members[] = {
    {"job-id", &qmp_t_str}, {"options", &qmp_t_any}, {NULL}};
static const QmpType create_type = {QMP_T_OBJECT, "object", create_members};

static const QmpCommandDef job_cmds[] = {
    {"job-pause", &id_type, cmd_job_pause},
    {"job-resume", &id_type, cmd_job_resume},
    {"job-cancel", &id_type, cmd_job_cancel},
    {"job-complete", &id_type, cmd_job_complete},
    {"job-finalize", &id_type, cmd_job_finalize},
    {"job-dismiss", &id_type, cmd_job_dismiss},
    {"block-job-pause", &device_type, cmd_bj_pause},
    {"block-job-resume", &device_type, cmd_bj_resume},
    {"block-job-complete", &device_type, cmd_bj_complete},
    {"block-job-cancel", &cancel_type, cmd_bj_cancel},
    {"block-job-set-speed", &speed_type, cmd_bj_set_speed},
    {"block-job-finalize", &id_type, cmd_bj_finalize},
    {"block-job-dismiss", &id_type, cmd_bj_dismiss},
    {"query-jobs", NULL, cmd_query_jobs},
    {"query-block-jobs", NULL, cmd_query_block_jobs},
    {"blockdev-backup", &blockdev_backup_type, cmd_blockdev_backup},
    {"drive-backup", &drive_backup_type, cmd_drive_backup},
    {"blockdev-create", &create_type, cmd_blockdev_create},
    {NULL},
};

/* blockdev-add option sets of this layer's drivers. */
static const QmpMember cbw_bitmap_members[] = {
    {"node", &qmp_t_str}, {"name", &qmp_t_str}, {NULL}};
static const QmpType cbw_bitmap_type = {QMP_T_OBJECT, "BlockDirtyBitmap", cbw_bitmap_members};
static const QmpMember cbw_members[] = {
    {"file", &qmp_blockdev_ref}, {"target", &qmp_blockdev_ref},
    {"bitmap", &cbw_bitmap_type, true}, {"on-cbw-error", &cbwerr_enum, true},
    {"cbw-timeout", &qmp_t_uint32, true}, {"min-cluster-size", &qmp_t_size, true},
    {"x-granularity", &qmp_t_size, true}, {NULL}};
static const QmpMember snap_members[] = {{"file", &qmp_blockdev_ref}, {NULL}};

static const char *const iotype_values[] = {"read", "write", "write-zeroes", "discard",
                                            "flush", "block-status", NULL};
static const QmpType iotype_enum = {QMP_T_ENUM, "BlkdebugIOType", .values = iotype_values};
static const QmpMember inject_members[] = {
    {"event", &qmp_t_str}, {"state", &qmp_t_int, true}, {"iotype", &iotype_enum, true},
    {"errno", &qmp_t_int, true}, {"sector", &qmp_t_int, true}, {"once", &qmp_t_bool, true},
    {"immediately", &qmp_t_bool, true}, {NULL}};
static const QmpType inject_type = {QMP_T_OBJECT, "BlkdebugInjectErrorOptions", inject_members};
static const QmpType inject_list = {QMP_T_LIST, "array", .elem = &inject_type};
static const QmpMember setstate_members[] = {
    {"event", &qmp_t_str}, {"state", &qmp_t_int, true}, {"new_state", &qmp_t_int}, {NULL}};
static const QmpType setstate_type = {QMP_T_OBJECT, "BlkdebugSetStateOptions", setstate_members};
static const QmpType setstate_list = {QMP_T_LIST, "array", .elem = &setstate_type};
static const QmpType str_list = {QMP_T_LIST, "array", .elem = &qmp_t_str};
static const QmpMember blkdebug_members[] = {
    {"image", &qmp_blockdev_ref}, {"config", &qmp_t_str, true}, {"align", &qmp_t_int, true},
    {"max-transfer", &qmp_t_int, true}, {"opt-write-zero", &qmp_t_int, true},
    {"max-write-zero", &qmp_t_int, true}, {"opt-discard", &qmp_t_int, true},
    {"max-discard", &qmp_t_int, true}, {"inject-error", &inject_list, true},
    {"set-state", &setstate_list, true}, {"take-child-perms", &str_list, true},
    {"unshare-child-perms", &str_list, true}, {"x-read-delay-us", &qmp_t_int, true}, {NULL}};

__attribute__((constructor)) static void qmp_jobs_register(void)
{
    qmp_register(job_cmds);
    qmp_blockdev_register_driver("copy-before-write", cbw_members);
    qmp_blockdev_register_driver("snapshot-access", snap_members);
    qmp_blockdev_register_driver("blkdebug", blkdebug_members);
}
