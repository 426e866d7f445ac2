/* Crash consistency (I4): records every write and flush the qcow2 driver
 * sends to its file, then rebuilds the file as it could be after a power
 * cut at each flush (everything before it, plus an arbitrary subset of the
 * writes issued after it) and checks that no such image is corrupt. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lamina/block.h"
#include "lamina/driver.h"

typedef struct Rec {
    int kind; /* 0 write, 1 flush, 2 truncate */
    int64_t off, len;
    uint8_t *data;
} Rec;

/* Protects the recorder state below (the driver may be called from any
 * thread, though this test drives it from one). */
static pthread_mutex_t rec_lock = PTHREAD_MUTEX_INITIALIZER;
static Rec *recs;
static int nrecs, arecs;
static uint8_t *cur;
static int64_t cur_len, cur_cap;

static void grow_to(uint8_t **buf, int64_t *cap, int64_t need)
{
    if (need <= *cap) {
        return;
    }
    int64_t n = *cap ? *cap : 1 << 20;
    while (n < need) {
        n *= 2;
    }
    *buf = realloc(*buf, n);
    memset(*buf + *cap, 0, n - *cap);
    *cap = n;
}

static void add_rec(Rec r)
{
    if (nrecs == arecs) {
        arecs = arecs ? arecs * 2 : 1024;
        recs = realloc(recs, arecs * sizeof(Rec));
    }
    recs[nrecs++] = r;
}

static int rec_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    const char *base = lam_opt_str(opts, "base", NULL);
    FILE *f = base ? fopen(base, "rb") : NULL;
    if (!f) {
        lam_error_setg(errp, "no base");
        return -ENOENT;
    }
    fseek(f, 0, SEEK_END);
    cur_len = ftell(f);
    fseek(f, 0, SEEK_SET);
    grow_to(&cur, &cur_cap, cur_len);
    if (fread(cur, 1, cur_len, f) != (size_t)cur_len) {
        fclose(f);
        return -EIO;
    }
    fclose(f);
    bs->filename = strdup(base);
    bs->bl.request_alignment = 1;
    return 0;
}

static int64_t rec_len(LamNode *bs)
{
    pthread_mutex_lock(&rec_lock);
    int64_t l = cur_len;
    pthread_mutex_unlock(&rec_lock);
    return l;
}

static int rec_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *q, int flags)
{
    pthread_mutex_lock(&rec_lock);
    lam_iov_memset(q, 0, 0, bytes);
    if (off < cur_len) {
        int64_t n = cur_len - off < bytes ? cur_len - off : bytes;
        lam_iov_from_buf(q, 0, cur + off, n);
    }
    pthread_mutex_unlock(&rec_lock);
    return 0;
}

static int rec_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *q, int flags)
{
    pthread_mutex_lock(&rec_lock);
    grow_to(&cur, &cur_cap, off + bytes);
    lam_iov_to_buf(q, 0, cur + off, bytes);
    if (off + bytes > cur_len) {
        cur_len = off + bytes;
    }
    Rec r = { 0, off, bytes, malloc(bytes ? bytes : 1) };
    memcpy(r.data, cur + off, bytes);
    add_rec(r);
    pthread_mutex_unlock(&rec_lock);
    return 0;
}

static int rec_flush(LamNode *bs)
{
    pthread_mutex_lock(&rec_lock);
    add_rec((Rec){ 1, 0, 0, NULL });
    pthread_mutex_unlock(&rec_lock);
    return 0;
}

static int rec_truncate(LamNode *bs, int64_t size, bool exact, LamPrealloc p, LamError **errp)
{
    pthread_mutex_lock(&rec_lock);
    grow_to(&cur, &cur_cap, size);
    if (size < cur_len) {
        memset(cur + size, 0, cur_len - size);
    }
    cur_len = size;
    add_rec((Rec){ 2, size, 0, NULL });
    pthread_mutex_unlock(&rec_lock);
    return 0;
}

