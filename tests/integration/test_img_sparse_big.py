"""Multi-terabyte sparse images: every command passes over empty ranges
without reading or writing them (each step must take seconds, not hours)."""
import os

from img_util import (assert_qemu_clean, assert_same_content, jqimg, lam, qimg,
                      qio)

T = 20  # seconds allowed per command


def big_chain(tmp_path):
    base = str(tmp_path / "b.qcow2")
    top = str(tmp_path / "t.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "4T")
    qio(base, "write -P 1 3T 1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 2 2T 1M", "write -z 3T 64k")
    return base, top


def test_convert_compare_map(tmp_path):
    base, top = big_chain(tmp_path)
    for flags in ([], ["-W"]):
        dst = str(tmp_path / "d.qcow2")
        lam("convert", *flags, "-O", "qcow2", top, dst, timeout=T)
        assert_qemu_clean(dst)
        assert lam("compare", top, dst, timeout=T).returncode == 0
        os.unlink(dst)
    raw = str(tmp_path / "d.raw")
    lam("convert", "-O", "raw", top, raw, timeout=T)
    assert os.stat(raw).st_blocks * 512 < (64 << 20)
    assert lam("compare", "-F", "raw", top, raw, timeout=T).returncode == 0
    assert jqimg("map", "--output=json", top) == \
        __import__("json").loads(lam("map", "--output=json", top, timeout=T).stdout)


def test_commit_and_rebase(tmp_path):
    base, top = big_chain(tmp_path)
    want = str(tmp_path / "want.qcow2")
    qimg("convert", "-O", "qcow2", top, want)
    lam("commit", "-d", top, timeout=T)
    assert_same_content(base, want)
    lam("rebase", "-b", "", top, timeout=T)
    assert_same_content(top, want)
    assert "backing-filename" not in jqimg("info", "--output=json", top)
