/* Reference mode: QEMU's qcow2 driver under the same crash test (see
 * qemu_ref.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qemu_ref.h"
#include "verify.h"

#define DMLOG_MAGIC 0x6a736677736872ULL
#define DMLOG_FLUSH 1u
#define DMLOG_FUA 2u
#define DMLOG_DISCARD 4u
#define DMLOG_MARK 8u

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

static int push(CrashEntry **log, size_t *n, size_t *cap, CrashEntry e)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 1024;
        CrashEntry *nl = realloc(*log, nc * sizeof(*nl));
        if (!nl) {
            return -ENOMEM;
        }
        *log = nl;
        *cap = nc;
    }
    (*log)[(*n)++] = e;
    return 0;
}

static void free_log(CrashEntry *log, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(log[i].data);
    }
    free(log);
}

int dmlog_parse(const uint8_t *buf, int64_t len, CrashEntry **out, size_t *nout)
{
    CrashEntry *log = NULL;
    size_t n = 0, cap = 0;
    if (len < 32 || le64(buf) != DMLOG_MAGIC || le64(buf + 8) != 1) {
        return -EINVAL;
    }
    uint64_t nr = le64(buf + 16);
    uint32_t ss = (uint32_t)(buf[24] | buf[25] << 8 | buf[26] << 16 |
                             (uint32_t)buf[27] << 24);
    if (ss < 512 || ss > 65536 || (ss & (ss - 1))) {
        return -EINVAL;
    }
    int64_t pos = ss; /* entries start in the second sector */
    for (uint64_t i = 0; i < nr; i++) {
        if (pos + 32 > len) {
            break; /* superblock counted entries the log never got */
        }
        uint64_t sector = le64(buf + pos), nsec = le64(buf + pos + 8);
        uint64_t flags = le64(buf + pos + 16), dlen = le64(buf + pos + 24);
        pos += ss;
        /* The payload of a write is nsec sectors; data_len only sizes the
         * text of a mark entry. */
        uint64_t payload = (flags & DMLOG_MARK) ? dlen :
                           (flags & DMLOG_DISCARD) ? 0 : nsec * ss;
        if (sector > (1ULL << 40) || nsec > (1ULL << 24) || dlen > (1ULL << 30) ||
            (int64_t)payload > len - pos) {
            free_log(log, n);
            return -EINVAL;
        }
        int ret = 0;
        CrashEntry e = { .off = (int64_t)(sector * ss), .len = (int64_t)(nsec * ss) };
        if ((flags & DMLOG_FLUSH) && nsec) {
            /* A pre-flush carried by a write: the flush comes first. */
            ret = push(&log, &n, &cap, (CrashEntry){ .type = CR_FLUSH });
        }
        if (ret < 0 || (flags & DMLOG_MARK)) {
            /* marks carry no I/O */
        } else if (flags & DMLOG_DISCARD) {
            e.type = CR_DISCARD;
            ret = push(&log, &n, &cap, e);
        } else if (nsec) {
            e.type = CR_WRITE;
            e.data = malloc(payload);
            if (!e.data) {
                ret = -ENOMEM;
            } else {
                memcpy(e.data, buf + pos, payload);
                ret = push(&log, &n, &cap, e);
                if (ret < 0) {
                    free(e.data);
                }
            }
        } else if (flags & DMLOG_FLUSH) {
            ret = push(&log, &n, &cap, (CrashEntry){ .type = CR_FLUSH });
        }
        if (ret == 0 && (flags & DMLOG_FUA) && nsec) {
            ret = push(&log, &n, &cap, (CrashEntry){ .type = CR_FLUSH });
        }
        if (ret < 0) {
            free_log(log, n);
            return ret;
        }
        pos += (int64_t)((payload + ss - 1) / ss * ss);
    }
    *out = log;
    *nout = n;
    return 0;
}

static int marker_pattern(int i)
{
    return 1 + i % 255;
}

static bool is_marker(const CrashEntry *e, int64_t cluster, int pat, int64_t host)
{
    if (e->type != CR_WRITE || e->len != cluster || (host >= 0 && e->off != host)) {
        return false;
    }
    for (int64_t b = 0; b < e->len; b++) {
        if (e->data[b] != pat) {
            return false;
        }
    }
    return true;
}

static int add_arg(char ***argv, int *argc, int *cap, char *s)
{
    if (!s) {
        return -ENOMEM;
    }
    if (*argc + 2 > *cap) {
        *cap = *cap ? *cap * 2 : 64;
        char **na = realloc(*argv, (size_t)*cap * sizeof(*na));
        if (!na) {
            free(s);
            return -ENOMEM;
        }
        *argv = na;
    }
    (*argv)[(*argc)++] = s;
    (*argv)[*argc] = NULL;
    return 0;
}

