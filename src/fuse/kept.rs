//! Kept opens: a rootfs file's open (its verified object file and
//! passthrough backing id), kept after the kernel releases it, so that
//! opening the same file again costs one `fstat` instead of an open of the
//! object, a backing-id ioctl, and their closes at release.
//!
//! Why: tools open the same files again and again (a compiler its
//! headers, a build its libraries, a second walk of a tree), and each
//! open and release is a round trip the daemon answers with syscalls.
//!
//! Contracts:
//! - **Bounded**: at most `cap` opens are kept (each holds a descriptor;
//!   the cap is a share of the descriptor limit), least recently released
//!   go first.
//! - **Never stale**: a kept open is used only while its image's merged
//!   tree is built (every layer checked: an image whose layer failed
//!   answers `EIO` through the usual path) and its object is still the
//!   file the store verified ([`crate::model::Tree::still_verified`]: one
//!   `fstat` against the verified stamp, also marking the object used);
//!   otherwise it is dropped and the open takes the usual path.
//! - **Never holds evicted disk**: the store tells which objects' files it
//!   unlinked ([`crate::cas::ObjectStore::on_unlinked`]); their kept opens
//!   go at once, so the disk is freed as eviction means it to be.
//! - **Locking**: one mutex, never held while calling the model or the
//!   store (the store calls in here from its eviction).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use crate::cas::ObjectId;
use crate::model::OpenFile;

/// At most this many kept opens, whatever the descriptor limit.
const MAX_KEPT: usize = 8192;

/// One kept open (`B`: the passthrough backing id; a stand-in in tests).
pub struct Kept<B = fuser::BackingId> {
    /// The open file (its object and verified file).
    pub file: Arc<OpenFile>,
    /// The passthrough backing id of that file.
    pub id: Arc<B>,
}

/// Kept opens by inode, least recently released first out.
pub struct KeptOpens<B = fuser::BackingId> {
    lru: lru::LruCache<u64, (ObjectId, Kept<B>)>,
    /// The inodes kept for each object (hard links and images share one).
    by_object: HashMap<ObjectId, Vec<u64>>,
}

impl<B> KeptOpens<B> {
    /// Room for a quarter of `fd_limit` (the process's descriptor limit),
    /// at most [`MAX_KEPT`]; `None` when that is too few to be worth it.
    pub fn for_fd_limit(fd_limit: u64) -> Option<KeptOpens<B>> {
        let cap = usize::try_from(fd_limit / 4)
            .unwrap_or(MAX_KEPT)
            .min(MAX_KEPT);
        (cap >= 64).then(|| KeptOpens::<B>::with_cap(cap))
    }

    /// Room for `cap` (at least 1) kept opens.
    pub fn with_cap(cap: usize) -> KeptOpens<B> {
        KeptOpens {
            lru: lru::LruCache::new(NonZeroUsize::new(cap.max(1)).expect("at least 1")),
            by_object: HashMap::new(),
        }
    }

    /// Keeps the released open `file` of inode `ino` (a rootfs file with
    /// its object and backing id); the least recently kept goes if full.
    pub fn keep(&mut self, ino: u64, file: Arc<OpenFile>, id: Arc<B>) {
        let Some(object) = file.object else { return };
        if let Some((old_ino, (old_object, _))) = self.lru.push(ino, (object, Kept { file, id })) {
            self.unindex(old_ino, &old_object);
        }
        let inos = self.by_object.entry(object).or_default();
        if !inos.contains(&ino) {
            inos.push(ino);
        }
    }

    /// Takes the kept open of `ino`, if any (it is kept again at its
    /// release).
    pub fn take(&mut self, ino: u64) -> Option<Kept<B>> {
        let (object, kept) = self.lru.pop(&ino)?;
        self.unindex(ino, &object);
        Some(kept)
    }

    /// Drops the kept opens of `objects` (their files were unlinked).
    pub fn forget_objects(&mut self, objects: &[ObjectId]) {
        let mut n = 0;
        for object in objects {
            for ino in self.by_object.remove(object).unwrap_or_default() {
                n += usize::from(self.lru.pop(&ino).is_some());
            }
        }
        if n > 0 {
            tracing::debug!(kept_opens = n, "objects unlinked: their kept opens go");
        }
    }

    /// How many opens are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lru.len()
    }

    fn unindex(&mut self, ino: u64, object: &ObjectId) {
        if let Some(inos) = self.by_object.get_mut(object) {
            inos.retain(|&i| i != ino);
            if inos.is_empty() {
                self.by_object.remove(object);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Content;

    fn open(object: u8) -> Arc<OpenFile> {
        Arc::new(OpenFile {
            content: Content::Bytes(bytes::Bytes::new()),
            keep_cache: true,
            direct_io: false,
            object: Some([object; 32]),
        })
    }

    #[test]
    fn keeps_takes_evicts_and_forgets_by_object() {
        let mut k: KeptOpens<()> = KeptOpens::with_cap(3);
        let id = Arc::new(());
        // Inodes 1 and 2 share object 7 (a hard link, another image).
        k.keep(1, open(7), id.clone());
        k.keep(2, open(7), id.clone());
        k.keep(3, open(8), id.clone());
        assert_eq!(k.len(), 3);
        assert!(k.take(2).is_some());
        assert!(k.take(2).is_none(), "taken once");
        k.keep(2, open(7), id.clone());
        // Full: the least recently kept (inode 1) goes.
        k.keep(4, open(9), id.clone());
        assert!(k.take(1).is_none());
        assert_eq!(k.len(), 3);
        // Object 7's file was unlinked: every inode kept for it goes.
        k.forget_objects(&[[7; 32]]);
        assert!(k.take(2).is_none());
        assert_eq!(k.len(), 2);
        assert!(!k.by_object.contains_key(&[7; 32]));
        // An inode kept again for another object moves in the index.
        k.keep(3, open(9), id.clone());
        k.forget_objects(&[[8; 32]]);
        assert!(k.take(3).is_some(), "inode 3 now reads object 9");
        // A file without an object (not a rootfs file) is never kept.
        let mut plain = (*open(1)).clone();
        plain.object = None;
        k.keep(5, Arc::new(plain), id);
        assert!(k.take(5).is_none());
    }
}
