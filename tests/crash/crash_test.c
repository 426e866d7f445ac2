/* lamina-crash-test: crash-consistency test for image formats.
 *
 * 1. Records the stream of writes/flushes an image driver sends to its
 *    file while a guest workload runs (recorder.c, workload.c).
 * 2. Replays the stream cut at every flush and at random points between
 *    flushes, losing, tearing and reordering unflushed writes (replay.c).
 * 3. Checks every resulting image with our check and `qemu-img check`
 *    (no corruption allowed; leaks are), and reads it back: every guest
 *    write acknowledged before a completed guest flush must be there
 *    (verify.c, the content model in workload.c).
 *
 * Prints a summary and a machine-readable line starting "CRASH-SUMMARY ".
 * Exit status: 0 no failure, 1 failures found, 2 setup error.
 * See docs/design/crash-test.md.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "lamina/block.h"
#include "qemu_ref.h"
#include "recorder.h"
#include "replay.h"
#include "rng.h"
#include "verify.h"
#include "workload.h"

typedef struct Config {
    const char *fmt;
    int64_t size, cluster;
    int refcount_bits;
    int nops;
    int threads;
    int64_t fill_max;
    int mix;
    bool compress;
    bool lazy;           /* lazy refcounts: repair each crash image first */
    uint64_t seed;
    int random_per_interval;
    int max_random;
    int drop_one;        /* single-loss cuts per flush interval */
    int qemu_every;      /* qemu check+read on every Nth random cut; 0 none */
    bool no_qemu;
    bool no_ours;        /* don't check/read with our driver */
    bool ref_qemu;       /* record QEMU's qcow2 driver instead of ours */
    bool create_ours;
    bool expect_failures;
    CheatMode cheat;
    double time_limit;
    const char *workdir;
    const char *keep_dir;
    const char *dump_log;
    json_t *drv_opts;    /* extra options for the node under test */
    int reuse_every;     /* continue writing on every Nth cut's image; 0 never */
    int verbose;
    int max_report;
} Config;

typedef struct Stats {
    int flush_cuts, random_cuts, single_loss_cuts;
    int ours_checked, qemu_checked, ours_read, qemu_read;
    int corrupt_ours, corrupt_qemu;  /* images with corruptions */
    int open_failures, check_errors;
    int repaired, repair_failures;
    int reader_mismatch; /* our reader and qemu-img's disagree */
    int leaky_images;
    int durability_failures;
    int read_failures;
    int reported;
    bool time_limited;
    int workload_failures;
    int reuse_tried, reuse_corrupt, reuse_mismatch, reuse_errors;
    size_t log_entries, file_flushes;
    uint64_t bytes_written;
    int64_t final_file_size;
    /* qcow2 metadata growth, initial -> final (from the headers). */
    int64_t rt_clusters[2], refblocks[2], l2_tables[2];
    /* The cleanly closed image, after the whole workload. */
    int final_leaks_ours, final_leaks_qemu, final_corrupt;
} Stats;

typedef struct Ctx {
    Config cfg;
    Stats st;
    Workload w;
    Model model;
    uint8_t *backing;    /* guest-visible content of the backing file */
    int64_t img_size;    /* guest size + reference mode's marker cluster */
    uint8_t *got;
    uint8_t *expect;     /* reuse: what the guest should read afterwards */
    uint8_t *ours_got;   /* our read-back, to compare with qemu-img's */
    char cut_path[4096], raw_path[4096];
    struct timespec t0;
} Ctx;

/* Set by SIGINT/SIGTERM: stop trying cuts, clean the scratch directory up
 * and exit (a killed test must not leave images in /dev/shm). */
static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

static double elapsed(const Ctx *x)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - x->t0.tv_sec) + (t.tv_nsec - x->t0.tv_nsec) / 1e9;
}

static void usage(void)
{
    fprintf(stderr,
"usage: lamina-crash-test [options]\n"
"  --format qcow2|raw      image format under test (qcow2)\n"
"  --size N                guest size in bytes (8M)\n"
"  --cluster-size N        qcow2 cluster size (512)\n"
"  --refcount-bits N       qcow2 refcount width (16)\n"
"  --ops N                 guest operations per thread (300)\n"
"  --mix default|discard   op mix; discard: many discards/unmapping zero\n"
"                          writes over fresh data (frees, reuses clusters)\n"
"  --lazy-refcounts        image with lazy refcounts; every crash image is\n"
"                          repaired first (alternately by our open and by\n"
"                          qemu-img check -r all), then judged\n"
"  --compress              some whole-cluster writes are compressed\n"
"  --fill-max N            longest sequential fill write (16 clusters)\n"
"  --threads N             guest threads on disjoint stripes (1, max 8)\n"
"  --seed N                workload and cut seed (1)\n"
"  --random-cuts N         random cuts per flush interval (2)\n"
"  --max-random-cuts N     cap on random cuts (2000)\n"
"  --single-loss N         per flush interval, up to N cuts that lose just\n"
"                          one unflushed write and keep the rest (8)\n"
"  --qemu-every N          qemu-img check/convert on every flush cut and\n"
"                          every Nth random cut (1); 0: flush cuts only\n"
"  --no-qemu               skip qemu-img entirely\n"
"  --no-ours               don't check or read images with our driver\n"
"  --reference-qemu        record QEMU's qcow2 driver (qemu-io over\n"
"                          blklogwrites) instead of ours: the test itself\n"
"                          must then find nothing\n"
"  --reuse-every N         on every Nth cut, also write to the crashed image\n"
"                          with our driver, then check and read again (4)\n"
"  --create ours|qemu      who creates the initial image (qemu)\n"
"  --cheat drop-flushed    lose a flushed write in every cut (must fail)\n"
"  --time-limit SECONDS    stop trying cuts after this long (0: none)\n"
"  --workdir DIR           scratch directory (default: mkdtemp)\n"
"  --keep-failures DIR     copy failing images there\n"
"  --drv-opt KEY=VALUE      option for the node under test while recording,\n"
"                          e.g. l2-cache-size=1024 to force cache evictions\n"
"  --dump-log FILE         write the recorded file log (one entry a line)\n"
"  --expect-failures       exit 0 only if failures were found (for\n"
"                          testing the test with --cheat)\n"
"  -v                      verbose\n"
"LAMINA_CRASH_SOAK=N multiplies --ops and --random-cuts by N.\n");
}

