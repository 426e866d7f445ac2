/* Fixed newstyle handshake: option haggling until NBD_OPT_GO or
 * NBD_OPT_EXPORT_NAME picks an export.  Every length from the wire is
 * checked before use; a client that breaks a MUST gets disconnected, a
 * client that merely asks for something odd gets an error reply. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbd/nbd-int.h"
#include "nbd/nbd-proto.h"

/* Option payloads above this are refused (discarded, NBD_REP_ERR_TOO_BIG);
 * above NBD_OPT_DISCONNECT the client is dropped. */
#define NBD_OPT_MAX (64u * 1024)
#define NBD_OPT_DISCONNECT (16u * 1024 * 1024)
#define NBD_MIN_BLOCK 1

static int send_rep(NbdConn *c, uint32_t opt, uint32_t type, const void *data,
                    uint32_t len)
{
    uint8_t hdr[20];
    nbd_put64(hdr, NBD_REP_MAGIC);
    nbd_put32(hdr + 8, opt);
    nbd_put32(hdr + 12, type);
    nbd_put32(hdr + 16, len);
    struct iovec iov[2] = {
        { .iov_base = hdr, .iov_len = sizeof(hdr) },
        { .iov_base = (void *)data, .iov_len = len },
    };
    return nbd_sendv(c, iov, len ? 2 : 1);
}

static int send_err(NbdConn *c, uint32_t opt, uint32_t type, const char *fmt,
                    ...) __attribute__((format(printf, 4, 5)));
static int send_err(NbdConn *c, uint32_t opt, uint32_t type, const char *fmt,
                    ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (n < 0) {
        n = 0;
    }
    if ((size_t)n >= sizeof(msg)) {
        n = sizeof(msg) - 1;
    }
    return send_rep(c, opt, type, msg, (uint32_t)n);
}

uint16_t nbd_transmission_flags(NbdConn *c, NbdExport *exp)
{
    uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
                 NBD_FLAG_SEND_CACHE;
    if (exp->writable) {
        f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
             NBD_FLAG_SEND_FAST_ZERO;
    } else {
        f |= NBD_FLAG_READ_ONLY;
    }
    if (c->structured) {
        f |= NBD_FLAG_SEND_DF;
    }
    if (c->max_conns != 1) {
        f |= NBD_FLAG_CAN_MULTI_CONN;
    }
    return f;
}

/* What INFO/GO report, copied under the server lock. */
typedef struct ExportInfo {
    int64_t size;
    uint16_t tflags;
    uint32_t pref_block;
    char *name;
    char *description;
    bool allocation_depth;
} ExportInfo;

static void info_clear(ExportInfo *i)
{
    free(i->name);
    free(i->description);
    memset(i, 0, sizeof(*i));
}

/* Looks name up; attach=true also counts this connection on it. */
static NbdExport *lookup(NbdConn *c, const char *name, bool attach,
                         ExportInfo *out)
{
    pthread_mutex_lock(&nbd_srv.lock);
    NbdExport *exp = nbd_export_find_name_locked(name);
    if (exp && !exp->shutting_down) {
        out->size = exp->size;
        out->tflags = nbd_transmission_flags(c, exp);
        out->pref_block = exp->pref_block;
        out->name = strdup(exp->name);
        out->description = exp->description ? strdup(exp->description) : NULL;
        out->allocation_depth = exp->allocation_depth;
        if (attach) {
            /* Counted and published under the lock so that a concurrent
             * hard export removal sees (and kicks) this connection. */
            exp->nconns++;
            c->exp = exp;
        }
    } else {
        exp = NULL;
    }
    pthread_mutex_unlock(&nbd_srv.lock);
    return exp;
}

static bool valid_string(const uint8_t *s, uint32_t len)
{
    return len <= NBD_MAX_STRING && !memchr(s, 0, len);
}

