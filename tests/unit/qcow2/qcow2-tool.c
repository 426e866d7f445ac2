/* Test helper: runs operations on an image through the block core.
 *
 *   qcow2-tool create FILE SIZE [JSON-OPTS]
 *   qcow2-tool measure SIZE|-f FILE [JSON-OPTS]
 *   qcow2-tool [-r] [-F FMT] [-n] IMAGE OP...
 *
 * -r opens read-only, -n opens without backing, -c opens for check,
 * -o JSON adds format-node options.  OPs:
 *   write:OFF:LEN:PAT  wc:OFF:LEN:PAT (compressed)  zero:OFF:LEN[:unmap]
 *   discard:OFF:LEN  read:OFF:LEN:PAT (verify)  dump:OUT  load:OFF:SRC[:c]
 *   check[:leaks|:all]  info  map  resize:SIZE  rebase:FILE[:FMT]  flush
 * Exit status: 0 ok, 1 error, 2 check found corruptions, 3 leaks only. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lamina/block.h"
#include "lamina/driver.h"

static int64_t num(const char *s)
{
    char *end;
    int64_t v = strtoll(s, &end, 0);
    switch (*end) {
    case 'k': case 'K': return v << 10;
    case 'M': return v << 20;
    case 'G': return v << 30;
    default: return v;
    }
}

static int do_write(LamChild *c, int64_t off, int64_t len, int pat, int flags)
{
    uint8_t *b = malloc(len ? len : 1);
    memset(b, pat, len);
    int ret = lam_co_pwrite(c, off, len, b, flags);
    free(b);
    return ret;
}

static int load(LamChild *c, int64_t off, const char *src, bool comp, int64_t cs)
{
    FILE *f = fopen(src, "rb");
    if (!f) {
        return -errno;
    }
    int64_t size = lam_node_length(c->node);
    int64_t chunk = comp ? cs : 1 << 20;
    uint8_t *b = malloc(chunk);
    int ret = 0;
    for (;;) {
        size_t n = fread(b, 1, chunk, f);
        if (n == 0) {
            break;
        }
        if (comp && (int64_t)n < chunk && off + (int64_t)n < size) {
            memset(b + n, 0, chunk - n);
            n = chunk;
        }
        ret = lam_co_pwrite(c, off, n, b, comp ? LAM_REQ_WRITE_COMPRESSED : 0);
        if (ret < 0) {
            break;
        }
        off += n;
    }
    free(b);
    fclose(f);
    return ret;
}

static int run_check(LamNode *bs, const char *arg)
{
    LamCheckResult r = {0};
    LamCheckMode m = LAM_CHECK_NONE;
    if (arg && !strcmp(arg, "leaks")) {
        m = LAM_FIX_LEAKS;
    } else if (arg && !strcmp(arg, "all")) {
        m = LAM_FIX_LEAKS | LAM_FIX_ERRORS;
    }
    int ret = lam_node_check(bs, &r, m);
    if (r.msgs) {
        fputs(r.msgs, stderr);
    }
    printf("{\"corruptions\": %d, \"leaks\": %d, \"check-errors\": %d, "
           "\"corruptions-fixed\": %d, \"leaks-fixed\": %d, \"image-end-offset\": %lld, "
           "\"total-clusters\": %lld, \"allocated-clusters\": %lld, "
           "\"fragmented-clusters\": %lld, \"compressed-clusters\": %lld}\n",
           r.corruptions, r.leaks, r.check_errors, r.corruptions_fixed, r.leaks_fixed,
           (long long)r.image_end_offset, (long long)r.total_clusters,
           (long long)r.allocated_clusters, (long long)r.fragmented_clusters,
           (long long)r.compressed_clusters);
    free(r.msgs);
    if (ret < 0) {
        return 1;
    }
    return r.corruptions || r.check_errors ? 2 : r.leaks ? 3 : 0;
}

int main(int argc, char **argv)
{
    LamError *err = NULL;
    lam_progname = "qcow2-tool";
    if (argc >= 4 && !strcmp(argv[1], "create")) {
        json_t *o = argc > 4 ? json_loads(argv[4], 0, NULL) : NULL;
        int ret = lam_create_image(argv[2], "qcow2", num(argv[3]), o, &err);
        json_decref(o);
        if (ret < 0) {
            lam_error_report_free(err);
            return 1;
        }
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "measure")) {
        LamNode *in = NULL;
        int64_t size = 0;
        int a = 2;
        if (!strcmp(argv[2], "-f") && argc >= 4) {
            in = lam_open_image(argv[3], NULL, 0, NULL, &err);
            if (!in) {
                lam_error_report_free(err);
                return 1;
            }
            a = 4;
        } else {
            size = num(argv[2]);
            a = 3;
        }
        json_t *o = argc > a ? json_loads(argv[a], 0, NULL) : NULL;
        LamMeasure m;
        int ret = lam_measure("qcow2", o, in, size, &m, &err);
        json_decref(o);
        if (in) {
            lam_node_unref(in);
        }
        if (ret < 0) {
            lam_error_report_free(err);
            return 1;
        }
        printf("{\"required\": %lld, \"fully-allocated\": %lld}\n", (long long)m.required,
               (long long)m.fully_allocated);
        return 0;
    }
    int flags = LAM_O_RDWR;
    const char *fmt = "qcow2";
    json_t *extra = NULL;
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "-r")) {
            flags &= ~LAM_O_RDWR;
        } else if (!strcmp(argv[i], "-c")) {
            flags |= LAM_O_CHECK;
        } else if (!strcmp(argv[i], "-n")) {
            if (!extra) {
                extra = json_object();
            }
            json_object_set_new(extra, "backing", json_null());
        } else if (!strcmp(argv[i], "-F") && i + 1 < argc) {
            fmt = argv[++i];
        } else if (!strcmp(argv[i], "-o") && i + 1 < argc) {
            json_t *o = json_loads(argv[++i], 0, NULL);
            if (!extra) {
                extra = json_object();
            }
            if (o) {
                json_object_update(extra, o);
                json_decref(o);
            }
        }
    }
    if (i >= argc) {
        fprintf(stderr, "usage: see source\n");
        return 1;
    }
    LamNode *bs = lam_open_image(argv[i], fmt, flags, extra, &err);
    json_decref(extra);
    if (!bs) {
        /* The tools name the file; drivers give the reason. */
        fprintf(stderr, "qcow2-tool: Could not open '%s': %s\n", argv[i],
                err && err->msg ? err->msg : "?");
        lam_error_free(err);
        return 1;
    }
    uint64_t perm = LAM_PERM_CONSISTENT_READ;
    if (flags & LAM_O_RDWR) {
        perm |= LAM_PERM_WRITE | LAM_PERM_RESIZE;
    }
    LamChild *c = lam_root_attach(bs, "qcow2-tool", perm, LAM_PERM_ALL, &err);
    if (!c) {
        lam_error_report_free(err);
        lam_node_unref(bs);
        return 1;
    }
    json_t *info = json_object();
    lam_node_get_info(bs, info, NULL);
    int64_t cs = json_integer_value(json_object_get(info, "cluster-size"));
    json_decref(info);
    int status = 0;
    for (i++; i < argc && status == 0; i++) {
        char *op = strdup(argv[i]);
        char *f[6] = {0};
        int nf = 0;
        for (char *save = NULL, *t = strtok_r(op, ":", &save); t && nf < 6;
             t = strtok_r(NULL, ":", &save)) {
            f[nf++] = t;
        }
        int ret = 0;
        if (!strcmp(f[0], "write") && nf == 4) {
            ret = do_write(c, num(f[1]), num(f[2]), (int)num(f[3]), 0);
        } else if (!strcmp(f[0], "wc") && nf == 4) {
            ret = do_write(c, num(f[1]), num(f[2]), (int)num(f[3]), LAM_REQ_WRITE_COMPRESSED);
        } else if (!strcmp(f[0], "zero") && nf >= 3) {
            ret = lam_co_pwrite_zeroes(c, num(f[1]), num(f[2]),
                                       nf > 3 ? LAM_REQ_MAY_UNMAP : 0);
        } else if (!strcmp(f[0], "discard") && nf == 3) {
            ret = lam_co_pdiscard(c, num(f[1]), num(f[2]));
        } else if (!strcmp(f[0], "read") && nf == 4) {
            int64_t len = num(f[2]);
            uint8_t *b = malloc(len ? len : 1);
            ret = lam_co_pread(c, num(f[1]), len, b, 0);
            for (int64_t k = 0; ret == 0 && k < len; k++) {
                if (b[k] != (uint8_t)num(f[3])) {
                    fprintf(stderr, "mismatch at %lld: %#x != %#x\n",
                            (long long)(num(f[1]) + k), b[k], (unsigned)num(f[3]));
                    status = 1;
                    break;
                }
            }
            free(b);
        } else if (!strcmp(f[0], "dump") && nf == 2) {
            FILE *o = fopen(f[1], "wb");
            int64_t len = lam_node_length(bs);
            uint8_t *b = malloc(1 << 20);
            for (int64_t off = 0; o && ret == 0 && off < len; off += 1 << 20) {
                int64_t n = len - off < (1 << 20) ? len - off : (1 << 20);
                ret = lam_co_pread(c, off, n, b, 0);
                if (ret == 0 && fwrite(b, 1, n, o) != (size_t)n) {
                    ret = -EIO;
                }
            }
            free(b);
            if (o) {
                fclose(o);
            } else {
                ret = -errno;
            }
        } else if (!strcmp(f[0], "load") && nf >= 3) {
            ret = load(c, num(f[1]), f[2], nf > 3, cs);
        } else if (!strcmp(f[0], "check")) {
            status = run_check(bs, nf > 1 ? f[1] : NULL);
        } else if (!strcmp(f[0], "info")) {
            json_t *o = json_object();
            ret = lam_node_get_info(bs, o, &err);
            char *s = json_dumps(o, JSON_PRESERVE_ORDER);
            if (ret == 0) {
                puts(s);
            }
            free(s);
            json_decref(o);
        } else if (!strcmp(f[0], "map")) {
            int64_t len = lam_node_length(bs);
            for (int64_t off = 0; off < len;) {
                int64_t pnum = 0, map = 0;
                LamNode *file = NULL;
                ret = lam_co_block_status(c, off, len - off, &pnum, &map, &file);
                if (ret < 0 || pnum <= 0) {
                    break;
                }
                printf("%lld %lld %d %lld\n", (long long)off, (long long)pnum, ret,
                       (ret & LAM_BS_OFFSET_VALID) ? (long long)map : -1ll);
                off += pnum;
                ret = 0;
            }
        } else if (!strcmp(f[0], "resize") && nf == 2) {
            ret = lam_co_truncate(c, num(f[1]), false, LAM_PREALLOC_OFF, &err);
        } else if (!strcmp(f[0], "rebase") && nf >= 2) {
            ret = lam_node_change_backing_file(bs, strcmp(f[1], "-") ? f[1] : NULL,
                                               nf > 2 ? f[2] : NULL, &err);
        } else if (!strcmp(f[0], "flush")) {
            ret = lam_co_flush(c);
        } else {
            fprintf(stderr, "unknown op %s\n", argv[i]);
            ret = -EINVAL;
        }
        if (ret < 0) {
            if (err) {
                lam_error_report_free(err);
                err = NULL;
            } else {
                fprintf(stderr, "qcow2-tool: %s: %s\n", argv[i], strerror(-ret));
            }
            status = 1;
        }
        free(op);
    }
    lam_root_detach(c);
    lam_node_flush_all(bs);
    lam_node_unref(bs);
    return status;
}
