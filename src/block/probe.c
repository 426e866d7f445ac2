/* Format probing: highest score over the first bytes of an image wins;
 * raw (score 1) only when nothing else claims it.  Callers that open a
 * probed raw image writable must restrict sector-0 writes (see raw.c). */
#include "lamina/driver.h"

const LamDriver *lam_driver_nth(int i);

const char *lam_probe_format(const uint8_t *buf, int len, const char *filename)
{
    const LamDriver *d, *best = NULL;
    int best_score = 0;
    for (int i = 0; (d = lam_driver_nth(i)); i++) {
        if (d->probe && d->kind == LAM_DRV_FORMAT) {
            int score = d->probe(buf, len, filename);
            if (score > best_score) {
                best_score = score;
                best = d;
            }
        }
    }
    return best ? best->name : "raw";
}
