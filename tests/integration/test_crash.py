"""Crash-consistency tests for qcow2 (docs/design/crash-test.md).

Each test runs tests/crash/lamina-crash-test: it records the writes and
flushes our qcow2 driver sends to its file during a guest workload, replays
them cut at every flush and at random points in between (unflushed writes
lost, torn, reordered), and checks every resulting image with our check and
`qemu-img check` and by reading it back (ours and `qemu-img convert`).

LAMINA_CRASH_SOAK=N makes every run N times longer (more ops, more cuts).
"""
import json
import os
import re

import pytest

from conftest import BUILD, run

CRASH = os.path.join(BUILD, "tests", "crash", "lamina-crash-test")
SOAK = max(1, int(os.environ.get("LAMINA_CRASH_SOAK", "1") or 1))


def crash_run(*args, expect_rc=None, time_limit=30):
    if not os.path.exists(CRASH):
        pytest.fail(f"{CRASH} not built")
    cmd = [CRASH, "--time-limit", str(time_limit * SOAK)] + [str(a) for a in args]
    p = run(cmd, check=False, timeout=time_limit * SOAK + 240)
    m = re.search(r"^CRASH-SUMMARY (.*)$", p.stdout, re.M)
    assert m, f"{cmd} printed no summary (exit {p.returncode})\n{p.stdout}\n{p.stderr[-4000:]}"
    summary = json.loads(m.group(1))
    # The human-readable summary ends up in pytest's captured output.
    print(p.stdout)
    print(p.stderr[-4000:])
    if expect_rc is not None:
        assert p.returncode == expect_rc, \
            f"exit {p.returncode}, expected {expect_rc}\n{p.stdout}\n{p.stderr[-6000:]}"
    return summary, p


def assert_clean(s, p):
    report = f"\n{p.stdout}\n{p.stderr[-6000:]}"
    assert s["workload_failures"] == 0, "guest I/O failed during recording" + report
    assert s["corrupt_ours"] == 0, "our check found corruption" + report
    assert s["corrupt_qemu"] == 0, "qemu-img check found corruption" + report
    assert s["open_failures"] == 0, "crash image could not be opened" + report
    assert s["check_errors"] == 0, "check reported errors" + report
    assert s["read_failures"] == 0, "crash image could not be read" + report
    assert s["durability_failures"] == 0, "flushed guest writes lost" + report
    assert s["reader_mismatch"] == 0, "our reader and qemu-img's disagree" + report
    assert s["reuse_corrupt"] == 0, "writing to a crashed image corrupted it" + report
    assert s["reuse_mismatch"] == 0, "writing to a crashed image: wrong content" + report
    assert s["reuse_errors"] == 0, "writing to a crashed image failed" + report
    assert s["reuse_tried"] > 0, report
    # The test must have tried something meaningful (a loaded machine may
    # hit the time limit early: then at least a few intervals).
    if s["time_limited"]:
        assert s["cuts"] >= 20 and s["flush_cuts"] >= 3, report
    else:
        assert s["flush_cuts"] >= 10 and s["random_cuts"] >= 10, report
        assert s["single_loss_cuts"] >= 10, report
    assert s["ours_checked"] == s["cuts"], report
    assert s["final_corrupt"] == 0, "the cleanly closed image is corrupt" + report
    assert s["final_leaks_ours"] == 0 and s["final_leaks_qemu"] == 0, \
        "the cleanly closed image leaks clusters" + report
    assert s["qemu_checked"] >= s["flush_cuts"], report
    if not s["time_limited"]:
        # Every flush of the file (plus the initial state) was a cut.
        assert s["flush_cuts"] == s["file_flushes"] + 1, report


@pytest.mark.parametrize("cluster,refbits,size,ops,extra", [
    # Small clusters: L2 tables and refcount blocks fill up quickly.
    (512, 16, "4M", 60, []),
    # The common case, some writes compressed.
    (4096, 16, "16M", 50, ["--compress"]),
    # 32-bit refcounts at 512 B clusters with big sequential fills: one
    # refcount block covers 64 KiB and the table 4 MiB of file, so the
    # refcount table itself has to grow during the workload.
    (512, 32, "8M", 50, ["--fill-max", "2M", "--qemu-every", 4]),
    # Metadata caches of two tables: L2 tables and refcount blocks are
    # evicted (written back) in the middle of allocations.
    (512, 16, "4M", 60, ["--drv-opt", "l2-cache-size=1024",
                         "--drv-opt", "refcount-cache-size=1024"]),
], ids=["c512", "c4k-compress", "c512-rc32-table-growth", "c512-tiny-cache"])
def test_crash_qcow2(cluster, refbits, size, ops, extra):
    s, p = crash_run("--format", "qcow2", "--cluster-size", cluster,
                     "--refcount-bits", refbits, "--size", size,
                     "--ops", ops, "--seed", cluster + refbits,
                     "--random-cuts", 1, "--qemu-every", 4, *extra,
                     time_limit=12)
    assert_clean(s, p)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]


def test_crash_qcow2_refcount_table_grows():
    """The growth config really grows the refcount table (else the test
    above would not cover that path)."""
    s, p = crash_run("--format", "qcow2", "--cluster-size", 512,
                     "--refcount-bits", 32, "--size", "8M", "--ops", 50,
                     "--fill-max", "2M", "--seed", 544, "--max-random-cuts", 0,
                     "--no-qemu", "--reuse-every", 0, time_limit=2)
    assert s["refcount_table_clusters"][1] > s["refcount_table_clusters"][0], p.stdout
    assert s["refcount_blocks"][1] > 8 and s["l2_tables"][1] > 50, p.stdout


