//! The registry tree through a real FUSE mount (DESIGN.md §1, §4, §5):
//! registries, catalog, tags, the per-tag metadata files, digests, multi-
//! platform indexes, the `inspect`/`list-tags` commands, credentials,
//! mirrors, and the errors users see. Oracles are skopeo and the registry's
//! own access log; FaultServer only for faults a real registry won't make.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ENOENT: i32 = libc::ENOENT;
const EIO: i32 = libc::EIO;
const EACCES: i32 = libc::EACCES;
const EROFS: i32 = libc::EROFS;

/// The files every tag directory has from this issue on.
const TAG_FILES: &[&str] = &["manifest.json", "config.json", "digest", "inspect.json"];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every user-visible file of `HOST/REPO:TAG` (a single-platform tag)
/// against skopeo, and the same image pinned by digest.
fn check_tag(m: &Mount, host: &str, repo: &str, tag: &str) {
    let reference = format!("{host}/{repo}:{tag}");
    let dir = m.join(format!("{host}/{repo}/{tag}"));

    let names = list(&dir).unwrap_or_else(|e| panic!("ls {}: {e}", dir.display()));
    for f in TAG_FILES {
        assert!(
            names.iter().any(|n| n == f),
            "{reference}: ls tag dir lacks {f}: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n == "index.json"),
        "{reference}: single-platform tag lists index.json: {names:?}"
    );
    assert_errno(
        stat(dir.join("index.json")),
        ENOENT,
        "index.json of a single-platform tag",
    );

    let manifest = read(dir.join("manifest.json")).expect("read manifest.json");
    let raw = skopeo_raw_manifest(&reference);
    assert_eq!(
        show(&manifest),
        show(&raw),
        "{reference}: manifest.json vs skopeo inspect --raw"
    );
    assert_eq!(manifest, raw);

    let digest = read_string(dir.join("digest")).expect("read digest");
    assert_eq!(
        digest,
        format!("sha256:{}\n", sha256_hex(&manifest)),
        "{reference}: digest file"
    );
    let oracle = skopeo_inspect(&reference);
    assert_eq!(
        digest.trim_end(),
        oracle["Digest"].as_str().unwrap(),
        "{reference}: digest vs skopeo Digest"
    );

    let config = read(dir.join("config.json")).expect("read config.json");
    assert_eq!(
        show(&config),
        show(&skopeo_inspect_raw_config(&reference)),
        "{reference}: config.json vs skopeo inspect --raw --config"
    );

    let inspect_bytes = read(dir.join("inspect.json")).expect("read inspect.json");
    let ours: Value = serde_json::from_slice(&inspect_bytes).unwrap_or_else(|e| {
        panic!(
            "{reference}: inspect.json is not JSON ({e}): {}",
            show(&inspect_bytes)
        )
    });
    assert_inspect_matches(&ours, &oracle, &manifest, &reference);

    // `ls -l` shows the real sizes.
    for (f, len) in [
        ("manifest.json", manifest.len()),
        ("config.json", config.len()),
        ("digest", digest.len()),
        ("inspect.json", inspect_bytes.len()),
    ] {
        let md = stat(dir.join(f)).unwrap();
        assert!(md.is_file(), "{reference}: {f} is not a regular file");
        assert_eq!(md.len() as usize, len, "{reference}: st_size of {f}");
    }

    // The same image pinned by digest: resolvable, never listed.
    let hex = sha256_hex(&manifest);
    let pinned = m.join(format!("{host}/{repo}/@sha256:{hex}"));
    assert_eq!(
        read(pinned.join("manifest.json")).expect("@sha256 manifest.json"),
        manifest
    );
    assert_eq!(read_string(pinned.join("digest")).unwrap(), digest);
    assert_eq!(read(pinned.join("config.json")).unwrap(), config);
    let pinned_ref = format!("{host}/{repo}@sha256:{hex}");
    let ours_pinned: Value =
        serde_json::from_slice(&read(pinned.join("inspect.json")).unwrap()).expect("inspect.json");
    assert_inspect_matches(
        &ours_pinned,
        &skopeo_inspect(&pinned_ref),
        &manifest,
        &pinned_ref,
    );
    let listed = list(m.join(format!("{host}/{repo}"))).unwrap();
    assert!(
        listed.iter().all(|t| !t.starts_with('@')),
        "{host}/{repo}: digest dirs must not be listed: {listed:?}"
    );
}

/// The daemon's log says `needle` somewhere (why a request failed).
fn assert_log_says(m: &Mount, needle: &str) {
    assert!(
        m.log().contains(needle),
        "no log line says {needle:?}; log:\n{}",
        m.log()
    );
}

/// The mount still serves `HOST/REPO:TAG` of a real registry, and the daemon
/// still runs.
fn assert_still_serves(m: &mut Mount, host: &str, repo: &str, tag: &str) {
    assert!(m.is_running(), "daemon died; log:\n{}", m.log());
    let tags = list(m.join(format!("{host}/{repo}"))).expect("ls real repository");
    assert_eq!(tags, skopeo_tags(&format!("{host}/{repo}")));
    let manifest =
        read(m.join(format!("{host}/{repo}/{tag}/manifest.json"))).expect("read real manifest");
    assert_eq!(
        manifest,
        skopeo_raw_manifest(&format!("{host}/{repo}:{tag}"))
    );
}

/// A real registry with `app:t1`, a FaultServer with `handler`, one mount of
/// both.
fn fault_fixture(
    handler: impl Fn(&str, &str) -> FaultReply + Send + Sync + 'static,
) -> (Registry, FaultServer, Mount, tempfile::TempDir) {
    fault_fixture_with_headers(move |method, target, _| handler(method, target))
}

/// [`fault_fixture`] whose fault server's handler also sees headers.
fn fault_fixture_with_headers(
    handler: impl Fn(&str, &str, &Headers) -> FaultReply + Send + Sync + 'static,
) -> (Registry, FaultServer, Mount, tempfile::TempDir) {
    require_env();
    let real = Registry::start();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{}/app:t1", real.host()), Format::Oci);
    let fault = FaultServer::start_with_headers(handler);
    let m = Mount::builder()
        .insecure(&real.host())
        .insecure(&fault.host())
        .timeout(3)
        .start();
    (real, fault, m, work)
}

// ---------------------------------------------------------------------------
// Listing: registries, catalog, tags
// ---------------------------------------------------------------------------

#[test]
fn root_lists_configured_registries_and_outbox() {
    require_env();
    let r1 = Registry::start();
    let r2 = Registry::start();
    let m = Mount::start(&[&r1.host(), &r2.host()]);
    let mut want = vec![r1.host(), r2.host(), "outbox".to_string()];
    want.sort();
    assert_eq!(list(m.path()).expect("ls MNT"), want);
    for name in &want {
        assert!(
            stat(m.join(name)).unwrap().is_dir(),
            "{name} is not a directory"
        );
    }
}

#[test]
fn registry_lists_catalog_first_segments_nested() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    for repo in ["ns/sub/img", "ns/other", "plain"] {
        push_simple(work.path(), &format!("{h}/{repo}:t1"), Format::Oci);
    }
    let m = Mount::start(&[&h]);
    assert_eq!(
        list(m.join(&h)).expect("ls registry"),
        strings(&["ns", "plain"])
    );
    assert_eq!(
        list(m.join(format!("{h}/ns"))).expect("ls ns"),
        strings(&["other", "sub"])
    );
    assert_eq!(
        list(m.join(format!("{h}/ns/sub"))).expect("ls ns/sub"),
        strings(&["img"])
    );
    assert_eq!(
        list(m.join(format!("{h}/ns/sub/img"))).expect("ls ns/sub/img"),
        strings(&["t1"])
    );
    assert_eq!(
        list(m.join(format!("{h}/plain"))).expect("ls plain"),
        strings(&["t1"])
    );
    check_tag(&m, &h, "ns/sub/img", "t1");
}

#[test]
fn repository_lists_exactly_the_tags_including_over_100() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{h}/few:t1"), Format::Oci);
    push_many_tags(
        &h,
        "few",
        "t1",
        &strings(&["latest", "v1.0", "Release_2", "a-b.c"]),
    );
    push_simple(work.path(), &format!("{h}/many:base"), Format::Oci);
    let many: Vec<String> = (0..130).map(|i| format!("v{i}")).collect();
    push_many_tags(&h, "many", "base", &many);

    let m = Mount::start(&[&h]);
    let few = list(m.join(format!("{h}/few"))).expect("ls few");
    assert_eq!(few, skopeo_tags(&format!("{h}/few")));
    assert_eq!(few.len(), 5);

    let listed = list(m.join(format!("{h}/many"))).expect("ls many");
    let oracle = skopeo_tags(&format!("{h}/many"));
    assert_eq!(oracle.len(), 131);
    assert_eq!(listed.len(), oracle.len(), "every page of tags");
    assert_eq!(listed, oracle);
    for t in [&oracle[0], &oracle[130], &"v99".to_string()] {
        assert!(
            stat(m.join(format!("{h}/many/{t}"))).unwrap().is_dir(),
            "tag {t} is not a directory"
        );
    }
}

