#!/bin/bash
# lamina-img vs qemu-img on the same 1 GiB-data qcow2 image, side by side:
# convert -O qcow2, convert -O raw, check.  Medians of $RUNS runs (default
# 5) and ratios (qemu time / lamina time; > 1 means lamina is faster).
# Both tools get the same flags in each line: the defaults (in-order
# writes, 8 requests in flight) and -W -m 8 (out-of-order writes).
# Usage: bench/img-bench.sh [build-dir]   (keeps to ~1-2 minutes)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-${LAMINA_BUILD:-$ROOT/build}}
LAM=$BUILD/src/tools/lamina-img
QEMU=$(command -v qemu-img)
RUNS=${RUNS:-5}
SIZE_MB=${SIZE_MB:-1024}
[ -x "$LAM" ] || { echo "lamina-img not built at $LAM" >&2; exit 1; }

# tmpfs when it has room: the figures then compare the tools, not the
# disk's write-back (which other users of the machine make very noisy).
DIR=${BENCH_DIR:-/tmp}
if [ -z "${BENCH_DIR:-}" ] && [ -d /dev/shm ] &&
   [ "$(df -Pm /dev/shm | awk 'NR==2 {print $4}')" -gt $((SIZE_MB * 3 + 512)) ]; then
    DIR=/dev/shm
fi
T=$(mktemp -d "$DIR/img-bench.XXXXXX")
echo "== img-bench: working in $T"
trap 'rm -rf "$T"' EXIT

echo "== img-bench: building a qcow2 with ${SIZE_MB} MiB of non-zero data"
head -c $((SIZE_MB << 20)) /dev/urandom > "$T/src.raw"
"$QEMU" convert -f raw -O qcow2 "$T/src.raw" "$T/src.qcow2"
rm -f "$T/src.raw"
sync

# time_one CMD...: "wall cpu" seconds of one run (cpu = user + sys, which
# other load on the machine disturbs much less than wall time).
# REPEAT runs the command that many times within one timing (for check,
# which takes milliseconds).
time_one() {
    local TIMEFORMAT="%R %U %S"
    { time for ((k = 0; k < REPEAT; k++)); do "$@" >/dev/null; done; } 2> "$T/time"
    awk '{printf "%.3f %.3f\n", $1, $2 + $3}' "$T/time"
}
REPEAT=1

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

bench_op() {
    local name=$1; shift
    local qw=() lw=() qc=() lc=() r
    for ((i = 0; i < RUNS; i++)); do
        # Start every run with no dirty pages in flight: otherwise the
        # write-back of the previous run's 1 GiB lands in the next timing.
        rm -f "$T"/out.*; sync
        r=$(time_one "$QEMU" "$@"); qw+=("${r% *}"); qc+=("${r#* }")
        rm -f "$T"/out.*; sync
        r=$(time_one "$LAM" "$@"); lw+=("${r% *}"); lc+=("${r#* }")
    done
    local qm lm qcm lcm
    qm=$(printf '%s\n' "${qw[@]}" | median)
    lm=$(printf '%s\n' "${lw[@]}" | median)
    qcm=$(printf '%s\n' "${qc[@]}" | median)
    lcm=$(printf '%s\n' "${lc[@]}" | median)
    printf '%-20s wall: qemu-img %6.3fs lamina-img %6.3fs ratio %5.2fx | cpu: qemu-img %6.3fs lamina-img %6.3fs ratio %5.2fx\n' \
        "$name" "$qm" "$lm" "$(echo "$qm $lm" | awk '{printf "%.2f", $1 / ($2 > 0 ? $2 : 0.001)}')" \
        "$qcm" "$lcm" "$(echo "$qcm $lcm" | awk '{printf "%.2f", $1 / ($2 > 0 ? $2 : 0.001)}')"
    printf '%-20s   wall runs: qemu-img %s | lamina-img %s\n' "" "${qw[*]}" "${lw[*]}"
}

echo "== img-bench: medians of $RUNS runs, ratio = qemu time / lamina time"
bench_op "convert -O qcow2" convert -O qcow2 "$T/src.qcow2" "$T/out.qcow2"
bench_op "convert -O raw" convert -O raw "$T/src.qcow2" "$T/out.raw"
bench_op "convert -W -O qcow2" convert -W -m 8 -O qcow2 "$T/src.qcow2" "$T/out.qcow2"
bench_op "convert -W -O raw" convert -W -m 8 -O raw "$T/src.qcow2" "$T/out.raw"
REPEAT=20
bench_op "check (x20)" check "$T/src.qcow2"
REPEAT=1
# Sanity: what lamina-img wrote is what qemu-img reads back.
"$LAM" convert -W -O qcow2 "$T/src.qcow2" "$T/out.qcow2"
"$QEMU" compare -q "$T/src.qcow2" "$T/out.qcow2" && echo "verify: convert output identical (qemu-img compare)"
"$QEMU" check -q "$T/out.qcow2" && echo "verify: qemu-img check clean"
