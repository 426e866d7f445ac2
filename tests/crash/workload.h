/* The guest side of the crash test: a deterministic sequence of guest
 * operations (writes, zero writes, discards, flushes) run through the core
 * API against an image whose file is a recorder node, and the per-byte
 * content model that says what a guest may read back after a crash. */
#ifndef LAMINA_CRASH_WORKLOAD_H
#define LAMINA_CRASH_WORKLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lamina/block.h"

typedef enum { G_WRITE, G_ZERO, G_DISCARD, G_FLUSH } GuestOpType;

typedef struct GuestOp {
    GuestOpType type;
    int64_t off, len;
    int flags;          /* LAM_REQ_* passed to the core */
    uint8_t *data;      /* G_WRITE (owned) */
    int ret;            /* what the core returned */
    /* File log entries [log_start, log_end) were made while this op ran
     * (the workload is single-threaded, so the range is exact). */
    size_t log_start, log_end;
} GuestOp;

typedef struct WorkloadParams {
    int64_t size;          /* guest size */
    int64_t cluster;       /* cluster size (shapes the offsets chosen) */
    int nops;
    uint64_t seed;
} WorkloadParams;

typedef struct Workload {
    WorkloadParams p;
    GuestOp *ops;
    int nops;
} Workload;

/* Generates the operations (no I/O). */
void workload_generate(Workload *w, const WorkloadParams *p);
void workload_free(Workload *w);

/* Runs every op through root `c`; tags the recorder's log.  `rec` is the
 * CrashRec (opaque here to keep this header core-only).  Returns the
 * number of ops that failed (their ret < 0). */
struct CrashRec;
int workload_run(Workload *w, LamChild *c, struct CrashRec *rec);

/* ---- content model ---- */

enum { ALT_ZERO = 1, ALT_BACKING = 2 };

typedef struct Model {
    int64_t size;
    const uint8_t *backing;   /* content a never-written byte reads as */
    uint8_t *val;             /* value after the durable prefix */
    uint8_t *alt;             /* ALT_*: other values also allowed */
    int applied;              /* ops [0, applied) are in val/alt */
} Model;

void model_init(Model *m, int64_t size, const uint8_t *backing);
void model_free(Model *m);
/* Applies ops [m->applied, upto) (upto >= m->applied). */
void model_advance(Model *m, const Workload *w, int upto);

/* Checks what the guest read after a crash, got[0..size), against the
 * model: bytes must equal the durable value (or an allowed alternative),
 * or a value some op in [from, to) (started but not made durable) could
 * have left.  Returns the number of bytes that fit neither; *first_bad
 * gets the first such offset (-1 if none). */
int64_t model_verify(const Model *m, const Workload *w, int from, int to,
                     const uint8_t *got, int64_t *first_bad);

#endif
