/* Socket helpers of the NBD server: buffered reads with an optional
 * deadline (handshake) and full sends that never raise SIGPIPE. */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>

#include "nbd/nbd-int.h"

/* Waits until fd is readable or the handshake deadline passes. */
static int wait_readable(NbdConn *conn)
{
    if (!conn->deadline_ms) {
        return 0;
    }
    for (;;) {
        int64_t left = conn->deadline_ms - nbd_now_ms();
        if (left <= 0) {
            return -1;
        }
        struct pollfd pfd = { .fd = conn->fd, .events = POLLIN };
        int r = poll(&pfd, 1, left > 1000 ? 1000 : (int)left);
        if (r > 0) {
            return 0;
        }
        if (r < 0 && errno != EINTR) {
            return -1;
        }
    }
}

static ssize_t recv_some(NbdConn *conn, void *buf, size_t len, int flags)
{
    for (;;) {
        if (wait_readable(conn) < 0) {
            return -1;
        }
        ssize_t n = recv(conn->fd, buf, len, flags);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        return n <= 0 ? -1 : n;
    }
}

int nbd_read(NbdConn *conn, void *buf, size_t len)
{
    uint8_t *dst = buf;
    while (len > 0) {
        if (conn->rpos < conn->rlen) {
            size_t n = conn->rlen - conn->rpos;
            if (n > len) {
                n = len;
            }
            memcpy(dst, conn->rbuf + conn->rpos, n);
            conn->rpos += n;
            dst += n;
            len -= n;
            continue;
        }
        if (len >= NBD_RBUF_SIZE / 4) {
            /* Big payloads go straight into the caller's buffer. */
            ssize_t n = recv_some(conn, dst, len,
                                  conn->deadline_ms ? 0 : MSG_WAITALL);
            if (n < 0) {
                return -1;
            }
            dst += n;
            len -= n;
            continue;
        }
        ssize_t n = recv_some(conn, conn->rbuf, NBD_RBUF_SIZE, 0);
        if (n < 0) {
            return -1;
        }
        conn->rpos = 0;
        conn->rlen = n;
    }
    return 0;
}

int nbd_skip(NbdConn *conn, size_t len)
{
    uint8_t scratch[4096];
    while (len > 0) {
        size_t n = len < sizeof(scratch) ? len : sizeof(scratch);
        if (nbd_read(conn, scratch, n) < 0) {
            return -1;
        }
        len -= n;
    }
    return 0;
}

int nbd_sendv(NbdConn *conn, struct iovec *iov, int niov)
{
    while (niov > 0) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = niov };
        ssize_t n = sendmsg(conn->fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        while (niov > 0 && (size_t)n >= iov->iov_len) {
            n -= iov->iov_len;
            iov++;
            niov--;
        }
        if (niov > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= n;
        }
    }
    return 0;
}

int nbd_send(NbdConn *conn, const void *buf, size_t len)
{
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    return nbd_sendv(conn, &iov, 1);
}
