/* Rate limiting in fixed time slices (100 ms): a slice allows speed/10
 * bytes; once spent, callers wait for the next slice.  Not thread safe on
 * its own: the owner serialises calls (jobs use job_lock). */
#ifndef LAMINA_JOBS_RATELIMIT_H
#define LAMINA_JOBS_RATELIMIT_H

#include <stdint.h>

#define LAM_RATELIMIT_SLICE_NS 100000000LL

typedef struct LamRateLimit {
    uint64_t speed;        /* bytes per second; 0 = unlimited */
    int64_t slice_end_ns;  /* end of the current slice */
    uint64_t slice_quota;  /* bytes allowed per slice */
    uint64_t dispatched;   /* bytes accounted in the current slice */
} LamRateLimit;

void lam_ratelimit_set_speed(LamRateLimit *rl, uint64_t speed);
/* Accounts `bytes` at time now_ns; returns how long (ns) the caller must
 * wait before issuing more, 0 if it may go on. */
int64_t lam_ratelimit_account(LamRateLimit *rl, uint64_t bytes, int64_t now_ns);

#endif
