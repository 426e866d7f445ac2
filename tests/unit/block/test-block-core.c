/* Unit tests of the block core: request path, alignment, serialisation,
 * emulation, permissions, drain, probing guard, file and raw drivers. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "memdrv.h"
#include "tap.h"

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

static void test_unaligned_rmw(void)
{
    LamNode *bs = open_json("{\"driver\":\"test-mem\",\"node-name\":\"m1\",\"size\":65536,\"align\":4096}",
                            LAM_O_RDWR);
    CHECK(bs != NULL);
    LamChild *c = rw_root(bs);
    uint8_t buf[10000], out[10000];
    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = (uint8_t)(i * 7 + 1);
    }
    CHECK_EQ(lam_co_pwrite(c, 1000, 9000, buf, 0), 0);
    CHECK_EQ(lam_co_pwrite(c, 3, 5, "hello", 0), 0);
    CHECK_EQ(lam_co_pread(c, 1000, 9000, out, 0), 0);
    CHECK(memcmp(out, buf, 9000) == 0);
    CHECK_EQ(lam_co_pread(c, 3, 5, out, 0), 0);
    CHECK(memcmp(out, "hello", 5) == 0);
    CHECK_EQ(lam_co_pread(c, 0, 3, out, 0), 0);
    CHECK(out[0] == 0 && out[1] == 0 && out[2] == 0);
    MemState *s = bs->opaque;
    CHECK_EQ(atomic_load(&s->misaligned), 0);
    /* Beyond the end through a root edge: -EIO, not a crash. */
    CHECK_EQ(lam_co_pread(c, 65536 - 10, 20, out, 0), -EIO);
    lam_root_detach(c);
    lam_node_unref(bs);
}

struct rmw_arg {
    LamChild *c;
    int id;
};

static void *rmw_thread(void *p)
{
    struct rmw_arg *a = p;
    /* Each thread owns the bytes i where i % 8 == id, within one block. */
    for (int round = 0; round < 200; round++) {
        for (int i = a->id; i < 512; i += 8) {
            uint8_t v = (uint8_t)(a->id + 1);
            if (lam_co_pwrite(a->c, i, 1, &v, 0) < 0) {
                return (void *)1;
            }
        }
    }
    return NULL;
}

static void test_concurrent_rmw(void)
{
    LamNode *bs = open_json("{\"driver\":\"test-mem\",\"size\":8192,\"align\":4096}", LAM_O_RDWR);
    LamChild *c = rw_root(bs);
    pthread_t t[8];
    struct rmw_arg a[8];
    for (int i = 0; i < 8; i++) {
        a[i] = (struct rmw_arg){c, i};
        pthread_create(&t[i], NULL, rmw_thread, &a[i]);
    }
    for (int i = 0; i < 8; i++) {
        void *r;
        pthread_join(t[i], &r);
        CHECK(r == NULL);
    }
    uint8_t out[512];
    CHECK_EQ(lam_co_pread(c, 0, 512, out, 0), 0);
    int lost = 0;
    for (int i = 0; i < 512; i++) {
        lost += out[i] != (uint8_t)(i % 8 + 1);
    }
    CHECK_EQ(lost, 0);
    lam_root_detach(c);
    lam_node_unref(bs);
}

struct io_arg {
    LamChild *c;
    int64_t off, len;
    int flags;
    bool write;
    int ret;
    uint8_t buf[4096];
};

static void *io_thread(void *p)
{
    struct io_arg *a = p;
    a->ret = a->write ? lam_co_pwrite(a->c, a->off, a->len, a->buf, a->flags)
                      : lam_co_pread(a->c, a->off, a->len, a->buf, a->flags);
    return NULL;
}

/* A serialising write must wait for an overlapping in-flight read, and the
 * read must see the old data (the fleecing guarantee). */
