/* Transmission phase.  The connection thread reads requests (and write
 * payloads), validates them and hands them to the worker pool (or serves a
 * small one itself when it has nothing else to read); whoever executes a
 * request does the I/O through the export's root edge, builds the whole
 * reply in the request slot and queues it (queue_reply), so chunks of
 * different replies never interleave.  In-flight requests per connection
 * are bounded by NBD_CONN_SLOTS and NBD_CONN_BUDGET bytes of payload. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd/nbd-int.h"
#include "nbd/nbd-proto.h"

#define container_of(ptr, type, member) \
    ((type *)((char *)(ptr) - offsetof(type, member)))

/* Reads at least this long look for holes to send as OFFSET_HOLE; smaller
 * ones are answered with one data chunk (a status lookup per 4k read would
 * cost more than the zeroes it saves). */
#define NBD_SPARSE_MIN (64u * 1024)

/* Extents per block status chunk (the spec suggests at most 2^20). */
#define NBD_MAX_EXTENTS 65536

int nbd_errno_to_wire(int err)
{
    switch (-err) {
    case 0:
        return 0;
    case EPERM:
    case EROFS:
        return NBD_EPERM;
    case EIO:
        return NBD_EIO;
    case ENOMEM:
        return NBD_ENOMEM;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return NBD_ENOSPC;
    case EOVERFLOW:
        return NBD_EOVERFLOW;
    case ENOTSUP:
        return NBD_ENOTSUP;
    case ESHUTDOWN:
        return NBD_ESHUTDOWN;
    default:
        return NBD_EINVAL;
    }
}

void nbd_conn_init_slots(NbdConn *c)
{
    c->free_slots = NULL;
    for (int i = NBD_CONN_SLOTS - 1; i >= 0; i--) {
        c->slots[i].conn = c;
        c->slots[i].next_free = c->free_slots;
        c->free_slots = &c->slots[i];
    }
}

void nbd_conn_free_slots(NbdConn *c)
{
    for (int i = 0; i < NBD_CONN_SLOTS; i++) {
        free(c->slots[i].buf);
        c->slots[i].buf = NULL;
        c->slots[i].bufcap = 0;
    }
}

/* A free slot with room for charge bytes; NULL if that needs a wait and
 * wait is false. */
static NbdReq *get_slot(NbdConn *c, uint32_t charge, bool wait)
{
    pthread_mutex_lock(&c->lock);
    while (!c->free_slots ||
           (c->in_flight > 0 && c->inflight_bytes + charge > NBD_CONN_BUDGET)) {
        if (!wait) {
            pthread_mutex_unlock(&c->lock);
            return NULL;
        }
        pthread_cond_wait(&c->cond, &c->lock);
    }
    NbdReq *r = c->free_slots;
    c->free_slots = r->next_free;
    c->in_flight++;
    c->inflight_bytes += charge;
    r->charge = charge;
    pthread_mutex_unlock(&c->lock);
    return r;
}

/* Returns the slots of a list of requests linked by next_send (or one
 * request with r->next_send == NULL) under one lock acquisition. */
static void put_slots(NbdReq *list)
{
    NbdConn *c = list->conn;
    for (NbdReq *r = list; r; r = r->next_send) {
        if (r->bufcap > NBD_SLOT_KEEP) {
            free(r->buf);
            r->buf = NULL;
            r->bufcap = 0;
        }
    }
    pthread_mutex_lock(&c->lock);
    while (list) {
        NbdReq *next = list->next_send;
        list->next_free = c->free_slots;
        c->free_slots = list;
        c->in_flight--;
        c->inflight_bytes -= list->charge;
        list = next;
    }
    pthread_cond_signal(&c->cond); /* only the connection thread waits */
    pthread_mutex_unlock(&c->lock);
}

static void put_slot(NbdReq *r)
{
    r->next_send = NULL;
    put_slots(r);
}

static int ensure_buf(NbdReq *r, size_t len)
{
    if (r->bufcap >= len) {
        return 0;
    }
    free(r->buf);
    r->buf = NULL;
    r->bufcap = 0;
    size_t cap = len < 4096 ? 4096 : (len + 4095) & ~(size_t)4095;
    void *p;
    if (posix_memalign(&p, 4096, cap) != 0) {
        return -ENOMEM;
    }
    r->buf = p;
    r->bufcap = cap;
    return 0;
}

/* ---- sending ---- */

