/* The `raw` format driver: the guest sees the file's bytes, optionally a
 * window [offset, offset+size) of them.
 *
 * Probed raw images (opened without an explicit format) refuse writes
 * that would make sector 0 probe as another format: a guest owning the
 * disk could otherwise plant a qcow2 header naming any host file as its
 * backing file, to be followed on the next probing open. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "lamina/driver.h"

typedef struct RawState {
    LamChild *file;
    int64_t offset;
    int64_t size;      /* -1: up to the end of the file */
} RawState;

static const char *const raw_options[] = {"file", "offset", "size", NULL};

static int64_t raw_get_length(LamNode *bs)
{
    RawState *s = bs->opaque;
    if (s->size >= 0) {
        return s->size;
    }
    int64_t len = lam_node_length(s->file->node);
    if (len < 0) {
        return len;
    }
    len = len > s->offset ? len - s->offset : 0;
    /* Whole sectors, as QEMU shows them: the tail past the file's end reads
     * as zeroes and a write there grows the file. */
    return (len + 511) & ~(int64_t)511;
}

static int raw_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    RawState *s = bs->opaque;
    LamError *err = NULL;
    s->offset = lam_opt_int(opts, "offset", 0, &err);
    s->size = lam_opt_int(opts, "size", -1, &err);
    if (err) {
        lam_error_propagate(errp, err);
        return -EINVAL;
    }
    if (s->offset < 0) {
        lam_error_setg(errp, "offset cannot be negative");
        return -EINVAL;
    }
    if (json_object_get(opts, "size") && s->size < 0) {
        lam_error_setg(errp, "size cannot be negative");
        return -EINVAL;
    }
    s->file = lam_open_child(bs, opts, "file", false, errp);
    if (!s->file) {
        return -EINVAL;
    }
    int64_t flen = lam_node_length(s->file->node);
    if (flen >= 0 && (s->offset > flen ||
                      (s->size >= 0 && s->offset + s->size > flen))) {
        lam_error_setg(errp, "The sum of offset (%" PRId64 ") and size (%" PRId64
                       ") has to be smaller or equal to the  actual size of the "
                       "containing file (%" PRId64 ")", s->offset,
                       s->size >= 0 ? s->size : 0, flen);
        return -EINVAL;
    }
    bs->bl = *lam_node_limits(s->file->node);
    return 0;
}

static void raw_refresh_limits(LamNode *bs)
{
    RawState *s = bs->opaque;
    uint32_t keep = bs->bl.request_alignment;
    bs->bl = *lam_node_limits(s->file->node);
    if (keep > bs->bl.request_alignment) {
        bs->bl.request_alignment = keep;
    }
}

static int raw_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    RawState *s = bs->opaque;
    return lam_co_preadv(s->file, off + s->offset, bytes, qiov, flags);
}

/* Sector 0 of a probed raw image must keep probing as raw. */
static int check_sector0(LamNode *bs, int64_t off, LamIOV *qiov, uint8_t *copy)
{
    if (!bs->probed_raw || off != 0) {
        return 0;
    }
    lam_iov_to_buf(qiov, 0, copy, 512);
    const char *fmt = lam_probe_format(copy, 512, NULL);
    return strcmp(fmt, "raw") ? -EPERM : 1;
}

static int raw_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    RawState *s = bs->opaque;
    if (s->size >= 0 && off + bytes > s->size) {
        return -ENOSPC;
    }
    uint8_t sector0[512];
    int chk = bytes >= 512 ? check_sector0(bs, off, qiov, sector0) : 0;
    if (chk < 0) {
        return chk;
    }
    if (chk == 1) {
        /* Write the checked copy, not the caller's buffer, which could
         * change between the check and the write. */
        LamIOV q;
        lam_iov_init(&q, qiov->niov + 1);
        lam_iov_add(&q, sector0, 512);
        lam_iov_concat(&q, qiov, 512, (size_t)bytes - 512);
        int ret = lam_co_pwritev(s->file, off + s->offset, bytes, &q, flags);
        lam_iov_destroy(&q);
        return ret;
    }
    return lam_co_pwritev(s->file, off + s->offset, bytes, qiov, flags);
}

static int raw_copy_range_from(LamNode *bs, LamChild *src, int64_t off,
                               LamChild *dst, int64_t dst_off, int64_t bytes,
                               int flags)
{
    RawState *s = bs->opaque;
    (void)src;
    return lam_co_copy_range(s->file, off + s->offset, dst, dst_off, bytes, flags);
}

