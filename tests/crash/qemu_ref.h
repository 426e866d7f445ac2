/* Reference mode: the same workload run through QEMU's own qcow2 driver
 * (qemu-io), its file writes captured by QEMU's blklogwrites filter in
 * the dm-log-writes format.  Judging QEMU's crash images with the same
 * replay, checks and content model shows the test has no false positives:
 * a driver known to be crash-safe must pass it.
 *
 * Guest op boundaries in the log come from marker writes: between two
 * guest ops, qemu-io writes one whole cluster just past the guest area
 * (the workload never touches it) with a pattern byte that counts up; the
 * log entry carrying that pattern marks the boundary. */
#ifndef LAMINA_CRASH_QEMU_REF_H
#define LAMINA_CRASH_QEMU_REF_H

#include "recorder.h"
#include "workload.h"

/* Runs w (single-threaded) on the qcow2 image `path` (virtual size at
 * least guest size + cluster), fills each op's ret/log_start/log_end and
 * returns the log (entries owned by the caller).  0 / -errno (*err set). */
int qemu_ref_record(const char *dir, const char *path, Workload *w,
                    int64_t marker_off, int64_t cluster, CrashEntry **log,
                    size_t *nlog, char **err);

/* Parses a dm-log-writes log.  Entries are validated against the file
 * size.  0 / -EINVAL. */
int dmlog_parse(const uint8_t *buf, int64_t len, CrashEntry **log,
                size_t *nlog);

#endif
