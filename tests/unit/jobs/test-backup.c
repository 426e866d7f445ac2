/* Backup job, copy-before-write, snapshot-access and fleecing races, on
 * raw files in a temporary directory.  TAP output.
 *
 * The classic-fleecing test uses "testcow", a tiny format registered here
 * that behaves like qcow2 for the race of seed 001: a read of an
 * unallocated cluster checks the allocation under its lock, drops the lock
 * and then reads the backing file (slowly, to widen the window).  Without
 * serialising copy-before-write writes the reader can return data written
 * after the snapshot; with them it never does. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "jobs/backup.h"
#include "jobs/cbw.h"
#include "lamina/driver.h"
#include "lamina/events.h"

static int ntest, nfail;
static char tmpdir[256];

static void ok(bool cond, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    ntest++;
    printf("%s %d - ", cond ? "ok" : "not ok", ntest);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!cond) {
        nfail++;
    }
}

/* ev_lock protects ev_log. */
static pthread_mutex_t ev_lock = PTHREAD_MUTEX_INITIALIZER;
static char ev_log[8192];

static void sink(const char *name, json_t *data)
{
    pthread_mutex_lock(&ev_lock);
    char item[128];
    if (strcmp(name, "JOB_STATUS_CHANGE") == 0) {
        snprintf(item, sizeof(item), "%s ", json_string_value(json_object_get(data, "status")));
    } else {
        snprintf(item, sizeof(item), "%s ", name + 10);
    }
    if (strlen(ev_log) + strlen(item) < sizeof(ev_log)) {
        strcat(ev_log, item);
    }
    pthread_mutex_unlock(&ev_lock);
    json_decref(data);
}

static bool ev_is(const char *want)
{
    pthread_mutex_lock(&ev_lock);
    bool r = strcmp(ev_log, want) == 0;
    if (!r) {
        printf("# events: '%s'\n# wanted: '%s'\n", ev_log, want);
    }
    ev_log[0] = 0;
    pthread_mutex_unlock(&ev_lock);
    return r;
}

static void ev_clear(void)
{
    pthread_mutex_lock(&ev_lock);
    ev_log[0] = 0;
    pthread_mutex_unlock(&ev_lock);
}

static uint8_t pattern0(int64_t off)
{
    return (uint8_t)((off / 512) * 7 + 1);
}

static void make_file(const char *name, int64_t size, bool pattern)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
    if (ftruncate(fd, size) < 0) {
        abort();
    }
    if (pattern) {
        uint8_t *buf = malloc(1 << 20);
        for (int64_t off = 0; off < size; off += 1 << 20) {
            for (int i = 0; i < 1 << 20; i++) {
                buf[i] = pattern0(off + i);
            }
            if (pwrite(fd, buf, 1 << 20, off) != 1 << 20) {
                abort();
            }
        }
        free(buf);
    }
    close(fd);
}

static LamNode *open_file(const char *node, const char *file)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, file);
    json_t *o = json_pack("{s:s, s:s, s:s}", "driver", "file", "node-name", node,
                          "filename", path);
    LamError *err = NULL;
    LamNode *bs = lam_node_open(o, LAM_O_RDWR, &err);
    json_decref(o);
    if (!bs) {
        printf("# open %s: %s\n", node, err->msg);
        exit(1);
    }
    return bs;
}

static LamNode *open_opts(json_t *o)
{
    LamError *err = NULL;
    LamNode *bs = lam_node_open(o, LAM_O_RDWR, &err);
    json_decref(o);
    if (!bs) {
        printf("# open: %s\n", err->msg);
        exit(1);
    }
    return bs;
}

/* Counts bytes of [0,len) of c that differ from pattern0. */
static int64_t count_mismatch(LamChild *c, int64_t len)
{
    uint8_t *buf = malloc(1 << 20);
    int64_t bad = 0;
    for (int64_t off = 0; off < len; off += 1 << 20) {
        if (lam_co_pread(c, off, 1 << 20, buf, 0) < 0) {
            free(buf);
            return -1;
        }
        for (int i = 0; i < 1 << 20; i++) {
            bad += buf[i] != pattern0(off + i);
        }
    }
    free(buf);
    return bad;
}

/* ---- random guest writers ---- */
typedef struct Writer {
    LamChild *edge;
    int64_t len;
    int count;
    unsigned seed;
    int errors;
    _Atomic bool *stop;
} Writer;

static void *writer_main(void *opaque)
{
    Writer *w = opaque;
    uint8_t buf[16384];
    for (int i = 0; i < w->count && !(w->stop && atomic_load(w->stop)); i++) {
        int64_t bytes = 512 * (1 + rand_r(&w->seed) % 32);
        int64_t off = (rand_r(&w->seed) % (w->len / 512)) * 512;
        if (off + bytes > w->len) {
            off = w->len - bytes;
        }
        memset(buf, 0xE0 | (i & 0xf), (size_t)bytes);
        if (lam_co_pwrite(w->edge, off, bytes, buf, 0) < 0) {
            w->errors++;
        }
    }
    return NULL;
}

typedef struct Reader {
    LamChild *edge;
    int64_t len;
    unsigned seed;
    _Atomic bool *stop;
    int64_t mismatches;
    int errors;
    int reads;
} Reader;

static void *reader_main(void *opaque)
{
    Reader *r = opaque;
    uint8_t buf[65536 * 2];
    while (!atomic_load(r->stop)) {
        int64_t bytes = 512 * (1 + rand_r(&r->seed) % 256);
        int64_t off = (rand_r(&r->seed) % (r->len / 512)) * 512;
        if (off + bytes > r->len) {
            off = r->len - bytes;
        }
        if (lam_co_pread(r->edge, off, bytes, buf, 0) < 0) {
            r->errors++;
            continue;
        }
        r->reads++;
        for (int64_t i = 0; i < bytes; i++) {
            r->mismatches += buf[i] != pattern0(off + i);
        }
    }
    return NULL;
}

