"""lamina-img dd against qemu-img dd."""
import pytest

from img_util import assert_qemu_clean, assert_same_content, jqimg, lam, mixed_qcow2, qimg


@pytest.mark.parametrize("ops,fmt", [
    ([], "raw"),
    (["bs=1M"], "raw"),
    (["bs=64k", "count=10", "skip=2"], "qcow2"),
    (["bs=4k", "count=5000"], "qcow2"),
    (["bs=3M", "skip=2"], "raw"),
    (["bs=3M", "skip=50"], "raw"),
])
def test_dd_matches_qemu(tmp_path, ops, fmt):
    src = mixed_qcow2(str(tmp_path / "s.qcow2"))
    ours, theirs = str(tmp_path / f"l.{fmt}"), str(tmp_path / f"q.{fmt}")
    a = lam("dd", "-O", fmt, *ops, f"if={src}", f"of={ours}")
    b = qimg("dd", "-O", fmt, *ops, f"if={src}", f"of={theirs}")
    assert a.returncode == b.returncode
    assert (a.stderr == "") == (b.stderr == "")
    assert jqimg("info", "--output=json", "-f", fmt, ours)["virtual-size"] == \
        jqimg("info", "--output=json", "-f", fmt, theirs)["virtual-size"]
    assert_same_content(ours, theirs, fmt, fmt)
    if fmt == "qcow2":
        assert_qemu_clean(ours)


@pytest.mark.parametrize("args,msg", [
    (["if=x"], "Must specify both input and output files"),
    (["bs=1x", "if=a", "of=b"], "Invalid bs specified"),
    (["foo=1", "if=a", "of=b"], "unrecognized operand"),
])
def test_dd_errors(args, msg):
    p = lam("dd", *args, check=False)
    assert p.returncode == 1
    assert msg in p.stderr
