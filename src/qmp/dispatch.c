/* Command table and request dispatch (QEMU's dispatcher rules and error
 * strings: see docs/qmp.md). */
#include <stdlib.h>
#include <string.h>

#include "qmp/qmp.h"

struct QmpSession {
    bool negotiated;
    bool oob;
};

/* The command table.  Control thread only (registration happens at
 * startup, before clients connect). */
static const QmpCommandDef **cmds;
static size_t ncmds, capcmds;

void qmp_register(const QmpCommandDef *defs)
{
    for (const QmpCommandDef *d = defs; d->name; d++) {
        if (ncmds == capcmds) {
            capcmds = capcmds ? capcmds * 2 : 64;
            cmds = realloc(cmds, capcmds * sizeof(*cmds));
            if (!cmds) {
                abort();
            }
        }
        cmds[ncmds++] = d;
    }
}

const QmpCommandDef *qmp_find_command(const char *name)
{
    for (size_t i = 0; i < ncmds; i++) {
        if (!strcmp(cmds[i]->name, name)) {
            return cmds[i];
        }
    }
    return NULL;
}

void qmp_foreach_command(void (*fn)(const QmpCommandDef *d, void *opaque), void *opaque)
{
    for (size_t i = 0; i < ncmds; i++) {
        fn(cmds[i], opaque);
    }
}

QmpSession *qmp_session_new(void)
{
    QmpSession *s = calloc(1, sizeof(*s));
    if (!s) {
        abort();
    }
    return s;
}

void qmp_session_free(QmpSession *s)
{
    free(s);
}

bool qmp_session_negotiated(const QmpSession *s)
{
    return s->negotiated;
}

void qmp_session_set_negotiated(QmpSession *s, bool oob)
{
    s->negotiated = true;
    s->oob = oob;
}

static json_t *error_reply(json_t *id, const char *cls, const char *desc)
{
    json_t *r = json_object();
    if (id) {
        json_object_set(r, "id", id);
    }
    json_object_set_new(r, "error", json_pack("{s:s, s:s}", "class", cls, "desc", desc));
    return r;
}

static json_t *error_replyf(json_t *id, const char *cls, const char *fmt, const char *arg)
{
    LamError *err = NULL;
    lam_error_set(&err, cls, fmt, arg);
    json_t *r = error_reply(id, err->cls, err->msg);
    lam_error_free(err);
    return r;
}

json_t *qmp_dispatch(QmpSession *s, json_t *req)
{
    if (!json_is_object(req)) {
        return error_reply(NULL, LAM_ERR_GENERIC, "QMP input must be a JSON object");
    }
    json_t *id = json_object_get(req, "id");
    const char *key;
    json_t *v;
    json_object_foreach(req, key, v) {
        if (!strcmp(key, "execute") || (!strcmp(key, "exec-oob") && s->oob)) {
            if (!json_is_string(v)) {
                return error_replyf(id, LAM_ERR_GENERIC,
                                    "QMP input member '%s' must be a string", key);
            }
        } else if (!strcmp(key, "arguments")) {
            if (!json_is_object(v)) {
                return error_reply(id, LAM_ERR_GENERIC,
                                   "QMP input member 'arguments' must be an object");
            }
        } else if (strcmp(key, "id")) {
            return error_replyf(id, LAM_ERR_GENERIC,
                                "QMP input member '%s' is unexpected", key);
        }
    }
    json_t *exec = json_object_get(req, "execute");
    json_t *oob = s->oob ? json_object_get(req, "exec-oob") : NULL;
    if (exec && oob) {
        return error_reply(id, LAM_ERR_GENERIC,
                           "QMP input member 'exec-oob' is unexpected");
    }
    if (!exec && !oob) {
        return error_reply(id, LAM_ERR_GENERIC, "QMP input lacks member 'execute'");
    }
    const char *name = json_string_value(exec ? exec : oob);
    const QmpCommandDef *d = qmp_find_command(name);
    /* Before negotiation every other name, even an unknown one, gets the
     * same answer (checked against QEMU). */
    if (!s->negotiated && !(d && (d->flags & QMP_CMD_PRE_NEGOTIATION))) {
        return error_reply(id, LAM_ERR_COMMAND_NOT_FOUND,
                           "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
    if (!d) {
        return error_replyf(id, LAM_ERR_COMMAND_NOT_FOUND,
                            "The command %s has not been found", name);
    }
    if (oob) {
        return error_replyf(id, LAM_ERR_GENERIC,
                            "The command %s does not support OOB", name);
    }
    json_t *given = json_object_get(req, "arguments");
    json_t *args = given ? json_deep_copy(given) : json_object();
    LamError *err = NULL;
    if (d->args) {
        qmp_validate(d->args, args, !(d->flags & QMP_CMD_NO_DEFAULTS), &err);
    } else if (json_object_size(args)) {
        void *it = json_object_iter(args);
        lam_error_setg(&err, "Parameter '%s' is unexpected", json_object_iter_key(it));
    }
    json_t *ret = NULL;
    if (!err) {
        ret = d->fn(args, s, &err);
    }
    json_decref(args);
    if (err) {
        json_decref(ret);
        json_t *r = error_reply(id, err->cls ? err->cls : LAM_ERR_GENERIC, err->msg);
        lam_error_free(err);
        return r;
    }
    json_t *r = json_object();
    json_object_set_new(r, "return", ret ? ret : json_object());
    if (id) {
        json_object_set(r, "id", id);
    }
    return r;
}
