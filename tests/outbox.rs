//! The outbox through a real FUSE mount (DESIGN.md §3, issue #4): trees
//! copied into `<mnt>/outbox/<registry>/<repository>/<tag>/` are pushed to a
//! real registry once they settle. Oracles: the registry's own API, `skopeo
//! copy` back and `umoci unpack`, compared entry by entry with the source.
//! Faults are real too: a stopped registry, a killed daemon, a full tmpfs,
//! files removed mid-push.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SETTLE: &str = "outbox_settle=1";
const PUSH_WAIT: Duration = Duration::from_secs(60);

fn outbox_mount(reg: &Registry) -> Mount {
    Mount::builder()
        .insecure(&reg.host())
        .option(SETTLE)
        .start()
}

/// The tags of `host/repo` as the registry lists them (empty when none).
fn registry_tags(host: &str, repo: &str, creds: Option<(&str, &str)>) -> Vec<String> {
    let auth = creds.map(|(u, p)| basic_auth(u, p));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    match http("GET", host, &format!("/v2/{repo}/tags/list"), &headers, &[]) {
        Ok(r) if r.status == 200 => {
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            v["tags"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

fn wait_for_tag(m: &Mount, host: &str, repo: &str, tag: &str, creds: Option<(&str, &str)>) {
    let ok = wait_until(PUSH_WAIT, || {
        registry_tags(host, repo, creds).iter().any(|t| t == tag)
    });
    assert!(
        ok,
        "{host}/{repo}:{tag} never appeared in the registry; status: {:?}\nlog:\n{}",
        status_of(m, &format!("{host}/{repo}/{tag}")),
        tail(&m.log(), 40)
    );
}

/// The parsed `<tag>.status` file of tag directory `rel` (below outbox/).
fn status_of(m: &Mount, rel: &str) -> Option<Value> {
    let p = m.join(format!("outbox/{rel}.status"));
    let bytes = within(FS_GUARD, "read status", move || fs::read(p)).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "status file of {rel} is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    }))
}

/// Polls the status of `rel` every 5 ms until `pred` holds.
fn wait_status(m: &Mount, rel: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < limit {
        if let Some(s) = status_of(m, rel) {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "status of {rel} never reached the expected state within {limit:?}; last: {}\nlog:\n{}",
        last.map(|v| serde_json::to_string_pretty(&v).unwrap())
            .unwrap_or("none".into()),
        tail(&m.log(), 40)
    );
}

fn phase_is(s: &Value, p: &str) -> bool {
    s["phase"] == p
}

fn pushes(s: &Value) -> u64 {
    s["pushes"].as_u64().unwrap_or(0)
}

/// Polls `apt-layer outbox status` (which reads the state files the daemon
/// writes a moment after it changes its status) until its line for
/// `reference` satisfies `pred`; returns that line.
fn cli_status_line(m: &Mount, reference: &str, pred: impl Fn(&str) -> bool) -> String {
    let cache = m.cache_dir().to_str().unwrap().to_string();
    let mut last = String::new();
    for _ in 0..50 {
        let out = apt_layer(
            &["outbox", "status", "--cache-dir", &cache],
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "outbox status failed: {}", out.stderr);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(l) = last
            .lines()
            .find(|l| l.contains(&format!("{reference} ")) && pred(l))
        {
            return l.to_string();
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("apt-layer outbox status never showed the expected line for {reference}:\n{last}");
}

/// `skopeo copy` of `reference` into a layout under `dir`, then `umoci
/// unpack`; returns the rootfs.
fn pull_and_unpack(reference: &str, dir: &Path, creds: Option<(&str, &str)>) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let layout = dir.join("oci");
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--src-tls-verify=false"]);
    if let Some((u, p)) = creds {
        cmd.arg("--src-creds").arg(format!("{u}:{p}"));
    }
    cmd.arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:t", layout.display()));
    run(&mut cmd);
    umoci_unpack(&layout_ref(&layout, "t"), &dir.join("bundle"))
}

/// `cp -a SRC DST`, bounded.
fn cp_a(src: &Path, dst: &Path) {
    let (s, d) = (src.to_path_buf(), dst.to_path_buf());
    within(FS_GUARD, "cp -a", move || {
        run(Command::new("cp").arg("-a").arg(&s).arg(&d));
    });
}

fn mkdir_p(p: PathBuf) {
    within(FS_GUARD, "mkdir -p", move || fs::create_dir_all(&p))
        .unwrap_or_else(|e| panic!("mkdir -p: {e}"));
}

fn write_file(p: PathBuf, data: Vec<u8>) {
    within(FS_GUARD, "write", move || fs::write(&p, data)).unwrap_or_else(|e| panic!("write: {e}"));
}

fn sha_of(p: &Path) -> String {
    sha256_hex(&fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
}

/// A tree with every file type, owners, setuid/setgid/sticky, xattrs, hard
/// links, long names and set mtimes.
fn every_kind_tree(root: &Path) {
    fs::create_dir_all(root).unwrap();
    let long = "l".repeat(200);
    let deep = format!(
        "{}/{}/{}",
        "d".repeat(120),
        "e".repeat(120),
        "f".repeat(120)
    );
    write_entries(
        root,
        &[
            Entry::dir("etc").mode(0o755),
            Entry::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n").mtime(1_500_000_000),
            Entry::file("etc/shadow", "root:*:19000::::::\n")
                .mode(0o640)
                .owner(0, 42),
            Entry::file("usr/bin/su", "#!/bin/sh\necho su\n").mode(0o4755),
            Entry::file("usr/bin/wall", "#!/bin/sh\n")
                .owner(0, 5)
                .mode(0o2755),
            Entry::hardlink("usr/bin/su-again", "usr/bin/su"),
            Entry::hardlink("etc/passwd-", "etc/passwd"),
            Entry::dir("tmp").mode(0o1777),
            Entry::dir("home/user").owner(1000, 1000).mode(0o700),
            Entry::file("home/user/.profile", "PS1='$ '\n")
                .owner(1000, 1000)
                .mode(0o600)
                .xattr("user.note", "hello")
                .xattr("trusted.blob", b"\x00\x01\xffbinary".to_vec()),
            Entry::dir("srv").xattr("user.dir", "on a directory"),
            Entry::symlink("bin", "usr/bin"),
            Entry::symlink("etc/dangling", "/nonexistent/target"),
            Entry::fifo("run/initctl"),
            Entry::chardev("dev/null", 1, 3),
            Entry::blockdev("dev/loop0", 7, 0),
            Entry::file(&format!("long/{long}"), "a 200-byte name\n"),
            Entry::hardlink(&format!("long/{long}.link"), &format!("long/{long}")),
            Entry::file(&format!("{deep}/file"), "a path longer than 255 bytes\n"),
            Entry::file("empty", ""),
            Entry::file("var/lib/blob", pseudo_random(7, 3 << 20)).mtime(1_000_000_000),
        ],
    );
    // A sub-second mtime (cp -a and the layer keep nanoseconds).
    let c = std::ffi::CString::new(root.join("etc/passwd").as_os_str().as_encoded_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 123_456_789,
        },
    ];
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) },
        0
    );
}

#[test]
fn cp_a_of_every_file_type_round_trips_through_the_registry() {
    let reg = Registry::start();
    let host = reg.host();
    let m = outbox_mount(&reg);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    every_kind_tree(&src);

    mkdir_p(m.join(format!("outbox/{host}/team/app")));
    cp_a(&src, &m.join(format!("outbox/{host}/team/app/v1")));
    wait_for_tag(&m, &host, "team/app", "v1", None);
    let rel = format!("{host}/team/app/v1");
    let st = wait_status(&m, &rel, PUSH_WAIT, |s| phase_is(s, "pushed"));

    // The status names what the registry serves.
    let (manifest, media_type) = get_manifest(&host, "team/app", "v1", None);
    assert_eq!(
        st["pushed"]["manifest"],
        sha256_digest(&manifest),
        "status: {st}"
    );
    assert_eq!(media_type, "application/vnd.oci.image.manifest.v1+json");
    let mv: Value = serde_json::from_slice(&manifest).unwrap();
    let layers = mv["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer: {mv}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert_eq!(layers[0]["digest"], st["pushed"]["layer"]);
    let config: Value =
        serde_json::from_slice(&skopeo_inspect_raw_config(&format!("{host}/team/app:v1"))).unwrap();
    assert_eq!(config["architecture"], host_arch());
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([st["pushed"]["diff_id"]])
    );
    assert!(
        config["created"].as_str().is_some_and(|c| c.ends_with('Z')),
        "{config}"
    );

    // The image is the tree: every entry, mode, owner, xattr, link, mtime.
    let rootfs = pull_and_unpack(
        &format!("{host}/team/app:v1"),
        &work.path().join("pulled"),
        None,
    );
    assert_trees_equal(&rootfs, &src, "the pushed image vs the copied tree");
    let nanos = fs::symlink_metadata(rootfs.join("etc/passwd"))
        .unwrap()
        .mtime_nsec();
    assert_eq!(nanos, 123_456_789, "sub-second mtime lost on the way");

    // The registry view shows the new tag; the CLI shows the push.
    let tags = list(m.join(format!("{host}/team/app"))).unwrap();
    assert!(tags.contains(&"v1".to_string()), "registry view: {tags:?}");
    let digest = st["pushed"]["manifest"].as_str().unwrap().to_string();
    cli_status_line(&m, &format!("{host}/team/app:v1"), |l| {
        l.starts_with("pushed") && l.contains(&digest)
    });

    // The same tree to another repository: the registry already has the
    // layer elsewhere, so it is mounted across repositories, not sent again.
    let log_mark = reg.log_len();
    mkdir_p(m.join(format!("outbox/{host}/team/copy")));
    cp_a(&src, &m.join(format!("outbox/{host}/team/copy/v1")));
    let copy = wait_status(&m, &format!("{host}/team/copy/v1"), PUSH_WAIT, |s| {
        phase_is(s, "pushed")
    });
    assert_eq!(
        copy["pushed"]["layer"], st["pushed"]["layer"],
        "same tree, other layer"
    );
    assert_eq!(
        copy["pushed"]["layer_source"], "mounted from team/app",
        "{copy}"
    );
    let layer_hex = st["pushed"]["layer"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let requests = reg.requests_since(log_mark);
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("POST /v2/team/copy/blobs/uploads/?")
                && r.contains("mount=")
                && r.contains(&layer_hex)),
        "no cross-repository mount request: {requests:#?}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.starts_with("PUT /v2/team/copy/blobs/uploads/")
                && r.contains(&format!("digest=sha256%3A{layer_hex}"))),
        "the layer was uploaded again: {requests:#?}"
    );

    // The same tree always gives the same layer: export the source.
    let out = apt_layer(
        &[
            "export",
            src.to_str().unwrap(),
            &format!("{host}/team/exported:v1"),
            "--insecure-registry",
            &host,
        ],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "export failed: {}", out.stderr);
    let (exported, _) = get_manifest(&host, "team/exported", "v1", None);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_digest(&exported),
        "export prints the digest the registry has"
    );
    let ev: Value = serde_json::from_slice(&exported).unwrap();
    assert_eq!(
        ev["layers"][0]["digest"], st["pushed"]["layer"],
        "same tree, other layer digest"
    );

    // A change after the push pushes again.
    write_file(
        m.join(format!("outbox/{rel}/etc/motd")),
        b"changed after the push\n".to_vec(),
    );
    let st2 = wait_status(&m, &rel, PUSH_WAIT, |s| {
        phase_is(s, "pushed") && pushes(s) >= 2
    });
    assert_ne!(st2["pushed"]["layer"], st["pushed"]["layer"]);
    let (manifest2, _) = get_manifest(&host, "team/app", "v1", None);
    assert_eq!(st2["pushed"]["manifest"], sha256_digest(&manifest2));
    let rootfs2 = pull_and_unpack(
        &format!("{host}/team/app:v1"),
        &work.path().join("pulled2"),
        None,
    );
    assert_eq!(
        fs::read(rootfs2.join("etc/motd")).unwrap(),
        b"changed after the push\n"
    );

    // Writing outside outbox/ stays read-only.
    assert_errno(
        within(FS_GUARD, "create", {
            let p = m.join(format!("{host}/team/app/v1/x"));
            move || fs::write(p, b"x")
        }),
        libc::EROFS,
        "write into the registry view",
    );
}