#[test]
fn paginated_tag_list_is_followed_to_the_end() {
    // distribution 2.8 answers tags/list in one page; other registries page
    // (and cap `n`): this server pages 40 at a time with Link headers.
    let all: Vec<String> = (0..250).map(|i| format!("tag{i:04}")).collect();
    let tags = all.clone();
    let (real, fault, mut m, _work) = fault_fixture(move |_, target| {
        let (path, q) = split_target(target);
        if path != "/v2/paged/tags/list" {
            return FaultReply::Default;
        }
        let n: usize = q
            .get("n")
            .and_then(|n| n.parse().ok())
            .unwrap_or(100)
            .clamp(1, 40);
        let start = match q.get("last") {
            Some(last) => tags.iter().position(|t| t > last).unwrap_or(tags.len()),
            None => 0,
        };
        let page = &tags[start..(start + n).min(tags.len())];
        let body = serde_json::json!({"name": "paged", "tags": page}).to_string();
        let reply = FaultReply::json(200, &body);
        if start + n < tags.len() {
            let last = page.last().unwrap();
            reply.with_header(
                "Link",
                &format!("</v2/paged/tags/list?last={last}&n={n}>; rel=\"next\""),
            )
        } else {
            reply
        }
    });
    let listed = list(m.join(format!("{}/paged", fault.host()))).expect("ls paged");
    assert_eq!(listed.len(), 250, "tags from every page");
    assert_eq!(listed, all);
    assert!(
        fault.count("/v2/paged/tags/list") >= 7,
        "{:?}",
        fault.requests()
    );
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

#[test]
fn opaque_next_page_cursors_and_bearer_tokens_are_followed() {
    // Quay pages tags/list with an opaque `next_page=` cursor in its Link
    // header and ignores `last=`; it (like Docker Hub) wants a bearer token
    // from its token service. Neither is what distribution 2.8 does.
    let all: Vec<String> = (0..250).map(|i| format!("v{i:04}")).collect();
    let tags = all.clone();
    let me = Arc::new(std::sync::OnceLock::<String>::new());
    let me2 = me.clone();
    // The token service's current token; the test rotates it.
    let generation = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let gen2 = generation.clone();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":2}},"layers":[]}}"#,
        "0".repeat(64)
    );
    let manifest2 = manifest.clone();
    let (real, fault, mut m, _work) = fault_fixture_with_headers(move |_, target, headers| {
        let host = me2.get().cloned().unwrap_or_default();
        let token = format!("tok-{}", gen2.load(std::sync::atomic::Ordering::SeqCst));
        let bearer = headers
            .iter()
            .any(|(k, v)| k == "authorization" && *v == format!("Bearer {token}"));
        let challenge = || {
            FaultReply::json(
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}"#,
            )
            .with_header(
                "WWW-Authenticate",
                &format!(r#"Bearer realm="http://{host}/token",service="fault""#),
            )
        };
        let (path, q) = split_target(target);
        match path.as_str() {
            "/v2/" => challenge(),
            "/token"
                if q.get("scope")
                    .map(|s| s.replace("%3A", ":").replace("%2F", "/"))
                    == Some("repository:quay/app:pull".into()) =>
            {
                FaultReply::json(200, &serde_json::json!({ "token": token }).to_string())
            }
            "/v2/quay/app/manifests/v0001" if bearer => FaultReply::bytes(
                200,
                "application/vnd.oci.image.manifest.v1+json",
                manifest2.clone().into_bytes(),
            ),
            "/v2/quay/app/manifests/v0001" => challenge(),
            "/v2/quay/app/tags/list" => {
                if !bearer {
                    return challenge();
                }
                // The cursor says where the page starts, in a form only
                // this server reads.
                let start = q
                    .get("next_page")
                    .and_then(|c| c.strip_prefix("gA"))
                    .and_then(|c| usize::from_str_radix(c, 16).ok())
                    .map(|x| x / 7919)
                    .unwrap_or(0);
                let end = (start + 40).min(tags.len());
                let body = serde_json::json!({"name": "quay/app", "tags": &tags[start..end]});
                let reply = FaultReply::json(200, &body.to_string());
                if end < tags.len() {
                    reply.with_header(
                        "Link",
                        &format!(
                            "</v2/quay/app/tags/list?n=40&next_page=gA{:x}>; rel=\"next\"",
                            end * 7919
                        ),
                    )
                } else {
                    reply
                }
            }
            _ => FaultReply::Default,
        }
    });
    me.set(fault.host()).unwrap();
    let listed = list(m.join(format!("{}/quay/app", fault.host()))).expect("ls quay/app");
    assert_eq!(listed.len(), 250, "tags from every page");
    assert_eq!(listed, all);
    let pages: Vec<String> = fault
        .requests()
        .into_iter()
        .map(|(_, t)| t)
        .filter(|t| t.starts_with("/v2/quay/app/tags/list"))
        .collect();
    assert_eq!(pages.len(), 7, "one request per page: {pages:?}");
    assert!(
        pages.iter().all(|t| !t.contains("last=")),
        "the cursor was replaced by last=: {pages:?}"
    );
    let tokens = || {
        fault
            .requests()
            .iter()
            .filter(|(_, t)| t.starts_with("/token") && t.contains("quay%2Fapp"))
            .count()
    };
    assert_eq!(tokens(), 1, "one token for every page");
    // The service rotates its token: the one held is refused once, and a
    // new one is fetched.
    generation.store(2, std::sync::atomic::Ordering::SeqCst);
    let got = read(m.join(format!("{}/quay/app/v0001/manifest.json", fault.host())))
        .expect("read a manifest with a rotated token");
    assert_eq!(got, manifest.as_bytes());
    assert_eq!(tokens(), 2, "{:?}", fault.requests());
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

#[test]
fn a_next_page_link_to_another_server_is_not_followed() {
    // Following it would send our credentials to whoever the registry
    // names; the list is refused instead.
    let elsewhere = FaultServer::start(|_, _| FaultReply::json(200, r#"{"tags":["x"]}"#));
    let other = elsewhere.host();
    let (real, fault, mut m, _work) = fault_fixture(move |_, target| {
        if !target.starts_with("/v2/hop/tags/list") {
            return FaultReply::Default;
        }
        FaultReply::json(200, r#"{"name":"hop","tags":["a","b"]}"#).with_header(
            "Link",
            &format!("<http://{other}/v2/hop/tags/list?last=b>; rel=\"next\""),
        )
    });
    assert_errno(
        list(m.join(format!("{}/hop", fault.host()))),
        EIO,
        "ls a tag list whose next page is elsewhere",
    );
    assert!(
        elsewhere.requests().is_empty(),
        "the other server was asked: {:?}",
        elsewhere.requests()
    );
    assert_log_says(&m, "another server");
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

#[test]
fn an_oversized_tag_list_is_eio_not_memory() {
    // 2 million tags in one 22 MB page: refused as it streams.
    let mut body = String::from(r#"{"name":"huge","tags":["#);
    for i in 0..2_000_000u32 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!("\"t{i:07}\""));
    }
    body.push_str("]}");
    assert!(body.len() > 20 << 20);
    let body = Arc::new(body.into_bytes());
    let (real, fault, mut m, _work) = fault_fixture(move |_, target| {
        if target.starts_with("/v2/huge/tags/list") {
            FaultReply::bytes(200, "application/json", body.to_vec())
        } else {
            FaultReply::Default
        }
    });
    assert_errno(
        list(m.join(format!("{}/huge", fault.host()))),
        EIO,
        "ls a 20 MiB tag list",
    );
    assert_log_says(&m, "larger than");
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

// ---------------------------------------------------------------------------
// Per-tag files
// ---------------------------------------------------------------------------

/// [`two_layer_image`] tagged `v1`, pushed as `<repo>:v1` for each of
/// `repos` to registry `h` (with `creds`, if any): its layout and its
/// manifest digest (the same in every repository).
fn push_two_layer_image(
    work: &Path,
    h: &str,
    repos: &[&str],
    creds: Option<(&str, &str)>,
) -> (PathBuf, String) {
    let layout = two_layer_image(work, "v1");
    let mut digest = String::new();
    for repo in repos {
        digest = push_with_creds(
            &layout_ref(&layout, "v1"),
            &format!("{h}/{repo}:v1"),
            Format::Oci,
            creds,
        );
    }
    (layout, digest)
}

fn two_layer_image(work: &Path, tag: &str) -> PathBuf {
    let spec = ImageSpec::new(tag)
        .tree(vec![
            Entry::file("etc/os-release", "ID=apt-layer-test\n"),
            Entry::symlink("etc/alias", "os-release"),
            Entry::dir("var/lib/app").mode(0o750),
        ])
        .tree(vec![
            Entry::file("usr/bin/hello", "#!/bin/sh\necho hello\n").mode(0o755),
        ])
        .label("org.opencontainers.image.title", "apt-layer test")
        .label("com.example.flavour", "vanilla")
        .env("PATH=/usr/bin:/bin")
        .env("LANG=C.UTF-8")
        .author("apt-layer tests <tests@example.org>")
        .cmd(&["/usr/bin/hello"]);
    make_image(work, &spec)
}

#[test]
fn tag_files_match_skopeo_oci() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let layout = two_layer_image(work.path(), "v1");
    push(
        &layout_ref(&layout, "v1"),
        &format!("{h}/lib/app:v1"),
        Format::Oci,
    );
    push(
        &layout_ref(&layout, "v1"),
        &format!("{h}/lib/app:stable"),
        Format::Oci,
    );
    let m = Mount::start(&[&h]);
    check_tag(&m, &h, "lib/app", "v1");
    check_tag(&m, &h, "lib/app", "stable");
}

#[test]
fn tag_files_match_skopeo_v2s2() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let layout = two_layer_image(work.path(), "v1");
    push(
        &layout_ref(&layout, "v1"),
        &format!("{h}/docker/app:v1"),
        Format::V2s2,
    );
    let raw = skopeo_raw_manifest(&format!("{h}/docker/app:v1"));
    assert!(show(&raw).contains("application/vnd.docker.distribution.manifest.v2+json"));
    let m = Mount::start(&[&h]);
    check_tag(&m, &h, "docker/app", "v1");
}

#[test]
fn multi_platform_tag_resolves_to_host_platform() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let mp = push_multi_platform(work.path(), &h, "multi", "latest", &["amd64", "arm64"]);
    let native = mp.platform(host_arch()).clone();
    let other = mp
        .platforms
        .iter()
        .find(|p| p.architecture != host_arch())
        .unwrap()
        .clone();
    let reference = format!("{h}/multi:latest");

    let m = Mount::start(&[&h]);
    assert_eq!(
        list(m.join(format!("{h}/multi"))).unwrap(),
        strings(&["latest"])
    );
    let dir = m.join(format!("{h}/multi/latest"));
    let names = list(&dir).expect("ls multi-platform tag");
    for f in TAG_FILES.iter().chain(&["index.json"]) {
        assert!(
            names.iter().any(|n| n == f),
            "multi-platform tag lacks {f}: {names:?}"
        );
    }
    let index = read(dir.join("index.json")).expect("index.json");
    assert_eq!(show(&index), show(&mp.index));
    assert_eq!(index, skopeo_raw_manifest(&reference));

    let manifest = read(dir.join("manifest.json")).expect("manifest.json");
    assert_eq!(
        show(&manifest),
        show(&native.manifest),
        "manifest.json is the {} manifest",
        host_arch()
    );
    assert_eq!(
        read_string(dir.join("digest")).unwrap(),
        format!("{}\n", native.digest)
    );
    let config = read(dir.join("config.json")).unwrap();
    assert_eq!(show(&config), show(&skopeo_inspect_raw_config(&reference)));
    let cfg: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(cfg["architecture"], host_arch());
    let ours: Value =
        serde_json::from_slice(&read(dir.join("inspect.json")).unwrap()).expect("inspect.json");
    assert_inspect_matches(&ours, &skopeo_inspect(&reference), &manifest, &reference);

    // The other platform, by digest.
    let pinned = m.join(format!("{h}/multi/@{}", other.digest));
    assert_eq!(
        show(&read(pinned.join("manifest.json")).expect("other platform manifest")),
        show(&other.manifest)
    );
    assert_eq!(
        read_string(pinned.join("digest")).unwrap(),
        format!("{}\n", other.digest)
    );
    let other_ref = format!("{h}/multi@{}", other.digest);
    assert_eq!(
        read(pinned.join("config.json")).unwrap(),
        skopeo_inspect_raw_config(&other_ref)
    );
    assert_errno(
        stat(pinned.join("index.json")),
        ENOENT,
        "index.json of a platform manifest",
    );
    // And the native one by digest too.
    let native_pinned = m.join(format!("{h}/multi/@{}", native.digest));
    assert_eq!(
        read(native_pinned.join("manifest.json")).unwrap(),
        native.manifest
    );
}

#[test]
fn tags_are_reread_after_tag_ttl_digests_are_cached_forever() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let a = push_simple(work.path(), &format!("{h}/app:t1"), Format::Oci);
    let b = push_simple(work.path(), &format!("{h}/app:b"), Format::Oci);
    assert_ne!(a, b);
    let (a_bytes, _) = get_manifest(&h, "app", &a, None);
    let (b_bytes, b_ct) = get_manifest(&h, "app", &b, None);

    let m = Mount::builder().insecure(&h).tag_ttl(1).start();
    assert_eq!(
        list(m.join(format!("{h}/app"))).unwrap(),
        strings(&["b", "t1"])
    );
    assert_eq!(
        read_string(m.join(format!("{h}/app/t1/digest"))).unwrap(),
        format!("{a}\n")
    );
    let pinned_a = m.join(format!("{h}/app/@{a}/manifest.json"));
    assert_eq!(read(&pinned_a).unwrap(), a_bytes);

    // A tag that has not moved is asked again by a HEAD, not a GET of its
    // manifest (Docker Hub counts manifest GETs against its pull limit).
    let offset = reg.log_len();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        read_string(m.join(format!("{h}/app/t1/digest"))).unwrap(),
        format!("{a}\n")
    );
    registry_log_barrier(&reg);
    let asked = reg.requests_since(offset);
    assert!(
        asked
            .iter()
            .any(|r| r.starts_with("HEAD ") && r.contains("/v2/app/manifests/t1 ")),
        "t1 was not asked again after tag_ttl: {asked:?}"
    );
    assert!(
        !asked
            .iter()
            .any(|r| r.starts_with("GET ") && r.contains("/manifests/")),
        "a manifest was read again although t1 did not move: {asked:?}"
    );

    // A new tag appears; t1 moves to image b; image a is deleted.
    put_manifest(&h, "app", "t2", &b_ct, &b_bytes, None);
    put_manifest(&h, "app", "t1", &b_ct, &b_bytes, None);
    let del = http("DELETE", &h, &format!("/v2/app/manifests/{a}"), &[], &[]).unwrap();
    assert_eq!(del.status, 202, "DELETE manifest: {}", show(&del.body));
    assert_eq!(
        skopeo_tags(&format!("{h}/app")),
        strings(&["b", "t1", "t2"])
    );

    let repo = m.join(format!("{h}/app"));
    assert!(
        wait_until(Duration::from_secs(10), || list(&repo).ok()
            == Some(strings(&["b", "t1", "t2"]))),
        "new tag not listed 10 s after it was pushed (tag_ttl=1): {:?}",
        list(&repo)
    );
    let t1 = m.join(format!("{h}/app/t1"));
    assert!(
        wait_until(Duration::from_secs(10), || read_string(t1.join("digest"))
            .ok()
            == Some(format!("{b}\n"))),
        "t1/digest still {:?} 10 s after t1 moved to {b}",
        read_string(t1.join("digest"))
    );
    assert_eq!(
        show(&read(t1.join("manifest.json")).unwrap()),
        show(&b_bytes),
        "t1/manifest.json after the move"
    );
    // Addressed by digest: immutable, still served after the registry
    // deleted it.
    assert_eq!(read(&pinned_a).expect("@digest after deletion"), a_bytes);
}

