/* The `blkdebug` filter: error injection for tests, with QEMU's
 * blockdev-add options (image, inject-error, set-state, align,
 * max-transfer, ...).
 *
 * Events: a read through this node raises read_aio, a write raises
 * write_aio and pwritev (write_zeroes: write_aio and pwritev_zero), a flush
 * raises flush_to_disk and flush_to_os; "none" fires at open.  Format
 * drivers above do not raise their own events (l2_load, ...) yet: rules
 * for those events never fire.  An inject-error rule is armed when its
 * event is raised in its state; an armed rule fails the next request of a
 * matching iotype that covers its sector (immediately=true: the request
 * raising the event itself, which in this model is the same request).
 * once=true removes the rule after it fired.
 *
 * Our extension x-read-delay-us (tests only) delays every read, to widen
 * race windows such as the fleecing race of seed 001. */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>

#include "lamina/driver.h"

enum { IO_READ = 1, IO_WRITE = 2, IO_ZEROES = 4, IO_DISCARD = 8, IO_FLUSH = 16,
       IO_BSTATUS = 32 };
#define IO_DEFAULT (IO_READ | IO_WRITE | IO_ZEROES | IO_DISCARD | IO_FLUSH)

typedef struct Rule {
    char *event;
    int64_t state;      /* 0: any */
    int iotypes;
    int err;
    int64_t sector;     /* -1: any */
    bool once;
    bool immediately;
    bool armed;
    bool is_set_state;
    int64_t new_state;
    struct Rule *next;
} Rule;

typedef struct BlkdebugState {
    LamChild *image;
    pthread_mutex_t lock; /* protects rules, state */
    Rule *rules;
    int64_t state;
    int64_t read_delay_us;
} BlkdebugState;

static const char *const blkdebug_options[] = {
    "image", "config", "align", "max-transfer", "opt-write-zero", "max-write-zero",
    "opt-discard", "max-discard", "inject-error", "set-state", "take-child-perms",
    "unshare-child-perms", "x-read-delay-us", NULL,
};

static const char *const known_events[] = {
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read",
    "l2_alloc_write", "read_aio", "read_backing_aio", "read_compressed", "write_aio",
    "write_compressed", "vmstate_load", "vmstate_save", "cow_read", "cow_write",
    "reftable_load", "reftable_grow", "reftable_update", "refblock_load",
    "refblock_update", "refblock_update_part", "refblock_alloc",
    "refblock_alloc_hookup", "refblock_alloc_write", "refblock_alloc_write_blocks",
    "refblock_alloc_write_table", "refblock_alloc_switch_table", "cluster_alloc",
    "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail",
    "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none", NULL,
};

static bool event_known(const char *e)
{
    for (int i = 0; known_events[i]; i++) {
        if (!strcmp(known_events[i], e)) {
            return true;
        }
    }
    return false;
}

static int parse_iotype(const char *s)
{
    static const struct { const char *n; int v; } t[] = {
        {"read", IO_READ}, {"write", IO_WRITE}, {"write-zeroes", IO_ZEROES},
        {"discard", IO_DISCARD}, {"flush", IO_FLUSH}, {"block-status", IO_BSTATUS},
    };
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        if (!strcmp(t[i].n, s)) {
            return t[i].v;
        }
    }
    return -1;
}

static void free_rules(BlkdebugState *s)
{
    while (s->rules) {
        Rule *r = s->rules;
        s->rules = r->next;
        free(r->event);
        free(r);
    }
}

