/* lamina-img map: the allocation map through the backing chain, with
 * adjacent equal extents merged the way qemu-img merges them. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/img-common.h"

typedef struct MapEntry {
    int64_t start, length, offset;
    int depth;
    bool present, zero, data, has_offset;
    const char *file; /* borrowed: node filename */
} MapEntry;

static bool mergeable(const MapEntry *a, const MapEntry *b)
{
    if (a->start + a->length != b->start || a->depth != b->depth ||
        a->present != b->present || a->zero != b->zero || a->data != b->data ||
        a->has_offset != b->has_offset) {
        return false;
    }
    if (a->has_offset && a->offset + a->length != b->offset) {
        return false;
    }
    if ((a->file == NULL) != (b->file == NULL) ||
        (a->file && strcmp(a->file, b->file))) {
        return false;
    }
    return true;
}

/* Returns 0, or -1 after reporting an entry human output can't show. */
static int dump_entry(const MapEntry *e, bool json, bool first)
{
    if (json) {
        printf("%s{ \"start\": %lld, \"length\": %lld, \"depth\": %d, "
               "\"present\": %s, \"zero\": %s, \"data\": %s",
               first ? "[" : ",\n", (long long)e->start, (long long)e->length,
               e->depth, e->present ? "true" : "false",
               e->zero ? "true" : "false", e->data ? "true" : "false");
        if (e->has_offset) {
            printf(", \"offset\": %lld", (long long)e->offset);
        }
        printf("}");
        return 0;
    }
    if (e->data && !e->has_offset) {
        img_error("File contains external, encrypted or compressed clusters.");
        return -1;
    }
    if (e->data && e->has_offset) {
        printf("%#-16llx%#-16llx%#-16llx%s\n", (unsigned long long)e->start,
               (unsigned long long)e->length, (unsigned long long)e->offset,
               e->file ? e->file : "");
    }
    return 0;
}

int img_map(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, 'h'},
        {"output", required_argument, NULL, 'O'},
        {"start-offset", required_argument, NULL, 's'},
        {"max-length", required_argument, NULL, 'l'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    bool share = false;
    int json = 0, c, ret = 0;
    int64_t start = 0, max_len = -1;

    optind = 1;
    while ((c = getopt_long(argc, argv, "f:hU", longopts, NULL)) != -1) {
        switch (c) {
        case 'f': fmt = optarg; break;
        case 'U': share = true; break;
        case 's':
            if (img_parse_size(optarg, &start) < 0) {
                img_error("Invalid start offset specified! You may use k, M, "
                          "G, T, P or E suffixes for");
                return 1;
            }
            break;
        case 'l':
            if (img_parse_size(optarg, &max_len) < 0) {
                img_error("Invalid length specified! You may use k, M, G, T, "
                          "P or E suffixes for");
                return 1;
            }
            break;
        case 'O':
            json = img_parse_output(optarg);
            if (json < 0) {
                return 1;
            }
            break;
        case 'h':
            printf("usage: lamina-img map [-f fmt] [--start-offset=offset] "
                   "[--max-length=len] [--output=ofmt] [-U] filename\n");
            return 0;
        default:
            img_help_hint();
            return 1;
        }
    }
    if (optind != argc - 1) {
        img_error("Expecting one image file name");
        img_help_hint();
        return 1;
    }
    ImgImage im;
    if (img_open(&im, argv[optind], fmt, share ? IMG_OPEN_SHARE : 0, NULL,
                 NULL) < 0) {
        return 1;
    }
    int64_t len = lam_node_length(im.node);
    if (len < 0) {
        img_error("Could not get the size of '%s': %s", argv[optind], strerror((int)-len));
        img_close(&im);
        return 1;
    }
    int64_t end = len;
    if (max_len >= 0 && start + max_len < end) {
        end = start + max_len;
    }
    int chain = img_chain_length(im.node);

    if (!json) {
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    }
    MapEntry cur = {0};
    bool have = false, first = true;
    for (int64_t off = start; off < end;) {
        int64_t pnum = 0, map = 0;
        LamNode *file = NULL;
        int depth = 0;
        int64_t want = end - off;
        if (want > (1LL << 30)) {
            want = 1LL << 30;
        }
        int st = lam_co_block_status_above(im.root, NULL, off, want, &pnum,
                                           &map, &file, &depth);
        if (st < 0) {
            img_error("Could not read file metadata: %s", strerror(-st));
            ret = 1;
            break;
        }
        if (pnum <= 0) {
            break;
        }
        if (pnum > want) {
            pnum = want;
        }
        int qdepth = depth > 0 ? depth - 1 : chain;
        bool past_eof = false;
        /* qemu stops descending at a layer whose backing file ends before
         * the offset (the rest reads as zeroes from that layer) and splits
         * extents at backing-file ends; mirror that so depths agree. */
        LamNode *n = im.node;
        for (int i = 0; n && i < qdepth; i++) {
            LamNode *b = lam_node_backing_node(n);
            int64_t bl = b ? lam_node_length(b) : 0;
            if (!b || off >= bl) {
                qdepth = i;
                past_eof = true;
                break;
            }
            if (off + pnum > bl) {
                pnum = bl - off;
            }
            n = b;
        }
        if (past_eof) {
            depth = 0;
            st = LAM_BS_ZERO;
        }
        MapEntry e = {
            .start = off,
            .length = pnum,
            .depth = qdepth,
            .present = depth > 0,
            .zero = (st & LAM_BS_ZERO) || depth == 0,
            .data = (st & LAM_BS_DATA) && depth > 0,
            .has_offset = (st & LAM_BS_OFFSET_VALID) && depth > 0,
            .offset = map,
            .file = (st & LAM_BS_OFFSET_VALID) && file ? lam_node_filename(file) : NULL,
        };
        if (!e.has_offset) {
            e.offset = 0;
            e.file = NULL;
        }
        if (have && mergeable(&cur, &e)) {
            cur.length += e.length;
        } else {
            if (have) {
                if (dump_entry(&cur, json, first) < 0) {
                    ret = 1;
                    have = false;
                    break;
                }
                first = false;
            }
            cur = e;
            have = true;
        }
        off += pnum;
    }
    if (have && ret == 0) {
        if (dump_entry(&cur, json, first) < 0) {
            ret = 1;
        }
        first = false;
    }
    if (json) {
        printf(first ? "[]\n" : "]\n");
    }
    img_close(&im);
    return ret;
}
