"""Backup with x-perf use-copy-range (copy offload) on a qcow2 chain: the
data of the top layer goes file to file in the kernel, backing data and
zeroes fall back to read + write.  Checked with qemu-img compare / check /
map; on laminad and on qemu-storage-daemon."""
import json
import subprocess

import pytest

from jobs_util import FLAVORS, job_events, start

MB = 1 << 20
SIZE = 8 * MB


def qemu_io(img, *cmds):
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args + [img], check=True, capture_output=True)


def qimg(*args):
    return subprocess.run(["qemu-img"] + list(args), check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def chain(tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qimg("create", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "write -P 0x11 0 4M")
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    # Top data first in the disk so the first chunk offloads; a partial
    # cluster and a zeroed range exercise the fallbacks.
    qemu_io(top, "write -P 0x22 0 2M", "write -P 0x33 6M 100k",
            "write -z 7M 512k")
    return base, top


def backup(flavor, tmp_path, sync, tgt, chunk):
    d = start(flavor, tmp_path)
    q = d.qmp
    top = str(tmp_path / "top.qcow2")
    q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "top",
                                "file": {"driver": "file", "filename": top}})
    q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "tgt",
                                "file": {"driver": "file", "filename": tgt}})
    q.cmd("blockdev-backup", job_id="b", device="top", target="tgt", sync=sync,
          **{"x-perf": {"use-copy-range": True, "max-chunk": chunk}})
    seq = job_events(q, "b", timeout=60)
    d.stop()
    return seq


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("chunk", [65536, 4 * MB])
def test_copy_range_full(flavor, tmp_path, chain, chunk):
    _, top = chain
    tgt = str(tmp_path / "tgt.qcow2")
    qimg("create", "-f", "qcow2", tgt, str(SIZE))
    seq = backup(flavor, tmp_path, "full", tgt, chunk)
    assert seq[-3:] == ["COMPLETED", "concluded", "null"]
    qimg("compare", top, tgt)
    qimg("check", tgt)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_copy_range_top(flavor, tmp_path, chain):
    base, top = chain
    tgt = str(tmp_path / "tgt.qcow2")
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", tgt)
    seq = backup(flavor, tmp_path, "top", tgt, 0)
    assert seq[-3:] == ["COMPLETED", "concluded", "null"]
    qimg("compare", top, tgt)
    qimg("check", tgt)
    m = json.loads(qimg("map", "--output=json", tgt))
    top_data = sum(e["length"] for e in m if e["depth"] == 0 and e["data"])
    # The 2 MiB and the 100k write (one cluster); no backing data copied.
    assert top_data == 2 * MB + 65536 * 2
