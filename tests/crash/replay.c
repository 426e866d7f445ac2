/* Building the file images a power cut could leave (see replay.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "replay.h"
#include "rng.h"

static int copy_into(uint8_t **dst, int64_t *dlen, int64_t *dcap,
                     const uint8_t *src, int64_t len)
{
    if (len > *dcap) {
        uint8_t *nb = realloc(*dst, (size_t)len);
        if (!nb) {
            return -ENOMEM;
        }
        *dst = nb;
        *dcap = len;
    }
    if (len) {
        memcpy(*dst, src, (size_t)len);
    }
    *dlen = len;
    return 0;
}

void replay_init(Replay *r, const CrashEntry *log, size_t nlog,
                 const uint8_t *init, int64_t init_len)
{
    memset(r, 0, sizeof(*r));
    r->log = log;
    r->nlog = nlog;
    r->init = init;
    r->init_len = init_len;
    r->sector = 512;
    if (copy_into(&r->base, &r->base_len, &r->base_cap, init, init_len) < 0) {
        abort();
    }
}

void replay_free(Replay *r)
{
    free(r->base);
    free(r->img);
    memset(r, 0, sizeof(*r));
}

size_t *replay_flush_positions(const CrashEntry *log, size_t nlog, size_t *n)
{
    size_t *pos = malloc((nlog + 1) * sizeof(*pos));
    if (!pos) {
        abort();
    }
    *n = 0;
    for (size_t i = 0; i < nlog; i++) {
        if (log[i].type == CR_FLUSH) {
            pos[(*n)++] = i;
        }
    }
    return pos;
}

static bool modifies(const CrashEntry *e)
{
    return e->type != CR_FLUSH;
}

/* The write the cheat loses: one from the interval the barrier's flush
 * made durable, so a correct checker must see its loss. */
static long pick_flushed(const Replay *r, size_t barrier, Rng *rng)
{
    if (barrier < 2) {
        return -1;
    }
    size_t lo = barrier - 1; /* the flush itself */
    while (lo > 0 && r->log[lo - 1].type != CR_FLUSH) {
        lo--;
    }
    size_t cand = 0;
    for (size_t i = lo; i < barrier - 1; i++) {
        cand += r->log[i].type == CR_WRITE || r->log[i].type == CR_ZERO;
    }
    if (!cand) {
        return -1;
    }
    size_t k = (size_t)rng_below(rng, cand);
    for (size_t i = lo; i < barrier - 1; i++) {
        if (r->log[i].type == CR_WRITE || r->log[i].type == CR_ZERO) {
            if (k-- == 0) {
                return (long)i;
            }
        }
    }
    return -1;
}

/* Applies bytes [from, to) of entry idx except those a FUA write logged
 * after it (index in [start, pos)) covers: that write had returned, so
 * the disk holds its data or something newer, never the older entry's,
 * whatever order the unflushed entries are applied in. */
static int apply_visible(Replay *r, size_t idx, size_t start, size_t pos, int64_t from,
                         int64_t to)
{
    const CrashEntry *e = &r->log[idx];
    for (size_t k = start; k < pos && from < to; k++) {
        const CrashEntry *f = &r->log[k];
        if (!f->fua || (f->type != CR_WRITE && f->type != CR_ZERO)) {
            continue;
        }
        int64_t a = f->off - e->off, b = a + f->len;
        if (b <= from || a >= to) {
            continue;
        }
        int ret = 0;
        if (a > from) {
            ret = apply_visible(r, idx, k + 1, pos, from, a);
        }
        if (ret == 0 && b < to) {
            ret = apply_visible(r, idx, k + 1, pos, b, to);
        }
        return ret;
    }
    return from < to ? crash_apply_part(e, from, to, &r->img, &r->img_len, &r->img_cap) : 0;
}

int replay_build(Replay *r, Cut *c, uint64_t seed, CheatMode cheat)
{
    Rng rng;
    int ret;
    rng_seed(&rng, seed);
    c->kept = c->dropped = c->torn = 0;
    c->dropped_flushed = -1;

    /* Advance the durable base to the barrier. */
    if (c->barrier < r->base_pos) {
        return -EINVAL;
    }
    for (size_t i = r->base_pos; i < c->barrier; i++) {
        ret = crash_apply(&r->log[i], &r->base, &r->base_len, &r->base_cap);
        if (ret < 0) {
            return ret;
        }
    }
    r->base_pos = c->barrier;

    if (cheat == CHEAT_DROP_FLUSHED) {
        c->dropped_flushed = pick_flushed(r, c->barrier, &rng);
    }
    if (c->dropped_flushed >= 0) {
        ret = copy_into(&r->img, &r->img_len, &r->img_cap, r->init, r->init_len);
        for (size_t i = 0; ret == 0 && i < c->barrier; i++) {
            if ((long)i != c->dropped_flushed) {
                ret = crash_apply(&r->log[i], &r->img, &r->img_len, &r->img_cap);
            }
        }
    } else {
        ret = copy_into(&r->img, &r->img_len, &r->img_cap, r->base, r->base_len);
    }
    if (ret < 0) {
        return ret;
    }

    if (c->drop_only >= 0) {
        for (size_t i = c->barrier; i < c->pos && ret == 0; i++) {
            if ((long)i == c->drop_only && !r->log[i].fua) {
                c->dropped++;
            } else if (modifies(&r->log[i])) {
                c->kept++;
                ret = crash_apply(&r->log[i], &r->img, &r->img_len, &r->img_cap);
            }
        }
        return ret;
    }

    /* The unflushed entries: each kept with probability 1/2 (some cuts
     * keep most, some lose most), a quarter of the kept ones torn at
     * sector boundaries, and applied in a random order. */
    size_t n = c->pos - c->barrier;
    if (n == 0) {
        return 0;
    }
    size_t *order = malloc(n * sizeof(*order));
    if (!order) {
        return -ENOMEM;
    }
    unsigned keep_pct = (unsigned)rng_below(&rng, 101);
    size_t nk = 0;
    for (size_t i = c->barrier; i < c->pos; i++) {
        if (!modifies(&r->log[i])) {
            continue;
        }
        /* A FUA write logged before the cut had returned: on disk. */
        if (r->log[i].fua || rng_below(&rng, 100) < keep_pct) {
            order[nk++] = i;
        } else {
            c->dropped++;
        }
    }
    for (size_t i = nk; i > 1; i--) {
        size_t j = (size_t)rng_below(&rng, i);
        size_t t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    for (size_t k = 0; k < nk && ret == 0; k++) {
        const CrashEntry *e = &r->log[order[k]];
        c->kept++;
        bool data = e->type == CR_WRITE || e->type == CR_ZERO || e->type == CR_DISCARD;
        bool tearable = data && !e->fua;
        if (!tearable || rng_below(&rng, 4) != 0) {
            ret = data ? apply_visible(r, order[k], order[k] + 1, c->pos, 0, e->len)
                       : crash_apply(e, &r->img, &r->img_len, &r->img_cap);
            continue;
        }
        /* Torn: only some of its sectors reached the disk. */
        c->torn++;
        int64_t from = 0;
        while (from < e->len && ret == 0) {
            int64_t abs = e->off + from;
            int64_t to = (abs / r->sector + 1) * r->sector - e->off;
            if (to > e->len) {
                to = e->len;
            }
            if (rng_below(&rng, 2)) {
                ret = apply_visible(r, order[k], order[k] + 1, c->pos, from, to);
            }
            from = to;
        }
    }
    free(order);
    return ret;
}