static int64_t parse_size(const char *s)
{
    char *end;
    long long v = strtoll(s, &end, 0);
    switch (*end) {
    case 'k': case 'K': v <<= 10; break;
    case 'm': case 'M': v <<= 20; break;
    case 'g': case 'G': v <<= 30; break;
    default: break;
    }
    return v;
}

static int parse_args(Config *c, int argc, char **argv)
{
    static const struct option lo[] = {
        { "format", 1, 0, 'f' }, { "size", 1, 0, 's' },
        { "cluster-size", 1, 0, 'c' }, { "refcount-bits", 1, 0, 'R' },
        { "ops", 1, 0, 'o' }, { "seed", 1, 0, 'S' }, { "threads", 1, 0, 'T' },
        { "random-cuts", 1, 0, 'r' }, { "max-random-cuts", 1, 0, 'm' },
        { "qemu-every", 1, 0, 'q' }, { "no-qemu", 0, 0, 'Q' },
        { "create", 1, 0, 'C' }, { "cheat", 1, 0, 'X' },
        { "time-limit", 1, 0, 't' }, { "workdir", 1, 0, 'w' },
        { "keep-failures", 1, 0, 'k' }, { "help", 0, 0, 'h' },
        { "expect-failures", 0, 0, 'E' }, { "lazy-refcounts", 0, 0, 'z' + 256 }, { "compress", 0, 0, 'c' + 256 }, { "mix", 1, 0, 'x' + 256 }, { "drv-opt", 1, 0, 'o' + 256 }, { "single-loss", 1, 0, 'L' }, { "fill-max", 1, 0, 'F' }, { "no-ours", 0, 0, 'O' },
        { "reference-qemu", 0, 0, 'P' }, { "reuse-every", 1, 0, 'U' }, { "dump-log", 1, 0, 'D' },
        { 0, 0, 0, 0 },
    };
    *c = (Config){ .fmt = "qcow2", .size = 8 << 20, .cluster = 512,
                   .refcount_bits = 16, .nops = 300, .seed = 1, .threads = 1,
                   .random_per_interval = 2, .max_random = 2000, .drop_one = 8,
                   .qemu_every = 1, .max_report = 10, .reuse_every = 4 };
    int opt;
    while ((opt = getopt_long(argc, argv, "vh", lo, NULL)) != -1) {
        switch (opt) {
        case 'f': c->fmt = optarg; break;
        case 's': c->size = parse_size(optarg); break;
        case 'c': c->cluster = parse_size(optarg); break;
        case 'R': c->refcount_bits = atoi(optarg); break;
        case 'o': c->nops = atoi(optarg); break;
        case 'T': c->threads = atoi(optarg); break;
        case 'S': c->seed = strtoull(optarg, NULL, 0); break;
        case 'r': c->random_per_interval = atoi(optarg); break;
        case 'm': c->max_random = atoi(optarg); break;
        case 'q': c->qemu_every = atoi(optarg); break;
        case 'Q': c->no_qemu = true; break;
        case 'C': c->create_ours = !strcmp(optarg, "ours"); break;
        case 'X':
            if (strcmp(optarg, "drop-flushed") != 0) {
                fprintf(stderr, "unknown cheat mode '%s'\n", optarg);
                return -1;
            }
            c->cheat = CHEAT_DROP_FLUSHED;
            break;
        case 't': c->time_limit = atof(optarg); break;
        case 'w': c->workdir = optarg; break;
        case 'k': c->keep_dir = optarg; break;
        case 'E': c->expect_failures = true; break;
        case 'z' + 256: c->lazy = true; break;
        case 'c' + 256: c->compress = true; break;
        case 'x' + 256:
            if (strcmp(optarg, "default") && strcmp(optarg, "discard")) {
                fprintf(stderr, "--mix is default or discard\n");
                return -1;
            }
            c->mix = !strcmp(optarg, "discard");
            break;
        case 'o' + 256: {
            char *eq = strchr(optarg, '=');
            if (!eq) {
                fprintf(stderr, "--drv-opt wants key=value\n");
                return -1;
            }
            char *end;
            long long v = strtoll(eq + 1, &end, 0);
            if (!c->drv_opts) {
                c->drv_opts = json_object();
            }
            char *key = strndup(optarg, (size_t)(eq - optarg));
            json_object_set_new(c->drv_opts, key, *end || end == eq + 1 ?
                                json_string(eq + 1) : json_integer(v));
            free(key);
            break;
        }
        case 'L': c->drop_one = atoi(optarg); break;
        case 'F': c->fill_max = parse_size(optarg); break;
        case 'O': c->no_ours = true; break;
        case 'P': c->ref_qemu = true; break;
        case 'U': c->reuse_every = atoi(optarg); break;
        case 'D': c->dump_log = optarg; break;
        case 'v': c->verbose++; break;
        default: usage(); return -1;
        }
    }
    if (c->ref_qemu && (strcmp(c->fmt, "qcow2") || c->threads != 1)) {
        fprintf(stderr, "--reference-qemu needs qcow2 and one thread\n");
        return -1;
    }
    if (c->no_ours) {
        c->reuse_every = 0; /* reuse writes with our driver */
    }
    if (strcmp(c->fmt, "qcow2") && strcmp(c->fmt, "raw")) {
        fprintf(stderr, "format must be qcow2 or raw\n");
        return -1;
    }
    if (c->cluster < 512 || (c->cluster & (c->cluster - 1)) ||
        c->size < 4 * c->cluster || c->size % 512 || c->nops < 1 ||
        c->threads < 1 || c->threads > CRASH_MAX_THREADS ||
        (c->threads > 1 && c->size < 4 * c->threads *
                          (c->cluster * 16 > 65536 ? c->cluster * 16 : 65536))) {
        fprintf(stderr, "bad size/cluster-size/ops\n");
        return -1;
    }
    const char *soak = getenv("LAMINA_CRASH_SOAK");
    if (soak && atoi(soak) > 1) {
        c->nops *= atoi(soak);
        c->random_per_interval *= atoi(soak);
        c->max_random *= atoi(soak);
        c->drop_one *= atoi(soak);
    }
    return 0;
}