static void test_serialising_waits(void)
{
    LamNode *bs = open_json("{\"driver\":\"test-mem\",\"size\":65536}", LAM_O_RDWR);
    LamChild *c = rw_root(bs);
    MemState *s = bs->opaque;
    uint8_t old[4096];
    memset(old, 'O', sizeof(old));
    CHECK_EQ(lam_co_pwrite(c, 0, 4096, old, 0), 0);

    mem_set_hold(bs, true, false);
    struct io_arg rd = {.c = c, .off = 0, .len = 4096};
    pthread_t tr, tw;
    pthread_create(&tr, NULL, io_thread, &rd);
    mem_wait_entered(bs, 2); /* write above + this read */

    struct io_arg wr = {.c = c, .off = 1024, .len = 1024, .write = true,
                        .flags = LAM_REQ_SERIALISING};
    memset(wr.buf, 'N', sizeof(wr.buf));
    pthread_create(&tw, NULL, io_thread, &wr);
    usleep(50000);
    pthread_mutex_lock(&s->lock);
    int writes_before = s->nwrites;
    pthread_mutex_unlock(&s->lock);
    CHECK_EQ(writes_before, 1); /* the serialising write has not run */
    mem_set_hold(bs, false, false);
    pthread_join(tr, NULL);
    pthread_join(tw, NULL);
    CHECK_EQ(rd.ret, 0);
    CHECK_EQ(wr.ret, 0);
    CHECK(rd.buf[1500] == 'O');
    uint8_t out[4096];
    lam_co_pread(c, 0, 4096, out, 0);
    CHECK(out[1500] == 'N' && out[0] == 'O');
    lam_root_detach(c);
    lam_node_unref(bs);
}

static void test_zero_and_fua_emulation(void)
{
    LamNode *bs = open_json("{\"driver\":\"test-mem\",\"size\":4194304,\"align\":512}", LAM_O_RDWR);
    LamChild *c = rw_root(bs);
    MemState *s = bs->opaque;
    uint8_t *buf = malloc(3 << 20);
    memset(buf, 0xaa, 3 << 20);
    CHECK_EQ(lam_co_pwrite(c, 0, 3 << 20, buf, 0), 0);
    CHECK_EQ(lam_co_pwrite_zeroes(c, 100, (2 << 20) + 50, 0), 0);
    CHECK_EQ(lam_co_pread(c, 0, 3 << 20, buf, 0), 0);
    CHECK(buf[99] == 0xaa && buf[100] == 0 && buf[(2 << 20) + 149] == 0 &&
          buf[(2 << 20) + 150] == 0xaa);
    CHECK_EQ(lam_co_pwrite_zeroes(c, 0, 4096, LAM_REQ_NO_FALLBACK), -ENOTSUP);
    int fl = atomic_load(&s->nflush);
    CHECK_EQ(lam_co_pwrite(c, 0, 512, buf, LAM_REQ_FUA), 0);
    CHECK_EQ(atomic_load(&s->nflush), fl + 1); /* FUA emulated by flush */
    CHECK_EQ(s->nfua, 0);
    free(buf);
    lam_root_detach(c);
    lam_node_unref(bs);
}

static void test_permissions(void)
{
    LamNode *bs = open_json("{\"driver\":\"test-mem\",\"node-name\":\"p1\",\"size\":65536}", LAM_O_RDWR);
    LamError *err = NULL;
    LamChild *a = lam_root_attach(bs, NULL, LAM_PERM_CONSISTENT_READ,
                                  LAM_PERM_CONSISTENT_READ, &err);
    CHECK(a != NULL);
    LamChild *b = lam_root_attach(bs, NULL, LAM_PERM_WRITE, LAM_PERM_ALL, &err);
    CHECK(b == NULL);
    CHECK(err && strstr(err->msg, "Permission conflict on node 'p1': permissions 'write' are both required by an unnamed block device") != NULL);
    lam_error_free(err);
    /* A read-only user can't write. */
    uint8_t x = 1;
    CHECK_EQ(lam_co_pwrite(a, 0, 1, &x, 0), -EPERM);
    lam_root_detach(a);
    lam_node_unref(bs);
}

