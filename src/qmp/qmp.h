/* QMP server and command table.
 *
 * Commands are registered from per-area files (cmd-control.c, cmd-block.c,
 * cmd-export.c; the jobs layer adds its own) as static tables:
 *
 *   static const QmpMember set_speed_args[] = {
 *       {"device", &qmp_t_str}, {"speed", &qmp_t_int}, {NULL}};
 *   static const QmpType set_speed_type = {QMP_T_OBJECT, "object", set_speed_args};
 *   static const QmpCommandDef defs[] = {
 *       {"block-job-set-speed", &set_speed_type, qmp_block_job_set_speed},
 *       {NULL}};
 *   qmp_register(defs);   // from an init function called by main.c
 *
 * The dispatcher validates the arguments against the schema (with QEMU's
 * wording), fills declared defaults unless QMP_CMD_NO_DEFAULTS, and calls
 * the handler on the control thread.  `query-commands` lists the table.
 */
#ifndef LAMINA_QMP_H
#define LAMINA_QMP_H

#include <jansson.h>
#include <stdbool.h>

#include "lamina/error.h"
#include "qmp/schema.h"

typedef struct QmpSession QmpSession; /* one client connection */

/* args: validated arguments object (never NULL; {} if none given).
 * Returns the "return" value (new reference; NULL means {}), or sets errp
 * and returns NULL. */
typedef json_t *(*QmpHandler)(json_t *args, QmpSession *s, LamError **errp);

enum {
    QMP_CMD_NO_DEFAULTS = 1 << 0, /* pass arguments exactly as given */
    QMP_CMD_PRE_NEGOTIATION = 1 << 1, /* allowed before qmp_capabilities */
};

typedef struct QmpCommandDef {
    const char *name;
    const QmpType *args;   /* NULL: takes no arguments */
    QmpHandler fn;
    unsigned flags;
} QmpCommandDef;

/* defs: array terminated by {NULL}; kept by reference (static storage). */
void qmp_register(const QmpCommandDef *defs);
const QmpCommandDef *qmp_find_command(const char *name);
/* Calls fn for every command in registration order. */
void qmp_foreach_command(void (*fn)(const QmpCommandDef *d, void *opaque), void *opaque);

/* Runs one parsed request for a session; returns the reply object. */
json_t *qmp_dispatch(QmpSession *s, json_t *req);
QmpSession *qmp_session_new(void);
void qmp_session_free(QmpSession *s);
/* The greeting's / query-version's version object (new reference). */
json_t *qmp_version_info(void);
bool qmp_session_negotiated(const QmpSession *s);
void qmp_session_set_negotiated(QmpSession *s, bool oob);

/* Registration of the built-in command sets (called by main). */
void qmp_control_init(void);
void qmp_block_init(void);
void qmp_export_init(void);

/* ---- server (src/qmp/server.c) ---- */
/* Listens on a UNIX socket (mode 0600, replaces a stale socket file). */
int qmp_server_listen(const char *path, LamError **errp);
/* Installs the event sink (timestamps, broadcast to negotiated clients). */
void qmp_server_init(void);
/* Closes clients and listeners, removes the socket files. */
void qmp_server_shutdown(void);
/* Asks the daemon to shut down after the current command's reply. */
void qmp_request_quit(void);

/* ---- block state owned by the monitor (src/qmp/cmd-block.c) ---- */
/* Adds a node like blockdev-add (used for --blockdev too). */
int qmp_blockdev_add(json_t *opts, LamError **errp);
int qmp_export_add(json_t *opts, LamError **errp); /* --export */
/* Flushes and closes every monitor-owned node (shutdown). */
void qmp_block_close_all(void);

#endif
