/* Control commands: qmp_capabilities, query-version, query-commands, quit. */
#include <string.h>

#include "lamina-config.h"
#include "qmp/qmp.h"

json_t *qmp_version_info(void)
{
    /* The QEMU version we are wire compatible with; our own in package. */
    return json_pack("{s:{s:i, s:i, s:i}, s:s}", "qemu", "micro", 0, "minor", 2,
                     "major", 7, "package", "Lamina " LAMINA_VERSION);
}

static json_t *cmd_qmp_capabilities(json_t *args, QmpSession *s, LamError **errp)
{
    if (qmp_session_negotiated(s)) {
        lam_error_set(errp, LAM_ERR_COMMAND_NOT_FOUND,
                      "Capabilities negotiation is already complete, command ignored");
        return NULL;
    }
    json_t *en = json_object_get(args, "enable");
    bool oob = false;
    for (size_t i = 0; i < json_array_size(en); i++) {
        oob |= !strcmp(json_string_value(json_array_get(en, i)), "oob");
    }
    qmp_session_set_negotiated(s, oob);
    return NULL;
}

static json_t *cmd_query_version(json_t *args, QmpSession *s, LamError **errp)
{
    return qmp_version_info();
}

static void add_name(const QmpCommandDef *d, void *opaque)
{
    json_array_append_new(opaque, json_pack("{s:s}", "name", d->name));
}

static json_t *cmd_query_commands(json_t *args, QmpSession *s, LamError **errp)
{
    json_t *list = json_array();
    qmp_foreach_command(add_name, list);
    return list;
}

static json_t *cmd_quit(json_t *args, QmpSession *s, LamError **errp)
{
    qmp_request_quit();
    return NULL;
}

static const char *const capability_values[] = {"oob", NULL};
static const QmpType capability_type = {QMP_T_ENUM, "QMPCapability", .values = capability_values};
static const QmpType capability_list = {QMP_T_LIST, "array", .elem = &capability_type};
static const QmpMember capabilities_members[] = {
    {"enable", &capability_list, true},
    {NULL},
};
static const QmpType capabilities_args = {QMP_T_OBJECT, "object", capabilities_members};

static const QmpCommandDef control_cmds[] = {
    {"qmp_capabilities", &capabilities_args, cmd_qmp_capabilities, QMP_CMD_PRE_NEGOTIATION},
    {"query-version", NULL, cmd_query_version},
    {"query-commands", NULL, cmd_query_commands},
    {"quit", NULL, cmd_quit},
    {NULL},
};

void qmp_control_init(void)
{
    qmp_register(control_cmds);
}
