#!/usr/bin/python3
"""NBD export benchmark: laminad vs qemu-storage-daemon (and nbdkit's file
plugin on the raw image), side by side in one run.

For a qcow2 image and a raw file with 1 GiB of data, each server exports
the image over a UNIX socket and is measured with
  fio --ioengine=nbd: 4k randread / randwrite (iodepth 16, numjobs 1 and 2)
                      and 1 MiB sequential read / write
  nbdcopy of the whole export to null:
Every measurement runs RUNS times (servers interleaved) and the median is
reported, with laminad/QSD ratios.

Usage: bench/nbd-bench.py [--runs N] [--runtime S] [--size-mb M] [--dir D]
                          [--only TEST] [--formats qcow2,raw]
                          [--baseline OTHER_BUILD_DIR] [BUILD_DIR]
--baseline adds columns for a second laminad (e.g. a build of main), run
interleaved with the others, for before/after comparisons on a busy machine.
Uses build/src/daemon/laminad when it exists, else the nbd-serve harness
(tests/unit/nbd), which serves through the same NBD server code.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("LAMINA_BUILD", os.path.join(ROOT, "build"))
LAMINAD = os.path.join(BUILD, "src", "daemon", "laminad")
NBD_SERVE = os.path.join(BUILD, "tests", "unit", "nbd", "nbd-serve")


def wait_socket(path, proc, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError("server exited: %s" % proc.stderr.read().decode())
        if os.path.exists(path):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError("server socket %s never appeared" % path)


class Server:
    def __init__(self, kind, image, fmt, sock, laminad=None):
        self.kind, self.image, self.fmt, self.sock = kind, image, fmt, sock
        self.laminad = laminad
        self.proc = None

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        fopts = {"driver": "file", "filename": self.image}
        if self.kind == "lamina":
            laminad = self.laminad or LAMINAD
            if os.path.exists(laminad):
                bd = {"driver": self.fmt, "node-name": "n0", "file": fopts}
                ex = {"type": "nbd", "id": "e0", "node-name": "n0", "name": "exp",
                      "writable": True}
                qmp = self.sock + ".qmp"
                cmd = [laminad, "--blockdev", json.dumps(bd), "--nbd",
                       "unix:" + self.sock, "--export", json.dumps(ex), "--qmp", qmp]
            else:
                cmd = [NBD_SERVE, "-f", self.fmt, "-w", "-n", "exp", "-a",
                       "unix:" + self.sock, self.image]
        elif self.kind == "qsd":
            bd = {"driver": self.fmt, "node-name": "n0", "file": fopts}
            cmd = ["qemu-storage-daemon", "--blockdev", json.dumps(bd),
                   "--nbd-server", "addr.type=unix,addr.path=" + self.sock,
                   "--export", "type=nbd,id=e0,node-name=n0,name=exp,writable=on"]
        elif self.kind == "nbdkit":
            cmd = ["nbdkit", "-f", "-U", self.sock, "-e", "exp", "file", self.image]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_socket(self.sock, self.proc)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def uri(self):
        return "nbd+unix:///exp?socket=" + self.sock


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def fio(uri, rw, bs, numjobs, runtime):
    cmd = ["fio", "--name=b", "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw,
           "--bs=" + bs, "--iodepth=16", "--numjobs=%d" % numjobs,
           "--runtime=%d" % runtime, "--time_based", "--group_reporting",
           "--output-format=json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 60)
    if p.returncode != 0:
        raise RuntimeError("fio failed: %s" % p.stderr)
    j = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    return side["iops"], side["bw_bytes"] / 1e6, side["total_ios"]


def nbdcopy(uri, size):
    t = time.time()
    subprocess.run(["nbdcopy", uri, "null:"], check=True, timeout=300)
    return size / (time.time() - t) / 1e6, 0


def iops(rw, bs, nj):
    def run(uri, runtime, size):
        v = fio(uri, rw, bs, nj, runtime)
        return v[0], v[2]
    return run


def mbps(rw, bs, nj):
    def run(uri, runtime, size):
        v = fio(uri, rw, bs, nj, runtime)
        return v[1], v[2]
    return run


def copy(uri, runtime, size):
    return nbdcopy(uri, size)[0], size >> 20  # CPU per MiB copied


TESTS = [
    # name, unit, runner(uri, runtime, size) -> (value, ops for CPU/op)
    ("4k randread  nj1", "IOPS", iops("randread", "4k", 1)),
    ("4k randread  nj2", "IOPS", iops("randread", "4k", 2)),
    ("4k randwrite nj1", "IOPS", iops("randwrite", "4k", 1)),
    ("4k randwrite nj2", "IOPS", iops("randwrite", "4k", 2)),
    ("1M seq read", "MB/s", mbps("read", "1M", 1)),
    ("1M seq write", "MB/s", mbps("write", "1M", 1)),
    ("nbdcopy out", "MB/s", copy),
]


def make_images(d, size_mb):
    raw = os.path.join(d, "data.raw")
    qcow = os.path.join(d, "data.qcow2")
    with open(raw, "wb") as f:
        chunk = os.urandom(1 << 20)
        for i in range(size_mb):
            # vary the data cheaply so nothing dedups or compresses
            f.write(chunk[i % 4096:] + chunk[:i % 4096])
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow],
                   check=True)
    return raw, qcow


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=2)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--only", default=None, help="substring of test names")
    ap.add_argument("--formats", default="qcow2,raw")
    ap.add_argument("--baseline", default=None,
                    help="another build directory: its laminad gets columns too")
    ap.add_argument("build", nargs="?", help="build directory (default build/)")
    args = ap.parse_args()
    global BUILD, LAMINAD, NBD_SERVE
    if args.build:
        BUILD = os.path.abspath(args.build)
        LAMINAD = os.path.join(BUILD, "src", "daemon", "laminad")
        NBD_SERVE = os.path.join(BUILD, "tests", "unit", "nbd", "nbd-serve")
    for tool in ("fio", "nbdcopy", "qemu-storage-daemon", "qemu-img"):
        if not shutil.which(tool):
            sys.exit("%s is required" % tool)
    have_nbdkit = bool(shutil.which("nbdkit"))
    d = tempfile.mkdtemp(prefix="nbd-bench-", dir=args.dir)
    servers = []
    try:
        raw, qcow = make_images(d, args.size_mb)
        size = args.size_mb << 20
        cols = [("lamina qcow2", Server("lamina", qcow, "qcow2", d + "/lq.sock")),
                ("QSD qcow2", Server("qsd", qcow, "qcow2", d + "/qq.sock")),
                ("lamina raw", Server("lamina", raw, "raw", d + "/lr.sock")),
                ("QSD raw", Server("qsd", raw, "raw", d + "/qr.sock"))]
        if args.baseline:
            base = os.path.join(os.path.abspath(args.baseline), "src", "daemon",
                                "laminad")
            if not os.path.exists(base):
                sys.exit("no laminad in %s" % args.baseline)
            cols.insert(1, ("base qcow2", Server("lamina", qcow, "qcow2",
                                                 d + "/bq.sock", base)))
            cols.insert(4, ("base raw", Server("lamina", raw, "raw",
                                               d + "/br.sock", base)))
        fmts = args.formats.split(",")
        cols = [(c, s) for c, s in cols if s.fmt in fmts]
        if have_nbdkit and "raw" in fmts:
            cols.append(("nbdkit raw", Server("nbdkit", raw, "raw", d + "/nk.sock")))
        servers = [s for _, s in cols]
        print("laminad: %s" % (LAMINAD if os.path.exists(LAMINAD) else
                               "not built, using " + NBD_SERVE))
        print("runs=%d runtime=%ds image=%d MiB (median of runs), load %.1f %.1f %.1f\n"
              % ((args.runs, args.runtime, args.size_mb) + os.getloadavg()))
        hdr = "%-18s %-5s" % ("test", "unit") + "".join("%14s" % c for c, _ in cols)
        hdr += "%10s%10s" % ("L/Q qcow2", "L/Q raw")
        if args.baseline:
            hdr += "%10s%10s" % ("B/Q qcow2", "B/Q raw")
        print(hdr)
        results = {}
        for name, unit, fn in TESTS:
            if args.only and args.only not in name:
                continue
            vals = {c: [] for c, _ in cols}
            cpu = {c: [] for c, _ in cols}
            for _ in range(args.runs):
                for c, s in cols:
                    s.start()
                    try:
                        t0 = cpu_ticks(s.proc.pid)
                        v, ops = fn(s.uri, args.runtime, size)
                        t1 = cpu_ticks(s.proc.pid)
                        vals[c].append(v)
                        # server CPU time per request (per MiB for nbdcopy)
                        cpu[c].append((t1 - t0) * 1e6 / os.sysconf("SC_CLK_TCK")
                                      / max(ops, 1))
                    finally:
                        s.stop()
            med = {c: statistics.median(v) for c, v in vals.items()}
            cpu_med = {c: statistics.median(v) for c, v in cpu.items()}
            results[name] = {"value": med, "cpu_us_per_op": cpu_med,
                             "runs": vals, "cpu_runs": cpu}
            line = "%-18s %-5s" % (name, unit)
            line += "".join("%14.0f" % med[c] for c, _ in cols)
            r1 = med.get("lamina qcow2", 0) / med.get("QSD qcow2", 1)
            r2 = med.get("lamina raw", 0) / med.get("QSD raw", 1)
            line += "%9.2fx%9.2fx" % (r1, r2)
            if args.baseline:
                line += "%9.2fx%9.2fx" % (
                    med.get("base qcow2", 0) / med.get("QSD qcow2", 1),
                    med.get("base raw", 0) / med.get("QSD raw", 1))
            print(line, flush=True)
            print("%-18s %-5s" % ("  server CPU", "us/MB" if "nbdcopy" in name else "us/op") +
                  "".join("%14.1f" % cpu_med[c] for c, _ in cols), flush=True)
        print("\nload at the end: %.1f %.1f %.1f" % os.getloadavg())
        with open(os.path.join(BUILD if os.path.isdir(BUILD) else d, "nbd-bench-last.json"), "w") as f:
            json.dump(results, f, indent=1)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
