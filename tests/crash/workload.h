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
    int thread;         /* guest thread that issues it */
    /* The file log had log_start entries when this op was issued and
     * log_end when it returned: its own entries lie in between (with other
     * threads' entries interleaved). */
    size_t log_start, log_end;
} GuestOp;

typedef struct WorkloadParams {
    int64_t size;          /* guest size */
    int64_t cluster;       /* cluster size (shapes the offsets chosen) */
    int nops;             /* per thread */
    int nthreads;         /* 1..CRASH_MAX_THREADS */
    int64_t fill_max;     /* longest sequential fill (0: 16 clusters) */
    int mix;              /* 0 default, 1 discard-heavy */
    bool compress;        /* some whole-cluster writes are compressed */
    uint64_t seed;
} WorkloadParams;

#define CRASH_MAX_THREADS 8

/* With several guest threads, each owns every nthreads-th stripe of the
 * disk (so threads share L2 tables and refcount blocks but never write the
 * same guest byte) and issues its ops, flushes included, in order.  A
 * thread's flush makes that thread's earlier ops durable. */
typedef struct Workload {
    WorkloadParams p;
    GuestOp *ops;
    int nops;
    int64_t stripe;
    int tstart[CRASH_MAX_THREADS + 1]; /* thread t: ops [tstart[t], tstart[t+1]) */
} Workload;

/* Generates the operations (no I/O). */
void workload_generate(Workload *w, const WorkloadParams *p);
void workload_free(Workload *w);

/* Runs every op through root `c`, one pthread per guest thread, noting the
 * recorder's log positions.  Returns the number of ops that failed. */
struct CrashRec;
int workload_run(Workload *w, LamChild *c, struct CrashRec *rec);

/* ---- content model ---- */

enum { ALT_ZERO = 1, ALT_BACKING = 2 };

typedef struct Model {
    int64_t size;
    const uint8_t *backing;   /* content a never-written byte reads as */
    uint8_t *val;             /* value after the durable prefix */
    uint8_t *alt;             /* ALT_*: other values also allowed */
    int applied[CRASH_MAX_THREADS]; /* thread t: ops [tstart[t], applied[t]) */
} Model;

/* Per guest thread t, ops [tstart[t], durable[t]) must have reached the
 * disk and ops [durable[t], started[t]) may have -- except that a FUA
 * write among the latter that returned must be there too (unless a later
 * op overwrote it). */
typedef struct OpWindow {
    int durable[CRASH_MAX_THREADS];
    int started[CRASH_MAX_THREADS];
    size_t pos;   /* the crash position; ops with log_end <= pos returned */
} OpWindow;

void model_init(Model *m, const Workload *w, int64_t size,
                const uint8_t *backing);
void model_free(Model *m);
/* The window of a crash at log position pos. */
void model_window(const Workload *w, size_t pos, OpWindow *win);
/* Applies the durable ops of win not applied yet.  Returns -1 if win is
 * behind what was already applied (cuts must come in order). */
int model_advance(Model *m, const Workload *w, const OpWindow *win);

/* Checks what the guest read after a crash, got[0..size), against the
 * model: bytes must equal the durable value (or an allowed alternative),
 * or a value some op started but not made durable could have left.
 * Returns the number of bytes that fit neither; *first_bad gets the first
 * such offset (-1 if none). */
int64_t model_verify(const Model *m, const Workload *w, const OpWindow *win,
                     const uint8_t *got, int64_t *first_bad);

#endif
