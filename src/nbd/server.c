/* NBD server: listening sockets (TCP over IPv4/IPv6, UNIX), one accept
 * thread per listening socket, one thread per connection, and the shared
 * worker pool that executes requests. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "nbd/nbd-int.h"

NbdServer nbd_srv = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .cond = PTHREAD_COND_INITIALIZER,
    .wake_pipe = { -1, -1 },
    .handshake_ms = 10000,
    .send_timeout_ms = NBD_SEND_TIMEOUT_S * 1000,
    .inline_max = NBD_INLINE_MAX,
    .batch_max = NBD_BATCH_MAX,
    .spread_min = NBD_SPREAD_MIN,
};

#define NBD_POOL_THREADS 256
/* Requests mostly hit caches: a few hot workers beat a thread per request;
 * requests queued for longer than the delay bring in more workers. */
#define NBD_POOL_ACTIVE 3
#define NBD_POOL_DELAY_US 200

int64_t nbd_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void nbd_kick_conns_locked(NbdExport *exp)
{
    for (NbdConn *c = nbd_srv.conns; c; c = c->next) {
        if (!exp || c->exp == exp) {
            c->kicked = true;
            shutdown(c->fd, SHUT_RDWR);
        }
    }
}

void lam_nbd_set_handshake_timeout(unsigned ms)
{
    pthread_mutex_lock(&nbd_srv.lock);
    nbd_srv.handshake_ms = ms ? ms : 10000;
    pthread_mutex_unlock(&nbd_srv.lock);
}

/* ---- connections ---- */

static void *conn_main(void *opaque)
{
    NbdConn *c = opaque;
    pthread_setname_np(pthread_self(), "nbd-conn");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    pthread_mutex_lock(&nbd_srv.lock);
    c->deadline_ms = nbd_now_ms() + nbd_srv.handshake_ms;
    pthread_mutex_unlock(&nbd_srv.lock);
    int r = nbd_handshake(c);
    c->deadline_ms = 0;
    if (r == 0) {
        nbd_transmission(c);
    }
    if (c->exp) {
        nbd_export_put(c->exp);
    }

    pthread_mutex_lock(&nbd_srv.lock);
    for (NbdConn **pp = &nbd_srv.conns; *pp; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    close(c->fd); /* after unlinking: kicks use the fd under the lock */
    nbd_srv.nconns--;
    pthread_cond_broadcast(&nbd_srv.cond);
    pthread_mutex_unlock(&nbd_srv.lock);

    nbd_conn_free_slots(c);
    free(c->meta_export);
    free(c->rbuf);
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->send_lock);
    pthread_cond_destroy(&c->cond);
    free(c);
    return NULL;
}

/* Called with nbd_srv.lock held; takes fd. */
static void conn_start_locked(int fd)
{
    if (nbd_srv.stopping ||
        (nbd_srv.max_connections &&
         (uint32_t)nbd_srv.nconns >= nbd_srv.max_connections)) {
        close(fd);
        return;
    }
    NbdConn *c = calloc(1, sizeof(*c));
    uint8_t *rbuf = malloc(NBD_RBUF_SIZE);
    if (!c || !rbuf) {
        free(c);
        free(rbuf);
        close(fd);
        return;
    }
    c->fd = fd;
    c->rbuf = rbuf;
    c->max_conns = nbd_srv.max_connections;
    c->inline_max = nbd_srv.inline_max;
    c->batch_max = nbd_srv.batch_max;
    c->spread_min = nbd_srv.spread_min;
    struct timeval tv = { .tv_sec = nbd_srv.send_timeout_ms / 1000,
                          .tv_usec = (nbd_srv.send_timeout_ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->send_lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    nbd_conn_init_slots(c);

    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 512 * 1024);
    c->next = nbd_srv.conns;
    nbd_srv.conns = c;
    nbd_srv.nconns++;
    if (pthread_create(&th, &attr, conn_main, c) != 0) {
        nbd_srv.conns = c->next;
        nbd_srv.nconns--;
        close(fd);
        free(rbuf);
        free(c);
    }
    pthread_attr_destroy(&attr);
}

static void *accept_main(void *opaque)
{
    NbdListener *l = opaque;
    pthread_setname_np(pthread_self(), "nbd-accept");
    for (;;) {
        struct pollfd pfd[2] = {
            { .fd = l->fd, .events = POLLIN },
            { .fd = nbd_srv.wake_pipe[0], .events = POLLIN },
        };
        int r = poll(pfd, 2, -1);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        if (pfd[1].revents) {
            break;
        }
        if (!(pfd[0].revents & POLLIN)) {
            continue;
        }
        int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE) {
                usleep(100000); /* out of descriptors: don't spin */
            }
            continue;
        }
        pthread_mutex_lock(&nbd_srv.lock);
        conn_start_locked(fd);
        pthread_mutex_unlock(&nbd_srv.lock);
    }
    return NULL;
}

