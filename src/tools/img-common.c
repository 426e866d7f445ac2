/* Shared helpers of lamina-img (see img-common.h). */
#include "tools/img-common.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lamina/driver.h"

bool img_quiet;

void img_error(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s: ", lam_progname);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void img_error_free(LamError *err, const char *prefix_fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fprintf(stderr, "%s: ", lam_progname);
    if (prefix_fmt) {
        va_start(ap, prefix_fmt);
        vfprintf(stderr, prefix_fmt, ap);
        va_end(ap);
    }
    fprintf(stderr, "%s\n", err && err->msg ? err->msg : "Unknown error");
    lam_error_free(err);
}

void img_help_hint(void)
{
    fprintf(stderr, "Try 'lamina-img --help' for more information\n");
}

void img_printf(const char *fmt, ...)
{
    va_list ap;
    if (img_quiet) {
        return;
    }
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
}

int img_parse_size(const char *s, int64_t *out)
{
    char *end;
    double frac = 0;
    unsigned long long whole;
    uint64_t unit = 1;

    if (!s || !*s || *s == '-' || *s == '+' || *s == ' ') {
        return -EINVAL;
    }
    errno = 0;
    whole = strtoull(s, &end, 10);
    if (errno || end == s) {
        return errno ? -ERANGE : -EINVAL;
    }
    if (*end == '.') {
        /* Fractions are allowed only together with a unit suffix. */
        const char *fs = end;
        frac = strtod(fs, &end);
    }
    switch (*end) {
    case 'b': case 'B': unit = 1; end++; break;
    case 'k': case 'K': unit = 1ULL << 10; end++; break;
    case 'm': case 'M': unit = 1ULL << 20; end++; break;
    case 'g': case 'G': unit = 1ULL << 30; end++; break;
    case 't': case 'T': unit = 1ULL << 40; end++; break;
    case 'p': case 'P': unit = 1ULL << 50; end++; break;
    case 'e': case 'E': unit = 1ULL << 60; end++; break;
    case '\0': break;
    default: return -EINVAL;
    }
    if (*end) {
        return -EINVAL;
    }
    if (frac != 0 && unit == 1) {
        return -EINVAL;
    }
    if (whole > (uint64_t)INT64_MAX / unit) {
        return -ERANGE;
    }
    double total = (double)whole * unit + frac * unit;
    if (total >= 9223372036854775807.0) {
        return -ERANGE;
    }
    *out = (int64_t)whole * (int64_t)unit + (int64_t)(frac * unit);
    return 0;
}

void img_report_bad_size(void)
{
    img_error("Invalid image size specified. You may use k, M, G, T, P or E "
              "suffixes for ");
    img_error("kilobytes, megabytes, gigabytes, terabytes, petabytes and "
              "exabytes.");
}

void img_size_to_str(int64_t v, char *buf, size_t len)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB",
                                        "PiB", "EiB"};
    /* Switch to the next unit once the value reaches 1000 of the current
     * one, so that at most three digits stand before the point. */
    double d = (double)v;
    int i = 0;
    while (i < 6 && d >= 1000.0) {
        d /= 1024.0;
        i++;
    }
    snprintf(buf, len, "%0.3g %s", d, units[i]);
}

int img_parse_output(const char *s)
{
    if (!strcmp(s, "human")) {
        return 0;
    }
    if (!strcmp(s, "json")) {
        return 1;
    }
    img_error("--output must be used with human or json as argument.");
    return -1;
}

void img_print_json(json_t *v)
{
    char *s = json_dumps(v, JSON_INDENT(4) | JSON_PRESERVE_ORDER);
    if (s) {
        printf("%s\n", s);
        free(s);
    }
}

int img_parse_o(json_t *into, const char *list)
{
    size_t n = strlen(list);
    char *buf = malloc(n + 1);
    size_t i = 0;

    if (!buf) {
        return -1;
    }
    while (i <= n) {
        size_t k = 0;
        /* One item up to an unescaped comma; ",," is a literal comma. */
        while (i < n) {
            if (list[i] == ',') {
                if (i + 1 < n && list[i + 1] == ',') {
                    buf[k++] = ',';
                    i += 2;
                    continue;
                }
                break;
            }
            buf[k++] = list[i++];
        }
        buf[k] = '\0';
        i++; /* skip the separator (or the end) */
        if (k == 0) {
            continue;
        }
        char *eq = strchr(buf, '=');
        if (!eq) {
            if (!strcmp(buf, "help") || !strcmp(buf, "?")) {
                json_object_set_new(into, "help", json_string("1"));
                continue;
            }
            img_error("Invalid option list: %s", list);
            free(buf);
            return -1;
        }
        *eq = '\0';
        json_object_set_new(into, buf, json_string(eq + 1));
    }
    free(buf);
    return 0;
}

