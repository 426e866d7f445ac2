/* keyval parsing and schema-driven conversion (see keyval.h). */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/keyval.h"

static bool key_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '_';
}

/* Stores value at the dotted key path inside root. */
static int put(json_t *root, const char *key, json_t *value, LamError **errp)
{
    char *k = strdup(key);
    json_t *obj = root;
    char *seg = k, *dot;
    int ret = -1;
    while ((dot = strchr(seg, '.'))) {
        *dot = '\0';
        json_t *sub = json_object_get(obj, seg);
        if (!sub) {
            sub = json_object();
            json_object_set_new(obj, seg, sub);
        } else if (!json_is_object(sub)) {
            lam_error_setg(errp, "Parameter '%s' used inconsistently", key);
            goto out;
        }
        obj = sub;
        seg = dot + 1;
    }
    /* A repeated key: the last one wins, as in QEMU. */
    if (json_is_object(json_object_get(obj, seg))) {
        lam_error_setg(errp, "Parameter '%s' used inconsistently", key);
        goto out;
    }
    json_object_set(obj, seg, value);
    ret = 0;
out:
    free(k);
    return ret;
}

static json_t *split(const char *s, LamError **errp)
{
    json_t *root = json_object();
    const char *p = s;
    while (*p) {
        const char *kstart = p;
        while (key_char(*p) || *p == '.') {
            p++;
        }
        size_t klen = (size_t)(p - kstart);
        if (!klen || kstart[0] == '.' || kstart[klen - 1] == '.' ||
            memmem(kstart, klen, "..", 2)) {
            lam_error_setg(errp, "Invalid parameter '%.*s'", (int)strcspn(kstart, "=,"), kstart);
            goto fail;
        }
        if (*p != '=') {
            lam_error_setg(errp, "Expected '=' after parameter '%.*s'", (int)klen, kstart);
            goto fail;
        }
        p++;
        char *val = malloc(strlen(p) + 1);
        size_t n = 0;
        while (*p) {
            if (*p == ',') {
                if (p[1] != ',') {
                    break;
                }
                p++;
            }
            val[n++] = *p++;
        }
        val[n] = '\0';
        if (*p == ',') {
            p++;
        }
        char *key = strndup(kstart, klen);
        json_t *v = json_string(val);
        int r = v ? put(root, key, v, errp) : -1;
        if (!v) {
            lam_error_setg(errp, "Parameter '%s' is not valid UTF-8", key);
        }
        json_decref(v);
        free(key);
        free(val);
        if (r < 0) {
            goto fail;
        }
    }
    return root;
fail:
    json_decref(root);
    return NULL;
}

static json_t *to_bool(const char *s)
{
    if (!strcmp(s, "on") || !strcmp(s, "yes") || !strcmp(s, "true") || !strcmp(s, "y")) {
        return json_true();
    }
    if (!strcmp(s, "off") || !strcmp(s, "no") || !strcmp(s, "false") || !strcmp(s, "n")) {
        return json_false();
    }
    return NULL;
}

/* Decimal, octal or hex; no size suffixes (our int members are QAPI
 * 'int', which QEMU's keyval parses without them). */
static json_t *to_int(const char *s)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (end == s || *end || errno) {
        return NULL;
    }
    return json_integer(v);
}

static int convert(const QmpType *t, json_t *parent, const char *key, const char *path,
                   LamError **errp);

static int convert_members(const QmpMember *ms, json_t *obj, const char *path, LamError **errp)
{
    for (const QmpMember *m = ms; ms && m->name; m++) {
        if (json_object_get(obj, m->name)) {
            char sub[1024];
            snprintf(sub, sizeof(sub), "%s%s%s", path, *path ? "." : "", m->name);
            if (convert(m->type, obj, m->name, sub, errp) < 0) {
                return -1;
            }
        }
    }
    return 0;
}

/* Converts parent[key] in place to what t expects.  Strings that can't be
 * converted get QEMU's keyval wording; members of other shapes are left
 * for the validator to report. */
static int convert(const QmpType *t, json_t *parent, const char *key, const char *path,
                   LamError **errp)
{
    json_t *v = json_object_get(parent, key);
    switch (t->kind) {
    case QMP_T_BOOL:
        if (json_is_string(v)) {
            json_t *b = to_bool(json_string_value(v));
            if (!b) {
                lam_error_setg(errp, "Parameter '%s' expects 'on' or 'off'", path);
                return -1;
            }
            json_object_set_new(parent, key, b);
        }
        return 0;
    case QMP_T_INT:
    case QMP_T_SIZE:
    case QMP_T_UINT32:
    case QMP_T_NUMBER:
        if (json_is_string(v)) {
            json_t *i = to_int(json_string_value(v));
            if (!i) {
                lam_error_setg(errp, "Parameter '%s' expects integer", path);
                return -1;
            }
            json_object_set_new(parent, key, i);
        }
        return 0;
    case QMP_T_OBJECT:
        if (json_is_object(v)) {
            if (convert_members(t->members, v, path, errp) < 0) {
                return -1;
            }
            if (t->discriminator) {
                const QmpVariant *var = qmp_type_variant(
                    t, json_string_value(json_object_get(v, t->discriminator)));
                if (var && convert_members(var->members, v, path, errp) < 0) {
                    return -1;
                }
            }
        }
        return 0;
    case QMP_T_ALTERNATE:
        /* An object takes the object branch; the string "null" is null
         * where null is allowed; other strings stay strings (references,
         * enum values). */
        for (const QmpType *const *a = t->alts; *a; a++) {
            if (json_is_object(v) && (*a)->kind == QMP_T_OBJECT) {
                return convert(*a, parent, key, path, errp);
            }
            if (json_is_string(v) && (*a)->kind == QMP_T_NULL &&
                !strcmp(json_string_value(v), "null")) {
                json_object_set_new(parent, key, json_null());
                return 0;
            }
        }
        return 0;
    default:
        return 0;
    }
}

json_t *qmp_keyval_parse(const char *text, const QmpType *type, LamError **errp)
{
    json_t *obj = split(text, errp);
    if (!obj) {
        return NULL;
    }
    json_t *holder = json_pack("{s:o}", "v", obj);
    int r = convert(type, holder, "v", "", errp);
    obj = r < 0 ? NULL : json_incref(json_object_get(holder, "v"));
    json_decref(holder);
    return obj;
}