/* ---- setup ---- */

static uint8_t *make_backing(const Config *c)
{
    uint8_t *b = malloc((size_t)c->size);
    Rng r;
    if (!b) {
        return NULL;
    }
    rng_seed(&r, c->seed * 7919 + 17);
    rng_fill(&r, b, (size_t)c->size);
    /* Some zero stretches, so "backing reads zero" is exercised too. */
    for (int64_t off = 0; off < c->size; off += 65536) {
        if (rng_below(&r, 4) == 0) {
            int64_t n = c->size - off < 65536 ? c->size - off : 65536;
            memset(b + off, 0, (size_t)n);
        }
    }
    return b;
}

static int create_overlay(const Config *c, int64_t img_size, const char *path,
                          const char *backing)
{
    if (c->create_ours) {
        LamError *err = NULL;
        json_t *o = json_pack("{s:I, s:I, s:s, s:s, s:b}", "cluster-size",
                              (json_int_t)c->cluster, "refcount-bits",
                              (json_int_t)c->refcount_bits, "backing-file",
                              backing, "backing-fmt", "raw", "lazy-refcounts",
                              c->lazy);
        int ret = lam_create_image(path, "qcow2", img_size, o, &err);
        json_decref(o);
        if (ret < 0) {
            fprintf(stderr, "create %s: %s\n", path, err ? err->msg : "failed");
            lam_error_free(err);
        }
        return ret;
    }
    char opts[4200], size[32];
    snprintf(opts, sizeof(opts),
             "cluster_size=%lld,refcount_bits=%d,backing_file=%s,backing_fmt=raw%s",
             (long long)c->cluster, c->refcount_bits, backing,
             c->lazy ? ",lazy_refcounts=on" : "");
    snprintf(size, sizeof(size), "%lld", (long long)img_size);
    char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts,
                     (char *)path, size, NULL };
    char *out = NULL;
    int rc = run_cmd(argv, &out);
    if (rc != 0) {
        fprintf(stderr, "qemu-img create failed (%d): %s\n", rc, out ? out : "");
    }
    free(out);
    return rc == 0 ? 0 : -EIO;
}

/* Runs the workload on a recorder-backed image; leaves the log in rec. */
static int record_workload(Ctx *x, CrashRec *rec)
{
    LamError *err = NULL;
    json_t *opts = json_pack("{s:s, s:{s:s, s:s}}", "driver", x->cfg.fmt,
                             "file", "driver", "recorder", "filename", rec->name);
    if (x->cfg.drv_opts) {
        json_object_update(opts, x->cfg.drv_opts);
    }
    LamNode *bs = lam_node_open(opts, LAM_O_RDWR, &err);
    json_decref(opts);
    if (!bs) {
        fprintf(stderr, "open %s over recorder: %s\n", x->cfg.fmt,
                err ? err->msg : "failed");
        lam_error_free(err);
        return -EIO;
    }
    LamChild *c = lam_root_attach(bs, "crash test guest",
                                  LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                  LAM_PERM_ALL, &err);
    if (!c) {
        fprintf(stderr, "attach: %s\n", err ? err->msg : "failed");
        lam_error_free(err);
        lam_node_unref(bs);
        return -EIO;
    }
    x->st.workload_failures = workload_run(&x->w, c, rec);
    lam_root_detach(c);
    lam_node_flush_all(bs);
    lam_node_unref(bs);
    return 0;
}

static const char *op_name(GuestOpType t)
{
    static const char *n[] = { "write", "write-zeroes", "discard", "flush" };
    return n[t];
}

/* One line per log entry: what a failure report's positions refer to. */
static void dump_log(const Ctx *x, const CrashRec *rec)
{
    static const char *names[] = { "write", "zero", "discard", "truncate", "flush" };
    FILE *f = fopen(x->cfg.dump_log, "w");
    if (!f) {
        perror(x->cfg.dump_log);
        return;
    }
    for (int i = 0; i < x->w.nops; i++) {
        const GuestOp *op = &x->w.ops[i];
        fprintf(f, "# guest op %d thread %d: %s off %lld len %lld ret %d, log [%zu, %zu)\n",
                i, op->thread, op_name(op->type), (long long)op->off,
                (long long)op->len, op->ret, op->log_start, op->log_end);
    }
    for (size_t i = 0; i < rec->nlog; i++) {
        const CrashEntry *e = &rec->log[i];
        fprintf(f, "%zu %s off %lld len %lld guest-op %d\n", i, names[e->type],
                (long long)e->off, (long long)e->len, e->guest_op);
    }
    fclose(f);
}

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        v = v << 8 | p[i];
    }
    return v;
}

/* Counts refcount table clusters, refcount blocks and L2 tables of a qcow2
 * image in memory, so the summary shows the workload made them grow. */
static void qcow2_shape(const uint8_t *b, int64_t len, int64_t cluster,
                        int64_t *rt_clusters, int64_t *refblocks, int64_t *l2s)
{
    *rt_clusters = *refblocks = *l2s = -1;
    if (len < 72 || be(b, 4) != 0x514649fbULL) {
        return;
    }
    uint64_t l1_size = be(b + 36, 4), l1_off = be(b + 40, 8);
    uint64_t rt_off = be(b + 48, 8), rt_cl = be(b + 56, 4);
    *rt_clusters = (int64_t)rt_cl;
    if (rt_cl <= (uint64_t)len && rt_off + rt_cl * (uint64_t)cluster <= (uint64_t)len) {
        *refblocks = 0;
        for (uint64_t i = 0; i < rt_cl * (uint64_t)cluster / 8; i++) {
            *refblocks += be(b + rt_off + 8 * i, 8) != 0;
        }
    }
    if (l1_size <= (uint64_t)len / 8 && l1_off + 8 * l1_size <= (uint64_t)len) {
        *l2s = 0;
        for (uint64_t i = 0; i < l1_size; i++) {
            *l2s += (be(b + l1_off + 8 * i, 8) & 0x00fffffffffffe00ULL) != 0;
        }
    }
}

