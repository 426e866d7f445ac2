/* Nodes and edges: opening from blockdev-add options, the node-name
 * registry, backing chains, references and teardown.  Control thread only
 * (see include/lamina/block.h). */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block/block-int.h"

/* Backing chains longer than this are refused: a hostile image could name
 * itself (or a loop of images) as its backing file. */
#define MAX_BACKING_DEPTH 256

/* Registry of every open node, in creation order.  Control thread only. */
static LamNode *reg_head, *reg_tail;
static uint64_t next_serial;
static __thread int backing_depth;

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p) {
        abort();
    }
    return p;
}

LamNode *lam_node_find(const char *name)
{
    if (!name || !*name) {
        return NULL;
    }
    for (LamNode *bs = reg_head; bs; bs = bs->reg_next) {
        if (!strcmp(bs->node_name, name)) {
            return bs;
        }
    }
    return NULL;
}

void lam_node_foreach(void (*fn)(LamNode *bs, void *opaque), void *opaque)
{
    LamNode *next;
    for (LamNode *bs = reg_head; bs; bs = next) {
        next = bs->reg_next;
        fn(bs, opaque);
    }
}

static void registry_add(LamNode *bs)
{
    bs->reg_next = NULL;
    if (reg_tail) {
        reg_tail->reg_next = bs;
    } else {
        reg_head = bs;
    }
    reg_tail = bs;
}

static void registry_remove(LamNode *bs)
{
    LamNode *prev = NULL;
    for (LamNode *p = reg_head; p; prev = p, p = p->reg_next) {
        if (p == bs) {
            if (prev) {
                prev->reg_next = p->reg_next;
            } else {
                reg_head = p->reg_next;
            }
            if (reg_tail == p) {
                reg_tail = prev;
            }
            return;
        }
    }
}

/* QEMU's rule: starts with a letter, then letters, digits, '-', '.', '_';
 * at most 31 characters. */
static bool node_name_valid(const char *name)
{
    if (!isalpha((unsigned char)name[0]) || strlen(name) > 31) {
        return false;
    }
    for (const char *p = name; *p; p++) {
        if (!isalnum((unsigned char)*p) && !strchr("-._", *p)) {
            return false;
        }
    }
    return true;
}

int lam_node_set_name(LamNode *bs, const char *name, LamError **errp)
{
    if (!node_name_valid(name)) {
        lam_error_setg(errp, "Invalid node-name: '%s'", name);
        return -EINVAL;
    }
    LamNode *other = lam_node_find(name);
    if (other && other != bs) {
        lam_error_setg(errp, "Duplicate nodes with node-name='%s'", name);
        return -EEXIST;
    }
    free(bs->node_name);
    bs->node_name = strdup(name);
    bs->named = true;
    return 0;
}

/* ---- accessors ---- */
const char *lam_node_name(const LamNode *bs) { return bs->node_name; }
const char *lam_node_filename(const LamNode *bs) { return bs->filename ? bs->filename : ""; }
const LamDriver *lam_node_driver(const LamNode *bs) { return bs->drv; }
const char *lam_node_format(const LamNode *bs) { return bs->drv->name; }
bool lam_node_is_read_only(const LamNode *bs) { return bs->read_only; }
const char *lam_node_backing_file(const LamNode *bs) { return bs->backing_file; }
const char *lam_node_backing_format(const LamNode *bs) { return bs->backing_format; }
const LamLimits *lam_node_limits(const LamNode *bs) { return &bs->bl; }
json_t *lam_node_options(const LamNode *bs) { return bs->options; }
LamChild *lam_node_parents(const LamNode *bs) { return bs->parents; }
int lam_node_in_flight(LamNode *bs) { return atomic_load(&bs->in_flight); }

LamChild *lam_node_child(const LamNode *bs, const char *name)
{
    for (int i = 0; i < bs->nchildren; i++) {
        if (!strcmp(bs->children[i]->name, name)) {
            return bs->children[i];
        }
    }
    return NULL;
}

LamChild *lam_node_file(const LamNode *bs) { return lam_node_child(bs, "file"); }
LamChild *lam_node_backing(const LamNode *bs) { return lam_node_child(bs, "backing"); }

