/* Node graph commands: blockdev-add, blockdev-del, query-named-block-nodes,
 * x-debug-query-block-graph; and the list of monitor-owned nodes.
 *
 * A node added by blockdev-add (or --blockdev) is owned by the monitor: we
 * hold the reference lam_node_open() returned until blockdev-del or
 * shutdown.  Children given inline belong to their parent. */
#include <stdlib.h>
#include <string.h>

#include "lamina/block.h"
#include "lamina/driver.h"
#include "qmp/blockdev-schema.h"
#include "qmp/json.h"
#include "qmp/qmp.h"

void qmp_blockdev_schema_init(void);

/* Monitor-owned nodes, in creation order.  Control thread only. */
static LamNode **owned;
static size_t nowned, capowned;

static bool is_owned(LamNode *bs, size_t *idx)
{
    for (size_t i = 0; i < nowned; i++) {
        if (owned[i] == bs) {
            if (idx) {
                *idx = i;
            }
            return true;
        }
    }
    return false;
}

/* QEMU's id rules: a letter first, then letters, digits, '-', '.', '_'. */
static bool name_wellformed(const char *s)
{
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z'))) {
        return false;
    }
    for (s++; *s; s++) {
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
              (*s >= '0' && *s <= '9') || *s == '-' || *s == '.' || *s == '_')) {
            return false;
        }
    }
    return true;
}

/* Checks what the schema can't, for a node and its inline children, in
 * the order QEMU opens them.  seen collects the names this request adds. */
static int check_node_opts(json_t *opts, json_t *seen, LamError **errp)
{
    const char *name = lam_opt_str(opts, "node-name", NULL);
    if (name) {
        if (!name_wellformed(name)) {
            lam_error_setg(errp, "Invalid node-name: '%s'", name);
            return -1;
        }
        if (lam_node_find(name) || json_object_get(seen, name)) {
            lam_error_setg(errp, "Duplicate nodes with node-name='%s'", name);
            return -1;
        }
        if (strlen(name) >= 32) {
            lam_error_setg(errp, "Node name too long");
            return -1;
        }
        json_object_set_new(seen, name, json_true());
    }
    if (json_is_true(json_object_get(opts, "force-share")) &&
        !json_is_true(json_object_get(opts, "read-only"))) {
        lam_error_setg(errp, "force-share=on can only be used with read-only images");
        return -1;
    }
    const char *dz = lam_opt_str(opts, "detect-zeroes", "off");
    if (!strcmp(dz, "unmap") && strcmp(lam_opt_str(opts, "discard", "ignore"), "unmap")) {
        lam_error_setg(errp, "setting detect-zeroes to unmap is not allowed without "
                       "setting discard operation to unmap");
        return -1;
    }
    const char *key;
    json_t *v;
    json_object_foreach(opts, key, v) {
        if (json_is_object(v) && json_object_get(v, "driver") &&
            check_node_opts(v, seen, errp) < 0) {
            return -1;
        }
    }
    return 0;
}

static int open_flags_for(json_t *opts)
{
    int flags = 0;
    if (!json_is_true(json_object_get(opts, "read-only"))) {
        flags |= LAM_O_RDWR;
    }
    json_t *cache = json_object_get(opts, "cache");
    if (json_is_true(json_object_get(cache, "direct"))) {
        flags |= LAM_O_NOCACHE;
    }
    if (json_is_true(json_object_get(cache, "no-flush"))) {
        flags |= LAM_O_NO_FLUSH;
    }
    if (json_is_true(json_object_get(opts, "force-share"))) {
        flags |= LAM_O_FORCE_SHARE;
    }
    return flags;
}

static int blockdev_add_checked(json_t *opts, LamError **errp)
{
    if (!json_is_string(json_object_get(opts, "node-name"))) {
        lam_error_setg(errp, "'node-name' must be specified for the root node");
        return -1;
    }
    json_t *seen = json_object();
    int r = check_node_opts(opts, seen, errp);
    json_decref(seen);
    if (r < 0) {
        return -1;
    }
    LamNode *bs = lam_node_open(opts, open_flags_for(opts), errp);
    if (!bs) {
        return -1;
    }
    if (nowned == capowned) {
        capowned = capowned ? capowned * 2 : 16;
        owned = realloc(owned, capowned * sizeof(*owned));
        if (!owned) {
            abort();
        }
    }
    owned[nowned++] = bs;
    return 0;
}

