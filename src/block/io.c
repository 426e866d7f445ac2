/* The request path.
 *
 * Every request enters through an edge (lam_co_*).  Root edges are counted
 * for drain and range-checked against the node's length; then the node
 * level (lam_node_*) aligns the request to bl.request_alignment (padding
 * reads, read-modify-write for writes), registers it as a tracked request,
 * splits it at bl.max_transfer and calls the driver, emulating what the
 * driver lacks (see include/lamina/driver.h).
 *
 * Tracked requests: each node keeps the list of its in-flight requests
 * under reqs_lock.  A SERIALISING request waits until no overlapping
 * request is in flight and makes overlapping newcomers wait until it is
 * done.  Unaligned writes are serialising over their aligned range so that
 * two read-modify-write cycles on one block can't lose each other's bytes;
 * copy-before-write into a fleecing image is serialising so that a reader
 * falling through to the live disk never sees newer data (seed 001).
 *
 * LAM_REQ_NOWAIT (block.h) is refused with -EAGAIN wherever this layer
 * would wait or can't vouch for the driver: a driver that does not claim
 * it, an overlapping serialising request, read-modify-write, FUA.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "block/block-int.h"

#define ZERO_BUF_SIZE (1 << 20)

static void *zero_buf;
static pthread_once_t zero_once = PTHREAD_ONCE_INIT;

static void zero_buf_init(void)
{
    /* Aligned for O_DIRECT nodes; never written after this. */
    if (posix_memalign(&zero_buf, 4096, ZERO_BUF_SIZE)) {
        abort();
    }
    memset(zero_buf, 0, ZERO_BUF_SIZE);
}

static const void *get_zero_buf(void)
{
    pthread_once(&zero_once, zero_buf_init);
    return zero_buf;
}

static void *blk_alloc(LamNode *bs, size_t len)
{
    void *p;
    size_t align = bs->bl.min_mem_alignment > 64 ? bs->bl.min_mem_alignment : 64;
    if (posix_memalign(&p, align, len ? len : 1)) {
        return NULL;
    }
    return p;
}

/* ---- tracked requests ---- */

static bool ranges_overlap(int64_t a, int64_t alen, int64_t b, int64_t blen)
{
    return a < b + blen && b < a + alen;
}

static bool must_wait(LamNode *bs, int64_t off, int64_t bytes, bool serialising)
{
    for (LamTrackedReq *r = bs->reqs; r; r = r->next) {
        if ((serialising || r->serialising) &&
            ranges_overlap(off, bytes, r->off, r->bytes)) {
            return true;
        }
    }
    return false;
}

/* Registers r, first waiting for the overlapping requests it must not
 * run alongside; with nowait it returns -EAGAIN instead of waiting. */
static int track_begin_nowait(LamNode *bs, LamTrackedReq *r, int64_t off,
                              int64_t bytes, bool serialising, bool write,
                              bool nowait)
{
    r->off = off;
    r->bytes = bytes;
    r->serialising = serialising;
    r->write = write;
    pthread_mutex_lock(&bs->reqs_lock);
    while (must_wait(bs, off, bytes, serialising)) {
        if (nowait) {
            pthread_mutex_unlock(&bs->reqs_lock);
            return -EAGAIN;
        }
        bs->reqs_waiters++;
        pthread_cond_wait(&bs->reqs_cond, &bs->reqs_lock);
        bs->reqs_waiters--;
    }
    r->prev = NULL;
    r->next = bs->reqs;
    if (bs->reqs) {
        bs->reqs->prev = r;
    }
    bs->reqs = r;
    pthread_mutex_unlock(&bs->reqs_lock);
    atomic_fetch_add(&bs->in_flight, 1);
    return 0;
}

static void track_begin(LamNode *bs, LamTrackedReq *r, int64_t off,
                        int64_t bytes, bool serialising, bool write)
{
    track_begin_nowait(bs, r, off, bytes, serialising, write, false);
}

static void track_end(LamNode *bs, LamTrackedReq *r)
{
    pthread_mutex_lock(&bs->reqs_lock);
    if (r->prev) {
        r->prev->next = r->next;
    } else {
        bs->reqs = r->next;
    }
    if (r->next) {
        r->next->prev = r->prev;
    }
    if (bs->reqs_waiters > 0) {
        pthread_cond_broadcast(&bs->reqs_cond);
    }
    pthread_mutex_unlock(&bs->reqs_lock);
    atomic_fetch_sub(&bs->in_flight, 1);
}