#[test]
fn a_file_held_open_is_not_pushed_half_written() {
    let reg = Registry::start();
    let host = reg.host();
    let m = outbox_mount(&reg);
    // v1 is a known tag already (pushed once); v2 is new.
    let v1 = m.join(format!("outbox/{host}/slow/v1"));
    let v2 = m.join(format!("outbox/{host}/slow/v2"));
    mkdir_p(v1.clone());
    write_file(v1.join("first"), b"pushed before\n".to_vec());
    let first = wait_status(&m, &format!("{host}/slow/v1"), PUSH_WAIT, |s| {
        phase_is(s, "pushed")
    });
    mkdir_p(v2.clone());

    let data = pseudo_random(11, 4 << 20);
    let half = data.len() / 2;
    let open_half = |p: PathBuf| {
        let first = data[..half].to_vec();
        within(FS_GUARD, "open and write", move || {
            let mut f = fs::File::create(p).unwrap();
            f.write_all(&first).unwrap();
            f
        })
    };
    let f1 = open_half(v1.join("big"));
    let f2 = open_half(v2.join("big"));
    // Longer than the settle time, the files still open.
    thread::sleep(Duration::from_millis(3500));
    assert!(
        !registry_tags(&host, "slow", None).contains(&"v2".to_string()),
        "a new tag was pushed while a file in it was open for writing"
    );
    let st = status_of(&m, &format!("{host}/slow/v1")).unwrap();
    assert_eq!(
        pushes(&st),
        1,
        "a known tag was pushed again while a file in it was open for writing: {st}"
    );
    let (manifest, _) = get_manifest(&host, "slow", "v1", None);
    assert_eq!(first["pushed"]["manifest"], sha256_digest(&manifest));

    for mut f in [f1, f2] {
        let rest = data[half..].to_vec();
        within(FS_GUARD, "write and close", move || {
            f.write_all(&rest).unwrap();
            drop(f);
        });
    }
    wait_for_tag(&m, &host, "slow", "v2", None);
    wait_status(&m, &format!("{host}/slow/v1"), PUSH_WAIT, |s| {
        phase_is(s, "pushed") && pushes(s) >= 2
    });
    let work = tempfile::tempdir().unwrap();
    for tag in ["v1", "v2"] {
        let rootfs = pull_and_unpack(&format!("{host}/slow:{tag}"), &work.path().join(tag), None);
        assert_eq!(
            sha_of(&rootfs.join("big")),
            sha256_hex(&data),
            "{tag} pushed half-written"
        );
    }
}

