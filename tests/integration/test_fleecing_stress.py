"""Fleecing under load: thousands of small overlapping random guest writes
through an NBD export of the live disk while readers read the fleecing
export; every byte read must be the point-in-time data.

Two layouts (tests/image-fleecing): classic (temp qcow2 backed by the
source, backup sync=none) and copy-before-write + snapshot-access.  The
control run sets LAMINA_DEBUG_NO_FLEECING_GUARD=1 (laminad only): without
the guard (driver.h "Backing fall-through reads": the temp image re-checks
reads that fell through to the source) the classic layout must show
mismatches, proving the stress test can see the race of seed 001.
"""
import os
import random
import subprocess
import threading

import pytest

from jobs_util import FLAVORS, add_file, job_events, make_file, start

nbd = pytest.importorskip("nbd")

SIZE = 4 << 20
WRITES_PER_THREAD = 1500


def pattern(off):
    return ((off >> 16) * 13 + 7) & 0xff


def expected(off, n):
    out = bytearray()
    pos = off
    while pos < off + n:
        blk_end = (pos // 65536 + 1) * 65536
        take = min(blk_end, off + n) - pos
        out += bytes([pattern(pos)]) * take
        pos += take
    return bytes(out)


def connect(sock, name):
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{name}?socket={sock}")
    return h


def stress(sock, guest, fleece, seed=1):
    """Returns (mismatching reads, reads done, write errors)."""
    stop = threading.Event()
    result = {"bad": 0, "reads": 0, "werr": 0, "rerr": 0}
    lock = threading.Lock()

    def writer(n):
        h = connect(sock, guest)
        rnd = random.Random(seed * 100 + n)
        for i in range(WRITES_PER_THREAD):
            length = 512 * rnd.randint(1, 16)
            off = rnd.randrange(0, SIZE - length, 512)
            try:
                h.pwrite(bytes([0xA0 | (i & 0xf)]) * length, off)
            except nbd.Error:
                with lock:
                    result["werr"] += 1
        h.shutdown()

    def reader(n):
        h = connect(sock, fleece)
        rnd = random.Random(seed * 1000 + n)
        while not stop.is_set():
            length = 4096 * rnd.randint(1, 16)
            off = rnd.randrange(0, SIZE - length, 512)
            try:
                data = h.pread(length, off)
            except nbd.Error:
                with lock:
                    result["rerr"] += 1
                continue
            with lock:
                result["reads"] += 1
                if data != expected(off, length):
                    result["bad"] += 1
        h.shutdown()

    readers = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    # A final full read of the snapshot.
    h = connect(sock, fleece)
    for off in range(0, SIZE, 1 << 20):
        if h.pread(1 << 20, off) != expected(off, 1 << 20):
            result["bad"] += 1
    h.shutdown()
    return result


def start_with_env(flavor, tmp_path, env):
    """Starts a daemon with extra environment (the debug switches)."""
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        return start(flavor, tmp_path)
    finally:
        os.environ.clear()
        os.environ.update(old)


def classic(flavor, tmp_path, env=None, slow_backing=False, export_first=False):
    src = str(tmp_path / "src.raw")
    tmp = str(tmp_path / "tmp.qcow2")
    make_file(src, SIZE, pattern)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, str(SIZE)], check=True)
    d = start_with_env(flavor, tmp_path, env)
    q = d.qmp
    sock = str(tmp_path / "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    add_file(q, "src", src)
    if export_first:
        # QSD's usual order: the guest's writable export exists first and
        # is moved onto the filter when the job starts.
        q.cmd("block-export-add", args={"type": "nbd", "id": "eg", "node-name": "src",
                                        "name": "guest", "writable": True})
    backing = "src"
    if slow_backing:
        # Widens the window between "cluster unallocated" and the backing
        # read (laminad's blkdebug x-read-delay-us).
        q.cmd("blockdev-add", args={"driver": "blkdebug", "node-name": "slow",
                                    "image": "src", "x-read-delay-us": 300,
                                    "read-only": True})
        backing = "slow"
    q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "tmp",
                                "file": {"driver": "file", "filename": tmp},
                                "backing": backing})
    q.cmd("blockdev-backup", job_id="fleece", device="src", target="tmp", sync="none",
          filter_node_name="guest")
    if not export_first:
        q.cmd("block-export-add", type="nbd", id="eg", node_name="guest", writable=True)
    q.cmd("block-export-add", type="nbd", id="ef", node_name="tmp")
    res = stress(sock, "guest", "tmp")
    q.cmd("block-export-del", id="ef")
    q.cmd("block-export-del", id="eg")
    q.cmd("job-cancel", id="fleece")
    seq = job_events(q, "fleece")
    q.cmd("blockdev-del", node_name="tmp")
    if slow_backing:
        q.cmd("blockdev-del", node_name="slow")
    d.stop()
    return res, seq