// ---------------------------------------------------------------------------
// Command line: inspect and list-tags print skopeo's JSON
// ---------------------------------------------------------------------------

#[test]
fn cli_inspect_and_list_tags_match_skopeo() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let layout = two_layer_image(work.path(), "v1");
    let oci_digest = push(
        &layout_ref(&layout, "v1"),
        &format!("{h}/img:v1"),
        Format::Oci,
    );
    push(
        &layout_ref(&layout, "v1"),
        &format!("{h}/v2/img:v1"),
        Format::V2s2,
    );
    let many: Vec<String> = (0..110).map(|i| format!("m{i}")).collect();
    push_many_tags(&h, "img", "v1", &many);
    let mp = push_multi_platform(work.path(), &h, "multi", "latest", &["amd64", "arm64"]);

    let empty_auth = work.path().join("empty-auth.json");
    fs::write(&empty_auth, "{}").unwrap();
    let empty_conf = work.path().join("registries.conf");
    fs::write(&empty_conf, "").unwrap();
    let flags = |cmd: &str, reference: &str| -> Vec<String> {
        vec![
            cmd.to_string(),
            "--insecure-registry".into(),
            h.clone(),
            "--authfile".into(),
            empty_auth.display().to_string(),
            "--registries-conf".into(),
            empty_conf.display().to_string(),
            reference.to_string(),
        ]
    };
    let cli = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        apt_layer(&a, Duration::from_secs(60))
    };

    let native = mp.platform(host_arch()).manifest.clone();
    for (reference, manifest) in [
        (
            format!("{h}/img:v1"),
            skopeo_raw_manifest(&format!("{h}/img:v1")),
        ),
        (
            format!("docker://{h}/img:v1"),
            skopeo_raw_manifest(&format!("{h}/img:v1")),
        ),
        (
            format!("{h}/img@{oci_digest}"),
            skopeo_raw_manifest(&format!("{h}/img:v1")),
        ),
        (
            format!("{h}/v2/img:v1"),
            skopeo_raw_manifest(&format!("{h}/v2/img:v1")),
        ),
        (format!("{h}/multi:latest"), native),
    ] {
        let ours = cli(flags("inspect", &reference)).json();
        let oracle = skopeo_inspect(reference.trim_start_matches("docker://"));
        assert_inspect_matches(
            &ours,
            &oracle,
            &manifest,
            &format!("apt-layer inspect {reference}"),
        );
    }

    for repo in [
        format!("{h}/img"),
        format!("docker://{h}/img"),
        format!("{h}/multi"),
    ] {
        let ours = cli(flags("list-tags", &repo)).json();
        let oracle = skopeo_list_tags(repo.trim_start_matches("docker://"));
        assert_eq!(
            ours, oracle,
            "apt-layer list-tags {repo} vs skopeo list-tags"
        );
    }
    assert_eq!(
        cli(flags("list-tags", &format!("{h}/img"))).json()["Tags"]
            .as_array()
            .unwrap()
            .len(),
        111
    );

    let missing = cli(flags("inspect", &format!("{h}/img:NoSuchTag")));
    assert!(
        !missing.status.success(),
        "inspect of an unknown tag must fail"
    );
    let missing = cli(flags("list-tags", &format!("{h}/nosuchrepo")));
    assert!(
        !missing.status.success(),
        "list-tags of an unknown repository must fail"
    );
}