#[test]
fn a_push_while_the_registry_is_down_completes_when_it_returns() {
    let mut reg = Registry::start();
    let host = reg.host();
    let m = outbox_mount(&reg);
    reg.stop();
    let rel = format!("{host}/down/v1");
    mkdir_p(m.join(format!("outbox/{rel}")));
    write_file(
        m.join(format!("outbox/{rel}/hello")),
        b"waiting for the registry\n".to_vec(),
    );

    let st = wait_status(&m, &rel, PUSH_WAIT, |s| s["error"].is_string());
    let err = st["error"].as_str().unwrap();
    assert!(
        err.contains(&host) && err.contains("unavailable"),
        "unclear error: {err}"
    );
    cli_status_line(&m, &format!("{host}/down:v1"), |l| {
        l.contains("error:") && l.contains("unavailable")
    });

    // export says so too, and fails.
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("f"), b"x").unwrap();
    let out = apt_layer(
        &[
            "export",
            src.path().to_str().unwrap(),
            &format!("{host}/down/x:v1"),
            "--insecure-registry",
            &host,
            "--timeout",
            "5",
        ],
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success(),
        "export to a stopped registry succeeded"
    );
    assert!(
        out.stderr.contains(&host),
        "export error does not name the registry: {}",
        out.stderr
    );

    reg.restart();
    wait_for_tag(&m, &host, "down", "v1", None);
    let st = wait_status(&m, &rel, PUSH_WAIT, |s| phase_is(s, "pushed"));
    assert!(st.get("error").is_none(), "error kept after success: {st}");
    let work = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&format!("{host}/down:v1"), work.path(), None);
    assert_eq!(
        fs::read(rootfs.join("hello")).unwrap(),
        b"waiting for the registry\n"
    );
}

