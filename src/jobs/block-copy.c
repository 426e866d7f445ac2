/* The copy engine (see block-copy.h for the model and the lock). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/bitmap.h"
#include "jobs/block-copy.h"
#include "lamina/driver.h"

#define DEFAULT_MAX_CHUNK (1 << 20)
#define MAX_CHUNK (64 << 20)
#define MAX_MEM (128 << 20)
/* Requests in flight are threads here: more than this only adds context
 * switches on the machines we target. */
#define MAX_WORKERS 16

typedef struct CopyTask {
    int64_t off, bytes;
    struct CopyTask *next;
} CopyTask;

typedef struct FrozenRead {
    int64_t off, bytes;
    struct FrozenRead *next;
} FrozenRead;

/* A chunk handed from the job thread to a worker. */
typedef struct WorkItem {
    CopyTask task;
    struct WorkItem *next;
} WorkItem;

struct LamBlockCopy {
    LamChild *source;
    LamChild *target;
    int64_t cluster_size; /* target cluster: snapshot access, compression */
    int64_t gran;         /* copy bitmap granularity, divides cluster_size */
    int64_t len;
    int write_flags;
    bool target_has_backing;
    bool discard_source;  /* set before copying starts */
    bool use_offload;     /* set before copying starts */
    /* Copy offload: no_offload is set when it answered -ENOTSUP before
     * ever working (the layers can't: the job reads and writes from then
     * on); once it has worked, -ENOTSUP only means "not this range"
     * (backing data, a partial cluster at the end). */
    _Atomic bool no_offload;
    _Atomic bool offload_ok;
    void (*progress_cb)(void *opaque, int64_t bytes);
    void *progress_opaque;

    pthread_mutex_t lock; /* protects everything below */
    pthread_cond_t cond;  /* broadcast when a task or frozen read ends or
                           * a worker gets idle */
    pthread_cond_t work_cond; /* signalled when work is queued or workers
                               * must stop */
    LamBitmap *bitmap;    /* set = still to copy */
    LamBitmap *access;    /* set = readable through snapshot-access */
    CopyTask *tasks;      /* in-flight copies */
    FrozenRead *frozen;   /* in-flight snapshot reads from the source */
    uint64_t copied_gen;  /* bumped whenever a copy completes */
    bool no_recheck;      /* test switch, fixed at creation (LAMINA_DEBUG_NO_FLEECING_GUARD) */

    /* Background run state (valid while lam_block_copy_run runs). */
    WorkItem *queue;
    int busy_workers;
    bool stop_workers;
    int64_t max_chunk;    /* worker buffer size */
    LamJob *run_job;      /* the job running the background copy */
    int64_t bsc_off, bsc_end; /* block status cache: [off, end) is ... */
    bool bsc_zero;            /* ... zero (true) or data (false) */
    int bg_err;           /* first unhandled background error */
    bool bg_err_is_read;
};

static int64_t copy_unit(LamBlockCopy *s);
static bool task_overlaps_locked(LamBlockCopy *s, int64_t off, int64_t bytes);

static bool overlap(int64_t a, int64_t alen, int64_t b, int64_t blen)
{
    return a < b + blen && b < a + alen;
}

LamBlockCopy *lam_block_copy_new(LamChild *source, LamChild *target,
                                 int64_t cluster_size, int write_flags,
                                 LamError **errp)
{
    return lam_block_copy_new_gran(source, target, cluster_size, cluster_size,
                                   write_flags, errp);
}