LamChild *lam_node_next_child(const LamNode *bs, LamChild *prev)
{
    if (!prev) {
        return bs->nchildren ? bs->children[0] : NULL;
    }
    for (int i = 0; i + 1 < bs->nchildren; i++) {
        if (bs->children[i] == prev) {
            return bs->children[i + 1];
        }
    }
    return NULL;
}

LamNode *lam_node_backing_node(const LamNode *bs)
{
    LamChild *c = NULL;
    if (bs->drv->kind == LAM_DRV_FORMAT) {
        c = lam_node_backing(bs);
    } else if (bs->drv->kind == LAM_DRV_FILTER) {
        c = lam_node_file(bs);
        if (!c) {
            c = lam_node_child(bs, "filtered");
        }
    }
    return c ? c->node : NULL;
}

int64_t lam_node_length(LamNode *bs)
{
    if (bs->drv->get_length) {
        return bs->drv->get_length(bs);
    }
    return atomic_load(&bs->total_size);
}

int64_t lam_node_allocated_size(LamNode *bs)
{
    if (bs->drv->get_allocated_size) {
        return bs->drv->get_allocated_size(bs);
    }
    /* Default: what the storage children use. */
    int64_t sum = 0;
    bool any = false;
    for (int i = 0; i < bs->nchildren; i++) {
        LamChild *c = bs->children[i];
        if (!strcmp(c->name, "backing")) {
            continue;
        }
        int64_t n = lam_node_allocated_size(c->node);
        if (n >= 0) {
            sum += n;
            any = true;
        }
    }
    return any ? sum : -ENOTSUP;
}

/* ---- edges ---- */

/* True if `target` is `from` or below it: attaching from under target
 * would then make a cycle. */
static bool node_reaches(LamNode *from, LamNode *target)
{
    if (from == target) {
        return true;
    }
    for (int i = 0; i < from->nchildren; i++) {
        if (node_reaches(from->children[i]->node, target)) {
            return true;
        }
    }
    return false;
}

static void child_link(LamNode *parent, LamChild *c)
{
    if (parent) {
        parent->children = realloc(parent->children,
                                   sizeof(LamChild *) * (size_t)(parent->nchildren + 1));
        if (!parent->children) {
            abort();
        }
        parent->children[parent->nchildren++] = c;
    }
    c->next_parent = c->node->parents;
    c->node->parents = c;
}

static void child_unlink(LamChild *c)
{
    LamNode *parent = c->parent;
    if (parent) {
        for (int i = 0; i < parent->nchildren; i++) {
            if (parent->children[i] == c) {
                memmove(&parent->children[i], &parent->children[i + 1],
                        sizeof(LamChild *) * (size_t)(parent->nchildren - i - 1));
                parent->nchildren--;
                break;
            }
        }
    }
    for (LamChild **pp = &c->node->parents; *pp; pp = &(*pp)->next_parent) {
        if (*pp == c) {
            *pp = c->next_parent;
            break;
        }
    }
}

static LamChild *attach(LamNode *parent, LamNode *child, const char *name,
                        const char *user, uint64_t perm, uint64_t shared,
                        LamError **errp)
{
    char ubuf[256];
    if (parent) {
        snprintf(ubuf, sizeof(ubuf), "node '%s'", parent->node_name);
        user = ubuf;
    }
    if (lam_perm_check(child, NULL, perm, shared, name, user, errp) < 0) {
        return NULL;
    }
    LamChild *c = xcalloc(1, sizeof(*c));
    c->name = strdup(name);
    c->node = child;
    c->parent = parent;
    c->user = parent ? NULL : strdup(user);
    c->perm = perm;
    c->shared = shared;
    lam_node_ref(child);
    child_link(parent, c);
    return c;
}

LamChild *lam_attach_child(LamNode *parent, LamNode *child, const char *name,
                           LamError **errp)
{
    uint64_t perm, shared;
    lam_default_child_perm(parent, name, &perm, &shared);
    if (parent->drv->child_perm) {
        parent->drv->child_perm(parent, NULL, perm, shared, &perm, &shared);
    }
    /* A read-only child can't give write access. */
    if (child->read_only) {
        perm &= ~(uint64_t)(LAM_PERM_WRITE | LAM_PERM_RESIZE);
    }
    if (node_reaches(child, parent)) {
        lam_error_setg(errp, "Making '%s' a %s child of '%s' would create a cycle",
                       child->node_name, name, parent->node_name);
        return NULL;
    }
    return attach(parent, child, name, NULL, perm, shared, errp);
}

