/* Quiesce: lam_drain_begin() stops new requests from root edges and waits
 * for the ones in flight.  Requests between nodes are not gated: they
 * belong to a root request that is already counted.
 *
 * Fast path is two atomics per request; the mutex is only taken while a
 * drain is pending.  drain_lock protects the waits on drain_cond (both the
 * drainer waiting for in_flight == 0 and requests waiting for draining ==
 * 0). */
#include <pthread.h>
#include <stdatomic.h>

#include "block/block-int.h"

static pthread_mutex_t drain_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t drain_cond = PTHREAD_COND_INITIALIZER;
static _Atomic int draining;
static _Atomic int root_in_flight;

void lam_root_req_leave(void)
{
    if (atomic_fetch_sub(&root_in_flight, 1) == 1 && atomic_load(&draining)) {
        pthread_mutex_lock(&drain_lock);
        pthread_cond_broadcast(&drain_cond);
        pthread_mutex_unlock(&drain_lock);
    }
}

void lam_root_req_enter(void)
{
    for (;;) {
        atomic_fetch_add(&root_in_flight, 1);
        if (!atomic_load(&draining)) {
            return;
        }
        lam_root_req_leave();
        pthread_mutex_lock(&drain_lock);
        while (atomic_load(&draining)) {
            pthread_cond_wait(&drain_cond, &drain_lock);
        }
        pthread_mutex_unlock(&drain_lock);
    }
}

/* Quiesce hooks of other layers (jobs pause their own I/O, which does not
 * come through root edges).  Set once at start-up; run on the control
 * thread around the outermost drained section only. */
static LamDrainHook hook_begin, hook_end;
static int hook_depth; /* control thread only */

void lam_drain_set_hooks(LamDrainHook begin, LamDrainHook end)
{
    hook_begin = begin;
    hook_end = end;
}

void lam_drain_begin(void)
{
    if (hook_depth++ == 0 && hook_begin) {
        hook_begin();
    }
    pthread_mutex_lock(&drain_lock);
    atomic_fetch_add(&draining, 1);
    while (atomic_load(&root_in_flight) > 0) {
        pthread_cond_wait(&drain_cond, &drain_lock);
    }
    pthread_mutex_unlock(&drain_lock);
}

void lam_drain_end(void)
{
    pthread_mutex_lock(&drain_lock);
    if (atomic_fetch_sub(&draining, 1) == 1) {
        pthread_cond_broadcast(&drain_cond);
    }
    pthread_mutex_unlock(&drain_lock);
    if (--hook_depth == 0 && hook_end) {
        hook_end();
    }
}
