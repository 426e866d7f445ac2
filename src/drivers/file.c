/* The `file` protocol driver: a POSIX file or block device.
 *
 * Blocking pread/pwrite from whichever worker thread calls; the kernel
 * serialises nothing we rely on.  Holes are reported with SEEK_DATA /
 * SEEK_HOLE; discard and write-zeroes use fallocate.  With cache.direct
 * the file is opened O_DIRECT and requests must be aligned: the core does
 * that from bl.request_alignment, and misaligned buffers are bounced here.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lamina/driver.h"

typedef struct FileState {
    int fd;
    bool direct;
    bool no_punch;       /* fallocate PUNCH_HOLE unsupported here */
    bool no_zero_range;  /* fallocate ZERO_RANGE unsupported here */
    bool no_seek_hole;
    bool is_blockdev;
    _Atomic bool no_rwf_dsync; /* pwritev2(RWF_DSYNC) refused: FUA = write + flush */
    /* RWF_NOWAIT reads are refused by this kernel or file system: don't
     * try again.  Atomic: any request thread may set it. */
    _Atomic bool no_nowait;
    uint32_t page_mask;  /* page size - 1: whole-page writes never read */
    /* Length cached so the request path needs no fstat; updated by our own
     * writes and truncates (other processes growing the file are not seen,
     * as with any open image). */
    _Atomic int64_t size;
} FileState;

static const char *const file_options[] = {
    "filename", "aio", "aio-max-batch", "locking", "drop-cache",
    "x-check-cache-dropped", "pr-manager", NULL,
};

static int64_t file_get_length(LamNode *bs)
{
    FileState *s = bs->opaque;
    return atomic_load(&s->size);
}

static void size_at_least(FileState *s, int64_t end)
{
    int64_t cur = atomic_load(&s->size);
    while (end > cur && !atomic_compare_exchange_weak(&s->size, &cur, end)) {
    }
}

static int64_t file_read_length(FileState *s)
{
    struct stat st;
    if (s->is_blockdev) {
        off_t end = lseek(s->fd, 0, SEEK_END);
        return end < 0 ? -errno : end;
    }
    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    return st.st_size;
}

static uint32_t probe_direct_alignment(int fd)
{
    /* The smallest read O_DIRECT accepts is the logical block size. */
    void *buf;
    if (posix_memalign(&buf, 4096, 4096)) {
        return 4096;
    }
    uint32_t align = 4096;
    for (uint32_t a = 512; a <= 4096; a *= 2) {
        if (pread(fd, buf, a, 0) >= 0 || errno != EINVAL) {
            align = a;
            break;
        }
    }
    free(buf);
    return align;
}

static int file_open(LamNode *bs, json_t *opts, int flags, LamError **errp)
{
    FileState *s = bs->opaque;
    const char *filename = lam_opt_str(opts, "filename", NULL);
    if (!filename) {
        lam_error_setg(errp, "Parameter 'filename' is missing");
        return -EINVAL;
    }
    bs->filename = strdup(filename);
    int oflags = O_CLOEXEC | ((flags & LAM_O_RDWR) ? O_RDWR : O_RDONLY);
    if (flags & LAM_O_NOCACHE) {
        oflags |= O_DIRECT;
        s->direct = true;
    }
    s->fd = open(filename, oflags);
    if (s->fd < 0 && (flags & LAM_O_RDWR) &&
        (errno == EACCES || errno == EROFS) &&
        lam_opt_bool(opts, "auto-read-only", false, NULL)) {
        /* auto-read-only: fall back to read-only when RW is impossible. */
        oflags = (oflags & ~O_RDWR) | O_RDONLY;
        s->fd = open(filename, oflags);
        bs->read_only = true;
    }
    if (s->fd < 0) {
        int err = errno;
        lam_error_setg_errno(errp, -err, "Could not open '%s'", filename);
        return -err;
    }
    struct stat st;
    if (fstat(s->fd, &st) == 0) {
        s->is_blockdev = S_ISBLK(st.st_mode);
        if (S_ISDIR(st.st_mode)) {
            lam_error_setg(errp, "Could not open '%s': Is a directory", filename);
            close(s->fd);
            return -EISDIR;
        }
    }
    int64_t len = file_read_length(s);
    if (len < 0) {
        lam_error_setg_errno(errp, (int)len, "Could not get the size of '%s'", filename);
        close(s->fd);
        return (int)len;
    }
    atomic_store(&s->size, len);
    if (s->direct) {
        bs->bl.request_alignment = probe_direct_alignment(s->fd);
        bs->bl.min_mem_alignment = bs->bl.request_alignment;
    }
    bs->bl.max_transfer = 32 << 20;
    long page = sysconf(_SC_PAGESIZE);
    s->page_mask = page > 0 ? (uint32_t)page - 1 : 4095;
    return 0;
}

