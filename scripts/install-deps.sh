#!/bin/sh
# Installs the Debian packages Lamina builds and tests with, if missing.
# Runs apt-get update at most once, and only when something is missing.
set -e
PKGS="meson ninja-build pkg-config gcc clang libjansson-dev zlib1g-dev libzstd-dev
      libclang-rt-14-dev qemu-utils qemu-system-common libnbd-bin python3
      python3-libnbd python3-pytest fio nbdkit socat"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "Installing:$missing"
if [ "$(id -u)" != 0 ]; then
    echo "Need root to install:$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends $missing