LamBlockCopy *lam_block_copy_new_gran(LamChild *source, LamChild *target,
                                      int64_t cluster_size, int64_t gran,
                                      int write_flags, LamError **errp)
{
    int64_t len = lam_node_length(source->node);
    if (len < 0) {
        lam_error_setg_errno(errp, (int)len, "Could not get the length of '%s'",
                             lam_node_name(source->node));
        return NULL;
    }
    if (cluster_size <= 0 || (cluster_size & (cluster_size - 1))) {
        lam_error_setg(errp, "Invalid copy cluster size %lld", (long long)cluster_size);
        return NULL;
    }
    if (gran <= 0 || (gran & (gran - 1)) || gran > cluster_size) {
        lam_error_setg(errp, "Invalid copy granularity %lld", (long long)gran);
        return NULL;
    }
    LamBlockCopy *s = calloc(1, sizeof(*s));
    if (!s) {
        lam_error_setg(errp, "Out of memory");
        return NULL;
    }
    s->bitmap = lam_bitmap_new(len, gran);
    if (!s->bitmap) {
        free(s);
        lam_error_setg(errp, "Out of memory for the copy bitmap of '%s'",
                       lam_node_name(source->node));
        return NULL;
    }
    lam_bitmap_set(s->bitmap, 0, len);
    s->access = lam_bitmap_new(len, cluster_size);
    if (!s->access) {
        lam_bitmap_free(s->bitmap);
        free(s);
        lam_error_setg(errp, "Out of memory for the snapshot bitmap of '%s'",
                       lam_node_name(source->node));
        return NULL;
    }
    lam_bitmap_set(s->access, 0, len);
    s->source = source;
    s->target = target;
    s->cluster_size = cluster_size;
    s->gran = gran;
    s->len = len;
    s->write_flags = write_flags;
    s->target_has_backing = lam_node_backing_node(target->node) != NULL;
    s->no_recheck = lam_debug_no_fleecing_guard();
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    pthread_cond_init(&s->work_cond, NULL);
    return s;
}

void lam_block_copy_free(LamBlockCopy *s)
{
    if (!s) {
        return;
    }
    lam_bitmap_free(s->bitmap);
    lam_bitmap_free(s->access);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    pthread_cond_destroy(&s->work_cond);
    free(s);
}

void lam_block_copy_set_discard_source(LamBlockCopy *s, bool discard)
{
    s->discard_source = discard;
}

void lam_block_copy_set_offload(LamBlockCopy *s, bool offload)
{
    s->use_offload = offload;
}

void lam_block_copy_set_compress(LamBlockCopy *s, bool compress)
{
    if (compress) {
        s->write_flags |= LAM_REQ_WRITE_COMPRESSED;
    } else {
        s->write_flags &= ~LAM_REQ_WRITE_COMPRESSED;
    }
}

int64_t lam_block_copy_cluster_size(LamBlockCopy *s) { return s->cluster_size; }
int64_t lam_block_copy_len(LamBlockCopy *s) { return s->len; }

int64_t lam_block_copy_dirty_bytes(LamBlockCopy *s)
{
    pthread_mutex_lock(&s->lock);
    int64_t n = lam_bitmap_count_bytes(s->bitmap);
    pthread_mutex_unlock(&s->lock);
    return n;
}

void lam_block_copy_set_progress(LamBlockCopy *s, void (*cb)(void *opaque, int64_t bytes),
                                 void *opaque)
{
    s->progress_cb = cb;
    s->progress_opaque = opaque;
}

void lam_block_copy_reset(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    pthread_mutex_lock(&s->lock);
    lam_bitmap_reset(s->bitmap, off, bytes);
    pthread_mutex_unlock(&s->lock);
}

/* [off, off+bytes) rounded out to whole copy units, clipped to the disk. */
static void unit_range(LamBlockCopy *s, int64_t off, int64_t bytes, int64_t *start,
                       int64_t *end)
{
    int64_t unit = copy_unit(s);
    *start = off / unit * unit;
    *end = (off + bytes + unit - 1) / unit * unit;
    if (*end > s->len) {
        *end = s->len;
    }
}

