//! composefs (DESIGN.md §2, §4): `<tag>/image.cfs` and `apt-layer
//! mount-image` through the real kernel — EROFS plus an overlay whose
//! data-only lower layer is the cache's `objects/`. The oracle is `umoci
//! unpack`, compared entry by entry; mounts are checked to be gone after
//! `umount` in /proc/self/mountinfo; object sharing, pinning against
//! eviction, damaged and missing objects.
//!
//! These tests need root, erofs and overlay: without them they fail (the
//! mount fails), they never skip.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::edge::*;
use common::*;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("apt-layer-cfs-")
        .tempdir()
        .unwrap()
}

/// Lines of /proc/self/mountinfo as (mount point, fs type, whole line).
fn mounts() -> Vec<(String, String, String)> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split(' ').nth(4)?.replace("\\040", " ");
            let fstype = post.split(' ').next()?.to_string();
            Some((mp, fstype, l.to_string()))
        })
        .collect()
}

/// erofs or overlay mounts that mention `cache` (the helper mounts live
/// under it, the overlay's lowerdir names its objects).
fn composefs_mounts_of(cache: &Path) -> Vec<String> {
    let c = cache.to_string_lossy().into_owned();
    mounts()
        .into_iter()
        .filter(|(_, t, l)| (t == "erofs" || t == "overlay") && l.contains(&c))
        .map(|(_, _, l)| l)
        .collect()
}

/// `apt-layer mount-image REF DIR --cache-dir CACHE --insecure-registry H`.
fn mount_image(
    reg: &Registry,
    reference: &str,
    dir: &Path,
    cache: &Path,
    extra: &[&str],
) -> CliOutput {
    let (d, c, h) = (
        dir.display().to_string(),
        cache.display().to_string(),
        reg.host(),
    );
    let mut args = vec![
        "mount-image",
        reference,
        &d,
        "--cache-dir",
        &c,
        "--insecure-registry",
        &h,
    ];
    args.extend_from_slice(extra);
    apt_layer(&args, Duration::from_secs(180))
}

/// Mounts `reference` on a new directory under `work`; panics on failure.
fn mounted(reg: &Registry, reference: &str, work: &Path, name: &str, cache: &Path) -> KernelMount {
    let dir = work.join(name);
    fs::create_dir_all(&dir).unwrap();
    let out = mount_image(reg, reference, &dir, cache, &[]);
    let guard = KernelMount(dir.clone());
    assert!(
        out.status.success(),
        "mount-image {reference} failed ({}):\n{}",
        out.status,
        out.stderr
    );
    assert!(
        is_mountpoint(&dir),
        "{} is not a mount point",
        dir.display()
    );
    guard
}

/// The edge-case image pushed as `HOST/edge:1` to a fresh registry: the
/// registry, its host and the `umoci unpack` oracle.
fn edge_in_registry(work: &Path) -> (Registry, String, PathBuf) {
    let (layout, oracle) = edge_image(work);
    let reg = Registry::start();
    let h = reg.host();
    push(
        &layout_ref(&layout, "edge"),
        &format!("{h}/edge:1"),
        Format::Oci,
    );
    (reg, h, oracle)
}

