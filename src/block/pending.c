/* Pending writes: data announced for a node, readable before it is
 * written (the model and the read-side rules are in driver.h). */
#include <stdlib.h>
#include <string.h>

#include "lamina/driver.h"

struct LamPending {
    int64_t off, bytes;
    void *buf;
    struct LamPending *next;
};

/* Protects every node's pending list and pending_bytes.  One lock for
 * all nodes: entries exist only while a classic fleecing copies, and the
 * readers skip it when a node's count is zero. */
static pthread_mutex_t pending_lock = PTHREAD_MUTEX_INITIALIZER;
static int64_t pending_bytes;

LamPending *lam_node_pending_add(LamNode *bs, int64_t off, int64_t bytes, void *buf,
                                 int64_t cap_bytes)
{
    LamPending *p = malloc(sizeof(*p));
    if (!p) {
        return NULL;
    }
    p->off = off;
    p->bytes = bytes;
    p->buf = buf;
    pthread_mutex_lock(&pending_lock);
    if (pending_bytes + bytes > cap_bytes) {
        pthread_mutex_unlock(&pending_lock);
        free(p);
        return NULL;
    }
    pending_bytes += bytes;
    p->next = bs->pending;
    bs->pending = p;
    /* seq_cst: visible before the caller lets the source change. */
    atomic_fetch_add(&bs->npending, 1);
    pthread_mutex_unlock(&pending_lock);
    return p;
}

void lam_node_pending_done(LamNode *bs, LamPending *p)
{
    pthread_mutex_lock(&pending_lock);
    for (LamPending **pp = &bs->pending; *pp; pp = &(*pp)->next) {
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    }
    pending_bytes -= p->bytes;
    atomic_fetch_sub(&bs->npending, 1);
    pthread_mutex_unlock(&pending_lock);
    free(p->buf);
    free(p);
}

const void *lam_pending_buf(const LamPending *p)
{
    return p->buf;
}

void lam_node_pending_overlay(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov,
                              size_t qoff)
{
    if (atomic_load(&bs->npending) == 0) {
        return;
    }
    pthread_mutex_lock(&pending_lock);
    for (LamPending *p = bs->pending; p; p = p->next) {
        int64_t a = p->off > off ? p->off : off;
        int64_t e1 = p->off + p->bytes, e2 = off + bytes;
        int64_t b = e1 < e2 ? e1 : e2;
        if (a < b) {
            lam_iov_from_buf(qiov, qoff + (size_t)(a - off),
                             (const char *)p->buf + (a - p->off), (size_t)(b - a));
        }
    }
    pthread_mutex_unlock(&pending_lock);
}

bool lam_debug_no_fleecing_guard(void)
{
    const char *v = getenv("LAMINA_DEBUG_NO_FLEECING_GUARD");
    return v && strcmp(v, "1") == 0;
}

bool lam_debug_fleecing_skip(const char *step)
{
    const char *v = getenv("LAMINA_DEBUG_NO_FLEECING_GUARD");
    return v && (strcmp(v, "1") == 0 || strcmp(v, step) == 0);
}