/* ---- tests ---- */

#define LEN (8 << 20)

static void test_full_backup(void)
{
    make_file("a1", LEN, true);
    make_file("b1", LEN, false);
    LamNode *a = open_file("a1", "a1");
    LamNode *b = open_file("b1", "b1");
    LamChild *guest = lam_root_attach(a, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                      LAM_PERM_ALL, NULL);
    LamBackupParams p;
    lam_backup_params_init(&p);
    p.job_id = "bk1";
    p.speed = 16 << 20; /* ~0.5 s: guest writes land while copying */
    LamError *err = NULL;
    LamJob *job = lam_backup_start(a, b, &p, &err);
    ok(job != NULL, "backup started %s", err ? err->msg : "");
    ok(guest->node != a && lam_cbw_block_copy(guest->node) != NULL,
       "guest edge moved onto the copy-before-write filter");
    lam_job_ref(job);
    Writer w = { .edge = guest, .len = LEN, .count = 400, .seed = 1 };
    pthread_t t;
    pthread_create(&t, NULL, writer_main, &w);
    int r = lam_job_run_until_done(job);
    pthread_join(t, NULL);
    ok(r == 0 && w.errors == 0, "backup completed (ret %d), guest writes ok", r);
    json_t *info = lam_block_job_info(job);
    ok(json_integer_value(json_object_get(info, "offset")) == LEN &&
           json_integer_value(json_object_get(info, "len")) == LEN,
       "progress offset == len == size");
    json_decref(info);
    lam_job_unref(job);
    ok(ev_is("created running paused running waiting pending COMPLETED concluded null "), "events");
    ok(guest->node == a, "filter removed, guest edge back on the source");
    LamChild *rb = lam_root_attach(b, "check", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    ok(count_mismatch(rb, LEN) == 0, "target holds the point-in-time data");
    ok(count_mismatch(guest, LEN) > 0, "source has the new data");
    lam_root_detach(rb);
    lam_root_detach(guest);
    lam_node_unref(a);
    lam_node_unref(b);
}

static void test_errors(void)
{
    make_file("a2", LEN, true);
    make_file("b2", LEN / 2, false);
    LamNode *a = open_file("a2", "a2");
    LamNode *b = open_file("b2", "b2");
    LamBackupParams p;
    lam_backup_params_init(&p);
    p.job_id = "bk2";
    LamError *err = NULL;
    ok(!lam_backup_start(a, b, &p, &err) && err &&
           !strcmp(err->msg, "Source and target image have different sizes"),
       "size mismatch refused");
    lam_error_free(err);
    err = NULL;
    ok(!lam_backup_start(a, a, &p, &err) && err &&
           !strcmp(err->msg, "Source and target cannot be the same"),
       "same node refused");
    lam_error_free(err);
    err = NULL;
    p.speed = -1;
    make_file("b2", LEN, false);
    lam_node_unref(b);
    b = open_file("b2b", "b2");
    ok(!lam_backup_start(a, b, &p, &err) && err &&
           !strcmp(err->msg, "Parameter 'speed' expects a non-negative value"),
       "negative speed refused");
    lam_error_free(err);
    err = NULL;
    p.speed = 0;
    p.compress = true;
    ok(!lam_backup_start(a, b, &p, &err) && err &&
           !strncmp(err->msg, "Compression is not supported for this drive", 43),
       "compress to a raw file refused");
    lam_error_free(err);
    err = NULL;
    ok(ev_is("created null "), "failed creation (speed): created, null");
    lam_node_unref(a);
    lam_node_unref(b);
}

static void test_sync_none_cancel(void)
{
    make_file("a3", LEN, true);
    make_file("b3", LEN, false);
    LamNode *a = open_file("a3", "a3");
    LamNode *b = open_file("b3", "b3");
    LamChild *guest = lam_root_attach(a, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                      LAM_PERM_ALL, NULL);
    LamBackupParams p;
    lam_backup_params_init(&p);
    p.job_id = "bk3";
    p.sync = LAM_SYNC_NONE;
    p.filter_node_name = "fl3";
    LamJob *job = lam_backup_start(a, b, &p, NULL);
    ok(job && lam_node_find("fl3") == guest->node, "sync=none with named filter");
    LamError *perr = NULL;
    LamChild *late = lam_root_attach(a, NULL, LAM_PERM_WRITE, LAM_PERM_ALL, &perr);
    ok(!late && perr && strstr(perr->msg, "Permission conflict on node 'a3': permissions "
                                          "'write' are both required by an unnamed block "
                                          "device (uses node 'a3' as 'root' child) and "
                                          "unshared by node 'fl3' (uses node 'a3' as 'file' "
                                          "child)."),
       "a new writer on the source is refused while the filter is in place");
    lam_error_free(perr);
    uint8_t buf[65536];
    memset(buf, 0x55, sizeof(buf));
    lam_co_pwrite(guest, 65536 * 3, 65536, buf, 0);
    lam_co_pwrite(guest, 65536 * 3 + 512, 512, buf, 0); /* same cluster: copied once */
    json_t *info = lam_block_job_info(job);
    ok(json_integer_value(json_object_get(info, "offset")) == 65536 &&
           json_integer_value(json_object_get(info, "len")) == LEN,
       "offset counts copy-before-write bytes, once per cluster");
    json_decref(info);
    lam_job_ref(job);
    lam_job_user_cancel(job, false, true, NULL);
    int r = lam_job_run_until_done(job);
    lam_job_unref(job);
    ok(r == -ECANCELED && ev_is("created running paused running aborting CANCELLED concluded null "),
       "sync=none runs until cancelled");
    ok(lam_node_find("fl3") == NULL && guest->node == a, "filter gone after cancel");
    LamChild *rb = lam_root_attach(b, "check", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    uint8_t got[65536];
    lam_co_pread(rb, 65536 * 3, 65536, got, 0);
    bool good = true;
    for (int i = 0; i < 65536; i++) {
        good &= got[i] == pattern0(65536 * 3 + i);
    }
    lam_co_pread(rb, 0, 65536, got, 0);
    ok(good && lam_buf_is_zero(got, 65536), "target: old data of the written cluster only");
    lam_root_detach(rb);
    lam_root_detach(guest);
    lam_node_unref(a);
    lam_node_unref(b);
}

static void test_snapshot_access_stress(void)
{
    make_file("a4", LEN, true);
    make_file("t4", LEN, false);
    LamNode *a = open_file("a4", "a4");
    LamNode *t = open_file("t4", "t4");
    LamNode *cbw = open_opts(json_pack("{s:s, s:s, s:s, s:s}", "driver", "copy-before-write",
                                       "node-name", "cbw4", "file", "a4", "target", "t4"));
    LamNode *acc = open_opts(json_pack("{s:s, s:s, s:s}", "driver", "snapshot-access",
                                       "node-name", "acc4", "file", "cbw4"));
    LamChild *guest = lam_root_attach(cbw, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                      LAM_PERM_ALL, NULL);
    LamChild *rd = lam_root_attach(acc, "export", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    _Atomic bool stop = false;
    Writer w[2] = { { .edge = guest, .len = LEN, .count = 2000, .seed = 11 },
                    { .edge = guest, .len = LEN, .count = 2000, .seed = 12 } };
    Reader r[2] = { { .edge = rd, .len = LEN, .seed = 21, .stop = &stop },
                    { .edge = rd, .len = LEN, .seed = 22, .stop = &stop } };
    pthread_t tw[2], tr[2];
    for (int i = 0; i < 2; i++) {
        pthread_create(&tr[i], NULL, reader_main, &r[i]);
        pthread_create(&tw[i], NULL, writer_main, &w[i]);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(tw[i], NULL);
    }
    atomic_store(&stop, true);
    for (int i = 0; i < 2; i++) {
        pthread_join(tr[i], NULL);
    }
    ok(w[0].errors + w[1].errors == 0 && r[0].errors + r[1].errors == 0,
       "snapshot-access stress: no I/O errors (%d reads)", r[0].reads + r[1].reads);
    ok(r[0].mismatches + r[1].mismatches == 0, "snapshot-access: zero mismatches during writes");
    ok(count_mismatch(rd, LEN) == 0, "snapshot-access: full read matches the snapshot");
    uint8_t b1[512];
    ok(lam_co_pwrite(rd, 0, 512, b1, 0) < 0, "snapshot-access refuses writes");
    lam_root_detach(rd);
    lam_root_detach(guest);
    lam_node_unref(acc);
    lam_node_unref(cbw);
    lam_node_unref(a);
    lam_node_unref(t);
}

/* ---- testcow: a qcow2-like overlay with a slow unlocked backing read ---- */
#define TC_CLUSTER 65536
typedef struct TestCow {
    LamChild *file;
    pthread_mutex_t lock; /* protects alloc */
    bool *alloc;
    int64_t len;
} TestCow;

static int tc_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    TestCow *s = bs->opaque;
    s->file = lam_open_child(bs, opts, "file", false, errp);
    if (!s->file) {
        return -EINVAL;
    }
    s->len = lam_node_length(s->file->node);
    s->alloc = calloc((size_t)(s->len / TC_CLUSTER + 1), 1);
    pthread_mutex_init(&s->lock, NULL);
    return 0;
}

static void tc_close(LamNode *bs)
{
    TestCow *s = bs->opaque;
    free(s->alloc);
    pthread_mutex_destroy(&s->lock);
}

static int64_t tc_len(LamNode *bs)
{
    return ((TestCow *)bs->opaque)->len;
}

static int tc_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    TestCow *s = bs->opaque;
    size_t qoff = 0;
    while (bytes > 0) {
        int64_t n = TC_CLUSTER - off % TC_CLUSTER;
        if (n > bytes) {
            n = bytes;
        }
        pthread_mutex_lock(&s->lock);
        bool allocated = s->alloc[off / TC_CLUSTER];
        pthread_mutex_unlock(&s->lock);
        LamIOV part;
        lam_iov_init(&part, 2);
        lam_iov_concat(&part, qiov, qoff, (size_t)n);
        int ret;
        if (allocated) {
            ret = lam_co_preadv(s->file, off, n, &part, 0);
        } else {
            /* The window of seed 001: lock dropped, backing read pending. */
            usleep(300);
            ret = lam_co_preadv(lam_node_backing(bs), off, n, &part, 0);
        }
        lam_iov_destroy(&part);
        if (ret < 0) {
            return ret;
        }
        off += n;
        bytes -= n;
        qoff += (size_t)n;
    }
    return 0;
}

static int tc_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    TestCow *s = bs->opaque;
    /* Whole clusters only (the copy engine writes clusters). */
    pthread_mutex_lock(&s->lock);
    int ret = lam_co_pwritev(s->file, off, bytes, qiov, 0);
    for (int64_t c = off / TC_CLUSTER; c * TC_CLUSTER < off + bytes; c++) {
        s->alloc[c] = true;
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static void tc_child_perm(LamNode *bs, LamChild *c, uint64_t pp, uint64_t ps,
                          uint64_t *perm, uint64_t *shared)
{
    /* Like QEMU when the overlay's users share writes (an NBD export). */
    *shared = LAM_PERM_ALL;
}

static const LamDriver testcow = {
    .name = "testcow", .kind = LAM_DRV_FORMAT, .state_size = sizeof(TestCow),
    .supports_backing = true, .open = tc_open, .close = tc_close, .get_length = tc_len,
    .preadv = tc_preadv, .pwritev = tc_pwritev, .child_perm = tc_child_perm,
};

static int64_t classic_fleecing_run(bool serialise, int idx)
{
    char an[16], bn[16], fn[16];
    snprintf(an, sizeof(an), "a5%d", idx);
    snprintf(bn, sizeof(bn), "b5%d", idx);
    snprintf(fn, sizeof(fn), "f5%d", idx);
    make_file(an, LEN, true);
    make_file(bn, LEN, false);
    LamNode *a = open_file(an, an);
    LamNode *bfile = open_file(fn, bn);
    LamChild *guest = lam_root_attach(a, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                      LAM_PERM_ALL, NULL);
    char btop[16];
    snprintf(btop, sizeof(btop), "tmp5%d", idx);
    LamNode *b = open_opts(json_pack("{s:s, s:s, s:s, s:s}", "driver", "testcow", "node-name",
                                     btop, "file", fn, "backing", an));
    if (!serialise) {
        setenv("LAMINA_DEBUG_NO_FLEECING_GUARD", "1", 1);
    }
    LamBackupParams p;
    lam_backup_params_init(&p);
    p.job_id = "fleece";
    p.sync = LAM_SYNC_NONE;
    LamError *err = NULL;
    LamJob *job = lam_backup_start(a, b, &p, &err);
    unsetenv("LAMINA_DEBUG_NO_FLEECING_GUARD");
    if (!job) {
        printf("# %s\n", err->msg);
        return -1;
    }
    LamChild *rd = lam_root_attach(b, "export", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    _Atomic bool stop = false;
    Writer w[2] = { { .edge = guest, .len = LEN, .count = 1500, .seed = 31 },
                    { .edge = guest, .len = LEN, .count = 1500, .seed = 32 } };
    Reader r[3] = { { .edge = rd, .len = LEN, .seed = 41, .stop = &stop },
                    { .edge = rd, .len = LEN, .seed = 42, .stop = &stop },
                    { .edge = rd, .len = LEN, .seed = 43, .stop = &stop } };
    pthread_t tw[2], tr[3];
    for (int i = 0; i < 3; i++) {
        pthread_create(&tr[i], NULL, reader_main, &r[i]);
    }
    for (int i = 0; i < 2; i++) {
        pthread_create(&tw[i], NULL, writer_main, &w[i]);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(tw[i], NULL);
    }
    atomic_store(&stop, true);
    int64_t mism = 0;
    for (int i = 0; i < 3; i++) {
        pthread_join(tr[i], NULL);
        mism += r[i].mismatches;
    }
    printf("# classic fleecing serialise=%d: %d reads, %lld mismatching bytes\n", serialise,
           r[0].reads + r[1].reads + r[2].reads, (long long)mism);
    int64_t final = count_mismatch(rd, LEN);
    if (final) {
        mism += final;
    }
    lam_job_ref(job);
    lam_job_user_cancel(job, true, false, NULL);
    lam_job_run_until_done(job);
    lam_job_unref(job);
    ok(ev_is("created running paused running aborting CANCELLED concluded null "), "fleecing job cancelled");
    lam_root_detach(rd);
    lam_root_detach(guest);
    lam_node_unref(b);
    lam_node_unref(bfile);
    lam_node_unref(a);
    return mism;
}

static void test_classic_fleecing(void)
{
    lam_driver_register(&testcow);
    int64_t with = classic_fleecing_run(true, 0);
    ok(with == 0, "classic fleecing with serialising CBW writes: zero mismatches");
    /* The race is probabilistic: a few tries make the control reliable
     * (each try has a good chance alone) while a real regression of the
     * serialisation above still fails on its first run. */
    int64_t without = 0;
    for (int attempt = 1; attempt <= 5 && without <= 0; attempt++) {
        without = classic_fleecing_run(false, attempt);
    }
    ok(without > 0, "control: without serialisation readers see new data (%lld bytes)",
       (long long)without);
}


/* Target behind blkdebug: error policies of the background copy. */
static void blkdebug_case(const char *name, LamOnError pol, int err, bool once,
                          const char *want_events, bool expect_stop)
{
    make_file("a6", LEN, true);
    make_file("b6", LEN, false);
    LamNode *a = open_file("a6", "a6");
    LamNode *bf = open_file("b6f", "b6");
    json_t *rule = json_pack("{s:s, s:i, s:b}", "event", "write_aio", "errno", err, "once", once);
    LamNode *b = open_opts(json_pack("{s:s, s:s, s:s, s:[o]}", "driver", "blkdebug",
                                     "node-name", "b6", "image", "b6f", "inject-error", rule));
    LamBackupParams p;
    lam_backup_params_init(&p);
    p.job_id = "bd";
    p.on_target_error = pol;
    p.max_workers = 1;
    LamJob *job = lam_backup_start(a, b, &p, NULL);
    lam_job_ref(job);
    if (expect_stop) {
        bool paused = lam_job_wait_status(job, LAM_JOB_STATUS_PAUSED, 5000);
        json_t *info = lam_block_job_info(job);
        const char *ios = json_string_value(json_object_get(info, "io-status"));
        ok(paused && ios && !strcmp(ios, err == ENOSPC ? "nospace" : "failed"),
           "%s: stopped with io-status %s", name, ios ? ios : "?");
        json_decref(info);
        LamError *e = NULL;
        lam_job_user_cancel(job, false, true, &e);
        ok(e && !strcmp(e->msg, "The block job for device 'bd' is currently paused"),
           "%s: block-job-cancel refused while stopped", name);
        lam_error_free(e);
        lam_job_user_resume(job, NULL);
    }
    int r = lam_job_run_until_done(job);
    lam_job_unref(job);
    ok(ev_is(want_events), "%s: events (ret %d)", name, r);
    if (r == 0) {
        LamChild *rb = lam_root_attach(bf, "check", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
        ok(count_mismatch(rb, LEN) == 0, "%s: target complete after retry", name);
        lam_root_detach(rb);
    }
    lam_node_unref(b);
    lam_node_unref(bf);
    lam_node_unref(a);
}

static void test_blkdebug_policies(void)
{
    blkdebug_case("report", LAM_ONERR_REPORT, EIO, false,
                  "created running paused running ERROR aborting COMPLETED concluded null ", false);
    blkdebug_case("ignore", LAM_ONERR_IGNORE, EIO, true,
                  "created running paused running ERROR waiting pending COMPLETED concluded null ", false);
    blkdebug_case("enospc", LAM_ONERR_ENOSPC, ENOSPC, true,
                  "created running paused running ERROR paused running waiting pending COMPLETED concluded null ",
                  true);
    blkdebug_case("stop", LAM_ONERR_STOP, EIO, true,
                  "created running paused running ERROR paused running waiting pending COMPLETED concluded null ",
                  true);
    LamError *err = NULL;
    json_t *bad = json_pack("{s:s, s:s, s:{s:s, s:s}, s:[{s:s}]}", "driver", "blkdebug",
                            "node-name", "bad", "image", "driver", "null-co", "size", "1M",
                            "inject-error", "event", "no_such_event");
    ok(!lam_node_open(bad, LAM_O_RDWR, &err) && err, "blkdebug: unknown event refused (%s)",
       err ? err->msg : "");
    json_decref(bad);
    lam_error_free(err);
}

/* Calls a QMP argument handler and releases the arguments. */
static int qmp_call(int (*fn)(json_t *, LamError **), json_t *args, LamError **errp)
{
    int r = fn(args, errp);
    json_decref(args);
    return r;
}

static bool qmp_err(int (*fn)(json_t *, LamError **), json_t *args, const char *want)
{
    LamError *err = NULL;
    int r = fn(args, &err);
    bool good = r < 0 && err && !strcmp(err->msg, want);
    if (!good) {
        printf("# got '%s'\n", err ? err->msg : "(none)");
    }
    lam_error_free(err);
    json_decref(args);
    return good;
}

static void test_qmp_args(void)
{
    make_file("a7", LEN, true);
    make_file("b7", LEN, false);
    LamNode *a = open_file("a7", "a7");
    LamNode *b = open_file("b7", "b7");
    ok(qmp_err(lam_qmp_blockdev_backup,
               json_pack("{s:s, s:s, s:s, s:s}", "job-id", "q", "device", "nope", "target", "b7",
                         "sync", "full"),
               "Cannot find device='nope' nor node-name='nope'"), "unknown device");
    ok(qmp_err(lam_qmp_blockdev_backup,
               json_pack("{s:s, s:s, s:s}", "device", "a7", "target", "b7", "sync", "full"),
               "Invalid job ID ''"), "job-id required");
    ok(qmp_err(lam_qmp_blockdev_backup,
               json_pack("{s:s, s:s, s:s, s:s}", "job-id", "bad id!", "device", "a7", "target",
                         "b7", "sync", "full"),
               "Invalid job ID 'bad id!'"), "malformed job-id");
    ok(qmp_err(lam_qmp_blockdev_backup,
               json_pack("{s:s, s:s, s:s, s:s}", "job-id", "q", "device", "a7", "target", "b7",
                         "sync", "incremental"),
               "must provide a valid bitmap name for 'incremental' sync mode"), "incremental w/o bitmap");
    ok(qmp_err(lam_qmp_blockdev_backup,
               json_pack("{s:s, s:s, s:s, s:s, s:{s:i}}", "job-id", "q", "device", "a7", "target",
                         "b7", "sync", "full", "x-perf", "max-workers", 0),
               "max-workers must be between 1 and 2147483647"), "x-perf max-workers");
    ok(qmp_err(lam_qmp_blockdev_backup,
               json_pack("{s:s, s:s, s:s, s:s, s:{s:i}}", "job-id", "q", "device", "a7", "target",
                         "b7", "sync", "full", "x-perf", "max-chunk", 4096),
               "Required max-chunk (4096) is less than backup cluster size (65536)"), "x-perf max-chunk");
    ev_clear();

    /* A running job makes its id busy. */
    LamError *err = NULL;
    int r = qmp_call(lam_qmp_blockdev_backup, json_pack("{s:s, s:s, s:s, s:s, s:s, s:I}", "job-id", "q",
                                              "device", "a7", "target", "b7", "sync", "full",
                                              "on-target-error", "stop", "speed", (json_int_t)1024),
                                    &err);
    ok(r == 0, "blockdev-backup started %s", err ? err->msg : "");
    make_file("c7", LEN, false);
    LamNode *c = open_file("c7", "c7");
    make_file("e7", LEN, false);
    LamNode *e7 = open_file("e7", "e7");
    ok(qmp_err(lam_qmp_blockdev_backup,
               json_pack("{s:s, s:s, s:s, s:s}", "job-id", "q", "device", "c7", "target", "e7",
                         "sync", "full"),
               "Job ID 'q' already in use"), "duplicate job id");
    ok(qmp_err(lam_qmp_blockdev_backup,
               json_pack("{s:s, s:s, s:s, s:s}", "job-id", "q2", "device", "c7", "target", "b7",
                         "sync", "full"),
               "Node 'b7' is busy: block device is in use by block job: backup"),
       "target of a running backup is busy");
    LamJob *job = lam_job_find("q");
    lam_job_ref(job);
    lam_job_set_speed(job, 0, NULL);
    lam_job_run_until_done(job);
    lam_job_unref(job);
    ev_clear();

    /* drive-backup creates a raw target and copies. */
    char path[512];
    snprintf(path, sizeof(path), "%s/d7.raw", tmpdir);
    r = qmp_call(lam_qmp_drive_backup, json_pack("{s:s, s:s, s:s, s:s, s:s}", "job-id", "d", "device",
                                       "a7", "target", path, "format", "raw", "sync", "full"),
                             &err);
    ok(r == 0, "drive-backup started %s", err ? err->msg : "");
    job = lam_job_find("d");
    lam_job_ref(job);
    ok(lam_job_run_until_done(job) == 0, "drive-backup completed");
    lam_job_unref(job);
    ok(ev_is("created running paused running waiting pending COMPLETED concluded null "), "drive-backup events");
    LamNode *d = open_opts(json_pack("{s:s, s:s, s:{s:s, s:s}}", "driver", "raw", "node-name", "d7",
                                     "file", "driver", "file", "filename", path));
    LamChild *rd = lam_root_attach(d, "check", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    ok(count_mismatch(rd, LEN) == 0, "drive-backup target content");
    lam_root_detach(rd);
    lam_node_unref(d);
    ok(qmp_err(lam_qmp_drive_backup,
               json_pack("{s:s, s:s, s:s, s:s, s:s}", "job-id", "d2", "device", "a7", "target",
                         path, "format", "nope", "sync", "full"),
               "Unknown file format 'nope'"), "drive-backup unknown format");

    /* blockdev-create: concludes, waits for dismiss. */
    snprintf(path, sizeof(path), "%s/created.img", tmpdir);
    r = qmp_call(lam_qmp_blockdev_create, json_pack("{s:s, s:{s:s, s:s, s:I}}", "job-id", "cr",
                                          "options", "driver", "file", "filename", path, "size",
                                          (json_int_t)(1 << 20)),
                                &err);
    job = lam_job_find("cr");
    ok(r == 0 && job && lam_job_wait_status(job, LAM_JOB_STATUS_CONCLUDED, 5000),
       "blockdev-create concluded");
    struct stat st;
    ok(stat(path, &st) == 0 && st.st_size == 1 << 20, "blockdev-create made the file");
    lam_job_dismiss(job, NULL);
    ok(ev_is("created running waiting pending concluded null "), "blockdev-create events");
    r = qmp_call(lam_qmp_blockdev_create, json_pack("{s:s, s:{s:s, s:s, s:I}}", "job-id", "cr2",
                                          "options", "driver", "nope", "filename", path, "size",
                                          (json_int_t)(1 << 20)),
                                &err);
    job = lam_job_find("cr2");
    ok(r == 0 && job && lam_job_wait_status(job, LAM_JOB_STATUS_CONCLUDED, 5000),
       "failing blockdev-create still concludes");
    json_t *q = lam_query_jobs();
    const char *e = json_string_value(json_object_get(json_array_get(q, 0), "error"));
    ok(e != NULL, "query-jobs shows the create error (%s)", e ? e : "");
    json_decref(q);
    lam_job_dismiss(job, NULL);
    ok(ev_is("created running aborting concluded null "), "failed blockdev-create events");
    lam_node_unref(a);
    lam_node_unref(b);
    lam_node_unref(c);
    lam_node_unref(e7);
}

/* cbw-timeout with both on-cbw-error policies, over a slow source. */
static void timeout_case(const char *policy)
{
    make_file("a9", LEN, true);
    make_file("t9", LEN, false);
    LamNode *af = open_file("a9f", "a9");
    LamNode *a = open_opts(json_pack("{s:s, s:s, s:s, s:i}", "driver", "blkdebug", "node-name",
                                     "a9", "image", "a9f", "x-read-delay-us", 3000000));
    LamNode *t = open_file("t9", "t9");
    LamNode *cbw = open_opts(json_pack("{s:s, s:s, s:s, s:s, s:i, s:s}", "driver",
                                       "copy-before-write", "node-name", "cbw9", "file", "a9",
                                       "target", "t9", "cbw-timeout", 1, "on-cbw-error",
                                       policy));
    LamNode *acc = open_opts(json_pack("{s:s, s:s, s:s}", "driver", "snapshot-access",
                                       "node-name", "acc9", "file", "cbw9"));
    LamChild *guest = lam_root_attach(cbw, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                      LAM_PERM_ALL, NULL);
    LamChild *rd = lam_root_attach(acc, "export", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    uint8_t buf[4096];
    memset(buf, 0x77, sizeof(buf));
    int64_t t0 = lam_clock_ns();
    int r = lam_co_pwrite(guest, 0, 4096, buf, 0);
    double secs = (lam_clock_ns() - t0) / 1e9;
    bool snap = !strcmp(policy, "break-snapshot");
    ok(snap ? r == 0 : r == -ETIMEDOUT, "cbw-timeout %s: guest write returns %d after %.2fs",
       policy, r, secs);
    /* The copy takes >= 3 s (slow source); the timeout ends the wait at 1 s. */
    ok(secs > 0.9 && secs < 2.5, "cbw-timeout %s: the write waited about 1 s", policy);
    r = lam_co_pread(rd, 65536 * 4, 4096, buf, 0);
    ok(snap ? r == -EACCES : r == 0, "cbw-timeout %s: snapshot read %d", policy, r);
    lam_root_detach(rd);
    lam_root_detach(guest);
    lam_node_unref(acc);
    lam_node_unref(cbw); /* waits for the copy still running */
    lam_node_unref(t);
    lam_node_unref(a);
    lam_node_unref(af);
}

static void test_cbw_timeout(void)
{
    timeout_case("break-snapshot");
    timeout_case("break-guest-write");
}

static void test_snapshot_discard(void)
{
    make_file("a10", LEN, true);
    make_file("t10", LEN, false);
    LamNode *a = open_file("a10", "a10");
    LamNode *t = open_file("t10", "t10");
    LamNode *cbw = open_opts(json_pack("{s:s, s:s, s:s, s:s}", "driver", "copy-before-write",
                                       "node-name", "cbw10", "file", "a10", "target", "t10"));
    LamNode *acc = open_opts(json_pack("{s:s, s:s, s:s, s:s}", "driver", "snapshot-access",
                                       "node-name", "acc10", "file", "cbw10", "discard",
                                       "unmap"));
    LamChild *guest = lam_root_attach(cbw, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                      LAM_PERM_ALL, NULL);
    LamChild *rd = lam_root_attach(acc, "export", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                   LAM_PERM_ALL, NULL);
    LamBlockCopy *bcs = lam_cbw_block_copy(cbw);
    uint8_t buf[4096];
    ok(lam_co_pdiscard(rd, 65536 + 512, 3 * 65536) == 0, "snapshot discard accepted");
    ok(lam_co_pread(rd, 2 * 65536, 4096, buf, 0) == -EACCES &&
           lam_co_pread(rd, 3 * 65536, 4096, buf, 0) == -EACCES,
       "whole discarded clusters are unreadable");
    ok(lam_co_pread(rd, 65536, 4096, buf, 0) == 0 && lam_co_pread(rd, 4 * 65536, 4096, buf, 0) == 0,
       "partially covered clusters stay readable");
    int64_t dirty = lam_block_copy_dirty_bytes(bcs);
    memset(buf, 0x99, sizeof(buf));
    lam_co_pwrite(guest, 2 * 65536, 4096, buf, 0);
    ok(lam_block_copy_dirty_bytes(bcs) == dirty && dirty == LEN - 2 * 65536,
       "no copy-before-write for discarded clusters");
    lam_root_detach(rd);
    lam_root_detach(guest);
    lam_node_unref(acc);
    lam_node_unref(cbw);
    lam_node_unref(a);
    lam_node_unref(t);
}

/* NOWAIT writes (the NBD connection thread's fast path) pass the filter
 * only where no copy is due; elsewhere -EAGAIN sends them to a thread that
 * copies first. */
static void test_cbw_nowait(void)
{
    make_file("a13", LEN, true);
    make_file("t13", LEN, false);
    LamNode *a = open_file("a13", "a13");
    LamNode *t = open_file("t13", "t13");
    LamNode *cbw = open_opts(json_pack("{s:s, s:s, s:s, s:s}", "driver", "copy-before-write",
                                       "node-name", "cbw13", "file", "a13", "target", "t13"));
    LamChild *guest = lam_root_attach(cbw, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                      LAM_PERM_ALL, NULL);
    LamBlockCopy *bcs = lam_cbw_block_copy(cbw);
    uint8_t buf[4096];
    memset(buf, 0x5c, sizeof(buf));
    int64_t dirty = lam_block_copy_dirty_bytes(bcs);
    ok(lam_co_pwrite(guest, 0, 4096, buf, LAM_REQ_NOWAIT) == -EAGAIN &&
           lam_block_copy_dirty_bytes(bcs) == dirty,
       "NOWAIT write to a range still to copy: -EAGAIN, nothing copied");
    ok(lam_co_pwrite(guest, 0, 4096, buf, 0) == 0 && lam_block_copy_dirty_bytes(bcs) < dirty,
       "the same write without NOWAIT copies first");
    ok(lam_co_pwrite(guest, 0, 4096, buf, LAM_REQ_NOWAIT) == 0,
       "NOWAIT write to a copied range goes through");
    uint8_t got[4096];
    LamChild *tr = lam_root_attach(t, "check", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    LamChild *ar = lam_root_attach(a, "check", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    lam_co_pread(tr, 0, 4096, got, 0);
    bool old_kept = got[0] != 0x5c;
    lam_co_pread(ar, 0, 4096, got, 0);
    ok(old_kept && got[0] == 0x5c, "target kept the old data, source has the new");
    lam_root_detach(tr);
    lam_root_detach(ar);
    lam_root_detach(guest);
    lam_node_unref(cbw);
    lam_node_unref(a);
    lam_node_unref(t);
}

/* A drained section pauses running jobs and waits for their own I/O. */
static void test_drain_pauses_jobs(void)
{
    make_file("a11", LEN, true);
    make_file("b11", LEN, false);
    LamNode *a = open_file("a11", "a11");
    LamNode *b = open_file("b11", "b11");
    LamBackupParams p;
    lam_backup_params_init(&p);
    p.job_id = "dr";
    p.speed = 4 << 20;
    LamJob *job = lam_backup_start(a, b, &p, NULL);
    lam_job_ref(job);
    struct timespec d = { 0, 100000000 };
    nanosleep(&d, NULL);
    lam_drain_begin();
    int64_t off = atomic_load(&job->progress_current);
    ok(job->status == LAM_JOB_STATUS_PAUSED && atomic_load(&job->io_in_flight) == 0,
       "drain: job paused with no I/O in flight");
    nanosleep(&d, NULL);
    ok(atomic_load(&job->progress_current) == off, "drain: no progress while drained");
    lam_job_user_pause(job, NULL);
    lam_drain_end();
    nanosleep(&d, NULL);
    ok(job->status == LAM_JOB_STATUS_PAUSED, "drain end keeps a user pause");
    lam_job_user_resume(job, NULL);
    lam_job_set_speed(job, 0, NULL);
    int r = lam_job_run_until_done(job);
    lam_job_unref(job);
    ok(r == 0 && ev_is("created running paused running paused running waiting pending COMPLETED concluded null "),
       "drain: paused/running pair, then completion");
    lam_node_unref(a);
    lam_node_unref(b);
}

/* Job clusters bigger than a copy piece (min-cluster-size 2 MiB). */
static void test_big_clusters(void)
{
    make_file("a12", LEN, true);
    make_file("t12", LEN, false);
    LamNode *a = open_file("a12", "a12");
    LamNode *t = open_file("t12", "t12");
    LamNode *cbw = open_opts(json_pack("{s:s, s:s, s:s, s:s, s:I}", "driver", "copy-before-write",
                                       "node-name", "cbw12", "file", "a12", "target", "t12",
                                       "min-cluster-size", (json_int_t)(2 << 20)));
    LamNode *acc = open_opts(json_pack("{s:s, s:s, s:s}", "driver", "snapshot-access",
                                       "node-name", "acc12", "file", "cbw12"));
    LamChild *guest = lam_root_attach(cbw, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                      LAM_PERM_ALL, NULL);
    LamChild *rd = lam_root_attach(acc, "export", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    ok(lam_block_copy_cluster_size(lam_cbw_block_copy(cbw)) == 2 << 20, "min-cluster-size used");
    Writer w = { .edge = guest, .len = LEN, .count = 300, .seed = 77 };
    writer_main(&w);
    ok(w.errors == 0 && count_mismatch(rd, LEN) == 0,
       "2 MiB clusters: the snapshot stays intact under writes");
    LamChild *rt = lam_root_attach(t, "check", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    uint8_t *buf = malloc(2 << 20);
    if (!buf) {
        abort();
    }
    bool whole = true;
    for (int64_t off = 0; off < LEN; off += 2 << 20) {
        lam_co_pread(rt, off, 2 << 20, buf, 0);
        bool any = !lam_buf_is_zero(buf, 2 << 20);
        bool tail = !lam_buf_is_zero(buf + (2 << 20) - 4096, 4096);
        whole &= !any || tail; /* a copied cluster is copied whole */
    }
    free(buf);
    ok(whole, "copied clusters are copied whole");
    lam_root_detach(rt);
    lam_root_detach(rd);
    lam_root_detach(guest);
    lam_node_unref(acc);
    lam_node_unref(cbw);
    lam_node_unref(a);
    lam_node_unref(t);
}

/* Zero ranges are written as write_zeroes (holes in a file target), not
 * as data; data that reads back as zeroes too. */
static void test_zeroes_stay_sparse(void)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/a13", tmpdir);
    int fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
    if (ftruncate(fd, LEN) < 0) {
        abort();
    }
    uint8_t *buf = calloc(1, 1 << 20);
    if (!buf) {
        abort();
    }
    memset(buf, 0x42, 1 << 20);
    if (pwrite(fd, buf, 1 << 20, 0) != 1 << 20) {          /* 1 MiB data */
        abort();
    }
    memset(buf, 0, 1 << 20);
    if (pwrite(fd, buf, 1 << 20, 4 << 20) != 1 << 20) {    /* 1 MiB written zeroes */
        abort();
    }
    close(fd);
    free(buf);
    make_file("b13", LEN, false);
    LamNode *a = open_file("a13", "a13");
    LamNode *b = open_file("b13", "b13");
    LamBackupParams p;
    lam_backup_params_init(&p);
    p.job_id = "z";
    LamJob *job = lam_backup_start(a, b, &p, NULL);
    lam_job_ref(job);
    int r = lam_job_run_until_done(job);
    lam_job_unref(job);
    ev_clear();
    struct stat st;
    snprintf(path, sizeof(path), "%s/b13", tmpdir);
    stat(path, &st);
    ok(r == 0 && st.st_blocks * 512 <= (1 << 20) + 65536,
       "zero and hole ranges are not written as data (%lld bytes allocated)",
       (long long)st.st_blocks * 512);
    lam_node_unref(a);
    lam_node_unref(b);
}

/* x-perf.use-copy-range: the background copy moves data extents by copy
 * offload.  Observable: a written-zeroes extent (data to block status)
 * lands as data in the target, where read + write would keep it sparse
 * (test above); the content is the same either way. */
static void test_copy_range_backup(void)
{
    char path[512], cmd[1200];
    make_file("a14", LEN, true);
    snprintf(path, sizeof(path), "%s/a14", tmpdir);
    int fd = open(path, O_RDWR);
    uint8_t *zb = calloc(1, 1 << 20);
    if (fd < 0 || !zb || pwrite(fd, zb, 1 << 20, 4 << 20) != 1 << 20) {
        abort();
    }
    close(fd);
    free(zb);
    make_file("b14", LEN, false);
    LamNode *a = open_file("a14", "a14");
    LamNode *b = open_file("b14", "b14");
    LamBackupParams p;
    lam_backup_params_init(&p);
    p.job_id = "cr";
    p.use_copy_range = true;
    LamJob *job = lam_backup_start(a, b, &p, NULL);
    lam_job_ref(job);
    int r = lam_job_run_until_done(job);
    lam_job_unref(job);
    ev_clear();
    lam_node_unref(a);
    lam_node_unref(b);
    struct stat st;
    snprintf(path, sizeof(path), "%s/b14", tmpdir);
    stat(path, &st);
    ok(r == 0 && st.st_blocks * 512 >= LEN,
       "use-copy-range: data extents offloaded (%lld of %lld bytes allocated)",
       (long long)st.st_blocks * 512, (long long)LEN);
    snprintf(cmd, sizeof(cmd), "cmp -s '%s/a14' '%s/b14'", tmpdir, tmpdir);
    ok(system(cmd) == 0, "use-copy-range: target equals source");
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    lam_event_set_sink(sink);
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/lamina-jobs-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        return 1;
    }
    test_full_backup();
    test_errors();
    test_sync_none_cancel();
    test_snapshot_access_stress();
    test_classic_fleecing();
    test_blkdebug_policies();
    test_qmp_args();
    test_cbw_timeout();
    test_snapshot_discard();
    test_cbw_nowait();
    test_drain_pauses_jobs();
    test_big_clusters();
    test_zeroes_stay_sparse();
    test_copy_range_backup();
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd) != 0) {
        printf("# could not remove %s\n", tmpdir);
    }
    printf("1..%d\n", ntest);
    return nfail ? 1 : 0;
}
