#!/usr/bin/python3
"""Generates malformed qcow2 images by patching bytes of valid images that
qemu-img writes.  Each case: (name, path, tool-flags, ops, expected message
substring).  Used by tests/integration/test_qcow2_malformed.py; run alone
(`gen_qcow2.py DIR`) to leave the images in DIR for fuzzing by hand."""
import os
import struct
import subprocess
import sys

MiB = 1 << 20


def sh(*args):
    subprocess.run(args, check=True, capture_output=True, timeout=120)


def base_image(d):
    """16 MiB image, 64 KiB clusters: a compressed cluster at 0, normal
    data at 1 MiB, a zero cluster at 2 MiB."""
    raw = os.path.join(d, "src.raw")
    with open(raw, "wb") as f:
        f.write(b"compressible" * 6000)
        f.truncate(16 * MiB)
    img = os.path.join(d, "base.qcow2")
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", "-c", "write -z 2M 64k", img)
    return img


def header(path):
    with open(path, "rb") as f:
        return f.read(112)


def patch(src, dst, off, fmt, value):
    with open(src, "rb") as f:
        data = bytearray(f.read())
    struct.pack_into(fmt, data, off, value)
    with open(dst, "wb") as f:
        f.write(data)


def l2_entry_offset(path, guest_cluster):
    h = header(path)
    l1_off = struct.unpack_from(">Q", h, 40)[0]
    with open(path, "rb") as f:
        f.seek(l1_off)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    return l2 + 8 * guest_cluster


