/* Worker thread pool: a FIFO of intrusive tasks served by up to
 * max_threads detached workers that are created on demand and exit after
 * idle_ms without work.
 *
 * Waking a sleeping thread costs more than a short task (a page-cache
 * read), so with pacing only max_active tasks run at once and busy
 * workers drain the queue back to back; a queue head older than delay_us
 * means tasks are blocking, and then more workers join in. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lamina/threadpool.h"

struct LamThreadPool {
    /* lock protects every field below it. */
    pthread_mutex_t lock;
    pthread_cond_t work;     /* signalled when a worker should look */
    pthread_cond_t changed;  /* broadcast when a task ends or a worker exits */
    LamTask *head, *tail;
    int nqueued;             /* tasks in the FIFO */
    int nrunning;            /* tasks being run */
    int nthreads;            /* live workers */
    int nidle;               /* workers blocked in the work wait */
    int nwoken;              /* woken or starting workers not yet looking */
    int max_threads;
    int max_active;          /* pacing: eager limit on running tasks */
    int delay_us;            /* pacing: queue age that adds workers */
    int idle_ms;
    bool watcher;            /* an idle worker polls a paced queue */
    bool stopping;
    char name[16];
};

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Locked.  Whether another task may start now. */
static bool may_start(LamThreadPool *p, int64_t now)
{
    return p->head && (p->nrunning < p->max_active ||
                       now - p->head->queued_us >= p->delay_us);
}

static void deadline_in(struct timespec *ts, int64_t us)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += us / 1000000;
    ts->tv_nsec += (long)(us % 1000000) * 1000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static int spawn_worker(LamThreadPool *p);