static void file_close(LamNode *bs)
{
    FileState *s = bs->opaque;
    if (s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
}

static bool iov_aligned(LamNode *bs, LamIOV *qiov)
{
    uintptr_t a = bs->bl.min_mem_alignment;
    if (a <= 1) {
        return true;
    }
    for (int i = 0; i < qiov->niov; i++) {
        if ((uintptr_t)qiov->iov[i].iov_base % a || qiov->iov[i].iov_len % a) {
            return false;
        }
    }
    return true;
}

/* Loops over short transfers; a short read at EOF zero-fills. */
/* rwf: RWF_* flags of preadv2/pwritev2 (RWF_DSYNC for FUA writes). */
static int do_rw(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, bool write, int rwf)
{
    FileState *s = bs->opaque;
    if (s->direct && !iov_aligned(bs, qiov)) {
        void *buf;
        if (posix_memalign(&buf, bs->bl.min_mem_alignment, (size_t)bytes)) {
            return -ENOMEM;
        }
        LamIOV b;
        lam_iov_init_buf(&b, buf, (size_t)bytes);
        if (write) {
            lam_iov_to_buf(qiov, 0, buf, (size_t)bytes);
        }
        int ret = do_rw(bs, off, bytes, &b, write, rwf);
        if (!write && ret == 0) {
            lam_iov_from_buf(qiov, 0, buf, (size_t)bytes);
        }
        free(buf);
        return ret;
    }
    int64_t done = 0;
    /* First try the caller's vector as is: one syscall, no allocation.
     * Only short transfers (EOF, signals) rebuild a vector for the rest. */
    if (qiov->niov <= IOV_MAX && (int64_t)qiov->size == bytes) {
        ssize_t n;
        do {
            n = write ? pwritev2(s->fd, qiov->iov, qiov->niov, off, rwf)
                      : preadv2(s->fd, qiov->iov, qiov->niov, off, rwf);
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            return -errno;
        }
        done = n;
    }
    while (done < bytes) {
        LamIOV rest;
        lam_iov_init(&rest, qiov->niov);
        lam_iov_concat(&rest, qiov, (size_t)done, (size_t)(bytes - done));
        int cnt = rest.niov > IOV_MAX ? IOV_MAX : rest.niov;
        ssize_t n = write ? pwritev2(s->fd, rest.iov, cnt, off + done, rwf)
                          : preadv2(s->fd, rest.iov, cnt, off + done, rwf);
        int err = errno;
        lam_iov_destroy(&rest);
        if (n < 0) {
            if (err == EINTR) {
                continue;
            }
            return -err;
        }
        if (n == 0) {
            if (write) {
                return -EIO;
            }
            lam_iov_memset(qiov, (size_t)done, 0, (size_t)(bytes - done));
            return 0;
        }
        done += n;
    }
    return 0;
}

/* A read served from the page cache alone (RWF_NOWAIT), or -EAGAIN if
 * any of it would need the disk.  O_DIRECT reads always wait for the
 * device.  A short read means "partly cached" as well as "end of file":
 * both go the blocking way, which tells them apart. */
static int read_nowait(FileState *s, int64_t off, int64_t bytes, LamIOV *qiov)
{
    if (s->direct || atomic_load_explicit(&s->no_nowait, memory_order_relaxed) ||
        qiov->niov > IOV_MAX || (int64_t)qiov->size != bytes) {
        return -EAGAIN;
    }
    ssize_t n;
    do {
        n = preadv2(s->fd, qiov->iov, qiov->niov, off, RWF_NOWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN) {
        if (errno == EOPNOTSUPP || errno == EINVAL) {
            atomic_store(&s->no_nowait, true);
        }
        return -EAGAIN; /* real errors are reported by the blocking retry */
    }
    return n == bytes ? 0 : -EAGAIN;
}

static int file_preadv(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    if (flags & LAM_REQ_NOWAIT) {
        return read_nowait(bs->opaque, off, bytes, qiov);
    }
    return do_rw(bs, off, bytes, qiov, false, 0);
}

static int file_flush(LamNode *bs)
{
    FileState *s = bs->opaque;
    return fdatasync(s->fd) < 0 ? -errno : 0;
}

static int file_pwritev(LamNode *bs, int64_t off, int64_t bytes, LamIOV *qiov, int flags)
{
    FileState *s = bs->opaque;
    /* NOWAIT: a buffered write of whole pages only copies into the page
     * cache (there is no RWF_NOWAIT for buffered writes on most file
     * systems); part of a page may need a read first, and O_DIRECT waits
     * for the device. */
    if ((flags & LAM_REQ_NOWAIT) &&
        (s->direct || (flags & LAM_REQ_FUA) || ((off | bytes) & s->page_mask))) {
        return -EAGAIN;
    }
    /* FUA: RWF_DSYNC makes just this range (and the file size) durable;
     * a flush would also write out every other dirty page of the file,
     * which is what made qcow2's metadata ordering cost a backup job a
     * third of its time. */
    bool dsync = (flags & LAM_REQ_FUA) && !atomic_load(&s->no_rwf_dsync);
    int ret = do_rw(bs, off, bytes, qiov, true, dsync ? RWF_DSYNC : 0);
    if (dsync && (ret == -EOPNOTSUPP || ret == -EINVAL)) {
        atomic_store(&s->no_rwf_dsync, true); /* an old kernel: write + flush */
        dsync = false;
        ret = do_rw(bs, off, bytes, qiov, true, 0);
    }
    if (ret == 0) {
        size_at_least(s, off + bytes);
    }
    if (ret == 0 && (flags & LAM_REQ_FUA) && !dsync) {
        ret = file_flush(bs);
    }
    return ret;
}

/* Copy offload: the source chain ends here; walk the destination's. */
static int file_copy_range_from(LamNode *bs, LamChild *src, int64_t off,
                                LamChild *dst, int64_t dst_off, int64_t bytes,
                                int flags)
{
    (void)bs;
    return lam_co_copy_range_to(src, off, dst, dst_off, bytes, flags);
}

extern const LamDriver lam_drv_file;

/* Both ends are files: the kernel moves the data (and may share extents
 * or copy on the server), without a trip through our buffers. */
static int file_copy_range_to(LamNode *bs, LamChild *src, int64_t src_off,
                              LamChild *dst, int64_t off, int64_t bytes,
                              int flags)
{
    (void)dst;
    if (src->node->drv != &lam_drv_file) {
        return -ENOTSUP;
    }
    FileState *ss = src->node->opaque, *ds = bs->opaque;
    loff_t in = src_off, out = off;
    int64_t done = 0;
    while (done < bytes) {
        size_t n = bytes - done > (1 << 30) ? (size_t)1 << 30 : (size_t)(bytes - done);
        ssize_t r = copy_file_range(ss->fd, &in, ds->fd, &out, n, 0);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r < 0) {
            int err = errno;
            if (err == EXDEV || err == EINVAL || err == EOPNOTSUPP ||
                err == ENOSYS || err == EBADF || err == ETXTBSY) {
                err = ENOTSUP;
            }
            if (done > 0) {
                size_at_least(ds, off + done);
            }
            return -err;
        }
        if (r == 0) {
            /* The source file ends early: those bytes read as zeroes. */
            if (done > 0) {
                size_at_least(ds, off + done);
            }
            return -ENOTSUP;
        }
        done += r;
    }
    size_at_least(ds, off + bytes);
    if (flags & LAM_REQ_FUA) {
        return file_flush(bs);
    }
    return 0;
}

static int file_pwrite_zeroes(LamNode *bs, int64_t off, int64_t bytes, int flags)
{
    FileState *s = bs->opaque;
    int64_t len = file_get_length(bs);
    if (s->is_blockdev) {
        return -ENOTSUP; /* BLKZEROOUT would do; not needed yet */
    }
    /* Holes read as zeroes: punching is the cheapest zero write, allowed
     * when the caller permits unmapping and it stays within the file. */
    if ((flags & LAM_REQ_MAY_UNMAP) && !s->no_punch && len >= 0 && off + bytes <= len) {
        if (fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, bytes) == 0) {
            return 0;
        }
        if (errno == EOPNOTSUPP) {
            s->no_punch = true;
        }
    }
    if (!s->no_zero_range) {
        if (fallocate(s->fd, FALLOC_FL_ZERO_RANGE, off, bytes) == 0) {
            size_at_least(s, off + bytes);
            return 0;
        }
        if (errno == EOPNOTSUPP || errno == EINVAL) {
            s->no_zero_range = true;
        } else {
            return -errno;
        }
    }
    /* Beyond EOF, growing the file leaves zeroes behind for free. */
    if (len >= 0 && off >= len) {
        if (ftruncate(s->fd, off + bytes) < 0) {
            return -errno;
        }
        size_at_least(s, off + bytes);
        return 0;
    }
    return -ENOTSUP;
}

