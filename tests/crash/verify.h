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

/* Repairs a crashed image before it is judged (lazy refcounts leave it
 * dirty): ours opens it read-write (the driver repairs a dirty image on
 * open), qemu runs `qemu-img check -r all`.  0 / -errno (*err set). */
int repair_ours(const char *path, const char *fmt, char **err);
int repair_qemu(const char *path, const char *fmt, char **err);

/* Continuing after a crash: opens the image read-write with our driver,
 * writes nw ranges (recorded in offs/lens/datas, malloc'ed data), flushes
 * and closes.  Catches drivers that corrupt images when they reuse one that
 * a crash left with leaks or a torn tail.  0 / -errno (*err set). */
#define REUSE_WRITES 4
typedef struct ReuseWrites {
    int n;
    int64_t off[REUSE_WRITES], len[REUSE_WRITES];
    uint8_t *data[REUSE_WRITES];
} ReuseWrites;
int reuse_image(const char *path, const char *fmt, int64_t size,
                int64_t cluster, uint64_t seed, ReuseWrites *rw, char **err);
void reuse_writes_free(ReuseWrites *rw);
