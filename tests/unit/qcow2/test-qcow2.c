/* qcow2 driver unit tests (TAP): round trips over cluster sizes and
 * refcount widths, compressed writes, zero/discard, reopen, check, and
 * concurrent allocating writes into shared clusters. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lamina/block.h"
#include "lamina/driver.h"
#include "lamina/events.h"
#include <errno.h>

static int test_no;
static int failures;

static void ok(int cond, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void ok(int cond, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s %d - ", cond ? "ok" : "not ok", ++test_no);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (!cond) {
        failures++;
    }
    fflush(stdout);
}

static json_t *open_extra; /* extra format options for open_img */

static LamNode *open_img(const char *path, bool rw, LamChild **c)
{
    LamError *err = NULL;
    LamNode *bs = lam_open_image(path, "qcow2", rw ? LAM_O_RDWR : 0, open_extra, &err);
    if (!bs) {
        fprintf(stderr, "# open: %s\n", err ? err->msg : "?");
        lam_error_free(err);
        return NULL;
    }
    *c = lam_root_attach(bs, "test", LAM_PERM_CONSISTENT_READ | (rw ? LAM_PERM_WRITE : 0),
                         LAM_PERM_ALL, NULL);
    return bs;
}

static void close_img(LamNode *bs, LamChild *c)
{
    lam_root_detach(c);
    lam_node_flush_all(bs);
    lam_node_unref(bs);
}

static bool check_clean(LamNode *bs)
{
    LamCheckResult r = {0};
    int ret = lam_node_check(bs, &r, LAM_CHECK_NONE);
    if (r.msgs && (r.corruptions || r.leaks)) {
        fprintf(stderr, "# %s", r.msgs);
    }
    free(r.msgs);
    return ret == 0 && r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0;
}

static bool qemu_check(const char *path)
{
    if (system("command -v qemu-img >/dev/null 2>&1") != 0) {
        return true;
    }
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "qemu-img check -q '%s' >&2", path);
    return system(cmd) == 0;
}

static void fill(uint8_t *b, int64_t len, int64_t off, int seed)
{
    for (int64_t i = 0; i < len; i++) {
        b[i] = (uint8_t)((off + i) * 7 + seed + ((off + i) >> 9));
    }
}

static bool verify(LamChild *c, int64_t off, int64_t len, int seed)
{
    uint8_t *b = malloc(len), *e = malloc(len);
    bool good = lam_co_pread(c, off, len, b, 0) == 0;
    if (seed < 0) {
        memset(e, 0, len);
    } else {
        fill(e, len, off, seed);
    }
    good = good && memcmp(b, e, len) == 0;
    free(b);
    free(e);
    return good;
}

static int wr(LamChild *c, int64_t off, int64_t len, int seed, int flags)
{
    uint8_t *b = malloc(len);
    fill(b, len, off, seed);
    int ret = lam_co_pwrite(c, off, len, b, flags);
    free(b);
    return ret;
}

