/* Generic jobs: QEMU's job model (statuses, transitions, verbs, events).
 *
 * A job is created and controlled on the control thread (QMP commands,
 * lamina-img) and does its work in its own thread (`run`).  Everything a
 * job does to the graph (inserting or removing filters) happens in the
 * driver's prepare/commit/abort/clean callbacks, which run on the control
 * thread: when `run` returns, the job thread queues the job for completion
 * and the control thread finishes it in lam_job_dispatch().
 *
 * Integration with a main loop: poll lam_job_main_fd() for readability and
 * call lam_job_dispatch() when it is readable.  Synchronous users (tests,
 * lamina-img) call lam_job_run_until_done() / lam_job_wait_status().
 *
 * LOCKING: one global mutex (job.c: job_lock) protects every field of every
 * job marked "[L]" below and the job list.  It is taken by the control
 * thread (verbs, queries, completion) and by job threads (pause points,
 * status changes, error actions).  Events are emitted while it is held so
 * that their order matches the order of the status changes; the event sink
 * must therefore never call back into this API.  Lock order: job_lock is
 * taken before any block-layer lock (never hold a block lock and then call
 * into this API).  Drivers' own state has its own locks.
 */
#ifndef LAMINA_JOBS_JOB_H
#define LAMINA_JOBS_JOB_H

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "jobs/ratelimit.h"
#include "lamina/error.h"

typedef enum {
    LAM_JOB_STATUS_UNDEFINED,
    LAM_JOB_STATUS_CREATED,
    LAM_JOB_STATUS_RUNNING,
    LAM_JOB_STATUS_PAUSED,
    LAM_JOB_STATUS_READY,
    LAM_JOB_STATUS_STANDBY,
    LAM_JOB_STATUS_WAITING,
    LAM_JOB_STATUS_PENDING,
    LAM_JOB_STATUS_ABORTING,
    LAM_JOB_STATUS_CONCLUDED,
    LAM_JOB_STATUS_NULL,
    LAM_JOB_STATUS__MAX,
} LamJobStatus;

typedef enum {
    LAM_JOB_VERB_CANCEL,
    LAM_JOB_VERB_PAUSE,
    LAM_JOB_VERB_RESUME,
    LAM_JOB_VERB_SET_SPEED,
    LAM_JOB_VERB_COMPLETE,
    LAM_JOB_VERB_FINALIZE,
    LAM_JOB_VERB_DISMISS,
    LAM_JOB_VERB_CHANGE,
    LAM_JOB_VERB__MAX,
} LamJobVerb;

/* BlockdevOnError */
typedef enum {
    LAM_ONERR_REPORT,
    LAM_ONERR_IGNORE,
    LAM_ONERR_ENOSPC,
    LAM_ONERR_STOP,
    LAM_ONERR_AUTO,
} LamOnError;

/* BlockErrorAction */
typedef enum { LAM_ACTION_REPORT, LAM_ACTION_IGNORE, LAM_ACTION_STOP } LamErrorAction;

typedef enum { LAM_IOSTATUS_OK, LAM_IOSTATUS_FAILED, LAM_IOSTATUS_NOSPACE } LamIoStatus;

const char *lam_job_status_name(LamJobStatus s);
const char *lam_job_verb_name(LamJobVerb v);
int lam_on_error_parse(const char *s, LamOnError *out); /* 0 / -EINVAL */
const char *lam_on_error_name(LamOnError e);

/* The tables of §4.2 / §4.3 (exported for the exhaustive unit test). */
bool lam_job_transition_allowed(LamJobStatus from, LamJobStatus to);
bool lam_job_verb_allowed(LamJobVerb verb, LamJobStatus s);

typedef struct LamJob LamJob;
/* A job transaction (QMP transaction with completion-mode grouped): its
 * jobs wait in `waiting` for each other, become pending and are finalized
 * together, and a failure or cancel of one force-cancels the others. */
typedef struct LamJobTxn LamJobTxn;

