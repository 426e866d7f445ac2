/* `null-co`: a device of a given size that stores nothing.  For tests and
 * benchmarks of everything above the storage. */
#include <errno.h>
#include <string.h>
#include <time.h>

#include "lamina/driver.h"

typedef struct NullState {
    int64_t latency_ns;
    bool read_zeroes;
} NullState;

static const char *const null_options[] = {"size", "latency-ns", "read-zeroes", NULL};

static int null_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    NullState *s = bs->opaque;
    LamError *err = NULL;
    int64_t size = lam_opt_int(opts, "size", 1LL << 30, &err);
    s->latency_ns = lam_opt_int(opts, "latency-ns", 0, &err);
    s->read_zeroes = lam_opt_bool(opts, "read-zeroes", false, &err);
    if (err) {
        lam_error_propagate(errp, err);
        return -EINVAL;
    }
    if (size < 0 || s->latency_ns < 0) {
        lam_error_setg(errp, "null-co: size and latency-ns must not be negative");
        return -EINVAL;
    }
    atomic_store(&bs->total_size, size);
    bs->filename = strdup("null-co://");
    return 0;
}

static void delay(NullState *s)
{
    if (s->latency_ns) {
        struct timespec ts = {s->latency_ns / 1000000000, s->latency_ns % 1000000000};
        nanosleep(&ts, NULL);
    }
}

static int null_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    NullState *s = bs->opaque;
    delay(s);
    if (s->read_zeroes) {
        lam_iov_memset(qiov, 0, 0, (size_t)bytes);
    }
    return 0;
}

static int null_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    delay(bs->opaque);
    return 0;
}

static int null_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    delay(bs->opaque);
    return 0;
}

static int null_flush(LamNode *bs)
{
    return 0;
}

static int null_block_status(LamNode *bs, int64_t off, int64_t bytes,
                             int64_t *pnum, int64_t *map, LamNode **file)
{
    NullState *s = bs->opaque;
    *pnum = bytes;
    *map = off;
    *file = bs;
    return LAM_BS_OFFSET_VALID | LAM_BS_ALLOCATED |
           (s->read_zeroes ? LAM_BS_ZERO : LAM_BS_DATA);
}

const LamDriver lam_drv_null_co = {
    .name = "null-co",
    .kind = LAM_DRV_PROTOCOL,
    .state_size = sizeof(NullState),
    .supported_write_flags = LAM_REQ_FUA,
    .supported_zero_flags = LAM_REQ_FUA | LAM_REQ_MAY_UNMAP | LAM_REQ_NO_FALLBACK,
    .option_names = null_options,
    .open = null_open,
    .preadv = null_preadv,
    .pwritev = null_pwritev,
    .pwrite_zeroes = null_pwrite_zeroes,
    .flush = null_flush,
    .block_status = null_block_status,
};
