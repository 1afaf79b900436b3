//! Lazy layers (DESIGN.md §2, issue 5): eStargz and zstd:chunked images
//! made by containerd's own converter (`ctr-remote image convert`, run
//! against a private containerd), served through a real FUSE mount.
//!
//! - the merged tree equals `umoci unpack` of the ORIGINAL image;
//! - reading one file fetches a small fraction of the layer (bytes counted
//!   from the registry's access log);
//! - the prefetch landmark's region arrives in one background request;
//! - a TOC or chunk that fails its digest is EIO with nothing cached;
//! - a registry that ignores Range gets the layer streamed, with a log
//!   line saying why;
//! - a restart keeps the TOC and what was fetched;
//! - a lazy index (checked only against a manifest's TOC pin) never serves
//!   another descriptor of the same layer digest that does not carry that
//!   pin, in memory or after a restart.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("apt-layer-lazy-")
        .tempdir()
        .unwrap()
}

fn rootfs(m: &Mount, host: &str, repo: &str, tag: &str) -> PathBuf {
    m.join(format!("{host}/{repo}/{tag}/rootfs"))
}

fn status(m: &Mount, host: &str, repo: &str, tag: &str) -> Value {
    let s = read(m.join(format!("{host}/{repo}/{tag}/status"))).unwrap();
    serde_json::from_slice(&s).unwrap()
}

/// Pushes `layout:tag` as `HOST/REPO:orig` and converts it to `kind` as
/// `HOST/REPO:<kind>`; returns that tag.
fn push_converted(
    ctd: &Containerd,
    reg: &Registry,
    layout: &Path,
    tag: &str,
    repo: &str,
    kind: Seekable,
    record: Option<&Path>,
) -> String {
    let h = reg.host();
    push(
        &layout_ref(layout, tag),
        &format!("{h}/{repo}:orig"),
        Format::Oci,
    );
    let dst = match kind {
        Seekable::Estargz => "esgz",
        Seekable::ZstdChunked => "zstdchunked",
    };
    ctd.convert_and_push(
        &format!("{h}/{repo}:orig"),
        &format!("{h}/{repo}:{dst}"),
        kind,
        record,
    );
    for l in manifest_layers(&h, repo, dst) {
        let a = &l["annotations"];
        match kind {
            Seekable::Estargz => assert!(
                a["containerd.io/snapshot/stargz/toc.digest"].is_string(),
                "not eStargz: {l}"
            ),
            Seekable::ZstdChunked => assert!(
                a["io.containers.zstd-chunked.manifest-position"].is_string(),
                "not zstd:chunked: {l}"
            ),
        }
    }
    dst.to_string()
}

// The edge-case image
// ---------------------------------------------------------------------------

/// The shared edge-case recipe (tests/common/edge.rs) less what a TOC
/// cannot carry: a PAX mtime with a fraction. The eStargz writer rounds TOC
/// modtimes to whole seconds (1600000000.75 becomes ...01), so a lazy tree
/// cannot equal umoci's for it.
fn edge_layers() -> Vec<Vec<TarEntry>> {
    let mut layers = common::edge::edge_layers();
    for l in &mut layers {
        l.retain(|e| e.path != b"pax/frac-mtime");
    }
    layers
}

// ---------------------------------------------------------------------------
// The tree
// ---------------------------------------------------------------------------

