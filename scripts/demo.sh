#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build apt-layer,
# start a loopback registry with a sample image, mount the registry tree and
# show ls / cat / chroot. Run as root (FUSE mounts and chroot need it).
#
#   sudo scripts/demo.sh            # leaves the mount in place at the end
#   sudo scripts/demo.sh --cleanup  # unmounts and stops the registry at the end
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked
bin=$PWD/target/release/apt-layer

work=${APT_LAYER_DEMO_DIR:-/tmp/apt-layer-demo}
mnt=${APT_LAYER_DEMO_MNT:-/run/apt-layer/registries}
port=${APT_LAYER_DEMO_PORT:-5000}
reg=127.0.0.1:$port
mkdir -p "$work" "$mnt"

# 1. A real registry (CNCF distribution, Debian's docker-registry) on loopback.
if ! curl -fsS "http://$reg/v2/" >/dev/null 2>&1; then
    cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $work/registry}, delete: {enabled: true}}
http: {addr: $reg}
YML
    docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
    for _ in $(seq 50); do curl -fsS "http://$reg/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
fi

# 2. A sample image: busybox (static) made with umoci, pushed with skopeo.
rm -rf "$work/layout" "$work/bundle"
umoci init --layout "$work/layout"
umoci new --image "$work/layout:latest"
umoci unpack --image "$work/layout:latest" "$work/bundle" >/dev/null
root=$work/bundle/rootfs
mkdir -p "$root/bin" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
for c in sh ls cat echo uname true wc; do ln -sf busybox "$root/bin/$c"; done
echo "Hello from a registry you never pulled" > "$root/etc/motd"
umoci repack --image "$work/layout:latest" "$work/bundle"
umoci config --image "$work/layout:latest" --config.label org.example=demo --config.env PATH=/bin
skopeo copy -q --dest-tls-verify=false "oci:$work/layout:latest" "docker://$reg/demo/busybox:latest"
skopeo copy -q --dest-tls-verify=false "oci:$work/layout:latest" "docker://$reg/demo/busybox:1.0"

# 3. Mount (returns once the tree is served).
mountpoint -q "$mnt" && umount "$mnt"
"$bin" mount "$mnt" --cache-dir "$work/cache" --insecure-registry "$reg" -o allow_other

t=$mnt/$reg/demo/busybox/latest
set -x
ls "$mnt"
ls "$mnt/$reg" "$mnt/$reg/demo/busybox"
ls "$t"
cat "$t/digest"
head -c 400 "$t/inspect.json"; echo
cat "$t/rootfs/etc/motd"
chroot "$t/rootfs" /bin/sh -c 'echo "inside: $(uname -s), $(ls /bin | wc -l) commands"'
{ set +x; } 2>/dev/null
if [ "${1:-}" = "--cleanup" ]; then
    umount "$mnt"
    pkill -f "docker-registry serve $work/registry.yml" || true
fi
