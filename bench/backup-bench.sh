#!/bin/sh
# Backup throughput: blockdev-backup sync=full of a data-filled qcow2 image
# to an empty qcow2 target (both over the file driver, default cache),
# laminad vs qemu-storage-daemon, interleaved in one run.  Prints per-run
# MB/s (to BLOCK_JOB_COMPLETED; laminad's includes its final flush of
# the target, QSD does none), the daemon's CPU seconds for the job (on a
# shared machine the fairer efficiency figure), medians and the ratios; the target is checked with qemu-img check
# and compared with the source after each run.
#   bench/backup-bench.sh [size_mib=1024] [runs=3]
# COPY_RANGE=1 passes x-perf {"use-copy-range": true} (copy offload) to
# both daemons, LAMINA_COPY_RANGE=0|1 to laminad only (its default is on);
# MAX_CHUNK / MAX_WORKERS set x-perf max-chunk / max-workers (both).
# Binaries: $LAMINA_BUILD (default build/).
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${1:-1024}
RUNS=${2:-3}
exec /usr/bin/python3 - "$ROOT" "$SIZE_MIB" "$RUNS" <<'PY'
import os, statistics, subprocess, sys, tempfile, time
root, size_mib, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
copy_range = os.environ.get("COPY_RANGE", "0") == "1"
perf = {"use-copy-range": True} if copy_range else {}
for var, key in (("MAX_CHUNK", "max-chunk"), ("MAX_WORKERS", "max-workers")):
    if os.environ.get(var):
        perf[key] = int(os.environ[var])
extra = {"x-perf": perf} if perf else {}
lperf = dict(perf)
if os.environ.get("LAMINA_COPY_RANGE") in ("0", "1"):
    lperf["use-copy-range"] = os.environ["LAMINA_COPY_RANGE"] == "1"
lextra = {"x-perf": lperf} if lperf else {}
sys.path.insert(0, os.path.join(root, "tests", "integration"))
from qmp_util import Daemon

size = size_mib << 20

def cpu_seconds(pid):
    # utime + stime of all threads (fields 14 and 15 of /proc/pid/stat).
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(flavor, td, src, check):
    tgt = os.path.join(td, "tgt-%s.qcow2" % flavor)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
    sub = tempfile.mkdtemp(dir=td)
    with Daemon([], sub, flavor=flavor) as d:
        q = d.qmp
        q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "src",
                                    "file": {"driver": "file", "filename": src}})
        q.cmd("blockdev-add", args={"driver": "qcow2", "node-name": "tgt",
                                    "file": {"driver": "file", "filename": tgt}})
        c0 = cpu_seconds(d.proc.pid)
        t0 = time.monotonic()
        q.cmd("blockdev-backup", job_id="b", device="src", target="tgt", sync="full",
              **(lextra if flavor == "laminad" else extra))
        ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=600)
        dt = time.monotonic() - t0
        cpu = cpu_seconds(d.proc.pid) - c0
        assert "error" not in ev["data"], ev
        # Durable: the target's owner closes it (flush + close), as a
        # backup script does after the job.
        for _ in range(200):
            if not q.cmd("query-jobs"):
                break
            time.sleep(0.005)
        q.cmd("blockdev-del", node_name="tgt")
        dtd = time.monotonic() - t0
        d.stop()
    if check:
        subprocess.run(["qemu-img", "check", "-q", tgt], check=True)
        subprocess.run(["qemu-img", "compare", "-q", src, tgt], check=True)
    os.unlink(tgt)
    return size / dt / 1e6, size / dtd / 1e6, cpu

with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/tmp")) as td:
    raw = os.path.join(td, "src.raw")
    src = os.path.join(td, "src.qcow2")
    block = os.urandom(1 << 20)
    with open(raw, "wb") as f:
        for i in range(size_mib):
            f.write(block[i % 97:] + block[:i % 97])
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, src], check=True)
    os.unlink(raw)
    res = {"laminad": [], "qsd": []}
    dur = {"laminad": [], "qsd": []}
    cpus = {"laminad": [], "qsd": []}
    for r in range(runs):
        for flavor in ("laminad", "qsd"):  # interleaved: same cache state
            # Verify the first run of each daemon (outside the timing).
            mbs, mbsd, cpu = one(flavor, td, src, r == 0)
            res[flavor].append(mbs)
            dur[flavor].append(mbsd)
            cpus[flavor].append(cpu)
            print(f"run {r + 1} {flavor:8s} {mbs:8.0f} MB/s to completion, {mbsd:6.0f} MB/s "
                  f"to durable  cpu {cpu:5.2f} s", flush=True)
    ml, mq = statistics.median(res["laminad"]), statistics.median(res["qsd"])
    cfg = f"laminad x-perf {lperf or 'default'}, qsd x-perf {perf or 'default'}"
    print(f"backup sync=full {size_mib} MiB ({cfg}): to completion: median laminad {ml:.0f} MB/s, "
          f"qsd {mq:.0f} MB/s, ratio laminad/qsd {ml / mq:.2f}")
    dl, dq = statistics.median(dur["laminad"]), statistics.median(dur["qsd"])
    print(f"  to durable (completion + blockdev-del of the target): median laminad {dl:.0f} MB/s, "
          f"qsd {dq:.0f} MB/s, ratio laminad/qsd {dl / dq:.2f}")
    cl, cq = statistics.median(cpus["laminad"]), statistics.median(cpus["qsd"])
    print(f"daemon CPU for the job: median laminad {cl:.2f} s, qsd {cq:.2f} s, "
          f"qsd/laminad {cq / cl:.2f}")
PY
