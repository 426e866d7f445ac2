/* Job state machine: tables, verbs in every reachable status, lifecycle
 * event sequences, pause/cancel/error policies, rate limit.  TAP output. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "jobs/job.h"
#include "lamina/block.h"
#include "lamina/events.h"

static int ntest, nfail;

static void ok(bool cond, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ntest++;
    printf("%s %d - ", cond ? "ok" : "not ok", ntest);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!cond) {
        nfail++;
    }
}

/* ---- event capture ---- */
/* ev_lock protects ev_log. */
static pthread_mutex_t ev_lock = PTHREAD_MUTEX_INITIALIZER;
static char ev_log[16384];

static void sink(const char *name, json_t *data)
{
    pthread_mutex_lock(&ev_lock);
    char item[256];
    if (strcmp(name, "JOB_STATUS_CHANGE") == 0) {
        snprintf(item, sizeof(item), "%s ", json_string_value(json_object_get(data, "status")));
    } else if (strcmp(name, "BLOCK_JOB_ERROR") == 0) {
        snprintf(item, sizeof(item), "ERROR(%s,%s) ",
                 json_string_value(json_object_get(data, "operation")),
                 json_string_value(json_object_get(data, "action")));
    } else {
        const char *short_name = name + (strncmp(name, "BLOCK_JOB_", 10) == 0 ? 10 : 0);
        json_t *e = json_object_get(data, "error");
        snprintf(item, sizeof(item), "%s%s%s%s ", short_name, e ? "(" : "",
                 e ? json_string_value(e) : "", e ? ")" : "");
    }
    if (strlen(ev_log) + strlen(item) < sizeof(ev_log)) {
        strcat(ev_log, item);
    }
    pthread_mutex_unlock(&ev_lock);
    json_decref(data);
}

static void ev_reset(void)
{
    pthread_mutex_lock(&ev_lock);
    ev_log[0] = 0;
    pthread_mutex_unlock(&ev_lock);
}

static bool ev_is(const char *want)
{
    pthread_mutex_lock(&ev_lock);
    bool r = strcmp(ev_log, want) == 0;
    if (!r) {
        printf("# events: '%s'\n# wanted: '%s'\n", ev_log, want);
    }
    pthread_mutex_unlock(&ev_lock);
    return r;
}

/* ---- a test job ---- */
typedef struct TestJob {
    LamJob common;
    _Atomic bool finish;     /* run() returns 0 at the next iteration */
    _Atomic int fail_errno;  /* run() returns -fail_errno */
    bool go_ready;
    bool has_complete;
    _Atomic int iterations;
    LamOnError policy;
    _Atomic int inject;      /* errno to feed to the error policy once */
} TestJob;

static int test_run(LamJob *job, LamError **errp)
{
    TestJob *t = (TestJob *)job;
    lam_job_progress_set_remaining(job, 100);
    if (t->go_ready) {
        lam_job_transition_to_ready(job);
    }
    while (!lam_job_is_cancelled(job)) {
        atomic_fetch_add(&t->iterations, 1);
        int inj = atomic_exchange(&t->inject, 0);
        if (inj) {
            LamErrorAction a = lam_job_error_action(job, t->policy, false, -inj);
            if (a == LAM_ACTION_REPORT) {
                return -inj;
            }
        }
        if (atomic_load(&t->fail_errno)) {
            lam_error_setg(errp, "test failure %d", atomic_load(&t->fail_errno));
            return -atomic_load(&t->fail_errno);
        }
        if (atomic_load(&t->finish)) {
            lam_job_progress_update(job, 100);
            return 0;
        }
        lam_job_sleep_ns(job, 2000000);
    }
    return 0;
}

static void test_complete(LamJob *job, LamError **errp)
{
    atomic_store(&((TestJob *)job)->finish, true);
}

static bool test_cancel(LamJob *job, bool force)
{
    /* Like mirror: a soft cancel of a ready job completes it. */
    if (!force && job->status == LAM_JOB_STATUS_READY) {
        atomic_store(&((TestJob *)job)->finish, true);
        return false;
    }
    return true;
}

static const LamJobDriver test_drv = {
    .type = "backup", .instance_size = sizeof(TestJob), .block_job = true,
    .run = test_run, .complete = NULL,
};
static const LamJobDriver ready_drv = {
    .type = "mirror", .instance_size = sizeof(TestJob), .block_job = true,
    .run = test_run, .complete = test_complete, .cancel = test_cancel,
};
static const LamJobDriver create_drv = {
    .type = "create", .instance_size = sizeof(TestJob), .block_job = false,
    .run = test_run,
};