/* ---- listening sockets ---- */

static int add_listener(int fd, LamError **errp)
{
    if (nbd_srv.nlisteners == NBD_MAX_LISTENERS) {
        close(fd);
        return 0; /* enough addresses already */
    }
    if (listen(fd, 128) < 0) {
        int err = errno;
        close(fd);
        lam_error_setg_errno(errp, -err, "Failed to listen on socket");
        return -err;
    }
    nbd_srv.listeners[nbd_srv.nlisteners++].fd = fd;
    return 0;
}

static int listen_inet(const char *host, const char *port, LamError **errp)
{
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
        .ai_flags = AI_PASSIVE | AI_ADDRCONFIG,
    };
    struct addrinfo *res = NULL;
    const char *h = host && *host ? host : NULL;
    int r = getaddrinfo(h, port, &hints, &res);
    if (r != 0) {
        lam_error_setg(errp, "address resolution failed for %s:%s: %s",
                       host ? host : "", port, gai_strerror(r));
        return -EINVAL;
    }
    int last_err = 0;
    bool have_v4 = false;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        have_v4 |= ai->ai_family == AF_INET;
    }
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                        ai->ai_protocol);
        if (fd < 0) {
            last_err = errno;
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (ai->ai_family == AF_INET6 && have_v4) {
            /* The v4 address gets its own socket; a lone "::" stays
             * dual-stack. */
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        }
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
            last_err = errno;
            close(fd);
            continue;
        }
        if (add_listener(fd, errp) < 0) {
            freeaddrinfo(res);
            return -EINVAL;
        }
        if (!nbd_srv.bound_addr) {
            struct sockaddr_storage ss;
            socklen_t sl = sizeof(ss);
            char hb[NI_MAXHOST], pb[NI_MAXSERV];
            if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 &&
                getnameinfo((struct sockaddr *)&ss, sl, hb, sizeof(hb), pb,
                            sizeof(pb), NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
                if (asprintf(&nbd_srv.bound_addr, "%s:%s", hb, pb) < 0) {
                    nbd_srv.bound_addr = NULL;
                }
            }
        }
        /* Port 0: every family must share the port the first one got. */
        if (strcmp(port, "0") == 0) {
            break;
        }
    }
    freeaddrinfo(res);
    if (nbd_srv.nlisteners == 0) {
        lam_error_setg_errno(errp, -(last_err ? last_err : EADDRNOTAVAIL),
                             "Failed to bind socket");
        return -EINVAL;
    }
    return 0;
}

static int listen_unix(const char *path, LamError **errp)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof(sa.sun_path)) {
        lam_error_setg(errp, "UNIX socket path '%s' is too long", path);
        return -EINVAL;
    }
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        lam_error_setg_errno(errp, -errno, "Failed to create socket");
        return -EINVAL;
    }
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) {
        unlink(path); /* stale socket of an earlier run */
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int err = errno;
        close(fd);
        lam_error_setg_errno(errp, -err, "Failed to bind socket to %s", path);
        return -EINVAL;
    }
    nbd_srv.unix_path = strdup(path);
    if (stat(path, &st) == 0) {
        nbd_srv.unix_dev = st.st_dev;
        nbd_srv.unix_ino = st.st_ino;
    }
    if (asprintf(&nbd_srv.bound_addr, "unix:%s", path) < 0) {
        nbd_srv.bound_addr = NULL;
    }
    return add_listener(fd, errp);
}

