/* query-jobs / query-block-jobs: JobInfo and BlockJobInfo objects. */
#include "jobs/job-internal.h"

static const char *iostatus_name(LamIoStatus s)
{
    switch (s) {
    case LAM_IOSTATUS_FAILED: return "failed";
    case LAM_IOSTATUS_NOSPACE: return "nospace";
    default: return "ok";
    }
}

/* Our extension: average rate (bytes/s) over the time the job was not
 * paused, and the estimated seconds left at that rate (-1: unknown). */
static void add_rate_eta(LamJob *job, json_t *o, int64_t cur, int64_t total)
{
    int64_t rate = 0, eta = -1;
    if (job->started && job->start_ns) {
        int64_t active = lam_clock_ns() - job->start_ns - job->paused_ns;
        if (job->paused) {
            active -= lam_clock_ns() - job->pause_start_ns;
        }
        if (active > 0) {
            rate = (int64_t)((double)cur * 1e9 / (double)active);
        }
        if (rate > 0) {
            eta = (total - cur + rate - 1) / rate;
        } else if (cur >= total) {
            eta = 0;
        }
    }
    json_object_set_new(o, "rate", json_integer(rate));
    json_object_set_new(o, "eta", json_integer(eta));
}

static json_t *job_info_locked(LamJob *job)
{
    int64_t cur = atomic_load(&job->progress_current);
    int64_t total = atomic_load(&job->progress_total);
    json_t *o = json_pack("{s:s, s:s, s:s, s:I, s:I}", "id", job->id, "type",
                          job->drv->type, "status", lam_job_status_name(job->status),
                          "current-progress", (json_int_t)cur,
                          "total-progress", (json_int_t)total);
    if (job->ret && job->err_msg) {
        json_object_set_new(o, "error", json_string(job->err_msg));
    }
    add_rate_eta(job, o, cur, total);
    return o;
}

static json_t *block_job_info_locked(LamJob *job)
{
    int64_t cur = atomic_load(&job->progress_current);
    int64_t total = atomic_load(&job->progress_total);
    bool ready = job->status == LAM_JOB_STATUS_READY ||
                 job->status == LAM_JOB_STATUS_STANDBY;
    json_t *o = json_pack(
        "{s:s, s:s, s:I, s:I, s:b, s:b, s:I, s:s, s:b, s:s, s:b, s:b}",
        "type", job->drv->type, "device", job->id, "len", (json_int_t)total,
        "offset", (json_int_t)cur, "busy", job->busy, "paused", job->pause_count > 0,
        "speed", (json_int_t)job->speed, "io-status", iostatus_name(job->iostatus),
        "ready", ready, "status", lam_job_status_name(job->status),
        "auto-finalize", job->auto_finalize, "auto-dismiss", job->auto_dismiss);
    if (job->ret && job->err_msg) {
        json_object_set_new(o, "error", json_string(job->err_msg));
    }
    add_rate_eta(job, o, cur, total);
    return o;
}

json_t *lam_job_info(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    json_t *o = job_info_locked(job);
    pthread_mutex_unlock(&job_lock);
    return o;
}

json_t *lam_block_job_info(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    json_t *o = block_job_info_locked(job);
    pthread_mutex_unlock(&job_lock);
    return o;
}

static void add_job(LamJob *job, void *opaque)
{
    if (job->id) {
        json_array_append_new(opaque, job_info_locked(job));
    }
}

static void add_block_job(LamJob *job, void *opaque)
{
    if (job->id && job->drv->block_job) {
        json_array_append_new(opaque, block_job_info_locked(job));
    }
}

json_t *lam_query_jobs(void)
{
    json_t *a = json_array();
    lam_job_foreach(add_job, a);
    return a;
}

json_t *lam_query_block_jobs(void)
{
    json_t *a = json_array();
    lam_job_foreach(add_block_job, a);
    return a;
}
