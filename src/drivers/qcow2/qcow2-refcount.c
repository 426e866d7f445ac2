/* Refcount table and blocks: lookup, update, cluster allocation.
 * All functions run with s->lock held.
 *
 * New refcount blocks are placed at the first cluster of the range they
 * describe (that range has no block, so every cluster in it is free) and
 * count themselves; a grown refcount table goes, with the blocks that
 * describe it, at the first range the old table did not cover.  This
 * keeps allocation free of recursion. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

#define QC_MAX_HOST_OFFSET (1ll << 56)

uint64_t qc_rb_get(const uint8_t *b, int order, int64_t idx)
{
    switch (order) {
    case 0: return (b[idx / 8] >> (idx % 8)) & 1;
    case 1: return (b[idx / 4] >> (2 * (idx % 4))) & 3;
    case 2: return (b[idx / 2] >> (4 * (idx % 2))) & 15;
    case 3: return b[idx];
    case 4: return qbe16(b + 2 * idx);
    case 5: return qbe32(b + 4 * idx);
    default: return qbe64(b + 8 * idx);
    }
}

void qc_rb_set(uint8_t *b, int order, int64_t idx, uint64_t v)
{
    int shift;
    uint8_t mask;
    switch (order) {
    case 0: shift = (int)(idx % 8); mask = 1; b += idx / 8; break;
    case 1: shift = (int)(2 * (idx % 4)); mask = 3; b += idx / 4; break;
    case 2: shift = (int)(4 * (idx % 2)); mask = 15; b += idx / 2; break;
    case 3: b[idx] = (uint8_t)v; return;
    case 4: qst16(b + 2 * idx, (uint16_t)v); return;
    case 5: qst32(b + 4 * idx, (uint32_t)v); return;
    default: qst64(b + 8 * idx, v); return;
    }
    *b = (uint8_t)((*b & ~(mask << shift)) | ((v & mask) << shift));
}

int qc_refcount_load_table(Qcow2State *s, LamError **errp)
{
    size_t bytes = (size_t)s->rt_clusters * s->cluster_size;
    uint8_t *buf = malloc(bytes ? bytes : 1);
    s->rt_entries = (int64_t)bytes / 8;
    s->rt = calloc(s->rt_entries ? s->rt_entries : 1, sizeof(uint64_t));
    if (!buf || !s->rt) {
        free(buf);
        lam_error_setg(errp, "Cannot allocate memory");
        return -ENOMEM;
    }
    int ret = bytes ? lam_co_pread(s->file, (int64_t)s->rt_offset, (int64_t)bytes, buf, 0) : 0;
    if (ret < 0) {
        free(buf);
        lam_error_setg_errno(errp, ret, "Could not read refcount table");
        return ret;
    }
    for (int64_t i = 0; i < s->rt_entries; i++) {
        s->rt[i] = qbe64(buf + 8 * i);
    }
    free(buf);
    return 0;
}

/* Returns the validated offset of refcount block `t`, 0 if none. */
static int rb_offset(Qcow2State *s, int64_t t, uint64_t *off)
{
    *off = 0;
    if (t >= s->rt_entries) {
        return 0;
    }
    uint64_t o = s->rt[t] & QCOW2_RT_OFFSET_MASK;
    if (!o) {
        return 0;
    }
    if ((o & (s->cluster_size - 1)) || (int64_t)o >= s->file_end || o >= QC_MAX_HOST_OFFSET) {
        qc_signal_corruption(s, (int64_t)o, s->cluster_size,
                             "Refblock offset %#llx (reftable index %lld) is invalid",
                             (unsigned long long)o, (long long)t);
        return -EIO;
    }
    *off = o;
    return 0;
}

