"""Malformed qcow2 images: each gives a clear error naming the file and
the reason; nothing crashes, hangs or allocates without bound."""
import os
import resource
import subprocess
import sys

import pytest

from qcow2_util import TOOL, have_tools

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "malformed"))
import gen_qcow2  # noqa: E402

pytestmark = pytest.mark.skipif(not have_tools(), reason="qcow2-tool or QEMU missing")

_CASES = {}


def cases(tmp_dir):
    if "list" not in _CASES:
        _CASES["list"] = gen_qcow2.make_all(tmp_dir)
    return _CASES["list"]


@pytest.fixture(scope="module")
def all_cases(tmp_path_factory):
    return cases(str(tmp_path_factory.mktemp("malformed")))


def limit_memory():
    # 1 GiB of address space: a bogus size read from disk must not be
    # allocated.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _sanitized(binary):
    """ASan reserves terabytes of shadow address space, so RLIMIT_AS can't
    be used; its own allocation cap does the same job there."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "libasan" in out


def run_case(path, flags, ops):
    if _sanitized(TOOL):
        env = dict(os.environ)
        env["ASAN_OPTIONS"] = "max_allocation_size_mb=1024:allocator_may_return_null=1:detect_leaks=1"
        return subprocess.run([TOOL] + flags + [path] + ops, capture_output=True, text=True,
                              timeout=60, env=env)
    return subprocess.run([TOOL] + flags + [path] + ops, capture_output=True, text=True,
                          timeout=30, preexec_fn=limit_memory)


def test_enough_cases(all_cases):
    assert len(all_cases) >= 25


@pytest.mark.parametrize("idx", range(48))
def test_malformed(all_cases, idx):
    if idx >= len(all_cases):
        pytest.skip("no such case")
    name, path, flags, ops, msg = all_cases[idx]
    p = run_case(path, flags, ops)
    assert p.returncode == 1, (name, p.returncode, p.stderr)   # error, no crash
    assert msg in p.stderr, (name, p.stderr)
    if msg != "Input/output error":
        assert os.path.basename(path) in p.stderr, (name, p.stderr)


def test_corrupt_image_opens_read_only(all_cases):
    path = [c for c in all_cases if c[0] == "corrupt-bit-rw"][0][1]
    p = run_case(path, ["-r"], ["read:1M:4096:0x5a", "info"])
    assert p.returncode == 0, p.stderr
    assert '"corrupt": true' in p.stdout


def test_runtime_corruption_marks_image(all_cases, tmp_path):
    base = os.path.join(os.path.dirname(all_cases[0][1]), "base.qcow2")
    path = str(tmp_path / "fresh.qcow2")
    gen_qcow2.patch(base, path, gen_qcow2.l2_entry_offset(base, 16), ">Q",
                    (1 << 63) | (1 << 45))
    p = run_case(path, [], ["read:1M:4096:0x5a"])
    assert "Marking image '%s' as corrupt" % path in p.stderr
    p = run_case(path, [], ["info"])
    assert p.returncode == 1 and "Image is corrupt; cannot be opened read/write" in p.stderr
    p = run_case(path, ["-r"], ["info"])
    assert p.returncode == 0 and '"corrupt": true' in p.stdout
    q = subprocess.run(["qemu-img", "info", path], capture_output=True, text=True)
    assert "corrupt: true" in q.stdout


def test_snapshot_image_reads(all_cases):
    path = [c for c in all_cases if c[0] == "snapshot-rw"][0][1]
    p = run_case(path, ["-r"], ["read:1M:65536:0x5a", "check"])
    assert p.returncode == 0, p.stderr
