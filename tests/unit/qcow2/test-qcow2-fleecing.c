/* Classic fleecing race, deterministic (TAP): a read of an overlay that
 * falls through to its backing file while a writer copies the old backing
 * data into the overlay and then overwrites the backing file must return
 * the old data (driver.h "Backing fall-through reads").  The backing read
 * is slowed down by blkdebug's x-read-delay-us so that the writer always
 * wins the race; with LAMINA_DEBUG_NO_FLEECING_GUARD=1 the read must see
 * the new data, which shows the test can fail. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lamina/block.h"
#include "lamina/driver.h"
#include "tap.h"

#define CS 65536
#define SIZE (4 * CS)

typedef struct Reader {
    LamChild *edge;
    int64_t off, len;
    uint8_t *buf;
    int ret;
} Reader;

static void *reader_main(void *opaque)
{
    Reader *r = opaque;
    r->ret = lam_co_pread(r->edge, r->off, r->len, r->buf, 0);
    return NULL;
}

/* Returns the number of bytes of the overlay read that were not the old
 * data (0 = point in time kept), or -1 on a setup error. */
static int64_t race(const char *dir, int round, int64_t off, int64_t len, int64_t w0,
                    int64_t w1)
{
    char a[512], b[512];
    snprintf(a, sizeof(a), "%s/a%d.raw", dir, round);
    snprintf(b, sizeof(b), "%s/b%d.qcow2", dir, round);
    LamError *err = NULL;
    json_t *fmt = json_pack("{s:i}", "cluster-size", CS);
    int cr = lam_create_image(a, "raw", SIZE, NULL, &err);
    if (cr == 0) {
        cr = lam_create_image(b, "qcow2", SIZE, fmt, &err);
    }
    json_decref(fmt);
    if (cr < 0) {
        printf("# create: %s\n", err ? err->msg : "?");
        lam_error_free(err);
        return -1;
    }
    json_t *aopts = json_pack("{s:s, s:s, s:{s:s, s:s}}", "driver", "raw", "node-name", "A",
                              "file", "driver", "file", "filename", a);
    LamNode *an = lam_node_open(aopts, LAM_O_RDWR, &err);
    json_decref(aopts);
    if (!an) {
        printf("# open A: %s\n", err->msg);
        return -1;
    }
    json_t *bopts = json_pack("{s:s, s:s, s:{s:s, s:s}, s:{s:s, s:s, s:s, s:i}}",
                              "driver", "qcow2", "node-name", "B",
                              "file", "driver", "file", "filename", b,
                              "backing", "driver", "blkdebug", "node-name", "slowA",
                              "image", "A", "x-read-delay-us", 500000);
    LamNode *bn = lam_node_open(bopts, LAM_O_RDWR, &err);
    json_decref(bopts);
    if (!bn) {
        printf("# open B: %s\n", err->msg);
        return -1;
    }
    LamChild *aw = lam_root_attach(an, "guest", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                   LAM_PERM_ALL, NULL);
    LamChild *bw = lam_root_attach(bn, "copier", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                   LAM_PERM_ALL, NULL);
    LamChild *br = lam_root_attach(bn, "export", LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, NULL);
    uint8_t *old = malloc(SIZE), *new = malloc(SIZE), *got = malloc(SIZE);
    memset(old, 0x11, SIZE);
    memset(new, 0x22, SIZE);
    lam_co_pwrite(aw, 0, SIZE, old, 0);

    /* The reader finds the clusters unallocated in B and sleeps in the
     * backing read; meanwhile the copier writes the old data into B and
     * the guest overwrites A. */
    Reader r = { .edge = br, .off = off, .len = len, .buf = got };
    pthread_t t;
    pthread_create(&t, NULL, reader_main, &r);
    /* Until the reader sleeps in the backing read (it has looked B up). */
    LamNode *slow = lam_node_find("slowA");
    for (int i = 0; i < 2000 && slow && atomic_load(&slow->in_flight) == 0; i++) {
        usleep(1000);
    }
    /* Copy-before-write copies the clusters [w0, w1) the guest is about
     * to write. */
    int ret = lam_co_pwrite(bw, w0, w1 - w0, old, 0);
    ret |= lam_co_pwrite(aw, w0, w1 - w0, new, 0);
    pthread_join(t, NULL);
    int64_t bad = 0;
    for (int64_t i = 0; i < len; i++) {
        bad += got[i] != 0x11;
    }
    if (ret < 0 || r.ret < 0) {
        printf("# I/O error: copy %d, read %d\n", ret, r.ret);
        bad = -1;
    }
    free(old);
    free(new);
    free(got);
    lam_root_detach(br);
    lam_root_detach(bw);
    lam_root_detach(aw);
    lam_node_unref(bn);
    lam_node_unref(an);
    unlink(a);
    unlink(b);
    return bad;
}

static const char *dir;
static bool guard_off;
static int cur_round;

/* Round 0: a read over three clusters, the middle one copied and
 * overwritten (the re-read covers only it).  Round 1: a read of two
 * clusters, both copied.  Round 2: an unaligned read inside the copied
 * cluster.  { read offset, read length, copied from, copied to } */
static const int64_t rounds[3][4] = {
    { 0, 3 * CS, CS, 2 * CS },
    { CS, 2 * CS, CS, 3 * CS },
    { CS + 1000, 3000, CS, 2 * CS },
};

static void run_round(void)
{
    const int64_t *r = rounds[cur_round];
    int64_t bad = race(dir, cur_round, r[0], r[1], r[2], r[3]);
    printf("# round %d: the read saw %lld new bytes\n", cur_round, (long long)bad);
    if (guard_off) {
        CHECK(bad > 0);   /* shows the test can fail */
    } else {
        CHECK_EQ(bad, 0); /* the point in time is kept */
    }
}

int main(void)
{
    char tmpl[] = "/tmp/lamina-fleece-XXXXXX";
    if (!mkdtemp(tmpl)) {
        return 1;
    }
    dir = tmpl;
    guard_off = lam_debug_no_fleecing_guard();
    static const char *names[3] = {
        "three clusters read, the middle one copied meanwhile",
        "two clusters read, both copied meanwhile",
        "unaligned read inside a cluster copied meanwhile",
    };
    for (cur_round = 0; cur_round < 3; cur_round++) {
        tap_run(names[cur_round], run_round);
    }
    rmdir(tmpl);
    return tap_done();
}
