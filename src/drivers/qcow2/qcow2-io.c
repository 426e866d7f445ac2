/* Data path: reads, writes (with allocation and copy-on-write), zero
 * writes, discard, block status, metadata preallocation.
 *
 * The metadata lock is held for lookups and mapping changes only.  Data
 * I/O on an existing mapping runs unlocked and is counted (reads, in-place
 * overwrites: io_enter) or registered as an IO in-flight entry (copy
 * offload) so that a cluster dropped from the mapping is not released
 * while that I/O may still touch it (I5).  Changes of the mapping of a
 * guest range (allocation, zeroing, discard, compressed writes) register
 * an ALLOC entry and wait for older overlapping ones, so a guest cluster
 * is never allocated twice.  LAM_REQ_NOWAIT requests take the lock only if
 * it is free and the L2 table cached, and serve only what needs no more
 * (see qc_preadv, qc_pwritev). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

/* ---- in-flight list (s->lock held) ---- */

static void inflight_add(Qcow2State *s, Qcow2Inflight *e, int64_t off,
                         int64_t bytes, int kind)
{
    e->start = off >> s->cluster_bits;
    e->end = ((off + bytes - 1) >> s->cluster_bits) + 1;
    e->kind = kind;
    e->seq = ++s->inflight_seq;
    e->prev = NULL;
    e->next = s->inflight;
    if (s->inflight) {
        s->inflight->prev = e;
    }
    s->inflight = e;
}

static void inflight_del(Qcow2State *s, Qcow2Inflight *e)
{
    if (e->prev) {
        e->prev->next = e->next;
    } else {
        s->inflight = e->next;
    }
    if (e->next) {
        e->next->prev = e->prev;
    }
    if (s->inflight_waiters) {
        pthread_cond_broadcast(&s->inflight_cond);
    }
}

static bool overlaps(const Qcow2Inflight *x, int64_t a, int64_t b)
{
    return x->start < b && a < x->end;
}

/* Waits until no older ALLOC entry overlaps e. Returns true if it waited. */
static bool wait_alloc_conflicts(Qcow2State *s, Qcow2Inflight *e)
{
    bool waited = false;
    for (;;) {
        bool conflict = false;
        for (Qcow2Inflight *x = s->inflight; x; x = x->next) {
            if (x != e && x->kind == QC_INFLIGHT_ALLOC && x->seq < e->seq &&
                overlaps(x, e->start, e->end)) {
                conflict = true;
                break;
            }
        }
        if (!conflict) {
            return waited;
        }
        waited = true;
        s->inflight_waiters++;
        pthread_cond_wait(&s->inflight_cond, &s->lock);
        s->inflight_waiters--;
    }
}

/* ---- counted data I/O (I5) ----
 * The hot paths (reads, in-place overwrites) don't put entries on the
 * in-flight list: io_enter, under the lock right after the lookup, counts
 * the I/O in the current phase; io_leave is one atomic.  A grace period
 * flips the phase under the lock and waits for the old phase to drain:
 * an I/O that looked up a mapping before the mapping changed entered
 * before the flip, in the old phase.  Grace periods run one at a time;
 * two overlapping ones would flip back into a phase the first still
 * waits for. */

static unsigned io_enter(Qcow2State *s)
{
    unsigned p = atomic_load(&s->io_phase) & 1;
    atomic_fetch_add(&s->io_count[p], 1);
    return p;
}

static void io_leave(Qcow2State *s, unsigned p)
{
    if (atomic_fetch_sub(&s->io_count[p], 1) == 1 &&
        atomic_load(&s->io_waiters) > 0) {
        /* The waiter holds the lock until it sleeps: taking it here
         * orders this wake-up after its check. */
        pthread_mutex_lock(&s->lock);
        pthread_cond_broadcast(&s->inflight_cond);
        pthread_mutex_unlock(&s->lock);
    }
}

/* Waits (lock held, released while sleeping) until no data I/O that
 * started before the call can still use a mapping of guest clusters
 * [a, b): list entries (copy offload) older than seq and overlapping, and
 * every counted I/O. */
void qc_wait_grace(Qcow2State *s, int64_t a, int64_t b, uint64_t seq)
{
    for (;;) {
        bool busy = s->grace_busy;
        for (Qcow2Inflight *x = s->inflight; x && !busy; x = x->next) {
            if (x->kind == QC_INFLIGHT_IO && x->seq < seq && overlaps(x, a, b)) {
                busy = true;
            }
        }
        if (!busy) {
            break;
        }
        s->inflight_waiters++;
        pthread_cond_wait(&s->inflight_cond, &s->lock);
        s->inflight_waiters--;
    }
    s->grace_busy = true;
    unsigned old = atomic_load(&s->io_phase) & 1;
    atomic_store(&s->io_phase, old ^ 1);
    atomic_fetch_add(&s->io_waiters, 1);
    while (atomic_load(&s->io_count[old]) != 0) {
        pthread_cond_wait(&s->inflight_cond, &s->lock);
    }
    atomic_fetch_sub(&s->io_waiters, 1);
    s->grace_busy = false;
    pthread_cond_broadcast(&s->inflight_cond);
}

/* The part [pos, pos+len) of qiov: qiov itself when that is all of it
 * (the common case: no allocation on the fast path). */
