/* The `snapshot-access` driver: a read-only view of the point-in-time
 * snapshot kept by the copy-before-write node below it ("file").  Regions
 * already copied are read from the cbw target, the others from the cbw
 * source while a frozen read makes concurrent copy-before-write wait (see
 * jobs/block-copy.c), so a read never mixes in data written after the
 * snapshot.  Writes fail with ENOTSUP. */
#include <errno.h>
#include <string.h>

#include "jobs/cbw.h"
#include "lamina/driver.h"

typedef struct SnapState {
    LamChild *file;
} SnapState;

static const char *const snap_options[] = {"file", NULL};

static int snap_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    SnapState *s = bs->opaque;
    s->file = lam_open_child(bs, opts, "file", false, errp);
    if (!s->file) {
        return -EINVAL;
    }
    bs->bl = *lam_node_limits(s->file->node);
    bs->filename = strdup(lam_node_filename(s->file->node));
    return 0;
}

static int64_t snap_get_length(LamNode *bs)
{
    SnapState *s = bs->opaque;
    return lam_node_length(s->file->node);
}

static int snap_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    SnapState *s = bs->opaque;
    LamBlockCopy *bcs = lam_cbw_block_copy(s->file->node);
    if (!bcs) {
        return -EINVAL; /* not over a copy-before-write node */
    }
    if (lam_cbw_snapshot_broken(s->file->node)) {
        return -EACCES;
    }
    return lam_block_copy_snapshot_read(bcs, off, bytes, qiov, 0);
}

static int snap_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    return -ENOTSUP;
}

static int snap_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    return -ENOTSUP;
}

/* Drops the range from the snapshot and frees its space in the target.
 * Only with discard=unmap on this node; otherwise discard is ignored. */
static int snap_pdiscard(LamNode *bs, int64_t off, int64_t bytes)
{
    SnapState *s = bs->opaque;
    const char *mode = lam_opt_str(lam_node_options(bs), "discard", "ignore");
    LamBlockCopy *bcs = lam_cbw_block_copy(s->file->node);
    if (strcmp(mode, "unmap") != 0 || !bcs) {
        return 0;
    }
    return lam_block_copy_snapshot_discard(bcs, off, bytes);
}

static int snap_flush(LamNode *bs)
{
    return 0;
}

static int snap_block_status(LamNode *bs, int64_t off, int64_t bytes, int64_t *pnum,
                             int64_t *map, LamNode **file)
{
    *pnum = bytes;
    return LAM_BS_DATA | LAM_BS_ALLOCATED;
}

static void snap_child_perm(LamNode *bs, LamChild *c, uint64_t parent_perm,
                            uint64_t parent_shared, uint64_t *perm, uint64_t *shared)
{
    /* Only reads go down; everyone else may do anything. */
    *perm = LAM_PERM_CONSISTENT_READ;
    *shared = LAM_PERM_ALL;
}

const LamDriver lam_drv_snapshot_access = {
    .name = "snapshot-access",
    .kind = LAM_DRV_FILTER,
    .state_size = sizeof(SnapState),
    .option_names = snap_options,
    .open = snap_open,
    .get_length = snap_get_length,
    .preadv = snap_preadv,
    .pwritev = snap_pwritev,
    .pwrite_zeroes = snap_pwrite_zeroes,
    .pdiscard = snap_pdiscard,
    .flush = snap_flush,
    .block_status = snap_block_status,
    .child_perm = snap_child_perm,
};

__attribute__((constructor)) static void snap_register(void)
{
    lam_driver_register(&lam_drv_snapshot_access);
}