int qc_get_refcount(Qcow2State *s, int64_t ci, uint64_t *rc)
{
    uint64_t off;
    int64_t t = ci >> s->rb_bits;
    int ret = rb_offset(s, t, &off);
    *rc = 0;
    if (ret < 0 || !off) {
        return ret;
    }
    uint8_t *b;
    ret = qc_cache_get(s, s->rb_cache, off, false, &b);
    if (ret < 0) {
        return ret;
    }
    *rc = qc_rb_get(b, s->refcount_order, ci & ((1ll << s->rb_bits) - 1));
    qc_cache_put(s->rb_cache, b);
    return 0;
}

static int grow_table(Qcow2State *s, int64_t t)
{
    int64_t cs = s->cluster_size;
    int64_t rb_entries = 1ll << s->rb_bits;
    int64_t r0 = s->rt_entries;
    int64_t k = 1, n, nt;
    for (;;) {
        int64_t need = t + 1 > r0 + k ? t + 1 : r0 + k;
        n = s->rt_entries + s->rt_entries / 2;
        n = n > need ? n : need;
        nt = qc_div_up(n * 8, cs);
        n = nt * cs / 8;
        int64_t k2 = qc_div_up(k + nt, rb_entries);
        if (k2 <= k) {
            break;
        }
        k = k2;
    }
    int64_t base = r0 << s->rb_bits; /* first cluster of the new area */
    if (nt * cs > QCOW2_MAX_RT_BYTES || (base + k + nt) * cs >= QC_MAX_HOST_OFFSET) {
        return -EFBIG;
    }
    uint64_t *nrt = calloc(n, sizeof(uint64_t));
    uint8_t *buf = calloc(1, (size_t)(nt * cs > k * cs ? nt * cs : k * cs));
    if (!nrt || !buf) {
        free(nrt);
        free(buf);
        return -ENOMEM;
    }
    memcpy(nrt, s->rt, s->rt_entries * sizeof(uint64_t));
    int ret = 0;
    for (int64_t j = 0; j < k; j++) {
        nrt[r0 + j] = (uint64_t)((base + j) * cs);
        memset(buf, 0, cs);
        for (int64_t p = base; p < base + k + nt; p++) {
            if ((p >> s->rb_bits) == r0 + j) {
                qc_rb_set(buf, s->refcount_order, p & (rb_entries - 1), 1);
            }
        }
        ret = lam_co_pwrite(s->file, (base + j) * cs, cs, buf, 0);
        if (ret < 0) {
            goto out;
        }
    }
    for (int64_t i = 0; i < n; i++) {
        qst64(buf + 8 * i, nrt[i]);
    }
    int64_t table_off = (base + k) * cs;
    ret = lam_co_pwrite(s->file, table_off, nt * cs, buf, 0);
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    if (ret < 0) {
        goto out;
    }
    /* The switch: header points at the new table (one 12-byte write). */
    uint8_t h[12];
    qst64(h, (uint64_t)table_off);
    qst32(h + 8, (uint32_t)nt);
    ret = lam_co_pwrite(s->file, 48, 12, h, 0);
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    if (ret < 0) {
        goto out;
    }
    uint64_t old_off = s->rt_offset;
    int64_t old_len = (int64_t)s->rt_clusters * cs;
    free(s->rt);
    s->rt = nrt;
    nrt = NULL;
    s->rt_entries = n;
    s->rt_offset = (uint64_t)table_off;
    s->rt_clusters = (uint32_t)nt;
    if (table_off + nt * cs > s->file_end) {
        s->file_end = table_off + nt * cs;
    }
    ret = qc_update_refcount(s, (int64_t)old_off, old_len, -1);
out:
    free(nrt);
    free(buf);
    return ret;
}

