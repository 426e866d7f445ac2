"""Backup sync modes on a qcow2 chain (iotest 056 in spirit), with
blockdev-backup and drive-backup, checked with qemu-img compare / map /
info; on laminad and on qemu-storage-daemon."""
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


def qimg(*args, **kw):
    return subprocess.run(["qemu-img"] + list(args), check=True, capture_output=True,
                          text=True, **kw).stdout


@pytest.fixture
def chain(tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    qimg("create", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "write -P 0x11 0 4M")
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -P 0x22 1M 1M", "write -P 0x33 6M 512k")
    return base, top


def allocated_in_top(img):
    m = json.loads(qimg("map", "--output=json", img))
    return sum(e["length"] for e in m if e["depth"] == 0 and e["data"])


def run(flavor, tmp_path, cmd, **args):
    d = start(flavor, tmp_path)
    q = d.qmp
    top = str(tmp_path / "top.qcow2")
    q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "top",
                                "file": {"driver": "file", "filename": top}})
    if "target_node" in args:
        q.cmd("blockdev-add", args=args.pop("target_node"))
    q.cmd(cmd, job_id="b", device="top", **args)
    seq = job_events(q, "b", timeout=60)
    d.stop()
    return seq


@pytest.mark.parametrize("flavor", FLAVORS)
def test_blockdev_backup_top(flavor, tmp_path, chain):
    base, top = chain
    tgt = str(tmp_path / "tgt.qcow2")
    qimg("create", "-f", "qcow2", "-b", base, "-F", "qcow2", tgt)
    seq = run(flavor, tmp_path, "blockdev-backup", sync="top", target="tgt",
              target_node={"driver": "qcow2", "node-name": "tgt",
                           "file": {"driver": "file", "filename": tgt}})
    assert seq[-3:] == ["COMPLETED", "concluded", "null"]
    qimg("compare", top, tgt)
    # Only the top layer's data was copied.
    assert allocated_in_top(tgt) == allocated_in_top(top) == 1536 * 1024
    qimg("check", tgt)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_blockdev_backup_full(flavor, tmp_path, chain):
    _, top = chain
    tgt = str(tmp_path / "tgt.qcow2")
    qimg("create", "-f", "qcow2", tgt, str(SIZE))
    seq = run(flavor, tmp_path, "blockdev-backup", sync="full", target="tgt",
              target_node={"driver": "qcow2", "node-name": "tgt",
                           "file": {"driver": "file", "filename": tgt}})
    assert seq[-3:] == ["COMPLETED", "concluded", "null"]
    qimg("compare", top, tgt)
    qimg("check", tgt)
    # The unwritten second half stays sparse.
    assert allocated_in_top(tgt) <= 5 * MB


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("sync", ["full", "top"])
def test_drive_backup_creates_target(flavor, sync, tmp_path, chain):
    base, top = chain
    tgt = str(tmp_path / "drive.qcow2")
    seq = run(flavor, tmp_path, "drive-backup", sync=sync, target=tgt, format="qcow2")
    assert seq[-3:] == ["COMPLETED", "concluded", "null"]
    info = json.loads(qimg("info", "--output=json", tgt))
    if sync == "top":
        assert info["backing-filename"] == base
        assert allocated_in_top(tgt) == 1536 * 1024
    else:
        assert "backing-filename" not in info
    qimg("compare", top, tgt)
    qimg("check", tgt)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_drive_backup_none_is_backed_by_source(flavor, tmp_path, chain):
    _, top = chain
    tgt = str(tmp_path / "fleece.qcow2")
    d = start(flavor, tmp_path)
    q = d.qmp
    q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "top",
                                "file": {"driver": "file", "filename": top}})
    q.cmd("drive-backup", job_id="b", device="top", sync="none", target=tgt, format="qcow2")
    info = json.loads(qimg("info", "-U", "--output=json", tgt))
    assert info["backing-filename"] == top
    q.cmd("job-cancel", id="b")
    assert job_events(q, "b")[-3:] == ["CANCELLED", "concluded", "null"]
    d.stop()
