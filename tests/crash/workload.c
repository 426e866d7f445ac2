/* Guest operations for the crash test and the content model that judges
 * what a guest reads back after a simulated power cut. */
#include <stdlib.h>
#include <string.h>

#include "recorder.h"
#include "rng.h"
#include "workload.h"

static int64_t clamp_len(int64_t off, int64_t len, int64_t size)
{
    if (len < 1) {
        len = 1;
    }
    return off + len > size ? size - off : len;
}

static void add_op(Workload *w, int *cap, GuestOp op)
{
    if (w->nops == *cap) {
        *cap = *cap ? *cap * 2 : 256;
        w->ops = realloc(w->ops, (size_t)*cap * sizeof(*w->ops));
        if (!w->ops) {
            abort();
        }
    }
    w->ops[w->nops++] = op;
}

static GuestOp mk_write(Rng *r, int64_t off, int64_t len)
{
    GuestOp op = { .type = G_WRITE, .off = off, .len = len };
    op.data = malloc((size_t)len);
    if (!op.data) {
        abort();
    }
    rng_fill(r, op.data, (size_t)len);
    /* Some zero runs inside data, so zero-detection shortcuts are tested. */
    if (rng_below(r, 8) == 0 && len > 64) {
        int64_t zo = (int64_t)rng_below(r, (uint64_t)len / 2);
        memset(op.data + zo, 0, (size_t)(len / 4));
    }
    return op;
}

void workload_generate(Workload *w, const WorkloadParams *p)
{
    Rng r;
    rng_seed(&r, p->seed);
    int cap = 0;
    memset(w, 0, sizeof(*w));
    w->p = *p;
    const int64_t cl = p->cluster, size = p->size;
    const int64_t nclusters = size / cl;
    int64_t fill_cursor = (int64_t)rng_below(&r, (uint64_t)nclusters) * cl;
    int since_flush = 0, flush_every = 2 + (int)rng_below(&r, 10);

    while (w->nops < p->nops) {
        unsigned k = (unsigned)rng_below(&r, 100);
        GuestOp op;
        if (since_flush >= flush_every) {
            op = (GuestOp){ .type = G_FLUSH };
            since_flush = 0;
            flush_every = 2 + (int)rng_below(&r, 10);
            add_op(w, &cap, op);
            continue;
        }
        if (k < 35) {
            /* Fresh write: whole clusters, sectors, or an odd range that
             * leaves part of a cluster to be copied from the backing file. */
            unsigned shape = (unsigned)rng_below(&r, 10);
            int64_t off, len;
            if (shape < 5) {
                off = (int64_t)rng_below(&r, (uint64_t)nclusters) * cl;
                len = cl * (1 + (int64_t)rng_below(&r, 4));
            } else if (shape < 8) {
                off = (int64_t)rng_below(&r, (uint64_t)(size / 512)) * 512;
                len = 512 * (1 + (int64_t)rng_below(&r, (uint64_t)(2 * cl / 512 + 1)));
            } else {
                off = (int64_t)rng_below(&r, (uint64_t)size);
                len = 1 + (int64_t)rng_below(&r, (uint64_t)(2 * cl));
            }
            op = mk_write(&r, off, clamp_len(off, len, size));
        } else if (k < 50) {
            /* Overwrite (part of) an earlier write: in-place updates of
             * allocated clusters, and COW when the range straddles. */
            int64_t off = 0, len = cl;
            for (int i = w->nops - 1, tries = 0; i >= 0 && tries < 64; i--, tries++) {
                if (w->ops[i].type == G_WRITE && rng_below(&r, 3) == 0) {
                    off = w->ops[i].off;
                    len = w->ops[i].len;
                    break;
                }
            }
            int64_t shift = (int64_t)rng_below(&r, 1024) - 512;
            off = off + shift < 0 ? 0 : off + shift;
            if (off >= size) {
                off = size - 1;
            }
            op = mk_write(&r, off, clamp_len(off, len, size));
        } else if (k < 60) {
            /* Sequential fill: grows the image across L2 tables and
             * refcount blocks. */
            int64_t len = cl * (4 + (int64_t)rng_below(&r, 13));
            if (fill_cursor >= size) {
                fill_cursor = 0;
            }
            op = mk_write(&r, fill_cursor, clamp_len(fill_cursor, len, size));
            fill_cursor += op.len;
        } else if (k < 72) {
            op = (GuestOp){ .type = G_ZERO };
            if (rng_below(&r, 3)) {
                op.off = (int64_t)rng_below(&r, (uint64_t)nclusters) * cl;
                op.len = cl * (1 + (int64_t)rng_below(&r, 8));
            } else {
                op.off = (int64_t)rng_below(&r, (uint64_t)size);
                op.len = 1 + (int64_t)rng_below(&r, (uint64_t)(3 * cl));
            }
            op.len = clamp_len(op.off, op.len, size);
            op.flags = rng_below(&r, 2) ? LAM_REQ_MAY_UNMAP : 0;
        } else if (k < 82) {
            op = (GuestOp){ .type = G_DISCARD };
            if (rng_below(&r, 4)) {
                op.off = (int64_t)rng_below(&r, (uint64_t)nclusters) * cl;
                op.len = cl * (1 + (int64_t)rng_below(&r, 8));
            } else {
                op.off = (int64_t)rng_below(&r, (uint64_t)size);
                op.len = 1 + (int64_t)rng_below(&r, (uint64_t)(3 * cl));
            }
            op.len = clamp_len(op.off, op.len, size);
        } else {
            /* Small write inside a cluster: the COW-from-backing case. */
            int64_t off = (int64_t)rng_below(&r, (uint64_t)size);
            op = mk_write(&r, off, clamp_len(off, 1 + (int64_t)rng_below(&r, 300), size));
        }
        add_op(w, &cap, op);
        since_flush++;
    }
    add_op(w, &cap, (GuestOp){ .type = G_FLUSH });
}