/* ---- judging cuts ---- */

static void keep_image(const Ctx *x, const char *tag, int n, const uint8_t *img,
                       int64_t len)
{
    if (!x->cfg.keep_dir) {
        return;
    }
    char p[4200];
    snprintf(p, sizeof(p), "%s/%s-%d.%s", x->cfg.keep_dir, tag, n, x->cfg.fmt);
    if (write_file(p, img, len) == 0) {
        fprintf(stderr, "    kept as %s\n", p);
    }
}

/* The last durable op that touched guest byte b (-1: none). */
static int last_writer(const Workload *w, const OpWindow *win, int64_t b)
{
    for (int t = 0; t < w->p.nthreads; t++) {
        for (int i = win->durable[t] - 1; i >= w->tstart[t]; i--) {
            const GuestOp *op = &w->ops[i];
            if (op->type != G_FLUSH && b >= op->off && b < op->off + op->len) {
                return i;
            }
        }
    }
    return -1;
}

static bool should_report(Ctx *x)
{
    return x->st.reported++ < x->cfg.max_report;
}

static void describe_cut(const Cut *c, int n, const char *what)
{
    char lost[64] = "";
    if (c->drop_only >= 0) {
        snprintf(lost, sizeof(lost), " only log entry %ld lost,", c->drop_only);
    }
    fprintf(stderr, "FAIL cut %d (%s, barrier %zu, pos %zu,%s kept %d, dropped %d,"
            " torn %d%s): %s\n", n,
            c->flush_cut ? "flush" : c->drop_only >= 0 ? "single-loss" : "random",
            c->barrier, c->pos, lost, c->kept, c->dropped, c->torn,
            c->dropped_flushed >= 0 ? ", cheat dropped a flushed write" : "",
            what);
}

static void verify_content(Ctx *x, const Cut *c, int n, const OpWindow *win,
                           const char *reader, bool *failed)
{
    int64_t first_bad;
    int64_t bad = model_verify(&x->model, &x->w, win, x->got, &first_bad);
    if (bad == 0) {
        return;
    }
    *failed = true;
    x->st.durability_failures++;
    if (should_report(x)) {
        char m[512];
        int lw = last_writer(&x->w, win, first_bad);
        const GuestOp *op = lw >= 0 ? &x->w.ops[lw] : NULL;
        const char *why = "last durable op there";
        /* A returned FUA write that is missing is the more precise story. */
        for (int t = 0; t < x->w.p.nthreads; t++) {
            for (int i = win->durable[t]; i < win->started[t]; i++) {
                const GuestOp *f = &x->w.ops[i];
                if ((f->flags & LAM_REQ_FUA) && f->log_end <= win->pos &&
                    f->type != G_DISCARD && first_bad >= f->off &&
                    first_bad < f->off + f->len) {
                    lw = i;
                    op = f;
                    why = "FUA op that had returned";
                }
            }
        }
        uint8_t want = x->model.val[first_bad];
        if (op && op->type == G_WRITE) {
            want = op->data[first_bad - op->off];
        } else if (op && op->type == G_ZERO) {
            want = 0;
        }
        snprintf(m, sizeof(m),
                 "%s read-back: %lld bytes differ from every allowed value, "
                 "first at guest offset %lld (got 0x%02x, expected 0x%02x; "
                 "%s: #%d %s [%lld, +%lld) thread %d, "
                 "logged at file entries [%zu, %zu))", reader, (long long)bad,
                 (long long)first_bad, x->got[first_bad], want, why, lw,
                 op ? op_name(op->type) : "none", op ? (long long)op->off : 0LL,
                 op ? (long long)op->len : 0LL, op ? op->thread : -1,
                 op ? op->log_start : 0, op ? op->log_end : 0);
        describe_cut(c, n, m);
    }
}

/* After a crash the image gets used again: new allocations meet the leaked
 * clusters and the torn tail.  It must stay free of corruption, the new
 * writes must read back, and nothing else may change.  x->got holds what
 * the crashed image read as. */
static void judge_reuse(Ctx *x, const Cut *c, int n, bool run_qemu, bool *failed)
{
    ReuseWrites rw = { 0 };
    char *err = NULL;
    char m[1200];
    x->st.reuse_tried++;
    memcpy(x->expect, x->got, (size_t)x->img_size);
    int ret = reuse_image(x->cut_path, x->cfg.fmt, x->cfg.size, x->cfg.cluster,
                          x->cfg.seed * 31 + (uint64_t)n, &rw, &err);
    if (ret < 0) {
        *failed = true;
        x->st.reuse_errors++;
        if (should_report(x)) {
            snprintf(m, sizeof(m), "reuse after crash: %s", err ? err : "?");
            describe_cut(c, n, m);
        }
        free(err);
        reuse_writes_free(&rw);
        return;
    }
    for (int i = 0; i < rw.n; i++) {
        memcpy(x->expect + rw.off[i], rw.data[i], (size_t)rw.len[i]);
    }
    reuse_writes_free(&rw);

    CheckCounts cc[2];
    check_ours(x->cut_path, x->cfg.fmt, &cc[0]);
    if (run_qemu) {
        check_qemu(x->cut_path, x->cfg.fmt, &cc[1]);
    } else {
        memset(&cc[1], 0, sizeof(cc[1]));
    }
    for (int k = 0; k < 2; k++) {
        if (cc[k].supported && (cc[k].open_failed || cc[k].corruptions || cc[k].errors)) {
            *failed = true;
            x->st.reuse_corrupt++;
            if (should_report(x)) {
                snprintf(m, sizeof(m), "after reuse, %s check: %s%d corruptions, "
                         "%d errors: %s", k ? "qemu-img" : "our",
                         cc[k].open_failed ? "open failed, " : "",
                         cc[k].corruptions, cc[k].errors, cc[k].msg ? cc[k].msg : "");
                describe_cut(c, n, m);
            }
        }
        free(cc[k].msg);
    }
    ret = read_guest_ours(x->cut_path, x->cfg.fmt, x->got, x->img_size, &err);
    if (ret < 0) {
        *failed = true;
        x->st.reuse_errors++;
        if (should_report(x)) {
            snprintf(m, sizeof(m), "read after reuse: %s", err ? err : "?");
            describe_cut(c, n, m);
        }
        free(err);
        return;
    }
    for (int64_t b = 0; b < x->cfg.size; b++) {
        if (x->got[b] != x->expect[b]) {
            *failed = true;
            x->st.reuse_mismatch++;
            if (should_report(x)) {
                snprintf(m, sizeof(m), "after reuse, guest offset %lld reads 0x%02x,"
                         " expected 0x%02x", (long long)b, x->got[b], x->expect[b]);
                describe_cut(c, n, m);
            }
            break;
        }
    }
}