/* ---- helpers reaching the driver ---- */

static LamChild *filtered_child(LamNode *bs)
{
    LamChild *c = lam_node_file(bs);
    return c ? c : lam_node_child(bs, "filtered");
}

/* The part [off, off+len) of q.  The common case (all of q) borrows q's
 * vector: no allocation on the hot path. */
static void sub_iov(LamIOV *sub, LamIOV *q, size_t off, size_t len)
{
    if (off == 0 && len == q->size) {
        *sub = *q;
        if (q->iov == &q->local) {
            sub->iov = &sub->local;
        }
        sub->nalloc = 0; /* borrowed: lam_iov_destroy won't free it */
        return;
    }
    lam_iov_init(sub, q->niov);
    lam_iov_concat(sub, q, off, len);
}

static int drv_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov,
                      size_t qoff, int flags)
{
    const LamDriver *drv = bs->drv;
    LamIOV sub;
    int ret = 0;
    int64_t len = lam_node_length(bs);
    if (len < 0) {
        return (int)len;
    }
    /* Beyond the end reads as zeroes. */
    if (off + bytes > len) {
        int64_t tail_start = off > len ? off : len;
        lam_iov_memset(qiov, qoff + (size_t)(tail_start - off), 0,
                       (size_t)(off + bytes - tail_start));
        bytes = tail_start - off;
        if (bytes <= 0) {
            return 0;
        }
    }
    int64_t max = bs->bl.max_transfer ? bs->bl.max_transfer : bytes;
    max -= max % bs->bl.request_alignment;
    if (max <= 0) {
        max = bs->bl.request_alignment;
    }
    for (int64_t done = 0; done < bytes && ret >= 0; done += max) {
        int64_t n = bytes - done < max ? bytes - done : max;
        sub_iov(&sub, qiov, qoff + (size_t)done, (size_t)n);
        if (drv->preadv) {
            ret = drv->preadv(bs, off + done, n, &sub, flags);
        } else if (drv->kind == LAM_DRV_FILTER && filtered_child(bs)) {
            ret = lam_co_preadv(filtered_child(bs), off + done, n, &sub, flags);
        } else {
            ret = -ENOTSUP;
        }
        lam_iov_destroy(&sub);
    }
    return ret < 0 ? ret : 0;
}

static int drv_flush(LamNode *bs);

static int drv_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov,
                       size_t qoff, int flags)
{
    const LamDriver *drv = bs->drv;
    int ret = 0;
    bool emulate_fua = (flags & LAM_REQ_FUA) &&
                       !(drv->supported_write_flags & LAM_REQ_FUA);
    if (emulate_fua) {
        flags &= ~LAM_REQ_FUA;
    }
    if ((flags & LAM_REQ_WRITE_COMPRESSED) &&
        !(drv->supported_write_flags & LAM_REQ_WRITE_COMPRESSED) &&
        !(drv->kind == LAM_DRV_FILTER && !drv->pwritev)) {
        return -ENOTSUP;
    }
    int64_t max = bs->bl.max_transfer ? bs->bl.max_transfer : bytes;
    max -= max % bs->bl.request_alignment;
    if (max <= 0 || (flags & LAM_REQ_WRITE_COMPRESSED)) {
        max = bytes; /* a compressed write is one cluster: never split */
    }
    for (int64_t done = 0; done < bytes && ret >= 0; done += max) {
        int64_t n = bytes - done < max ? bytes - done : max;
        LamIOV sub;
        sub_iov(&sub, qiov, qoff + (size_t)done, (size_t)n);
        if (drv->pwritev) {
            ret = drv->pwritev(bs, off + done, n, &sub, flags);
        } else if (drv->kind == LAM_DRV_FILTER && filtered_child(bs)) {
            ret = lam_co_pwritev(filtered_child(bs), off + done, n, &sub, flags);
        } else {
            ret = -ENOTSUP;
        }
        lam_iov_destroy(&sub);
    }
    if (ret >= 0 && emulate_fua) {
        ret = drv_flush(bs);
    }
    if (ret >= 0) {
        uint64_t end = (uint64_t)(off + bytes);
        uint64_t cur = atomic_load(&bs->wr_highest_offset);
        while (end > cur &&
               !atomic_compare_exchange_weak(&bs->wr_highest_offset, &cur, end)) {
        }
    }
    return ret < 0 ? ret : 0;
}

