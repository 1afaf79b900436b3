#!/usr/bin/env bash
# Installs what apt-layer's tests and demo need on a fresh Debian machine.
# Idempotent: packages already present are left alone.
set -euo pipefail
pkgs=(docker-registry skopeo umoci fuse3 busybox-static apache2-utils jq erofs-utils
      containerd stargz-snapshotter zstd libssl-dev pkg-config curl iproute2
      squashfuse squashfs-tools debootstrap openssl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts a registry service on :5000 when one is installed; the tests
# start their own on free ports, so stop it if it runs.
if command -v systemctl >/dev/null 2>&1; then systemctl stop docker-registry 2>/dev/null || true; fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
fi
