/* lamina-img convert.
 *
 * Several worker threads each take the next chunk (at most IMG_CHUNK, cut
 * at block-status boundaries of the source), read it, and write it.
 * Without -W the writes are issued in guest order (a ticket per chunk) so
 * the target's host layout follows the guest layout; reads still overlap.
 * With -W writes go out as soon as their data is there.
 *
 * What is written: source ranges that read as zero are skipped when the
 * target starts zeroed (freshly created without backing), else written as
 * zeroes.  Inside data, runs of zeroes of at least -S bytes are treated the
 * same way.  With -B, the target gets the backing file and only clusters
 * whose content differs from the backing file are written. */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"
#include "tools/img-fmtopts.h"

#define MAX_SOURCES 64

typedef struct Conv {
    /* Several sources are concatenated, as qemu-img does. */
    ImgImage src[MAX_SOURCES];
    int nsrc;
    int64_t src_start[MAX_SOURCES + 1]; /* offset of each source; [nsrc] = end */
    int64_t src_len[MAX_SOURCES];       /* its length; its slot is rounded
                                         * up to 512 bytes as in qemu-img */
    ImgImage dst, base;
    bool has_base;
    LamNode *src_base;   /* the -B file inside the source's chain, if there */
    int64_t size;        /* bytes to write: the target's length when we
                          * created it (rounded up to 512), else the source's */
    int64_t src_size;
    int64_t base_size;
    int64_t gran;        /* write granularity: target cluster (or 4k) */
    int64_t chunk;
    int64_t sparse;      /* -S in bytes */
    bool full;           /* -S 0: write every byte, the target is fully
                          * allocated (no status or zero checks) */
    bool compress;
    bool target_zeroed;  /* target reads as zeroes before we write */
    bool ordered;        /* no -W */

    /* lock protects everything below (scheduling state shared by the
     * workers); cond is broadcast when write_seq, writers or err change. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int64_t next_off;
    int64_t st_end;      /* end of the cached source status extent */
    bool st_zero;        /* that extent reads as zeroes */
    bool st_skip;        /* that extent comes from the -B file itself */
    uint64_t next_seq, write_seq;
    int writers;         /* writes in progress */
    int max_writers;     /* -W: writes allowed at once */
    int err;
    int64_t err_off;     /* where the first failed request started */
    bool err_read;       /* it was a read */
    int64_t done;
} Conv;

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* The source holding byte off (off < src_size). */
static int src_index(Conv *c, int64_t off)
{
    int i = 0;
    while (i + 1 < c->nsrc && off >= c->src_start[i + 1]) {
        i++;
    }
    return i;
}

/* Reads [off, off+len) of the concatenated sources; zeroes past them. */
static int read_sources(Conv *c, int64_t off, int64_t len, uint8_t *buf)
{
    while (len > 0) {
        if (off >= c->src_size) {
            memset(buf, 0, len);
            return 0;
        }
        int i = src_index(c, off);
        int64_t n = min64(len, c->src_start[i + 1] - off);
        int64_t lo = off - c->src_start[i];
        int64_t have = min64(n, c->src_len[i] - lo);
        if (have > 0) {
            int r = lam_co_pread(c->src[i].root, lo, have, buf, 0);
            if (r < 0) {
                return r;
            }
        } else {
            have = 0;
        }
        memset(buf + have, 0, n - have);
        off += n;
        buf += n;
        len -= n;
    }
    return 0;
}

/* Under c->lock: refreshes the cached source status at c->next_off. */
static int refresh_status(Conv *c)
{
    int64_t o = c->next_off;
    if (c->full) {
        c->st_end = c->size;
        c->st_zero = false;
        c->st_skip = false;
        return 0;
    }
    if (o >= c->src_size) {
        /* Tail of a target rounded up past the source: zeroes. */
        c->st_end = c->size;
        c->st_zero = true;
        c->st_skip = false;
        return 0;
    }
    int64_t pnum = 0, map;
    LamNode *file;
    int depth = 0;
    int i = src_index(c, o);
    int64_t lo = o - c->src_start[i], left = c->src_len[i] - lo;
    if (left <= 0) {
        /* The rounding tail of a source whose length isn't a multiple
         * of 512. */
        c->st_end = c->src_start[i + 1];
        c->st_zero = true;
        c->st_skip = false;
        return 0;
    }
    int st = lam_co_block_status_above(c->src[i].root, c->src_base, lo, left,
                                       &pnum, &map, &file, &depth);
    if (st < 0) {
        return st;
    }
    if (pnum <= 0 || pnum > left) {
        pnum = left;
    }
    c->st_end = o + pnum;
    c->st_zero = (st & LAM_BS_ZERO) || depth == 0;
    /* Unallocated above the -B file: the target's backing has it. */
    c->st_skip = c->src_base && depth == 0;
    return 0;
}