static void test_node_names(void)
{
    LamNode *a = open_json("{\"driver\":\"test-mem\",\"node-name\":\"dup\"}", LAM_O_RDWR);
    CHECK(a != NULL);
    json_t *o = json_pack("{s:s,s:s}", "driver", "test-mem", "node-name", "dup");
    LamError *err = NULL;
    CHECK(lam_node_open(o, LAM_O_RDWR, &err) == NULL);
    CHECK(err && !strcmp(err->msg, "Duplicate nodes with node-name='dup'"));
    lam_error_free(err);
    err = NULL;
    json_object_set_new(o, "node-name", json_string("1bad"));
    CHECK(lam_node_open(o, LAM_O_RDWR, &err) == NULL);
    CHECK(err && strstr(err->msg, "Invalid node-name") != NULL);
    lam_error_free(err);
    err = NULL;
    json_object_set_new(o, "driver", json_string("nope"));
    CHECK(lam_node_open(o, LAM_O_RDWR, &err) == NULL);
    CHECK(err && !strcmp(err->msg, "Parameter 'driver' does not accept value 'nope'"));
    lam_error_free(err);
    json_decref(o);
    CHECK(lam_node_find("dup") == a);
    lam_node_unref(a);
    CHECK(lam_node_find("dup") == NULL);
}

static void *drain_thread(void *p)
{
    lam_drain_begin();
    *(int *)p = 1;
    lam_drain_end();
    return NULL;
}

static void test_drain(void)
{
    LamNode *bs = open_json("{\"driver\":\"test-mem\",\"size\":65536}", LAM_O_RDWR);
    LamChild *c = rw_root(bs);
    mem_set_hold(bs, true, true);
    struct io_arg rd = {.c = c, .off = 0, .len = 512};
    pthread_t tr, td;
    pthread_create(&tr, NULL, io_thread, &rd);
    mem_wait_entered(bs, 1);
    int drained = 0;
    pthread_create(&td, NULL, drain_thread, &drained);
    usleep(30000);
    CHECK_EQ(drained, 0); /* waits for the in-flight read */
    mem_set_hold(bs, false, false);
    pthread_join(tr, NULL);
    pthread_join(td, NULL);
    CHECK_EQ(drained, 1);
    CHECK_EQ(lam_node_in_flight(bs), 0);
    lam_root_detach(c);
    lam_node_unref(bs);
}

static char tmpdir[] = "/tmp/lamina-core-XXXXXX";

static void test_file_raw(void)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/disk.raw", tmpdir);
    LamError *err = NULL;
    CHECK_EQ(lam_create_image(path, "raw", 4 << 20, NULL, &err), 0);
    LamNode *bs = lam_open_image(path, "raw", LAM_O_RDWR, NULL, &err);
    CHECK(bs != NULL);
    CHECK_EQ(lam_node_length(bs), 4 << 20);
    LamChild *c = rw_root(bs);
    uint8_t buf[65536];
    memset(buf, 0x5a, sizeof(buf));
    CHECK_EQ(lam_co_pwrite(c, 1 << 20, sizeof(buf), buf, 0), 0);
    int64_t pnum, map;
    LamNode *file;
    int ret = lam_co_block_status(c, 0, 4 << 20, &pnum, &map, &file);
    CHECK(ret >= 0 && (ret & LAM_BS_ZERO) && pnum == 1 << 20);
    ret = lam_co_block_status(c, 1 << 20, 4 << 20, &pnum, &map, &file);
    CHECK(ret >= 0 && (ret & LAM_BS_DATA) && pnum == 65536);
    int depth = -1;
    ret = lam_co_block_status_above(c, NULL, 1 << 20, 1 << 20, &pnum, &map, &file, &depth);
    CHECK(ret >= 0 && (ret & LAM_BS_DATA) && depth == 1);
    CHECK_EQ(lam_co_pwrite_zeroes(c, 1 << 20, 65536, LAM_REQ_MAY_UNMAP), 0);
    CHECK_EQ(lam_co_pread(c, 1 << 20, 65536, buf, 0), 0);
    CHECK(lam_buf_is_zero(buf, sizeof(buf)));
    CHECK_EQ(lam_co_flush(c), 0);
    lam_root_detach(c);
    lam_node_unref(bs);

    /* raw offset/size window and its error message. */
    json_t *o = json_pack("{s:s, s:I, s:I, s:{s:s, s:s}}", "driver", "raw", "offset",
                          (json_int_t)(4 << 20), "size", (json_int_t)(1 << 20), "file",
                          "driver", "file", "filename", path);
    CHECK(lam_node_open(o, 0, &err) == NULL);
    CHECK(err && strstr(err->msg, "The sum of offset (4194304) and size (1048576) has to be smaller or equal to the  actual size of the containing file (4194304)"));
    lam_error_free(err);
    err = NULL;
    json_decref(o);

    CHECK(lam_open_image("/nonexistent/x.img", "raw", 0, NULL, &err) == NULL);
    CHECK(err && !strcmp(err->msg, "Could not open '/nonexistent/x.img': No such file or directory"));
    lam_error_free(err);
}

