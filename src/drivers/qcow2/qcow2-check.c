/* Consistency check and repair: walks every structure that references
 * clusters, counts the references and compares them with the refcounts.
 * Leaks (refcount higher than the references) are fixed in place; errors
 * (refcount too low) are fixed by writing a whole new refcount structure
 * past the end of the image and switching the header to it, so a crash
 * during repair leaves the old, still-readable structure. */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

#define MAX_MSGS 2000
#define MAX_CHECK_CLUSTERS (256ll * 1024 * 1024)

typedef struct Ck {
    Qcow2State *s;
    LamCheckResult *res;
    uint32_t *refs;
    int64_t n;          /* clusters covered by refs */
    int64_t file_clusters;
    int nmsgs;
    size_t msglen;
    int64_t prev_host;
} Ck;

static void msg(Ck *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void msg(Ck *c, const char *fmt, ...)
{
    if (c->nmsgs++ > MAX_MSGS) {
        return;
    }
    char line[300];
    va_list ap;
    va_start(ap, fmt);
    if (c->nmsgs > MAX_MSGS) {
        snprintf(line, sizeof(line), "(further messages suppressed)");
    } else {
        vsnprintf(line, sizeof(line), fmt, ap);
    }
    va_end(ap);
    size_t l = strlen(line);
    char *m = realloc(c->res->msgs, c->msglen + l + 2);
    if (!m) {
        return;
    }
    memcpy(m + c->msglen, line, l);
    m[c->msglen + l] = '\n';
    m[c->msglen + l + 1] = '\0';
    c->msglen += l + 1;
    c->res->msgs = m;
}

static void inc_range(Ck *c, int64_t off, int64_t len)
{
    if (len <= 0) {
        return;
    }
    int64_t first = off >> c->s->cluster_bits, last = (off + len - 1) >> c->s->cluster_bits;
    for (int64_t ci = first; ci <= last; ci++) {
        if (ci >= c->file_clusters || ci < 0) {
            msg(c, "ERROR: cluster %" PRId64 " (offset %#" PRIx64 ") is beyond the end of the image file",
                ci, (uint64_t)ci << c->s->cluster_bits);
            c->res->corruptions++;
            continue;
        }
        if (c->refs[ci] != UINT32_MAX) {
            c->refs[ci]++;
        }
    }
}

static int walk_l2(Ck *c, uint64_t l2off, bool active, uint8_t *buf)
{
    Qcow2State *s = c->s;
    int ret = lam_co_pread(s->file, (int64_t)l2off, s->cluster_size, buf, 0);
    if (ret < 0) {
        msg(c, "ERROR: I/O error reading L2 table at %#" PRIx64, l2off);
        c->res->check_errors++;
        return 0;
    }
    for (int64_t i = 0; i < s->l2_entries; i++) {
        uint64_t e = qbe64(buf + 8 * i);
        switch (qc_entry_type(s, e)) {
        case QC_COMPRESSED: {
            int64_t coff, csize;
            qc_compressed_params(s, e, &coff, &csize);
            inc_range(c, coff, csize);
            if (active) {
                /* Counted as fragmented, as qemu-img check does. */
                c->res->compressed_clusters++;
                c->res->allocated_clusters++;
                c->res->fragmented_clusters++;
                c->prev_host = -1;
            }
            break;
        }
        case QC_NORMAL:
        case QC_ZERO_ALLOC: {
            uint64_t off = e & QCOW2_L2_OFFSET_MASK;
            if (off & (s->cluster_size - 1)) {
                msg(c, "ERROR offset=%" PRIx64 ": Cluster is not properly aligned; L2 entry corrupted", off);
                c->res->corruptions++;
                break;
            }
            inc_range(c, (int64_t)off, s->cluster_size);
            if (active) {
                c->res->allocated_clusters++;
                if (c->prev_host >= 0 && (int64_t)off != c->prev_host + s->cluster_size) {
                    c->res->fragmented_clusters++;
                }
                c->prev_host = (int64_t)off;
            }
            break;
        }
        default:
            break;
        }
    }
    return 0;
}

static int walk_l1(Ck *c, const uint64_t *l1, uint32_t l1_size, bool active)
{
    Qcow2State *s = c->s;
    uint8_t *buf = malloc(s->cluster_size);
    if (!buf) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t l2off = l1[i] & QCOW2_L1_OFFSET_MASK;
        if (!l2off) {
            continue;
        }
        if (l2off & (s->cluster_size - 1)) {
            msg(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 entry corrupted", l2off);
            c->res->corruptions++;
            continue;
        }
        if ((int64_t)(l2off >> s->cluster_bits) >= c->file_clusters) {
            msg(c, "ERROR l2_offset=%" PRIx64 ": L2 table is beyond the end of the image file", l2off);
            c->res->corruptions++;
            continue;
        }
        inc_range(c, (int64_t)l2off, s->cluster_size);
        walk_l2(c, l2off, active, buf);
    }
    free(buf);
    return 0;
}

static int walk_snapshots(Ck *c)
{
    Qcow2State *s = c->s;
    if (!s->nb_snapshots) {
        return 0;
    }
    int64_t avail = s->file_end - (int64_t)s->snapshots_offset;
    if (avail > QCOW2_MAX_SNAPSHOT_TABLE) {
        avail = QCOW2_MAX_SNAPSHOT_TABLE;
    }
    uint8_t *t = avail > 0 ? malloc(avail) : NULL;
    if (!t || lam_co_pread(s->file, (int64_t)s->snapshots_offset, avail, t, 0) < 0) {
        free(t);
        c->res->check_errors++;
        return 0;
    }
    int64_t p = 0;
    for (uint32_t i = 0; i < s->nb_snapshots && p + 40 <= avail; i++) {
        uint64_t l1off = qbe64(t + p);
        uint32_t l1sz = qbe32(t + p + 8);
        p += qc_align_up(40 + (int64_t)qbe32(t + p + 36) + qbe16(t + p + 12) + qbe16(t + p + 14), 8);
        inc_range(c, (int64_t)l1off, (int64_t)l1sz * 8);
        uint64_t *l1 = calloc(l1sz ? l1sz : 1, 8);
        uint8_t *raw = malloc(l1sz ? (size_t)l1sz * 8 : 1);
        if (l1 && raw && lam_co_pread(s->file, (int64_t)l1off, (int64_t)l1sz * 8, raw, 0) == 0) {
            for (uint32_t j = 0; j < l1sz; j++) {
                l1[j] = qbe64(raw + 8 * j);
            }
            walk_l1(c, l1, l1sz, false);
        } else {
            c->res->check_errors++;
        }
        free(l1);
        free(raw);
    }
    inc_range(c, (int64_t)s->snapshots_offset, p);
    free(t);
    return 0;
}

static void walk_bitmaps(Ck *c)
{
    Qcow2State *s = c->s;
    if (!s->has_bitmaps_ext || !s->bitmaps_dir_size || s->bitmaps_dir_size > 64 * 1024 * 1024) {
        return;
    }
    int64_t sz = (int64_t)s->bitmaps_dir_size;
    inc_range(c, (int64_t)s->bitmaps_dir_offset, sz);
    uint8_t *d = malloc(sz);
    if (!d || lam_co_pread(s->file, (int64_t)s->bitmaps_dir_offset, sz, d, 0) < 0) {
        free(d);
        c->res->check_errors++;
        return;
    }
    for (int64_t p = 0; p + 24 <= sz;) {
        uint64_t toff = qbe64(d + p);
        uint32_t tsz = qbe32(d + p + 8);
        int64_t elen = 24 + (int64_t)qbe32(d + p + 20) + qbe16(d + p + 18);
        inc_range(c, (int64_t)toff, (int64_t)tsz * 8);
        if (tsz <= 1024 * 1024) {
            uint8_t *bt = malloc((size_t)tsz * 8 + 1);
            if (bt && lam_co_pread(s->file, (int64_t)toff, (int64_t)tsz * 8, bt, 0) == 0) {
                for (uint32_t j = 0; j < tsz; j++) {
                    uint64_t o = qbe64(bt + 8 * j) & 0x00fffffffffffe00ull;
                    if (o) {
                        inc_range(c, (int64_t)o, s->cluster_size);
                    }
                }
            }
            free(bt);
        }
        p += qc_align_up(elen, 8);
    }
    free(d);
}

/* References from everything but the refcount structure itself. */
static int count_refs(Ck *c)
{
    Qcow2State *s = c->s;
    c->prev_host = -1;
    inc_range(c, 0, s->cluster_size);
    inc_range(c, (int64_t)s->l1_offset, (int64_t)s->l1_size * 8);
    walk_l1(c, s->l1, s->l1_size, true);
    walk_snapshots(c);
    walk_bitmaps(c);
    return 0;
}

static void count_refcount_structs(Ck *c)
{
    Qcow2State *s = c->s;
    inc_range(c, (int64_t)s->rt_offset, (int64_t)s->rt_clusters * s->cluster_size);
    for (int64_t i = 0; i < s->rt_entries; i++) {
        uint64_t o = s->rt[i] & QCOW2_RT_OFFSET_MASK;
        if (!o) {
            continue;
        }
        if ((o & (s->cluster_size - 1)) || (int64_t)(o >> s->cluster_bits) >= c->file_clusters) {
            msg(c, "ERROR refcount block %" PRId64 " is not cluster aligned or outside the image; refcount table entry corrupted", i);
            c->res->corruptions++;
            continue;
        }
        inc_range(c, (int64_t)o, s->cluster_size);
    }
}

/* Writes a fresh refcount table and blocks after everything in use. */
static int rebuild_refcounts(Ck *c)
{
    Qcow2State *s = c->s;
    int64_t cs = s->cluster_size, rbe = 1ll << s->rb_bits;
    int64_t base = c->file_clusters;
    int64_t k = 0, nt = 1, total = 0, nranges = 0;
    for (int iter = 0; iter < 64; iter++) {
        total = base + nt + k;
        nranges = qc_div_up(total, rbe);
        int64_t k2 = 0;
        for (int64_t r = 0; r < nranges; r++) {
            bool used = r * rbe + rbe > base; /* overlaps the new area */
            for (int64_t ci = r * rbe; !used && ci < (r + 1) * rbe && ci < c->n; ci++) {
                used = c->refs[ci] != 0;
            }
            k2 += used;
        }
        int64_t nt2 = qc_div_up(nranges * 8, cs);
        if (k2 == k && nt2 == nt) {
            break;
        }
        k = k2;
        nt = nt2;
    }
    if (nt * cs > QCOW2_MAX_RT_BYTES) {
        return -EFBIG;
    }
    uint32_t *refs = realloc(c->refs, total * sizeof(uint32_t));
    if (!refs) {
        return -ENOMEM;
    }
    c->refs = refs;
    memset(refs + c->n, 0, (total - c->n) * sizeof(uint32_t));
    c->n = total;
    for (int64_t ci = base; ci < total; ci++) {
        refs[ci] = 1;
    }
    int64_t table_entries = nt * cs / 8;
    uint64_t *rt = calloc(table_entries, sizeof(uint64_t));
    uint8_t *buf = malloc(nt * cs > cs ? nt * cs : cs);
    if (!rt || !buf) {
        free(rt);
        free(buf);
        return -ENOMEM;
    }
    int ret = 0;
    int64_t next_block = base + nt;
    for (int64_t r = 0; r < nranges && ret == 0; r++) {
        bool used = false;
        for (int64_t ci = r * rbe; !used && ci < (r + 1) * rbe && ci < total; ci++) {
            used = refs[ci] != 0;
        }
        if (!used) {
            continue;
        }
        memset(buf, 0, cs);
        for (int64_t ci = r * rbe; ci < (r + 1) * rbe && ci < total; ci++) {
            if (refs[ci] > s->refcount_max) {
                ret = -ERANGE;
                break;
            }
            qc_rb_set(buf, s->refcount_order, ci - r * rbe, refs[ci]);
        }
        rt[r] = (uint64_t)(next_block * cs);
        if (ret == 0) {
            ret = lam_co_pwrite(s->file, next_block * cs, cs, buf, 0);
        }
        next_block++;
    }
    if (ret == 0) {
        for (int64_t i = 0; i < table_entries; i++) {
            qst64(buf + 8 * i, rt[i]);
        }
        ret = lam_co_pwrite(s->file, base * cs, nt * cs, buf, 0);
    }
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    if (ret == 0) {
        uint8_t h[12];
        qst64(h, (uint64_t)(base * cs));
        qst32(h + 8, (uint32_t)nt);
        ret = lam_co_pwrite(s->file, 48, 12, h, 0);
    }
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    free(buf);
    if (ret < 0) {
        free(rt);
        return ret;
    }
    if (s->header_raw && s->header_length >= 60) {
        qst64(s->header_raw + 48, (uint64_t)(base * cs));
        qst32(s->header_raw + 56, (uint32_t)nt);
    }
    free(s->rt);
    s->rt = rt;
    s->rt_entries = table_entries;
    s->rt_offset = (uint64_t)(base * cs);
    s->rt_clusters = (uint32_t)nt;
    qc_cache_clear(s->rb_cache);
    s->free_cluster_index = 1;
    s->free_byte_offset = 0;
    if (total * cs > s->file_end) {
        s->file_end = total * cs;
    }
    return 0;
}

static int check_once(Qcow2State *s, LamCheckResult *res, Ck *c)
{
    memset(c, 0, sizeof(*c));
    c->s = s;
    c->res = res;
    c->msglen = res->msgs ? strlen(res->msgs) : 0;
    int64_t flen = lam_node_length(s->file->node);
    if (flen < 0) {
        res->check_errors++;
        return (int)flen;
    }
    if (flen > s->file_end) {
        s->file_end = flen;
    }
    c->file_clusters = qc_div_up(s->file_end, s->cluster_size);
    if (c->file_clusters > MAX_CHECK_CLUSTERS) {
        msg(c, "Image too large to check");
        res->check_errors++;
        return -EFBIG;
    }
    c->n = c->file_clusters;
    c->refs = calloc(c->n ? c->n : 1, sizeof(uint32_t));
    if (!c->refs) {
        res->check_errors++;
        return -ENOMEM;
    }
    res->total_clusters = qc_div_up(atomic_load(&s->size), s->cluster_size);
    count_refs(c);
    return 0;
}

/* Compares counted references with the refcounts; returns the number of
 * refcount errors found (leaks are counted in res). */
static int compare(Ck *c, bool fix_leaks)
{
    Qcow2State *s = c->s;
    int errors = 0;
    int64_t highest = -1;
    for (int64_t ci = 0; ci < c->n; ci++) {
        uint64_t rc;
        if (c->refs[ci]) {
            highest = ci;
        }
        if (qc_get_refcount(s, ci, &rc) < 0) {
            msg(c, "ERROR: cannot get refcount of cluster %" PRId64, ci);
            c->res->check_errors++;
            continue;
        }
        if (rc) {
            highest = ci; /* leaked clusters still end the image */
        }
        if (rc == c->refs[ci]) {
            continue;
        }
        if (rc > c->refs[ci]) {
            if (fix_leaks && qc_update_refcount(s, ci << s->cluster_bits, 1,
                                                 (int64_t)c->refs[ci] - (int64_t)rc) == 0) {
                msg(c, "Repairing cluster %" PRId64 " refcount=%" PRIu64 " reference=%u", ci, rc, c->refs[ci]);
                c->res->leaks_fixed++;
            } else {
                msg(c, "Leaked cluster %" PRId64 " refcount=%" PRIu64 " reference=%u", ci, rc, c->refs[ci]);
                c->res->leaks++;
            }
        } else {
            msg(c, "ERROR cluster %" PRId64 " refcount=%" PRIu64 " reference=%u", ci, rc, c->refs[ci]);
            c->res->corruptions++;
            errors++;
        }
    }
    c->res->image_end_offset = (highest + 1) << s->cluster_bits;
    return errors;
}

/* The COPIED flag of active L1/L2 entries must say "refcount is one";
 * the write path trusts it for in-place writes (I3). */
static void check_copied(Ck *c, bool fix)
{
    Qcow2State *s = c->s;
    uint8_t *buf = malloc(s->cluster_size);
    if (!buf) {
        c->res->check_errors++;
        return;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t l2off = s->l1[i] & QCOW2_L1_OFFSET_MASK;
        uint64_t rc;
        if (!l2off || (l2off & (s->cluster_size - 1)) || (int64_t)l2off >= s->file_end ||
            qc_get_refcount(s, (int64_t)l2off >> s->cluster_bits, &rc) < 0) {
            continue;
        }
        if ((rc == 1) != ((s->l1[i] & QCOW2_OFLAG_COPIED) != 0)) {
            msg(c, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64 " refcount=%" PRIu64,
                fix ? "Repairing" : "ERROR", i, s->l1[i], rc);
            if (fix) {
                s->l1[i] ^= QCOW2_OFLAG_COPIED;
                if (qc_write_l1_entry(s, i) == 0) {
                    c->res->corruptions_fixed++;
                } else {
                    c->res->check_errors++;
                }
            } else {
                c->res->corruptions++;
            }
        }
        if (lam_co_pread(s->file, (int64_t)l2off, s->cluster_size, buf, 0) < 0) {
            c->res->check_errors++;
            continue;
        }
        bool dirty = false;
        for (int64_t j = 0; j < s->l2_entries; j++) {
            uint64_t e = qbe64(buf + 8 * j);
            Qcow2ClusterType t = qc_entry_type(s, e);
            uint64_t off = e & QCOW2_L2_OFFSET_MASK;
            if ((t != QC_NORMAL && t != QC_ZERO_ALLOC) || (off & (s->cluster_size - 1)) ||
                (int64_t)off >= s->file_end || qc_get_refcount(s, (int64_t)off >> s->cluster_bits, &rc) < 0) {
                continue;
            }
            if ((rc == 1) != ((e & QCOW2_OFLAG_COPIED) != 0)) {
                msg(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64,
                    fix ? "Repairing" : "ERROR", e, rc);
                if (fix) {
                    qst64(buf + 8 * j, e ^ QCOW2_OFLAG_COPIED);
                    dirty = true;
                    c->res->corruptions_fixed++;
                } else {
                    c->res->corruptions++;
                }
            }
        }
        if (dirty) {
            qc_cache_discard(s->l2_cache, l2off);
            if (lam_co_pwrite(s->file, (int64_t)l2off, s->cluster_size, buf, 0) < 0) {
                c->res->check_errors++;
            }
        }
    }
    free(buf);
    if (fix) {
        lam_co_flush(s->file);
    }
}

int qc_check_state(Qcow2State *s, LamCheckResult *res, LamCheckMode mode)
{
    Ck c;
    res->supported = true;
    if (!s->read_only) {
        int r = qc_flush_metadata(s);
        if (r < 0) {
            res->check_errors++;
        }
    }
    int ret = check_once(s, res, &c);
    if (ret < 0) {
        free(c.refs);
        return 0;
    }
    bool can_fix = !s->read_only && mode != LAM_CHECK_NONE;
    if (can_fix && (mode & LAM_FIX_ERRORS)) {
        /* Find out whether the refcounts need a rebuild (dry run). */
        LamCheckResult probe = {0};
        Ck c2 = c;
        c2.res = &probe;
        c2.nmsgs = MAX_MSGS + 10;
        Ck tmp = c2;
        uint32_t *saved = malloc(c.n * sizeof(uint32_t) + 4);
        if (saved) {
            memcpy(saved, c.refs, c.n * sizeof(uint32_t));
            tmp.refs = saved;
            count_refcount_structs(&tmp);
            int errs = compare(&tmp, false);
            free(saved);
            free(probe.msgs);
            if (errs > 0 || probe.corruptions > 0) {
                ret = rebuild_refcounts(&c);
                if (ret == 0) {
                    ret = lam_co_flush(s->file);
                }
                if (ret < 0) {
                    res->check_errors++;
                    free(c.refs);
                    return 0;
                }
                res->corruptions_fixed += errs + probe.corruptions;
                res->leaks_fixed += probe.leaks;
                free(c.refs);
                /* Report the state after the repair. */
                int fixed_c = res->corruptions_fixed, fixed_l = res->leaks_fixed;
                res->corruptions = res->leaks = 0;
                res->allocated_clusters = res->compressed_clusters = res->fragmented_clusters = 0;
                ret = check_once(s, res, &c);
                res->corruptions_fixed = fixed_c;
                res->leaks_fixed = fixed_l;
                if (ret < 0) {
                    free(c.refs);
                    return 0;
                }
            }
        }
    }
    count_refcount_structs(&c);
    compare(&c, can_fix && (mode & (LAM_FIX_LEAKS | LAM_FIX_ERRORS)));
    check_copied(&c, can_fix && (mode & LAM_FIX_ERRORS));
    if (can_fix && res->leaks_fixed) {
        if (qc_flush_metadata(s) < 0 || lam_co_flush(s->file) < 0) {
            res->check_errors++;
        }
    }
    free(c.refs);
    return 0;
}

int qc_check(LamNode *bs, LamCheckResult *res, LamCheckMode mode)
{
    Qcow2State *s = bs->opaque;
    pthread_mutex_lock(&s->lock);
    int ret = qc_check_state(s, res, mode);
    if (ret == 0 && !s->read_only && mode != LAM_CHECK_NONE && res->corruptions == 0 &&
        atomic_load(&s->corrupt) && s->version >= 3) {
        /* Repaired: the image may be written again. */
        s->incompat &= ~QCOW2_INCOMPAT_CORRUPT;
        if (qc_write_header_field(s, 72, 8, s->incompat) == 0 && lam_co_flush(s->file) == 0) {
            atomic_store(&s->corrupt, false);
        }
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}
