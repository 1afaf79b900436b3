#!/usr/bin/env bash
# End-to-end benchmark: apt-layer against what users would pick instead,
# measured in one run on this machine, alternating, median and spread.
#
#   sudo benches/e2e.sh                 # Debian bookworm minbase image, 5 rounds → BENCHMARKS.md + benches/ratios.svg
#   sudo benches/e2e.sh --smoke --out F # tiny image, 1 round (runs in the test suite so this cannot rot)
#
# Measures, per round (page cache dropped before every timed step):
#   cold:   apt-layer first read of /etc/os-release + `chroot rootfs /bin/true` on an empty cache
#           vs `skopeo copy` + `umoci unpack` + the same read and chroot
#   bytes:  bytes the registry served for that cold start (its access log)
#   warm:   `tar cf - rootfs` and `find rootfs -printf` on apt-layer (cache full) vs the unpacked
#           tree on local disk vs squashfuse of the same tree vs `apt-layer mount-image` (composefs,
#           kernel erofs + overlay over the same cache)
#   memory: daemon RSS per image entry beyond the RSS right after mount (after the warm runs, and peak)
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0; ROUNDS=5; OUT=BENCHMARKS.md; SVG=benches/ratios.svg
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1; ROUNDS=1; shift ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --out) OUT=$2; SVG="${2%.md}.svg"; shift 2 ;;
        *) echo "usage: $0 [--smoke] [--rounds N] [--out FILE.md]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (FUSE, chroot, drop_caches)" >&2; exit 1; }
BIN=${APT_LAYER_BIN:-$PWD/target/release/apt-layer}
[ -x "$BIN" ] || cargo build --release --locked
work=$(mktemp -d /var/tmp/apt-layer-bench.XXXXXX)
MNT=$work/mnt; mkdir -p "$MNT"
cleanup() {
    mountpoint -q "$MNT" && umount "$MNT" || true
    mountpoint -q "$work/sqmnt" && umount "$work/sqmnt" || true
    mountpoint -q "$work/cfsmnt" && umount "$work/cfsmnt" || true
    [ -n "${REGPID:-}" ] && kill "$REGPID" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2-$1:.4f}')"; }

# --- a registry on loopback, with an access log ---------------------------
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: $work/registry}, delete: {enabled: true}}
http: {addr: $REG}
YML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
REGPID=$!
for _ in $(seq 100); do curl -fsS "http://$REG/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

# --- the image --------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    SRC=$work/src; mkdir -p "$SRC/bin" "$SRC/etc"
    cp /bin/busybox "$SRC/bin/busybox"; for c in sh true cat; do ln -s busybox "$SRC/bin/$c"; done
    echo 'PRETTY_NAME="smoke"' > "$SRC/etc/os-release"
    IMAGE_DESC="busybox-static (smoke)"
else
    SRC=${APT_LAYER_BENCH_ROOTFS:-/var/tmp/apt-layer-bench/minbase}
    if [ ! -x "$SRC/bin/true" ]; then
        mkdir -p "$(dirname "$SRC")"
        debootstrap --variant=minbase bookworm "$SRC" http://deb.debian.org/debian >/dev/null
    fi
    IMAGE_DESC="Debian bookworm minbase (debootstrap)"
fi
umoci init --layout "$work/layout" >/dev/null
umoci new --image "$work/layout:img" >/dev/null
umoci unpack --image "$work/layout:img" "$work/bundle" >/dev/null
cp -a "$SRC/." "$work/bundle/rootfs/"
umoci repack --image "$work/layout:img" "$work/bundle" >/dev/null
rm -rf "$work/bundle"
skopeo copy -q --dest-tls-verify=false "oci:$work/layout:img" "docker://$REG/bench/img:gzip"
LAYER_SIZE=$(skopeo inspect --tls-verify=false --raw "docker://$REG/bench/img:gzip" | python3 -c 'import json,sys;print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')
ENTRIES=$(find "$SRC" | wc -l)
UNCOMP=$(du -sb "$SRC" | cut -f1)
T=$MNT/$REG/bench/img/gzip/rootfs

blob_bytes() {  # bytes of blob GETs in the access log after byte offset $1
    tail -c +$(( $1 + 1 )) "$work/registry.log" | python3 -c '
import re,sys
n=0
for l in sys.stdin:
    m=re.search(r"\"GET /v2/[^ ]*/blobs/[^ ]* HTTP/[0-9.]+\" 20[06] ([0-9]+)", l)
    if m: n+=int(m.group(1))
print(n)'
}
rss_kb() { awk '/VmHWM/{print $2}' "/proc/$1/status"; }
rss_now_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

