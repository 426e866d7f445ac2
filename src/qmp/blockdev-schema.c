/* BlockdevOptions for the drivers we have, with QEMU 7.2's member names,
 * order and types (order matters: it decides which error comes first). */
#include <stdlib.h>
#include <string.h>

#include "qmp/blockdev-schema.h"

#define MAX_DRIVERS 48

/* Filled at startup on the control thread, read-only afterwards. */
static const char *driver_names[MAX_DRIVERS + 1];
static QmpVariant driver_variants[MAX_DRIVERS + 1];
static int ndrivers;

static const QmpType driver_enum = {QMP_T_ENUM, "BlockdevDriver", .values = driver_names};

static const char *const discard_values[] = {"ignore", "unmap", NULL};
static const QmpType discard_enum = {QMP_T_ENUM, "BlockdevDiscardOptions", .values = discard_values};
static const char *const detect_zeroes_values[] = {"off", "on", "unmap", NULL};
static const QmpType detect_zeroes_enum = {QMP_T_ENUM, "BlockdevDetectZeroesOptions",
                                           .values = detect_zeroes_values};
static const QmpMember cache_members[] = {
    {"direct", &qmp_t_bool, true, "false"},
    {"no-flush", &qmp_t_bool, true, "false"},
    {NULL},
};
static const QmpType cache_type = {QMP_T_OBJECT, "BlockdevCacheOptions", cache_members};

static const QmpMember base_members[] = {
    {"driver", &driver_enum},
    {"node-name", &qmp_t_str, true},
    {"discard", &discard_enum, true, "\"ignore\""},
    {"cache", &cache_type, true},
    {"read-only", &qmp_t_bool, true, "false"},
    {"auto-read-only", &qmp_t_bool, true, "false"},
    {"force-share", &qmp_t_bool, true},
    {"detect-zeroes", &detect_zeroes_enum, true, "\"off\""},
    {NULL},
};

const QmpType qmp_blockdev_options = {
    QMP_T_OBJECT, "BlockdevOptions", base_members,
    .discriminator = "driver", .variants = driver_variants,
};

static const QmpType *const ref_alts[] = {&qmp_blockdev_options, &qmp_t_str, NULL};
const QmpType qmp_blockdev_ref = {QMP_T_ALTERNATE, "BlockdevRef", .alts = ref_alts};
static const QmpType *const ref_or_null_alts[] = {&qmp_blockdev_options, &qmp_t_str,
                                                  &qmp_t_null, NULL};
const QmpType qmp_blockdev_ref_or_null = {QMP_T_ALTERNATE, "BlockdevRefOrNull",
                                          .alts = ref_or_null_alts};

void qmp_blockdev_register_driver(const char *name, const QmpMember *members)
{
    for (int i = 0; i < ndrivers; i++) {
        if (!strcmp(driver_names[i], name)) {
            driver_variants[i].members = members;
            return;
        }
    }
    if (ndrivers == MAX_DRIVERS) {
        abort(); /* a programming error: raise MAX_DRIVERS */
    }
    driver_names[ndrivers] = name;
    driver_variants[ndrivers] = (QmpVariant){name, members};
    ndrivers++;
}

/* ---- file ---- */
static const char *const on_off_auto_values[] = {"auto", "on", "off", NULL};
static const QmpType on_off_auto = {QMP_T_ENUM, "OnOffAuto", .values = on_off_auto_values};
static const char *const aio_values[] = {"threads", "native", "io_uring", NULL};
static const QmpType aio_enum = {QMP_T_ENUM, "BlockdevAioOptions", .values = aio_values};
static const QmpMember file_members[] = {
    {"filename", &qmp_t_str},
    {"pr-manager", &qmp_t_str, true},
    {"locking", &on_off_auto, true},
    {"aio", &aio_enum, true},
    {"aio-max-batch", &qmp_t_int, true},
    {"drop-cache", &qmp_t_bool, true},
    {"x-check-cache-dropped", &qmp_t_bool, true},
    {NULL},
};

