/* The block-node graph: what tools, the daemon and jobs use.
 *
 * A LamNode is one node of the graph (a file, a qcow2 image, a filter).
 * Nodes are connected by LamChild edges.  An edge either has a parent node
 * (named "file", "backing", "target", ...) or is a *root*: an edge held by a
 * user outside the graph (an NBD export, a job, lamina-img).  All data-path
 * I/O goes through an edge, so every access is attributable and permission
 * checked.
 *
 * Options are blockdev-add JSON objects (jansson), exactly as QMP receives
 * them: {"driver": "qcow2", "node-name": "n0", "file": {"driver": "file",
 * "filename": "a.qcow2"}}.  A child may be given inline (object) or by
 * reference (string: node-name of an existing node).  `"backing": null`
 * opens a format node without its backing file.
 *
 * THREADING (see docs/design/threading.md)
 *  - Graph changes (open, close, attach, detach, drain) happen only on the
 *    control thread (the daemon's main loop, or the tool's main thread).
 *  - The data-path functions (lam_co_* on an edge) may be called from any
 *    thread, concurrently, on the same node.  Drivers must be thread safe.
 *  - lam_drain_begin() stops new root requests and waits for all in-flight
 *    requests; the graph may then be changed; lam_drain_end() resumes.
 *
 * LOCK ORDER (outer to inner): drain gate -> node->reqs_lock -> driver locks.
 * No lock of this layer is held while a driver callback runs.
 */
#ifndef LAMINA_BLOCK_H
#define LAMINA_BLOCK_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "lamina/error.h"
#include "lamina/iov.h"

typedef struct LamNode LamNode;
typedef struct LamChild LamChild;
typedef struct LamDriver LamDriver;

/* ---- open flags ---- */
enum {
    LAM_O_RDWR = 1 << 0,
    LAM_O_NOCACHE = 1 << 1,     /* O_DIRECT on file nodes */
    LAM_O_NO_BACKING = 1 << 2,  /* don't open the backing chain */
    LAM_O_FORCE_SHARE = 1 << 3, /* share everything (read-only users) */
    LAM_O_NO_FLUSH = 1 << 4,    /* cache.no-flush */
    LAM_O_CHECK = 1 << 5,       /* opened for check: tolerate some damage */
    LAM_O_UNSAFE = 1 << 6,      /* allow opening a dirty/corrupt image RO */
};

/* ---- request flags (data path) ---- */
enum {
    LAM_REQ_FUA = 1 << 0,             /* write through before completing */
    LAM_REQ_MAY_UNMAP = 1 << 1,       /* write_zeroes may punch holes */
    LAM_REQ_NO_FALLBACK = 1 << 2,     /* write_zeroes must be fast or -ENOTSUP */
    LAM_REQ_SERIALISING = 1 << 3,     /* wait for / block overlapping requests */
    LAM_REQ_WRITE_UNCHANGED = 1 << 4, /* write does not change guest data */
    LAM_REQ_NO_SERIALISE_WAIT = 1 << 5, /* internal: already serialised */
    LAM_REQ_WRITE_COMPRESSED = 1 << 6, /* whole-cluster write, stored compressed */
    /* Fail with -EAGAIN instead of waiting for device I/O, a busy driver
     * lock or another request; nothing has changed then.  For callers that
     * would otherwise hand the request to a thread that may block (an NBD
     * connection serving page-cache hits itself).  Reads and writes only;
     * a node whose driver does not claim it answers -EAGAIN at once. */
    LAM_REQ_NOWAIT = 1 << 7,
};

/* ---- permissions on an edge (QEMU's BlockPermission) ---- */
enum {
    LAM_PERM_CONSISTENT_READ = 1 << 0,
    LAM_PERM_WRITE = 1 << 1,
    LAM_PERM_WRITE_UNCHANGED = 1 << 2,
    LAM_PERM_RESIZE = 1 << 3,
    LAM_PERM_ALL = 0xf,
};

/* ---- block status flags ---- */
enum {
    LAM_BS_DATA = 1 << 0,      /* reads return data from *file at *map */
    LAM_BS_ZERO = 1 << 1,      /* reads return zeroes */
    LAM_BS_OFFSET_VALID = 1 << 2, /* *map and *file are valid */
    LAM_BS_ALLOCATED = 1 << 3, /* content comes from this layer (not backing) */
    LAM_BS_EOF = 1 << 4,       /* range reaches the end of the node */
    LAM_BS_RECURSE = 1 << 5,   /* driver: ask *file about zero-ness too */
};

/* ---- preallocation modes ---- */
typedef enum {
    LAM_PREALLOC_OFF,
    LAM_PREALLOC_METADATA,
    LAM_PREALLOC_FALLOC,
    LAM_PREALLOC_FULL,
} LamPrealloc;
int lam_prealloc_parse(const char *s, LamPrealloc *out); /* 0 / -EINVAL */
const char *lam_prealloc_name(LamPrealloc p);

