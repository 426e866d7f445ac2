/* NBD server internals shared by server.c (listeners, connections),
 * export.c (export registry), handshake.c (option haggling), conn.c
 * (transmission phase) and sockio.c (socket helpers).
 *
 * THREADS
 *   control thread: lam_nbd_* API (graph changes: root attach/detach)
 *   accept threads: one per listening socket; create connections
 *   connection threads: one per client: handshake, then reads requests
 *     and serves those that need not wait (page-cache hits) itself
 *   pool workers: execute the other requests and send their replies
 *
 * LOCK ORDER (outer to inner): nbd_srv.lock -> conn->lock -> conn->send_lock.
 * No lock is held across block-layer I/O.
 */
#ifndef LAMINA_NBD_INT_H
#define LAMINA_NBD_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "lamina/block.h"
#include "lamina/threadpool.h"
#include "nbd/nbd.h"

typedef struct NbdExport {
    char *id;
    char *name;
    char *description; /* NULL: none */
    LamNode *node;     /* reference held by the export */
    LamChild *root;    /* "an unnamed block device" */
    bool writable;
    bool writethrough;
    bool allocation_depth;
    int64_t size;      /* fixed while exported: resize is not shared */
    uint32_t pref_block;
    int nconns;        /* connections in transmission on it (nbd_srv.lock) */
    bool shutting_down; /* being deleted: no new connections (nbd_srv.lock) */
    struct NbdExport *next;
} NbdExport;

typedef struct NbdConn NbdConn;

/* Most chunks in one structured READ reply (data/hole extents). */
#define NBD_MAX_READ_CHUNKS 64
#define NBD_REPLY_IOV (2 * NBD_MAX_READ_CHUNKS)

/* One in-flight request.  Slots are preallocated per connection and keep
 * their buffer between requests, so the steady state does not malloc. */
typedef struct NbdReq {
    LamTask task;
    NbdConn *conn;
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t offset;
    uint32_t len;
    uint32_t charge;   /* bytes counted against the connection budget */
    uint8_t *buf;
    size_t bufcap;
    struct NbdReq *next_free;
    /* The reply, built by whoever executed the request and sent by the
     * connection's current sender: headers live in rhdr, payloads in buf. */
    uint8_t rhdr[NBD_MAX_READ_CHUNKS * 32];
    struct iovec riov[NBD_REPLY_IOV];
    int rniov;
    struct NbdReq *next_send;
} NbdReq;

/* Requests in flight per connection (read but not yet replied to). */
#define NBD_CONN_SLOTS 16
/* Payload bytes buffered for in-flight requests of one connection. */
#define NBD_CONN_BUDGET (64u * 1024 * 1024)
/* Slot buffers larger than this are freed after use. */
#define NBD_SLOT_KEEP (1024u * 1024)
#define NBD_RBUF_SIZE (64u * 1024)
/* Requests up to this size are served by the connection thread when it
 * has nothing else buffered (it would only sleep in recv otherwise). */
#define NBD_INLINE_MAX (64u * 1024)
/* Most replies of requests served by the connection thread itself that
 * wait to go out in one sendmsg (fewer make the client see them sooner). */
#define NBD_BATCH_MAX 8
/* A connection thread with at least this many more requests already
 * received hands a cached READ to the pool rather than serve it, when
 * there are fewer connections than CPUs: a backlog is then worth a core
 * that no connection thread uses (a worker) more than the wake-up it
 * costs.  With as many clients as CPUs, their threads keep the CPUs busy
 * and handing off only adds cost (measured: -30 % IOPS). */
#define NBD_SPREAD_MIN 6
/* A client that does not read its replies for this long is dropped, so
 * its requests stop holding pool workers. */
#define NBD_SEND_TIMEOUT_S 30

struct NbdConn {
    int fd;
    char peer[80];
    NbdExport *exp;      /* set by GO/EXPORT_NAME; counted in exp->nconns */
    uint32_t max_conns;  /* server setting at accept time */
    uint32_t inline_max; /* largest READ/WRITE served by this thread itself */
    int batch_max;       /* replies of served requests sent together */
    int spread_min;      /* backlog (in requests) that spreads READs */

