//! `<tag>/rootfs` and the content cache through a real FUSE mount
//! (DESIGN.md §2, §5): the merged tree against `umoci unpack` (the oracle)
//! for every layer format, laziness and streaming seen in the registry's
//! access log, chroot into a busybox image, the content-addressed cache
//! (restart, eviction, sharing, corruption, `cache stats|verify|gc`), the
//! `status` file, and bad layers (escaping paths, corrupt gzip, bytes that
//! fail their digest, files beyond the cache bound, GNU sparse entries, a
//! layer size a manifest lies about). Sparse files in GNU tar's PAX form
//! are made by GNU tar itself.
//!
//! Test images are hand-written tar layers ([`TarEntry`], added with
//! `umoci raw add-layer`) so that every edge case is exactly what the test
//! says; one test uses umoci's own `insert` layers, which Debian's umoci
//! 0.4.7 writes without the tar padding and end-of-archive blocks.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::edge::*;
use common::*;
use serde_json::Value;

const EIO: i32 = libc::EIO;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("apt-layer-rootfs-")
        .tempdir()
        .unwrap()
}

fn rootfs(m: &Mount, host: &str, repo: &str, tag: &str) -> PathBuf {
    m.join(format!("{host}/{repo}/{tag}/rootfs"))
}

/// A mount of `reg` with its own fresh cache.
fn mount_of(reg: &Registry) -> Mount {
    Mount::builder().insecure(&reg.host()).start()
}

/// A mount of `reg` on the cache directory `cache`, with more arguments.
fn mount_on_cache(reg: &Registry, cache: &Path, args: &[&str]) -> Mount {
    let mut b = Mount::builder().insecure(&reg.host()).cache_dir(cache);
    for a in args {
        b = b.arg(a);
    }
    b.start()
}

/// sha256 hex of every regular file of a (local) tree.
fn content_hashes(root: &Path) -> BTreeSet<String> {
    let snap = snapshot_tree(root);
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    snap.nodes
        .values()
        .filter_map(|n| n.sha256.clone())
        .collect()
}

/// Waits (≤ 10 s) until a new line of the daemon log (after byte `since`)
/// is a WARN or ERROR line containing one of `needles`; panics otherwise.
fn assert_log_line(m: &Mount, since: usize, needles: &[&str], what: &str) {
    let found = wait_until(Duration::from_secs(10), || {
        let log = m.log();
        log.get(since..).unwrap_or_default().lines().any(|l| {
            (l.contains("ERROR") || l.contains("WARN")) && needles.iter().any(|n| l.contains(n))
        })
    });
    assert!(
        found,
        "{what}: no WARN/ERROR line in the daemon log naming any of {needles:?}; log since then:\n{}",
        tail(m.log().get(since..).unwrap_or_default(), 40)
    );
}

/// Runs `cmd` and returns (status, stdout, stderr), killing it after
/// `limit` (then panics: a hang).
fn run_bounded(cmd: &mut Command, limit: Duration) -> (std::process::ExitStatus, String, String) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?} (hang)");
        }
        thread::sleep(Duration::from_millis(20));
    };
    (
        status,
        fs::read_to_string(out.path()).unwrap(),
        fs::read_to_string(err.path()).unwrap(),
    )
}

