/* The job state machine, verbs, lifecycle and main-loop hand-off.
 * Locking rules are in job.h. */
#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "jobs/job-internal.h"
#include "lamina/block.h"
#include "lamina/events.h"

/* job_lock protects every [L] field of every job, the job list, and the
 * completion notification state below. */
pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;
/* Broadcast (under job_lock) whenever a job changes status, so that
 * synchronous waiters re-check. */
static pthread_cond_t job_status_cond;
static LamJob *job_list;
static int main_efd = -1;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

static void job_init(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&job_status_cond, &a);
    pthread_condattr_destroy(&a);
    main_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

int64_t lam_clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static const char *const status_names[LAM_JOB_STATUS__MAX] = {
    "undefined", "created", "running", "paused", "ready", "standby",
    "waiting", "pending", "aborting", "concluded", "null",
};

static const char *const verb_names[LAM_JOB_VERB__MAX] = {
    "cancel", "pause", "resume", "set-speed", "complete", "finalize",
    "dismiss", "change",
};

const char *lam_job_status_name(LamJobStatus s)
{
    return (unsigned)s < LAM_JOB_STATUS__MAX ? status_names[s] : "?";
}

const char *lam_job_verb_name(LamJobVerb v)
{
    return (unsigned)v < LAM_JOB_VERB__MAX ? verb_names[v] : "?";
}

#define S(x) (1u << LAM_JOB_STATUS_##x)

/* Reference §4.2: allowed successors of each status. */
static const unsigned transitions[LAM_JOB_STATUS__MAX] = {
    [LAM_JOB_STATUS_UNDEFINED] = S(CREATED),
    [LAM_JOB_STATUS_CREATED] = S(RUNNING) | S(ABORTING) | S(NULL),
    [LAM_JOB_STATUS_RUNNING] = S(PAUSED) | S(READY) | S(WAITING) | S(ABORTING),
    [LAM_JOB_STATUS_PAUSED] = S(RUNNING),
    [LAM_JOB_STATUS_READY] = S(STANDBY) | S(WAITING) | S(ABORTING),
    [LAM_JOB_STATUS_STANDBY] = S(READY),
    [LAM_JOB_STATUS_WAITING] = S(PENDING) | S(ABORTING),
    [LAM_JOB_STATUS_PENDING] = S(ABORTING) | S(CONCLUDED),
    [LAM_JOB_STATUS_ABORTING] = S(ABORTING) | S(CONCLUDED),
    [LAM_JOB_STATUS_CONCLUDED] = S(NULL),
    [LAM_JOB_STATUS_NULL] = 0,
};

/* Reference §4.3: statuses in which each verb is accepted. */
static const unsigned verbs[LAM_JOB_VERB__MAX] = {
    [LAM_JOB_VERB_CANCEL] = S(CREATED) | S(RUNNING) | S(PAUSED) | S(READY) |
                            S(STANDBY) | S(WAITING) | S(PENDING),
    [LAM_JOB_VERB_PAUSE] = S(CREATED) | S(RUNNING) | S(PAUSED) | S(READY) | S(STANDBY),
    [LAM_JOB_VERB_RESUME] = S(CREATED) | S(RUNNING) | S(PAUSED) | S(READY) | S(STANDBY),
    [LAM_JOB_VERB_SET_SPEED] = S(CREATED) | S(RUNNING) | S(PAUSED) | S(READY) | S(STANDBY),
    [LAM_JOB_VERB_COMPLETE] = S(READY) | S(STANDBY),
    [LAM_JOB_VERB_FINALIZE] = S(PENDING),
    [LAM_JOB_VERB_DISMISS] = S(CONCLUDED),
    [LAM_JOB_VERB_CHANGE] = S(CREATED) | S(RUNNING) | S(PAUSED) | S(READY) | S(STANDBY),
};
#undef S

bool lam_job_transition_allowed(LamJobStatus from, LamJobStatus to)
{
    if ((unsigned)from >= LAM_JOB_STATUS__MAX || (unsigned)to >= LAM_JOB_STATUS__MAX) {
        return false;
    }
    return transitions[from] & (1u << to);
}

bool lam_job_verb_allowed(LamJobVerb verb, LamJobStatus s)
{
    if ((unsigned)verb >= LAM_JOB_VERB__MAX || (unsigned)s >= LAM_JOB_STATUS__MAX) {
        return false;
    }
    return verbs[verb] & (1u << s);
}

static const char *const onerr_names[] = {
    [LAM_ONERR_REPORT] = "report", [LAM_ONERR_IGNORE] = "ignore",
    [LAM_ONERR_ENOSPC] = "enospc", [LAM_ONERR_STOP] = "stop",
    [LAM_ONERR_AUTO] = "auto",
};