static int judge_cut(Ctx *x, Replay *rp, const Cut *c, int n, bool run_qemu)
{
    bool failed = false;
    int ret = write_file(x->cut_path, rp->img, rp->img_len);
    if (ret < 0) {
        fprintf(stderr, "write %s: %s\n", x->cut_path, strerror(-ret));
        return ret;
    }
    if (x->cfg.lazy) {
        char *err = NULL;
        bool by_qemu = (n & 1) && !x->cfg.no_qemu;
        ret = by_qemu ? repair_qemu(x->cut_path, x->cfg.fmt, &err) :
                        repair_ours(x->cut_path, x->cfg.fmt, &err);
        if (ret < 0) {
            x->st.repair_failures++;
            if (should_report(x)) {
                char m[600];
                snprintf(m, sizeof(m), "repair by %s failed: %s",
                         by_qemu ? "qemu-img check -r all" : "our open", err ? err : "?");
                describe_cut(c, n, m);
            }
            free(err);
            keep_image(x, "repair", n, rp->img, rp->img_len);
            return 0;
        }
        x->st.repaired++;
    }
    OpWindow win;
    model_window(&x->w, c->pos, &win);
    if (model_advance(&x->model, &x->w, &win) < 0) {
        fprintf(stderr, "internal error: cuts out of order\n");
        return -EINVAL;
    }

    CheckCounts cc = { 0 };
    if (!x->cfg.no_ours) {
        check_ours(x->cut_path, x->cfg.fmt, &cc);
    }
    if (cc.supported) {
        x->st.ours_checked++;
        x->st.leaky_images += cc.leaks > 0;
        if (cc.open_failed || cc.corruptions || cc.errors) {
            failed = true;
            x->st.corrupt_ours += cc.corruptions > 0;
            x->st.open_failures += cc.open_failed;
            x->st.check_errors += cc.errors > 0;
            if (should_report(x)) {
                char m[1024];
                snprintf(m, sizeof(m), "our check: %s%d corruptions, %d errors: %s",
                         cc.open_failed ? "open failed, " : "", cc.corruptions,
                         cc.errors, cc.msg ? cc.msg : "");
                describe_cut(c, n, m);
            }
        }
    }
    free(cc.msg);

    if (run_qemu) {
        check_qemu(x->cut_path, x->cfg.fmt, &cc);
        if (cc.supported) {
            x->st.qemu_checked++;
            if (cc.corruptions || cc.errors) {
                failed = true;
                x->st.corrupt_qemu += cc.corruptions > 0;
                x->st.check_errors += cc.errors > 0;
                if (should_report(x)) {
                    char m[1024];
                    snprintf(m, sizeof(m), "qemu-img check: %d corruptions, %d errors: %s",
                             cc.corruptions, cc.errors, cc.msg ? cc.msg : "");
                    describe_cut(c, n, m);
                }
            }
        }
        free(cc.msg);
    }

    char *err = NULL;
    ret = x->cfg.no_ours ? 1 :
          read_guest_ours(x->cut_path, x->cfg.fmt, x->got, x->img_size, &err);
    if (ret == 1) {
        /* not read by us */
    } else if (ret == 0) {
        x->st.ours_read++;
        verify_content(x, c, n, &win, "our", &failed);
        memcpy(x->ours_got, x->got, (size_t)x->img_size);
    } else {
        failed = true;
        x->st.read_failures++;
        if (should_report(x)) {
            char m[600];
            snprintf(m, sizeof(m), "our read-back failed: %s", err ? err : "?");
            describe_cut(c, n, m);
        }
    }
    free(err);
    err = NULL;
    if (run_qemu) {
        ret = read_guest_qemu(x->cut_path, x->cfg.fmt, x->raw_path, x->got,
                              x->img_size, &err);
        if (ret == 0) {
            x->st.qemu_read++;
            verify_content(x, c, n, &win, "qemu-img convert", &failed);
            /* Two readers of one image must agree byte for byte, even
             * where the model allows several values. */
            if (!x->cfg.no_ours && memcmp(x->got, x->ours_got, (size_t)x->img_size)) {
                int64_t b = 0;
                while (x->got[b] == x->ours_got[b]) {
                    b++;
                }
                failed = true;
                x->st.reader_mismatch++;
                if (should_report(x)) {
                    char m[300];
                    snprintf(m, sizeof(m), "our reader and qemu-img disagree at guest "
                             "offset %lld: ours 0x%02x, qemu-img 0x%02x", (long long)b,
                             x->ours_got[b], x->got[b]);
                    describe_cut(c, n, m);
                }
            }
            memcpy(x->got, x->ours_got, (size_t)x->img_size);
        } else {
            failed = true;
            x->st.read_failures++;
            if (should_report(x)) {
                char m[600];
                snprintf(m, sizeof(m), "qemu-img convert failed: %s", err ? err : "?");
                describe_cut(c, n, m);
            }
        }
        free(err);
    }
    if (!failed && x->cfg.reuse_every > 0 && n % x->cfg.reuse_every == 0) {
        judge_reuse(x, c, n, run_qemu, &failed);
    }
    if (failed) {
        keep_image(x, c->flush_cut ? "flush" : c->drop_only >= 0 ? "single-loss" : "random",
                   n, rp->img, rp->img_len);
    }
    return 0;
}