/// Drops the page cache of one file of the mount (and, best effort, all
/// clean caches) so that its next read reaches the daemon.
fn evict_page_cache(p: &Path) {
    let p2 = p.to_path_buf();
    within(FS_GUARD, "fadvise", move || {
        if let Ok(f) = fs::File::open(&p2) {
            use std::os::fd::AsRawFd;
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    });
    drop_caches();
}

/// (status, bytes sent) of every `GET` of blob `digest` in the registry's
/// access log from `offset` on (`"GET /v2/…/blobs/<digest> HTTP/1.1" 206 …`).
fn blob_get_responses_since(reg: &Registry, offset: usize, digest: &str) -> Vec<(u16, u64)> {
    let blob = format!("/blobs/{digest} ");
    reg.log_since(offset)
        .lines()
        .filter_map(|l| {
            let start = l.find('"')? + 1;
            let rest = &l[start..];
            let end = rest.find('"')?;
            let req = &rest[..end];
            if !(req.starts_with("GET ") && req.contains(&blob) && req.contains(" HTTP/")) {
                return None;
            }
            let mut it = rest[end + 1..].split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect()
}

/// The hex part of a `sha256:` digest.
fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

// The edge-case image lives in common::edge (composefs tests use it too).

fn layer_media_types(host: &str, repo: &str, tag: &str) -> Vec<String> {
    let (bytes, _) = get_manifest(host, repo, tag, None);
    let m: Value = serde_json::from_slice(&bytes).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------
// The oracle itself
// ---------------------------------------------------------------------------

/// compare_trees finds nothing between two unpacks of one image (nothing
/// nondeterministic is compared) and finds each kind of change.
#[test]
fn compare_trees_is_deterministic_and_catches_differences() {
    require_env();
    let work = tempdir();
    let (layout, a) = edge_image(work.path());
    let b = umoci_unpack(&layout_ref(&layout, "edge"), &work.path().join("bundle-b"));
    let diffs = compare_trees(&b, &a);
    assert!(diffs.is_empty(), "two umoci unpacks differ: {diffs:#?}");

    // Break one property per path and expect a difference naming it.
    fs::set_permissions(
        b.join("usr/bin/su"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    fs::write(b.join("wh/keep"), "changed\n").unwrap();
    fs::remove_file(b.join("var/hl_c")).unwrap();
    fs::copy(b.join("var/hl_b"), b.join("var/hl_c")).unwrap();
    let c = std::ffi::CString::new(b.join("xdir").as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new("user.dir").unwrap();
    assert_eq!(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }, 0);
    fs::remove_file(b.join("etc/abs")).unwrap();
    std::os::unix::fs::symlink("/usr/bin/other", b.join("etc/abs")).unwrap();
    fs::write(b.join("extra"), "x").unwrap();
    let diffs = compare_trees(&b, &a).join("\n");
    for want in [
        "\"usr/bin/su\": mode",
        "\"wh/keep\": content",
        "hard-link group",
        "\"xdir\": xattrs",
        "\"etc/abs\": symlink target",
        "\"extra\": extra in ours",
        "\"var/hl_c\": mtime",
    ] {
        assert!(diffs.contains(want), "no {want:?} in:\n{diffs}");
    }
}

// ---------------------------------------------------------------------------
// rootfs equals umoci unpack
// ---------------------------------------------------------------------------

#[test]
fn rootfs_equals_umoci_unpack_edge_cases() {
    require_env();
    let work = tempdir();
    let (layout, oracle) = edge_image(work.path());
    let reg = Registry::start();
    let h = reg.host();
    let image = layout_ref(&layout, "edge");
    push(&image, &format!("{h}/edge/oci:1"), Format::Oci);
    push(&image, &format!("{h}/edge/v2s2:1"), Format::V2s2);
    assert!(
        layer_media_types(&h, "edge/oci", "1")
            .iter()
            .all(|t| t == "application/vnd.oci.image.layer.v1.tar+gzip")
    );
    assert!(
        layer_media_types(&h, "edge/v2s2", "1")
            .iter()
            .all(|t| t == "application/vnd.docker.image.rootfs.diff.tar.gzip")
    );
    let m = mount_of(&reg);
    assert_trees_equal(&rootfs(&m, &h, "edge/oci", "1"), &oracle, "OCI tar+gzip");
    assert_trees_equal(
        &rootfs(&m, &h, "edge/v2s2", "1"),
        &oracle,
        "Docker v2s2 tar.gzip",
    );
}

/// A layer that names a path more than once: the later entry wins, as in
/// `umoci unpack` (and GNU tar), whatever the two kinds are. A hard link
/// made before its target is replaced keeps the old content.
#[test]
fn duplicate_entries_in_one_layer_equal_umoci_unpack() {
    require_env();
    let layers = vec![
        vec![
            TarEntry::dir("./"),
            TarEntry::dir("base/"),
            TarEntry::file("base/keep", "lower\n"),
            TarEntry::dir("base/sub/"),
            TarEntry::file("base/sub/child", "lower child\n"),
        ],
        vec![
            TarEntry::dir("dup/").mtime(1_600_000_000),
            // Same kind twice.
            TarEntry::file("dup/f", "first\n").mode(0o600),
            TarEntry::file("dup/f", "second, longer\n").mode(0o644),
            TarEntry::symlink("dup/s", "first-target"),
            TarEntry::symlink("dup/s", "second-target"),
            TarEntry::dir("dup/d/").mode(0o755).mtime(1_600_000_001),
            TarEntry::file("dup/d/child", "child\n"),
            TarEntry::dir("dup/d/").mode(0o700).mtime(1_600_000_002),
            // A file, then a directory of the same name, and the reverse.
            TarEntry::file("dup/x", "was a file\n"),
            TarEntry::dir("dup/x/"),
            TarEntry::file("dup/x/in", "in x\n"),
            TarEntry::dir("dup/y/"),
            TarEntry::file("dup/y/in", "gone with y\n"),
            TarEntry::file("dup/y", "now a file\n"),
            // A hard link to the final entry, and one to a replaced one.
            TarEntry::hardlink("dup/f-link", "dup/f"),
            TarEntry::file("dup/g", "old g\n"),
            TarEntry::hardlink("dup/g-old", "dup/g"),
            TarEntry::file("dup/g", "new g\n"),
            // Twice over a lower layer's file and directory.
            TarEntry::file("base/keep", "upper one\n"),
            TarEntry::file("base/keep", "upper two\n"),
            TarEntry::file("base/sub", "sub replaced\n"),
            TarEntry::dir("base/sub/"),
            TarEntry::file("base/sub/new", "new child\n"),
        ],
    ];
    served_as_umoci_unpacks(&layers, "duplicate entries", |oracle| {
        // The oracle is what the test means (so the comparison is not vacuous).
        let read = |p: &str| fs::read_to_string(oracle.join(p)).unwrap();
        assert_eq!(read("dup/f"), "second, longer\n");
        assert_eq!(read("dup/g-old"), "old g\n");
        assert_eq!(read("dup/g"), "new g\n");
        assert_eq!(read("dup/y"), "now a file\n");
        assert_eq!(read("base/keep"), "upper two\n");
        assert!(!oracle.join("base/sub/child").exists());
    });
}

/// Sparse files as GNU tar writes them with `--sparse --format=posix`, in
/// each of its three PAX versions (a layer each; 1.0 is GNU tar's default,
/// its map at the start of the data): shown expanded, as `umoci unpack`
/// shows them, with the file after each one intact.
#[test]
fn sparse_files_from_gnu_tar_equal_umoci_unpack() {
    require_env();
    let work = tempdir();
    let layout = work.path().join("oci");
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    let image = layout_ref(&layout, "sparse");
    run(Command::new("umoci").args(["new", "--image", &image]));
    let mib = 1u64 << 20;
    // (name, size, data regions)
    type Sparse<'a> = (&'a str, u64, &'a [(u64, usize)]);
    let files: &[Sparse] = &[
        ("head", mib, &[(0, 5000)]),
        (
            "middle",
            3 * mib,
            &[(100_000, 7000), (mib + 4096, 4096), (2 * mib, 1)],
        ),
        ("tail", mib + 1, &[(mib - 8191, 8192)]),
        ("holes-only", 256 << 10, &[]),
    ];
    for version in ["0.0", "0.1", "1.0"] {
        let src = work.path().join(format!("src-{version}"));
        let dir = src.join(format!("sparse-{version}"));
        fs::create_dir_all(&dir).unwrap();
        for (i, (name, size, regions)) in files.iter().enumerate() {
            let f = fs::File::create(dir.join(name)).unwrap();
            f.set_len(*size).unwrap();
            for (j, (at, len)) in regions.iter().enumerate() {
                let byte = b'a' + (i * 4 + j) as u8;
                std::os::unix::fs::FileExt::write_all_at(&f, &vec![byte; *len], *at).unwrap();
            }
        }
        fs::write(dir.join("zz-after"), "after the sparse files\n").unwrap();
        let tar = work.path().join(format!("sparse-{version}.tar"));
        run(Command::new("tar")
            .args(["--create", "--sparse", "--format=posix", "--numeric-owner"])
            .arg(format!("--sparse-version={version}"))
            .arg("--file")
            .arg(&tar)
            .arg("-C")
            .arg(&src)
            .arg("."));
        let bytes = fs::read(&tar).unwrap();
        assert!(
            bytes.windows(11).any(|w| w == b"GNU.sparse."),
            "GNU tar wrote no sparse records for {version}"
        );
        add_tar_layer(&image, &bytes);
    }
    let oracle = umoci_unpack(&image, &work.path().join("bundle"));
    // The oracle is what the test means: the files expanded, not their maps.
    for version in ["0.0", "0.1", "1.0"] {
        for (name, _, _) in files {
            let p = format!("sparse-{version}/{name}");
            let src = work.path().join(format!("src-{version}")).join(&p);
            assert!(read(oracle.join(&p)).unwrap() == read(&src).unwrap(), "{p}");
        }
    }
    let reg = Registry::start();
    let h = reg.host();
    push(&image, &format!("{h}/sparse:1"), Format::Oci);
    let cache = work.path().join("cache");
    let m = mount_on_cache(&reg, &cache, &[]);
    assert_trees_equal(
        &rootfs(&m, &h, "sparse", "1"),
        &oracle,
        "GNU tar sparse files",
    );
    // In the cache their holes take no disk: objects leave zeros unwritten.
    for (name, size, _) in files {
        let src = work.path().join("src-1.0/sparse-1.0").join(name);
        let hex = sha256_hex(&read(&src).unwrap());
        let obj = cache.join("objects").join(&hex[..2]).join(&hex[2..]);
        assert!(
            wait_until(Duration::from_secs(10), || obj.exists()),
            "no object for {name}"
        );
        let meta = fs::metadata(&obj).unwrap();
        assert_eq!(meta.len(), *size, "{name}");
        assert!(
            meta.blocks() * 512 <= 64 << 10,
            "the object of {name} ({size} bytes, at most 20 KiB of data) takes {} bytes of disk",
            meta.blocks() * 512
        );
    }
}

/// Makes an image of `layers` with umoci, checks its `umoci unpack` with
/// `check_oracle`, pushes it to a registry, mounts that, and compares the
/// image's `rootfs/` with the unpack.
fn served_as_umoci_unpacks(layers: &[Vec<TarEntry>], what: &str, check_oracle: impl Fn(&Path)) {
    let img = PushedImage::new("img", layers, "served/img:1");
    let (h, oracle) = (img.host.clone(), img.oracle.clone());
    check_oracle(&oracle);
    let m = mount_of(&img.reg);
    assert_trees_equal(&rootfs(&m, &h, "served/img", "1"), &oracle, what);
}

/// Hard links to things that are not regular files: a symlink, a fifo, a
/// device node (link() does not follow symlinks, so tar and umoci make a
/// second name for the same symlink inode).
#[test]
fn hard_links_to_symlinks_fifos_and_devices_equal_umoci_unpack() {
    require_env();
    let layers = vec![
        vec![
            TarEntry::dir("./"),
            TarEntry::dir("k/"),
            TarEntry::symlink("k/sym", "../target"),
            TarEntry::hardlink("k/sym-link", "k/sym"),
            TarEntry::fifo("k/fifo"),
            TarEntry::hardlink("k/fifo-link", "k/fifo"),
            TarEntry::chardev("k/null", 1, 3),
            TarEntry::hardlink("k/null-link", "k/null"),
        ],
        vec![
            TarEntry::dir("k/"),
            // Across layers too.
            TarEntry::hardlink("k/sym-upper", "k/sym"),
        ],
    ];
    served_as_umoci_unpacks(&layers, "hard links to non-files", |oracle| {
        let ino = |p: &str| fs::symlink_metadata(oracle.join(p)).unwrap().ino();
        assert_eq!(ino("k/sym"), ino("k/sym-link"), "umoci linked the symlink");
    });
}

/// A job working in a tag's `rootfs/` (a chroot, a build) keeps its image
/// when the tag moves to another one: paths walked afresh show the new
/// image, while the directories and files it holds keep showing the old.
#[test]
fn a_tree_in_use_keeps_its_image_when_the_tag_moves() {
    require_env();
    let work = tempdir();
    let image = |which: &str| {
        vec![vec![
            TarEntry::dir("./"),
            TarEntry::file("which", format!("{which}\n")),
            TarEntry::dir("d/"),
            TarEntry::file(format!("d/only-{which}"), "x\n"),
        ]]
    };
    let a = make_tar_image(work.path(), "a", &image("A"));
    let b = make_tar_image(work.path(), "b", &image("B"));
    let reg = Registry::start();
    let h = reg.host();
    push(&layout_ref(&a, "a"), &format!("{h}/moving:t"), Format::Oci);
    let m = Mount::builder().insecure(&h).tag_ttl(1).start();
    let root = rootfs(&m, &h, "moving", "t");
    assert_eq!(read(root.join("which")).unwrap(), b"A\n");
    let held_dir = fs::File::open(root.join("d")).unwrap();
    let held_file = fs::File::open(root.join("which")).unwrap();

    push(&layout_ref(&b, "b"), &format!("{h}/moving:t"), Format::Oci);
    assert!(
        wait_until(Duration::from_secs(10), || read(root.join("which")).ok()
            == Some(b"B\n".to_vec())),
        "the tag's rootfs/ still shows the old image after it moved"
    );
    let via = |fd: &fs::File, rel: &str| {
        PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(fd)
        ))
        .join(rel)
    };
    assert!(
        via(&held_dir, "only-A").exists(),
        "held directory lost its image"
    );
    assert!(!via(&held_dir, "only-B").exists());
    assert_eq!(
        list(via(&held_dir, "")).unwrap(),
        vec!["only-A".to_string()]
    );
    let mut got = String::new();
    std::io::Read::read_to_string(&mut &held_file, &mut got).unwrap();
    assert_eq!(got, "A\n", "held file changed");
}

/// Two tags of one image (and its `@sha256:` directory) are one image but
/// three trees to the kernel: each `rootfs/` has inode numbers of its own.
/// Shared numbers made each directory one dentry with three parents, so a
/// mount inside one tag's tree (the `/proc` of a chroot) showed under the
/// others, and the path of a process's cwd moved to whichever tag was
/// walked last.
#[test]
fn tags_of_one_image_are_separate_trees_to_the_kernel() {
    require_env();
    let layers = vec![vec![
        TarEntry::dir("./"),
        TarEntry::dir("proc/"),
        TarEntry::dir("etc/"),
        TarEntry::file("etc/os-release", "ID=test\n"),
    ]];
    let img = PushedImage::new("one", &layers, "same:a");
    let (h, digest) = (img.host.clone(), img.digest.clone());
    push(&img.image, &format!("{h}/same:b"), Format::Oci);
    let m = mount_of(&img.reg);
    let roots = [
        rootfs(&m, &h, "same", "a"),
        rootfs(&m, &h, "same", "b"),
        m.join(format!("{h}/same/@{digest}/rootfs")),
    ];
    let ino = |p: &Path| stat(p).unwrap().ino();
    for rel in ["", "etc", "etc/os-release", "proc"] {
        let inos: BTreeSet<u64> = roots.iter().map(|r| ino(&r.join(rel))).collect();
        assert_eq!(inos.len(), 3, "{rel:?}: one inode under several trees");
    }

    // The kernel keeps a mount on a dentry: one on a's proc/ stays there.
    // Unmounted however the test ends, or the daemon's mount stays busy.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    run(Command::new("mount")
        .args(["-t", "tmpfs", "apt-layer-test"])
        .arg(roots[0].join("proc")));
    let tmpfs = Unmount(roots[0].join("proc"));
    fs::write(roots[0].join("proc/mounted"), b"").unwrap();
    let leaked: Vec<String> = roots[1..]
        .iter()
        .flat_map(|r| list(r.join("proc")).unwrap())
        .collect();
    let cwd = run(Command::new("sh")
        .arg("-c")
        .arg("cd \"$1/etc\" && ls \"$2/etc\" >/dev/null && readlink /proc/self/cwd")
        .arg("sh")
        .arg(&roots[0])
        .arg(&roots[1]));
    drop(tmpfs);
    assert!(
        leaked.is_empty(),
        "a mount in tag a shows in b and @sha256: {leaked:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&cwd).trim_end(),
        roots[0].join("etc").to_str().unwrap(),
        "a cwd in tag a moved to tag b"
    );
    for r in &roots {
        assert_eq!(read(r.join("etc/os-release")).unwrap(), b"ID=test\n");
    }
}

/// A long-running daemon serves image after image (tags move, CI jobs come
/// and go); it must not keep every merged tree it ever built. A tree not
/// used for `tree_idle` leaves memory, and its next use brings it back from
/// the persisted layer indexes: nothing downloaded, the same inode numbers,
/// the same tree.
#[test]
fn an_unused_tree_leaves_memory_and_comes_back_the_same() {
    require_env();
    const FILES: usize = 12_000;
    let mut layer = vec![TarEntry::dir("./")];
    for d in 0..FILES / 1000 {
        layer.push(TarEntry::dir(format!("d{d:02}/")));
        for f in 0..1000 {
            layer.push(TarEntry::file(format!("d{d:02}/file-{f:04}"), "same\n"));
        }
    }
    let img = PushedImage::new("idle", &[layer], "idle/img:1");
    let (reg, h, oracle) = (&img.reg, img.host.clone(), img.oracle.clone());
    let m = Mount::builder().insecure(&h).option("tree_idle=2s").start();
    let root = rootfs(&m, &h, "idle/img", "1");
    let inos = |root: &Path| -> BTreeMap<PathBuf, u64> {
        walk_paths(root)
            .into_iter()
            .map(|p| {
                let ino = fs::symlink_metadata(root.join(&p)).unwrap().ino();
                (p, ino)
            })
            .collect()
    };
    let before = inos(&root);
    assert_eq!(before.len(), FILES + FILES / 1000);
    let rss = || {
        let s = fs::read_to_string(format!("/proc/{}/status", m.pid().unwrap())).unwrap();
        let l = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .to_string();
        l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    let loaded = rss();
    assert!(
        m.log_shows_within("rootfs tree left memory", Duration::from_secs(20)),
        "the tree never left memory; log:\n{}",
        m.log()
    );
    let unloaded = rss();
    assert!(
        loaded.saturating_sub(unloaded) > 50 * FILES as u64,
        "RSS {loaded} -> {unloaded} bytes: the {FILES}-entry tree did not leave memory"
    );

    registry_log_barrier(reg);
    let off = reg.log_len();
    drop_caches(); // the kernel forgets its inodes: every name is asked again
    assert_eq!(
        inos(&root),
        before,
        "inode numbers changed when the tree came back"
    );
    assert_trees_equal(&root, &oracle, "after the tree came back");
    registry_log_barrier(reg);
    let blobs = reg
        .requests_since(off)
        .into_iter()
        .filter(|r| r.contains("/blobs/"))
        .collect::<Vec<_>>();
    assert!(blobs.is_empty(), "fetched again: {blobs:?}");
}

/// Every path below `root`, relative to it.
fn walk_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel)).unwrap().flatten() {
            let p = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// The same image with `tar+zstd` layers (skopeo --dest-compress-format
/// zstd) and with uncompressed `tar` layers (pushed by hand: skopeo
/// compresses them). umoci 0.4.7 cannot unpack zstd layers, so the oracle
/// is the unpack of the gzip original: same tar streams, same diff_ids.
#[test]
fn rootfs_of_zstd_and_uncompressed_layers_equals_umoci_unpack() {
    require_env();
    let work = tempdir();
    let (layout, oracle) = edge_image(work.path());
    let reg = Registry::start();
    let h = reg.host();
    push_zstd(&layout_ref(&layout, "edge"), &format!("{h}/edge/zstd:1"));
    assert!(
        layer_media_types(&h, "edge/zstd", "1")
            .iter()
            .all(|t| t == "application/vnd.oci.image.layer.v1.tar+zstd"),
        "skopeo did not write zstd layers: {:?}",
        layer_media_types(&h, "edge/zstd", "1")
    );
    push_layout_uncompressed(&layout, "edge", &h, "edge/tar", "1");
    assert!(
        layer_media_types(&h, "edge/tar", "1")
            .iter()
            .all(|t| t == "application/vnd.oci.image.layer.v1.tar")
    );
    let m = mount_of(&reg);
    assert_trees_equal(&rootfs(&m, &h, "edge/zstd", "1"), &oracle, "OCI tar+zstd");
    assert_trees_equal(&rootfs(&m, &h, "edge/tar", "1"), &oracle, "OCI tar");
}

/// Images built by the harness's `make_image` (`umoci insert`, `--opaque`,
/// `--whiteout`, unpack/repack): Debian's umoci 0.4.7 ends `insert` layers
/// right after the last file's data, without padding or the two zero
/// blocks, and umoci unpack accepts that.
#[test]
fn rootfs_of_umoci_insert_layers_without_tar_trailer() {
    require_env();
    let work = tempdir();
    let spec = ImageSpec::new("ins")
        .tree(vec![
            Entry::dir("etc").mtime(1_500_000_000),
            Entry::file("etc/hostname", "inserted\n").mtime(1_500_000_001),
            Entry::file("etc/secret", "0600\n").mode(0o600).owner(1, 2),
            Entry::dir("srv").mtime(1_500_000_002),
            Entry::file("srv/a", "a\n"),
            Entry::file("srv/b", "b\n"),
            Entry::hardlink("srv/b-link", "srv/b"),
            Entry::symlink("srv/abs", "/etc/hostname"),
            Entry::fifo("srv/fifo"),
            Entry::chardev("srv/null", 1, 3),
            Entry::file("srv/x", "xattr\n").xattr("user.k", "v"),
        ])
        .layer(Layer::Opaque {
            target: "srv".into(),
            entries: vec![Entry::file("only", "only this is left\n")],
        })
        .layer(Layer::Whiteout("etc/secret".into()))
        .tree(vec![Entry::file("etc/last", "odd length")]);
    let layout = make_image(work.path(), &spec);
    let image = layout_ref(&layout, "ins");
    let manifest = layout_manifest(&layout, "ins");
    let untrailed = manifest_layer_digests(&manifest)
        .iter()
        .filter(|d| !gunzip(&layout_blob(&layout, d)).len().is_multiple_of(512))
        .count();
    eprintln!("{untrailed} umoci layers end without tar padding/trailer");
    let oracle = umoci_unpack(&image, &work.path().join("bundle"));
    let reg = Registry::start();
    let h = reg.host();
    push(&image, &format!("{h}/ins:1"), Format::Oci);
    let m = mount_of(&reg);
    assert_trees_equal(&rootfs(&m, &h, "ins", "1"), &oracle, "umoci insert layers");
}

// ---------------------------------------------------------------------------
// Laziness
// ---------------------------------------------------------------------------

fn two_layer_files() -> Vec<Vec<TarEntry>> {
    vec![
        vec![
            TarEntry::dir("./"),
            TarEntry::dir("data/"),
            TarEntry::file("data/one", pseudo_random(11, 200_000)),
            TarEntry::file("data/two", "two\n".repeat(3000)),
            TarEntry::dir("etc/"),
            TarEntry::file("etc/os-release", "ID=test\n"),
        ],
        vec![
            TarEntry::file("data/three", pseudo_random(12, 70_000)),
            TarEntry::file("etc/os-release", "ID=test\nVERSION=2\n"),
        ],
    ]
}

#[test]
fn opening_a_tag_fetches_no_layer_until_rootfs_is_used() {
    require_env();
    let img = PushedImage::new("lazy", &two_layer_files(), "lazy:1");
    let (reg, h, oracle) = (&img.reg, img.host.clone(), img.oracle.clone());
    let manifest = layout_manifest(&img.layout, "lazy");
    let layers = manifest_layer_digests(&manifest);
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();

    let m = mount_of(reg);
    registry_log_barrier(reg);
    let off = reg.log_len();
    let tag = m.join(format!("{h}/lazy/1"));
    // `ls -l <tag>` and reading the metadata files.
    let names = list(&tag).expect("ls tag dir");
    assert!(
        names.iter().any(|n| n == "rootfs"),
        "no rootfs in {names:?}"
    );
    for n in &names {
        stat(tag.join(n)).unwrap_or_else(|e| panic!("stat {n}: {e}"));
    }
    // What users type to look at a tag stats every name, `image.cfs` too.
    for args in [&["-l"][..], &["-lL"][..]] {
        let out = Command::new("ls").args(args).arg(&tag).output().unwrap();
        assert!(out.status.success(), "ls {args:?}: {out:?}");
    }
    let out = Command::new("find")
        .args([
            tag.as_os_str(),
            "-maxdepth".as_ref(),
            "1".as_ref(),
            "-ls".as_ref(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "find -ls: {out:?}");
    for f in ["manifest.json", "config.json", "digest", "inspect.json"] {
        read(tag.join(f)).unwrap_or_else(|e| panic!("read {f}: {e}"));
    }
    assert!(stat(tag.join("rootfs")).unwrap().is_dir());
    registry_log_barrier(reg);
    let reqs = reg.requests_since(off);
    for l in &layers {
        assert!(
            !reqs.iter().any(|r| r.contains(l.as_str())),
            "opening the tag fetched layer {l}: {reqs:#?}"
        );
    }
    assert!(
        reqs.iter()
            .any(|r| r.contains("/manifests/") || r.contains(&config)),
        "the tag was opened without the registry? {reqs:#?}"
    );

    // Using rootfs streams each layer, once.
    assert_trees_equal(&rootfs(&m, &h, "lazy", "1"), &oracle, "lazy rootfs");
    registry_log_barrier(reg);
    for l in &layers {
        let n = blob_gets_since(reg, off, l);
        assert_eq!(
            n,
            1,
            "layer {l} fetched {n} times for one full read of rootfs: {:#?}",
            reg.requests_since(off)
        );
    }
}

/// Several readers at once over a cold image: every one sees the right
/// tree, and each layer is still streamed once (one fetch per layer, not
/// one per reader).
#[test]
fn concurrent_readers_stream_each_layer_once() {
    require_env();
    let img = PushedImage::new("cc", &two_layer_files(), "concurrent:1");
    let (reg, h, oracle) = (&img.reg, img.host.clone(), img.oracle.clone());
    let layers = manifest_layer_digests(&layout_manifest(&img.layout, "cc"));
    let m = mount_of(reg);
    registry_log_barrier(reg);
    let off = reg.log_len();
    let root = rootfs(&m, &h, "concurrent", "1");
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (root, oracle) = (root.clone(), oracle.clone());
            thread::spawn(move || compare_trees(&root, &oracle))
        })
        .collect();
    for (i, r) in readers.into_iter().enumerate() {
        let diffs = r.join().expect("reader thread");
        assert!(diffs.is_empty(), "reader {i}: {diffs:#?}");
    }
    registry_log_barrier(reg);
    for l in &layers {
        let n = blob_gets_since(reg, off, l);
        assert_eq!(
            n,
            1,
            "layer {l} fetched {n} times for 4 concurrent readers: {:#?}",
            reg.requests_since(off)
        );
    }
}

// ---------------------------------------------------------------------------
// chroot
// ---------------------------------------------------------------------------

/// The busybox image in a fresh registry, mounted: (work dir, registry,
/// mount, its rootfs). Needs the real parts (`require_env`).
fn busybox_mounted() -> (tempfile::TempDir, Registry, Mount, PathBuf) {
    require_env();
    let work = tempdir();
    let layout = busybox_image(work.path(), "bb");
    let reg = Registry::start();
    let h = reg.host();
    push(
        &layout_ref(&layout, "bb"),
        &format!("{h}/busybox:1"),
        Format::Oci,
    );
    let m = mount_of(&reg);
    let root = rootfs(&m, &h, "busybox", "1");
    (work, reg, m, root)
}

#[test]
fn chroot_into_busybox_image() {
    let (_work, _reg, _m, root) = busybox_mounted();
    let (status, out, err) = run_bounded(
        Command::new("chroot")
            .arg(&root)
            .args(["/bin/sh", "-c", "echo hi"]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "chroot sh -c 'echo hi': {status}\n{err}");
    assert_eq!(out, "hi\n");
    let (status, out, err) = run_bounded(
        Command::new("chroot")
            .arg(&root)
            .args(["/bin/sh", "-c", "cat /etc/motd && ls /bin"]),
        Duration::from_secs(120),
    );
    assert!(status.success(), "chroot cat/ls: {status}\n{err}");
    assert_eq!(
        out,
        "hello from a busybox image\nbusybox\ncat\necho\nls\nsh\ntrue\n"
    );
}

/// `tar` of a `rootfs/` nothing has read yet: tar compares the directory's
/// `stat` before and after reading it, so `rootfs/` must not change its
/// attributes when its tree is built under tar (it said "file changed as
/// we read it" and exited 1).
#[test]
fn a_cold_tar_of_rootfs_is_complete_and_quiet() {
    let (work, _reg, _m, root) = busybox_mounted();
    let archive = work.path().join("rootfs.tar");
    let (status, _, err) = run_bounded(
        Command::new("tar")
            .arg("cf")
            .arg(&archive)
            .arg("-C")
            .arg(&root)
            .arg("."),
        Duration::from_secs(120),
    );
    assert!(status.success(), "tar cf - -C rootfs .: {status}\n{err}");
    assert_eq!(err, "", "tar's warnings");
    let (status, out, err) = run_bounded(
        Command::new("tar").arg("tf").arg(&archive),
        Duration::from_secs(60),
    );
    assert!(status.success(), "tar tf: {status}\n{err}");
    for name in ["./bin/busybox", "./etc/motd"] {
        assert!(out.lines().any(|l| l == name), "{name} not in\n{out}");
    }
}

/// An overlay with a writable upper directory on `rootfs/`: the way to run
/// what writes (a package manager, a build) in an image never pulled. The
/// colons of `HOST:PORT` are escaped, as overlay's option syntax needs.
#[test]
fn an_overlay_on_rootfs_makes_a_writable_chroot() {
    let (work, _reg, _m, root) = busybox_mounted();
    let ovl = Overlay::mount(&root, work.path());
    let (status, out, err) = run_bounded(
        Command::new("chroot").arg(&ovl.merged).args([
            "/bin/sh",
            "-c",
            "echo changed > /etc/motd && rm /bin/ls && echo made > /tmp/new && \
             cat /etc/motd /tmp/new && echo /bin/*",
        ]),
        Duration::from_secs(120),
    );
    assert!(
        status.success(),
        "writes in the overlay chroot: {status}\n{err}"
    );
    assert_eq!(
        out,
        "changed\nmade\n/bin/busybox /bin/cat /bin/echo /bin/sh /bin/true\n"
    );
    // The image underneath is as it was; the changes are in the upper dir.
    assert_eq!(
        read_string(root.join("etc/motd")).unwrap(),
        "hello from a busybox image\n"
    );
    assert!(stat(root.join("bin/ls")).is_ok());
    assert_eq!(
        fs::read_to_string(ovl.upper.join("etc/motd")).unwrap(),
        "changed\n"
    );
}

/// An overlay mounted on `rootfs/` while a layer still streams. The first
/// write in it copies `etc/` up; overlayfs holds its upper filesystem's
/// rename lock while it asks `rootfs/` about the directory. Neither may wait
/// on the held layer: other renames on that filesystem (here the cache's,
/// as on a machine with one root filesystem) go on, and once the layer
/// arrives the write completes (it hung for good when the layer's objects
/// were renamed into the cache under that lock).
#[test]
fn an_overlay_mounted_while_a_layer_streams_blocks_nothing() {
    require_env();
    let held = held_image("ovl", Held::Upper);
    // The held layer must outlast a blocked rename, not time out first.
    let m = Mount::builder()
        .insecure(&held.fault.host())
        .timeout(60)
        .start();
    let root = rootfs(&m, &held.fault.host(), "ovl/img", "1");
    let dir = tempfile::tempdir_in(m.cache_dir().parent().unwrap()).unwrap();
    let ovl = Overlay::mount(&root, dir.path());

    let (tx, rx) = std::sync::mpsc::channel();
    // A file answered early (a new name would wait for the layer first).
    let early = ovl.merged.join("etc/early");
    thread::spawn(move || {
        let _ = tx.send(fs::write(&early, "changed\n"));
    });
    // A rename between two directories of that filesystem, once the write
    // had time to start copying etc/ up.
    thread::sleep(Duration::from_secs(1));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("f"), "x").unwrap();
    let written = within(
        Duration::from_secs(5),
        "a rename beside the overlay's upper directory",
        move || fs::rename(a.join("f"), b.join("f")),
    );
    written.expect("rename");
    assert_streaming(&m, &held.fault.host(), "ovl/img", 1, "during the write");

    held.gate.open();
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the write in the overlay still waits after the layer arrived")
        .expect("write etc/early in the overlay");
    assert_eq!(fs::read(ovl.upper.join("etc/early")).unwrap(), b"changed\n");
    assert_eq!(read(ovl.merged.join("etc/early")).unwrap(), b"changed\n");
    assert_eq!(read(root.join("etc/early")).unwrap(), EARLY_FILE);
    assert_eq!(
        read(ovl.merged.join("etc/base")).unwrap(),
        b"from the lower layer\n"
    );
    assert_trees_equal(&root, &held.oracle, "after the layer arrived");
}

#[test]
fn device_nodes_and_setuid_work_unless_turned_off() {
    require_env();
    let layers = vec![vec![
        TarEntry::dir("./"),
        TarEntry::dir("dev/"),
        TarEntry::chardev("dev/null", 1, 3).mode(0o666),
        TarEntry::dir("bin/"),
        TarEntry::file("bin/su", "setuid\n").mode(0o4755),
    ]];
    let img = PushedImage::new("dev", &layers, "dev:1");
    let (reg, h) = (&img.reg, img.host.clone());

    // Default: chroot needs both, so neither is turned off.
    let m = mount_of(reg);
    let opts = mount_options(m.path()).expect("mount listed in mountinfo");
    assert!(
        !opts.iter().any(|o| o == "nodev" || o == "nosuid"),
        "default mount options {opts:?}"
    );
    let null = rootfs(&m, &h, "dev", "1").join("dev/null");
    assert_eq!(read(&null).expect("read rootfs/dev/null"), b"");
    assert_eq!(
        stat(rootfs(&m, &h, "dev", "1").join("bin/su"))
            .unwrap()
            .mode()
            & 0o7777,
        0o4755
    );
    drop(m);

    let m = Mount::builder()
        .insecure(&h)
        .option("nodev")
        .option("nosuid")
        .start();
    let opts = mount_options(m.path()).expect("mount listed in mountinfo");
    assert!(
        opts.iter().any(|o| o == "nodev") && opts.iter().any(|o| o == "nosuid"),
        "-o nodev,nosuid gave mount options {opts:?}"
    );
    assert_errno(
        read(rootfs(&m, &h, "dev", "1").join("dev/null")),
        libc::EACCES,
        "a device node on a nodev mount",
    );
}

// ---------------------------------------------------------------------------
// What the kernel keeps (FUSE requests counted with the tracepoint)
// ---------------------------------------------------------------------------

/// Every directory below `root`, `root` included, listed (as `find` does).
fn list_every_dir(root: &Path) -> usize {
    let mut dirs = 0;
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        dirs += 1;
        for name in list(&d).unwrap() {
            let p = d.join(name);
            if stat(&p).unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    dirs
}

/// How many `op` requests a [`FuseTrace`] counted.
fn asked(counts: &BTreeMap<String, usize>, op: &str) -> usize {
    counts.get(op).copied().unwrap_or(0)
}

/// None of `ops` reached the daemon; `why` says why none should have.
fn assert_never_asked(counts: &BTreeMap<String, usize>, ops: &[&str], why: &str) {
    for op in ops {
        assert_eq!(
            asked(counts, op),
            0,
            "{why}, yet the kernel sent {op}: {counts:?}"
        );
    }
}

/// Walks rootfs once (the tree equals umoci's), then returns the mount,
/// rootfs and oracle for a second look.
fn walked_once(work: &Path, reg: &Registry, repo: &str) -> (Mount, PathBuf, PathBuf) {
    let layout = make_tar_image(work, repo, &two_layer_files());
    let image = layout_ref(&layout, repo);
    let oracle = umoci_unpack(&image, &work.join("bundle"));
    let h = reg.host();
    push(&image, &format!("{h}/{repo}:1"), Format::Oci);
    let m = mount_of(reg);
    let root = rootfs(&m, &h, repo, "1");
    assert_trees_equal(&root, &oracle, "first walk");
    (m, root, oracle)
}

#[test]
fn a_second_walk_of_rootfs_lists_from_the_kernel_cache() {
    require_env();
    let work = tempdir();
    let reg = Registry::start();
    let _kept = caches_kept();
    let (m, root, _oracle) = walked_once(work.path(), &reg, "walk");

    let trace = FuseTrace::start(m.path());
    let dirs = list_every_dir(&root);
    let counts = trace.stop();
    // Opening a directory still reaches the daemon: the trace sees this mount.
    assert!(
        asked(&counts, "FUSE_OPENDIR") >= dirs,
        "{dirs} directories opened, but the trace saw {counts:?}"
    );
    assert_never_asked(
        &counts,
        &["FUSE_READDIR", "FUSE_READDIRPLUS"],
        "a rootfs listing is immutable and was listed before",
    );
}

#[test]
fn a_stored_file_is_read_by_the_kernel_from_its_object() {
    require_env();
    let work = tempdir();
    let reg = Registry::start();
    let (m, root, oracle) = walked_once(work.path(), &reg, "passthrough");
    let file = root.join("data/one");
    evict_page_cache(&file);

    let trace = FuseTrace::start(m.path());
    let bytes = read(&file).unwrap();
    let counts = trace.stop();
    assert_eq!(bytes, fs::read(oracle.join("data/one")).unwrap());
    assert!(
        asked(&counts, "FUSE_OPEN") >= 1,
        "the file was opened, but the trace saw {counts:?}"
    );
    assert_never_asked(
        &counts,
        &["FUSE_READ"],
        "a complete object is read by the kernel itself (FUSE passthrough)",
    );
}

#[test]
fn immutable_answers_are_kept_by_the_kernel() {
    require_env();
    let img = PushedImage::new("kept", &two_layer_files(), "kept:1");
    let (reg, h) = (&img.reg, img.host.clone());
    let m = mount_of(reg);
    let _kept = caches_kept();
    let tag = m.join(format!("{h}/kept/1"));
    let manifest = read(tag.join("manifest.json")).unwrap();
    let file = tag.join("rootfs/data/one");
    // The first look starts the layers; an answer given while they are
    // still listed may carry no cache time. Once the tree is built, look
    // again: that answer is the one the kernel must keep.
    stat(&file).unwrap();
    wait_ready(&m, &h, "kept", "1");
    let st = stat(&file).unwrap();

    let trace = FuseTrace::start(m.path());
    assert_eq!(read(tag.join("manifest.json")).unwrap(), manifest);
    assert_eq!(stat(&file).unwrap().ino(), st.ino());
    let counts = trace.stop();
    assert!(
        asked(&counts, "FUSE_OPEN") >= 1,
        "manifest.json was opened, but the trace saw {counts:?}"
    );
    // (GETATTRs may come: on a read-write mount the kernel asks for the
    // atime again after every read.)
    assert_never_asked(
        &counts,
        &["FUSE_READ", "FUSE_LOOKUP"],
        "a manifest's bytes and a rootfs name never change and were read before",
    );
}

// ---------------------------------------------------------------------------
// The cache
// ---------------------------------------------------------------------------

#[test]
fn restart_fetches_no_blob_again() {
    require_env();
    let img = PushedImage::new("r", &two_layer_files(), "restart:1");
    let (reg, h, oracle) = (&img.reg, img.host.clone(), img.oracle.clone());
    let cache = tempdir();

    let mut m1 = mount_on_cache(reg, cache.path(), &[]);
    assert_trees_equal(&rootfs(&m1, &h, "restart", "1"), &oracle, "first mount");
    m1.stop();
    drop(m1);

    registry_log_barrier(reg);
    let off = reg.log_len();
    let m2 = mount_on_cache(reg, cache.path(), &[]);
    assert_trees_equal(&rootfs(&m2, &h, "restart", "1"), &oracle, "after restart");
    registry_log_barrier(reg);
    let blobs: Vec<String> = reg
        .requests_since(off)
        .into_iter()
        .filter(|r| r.contains("/blobs/"))
        .collect();
    assert!(
        blobs.is_empty(),
        "blobs fetched again after a restart on the same cache: {blobs:#?}"
    );
}

/// Bytes the process `pid` has read through `read`-like calls so far
/// (`rchar` in `/proc/<pid>/io`).
fn bytes_read_by(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/<pid>/io")
}

/// A daemon started again on the same cache trusts the objects verified
/// before (their stamps, saved within seconds of their verification and at
/// a clean exit) while their files are unchanged: it reads none of them
/// again to hash it, and serves the right bytes. (A file changed meanwhile
/// is hashed and refetched: `corrupted_object_is_detected_and_refetched`.)
#[test]
fn restart_hashes_no_object_again() {
    require_env();
    const SIZE: usize = 1 << 20;
    let img = PushedImage::new("vr", &many_files(8, SIZE, 1300), "verified:1");
    let (reg, h, oracle) = (&img.reg, img.host.clone(), img.oracle.clone());
    let cache = tempdir();
    let stamps = cache.path().join("verified");
    // Opens the 8 files on a daemon just started; what it read meanwhile.
    let read_all = |m: &Mount| {
        let files = rootfs(m, &h, "verified", "1").join("f");
        let names: Vec<_> = fs::read_dir(&files)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 8, "{names:?}");
        let pid = m.pid().expect("the daemon runs");
        let before = bytes_read_by(pid);
        for n in &names {
            let got = fs::read(files.join(n)).unwrap();
            let want = fs::read(oracle.join("f").join(n)).unwrap();
            assert!(got == want, "{n:?}: wrong bytes after the restart");
        }
        bytes_read_by(pid) - before
    };
    // A daemon just started opens the 8 files without hashing them.
    let hashes_nothing = |m: &Mount, when: &str| {
        let read = read_all(m);
        assert!(
            read < SIZE as u64,
            "{when}, the daemon read {read} bytes while 8 files of {SIZE} bytes verified \
             before were opened: it hashed them again"
        );
    };

    // Built, then killed (no clean exit): the stamps were saved once the
    // tree was built.
    let mut m1 = mount_on_cache(reg, cache.path(), &[]);
    assert_trees_equal(&rootfs(&m1, &h, "verified", "1"), &oracle, "first mount");
    wait_ready(&m1, &h, "verified", "1");
    assert!(
        wait_until(Duration::from_secs(20), || stamps.exists()),
        "no {} after the tree was built",
        stamps.display()
    );
    m1.kill();
    drop(m1);
    let mut m2 = mount_on_cache(reg, cache.path(), &[]);
    hashes_nothing(&m2, "after a kill");

    // A clean exit saves them too (the file is gone meanwhile).
    fs::remove_file(&stamps).unwrap();
    m2.stop();
    drop(m2);
    let mut m3 = mount_on_cache(reg, cache.path(), &[]);
    hashes_nothing(&m3, "after a clean exit");

    // Verified well after the tree was built (a daemon that has run for a
    // while), then killed: saved within seconds too.
    fs::remove_file(&stamps).unwrap();
    m3.kill();
    drop(m3);
    let mut m4 = mount_on_cache(reg, cache.path(), &[]);
    fs::read_dir(rootfs(&m4, &h, "verified", "1")).unwrap();
    wait_ready(&m4, &h, "verified", "1");
    std::thread::sleep(Duration::from_secs(7));
    let read = read_all(&m4);
    assert!(
        read >= 8 * SIZE as u64,
        "with no stamps saved, opening 8 files of {SIZE} bytes read only {read} bytes: \
         nothing was hashed, so this phase tests nothing"
    );
    // The file's format (`src/stamps.rs`): a magic line, then one 40-byte
    // record per verified object.
    const MAGIC: &[u8] = b"apt-layer verified 1\n";
    const RECORD: usize = 40;
    let all_saved =
        |p: &Path| fs::metadata(p).is_ok_and(|m| m.len() >= (MAGIC.len() + 8 * RECORD) as u64);
    assert!(
        wait_until(Duration::from_secs(20), || all_saved(&stamps)),
        "the 8 objects verified late were not saved in {} within 20 s",
        stamps.display()
    );
    m4.kill();
    drop(m4);
    let m5 = mount_on_cache(reg, cache.path(), &[]);
    hashes_nothing(&m5, "after a kill, of files verified late");
}

/// Files of `n` × `size` bytes, distinct content, over two layers.
fn many_files(n: usize, size: usize, seed: u64) -> Vec<Vec<TarEntry>> {
    let mut l1 = vec![TarEntry::dir("./"), TarEntry::dir("f/")];
    let mut l2 = Vec::new();
    for i in 0..n {
        let e = TarEntry::file(format!("f/{i:02}"), pseudo_random(seed + i as u64, size));
        if i % 2 == 0 { l1.push(e) } else { l2.push(e) }
    }
    vec![l1, l2]
}

fn assert_objects_well_formed(cache: &Path) {
    for p in object_files(cache) {
        let name = object_name(&p);
        assert!(
            name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()),
            "object {} is not objects/<2 hex>/<62 hex>",
            p.display()
        );
        assert_eq!(
            sha256_hex(&fs::read(&p).unwrap()),
            name,
            "object {} is not named by its sha256",
            p.display()
        );
    }
}

fn objects_bytes(cache: &Path) -> u64 {
    object_files(cache)
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
fn eviction_under_small_cache_size_then_reread_correct() {
    require_env();
    const LIMIT: u64 = 64 * 1024;
    // 16 × 12 KiB = 192 KiB of content for a 64 KiB cache.
    let img = PushedImage::new("ev", &many_files(16, 12 * 1024, 100), "evict:1");
    let (reg, h, oracle) = (&img.reg, img.host.clone(), img.oracle.clone());
    let cache = tempdir();
    let mut m = mount_on_cache(reg, cache.path(), &["--cache-size", "64k"]);
    let root = rootfs(&m, &h, "evict", "1");
    assert_trees_equal(&root, &oracle, "first read under a 64k cache");
    assert!(
        objects_bytes(cache.path()) <= LIMIT,
        "objects hold {} bytes with --cache-size 64k",
        objects_bytes(cache.path())
    );
    // Evicted objects come back transparently, with the right bytes, and
    // by Range requests (DESIGN.md §2: "any later read of evicted content
    // is a Range request for one span, never the whole layer"; these
    // layers are smaller than one span).
    registry_log_barrier(reg);
    let reread = reg.log_len();
    assert_trees_equal(&root, &oracle, "second read (evicted objects refetched)");
    assert_trees_equal(&root, &oracle, "third read");
    registry_log_barrier(reg);
    for layer in manifest_layer_digests(&layout_manifest(&img.layout, "ev")) {
        let full: Vec<(u16, u64)> = blob_get_responses_since(reg, reread, &layer)
            .into_iter()
            .filter(|(status, _)| *status != 206)
            .collect();
        assert!(
            full.is_empty(),
            "evicted content of layer {layer} was refetched without a Range request \
             (status, bytes): {full:?}"
        );
    }
    assert!(
        objects_bytes(cache.path()) <= LIMIT,
        "objects hold {} bytes with --cache-size 64k after rereads",
        objects_bytes(cache.path())
    );
    m.stop();
    assert_objects_well_formed(cache.path());
    let stats = cache_stats(cache.path());
    let files = object_files(cache.path());
    assert_eq!(stats["objects"], files.len(), "stats objects: {stats}");
    assert_eq!(
        stats["bytes"],
        objects_bytes(cache.path()),
        "stats bytes: {stats}"
    );
    assert!(
        stats["bytes"].as_u64().expect("bytes") <= LIMIT,
        "stats bytes over the limit: {stats}"
    );
    assert!(
        stats["limit"].is_null() || stats["limit"] == LIMIT,
        "stats limit: {stats}"
    );
    assert!(stats["layers"].as_u64().expect("layers") >= 2, "{stats}");
    assert!(
        stats["metadata"].as_u64().expect("metadata") >= 1,
        "{stats}"
    );
}

/// A read-only daemon beside the read-write one (the README's way to share a
/// cache) or any two daemons on one `--cache-dir`: each uses the objects the
/// other stored, without fetching them again, and the two together keep the
/// objects under `--cache-size`, as one daemon does.
#[test]
fn two_daemons_on_one_cache_share_its_objects_and_keep_its_size() {
    require_env();
    const LIMIT: u64 = 64 * 1024;
    let work = tempdir();
    let small = make_tar_image(work.path(), "small", &many_files(3, 4 * 1024, 700));
    let one = make_tar_image(work.path(), "one", &many_files(16, 12 * 1024, 800));
    let two = make_tar_image(work.path(), "two", &many_files(16, 12 * 1024, 900));
    let reg = Registry::start();
    let h = reg.host();
    let mut oracles = Vec::new();
    for (layout, tag) in [(&small, "small"), (&one, "one"), (&two, "two")] {
        let image = layout_ref(layout, tag);
        oracles.push(umoci_unpack(&image, &work.path().join(format!("b-{tag}"))));
        push(&image, &format!("{h}/share:{tag}"), Format::Oci);
    }
    let cache = tempdir();
    let rw = mount_on_cache(&reg, cache.path(), &["--cache-size", "64k"]);
    let ro = Mount::builder()
        .insecure(&h)
        .cache_dir(cache.path())
        .option("ro")
        .arg("--cache-size")
        .arg("64k")
        .start();

    assert_trees_equal(
        &rootfs(&rw, &h, "share", "small"),
        &oracles[0],
        "small via rw",
    );
    // The walk can end before the layers are stored (from the sketch).
    wait_ready(&rw, &h, "share", "small");
    registry_log_barrier(&reg);
    let since = reg.log_len();
    assert_trees_equal(
        &rootfs(&ro, &h, "share", "small"),
        &oracles[0],
        "small via ro",
    );
    registry_log_barrier(&reg);
    for layer in manifest_layer_digests(&layout_manifest(&small, "small")) {
        let gets = blob_get_responses_since(&reg, since, &layer);
        assert!(
            gets.is_empty(),
            "the ro daemon fetched layer {layer} the rw daemon had stored: {gets:?}"
        );
    }

    assert_trees_equal(&rootfs(&rw, &h, "share", "one"), &oracles[1], "one via rw");
    assert_trees_equal(&rootfs(&ro, &h, "share", "two"), &oracles[2], "two via ro");
    assert_trees_equal(&rootfs(&rw, &h, "share", "one"), &oracles[1], "one again");
    let within = wait_until(Duration::from_secs(5), || {
        objects_bytes(cache.path()) <= LIMIT
    });
    assert!(
        within,
        "two daemons with --cache-size 64k hold {} bytes of objects",
        objects_bytes(cache.path())
    );
    drop(ro);
    drop(rw);
    assert_objects_well_formed(cache.path());
}

#[test]
fn shared_layer_is_stored_once() {
    require_env();
    let work = tempdir();
    let f = |name: &str, seed: u64| TarEntry::file(name, pseudo_random(seed, 4096 + seed as usize));
    let base = vec![
        TarEntry::dir("./"),
        TarEntry::dir("usr/"),
        f("usr/s1", 1),
        f("usr/s2", 2),
        f("usr/s3", 3),
        f("usr/s4", 4),
        f("usr/s5", 5),
    ];
    let layout = make_tar_image(work.path(), "base", &[base]);
    for (tag, layer) in [
        ("a", vec![TarEntry::dir("a/"), f("a/a1", 21), f("a/a2", 22)]),
        (
            "b",
            vec![
                TarEntry::dir("b/"),
                f("b/b1", 31),
                f("b/b2", 32),
                f("b/b3", 33),
                // Same content as a file of the shared layer: no new object.
                f("b/copy-of-s1", 1),
            ],
        ),
    ] {
        run(Command::new("umoci").args(["tag", "--image", &layout_ref(&layout, "base"), tag]));
        add_tar_layer(&layout_ref(&layout, tag), &tar_bytes(&layer));
    }
    let shared = manifest_layer_digests(&layout_manifest(&layout, "a"))[0].clone();
    assert_eq!(
        manifest_layer_digests(&layout_manifest(&layout, "b"))[0],
        shared
    );
    let oa = umoci_unpack(&layout_ref(&layout, "a"), &work.path().join("ba"));
    let ob = umoci_unpack(&layout_ref(&layout, "b"), &work.path().join("bb"));
    let ha = content_hashes(&oa);
    let hb = content_hashes(&ob);
    let union: BTreeSet<String> = ha.union(&hb).cloned().collect();
    assert_eq!(ha.len(), 7);
    assert_eq!(union.len(), 10);

    let reg = Registry::start();
    let h = reg.host();
    push(
        &layout_ref(&layout, "a"),
        &format!("{h}/one:1"),
        Format::Oci,
    );
    push(
        &layout_ref(&layout, "b"),
        &format!("{h}/two:1"),
        Format::Oci,
    );
    registry_log_barrier(&reg);
    let off = reg.log_len();
    let m = mount_of(&reg);
    let cache = m.cache_dir().to_path_buf();
    let names =
        |c: &Path| -> BTreeSet<String> { object_files(c).iter().map(|p| object_name(p)).collect() };

    assert_trees_equal(&rootfs(&m, &h, "one", "1"), &oa, "image one");
    wait_until(Duration::from_secs(10), || names(&cache) == ha);
    assert_eq!(
        names(&cache),
        ha,
        "objects after reading image one are not its distinct file contents"
    );
    assert_trees_equal(&rootfs(&m, &h, "two", "1"), &ob, "image two");
    wait_until(Duration::from_secs(10), || names(&cache) == union);
    assert_eq!(
        names(&cache),
        union,
        "objects after reading both images: the shared layer's files must be stored once"
    );
    registry_log_barrier(&reg);
    assert_eq!(
        blob_gets_since(&reg, off, &shared),
        1,
        "the shared layer {shared} was fetched again for the second image: {:#?}",
        reg.requests_since(off)
    );
}

/// An object damaged while its file is held open: the open file reads
/// what the disk now holds (the kernel reads the object itself), but no
/// later open is given those bytes. The kernel lets an inode have only
/// one backing file while it is open, so a later open cannot get the
/// refetched object either: it fails (`EIO`) until the first is closed,
/// and then reads the right bytes.
#[test]
fn an_object_damaged_while_open_is_not_served_to_a_later_open() {
    require_env();
    let v = pseudo_random(211, 40_000);
    let layers = vec![vec![
        TarEntry::dir("./"),
        TarEntry::file("victim", v.clone()),
    ]];
    let img = PushedImage::new("held", &layers, "heldopen:1");
    let (reg, h) = (&img.reg, img.host.clone());
    let cache = tempdir();
    let mut m = mount_on_cache(reg, cache.path(), &[]);
    let root = rootfs(&m, &h, "heldopen", "1");
    assert_eq!(read(root.join("victim")).unwrap(), v);
    let o = object_path(cache.path(), &sha256_hex(&v));
    assert!(wait_until(Duration::from_secs(10), || o.exists()));

    let first = fs::File::open(root.join("victim")).unwrap();
    flip_byte(&o, 20_000);
    match read(root.join("victim")) {
        Ok(got) => assert!(got == v, "a later open read the damaged object"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    drop(first);
    assert!(
        read(root.join("victim")).unwrap() == v,
        "wrong bytes once the damaged object's file was closed"
    );
    assert!(m.is_running());
}

#[test]
fn corrupted_object_is_detected_and_refetched() {
    require_env();
    let v1 = pseudo_random(201, 40_000);
    let v2 = pseudo_random(202, 50_000);
    let layers = vec![vec![
        TarEntry::dir("./"),
        TarEntry::dir("data/"),
        TarEntry::file("data/victim1", v1.clone()),
        TarEntry::file("data/victim2", v2.clone()),
        TarEntry::file("data/other", pseudo_random(203, 10_000)),
    ]];
    let img = PushedImage::new("c", &layers, "corrupt:1");
    let (reg, h, oracle) = (&img.reg, img.host.clone(), img.oracle.clone());
    let layer = manifest_layer_digests(&layout_manifest(&img.layout, "c"))[0].clone();
    let cache = tempdir();

    let mut m1 = mount_on_cache(reg, cache.path(), &[]);
    let root = rootfs(&m1, &h, "corrupt", "1");
    assert_trees_equal(&root, &oracle, "first read");
    // Siblings are warmed ahead only from the built tree (not while a
    // sketch answers): wait for it, so the warmed case below is the one
    // tested.
    wait_ready(&m1, &h, "corrupt", "1");
    let o1 = object_path(cache.path(), &sha256_hex(&v1));
    let o2 = object_path(cache.path(), &sha256_hex(&v2));
    for o in [&o1, &o2] {
        assert!(
            wait_until(Duration::from_secs(10), || o.exists()),
            "no object {} after reading the file; objects: {:?}",
            o.display(),
            object_files(cache.path())
        );
    }

    // While mounted: a flipped byte is never served, also when the object
    // was warmed ahead (reading data/other, the first file of data/, warms
    // its later siblings' objects) before it was damaged.
    read(root.join("data/other")).expect("read data/other");
    thread::sleep(Duration::from_millis(300));
    flip_byte(&o1, 20_000);
    // No open before the read (the read's own open is the one that must
    // notice): drop the caches system-wide.
    drop_caches();
    let got = read(root.join("data/victim1")).expect("read victim1 after corrupting its object");
    assert!(
        got == v1,
        "victim1 read back wrong bytes after its object was corrupted"
    );
    m1.stop();
    drop(m1);

    // After a restart: detected, refetched from the registry.
    flip_byte(&o2, 1_000);
    registry_log_barrier(reg);
    let off = reg.log_len();
    let m2 = mount_on_cache(reg, cache.path(), &[]);
    let root = rootfs(&m2, &h, "corrupt", "1");
    let got = read(root.join("data/victim2")).expect("read victim2 after restart");
    assert!(
        got == v2,
        "victim2 read back wrong bytes from a corrupted object"
    );
    let got = read(root.join("data/victim1")).expect("read victim1 after restart");
    assert!(got == v1, "victim1 read back wrong bytes after restart");
    // The registry logs a blob GET when its response ends, which can be
    // after the daemon has the bytes it needed (and after a barrier).
    assert!(
        wait_until(Duration::from_secs(10), || blob_gets_since(
            reg, off, &layer
        ) >= 1),
        "the corrupted object was not refetched from the registry: {:#?}",
        reg.requests_since(off)
    );
    let sound = |o: &Path, want: &[u8]| match fs::read(o) {
        Ok(b) => b == want,
        Err(_) => true,
    };
    assert!(
        wait_until(Duration::from_secs(10), || sound(&o2, &v2)),
        "corrupted object {} still on disk after the refetch",
        o2.display()
    );
    assert_trees_equal(&root, &oracle, "after refetch");
}

#[test]
fn status_reports_layers() {
    require_env();
    let img = PushedImage::new("s", &two_layer_files(), "status:1");
    let (reg, h, oracle) = (&img.reg, img.host.clone(), img.oracle.clone());
    let digest = &img.digest;
    let (mbytes, _) = get_manifest(&h, "status", "1", None);
    let manifest: Value = serde_json::from_slice(&mbytes).unwrap();
    let mlayers = manifest["layers"].as_array().unwrap().clone();
    let cache = img.work.path().join("cache");
    let m = mount_on_cache(reg, &cache, &[]);
    let status_path = m.join(format!("{h}/status/1/status"));
    let status = || -> Value {
        let b = read(&status_path).expect("read status");
        serde_json::from_slice(&b)
            .unwrap_or_else(|e| panic!("status is not JSON ({e}): {}", String::from_utf8_lossy(&b)))
    };

    let s = status();
    assert_eq!(s["manifest"], digest.as_str(), "status manifest: {s}");
    assert_eq!(
        s["top"],
        digest.as_str(),
        "status top (single-platform tag): {s}"
    );
    let layers = s["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("no layers: {s}"));
    assert_eq!(layers.len(), mlayers.len(), "{s}");
    for (l, ml) in layers.iter().zip(&mlayers) {
        assert_eq!(l["digest"], ml["digest"], "{s}");
        assert_eq!(l["media_type"], ml["mediaType"], "{s}");
        assert_eq!(l["size"], ml["size"], "{s}");
        assert!(
            l["format"].as_str().is_some_and(|f| !f.is_empty()),
            "format: {s}"
        );
        assert!(
            l["mode"].as_str().is_some_and(|f| !f.is_empty()),
            "mode: {s}"
        );
        assert_eq!(l["read"], "streamed", "plain layers: {s}");
        assert_eq!(l["state"], "not fetched", "before rootfs is used: {s}");
        assert_eq!(l["bytes_fetched"], 0, "before rootfs is used: {s}");
        assert!(l["objects_cached"].is_u64(), "objects_cached: {s}");
    }

    assert_trees_equal(&rootfs(&m, &h, "status", "1"), &oracle, "status image");
    let indexed = wait_until(Duration::from_secs(30), || {
        status()["layers"]
            .as_array()
            .is_some_and(|ls| ls.iter().all(|l| l["state"] == "indexed"))
    });
    let s = status();
    assert!(
        indexed,
        "layers not all \"indexed\" 30 s after rootfs was read: {s}"
    );
    for (l, ml) in s["layers"].as_array().unwrap().iter().zip(&mlayers) {
        assert_eq!(
            l["bytes_fetched"], ml["size"],
            "bytes_fetched of a fully read layer: {s}"
        );
        assert!(
            l["objects_cached"].as_u64().is_some_and(|n| n > 0),
            "objects_cached of a layer whose files were read (unbounded cache): {s}"
        );
    }

    // A daemon started again on the same cache shows the same, before
    // anything is read (from the head of each saved index).
    drop(m);
    let again = mount_on_cache(reg, &cache, &[]);
    let b = read(again.join(format!("{h}/status/1/status"))).expect("read status");
    let after: Value = serde_json::from_slice(&b).unwrap();
    for (l, before) in after["layers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(s["layers"].as_array().unwrap())
    {
        for k in ["state", "read", "bytes_fetched", "objects_cached"] {
            assert_eq!(
                l[k], before[k],
                "{k} after a restart: {after} (before: {s})"
            );
        }
    }
}

/// Reads `HOST/REPO:1` whole through a fresh mount on `cache`, then stops
/// the daemon.
fn fill_cache(reg: &Registry, repo: &str, cache: &Path, oracle: &Path) {
    let mut m = mount_on_cache(reg, cache, &[]);
    assert_trees_equal(
        &rootfs(&m, &reg.host(), repo, "1"),
        oracle,
        "filling the cache",
    );
    m.stop();
}

#[test]
fn cache_verify_names_bad_objects() {
    require_env();
    let img = PushedImage::new("v", &many_files(6, 3000, 300), "verify:1");
    let (reg, oracle) = (&img.reg, img.oracle.clone());
    let cache = tempdir();
    fill_cache(reg, "verify", cache.path(), &oracle);
    let objects = object_files(cache.path());
    assert_eq!(
        objects.len(),
        6,
        "one object per distinct file: {objects:?}"
    );
    assert_objects_well_formed(cache.path());
    let out = cache_cmd(cache.path(), &["verify"]);
    assert!(out.status.success(), "verify of a sound cache: {out:?}");

    let (bad, good) = objects.split_at(2);
    flip_byte(&bad[0], 100);
    let len = fs::metadata(&bad[1]).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&bad[1])
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let out = cache_cmd(cache.path(), &["verify"]);
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), out.stderr);
    assert!(
        !out.status.success(),
        "verify with bad objects exited 0:\n{text}"
    );
    let rel = |p: &Path| {
        let n = object_name(p);
        format!("{}/{}", &n[..2], &n[2..])
    };
    for b in bad {
        assert!(
            text.contains(&rel(b)),
            "verify did not name {}:\n{text}",
            rel(b)
        );
        assert!(!b.exists(), "bad object {} was not removed", b.display());
    }
    for g in good {
        assert!(
            !text.contains(&rel(g)),
            "verify named a good object {}:\n{text}",
            rel(g)
        );
        assert!(g.exists(), "good object {} was removed", g.display());
    }
    let out = cache_cmd(cache.path(), &["verify"]);
    assert!(out.status.success(), "second verify: {out:?}");
    assert_eq!(cache_stats(cache.path())["objects"], 4);
}

/// A gzip layer is first listed while its compressed bytes go to a spill
/// file beside the cache; a disk with no room for that must not cost the
/// image: the layer is read again in one pass.
#[test]
fn a_cache_disk_without_room_for_the_spill_still_serves_the_image() {
    // The 16 MiB spill itself does not fit (the bound could spare it).
    tight_disk("tight", "8m", "40m", &[NO_SPILL], &[]);
}

/// A layer larger than half of --cache-size gets no spill: the bound could
/// not hold it beside the objects, so it is read in one pass, bounded by
/// --cache-size, and the disk never fills.
#[test]
fn a_layer_larger_than_half_the_cache_size_is_read_without_a_spill() {
    tight_disk("nospill", "8m", "3m", &[SKIP_SPILL], &[NO_SPILL, DISK_FULL]);
}

/// The spill fits but the disk fills while the contents are stored beside
/// it (16 MiB spill + objects on 20 MiB, a --cache-size larger than the
/// disk): objects are evicted to make room, the spill stays.
#[test]
fn a_cache_disk_that_fills_beside_the_spill_still_serves_the_image() {
    tight_disk("fills", "20m", "64m", &[DISK_FULL], &[NO_SPILL]);
}

/// A disk smaller than the image and than the bound: the spill does not
/// fit, and the one-pass read runs out of room too; objects are evicted to
/// make room (the disk full, not the bound), and the image is served.
#[test]
fn a_cache_disk_smaller_than_the_image_evicts_to_make_room() {
    tight_disk("small", "12m", "64m", &[NO_SPILL, DISK_FULL], &[]);
}

/// The spill counts against --cache-size while it lives: objects make room
/// for it, so a disk that holds the bound never fills (a 16 MiB spill
/// beside the 8 MiB of another image and the layer's own 16 MiB of objects
/// did not fit 38 MiB when it was not counted; counted, objects stay under
/// 34 - 16 MiB).
#[test]
fn the_spill_counts_against_the_cache_size() {
    tight_disk_after_other("counted", "38m", "34m", &[], &[NO_SPILL, DISK_FULL], true);
}

/// A disk full of another image's objects (a bound larger than the disk):
/// the spill makes room by evicting them, and the layer is read once.
#[test]
fn a_disk_full_of_other_images_makes_room_for_the_spill() {
    tight_disk_after_other("room", "24m", "64m", &[DISK_FULL], &[NO_SPILL], true);
}

/// The daemon's log line when a layer's spill did not fit the disk.
const NO_SPILL: &str = "no room for the layer's spill";
/// The daemon's log line when a layer is too large for a spill.
const SKIP_SPILL: &str = "layer larger than the cache can spare for its spill";
/// The daemon's log line when objects were evicted for a full disk.
const DISK_FULL: &str = "cache disk full";

/// One layer of 16 × 1 MiB that does not compress (a 16 MiB blob), read
/// with the cache on a tmpfs of `disk` bytes and `--cache-size cache`;
/// `must` and `must_not`: which of [`NO_SPILL`] and [`DISK_FULL`] must and
/// must not happen.
fn tight_disk(name: &str, disk: &str, cache: &str, must: &[&str], must_not: &[&str]) {
    tight_disk_after_other(name, disk, cache, must, must_not, false);
}

/// [`tight_disk`], with another image of 8 × 1 MiB read first if `other`.
fn tight_disk_after_other(
    name: &str,
    disk: &str,
    cache: &str,
    must: &[&str],
    must_not: &[&str],
    other: bool,
) {
    require_env();
    let mut layer = vec![TarEntry::dir("./"), TarEntry::dir("f/")];
    for i in 0..16 {
        layer.push(TarEntry::file(
            format!("f/{i:02}"),
            pseudo_random(300 + i, 1 << 20),
        ));
    }
    let img = PushedImage::new(name, &[layer], &format!("{name}:1"));
    let (reg, h, oracle, work) = (&img.reg, img.host.clone(), img.oracle.clone(), &img.work);
    let dir = work.path().join("cache");
    let _disk = Tmpfs::mount(&dir, disk);
    let m = mount_on_cache(reg, &dir, &["--cache-size", cache]);
    if other {
        let mut other = vec![TarEntry::dir("./"), TarEntry::dir("o/")];
        for i in 0..8 {
            other.push(TarEntry::file(
                format!("o/{i:02}"),
                pseudo_random(400 + i, 1 << 20),
            ));
        }
        let layout = make_tar_image(work.path(), "other", &[other]);
        let image = layout_ref(&layout, "other");
        let o = umoci_unpack(&image, &work.path().join("other-bundle"));
        push(&image, &format!("{h}/other:1"), Format::Oci);
        assert_trees_equal(&rootfs(&m, &h, "other", "1"), &o, "the other image");
        // The walk can end before its layer is stored (from the sketch):
        // its spill and storing pass would still take the disk the next
        // layer's spill is meant to find.
        wait_ready(&m, &h, "other", "1");
        assert!(objects_bytes(&dir) >= 8 << 20, "the other image's objects");
    }
    let root = rootfs(&m, &h, name, "1");
    assert_trees_equal(&root, &oracle, "a layer beside a small disk");
    // Likewise: the storing pass, after the walk, can still fill the disk
    // and evict objects (under the checks below) and log what it did.
    wait_ready(&m, &h, name, "1");
    let log = m.log();
    for line in must {
        assert!(log.contains(line), "{line:?} not in the log:\n{log}");
    }
    for line in must_not {
        assert!(!log.contains(line), "{line:?} in the log:\n{log}");
    }
    let bound: u64 = cache.trim_end_matches('m').parse::<u64>().unwrap() << 20;
    assert!(objects_bytes(&dir) <= bound);
    assert_objects_well_formed(&dir);
}

/// Objects the daemon holds open: its descriptors' targets under
/// `objects/`, and whether each is deleted.
fn daemon_objects_open(pid: u32) -> Vec<(String, bool)> {
    let mut v = Vec::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(t) = fs::read_link(fd.path()) {
            let t = t.to_string_lossy().to_string();
            if t.contains("/objects/") {
                v.push((t.clone(), t.ends_with(" (deleted)")));
            }
        }
    }
    v
}

/// A file opened again after its release reuses the open the daemon kept
/// (its object stays open: no open of the object, no new backing id), and
/// eviction lets it go: once another process's `cache gc` unlinks the
/// objects, the daemon holds none of them open, so their disk is freed.
#[test]
fn a_released_open_is_kept_for_the_next_until_its_object_is_evicted() {
    require_env();
    let img = PushedImage::new("k", &many_files(6, 8192, 500), "kept:1");
    let (reg, oracle) = (&img.reg, img.oracle.clone());
    let cache = tempdir();
    let m = mount_on_cache(reg, cache.path(), &[]);
    let root = rootfs(&m, &reg.host(), "kept", "1");
    assert_trees_equal(&root, &oracle, "first read");
    let pid = m.pid().expect("daemon pid");
    // Every file was opened and released: the daemon still has their
    // objects open, none deleted.
    let open = daemon_objects_open(pid);
    let files = content_hashes(&oracle);
    for hex in &files {
        let o = object_path(cache.path(), hex).to_string_lossy().to_string();
        assert!(
            open.iter().any(|(t, _)| t == &o),
            "the object of a released file is not kept open: {o}; open: {open:?}"
        );
    }
    // Opened again: the same bytes.
    assert_trees_equal(&root, &oracle, "second read, from kept opens");
    let out = cache_cmd(cache.path(), &["gc", "--cache-size", "1k"]);
    assert!(out.status.success(), "cache gc: {out:?}");
    let freed = wait_until(Duration::from_secs(10), || {
        daemon_objects_open(pid).iter().all(|(_, deleted)| !deleted)
    });
    assert!(
        freed,
        "the daemon still holds evicted objects open: {:?}\n{}",
        daemon_objects_open(pid),
        m.log()
    );
    // Opened again after eviction: fetched again, the same bytes.
    assert_trees_equal(&root, &oracle, "read after gc");
}

#[test]
fn cache_gc_evicts_down_to_size() {
    require_env();
    let img = PushedImage::new("g", &many_files(8, 4096, 400), "gc:1");
    let (reg, oracle) = (&img.reg, img.oracle.clone());
    let cache = tempdir();
    fill_cache(reg, "gc", cache.path(), &oracle);
    let before = cache_stats(cache.path());
    assert_eq!(before["objects"], 8, "{before}");
    assert_eq!(before["bytes"], 8 * 4096, "{before}");
    let out = cache_cmd(cache.path(), &["gc", "--cache-size", "10k"]);
    assert!(out.status.success(), "cache gc: {out:?}");
    let after = cache_stats(cache.path());
    assert!(after["bytes"].as_u64().unwrap() <= 10 * 1024, "{after}");
    assert_eq!(after["bytes"], objects_bytes(cache.path()), "{after}");
    assert_eq!(
        after["metadata"], before["metadata"],
        "gc touched metadata: {after}"
    );
    assert_eq!(
        after["layers"], before["layers"],
        "gc dropped layer indexes: {after}"
    );
    assert_objects_well_formed(cache.path());
    // What gc removed comes back.
    let m = mount_on_cache(reg, cache.path(), &[]);
    assert_trees_equal(&rootfs(&m, &reg.host(), "gc", "1"), &oracle, "after gc");
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

/// A good image on `reg` (`good/img:1`) and its oracle.
fn good_image(reg: &Registry, work: &Path) -> PathBuf {
    let layout = make_tar_image(work, "good", &two_layer_files());
    let image = layout_ref(&layout, "good");
    push(&image, &format!("{}/good/img:1", reg.host()), Format::Oci);
    umoci_unpack(&image, &work.join("bundle-good"))
}

fn assert_image_is_eio(m: &Mount, root: &Path, what: &str) {
    assert_errno(list(root), EIO, &format!("{what}: ls rootfs"));
    assert_errno(
        stat(root.join("etc/ok")),
        EIO,
        &format!("{what}: stat rootfs/etc/ok"),
    );
    // Still EIO the second time: nothing half-made was kept.
    assert_errno(list(root), EIO, &format!("{what}: ls rootfs again"));
    let _ = m;
}

fn base_layer() -> Vec<u8> {
    tar_bytes(&[
        TarEntry::dir("./"),
        TarEntry::dir("etc/"),
        TarEntry::file("etc/ok", "fine\n"),
    ])
}

/// Find a file named `name` anywhere under `dir`.
fn find_named(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().contains(name) {
                return Some(e.path());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    None
}

#[test]
fn escaping_entries_are_eio_and_other_images_still_served() {
    require_env();
    let work = tempdir();
    let reg = Registry::start();
    let h = reg.host();
    let good = good_image(&reg, work.path());
    let token = format!("escape-{}", free_port());
    let cases: Vec<(&str, Vec<TarEntry>, String)> = vec![
        (
            "dotdot",
            vec![TarEntry::file(format!("../{token}"), "escaped\n")],
            format!("../{token}"),
        ),
        (
            "dotdot-mid",
            vec![
                TarEntry::dir("a/"),
                TarEntry::file(format!("a/../../{token}"), "escaped\n"),
            ],
            token.clone(),
        ),
        (
            "dotdot-deep",
            vec![TarEntry::file(
                format!("etc/../../../../tmp/{token}"),
                "escaped\n",
            )],
            token.clone(),
        ),
        (
            "hardlink-outside",
            vec![TarEntry::hardlink("etc/hl", "../../../../etc/passwd")],
            "../../../../etc/passwd".to_string(),
        ),
        (
            "hardlink-missing",
            vec![TarEntry::hardlink("etc/hl", "etc/no-such-file")],
            "no-such-file".to_string(),
        ),
    ];
    let mut pushed = Vec::new();
    for (name, bad, needle) in &cases {
        let layers = [
            RawLayer::gzip(&base_layer()),
            RawLayer::gzip(&tar_bytes(bad)),
        ];
        push_raw_image(&h, &format!("bad/{name}"), "1", &layers);
        pushed.push((name, layers[1].bytes.clone(), needle.clone()));
    }
    let mut m = mount_of(&reg);
    for (name, bad_layer, needle) in &pushed {
        let since = m.log().len();
        let root = rootfs(&m, &h, &format!("bad/{name}"), "1");
        assert_image_is_eio(&m, &root, name);
        let digest = sha256_hex(bad_layer);
        assert_log_line(
            &m,
            since,
            &[&digest[..16], needle.as_str(), &format!("bad/{name}")],
            name,
        );
        assert!(m.is_running(), "daemon died on {name}; log:\n{}", m.log());
        assert_errno(
            stat(m.join(format!("{h}/bad/{name}/1/{token}"))),
            libc::ENOENT,
            "escaped file next to rootfs",
        );
    }
    for p in [
        PathBuf::from("/").join(&token),
        PathBuf::from("/tmp").join(&token),
    ] {
        assert!(
            !p.exists(),
            "an escaping entry was written to {}",
            p.display()
        );
    }
    assert_eq!(
        find_named(m.cache_dir(), &token),
        None,
        "escaped name in the cache"
    );
    assert_trees_equal(
        &rootfs(&m, &h, "good/img", "1"),
        &good,
        "good image next to bad ones",
    );
}

#[test]
fn corrupt_gzip_layer_is_eio() {
    require_env();
    let work = tempdir();
    let reg = Registry::start();
    let h = reg.host();
    let good = good_image(&reg, work.path());
    let text: Vec<u8> = (0..20_000)
        .flat_map(|i| format!("line {i} of a compressible file\n").into_bytes())
        .collect();
    let tar = tar_bytes(&[
        TarEntry::dir("data/"),
        TarEntry::file("data/text", text),
        TarEntry::file("data/end", "end\n"),
    ]);
    let gz = gzip(&tar);
    let truncated = gz[..gz.len() * 6 / 10].to_vec();
    let mut flipped = gz.clone();
    let mid = flipped.len() / 2;
    flipped[mid] = !flipped[mid];
    let mut cases = Vec::new();
    for (name, bytes) in [("truncated", truncated), ("flipped", flipped)] {
        let bad = RawLayer {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            bytes,
            diff_id: sha256_digest(&tar),
        };
        let layers = [RawLayer::gzip(&base_layer()), bad.clone()];
        push_raw_image(&h, &format!("gz/{name}"), "1", &layers);
        cases.push((name, sha256_hex(&bad.bytes)));
    }
    let mut m = mount_of(&reg);
    for (name, digest) in &cases {
        let since = m.log().len();
        let root = rootfs(&m, &h, &format!("gz/{name}"), "1");
        assert_image_is_eio(&m, &root, name);
        assert_errno(
            read(root.join("data/text")),
            EIO,
            &format!("{name}: read a file of the corrupt layer"),
        );
        assert_log_line(&m, since, &[&digest[..16], &format!("gz/{name}")], name);
        assert!(m.is_running(), "daemon died on {name}; log:\n{}", m.log());
    }
    assert_trees_equal(
        &rootfs(&m, &h, "good/img", "1"),
        &good,
        "good image next to bad ones",
    );
}

#[test]
fn layer_bytes_failing_digest_are_eio_and_not_cached() {
    require_env();
    let work = tempdir();
    let reg = Registry::start();
    let good = good_image(&reg, work.path());
    let good_payload = "GOOD payload line\n".repeat(4000).into_bytes();
    let evil_payload = "EVIL payload line\n".repeat(4000).into_bytes();
    let mk = |payload: &[u8]| {
        tar_bytes(&[
            TarEntry::dir("./"),
            TarEntry::dir("etc/"),
            TarEntry::file("etc/ok", "fine\n"),
            TarEntry::dir("data/"),
            TarEntry::file("data/payload", payload.to_vec()),
        ])
    };
    let (t1, t2) = (mk(&good_payload), mk(&evil_payload));
    // Stored deflate blocks: both blobs have the same size, so only the
    // digest tells them apart.
    let (gz1, gz2) = (gzip_stored(&t1), gzip_stored(&t2));
    assert_eq!(gz1.len(), gz2.len());
    let layer_digest = sha256_digest(&gz1);
    let config = raw_config(&[sha256_digest(&t1)]);
    let config_digest = sha256_digest(&config);
    let manifest = raw_manifest(
        &config,
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip".to_string(),
            layer_digest.clone(),
            gz1.len(),
        )],
    );
    let manifest_digest = sha256_digest(&manifest);
    let (m2, c2, g2, ld, cd, md) = (
        manifest.clone(),
        config.clone(),
        gz2.clone(),
        layer_digest.clone(),
        config_digest.clone(),
        manifest_digest.clone(),
    );
    let fault = FaultServer::start(move |_method, target| {
        let (path, _) = split_target(target);
        let mt = "application/vnd.oci.image.manifest.v1+json";
        if path == "/v2/wrong/img/manifests/1" || path == format!("/v2/wrong/img/manifests/{md}") {
            FaultReply::bytes(200, mt, m2.clone()).with_header("Docker-Content-Digest", &md)
        } else if path == format!("/v2/wrong/img/blobs/{cd}") {
            FaultReply::bytes(200, "application/octet-stream", c2.clone())
        } else if path == format!("/v2/wrong/img/blobs/{ld}") {
            FaultReply::bytes(200, "application/octet-stream", g2.clone())
        } else if path == "/v2/wrong/img/tags/list" {
            FaultReply::json(200, r#"{"name":"wrong/img","tags":["1"]}"#)
        } else {
            FaultReply::Default
        }
    });
    let mut m = Mount::builder()
        .insecure(&reg.host())
        .insecure(&fault.host())
        .start();
    let fh = fault.host();
    let root = rootfs(&m, &fh, "wrong/img", "1");
    let since = m.log().len();
    assert_errno(list(&root), EIO, "ls rootfs of a layer failing its digest");
    assert_errno(
        read(root.join("data/payload")),
        EIO,
        "read a file of a layer failing its digest",
    );
    assert_errno(list(&root), EIO, "ls rootfs again");
    assert!(
        fault.count(&format!("/v2/wrong/img/blobs/{layer_digest}")) >= 1,
        "the layer was never requested: {:?}",
        fault.requests()
    );
    let cache = m.cache_dir().to_path_buf();
    for (what, payload) in [("wrong", &evil_payload), ("expected", &good_payload)] {
        let o = object_path(&cache, &sha256_hex(payload));
        assert!(!o.exists(), "{what} payload cached as {}", o.display());
    }
    assert!(
        object_files(&cache).is_empty(),
        "objects from a layer that failed its digest: {:?}",
        object_files(&cache)
    );
    let expected_hex = hex_of(&layer_digest).to_string();
    let actual_hex = sha256_hex(&gz2);
    let both = wait_until(Duration::from_secs(10), || {
        m.log()
            .get(since..)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&expected_hex) && l.contains(&actual_hex))
    });
    assert!(
        both,
        "no log line with both digests (expected {expected_hex}, got {actual_hex}):\n{}",
        tail(m.log().get(since..).unwrap_or_default(), 40)
    );
    assert!(m.is_running(), "daemon died; log:\n{}", m.log());
    assert_trees_equal(
        &rootfs(&m, &reg.host(), "good/img", "1"),
        &good,
        "good image after a digest failure",
    );
}

/// Waits (≤ 10 s) until one new WARN/ERROR line of the daemon log (after
/// byte `since`) contains every one of `needles`; panics otherwise.
fn assert_log_line_with_all(m: &Mount, since: usize, needles: &[&str], what: &str) {
    let found = wait_until(Duration::from_secs(10), || {
        let log = m.log();
        log.get(since..).unwrap_or_default().lines().any(|l| {
            (l.contains("ERROR") || l.contains("WARN")) && needles.iter().all(|n| l.contains(n))
        })
    });
    assert!(
        found,
        "{what}: no WARN/ERROR line in the daemon log naming all of {needles:?}; log since then:\n{}",
        tail(m.log().get(since..).unwrap_or_default(), 40)
    );
}

/// `--cache-size` of the bad-input tests below, and in bytes.
const SMALL_CACHE: &str = "8m";
const SMALL_CACHE_BYTES: u64 = 8 << 20;

/// A cache directory `work/<name>` on a tmpfs of 64 MiB: should a bomb get
/// through, it fills that, not the machine's disk. (Declare it before the
/// mount on it, so that the mount goes first.)
fn small_disk(work: &Path, name: &str) -> (PathBuf, Tmpfs) {
    let dir = work.join(name);
    let disk = Tmpfs::mount(&dir, "64m");
    (dir, disk)
}

/// A mount of `reg` with `--cache-size 8m` (plus `args`) that has read the
/// good image ([`good_image`]) whole, and that image's objects on disk.
fn mount_with_good_image_cached(
    reg: &Registry,
    good: &Path,
    cache: &Path,
    args: &[&str],
) -> (Mount, BTreeSet<PathBuf>) {
    let mut all = vec!["--cache-size", SMALL_CACHE];
    all.extend_from_slice(args);
    let m = mount_on_cache(reg, cache, &all);
    assert_trees_equal(
        &rootfs(&m, &reg.host(), "good/img", "1"),
        good,
        "good image",
    );
    let objects: BTreeSet<PathBuf> = object_files(cache).into_iter().collect();
    assert!(objects.len() >= 4, "good image objects: {objects:?}");
    (m, objects)
}

/// The good image read first is still whole in the cache: every object it
/// stored is on disk, and reading it again (after dropping the kernel's
/// caches) fetches no blob of it.
fn assert_good_image_untouched(
    m: &Mount,
    reg: &Registry,
    good: &Path,
    objects: &BTreeSet<PathBuf>,
    what: &str,
) {
    let gone: Vec<&PathBuf> = objects.iter().filter(|p| !p.exists()).collect();
    assert!(
        gone.is_empty(),
        "{what}: objects of the good image evicted: {gone:?}; log:\n{}",
        tail(&m.log(), 40)
    );
    registry_log_barrier(reg);
    let offset = reg.log_len();
    drop_caches();
    assert_trees_equal(
        &rootfs(m, &reg.host(), "good/img", "1"),
        good,
        &format!("{what}: good image read again"),
    );
    registry_log_barrier(reg);
    let fetched: Vec<String> = reg
        .requests_since(offset)
        .into_iter()
        .filter(|r| r.starts_with("GET ") && r.contains("/v2/good/img/blobs/"))
        .collect();
    assert!(
        fetched.is_empty(),
        "{what}: the good image fetched blobs again: {fetched:?}"
    );
    assert!(
        objects_bytes(m.cache_dir()) <= SMALL_CACHE_BYTES,
        "{what}: objects take {} bytes, over --cache-size {SMALL_CACHE}",
        objects_bytes(m.cache_dir())
    );
}

/// `ls`, `stat` and `read` of `rootfs/` of `repo:1` answer EIO, each within
/// 20 s (the layer is refused at the entry's header, not after reading its
/// content).
fn assert_eio_promptly(m: &Mount, root: &Path, file: &str, what: &str) {
    let r = root.to_path_buf();
    let (res, took) = timed_within(Duration::from_secs(20), &format!("{what}: ls"), move || {
        list_now(&r)
    });
    assert_errno(res, EIO, &format!("{what}: ls rootfs"));
    assert!(took < Duration::from_secs(10), "{what}: EIO took {took:?}");
    let p = root.join(file);
    let res = within(
        Duration::from_secs(20),
        &format!("{what}: read"),
        move || fs::read(&p),
    );
    assert_errno(res, EIO, &format!("{what}: read rootfs/{file}"));
    assert_errno(
        stat(root.join("etc/ok")),
        EIO,
        &format!("{what}: stat rootfs/etc/ok"),
    );
    let _ = m;
}

/// A file larger than the cache bound (a decompression bomb: 64 MiB of
/// zeros in a gzip or zstd layer of a few KiB, under --cache-size 8m) is
/// refused at its header: the image answers EIO, a log line names the
/// layer, the file and its size against the bound, and another image
/// already cached keeps its objects (read again, it fetches no blob). The
/// same with `-o noearly` (one pass instead of listing, then storing).
#[test]
fn a_file_larger_than_the_cache_bound_is_eio_and_evicts_nothing() {
    require_env();
    let work = tempdir();
    let reg = Registry::start();
    let h = reg.host();
    let good = good_image(&reg, work.path());
    const BOMB: usize = 64 << 20;
    let tar = tar_bytes(&[
        TarEntry::dir("./"),
        TarEntry::dir("etc/"),
        TarEntry::file("etc/ok", "fine\n"),
        TarEntry::dir("zeros/"),
        TarEntry::file("zeros/bomb", vec![0u8; BOMB]),
    ]);
    let gz = RawLayer::gzip(&tar);
    let zst = RawLayer {
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        bytes: zstd::encode_all(&tar[..], 3).unwrap(),
        diff_id: sha256_digest(&tar),
    };
    for l in [&gz, &zst] {
        assert!(l.bytes.len() < 1 << 20, "{} bytes", l.bytes.len());
    }
    push_raw_image(&h, "bomb/gzip", "1", std::slice::from_ref(&gz));
    push_raw_image(&h, "bomb/zstd", "1", std::slice::from_ref(&zst));
    for (i, args) in [&[][..], &["-o", "noearly"][..]].into_iter().enumerate() {
        let (cache, _disk) = small_disk(work.path(), &format!("cache-{i}"));
        let (mut m, objects) = mount_with_good_image_cached(&reg, &good, &cache, args);
        for (repo, layer) in [("bomb/gzip", &gz), ("bomb/zstd", &zst)] {
            let what = format!("{repo} {args:?}");
            let since = m.log().len();
            assert_eio_promptly(&m, &rootfs(&m, &h, repo, "1"), "zeros/bomb", &what);
            assert_log_line_with_all(
                &m,
                since,
                &[
                    &sha256_hex(&layer.bytes)[..16],
                    "zeros/bomb",
                    &BOMB.to_string(),
                    &SMALL_CACHE_BYTES.to_string(),
                ],
                &what,
            );
            assert!(m.is_running(), "{what}: daemon died; log:\n{}", m.log());
            assert_good_image_untouched(&m, &reg, &good, &objects, &what);
        }
        m.stop();
        assert_objects_well_formed(&cache);
    }
}

/// A tar of `entries` and then one GNU sparse entry (type `S`) `path` of
/// real size `real`: `data` (512 bytes) at offset `at`, holes elsewhere.
fn tar_with_gnu_sparse(entries: &[TarEntry], path: &str, real: u64, at: u64) -> Vec<u8> {
    let data = [b'x'; 512];
    let mut t = tar_bytes(entries);
    t.truncate(t.len() - 1024); // the end-of-archive blocks
    let mut h = tar::Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(TAR_MTIME);
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(data.len() as u64);
    let g = h.as_gnu_mut().unwrap();
    g.sparse[0].set_offset(at);
    g.sparse[0].set_length(data.len() as u64);
    if at + (data.len() as u64) < real {
        // An empty last region ends the file in a hole.
        g.sparse[1].set_offset(real);
        g.sparse[1].set_length(0);
    }
    g.set_real_size(real);
    h.set_cksum();
    let mut b = tar::Builder::new(t);
    b.append(&h, &data[..]).unwrap();
    b.into_inner().unwrap()
}

/// GNU sparse entries (type `S`) are refused, as `umoci unpack` (the
/// oracle) refuses them: the image answers EIO with a log line naming the
/// file. One that declares a real size of nearly 2^63 (a few hundred bytes
/// of layer) answers at once, not after reading (or storing) zeros; the
/// daemon keeps serving, and another image keeps its objects.
#[test]
fn gnu_sparse_entries_are_eio_at_once() {
    require_env();
    let work = tempdir();
    let reg = Registry::start();
    let h = reg.host();
    let good = good_image(&reg, work.path());
    let base = [
        TarEntry::dir("./"),
        TarEntry::dir("etc/"),
        TarEntry::file("etc/ok", "fine\n"),
        TarEntry::dir("big/"),
    ];
    // The oracle: umoci refuses the entry type, whatever its size.
    let small = tar_with_gnu_sparse(&base, "big/sparse", 3 << 20, 1 << 20);
    let image = layout_ref(&make_tar_image(work.path(), "sparse", &[]), "sparse");
    add_tar_layer(&image, &small);
    let out = Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(work.path().join("bundle-sparse"))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("typeflag"),
        "umoci unpack of a GNU sparse entry: {out:?}"
    );
    let huge = tar_with_gnu_sparse(&base, "big/sparse", (1 << 63) - 512, (1 << 63) - 1024);
    let cases = [
        ("sparse/huge-gzip", RawLayer::gzip(&huge)),
        ("sparse/huge-tar", RawLayer::plain(&huge)),
        ("sparse/small-gzip", RawLayer::gzip(&small)),
    ];
    for (repo, l) in &cases {
        push_raw_image(&h, repo, "1", std::slice::from_ref(l));
    }
    let (cache, _disk) = small_disk(work.path(), "cache");
    let (m, objects) = mount_with_good_image_cached(&reg, &good, &cache, &[]);
    for (repo, l) in &cases {
        let since = m.log().len();
        assert_eio_promptly(&m, &rootfs(&m, &h, repo, "1"), "big/sparse", repo);
        assert_log_line_with_all(
            &m,
            since,
            &[&sha256_hex(&l.bytes)[..16], "big/sparse", "GNU sparse"],
            repo,
        );
        assert_good_image_untouched(&m, &reg, &good, &objects, repo);
    }
}

/// A gzip layer whose descriptor claims a size far beyond the cache bound
/// (9·10^18 bytes) takes no room in the cache before a byte of it arrived:
/// no spill is reserved for it (it is read in one pass), so no object of
/// another image is evicted; its real bytes then fail the size and the
/// image answers EIO with a log line.
#[test]
fn a_huge_layer_size_in_the_manifest_evicts_nothing() {
    require_env();
    let work = tempdir();
    let reg = Registry::start();
    let h = reg.host();
    let good = good_image(&reg, work.path());
    let layer = RawLayer::gzip(&base_layer());
    let (manifest, _) = push_raw_image(&h, "huge/size", "real", std::slice::from_ref(&layer));
    let mut m: Value = serde_json::from_slice(&manifest).unwrap();
    const HUGE: u64 = 9_000_000_000_000_000_000;
    m["layers"][0]["size"] = HUGE.into();
    let lying = serde_json::to_vec(&m).unwrap();
    put_manifest(
        &h,
        "huge/size",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        &lying,
        None,
    );
    let (cache, _disk) = small_disk(work.path(), "cache");
    let (mnt, objects) = mount_with_good_image_cached(&reg, &good, &cache, &[]);
    let since = mnt.log().len();
    let root = rootfs(&mnt, &h, "huge/size", "1");
    assert_image_is_eio(&mnt, &root, "a layer of a huge declared size");
    assert_log_line_with_all(
        &mnt,
        since,
        &[&sha256_hex(&layer.bytes)[..16], &HUGE.to_string()],
        "a layer of a huge declared size",
    );
    assert_good_image_untouched(&mnt, &reg, &good, &objects, "huge declared size");
    // The same layer with its true size is served.
    assert_eq!(
        read(rootfs(&mnt, &h, "huge/size", "real").join("etc/ok")).unwrap(),
        b"fine\n"
    );
}

// ---------------------------------------------------------------------------
// Gzip span index: evicted content comes back by one span, not the prefix
// ---------------------------------------------------------------------------

/// One gzip layer of `n` incompressible files of `size` bytes: several
/// 4 MiB spans, so a refetch from the prefix and one from a checkpoint
/// differ by megabytes.
fn span_image(work: &Path, tag: &str, n: usize, size: usize) -> PathBuf {
    let mut l = vec![TarEntry::dir("./"), TarEntry::dir("f/")];
    for i in 0..n {
        l.push(TarEntry::file(
            format!("f/{i:03}"),
            pseudo_random(7_000 + i as u64, size),
        ));
    }
    make_tar_image(work, tag, &[l])
}

/// Serves tag `tag` of OCI layout `layout` as `<name>/img:1` the way no
/// real registry does: every blob GET is answered 200 with the whole blob,
/// Range or not. `blob(digest, layout bytes)` answers each blob GET
/// ([`octets`] for the plain answer).
fn layout_server(
    layout: &Path,
    tag: &str,
    name: &'static str,
    blob: impl Fn(&str, Vec<u8>) -> FaultReply + Send + Sync + 'static,
) -> FaultServer {
    let (lay, md) = (layout.to_path_buf(), layout_digest(layout, tag));
    FaultServer::start(move |_method, target| {
        let (path, _) = split_target(target);
        let mt = "application/vnd.oci.image.manifest.v1+json";
        let repo = format!("/v2/{name}/img");
        if path == format!("{repo}/manifests/1") || path == format!("{repo}/manifests/{md}") {
            FaultReply::bytes(200, mt, layout_blob(&lay, &md))
                .with_header("Docker-Content-Digest", &md)
        } else if let Some(d) = path.strip_prefix(&format!("{repo}/blobs/")) {
            blob(d, layout_blob(&lay, d))
        } else if path == format!("{repo}/tags/list") {
            FaultReply::json(200, &format!(r#"{{"name":"{name}/img","tags":["1"]}}"#))
        } else {
            FaultReply::Default
        }
    })
}

/// A whole blob, 200.
fn octets(bytes: Vec<u8>) -> FaultReply {
    FaultReply::bytes(200, "application/octet-stream", bytes)
}

#[test]
fn evicted_file_of_a_gzip_layer_is_refetched_by_one_span() {
    require_env();
    let work = tempdir();
    // 160 × 128 KiB = 20 MiB: five spans.
    let layout = span_image(work.path(), "sp", 160, 128 << 10);
    let image = layout_ref(&layout, "sp");
    let oracle = umoci_unpack(&image, &work.path().join("bundle"));
    let reg = Registry::start();
    let h = reg.host();
    push(&image, &format!("{h}/span:1"), Format::Oci);
    let layer = manifest_layer_digests(&layout_manifest(&layout, "sp"))[0].clone();
    let layer_size = layout_blob(&layout, &layer).len() as u64;
    let cache = tempdir();
    let m = mount_on_cache(&reg, cache.path(), &["--cache-size", "1m"]);
    let root = rootfs(&m, &h, "span", "1");
    assert_trees_equal(&root, &oracle, "first read under a 1m cache");
    wait_ready(&m, &h, "span", "1");
    let status: Value =
        serde_json::from_slice(&read(m.join(format!("{h}/span/1/status"))).unwrap()).unwrap();
    assert_eq!(
        status["layers"][0]["mode"], "span-index",
        "a gzip layer read once has a span index: {status}"
    );
    // Files near the end of the layer: the prefix holding them is almost
    // the whole blob; a span is at most 4 MiB of (incompressible) tar.
    for name in ["f/150", "f/097"] {
        let want = fs::read(oracle.join(name)).unwrap();
        let p = root.join(name);
        registry_log_barrier(&reg);
        let off = reg.log_len();
        evict_page_cache(&p);
        assert_eq!(read(&p).unwrap(), want, "{name} after eviction");
        registry_log_barrier(&reg);
        let got = blob_get_responses_since(&reg, off, &layer);
        let bytes: u64 = got.iter().map(|(_, b)| b).sum();
        assert!(
            !got.is_empty() && got.iter().all(|(s, _)| *s == 206),
            "{name}: expected Range requests for the evicted file, got {got:?}"
        );
        assert!(
            bytes <= (4 << 20) + (128 << 10) + (256 << 10),
            "{name}: refetching one 128 KiB file took {bytes} bytes of a {layer_size}-byte layer"
        );
    }
    let cached_objects = object_files(cache.path()).len();
    assert!(
        cached_objects < 160,
        "the 1m cache holds {cached_objects} objects"
    );
}

/// A [`span_image`] of `n` × 128 KiB files pushed as `<tag>/img:1` to a
/// new registry (the place blobs are redirected to): its layout, its
/// `umoci unpack`, the registry and the layer's digest.
fn span_image_on(work: &Path, tag: &str, n: usize) -> (PathBuf, PathBuf, Registry, String) {
    let layout = span_image(work, tag, n, 128 << 10);
    let image = layout_ref(&layout, tag);
    let oracle = umoci_unpack(&image, &work.join("bundle"));
    let reg = Registry::start();
    push(&image, &format!("{}/{tag}/img:1", reg.host()), Format::Oci);
    let layer = manifest_layer_digests(&layout_manifest(&layout, tag))[0].clone();
    (layout, oracle, reg, layer)
}

/// `307` to blob `digest` of `<tag>/img` on `host`.
fn redirect(host: &str, tag: &str, digest: &str) -> FaultReply {
    FaultReply::Respond {
        status: 307,
        headers: vec![(
            "Location".into(),
            format!("http://{host}/v2/{tag}/img/blobs/{digest}"),
        )],
        body: Vec::new(),
    }
}

/// Registries in the wild (Docker Hub, GHCR, Quay, ECR) answer a blob GET
/// with a redirect to a CDN or object store on another host. Here a blob
/// GET gets `307` to the real registry on another port: the layer streams
/// through it, and an evicted file's Range request is redirected too and
/// still answered `206` with only its span.
#[test]
fn blobs_redirected_to_another_host_stream_and_serve_ranges() {
    require_env();
    let work = tempdir();
    // 48 × 128 KiB = 6 MiB: two gzip spans.
    let (layout, oracle, cdn, layer) = span_image_on(work.path(), "rd", 48);
    let target = cdn.host();
    let fault = layout_server(&layout, "rd", "rd", move |d, _| redirect(&target, "rd", d));
    let cache = tempdir();
    let m = Mount::builder()
        .insecure(&fault.host())
        .insecure(&cdn.host())
        .cache_dir(cache.path())
        .arg("--cache-size")
        .arg("1m")
        .start();
    let root = rootfs(&m, &fault.host(), "rd/img", "1");
    assert_trees_equal(&root, &oracle, "streamed through a redirect");
    let name = "f/040";
    let p = root.join(name);
    registry_log_barrier(&cdn);
    let off = cdn.log_len();
    evict_page_cache(&p);
    assert_eq!(read(&p).unwrap(), fs::read(oracle.join(name)).unwrap());
    registry_log_barrier(&cdn);
    let got = blob_get_responses_since(&cdn, off, &layer);
    assert!(
        !got.is_empty() && got.iter().all(|(s, _)| *s == 206),
        "the evicted file was not refetched by a redirected Range request: {got:?}"
    );
    assert!(
        fault.count("/v2/rd/img/blobs/") >= 2,
        "blob GETs did not go through the registry first"
    );
}

/// A connection cut in the middle of a layer (a network hiccup) costs one
/// Range request for the rest, not the layer, and readers see no error:
/// the first blob GET is cut half way; later ones are redirected to the
/// real registry, which answers the resumed Range.
#[test]
fn a_layer_stream_cut_mid_blob_resumes_where_it_stopped() {
    require_env();
    let work = tempdir();
    let (layout, oracle, cdn, layer) = span_image_on(work.path(), "cut", 32);
    let (target, l2) = (cdn.host(), layer.clone());
    let cut_once = std::sync::atomic::AtomicBool::new(false);
    let fault = layout_server(&layout, "cut", "cut", move |d, body| {
        if d == l2 && !cut_once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let first = body.len() / 2;
            return FaultReply::Cut {
                headers: vec![("Content-Type".into(), "application/octet-stream".into())],
                body,
                first,
            };
        }
        redirect(&target, "cut", d)
    });
    registry_log_barrier(&cdn);
    let off = cdn.log_len();
    let m = Mount::builder()
        .insecure(&fault.host())
        .insecure(&cdn.host())
        .start();
    let root = rootfs(&m, &fault.host(), "cut/img", "1");
    assert_trees_equal(&root, &oracle, "after a cut and a resume");
    registry_log_barrier(&cdn);
    let got = blob_get_responses_since(&cdn, off, &layer);
    let size = layout_blob(&layout, &layer).len() as u64;
    assert!(
        got.len() == 1 && got[0].0 == 206 && got[0].1 <= size / 2 + (64 << 10),
        "the rest of the layer was not one Range request: {got:?} (layer {size} bytes)"
    );
    assert!(
        m.log().contains("resuming with a Range request"),
        "no word of the resume:\n{}",
        m.log()
    );
}

/// A registry that sends a layer a byte now and then never trips a read
/// timeout (each byte resets it); it must still end in EIO, not a reader
/// waiting forever, and the daemon keeps serving.
#[test]
fn a_registry_that_drips_a_layer_is_eio_not_a_hang() {
    require_env();
    let work = tempdir();
    let (layout, _oracle, _cdn, layer) = span_image_on(work.path(), "drip", 8);
    let l2 = layer.clone();
    let fault = layout_server(&layout, "drip", "drip", move |d, body| {
        if d == l2 {
            FaultReply::Drip {
                headers: vec![("Content-Type".into(), "application/octet-stream".into())],
                body,
                every: Duration::from_millis(700),
            }
        } else {
            octets(body)
        }
    });
    let mut m = Mount::builder().insecure(&fault.host()).timeout(2).start();
    let root = rootfs(&m, &fault.host(), "drip/img", "1");
    let r = within(Duration::from_secs(60), "ls a dripping layer", move || {
        list_now(&root)
    });
    assert_errno(r, libc::EIO, "a layer the registry drips");
    assert!(
        m.log().contains("bytes/s"),
        "no log line says the registry was too slow:\n{}",
        m.log()
    );
    assert!(m.is_running(), "daemon died; log:\n{}", m.log());
}

#[test]
fn registry_ignoring_range_still_serves_evicted_content() {
    require_env();
    let work = tempdir();
    let layout = span_image(work.path(), "ir", 48, 128 << 10);
    let image = layout_ref(&layout, "ir");
    let oracle = umoci_unpack(&image, &work.path().join("bundle"));
    let fault = layout_server(&layout, "ir", "ir", |_, b| octets(b));
    let cache = tempdir();
    let mut m = Mount::builder()
        .insecure(&fault.host())
        .cache_dir(cache.path())
        .arg("--cache-size")
        .arg("512k")
        .start();
    let root = rootfs(&m, &fault.host(), "ir/img", "1");
    assert_trees_equal(&root, &oracle, "first read");
    assert_trees_equal(&root, &oracle, "reread with evicted objects, Range ignored");
    assert!(m.is_running(), "daemon died; log:\n{}", m.log());
}

#[test]
fn span_failing_its_object_digest_is_eio_and_nothing_is_cached() {
    require_env();
    let work = tempdir();
    let layout = span_image(work.path(), "sf", 48, 128 << 10);
    let image = layout_ref(&layout, "sf");
    let oracle = umoci_unpack(&image, &work.path().join("bundle"));
    let layer = manifest_layer_digests(&layout_manifest(&layout, "sf"))[0].clone();
    let good = layout_blob(&layout, &layer);
    // Same length, different bytes in the last quarter (files f/036 on):
    // the first read of the layer gets the real blob (it passes its
    // digest); every later request (the refetch of evicted content) gets
    // the tampered one.
    let mut bad = good.clone();
    let (from, to) = (bad.len() * 3 / 4, bad.len() - 4096);
    for b in &mut bad[from..to] {
        *b ^= 0x5a;
    }
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s2 = served.clone();
    let fault = layout_server(&layout, "sf", "sf", move |d, bytes| {
        if d != layer {
            return octets(bytes);
        }
        let n = s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        octets(if n == 0 { good.clone() } else { bad.clone() })
    });
    let cache = tempdir();
    // First mount, unbounded: the layer is read once (the real blob).
    let mut m1 = Mount::builder()
        .insecure(&fault.host())
        .cache_dir(cache.path())
        .start();
    let root = rootfs(&m1, &fault.host(), "sf/img", "1");
    assert_trees_equal(&root, &oracle, "first read (the real blob)");
    m1.stop();
    drop(m1);
    // Again with a 512k bound: opening the cache evicts nearly everything.
    let mut m = Mount::builder()
        .insecure(&fault.host())
        .cache_dir(cache.path())
        .arg("--cache-size")
        .arg("512k")
        .start();
    let root = rootfs(&m, &fault.host(), "sf/img", "1");
    // Content before the tampered quarter still comes back right.
    assert_eq!(
        read(root.join("f/003")).unwrap(),
        fs::read(oracle.join("f/003")).unwrap(),
        "an untampered span"
    );
    // A file in the tampered quarter whose object was evicted.
    let name = "f/040";
    let o = object_path(
        cache.path(),
        &sha256_hex(&fs::read(oracle.join(name)).unwrap()),
    );
    assert!(!o.exists(), "{name} still cached under a 512k bound");
    let p = root.join(name);
    evict_page_cache(&p);
    assert_errno(
        read(&p),
        EIO,
        "reading content whose refetched span fails its digest",
    );
    assert!(
        served.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "no refetch happened"
    );
    assert!(!o.exists(), "content cached from a span that failed");
    assert_objects_well_formed(cache.path());
    assert!(m.is_running(), "daemon died; log:\n{}", m.log());
}

// ---------------------------------------------------------------------------
// Early answers: a file is readable as soon as the stream has passed it
// ---------------------------------------------------------------------------

/// Which layer of [`held_image`] the server holds half way.
#[derive(PartialEq)]
enum Held {
    Upper,
    Lower,
}

/// A two-layer image whose layers each start with small files and go on
/// with 8 MiB of incompressible data; the server sends the `held` layer's
/// first half, then holds the rest until `gate` opens.
struct HeldImage {
    fault: FaultServer,
    gate: Gate,
    oracle: PathBuf,
    _work: tempfile::TempDir,
}

/// The layers of [`held_image`]: small files (a whiteout, hard links)
/// before and after `big` bytes of incompressible data in each.
fn held_layers(big: usize) -> [Vec<TarEntry>; 2] {
    let lower = vec![
        TarEntry::dir("./"),
        TarEntry::dir("etc/"),
        TarEntry::file("etc/base", "from the lower layer\n"),
        TarEntry::file("etc/gone", "whited out above\n"),
        TarEntry::file("big-lower", pseudo_random(7, big)),
        TarEntry::file("etc/late-lower", "after the lower big file\n"),
    ];
    let upper = vec![
        TarEntry::dir("etc/"),
        TarEntry::file("etc/early", EARLY_FILE).mode(0o640),
        TarEntry::hardlink("etc/early-link", "etc/early"),
        TarEntry::hardlink("etc/early-link2", "etc/early"),
        TarEntry::whiteout("etc", "gone"),
        TarEntry::file("big", pseudo_random(42, big)),
        TarEntry::file("etc/late", "after the big file\n"),
    ];
    [lower, upper]
}

fn held_image(name: &'static str, held: Held) -> HeldImage {
    let work = tempdir();
    let [lower, upper] = held_layers(8 << 20);
    let layout = make_tar_image(work.path(), "held", &[lower, upper]);
    let oracle = umoci_unpack(&layout_ref(&layout, "held"), &work.path().join("bundle"));
    let layers = manifest_layer_digests(&layout_manifest(&layout, "held"));
    let held_digest = layers[usize::from(held == Held::Upper)].clone();
    let gate = Gate::default();
    let g2 = gate.clone();
    let fault = layout_server(&layout, "held", name, move |d, body| {
        if d != held_digest {
            return octets(body);
        }
        FaultReply::Trickle {
            headers: vec![("Content-Type".into(), "application/octet-stream".into())],
            first: body.len() / 2,
            body,
            gate: g2.clone(),
        }
    });
    HeldImage {
        fault,
        gate,
        oracle,
        _work: work,
    }
}

/// A read answered on a thread.
type Pending = std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>;

/// Reads `path` on a thread; `Some(result)` if it answered within `limit`,
/// and the receiver to wait for it longer.
fn read_within(path: PathBuf, limit: Duration) -> (Pending, Option<std::io::Result<Vec<u8>>>) {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(fs::read(&path));
    });
    let got = rx.recv_timeout(limit).ok();
    (rx, got)
}

