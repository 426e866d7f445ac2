/* Declarative argument schemas for QMP commands.
 *
 * Each command describes its arguments once, as a QmpType tree (objects,
 * flat unions, alternates, enums, lists, scalars).  One validator walks
 * the tree for every command, so every command reports errors the same way
 * and with QEMU's wording:
 *   Parameter 'file.filename' is missing
 *   Invalid parameter type for 'size', expected: integer
 *   Parameter 'file.bogus' is unexpected
 *   Parameter 'driver' does not accept value 'foo'   (leaf name only, sic)
 * Members are checked in declaration order, depth first; an object's
 * unexpected members are reported after its declared ones, as QEMU does.
 */
#ifndef LAMINA_QMP_SCHEMA_H
#define LAMINA_QMP_SCHEMA_H

#include <jansson.h>
#include <stdbool.h>

#include "lamina/error.h"

typedef enum {
    QMP_T_ANY,
    QMP_T_STR,
    QMP_T_INT,      /* int64 */
    QMP_T_UINT32,
    QMP_T_SIZE,     /* non-negative int ("size" in QEMU's schema) */
    QMP_T_BOOL,
    QMP_T_NUMBER,
    QMP_T_NULL,
    QMP_T_ENUM,
    QMP_T_OBJECT,   /* struct, or flat union if discriminator is set */
    QMP_T_LIST,
    QMP_T_ALTERNATE,
} QmpKind;

typedef struct QmpType QmpType;

typedef struct QmpMember {
    const char *name;
    const QmpType *type;
    bool optional;
    const char *def;   /* default as JSON text (documentation, and filled
                          in by qmp_validate when asked); NULL: none */
} QmpMember;

typedef struct QmpVariant {
    const char *tag;               /* discriminator value */
    const QmpMember *members;      /* extra members, {NULL}-terminated */
} QmpVariant;

struct QmpType {
    QmpKind kind;
    const char *name;                   /* used in "expected: NAME" */
    const QmpMember *members;           /* OBJECT: {NULL}-terminated */
    const char *discriminator;          /* OBJECT: flat union tag member */
    const QmpVariant *variants;         /* OBJECT: {NULL}-terminated */
    const char *const *values;          /* ENUM: NULL-terminated */
    const QmpType *elem;                /* LIST */
    const QmpType *const *alts;         /* ALTERNATE: NULL-terminated */
};

extern const QmpType qmp_t_any, qmp_t_str, qmp_t_int, qmp_t_uint32,
    qmp_t_size, qmp_t_bool, qmp_t_number, qmp_t_null;

/* Checks value against type.  name is the parameter path prefix (NULL at
 * top level).  fill_defaults: members with a def that are absent are
 * added to value (which must then be writable). */
int qmp_validate(const QmpType *type, json_t *value, bool fill_defaults,
                 LamError **errp);

/* Looks up the variant of a flat union for a tag (NULL if none). */
const QmpVariant *qmp_type_variant(const QmpType *t, const char *tag);

#endif