// ---------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------

#[test]
fn authfile_credentials_are_used_and_missing_ones_give_eacces() {
    require_env();
    const USER: &str = "alice";
    const PASS: &str = "Pw-7f3a9c-not-in-logs";
    let reg = Registry::start_with_htpasswd(USER, PASS);
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    push_two_layer_image(work.path(), &h, &["private/app"], Some((USER, PASS)));
    let creds = format!("{USER}:{PASS}");
    let docker = format!("docker://{h}/private/app");
    let oracle_tags: Value = serde_json::from_slice(&skopeo(&[
        "list-tags",
        "--tls-verify=false",
        "--creds",
        &creds,
        &docker,
    ]))
    .unwrap();
    let oracle_manifest = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        "--creds",
        &creds,
        &format!("{docker}:v1"),
    ]);
    let authfile = write_authfile(work.path(), &[(&h, USER, PASS)]);
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&creds)
    };

    // With the auth file: reads work.
    let good = Mount::builder()
        .insecure(&h)
        .authfile(&authfile)
        .env("RUST_LOG", "debug")
        .start();
    let tags = list(good.join(format!("{h}/private/app"))).expect("ls with credentials");
    assert_eq!(tags, strings(&["v1"]));
    assert_eq!(serde_json::json!(tags), oracle_tags["Tags"]);
    let manifest = read(good.join(format!("{h}/private/app/v1/manifest.json")))
        .expect("manifest with credentials");
    assert_eq!(manifest, oracle_manifest);
    read(good.join(format!("{h}/private/app/v1/config.json"))).expect("config with credentials");

    // With an empty auth file: EACCES, and a log line naming the registry
    // and the auth file.
    // At the default log level: the user must see why without debugging.
    let bad = Mount::builder().insecure(&h).start();
    assert_errno(
        list(bad.join(format!("{h}/private/app"))),
        EACCES,
        "ls without credentials",
    );
    assert_errno(
        read(bad.join(format!("{h}/private/app/v1/manifest.json"))),
        EACCES,
        "read manifest without credentials",
    );
    let authfile_path = bad.authfile_path().display().to_string();
    let named = wait_until(Duration::from_secs(3), || {
        bad.log()
            .lines()
            .any(|l| l.contains(&h) && l.contains(&authfile_path))
    });
    assert!(
        named,
        "no log line names both {h} and {authfile_path}:\n{}",
        bad.log()
    );

    // With wrong credentials: EACCES as well.
    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = write_authfile(wrong_dir.path(), &[(&h, USER, "not-the-password")]);
    let wrong_m = Mount::builder().insecure(&h).authfile(&wrong).start();
    assert_errno(
        read(wrong_m.join(format!("{h}/private/app/v1/manifest.json"))),
        EACCES,
        "read manifest with a wrong password",
    );
    drop(wrong_m);

    // The command line uses the same auth file.
    let cli = |auth: &Path| {
        apt_layer(
            &[
                "list-tags",
                "--insecure-registry",
                &h,
                "--authfile",
                &auth.display().to_string(),
                &format!("{h}/private/app"),
            ],
            Duration::from_secs(60),
        )
    };
    assert_eq!(cli(&authfile).json(), oracle_tags);
    let denied = cli(bad.authfile_path());
    assert!(
        !denied.status.success(),
        "list-tags without credentials must fail"
    );

    // The secret never reaches a log.
    for (name, log) in [
        ("good mount", good.log()),
        ("bad mount", bad.log()),
        ("cli", denied.stderr.clone()),
    ] {
        assert!(!log.contains(PASS), "{name} log contains the password");
        assert!(
            !log.contains(&b64),
            "{name} log contains the base64 credentials"
        );
    }
}

/// A registry with token auth, the bearer flow of Docker Hub, GHCR and
/// Quay, with the CNCF registry itself checking every token (signature,
/// issuer, audience, lifetime, granted actions): with credentials in the
/// auth file, the catalog and the tag list (our own requests), the
/// manifest and `rootfs/` (blobs through oci-client) read as skopeo and
/// umoci read them; without, `EACCES`. The token service saw the scopes.
#[test]
fn a_registry_with_bearer_token_auth_is_read_with_tokens() {
    require_env();
    const USER: &str = "bob";
    const PASS: &str = "Tk-51c0ffee-not-in-logs";
    let tokens = TokenService::start(USER, PASS);
    let reg = Registry::start_with_token(&tokens);
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let (layout, _) = push_two_layer_image(work.path(), &h, &["tok/app"], Some((USER, PASS)));
    let oracle = umoci_unpack(&layout_ref(&layout, "v1"), &work.path().join("bundle"));
    let creds = format!("{USER}:{PASS}");
    let oracle_manifest = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        "--creds",
        &creds,
        &format!("docker://{h}/tok/app:v1"),
    ]);
    // The registry refuses a request without a token.
    let anon = http("GET", &h, "/v2/tok/app/tags/list", &[], &[]).unwrap();
    assert_eq!(anon.status, 401, "the registry must demand a token");

    let authfile = write_authfile(work.path(), &[(&h, USER, PASS)]);
    let good = Mount::builder().insecure(&h).authfile(&authfile).start();
    let seen = tokens.asked().len();
    assert_eq!(
        list(good.join(&h)).expect("catalog with a token"),
        strings(&["tok"])
    );
    assert_eq!(
        list(good.join(format!("{h}/tok/app"))).expect("tags with a token"),
        strings(&["v1"])
    );
    assert_eq!(
        read(good.join(format!("{h}/tok/app/v1/manifest.json"))).expect("manifest with a token"),
        oracle_manifest
    );
    assert_trees_equal(
        &good.join(format!("{h}/tok/app/v1/rootfs")),
        &oracle,
        "rootfs through a token registry",
    );
    // The command line, with the same auth file, prints what skopeo does.
    let ours = apt_layer(
        &[
            "inspect",
            "--insecure-registry",
            &h,
            "--authfile",
            &authfile.display().to_string(),
            &format!("{h}/tok/app:v1"),
        ],
        Duration::from_secs(60),
    )
    .json();
    let oracle: Value = serde_json::from_slice(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{h}/tok/app:v1"),
    ]))
    .unwrap();
    assert_inspect_matches(
        &ours,
        &oracle,
        &oracle_manifest,
        "inspect through a token registry",
    );
    let asked = tokens.asked().split_off(seen);
    for scope in ["registry:catalog:*", "repository:tok/app:pull"] {
        assert!(
            asked.iter().any(|t| t.contains(scope)),
            "no token asked for {scope}: {asked:?}"
        );
    }

    // Without credentials the token grants nothing. To an anonymous
    // client, a token registry's refusal is also how it says "no such
    // repository" (Docker Hub), so the image is absent, with a log line.
    let bad = Mount::builder().insecure(&h).start();
    let tags = list(bad.join(format!("{h}/tok/app"))).unwrap_or_default();
    assert!(tags.is_empty(), "tags without credentials: {tags:?}");
    assert_errno(
        read(bad.join(format!("{h}/tok/app/v1/manifest.json"))),
        libc::ENOENT,
        "a manifest without credentials",
    );
    let said = wait_until(Duration::from_secs(3), || {
        bad.log().lines().any(|l| {
            l.contains(&h) && l.contains("tag list of tok/app") && l.contains("shown as absent")
        })
    });
    assert!(
        said,
        "no log line says why tok/app is absent:\n{}",
        bad.log()
    );
    for (name, log) in [("good mount", good.log()), ("bad mount", bad.log())] {
        assert!(!log.contains(PASS), "{name} log contains the password");
    }
}