#[test]
fn a_file_is_readable_as_soon_as_the_stream_has_passed_it() {
    require_env();
    let held = held_image("early", Held::Upper);
    let m = Mount::builder().insecure(&held.fault.host()).start();
    let root = rootfs(&m, &held.fault.host(), "early/img", "1");

    // The upper layer is held half way: its first file has passed.
    let (_, early) = read_within(root.join("etc/early"), Duration::from_secs(30));
    let early = early.expect("etc/early readable while its layer is held half way");
    assert_eq!(early.unwrap(), EARLY_FILE);
    let md = fs::metadata(root.join("etc/early")).unwrap();
    assert_eq!(md.len(), EARLY_FILE.len() as u64);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777,
        0o640
    );
    // A hard link answered early is the same inode as its target.
    let ino = |p: &str| std::os::unix::fs::MetadataExt::ino(&fs::metadata(root.join(p)).unwrap());
    let early_ino = ino("etc/early");
    assert_eq!(ino("etc/early-link"), early_ino, "link and target, early");
    assert_streaming(
        &m,
        &held.fault.host(),
        "early/img",
        1,
        "the read did not wait for it",
    );

    // A lower layer's file is not settled while the layer above it may
    // still hide it; a file past the held point has not been seen.
    let (base_rx, base) = read_within(root.join("etc/base"), Duration::from_secs(1));
    assert!(
        base.is_none(),
        "etc/base answered before the upper layer ended: {base:?}"
    );
    let (late_rx, late) = read_within(root.join("etc/late"), Duration::from_secs(1));
    assert!(
        late.is_none(),
        "etc/late answered before the stream reached it: {late:?}"
    );
    let (nowhere_rx, nowhere) = read_within(root.join("etc/nowhere"), Duration::from_secs(1));
    assert!(
        nowhere.is_none(),
        "a missing name answered before the upper layer ended: {nowhere:?}"
    );

    held.gate.open();
    let wait = Duration::from_secs(30);
    assert_eq!(
        base_rx.recv_timeout(wait).unwrap().unwrap(),
        b"from the lower layer\n"
    );
    assert_eq!(
        late_rx.recv_timeout(wait).unwrap().unwrap(),
        b"after the big file\n"
    );
    assert_errno(
        read(root.join("etc/gone")),
        libc::ENOENT,
        "whited-out lower file",
    );
    assert_errno(
        nowhere_rx.recv_timeout(wait).unwrap(),
        libc::ENOENT,
        "missing name",
    );
    assert_trees_equal(&root, &held.oracle, "after the held layer ended");
    assert_eq!(read(root.join("etc/early")).unwrap(), EARLY_FILE);
    // Once the tree is built, every name of the file shows the number the
    // kernel was given early (one not looked up early too), and all links.
    for name in ["etc/early", "etc/early-link", "etc/early-link2"] {
        let md = fs::metadata(root.join(name)).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&md),
            early_ino,
            "{name}"
        );
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&md), 3, "{name}");
    }
}