bool lam_block_copy_needs_copy(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    if (bytes <= 0 || off >= s->len) {
        return false;
    }
    int64_t start, end;
    unit_range(s, off, bytes, &start, &end);
    pthread_mutex_lock(&s->lock);
    bool r = lam_bitmap_any(s->bitmap, start, end - start) ||
             task_overlaps_locked(s, start, end - start);
    pthread_mutex_unlock(&s->lock);
    return r;
}

bool lam_block_copy_is_dirty(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    pthread_mutex_lock(&s->lock);
    bool r = lam_bitmap_any(s->bitmap, off, bytes);
    pthread_mutex_unlock(&s->lock);
    return r;
}

/* ---- copying one claimed range (no lock held) ---- */

static int write_zeroes(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    /* Unmapping in a target that has a backing file would expose the
     * backing data instead of zeroes. */
    int flags = (s->write_flags & LAM_REQ_SERIALISING) |
                (s->target_has_backing ? 0 : LAM_REQ_MAY_UNMAP);
    return lam_co_pwrite_zeroes(s->target, off, bytes, flags);
}

/* Copy offload of a data extent: the kernel moves the bytes file to file,
 * no copy to and from our buffer.  Not with compression (the target must
 * see the data) nor for zero extents (write_zeroes keeps them sparse).
 * Any failure falls back to read + write, which also tells read errors
 * from write errors. */
static bool try_offload(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    if (!s->use_offload || atomic_load(&s->no_offload) || (s->write_flags & LAM_REQ_WRITE_COMPRESSED)) {
        return false;
    }
    int ret = lam_co_copy_range(s->source, off, s->target, off, bytes,
                                s->write_flags & LAM_REQ_SERIALISING);
    if (ret == 0) {
        atomic_store(&s->offload_ok, true);
    } else if (ret == -ENOTSUP && !atomic_load(&s->offload_ok)) {
        atomic_store(&s->no_offload, true);
    }
    return ret == 0;
}

static int copy_data(LamBlockCopy *s, int64_t off, int64_t bytes, void *buf,
                     bool *is_read, bool offload)
{
    if (offload && try_offload(s, off, bytes)) {
        *is_read = false;
        return 0;
    }
    int ret = lam_co_pread(s->source, off, bytes, buf, 0);
    if (ret < 0) {
        *is_read = true;
        return ret;
    }
    *is_read = false;
    if (lam_buf_is_zero(buf, (size_t)bytes)) {
        return write_zeroes(s, off, bytes);
    }
    return lam_co_pwrite(s->target, off, bytes, buf, s->write_flags);
}

/* Block status cache.  A protocol's status query can cost a scan to the
 * next hole (SEEK_HOLE on tmpfs walks the page cache), so the answer for
 * a large extent is remembered.  Safe to reuse: a cluster is copied only
 * once, after being claimed, and a guest write to a still-dirty cluster
 * first copies it via copy-before-write; data is always read for real, so
 * an extent wrongly believed to hold data only costs a read. */
