/* LAM_REQ_NOWAIT through the block layer: the core refuses it for
 * drivers that don't claim it and for requests that would wait (an
 * overlapping serialising request, read-modify-write, FUA); the file
 * driver serves page-cache hits and answers -EAGAIN for the rest; qcow2
 * serves cached mappings of normal and zero clusters and overwrites in
 * place, and answers -EAGAIN for everything else without changing
 * anything.  qcow2's counted read registration still makes a cluster
 * free wait for reads of it (I5).  A concurrency case mixes NOWAIT
 * readers (with the blocking retry) and allocating writers and discards
 * on one qcow2 image (runs under TSan). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include "memdrv.h"
#include "tap.h"

#define TMPFS_MAGIC_ 0x01021994

static char tmpdir[] = "/tmp/lamina-nowait-XXXXXX";
static bool evictable; /* the page cache of tmpdir can be dropped */

static LamNode *open_json(const char *json, int flags)
{
    json_error_t jerr;
    json_t *o = json_loads(json, 0, &jerr);
    LamError *err = NULL;
    LamNode *bs = lam_node_open(o, flags, &err);
    json_decref(o);
    if (!bs) {
        fprintf(stderr, "# open failed: %s\n", err ? err->msg : "?");
        lam_error_free(err);
    }
    return bs;
}

static LamChild *rw_root(LamNode *bs)
{
    LamError *err = NULL;
    LamChild *c = lam_root_attach(bs, NULL, LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                  LAM_PERM_ALL, &err);
    if (!c) {
        fprintf(stderr, "# attach failed: %s\n", err->msg);
        lam_error_free(err);
    }
    return c;
}

/* Drops the file's pages from the page cache (written back first). */
static void evict(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd >= 0) {
        fsync(fd);
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        close(fd);
    }
}

static void fill(uint8_t *b, size_t n, int seed)
{
    for (size_t i = 0; i < n; i++) {
        b[i] = (uint8_t)(seed * 37 + i / 512 + i);
    }
}

/* A copy of the memory driver that claims NOWAIT (and ignores it): the
 * core's own waits are what is tested with it. */
static LamDriver mem_nowait;

