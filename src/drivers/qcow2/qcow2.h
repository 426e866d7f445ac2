/* qcow2 driver: shared state and internal interfaces.
 * Invariants and the locking model are documented at the top of qcow2.c
 * and in docs/design/qcow2.md. */
#ifndef LAMINA_QCOW2_H
#define LAMINA_QCOW2_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "lamina/driver.h"

#define QCOW2_MAGIC 0x514649fbu
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_L1_BYTES (32 * 1024 * 1024)      /* QEMU's limit */
#define QCOW2_MAX_RT_BYTES (8 * 1024 * 1024)       /* QEMU's limit */
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_TABLE (64 * 1024 * 1024)

/* incompatible features */
#define QCOW2_INCOMPAT_DIRTY (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2 (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN 0x1full
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW (1ull << 1)

/* header extension types */
#define QCOW2_EXT_END 0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE 0x6803f857u
#define QCOW2_EXT_BITMAPS 0x23852875u
#define QCOW2_EXT_CRYPTO 0x0537be77u
#define QCOW2_EXT_DATA_FILE 0x44415441u

/* table entry bits */
#define QCOW2_OFLAG_COPIED (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO (1ull << 0)
#define QCOW2_L1_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_L2_OFFSET_MASK 0x00fffffffffffe00ull
#define QCOW2_RT_OFFSET_MASK 0xfffffffffffffe00ull

#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* Kind of a guest cluster, from its L2 entry. */
typedef enum {
    QC_UNALLOC,     /* reads from backing / zero */
    QC_ZERO_PLAIN,  /* zero flag, no host cluster */
    QC_ZERO_ALLOC,  /* zero flag with a preallocated host cluster */
    QC_NORMAL,      /* data in a host cluster */
    QC_COMPRESSED,
} Qcow2ClusterType;

typedef struct Qcow2Cache Qcow2Cache;

/* A header extension we keep verbatim (anything but backing format and
 * the end marker) so a header rewrite preserves it. */
typedef struct Qcow2Ext {
    uint32_t type;
    uint32_t len;
    uint8_t *data;
    struct Qcow2Ext *next;
} Qcow2Ext;

/* An in-flight operation on guest clusters [start, end), registered under
 * the metadata lock.  IO entries are lockless data I/O through a mapping
 * looked up earlier; ALLOC entries serialise changes of the mapping. */
enum { QC_INFLIGHT_IO, QC_INFLIGHT_ALLOC };
typedef struct Qcow2Inflight {
    int64_t start, end;
    int kind;
    uint64_t seq;
    struct Qcow2Inflight *prev, *next;
} Qcow2Inflight;

typedef struct Qcow2State {
    LamNode *bs;
    LamChild *file;
    const char *name;          /* image filename for messages (bs->filename) */

    /* Immutable after open (except as noted). */
    int version;
    int cluster_bits;
    int64_t cluster_size;
    int l2_bits;               /* log2 of entries per L2 table */
    int64_t l2_entries;
    int refcount_order;
    int refcount_bits;
    int rb_bits;               /* log2 of entries per refcount block */
    uint64_t refcount_max;
    uint32_t header_length;
    uint8_t *header_raw;       /* header bytes [0, header_length) as read */
    int compression_type;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t compat, autoclear;
    bool lazy_refcounts;
    bool has_bitmaps_ext;
    uint64_t bitmaps_dir_offset, bitmaps_dir_size;
    uint32_t nb_bitmaps;

    /* Reads and in-place overwrites count their data I/O (I5) in
     * io_count[io_phase], entered under `lock` with the lookup and left
     * with one atomic (qcow2-io.c: io_enter/io_leave).  qc_wait_grace
     * flips io_phase under the lock and waits for the old counter to
     * drain; io_waiters tells the last one out to wake it. */
    _Atomic unsigned io_phase;
    _Atomic long io_count[2];
    _Atomic int io_waiters;

    /* Everything below is protected by `lock`: the metadata lock.  It is
     * held for lookups and mapping changes, never across guest data I/O
     * of reads or in-place overwrites. */
    pthread_mutex_t lock;
    pthread_cond_t inflight_cond; /* signalled when an inflight entry leaves */
    Qcow2Inflight *inflight;
    uint64_t inflight_seq;
    int inflight_waiters;
    bool grace_busy;           /* a qc_wait_grace is waiting for io_count */
    /* Bumped (under lock) before any L2 entry changes; read without the
     * lock by reads that fell through to the backing file, to learn that
     * the mapping may have changed under them (driver.h "Backing
     * fall-through reads"). */
    _Atomic uint64_t map_gen;
    bool no_recheck;           /* test switch, set at open */

    uint64_t incompat;         /* as on disk */
    _Atomic int64_t size;      /* virtual size (read without lock) */
    uint32_t l1_size;
    uint64_t l1_offset;
    uint64_t *l1;              /* host byte order */
    uint64_t rt_offset;
    uint32_t rt_clusters;
    int64_t rt_entries;
    uint64_t *rt;              /* host byte order */
    Qcow2Cache *l2_cache;
    Qcow2Cache *rb_cache;
    bool l2_needs_flush;       /* data/refcounts written since the last file flush */
    int64_t free_cluster_index;
    int64_t free_byte_offset;  /* compressed-data tail of a cluster, 0 = none */
    int64_t file_end;          /* bytes: file size at open, grown by allocation */
    Qcow2Ext *exts;
    bool marked_dirty;         /* we set the dirty bit (lazy refcounts) */
    _Atomic bool corrupt;
    bool read_only;
} Qcow2State;

