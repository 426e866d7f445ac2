/* Bounded metadata cache for L2 tables and refcount blocks.
 *
 * Every function runs with the metadata lock (Qcow2State.lock) held; that
 * lock is what protects a cache.  Entries have a use count: an entry
 * handed out by qc_cache_get is never evicted until qc_cache_put.
 *
 * Flush order (invariants I1/I2 in qcow2.c): before any dirty L2 table is
 * written, all dirty refcount blocks are written and, if guest data or
 * refcounts were written since, the file child is flushed.  Refcount
 * blocks have no dependency: decrements are only made after the L2
 * change that dropped the reference is on disk. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

typedef struct Qcow2CacheEntry {
    uint64_t offset;   /* 0: unused slot */
    uint8_t *data;
    bool dirty;
    int ref;
    uint64_t lru;
} Qcow2CacheEntry;

struct Qcow2Cache {
    int n;
    int64_t entry_size;
    bool is_l2;
    uint64_t clock;
    int hint;
    Qcow2CacheEntry *e;
};

Qcow2Cache *qc_cache_new(int n, int64_t entry_size, bool is_l2)
{
    Qcow2Cache *c = calloc(1, sizeof(*c));
    if (!c) {
        return NULL;
    }
    c->n = n;
    c->entry_size = entry_size;
    c->is_l2 = is_l2;
    c->e = calloc(n, sizeof(*c->e));
    if (!c->e) {
        free(c);
        return NULL;
    }
    return c;
}

void qc_cache_free(Qcow2Cache *c)
{
    if (!c) {
        return;
    }
    for (int i = 0; i < c->n; i++) {
        free(c->e[i].data);
    }
    free(c->e);
    free(c);
}

static int entry_write(Qcow2State *s, Qcow2Cache *c, Qcow2CacheEntry *e, int flags)
{
    if (!e->dirty) {
        return 0;
    }
    if (c->is_l2) {
        bool rb_dirty = false;
        for (int i = 0; i < s->rb_cache->n; i++) {
            rb_dirty |= s->rb_cache->e[i].dirty;
        }
        int ret = qc_cache_writeback(s, s->rb_cache);
        if (ret < 0) {
            return ret;
        }
        if (s->l2_needs_flush || rb_dirty) {
            ret = lam_co_flush(s->file);
            if (ret < 0) {
                return ret;
            }
            s->l2_needs_flush = false;
        }
    }
    int ret = lam_co_pwrite(s->file, (int64_t)e->offset, c->entry_size, e->data, flags);
    if (ret < 0) {
        return ret;
    }
    e->dirty = false;
    return 0;
}

static int writeback(Qcow2State *s, Qcow2Cache *c, int flags)
{
    int result = 0;
    for (int i = 0; i < c->n; i++) {
        int ret = entry_write(s, c, &c->e[i], flags);
        if (ret < 0 && result == 0) {
            result = ret;
        }
    }
    return result;
}

int qc_cache_writeback_fua(Qcow2State *s, Qcow2Cache *c)
{
    return writeback(s, c, LAM_REQ_FUA);
}

int qc_cache_writeback(Qcow2State *s, Qcow2Cache *c)
{
    return writeback(s, c, 0);
}

int qc_flush_metadata(Qcow2State *s)
{
    int ret = qc_cache_writeback(s, s->rb_cache);
    if (ret == 0) {
        ret = qc_cache_writeback(s, s->l2_cache);
    }
    return ret;
}

static Qcow2CacheEntry *find(Qcow2Cache *c, uint64_t offset)
{
    if (c->hint < c->n && c->e[c->hint].offset == offset) {
        return &c->e[c->hint];
    }
    for (int i = 0; i < c->n; i++) {
        if (c->e[i].offset == offset) {
            c->hint = i;
            return &c->e[i];
        }
    }
    return NULL;
}

int qc_cache_get(Qcow2State *s, Qcow2Cache *c, uint64_t offset, bool fresh,
                 uint8_t **table)
{
    Qcow2CacheEntry *e = offset ? find(c, offset) : NULL;
    if (!offset) {
        return -EIO;
    }
    if (e) {
        if (fresh) {
            memset(e->data, 0, c->entry_size);
        }
        goto found;
    }
    /* Pick a victim: an empty slot, else the least recently used entry
     * nobody holds. */
    Qcow2CacheEntry *victim = NULL;
    for (int i = 0; i < c->n; i++) {
        Qcow2CacheEntry *x = &c->e[i];
        if (x->ref) {
            continue;
        }
        if (!x->offset) {
            victim = x;
            break;
        }
        if (!victim || x->lru < victim->lru) {
            victim = x;
        }
    }
    if (!victim) {
        return -ENOMEM; /* every entry in use: cannot happen with n >= 4 */
    }
    if (victim->offset) {
        int ret = entry_write(s, c, victim, 0);
        if (ret < 0) {
            return ret;
        }
        victim->offset = 0;
    }
    if (!victim->data) {
        victim->data = malloc(c->entry_size);
        if (!victim->data) {
            return -ENOMEM;
        }
    }
    if (fresh) {
        memset(victim->data, 0, c->entry_size);
    } else {
        int ret = lam_co_pread(s->file, (int64_t)offset, c->entry_size,
                               victim->data, 0);
        if (ret < 0) {
            return ret;
        }
    }
    victim->offset = offset;
    victim->dirty = false;
    e = victim;
    c->hint = (int)(e - c->e);
found:
    e->ref++;
    e->lru = ++c->clock;
    *table = e->data;
    return 0;
}

bool qc_cache_has(Qcow2Cache *c, uint64_t offset)
{
    return offset && find(c, offset);
}

static Qcow2CacheEntry *by_data(Qcow2Cache *c, uint8_t *table)
{
    if (c->hint < c->n && c->e[c->hint].data == table) {
        return &c->e[c->hint];
    }
    for (int i = 0; i < c->n; i++) {
        if (c->e[i].data == table) {
            return &c->e[i];
        }
    }
    return NULL;
}

void qc_cache_put(Qcow2Cache *c, uint8_t *table)
{
    Qcow2CacheEntry *e = by_data(c, table);
    if (e && e->ref > 0) {
        e->ref--;
    }
}

void qc_cache_mark_dirty(Qcow2Cache *c, uint8_t *table)
{
    Qcow2CacheEntry *e = by_data(c, table);
    if (e) {
        e->dirty = true;
    }
}

void qc_cache_discard(Qcow2Cache *c, uint64_t offset)
{
    Qcow2CacheEntry *e = find(c, offset);
    if (e) {
        e->offset = 0;
        e->dirty = false;
    }
}

void qc_cache_clear(Qcow2Cache *c)
{
    for (int i = 0; i < c->n; i++) {
        c->e[i].offset = 0;
        c->e[i].dirty = false;
    }
}