/// Both converted forms of the edge-case image read lazily and equal
/// `umoci unpack` of the original.
#[test]
fn converted_edge_image_equals_umoci_unpack_of_the_original() {
    require_env();
    let work = tempdir();
    let layout = make_tar_image(work.path(), "edge", &edge_layers());
    let oracle = umoci_unpack(&layout_ref(&layout, "edge"), &work.path().join("bundle"));
    let reg = Registry::start();
    let ctd = Containerd::start();
    let h = reg.host();
    let m = Mount::builder().insecure(&h).start();
    for kind in [Seekable::Estargz, Seekable::ZstdChunked] {
        let repo = format!("edge/{}", kind.flag().trim_start_matches("--"));
        let tag = push_converted(&ctd, &reg, &layout, "edge", &repo, kind, None);
        let since = m.log().len();
        assert_trees_equal(&rootfs(&m, &h, &repo, &tag), &oracle, kind.mode());
        wait_ready(&m, &h, &repo, &tag);
        // Layer 1 has a name that is not UTF-8: its TOC (JSON) holds U+FFFD
        // instead, so that layer is streamed, and the log says why.
        let s = status(&m, &h, &repo, &tag);
        let modes: Vec<&str> = s["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mode"].as_str().unwrap())
            .collect();
        // Streamed, with a span index when the layer is gzip (eStargz).
        let fallback = match kind {
            Seekable::Estargz => "span-index",
            Seekable::ZstdChunked => "streamed",
        };
        assert_eq!(modes, [fallback, kind.mode(), kind.mode()], "{s}");
        let log = m.log()[since..].to_string();
        assert!(
            log.contains("cannot represent") && log.contains("streaming it instead"),
            "no fallback reason in the log:\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------
// Laziness, counted in the registry's access log
// ---------------------------------------------------------------------------

/// One layer of `n` files of `size` random bytes (so nothing compresses
/// away) under a few directories.
fn many_files(n: usize, size: usize) -> Vec<Vec<TarEntry>> {
    let mut l = vec![TarEntry::dir("./"), TarEntry::dir("data/")];
    for d in 0..8 {
        l.push(TarEntry::dir(format!("data/d{d}/")));
    }
    for i in 0..n {
        l.push(TarEntry::file(
            format!("data/d{}/f{i:04}", i % 8),
            pseudo_random(1000 + i as u64, size),
        ));
    }
    l.push(TarEntry::dir("etc/"));
    l.push(TarEntry::file("etc/small", "a small file\n"));
    vec![l]
}

fn file_content(i: usize, size: usize) -> Vec<u8> {
    pseudo_random(1000 + i as u64, size)
}

/// Reading one file of a 10 MB layer fetches the TOC and that file: a
/// small fraction of the layer, counted by the registry; `status` counts
/// the same bytes.
#[test]
fn reading_one_file_fetches_a_small_fraction_of_the_layer() {
    require_env();
    let work = tempdir();
    let (n, size) = (320, 32 << 10);
    let layout = make_tar_image(work.path(), "many", &many_files(n, size));
    let reg = Registry::start();
    let ctd = Containerd::start();
    let h = reg.host();
    for kind in [Seekable::Estargz, Seekable::ZstdChunked] {
        let repo = format!("many/{}", kind.flag().trim_start_matches("--"));
        let tag = push_converted(&ctd, &reg, &layout, "many", &repo, kind, None);
        let layer = manifest_layers(&h, &repo, &tag).remove(0);
        let digest = layer["digest"].as_str().unwrap().to_string();
        let layer_size = layer["size"].as_u64().unwrap();
        assert!(layer_size > 9 << 20, "{layer}");
        let m = Mount::builder().insecure(&h).option("nobackground").start();
        registry_log_barrier(&reg);
        let since = reg.log_len();
        let root = rootfs(&m, &h, &repo, &tag);
        assert_eq!(list(root.join("data/d3")).unwrap().len(), n / 8);
        let got = read(root.join("data/d3/f0123")).unwrap();
        assert!(got == file_content(123, size), "{kind:?}: wrong content");
        registry_log_barrier(&reg);
        let (bytes, requests) = blob_bytes_since(&reg, since, &digest);
        eprintln!(
            "{kind:?}: {bytes} of {layer_size} bytes in {requests} requests for one {size}-byte file"
        );
        assert!(
            bytes < layer_size / 20 && bytes >= size as u64,
            "{kind:?}: {bytes} of {layer_size} bytes fetched"
        );
        let s = status(&m, &h, &repo, &tag);
        let l = &s["layers"][0];
        assert_eq!(l["mode"], kind.mode(), "{s}");
        assert_eq!(l["read"], "lazy", "{s}");
        assert_eq!(l["bytes_fetched"], bytes, "{s}");
        // Reading it again costs nothing.
        let since = reg.log_len();
        drop_caches();
        assert!(read(root.join("data/d3/f0123")).unwrap() == got);
        registry_log_barrier(&reg);
        assert_eq!(blob_bytes_since(&reg, since, &digest).1, 0);
    }
}

/// `--estargz-record-in` puts files before the prefetch landmark: after
/// the TOC, that region arrives in one background request and its files
/// are stored without being read; reading them then fetches nothing.
/// Landmark files are not part of the tree.
#[test]
fn prefetch_landmark_region_arrives_in_one_background_request() {
    require_env();
    let work = tempdir();
    let (n, size) = (64, 32 << 10);
    let layout = make_tar_image(work.path(), "pf", &many_files(n, size));
    let reg = Registry::start();
    let ctd = Containerd::start();
    let h = reg.host();
    let orig_digest = {
        push(
            &layout_ref(&layout, "pf"),
            &format!("{h}/pf:orig"),
            Format::Oci,
        );
        let (bytes, _) = get_manifest(&h, "pf", "orig", None);
        sha256_digest(&bytes)
    };
    let wanted = [3usize, 17, 40];
    let record = work.path().join("record.json");
    let lines: Vec<String> = wanted
        .iter()
        .map(|i| {
            format!(
                r#"{{"path":"data/d{}/f{i:04}","manifestDigest":"{orig_digest}","layerIndex":0}}"#,
                i % 8
            )
        })
        .collect();
    fs::write(&record, lines.join("\n") + "\n").unwrap();
    let tag = push_converted(
        &ctd,
        &reg,
        &layout,
        "pf",
        "pf",
        Seekable::Estargz,
        Some(&record),
    );
    let layer = manifest_layers(&h, "pf", &tag).remove(0);
    let digest = layer["digest"].as_str().unwrap().to_string();
    let blob = fs::read(registry_blob_path(&reg, &digest)).unwrap();
    let toc = seekable_toc(&blob, &layer);
    assert!(
        toc.iter().any(|e| e["name"] == ".prefetch.landmark"),
        "converter made no landmark"
    );
    let m = Mount::builder().insecure(&h).option("nobackground").start();
    registry_log_barrier(&reg);
    let since = reg.log_len();
    let root = rootfs(&m, &h, "pf", &tag);
    let names = list(&root).unwrap();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("landmark") || n.contains("stargz")),
        "{names:?}"
    );
    let hexes: Vec<String> = wanted
        .iter()
        .map(|&i| sha256_hex(&file_content(i, size)))
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || hexes
            .iter()
            .all(|x| object_path(m.cache_dir(), x).exists())),
        "prioritised files never arrived; log:\n{}",
        m.log()
    );
    registry_log_barrier(&reg);
    let (_, requests) = blob_bytes_since(&reg, since, &digest);
    // the footer+TOC tail, then the region
    assert_eq!(requests, 2, "{}", reg.log_since(since));
    let since = reg.log_len();
    for &i in &wanted {
        let p = root.join(format!("data/d{}/f{i:04}", i % 8));
        assert!(read(&p).unwrap() == file_content(i, size));
    }
    registry_log_barrier(&reg);
    assert_eq!(blob_bytes_since(&reg, since, &digest).1, 0);
}

