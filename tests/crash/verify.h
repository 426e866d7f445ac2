/* Judging one crash image: our check (in-process, through the core),
 * `qemu-img check` (subprocess), and reading the guest content back
 * through our driver or through `qemu-img convert`. */
#ifndef LAMINA_CRASH_VERIFY_H
#define LAMINA_CRASH_VERIFY_H

#include <stdbool.h>
#include <stdint.h>

typedef struct CheckCounts {
    bool supported;     /* false: format has no check (raw) */
    bool open_failed;   /* the image could not even be opened */
    int corruptions, leaks, errors;
    char *msg;          /* first lines of findings / error (malloc) */
} CheckCounts;

int write_file(const char *path, const uint8_t *buf, int64_t len);
int read_whole_file(const char *path, uint8_t **buf, int64_t *len);

/* Runs a command, returns its exit status (or -errno); stdout (if out) and
 * stderr (merged into out) are captured, truncated at 64 KiB. */
int run_cmd(char *const argv[], char **out);

/* `fmt` is "qcow2" or "raw". */
void check_ours(const char *path, const char *fmt, CheckCounts *cc);
void check_qemu(const char *path, const char *fmt, CheckCounts *cc);

/* Reads the whole guest disk (size bytes) of the image. 0 / -errno. */
int read_guest_ours(const char *path, const char *fmt, uint8_t *out,
                    int64_t size, char **err);
int read_guest_qemu(const char *path, const char *fmt, const char *tmp_raw,
                    uint8_t *out, int64_t size, char **err);

#endif
