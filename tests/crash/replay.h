/* Replaying a recorded file log into the file images a power cut could
 * leave behind.
 *
 * A *barrier* B is a log position such that every entry before B is
 * durable: B = 0 (nothing happened yet) or B = f + 1 for a flush entry f.
 * A cut (B, p) with B <= p is a crash while the entry at position p was
 * about to be made: entries [0, B) are on disk, the entries [B, p) (none of
 * them a flush) may each be on disk, lost, or torn at sector boundaries,
 * and land in any order.
 *   flush cut:  p == B, nothing after the barrier survives;
 *   random cut: a random p in (B, next flush], a random subset;
 *   single-loss cut: p = next flush, everything but one entry.
 */
#ifndef LAMINA_CRASH_REPLAY_H
#define LAMINA_CRASH_REPLAY_H

#include <stdbool.h>
#include <stdint.h>

#include "recorder.h"

typedef enum {
    CHEAT_NONE,
    /* Also lose one write made durable by the latest barrier's flush:
     * the crash model a broken disk would give.  The test must notice. */
    CHEAT_DROP_FLUSHED,
} CheatMode;

typedef struct Cut {
    size_t barrier, pos;
    bool flush_cut;
    /* >= 0: a single-loss cut: every entry in [barrier, pos) lands, in
     * order, except this one.  The surest way to catch a missing flush
     * between a write and one that depends on it. */
    long drop_only;
    /* What was done to the entries in [barrier, pos). */
    int kept, dropped, torn;
    long dropped_flushed;  /* CHEAT_DROP_FLUSHED: log index lost, or -1 */
} Cut;

typedef struct Replay {
    const CrashEntry *log;
    size_t nlog;
    const uint8_t *init;
    int64_t init_len;
    /* Durable state at `base_pos` (entries [0, base_pos) applied). */
    uint8_t *base;
    int64_t base_len, base_cap;
    size_t base_pos;
    /* The file image of the current cut. */
    uint8_t *img;
    int64_t img_len, img_cap;
    uint32_t sector;       /* tearing granularity */
} Replay;

void replay_init(Replay *r, const CrashEntry *log, size_t nlog,
                 const uint8_t *init, int64_t init_len);
void replay_free(Replay *r);

/* Builds r->img for the cut (barrier, pos): barriers must be visited in
 * nondecreasing order.  `seed` picks the subset/tearing/order of the
 * entries in [barrier, pos).  Fills in c's counters. Returns 0 / -ENOMEM. */
int replay_build(Replay *r, Cut *c, uint64_t seed, CheatMode cheat);

/* Positions of every flush entry, ascending (malloc'ed, *n entries). */
size_t *replay_flush_positions(const CrashEntry *log, size_t nlog, size_t *n);

#endif