static void *worker_main(void *opaque)
{
    LamThreadPool *p = opaque;

    pthread_mutex_lock(&p->lock);
    if (p->nwoken > 0) {
        p->nwoken--; /* we were created to look at the queue */
    }
    for (;;) {
        if (may_start(p, now_us()) || (p->stopping && p->head)) {
            LamTask *t = p->head;
            p->head = t->next;
            if (!p->head) {
                p->tail = NULL;
            }
            p->nqueued--;
            p->nrunning++;
            if (p->head && !p->watcher && p->nwoken == 0) {
                /* Tasks wait behind us and nobody may notice if we block:
                 * get an idle worker (or a new spare) to watch the queue's
                 * age. */
                if (p->nidle > 0) {
                    p->nwoken++;
                    pthread_cond_signal(&p->work);
                } else if (p->nthreads < p->max_threads) {
                    spawn_worker(p);
                }
            }
            pthread_mutex_unlock(&p->lock);

            t->fn(t);

            pthread_mutex_lock(&p->lock);
            p->nrunning--;
            if (p->nrunning == 0 && p->nqueued == 0) {
                pthread_cond_broadcast(&p->changed);
            }
            continue;
        }
        if (p->stopping) {
            break;
        }
        /* With work queued but paced, look again once the head may have
         * aged enough; otherwise sleep until woken or idle too long. */
        struct timespec ts;
        bool paced = p->head != NULL && !p->watcher;
        if (paced) {
            p->watcher = true; /* one poller is enough */
        }
        deadline_in(&ts, paced ? p->delay_us : (int64_t)p->idle_ms * 1000);
        p->nidle++;
        int r = pthread_cond_timedwait(&p->work, &p->lock, &ts);
        p->nidle--;
        if (paced) {
            p->watcher = false;
        }
        /* A signal can race with a timeout and be consumed by it, so any
         * return counts as the wake-up: undercounting only costs an extra
         * signal later, overcounting could leave tasks unnoticed. */
        if (p->nwoken > 0) {
            p->nwoken--;
        }
        if (r == ETIMEDOUT && !paced && !p->head && !p->stopping) {
            break;
        }
    }
    p->nthreads--;
    pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* Called with p->lock held. */
static int spawn_worker(LamThreadPool *p)
{
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* Tasks are I/O paths, not deep recursions: 512 KiB is plenty and
     * keeps a large pool cheap. */
    pthread_attr_setstacksize(&attr, 512 * 1024);
    int r = pthread_create(&th, &attr, worker_main, p);
    pthread_attr_destroy(&attr);
    if (r != 0) {
        return -r;
    }
    pthread_setname_np(th, p->name);
    p->nthreads++;
    p->nwoken++;
    return 0;
}

LamThreadPool *lam_threadpool_new(const char *name, int max_threads,
                                  int idle_ms, LamError **errp)
{
    if (max_threads < 1) {
        lam_error_setg(errp, "Thread pool '%s': max_threads must be at least 1",
                       name);
        return NULL;
    }
    LamThreadPool *p = calloc(1, sizeof(*p));
    if (!p) {
        lam_error_setg(errp, "Thread pool '%s': out of memory", name);
        return NULL;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, &ca);
    pthread_cond_init(&p->changed, NULL);
    pthread_condattr_destroy(&ca);
    p->max_threads = max_threads;
    p->max_active = max_threads;
    p->delay_us = 0;
    p->idle_ms = idle_ms > 0 ? idle_ms : 10000;
    snprintf(p->name, sizeof(p->name), "%s", name);
    return p;
}

void lam_threadpool_set_pacing(LamThreadPool *p, int max_active, int delay_us)
{
    pthread_mutex_lock(&p->lock);
    p->max_active = max_active < 1 ? 1 : max_active;
    p->delay_us = delay_us < 1 ? 1 : delay_us;
    pthread_mutex_unlock(&p->lock);
}

int lam_threadpool_submit(LamThreadPool *p, LamTask *task)
{
    task->next = NULL;
    int64_t now = now_us();
    task->queued_us = now;
    pthread_mutex_lock(&p->lock);
    if (p->tail) {
        p->tail->next = task;
    } else {
        p->head = task;
    }
    p->tail = task;
    p->nqueued++;
    /* Get one more worker looking if the queued tasks outnumber the
     * workers already on their way and pacing allows another start. */
    bool allowed = p->nrunning + p->nwoken < p->max_active ||
                   now - p->head->queued_us >= p->delay_us;
    if ((p->nqueued > p->nwoken && allowed) ||
        (p->nrunning == 0 && p->nwoken == 0)) {
        /* (Nobody running and nobody on the way: someone must look.) */
        if (p->nidle > p->nwoken) {
            p->nwoken++;
            pthread_cond_signal(&p->work);
        } else if (p->nthreads < p->max_threads) {
            int r = spawn_worker(p);
            if (r < 0 && p->nthreads == 0) {
                /* Unqueue: nobody would ever run it. */
                LamTask **pp = &p->head;
                LamTask *prev = NULL;
                while (*pp != task) {
                    prev = *pp;
                    pp = &(*pp)->next;
                }
                *pp = task->next;
                if (p->tail == task) {
                    p->tail = prev;
                }
                p->nqueued--;
                pthread_mutex_unlock(&p->lock);
                return r;
            }
        }
    }
    pthread_mutex_unlock(&p->lock);
    return 0;
}

void lam_threadpool_wait_idle(LamThreadPool *p)
{
    pthread_mutex_lock(&p->lock);
    while (p->nqueued > 0 || p->nrunning > 0) {
        pthread_cond_wait(&p->changed, &p->lock);
    }
    pthread_mutex_unlock(&p->lock);
}

int lam_threadpool_nthreads(LamThreadPool *p)
{
    pthread_mutex_lock(&p->lock);
    int n = p->nthreads;
    pthread_mutex_unlock(&p->lock);
    return n;
}

void lam_threadpool_free(LamThreadPool *p)
{
    if (!p) {
        return;
    }
    pthread_mutex_lock(&p->lock);
    p->stopping = true;
    pthread_cond_broadcast(&p->work);
    while (p->nthreads > 0) {
        pthread_cond_wait(&p->changed, &p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->changed);
    free(p);
}
