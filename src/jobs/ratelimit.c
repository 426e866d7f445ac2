/* Slice-based rate limiter (see ratelimit.h). */
#include "jobs/ratelimit.h"

void lam_ratelimit_set_speed(LamRateLimit *rl, uint64_t speed)
{
    rl->speed = speed;
    rl->slice_quota = speed / (1000000000LL / LAM_RATELIMIT_SLICE_NS);
    if (speed && rl->slice_quota == 0) {
        rl->slice_quota = 1;
    }
}

int64_t lam_ratelimit_account(LamRateLimit *rl, uint64_t bytes, int64_t now_ns)
{
    if (rl->speed == 0) {
        return 0;
    }
    if (now_ns >= rl->slice_end_ns) {
        /* A new slice starts; debt from an oversized request carries over
         * as whole slices so that large chunks still average out. */
        uint64_t carried = rl->dispatched > rl->slice_quota
                               ? rl->dispatched - rl->slice_quota : 0;
        int64_t elapsed = now_ns - rl->slice_end_ns;
        uint64_t forgiven = (uint64_t)(elapsed / LAM_RATELIMIT_SLICE_NS) * rl->slice_quota;
        rl->dispatched = carried > forgiven ? carried - forgiven : 0;
        rl->slice_end_ns = now_ns + LAM_RATELIMIT_SLICE_NS;
    }
    rl->dispatched += bytes;
    if (rl->dispatched < rl->slice_quota) {
        return 0;
    }
    /* Wait until the slices covering what was dispatched have elapsed. */
    uint64_t extra_slices = rl->dispatched / rl->slice_quota - 1;
    return rl->slice_end_ns - now_ns + (int64_t)extra_slices * LAM_RATELIMIT_SLICE_NS;
}