static void test_core_refuses(void)
{
    LamNode *bs = open_json("{\"driver\":\"test-mem\",\"size\":65536}", LAM_O_RDWR);
    CHECK(bs != NULL);
    LamChild *c = rw_root(bs);
    uint8_t b[4096];
    memset(b, 0xaa, sizeof(b));
    /* The driver does not claim NOWAIT: nothing reaches it. */
    CHECK_EQ(lam_co_pread(c, 0, 4096, b, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pwrite(c, 0, 4096, b, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pwrite_zeroes(c, 0, 4096, LAM_REQ_NOWAIT), -EAGAIN);
    MemState *s = bs->opaque;
    CHECK_EQ(s->nreads, 0);
    CHECK_EQ(s->nwrites, 0);
    lam_root_detach(c);
    lam_node_unref(bs);

    bs = open_json("{\"driver\":\"test-mem-nowait\",\"size\":65536,\"align\":512}",
                   LAM_O_RDWR);
    CHECK(bs != NULL);
    c = rw_root(bs);
    s = bs->opaque;
    CHECK_EQ(lam_co_pwrite(c, 0, 4096, b, LAM_REQ_NOWAIT), 0);
    CHECK_EQ(lam_co_pread(c, 0, 4096, b, LAM_REQ_NOWAIT), 0);
    CHECK_EQ(b[100], 0xaa);
    /* Read-modify-write and FUA would wait. */
    CHECK_EQ(lam_co_pwrite(c, 100, 10, b, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pwrite(c, 0, 4096, b, LAM_REQ_NOWAIT | LAM_REQ_FUA), -EAGAIN);
    CHECK_EQ(s->nwrites, 1);
    CHECK_EQ(s->nreads, 1);
    lam_root_detach(c);
    lam_node_unref(bs);
}

struct held_write {
    LamChild *c;
    int ret;
};

static void *serialising_writer(void *p)
{
    struct held_write *h = p;
    uint8_t b[4096] = { 1 };
    h->ret = lam_co_pwrite(h->c, 4096, 4096, b, LAM_REQ_SERIALISING);
    return NULL;
}

/* An overlapping serialising request makes a NOWAIT request fail at once
 * instead of waiting for it; a plain one waits. */
static void test_serialising_conflict(void)
{
    LamNode *bs = open_json("{\"driver\":\"test-mem-nowait\",\"size\":65536}", LAM_O_RDWR);
    CHECK(bs != NULL);
    LamChild *c = rw_root(bs);
    mem_set_hold(bs, false, true);
    struct held_write h = { c, 1 };
    pthread_t th;
    pthread_create(&th, NULL, serialising_writer, &h);
    mem_wait_entered(bs, 1);
    uint8_t b[4096];
    CHECK_EQ(lam_co_pread(c, 4096, 4096, b, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pread(c, 6000, 100, b, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pwrite(c, 4096, 4096, b, LAM_REQ_NOWAIT), -EAGAIN);
    /* Elsewhere is free. */
    CHECK_EQ(lam_co_pread(c, 16384, 4096, b, LAM_REQ_NOWAIT), 0);
    mem_set_hold(bs, false, false);
    pthread_join(th, NULL);
    CHECK_EQ(h.ret, 0);
    CHECK_EQ(lam_co_pread(c, 4096, 4096, b, LAM_REQ_NOWAIT), 0);
    CHECK_EQ(b[0], 1);
    lam_root_detach(c);
    lam_node_unref(bs);
}

static void test_file(void)
{
    char path[128], json[300];
    snprintf(path, sizeof(path), "%s/f.raw", tmpdir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    static uint8_t data[1 << 20], out[1 << 20];
    fill(data, sizeof(data), 1);
    CHECK(fd >= 0 && write(fd, data, sizeof(data)) == (ssize_t)sizeof(data));
    close(fd);
    evict(path);
    snprintf(json, sizeof(json),
             "{\"driver\":\"file\",\"filename\":\"%s\"}", path);
    LamNode *bs = open_json(json, LAM_O_RDWR);
    CHECK(bs != NULL);
    LamChild *c = rw_root(bs);

    memset(out, 0, sizeof(out));
    int ret = lam_co_pread(c, 65536, 65536, out, LAM_REQ_NOWAIT);
    if (evictable) {
        CHECK_EQ(ret, -EAGAIN); /* not in the page cache */
    } else {
        CHECK(ret == 0 || ret == -EAGAIN);
    }
    CHECK_EQ(lam_co_pread(c, 65536, 65536, out, 0), 0);
    CHECK(memcmp(out, data + 65536, 65536) == 0);
    memset(out, 0, sizeof(out));
    CHECK_EQ(lam_co_pread(c, 65536, 65536, out, LAM_REQ_NOWAIT), 0);
    CHECK(memcmp(out, data + 65536, 65536) == 0);
    /* Partly cached: the uncached rest makes it fail as a whole. */
    if (evictable) {
        CHECK_EQ(lam_co_pread(c, 65536, 131072, out, LAM_REQ_NOWAIT), -EAGAIN);
    }

    /* Whole pages are written; parts of a page and FUA are refused. */
    uint8_t w[4096];
    fill(w, sizeof(w), 9);
    CHECK_EQ(lam_co_pwrite(c, 8192, 4096, w, LAM_REQ_NOWAIT), 0);
    memcpy(data + 8192, w, 4096);
    CHECK_EQ(lam_co_pwrite(c, 512, 512, w, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pwrite(c, 16384, 4096, w, LAM_REQ_NOWAIT | LAM_REQ_FUA), -EAGAIN);
    CHECK_EQ(lam_co_pread(c, 0, sizeof(out), out, 0), 0);
    CHECK(memcmp(out, data, sizeof(out)) == 0);
    lam_root_detach(c);
    lam_node_unref(bs);

    /* O_DIRECT always waits for the device. */
    bs = open_json(json, LAM_O_RDWR | LAM_O_NOCACHE);
    if (bs) {
        c = rw_root(bs);
        CHECK_EQ(lam_co_pread(c, 0, 4096, out, LAM_REQ_NOWAIT), -EAGAIN);
        CHECK_EQ(lam_co_pwrite(c, 0, 4096, w, LAM_REQ_NOWAIT), -EAGAIN);
        CHECK_EQ(lam_co_pread(c, 0, 4096, out, 0), 0);
        CHECK(memcmp(out, data, 4096) == 0);
        lam_root_detach(c);
        lam_node_unref(bs);
    } else {
        printf("# no O_DIRECT here: skipped that part\n");
    }
}

static LamNode *open_qcow2(const char *path, const char *extra)
{
    char json[512];
    snprintf(json, sizeof(json),
             "{\"driver\":\"qcow2\"%s,\"file\":{\"driver\":\"file\",\"filename\":\"%s\"}}",
             extra, path);
    return open_json(json, LAM_O_RDWR);
}

static int create_qcow2(const char *path, int64_t size, const char *backing)
{
    json_t *o = json_pack("{s:i}", "cluster-size", 4096);
    if (backing) {
        json_object_set_new(o, "backing-file", json_string(backing));
        json_object_set_new(o, "backing-fmt", json_string("raw"));
    }
    LamError *err = NULL;
    int ret = lam_create_image(path, "qcow2", size, o, &err);
    json_decref(o);
    if (ret < 0) {
        fprintf(stderr, "# create failed: %s\n", err ? err->msg : "?");
        lam_error_free(err);
    }
    return ret;
}

static void test_qcow2(void)
{
    char path[128], base[128];
    snprintf(path, sizeof(path), "%s/q.qcow2", tmpdir);
    snprintf(base, sizeof(base), "%s/base.raw", tmpdir);
    /* 4 KiB clusters: one L2 table maps 2 MiB; a 4-entry L2 cache. */
    CHECK_EQ(create_qcow2(path, 64 << 20, NULL), 0);
    LamNode *bs = open_qcow2(path, ",\"l2-cache-size\":16384");
    CHECK(bs != NULL);
    LamChild *c = rw_root(bs);
    uint8_t w[8192], out[8192];
    fill(w, sizeof(w), 3);

    /* Unallocated without a backing file reads as zeroes; a NOWAIT write
     * there is refused and does not allocate. */
    memset(out, 1, sizeof(out));
    CHECK_EQ(lam_co_pread(c, 0, 4096, out, LAM_REQ_NOWAIT), 0);
    CHECK(out[0] == 0 && out[4095] == 0);
    CHECK_EQ(lam_co_pwrite(c, 0, 4096, w, LAM_REQ_NOWAIT), -EAGAIN);
    int64_t pnum, map;
    LamNode *file;
    CHECK_EQ(lam_co_block_status(c, 0, 4096, &pnum, &map, &file) & LAM_BS_ALLOCATED, 0);

    /* Allocated normal cluster, cached everywhere: served. */
    CHECK_EQ(lam_co_pwrite(c, 0, 8192, w, 0), 0);
    memset(out, 0, sizeof(out));
    CHECK_EQ(lam_co_pread(c, 0, 8192, out, LAM_REQ_NOWAIT), 0);
    CHECK(memcmp(out, w, 8192) == 0);
    /* Overwrite in place, in one piece. */
    fill(w, 4096, 4);
    CHECK_EQ(lam_co_pwrite(c, 4096, 4096, w, LAM_REQ_NOWAIT), 0);
    CHECK_EQ(lam_co_pread(c, 4096, 4096, out, 0), 0);
    CHECK(memcmp(out, w, 4096) == 0);
    /* Spanning an allocated and an unallocated cluster: refused whole. */
    CHECK_EQ(lam_co_pwrite(c, 4096, 8192, w, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_block_status(c, 8192, 4096, &pnum, &map, &file) & LAM_BS_ALLOCATED, 0);

    /* Zero clusters (here: allocated, zero flag) read as zeroes. */
    CHECK_EQ(lam_co_pwrite(c, 65536, 4096, w, 0), 0);
    CHECK_EQ(lam_co_pwrite_zeroes(c, 65536, 4096, 0), 0);
    CHECK_EQ(lam_co_block_status(c, 65536, 4096, &pnum, &map, &file) &
             (LAM_BS_ZERO | LAM_BS_ALLOCATED), LAM_BS_ZERO | LAM_BS_ALLOCATED);
    memset(out, 1, sizeof(out));
    CHECK_EQ(lam_co_pread(c, 65536, 4096, out, LAM_REQ_NOWAIT), 0);
    CHECK(out[0] == 0 && out[4095] == 0);
    CHECK_EQ(lam_co_pwrite(c, 65536, 4096, w, LAM_REQ_NOWAIT), -EAGAIN);

    /* Data evicted from the page cache: -EAGAIN, then the blocking read
     * brings it back. */
    lam_node_flush_all(bs);
    evict(path);
    int ret = lam_co_pread(c, 0, 4096, out, LAM_REQ_NOWAIT);
    CHECK(evictable ? ret == -EAGAIN : (ret == 0 || ret == -EAGAIN));
    CHECK_EQ(lam_co_pread(c, 0, 4096, out, 0), 0);
    CHECK_EQ(lam_co_pread(c, 0, 4096, out, LAM_REQ_NOWAIT), 0);
    fill(w, sizeof(w), 3);
    CHECK(memcmp(out, w, 4096) == 0);

    /* L2 tables pushed out of the 4-entry cache: a lookup would read. */
    for (int i = 1; i <= 6; i++) {
        CHECK_EQ(lam_co_pwrite(c, (int64_t)i * (2 << 20), 4096, w, 0), 0);
    }
    CHECK_EQ(lam_co_pread(c, 0, 4096, out, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pread(c, 0, 4096, out, 0), 0);
    CHECK_EQ(lam_co_pread(c, 0, 4096, out, LAM_REQ_NOWAIT), 0);
    CHECK(memcmp(out, w, 4096) == 0);
    lam_root_detach(c);
    lam_node_unref(bs);

    /* Backing file fall-through and compressed clusters wait. */
    int fd = open(base, O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0 && write(fd, w, 4096) == 4096);
    close(fd);
    unlink(path);
    CHECK_EQ(create_qcow2(path, 1 << 20, base), 0);
    bs = open_qcow2(path, "");
    CHECK(bs != NULL);
    c = rw_root(bs);
    CHECK_EQ(lam_co_pread(c, 0, 4096, out, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pread(c, 65536, 4096, out, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pread(c, 0, 4096, out, 0), 0);
    CHECK(memcmp(out, w, 4096) == 0);
    CHECK_EQ(lam_co_pwrite(c, 8192, 4096, w, LAM_REQ_WRITE_COMPRESSED), 0);
    CHECK_EQ(lam_co_pread(c, 8192, 4096, out, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pwrite(c, 8192, 4096, w, LAM_REQ_NOWAIT), -EAGAIN);
    CHECK_EQ(lam_co_pread(c, 8192, 4096, out, 0), 0);
    CHECK(memcmp(out, w, 4096) == 0);
    lam_root_detach(c);
    lam_node_unref(bs);
}

/* ---- grace period: a freed cluster is not reused under a read (I5) ---- */

struct slow_read {
    LamChild *c;
    int64_t off;
    uint8_t buf[4096];
    int ret;
};

static void *slow_reader(void *p)
{
    struct slow_read *r = p;
    r->ret = lam_co_pread(r->c, r->off, 4096, r->buf, 0);
    return NULL;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Reads are slowed down below qcow2 (blkdebug): a discard of the cluster
 * being read must wait for the read before the host cluster is freed and
 * reused by an allocating write, or the read would return the new data. */
static void test_grace_waits_for_reads(void)
{
    char path[128], json[600];
    snprintf(path, sizeof(path), "%s/grace.qcow2", tmpdir);
    CHECK_EQ(create_qcow2(path, 1 << 20, NULL), 0);
    snprintf(json, sizeof(json),
             "{\"driver\":\"qcow2\",\"discard\":\"unmap\",\"file\":"
             "{\"driver\":\"blkdebug\",\"x-read-delay-us\":300000,\"image\":"
             "{\"driver\":\"file\",\"filename\":\"%s\"}}}", path);
    LamNode *bs = open_json(json, LAM_O_RDWR);
    CHECK(bs != NULL);
    if (!bs) {
        return;
    }
    LamChild *c = rw_root(bs);
    uint8_t old[4096], neu[4096];
    fill(old, sizeof(old), 5);
    fill(neu, sizeof(neu), 6);
    CHECK_EQ(lam_co_pwrite(c, 0, 4096, old, 0), 0);
    int64_t pnum, map_old = -1, map_new = -2;
    LamNode *file;
    lam_co_block_status(c, 0, 4096, &pnum, &map_old, &file);

    struct slow_read r = { .c = c, .off = 0 };
    pthread_t th;
    pthread_create(&th, NULL, slow_reader, &r);
    usleep(100000); /* the read has looked up its mapping and sleeps */
    int64_t t0 = now_ms();
    CHECK_EQ(lam_co_pdiscard(c, 0, 4096), 0);
    int64_t waited = now_ms() - t0;
    CHECK_EQ(lam_co_pwrite(c, 65536, 4096, neu, 0), 0);
    lam_co_block_status(c, 65536, 4096, &pnum, &map_new, &file);
    pthread_join(th, NULL);
    CHECK_EQ(r.ret, 0);
    CHECK(memcmp(r.buf, old, 4096) == 0);
    CHECK(waited >= 100);
    /* Otherwise this test proves nothing. */
    CHECK_EQ(map_new, map_old);
    lam_root_detach(c);
    lam_node_unref(bs);
}

/* ---- concurrency: NOWAIT readers vs. allocating writers ---- */

#define CC_STABLE 64   /* clusters [0, 64) hold fixed data */
#define CC_BUSY 64     /* clusters [64, 128) are rewritten and zapped */

struct cc {
    LamChild *c;
    _Atomic bool stop;
    _Atomic int bad, nowait_ok, nowait_again;
};

static void *cc_reader(void *p)
{
    struct cc *cc = p;
    uint8_t out[4096], want[4096];
    unsigned seed = 1;
    while (!atomic_load(&cc->stop)) {
        int k = (int)(rand_r(&seed) % CC_STABLE);
        int ret = lam_co_pread(cc->c, (int64_t)k * 4096, 4096, out, LAM_REQ_NOWAIT);
        if (ret == -EAGAIN) {
            atomic_fetch_add(&cc->nowait_again, 1);
            ret = lam_co_pread(cc->c, (int64_t)k * 4096, 4096, out, 0);
        } else if (ret == 0) {
            atomic_fetch_add(&cc->nowait_ok, 1);
        }
        fill(want, sizeof(want), k);
        if (ret < 0 || memcmp(out, want, sizeof(out))) {
            atomic_fetch_add(&cc->bad, 1);
        }
    }
    return NULL;
}

static void *cc_writer(void *p)
{
    struct cc *cc = p;
    uint8_t b[4096];
    for (int round = 0; round < 12; round++) {
        for (int k = CC_STABLE; k < CC_STABLE + CC_BUSY; k++) {
            int64_t off = (int64_t)k * 4096;
            fill(b, sizeof(b), k + round);
            int ret = lam_co_pwrite(cc->c, off, 4096, b, LAM_REQ_NOWAIT);
            if (ret == -EAGAIN) {
                ret = lam_co_pwrite(cc->c, off, 4096, b, 0);
            }
            if (ret < 0) {
                atomic_fetch_add(&cc->bad, 1);
            }
            if ((k + round) % 3 == 0 && lam_co_pdiscard(cc->c, off, 4096) < 0) {
                atomic_fetch_add(&cc->bad, 1);
            }
        }
    }
    return NULL;
}

static void test_concurrency(void)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/cc.qcow2", tmpdir);
    CHECK_EQ(create_qcow2(path, 8 << 20, NULL), 0);
    LamNode *bs = open_qcow2(path, ",\"discard\":\"unmap\"");
    CHECK(bs != NULL);
    struct cc cc = { .c = rw_root(bs) };
    uint8_t b[4096];
    for (int k = 0; k < CC_STABLE; k++) {
        fill(b, sizeof(b), k);
        CHECK_EQ(lam_co_pwrite(cc.c, (int64_t)k * 4096, 4096, b, 0), 0);
    }
    pthread_t r[3], w[2];
    for (int i = 0; i < 3; i++) {
        pthread_create(&r[i], NULL, cc_reader, &cc);
    }
    for (int i = 0; i < 2; i++) {
        pthread_create(&w[i], NULL, cc_writer, &cc);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(w[i], NULL);
    }
    atomic_store(&cc.stop, true);
    for (int i = 0; i < 3; i++) {
        pthread_join(r[i], NULL);
    }
    CHECK_EQ(atomic_load(&cc.bad), 0);
    CHECK(atomic_load(&cc.nowait_ok) > 0);
    printf("# NOWAIT reads served %d, refused %d\n", atomic_load(&cc.nowait_ok),
           atomic_load(&cc.nowait_again));
    LamCheckResult res = { 0 };
    CHECK_EQ(lam_node_check(bs, &res, LAM_CHECK_NONE), 0);
    CHECK_EQ(res.corruptions, 0);
    free(res.msgs);
    lam_root_detach(cc.c);
    lam_node_unref(bs);
}

int main(void)
{
    lam_driver_register(&test_drv_mem);
    mem_nowait = test_drv_mem;
    mem_nowait.name = "test-mem-nowait";
    mem_nowait.supported_read_flags = LAM_REQ_NOWAIT;
    mem_nowait.supported_write_flags = LAM_REQ_NOWAIT;
    lam_driver_register(&mem_nowait);
    if (!mkdtemp(tmpdir)) {
        return 1;
    }
    struct statfs sf;
    evictable = statfs(tmpdir, &sf) == 0 && sf.f_type != TMPFS_MAGIC_;
    if (!evictable) {
        printf("# %s is on tmpfs: page-cache eviction is not checked\n", tmpdir);
    }
    RUN(test_core_refuses);
    RUN(test_serialising_conflict);
    RUN(test_file);
    RUN(test_qcow2);
    RUN(test_grace_waits_for_reads);
    RUN(test_concurrency);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd)) {
        /* best effort */
    }
    return tap_done();
}
