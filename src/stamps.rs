//! Stamps: what identifies one version of an object file on disk, and the
//! record of verified ones that outlives the process.
//!
//! Why: hashing an object is the only proof its bytes match its name, and
//! it costs a read of the whole file. The content store hashes an object
//! once and then trusts the file while its stamp (inode, size, mtime,
//! ctime) is unchanged: any write, truncate, `chmod`, `touch` or
//! replacement moves the ctime, which no caller can set back. Saving the
//! fingerprints of verified stamps (`<cache-dir>/verified`) lets the next
//! process trust the same files without reading them again.
//!
//! Contract: the file is replaced whole (written aside, then linked over
//! the old one); a missing, stale or damaged file only costs hashing again,
//! since every fingerprint is checked against the file at open. It is
//! trusted as the layer indexes beside it are: whoever can write the cache
//! directory could forge either.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::cas::{ObjectId, Sha256};
use crate::objindex::ObjIndex;

/// What identifies one version of an object file on disk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// A non-zero fingerprint of the stamp (what the index keeps, and
    /// `<cache-dir>/verified` across restarts): the first 8 bytes of a
    /// sha256 of its fields, stable across builds, unlike `std`'s hasher.
    pub(crate) fn fingerprint(&self) -> u64 {
        let mut fields = [0u8; 48];
        let values = [
            self.ino,
            self.size,
            self.mtime.0 as u64,
            self.mtime.1 as u64,
            self.ctime.0 as u64,
            self.ctime.1 as u64,
        ];
        for (chunk, v) in fields.chunks_exact_mut(8).zip(values) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        let mut h = Sha256::new();
        h.update(&fields);
        let d = h.finish();
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes")).max(1)
    }

    pub(crate) fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Where verified stamps are kept across restarts, under the cache dir.
pub(crate) const FILE: &str = "verified";

/// First bytes of that file (the format's version); then [`RECORD`]s.
const MAGIC: &[u8] = b"apt-layer verified 1\n";

/// Bytes of one record: an object id (32) and its stamp's fingerprint (8,
/// little endian).
const RECORD: usize = 40;

/// The `(object, fingerprint)` pairs `<cache_dir>/verified` lists; none if
/// it is missing or malformed.
pub(crate) fn read(cache_dir: &Path) -> Vec<(ObjectId, u64)> {
    let path = &cache_dir.join(FILE);
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read verified stamps; objects are hashed again on first open");
            return Vec::new();
        }
    };
    let records = match data.strip_prefix(MAGIC) {
        Some(r) if r.len() % RECORD == 0 => r,
        _ => {
            tracing::warn!(path = %path.display(), "verified stamps in an unknown format; objects are hashed again on first open");
            return Vec::new();
        }
    };
    records
        .chunks_exact(RECORD)
        .map(|r| {
            let id: ObjectId = r[..32].try_into().expect("32 bytes");
            (id, u64::from_le_bytes(r[32..].try_into().expect("8 bytes")))
        })
        .filter(|&(_, fp)| fp != 0)
        .collect()
}

/// Marks the objects of `lru` not verified yet with the fingerprints of
/// `stamps` (from [`read`]; each is checked against the file at its open);
/// how many.
pub(crate) fn apply(stamps: &[(ObjectId, u64)], lru: &mut ObjIndex) -> usize {
    let mut n = 0;
    for (id, fp) in stamps {
        if let Some(i) = lru.peek_mut(id)
            && i.verified == 0
        {
            i.verified = *fp;
            n += 1;
        }
    }
    n
}

/// The file's bytes for `(object, fingerprint)` pairs (unverified ones,
/// fingerprint 0, left out), and how many it holds.
pub(crate) fn encode<'a>(verified: impl Iterator<Item = (&'a ObjectId, u64)>) -> (Vec<u8>, usize) {
    let mut data = MAGIC.to_vec();
    let mut n = 0;
    for (id, fp) in verified.filter(|&(_, fp)| fp != 0) {
        data.extend_from_slice(id);
        data.extend_from_slice(&fp.to_le_bytes());
        n += 1;
    }
    (data, n)
}