static int file_pdiscard(LamNode *bs, int64_t off, int64_t bytes)
{
    FileState *s = bs->opaque;
    if (s->no_punch || s->is_blockdev) {
        return -ENOTSUP;
    }
    if (fallocate(s->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, bytes) < 0) {
        if (errno == EOPNOTSUPP) {
            s->no_punch = true;
            return -ENOTSUP;
        }
        return -errno;
    }
    return 0;
}

static int file_block_status(LamNode *bs, int64_t off, int64_t bytes,
                             int64_t *pnum, int64_t *map, LamNode **file)
{
    FileState *s = bs->opaque;
    *map = off;
    *file = bs;
    if (s->no_seek_hole || s->is_blockdev) {
        *pnum = bytes;
        return LAM_BS_DATA | LAM_BS_OFFSET_VALID | LAM_BS_ALLOCATED;
    }
    off_t data = lseek(s->fd, off, SEEK_DATA);
    if (data < 0) {
        if (errno == ENXIO) {
            /* No data from here to EOF: all hole. */
            *pnum = bytes;
            return LAM_BS_ZERO | LAM_BS_OFFSET_VALID | LAM_BS_ALLOCATED;
        }
        s->no_seek_hole = errno == EINVAL || errno == EOPNOTSUPP;
        *pnum = bytes;
        return LAM_BS_DATA | LAM_BS_OFFSET_VALID | LAM_BS_ALLOCATED;
    }
    if (data > off) {
        *pnum = data - off < bytes ? data - off : bytes;
        return LAM_BS_ZERO | LAM_BS_OFFSET_VALID | LAM_BS_ALLOCATED;
    }
    off_t hole = lseek(s->fd, off, SEEK_HOLE);
    if (hole < 0 || hole <= off) {
        *pnum = bytes;
    } else {
        *pnum = hole - off < bytes ? hole - off : bytes;
    }
    return LAM_BS_DATA | LAM_BS_OFFSET_VALID | LAM_BS_ALLOCATED;
}