static LamIOV *sub_iov(LamIOV *sub, LamIOV *qiov, size_t pos, int64_t len)
{
    if (pos == 0 && (size_t)len == qiov->size) {
        return qiov;
    }
    lam_iov_init(sub, qiov->niov + 1);
    lam_iov_concat(sub, qiov, pos, (size_t)len);
    return sub;
}

/* ---- reading ---- */

static int read_backing(Qcow2State *s, int64_t off, int64_t len, LamIOV *qiov,
                        size_t pos)
{
    LamChild *b = lam_node_backing(s->bs);
    int64_t n = 0;
    if (b) {
        int64_t blen = lam_node_length(b->node);
        if (blen < 0) {
            return (int)blen;
        }
        n = off >= blen ? 0 : (blen - off < len ? blen - off : len);
        if (n > 0) {
            LamIOV sub;
            lam_iov_init(&sub, 4);
            lam_iov_concat(&sub, qiov, pos, (size_t)n);
            int ret = lam_co_preadv(b, off, n, &sub, 0);
            lam_iov_destroy(&sub);
            if (ret < 0) {
                return ret;
            }
        }
    }
    if (n < len) {
        lam_iov_memset(qiov, pos + (size_t)n, 0, (size_t)(len - n));
    }
    return 0;
}

static int read_compressed(Qcow2State *s, uint64_t entry, uint8_t *out)
{
    int64_t coff, csize;
    qc_compressed_params(s, entry, &coff, &csize);
    uint8_t *in = malloc(csize);
    if (!in) {
        return -ENOMEM;
    }
    int ret = lam_co_pread(s->file, coff, csize, in, 0);
    if (ret == 0) {
        ret = qc_decompress(s->compression_type, out, s->cluster_size, in, csize);
    }
    free(in);
    return ret;
}

/* Old content of one whole guest cluster, for copy-on-write. */
static int read_old_cluster(Qcow2State *s, Qcow2ClusterType type, uint64_t entry,
                            int64_t guest, uint8_t *buf)
{
    LamIOV v;
    int ret;
    switch (type) {
    case QC_UNALLOC:
        lam_iov_init_buf(&v, buf, s->cluster_size);
        return read_backing(s, guest, s->cluster_size, &v, 0);
    case QC_NORMAL:
        return lam_co_pread(s->file, (int64_t)(entry & QCOW2_L2_OFFSET_MASK),
                            s->cluster_size, buf, 0);
    case QC_COMPRESSED:
        ret = read_compressed(s, entry, buf);
        return ret;
    default:
        memset(buf, 0, s->cluster_size);
        return 0;
    }
}

/* A read that fell through to the backing file may have raced with a
 * writer that put the old backing data into this image and then changed
 * the backing file (classic fleecing, driver.h "Backing fall-through
 * reads"): what became allocated since the lookup is read again. */
static int revalidate_backing_read(LamNode *bs, int64_t off, int64_t run, LamIOV *qiov,
                                   size_t pos, uint64_t gen)
{
    Qcow2State *s = bs->opaque;
    if (s->no_recheck || atomic_load(&s->map_gen) == gen) {
        return 0;
    }
    int64_t end = off + run;
    while (off < end) {
        int64_t r;
        uint64_t entry;
        pthread_mutex_lock(&s->lock);
        int type = qc_lookup(s, off, end - off, &r, &entry);
        pthread_mutex_unlock(&s->lock);
        if (type < 0) {
            return type;
        }
        if (type != QC_UNALLOC) {
            /* Allocated since: its content is the old data, read it. */
            LamIOV sub, *v = sub_iov(&sub, qiov, pos, r);
            int ret = qc_preadv(bs, off, r, v, 0);
            if (v == &sub) {
                lam_iov_destroy(&sub);
            }
            if (ret < 0) {
                return ret;
            }
        }
        off += r;
        pos += (size_t)r;
    }
    return 0;
}

/* Whether a lookup of guest offset off can be answered without reading
 * an L2 table from the file.  Lock held. */
static bool l2_cached(Qcow2State *s, int64_t off)
{
    int64_t l1_idx = off >> (s->cluster_bits + s->l2_bits);
    if (l1_idx >= s->l1_size) {
        return true;
    }
    uint64_t l2_off = s->l1[l1_idx] & QCOW2_L1_OFFSET_MASK;
    return !l2_off || qc_cache_has(s->l2_cache, l2_off);
}

/* The metadata lock for a lookup at off.  NOWAIT (nowait true): only if
 * it is free and the lookup needs no I/O, else -EAGAIN with the lock not
 * held. */
static int lock_for_lookup(Qcow2State *s, int64_t off, bool nowait)
{
    if (!nowait) {
        pthread_mutex_lock(&s->lock);
        return 0;
    }
    if (pthread_mutex_trylock(&s->lock) != 0) {
        return -EAGAIN;
    }
    if (!l2_cached(s, off)) {
        pthread_mutex_unlock(&s->lock);
        return -EAGAIN;
    }
    return 0;
}

