/* Permission rules on edges (QEMU's model: each edge takes some
 * permissions and shares some; two edges conflict when one takes what the
 * other does not share).  Jobs and filters will refine child_perm. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "block/block-int.h"

static const char *const perm_name[] = {
    "consistent read", "write", "write unchanged", "resize",
};

const char *lam_perm_names(uint64_t perm, char *buf, size_t len)
{
    buf[0] = '\0';
    for (int i = 0; i < 4; i++) {
        if (perm & (1u << i)) {
            size_t used = strlen(buf);
            snprintf(buf + used, len - used, "%s%s", used ? ", " : "", perm_name[i]);
        }
    }
    return buf;
}

void lam_child_user(const LamChild *c, char *buf, size_t len)
{
    if (c->parent) {
        snprintf(buf, len, "node '%s'", lam_node_name(c->parent));
    } else {
        snprintf(buf, len, "%s", c->user ? c->user : "an unnamed block device");
    }
}

int lam_perm_check(LamNode *node, LamChild *self, uint64_t perm,
                   uint64_t shared, const char *role, const char *user,
                   LamError **errp)
{
    for (LamChild *o = node->parents; o; o = o->next_parent) {
        if (o == self) {
            continue;
        }
        char ouser[256], pbuf[96];
        uint64_t bad = perm & ~o->shared;
        if (bad) {
            lam_child_user(o, ouser, sizeof(ouser));
            lam_error_setg(errp, "Permission conflict on node '%s': permissions "
                           "'%s' are both required by %s (uses node '%s' as "
                           "'%s' child) and unshared by %s (uses node '%s' as "
                           "'%s' child).", lam_node_name(node),
                           lam_perm_names(bad, pbuf, sizeof(pbuf)), user,
                           lam_node_name(node), role, ouser, lam_node_name(node),
                           o->name);
            return -EPERM;
        }
        bad = o->perm & ~shared;
        if (bad) {
            lam_child_user(o, ouser, sizeof(ouser));
            lam_error_setg(errp, "Permission conflict on node '%s': permissions "
                           "'%s' are both required by %s (uses node '%s' as "
                           "'%s' child) and unshared by %s (uses node '%s' as "
                           "'%s' child).", lam_node_name(node),
                           lam_perm_names(bad, pbuf, sizeof(pbuf)), ouser,
                           lam_node_name(node), o->name, user, lam_node_name(node),
                           role);
            return -EPERM;
        }
    }
    return 0;
}

void lam_default_child_perm(LamNode *parent, const char *role,
                            uint64_t *perm, uint64_t *shared)
{
    bool rw = !parent->read_only;
    if (!strcmp(role, "backing")) {
        /* A backing file is only read.  QEMU lets others write and resize
         * it as long as the overlay's own users tolerate changing data
         * (they share write) -- always true in a storage daemon, whose
         * users are exports and jobs; a fleecing overlay is opened on a
         * disk that an export is writing.  Without permission propagation
         * we take that answer statically. */
        *perm = LAM_PERM_CONSISTENT_READ;
        *shared = LAM_PERM_ALL;
        if (parent->open_flags & LAM_O_FORCE_SHARE) {
            *shared = LAM_PERM_ALL;
        }
        return;
    }
    if (parent->drv->kind == LAM_DRV_FILTER) {
        /* Filters pass their parents' needs through and share all. */
        *perm = LAM_PERM_CONSISTENT_READ | (rw ? LAM_PERM_WRITE : 0);
        *shared = LAM_PERM_ALL;
        return;
    }
    /* Storage child of a format node: the format owns the bytes. */
    *perm = LAM_PERM_CONSISTENT_READ;
    if (rw) {
        *perm |= LAM_PERM_WRITE | LAM_PERM_RESIZE;
    }
    *shared = LAM_PERM_CONSISTENT_READ | LAM_PERM_WRITE_UNCHANGED;
    if (parent->open_flags & LAM_O_FORCE_SHARE) {
        *shared = LAM_PERM_ALL;
    } else if (!rw) {
        /* A read-only format node tolerates others writing its file only
         * if asked to (force-share); otherwise it needs stable content. */
        *shared |= LAM_PERM_RESIZE;
    }
}