/// Public images on a token registry, as on Docker Hub: without any
/// credentials the token service grants the pull of repositories (and no
/// catalog), and the tree reads them: tags, every tag file as skopeo reads
/// it, `rootfs/` through anonymous tokens the CNCF registry checks.
#[test]
fn a_public_token_registry_is_read_without_credentials() {
    require_env();
    const USER: &str = "carol";
    const PASS: &str = "Pub-0a1b2c-not-in-logs";
    let tokens = TokenService::start_public(USER, PASS);
    let reg = Registry::start_with_token(&tokens);
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let (layout, digest) =
        push_two_layer_image(work.path(), &h, &["library/app"], Some((USER, PASS)));
    let oracle = umoci_unpack(&layout_ref(&layout, "v1"), &work.path().join("bundle"));
    let m = Mount::builder().insecure(&h).start();
    // Anonymous: no catalog, as on Docker Hub.
    assert_eq!(list(m.join(&h)).expect("ls registry"), Vec::<String>::new());
    assert_eq!(
        list(m.join(format!("{h}/library/app"))).expect("tags, anonymously"),
        strings(&["v1"])
    );
    assert_eq!(
        read_string(m.join(format!("{h}/library/app/v1/digest"))).unwrap(),
        format!("{digest}\n")
    );
    // Every tag file against skopeo, itself anonymous here.
    check_tag(&m, &h, "library/app", "v1");
    assert_trees_equal(
        &m.join(format!("{h}/library/app/v1/rootfs")),
        &oracle,
        "rootfs of a public image on a token registry",
    );
}

/// Without a catalog (a token registry that grants anonymous pulls and no
/// catalog, as Docker Hub, ghcr.io and quay.io do), a name without tags is
/// a namespace only where it can be one. Below a repository it is an
/// unknown tag: `test -d app/$TAG` must not say yes. On Docker Hub
/// (`docker.io`, here sent to the test registry by a registries.conf
/// `location`), names are `<namespace>/<name>` and never deeper.
#[test]
fn unknown_tags_and_repositories_without_a_catalog_are_enoent() {
    require_env();
    const USER: &str = "dave";
    const PASS: &str = "Ns-5e6f7a-not-in-logs";
    let tokens = TokenService::start_public(USER, PASS);
    let reg = Registry::start_with_token(&tokens);
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let (_, digest) = push_two_layer_image(
        work.path(),
        &h,
        &["library/app", "org/team/app"],
        Some((USER, PASS)),
    );
    let conf = work.path().join("registries.conf");
    fs::write(
        &conf,
        format!("[[registry]]\nprefix = \"docker.io\"\nlocation = \"{h}\"\ninsecure = true\n"),
    )
    .unwrap();
    let m = Mount::builder().insecure(&h).registries_conf(&conf).start();
    assert_eq!(list(m.join(&h)).expect("ls registry"), Vec::<String>::new());

    // Any registry: a repository's unknown tags are absent, in any case.
    assert_eq!(
        list(m.join(format!("{h}/library/app"))).expect("tags"),
        strings(&["v1"])
    );
    for tag in ["v2", "NoSuchTag", "latest"] {
        let p = m.join(format!("{h}/library/app/{tag}"));
        assert_errno(stat(&p), ENOENT, &format!("stat unknown tag {tag}"));
        assert_errno(list(&p), ENOENT, &format!("ls unknown tag {tag}"));
        assert_errno(
            read(p.join("rootfs/etc/os-release")),
            ENOENT,
            &format!("a file below unknown tag {tag}"),
        );
    }
    // Namespaces still resolve, and a repository nested in one reads.
    assert!(stat(m.join(format!("{h}/org"))).unwrap().is_dir());
    assert!(stat(m.join(format!("{h}/org/team"))).unwrap().is_dir());
    assert_eq!(
        read_string(m.join(format!("{h}/org/team/app/v1/digest"))).unwrap(),
        format!("{digest}\n")
    );
    assert_errno(
        stat(m.join(format!("{h}/org/team/app/v2"))),
        ENOENT,
        "unknown tag of a nested repository",
    );

    // Docker Hub: one component is `library/<name>` or a namespace; two
    // are a repository or nothing.
    assert_eq!(
        list(m.join("docker.io/app")).expect("docker.io/app is library/app"),
        strings(&["v1"])
    );
    assert_eq!(
        read_string(m.join("docker.io/library/app/v1/digest")).unwrap(),
        format!("{digest}\n")
    );
    assert!(stat(m.join("docker.io/library")).unwrap().is_dir());
    assert!(stat(m.join("docker.io/someone")).unwrap().is_dir());
    for path in [
        "docker.io/library/nosuch",
        "docker.io/someone/nosuch",
        "docker.io/app/v2",
        "docker.io/library/app/v2",
    ] {
        assert_errno(stat(m.join(path)), ENOENT, path);
    }
    assert_errno(
        read(m.join("docker.io/library/nosuch/latest/rootfs/bin/sh")),
        ENOENT,
        "a file below an unknown Docker Hub repository",
    );
}

// ---------------------------------------------------------------------------
// Mirrors (registries.conf v2)
// ---------------------------------------------------------------------------

#[test]
fn mirror_serves_image_reads_tags_come_from_primary() {
    require_env();
    let primary = Registry::start();
    let p = primary.host();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{p}/mirrored/app:t1"), Format::Oci);
    let mirror = Registry::start_proxy(&primary.url());
    let conf = work.path().join("registries.conf");
    fs::write(
        &conf,
        format!(
            "[[registry]]\nlocation = \"{p}\"\ninsecure = true\n\n\
             [[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
            mirror.host()
        ),
    )
    .unwrap();
    let m = Mount::builder().registries_conf(&conf).start();
    assert!(
        list(m.path()).unwrap().contains(&p),
        "registries.conf registry not listed at the top"
    );

    let (p0, m0) = (primary.log_len(), mirror.log_len());
    let tags = list(m.join(format!("{p}/mirrored/app"))).expect("ls through registries.conf");
    assert_eq!(tags, skopeo_tags(&format!("{p}/mirrored/app")));
    let primary_reqs = primary.requests_since(p0);
    assert!(
        primary_reqs
            .iter()
            .any(|r| r.starts_with("GET /v2/mirrored/app/tags/list")),
        "tag list not read from the primary: {primary_reqs:?}"
    );
    let mirror_reqs = mirror.requests_since(m0);
    assert!(
        !mirror_reqs.iter().any(|r| r.contains("/tags/list")),
        "tag list must not come from the mirror: {mirror_reqs:?}"
    );

    let m1 = mirror.log_len();
    let manifest = read(m.join(format!("{p}/mirrored/app/t1/manifest.json")))
        .expect("manifest through mirror");
    assert_eq!(
        manifest,
        skopeo_raw_manifest(&format!("{p}/mirrored/app:t1"))
    );
    read(m.join(format!("{p}/mirrored/app/t1/config.json"))).expect("config through mirror");
    let mirror_reqs = mirror.requests_since(m1);
    assert!(
        mirror_reqs
            .iter()
            .any(|r| r.starts_with("GET /v2/mirrored/app/manifests/")),
        "no manifest GET at the mirror: {mirror_reqs:?}"
    );
    assert!(
        mirror_reqs
            .iter()
            .any(|r| r.starts_with("GET /v2/mirrored/app/blobs/sha256:")),
        "config blob not read from the mirror: {mirror_reqs:?}"
    );
}

// ---------------------------------------------------------------------------
// Errors users see
// ---------------------------------------------------------------------------