int qc_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    Qcow2State *s = bs->opaque;
    size_t pos = 0;
    uint8_t *cbuf = NULL;
    int ret = 0;
    int nowait = flags & LAM_REQ_NOWAIT;
    while (bytes > 0) {
        int64_t run;
        uint64_t entry;
        ret = lock_for_lookup(s, off, nowait);
        if (ret < 0) {
            break;
        }
        uint64_t gen = atomic_load(&s->map_gen);
        int type = qc_lookup(s, off, bytes, &run, &entry);
        if (type >= 0 && nowait && type != QC_NORMAL && type != QC_ZERO_PLAIN &&
            type != QC_ZERO_ALLOC && (type != QC_UNALLOC || lam_node_backing(bs))) {
            type = -EAGAIN; /* backing file, decompression: may wait */
        }
        if (type < 0) {
            pthread_mutex_unlock(&s->lock);
            ret = type;
            break;
        }
        bool reg = type == QC_NORMAL || type == QC_COMPRESSED;
        unsigned phase = reg ? io_enter(s) : 0;
        pthread_mutex_unlock(&s->lock);
        switch (type) {
        case QC_UNALLOC:
            ret = read_backing(s, off, run, qiov, pos);
            if (ret == 0 && lam_node_backing(bs)) {
                ret = revalidate_backing_read(bs, off, run, qiov, pos, gen);
            }
            break;
        case QC_ZERO_PLAIN:
        case QC_ZERO_ALLOC:
            lam_iov_memset(qiov, pos, 0, (size_t)run);
            break;
        case QC_NORMAL: {
            LamIOV sub, *v = sub_iov(&sub, qiov, pos, run);
            ret = lam_co_preadv(s->file,
                                (int64_t)(entry & QCOW2_L2_OFFSET_MASK) + (off & (s->cluster_size - 1)),
                                run, v, nowait);
            if (v == &sub) {
                lam_iov_destroy(&sub);
            }
            break;
        }
        case QC_COMPRESSED:
            if (!cbuf && !(cbuf = malloc(s->cluster_size))) {
                ret = -ENOMEM;
                break;
            }
            ret = read_compressed(s, entry, cbuf);
            if (ret == 0) {
                lam_iov_from_buf(qiov, pos, cbuf + (off & (s->cluster_size - 1)), (size_t)run);
            }
            break;
        }
        if (reg) {
            io_leave(s, phase);
        }
        if (ret < 0) {
            break;
        }
        off += run;
        pos += (size_t)run;
        bytes -= run;
    }
    free(cbuf);
    return ret;
}

/* ---- mapping changes ---- */

typedef struct FreeList {
    int64_t off[64], len[64];
    int n;
} FreeList;

/* Drops references collected while relinking guest clusters [a, b): the
 * new entries reach the disk first, then old I/O drains (I5). */
static int release_old(Qcow2State *s, FreeList *fl, int64_t a, int64_t b)
{
    if (fl->n == 0) {
        return 0;
    }
    uint64_t seq = s->inflight_seq + 1;
    int ret = qc_flush_metadata(s);
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    if (ret < 0) {
        fl->n = 0;
        return ret; /* the old clusters leak: harmless */
    }
    qc_wait_grace(s, a, b, seq);
    for (int i = 0; i < fl->n; i++) {
        int r = qc_update_refcount(s, fl->off[i], fl->len[i], -1);
        if (r < 0 && ret == 0) {
            ret = r;
        }
    }
    fl->n = 0;
    return ret;
}

static void collect_old(Qcow2State *s, FreeList *fl, uint64_t old)
{
    int64_t o, l;
    qc_entry_host_range(s, old, &o, &l);
    if (l > 0) {
        fl->off[fl->n] = o;
        fl->len[fl->n] = l;
        fl->n++;
    }
}

/* Sets the L2 entries of guest clusters [off, off + n clusters) (one L2
 * table) to host + i*cs | COPIED, or to `fixed` if host < 0. */
static int link_clusters(Qcow2State *s, int64_t off, int64_t n, int64_t host,
                         uint64_t fixed)
{
    uint8_t *t;
    FreeList fl = { .n = 0 };
    int ret = qc_get_l2_for_write(s, off, &t);
    if (ret < 0) {
        return ret;
    }
    int64_t idx = (off >> s->cluster_bits) & (s->l2_entries - 1);
    for (int64_t i = 0; i < n; i++) {
        uint64_t old = qbe64(t + 8 * (idx + i));
        uint64_t ne = host >= 0 ? ((uint64_t)(host + i * s->cluster_size) | QCOW2_OFLAG_COPIED) : fixed;
        qst64(t + 8 * (idx + i), ne);
        collect_old(s, &fl, old);
        if (fl.n == 64) {
            qc_cache_mark_dirty(s->l2_cache, t);
            qc_cache_put(s->l2_cache, t);
            ret = release_old(s, &fl, off >> s->cluster_bits, (off >> s->cluster_bits) + n);
            if (ret < 0) {
                return ret;
            }
            ret = qc_get_l2_for_write(s, off, &t);
            if (ret < 0) {
                return ret;
            }
        }
    }
    qc_cache_mark_dirty(s->l2_cache, t);
    qc_cache_put(s->l2_cache, t);
    s->l2_needs_flush = true;
    return release_old(s, &fl, off >> s->cluster_bits, (off >> s->cluster_bits) + n);
}

/* New host clusters for n guest clusters from off (one L2 table), with
 * the image marked dirty and the L2 table in place so that linking can't
 * fail for lack of it.  Lock held. */