static TestJob *mk(const LamJobDriver *drv, const char *id, bool af, bool ad)
{
    LamError *err = NULL;
    TestJob *t = (TestJob *)lam_job_create(drv, id, 0, af, ad, &err);
    if (!t) {
        printf("# create failed: %s\n", err->msg);
        lam_error_free(err);
        exit(1);
    }
    t->go_ready = drv == &ready_drv;
    return t;
}

static LamJobStatus status_of(TestJob *t)
{
    return t->common.status;
}

/* Drives a fresh job into the given status; returns NULL if that status is
 * not reachable from outside (waiting, aborting are transient here). */
static TestJob *job_in(LamJobStatus s, const char *id)
{
    TestJob *t;
    switch (s) {
    case LAM_JOB_STATUS_CREATED:
        return mk(&test_drv, id, true, false);
    case LAM_JOB_STATUS_RUNNING:
        t = mk(&test_drv, id, true, false);
        lam_job_start(&t->common);
        return t;
    case LAM_JOB_STATUS_PAUSED:
        t = job_in(LAM_JOB_STATUS_RUNNING, id);
        lam_job_user_pause(&t->common, NULL);
        lam_job_wait_status(&t->common, LAM_JOB_STATUS_PAUSED, 5000);
        return t;
    case LAM_JOB_STATUS_READY:
        t = mk(&ready_drv, id, true, false);
        lam_job_start(&t->common);
        lam_job_wait_status(&t->common, LAM_JOB_STATUS_READY, 5000);
        return t;
    case LAM_JOB_STATUS_STANDBY:
        t = job_in(LAM_JOB_STATUS_READY, id);
        lam_job_user_pause(&t->common, NULL);
        lam_job_wait_status(&t->common, LAM_JOB_STATUS_STANDBY, 5000);
        return t;
    case LAM_JOB_STATUS_PENDING:
        t = mk(&test_drv, id, false, false);
        lam_job_start(&t->common);
        atomic_store(&t->finish, true);
        lam_job_wait_status(&t->common, LAM_JOB_STATUS_PENDING, 5000);
        return t;
    case LAM_JOB_STATUS_CONCLUDED:
        t = mk(&test_drv, id, true, false);
        lam_job_start(&t->common);
        atomic_store(&t->finish, true);
        lam_job_wait_status(&t->common, LAM_JOB_STATUS_CONCLUDED, 5000);
        return t;
    default:
        return NULL;
    }
}

/* Cancels/finalizes/dismisses whatever is left so the id is free again. */
static void cleanup(const char *id)
{
    LamJob *j = lam_job_find(id);
    if (!j) {
        return;
    }
    lam_job_ref(j);
    if (j->status == LAM_JOB_STATUS_PENDING) {
        lam_job_finalize(j, NULL);
    } else if (j->status != LAM_JOB_STATUS_CONCLUDED && j->status != LAM_JOB_STATUS_NULL) {
        lam_job_user_cancel(j, true, false, NULL);
        lam_job_wait_status(j, LAM_JOB_STATUS_CONCLUDED, 5000);
    }
    if (j->status == LAM_JOB_STATUS_CONCLUDED) {
        lam_job_dismiss(j, NULL);
    }
    lam_job_unref(j);
    ok(lam_job_find(id) == NULL, "cleanup of %s", id);
}

static int do_verb(LamJob *j, LamJobVerb v, LamError **err)
{
    switch (v) {
    case LAM_JOB_VERB_CANCEL: return lam_job_user_cancel(j, true, false, err);
    case LAM_JOB_VERB_PAUSE: return lam_job_user_pause(j, err);
    case LAM_JOB_VERB_RESUME:
        /* resume checks "was paused" first; pause so the verb table decides */
        if (!j->user_paused && lam_job_verb_allowed(LAM_JOB_VERB_PAUSE, j->status)) {
            lam_job_user_pause(j, NULL);
        }
        return lam_job_user_resume(j, err);
    case LAM_JOB_VERB_SET_SPEED: return lam_job_set_speed(j, 1000, err);
    case LAM_JOB_VERB_COMPLETE: return lam_job_complete(j, err);
    case LAM_JOB_VERB_FINALIZE: return lam_job_finalize(j, err);
    case LAM_JOB_VERB_DISMISS: return lam_job_dismiss(j, err);
    default: return 0;
    }
}

/* Independent copy of the reference tables (§4.2, §4.3), written out as
 * strings so that the test does not share data with the code. */