static int ensure_refblock(Qcow2State *s, int64_t t)
{
    int ret;
    if (t >= s->rt_entries) {
        ret = grow_table(s, t);
        if (ret < 0) {
            return ret;
        }
    }
    uint64_t off;
    ret = rb_offset(s, t, &off);
    if (ret < 0 || off) {
        return ret;
    }
    int64_t cs = s->cluster_size;
    off = (uint64_t)((t << s->rb_bits) * cs);
    if (off >= QC_MAX_HOST_OFFSET || off == 0) {
        return off ? -EFBIG : -EIO;
    }
    uint8_t *b;
    ret = qc_cache_get(s, s->rb_cache, off, true, &b);
    if (ret < 0) {
        return ret;
    }
    qc_rb_set(b, s->refcount_order, 0, 1); /* the block counts itself */
    /* FUA writes order the block before its table entry, and the entry
     * before any refcount in the block is relied on, without flushing
     * the data written so far. */
    ret = lam_co_pwrite(s->file, (int64_t)off, cs, b, LAM_REQ_FUA);
    qc_cache_put(s->rb_cache, b);
    if (ret < 0) {
        qc_cache_discard(s->rb_cache, off);
        return ret;
    }
    uint8_t e[8];
    qst64(e, off);
    ret = lam_co_pwrite(s->file, (int64_t)s->rt_offset + 8 * t, 8, e, LAM_REQ_FUA);
    if (ret < 0) {
        qc_cache_discard(s->rb_cache, off);
        return ret;
    }
    s->rt[t] = off;
    if ((int64_t)off + cs > s->file_end) {
        s->file_end = (int64_t)off + cs;
    }
    return 0;
}

static int update_one(Qcow2State *s, int64_t ci, int64_t delta)
{
    int64_t t = ci >> s->rb_bits;
    uint64_t off;
    int ret = rb_offset(s, t, &off);
    if (ret < 0) {
        return ret;
    }
    if (!off) {
        if (delta < 0) {
            qc_signal_corruption(s, ci * s->cluster_size, s->cluster_size,
                                 "Freeing cluster %lld without a refcount block",
                                 (long long)ci);
            return -EIO;
        }
        if ((ci & ((1ll << s->rb_bits) - 1)) == 0) {
            return -EIO; /* would collide with its own new block */
        }
        ret = ensure_refblock(s, t);
        if (ret < 0) {
            return ret;
        }
        off = s->rt[t];
    }
    uint8_t *b;
    ret = qc_cache_get(s, s->rb_cache, off, false, &b);
    if (ret < 0) {
        return ret;
    }
    int64_t idx = ci & ((1ll << s->rb_bits) - 1);
    uint64_t v = qc_rb_get(b, s->refcount_order, idx);
    uint64_t nv = v + (uint64_t)delta;
    if ((delta < 0 && v < (uint64_t)-delta) || (delta > 0 && (nv < v || nv > s->refcount_max))) {
        qc_cache_put(s->rb_cache, b);
        if (delta < 0) {
            qc_signal_corruption(s, ci * s->cluster_size, s->cluster_size,
                                 "Refcount of cluster %lld would drop below zero",
                                 (long long)ci);
            return -EIO;
        }
        return -ERANGE;
    }
    qc_rb_set(b, s->refcount_order, idx, nv);
    qc_cache_mark_dirty(s->rb_cache, b);
    qc_cache_put(s->rb_cache, b);
    if (nv == 0) {
        uint64_t coff = (uint64_t)(ci * s->cluster_size);
        if (ci < s->free_cluster_index) {
            s->free_cluster_index = ci;
        }
        qc_cache_discard(s->l2_cache, coff);
        qc_cache_discard(s->rb_cache, coff);
        if (s->free_byte_offset &&
            qc_start_of_cluster(s, s->free_byte_offset) == (int64_t)coff) {
            s->free_byte_offset = 0;
        }
    }
    return 0;
}

int qc_update_refcount(Qcow2State *s, int64_t off, int64_t len, int64_t delta)
{
    if (len <= 0) {
        return 0;
    }
    int64_t first = off >> s->cluster_bits;
    int64_t last = (off + len - 1) >> s->cluster_bits;
    for (int64_t ci = first; ci <= last; ci++) {
        int ret = update_one(s, ci, delta);
        if (ret < 0) {
            /* Undo what was done so refcounts stay consistent in memory. */
            for (int64_t u = first; u < ci; u++) {
                update_one(s, u, -delta);
            }
            return ret;
        }
    }
    return 0;
}

