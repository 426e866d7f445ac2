/* qcow2 format driver: open, header, lifecycle, driver table.
 *
 * CRASH-SAFETY INVARIANTS (kept by every metadata change in this driver)
 *  I1  A refcount is on disk before any L1/L2/refcount-table entry or header
 *      field that points at its cluster is written.  (New tables: refcount
 *      blocks written, table written, file flushed, then the pointer.)
 *  I2  Guest data is on disk before the L2 entry that points at it.  Dirty
 *      L2 tables are only written after the refcount cache is written and
 *      the file child flushed (qcow2-cache.c: entry_write).
 *  I3  A host cluster whose refcount is not exactly one (L2 entry without
 *      the COPIED flag, compressed clusters) is never written in place: a
 *      write allocates a new cluster, copies the old data around it, and
 *      drops the old reference afterwards.
 *  I4  A crash at any point leaves an image that check finds free of
 *      corruption; leaks are allowed.  This follows from I1-I3 plus:
 *  I5  A reference is dropped (refcount decremented) only after the entry
 *      that held it was cleared on disk (L2 written back and file flushed),
 *      and only after every data request that looked up the old mapping
 *      has finished (qc_wait_grace), so a freed cluster is never reused
 *      while old I/O still targets it.
 *
 * LOCKING
 *  Qcow2State.lock (the metadata lock) protects L1, both caches, the
 *  refcount table, allocation state, the in-flight list and the header.
 *  Reads and overwrites of allocated clusters hold it only for the lookup;
 *  the data I/O runs unlocked, counted per grace phase (qcow2-io.c).
 *  Allocating writes register an ALLOC entry per guest cluster range;
 *  a later ALLOC overlapping it waits, so one guest cluster is never
 *  allocated twice.  Lock order: core locks -> s->lock; no other lock of
 *  this driver exists.  See docs/design/qcow2.md.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lamina/events.h"
#include "qcow2-cache-sizes.h"
#include "qcow2.h"

static const char *const qcow2_options[] = {
    "file", "backing", "data-file", "lazy-refcounts", "cache-size",
    "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
    "cache-clean-interval", "pass-discard-request", "pass-discard-snapshot",
    "pass-discard-other", "overlap-check", "discard-no-unref", "encrypt",
    NULL,
};

static int qcow2_probe(const uint8_t *buf, int len, const char *filename)
{
    if (len >= 8 && qbe32(buf) == QCOW2_MAGIC && (qbe32(buf + 4) == 2 || qbe32(buf + 4) == 3)) {
        return 100;
    }
    return 0;
}

void qc_signal_corruption(Qcow2State *s, int64_t offset, int64_t size,
                          const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    bool fatal = !s->read_only;
    bool was = atomic_exchange(&s->corrupt, true);
    if (!was && fatal) {
        lam_warn("qcow2: Marking image '%s' as corrupt: %s; further corruption events will be suppressed",
                 s->name, msg);
        if (s->version >= 3) {
            s->incompat |= QCOW2_INCOMPAT_CORRUPT;
            if (qc_write_header_field(s, 72, 8, s->incompat) == 0) {
                lam_co_flush(s->file);
            }
        }
    }
    if (was && fatal) {
        return;
    }
    json_t *d = json_pack("{s:s, s:s, s:s, s:b}", "device", "", "node-name",
                          lam_node_name(s->bs), "msg", msg, "fatal", fatal);
    if (d && offset >= 0) {
        json_object_set_new(d, "offset", json_integer(offset));
        json_object_set_new(d, "size", json_integer(size));
    }
    lam_event_emit("BLOCK_IMAGE_CORRUPTED", d);
}

int qc_write_header_field(Qcow2State *s, int off, int len, uint64_t v)
{
    uint8_t b[8];
    if (len == 8) {
        qst64(b, v);
    } else {
        qst32(b, (uint32_t)v);
    }
    if (s->header_raw && (uint32_t)(off + len) <= s->header_length) {
        memcpy(s->header_raw + off, b, len);
    }
    return lam_co_pwrite(s->file, off, len, b, 0);
}

int qc_mark_dirty(Qcow2State *s)
{
    if (!s->lazy_refcounts || s->marked_dirty || s->version < 3) {
        return 0;
    }
    s->incompat |= QCOW2_INCOMPAT_DIRTY;
    int ret = qc_write_header_field(s, 72, 8, s->incompat);
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    if (ret == 0) {
        s->marked_dirty = true;
    }
    return ret;
}

static int mark_clean(Qcow2State *s)
{
    if (!(s->incompat & QCOW2_INCOMPAT_DIRTY) || s->read_only) {
        return 0;
    }
    int ret = lam_co_flush(s->file);
    if (ret < 0) {
        return ret;
    }
    s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
    ret = qc_write_header_field(s, 72, 8, s->incompat);
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    s->marked_dirty = false;
    return ret;
}

/* Feature name table as QEMU writes it on create. */
void qc_fill_default_feature_table(uint8_t **data, uint32_t *len)
{
    static const struct { uint8_t type, bit; const char *name; } f[] = {
        {0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
        {0, 3, "compression type"}, {0, 4, "extended L2 entries"},
        {1, 0, "lazy refcounts"}, {2, 0, "bitmaps"}, {2, 1, "raw external data"},
    };
    int n = (int)(sizeof(f) / sizeof(f[0]));
    *len = (uint32_t)(n * 48);
    *data = calloc(1, *len);
    if (!*data) {
        *len = 0;
        return;
    }
    for (int i = 0; i < n; i++) {
        (*data)[i * 48] = f[i].type;
        (*data)[i * 48 + 1] = f[i].bit;
        memcpy(*data + i * 48 + 2, f[i].name, strlen(f[i].name));
    }
}

/* Rewrites the first cluster: header, backing format extension, the kept
 * extensions, end marker, backing file name. */
int qc_rewrite_header(Qcow2State *s, const char *backing, const char *fmt,
                      LamError **errp)
{
    int64_t cs = s->cluster_size;
    uint8_t *buf = calloc(1, cs);
    if (!buf) {
        return -ENOMEM;
    }
    size_t blen = backing ? strlen(backing) : 0;
    size_t flen = fmt ? strlen(fmt) : 0;
    if (blen > QCOW2_MAX_BACKING_NAME || flen > QCOW2_MAX_BACKING_NAME) {
        free(buf);
        lam_error_setg(errp, "Could not change the backing file of '%s': backing file name too long",
                       s->name);
        return -EINVAL;
    }
    memcpy(buf, s->header_raw, s->header_length);
    int64_t p = s->header_length;
    if (backing && fmt) {
        qst32(buf + p, QCOW2_EXT_BACKING_FORMAT);
        qst32(buf + p + 4, (uint32_t)flen);
        memcpy(buf + p + 8, fmt, flen);
        p += 8 + qc_align_up((int64_t)flen, 8);
    }
    for (Qcow2Ext *e = s->exts; e; e = e->next) {
        if (p + 8 + qc_align_up(e->len, 8) + 8 > cs) {
            p = cs + 1;
            break;
        }
        qst32(buf + p, e->type);
        qst32(buf + p + 4, e->len);
        memcpy(buf + p + 8, e->data, e->len);
        p += 8 + qc_align_up(e->len, 8);
    }
    p += 8; /* end marker, already zero */
    if (p + (int64_t)blen > cs) {
        free(buf);
        lam_error_setg(errp, "Could not change the backing file of '%s': header extensions and backing file name do not fit in the first cluster",
                       s->name);
        return -ENOSPC;
    }
    qst64(buf + 8, blen ? (uint64_t)p : 0);
    qst32(buf + 16, (uint32_t)blen);
    memcpy(buf + p, backing ? backing : "", blen);
    qst64(buf + 24, (uint64_t)atomic_load(&s->size));
    qst32(buf + 36, s->l1_size);
    qst64(buf + 40, s->l1_offset);
    qst64(buf + 48, s->rt_offset);
    qst32(buf + 56, s->rt_clusters);
    if (s->version >= 3) {
        qst64(buf + 72, s->incompat);
        qst64(buf + 88, s->autoclear);
    }
    int ret = lam_co_pwrite(s->file, 0, cs, buf, 0);
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    if (ret == 0) {
        memcpy(s->header_raw, buf, s->header_length);
    }
    free(buf);
    if (ret < 0) {
        lam_error_setg_errno(errp, ret, "Could not update the header of '%s'", s->name);
    }
    return ret;
}

static void free_exts(Qcow2State *s)
{
    while (s->exts) {
        Qcow2Ext *n = s->exts->next;
        free(s->exts->data);
        free(s->exts);
        s->exts = n;
    }
}

static void feature_names(Qcow2State *s, const uint8_t *table, uint32_t tlen,
                          uint64_t bits, char *out, size_t outlen)
{
    out[0] = '\0';
    for (int b = 0; b < 64; b++) {
        if (!(bits & (1ull << b))) {
            continue;
        }
        char name[64];
        snprintf(name, sizeof(name), "Unknown incompatible feature: %llx",
                 (unsigned long long)(1ull << b));
        for (uint32_t i = 0; table && i + 48 <= tlen; i += 48) {
            if (table[i] == 0 && table[i + 1] == b) {
                snprintf(name, sizeof(name), "%.46s", (const char *)table + i + 2);
            }
        }
        size_t l = strlen(out);
        snprintf(out + l, outlen - l, "%s%s", l ? ", " : "", name);
    }
}

typedef struct Hdr {
    uint64_t backing_off;
    uint32_t backing_len;
    uint32_t crypt;
} Hdr;

/* Open errors carry the bare reason, as QEMU's do: blockdev-add shows it
 * as is and the tools prefix "Could not open 'file': ". */
#define FAIL(...) do { lam_error_setg(errp, __VA_ARGS__); ret = -EINVAL; goto fail; } while (0)

static int read_extensions(Qcow2State *s, const uint8_t *c0, int64_t end,
                           LamNode *bs, LamError **errp)
{
    int ret = 0;
    int64_t p = s->header_length;
    Qcow2Ext **tail = &s->exts;
    while (p + 8 <= end) {
        uint32_t type = qbe32(c0 + p), len = qbe32(c0 + p + 4);
        if (type == QCOW2_EXT_END) {
            break;
        }
        if ((int64_t)len > end - p - 8) {
            FAIL("Invalid header extension length (extension exceeds the header area)");
        }
        const uint8_t *d = c0 + p + 8;
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (len > QCOW2_MAX_BACKING_NAME) {
                FAIL("ERROR: ext_backing_format: len=%u too large", len);
            }
            free(bs->backing_format);
            bs->backing_format = strndup((const char *)d, len);
            if (memchr(d, 0, len)) {
                bs->backing_format[strlen(bs->backing_format)] = '\0';
            }
            p += 8 + qc_align_up(len, 8);
            continue;
        case QCOW2_EXT_CRYPTO:
            FAIL("Encrypted images are not supported");
        case QCOW2_EXT_BITMAPS:
            if (len < 24) {
                FAIL("bitmaps_ext: Invalid extension length");
            }
            s->has_bitmaps_ext = true;
            s->nb_bitmaps = qbe32(d);
            s->bitmaps_dir_size = qbe64(d + 8);
            s->bitmaps_dir_offset = qbe64(d + 16);
            break;
        default:
            break;
        }
        Qcow2Ext *e = calloc(1, sizeof(*e));
        if (!e || !(e->data = malloc(len ? len : 1))) {
            free(e);
            FAIL("Cannot allocate memory");
        }
        e->type = type;
        e->len = len;
        memcpy(e->data, d, len);
        *tail = e;
        tail = &e->next;
        p += 8 + qc_align_up(len, 8);
    }
    return 0;
fail:
    return ret;
}

