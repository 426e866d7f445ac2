/* QMP JSON: lexer -> token streamer -> recursive-descent parser, and the
 * serializer.  Split in three stages like QMP's wire grammar needs: the
 * lexer alone can't tell where a value ends ("123" needs the next byte),
 * the streamer finds value boundaries by counting brackets over tokens,
 * and only then is a token list parsed, so one bad value never takes the
 * next one down with it. */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmp/json.h"

typedef enum {
    TK_LCURLY, TK_RCURLY, TK_LSQUARE, TK_RSQUARE, TK_COLON, TK_COMMA,
    TK_STRING, TK_INT, TK_FLOAT, TK_KEYWORD,
} TokType;

typedef struct Token {
    TokType type;
    size_t off, len; /* into QmpJsonStream.text */
} Token;

typedef enum {
    L_START, L_DQ, L_DQ_ESC, L_SQ, L_SQ_ESC, L_NEG, L_ZERO, L_INT, L_DOT,
    L_FRAC, L_EXP, L_EXP_SIGN, L_EXP_DIG, L_KEYWORD, L_RECOVERY,
} LexState;

typedef struct Buf {
    char *p;
    size_t len, cap;
} Buf;

struct QmpJsonStream {
    QmpJsonEmit emit;
    void *opaque;
    LexState state;
    Buf cur;          /* text of the token being lexed */
    Buf text;         /* text of every token of the current value */
    Token *toks;
    size_t ntoks, captoks;
    int braces, brackets;
    bool overflow;    /* current value hit a limit: drop tokens until reset */
    bool stopped;
};

