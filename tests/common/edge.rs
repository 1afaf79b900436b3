//! The edge-case image: three hand-written tar layers covering the OCI
//! layer semantics and tar features `umoci unpack` handles (whiteouts,
//! opaque directories, hard links across layers, devices, xattrs,
//! setuid/setgid/sticky, long and non-UTF-8 names, PAX times and ids).
//! Shared by the rootfs tests (FUSE) and the composefs tests (kernel mount).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;

/// `security.capability` v2: cap_net_bind_service (bit 10) permitted.
pub const CAP_NET_BIND_SERVICE: &[u8] = &[
    0x00, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

pub fn long_file_name() -> String {
    format!("long/{}", "n".repeat(150))
}

/// Three layers covering the OCI layer semantics and tar features umoci
/// unpacks. Every directory has a tar entry (umoci gives implicit parents
/// the time of the unpack). Layer 1 uses plain names, layer 2 `./` names,
/// layer 3 absolute names.
pub fn edge_layers() -> Vec<Vec<TarEntry>> {
    let long_dir = format!("long/{}/", "d".repeat(120));
    let long_in_dir = format!("long/{}/{}", "d".repeat(120), "f".repeat(60));
    let long_target = format!("/{}/target", "t".repeat(130));
    let l1 = vec![
        TarEntry::dir("./").mtime(1_000_000_000),
        TarEntry::dir("etc/").mtime(1_000_000_001),
        TarEntry::file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n").mtime(1_000_000_002),
        TarEntry::file("etc/shadow", "root:*:18000:0:99999:7:::\n").mode(0o600),
        TarEntry::file("etc/nomode", "no permission bits at all\n").mode(0o000),
        TarEntry::symlink("etc/abs", "/usr/bin/tool").mtime(1_000_000_003),
        TarEntry::symlink("etc/dangling", "/nonexistent/target"),
        TarEntry::symlink("etc/up", "../../../etc/passwd"),
        TarEntry::symlink("etc/longlink", &long_target),
        TarEntry::symlink("bin", "usr/bin"),
        TarEntry::dir("usr/"),
        TarEntry::dir("usr/bin/").mtime(1_000_000_004),
        TarEntry::file("usr/bin/tool", "#!/bin/sh\necho tool\n")
            .mode(0o755)
            .xattr("security.capability", CAP_NET_BIND_SERVICE)
            .xattr("user.comment", "hello")
            .xattr("trusted.overlay.test", b"\x00\x01binary\xff".to_vec()),
        TarEntry::file("usr/bin/tool2", "tool2 v1\n").xattr("user.a", "1"),
        TarEntry::file("usr/bin/su", "setuid binary\n").mode(0o4755),
        TarEntry::file("usr/bin/wall", "setgid binary\n")
            .mode(0o2755)
            .owner(0, 5),
        TarEntry::dir("usr/lib/").mtime(1_000_000_010),
        // Larger than the ~4 MiB gzip checkpoint spacing, twice over.
        TarEntry::file("usr/lib/big.bin", pseudo_random(1, 9 << 20)),
        TarEntry::dir("tmp/").mode(0o1777),
        TarEntry::dir("shared/").mode(0o2775).owner(1000, 1000),
        TarEntry::dir("home/"),
        TarEntry::dir("home/user/")
            .mode(0o700)
            .owner(1000, 1000)
            .mtime(1_100_000_000),
        TarEntry::file("home/user/.profile", "export PS1='$ '\n")
            .mode(0o640)
            .owner(1000, 1000),
        TarEntry::dir("var/"),
        TarEntry::file("var/lowerfile", "lower layer file\n")
            .mode(0o640)
            .owner(7, 8)
            .xattr("user.lower", "1"),
        TarEntry::file("var/hl_a", "hard-link group\n"),
        TarEntry::hardlink("var/hl_b", "var/hl_a"),
        TarEntry::hardlink("var/hl_c", "var/hl_a"),
        TarEntry::file("var/hl_keep", "another group\n"),
        TarEntry::hardlink("var/hl_keep2", "var/hl_keep"),
        TarEntry::dir("gone/"),
        TarEntry::file("gone/a", "a\n"),
        TarEntry::dir("gone/sub/"),
        TarEntry::file("gone/sub/b", "b\n"),
        TarEntry::dir("gone2/"),
        TarEntry::file("gone2/x", "x\n"),
        TarEntry::dir("gone3/"),
        TarEntry::file("gone3/old", "old\n"),
        TarEntry::dir("opq/").mtime(1_200_000_000),
        TarEntry::file("opq/a", "a\n"),
        TarEntry::dir("opq/sub/"),
        TarEntry::file("opq/sub/b", "b\n"),
        TarEntry::dir("wh/").mtime(1_300_000_000),
        TarEntry::file("wh/keep", "keep\n"),
        TarEntry::file("wh/del", "del\n"),
        TarEntry::symlink("wh/del_link", "keep"),
        TarEntry::file("swap_f2d", "a file that becomes a directory\n"),
        TarEntry::dir("swap_d2f/"),
        TarEntry::file("swap_d2f/child", "child\n"),
        TarEntry::dir("dev/"),
        TarEntry::chardev("dev/null", 1, 3),
        TarEntry::chardev("dev/tty0", 4, 0).mode(0o620).owner(0, 5),
        TarEntry::blockdev("dev/sda", 8, 0).owner(0, 6),
        TarEntry::blockdev("dev/loop300", 7, 300),
        TarEntry::fifo("dev/initctl").mode(0o600),
        TarEntry::dir("long/"),
        TarEntry::file(long_file_name(), "GNU long name\n"),
        TarEntry::dir(&long_dir).pax_long_names(),
        TarEntry::file(&long_in_dir, "PAX long name\n").pax_long_names(),
        TarEntry::hardlink(format!("long/hl-to-{}", "h".repeat(110)), long_file_name()),
        TarEntry::symlink("long/pax-link", &long_target).pax_long_names(),
        TarEntry::dir("names/"),
        TarEntry::file("names/ünïcødé-日本語.txt", "unicode\n"),
        TarEntry::file("names/emoji-🦀", "crab\n"),
        TarEntry::file(b"names/latin1-\xe9t\xe9-\xff\xfe", "not utf-8\n"),
        TarEntry::file("names/with space", "space\n"),
        TarEntry::file("names/new\nline", "newline\n"),
        TarEntry::dir("pax/"),
        TarEntry::file("pax/frac-mtime", "fractional\n")
            .mtime(5)
            .pax("mtime", "1600000000.75"),
        TarEntry::file("pax/big-owner", "big ids\n")
            .pax("uid", "3000000")
            .pax("gid", "3000001"),
        TarEntry::file("empty", ""),
        TarEntry::dir("xdir/").xattr("user.dir", "on a directory"),
    ];
    let l2 = vec![
        TarEntry::whiteout(".", "gone"),
        TarEntry::whiteout("./wh", "del"),
        TarEntry::whiteout("./wh", "del_link"),
        TarEntry::dir("./opq/").mtime(1_250_000_000),
        TarEntry::opaque("./opq"),
        TarEntry::file("./opq/new", "new\n"),
        // Hard link to a file of the layer below.
        TarEntry::hardlink("./var/link2lower", "./var/lowerfile"),
        TarEntry::whiteout(".", "gone2"),
        // Whiteout and re-creation in the same layer.
        TarEntry::whiteout(".", "gone3"),
        TarEntry::dir("./gone3/").mtime(1_400_000_000),
        TarEntry::file("./gone3/fresh", "fresh\n"),
        TarEntry::dir("./swap_f2d/"),
        TarEntry::file("./swap_f2d/child", "child of a former file\n"),
        TarEntry::file("./swap_d2f", "a directory became this file\n"),
        TarEntry::file("./etc/passwd", "root:x:0:0:root:/root:/bin/ash\n").mtime(1_000_000_500),
        // Replaced: xattrs and mode of the lower file do not survive.
        TarEntry::file("./usr/bin/tool2", "tool2 v2\n")
            .mode(0o700)
            .xattr("user.b", "2"),
        // The group's first name goes; the other two stay linked.
        TarEntry::whiteout("./var", "hl_a"),
    ];
    let l3 = vec![
        // A directory recreated one layer after its whiteout.
        TarEntry::dir("/gone2/").mtime(1_450_000_000),
        TarEntry::file("/gone2/y", "y\n"),
        // New file in a lower directory: its mtime stays the lower one.
        TarEntry::file("/usr/lib/added", "added later\n"),
        // Hard link across two layers to a setuid file.
        TarEntry::hardlink("/usr/bin/su-link", "/usr/bin/su"),
        // Replacing one name of a hard-link group splits the group.
        TarEntry::file("/var/hl_keep", "replaced\n"),
        // A directory entry over an existing directory: new metadata, old
        // children.
        TarEntry::dir("/etc/").mode(0o751).mtime(1_000_000_600),
    ];
    vec![l1, l2, l3]
}

/// Checks that umoci made of the edge-case image what the test means (so a
/// passing comparison is not vacuous).
pub fn check_edge_oracle(o: &Path) {
    let exists = |p: &str| fs::symlink_metadata(o.join(p)).is_ok();
    for gone in [
        "gone",
        "gone2/x",
        "gone3/old",
        "opq/a",
        "opq/sub",
        "wh/del",
        "wh/del_link",
        "var/hl_a",
        "swap_d2f/child",
    ] {
        assert!(!exists(gone), "oracle still has {gone}");
    }
    for here in [
        "gone2/y",
        "gone3/fresh",
        "opq/new",
        "wh/keep",
        "swap_f2d/child",
        "usr/lib/added",
        "dev/initctl",
    ] {
        assert!(exists(here), "oracle lacks {here}");
    }
    let ino = |p: &str| fs::symlink_metadata(o.join(p)).unwrap().ino();
    assert_eq!(ino("var/link2lower"), ino("var/lowerfile"));
    assert_eq!(ino("var/hl_b"), ino("var/hl_c"));
    assert_eq!(ino("usr/bin/su-link"), ino("usr/bin/su"));
    assert_ne!(ino("var/hl_keep"), ino("var/hl_keep2"));
    let x = lxattrs(&o.join("usr/bin/tool")).unwrap();
    assert_eq!(
        x.get(&b"security.capability"[..]).map(|v| &v[..]),
        Some(CAP_NET_BIND_SERVICE)
    );
    assert!(x.contains_key(&b"trusted.overlay.test"[..]));
    let md = fs::symlink_metadata(o.join("usr/bin/su")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o4755);
    assert_eq!(
        fs::symlink_metadata(o.join("pax/frac-mtime"))
            .unwrap()
            .mtime(),
        1_600_000_000
    );
    assert!(
        fs::symlink_metadata(o.join(OsStr::from_bytes(b"names/latin1-\xe9t\xe9-\xff\xfe"))).is_ok()
    );
    assert!(fs::symlink_metadata(o.join(long_file_name())).is_ok());
}

/// The edge-case image in `work/oci:edge` and its umoci unpack.
pub fn edge_image(work: &Path) -> (PathBuf, PathBuf) {
    let layout = make_tar_image(work, "edge", &edge_layers());
    let oracle = umoci_unpack(&layout_ref(&layout, "edge"), &work.join("bundle-edge"));
    check_edge_oracle(&oracle);
    (layout, oracle)
}