/* Validates the snapshot table (bounds only: images with snapshots are
 * opened read-only and their tables are only walked by check). */
static int check_snapshots(Qcow2State *s, int64_t file_len, LamError **errp)
{
    int ret = 0;
    if (s->nb_snapshots == 0) {
        return 0;
    }
    if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS) {
        FAIL("Too many snapshots");
    }
    if ((s->snapshots_offset & (s->cluster_size - 1)) ||
        s->snapshots_offset >= (uint64_t)file_len || s->snapshots_offset == 0) {
        FAIL("Snapshot table offset invalid");
    }
    int64_t avail = file_len - (int64_t)s->snapshots_offset;
    if (avail > QCOW2_MAX_SNAPSHOT_TABLE) {
        avail = QCOW2_MAX_SNAPSHOT_TABLE;
    }
    uint8_t *t = malloc(avail);
    if (!t) {
        FAIL("Cannot allocate memory");
    }
    ret = lam_co_pread(s->file, (int64_t)s->snapshots_offset, avail, t, 0);
    if (ret < 0) {
        free(t);
        lam_error_setg_errno(errp, ret, "Could not read snapshot table");
        return ret;
    }
    int64_t p = 0;
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        if (p + 40 > avail) {
            free(t);
            FAIL("Snapshot table beyond end of file or too large");
        }
        uint64_t l1off = qbe64(t + p);
        uint32_t l1sz = qbe32(t + p + 8);
        int64_t entry = 40 + (int64_t)qbe32(t + p + 36) + qbe16(t + p + 12) + qbe16(t + p + 14);
        if ((uint64_t)l1sz * 8 > QCOW2_MAX_L1_BYTES) {
            free(t);
            FAIL("Snapshot L1 table too large");
        }
        if ((l1off & (s->cluster_size - 1)) || l1off + (uint64_t)l1sz * 8 > (uint64_t)file_len) {
            free(t);
            FAIL("Snapshot L1 table offset invalid");
        }
        p += qc_align_up(entry, 8);
    }
    free(t);
    return 0;