static int drv_flush(LamNode *bs)
{
    int ret = 0;
    if (bs->open_flags & LAM_O_NO_FLUSH) {
        return 0;
    }
    if (bs->drv->flush) {
        ret = bs->drv->flush(bs);
    }
    /* Then everything this node writes to; read-only edges have nothing
     * of ours to make durable. */
    for (int i = 0; i < bs->nchildren && ret >= 0; i++) {
        LamChild *c = bs->children[i];
        if (c->perm & (LAM_PERM_WRITE | LAM_PERM_WRITE_UNCHANGED)) {
            ret = lam_node_flush(c->node);
        }
    }
    return ret;
}

/* ---- node level ---- */

static bool is_aligned(LamNode *bs, int64_t off, int64_t bytes)
{
    uint32_t a = bs->bl.request_alignment;
    return a <= 1 || ((off % a) == 0 && (bytes % a) == 0);
}

/* The aligned range around [off, off+bytes) and scratch room for its
 * unaligned head and tail blocks (one block each). */
typedef struct AlignPad {
    int64_t aoff, aend;
    size_t head, tail;
    uint8_t *buf;
} AlignPad;

static int pad_init(LamNode *bs, int64_t off, int64_t bytes, AlignPad *p)
{
    uint32_t a = bs->bl.request_alignment;
    p->aoff = off - off % a;
    p->aend = off + bytes;
    if (p->aend % a) {
        p->aend += a - p->aend % a;
    }
    p->head = (size_t)(off - p->aoff);
    p->tail = (size_t)(p->aend - off - bytes);
    p->buf = blk_alloc(bs, 2 * (size_t)a);
    return p->buf ? 0 : -ENOMEM;
}

int lam_node_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov,
                    int flags)
{
    LamTrackedReq req;
    uint32_t a = bs->bl.request_alignment;
    if (off < 0 || bytes < 0 || (size_t)bytes > qiov->size) {
        return -EINVAL;
    }
    if (bytes == 0) {
        return 0;
    }
    bool serialising = flags & LAM_REQ_SERIALISING;
    bool nowait = flags & LAM_REQ_NOWAIT;
    flags &= ~(LAM_REQ_SERIALISING | LAM_REQ_NO_SERIALISE_WAIT);
    if (nowait && !(bs->drv->supported_read_flags & LAM_REQ_NOWAIT)) {
        return -EAGAIN;
    }
    if (is_aligned(bs, off, bytes)) {
        int ret = track_begin_nowait(bs, &req, off, bytes, serialising, false,
                                     nowait);
        if (ret < 0) {
            return ret;
        }
        ret = drv_preadv(bs, off, bytes, qiov, 0, flags);
        track_end(bs, &req);
        return ret;
    }
    /* Pad to the alignment with scratch head and tail buffers. */
    AlignPad p;
    if (pad_init(bs, off, bytes, &p) < 0) {
        return -ENOMEM;
    }
    LamIOV padded;
    lam_iov_init(&padded, qiov->niov + 2);
    if (p.head) {
        lam_iov_add(&padded, p.buf, p.head);
    }
    lam_iov_concat(&padded, qiov, 0, (size_t)bytes);
    if (p.tail) {
        lam_iov_add(&padded, p.buf + a, p.tail);
    }
    int ret = track_begin_nowait(bs, &req, p.aoff, p.aend - p.aoff,
                                 serialising, false, nowait);
    if (ret == 0) {
        ret = drv_preadv(bs, p.aoff, p.aend - p.aoff, &padded, 0, flags);
        track_end(bs, &req);
    }
    lam_iov_destroy(&padded);
    free(p.buf);
    return ret;
}