#[test]
fn an_unconfigured_registry_that_is_down_is_eio_not_enoent() {
    // Its name resolves, so it is a registry that does not answer, not an
    // unknown host (that one stays ENOENT, above).
    require_env();
    let reg = Registry::start();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{}/app:t1", reg.host()), Format::Oci);
    let mut m = Mount::start(&[&reg.host()]);
    let down = format!("127.0.0.1:{}", free_port());
    assert_errno(
        list(m.join(&down)),
        EIO,
        "ls an unconfigured registry that is down",
    );
    assert_log_says(&m, "cannot connect");
    assert_still_serves(&mut m, &reg.host(), "app", "t1");
}

#[test]
fn unknown_registry_repository_and_tag_are_enoent() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{h}/app:t1"), Format::Oci);
    let mut m = Mount::start(&[&h]);

    // Not a registry name (no dot, no port, not localhost).
    assert_errno(
        stat(m.join("notaregistry")),
        ENOENT,
        "stat MNT/notaregistry",
    );
    assert_errno(list(m.join("notaregistry")), ENOENT, "ls MNT/notaregistry");
    // A registry name whose host does not exist.
    assert_errno(
        read(m.join("no-such-registry.invalid/app/Latest/manifest.json")),
        ENOENT,
        "unknown registry host",
    );

    // Unknown tags of an existing repository. Upper case can only be a
    // tag, never a repository path component.
    assert_errno(
        stat(m.join(format!("{h}/app/NoSuchTag"))),
        ENOENT,
        "stat unknown tag",
    );
    assert_errno(
        read(m.join(format!("{h}/app/NoSuchTag/manifest.json"))),
        ENOENT,
        "read unknown tag",
    );
    assert_errno(
        read(m.join(format!("{h}/app/nosuchtag/manifest.json"))),
        ENOENT,
        "read unknown lower-case tag",
    );
    assert_errno(
        read(m.join(format!("{h}/app/@sha256:{}/manifest.json", "0".repeat(64)))),
        ENOENT,
        "unknown digest",
    );
    assert_errno(
        stat(m.join(format!("{h}/app/t1/nosuchfile"))),
        ENOENT,
        "unknown file in a tag dir",
    );

    // Unknown repository: nothing to list, nothing to read.
    match list(m.join(format!("{h}/nosuchrepo"))) {
        Ok(names) => assert!(names.is_empty(), "unknown repository lists {names:?}"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(ENOENT),
            "ls unknown repository: {e:?}"
        ),
    }
    assert_errno(
        stat(m.join(format!("{h}/nosuchrepo/Latest"))),
        ENOENT,
        "tag of an unknown repository",
    );
    assert_errno(
        read(m.join(format!("{h}/nosuchrepo/latest/manifest.json"))),
        ENOENT,
        "manifest of an unknown repository",
    );
    assert_still_serves(&mut m, &h, "app", "t1");
}

#[test]
fn ro_option_mounts_a_read_only_superblock_without_outbox() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{h}/app:t1"), Format::Oci);
    let m = Mount::builder().insecure(&h).option("ro").start();
    let opts = mount_options(m.path()).expect("mount listed in mountinfo");
    assert!(
        opts.first().map(String::as_str) == Some("ro"),
        "mount options {opts:?}"
    );
    assert_eq!(list(m.path()).expect("ls MNT"), vec![h.clone()]);
    let tag = m.join(format!("{h}/app/t1"));
    let manifest = read(tag.join("manifest.json")).expect("read manifest");
    assert_eq!(
        read_string(tag.join("digest")).unwrap().trim(),
        sha256_digest(&manifest)
    );
    let out = m.join("outbox");
    assert_errno(
        within(FS_GUARD, "mkdir outbox", move || fs::create_dir(&out)),
        EROFS,
        "mkdir MNT/outbox",
    );
}

#[test]
fn ioctls_are_enotty_and_calls_not_offered_leave_no_warning() {
    use std::os::fd::AsRawFd;
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    let dest = format!("{h}/app:t1");
    push_simple(work.path(), &dest, Format::Oci);
    let m = Mount::start(&[&h]);
    let tag = m.join(format!("{h}/app/t1"));
    let want = format!("hello from {dest}\n");
    for (path, len) in [
        (tag.join("manifest.json"), None),
        (tag.join("rootfs/etc/hello"), Some(want.len() as i64)),
    ] {
        let res = within(FS_GUARD, "open and probe", move || {
            let f = fs::File::open(&path)?;
            let mut tio = std::mem::MaybeUninit::<libc::termios>::uninit();
            // SAFETY: TCGETS writes at most one termios into `tio`.
            let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, tio.as_mut_ptr()) };
            let tty = if rc == 0 { 0 } else { io_errno() };
            // SAFETY: plain lseek on an open descriptor.
            let hole = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
            Ok::<_, std::io::Error>((tty, hole, fs::metadata(&path)?.len() as i64))
        })
        .expect("open the file");
        assert_eq!(
            res.0,
            libc::ENOTTY,
            "isatty() on a file here: {}",
            errno_name(res.0)
        );
        assert_eq!(res.1, res.2, "SEEK_HOLE is the end of a file without holes");
        if let Some(len) = len {
            assert_eq!(res.2, len);
        }
    }
    assert!(
        !m.log().contains("Not Implemented"),
        "fuser's default warnings in the daemon log:\n{}",
        tail(&m.log(), 20)
    );
}

fn io_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[test]
fn writes_outside_outbox_are_erofs() {
    require_env();
    let reg = Registry::start();
    let h = reg.host();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{h}/app:t1"), Format::Oci);
    let m = Mount::start(&[&h]);
    let tag = m.join(format!("{h}/app/t1"));
    let manifest = read(tag.join("manifest.json")).expect("read manifest");

    let attempt = |what: &str, f: Box<dyn FnOnce() -> std::io::Result<()> + Send>| {
        let r = within(FS_GUARD, what, f);
        assert_errno(r, EROFS, what);
    };
    let p = |rel: &str| m.join(rel);
    let (a, b, c, d) = (
        p("newfile"),
        p(&format!("{h}/NewFile")),
        tag.join("newfile"),
        tag.join("manifest.json"),
    );
    attempt(
        "create MNT/newfile",
        Box::new(move || fs::File::create(&a).map(drop)),
    );
    attempt(
        "create MNT/HOST/NewFile",
        Box::new(move || fs::File::create(&b).map(drop)),
    );
    attempt(
        "create in a tag dir",
        Box::new(move || fs::File::create(&c).map(drop)),
    );
    let d2 = d.clone();
    attempt(
        "open manifest.json for writing",
        Box::new(move || fs::OpenOptions::new().write(true).open(&d2).map(drop)),
    );
    let d3 = d.clone();
    attempt(
        "truncate manifest.json",
        Box::new(move || {
            fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&d3)
                .map(drop)
        }),
    );
    let d4 = d.clone();
    attempt(
        "unlink manifest.json",
        Box::new(move || fs::remove_file(&d4)),
    );
    let (d5, e) = (d.clone(), tag.join("renamed.json"));
    attempt(
        "rename manifest.json",
        Box::new(move || fs::rename(&d5, &e)),
    );
    let d6 = d.clone();
    attempt(
        "chmod manifest.json",
        Box::new(move || {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&d6, fs::Permissions::from_mode(0o666))
        }),
    );
    let (f, g) = (tag.join("newdir"), m.join(format!("{h}/app/NewTag")));
    attempt("mkdir in a tag dir", Box::new(move || fs::create_dir(&f)));
    attempt(
        "mkdir in a repository",
        Box::new(move || fs::create_dir(&g)),
    );
    let r = tag.clone();
    attempt("rmdir a tag", Box::new(move || fs::remove_dir(&r)));

    // The other ways to make a name, and writes of metadata.
    let (s1, s2) = (m.join("newlink"), tag.join("newlink"));
    attempt(
        "symlink at the top",
        Box::new(move || std::os::unix::fs::symlink("/etc", &s1)),
    );
    let (l1, l2) = (d.clone(), tag.join("linked.json"));
    attempt(
        "hard link of manifest.json",
        Box::new(move || fs::hard_link(&l1, &l2)),
    );
    attempt("mkfifo in a tag dir", Box::new(move || mkfifo(&s2)));
    let x = d.clone();
    attempt(
        "setxattr on manifest.json",
        Box::new(move || set_user_xattr(&x)),
    );

    // rootfs/ is the image: read-only too.
    let root = tag.join("rootfs");
    assert!(!read(root.join("etc/hello")).unwrap().is_empty());
    let paths = [
        root.join("etc/hello"),
        root.join("etc/new"),
        root.join("etc/newdir"),
        root.join("etc/newlink"),
    ];
    let [hello, new, newdir, newlink] = paths;
    let h1 = hello.clone();
    attempt(
        "open a rootfs file for writing",
        Box::new(move || fs::OpenOptions::new().append(true).open(&h1).map(drop)),
    );
    attempt(
        "create in rootfs",
        Box::new(move || fs::File::create(&new).map(drop)),
    );
    attempt("mkdir in rootfs", Box::new(move || fs::create_dir(&newdir)));
    attempt(
        "symlink in rootfs",
        Box::new(move || std::os::unix::fs::symlink("hello", &newlink)),
    );
    let h2 = hello.clone();
    attempt("unlink in rootfs", Box::new(move || fs::remove_file(&h2)));
    let h3 = hello.clone();
    attempt(
        "chmod in rootfs",
        Box::new(move || {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&h3, fs::Permissions::from_mode(0o777))
        }),
    );
    let h4 = hello.clone();
    attempt("setxattr in rootfs", Box::new(move || set_user_xattr(&h4)));

    assert_eq!(
        read(tag.join("manifest.json")).unwrap(),
        manifest,
        "manifest changed"
    );
}

