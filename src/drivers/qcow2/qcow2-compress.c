/* Compressed cluster payloads: raw deflate (no zlib header, 4 KiB window,
 * as QEMU stores them) and zstd frames. */
#include <errno.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2.h"

static int64_t deflate_buf(uint8_t *dst, int64_t dst_len, const uint8_t *src,
                           int64_t src_len)
{
    z_stream z = {0};
    if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                     Z_DEFAULT_STRATEGY) != Z_OK) {
        return -ENOMEM;
    }
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)src_len;
    z.next_out = dst;
    z.avail_out = (uInt)dst_len;
    int r = deflate(&z, Z_FINISH);
    int64_t out = (int64_t)z.total_out;
    deflateEnd(&z);
    return r == Z_STREAM_END ? out : -ENOSPC;
}

static int inflate_buf(uint8_t *dst, int64_t dst_len, const uint8_t *src,
                       int64_t src_len)
{
    z_stream z = {0};
    if (inflateInit2(&z, -12) != Z_OK) {
        return -ENOMEM;
    }
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)src_len;
    z.next_out = dst;
    z.avail_out = (uInt)dst_len;
    int r = inflate(&z, Z_FINISH);
    int64_t out = (int64_t)z.total_out;
    inflateEnd(&z);
    /* The payload is padded to sectors: stopping with a full output
     * buffer is success as much as reaching the stream end. */
    if ((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && out == dst_len) {
        return 0;
    }
    return -EIO;
}

static int64_t zstd_compress_buf(uint8_t *dst, int64_t dst_len, const uint8_t *src,
                                 int64_t src_len)
{
    size_t r = ZSTD_compress(dst, (size_t)dst_len, src, (size_t)src_len, 3);
    if (ZSTD_isError(r)) {
        return -ENOSPC;
    }
    return (int64_t)r;
}

static int zstd_decompress_buf(uint8_t *dst, int64_t dst_len, const uint8_t *src,
                               int64_t src_len)
{
    ZSTD_DCtx *d = ZSTD_createDCtx();
    if (!d) {
        return -ENOMEM;
    }
    ZSTD_inBuffer in = {src, (size_t)src_len, 0};
    ZSTD_outBuffer out = {dst, (size_t)dst_len, 0};
    int ret = -EIO;
    /* Frames may be followed by sector padding; stop once a cluster is
     * complete. */
    while (out.pos < out.size && in.pos < in.size) {
        size_t r = ZSTD_decompressStream(d, &out, &in);
        if (ZSTD_isError(r)) {
            break;
        }
        if (r == 0 && out.pos < out.size && in.pos < in.size) {
            continue; /* next frame */
        }
        if (r != 0 && in.pos == in.size) {
            break;
        }
    }
    if (out.pos == out.size) {
        ret = 0;
    }
    ZSTD_freeDCtx(d);
    return ret;
}

int64_t qc_compress(int type, uint8_t *dst, int64_t dst_len, const uint8_t *src,
                    int64_t src_len)
{
    return type == QCOW2_COMPRESSION_ZSTD ? zstd_compress_buf(dst, dst_len, src, src_len)
                                          : deflate_buf(dst, dst_len, src, src_len);
}

int qc_decompress(int type, uint8_t *dst, int64_t dst_len, const uint8_t *src,
                  int64_t src_len)
{
    return type == QCOW2_COMPRESSION_ZSTD ? zstd_decompress_buf(dst, dst_len, src, src_len)
                                          : inflate_buf(dst, dst_len, src, src_len);
}
