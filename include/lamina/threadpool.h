/* A pool of worker threads that run submitted tasks (NBD requests, job
 * copy requests).  Blocking is fine inside a task: the pool grows up to
 * max_threads when every worker is busy, and idle workers exit after a
 * while so an unused pool costs nothing.
 *
 * Tasks are intrusive (LamTask is embedded in the caller's request
 * object) so submitting never allocates.  Any thread may submit.
 */
#ifndef LAMINA_THREADPOOL_H
#define LAMINA_THREADPOOL_H

#include <stdbool.h>
#include <stdint.h>

#include "lamina/error.h"

typedef struct LamThreadPool LamThreadPool;

typedef struct LamTask {
    void (*fn)(struct LamTask *task);
    struct LamTask *next; /* pool-private queue link */
    int64_t queued_us;    /* pool-private: when it was queued */
} LamTask;

/* max_threads >= 1.  idle_ms: how long an idle worker waits for work
 * before exiting (0 = default 10 s). */
LamThreadPool *lam_threadpool_new(const char *name, int max_threads,
                                  int idle_ms, LamError **errp);

/* Pacing for short tasks (e.g. page-cache hits): at most max_active tasks
 * run at once unless the oldest queued task has waited delay_us; then
 * more workers are woken or created, up to max_threads.  This keeps a few
 * hot workers busy instead of waking a thread per task, while tasks that
 * block for long still get more threads.  Default (never called): every
 * queued task gets a worker at once.  Only for tasks that never wait for
 * other tasks of the same pool. */
void lam_threadpool_set_pacing(LamThreadPool *p, int max_active, int delay_us);

/* Queues task; task->fn(task) runs on a worker.  The task memory must stay
 * valid until fn starts; fn may free it.  Returns 0, or -errno if no
 * worker exists and none could be created (the task is not queued). */
int lam_threadpool_submit(LamThreadPool *p, LamTask *task);

/* Waits until every queued and running task has finished. */
void lam_threadpool_wait_idle(LamThreadPool *p);

/* Runs the remaining queued tasks, stops the workers and frees the pool.
 * Must not be called from a task of this pool. */
void lam_threadpool_free(LamThreadPool *p);

/* Number of live worker threads (for tests). */
int lam_threadpool_nthreads(LamThreadPool *p);

#endif
