/* Copy offload (lam_co_copy_range): raw and qcow2 on both ends, data
 * equal afterwards, -ENOTSUP where a layer can't map the range, and
 * qemu-img check as the independent oracle for qcow2 destinations. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lamina/block.h"
#include "tap.h"

#define MiB (1 << 20)
#define SIZE (4 * MiB)

static char dir[64];

static char *path(const char *name)
{
    static char p[4][128];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof(p[i]), "%s/%s", dir, name);
    return p[i];
}

typedef struct Img {
    LamNode *bs;
    LamChild *c;
} Img;

static Img img_new(const char *name, const char *fmt)
{
    Img m = { NULL, NULL };
    LamError *err = NULL;
    json_t *o = NULL;
    if (!strcmp(fmt, "qcow2")) {
        o = json_pack("{s:i}", "cluster-size", 65536);
    }
    if (lam_create_image(path(name), fmt, SIZE, o, &err) < 0) {
        fprintf(stderr, "# create %s: %s\n", name, err->msg);
        lam_error_free(err);
        json_decref(o);
        return m;
    }
    json_decref(o);
    m.bs = lam_open_image(path(name), fmt, LAM_O_RDWR, NULL, &err);
    if (!m.bs) {
        fprintf(stderr, "# open %s: %s\n", name, err->msg);
        lam_error_free(err);
        return m;
    }
    m.c = lam_root_attach(m.bs, NULL, LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                          LAM_PERM_ALL, &err);
    return m;
}

static void img_close(Img *m)
{
    if (m->c) {
        lam_root_detach(m->c);
    }
    if (m->bs) {
        lam_node_flush_all(m->bs);
        lam_node_unref(m->bs);
    }
    m->bs = NULL;
    m->c = NULL;
}

static void fill(uint8_t *buf, int64_t len, unsigned seed)
{
    for (int64_t i = 0; i < len; i++) {
        buf[i] = (uint8_t)(seed * 131 + i * 7 + (i >> 12));
    }
}

/* Reads back [off, off+len) of m and compares with want. */
static bool same(Img *m, int64_t off, int64_t len, const uint8_t *want)
{
    uint8_t *got = malloc(len);
    bool r = got && lam_co_pread(m->c, off, len, got, 0) == 0 &&
             memcmp(got, want, len) == 0;
    free(got);
    return r;
}

static bool qemu_img_check_clean(const char *name)
{
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "qemu-img check -q -f qcow2 '%s' >/dev/null 2>&1",
             path(name));
    return system(cmd) == 0;
}

static void test_raw_to_raw(void)
{
    Img a = img_new("a.raw", "raw"), b = img_new("b.raw", "raw");
    CHECK(a.c && b.c);
    if (!a.c || !b.c) {
        goto out;
    }
    uint8_t *buf = malloc(SIZE);
    fill(buf, SIZE, 1);
    CHECK_EQ(lam_co_pwrite(a.c, 0, SIZE, buf, 0), 0);
    CHECK_EQ(lam_co_copy_range(a.c, 0, b.c, 0, SIZE, 0), 0);
    CHECK(same(&b, 0, SIZE, buf));
    /* Different offsets on both sides, unaligned for byte-granular raw. */
    CHECK_EQ(lam_co_copy_range(a.c, 12345, b.c, 3 * MiB + 7, 300000, 0), 0);
    CHECK(same(&b, 3 * MiB + 7, 300000, buf + 12345));
    CHECK(same(&b, 0, 3 * MiB + 7, buf));
    /* Within one node, serialising and overlapping: refused, not a
     * self-deadlock on the node's tracked requests. */
    CHECK_EQ(lam_co_copy_range(a.c, 0, a.c, 4096, 65536, LAM_REQ_SERIALISING), -ENOTSUP);
    /* Within one node, apart: copied. */
    CHECK_EQ(lam_co_copy_range(a.c, 0, a.c, 2 * MiB, 4096, LAM_REQ_SERIALISING), 0);
    uint8_t chk[4096];
    CHECK(lam_co_pread(a.c, 2 * MiB, 4096, chk, 0) == 0 && memcmp(chk, buf, 4096) == 0);
    memcpy(buf + 2 * MiB, buf, 4096); /* keep buf equal to a */
    /* Past the end of the root edge: refused like a write. */
    CHECK_EQ(lam_co_copy_range(a.c, 0, b.c, SIZE - 4096, 8192, 0), -EIO);
    free(buf);
out:
    img_close(&a);
    img_close(&b);
}