static bool has_block(Qcow2State *s, int64_t t)
{
    return t < s->rt_entries && (s->rt[t] & QCOW2_RT_OFFSET_MASK);
}

/* Ranges in [t0, t1] without a refcount block. */
static int64_t missing_blocks(Qcow2State *s, int64_t t0, int64_t t1)
{
    int64_t m = 0;
    for (int64_t t = t0; t <= t1; t++) {
        m += !has_block(s, t);
    }
    return m;
}

/* Writes new refcount blocks for the block-less ranges touched by the
 * free area [start, start+n+k), placing the k blocks at start+n.. so that
 * contiguous runs may cross range boundaries.  The blocks and the
 * refcounts of block clusters in old ranges are durable (FUA) before the
 * table entries are written, with FUA too (I1). */
static int place_blocks(Qcow2State *s, int64_t start, int64_t n, int64_t k)
{
    int64_t cs = s->cluster_size, mask = (1ll << s->rb_bits) - 1;
    int64_t bstart = start + n;
    int64_t t0 = start >> s->rb_bits, t1 = (bstart + k - 1) >> s->rb_bits;
    int64_t *placed = calloc(k, sizeof(int64_t));
    if (!placed) {
        return -ENOMEM;
    }
    int ret = 0;
    int64_t j = 0;
    for (int64_t t = t0; t <= t1 && ret == 0; t++) {
        if (has_block(s, t)) {
            continue;
        }
        uint64_t off = (uint64_t)((bstart + j) * cs);
        uint8_t *b;
        ret = qc_cache_get(s, s->rb_cache, off, true, &b);
        if (ret < 0) {
            break;
        }
        for (int64_t ci = bstart; ci < bstart + k; ci++) {
            if ((ci >> s->rb_bits) == t) {
                qc_rb_set(b, s->refcount_order, ci & mask, 1);
            }
        }
        /* FUA: durable before the table points at it, without a flush
         * of all the data written so far. */
        ret = lam_co_pwrite(s->file, (int64_t)off, cs, b, LAM_REQ_FUA);
        qc_cache_put(s->rb_cache, b);
        placed[j++] = t;
    }
    /* Block clusters that fall in ranges which already had a block are
     * counted there, durably, before the table points at them (I1). */
    for (int64_t ci = bstart; ci < bstart + k && ret == 0; ci++) {
        uint64_t rc;
        if (!has_block(s, ci >> s->rb_bits)) {
            continue; /* counted by its own new block */
        }
        ret = qc_get_refcount(s, ci, &rc);
        if (ret == 0 && rc == 0) {
            ret = qc_update_refcount(s, ci * cs, cs, 1);
        }
    }
    if (ret == 0) {
        ret = qc_cache_writeback_fua(s, s->rb_cache);
    }
    /* Table entries in dependency order: a block whose own cluster lies in
     * the range of another new block is pointed at only once that block
     * is (else a crash between the two would leave a referenced cluster
     * without a refcount).  Clusters grow with ranges, so no cycles. */
    bool *done = calloc(j ? j : 1, sizeof(bool));
    if (!done) {
        ret = -ENOMEM;
    }
    for (int64_t left = j; ret == 0 && left > 0;) {
        int64_t before = left;
        for (int64_t i = 0; i < j && ret == 0; i++) {
            if (done[i]) {
                continue;
            }
            int64_t dep = (bstart + i) >> s->rb_bits;
            bool waits = false;
            for (int64_t d = 0; d < j; d++) {
                waits |= d != i && !done[d] && placed[d] == dep;
            }
            if (waits) {
                continue;
            }
            uint8_t e[8];
            qst64(e, (uint64_t)((bstart + i) * cs));
            ret = lam_co_pwrite(s->file, (int64_t)s->rt_offset + 8 * placed[i], 8, e,
                                LAM_REQ_FUA);
            done[i] = true;
            left--;
        }
        if (ret == 0 && left == before) {
            ret = -EIO; /* a cycle: cannot happen (see above) */
        }
    }
    free(done);
    if (ret < 0) {
        for (int64_t i = 0; i < j; i++) {
            qc_cache_discard(s->rb_cache, (uint64_t)((bstart + i) * cs));
        }
        free(placed);
        return ret;
    }
    for (int64_t i = 0; i < j; i++) {
        s->rt[placed[i]] = (uint64_t)((bstart + i) * cs);
    }
    free(placed);
    if ((bstart + k) * cs > s->file_end) {
        s->file_end = (bstart + k) * cs;
    }
    return 0;
}

