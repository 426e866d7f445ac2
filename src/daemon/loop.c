/* poll(2) loop with fd watches, one-shot timers and a cross-thread call
 * queue woken through an eventfd. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "daemon/loop.h"

typedef struct Watch {
    int fd;
    short events;
    LamFdFn fn;
    void *opaque;
} Watch;

typedef struct Timer {
    uint64_t id;
    int64_t due_ms;
    LamCallFn fn;
    void *opaque;
    struct Timer *next;
} Timer;

typedef struct Call {
    LamCallFn fn;
    void *opaque;
    struct Call *next;
} Call;

/* Control-thread state: no lock, only the control thread touches it. */
static Watch *watches;
static int nwatches, capwatches;
static Timer *timers;
static uint64_t next_timer_id = 1;
static bool quitting;
static int wake_fd = -1;

/* calls_lock protects calls_head/calls_tail: lam_loop_call() appends from
 * any thread, the control thread takes the whole list. */
static pthread_mutex_t calls_lock = PTHREAD_MUTEX_INITIALIZER;
static Call *calls_head, *calls_tail;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void wake_read(int fd, short revents, void *opaque)
{
    uint64_t v;
    while (read(fd, &v, sizeof(v)) < 0 && errno == EINTR) {
    }
    lam_loop_run_pending();
}

int lam_loop_init(void)
{
    wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd < 0) {
        return -errno;
    }
    lam_loop_set_fd(wake_fd, POLLIN, wake_read, NULL);
    return 0;
}

void lam_loop_set_fd(int fd, short events, LamFdFn fn, void *opaque)
{
    for (int i = 0; i < nwatches; i++) {
        if (watches[i].fd == fd) {
            if (events) {
                watches[i] = (Watch){fd, events, fn, opaque};
            } else {
                /* Mark dead; compacted by the loop so that removal during
                 * dispatch doesn't shift entries under the iterator. */
                watches[i].fd = -1;
                watches[i].events = 0;
            }
            return;
        }
    }
    if (!events) {
        return;
    }
    if (nwatches == capwatches) {
        capwatches = capwatches ? capwatches * 2 : 16;
        watches = realloc(watches, capwatches * sizeof(*watches));
        if (!watches) {
            abort();
        }
    }
    watches[nwatches++] = (Watch){fd, events, fn, opaque};
}

uint64_t lam_loop_timer(int64_t ms, LamCallFn fn, void *opaque)
{
    Timer *t = calloc(1, sizeof(*t));
    if (!t) {
        abort();
    }
    *t = (Timer){next_timer_id++, now_ms() + ms, fn, opaque, NULL};
    Timer **p = &timers;
    while (*p && (*p)->due_ms <= t->due_ms) {
        p = &(*p)->next;
    }
    t->next = *p;
    *p = t;
    return t->id;
}

void lam_loop_timer_cancel(uint64_t id)
{
    for (Timer **p = &timers; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            Timer *t = *p;
            *p = t->next;
            free(t);
            return;
        }
    }
}

void lam_loop_call(LamCallFn fn, void *opaque)
{
    Call *c = malloc(sizeof(*c));
    if (!c) {
        abort();
    }
    *c = (Call){fn, opaque, NULL};
    pthread_mutex_lock(&calls_lock);
    bool was_empty = !calls_head;
    if (calls_tail) {
        calls_tail->next = c;
    } else {
        calls_head = c;
    }
    calls_tail = c;
    pthread_mutex_unlock(&calls_lock);
    if (was_empty && wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(wake_fd, &one, sizeof(one));
        (void)r; /* EAGAIN: counter saturated, the loop wakes anyway */
    }
}

void lam_loop_run_pending(void)
{
    for (;;) {
        pthread_mutex_lock(&calls_lock);
        Call *c = calls_head;
        calls_head = calls_tail = NULL;
        pthread_mutex_unlock(&calls_lock);
        if (!c) {
            return;
        }
        while (c) {
            Call *next = c->next;
            c->fn(c->opaque);
            free(c);
            c = next;
        }
    }
}

void lam_loop_quit(void)
{
    quitting = true;
}

bool lam_loop_quitting(void)
{
    return quitting;
}

int lam_loop_run(void)
{
    struct pollfd *pfds = NULL;
    int cap = 0;
    while (!quitting) {
        /* Compact dead watches. */
        int j = 0;
        for (int i = 0; i < nwatches; i++) {
            if (watches[i].fd >= 0) {
                watches[j++] = watches[i];
            }
        }
        nwatches = j;
        if (cap < nwatches) {
            cap = nwatches * 2;
            pfds = realloc(pfds, cap * sizeof(*pfds));
            if (!pfds) {
                abort();
            }
        }
        int n = nwatches;
        for (int i = 0; i < n; i++) {
            pfds[i] = (struct pollfd){watches[i].fd, watches[i].events, 0};
        }
        int timeout = -1;
        if (timers) {
            int64_t d = timers->due_ms - now_ms();
            timeout = d < 0 ? 0 : (d > 60000 ? 60000 : (int)d);
        }
        int r = poll(pfds, n, timeout);
        if (r < 0 && errno != EINTR) {
            break;
        }
        for (int i = 0; r > 0 && i < n && !quitting; i++) {
            if (!pfds[i].revents) {
                continue;
            }
            /* The watch may have been changed by an earlier handler. */
            if (watches[i].fd != pfds[i].fd) {
                continue;
            }
            Watch w = watches[i];
            w.fn(w.fd, pfds[i].revents, w.opaque);
        }
        int64_t now = now_ms();
        while (timers && timers->due_ms <= now && !quitting) {
            Timer *t = timers;
            timers = t->next;
            t->fn(t->opaque);
            free(t);
        }
    }
    free(pfds);
    return 0;
}

void lam_loop_cleanup(void)
{
    lam_loop_run_pending();
    while (timers) {
        Timer *t = timers;
        timers = t->next;
        free(t);
    }
    if (wake_fd >= 0) {
        close(wake_fd);
        wake_fd = -1;
    }
    free(watches);
    watches = NULL;
    nwatches = capwatches = 0;
}