/* The image as the workload left it (closed cleanly): no corruption, and
 * a driver should not leak clusters when nothing crashed. */
static int judge_final(Ctx *x, const CrashRec *rec)
{
    int ret = write_file(x->cut_path, rec->buf, rec->len);
    if (ret < 0) {
        return ret;
    }
    CheckCounts cc = { 0 };
    if (!x->cfg.no_ours) {
        check_ours(x->cut_path, x->cfg.fmt, &cc);
        x->st.final_leaks_ours = cc.leaks;
        x->st.final_corrupt += cc.corruptions + cc.errors + cc.open_failed;
        if (cc.corruptions || cc.errors || cc.open_failed) {
            fprintf(stderr, "FAIL final image, our check: %s\n", cc.msg ? cc.msg : "");
        }
        free(cc.msg);
    }
    if (!x->cfg.no_qemu) {
        check_qemu(x->cut_path, x->cfg.fmt, &cc);
        x->st.final_leaks_qemu = cc.leaks;
        x->st.final_corrupt += cc.corruptions + cc.errors + cc.open_failed;
        if (cc.corruptions || cc.errors || cc.open_failed) {
            fprintf(stderr, "FAIL final image, qemu-img check: %s\n", cc.msg ? cc.msg : "");
        }
        free(cc.msg);
    }
    return 0;
}

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

static int run_cuts(Ctx *x, CrashRec *rec, const uint8_t *init, int64_t init_len)
{
    size_t nfl;
    size_t *fl = replay_flush_positions(rec->log, rec->nlog, &nfl);
    Replay rp;
    replay_init(&rp, rec->log, rec->nlog, init, init_len);
    Rng rng;
    rng_seed(&rng, x->cfg.seed * 104729 + 3);
    int n = 0, ret = 0;
    /* Barriers: 0, then just after each flush. */
    for (size_t bi = 0; bi <= nfl && ret == 0; bi++) {
        size_t barrier = bi == 0 ? 0 : fl[bi - 1] + 1;
        size_t next = bi < nfl ? fl[bi] : rec->nlog;
        if (x->cfg.time_limit > 0 && elapsed(x) > x->cfg.time_limit) {
            x->st.time_limited = true;
            break;
        }
        if (interrupted) {
            ret = -EINTR;
            break;
        }
        Cut c = { .barrier = barrier, .pos = barrier, .flush_cut = true,
                  .drop_only = -1 };
        ret = replay_build(&rp, &c, rng_next(&rng), x->cfg.cheat);
        if (ret == 0) {
            x->st.flush_cuts++;
            ret = judge_cut(x, &rp, &c, n++, !x->cfg.no_qemu);
        }
        size_t span = next - barrier;
        if (span == 0 && !(bi == nfl && next > barrier)) {
            continue;
        }
        /* Random cuts in (barrier, next]: sorted, so the durable prefix of
         * the content model only grows; half of them at the next flush
         * (the widest choice of subsets). */
        int k = x->cfg.random_per_interval;
        if (x->st.random_cuts + k > x->cfg.max_random) {
            k = x->cfg.max_random - x->st.random_cuts;
        }
        if (span == 0) {
            continue;
        }
        size_t pos[64];
        k = k < 0 ? 0 : k > 64 ? 64 : k;
        for (int i = 0; i < k; i++) {
            pos[i] = rng_below(&rng, 2) ? next :
                     barrier + 1 + (size_t)rng_below(&rng, span);
        }
        qsort(pos, (size_t)k, sizeof(pos[0]), cmp_size);
        for (int i = 0; i < k && ret == 0; i++) {
            Cut rc = { .barrier = barrier, .pos = pos[i], .drop_only = -1 };
            ret = replay_build(&rp, &rc, rng_next(&rng), x->cfg.cheat);
            if (ret == 0) {
                x->st.random_cuts++;
                bool q = !x->cfg.no_qemu && x->cfg.qemu_every > 0 &&
                         x->st.random_cuts % x->cfg.qemu_every == 0;
                ret = judge_cut(x, &rp, &rc, n++, q);
            }
        }
        /* Single-loss cuts, at the next flush (after the random ones, which
         * are at or before it). */
        size_t cand[4096];
        size_t nc = 0;
        for (size_t i = barrier; i < next && nc < 4096; i++) {
            if (rec->log[i].type != CR_FLUSH) {
                cand[nc++] = i;
            }
        }
        int d = x->cfg.drop_one < (int)nc ? x->cfg.drop_one : (int)nc;
        for (int i = 0; i < d; i++) {
            size_t j = i + (size_t)rng_below(&rng, nc - (size_t)i);
            size_t t = cand[i];
            cand[i] = cand[j];
            cand[j] = t;
        }
        for (int i = 0; i < d && ret == 0; i++) {
            Cut sc = { .barrier = barrier, .pos = next, .drop_only = (long)cand[i] };
            ret = replay_build(&rp, &sc, rng_next(&rng), x->cfg.cheat);
            if (ret == 0) {
                x->st.single_loss_cuts++;
                bool q = !x->cfg.no_qemu && x->cfg.qemu_every > 0 &&
                         (x->st.single_loss_cuts + x->st.random_cuts) %
                         x->cfg.qemu_every == 0;
                ret = judge_cut(x, &rp, &sc, n++, q);
            }
        }
    if (x->cfg.verbose && bi % 50 == 0) {
            fprintf(stderr, "  barrier %zu/%zu, %d cuts, %.1fs\n", bi, nfl, n,
                    elapsed(x));
        }
    }
    replay_free(&rp);
    free(fl);
    return ret;
}

