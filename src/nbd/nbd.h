/* NBD server API used by the daemon (QMP commands and command line).
 *
 * All functions here are called from the control thread.  The server runs
 * its own threads (accept, one reader per connection, a worker pool); it
 * reaches the graph only through a root edge per export.  Events
 * (BLOCK_EXPORT_DELETED) go through lam_event_emit().
 */
#ifndef LAMINA_NBD_H
#define LAMINA_NBD_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "lamina/block.h"

/* addr: QEMU's SocketAddressLegacy as QMP gives it:
 *   {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}
 *   {"type": "unix", "data": {"path": "/run/x.sock"}}
 * max_connections: 0 = unlimited; 1 disables CAN_MULTI_CONN. */
int lam_nbd_server_start(json_t *addr, uint32_t max_connections, LamError **errp);
/* Parses the --nbd command-line form "HOST:PORT" or "unix:PATH". */
int lam_nbd_server_start_str(const char *spec, LamError **errp);
/* Removes every export (BLOCK_EXPORT_DELETED each), closes the listener. */
int lam_nbd_server_stop(LamError **errp);
bool lam_nbd_server_running(void);
/* The address actually bound ("127.0.0.1:40123", "unix:/x.sock"), useful
 * after asking for port 0; NULL when not running. */
const char *lam_nbd_server_address(void);
/* Clients that have not finished the handshake after this long are
 * dropped (default 10 s; also LAMINA_NBD_HANDSHAKE_TIMEOUT_MS at start). */
void lam_nbd_set_handshake_timeout(unsigned ms);

typedef struct LamNbdExportOpts {
    const char *id;          /* block-export-add "id" */
    const char *node_name;
    const char *name;        /* NBD export name; default node_name */
    const char *description; /* may be NULL */
    bool writable;
    bool writethrough;
    bool allocation_depth;   /* offer qemu:allocation-depth */
} LamNbdExportOpts;

int lam_nbd_export_add(const LamNbdExportOpts *o, LamError **errp);
/* hard=false: refuse while clients are connected ("export 'X' still in
 * use"); hard=true: disconnect them.  BLOCK_EXPORT_DELETED follows. */
int lam_nbd_export_del(const char *id, bool hard, LamError **errp);
/* QEMU's query-block-exports list: [{"type":"nbd","id":..,"node-name":..,
 * "shutting-down":false}, ...] (new reference). */
json_t *lam_nbd_query_exports(void);
/* True if node is used by an export (for blockdev-del's error message). */
bool lam_nbd_node_exported(LamNode *bs, const char **export_id);
/* Disconnects everybody, drains in-flight requests, removes exports; for
 * quit / SIGTERM. */
void lam_nbd_shutdown(void);

#endif
