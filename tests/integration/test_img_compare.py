"""lamina-img compare: messages and exit codes as qemu-img's."""
import pytest

from img_util import chain, lam, mixed_qcow2, qimg, qio, raw_with_holes


def both(*args):
    a = lam("compare", *args, check=False)
    b = qimg("compare", *args, check=False)
    assert (a.returncode, a.stdout) == (b.returncode, b.stdout), (a.stderr, b.stderr)
    return a


def test_identical_formats(tmp_path):
    q = mixed_qcow2(str(tmp_path / "a.qcow2"))
    r = str(tmp_path / "a.raw")
    qimg("convert", "-O", "raw", q, r)
    p = both(q, r)
    assert p.returncode == 0 and p.stdout == "Images are identical.\n"
    both("-f", "qcow2", "-F", "raw", q, r)


def test_mismatch_offset(tmp_path):
    q = mixed_qcow2(str(tmp_path / "a.qcow2"))
    r = str(tmp_path / "a.raw")
    qimg("convert", "-O", "raw", q, r)
    qio(r, "write -P 0x99 9437696 1", fmt="raw")
    p = both(q, r)
    assert p.returncode == 1
    assert p.stdout == "Content mismatch at offset 9437696!\n"


def test_chain_vs_flat(tmp_path):
    base, mid, top = chain(str(tmp_path))
    flat = str(tmp_path / "flat.qcow2")
    qimg("convert", "-O", "qcow2", top, flat)
    assert both(top, flat).returncode == 0
    assert both(mid, flat).returncode == 1


def test_strict(tmp_path):
    q = mixed_qcow2(str(tmp_path / "a.qcow2"))
    r = str(tmp_path / "a.raw")
    qimg("convert", "-O", "raw", q, r)
    p = both("-s", q, r)
    assert p.returncode == 1
    assert "block status mismatch" in p.stdout
    assert both("-s", q, q).returncode == 0


def test_size_mismatch(tmp_path):
    a = str(tmp_path / "a.qcow2")
    b = str(tmp_path / "b.qcow2")
    qimg("create", "-q", "-f", "qcow2", a, "4M")
    qimg("create", "-q", "-f", "qcow2", b, "8M")
    qio(a, "write -P 1 0 64k")
    qio(b, "write -P 1 0 64k")
    p = both(a, b)
    assert p.returncode == 0
    assert "Warning: Image size mismatch!" in p.stdout
    qio(b, "write -P 2 6M 512")
    p = both(a, b)
    assert p.returncode == 1
    assert "Content mismatch at offset 6291456!" in p.stdout
    assert both("-s", a, b).returncode == 1


def test_progress(tmp_path):
    q = mixed_qcow2(str(tmp_path / "a.qcow2"))
    p = lam("compare", "-p", q, q, text=False)
    assert b"    (0.00/100%)\r" in p.stdout
    assert p.stdout.endswith(b"    (100.00/100%)\rImages are identical.\n\n")


def test_error_exit_2(tmp_path):
    q = mixed_qcow2(str(tmp_path / "a.qcow2"))
    p = lam("compare", q, tmp_path / "nope", check=False)
    assert p.returncode == 2
    assert "Could not open" in p.stderr
