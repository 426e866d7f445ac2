"""lamina-img create vs qemu-img create."""
import os

import pytest

from img_util import assert_qemu_clean, jqimg, lam, qimg


@pytest.mark.parametrize("fmt,opts,size", [
    ("raw", None, "10M"),
    ("raw", "preallocation=falloc", "1M"),
    ("raw", None, "1.5M"),
    ("raw", None, "1000000"),
    ("qcow2", None, "1000000"),
    ("qcow2", None, "64M"),
    ("qcow2", "cluster_size=4k,compat=0.10,refcount_bits=16", "1G"),
    ("qcow2", "compression_type=zstd,lazy_refcounts=on", "1G"),
    ("qcow2", "preallocation=metadata,cluster_size=512k", "16M"),
    ("qcow2", "refcount_bits=8", "3G"),
    ("qcow2", "preallocation=falloc", "8M"),
    ("qcow2", "preallocation=full,cluster_size=4k", "4M"),
    ("raw", "preallocation=full", "2M"),
])
def test_create_matches_qemu(tmp_path, fmt, opts, size):
    ours, theirs = tmp_path / f"l.{fmt}", tmp_path / f"q.{fmt}"
    extra = ["-o", opts] if opts else []
    p = lam("create", "-f", fmt, *extra, ours, size)
    q = qimg("create", "-f", fmt, *extra, theirs, size)
    assert p.stdout.replace(str(ours), "X") == q.stdout.replace(str(theirs), "X")
    a, b = jqimg("info", "--output=json", ours), jqimg("info", "--output=json", theirs)
    for k in ("virtual-size", "format", "cluster-size", "format-specific", "dirty-flag"):
        assert a.get(k) == b.get(k), k
    if fmt == "qcow2":
        assert_qemu_clean(ours)
    p = qimg("compare", ours, theirs, check=False)
    assert p.returncode == 0


def test_backing_without_format_is_error(tmp_path):
    base = tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "1M")
    p = lam("create", "-f", "qcow2", "-b", "b.qcow2", tmp_path / "o.qcow2", check=False)
    assert p.returncode == 1
    assert "Backing file specified without backing format" in p.stderr
    assert "Detected format of qcow2." in p.stderr
    assert not (tmp_path / "o.qcow2").exists()


def test_backing_size_taken_from_backing(tmp_path):
    base = tmp_path / "b.qcow2"
    qimg("create", "-q", "-f", "qcow2", base, "7M")
    top = tmp_path / "t.qcow2"
    p = lam("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top)
    assert "backing_file=b.qcow2 backing_fmt=qcow2" in p.stdout
    info = jqimg("info", "--output=json", top)
    assert info["virtual-size"] == 7 << 20
    assert info["backing-filename"] == "b.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert_qemu_clean(top)


def test_backing_missing(tmp_path):
    p = lam("create", "-f", "qcow2", "-b", "nope.qcow2", "-F", "qcow2",
            tmp_path / "t.qcow2", check=False)
    assert p.returncode == 1
    assert "Could not open backing image." in p.stderr
    # -u: the backing file is not opened, a size is needed.
    p = lam("create", "-f", "qcow2", "-u", "-b", "nope.qcow2", "-F", "qcow2",
            tmp_path / "t.qcow2", "1M")
    assert jqimg("info", "--output=json", tmp_path / "t.qcow2")["backing-filename"] == "nope.qcow2"


def test_backing_via_o(tmp_path):
    qimg("create", "-q", "-f", "qcow2", tmp_path / "b.qcow2", "2M")
    lam("create", "-f", "qcow2", "-o", "backing_file=b.qcow2,backing_fmt=qcow2",
        tmp_path / "t.qcow2")
    assert jqimg("info", "--output=json", tmp_path / "t.qcow2")["virtual-size"] == 2 << 20


@pytest.mark.parametrize("args,msg", [
    (["-f", "qcow2", "{f}"], "Image creation needs a size parameter"),
    (["-f", "qcow2", "{f}", "1Q"], "Invalid image size specified"),
    (["-f", "foo", "{f}", "1M"], "Unknown file format 'foo'"),
    (["-f", "qcow2", "-o", "foo=bar", "{f}", "1M"], "Invalid parameter 'foo'"),
    (["-f", "raw", "-o", "cluster_size=4k", "{f}", "1M"], "Invalid parameter 'cluster_size'"),
    (["-f", "qcow2", "-o", "cluster_size=3000", "{f}", "1M"], "Cluster size"),
])
def test_create_errors(tmp_path, args, msg):
    f = str(tmp_path / "x.img")
    p = lam("create", *[a.format(f=f) for a in args], check=False)
    assert p.returncode == 1
    assert msg in p.stderr
    assert p.stderr.startswith("lamina-img: ")


def test_create_unwritable_dir(tmp_path):
    p = lam("create", "-f", "raw", "/nonexistent-dir/x.raw", "1M", check=False)
    assert p.returncode == 1
    assert "lamina-img: /nonexistent-dir/x.raw: " in p.stderr


def test_quiet(tmp_path):
    p = lam("create", "-q", "-f", "qcow2", tmp_path / "x.qcow2", "1M")
    assert p.stdout == ""
    assert os.path.exists(tmp_path / "x.qcow2")


def test_convert_odd_size(tmp_path):
    src = tmp_path / "odd.raw"
    src.write_bytes(os.urandom(1000000))
    for flags in ([], ["-c"], ["-W", "-m", "3"]):
        dst = tmp_path / "odd.qcow2"
        if dst.exists():
            dst.unlink()
        lam("convert", *flags, "-f", "raw", "-O", "qcow2", src, dst)
        assert_qemu_clean(dst)
        assert jqimg("info", "--output=json", dst)["virtual-size"] == 1000448
        p = qimg("compare", "-f", "raw", src, dst, check=False)
        assert p.returncode == 0, p.stdout


def test_o_list_comma_escape_and_repeat(tmp_path):
    qimg("create", "-q", "-f", "qcow2", tmp_path / "a,b.qcow2", "3M")
    f = tmp_path / "t.qcow2"
    p = lam("create", "-f", "qcow2", "-o", "backing_file=a,,b.qcow2",
            "-o", "backing_fmt=qcow2,cluster_size=4k", f)
    assert "backing_file=a,b.qcow2 backing_fmt=qcow2" in p.stdout
    info = jqimg("info", "--output=json", f)
    assert info["backing-filename"] == "a,b.qcow2"
    assert info["cluster-size"] == 4096
    assert info["virtual-size"] == 3 << 20


@pytest.mark.parametrize("size,expect", [("512", 512), ("1k", 1024), ("2K", 2048),
                                         ("1.5G", 3 << 29), ("1T", 1 << 40),
                                         ("100b", 512)])
def test_size_suffixes(tmp_path, size, expect):
    f = tmp_path / "x.raw"
    lam("create", "-q", "-f", "raw", f, size)
    assert jqimg("info", "--output=json", "-f", "raw", f)["virtual-size"] == expect


def test_o_help():
    p = lam("create", "-f", "qcow2", "-o", "help", "x")
    assert "cluster_size=<size>" in p.stdout
    assert "refcount_bits=<num>" in p.stdout
