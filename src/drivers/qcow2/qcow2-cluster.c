/* Guest-to-host mapping: L1 and L2 tables.  All functions run with
 * s->lock held.  Every entry read from disk is validated before use; a
 * bad one marks the image corrupt and fails the request with -EIO. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

Qcow2ClusterType qc_entry_type(const Qcow2State *s, uint64_t e)
{
    if (e & QCOW2_OFLAG_COMPRESSED) {
        return QC_COMPRESSED;
    }
    uint64_t off = e & QCOW2_L2_OFFSET_MASK;
    if (s->version >= 3 && (e & QCOW2_OFLAG_ZERO)) {
        return off ? QC_ZERO_ALLOC : QC_ZERO_PLAIN;
    }
    return off ? QC_NORMAL : QC_UNALLOC;
}

void qc_compressed_params(const Qcow2State *s, uint64_t e, int64_t *coff,
                          int64_t *csize)
{
    int x = 62 - (s->cluster_bits - 8);
    uint64_t nsec = ((e >> x) & ((1ull << (s->cluster_bits - 8)) - 1)) + 1;
    *coff = (int64_t)(e & ((1ull << x) - 1));
    *csize = (int64_t)(nsec * 512) - (*coff & 511);
}

void qc_entry_host_range(const Qcow2State *s, uint64_t e, int64_t *off,
                         int64_t *len)
{
    switch (qc_entry_type(s, e)) {
    case QC_NORMAL:
    case QC_ZERO_ALLOC:
        *off = (int64_t)(e & QCOW2_L2_OFFSET_MASK);
        *len = s->cluster_size;
        break;
    case QC_COMPRESSED:
        qc_compressed_params(s, e, off, len);
        break;
    default:
        *off = 0;
        *len = 0;
    }
}

static int check_table_offset(Qcow2State *s, uint64_t off, const char *what,
                              int64_t guest)
{
    if ((off & (s->cluster_size - 1)) || (int64_t)off >= s->file_end) {
        qc_signal_corruption(s, (int64_t)off, s->cluster_size,
                             "%s offset %#llx for guest offset %#llx is %s", what,
                             (unsigned long long)off, (unsigned long long)guest,
                             (off & (s->cluster_size - 1)) ? "unaligned"
                                                           : "beyond end of file");
        return -EIO;
    }
    return 0;
}

int qc_l2_table_for_read(Qcow2State *s, int64_t off, uint8_t **table)
{
    int64_t l1_idx = off >> (s->cluster_bits + s->l2_bits);
    *table = NULL;
    if (l1_idx >= s->l1_size) {
        return 0;
    }
    uint64_t l2_off = s->l1[l1_idx] & QCOW2_L1_OFFSET_MASK;
    if (!l2_off) {
        return 0;
    }
    int ret = check_table_offset(s, l2_off, "L2 table", off);
    if (ret < 0) {
        return ret;
    }
    return qc_cache_get(s, s->l2_cache, l2_off, false, table);
}

static int check_entry(Qcow2State *s, uint64_t e, int64_t guest)
{
    Qcow2ClusterType t = qc_entry_type(s, e);
    if (t == QC_NORMAL || t == QC_ZERO_ALLOC) {
        uint64_t off = e & QCOW2_L2_OFFSET_MASK;
        if (off & (s->cluster_size - 1)) {
            qc_signal_corruption(s, (int64_t)off, s->cluster_size,
                                 "Cluster allocation offset %#llx unaligned (L2 entry for guest offset %#llx)",
                                 (unsigned long long)off, (unsigned long long)guest);
            return -EIO;
        }
        if (t == QC_NORMAL && (int64_t)off >= s->file_end) {
            qc_signal_corruption(s, (int64_t)off, s->cluster_size,
                                 "Data cluster offset %#llx beyond end of file (guest offset %#llx)",
                                 (unsigned long long)off, (unsigned long long)guest);
            return -EIO;
        }
    } else if (t == QC_COMPRESSED) {
        int64_t coff, csize;
        qc_compressed_params(s, e, &coff, &csize);
        if (coff < s->cluster_size || coff >= s->file_end) {
            qc_signal_corruption(s, coff, csize,
                                 "Compressed cluster descriptor %#llx out of bounds (guest offset %#llx)",
                                 (unsigned long long)e, (unsigned long long)guest);
            return -EIO;
        }
    }
    return 0;
}

int qc_lookup(Qcow2State *s, int64_t off, int64_t bytes, int64_t *run,
              uint64_t *entry)
{
    int64_t cs = s->cluster_size;
    int64_t in_cluster = off & (cs - 1);
    int64_t l2_span = cs << s->l2_bits;
    int64_t to_l2_end = l2_span - (off & (l2_span - 1));
    int64_t max = bytes < to_l2_end ? bytes : to_l2_end;
    uint8_t *t;
    int ret = qc_l2_table_for_read(s, off, &t);
    if (ret < 0) {
        return ret;
    }
    *entry = 0;
    if (!t) {
        *run = max;
        return QC_UNALLOC;
    }
    int64_t idx = (off >> s->cluster_bits) & (s->l2_entries - 1);
    uint64_t e = qbe64(t + 8 * idx);
    ret = check_entry(s, e, off);
    if (ret < 0) {
        qc_cache_put(s->l2_cache, t);
        return ret;
    }
    Qcow2ClusterType type = qc_entry_type(s, e);
    int64_t covered = cs - in_cluster;
    if (type != QC_COMPRESSED) {
        uint64_t host = e & QCOW2_L2_OFFSET_MASK;
        for (int64_t i = idx + 1; covered < max && i < s->l2_entries; i++) {
            uint64_t n = qbe64(t + 8 * i);
            if (qc_entry_type(s, n) != type) {
                break;
            }
            if (type == QC_NORMAL) {
                if ((n & QCOW2_L2_OFFSET_MASK) != host + (uint64_t)((i - idx) * cs) ||
                    (n & QCOW2_OFLAG_COPIED) != (e & QCOW2_OFLAG_COPIED)) {
                    break;
                }
                if (check_entry(s, n, off + covered) < 0) {
                    break; /* reported when the request reaches it */
                }
            }
            covered += cs;
        }
    }
    qc_cache_put(s->l2_cache, t);
    *run = covered < max ? covered : max;
    *entry = e;
    return type;
}