static int64_t reserve_clusters(Qcow2State *s, int64_t off, int64_t n)
{
    int ret = qc_mark_dirty(s);
    uint8_t *t;
    if (ret == 0) {
        ret = qc_get_l2_for_write(s, off, &t);
        if (ret == 0) {
            qc_cache_put(s->l2_cache, t);
        }
    }
    if (ret < 0) {
        return ret;
    }
    return qc_alloc_clusters(s, n);
}

/* After the data reached the new clusters (I2): links them, or gives them
 * back if writing failed.  Lock held. */
static int finish_alloc(Qcow2State *s, int64_t off, int64_t n, int64_t host, int ret)
{
    if (ret < 0) {
        qc_update_refcount(s, host, n * s->cluster_size, -1);
        return ret;
    }
    return link_clusters(s, off, n, host, 0);
}

/* Allocating write of guest [off, off+len) whose clusters all have type
 * `type` (first entry `entry`) within one L2 table.  Called with the lock
 * held and an ALLOC entry registered; returns with the lock held. */
static int write_alloc(Qcow2State *s, int64_t off, int64_t len, LamIOV *qiov,
                       size_t pos, int type, uint64_t entry)
{
    int64_t cs = s->cluster_size;
    int64_t c0 = off >> s->cluster_bits, c1 = (off + len - 1) >> s->cluster_bits;
    int64_t n = c1 - c0 + 1;
    int64_t head = off - c0 * cs, tail = (c1 + 1) * cs - (off + len);
    int ret = 0;
    int64_t host = reserve_clusters(s, off, n);
    if (host < 0) {
        return (int)host;
    }
    pthread_mutex_unlock(&s->lock);

    /* Copy-on-write of zeroes: zero the new clusters with one cheap
     * request (fallocate or file growth) and write only the guest data,
     * instead of a whole cluster of which most is zero buffer.  Both land
     * before the L2 entry (I2), as in the general path. */
    bool zero_cow = (type == QC_UNALLOC && !lam_node_backing(s->bs)) ||
                    type == QC_ZERO_PLAIN || type == QC_ZERO_ALLOC;
    if ((head || tail) && zero_cow &&
        lam_co_pwrite_zeroes(s->file, host, n * cs, LAM_REQ_NO_FALLBACK) == 0) {
        LamIOV sub, *v = sub_iov(&sub, qiov, pos, len);
        ret = lam_co_pwritev(s->file, host + head, len, v, 0);
        if (v == &sub) {
            lam_iov_destroy(&sub);
        }
        goto link;
    }

    uint8_t *hbuf = NULL, *tbuf = NULL;
    uint64_t tail_entry = entry;
    if (type == QC_NORMAL) {
        tail_entry = entry + (uint64_t)((c1 - c0) * cs);
    }
    if (head) {
        hbuf = malloc(cs);
        ret = hbuf ? read_old_cluster(s, type, entry, c0 * cs, hbuf) : -ENOMEM;
    }
    if (ret == 0 && tail) {
        if (c1 == c0 && hbuf) {
            tbuf = hbuf;
        } else {
            tbuf = malloc(cs);
            ret = tbuf ? read_old_cluster(s, type, tail_entry, c1 * cs, tbuf) : -ENOMEM;
        }
    }
    if (ret == 0) {
        LamIOV v;
        lam_iov_init(&v, qiov->niov + 2);
        if (head) {
            lam_iov_add(&v, hbuf, (size_t)head);
        }
        lam_iov_concat(&v, qiov, pos, (size_t)len);
        if (tail) {
            lam_iov_add(&v, tbuf + cs - tail, (size_t)tail);
        }
        ret = lam_co_pwritev(s->file, host, n * cs, &v, 0);
        lam_iov_destroy(&v);
    }
    if (tbuf != hbuf) {
        free(tbuf);
    }
    free(hbuf);

link:
    pthread_mutex_lock(&s->lock);
    return finish_alloc(s, off, n, host, ret);
}

static int write_compressed(Qcow2State *s, int64_t off, int64_t bytes, LamIOV *qiov)
{
    int64_t cs = s->cluster_size;
    int64_t size = atomic_load(&s->size);
    if ((off & (cs - 1)) || bytes > cs || (bytes < cs && off + bytes != size)) {
        return -EINVAL;
    }
    uint8_t *in = calloc(1, cs), *out = malloc(cs);
    int ret = 0;
    if (!in || !out) {
        ret = -ENOMEM;
        goto out;
    }
    lam_iov_to_buf(qiov, 0, in, (size_t)bytes);
    int64_t clen = qc_compress(s->compression_type, out, cs - 1, in, cs);
    if (clen < 0) {
        ret = 1; /* does not shrink: caller writes it normally */
        goto out;
    }
    Qcow2Inflight a;
    pthread_mutex_lock(&s->lock);
    inflight_add(s, &a, off, cs, QC_INFLIGHT_ALLOC);
    wait_alloc_conflicts(s, &a);
    uint8_t *t;
    ret = qc_mark_dirty(s);
    if (ret == 0) {
        ret = qc_get_l2_for_write(s, off, &t);
        if (ret == 0) {
            qc_cache_put(s->l2_cache, t);
        }
    }
    int64_t coff = ret == 0 ? qc_alloc_bytes(s, clen) : ret;
    if (coff < 0) {
        ret = (int)coff;
        inflight_del(s, &a);
        pthread_mutex_unlock(&s->lock);
        goto out;
    }
    pthread_mutex_unlock(&s->lock);
    ret = lam_co_pwrite(s->file, coff, clen, out, 0);
    pthread_mutex_lock(&s->lock);
    if (ret < 0) {
        qc_update_refcount(s, coff, clen, -1);
    } else {
        int x = 62 - (s->cluster_bits - 8);
        uint64_t nsec = (uint64_t)(((coff + clen - 1) >> 9) - (coff >> 9));
        uint64_t e = QCOW2_OFLAG_COMPRESSED | (nsec << x) | (uint64_t)coff;
        ret = link_clusters(s, off, 1, -1, e);
    }
    inflight_del(s, &a);
    pthread_mutex_unlock(&s->lock);
out:
    free(in);
    free(out);
    return ret;
}