static int opt_export_name(NbdConn *c, uint8_t *data, uint32_t len)
{
    if (!valid_string(data, len)) {
        return -1;
    }
    char *name = strndup((char *)data, len);
    ExportInfo info = { 0 };
    NbdExport *exp = name ? lookup(c, name, true, &info) : NULL;
    free(name);
    if (!exp) {
        return -1; /* no way to report an error for this option */
    }
    uint8_t rep[8 + 2 + 124] = { 0 };
    nbd_put64(rep, info.size);
    nbd_put16(rep + 8, info.tflags);
    c->tflags = info.tflags;
    info_clear(&info);
    /* Block status needs SET_META_CONTEXT on this very export. */
    if (c->meta_export && strcmp(c->meta_export, exp->name) != 0) {
        c->meta_base = c->meta_depth = false;
    }
    return nbd_send(c, rep, c->no_zeroes ? 10 : sizeof(rep)) < 0 ? -1 : 1;
}

static int opt_info_go(NbdConn *c, uint32_t opt, uint8_t *data, uint32_t len)
{
    if (len < 6) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "Option too short");
    }
    uint32_t namelen = nbd_get32(data);
    if (namelen > len - 6) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "Name length too large");
    }
    uint16_t nreq = nbd_get16(data + 4 + namelen);
    if ((uint64_t)len != 6 + (uint64_t)namelen + 2 * (uint64_t)nreq) {
        return send_err(c, opt, NBD_REP_ERR_INVALID,
                        "Information request list has the wrong length");
    }
    if (!valid_string(data + 4, namelen)) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "Invalid export name");
    }
    bool want_name = false, want_desc = false;
    for (uint16_t i = 0; i < nreq; i++) {
        uint16_t t = nbd_get16(data + 6 + namelen + 2 * i);
        want_name |= t == NBD_INFO_NAME;
        want_desc |= t == NBD_INFO_DESCRIPTION;
    }
    char *name = strndup((char *)data + 4, namelen);
    if (!name) {
        return -1;
    }
    ExportInfo info = { 0 };
    NbdExport *exp = lookup(c, name, opt == NBD_OPT_GO, &info);
    if (!exp) {
        int r = send_err(c, opt, NBD_REP_ERR_UNKNOWN,
                         "Export '%.256s' not present", name);
        free(name);
        return r;
    }
    free(name);

    uint8_t buf[14];
    int r = 0;
    nbd_put16(buf, NBD_INFO_EXPORT);
    nbd_put64(buf + 2, info.size);
    nbd_put16(buf + 10, info.tflags);
    r |= send_rep(c, opt, NBD_REP_INFO, buf, 12);
    if (want_name) {
        size_t nl = strlen(info.name);
        uint8_t *p = malloc(2 + nl);
        if (p) {
            nbd_put16(p, NBD_INFO_NAME);
            memcpy(p + 2, info.name, nl);
            r |= send_rep(c, opt, NBD_REP_INFO, p, 2 + nl);
            free(p);
        }
    }
    if (want_desc && info.description) {
        size_t dl = strlen(info.description);
        uint8_t *p = malloc(2 + dl);
        if (p) {
            nbd_put16(p, NBD_INFO_DESCRIPTION);
            memcpy(p + 2, info.description, dl);
            r |= send_rep(c, opt, NBD_REP_INFO, p, 2 + dl);
            free(p);
        }
    }
    /* Always sent: the core does read-modify-write, so any alignment works
     * and clients that ignore this are fine. */
    nbd_put16(buf, NBD_INFO_BLOCK_SIZE);
    nbd_put32(buf + 2, NBD_MIN_BLOCK);
    nbd_put32(buf + 6, info.pref_block);
    nbd_put32(buf + 10, NBD_MAX_PAYLOAD);
    r |= send_rep(c, opt, NBD_REP_INFO, buf, 14);
    r |= send_rep(c, opt, NBD_REP_ACK, NULL, 0);
    if (opt == NBD_OPT_GO) {
        c->tflags = info.tflags;
        if (c->meta_export && strcmp(c->meta_export, info.name) != 0) {
            c->meta_base = c->meta_depth = false;
        }
    }
    info_clear(&info);
    if (r < 0) {
        return -1;
    }
    return opt == NBD_OPT_GO ? 1 : 0;
}