static void test_qcow2_to_qcow2(void)
{
    Img a = img_new("a.qcow2", "qcow2"), b = img_new("b.qcow2", "qcow2");
    CHECK(a.c && b.c);
    if (!a.c || !b.c) {
        goto out;
    }
    uint8_t *buf = malloc(2 * MiB);
    fill(buf, 2 * MiB, 2);
    CHECK_EQ(lam_co_pwrite(a.c, 0, 2 * MiB, buf, 0), 0);
    /* Into unallocated clusters: allocates. */
    CHECK_EQ(lam_co_copy_range(a.c, 0, b.c, 0, 2 * MiB, 0), 0);
    CHECK(same(&b, 0, 2 * MiB, buf));
    /* Into its own clusters (NORMAL|COPIED): overwrites in place. */
    CHECK_EQ(lam_co_copy_range(a.c, MiB, b.c, 0, MiB, 0), 0);
    CHECK(same(&b, 0, MiB, buf + MiB));
    CHECK(same(&b, MiB, MiB, buf + MiB));
    int64_t pnum = 0;
    int st = lam_co_block_status(b.c, 0, 2 * MiB, &pnum, NULL, NULL);
    CHECK(st >= 0 && (st & LAM_BS_DATA) && (st & LAM_BS_ALLOCATED));
    CHECK_EQ(pnum, 2 * MiB);
    /* Partial destination cluster: the caller must read and write. */
    CHECK_EQ(lam_co_copy_range(a.c, 0, b.c, 2 * MiB + 512, 65536, 0), -ENOTSUP);
    CHECK_EQ(lam_co_copy_range(a.c, 0, b.c, 2 * MiB, 4096, 0), -ENOTSUP);
    /* Unallocated source clusters have no data in the file to copy. */
    CHECK_EQ(lam_co_copy_range(a.c, 3 * MiB, b.c, 3 * MiB, MiB, 0), -ENOTSUP);
    /* Source not cluster aligned is fine: it maps to its file. */
    CHECK_EQ(lam_co_copy_range(a.c, 4096, b.c, 2 * MiB, 65536, 0), 0);
    CHECK(same(&b, 2 * MiB, 65536, buf + 4096));
    free(buf);
out:
    img_close(&a);
    img_close(&b);
    CHECK(qemu_img_check_clean("b.qcow2"));
    char cmd[512];
    /* The ranges written twice hold the second copy; the rest matches. */
    snprintf(cmd, sizeof(cmd),
             "qemu-img compare -q -f qcow2 -F qcow2 '%s' '%s' 2>/dev/null; test $? = 1",
             path("a.qcow2"), path("b.qcow2"));
    CHECK(system(cmd) == 0);
}

static void test_mixed_and_perm(void)
{
    Img q = img_new("c.qcow2", "qcow2"), r = img_new("c.raw", "raw");
    CHECK(q.c && r.c);
    if (!q.c || !r.c) {
        goto out;
    }
    uint8_t *buf = malloc(MiB);
    fill(buf, MiB, 3);
    CHECK_EQ(lam_co_pwrite(r.c, MiB, MiB, buf, 0), 0);
    CHECK_EQ(lam_co_copy_range(r.c, MiB, q.c, 0, MiB, 0), 0);
    CHECK(same(&q, 0, MiB, buf));
    CHECK_EQ(lam_co_copy_range(q.c, 0, r.c, 3 * MiB, MiB, 0), 0);
    CHECK(same(&r, 3 * MiB, MiB, buf));
    /* No write permission on the destination edge. */
    LamError *err = NULL;
    LamChild *ro = lam_root_attach(q.bs, NULL, LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, &err);
    CHECK(ro != NULL);
    if (ro) {
        CHECK_EQ(lam_co_copy_range(r.c, 0, ro, 0, MiB, 0), -EPERM);
        lam_root_detach(ro);
    }
    free(buf);
out:
    img_close(&q);
    img_close(&r);
    CHECK(qemu_img_check_clean("c.qcow2"));
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/lamina-copyrange-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    RUN(test_raw_to_raw);
    RUN(test_qcow2_to_qcow2);
    RUN(test_mixed_and_perm);
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0) {
        fprintf(stderr, "# could not remove %s\n", dir);
    }
    return tap_done();
}