/* A data write must never land on the header, the active L1 table or
 * the refcount table (QEMU's constant overlap checks). */
static const char *overlaps_metadata(Qcow2State *s, int64_t host, int64_t len)
{
    int64_t l1 = (int64_t)s->l1_offset, l1_end = l1 + (int64_t)s->l1_size * 8;
    int64_t rt = (int64_t)s->rt_offset, rt_end = rt + (int64_t)s->rt_clusters * s->cluster_size;
    if (host < s->cluster_size) {
        return "qcow2_header";
    }
    if (host < l1_end && l1 < host + len) {
        return "active L1 table";
    }
    if (host < rt_end && rt < host + len) {
        return "refcount table";
    }
    return NULL;
}

int qc_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    Qcow2State *s = bs->opaque;
    if (atomic_load(&s->corrupt) || s->read_only) {
        return s->read_only ? -EACCES : -EIO;
    }
    if (flags & LAM_REQ_WRITE_COMPRESSED) {
        /* Cluster by cluster; a cluster that does not shrink is written
         * normally. */
        int64_t cs = s->cluster_size;
        if ((off & (cs - 1)) || ((bytes & (cs - 1)) && off + bytes != atomic_load(&s->size))) {
            return -EINVAL;
        }
        for (int64_t done = 0; done < bytes;) {
            int64_t n = bytes - done < cs ? bytes - done : cs;
            LamIOV sub;
            lam_iov_init(&sub, 4);
            lam_iov_concat(&sub, qiov, (size_t)done, (size_t)n);
            int ret = write_compressed(s, off + done, n, &sub);
            if (ret == 1) {
                ret = qc_pwritev(bs, off + done, n, &sub, flags & ~LAM_REQ_WRITE_COMPRESSED);
            }
            lam_iov_destroy(&sub);
            if (ret < 0) {
                return ret;
            }
            done += n;
        }
        return 0;
    }
    size_t pos = 0;
    int ret = 0;
    int nowait = flags & LAM_REQ_NOWAIT;
    while (bytes > 0 && ret == 0) {
        int64_t run;
        uint64_t entry;
        Qcow2Inflight e;
        ret = lock_for_lookup(s, off, nowait);
        if (ret < 0) {
            return ret;
        }
        int type = qc_lookup(s, off, bytes, &run, &entry);
        if (nowait && type >= 0 &&
            !(type == QC_NORMAL && (entry & QCOW2_OFLAG_COPIED) && run == bytes)) {
            /* Only an overwrite in place, in one piece: allocation waits
             * for metadata I/O, and a retry must find nothing changed. */
            pthread_mutex_unlock(&s->lock);
            return -EAGAIN;
        }
        const char *meta = NULL;
        if (type == QC_NORMAL && (entry & QCOW2_OFLAG_COPIED)) {
            meta = overlaps_metadata(s, (int64_t)(entry & QCOW2_L2_OFFSET_MASK),
                                     qc_align_up((off & (s->cluster_size - 1)) + run, s->cluster_size));
            if (meta) {
                qc_signal_corruption(s, (int64_t)(entry & QCOW2_L2_OFFSET_MASK), s->cluster_size,
                                     "Preventing invalid write on metadata (overlaps with %s)",
                                     meta);
                type = -EIO;
            }
        }
        if (type == QC_NORMAL && (entry & QCOW2_OFLAG_COPIED)) {
            unsigned phase = io_enter(s);
            pthread_mutex_unlock(&s->lock);
            LamIOV sub, *v = sub_iov(&sub, qiov, pos, run);
            ret = lam_co_pwritev(s->file,
                                 (int64_t)(entry & QCOW2_L2_OFFSET_MASK) + (off & (s->cluster_size - 1)),
                                 run, v, nowait);
            if (v == &sub) {
                lam_iov_destroy(&sub);
            }
            io_leave(s, phase);
            off += run;
            pos += (size_t)run;
            bytes -= run;
            continue;
        } else if (type >= 0) {
            inflight_add(s, &e, off, run, QC_INFLIGHT_ALLOC);
            if (wait_alloc_conflicts(s, &e)) {
                /* Someone changed this range meanwhile: look again. */
                inflight_del(s, &e);
                pthread_mutex_unlock(&s->lock);
                continue;
            }
            if (atomic_load(&s->corrupt)) {
                ret = -EIO;
            } else {
                ret = write_alloc(s, off, run, qiov, pos, type, entry);
            }
            inflight_del(s, &e);
        } else {
            ret = type;
        }
        pthread_mutex_unlock(&s->lock);
        off += run;
        pos += (size_t)run;
        bytes -= run;
    }
    return ret;
}

