/* laminad: the storage daemon.  Sets up the graph from the command line
 * (or the embedded default), serves QMP and NBD, and shuts down cleanly on
 * SIGINT/SIGTERM or `quit`: NBD requests finish, images are flushed and
 * closed clean, socket and pid files are removed. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "daemon/loop.h"
#include "jobs/job.h"
#include "lamina-config.h"
#include "lamina/block.h"
#include "nbd/nbd.h"
#include "qmp/blockdev-schema.h"
#include "qmp/json.h"
#include "qmp/keyval.h"
#include "qmp/qmp.h"

#define DEFAULT_DIR "lamina-data"
#define DEFAULT_IMAGE DEFAULT_DIR "/disk0.qcow2"
#define DEFAULT_QMP DEFAULT_DIR "/qmp.sock"
#define DEFAULT_NBD "127.0.0.1:10809"
#define DEFAULT_SIZE (10LL << 30)

typedef enum { ACT_BLOCKDEV, ACT_EXPORT } ActKind;
typedef struct Action {
    ActKind kind;
    const char *arg;
} Action;

typedef struct Options {
    Action *acts;
    int nacts;
    const char **qmp;
    int nqmp;
    const char *nbd;
    const char *pidfile;
    bool daemonize;
} Options;

static char *pidfile_path;

static void usage(FILE *f)
{
    fprintf(f,
"Usage: laminad [options]\n"
"Lamina storage daemon: block-node graph served over QMP and NBD.\n"
"\n"
"  --qmp PATH         QMP monitor on UNIX socket PATH (mode 0600; repeatable)\n"
"  --nbd ADDR         start the NBD server on HOST:PORT or unix:PATH\n"
"  --blockdev JSON    add a node, same JSON as blockdev-add (repeatable)\n"
"  --export JSON      add an export, same JSON as block-export-add (repeatable)\n"
"                     (both also take QSD's key=value form:\n"
"                      driver=file,node-name=f,filename=a.img)\n"
"  --daemonize        detach once everything is set up\n"
"  --pidfile PATH     write the daemon's pid to PATH (locked, removed at exit)\n"
"  -h, --help         show this help\n"
"  -V, --version      show the version\n"
"\n"
"--blockdev and --export are applied in the order given, after the NBD\n"
"server has started, and before the QMP sockets accept clients.\n"
"\n"
"Without arguments laminad serves ./" DEFAULT_IMAGE " (10 GiB qcow2, created\n"
"if missing) as node 'disk0', exported writable over NBD on " DEFAULT_NBD "\n"
"as 'disk0', with QMP on ./" DEFAULT_QMP ".\n");
}

static void die_err(LamError *err)
{
    lam_error_report_free(err);
    exit(1);
}

static int parse_args(int argc, char **argv, Options *o)
{
    enum { OPT_QMP = 256, OPT_NBD, OPT_BLOCKDEV, OPT_EXPORT, OPT_DAEMONIZE, OPT_PIDFILE };
    static const struct option longopts[] = {
        {"qmp", required_argument, NULL, OPT_QMP},
        {"nbd", required_argument, NULL, OPT_NBD},
        {"blockdev", required_argument, NULL, OPT_BLOCKDEV},
        {"export", required_argument, NULL, OPT_EXPORT},
        {"daemonize", no_argument, NULL, OPT_DAEMONIZE},
        {"pidfile", required_argument, NULL, OPT_PIDFILE},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    /* Room for every argument plus what the default setup adds. */
    o->acts = calloc((size_t)argc + 4, sizeof(*o->acts));
    o->qmp = calloc((size_t)argc + 4, sizeof(*o->qmp));
    if (!o->acts || !o->qmp) {
        abort();
    }
    int c;
    while ((c = getopt_long(argc, argv, "hV", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_QMP:
            o->qmp[o->nqmp++] = optarg;
            break;
        case OPT_NBD:
            if (o->nbd) {
                lam_report("--nbd may be given only once");
                return -1;
            }
            o->nbd = optarg;
            break;
        case OPT_BLOCKDEV:
            o->acts[o->nacts++] = (Action){ACT_BLOCKDEV, optarg};
            break;
        case OPT_EXPORT:
            o->acts[o->nacts++] = (Action){ACT_EXPORT, optarg};
            break;
        case OPT_DAEMONIZE:
            o->daemonize = true;
            break;
        case OPT_PIDFILE:
            o->pidfile = optarg;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        case 'V':
            printf("laminad version " LAMINA_VERSION
                   " (QMP wire compatible with qemu-storage-daemon 7.2)\n");
            exit(0);
        default:
            fprintf(stderr, "Try 'laminad --help' for more information.\n");
            return -1;
        }
    }
    if (optind < argc) {
        lam_report("unexpected argument '%s'", argv[optind]);
        fprintf(stderr, "Try 'laminad --help' for more information.\n");
        return -1;
    }
    return 0;
}

