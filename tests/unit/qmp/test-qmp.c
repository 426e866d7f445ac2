/* Unit tests for the QMP building blocks: the streaming JSON parser and
 * serializer, the schema validator, keyval parsing, and the control loop's
 * cross-thread call queue. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon/loop.h"
#include "qmp/json.h"
#include "qmp/keyval.h"
#include "qmp/schema.h"
#include "tap.h"

/* ---- JSON stream ---- */

typedef struct Collect {
    char out[64][256]; /* serialized value, or "ERR:<message>" */
    int n;
} Collect;

static void collect(void *opaque, json_t *v, LamError *err)
{
    Collect *c = opaque;
    if (c->n >= 64) {
        json_decref(v);
        lam_error_free(err);
        return;
    }
    if (err) {
        snprintf(c->out[c->n++], 256, "ERR:%s", err->msg);
        lam_error_free(err);
    } else {
        char *s = qmp_json_dumps(v);
        snprintf(c->out[c->n++], 256, "%s", s);
        free(s);
        json_decref(v);
    }
}

static void feed_all(Collect *c, const char *in, size_t len, size_t chunk)
{
    memset(c, 0, sizeof(*c));
    QmpJsonStream *s = qmp_json_stream_new(collect, c);
    for (size_t i = 0; i < len; i += chunk) {
        qmp_json_stream_feed(s, in + i, len - i < chunk ? len - i : chunk);
    }
    qmp_json_stream_free(s);
}

static void test_stream_values_any_chunking(void)
{
    const char in[] = "{\"a\": [1, -2.5e3, true, null, \"x\\u00e9\"]}{'b':'it\\'s'}[] 7 {\"c\":{}}";
    Collect whole, bytewise;
    feed_all(&whole, in, sizeof(in) - 1, sizeof(in));
    feed_all(&bytewise, in, sizeof(in) - 1, 1);
    /* A number ends only at the next byte: here the space after "7". */
    CHECK_EQ(whole.n, 5);
    CHECK_EQ(bytewise.n, whole.n);
    for (int i = 0; i < whole.n; i++) {
        CHECK(!strcmp(whole.out[i], bytewise.out[i]));
    }
    CHECK(!strcmp(whole.out[0], "{\"a\": [1, -2500, true, null, \"x\\u00E9\"]}"));
    CHECK(!strcmp(whole.out[1], "{\"b\": \"it's\"}"));
    CHECK(!strcmp(whole.out[2], "[]"));
    CHECK(!strcmp(whole.out[3], "7"));
    CHECK(!strcmp(whole.out[4], "{\"c\": {}}"));
}