static int add_cmd(char ***argv, int *argc, int *cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int add_cmd(char ***argv, int *argc, int *cap, const char *fmt, ...)
{
    char *s = NULL;
    va_list ap;
    va_start(ap, fmt);
    int r = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (r < 0) {
        return -ENOMEM;
    }
    int ret = add_arg(argv, argc, cap, strdup("-c"));
    if (ret < 0) {
        free(s);
        return ret;
    }
    return add_arg(argv, argc, cap, s);
}

int qemu_ref_record(const char *dir, const char *path, Workload *w,
                    int64_t marker_off, int64_t cluster, CrashEntry **logp,
                    size_t *nlogp, char **errmsg)
{
    char **argv = NULL;
    int argc = 0, cap = 0, ret;
    char logpath[4200], datapath[4200];
    snprintf(logpath, sizeof(logpath), "%s/qemu-ref.dmlog", dir);
    if (w->p.nthreads != 1) {
        *errmsg = strdup("reference mode runs one guest thread");
        return -EINVAL;
    }
    /* blklogwrites wants an existing, empty log file. */
    ret = write_file(logpath, (const uint8_t *)"", 0);
    char *o = NULL;
    if (asprintf(&o, "driver=qcow2,file.driver=blklogwrites,"
                 "file.file.driver=file,file.file.filename=%s,"
                 "file.log.driver=file,file.log.filename=%s", path, logpath) < 0) {
        o = NULL;
    }
    if (ret == 0) {
        ret = add_arg(&argv, &argc, &cap, strdup("qemu-io"));
    }
    if (ret == 0) {
        ret = add_arg(&argv, &argc, &cap, strdup("--image-opts"));
    }
    if (ret == 0) {
        ret = add_arg(&argv, &argc, &cap, o);
    } else {
        free(o);
    }
    for (int i = 0; ret == 0 && i <= w->nops; i++) {
        ret = add_cmd(&argv, &argc, &cap, "write -q -P %d %lld %lld",
                      marker_pattern(i), (long long)marker_off, (long long)cluster);
        if (ret < 0 || i == w->nops) {
            break;
        }
        const GuestOp *op = &w->ops[i];
        switch (op->type) {
        case G_WRITE:
            snprintf(datapath, sizeof(datapath), "%s/qemu-ref-%d.bin", dir, i);
            ret = write_file(datapath, op->data, op->len);
            if (ret == 0) {
                ret = add_cmd(&argv, &argc, &cap, "write -q %s%s-s %s %lld %lld",
                              (op->flags & LAM_REQ_FUA) ? "-f " : "",
                              (op->flags & LAM_REQ_WRITE_COMPRESSED) ? "-c " : "",
                              datapath,
                              (long long)op->off, (long long)op->len);
            }
            break;
        case G_ZERO:
            ret = add_cmd(&argv, &argc, &cap, "write -q -z %s%s%lld %lld",
                          (op->flags & LAM_REQ_MAY_UNMAP) ? "-u " : "",
                          (op->flags & LAM_REQ_FUA) ? "-f " : "",
                          (long long)op->off, (long long)op->len);
            break;
        case G_DISCARD:
            ret = add_cmd(&argv, &argc, &cap, "discard -q %lld %lld",
                          (long long)op->off, (long long)op->len);
            break;
        case G_FLUSH:
            ret = add_cmd(&argv, &argc, &cap, "flush");
            break;
        }
    }
    char *out = NULL;
    int rc = ret == 0 ? run_cmd(argv, &out) : ret;
    for (int i = 0; i < argc; i++) {
        free(argv[i]);
    }
    free(argv);
    for (int i = 0; i < w->nops; i++) {
        snprintf(datapath, sizeof(datapath), "%s/qemu-ref-%d.bin", dir, i);
        unlink(datapath);
    }
    if (rc != 0 || (out && strstr(out, "failed"))) {
        if (asprintf(errmsg, "qemu-io failed (%d): %.2000s", rc, out ? out : "") < 0) {
            *errmsg = NULL;
        }
        free(out);
        return -EIO;
    }
    free(out);

    uint8_t *buf;
    int64_t len;
    ret = read_whole_file(logpath, &buf, &len);
    unlink(logpath);
    if (ret < 0) {
        *errmsg = strdup("cannot read the blklogwrites log");
        return ret;
    }
    CrashEntry *log;
    size_t nlog;
    ret = dmlog_parse(buf, len, &log, &nlog);
    free(buf);
    if (ret < 0) {
        *errmsg = strdup("malformed blklogwrites log");
        return ret;
    }

    /* Marker i is the boundary before op i (and marker nops after the
     * last op). */
    size_t pos = 0;
    int64_t host = -1;
    size_t prev = 0;
    for (int i = 0; i <= w->nops; i++) {
        while (pos < nlog && !is_marker(&log[pos], cluster, marker_pattern(i), host)) {
            pos++;
        }
        if (pos == nlog) {
            if (asprintf(errmsg, "marker %d not found in the log", i) < 0) {
                *errmsg = NULL;
            }
            free_log(log, nlog);
            return -EINVAL;
        }
        host = log[pos].off;
        if (i > 0) {
            w->ops[i - 1].log_start = prev + 1;
            w->ops[i - 1].log_end = pos;
            w->ops[i - 1].ret = 0;
        }
        prev = pos;
        pos++;
    }
    *logp = log;
    *nlogp = nlog;
    return 0;
}
