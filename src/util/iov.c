/* I/O vector helpers. */
#include <stdlib.h>
#include <string.h>

#include "lamina/iov.h"

void lam_iov_init_buf(LamIOV *q, void *buf, size_t len)
{
    q->local.iov_base = buf;
    q->local.iov_len = len;
    q->iov = &q->local;
    q->niov = 1;
    q->nalloc = 0;
    q->size = len;
}

void lam_iov_init(LamIOV *q, int hint)
{
    if (hint < 1) {
        hint = 1;
    }
    q->iov = calloc((size_t)hint, sizeof(struct iovec));
    if (!q->iov) {
        abort();
    }
    q->niov = 0;
    q->nalloc = hint;
    q->size = 0;
}

void lam_iov_add(LamIOV *q, void *base, size_t len)
{
    if (len == 0) {
        return;
    }
    if (q->nalloc == 0) {
        /* Borrowed or single-buffer vector: convert to an owned one. */
        struct iovec *old = q->iov;
        int n = q->niov;
        q->nalloc = n + 4;
        q->iov = malloc(sizeof(struct iovec) * (size_t)q->nalloc);
        if (!q->iov) {
            abort();
        }
        memcpy(q->iov, old, sizeof(struct iovec) * (size_t)n);
    } else if (q->niov == q->nalloc) {
        q->nalloc *= 2;
        q->iov = realloc(q->iov, sizeof(struct iovec) * (size_t)q->nalloc);
        if (!q->iov) {
            abort();
        }
    }
    /* Merge with the previous entry when contiguous: keeps vectors short. */
    if (q->niov > 0) {
        struct iovec *last = &q->iov[q->niov - 1];
        if ((char *)last->iov_base + last->iov_len == (char *)base) {
            last->iov_len += len;
            q->size += len;
            return;
        }
    }
    q->iov[q->niov].iov_base = base;
    q->iov[q->niov].iov_len = len;
    q->niov++;
    q->size += len;
}

void lam_iov_concat(LamIOV *q, const LamIOV *src, size_t off, size_t len)
{
    for (int i = 0; i < src->niov && len > 0; i++) {
        size_t l = src->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t n = l - off < len ? l - off : len;
        lam_iov_add(q, (char *)src->iov[i].iov_base + off, n);
        len -= n;
        off = 0;
    }
}

void lam_iov_reset(LamIOV *q)
{
    q->niov = 0;
    q->size = 0;
}

void lam_iov_destroy(LamIOV *q)
{
    if (q->nalloc) {
        free(q->iov);
    }
    q->iov = NULL;
    q->niov = q->nalloc = 0;
    q->size = 0;
}

size_t lam_iov_to_buf(const LamIOV *q, size_t off, void *buf, size_t len)
{
    size_t done = 0;
    for (int i = 0; i < q->niov && done < len; i++) {
        size_t l = q->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t n = l - off < len - done ? l - off : len - done;
        memcpy((char *)buf + done, (char *)q->iov[i].iov_base + off, n);
        done += n;
        off = 0;
    }
    return done;
}

size_t lam_iov_from_buf(LamIOV *q, size_t off, const void *buf, size_t len)
{
    size_t done = 0;
    for (int i = 0; i < q->niov && done < len; i++) {
        size_t l = q->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t n = l - off < len - done ? l - off : len - done;
        memcpy((char *)q->iov[i].iov_base + off, (const char *)buf + done, n);
        done += n;
        off = 0;
    }
    return done;
}

size_t lam_iov_memset(LamIOV *q, size_t off, int c, size_t len)
{
    size_t done = 0;
    for (int i = 0; i < q->niov && done < len; i++) {
        size_t l = q->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t n = l - off < len - done ? l - off : len - done;
        memset((char *)q->iov[i].iov_base + off, c, n);
        done += n;
        off = 0;
    }
    return done;
}

bool lam_buf_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    /* Word-at-a-time after aligning: this sits on the convert/backup path. */
    while (len > 0 && ((uintptr_t)p & 7)) {
        if (*p) {
            return false;
        }
        p++;
        len--;
    }
    const uint64_t *w = (const uint64_t *)(const void *)p;
    while (len >= 64) {
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) {
            return false;
        }
        w += 8;
        len -= 64;
    }
    p = (const unsigned char *)w;
    while (len--) {
        if (*p++) {
            return false;
        }
    }
    return true;
}

bool lam_iov_is_zero(const LamIOV *q, size_t off, size_t len)
{
    for (int i = 0; i < q->niov && len > 0; i++) {
        size_t l = q->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        size_t n = l - off < len ? l - off : len;
        if (!lam_buf_is_zero((char *)q->iov[i].iov_base + off, n)) {
            return false;
        }
        len -= n;
        off = 0;
    }
    return true;
}
