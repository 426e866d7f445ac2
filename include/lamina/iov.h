/* I/O vectors.  A LamIOV describes the data buffer of one request. */
#ifndef LAMINA_IOV_H
#define LAMINA_IOV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

typedef struct LamIOV {
    struct iovec *iov;
    int niov;
    int nalloc;       /* 0: iov is borrowed (not freed by lam_iov_destroy) */
    size_t size;      /* sum of iov_len */
    struct iovec local; /* storage for the single-buffer case */
} LamIOV;

/* One buffer, no allocation. */
void lam_iov_init_buf(LamIOV *q, void *buf, size_t len);
/* Empty vector with room for `hint` entries. */
void lam_iov_init(LamIOV *q, int hint);
void lam_iov_add(LamIOV *q, void *base, size_t len);
/* Appends the bytes [off, off+len) of src to q (no data copied). */
void lam_iov_concat(LamIOV *q, const LamIOV *src, size_t off, size_t len);
void lam_iov_reset(LamIOV *q);
void lam_iov_destroy(LamIOV *q);

size_t lam_iov_to_buf(const LamIOV *q, size_t off, void *buf, size_t len);
size_t lam_iov_from_buf(LamIOV *q, size_t off, const void *buf, size_t len);
size_t lam_iov_memset(LamIOV *q, size_t off, int c, size_t len);
bool lam_iov_is_zero(const LamIOV *q, size_t off, size_t len);
bool lam_buf_is_zero(const void *buf, size_t len);

#endif
