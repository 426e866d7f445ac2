/* NBD wire constants, from the protocol description
 * (NetworkBlockDevice/nbd doc/proto.md), and big-endian helpers. */
#ifndef LAMINA_NBD_PROTO_H
#define LAMINA_NBD_PROTO_H

#include <stdint.h>
#include <string.h>

#define NBD_INIT_MAGIC 0x4e42444d41474943ULL  /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC 0x49484156454F5054ULL  /* "IHAVEOPT" */
#define NBD_REP_MAGIC 0x0003e889045565a9ULL
#define NBD_REQUEST_MAGIC 0x25609513U
#define NBD_SIMPLE_REPLY_MAGIC 0x67446698U
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efU

/* handshake flags (server) and client flags */
#define NBD_FLAG_FIXED_NEWSTYLE (1 << 0)
#define NBD_FLAG_NO_ZEROES (1 << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1 << 0)
#define NBD_FLAG_C_NO_ZEROES (1 << 1)

/* transmission flags */
#define NBD_FLAG_HAS_FLAGS (1 << 0)
#define NBD_FLAG_READ_ONLY (1 << 1)
#define NBD_FLAG_SEND_FLUSH (1 << 2)
#define NBD_FLAG_SEND_FUA (1 << 3)
#define NBD_FLAG_ROTATIONAL (1 << 4)
#define NBD_FLAG_SEND_TRIM (1 << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1 << 6)
#define NBD_FLAG_SEND_DF (1 << 7)
#define NBD_FLAG_CAN_MULTI_CONN (1 << 8)
#define NBD_FLAG_SEND_CACHE (1 << 10)
#define NBD_FLAG_SEND_FAST_ZERO (1 << 11)

/* options */
#define NBD_OPT_EXPORT_NAME 1
#define NBD_OPT_ABORT 2
#define NBD_OPT_LIST 3
#define NBD_OPT_STARTTLS 5
#define NBD_OPT_INFO 6
#define NBD_OPT_GO 7
#define NBD_OPT_STRUCTURED_REPLY 8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT 10

/* option replies */
#define NBD_REP_ACK 1
#define NBD_REP_SERVER 2
#define NBD_REP_INFO 3
#define NBD_REP_META_CONTEXT 4
#define NBD_REP_ERR_UNSUP 0x80000001U
#define NBD_REP_ERR_POLICY 0x80000002U
#define NBD_REP_ERR_INVALID 0x80000003U
#define NBD_REP_ERR_PLATFORM 0x80000004U
#define NBD_REP_ERR_TLS_REQD 0x80000005U
#define NBD_REP_ERR_UNKNOWN 0x80000006U
#define NBD_REP_ERR_SHUTDOWN 0x80000007U
#define NBD_REP_ERR_BLOCK_SIZE_REQD 0x80000008U
#define NBD_REP_ERR_TOO_BIG 0x80000009U

/* NBD_REP_INFO types */
#define NBD_INFO_EXPORT 0
#define NBD_INFO_NAME 1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE 3

/* commands */
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1
#define NBD_CMD_DISC 2
#define NBD_CMD_FLUSH 3
#define NBD_CMD_TRIM 4
#define NBD_CMD_CACHE 5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

/* command flags */
#define NBD_CMD_FLAG_FUA (1 << 0)
#define NBD_CMD_FLAG_NO_HOLE (1 << 1)
#define NBD_CMD_FLAG_DF (1 << 2)
#define NBD_CMD_FLAG_REQ_ONE (1 << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1 << 4)

/* structured replies */
#define NBD_REPLY_FLAG_DONE (1 << 0)
#define NBD_REPLY_TYPE_NONE 0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR 0x8001
#define NBD_REPLY_TYPE_ERROR_OFFSET 0x8002

/* base:allocation flags */
#define NBD_STATE_HOLE (1 << 0)
#define NBD_STATE_ZERO (1 << 1)

/* error values */
#define NBD_EPERM 1
#define NBD_EIO 5
#define NBD_ENOMEM 12
#define NBD_EINVAL 22
#define NBD_ENOSPC 28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP 95
#define NBD_ESHUTDOWN 108

/* Sizes */
#define NBD_REQUEST_SIZE 28
#define NBD_SIMPLE_REPLY_SIZE 16
#define NBD_CHUNK_HDR_SIZE 20
#define NBD_MAX_STRING 4096
/* Largest READ/WRITE payload accepted (the spec's "never a DoS" size). */
#define NBD_MAX_PAYLOAD (32u * 1024 * 1024)

/* Metadata context ids handed out by SET_META_CONTEXT. */
#define NBD_META_ID_BASE_ALLOCATION 0
#define NBD_META_ID_ALLOCATION_DEPTH 1

static inline void nbd_put16(uint8_t *p, uint16_t v)
{
    p[0] = v >> 8;
    p[1] = v;
}
static inline void nbd_put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}
static inline void nbd_put64(uint8_t *p, uint64_t v)
{
    nbd_put32(p, v >> 32);
    nbd_put32(p + 4, (uint32_t)v);
}
static inline uint16_t nbd_get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}
static inline uint32_t nbd_get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 |
           p[3];
}
static inline uint64_t nbd_get64(const uint8_t *p)
{
    return (uint64_t)nbd_get32(p) << 32 | nbd_get32(p + 4);
}

/* Maps a negative errno from the block layer to an NBD error value. */
int nbd_errno_to_wire(int neg_errno);

#endif