static void close_listeners(void)
{
    if (nbd_srv.wake_pipe[1] >= 0) {
        char b = 1;
        if (write(nbd_srv.wake_pipe[1], &b, 1) < 0) {
            /* the pipe is ours and empty: cannot fail meaningfully */
        }
    }
    for (int i = 0; i < nbd_srv.nlisteners; i++) {
        if (nbd_srv.listeners[i].thread) {
            pthread_join(nbd_srv.listeners[i].thread, NULL);
        }
        close(nbd_srv.listeners[i].fd);
        nbd_srv.listeners[i].thread = 0;
    }
    nbd_srv.nlisteners = 0;
    for (int i = 0; i < 2; i++) {
        if (nbd_srv.wake_pipe[i] >= 0) {
            close(nbd_srv.wake_pipe[i]);
        }
        nbd_srv.wake_pipe[i] = -1;
    }
    struct stat st;
    if (nbd_srv.unix_path && stat(nbd_srv.unix_path, &st) == 0 &&
        st.st_dev == nbd_srv.unix_dev && st.st_ino == nbd_srv.unix_ino) {
        /* Only our own socket: someone may have bound the path since. */
        unlink(nbd_srv.unix_path);
    }
    if (nbd_srv.unix_path) {
        free(nbd_srv.unix_path);
        nbd_srv.unix_path = NULL;
    }
    free(nbd_srv.bound_addr);
    nbd_srv.bound_addr = NULL;
}

static int start(const char *type, const char *host, const char *port,
                 const char *path, uint32_t max_connections, LamError **errp)
{
    if (nbd_srv.running) {
        lam_error_setg(errp, "NBD server already running");
        return -EBUSY;
    }
    if (!nbd_srv.pool) {
        nbd_srv.pool = lam_threadpool_new("nbd-worker", NBD_POOL_THREADS, 0,
                                          errp);
        if (!nbd_srv.pool) {
            return -ENOMEM;
        }
        const char *a = getenv("LAMINA_NBD_ACTIVE");
        const char *d = getenv("LAMINA_NBD_DELAY_US");
        lam_threadpool_set_pacing(nbd_srv.pool, a ? atoi(a) : NBD_POOL_ACTIVE,
                                  d ? atoi(d) : NBD_POOL_DELAY_US);
    }
    const char *env = getenv("LAMINA_NBD_HANDSHAKE_TIMEOUT_MS");
    if (env && atoi(env) > 0) {
        lam_nbd_set_handshake_timeout((unsigned)atoi(env));
    }
    env = getenv("LAMINA_NBD_INLINE_MAX"); /* 0 = always use the pool */
    if (env) {
        nbd_srv.inline_max = (uint32_t)atoi(env);
    }
    env = getenv("LAMINA_NBD_SPREAD"); /* 0 = never spread a backlog */
    if (env) {
        nbd_srv.spread_min = atoi(env);
    }
    long ncpus = sysconf(_SC_NPROCESSORS_ONLN);
    nbd_srv.ncpus = ncpus > 0 ? (int)ncpus : 1;
    env = getenv("LAMINA_NBD_BATCH"); /* 1 = send every reply at once */
    if (env && atoi(env) > 0) {
        nbd_srv.batch_max = atoi(env);
    }
    env = getenv("LAMINA_NBD_SEND_TIMEOUT_MS");
    if (env && atoi(env) > 0) {
        nbd_srv.send_timeout_ms = (unsigned)atoi(env);
    }
    if (pipe2(nbd_srv.wake_pipe, O_CLOEXEC) < 0) {
        lam_error_setg_errno(errp, -errno, "Failed to create pipe");
        return -EINVAL;
    }
    int r;
    if (strcmp(type, "unix") == 0) {
        r = listen_unix(path, errp);
    } else {
        r = listen_inet(host, port, errp);
    }
    if (r < 0) {
        close_listeners();
        return r;
    }
    nbd_srv.max_connections = max_connections;
    nbd_srv.stopping = false;
    nbd_srv.running = true;
    for (int i = 0; i < nbd_srv.nlisteners; i++) {
        if (pthread_create(&nbd_srv.listeners[i].thread, NULL, accept_main,
                           &nbd_srv.listeners[i]) != 0) {
            nbd_srv.listeners[i].thread = 0;
            nbd_srv.running = false;
            close_listeners();
            lam_error_setg(errp, "Failed to start the NBD accept thread");
            return -EAGAIN;
        }
    }
    return 0;
}

