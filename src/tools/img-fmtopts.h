/* qemu-img "-o" creation options <-> blockdev-create options. */
#ifndef LAMINA_IMG_FMTOPTS_H
#define LAMINA_IMG_FMTOPTS_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "lamina/driver.h"
#include "tools/img-common.h"

/* Formats lamina-img can create. */
bool img_fmt_supported(const char *fmt);
/* "-o help". */
void img_fmt_print_help(const char *fmt);
/* o: {"cluster_size": "64k", ...} (strings, qemu-img names).  Returns a
 * new object in blockdev-create naming, or NULL with *errp set
 * ("Invalid parameter 'x'"). */
json_t *img_fmt_translate(const char *fmt, json_t *o, LamError **errp);
/* The "Formatting 'x', fmt=qcow2 cluster_size=65536 ..." line. */
void img_fmt_describe(const char *filename, const char *fmt, int64_t size,
                      json_t *o, char *buf, size_t len);

/* Creates an image the way "qemu-img create" does (backing checks, the
 * "Formatting" line unless quiet, errors reported as "lamina-img: file:
 * reason").  o: qemu-img style options (strings), may hold backing_file /
 * backing_fmt; size < 0 takes the backing file's size.  Returns 0 / -1. */
int img_do_create(const char *filename, const char *fmt, int64_t size,
                  json_t *o, bool unsafe, bool quiet);

#endif
