"""lamina-img commit."""
import os

from img_util import (assert_qemu_clean, assert_same_content, chain, jqimg, lam,
                      qimg, qio)


def flat(tmp_path, img, name):
    out = str(tmp_path / name)
    qimg("convert", "-O", "raw", img, out)
    return out


def test_commit_into_backing_and_empty(tmp_path):
    base, mid, top = chain(str(tmp_path))
    want = flat(tmp_path, top, "want.raw")
    p = lam("commit", top)
    assert p.stdout == "Image committed.\n"
    assert_qemu_clean(mid)
    assert_qemu_clean(top)
    assert_same_content(mid, want, "qcow2", "raw")
    assert_same_content(top, want, "qcow2", "raw")
    # The top is empty again and still points at mid.
    m = jqimg("map", "--output=json", top)
    assert all(e["depth"] > 0 or not e["present"] for e in m)
    assert jqimg("info", "--output=json", top)["backing-filename"] == "mid.qcow2"


def test_commit_d_keeps_top(tmp_path):
    base, mid, top = chain(str(tmp_path))
    want = flat(tmp_path, top, "want.raw")
    lam("commit", "-d", "-p", top)
    assert_same_content(mid, want, "qcow2", "raw")
    m = jqimg("map", "--output=json", top)
    assert any(e["depth"] == 0 and e["present"] for e in m)


def test_commit_to_base(tmp_path):
    base, mid, top = chain(str(tmp_path))
    want = flat(tmp_path, top, "want.raw")
    lam("commit", "-b", base, top)
    assert_qemu_clean(base)
    assert_same_content(base, want, "qcow2", "raw")


def test_commit_grows_base(tmp_path):
    base = str(tmp_path / "b.qcow2")
    top = str(tmp_path / "t.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "1M")
    qio(base, "write -P 1 0 1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top, "4M")
    qio(top, "write -P 2 3M 64k")
    want = flat(tmp_path, top, "want.raw")
    lam("commit", top)
    assert jqimg("info", "--output=json", base)["virtual-size"] == 4 << 20
    assert_same_content(base, want, "qcow2", "raw")


def test_commit_raw_base(tmp_path):
    base = str(tmp_path / "b.raw")
    top = str(tmp_path / "t.qcow2")
    qimg("create", "-q", "-f", "raw", base, "8M")
    qio(base, "write -P 1 0 8M", fmt="raw")
    qimg("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", top)
    qio(top, "write -P 2 1M 100k", "write -z 4M 1M")
    want = flat(tmp_path, top, "want.raw")
    lam("commit", top)
    assert_same_content(base, want, "raw", "raw")


def test_commit_without_backing(tmp_path):
    f = str(tmp_path / "a.qcow2")
    qimg("create", "-q", "-f", "qcow2", f, "1M")
    p = lam("commit", f, check=False)
    assert p.returncode == 1
    assert "Image does not have a backing file" in p.stderr


def test_commit_base_not_in_chain(tmp_path):
    base, mid, top = chain(str(tmp_path))
    p = lam("commit", "-b", "nonexist", top, check=False)
    assert p.returncode == 1
    assert "Did not find 'nonexist' in the backing chain" in p.stderr


def test_commit_keeps_top_options(tmp_path):
    base = str(tmp_path / "b.qcow2")
    top = str(tmp_path / "t.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, "8M")
    qimg("create", "-q", "-f", "qcow2", "-o",
         "cluster_size=4k,lazy_refcounts=on,compression_type=zstd,refcount_bits=32",
         "-b", "b.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 3 100k 300k")
    before = jqimg("info", "--output=json", top)
    want = flat(tmp_path, top, "want.raw")
    p = lam("commit", "-p", top, text=False)
    assert p.stdout.endswith(b"    (100.00/100%)\r\nImage committed.\n")
    after = jqimg("info", "--output=json", top)
    for k in ("cluster-size", "format-specific", "virtual-size", "backing-filename",
              "backing-filename-format"):
        assert before[k] == after[k], k
    assert_qemu_clean(top)
    assert_same_content(base, want, "qcow2", "raw")
    assert_same_content(top, want, "qcow2", "raw")
