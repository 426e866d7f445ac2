"""lamina-img map: identical to qemu-img map (JSON and human)."""
import json
import os

import pytest

from img_util import chain, lam, mixed_qcow2, qimg, qio, raw_with_holes


def check_same(*args, human=True):
    a = lam("map", "--output=json", *args)
    b = qimg("map", "--output=json", *args)
    assert json.loads(a.stdout) == json.loads(b.stdout)
    assert a.stdout == b.stdout
    if human:
        a = lam("map", *args, check=False)
        b = qimg("map", *args, check=False)
        assert (a.returncode, a.stdout) == (b.returncode, b.stdout)


def test_raw(tmp_path):
    check_same(raw_with_holes(str(tmp_path / "r.raw")))


def test_raw_explicit_fmt_and_range(tmp_path):
    f = raw_with_holes(str(tmp_path / "r.raw"))
    check_same("-f", "raw", "--start-offset=1M", "--max-length=8M", f)


def test_qcow2_mixed(tmp_path):
    check_same(mixed_qcow2(str(tmp_path / "a.qcow2")))


def test_qcow2_small_clusters(tmp_path):
    check_same(mixed_qcow2(str(tmp_path / "a.qcow2"), extra_opts="cluster_size=4k"))


def test_chain(tmp_path):
    base, mid, top = chain(str(tmp_path))
    for f in (base, mid, top):
        check_same(f)


def test_compressed(tmp_path):
    src = mixed_qcow2(str(tmp_path / "a.qcow2"))
    dst = str(tmp_path / "c.qcow2")
    qimg("convert", "-c", "-O", "qcow2", src, dst)
    check_same(dst, human=False)
    p = lam("map", dst, check=False)
    assert p.returncode == 1
    assert "compressed clusters" in p.stderr


def test_empty_and_short_backing(tmp_path):
    base = str(tmp_path / "b.qcow2")
    top = str(tmp_path / "t.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "1M")
    qio(base, "write -P 1 0 512k")
    qimg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top, "4M")
    qio(top, "write -P 2 3M 64k")
    check_same(top)


def test_map_nonexistent(tmp_path):
    p = lam("map", tmp_path / "nope", check=False)
    assert p.returncode == 1
    assert "Could not open" in p.stderr