/* Limits of a node, in bytes.  0 means "no limit"/"no preference". */
typedef struct LamLimits {
    uint32_t request_alignment;  /* >= 1, power of two */
    uint32_t max_transfer;
    uint32_t opt_transfer;
    uint32_t pdiscard_alignment;
    uint32_t pwrite_zeroes_alignment;
    uint32_t max_pwrite_zeroes;
    uint32_t min_mem_alignment;  /* buffer alignment for O_DIRECT */
} LamLimits;

/* An edge.  Fields are read-only for users; the graph code owns them. */
struct LamChild {
    char *name;           /* "file", "backing", "root", "target", ... */
    LamNode *node;        /* the child node */
    LamNode *parent;      /* NULL for a root edge */
    char *user;           /* for roots: "an unnamed block device", "backup job 'j0'" */
    uint64_t perm;        /* LAM_PERM_* taken */
    uint64_t shared;      /* LAM_PERM_* allowed to others */
    bool frozen;          /* jobs freeze backing links they depend on */
    LamChild *next_parent; /* in node->parents list */
};

/* ---- opening, graph ---- */

/* Opens a node (and its inline children) from blockdev-add options.
 * Top-level "node-name" is registered globally.  Returns a node with one
 * reference owned by the caller (the daemon's monitor, or the tool). */
LamNode *lam_node_open(json_t *opts, int flags, LamError **errp);

/* Opens an image file the way qemu-img does: `format` NULL probes (with
 * the raw-probing restrictions), `extra` (may be NULL) is merged into the
 * format node's options (e.g. {"backing": null}). */
LamNode *lam_open_image(const char *filename, const char *format, int flags,
                        json_t *extra, LamError **errp);

void lam_node_ref(LamNode *bs);
void lam_node_unref(LamNode *bs); /* closes and frees at zero */

LamNode *lam_node_find(const char *node_name);
/* Calls fn for every named (registered) node, in creation order. */
void lam_node_foreach(void (*fn)(LamNode *bs, void *opaque), void *opaque);
/* Makes a node findable by name (e.g. after lam_open_image). */
int lam_node_set_name(LamNode *bs, const char *name, LamError **errp);

/* Root edge for an outside user.  perm/shared are checked against the
 * node's other users; conflicts give QEMU's "Permission conflict" message. */
LamChild *lam_root_attach(LamNode *bs, const char *user, uint64_t perm,
                          uint64_t shared, LamError **errp);
void lam_root_detach(LamChild *root);
int lam_child_set_perm(LamChild *c, uint64_t perm, uint64_t shared,
                       LamError **errp);
/* Moves every parent edge of `from` (roots included) onto `to`, except the
 * edges whose parent is `to` or below `to` (moving those would make a
 * cycle) -- QEMU's bdrv_replace_node; used to insert and remove job
 * filters.  Checks permissions first; on failure nothing changes.  Control thread, inside a drained section. */
int lam_node_replace(LamNode *from, LamNode *to, LamError **errp);

/* ---- accessors ---- */
const char *lam_node_name(const LamNode *bs);       /* "" if unnamed */
const char *lam_node_filename(const LamNode *bs);   /* image path or "" */
const LamDriver *lam_node_driver(const LamNode *bs);
const char *lam_node_format(const LamNode *bs);     /* driver name */
bool lam_node_is_read_only(const LamNode *bs);
LamChild *lam_node_file(const LamNode *bs);         /* may be NULL */
LamChild *lam_node_backing(const LamNode *bs);      /* may be NULL */
LamChild *lam_node_child(const LamNode *bs, const char *name);
/* Iterates children: start with NULL. */
LamChild *lam_node_next_child(const LamNode *bs, LamChild *prev);
LamChild *lam_node_parents(const LamNode *bs);      /* first; ->next_parent */
/* The node a filter or format passes data to: backing for formats, the
 * filtered child for filters, NULL for protocols. */
LamNode *lam_node_backing_node(const LamNode *bs);
/* Backing file name/format as recorded in the image header (may be NULL). */
const char *lam_node_backing_file(const LamNode *bs);
const char *lam_node_backing_format(const LamNode *bs);
const LamLimits *lam_node_limits(const LamNode *bs);
json_t *lam_node_options(const LamNode *bs); /* borrowed */
int64_t lam_node_length(LamNode *bs); /* bytes, or -errno */
/* Bytes allocated on the host for this node and its file children. */
int64_t lam_node_allocated_size(LamNode *bs);
/* Number of in-flight requests on this node (for tests and drain). */
int lam_node_in_flight(LamNode *bs);
/* Node-level format-specific info (QEMU's ImageInfo fields the driver
 * knows: "cluster-size", "dirty-flag", "format-specific"), merged into
 * out.  Returns 0 or -errno. */
int lam_node_get_info(LamNode *bs, json_t *out, LamError **errp);

/* ---- data path (any thread) ---- */
int lam_co_preadv(LamChild *c, int64_t off, int64_t bytes, LamIOV *qiov,
                  int flags);