int qmp_blockdev_add(json_t *opts, LamError **errp)
{
    if (qmp_validate(&qmp_blockdev_options, opts, false, errp) < 0) {
        return -1;
    }
    return blockdev_add_checked(opts, errp);
}

static json_t *cmd_blockdev_add(json_t *args, QmpSession *s, LamError **errp)
{
    blockdev_add_checked(args, errp);
    return NULL;
}

/* "backup job 'j0'" -> "backup"; NULL if the user is not a job. */
static char *job_type_of(const char *user)
{
    const char *p = user ? strstr(user, " job '") : NULL;
    if (!p) {
        return NULL;
    }
    return strndup(user, (size_t)(p - user));
}

static json_t *cmd_blockdev_del(json_t *args, QmpSession *s, LamError **errp)
{
    const char *name = json_string_value(json_object_get(args, "node-name"));
    LamNode *bs = lam_node_find(name);
    size_t idx;
    if (!bs) {
        lam_error_setg(errp, "Failed to find node with node-name='%s'", name);
        return NULL;
    }
    if (!is_owned(bs, &idx)) {
        lam_error_setg(errp, "Node %s is not owned by the monitor", name);
        return NULL;
    }
    for (LamChild *c = lam_node_parents(bs); c; c = c->next_parent) {
        char *job = c->parent ? NULL : job_type_of(c->user);
        if (job) {
            lam_error_setg(errp, "Node '%s' is busy: block device is in use by block job: %s",
                           name, job);
            free(job);
            return NULL;
        }
    }
    for (LamChild *c = lam_node_parents(bs); c; c = c->next_parent) {
        if (!c->parent) {
            lam_error_setg(errp, "Node %s is in use", name);
            return NULL;
        }
    }
    for (LamChild *c = lam_node_parents(bs); c; c = c->next_parent) {
        if (c->parent && lam_node_backing(c->parent) == c) {
            lam_error_setg(errp, "Node '%s' is busy: node is used as backing hd of '%s'",
                           name, lam_node_name(c->parent));
            return NULL;
        }
    }
    if (lam_node_parents(bs)) {
        lam_error_setg(errp, "Block device %s is in use", name);
        return NULL;
    }
    memmove(&owned[idx], &owned[idx + 1], (nowned - idx - 1) * sizeof(*owned));
    nowned--;
    lam_node_flush_all(bs);
    lam_node_unref(bs);
    return NULL;
}

void qmp_block_close_all(void)
{
    /* Newest first: later nodes may reference earlier ones. */
    while (nowned) {
        LamNode *bs = owned[--nowned];
        lam_node_flush_all(bs);
        lam_node_unref(bs);
    }
    free(owned);
    owned = NULL;
    capowned = 0;
}

/* ---- query-named-block-nodes ---- */

/* What "file"/"filename" show: the image path, or QEMU's json: pseudo
 * filename built from the options that define the node's content. */
static char *display_filename(LamNode *bs)
{
    const char *fn = lam_node_filename(bs);
    if (fn && *fn) {
        return strdup(fn);
    }
    static const char *const runtime[] = {
        "node-name", "read-only", "auto-read-only", "force-share", "cache",
        "discard", "detect-zeroes", "latency-ns", NULL,
    };
    json_t *o = json_deep_copy(lam_node_options(bs));
    if (!json_is_object(o)) {
        json_decref(o);
        o = json_pack("{s:s}", "driver", lam_node_format(bs));
    }
    for (const char *const *k = runtime; *k; k++) {
        json_object_del(o, *k);
    }
    char *s = qmp_json_dumps(o);
    json_decref(o);
    char *out = malloc(strlen(s) + 6);
    if (!out) {
        abort();
    }
    strcpy(out, "json:");
    strcat(out, s);
    free(s);
    return out;
}