static void test_stream_errors(void)
{
    static const struct {
        const char *in, *msg;
    } cases[] = {
        {"{\"a\" 1}", "ERR:JSON parse error, missing : in object pair"},
        {"{\"a\":1,}", "ERR:JSON parse error, expecting value"},
        {"{1:2}", "ERR:JSON parse error, key is not a string in object"},
        {"[1 2]", "ERR:JSON parse error, expected separator in list"},
        {"{\"a\":1 \"b\":2}", "ERR:JSON parse error, expected separator in dict"},
        {"{\"a\":1,\"a\":2}", "ERR:JSON parse error, duplicate key"},
        {"{\"a\":tru}", "ERR:JSON parse error, invalid keyword 'tru'"},
        {"{\"a\":\"\\q\"}", "ERR:JSON parse error, invalid escape sequence in string"},
        {"{\"a\":\"\\ud800\"}", "ERR:JSON parse error, \\ud800 is not a valid Unicode character"},
        {"{\"a\":\"\\udc00\"}", "ERR:JSON parse error, \\udc00 is not a valid Unicode character"},
        {"{\"a\":\"\xc3\x28\"}", "ERR:JSON parse error, invalid UTF-8 sequence in string"},
        {"{\"a\":\"\xc0\xaf\"}", "ERR:JSON parse error, invalid UTF-8 sequence in string"},
        {"{\"a\":\"\xed\xa0\x80\"}", "ERR:JSON parse error, invalid UTF-8 sequence in string"},
        {"{\"a\":1.5e}", "ERR:JSON parse error, stray '1.5e}'"},
        {"}", "ERR:JSON parse error, expecting value"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        Collect c;
        feed_all(&c, cases[i].in, strlen(cases[i].in), 3);
        CHECK(c.n >= 1);
        if (c.n < 1 || strcmp(c.out[0], cases[i].msg)) {
            fprintf(stderr, "# input %zu: got '%s', want '%s'\n", i, c.n ? c.out[0] : "",
                    cases[i].msg);
            tap_case_failed = 1;
        }
    }
}

static void test_stream_recovers(void)
{
    const char in[] = "{\"a\":01} {\"ok\":1}";
    Collect c;
    feed_all(&c, in, sizeof(in) - 1, 5);
    CHECK_EQ(c.n, 3);
    CHECK(!strcmp(c.out[0], "ERR:JSON parse error, stray '01'"));
    CHECK(!strcmp(c.out[1], "ERR:JSON parse error, expecting value"));
    CHECK(!strcmp(c.out[2], "{\"ok\": 1}"));
}

static void test_stream_limits(void)
{
    size_t n = 3000;
    char *deep = malloc(2 * n + 16);
    if (!deep) {
        abort();
    }
    memset(deep, '[', n);
    memset(deep + n, ']', n);
    strcpy(deep + 2 * n, "{\"x\":1}");
    Collect c;
    feed_all(&c, deep, strlen(deep), 4096);
    CHECK(c.n >= 2);
    CHECK(!strcmp(c.out[0], "JSON nesting depth limit exceeded") ||
          !strcmp(c.out[0], "ERR:JSON nesting depth limit exceeded"));
    CHECK(!strcmp(c.out[c.n - 1], "{\"x\": 1}"));
    free(deep);
}

/* Random input must never crash, hang or leak (run under ASan). */
static void test_stream_random(void)
{
    static const char *const pieces[] = {
        "{", "}", "[", "]", ":", ",", "\"", "'", "\\", "\\u", "\\ud83d", "1", "-", "e", ".",
        "true", "nul", "\"execute\"", "\xff", "\xc3", "\x01", " ", "0", "\"a\"",
    };
    unsigned seed = 42;
    Collect c;
    QmpJsonStream *s = qmp_json_stream_new(collect, &c);
    for (int i = 0; i < 20000; i++) {
        seed = seed * 1103515245 + 12345;
        const char *p = pieces[(seed >> 16) % (sizeof(pieces) / sizeof(pieces[0]))];
        c.n = 0;
        qmp_json_stream_feed(s, p, strlen(p));
    }
    c.n = 0;
    qmp_json_stream_feed(s, "\"]]]]]]]]}}}}}}}} {\"end\":1}", 26);
    qmp_json_stream_free(s);
    CHECK(1);
}

static void test_dump(void)
{
    json_t *v = json_pack("{s:s, s:f, s:f, s:I, s:[]}", "s", "\xf0\x9f\x98\x80/\x7f\t\x01",
                          "r", 0.1, "w", 1000.0, "i", (json_int_t)-9, "l");
    char *s = qmp_json_dumps(v);
    CHECK(!strcmp(s, "{\"s\": \"\\uD83D\\uDE00/\\u007F\\t\\u0001\", \"r\": 0.10000000000000001, "
                     "\"w\": 1000, \"i\": -9, \"l\": []}"));
    free(s);
    json_decref(v);
}

static void test_parse_oneshot(void)
{
    LamError *err = NULL;
    json_t *v = qmp_json_parse("{\"a\": 12345678901234567890}", &err);
    CHECK(v && !err);
    CHECK(json_is_real(json_object_get(v, "a"))); /* beyond int64: a double */
    json_decref(v);
    CHECK(!qmp_json_parse("{\"a\": 1} 2", &err));
    CHECK(err != NULL);
    lam_error_free(err);
    err = NULL;
    CHECK(!qmp_json_parse("", &err));
    lam_error_free(err);
}

/* ---- schema ---- */

static const char *const color_values[] = {"red", "green", NULL};
static const QmpType color = {QMP_T_ENUM, "Color", .values = color_values};
static const QmpMember inner_members[] = {{"n", &qmp_t_int}, {NULL}};
static const QmpType inner = {QMP_T_OBJECT, "Inner", inner_members};
static const QmpType *const ref_alts[] = {&inner, &qmp_t_str, NULL};
static const QmpType ref = {QMP_T_ALTERNATE, "Ref", .alts = ref_alts};
static const QmpType color_list = {QMP_T_LIST, "array", .elem = &color};
static const QmpMember a_members[] = {{"x", &qmp_t_int}, {NULL}};
static const QmpVariant variants[] = {{"red", a_members}, {NULL}};
static const QmpMember top_members[] = {
    {"kind", &color},
    {"ref", &ref, true},
    {"colors", &color_list, true},
    {"flag", &qmp_t_bool, true, "true"},
    {"count", &qmp_t_uint32, true},
    {NULL},
};
static const QmpType top = {QMP_T_OBJECT, "Top", top_members, .discriminator = "kind",
                            .variants = variants};

static const char *check(const char *json, bool fill, char *buf)
{
    json_t *v = qmp_json_parse(json, NULL);
    LamError *err = NULL;
    int r = qmp_validate(&top, v, fill, &err);
    if (r < 0) {
        snprintf(buf, 256, "%s", err->msg);
        lam_error_free(err);
    } else {
        char *s = qmp_json_dumps(v);
        snprintf(buf, 256, "OK %s", s);
        free(s);
    }
    json_decref(v);
    return buf;
}

static void test_schema(void)
{
    char b[256];
    CHECK(!strcmp(check("{}", false, b), "Parameter 'kind' is missing"));
    CHECK(!strcmp(check("{\"kind\": \"blue\"}", false, b),
                  "Parameter 'kind' does not accept value 'blue'"));
    CHECK(!strcmp(check("{\"kind\": \"red\"}", false, b), "Parameter 'x' is missing"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"x\": 1}", false, b), "Parameter 'x' is unexpected"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"ref\": {}}", false, b),
                  "Parameter 'ref.n' is missing"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"ref\": 5}", false, b),
                  "Invalid parameter type for 'ref', expected: Ref"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"ref\": {\"n\": \"1\"}}", false, b),
                  "Invalid parameter type for 'ref.n', expected: integer"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"colors\": [\"red\", \"pink\"]}", false, b),
                  "Parameter 'null' does not accept value 'pink'"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"colors\": [\"red\", 3]}", false, b),
                  "Invalid parameter type for 'colors[1]', expected: string"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"count\": -1}", false, b),
                  "Parameter 'count' expects uint32_t"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"count\": true}", false, b),
                  "Parameter 'count' expects uint64"));
    CHECK(!strcmp(check("{\"kind\": \"green\", \"ref\": \"node\"}", true, b),
                  "OK {\"kind\": \"green\", \"ref\": \"node\", \"flag\": true}"));
    CHECK(!strcmp(check("{\"kind\": \"red\", \"x\": 2, \"flag\": false}", true, b),
                  "OK {\"kind\": \"red\", \"x\": 2, \"flag\": false}"));
}

