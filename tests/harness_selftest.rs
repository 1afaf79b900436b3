//! Self-test of the integration harness (tests/common): the real registry,
//! umoci + skopeo image building, the skopeo oracles and the FaultServer.
//! It needs no apt-layer implementation, so a failure here is a harness or
//! environment problem, not an apt-layer bug.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn registry_image_push_and_inspect() {
    require_env();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let spec = ImageSpec::new("v1")
        .tree(vec![
            Entry::file("etc/hello", "hello\n"),
            Entry::dir("var/empty").mode(0o1777),
            Entry::symlink("etc/link", "hello"),
            Entry::file("usr/bin/tool", "#!/bin/sh\n")
                .mode(0o4755)
                .owner(1000, 1000),
            Entry::hardlink("usr/bin/tool2", "usr/bin/tool"),
            Entry::fifo("run/fifo"),
        ])
        .tree(vec![
            Entry::remove("etc/hello"),
            Entry::file("etc/new", "new\n"),
        ])
        .layer(Layer::Whiteout("run/fifo".into()))
        .label("a", "b")
        .env("X=1")
        .author("me");
    let layout = make_image(work.path(), &spec);
    let oci_digest = layout_digest(&layout, "v1");
    let dest = format!("{}/ns/sub/img:v1", reg.host());
    let pushed = push(&layout_ref(&layout, "v1"), &dest, Format::Oci);
    assert_eq!(pushed, oci_digest);

    let inspect = skopeo_inspect(&dest);
    assert_eq!(inspect["Digest"], pushed);
    assert_eq!(inspect["Labels"]["a"], "b");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 3);
    let raw = skopeo_raw_manifest(&dest);
    assert_eq!(sha256_digest(&raw), pushed);
    let (served, _) = get_manifest(&reg.host(), "ns/sub/img", "v1", None);
    assert_eq!(served, raw);
    let config = skopeo_inspect_raw_config(&dest);
    let m: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(m["config"]["digest"], sha256_digest(&config));
    assert_inspect_matches(&inspect, &inspect, &raw, "self");

    // v2s2 push changes the manifest.
    let v2 = format!("{}/v2img:v1", reg.host());
    let d2 = push(&layout_ref(&layout, "v1"), &v2, Format::V2s2);
    let raw2 = skopeo_raw_manifest(&v2);
    assert!(
        String::from_utf8_lossy(&raw2)
            .contains("application/vnd.docker.distribution.manifest.v2+json")
    );
    assert_eq!(sha256_digest(&raw2), d2);

    // Many tags.
    let tags: Vec<String> = (0..105).map(|i| format!("x{i:03}")).collect();
    push_many_tags(&reg.host(), "ns/sub/img", "v1", &tags);
    assert_eq!(
        skopeo_tags(&format!("{}/ns/sub/img", reg.host())).len(),
        106
    );

    // Access log records requests.
    assert!(
        reg.log()
            .contains("\"GET /v2/ns/sub/img/tags/list HTTP/1.1\" 200"),
        "{}",
        reg.log()
    );
    let off = reg.log_len();
    get_manifest(&reg.host(), "v2img", "v1", None);
    assert!(
        reg.requests_since(off)
            .iter()
            .any(|r| r == "GET /v2/v2img/manifests/v1 HTTP/1.1")
    );

    // Multi-platform index.
    let mp = push_multi_platform(
        work.path(),
        &reg.host(),
        "multi",
        "latest",
        &["amd64", "arm64"],
    );
    let mref = format!("{}/multi:latest", reg.host());
    assert_eq!(skopeo_raw_manifest(&mref), mp.index);
    let mi = skopeo_inspect(&mref);
    assert_eq!(mi["Digest"], mp.index_digest);
    assert_eq!(mi["Architecture"], host_arch());
    assert_ne!(mp.platform("amd64").digest, mp.platform("arm64").digest);
    assert_eq!(
        skopeo_tags(&format!("{}/multi", reg.host())),
        vec!["latest".to_string()]
    );
}

#[test]
fn registry_restart_keeps_storage_and_port() {
    let mut reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let dest = format!("{}/r:1", reg.host());
    let d = push_simple(work.path(), &dest, Format::Oci);
    let host = reg.host();
    reg.stop();
    assert!(http("GET", &host, "/v2/", &[], &[]).is_err());
    reg.restart();
    assert_eq!(reg.host(), host);
    assert_eq!(skopeo_inspect(&dest)["Digest"], d);
}

