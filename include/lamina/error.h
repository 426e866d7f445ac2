/* Control-path errors.
 *
 * The data path returns negative errno.  The control path (open, create,
 * check, QMP commands) carries a LamError: a QMP error class and a human
 * message that names the object and the reason, e.g.
 *   Could not open 'x.qcow2': L1 table offset beyond end of file
 *
 * Convention: a function taking `LamError **errp` sets *errp on failure
 * (if errp is non-NULL and *errp is still NULL) and returns NULL / a negative
 * value.  The first error set wins; later ones are dropped.
 */
#ifndef LAMINA_ERROR_H
#define LAMINA_ERROR_H

#include <stdarg.h>

typedef struct LamError {
    const char *cls; /* QMP class: "GenericError", "CommandNotFound", ... */
    char *msg;
} LamError;

#define LAM_ERR_GENERIC "GenericError"
#define LAM_ERR_COMMAND_NOT_FOUND "CommandNotFound"
#define LAM_ERR_DEVICE_NOT_ACTIVE "DeviceNotActive"
#define LAM_ERR_DEVICE_NOT_FOUND "DeviceNotFound"

void lam_error_setg(LamError **errp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void lam_error_set(LamError **errp, const char *cls, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Appends ": strerror(-err)" to the message. err is a negative errno. */
void lam_error_setg_errno(LamError **errp, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Rewrites an existing error as "<prefix><old message>". */
void lam_error_prepend(LamError **errp, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void lam_error_propagate(LamError **dst, LamError *src);
void lam_error_free(LamError *err);
/* Prints "prog: message" to stderr and frees it. */
void lam_error_report_free(LamError *err);

/* Program name used as prefix for reports and warnings. */
extern const char *lam_progname;
void lam_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void lam_report(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