static const LamDriver rec_drv = {
    .name = "crashrec",
    .kind = LAM_DRV_PROTOCOL,
    .state_size = 8,
    .open = rec_open,
    .get_length = rec_len,
    .preadv = rec_preadv,
    .pwritev = rec_pwritev,
    .flush = rec_flush,
    .truncate = rec_truncate,
};

static int checked, failures;

/* Rebuilds the file: base + records [0, upto) + the records in
 * [upto, until) selected by mask bits; checks it. */
static void check_state(const uint8_t *base, int64_t base_len, int upto, int until,
                        unsigned seed, const char *dir)
{
    uint8_t *img = NULL;
    int64_t cap = 0, len = base_len;
    grow_to(&img, &cap, base_len);
    memcpy(img, base, base_len);
    for (int i = 0; i < until; i++) {
        Rec *r = &recs[i];
        if (i >= upto && (rand_r(&seed) & 1)) {
            continue; /* this unflushed write did not reach the disk */
        }
        if (r->kind == 0) {
            grow_to(&img, &cap, r->off + r->len);
            memcpy(img + r->off, r->data, r->len);
            if (r->off + r->len > len) {
                len = r->off + r->len;
            }
        } else if (r->kind == 2) {
            grow_to(&img, &cap, r->off);
            if (r->off < len) {
                memset(img + r->off, 0, len - r->off);
            }
            len = r->off;
        }
    }
    char path[256];
    snprintf(path, sizeof(path), "%s/replay.qcow2", dir);
    FILE *f = fopen(path, "wb");
    fwrite(img, 1, len, f);
    fclose(f);
    free(img);
    LamError *err = NULL;
    LamNode *bs = lam_open_image(path, "qcow2", LAM_O_UNSAFE, NULL, &err);
    checked++;
    if (!bs) {
        printf("# flush %d: open failed: %s\n", upto, err ? err->msg : "?");
        lam_error_free(err);
        failures++;
        return;
    }
    LamCheckResult res = {0};
    lam_node_check(bs, &res, LAM_CHECK_NONE);
    if (res.corruptions || res.check_errors) {
        printf("# cut after record %d (+random subset up to %d): %d corruptions\n# %s", upto,
               until, res.corruptions, res.msgs ? res.msgs : "");
        failures++;
    }
    free(res.msgs);
    lam_node_unref(bs);
}

static int wr(LamChild *c, int64_t off, int64_t len, int pat, int flags)
{
    uint8_t *b = malloc(len);
    for (int64_t i = 0; i < len; i++) {
        b[i] = (uint8_t)(pat + (i % 64 == 0 ? i : 0));
    }
    int ret = lam_co_pwrite(c, off, len, b, flags);
    free(b);
    return ret;
}