int lam_on_error_parse(const char *s, LamOnError *out)
{
    for (unsigned i = 0; i < sizeof(onerr_names) / sizeof(onerr_names[0]); i++) {
        if (strcmp(s, onerr_names[i]) == 0) {
            *out = (LamOnError)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *lam_on_error_name(LamOnError e)
{
    return (unsigned)e <= LAM_ONERR_AUTO ? onerr_names[e] : "?";
}

/* ---- helpers (job_lock held) ---- */

static bool job_is_internal(const LamJob *job)
{
    return job->id == NULL;
}

bool job_is_cancelled_locked(const LamJob *job)
{
    return job->cancelled && job->force_cancel;
}

static void job_notify_main(void)
{
    uint64_t one = 1;
    ssize_t r = write(main_efd, &one, sizeof(one));
    (void)r; /* EAGAIN means a notification is already pending */
}

void job_kick_locked(LamJob *job)
{
    job->wakeup = true;
    pthread_cond_broadcast(&job->cond);
    if (job->drv->kick) {
        job->drv->kick(job);
    }
}

void job_transition_locked(LamJob *job, LamJobStatus to)
{
    LamJobStatus from = job->status;
    /* The tables are this layer's invariant: a refused edge is a bug in
     * the caller, so fail loudly in every build. */
    if (!lam_job_transition_allowed(from, to)) {
        lam_warn("job '%s': illegal transition %s -> %s", job->id ? job->id : "",
                 lam_job_status_name(from), lam_job_status_name(to));
        abort();
    }
    job->status = to;
    if (from != to && !job_is_internal(job)) {
        lam_event_emit("JOB_STATUS_CHANGE",
                       json_pack("{s:s, s:s}", "id", job->id, "status",
                                 lam_job_status_name(to)));
    }
    pthread_cond_broadcast(&job_status_cond);
}

static json_t *block_job_event_data(LamJob *job)
{
    return json_pack("{s:s, s:s, s:I, s:I, s:I}", "type", job->drv->type,
                     "device", job->id,
                     "len", (json_int_t)atomic_load(&job->progress_total),
                     "offset", (json_int_t)atomic_load(&job->progress_current),
                     "speed", (json_int_t)job->speed);
}

static bool job_emits_block_events(const LamJob *job)
{
    return job->drv->block_job && !job_is_internal(job);
}

static int job_apply_verb(LamJob *job, LamJobVerb verb, LamError **errp)
{
    if (lam_job_verb_allowed(verb, job->status)) {
        return 0;
    }
    lam_error_setg(errp, "Job '%s' in state '%s' cannot accept command verb '%s'",
                   job->id ? job->id : "", lam_job_status_name(job->status),
                   lam_job_verb_name(verb));
    return -EPERM;
}

/* ---- creation ---- */

static void job_do_dismiss_locked(LamJob *job);
static void txn_del_locked(LamJob *job);

static bool id_wellformed(const char *id)
{
    if (!((id[0] >= 'a' && id[0] <= 'z') || (id[0] >= 'A' && id[0] <= 'Z'))) {
        return false;
    }
    for (const char *p = id + 1; *p; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                  (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_';
        if (!ok) {
            return false;
        }
    }
    return true;
}

static LamJob *job_find_locked(const char *id)
{
    for (LamJob *j = job_list; j; j = j->next) {
        if (j->id && strcmp(j->id, id) == 0) {
            return j;
        }
    }
    return NULL;
}

LamJob *lam_job_create(const LamJobDriver *drv, const char *id, int64_t speed,
                       bool auto_finalize, bool auto_dismiss, LamError **errp)
{
    pthread_once(&init_once, job_init);
    if (id && !id_wellformed(id)) {
        lam_error_setg(errp, "Invalid job ID '%s'", id);
        return NULL;
    }
    assert(drv->instance_size >= sizeof(LamJob));
    LamJob *job = calloc(1, drv->instance_size);
    if (!job) {
        lam_error_setg(errp, "Out of memory creating job");
        return NULL;
    }
    job->drv = drv;
    job->id = id ? strdup(id) : NULL;
    job->refcnt = 1;
    job->pause_count = 1; /* dropped by lam_job_start */
    job->auto_finalize = auto_finalize;
    job->auto_dismiss = auto_dismiss;
    job->busy = false;
    job->speed = speed > 0 ? speed : 0;
    lam_ratelimit_set_speed(&job->limit, (uint64_t)job->speed);
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&job->cond, &a);
    pthread_condattr_destroy(&a);

    pthread_mutex_lock(&job_lock);
    if (id && job_find_locked(id)) {
        pthread_mutex_unlock(&job_lock);
        lam_error_setg(errp, "Job ID '%s' already in use", id);
        pthread_cond_destroy(&job->cond);
        free(job->id);
        free(job);
        return NULL;
    }
    LamJob **tail = &job_list;
    while (*tail) {
        tail = &(*tail)->next;
    }
    *tail = job;
    job_transition_locked(job, LAM_JOB_STATUS_CREATED);
    if (speed < 0) {
        /* QEMU sets the speed after creating the job: created, null. */
        lam_error_setg(errp, "Parameter 'speed' expects a non-negative value");
        job_do_dismiss_locked(job);
        pthread_mutex_unlock(&job_lock);
        return NULL;
    }
    pthread_mutex_unlock(&job_lock);
    return job;
}

void lam_job_ref(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    job->refcnt++;
    pthread_mutex_unlock(&job_lock);
}

static void job_free(LamJob *job)
{
    if (job->drv->free) {
        job->drv->free(job);
    }
    pthread_cond_destroy(&job->cond);
    free(job->err_msg);
    free(job->id);
    free(job);
}

void lam_job_unref(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    bool last = --job->refcnt == 0;
    pthread_mutex_unlock(&job_lock);
    if (last) {
        job_free(job);
    }
}

/* Unlinks the job and moves it to null; drops the list's reference. */
static void job_do_dismiss_locked(LamJob *job)
{
    txn_del_locked(job);
    for (LamJob **p = &job_list; *p; p = &(*p)->next) {
        if (*p == job) {
            *p = job->next;
            break;
        }
    }
    job->next = NULL;
    job->busy = false;
    job->paused = false;
    job->deferred = true;
    job_transition_locked(job, LAM_JOB_STATUS_NULL);
    if (--job->refcnt == 0) {
        pthread_mutex_unlock(&job_lock);
        job_free(job);
        pthread_mutex_lock(&job_lock);
    }
}

void lam_job_early_fail(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    assert(job->status == LAM_JOB_STATUS_CREATED && !job->started);
    job_do_dismiss_locked(job);
    pthread_mutex_unlock(&job_lock);
}

/* ---- the job thread ---- */

static void *job_thread_main(void *opaque)
{
    LamJob *job = opaque;
    LamError *err = NULL;

    lam_job_pause_point(job);
    int ret = job->drv->run(job, &err);

    pthread_mutex_lock(&job_lock);
    job->ret = ret;
    if (ret < 0 && err && !job->err_msg) {
        job->err_msg = strdup(err->msg);
    }
    job->run_done = true;
    job->busy = false;
    pthread_cond_broadcast(&job_status_cond);
    pthread_mutex_unlock(&job_lock);
    lam_error_free(err);
    job_notify_main();
    return NULL;
}

static void job_start(LamJob *job, bool drained)
{
    pthread_mutex_lock(&job_lock);
    assert(job->status == LAM_JOB_STATUS_CREATED && !job->started);
    job->started = true;
    job->busy = true;
    if (drained) {
        /* The creation pause becomes the caller's drain: lam_drain_end()
         * resumes it. */
        job->drain_paused = true;
    } else {
        job->pause_count--;
    }
    job->start_ns = lam_clock_ns();
    job_transition_locked(job, LAM_JOB_STATUS_RUNNING);
    job->refcnt++; /* held by the thread until it is joined */
    if (pthread_create(&job->thread, NULL, job_thread_main, job) != 0) {
        /* No thread: behave as if run() failed at once. */
        job->ret = -EAGAIN;
        job->err_msg = strdup("Could not start the job thread");
        job->run_done = true;
        job->refcnt--;
        pthread_mutex_unlock(&job_lock);
        job_notify_main();
        return;
    }
    job->thread_started = true;
    /* QEMU starts these jobs inside a drained section: clients see
     * running, paused, running before the reply.  Wait for the pause so
     * the sequence does not depend on thread scheduling. */
    while (drained && !job->paused && !job->run_done) {
        pthread_cond_wait(&job_status_cond, &job_lock);
    }
    pthread_mutex_unlock(&job_lock);
}

void lam_job_start(LamJob *job)
{
    job_start(job, false);
}

void lam_job_start_drained(LamJob *job)
{
    job_start(job, true);
}

bool lam_job_is_cancelled(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    bool r = job_is_cancelled_locked(job);
    pthread_mutex_unlock(&job_lock);
    return r;
}

bool lam_job_pause_requested(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    bool r = job->pause_count > 0;
    pthread_mutex_unlock(&job_lock);
    return r;
}

void lam_job_io_end(LamJob *job)
{
    if (atomic_fetch_sub(&job->io_in_flight, 1) == 1) {
        pthread_mutex_lock(&job_lock);
        pthread_cond_broadcast(&job_status_cond);
        pthread_mutex_unlock(&job_lock);
    }
}

/* ---- drained sections ---- */

static bool job_running_locked(const LamJob *j)
{
    return j->started && !j->run_done && !j->deferred;
}

/* Pauses every running job and waits until none has I/O of its own in
 * flight: requests of jobs don't come through root edges, so the core's
 * drain would not wait for them.  Emits paused (standby) like QEMU. */
static void jobs_drain_begin(void)
{
    pthread_once(&init_once, job_init);
    pthread_mutex_lock(&job_lock);
    for (LamJob *j = job_list; j; j = j->next) {
        if (job_running_locked(j)) {
            j->drain_paused = true;
            j->pause_count++;
            job_kick_locked(j);
        }
    }
    for (LamJob *j = job_list; j; j = j->next) {
        while (j->drain_paused && !(j->paused || j->run_done) ) {
            pthread_cond_wait(&job_status_cond, &job_lock);
        }
        while (j->drain_paused && atomic_load(&j->io_in_flight) > 0) {
            pthread_cond_wait(&job_status_cond, &job_lock);
        }
    }
    pthread_mutex_unlock(&job_lock);
}

static void job_resume_locked(LamJob *job);

static void jobs_drain_end(void)
{
    pthread_mutex_lock(&job_lock);
    for (LamJob *j = job_list; j; j = j->next) {
        if (j->drain_paused) {
            j->drain_paused = false;
            job_resume_locked(j);
        }
    }
    pthread_mutex_unlock(&job_lock);
}

__attribute__((constructor)) static void jobs_drain_register(void)
{
    lam_drain_set_hooks(jobs_drain_begin, jobs_drain_end);
}

bool lam_job_cancel_requested(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    bool r = job->cancelled;
    pthread_mutex_unlock(&job_lock);
    return r;
}

void job_pause_point_locked(LamJob *job)
{
    if (job->pause_count == 0 || job_is_cancelled_locked(job)) {
        return;
    }
    /* A paused job sleeps on its condition: no CPU until resumed.  The
     * resumer reports "running" (job_resume_locked); a new pause request
     * may come before this thread wakes up, then it pauses again. */
    while (job->pause_count > 0) {
        if (!job->paused) {
            LamJobStatus prev = job->status;
            job->pause_prev = prev;
            job_transition_locked(job, prev == LAM_JOB_STATUS_READY ? LAM_JOB_STATUS_STANDBY
                                                                    : LAM_JOB_STATUS_PAUSED);
            job->paused = true;
            job->busy = false;
            job->pause_start_ns = lam_clock_ns();
        }
        pthread_cond_wait(&job->cond, &job_lock);
    }
    if (job->paused) { /* job_resume_locked normally did this */
        job->paused = false;
        job->paused_ns += lam_clock_ns() - job->pause_start_ns;
        job_transition_locked(job, job->pause_prev);
    }
    job->busy = true;
}

void lam_job_pause_point(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    job_pause_point_locked(job);
    pthread_mutex_unlock(&job_lock);
}

static void job_sleep_locked(LamJob *job, int64_t ns)
{
    if (job_is_cancelled_locked(job) || job->pause_count > 0 || ns == 0) {
        return;
    }
    job->wakeup = false;
    job->busy = false;
    if (ns < 0) {
        while (!job->wakeup) {
            pthread_cond_wait(&job->cond, &job_lock);
        }
    } else {
        int64_t deadline = lam_clock_ns() + ns;
        struct timespec ts = { .tv_sec = deadline / 1000000000LL,
                               .tv_nsec = deadline % 1000000000LL };
        while (!job->wakeup) {
            if (pthread_cond_timedwait(&job->cond, &job_lock, &ts) == ETIMEDOUT) {
                break;
            }
        }
    }
    job->busy = true;
}

void lam_job_sleep_ns(LamJob *job, int64_t ns)
{
    pthread_mutex_lock(&job_lock);
    job_sleep_locked(job, ns);
    job_pause_point_locked(job);
    pthread_mutex_unlock(&job_lock);
}

void lam_job_ratelimit(LamJob *job, uint64_t bytes)
{
    pthread_mutex_lock(&job_lock);
    int64_t delay = lam_ratelimit_account(&job->limit, bytes, lam_clock_ns());
    /* Re-check after every wake-up: the speed may have changed, a pause
     * or cancel may be pending (either ends the wait early). */
    while (delay > 0 && !job_is_cancelled_locked(job) && job->pause_count == 0) {
        job_sleep_locked(job, delay);
        delay = lam_ratelimit_account(&job->limit, 0, lam_clock_ns());
    }
    /* No pause point here: the caller may still have copies in flight,
     * and a job reported paused must not progress.  The caller drains
     * its workers and then pauses (the debt is paid after resume). */
    pthread_mutex_unlock(&job_lock);
}

void lam_job_transition_to_ready(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    job_transition_locked(job, LAM_JOB_STATUS_READY);
    if (job_emits_block_events(job)) {
        lam_event_emit("BLOCK_JOB_READY", block_job_event_data(job));
    }
    pthread_mutex_unlock(&job_lock);
}

LamErrorAction lam_job_error_action(LamJob *job, LamOnError policy, bool is_read,
                                    int err)
{
    if (err < 0) {
        err = -err;
    }
    LamErrorAction action;
    switch (policy) {
    case LAM_ONERR_ENOSPC:
    case LAM_ONERR_AUTO:
        action = err == ENOSPC ? LAM_ACTION_STOP : LAM_ACTION_REPORT;
        break;
    case LAM_ONERR_STOP:
        action = LAM_ACTION_STOP;
        break;
    case LAM_ONERR_IGNORE:
        action = LAM_ACTION_IGNORE;
        break;
    default:
        action = LAM_ACTION_REPORT;
        break;
    }
    static const char *const action_names[] = { "report", "ignore", "stop" };
    pthread_mutex_lock(&job_lock);
    if (!job_is_internal(job)) {
        lam_event_emit("BLOCK_JOB_ERROR",
                       json_pack("{s:s, s:s, s:s}", "device", job->id, "operation",
                                 is_read ? "read" : "write", "action",
                                 action_names[action]));
    }
    if (action == LAM_ACTION_STOP) {
        if (!job->user_paused) {
            job->user_paused = true;
            job->pause_count++;
        }
        job->iostatus = err == ENOSPC ? LAM_IOSTATUS_NOSPACE : LAM_IOSTATUS_FAILED;
    }
    pthread_mutex_unlock(&job_lock);
    return action;
}

void lam_job_progress_update(LamJob *job, int64_t done)
{
    atomic_fetch_add(&job->progress_current, done);
}

void lam_job_progress_set_remaining(LamJob *job, int64_t remaining)
{
    atomic_store(&job->progress_total, atomic_load(&job->progress_current) + remaining);
}

void lam_job_progress_increase_remaining(LamJob *job, int64_t delta)
{
    atomic_fetch_add(&job->progress_total, delta);
}

/* ---- completion (control thread) ---- */

/* Sets ret/-ECANCELED and moves to aborting on failure (QEMU's update_rc). */
static int job_update_rc_locked(LamJob *job)
{
    if (job->ret == 0 && job_is_cancelled_locked(job)) {
        job->ret = -ECANCELED;
    }
    if (job->ret) {
        if (!job->err_msg) {
            job->err_msg = strdup(strerror(-job->ret));
        }
        job_transition_locked(job, LAM_JOB_STATUS_ABORTING);
    }
    return job->ret;
}

/* Runs a driver callback without job_lock (callbacks change the graph and
 * may wait for requests). */
#define CALL_UNLOCKED(job, cb)                 \
    do {                                       \
        if ((job)->drv->cb) {                  \
            pthread_mutex_unlock(&job_lock);   \
            (job)->drv->cb(job);               \
            pthread_mutex_lock(&job_lock);     \
        }                                      \
    } while (0)

static void job_conclude_locked(LamJob *job)
{
    job_transition_locked(job, LAM_JOB_STATUS_CONCLUDED);
    if (job->auto_dismiss || !job->started) {
        job_do_dismiss_locked(job);
    }
}

struct LamJobTxn {
    LamJob *jobs;   /* linked through txn_next, in order of addition */
    int refcnt;
    bool aborting;
};

LamJobTxn *lam_job_txn_new(void)
{
    LamJobTxn *t = calloc(1, sizeof(*t));
    if (!t) {
        abort();
    }
    t->refcnt = 1;
    return t;
}

void lam_job_txn_add(LamJobTxn *txn, LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    assert(!job->txn && !job->started);
    job->txn = txn;
    txn->refcnt++;
    LamJob **tail = &txn->jobs;
    while (*tail) {
        tail = &(*tail)->txn_next;
    }
    *tail = job;
    pthread_mutex_unlock(&job_lock);
}

static void txn_unref_locked(LamJobTxn *txn)
{
    if (--txn->refcnt == 0) {
        free(txn);
    }
}

void lam_job_txn_unref(LamJobTxn *txn)
{
    pthread_mutex_lock(&job_lock);
    txn_unref_locked(txn);
    pthread_mutex_unlock(&job_lock);
}

static void txn_del_locked(LamJob *job)
{
    LamJobTxn *txn = job->txn;
    if (!txn) {
        return;
    }
    for (LamJob **pp = &txn->jobs; *pp; pp = &(*pp)->txn_next) {
        if (*pp == job) {
            *pp = job->txn_next;
            break;
        }
    }
    job->txn = NULL;
    job->txn_next = NULL;
    txn_unref_locked(txn);
}

/* The jobs of job's transaction (just job if it has none), each with a
 * reference; *n set.  The caller unrefs them. */
static LamJob **txn_snapshot_locked(LamJob *job, int *n)
{
    int cnt = 0;
    if (job->txn) {
        for (LamJob *j = job->txn->jobs; j; j = j->txn_next) {
            cnt++;
        }
    }
    LamJob **v = calloc((size_t)cnt + 1, sizeof(*v));
    if (!v) {
        abort();
    }
    int i = 0;
    if (job->txn) {
        for (LamJob *j = job->txn->jobs; j; j = j->txn_next) {
            v[i++] = j;
        }
    } else {
        v[i++] = job;
    }
    for (int k = 0; k < i; k++) {
        v[k]->refcnt++;
    }
    *n = i;
    return v;
}

static void snapshot_release_locked(LamJob **v, int n)
{
    for (int k = 0; k < n; k++) {
        if (--v[k]->refcnt == 0) {
            pthread_mutex_unlock(&job_lock);
            job_free(v[k]);
            pthread_mutex_lock(&job_lock);
        }
    }
    free(v);
}

/* QEMU's job_is_completed: run() is over. */
static bool job_is_completed_locked(const LamJob *job)
{
    switch (job->status) {
    case LAM_JOB_STATUS_WAITING:
    case LAM_JOB_STATUS_PENDING:
    case LAM_JOB_STATUS_ABORTING:
    case LAM_JOB_STATUS_CONCLUDED:
    case LAM_JOB_STATUS_NULL:
        return true;
    default:
        return false;
    }
}

/* Joins a job thread that has left run() (or is about to). */
static void job_join_locked(LamJob *j)
{
    while (j->thread_started && !j->run_done) {
        pthread_cond_wait(&job_status_cond, &job_lock);
    }
    if (j->thread_started) {
        pthread_t t = j->thread;
        j->thread_started = false;
        pthread_mutex_unlock(&job_lock);
        pthread_join(t, NULL);
        pthread_mutex_lock(&job_lock);
        j->refcnt--; /* the thread's reference */
    }
}

static void job_finalize_single_locked(LamJob *job)
{
    job_update_rc_locked(job);
    if (job->ret == 0) {
        CALL_UNLOCKED(job, commit);
    } else {
        CALL_UNLOCKED(job, abort);
    }
    CALL_UNLOCKED(job, clean);
    if (job->started && job_emits_block_events(job)) {
        json_t *d = block_job_event_data(job);
        if (job_is_cancelled_locked(job)) {
            lam_event_emit("BLOCK_JOB_CANCELLED", d);
        } else {
            if (job->ret) {
                json_object_set_new(d, "error", json_string(job->err_msg));
            }
            lam_event_emit("BLOCK_JOB_COMPLETED", d);
        }
    }
    txn_del_locked(job);
    job_conclude_locked(job);
}

static void job_cancel_async_locked(LamJob *job, bool force);

/* A job of the transaction failed or was cancelled: force-cancel the
 * others, wait for their threads, then abort and finalize every job,
 * the failing one first. */
static void job_completed_abort_locked(LamJob *job)
{
    LamJobTxn *txn = job->txn;
    if (!txn) {
        job_update_rc_locked(job);
        job_finalize_single_locked(job);
        return;
    }
    if (txn->aborting) {
        return; /* another job of the transaction handles everything */
    }
    txn->aborting = true;
    txn->refcnt++;
    int n;
    LamJob **v = txn_snapshot_locked(job, &n);
    for (int k = 0; k < n; k++) {
        if (v[k] != job && !job_is_completed_locked(v[k])) {
            job_cancel_async_locked(v[k], true);
        }
    }
    /* The failing job first, then the others in order. */
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < n; k++) {
            LamJob *j = v[k];
            if ((pass == 0) != (j == job) || j->status == LAM_JOB_STATUS_CONCLUDED ||
                j->status == LAM_JOB_STATUS_NULL) {
                continue;
            }
            j->deferred = true; /* the dispatcher must leave it to us */
            job_join_locked(j);
            if (j != job && j->ret == 0 && j->status != LAM_JOB_STATUS_CREATED) {
                /* A peer that had finished fine is cancelled all the same. */
                j->cancelled = j->force_cancel = true;
            }
            job_update_rc_locked(j);
            job_finalize_single_locked(j);
        }
    }
    snapshot_release_locked(v, n);
    txn_unref_locked(txn);
}

static void job_do_finalize_locked(LamJob *job)
{
    int n;
    LamJob **v = txn_snapshot_locked(job, &n);
    LamJob *failed = NULL;
    for (int k = 0; k < n && !failed; k++) {
        LamJob *j = v[k];
        if (j->drv->prepare) {
            pthread_mutex_unlock(&job_lock);
            int r = j->drv->prepare(j);
            pthread_mutex_lock(&job_lock);
            if (r < 0 && j->ret == 0) {
                j->ret = r;
            }
        }
        if (j->ret) {
            failed = j;
        }
    }
    if (failed) {
        job_update_rc_locked(failed);
        job_completed_abort_locked(failed);
    } else {
        for (int k = 0; k < n; k++) {
            if (v[k]->status == LAM_JOB_STATUS_PENDING) {
                job_finalize_single_locked(v[k]);
            }
        }
    }
    snapshot_release_locked(v, n);
}

static void job_completed_success_locked(LamJob *job)
{
    job_transition_locked(job, LAM_JOB_STATUS_WAITING);
    int n;
    LamJob **v = txn_snapshot_locked(job, &n);
    bool all_done = true, all_auto = true;
    for (int k = 0; k < n; k++) {
        all_done &= job_is_completed_locked(v[k]) &&
                    v[k]->status != LAM_JOB_STATUS_ABORTING;
        all_auto &= v[k]->auto_finalize;
    }
    if (all_done) {
        /* Everyone has finished: the transaction moves to pending. */
        for (int k = 0; k < n; k++) {
            LamJob *j = v[k];
            job_transition_locked(j, LAM_JOB_STATUS_PENDING);
            if (!j->auto_finalize && job_emits_block_events(j)) {
                lam_event_emit("BLOCK_JOB_PENDING",
                               json_pack("{s:s, s:s}", "type", j->drv->type, "id", j->id));
            }
        }
        if (all_auto) {
            job_do_finalize_locked(job);
        }
    }
    snapshot_release_locked(v, n);
}

static void job_completed_locked(LamJob *job)
{
    job->deferred = true;
    if (job_update_rc_locked(job)) {
        job_completed_abort_locked(job);
    } else {
        job_completed_success_locked(job);
    }
}

int lam_job_main_fd(void)
{
    pthread_once(&init_once, job_init);
    return main_efd;
}

void lam_job_dispatch(void)
{
    pthread_once(&init_once, job_init);
    uint64_t v;
    ssize_t r = read(main_efd, &v, sizeof(v));
    (void)r;
    pthread_mutex_lock(&job_lock);
restart:
    for (LamJob *j = job_list; j; j = j->next) {
        if (j->run_done && !j->deferred) {
            j->deferred = true;
            if (j->thread_started) {
                pthread_t t = j->thread;
                j->thread_started = false;
                /* The thread has left run(); joining is short. */
                pthread_mutex_unlock(&job_lock);
                pthread_join(t, NULL);
                pthread_mutex_lock(&job_lock);
                j->refcnt--; /* the thread's reference; the list holds one */
            }
            job_completed_locked(j);
            goto restart; /* the list may have changed */
        }
    }
    pthread_mutex_unlock(&job_lock);
}

static bool wait_until_locked(LamJob *job, bool (*done)(LamJob *, LamJobStatus),
                              LamJobStatus status, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? -1 : lam_clock_ns() + (int64_t)timeout_ms * 1000000;
    while (!done(job, status)) {
        /* Any job's completion may be what this one waits for (its
         * transaction's peers). */
        bool need_dispatch = false;
        for (LamJob *j = job_list; j && !need_dispatch; j = j->next) {
            need_dispatch = j->run_done && !j->deferred;
        }
        if (need_dispatch) {
            pthread_mutex_unlock(&job_lock);
            lam_job_dispatch();
            pthread_mutex_lock(&job_lock);
            continue;
        }
        if (deadline >= 0) {
            if (lam_clock_ns() >= deadline) {
                return false;
            }
            struct timespec ts = { .tv_sec = deadline / 1000000000LL,
                                   .tv_nsec = deadline % 1000000000LL };
            pthread_cond_timedwait(&job_status_cond, &job_lock, &ts);
        } else {
            pthread_cond_wait(&job_status_cond, &job_lock);
        }
    }
    return true;
}

static bool reached_status(LamJob *job, LamJobStatus s)
{
    return job->status == s || job->status == LAM_JOB_STATUS_NULL ||
           job->status == LAM_JOB_STATUS_CONCLUDED;
}

bool lam_job_wait_status(LamJob *job, LamJobStatus status, int timeout_ms)
{
    pthread_mutex_lock(&job_lock);
    job->refcnt++;
    bool ok = wait_until_locked(job, reached_status, status, timeout_ms);
    ok = ok && job->status == status;
    pthread_mutex_unlock(&job_lock);
    lam_job_unref(job);
    return ok;
}

static bool finished(LamJob *job, LamJobStatus unused)
{
    (void)unused;
    return job->status == LAM_JOB_STATUS_CONCLUDED || job->status == LAM_JOB_STATUS_NULL ||
           job->status == LAM_JOB_STATUS_PENDING;
}

static bool concluded(LamJob *job, LamJobStatus unused)
{
    (void)unused;
    return job->status == LAM_JOB_STATUS_CONCLUDED || job->status == LAM_JOB_STATUS_NULL;
}

int lam_job_run_until_done(LamJob *job)
{
    pthread_mutex_lock(&job_lock);
    job->refcnt++;
    wait_until_locked(job, finished, LAM_JOB_STATUS_NULL, -1);
    int ret = job->ret;
    pthread_mutex_unlock(&job_lock);
    lam_job_unref(job);
    return ret;
}

/* ---- verbs (control thread) ---- */

LamJob *lam_job_find(const char *id)
{
    pthread_mutex_lock(&job_lock);
    LamJob *j = job_find_locked(id);
    pthread_mutex_unlock(&job_lock);
    return j;
}

void lam_job_foreach(void (*fn)(LamJob *job, void *opaque), void *opaque)
{
    pthread_mutex_lock(&job_lock);
    for (LamJob *j = job_list; j; j = j->next) {
        fn(j, opaque);
    }
    pthread_mutex_unlock(&job_lock);
}

int lam_job_user_pause(LamJob *job, LamError **errp)
{
    pthread_mutex_lock(&job_lock);
    int r = job_apply_verb(job, LAM_JOB_VERB_PAUSE, errp);
    if (r == 0 && job->user_paused) {
        lam_error_setg(errp, "Job is already paused");
        r = -EBUSY;
    }
    if (r == 0) {
        job->user_paused = true;
        job->pause_count++;
        job_kick_locked(job);
    }
    pthread_mutex_unlock(&job_lock);
    return r;
}

static void job_resume_locked(LamJob *job)
{
    assert(job->pause_count > 0);
    job->pause_count--;
    if (job->pause_count == 0) {
        if (job->paused) {
            /* The resumer reports the status change, so it comes before
             * the reply of the command (or drain) that resumed, as in
             * QEMU; the job thread wakes up later. */
            job->paused = false;
            job->paused_ns += lam_clock_ns() - job->pause_start_ns;
            job_transition_locked(job, job->pause_prev);
        }
        job_kick_locked(job);
    }
}

int lam_job_user_resume(LamJob *job, LamError **errp)
{
    pthread_mutex_lock(&job_lock);
    int r = 0;
    if (!job->user_paused) {
        lam_error_setg(errp, "Can't resume a job that was not paused");
        r = -EINVAL;
    } else {
        r = job_apply_verb(job, LAM_JOB_VERB_RESUME, errp);
    }
    if (r == 0) {
        job->iostatus = LAM_IOSTATUS_OK;
        job->user_paused = false;
        job_resume_locked(job);
    }
    pthread_mutex_unlock(&job_lock);
    return r;
}

/* Records a cancel and wakes the job (QEMU's job_cancel_async). */
static void job_cancel_async_locked(LamJob *job, bool force)
{
    if (job->drv->cancel) {
        pthread_mutex_unlock(&job_lock);
        force = job->drv->cancel(job, force);
        pthread_mutex_lock(&job_lock);
    } else {
        force = true; /* no soft cancel: behaves as forced */
    }
    if (job->user_paused) {
        job->user_paused = false;
        job->iostatus = LAM_IOSTATUS_OK;
        job_resume_locked(job);
    }
    if (!job->cancelled) {
        job->cancelled = true;
        job->force_cancel = force;
    } else if (force) {
        job->force_cancel = true;
    }
    if (job->started && !job->run_done) {
        job_kick_locked(job);
    }
}

static void job_cancel_locked(LamJob *job, bool force)
{
    job_cancel_async_locked(job, force);
    if (!job->started) {
        /* Never ran: created -> aborting -> concluded -> null, no events. */
        job_completed_locked(job);
    } else if (job->deferred) {
        if (job_is_cancelled_locked(job)) {
            job_completed_abort_locked(job);
        }
    }
}

int lam_job_user_cancel(LamJob *job, bool force, bool block_job_cmd, LamError **errp)
{
    pthread_mutex_lock(&job_lock);
    int r = 0;
    if (block_job_cmd && job->user_paused && !force) {
        lam_error_setg(errp, "The block job for device '%s' is currently paused",
                       job->id ? job->id : "");
        r = -EBUSY;
    } else {
        r = job_apply_verb(job, LAM_JOB_VERB_CANCEL, errp);
    }
    if (r == 0) {
        job->refcnt++;
        job_cancel_locked(job, force);
        if (--job->refcnt == 0) {
            pthread_mutex_unlock(&job_lock);
            job_free(job);
            return 0;
        }
    }
    pthread_mutex_unlock(&job_lock);
    return r;
}

int lam_job_complete(LamJob *job, LamError **errp)
{
    pthread_mutex_lock(&job_lock);
    int r = job_apply_verb(job, LAM_JOB_VERB_COMPLETE, errp);
    if (r == 0 && (job->cancelled || !job->drv->complete)) {
        lam_error_setg(errp, "The active block job '%s' cannot be completed",
                       job->id ? job->id : "");
        r = -ENOTSUP;
    }
    pthread_mutex_unlock(&job_lock);
    if (r == 0) {
        LamError *err = NULL;
        job->drv->complete(job, &err);
        if (err) {
            lam_error_propagate(errp, err);
            r = -EINVAL;
        }
        pthread_mutex_lock(&job_lock);
        job_kick_locked(job);
        pthread_mutex_unlock(&job_lock);
    }
    return r;
}

int lam_job_finalize(LamJob *job, LamError **errp)
{
    pthread_mutex_lock(&job_lock);
    int r = job_apply_verb(job, LAM_JOB_VERB_FINALIZE, errp);
    if (r == 0) {
        job->refcnt++;
        job_do_finalize_locked(job);
        if (--job->refcnt == 0) {
            pthread_mutex_unlock(&job_lock);
            job_free(job);
            return 0;
        }
    }
    pthread_mutex_unlock(&job_lock);
    return r;
}

int lam_job_dismiss(LamJob *job, LamError **errp)
{
    pthread_mutex_lock(&job_lock);
    int r = job_apply_verb(job, LAM_JOB_VERB_DISMISS, errp);
    if (r == 0) {
        job_do_dismiss_locked(job);
    }
    pthread_mutex_unlock(&job_lock);
    return r;
}

int lam_job_set_speed(LamJob *job, int64_t speed, LamError **errp)
{
    pthread_mutex_lock(&job_lock);
    int r = job_apply_verb(job, LAM_JOB_VERB_SET_SPEED, errp);
    if (r == 0 && speed < 0) {
        lam_error_setg(errp, "Parameter 'speed' expects a non-negative value");
        r = -EINVAL;
    }
    if (r == 0) {
        job->speed = speed;
        lam_ratelimit_set_speed(&job->limit, (uint64_t)speed);
        job_kick_locked(job);
    }
    pthread_mutex_unlock(&job_lock);
    return r;
}

void lam_job_cancel_all_sync(void)
{
    pthread_once(&init_once, job_init);
    pthread_mutex_lock(&job_lock);
    for (;;) {
        LamJob *victim = NULL;
        for (LamJob *j = job_list; j; j = j->next) {
            if (j->status != LAM_JOB_STATUS_CONCLUDED && !job_is_cancelled_locked(j)) {
                victim = j;
                break;
            }
        }
        if (!victim) {
            break;
        }
        victim->refcnt++;
        job_cancel_locked(victim, true);
        wait_until_locked(victim, concluded, LAM_JOB_STATUS_NULL, -1);
        if (--victim->refcnt == 0) {
            pthread_mutex_unlock(&job_lock);
            job_free(victim);
            pthread_mutex_lock(&job_lock);
        }
    }
    /* Concluded jobs left for dismissal go too: quitting drops them. */
    while (job_list) {
        LamJob *j = job_list;
        if (j->status != LAM_JOB_STATUS_CONCLUDED) {
            /* Cancelled but still finishing. */
            j->refcnt++;
            wait_until_locked(j, concluded, LAM_JOB_STATUS_NULL, -1);
            if (--j->refcnt == 0) {
                pthread_mutex_unlock(&job_lock);
                job_free(j);
                pthread_mutex_lock(&job_lock);
            }
            continue;
        }
        job_do_dismiss_locked(j);
    }
    pthread_mutex_unlock(&job_lock);
}