static const char *const want_transitions[] = {
    "undefined:created", "created:running", "created:aborting", "created:null",
    "running:paused", "running:ready", "running:waiting", "running:aborting",
    "paused:running", "ready:standby", "ready:waiting", "ready:aborting",
    "standby:ready", "waiting:pending", "waiting:aborting", "pending:aborting",
    "pending:concluded", "aborting:aborting", "aborting:concluded", "concluded:null",
};
static const char *const want_verbs[] = {
    "cancel:created running paused ready standby waiting pending",
    "pause:created running paused ready standby",
    "resume:created running paused ready standby",
    "set-speed:created running paused ready standby",
    "complete:ready standby",
    "finalize:pending",
    "dismiss:concluded",
    "change:created running paused ready standby",
};

static void test_tables(void)
{
    int bad = 0;
    for (int a = 0; a < LAM_JOB_STATUS__MAX; a++) {
        for (int b = 0; b < LAM_JOB_STATUS__MAX; b++) {
            char key[64];
            snprintf(key, sizeof(key), "%s:%s", lam_job_status_name(a), lam_job_status_name(b));
            bool want = false;
            for (size_t i = 0; i < sizeof(want_transitions) / sizeof(*want_transitions); i++) {
                want |= strcmp(key, want_transitions[i]) == 0;
            }
            if (want != lam_job_transition_allowed(a, b)) {
                printf("# transition %s: want %d\n", key, want);
                bad++;
            }
        }
    }
    ok(bad == 0, "transition table matches reference (%d x %d)", LAM_JOB_STATUS__MAX,
       LAM_JOB_STATUS__MAX);
    bad = 0;
    for (int v = 0; v < LAM_JOB_VERB__MAX; v++) {
        const char *line = want_verbs[v];
        size_t n = strlen(lam_job_verb_name(v));
        if (strncmp(line, lam_job_verb_name(v), n) != 0 || line[n] != ':') {
            bad++;
            continue;
        }
        for (int s = 0; s < LAM_JOB_STATUS__MAX; s++) {
            char word[32];
            snprintf(word, sizeof(word), " %s ", lam_job_status_name(s));
            char padded[256];
            snprintf(padded, sizeof(padded), " %s ", line + n + 1);
            bool want = strstr(padded, word) != NULL;
            if (want != lam_job_verb_allowed(v, s)) {
                printf("# verb %s in %s: want %d\n", lam_job_verb_name(v),
                       lam_job_status_name(s), want);
                bad++;
            }
        }
    }
    ok(bad == 0, "verb table matches reference");
}

/* Every verb in every externally reachable status, through the real API. */
static void test_verbs_live(void)
{
    static const LamJobStatus reachable[] = {
        LAM_JOB_STATUS_CREATED, LAM_JOB_STATUS_RUNNING, LAM_JOB_STATUS_PAUSED,
        LAM_JOB_STATUS_READY, LAM_JOB_STATUS_STANDBY, LAM_JOB_STATUS_PENDING,
        LAM_JOB_STATUS_CONCLUDED,
    };
    for (size_t i = 0; i < sizeof(reachable) / sizeof(*reachable); i++) {
        for (int v = 0; v < LAM_JOB_VERB__MAX; v++) {
            if (v == LAM_JOB_VERB_CHANGE) {
                continue; /* no job type implements change yet */
            }
            LamJobStatus s = reachable[i];
            TestJob *t = job_in(s, "vj");
            bool reached = status_of(t) == s;
            LamError *err = NULL;
            int r = do_verb(&t->common, v, &err);
            char want[200];
            snprintf(want, sizeof(want),
                     "Job 'vj' in state '%s' cannot accept command verb '%s'",
                     lam_job_status_name(s), lam_job_verb_name(v));
            bool verb_refused = err && strcmp(err->msg, want) == 0;
            /* QEMU checks "was it paused" before the table for resume. */
            if (v == LAM_JOB_VERB_RESUME && !lam_job_verb_allowed(LAM_JOB_VERB_PAUSE, s)) {
                verb_refused = err && strcmp(err->msg, "Can't resume a job that was not paused") == 0;
            }
            bool allowed = lam_job_verb_allowed(v, s);
            ok(reached && (allowed ? !verb_refused : (r < 0 && verb_refused)),
               "verb %s in %s: %s (%s)", lam_job_verb_name(v), lam_job_status_name(s),
               allowed ? "accepted" : "refused", err ? err->msg : "no error");
            lam_error_free(err);
            cleanup("vj");
        }
    }
}

