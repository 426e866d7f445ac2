"""Shared fixtures for integration tests.

Binaries come from $LAMINA_BUILD (default: build/).  Each area keeps its own
helpers in tests/integration/<area>_util.py; this file holds only what every
area needs.
"""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("LAMINA_BUILD", os.path.join(ROOT, "build"))


def binary(name):
    for sub in ("src/tools", "src/daemon"):
        p = os.path.join(BUILD, sub, name)
        if os.path.exists(p):
            return p
    return None


LAMINA_IMG = binary("lamina-img")
LAMINAD = binary("laminad")


def run(cmd, check=True, **kw):
    """Runs a command, returns CompletedProcess with text output."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 300)
    p = subprocess.run(cmd, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.fixture
def lamina_img():
    if not LAMINA_IMG:
        pytest.fail("lamina-img not built")
    return LAMINA_IMG


@pytest.fixture
def laminad():
    if not LAMINAD:
        pytest.fail("laminad not built")
    return LAMINAD


@pytest.fixture
def qemu_img():
    p = shutil.which("qemu-img")
    if not p:
        pytest.fail("qemu-img missing (install qemu-utils)")
    return p


def pytest_collection_modifyitems(config, items):
    """LAMINA_SKIP_QSD=1 drops the cases that run against
    qemu-storage-daemon (the oracle): the sanitizer pass re-runs the suite
    for our binaries, and QSD's cases would only test QSD again."""
    if not os.environ.get("LAMINA_SKIP_QSD"):
        return
    keep = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(v == "qsd" for v in params.values()):
            continue
        keep.append(item)
    items[:] = keep
