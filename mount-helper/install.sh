#!/bin/sh
# Installs apt-layer and its mount(8) helper:
#   /usr/local/bin/apt-layer
#   /usr/sbin/mount.fuse.apt-layer   (mount -t fuse.apt-layer, /etc/fstab)
# Usage: mount-helper/install.sh [PATH-TO-apt-layer-BINARY]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here/../target/release/apt-layer}
if [ ! -x "$bin" ]; then
    echo "build first: cargo build --release (or pass the binary's path)" >&2
    exit 1
fi
install -m 0755 "$bin" /usr/local/bin/apt-layer
install -m 0755 "$here/mount.fuse.apt-layer" /usr/sbin/mount.fuse.apt-layer
mkdir -p /run/apt-layer/registries
echo "installed /usr/local/bin/apt-layer and /usr/sbin/mount.fuse.apt-layer"
