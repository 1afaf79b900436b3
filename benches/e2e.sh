#!/usr/bin/env bash
# End-to-end benchmark: apt-layer against what users would pick instead,
# measured in one run on this machine, alternating, median and spread.
#
#   sudo benches/e2e.sh                 # Debian bookworm minbase image, 5 rounds → BENCHMARKS.md + benches/ratios.svg
#   sudo benches/e2e.sh --smoke --out F # tiny image, 1 round (runs in the test suite so this cannot rot)
#
# Measures, per round (page cache dropped before every timed step):
#   cold:   apt-layer first read of /etc/os-release + `chroot rootfs /bin/true` on an empty cache
#           (and the first read alone: served while the layer still streams),
#           for the image as gzip, eStargz and zstd:chunked (converted by containerd's ctr-remote)
#           vs `skopeo copy` + `umoci unpack` + the same read and chroot
#           vs ratarmount on the downloaded layer (curl of the blob + ratarmount + read + chroot)
#   bytes:  bytes the registry served for each cold start (its access log)
#   slow:   the same cold starts with the registry in a network namespace behind a veth pair
#           shaped with `tc tbf rate 100mbit`
#   warm:   `tar cf - rootfs` and `find rootfs -printf` on apt-layer (cache full; mounted rw, the
#           default, and `-o ro`) vs the unpacked
#           tree on local disk vs squashfuse of the same tree vs `apt-layer mount-image` (composefs,
#           kernel erofs + overlay over the same cache); tar's output goes through a pipe, since
#           GNU tar does not read file contents when writing to /dev/null
#   hot:    each of those walks run again at once, nothing dropped (apt-layer rw vs local disk)
#   spans:  size of the layer index (tar entries + gzip checkpoints) / uncompressed size, and bytes
#           fetched per evicted file read again (20 files under 1 MiB, cache bound 1 MiB)
#   export: `apt-layer export TREE REF` vs `umoci repack` + `skopeo copy` of the same tree, each
#           into a repository of its own (nothing to skip)
#   memory: daemon RSS per entry beyond a fixed base: what a 100k-file synthetic image adds to a
#           daemon that has served a 1k-file one (once); and, informational, per entry of the
#           Debian image beyond the RSS right after mount (after the warm runs, and peak)
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
NS=albench$$
cleanup() {
    mountpoint -q "$MNT" && umount "$MNT" || true
    mountpoint -q "$work/sqmnt" && umount "$work/sqmnt" || true
    mountpoint -q "$work/ratmnt" && fusermount -u "$work/ratmnt" || true
    mountpoint -q "$work/cfsmnt" && umount "$work/cfsmnt" || true
    mountpoint -q "$work/romnt" && umount "$work/romnt" || true
    [ -n "${REGPID:-}" ] && kill "$REGPID" 2>/dev/null || true
    [ -n "${NSREGPID:-}" ] && kill "$NSREGPID" 2>/dev/null || true
    [ -n "${CTRDPID:-}" ] && kill "$CTRDPID" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    ip link del "vh$$" 2>/dev/null || true
    sleep 0.3; rm -rf "$work"
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
# eStargz and zstd:chunked variants, made by containerd's own converter.
layer_size() {
    skopeo inspect --tls-verify=false --raw "docker://$REG/bench/img:$1" | python3 -c 'import json,sys;print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))'
}
mkdir -p "$work/ctrd"
cat > "$work/ctrd/config.toml" <<TOML
version = 2
root = "$work/ctrd/root"
state = "$work/ctrd/state"
[grpc]
  address = "$work/ctrd/sock"
[plugins."io.containerd.grpc.v1.cri"]
  disable = true
TOML
containerd --config "$work/ctrd/config.toml" > "$work/ctrd/log" 2>&1 &
CTRDPID=$!
for _ in $(seq 100); do ctr -a "$work/ctrd/sock" version >/dev/null 2>&1 && break; sleep 0.1; done
ctr -a "$work/ctrd/sock" content fetch --plain-http "$REG/bench/img:gzip" >/dev/null
for f in estargz zstdchunked; do
    ctr-remote -a "$work/ctrd/sock" images convert --oci "--$f" "$REG/bench/img:gzip" "$REG/bench/img:$f" >/dev/null
    ctr -a "$work/ctrd/sock" images push --plain-http "$REG/bench/img:$f" >/dev/null
done
kill "$CTRDPID"; wait "$CTRDPID" 2>/dev/null || true; CTRDPID=
SIZE_estargz=$(layer_size estargz); SIZE_zstdchunked=$(layer_size zstdchunked)
LAYER_DIGEST=$(skopeo inspect --tls-verify=false --raw "docker://$REG/bench/img:gzip" | python3 -c 'import json,sys;print(json.load(sys.stdin)["layers"][0]["digest"])')

# The same registry storage served from a network namespace behind a
# 100 Mbit/s link (tbf on both ends of a veth pair).
SLOW=0
if ip netns add "$NS" 2>/dev/null; then
    ip link add "vh$$" type veth peer name vp$$
    ip link set vp$$ netns "$NS"
    ip addr add 10.231.0.1/24 dev "vh$$"; ip link set "vh$$" up
    ip netns exec "$NS" ip addr add 10.231.0.2/24 dev vp$$
    ip netns exec "$NS" ip link set vp$$ up; ip netns exec "$NS" ip link set lo up
    tc qdisc add dev "vh$$" root tbf rate 100mbit burst 256kb latency 100ms
    ip netns exec "$NS" tc qdisc add dev vp$$ root tbf rate 100mbit burst 256kb latency 100ms
    SREG=10.231.0.2:5000
    sed "s/addr: $REG/addr: $SREG/" "$work/registry.yml" > "$work/registry-slow.yml"
    ip netns exec "$NS" docker-registry serve "$work/registry-slow.yml" > "$work/registry-slow.log" 2>&1 &
    NSREGPID=$!
    for _ in $(seq 100); do curl -fsS "http://$SREG/v2/" >/dev/null 2>&1 && SLOW=1 && break; sleep 0.1; done
fi
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
# Waits (at most 60 s) until the image whose `status` file is $1 is stored
# and its tree built: a walk can end before that (names come from a sketch
# of the tree while the contents are still being stored).
wait_stored() {
    python3 - "$1" <<'PY'
import json, sys, time
for _ in range(600):
    s = json.load(open(sys.argv[1]))
    if s.get("rootfs") == "ready" and all(l["state"] == "indexed" for l in s["layers"]):
        break
    time.sleep(0.1)
PY
}
rss_kb() { awk '/VmHWM/{print $2}' "/proc/$1/status"; }
rss_now_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
anon_kb() { awk '/RssAnon/{print $2}' "/proc/$1/status"; }

declare -a IDX_FRAC REFETCH C_BASE C_AL C_ESZ C_ZCH C_RAT BYTES B_ESZ B_ZCH S_BASE S_AL S_ESZ S_ZCH X_BASE X_AL
declare -a H_FIND_AL H_FIND_NAT H_TAR_AL H_TAR_NAT F_AL W_TAR_RO W_FIND_RO W_TAR_AL W_TAR_NAT W_TAR_SQ W_TAR_CFS W_FIND_AL W_FIND_NAT W_FIND_SQ W_FIND_CFS RSS_PER ANON_PER PEAK_PER

mount_al() {  # mount_al REGISTRY [-o OPTS] → PID of a daemon on an empty cache
    rm -rf "$work/cache"
    local reg=$1; shift
    "$BIN" mount "$MNT" --cache-dir "$work/cache" --insecure-registry "$reg" --registries-conf /dev/null -o timeout=120s "$@" >/dev/null
    pgrep -f -n -- " mount $MNT --cache-dir"
}
unmount_al() {
    umount "$MNT"
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
}
cold_al() {  # cold_al REGISTRY TAG → seconds for the first read + chroot (daemon left mounted);
             # the first read's own seconds go to $work/first
    local root=$MNT/$1/bench/img/$2/rootfs t0 t1 t2
    t0=$(now)
    cat "$root/etc/os-release" >/dev/null
    t1=$(now)
    chroot "$root" /bin/true
    t2=$(now); elapsed "$t0" "$t1" > "$work/first"; elapsed "$t0" "$t2"
}
cold_base() {  # cold_base REGISTRY → seconds for skopeo copy + umoci unpack + read + chroot
    rm -rf "$work/pull" "$work/pull-bundle"; drop
    local t0 t1
    t0=$(now)
    skopeo copy -q --src-tls-verify=false "docker://$1/bench/img:gzip" "oci:$work/pull:img"
    umoci unpack --image "$work/pull:img" "$work/pull-bundle" >/dev/null
    cat "$work/pull-bundle/rootfs/etc/os-release" >/dev/null
    chroot "$work/pull-bundle/rootfs" /bin/true
    t1=$(now); elapsed "$t0" "$t1"
}

for r in $(seq "$ROUNDS"); do
    # baseline: skopeo copy + umoci unpack + read + chroot
    C_BASE+=("$(cold_base "$REG")")

    # ratarmount on the downloaded layer: curl the blob, index it, read, chroot
    if command -v ratarmount >/dev/null; then
        rm -rf "$work/rat" "$work/ratmnt"; mkdir -p "$work/rat" "$work/ratmnt"; drop
        t0=$(now)
        curl -fsS "http://$REG/v2/bench/img/blobs/$LAYER_DIGEST" -o "$work/rat/layer.tar.gz"
        ratarmount -P "$(nproc)" --index-file "$work/rat/index.sqlite" "$work/rat/layer.tar.gz" "$work/ratmnt" >/dev/null 2>&1
        cat "$work/ratmnt/etc/os-release" >/dev/null
        chroot "$work/ratmnt" /bin/true
        t1=$(now); C_RAT+=("$(elapsed "$t0" "$t1")")
        fusermount -u "$work/ratmnt"
    fi

    # apt-layer, cold cache: eStargz and zstd:chunked first (lazy), then gzip
    # (without the background fill, so the bytes are what the cold start needs)
    for f in estargz zstdchunked; do
        drop; PID=$(mount_al "$REG" -o nobackground)
        off=$(stat -c %s "$work/registry.log")
        t=$(cold_al "$REG" "$f")
        sleep 0.2; b=$(blob_bytes "$off")
        case $f in estargz) C_ESZ+=("$t"); B_ESZ+=("$b") ;; zstdchunked) C_ZCH+=("$t"); B_ZCH+=("$b") ;; esac
        unmount_al "$PID"
    done
    drop; PID=$(mount_al "$REG")
    base_rss=$(rss_now_kb "$PID"); base_anon=$(anon_kb "$PID")
    off=$(stat -c %s "$work/registry.log")
    C_AL+=("$(cold_al "$REG" gzip)"); F_AL+=("$(cat "$work/first")")
    sleep 0.2; BYTES+=("$(blob_bytes "$off")")
    T=$MNT/$REG/bench/img/gzip/rootfs
    # The chroot returns while the layer's contents are still being stored
    # (a second pass behind the listing): the warm rows start from a full
    # cache, and nothing else streams the layer meanwhile.
    wait_stored "$MNT/$REG/bench/img/gzip/status"

    # warm: apt-layer (cache full) vs local disk vs squashfuse
    NAT=$work/pull-bundle/rootfs
    if [ "$r" = 1 ] && command -v mksquashfs >/dev/null && command -v squashfuse >/dev/null; then
        mksquashfs "$NAT" "$work/tree.sqfs" -quiet -noappend >/dev/null 2>&1 || true
        mkdir -p "$work/sqmnt"; squashfuse "$work/tree.sqfs" "$work/sqmnt" 2>/dev/null || true
    fi
    # composefs kernel mount of the same image over the same (full) cache
    mkdir -p "$work/cfsmnt"
    "$BIN" mount-image "$REG/bench/img:gzip" "$work/cfsmnt" --cache-dir "$work/cache" \
        --insecure-registry "$REG" --registries-conf /dev/null >/dev/null 2>&1 || true
    # the same cache through a second daemon mounted `-o ro` (read-only
    # superblock, no outbox/); one untimed pass first, as the first daemon had
    mkdir -p "$work/romnt"
    "$BIN" mount "$work/romnt" --cache-dir "$work/cache" --insecure-registry "$REG" \
        --registries-conf /dev/null -o ro >/dev/null
    RO=$work/romnt/$REG/bench/img/gzip/rootfs
    tar cf - -C "$RO" . 2>/dev/null | cat > /dev/null || true
    for kind in AL RO NAT SQ CFS; do
        case $kind in AL) dir=$T ;; RO) dir=$RO ;; NAT) dir=$NAT ;; SQ) dir=$work/sqmnt ;; CFS) dir=$work/cfsmnt ;; esac
        if [ "$kind" = SQ ] && ! mountpoint -q "$work/sqmnt"; then continue; fi
        if [ "$kind" = CFS ] && ! mountpoint -q "$work/cfsmnt"; then continue; fi
        drop; t0=$(now); tar cf - -C "$dir" . 2>/dev/null | cat > /dev/null || true; t1=$(now)
        eval "W_TAR_$kind+=(\"$(elapsed "$t0" "$t1")\")"
        if [ "$kind" = AL ] || [ "$kind" = NAT ]; then
            t0=$(now); tar cf - -C "$dir" . 2>/dev/null | cat > /dev/null || true; t1=$(now)
            eval "H_TAR_$kind+=(\"$(elapsed "$t0" "$t1")\")"
        fi
        drop; t0=$(now); find "$dir" -printf '%p %s %m %u %g %T@\n' > /dev/null; t1=$(now)
        eval "W_FIND_$kind+=(\"$(elapsed "$t0" "$t1")\")"
        # hot: the same walk again, nothing dropped (what a second pass of a
        # build or a backup sees)
        if [ "$kind" = AL ] || [ "$kind" = NAT ]; then
            t0=$(now); find "$dir" -printf '%p %s %m %u %g %T@\n' > /dev/null; t1=$(now)
            eval "H_FIND_$kind+=(\"$(elapsed "$t0" "$t1")\")"
        fi
    done
    mountpoint -q "$work/cfsmnt" && umount "$work/cfsmnt"
    umount "$work/romnt"
    peak=$(rss_kb "$PID"); steady=$(rss_now_kb "$PID")
    RSS_PER+=("$(python3 -c "print(f'{($steady-$base_rss)*1024/$ENTRIES:.0f}')")")
    ANON_PER+=("$(python3 -c "print(f'{($(anon_kb "$PID")-$base_anon)*1024/$ENTRIES:.0f}')")")
    PEAK_PER+=("$(python3 -c "print(f'{($peak-$base_rss)*1024/$ENTRIES:.0f}')")")
    unmount_al "$PID"

    # gzip span index: its size, and what refetching an evicted file costs.
    # The same cache is mounted again with a 1 MiB bound (nearly everything
    # is evicted); 20 regular files spread over the layer are read, among
    # those the bound can hold (a larger file is refused: EIO).
    IDX_FRAC+=("$(python3 -c "import glob,os;print(sum(os.path.getsize(f) for f in glob.glob('$work/cache/layers/*.idx'))/$UNCOMP)")")
    "$BIN" mount "$MNT" --cache-dir "$work/cache" --cache-size 1m --insecure-registry "$REG" --registries-conf /dev/null >/dev/null
    PID=$(pgrep -f -n -- " mount $MNT --cache-dir")
    (cd "$NAT" && find . -type f -size +0 -size -1024k -printf '%P\n' | sort | awk 'NR % 97 == 1' | head -20) > "$work/sample"
    off=$(stat -c %s "$work/registry.log"); n=0
    while read -r f; do cat "$T/$f" > /dev/null; n=$((n + 1)); done < "$work/sample"
    sleep 0.2; REFETCH+=("$(( $(blob_bytes "$off") / (n > 0 ? n : 1) ))")
    unmount_al "$PID"

    # the same cold starts over a 100 Mbit/s link
    if [ "$SLOW" = 1 ]; then
        S_BASE+=("$(cold_base "$SREG")")
        for f in gzip estargz zstdchunked; do
            drop; PID=$(mount_al "$SREG" -o nobackground)
            t=$(cold_al "$SREG" "$f")
            case $f in gzip) S_AL+=("$t") ;; estargz) S_ESZ+=("$t") ;; zstdchunked) S_ZCH+=("$t") ;; esac
            unmount_al "$PID"
        done
    fi

    # export: umoci repack + skopeo copy vs apt-layer export, fresh repositories
    rm -rf "$work/xl" "$work/xb"
    umoci init --layout "$work/xl" >/dev/null; umoci new --image "$work/xl:img" >/dev/null
    umoci unpack --image "$work/xl:img" "$work/xb" >/dev/null
    cp -a "$SRC/." "$work/xb/rootfs/"
    drop; t0=$(now)
    umoci repack --image "$work/xl:img" "$work/xb" >/dev/null
    skopeo copy -q --dest-tls-verify=false "oci:$work/xl:img" "docker://$REG/export/base$r:1"
    t1=$(now); X_BASE+=("$(elapsed "$t0" "$t1")")
    drop; t0=$(now)
    "$BIN" export "$SRC" "$REG/export/al$r:1" --insecure-registry "$REG" --registries-conf /dev/null --tmp-dir "$work" >/dev/null 2>&1
    t1=$(now); X_AL+=("$(elapsed "$t0" "$t1")")
    rm -rf "$work/xl" "$work/xb"
