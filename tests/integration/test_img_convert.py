"""lamina-img convert, verified with qemu-img compare/check/map."""
import json
import os

import pytest

from img_util import (assert_qemu_clean, assert_same_content, chain, jqimg, lam,
                      mixed_qcow2, qimg, qio, raw_with_holes)


def data_bytes(path, fmt):
    m = jqimg("map", "--output=json", "-f", fmt, path)
    return sum(e["length"] for e in m if e["data"])


@pytest.mark.parametrize("flags", [[], ["-W"], ["-m", "1"], ["-W", "-m", "16"]])
def test_qcow2_to_raw(tmp_path, flags):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    dst = str(tmp_path / "d.raw")
    lam("convert", *flags, "-O", "raw", src, dst)
    assert_same_content(src, dst, "qcow2", "raw")
    # Zero and unallocated ranges stay holes.
    assert data_bytes(dst, "raw") <= data_bytes(src, "qcow2") + (1 << 20)


@pytest.mark.parametrize("flags", [[], ["-W"], ["-o", "cluster_size=4k"],
                                   ["-o", "compat=0.10"], ["-S", "0"]])
def test_raw_to_qcow2(tmp_path, flags):
    src = raw_with_holes(str(tmp_path / "s.raw"))
    dst = str(tmp_path / "d.qcow2")
    lam("convert", "-f", "raw", "-O", "qcow2", *flags, src, dst)
    assert_qemu_clean(dst)
    assert_same_content(src, dst, "raw", "qcow2")
    if "-S" not in flags:
        # Only the written data is allocated.
        assert data_bytes(dst, "qcow2") < (4 << 20)


