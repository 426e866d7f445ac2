"""Backups while a guest writes through an NBD export of the source: the
target must hold exactly the data of the moment the job started.  Checked
with qemu-img compare / check as independent oracles, on laminad and on
qemu-storage-daemon."""
import random
import shutil
import subprocess
import threading

import pytest

from jobs_util import FLAVORS, add_file, job_events, make_file, start

nbd = pytest.importorskip("nbd")

SIZE = 16 << 20


def pattern(off):
    # Leave some 64 KiB blocks zero so that zero detection is exercised.
    return 0 if (off >> 16) % 5 == 0 else ((off >> 16) * 3 + 1) & 0xff


def guest_writes(sock, name, count, seed, errors):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
    rnd = random.Random(seed)
    for i in range(count):
        length = 4096 * rnd.randint(1, 4)
        off = rnd.randrange(0, SIZE - length, 4096)
        try:
            h.pwrite(bytes([0x80 | (i & 0x7f)]) * length, off)
        except nbd.Error as e:
            errors.append(str(e))
    h.flush()
    h.shutdown()


def run_backup(flavor, tmp_path, target_fmt, compress, sync="full"):
    src = str(tmp_path / "src.raw")
    snap = str(tmp_path / "snap.raw")
    tgt = str(tmp_path / f"tgt.{target_fmt}")
    make_file(src, SIZE, pattern)
    shutil.copy(src, snap)
    subprocess.run(["qemu-img", "create", "-q", "-f", target_fmt, tgt, str(SIZE)], check=True)
    d = start(flavor, tmp_path)
    q = d.qmp
    sock = str(tmp_path / "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    add_file(q, "src", src)
    if target_fmt == "raw":
        add_file(q, "tgt", tgt)
    else:
        q.cmd("blockdev-add", args={"driver": target_fmt, "node-name": "tgt",
                                    "file": {"driver": "file", "filename": tgt}})
    # The export exists before the job: it is moved onto the filter.
    q.cmd("block-export-add", type="nbd", id="e0", node_name="src", writable=True)
    q.cmd("blockdev-backup", job_id="b", device="src", target="tgt", sync=sync,
          compress=compress, speed=32 << 20)
    errors = []
    writers = [threading.Thread(target=guest_writes, args=(sock, "src", 800, s, errors))
               for s in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    seq = job_events(q, "b", timeout=60)
    q.cmd("block-export-del", id="e0")
    q.cmd("blockdev-del", node_name="tgt")
    d.stop()
    return seq, errors, src, snap, tgt


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("target_fmt,compress", [("raw", False), ("qcow2", False),
                                                 ("qcow2", True)])
def test_backup_with_concurrent_writes(flavor, target_fmt, compress, tmp_path):
    seq, errors, src, snap, tgt = run_backup(flavor, tmp_path, target_fmt, compress)
    assert errors == []
    assert seq == ["created", "running", "waiting", "pending", "COMPLETED", "concluded", "null"]
    # Point in time: the target equals the source as it was at job start.
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", target_fmt, snap, tgt],
                   check=True)
    # And the guest's writes did reach the source.
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", snap, src])
    assert r.returncode == 1
    if target_fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", tgt], check=True)
        out = subprocess.run(["qemu-img", "check", "--output=json", tgt], check=True,
                             capture_output=True, text=True).stdout
        import json
        info = json.loads(out)
        if compress:
            assert info.get("compressed-clusters", 0) > 0
        # Zero blocks of the source leave the qcow2 target sparse.
        m = json.loads(subprocess.run(["qemu-img", "map", "--output=json", tgt], check=True,
                                      capture_output=True, text=True).stdout)
        if not compress:
            assert any(not e["data"] for e in m), m


@pytest.mark.parametrize("flavor", FLAVORS)
def test_backup_survives_daemon_stop(flavor, tmp_path):
    """Stopping the daemon with a running job cancels it cleanly."""
    src = str(tmp_path / "src.raw")
    tgt = str(tmp_path / "tgt.raw")
    make_file(src, SIZE, pattern)
    make_file(tgt, SIZE)
    d = start(flavor, tmp_path)
    q = d.qmp
    add_file(q, "src", src)
    add_file(q, "tgt", tgt)
    q.cmd("blockdev-backup", job_id="b", device="src", target="tgt", sync="full", speed=1 << 20)
    rc = d.stop()
    assert rc == 0, d.output()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_writer_added_after_start_is_refused(flavor, tmp_path):
    """Writers must go through the filter: a writable export added on the
    source after the job started conflicts with the filter's permissions."""
    src = str(tmp_path / "src.raw")
    tgt = str(tmp_path / "tgt.raw")
    make_file(src, SIZE, pattern)
    make_file(tgt, SIZE)
    d = start(flavor, tmp_path)
    q = d.qmp
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "s")}})
    add_file(q, "src", src)
    add_file(q, "tgt", tgt)
    q.cmd("blockdev-backup", job_id="b", device="src", target="tgt", sync="none",
          filter_node_name="cbw")
    from jobs_util import qmp_error
    cls, desc = qmp_error(q, "block-export-add", type="nbd", id="w", node_name="src",
                          writable=True)
    assert desc == ("Permission conflict on node 'src': permissions 'write' are both "
                    "required by an unnamed block device (uses node 'src' as 'root' child) "
                    "and unshared by node 'cbw' (uses node 'src' as 'file' child).")
    q.cmd("block-export-add", type="nbd", id="r", node_name="src")  # readers are fine
    q.cmd("block-export-del", id="r")
    q.cmd("job-cancel", id="b")
    job_events(q, "b")
    q.cmd("block-export-add", type="nbd", id="w", node_name="src", writable=True)
    d.stop()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_two_backups_of_one_source(flavor, tmp_path):
    """Filters stack: a second backup of the same source works, both see
    their own point in time, and both filters go away in any order."""
    from jobs_util import qmp_error
    src = str(tmp_path / "src.raw")
    snap = str(tmp_path / "snap.raw")
    ta = str(tmp_path / "a.raw")
    tb = str(tmp_path / "b.raw")
    make_file(src, SIZE, pattern)
    shutil.copy(src, snap)
    make_file(ta, SIZE)
    make_file(tb, SIZE)
    d = start(flavor, tmp_path)
    q = d.qmp
    sock = str(tmp_path / "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    add_file(q, "src", src)
    add_file(q, "ta", ta)
    add_file(q, "tb", tb)
    q.cmd("block-export-add", type="nbd", id="e0", node_name="src", writable=True)
    q.cmd("blockdev-backup", job_id="a", device="src", target="ta", sync="none")
    q.cmd("blockdev-backup", job_id="b", device="src", target="tb", sync="full",
          speed=16 << 20)
    assert qmp_error(q, "blockdev-backup", job_id="c", device="src", target="ta",
                     sync="full")[1] == \
        "Node 'ta' is busy: block device is in use by block job: backup"
    errors = []
    guest_writes(sock, "src", 300, 5, errors)
    assert errors == []
    assert job_events(q, "b", timeout=60)[-3:] == ["COMPLETED", "concluded", "null"]
    q.cmd("job-cancel", id="a")
    assert job_events(q, "a")[-3:] == ["CANCELLED", "concluded", "null"]
    names = sorted(n["node-name"] for n in q.cmd("query-named-block-nodes"))
    assert names == ["src", "ta", "tb"]
    guest_writes(sock, "src", 10, 6, errors)  # the export still works
    q.cmd("block-export-del", id="e0")
    d.stop()
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", snap, tb],
                   check=True)
    # a's target has the old data wherever the guest wrote, zeroes elsewhere
    # (checked per 4 KiB, so it holds whatever the copy unit).
    with open(snap, "rb") as s_, open(ta, "rb") as a_:
        s_data, a_data = s_.read(), a_.read()
    for off in range(0, SIZE, 4096):
        blk = a_data[off:off + 4096]
        assert blk == s_data[off:off + 4096] or blk == bytes(4096)