done

# --- memory on synthetic images of 1k and 100k files (once) ---------------------
# One daemon serves the small image, then the large one: what the large one
# adds, per entry, is the cost per entry beyond a fixed base (the daemon's
# code pages, HTTP client, thread stacks and FUSE buffers are paid by then).
N_SYN=100000; [ "$SMOKE" = 1 ] && N_SYN=2000
N_SMALL=$((N_SYN / 100))
syn_tree() {
    python3 - "$1" "$2" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for d in range(max(n // 100, 1)):
    os.makedirs(f"{root}/d{d:04}", exist_ok=True)
for i in range(n):
    with open(f"{root}/d{i // 100:04}/f{i:06}", "w") as f:
        f.write(f"file {i}\n")
PY
}
SYN=$work/syn; SMALL=$work/syn-small; mkdir -p "$SYN" "$SMALL"
syn_tree "$SYN" "$N_SYN"; syn_tree "$SMALL" "$N_SMALL"
"$BIN" export "$SYN" "$REG/bench/syn:1" --insecure-registry "$REG" --registries-conf /dev/null --tmp-dir "$work" >/dev/null 2>&1
"$BIN" export "$SMALL" "$REG/bench/syn-small:1" --insecure-registry "$REG" --registries-conf /dev/null --tmp-dir "$work" >/dev/null 2>&1
SYN_ENTRIES=$(find "$SYN" | wc -l); SMALL_ENTRIES=$(find "$SMALL" | wc -l)
PID=$(mount_al "$REG")
base_rss=$(rss_now_kb "$PID")
# RSS once each image is stored: what the daemon keeps serving it (the walk
# may end while the contents are still being stored).
find "$MNT/$REG/bench/syn-small/1/rootfs" -printf '%p %s\n' > /dev/null
wait_stored "$MNT/$REG/bench/syn-small/1/status"
small_rss=$(rss_now_kb "$PID")
find "$MNT/$REG/bench/syn/1/rootfs" -printf '%p %s\n' > /dev/null
wait_stored "$MNT/$REG/bench/syn/1/status"
peak=$(rss_kb "$PID"); steady=$(rss_now_kb "$PID")
SYN_SLOPE=$(python3 -c "print(f'{($steady-$small_rss)*1024/$SYN_ENTRIES:.0f}')")
SYN_RSS=$(python3 -c "print(f'{($steady-$base_rss)*1024/($SYN_ENTRIES+$SMALL_ENTRIES):.0f}')")
SYN_PEAK=$(python3 -c "print(f'{($peak-$base_rss)*1024/($SYN_ENTRIES+$SMALL_ENTRIES):.0f}')")
unmount_al "$PID"
rm -rf "$SYN" "$SMALL"

# --- report ---------------------------------------------------------------------
export ROUNDS LAYER_SIZE SIZE_estargz SIZE_zstdchunked ENTRIES UNCOMP IMAGE_DESC OUT SVG SMOKE SLOW SYN_ENTRIES SMALL_ENTRIES SYN_RSS SYN_SLOPE SYN_PEAK
for v in H_FIND_AL H_FIND_NAT H_TAR_AL H_TAR_NAT F_AL W_TAR_RO W_FIND_RO IDX_FRAC REFETCH C_BASE C_AL C_ESZ C_ZCH C_RAT BYTES B_ESZ B_ZCH S_BASE S_AL S_ESZ S_ZCH X_BASE X_AL W_TAR_AL W_TAR_NAT W_TAR_SQ W_TAR_CFS W_FIND_AL W_FIND_NAT W_FIND_SQ W_FIND_CFS RSS_PER ANON_PER PEAK_PER; do
    eval "vals=\"\${$v[*]:-}\""
    export "M_$v=$vals"
done
export KERNEL="$(uname -r)" CPU="$(nproc) cores, $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ //')" MEM="$(free -g | awk '/Mem:/{print $2}') GiB"
python3 benches/report.py
echo "wrote $OUT and $SVG"