static json_t *image_info(LamNode *bs, bool flat)
{
    json_t *img = json_object();
    char *fn = display_filename(bs);
    int64_t len = lam_node_length(bs);
    json_object_set_new(img, "virtual-size", json_integer(len < 0 ? 0 : len));
    json_object_set_new(img, "filename", json_string(fn));
    json_object_set_new(img, "format", json_string(lam_node_format(bs)));
    /* Nodes with no host storage (null-co) report 0, as in QEMU. */
    int64_t alloc = lam_node_allocated_size(bs);
    json_object_set_new(img, "actual-size", json_integer(alloc < 0 ? 0 : alloc));
    /* QEMU shows dirty-flag for every driver that answers get_info, which
     * is all of ours except null-co. */
    if (lam_node_get_info(bs, img, NULL) == 0 &&
        strncmp(lam_node_format(bs), "null-", 5) &&
        !json_object_get(img, "dirty-flag")) {
        json_object_set_new(img, "dirty-flag", json_false());
    }
    const char *bf = lam_node_backing_file(bs);
    if (bf) {
        json_object_set_new(img, "backing-filename", json_string(bf));
        char *full = lam_path_combine(lam_node_filename(bs), bf);
        if (full) {
            json_object_set_new(img, "full-backing-filename", json_string(full));
            free(full);
        }
        const char *bfmt = lam_node_backing_format(bs);
        if (bfmt) {
            json_object_set_new(img, "backing-filename-format", json_string(bfmt));
        }
    }
    LamChild *b = lam_node_backing(bs);
    if (!flat && b && b->node) {
        json_object_set_new(img, "backing-image", image_info(b->node, false));
    }
    free(fn);
    return img;
}

typedef struct NodesCtx {
    json_t *list;
    bool flat;
} NodesCtx;

static void add_node_info(LamNode *bs, void *opaque)
{
    NodesCtx *ctx = opaque;
    json_t *o = json_object();
    char *fn = display_filename(bs);
    json_object_set_new(o, "file", json_string(fn));
    free(fn);
    json_object_set_new(o, "node-name", json_string(lam_node_name(bs)));
    json_object_set_new(o, "ro", json_boolean(lam_node_is_read_only(bs)));
    json_object_set_new(o, "drv", json_string(lam_node_format(bs)));
    LamChild *b = lam_node_backing(bs);
    if (b && b->node) {
        char *bfn = display_filename(b->node);
        json_object_set_new(o, "backing_file", json_string(bfn));
        free(bfn);
    } else if (lam_node_backing_file(bs)) {
        char *full = lam_path_combine(lam_node_filename(bs), lam_node_backing_file(bs));
        json_object_set_new(o, "backing_file", json_string(full ? full : lam_node_backing_file(bs)));
        free(full);
    }
    int depth = 0;
    /* QEMU quirk kept: flat listings report depth 0. */
    for (LamChild *c = b; !ctx->flat && c && c->node; c = lam_node_backing(c->node)) {
        depth++;
    }
    json_object_set_new(o, "backing_file_depth", json_integer(depth));
    json_object_set_new(o, "encrypted", json_false());
    json_t *opts = lam_node_options(bs);
    json_object_set_new(o, "detect_zeroes",
                        json_string(lam_opt_str(opts, "detect-zeroes", "off")));
    static const char *const throttle[] = {"bps", "bps_rd", "bps_wr", "iops", "iops_rd",
                                           "iops_wr", NULL};
    for (const char *const *k = throttle; *k; k++) {
        json_object_set_new(o, *k, json_integer(0));
    }
    json_object_set_new(o, "image", image_info(bs, ctx->flat));
    json_object_set_new(o, "cache", json_pack("{s:b, s:b, s:b}", "writeback", 1,
                        "direct", !!(bs->open_flags & LAM_O_NOCACHE),
                        "no-flush", !!(bs->open_flags & LAM_O_NO_FLUSH)));
    json_object_set_new(o, "write_threshold", json_integer(0));
    json_array_append_new(ctx->list, o);
}

static json_t *cmd_query_named_block_nodes(json_t *args, QmpSession *s, LamError **errp)
{
    NodesCtx ctx = {json_array(), json_is_true(json_object_get(args, "flat"))};
    lam_node_foreach(add_node_info, &ctx);
    return ctx.list;
}

/* ---- x-debug-query-block-graph ---- */