/* Under c->lock: picks the next chunk that needs work.  Ranges that need
 * none (zeroes on a zeroed target, ranges the -B file provides) are
 * passed over here in whole extents, without tickets or wake-ups.
 * Returns false when done. */
static bool next_chunk(Conv *c, int64_t *off, int64_t *len, bool *zero,
                       bool *skip, uint64_t *seq)
{
    for (;;) {
        if (c->err || c->next_off >= c->size) {
            return false;
        }
        int64_t o = c->next_off;
        if (o >= c->st_end) {
            int r = refresh_status(c);
            if (r < 0) {
                c->err = r;
                pthread_cond_broadcast(&c->cond);
                return false;
            }
        }
        bool z = c->st_zero, sk = c->st_skip;
        /* Data moves in buffers of c->chunk; zero writes need no buffer. */
        int64_t limit = z || sk ? IMG_BIG_CHUNK : c->chunk;
        int64_t end = min64(c->st_end, o + limit);
        /* Chunks end on granule boundaries so that no two workers write
         * the same target cluster; a granule spanning two status extents
         * is handled as data. */
        int64_t aend = (end + c->gran - 1) / c->gran * c->gran;
        if (aend > c->size) {
            aend = c->size;
        }
        if (aend != end) {
            if (aend > c->st_end) {
                if (z || sk) {
                    /* Stop before the mixed granule; it comes next as data. */
                    int64_t down = end / c->gran * c->gran;
                    if (down > o) {
                        aend = down;
                    } else {
                        z = sk = false;
                        aend = min64((o / c->gran + 1) * c->gran, c->size);
                    }
                }
            }
            end = aend;
        }
        if (sk || (z && !c->has_base && c->target_zeroed)) {
            c->next_off = end;
            c->done += end - o;
            continue;
        }
        if (z && !c->has_base) {
            /* Zero writes: no buffer, any size. */
        } else if (end - o > c->chunk) {
            end = o + c->chunk;
        }
        *off = o;
        *len = end - o;
        *zero = z;
        *skip = sk;
        *seq = c->next_seq++;
        c->next_off = end;
        return true;
    }
}

static int write_zeroes(Conv *c, int64_t off, int64_t len)
{
    if (c->target_zeroed || len <= 0) {
        return 0;
    }
    return lam_co_pwrite_zeroes(c->dst.root, off, len, LAM_REQ_MAY_UNMAP);
}

/* Writes one chunk whose source data is in buf (NULL: reads as zeroes). */
static int write_chunk(Conv *c, int64_t off, int64_t len, uint8_t *buf,
                       uint8_t *bbuf)
{
    if (c->full && !c->compress) {
        return lam_co_pwrite(c->dst.root, off, len, buf, 0);
    }
    if (!buf && !c->has_base) {
        return write_zeroes(c, off, len);
    }
    int64_t g = c->gran;
    if (!c->compress && !c->has_base) {
        g = c->sparse ? c->sparse : len;
    }
    /* Walks granules, coalescing runs of the same action into one request. */
    int64_t run_start = off;
    int run_kind = -1; /* 0 skip, 1 zero, 2 data */
    /* The last pass (p == off + len) only flushes the pending run. */
    for (int64_t p = off, n = 0; p <= off + len; p += n) {
        int kind = -1;
        n = 0;
        if (p < off + len) {
            n = min64(g, off + len - p);
            const uint8_t *d = buf ? buf + (p - off) : NULL;
            bool is_zero = !d || (c->sparse || c->compress || c->has_base
                                  ? lam_buf_is_zero(d, n) : false);
            if (c->has_base) {
                const uint8_t *b = bbuf + (p - off);
                bool same = d ? memcmp(d, b, n) == 0 : lam_buf_is_zero(b, n);
                kind = same ? 0 : is_zero ? 1 : 2;
                if (kind == 1) {
                    /* Zeroes over a backing file must be written. */
                    int r = lam_co_pwrite_zeroes(c->dst.root, p, n, 0);
                    if (r < 0) {
                        return r;
                    }
                    kind = 0;
                }
            } else {
                kind = is_zero ? 1 : 2;
            }
            if (c->compress && kind == 2) {
                int r = lam_co_pwrite(c->dst.root, p, n, d, LAM_REQ_WRITE_COMPRESSED);
                if (r < 0) {
                    return r;
                }
                kind = 0;
            }
        }
        if (kind != run_kind) {
            int r = 0;
            if (run_kind == 1) {
                r = write_zeroes(c, run_start, p - run_start);
            } else if (run_kind == 2) {
                r = lam_co_pwrite(c->dst.root, run_start, p - run_start,
                                  buf + (run_start - off), 0);
            }
            if (r < 0) {
                return r;
            }
            run_start = p;
            run_kind = kind;
        }
        if (p >= off + len) {
            break;
        }
    }
    return 0;
}

