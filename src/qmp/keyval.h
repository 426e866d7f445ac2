/* QEMU's command-line "keyval" syntax, as qemu-storage-daemon accepts it
 * for --blockdev and --export:
 *   driver=qcow2,node-name=d0,file.driver=file,file.filename=a,,b.qcow2
 * Dotted keys build nested objects, ",," is a literal comma.  Values are
 * strings on the command line; they are converted to the types the schema
 * declares (booleans on/off/yes/no/true/false/y/n, integers in decimal,
 * octal or hex), so the result validates like a QMP request. */
#ifndef LAMINA_QMP_KEYVAL_H
#define LAMINA_QMP_KEYVAL_H

#include <jansson.h>

#include "lamina/error.h"
#include "qmp/schema.h"

json_t *qmp_keyval_parse(const char *text, const QmpType *type, LamError **errp);

#endif
