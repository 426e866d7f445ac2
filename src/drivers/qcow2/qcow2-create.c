/* Image creation (blockdev-create), size measurement (qemu-img measure)
 * and resizing. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

typedef struct CreateOpts {
    int64_t size;
    int version;
    int64_t cluster_size;
    int cluster_bits;
    int refcount_order;
    bool lazy;
    LamPrealloc prealloc;
    const char *backing, *backing_fmt;
    int compression;
} CreateOpts;

static int ilog2(int64_t v)
{
    int b = 0;
    while ((1ll << b) < v) {
        b++;
    }
    return b;
}

/* Parses creation options shared by create and measure. */
static int parse_opts(json_t *o, CreateOpts *c, bool need_size, LamError **errp)
{
    LamError *local = NULL;
    memset(c, 0, sizeof(*c));
    c->size = lam_opt_int(o, "size", -1, &local);
    const char *ver = lam_opt_str(o, "version", "v3");
    c->cluster_size = lam_opt_int(o, "cluster-size", 65536, &local);
    int64_t rbits = lam_opt_int(o, "refcount-bits", 16, &local);
    c->lazy = lam_opt_bool(o, "lazy-refcounts", false, &local);
    const char *pre = lam_opt_str(o, "preallocation", "off");
    c->backing = lam_opt_str(o, "backing-file", NULL);
    c->backing_fmt = lam_opt_str(o, "backing-fmt", NULL);
    const char *ct = lam_opt_str(o, "compression-type", "zlib");
    bool extl2 = lam_opt_bool(o, "extended-l2", false, &local);
    if (local) {
        lam_error_propagate(errp, local);
        return -EINVAL;
    }
    if (extl2) {
        lam_error_setg(errp, "Extended L2 entries are not supported");
        return -ENOTSUP;
    }
    if (json_object_get(o, "data-file") || json_object_get(o, "encrypt")) {
        lam_error_setg(errp, "%s is not supported",
                       json_object_get(o, "data-file") ? "External data file" : "Encryption");
        return -ENOTSUP;
    }
    if (need_size && c->size < 0) {
        lam_error_setg(errp, "Parameter 'size' is missing");
        return -EINVAL;
    }
    if (c->size % 512) {
        lam_error_setg(errp, "Image size must be a multiple of 512 bytes");
        return -EINVAL;
    }
    if (!strcmp(ver, "v2") || !strcmp(ver, "0.10")) {
        c->version = 2;
    } else if (!strcmp(ver, "v3") || !strcmp(ver, "1.1")) {
        c->version = 3;
    } else {
        lam_error_setg(errp, "Invalid parameter '%s'", ver);
        return -EINVAL;
    }
    if (c->cluster_size < 512 || c->cluster_size > 2 * 1024 * 1024 ||
        (c->cluster_size & (c->cluster_size - 1))) {
        lam_error_setg(errp, "Cluster size must be a power of two between 512 and 2048k");
        return -EINVAL;
    }
    c->cluster_bits = ilog2(c->cluster_size);
    if (rbits < 1 || rbits > 64 || (rbits & (rbits - 1))) {
        lam_error_setg(errp, "Refcount width must be a power of two and may not exceed 64 bits");
        return -EINVAL;
    }
    c->refcount_order = ilog2(rbits);
    if (c->version == 2 && rbits != 16) {
        lam_error_setg(errp, "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (c->version == 2 && c->lazy) {
        lam_error_setg(errp, "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (lam_prealloc_parse(pre, &c->prealloc) < 0) {
        lam_error_setg(errp, "Invalid parameter '%s'", pre);
        return -EINVAL;
    }
    if (!strcmp(ct, "zlib")) {
        c->compression = QCOW2_COMPRESSION_ZLIB;
    } else if (!strcmp(ct, "zstd")) {
        c->compression = QCOW2_COMPRESSION_ZSTD;
    } else {
        lam_error_setg(errp, "Invalid parameter '%s'", ct);
        return -EINVAL;
    }
    if (c->version == 2 && c->compression != QCOW2_COMPRESSION_ZLIB) {
        lam_error_setg(errp, "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (c->backing_fmt && !c->backing) {
        lam_error_setg(errp, "Backing format cannot be used without backing file");
        return -EINVAL;
    }
    if (c->backing && c->prealloc != LAM_PREALLOC_OFF) {
        lam_error_setg(errp, "Backing file and preallocation can only be used at the same time if extended_l2 is on");
        return -EINVAL;
    }
    if (c->backing && strlen(c->backing) > QCOW2_MAX_BACKING_NAME) {
        lam_error_setg(errp, "Backing file name too long");
        return -EINVAL;
    }
    int64_t l2_span = c->cluster_size * (c->cluster_size / 8);
    if (qc_div_up(c->size, l2_span) * 8 > QCOW2_MAX_L1_BYTES) {
        lam_error_setg(errp, "The image size is too large for file format 'qcow2' (try using a larger cluster size)");
        return -EINVAL;
    }
    return 0;
}

static void put_ext(uint8_t *buf, int64_t *p, uint32_t type, const void *d, uint32_t len)
{
    qst32(buf + *p, type);
    qst32(buf + *p + 4, len);
    memcpy(buf + *p + 8, d, len);
    *p += 8 + qc_align_up(len, 8);
}

int qc_create(json_t *opts, LamError **errp)
{
    CreateOpts c;
    int ret = parse_opts(opts, &c, true, errp);
    if (ret < 0) {
        return ret;
    }
    json_t *fo = json_object_get(opts, "file");
    if (!json_is_string(fo)) {
        lam_error_setg(errp, "Parameter 'file' must be the node-name of an opened file node");
        return -EINVAL;
    }
    const char *fname = json_string_value(fo);
    LamNode *fnode = lam_node_find(fname);
    if (!fnode) {
        lam_error_setg(errp, "Cannot find device='' nor node-name='%s'", fname);
        return -ENOENT;
    }
    const char *imgname = lam_node_filename(fnode);
    int64_t cs = c.cluster_size;
    int64_t rbe = (cs * 8) >> c.refcount_order;
    int64_t l2_span = cs * (cs / 8);
    int64_t l1_entries = qc_div_up(c.size, l2_span);
    int64_t l1c = qc_div_up(l1_entries * 8, cs);
    int64_t nt = 1, k = 1;
    for (;;) {
        int64_t total = 1 + nt + k + l1c;
        int64_t k2 = qc_div_up(total, rbe);
        int64_t nt2 = qc_div_up(k2 * 8, cs);
        if (k2 == k && nt2 == nt) {
            break;
        }
        k = k2;
        nt = nt2;
    }
    int64_t total = 1 + nt + k + l1c;
    size_t blen = c.backing ? strlen(c.backing) : 0;
    uint8_t *buf = calloc(1, (size_t)(total * cs));
    if (!buf) {
        lam_error_setg(errp, "Could not create '%s': Cannot allocate memory", imgname);
        return -ENOMEM;
    }
    /* header */
    qst32(buf, QCOW2_MAGIC);
    qst32(buf + 4, (uint32_t)c.version);
    qst32(buf + 20, (uint32_t)c.cluster_bits);
    qst64(buf + 24, (uint64_t)c.size);
    qst32(buf + 36, (uint32_t)l1_entries);
    qst64(buf + 40, (uint64_t)((1 + nt + k) * cs));
    qst64(buf + 48, (uint64_t)cs);
    qst32(buf + 56, (uint32_t)nt);
    int64_t p = 72;
    if (c.version >= 3) {
        uint64_t incompat = c.compression ? QCOW2_INCOMPAT_COMPRESSION : 0;
        qst64(buf + 72, incompat);
        qst64(buf + 80, c.lazy ? QCOW2_COMPAT_LAZY_REFCOUNTS : 0);
        qst32(buf + 96, (uint32_t)c.refcount_order);
        qst32(buf + 100, 112);
        buf[104] = (uint8_t)c.compression;
        p = 112;
    }
    if (c.backing_fmt) {
        put_ext(buf, &p, QCOW2_EXT_BACKING_FORMAT, c.backing_fmt, (uint32_t)strlen(c.backing_fmt));
    }
    if (c.version >= 3) {
        uint8_t *ft;
        uint32_t ftl;
        qc_fill_default_feature_table(&ft, &ftl);
        if (ft && p + 8 + ftl + 8 + (int64_t)blen <= cs) {
            put_ext(buf, &p, QCOW2_EXT_FEATURE_TABLE, ft, ftl);
        }
        free(ft);
    }
    p += 8; /* end of extensions */
    if (c.backing) {
        if (p + (int64_t)blen > cs) {
            free(buf);
            lam_error_setg(errp, "Could not create '%s': backing file name does not fit in the header cluster", imgname);
            return -EINVAL;
        }
        qst64(buf + 8, (uint64_t)p);
        qst32(buf + 16, (uint32_t)blen);
        memcpy(buf + p, c.backing, blen);
    }
    /* refcount table and blocks: every cluster of this layout counts 1 */
    for (int64_t j = 0; j < k; j++) {
        qst64(buf + cs + 8 * j, (uint64_t)((1 + nt + j) * cs));
    }
    for (int64_t ci = 0; ci < total; ci++) {
        uint8_t *blk = buf + (1 + nt + ci / rbe) * cs;
        qc_rb_set(blk, c.refcount_order, ci % rbe, 1);
    }
    LamChild *root = lam_root_attach(fnode, "qcow2 image creation",
                                     LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE | LAM_PERM_RESIZE,
                                     LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE_UNCHANGED, errp);
    if (!root) {
        free(buf);
        return -EPERM;
    }
    /* Root edges may not write past the end: size the file first. */
    ret = lam_co_truncate(root, 0, false, LAM_PREALLOC_OFF, NULL);
    if (ret == 0) {
        ret = lam_co_truncate(root, total * cs, false, LAM_PREALLOC_OFF, NULL);
    }
    if (ret == 0) {
        ret = lam_co_pwrite(root, 0, total * cs, buf, 0);
    }
    if (ret == 0) {
        ret = lam_co_flush(root);
    }
    free(buf);
    lam_root_detach(root);
    if (ret < 0) {
        lam_error_setg_errno(errp, ret, "Could not write qcow2 header to '%s'", imgname);
        return ret;
    }
    if (c.prealloc != LAM_PREALLOC_OFF && c.size > 0) {
        json_t *o = json_pack("{s:s, s:s, s:n}", "driver", "qcow2", "file", fname, "backing");
        LamNode *bs = lam_node_open(o, LAM_O_RDWR, errp);
        json_decref(o);
        if (!bs) {
            return -EIO;
        }
        if (lam_node_driver(bs) != &lam_drv_qcow2) {
            lam_node_unref(bs);
            return -EIO;
        }
        ret = qc_preallocate(bs->opaque, 0, c.size, c.prealloc, errp);
        lam_node_unref(bs);
    }
    return ret;
}

/* Refcount table + blocks needed to count `clusters` clusters plus
 * themselves. */
static int64_t refcount_meta_size(int64_t clusters, int64_t cs, int order)
{
    int64_t rbe = (cs * 8) >> order;
    int64_t table = 0, blocks = 0, total = 0, last;
    do { /* until blocks and table both stop growing */
        last = total;
        blocks = qc_div_up(clusters + table + blocks, rbe);
        table = qc_div_up(blocks, cs / 8);
        total = blocks + table;
    } while (total != last);
    return (blocks + table) * cs;
}

/* Size of a fully allocated image of `size` bytes. */
static int64_t full_size(int64_t size, int64_t cs, int order)
{
    int64_t aligned = qc_align_up(size, cs);
    int64_t meta = cs; /* header */
    int64_t l2e = qc_align_up(aligned / cs, cs / 8);
    meta += l2e * 8;
    int64_t l1e = qc_align_up(l2e * 8 / cs, cs / 8);
    meta += l1e * 8;
    meta += refcount_meta_size((meta + aligned) / cs, cs, order);
    return meta + aligned;
}

int qc_measure(json_t *fmt_opts, LamNode *in, int64_t size, LamMeasure *out,
               LamError **errp)
{
    CreateOpts c;
    json_t *o = fmt_opts ? json_deep_copy(fmt_opts) : json_object();
    if (in) {
        size = lam_node_length(in);
        if (size < 0) {
            json_decref(o);
            lam_error_setg_errno(errp, (int)size, "Could not get the size of the input");
            return (int)size;
        }
    }
    json_object_set_new(o, "size", json_integer(qc_align_up(size, 512)));
    int ret = parse_opts(o, &c, true, errp);
    json_decref(o);
    if (ret < 0) {
        return ret;
    }
    int64_t cs = c.cluster_size;
    int64_t vsize = qc_align_up(c.size, cs);
    int64_t required = 0; /* data: only what the input has allocated */
    if (in) {
        LamChild *root = lam_root_attach(in, "qcow2 measure", LAM_PERM_CONSISTENT_READ,
                                         LAM_PERM_ALL, errp);
        if (!root) {
            return -EPERM;
        }
        required = 0;
        int64_t off = 0;
        while (off < size) {
            int64_t pnum = 0, map = 0;
            LamNode *file = NULL;
            int depth = 0;
            int r = lam_co_block_status_above(root, NULL, off, size - off, &pnum, &map,
                                              &file, &depth);
            if (r < 0 || pnum <= 0) {
                lam_root_detach(root);
                lam_error_setg_errno(errp, r < 0 ? r : -EIO, "Unable to get block status");
                return r < 0 ? r : -EIO;
            }
            if (!(r & LAM_BS_ZERO) && (r & LAM_BS_DATA)) {
                /* Count each touched cluster once. */
                int64_t end = qc_align_up(off + pnum, cs);
                required += end - off / cs * cs;
                pnum = end - off;
            }
            off += pnum;
        }
        lam_root_detach(root);
    }
    out->fully_allocated = full_size(c.size, cs, c.refcount_order);
    if (c.prealloc == LAM_PREALLOC_FALLOC || c.prealloc == LAM_PREALLOC_FULL) {
        required = vsize; /* the data is written or reserved up front */
    }
    out->required = out->fully_allocated - vsize + required;
    return 0;
}

static int tail_allocated(Qcow2State *s, int64_t from, int64_t to, bool *alloc)
{
    *alloc = false;
    for (int64_t off = from; off < to;) {
        int64_t run;
        uint64_t e;
        int t = qc_lookup(s, off, to - off, &run, &e);
        if (t < 0) {
            return t;
        }
        if (t != QC_UNALLOC) {
            *alloc = true;
            return 0;
        }
        off += run;
    }
    return 0;
}

int qc_truncate(LamNode *bs, int64_t size, bool exact, LamPrealloc prealloc,
                LamError **errp)
{
    Qcow2State *s = bs->opaque;
    int64_t cs = s->cluster_size;
    if (s->read_only) {
        lam_error_setg(errp, "Could not resize '%s': image is read-only", s->name);
        return -EACCES;
    }
    if (s->nb_snapshots) {
        lam_error_setg(errp, "Can't resize an image which has snapshots");
        return -ENOTSUP;
    }
    if (size < 0 || size % 512) {
        lam_error_setg(errp, "The new size must be a multiple of 512");
        return -EINVAL;
    }
    if (atomic_load(&s->corrupt)) {
        lam_error_setg(errp, "Could not resize '%s': image is corrupt", s->name);
        return -EIO;
    }
    pthread_mutex_lock(&s->lock);
    int64_t old = atomic_load(&s->size);
    int ret = 0;
    if (size < old) {
        bool alloc;
        ret = tail_allocated(s, qc_align_up(size, cs), qc_align_up(old, cs), &alloc);
        if (ret == 0 && alloc && !exact) {
            pthread_mutex_unlock(&s->lock);
            lam_error_setg(errp, "Could not shrink '%s': the area beyond the new size is allocated",
                           s->name);
            return -ENOTSUP;
        }
        if (ret == 0 && alloc) {
            /* qemu-img resize --shrink: the data beyond the end goes. */
            pthread_mutex_unlock(&s->lock);
            ret = qc_deallocate(s, qc_align_up(size, cs), qc_align_up(old, cs) - qc_align_up(size, cs));
            pthread_mutex_lock(&s->lock);
        }
    } else if (size > old) {
        int64_t l2_span = cs << s->l2_bits;
        ret = qc_grow_l1(s, qc_div_up(size, l2_span));
    }
    if (ret == 0) {
        ret = qc_mark_dirty(s);
    }
    if (ret == 0) {
        ret = qc_flush_metadata(s);
    }
    if (ret == 0) {
        ret = qc_write_header_field(s, 24, 8, (uint64_t)size);
    }
    if (ret == 0) {
        ret = lam_co_flush(s->file);
    }
    if (ret == 0) {
        atomic_store(&s->size, size);
        bs->total_size = size;
    }
    pthread_mutex_unlock(&s->lock);
    if (ret < 0) {
        lam_error_setg_errno(errp, ret, "Could not resize '%s'", s->name);
        return ret;
    }
    if (size > old && old % cs) {
        /* The old last cluster may hold stale bytes past the old end. */
        int64_t end = qc_align_up(old, cs) < size ? qc_align_up(old, cs) : size;
        ret = qc_pwrite_zeroes(bs, old, end - old, 0);
        if (ret < 0) {
            lam_error_setg_errno(errp, ret, "Could not resize '%s'", s->name);
            return ret;
        }
    }
    if (size > old && prealloc != LAM_PREALLOC_OFF) {
        ret = qc_preallocate(s, old, size, prealloc, errp);
    }
    return ret;
}