static void test_lifecycles(void)
{
    /* 1: plain completion */
    ev_reset();
    TestJob *t = mk(&test_drv, "j1", true, true);
    lam_job_start(&t->common);
    atomic_store(&t->finish, true);
    lam_job_ref(&t->common);
    int r = lam_job_run_until_done(&t->common);
    ok(r == 0 && status_of(t) == LAM_JOB_STATUS_NULL, "completed job reaches null");
    ok(ev_is("created running waiting pending COMPLETED concluded null "),
       "event sequence of a completing job");
    ok(lam_job_find("j1") == NULL, "auto-dismissed job gone");
    lam_job_unref(&t->common);

    /* 2: manual finalize + dismiss */
    ev_reset();
    t = mk(&test_drv, "j2", false, false);
    lam_job_start(&t->common);
    atomic_store(&t->finish, true);
    lam_job_wait_status(&t->common, LAM_JOB_STATUS_PENDING, 5000);
    ok(ev_is("created running waiting pending PENDING "), "pending with BLOCK_JOB_PENDING");
    LamError *err = NULL;
    lam_job_dismiss(&t->common, &err);
    ok(err && strcmp(err->msg, "Job 'j2' in state 'pending' cannot accept command verb 'dismiss'") == 0,
       "premature dismiss refused");
    lam_error_free(err);
    err = NULL;
    ok(lam_job_finalize(&t->common, &err) == 0, "finalize");
    ok(ev_is("created running waiting pending PENDING COMPLETED concluded "),
       "finalize -> completed, concluded");
    json_t *q = lam_query_jobs();
    json_t *e0 = json_array_get(q, 0);
    ok(json_array_size(q) == 1 &&
           strcmp(json_string_value(json_object_get(e0, "status")), "concluded") == 0 &&
           json_integer_value(json_object_get(e0, "current-progress")) == 100,
       "query-jobs shows concluded with progress");
    json_decref(q);
    err = NULL;
    lam_job_user_pause(&t->common, &err);
    ok(err && strcmp(err->msg, "Job 'j2' in state 'concluded' cannot accept command verb 'pause'") == 0,
       "pause refused in concluded: %s", err ? err->msg : "");
    lam_error_free(err);
    err = NULL;
    TestJob *dup = (TestJob *)lam_job_create(&test_drv, "j2", 0, true, true, &err);
    ok(!dup && err && strcmp(err->msg, "Job ID 'j2' already in use") == 0, "id in use while concluded");
    lam_error_free(err);
    err = NULL;
    ok(lam_job_dismiss(&t->common, NULL) == 0 && ev_is("created running waiting pending PENDING COMPLETED concluded null "),
       "dismiss -> null");

    /* 3: cancel in pending */
    ev_reset();
    t = mk(&test_drv, "j3", false, false);
    lam_job_start(&t->common);
    atomic_store(&t->finish, true);
    lam_job_wait_status(&t->common, LAM_JOB_STATUS_PENDING, 5000);
    lam_job_user_cancel(&t->common, false, true, NULL);
    ok(ev_is("created running waiting pending PENDING aborting CANCELLED concluded "),
       "cancel in pending");
    q = lam_query_block_jobs();
    e0 = json_array_get(q, 0);
    const char *e = json_string_value(json_object_get(e0, "error"));
    ok(e && strcmp(e, "Operation canceled") == 0, "cancelled job error text");
    json_decref(q);
    lam_job_dismiss(&t->common, NULL);

    /* 4: failure */
    ev_reset();
    t = mk(&test_drv, "j4", true, true);
    lam_job_start(&t->common);
    atomic_store(&t->fail_errno, EIO);
    lam_job_ref(&t->common);
    r = lam_job_run_until_done(&t->common);
    ok(r == -EIO && ev_is("created running aborting COMPLETED(test failure 5) concluded null "),
       "failed job: aborting, COMPLETED with error");
    lam_job_unref(&t->common);

    /* 5: cancel while running */
    ev_reset();
    t = mk(&test_drv, "j5", true, true);
    lam_job_start(&t->common);
    lam_job_ref(&t->common);
    lam_job_user_cancel(&t->common, false, true, NULL);
    r = lam_job_run_until_done(&t->common);
    ok(r == -ECANCELED && ev_is("created running aborting CANCELLED concluded null "),
       "cancelled running job");
    lam_job_unref(&t->common);

    /* 6: cancel a created job: no block-job events */
    ev_reset();
    t = mk(&test_drv, "j6", true, false);
    lam_job_user_cancel(&t->common, true, false, NULL);
    ok(ev_is("created aborting concluded null ") && !lam_job_find("j6"),
       "cancel before start: created aborting concluded null");

    /* 7: early failure */
    ev_reset();
    t = mk(&test_drv, "j7", true, true);
    lam_job_early_fail(&t->common);
    ok(ev_is("created null "), "early failure: created null");

    /* 8: mirror-like ready, standby, complete in standby, resume */
    ev_reset();
    t = mk(&ready_drv, "j8", true, true);
    lam_job_start(&t->common);
    lam_job_wait_status(&t->common, LAM_JOB_STATUS_READY, 5000);
    lam_job_user_pause(&t->common, NULL);
    lam_job_wait_status(&t->common, LAM_JOB_STATUS_STANDBY, 5000);
    ok(lam_job_complete(&t->common, NULL) == 0, "complete accepted in standby");
    lam_job_ref(&t->common);
    lam_job_user_resume(&t->common, NULL);
    r = lam_job_run_until_done(&t->common);
    ok(r == 0 && ev_is("created running ready READY standby ready waiting pending COMPLETED concluded null "),
       "ready/standby/complete sequence");
    lam_job_unref(&t->common);

    /* 9: soft cancel of a ready job completes; force cancel cancels */
    ev_reset();
    t = mk(&ready_drv, "j9", true, true);
    lam_job_start(&t->common);
    lam_job_wait_status(&t->common, LAM_JOB_STATUS_READY, 5000);
    lam_job_ref(&t->common);
    lam_job_user_cancel(&t->common, false, true, NULL);
    r = lam_job_run_until_done(&t->common);
    ok(r == 0 && ev_is("created running ready READY waiting pending COMPLETED concluded null "),
       "soft cancel of ready job = completed");
    lam_job_unref(&t->common);
    ev_reset();
    t = mk(&ready_drv, "j10", true, true);
    lam_job_start(&t->common);
    lam_job_wait_status(&t->common, LAM_JOB_STATUS_READY, 5000);
    lam_job_ref(&t->common);
    lam_job_user_cancel(&t->common, true, false, NULL);
    r = lam_job_run_until_done(&t->common);
    ok(r == -ECANCELED && ev_is("created running ready READY aborting CANCELLED concluded null "),
       "forced cancel of ready job = cancelled");
    lam_job_unref(&t->common);

    /* 10: create-type jobs emit no BLOCK_JOB_* events and are not block jobs */
    ev_reset();
    t = mk(&create_drv, "c1", true, false);
    lam_job_start(&t->common);
    atomic_store(&t->finish, true);
    lam_job_wait_status(&t->common, LAM_JOB_STATUS_CONCLUDED, 5000);
    q = lam_query_block_jobs();
    json_t *qj = lam_query_jobs();
    ok(json_array_size(q) == 0 && json_array_size(qj) == 1, "create job only in query-jobs");
    json_decref(q);
    json_decref(qj);
    lam_job_dismiss(&t->common, NULL);
    ok(ev_is("created running waiting pending concluded null "), "create job events");
}