static void test_keyval(void)
{
    LamError *err = NULL;
    json_t *v = qmp_keyval_parse("kind=red,x=0x10,flag=off,ref.n=3,count=7", &top, &err);
    CHECK(v && !err);
    char *s = v ? qmp_json_dumps(v) : strdup("");
    CHECK(!strcmp(s, "{\"kind\": \"red\", \"x\": 16, \"flag\": false, \"ref\": {\"n\": 3}, "
                     "\"count\": 7}"));
    free(s);
    json_decref(v);
    v = qmp_keyval_parse("kind=green,ref=a,,b", &top, &err);
    CHECK(v && !strcmp(json_string_value(json_object_get(v, "ref")), "a,b"));
    json_decref(v);
    CHECK(!qmp_keyval_parse("kind=green,flag=maybe", &top, &err));
    CHECK(err && !strcmp(err->msg, "Parameter 'flag' expects 'on' or 'off'"));
    lam_error_free(err);
    err = NULL;
    CHECK(!qmp_keyval_parse("kind", &top, &err));
    CHECK(err && !strcmp(err->msg, "Expected '=' after parameter 'kind'"));
    lam_error_free(err);
    err = NULL;
    CHECK(!qmp_keyval_parse("ref=a,ref.n=1", &top, &err));
    lam_error_free(err);
}

/* ---- loop ---- */

static int order[100];
static int norder;

static void record(void *opaque)
{
    order[norder++] = (int)(intptr_t)opaque;
    if (norder == 100) {
        lam_loop_quit();
    }
}

static void *caller(void *arg)
{
    for (int i = 0; i < 100; i++) {
        lam_loop_call(record, (void *)(intptr_t)i);
        if (i % 10 == 0) {
            usleep(1000);
        }
    }
    return NULL;
}

static void test_loop_calls_in_order(void)
{
    CHECK_EQ(lam_loop_init(), 0);
    pthread_t th;
    pthread_create(&th, NULL, caller, NULL);
    lam_loop_run();
    pthread_join(th, NULL);
    CHECK_EQ(norder, 100);
    for (int i = 0; i < norder; i++) {
        CHECK_EQ(order[i], i);
    }
    lam_loop_cleanup();
}

int main(void)
{
    RUN(test_stream_values_any_chunking);
    RUN(test_stream_errors);
    RUN(test_stream_recovers);
    RUN(test_stream_limits);
    RUN(test_stream_random);
    RUN(test_dump);
    RUN(test_parse_oneshot);
    RUN(test_schema);
    RUN(test_keyval);
    RUN(test_loop_calls_in_order);
    return tap_done();
}