/* Writes with read-modify-write of the unaligned head and tail blocks. */
static int node_pwritev_rmw(LamNode *bs, int64_t off, int64_t bytes,
                            LamIOV *qiov, int flags)
{
    uint32_t a = bs->bl.request_alignment;
    AlignPad p;
    if (pad_init(bs, off, bytes, &p) < 0) {
        return -ENOMEM;
    }
    int64_t aoff = p.aoff, aend = p.aend;
    size_t head = p.head, tail = p.tail;
    uint8_t *pad = p.buf;
    LamTrackedReq req;
    /* Serialising: a concurrent RMW of the same block must not interleave. */
    track_begin(bs, &req, aoff, aend - aoff, true, true);
    int ret = 0;
    LamIOV blk;
    bool one_block = aend - aoff == a;
    if (head) {
        lam_iov_init_buf(&blk, pad, a);
        ret = drv_preadv(bs, aoff, a, &blk, 0, 0);
    }
    if (ret >= 0 && tail && !(one_block && head)) {
        lam_iov_init_buf(&blk, pad + a, a);
        ret = drv_preadv(bs, aend - a, a, &blk, 0, 0);
    }
    if (ret >= 0) {
        LamIOV padded;
        lam_iov_init(&padded, qiov->niov + 2);
        if (head) {
            lam_iov_add(&padded, pad, head);
        }
        lam_iov_concat(&padded, qiov, 0, (size_t)bytes);
        if (tail) {
            uint8_t *tb = one_block && head ? pad : pad + a;
            lam_iov_add(&padded, tb + (a - tail), tail);
        }
        ret = drv_pwritev(bs, aoff, aend - aoff, &padded, 0, flags);
        lam_iov_destroy(&padded);
    }
    track_end(bs, &req);
    free(pad);
    return ret;
}

/* Checks shared by the write-type entry points: <0 error, 0 nothing to
 * do, 1 go on. */
static int write_check(LamNode *bs, int64_t off, int64_t bytes)
{
    if (off < 0 || bytes < 0) {
        return -EINVAL;
    }
    if (bs->read_only) {
        return -EPERM;
    }
    return bytes > 0;
}

static int node_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov,
                        int flags)
{
    int chk = (size_t)bytes > qiov->size ? -EINVAL : write_check(bs, off, bytes);
    if (chk <= 0) {
        return chk;
    }
    bool serialising = flags & LAM_REQ_SERIALISING;
    bool nowait = flags & LAM_REQ_NOWAIT;
    flags &= ~(LAM_REQ_SERIALISING | LAM_REQ_NO_SERIALISE_WAIT);
    /* A flush, a read-modify-write or compression can't be done without
     * waiting: the caller retries without NOWAIT. */
    if (nowait && (!(bs->drv->supported_write_flags & LAM_REQ_NOWAIT) ||
                   (flags & (LAM_REQ_FUA | LAM_REQ_WRITE_COMPRESSED)) ||
                   !is_aligned(bs, off, bytes))) {
        return -EAGAIN;
    }
    if (!is_aligned(bs, off, bytes)) {
        return node_pwritev_rmw(bs, off, bytes, qiov, flags);
    }
    LamTrackedReq req;
    int ret = track_begin_nowait(bs, &req, off, bytes, serialising, true,
                                 nowait);
    if (ret < 0) {
        return ret;
    }
    ret = drv_pwritev(bs, off, bytes, qiov, 0, flags);
    track_end(bs, &req);
    return ret;
}

/* Zero writes without driver support: a shared zero buffer, chunked. */
static int emulate_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    const void *zb = get_zero_buf();
    int ret = 0;
    flags &= LAM_REQ_FUA | LAM_REQ_SERIALISING;
    while (bytes > 0 && ret >= 0) {
        int64_t n = bytes < ZERO_BUF_SIZE ? bytes : ZERO_BUF_SIZE;
        LamIOV q;
        lam_iov_init_buf(&q, (void *)zb, (size_t)n);
        ret = node_pwritev(bs, off, n, &q, flags);
        off += n;
        bytes -= n;
    }
    return ret;
}

