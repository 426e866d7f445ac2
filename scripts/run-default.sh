#!/bin/sh
# `make run`: the daemon's embedded default once laminad exists; until
# then, a demo image and its info.
B=${1:-build}
if [ -x "$B/src/daemon/laminad" ]; then
    exec "$B/src/daemon/laminad"
fi
mkdir -p lamina-data
"$B/src/tools/lamina-img" create -f qcow2 lamina-data/demo.qcow2 1G
exec "$B/src/tools/lamina-img" info lamina-data/demo.qcow2
