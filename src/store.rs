//! The metadata store: manifests, indexes and configs kept on disk by
//! digest, apart from the evictable content objects, so that everything
//! addressed by digest survives a restart without touching the network.
//!
//! ```text
//! <cache-dir>/
//! ├── blobs/sha256/<64 hex>     manifests, indexes, configs (never evicted)
//! ├── objects/<2 hex>/<62 hex>  file contents (evictable, composefs layout)
//! └── tmp/                      partial writes, linked into place
//! ```
//!
//! Durability: a blob is written to `tmp/` and linked into place
//! ([`crate::publish`]), so a crash leaves either nothing or the whole
//! blob. Reads re-verify the digest, so a damaged file is treated as
//! missing (and removed), never served.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::registry::{name::is_sha256_digest, sha256_digest};

/// Digest-addressed metadata on disk.
#[derive(Debug, Clone)]
pub struct MetaStore {
    root: PathBuf,
}

impl MetaStore {
    /// Opens (creating) the store under `cache_dir`.
    pub fn open(cache_dir: &Path) -> std::io::Result<MetaStore> {
        std::fs::create_dir_all(cache_dir.join("blobs/sha256"))?;
        std::fs::create_dir_all(cache_dir.join("tmp"))?;
        Ok(MetaStore {
            root: cache_dir.to_path_buf(),
        })
    }

    fn path(&self, digest: &str) -> Option<PathBuf> {
        is_sha256_digest(digest).then(|| self.root.join("blobs/sha256").join(&digest[7..]))
    }

    /// The blob for `digest`, if present and intact.
    pub fn get(&self, digest: &str) -> Option<Bytes> {
        let path = self.path(digest)?;
        let data = std::fs::read(&path).ok()?;
        if sha256_digest(&data) != digest {
            tracing::warn!(path = %path.display(), digest, "metadata blob damaged on disk; dropping it");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(Bytes::from(data))
    }

    /// Stores `data`, which the caller has verified hashes to `digest`.
    /// Failure to store is logged, not fatal: the data is still served.
    pub fn put(&self, digest: &str, data: &[u8]) {
        let Some(path) = self.path(digest) else {
            return;
        };
        if path.exists() {
            return;
        }
        let res = (|| -> std::io::Result<()> {
            let mut tmp = crate::publish::TempFile::with_data(&self.root.join("tmp"), data)?;
            // One there already: `get` checks it against its digest.
            tmp.publish(&path)?;
            Ok(())
        })();
        if let Err(e) = res {
            tracing::warn!(digest, error = %e, "cannot store metadata blob");
        }
    }
}

impl MetaStore {
    /// Number of metadata blobs.
    pub fn count(&self) -> usize {
        std::fs::read_dir(self.root.join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Hashes every blob; removes and returns the paths of damaged ones.
    pub fn verify_all(&self) -> Vec<PathBuf> {
        let mut bad = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.root.join("blobs/sha256")) else {
            return bad;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ok = std::fs::read(e.path())
                .map(|d| sha256_digest(&d) == format!("sha256:{name}"))
                .unwrap_or(false);
            if !ok {
                let _ = std::fs::remove_file(e.path());
                bad.push(e.path());
            }
        }
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(d.path()).unwrap();
        let dg = sha256_digest(b"hello");
        assert!(s.get(&dg).is_none());
        s.put(&dg, b"hello");
        assert_eq!(s.get(&dg).unwrap(), Bytes::from_static(b"hello"));
        std::fs::write(d.path().join("blobs/sha256").join(&dg[7..]), b"hellp").unwrap();
        assert!(s.get(&dg).is_none());
    }
}