fail:
    return ret;
}

static void free_state(Qcow2State *s);

/* Persistent bitmaps are not updated by this driver: on a read-write open
 * they are flagged in-use (inconsistent), which keeps their clusters
 * accounted for, as QEMU does for bitmaps it cannot store back. */
static int mark_bitmaps_in_use(Qcow2State *s)
{
    int64_t sz = (int64_t)s->bitmaps_dir_size;
    if (!s->has_bitmaps_ext || sz <= 0 || sz > 64 * 1024 * 1024 ||
        (s->bitmaps_dir_offset & (s->cluster_size - 1)) ||
        (int64_t)s->bitmaps_dir_offset + sz > s->file_end) {
        return -EINVAL;
    }
    uint8_t *d = malloc(sz);
    if (!d) {
        return -ENOMEM;
    }
    int ret = lam_co_pread(s->file, (int64_t)s->bitmaps_dir_offset, sz, d, 0);
    for (int64_t p = 0; ret == 0 && p + 24 <= sz;) {
        qst32(d + p + 12, qbe32(d + p + 12) | 1);
        p += qc_align_up(24 + (int64_t)qbe32(d + p + 20) + qbe16(d + p + 18), 8);
    }
    if (ret == 0) {
        ret = lam_co_pwrite(s->file, (int64_t)s->bitmaps_dir_offset, sz, d, 0);
    }
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    free(d);
    return ret;
}