#[test]
fn a_missing_name_is_settled_once_the_layers_above_are_listed() {
    require_env();
    let held = held_image("absent", Held::Lower);
    let m = Mount::builder().insecure(&held.fault.host()).start();
    let root = rootfs(&m, &held.fault.host(), "absent/img", "1");
    let wait = Duration::from_secs(30);

    // The upper layer is complete (listed and checked) and whites out
    // etc/gone: that is settled while the lower layer is held half way.
    let (_, gone) = read_within(root.join("etc/gone"), wait);
    assert_errno(
        gone.expect("etc/gone settled while the lower layer is held"),
        libc::ENOENT,
        "lower file whited out by the complete upper layer",
    );
    // So are the upper layer's files, and the lower layer's files the
    // stream has passed (the upper layer does not hide them).
    let (_, early) = read_within(root.join("etc/early"), wait);
    assert_eq!(early.expect("etc/early").unwrap(), EARLY_FILE);
    let (_, base) = read_within(root.join("etc/base"), wait);
    assert_eq!(base.expect("etc/base").unwrap(), b"from the lower layer\n");
    assert_streaming(
        &m,
        &held.fault.host(),
        "absent/img",
        0,
        "the answers did not wait for it",
    );

    // A name the held lower layer may still bring is not settled, and
    // neither is a listing.
    let (nowhere_rx, nowhere) = read_within(root.join("etc/nowhere"), Duration::from_secs(1));
    assert!(
        nowhere.is_none(),
        "a missing name answered while a layer still streams: {nowhere:?}"
    );
    let (ls_tx, ls_rx) = std::sync::mpsc::channel();
    let etc = root.join("etc");
    thread::spawn(move || {
        let _ = ls_tx.send(list(&etc));
    });
    let early_ls = ls_rx.recv_timeout(Duration::from_secs(1));
    assert!(
        early_ls.is_err(),
        "etc listed while a layer still streams: {early_ls:?}"
    );
    held.gate.open();
    assert_eq!(
        ls_rx.recv_timeout(wait).unwrap().unwrap(),
        list(held.oracle.join("etc")).unwrap()
    );
    assert_errno(
        nowhere_rx.recv_timeout(wait).unwrap(),
        libc::ENOENT,
        "missing name once every layer is listed",
    );
    assert_eq!(
        read(root.join("etc/late-lower")).unwrap(),
        b"after the lower big file\n"
    );
    assert_trees_equal(&root, &held.oracle, "after the held layer ended");
}

