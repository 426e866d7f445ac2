/* Checking and reading back one crash image (see verify.h). */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "lamina/block.h"
#include "rng.h"
#include "verify.h"

extern char **environ;

#define OUT_MAX (64 * 1024)

int write_file(const char *path, const uint8_t *buf, int64_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        return -errno;
    }
    int64_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, buf + done, (size_t)(len - done));
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            int err = -errno;
            close(fd);
            return err;
        }
        done += n;
    }
    return close(fd) < 0 ? -errno : 0;
}

int read_whole_file(const char *path, uint8_t **buf, int64_t *len)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0) {
        return -errno;
    }
    if (fstat(fd, &st) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    uint8_t *b = malloc(st.st_size ? (size_t)st.st_size : 1);
    if (!b) {
        close(fd);
        return -ENOMEM;
    }
    int64_t done = 0;
    while (done < st.st_size) {
        ssize_t n = read(fd, b + done, (size_t)(st.st_size - done));
        if (n <= 0) {
            if (n < 0 && errno == EINTR) {
                continue;
            }
            free(b);
            close(fd);
            return n < 0 ? -errno : -EIO;
        }
        done += n;
    }
    close(fd);
    *buf = b;
    *len = st.st_size;
    return 0;
}

static void append(char **out, size_t *len, const char *data, size_t n)
{
    if (*len + n > OUT_MAX) {
        n = OUT_MAX - *len;
    }
    if (n == 0) {
        return;
    }
    char *nb = realloc(*out, *len + n + 1);
    if (!nb) {
        return;
    }
    memcpy(nb + *len, data, n);
    *len += n;
    nb[*len] = '\0';
    *out = nb;
}

/* stdout goes to *out; stderr is appended after it, marked, so JSON
 * parsers can stop at the marker. */
