/* Control-path error objects and stderr reporting. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lamina/error.h"

const char *lam_progname = "lamina";

static char *vformat(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) {
        abort(); /* out of memory on the error path: nothing sane left */
    }
    return s;
}

static void set_msg(LamError **errp, const char *cls, char *msg)
{
    if (!errp || *errp) {
        free(msg);
        return;
    }
    LamError *e = malloc(sizeof(*e));
    if (!e) {
        abort();
    }
    e->cls = cls;
    e->msg = msg;
    *errp = e;
}

void lam_error_set(LamError **errp, const char *cls, const char *fmt, ...)
{
    if (!errp || *errp) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    set_msg(errp, cls, vformat(fmt, ap));
    va_end(ap);
}

void lam_error_setg(LamError **errp, const char *fmt, ...)
{
    if (!errp || *errp) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    set_msg(errp, LAM_ERR_GENERIC, vformat(fmt, ap));
    va_end(ap);
}

void lam_error_setg_errno(LamError **errp, int err, const char *fmt, ...)
{
    if (!errp || *errp) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    char *head = vformat(fmt, ap);
    va_end(ap);
    char *msg = NULL;
    if (asprintf(&msg, "%s: %s", head, strerror(err < 0 ? -err : err)) < 0) {
        abort();
    }
    free(head);
    set_msg(errp, LAM_ERR_GENERIC, msg);
}

void lam_error_prepend(LamError **errp, const char *fmt, ...)
{
    if (!errp || !*errp) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    char *head = vformat(fmt, ap);
    va_end(ap);
    char *msg = NULL;
    if (asprintf(&msg, "%s%s", head, (*errp)->msg) < 0) {
        abort();
    }
    free(head);
    free((*errp)->msg);
    (*errp)->msg = msg;
}

void lam_error_propagate(LamError **dst, LamError *src)
{
    if (!src) {
        return;
    }
    if (dst && !*dst) {
        *dst = src;
    } else {
        lam_error_free(src);
    }
}

void lam_error_free(LamError *err)
{
    if (err) {
        free(err->msg);
        free(err);
    }
}

void lam_error_report_free(LamError *err)
{
    if (err) {
        fprintf(stderr, "%s: %s\n", lam_progname, err->msg);
        lam_error_free(err);
    }
}

void lam_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: warning: ", lam_progname);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void lam_report(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "%s: ", lam_progname);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