static int failures(const Stats *s)
{
    return s->corrupt_ours + s->corrupt_qemu + s->open_failures +
           s->check_errors + s->durability_failures + s->read_failures +
           s->workload_failures + s->reuse_corrupt + s->reuse_mismatch +
           s->final_corrupt + s->repair_failures + s->reader_mismatch +
           s->reuse_errors;
}

static void summary(const Ctx *x)
{
    const Stats *s = &x->st;
    printf("crash test%s: format %s, cluster %lld, refcount-bits %d, guest %lld bytes,"
           " %d ops in %d threads, seed %llu%s\n",
           x->cfg.ref_qemu ? " of QEMU's qcow2 (reference)" : "", x->cfg.fmt,
           (long long)x->cfg.cluster, x->cfg.refcount_bits,
           (long long)x->cfg.size, x->w.nops, x->w.p.nthreads,
           (unsigned long long)x->cfg.seed,
           x->cfg.cheat ? ", CHEAT drop-flushed" : "");
    printf("  recorded: %zu file entries, %zu flushes, %llu bytes written, file %lld bytes\n",
           s->log_entries, s->file_flushes, (unsigned long long)s->bytes_written,
           (long long)s->final_file_size);
    if (!strcmp(x->cfg.fmt, "qcow2")) {
        printf("  qcow2 growth: refcount table %lld -> %lld clusters, refcount blocks"
               " %lld -> %lld, L2 tables %lld -> %lld\n",
               (long long)s->rt_clusters[0], (long long)s->rt_clusters[1],
               (long long)s->refblocks[0], (long long)s->refblocks[1],
               (long long)s->l2_tables[0], (long long)s->l2_tables[1]);
    }
    printf("  final image (closed cleanly): leaks ours %d, qemu-img %d;"
           " corruptions/errors %d\n", s->final_leaks_ours, s->final_leaks_qemu,
           s->final_corrupt);
    printf("  cut points tried: %d (%d at flushes, %d random, %d single-loss)%s\n",
           s->flush_cuts + s->random_cuts + s->single_loss_cuts, s->flush_cuts,
           s->random_cuts, s->single_loss_cuts,
           s->time_limited ? " [time limit reached]" : "");
    printf("  checked by ours: %d, by qemu-img: %d; read back by ours: %d, by qemu-img: %d\n",
           s->ours_checked, s->qemu_checked, s->ours_read, s->qemu_read);
    printf("  images with leaks (allowed): %d\n", s->leaky_images);
    if (x->cfg.lazy) {
        printf("  lazy refcounts: repaired %d images, repair failed on %d\n",
               s->repaired, s->repair_failures);
    }
    printf("  corruptions: ours %d, qemu-img %d; open failures %d; check errors %d\n",
           s->corrupt_ours, s->corrupt_qemu, s->open_failures, s->check_errors);
    printf("  durability failures: %d; read failures: %d; failed guest ops: %d;"
           " our reader vs qemu-img mismatches: %d\n", s->durability_failures,
           s->read_failures, s->workload_failures, s->reader_mismatch);
    printf("  reused after crash: %d images; corrupt afterwards %d, wrong content %d,"
           " errors %d\n", s->reuse_tried, s->reuse_corrupt, s->reuse_mismatch,
           s->reuse_errors);
    printf("  time: %.1fs\n", elapsed(x));
    json_t *j = json_pack(
        "{s:s, s:I, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:i,"
        " s:i, s:i, s:i, s:i, s:b, s:b, s:I, s:I}",
        "format", x->cfg.fmt, "cluster_size", (json_int_t)x->cfg.cluster,
        "cuts", s->flush_cuts + s->random_cuts + s->single_loss_cuts,
        "flush_cuts", s->flush_cuts,
        "random_cuts", s->random_cuts, "ours_checked", s->ours_checked,
        "qemu_checked", s->qemu_checked, "ours_read", s->ours_read,
        "qemu_read", s->qemu_read, "corrupt_ours", s->corrupt_ours,
        "corrupt_qemu", s->corrupt_qemu, "open_failures", s->open_failures,
        "check_errors", s->check_errors, "durability_failures",
        s->durability_failures, "read_failures", s->read_failures,
        "workload_failures", s->workload_failures, "leaky_images",
        s->leaky_images, "time_limited", s->time_limited, "cheat",
        x->cfg.cheat != CHEAT_NONE, "log_entries", (json_int_t)s->log_entries,
        "file_flushes", (json_int_t)s->file_flushes);
    json_object_set_new(j, "reuse_tried", json_integer(s->reuse_tried));
    json_object_set_new(j, "single_loss_cuts", json_integer(s->single_loss_cuts));
    json_object_set_new(j, "repaired", json_integer(s->repaired));
    json_object_set_new(j, "reader_mismatch", json_integer(s->reader_mismatch));
    json_object_set_new(j, "repair_failures", json_integer(s->repair_failures));
    json_object_set_new(j, "final_file_size", json_integer(s->final_file_size));
    json_object_set_new(j, "final_leaks_ours", json_integer(s->final_leaks_ours));
    json_object_set_new(j, "final_leaks_qemu", json_integer(s->final_leaks_qemu));
    json_object_set_new(j, "final_corrupt", json_integer(s->final_corrupt));
    json_object_set_new(j, "refcount_table_clusters",
                        json_pack("[I,I]", (json_int_t)s->rt_clusters[0],
                                  (json_int_t)s->rt_clusters[1]));
    json_object_set_new(j, "refcount_blocks",
                        json_pack("[I,I]", (json_int_t)s->refblocks[0],
                                  (json_int_t)s->refblocks[1]));
    json_object_set_new(j, "l2_tables",
                        json_pack("[I,I]", (json_int_t)s->l2_tables[0],
                                  (json_int_t)s->l2_tables[1]));
    json_object_set_new(j, "reuse_corrupt", json_integer(s->reuse_corrupt));
    json_object_set_new(j, "reuse_mismatch", json_integer(s->reuse_mismatch));
    json_object_set_new(j, "reuse_errors", json_integer(s->reuse_errors));
    char *d = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    printf("CRASH-SUMMARY %s\n", d);
    free(d);
    json_decref(j);
    fflush(stdout);
}