static void round_trip(const char *dir, int64_t cs, int rbits)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/rt-%lld-%d.qcow2", dir, (long long)cs, rbits);
    json_t *o = json_pack("{s:I, s:i}", "cluster-size", (json_int_t)cs, "refcount-bits", rbits);
    LamError *err = NULL;
    int64_t size = 16 * cs > (8 << 20) ? 16 * cs : (8 << 20);
    int ret = lam_create_image(path, "qcow2", size, o, &err);
    json_decref(o);
    ok(ret == 0, "create cs=%lld refcount-bits=%d", (long long)cs, rbits);
    if (ret < 0) {
        lam_error_free(err);
        return;
    }
    LamChild *c;
    LamNode *bs = open_img(path, true, &c);
    if (!bs) {
        ok(0, "open");
        return;
    }
    int64_t z = 8 * cs;
    bool good = wr(c, 0, 3 * cs + 100, 1, 0) == 0;
    good = good && wr(c, 5 * cs + 17, 400, 2, 0) == 0;
    good = good && wr(c, size - cs, cs, 3, LAM_REQ_WRITE_COMPRESSED) == 0;
    good = good && wr(c, z, 4 * cs, 4, 0) == 0;
    good = good && lam_co_pwrite_zeroes(c, z, 2 * cs, 0) == 0;
    good = good && lam_co_pdiscard(c, z + 2 * cs, cs) == 0;
    good = good && wr(c, 6 * cs, cs, 5, 0) == 0 && wr(c, 6 * cs + 3, 10, 6, 0) == 0;
    ok(good, "writes cs=%lld", (long long)cs);
    ok(verify(c, 0, 3 * cs + 100, 1) && verify(c, 5 * cs + 17, 400, 2) &&
       verify(c, size - cs, cs, 3) && verify(c, z, 2 * cs, -1) &&
       verify(c, z + 2 * cs, cs, -1) && verify(c, z + 3 * cs, cs, 4) &&
       verify(c, 6 * cs + 3, 10, 6) && verify(c, 6 * cs, 3, 5) &&
       verify(c, 6 * cs + 13, cs - 13, 5),
       "read back cs=%lld", (long long)cs);
    close_img(bs, c);
    bs = open_img(path, false, &c);
    ok(bs && verify(c, 0, 3 * cs + 100, 1) && verify(c, size - cs, cs, 3) &&
       check_clean(bs), "reopen, verify, check cs=%lld rb=%d", (long long)cs, rbits);
    if (bs) {
        close_img(bs, c);
    }
    ok(qemu_check(path), "qemu-img check cs=%lld rb=%d", (long long)cs, rbits);
    unlink(path);
}

/* Concurrency: every thread owns one 512-byte sector in every cluster, so
 * all threads allocate the same clusters at the same time. */
#define NTHREADS 8
typedef struct {
    LamChild *c;
    int id;
    int64_t cs, size;
    int errors;
} Worker;

static void *worker(void *opaque)
{
    Worker *w = opaque;
    int64_t nclusters = w->size / w->cs;
    uint8_t buf[512];
    unsigned seed = (unsigned)w->id * 7919u;
    for (int64_t k = 0; k < nclusters; k++) {
        int64_t cl = (k + (w->id & 1)) % nclusters; /* all threads on the same clusters */
        int64_t off = cl * w->cs + w->id * 512;
        fill(buf, 512, off, 9);
        if (lam_co_pwrite(w->c, off, 512, buf, 0) < 0) {
            w->errors++;
        }
        if ((rand_r(&seed) & 3) == 0) {
            uint8_t r[512];
            if (lam_co_pread(w->c, off, 512, r, 0) < 0 || memcmp(r, buf, 512)) {
                w->errors++;
            }
        }
    }
    return NULL;
}

static void concurrency(const char *dir, int64_t cs, bool backing)
{
    char path[256], bpath[256];
    snprintf(path, sizeof(path), "%s/conc.qcow2", dir);
    snprintf(bpath, sizeof(bpath), "%s/conc-base.qcow2", dir);
    int64_t size = 4 << 20;
    LamError *err = NULL;
    json_t *o = json_pack("{s:I}", "cluster-size", (json_int_t)cs);
    if (backing) {
        lam_create_image(bpath, "qcow2", size, NULL, &err);
        LamChild *bc;
        LamNode *b = open_img(bpath, true, &bc);
        uint8_t *d = malloc(size);
        memset(d, 0xee, size);
        lam_co_pwrite(bc, 0, size, d, 0);
        free(d);
        close_img(b, bc);
        json_object_set_new(o, "backing-file", json_string("conc-base.qcow2"));
        json_object_set_new(o, "backing-fmt", json_string("qcow2"));
    }
    int ret = lam_create_image(path, "qcow2", size, o, &err);
    json_decref(o);
    LamChild *c;
    LamNode *bs = ret == 0 ? open_img(path, true, &c) : NULL;
    if (!bs) {
        ok(0, "concurrency setup");
        return;
    }
    pthread_t t[NTHREADS];
    Worker w[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        w[i] = (Worker){ .c = c, .id = i, .cs = cs, .size = size };
        pthread_create(&t[i], NULL, worker, &w[i]);
    }
    int errors = 0;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(t[i], NULL);
        errors += w[i].errors;
    }
    ok(errors == 0, "concurrent writes cs=%lld backing=%d: no I/O errors", (long long)cs, backing);
    bool good = true;
    uint8_t *all = malloc(size), exp[512];
    good = lam_co_pread(c, 0, size, all, 0) == 0;
    for (int64_t cl = 0; good && cl < size / cs; cl++) {
        for (int s = 0; s < cs / 512; s++) {
            int64_t off = cl * cs + s * 512;
            if (s < NTHREADS) {
                fill(exp, 512, off, 9);
            } else {
                memset(exp, backing ? 0xee : 0, 512);
            }
            if (memcmp(all + off, exp, 512)) {
                fprintf(stderr, "# mismatch at %lld\n", (long long)off);
                good = false;
                break;
            }
        }
    }
    free(all);
    ok(good, "concurrent writes cs=%lld backing=%d: every sector intact", (long long)cs, backing);
    ok(check_clean(bs), "concurrent writes: check clean");
    close_img(bs, c);
    ok(qemu_check(path), "concurrent writes: qemu-img check clean");
    unlink(path);
    unlink(bpath);
}