static int raw_copy_range_to(LamNode *bs, LamChild *src, int64_t src_off,
                             LamChild *dst, int64_t off, int64_t bytes, int flags)
{
    RawState *s = bs->opaque;
    (void)dst;
    if (s->size >= 0 && off + bytes > s->size) {
        return -ENOSPC;
    }
    /* Sector 0 of a probed raw image is checked in the data: read it. */
    if (bs->probed_raw && off < 512) {
        return -ENOTSUP;
    }
    return lam_co_copy_range_to(src, src_off, s->file, off + s->offset, bytes, flags);
}

static int raw_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    RawState *s = bs->opaque;
    /* Zeroes in sector 0 always probe as raw: no check needed. */
    return lam_co_pwrite_zeroes(s->file, off + s->offset, bytes, flags);
}

static int raw_pdiscard(LamNode *bs, int64_t off, int64_t bytes)
{
    RawState *s = bs->opaque;
    return lam_co_pdiscard(s->file, off + s->offset, bytes);
}

static int raw_block_status(LamNode *bs, int64_t off, int64_t bytes,
                            int64_t *pnum, int64_t *map, LamNode **file)
{
    RawState *s = bs->opaque;
    int ret = lam_co_block_status(s->file, off + s->offset, bytes, pnum, map, file);
    if (ret < 0) {
        return ret;
    }
    if (*pnum == 0) {
        /* The sector tail past the file's end: zeroes, still at a place
         * in the file (a write there grows it). */
        *pnum = bytes;
        *map = off + s->offset;
        *file = s->file->node;
        ret = LAM_BS_ZERO | LAM_BS_OFFSET_VALID;
    }
    return (ret & ~LAM_BS_EOF) | LAM_BS_ALLOCATED;
}

static int raw_truncate(LamNode *bs, int64_t size, bool exact, LamPrealloc prealloc,
                        LamError **errp)
{
    RawState *s = bs->opaque;
    if (s->size >= 0 || s->offset) {
        lam_error_setg(errp, "Cannot resize a raw node with offset or size options");
        return -ENOTSUP;
    }
    return lam_co_truncate(s->file, size, exact, prealloc, errp);
}

static int raw_create(json_t *opts, LamError **errp)
{
    /* blockdev-create for raw: the file node already exists; nothing to
     * lay out but its size. */
    const char *fname = lam_opt_str(opts, "file", NULL);
    LamNode *file = fname ? lam_node_find(fname) : NULL;
    if (!file) {
        lam_error_setg(errp, "Cannot find device='' nor node-name='%s'", fname ? fname : "");
        return -ENOENT;
    }
    LamError *err = NULL;
    int64_t size = lam_opt_int(opts, "size", 0, &err);
    if (err) {
        lam_error_propagate(errp, err);
        return -EINVAL;
    }
    LamChild *c = lam_root_attach(file, "raw create", LAM_PERM_WRITE | LAM_PERM_RESIZE,
                                  LAM_PERM_ALL, errp);
    if (!c) {
        return -EPERM;
    }
    int ret = lam_co_truncate(c, size, true, LAM_PREALLOC_OFF, errp);
    lam_root_detach(c);
    return ret;
}

static int raw_measure(json_t *fmt_opts, LamNode *in, int64_t size, LamMeasure *out,
                       LamError **errp)
{
    if (in) {
        size = lam_node_length(in);
        if (size < 0) {
            lam_error_setg_errno(errp, (int)size, "Unable to get image virtual_size");
            return (int)size;
        }
    }
    out->required = size;
    out->fully_allocated = size;
    return 0;
}

static int raw_probe(const uint8_t *buf, int len, const char *filename)
{
    return 1; /* the format of last resort */
}

const LamDriver lam_drv_raw = {
    .name = "raw",
    .kind = LAM_DRV_FORMAT,
    .state_size = sizeof(RawState),
    .supported_write_flags = LAM_REQ_FUA | LAM_REQ_NOWAIT, /* passed on */
    .supported_read_flags = LAM_REQ_NOWAIT,
    .supported_zero_flags = LAM_REQ_FUA | LAM_REQ_MAY_UNMAP | LAM_REQ_NO_FALLBACK,
    .option_names = raw_options,
    .probe = raw_probe,
    .open = raw_open,
    .get_length = raw_get_length,
    .refresh_limits = raw_refresh_limits,
    .preadv = raw_preadv,
    .pwritev = raw_pwritev,
    .copy_range_from = raw_copy_range_from,
    .copy_range_to = raw_copy_range_to,
    .pwrite_zeroes = raw_pwrite_zeroes,
    .pdiscard = raw_pdiscard,
    .block_status = raw_block_status,
    .truncate = raw_truncate,
    .create = raw_create,
    .measure = raw_measure,
};