fn mkfifo(p: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o644) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn set_user_xattr(p: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let (name, value) = (c"user.apt-layer-test", b"1");
    // SAFETY: valid NUL-terminated path and name; value and its length agree.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn registry_down_gives_eio_while_cache_and_other_registries_answer() {
    require_env();
    let mut r1 = Registry::start();
    let r2 = Registry::start();
    let (h1, h2) = (r1.host(), r2.host());
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{h1}/app:t1"), Format::Oci);
    push_simple(work.path(), &format!("{h1}/app:t2"), Format::Oci);
    push_simple(work.path(), &format!("{h2}/other:t1"), Format::Oci);
    let t2_raw = skopeo_raw_manifest(&format!("{h1}/app:t2"));
    let other_raw = skopeo_raw_manifest(&format!("{h2}/other:t1"));

    let mut m = Mount::builder()
        .insecure(&h1)
        .insecure(&h2)
        .timeout(3)
        .tag_ttl(600)
        .start();
    let t1 = read(m.join(format!("{h1}/app/t1/manifest.json"))).expect("t1 manifest");
    let t1_config = read(m.join(format!("{h1}/app/t1/config.json"))).expect("t1 config");
    let t1_hex = sha256_hex(&t1);

    r1.stop();
    let t2 = m.join(format!("{h1}/app/t2/manifest.json"));
    let (res, took) = timed_within(
        Duration::from_secs(60),
        "read t2 with its registry down",
        move || fs::read(&t2),
    );
    assert_errno(res, EIO, "not-yet-cached tag of a stopped registry");
    assert!(took < Duration::from_secs(20), "EIO took {took:?}");

    // What was read before still answers, by tag and by digest.
    assert_eq!(
        read(m.join(format!("{h1}/app/t1/manifest.json"))).expect("cached t1"),
        t1
    );
    assert_eq!(
        read(m.join(format!("{h1}/app/t1/config.json"))).expect("cached t1 config"),
        t1_config
    );
    assert_eq!(
        read(m.join(format!("{h1}/app/@sha256:{t1_hex}/manifest.json"))).expect("cached by digest"),
        t1
    );

    // Other registries are unaffected.
    let p = m.join(format!("{h2}/other"));
    let (tags, took) = timed_within(Duration::from_secs(30), "ls other registry", move || {
        list_now(&p)
    });
    assert_eq!(tags.expect("ls other registry"), strings(&["t1"]));
    assert!(
        took < Duration::from_secs(2),
        "other registry answered in {took:?}"
    );
    assert_eq!(
        read(m.join(format!("{h2}/other/t1/manifest.json"))).unwrap(),
        other_raw
    );

    // An error is not remembered: once the registry is back, t2 reads.
    r1.restart();
    let t2 = m.join(format!("{h1}/app/t2/manifest.json"));
    let back = wait_until(Duration::from_secs(10), || {
        read(&t2).ok().as_deref() == Some(&t2_raw[..])
    });
    assert!(
        back,
        "t2 still unreadable 10 s after the registry came back: {:?}",
        read(&t2).err()
    );
    assert!(m.is_running());
}

#[test]
fn stalled_registry_does_not_block_the_rest_of_the_tree() {
    let (real, fault, mut m, _work) = fault_fixture(|_, _| FaultReply::Stall);
    let stall = m.join(format!("{}/repo", fault.host()));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let start = Instant::now();
        let r = list_now(&stall);
        let _ = tx.send((r, start.elapsed()));
    });
    assert!(
        wait_until(Duration::from_secs(5), || !fault.requests().is_empty()),
        "the stalled registry was never asked"
    );
    thread::sleep(Duration::from_millis(300));

    let real_repo = m.join(format!("{}/app", real.host()));
    let (tags, took) = timed_within(
        Duration::from_secs(30),
        "ls real repository during a stall",
        move || list_now(&real_repo),
    );
    assert_eq!(tags.expect("ls real repository"), strings(&["t1"]));
    assert!(
        took < Duration::from_secs(2),
        "real registry answered in {took:?} while another stalls"
    );
    let manifest = m.join(format!("{}/app/t1/manifest.json", real.host()));
    let (bytes, took) = timed_within(
        Duration::from_secs(30),
        "read real manifest during a stall",
        move || fs::read(&manifest),
    );
    assert_eq!(
        bytes.unwrap(),
        skopeo_raw_manifest(&format!("{}/app:t1", real.host()))
    );
    assert!(
        took < Duration::from_secs(2),
        "real manifest read in {took:?} while another registry stalls"
    );
    let (top, took) = timed_within(Duration::from_secs(30), "ls MNT during a stall", {
        let p = m.path().to_path_buf();
        move || list_now(&p)
    });
    assert!(top.unwrap().contains(&real.host()));
    assert!(took < Duration::from_secs(2), "ls MNT took {took:?}");

    let (res, took) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("ls of the stalled registry hangs (no EIO after 30 s with -o timeout=3)");
    assert_errno(res, EIO, "ls of a stalled registry");
    assert!(took < Duration::from_secs(20), "EIO after {took:?}");
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