int qc_write_l1_entry(Qcow2State *s, int64_t idx)
{
    uint8_t b[8];
    qst64(b, s->l1[idx]);
    return lam_co_pwrite(s->file, (int64_t)s->l1_offset + 8 * idx, 8, b, 0);
}

int qc_get_l2_for_write(Qcow2State *s, int64_t off, uint8_t **table)
{
    /* Every L2 change goes through here: readers revalidate on a change. */
    atomic_fetch_add(&s->map_gen, 1);
    int64_t l1_idx = off >> (s->cluster_bits + s->l2_bits);
    if (l1_idx >= s->l1_size) {
        return -EIO;
    }
    uint64_t l1e = s->l1[l1_idx];
    uint64_t old = l1e & QCOW2_L1_OFFSET_MASK;
    int ret;
    if (old) {
        ret = check_table_offset(s, old, "L2 table", off);
        if (ret < 0) {
            return ret;
        }
        if (l1e & QCOW2_OFLAG_COPIED) {
            return qc_cache_get(s, s->l2_cache, old, false, table);
        }
        uint64_t rc;
        ret = qc_get_refcount(s, (int64_t)old >> s->cluster_bits, &rc);
        if (ret < 0) {
            return ret;
        }
        if (rc == 1) {
            s->l1[l1_idx] = old | QCOW2_OFLAG_COPIED;
            ret = qc_write_l1_entry(s, l1_idx);
            if (ret < 0) {
                s->l1[l1_idx] = l1e;
                return ret;
            }
            return qc_cache_get(s, s->l2_cache, old, false, table);
        }
        if (rc == 0) {
            qc_signal_corruption(s, (int64_t)old, s->cluster_size,
                                 "L2 table at %#llx has refcount 0",
                                 (unsigned long long)old);
            return -EIO;
        }
    }
    /* A new table, or a private copy of a shared one (I3). */
    int64_t noff = qc_alloc_clusters(s, 1);
    if (noff < 0) {
        return (int)noff;
    }
    uint8_t *t;
    ret = qc_cache_get(s, s->l2_cache, (uint64_t)noff, true, &t);
    if (ret < 0) {
        qc_update_refcount(s, noff, s->cluster_size, -1);
        return ret;
    }
    if (old) {
        ret = lam_co_pread(s->file, (int64_t)old, s->cluster_size, t, 0);
        for (int64_t i = 0; ret == 0 && i < s->l2_entries; i++) {
            qst64(t + 8 * i, qbe64(t + 8 * i) & ~QCOW2_OFLAG_COPIED);
        }
    }
    /* I1: the table's refcount and its content are on disk before L1
     * points at it.  FUA writes make just these durable: a flush of the
     * file would also write out all guest data written so far (a backup
     * target's second L2 table waited a third of a second for 512 MiB).
     * Guest data keeps its own ordering (I2, l2_needs_flush). */
    if (ret == 0) {
        ret = qc_cache_writeback_fua(s, s->rb_cache);
    }
    if (ret == 0) {
        ret = lam_co_pwrite(s->file, noff, s->cluster_size, t, LAM_REQ_FUA);
    }
    if (ret == 0) {
        s->l1[l1_idx] = (uint64_t)noff | QCOW2_OFLAG_COPIED;
        ret = qc_write_l1_entry(s, l1_idx);
        if (ret < 0) {
            s->l1[l1_idx] = l1e;
        }
    }
    if (ret < 0) {
        qc_cache_put(s->l2_cache, t);
        qc_cache_discard(s->l2_cache, (uint64_t)noff);
        return ret; /* the new cluster leaks: harmless */
    }
    if (old) {
        ret = lam_co_flush(s->file);
        if (ret == 0) {
            ret = qc_update_refcount(s, (int64_t)old, s->cluster_size, -1);
        }
        if (ret < 0) {
            qc_cache_put(s->l2_cache, t);
            return ret;
        }
    }
    *table = t;
    return 0;
}

