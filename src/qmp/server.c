/* QMP over UNIX sockets: listeners, clients, the event sink.
 *
 * Everything here runs on the control thread except the event sink, which
 * any thread may call: it stamps the event and hands the serialized line
 * to the control thread through lam_loop_call(), which keeps emission
 * order.  Replies and events are written without blocking; a client that
 * doesn't read is dropped once its backlog passes CLIENT_MAX_BACKLOG.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "daemon/loop.h"
#include "lamina/events.h"
#include "qmp/json.h"
#include "qmp/qmp.h"

#define CLIENT_MAX_BACKLOG (16u << 20)
#define MAX_CLIENTS 64

typedef struct Client {
    int fd;
    QmpSession *sess;
    QmpJsonStream *js;
    char *out;
    size_t out_len, out_off, out_cap;
    bool in_feed;   /* inside qmp_json_stream_feed: defer freeing */
    bool dead;
    struct Client *next;
} Client;

typedef struct Listener {
    int fd;
    char *path;
    struct Listener *next;
} Listener;

/* Control-thread state. */
static Client *clients;
static int nclients;
static Listener *listeners;
static bool quit_requested;

static void client_io(int fd, short revents, void *opaque);

static void client_free(Client *c)
{
    qmp_json_stream_free(c->js);
    qmp_session_free(c->sess);
    free(c->out);
    free(c);
}

static void client_close(Client *c)
{
    if (c->dead) {
        return;
    }
    c->dead = true;
    lam_loop_set_fd(c->fd, 0, NULL, NULL);
    close(c->fd);
    c->fd = -1;
    for (Client **p = &clients; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    nclients--;
    if (!c->in_feed) {
        client_free(c);
    }
}

static void client_flush(Client *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                break;
            }
            client_close(c);
            return;
        }
        c->out_off += (size_t)n;
    }
    if (c->out_off == c->out_len) {
        c->out_off = c->out_len = 0;
    }
    lam_loop_set_fd(c->fd, POLLIN | (c->out_len ? POLLOUT : 0), client_io, c);
}

static void client_send(Client *c, const char *line, size_t len)
{
    if (c->dead) {
        return;
    }
    if (c->out_len - c->out_off + len > CLIENT_MAX_BACKLOG) {
        client_close(c);
        return;
    }
    if (c->out_off && c->out_len + len > c->out_cap) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    if (c->out_len + len > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + len) {
            cap *= 2;
        }
        char *p = realloc(c->out, cap);
        if (!p) {
            client_close(c);
            return;
        }
        c->out = p;
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, line, len);
    c->out_len += len;
    client_flush(c);
}

static void client_send_json(Client *c, json_t *v)
{
    char *s = qmp_json_dumps(v);
    size_t n = strlen(s);
    char *line = malloc(n + 3);
    if (!line) {
        abort();
    }
    memcpy(line, s, n);
    memcpy(line + n, "\r\n", 3);
    client_send(c, line, n + 2);
    free(line);
    free(s);
}

/* ---- events ---- */

static void broadcast(void *opaque)
{
    char *line = opaque;
    size_t n = strlen(line);
    for (Client *c = clients, *next; c; c = next) {
        next = c->next;
        if (qmp_session_negotiated(c->sess)) {
            client_send(c, line, n);
        }
    }
    free(line);
}

static void event_sink(const char *name, json_t *data)
{
    struct timeval tv;
    json_t *ts;
    if (gettimeofday(&tv, NULL) == 0) {
        ts = json_pack("{s:I, s:I}", "seconds", (json_int_t)tv.tv_sec,
                       "microseconds", (json_int_t)tv.tv_usec);
    } else {
        ts = json_pack("{s:i, s:i}", "seconds", -1, "microseconds", -1);
    }
    json_t *ev = json_object();
    json_object_set_new(ev, "timestamp", ts);
    json_object_set_new(ev, "event", json_string(name));
    if (data) {
        json_object_set_new(ev, "data", data);
    }
    char *s = qmp_json_dumps(ev);
    json_decref(ev);
    size_t n = strlen(s);
    char *line = realloc(s, n + 3);
    if (!line) {
        abort();
    }
    memcpy(line + n, "\r\n", 3);
    lam_loop_call(broadcast, line);
}

void qmp_server_init(void)
{
    lam_event_set_sink(event_sink);
}

void qmp_request_quit(void)
{
    quit_requested = true;
}