typedef struct LamJobDriver {
    const char *type;        /* JobType: "backup", "create", ... */
    size_t instance_size;    /* >= sizeof(LamJob); the job is calloc'ed */
    bool block_job;          /* BLOCK_JOB_* events, listed by query-block-jobs */

    /* Job thread.  Returns 0 or -errno; on failure may set *errp (the text
     * shown as "error"); otherwise strerror is used. */
    int (*run)(LamJob *job, LamError **errp);

    /* Control thread, all optional. */
    void (*complete)(LamJob *job, LamError **errp); /* verb complete */
    int (*prepare)(LamJob *job);  /* at finalize; failure aborts the job */
    void (*commit)(LamJob *job);
    void (*abort)(LamJob *job);
    void (*clean)(LamJob *job);   /* after commit or abort */
    void (*free)(LamJob *job);    /* release driver state */
    /* A cancel was requested: wake anything the run function blocks on
     * that the job layer does not know about.  Returns the effective
     * force flag (mirror: soft cancel only when ready). NULL: force. */
    bool (*cancel)(LamJob *job, bool force);
    /* Called (job_lock held, any thread) when pause/resume/cancel/speed
     * change so that a driver blocked on its own condition can re-check. */
    void (*kick)(LamJob *job);
} LamJobDriver;

struct LamJob {
    const LamJobDriver *drv;
    char *id;                 /* NULL for internal jobs (no events) */

    /* [L] state */
    LamJobStatus status;
    int pause_count;          /* > 0: should pause at the next pause point */
    bool paused;              /* sleeping at a pause point */
    LamJobStatus pause_prev;  /* status to return to when resumed */
    bool user_paused;
    bool cancelled;
    bool force_cancel;
    bool started;
    bool run_done;            /* run() returned (deferred to control thread) */
    bool auto_finalize;
    bool auto_dismiss;
    bool busy;
    bool wakeup;              /* a kick arrived since the job last slept */
    bool deferred;            /* completion has begun on the control thread */
    LamIoStatus iostatus;
    int ret;                  /* result of run(), -ECANCELED when cancelled */
    char *err_msg;            /* error text for queries and events */
    int64_t speed;
    LamRateLimit limit;
    int refcnt;
    struct LamJob *next;      /* job list */
    pthread_cond_t cond;      /* wakes the job thread (pause, sleep, cancel) */

    /* Progress: written by the job thread, read by queries. */
    _Atomic int64_t progress_current;
    _Atomic int64_t progress_total;
    int64_t start_ns;         /* [L] monotonic time run() started */
    int64_t paused_ns;        /* [L] accumulated paused time */
    int64_t pause_start_ns;   /* [L] */

    /* Block-job error policies (set at creation; read only afterwards). */
    LamOnError on_source_error;
    LamOnError on_target_error;

    pthread_t thread;
    bool thread_started;

    /* The job's own requests in flight outside its thread (copy workers):
     * a drained section waits for them.  Atomic; see lam_job_io_end. */
    _Atomic int io_in_flight;
    bool drain_paused;        /* [L] paused by a drained section */

    LamJobTxn *txn;           /* [L] NULL: a transaction of its own */
    struct LamJob *txn_next;  /* [L] */
};

/* ---- control thread ---- */

/* Creates a job in status created.  id NULL makes an internal job.
 * Errors: "Invalid job ID 'x'", "Job ID 'x' already in use",
 * "Parameter 'speed' expects a non-negative value". */
LamJob *lam_job_create(const LamJobDriver *drv, const char *id, int64_t speed,
                       bool auto_finalize, bool auto_dismiss, LamError **errp);
/* Transactions (control thread).  Add jobs before starting them. */
LamJobTxn *lam_job_txn_new(void);
void lam_job_txn_add(LamJobTxn *txn, LamJob *job);
void lam_job_txn_unref(LamJobTxn *txn);

/* Destroys a job that was never started (creation failed after
 * lam_job_create): created -> null. */
