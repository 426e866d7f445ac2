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

/* Op generation for one thread works in that thread's own address space
 * (its stripes laid end to end); add_op maps it onto the disk. */
typedef struct Gen {
    Workload *w;
    int cap;
    int thread;
    int64_t vsize;   /* this thread's address space */
} Gen;

static void add_op(Gen *g, GuestOp op)
{
    Workload *w = g->w;
    int T = w->p.nthreads;
    if (op.type != G_FLUSH && T > 1) {
        /* Stay inside one stripe, then map to the disk. */
        int64_t s = op.off / w->stripe, in = op.off % w->stripe;
        if (in + op.len > w->stripe) {
            op.len = w->stripe - in;
        }
        op.off = (s * T + g->thread) * w->stripe + in;
    }
    op.thread = g->thread;
    if (w->nops == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 256;
        w->ops = realloc(w->ops, (size_t)g->cap * sizeof(*w->ops));
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

/* A recent write of this thread (in its own coordinates), for overwrites. */
static bool recent_write(Gen *g, Rng *r, int first, int64_t *off, int64_t *len)
{
    Workload *w = g->w;
    for (int i = w->nops - 1, tries = 0; i >= first && tries < 64; i--, tries++) {
        if (w->ops[i].type == G_WRITE && rng_below(r, 3) == 0) {
            int64_t o = w->ops[i].off;
            if (w->p.nthreads > 1) {
                int64_t s = o / w->stripe / w->p.nthreads;
                o = s * w->stripe + o % w->stripe;
            }
            *off = o;
            *len = w->ops[i].len;
            return true;
        }
    }
    return false;
}

static void gen_thread(Gen *g, Rng *r)
{
    const int64_t cl = g->w->p.cluster, size = g->vsize;
    const int64_t nclusters = size / cl;
    const int first = g->w->nops;
    int64_t fill_cursor = (int64_t)rng_below(r, (uint64_t)nclusters) * cl;
    int since_flush = 0, flush_every = 2 + (int)rng_below(r, 10);
    /* Percent thresholds: fresh write, overwrite, fill, zero, discard;
     * the rest are small COW writes. */
    static const unsigned mix_default[5] = { 35, 50, 60, 72, 82 };
    /* Frees and reuses clusters: many discards and unmapping zero writes
     * over data written just before. */
    static const unsigned mix_discard[5] = { 20, 45, 50, 68, 92 };
    const unsigned *cut = g->w->p.mix == 1 ? mix_discard : mix_default;

    for (int n = 0; n < g->w->p.nops; n++) {
        unsigned k = (unsigned)rng_below(r, 100);
        GuestOp op;
        if (since_flush >= flush_every) {
            since_flush = 0;
            flush_every = 2 + (int)rng_below(r, 10);
            add_op(g, (GuestOp){ .type = G_FLUSH });
            continue;
        }
        if (k < cut[0]) {
            /* Fresh write: whole clusters, sectors, or an odd range that
             * leaves part of a cluster to be copied from the backing file. */
            unsigned shape = (unsigned)rng_below(r, 10);
            int64_t off, len;
            if (shape < 5) {
                off = (int64_t)rng_below(r, (uint64_t)nclusters) * cl;
                len = cl * (1 + (int64_t)rng_below(r, 4));
                if (g->w->p.compress && rng_below(r, 2)) {
                    /* Compressed clusters: compressible data (a short
                     * random pattern, repeated, with a few random bytes). */
                    len = off + len > size ? size - off : len;
                    op = mk_write(r, off, len);
                    uint8_t pat[16];
                    rng_fill(r, pat, sizeof(pat));
                    for (int64_t b = 0; b < len; b++) {
                        op.data[b] = rng_below(r, 64) ? pat[b % 16] : (uint8_t)rng_next(r);
                    }
                    op.flags = LAM_REQ_WRITE_COMPRESSED;
                    add_op(g, op);
                    since_flush++;
                    continue;
                }
            } else if (shape < 8) {
                off = (int64_t)rng_below(r, (uint64_t)(size / 512)) * 512;
                len = 512 * (1 + (int64_t)rng_below(r, (uint64_t)(2 * cl / 512 + 1)));
            } else {
                off = (int64_t)rng_below(r, (uint64_t)size);
                len = 1 + (int64_t)rng_below(r, (uint64_t)(2 * cl));
            }
            op = mk_write(r, off, clamp_len(off, len, size));
            /* Some FUA writes: durable when they return, flush or not. */
            if (rng_below(r, 8) == 0) {
                op.flags |= LAM_REQ_FUA;
            }
        } else if (k < cut[1]) {
            /* Overwrite (part of) an earlier write: in-place updates of
             * allocated clusters, and COW when the range straddles. */
            int64_t off = 0, len = cl;
            recent_write(g, r, first, &off, &len);
            int64_t shift = (int64_t)rng_below(r, 1024) - 512;
            off = off + shift < 0 ? 0 : off + shift;
            if (off >= size) {
                off = size - 1;
            }
            op = mk_write(r, off, clamp_len(off, len, size));
        } else if (k < cut[2]) {
            /* Sequential fill: grows the image across L2 tables and
             * refcount blocks. */
            int64_t len = cl * (4 + (int64_t)rng_below(r, 13));
            if (g->w->p.fill_max > 4 * cl) {
                len = 4 * cl + (int64_t)rng_below(r, (uint64_t)(g->w->p.fill_max - 4 * cl));
            }
            if (fill_cursor >= size) {
                fill_cursor = 0;
            }
            op = mk_write(r, fill_cursor, clamp_len(fill_cursor, len, size));
            fill_cursor += op.len;
        } else if (k < cut[3]) {
            op = (GuestOp){ .type = G_ZERO };
            if (rng_below(r, 3)) {
                op.off = (int64_t)rng_below(r, (uint64_t)nclusters) * cl;
                op.len = cl * (1 + (int64_t)rng_below(r, 8));
            } else {
                op.off = (int64_t)rng_below(r, (uint64_t)size);
                op.len = 1 + (int64_t)rng_below(r, (uint64_t)(3 * cl));
            }
            op.len = clamp_len(op.off, op.len, size);
            op.flags = rng_below(r, 2) || g->w->p.mix == 1 ? LAM_REQ_MAY_UNMAP : 0;
            if (rng_below(r, 8) == 0) {
                op.flags |= LAM_REQ_FUA;
            }
        } else if (k < cut[4]) {
            op = (GuestOp){ .type = G_DISCARD };
            int64_t ro, rl;
            if (g->w->p.mix == 1 && rng_below(r, 2) && recent_write(g, r, first, &ro, &rl)) {
                op.off = ro / cl * cl;
                op.len = (rl + cl - 1) / cl * cl + cl;
            } else if (rng_below(r, 4)) {
                op.off = (int64_t)rng_below(r, (uint64_t)nclusters) * cl;
                op.len = cl * (1 + (int64_t)rng_below(r, 8));
            } else {
                op.off = (int64_t)rng_below(r, (uint64_t)size);
                op.len = 1 + (int64_t)rng_below(r, (uint64_t)(3 * cl));
            }
            op.len = clamp_len(op.off, op.len, size);
        } else {
            /* Small write inside a cluster: the COW-from-backing case. */
            int64_t off = (int64_t)rng_below(r, (uint64_t)size);
            op = mk_write(r, off, clamp_len(off, 1 + (int64_t)rng_below(r, 300), size));
        }
        add_op(g, op);
        since_flush++;
    }
    add_op(g, (GuestOp){ .type = G_FLUSH });
}

void workload_generate(Workload *w, const WorkloadParams *p)
{
    Rng r;
    memset(w, 0, sizeof(*w));
    w->p = *p;
    if (w->p.nthreads < 1) {
        w->p.nthreads = 1;
    }
    if (w->p.nthreads > CRASH_MAX_THREADS) {
        w->p.nthreads = CRASH_MAX_THREADS;
    }
    const int T = w->p.nthreads;
    /* Stripes of 16 clusters (at least 64 KiB). */
    w->stripe = p->cluster * 16 > 65536 ? p->cluster * 16 : 65536;
    int64_t per_thread = T > 1 ? p->size / w->stripe / T * w->stripe : p->size;
    Gen g = { .w = w, .vsize = per_thread };
    for (int t = 0; t < T; t++) {
        rng_seed(&r, p->seed * 1000003 + (uint64_t)t);
        g.thread = t;
        w->tstart[t] = w->nops;
        gen_thread(&g, &r);
    }
    w->tstart[T] = w->nops;
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

typedef struct Runner {
    Workload *w;
    LamChild *c;
    CrashRec *rec;
    int thread;
    int failed;
} Runner;

static void *run_thread(void *opaque)
{
    Runner *rn = opaque;
    Workload *w = rn->w;
    for (int i = w->tstart[rn->thread]; i < w->tstart[rn->thread + 1]; i++) {
        GuestOp *op = &w->ops[i];
        atomic_store(&rn->rec->cur_guest_op, i);
        op->log_start = log_pos(rn->rec);
        switch (op->type) {
        case G_WRITE:
            op->ret = lam_co_pwrite(rn->c, op->off, op->len, op->data, op->flags);
            break;
        case G_ZERO:
            op->ret = lam_co_pwrite_zeroes(rn->c, op->off, op->len, op->flags);
            break;
        case G_DISCARD:
            op->ret = lam_co_pdiscard(rn->c, op->off, op->len);
            break;
        case G_FLUSH:
            op->ret = lam_co_flush(rn->c);
            break;
        }
        op->log_end = log_pos(rn->rec);
        if (op->ret < 0) {
            rn->failed++;
        }
    }
    return NULL;
}

int workload_run(Workload *w, LamChild *c, CrashRec *rec)
{
    const int T = w->p.nthreads;
    Runner rn[CRASH_MAX_THREADS];
    pthread_t tid[CRASH_MAX_THREADS];
    int failed = 0;
    for (int t = 0; t < T; t++) {
        rn[t] = (Runner){ .w = w, .c = c, .rec = rec, .thread = t };
    }
    if (T == 1) {
        run_thread(&rn[0]);
    } else {
        for (int t = 0; t < T; t++) {
            if (pthread_create(&tid[t], NULL, run_thread, &rn[t]) != 0) {
                abort();
            }
        }
        for (int t = 0; t < T; t++) {
            pthread_join(tid[t], NULL);
        }
    }
    for (int t = 0; t < T; t++) {
        failed += rn[t].failed;
    }
    atomic_store(&rec->cur_guest_op, w->nops);
    return failed;
}

/* ---- model ---- */

void model_init(Model *m, const Workload *w, int64_t size,
                const uint8_t *backing)
{
    m->size = size;
    m->backing = backing;
    m->val = malloc((size_t)size);
    m->alt = calloc(1, (size_t)size);
    if (!m->val || !m->alt) {
        abort();
    }
    memcpy(m->val, backing, (size_t)size);
    for (int t = 0; t < w->p.nthreads; t++) {
        m->applied[t] = w->tstart[t];
    }
}

void model_free(Model *m)
{
    free(m->val);
    free(m->alt);
}

void model_window(const Workload *w, size_t pos, OpWindow *win)
{
    for (int t = 0; t < w->p.nthreads; t++) {
        int d = w->tstart[t], s = w->tstart[t];
        for (int i = w->tstart[t]; i < w->tstart[t + 1]; i++) {
            const GuestOp *op = &w->ops[i];
            if (op->log_start < pos) {
                s = i + 1;
            }
            /* A guest flush whose file I/O all precedes the crash had
             * returned: the thread's earlier ops must be on disk. */
            if (op->type == G_FLUSH && op->ret == 0 && op->log_end <= pos) {
                d = i;
            }
        }
        win->durable[t] = d;
        win->started[t] = s > d ? s : d;
    }
    win->pos = pos;
}

static void apply_op(Model *m, const GuestOp *op)
{
    /* A failed op leaves its range undefined. */
    if (op->ret < 0 && op->type != G_FLUSH) {
        for (int64_t b = op->off; b < op->off + op->len; b++) {
            m->alt[b] |= ALT_ZERO | ALT_BACKING;
        }
        return;
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
        /* Discard is advisory: old data, zeroes, or (an overlay dropping
         * its cluster) the backing file's data. */
        for (int64_t b = op->off; b < op->off + op->len; b++) {
            m->alt[b] |= ALT_ZERO | ALT_BACKING;
        }
        break;
    case G_FLUSH:
        break;
    }
}

int model_advance(Model *m, const Workload *w, const OpWindow *win)
{
    for (int t = 0; t < w->p.nthreads; t++) {
        if (win->durable[t] < m->applied[t]) {
            return -1;
        }
        for (int i = m->applied[t]; i < win->durable[t]; i++) {
            apply_op(m, &w->ops[i]);
        }
        m->applied[t] = win->durable[t];
    }
    return 0;
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

static bool fits_op(const Model *m, const GuestOp *op, int64_t b, uint8_t v)
{
    if (op->type == G_FLUSH || b < op->off || b >= op->off + op->len) {
        return false;
    }
    switch (op->type) {
    case G_WRITE:
        return op->data[b - op->off] == v ||
               (op->ret < 0 && (v == 0 || v == m->backing[b]));
    case G_ZERO:
        return v == 0;
    case G_DISCARD:
        return v == 0 || v == m->backing[b];
    case G_FLUSH:
        break;
    }
    return false;
}

static bool fits_pending(const Model *m, const Workload *w, const OpWindow *win,
                         int64_t b, uint8_t v)
{
    for (int t = 0; t < w->p.nthreads; t++) {
        for (int i = win->durable[t]; i < win->started[t]; i++) {
            if (fits_op(m, &w->ops[i], b, v)) {
                return true;
            }
        }
    }
    return false;
}

/* A FUA write that returned before the crash must read back, unless an
 * op of the same thread issued after it may have changed the byte. */
static int64_t verify_fua(const Model *m, const Workload *w, const OpWindow *win,
                          const uint8_t *got, int64_t *first_bad)
{
    int64_t bad = 0;
    for (int t = 0; t < w->p.nthreads; t++) {
        for (int i = win->durable[t]; i < win->started[t]; i++) {
            const GuestOp *op = &w->ops[i];
            if (!(op->flags & LAM_REQ_FUA) || op->ret < 0 || op->log_end > win->pos ||
                (op->type != G_WRITE && op->type != G_ZERO)) {
                continue;
            }
            for (int64_t b = op->off; b < op->off + op->len; b++) {
                uint8_t want = op->type == G_WRITE ? op->data[b - op->off] : 0;
                if (got[b] == want) {
                    continue;
                }
                bool later = false;
                for (int j = i + 1; j < win->started[t] && !later; j++) {
                    later = fits_op(m, &w->ops[j], b, got[b]);
                }
                if (!later) {
                    if (*first_bad < 0 || b < *first_bad) {
                        *first_bad = b;
                    }
                    bad++;
                }
            }
        }
    }
    return bad;
}

int64_t model_verify(const Model *m, const Workload *w, const OpWindow *win,
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
            if (fits_durable(m, b, got[b]) || fits_pending(m, w, win, b, got[b])) {
                continue;
            }
            if (*first_bad < 0) {
                *first_bad = b;
            }
            bad++;
        }
    }
    return bad + verify_fua(m, w, win, got, first_bad);
}
