/* Shared helpers of lamina-img: option parsing, opening images the way
 * qemu-img does, output formatting, the progress line and a parallel
 * chunk scheduler used by convert/commit/rebase. */
#ifndef LAMINA_IMG_COMMON_H
#define LAMINA_IMG_COMMON_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "lamina/block.h"

/* Subcommand entry points: argc/argv start at the subcommand name. */
int img_create(int argc, char **argv);
int img_info(int argc, char **argv);
int img_check(int argc, char **argv);
int img_map(int argc, char **argv);
int img_compare(int argc, char **argv);
int img_convert(int argc, char **argv);
int img_rebase(int argc, char **argv);
int img_commit(int argc, char **argv);
int img_resize(int argc, char **argv);
int img_measure(int argc, char **argv);
int img_dd(int argc, char **argv);

/* -q: no normal output (errors still go to stderr). */
extern bool img_quiet;

/* Prints "lamina-img: <msg>" to stderr. */
void img_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Prints "lamina-img: <prefix><err->msg>" and frees err. */
void img_error_free(LamError *err, const char *prefix_fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* "Try 'lamina-img --help' ..." after a usage error. */
void img_help_hint(void);
/* printf to stdout unless quiet. */
void img_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Size with optional k/M/G/T/P/E suffix (powers of 1024, "b" ignored).
 * Returns 0 or -EINVAL / -ERANGE. */
int img_parse_size(const char *s, int64_t *out);
/* Prints qemu-img's message for an invalid size. */
void img_report_bad_size(void);
/* "64 MiB", "1.25 MiB", "4 KiB" (3 significant digits, binary units). */
void img_size_to_str(int64_t v, char *buf, size_t len);

/* --output=human|json.  Returns 0 human, 1 json, -1 invalid (reported). */
int img_parse_output(const char *s);
/* Pretty prints a JSON value with 4-space indentation and a newline. */
void img_print_json(json_t *v);

/* Parses a qemu-img "-o" list ("a=b,c=d", ",," escapes a comma) into a
 * JSON object of strings with qemu-img's option names.  Repeated -o lists
 * are merged by calling again with the same object.  Returns 0 / -1
 * (reported with the given filename prefix). */
int img_parse_o(json_t *into, const char *list);

/* An image opened for a subcommand: the node and the root edge lamina-img
 * does its I/O through. */
typedef struct ImgImage {
    LamNode *node;
    LamChild *root;
    char *filename;
} ImgImage;

enum {
    IMG_OPEN_RW = 1 << 0,
    IMG_OPEN_SHARE = 1 << 1,      /* -U: force share */
    IMG_OPEN_NO_BACKING = 1 << 2,
    IMG_OPEN_CHECK = 1 << 3,
    IMG_OPEN_RESIZE = 1 << 4,     /* root takes the resize permission */
    IMG_OPEN_QUIET_ERR = 1 << 5,  /* leave reporting to the caller */
    IMG_OPEN_NO_FLUSH = 1 << 6,   /* cache=unsafe: flushes do nothing */
    IMG_OPEN_NOCACHE = 1 << 7,    /* cache=none: O_DIRECT */
};
/* Opens filename (fmt NULL: probe) and attaches a root.  On failure
 * reports "Could not open 'x': reason" (unless QUIET_ERR, then *errp is
 * set) and returns -1. extra (borrowed, may be NULL) merges into the
 * format node's options. */
int img_open(ImgImage *im, const char *filename, const char *fmt, int flags,
             json_t *extra, LamError **errp);
void img_close(ImgImage *im);

/* Number of backing layers below bs (0 for an image without backing). */
int img_chain_length(LamNode *bs);
/* The image's cluster size if the format has one, else 0. */
int64_t img_cluster_size(LamNode *bs);

/* Whether two paths name the same file (after resolving links). */
bool img_same_file(const char *a, const char *b);

/* Progress line "    (12.34/100%)\r" on stdout. */
void img_progress_start(bool enabled);
void img_progress_set(double percent);
void img_progress_end(void);

/* Default request size for copying loops. */
#define IMG_CHUNK (2 * 1024 * 1024)
/* Largest range handled in one step when no data buffer is involved. */
#define IMG_BIG_CHUNK (1024LL * 1024 * 1024)
#define IMG_MAX_THREADS 16

/* Runs fn(i, opaque) on n threads (n >= 1; 1 runs inline) and joins them.
 * Returns the first non-zero return value. */
int img_run_threads(int n, int (*fn)(int idx, void *opaque), void *opaque);

/* Reads a block of memory aligned for O_DIRECT. */
void *img_alloc_buf(size_t len);

#endif