#[test]
fn htpasswd_and_proxy_registries() {
    let primary = Registry::start_with_htpasswd("alice", "pw-123");
    assert_eq!(
        http("GET", &primary.host(), "/v2/", &[], &[])
            .unwrap()
            .status,
        401
    );
    let auth = basic_auth("alice", "pw-123");
    let r = http(
        "GET",
        &primary.host(),
        "/v2/",
        &[("Authorization", &auth)],
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let work = tempfile::tempdir().unwrap();
    let spec = ImageSpec::new("t").tree(vec![Entry::file("a", "a")]);
    let layout = make_image(work.path(), &spec);
    push_with_creds(
        &layout_ref(&layout, "t"),
        &format!("{}/p:t", primary.host()),
        Format::Oci,
        Some(("alice", "pw-123")),
    );
    let out = skopeo(&[
        "list-tags",
        "--tls-verify=false",
        "--creds",
        "alice:pw-123",
        &format!("docker://{}/p", primary.host()),
    ]);
    assert!(String::from_utf8_lossy(&out).contains("\"t\""));

    let open = Registry::start();
    let d = push(
        &layout_ref(&layout, "t"),
        &format!("{}/p:t", open.host()),
        Format::Oci,
    );
    let mirror = Registry::start_proxy(&open.url());
    let off = mirror.log_len();
    assert_eq!(
        skopeo_inspect(&format!("{}/p:t", mirror.host()))["Digest"],
        d
    );
    assert!(
        mirror
            .requests_since(off)
            .iter()
            .any(|r| r.starts_with("GET /v2/p/manifests/"))
    );
}

#[test]
fn fault_server_replies_stalls_and_closes() {
    let fs = FaultServer::start(|method, target| {
        let (path, q) = split_target(target);
        match path.as_str() {
            "/v2/stall/tags/list" => FaultReply::Stall,
            "/v2/close/tags/list" => FaultReply::Close,
            "/v2/x/tags/list" => FaultReply::json(
                200,
                &format!(
                    r#"{{"name":"x","tags":["{}"]}}"#,
                    q.get("n").cloned().unwrap_or_default()
                ),
            )
            .with_header("X-Method", method),
            _ => FaultReply::Default,
        }
    });
    let h = fs.host();
    assert_eq!(http("GET", &h, "/v2/", &[], &[]).unwrap().status, 200);
    assert_eq!(
        http("GET", &h, "/v2/nope/tags/list", &[], &[])
            .unwrap()
            .status,
        404
    );
    let r = http("GET", &h, "/v2/x/tags/list?n=7", &[], &[]).unwrap();
    assert_eq!(r.body, br#"{"name":"x","tags":["7"]}"#);
    assert_eq!(r.header("x-method"), Some("GET"));
    assert!(http("GET", &h, "/v2/close/tags/list", &[], &[]).is_err());

    let h2 = h.clone();
    let start = Instant::now();
    let stalled = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(&h2).unwrap();
        use std::io::{Read, Write};
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        s.write_all(b"GET /v2/stall/tags/list HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut b = [0u8; 16];
        s.read(&mut b)
    });
    let res = stalled.join().unwrap();
    let e = res.expect_err("stalled request must not be answered");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(700));
    assert_eq!(fs.count("/v2/stall/"), 1);
    assert!(fs.requests().len() >= 5);
}

#[test]
fn guarded_calls_and_errno() {
    assert_eq!(errno_of(read("/nonexistent/apt-layer")), libc::ENOENT);
    assert_errno(std::fs::create_dir("/proc"), libc::EEXIST, "mkdir /proc");
    let (v, took) = timed_within(Duration::from_secs(5), "sleep", || {
        std::thread::sleep(Duration::from_millis(100));
        7
    });
    assert_eq!(v, 7);
    assert!(took >= Duration::from_millis(100));
    let r = std::panic::catch_unwind(|| {
        within(Duration::from_millis(100), "hang", || {
            std::thread::sleep(Duration::from_secs(2))
        })
    });
    assert!(r.is_err(), "within must panic on a hang");
    assert_eq!(
        mount_fstype(std::path::Path::new("/proc")).as_deref(),
        Some("proc")
    );
}