static double cpu_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void test_pause_cancel_errors(void)
{
    LamError *err = NULL;
    ev_reset();
    TestJob *t = mk(&test_drv, "p1", true, true);
    lam_job_start(&t->common);
    lam_job_user_resume(&t->common, &err);
    ok(err && strcmp(err->msg, "Can't resume a job that was not paused") == 0, "resume unpaused");
    lam_error_free(err);
    err = NULL;
    lam_job_user_pause(&t->common, NULL);
    ok(t->common.pause_count > 0, "paused flag immediately");
    lam_job_wait_status(&t->common, LAM_JOB_STATUS_PAUSED, 5000);
    lam_job_user_pause(&t->common, &err);
    ok(err && strcmp(err->msg, "Job is already paused") == 0, "already paused");
    lam_error_free(err);
    err = NULL;
    int it0 = atomic_load(&t->iterations);
    double c0 = cpu_seconds();
    struct timespec d = { 0, 300000000 };
    nanosleep(&d, NULL);
    double c1 = cpu_seconds();
    ok(atomic_load(&t->iterations) == it0 && c1 - c0 < 0.05,
       "paused job makes no progress and burns no CPU (%.3fs)", c1 - c0);
    lam_job_user_cancel(&t->common, false, true, &err);
    ok(err && strcmp(err->msg, "The block job for device 'p1' is currently paused") == 0,
       "block-job-cancel refuses a paused job");
    lam_error_free(err);
    err = NULL;
    lam_job_ref(&t->common);
    ok(lam_job_user_cancel(&t->common, true, false, NULL) == 0, "job-cancel of a paused job");
    int r = lam_job_run_until_done(&t->common);
    ok(r == -ECANCELED && ev_is("created running paused running aborting CANCELLED concluded null "),
       "paused job cancelled: resumes first");
    lam_job_unref(&t->common);

    /* speed */
    t = mk(&test_drv, "s1", true, true);
    lam_job_set_speed(&t->common, -1, &err);
    ok(err && strcmp(err->msg, "Parameter 'speed' expects a non-negative value") == 0, "negative speed");
    lam_error_free(err);
    err = NULL;
    lam_job_user_cancel(&t->common, true, false, NULL);
    ok(!lam_job_create(&test_drv, "bad id!", 0, true, true, &err) && err &&
           strcmp(err->msg, "Invalid job ID 'bad id!'") == 0, "invalid job id");
    lam_error_free(err);
    err = NULL;
    ok(!lam_job_create(&test_drv, "#x", 0, true, true, &err) && err, "invalid job id '#x'");
    lam_error_free(err);
    err = NULL;

    /* error policies */
    static const struct {
        LamOnError pol;
        int err;
        const char *events;
        const char *iostatus;
    } cases[] = {
        { LAM_ONERR_REPORT, EIO, "created running ERROR(write,report) aborting COMPLETED(Input/output error) concluded null ", NULL },
        { LAM_ONERR_ENOSPC, EIO, "created running ERROR(write,report) aborting COMPLETED(Input/output error) concluded null ", NULL },
        { LAM_ONERR_ENOSPC, ENOSPC, "created running ERROR(write,stop) paused ", "nospace" },
        { LAM_ONERR_STOP, EIO, "created running ERROR(write,stop) paused ", "failed" },
        { LAM_ONERR_IGNORE, EIO, "created running ERROR(write,ignore) ", NULL },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(*cases); i++) {
        ev_reset();
        t = mk(&test_drv, "e1", true, true);
        t->policy = cases[i].pol;
        lam_job_ref(&t->common);
        lam_job_start(&t->common);
        atomic_store(&t->inject, cases[i].err);
        if (cases[i].iostatus) {
            lam_job_wait_status(&t->common, LAM_JOB_STATUS_PAUSED, 5000);
            json_t *q = lam_block_job_info(&t->common);
            const char *ios = json_string_value(json_object_get(q, "io-status"));
            bool good = ios && strcmp(ios, cases[i].iostatus) == 0 &&
                        json_is_true(json_object_get(q, "paused"));
            json_decref(q);
            ok(good && ev_is(cases[i].events), "policy %s errno %d stops, io-status %s",
               lam_on_error_name(cases[i].pol), cases[i].err, cases[i].iostatus);
            lam_job_user_cancel(&t->common, false, true, &err);
            ok(err != NULL, "block-job-cancel refused while stopped");
            lam_error_free(err);
            err = NULL;
            lam_job_user_resume(&t->common, NULL);
            q = lam_block_job_info(&t->common);
            ok(strcmp(json_string_value(json_object_get(q, "io-status")), "ok") == 0,
               "resume clears io-status");
            json_decref(q);
            atomic_store(&t->finish, true);
            ok(lam_job_run_until_done(&t->common) == 0, "job completes after resume");
        } else if (cases[i].pol == LAM_ONERR_IGNORE) {
            while (atomic_load(&t->inject)) {
                struct timespec dd = { 0, 1000000 };
                nanosleep(&dd, NULL);
            }
            atomic_store(&t->finish, true);
            ok(lam_job_run_until_done(&t->common) == 0 &&
                   ev_is("created running ERROR(write,ignore) waiting pending COMPLETED concluded null "),
               "ignore: event, job continues");
        } else {
            int rr = lam_job_run_until_done(&t->common);
            ok(rr == -cases[i].err && ev_is(cases[i].events), "policy %s errno %d reports",
               lam_on_error_name(cases[i].pol), cases[i].err);
        }
        lam_job_unref(&t->common);
    }
}

