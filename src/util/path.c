/* Path helpers for backing-file names. */
#include <stdlib.h>
#include <string.h>

#include "lamina/block.h"

static bool is_protocol_name(const char *name)
{
    /* "nbd://host/x", "nbd+unix:///x?socket=..": a protocol prefix before
     * any slash means the name is not a host path. */
    const char *colon = strchr(name, ':');
    const char *slash = strchr(name, '/');
    return colon && (!slash || colon < slash);
}

char *lam_path_combine(const char *base_image, const char *name)
{
    if (name[0] == '/' || is_protocol_name(name) || !base_image) {
        return strdup(name);
    }
    const char *slash = strrchr(base_image, '/');
    if (!slash) {
        return strdup(name);
    }
    size_t dirlen = (size_t)(slash - base_image) + 1;
    char *out = malloc(dirlen + strlen(name) + 1);
    if (!out) {
        abort();
    }
    memcpy(out, base_image, dirlen);
    strcpy(out + dirlen, name);
    return out;
}