static int qcow2_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    Qcow2State *s = bs->opaque;
    int ret = 0;
    uint8_t *c0 = NULL;
    s->bs = bs;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->inflight_cond, NULL);
    s->file = lam_open_child(bs, opts, "file", false, errp);
    if (!s->file) {
        ret = -EINVAL;
        goto fail;
    }
    if (!bs->filename) {
        bs->filename = strdup(lam_node_filename(s->file->node));
    }
    s->name = bs->filename ? bs->filename : "";
    s->read_only = !(flags & LAM_O_RDWR);
    s->no_recheck = lam_debug_no_fleecing_guard();
    int64_t file_len = lam_node_length(s->file->node);
    if (file_len < 0) {
        lam_error_setg_errno(errp, (int)file_len, "Could not get the size of the image file");
        ret = (int)file_len;
        goto fail;
    }
    s->file_end = file_len;
    uint8_t h[112] = {0};
    if (file_len < 72) {
        FAIL("Image is not in qcow2 format");
    }
    ret = lam_co_pread(s->file, 0, file_len < 112 ? file_len : 112, h, 0);
    if (ret < 0) {
        lam_error_setg_errno(errp, ret, "Could not read qcow2 header");
        goto fail;
    }
    if (qbe32(h) != QCOW2_MAGIC) {
        FAIL("Image is not in qcow2 format");
    }
    s->version = (int)qbe32(h + 4);
    if (s->version != 2 && s->version != 3) {
        FAIL("Unsupported qcow2 version %u", qbe32(h + 4));
    }
    Hdr hd = { qbe64(h + 8), qbe32(h + 16), qbe32(h + 32) };
    uint32_t cb = qbe32(h + 20);
    if (cb < QCOW2_MIN_CLUSTER_BITS || cb > QCOW2_MAX_CLUSTER_BITS) {
        FAIL("Unsupported cluster size: 2^%u", cb);
    }
    s->cluster_bits = (int)cb;
    s->cluster_size = 1ll << cb;
    s->l2_bits = (int)cb - 3;
    s->l2_entries = 1ll << s->l2_bits;
    uint64_t size = qbe64(h + 24);
    s->l1_size = qbe32(h + 36);
    s->l1_offset = qbe64(h + 40);
    s->rt_offset = qbe64(h + 48);
    s->rt_clusters = qbe32(h + 56);
    s->nb_snapshots = qbe32(h + 60);
    s->snapshots_offset = qbe64(h + 64);
    if (s->version == 2) {
        s->header_length = 72;
        s->refcount_order = 4;
    } else {
        s->header_length = qbe32(h + 100);
        s->incompat = qbe64(h + 72);
        s->compat = qbe64(h + 80);
        s->autoclear = qbe64(h + 88);
        s->refcount_order = (int)qbe32(h + 96);
        if (s->header_length < 104) {
            FAIL("qcow2 header too short (header_length %u)", s->header_length);
        }
        if (s->header_length > s->cluster_size || (s->header_length & 7)) {
            FAIL("qcow2 header exceeds cluster size or is not a multiple of 8");
        }
    }
    if ((int64_t)s->header_length > file_len) {
        FAIL("qcow2 header beyond end of file");
    }
    /* The whole first cluster: header, extensions, backing name. */
    int64_t c0len = file_len < s->cluster_size ? file_len : s->cluster_size;
    c0 = calloc(1, s->cluster_size);
    s->header_raw = malloc(s->header_length);
    if (!c0 || !s->header_raw) {
        FAIL("Cannot allocate memory");
    }
    ret = lam_co_pread(s->file, 0, c0len, c0, 0);
    if (ret < 0) {
        lam_error_setg_errno(errp, ret, "Could not read qcow2 header");
        goto fail;
    }
    memcpy(s->header_raw, c0, s->header_length);
    if (s->header_length > 104) {
        s->compression_type = c0[104];
    }
    /* Feature name table first, for the unsupported-feature message. */
    const uint8_t *ftable = NULL;
    uint32_t ftlen = 0;
    for (int64_t p = s->header_length; p + 8 <= c0len;) {
        uint32_t t = qbe32(c0 + p), l = qbe32(c0 + p + 4);
        if (t == 0 || (int64_t)l > c0len - p - 8) {
            break;
        }
        if (t == QCOW2_EXT_FEATURE_TABLE) {
            ftable = c0 + p + 8;
            ftlen = l;
        }
        p += 8 + qc_align_up(l, 8);
    }
    uint64_t unknown = s->incompat & ~QCOW2_INCOMPAT_KNOWN;
    if (unknown) {
        char names[512];
        feature_names(s, ftable, ftlen, unknown, names, sizeof(names));
        FAIL("Unsupported qcow2 feature(s): %s", names);
    }
    if (s->incompat & QCOW2_INCOMPAT_DATA_FILE) {
        FAIL("External data files are not supported");
    }
    if (s->incompat & QCOW2_INCOMPAT_EXTL2) {
        FAIL("Extended L2 entries are not supported");
    }
    if (s->incompat & QCOW2_INCOMPAT_COMPRESSION) {
        if (s->header_length <= 104 || s->compression_type == 0) {
            FAIL("Invalid compression type: the compression type bit is set but the field is zero");
        }
    } else if (s->compression_type != 0) {
        FAIL("Invalid compression type %d: the compression type bit is not set",
             s->compression_type);
    }
    if (s->compression_type > QCOW2_COMPRESSION_ZSTD) {
        FAIL("Unknown compression type %d", s->compression_type);
    }
    if (s->refcount_order > 6) {
        FAIL("Reference count entry width too large; may not exceed 64 bits");
    }
    s->refcount_bits = 1 << s->refcount_order;
    s->refcount_max = s->refcount_bits == 64 ? UINT64_MAX : (1ull << s->refcount_bits) - 1;
    s->rb_bits = s->cluster_bits + 3 - s->refcount_order;
    if (hd.crypt != 0) {
        FAIL("Encrypted images are not supported (crypt_method %u)", hd.crypt);
    }
    if (s->incompat & QCOW2_INCOMPAT_CORRUPT && !s->read_only && !(flags & LAM_O_CHECK)) {
        FAIL("qcow2: Image is corrupt; cannot be opened read/write");
    }
    atomic_store(&s->corrupt, (s->incompat & QCOW2_INCOMPAT_CORRUPT) != 0);
    if (size > (uint64_t)INT64_MAX / 2) {
        FAIL("Image size too large");
    }
    atomic_store(&s->size, (int64_t)size);
    /* L1 table */
    if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
        FAIL("Active L1 table too large");
    }
    int64_t l2_span = s->cluster_size << s->l2_bits;
    if ((uint64_t)s->l1_size < (size + l2_span - 1) / l2_span) {
        FAIL("L1 table is too small");
    }
    if (s->l1_size && (s->l1_offset & (s->cluster_size - 1))) {
        FAIL("L1 table offset invalid (not cluster aligned)");
    }
    if (s->l1_size && (s->l1_offset == 0 || s->l1_offset + (uint64_t)s->l1_size * 8 > (uint64_t)file_len)) {
        FAIL("L1 table offset beyond end of file");
    }
    /* refcount table */
    if (s->rt_offset & (s->cluster_size - 1)) {
        FAIL("Refcount table offset invalid (not cluster aligned)");
    }
    if ((uint64_t)s->rt_clusters * s->cluster_size > QCOW2_MAX_RT_BYTES) {
        FAIL("Reference count table too large");
    }
    if (s->rt_clusters == 0 || s->rt_offset == 0 ||
        s->rt_offset + (uint64_t)s->rt_clusters * s->cluster_size > (uint64_t)file_len) {
        FAIL("Refcount table beyond end of file");
    }
    /* backing file name */
    if (hd.backing_off) {
        if (hd.backing_len > QCOW2_MAX_BACKING_NAME) {
            FAIL("Backing file name too long");
        }
        if (hd.backing_off > (uint64_t)s->cluster_size ||
            hd.backing_off + hd.backing_len > (uint64_t)c0len) {
            FAIL("Invalid backing file offset");
        }
    }
    int64_t ext_end = hd.backing_off ? (int64_t)hd.backing_off : c0len;
    if (ext_end > c0len) {
        ext_end = c0len;
    }
    ret = read_extensions(s, c0, ext_end, bs, errp);
    if (ret < 0) {
        goto fail;
    }
    if (hd.backing_off && hd.backing_len) {
        free(bs->backing_file);
        bs->backing_file = strndup((const char *)c0 + hd.backing_off, hd.backing_len);
    }
    ret = check_snapshots(s, file_len, errp);
    if (ret < 0) {
        goto fail;
    }
    if (s->nb_snapshots && !s->read_only && !(flags & LAM_O_CHECK)) {
        FAIL("images with internal snapshots can only be opened read-only");
    }
    s->l1 = calloc(s->l1_size ? s->l1_size : 1, sizeof(uint64_t));
    if (!s->l1) {
        FAIL("Cannot allocate memory");
    }
    if (s->l1_size) {
        uint8_t *buf = malloc((size_t)s->l1_size * 8);
        if (!buf) {
            FAIL("Cannot allocate memory");
        }
        ret = lam_co_pread(s->file, (int64_t)s->l1_offset, (int64_t)s->l1_size * 8, buf, 0);
        for (uint32_t i = 0; ret == 0 && i < s->l1_size; i++) {
            s->l1[i] = qbe64(buf + 8 * i);
        }
        free(buf);
        if (ret < 0) {
            lam_error_setg_errno(errp, ret, "Could not read L1 table");
            goto fail;
        }
    }
    ret = qc_refcount_load_table(s, errp);
    if (ret < 0) {
        goto fail;
    }
    LamError *local = NULL;
    s->lazy_refcounts = lam_opt_bool(opts, "lazy-refcounts",
                                     (s->compat & QCOW2_COMPAT_LAZY_REFCOUNTS) != 0, &local);
    int64_t l2_cache = lam_opt_int(opts, "l2-cache-size", -1, &local);
    int64_t rb_cache = lam_opt_int(opts, "refcount-cache-size", -1, &local);
    int64_t all_cache = lam_opt_int(opts, "cache-size", -1, &local);
    int64_t entry_size = lam_opt_int(opts, "l2-cache-entry-size", s->cluster_size, &local);
    if (local) {
        lam_error_propagate(errp, local);
        ret = -EINVAL;
        goto fail;
    }
    if (all_cache >= 0 && l2_cache >= 0 && rb_cache >= 0) {
        FAIL("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time");
    }
    if (all_cache >= 0 && l2_cache > all_cache) {
        FAIL("l2-cache-size may not exceed cache-size");
    }
    if (all_cache >= 0 && rb_cache > all_cache) {
        FAIL("refcount-cache-size may not exceed cache-size");
    }
    if (entry_size < 512 || entry_size > s->cluster_size || (entry_size & (entry_size - 1))) {
        FAIL("L2 cache entry size must be a power of two between 512 and the cluster size (%lld)",
             (long long)s->cluster_size);
    }
    if (all_cache >= 0) {
        /* Split a total budget: refcounts get a quarter unless told. */
        if (l2_cache >= 0) {
            rb_cache = all_cache - l2_cache;
        } else if (rb_cache >= 0) {
            l2_cache = all_cache - rb_cache;
        } else {
            rb_cache = all_cache / 4;
            l2_cache = all_cache - rb_cache;
        }
    }
    int n_l2, n_rb;
    qc_cache_sizes(s->cluster_size, (int64_t)size, s->l2_entries, l2_cache, rb_cache,
                   &n_l2, &n_rb);
    s->l2_cache = qc_cache_new(n_l2, s->cluster_size, true);
    s->rb_cache = qc_cache_new(n_rb, s->cluster_size, false);
    if (!s->l2_cache || !s->rb_cache) {
        FAIL("Cannot allocate memory");
    }
    s->free_cluster_index = 1;
    if (!s->read_only) {
        if (s->incompat & QCOW2_INCOMPAT_DIRTY) {
            /* Lazy refcounts left them stale: rebuild before any write. */
            LamCheckResult res = {0};
            pthread_mutex_lock(&s->lock);
            ret = qc_check_state(s, &res, LAM_FIX_ERRORS | LAM_FIX_LEAKS);
            pthread_mutex_unlock(&s->lock);
            free(res.msgs);
            if (ret == 0 && res.corruptions) {
                ret = -EIO;
            }
            if (ret < 0) {
                lam_error_setg_errno(errp, ret, "Could not repair dirty image");
                goto fail;
            }
            ret = mark_clean(s);
            if (ret < 0) {
                lam_error_setg_errno(errp, ret, "Could not update header");
                goto fail;
            }
        }
        uint64_t keep = 0;
        if ((s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) && mark_bitmaps_in_use(s) == 0) {
            keep = QCOW2_AUTOCLEAR_BITMAPS;
        }
        if (s->autoclear & ~keep) {
            /* Auto-clear features we do not maintain are cleared before
             * writing, as the specification demands. */
            s->autoclear &= keep;
            ret = qc_write_header_field(s, 88, 8, s->autoclear);
            if (ret == 0) {
                ret = lam_co_flush(s->file);
            }
            if (ret < 0) {
                lam_error_setg_errno(errp, ret, "Could not update header");
                goto fail;
            }
        }
    }
    bs->total_size = (int64_t)size;
    bs->bl.request_alignment = 1;
    bs->bl.pdiscard_alignment = (uint32_t)s->cluster_size;
    bs->bl.pwrite_zeroes_alignment = (uint32_t)s->cluster_size;
    bs->bl.opt_transfer = (uint32_t)s->cluster_size;
    free(c0);
    return 0;