/* A job that "copies" 64 KiB chunks under the rate limit. */
typedef struct RateJob {
    LamJob common;
    int64_t total;
} RateJob;

static int rate_run(LamJob *job, LamError **errp)
{
    RateJob *r = (RateJob *)job;
    lam_job_progress_set_remaining(job, r->total);
    for (int64_t done = 0; done < r->total && !lam_job_is_cancelled(job); done += 65536) {
        lam_job_ratelimit(job, 65536);
        lam_job_progress_update(job, 65536);
    }
    return 0;
}

static const LamJobDriver rate_drv = {
    .type = "backup", .instance_size = sizeof(RateJob), .block_job = true, .run = rate_run,
};

static void test_ratelimit(void)
{
    LamError *err = NULL;
    RateJob *r = (RateJob *)lam_job_create(&rate_drv, "r1", 4 << 20, true, true, &err);
    r->total = 2 << 20; /* 2 MiB at 4 MiB/s: ~0.5 s */
    lam_job_ref(&r->common);
    int64_t t0 = lam_clock_ns();
    lam_job_start(&r->common);
    lam_job_run_until_done(&r->common);
    double secs = (lam_clock_ns() - t0) / 1e9;
    ok(secs > 0.35 && secs < 2.0, "speed 4 MiB/s copies 2 MiB in %.2fs", secs);
    lam_job_unref(&r->common);

    /* Slow start, then raise the speed while running. */
    r = (RateJob *)lam_job_create(&rate_drv, "r2", 256 << 10, true, true, &err);
    r->total = 8 << 20;
    lam_job_ref(&r->common);
    t0 = lam_clock_ns();
    lam_job_start(&r->common);
    struct timespec d = { 0, 300000000 };
    nanosleep(&d, NULL);
    int64_t mid = atomic_load(&r->common.progress_current);
    json_t *q = lam_block_job_info(&r->common);
    int64_t rate = json_integer_value(json_object_get(q, "rate"));
    int64_t eta = json_integer_value(json_object_get(q, "eta"));
    json_decref(q);
    ok(mid < (1 << 20) && rate > 0 && rate < (1 << 20) && eta > 5,
       "slow phase: %lld bytes after 0.3s, rate %lld, eta %lld s", (long long)mid,
       (long long)rate, (long long)eta);
    lam_job_set_speed(&r->common, 0, NULL);
    lam_job_run_until_done(&r->common);
    double secs2 = (lam_clock_ns() - t0) / 1e9;
    ok(secs2 < 3.0, "set-speed 0 while running finishes quickly (%.2fs)", secs2);
    lam_job_unref(&r->common);
}