def make_all(d):
    b = base_image(d)
    flen = os.path.getsize(b)
    cases = []

    def hp(name, off, fmt, val, msg, flags=("-r",), ops=("read:0:4096:0x63",)):
        p = os.path.join(d, name + ".qcow2")
        patch(b, p, off, fmt, val)
        cases.append((name, p, list(flags), list(ops), msg))

    hp("bad-magic", 0, ">I", 0x12345678, "Image is not in qcow2 format")
    hp("version-1", 4, ">I", 1, "Unsupported qcow2 version 1")
    hp("version-4", 4, ">I", 4, "Unsupported qcow2 version 4")
    hp("cluster-bits-8", 20, ">I", 8, "Unsupported cluster size: 2^8")
    hp("cluster-bits-22", 20, ">I", 22, "Unsupported cluster size: 2^22")
    hp("cluster-bits-huge", 20, ">I", 0xffffffff, "Unsupported cluster size")
    hp("size-huge", 24, ">Q", 1 << 62, "Image size too large")
    hp("l1-too-small", 24, ">Q", 1 << 50, "L1 table is too small")
    hp("crypt-aes", 32, ">I", 1, "Encrypted images are not supported")
    hp("l1-size-huge", 36, ">I", 0x7fffffff, "Active L1 table too large")
    hp("l1-size-beyond-eof", 36, ">I", 4000000, "L1 table offset beyond end of file")
    hp("l1-offset-unaligned", 40, ">Q", 0x30001, "L1 table offset invalid")
    hp("l1-offset-beyond-eof", 40, ">Q", 1 << 40, "L1 table offset beyond end of file")
    hp("rt-offset-unaligned", 48, ">Q", 0x10008, "Refcount table offset invalid")
    hp("rt-beyond-eof", 48, ">Q", 1 << 40, "Refcount table beyond end of file")
    hp("rt-clusters-huge", 56, ">I", 0x10000000, "Reference count table too large")
    hp("rt-clusters-beyond-eof", 56, ">I", 100, "Refcount table beyond end of file")
    hp("nb-snapshots-huge", 60, ">I", 0xffffffff, "Too many snapshots")
    hp("snapshot-table-beyond-eof", 60, ">I", 1, "Snapshot table offset invalid")
    hp("unknown-incompat-bit", 72, ">Q", 1 << 40,
       "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000")
    hp("external-data-file", 72, ">Q", 1 << 2, "External data files are not supported")
    hp("extended-l2", 72, ">Q", 1 << 4, "Extended L2 entries are not supported")
    hp("compression-bit-type-zero", 72, ">Q", 1 << 3, "Invalid compression type")
    hp("compression-type-no-bit", 104, ">B", 1, "Invalid compression type")
    hp("refcount-order-7", 96, ">I", 7, "Reference count entry width too large")
    hp("header-length-small", 100, ">I", 80, "header too short")
    hp("header-length-unaligned", 100, ">I", 107, "not a multiple of 8")
    hp("header-length-huge", 100, ">I", 0x7ffffff8, "exceeds cluster size")
    hp("corrupt-bit-rw", 72, ">Q", 1 << 1,
       "qcow2: Image is corrupt; cannot be opened read/write", flags=())

    # backing name: huge length, offset beyond the first cluster
    p = os.path.join(d, "backing-name-huge.qcow2")
    patch(b, p, 8, ">Q", 1024)
    patch(p, p, 16, ">I", 0x7fffffff)
    cases.append(("backing-name-huge", p, ["-r"], ["info"], "Backing file name too long"))
    p = os.path.join(d, "backing-offset-beyond-cluster.qcow2")
    patch(b, p, 8, ">Q", 1 << 20)
    patch(p, p, 16, ">I", 10)
    cases.append(("backing-offset-beyond-cluster", p, ["-r"], ["info"],
                  "Invalid backing file offset"))

    # header extension whose length runs past the first cluster
    hl = struct.unpack_from(">I", header(b), 100)[0]
    p = os.path.join(d, "extension-too-long.qcow2")
    patch(b, p, hl, ">I", 0x12345678)
    patch(p, p, hl + 4, ">I", 0x100000)
    cases.append(("extension-too-long", p, ["-r"], ["info"],
                  "Invalid header extension length"))

    # truncated file: just the header
    p = os.path.join(d, "truncated.qcow2")
    with open(b, "rb") as f:
        data = f.read(60)
    with open(p, "wb") as f:
        f.write(data)
    cases.append(("truncated", p, ["-r"], ["info"], "Image is not in qcow2 format"))

    # runtime corruption: L2 entries beyond EOF / out of bounds
    e1 = l2_entry_offset(b, 16)   # normal cluster at 1 MiB
    p = os.path.join(d, "l2-entry-beyond-eof.qcow2")
    patch(b, p, e1, ">Q", (1 << 63) | (1 << 45))
    cases.append(("l2-entry-beyond-eof", p, [], ["read:1M:4096:0x5a"],
                  "Input/output error"))
    p = os.path.join(d, "l2-entry-unaligned.qcow2")
    patch(b, p, e1, ">Q", (1 << 63) | 0x10200)
    cases.append(("l2-entry-unaligned", p, ["-r"], ["read:1M:4096:0x5a"],
                  "Input/output error"))
    e0 = l2_entry_offset(b, 0)   # compressed cluster at 0
    p = os.path.join(d, "compressed-out-of-bounds.qcow2")
    patch(b, p, e0, ">Q", (1 << 62) | (1 << 40))
    cases.append(("compressed-out-of-bounds", p, ["-r"], ["read:0:4096:0x63"],
                  "Input/output error"))
    p = os.path.join(d, "compressed-garbage.qcow2")
    with open(b, "rb") as f:
        ent = struct.unpack(">Q", (f.seek(e0), f.read(8))[1])[0]
    patch(b, p, e0, ">Q", (ent & ~((1 << 54) - 1)) | 0x200)  # points into the header
    cases.append(("compressed-garbage", p, ["-r"], ["read:0:4096:0x63"],
                  "Input/output error"))
    h = header(b)
    l1_off = struct.unpack_from(">Q", h, 40)[0]
    p = os.path.join(d, "l1-entry-unaligned.qcow2")
    with open(b, "rb") as f:
        f.seek(l1_off)
        l1e = struct.unpack(">Q", f.read(8))[0]
    patch(b, p, l1_off, ">Q", l1e + 0x200)
    cases.append(("l1-entry-unaligned", p, ["-r"], ["read:0:4096:0x63"],
                  "Input/output error"))
    p = os.path.join(d, "l2-entry-into-l1.qcow2")
    patch(b, p, e1, ">Q", (1 << 63) | l1_off)
    cases.append(("l2-entry-into-l1", p, [], ["write:1M:512:1"],
                  "Preventing invalid write on metadata (overlaps with active L1 table)"))
    p = os.path.join(d, "l2-entry-into-header.qcow2")
    patch(b, p, e1, ">Q", (1 << 63) | 0)
    patch(p, p, e1, ">Q", (1 << 63) | 0x200)   # header cluster, unaligned: caught on read too
    cases.append(("l2-entry-into-header", p, [], ["write:1M:512:1"], "Input/output error"))
    rt_off = struct.unpack_from(">Q", h, 48)[0]
    p = os.path.join(d, "refblock-beyond-eof.qcow2")
    patch(b, p, rt_off, ">Q", 1 << 44)
    cases.append(("refblock-beyond-eof", p, [], ["write:8M:4096:1"], "Input/output error"))

    # internal snapshots: RW refused, RO fine; snapshot L1 bounds
    s = os.path.join(d, "snap.qcow2")
    sh("cp", b, s)
    sh("qemu-img", "snapshot", "-c", "s1", s)
    cases.append(("snapshot-rw", s, [], ["info"],
                  "images with internal snapshots can only be opened read-only"))
    snap_off = struct.unpack_from(">Q", header(s), 64)[0]
    p = os.path.join(d, "snapshot-l1-huge.qcow2")
    patch(s, p, snap_off + 8, ">I", 0x7fffffff)
    cases.append(("snapshot-l1-huge", p, ["-r"], ["info"], "Snapshot L1 table too large"))
    p = os.path.join(d, "snapshot-l1-beyond-eof.qcow2")
    patch(s, p, snap_off, ">Q", 1 << 40)
    cases.append(("snapshot-l1-beyond-eof", p, ["-r"], ["info"],
                  "Snapshot L1 table offset invalid"))
    p = os.path.join(d, "snapshot-extra-huge.qcow2")
    patch(s, p, snap_off + 36, ">I", 0x7fffffff)
    patch(p, p, 60, ">I", 2)
    cases.append(("snapshot-extra-huge", p, ["-r"], ["info"],
                  "Snapshot table beyond end of file"))
    del flen
    return cases


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "malformed-qcow2"
    os.makedirs(out, exist_ok=True)
    for c in make_all(out):
        print(c[0], c[1], c[4])
