"""Copy-before-write unit (laminad only).  By default whole target
clusters, as QEMU.  With our x-granularity=4096 a small guest write into a
target without backing file copies only its 4 KiB blocks; an explicit
min-cluster-size wins over it.  The snapshot stays exact either way: read
through snapshot-access and checked byte for byte."""
import pytest

from jobs_util import add_file, make_file, start

nbd = pytest.importorskip("nbd")

SIZE = 4 << 20
C = 65536


def pattern(off):
    return (off // 4096) % 251 + 1


def old_block(off, n):
    return b"".join(bytes([pattern(o)]) * 4096 for o in range(off, off + n, 4096))


def run(tmp_path, cbw_opts):
    src = str(tmp_path / "src.raw")
    tmp = str(tmp_path / "tmp.raw")
    with open(src, "wb") as f:
        f.write(old_block(0, SIZE))
    make_file(tmp, SIZE)
    d = start("laminad", tmp_path)
    q = d.qmp
    sock = str(tmp_path / "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    add_file(q, "src", src)
    add_file(q, "tmp", tmp)
    q.cmd("blockdev-add", args=dict({"driver": "copy-before-write", "node-name": "cbw",
                                     "file": "src", "target": "tmp"}, **cbw_opts))
    q.cmd("blockdev-add", args={"driver": "snapshot-access", "node-name": "acc",
                                "file": "cbw"})
    q.cmd("block-export-add", type="nbd", id="eg", node_name="cbw", writable=True)
    q.cmd("block-export-add", type="nbd", id="ef", node_name="acc")
    g = nbd.NBD()
    g.connect_uri(f"nbd+unix:///cbw?socket={sock}")
    f = nbd.NBD()
    f.connect_uri(f"nbd+unix:///acc?socket={sock}")
    g.pwrite(b"\xaa" * 4096, 2 * C + 8192)      # one block in cluster 2
    g.pwrite(b"\xbb" * 6000, 5 * C + 3000)      # unaligned: blocks 0-2 of cluster 5
    for off in range(0, 8 * C, 4096):           # the snapshot is exact
        assert f.pread(4096, off) == old_block(off, 4096), off
    g.shutdown()
    f.shutdown()
    q.cmd("block-export-del", id="ef")
    q.cmd("block-export-del", id="eg")
    d.stop()
    with open(tmp, "rb") as t:
        return t.read()


def test_default_copies_whole_clusters(tmp_path):
    data = run(tmp_path, {})
    assert data[2 * C:3 * C] == old_block(2 * C, C)
    assert data[5 * C:6 * C] == old_block(5 * C, C)


def test_small_write_copies_only_its_blocks(tmp_path):
    data = run(tmp_path, {"x-granularity": 4096})
    c2 = data[2 * C:3 * C]
    assert c2[8192:12288] == old_block(2 * C + 8192, 4096)
    assert c2[:8192] == bytes(8192) and c2[12288:] == bytes(C - 12288)
    c5 = data[5 * C:6 * C]
    assert c5[:12288] == old_block(5 * C, 12288)
    assert c5[12288:] == bytes(C - 12288)


def test_min_cluster_size_copies_whole_clusters(tmp_path):
    data = run(tmp_path, {"min-cluster-size": C, "x-granularity": 4096})
    assert data[2 * C:3 * C] == old_block(2 * C, C)
    assert data[5 * C:6 * C] == old_block(5 * C, C)