static int do_preallocate(int fd, int64_t from, int64_t to, LamPrealloc p,
                          const char *filename, LamError **errp)
{
    if (to <= from || p == LAM_PREALLOC_OFF) {
        return 0;
    }
    if (p == LAM_PREALLOC_FALLOC) {
        int r = posix_fallocate(fd, from, to - from);
        if (r) {
            lam_error_setg_errno(errp, -r, "Could not preallocate data for '%s'", filename);
            return -r;
        }
        return 0;
    }
    if (p == LAM_PREALLOC_FULL) {
        size_t chunk = 1 << 20;
        char *buf = calloc(1, chunk);
        if (!buf) {
            return -ENOMEM;
        }
        for (int64_t o = from; o < to;) {
            size_t n = (size_t)(to - o) < chunk ? (size_t)(to - o) : chunk;
            ssize_t w = pwrite(fd, buf, n, o);
            if (w < 0) {
                if (errno == EINTR) {
                    continue;
                }
                int err = errno;
                free(buf);
                lam_error_setg_errno(errp, -err, "Could not write zeros for preallocation of '%s'",
                                     filename);
                return -err;
            }
            o += w;
        }
        free(buf);
        return 0;
    }
    lam_error_setg(errp, "Unsupported preallocation mode: %s", lam_prealloc_name(p));
    return -ENOTSUP;
}

