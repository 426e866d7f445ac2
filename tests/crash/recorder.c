/* The "recorder" protocol driver: an in-memory file that logs every
 * modification in order (see recorder.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "lamina/driver.h"
#include "recorder.h"

#define MAX_RECS 16

/* recs_lock protects recs[] (the name -> CrashRec table). */
static pthread_mutex_t recs_lock = PTHREAD_MUTEX_INITIALIZER;
static CrashRec *recs[MAX_RECS];

typedef struct RecState {
    CrashRec *rec;
} RecState;

static int grow(uint8_t **buf, int64_t *len, int64_t *cap, int64_t need)
{
    if (need > *cap) {
        int64_t ncap = *cap ? *cap : 65536;
        while (ncap < need) {
            ncap *= 2;
        }
        uint8_t *nb = realloc(*buf, (size_t)ncap);
        if (!nb) {
            return -ENOMEM;
        }
        *buf = nb;
        *cap = ncap;
    }
    if (need > *len) {
        memset(*buf + *len, 0, (size_t)(need - *len));
        *len = need;
    }
    return 0;
}

int crash_apply_part(const CrashEntry *e, int64_t from, int64_t to,
                     uint8_t **buf, int64_t *len, int64_t *cap)
{
    int ret;
    switch (e->type) {
    case CR_WRITE:
    case CR_ZERO:
    case CR_DISCARD:
        if (from >= to) {
            return 0;
        }
        ret = grow(buf, len, cap, e->off + to);
        if (ret < 0) {
            return ret;
        }
        if (e->type == CR_WRITE) {
            memcpy(*buf + e->off + from, e->data + from, (size_t)(to - from));
        } else {
            memset(*buf + e->off + from, 0, (size_t)(to - from));
        }
        return 0;
    case CR_TRUNCATE:
        if (e->off < *len) {
            *len = e->off;
            return 0;
        }
        return grow(buf, len, cap, e->off);
    case CR_FLUSH:
        return 0;
    }
    return 0;
}

int crash_apply(const CrashEntry *e, uint8_t **buf, int64_t *len, int64_t *cap)
{
    return crash_apply_part(e, 0, e->len, buf, len, cap);
}

/* Appends e (taking ownership of e->data) and applies it; under r->lock. */
static int log_and_apply(CrashRec *r, CrashEntry *e)
{
    if (r->nlog == r->log_cap) {
        size_t ncap = r->log_cap ? r->log_cap * 2 : 1024;
        CrashEntry *nl = realloc(r->log, ncap * sizeof(*nl));
        if (!nl) {
            return -ENOMEM;
        }
        r->log = nl;
        r->log_cap = ncap;
    }
    int ret = crash_apply(e, &r->buf, &r->len, &r->cap);
    if (ret < 0) {
        return ret;
    }
    e->guest_op = atomic_load(&r->cur_guest_op);
    r->log[r->nlog++] = *e;
    if (e->type == CR_WRITE || e->type == CR_ZERO) {
        r->bytes_written += (uint64_t)e->len;
    }
    return 0;
}

static int record(CrashRec *r, CrashEntry *e)
{
    pthread_mutex_lock(&r->lock);
    int64_t end = e->type == CR_TRUNCATE ? e->off :
                  e->type == CR_FLUSH ? 0 : e->off + e->len;
    int ret = r->max_len && end > r->max_len ? -ENOSPC : log_and_apply(r, e);
    pthread_mutex_unlock(&r->lock);
    if (ret < 0) {
        free(e->data);
    }
    return ret;
}

CrashRec *crash_rec_new(const char *name, const uint8_t *init, int64_t len)
{
    CrashRec *r = calloc(1, sizeof(*r));
    if (!r) {
        return NULL;
    }
    r->name = strdup(name);
    pthread_mutex_init(&r->lock, NULL);
    if (!r->name || grow(&r->buf, &r->len, &r->cap, len) < 0) {
        free(r->name);
        free(r);
        return NULL;
    }
    if (len) {
        memcpy(r->buf, init, (size_t)len);
    }
    r->align = 1;
    pthread_mutex_lock(&recs_lock);
    for (int i = 0; i < MAX_RECS; i++) {
        if (!recs[i]) {
            recs[i] = r;
            pthread_mutex_unlock(&recs_lock);
            return r;
        }
    }
    pthread_mutex_unlock(&recs_lock);
    crash_rec_free(r);
    return NULL;
}

CrashRec *crash_rec_find(const char *name)
{
    CrashRec *found = NULL;
    pthread_mutex_lock(&recs_lock);
    for (int i = 0; i < MAX_RECS; i++) {
        if (recs[i] && !strcmp(recs[i]->name, name)) {
            found = recs[i];
            break;
        }
    }
    pthread_mutex_unlock(&recs_lock);
    return found;
}

