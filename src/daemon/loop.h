/* The control thread's event loop (poll based).
 *
 * Everything that changes the block graph or talks QMP runs here, on one
 * thread.  Other threads (NBD, jobs, event emitters) hand work to it with
 * lam_loop_call(), the only function of this file that is thread safe.
 * See docs/design/threading.md.
 */
#ifndef LAMINA_DAEMON_LOOP_H
#define LAMINA_DAEMON_LOOP_H

#include <stdbool.h>
#include <stdint.h>

typedef void (*LamFdFn)(int fd, short revents, void *opaque);
typedef void (*LamCallFn)(void *opaque);

/* Control thread only. */
int lam_loop_init(void);
/* Watches fd for events (POLLIN/POLLOUT); events == 0 stops watching.
 * Replaces an earlier watch of the same fd. */
void lam_loop_set_fd(int fd, short events, LamFdFn fn, void *opaque);
/* One-shot timer after ms milliseconds; returns an id for cancel. */
uint64_t lam_loop_timer(int64_t ms, LamCallFn fn, void *opaque);
void lam_loop_timer_cancel(uint64_t id);
/* Runs until lam_loop_quit(); returns 0. */
int lam_loop_run(void);
void lam_loop_quit(void);
bool lam_loop_quitting(void);
/* Runs the calls queued by lam_loop_call() so far (e.g. to send the events
 * a command raised before its reply). */
void lam_loop_run_pending(void);
void lam_loop_cleanup(void);

/* Any thread: queues fn(opaque) to run on the control thread, in order. */
void lam_loop_call(LamCallFn fn, void *opaque);

#endif