void lam_detach_child(LamChild *c)
{
    if (!c) {
        return;
    }
    LamNode *child = c->node;
    child_unlink(c);
    free(c->name);
    free(c->user);
    free(c);
    lam_node_unref(child);
}

LamChild *lam_root_attach(LamNode *bs, const char *user, uint64_t perm,
                          uint64_t shared, LamError **errp)
{
    if ((perm & (LAM_PERM_WRITE | LAM_PERM_RESIZE)) && bs->read_only) {
        lam_error_setg(errp, "Block node '%s' is read-only", bs->node_name);
        return NULL;
    }
    return attach(NULL, bs, "root", user ? user : "an unnamed block device",
                  perm, shared, errp);
}

void lam_root_detach(LamChild *root)
{
    lam_detach_child(root);
}

int lam_child_set_perm(LamChild *c, uint64_t perm, uint64_t shared,
                       LamError **errp)
{
    char ubuf[256];
    lam_child_user(c, ubuf, sizeof(ubuf));
    int ret = lam_perm_check(c->node, c, perm, shared, c->name, ubuf, errp);
    if (ret == 0) {
        c->perm = perm;
        c->shared = shared;
    }
    return ret;
}

int lam_node_replace(LamNode *from, LamNode *to, LamError **errp)
{
    /* Collect the edges to move first: moving edits from->parents. */
    int n = 0;
    for (LamChild *c = from->parents; c; c = c->next_parent) {
        n++;
    }
    LamChild **move = xcalloc((size_t)n + 1, sizeof(*move));
    int m = 0;
    for (LamChild *c = from->parents; c; c = c->next_parent) {
        /* Edges of nodes below `to` stay: moving them would make a cycle
         * (e.g. a fleecing target backed by the source, under the cbw
         * filter that is being inserted above the source). */
        if (c->parent != to && !(c->parent && node_reaches(to, c->parent))) {
            move[m++] = c;
        }
    }
    for (int i = 0; i < m; i++) {
        char ubuf[256];
        lam_child_user(move[i], ubuf, sizeof(ubuf));
        if (lam_perm_check(to, NULL, move[i]->perm, move[i]->shared, move[i]->name,
                           ubuf, errp) < 0) {
            free(move);
            return -EPERM;
        }
    }
    for (int i = 0; i < m; i++) {
        LamChild *c = move[i];
        /* Same edge object (drivers keep pointers to their edges); only
         * its node and the nodes' parent lists change. */
        for (LamChild **pp = &from->parents; *pp; pp = &(*pp)->next_parent) {
            if (*pp == c) {
                *pp = c->next_parent;
                break;
            }
        }
        c->node = to;
        c->next_parent = to->parents;
        to->parents = c;
        lam_node_ref(to);
        lam_node_unref(from);
    }
    free(move);
    return 0;
}

/* ---- opening ---- */

static int child_flags(LamNode *parent, json_t *child_opts, bool backing)
{
    int flags = parent->open_flags;
    if (backing || parent->read_only) {
        flags &= ~LAM_O_RDWR;
    }
    (void)child_opts;
    return flags & ~LAM_O_NO_BACKING;
}

LamChild *lam_open_child(LamNode *parent, json_t *opts, const char *name,
                         bool allow_none, LamError **errp)
{
    json_t *v = opts ? json_object_get(opts, name) : NULL;
    if (!v || json_is_null(v)) {
        if (!allow_none) {
            lam_error_setg(errp, "Parameter '%s' is missing", name);
        }
        return NULL;
    }
    bool backing = !strcmp(name, "backing");
    if (json_is_string(v)) {
        LamNode *child = lam_node_find(json_string_value(v));
        if (!child) {
            /* QEMU looks a child reference up as both device and node
             * name, and says so (checked against qemu-storage-daemon). */
            lam_error_setg(errp, "Cannot find device='%s' nor node-name='%s'",
                           json_string_value(v), json_string_value(v));
            return NULL;
        }
        if (!backing && !parent->read_only && child->read_only) {
            lam_error_setg(errp, "Block node '%s' is read-only", child->node_name);
            return NULL;
        }
        return lam_attach_child(parent, child, name, errp);
    }
    if (!json_is_object(v)) {
        lam_error_setg(errp, "Invalid parameter type for '%s', expected: object", name);
        return NULL;
    }
    LamNode *child = lam_node_open_internal(v, child_flags(parent, v, backing),
                                            backing, errp);
    if (!child) {
        return NULL;
    }
    LamChild *c = lam_attach_child(parent, child, name, errp);
    lam_node_unref(child); /* the edge holds it now */
    return c;
}

