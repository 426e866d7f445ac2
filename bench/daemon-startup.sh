#!/bin/sh
# Startup time (exec -> QMP greeting received) and idle RSS (VmRSS 0.5 s
# after the greeting) of laminad vs qemu-storage-daemon, side by side.
# Usage: bench/daemon-startup.sh [RUNS]   (default 15; medians reported)
# LAMINAD=path overrides build/src/daemon/laminad.
set -eu
RUNS=${1:-15}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LAMINAD=${LAMINAD:-$ROOT/build/src/daemon/laminad}
exec /usr/bin/python3 - "$RUNS" "$LAMINAD" <<'PY'
import os, socket, statistics, subprocess, sys, tempfile, time

runs, laminad = int(sys.argv[1]), sys.argv[2]

def measure(kind):
    with tempfile.TemporaryDirectory() as td:
        sock = os.path.join(td, "qmp.sock")
        if kind == "laminad":
            argv = [laminad, "--qmp", sock]
        else:
            argv = ["qemu-storage-daemon", "--chardev",
                    f"socket,path={sock},server=on,wait=off,id=m", "--monitor", "chardev=m"]
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(sock)
                    break
                except OSError:
                    s.close()
                    time.sleep(0.0002)
            buf = b""
            while b"\n" not in buf:
                buf += s.recv(4096)
            t = (time.perf_counter() - t0) * 1000
            time.sleep(0.5)
            with open(f"/proc/{p.pid}/status") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            s.close()
            return t, rss / 1024
        finally:
            p.terminate()
            p.wait()

res = {"laminad": [], "qsd": []}
for _ in range(runs):  # interleaved so load changes hit both alike
    for k in res:
        res[k].append(measure(k))
print(f"{'':10} {'startup ms (median)':>20} {'idle RSS MiB (median)':>22}")
med = {}
for k, v in res.items():
    med[k] = (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
    print(f"{k:10} {med[k][0]:20.2f} {med[k][1]:22.2f}")
print(f"{'ratio':10} {med['laminad'][0] / med['qsd'][0]:20.2f} {med['laminad'][1] / med['qsd'][1]:22.2f}"
      "   (laminad / qsd; lower is better)")
PY
