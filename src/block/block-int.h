/* Internal interfaces between the files of src/block. */
#ifndef LAMINA_BLOCK_INT_H
#define LAMINA_BLOCK_INT_H

#include "lamina/driver.h"

const LamDriver *lam_driver_nth(int i);

/* drain.c: every request entering through a root edge is counted so that
 * lam_drain_begin() can wait for the graph to go quiet. */
void lam_root_req_enter(void);
void lam_root_req_leave(void);

/* perm.c */
const char *lam_perm_names(uint64_t perm, char *buf, size_t len);
/* Checks that an edge with (perm, shared) can coexist with every other
 * parent edge of node (skipping `self`).  role/user describe the edge for
 * the message. */
int lam_perm_check(LamNode *node, LamChild *self, uint64_t perm,
                   uint64_t shared, const char *role, const char *user,
                   LamError **errp);
void lam_default_child_perm(LamNode *parent, const char *role,
                            uint64_t *perm, uint64_t *shared);
/* "node 'x'" or the root's user string. */
void lam_child_user(const LamChild *c, char *buf, size_t len);

/* io.c: node-level entry points without permission checks. */
int lam_node_flush(LamNode *bs);

/* node.c */
LamNode *lam_node_open_internal(json_t *opts, int flags, bool backing,
                                LamError **errp);
LamNode *lam_open_backing_file(LamNode *overlay, LamError **errp);

#endif
