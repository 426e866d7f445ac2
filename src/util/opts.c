/* Reading blockdev-add style JSON options with QEMU's type-error wording. */
#include <stdlib.h>
#include <string.h>

#include "lamina/driver.h"

const char *lam_opt_str(json_t *opts, const char *key, const char *def)
{
    json_t *v = opts ? json_object_get(opts, key) : NULL;
    return json_is_string(v) ? json_string_value(v) : def;
}

int64_t lam_opt_int(json_t *opts, const char *key, int64_t def, LamError **errp)
{
    json_t *v = opts ? json_object_get(opts, key) : NULL;
    if (!v) {
        return def;
    }
    if (json_is_integer(v)) {
        return json_integer_value(v);
    }
    /* Command-line style options arrive as strings ("65536", "64k"). */
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        char *end;
        long long n = strtoll(s, &end, 0);
        if (end != s) {
            switch (*end) {
            case 'k': case 'K': n <<= 10; end++; break;
            case 'M': case 'm': n <<= 20; end++; break;
            case 'G': case 'g': n <<= 30; end++; break;
            case 'T': case 't': n <<= 40; end++; break;
            default: break;
            }
            if (*end == '\0') {
                return n;
            }
        }
    }
    lam_error_setg(errp, "Invalid parameter type for '%s', expected: integer", key);
    return def;
}

bool lam_opt_bool(json_t *opts, const char *key, bool def, LamError **errp)
{
    json_t *v = opts ? json_object_get(opts, key) : NULL;
    if (!v) {
        return def;
    }
    if (json_is_boolean(v)) {
        return json_is_true(v);
    }
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        if (!strcmp(s, "on") || !strcmp(s, "true")) {
            return true;
        }
        if (!strcmp(s, "off") || !strcmp(s, "false")) {
            return false;
        }
    }
    lam_error_setg(errp, "Invalid parameter type for '%s', expected: boolean", key);
    return def;
}