static int node_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    const LamDriver *drv = bs->drv;
    if (flags & LAM_REQ_NOWAIT) {
        return -EAGAIN; /* no driver claims it for zero writes */
    }
    int chk = write_check(bs, off, bytes);
    if (chk <= 0) {
        return chk;
    }
    bool serialising = flags & LAM_REQ_SERIALISING;
    flags &= ~(LAM_REQ_SERIALISING | LAM_REQ_NO_SERIALISE_WAIT);
    /* The pieces below keep the caller's serialisation. */
    int sflags = flags | (serialising ? LAM_REQ_SERIALISING : 0);
    uint32_t a = bs->bl.request_alignment;
    /* Unaligned head and tail go through the write path (RMW). */
    if (a > 1 && !is_aligned(bs, off, bytes)) {
        int64_t head_end = off % a ? off + (a - off % a) : off;
        if (head_end > off + bytes) {
            head_end = off + bytes;
        }
        int64_t tail_start = (off + bytes) - (off + bytes) % a;
        if (tail_start < head_end) {
            tail_start = head_end;
        }
        int ret = 0;
        if (head_end > off) {
            ret = emulate_zeroes(bs, off, head_end - off, sflags);
        }
        if (ret >= 0 && tail_start > head_end) {
            ret = node_pwrite_zeroes(bs, head_end, tail_start - head_end, sflags);
        }
        if (ret >= 0 && off + bytes > tail_start) {
            ret = emulate_zeroes(bs, tail_start, off + bytes - tail_start, sflags);
        }
        return ret;
    }
    int ret = -ENOTSUP;
    if (drv->pwrite_zeroes || (drv->kind == LAM_DRV_FILTER && filtered_child(bs))) {
        bool emulate_fua = (flags & LAM_REQ_FUA) &&
                           !(drv->supported_zero_flags & LAM_REQ_FUA);
        int dflags = emulate_fua ? flags & ~LAM_REQ_FUA : flags;
        LamTrackedReq req;
        track_begin(bs, &req, off, bytes, serialising, true);
        if (drv->pwrite_zeroes) {
            ret = drv->pwrite_zeroes(bs, off, bytes, dflags);
        } else {
            ret = lam_co_pwrite_zeroes(filtered_child(bs), off, bytes, dflags);
        }
        track_end(bs, &req);
        if (ret >= 0 && emulate_fua) {
            ret = drv_flush(bs);
        }
    }
    if (ret == -ENOTSUP && !(flags & LAM_REQ_NO_FALLBACK)) {
        ret = emulate_zeroes(bs, off, bytes, sflags);
    }
    return ret;
}

int lam_node_flush(LamNode *bs)
{
    return drv_flush(bs);
}

static int node_pdiscard(LamNode *bs, int64_t off, int64_t bytes)
{
    int chk = write_check(bs, off, bytes);
    if (chk <= 0) {
        return chk;
    }
    const LamDriver *drv = bs->drv;
    int ret = 0;
    LamTrackedReq req;
    track_begin(bs, &req, off, bytes, false, true);
    if (drv->pdiscard) {
        ret = drv->pdiscard(bs, off, bytes);
    } else if (drv->kind == LAM_DRV_FILTER && filtered_child(bs)) {
        ret = lam_co_pdiscard(filtered_child(bs), off, bytes);
    }
    track_end(bs, &req);
    /* Discard is advisory: a driver that can't is not an error. */
    return ret == -ENOTSUP ? 0 : ret;
}

static int node_block_status(LamNode *bs, int64_t off, int64_t bytes,
                             int64_t *pnum, int64_t *map, LamNode **file)
{
    int64_t len = lam_node_length(bs);
    int64_t lmap = 0;
    LamNode *lfile = NULL;
    if (len < 0) {
        return (int)len;
    }
    if (off >= len) {
        *pnum = 0;
        return LAM_BS_EOF;
    }
    if (bytes > len - off) {
        bytes = len - off;
    }
    const LamDriver *drv = bs->drv;
    int ret;
    if (drv->block_status) {
        ret = drv->block_status(bs, off, bytes, pnum, &lmap, &lfile);
    } else if (drv->kind == LAM_DRV_PROTOCOL) {
        *pnum = bytes;
        lmap = off;
        lfile = bs;
        ret = LAM_BS_DATA | LAM_BS_OFFSET_VALID | LAM_BS_ALLOCATED;
    } else if (drv->kind == LAM_DRV_FILTER && filtered_child(bs)) {
        ret = lam_co_block_status(filtered_child(bs), off, bytes, pnum, &lmap, &lfile);
    } else {
        *pnum = bytes;
        ret = LAM_BS_DATA | LAM_BS_ALLOCATED;
    }
    if (ret < 0) {
        return ret;
    }
    if (*pnum <= 0 || *pnum > bytes) {
        *pnum = bytes; /* a driver bug must not make callers loop forever */
    }
    /* Formats report zero-ness of preallocated areas by asking their file. */
    if ((ret & LAM_BS_RECURSE) && (ret & LAM_BS_OFFSET_VALID) && lfile &&
        lfile != bs && !(ret & LAM_BS_ZERO)) {
        int64_t fpnum;
        int fret = node_block_status(lfile, lmap, *pnum, &fpnum, NULL, NULL);
        if (fret >= 0 && (fret & LAM_BS_ZERO) && fpnum > 0) {
            ret |= LAM_BS_ZERO;
            *pnum = fpnum;
        }
    }
    ret &= ~LAM_BS_RECURSE;
    if (off + *pnum >= len) {
        ret |= LAM_BS_EOF;
    }
    if (map) {
        *map = lmap;
    }
    if (file) {
        *file = lfile;
    }
    return ret;
}