#[test]
fn a_push_cut_by_a_daemon_crash_completes_after_restart() {
    let reg = Registry::start();
    let host = reg.host();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let start = || {
        Mount::builder()
            .insecure(&host)
            .option(SETTLE)
            .cache_dir(&cache)
            .start()
    };
    let mut m = start();
    let rel = format!("{host}/crash/v1");
    mkdir_p(m.join(format!("outbox/{rel}")));
    // Incompressible, so that writing and sending the layer takes a while.
    let big = pseudo_random(21, 48 << 20);
    write_file(m.join(format!("outbox/{rel}/big")), big.clone());
    write_file(m.join(format!("outbox/{rel}/small")), b"small\n".to_vec());
    let st = wait_status(&m, &rel, PUSH_WAIT, |s| {
        phase_is(s, "building") || phase_is(s, "pushing")
    });
    m.kill();
    assert!(
        !registry_tags(&host, "crash", None).contains(&"v1".to_string()),
        "the push finished before the kill ({st}); the test did not cut it"
    );

    let m = start();
    let staged = m.join(format!("outbox/{rel}"));
    assert_eq!(
        read(staged.join("small")).expect("staged file after restart"),
        b"small\n"
    );
    assert_eq!(
        sha256_hex(&read(staged.join("big")).unwrap()),
        sha256_hex(&big)
    );
    wait_for_tag(&m, &host, "crash", "v1", None);
    wait_status(&m, &rel, PUSH_WAIT, |s| phase_is(s, "pushed"));
    let rootfs = pull_and_unpack(
        &format!("{host}/crash:v1"),
        &work.path().join("pulled"),
        None,
    );
    assert_eq!(sha_of(&rootfs.join("big")), sha256_hex(&big));
    assert_eq!(fs::read(rootfs.join("small")).unwrap(), b"small\n");
}