void crash_rec_free(CrashRec *r)
{
    if (!r) {
        return;
    }
    pthread_mutex_lock(&recs_lock);
    for (int i = 0; i < MAX_RECS; i++) {
        if (recs[i] == r) {
            recs[i] = NULL;
        }
    }
    pthread_mutex_unlock(&recs_lock);
    for (size_t i = 0; i < r->nlog; i++) {
        free(r->log[i].data);
    }
    free(r->log);
    free(r->buf);
    free(r->name);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

/* ---- the driver ---- */

static int rec_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    RecState *s = bs->opaque;
    const char *name = lam_opt_str(opts, "filename", NULL);
    if (!name) {
        lam_error_setg(errp, "Parameter 'filename' is missing");
        return -EINVAL;
    }
    s->rec = crash_rec_find(name);
    if (!s->rec) {
        lam_error_setg(errp, "Could not open '%s': no such recording", name);
        return -ENOENT;
    }
    free(bs->filename);
    bs->filename = strdup(name);
    bs->bl.request_alignment = s->rec->align;
    return 0;
}

static void rec_close(LamNode *bs)
{
    (void)bs;
}

static int64_t rec_get_length(LamNode *bs)
{
    CrashRec *r = ((RecState *)bs->opaque)->rec;
    pthread_mutex_lock(&r->lock);
    int64_t len = r->len;
    pthread_mutex_unlock(&r->lock);
    return len;
}

static int rec_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov,
                      int flags)
{
    CrashRec *r = ((RecState *)bs->opaque)->rec;
    pthread_mutex_lock(&r->lock);
    int64_t avail = off < r->len ? r->len - off : 0;
    if (avail > bytes) {
        avail = bytes;
    }
    if (avail > 0) {
        lam_iov_from_buf(qiov, 0, r->buf + off, (size_t)avail);
    }
    pthread_mutex_unlock(&r->lock);
    if (avail < bytes) {
        lam_iov_memset(qiov, (size_t)(avail > 0 ? avail : 0), 0,
                       (size_t)(bytes - (avail > 0 ? avail : 0)));
    }
    return 0;
}

static int rec_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov,
                       int flags)
{
    CrashRec *r = ((RecState *)bs->opaque)->rec;
    CrashEntry e = { .type = CR_WRITE, .off = off, .len = bytes };
    e.data = malloc(bytes ? (size_t)bytes : 1);
    if (!e.data) {
        return -ENOMEM;
    }
    lam_iov_to_buf(qiov, 0, e.data, (size_t)bytes);
    /* FUA as the file driver does it (RWF_DSYNC): this write is durable
     * when it returns, earlier unflushed writes are not. */
    e.fua = (flags & LAM_REQ_FUA) != 0;
    return record(r, &e);
}

static int rec_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    CrashRec *r = ((RecState *)bs->opaque)->rec;
    CrashEntry e = { .type = CR_ZERO, .off = off, .len = bytes,
                     .fua = (flags & LAM_REQ_FUA) != 0 };
    return record(r, &e);
}

static int rec_pdiscard(LamNode *bs, int64_t off, int64_t bytes)
{
    CrashRec *r = ((RecState *)bs->opaque)->rec;
    pthread_mutex_lock(&r->lock);
    /* Like a hole punch: never extends the file. */
    int64_t end = off + bytes > r->len ? r->len : off + bytes;
    pthread_mutex_unlock(&r->lock);
    if (end <= off) {
        return 0;
    }
    CrashEntry e = { .type = CR_DISCARD, .off = off, .len = end - off };
    return record(r, &e);
}

static int rec_flush(LamNode *bs)
{
    CrashRec *r = ((RecState *)bs->opaque)->rec;
    CrashEntry e = { .type = CR_FLUSH };
    return record(r, &e);
}

static int rec_truncate(LamNode *bs, int64_t size, bool exact,
                        LamPrealloc prealloc, LamError **errp)
{
    CrashRec *r = ((RecState *)bs->opaque)->rec;
    if (size < 0) {
        lam_error_setg(errp, "Cannot truncate '%s' to a negative size", r->name);
        return -EINVAL;
    }
    pthread_mutex_lock(&r->lock);
    bool same = size == r->len || (!exact && size < r->len);
    pthread_mutex_unlock(&r->lock);
    if (same) {
        return 0;
    }
    CrashEntry e = { .type = CR_TRUNCATE, .off = size };
    int ret = record(r, &e);
    if (ret < 0) {
        lam_error_setg(errp, "Could not resize '%s': out of memory", r->name);
    }
    return ret;
}

static int64_t rec_allocated(LamNode *bs)
{
    return rec_get_length(bs);
}

static const char *const rec_options[] = { "filename", NULL };

static const LamDriver recorder_driver = {
    .name = "recorder",
    .kind = LAM_DRV_PROTOCOL,
    .state_size = sizeof(RecState),
    .supported_write_flags = LAM_REQ_FUA,
    .supported_zero_flags = LAM_REQ_FUA | LAM_REQ_MAY_UNMAP,
    .option_names = rec_options,
    .open = rec_open,
    .close = rec_close,
    .get_length = rec_get_length,
    .get_allocated_size = rec_allocated,
    .preadv = rec_preadv,
    .pwritev = rec_pwritev,
    .pwrite_zeroes = rec_pwrite_zeroes,
    .pdiscard = rec_pdiscard,
    .flush = rec_flush,
    .truncate = rec_truncate,
};

void crash_recorder_register(void)
{
    if (!lam_driver_find("recorder")) {
        lam_driver_register(&recorder_driver);
    }
}
