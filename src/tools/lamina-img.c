/* lamina-img: qemu-img compatible image tool.  This file only dispatches
 * to the subcommands (img-*.c). */
#include <stdio.h>
#include <string.h>

#include "lamina-config.h"
#include "lamina/error.h"
#include "tools/img-common.h"

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *usage;
} cmds[] = {
    {"check", img_check, "check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-U] filename"},
    {"commit", img_commit, "commit [-q] [-f fmt] [-b base] [-d] [-p] filename"},
    {"compare", img_compare, "compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2"},
    {"convert", img_convert, "convert [-U] [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] [-m num_coroutines] [-W] [-t cache] filename [filename2 [...]] output_filename"},
    {"create", img_create, "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]"},
    {"dd", img_dd, "dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output"},
    {"info", img_info, "info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename"},
    {"map", img_map, "map [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename"},
    {"measure", img_measure, "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] filename]"},
    {"rebase", img_rebase, "rebase [-U] [-q] [-f fmt] [-p] [-u] -b backing_file [-F backing_fmt] filename"},
    {"resize", img_resize, "resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size"},
};

static void help(void)
{
    printf("lamina-img version " LAMINA_VERSION "\n"
           "usage: lamina-img [standard options] command [command options]\n"
           "Lamina disk image utility (qemu-img compatible)\n\n"
           "    '-h', '--help'       display this help and exit\n"
           "    '-V', '--version'    output version information and exit\n\n"
           "Command syntax:\n");
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        printf("  %s\n", cmds[i].usage);
    }
    printf("\nSupported formats: raw qcow2\n");
}

int main(int argc, char **argv)
{
    lam_progname = "lamina-img";
    if (argc < 2) {
        img_error("Not enough arguments");
        img_help_hint();
        return 1;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help")) {
        help();
        return 0;
    }
    if (!strcmp(cmd, "-V") || !strcmp(cmd, "--version")) {
        printf("lamina-img version " LAMINA_VERSION "\n");
        return 0;
    }
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (!strcmp(cmd, cmds[i].name)) {
            /* getopt names argv[0] in its messages: make that the tool. */
            static char progname[] = "lamina-img";
            argv[1] = progname;
            int ret = cmds[i].fn(argc - 1, argv + 1);
            fflush(stdout);
            return ret;
        }
    }
    img_error("Command not found: %s", cmd);
    img_help_hint();
    return 1;
}