/// A restart keeps the TOC (no TOC request again) and the files fetched;
/// another file costs only its own range.
#[test]
fn restart_keeps_the_toc_and_fetched_files() {
    require_env();
    let work = tempdir();
    let (n, size) = (64, 32 << 10);
    let layout = make_tar_image(work.path(), "rs", &many_files(n, size));
    let reg = Registry::start();
    let ctd = Containerd::start();
    let h = reg.host();
    let tag = push_converted(&ctd, &reg, &layout, "rs", "rs", Seekable::ZstdChunked, None);
    let digest = manifest_layers(&h, "rs", &tag)[0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let cache = work.path().join("cache");
    {
        let m = Mount::builder()
            .insecure(&h)
            .cache_dir(&cache)
            .option("nobackground")
            .start();
        let root = rootfs(&m, &h, "rs", &tag);
        assert!(read(root.join("data/d1/f0001")).unwrap() == file_content(1, size));
    }
    let m = Mount::builder()
        .insecure(&h)
        .cache_dir(&cache)
        .option("nobackground")
        .start();
    registry_log_barrier(&reg);
    let since = reg.log_len();
    let root = rootfs(&m, &h, "rs", &tag);
    assert!(read(root.join("data/d1/f0001")).unwrap() == file_content(1, size));
    registry_log_barrier(&reg);
    assert_eq!(blob_bytes_since(&reg, since, &digest), (0, 0));
    assert!(read(root.join("data/d2/f0002")).unwrap() == file_content(2, size));
    registry_log_barrier(&reg);
    let (bytes, requests) = blob_bytes_since(&reg, since, &digest);
    assert_eq!(requests, 1);
    assert!(bytes < 2 * size as u64, "{bytes}");
}

/// After the first on-demand read the rest of the layer arrives in the
/// background (every file's object appears without being read);
/// `-o nobackground` turns that off.
#[test]
fn background_fill_completes_a_layer_after_first_use() {
    require_env();
    let work = tempdir();
    let (n, size) = (96, 16 << 10);
    let layout = make_tar_image(work.path(), "fill", &many_files(n, size));
    let reg = Registry::start();
    let ctd = Containerd::start();
    let h = reg.host();
    let tag = push_converted(&ctd, &reg, &layout, "fill", "fill", Seekable::Estargz, None);
    let hexes: Vec<String> = (0..n).map(|i| sha256_hex(&file_content(i, size))).collect();
    let present = |m: &Mount| {
        hexes
            .iter()
            .filter(|x| object_path(m.cache_dir(), x).exists())
            .count()
    };
    {
        let m = Mount::builder().insecure(&h).option("nobackground").start();
        let root = rootfs(&m, &h, "fill", &tag);
        assert!(read(root.join("data/d0/f0000")).unwrap() == file_content(0, size));
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(present(&m), 1, "nobackground still filled");
    }
    let m = Mount::builder().insecure(&h).start();
    let root = rootfs(&m, &h, "fill", &tag);
    assert!(read(root.join("data/d0/f0000")).unwrap() == file_content(0, size));
    assert!(
        wait_until(Duration::from_secs(30), || present(&m) == n),
        "{} of {n} files after 30 s; log:\n{}",
        present(&m),
        m.log()
    );
    // The line follows the last object by a moment.
    assert!(
        m.log_shows_within("background fill complete", Duration::from_secs(5)),
        "no \"background fill complete\" in:\n{}",
        m.log()
    );
    for i in [5usize, 50, 95] {
        let p = root.join(format!("data/d{}/f{i:04}", i % 8));
        assert!(read(p).unwrap() == file_content(i, size));
    }
}

// ---------------------------------------------------------------------------
// Bytes that lie
// ---------------------------------------------------------------------------

/// A TOC that fails the digest its manifest pins (the annotation is
/// changed) makes the image EIO, logged with both digests; nothing of the
/// layer is kept (no index, no chunk table, no object).
#[test]
fn toc_failing_its_digest_is_eio_and_nothing_is_kept() {
    require_env();
    let work = tempdir();
    let layout = make_tar_image(work.path(), "bad", &many_files(8, 4096));
    let reg = Registry::start();
    let ctd = Containerd::start();
    let h = reg.host();
    for (kind, key) in [
        (
            Seekable::Estargz,
            "containerd.io/snapshot/stargz/toc.digest",
        ),
        (
            Seekable::ZstdChunked,
            "io.containers.zstd-chunked.manifest-checksum",
        ),
    ] {
        let repo = format!("bad/{}", kind.flag().trim_start_matches("--"));
        let tag = push_converted(&ctd, &reg, &layout, "bad", &repo, kind, None);
        let (bytes, ct) = get_manifest(&h, &repo, &tag, None);
        let mut man: Value = serde_json::from_slice(&bytes).unwrap();
        let wrong = format!("sha256:{}", "0".repeat(64));
        man["layers"][0]["annotations"][key] = Value::String(wrong.clone());
        put_manifest(
            &h,
            &repo,
            "lying",
            &ct,
            &serde_json::to_vec(&man).unwrap(),
            None,
        );
        let digest = man["layers"][0]["digest"].as_str().unwrap().to_string();
        let m = Mount::builder().insecure(&h).start();
        let root = rootfs(&m, &h, &repo, "lying");
        assert_errno(list(&root), libc::EIO, "rootfs of a lying TOC");
        let log = m.log();
        assert!(
            log.contains(&wrong) && log.contains("TOC of layer"),
            "{log}"
        );
        let hex = digest.trim_start_matches("sha256:");
        assert!(!m.cache_dir().join(format!("layers/{hex}.idx")).exists());
        assert!(!m.cache_dir().join(format!("layers/{hex}.chunks")).exists());
        assert!(object_files(m.cache_dir()).is_empty());
        let s = status(&m, &h, &repo, "lying");
        assert_eq!(s["layers"][0]["state"], "failed", "{s}");
    }
}

/// A chunk whose bytes were changed in the registry's storage is EIO for
/// that file (logged), nothing is cached for it, and reading it again is
/// EIO again; other files of the layer still read.
#[test]
fn chunk_failing_its_digest_is_eio_and_nothing_is_cached() {
    require_env();
    let work = tempdir();
    let size = 64 << 10;
    let layout = make_tar_image(work.path(), "chunk", &many_files(16, size));
    let reg = Registry::start();
    let ctd = Containerd::start();
    let h = reg.host();
    for kind in [Seekable::Estargz, Seekable::ZstdChunked] {
        let repo = format!("chunk/{}", kind.flag().trim_start_matches("--"));
        let tag = push_converted(&ctd, &reg, &layout, "chunk", &repo, kind, None);
        let layer = manifest_layers(&h, &repo, &tag).remove(0);
        let digest = layer["digest"].as_str().unwrap().to_string();
        let path = registry_blob_path(&reg, &digest);
        let blob = fs::read(&path).unwrap();
        let toc = seekable_toc(&blob, &layer);
        let victim = toc
            .iter()
            .find(|e| e["name"] == "data/d5/f0005")
            .expect("victim in TOC");
        // Random content is stored uncompressed inside the member/frame:
        // a byte well inside it is file content.
        flip_byte(&path, victim["offset"].as_u64().unwrap() + 1000);
        let m = Mount::builder().insecure(&h).start();
        let root = rootfs(&m, &h, &repo, &tag);
        assert_errno(read(root.join("data/d5/f0005")), libc::EIO, "corrupt chunk");
        assert!(
            !object_path(m.cache_dir(), &sha256_hex(&file_content(5, size))).exists(),
            "a corrupt file was cached"
        );
        assert_errno(
            read(root.join("data/d5/f0005")),
            libc::EIO,
            "corrupt chunk, again",
        );
        let log = m.log();
        assert!(log.contains("chunk"), "{log}");
        assert!(read(root.join("data/d6/f0006")).unwrap() == file_content(6, size));
    }
}

/// A registry that ignores Range (answers 200 with the whole blob): the
/// eStargz layer is streamed instead (the tree is still right), `status`
/// says `streamed`, and the log says why.
#[test]
fn registry_ignoring_range_gets_the_layer_streamed_with_a_reason() {
    require_env();
    let work = tempdir();
    let (n, size) = (16, 8 << 10);
    let layout = make_tar_image(work.path(), "nr", &many_files(n, size));
    let oracle = umoci_unpack(&layout_ref(&layout, "nr"), &work.path().join("bundle"));
    let reg = Registry::start();
    let ctd = Containerd::start();
    let h = reg.host();
    let tag = push_converted(&ctd, &reg, &layout, "nr", "nr", Seekable::Estargz, None);
    let (man, ct) = get_manifest(&h, "nr", &tag, None);
    let mv: Value = serde_json::from_slice(&man).unwrap();
    let mut blobs = std::collections::HashMap::new();
    let cfg = mv["config"]["digest"].as_str().unwrap().to_string();
    blobs.insert(
        cfg.clone(),
        fs::read(registry_blob_path(&reg, &cfg)).unwrap(),
    );
    for l in mv["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap().to_string();
        blobs.insert(d.clone(), fs::read(registry_blob_path(&reg, &d)).unwrap());
    }
    let man_digest = sha256_digest(&man);
    let tag2 = tag.clone();
    let fault = FaultServer::start(move |method, target| {
        let path = target.split('?').next().unwrap_or_default();
        if path.starts_with("/v2/nr/manifests/") {
            return FaultReply::bytes(200, &ct, man.clone())
                .with_header("Docker-Content-Digest", &man_digest);
        }
        if path == "/v2/nr/tags/list" {
            return FaultReply::json(200, &format!(r#"{{"name":"nr","tags":["{tag2}"]}}"#));
        }
        if let Some(d) = path.strip_prefix("/v2/nr/blobs/")
            && let Some(b) = blobs.get(d)
        {
            let body = if method == "HEAD" {
                Vec::new()
            } else {
                b.clone()
            };
            return FaultReply::bytes(200, "application/octet-stream", body)
                .with_header("Docker-Content-Digest", d);
        }
        FaultReply::Default
    });
    let fh = fault.host();
    let m = Mount::builder().insecure(&fh).start();
    assert_trees_equal(&rootfs(&m, &fh, "nr", &tag), &oracle, "Range ignored");
    wait_ready(&m, &fh, "nr", &tag);
    let s = status(&m, &fh, "nr", &tag);
    // Streamed once (a gzip layer, so with a span index), not lazily.
    assert_eq!(s["layers"][0]["mode"], "span-index", "{s}");
    let log = m.log();
    assert!(
        log.contains("ignores Range") && log.contains("streaming it instead"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// A TOC pin is not a blob digest
// ---------------------------------------------------------------------------

/// A hostile registry (A, in-process: a real one will not lie) serves a
/// manifest naming the digest X of an honest plain gzip layer P (pushed to
/// a real registry, B) as eStargz: the size and TOC annotation of a real
/// eStargz layer E of another tree, and E's bytes for X's Range requests.
/// A's rootfs shows E's tree (a lazy index is only as good as the TOC pin
/// it was checked against, and A chose it). B's image, whose manifest names
/// X as plain gzip, must still show P's tree: on the daemon that read A,
/// and on a restarted daemon whose cache holds A's index of X. Once X was
/// read whole and checked, that index is the truth for X, A included.
#[test]
fn a_lazy_index_serves_only_descriptors_with_its_toc_pin() {
    require_env();
    let work = tempdir();
    let honest = vec![vec![
        TarEntry::dir("./"),
        TarEntry::dir("etc/"),
        TarEntry::file("etc/os-release", "ID=honest\n"),
        TarEntry::file("honest.bin", pseudo_random(7, 20_000)),
    ]];
    let liar = vec![vec![
        TarEntry::dir("./"),
        TarEntry::dir("etc/"),
        TarEntry::file("etc/os-release", "ID=liar\n"),
        TarEntry::file("planted", "not in the honest layer\n"),
    ]];
    let layout = make_tar_image(work.path(), "honest", &honest);
    make_tar_image(work.path(), "liar", &liar);
    let oracle = umoci_unpack(&layout_ref(&layout, "honest"), &work.path().join("bundle"));
    let reg = Registry::start();
    let h = reg.host();
    push(
        &layout_ref(&layout, "honest"),
        &format!("{h}/honest:v1"),
        Format::Oci,
    );
    let p = manifest_layers(&h, "honest", "v1").remove(0);
    assert_eq!(
        p["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
        "{p}"
    );
    let x = p["digest"].as_str().unwrap().to_string();
    let ctd = Containerd::start();
    let tag = push_converted(&ctd, &reg, &layout, "liar", "liar", Seekable::Estargz, None);
    // A's manifest: E's descriptor, but X's digest.
    let (man, ct) = get_manifest(&h, "liar", &tag, None);
    let mut mv: Value = serde_json::from_slice(&man).unwrap();
    let e = mv["layers"][0]["digest"].as_str().unwrap().to_string();
    let e_blob = fs::read(registry_blob_path(&reg, &e)).unwrap();
    mv["layers"][0]["digest"] = Value::String(x.clone());
    let man = serde_json::to_vec(&mv).unwrap();
    let man_digest = sha256_digest(&man);
    let cfg = mv["config"]["digest"].as_str().unwrap().to_string();
    let cfg_bytes = fs::read(registry_blob_path(&reg, &cfg)).unwrap();
    let (tag2, x2) = (tag.clone(), x.clone());
    let fault = FaultServer::start(move |method, target| {
        let path = target.split('?').next().unwrap_or_default();
        if path.starts_with("/v2/liar/manifests/") {
            return FaultReply::bytes(200, &ct, man.clone())
                .with_header("Docker-Content-Digest", &man_digest);
        }
        if path == "/v2/liar/tags/list" {
            return FaultReply::json(200, &format!(r#"{{"name":"liar","tags":["{tag2}"]}}"#));
        }
        if path == format!("/v2/liar/blobs/{cfg}") {
            let body = if method == "HEAD" {
                Vec::new()
            } else {
                cfg_bytes.clone()
            };
            return FaultReply::bytes(200, "application/octet-stream", body)
                .with_header("Docker-Content-Digest", &cfg);
        }
        if path == format!("/v2/liar/blobs/{x2}") {
            return FaultReply::ranged("application/octet-stream", e_blob.clone())
                .with_header("Docker-Content-Digest", &x2);
        }
        FaultReply::Default
    });
    let a = fault.host();
    let mount = |cache: &Path| {
        Mount::builder()
            .insecure(&h)
            .insecure(&a)
            .cache_dir(cache)
            .option("nobackground")
            .start()
    };
    let read_a = |m: &Mount| {
        let root = rootfs(m, &a, "liar", &tag);
        assert_eq!(
            read_string(root.join("etc/os-release")).unwrap(),
            "ID=liar\n"
        );
        let s = status(m, &a, "liar", &tag);
        assert_eq!(s["layers"][0]["mode"], "estargz", "{s}");
    };
    let hex = x.trim_start_matches("sha256:");
    // The same daemon: A first, then B.
    {
        let m = mount(&work.path().join("cache1"));
        read_a(&m);
        assert!(m.cache_dir().join(format!("layers/{hex}.idx")).exists());
        assert_trees_equal(
            &rootfs(&m, &h, "honest", "v1"),
            &oracle,
            "B's image after A's lazy index of the same digest, same daemon",
        );
        wait_ready(&m, &h, "honest", "v1");
        let s = status(&m, &h, "honest", "v1");
        assert_eq!(s["layers"][0]["mode"], "span-index", "{s}");
    }
    // A restarted daemon: A's index of X is all its cache holds.
    let cache2 = work.path().join("cache2");
    {
        let m = mount(&cache2);
        read_a(&m);
    }
    let m = mount(&cache2);
    assert_trees_equal(
        &rootfs(&m, &h, "honest", "v1"),
        &oracle,
        "B's image after A's lazy index of the same digest, restarted daemon",
    );
    // X was read whole and checked: that index is now what X shows, A too.
    drop(m);
    let m = mount(&cache2);
    let root = rootfs(&m, &a, "liar", &tag);
    assert_eq!(
        read_string(root.join("etc/os-release")).unwrap(),
        "ID=honest\n"
    );
    assert_errno(stat(root.join("planted")), libc::ENOENT, "E's file under A");
}