static void buf_add(Buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1) {
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (!p) {
            abort();
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_addc(Buf *b, char c)
{
    buf_add(b, &c, 1);
}

static void buf_printf(Buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_printf(Buf *b, const char *fmt, ...)
{
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    buf_add(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

QmpJsonStream *qmp_json_stream_new(QmpJsonEmit emit, void *opaque)
{
    QmpJsonStream *s = calloc(1, sizeof(*s));
    if (!s) {
        abort();
    }
    s->emit = emit;
    s->opaque = opaque;
    return s;
}

void qmp_json_stream_free(QmpJsonStream *s)
{
    if (s) {
        free(s->cur.p);
        free(s->text.p);
        free(s->toks);
        free(s);
    }
}

void qmp_json_stream_stop(QmpJsonStream *s)
{
    s->stopped = true;
}

static void stream_reset(QmpJsonStream *s)
{
    s->ntoks = 0;
    s->text.len = 0;
    s->braces = s->brackets = 0;
    s->overflow = false;
    /* Don't keep a huge buffer around after one big value. */
    if (s->text.cap > (1u << 20)) {
        free(s->text.p);
        s->text = (Buf){0};
        free(s->toks);
        s->toks = NULL;
        s->captoks = 0;
    }
}

static void emit_error(QmpJsonStream *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Syntax errors carry QEMU's "JSON parse error, " prefix; limit errors
 * don't (QEMU words them that way too). */
static void emit_error(QmpJsonStream *s, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    LamError *err = NULL;
    bool limit = !strncmp(msg, "JSON ", 5);
    lam_error_setg(&err, "%s%s", limit ? "" : "JSON parse error, ", msg);
    s->emit(s->opaque, NULL, err);
}

/* ---------------- parser ---------------- */

typedef struct Parser {
    const QmpJsonStream *s;
    size_t i;
    char err[256];
} Parser;

static json_t *parse_value(Parser *p);

static void perr(Parser *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void perr(Parser *p, const char *fmt, ...)
{
    if (p->err[0]) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof(p->err), fmt, ap);
    va_end(ap);
}

static const Token *next_tok(Parser *p)
{
    return p->i < p->s->ntoks ? &p->s->toks[p->i++] : NULL;
}

static const Token *peek_tok(Parser *p)
{
    return p->i < p->s->ntoks ? &p->s->toks[p->i] : NULL;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* Reads \uXXXX at s (s[0] == '\\'); returns the code unit or -1. */
static long read_u4(const char *s, size_t avail)
{
    if (avail < 6 || s[0] != '\\' || s[1] != 'u') {
        return -1;
    }
    long v = 0;
    for (int k = 2; k < 6; k++) {
        int h = hexval(s[k]);
        if (h < 0) {
            return -1;
        }
        v = v * 16 + h;
    }
    return v;
}

static void put_utf8(Buf *b, uint32_t cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xc0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3f));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xe0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f));
        n = 3;
    } else {
        u[0] = (char)(0xf0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[3] = (char)(0x80 | (cp & 0x3f));
        n = 4;
    }
    buf_add(b, u, n);
}

/* Decodes one UTF-8 sequence; returns its length or 0 if invalid
 * (overlong forms, surrogates and values past U+10FFFF are invalid). */
static size_t utf8_decode(const unsigned char *s, size_t avail, uint32_t *cp)
{
    unsigned char c = s[0];
    size_t n;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if ((c & 0xe0) == 0xc0) {
        n = 2, v = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        n = 3, v = c & 0x0f, min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (avail < n) {
        return 0;
    }
    for (size_t k = 1; k < n; k++) {
        if ((s[k] & 0xc0) != 0x80) {
            return 0;
        }
        v = (v << 6) | (s[k] & 0x3f);
    }
    if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff)) {
        return 0;
    }
    *cp = v;
    return n;
}

static json_t *parse_string(Parser *p, const Token *t)
{
    const char *s = p->s->text.p + t->off + 1;
    size_t n = t->len - 2; /* without the quotes */
    Buf out = {0};
    buf_add(&out, "", 0);
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\\') {
            char e = i + 1 < n ? s[i + 1] : '\0';
            const char *simple = "\"'\\/bfnrt";
            const char *map = "\"'\\/\b\f\n\r\t";
            const char *hit = e ? strchr(simple, e) : NULL;
            if (hit) {
                buf_addc(&out, map[hit - simple]);
                i += 2;
                continue;
            }
            if (e != 'u') {
                perr(p, "invalid escape sequence in string");
                goto fail;
            }
            /* The escape text shown in errors: up to 6 bytes of the token
             * (a truncated escape shows the closing quote, as QEMU does). */
            size_t show = t->len - 1 - i < 6 ? t->len - 1 - i : 6;
            long u = read_u4(s + i, n - i);
            if (u < 0 || (u >= 0xdc00 && u <= 0xdfff)) {
                perr(p, "%.*s is not a valid Unicode character", (int)show, s + i);
                goto fail;
            }
            uint32_t cp = (uint32_t)u;
            if (u >= 0xd800 && u <= 0xdbff) {
                long lo = read_u4(s + i + 6, n - i - 6 < n ? n - i - 6 : 0);
                if (i + 6 > n || lo < 0xdc00 || lo > 0xdfff) {
                    perr(p, "%.*s is not a valid Unicode character", 6, s + i);
                    goto fail;
                }
                cp = 0x10000 + (((uint32_t)u - 0xd800) << 10) + ((uint32_t)lo - 0xdc00);
                i += 6;
            }
            put_utf8(&out, cp);
            i += 6;
            continue;
        }
        uint32_t cp;
        size_t k = utf8_decode((const unsigned char *)s + i, n - i, &cp);
        if (!k) {
            perr(p, "invalid UTF-8 sequence in string");
            goto fail;
        }
        buf_add(&out, s + i, k);
        i += k;
    }
    json_t *v = json_stringn(out.p, out.len);
    free(out.p);
    if (!v) {
        perr(p, "invalid UTF-8 sequence in string");
    }
    return v;
fail:
    free(out.p);
    return NULL;
}

static json_t *parse_number(Parser *p, const Token *t)
{
    char tmp[512];
    const char *txt = p->s->text.p + t->off;
    if (t->len >= sizeof(tmp)) {
        /* Longer than any double needs; strtod copes with the original. */
        return json_real(strtod(txt, NULL));
    }
    memcpy(tmp, txt, t->len);
    tmp[t->len] = '\0';
    if (t->type == TK_INT) {
        errno = 0;
        long long v = strtoll(tmp, NULL, 10);
        if (errno != ERANGE) {
            return json_integer(v);
        }
        /* Out of int64 range: QEMU falls back to a double too (after
         * uint64, which jansson can't represent). */
    }
    return json_real(strtod(tmp, NULL));
}