@pytest.mark.parametrize("flavor,slow,export_first",
                         [(f, False, False) for f in FLAVORS] +
                         [(f, False, True) for f in FLAVORS] + [("laminad", True, False)])
def test_classic_fleecing_stress(flavor, slow, export_first, tmp_path):
    res, seq = classic(flavor, tmp_path, slow_backing=slow, export_first=export_first)
    assert res["werr"] == 0 and res["rerr"] == 0, res
    assert res["reads"] > 100, res
    assert res["bad"] == 0, res
    assert seq[-4:] == ["aborting", "CANCELLED", "concluded", "null"]


def test_classic_fleecing_without_guard_fails(tmp_path):
    """The control: the same stress with laminad's fleecing guard switched
    off (debug switch: no re-check of reads that fell through to the
    source, no serialising copies) sees new data through the fleecing
    export, so the stress test catches the race of seed 001."""
    worst = None
    for attempt in range(6):
        sub = tmp_path / f"run{attempt}"
        sub.mkdir()
        res, _ = classic("laminad", sub, env={"LAMINA_DEBUG_NO_FLEECING_GUARD": "1"},
                         slow_backing=True)
        worst = res
        if res["bad"] > 0:
            break
    print(f"guard off: {worst}")
    assert worst["bad"] > 0, f"race not observed without the guard: {worst}"


def modern(flavor, tmp_path, env=None, slow_source=False):
    src = str(tmp_path / "src.raw")
    tmp = str(tmp_path / "tmp.raw")
    make_file(src, SIZE, pattern)
    make_file(tmp, SIZE)
    d = start_with_env(flavor, tmp_path, env)
    q = d.qmp
    sock = str(tmp_path / "nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    add_file(q, "src", src)
    add_file(q, "tmp", tmp)
    source = "src"
    if slow_source:
        # Snapshot reads of not yet copied regions read the source: widen
        # the window in which a guest write can overtake them.
        q.cmd("blockdev-add", args={"driver": "blkdebug", "node-name": "slow",
                                    "image": "src", "x-read-delay-us": 300})
        source = "slow"
    q.cmd("blockdev-add", args={"driver": "copy-before-write", "node-name": "cbw",
                                "file": source, "target": "tmp"})
    q.cmd("blockdev-add", args={"driver": "snapshot-access", "node-name": "acc",
                                "file": "cbw"})
    q.cmd("block-export-add", type="nbd", id="eg", node_name="cbw", writable=True)
    q.cmd("block-export-add", type="nbd", id="ef", node_name="acc")
    res = stress(sock, "cbw", "acc", seed=7)
    return d, q, sock, res


@pytest.mark.parametrize("flavor,slow", [(f, False) for f in FLAVORS] + [("laminad", True)])
def test_snapshot_access_fleecing_stress(flavor, slow, tmp_path):
    d, q, sock, res = modern(flavor, tmp_path, slow_source=slow)
    assert res["werr"] == 0 and res["rerr"] == 0, res
    assert res["reads"] > 100 and res["bad"] == 0, res
    # The live disk has the new data.
    h = connect(sock, "cbw")
    changed = sum(h.pread(65536, off) != expected(off, 65536) for off in range(0, SIZE, 65536))
    h.shutdown()
    assert changed > 0
    h = connect(sock, "acc")
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    h.shutdown()
    q.cmd("block-export-del", id="ef")
    q.cmd("block-export-del", id="eg")
    d.stop()


def test_snapshot_access_without_guard_fails(tmp_path):
    """The control for snapshot-access: snapshot reads from the source are
    not waited for by copy-before-write; without the re-check after them
    (debug switch) the reader sees new data."""
    worst = None
    for attempt in range(6):
        sub = tmp_path / f"run{attempt}"
        sub.mkdir()
        d, q, sock, res = modern("laminad", sub, env={"LAMINA_DEBUG_NO_FLEECING_GUARD": "1"},
                                 slow_source=True)
        d.stop()
        worst = res
        if res["bad"] > 0:
            break
    print(f"guard off: {worst}")
    assert worst["bad"] > 0, f"race not observed without the guard: {worst}"