int lam_co_pwritev(LamChild *c, int64_t off, int64_t bytes, LamIOV *qiov,
                   int flags);
int lam_co_pread(LamChild *c, int64_t off, int64_t bytes, void *buf, int flags);
int lam_co_pwrite(LamChild *c, int64_t off, int64_t bytes, const void *buf,
                  int flags);
int lam_co_pwrite_zeroes(LamChild *c, int64_t off, int64_t bytes, int flags);
int lam_co_pdiscard(LamChild *c, int64_t off, int64_t bytes);
int lam_co_flush(LamChild *c);
/* Copies [src_off, src_off+bytes) of src to dst_off in dst without passing
 * the data through user space (copy offload, see driver.h).  Needs write
 * permission on dst.  flags: LAM_REQ_SERIALISING (on the dst request).
 * Returns 0 or -errno; -ENOTSUP when some layer can't offload this range
 * (then nothing or part of it was copied: read and write it instead). */
int lam_co_copy_range(LamChild *src, int64_t src_off, LamChild *dst,
                      int64_t dst_off, int64_t bytes, int flags);
/* The destination half, for drivers at the bottom of the source chain. */
int lam_co_copy_range_to(LamChild *src, int64_t src_off, LamChild *dst,
                         int64_t dst_off, int64_t bytes, int flags);
/* Status of [off, off+bytes) in this node only.  Returns LAM_BS_* flags or
 * -errno; *pnum (> 0 unless at EOF) is the length with the same status. */
int lam_co_block_status(LamChild *c, int64_t off, int64_t bytes,
                        int64_t *pnum, int64_t *map, LamNode **file);
/* Status through the backing chain from c->node down to (not including)
 * `base` (NULL = whole chain).  *depth: 1 = top node, 2 = its backing, ...;
 * 0 if unallocated in the whole chain. */
int lam_co_block_status_above(LamChild *c, LamNode *base, int64_t off,
                              int64_t bytes, int64_t *pnum, int64_t *map,
                              LamNode **file, int *depth);
int lam_co_truncate(LamChild *c, int64_t size, bool exact, LamPrealloc prealloc,
                    LamError **errp);

/* ---- quiesce ---- */
void lam_drain_begin(void);
void lam_drain_end(void);
/* Called around the outermost drained section (before the gate closes,
 * after it opens), on the control thread: jobs pause their own I/O. */
typedef void (*LamDrainHook)(void);
void lam_drain_set_hooks(LamDrainHook begin, LamDrainHook end);

/* ---- creation and maintenance (control thread) ---- */

/* Creates an image the way blockdev-create does: opts has "driver" and the
 * driver's creation options (qcow2: "file" node reference, "size",
 * "cluster-size", "backing-file", ...). */
int lam_create(json_t *opts, LamError **errp);
/* Convenience for tools: creates `filename` with format `fmt` (file
 * protocol underneath).  fmt_opts holds format options in blockdev-create
 * naming (may be NULL). */
int lam_create_image(const char *filename, const char *fmt, int64_t size,
                     json_t *fmt_opts, LamError **errp);

typedef enum { LAM_CHECK_NONE = 0, LAM_FIX_LEAKS = 1, LAM_FIX_ERRORS = 2 } LamCheckMode;
typedef struct LamCheckResult {
    int corruptions;
    int leaks;
    int check_errors;
    int corruptions_fixed;
    int leaks_fixed;
    int64_t image_end_offset;
    int64_t total_clusters;
    int64_t allocated_clusters;
    int64_t fragmented_clusters;
    int64_t compressed_clusters;
    bool supported;   /* false: the format has no check */
    char *msgs;       /* human-readable findings, one per line (malloc) */
} LamCheckResult;
int lam_node_check(LamNode *bs, LamCheckResult *res, LamCheckMode mode);

/* qemu-img measure. in may be NULL (size only). */
typedef struct LamMeasure {
    int64_t required;
    int64_t fully_allocated;
} LamMeasure;
int lam_measure(const char *fmt, json_t *fmt_opts, LamNode *in, int64_t size,
                LamMeasure *out, LamError **errp);

/* Changes the backing file name/format recorded in the image header only
 * (rebase -u).  NULL file removes the backing file. */
int lam_node_change_backing_file(LamNode *bs, const char *file,
                                 const char *fmt, LamError **errp);
/* Marks the image clean, flushes everything (used before close). */
int lam_node_flush_all(LamNode *bs);

/* Format probing over the first bytes of an image.  Returns the driver
 * name ("raw" if nothing else matches). */
const char *lam_probe_format(const uint8_t *buf, int len, const char *filename);

/* Path helpers: resolves a backing file name relative to the folder of the
 * image that names it (absolute names and protocol names stay as they are). */
char *lam_path_combine(const char *base_image, const char *name);

/* Registry of drivers: the built-in ones plus any registered at run time
 * (tests register recording/fault drivers).  Not thread safe: register
 * before opening nodes. */
const LamDriver *lam_driver_find(const char *name);
void lam_driver_register(const LamDriver *drv);

#endif