/* ---- requests ---- */

static void on_value(void *opaque, json_t *v, LamError *err)
{
    Client *c = opaque;
    json_t *reply;
    if (err) {
        reply = json_object();
        json_object_set_new(reply, "error", json_pack("{s:s, s:s}", "class",
                            err->cls ? err->cls : LAM_ERR_GENERIC, "desc", err->msg));
        lam_error_free(err);
    } else {
        reply = qmp_dispatch(c->sess, v);
        json_decref(v);
    }
    /* Events the command raised go out before its reply. */
    lam_loop_run_pending();
    client_send_json(c, reply);
    json_decref(reply);
    if (quit_requested) {
        qmp_json_stream_stop(c->js);
        lam_loop_quit();
    }
    if (c->dead) {
        qmp_json_stream_stop(c->js);
    }
}

static void client_io(int fd, short revents, void *opaque)
{
    Client *c = opaque;
    if (revents & POLLOUT) {
        client_flush(c);
        if (c->dead) {
            return;
        }
    }
    if (!(revents & (POLLIN | POLLHUP | POLLERR))) {
        return;
    }
    char buf[65536];
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
        return;
    }
    if (n <= 0) {
        client_close(c);
        return;
    }
    c->in_feed = true;
    qmp_json_stream_feed(c->js, buf, (size_t)n);
    c->in_feed = false;
    if (c->dead) {
        client_free(c);
    }
}

static void on_accept(int fd, short revents, void *opaque)
{
    int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (cfd < 0) {
        return;
    }
    if (nclients >= MAX_CLIENTS) {
        close(cfd);
        return;
    }
    Client *c = calloc(1, sizeof(*c));
    if (!c) {
        close(cfd);
        return;
    }
    c->fd = cfd;
    c->sess = qmp_session_new();
    c->js = qmp_json_stream_new(on_value, c);
    c->next = clients;
    clients = c;
    nclients++;
    json_t *g = json_pack("{s:{s:o, s:[s]}}", "QMP", "version", qmp_version_info(),
                          "capabilities", "oob");
    client_send_json(c, g);
    json_decref(g);
}

int qmp_server_listen(const char *path, LamError **errp)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(sa.sun_path)) {
        lam_error_setg(errp, "UNIX socket path '%s' is too long", path);
        return -1;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        lam_error_setg_errno(errp, -errno, "Failed to create socket");
        return -1;
    }
    /* A socket file left by a dead daemon is replaced; a live one isn't. */
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            lam_error_setg(errp, "Failed to bind socket to %s: File exists", path);
            close(fd);
            return -1;
        }
        int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
            close(probe);
            close(fd);
            lam_error_setg(errp, "Failed to bind socket to %s: Address already in use", path);
            return -1;
        }
        if (probe >= 0) {
            close(probe);
        }
        unlink(path);
    }
    /* Create it 0600 from the start: no window where others may connect. */
    mode_t old = umask(0177);
    int r = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    int e = errno;
    umask(old);
    if (r < 0) {
        lam_error_setg_errno(errp, -e, "Failed to bind socket to %s", path);
        close(fd);
        return -1;
    }
    if (listen(fd, 16) < 0) {
        lam_error_setg_errno(errp, -errno, "Failed to listen on socket %s", path);
        close(fd);
        unlink(path);
        return -1;
    }
    Listener *l = calloc(1, sizeof(*l));
    if (!l) {
        abort();
    }
    l->fd = fd;
    l->path = strdup(path);
    l->next = listeners;
    listeners = l;
    lam_loop_set_fd(fd, POLLIN, on_accept, l);
    return 0;
}

void qmp_server_shutdown(void)
{
    lam_event_set_sink(NULL);
    /* Best effort: push out what is queued (e.g. the quit reply). */
    for (Client *c = clients; c; c = c->next) {
        if (c->out_len > c->out_off) {
            int fl = fcntl(c->fd, F_GETFL);
            fcntl(c->fd, F_SETFL, fl & ~O_NONBLOCK);
            struct timeval tv = {1, 0};
            setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
            ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
            (void)n;
        }
    }
    while (clients) {
        client_close(clients);
    }
    while (listeners) {
        Listener *l = listeners;
        listeners = l->next;
        lam_loop_set_fd(l->fd, 0, NULL, NULL);
        close(l->fd);
        unlink(l->path);
        free(l->path);
        free(l);
    }
}
