/* A test protocol driver: an in-memory disk with configurable alignment,
 * optional missing callbacks, an operation log, and a gate that holds
 * requests so tests can arrange concurrency deterministically. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "memdrv.h"

static int mem_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    MemState *s = bs->opaque;
    s->size = lam_opt_int(opts, "size", 1 << 20, errp);
    s->align = (uint32_t)lam_opt_int(opts, "align", 1, errp);
    s->data = calloc(1, (size_t)s->size);
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    atomic_store(&bs->total_size, s->size);
    bs->bl.request_alignment = s->align;
    bs->filename = strdup("mem://");
    return s->data ? 0 : -ENOMEM;
}

static void mem_close(LamNode *bs)
{
    MemState *s = bs->opaque;
    free(s->data);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
}

static void gate_wait(MemState *s, bool write)
{
    pthread_mutex_lock(&s->lock);
    s->entered++;
    pthread_cond_broadcast(&s->cond);
    while ((write ? s->hold_writes : s->hold_reads)) {
        pthread_cond_wait(&s->cond, &s->lock);
    }
    pthread_mutex_unlock(&s->lock);
}

static int mem_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *q, int flags)
{
    MemState *s = bs->opaque;
    if (off % s->align || bytes % s->align) {
        atomic_fetch_add(&s->misaligned, 1);
        return -EINVAL;
    }
    gate_wait(s, false);
    pthread_mutex_lock(&s->lock);
    lam_iov_from_buf(q, 0, s->data + off, (size_t)bytes);
    s->nreads++;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int mem_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *q, int flags)
{
    MemState *s = bs->opaque;
    if (off % s->align || bytes % s->align) {
        atomic_fetch_add(&s->misaligned, 1);
        return -EINVAL;
    }
    if (off + bytes > s->size) {
        return -ENOSPC;
    }
    gate_wait(s, true);
    pthread_mutex_lock(&s->lock);
    lam_iov_to_buf(q, 0, s->data + off, (size_t)bytes);
    s->nwrites++;
    if (flags & LAM_REQ_FUA) {
        s->nfua++;
    }
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int mem_flush(LamNode *bs)
{
    MemState *s = bs->opaque;
    atomic_fetch_add(&s->nflush, 1);
    return 0;
}

const LamDriver test_drv_mem = {
    .name = "test-mem",
    .kind = LAM_DRV_PROTOCOL,
    .state_size = sizeof(MemState),
    .open = mem_open,
    .close = mem_close,
    .preadv = mem_preadv,
    .pwritev = mem_pwritev,
    .flush = mem_flush,
};

void mem_set_hold(LamNode *bs, bool reads, bool writes)
{
    MemState *s = bs->opaque;
    pthread_mutex_lock(&s->lock);
    s->hold_reads = reads;
    s->hold_writes = writes;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

void mem_wait_entered(LamNode *bs, int n)
{
    MemState *s = bs->opaque;
    pthread_mutex_lock(&s->lock);
    while (s->entered < n) {
        pthread_cond_wait(&s->cond, &s->lock);
    }
    pthread_mutex_unlock(&s->lock);
}
