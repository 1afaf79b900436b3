//! The end-to-end benchmark in its smoke mode (tiny image, one round), so
//! the script and its report cannot rot. Its numbers are not asserted: a
//! timed test is not a benchmark.

mod common;

use std::process::Command;

#[test]
fn e2e_benchmark_smoke_mode_produces_a_report() {
    common::require_env();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.md");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/e2e.sh");
    let status = Command::new("bash")
        .arg(script)
        .arg("--smoke")
        .arg("--out")
        .arg(&out)
        .env("APT_LAYER_BIN", common::apt_layer_bin())
        .status()
        .expect("run benches/e2e.sh");
    assert!(status.success(), "benches/e2e.sh --smoke failed");
    let report = std::fs::read_to_string(&out).expect("report written");
    for row in [
        "cold first read + `chroot /bin/true`",
        "same, eStargz image",
        "same, zstd:chunked image",
        "bytes fetched for that cold start / layer size, estargz",
        "cold start over a 100 Mbit/s link (tbf), gzip",
        "export of the tree",
        "synthetic",
        "warm `tar cf - rootfs`, vs local disk",
        "warm `find rootfs -printf`, vs local disk",
        "daemon RSS per entry beyond a fixed base",
        "daemon RSS per entry of the Debian image",
    ] {
        let line = report
            .lines()
            .find(|l| l.contains(row))
            .unwrap_or_else(|| panic!("no row {row:?} in:\n{report}"));
        assert!(
            !line.contains("| n/a |"),
            "row {row:?} has no measurement: {line}"
        );
    }
    assert!(out.with_extension("svg").exists(), "no chart written");
}