static json_t *parse_object(Parser *p)
{
    json_t *obj = json_object();
    const Token *t = peek_tok(p);
    if (t && t->type == TK_RCURLY) {
        p->i++;
        return obj;
    }
    for (;;) {
        json_t *key = parse_value(p);
        if (!key) {
            goto fail;
        }
        if (!json_is_string(key)) {
            json_decref(key);
            perr(p, "key is not a string in object");
            goto fail;
        }
        t = next_tok(p);
        if (!t || t->type != TK_COLON) {
            json_decref(key);
            perr(p, "missing : in object pair");
            goto fail;
        }
        json_t *val = parse_value(p);
        if (!val) {
            json_decref(key);
            goto fail;
        }
        /* Keys with an embedded NUL are cut there: jansson keys are C
         * strings.  Harmless: no QMP name contains one. */
        const char *k = json_string_value(key);
        if (json_object_get(obj, k)) {
            json_decref(key);
            json_decref(val);
            perr(p, "duplicate key");
            goto fail;
        }
        json_object_set_new(obj, k, val);
        json_decref(key);
        t = next_tok(p);
        if (t && t->type == TK_COMMA) {
            continue;
        }
        if (t && t->type == TK_RCURLY) {
            return obj;
        }
        perr(p, "expected separator in dict");
        goto fail;
    }
fail:
    json_decref(obj);
    return NULL;
}

static json_t *parse_list(Parser *p)
{
    json_t *arr = json_array();
    const Token *t = peek_tok(p);
    if (t && t->type == TK_RSQUARE) {
        p->i++;
        return arr;
    }
    for (;;) {
        json_t *v = parse_value(p);
        if (!v) {
            json_decref(arr);
            return NULL;
        }
        json_array_append_new(arr, v);
        t = next_tok(p);
        if (t && t->type == TK_COMMA) {
            continue;
        }
        if (t && t->type == TK_RSQUARE) {
            return arr;
        }
        perr(p, "expected separator in list");
        json_decref(arr);
        return NULL;
    }
}

static json_t *parse_value(Parser *p)
{
    const Token *t = next_tok(p);
    if (!t) {
        perr(p, "expecting value");
        return NULL;
    }
    switch (t->type) {
    case TK_LCURLY:
        return parse_object(p);
    case TK_LSQUARE:
        return parse_list(p);
    case TK_STRING:
        return parse_string(p, t);
    case TK_INT:
    case TK_FLOAT:
        return parse_number(p, t);
    case TK_KEYWORD: {
        const char *w = p->s->text.p + t->off;
        if (t->len == 4 && !memcmp(w, "true", 4)) {
            return json_true();
        }
        if (t->len == 5 && !memcmp(w, "false", 5)) {
            return json_false();
        }
        if (t->len == 4 && !memcmp(w, "null", 4)) {
            return json_null();
        }
        perr(p, "invalid keyword '%.*s'", (int)(t->len > 64 ? 64 : t->len), w);
        return NULL;
    }
    default:
        perr(p, "expecting value");
        return NULL;
    }
}

/* ---------------- streamer ---------------- */

static void stream_parse(QmpJsonStream *s)
{
    Parser p = {.s = s};
    json_t *v = parse_value(&p);
    stream_reset(s);
    if (v) {
        s->emit(s->opaque, v, NULL);
    } else {
        LamError *err = NULL;
        lam_error_setg(&err, "JSON parse error, %s", p.err);
        s->emit(s->opaque, NULL, err);
    }
}

static void stream_token(QmpJsonStream *s, TokType type, const char *txt, size_t len)
{
    if (s->overflow) {
        /* Swallow the rest of an oversized value by bracket counting. */
        goto count;
    }
    if (s->ntoks + 1 > QMP_JSON_MAX_TOKENS) {
        s->overflow = true;
        emit_error(s, "JSON token count limit exceeded");
        goto count;
    }
    if (s->text.len + len > QMP_JSON_MAX_BYTES) {
        s->overflow = true;
        emit_error(s, "JSON token size limit exceeded");
        goto count;
    }
    if (s->ntoks == s->captoks) {
        size_t cap = s->captoks ? s->captoks * 2 : 64;
        Token *t = realloc(s->toks, cap * sizeof(*t));
        if (!t) {
            abort();
        }
        s->toks = t;
        s->captoks = cap;
    }
    s->toks[s->ntoks++] = (Token){type, s->text.len, len};
    buf_add(&s->text, txt, len);
count:
    switch (type) {
    case TK_LCURLY: s->braces++; break;
    case TK_RCURLY: s->braces--; break;
    case TK_LSQUARE: s->brackets++; break;
    case TK_RSQUARE: s->brackets--; break;
    default: break;
    }
    if (!s->overflow && s->braces + s->brackets > QMP_JSON_MAX_NESTING) {
        s->overflow = true;
        emit_error(s, "JSON nesting depth limit exceeded");
    }
    if (s->braces < 0 || s->brackets < 0 || (s->braces == 0 && s->brackets == 0)) {
        if (s->overflow) {
            stream_reset(s);
        } else {
            stream_parse(s);
        }
    }
}