static void rm_rf_workdir(const char *dir, bool made)
{
    if (!made) {
        return;
    }
    char *argv[] = { "rm", "-rf", (char *)dir, NULL };
    run_cmd(argv, NULL);
}

int main(int argc, char **argv)
{
    static Ctx x;
    if (parse_args(&x.cfg, argc, argv) < 0) {
        return 2;
    }
    clock_gettime(CLOCK_MONOTONIC, &x.t0);
    struct sigaction sa = { .sa_handler = on_signal };
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    char tmpl[256];
    bool made = false;
    const char *dir = x.cfg.workdir;
    if (!dir) {
        snprintf(tmpl, sizeof(tmpl), "%s/lamina-crash-XXXXXX",
                 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
        dir = mkdtemp(tmpl);
        made = dir != NULL;
        if (!dir) {
            perror("mkdtemp");
            return 2;
        }
    }
    char backing_path[4096], init_path[4096];
    snprintf(backing_path, sizeof(backing_path), "%s/backing.raw", dir);
    snprintf(init_path, sizeof(init_path), "%s/init.%s", dir, x.cfg.fmt);
    snprintf(x.cut_path, sizeof(x.cut_path), "%s/cut.%s", dir, x.cfg.fmt);
    snprintf(x.raw_path, sizeof(x.raw_path), "%s/cut-converted.raw", dir);

    int status = 2;
    uint8_t *init = NULL;
    int64_t init_len = 0;
    CrashRec *rec = NULL;
    x.backing = make_backing(&x.cfg);
    x.img_size = x.cfg.size + (x.cfg.ref_qemu ? x.cfg.cluster : 0);
    x.got = malloc((size_t)x.img_size);
    x.expect = malloc((size_t)x.img_size);
    x.ours_got = malloc((size_t)x.img_size);
    if (!x.backing || !x.got || !x.expect || !x.ours_got || write_file(backing_path, x.backing, x.cfg.size) < 0) {
        fprintf(stderr, "cannot write %s\n", backing_path);
        goto out;
    }
    if (!strcmp(x.cfg.fmt, "qcow2")) {
        if (create_overlay(&x.cfg, x.img_size, init_path, backing_path) < 0) {
            goto out;
        }
    } else if (write_file(init_path, x.backing, x.cfg.size) < 0) {
        goto out;
    }
    if (read_whole_file(init_path, &init, &init_len) < 0) {
        fprintf(stderr, "cannot read %s\n", init_path);
        goto out;
    }

    crash_recorder_register();
    rec = crash_rec_new("crash-rec0", init, init_len);
    if (!rec) {
        goto out;
    }
    /* Data, plus metadata even at 512-byte clusters with 64-bit refcounts,
     * fits in 4x the guest size; far beyond that the driver is leaking
     * space without bound. */
    rec->max_len = 4 * x.img_size + (16 << 20);
    WorkloadParams wp = { .size = x.cfg.size, .cluster = x.cfg.cluster,
                          .nops = x.cfg.nops, .nthreads = x.cfg.threads,
                          .fill_max = x.cfg.fill_max, .mix = x.cfg.mix,
                          .compress = x.cfg.compress,
                          .seed = x.cfg.seed };
    workload_generate(&x.w, &wp);
    if (x.cfg.ref_qemu) {
        char *err = NULL;
        if (qemu_ref_record(dir, init_path, &x.w, x.cfg.size, x.cfg.cluster,
                            &rec->log, &rec->nlog, &err) < 0) {
            fprintf(stderr, "reference recording: %s\n", err ? err : "failed");
            free(err);
            goto out;
        }
        rec->log_cap = rec->nlog;
        for (size_t i = 0; i < rec->nlog; i++) {
            crash_apply(&rec->log[i], &rec->buf, &rec->len, &rec->cap);
            if (rec->log[i].type == CR_WRITE || rec->log[i].type == CR_ZERO) {
                rec->bytes_written += (uint64_t)rec->log[i].len;
            }
        }
    } else if (record_workload(&x, rec) < 0) {
        goto out;
    }
    x.st.log_entries = rec->nlog;
    for (size_t i = 0; i < rec->nlog; i++) {
        x.st.file_flushes += rec->log[i].type == CR_FLUSH;
    }
    x.st.bytes_written = rec->bytes_written;
    x.st.final_file_size = rec->len;
    if (!strcmp(x.cfg.fmt, "qcow2")) {
        qcow2_shape(init, init_len, x.cfg.cluster, &x.st.rt_clusters[0],
                    &x.st.refblocks[0], &x.st.l2_tables[0]);
        qcow2_shape(rec->buf, rec->len, x.cfg.cluster, &x.st.rt_clusters[1],
                    &x.st.refblocks[1], &x.st.l2_tables[1]);
    }
    if (x.cfg.dump_log) {
        dump_log(&x, rec);
    }
    if (x.cfg.verbose) {
        fprintf(stderr, "recorded %zu entries (%zu flushes) in %.1fs\n",
                x.st.log_entries, x.st.file_flushes, elapsed(&x));
    }

    if (judge_final(&x, rec) < 0) {
        goto out;
    }
    model_init(&x.model, &x.w, x.cfg.size, x.backing);
    if (run_cuts(&x, rec, init, init_len) < 0) {
        goto out_model;
    }
    summary(&x);
    status = failures(&x.st) ? 1 : 0;
    if (x.cfg.expect_failures) {
        status = !status;
    }
out_model:
    model_free(&x.model);
out:
    crash_rec_free(rec);
    workload_free(&x.w);
    free(init);
    free(x.backing);
    free(x.got);
    free(x.expect);
    free(x.ours_got);
    rm_rf_workdir(dir, made);
    json_decref(x.cfg.drv_opts);
    return status;
}