/* ---- copy offload (see driver.h) ---- */

/* Source side: only clusters of this layer with data in the file. */
int qc_copy_range_from(LamNode *bs, LamChild *src, int64_t off, LamChild *dst,
                       int64_t dst_off, int64_t bytes, int flags)
{
    Qcow2State *s = bs->opaque;
    int ret = 0;
    (void)src;
    while (bytes > 0 && ret == 0) {
        int64_t run;
        uint64_t entry;
        Qcow2Inflight io;
        pthread_mutex_lock(&s->lock);
        int type = qc_lookup(s, off, bytes, &run, &entry);
        if (type != QC_NORMAL) {
            pthread_mutex_unlock(&s->lock);
            return type < 0 ? type : -ENOTSUP;
        }
        inflight_add(s, &io, off, run, QC_INFLIGHT_IO);
        pthread_mutex_unlock(&s->lock);
        int64_t host = (int64_t)(entry & QCOW2_L2_OFFSET_MASK) + (off & (s->cluster_size - 1));
        ret = lam_co_copy_range(s->file, host, dst, dst_off, run, flags);
        pthread_mutex_lock(&s->lock);
        inflight_del(s, &io);
        pthread_mutex_unlock(&s->lock);
        off += run;
        dst_off += run;
        bytes -= run;
    }
    return ret;
}

/* Allocating copy of whole clusters: as write_alloc without copy-on-write
 * (nothing of the old clusters survives).  Lock held, ALLOC registered. */
static int copy_alloc(Qcow2State *s, LamChild *src, int64_t src_off, int64_t off,
                      int64_t len, int flags)
{
    int64_t n = len >> s->cluster_bits;
    int64_t host = reserve_clusters(s, off, n);
    if (host < 0) {
        return (int)host;
    }
    pthread_mutex_unlock(&s->lock);
    int ret = lam_co_copy_range_to(src, src_off, s->file, host, len, flags);
    pthread_mutex_lock(&s->lock);
    return finish_alloc(s, off, n, host, ret);
}

/* Destination side: whole clusters only, into clusters this image owns
 * alone (NORMAL with COPIED) or into newly allocated ones. */
int qc_copy_range_to(LamNode *bs, LamChild *src, int64_t src_off, LamChild *dst,
                     int64_t off, int64_t bytes, int flags)
{
    Qcow2State *s = bs->opaque;
    (void)dst;
    if (atomic_load(&s->corrupt) || s->read_only) {
        return s->read_only ? -EACCES : -EIO;
    }
    if ((off | bytes) & (s->cluster_size - 1)) {
        return -ENOTSUP;
    }
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        int64_t run;
        uint64_t entry;
        Qcow2Inflight e;
        pthread_mutex_lock(&s->lock);
        int type = qc_lookup(s, off, bytes, &run, &entry);
        int64_t host = (int64_t)(entry & QCOW2_L2_OFFSET_MASK);
        if (type == QC_NORMAL && (entry & QCOW2_OFLAG_COPIED)) {
            const char *meta = overlaps_metadata(s, host, run);
            if (meta) {
                qc_signal_corruption(s, host, s->cluster_size,
                                     "Preventing invalid write on metadata (overlaps with %s)",
                                     meta);
                type = -EIO;
            }
        }
        if (type == QC_NORMAL && (entry & QCOW2_OFLAG_COPIED)) {
            inflight_add(s, &e, off, run, QC_INFLIGHT_IO);
            pthread_mutex_unlock(&s->lock);
            ret = lam_co_copy_range_to(src, src_off, s->file, host, run, flags);
            pthread_mutex_lock(&s->lock);
            inflight_del(s, &e);
        } else if (type >= 0) {
            inflight_add(s, &e, off, run, QC_INFLIGHT_ALLOC);
            if (wait_alloc_conflicts(s, &e)) {
                /* Someone changed this range meanwhile: look again. */
                inflight_del(s, &e);
                pthread_mutex_unlock(&s->lock);
                continue;
            }
            ret = atomic_load(&s->corrupt) ? -EIO
                                           : copy_alloc(s, src, src_off, off, run, flags);
            inflight_del(s, &e);
        } else {
            ret = type;
        }
        pthread_mutex_unlock(&s->lock);
        off += run;
        src_off += run;
        bytes -= run;
    }
    return ret;
}

/* ---- zeroing and discard ---- */

enum { ZAP_ZERO, ZAP_ZERO_UNMAP, ZAP_DISCARD, ZAP_DEALLOC };