static int file_truncate(LamNode *bs, int64_t size, bool exact, LamPrealloc prealloc,
                         LamError **errp)
{
    FileState *s = bs->opaque;
    int64_t cur = file_get_length(bs);
    if (cur < 0) {
        lam_error_setg_errno(errp, (int)cur, "Failed to get size of '%s'", bs->filename);
        return (int)cur;
    }
    if (s->is_blockdev) {
        if (size > cur || (exact && size != cur)) {
            lam_error_setg(errp, "Cannot grow device files");
            return -EINVAL;
        }
        return 0;
    }
    if (!exact && size <= cur) {
        return 0;
    }
    if (ftruncate(s->fd, size) < 0) {
        int err = errno;
        lam_error_setg_errno(errp, -err, "Failed to resize '%s'", bs->filename);
        return -err;
    }
    atomic_store(&s->size, size);
    return do_preallocate(s->fd, cur, size, prealloc, bs->filename, errp);
}

static int file_create(json_t *opts, LamError **errp)
{
    const char *filename = lam_opt_str(opts, "filename", NULL);
    LamError *err = NULL;
    int64_t size = lam_opt_int(opts, "size", 0, &err);
    LamPrealloc p = LAM_PREALLOC_OFF;
    const char *ps = lam_opt_str(opts, "preallocation", "off");
    if (err) {
        lam_error_propagate(errp, err);
        return -EINVAL;
    }
    if (!filename) {
        lam_error_setg(errp, "Parameter 'filename' is missing");
        return -EINVAL;
    }
    if (size < 0) {
        lam_error_setg(errp, "Image size must be a non-negative number");
        return -EINVAL;
    }
    if (lam_prealloc_parse(ps, &p) < 0 || p == LAM_PREALLOC_METADATA) {
        lam_error_setg(errp, "Parameter 'preallocation' does not accept value '%s'", ps);
        return -EINVAL;
    }
    int fd = open(filename, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        lam_error_setg_errno(errp, -e, "Could not create '%s'", filename);
        return -e;
    }
    struct stat st;
    int ret = 0;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        if (ftruncate(fd, 0) < 0 || ftruncate(fd, size) < 0) {
            ret = -errno;
            lam_error_setg_errno(errp, ret, "Could not resize file '%s'", filename);
        } else {
            ret = do_preallocate(fd, 0, size, p, filename, errp);
        }
    }
    close(fd);
    return ret;
}

static int64_t file_allocated_size(LamNode *bs)
{
    FileState *s = bs->opaque;
    struct stat st;
    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    return (int64_t)st.st_blocks * 512;
}

const LamDriver lam_drv_file = {
    .name = "file",
    .kind = LAM_DRV_PROTOCOL,
    .state_size = sizeof(FileState),
    .supported_write_flags = LAM_REQ_FUA | LAM_REQ_NOWAIT,
    .supported_read_flags = LAM_REQ_NOWAIT,
    .supported_zero_flags = LAM_REQ_MAY_UNMAP,
    .option_names = file_options,
    .open = file_open,
    .close = file_close,
    .get_length = file_get_length,
    .get_allocated_size = file_allocated_size,
    .preadv = file_preadv,
    .pwritev = file_pwritev,
    .pwrite_zeroes = file_pwrite_zeroes,
    .pdiscard = file_pdiscard,
    .copy_range_from = file_copy_range_from,
    .copy_range_to = file_copy_range_to,
    .flush = file_flush,
    .block_status = file_block_status,
    .truncate = file_truncate,
    .create = file_create,
};
