/* The driver contract.
 *
 * A driver is a `static const LamDriver` table, registered in
 * src/block/registry.c.  The core (src/block/io.c) checks ranges and
 * permissions, aligns requests to bl.request_alignment (read-modify-write
 * for unaligned writes), splits at bl.max_transfer, tracks in-flight
 * requests, and emulates what a driver leaves NULL:
 *   pwrite_zeroes -> pwritev of a zero buffer
 *   FUA (not in supported_write_flags) -> pwritev then flush
 *   pdiscard -> success, nothing done (discard is advisory)
 *   flush -> flush of every child
 *   block_status -> protocol: all DATA|OFFSET_VALID; filter: forwarded
 *   any data callback of a FILTER -> forwarded to its filtered child
 *   copy_range_from/_to -> -ENOTSUP (the caller reads and writes); a
 *     FILTER without preadv (source side) / pwritev (destination side)
 *     is passed through, one that looks at the data is not
 *
 * Copy offload is dispatched from both ends (lam_co_copy_range): the
 * source chain is walked first through copy_range_from -- a format maps
 * its side to its file child and calls lam_co_copy_range() on that edge;
 * the protocol at the bottom calls lam_co_copy_range_to(), which walks the
 * destination chain through copy_range_to in the same way, until the
 * protocol there moves the bytes (the file driver: copy_file_range()
 * between two file nodes).  A driver returns -ENOTSUP for any part it
 * can't map (unallocated or compressed source clusters, partial
 * destination clusters); the caller then falls back to read + write of the
 * whole range, so a partly done copy is harmless.
 *
 * Callbacks run on any thread, concurrently on the same node: a driver
 * protects its own state (each lock in a driver says what it protects).
 * A driver callback may block on I/O.  Callbacks return 0 / -errno on the
 * data path; open/create/etc. also set *errp with a message that names the
 * object and the reason.
 *
 * Offsets handed to the driver are aligned to bl.request_alignment and
 * within the node's length (reads past EOF are zero-filled by the core).
 *
 * LAM_REQ_NOWAIT reaches preadv/pwritev only if the driver lists it in
 * supported_read_flags/supported_write_flags: the driver then returns
 * -EAGAIN, before changing anything, wherever it would wait for device
 * I/O, a contended lock or another request, and passes the flag on to the
 * child requests it makes.  A buffered write of whole pages counts as not
 * waiting (it only copies into the page cache).
 */
#ifndef LAMINA_DRIVER_H
#define LAMINA_DRIVER_H

#include <pthread.h>
#include <stdatomic.h>

#include "lamina/block.h"

typedef enum { LAM_DRV_PROTOCOL, LAM_DRV_FORMAT, LAM_DRV_FILTER } LamDriverKind;

typedef struct LamNodeInfo LamNodeInfo;

struct LamDriver {
    const char *name;
    LamDriverKind kind;
    size_t state_size;           /* bs->opaque is calloc'ed with this size */
    bool supports_backing;       /* core opens "backing" after open() */
    /* Reads that fall through to the backing file re-check the node's
     * mapping afterwards and re-read what was allocated meanwhile (see
     * "Backing fall-through reads" below). */
    bool revalidates_backing_reads;
    uint32_t supported_write_flags; /* LAM_REQ_FUA / LAM_REQ_NOWAIT if the driver does it */
    uint32_t supported_read_flags;  /* LAM_REQ_NOWAIT if preadv honours it */
    uint32_t supported_zero_flags;  /* LAM_REQ_MAY_UNMAP | LAM_REQ_FUA | NO_FALLBACK */
    /* Option names accepted besides the common ones (driver, node-name,
     * read-only, cache, discard, detect-zeroes, auto-read-only,
     * force-share); NULL-terminated.  Unknown options are refused with
     * "Parameter 'x' is unexpected" style errors by the QMP layer. */
    const char *const *option_names;

    /* Score for the first bytes of an image (0 = not mine; raw is 1,
     * qcow2 100).  NULL for drivers that can't be probed. */
    int (*probe)(const uint8_t *buf, int len, const char *filename);

    /* Opens the node.  Children are opened by the driver with
     * lam_open_child().  Sets bs->bl, bs->total_size (or get_length),
     * bs->backing_file/backing_format (formats), bs->filename. */
    int (*open)(LamNode *bs, json_t *opts, int flags, LamError **errp);
    void (*close)(LamNode *bs);
    /* Current length in bytes (if NULL, bs->total_size is used). */
    int64_t (*get_length)(LamNode *bs);
    void (*refresh_limits)(LamNode *bs);
    /* Adds QEMU ImageInfo members this driver knows (cluster-size,
     * dirty-flag, format-specific) to out. */
    int (*get_info)(LamNode *bs, json_t *out, LamError **errp);
    int64_t (*get_allocated_size)(LamNode *bs);