/* Changes the entries of whole clusters in [off, off+bytes). */
static int zap_clusters(Qcow2State *s, int64_t off, int64_t bytes, int mode)
{
    bool backing = lam_node_backing(s->bs) != NULL;
    int ret = 0;
    while (bytes > 0 && ret == 0) {
        int64_t run;
        uint64_t entry;
        Qcow2Inflight e;
        pthread_mutex_lock(&s->lock);
        int type = qc_lookup(s, off, bytes, &run, &entry);
        if (type < 0) {
            pthread_mutex_unlock(&s->lock);
            return type;
        }
        /* Nothing to do where the result already reads right. */
        bool skip = (type == QC_UNALLOC && (!backing || mode == ZAP_DEALLOC)) ||
                    (type == QC_ZERO_PLAIN && mode != ZAP_DISCARD && mode != ZAP_DEALLOC) ||
                    (type == QC_ZERO_ALLOC && mode == ZAP_ZERO);
        if (!skip) {
            inflight_add(s, &e, off, run, QC_INFLIGHT_ALLOC);
            if (wait_alloc_conflicts(s, &e)) {
                inflight_del(s, &e);
                pthread_mutex_unlock(&s->lock);
                continue;
            }
            ret = qc_mark_dirty(s);
            uint8_t *t = NULL;
            if (ret == 0) {
                ret = qc_get_l2_for_write(s, off, &t);
            }
            FreeList fl = { .n = 0 };
            int64_t c0 = off >> s->cluster_bits;
            int64_t n = run >> s->cluster_bits;
            for (int64_t i = 0; ret == 0 && i < n; i++) {
                int64_t idx = (c0 + i) & (s->l2_entries - 1);
                uint64_t old = qbe64(t + 8 * idx), ne;
                Qcow2ClusterType ot = qc_entry_type(s, old);
                if (mode == ZAP_DEALLOC) {
                    ne = 0;
                } else if (mode == ZAP_DISCARD) {
                    ne = backing && s->version >= 3 ? QCOW2_OFLAG_ZERO : 0;
                } else if (s->version < 3) {
                    ne = 0; /* v2 without backing: unallocated reads zero */
                } else if (mode == ZAP_ZERO && ot == QC_NORMAL && (old & QCOW2_OFLAG_COPIED)) {
                    ne = old | QCOW2_OFLAG_ZERO; /* keep the preallocation */
                } else if (mode == ZAP_ZERO && ot == QC_ZERO_ALLOC) {
                    ne = old;
                } else {
                    ne = QCOW2_OFLAG_ZERO;
                }
                if (ne == old) {
                    continue;
                }
                qst64(t + 8 * idx, ne);
                if (!((ne & QCOW2_L2_OFFSET_MASK) && (ne & QCOW2_L2_OFFSET_MASK) == (old & QCOW2_L2_OFFSET_MASK))) {
                    collect_old(s, &fl, old);
                }
                if (fl.n == 64) {
                    /* No cache entry stays pinned while release_old waits. */
                    qc_cache_mark_dirty(s->l2_cache, t);
                    qc_cache_put(s->l2_cache, t);
                    t = NULL;
                    ret = release_old(s, &fl, c0, c0 + n);
                    if (ret == 0) {
                        ret = qc_get_l2_for_write(s, off, &t);
                    }
                }
            }
            if (t) {
                qc_cache_mark_dirty(s->l2_cache, t);
                qc_cache_put(s->l2_cache, t);
            }
            if (ret == 0) {
                ret = release_old(s, &fl, c0, c0 + n);
            }
            inflight_del(s, &e);
        }
        pthread_mutex_unlock(&s->lock);
        off += run;
        bytes -= run;
    }
    return ret;
}

/* Whole-cluster part of [off, off+bytes); the image's last partial
 * cluster counts as whole when the range reaches the end. */
static void whole_clusters(Qcow2State *s, int64_t off, int64_t bytes, int64_t *a,
                           int64_t *b)
{
    int64_t cs = s->cluster_size;
    int64_t end = off + bytes;
    *a = qc_align_up(off, cs);
    *b = end >= atomic_load(&s->size) ? qc_align_up(end, cs) : end / cs * cs;
    if (*b < *a) {
        *b = *a;
    }
}

static int zero_as_data(Qcow2State *s, int64_t off, int64_t bytes)
{
    LamChild *b = lam_node_backing(s->bs);
    int64_t blen = b ? lam_node_length(b->node) : 0;
    while (bytes > 0) {
        /* Skip what already reads as zeroes: nothing to allocate there. */
        int64_t run;
        uint64_t entry;
        pthread_mutex_lock(&s->lock);
        int type = qc_lookup(s, off, bytes, &run, &entry);
        pthread_mutex_unlock(&s->lock);
        if (type < 0) {
            return type;
        }
        if (type == QC_ZERO_PLAIN || type == QC_ZERO_ALLOC ||
            (type == QC_UNALLOC && (!b || off >= blen))) {
            off += run;
            bytes -= run;
            continue;
        }
        int64_t n = bytes < run ? bytes : run;
        n = n < 1024 * 1024 ? n : 1024 * 1024;
        void *z = calloc(1, n);
        if (!z) {
            return -ENOMEM;
        }
        LamIOV v;
        lam_iov_init_buf(&v, z, (size_t)n);
        int ret = qc_pwritev(s->bs, off, n, &v, 0);
        free(z);
        if (ret < 0) {
            return ret;
        }
        off += n;
        bytes -= n;
    }
    return 0;
}

