/* Weak stand-ins for the NBD server API (src/nbd/nbd.h) so that laminad
 * links before src/nbd lands; the real definitions override these.
 * Delete this file once src/nbd is on main. */
#include "nbd/nbd.h"

#define WEAK __attribute__((weak))

static void no_nbd(LamError **errp)
{
    lam_error_setg(errp, "NBD server support is not built in");
}

WEAK int lam_nbd_server_start(json_t *addr, uint32_t max_connections, LamError **errp)
{
    no_nbd(errp);
    return -1;
}

WEAK int lam_nbd_server_start_str(const char *spec, LamError **errp)
{
    no_nbd(errp);
    return -1;
}

WEAK int lam_nbd_server_stop(LamError **errp)
{
    lam_error_setg(errp, "NBD server not running");
    return -1;
}

WEAK bool lam_nbd_server_running(void)
{
    return false;
}

WEAK int lam_nbd_export_add(const LamNbdExportOpts *o, LamError **errp)
{
    lam_error_setg(errp, "NBD server not running");
    return -1;
}

WEAK int lam_nbd_export_del(const char *id, bool hard, LamError **errp)
{
    lam_error_setg(errp, "Export '%s' is not found", id);
    return -1;
}

WEAK json_t *lam_nbd_query_exports(void)
{
    return json_array();
}

WEAK bool lam_nbd_node_exported(LamNode *bs, const char **export_id)
{
    return false;
}

WEAK void lam_nbd_shutdown(void)
{
}