static const char *json_str_or_num(json_t *o, const char *key, char *tmp,
                                   size_t tmplen)
{
    json_t *v = json_object_get(o, key);
    if (json_is_string(v)) {
        return json_string_value(v);
    }
    if (json_is_integer(v)) {
        snprintf(tmp, tmplen, "%lld", (long long)json_integer_value(v));
        return tmp;
    }
    return NULL;
}

int lam_nbd_server_start(json_t *addr, uint32_t max_connections, LamError **errp)
{
    const char *type = json_string_value(json_object_get(addr, "type"));
    if (!type) {
        lam_error_setg(errp, "Parameter 'addr.type' is missing");
        return -EINVAL;
    }
    /* SocketAddressLegacy nests the members in "data"; the flat
     * SocketAddress form has them beside "type". */
    json_t *data = json_object_get(addr, "data");
    if (!json_is_object(data)) {
        data = addr;
    }
    if (strcmp(type, "unix") == 0) {
        const char *path = json_string_value(json_object_get(data, "path"));
        if (!path) {
            lam_error_setg(errp, "Parameter 'addr.data.path' is missing");
            return -EINVAL;
        }
        return start("unix", NULL, NULL, path, max_connections, errp);
    }
    if (strcmp(type, "inet") == 0) {
        char tmp[32];
        const char *host = json_string_value(json_object_get(data, "host"));
        const char *port = json_str_or_num(data, "port", tmp, sizeof(tmp));
        if (!host || !port) {
            lam_error_setg(errp, "Parameter 'addr.data.%s' is missing",
                           host ? "port" : "host");
            return -EINVAL;
        }
        return start("inet", host, port, NULL, max_connections, errp);
    }
    lam_error_setg(errp, "Unsupported socket address type '%s'", type);
    return -ENOTSUP;
}

int lam_nbd_server_start_str(const char *spec, LamError **errp)
{
    if (strncmp(spec, "unix:", 5) == 0) {
        return start("unix", NULL, NULL, spec + 5, 100, errp);
    }
    const char *colon = strrchr(spec, ':');
    if (!colon || !colon[1]) {
        lam_error_setg(errp, "Invalid NBD address '%s': expected HOST:PORT or "
                       "unix:PATH", spec);
        return -EINVAL;
    }
    char *host = strndup(spec, colon - spec);
    if (!host) {
        return -ENOMEM;
    }
    size_t hl = strlen(host);
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    int r = start("inet", host, colon + 1, NULL, 100, errp);
    free(host);
    return r;
}

bool lam_nbd_server_running(void)
{
    return nbd_srv.running;
}

const char *lam_nbd_server_address(void)
{
    return nbd_srv.bound_addr;
}

static void stop(void)
{
    pthread_mutex_lock(&nbd_srv.lock);
    nbd_srv.stopping = true;
    pthread_mutex_unlock(&nbd_srv.lock);
    close_listeners();
    nbd_export_remove_all();
    pthread_mutex_lock(&nbd_srv.lock);
    nbd_kick_conns_locked(NULL); /* clients still haggling */
    while (nbd_srv.nconns > 0) {
        pthread_cond_wait(&nbd_srv.cond, &nbd_srv.lock);
    }
    nbd_srv.running = false;
    nbd_srv.stopping = false;
    pthread_mutex_unlock(&nbd_srv.lock);
}

int lam_nbd_server_stop(LamError **errp)
{
    if (!nbd_srv.running) {
        lam_error_setg(errp, "NBD server not running");
        return -EINVAL;
    }
    stop();
    return 0;
}

void lam_nbd_shutdown(void)
{
    if (nbd_srv.running) {
        stop();
    }
    nbd_export_remove_all();
    if (nbd_srv.pool) {
        lam_threadpool_free(nbd_srv.pool);
        nbd_srv.pool = NULL;
    }
}