/* ---- edge level (public) ---- */

static int root_check(LamChild *c, int64_t off, int64_t bytes)
{
    if (off < 0 || bytes < 0 || off > INT64_MAX - bytes) {
        return -EINVAL;
    }
    int64_t len = lam_node_length(c->node);
    if (len >= 0 && off + bytes > len) {
        return -EIO;
    }
    return 0;
}

#define ROOT_ENTER(c, off, bytes)                      \
    bool is_root_ = !(c)->parent;                      \
    if (is_root_) {                                    \
        lam_root_req_enter();                          \
        int chk_ = root_check((c), (off), (bytes));    \
        if (chk_ < 0) {                                \
            lam_root_req_leave();                      \
            return chk_;                               \
        }                                              \
    }
#define ROOT_LEAVE()          \
    if (is_root_) {           \
        lam_root_req_leave(); \
    }

static bool may_write(LamChild *c, int flags)
{
    uint64_t need = (flags & LAM_REQ_WRITE_UNCHANGED) ? LAM_PERM_WRITE_UNCHANGED
                                                      : LAM_PERM_WRITE;
    return (c->perm & need) || (c->perm & LAM_PERM_WRITE);
}

int lam_co_preadv(LamChild *c, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    ROOT_ENTER(c, off, bytes);
    int ret = lam_node_preadv(c->node, off, bytes, qiov, flags);
    ROOT_LEAVE();
    return ret;
}

int lam_co_pwritev(LamChild *c, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    if (!may_write(c, flags)) {
        return -EPERM;
    }
    ROOT_ENTER(c, off, bytes);
    int ret = node_pwritev(c->node, off, bytes, qiov, flags);
    ROOT_LEAVE();
    return ret;
}

int lam_co_pread(LamChild *c, int64_t off, int64_t bytes, void *buf, int flags)
{
    LamIOV q;
    lam_iov_init_buf(&q, buf, (size_t)bytes);
    return lam_co_preadv(c, off, bytes, &q, flags);
}

int lam_co_pwrite(LamChild *c, int64_t off, int64_t bytes, const void *buf, int flags)
{
    LamIOV q;
    lam_iov_init_buf(&q, (void *)buf, (size_t)bytes);
    return lam_co_pwritev(c, off, bytes, &q, flags);
}

int lam_co_pwrite_zeroes(LamChild *c, int64_t off, int64_t bytes, int flags)
{
    if (!may_write(c, flags)) {
        return -EPERM;
    }
    ROOT_ENTER(c, off, bytes);
    int ret = node_pwrite_zeroes(c->node, off, bytes, flags);
    ROOT_LEAVE();
    return ret;
}

int lam_co_pdiscard(LamChild *c, int64_t off, int64_t bytes)
{
    if (!may_write(c, 0)) {
        return -EPERM;
    }
    ROOT_ENTER(c, off, bytes);
    int ret = node_pdiscard(c->node, off, bytes);
    ROOT_LEAVE();
    return ret;
}

int lam_co_flush(LamChild *c)
{
    ROOT_ENTER(c, 0, 0);
    int ret = c->node->read_only ? 0 : lam_node_flush(c->node);
    ROOT_LEAVE();
    return ret;
}

/* ---- copy offload (see driver.h) ---- */