/* Writes a batch of replies, packing several into each sendmsg. */
static int send_batch(NbdConn *c, NbdReq *batch)
{
    struct iovec iov[4 * NBD_REPLY_IOV];
    int n = 0;
    for (NbdReq *r = batch; r; r = r->next_send) {
        if (n + r->rniov > (int)(sizeof(iov) / sizeof(iov[0]))) {
            if (nbd_sendv(c, iov, n) < 0) {
                return -1;
            }
            n = 0;
        }
        memcpy(iov + n, r->riov, r->rniov * sizeof(iov[0]));
        n += r->rniov;
    }
    return n ? nbd_sendv(c, iov, n) : 0;
}

/* Queues the replies of the list first..last (linked by next_send); the
 * slots are released once the replies are written.  The first thread to
 * find the connection idle sends until the queue is empty (flat
 * combining), the others return at once. */
static void queue_replies(NbdConn *c, NbdReq *first, NbdReq *last)
{
    last->next_send = NULL;
    pthread_mutex_lock(&c->send_lock);
    if (c->sendq_tail) {
        c->sendq_tail->next_send = first;
    } else {
        c->sendq_head = first;
    }
    c->sendq_tail = last;
    if (c->sending) {
        pthread_mutex_unlock(&c->send_lock);
        return;
    }
    c->sending = true;
    for (;;) {
        NbdReq *batch = c->sendq_head;
        c->sendq_head = c->sendq_tail = NULL;
        bool failed = c->send_failed;
        pthread_mutex_unlock(&c->send_lock);
        if (!failed && send_batch(c, batch) < 0) {
            failed = true;
            /* Wake the connection thread: this client is gone. */
            shutdown(c->fd, SHUT_RDWR);
        }
        pthread_mutex_lock(&c->send_lock);
        c->send_failed |= failed;
        bool last_batch = !c->sendq_head;
        if (last_batch) {
            c->sending = false;
        }
        pthread_mutex_unlock(&c->send_lock);
        /* Releasing the slots may let the connection be freed: after the
         * last batch, c must not be touched again.  While more replies
         * are queued their slots keep it alive. */
        put_slots(batch);
        if (last_batch) {
            return;
        }
        pthread_mutex_lock(&c->send_lock);
    }
}

static void queue_reply(NbdConn *c, NbdReq *r)
{
    queue_replies(c, r, r);
}

static void set_reply1(NbdReq *r, void *a, size_t alen)
{
    r->riov[0] = (struct iovec){ a, alen };
    r->rniov = 1;
}

static void set_reply2(NbdReq *r, void *a, size_t alen, void *b, size_t blen)
{
    r->riov[0] = (struct iovec){ a, alen };
    r->riov[1] = (struct iovec){ b, blen };
    r->rniov = 2;
}

static void chunk_hdr(uint8_t *h, uint16_t flags, uint16_t type,
                      uint64_t cookie, uint32_t len)
{
    nbd_put32(h, NBD_STRUCTURED_REPLY_MAGIC);
    nbd_put16(h + 4, flags);
    nbd_put16(h + 6, type);
    nbd_put64(h + 8, cookie);
    nbd_put32(h + 16, len);
}

/* Success or error for a reply without payload. */
static void send_status(NbdConn *c, NbdReq *r, int neg_errno)
{
    int err = nbd_errno_to_wire(neg_errno);
    uint8_t *h = r->rhdr;
    if (!c->structured || (err == 0 && r->type != NBD_CMD_READ)) {
        nbd_put32(h, NBD_SIMPLE_REPLY_MAGIC);
        nbd_put32(h + 4, err);
        nbd_put64(h + 8, r->cookie);
        set_reply1(r, h, NBD_SIMPLE_REPLY_SIZE);
        return;
    }
    if (err == 0) {
        chunk_hdr(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, r->cookie, 0);
        set_reply1(r, h, NBD_CHUNK_HDR_SIZE);
        return;
    }
    char msg[128];
    snprintf(msg, sizeof(msg), "%s", strerror(-neg_errno));
    size_t ml = strlen(msg);
    chunk_hdr(h, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, r->cookie,
              (uint32_t)(6 + ml));
    nbd_put32(h + 20, err);
    nbd_put16(h + 24, (uint16_t)ml);
    memcpy(h + 26, msg, ml);
    set_reply1(r, h, NBD_CHUNK_HDR_SIZE + 6 + ml);
}

/* ---- request execution (pool workers) ---- */