static int worker(int idx, void *opaque)
{
    Conv *c = opaque;
    uint8_t *buf = img_alloc_buf(c->chunk);
    uint8_t *bbuf = c->has_base ? img_alloc_buf(c->chunk) : NULL;
    int ret = 0;

    if (!buf || (c->has_base && !bbuf)) {
        pthread_mutex_lock(&c->lock);
        c->err = -ENOMEM;
        pthread_cond_broadcast(&c->cond);
        pthread_mutex_unlock(&c->lock);
        free(buf);
        free(bbuf);
        return -ENOMEM;
    }
    for (;;) {
        int64_t off, len;
        bool zero, skip;
        uint64_t seq;

        pthread_mutex_lock(&c->lock);
        bool more = next_chunk(c, &off, &len, &zero, &skip, &seq);
        pthread_mutex_unlock(&c->lock);
        if (!more) {
            break;
        }
        int r = 0;
        uint8_t *data = NULL;
        if (!zero && !skip) {
            r = read_sources(c, off, len, buf);
            data = buf;
        }
        if (r >= 0 && c->has_base && !skip && !c->full) {
            memset(bbuf, 0, len);
            if (off < c->base_size) {
                r = lam_co_pread(c->base.root, off, min64(len, c->base_size - off),
                                 bbuf, 0);
            }
        }
        pthread_mutex_lock(&c->lock);
        if (c->ordered) {
            while (c->write_seq != seq && !c->err) {
                pthread_cond_wait(&c->cond, &c->lock);
            }
        } else {
            while (c->writers >= c->max_writers && !c->err) {
                pthread_cond_wait(&c->cond, &c->lock);
            }
        }
        bool failed = c->err != 0;
        c->writers++;
        pthread_mutex_unlock(&c->lock);
        if (failed) {
            pthread_mutex_lock(&c->lock);
            c->writers--;
            pthread_cond_broadcast(&c->cond);
            pthread_mutex_unlock(&c->lock);
            break;
        }
        bool rd_err = r < 0;
        if (r >= 0 && !skip) {
            r = write_chunk(c, off, len, data, bbuf);
        }
        pthread_mutex_lock(&c->lock);
        c->writers--;
        if (r < 0 && !c->err) {
            c->err = r;
            c->err_off = off;
            c->err_read = rd_err;
        }
        c->write_seq++;
        c->done += len;
        double pct = c->done * 100.0 / (c->size ? c->size : 1);
        pthread_cond_broadcast(&c->cond);
        pthread_mutex_unlock(&c->lock);
        img_progress_set(pct);
        if (r < 0) {
            ret = r;
            break;
        }
    }
    free(buf);
    free(bbuf);
    return ret;
}