/* Grouped transactions: wait for each other, finalize together, a failure
 * cancels the peers. */
static void test_transactions(void)
{
    /* both succeed */
    ev_reset();
    LamJobTxn *txn = lam_job_txn_new();
    TestJob *a = mk(&test_drv, "ta", true, true);
    TestJob *b = mk(&test_drv, "tb", true, true);
    lam_job_txn_add(txn, &a->common);
    lam_job_txn_add(txn, &b->common);
    lam_job_txn_unref(txn);
    lam_job_ref(&a->common);
    lam_job_ref(&b->common);
    lam_job_start(&a->common);
    lam_job_start(&b->common);
    atomic_store(&a->finish, true);
    ok(lam_job_wait_status(&a->common, LAM_JOB_STATUS_WAITING, 5000),
       "txn: first finished job waits for its peer");
    atomic_store(&b->finish, true);
    /* Waiting on the job that finished first must also complete its peer. */
    lam_job_run_until_done(&a->common);
    lam_job_run_until_done(&b->common);
    ok(a->common.status == LAM_JOB_STATUS_NULL && b->common.status == LAM_JOB_STATUS_NULL,
       "txn: both concluded");
    ok(ev_is("created created running running waiting waiting pending pending COMPLETED "
             "concluded null COMPLETED concluded null "),
       "txn: waiting, pending together, then completed");
    lam_job_unref(&a->common);
    lam_job_unref(&b->common);

    /* one fails: the other is cancelled */
    ev_reset();
    txn = lam_job_txn_new();
    a = mk(&test_drv, "fa", true, true);
    b = mk(&test_drv, "fb", true, true);
    lam_job_txn_add(txn, &a->common);
    lam_job_txn_add(txn, &b->common);
    lam_job_txn_unref(txn);
    lam_job_ref(&a->common);
    lam_job_ref(&b->common);
    lam_job_start(&a->common);
    lam_job_start(&b->common);
    atomic_store(&b->fail_errno, EIO);
    int rb = lam_job_run_until_done(&b->common);
    int ra = lam_job_run_until_done(&a->common);
    ok(rb == -EIO && ra == -ECANCELED, "txn: failure (%d) cancels the peer (%d)", rb, ra);
    ok(ev_is("created created running running aborting COMPLETED(test failure 5) concluded "
             "null aborting CANCELLED concluded null "),
       "txn: failing job first, then the cancelled peer");
    lam_job_unref(&a->common);
    lam_job_unref(&b->common);

    /* a peer that already waits is cancelled too */
    ev_reset();
    txn = lam_job_txn_new();
    a = mk(&test_drv, "wa", true, true);
    b = mk(&test_drv, "wb", true, true);
    lam_job_txn_add(txn, &a->common);
    lam_job_txn_add(txn, &b->common);
    lam_job_txn_unref(txn);
    lam_job_ref(&a->common);
    lam_job_ref(&b->common);
    lam_job_start(&a->common);
    lam_job_start(&b->common);
    atomic_store(&a->finish, true);
    lam_job_wait_status(&a->common, LAM_JOB_STATUS_WAITING, 5000);
    lam_job_user_cancel(&b->common, true, false, NULL);
    rb = lam_job_run_until_done(&b->common);
    ra = lam_job_run_until_done(&a->common);
    ok(rb == -ECANCELED && ra == -ECANCELED, "txn: cancel of one cancels a waiting peer");
    ok(ev_is("created created running running waiting aborting CANCELLED concluded null "
             "aborting CANCELLED concluded null "),
       "txn: cancel events");
    lam_job_unref(&a->common);
    lam_job_unref(&b->common);

    /* manual finalize: pending together; PENDING only from the manual job;
     * finalizing one finalizes both */
    ev_reset();
    txn = lam_job_txn_new();
    a = mk(&test_drv, "ma", true, true);
    b = mk(&test_drv, "mb", false, false);
    lam_job_txn_add(txn, &a->common);
    lam_job_txn_add(txn, &b->common);
    lam_job_txn_unref(txn);
    lam_job_ref(&a->common);
    lam_job_ref(&b->common);
    lam_job_start(&a->common);
    lam_job_start(&b->common);
    atomic_store(&a->finish, true);
    atomic_store(&b->finish, true);
    lam_job_wait_status(&b->common, LAM_JOB_STATUS_PENDING, 5000);
    lam_job_wait_status(&a->common, LAM_JOB_STATUS_PENDING, 5000);
    ok(a->common.status == LAM_JOB_STATUS_PENDING, "txn: auto job waits for the manual one");
    LamError *err = NULL;
    ok(lam_job_finalize(&a->common, &err) == 0, "txn: finalize through either job");
    ok(a->common.status == LAM_JOB_STATUS_NULL && b->common.status == LAM_JOB_STATUS_CONCLUDED,
       "txn: both finalized");
    lam_job_dismiss(&b->common, NULL);
    bool seq_ok = ev_is("created created running running waiting waiting pending pending "
                        "PENDING COMPLETED concluded null COMPLETED concluded null ");
    ok(seq_ok, "txn: manual finalize events");
    lam_job_unref(&a->common);
    lam_job_unref(&b->common);

    /* cancel before start: both go away without block-job events */
    ev_reset();
    txn = lam_job_txn_new();
    a = mk(&test_drv, "ca", true, true);
    b = mk(&test_drv, "cb", true, true);
    lam_job_txn_add(txn, &a->common);
    lam_job_txn_add(txn, &b->common);
    lam_job_txn_unref(txn);
    lam_job_user_cancel(&a->common, true, false, NULL);
    ok(ev_is("created created aborting concluded null aborting concluded null ") &&
           !lam_job_find("ca") && !lam_job_find("cb"),
       "txn: cancelling a created job rolls back the transaction");
}