def test_qcow2_to_qcow2_layout_and_map(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    a, b = str(tmp_path / "a.qcow2"), str(tmp_path / "b.qcow2")
    lam("convert", "-O", "qcow2", src, a)
    qimg("convert", "-O", "qcow2", src, b)
    assert_qemu_clean(a)
    assert_same_content(a, b)
    # In-order writes: the same host layout as qemu-img's.
    assert jqimg("map", "--output=json", a) == jqimg("map", "--output=json", b)


def test_chain_flattened(tmp_path):
    base, mid, top = chain(str(tmp_path))
    dst = str(tmp_path / "flat.qcow2")
    lam("convert", "-O", "qcow2", top, dst)
    assert_qemu_clean(dst)
    assert_same_content(top, dst)
    assert "backing-filename" not in jqimg("info", "--output=json", dst)


def test_compressed(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    dst = str(tmp_path / "c.qcow2")
    lam("convert", "-c", "-O", "qcow2", src, dst)
    assert_qemu_clean(dst)
    assert_same_content(src, dst)
    p = qimg("check", "--output=json", dst)
    chk = json.loads(p.stdout)
    assert chk.get("compressed-clusters", 0) > 0


def test_compressed_raw_refused(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    p = lam("convert", "-c", "-O", "raw", src, tmp_path / "d.raw", check=False)
    assert p.returncode == 1


def test_backing_B(tmp_path):
    base, mid, top = chain(str(tmp_path))
    dst = str(tmp_path / "d.qcow2")
    lam("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", top, dst)
    assert_qemu_clean(dst)
    assert_same_content(top, dst)
    info = jqimg("info", "--output=json", dst)
    assert info["backing-filename"] == "base.qcow2"
    # Only what differs from base was written.
    m = jqimg("map", "--output=json", dst)
    own = sum(e["length"] for e in m if e["depth"] == 0 and e["present"])
    assert 0 < own <= (4 << 20)


def test_backing_B_requires_F(tmp_path):
    base, mid, top = chain(str(tmp_path))
    p = lam("convert", "-O", "qcow2", "-B", "base.qcow2", top, tmp_path / "d.qcow2",
            check=False)
    assert p.returncode == 1
    assert "Use of backing file requires explicit backing format" in p.stderr


def test_skip_create_n(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    dst = str(tmp_path / "d.qcow2")
    qimg("create", "-q", "-f", "qcow2", dst, "64M")
    # Garbage in the target must be overwritten, zeroes included.
    qio(dst, "write -P 0xee 0 64M")
    lam("convert", "-n", "-O", "qcow2", src, dst)
    assert_qemu_clean(dst)
    assert_same_content(src, dst)


def test_skip_create_raw(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    dst = str(tmp_path / "d.raw")
    with open(dst, "wb") as f:
        f.write(b"\xab" * (64 << 20))
    lam("convert", "-n", "-W", "-O", "raw", src, dst)
    assert_same_content(src, dst, "qcow2", "raw")


def test_progress(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    p = lam("convert", "-p", "-O", "raw", src, tmp_path / "d.raw", text=False)
    assert p.stdout.startswith(b"    (0.00/100%)\r")
    assert p.stdout.endswith(b"    (100.00/100%)\r\n")


def test_errors(tmp_path):
    p = lam("convert", "-O", "raw", tmp_path / "nope", tmp_path / "d.raw", check=False)
    assert p.returncode == 1
    assert "Could not open" in p.stderr
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    p = lam("convert", "-O", "foo", src, tmp_path / "d", check=False)
    assert p.returncode == 1
    assert "Unknown file format 'foo'" in p.stderr


def test_backing_B_not_in_source_chain(tmp_path):
    # The new backing is a copy of mid, unrelated to the source's chain: only
    # clusters whose content differs from it may be written.
    base, mid, top = chain(str(tmp_path))
    other = str(tmp_path / "other.qcow2")
    qimg("convert", "-O", "qcow2", mid, other)
    dst = str(tmp_path / "d.qcow2")
    lam("convert", "-W", "-O", "qcow2", "-B", "other.qcow2", "-F", "qcow2", top, dst)
    assert_qemu_clean(dst)
    assert_same_content(top, dst)
    m = jqimg("map", "--output=json", dst)
    own = sum(e["length"] for e in m if e["depth"] == 0 and e["present"])
    # top wrote 64k + 1M (zeroes) + 128k over mid.
    assert 0 < own <= (64 << 10) + (1 << 20) + (128 << 10)


@pytest.mark.parametrize("cache", ["none", "directsync", "writeback", "unsafe"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_cache_modes(tmp_path, cache, fmt):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    dst = str(tmp_path / f"d.{fmt}")
    lam("convert", "-t", cache, "-W", "-O", fmt, src, dst)
    assert_same_content(src, dst, "qcow2", fmt)
    if fmt == "qcow2":
        assert_qemu_clean(dst)


def test_bad_cache_mode(tmp_path):
    src = raw_with_holes(str(tmp_path / "s.raw"))
    p = lam("convert", "-t", "bogus", "-O", "raw", src, tmp_path / "d.raw", check=False)
    assert p.returncode == 1
    assert "Invalid cache option" in p.stderr


def test_several_sources_concatenated(tmp_path):
    a = mixed_qcow2(str(tmp_path / "a.qcow2"))
    odd = tmp_path / "odd.raw"
    odd.write_bytes(os.urandom(1000000))
    b = raw_with_holes(str(tmp_path / "b.raw"))
    ours, theirs = str(tmp_path / "l.qcow2"), str(tmp_path / "q.qcow2")
    lam("convert", "-W", "-O", "qcow2", a, odd, b, ours)
    qimg("convert", "-O", "qcow2", a, odd, b, theirs)
    assert_qemu_clean(ours)
    assert_same_content(ours, theirs)
    assert jqimg("info", "--output=json", ours)["virtual-size"] == \
        jqimg("info", "--output=json", theirs)["virtual-size"]


def test_skip_create_odd_raw_target(tmp_path):
    src = tmp_path / "odd.raw"
    src.write_bytes(os.urandom(1000000))
    dst = tmp_path / "t.raw"
    dst.write_bytes(b"\0" * 1000000)
    ref = tmp_path / "q.raw"
    ref.write_bytes(b"\0" * 1000000)
    lam("convert", "-n", "-f", "raw", "-O", "raw", src, dst)
    qimg("convert", "-n", "-f", "raw", "-O", "raw", src, ref)
    # Both see whole sectors: the target grows to 1000448 with a zero tail.
    assert dst.read_bytes() == ref.read_bytes()
    assert dst.read_bytes()[:1000000] == src.read_bytes()


@pytest.mark.parametrize("extra", [[], ["-B", "s.qcow2", "-F", "qcow2"]])
def test_sparse_zero_means_fully_allocated(tmp_path, extra):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    ours, theirs = str(tmp_path / "l.qcow2"), str(tmp_path / "q.qcow2")
    lam("convert", "-S", "0", "-O", "qcow2", *extra, src, ours)
    qimg("convert", "-S", "0", "-O", "qcow2", *extra, src, theirs)
    assert jqimg("map", "--output=json", ours) == jqimg("map", "--output=json", theirs)
    assert_qemu_clean(ours)
    assert_same_content(src, ours)
    raw = str(tmp_path / "l.raw")
    lam("convert", "-S", "0", "-O", "raw", src, raw)
    assert os.stat(raw).st_blocks * 512 >= 64 << 20