static int parse_common(LamNode *bs, json_t *opts, int *flags, LamError **errp)
{
    LamError *err = NULL;
    bool ro = lam_opt_bool(opts, "read-only", !(*flags & LAM_O_RDWR), &err);
    json_t *cache = json_object_get(opts, "cache");
    if (cache && json_is_object(cache)) {
        if (lam_opt_bool(cache, "direct", false, &err)) {
            *flags |= LAM_O_NOCACHE;
        }
        if (lam_opt_bool(cache, "no-flush", false, &err)) {
            *flags |= LAM_O_NO_FLUSH;
        }
    }
    if (lam_opt_bool(opts, "force-share", false, &err)) {
        if (!ro) {
            lam_error_setg(errp, "force-share=on can only be used with read-only images");
            lam_error_free(err);
            return -EINVAL;
        }
        *flags |= LAM_O_FORCE_SHARE;
    }
    if (err) {
        lam_error_propagate(errp, err);
        return -EINVAL;
    }
    if (ro) {
        *flags &= ~LAM_O_RDWR;
    } else {
        *flags |= LAM_O_RDWR;
    }
    bs->read_only = ro;
    return 0;
}

static void free_node(LamNode *bs)
{
    pthread_mutex_destroy(&bs->reqs_lock);
    pthread_cond_destroy(&bs->reqs_cond);
    free(bs->node_name);
    free(bs->filename);
    free(bs->backing_file);
    free(bs->backing_format);
    free(bs->children);
    json_decref(bs->options);
    free(bs->opaque);
    free(bs);
}

static void detach_all_children(LamNode *bs)
{
    while (bs->nchildren > 0) {
        lam_detach_child(bs->children[bs->nchildren - 1]);
    }
}

LamNode *lam_node_open_internal(json_t *opts, int flags, bool backing,
                                LamError **errp)
{
    if (!json_is_object(opts)) {
        lam_error_setg(errp, "Invalid parameter type, expected: object");
        return NULL;
    }
    const char *drvname = lam_opt_str(opts, "driver", NULL);
    if (!drvname) {
        lam_error_setg(errp, "Parameter 'driver' is missing");
        return NULL;
    }
    const LamDriver *drv = lam_driver_find(drvname);
    if (!drv) {
        lam_error_setg(errp, "Parameter 'driver' does not accept value '%s'", drvname);
        return NULL;
    }
    const char *name = lam_opt_str(opts, "node-name", NULL);
    if (name) {
        if (!node_name_valid(name)) {
            lam_error_setg(errp, "Invalid node-name: '%s'", name);
            return NULL;
        }
        if (lam_node_find(name)) {
            lam_error_setg(errp, "Duplicate nodes with node-name='%s'", name);
            return NULL;
        }
    }

    LamNode *bs = xcalloc(1, sizeof(*bs));
    bs->drv = drv;
    bs->refcnt = 1;
    bs->serial = ++next_serial;
    pthread_mutex_init(&bs->reqs_lock, NULL);
    pthread_cond_init(&bs->reqs_cond, NULL);
    bs->bl.request_alignment = 1;
    bs->options = json_deep_copy(opts);
    if (name) {
        bs->node_name = strdup(name);
        bs->named = true;
    } else {
        char buf[32];
        snprintf(buf, sizeof(buf), "#block%03llu", (unsigned long long)bs->serial);
        bs->node_name = strdup(buf);
    }
    if (parse_common(bs, opts, &flags, errp) < 0) {
        free_node(bs);
        return NULL;
    }
    bs->open_flags = flags;
    if (drv->state_size) {
        bs->opaque = xcalloc(1, drv->state_size);
    }
    /* Register before open so that children opened inline can be found by
     * name and the error paths below can unregister uniformly. */
    registry_add(bs);

    int ret = drv->open(bs, opts, flags, errp);
    if (ret < 0) {
        detach_all_children(bs);
        registry_remove(bs);
        free_node(bs);
        return NULL;
    }
    if (!bs->filename) {
        LamChild *f = lam_node_file(bs);
        bs->filename = strdup(f ? lam_node_filename(f->node) : "");
    }

    if (drv->supports_backing && !(flags & LAM_O_NO_BACKING)) {
        LamError *err = NULL;
        json_t *b = json_object_get(opts, "backing");
        if (b) {
            if (!json_is_null(b)) {
                if (!lam_open_child(bs, opts, "backing", true, &err)) {
                    lam_error_prepend(&err, "Could not open backing file: ");
                }
            }
        } else if (bs->backing_file && *bs->backing_file) {
            if (backing_depth >= MAX_BACKING_DEPTH) {
                lam_error_setg(&err, "Could not open backing file: backing chain "
                               "of '%s' is more than %d images deep (loop?)",
                               bs->filename, MAX_BACKING_DEPTH);
            } else {
                backing_depth++;
                LamNode *bk = lam_open_backing_file(bs, &err);
                backing_depth--;
                if (bk) {
                    lam_attach_child(bs, bk, "backing", &err);
                    lam_node_unref(bk);
                }
            }
        }
        if (err) {
            lam_error_propagate(errp, err);
            lam_node_unref(bs);
            return NULL;
        }
    }
    (void)backing;
    if (drv->refresh_limits) {
        drv->refresh_limits(bs);
    }
    if (bs->bl.request_alignment == 0) {
        bs->bl.request_alignment = 1;
    }
    return bs;
}