static void lex_error(QmpJsonStream *s, char c)
{
    buf_addc(&s->cur, c);
    /* Printed as a C string: a NUL byte shows as nothing, like QEMU. */
    emit_error(s, "stray '%.64s'", s->cur.p);
    s->cur.len = 0;
    stream_reset(s);
    s->state = L_RECOVERY;
}

static void lex_done(QmpJsonStream *s, TokType type)
{
    stream_token(s, type, s->cur.p, s->cur.len);
    s->cur.len = 0;
    s->state = L_START;
}

static bool is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static void lex_char(QmpJsonStream *s, char c)
{
    for (;;) {
        switch (s->state) {
        case L_RECOVERY:
            if (!is_ws(c) && !strchr("{}[],:", c)) {
                return;
            }
            s->state = L_START;
            continue;
        case L_START:
            s->cur.len = 0;
            switch (c) {
            case ' ': case '\t': case '\r': case '\n':
                return;
            case '{': stream_token(s, TK_LCURLY, "{", 1); return;
            case '}': stream_token(s, TK_RCURLY, "}", 1); return;
            case '[': stream_token(s, TK_LSQUARE, "[", 1); return;
            case ']': stream_token(s, TK_RSQUARE, "]", 1); return;
            case ':': stream_token(s, TK_COLON, ":", 1); return;
            case ',': stream_token(s, TK_COMMA, ",", 1); return;
            case '"': s->state = L_DQ; break;
            case '\'': s->state = L_SQ; break;
            case '-': s->state = L_NEG; break;
            case '0': s->state = L_ZERO; break;
            default:
                if (c >= '1' && c <= '9') {
                    s->state = L_INT;
                } else if (c >= 'a' && c <= 'z') {
                    s->state = L_KEYWORD;
                } else {
                    lex_error(s, c);
                    return;
                }
            }
            buf_addc(&s->cur, c);
            return;
        case L_DQ:
        case L_SQ:
            if ((unsigned char)c < 0x20) {
                lex_error(s, c);
                return;
            }
            if (s->cur.len > QMP_JSON_MAX_BYTES) {
                /* An endless string: give up on it. */
                s->cur.len = 0;
                stream_reset(s);
                emit_error(s, "JSON token size limit exceeded");
                s->state = L_RECOVERY;
                return;
            }
            buf_addc(&s->cur, c);
            if (c == '\\') {
                s->state = s->state == L_DQ ? L_DQ_ESC : L_SQ_ESC;
            } else if (c == (s->state == L_DQ ? '"' : '\'')) {
                lex_done(s, TK_STRING);
            }
            return;
        case L_DQ_ESC:
        case L_SQ_ESC:
            if ((unsigned char)c < 0x20) {
                lex_error(s, c);
                return;
            }
            buf_addc(&s->cur, c);
            s->state = s->state == L_DQ_ESC ? L_DQ : L_SQ;
            return;
        case L_NEG:
            if (c == '0') {
                s->state = L_ZERO;
            } else if (c >= '1' && c <= '9') {
                s->state = L_INT;
            } else {
                lex_error(s, c);
                return;
            }
            buf_addc(&s->cur, c);
            return;
        case L_ZERO:
        case L_INT:
            if (c >= '0' && c <= '9') {
                if (s->state == L_ZERO) {
                    lex_error(s, c);
                    return;
                }
            } else if (c == '.') {
                s->state = L_DOT;
            } else if (c == 'e' || c == 'E') {
                s->state = L_EXP;
            } else {
                lex_done(s, TK_INT);
                continue;
            }
            buf_addc(&s->cur, c);
            return;
        case L_DOT:
            if (!(c >= '0' && c <= '9')) {
                lex_error(s, c);
                return;
            }
            s->state = L_FRAC;
            buf_addc(&s->cur, c);
            return;
        case L_FRAC:
            if (c == 'e' || c == 'E') {
                s->state = L_EXP;
            } else if (!(c >= '0' && c <= '9')) {
                lex_done(s, TK_FLOAT);
                continue;
            }
            buf_addc(&s->cur, c);
            return;
        case L_EXP:
            if (c == '+' || c == '-') {
                s->state = L_EXP_SIGN;
            } else if (c >= '0' && c <= '9') {
                s->state = L_EXP_DIG;
            } else {
                lex_error(s, c);
                return;
            }
            buf_addc(&s->cur, c);
            return;
        case L_EXP_SIGN:
            if (!(c >= '0' && c <= '9')) {
                lex_error(s, c);
                return;
            }
            s->state = L_EXP_DIG;
            buf_addc(&s->cur, c);
            return;
        case L_EXP_DIG:
            if (!(c >= '0' && c <= '9')) {
                lex_done(s, TK_FLOAT);
                continue;
            }
            buf_addc(&s->cur, c);
            return;
        case L_KEYWORD:
            if (!(c >= 'a' && c <= 'z')) {
                lex_done(s, TK_KEYWORD);
                continue;
            }
            if (s->cur.len < 64) {
                buf_addc(&s->cur, c);
            }
            return;
        }
    }
}

