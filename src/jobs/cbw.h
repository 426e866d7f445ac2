/* What the copy-before-write filter (src/drivers/copy-before-write.c)
 * exposes to backup jobs and to snapshot-access. */
#ifndef LAMINA_JOBS_CBW_H
#define LAMINA_JOBS_CBW_H

#include "jobs/block-copy.h"

/* The copy engine of a copy-before-write node; NULL for other nodes. */
LamBlockCopy *lam_cbw_block_copy(LamNode *bs);
/* True once a copy failed under on-cbw-error=break-snapshot: snapshot
 * reads fail from then on. */
bool lam_cbw_snapshot_broken(LamNode *bs);
/* Makes copies into the target compressed (backup compress=true). */
void lam_cbw_set_compress(LamNode *bs, bool compress);
LamChild *lam_cbw_source(LamNode *bs);
LamChild *lam_cbw_target(LamNode *bs);

#endif