int qc_grow_l1(Qcow2State *s, int64_t min_size)
{
    if (min_size <= s->l1_size) {
        return 0;
    }
    int64_t cs = s->cluster_size;
    int64_t bytes = qc_align_up(min_size * 8, cs);
    if (bytes > QCOW2_MAX_L1_BYTES) {
        return -EFBIG;
    }
    int64_t n = bytes / 8;
    uint64_t *nl1 = calloc(n, sizeof(uint64_t));
    uint8_t *buf = calloc(1, bytes);
    if (!nl1 || !buf) {
        free(nl1);
        free(buf);
        return -ENOMEM;
    }
    memcpy(nl1, s->l1, s->l1_size * sizeof(uint64_t));
    for (int64_t i = 0; i < n; i++) {
        qst64(buf + 8 * i, nl1[i]);
    }
    int64_t noff = qc_alloc_clusters(s, bytes / cs);
    int ret = noff < 0 ? (int)noff : 0;
    if (ret == 0) {
        ret = qc_cache_writeback(s, s->rb_cache);
    }
    if (ret == 0) {
        ret = lam_co_pwrite(s->file, noff, bytes, buf, 0);
    }
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    if (ret == 0) {
        uint8_t h[12];
        qst32(h, (uint32_t)min_size);
        qst64(h + 4, (uint64_t)noff);
        ret = lam_co_pwrite(s->file, 36, 12, h, 0);
    }
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    free(buf);
    if (ret < 0) {
        free(nl1);
        return ret;
    }
    int64_t old_off = (int64_t)s->l1_offset;
    int64_t old_bytes = qc_align_up((int64_t)s->l1_size * 8, cs);
    free(s->l1);
    s->l1 = nl1;
    s->l1_size = (uint32_t)min_size;
    s->l1_offset = (uint64_t)noff;
    if (old_off && old_bytes) {
        ret = qc_update_refcount(s, old_off, old_bytes, -1);
    }
    return ret;
}
