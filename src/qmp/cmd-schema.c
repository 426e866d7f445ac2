/* query-qmp-schema, generated from the same declarative descriptions the
 * dispatcher validates with.  Like QEMU, type names other than builtins
 * are masked as decimal strings; optional members carry "default": null;
 * enums list both "members" and (deprecated) "values".  Return types are
 * not described yet: every command reports "any". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/qmp.h"

typedef struct Seen {
    const void *key;   /* QmpType* or QmpVariant* */
    char name[48];
} Seen;

typedef struct Gen {
    json_t *out;
    Seen *seen;
    size_t nseen, cap;
    int next;
} Gen;

static const char *type_name(Gen *g, const QmpType *t);

static const char *lookup(Gen *g, const void *key)
{
    for (size_t i = 0; i < g->nseen; i++) {
        if (g->seen[i].key == key) {
            return g->seen[i].name;
        }
    }
    return NULL;
}

static const char *remember(Gen *g, const void *key)
{
    if (g->nseen == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 64;
        g->seen = realloc(g->seen, g->cap * sizeof(*g->seen));
        if (!g->seen) {
            abort();
        }
    }
    Seen *s = &g->seen[g->nseen++];
    s->key = key;
    snprintf(s->name, sizeof(s->name), "%d", g->next++);
    return s->name;
}

static json_t *members_json(Gen *g, const QmpMember *ms)
{
    json_t *l = json_array();
    for (const QmpMember *m = ms; ms && m->name; m++) {
        json_t *o = json_pack("{s:s, s:s}", "name", m->name, "type", type_name(g, m->type));
        if (m->optional) {
            json_object_set_new(o, "default", json_null());
        }
        json_array_append_new(l, o);
    }
    return l;
}

static const char *builtin(const QmpType *t, const char **json_type)
{
    switch (t->kind) {
    case QMP_T_ANY: *json_type = "value"; return "any";
    case QMP_T_STR: *json_type = "string"; return "str";
    case QMP_T_INT: *json_type = "int"; return "int";
    case QMP_T_SIZE: *json_type = "int"; return "int";
    case QMP_T_UINT32: *json_type = "int"; return "int";
    case QMP_T_BOOL: *json_type = "boolean"; return "bool";
    case QMP_T_NUMBER: *json_type = "number"; return "number";
    case QMP_T_NULL: *json_type = "null"; return "null";
    default: return NULL;
    }
}

static const char *type_name(Gen *g, const QmpType *t)
{
    const char *jt;
    const char *b = builtin(t, &jt);
    if (b) {
        if (!lookup(g, b)) {
            /* Builtins are keyed by their name so each is listed once. */
            if (g->nseen == g->cap) {
                g->cap = g->cap ? g->cap * 2 : 64;
                g->seen = realloc(g->seen, g->cap * sizeof(*g->seen));
                if (!g->seen) {
                    abort();
                }
            }
            Seen *s = &g->seen[g->nseen++];
            s->key = b;
            snprintf(s->name, sizeof(s->name), "%s", b);
            json_array_append_new(g->out, json_pack("{s:s, s:s, s:s}", "name", b,
                                  "meta-type", "builtin", "json-type", jt));
        }
        return b;
    }
    const char *name = lookup(g, t);
    if (name) {
        return name;
    }
    name = remember(g, t); /* before recursing: types may be recursive */
    size_t idx = g->nseen - 1; /* g->seen may move while recursing */
    json_t *o = json_pack("{s:s}", "name", name);
    json_array_append_new(g->out, o);
    switch (t->kind) {
    case QMP_T_ENUM: {
        json_t *ms = json_array(), *vs = json_array();
        for (const char *const *v = t->values; *v; v++) {
            json_array_append_new(ms, json_pack("{s:s}", "name", *v));
            json_array_append_new(vs, json_string(*v));
        }
        json_object_set_new(o, "meta-type", json_string("enum"));
        json_object_set_new(o, "members", ms);
        json_object_set_new(o, "values", vs);
        break;
    }
    case QMP_T_LIST: {
        /* QEMU names arrays after their element: "[elem]". */
        char elem[sizeof(g->seen[0].name) - 2];
        snprintf(elem, sizeof(elem), "%s", type_name(g, t->elem));
        snprintf(g->seen[idx].name, sizeof(g->seen[idx].name), "[%s]", elem);
        json_object_set_new(o, "name", json_string(g->seen[idx].name));
        json_object_set_new(o, "meta-type", json_string("array"));
        json_object_set_new(o, "element-type", json_string(elem));
        return g->seen[idx].name;
    }
    case QMP_T_ALTERNATE: {
        json_t *ms = json_array();
        for (const QmpType *const *a = t->alts; *a; a++) {
            json_array_append_new(ms, json_pack("{s:s}", "type", type_name(g, *a)));
        }
        json_object_set_new(o, "meta-type", json_string("alternate"));
        json_object_set_new(o, "members", ms);
        break;
    }
    case QMP_T_OBJECT: {
        json_object_set_new(o, "meta-type", json_string("object"));
        json_object_set_new(o, "members", members_json(g, t->members));
        if (t->discriminator) {
            json_t *vs = json_array();
            for (const QmpVariant *v = t->variants; v && v->tag; v++) {
                /* Copied: g->seen may move while the members are listed. */
                char vn[sizeof(g->seen[0].name)];
                const char *known = lookup(g, v);
                if (known) {
                    snprintf(vn, sizeof(vn), "%s", known);
                } else {
                    snprintf(vn, sizeof(vn), "%s", remember(g, v));
                    json_t *vo = json_pack("{s:s, s:s}", "name", vn, "meta-type", "object");
                    json_array_append_new(g->out, vo);
                    json_object_set_new(vo, "members", members_json(g, v->members));
                }
                json_array_append_new(vs, json_pack("{s:s, s:s}", "case", v->tag, "type", vn));
            }
            json_object_set_new(o, "tag", json_string(t->discriminator));
            json_object_set_new(o, "variants", vs);
        }
        break;
    }
    default:
        break;
    }
    return g->seen[idx].name;
}

static const QmpMember no_members[] = {{NULL}};
static const QmpType empty_args = {QMP_T_OBJECT, "object", no_members};
static const QmpMember export_deleted_members[] = {{"id", &qmp_t_str}, {NULL}};
static const QmpType export_deleted = {QMP_T_OBJECT, "object", export_deleted_members};

static void add_command(const QmpCommandDef *d, void *opaque)
{
    Gen *g = opaque;
    const char *arg = type_name(g, d->args ? d->args : &empty_args);
    json_t *c = json_pack("{s:s, s:s, s:s, s:s}", "name", d->name, "meta-type", "command",
                          "arg-type", arg, "ret-type", "any");
    json_array_append_new(g->out, c);
}

static json_t *cmd_query_qmp_schema(json_t *args, QmpSession *s, LamError **errp)
{
    Gen g = {json_array()};
    qmp_foreach_command(add_command, &g);
    json_array_append_new(g.out, json_pack("{s:s, s:s, s:s}", "name", "BLOCK_EXPORT_DELETED",
                          "meta-type", "event", "arg-type", type_name(&g, &export_deleted)));
    free(g.seen);
    return g.out;
}

static const QmpCommandDef schema_cmds[] = {
    {"query-qmp-schema", NULL, cmd_query_qmp_schema},
    {NULL},
};

void qmp_schema_init(void)
{
    qmp_register(schema_cmds);
}