int run_cmd(char *const argv[], char **out)
{
    int po[2], pe[2];
    if (pipe(po) < 0) {
        return -errno;
    }
    if (pipe(pe) < 0) {
        int err = -errno;
        close(po[0]);
        close(po[1]);
        return err;
    }
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, po[1], 1);
    posix_spawn_file_actions_adddup2(&fa, pe[1], 2);
    posix_spawn_file_actions_addclose(&fa, po[0]);
    posix_spawn_file_actions_addclose(&fa, pe[0]);
    pid_t pid;
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(po[1]);
    close(pe[1]);
    if (rc != 0) {
        close(po[0]);
        close(pe[0]);
        return -rc;
    }
    char *o = NULL, *e = NULL;
    size_t olen = 0, elen = 0;
    struct pollfd pf[2] = { { po[0], POLLIN, 0 }, { pe[0], POLLIN, 0 } };
    int open_fds = 2;
    while (open_fds > 0) {
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR))) {
                continue;
            }
            char buf[4096];
            ssize_t n = read(pf[i].fd, buf, sizeof(buf));
            if (n > 0) {
                if (i == 0) {
                    append(&o, &olen, buf, (size_t)n);
                } else {
                    append(&e, &elen, buf, (size_t)n);
                }
            } else if (n == 0 || errno != EINTR) {
                close(pf[i].fd);
                pf[i].fd = -1;
                open_fds--;
            }
        }
    }
    for (int i = 0; i < 2; i++) {
        if (pf[i].fd >= 0) {
            close(pf[i].fd);
        }
    }
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (e) {
        append(&o, &olen, "\n--stderr--\n", 12);
        append(&o, &olen, e, elen);
        free(e);
    }
    if (out) {
        *out = o ? o : strdup("");
    } else {
        free(o);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static json_t *image_opts(const char *path, const char *fmt)
{
    return json_pack("{s:s, s:{s:s, s:s}}", "driver", fmt, "file", "driver",
                     "file", "filename", path);
}

static char *first_lines(const char *s, int lines)
{
    if (!s) {
        return NULL;
    }
    const char *p = s;
    while (lines-- > 0 && (p = strchr(p, '\n'))) {
        p++;
    }
    size_t n = p ? (size_t)(p - s) : strlen(s);
    return strndup(s, n);
}

void check_ours(const char *path, const char *fmt, CheckCounts *cc)
{
    memset(cc, 0, sizeof(*cc));
    LamError *err = NULL;
    json_t *opts = image_opts(path, fmt);
    LamNode *bs = lam_node_open(opts, LAM_O_CHECK, &err);
    json_decref(opts);
    if (!bs) {
        cc->supported = true;
        cc->open_failed = true;
        cc->msg = strdup(err ? err->msg : "open failed");
        lam_error_free(err);
        return;
    }
    LamCheckResult res;
    memset(&res, 0, sizeof(res));
    int ret = lam_node_check(bs, &res, LAM_CHECK_NONE);
    cc->supported = ret != -ENOTSUP && res.supported;
    if (cc->supported) {
        cc->corruptions = res.corruptions;
        cc->leaks = res.leaks;
        cc->errors = res.check_errors + (ret < 0 ? 1 : 0);
        cc->msg = first_lines(res.msgs, 8);
    }
    free(res.msgs);
    lam_node_unref(bs);
}

void check_qemu(const char *path, const char *fmt, CheckCounts *cc)
{
    memset(cc, 0, sizeof(*cc));
    if (strcmp(fmt, "qcow2") != 0) {
        return; /* qemu-img check has nothing to say about raw */
    }
    cc->supported = true;
    char *argv[] = { "qemu-img", "check", "-f", (char *)fmt, "--output=json",
                     (char *)path, NULL };
    char *out = NULL;
    int rc = run_cmd(argv, &out);
    /* Exit codes: 0 clean, 1 check failed to run, 2 corruptions,
     * 3 leaks only, 63 format without check. */
    json_error_t jerr;
    json_t *j = NULL;
    if (out) {
        const char *mark = strstr(out, "\n--stderr--\n");
        j = json_loadb(out, mark ? (size_t)(mark - out) : strlen(out), 0, &jerr);
    }
    if (j) {
        cc->corruptions = (int)json_integer_value(json_object_get(j, "corruptions"));
        cc->leaks = (int)json_integer_value(json_object_get(j, "leaks"));
        cc->errors = (int)json_integer_value(json_object_get(j, "check-errors"));
        json_decref(j);
    }
    if (rc == 2 && cc->corruptions == 0) {
        cc->corruptions = 1;
    }
    if (rc == 1 || rc < 0 || rc > 3 || (!j && rc != 0)) {
        cc->errors += 1;
        cc->open_failed = !j;
    }
    if (rc != 0 && rc != 3 && out) {
        /* The findings ("ERROR cluster 5 refcount=0 reference=1") are on
         * stderr; the JSON counts are already in cc. */
        const char *mark = strstr(out, "\n--stderr--\n");
        cc->msg = first_lines(mark ? mark + 12 : out, 12);
    }
    free(out);
}

int read_guest_ours(const char *path, const char *fmt, uint8_t *out,
                    int64_t size, char **errmsg)
{
    LamError *err = NULL;
    json_t *opts = image_opts(path, fmt);
    LamNode *bs = lam_node_open(opts, 0, &err);
    json_decref(opts);
    if (!bs) {
        *errmsg = strdup(err ? err->msg : "open failed");
        lam_error_free(err);
        return -EIO;
    }
    LamChild *c = lam_root_attach(bs, "crash test reader",
                                  LAM_PERM_CONSISTENT_READ, LAM_PERM_ALL, &err);
    if (!c) {
        *errmsg = strdup(err ? err->msg : "attach failed");
        lam_error_free(err);
        lam_node_unref(bs);
        return -EIO;
    }
    int ret = 0;
    int64_t len = lam_node_length(bs);
    if (len != size) {
        char m[128];
        snprintf(m, sizeof(m), "guest size %lld, expected %lld",
                 (long long)len, (long long)size);
        *errmsg = strdup(m);
        ret = -EIO;
    }
    for (int64_t off = 0; ret == 0 && off < size; off += 1 << 20) {
        int64_t n = size - off < (1 << 20) ? size - off : (1 << 20);
        ret = lam_co_pread(c, off, n, out + off, 0);
        if (ret < 0) {
            char m[128];
            snprintf(m, sizeof(m), "read at %lld failed: %s", (long long)off,
                     strerror(-ret));
            *errmsg = strdup(m);
        }
    }
    lam_root_detach(c);
    lam_node_unref(bs);
    return ret;
}

int read_guest_qemu(const char *path, const char *fmt, const char *tmp_raw,
                    uint8_t *out, int64_t size, char **errmsg)
{
    char *argv[] = { "qemu-img", "convert", "-U", "-f", (char *)fmt, "-O", "raw",
                     (char *)path, (char *)tmp_raw, NULL };
    char *o = NULL;
    int rc = run_cmd(argv, &o);
    if (rc != 0) {
        *errmsg = first_lines(o, 6);
        free(o);
        return -EIO;
    }
    free(o);
    uint8_t *buf;
    int64_t len;
    int ret = read_whole_file(tmp_raw, &buf, &len);
    unlink(tmp_raw);
    if (ret < 0) {
        *errmsg = strdup("cannot read converted image");
        return ret;
    }
    if (len != size) {
        *errmsg = strdup("converted image has the wrong size");
        free(buf);
        return -EIO;
    }
    memcpy(out, buf, (size_t)size);
    free(buf);
    return 0;
}

void reuse_writes_free(ReuseWrites *rw)
{
    for (int i = 0; i < rw->n; i++) {
        free(rw->data[i]);
    }
    rw->n = 0;
}

int reuse_image(const char *path, const char *fmt, int64_t size,
                int64_t cluster, uint64_t seed, ReuseWrites *rw, char **errmsg)
{
    LamError *err = NULL;
    Rng r;
    rng_seed(&r, seed);
    rw->n = 0;
    json_t *opts = image_opts(path, fmt);
    LamNode *bs = lam_node_open(opts, LAM_O_RDWR, &err);
    json_decref(opts);
    if (!bs) {
        *errmsg = strdup(err ? err->msg : "open failed");
        lam_error_free(err);
        return -EIO;
    }
    LamChild *c = lam_root_attach(bs, "crash test reuse",
                                  LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE,
                                  LAM_PERM_ALL, &err);
    if (!c) {
        *errmsg = strdup(err ? err->msg : "attach failed");
        lam_error_free(err);
        lam_node_unref(bs);
        return -EIO;
    }
    int ret = 0;
    for (int i = 0; i < REUSE_WRITES && ret == 0; i++) {
        int64_t off, len;
        if (i < REUSE_WRITES - 1) {
            /* New allocations: the free-cluster search meets the leaks. */
            off = (int64_t)rng_below(&r, (uint64_t)(size / cluster)) * cluster;
            len = cluster * (1 + (int64_t)rng_below(&r, 3));
        } else {
            /* A partial-cluster write: COW in a crashed image. */
            off = (int64_t)rng_below(&r, (uint64_t)size);
            len = 1 + (int64_t)rng_below(&r, (uint64_t)cluster);
        }
        if (off + len > size) {
            len = size - off;
        }
        uint8_t *d = malloc((size_t)len);
        if (!d) {
            ret = -ENOMEM;
            break;
        }
        rng_fill(&r, d, (size_t)len);
        rw->off[rw->n] = off;
        rw->len[rw->n] = len;
        rw->data[rw->n++] = d;
        ret = lam_co_pwrite(c, off, len, d, 0);
        if (ret < 0) {
            char m[128];
            snprintf(m, sizeof(m), "write at %lld failed: %s", (long long)off,
                     strerror(-ret));
            *errmsg = strdup(m);
        }
    }
    if (ret == 0) {
        ret = lam_co_flush(c);
        if (ret < 0) {
            *errmsg = strdup("flush failed");
        }
    }
    lam_root_detach(c);
    lam_node_flush_all(bs);
    lam_node_unref(bs);
    return ret;
}

int repair_ours(const char *path, const char *fmt, char **errmsg)
{
    LamError *err = NULL;
    json_t *opts = image_opts(path, fmt);
    LamNode *bs = lam_node_open(opts, LAM_O_RDWR, &err);
    json_decref(opts);
    if (!bs) {
        *errmsg = strdup(err ? err->msg : "open failed");
        lam_error_free(err);
        return -EIO;
    }
    int ret = lam_node_flush_all(bs);
    lam_node_unref(bs);
    if (ret < 0) {
        *errmsg = strdup("flush after repair failed");
    }
    return ret;
}

int repair_qemu(const char *path, const char *fmt, char **errmsg)
{
    char *argv[] = { "qemu-img", "check", "-q", "-r", "all", "-f", (char *)fmt,
                     (char *)path, NULL };
    char *out = NULL;
    int rc = run_cmd(argv, &out);
    /* 0: clean after repair; 3: leaks left (not possible with -r all, but
     * harmless). */
    if (rc != 0 && rc != 3) {
        *errmsg = first_lines(out, 8);
        free(out);
        return -EIO;
    }
    free(out);
    return 0;
}