int qc_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    Qcow2State *s = bs->opaque;
    if (atomic_load(&s->corrupt) || s->read_only) {
        return s->read_only ? -EACCES : -EIO;
    }
    int64_t a, b;
    whole_clusters(s, off, bytes, &a, &b);
    int64_t size = atomic_load(&s->size);
    if (b > qc_align_up(size, s->cluster_size)) {
        b = qc_align_up(size, s->cluster_size);
    }
    bool backing = lam_node_backing(bs) != NULL;
    if (a >= b) {
        a = b = off;
    }
    if (s->version < 3 && backing && b > a) {
        /* No zero flag in v2: zeroes over a backing file are data. */
        if (flags & LAM_REQ_NO_FALLBACK) {
            return -ENOTSUP;
        }
        a = b = off;
    }
    if ((a > off || b < off + bytes) && (flags & LAM_REQ_NO_FALLBACK)) {
        /* Partial clusters would be data writes. */
        int64_t end = off + bytes < size ? off + bytes : size;
        if (a > off || b < end) {
            return -ENOTSUP;
        }
    }
    int ret = 0;
    if (a > off) {
        ret = zero_as_data(s, off, (a < off + bytes ? a : off + bytes) - off);
    }
    if (ret == 0 && b > a) {
        ret = zap_clusters(s, a, b - a, (flags & LAM_REQ_MAY_UNMAP) ? ZAP_ZERO_UNMAP : ZAP_ZERO);
    }
    if (ret == 0 && b < off + bytes && b >= a && b >= off) {
        ret = zero_as_data(s, b, off + bytes - b);
    }
    return ret;
}

int qc_deallocate(Qcow2State *s, int64_t off, int64_t bytes)
{
    return zap_clusters(s, off, bytes, ZAP_DEALLOC);
}

int qc_pdiscard(LamNode *bs, int64_t off, int64_t bytes)
{
    Qcow2State *s = bs->opaque;
    if (atomic_load(&s->corrupt) || s->read_only) {
        return s->read_only ? -EACCES : -EIO;
    }
    int64_t a, b;
    whole_clusters(s, off, bytes, &a, &b);
    if (b <= a) {
        return 0;
    }
    return zap_clusters(s, a, b - a, ZAP_DISCARD);
}

int qc_block_status(LamNode *bs, int64_t off, int64_t bytes, int64_t *pnum,
                    int64_t *map, LamNode **file)
{
    Qcow2State *s = bs->opaque;
    int64_t run;
    uint64_t entry;
    pthread_mutex_lock(&s->lock);
    int type = qc_lookup(s, off, bytes, &run, &entry);
    pthread_mutex_unlock(&s->lock);
    if (type < 0) {
        return type;
    }
    *pnum = run;
    switch (type) {
    case QC_NORMAL:
        *map = (int64_t)(entry & QCOW2_L2_OFFSET_MASK) + (off & (s->cluster_size - 1));
        *file = s->file->node;
        return LAM_BS_DATA | LAM_BS_OFFSET_VALID | LAM_BS_ALLOCATED;
    case QC_ZERO_PLAIN:
    case QC_ZERO_ALLOC:
        return LAM_BS_ZERO | LAM_BS_ALLOCATED;
    case QC_COMPRESSED:
        return LAM_BS_DATA | LAM_BS_ALLOCATED;
    default:
        return 0;
    }
}

int qc_preallocate(Qcow2State *s, int64_t start, int64_t end, LamPrealloc mode,
                   LamError **errp)
{
    int64_t cs = s->cluster_size;
    int64_t phys = lam_node_length(s->file->node);
    int ret = 0;
    int64_t off = start / cs * cs;
    end = qc_align_up(end, cs);
    pthread_mutex_lock(&s->lock);
    while (off < end && ret == 0) {
        int64_t run;
        uint64_t entry;
        int type = qc_lookup(s, off, end - off, &run, &entry);
        if (type < 0) {
            ret = type;
            break;
        }
        if (type == QC_UNALLOC || type == QC_ZERO_PLAIN) {
            int64_t n = run / cs;
            uint8_t *t;
            ret = qc_get_l2_for_write(s, off, &t);
            if (ret < 0) {
                break;
            }
            qc_cache_put(s->l2_cache, t);
            int64_t host = qc_alloc_clusters(s, n);
            if (host < 0) {
                ret = (int)host;
                break;
            }
            if (host < phys) {
                /* Reused space may hold stale data. */
                int64_t zl = host + n * cs <= phys ? n * cs : phys - host;
                ret = lam_co_pwrite_zeroes(s->file, host, zl, 0);
            }
            if (ret == 0) {
                ret = link_clusters(s, off, n, host, 0);
            }
        }
        off += run;
    }
    if (ret == 0) {
        ret = qc_flush_metadata(s);
    }
    int64_t fend = s->file_end;
    pthread_mutex_unlock(&s->lock);
    if (ret == 0 && fend > lam_node_length(s->file->node)) {
        ret = lam_co_truncate(s->file, fend, false,
                              mode == LAM_PREALLOC_METADATA ? LAM_PREALLOC_OFF : mode, errp);
        if (ret < 0) {
            return ret;
        }
    }
    if (ret < 0) {
        lam_error_setg_errno(errp, ret, "Could not preallocate '%s'", s->name);
    }
    return ret;
}
