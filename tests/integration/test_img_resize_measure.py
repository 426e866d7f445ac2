"""lamina-img resize and measure."""
import json

import pytest

from img_util import (assert_qemu_clean, chain, jlam, jqimg, lam, mixed_qcow2,
                      qimg, qio, raw_with_holes)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_grow(tmp_path, fmt):
    f = str(tmp_path / f"x.{fmt}")
    qimg("create", "-q", "-f", fmt, f, "1M")
    assert lam("resize", "-f", fmt, f, "+3M").stdout == "Image resized.\n"
    assert jqimg("info", "--output=json", f)["virtual-size"] == 4 << 20
    lam("resize", "-f", fmt, f, "10M")
    assert jqimg("info", "--output=json", f)["virtual-size"] == 10 << 20
    if fmt == "qcow2":
        assert_qemu_clean(f)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_shrink_needs_flag(tmp_path, fmt):
    f = str(tmp_path / f"x.{fmt}")
    qimg("create", "-q", "-f", fmt, f, "4M")
    p = lam("resize", "-f", fmt, f, "-1M", check=False)
    assert p.returncode == 1
    assert "Use the --shrink option to perform a shrink operation." in p.stderr
    p = lam("resize", "--shrink", "-f", fmt, f, "-1M")
    assert "warning: Shrinking an image will delete all data" in p.stderr
    assert jqimg("info", "--output=json", f)["virtual-size"] == 3 << 20
    if fmt == "qcow2":
        assert_qemu_clean(f)


def test_shrink_keeps_data(tmp_path):
    f = mixed_qcow2(str(tmp_path / "a.qcow2"))
    lam("resize", "--shrink", f, "8M")
    assert_qemu_clean(f)
    p = qimg("map", "--output=json", f)
    assert json.loads(p.stdout)[-1]["start"] + json.loads(p.stdout)[-1]["length"] == 8 << 20


def test_resize_errors(tmp_path):
    f = str(tmp_path / "a.qcow2")
    qimg("create", "-q", "-f", "qcow2", f, "1M")
    p = lam("resize", f, "-5M", check=False)
    assert p.returncode == 1
    assert "New image size must be positive" in p.stderr
    p = lam("resize", f, "1Q", check=False)
    assert p.returncode == 1


def measure_both(*args):
    a = jlam("measure", "--output=json", *args)
    b = jqimg("measure", "--output=json", *args)
    assert a == b
    ha = lam("measure", *args).stdout
    hb = qimg("measure", *args).stdout
    assert ha == hb
    return a


@pytest.mark.parametrize("args", [
    ["-O", "qcow2", "--size", "1G"],
    ["-O", "qcow2", "--size", "100G", "-o", "cluster_size=4k"],
    ["-O", "qcow2", "--size", "7M", "-o", "preallocation=metadata"],
    ["-O", "qcow2", "--size", "7M", "-o", "preallocation=full"],
    ["-O", "raw", "--size", "1M"],
    ["-O", "qcow2", "--size", "3G", "-o", "refcount_bits=1,compat=1.1"],
])
def test_measure_size(args):
    measure_both(*args)


@pytest.mark.parametrize("ofmt", [["-O", "qcow2"], ["-O", "raw"],
                                  ["-O", "qcow2", "-o", "cluster_size=4k"]])
def test_measure_image(tmp_path, ofmt):
    measure_both(*ofmt, mixed_qcow2(str(tmp_path / "a.qcow2")))
    base, mid, top = chain(str(tmp_path))
    measure_both(*ofmt, top)
    measure_both(*ofmt, "-f", "raw", raw_with_holes(str(tmp_path / "r.raw")))


def test_measure_errors():
    p = lam("measure", "-O", "qcow2", check=False)
    assert p.returncode == 1
    assert "Either --size N or one filename must be specified." in p.stderr


@pytest.mark.parametrize("prealloc", ["falloc", "full"])
def test_grow_preallocated(tmp_path, prealloc):
    f = str(tmp_path / "x.raw")
    qimg("create", "-q", "-f", "raw", f, "1M")
    lam("resize", "-f", "raw", f"--preallocation={prealloc}", f, "5M")
    import os
    assert os.stat(f).st_blocks * 512 >= 4 << 20
    assert jqimg("info", "--output=json", "-f", "raw", f)["virtual-size"] == 5 << 20
