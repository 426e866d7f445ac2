/* The one argument validator every QMP command goes through. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/json.h"
#include "qmp/schema.h"

const QmpType qmp_t_any = {QMP_T_ANY, "any"};
const QmpType qmp_t_str = {QMP_T_STR, "string"};
const QmpType qmp_t_int = {QMP_T_INT, "integer"};
const QmpType qmp_t_uint32 = {QMP_T_UINT32, "uint32"};
const QmpType qmp_t_size = {QMP_T_SIZE, "integer"};
const QmpType qmp_t_bool = {QMP_T_BOOL, "boolean"};
const QmpType qmp_t_number = {QMP_T_NUMBER, "number"};
const QmpType qmp_t_null = {QMP_T_NULL, "null"};

/* Parameter paths are bounded by the nesting limit of the parser (1024)
 * times the member name length; cap the text we build. */
#define PATH_MAX_LEN 1024

static void join(char *out, const char *path, const char *name)
{
    if (path && *path) {
        snprintf(out, PATH_MAX_LEN, "%s.%s", path, name);
    } else {
        snprintf(out, PATH_MAX_LEN, "%s", name);
    }
}

static int validate(const QmpType *t, json_t *v, const char *path,
                    const char *leaf, bool fill, LamError **errp);

static bool alt_matches(const QmpType *t, json_t *v)
{
    switch (t->kind) {
    case QMP_T_ANY:
        return true;
    case QMP_T_STR:
    case QMP_T_ENUM:
        return json_is_string(v);
    case QMP_T_INT:
    case QMP_T_UINT32:
    case QMP_T_SIZE:
        return json_is_integer(v);
    case QMP_T_NUMBER:
        return json_is_number(v);
    case QMP_T_BOOL:
        return json_is_boolean(v);
    case QMP_T_NULL:
        return json_is_null(v);
    case QMP_T_OBJECT:
        return json_is_object(v);
    case QMP_T_LIST:
        return json_is_array(v);
    case QMP_T_ALTERNATE:
        return false;
    }
    return false;
}

const QmpVariant *qmp_type_variant(const QmpType *t, const char *tag)
{
    if (!t->variants || !tag) {
        return NULL;
    }
    for (const QmpVariant *var = t->variants; var->tag; var++) {
        if (!strcmp(var->tag, tag)) {
            return var;
        }
    }
    return NULL;
}

static bool declared(const QmpMember *ms, const char *key)
{
    for (const QmpMember *m = ms; ms && m->name; m++) {
        if (!strcmp(m->name, key)) {
            return true;
        }
    }
    return false;
}

static int validate_members(const QmpMember *ms, json_t *obj, const char *path,
                            bool fill, LamError **errp)
{
    char sub[PATH_MAX_LEN];
    for (const QmpMember *m = ms; ms && m->name; m++) {
        json_t *mv = json_object_get(obj, m->name);
        join(sub, path, m->name);
        if (!mv) {
            if (!m->optional) {
                lam_error_setg(errp, "Parameter '%s' is missing", sub);
                return -1;
            }
            if (fill && m->def) {
                json_t *d = qmp_json_parse(m->def, NULL);
                if (d) {
                    json_object_set_new(obj, m->name, d);
                }
            }
            continue;
        }
        if (validate(m->type, mv, sub, m->name, fill, errp) < 0) {
            return -1;
        }
    }
    return 0;
}

static int validate_object(const QmpType *t, json_t *v, const char *path,
                           bool fill, LamError **errp)
{
    if (validate_members(t->members, v, path, fill, errp) < 0) {
        return -1;
    }
    const QmpVariant *var = NULL;
    if (t->discriminator) {
        var = qmp_type_variant(t, json_string_value(json_object_get(v, t->discriminator)));
        if (var && validate_members(var->members, v, path, fill, errp) < 0) {
            return -1;
        }
    }
    const char *key;
    json_t *mv;
    json_object_foreach(v, key, mv) {
        if (!declared(t->members, key) && !(var && declared(var->members, key))) {
            char sub[PATH_MAX_LEN];
            join(sub, path, key);
            lam_error_setg(errp, "Parameter '%s' is unexpected", sub);
            return -1;
        }
    }
    return 0;
}

static int type_error(const char *path, const char *expected, LamError **errp)
{
    lam_error_setg(errp, "Invalid parameter type for '%s', expected: %s",
                   path ? path : "null", expected);
    return -1;
}

static int validate(const QmpType *t, json_t *v, const char *path,
                    const char *leaf, bool fill, LamError **errp)
{
    switch (t->kind) {
    case QMP_T_ANY:
        return 0;
    case QMP_T_STR:
        return json_is_string(v) ? 0 : type_error(path, "string", errp);
    case QMP_T_INT:
        return json_is_integer(v) ? 0 : type_error(path, "integer", errp);
    case QMP_T_SIZE:
        if (!json_is_integer(v)) {
            return type_error(path, "integer", errp);
        }
        if (json_integer_value(v) < 0) {
            lam_error_setg(errp, "Parameter '%s' expects a non-negative number below 2^64",
                           path);
            return -1;
        }
        return 0;
    case QMP_T_UINT32:
        if (!json_is_integer(v)) {
            /* QEMU's unsigned visitor words its type error this way. */
            lam_error_setg(errp, "Parameter '%s' expects uint64", path);
            return -1;
        }
        /* Negative numbers wrap to huge unsigned ones in QEMU, so they
         * fail the range check rather than the type check. */
        if (json_integer_value(v) < 0 || json_integer_value(v) > UINT32_MAX) {
            lam_error_setg(errp, "Parameter '%s' expects uint32_t", path);
            return -1;
        }
        return 0;
    case QMP_T_BOOL:
        return json_is_boolean(v) ? 0 : type_error(path, "boolean", errp);
    case QMP_T_NUMBER:
        return json_is_number(v) ? 0 : type_error(path, "number", errp);
    case QMP_T_NULL:
        return json_is_null(v) ? 0 : type_error(path, "null", errp);
    case QMP_T_ENUM:
        if (!json_is_string(v)) {
            return type_error(path, "string", errp);
        }
        for (const char *const *e = t->values; *e; e++) {
            if (!strcmp(*e, json_string_value(v))) {
                return 0;
            }
        }
        /* QEMU names only the member here, and 'null' inside a list. */
        lam_error_setg(errp, "Parameter '%s' does not accept value '%s'",
                       leaf ? leaf : "null", json_string_value(v));
        return -1;
    case QMP_T_OBJECT:
        if (!json_is_object(v)) {
            return type_error(path, "object", errp);
        }
        return validate_object(t, v, path, fill, errp);
    case QMP_T_LIST:
        if (!json_is_array(v)) {
            return type_error(path, "array", errp);
        }
        for (size_t i = 0; i < json_array_size(v); i++) {
            char sub[PATH_MAX_LEN];
            snprintf(sub, sizeof(sub), "%s[%zu]", path ? path : "", i);
            if (validate(t->elem, json_array_get(v, i), sub, NULL, fill, errp) < 0) {
                return -1;
            }
        }
        return 0;
    case QMP_T_ALTERNATE:
        for (const QmpType *const *a = t->alts; *a; a++) {
            if (alt_matches(*a, v)) {
                return validate(*a, v, path, leaf, fill, errp);
            }
        }
        return type_error(path, t->name, errp);
    }
    return 0;
}

int qmp_validate(const QmpType *type, json_t *value, bool fill_defaults,
                 LamError **errp)
{
    return validate(type, value, NULL, NULL, fill_defaults, errp);
}