    int (*preadv)(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags);
    int (*pwritev)(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags);
    int (*pwrite_zeroes)(LamNode *bs, int64_t off, int64_t bytes, int flags);
    int (*pdiscard)(LamNode *bs, int64_t off, int64_t bytes);
    /* Copy offload, see above.  src->node == bs (from) / dst->node == bs
     * (to); offsets are aligned to both nodes' request_alignment. */
    int (*copy_range_from)(LamNode *bs, LamChild *src, int64_t off,
                           LamChild *dst, int64_t dst_off, int64_t bytes,
                           int flags);
    int (*copy_range_to)(LamNode *bs, LamChild *src, int64_t src_off,
                         LamChild *dst, int64_t off, int64_t bytes, int flags);
    /* Writes back the driver's own caches and makes its writes to its
     * children durable in order (it may flush children itself for
     * ordering).  The core then flushes every writable child edge. */
    int (*flush)(LamNode *bs);
    /* Flags as in block.h.  A format returns LAM_BS_ALLOCATED for ranges
     * that belong to this layer; 0 for "ask the backing file". */
    int (*block_status)(LamNode *bs, int64_t off, int64_t bytes, int64_t *pnum,
                        int64_t *map, LamNode **file);
    int (*truncate)(LamNode *bs, int64_t size, bool exact, LamPrealloc prealloc,
                    LamError **errp);

    /* Maintenance. */
    int (*create)(json_t *opts, LamError **errp);
    int (*check)(LamNode *bs, LamCheckResult *res, LamCheckMode mode);
    int (*measure)(json_t *fmt_opts, LamNode *in, int64_t size, LamMeasure *out,
                   LamError **errp);
    int (*change_backing_file)(LamNode *bs, const char *file, const char *fmt,
                               LamError **errp);
    /* Flush caches and mark the image clean (before close, on quit). */
    int (*inactivate)(LamNode *bs);

    /* Permissions this node needs on a child, given what its own parents
     * need (cumulative perm/shared of all parent edges).  NULL: default
     * rules (see src/block/perm.c). */
    void (*child_perm)(LamNode *bs, LamChild *c, uint64_t parent_perm,
                       uint64_t parent_shared, uint64_t *perm, uint64_t *shared);
};

/* A tracked in-flight request (src/block/io.c). */
typedef struct LamTrackedReq {
    int64_t off, bytes;
    bool serialising;
    bool write;
    struct LamTrackedReq *prev, *next;
} LamTrackedReq;

struct LamNode {
    const LamDriver *drv;
    void *opaque;              /* driver state */
    char *node_name;           /* registered name, or "#blockNNN" */
    bool named;                /* user gave the name (blockdev-add) */
    char *filename;            /* what info shows as "filename" */
    char *backing_file;        /* as recorded in the header (formats) */
    char *backing_format;
    json_t *options;           /* options it was opened with (owned) */
    int open_flags;
    bool read_only;
    bool probed_raw;           /* raw chosen by probing: guard sector 0 */
    bool implicit;             /* job-inserted filter: hidden from queries */
    LamLimits bl;
    _Atomic int64_t total_size; /* length in bytes when drv->get_length is NULL */

    /* Graph (control thread only). */
    LamChild **children;       /* owned edges to children */
    int nchildren;
    LamChild *parents;         /* singly linked via next_parent */
    int refcnt;

    /* Request tracking.  reqs_lock protects reqs and reqs_waiters;
     * reqs_cond is broadcast when a request leaves while someone waits. */
    pthread_mutex_t reqs_lock;
    pthread_cond_t reqs_cond;
    LamTrackedReq *reqs;
    int reqs_waiters;
    _Atomic int in_flight;
    /* Write hooks (dirty bitmaps, thresholds) come later; writes notify
     * them after success. */
    _Atomic uint64_t wr_highest_offset;

    struct LamNode *reg_next;  /* registry list */
    uint64_t serial;
};

/* ---- Backing fall-through reads ----
 * Classic fleecing: copy-before-write writes the old data of the source
 * into a temp node B whose backing file is the source, then lets the guest
 * write change the source.  A read of B that found a cluster unallocated
 * and reads it from the backing file may see that new data.  QEMU makes
 * the copy wait for such reads (serialising requests): the guest write
 * then waits for whole backup-tool reads.  A driver with
 * revalidates_backing_reads instead notes a mapping generation before the
 * backing read and, if it changed by the end, looks the range up again and
 * re-reads what became allocated: the copy into B precedes the guest
 * write, so new data in the backing read implies a changed mapping.
 * Nobody waits. */
/* Test switch: LAMINA_DEBUG_NO_FLEECING_GUARD=1 turns off the re-check and
 * copy-before-write's serialising writes, so that the fleecing stress tests
 * can show they catch the race. */
bool lam_debug_no_fleecing_guard(void);


/* Opens (or looks up, for a string reference) the child `name` given in
 * opts and attaches it to parent with the default permissions for its
 * role.  allow_none: absent or null child returns NULL without error. */
LamChild *lam_open_child(LamNode *parent, json_t *opts, const char *name,
                         bool allow_none, LamError **errp);
/* Attaches an existing node as a child (takes a new reference). */
LamChild *lam_attach_child(LamNode *parent, LamNode *child, const char *name,
                           LamError **errp);
void lam_detach_child(LamChild *c);

/* Option helpers (jansson).  Missing key -> default. A present key of the
 * wrong type sets errp "Invalid parameter type for 'key', expected: T". */
const char *lam_opt_str(json_t *opts, const char *key, const char *def);
int64_t lam_opt_int(json_t *opts, const char *key, int64_t def, LamError **errp);
bool lam_opt_bool(json_t *opts, const char *key, bool def, LamError **errp);

/* Core-internal I/O that skips permission checks: drivers use the lam_co_*
 * functions on their child edges; these exist for the core itself. */
int lam_node_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags);

#endif
