#!/bin/bash
# lamina-img vs qemu-img on the same 1 GiB-data qcow2 image, side by side:
# convert -O qcow2, convert -O raw, check.  Medians of $RUNS runs (default
# 3) and ratios (qemu time / lamina time; > 1 means lamina is faster).
# Both tools get the same convert flags (-W -m 8: out-of-order writes,
# 8 requests in flight), so the comparison is like for like.
# Usage: bench/img-bench.sh [build-dir]   (keeps to ~1-2 minutes)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-${LAMINA_BUILD:-$ROOT/build}}
LAM=$BUILD/src/tools/lamina-img
QEMU=$(command -v qemu-img)
RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-1024}
[ -x "$LAM" ] || { echo "lamina-img not built at $LAM" >&2; exit 1; }

T=$(mktemp -d /tmp/img-bench.XXXXXX)
trap 'rm -rf "$T"' EXIT

echo "== img-bench: building a qcow2 with ${SIZE_MB} MiB of non-zero data"
head -c $((SIZE_MB << 20)) /dev/urandom > "$T/src.raw"
"$QEMU" convert -f raw -O qcow2 "$T/src.raw" "$T/src.qcow2"
rm -f "$T/src.raw"
sync

# time_cmd OUTFILE CMD...: seconds of one run (the target removed first).
time_one() {
    local s e
    s=$(date +%s.%N)
    "$@" >/dev/null
    e=$(date +%s.%N)
    echo "$s $e" | awk '{printf "%.3f\n", $2 - $1}'
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

bench_op() {
    local name=$1; shift
    local ql=() ll=()
    for ((i = 0; i < RUNS; i++)); do
        rm -f "$T"/out.*
        ql+=("$(time_one "$QEMU" "$@")")
        rm -f "$T"/out.*
        ll+=("$(time_one "$LAM" "$@")")
    done
    local qm lm
    qm=$(printf '%s\n' "${ql[@]}" | median)
    lm=$(printf '%s\n' "${ll[@]}" | median)
    printf '%-22s qemu-img %7.3fs  lamina-img %7.3fs  ratio %5.2fx   (runs q: %s | l: %s)\n' \
        "$name" "$qm" "$lm" "$(echo "$qm $lm" | awk '{printf "%.2f", $1 / $2}')" \
        "${ql[*]}" "${ll[*]}"
}

echo "== img-bench: medians of $RUNS runs, ratio = qemu time / lamina time"
bench_op "convert -O qcow2" convert -W -m 8 -O qcow2 "$T/src.qcow2" "$T/out.qcow2"
bench_op "convert -O raw" convert -W -m 8 -O raw "$T/src.qcow2" "$T/out.raw"
bench_op "check" check "$T/src.qcow2"
# Sanity: what lamina-img wrote is what qemu-img reads back.
"$LAM" convert -W -O qcow2 "$T/src.qcow2" "$T/out.qcow2"
"$QEMU" compare -q "$T/src.qcow2" "$T/out.qcow2" && echo "verify: convert output identical (qemu-img compare)"
"$QEMU" check -q "$T/out.qcow2" && echo "verify: qemu-img check clean"
