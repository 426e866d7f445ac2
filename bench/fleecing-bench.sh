#!/bin/sh
# Guest write performance while fleecing.  For laminad and
# qemu-storage-daemon in one run: fio 4k randwrite through an NBD export of
# the disk (baseline), then again while a classic fleecing is active (temp
# qcow2 backed by the disk, blockdev-backup sync=none, the fleecing export
# read sequentially by a backup reader).  Reports IOPS and p99 latency,
# medians over runs, and the fleecing/baseline ratios (goal: >= 0.5 IOPS,
# p99 <= 1.5x).
# mode "modern": the temp qcow2 has no backing file; a copy-before-write
# filter over the disk carries the guest export and the backup reader
# reads a snapshot-access node on it (QEMU's recommended fleecing).
# READER=0 leaves the backup reader out (the cost of copy-before-write
# alone; on 2 cores the reader's CPU use is most of the rest).
#   bench/fleecing-bench.sh [runs=3] [seconds=4] [size_mib=512] [classic|modern|both]
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
exec /usr/bin/python3 - "$ROOT" "${1:-3}" "${2:-4}" "${3:-512}" "${4:-classic}" <<'PY'
import json, os, shutil, statistics, subprocess, sys, tempfile
root, runs, secs, size_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
modes = ["classic", "modern"] if sys.argv[5] == "both" else [sys.argv[5]]
sys.path.insert(0, os.path.join(root, "tests", "integration"))
from qmp_util import Daemon

size = size_mib << 20


def fio(uri, rw, secs, extra=()):
    """Returns (IOPS in the first 2 s, IOPS overall, p99 latency in us)."""
    logdir = tempfile.mkdtemp()
    cmd = ["fio", "--name=g", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
           "--iodepth=16", "--time_based", f"--runtime={secs}", f"--size={size}",
           "--output-format=json", "--percentile_list=99",
           f"--write_iops_log={logdir}/g", "--log_avg_msec=500"] + list(extra)
    # cwd: fio leaves verify state files in its working directory.
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         cwd=logdir).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["write"] if "write" in rw else j["read"]
    p99 = list(side["clat_ns"].get("percentile", {"99": 0}).values())[0] / 1000.0
    early = []
    for name in os.listdir(logdir):
        if name.startswith("g_iops"):
            with open(os.path.join(logdir, name)) as f:
                for line in f:
                    t, v = line.split(",")[:2]
                    if int(t) <= 2000:
                        early.append(int(v))
    shutil.rmtree(logdir, ignore_errors=True)
    return (statistics.mean(early) if early else side["iops"]), side["iops"], p99


def one(flavor, td, mode):
    src = os.path.join(td, "disk.raw")
    tmp = os.path.join(td, "tmp.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, str(size)], check=True)
    sub = tempfile.mkdtemp(dir=td)
    sock = os.path.join(sub, "nbd.sock")
    with Daemon([], sub, flavor=flavor) as d:
        q = d.qmp
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        q.cmd("blockdev-add", args={"driver": "file", "node-name": "src", "filename": src})
        q.cmd("block-export-add", args={"type": "nbd", "id": "e0", "node-name": "src",
                                        "name": "disk", "writable": True})
        base = fio(f"nbd+unix:///disk?socket={sock}", "randwrite", secs)
        q.cmd("block-export-del", id="e0")
        q.wait_event("BLOCK_EXPORT_DELETED")
        if mode == "classic":
            q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "tmp",
                                        "file": {"driver": "file", "filename": tmp},
                                        "backing": "src"})
            q.cmd("blockdev-backup", job_id="f", device="src", target="tmp", sync="none",
                  filter_node_name="fl")
            snap_node = "tmp"
        else:
            q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "tmp",
                                        "file": {"driver": "file", "filename": tmp}})
            q.cmd("blockdev-add", args={"driver": "copy-before-write", "node-name": "fl",
                                        "file": "src", "target": "tmp"})
            q.cmd("blockdev-add", args={"driver": "snapshot-access", "node-name": "acc",
                                        "file": "fl"})
            snap_node = "acc"
        q.cmd("block-export-add", args={"type": "nbd", "id": "e1", "node-name": "fl",
                                        "name": "disk", "writable": True})
        q.cmd("block-export-add", args={"type": "nbd", "id": "e2", "node-name": snap_node,
                                        "name": "snap"})
        reader = None if os.environ.get("READER", "1") == "0" else subprocess.Popen(
            ["fio", "--name=r", "--ioengine=nbd", f"--uri=nbd+unix:///snap?socket={sock}",
             "--rw=read", "--bs=1M", "--iodepth=2", "--time_based", f"--runtime={secs}",
             f"--size={size}", "--output-format=json"], stdout=subprocess.DEVNULL,
            cwd=sub)
        fl = fio(f"nbd+unix:///disk?socket={sock}", "randwrite", secs)
        if reader:
            reader.wait()
        q.cmd("block-export-del", id="e2")
        q.cmd("block-export-del", id="e1")
        if mode == "classic":
            q.cmd("job-cancel", id="f")
            q.wait_event("BLOCK_JOB_CANCELLED")
        d.stop()
    os.unlink(tmp)
    return base, fl


with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/tmp")) as td:
    src = os.path.join(td, "disk.raw")
    block = os.urandom(1 << 20)
    with open(src, "wb") as f:
        for i in range(size_mib):
            f.write(block)
    for mode in modes:
        print(f"-- {mode} fleecing")
        res = {"laminad": [], "qsd": []}
        for r in range(runs):
            for flavor in ("laminad", "qsd"):
                (be, bi, bp), (fe, fi, fp) = one(flavor, td, mode)
                res[flavor].append((be, bi, bp, fe, fi, fp))
                print(f"run {r + 1} {flavor:8s} baseline {be:6.0f}/{bi:6.0f} IOPS (2s/all) "
                      f"p99 {bp:6.0f} us | fleecing {fe:6.0f}/{fi:6.0f} IOPS p99 {fp:6.0f} us | "
                      f"keeps {fe / be:.0%}/{fi / bi:.0%}, p99 x{fp / bp:.2f}", flush=True)
        summary = {}
        for flavor, rows in res.items():
            m = [statistics.median(x[i] for x in rows) for i in range(6)]
            summary[flavor] = m
            print(f"{flavor:8s} median: baseline {m[0]:.0f} IOPS first 2 s, {m[1]:.0f} overall, "
                  f"p99 {m[2]:.0f} us | fleecing {m[3]:.0f} first 2 s, {m[4]:.0f} overall, "
                  f"p99 {m[5]:.0f} us | keeps {m[3] / m[0]:.0%} (2 s) {m[4] / m[1]:.0%} (all), "
                  f"p99 x{m[5] / m[2]:.2f}")
        l, q = summary["laminad"], summary["qsd"]
        print(f"laminad/qsd: baseline IOPS {l[1] / q[1]:.2f}, fleecing IOPS first 2 s "
              f"{l[3] / q[3]:.2f}, overall {l[4] / q[4]:.2f}")
PY