int img_convert(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force-share", no_argument, NULL, 'U'},
        {"target-is-zero", no_argument, NULL, 'Z'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL, *out_fmt = NULL, *base = NULL, *base_fmt = NULL;
    bool compress = false, progress = false, skip_create = false, wr_oo = false;
    bool share = false, target_is_zero = false;
    /* qemu-img convert writes with cache=unsafe unless -t says otherwise:
     * the target is complete when the command ends, durability is the
     * caller's business (sync). */
    bool no_flush = true, direct = false;
    int64_t sparse = 4096;
    int threads = 8, c, ret = 1;
    json_t *o = json_object();
    Conv cv;

    memset(&cv, 0, sizeof(cv));
    optind = 1;
    while ((c = getopt_long(argc, argv, "f:O:B:F:co:S:m:pqnWt:T:Uh", longopts,
                            NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'O': out_fmt = optarg; break;
        case 'B': base = optarg; break;
        case 'F': base_fmt = optarg; break;
        case 'c': compress = true; break;
        case 'p': progress = true; break;
        case 'q': img_quiet = true; break;
        case 'n': skip_create = true; break;
        case 'W': wr_oo = true; break;
        case 'U': share = true; break;
        case 'Z': target_is_zero = true; break;
        case 't':
            if (!strcmp(optarg, "none") || !strcmp(optarg, "directsync")) {
                direct = true;
            } else if (strcmp(optarg, "unsafe") && strcmp(optarg, "writeback") &&
                       strcmp(optarg, "writethrough")) {
                img_error("Invalid cache option: %s", optarg);
                goto out_opts;
            }
            no_flush = !strcmp(optarg, "unsafe");
            break;
        case 'T': break; /* source cache mode: accepted */
        case 'o':
            if (img_parse_o(o, optarg) < 0) {
                goto out_opts;
            }
            break;
        case 'S':
            if (img_parse_size(optarg, &sparse) < 0 || sparse % 512 ||
                sparse > IMG_CHUNK) {
                img_error("Invalid buffer size for sparse output specified. "
                          "Valid sizes are multiples of 512 up to 2048k.");
                goto out_opts;
            }
            break;
        case 'm': {
            char *end;
            long m = strtol(optarg, &end, 10);
            if (*end || m < 1 || m > IMG_MAX_THREADS) {
                img_error("Invalid number of coroutines. Allowed number of "
                          "coroutines is between 1 and %d", IMG_MAX_THREADS);
                goto out_opts;
            }
            threads = (int)m;
            break;
        }
        case 'h':
            printf("usage: lamina-img convert [-c] [-p] [-q] [-n] [-W] [-f fmt] "
                   "[-O output_fmt] [-B backing_file [-F backing_fmt]] "
                   "[-o options] [-S sparse_size] [-m num] filename "
                   "output_filename\n");
            ret = 0;
            goto out_opts;
        default:
            img_help_hint();
            goto out_opts;
        }
    }
    if (!out_fmt) {
        out_fmt = "raw";
    }
    if (json_object_get(o, "help")) {
        img_fmt_print_help(out_fmt);
        ret = 0;
        goto out_opts;
    }
    if (argc - optind < 2) {
        img_error("Expecting image file name");
        img_help_hint();
        goto out_opts;
    }
    if (argc - optind - 1 > MAX_SOURCES) {
        img_error("At most %d source images are supported", MAX_SOURCES);
        goto out_opts;
    }
    if (base && argc - optind > 2) {
        img_error("-B is not supported with several source images");
        goto out_opts;
    }
    if (base && !base_fmt && !skip_create) {
        img_error("Use of backing file requires explicit backing format");
        goto out_opts;
    }
    if (base && skip_create) {
        img_error("-B makes no sense when skipping image creation (-n)");
        goto out_opts;
    }
    if (compress && strcmp(out_fmt, "qcow2") && !skip_create) {
        img_error("Compression not supported for this file format");
        goto out_opts;
    }
    if (img_quiet) {
        progress = false;
    }
    const char *dst_name = argv[argc - 1];

    for (int i = optind; i < argc - 1; i++) {
        ImgImage *si = &cv.src[cv.nsrc];
        if (img_open(si, argv[i], fmt, share ? IMG_OPEN_SHARE : 0, NULL,
                     NULL) < 0) {
            goto out_src;
        }
        cv.nsrc++;
        int64_t l = lam_node_length(si->node);
        if (l < 0) {
            img_error("Could not get size of %s: %s", argv[i], strerror((int)-l));
            goto out_src;
        }
        cv.src_start[cv.nsrc - 1] = cv.size;
        cv.src_len[cv.nsrc - 1] = l;
        cv.size += (l + 511) / 512 * 512;
        cv.src_start[cv.nsrc] = cv.size;
    }
    if (!skip_create) {
        if (base) {
            json_object_set_new(o, "backing_file", json_string(base));
            json_object_set_new(o, "backing_fmt", json_string(base_fmt));
        }
        if (img_do_create(dst_name, out_fmt, cv.size, o, false, true) < 0) {
            goto out_src;
        }
    }
    if (img_open(&cv.dst, dst_name, out_fmt, IMG_OPEN_RW |
                 (no_flush ? IMG_OPEN_NO_FLUSH : 0) |
                 (direct ? IMG_OPEN_NOCACHE : 0) |
                 (base ? 0 : IMG_OPEN_NO_BACKING), NULL, NULL) < 0) {
        goto out_src;
    }
    cv.src_size = cv.size;
    if (!skip_create) {
        int64_t dl = lam_node_length(cv.dst.node);
        if (dl > cv.size) {
            cv.size = dl;
        }
    } else {
        int64_t dl = lam_node_length(cv.dst.node);
        if (dl >= 0 && dl < cv.size && (dl + 511) / 512 * 512 >= cv.size) {
            /* Only the 512-byte rounding of an odd-sized target differs. */
            cv.size = dl;
            if (cv.src_size > dl) {
                cv.src_size = dl;
            }
        }
        if (dl >= 0 && dl < cv.size) {
            img_error("Target image is too small (%lld bytes, need %lld)",
                      (long long)dl, (long long)cv.size);
            goto out_dst;
        }
    }
    if (base) {
        char *full = lam_path_combine(dst_name, base);
        int r = img_open(&cv.base, full, base_fmt, IMG_OPEN_SHARE, NULL, NULL);
        free(full);
        if (r < 0) {
            goto out_dst;
        }
        cv.has_base = true;
        for (LamNode *n = lam_node_backing_node(cv.src[0].node); n;
             n = lam_node_backing_node(n)) {
            if (img_same_file(lam_node_filename(n), lam_node_filename(cv.base.node))) {
                cv.src_base = n;
                break;
            }
        }
        cv.base_size = lam_node_length(cv.base.node);
        if (cv.base_size < 0) {
            cv.base_size = 0;
        }
    }

    cv.gran = img_cluster_size(cv.dst.node);
    if (cv.gran <= 0) {
        cv.gran = 4096;
    }
    if (compress && img_cluster_size(cv.dst.node) <= 0) {
        img_error("Compression not supported for this file format");
        goto out_dst;
    }
    cv.chunk = IMG_CHUNK;
    if (cv.gran > cv.chunk) {
        cv.chunk = cv.gran;
    }
    cv.chunk = cv.chunk / cv.gran * cv.gran;
    cv.sparse = sparse;
    cv.full = sparse == 0;
    cv.compress = compress;
    cv.target_zeroed = (!skip_create || target_is_zero) && !base;
    cv.ordered = !wr_oo;
    /* Buffered writes to one file serialise in the kernel (the inode
     * lock), and contended they cost more than they gain: one writer at a
     * time, while reads and zero detection stay parallel.  Compression
     * (done inside the write) and O_DIRECT writes gain from parallelism. */
    cv.max_writers = compress || direct ? threads : 1;
    pthread_mutex_init(&cv.lock, NULL);
    pthread_cond_init(&cv.cond, NULL);

    img_progress_start(progress);
    int r = img_run_threads(threads, worker, &cv);
    if (!r) {
        r = cv.err;
    }
    if (!r) {
        r = lam_co_flush(cv.dst.root);
    }
    if (r < 0) {
        img_progress_end();
        img_error("error while %s at byte %lld: %s",
                  cv.err_read ? "reading" : "writing", (long long)cv.err_off,
                  strerror(-r));
    } else {
        img_progress_set(100.0);
        img_progress_end();
        ret = 0;
    }
    pthread_mutex_destroy(&cv.lock);
    pthread_cond_destroy(&cv.cond);
    if (lam_node_flush_all(cv.dst.node) < 0 && ret == 0) {
        img_error("Could not flush '%s'", dst_name);
        ret = 1;
    }
out_dst:
    if (cv.has_base) {
        img_close(&cv.base);
    }
    img_close(&cv.dst);
out_src:
    for (int i = 0; i < cv.nsrc; i++) {
        img_close(&cv.src[i]);
    }
out_opts:
    json_decref(o);
    return ret;
}