def test_crash_qcow2_threads():
    """Four guest threads allocating concurrently in shared L2 tables and
    refcount blocks; each thread's flushes make its own writes durable."""
    s, p = crash_run("--format", "qcow2", "--cluster-size", 512, "--size", "8M",
                     "--threads", 4, "--ops", 25, "--seed", 21,
                     "--random-cuts", 1, "--qemu-every", 4, time_limit=10)
    assert_clean(s, p)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]


def test_crash_qcow2_rc64_big_writes():
    """Regression test for a bug this test found (fixed in 0efec28): with
    refcount_bits=64 a refcount block covers exactly as many clusters as an
    L2 table, and placing each new refcount block at the start of its
    region made a contiguous run of that many free clusters impossible, so
    allocation retried forever and the file grew without bound (84 MB for
    1.5 MB of guest data).  Any aligned 32 KiB write at 512 B clusters
    triggered it; the recorder's size cap turns a relapse into ENOSPC."""
    s, p = crash_run("--format", "qcow2", "--cluster-size", 512,
                     "--refcount-bits", 64, "--size", "4M", "--ops", 40,
                     "--fill-max", "64K", "--seed", 3, "--random-cuts", 1,
                     "--qemu-every", 4, time_limit=10)
    assert_clean(s, p)
    assert p.returncode == 0


def test_crash_qcow2_created_by_us_discard_mix():
    """Starting from an image our own create wrote, with a discard-heavy mix:
    clusters are freed and reused while crashes happen."""
    s, p = crash_run("--format", "qcow2", "--create", "ours", "--cluster-size",
                     1024, "--size", "4M", "--ops", 60, "--seed", 7,
                     "--mix", "discard",
                     "--random-cuts", 1, "--qemu-every", 3, time_limit=12)
    assert_clean(s, p)
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]


def test_crash_qcow2_lazy_refcounts_repair():
    """Lazy refcounts: every crash image is dirty and gets repaired first,
    alternately by our read-write open (the driver repairs a dirty image)
    and by `qemu-img check -r all`; then both checks must be clean and the
    flushed data must be there."""
    s, p = crash_run("--format", "qcow2", "--lazy-refcounts", "--cluster-size",
                     512, "--size", "4M", "--ops", 50, "--seed", 17,
                     "--random-cuts", 1, "--qemu-every", 3, time_limit=10)
    assert_clean(s, p)
    assert s["repair_failures"] == 0 and s["repaired"] == s["cuts"], p.stdout
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]


def test_crash_detects_lost_flushed_write_qcow2():
    """A crash model that loses a write the driver had flushed (a lying
    disk) must be caught: by check (metadata lost) or by read-back (data
    lost).  This proves the test above can fail."""
    s, p = crash_run("--format", "qcow2", "--cluster-size", 512, "--size", "4M",
                     "--ops", 40, "--seed", 3, "--cheat", "drop-flushed",
                     "--max-random-cuts", 20, "--qemu-every", 4,
                     "--reuse-every", 0, "--expect-failures", time_limit=10)
    found = (s["corrupt_ours"] + s["corrupt_qemu"] + s["durability_failures"]
             + s["open_failures"] + s["check_errors"])
    assert found > 0, p.stdout + p.stderr[-4000:]
    assert p.returncode == 0


def test_crash_reference_qemu_has_no_false_positives():
    """The same workload through QEMU's own qcow2 driver, its file writes
    captured by QEMU's blklogwrites filter: a driver known to be crash-safe
    must pass, so every failure the test reports against ours is real.  Our
    check and our reader judge QEMU's crash images too (they must agree
    with qemu-img), and our driver reuses them."""
    s, p = crash_run("--reference-qemu", "--cluster-size", 512,
                     "--size", "4M", "--ops", 40, "--seed", 11,
                     "--random-cuts", 1, "--qemu-every", 3, time_limit=8)
    report = p.stdout + p.stderr[-4000:]
    assert p.returncode == 0, report
    assert s["corrupt_qemu"] == 0 and s["durability_failures"] == 0, report
    assert s["corrupt_ours"] == 0 and s["reuse_corrupt"] == 0, report
    assert s["flush_cuts"] >= 20 and s["qemu_read"] >= 20, report
    assert s["ours_checked"] == s["cuts"], report


def test_crash_reference_qemu_cheat_detected():
    s, p = crash_run("--reference-qemu", "--no-ours", "--cluster-size", 512,
                     "--size", "4M", "--ops", 40, "--seed", 1,
                     "--cheat", "drop-flushed", "--max-random-cuts", 20,
                     "--single-loss", 2, "--expect-failures", time_limit=6)
    assert s["corrupt_qemu"] + s["durability_failures"] > 0, p.stdout
    assert p.returncode == 0


def test_crash_detects_lost_flushed_write_raw():
    s, p = crash_run("--format", "raw", "--size", "1M", "--ops", 100,
                     "--cheat", "drop-flushed", "--expect-failures",
                     time_limit=10)
    assert s["durability_failures"] > 0, p.stdout
    assert p.returncode == 0


def test_crash_raw_clean():
    s, p = crash_run("--format", "raw", "--size", "1M", "--ops", 100,
                     time_limit=10)
    assert s["durability_failures"] == 0 and s["read_failures"] == 0, p.stdout
    assert s["qemu_read"] > 0
    assert p.returncode == 0