static int block_status(NbdExport *exp, int64_t off, int64_t bytes,
                        int64_t *pnum, int *depth)
{
    int64_t map = 0;
    LamNode *file = NULL;
    int d = 0;
    int ret = lam_co_block_status_above(exp->root, NULL, off, bytes, pnum, &map,
                                        &file, &d);
    if (depth) {
        *depth = d;
    }
    if (ret >= 0 && *pnum > bytes) {
        *pnum = bytes;
    }
    return ret;
}

/* Builds the reply of a READ.  With nowait (LAM_REQ_NOWAIT) it may
 * instead return -EAGAIN, with no reply built: the request must then be
 * run without it. */
static int do_read(NbdConn *c, NbdReq *r, int nowait)
{
    NbdExport *exp = c->exp;
    if (nowait && c->structured && r->len >= NBD_SPARSE_MIN &&
        !(r->flags & NBD_CMD_FLAG_DF)) {
        return -EAGAIN; /* hole detection does status lookups that may wait */
    }
    int ret = ensure_buf(r, r->len);
    if (ret < 0) {
        send_status(c, r, ret);
        return 0;
    }
    if (r->len == 0) {
        send_status(c, r, 0);
        return 0;
    }
    if (!c->structured) {
        ret = lam_co_pread(exp->root, r->offset, r->len, r->buf, nowait);
        if (ret == -EAGAIN && nowait) {
            return ret;
        }
        if (ret < 0) {
            send_status(c, r, ret);
            return 0;
        }
        uint8_t *h = r->rhdr;
        nbd_put32(h, NBD_SIMPLE_REPLY_MAGIC);
        nbd_put32(h + 4, 0);
        nbd_put64(h + 8, r->cookie);
        set_reply2(r, h, NBD_SIMPLE_REPLY_SIZE, r->buf, r->len);
        return 0;
    }

    /* Structured: split into data and hole extents. */
    struct {
        uint32_t start, len;
        bool hole;
    } ext[NBD_MAX_READ_CHUNKS];
    int n = 0;
    uint32_t pos = 0;
    if (r->len >= NBD_SPARSE_MIN && !(r->flags & NBD_CMD_FLAG_DF)) {
        while (pos < r->len && n < NBD_MAX_READ_CHUNKS) {
            int64_t pnum = 0;
            ret = block_status(exp, r->offset + pos, r->len - pos, &pnum, NULL);
            if (ret < 0 || pnum <= 0) {
                break; /* unknown: read the rest as data */
            }
            bool hole = ret & LAM_BS_ZERO;
            if (n > 0 && ext[n - 1].hole == hole) {
                ext[n - 1].len += pnum;
            } else {
                ext[n].start = pos;
                ext[n].len = pnum;
                ext[n].hole = hole;
                n++;
            }
            pos += pnum;
        }
    }
    if (pos < r->len) {
        if (n > 0 && !ext[n - 1].hole) {
            ext[n - 1].len += r->len - pos;
        } else if (n < NBD_MAX_READ_CHUNKS) {
            ext[n].start = pos;
            ext[n].len = r->len - pos;
            ext[n].hole = false;
            n++;
        } else {
            /* Last slot is a hole: turn it into data covering the rest. */
            ext[n - 1].hole = false;
            ext[n - 1].len = r->len - ext[n - 1].start;
        }
    }
    for (int i = 0; i < n; i++) {
        if (!ext[i].hole) {
            ret = lam_co_pread(exp->root, r->offset + ext[i].start, ext[i].len,
                               r->buf + ext[i].start, nowait);
            if (ret == -EAGAIN && nowait) {
                return ret;
            }
            if (ret < 0) {
                send_status(c, r, ret);
                return 0;
            }
        }
    }
    struct iovec *iov = r->riov;
    int niov = 0;
    for (int i = 0; i < n; i++) {
        uint8_t *h = r->rhdr + 32 * i;
        uint16_t fl = i == n - 1 ? NBD_REPLY_FLAG_DONE : 0;
        if (ext[i].hole) {
            chunk_hdr(h, fl, NBD_REPLY_TYPE_OFFSET_HOLE, r->cookie, 12);
            nbd_put64(h + 20, r->offset + ext[i].start);
            nbd_put32(h + 28, ext[i].len);
            iov[niov++] = (struct iovec){ h, NBD_CHUNK_HDR_SIZE + 12 };
        } else {
            chunk_hdr(h, fl, NBD_REPLY_TYPE_OFFSET_DATA, r->cookie,
                      8 + ext[i].len);
            nbd_put64(h + 20, r->offset + ext[i].start);
            iov[niov++] = (struct iovec){ h, NBD_CHUNK_HDR_SIZE + 8 };
            iov[niov++] = (struct iovec){ r->buf + ext[i].start, ext[i].len };
        }
    }
    r->rniov = niov;
    return 0;
}

