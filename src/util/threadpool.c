/* Worker thread pool: a FIFO of intrusive tasks served by up to
 * max_threads detached workers that are created on demand and exit after
 * idle_ms without work. */
#include <errno.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lamina/threadpool.h"

struct LamThreadPool {
    /* lock protects every field below it; workers and submitters only. */
    pthread_mutex_t lock;
    pthread_cond_t work;     /* signalled when a task is queued or on stop */
    pthread_cond_t changed;  /* broadcast when a task ends or a worker exits */
    LamTask *head, *tail;
    int nqueued;             /* tasks in the FIFO */
    int nrunning;            /* tasks being run */
    int nthreads;            /* live workers */
    int nidle;               /* workers blocked in the work wait */
    int max_threads;
    int idle_ms;
    bool stopping;
    char name[16];
};

static void *worker_main(void *opaque)
{
    LamThreadPool *p = opaque;

    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->head && !p->stopping) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += p->idle_ms / 1000;
            ts.tv_nsec += (long)(p->idle_ms % 1000) * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            p->nidle++;
            int r = pthread_cond_timedwait(&p->work, &p->lock, &ts);
            p->nidle--;
            if (r == ETIMEDOUT && !p->head) {
                goto out;
            }
        }
        if (!p->head) {
            break; /* stopping and nothing left */
        }
        LamTask *t = p->head;
        p->head = t->next;
        if (!p->head) {
            p->tail = NULL;
        }
        p->nqueued--;
        p->nrunning++;
        pthread_mutex_unlock(&p->lock);

        t->fn(t);

        pthread_mutex_lock(&p->lock);
        p->nrunning--;
        if (p->nrunning == 0 && p->nqueued == 0) {
            pthread_cond_broadcast(&p->changed);
        }
    }
out:
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
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->changed, NULL);
    p->max_threads = max_threads;
    p->idle_ms = idle_ms > 0 ? idle_ms : 10000;
    snprintf(p->name, sizeof(p->name), "%s", name);
    return p;
}

int lam_threadpool_submit(LamThreadPool *p, LamTask *task)
{
    task->next = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->tail) {
        p->tail->next = task;
    } else {
        p->head = task;
    }
    p->tail = task;
    p->nqueued++;
    /* Grow when queued work outnumbers the workers that are free for it;
     * a worker that fails to start is fine as long as some worker lives. */
    if (p->nqueued > p->nidle && p->nthreads < p->max_threads) {
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
    if (p->nidle > 0) {
        pthread_cond_signal(&p->work);
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