/// A mount of `host` with `creds` in its auth file, and a tag directory
/// `host/tag_path` staged in its outbox holding the file `hello`: the
/// mount and the tag directory's path below `outbox/`.
fn stage_with_authfile(
    work: &Path,
    host: &str,
    (user, pass): (&str, &str),
    tag_path: &str,
    hello: &[u8],
) -> (Mount, String) {
    let auth = write_authfile(work, &[(host, user, pass)]);
    let m = Mount::builder()
        .insecure(host)
        .authfile(&auth)
        .option(SETTLE)
        .start();
    let rel = format!("{host}/{tag_path}");
    mkdir_p(m.join(format!("outbox/{rel}")));
    write_file(m.join(format!("outbox/{rel}/hello")), hello.to_vec());
    (m, rel)
}

#[test]
fn pushes_to_an_htpasswd_registry_with_credentials_from_auth_json() {
    let (user, pass) = ("pusher", "s3cret");
    let reg = Registry::start_with_htpasswd(user, pass);
    let host = reg.host();
    let work = tempfile::tempdir().unwrap();
    let (m, rel) = stage_with_authfile(
        work.path(),
        &host,
        (user, pass),
        "private/app/v1",
        b"authenticated\n",
    );
    wait_for_tag(&m, &host, "private/app", "v1", Some((user, pass)));
    wait_status(&m, &rel, PUSH_WAIT, |s| phase_is(s, "pushed"));
    let rootfs = pull_and_unpack(
        &format!("{host}/private/app:v1"),
        &work.path().join("p"),
        Some((user, pass)),
    );
    assert_eq!(fs::read(rootfs.join("hello")).unwrap(), b"authenticated\n");

    // Without credentials the registry refuses, and the status says so.
    let anon = Mount::builder().insecure(&host).option(SETTLE).start();
    let rel2 = format!("{host}/private/app/v2");
    mkdir_p(anon.join(format!("outbox/{rel2}")));
    write_file(
        anon.join(format!("outbox/{rel2}/hello")),
        b"anonymous\n".to_vec(),
    );
    let st = wait_status(&anon, &rel2, PUSH_WAIT, |s| s["error"].is_string());
    let err = st["error"].as_str().unwrap();
    assert!(
        err.contains("refused") && err.contains(&host),
        "unclear error: {err}"
    );
    assert!(!registry_tags(&host, "private/app", Some((user, pass))).contains(&"v2".to_string()));
}

