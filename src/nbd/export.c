/* NBD export registry: block-export-add/del, query-block-exports.
 *
 * An export holds a node reference and a root edge ("an unnamed block
 * device": consistent-read, +write if writable; shares read, write and
 * write-unchanged but not resize, so the size stays fixed while exported).
 * Removal happens on the control thread: the export stops taking new
 * connections, its clients are disconnected (hard) after their in-flight
 * requests finish, then the root is detached and BLOCK_EXPORT_DELETED is
 * raised. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lamina/events.h"
#include "nbd/nbd-int.h"
#include "nbd/nbd-proto.h"

NbdExport *nbd_export_find_name_locked(const char *name)
{
    for (NbdExport *e = nbd_srv.exports; e; e = e->next) {
        if (strcmp(e->name, name) == 0) {
            return e;
        }
    }
    return NULL;
}

static NbdExport *find_id_locked(const char *id)
{
    for (NbdExport *e = nbd_srv.exports; e; e = e->next) {
        if (strcmp(e->id, id) == 0) {
            return e;
        }
    }
    return NULL;
}

void nbd_export_put(NbdExport *exp)
{
    pthread_mutex_lock(&nbd_srv.lock);
    exp->nconns--;
    pthread_cond_broadcast(&nbd_srv.cond);
    pthread_mutex_unlock(&nbd_srv.lock);
}

static void export_free(NbdExport *e)
{
    free(e->id);
    free(e->name);
    free(e->description);
    free(e);
}

int lam_nbd_export_add(const LamNbdExportOpts *o, LamError **errp)
{
    if (!nbd_srv.running) {
        lam_error_setg(errp, "NBD server not running");
        return -EINVAL;
    }
    if (!o->id || !o->node_name) {
        lam_error_setg(errp, "Parameter '%s' is missing", o->id ? "node-name" : "id");
        return -EINVAL;
    }
    pthread_mutex_lock(&nbd_srv.lock);
    bool dup_id = find_id_locked(o->id) != NULL;
    pthread_mutex_unlock(&nbd_srv.lock);
    if (dup_id) {
        lam_error_setg(errp, "Block export id '%s' is already in use", o->id);
        return -EEXIST;
    }
    LamNode *node = lam_node_find(o->node_name);
    if (!node) {
        lam_error_setg(errp, "Cannot find device='' nor node-name='%s'",
                       o->node_name);
        return -ENOENT;
    }
    if (o->writable && lam_node_is_read_only(node)) {
        lam_error_setg(errp, "Cannot export read-only node as writable");
        return -EPERM;
    }
    const char *name = o->name ? o->name : o->node_name;
    if (strlen(name) > NBD_MAX_STRING) {
        lam_error_setg(errp, "export name '%.64s...' too long", name);
        return -EINVAL;
    }
    if (o->description && strlen(o->description) > NBD_MAX_STRING) {
        lam_error_setg(errp, "description '%.64s...' too long", o->description);
        return -EINVAL;
    }
    pthread_mutex_lock(&nbd_srv.lock);
    bool dup_name = nbd_export_find_name_locked(name) != NULL;
    pthread_mutex_unlock(&nbd_srv.lock);
    if (dup_name) {
        lam_error_setg(errp, "NBD server already has export named '%s'", name);
        return -EEXIST;
    }

    int64_t size = lam_node_length(node);
    if (size < 0) {
        lam_error_setg_errno(errp, (int)size,
                             "Failed to determine the NBD export's length");
        return (int)size;
    }
    uint64_t perm = LAM_PERM_CONSISTENT_READ | (o->writable ? LAM_PERM_WRITE : 0);
    uint64_t shared = LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE |
                      LAM_PERM_WRITE_UNCHANGED;
    LamChild *root = lam_root_attach(node, "an unnamed block device", perm,
                                     shared, errp);
    if (!root) {
        return -EPERM;
    }

    NbdExport *e = calloc(1, sizeof(*e));
    if (!e) {
        lam_root_detach(root);
        lam_error_setg(errp, "Export '%s': out of memory", o->id);
        return -ENOMEM;
    }
    e->id = strdup(o->id);
    e->name = strdup(name);
    e->description = o->description ? strdup(o->description) : NULL;
    lam_node_ref(node);
    e->node = node;
    e->root = root;
    e->writable = o->writable;
    e->writethrough = o->writethrough;
    e->allocation_depth = o->allocation_depth;
    e->size = size;
    const LamLimits *bl = lam_node_limits(node);
    uint32_t pref = 4096;
    if (bl && bl->request_alignment > pref && bl->request_alignment <= 65536) {
        pref = bl->request_alignment;
    }
    e->pref_block = pref;

    pthread_mutex_lock(&nbd_srv.lock);
    NbdExport **pp = &nbd_srv.exports;
    while (*pp) {
        pp = &(*pp)->next;
    }
    *pp = e;
    pthread_mutex_unlock(&nbd_srv.lock);
    return 0;
}

/* Disconnects exp's clients, waits for them, unlinks it, releases the
 * node and reports BLOCK_EXPORT_DELETED.  Control thread only. */