    /* Negotiated state (connection thread only until transmission). */
    bool no_zeroes;
    bool structured;
    bool meta_base;      /* base:allocation selected */
    bool meta_depth;     /* qemu:allocation-depth selected */
    char *meta_export;   /* export name SET_META_CONTEXT referred to */
    uint16_t tflags;

    /* Buffered receive (connection thread only). */
    uint8_t *rbuf;
    size_t rpos, rlen;
    int64_t deadline_ms; /* handshake deadline (monotonic); 0 = none */

    /* send_lock protects the reply queue, sending and send_failed.  It is
     * held only to queue or take replies: the thread that finds nobody
     * sending becomes the sender and writes queued replies (whole, one
     * after another, several per sendmsg) without holding it, so other
     * workers never block on a busy socket. */
    pthread_mutex_t send_lock;
    NbdReq *sendq_head, *sendq_tail;
    bool sending;
    bool send_failed;

    /* lock protects free_slots, in_flight, inflight_bytes; cond is
     * broadcast when a request finishes. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    NbdReq slots[NBD_CONN_SLOTS];
    NbdReq *free_slots;
    int in_flight;
    uint64_t inflight_bytes;

    /* nbd_srv.lock protects these. */
    bool kicked;         /* socket shut down by the server */
    struct NbdConn *next;
};

typedef struct NbdListener {
    int fd;
    pthread_t thread;
} NbdListener;

#define NBD_MAX_LISTENERS 8

typedef struct NbdServer {
    /* lock protects everything in this struct; cond is broadcast when a
     * connection exits or leaves an export. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool running;
    bool stopping;
    uint32_t max_connections;
    NbdListener listeners[NBD_MAX_LISTENERS];
    int nlisteners;
    int wake_pipe[2];
    char *unix_path;     /* unlinked on stop if still our socket */
    dev_t unix_dev;
    ino_t unix_ino;
    char *bound_addr;    /* "host:port" or "unix:path" actually bound */
    NbdExport *exports;
    NbdConn *conns;
    int nconns;
    LamThreadPool *pool;
    unsigned handshake_ms;
    unsigned send_timeout_ms;
    uint32_t inline_max;
    int batch_max;
    int spread_min;
    int ncpus;
    /* Connection threads in transmission (atomic, no lock). */
    _Atomic int tx_conns;
} NbdServer;

extern NbdServer nbd_srv;

/* export.c (callers hold nbd_srv.lock where noted) */
NbdExport *nbd_export_find_name_locked(const char *name);
/* Attaches conn to the export named name; NULL if missing/shutting down. */
NbdExport *nbd_export_get(const char *name);
void nbd_export_put(NbdExport *exp);
void nbd_export_remove_all(void);

/* server.c */
int64_t nbd_now_ms(void);
/* Shuts down the sockets of connections on exp (NULL = all). Locked. */
void nbd_kick_conns_locked(NbdExport *exp);

/* handshake.c: 0 = enter transmission (conn->exp set), <0 = close. */
int nbd_handshake(NbdConn *conn);
uint16_t nbd_transmission_flags(NbdConn *conn, NbdExport *exp);

/* conn.c */
void nbd_transmission(NbdConn *conn);
void nbd_conn_init_slots(NbdConn *conn);
void nbd_conn_free_slots(NbdConn *conn);

/* sockio.c */
/* Reads exactly len bytes (through conn->rbuf); honours deadline_ms.
 * 0, or -1 on EOF/error/timeout. */
int nbd_read(NbdConn *conn, void *buf, size_t len);
/* Discards len bytes of input. */
int nbd_skip(NbdConn *conn, size_t len);
/* Sends all iovecs (during transmission: only the connection's sender). */
int nbd_sendv(NbdConn *conn, struct iovec *iov, int niov);
int nbd_send(NbdConn *conn, const void *buf, size_t len);

#endif