/* The embedded default: creates the data folder and image if missing and
 * fills o as if the equivalent command line had been given. */
static void setup_default(Options *o, char **blockdev_json)
{
    if (mkdir(DEFAULT_DIR, 0700) < 0 && errno != EEXIST) {
        lam_report("Could not create '%s': %s", DEFAULT_DIR, strerror(errno));
        exit(1);
    }
    struct stat st;
    if (stat(DEFAULT_IMAGE, &st) < 0) {
        LamError *err = NULL;
        if (lam_create_image(DEFAULT_IMAGE, "qcow2", DEFAULT_SIZE, NULL, &err) < 0) {
            die_err(err);
        }
        printf("Created " DEFAULT_IMAGE " (qcow2, 10 GiB)\n");
    }
    char abs[PATH_MAX];
    if (!realpath(DEFAULT_IMAGE, abs)) {
        lam_report("Could not resolve '%s': %s", DEFAULT_IMAGE, strerror(errno));
        exit(1);
    }
    json_t *bd = json_pack("{s:s, s:s, s:{s:s, s:s}}", "driver", "qcow2", "node-name", "disk0",
                           "file", "driver", "file", "filename", abs);
    *blockdev_json = qmp_json_dumps(bd);
    json_decref(bd);
    o->acts[o->nacts++] = (Action){ACT_BLOCKDEV, *blockdev_json};
    o->acts[o->nacts++] = (Action){ACT_EXPORT,
        "{\"type\": \"nbd\", \"id\": \"disk0\", \"node-name\": \"disk0\", \"writable\": true}"};
    o->nbd = DEFAULT_NBD;
    o->qmp[o->nqmp++] = DEFAULT_QMP;
}

static void print_default_banner(void)
{
    printf("laminad " LAMINA_VERSION ": serving " DEFAULT_IMAGE " (qcow2, 10 GiB) as node 'disk0'\n"
           "  NBD export 'disk0' (writable) on " DEFAULT_NBD "\n"
           "  QMP monitor on " DEFAULT_QMP "\n"
           "\n"
           "Connect with:\n"
           "  qemu-io -f raw nbd://" DEFAULT_NBD "/disk0\n"
           "  nbdinfo nbd://" DEFAULT_NBD "/disk0\n"
           "  socat - UNIX-CONNECT:" DEFAULT_QMP "\n"
           "    then type: {\"execute\": \"qmp_capabilities\"}\n"
           "               {\"execute\": \"query-block-exports\"}\n"
           "Stop with Ctrl-C, SIGTERM or {\"execute\": \"quit\"}.\n");
    fflush(stdout);
}