static int cached_status(LamBlockCopy *s, int64_t off, int64_t bytes, int64_t *pnum,
                         bool *zero)
{
    int ret = -1;
    pthread_mutex_lock(&s->lock);
    if (s->bsc_end > s->bsc_off && off >= s->bsc_off && off < s->bsc_end) {
        *pnum = s->bsc_end - off < bytes ? s->bsc_end - off : bytes;
        *zero = s->bsc_zero;
        ret = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* Queries the status of the rest of the disk from off (one answer covers
 * many chunks), fills the cache, and clips the answer to bytes. */
static int query_status(LamBlockCopy *s, int64_t off, int64_t bytes, int64_t *pnum,
                        bool *zero)
{
    int64_t n = 0, map;
    int depth = 0;
    LamNode *file;
    int st = lam_co_block_status_above(s->source, NULL, off, s->len - off, &n, &map,
                                       &file, &depth);
    if (st < 0 || n <= 0) {
        return -1;
    }
    *zero = (st & LAM_BS_ZERO) || (depth == 0 && !(st & LAM_BS_DATA));
    pthread_mutex_lock(&s->lock);
    s->bsc_off = off;
    s->bsc_end = off + n;
    s->bsc_zero = *zero;
    pthread_mutex_unlock(&s->lock);
    *pnum = n < bytes ? n : bytes;
    return 0;
}

static void *alloc_buf(LamBlockCopy *s, int64_t bytes)
{
    void *buf = NULL;
    size_t align = 4096;
    const LamLimits *bl = lam_node_limits(s->source->node);
    if (bl->min_mem_alignment > align) {
        align = bl->min_mem_alignment;
    }
    if (posix_memalign(&buf, align, (size_t)bytes) != 0) {
        return NULL;
    }
    return buf;
}

/* Copies [off, off+bytes) (cluster aligned, within len) through buf,
 * which holds at least bytes, or by copy offload if `offload` (the
 * background copy; copy-before-write keeps read + write: the guest write
 * waits for it and its chunks are small). */
static int do_copy(LamBlockCopy *s, int64_t off, int64_t bytes, void *buf, bool *is_read,
                   bool offload)
{
    int64_t start = off;
    *is_read = false;
    int ret = 0;
    int64_t end = off + bytes;
    while (off < end && ret == 0) {
        int64_t pnum = end - off;
        bool zero = false;
        /* A compressed write is exactly one cluster: no zero splitting,
         * one request per cluster. */
        if (s->write_flags & LAM_REQ_WRITE_COMPRESSED) {
            pnum = s->cluster_size < end - off ? s->cluster_size : end - off;
        } else {
            int st = cached_status(s, off, end - off, &pnum, &zero);
            if (st < 0) {
                st = query_status(s, off, end - off, &pnum, &zero);
            }
            if (st < 0 || pnum <= 0) {
                pnum = end - off; /* unknown: copy as data */
                zero = false;
            } else {
                /* Keep pieces cluster aligned unless the range ends at EOF. */
                if (pnum < end - off) {
                    int64_t aligned = pnum / s->cluster_size * s->cluster_size;
                    if (aligned == 0) {
                        pnum = s->cluster_size < end - off ? s->cluster_size : end - off;
                        zero = false;
                    } else {
                        pnum = aligned;
                    }
                }
            }
        }
        ret = zero ? write_zeroes(s, off, pnum) : copy_data(s, off, pnum, buf, is_read, offload);
        off += pnum;
    }
    if (ret == 0 && s->discard_source) {
        /* Advisory: a source that can't discard just keeps its data. */
        lam_co_pdiscard(s->source, start, bytes);
    }
    return ret;
}

/* The smallest piece copied: a compressed write is one whole cluster. */
static int64_t copy_unit(LamBlockCopy *s)
{
    return (s->write_flags & LAM_REQ_WRITE_COMPRESSED) ? s->cluster_size : s->gran;
}

/* Claims the dirty run starting at `start` (dirty), at most max bytes;
 * lock held.  Returns the task (linked into s->tasks). */
static CopyTask *claim_locked(LamBlockCopy *s, CopyTask *t, int64_t start, int64_t max)
{
    int64_t end = lam_bitmap_next_clear(s->bitmap, start);
    /* Whole bits only (whole clusters when compressing). */
    int64_t unit = copy_unit(s);
    max = max < unit ? unit : max / unit * unit;
    if (end - start > max) {
        end = start + max;
    }
    if (end > s->len) {
        end = s->len;
    }
    lam_bitmap_reset(s->bitmap, start, end - start);
    t->off = start;
    t->bytes = end - start;
    t->next = s->tasks;
    s->tasks = t;
    return t;
}

/* Ends a task; on failure its range becomes dirty again.  Lock held. */
static void task_end_locked(LamBlockCopy *s, CopyTask *t, int ret)
{
    for (CopyTask **pp = &s->tasks; *pp; pp = &(*pp)->next) {
        if (*pp == t) {
            *pp = t->next;
            break;
        }
    }
    if (ret < 0) {
        lam_bitmap_set(s->bitmap, t->off, t->bytes);
    } else {
        s->copied_gen++;
    }
    pthread_cond_broadcast(&s->cond);
}

static void report_progress(LamBlockCopy *s, int64_t bytes)
{
    if (s->progress_cb) {
        s->progress_cb(s->progress_opaque, bytes);
    }
}

static bool task_overlaps_locked(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    for (CopyTask *t = s->tasks; t; t = t->next) {
        if (overlap(off, bytes, t->off, t->bytes)) {
            return true;
        }
    }
    return false;
}

static bool frozen_overlaps_locked(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    for (FrozenRead *f = s->frozen; f; f = f->next) {
        if (overlap(off, bytes, f->off, f->bytes)) {
            return true;
        }
    }
    return false;
}

/* ---- copy-before-write ---- */

int lam_block_copy_cbw(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    if (bytes <= 0 || off >= s->len) {
        return 0;
    }
    int64_t start, end;
    unit_range(s, off, bytes, &start, &end);
    int ret = 0;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        int64_t d = lam_bitmap_next_set(s->bitmap, start);
        if (d >= 0 && d < end) {
            CopyTask t;
            /* In pieces of at most 1 MiB: a big guest write must not
             * allocate a buffer of its size. */
            claim_locked(s, &t, d, end - d < DEFAULT_MAX_CHUNK ? end - d : DEFAULT_MAX_CHUNK);
            pthread_mutex_unlock(&s->lock);
            bool is_read;
            void *buf = alloc_buf(s, t.bytes);
            ret = buf ? do_copy(s, t.off, t.bytes, buf, &is_read, false) : -ENOMEM;
            free(buf);
            pthread_mutex_lock(&s->lock);
            task_end_locked(s, &t, ret);
            if (ret < 0) {
                break;
            }
            pthread_mutex_unlock(&s->lock);
            report_progress(s, t.bytes);
            pthread_mutex_lock(&s->lock);
            continue;
        }
        /* Nothing left to claim: wait for copies by others (which may
         * fail and make clusters dirty again).  Snapshot readers still
         * reading the old data from the source are not waited for: they
         * re-check and re-read from the target (snapshot_read). */
        if (task_overlaps_locked(s, start, end - start)) {
            pthread_cond_wait(&s->cond, &s->lock);
            continue;
        }
        break;
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

/* ---- snapshot reads ---- */

int lam_block_copy_snapshot_discard(LamBlockCopy *s, int64_t off, int64_t bytes)
{
    int64_t start = (off + s->cluster_size - 1) / s->cluster_size * s->cluster_size;
    int64_t end = (off + bytes) / s->cluster_size * s->cluster_size;
    if (off + bytes >= s->len) {
        end = s->len;
    }
    if (end <= start) {
        return 0;
    }
    pthread_mutex_lock(&s->lock);
    /* A copy in flight finishes first; then the range is gone for good. */
    while (task_overlaps_locked(s, start, end - start) ||
           frozen_overlaps_locked(s, start, end - start)) {
        pthread_cond_wait(&s->cond, &s->lock);
    }
    lam_bitmap_reset(s->bitmap, start, end - start);
    lam_bitmap_reset(s->access, start, end - start);
    pthread_mutex_unlock(&s->lock);
    int ret = lam_co_pdiscard(s->target, start, end - start);
    return ret == -ENOTSUP ? 0 : ret;
}

/* Copied: in the target for good (clear and no copy in flight).  Lock held. */
static bool copied_locked(LamBlockCopy *s, int64_t off, int64_t n)
{
    return !lam_bitmap_get(s->bitmap, off) && !task_overlaps_locked(s, off, n);
}

/* The run of clusters from off (before end) that are all copied or all
 * not; its length, and the state in *copied.  Lock held. */
static int64_t state_run_locked(LamBlockCopy *s, int64_t off, int64_t end, bool *copied)
{
    int64_t n = 0;
    while (off + n < end) {
        int64_t cend = ((off + n) / s->gran + 1) * s->gran;
        int64_t m = (cend < end ? cend : end) - (off + n);
        bool c = copied_locked(s, off + n, m);
        if (n == 0) {
            *copied = c;
        } else if (c != *copied) {
            break;
        }
        n += m;
    }
    return n;
}

static int read_part(LamChild *c, int64_t off, int64_t n, LamIOV *qiov, size_t qoff)
{
    LamIOV part;
    lam_iov_init(&part, 4);
    lam_iov_concat(&part, qiov, qoff, (size_t)n);
    int ret = lam_co_preadv(c, off, n, &part, 0);
    lam_iov_destroy(&part);
    return ret;
}

/* After reading [off, off+n) from the source: the clusters copied since
 * (copied_gen moved) may hold new guest data in what was read; their old
 * data is in the target now.  A cluster still dirty, or with its copy in
 * flight, was not written by the guest: copy-before-write finishes first.
 * Lock held, dropped around the reads. */
static int recheck_locked(LamBlockCopy *s, int64_t off, int64_t n, LamIOV *qiov,
                          size_t qoff)
{
    int64_t end = off + n;
    while (off < end) {
        bool copied;
        int64_t m = state_run_locked(s, off, end, &copied);
        if (copied) {
            pthread_mutex_unlock(&s->lock);
            int ret = read_part(s->target, off, m, qiov, qoff);
            pthread_mutex_lock(&s->lock);
            if (ret < 0) {
                return ret;
            }
        }
        off += m;
        qoff += (size_t)m;
    }
    return 0;
}

/* Regions already copied are read from the target; the others from the
 * source without holding anyone up (QEMU makes copy-before-write wait for
 * such reads): if a copy completed meanwhile, its clusters are re-read
 * from the target, which holds their old data since before the guest
 * write that may have changed the source under us. */
int lam_block_copy_snapshot_read(LamBlockCopy *s, int64_t off, int64_t bytes,
                                 LamIOV *qiov, size_t qoff)
{
    int64_t end = off + bytes;
    pthread_mutex_lock(&s->lock);
    int64_t hole = lam_bitmap_next_clear(s->access, off / s->cluster_size * s->cluster_size);
    pthread_mutex_unlock(&s->lock);
    if (hole < end) {
        return -EACCES; /* discarded from the snapshot */
    }
    while (off < end) {
        pthread_mutex_lock(&s->lock);
        bool copied;
        int64_t n = state_run_locked(s, off, end, &copied);
        /* Registered for snapshot discard, which waits for it. */
        FrozenRead fr = { .off = off, .bytes = n };
        uint64_t gen = s->copied_gen;
        if (!copied) {
            fr.next = s->frozen;
            s->frozen = &fr;
        }
        pthread_mutex_unlock(&s->lock);

        int ret = read_part(copied ? s->target : s->source, off, n, qiov, qoff);

        if (!copied) {
            pthread_mutex_lock(&s->lock);
            if (ret == 0 && s->copied_gen != gen && !s->no_recheck) {
                ret = recheck_locked(s, off, n, qiov, qoff);
            }
            for (FrozenRead **pp = &s->frozen; *pp; pp = &(*pp)->next) {
                if (*pp == &fr) {
                    *pp = fr.next;
                    break;
                }
            }
            pthread_cond_broadcast(&s->cond);
            pthread_mutex_unlock(&s->lock);
        }
        if (ret < 0) {
            return ret;
        }
        off += n;
        qoff += (size_t)n;
    }
    return 0;
}

/* ---- sync=top scan ---- */

int64_t lam_block_copy_reset_unallocated(LamBlockCopy *s, LamJob *job)
{
    int64_t removed = 0;
    for (int64_t off = 0; off < s->len;) {
        if (job && lam_job_is_cancelled(job)) {
            return -ECANCELED;
        }
        int64_t pnum = 0;
        int st = lam_co_block_status(s->source, off, s->len - off, &pnum, NULL, NULL);
        if (st < 0) {
            return st;
        }
        if (pnum <= 0) {
            break;
        }
        if (!(st & LAM_BS_ALLOCATED)) {
            /* Only whole clusters can be dropped. */
            int64_t a = (off + s->cluster_size - 1) / s->cluster_size * s->cluster_size;
            int64_t b = (off + pnum) / s->cluster_size * s->cluster_size;
            if (off + pnum >= s->len) {
                b = s->len;
            }
            if (b > a) {
                pthread_mutex_lock(&s->lock);
                int64_t before = lam_bitmap_count_bytes(s->bitmap);
                lam_bitmap_reset(s->bitmap, a, b - a);
                removed += before - lam_bitmap_count_bytes(s->bitmap);
                pthread_mutex_unlock(&s->lock);
            }
        }
        off += pnum;
    }
    return removed;
}

/* ---- background copy ---- */

static void *worker_main(void *opaque)
{
    LamBlockCopy *s = opaque;
    /* One buffer per worker for the whole run: a fresh large allocation
     * per chunk costs page faults on every copy. */
    void *buf = alloc_buf(s, s->max_chunk);
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!s->queue && !s->stop_workers) {
            pthread_cond_wait(&s->work_cond, &s->lock);
        }
        if (!s->queue) {
            break;
        }
        WorkItem *w = s->queue;
        s->queue = w->next;
        pthread_mutex_unlock(&s->lock);
        bool is_read;
        int ret = buf ? do_copy(s, w->task.off, w->task.bytes, buf, &is_read, true) : -ENOMEM;
        if (ret == 0) {
            report_progress(s, w->task.bytes);
        }
        lam_job_io_end(s->run_job);
        pthread_mutex_lock(&s->lock);
        task_end_locked(s, &w->task, ret);
        if (ret < 0 && s->bg_err == 0) {
            s->bg_err = ret;
            s->bg_err_is_read = is_read;
        }
        s->busy_workers--;
        free(w);
        pthread_cond_broadcast(&s->cond);
    }
    pthread_mutex_unlock(&s->lock);
    free(buf);
    return NULL;
}

/* Waits until no background copy is queued or running.  Lock held. */
static void drain_workers_locked(LamBlockCopy *s)
{
    while (s->busy_workers > 0) {
        pthread_cond_wait(&s->cond, &s->lock);
    }
}

int lam_block_copy_run(LamBlockCopy *s, LamJob *job, int max_workers,
                       int64_t max_chunk, LamOnError on_source_error,
                       LamOnError on_target_error, LamError **errp)
{
    if (max_workers < 1) {
        max_workers = 1;
    }
    if (max_workers > MAX_WORKERS) {
        max_workers = MAX_WORKERS;
    }
    if (max_chunk <= 0) {
        max_chunk = DEFAULT_MAX_CHUNK;
    }
    if (s->write_flags & LAM_REQ_WRITE_COMPRESSED) {
        max_chunk = s->cluster_size;
    }
    /* Bound the memory of a run: one buffer per worker, at most
     * MAX_CHUNK each and MAX_MEM together (a huge x-perf.max-chunk must
     * not allocate gigabytes). */
    if (max_chunk > MAX_CHUNK) {
        max_chunk = MAX_CHUNK;
    }
    max_chunk = max_chunk < s->cluster_size ? s->cluster_size
                                            : max_chunk / s->cluster_size * s->cluster_size;
    if ((int64_t)max_workers * max_chunk > MAX_MEM) {
        max_workers = (int)(MAX_MEM / max_chunk);
        if (max_workers < 1) {
            max_workers = 1;
        }
    }

    s->max_chunk = max_chunk;
    s->run_job = job;
    pthread_t threads[MAX_WORKERS];
    int nthreads = 0;
    s->stop_workers = false;
    s->bg_err = 0;
    for (int i = 0; i < max_workers; i++) {
        if (pthread_create(&threads[i], NULL, worker_main, s) != 0) {
            break;
        }
        nthreads++;
    }
    if (nthreads == 0) {
        lam_error_setg(errp, "Could not start copy workers");
        return -EAGAIN;
    }

    int ret = 0;
    int64_t cursor = 0;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        if (s->bg_err) {
            int err = s->bg_err;
            bool is_read = s->bg_err_is_read;
            s->bg_err = 0;
            pthread_mutex_unlock(&s->lock);
            LamErrorAction a = lam_job_error_action(job, is_read ? on_source_error
                                                                 : on_target_error,
                                                    is_read, err);
            pthread_mutex_lock(&s->lock);
            if (a == LAM_ACTION_REPORT) {
                ret = err;
                break;
            }
            /* ignore: the range is dirty again and is retried; stop: the
             * job is now user-paused, and the check below pauses it once
             * the other copies in flight have finished. */
        }
        /* The job lock is never taken with ours held. */
        pthread_mutex_unlock(&s->lock);
        bool cancelled = lam_job_is_cancelled(job);
        if (!cancelled && lam_job_pause_requested(job)) {
            /* Pause (user, error stop, drain) with nothing in flight. */
            pthread_mutex_lock(&s->lock);
            drain_workers_locked(s);
            pthread_mutex_unlock(&s->lock);
            lam_job_pause_point(job);
            cancelled = lam_job_is_cancelled(job);
        }
        pthread_mutex_lock(&s->lock);
        if (cancelled) {
            ret = -ECANCELED;
            break;
        }
        int64_t d = lam_bitmap_next_set(s->bitmap, cursor);
        if (d < 0 && cursor > 0) {
            cursor = 0; /* retry ranges that failed and were marked again */
            d = lam_bitmap_next_set(s->bitmap, 0);
        }
        if (d < 0) {
            if (s->tasks || s->busy_workers) {
                /* Copies (ours or copy-before-write) still running; one
                 * may fail and mark its range dirty again. */
                pthread_cond_wait(&s->cond, &s->lock);
                continue;
            }
            break; /* everything copied */
        }
        if (s->busy_workers >= nthreads) {
            pthread_cond_wait(&s->cond, &s->lock);
            continue;
        }
        WorkItem *w = calloc(1, sizeof(*w));
        if (!w) {
            ret = -ENOMEM;
            break;
        }
        claim_locked(s, &w->task, d, max_chunk);
        cursor = w->task.off + w->task.bytes;
        int64_t chunk = w->task.bytes;
        WorkItem **tail = &s->queue;
        while (*tail) {
            tail = &(*tail)->next;
        }
        *tail = w;
        s->busy_workers++;
        atomic_fetch_add(&job->io_in_flight, 1);
        pthread_cond_signal(&s->work_cond);
        pthread_mutex_unlock(&s->lock);
        /* Speed limit and pause point: between dispatches only, so a
         * paused job has nothing new in flight. */
        lam_job_ratelimit(job, (uint64_t)chunk);
        pthread_mutex_lock(&s->lock);
    }
    drain_workers_locked(s);
    s->stop_workers = true;
    pthread_cond_broadcast(&s->work_cond);
    int late_err = s->bg_err;
    bool late_is_read = s->bg_err_is_read;
    s->bg_err = 0;
    pthread_mutex_unlock(&s->lock);
    for (int i = 0; i < nthreads; i++) {
        pthread_join(threads[i], NULL);
    }
    if (ret == 0 && late_err) {
        /* Cannot happen: the loop only ends cleanly when nothing failed. */
        ret = late_err;
    }
    (void)late_is_read;
    if (ret < 0 && ret != -ECANCELED) {
        lam_error_setg(errp, "%s", strerror(-ret));
    }
    return ret;
}