/* One BLOCK_STATUS chunk payload for a context into buf (4 + 8n bytes). */
static int status_extents(NbdConn *c, NbdReq *r, bool depth_ctx, uint8_t *buf,
                          uint32_t max_ext, uint32_t *out_len)
{
    NbdExport *exp = c->exp;
    uint32_t n = 0;
    uint64_t pos = 0;
    uint32_t last_flags = 0;
    nbd_put32(buf, depth_ctx ? NBD_META_ID_ALLOCATION_DEPTH
                             : NBD_META_ID_BASE_ALLOCATION);
    while (pos < r->len) {
        int64_t pnum = 0;
        int depth = 0;
        int ret = block_status(exp, r->offset + pos, r->len - pos, &pnum, &depth);
        if (ret < 0) {
            return ret;
        }
        if (pnum <= 0) {
            break;
        }
        uint32_t flags;
        if (depth_ctx) {
            flags = (uint32_t)depth;
        } else {
            flags = (ret & LAM_BS_DATA ? 0 : NBD_STATE_HOLE) |
                    (ret & LAM_BS_ZERO ? NBD_STATE_ZERO : 0);
        }
        if (n > 0 && flags == last_flags) {
            uint8_t *e = buf + 4 + 8 * (n - 1);
            nbd_put32(e, nbd_get32(e) + (uint32_t)pnum);
        } else {
            if (n == max_ext) {
                break;
            }
            uint8_t *e = buf + 4 + 8 * n;
            nbd_put32(e, (uint32_t)pnum);
            nbd_put32(e + 4, flags);
            last_flags = flags;
            n++;
        }
        pos += pnum;
        if (max_ext == 1) {
            break; /* REQ_ONE: one lookup is the answer */
        }
    }
    if (n == 0) {
        return -EINVAL;
    }
    *out_len = 4 + 8 * n;
    return 0;
}

static void do_block_status(NbdConn *c, NbdReq *r)
{
    uint32_t max_ext = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
    size_t per = 4 + 8 * (size_t)max_ext;
    int ret = ensure_buf(r, 2 * per);
    if (ret < 0) {
        send_status(c, r, ret);
        return;
    }
    uint32_t len_base = 0, len_depth = 0;
    if (c->meta_base) {
        ret = status_extents(c, r, false, r->buf, max_ext, &len_base);
    }
    if (ret == 0 && c->meta_depth) {
        ret = status_extents(c, r, true, r->buf + per, max_ext, &len_depth);
    }
    if (ret < 0) {
        send_status(c, r, ret);
        return;
    }
    uint8_t *h1 = r->rhdr, *h2 = r->rhdr + 32;
    struct iovec *iov = r->riov;
    int niov = 0;
    if (c->meta_base) {
        chunk_hdr(h1, c->meta_depth ? 0 : NBD_REPLY_FLAG_DONE,
                  NBD_REPLY_TYPE_BLOCK_STATUS, r->cookie, len_base);
        iov[niov++] = (struct iovec){ h1, NBD_CHUNK_HDR_SIZE };
        iov[niov++] = (struct iovec){ r->buf, len_base };
    }
    if (c->meta_depth) {
        chunk_hdr(h2, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
                  r->cookie, len_depth);
        iov[niov++] = (struct iovec){ h2, NBD_CHUNK_HDR_SIZE };
        iov[niov++] = (struct iovec){ r->buf + per, len_depth };
    }
    r->rniov = niov;
}

static int do_cache(NbdConn *c, NbdReq *r)
{
    /* Reading the range pulls it into the lower layers' caches. */
    const uint32_t step = 1024 * 1024;
    int ret = ensure_buf(r, r->len < step ? r->len : step);
    for (uint64_t pos = 0; ret == 0 && pos < r->len; pos += step) {
        uint32_t n = r->len - pos < step ? (uint32_t)(r->len - pos) : step;
        ret = lam_co_pread(c->exp->root, r->offset + pos, n, r->buf, 0);
    }
    return ret;
}

/* Executes r and builds its reply.  nowait is 0 or LAM_REQ_NOWAIT (READ
 * and WRITE only): then it returns -EAGAIN, with nothing done, when the
 * request would have to wait; otherwise 0. */
