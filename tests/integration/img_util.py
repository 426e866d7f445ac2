"""Helpers for the lamina-img integration tests: qemu-img as oracle, image
builders, and a tiny qcow2 header/refcount patcher to make damaged images."""
import json
import os
import shutil
import struct
import subprocess

from conftest import LAMINA_IMG, run

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"


_qcow2_ok = None


def need_qcow2():
    """Skips the calling test when this build has no qcow2 driver (the
    driver lands on main separately); with the driver every test runs."""
    global _qcow2_ok
    if _qcow2_ok is None:
        import tempfile
        import pytest  # noqa: F401
        with tempfile.TemporaryDirectory() as td:
            p = run([LAMINA_IMG, "create", "-q", "-f", "qcow2",
                     os.path.join(td, "probe.qcow2"), "1M"], check=False)
            _qcow2_ok = "Unknown file format" not in p.stderr
    if not _qcow2_ok:
        import pytest
        pytest.skip("lamina-img built without the qcow2 driver")


def _uses_qcow2(args):
    return any(str(a) == "qcow2" or str(a).endswith(".qcow2") for a in args)


def lam(*args, check=True, **kw):
    if _uses_qcow2(args):
        need_qcow2()
    return run([LAMINA_IMG] + [str(a) for a in args], check=check, **kw)


def qimg(*args, check=True, **kw):
    if _uses_qcow2(args):
        need_qcow2()
    return run([QEMU_IMG] + [str(a) for a in args], check=check, **kw)


def qio(img, *cmds, fmt="qcow2"):
    if fmt == "qcow2":
        need_qcow2()
    argv = [QEMU_IO, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    run(argv + [str(img)])


def jlam(*args, **kw):
    return json.loads(lam(*args, **kw).stdout)


def jqimg(*args, **kw):
    return json.loads(qimg(*args, **kw).stdout)


def qcow2_header(path):
    with open(path, "rb") as f:
        h = f.read(104)
    (magic, version, bf_off, bf_size, cluster_bits, size, crypt, l1_size,
     l1_off, rt_off, rt_clusters) = struct.unpack(">IIQIIQIIQQI", h[:60])
    return dict(version=version, cluster_bits=cluster_bits, size=size,
                l1_size=l1_size, l1_off=l1_off, rt_off=rt_off,
                rt_clusters=rt_clusters, cluster_size=1 << cluster_bits)


def set_refcount(path, cluster_index, value):
    """Overwrites the 16-bit refcount of a host cluster (default refcount
    width).  The refcount block covering it must already exist."""
    h = qcow2_header(path)
    cs = h["cluster_size"]
    per_block = cs // 2
    with open(path, "r+b") as f:
        f.seek(h["rt_off"] + 8 * (cluster_index // per_block))
        rb = struct.unpack(">Q", f.read(8))[0]
        assert rb, "no refcount block for that cluster"
        f.seek(rb + 2 * (cluster_index % per_block))
        f.write(struct.pack(">H", value))


def make_leak(path):
    """Appends one cluster to the file and gives it refcount 1: a leak."""
    h = qcow2_header(path)
    cs = h["cluster_size"]
    size = os.path.getsize(path)
    idx = (size + cs - 1) // cs
    with open(path, "r+b") as f:
        f.truncate((idx + 1) * cs)
    set_refcount(path, idx, 1)
    return idx


def make_corruption(path):
    """Drops the refcount of the first L2 table's... simpler: of the L1
    table's cluster to 0, which check reports as an error."""
    h = qcow2_header(path)
    set_refcount(path, h["l1_off"] // h["cluster_size"], 0)


def write_pattern_file(path, size, seed=1):
    """Non-zero, non-repeating-per-cluster data."""
    import random
    r = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(r.randbytes(n))
            left -= n


def mixed_qcow2(path, size="64M", extra_opts=None):
    """qcow2 with data, zero clusters, a partial cluster and unallocated
    space, written by qemu-io."""
    args = ["create", "-q", "-f", "qcow2"]
    if extra_opts:
        args += ["-o", extra_opts]
    qimg(*args, path, size)
    qio(path, "write -P 0x11 0 1M", "write -z 2M 1M", "write -P 0x22 5M 64k",
        "write -P 0x33 9M 4k", "write -P 0x44 20M 3M")
    return path


def chain(tmp):
    """base.qcow2 <- mid.qcow2 <- top.qcow2 with overlapping writes."""
    base = os.path.join(tmp, "base.qcow2")
    mid = os.path.join(tmp, "mid.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    mixed_qcow2(base)
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qio(mid, "write -P 0x55 512k 1M", "write -z 5M 64k", "write -P 0x66 30M 1M")
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    qio(top, "write -P 0x77 0 64k", "write -z 20M 1M", "write -P 0x88 40M 128k")
    return base, mid, top


def raw_with_holes(path, size=16 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(b"\x5a" * 65536)
        f.seek(7 << 20)
        f.write(os.urandom(3 << 20))
    return path


def assert_qemu_clean(path, fmt="qcow2"):
    p = qimg("check", "-f", fmt, path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "No errors were found" in p.stdout


def assert_same_content(a, b, fa=None, fb=None):
    args = ["compare"]
    if fa:
        args += ["-f", fa]
    if fb:
        args += ["-F", fb]
    p = qimg(*args, a, b, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
