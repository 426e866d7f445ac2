/* QMP's JSON dialect: a streaming parser with QEMU's error wording, and a
 * serializer with QEMU's output spelling.
 *
 * Input (QEMU extensions over RFC 8259): single-quoted strings, the escape
 * \' , and back-to-back values with no separator.  Bad input is reported
 * per value ("JSON parse error, expecting value") and parsing resumes: the
 * lexer skips to the next structural character after an invalid one.
 * Limits keep a hostile client from making us allocate without bound.
 *
 * Not thread safe: one stream per connection, used by one thread.
 */
#ifndef LAMINA_QMP_JSON_H
#define LAMINA_QMP_JSON_H

#include <jansson.h>
#include <stddef.h>

#include "lamina/error.h"

#define QMP_JSON_MAX_BYTES (16u << 20)   /* one value, in token bytes */
#define QMP_JSON_MAX_TOKENS (1u << 20)
#define QMP_JSON_MAX_NESTING 1024

/* value: the parsed value (stolen), or NULL and err (stolen) set. */
typedef void (*QmpJsonEmit)(void *opaque, json_t *value, LamError *err);

typedef struct QmpJsonStream QmpJsonStream;
QmpJsonStream *qmp_json_stream_new(QmpJsonEmit emit, void *opaque);
/* Feeds bytes; calls emit for every complete value or error.  emit may
 * call qmp_json_stream_stop() to make feed return early (e.g. on quit). */
void qmp_json_stream_feed(QmpJsonStream *s, const char *buf, size_t len);
void qmp_json_stream_stop(QmpJsonStream *s);
void qmp_json_stream_free(QmpJsonStream *s);

/* Parses exactly one value from a string (command-line --blockdev). */
json_t *qmp_json_parse(const char *text, LamError **errp);

/* Serializes like QEMU: ", " and ": " separators, non-ASCII as \uXXXX
 * (upper-case hex, surrogate pairs), reals with %.17g.  malloc'ed. */
char *qmp_json_dumps(const json_t *v);

#endif