/// The same through a registry with token auth (the bearer flow of Docker
/// Hub, GHCR and Quay), the CNCF registry checking every token: the push
/// gets a `pull,push` token with the credentials of auth.json, and the
/// image reads back with skopeo.
#[test]
fn pushes_to_a_token_registry_with_credentials_from_auth_json() {
    let (user, pass) = ("pusher", "t0ken-s3cret");
    let tokens = TokenService::start(user, pass);
    let reg = Registry::start_with_token(&tokens);
    let host = reg.host();
    let work = tempfile::tempdir().unwrap();
    let (m, rel) = stage_with_authfile(
        work.path(),
        &host,
        (user, pass),
        "tok/app/v1",
        b"pushed with a token\n",
    );
    wait_status(&m, &rel, PUSH_WAIT, |s| phase_is(s, "pushed"));
    let rootfs = pull_and_unpack(
        &format!("{host}/tok/app:v1"),
        &work.path().join("p"),
        Some((user, pass)),
    );
    assert_eq!(
        fs::read(rootfs.join("hello")).unwrap(),
        b"pushed with a token\n"
    );
    let asked = tokens.asked();
    assert!(
        asked
            .iter()
            .any(|t| t.contains("repository:tok/app:pull,push")),
        "no push token was asked for: {asked:?}"
    );
}

#[test]
fn bad_names_get_clear_errors_and_lose_nothing() {
    let reg = Registry::start();
    let host = reg.host();
    let m = outbox_mount(&reg);
    let o = m.join("outbox");
    let mkdir = |p: PathBuf| within(FS_GUARD, "mkdir", move || fs::create_dir(p));
    let create = |p: PathBuf| within(FS_GUARD, "create", move || fs::write(p, b"x"));
    assert_errno(
        mkdir(o.join("not-a-registry")),
        libc::EINVAL,
        "mkdir outbox/not-a-registry",
    );
    assert_errno(create(o.join("file")), libc::EPERM, "a file in outbox/");
    mkdir(o.join(&host)).unwrap();
    assert_errno(
        mkdir(o.join(format!("{host}/Upper"))),
        libc::EINVAL,
        "upper-case repository",
    );
    assert_errno(
        mkdir(o.join(format!("{host}/a..b"))),
        libc::EINVAL,
        "bad separator",
    );
    assert_errno(
        create(o.join(format!("{host}/file"))),
        libc::EPERM,
        "a file in a registry dir",
    );
    mkdir(o.join(format!("{host}/img"))).unwrap();
    assert_errno(
        create(o.join(format!("{host}/img/file"))),
        libc::EPERM,
        "a file above the tag",
    );
    assert_errno(
        mkdir(o.join(format!("{host}/img/-v1"))),
        libc::EINVAL,
        "bad tag",
    );
    assert_errno(
        create(m.join("file")),
        libc::EROFS,
        "a file outside outbox/",
    );

    // A name the registry refuses: the error shows, the tree stays.
    let long = "n".repeat(100);
    let bad = format!("{host}/{long}/{long}/{long}/v1");
    mkdir_p(o.join(&bad));
    write_file(o.join(format!("{bad}/data")), b"keep me\n".to_vec());
    let st = wait_status(&m, &bad, PUSH_WAIT, |s| s["error"].is_string());
    let err = st["error"].as_str().unwrap();
    assert!(
        err.contains("rejected") && err.contains("255"),
        "unclear error: {err}"
    );
    assert_eq!(read(o.join(format!("{bad}/data"))).unwrap(), b"keep me\n");
    // A refusal is not retried blindly (backoff starts at 1 s): it waits
    // for the tree to change.
    assert!(
        st["next_retry"].is_null(),
        "a refused push is scheduled again: {st}"
    );
    thread::sleep(Duration::from_secs(4));
    let again = status_of(&m, &bad).expect("status stays");
    assert_eq!(
        again["attempts"], st["attempts"],
        "refused push retried: {again}"
    );
    assert!(
        again["error"].is_string(),
        "error gone without a push: {again}"
    );

    // Tag directories do not move (EXDEV), so mv copies it to a good name.
    mkdir_p(o.join(format!("{host}/good")));
    let (from, to) = (o.join(&bad), o.join(format!("{host}/good/v1")));
    assert_errno(
        within(FS_GUARD, "rename", {
            let (f, t) = (from.clone(), to.clone());
            move || fs::rename(f, t)
        }),
        libc::EXDEV,
        "rename of a tag directory",
    );
    within(FS_GUARD, "mv", move || {
        run(Command::new("mv").arg(&from).arg(&to));
    });
    wait_for_tag(&m, &host, "good", "v1", None);
    let work = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&format!("{host}/good:v1"), work.path(), None);
    assert_eq!(fs::read(rootfs.join("data")).unwrap(), b"keep me\n");
    assert!(
        status_of(&m, &bad).is_none(),
        "the moved tag still has a status"
    );
}