/* ---- big-endian helpers ---- */
static inline uint16_t qbe16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t qbe32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t qbe64(const uint8_t *p) { return (uint64_t)qbe32(p) << 32 | qbe32(p + 4); }
static inline void qst16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static inline void qst32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline void qst64(uint8_t *p, uint64_t v) { qst32(p, v >> 32); qst32(p + 4, (uint32_t)v); }

static inline int64_t qc_align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }
static inline int64_t qc_div_up(int64_t v, int64_t a) { return (v + a - 1) / a; }
static inline int64_t qc_start_of_cluster(const Qcow2State *s, int64_t off)
{
    return off & ~(s->cluster_size - 1);
}

/* ---- qcow2-cache.c (all calls with s->lock held) ---- */
Qcow2Cache *qc_cache_new(int n, int64_t entry_size, bool is_l2);
void qc_cache_free(Qcow2Cache *c);
/* Gets the table at `offset` (reads it unless `fresh`: then zero-filled).
 * The pointer stays valid until qc_cache_put. */
int qc_cache_get(Qcow2State *s, Qcow2Cache *c, uint64_t offset, bool fresh,
                 uint8_t **table);
void qc_cache_put(Qcow2Cache *c, uint8_t *table);
/* Whether the table at offset is cached (a get would do no I/O). */
bool qc_cache_has(Qcow2Cache *c, uint64_t offset);
void qc_cache_mark_dirty(Qcow2Cache *c, uint8_t *table);
/* Writes all dirty tables, honouring the flush order (L2 after refcounts
 * and a flush of the file). */
int qc_cache_writeback(Qcow2State *s, Qcow2Cache *c);
/* Same, each dirty entry written with FUA: durable without flushing the
 * rest of the file (ordering points that need only the metadata). */
int qc_cache_writeback_fua(Qcow2State *s, Qcow2Cache *c);
/* Forgets the table at offset (its cluster was freed). */
void qc_cache_discard(Qcow2Cache *c, uint64_t offset);
void qc_cache_clear(Qcow2Cache *c);
int qc_flush_metadata(Qcow2State *s); /* rb, then l2, then file flush */

/* ---- qcow2-refcount.c (s->lock held) ---- */
int qc_get_refcount(Qcow2State *s, int64_t cluster_index, uint64_t *rc);
/* Adds delta to the refcount of every cluster touching [off, off+len). */
int qc_update_refcount(Qcow2State *s, int64_t off, int64_t len, int64_t delta);
/* Allocates n contiguous free clusters; returns host offset or -errno. */
int64_t qc_alloc_clusters(Qcow2State *s, int64_t n);
/* Allocates len (< cluster size) bytes for compressed data. */
int64_t qc_alloc_bytes(Qcow2State *s, int64_t len);
int qc_refcount_load_table(Qcow2State *s, LamError **errp);
uint64_t qc_rb_get(const uint8_t *block, int order, int64_t idx);
void qc_rb_set(uint8_t *block, int order, int64_t idx, uint64_t v);