/* Back-to-back drained sections: the second pause request may come
 * before the job thread woke up from the first (the resumer already
 * reported "running"); the job must pause again, or drain_begin would
 * wait forever.  Also the start inside a drained section. */
static void test_drain_storm(void)
{
    alarm(60); /* a hang fails the test instead of the CI run */
    ev_reset();
    TestJob *t = mk(&test_drv, "ds", true, false);
    lam_drain_begin();
    lam_job_start_drained(&t->common);
    bool paused_at_start = t->common.paused && status_of(t) == LAM_JOB_STATUS_PAUSED;
    lam_drain_end();
    ok(paused_at_start && status_of(t) == LAM_JOB_STATUS_RUNNING,
       "started drained: paused until the drain ends, running right after");
    ok(ev_is("created running paused running "), "started drained: events");
    bool all_paused = true;
    for (int i = 0; i < 2000; i++) {
        lam_drain_begin();
        all_paused &= t->common.paused;
        lam_drain_end();
    }
    ok(all_paused && status_of(t) == LAM_JOB_STATUS_RUNNING,
       "2000 back-to-back drains: paused inside each, running after");
    cleanup("ds");
    alarm(0);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    lam_event_set_sink(sink);
    test_tables();
    test_lifecycles();
    test_pause_cancel_errors();
    test_ratelimit();
    test_transactions();
    test_verbs_live();
    test_drain_storm();
    lam_job_cancel_all_sync();
    printf("1..%d\n", ntest);
    return nfail ? 1 : 0;
}
