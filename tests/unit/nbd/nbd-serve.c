/* nbd-serve: serves one image with the NBD server API, without laminad.
 * Used by the NBD tests and the benchmark.
 *
 *   nbd-serve [-f FMT] [-w] [-n NAME] [-d DESC] [-A] [-m MAXCONN]
 *             [-t WRITETHROUGH] [-a ADDR] IMAGE
 *
 * ADDR is HOST:PORT (port 0 picks a free one) or unix:PATH.  Prints
 * "listening ADDR" once ready and every QMP-style event as "event NAME
 * JSON".  Reads commands from stdin, one per line:
 *   del [hard]   removes the export        add   adds it again
 *   stop         nbd-server-stop            quit  (or EOF) shuts down */
#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lamina/block.h"
#include "lamina/events.h"
#include "nbd/nbd.h"

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void sink(const char *name, json_t *data)
{
    char *s = data ? json_dumps(data, JSON_COMPACT) : NULL;
    pthread_mutex_lock(&out_lock);
    printf("event %s %s\n", name, s ? s : "{}");
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
    free(s);
    json_decref(data);
}

static void reply(const char *what, LamError *err)
{
    pthread_mutex_lock(&out_lock);
    if (err) {
        printf("error %s: %s\n", what, err->msg);
        lam_error_free(err);
    } else {
        printf("ok %s\n", what);
    }
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
}

int main(int argc, char **argv)
{
    const char *fmt = NULL, *addr = "127.0.0.1:0";
    LamNbdExportOpts eo = { .id = "exp0", .node_name = "node0" };
    uint32_t maxconn = 100;
    int c;
    lam_progname = "nbd-serve";
    while ((c = getopt(argc, argv, "f:wn:d:Am:a:W")) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'w': eo.writable = true; break;
        case 'n': eo.name = optarg; break;
        case 'd': eo.description = optarg; break;
        case 'A': eo.allocation_depth = true; break;
        case 'm': maxconn = (uint32_t)atoi(optarg); break;
        case 'a': addr = optarg; break;
        case 'W': eo.writethrough = true; break;
        default:
            fprintf(stderr, "usage: nbd-serve [-f fmt] [-w] [-n name] [-d desc] "
                            "[-A] [-m maxconn] [-W] [-a addr] image\n");
            return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "nbd-serve: need one image\n");
        return 2;
    }
    lam_event_set_sink(sink);
    LamError *err = NULL;
    LamNode *bs = lam_open_image(argv[optind], fmt,
                                 eo.writable ? LAM_O_RDWR : 0, NULL, &err);
    if (!bs || lam_node_set_name(bs, "node0", &err) < 0) {
        lam_error_report_free(err);
        return 1;
    }
    json_t *a;
    if (strncmp(addr, "unix:", 5) == 0) {
        a = json_pack("{s:s, s:{s:s}}", "type", "unix", "data", "path", addr + 5);
    } else {
        const char *colon = strrchr(addr, ':');
        char *host = strndup(addr, colon ? (size_t)(colon - addr) : strlen(addr));
        a = json_pack("{s:s, s:{s:s, s:s}}", "type", "inet", "data", "host", host,
                      "port", colon ? colon + 1 : "10809");
        free(host);
    }
    if (lam_nbd_server_start(a, maxconn, &err) < 0 ||
        lam_nbd_export_add(&eo, &err) < 0) {
        lam_error_report_free(err);
        return 1;
    }
    json_decref(a);
    pthread_mutex_lock(&out_lock);
    printf("listening %s\n", lam_nbd_server_address());
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);

    char line[256];
    while (fgets(line, sizeof(line), stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "del", 3) == 0) {
            err = NULL;
            lam_nbd_export_del("exp0", strstr(line, "hard") != NULL, &err);
            reply("del", err);
        } else if (strcmp(line, "add") == 0) {
            err = NULL;
            lam_nbd_export_add(&eo, &err);
            reply("add", err);
        } else if (strcmp(line, "stop") == 0) {
            err = NULL;
            lam_nbd_server_stop(&err);
            reply("stop", err);
        } else if (strcmp(line, "query") == 0) {
            json_t *q = lam_nbd_query_exports();
            char *s = json_dumps(q, JSON_COMPACT);
            pthread_mutex_lock(&out_lock);
            printf("exports %s\n", s);
            fflush(stdout);
            pthread_mutex_unlock(&out_lock);
            free(s);
            json_decref(q);
        } else if (strcmp(line, "quit") == 0) {
            break;
        }
    }
    lam_nbd_shutdown();
    lam_node_unref(bs);
    reply("quit", NULL);
    return 0;
}