#[test]
fn a_file_that_vanishes_mid_push() {
    let reg = Registry::start();
    let host = reg.host();
    let m = outbox_mount(&reg);
    let rel = format!("{host}/vanish/v1");
    let dir = m.join(format!("outbox/{rel}"));
    mkdir_p(dir.clone());
    // Read first (sorted order) and slow to compress, so the others are
    // still ahead when they go.
    write_file(dir.join("a-big"), pseudo_random(31, 48 << 20));
    write_file(
        dir.join("b-unlinked"),
        b"removed through the mount\n".to_vec(),
    );
    write_file(dir.join("c-kept"), b"kept\n".to_vec());
    write_file(
        dir.join("z-vanished"),
        b"removed behind the daemon's back\n".to_vec(),
    );

    // Removed through the mount while the layer is written: that push is
    // abandoned and the next one has the tree as it is.
    wait_status(&m, &rel, PUSH_WAIT, |s| phase_is(s, "building"));
    within(FS_GUARD, "unlink", {
        let p = dir.join("b-unlinked");
        move || fs::remove_file(p)
    })
    .unwrap();
    let st = wait_status(&m, &rel, PUSH_WAIT, |s| {
        s["note"].as_str().is_some_and(|n| n.contains("changed")) || phase_is(s, "pushed")
    });
    assert!(
        st["note"]
            .as_str()
            .is_some_and(|n| n.contains("changed during a push")),
        "no word of the abandoned push: {st}"
    );
    assert!(
        st.get("error").is_none(),
        "an abandoned push is not a failure: {st}"
    );
    wait_status(&m, &rel, PUSH_WAIT, |s| phase_is(s, "pushed"));

    // Removed from the staging disk behind the daemon's back while the
    // layer is written: a clear error, then a retry that succeeds.
    write_file(dir.join("d-new"), b"new\n".to_vec());
    // Reading has begun (so the walk that lists the files is done).
    wait_status(&m, &rel, PUSH_WAIT, |s| {
        phase_is(s, "building") && s["progress"]["done"].as_u64().unwrap_or(0) > 0
    });
    let backing = m
        .cache_dir()
        .join("outbox/tree")
        .join(&rel)
        .join("z-vanished");
    fs::remove_file(&backing).unwrap();
    let st = wait_status(&m, &rel, PUSH_WAIT, |s| s["error"].is_string());
    let err = st["error"].as_str().unwrap();
    assert!(
        err.contains("z-vanished") && err.contains("vanished"),
        "unclear error: {err}"
    );
    let st = wait_status(&m, &rel, PUSH_WAIT, |s| {
        phase_is(s, "pushed") && pushes(s) >= 2
    });
    assert!(st.get("error").is_none(), "{st}");

    let work = tempfile::tempdir().unwrap();
    let rootfs = pull_and_unpack(&format!("{host}/vanish:v1"), work.path(), None);
    let names = list(&rootfs).unwrap();
    assert_eq!(names, vec!["a-big", "c-kept", "d-new"], "pushed tree");
    assert_eq!(
        read(dir.join("c-kept")).unwrap(),
        b"kept\n",
        "staged file lost"
    );
}