static void export_remove(NbdExport *exp)
{
    pthread_mutex_lock(&nbd_srv.lock);
    exp->shutting_down = true;
    nbd_kick_conns_locked(exp);
    while (exp->nconns > 0) {
        pthread_cond_wait(&nbd_srv.cond, &nbd_srv.lock);
    }
    for (NbdExport **pp = &nbd_srv.exports; *pp; pp = &(*pp)->next) {
        if (*pp == exp) {
            *pp = exp->next;
            break;
        }
    }
    pthread_mutex_unlock(&nbd_srv.lock);

    lam_root_detach(exp->root);
    lam_node_unref(exp->node);
    json_t *data = json_pack("{s:s}", "id", exp->id);
    export_free(exp);
    lam_event_emit("BLOCK_EXPORT_DELETED", data);
}

int lam_nbd_export_del(const char *id, bool hard, LamError **errp)
{
    pthread_mutex_lock(&nbd_srv.lock);
    NbdExport *exp = find_id_locked(id);
    if (!exp) {
        pthread_mutex_unlock(&nbd_srv.lock);
        lam_error_setg(errp, "Export '%s' is not found", id);
        return -ENOENT;
    }
    if (!hard && exp->nconns > 0) {
        pthread_mutex_unlock(&nbd_srv.lock);
        lam_error_setg(errp, "export '%s' still in use", id);
        return -EBUSY;
    }
    /* Refuse new clients from now on, even before we get to removal. */
    exp->shutting_down = true;
    pthread_mutex_unlock(&nbd_srv.lock);
    export_remove(exp);
    return 0;
}

void nbd_export_remove_all(void)
{
    for (;;) {
        pthread_mutex_lock(&nbd_srv.lock);
        NbdExport *exp = nbd_srv.exports;
        pthread_mutex_unlock(&nbd_srv.lock);
        if (!exp) {
            return;
        }
        export_remove(exp);
    }
}

json_t *lam_nbd_query_exports(void)
{
    json_t *list = json_array();
    pthread_mutex_lock(&nbd_srv.lock);
    for (NbdExport *e = nbd_srv.exports; e; e = e->next) {
        json_array_append_new(list,
            json_pack("{s:s, s:s, s:s, s:b}", "type", "nbd", "id", e->id,
                      "node-name", lam_node_name(e->root->node), "shutting-down",
                      e->shutting_down));
    }
    pthread_mutex_unlock(&nbd_srv.lock);
    return list;
}

bool lam_nbd_node_exported(LamNode *bs, const char **export_id)
{
    bool found = false;
    pthread_mutex_lock(&nbd_srv.lock);
    for (NbdExport *e = nbd_srv.exports; e; e = e->next) {
        if (e->root->node == bs) {
            if (export_id) {
                *export_id = e->id; /* valid until the export goes away */
            }
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&nbd_srv.lock);
    return found;
}