declare -a C_BASE C_AL BYTES W_TAR_AL W_TAR_NAT W_TAR_SQ W_TAR_CFS W_FIND_AL W_FIND_NAT W_FIND_SQ W_FIND_CFS RSS_PER PEAK_PER
for r in $(seq "$ROUNDS"); do
    # baseline: skopeo copy + umoci unpack + read + chroot
    rm -rf "$work/pull" "$work/pull-bundle"; drop
    t0=$(now)
    skopeo copy -q --src-tls-verify=false "docker://$REG/bench/img:gzip" "oci:$work/pull:img"
    umoci unpack --image "$work/pull:img" "$work/pull-bundle" >/dev/null
    cat "$work/pull-bundle/rootfs/etc/os-release" >/dev/null
    chroot "$work/pull-bundle/rootfs" /bin/true
    t1=$(now); C_BASE+=("$(elapsed "$t0" "$t1")")

    # apt-layer, cold cache
    rm -rf "$work/cache"; drop
    "$BIN" mount "$MNT" --cache-dir "$work/cache" --insecure-registry "$REG" --registries-conf /dev/null -o timeout=60s
    PID=$(pgrep -f -n "apt-layer mount $MNT")
    base_rss=$(rss_now_kb "$PID")
    off=$(stat -c %s "$work/registry.log")
    t0=$(now)
    cat "$T/etc/os-release" >/dev/null
    chroot "$T" /bin/true
    t1=$(now); C_AL+=("$(elapsed "$t0" "$t1")")
    sleep 0.2; BYTES+=("$(blob_bytes "$off")")

    # warm: apt-layer (cache full) vs local disk vs squashfuse
    NAT=$work/pull-bundle/rootfs
    if [ "$r" = 1 ] && command -v mksquashfs >/dev/null && command -v squashfuse >/dev/null; then
        mksquashfs "$NAT" "$work/tree.sqfs" -quiet -noappend >/dev/null 2>&1 || true
        mkdir -p "$work/sqmnt"; squashfuse "$work/tree.sqfs" "$work/sqmnt" 2>/dev/null || true
    fi
    # composefs kernel mount of the same image over the same (full) cache
    mkdir -p "$work/cfsmnt"
    "$BIN" mount-image "$REG/bench/img:gzip" "$work/cfsmnt" --cache-dir "$work/cache" \
        --insecure-registry "$REG" --registries-conf /dev/null 2>/dev/null || true
    for kind in AL NAT SQ CFS; do
        case $kind in AL) dir=$T ;; NAT) dir=$NAT ;; SQ) dir=$work/sqmnt ;; CFS) dir=$work/cfsmnt ;; esac
        if [ "$kind" = SQ ] && ! mountpoint -q "$work/sqmnt"; then continue; fi
        if [ "$kind" = CFS ] && ! mountpoint -q "$work/cfsmnt"; then continue; fi
        drop; t0=$(now); tar cf - -C "$dir" . > /dev/null 2>&1 || true; t1=$(now)
        eval "W_TAR_$kind+=(\"$(elapsed "$t0" "$t1")\")"
        drop; t0=$(now); find "$dir" -printf '%p %s %m %u %g %T@\n' > /dev/null; t1=$(now)
        eval "W_FIND_$kind+=(\"$(elapsed "$t0" "$t1")\")"
    done
    mountpoint -q "$work/cfsmnt" && umount "$work/cfsmnt"
    peak=$(rss_kb "$PID"); steady=$(rss_now_kb "$PID")
    RSS_PER+=("$(python3 -c "print(f'{($steady-$base_rss)*1024/$ENTRIES:.0f}')")")
    PEAK_PER+=("$(python3 -c "print(f'{($peak-$base_rss)*1024/$ENTRIES:.0f}')")")
    umount "$MNT"
    for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
done

# --- report ---------------------------------------------------------------------
export ROUNDS LAYER_SIZE ENTRIES UNCOMP IMAGE_DESC OUT SVG SMOKE
for v in C_BASE C_AL BYTES W_TAR_AL W_TAR_NAT W_TAR_SQ W_TAR_CFS W_FIND_AL W_FIND_NAT W_FIND_SQ W_FIND_CFS RSS_PER PEAK_PER; do
    eval "vals=\"\${$v[*]:-}\""
    export "M_$v=$vals"
done
export KERNEL="$(uname -r)" CPU="$(nproc) cores, $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ //')" MEM="$(free -g | awk '/Mem:/{print $2}') GiB"
python3 benches/report.py
echo "wrote $OUT and $SVG"
