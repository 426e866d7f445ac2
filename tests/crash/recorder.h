/* The "recorder" protocol driver for the crash-consistency test.
 *
 * A recorder node serves reads and writes from an in-memory file (a
 * CrashRec) and appends every write, write_zeroes, discard, truncate and
 * flush it receives to the CrashRec's log, in the order they took effect.
 * The log is what a power cut could have left on a disk: everything before
 * a flush is durable, anything after it may be lost, torn or reordered.
 *
 * A node finds its CrashRec by the "filename" option:
 *   {"driver": "recorder", "filename": "rec0"}
 * The CrashRec must have been created with crash_rec_new("rec0", ...) and
 * crash_recorder_register() called before the node is opened.
 */
#ifndef LAMINA_CRASH_RECORDER_H
#define LAMINA_CRASH_RECORDER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    CR_WRITE,     /* data[0..len) at off */
    CR_ZERO,      /* write_zeroes */
    CR_DISCARD,   /* the recorder punches a hole: reads zero afterwards */
    CR_TRUNCATE,  /* off = new length */
    CR_FLUSH,
} CrashOpType;

typedef struct CrashEntry {
    CrashOpType type;
    int64_t off;
    int64_t len;
    uint8_t *data;     /* CR_WRITE only (owned) */
    int guest_op;      /* workload op running when this entry was logged */
    bool fua;          /* durable once logged, without making others durable */
} CrashEntry;

typedef struct CrashRec {
    char *name;
    /* lock protects buf/len/cap and the log: an entry is appended in the
     * same critical section that applies it to buf, so the log order is
     * exactly the order the in-memory file saw. */
    pthread_mutex_t lock;
    uint8_t *buf;
    int64_t len, cap;
    CrashEntry *log;
    size_t nlog, log_cap;
    /* Set by the workload before each guest op (tags log entries). */
    _Atomic int cur_guest_op;
    /* Counters for the summary (under lock). */
    uint64_t bytes_written;
    uint32_t align;    /* request_alignment announced by the node */
    /* Writes/truncates that would grow the file beyond this fail with
     * ENOSPC (0: no limit), so a driver that allocates without bound
     * fails the test instead of eating the machine's memory. */
    int64_t max_len;
} CrashRec;

/* Registers the driver with the core (idempotent). */
void crash_recorder_register(void);

/* Creates a CrashRec whose file starts as a copy of init[0..len). */
CrashRec *crash_rec_new(const char *name, const uint8_t *init, int64_t len);
CrashRec *crash_rec_find(const char *name);
/* Unregisters and frees (no node may still use it). */
void crash_rec_free(CrashRec *r);

/* Applies one log entry to a file image held in (buf, len, cap), growing it.
 * Used by the replay, so replay and recorder agree on what an entry does.
 * Returns 0 or -ENOMEM. */
int crash_apply(const CrashEntry *e, uint8_t **buf, int64_t *len, int64_t *cap);
/* Same, restricted to the bytes [from, to) of the entry (a torn write). */
int crash_apply_part(const CrashEntry *e, int64_t from, int64_t to,
                     uint8_t **buf, int64_t *len, int64_t *cap);

#endif