void lam_job_early_fail(LamJob *job);
/* created -> running; starts the job thread. */
void lam_job_start(LamJob *job);
/* Same, inside the caller's drained section: the job pauses at once
 * (running, paused) and lam_drain_end() resumes it (running), the
 * sequence QEMU's clients see for jobs started in a transaction. */
void lam_job_start_drained(LamJob *job);

LamJob *lam_job_find(const char *id);
/* Iterates the job list (job_lock is taken and released inside). */
void lam_job_foreach(void (*fn)(LamJob *job, void *opaque), void *opaque);

/* Verbs.  Each checks the verb table first and fails with QEMU's message
 * "Job 'x' in state 's' cannot accept command verb 'v'". */
int lam_job_user_pause(LamJob *job, LamError **errp);
int lam_job_user_resume(LamJob *job, LamError **errp);
/* block-job-cancel: force=false refuses a user-paused job. job-cancel
 * passes force=true (resumes a user-paused job first). */
int lam_job_user_cancel(LamJob *job, bool force, bool block_job_cmd,
                        LamError **errp);
int lam_job_complete(LamJob *job, LamError **errp);
int lam_job_finalize(LamJob *job, LamError **errp);
int lam_job_dismiss(LamJob *job, LamError **errp);
int lam_job_set_speed(LamJob *job, int64_t speed, LamError **errp);

/* Cancels every job (force) and waits until all are gone (quit). */
void lam_job_cancel_all_sync(void);

/* QMP JobInfo / BlockJobInfo objects (new references). */
json_t *lam_job_info(LamJob *job);
json_t *lam_block_job_info(LamJob *job);
json_t *lam_query_jobs(void);
json_t *lam_query_block_jobs(void);

/* Main-loop integration: readable when some job needs the control thread. */
int lam_job_main_fd(void);
void lam_job_dispatch(void);
/* Dispatches until the job reaches `status` (or null / is gone).  Returns
 * true if reached, false on timeout (timeout_ms < 0: forever).  Takes a
 * reference for the duration. */
bool lam_job_wait_status(LamJob *job, LamJobStatus status, int timeout_ms);
/* Dispatches until the job is concluded or gone; returns its ret. */
int lam_job_run_until_done(LamJob *job);

void lam_job_ref(LamJob *job);
void lam_job_unref(LamJob *job);

/* ---- job thread ---- */

bool lam_job_is_cancelled(LamJob *job);       /* forced cancel requested */
/* A pause is pending: stop issuing I/O and reach lam_job_pause_point(). */
bool lam_job_pause_requested(LamJob *job);
/* One request counted in io_in_flight finished (any thread). */
void lam_job_io_end(LamJob *job);
bool lam_job_cancel_requested(LamJob *job);   /* any cancel */
/* Sleeps here while the job is paused (status paused/standby). */
void lam_job_pause_point(LamJob *job);
/* Sleeps up to ns (woken early by cancel, pause or speed change), then
 * pauses if requested.  ns < 0: until woken. */
void lam_job_sleep_ns(LamJob *job, int64_t ns);
/* Accounts `bytes` of background copying against the speed limit and
 * sleeps as long as the limit demands; a pending pause or cancel ends
 * the wait early.  Never pauses itself: callers reach their own pause
 * point once nothing of theirs is in flight. */
void lam_job_ratelimit(LamJob *job, uint64_t bytes);
/* running -> ready, BLOCK_JOB_READY. */
void lam_job_transition_to_ready(LamJob *job);
/* Applies the on-error policy to an error of the job's own I/O: emits
 * BLOCK_JOB_ERROR; for stop, pauses the job (user-paused) and sets
 * io-status.  Returns the action to take. */
LamErrorAction lam_job_error_action(LamJob *job, LamOnError policy,
                                    bool is_read, int err);

void lam_job_progress_update(LamJob *job, int64_t done);
void lam_job_progress_set_remaining(LamJob *job, int64_t remaining);
void lam_job_progress_increase_remaining(LamJob *job, int64_t delta);

/* Monotonic clock in ns. */
int64_t lam_clock_ns(void);

#endif
