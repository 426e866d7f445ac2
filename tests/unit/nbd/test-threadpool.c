/* Unit tests of the worker pool (src/util/threadpool.c): every task runs
 * exactly once, pacing still grows the pool when tasks block, free runs
 * what is queued.  TAP output. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "lamina/threadpool.h"

static int failures, tests;

static void ok(int cond, const char *what)
{
    tests++;
    printf("%sok %d - %s\n", cond ? "" : "not ", tests, what);
    if (!cond) {
        failures++;
    }
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

typedef struct {
    LamTask task;
    _Atomic int *counter;
    int sleep_us;
    double queued;
} Job;

static pthread_mutex_t lat_lock = PTHREAD_MUTEX_INITIALIZER;
static double worst_latency; /* lat_lock */

static double now_s(void);

static void job_fn(LamTask *t)
{
    Job *j = (Job *)t;
    double lat = now_s() - j->queued;
    pthread_mutex_lock(&lat_lock);
    if (lat > worst_latency) {
        worst_latency = lat;
    }
    pthread_mutex_unlock(&lat_lock);
    if (j->sleep_us) {
        usleep(j->sleep_us);
    }
    atomic_fetch_add(j->counter, 1);
    free(j);
}

static void submit_n(LamThreadPool *p, int n, _Atomic int *counter, int sleep_us)
{
    for (int i = 0; i < n; i++) {
        Job *j = calloc(1, sizeof(*j));
        j->task.fn = job_fn;
        j->counter = counter;
        j->sleep_us = sleep_us;
        j->queued = now_s();
        if (lam_threadpool_submit(p, &j->task) < 0) {
            job_fn(&j->task);
        }
    }
}

static void *submitter(void *opaque)
{
    void **a = opaque;
    submit_n(a[0], 5000, a[1], 0);
    return NULL;
}

static void *trickler(void *opaque)
{
    void **a = opaque;
    double end = now_s() + 3;
    unsigned seed = 1;
    while (now_s() < end) {
        submit_n(a[0], 1 + rand_r(&seed) % 4, a[1], rand_r(&seed) % 4 ? 0 : 50);
        usleep(rand_r(&seed) % 300);
    }
    return NULL;
}

int main(void)
{
    LamError *err = NULL;
    ok(lam_threadpool_new("x", 0, 0, &err) == NULL && err, "max_threads 0 refused");
    lam_error_free(err);

    /* eager, many submitters */
    LamThreadPool *p = lam_threadpool_new("t-eager", 8, 50, NULL);
    _Atomic int count = 0;
    pthread_t th[4];
    void *args[2] = { p, &count };
    for (int i = 0; i < 4; i++) {
        pthread_create(&th[i], NULL, submitter, args);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
    }
    lam_threadpool_wait_idle(p);
    ok(atomic_load(&count) == 20000, "eager: 20000 tasks from 4 threads ran once each");
    ok(lam_threadpool_nthreads(p) <= 8, "eager: never above max_threads");
    usleep(300000);
    ok(lam_threadpool_nthreads(p) == 0, "idle workers exit after idle_ms");
    lam_threadpool_free(p);

    /* paced: blocking tasks still get more workers after the delay */
    p = lam_threadpool_new("t-paced", 16, 0, NULL);
    lam_threadpool_set_pacing(p, 1, 2000);
    count = 0;
    double t0 = now_s();
    submit_n(p, 8, &count, 100000);
    lam_threadpool_wait_idle(p);
    double dt = now_s() - t0;
    ok(atomic_load(&count) == 8, "paced: all 8 blocking tasks ran");
    ok(dt < 0.5, "paced: blocking tasks overlapped (not 8 x 100 ms serial)");
    printf("# 8 x 100 ms blocking tasks took %.0f ms\n", dt * 1000);

    /* paced: short tasks need few threads */
    count = 0;
    submit_n(p, 10000, &count, 0);
    lam_threadpool_wait_idle(p);
    ok(atomic_load(&count) == 10000, "paced: 10000 short tasks ran");

    /* paced bursts never stall: a lost wake-up would leave queued tasks
     * waiting for an idle worker's 10 s timeout */
    LamThreadPool *q = lam_threadpool_new("t-burst", 64, 0, NULL);
    lam_threadpool_set_pacing(q, 3, 200);
    double worst = 0;
    for (int round = 0; round < 3000; round++) {
        count = 0;
        double b0 = now_s();
        submit_n(q, 1 + round % 17, &count, round % 3 ? 0 : 30);
        lam_threadpool_wait_idle(q);
        double bt = now_s() - b0;
        worst = bt > worst ? bt : worst;
        if (round % 500 == 499) {
            usleep(2000); /* let workers go back to their long sleep */
        }
    }
    printf("# slowest of 3000 bursts: %.1f ms\n", worst * 1000);
    ok(worst < 2.0, "paced bursts: no burst waits for an idle timeout");

    /* a steady trickle from another thread, like an NBD connection */
    worst_latency = 0;
    count = 0;
    pthread_t tr;
    void *targs[2] = { q, &count };
    pthread_create(&tr, NULL, trickler, targs);
    pthread_join(tr, NULL);
    lam_threadpool_wait_idle(q);
    printf("# trickle: %d tasks, worst queue wait %.1f ms\n", atomic_load(&count),
           worst_latency * 1000);
    ok(worst_latency < 2.0, "paced trickle: no task waits for an idle timeout");
    lam_threadpool_free(q);

    /* free runs what is still queued */
    count = 0;
    submit_n(p, 50, &count, 1000);
    lam_threadpool_free(p);
    ok(atomic_load(&count) == 50, "free runs queued tasks first");

    printf("1..%d\n", tests);
    return failures ? 1 : 0;
}
