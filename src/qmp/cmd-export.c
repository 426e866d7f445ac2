/* NBD server and export commands; the NBD layer (src/nbd) does the work. */
#include <string.h>

#include "lamina/block.h"
#include "nbd/nbd.h"
#include "qmp/qmp.h"

/* ---- SocketAddressLegacy: {type, data} ---- */
static const QmpMember inet_members[] = {
    {"host", &qmp_t_str},
    {"port", &qmp_t_str},
    {"numeric", &qmp_t_bool, true},
    {"to", &qmp_t_int, true},
    {"ipv4", &qmp_t_bool, true},
    {"ipv6", &qmp_t_bool, true},
    {"keep-alive", &qmp_t_bool, true},
    {"mptcp", &qmp_t_bool, true},
    {NULL},
};
static const QmpType inet_type = {QMP_T_OBJECT, "InetSocketAddress", inet_members};
static const QmpMember unix_members[] = {
    {"path", &qmp_t_str},
    {"abstract", &qmp_t_bool, true},
    {"tight", &qmp_t_bool, true},
    {NULL},
};
static const QmpType unix_type = {QMP_T_OBJECT, "UnixSocketAddress", unix_members};
static const QmpMember vsock_members[] = {{"cid", &qmp_t_str}, {"port", &qmp_t_str}, {NULL}};
static const QmpType vsock_type = {QMP_T_OBJECT, "VsockSocketAddress", vsock_members};
static const QmpMember fd_members[] = {{"str", &qmp_t_str}, {NULL}};
static const QmpType fd_type = {QMP_T_OBJECT, "String", fd_members};

static const QmpMember inet_wrap[] = {{"data", &inet_type}, {NULL}};
static const QmpMember unix_wrap[] = {{"data", &unix_type}, {NULL}};
static const QmpMember vsock_wrap[] = {{"data", &vsock_type}, {NULL}};
static const QmpMember fd_wrap[] = {{"data", &fd_type}, {NULL}};
static const char *const addr_kinds[] = {"inet", "unix", "vsock", "fd", NULL};
static const QmpType addr_kind = {QMP_T_ENUM, "SocketAddressType", .values = addr_kinds};
static const QmpMember addr_base[] = {{"type", &addr_kind}, {NULL}};
static const QmpVariant addr_variants[] = {
    {"inet", inet_wrap}, {"unix", unix_wrap}, {"vsock", vsock_wrap}, {"fd", fd_wrap}, {NULL},
};
static const QmpType socket_address_legacy = {QMP_T_OBJECT, "SocketAddressLegacy", addr_base,
                                              .discriminator = "type",
                                              .variants = addr_variants};

static const QmpMember server_start_members[] = {
    {"addr", &socket_address_legacy},
    {"tls-creds", &qmp_t_str, true},
    {"tls-authz", &qmp_t_str, true},
    /* 100, not 7.2's 0 (unlimited): the later QEMU default that closed an
     * unbounded-connections denial of service. */
    {"max-connections", &qmp_t_uint32, true, "100"},
    {NULL},
};
static const QmpType server_start_args = {QMP_T_OBJECT, "object", server_start_members};

static json_t *cmd_nbd_server_start(json_t *args, QmpSession *s, LamError **errp)
{
    if (json_object_get(args, "tls-creds") || json_object_get(args, "tls-authz")) {
        lam_error_setg(errp, "TLS is not supported by this NBD server");
        return NULL;
    }
    uint32_t maxc = (uint32_t)json_integer_value(json_object_get(args, "max-connections"));
    lam_nbd_server_start(json_object_get(args, "addr"), maxc, errp);
    return NULL;
}

static json_t *cmd_nbd_server_stop(json_t *args, QmpSession *s, LamError **errp)
{
    lam_nbd_server_stop(errp);
    return NULL;
}

/* ---- BlockExportOptions ---- */
static const char *const export_types[] = {"nbd", NULL};
static const QmpType export_type = {QMP_T_ENUM, "BlockExportType", .values = export_types};
static const QmpMember export_base[] = {
    {"type", &export_type},
    {"id", &qmp_t_str},
    {"fixed-iothread", &qmp_t_bool, true},
    {"iothread", &qmp_t_str, true},
    {"node-name", &qmp_t_str},
    {"writable", &qmp_t_bool, true, "false"},
    {"writethrough", &qmp_t_bool, true, "false"},
    {NULL},
};
static const QmpMember bitmap_members[] = {{"node", &qmp_t_str}, {"name", &qmp_t_str}, {NULL}};
static const QmpType bitmap_type = {QMP_T_OBJECT, "BlockDirtyBitmap", bitmap_members};
static const QmpType *const bitmap_or_str_alts[] = {&qmp_t_str, &bitmap_type, NULL};
static const QmpType bitmap_or_str = {QMP_T_ALTERNATE, "BlockDirtyBitmapOrStr",
                                      .alts = bitmap_or_str_alts};
