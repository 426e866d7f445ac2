"""lamina-img check: texts, JSON and exit codes as qemu-img's."""
import json
import shutil

import pytest

from img_util import (assert_qemu_clean, chain, lam, make_corruption, make_leak,
                      mixed_qcow2, qimg, raw_with_holes)


def run_both(tmp_path, src, *args):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    shutil.copy(src, a)
    shutil.copy(src, b)
    pa = lam("check", *args, a, check=False)
    pb = qimg("check", *args, b, check=False)
    return pa, pb, a, b


def same(pa, pb, a, b):
    assert pa.returncode == pb.returncode, (pa.stderr, pb.stderr)
    sa = pa.stdout.replace(str(a), "X")
    sb = pb.stdout.replace(str(b), "X")
    try:
        assert json.loads(sa) == json.loads(sb)
    except json.JSONDecodeError:
        assert sa == sb


@pytest.mark.parametrize("out", [[], ["--output=json"]])
def test_clean(tmp_path, out):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    pa, pb, a, b = run_both(tmp_path, src, *out)
    assert pa.returncode == 0
    same(pa, pb, a, b)
    if not out:
        assert "No errors were found on the image." in pa.stdout
        assert "Image end offset: " in pa.stdout


@pytest.mark.parametrize("out", [[], ["--output=json"]])
def test_compressed(tmp_path, out):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    c = str(tmp_path / "c.qcow2")
    qimg("convert", "-c", "-O", "qcow2", src, c)
    pa, pb, a, b = run_both(tmp_path, c, *out)
    same(pa, pb, a, b)


@pytest.mark.parametrize("out", [[], ["--output=json"]])
def test_leak(tmp_path, out):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    make_leak(src)
    pa, pb, a, b = run_both(tmp_path, src, *out)
    assert pa.returncode == 3
    same(pa, pb, a, b)


@pytest.mark.parametrize("out", [[], ["--output=json"]])
def test_corruption(tmp_path, out):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    make_corruption(src)
    pa, pb, a, b = run_both(tmp_path, src, *out)
    assert pa.returncode == 2
    same(pa, pb, a, b)


def test_repair_leaks(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    make_leak(src)
    pa, pb, a, b = run_both(tmp_path, src, "-r", "leaks")
    assert pa.returncode == 0
    assert "The following inconsistencies were found and repaired:" in pa.stdout
    assert "    1 leaked clusters\n    0 corruptions" in pa.stdout
    assert_qemu_clean(a)
    p = qimg("compare", a, b)
    assert p.returncode == 0


def test_repair_leaks_json(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    make_leak(src)
    pa, pb, a, b = run_both(tmp_path, src, "-r", "all", "--output=json")
    assert pa.returncode == 0
    assert json.loads(pa.stdout)["leaks-fixed"] == 1
    assert_qemu_clean(a)


def test_repair_all_corruption(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    make_corruption(src)
    pa, pb, a, b = run_both(tmp_path, src, "-r", "all")
    assert pa.returncode == 0, pa.stderr
    assert_qemu_clean(a)
    qimg("compare", a, src)


def test_raw_not_supported(tmp_path):
    f = raw_with_holes(str(tmp_path / "r.raw"))
    for extra in ([], ["--output=json"]):
        p = lam("check", *extra, f, check=False)
        assert p.returncode == 63
        assert "This image format does not support checks" in p.stderr


def test_bad_repair_arg(tmp_path):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    p = lam("check", "-r", "bogus", src, check=False)
    assert p.returncode == 1


def test_check_nonexistent(tmp_path):
    p = lam("check", tmp_path / "nope", check=False)
    assert p.returncode == 1