static int opt_list(NbdConn *c, uint32_t len)
{
    if (len != 0) {
        return send_err(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data");
    }
    /* Build all replies under the lock, send after dropping it: a slow
     * client must not hold up the control thread. */
    size_t cap = 0, used = 0;
    uint8_t *out = NULL;
    pthread_mutex_lock(&nbd_srv.lock);
    for (NbdExport *e = nbd_srv.exports; e; e = e->next) {
        if (e->shutting_down) {
            continue;
        }
        size_t nl = strlen(e->name);
        size_t dl = e->description ? strlen(e->description) : 0;
        size_t need = 20 + 4 + nl + dl;
        if (used + need > cap) {
            size_t ncap = (cap + need) * 2;
            uint8_t *n = realloc(out, ncap);
            if (!n) {
                break;
            }
            out = n;
            cap = ncap;
        }
        uint8_t *p = out + used;
        nbd_put64(p, NBD_REP_MAGIC);
        nbd_put32(p + 8, NBD_OPT_LIST);
        nbd_put32(p + 12, NBD_REP_SERVER);
        nbd_put32(p + 16, (uint32_t)(4 + nl + dl));
        nbd_put32(p + 20, (uint32_t)nl);
        memcpy(p + 24, e->name, nl);
        if (dl) {
            memcpy(p + 24 + nl, e->description, dl);
        }
        used += need;
    }
    pthread_mutex_unlock(&nbd_srv.lock);
    int r = used ? nbd_send(c, out, used) : 0;
    free(out);
    if (r < 0) {
        return -1;
    }
    return send_rep(c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

static int send_meta(NbdConn *c, uint32_t opt, uint32_t id, const char *name)
{
    size_t nl = strlen(name);
    uint8_t buf[64];
    nbd_put32(buf, id);
    memcpy(buf + 4, name, nl);
    return send_rep(c, opt, NBD_REP_META_CONTEXT, buf, 4 + nl);
}

static int opt_meta(NbdConn *c, uint32_t opt, uint8_t *data, uint32_t len)
{
    bool set = opt == NBD_OPT_SET_META_CONTEXT;
    if (set) {
        /* SET replaces the selection even when it fails. */
        c->meta_base = c->meta_depth = false;
        free(c->meta_export);
        c->meta_export = NULL;
    }
    if (!c->structured) {
        return send_err(c, opt, NBD_REP_ERR_INVALID,
                        "Structured replies are not negotiated");
    }
    if (len < 8) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "Option too short");
    }
    uint32_t namelen = nbd_get32(data);
    if (namelen > len - 8 || !valid_string(data + 4, namelen)) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "Invalid export name");
    }
    uint32_t nq = nbd_get32(data + 4 + namelen);
    size_t pos = 8 + (size_t)namelen;
    bool want_base = false, want_depth = false;
    for (uint32_t i = 0; i < nq; i++) {
        if (len - pos < 4) {
            return send_err(c, opt, NBD_REP_ERR_INVALID, "Query list truncated");
        }
        uint32_t ql = nbd_get32(data + pos);
        pos += 4;
        if (ql > len - pos || !valid_string(data + pos, ql)) {
            return send_err(c, opt, NBD_REP_ERR_INVALID, "Invalid query");
        }
        const char *q = (const char *)data + pos;
        pos += ql;
        /* Unknown namespaces and leaf names are ignored, as required. */
        if (ql == 15 && !memcmp(q, "base:allocation", 15)) {
            want_base = true;
        } else if (!set && ql == 5 && !memcmp(q, "base:", 5)) {
            want_base = true;
        } else if (ql == 21 && !memcmp(q, "qemu:allocation-depth", 21)) {
            want_depth = true;
        } else if (!set && ql == 5 && !memcmp(q, "qemu:", 5)) {
            want_depth = true;
        }
    }
    if (pos != len) {
        return send_err(c, opt, NBD_REP_ERR_INVALID, "Trailing option data");
    }
    if (!set && nq == 0) {
        want_base = want_depth = true;
    }
    char *name = strndup((char *)data + 4, namelen);
    if (!name) {
        return -1;
    }
    ExportInfo info = { 0 };
    if (!lookup(c, name, false, &info)) {
        int r = send_err(c, opt, NBD_REP_ERR_UNKNOWN,
                         "Export '%.256s' not present", name);
        free(name);
        return r;
    }
    want_depth &= info.allocation_depth;
    info_clear(&info);
    int r = 0;
    if (want_base) {
        r |= send_meta(c, opt, set ? NBD_META_ID_BASE_ALLOCATION : 0,
                       "base:allocation");
    }
    if (want_depth) {
        r |= send_meta(c, opt, set ? NBD_META_ID_ALLOCATION_DEPTH : 0,
                       "qemu:allocation-depth");
    }
    if (set) {
        c->meta_base = want_base;
        c->meta_depth = want_depth;
        c->meta_export = name;
    } else {
        free(name);
    }
    r |= send_rep(c, opt, NBD_REP_ACK, NULL, 0);
    return r < 0 ? -1 : 0;
}