static int copy_to(LamChild *src, int64_t src_off, LamChild *dst,
                   int64_t dst_off, int64_t bytes, int flags)
{
    LamNode *bs = dst->node;
    const LamDriver *drv = bs->drv;
    if (!may_write(dst, 0) || bs->read_only) {
        return -EPERM;
    }
    if (!is_aligned(bs, dst_off, bytes)) {
        return -ENOTSUP;
    }
    bool serialising = flags & LAM_REQ_SERIALISING;
    flags &= ~(LAM_REQ_SERIALISING | LAM_REQ_NO_SERIALISE_WAIT);
    /* The source request on this same node is still tracked: a
     * serialising destination overlapping it would wait for itself. */
    if (serialising && src->node == bs &&
        ranges_overlap(src_off, bytes, dst_off, bytes)) {
        return -ENOTSUP;
    }
    int ret = -ENOTSUP;
    LamTrackedReq req;
    track_begin(bs, &req, dst_off, bytes, serialising, true);
    if (drv->copy_range_to) {
        ret = drv->copy_range_to(bs, src, src_off, dst, dst_off, bytes, flags);
    } else if (drv->kind == LAM_DRV_FILTER && !drv->pwritev && filtered_child(bs)) {
        ret = copy_to(src, src_off, filtered_child(bs), dst_off, bytes, flags);
    }
    track_end(bs, &req);
    if (ret >= 0) {
        uint64_t end = (uint64_t)(dst_off + bytes);
        uint64_t cur = atomic_load(&bs->wr_highest_offset);
        while (end > cur &&
               !atomic_compare_exchange_weak(&bs->wr_highest_offset, &cur, end)) {
        }
    }
    return ret < 0 ? ret : 0;
}

static int copy_from(LamChild *src, int64_t src_off, LamChild *dst,
                     int64_t dst_off, int64_t bytes, int flags)
{
    LamNode *bs = src->node;
    const LamDriver *drv = bs->drv;
    int64_t len = lam_node_length(bs);
    if (len < 0) {
        return (int)len;
    }
    /* Past the end reads as zeroes, which no layer below can copy. */
    if (!is_aligned(bs, src_off, bytes) || src_off + bytes > len) {
        return -ENOTSUP;
    }
    int ret = -ENOTSUP;
    LamTrackedReq req;
    track_begin(bs, &req, src_off, bytes, false, false);
    if (drv->copy_range_from) {
        ret = drv->copy_range_from(bs, src, src_off, dst, dst_off, bytes, flags);
    } else if (drv->kind == LAM_DRV_FILTER && !drv->preadv && filtered_child(bs)) {
        ret = copy_from(filtered_child(bs), src_off, dst, dst_off, bytes, flags);
    }
    track_end(bs, &req);
    return ret < 0 ? ret : 0;
}

int lam_co_copy_range(LamChild *src, int64_t src_off, LamChild *dst,
                      int64_t dst_off, int64_t bytes, int flags)
{
    if (src_off < 0 || dst_off < 0 || bytes < 0) {
        return -EINVAL;
    }
    if (!may_write(dst, 0)) {
        return -EPERM;
    }
    if (bytes == 0) {
        return 0;
    }
    /* Our source requests stay tracked on the way down: a serialising
     * destination request overlapping one of them on the same node would
     * wait for itself (copy_to checks again where the chains meet). */
    if ((flags & LAM_REQ_SERIALISING) && src->node == dst->node &&
        ranges_overlap(src_off, bytes, dst_off, bytes)) {
        return -ENOTSUP;
    }
    /* One drain-gate entry covers both edges: entering twice could block
     * a drain that waits for the first entry. */
    bool is_root_ = !src->parent || !dst->parent;
    if (is_root_) {
        lam_root_req_enter();
        int chk = !src->parent ? root_check(src, src_off, bytes) : 0;
        if (chk == 0 && !dst->parent) {
            chk = root_check(dst, dst_off, bytes);
        }
        if (chk < 0) {
            lam_root_req_leave();
            return chk;
        }
    }
    int ret = copy_from(src, src_off, dst, dst_off, bytes, flags);
    ROOT_LEAVE();
    return ret;
}