/* ---- raw ---- */
static const QmpMember raw_members[] = {
    {"file", &qmp_blockdev_ref},
    {"offset", &qmp_t_size, true},
    {"size", &qmp_t_size, true},
    {NULL},
};

/* ---- qcow2 ---- */
static const char *const overlap_mode_values[] = {"none", "constant", "cached", "all", NULL};
static const QmpType overlap_mode = {QMP_T_ENUM, "Qcow2OverlapCheckMode",
                                     .values = overlap_mode_values};
static const QmpMember overlap_flags_members[] = {
    {"template", &overlap_mode, true},
    {"main-header", &qmp_t_bool, true},
    {"active-l1", &qmp_t_bool, true},
    {"active-l2", &qmp_t_bool, true},
    {"refcount-table", &qmp_t_bool, true},
    {"refcount-block", &qmp_t_bool, true},
    {"snapshot-table", &qmp_t_bool, true},
    {"inactive-l1", &qmp_t_bool, true},
    {"inactive-l2", &qmp_t_bool, true},
    {"bitmap-directory", &qmp_t_bool, true},
    {NULL},
};
static const QmpType overlap_flags = {QMP_T_OBJECT, "Qcow2OverlapCheckFlags", overlap_flags_members};
static const QmpType *const overlap_alts[] = {&overlap_flags, &overlap_mode, NULL};
static const QmpType overlap_checks = {QMP_T_ALTERNATE, "Qcow2OverlapChecks", .alts = overlap_alts};

static const char *const qcow2_enc_values[] = {"aes", "luks", NULL};
static const QmpType qcow2_enc_enum = {QMP_T_ENUM, "BlockdevQcow2EncryptionFormat",
                                       .values = qcow2_enc_values};
static const QmpMember qcow2_enc_base[] = {{"format", &qcow2_enc_enum}, {NULL}};
static const QmpMember qcow2_enc_aes[] = {{"key-secret", &qmp_t_str, true}, {NULL}};
static const QmpMember qcow2_enc_luks[] = {{"key-secret", &qmp_t_str}, {NULL}};
static const QmpVariant qcow2_enc_variants[] = {
    {"aes", qcow2_enc_aes}, {"luks", qcow2_enc_luks}, {NULL},
};
static const QmpType qcow2_encrypt = {QMP_T_OBJECT, "BlockdevQcow2Encryption", qcow2_enc_base,
                                      .discriminator = "format", .variants = qcow2_enc_variants};

static const QmpMember qcow2_members[] = {
    {"file", &qmp_blockdev_ref},
    {"backing", &qmp_blockdev_ref_or_null, true},
    {"lazy-refcounts", &qmp_t_bool, true},
    {"pass-discard-request", &qmp_t_bool, true},
    {"pass-discard-snapshot", &qmp_t_bool, true},
    {"pass-discard-other", &qmp_t_bool, true},
    {"overlap-check", &overlap_checks, true},
    {"cache-size", &qmp_t_int, true},
    {"l2-cache-size", &qmp_t_int, true},
    {"l2-cache-entry-size", &qmp_t_int, true},
    {"refcount-cache-size", &qmp_t_int, true},
    {"cache-clean-interval", &qmp_t_int, true},
    {"encrypt", &qcow2_encrypt, true},
    {"data-file", &qmp_blockdev_ref, true},
    {NULL},
};

/* ---- null-co ---- */
static const QmpMember null_members[] = {
    {"size", &qmp_t_int, true},
    {"latency-ns", &qmp_t_int, true},
    {"read-zeroes", &qmp_t_bool, true},
    {NULL},
};

void qmp_blockdev_schema_init(void);
void qmp_blockdev_schema_init(void)
{
    qmp_blockdev_register_driver("file", file_members);
    qmp_blockdev_register_driver("null-co", null_members);
    qmp_blockdev_register_driver("qcow2", qcow2_members);
    qmp_blockdev_register_driver("raw", raw_members);
}