static int req_exec(NbdConn *c, NbdReq *r, int nowait)
{
    NbdExport *exp = c->exp;
    int wflags = (r->flags & NBD_CMD_FLAG_FUA) || exp->writethrough
                     ? LAM_REQ_FUA : 0;
    int ret;

    switch (r->type) {
    case NBD_CMD_READ:
        return do_read(c, r, nowait);
    case NBD_CMD_WRITE:
        ret = lam_co_pwrite(exp->root, r->offset, r->len, r->buf,
                            wflags | nowait);
        if (ret == -EAGAIN && nowait) {
            return ret;
        }
        send_status(c, r, ret == -ENOTSUP ? -EINVAL : ret);
        break;
    case NBD_CMD_FLUSH:
        send_status(c, r, lam_co_flush(exp->root));
        break;
    case NBD_CMD_TRIM:
        ret = lam_co_pdiscard(exp->root, r->offset, r->len);
        if (ret == 0 && wflags) {
            ret = lam_co_flush(exp->root);
        }
        send_status(c, r, ret == -ENOTSUP ? 0 : ret); /* advisory */
        break;
    case NBD_CMD_WRITE_ZEROES: {
        int zf = wflags;
        if (!(r->flags & NBD_CMD_FLAG_NO_HOLE)) {
            zf |= LAM_REQ_MAY_UNMAP;
        }
        if (r->flags & NBD_CMD_FLAG_FAST_ZERO) {
            zf |= LAM_REQ_NO_FALLBACK;
        }
        ret = lam_co_pwrite_zeroes(exp->root, r->offset, r->len, zf);
        if (ret == -ENOTSUP && !(r->flags & NBD_CMD_FLAG_FAST_ZERO)) {
            ret = -EINVAL;
        }
        send_status(c, r, ret);
        break;
    }
    case NBD_CMD_CACHE:
        send_status(c, r, do_cache(c, r));
        break;
    case NBD_CMD_BLOCK_STATUS:
        do_block_status(c, r);
        break;
    }
    return 0;
}

static void req_run(LamTask *t)
{
    NbdReq *r = container_of(t, NbdReq, task);
    req_exec(r->conn, r, 0);
    queue_reply(r->conn, r);
}

/* ---- connection thread ---- */

/* Returns 0 or a negative errno to reply with. */
static int validate(NbdConn *c, NbdReq *r)
{
    NbdExport *exp = c->exp;
    uint16_t allowed = NBD_CMD_FLAG_FUA;
    bool write = false, range = true;
    switch (r->type) {
    case NBD_CMD_READ:
        if (c->structured) {
            allowed |= NBD_CMD_FLAG_DF;
        }
        break;
    case NBD_CMD_WRITE:
    case NBD_CMD_TRIM:
        write = true;
        break;
    case NBD_CMD_WRITE_ZEROES:
        write = true;
        allowed |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
        break;
    case NBD_CMD_FLUSH:
        range = false;
        break;
    case NBD_CMD_CACHE:
        break;
    case NBD_CMD_BLOCK_STATUS:
        allowed |= NBD_CMD_FLAG_REQ_ONE;
        if (!c->structured || (!c->meta_base && !c->meta_depth)) {
            return -EINVAL;
        }
        break;
    default:
        return -EINVAL;
    }
    if (r->flags & ~allowed) {
        return -EINVAL;
    }
    if (write && !exp->writable) {
        return -EPERM;
    }
    if (range && (r->offset > (uint64_t)exp->size ||
                  r->len > (uint64_t)exp->size - r->offset)) {
        return (r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES)
                   ? -ENOSPC : -EINVAL;
    }
    if (r->type == NBD_CMD_READ && r->len > NBD_MAX_PAYLOAD) {
        return (r->flags & NBD_CMD_FLAG_DF) ? -EOVERFLOW : -EINVAL;
    }
    return 0;
}

/* Replies of requests the connection thread served itself: they go out
 * together, in one sendmsg, before the thread waits for anything (input,
 * a slot, a blocking request) or when NBD_BATCH_MAX have gathered. */
typedef struct ReplyBatch {
    NbdReq *head, *tail;
    int n;
} ReplyBatch;

static void batch_add(ReplyBatch *b, NbdReq *r)
{
    r->next_send = NULL;
    if (b->tail) {
        b->tail->next_send = r;
    } else {
        b->head = r;
    }
    b->tail = r;
    b->n++;
}

static void batch_flush(NbdConn *c, ReplyBatch *b)
{
    if (b->n) {
        queue_replies(c, b->head, b->tail);
        b->head = b->tail = NULL;
        b->n = 0;
    }
}