void qmp_json_stream_feed(QmpJsonStream *s, const char *buf, size_t len)
{
    s->stopped = false;
    for (size_t i = 0; i < len && !s->stopped; i++) {
        lex_char(s, buf[i]);
    }
}

/* Ends a pending number or keyword (only for one-shot parsing). */
static void stream_flush(QmpJsonStream *s)
{
    lex_char(s, ' ');
}

typedef struct OneShot {
    json_t *v;
    LamError *err;
    int count;
} OneShot;

static void oneshot_emit(void *opaque, json_t *v, LamError *err)
{
    OneShot *o = opaque;
    if (o->count++ == 0) {
        o->v = v;
        o->err = err;
    } else {
        json_decref(v);
        lam_error_free(err);
    }
}

json_t *qmp_json_parse(const char *text, LamError **errp)
{
    OneShot o = {0};
    QmpJsonStream *s = qmp_json_stream_new(oneshot_emit, &o);
    qmp_json_stream_feed(s, text, strlen(text));
    stream_flush(s);
    bool incomplete = s->ntoks > 0 || s->state != L_START;
    qmp_json_stream_free(s);
    if (o.err) {
        json_decref(o.v);
        lam_error_propagate(errp, o.err);
        return NULL;
    }
    if (!o.v || incomplete || o.count > 1) {
        json_decref(o.v);
        lam_error_setg(errp, o.v ? "JSON parse error, trailing characters"
                                 : "JSON parse error, expecting value");
        return NULL;
    }
    return o.v;
}

/* ---------------- serializer ---------------- */

static void dump_string(Buf *b, const char *s, size_t n)
{
    buf_addc(b, '"');
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': buf_add(b, "\\\"", 2); i++; continue;
        case '\\': buf_add(b, "\\\\", 2); i++; continue;
        case '\b': buf_add(b, "\\b", 2); i++; continue;
        case '\f': buf_add(b, "\\f", 2); i++; continue;
        case '\n': buf_add(b, "\\n", 2); i++; continue;
        case '\r': buf_add(b, "\\r", 2); i++; continue;
        case '\t': buf_add(b, "\\t", 2); i++; continue;
        default: break;
        }
        if (c >= 0x20 && c < 0x7f) {
            buf_addc(b, (char)c);
            i++;
            continue;
        }
        uint32_t cp;
        size_t k = utf8_decode((const unsigned char *)s + i, n - i, &cp);
        if (!k) {
            cp = 0xfffd; /* can't happen for jansson strings */
            k = 1;
        }
        if (cp >= 0x10000) {
            cp -= 0x10000;
            buf_printf(b, "\\u%04X\\u%04X", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
        } else {
            buf_printf(b, "\\u%04X", cp);
        }
        i += k;
    }
    buf_addc(b, '"');
}

static void dump(Buf *b, const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        const char *k;
        json_t *m;
        bool first = true;
        buf_addc(b, '{');
        json_object_foreach((json_t *)v, k, m) {
            if (!first) {
                buf_add(b, ", ", 2);
            }
            first = false;
            dump_string(b, k, strlen(k));
            buf_add(b, ": ", 2);
            dump(b, m);
        }
        buf_addc(b, '}');
        break;
    }
    case JSON_ARRAY: {
        buf_addc(b, '[');
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) {
                buf_add(b, ", ", 2);
            }
            dump(b, json_array_get(v, i));
        }
        buf_addc(b, ']');
        break;
    }
    case JSON_STRING:
        dump_string(b, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER:
        buf_printf(b, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        buf_printf(b, "%.17g", json_real_value(v));
        break;
    case JSON_TRUE:
        buf_add(b, "true", 4);
        break;
    case JSON_FALSE:
        buf_add(b, "false", 5);
        break;
    case JSON_NULL:
        buf_add(b, "null", 4);
        break;
    }
}

char *qmp_json_dumps(const json_t *v)
{
    Buf b = {0};
    buf_add(&b, "", 0);
    dump(&b, v);
    return b.p;
}
