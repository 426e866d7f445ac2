/* In-process NBD server test (runs under TSan in the concurrency suite):
 * several client threads pipeline writes and reads to disjoint ranges of
 * a raw file export over a UNIX socket and verify every reply; then the
 * export is removed (hard) while a client is still connected, and the
 * server shuts down.  A burst client sends many requests before reading
 * any reply, with replies batched up to 64 (more than the connection's
 * request slots) and the image evicted from the page cache: the
 * connection thread must send its batch before it waits for a slot or
 * for input, and reads that miss the page cache must fall back to the
 * blocking path with the right data.  A lone client's backlog of cached
 * reads is partly handed to workers (LAMINA_NBD_SPREAD).  TAP output. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "lamina/block.h"
#include "lamina/events.h"
#include "nbd/nbd-proto.h"
#include "nbd/nbd-int.h"
#include "nbd/nbd.h"

#define NCLIENTS 4
#define REGION (1 << 20)
#define REQ 4096
#define DEPTH 8

static int failures, tests;
static char sock_path[108];
static _Atomic int deleted_events;

static void ok(int cond, const char *what)
{
    tests++;
    printf("%sok %d - %s\n", cond ? "" : "not ", tests, what);
    if (!cond) {
        failures++;
    }
}

static void sink(const char *name, json_t *data)
{
    if (!strcmp(name, "BLOCK_EXPORT_DELETED")) {
        atomic_fetch_add(&deleted_events, 1);
    }
    json_decref(data);
}

static int full_io(int fd, void *buf, size_t len, int wr)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = wr ? send(fd, p, len, MSG_NOSIGNAL) : recv(fd, p, len, 0);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) {
                continue;
            }
            return -1;
        }
        p += n;
        len -= n;
    }
    return 0;
}

/* Connects and negotiates structured replies + GO "exp". */
static int client_connect(void)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    strcpy(sa.sun_path, sock_path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    uint8_t b[64];
    if (full_io(fd, b, 18, 0) < 0 || nbd_get64(b) != NBD_INIT_MAGIC) {
        goto fail;
    }
    nbd_put32(b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    nbd_put64(b + 4, NBD_OPTS_MAGIC);
    nbd_put32(b + 12, NBD_OPT_STRUCTURED_REPLY);
    nbd_put32(b + 16, 0);
    if (full_io(fd, b, 20, 1) < 0 || full_io(fd, b, 20, 0) < 0 ||
        nbd_get32(b + 12) != NBD_REP_ACK) {
        goto fail;
    }
    nbd_put64(b, NBD_OPTS_MAGIC);
    nbd_put32(b + 8, NBD_OPT_GO);
    nbd_put32(b + 12, 4 + 3 + 2);
    nbd_put32(b + 16, 3);
    memcpy(b + 20, "exp", 3);
    nbd_put16(b + 23, 0);
    if (full_io(fd, b, 25, 1) < 0) {
        goto fail;
    }
    for (;;) {
        if (full_io(fd, b, 20, 0) < 0) {
            goto fail;
        }
        uint32_t type = nbd_get32(b + 12), len = nbd_get32(b + 16);
        uint8_t skip[64];
        if (len > sizeof(skip) || full_io(fd, skip, len, 0) < 0) {
            goto fail;
        }
        if (type == NBD_REP_ACK) {
            return fd;
        }
        if (type != NBD_REP_INFO) {
            goto fail;
        }
    }
fail:
    close(fd);
    return -1;
}

static void request(uint8_t *h, uint16_t type, uint64_t cookie, uint64_t off,
                    uint32_t len)
{
    nbd_put32(h, NBD_REQUEST_MAGIC);
    nbd_put16(h + 4, 0);
    nbd_put16(h + 6, type);
    nbd_put64(h + 8, cookie);
    nbd_put64(h + 16, off);
    nbd_put32(h + 24, len);
}

/* Reads one reply; for reads checks the data chunk.  Returns the cookie
 * or -1.  *err gets the error value (0 on success). */
static int64_t read_reply(int fd, uint8_t *expect_base, int *err)
{
    uint8_t h[20];
    *err = 0;
    for (;;) {
        if (full_io(fd, h, 4, 0) < 0) {
            return -1;
        }
        if (nbd_get32(h) == NBD_SIMPLE_REPLY_MAGIC) {
            if (full_io(fd, h + 4, 12, 0) < 0) {
                return -1;
            }
            *err = (int)nbd_get32(h + 4);
            return (int64_t)nbd_get64(h + 8);
        }
        if (nbd_get32(h) != NBD_STRUCTURED_REPLY_MAGIC ||
            full_io(fd, h + 4, 16, 0) < 0) {
            return -1;
        }
        uint16_t flags = nbd_get16(h + 4), type = nbd_get16(h + 6);
        uint64_t cookie = nbd_get64(h + 8);
        uint32_t len = nbd_get32(h + 16);
        static __thread uint8_t payload[REQ + 64];
        if (len > sizeof(payload) || full_io(fd, payload, len, 0) < 0) {
            return -1;
        }
        if (type == NBD_REPLY_TYPE_OFFSET_DATA) {
            uint64_t off = nbd_get64(payload);
            if (memcmp(payload + 8, expect_base + (off % REGION), len - 8)) {
                *err = -1; /* wrong data */
            }
        } else if (type & 0x8000) {
            *err = (int)nbd_get32(payload);
        }
        if (flags & NBD_REPLY_FLAG_DONE) {
            return (int64_t)cookie;
        }
    }
}

static void *client(void *opaque)
{
    int id = (int)(intptr_t)opaque;
    uint64_t base = (uint64_t)id * REGION;
    int fd = client_connect();
    if (fd < 0) {
        return (void *)1;
    }
    uint8_t *pattern = malloc(REGION);
    for (int i = 0; i < REGION; i++) {
        pattern[i] = (uint8_t)(id * 31 + i / REQ);
    }
    intptr_t bad = 0;
    /* Pipelined writes, DEPTH in flight. */
    uint8_t h[28];
    int nreq = REGION / REQ, sent = 0, done = 0;
    while (done < nreq && !bad) {
        while (sent < nreq && sent - done < DEPTH) {
            request(h, NBD_CMD_WRITE, sent, base + (uint64_t)sent * REQ, REQ);
            if (full_io(fd, h, 28, 1) < 0 ||
                full_io(fd, pattern + (size_t)sent * REQ, REQ, 1) < 0) {
                bad = 2;
                break;
            }
            sent++;
        }
        int err;
        if (read_reply(fd, pattern, &err) < 0 || err) {
            bad = 3;
        }
        done++;
    }
    /* Pipelined reads, verified against the pattern. */
    sent = done = 0;
    while (done < nreq && !bad) {
        while (sent < nreq && sent - done < DEPTH) {
            request(h, NBD_CMD_READ, sent, base + (uint64_t)sent * REQ, REQ);
            if (full_io(fd, h, 28, 1) < 0) {
                bad = 4;
                break;
            }
            sent++;
        }
        int err;
        if (read_reply(fd, pattern, &err) < 0 || err) {
            bad = 5;
        }
        done++;
    }
    request(h, NBD_CMD_DISC, 0, 0, 0);
    full_io(fd, h, 28, 1);
    close(fd);
    free(pattern);
    return (void *)bad;
}

#define BURST 64

/* BURST writes then BURST reads of client 0's region, each burst sent
 * whole before any reply is read. */
static int burst_client(void)
{
    int fd = client_connect();
    if (fd < 0) {
        return 1;
    }
    int bad = 0;
    uint8_t *pattern = malloc(REGION);
    for (int i = 0; i < REGION; i++) {
        pattern[i] = (uint8_t)(0 * 31 + i / REQ); /* client 0's data */
    }
    uint8_t *out = malloc((size_t)BURST * (28 + REQ));
    /* Reads of evicted data first: they miss the page cache. */
    for (int i = 0; i < BURST; i++) {
        request(out + 28 * i, NBD_CMD_READ, i, (uint64_t)i * REQ, REQ);
    }
    if (full_io(fd, out, 28 * BURST, 1) < 0) {
        bad = 2;
    }
    for (int i = 0; i < BURST && !bad; i++) {
        int err;
        if (read_reply(fd, pattern, &err) < 0 || err) {
            bad = 3;
        }
    }
    /* Writes of a new pattern, then the same reads again. */
    for (int i = 0; i < REGION; i++) {
        pattern[i] = (uint8_t)(0x5a ^ i ^ (i / REQ));
    }
    size_t n = 0;
    for (int i = 0; i < BURST; i++) {
        request(out + n, NBD_CMD_WRITE, i, (uint64_t)i * REQ, REQ);
        memcpy(out + n + 28, pattern + (size_t)i * REQ, REQ);
        n += 28 + REQ;
    }
    if (!bad && full_io(fd, out, n, 1) < 0) {
        bad = 4;
    }
    for (int i = 0; i < BURST && !bad; i++) {
        int err;
        if (read_reply(fd, pattern, &err) < 0 || err) {
            bad = 5;
        }
    }
    for (int i = 0; i < BURST; i++) {
        request(out + 28 * i, NBD_CMD_READ, i, (uint64_t)i * REQ, REQ);
    }
    if (!bad && full_io(fd, out, 28 * BURST, 1) < 0) {
        bad = 6;
    }
    for (int i = 0; i < BURST && !bad; i++) {
        int err;
        if (read_reply(fd, pattern, &err) < 0 || err) {
            bad = 7;
        }
    }
    request(out, NBD_CMD_DISC, 0, 0, 0);
    full_io(fd, out, 28, 1);
    close(fd);
    free(out);
    free(pattern);
    if (bad) {
        printf("# burst client failed at step %d\n", bad);
    }
    return bad;
}

/* Writes BURST blocks at base (so they are cached), then sends BURST reads
 * of them at once; returns 0 if every reply is right. */
static int cached_burst_client(uint64_t base)
{
    int fd = client_connect();
    if (fd < 0) {
        return 1;
    }
    int bad = 0;
    uint8_t *pattern = malloc(REGION);
    for (int i = 0; i < REGION; i++) {
        pattern[i] = (uint8_t)(0xc3 ^ (i / REQ) ^ i);
    }
    uint8_t h[28];
    for (int i = 0; i < BURST && !bad; i++) {
        int err;
        request(h, NBD_CMD_WRITE, i, base + (uint64_t)i * REQ, REQ);
        if (full_io(fd, h, 28, 1) < 0 ||
            full_io(fd, pattern + (size_t)i * REQ, REQ, 1) < 0 ||
            read_reply(fd, pattern, &err) < 0 || err) {
            bad = 1;
        }
    }
    uint8_t *out = malloc(28 * BURST);
    for (int i = 0; i < BURST; i++) {
        request(out + 28 * i, NBD_CMD_READ, i, base + (uint64_t)i * REQ, REQ);
    }
    if (!bad && full_io(fd, out, 28 * BURST, 1) < 0) {
        bad = 2;
    }
    for (int i = 0; i < BURST && !bad; i++) {
        int err;
        if (read_reply(fd, pattern, &err) < 0 || err) {
            bad = 3;
        }
    }
    request(h, NBD_CMD_DISC, 0, 0, 0);
    full_io(fd, h, 28, 1);
    close(fd);
    free(out);
    free(pattern);
    return bad;
}

int main(void)
{
    lam_progname = "test-nbd-server";
    lam_event_set_sink(sink);
    /* Bigger reply batches than request slots (see burst_client). */
    setenv("LAMINA_NBD_BATCH", "64", 1);
    /* Any backlog of a lone client is spread to the pool (if CPUs > 1). */
    setenv("LAMINA_NBD_SPREAD", "1", 1);
    char dir[] = "/tmp/lamina-nbd-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    char img[128];
    snprintf(img, sizeof(img), "%s/disk.raw", dir);
    snprintf(sock_path, sizeof(sock_path), "%s/nbd.sock", dir);
    FILE *f = fopen(img, "w");
    if (!f || ftruncate(fileno(f), (off_t)NCLIENTS * REGION) < 0) {
        perror(img);
        return 1;
    }
    fclose(f);

    LamError *err = NULL;
    LamNode *bs = lam_open_image(img, "raw", LAM_O_RDWR, NULL, &err);
    ok(bs && lam_node_set_name(bs, "n0", &err) == 0, "image opened");
    json_t *addr = json_pack("{s:s, s:{s:s}}", "type", "unix", "data", "path",
                             sock_path);
    ok(lam_nbd_server_start(addr, 0, &err) == 0, "server started");
    json_decref(addr);
    LamNbdExportOpts eo = { .id = "e0", .node_name = "n0", .name = "exp",
                            .writable = true };
    ok(lam_nbd_export_add(&eo, &err) == 0, "export added");
    if (err) {
        printf("# %s\n", err->msg);
        lam_error_free(err);
        err = NULL;
    }

    /* A lone client's backlog of cached reads: the connection thread
     * serves some and hands the rest to workers (the pool's first
     * threads: writes of whole pages and cached reads need none). */
    int before = lam_threadpool_nthreads(nbd_srv.pool);
    ok(cached_burst_client(0) == 0, "burst of cached reads from one client");
    if (sysconf(_SC_NPROCESSORS_ONLN) > 1 && before == 0) {
        ok(lam_threadpool_nthreads(nbd_srv.pool) > 0, "its backlog was spread to workers");
    } else {
        ok(1, "# SKIP one CPU or workers already running");
    }

    pthread_t th[NCLIENTS];
    for (int i = 0; i < NCLIENTS; i++) {
        pthread_create(&th[i], NULL, client, (void *)(intptr_t)i);
    }
    int good = 0;
    for (int i = 0; i < NCLIENTS; i++) {
        void *r;
        pthread_join(th[i], &r);
        good += r == NULL;
    }
    ok(good == NCLIENTS, "all clients wrote and read back their ranges");

    int efd = open(img, O_RDONLY);
    if (efd >= 0) {
        fsync(efd);
        posix_fadvise(efd, 0, 0, POSIX_FADV_DONTNEED);
        close(efd);
    }
    ok(burst_client() == 0, "bursts of requests beyond the slots, evicted data");

    /* A connected client: safe delete refuses, hard delete drops it. */
    int fd = client_connect();
    ok(fd >= 0, "client connected for removal");
    ok(lam_nbd_export_del("e0", false, &err) < 0 && err &&
       !strcmp(err->msg, "export 'e0' still in use"), "safe delete refused");
    lam_error_free(err);
    err = NULL;
    ok(lam_nbd_export_del("e0", true, NULL) == 0, "hard delete");
    ok(atomic_load(&deleted_events) == 1, "BLOCK_EXPORT_DELETED once");
    uint8_t b[16];
    ok(recv(fd, b, sizeof(b), 0) <= 0, "client was disconnected");
    close(fd);
    ok(lam_nbd_export_add(&eo, NULL) == 0, "export added again");
    lam_nbd_shutdown();
    ok(atomic_load(&deleted_events) == 2, "shutdown removed the export");
    ok(!lam_nbd_server_running(), "server stopped");
    lam_node_unref(bs);
    unlink(img);
    rmdir(dir);
    printf("1..%d\n", tests);
    return failures ? 1 : 0;
}
