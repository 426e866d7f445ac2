/* Minimal TAP output for C unit tests: meson's TAP protocol counts them. */
#ifndef TEST_TAP_H
#define TEST_TAP_H

#include <stdio.h>
#include <stdlib.h>

static int tap_n, tap_failed;

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "# %s:%d: CHECK failed: %s\n", __FILE__,         \
                    __LINE__, #cond);                                        \
            tap_case_failed = 1;                                             \
        }                                                                    \
    } while (0)

#define CHECK_EQ(a, b)                                                       \
    do {                                                                     \
        long long a_ = (long long)(a), b_ = (long long)(b);                  \
        if (a_ != b_) {                                                      \
            fprintf(stderr, "# %s:%d: %s == %lld, expected %s == %lld\n",    \
                    __FILE__, __LINE__, #a, a_, #b, b_);                     \
            tap_case_failed = 1;                                             \
        }                                                                    \
    } while (0)

static int tap_case_failed;

static inline void tap_run(const char *name, void (*fn)(void))
{
    tap_case_failed = 0;
    fn();
    tap_n++;
    if (tap_case_failed) {
        tap_failed++;
    }
    printf("%s %d - %s\n", tap_case_failed ? "not ok" : "ok", tap_n, name);
    fflush(stdout);
}

#define RUN(fn) tap_run(#fn, fn)

static inline int tap_done(void)
{
    printf("1..%d\n", tap_n);
    return tap_failed ? 1 : 0;
}

#endif