// ---------------------------------------------------------------------------
// Bad input from a registry (FaultServer)
// ---------------------------------------------------------------------------

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[test]
fn malformed_manifest_is_eio_and_daemon_survives() {
    let (real, fault, mut m, _work) = fault_fixture(|_, target| {
        let (path, _) = split_target(target);
        let body: &[u8] = if path.starts_with("/v2/notjson/") {
            b"this is { not json"
        } else if path.starts_with("/v2/notmanifest/") {
            br#"{"schemaVersion":2,"config":"nope","layers":17}"#
        } else {
            return FaultReply::Default;
        };
        let name = path.split('/').nth(2).unwrap();
        if path.ends_with("/tags/list") {
            FaultReply::json(200, &format!(r#"{{"name":"{name}","tags":["latest"]}}"#))
        } else if path.contains("/manifests/") {
            FaultReply::bytes(200, OCI_MANIFEST, body.to_vec())
                .with_header("Docker-Content-Digest", &sha256_digest(body))
        } else {
            FaultReply::Default
        }
    });
    let f = fault.host();
    for repo in ["notjson", "notmanifest"] {
        assert_eq!(
            list(m.join(format!("{f}/{repo}"))).expect("ls"),
            strings(&["latest"])
        );
        for file in ["manifest.json", "config.json", "inspect.json"] {
            assert_errno(
                read(m.join(format!("{f}/{repo}/latest/{file}"))),
                EIO,
                &format!("{repo}: read {file}"),
            );
        }
    }
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

/// A config whose descriptor understates its size: `stat` shows the
/// descriptor's size and the kernel reads no further, so serving it would
/// cut the JSON. EIO with a log line instead.
#[test]
fn config_longer_than_its_descriptor_says_is_eio() {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cdigest = sha256_digest(config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cdigest}","size":{}}},"layers":[]}}"#,
        config.len() - 10
    );
    let mdigest = sha256_digest(manifest.as_bytes());
    let (real, fault, mut m, _work) = fault_fixture(move |_, target| {
        let (path, _) = split_target(target);
        if path == "/v2/cfgsize/tags/list" {
            FaultReply::json(200, r#"{"name":"cfgsize","tags":["t1"]}"#)
        } else if path.starts_with("/v2/cfgsize/manifests/") {
            FaultReply::bytes(200, OCI_MANIFEST, manifest.clone().into_bytes())
                .with_header("Docker-Content-Digest", &mdigest)
        } else if path == format!("/v2/cfgsize/blobs/{cdigest}") {
            FaultReply::bytes(200, "application/octet-stream", config.to_vec())
        } else {
            FaultReply::Default
        }
    });
    let tag = m.join(format!("{}/cfgsize/t1", fault.host()));
    assert_eq!(
        stat(tag.join("config.json")).unwrap().len(),
        config.len() as u64 - 10
    );
    assert_errno(read(tag.join("config.json")), EIO, "config of another size");
    assert_log_says(&m, "its descriptor says");
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

#[test]
fn manifest_not_matching_its_digest_is_eio() {
    require_env();
    // The real image's manifest, served for a digest it does not have.
    let real = Registry::start();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{}/app:t1", real.host()), Format::Oci);
    let (good, ct) = get_manifest(&real.host(), "app", "t1", None);
    let mut other = good.clone();
    other.push(b'\n');
    let claimed = sha256_digest(&other);
    let actual = sha256_digest(&good);
    let (good2, claimed2) = (good.clone(), claimed.clone());
    let fault = FaultServer::start(move |_, target| {
        let (path, _) = split_target(target);
        if path == "/v2/lie/tags/list" {
            FaultReply::json(200, r#"{"name":"lie","tags":["t1"]}"#)
        } else if path.starts_with("/v2/lie/manifests/") {
            FaultReply::bytes(200, &ct, good2.clone())
                .with_header("Docker-Content-Digest", &claimed2)
        } else {
            FaultReply::Default
        }
    });
    let mut m = Mount::builder()
        .insecure(&real.host())
        .insecure(&fault.host())
        .timeout(3)
        .start();
    let pinned = m.join(format!("{}/lie/@{claimed}/manifest.json", fault.host()));
    assert_errno(
        read(&pinned),
        EIO,
        "manifest whose bytes do not match the requested digest",
    );
    let claimed_hex = claimed.trim_start_matches("sha256:").to_string();
    let actual_hex = actual.trim_start_matches("sha256:").to_string();
    assert!(
        wait_until(Duration::from_secs(3), || {
            m.log()
                .lines()
                .any(|l| l.contains(&claimed_hex) && l.contains(&actual_hex))
        }),
        "no log line with both digests ({claimed} expected, {actual} got):\n{}",
        m.log()
    );
    // Nothing was cached: still EIO.
    assert_errno(read(&pinned), EIO, "second read of the bad manifest");
    // By tag, the bytes must hash to the digest the registry says it sent.
    assert_errno(
        read(m.join(format!("{}/lie/t1/manifest.json", fault.host()))),
        EIO,
        "manifest by tag that does not match its Docker-Content-Digest",
    );
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

#[test]
fn a_registry_that_refuses_head_of_manifests_still_has_its_tags_refreshed() {
    // Tags seen before are asked again by HEAD; a registry that answers
    // HEAD with 405 gets the GET by tag instead of failing the tag.
    require_env();
    let real = Registry::start();
    let work = tempfile::tempdir().unwrap();
    push_simple(work.path(), &format!("{}/app:t1", real.host()), Format::Oci);
    let (good, ct) = get_manifest(&real.host(), "app", "t1", None);
    let body = good.clone();
    let fault = FaultServer::start(move |method, target| {
        let (path, _) = split_target(target);
        if path == "/v2/nohead/tags/list" {
            FaultReply::json(200, r#"{"name":"nohead","tags":["t1"]}"#)
        } else if path == "/v2/nohead/manifests/t1" && method == "HEAD" {
            FaultReply::json(
                405,
                r#"{"errors":[{"code":"UNSUPPORTED","message":"no HEAD"}]}"#,
            )
        } else if path == "/v2/nohead/manifests/t1" {
            FaultReply::bytes(200, &ct, body.clone())
        } else {
            FaultReply::Default
        }
    });
    let m = Mount::builder()
        .insecure(&fault.host())
        .tag_ttl(1)
        .timeout(3)
        .start();
    let file = m.join(format!("{}/nohead/t1/manifest.json", fault.host()));
    assert_eq!(read(&file).expect("first read"), good);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(read(&file).expect("read after tag_ttl"), good);
    let gets = fault
        .requests()
        .iter()
        .filter(|(m, t)| m == "GET" && t == "/v2/nohead/manifests/t1")
        .count();
    assert!(
        fault.count("/v2/nohead/manifests/t1") > gets,
        "the tag was not asked by HEAD: {:?}",
        fault.requests()
    );
    assert_eq!(gets, 2, "{:?}", fault.requests());
}

#[test]
fn an_oversized_manifest_is_refused_before_it_is_read() {
    // A manifest that says it is 64 MiB and sends 1 MiB of it: refused at
    // its Content-Length, not read (and held) until the timeout.
    let body = vec![b' '; 64 << 20];
    let gate = Gate::default();
    let g = gate.clone();
    let (real, fault, mut m, _work) = fault_fixture(move |_, target| {
        let (path, _) = split_target(target);
        if path == "/v2/big/tags/list" {
            FaultReply::json(200, r#"{"name":"big","tags":["t1"]}"#)
        } else if path.starts_with("/v2/big/manifests/") {
            FaultReply::Trickle {
                headers: vec![(
                    "Content-Type".into(),
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                body: body.clone(),
                first: 1 << 20,
                gate: g.clone(),
            }
        } else {
            FaultReply::Default
        }
    });
    assert_errno(
        read(m.join(format!("{}/big/t1/manifest.json", fault.host()))),
        EIO,
        "read a 64 MiB manifest",
    );
    assert_log_says(&m, "larger than 16 MiB");
    gate.open();
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

/// A registry that answers 403 DENIED (a token without the scope, a
/// repository the account may not read): EACCES, not ENOENT or EIO.
#[test]
fn denied_by_the_registry_is_eacces() {
    let (real, fault, mut m, _work) = fault_fixture(|_, target| {
        if split_target(target).0.starts_with("/v2/secret/") {
            FaultReply::json(
                403,
                r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#,
            )
        } else {
            FaultReply::Default
        }
    });
    let f = fault.host();
    assert_errno(
        list(m.join(format!("{f}/secret"))),
        EACCES,
        "ls a denied repository",
    );
    assert_errno(
        read(m.join(format!("{f}/secret/v1/manifest.json"))),
        EACCES,
        "read a denied manifest",
    );
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

#[test]
fn null_tag_list_is_an_empty_directory() {
    let (real, fault, mut m, _work) = fault_fixture(|_, target| {
        if split_target(target).0 == "/v2/nulltags/tags/list" {
            FaultReply::json(200, r#"{"name":"nulltags","tags":null}"#)
        } else {
            FaultReply::Default
        }
    });
    let listed = list(m.join(format!("{}/nulltags", fault.host())))
        .expect("ls a repository with tags: null");
    assert!(listed.is_empty(), "tags: null lists {listed:?}");
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

/// A tag list with names no path can have (`a/b`, empty, over 255 bytes)
/// lists the valid tags; without the filter the kernel failed the whole
/// listing with EIO.
#[test]
fn invalid_tag_names_are_left_out_of_the_listing() {
    let (real, fault, mut m, _work) = fault_fixture(|_, target| {
        if split_target(target).0 == "/v2/oddtags/tags/list" {
            let long = "x".repeat(300);
            FaultReply::json(
                200,
                &serde_json::json!({"name": "oddtags", "tags": ["v1", "a/b", "", long, "..", "v2"]})
                    .to_string(),
            )
        } else {
            FaultReply::Default
        }
    });
    let mut listed = list(m.join(format!("{}/oddtags", fault.host())))
        .expect("ls a repository whose tag list has invalid names");
    listed.sort();
    assert_eq!(listed, ["v1", "v2"]);
    assert_log_says(&m, "invalid names");
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}

#[test]
fn endless_tag_pagination_is_bounded() {
    let (real, fault, mut m, _work) = fault_fixture(|_, target| {
        let (path, q) = split_target(target);
        if path != "/v2/endless/tags/list" {
            return FaultReply::Default;
        }
        // Always 10 new tags and a next link, forever.
        let start: u64 = q
            .get("last")
            .and_then(|l| l.trim_start_matches('t').parse::<u64>().ok())
            .map(|n| n + 1)
            .unwrap_or(0);
        let tags: Vec<String> = (start..start + 10).map(|i| format!("t{i:09}")).collect();
        let last = tags.last().unwrap().clone();
        FaultReply::json(
            200,
            &serde_json::json!({"name": "endless", "tags": tags}).to_string(),
        )
        .with_header(
            "Link",
            &format!("</v2/endless/tags/list?last={last}&n=10>; rel=\"next\""),
        )
    });
    let p = m.join(format!("{}/endless", fault.host()));
    let (res, took) = timed_within(
        Duration::from_secs(90),
        "ls endlessly paginated tags",
        move || list_now(&p),
    );
    assert!(
        took < Duration::from_secs(30),
        "endless pagination took {took:?}"
    );
    match res {
        Ok(tags) => assert!(tags.iter().all(|t| t.starts_with('t')), "odd tags listed"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(EIO), "endless pagination: {e:?}"),
    }
    // No paging goes on behind the user's back.
    thread::sleep(Duration::from_secs(1));
    let before = fault.count("/v2/endless/tags/list");
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fault.count("/v2/endless/tags/list"),
        before,
        "the daemon keeps paging after answering"
    );
    assert_still_serves(&mut m, &real.host(), "app", "t1");
}