int img_open(ImgImage *im, const char *filename, const char *fmt, int flags,
             json_t *extra, LamError **errp)
{
    LamError *err = NULL;
    int oflags = 0;
    json_t *ex = extra ? json_deep_copy(extra) : NULL;

    memset(im, 0, sizeof(*im));
    if (flags & IMG_OPEN_RW) {
        oflags |= LAM_O_RDWR;
    }
    if (flags & IMG_OPEN_SHARE) {
        oflags |= LAM_O_FORCE_SHARE;
    }
    if (flags & IMG_OPEN_NOCACHE) {
        oflags |= LAM_O_NOCACHE;
    }
    if (flags & IMG_OPEN_NO_FLUSH) {
        oflags |= LAM_O_NO_FLUSH;
    }
    if (flags & IMG_OPEN_CHECK) {
        oflags |= LAM_O_CHECK;
    }
    if (flags & IMG_OPEN_NO_BACKING) {
        oflags |= LAM_O_NO_BACKING;
        if (!ex) {
            ex = json_object();
        }
        json_object_set_new(ex, "backing", json_null());
    }
    im->node = lam_open_image(filename, fmt, oflags, ex, &err);
    json_decref(ex);
    if (!im->node) {
        goto fail;
    }
    uint64_t perm = LAM_PERM_CONSISTENT_READ;
    uint64_t shared = LAM_PERM_ALL;
    if (flags & IMG_OPEN_RW) {
        perm |= LAM_PERM_WRITE;
        /* A writer shares reads only, as qemu-img does. */
        shared = LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE_UNCHANGED;
    }
    if (flags & IMG_OPEN_RESIZE) {
        perm |= LAM_PERM_RESIZE;
    }
    if (flags & IMG_OPEN_SHARE) {
        shared = LAM_PERM_ALL;
    }
    im->root = lam_root_attach(im->node, "lamina-img", perm, shared, &err);
    if (!im->root) {
        lam_node_unref(im->node);
        im->node = NULL;
        goto fail;
    }
    im->filename = strdup(filename);
    return 0;

fail:
    if (flags & IMG_OPEN_QUIET_ERR) {
        lam_error_propagate(errp, err);
    } else {
        img_error_free(err, "Could not open '%s': ", filename);
    }
    return -1;
}

void img_close(ImgImage *im)
{
    if (im->root) {
        lam_root_detach(im->root);
        im->root = NULL;
    }
    if (im->node) {
        lam_node_unref(im->node);
        im->node = NULL;
    }
    free(im->filename);
    im->filename = NULL;
}

int img_chain_length(LamNode *bs)
{
    int n = 0;
    for (LamNode *b = lam_node_backing_node(bs); b; b = lam_node_backing_node(b)) {
        /* Filters pass through; count only format layers. */
        if (lam_node_driver(b) && lam_node_driver(b)->kind == LAM_DRV_FORMAT) {
            n++;
        }
    }
    return n;
}

int64_t img_cluster_size(LamNode *bs)
{
    json_t *info = json_object();
    int64_t cs = 0;
    if (lam_node_get_info(bs, info, NULL) == 0) {
        json_t *v = json_object_get(info, "cluster-size");
        if (json_is_integer(v)) {
            cs = json_integer_value(v);
        }
    }
    json_decref(info);
    return cs;
}

/* ---- progress ---- */

/* Only the main thread or the copy threads under their own lock call the
 * progress functions; prog_lock protects the two fields below. */
static pthread_mutex_t prog_lock = PTHREAD_MUTEX_INITIALIZER;
static bool prog_enabled;
static double prog_last = -100.0;

void img_progress_start(bool enabled)
{
    pthread_mutex_lock(&prog_lock);
    prog_enabled = enabled && !img_quiet;
    prog_last = -100.0;
    pthread_mutex_unlock(&prog_lock);
    img_progress_set(0.0);
}

void img_progress_set(double percent)
{
    pthread_mutex_lock(&prog_lock);
    if (prog_enabled && (percent - prog_last >= 1.0 ||
                         (percent >= 100.0 && prog_last < 100.0))) {
        if (percent > 100.0) {
            percent = 100.0;
        }
        printf("    (%3.2f/100%%)\r", percent);
        fflush(stdout);
        prog_last = percent;
    }
    pthread_mutex_unlock(&prog_lock);
}

void img_progress_end(void)
{
    pthread_mutex_lock(&prog_lock);
    if (prog_enabled) {
        printf("\n");
        fflush(stdout);
    }
    prog_enabled = false;
    pthread_mutex_unlock(&prog_lock);
}

/* ---- threads ---- */

typedef struct ThreadArg {
    int idx;
    int ret;
    int (*fn)(int, void *);
    void *opaque;
} ThreadArg;

static void *thread_main(void *p)
{
    ThreadArg *a = p;
    a->ret = a->fn(a->idx, a->opaque);
    return NULL;
}

int img_run_threads(int n, int (*fn)(int idx, void *opaque), void *opaque)
{
    pthread_t th[IMG_MAX_THREADS];
    ThreadArg args[IMG_MAX_THREADS];
    int started = 0, ret = 0;

    if (n <= 1) {
        return fn(0, opaque);
    }
    if (n > IMG_MAX_THREADS) {
        n = IMG_MAX_THREADS;
    }
    for (int i = 0; i < n; i++) {
        args[i] = (ThreadArg){.idx = i, .fn = fn, .opaque = opaque};
        if (pthread_create(&th[i], NULL, thread_main, &args[i]) != 0) {
            break;
        }
        started++;
    }
    if (started == 0) {
        return fn(0, opaque);
    }
    for (int i = 0; i < started; i++) {
        pthread_join(th[i], NULL);
        if (args[i].ret && !ret) {
            ret = args[i].ret;
        }
    }
    return ret;
}

void *img_alloc_buf(size_t len)
{
    void *p = NULL;
    if (posix_memalign(&p, 4096, len ? len : 4096) != 0) {
        return NULL;
    }
    return p;
}

bool img_same_file(const char *a, const char *b)
{
    char ra[PATH_MAX], rb[PATH_MAX];
    if (!a || !b) {
        return false;
    }
    if (!strcmp(a, b)) {
        return true;
    }
    return realpath(a, ra) && realpath(b, rb) && !strcmp(ra, rb);
}
