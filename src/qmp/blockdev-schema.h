/* The blockdev-add schema (BlockdevOptions): a flat union on "driver".
 * Drivers are registered at startup; other layers (jobs: copy-before-write,
 * snapshot-access, ...) add theirs with qmp_blockdev_register_driver()
 * before qmp_block_init() builds the command table. */
#ifndef LAMINA_QMP_BLOCKDEV_SCHEMA_H
#define LAMINA_QMP_BLOCKDEV_SCHEMA_H

#include "qmp/schema.h"

/* members: the driver's own options, {NULL}-terminated, static storage.
 * Use &qmp_blockdev_ref / &qmp_blockdev_ref_or_null for child options. */
void qmp_blockdev_register_driver(const char *name, const QmpMember *members);

extern const QmpType qmp_blockdev_options;    /* BlockdevOptions */
extern const QmpType qmp_blockdev_ref;        /* BlockdevRef */
extern const QmpType qmp_blockdev_ref_or_null; /* BlockdevRefOrNull */

#endif