static int parse_rules(BlkdebugState *s, json_t *list, bool set_state, LamError **errp)
{
    const char *what = set_state ? "set-state" : "inject-error";
    if (!list) {
        return 0;
    }
    if (!json_is_array(list)) {
        lam_error_setg(errp, "Invalid parameter type for '%s', expected: array", what);
        return -EINVAL;
    }
    size_t i;
    json_t *o;
    json_array_foreach(list, i, o) {
        if (!json_is_object(o)) {
            lam_error_setg(errp, "Invalid parameter type for '%s', expected: object", what);
            return -EINVAL;
        }
        const char *ev = lam_opt_str(o, "event", NULL);
        if (!ev) {
            lam_error_setg(errp, "Parameter 'event' is missing");
            return -EINVAL;
        }
        if (!event_known(ev)) {
            lam_error_setg(errp, "Invalid parameter '%s'", ev);
            return -EINVAL;
        }
        LamError *err = NULL;
        Rule *r = calloc(1, sizeof(*r));
        if (!r) {
            lam_error_setg(errp, "Out of memory");
            return -ENOMEM;
        }
        r->event = strdup(ev);
        r->is_set_state = set_state;
        r->state = lam_opt_int(o, "state", 0, &err);
        if (set_state) {
            if (!json_object_get(o, "new_state")) {
                lam_error_setg(&err, "Parameter 'new_state' is missing");
            }
            r->new_state = lam_opt_int(o, "new_state", 0, &err);
        } else {
            const char *io = lam_opt_str(o, "iotype", NULL);
            r->iotypes = IO_DEFAULT;
            if (io) {
                r->iotypes = parse_iotype(io);
                if (r->iotypes < 0) {
                    lam_error_setg(&err, "Parameter 'iotype' does not accept value '%s'", io);
                }
            }
            int64_t e = lam_opt_int(o, "errno", EIO, &err);
            if (!err && (e <= 0 || e >= 4096)) {
                lam_error_setg(&err, "Invalid errno %lld", (long long)e);
            }
            r->err = (int)e;
            r->sector = lam_opt_int(o, "sector", -1, &err);
            r->once = lam_opt_bool(o, "once", false, &err);
            r->immediately = lam_opt_bool(o, "immediately", false, &err);
        }
        r->next = s->rules;
        s->rules = r;
        if (err) {
            lam_error_propagate(errp, err);
            return -EINVAL;
        }
    }
    return 0;
}

/* Raises an event: arms matching inject rules, applies set-state. */
static void raise_event_locked(BlkdebugState *s, const char *ev)
{
    int64_t new_state = s->state;
    for (Rule *r = s->rules; r; r = r->next) {
        if (strcmp(r->event, ev) || (r->state && r->state != s->state)) {
            continue;
        }
        if (r->is_set_state) {
            new_state = r->new_state;
        } else {
            r->armed = true;
        }
    }
    s->state = new_state;
}

/* Raises the request's events, then fails it if an armed rule matches. */
static int check_request(LamNode *bs, const char *ev1, const char *ev2, int iotype,
                         int64_t off, int64_t bytes)
{
    BlkdebugState *s = bs->opaque;
    int ret = 0;
    pthread_mutex_lock(&s->lock);
    raise_event_locked(s, ev1);
    if (ev2) {
        raise_event_locked(s, ev2);
    }
    for (Rule **pp = &s->rules; *pp; pp = &(*pp)->next) {
        Rule *r = *pp;
        if (r->is_set_state || !r->armed || !(r->iotypes & iotype)) {
            continue;
        }
        if (r->sector >= 0 && iotype != IO_FLUSH &&
            !(r->sector * 512 < off + bytes && off < (r->sector + 1) * 512)) {
            continue;
        }
        ret = -r->err;
        if (r->once) {
            *pp = r->next;
            free(r->event);
            free(r);
        }
        break;
    }
    pthread_mutex_unlock(&s->lock);
    return ret;
}

static int blkdebug_do_open(LamNode *bs, json_t *opts, LamError **errp)
{
    BlkdebugState *s = bs->opaque;
    if (json_object_get(opts, "config")) {
        lam_error_setg(errp, "blkdebug: 'config' files are not supported; "
                       "use 'inject-error' and 'set-state'");
        return -ENOTSUP;
    }
    if (parse_rules(s, json_object_get(opts, "inject-error"), false, errp) < 0 ||
        parse_rules(s, json_object_get(opts, "set-state"), true, errp) < 0) {
        return -EINVAL;
    }
    LamError *err = NULL;
    int64_t align = lam_opt_int(opts, "align", 0, &err);
    int64_t max_transfer = lam_opt_int(opts, "max-transfer", 0, &err);
    int64_t max_wz = lam_opt_int(opts, "max-write-zero", 0, &err);
    s->read_delay_us = lam_opt_int(opts, "x-read-delay-us", 0, &err);
    if (!err && (s->read_delay_us < 0 || s->read_delay_us > 10000000)) {
        lam_error_setg(&err, "x-read-delay-us must be between 0 and 10000000");
    }
    if (err) {
        lam_error_propagate(errp, err);
        return -EINVAL;
    }
    if (align < 0 || (align & (align - 1)) || align > (1 << 30)) {
        lam_error_setg(errp, "Cannot meet constraints with align %lld", (long long)align);
        return -EINVAL;
    }
    if (max_transfer < 0 || (align && max_transfer % align) || max_transfer > INT32_MAX) {
        lam_error_setg(errp, "Cannot meet constraints with max-transfer %lld",
                       (long long)max_transfer);
        return -EINVAL;
    }
    s->image = lam_open_child(bs, opts, "image", false, errp);
    if (!s->image) {
        return -EINVAL;
    }
    bs->bl = *lam_node_limits(s->image->node);
    if (align > (int64_t)bs->bl.request_alignment) {
        bs->bl.request_alignment = (uint32_t)align;
    }
    if (max_transfer) {
        bs->bl.max_transfer = (uint32_t)max_transfer;
    }
    if (max_wz > 0 && max_wz <= INT32_MAX) {
        bs->bl.max_pwrite_zeroes = (uint32_t)max_wz;
    }
    bs->filename = strdup(lam_node_filename(s->image->node));
    pthread_mutex_lock(&s->lock);
    raise_event_locked(s, "none");
    pthread_mutex_unlock(&s->lock);
    return 0;
}

