#!/bin/sh
# Startup time (exec -> QMP greeting received), idle RSS (VmRSS 0.5 s
# after the greeting) and QMP round trip (query-version, median of 500) of
# laminad vs qemu-storage-daemon, side by side.
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
            f = s.makefile("rwb")
            f.write(b'{"execute": "qmp_capabilities"}\n')
            f.flush()
            f.readline()
            rtts = []
            for _ in range(500):
                t1 = time.perf_counter()
                f.write(b'{"execute": "query-version"}\n')
                f.flush()
                f.readline()
                rtts.append((time.perf_counter() - t1) * 1e6)
            s.close()
            return t, rss / 1024, statistics.median(rtts)
        finally:
            p.terminate()
            p.wait()

res = {"laminad": [], "qsd": []}
for _ in range(runs):  # interleaved so load changes hit both alike
    for k in res:
        res[k].append(measure(k))
print(f"{'':10} {'startup ms':>12} {'idle RSS MiB':>13} {'QMP RTT us':>11}   (medians of {runs} runs)")
med = {}
for k, v in res.items():
    med[k] = [statistics.median(x[i] for x in v) for i in range(3)]
    print(f"{k:10} {med[k][0]:12.2f} {med[k][1]:13.2f} {med[k][2]:11.1f}")
r = [med['laminad'][i] / med['qsd'][i] for i in range(3)]
print(f"{'ratio':10} {r[0]:12.2f} {r[1]:13.2f} {r[2]:11.2f}   (laminad / qsd; lower is better)")
PY