/* ---- qcow2-cluster.c (s->lock held) ---- */
Qcow2ClusterType qc_entry_type(const Qcow2State *s, uint64_t entry);
/* Looks up guest [off, off+bytes): returns the type of the first cluster
 * and in *run the number of bytes from off with the same type and (for
 * normal clusters) contiguous host offsets, within one L2 table.  *entry
 * is the L2 entry of the first cluster. */
int qc_lookup(Qcow2State *s, int64_t off, int64_t bytes, int64_t *run,
              uint64_t *entry);
/* L2 table for guest offset, allocated/COWed if needed; *table from the
 * L2 cache (put it back with qc_cache_put). */
int qc_get_l2_for_write(Qcow2State *s, int64_t off, uint8_t **table);
int qc_l2_table_for_read(Qcow2State *s, int64_t off, uint8_t **table);
/* Host clusters referenced by an L2 entry (for freeing). */
void qc_entry_host_range(const Qcow2State *s, uint64_t entry, int64_t *off,
                         int64_t *len);
void qc_compressed_params(const Qcow2State *s, uint64_t entry, int64_t *coff,
                          int64_t *csize);
int qc_grow_l1(Qcow2State *s, int64_t min_size);
int qc_write_l1_entry(Qcow2State *s, int64_t idx);

/* ---- qcow2.c ---- */
void qc_signal_corruption(Qcow2State *s, int64_t offset, int64_t size,
                          const char *fmt, ...) __attribute__((format(printf, 4, 5)));
int qc_mark_dirty(Qcow2State *s);
int qc_write_header_field(Qcow2State *s, int off, int len, uint64_t v);
int qc_rewrite_header(Qcow2State *s, const char *backing, const char *fmt,
                      LamError **errp);
void qc_fill_default_feature_table(uint8_t **data, uint32_t *len);

/* ---- qcow2-io.c ---- */
int qc_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags);
int qc_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags);
int qc_copy_range_from(LamNode *bs, LamChild *src, int64_t off, LamChild *dst,
                       int64_t dst_off, int64_t bytes, int flags);
int qc_copy_range_to(LamNode *bs, LamChild *src, int64_t src_off, LamChild *dst,
                     int64_t off, int64_t bytes, int flags);
int qc_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags);
int qc_pdiscard(LamNode *bs, int64_t off, int64_t bytes);
int qc_block_status(LamNode *bs, int64_t off, int64_t bytes, int64_t *pnum,
                    int64_t *map, LamNode **file);
int qc_preallocate(Qcow2State *s, int64_t start, int64_t end, LamPrealloc mode,
                   LamError **errp);
/* Makes whole clusters unallocated, dropping their data (shrink). */
int qc_deallocate(Qcow2State *s, int64_t off, int64_t bytes);
/* Waits (lock held) until no IO entry older than seq overlaps [a, b). */
void qc_wait_grace(Qcow2State *s, int64_t a, int64_t b, uint64_t seq);

/* ---- qcow2-compress.c ---- */
/* Returns the compressed length, or -ENOSPC if it would not shrink. */
int64_t qc_compress(int type, uint8_t *dst, int64_t dst_len, const uint8_t *src,
                    int64_t src_len);
int qc_decompress(int type, uint8_t *dst, int64_t dst_len, const uint8_t *src,
                  int64_t src_len);

/* ---- qcow2-check.c ---- */
int qc_check(LamNode *bs, LamCheckResult *res, LamCheckMode mode);
int qc_check_state(Qcow2State *s, LamCheckResult *res, LamCheckMode mode);

/* ---- qcow2-create.c ---- */
int qc_create(json_t *opts, LamError **errp);
int qc_measure(json_t *fmt_opts, LamNode *in, int64_t size, LamMeasure *out,
               LamError **errp);
int qc_truncate(LamNode *bs, int64_t size, bool exact, LamPrealloc prealloc,
                LamError **errp);

extern const LamDriver lam_drv_qcow2;

#endif
