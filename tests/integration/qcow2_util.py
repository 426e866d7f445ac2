"""Helpers for the qcow2 integration tests: the qcow2-tool test helper
(tests/unit/qcow2/qcow2-tool.c) and QEMU's tools as oracles."""
import json
import os
import shutil
import subprocess

from conftest import BUILD

TOOL = os.path.join(BUILD, "tests", "unit", "qcow2", "qcow2-tool")


def tool(*args, check=True, timeout=120, **kw):
    p = subprocess.run([TOOL] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"qcow2-tool {args} exited {p.returncode}\n"
                             f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def qemu_img(*args, check=True):
    p = subprocess.run(["qemu-img"] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"qemu-img {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def qemu_io(img, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args + [img], capture_output=True, text=True, timeout=300)
    if p.returncode != 0 or "failed" in p.stdout or "fail" in p.stderr:
        raise AssertionError(f"qemu-io {cmds} failed\n{p.stdout}\n{p.stderr}")
    return p


def qemu_check(img):
    """qemu-img check as a dict; asserts it ran."""
    p = qemu_img("check", "--output=json", img, check=False)
    assert p.returncode in (0, 2, 3), p.stderr
    return json.loads(p.stdout)


def assert_clean(img):
    r = qemu_check(img)
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0 and \
        r.get("check-errors", 0) == 0, r


def to_raw(img, out, fmt="qcow2"):
    qemu_img("convert", "-f", fmt, "-O", "raw", img, out)


def lamina_dump(img, out, *flags):
    tool(*flags, img, f"dump:{out}")


def same_file(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def have_zstd():
    p = subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o",
                        "compression_type=zstd", "/dev/null", "1M"],
                       capture_output=True, text=True)
    return "zstd" not in p.stderr


def have_tools():
    return os.path.exists(TOOL) and shutil.which("qemu-img") and shutil.which("qemu-io")