/// Asserts that layer `layer` of `repo:1` is still streaming (`why`: what
/// that shows).
fn assert_streaming(m: &Mount, host: &str, repo: &str, layer: usize, why: &str) {
    let status: Value =
        serde_json::from_slice(&read(m.join(format!("{host}/{repo}/1/status"))).unwrap()).unwrap();
    assert_eq!(
        status["layers"][layer]["state"], "streaming",
        "layer {layer} no longer streams, so {why}: {status}"
    );
}

/// The first file of [`held_image`]'s held upper layer.
const EARLY_FILE: &[u8] = b"first in the upper layer\n";

/// A crash (SIGKILL) while a layer streams loses nothing and leaves
/// nothing half-made: a daemon started again on the same cache serves the
/// same tree, fetches again only the layer that was cut (not the one that
/// had been stored), and every object still hashes to its name.
#[test]
fn a_daemon_killed_while_a_layer_streams_restarts_on_a_sound_cache() {
    require_env();
    let held = held_image("crash", Held::Upper);
    let host = held.fault.host();
    let cache = tempdir();
    let mut m = Mount::builder()
        .insecure(&host)
        .cache_dir(cache.path())
        .start();
    let root = rootfs(&m, &host, "crash/img", "1");
    let (_, early) = read_within(root.join("etc/early"), Duration::from_secs(30));
    let early = early.expect("etc/early readable while its layer is held half way");
    assert_eq!(early.unwrap(), EARLY_FILE);
    // The lower layer is stored and indexed; the upper one is cut by the kill.
    let status = m.join(format!("{host}/crash/img/1/status"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let lower = loop {
        let s: Value = serde_json::from_slice(&read(&status).unwrap()).unwrap();
        if s["layers"][0]["state"] == "indexed" {
            break s["layers"][0]["digest"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "lower layer never indexed: {s}");
        thread::sleep(Duration::from_millis(20));
    };
    assert_streaming(&m, &host, "crash/img", 1, "the kill would not cut it");
    m.kill();
    assert!(!m.is_mounted(), "a dead mount is left behind");

    held.gate.open();
    let before = held.fault.requests().len();
    let m = Mount::builder()
        .insecure(&host)
        .cache_dir(cache.path())
        .start();
    let root = rootfs(&m, &host, "crash/img", "1");
    assert_trees_equal(&root, &held.oracle, "restarted on a killed daemon's cache");
    let fetched: Vec<String> = held.fault.requests()[before..]
        .iter()
        .filter(|(method, t)| method == "GET" && t.contains("/blobs/"))
        .map(|(_, t)| t.clone())
        .collect();
    assert!(
        !fetched.iter().any(|t| t.ends_with(&lower)),
        "the stored lower layer {lower} was fetched again: {fetched:#?}"
    );
    assert!(
        !fetched.is_empty(),
        "the cut upper layer was not fetched again, yet the tree is whole?"
    );
    assert_objects_well_formed(cache.path());
    let out = cache_cmd(cache.path(), &["verify"]);
    assert!(out.status.success(), "verify after a crash: {out:?}");
    let leftovers: Vec<_> = fs::read_dir(cache.path().join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "half-made files left: {leftovers:?}");
}

/// `apt-layer cache stats | verify` may run while a daemon on the same
/// cache is writing objects: they must not take its half-written objects
/// for a crash's leftovers.
#[test]
fn cache_commands_while_a_layer_streams_leave_its_objects_alone() {
    require_env();
    let held = held_image("busy", Held::Upper);
    let host = held.fault.host();
    let cache = tempdir();
    let m = Mount::builder()
        .insecure(&host)
        .cache_dir(cache.path())
        .start();
    let root = rootfs(&m, &host, "busy/img", "1");
    let (_, early) = read_within(root.join("etc/early"), Duration::from_secs(30));
    assert_eq!(early.expect("etc/early while held").unwrap(), EARLY_FILE);
    // The lower layer is stored; the held layer's spill and its big file's
    // object are being written now.
    let status = m.join(format!("{host}/busy/img/1/status"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s: Value = serde_json::from_slice(&read(&status).unwrap()).unwrap();
        if s["layers"][0]["state"] == "indexed" && files_being_written(cache.path()) >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the held layer's object is not being written: {s}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    for cmd in ["stats", "verify"] {
        let out = cache_cmd(cache.path(), &[cmd]);
        assert!(out.status.success(), "cache {cmd} beside a daemon: {out:?}");
    }

    assert_streaming(&m, &host, "busy/img", 1, "the commands ran too late");
    held.gate.open();
    assert_trees_equal(&root, &held.oracle, "after cache commands ran mid-stream");

    // The walk can end before the held layer is stored (it answers from the
    // sketch of the tree).
    let status = || -> Value { serde_json::from_slice(&read(&status).unwrap()).unwrap() };
    assert!(
        wait_until(Duration::from_secs(30), || status()["rootfs"] == "ready"),
        "{}",
        status()
    );
    let s = status();
    for l in s["layers"].as_array().unwrap() {
        assert_eq!(l["state"], "indexed", "{s}");
        let digest = l["digest"].as_str().unwrap();
        let gets = held
            .fault
            .requests()
            .iter()
            .filter(|(method, t)| method == "GET" && t.ends_with(&format!("/blobs/{digest}")))
            .count();
        assert_eq!(
            gets,
            1,
            "layer {digest} fetched {gets} times; log:\n{}",
            m.log()
        );
    }
    assert_objects_well_formed(cache.path());
    assert!(
        !m.log().contains(" WARN ") && !m.log().contains(" ERROR "),
        "the daemon complained:\n{}",
        m.log()
    );
}

/// How many non-empty files some process holds open under `cache`'s
/// `tmp/`, named or not (spills and objects being written).
fn files_being_written(cache: &Path) -> usize {
    let tmp = cache.join("tmp");
    let mut n = 0;
    for p in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(&tmp))
                && fs::metadata(fd.path()).is_ok_and(|m| m.is_file() && m.len() > 0)
            {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn noearly_reads_wait_for_the_checked_tree() {
    require_env();
    let held = held_image("late", Held::Upper);
    let m = Mount::builder()
        .insecure(&held.fault.host())
        .option("noearly")
        .start();
    let root = rootfs(&m, &held.fault.host(), "late/img", "1");
    let (rx, got) = read_within(root.join("etc/early"), Duration::from_secs(2));
    assert!(
        got.is_none(),
        "noearly: read answered before the layer ended: {got:?}"
    );
    held.gate.open();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap(),
        EARLY_FILE
    );
    assert_trees_equal(&root, &held.oracle, "noearly");
}

/// All names, attributes and hard-link groups under `root` (symlinks not
/// followed), by path, with inode numbers: what a walker sees.
fn inodes_under(root: &Path) -> BTreeMap<PathBuf, (u64, u32, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                (md.ino(), md.mode(), md.nlink()),
            );
        }
    }
    out
}

/// Once every layer is listed and checked, names, attributes and listings
/// are answered from a sketch of the merged tree while the contents are
/// still being stored: a walk of the whole tree (and its file contents,
/// extracted from the spill on demand) equals `umoci unpack` without
/// waiting for the storing pass, hard links show their real link counts,
/// and once the tree is built every path keeps its inode number. The same
/// holds for an image whose lower layers were stored before (by another
/// image, and another daemon on the cache) and only the top one streams.
#[test]
fn a_listed_image_is_walked_while_its_contents_are_stored() {
    require_env();
    let work = tempdir();
    let [mut lower, mut upper] = held_layers(2 << 20);
    lower.extend([
        TarEntry::dir("usr/"),
        TarEntry::file("usr/lib-file", "in a directory of its own\n"),
    ]);
    upper.extend([
        TarEntry::hardlink("lower-link", "etc/base"),
        TarEntry::symlink("etc/to-base", "base"),
    ]);
    let layout = make_tar_image(work.path(), "sketch", &[lower, upper]);
    run(Command::new("umoci").args(["tag", "--image", &layout_ref(&layout, "sketch"), "more"]));
    let top = [
        TarEntry::dir("etc/"),
        TarEntry::file("etc/added", "in the third layer\n"),
        TarEntry::hardlink("etc/base-again", "etc/base"),
        TarEntry::whiteout("etc", "late"),
        TarEntry::file("big-top", pseudo_random(9, 2 << 20)),
    ];
    add_tar_layer(&layout_ref(&layout, "more"), &tar_bytes(&top));
    let reg = Registry::start();
    let h = reg.host();
    let mut oracles = Vec::new();
    for tag in ["sketch", "more"] {
        let image = layout_ref(&layout, tag);
        oracles.push(umoci_unpack(&image, &work.path().join(tag)));
        push(&image, &format!("{h}/sketch/img:{tag}"), Format::Oci);
    }
    let hold = work.path().join("hold-storing");
    let cache = tempdir();

    // "sketch" streams both its layers; "more" then only its top one, on a
    // daemon started again (its lower layers' objects are on disk, not yet
    // checked by this process).
    for (tag, oracle, streaming) in [
        ("sketch", &oracles[0], &[0, 1][..]),
        ("more", &oracles[1], &[2][..]),
    ] {
        let m = Mount::builder()
            .insecure(&h)
            .cache_dir(cache.path())
            .env("APT_LAYER_TEST_HOLD_STORING", hold.to_str().unwrap())
            .start();
        fs::write(&hold, b"").unwrap();
        let root = rootfs(&m, &h, "sketch/img", tag);
        let (r, o) = (root.clone(), oracle.clone());
        let what = format!("{tag}: while the contents are being stored");
        let (early, _) = timed_within(Duration::from_secs(60), "walk while stored", move || {
            assert_trees_equal(&r, &o, &what);
            inodes_under(&r)
        });
        let status = || -> Value {
            serde_json::from_slice(&read(m.join(format!("{h}/sketch/img/{tag}/status"))).unwrap())
                .unwrap()
        };
        let s = status();
        assert_eq!(s["rootfs"], "listed", "{tag}: {s}");
        for &l in streaming {
            assert_eq!(
                s["layers"][l]["state"], "streaming",
                "{tag}: layer {l} was stored before the walk ended: {s}"
            );
        }
        let link_count = |p: &str| early[Path::new(p)].2;
        assert_eq!(
            link_count("etc/early-link"),
            3,
            "{tag}: a hard link's count"
        );
        assert_eq!(
            link_count("lower-link"),
            2 + u64::from(tag == "more"),
            "{tag}: a cross-layer hard link's count"
        );
        assert_eq!(
            early[Path::new("etc/early")].0,
            early[Path::new("etc/early-link")].0
        );

        fs::remove_file(&hold).unwrap();
        let built = wait_until(Duration::from_secs(60), || status()["rootfs"] == "ready");
        let s = status();
        assert!(built, "{tag}: tree not built once let go: {s}");
        for l in s["layers"].as_array().unwrap() {
            assert_eq!(l["state"], "indexed", "{tag}: ready before stored: {s}");
        }
        // Stored and built: a first look at a path never answered before,
        // then the whole tree again.
        assert_eq!(
            read(root.join("etc/to-base")).unwrap(),
            b"from the lower layer\n"
        );
        assert_trees_equal(&root, oracle, &format!("{tag}: once the tree is built"));
        assert_eq!(
            inodes_under(&root),
            early,
            "{tag}: inode numbers, modes or link counts changed when the built tree replaced the sketch"
        );
    }
}
