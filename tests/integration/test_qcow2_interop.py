"""qcow2 interoperability with QEMU: images QEMU writes read back equal
through Lamina; images Lamina writes pass qemu-img check and compare."""
import json
import os

import pytest

from qcow2_util import (assert_clean, have_tools, have_zstd, lamina_dump, qemu_check,
                        qemu_img, qemu_io, same_file, to_raw, tool)

pytestmark = pytest.mark.skipif(not have_tools(), reason="qcow2-tool or QEMU missing")

MiB = 1 << 20


def fill_qemu(img):
    qemu_io(img, "write -P 0x11 0 64k", "write -P 0x22 1M 300k",
            "write -P 0x33 5000 3000", "write -z 2M 128k",
            "write -P 0x44 7M 1M")


@pytest.mark.parametrize("opts", [
    "", "compat=0.10", "cluster_size=4096", "cluster_size=2M", "cluster_size=512",
    "refcount_bits=64", "refcount_bits=1", "refcount_bits=8", "lazy_refcounts=on",
])
def test_read_qemu_image(tmp_path, opts):
    img = str(tmp_path / "q.qcow2")
    args = ["create", "-f", "qcow2"] + (["-o", opts] if opts else []) + [img, "16M"]
    qemu_img(*args)
    fill_qemu(img)
    to_raw(img, str(tmp_path / "ref.raw"))
    lamina_dump(img, str(tmp_path / "out.raw"), "-r")
    assert same_file(str(tmp_path / "ref.raw"), str(tmp_path / "out.raw"))
    r = json.loads(tool("-r", img, "check").stdout)
    assert r["corruptions"] == 0 and r["leaks"] == 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_read_qemu_compressed(tmp_path, ctype):
    if ctype == "zstd" and not have_zstd():
        pytest.skip("qemu-img without zstd")
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        for i in range(64):
            f.write(bytes([i]) * 40000 + os.urandom(3000) + b"text" * 5000)
    img = str(tmp_path / "c.qcow2")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"compression_type={ctype}", src, img)
    out = str(tmp_path / "out.raw")
    lamina_dump(img, out, "-r")
    with open(src, "rb") as f:
        data = f.read()
    with open(out, "rb") as f:
        got = f.read()
    assert got[:len(data)] == data and got[len(data):].count(0) == len(got) - len(data)
    r = json.loads(tool("-r", img, "check").stdout)
    assert r["compressed-clusters"] > 0 and r["corruptions"] == 0 and r["leaks"] == 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_write_compressed(tmp_path, ctype):
    if ctype == "zstd" and not have_zstd():
        pytest.skip("qemu-img without zstd")
    img = str(tmp_path / "w.qcow2")
    tool("create", img, 8 * MiB, json.dumps({"compression-type": ctype}))
    src = str(tmp_path / "src.raw")
    with open(src, "wb") as f:
        for i in range(100):
            f.write(b"lamina%03d" % i * 2000 + os.urandom(500))
    tool(img, f"load:0:{src}:c")
    assert_clean(img)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    ref = str(tmp_path / "ref.raw")
    with open(src, "rb") as f:
        data = f.read()
    with open(ref, "wb") as f:
        f.write(data + bytes(8 * MiB - len(data)))
    qemu_img("compare", "-f", "raw", "-F", "qcow2", ref, img)
    r = qemu_check(img)
    assert r["compressed-clusters"] > 0
    # qemu-img map: compressed clusters have no offset
    # overwrite part of a compressed cluster, then check again
    tool(img, "write:1000:100:0x55", "write:65536:65536:0x66")
    assert_clean(img)
    qemu_io(img, "read -P 0x55 1000 100", "read -P 0x66 64k 64k")


def test_write_incompressible_falls_back(tmp_path):
    img = str(tmp_path / "w.qcow2")
    tool("create", img, MiB)
    src = str(tmp_path / "rnd")
    with open(src, "wb") as f:
        f.write(os.urandom(MiB))
    tool(img, f"load:0:{src}:c")
    assert_clean(img)
    assert qemu_check(img).get("compressed-clusters", 0) == 0
    ref = str(tmp_path / "ref.raw")
    os.rename(src, ref)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", ref, img)