LamNode *lam_node_open(json_t *opts, int flags, LamError **errp)
{
    return lam_node_open_internal(opts, flags, false, errp);
}

/* Reads the first bytes of a file to probe its format.  Returns a static
 * driver name or NULL with errp set. */
static const char *probe_file(const char *filename, LamError **errp)
{
    int fd = open(filename, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        lam_error_setg_errno(errp, -errno, "Could not open '%s'", filename);
        return NULL;
    }
    uint8_t buf[2048];
    ssize_t n = pread(fd, buf, sizeof(buf), 0);
    close(fd);
    if (n < 0) {
        lam_error_setg(errp, "Could not read image for determining its format: %s",
                       strerror(errno));
        return NULL;
    }
    if (n == 0) {
        return "raw";
    }
    return lam_probe_format(buf, (int)n, filename);
}

static LamNode *open_image(const char *filename, const char *format, int flags,
                           json_t *extra, bool backing, LamError **errp)
{
    bool probed = false;
    if (!format) {
        format = probe_file(filename, errp);
        if (!format) {
            return NULL;
        }
        probed = true;
    }
    const LamDriver *drv = lam_driver_find(format);
    if (!drv) {
        lam_error_setg(errp, "Unknown driver '%s'", format);
        return NULL;
    }
    json_t *opts;
    if (drv->kind == LAM_DRV_PROTOCOL) {
        opts = json_pack("{s:s, s:s}", "driver", format, "filename", filename);
    } else {
        opts = json_pack("{s:s, s:{s:s, s:s}}", "driver", format, "file",
                         "driver", "file", "filename", filename);
    }
    if (extra) {
        json_object_update(opts, extra);
    }
    if (!(flags & LAM_O_RDWR) && !json_object_get(opts, "read-only")) {
        json_object_set_new(opts, "read-only", json_true());
    }
    LamNode *bs = lam_node_open_internal(opts, flags, backing, errp);
    json_decref(opts);
    if (bs && probed && !strcmp(format, "raw")) {
        bs->probed_raw = true;
        if (!bs->read_only) {
            /* Whole-sector writes let raw.c check what sector 0 becomes. */
            if (bs->bl.request_alignment < 512) {
                bs->bl.request_alignment = 512;
            }
            lam_warn("Image format was not specified for '%s' and probing "
                     "guessed raw.\n"
                     "         Automatically detecting the format is dangerous "
                     "for raw images, write operations on block 0 will be "
                     "restricted.\n"
                     "         Specify the 'raw' format explicitly to remove "
                     "the restrictions.", filename);
        }
    }
    return bs;
}