static int write_pidfile(const char *path)
{
    int fd = open(path, O_CREAT | O_RDWR | O_CLOEXEC, 0644);
    if (fd < 0) {
        lam_report("Cannot open pid file '%s': %s", path, strerror(errno));
        return -1;
    }
    if (lockf(fd, F_TLOCK, 0) < 0) {
        lam_report("Cannot lock pid file '%s': %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    char buf[32];
    int n = snprintf(buf, sizeof(buf), "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) < 0 || write(fd, buf, (size_t)n) != n) {
        lam_report("Cannot write pid file '%s': %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    /* fd stays open: the lock lives as long as we do. */
    pidfile_path = strdup(path);
    return 0;
}

/* --daemonize: the parent waits until the child says it is ready (one
 * byte on the pipe) so that errors still reach the caller's terminal and
 * the exit status tells whether the daemon runs. */
static int daemonize_start(void)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        lam_report("pipe: %s", strerror(errno));
        exit(1);
    }
    pid_t pid = fork();
    if (pid < 0) {
        lam_report("fork: %s", strerror(errno));
        exit(1);
    }
    if (pid > 0) {
        close(p[1]);
        char c;
        ssize_t n;
        while ((n = read(p[0], &c, 1)) < 0 && errno == EINTR) {
        }
        if (n == 1) {
            _exit(0);
        }
        int st;
        waitpid(pid, &st, 0);
        _exit(1);
    }
    close(p[0]);
    setsid();
    return p[1];
}

static void daemonize_done(int fd)
{
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        if (null > 2) {
            close(null);
        }
    }
    char c = 0;
    ssize_t n = write(fd, &c, 1);
    (void)n;
    close(fd);
}

static void on_signal(int fd, short revents, void *opaque)
{
    struct signalfd_siginfo si;
    while (read(fd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
        lam_loop_quit();
    }
}

int main(int argc, char **argv)
{
    lam_progname = "laminad";
    /* Block the stop signals before any thread exists, so that every
     * thread inherits the mask and only the signalfd sees them. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    Options o = {0};
    char *default_bd = NULL;
    bool default_mode = argc == 1;
    if (parse_args(argc, argv, &o) < 0) {
        return 1;
    }
    int ready_fd = o.daemonize ? daemonize_start() : -1;
    if (default_mode) {
        setup_default(&o, &default_bd);
    }

    if (lam_loop_init() < 0) {
        lam_report("Could not set up the event loop");
        return 1;
    }
    int sfd = signalfd(-1, &stop, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) {
        lam_report("signalfd: %s", strerror(errno));
        return 1;
    }
    lam_loop_set_fd(sfd, POLLIN, on_signal, NULL);

    qmp_server_init();
    qmp_control_init();
    qmp_block_init();
    qmp_export_init();
    qmp_schema_init();
    if (qmp_jobs_init) {
        qmp_jobs_init();
    }

    LamError *err = NULL;
    if (o.nbd && lam_nbd_server_start_str(o.nbd, &err) < 0) {
        lam_error_prepend(&err, "--nbd %s: ", o.nbd);
        goto fail;
    }
    for (int i = 0; i < o.nacts; i++) {
        const char *what = o.acts[i].kind == ACT_BLOCKDEV ? "--blockdev" : "--export";
        /* JSON, or QSD's key=value form (driver=file,node-name=f,...). */
        const QmpType *schema = o.acts[i].kind == ACT_BLOCKDEV ? &qmp_blockdev_options
                                                               : &qmp_export_options;
        const char *a = o.acts[i].arg;
        char first = a[strspn(a, " \t")];
        json_t *opts = first == '{' || first == '['
                           ? qmp_json_parse(a, &err)
                           : qmp_keyval_parse(a, schema, &err);
        if (opts && !json_is_object(opts)) {
            lam_error_setg(&err, "expected a JSON object");
        }
        if (!err) {
            if (o.acts[i].kind == ACT_BLOCKDEV) {
                qmp_blockdev_add(opts, &err);
            } else {
                qmp_export_add(opts, &err);
            }
        }
        json_decref(opts);
        if (err) {
            lam_error_prepend(&err, "%s: ", what);
            goto fail;
        }
    }
    for (int i = 0; i < o.nqmp; i++) {
        if (qmp_server_listen(o.qmp[i], &err) < 0) {
            lam_error_prepend(&err, "--qmp: ");
            goto fail;
        }
    }
    if (o.pidfile && write_pidfile(o.pidfile) < 0) {
        goto fail_quiet;
    }
    if (default_mode) {
        print_default_banner();
    }
    if (ready_fd >= 0) {
        daemonize_done(ready_fd);
    }

    lam_loop_run();

    int status = 0;
    goto shutdown;
fail:
    lam_error_report_free(err);
fail_quiet:
    status = 1;
shutdown:
    /* Order matters: NBD clients stop and their requests finish before the
     * nodes they use are closed; the events this raises still go out. */
    lam_nbd_shutdown();
    /* Running jobs are force-cancelled (BLOCK_JOB_CANCELLED goes out, as
     * on QSD) before their nodes close. */
    lam_job_cancel_all_sync();
    lam_loop_run_pending();
    qmp_server_shutdown();
    qmp_block_close_all();
    if (pidfile_path) {
        unlink(pidfile_path);
        free(pidfile_path);
    }
    lam_loop_cleanup();
    close(sfd);
    free(default_bd);
    free(o.acts);
    free(o.qmp);
    return status;
}
