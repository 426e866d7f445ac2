"""snapshot-access discard (tests/image-fleecing, backup-discard-source in
spirit): discarding through the snapshot export drops the range from the
snapshot -- reads fail, copy-before-write stops for it, the temp data is
released.  On laminad and on qemu-storage-daemon."""
import pytest

from jobs_util import FLAVORS, add_file, make_file, start

nbd = pytest.importorskip("nbd")

SIZE = 4 << 20
C = 65536


@pytest.mark.parametrize("flavor", FLAVORS)
def test_snapshot_discard(flavor, tmp_path):
    src = str(tmp_path / "src.raw")
    tmp = str(tmp_path / "tmp.raw")
    make_file(src, SIZE, lambda off: 0x55)
    make_file(tmp, SIZE)
    d = start(flavor, tmp_path)
    q = d.qmp
    sock = str(tmp_path / "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    add_file(q, "src", src)
    add_file(q, "tmp", tmp, discard="unmap")
    q.cmd("blockdev-add", args={"driver": "copy-before-write", "node-name": "cbw",
                                "file": "src", "target": "tmp"})
    q.cmd("blockdev-add", args={"driver": "snapshot-access", "node-name": "acc",
                                "file": "cbw", "discard": "unmap"})
    q.cmd("block-export-add", type="nbd", id="eg", node_name="cbw", writable=True)
    q.cmd("block-export-add", type="nbd", id="ef", node_name="acc", writable=True)
    g = nbd.NBD()
    g.connect_uri(f"nbd+unix:///cbw?socket={sock}")
    f = nbd.NBD()
    f.connect_uri(f"nbd+unix:///acc?socket={sock}")
    g.pwrite(b"\xaa" * 4096, 2 * C)          # copied to tmp first
    assert f.pread(4096, 2 * C) == b"\x55" * 4096
    f.trim(2 * C, 2 * C)                      # drop clusters 2 and 3
    with pytest.raises(nbd.Error):
        f.pread(512, 2 * C)
    with pytest.raises(nbd.Error):
        f.pread(512, 3 * C + 100)
    g.pwrite(b"\xbb" * 4096, 3 * C)          # no copy-before-write any more
    assert f.pread(4096, 0) == b"\x55" * 4096
    assert f.pread(4096, 4 * C) == b"\x55" * 4096
    with pytest.raises(nbd.Error):
        f.pwrite(b"x" * 512, 0)               # the snapshot is read-only
    g.shutdown()
    f.shutdown()
    q.cmd("block-export-del", id="ef")
    q.cmd("block-export-del", id="eg")
    d.stop()
    with open(tmp, "rb") as t:
        data = t.read()
    assert data[2 * C:4 * C] == bytes(2 * C), "temp data of discarded clusters released"
    with open(src, "rb") as s:
        sd = s.read()
    assert sd[2 * C:2 * C + 4096] == b"\xaa" * 4096 and sd[3 * C:3 * C + 4096] == b"\xbb" * 4096


def test_push_backup_discard_source(tmp_path):
    """Push backup from snapshot-access with discard-source (QEMU 9.1; the
    7.2 oracle lacks it, so laminad only): the target gets the snapshot,
    the fleecing space is released as the copy goes."""
    import os
    import random
    import shutil
    import subprocess
    size = 16 << 20
    src = str(tmp_path / "src.raw")
    snap = str(tmp_path / "snap.raw")
    tmp = str(tmp_path / "tmp.raw")
    tgt = str(tmp_path / "tgt.raw")
    make_file(src, size, lambda off: ((off >> 16) % 251) + 1)
    shutil.copy(src, snap)
    make_file(tmp, size)
    make_file(tgt, size)
    d = start("laminad", tmp_path)
    q = d.qmp
    sock = str(tmp_path / "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    add_file(q, "src", src)
    add_file(q, "tmp", tmp, discard="unmap")
    add_file(q, "tgt", tgt)
    q.cmd("blockdev-add", args={"driver": "copy-before-write", "node-name": "cbw",
                                "file": "src", "target": "tmp"})
    q.cmd("blockdev-add", args={"driver": "snapshot-access", "node-name": "acc",
                                "file": "cbw", "discard": "unmap"})
    q.cmd("block-export-add", type="nbd", id="eg", node_name="cbw", writable=True)
    g = nbd.NBD()
    g.connect_uri(f"nbd+unix:///cbw?socket={sock}")
    rnd = random.Random(3)
    for _ in range(200):   # fill tmp with old data
        g.pwrite(b"\xee" * 4096, rnd.randrange(0, size - 4096, 4096))
    used_before = os.stat(tmp).st_blocks * 512
    q.cmd("blockdev-backup", job_id="push", device="acc", target="tgt", sync="full",
          discard_source=True, speed=16 << 20)
    for _ in range(200):
        g.pwrite(b"\xdd" * 4096, rnd.randrange(0, size - 4096, 4096))
    from jobs_util import job_events
    assert job_events(q, "push", timeout=60)[-3:] == ["COMPLETED", "concluded", "null"]
    g.shutdown()
    used_after = os.stat(tmp).st_blocks * 512
    q.cmd("block-export-del", id="eg")
    d.stop()
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", snap, tgt],
                   check=True)
    assert used_before > 0 and used_after < used_before // 4, (used_before, used_after)