void nbd_transmission(NbdConn *c)
{
    uint32_t inline_max = c->inline_max;
    int batch_max = c->batch_max;
    size_t spread_bytes = (size_t)c->spread_min * NBD_REQUEST_SIZE;
    ReplyBatch batch = { NULL, NULL, 0 };
    bool hard = true; /* all exits but NBD_CMD_DISC drop the client */
    atomic_fetch_add(&nbd_srv.tx_conns, 1);
    for (;;) {
        uint8_t h[NBD_REQUEST_SIZE];
        if (c->rpos + sizeof(h) > c->rlen) {
            batch_flush(c, &batch); /* recv() may sleep */
        }
        if (nbd_read(c, h, sizeof(h)) < 0) {
            break;
        }
        if (nbd_get32(h) != NBD_REQUEST_MAGIC) {
            break; /* lost framing: hard disconnect */
        }
        uint16_t flags = nbd_get16(h + 4);
        uint16_t type = nbd_get16(h + 6);
        uint32_t len = nbd_get32(h + 24);
        if (type == NBD_CMD_DISC) {
            hard = false; /* replies to earlier requests still go out */
            break;
        }
        if (type == NBD_CMD_WRITE && len > NBD_MAX_PAYLOAD) {
            break; /* we would have to swallow a huge payload: drop */
        }
        uint32_t charge = 0;
        if ((type == NBD_CMD_WRITE || type == NBD_CMD_READ) &&
            len <= NBD_MAX_PAYLOAD) {
            charge = len;
        }
        NbdReq *r = get_slot(c, charge, false);
        if (!r) {
            /* Our own unsent replies may hold the slots we wait for. */
            batch_flush(c, &batch);
            r = get_slot(c, charge, true);
        }
        r->flags = flags;
        r->type = type;
        r->cookie = nbd_get64(h + 8);
        r->offset = nbd_get64(h + 16);
        r->len = len;
        int err = 0;
        if (type == NBD_CMD_WRITE) {
            if (c->rlen - c->rpos < len) {
                batch_flush(c, &batch);
            }
            err = ensure_buf(r, len);
            if (err < 0 ? nbd_skip(c, len) < 0
                        : nbd_read(c, r->buf, len) < 0) {
                put_slot(r);
                break;
            }
        }
        if (err == 0) {
            err = validate(c, r);
        }
        if (err < 0) {
            send_status(c, r, err);
            batch_add(&batch, r);
            continue;
        }
        bool small = len <= inline_max &&
                     (type == NBD_CMD_READ ||
                      (type == NBD_CMD_WRITE && !(flags & NBD_CMD_FLAG_FUA) &&
                       !c->exp->writethrough));
        /* Page-cache hits are served here: handing them to a worker costs
         * more (a wake-up and two context switches) than the copy.  Unless
         * a backlog of requests waits here and there are fewer clients
         * than CPUs (see NBD_SPREAD_MIN); writes don't gain (the file
         * system serialises buffered writes to a file). */
        if (small && type == NBD_CMD_READ && spread_bytes &&
            c->rlen - c->rpos >= spread_bytes &&
            atomic_load_explicit(&nbd_srv.tx_conns, memory_order_relaxed) < nbd_srv.ncpus) {
            small = false;
        }
        if (small && req_exec(c, r, LAM_REQ_NOWAIT) == 0) {
            batch_add(&batch, r);
            if (batch.n >= batch_max) {
                batch_flush(c, &batch);
            }
            continue;
        }
        r->task.fn = req_run;
        if ((small && c->rpos == c->rlen) ||
            lam_threadpool_submit(nbd_srv.pool, &r->task) < 0) {
            /* Nothing more buffered: this thread would only sleep in
             * recv(), so it serves the request itself instead of paying
             * for waking a worker (not FUA writes: a flush can take long). */
            batch_flush(c, &batch);
            req_exec(c, r, 0);
            batch_add(&batch, r);
        }
    }
    atomic_fetch_sub(&nbd_srv.tx_conns, 1);
    if (hard) {
        /* Nobody will read further replies reliably: make a sender that
         * is blocked on this socket fail now rather than at the timeout. */
        shutdown(c->fd, SHUT_RDWR);
    }
    /* After a hard exit these sends fail at once; the slots are freed. */
    batch_flush(c, &batch);
    /* Every in-flight request finishes before the export is released. */
    pthread_mutex_lock(&c->lock);
    while (c->in_flight > 0) {
        pthread_cond_wait(&c->cond, &c->lock);
    }
    pthread_mutex_unlock(&c->lock);
}