fail:
    free(c0);
    free_state(s);
    memset(s, 0, sizeof(*s));
    if (ret == 0) {
        ret = -EINVAL;
    }
    return ret;
}

static int flush_all(Qcow2State *s)
{
    if (s->read_only) {
        return 0;
    }
    pthread_mutex_lock(&s->lock);
    int ret = qc_flush_metadata(s);
    if (ret == 0) {
        ret = lam_co_flush(s->file);
        if (ret == 0) {
            s->l2_needs_flush = false;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int qcow2_flush(LamNode *bs)
{
    return flush_all(bs->opaque);
}

static int qcow2_inactivate(LamNode *bs)
{
    Qcow2State *s = bs->opaque;
    int ret = flush_all(s);
    if (ret == 0 && s->marked_dirty && !s->read_only) {
        pthread_mutex_lock(&s->lock);
        ret = mark_clean(s);
        pthread_mutex_unlock(&s->lock);
    }
    return ret;
}

static void free_state(Qcow2State *s)
{
    qc_cache_free(s->l2_cache);
    qc_cache_free(s->rb_cache);
    free(s->l1);
    free(s->rt);
    free(s->header_raw);
    free_exts(s);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->inflight_cond);
}

static void qcow2_close(LamNode *bs)
{
    Qcow2State *s = bs->opaque;
    if (s->l2_cache && s->rb_cache && s->file) {
        qcow2_inactivate(bs);
    }
    free_state(s);
}

static int64_t qcow2_get_length(LamNode *bs)
{
    Qcow2State *s = bs->opaque;
    return atomic_load(&s->size);
}

static void qcow2_refresh_limits(LamNode *bs)
{
    Qcow2State *s = bs->opaque;
    bs->bl.request_alignment = 1;
    bs->bl.pdiscard_alignment = (uint32_t)s->cluster_size;
    bs->bl.pwrite_zeroes_alignment = (uint32_t)s->cluster_size;
    bs->bl.opt_transfer = (uint32_t)s->cluster_size;
}

/* The bitmap directory as qemu-img info shows it (NULL if none). */
static json_t *bitmaps_info(Qcow2State *s)
{
    int64_t sz = (int64_t)s->bitmaps_dir_size;
    if (!s->has_bitmaps_ext || !(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) || sz <= 0 ||
        sz > 64 * 1024 * 1024 || (int64_t)s->bitmaps_dir_offset + sz > s->file_end) {
        return NULL;
    }
    uint8_t *d = malloc(sz);
    if (!d || lam_co_pread(s->file, (int64_t)s->bitmaps_dir_offset, sz, d, 0) < 0) {
        free(d);
        return NULL;
    }
    json_t *list = json_array();
    for (int64_t p = 0; p + 24 <= sz;) {
        uint32_t flags = qbe32(d + p + 12);
        uint16_t nlen = qbe16(d + p + 18);
        int64_t name_off = p + 24 + qbe32(d + p + 20);
        if (name_off + nlen > sz || d[p + 17] > 63) {
            break;
        }
        json_t *f = json_array();
        if (flags & 1) {
            json_array_append_new(f, json_string("in-use"));
        }
        if (flags & 2) {
            json_array_append_new(f, json_string("auto"));
        }
        char *name = strndup((const char *)d + name_off, nlen);
        json_array_append_new(list, json_pack("{s:o, s:s, s:I}", "flags", f, "name",
                                              name ? name : "", "granularity",
                                              (json_int_t)(1ll << d[p + 17])));
        free(name);
        p = qc_align_up(name_off + nlen, 8);
    }
    free(d);
    return list;
}

static int qcow2_get_info(LamNode *bs, json_t *out, LamError **errp)
{
    Qcow2State *s = bs->opaque;
    pthread_mutex_lock(&s->lock);
    bool dirty = (s->incompat & QCOW2_INCOMPAT_DIRTY) != 0;
    bool corrupt = atomic_load(&s->corrupt);
    pthread_mutex_unlock(&s->lock);
    json_object_set_new(out, "cluster-size", json_integer(s->cluster_size));
    json_object_set_new(out, "dirty-flag", json_boolean(dirty));
    json_t *data = json_object();
    if (s->version == 2) {
        json_object_set_new(data, "compat", json_string("0.10"));
        json_object_set_new(data, "compression-type",
                            json_string(s->compression_type ? "zstd" : "zlib"));
        json_object_set_new(data, "refcount-bits", json_integer(s->refcount_bits));
    } else {
        json_object_set_new(data, "compat", json_string("1.1"));
        json_object_set_new(data, "compression-type",
                            json_string(s->compression_type ? "zstd" : "zlib"));
        json_object_set_new(data, "lazy-refcounts", json_boolean(s->lazy_refcounts));
        json_t *bm = bitmaps_info(s);
        if (bm) {
            json_object_set_new(data, "bitmaps", bm);
        }
        json_object_set_new(data, "refcount-bits", json_integer(s->refcount_bits));
        json_object_set_new(data, "corrupt", json_boolean(corrupt));
        json_object_set_new(data, "extended-l2", json_false());
    }
    json_t *fs = json_object();
    json_object_set_new(fs, "type", json_string("qcow2"));
    json_object_set_new(fs, "data", data);
    json_object_set_new(out, "format-specific", fs);
    return 0;
}

static int64_t qcow2_get_allocated_size(LamNode *bs)
{
    Qcow2State *s = bs->opaque;
    return lam_node_allocated_size(s->file->node);
}

static int qcow2_change_backing_file(LamNode *bs, const char *file, const char *fmt,
                                     LamError **errp)
{
    Qcow2State *s = bs->opaque;
    if (s->read_only) {
        lam_error_setg(errp, "Could not change the backing file of '%s': image is read-only", s->name);
        return -EACCES;
    }
    pthread_mutex_lock(&s->lock);
    int ret = qc_flush_metadata(s);
    if (ret == 0) {
        ret = qc_rewrite_header(s, file, file ? fmt : NULL, errp);
    } else {
        lam_error_setg_errno(errp, ret, "Could not flush '%s'", s->name);
    }
    pthread_mutex_unlock(&s->lock);
    return ret; /* the core updates bs->backing_file/format */
}

static int qcow2_check_cb(LamNode *bs, LamCheckResult *res, LamCheckMode mode)
{
    return qc_check(bs, res, mode);
}

const LamDriver lam_drv_qcow2 = {
    .name = "qcow2",
    .kind = LAM_DRV_FORMAT,
    .state_size = sizeof(Qcow2State),
    .supports_backing = true,
    .revalidates_backing_reads = true,
    .supported_write_flags = LAM_REQ_WRITE_COMPRESSED | LAM_REQ_NOWAIT,
    .supported_read_flags = LAM_REQ_NOWAIT,
    .supported_zero_flags = LAM_REQ_MAY_UNMAP | LAM_REQ_NO_FALLBACK,
    .option_names = qcow2_options,
    .probe = qcow2_probe,
    .open = qcow2_open,
    .close = qcow2_close,
    .get_length = qcow2_get_length,
    .refresh_limits = qcow2_refresh_limits,
    .get_info = qcow2_get_info,
    .get_allocated_size = qcow2_get_allocated_size,
    .preadv = qc_preadv,
    .pwritev = qc_pwritev,
    .copy_range_from = qc_copy_range_from,
    .copy_range_to = qc_copy_range_to,
    .pwrite_zeroes = qc_pwrite_zeroes,
    .pdiscard = qc_pdiscard,
    .flush = qcow2_flush,
    .block_status = qc_block_status,
    .truncate = qc_truncate,
    .create = qc_create,
    .check = qcow2_check_cb,
    .measure = qc_measure,
    .change_backing_file = qcow2_change_backing_file,
    .inactivate = qcow2_inactivate,
};