LamNode *lam_open_image(const char *filename, const char *format, int flags,
                        json_t *extra, LamError **errp)
{
    return open_image(filename, format, flags, extra, false, errp);
}

LamNode *lam_open_backing_file(LamNode *overlay, LamError **errp)
{
    char *path = lam_path_combine(overlay->filename, overlay->backing_file);
    LamError *err = NULL;
    /* Backing files are opened read-only; an image that records no backing
     * format gets its backing probed (read-only, so no raw restriction). */
    LamNode *bs = open_image(path, overlay->backing_format, 0, NULL, true, &err);
    if (!bs) {
        lam_error_prepend(&err, "Could not open backing file: ");
        lam_error_propagate(errp, err);
    }
    free(path);
    return bs;
}

/* ---- teardown ---- */

void lam_node_ref(LamNode *bs)
{
    bs->refcnt++;
}

void lam_node_unref(LamNode *bs)
{
    if (!bs || --bs->refcnt > 0) {
        return;
    }
    if (bs->drv->close) {
        bs->drv->close(bs);
    }
    detach_all_children(bs);
    registry_remove(bs);
    free_node(bs);
}

int lam_node_flush_all(LamNode *bs)
{
    int ret = 0;
    if (bs->drv->inactivate && !bs->read_only) {
        ret = bs->drv->inactivate(bs);
    } else if (!bs->read_only) {
        ret = lam_node_flush(bs);
    }
    for (int i = 0; i < bs->nchildren; i++) {
        int r = lam_node_flush_all(bs->children[i]->node);
        if (r < 0 && ret == 0) {
            ret = r;
        }
    }
    return ret;
}

int lam_node_get_info(LamNode *bs, json_t *out, LamError **errp)
{
    int64_t len = lam_node_length(bs);
    if (len < 0) {
        lam_error_setg_errno(errp, (int)len, "Could not get the size of '%s'",
                             lam_node_filename(bs));
        return (int)len;
    }
    json_object_set_new(out, "virtual-size", json_integer(len));
    json_object_set_new(out, "filename", json_string(lam_node_filename(bs)));
    json_object_set_new(out, "format", json_string(bs->drv->name));
    int64_t alloc = lam_node_allocated_size(bs);
    if (alloc >= 0) {
        json_object_set_new(out, "actual-size", json_integer(alloc));
    }
    if (bs->backing_file && *bs->backing_file) {
        char *full = lam_path_combine(bs->filename, bs->backing_file);
        json_object_set_new(out, "backing-filename", json_string(bs->backing_file));
        json_object_set_new(out, "full-backing-filename", json_string(full));
        free(full);
        if (bs->backing_format) {
            json_object_set_new(out, "backing-filename-format",
                                json_string(bs->backing_format));
        }
    }
    if (bs->drv->get_info) {
        return bs->drv->get_info(bs, out, errp);
    }
    return 0;
}

int lam_node_check(LamNode *bs, LamCheckResult *res, LamCheckMode mode)
{
    memset(res, 0, sizeof(*res));
    if (!bs->drv->check) {
        res->supported = false;
        return -ENOTSUP;
    }
    res->supported = true;
    return bs->drv->check(bs, res, mode);
}

int lam_node_change_backing_file(LamNode *bs, const char *file, const char *fmt,
                                 LamError **errp)
{
    if (!bs->drv->change_backing_file) {
        lam_error_setg(errp, "Could not change the backing file to '%s': "
                       "format '%s' has no backing file", file ? file : "",
                       bs->drv->name);
        return -ENOTSUP;
    }
    int ret = bs->drv->change_backing_file(bs, file, fmt, errp);
    if (ret == 0) {
        free(bs->backing_file);
        free(bs->backing_format);
        bs->backing_file = file && *file ? strdup(file) : NULL;
        bs->backing_format = fmt && *fmt && file && *file ? strdup(fmt) : NULL;
    }
    return ret;
}

bool lam_debug_no_fleecing_guard(void)
{
    const char *v = getenv("LAMINA_DEBUG_NO_FLEECING_GUARD");
    return v && strcmp(v, "1") == 0;
}