static int run(const char *dir, int64_t cs, int rbits, bool lazy)
{
    char base[256];
    snprintf(base, sizeof(base), "%s/base.qcow2", dir);
    json_t *o = json_pack("{s:I, s:i, s:b}", "cluster-size", (json_int_t)cs, "refcount-bits",
                          rbits, "lazy-refcounts", lazy);
    LamError *err = NULL;
    if (lam_create_image(base, "qcow2", 4 << 20, o, &err) < 0) {
        json_decref(o);
        printf("not ok - create: %s\n", err->msg);
        return 1;
    }
    json_decref(o);
    FILE *f = fopen(base, "rb");
    fseek(f, 0, SEEK_END);
    int64_t blen = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *bdata = malloc(blen);
    if (fread(bdata, 1, blen, f) != (size_t)blen) {
        return 1;
    }
    fclose(f);
    nrecs = 0;
    json_t *opts = json_pack("{s:s, s:{s:s, s:s}}", "driver", "qcow2", "file", "driver",
                             "crashrec", "base", base);
    LamNode *bs = lam_node_open(opts, LAM_O_RDWR, &err);
    json_decref(opts);
    if (!bs) {
        printf("not ok - open: %s\n", err->msg);
        return 1;
    }
    LamChild *c = lam_root_attach(bs, "crash", LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE |
                                  LAM_PERM_RESIZE, LAM_PERM_ALL, NULL);
    int ret = 0;
    /* Allocations (many clusters: refcount blocks and table growth with
     * small clusters), partial writes, compressed writes and their
     * overwrite, zeroing, discard, a resize, interleaved guest flushes. */
    for (int i = 0; i < 24 && ret == 0; i++) {
        int64_t off = ((int64_t)i * 7919 * 512) % (3 << 20);
        ret |= wr(c, off, 512 * (1 + i % 9), i, 0);
        if (i % 3 == 0) {
            ret |= wr(c, (int64_t)(i % 8) * cs, cs, 100 + i, LAM_REQ_WRITE_COMPRESSED);
        }
        if (i % 5 == 0) {
            ret |= lam_co_pwrite_zeroes(c, (int64_t)(i % 4) * 2 * cs, 2 * cs,
                                        i % 2 ? LAM_REQ_MAY_UNMAP : 0);
        }
        if (i % 7 == 0) {
            ret |= lam_co_pdiscard(c, (int64_t)(i % 5) * cs, 3 * cs);
        }
        if (i % 4 == 0) {
            ret |= lam_co_flush(c);
        }
        if (i == 12) {
            ret |= lam_co_truncate(c, 16 << 20, false, LAM_PREALLOC_OFF, NULL);
            ret |= wr(c, 12 << 20, 1 << 20, 77, 0);
        }
    }
    lam_root_detach(c);
    lam_node_flush_all(bs);
    lam_node_unref(bs);
    if (ret) {
        printf("not ok - workload failed\n");
        return 1;
    }
    int before = failures;
    int last_flush = 0;
    if (getenv("DUMP_RECS")) {
        for (int i = 0; i < nrecs; i++) {
            printf("# rec %d kind %d off %lld (cl %lld) len %lld\n", i, recs[i].kind,
                   (long long)recs[i].off, (long long)(recs[i].off / cs), (long long)recs[i].len);
        }
    }
    for (int i = 0; i <= nrecs; i++) {
        if (i == nrecs || recs[i].kind == 1) {
            int next = i;
            for (int j = i + 1; j < nrecs; j++) {
                next = j;
                if (recs[j].kind == 1) {
                    break;
                }
            }
            check_state(bdata, blen, i, i, 1, dir);        /* cut exactly at the flush */
            if (next > i) {
                check_state(bdata, blen, i + 1, next, (unsigned)i * 31 + 7, dir);
                check_state(bdata, blen, i + 1, next, (unsigned)i * 17 + 3, dir);
            }
            last_flush = i;
        }
    }
    (void)last_flush;
    for (int i = 0; i < nrecs; i++) {
        free(recs[i].data);
    }
    free(bdata);
    unlink(base);
    printf("%s - crash points cs=%lld refcount-bits=%d lazy=%d (%d records)\n",
           failures == before ? "ok" : "not ok", (long long)cs, rbits, lazy, nrecs);
    return 0;
}

int main(void)
{
    char dir[] = "/tmp/qcow2-crash-XXXXXX";
    if (!mkdtemp(dir)) {
        return 1;
    }
    lam_driver_register(&rec_drv);
    int n = 0;
    n++, run(dir, 512, 64, false);
    n++, run(dir, 4096, 16, false);
    n++, run(dir, 65536, 1, false);
    n++, run(dir, 4096, 16, true);
    char p[300];
    snprintf(p, sizeof(p), "%s/replay.qcow2", dir);
    unlink(p);
    rmdir(dir);
    printf("# %d crash states checked\n1..%d\n", checked, n);
    return failures ? 1 : 0;
}