static const QmpType bitmap_list = {QMP_T_LIST, "array", .elem = &bitmap_or_str};
static const QmpMember export_nbd[] = {
    {"name", &qmp_t_str, true},
    {"description", &qmp_t_str, true},
    {"bitmaps", &bitmap_list, true},
    {"allocation-depth", &qmp_t_bool, true, "false"},
    {NULL},
};
static const QmpVariant export_variants[] = {{"nbd", export_nbd}, {NULL}};
static const QmpType export_args = {QMP_T_OBJECT, "BlockExportOptions", export_base,
                                    .discriminator = "type", .variants = export_variants};

static bool export_exists(const char *id)
{
    json_t *list = lam_nbd_query_exports();
    bool found = false;
    for (size_t i = 0; i < json_array_size(list); i++) {
        const char *e = json_string_value(json_object_get(json_array_get(list, i), "id"));
        found |= e && !strcmp(e, id);
    }
    json_decref(list);
    return found;
}

/* QEMU's id rule: a letter first, then letters, digits, '-', '.', '_'. */
static bool id_wellformed(const char *s)
{
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z'))) {
        return false;
    }
    for (s++; *s; s++) {
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
              (*s >= '0' && *s <= '9') || *s == '-' || *s == '.' || *s == '_')) {
            return false;
        }
    }
    return true;
}

#define NBD_MAX_STRING 4096 /* NBD protocol limit for names and descriptions */

/* The checks QEMU makes before the NBD layer is involved, in its order. */
static int export_add(json_t *args, LamError **errp)
{
    const char *id = json_string_value(json_object_get(args, "id"));
    const char *node = json_string_value(json_object_get(args, "node-name"));
    if (!id_wellformed(id)) {
        lam_error_setg(errp, "Invalid block export id");
        return -1;
    }
    if (export_exists(id)) {
        lam_error_setg(errp, "Block export id '%s' is already in use", id);
        return -1;
    }
    LamNode *bs = lam_node_find(node);
    if (!bs) {
        lam_error_setg(errp, "Cannot find device='' nor node-name='%s'", node);
        return -1;
    }
    if (json_object_get(args, "iothread")) {
        lam_error_setg(errp, "iothread \"%s\" not found",
                       json_string_value(json_object_get(args, "iothread")));
        return -1;
    }
    if (!lam_nbd_server_running()) {
        lam_error_setg(errp, "NBD server not running");
        return -1;
    }
    const char *name = json_string_value(json_object_get(args, "name"));
    const char *desc = json_string_value(json_object_get(args, "description"));
    if (!name) {
        name = node;
    }
    if (strlen(name) > NBD_MAX_STRING) {
        lam_error_setg(errp, "export name '%s' too long", name);
        return -1;
    }
    if (desc && strlen(desc) > NBD_MAX_STRING) {
        lam_error_setg(errp, "description '%s' too long", desc);
        return -1;
    }
    bool writable = json_is_true(json_object_get(args, "writable"));
    if (writable && lam_node_is_read_only(bs)) {
        lam_error_setg(errp, "Cannot export read-only node as writable");
        return -1;
    }
    /* No dirty bitmaps exist yet, so any named one is missing. */
    json_t *bitmaps = json_object_get(args, "bitmaps");
    if (json_array_size(bitmaps)) {
        json_t *b = json_array_get(bitmaps, 0);
        if (json_is_string(b)) {
            lam_error_setg(errp, "Bitmap '%s' is not found", json_string_value(b));
        } else {
            lam_error_setg(errp, "Dirty bitmap '%s' not found",
                           json_string_value(json_object_get(b, "name")));
        }
        return -1;
    }
    LamNbdExportOpts o = {
        .id = id,
        .node_name = node,
        .name = name,
        .description = desc,
        .writable = writable,
        .writethrough = json_is_true(json_object_get(args, "writethrough")),
        .allocation_depth = json_is_true(json_object_get(args, "allocation-depth")),
    };
    return lam_nbd_export_add(&o, errp);
}

int qmp_export_add(json_t *opts, LamError **errp)
{
    if (qmp_validate(&export_args, opts, true, errp) < 0) {
        return -1;
    }
    return export_add(opts, errp);
}

