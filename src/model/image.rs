//! An image as a tag or digest resolves to it: the top-level manifest (an
//! index for multi-platform tags), the manifest of this host's platform,
//! and the descriptors of its config and layers.

use std::sync::Arc;

use serde::Deserialize;

use crate::registry::RawManifest;

/// A content descriptor from a manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Descriptor {
    /// Media type.
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations (eStargz and zstd:chunked put their TOC location here).
    #[serde(default)]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct ManifestBody {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct IndexBody {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

/// A resolved image; immutable once built.
#[derive(Debug)]
pub struct Image {
    /// Digest of what the tag points at (the index for multi-platform tags).
    pub top_digest: Arc<str>,
    /// The index, for multi-platform tags.
    pub index: Option<RawManifest>,
    /// This platform's image manifest.
    pub manifest: RawManifest,
    /// The config descriptor.
    pub config: Descriptor,
    /// Layer descriptors, bottom first.
    pub layers: Vec<Descriptor>,
}

/// The most layers an image may have. Builders stop far below (Docker at
/// 127, overlayfs stacks at most 500); the merge numbers layers in 16 bits.
pub const MAX_LAYERS: usize = 4096;

impl Image {
    /// Builds an image from its (verified) platform manifest.
    pub fn new(index: Option<RawManifest>, manifest: RawManifest) -> Result<Image, String> {
        let body: ManifestBody = serde_json::from_slice(&manifest.bytes)
            .map_err(|e| format!("manifest {}: {e}", manifest.digest))?;
        for d in std::iter::once(&body.config).chain(&body.layers) {
            if !crate::registry::name::is_sha256_digest(&d.digest) {
                return Err(format!(
                    "manifest {} has an invalid digest {:?}",
                    manifest.digest, d.digest
                ));
            }
        }
        if body.layers.len() > MAX_LAYERS {
            return Err(format!(
                "manifest {} has {} layers (at most {MAX_LAYERS} are served)",
                manifest.digest,
                body.layers.len()
            ));
        }
        let top = index
            .as_ref()
            .map(|i| i.digest.clone())
            .unwrap_or_else(|| manifest.digest.clone());
        Ok(Image {
            top_digest: top.into(),
            index,
            manifest,
            config: body.config,
            layers: body.layers,
        })
    }
}

/// This host's platform as OCI names it (`amd64`, `arm64`, …).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Picks the manifest for this host (`linux/<arch>`) from an index.
pub fn select_platform(index: &RawManifest) -> Result<String, String> {
    let body: IndexBody =
        serde_json::from_slice(&index.bytes).map_err(|e| format!("index {}: {e}", index.digest))?;
    let arch = host_arch();
    let candidates: Vec<&IndexEntry> = body
        .manifests
        .iter()
        .filter(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    // Prefer the variant this host is (v8 for arm64), else the first match.
    let preferred = candidates
        .iter()
        .find(|m| {
            let v = m.platform.as_ref().and_then(|p| p.variant.as_deref());
            arch != "arm64" || v.is_none() || v == Some("v8")
        })
        .or(candidates.first());
    match preferred {
        Some(m) if crate::registry::name::is_sha256_digest(&m.digest) => Ok(m.digest.clone()),
        Some(m) => Err(format!(
            "index {} has an invalid digest {:?}",
            index.digest, m.digest
        )),
        None => Err(format!(
            "index {} has no manifest for linux/{arch}",
            index.digest
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with_layers(n: usize) -> RawManifest {
        let d = |i: usize| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{i:064x}","size":1}}"#
            )
        };
        let layers: Vec<String> = (0..n).map(d).collect();
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{:064x}","size":1}},"layers":[{}]}}"#,
            0,
            layers.join(",")
        );
        RawManifest {
            bytes: body.into(),
            digest: format!("sha256:{:064x}", 1),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            is_index: false,
        }
    }

    #[test]
    fn a_manifest_with_more_layers_than_served_is_refused() {
        assert_eq!(
            Image::new(None, manifest_with_layers(3))
                .unwrap()
                .layers
                .len(),
            3
        );
        assert!(Image::new(None, manifest_with_layers(MAX_LAYERS)).is_ok());
        let e = Image::new(None, manifest_with_layers(MAX_LAYERS + 1)).unwrap_err();
        assert!(e.contains("layers"), "{e}");
    }
}