static int blkdebug_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    BlkdebugState *s = bs->opaque;
    pthread_mutex_init(&s->lock, NULL);
    s->state = 1;
    int ret = blkdebug_do_open(bs, opts, errp);
    if (ret < 0) {
        /* close() is not called for a node that failed to open */
        free_rules(s);
        pthread_mutex_destroy(&s->lock);
    }
    return ret;
}

static void blkdebug_close(LamNode *bs)
{
    BlkdebugState *s = bs->opaque;
    free_rules(s);
    pthread_mutex_destroy(&s->lock);
}

static int64_t blkdebug_get_length(LamNode *bs)
{
    BlkdebugState *s = bs->opaque;
    return lam_node_length(s->image->node);
}

static int blkdebug_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    BlkdebugState *s = bs->opaque;
    int ret = check_request(bs, "read_aio", NULL, IO_READ, off, bytes);
    if (s->read_delay_us) {
        usleep((useconds_t)s->read_delay_us);
    }
    return ret ? ret : lam_co_preadv(s->image, off, bytes, qiov, flags);
}

static int blkdebug_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    BlkdebugState *s = bs->opaque;
    int ret = check_request(bs, "write_aio", "pwritev", IO_WRITE, off, bytes);
    return ret ? ret : lam_co_pwritev(s->image, off, bytes, qiov, flags);
}

static int blkdebug_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    BlkdebugState *s = bs->opaque;
    int ret = check_request(bs, "write_aio", "pwritev_zero", IO_ZEROES, off, bytes);
    return ret ? ret : lam_co_pwrite_zeroes(s->image, off, bytes, flags);
}

static int blkdebug_pdiscard(LamNode *bs, int64_t off, int64_t bytes)
{
    BlkdebugState *s = bs->opaque;
    int ret = check_request(bs, "none", NULL, IO_DISCARD, off, bytes);
    return ret ? ret : lam_co_pdiscard(s->image, off, bytes);
}

static int blkdebug_flush(LamNode *bs)
{
    /* The core flushes the image child afterwards. */
    return check_request(bs, "flush_to_os", "flush_to_disk", IO_FLUSH, 0, 0);
}

static int blkdebug_block_status(LamNode *bs, int64_t off, int64_t bytes, int64_t *pnum,
                                 int64_t *map, LamNode **file)
{
    BlkdebugState *s = bs->opaque;
    int ret = check_request(bs, "none", NULL, IO_BSTATUS, off, bytes);
    if (ret) {
        return ret;
    }
    return lam_co_block_status(s->image, off, bytes, pnum, map, file);
}

static int blkdebug_get_info(LamNode *bs, json_t *out, LamError **errp)
{
    BlkdebugState *s = bs->opaque;
    return lam_node_get_info(s->image->node, out, errp);
}

const LamDriver lam_drv_blkdebug = {
    .name = "blkdebug",
    .kind = LAM_DRV_FILTER,
    .state_size = sizeof(BlkdebugState),
    .supported_write_flags = LAM_REQ_FUA,
    .supported_zero_flags = LAM_REQ_FUA | LAM_REQ_MAY_UNMAP,
    .option_names = blkdebug_options,
    .open = blkdebug_open,
    .close = blkdebug_close,
    .get_length = blkdebug_get_length,
    .get_info = blkdebug_get_info,
    .preadv = blkdebug_preadv,
    .pwritev = blkdebug_pwritev,
    .pwrite_zeroes = blkdebug_pwrite_zeroes,
    .pdiscard = blkdebug_pdiscard,
    .flush = blkdebug_flush,
    .block_status = blkdebug_block_status,
};

__attribute__((constructor)) static void blkdebug_register(void)
{
    lam_driver_register(&lam_drv_blkdebug);
}