void workload_free(Workload *w)
{
    for (int i = 0; i < w->nops; i++) {
        free(w->ops[i].data);
    }
    free(w->ops);
    memset(w, 0, sizeof(*w));
}

static size_t log_pos(CrashRec *rec)
{
    pthread_mutex_lock(&rec->lock);
    size_t n = rec->nlog;
    pthread_mutex_unlock(&rec->lock);
    return n;
}

int workload_run(Workload *w, LamChild *c, CrashRec *rec)
{
    int failed = 0;
    for (int i = 0; i < w->nops; i++) {
        GuestOp *op = &w->ops[i];
        atomic_store(&rec->cur_guest_op, i);
        op->log_start = log_pos(rec);
        switch (op->type) {
        case G_WRITE:
            op->ret = lam_co_pwrite(c, op->off, op->len, op->data, op->flags);
            break;
        case G_ZERO:
            op->ret = lam_co_pwrite_zeroes(c, op->off, op->len, op->flags);
            break;
        case G_DISCARD:
            op->ret = lam_co_pdiscard(c, op->off, op->len);
            break;
        case G_FLUSH:
            op->ret = lam_co_flush(c);
            break;
        }
        op->log_end = log_pos(rec);
        if (op->ret < 0) {
            failed++;
        }
    }
    atomic_store(&rec->cur_guest_op, w->nops);
    return failed;
}

/* ---- model ---- */

void model_init(Model *m, int64_t size, const uint8_t *backing)
{
    m->size = size;
    m->backing = backing;
    m->val = malloc((size_t)size);
    m->alt = calloc(1, (size_t)size);
    if (!m->val || !m->alt) {
        abort();
    }
    memcpy(m->val, backing, (size_t)size);
    m->applied = 0;
}

void model_free(Model *m)
{
    free(m->val);
    free(m->alt);
}

void model_advance(Model *m, const Workload *w, int upto)
{
    for (int i = m->applied; i < upto; i++) {
        const GuestOp *op = &w->ops[i];
        /* A failed op leaves its range undefined: anything it could
         * have written or the old content is acceptable. */
        if (op->ret < 0 && op->type != G_FLUSH) {
            for (int64_t b = op->off; b < op->off + op->len; b++) {
                m->alt[b] |= ALT_ZERO | ALT_BACKING;
            }
            continue;
        }
        switch (op->type) {
        case G_WRITE:
            memcpy(m->val + op->off, op->data, (size_t)op->len);
            memset(m->alt + op->off, 0, (size_t)op->len);
            break;
        case G_ZERO:
            memset(m->val + op->off, 0, (size_t)op->len);
            memset(m->alt + op->off, 0, (size_t)op->len);
            break;
        case G_DISCARD:
            /* Discard is advisory: old data, zeroes, or (an overlay
             * dropping its cluster) the backing file's data. */
            for (int64_t b = op->off; b < op->off + op->len; b++) {
                m->alt[b] |= ALT_ZERO | ALT_BACKING;
            }
            break;
        case G_FLUSH:
            break;
        }
    }
    if (upto > m->applied) {
        m->applied = upto;
    }
}

static bool fits_durable(const Model *m, int64_t b, uint8_t v)
{
    if (v == m->val[b]) {
        return true;
    }
    if ((m->alt[b] & ALT_ZERO) && v == 0) {
        return true;
    }
    return (m->alt[b] & ALT_BACKING) && v == m->backing[b];
}

static bool fits_pending(const Model *m, const Workload *w, int from, int to,
                         int64_t b, uint8_t v)
{
    for (int i = from; i < to; i++) {
        const GuestOp *op = &w->ops[i];
        if (op->type == G_FLUSH || b < op->off || b >= op->off + op->len) {
            continue;
        }
        switch (op->type) {
        case G_WRITE:
            if (op->data[b - op->off] == v) {
                return true;
            }
            if (op->ret < 0 && (v == 0 || v == m->backing[b])) {
                return true;
            }
            break;
        case G_ZERO:
            if (v == 0) {
                return true;
            }
            break;
        case G_DISCARD:
            if (v == 0 || v == m->backing[b]) {
                return true;
            }
            break;
        case G_FLUSH:
            break;
        }
    }
    return false;
}

int64_t model_verify(const Model *m, const Workload *w, int from, int to,
                     const uint8_t *got, int64_t *first_bad)
{
    int64_t bad = 0;
    *first_bad = -1;
    const int64_t chunk = 4096;
    for (int64_t c0 = 0; c0 < m->size; c0 += chunk) {
        int64_t n = m->size - c0 < chunk ? m->size - c0 : chunk;
        if (!memcmp(got + c0, m->val + c0, (size_t)n)) {
            continue;
        }
        for (int64_t b = c0; b < c0 + n; b++) {
            if (fits_durable(m, b, got[b]) ||
                fits_pending(m, w, from, to, b, got[b])) {
                continue;
            }
            if (*first_bad < 0) {
                *first_bad = b;
            }
            bad++;
        }
    }
    return bad;
}