fn pin_files(cache: &Path) -> Vec<PathBuf> {
    fs::read_dir(cache.join("pins"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

#[test]
fn mount_image_of_edge_and_busybox_equals_umoci_unpack_and_umount_leaves_nothing() {
    require_env();
    let work = tempdir();
    let (reg, h, oracle) = edge_in_registry(work.path());
    let bb_layout = busybox_image(&work.path().join("bb"), "bb");
    let bb_oracle = umoci_unpack(
        &layout_ref(&bb_layout, "bb"),
        &work.path().join("bundle-bb"),
    );
    push(
        &layout_ref(&bb_layout, "bb"),
        &format!("{h}/busybox:1"),
        Format::V2s2,
    );
    let cache = work.path().join("cache");
    // Helpers as a mount-image killed mid-mount leaves them (a dead pid),
    // and as one mounting right now has them (a live pid: ours).
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        c.wait().unwrap();
        c.id()
    };
    let stale = cache.join(format!("mnt/old.{dead}"));
    let busy = cache.join(format!("mnt/new.{}", std::process::id()));
    for d in [&stale, &busy] {
        fs::create_dir_all(d).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "helper"])
            .arg(d)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", d.display());
    }
    let (_stale_guard, busy_guard) = (KernelMount(stale.clone()), KernelMount(busy.clone()));

    let mut edge = mounted(&reg, &format!("{h}/edge:1"), work.path(), "edge", &cache);
    assert!(
        !is_mountpoint(&stale) && !stale.exists(),
        "a dead mount-image's helper is unmounted and removed"
    );
    assert!(
        is_mountpoint(&busy),
        "a live process's helper is left alone"
    );
    drop(busy_guard);
    fs::remove_dir(&busy).unwrap();
    assert_trees_equal(&edge.0, &oracle, "mount-image of the edge-case image");
    // Hard links stay one inode through the kernel mount.
    let ino = |p: &str| fs::symlink_metadata(edge.0.join(p)).unwrap().ino();
    assert_eq!(ino("var/link2lower"), ino("var/lowerfile"));
    assert_eq!(ino("usr/bin/su-link"), ino("usr/bin/su"));
    assert_eq!(pin_files(&cache).len(), 1, "a mounted image is pinned");

    let mut bb = mounted(&reg, &format!("{h}/busybox:1"), work.path(), "bb", &cache);
    assert_trees_equal(&bb.0, &bb_oracle, "mount-image of the busybox image");
    let out = Command::new("chroot")
        .arg(&bb.0)
        .args(["/bin/sh", "-c", "cat /etc/motd; echo ok"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a busybox image\nok\n",
        "chroot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pin_files(&cache).len(), 2);
    assert!(!composefs_mounts_of(&cache).is_empty());

    edge.umount();
    bb.umount();
    let left = composefs_mounts_of(&cache);
    assert!(
        left.is_empty(),
        "mounts left behind after umount: {left:#?}"
    );
    assert!(
        fs::read_dir(cache.join("mnt")).map_or(true, |mut d| d.next().is_none()),
        "helper directories left in {}/mnt",
        cache.display()
    );
    // The pins of unmounted images are dropped by the next gc.
    let out = cache_cmd(&cache, &["gc", "--cache-size", "1G"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        pin_files(&cache).is_empty(),
        "stale pins: {:?}",
        pin_files(&cache)
    );
}

#[test]
fn image_cfs_copied_from_fuse_mounts_by_hand_and_is_built_once() {
    require_env();
    let work = tempdir();
    let (_reg, h, oracle) = edge_in_registry(work.path());
    let cache = work.path().join("cache");
    let digest;
    let copied = work.path().join("edge.cfs");
    {
        let m = Mount::builder().insecure(&h).cache_dir(&cache).start();
        let tag = m.join(format!("{h}/edge/1"));
        assert!(list(&tag).unwrap().iter().any(|n| n == "image.cfs"));
        digest = read_string(tag.join("digest")).unwrap().trim().to_string();
        // Looking is not opening: `stat` does not build (it would stream
        // every layer), so the size is 0 until the first open.
        assert_eq!(stat(tag.join("image.cfs")).unwrap().len(), 0);
        assert!(!m.log().contains("image.cfs built"), "{}", m.log());
        // cp opens it (which builds), then learns the size from fstat.
        let st = Command::new("cp")
            .arg(tag.join("image.cfs"))
            .arg(&copied)
            .status()
            .unwrap();
        assert!(st.success());
        let bytes = fs::read(&copied).unwrap();
        let size = stat(tag.join("image.cfs")).unwrap().len();
        assert!(size > 0);
        assert_eq!(bytes.len() as u64, size, "cp got every byte");
        assert_eq!(&bytes[1024..1028], &[0xe2, 0xe1, 0xf5, 0xe0], "EROFS magic");
        let pinned = read(m.join(format!("{h}/edge/@{digest}/image.cfs"))).unwrap();
        assert_eq!(pinned, bytes, "@sha256: image.cfs differs from the tag's");
        let cached = cache.join(format!("images/{}.cfs", hex_of(&digest)));
        assert_eq!(
            fs::read(&cached).unwrap(),
            bytes,
            "persisted by manifest digest"
        );
    }

    // By hand: erofs of the copy, overlay with the objects as data-only layer.
    let lower = work.path().join("lower");
    let root = work.path().join("root");
    fs::create_dir_all(&lower).unwrap();
    fs::create_dir_all(&root).unwrap();
    let run_mount = |args: &[&str]| {
        let out = Command::new("mount").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "mount {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run_mount(&[
        "-t",
        "erofs",
        "-o",
        "ro",
        copied.to_str().unwrap(),
        lower.to_str().unwrap(),
    ]);
    let _lower_guard = KernelMount(lower.clone());
    let opts = format!(
        "ro,metacopy=on,redirect_dir=on,lowerdir={}::{}",
        lower.display(),
        cache.join("objects").display()
    );
    run_mount(&[
        "-t",
        "overlay",
        "overlay",
        "-o",
        &opts,
        root.to_str().unwrap(),
    ]);
    let mut root_guard = KernelMount(root.clone());
    assert_trees_equal(&root, &oracle, "hand-mounted image.cfs");
    root_guard.umount();

    // After a restart the image is served from the cache, not rebuilt.
    let cached = cache.join(format!("images/{}.cfs", hex_of(&digest)));
    let before = fs::metadata(&cached).unwrap().ino();
    {
        let m = Mount::builder().insecure(&h).cache_dir(&cache).start();
        let cfs = m.join(format!("{h}/edge/1/image.cfs"));
        let built = fs::read(&copied).unwrap();
        assert_eq!(
            stat(&cfs).unwrap().len(),
            built.len() as u64,
            "built before"
        );
        let bytes = read(&cfs).unwrap();
        assert_eq!(bytes, built);
        assert_eq!(
            fs::metadata(&cached).unwrap().ino(),
            before,
            "rebuilt after restart"
        );
        assert!(!m.log().contains("image.cfs built"), "rebuilt: {}", m.log());
    }
    // A damaged cached image is rebuilt, never served.
    flip_byte(&cached, 1500);
    {
        let m = Mount::builder().insecure(&h).cache_dir(&cache).start();
        let bytes = read(m.join(format!("{h}/edge/1/image.cfs"))).unwrap();
        assert_eq!(
            bytes,
            fs::read(&copied).unwrap(),
            "damaged image.cfs served"
        );
        assert!(m.log().contains("building it again"), "{}", m.log());
    }
}

fn shared_layers(seed_own: u64) -> Vec<Vec<TarEntry>> {
    vec![vec![
        TarEntry::dir("./"),
        TarEntry::dir("data/"),
        TarEntry::file("data/shared.bin", pseudo_random(100, 1 << 20)),
        TarEntry::file("data/own.bin", pseudo_random(seed_own, 300 << 10)),
        TarEntry::file("data/small", format!("small {seed_own}\n")),
    ]]
}

#[test]
fn two_images_sharing_files_use_the_same_objects() {
    require_env();
    let work = tempdir();
    let la = make_tar_image(&work.path().join("a"), "a", &shared_layers(1));
    let lb = make_tar_image(&work.path().join("b"), "b", &shared_layers(2));
    let reg = Registry::start();
    let h = reg.host();
    push(&layout_ref(&la, "a"), &format!("{h}/a:1"), Format::Oci);
    push(&layout_ref(&lb, "b"), &format!("{h}/b:1"), Format::Oci);
    let cache = work.path().join("cache");
    let ma = mounted(&reg, &format!("{h}/a:1"), work.path(), "a", &cache);
    let mb = mounted(&reg, &format!("{h}/b:1"), work.path(), "b", &cache);
    // shared.bin once, own.bin twice, small twice.
    let objects = object_files(&cache);
    assert_eq!(objects.len(), 5, "objects: {objects:#?}");
    let shared = pseudo_random(100, 1 << 20);
    assert_eq!(fs::read(ma.0.join("data/shared.bin")).unwrap(), shared);
    assert_eq!(fs::read(mb.0.join("data/shared.bin")).unwrap(), shared);
    assert!(objects.contains(&object_path(&cache, &sha256_hex(&shared))));
    assert_eq!(
        fs::read(mb.0.join("data/own.bin")).unwrap(),
        pseudo_random(2, 300 << 10)
    );
}

#[test]
fn damaged_object_is_refetched_before_mounting_and_missing_one_is_an_error() {
    require_env();
    let work = tempdir();
    let (reg, h, oracle) = edge_in_registry(work.path());
    let cache = work.path().join("cache");
    let mut m = mounted(&reg, &format!("{h}/edge:1"), work.path(), "edge", &cache);
    m.umount();

    let big = pseudo_random(1, 9 << 20);
    let big_obj = object_path(&cache, &sha256_hex(&big));
    flip_byte(&big_obj, 4096);
    let dir = work.path().join("edge");
    let out = mount_image(&reg, &format!("{h}/edge:1"), &dir, &cache, &[]);
    let _m = KernelMount(dir.clone());
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("(1 fetched again)"), "{}", out.stderr);
    drop_caches();
    assert_eq!(
        sha256_hex(&fs::read(dir.join("usr/lib/big.bin")).unwrap()),
        sha256_hex(&big)
    );
    assert_trees_equal(&dir, &oracle, "after refetching a damaged object");

    // Damaged behind the mount's back: without fs-verity overlay does not
    // check data, so the kernel serves the damaged bytes; `cache verify`
    // names the object and removes it, after which reading fails.
    flip_byte(&big_obj, 4096);
    drop_caches();
    let got = fs::read(dir.join("usr/lib/big.bin"));
    eprintln!(
        "read of a damaged object through the kernel mount: {}",
        match &got {
            Ok(b) if sha256_hex(b) == sha256_hex(&big) => "right bytes".to_string(),
            Ok(_) => "wrong bytes (no fs-verity)".to_string(),
            Err(e) => format!("error {e}"),
        }
    );
    let out = cache_cmd(&cache, &["verify"]);
    assert!(!out.status.success(), "verify found nothing");
    let named = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        named.contains(&big_obj.display().to_string()),
        "verify did not name {}: {named}",
        big_obj.display()
    );
    assert!(!big_obj.exists());
    drop_caches();
    let e = errno_of(fs::read(dir.join("usr/lib/big.bin")));
    eprintln!(
        "read of a removed object through the kernel mount: {}",
        errno_name(e)
    );
    assert!(
        e == libc::EIO || e == libc::ENOENT,
        "reading a file whose object is gone gave errno {e} ({})",
        errno_name(e)
    );
}

