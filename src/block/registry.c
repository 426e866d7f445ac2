/* Driver registry: the built-in drivers plus run-time registrations. */
#include <string.h>

#include "lamina/driver.h"

extern const LamDriver lam_drv_file;
extern const LamDriver lam_drv_raw;
extern const LamDriver lam_drv_null_co;
/* Drivers of other layers are linked whole into liblamina (link_whole),
 * so weak references resolve when the driver exists and stay NULL in
 * builds that don't have it yet. */
extern const LamDriver lam_drv_qcow2 __attribute__((weak));

#define MAX_DRIVERS 64

/* Written only before nodes are opened (single-threaded set-up). */
static const LamDriver *registered[MAX_DRIVERS];
static int nregistered;

static const LamDriver *builtin(int i)
{
    switch (i) {
    case 0: return &lam_drv_file;
    case 1: return &lam_drv_raw;
    case 2: return &lam_drv_null_co;
    case 3: return &lam_drv_qcow2;
    default: return NULL;
    }
}
#define NBUILTIN 4

void lam_driver_register(const LamDriver *drv)
{
    if (nregistered < MAX_DRIVERS && !lam_driver_find(drv->name)) {
        registered[nregistered++] = drv;
    }
}

const LamDriver *lam_driver_nth(int i)
{
    for (int b = 0; b < NBUILTIN; b++) {
        const LamDriver *d = builtin(b);
        if (d && i-- == 0) {
            return d;
        }
    }
    return i < nregistered ? registered[i] : NULL;
}

const LamDriver *lam_driver_find(const char *name)
{
    const LamDriver *d;
    for (int i = 0; (d = lam_driver_nth(i)); i++) {
        if (!strcmp(d->name, name)) {
            return d;
        }
    }
    return NULL;
}
