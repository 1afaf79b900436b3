//! `mount -t fuse.apt-layer` and an fstab line go through the helper in
//! mount-helper/, return only once the tree is served, and `umount` ends the
//! daemon cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// Installs the repository's helper where mount(8) looks for it.
fn install_helper() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helper/mount.fuse.apt-layer");
    let dst = Path::new("/usr/sbin/mount.fuse.apt-layer");
    let tmp = dst.with_extension(format!("tmp{}", std::process::id()));
    std::fs::copy(&src, &tmp).expect("copy helper");
    std::fs::rename(&tmp, dst).expect("install helper");
}

/// Daemons still running with `cache_dir` in their command line.
fn daemons_for(cache_dir: &Path) -> Vec<u32> {
    let needle = cache_dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("apt-layer") && cmd.contains(" mount ") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

fn check_served_then_umount(mnt: &Path, cache: &Path, host: &str, repo: &str, tag: &str) {
    // mount(8) returned: the tree must be served right now, no waiting.
    assert_eq!(
        mount_fstype(mnt).as_deref(),
        Some("fuse.apt-layer"),
        "not mounted after mount(8) returned"
    );
    let tags = list(mnt.join(host).join(repo)).expect("ls through the helper's mount");
    assert!(tags.contains(&tag.to_string()), "tags {tags:?}");
    assert_eq!(
        daemons_for(cache).len(),
        1,
        "exactly one daemon serves the mount"
    );
    let st = Command::new("umount").arg(mnt).status().unwrap();
    assert!(st.success(), "umount failed");
    let gone = wait_until(Duration::from_secs(10), || daemons_for(cache).is_empty());
    assert!(
        gone,
        "daemon still running after umount: {:?}",
        daemons_for(cache)
    );
    assert!(mount_fstype(mnt).is_none());
}

#[test]
fn mount_t_fuse_apt_layer_and_fstab_line_work() {
    require_env();
    install_helper();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let host = reg.host();
    push_simple(work.path(), &format!("{host}/helper/img:v1"), Format::Oci);
    let auth = work.path().join("auth.json");
    std::fs::write(&auth, "{}").unwrap();
    let conf = work.path().join("registries.conf");
    std::fs::write(&conf, "").unwrap();

    // mount -t
    let mnt = work.path().join("mnt");
    let cache: PathBuf = work.path().join("cache");
    std::fs::create_dir_all(&mnt).unwrap();
    let opts = format!(
        "allow_other,cache_dir={},insecure_registry={host},authfile={},registries_conf={},timeout=5s",
        cache.display(),
        auth.display(),
        conf.display()
    );
    let out = Command::new("mount")
        .args(["-t", "fuse.apt-layer", "apt-layer"])
        .arg(&mnt)
        .args(["-o", &opts])
        .env("APT_LAYER_BIN", apt_layer_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_served_then_umount(&mnt, &cache, &host, "helper/img", "v1");

    // an fstab line (mount -T reads an fstab of our own)
    let fstab = work.path().join("fstab");
    let cache2 = work.path().join("cache2");
    let opts2 = opts.replace(&cache.display().to_string(), &cache2.display().to_string());
    std::fs::write(
        &fstab,
        format!(
            "apt-layer {} fuse.apt-layer {opts2},_netdev,nofail,nodiratime,comment=apt-layer-test 0 0\n",
            mnt.display()
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt)
        .env("APT_LAYER_BIN", apt_layer_bin())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fstab mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_served_then_umount(&mnt, &cache2, &host, "helper/img", "v1");

    // `mount -f` does everything but mount: no daemon, nothing mounted
    let out = Command::new("mount")
        .args(["-f", "-T"])
        .arg(&fstab)
        .arg(&mnt)
        .env("APT_LAYER_BIN", apt_layer_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "mount -f: {out:?}");
    assert!(mount_fstype(&mnt).is_none(), "mount -f mounted");
    assert!(daemons_for(&cache2).is_empty(), "mount -f started a daemon");

    // a bad option fails mount(8) with the reason, and leaves nothing mounted
    let out = Command::new("mount")
        .args(["-t", "fuse.apt-layer", "apt-layer"])
        .arg(&mnt)
        .args([
            "-o",
            &format!("cache_dir={},bogus_option=1", cache.display()),
        ])
        .env("APT_LAYER_BIN", apt_layer_bin())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bogus_option"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mount_fstype(&mnt).is_none());
}