/* Mixed random operations from several threads on a small image (many
 * collisions): no errors, no deadlock, and a clean image afterwards. */
typedef struct {
    LamChild *c;
    int id;
    int64_t cs, size;
    int errors;
} Mixer;

static void *mixer(void *opaque)
{
    Mixer *m = opaque;
    unsigned seed = (unsigned)m->id * 104729u + 1;
    uint8_t *buf = malloc(4 * m->cs);
    for (int i = 0; i < 300; i++) {
        int64_t cl = rand_r(&seed) % (m->size / m->cs);
        int64_t off = cl * m->cs + (rand_r(&seed) % 2 ? rand_r(&seed) % m->cs : 0);
        int64_t len = 1 + rand_r(&seed) % (2 * m->cs);
        if (off + len > m->size) {
            len = m->size - off;
        }
        memset(buf, m->id + i, len);
        int r = 0;
        switch (rand_r(&seed) % 6) {
        case 0: case 1:
            r = lam_co_pwrite(m->c, off, len, buf, 0);
            break;
        case 2:
            r = lam_co_pwrite(m->c, cl * m->cs, m->cs, buf, LAM_REQ_WRITE_COMPRESSED);
            break;
        case 3:
            r = lam_co_pwrite_zeroes(m->c, off, len, rand_r(&seed) % 2 ? LAM_REQ_MAY_UNMAP : 0);
            break;
        case 4:
            r = lam_co_pdiscard(m->c, off, len);
            break;
        default:
            r = lam_co_pread(m->c, off, len, buf, 0);
        }
        if (r < 0) {
            m->errors++;
        }
        if (i % 50 == 0) {
            lam_co_flush(m->c);
        }
    }
    free(buf);
    return NULL;
}

static void mixed_stress(const char *dir, int64_t cs, int64_t size)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/mix.qcow2", dir);
    json_t *o = json_pack("{s:I}", "cluster-size", (json_int_t)cs);
    LamError *err = NULL;
    int ret = lam_create_image(path, "qcow2", size, o, &err);
    json_decref(o);
    LamChild *c;
    LamNode *bs = ret == 0 ? open_img(path, true, &c) : NULL;
    if (!bs) {
        ok(0, "mixed stress setup");
        return;
    }
    pthread_t t[6];
    Mixer m[6];
    int errors = 0;
    for (int i = 0; i < 6; i++) {
        m[i] = (Mixer){ .c = c, .id = i, .cs = cs, .size = size };
        pthread_create(&t[i], NULL, mixer, &m[i]);
    }
    for (int i = 0; i < 6; i++) {
        pthread_join(t[i], NULL);
        errors += m[i].errors;
    }
    ok(errors == 0, "mixed concurrent ops cs=%lld: no errors", (long long)cs);
    ok(check_clean(bs), "mixed concurrent ops cs=%lld: check clean", (long long)cs);
    close_img(bs, c);
    ok(qemu_check(path), "mixed concurrent ops cs=%lld: qemu-img check clean", (long long)cs);
    unlink(path);
}