int64_t qc_alloc_clusters(Qcow2State *s, int64_t n)
{
    int64_t from = s->free_cluster_index > 0 ? s->free_cluster_index : 1;
    for (;;) {
        int64_t ci = from;
        int64_t run = 0, start = -1;
        while (run < n) {
            if (ci * s->cluster_size >= QC_MAX_HOST_OFFSET) {
                return -EFBIG;
            }
            uint64_t rc;
            int ret = qc_get_refcount(s, ci, &rc);
            if (ret < 0) {
                return ret;
            }
            if (rc == 0) {
                if (run++ == 0) {
                    start = ci;
                }
            } else {
                run = 0;
                if (ci == s->free_cluster_index) {
                    s->free_cluster_index = ci + 1;
                }
            }
            ci++;
        }
        int64_t t0 = start >> s->rb_bits;
        int64_t slack = ((n + 2) >> s->rb_bits) + 3; /* bound on blocks needed */
        int64_t tmax = (start + n + slack) >> s->rb_bits;
        if (tmax >= s->rt_entries) {
            int ret = grow_table(s, tmax);
            if (ret < 0) {
                return ret;
            }
            continue; /* the new table took clusters: search again */
        }
        int64_t k = 0;
        for (;;) {
            int64_t m = missing_blocks(s, t0, (start + n + k - 1) >> s->rb_bits);
            if (m <= k) {
                break;
            }
            k = m;
        }
        if (k > 0) {
            bool free_area = true;
            for (int64_t c = start + n; c < start + n + k; c++) {
                uint64_t rc;
                int ret = qc_get_refcount(s, c, &rc);
                if (ret < 0) {
                    return ret;
                }
                if (rc) {
                    free_area = false;
                    from = c + 1;
                    break;
                }
            }
            if (!free_area) {
                continue;
            }
            int ret = place_blocks(s, start, n, k);
            if (ret < 0) {
                return ret;
            }
        }
        int ret = qc_update_refcount(s, start * s->cluster_size, n * s->cluster_size, 1);
        if (ret < 0) {
            return ret;
        }
        s->free_cluster_index = start + n + k;
        if ((start + n) * s->cluster_size > s->file_end) {
            s->file_end = (start + n) * s->cluster_size;
        }
        s->l2_needs_flush = true;
        return start * s->cluster_size;
    }
}

int64_t qc_alloc_bytes(Qcow2State *s, int64_t len)
{
    int64_t cs = s->cluster_size;
    if (len <= 0 || len >= cs) {
        return -EINVAL;
    }
    if (s->free_byte_offset) {
        int64_t cl = qc_start_of_cluster(s, s->free_byte_offset);
        if (s->free_byte_offset + len <= cl + cs) {
            int ret = qc_update_refcount(s, cl, 1, 1);
            if (ret == -ERANGE) {
                /* Refcount at its maximum (e.g. 1-bit refcounts): start
                 * a new cluster instead of sharing this one. */
                s->free_byte_offset = 0;
                goto fresh;
            }
            if (ret < 0) {
                return ret;
            }
            int64_t off = s->free_byte_offset;
            s->free_byte_offset = (off + len) % cs ? off + len : 0;
            s->l2_needs_flush = true;
            return off;
        }
    }
fresh:;
    int64_t off = qc_alloc_clusters(s, 1);
    if (off < 0) {
        return off;
    }
    s->free_byte_offset = off + len;
    return off;
}