int lam_co_copy_range_to(LamChild *src, int64_t src_off, LamChild *dst,
                         int64_t dst_off, int64_t bytes, int flags)
{
    if (src_off < 0 || dst_off < 0 || bytes < 0) {
        return -EINVAL;
    }
    if (bytes == 0) {
        return 0;
    }
    /* Reached from inside lam_co_copy_range: the root edges, if any, were
     * entered and checked there. */
    return copy_to(src, src_off, dst, dst_off, bytes, flags);
}

int lam_co_block_status(LamChild *c, int64_t off, int64_t bytes, int64_t *pnum,
                        int64_t *map, LamNode **file)
{
    if (off < 0 || bytes < 0) {
        return -EINVAL;
    }
    bool is_root_ = !c->parent;
    if (is_root_) {
        lam_root_req_enter();
    }
    int ret = node_block_status(c->node, off, bytes, pnum, map, file);
    ROOT_LEAVE();
    return ret;
}

int lam_co_block_status_above(LamChild *c, LamNode *base, int64_t off,
                              int64_t bytes, int64_t *pnum, int64_t *map,
                              LamNode **file, int *depth)
{
    if (off < 0 || bytes < 0) {
        return -EINVAL;
    }
    bool is_root_ = !c->parent;
    if (is_root_) {
        lam_root_req_enter();
    }
    int64_t top_len = lam_node_length(c->node);
    int ret = 0, d = 0;
    LamNode *bs = c->node;
    int64_t n = bytes;
    if (top_len >= 0 && off < top_len && n > top_len - off) {
        n = top_len - off;
    }
    *pnum = 0;
    while (bs && bs != base) {
        d++;
        int64_t len = lam_node_length(bs);
        if (len >= 0 && off >= len) {
            /* Past the end of a shorter backing file: reads as zeroes. */
            ret = LAM_BS_ZERO;
            *pnum = n;
            d = 0;
            break;
        }
        int64_t num;
        ret = node_block_status(bs, off, n, &num, map, file);
        if (ret < 0) {
            break;
        }
        n = num;
        *pnum = num;
        if (ret & (LAM_BS_ALLOCATED | LAM_BS_DATA | LAM_BS_ZERO) ||
            bs->drv->kind == LAM_DRV_PROTOCOL) {
            ret |= LAM_BS_ALLOCATED;
            break;
        }
        bs = lam_node_backing_node(bs);
        if (!bs || bs == base) {
            /* Unallocated in the whole chain: zeroes (or the base's). */
            ret = bs == base && base ? 0 : LAM_BS_ZERO;
            d = 0;
            break;
        }
    }
    if (ret >= 0) {
        ret &= ~LAM_BS_EOF;
        if (top_len >= 0 && off + *pnum >= top_len) {
            ret |= LAM_BS_EOF;
        }
    }
    if (depth) {
        *depth = d;
    }
    ROOT_LEAVE();
    return ret;
}

int lam_co_truncate(LamChild *c, int64_t size, bool exact, LamPrealloc prealloc,
                    LamError **errp)
{
    LamNode *bs = c->node;
    if (size < 0) {
        lam_error_setg(errp, "Image size cannot be negative");
        return -EINVAL;
    }
    if (!(c->perm & LAM_PERM_RESIZE)) {
        lam_error_setg(errp, "Permission 'resize' is not taken on node '%s'",
                       bs->node_name);
        return -EPERM;
    }
    if (bs->read_only) {
        lam_error_setg(errp, "Image '%s' is read-only", lam_node_filename(bs));
        return -EACCES;
    }
    if (!bs->drv->truncate) {
        lam_error_setg(errp, "Image format driver does not support resize");
        return -ENOTSUP;
    }
    bool is_root_ = !c->parent;
    if (is_root_) {
        lam_root_req_enter();
    }
    int ret = bs->drv->truncate(bs, size, exact, prealloc, errp);
    ROOT_LEAVE();
    return ret;
}

int lam_prealloc_parse(const char *s, LamPrealloc *out)
{
    static const char *const names[] = {"off", "metadata", "falloc", "full"};
    for (int i = 0; i < 4; i++) {
        if (!strcmp(s, names[i])) {
            *out = (LamPrealloc)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *lam_prealloc_name(LamPrealloc p)
{
    static const char *const names[] = {"off", "metadata", "falloc", "full"};
    return (unsigned)p < 4 ? names[p] : "?";
}