@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("rb", [1, 16, 64])
def test_lamina_writes_pass_qemu_check(tmp_path, cs, rb):
    img = str(tmp_path / "l.qcow2")
    tool("create", img, 32 * MiB, json.dumps({"cluster-size": cs, "refcount-bits": rb}))
    tool(img, "write:0:70000:0x11", "write:3000000:5000:0x22", "write:16777216:1048576:0x33",
         "zero:16777216:65536", "write:33553920:512:0x44", "discard:3000000:4096")
    assert_clean(img)
    qemu_io(img, "read -P 0x11 0 70000", "read -P 0x33 17825792 0",
            "read -P 0x44 33553920 512")
    ref = str(tmp_path / "ref.raw")
    lamina_dump(img, ref, "-r")
    raw2 = str(tmp_path / "q.raw")
    to_raw(img, raw2)
    assert same_file(ref, raw2)


def test_v2_create_and_info(tmp_path):
    img = str(tmp_path / "v2.qcow2")
    tool("create", img, 4 * MiB, json.dumps({"version": "v2"}))
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["compat"] == "0.10"
    tool(img, "write:0:4096:0x11", "zero:0:65536")
    assert_clean(img)
    qemu_io(img, "read -P 0 0 64k")
    ours = json.loads(tool("-r", img, "info").stdout)
    assert ours["format-specific"]["data"] == info["format-specific"]["data"]


def test_info_matches_qemu(tmp_path):
    img = str(tmp_path / "i.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,refcount_bits=32", img, "1G")
    q = json.loads(qemu_img("info", "--output=json", img).stdout)
    ours = json.loads(tool("-r", img, "info").stdout)
    assert ours["format-specific"] == q["format-specific"]
    assert ours["cluster-size"] == q["cluster-size"]
    assert ours["dirty-flag"] == q["dirty-flag"]


