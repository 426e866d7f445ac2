/* The copy engine: copies the regions marked in a copy bitmap from a source
 * edge to a target edge.  Used by the copy-before-write filter (a guest
 * write first copies the old data of its clusters) and by jobs (background
 * copy with several requests in flight, rate limit, error policy).
 *
 * Every cluster is copied at most once: it is claimed (its bit cleared and
 * an in-flight task registered) under the engine's lock, copied without
 * the lock, and the task removed.  Whoever needs a cluster that another
 * thread is copying waits for that task.  A failed copy sets the bits
 * again, so a later attempt retries it.
 *
 * Zero detection: ranges the source reports as zero (or unallocated in its
 * whole chain) and data that reads back as zeroes are written as
 * write_zeroes, never as data.
 *
 * Snapshot reads (snapshot-access): a reader of a not-yet-copied region
 * reads the source without holding copy-before-write up; if a copy
 * completed meanwhile (copied_gen), the clusters copied since are re-read
 * from the target, which got their old data before the guest write could
 * change the source.  The reader's range is still registered as a "frozen
 * read", for snapshot discard only.
 *
 * LOCK: LamBlockCopy.lock protects the bitmap, the task and frozen-read
 * lists and the error fields; it is never held across I/O.  It nests
 * inside nothing (callers hold no block-layer or job lock).
 */
#ifndef LAMINA_JOBS_BLOCK_COPY_H
#define LAMINA_JOBS_BLOCK_COPY_H

#include "jobs/job.h"
#include "lamina/block.h"

typedef struct LamBlockCopy LamBlockCopy;

/* write_flags: LAM_REQ_SERIALISING (fleecing target whose backing chain
 * holds the source) and/or LAM_REQ_WRITE_COMPRESSED.  The copy bitmap
 * starts all set. */
LamBlockCopy *lam_block_copy_new(LamChild *source, LamChild *target,
                                 int64_t cluster_size, int write_flags,
                                 LamError **errp);
/* Same, but the copy bitmap (the unit of copy-before-write) has the finer
 * granularity gran (a power of two dividing cluster_size): a small guest
 * write then copies only its gran-aligned range.  Snapshot access and
 * discard stay per cluster_size. */
LamBlockCopy *lam_block_copy_new_gran(LamChild *source, LamChild *target,
                                      int64_t cluster_size, int64_t gran,
                                      int write_flags, LamError **errp);
void lam_block_copy_free(LamBlockCopy *s);
/* Discard each range on the source once it is in the target (push backup
 * from snapshot-access: releases the fleecing space as the copy goes). */
void lam_block_copy_set_discard_source(LamBlockCopy *s, bool discard);
/* Before any copy starts: write the target with LAM_REQ_WRITE_COMPRESSED. */
void lam_block_copy_set_compress(LamBlockCopy *s, bool compress);
/* Lets the background copy move data extents by copy offload
 * (lam_co_copy_range, x-perf.use-copy-range).  Off by default as in QEMU:
 * offloaded data that happens to be zero is stored as data, where read +
 * write would notice the zeroes and keep the target sparse.  Set before
 * copying starts. */
void lam_block_copy_set_offload(LamBlockCopy *s, bool offload);

int64_t lam_block_copy_cluster_size(LamBlockCopy *s);
int64_t lam_block_copy_len(LamBlockCopy *s);
/* Bytes still to copy. */
int64_t lam_block_copy_dirty_bytes(LamBlockCopy *s);
/* Called after every successful copy (any thread) with the bytes copied. */
void lam_block_copy_set_progress(LamBlockCopy *s, void (*cb)(void *opaque, int64_t bytes),
                                 void *opaque);
/* Marks [off, off+bytes) as not needing a copy (sync=top scan, discard). */
void lam_block_copy_reset(LamBlockCopy *s, int64_t off, int64_t bytes);
/* Would a write to the range have to copy first (a cluster still to copy,
 * or a copy of it in flight)?  Lets copy-before-write serve NOWAIT writes
 * that need no copy. */
bool lam_block_copy_needs_copy(LamBlockCopy *s, int64_t off, int64_t bytes);
bool lam_block_copy_is_dirty(LamBlockCopy *s, int64_t off, int64_t bytes);
/* Removes from the copy bitmap every range not allocated in the source's
 * top layer (sync=top).  Returns bytes removed or -errno. */
int64_t lam_block_copy_reset_unallocated(LamBlockCopy *s, LamJob *job);

/* Copy-before-write: makes sure the clusters covering [off, off+bytes) are
 * in the target (copying those still dirty, waiting for those in flight),
 * then waits for frozen reads on the range.  0 or -errno. */
int lam_block_copy_cbw(LamBlockCopy *s, int64_t off, int64_t bytes);

/* Background copy of everything dirty, from the job thread, with up to
 * max_workers requests in flight and chunks of at most max_chunk bytes
 * (0: 1 MiB).  Honours the job's speed, pauses and cancel; applies the
 * error policies.  Returns 0 when all is copied, -ECANCELED if cancelled,
 * or the error that made the job fail (*errp set). */
int lam_block_copy_run(LamBlockCopy *s, LamJob *job, int max_workers,
                       int64_t max_chunk, LamOnError on_source_error,
                       LamOnError on_target_error, LamError **errp);

/* Snapshot discard (snapshot-access): the whole clusters inside the range
 * are dropped from the snapshot: no more copy-before-write for them, their
 * target data is discarded, and snapshot reads of them fail with EACCES. */
int lam_block_copy_snapshot_discard(LamBlockCopy *s, int64_t off, int64_t bytes);

/* Snapshot read (snapshot-access over copy-before-write): reads the
 * point-in-time content of [off, off+bytes) into qiov at qoff: copied
 * regions from the target, the others from the source under a frozen
 * read.  0 or -errno. */
int lam_block_copy_snapshot_read(LamBlockCopy *s, int64_t off, int64_t bytes,
                                 LamIOV *qiov, size_t qoff);

#endif