/* A fake format that probes on "EVIL" so the raw guard can be tested
 * without depending on another driver. */
static int evil_probe(const uint8_t *buf, int len, const char *f)
{
    return len >= 4 && !memcmp(buf, "EVIL", 4) ? 100 : 0;
}
static const LamDriver evil_drv = {
    .name = "test-evil", .kind = LAM_DRV_FORMAT, .probe = evil_probe,
};

static void test_probed_raw_guard(void)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/guest.raw", tmpdir);
    LamError *err = NULL;
    CHECK_EQ(lam_create_image(path, "raw", 1 << 20, NULL, &err), 0);
    LamNode *bs = lam_open_image(path, NULL, LAM_O_RDWR, NULL, &err);
    CHECK(bs && bs->probed_raw);
    LamChild *c = rw_root(bs);
    CHECK_EQ(lam_co_pwrite(c, 0, 4, "EVIL", 0), -EPERM);
    CHECK_EQ(lam_co_pwrite(c, 0, 4, "GOOD", 0), 0);
    CHECK_EQ(lam_co_pwrite(c, 512, 4, "EVIL", 0), 0); /* other sectors are free */
    lam_root_detach(c);
    lam_node_unref(bs);
    /* Explicit raw: no restriction. */
    bs = lam_open_image(path, "raw", LAM_O_RDWR, NULL, &err);
    c = rw_root(bs);
    CHECK_EQ(lam_co_pwrite(c, 0, 4, "EVIL", 0), 0);
    lam_root_detach(c);
    lam_node_unref(bs);
    CHECK(!strcmp(lam_probe_format((const uint8_t *)"EVIL", 4, NULL), "test-evil"));
}

static void test_iov(void)
{
    char a[4] = "abcd", b[4] = "efgh";
    LamIOV q, sub;
    lam_iov_init(&q, 1);
    lam_iov_add(&q, a, 4);
    lam_iov_add(&q, b, 4);
    CHECK_EQ(q.size, 8);
    lam_iov_init(&sub, 1);
    lam_iov_concat(&sub, &q, 3, 3);
    char out[8] = {0};
    CHECK_EQ(lam_iov_to_buf(&sub, 0, out, 8), 3);
    CHECK(!memcmp(out, "def", 3));
    lam_iov_memset(&q, 2, 0, 4);
    CHECK(!memcmp(a, "ab\0\0", 4) && !memcmp(b, "\0\0gh", 4));
    CHECK(lam_iov_is_zero(&q, 2, 4));
    CHECK(!lam_iov_is_zero(&q, 1, 4));
    lam_iov_destroy(&sub);
    lam_iov_destroy(&q);
    char *p = lam_path_combine("/a/b/top.qcow2", "base.qcow2");
    CHECK(!strcmp(p, "/a/b/base.qcow2"));
    free(p);
    p = lam_path_combine("top.qcow2", "base.qcow2");
    CHECK(!strcmp(p, "base.qcow2"));
    free(p);
    p = lam_path_combine("/a/top.qcow2", "/abs/base");
    CHECK(!strcmp(p, "/abs/base"));
    free(p);
}

int main(void)
{
    lam_driver_register(&test_drv_mem);
    lam_driver_register(&evil_drv);
    if (!mkdtemp(tmpdir)) {
        return 1;
    }
    RUN(test_iov);
    RUN(test_unaligned_rmw);
    RUN(test_concurrent_rmw);
    RUN(test_serialising_waits);
    RUN(test_zero_and_fua_emulation);
    RUN(test_permissions);
    RUN(test_node_names);
    RUN(test_drain);
    RUN(test_file_raw);
    RUN(test_probed_raw_guard);
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd)) {
        /* best effort */
    }
    return tap_done();
}