def test_backing_chain(tmp_path):
    base = str(tmp_path / "base.qcow2")
    mid = str(tmp_path / "mid.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 0x11 0 8M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu_io(mid, "write -P 0x22 1M 1M", "write -z 3M 64k")
    tool("create", top, 16 * MiB, json.dumps({"backing-file": "mid.qcow2", "backing-fmt": "qcow2"}))
    # partial-cluster writes copy the rest from the backing chain
    tool(top, "write:1050000:100:0x33", "write:5000:10:0x44")
    assert_clean(top)
    qemu_io(top, "read -P 0x11 0 5000", "read -P 0x44 5000 10", "read -P 0x11 5010 60526",
            "read -P 0x22 1M 1000", "read -P 0x33 1050000 100", "read -P 0 3M 64k",
            "read -P 0x11 4M 4M", "read -P 0 8M 8M")
    ref = str(tmp_path / "ref.raw")
    to_raw(top, ref)
    out = str(tmp_path / "out.raw")
    lamina_dump(top, out)
    assert same_file(ref, out)
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "mid.qcow2"
    assert info["backing-filename-format"] == "qcow2"


def test_discard_with_backing_reads_zero(tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 0x11 0 4M")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    tool(top, "write:0:1M:0x22", "zero:1M:1M", "discard:0:65536")
    assert_clean(top)
    qemu_io(top, "read -P 0 1M 1M", "read -P 0x22 64k 960k", "read -P 0x11 2M 2M")


def test_rebase_keeps_unknown_extensions(tmp_path):
    img = str(tmp_path / "r.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    # add an unknown header extension after the feature table
    with open(img, "r+b") as f:
        hdr = bytearray(f.read(65536))
        hl = int.from_bytes(hdr[100:104], "big")
        p = hl
        while int.from_bytes(hdr[p:p + 4], "big") != 0:
            ln = int.from_bytes(hdr[p + 4:p + 8], "big")
            p += 8 + (ln + 7) // 8 * 8
        ext = (0x12345678).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"hello\0\0\0"
        hdr[p:p + len(ext)] = ext
        f.seek(0)
        f.write(hdr)
    tool(img, "rebase:base.img:raw")
    with open(img, "rb") as f:
        data = f.read(65536)
    assert b"hello" in data and (0x12345678).to_bytes(4, "big") in data
    info = json.loads(qemu_img("info", "--output=json", "-U", img).stdout)
    assert info["backing-filename"] == "base.img"
    assert info["backing-filename-format"] == "raw"
    tool("-n", img, "rebase:-")
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert "backing-filename" not in info
    assert_clean(img)


def test_resize(tmp_path):
    img = str(tmp_path / "g.qcow2")
    tool("create", img, MiB, json.dumps({"cluster-size": 512}))
    tool(img, "write:0:1M:0x11", "resize:104857600")
    tool(img, "write:104857088:512:0x22")
    assert_clean(img)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == 104857600
    qemu_io(img, "read -P 0x11 0 1M", "read -P 0 1M 1M", "read -P 0x22 104857088 512")
    # shrink of an allocated tail is refused, of an unallocated one allowed
    p = tool(img, "resize:1048576", check=False)
    assert p.returncode != 0 and "allocated" in p.stderr
    tool(img, "discard:104857088:512", "resize:2097152")
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == 2097152


def test_preallocation(tmp_path):
    for mode in ("metadata", "falloc", "full"):
        img = str(tmp_path / f"p-{mode}.qcow2")
        tool("create", img, 8 * MiB, json.dumps({"preallocation": mode}))
        assert_clean(img)
        m = json.loads(qemu_img("map", "--output=json", img).stdout)
        assert all(e["data"] for e in m), m
        qemu_io(img, "read -P 0 0 8M")


def test_measure_matches_qemu(tmp_path):
    for size, opts, qopts in [(1 << 30, {}, []),
                              (10 << 30, {"cluster-size": 4096}, ["-o", "cluster_size=4096"]),
                              (123456 * 512, {"refcount-bits": 64}, ["-o", "refcount_bits=64"]),
                              (992578048, {"cluster-size": 512, "refcount-bits": 64},
                               ["-o", "cluster_size=512,refcount_bits=64"])]:
        q = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", *qopts,
                                "--size", str(size)).stdout)
        ours = json.loads(tool("measure", size, json.dumps(opts)).stdout)
        assert ours == {"required": q["required"], "fully-allocated": q["fully-allocated"]}
    src = str(tmp_path / "s.qcow2")
    qemu_img("create", "-f", "qcow2", src, "64M")
    qemu_io(src, "write 0 1M", "write 10M 100k", "write -z 20M 1M")
    q = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", src).stdout)
    ours = json.loads(tool("measure", "-f", src).stdout)
    assert ours == {"required": q["required"], "fully-allocated": q["fully-allocated"]}


def test_lazy_refcounts_dirty_repair(tmp_path):
    img = str(tmp_path / "d.qcow2")
    tool("create", img, 4 * MiB, json.dumps({"lazy-refcounts": True}))
    tool(img, "write:0:1M:0x11")
    assert_clean(img)
    # simulate a crash with the dirty bit set and a refcount lost
    qemu_io(img, "write -P 0x22 2M 64k")
    with open(img, "r+b") as f:
        f.seek(72)
        f.write((1).to_bytes(8, "big"))
    info = json.loads(tool("-r", img, "info").stdout)
    assert info["dirty-flag"] is True
    tool(img, "read:0:1M:0x11")   # RW open repairs and clears the flag
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["dirty-flag"] is False
    assert_clean(img)


def test_check_reports_and_repairs_leaks(tmp_path):
    img = str(tmp_path / "k.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x11 0 1M", "discard 0 64k")
    # leak: bump a refcount of an unused cluster by hand via qemu's layout
    q = json.loads(qemu_img("check", "--output=json", img).stdout)
    assert q.get("leaks", 0) == 0
    # make a leak: extend the file with a cluster and refcount it
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    with open(img, "r+b") as f:
        hdr = f.read(104)
        rt = int.from_bytes(hdr[48:56], "big")
        f.seek(rt)
        rb = int.from_bytes(f.read(8), "big")
        f.seek(rb + 2 * 100)
        f.write((1).to_bytes(2, "big"))
        f.truncate(max(os.path.getsize(img), 101 * 65536))
    p = tool("-r", img, "check", check=False)
    assert p.returncode == 3
    assert "Leaked cluster 100 refcount=1 reference=0" in p.stderr
    assert json.loads(p.stdout)["leaks"] == 1
    p = tool(img, "check:leaks", check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["leaks-fixed"] == 1
    assert_clean(img)
    del info


def test_check_repairs_refcount_errors(tmp_path):
    img = str(tmp_path / "e.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x11 0 1M")
    with open(img, "r+b") as f:
        hdr = f.read(104)
        rt = int.from_bytes(hdr[48:56], "big")
        f.seek(rt)
        rb = int.from_bytes(f.read(8), "big")
        f.seek(rb + 2 * 6)
        f.write((0).to_bytes(2, "big"))   # a data cluster loses its refcount
    p = tool("-r", img, "check", check=False)
    assert p.returncode == 2
    assert "ERROR cluster 6 refcount=0 reference=1" in p.stderr
    assert qemu_check(img)["corruptions"] >= 1
    p = tool("-c", img, "check:all", check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["corruptions-fixed"] >= 1
    assert_clean(img)
    qemu_io(img, "read -P 0x11 0 1M")


def test_persistent_bitmaps_kept_consistent(tmp_path):
    img = str(tmp_path / "bm.qcow2")
    qemu_img("create", "-f", "qcow2", img, "16M")
    qemu_io(img, "write 0 1M")
    qemu_img("bitmap", "--add", img, "b0")
    q = json.loads(qemu_img("info", "--output=json", img).stdout)
    ours = json.loads(tool("-r", img, "info").stdout)
    assert ours["format-specific"] == q["format-specific"]
    # a read-write user that does not update bitmaps flags them in-use;
    # their clusters stay accounted for
    tool(img, "write:2M:1M:0x11")
    assert_clean(img)
    q = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert q["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    ours = json.loads(tool("-r", img, "info").stdout)
    assert ours["format-specific"] == q["format-specific"]


def test_check_copied_flag(tmp_path):
    img = str(tmp_path / "f.qcow2")
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x11 0 64k")
    with open(img, "r+b") as f:
        hdr = f.read(104)
        l1 = int.from_bytes(hdr[40:48], "big")
        f.seek(l1)
        l2 = int.from_bytes(f.read(8), "big") & 0x00fffffffffffe00
        f.seek(l2)
        e = int.from_bytes(f.read(8), "big")
        f.seek(l2)
        f.write((e & ~(1 << 63)).to_bytes(8, "big"))   # refcount 1 but no COPIED
    assert qemu_check(img)["corruptions"] >= 1
    p = tool("-r", img, "check", check=False)
    assert p.returncode == 2 and "ERROR OFLAG_COPIED data cluster" in p.stderr
    p = tool("-c", img, "check:all", check=False)
    assert p.returncode == 0, p.stderr
    assert_clean(img)
    qemu_io(img, "read -P 0x11 0 64k")


@pytest.mark.parametrize("opts,msg", [
    ({"cache-size": 1 << 20, "l2-cache-size": 1 << 19, "refcount-cache-size": 1 << 18},
     "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
    ({"cache-size": 1 << 20, "l2-cache-size": 1 << 21}, "l2-cache-size may not exceed cache-size"),
    ({"l2-cache-entry-size": 1000},
     "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"),
])
def test_cache_option_errors(tmp_path, opts, msg):
    img = str(tmp_path / "o.qcow2")
    tool("create", img, 1 << 20)
    p = tool("-o", json.dumps(opts), img, "info", check=False)
    assert p.returncode == 1 and msg in p.stderr