static json_t *cmd_block_export_add(json_t *args, QmpSession *s, LamError **errp)
{
    export_add(args, errp);
    return NULL;
}

static const char *const remove_modes[] = {"safe", "hard", NULL};
static const QmpType remove_mode = {QMP_T_ENUM, "BlockExportRemoveMode", .values = remove_modes};
static const QmpMember export_del_members[] = {
    {"id", &qmp_t_str},
    {"mode", &remove_mode, true, "\"safe\""},
    {NULL},
};
static const QmpType export_del_args = {QMP_T_OBJECT, "object", export_del_members};

static json_t *cmd_block_export_del(json_t *args, QmpSession *s, LamError **errp)
{
    const char *id = json_string_value(json_object_get(args, "id"));
    if (!export_exists(id)) {
        lam_error_setg(errp, "Export '%s' is not found", id);
        return NULL;
    }
    bool hard = !strcmp(json_string_value(json_object_get(args, "mode")), "hard");
    lam_nbd_export_del(id, hard, errp);
    return NULL;
}

static json_t *cmd_query_block_exports(json_t *args, QmpSession *s, LamError **errp)
{
    return lam_nbd_query_exports();
}

/* ---- deprecated nbd-server-add / nbd-server-remove (still in QEMU 10.1) ---- */
static const QmpMember server_add_members[] = {
    {"device", &qmp_t_str},
    {"name", &qmp_t_str, true},
    {"description", &qmp_t_str, true},
    {"writable", &qmp_t_bool, true, "false"},
    {"bitmap", &qmp_t_str, true},
    {NULL},
};
static const QmpType server_add_args = {QMP_T_OBJECT, "object", server_add_members};

static json_t *cmd_nbd_server_add(json_t *args, QmpSession *s, LamError **errp)
{
    const char *dev = json_string_value(json_object_get(args, "device"));
    LamNode *bs = lam_node_find(dev);
    if (!bs) {
        lam_error_setg(errp, "Cannot find device='%s' nor node-name='%s'", dev, dev);
        return NULL;
    }
    if (!lam_nbd_server_running()) {
        lam_error_setg(errp, "NBD server not running");
        return NULL;
    }
    /* The export id is the export name; a read-only node is exported
     * read-only rather than refused (legacy behaviour). */
    json_t *name = json_object_get(args, "name");
    json_t *opts = json_pack("{s:s, s:O, s:s, s:O, s:b}", "type", "nbd",
                             "id", name ? name : json_object_get(args, "device"),
                             "node-name", dev, "name", name ? name : json_object_get(args, "device"),
                             "writable", json_is_true(json_object_get(args, "writable")) &&
                                         !lam_node_is_read_only(bs));
    if (json_object_get(args, "description")) {
        json_object_set(opts, "description", json_object_get(args, "description"));
    }
    if (json_object_get(args, "bitmap")) {
        json_object_set_new(opts, "bitmaps",
                            json_pack("[O]", json_object_get(args, "bitmap")));
    }
    export_add(opts, errp);
    json_decref(opts);
    return NULL;
}

static const QmpMember server_remove_members[] = {
    {"name", &qmp_t_str},
    {"mode", &remove_mode, true, "\"safe\""},
    {NULL},
};
static const QmpType server_remove_args = {QMP_T_OBJECT, "object", server_remove_members};

static json_t *cmd_nbd_server_remove(json_t *args, QmpSession *s, LamError **errp)
{
    json_object_set(args, "id", json_object_get(args, "name"));
    return cmd_block_export_del(args, s, errp);
}

/* QSD has no BlockBackends with device names: always empty. */
static json_t *cmd_query_block(json_t *args, QmpSession *s, LamError **errp)
{
    return json_array();
}

static const QmpCommandDef export_cmds[] = {
    {"nbd-server-start", &server_start_args, cmd_nbd_server_start},
    {"nbd-server-stop", NULL, cmd_nbd_server_stop},
    {"nbd-server-add", &server_add_args, cmd_nbd_server_add},
    {"nbd-server-remove", &server_remove_args, cmd_nbd_server_remove},
    {"block-export-add", &export_args, cmd_block_export_add},
    {"block-export-del", &export_del_args, cmd_block_export_del},
    {"query-block-exports", NULL, cmd_query_block_exports},
    {"query-block", NULL, cmd_query_block},
    {NULL},
};

void qmp_export_init(void)
{
    qmp_register(export_cmds);
}
