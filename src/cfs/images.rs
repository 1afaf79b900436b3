//! Built `image.cfs` files, kept on disk by manifest digest.
//!
//! ```text
//! <cache-dir>/images/
//! ├── <manifest hex>.cfs         the EROFS image (metadata: never evicted)
//! └── <manifest hex>.cfs.json    sidecar: {"sha256", "size", "builder"}
//! ```
//!
//! Contracts:
//! - **Built once**: an image is written to `tmp/` and linked into place
//!   ([`crate::publish::TempFile::replace`]),
//!   then its sidecar the same way; after a restart it is served from here,
//!   never rebuilt.
//! - **Never served damaged or stale**: an image is served only if its
//!   sha256 equals the sidecar's and the sidecar names this [`BUILDER`];
//!   otherwise it is removed and built again. The check is repeated
//!   whenever the file's inode, size, mtime or ctime change.
//! - The size is known from the sidecar without reading the image, so
//!   `getattr` is exact and cheap once an image was built (the builder is
//!   deterministic: a rebuild has the same bytes).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Names the code that made an image; a different value means rebuild.
/// Bump it whenever [`super::build`] would produce other bytes.
pub const BUILDER: &str = "apt-layer-cfs-1 composefs-0.9.4 erofs-v1";

#[derive(Serialize, Deserialize)]
struct Sidecar {
    sha256: String,
    size: u64,
    builder: String,
}

type Stamp = (u64, u64, i64, i64, i64, i64);

fn stamp(m: &std::fs::Metadata) -> Stamp {
    (
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// The images of one cache directory.
pub struct ImageStore {
    dir: PathBuf,
    tmp: PathBuf,
    /// Files verified in this process, by manifest hex.
    verified: Mutex<HashMap<String, Stamp>>,
}

fn hex_of(manifest: &str) -> &str {
    manifest.strip_prefix("sha256:").unwrap_or(manifest)
}

impl ImageStore {
    /// Opens (creating) `images/` under `cache_dir`.
    pub fn open(cache_dir: &Path) -> io::Result<ImageStore> {
        let dir = cache_dir.join("images");
        std::fs::create_dir_all(&dir)?;
        let tmp = cache_dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        Ok(ImageStore {
            dir,
            tmp,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Where the image of `manifest` (`sha256:<hex>`) lives.
    pub fn path(&self, manifest: &str) -> PathBuf {
        self.dir.join(format!("{}.cfs", hex_of(manifest)))
    }

    fn sidecar_path(&self, manifest: &str) -> PathBuf {
        self.dir.join(format!("{}.cfs.json", hex_of(manifest)))
    }

    fn sidecar(&self, manifest: &str) -> Option<Sidecar> {
        let s: Sidecar =
            serde_json::from_slice(&std::fs::read(self.sidecar_path(manifest)).ok()?).ok()?;
        (s.builder == BUILDER).then_some(s)
    }

    /// The size of a built image, from its sidecar (not verified).
    pub fn size(&self, manifest: &str) -> Option<u64> {
        let s = self.sidecar(manifest)?;
        let m = std::fs::metadata(self.path(manifest)).ok()?;
        (m.len() == s.size).then_some(s.size)
    }

    /// Opens the image of `manifest` if present, intact and made by this
    /// builder; otherwise removes what is there and answers `None`.
    pub fn get(&self, manifest: &str) -> Option<(File, u64)> {
        let path = self.path(manifest);
        let file = File::open(&path).ok()?;
        let m = file.metadata().ok()?;
        let key = hex_of(manifest).to_string();
        if self.verified.lock().unwrap().get(&key) == Some(&stamp(&m)) {
            return Some((file, m.len()));
        }
        let ok = match self.sidecar(manifest) {
            Some(s) => {
                s.size == m.len()
                    && crate::cas::hash_file(&file).is_ok_and(|h| hex::encode(h) == s.sha256)
            }
            None => false,
        };
        if !ok {
            tracing::warn!(path = %path.display(), "image.cfs does not match its recorded digest or builder; building it again");
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(self.sidecar_path(manifest));
            self.verified.lock().unwrap().remove(&key);
            return None;
        }
        self.verified.lock().unwrap().insert(key, stamp(&m));
        Some((file, m.len()))
    }

    /// Stores `image` for `manifest` (crash safe) and opens it.
    pub fn put(&self, manifest: &str, image: &[u8]) -> io::Result<(File, u64)> {
        let hex = hex_of(manifest);
        let write = |data: &[u8], dst: &Path| {
            crate::publish::TempFile::with_data(&self.tmp, data)?.replace(dst)
        };
        write(image, &self.path(manifest))?;
        let mut h = crate::cas::Sha256::new();
        h.update(image);
        let side = Sidecar {
            sha256: hex::encode(h.finish()),
            size: image.len() as u64,
            builder: BUILDER.into(),
        };
        write(
            &serde_json::to_vec(&side).map_err(io::Error::other)?,
            &self.sidecar_path(manifest),
        )?;
        let file = File::open(self.path(manifest))?;
        let m = file.metadata()?;
        self.verified
            .lock()
            .unwrap()
            .insert(hex.to_string(), stamp(&m));
        Ok((file, m.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_or_foreign_images_are_not_served() {
        let d = tempfile::tempdir().unwrap();
        let s = ImageStore::open(d.path()).unwrap();
        let m = "sha256:abcd";
        assert!(s.get(m).is_none());
        s.put(m, b"image bytes").unwrap();
        assert_eq!(s.size(m), Some(11));
        assert!(s.get(m).is_some());
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(s.path(m), b"image bytez").unwrap();
        assert!(s.get(m).is_none(), "damaged image served");
        assert!(!s.path(m).exists());
        // a fresh store (restart) serves an intact image without rebuilding
        s.put(m, b"image bytes").unwrap();
        let s2 = ImageStore::open(d.path()).unwrap();
        assert_eq!(s2.get(m).unwrap().1, 11);
    }
}
