"""Helpers for the job, backup and fleecing integration tests.

Every test runs against laminad and, as the oracle, qemu-storage-daemon
(flavor "qsd"): the same QMP conversation must give the same answers.
A laminad run is skipped while the daemon or the QMP layer is not built.
"""
import atexit
import json
import os
import signal
import time

import pytest

try:
    from qmp_util import Daemon, QMPError  # noqa: F401  (re-exported)
except ImportError:  # the QMP layer's helpers are not on this branch yet
    Daemon = None
    QMPError = Exception

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("LAMINA_BUILD", os.path.join(ROOT, "build"))
LAMINAD = os.path.join(BUILD, "src", "daemon", "laminad")

FLAVORS = ["laminad", "qsd"]


def start(flavor, tmpdir, args=()):
    if Daemon is None:
        pytest.skip("qmp_util (QMP layer) not available")
    if flavor == "laminad" and not os.path.exists(os.environ.get("LAMINAD", LAMINAD)):
        pytest.skip("laminad not built")
    d = Daemon(list(args), tmpdir, flavor=flavor)
    # A failing test must not leave its daemon behind.
    atexit.register(_reap, d)
    if flavor == "laminad":
        names = {c["name"] for c in d.qmp.cmd("query-commands")}
        if "blockdev-backup" not in names:
            d.stop()
            pytest.skip("laminad without job commands")
    return d


def _reap(d):
    if d.proc.poll() is None:
        try:
            d.stop(signal.SIGKILL, timeout=5)
        except Exception:
            pass


def make_file(path, size, pattern=None):
    """Creates a file; pattern(off) -> byte fills it in 64 KiB blocks."""
    with open(path, "wb") as f:
        f.truncate(size)
        if pattern is not None:
            for off in range(0, size, 65536):
                b = pattern(off)
                if b:  # zero blocks stay holes
                    f.seek(off)
                    f.write(bytes([b]) * 65536)


def add_file(q, name, path, **extra):
    opts = {"driver": "file", "node-name": name, "filename": path}
    opts.update(extra)
    q.cmd("blockdev-add", args=opts)


def job_events(q, job_id, until=("null",), timeout=30, extra_stop=None):
    """Collects JOB_STATUS_CHANGE statuses and BLOCK_JOB_* names of job_id
    until a status in `until` (or an event named extra_stop) arrives.
    Spurious paused/running pairs (drains) are dropped: QEMU emits them
    around every drained section and clients must tolerate them."""
    seq = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in q.events(timeout=0.2):
            data = ev.get("data", {})
            name = ev["event"]
            if name == "JOB_STATUS_CHANGE" and data.get("id") == job_id:
                seq.append(data["status"])
            elif name.startswith("BLOCK_JOB_") and job_id in (data.get("device"), data.get("id")):
                seq.append(name[len("BLOCK_JOB_"):])
            else:
                continue
            if seq[-1] in until or seq[-1] == extra_stop:
                return normalize(seq)
    raise TimeoutError(f"job {job_id}: saw {seq}")


def normalize(seq):
    out = []
    for s in seq:
        if s == "running" and out and out[-1] == "paused" and "running" in out[:-1]:
            out.pop()  # a paused/running pair from a drain
            continue
        out.append(s)
    return out


def wait_status(q, job_id, status, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for j in q.cmd("query-jobs"):
            if j["id"] == job_id and j["status"] == status:
                return j
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} never reached {status}: {q.cmd('query-jobs')}")


def qmp_error(q, name, **kw):
    try:
        q.cmd(name, **kw)
    except QMPError as e:
        return e.cls, e.desc
    raise AssertionError(f"{name} {kw} unexpectedly succeeded")


def dumps(o):
    return json.dumps(o)
