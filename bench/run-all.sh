#!/bin/sh
# Runs every benchmark script in bench/ (except this one), one after the
# other, so their side-by-side figures land in one log.
# Usage: bench/run-all.sh [build-dir]
DIR=$(cd "$(dirname "$0")" && pwd)
rc=0
for s in "$DIR"/*.sh "$DIR"/*.py; do
    [ -e "$s" ] || continue
    [ "$(basename "$s")" = "run-all.sh" ] && continue
    echo "### $(basename "$s")"
    case "$s" in
        *.py) /usr/bin/python3 "$s" "$@" || rc=1 ;;
        *) bash "$s" "$@" || rc=1 ;;
    esac
done
exit $rc