#[test]
fn a_mounted_images_objects_are_not_evicted_until_unmounted() {
    require_env();
    let work = tempdir();
    let (reg, h, oracle) = edge_in_registry(work.path());
    let cache = work.path().join("cache");
    let mut m = mounted(&reg, &format!("{h}/edge:1"), work.path(), "edge", &cache);
    // Every content the mounted tree has (objects of files that upper
    // layers removed are not pinned, and may go).
    let snap = snapshot_tree(&oracle);
    let needed: Vec<PathBuf> = snap
        .nodes
        .values()
        .filter_map(|n| n.sha256.clone())
        .map(|h| object_path(&cache, &h))
        .collect();
    assert!(needed.len() > 20);
    let out = cache_cmd(&cache, &["gc", "--cache-size", "1"]);
    assert!(out.status.success(), "{}", out.stderr);
    let left = object_files(&cache);
    let gone: Vec<_> = needed.iter().filter(|p| !left.contains(p)).collect();
    assert!(
        gone.is_empty(),
        "gc evicted objects of a mounted image: {gone:#?}"
    );
    drop_caches();
    assert_trees_equal(&m.0, &oracle, "mounted image after gc");
    assert_eq!(cache_stats(&cache)["pins"], 1);

    m.umount();
    let out = cache_cmd(&cache, &["gc", "--cache-size", "1"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(object_files(&cache).len() <= 1, "not evicted after umount");
    assert!(pin_files(&cache).is_empty());
    assert_eq!(cache_stats(&cache)["pins"], 0);
}