typedef struct GraphCtx {
    LamNode **nodes;
    size_t n, cap;
} GraphCtx;

static void collect(LamNode *bs, void *opaque)
{
    GraphCtx *g = opaque;
    if (g->n == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 32;
        g->nodes = realloc(g->nodes, g->cap * sizeof(*g->nodes));
        if (!g->nodes) {
            abort();
        }
    }
    g->nodes[g->n++] = bs;
}

static json_int_t node_id(GraphCtx *g, LamNode *bs)
{
    for (size_t i = 0; i < g->n; i++) {
        if (g->nodes[i] == bs) {
            return (json_int_t)i + 1;
        }
    }
    return 0;
}

static json_t *perm_list(uint64_t perm)
{
    /* QEMU lists the highest permission first. */
    static const char *const names[] = {"consistent-read", "write", "write-unchanged", "resize"};
    json_t *l = json_array();
    for (int i = 3; i >= 0; i--) {
        if (perm & (1u << i)) {
            json_array_append_new(l, json_string(names[i]));
        }
    }
    return l;
}

static json_t *edge(json_int_t parent, json_int_t child, LamChild *c)
{
    return json_pack("{s:I, s:I, s:s, s:o, s:o}", "parent", parent, "child", child,
                     "name", c->name ? c->name : "", "perm", perm_list(c->perm),
                     "shared-perm", perm_list(c->shared));
}

static json_t *cmd_x_debug_query_block_graph(json_t *args, QmpSession *s, LamError **errp)
{
    GraphCtx g = {0};
    lam_node_foreach(collect, &g);
    json_t *nodes = json_array(), *edges = json_array();
    json_int_t next_id = (json_int_t)g.n + 1;
    for (size_t i = 0; i < g.n; i++) {
        LamNode *bs = g.nodes[i];
        json_array_append_new(nodes, json_pack("{s:I, s:s, s:s}", "id", (json_int_t)i + 1,
                              "type", "block-driver", "name", lam_node_name(bs)));
        for (LamChild *c = lam_node_next_child(bs, NULL); c; c = lam_node_next_child(bs, c)) {
            json_int_t cid = node_id(&g, c->node);
            if (cid) {
                json_array_append_new(edges, edge((json_int_t)i + 1, cid, c));
            }
        }
        for (LamChild *c = lam_node_parents(bs); c; c = c->next_parent) {
            if (c->parent) {
                continue;
            }
            /* A root user: an export's or a job's block backend. */
            json_int_t id = next_id++;
            const char *q = c->user ? strstr(c->user, " job '") : NULL;
            if (q) {
                char *jid = strdup(q + 6);
                char *end = strchr(jid, '\'');
                if (end) {
                    *end = '\0';
                }
                json_array_append_new(nodes, json_pack("{s:I, s:s, s:s}", "id", id,
                                      "type", "block-job", "name", jid));
                free(jid);
            } else {
                json_array_append_new(nodes, json_pack("{s:I, s:s, s:s}", "id", id,
                                      "type", "block-backend", "name", ""));
            }
            json_array_append_new(edges, edge(id, (json_int_t)i + 1, c));
        }
    }
    free(g.nodes);
    return json_pack("{s:o, s:o}", "nodes", nodes, "edges", edges);
}

static const QmpMember del_members[] = {{"node-name", &qmp_t_str}, {NULL}};
static const QmpType del_args = {QMP_T_OBJECT, "object", del_members};
static const QmpMember query_nodes_members[] = {{"flat", &qmp_t_bool, true, "false"}, {NULL}};
static const QmpType query_nodes_args = {QMP_T_OBJECT, "object", query_nodes_members};

static const QmpCommandDef block_cmds[] = {
    {"blockdev-add", &qmp_blockdev_options, cmd_blockdev_add, QMP_CMD_NO_DEFAULTS},
    {"blockdev-del", &del_args, cmd_blockdev_del},
    {"query-named-block-nodes", &query_nodes_args, cmd_query_named_block_nodes},
    {"x-debug-query-block-graph", NULL, cmd_x_debug_query_block_graph},
    {NULL},
};

void qmp_block_init(void)
{
    qmp_blockdev_schema_init();
    qmp_register(block_cmds);
}