static int events_seen;
static char event_msg[256];

static void sink(const char *name, json_t *data)
{
    if (!strcmp(name, "BLOCK_IMAGE_CORRUPTED") && json_is_true(json_object_get(data, "fatal"))) {
        events_seen++;
        snprintf(event_msg, sizeof(event_msg), "%s",
                 json_string_value(json_object_get(data, "msg")));
    }
    json_decref(data);
}

/* An L2 entry pointing past the end of the file: the read fails, the
 * image is marked corrupt, the event is raised and writes are refused. */
static void runtime_corruption(const char *dir)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/corrupt.qcow2", dir);
    LamError *err = NULL;
    lam_create_image(path, "qcow2", 1 << 20, NULL, &err);
    LamChild *c;
    LamNode *bs = open_img(path, true, &c);
    wr(c, 0, 4096, 1, 0);
    close_img(bs, c);
    /* cluster 0: header, 1: refcount table, 2: refcount block, 3: L1, 4: L2 */
    FILE *f = fopen(path, "r+b");
    uint8_t e[8] = {0x80, 0, 0, 0x10, 0, 0, 0, 0};
    fseek(f, 4 * 65536, SEEK_SET);
    fwrite(e, 1, 8, f);
    fclose(f);
    lam_event_set_sink(sink);
    bs = open_img(path, true, &c);
    uint8_t buf[512];
    ok(bs && lam_co_pread(c, 0, 512, buf, 0) == -EIO, "corrupt L2 entry: read fails with EIO");
    ok(events_seen == 1 && strstr(event_msg, "beyond end of file"),
       "BLOCK_IMAGE_CORRUPTED emitted (%s)", event_msg);
    ok(lam_co_pwrite(c, 65536, 512, buf, 0) == -EIO, "writes refused after corruption");
    json_t *info = json_object();
    lam_node_get_info(bs, info, NULL);
    json_t *d = json_object_get(json_object_get(info, "format-specific"), "data");
    ok(json_is_true(json_object_get(d, "corrupt")), "info shows corrupt");
    json_decref(info);
    close_img(bs, c);
    lam_event_set_sink(NULL);
    bs = lam_open_image(path, "qcow2", LAM_O_RDWR, NULL, &err);
    ok(!bs && err && strstr(err->msg, "Image is corrupt; cannot be opened read/write"),
       "read-write open refused: %s", err ? err->msg : "");
    lam_error_free(err);
    unlink(path);
}

int main(void)
{
    char dir[] = "/tmp/qcow2-unit-XXXXXX";
    if (!mkdtemp(dir)) {
        return 1;
    }
    int64_t sizes[] = {512, 4096, 65536, 2 << 20};
    int widths[] = {1, 16, 64};
    for (int i = 0; i < 4; i++) {
        for (int j = 0; j < 3; j++) {
            round_trip(dir, sizes[i], widths[j]);
        }
    }
    round_trip(dir, 16384, 2);
    round_trip(dir, 8192, 32);
    concurrency(dir, 4096, false);
    concurrency(dir, 65536, false);
    concurrency(dir, 8192, true);
    mixed_stress(dir, 4096, 64 * 4096);
    mixed_stress(dir, 65536, 64 * 65536);
    /* the smallest caches: 4 L2 tables, 4 refcount blocks */
    open_extra = json_pack("{s:i, s:i}", "l2-cache-size", 4 * 512, "refcount-cache-size", 4 * 512);
    mixed_stress(dir, 512, 64 * 512);
    mixed_stress(dir, 512, 1 << 20); /* 32 L2 tables through a 4-table cache */
    json_decref(open_extra);
    open_extra = json_pack("{s:i, s:i}", "l2-cache-size", 4 * 4096, "refcount-cache-size", 4 * 4096);
    concurrency(dir, 4096, false);
    json_decref(open_extra);
    open_extra = NULL;
    runtime_corruption(dir);
    rmdir(dir);
    printf("1..%d\n", test_no);
    return failures ? 1 : 0;
}