/* Returns 1 to enter transmission, 0 to go on haggling, <0 to close. */
static int handle_option(NbdConn *c, uint32_t opt, uint8_t *data, uint32_t len)
{
    switch (opt) {
    case NBD_OPT_EXPORT_NAME:
        return opt_export_name(c, data, len);
    case NBD_OPT_ABORT:
        send_rep(c, opt, NBD_REP_ACK, NULL, 0);
        return -1;
    case NBD_OPT_LIST:
        return opt_list(c, len);
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
        return opt_info_go(c, opt, data, len);
    case NBD_OPT_STRUCTURED_REPLY:
        if (len != 0) {
            return send_err(c, opt, NBD_REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data");
        }
        c->structured = true;
        return send_rep(c, opt, NBD_REP_ACK, NULL, 0);
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
        return opt_meta(c, opt, data, len);
    case NBD_OPT_STARTTLS:
        return send_err(c, opt, NBD_REP_ERR_POLICY, "TLS not configured");
    default:
        return send_err(c, opt, NBD_REP_ERR_UNSUP, "Unsupported option %u",
                        opt);
    }
}

int nbd_handshake(NbdConn *c)
{
    uint8_t buf[18];
    nbd_put64(buf, NBD_INIT_MAGIC);
    nbd_put64(buf + 8, NBD_OPTS_MAGIC);
    nbd_put16(buf + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    if (nbd_send(c, buf, 18) < 0 || nbd_read(c, buf, 4) < 0) {
        return -1;
    }
    uint32_t cflags = nbd_get32(buf);
    if (cflags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        return -1; /* unknown client flag: MUST drop */
    }
    c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;

    for (;;) {
        uint8_t hdr[16];
        if (nbd_read(c, hdr, 16) < 0 || nbd_get64(hdr) != NBD_OPTS_MAGIC) {
            return -1;
        }
        uint32_t opt = nbd_get32(hdr + 8);
        uint32_t len = nbd_get32(hdr + 12);
        if (len > NBD_OPT_MAX) {
            if (len > NBD_OPT_DISCONNECT || opt == NBD_OPT_EXPORT_NAME ||
                nbd_skip(c, len) < 0 ||
                send_err(c, opt, NBD_REP_ERR_TOO_BIG, "Option too large") < 0) {
                return -1;
            }
            continue;
        }
        uint8_t *data = malloc(len ? len : 1);
        if (!data) {
            return -1;
        }
        if (nbd_read(c, data, len) < 0) {
            free(data);
            return -1;
        }
        int r = handle_option(c, opt, data, len);
        free(data);
        if (r != 0) {
            return r > 0 ? 0 : -1;
        }
    }
}