#[test]
fn a_full_disk_while_staging_is_reported_and_loses_nothing() {
    let reg = Registry::start();
    let host = reg.host();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let _disk = Tmpfs::mount(&cache, "16m");
    let m = Mount::builder()
        .insecure(&host)
        .option(SETTLE)
        .cache_dir(&cache)
        .start();
    let rel = format!("{host}/full/v1");
    let dir = m.join(format!("outbox/{rel}"));
    mkdir_p(dir.clone());
    write_file(
        dir.join("keep"),
        b"staged before the disk filled\n".to_vec(),
    );
    wait_status(&m, &rel, PUSH_WAIT, |s| phase_is(s, "pushed"));

    let p = dir.join("huge");
    let res = within(FS_GUARD, "fill the disk", move || -> std::io::Result<()> {
        let mut f = fs::File::create(p)?;
        let chunk = pseudo_random(41, 1 << 20);
        for _ in 0..32 {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    });
    assert_errno(res, libc::ENOSPC, "writing 32 MiB into a 16 MiB cache disk");
    let st = wait_status(&m, &rel, PUSH_WAIT, |s| {
        s["staging_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left"))
    });
    assert!(
        st["staging_error"].as_str().unwrap().contains("huge"),
        "{st}"
    );
    assert_eq!(
        read(dir.join("keep")).unwrap(),
        b"staged before the disk filled\n"
    );

    within(FS_GUARD, "rm", {
        let p = dir.join("huge");
        move || fs::remove_file(p)
    })
    .unwrap();
    let st = wait_status(&m, &rel, PUSH_WAIT, |s| {
        phase_is(s, "pushed") && pushes(s) >= 2
    });
    assert!(st.get("staging_error").is_none(), "{st}");
    let rootfs = pull_and_unpack(&format!("{host}/full:v1"), &work.path().join("p"), None);
    assert_eq!(list(&rootfs).unwrap(), vec!["keep"]);
}

/// Two daemons on one cache would both push the trees staged in its
/// outbox, each blind to the other's writers (one could push a file the
/// other still holds open). The second is refused with its reason, while
/// `-o ro` (no outbox) shares the cache, and the first keeps serving.
#[test]
fn a_second_daemon_on_the_same_cache_is_refused_its_outbox() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let first = outbox_mount(&reg);
    let cache = first.cache_dir().to_str().unwrap().to_string();
    let mnt = tempfile::tempdir().unwrap();
    let second = mnt.path().to_str().unwrap();
    let out = apt_layer(
        &[
            "mount",
            second,
            "--cache-dir",
            &cache,
            "--insecure-registry",
            &h,
            "--registries-conf",
            "/dev/null",
        ],
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "a second daemon mounted on the same cache: {out:?}"
    );
    for needle in [cache.as_str(), "-o ro", "another"] {
        assert!(
            out.stderr.contains(needle),
            "no {needle:?} in: {}",
            out.stderr
        );
    }
    assert_eq!(mount_fstype(mnt.path()), None, "left a mount behind");

    let ro = Mount::builder()
        .insecure(&h)
        .cache_dir(Path::new(&cache))
        .option("ro")
        .start();
    assert!(fs::read_dir(ro.path()).is_ok(), "the -o ro daemon serves");
    drop(ro);

    let src = tempfile::tempdir().unwrap();
    write_file(
        src.path().join("f"),
        b"still pushed by the first\n".to_vec(),
    );
    mkdir_p(first.join(format!("outbox/{h}/second")));
    cp_a(src.path(), &first.join(format!("outbox/{h}/second/t1")));
    wait_for_tag(&first, &h, "second", "t1", None);
}
