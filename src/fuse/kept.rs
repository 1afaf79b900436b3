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
//!   the cap is a share of the descriptor limit).
//! - **Scan resistant**: when full, the least recently released open gives
//!   way to a newly released one only if it has been idle for
//!   [`MIN_IDLE`]; otherwise the new one is not kept. A walk of more files
//!   than the cap (a second `tar` of a large tree) thus keeps its first
//!   `cap` files and finds them on its next pass, where plain LRU would
//!   evict each file just before the pass comes back to it and never hit.
//!   A working set that moves on (another image, minutes later) still
//!   replaces the old one once that has been idle that long.
//! - **Never stale**: a kept open is used only while its image's merged
//!   tree is built (every layer checked: an image whose layer failed
//!   answers `EIO` through the usual path) and its object is still the
//!   file the store verified ([`crate::model::Tree::still_verified`]: one
//!   `fstat` against the verified stamp, also marking the object used);
//!   otherwise it is dropped and the open takes the usual path.
//! - **Never holds evicted disk**: the store tells which objects' files it
//!   unlinked ([`crate::cas::ObjectStore::on_unlinked`]); their kept opens
//!   go at once, so the disk is freed as eviction means it to be. An open
//!   released after that notice (the kernel sends the release after the
//!   reader's close) finds its file unlinked and is not kept.
//! - **Locking**: one mutex, never held while calling the model or the
//!   store (the store calls in here from its eviction).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cas::ObjectId;
use crate::model::{Content, OpenFile};

/// At most this many kept opens, whatever the descriptor limit.
const MAX_KEPT: usize = 8192;

/// When full, a kept open idle for less than this is not replaced by a
/// newly released one (module doc: scan resistant).
pub const MIN_IDLE: Duration = Duration::from_secs(30);

/// One kept open (`B`: the passthrough backing id; a stand-in in tests).
pub struct Kept<B = fuser::BackingId> {
    /// The open file (its object and verified file).
    pub file: Arc<OpenFile>,
    /// The passthrough backing id of that file.
    pub id: Arc<B>,
}

/// A kept open in the cache: its object (for the index by object), when it
/// was released, and the open itself.
struct Entry<B> {
    object: ObjectId,
    released: Instant,
    kept: Kept<B>,
}

/// Kept opens by inode, least recently released first out.
pub struct KeptOpens<B = fuser::BackingId> {
    lru: lru::LruCache<u64, Entry<B>>,
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
    /// its object and backing id), released at `now`. If full, the least
    /// recently released goes if it has been idle for [`MIN_IDLE`];
    /// otherwise this one is not kept (module doc: scan resistant).
    pub fn keep(&mut self, ino: u64, file: Arc<OpenFile>, id: Arc<B>, now: Instant) {
        let Some(object) = file.object else { return };
        // Unlinked already (the store's notice can come before this
        // release, which the kernel sends after the reader's close): not
        // kept, or it would hold the evicted file's disk. Checked under the
        // lock `forget_objects` takes, so a notice after this check finds
        // the entry below.
        if let Content::File(f) = &file.content
            && f.metadata().is_ok_and(|m| m.nlink() == 0)
        {
            return;
        }
        if self.lru.len() == self.lru.cap().get()
            && !self.lru.contains(&ino)
            && self
                .lru
                .peek_lru()
                .is_some_and(|(_, e)| now.saturating_duration_since(e.released) < MIN_IDLE)
        {
            return;
        }
        let entry = Entry {
            object,
            released: now,
            kept: Kept { file, id },
        };
        if let Some((old_ino, old)) = self.lru.push(ino, entry) {
            self.unindex(old_ino, &old.object);
        }
        let inos = self.by_object.entry(object).or_default();
        if !inos.contains(&ino) {
            inos.push(ino);
        }
    }

    /// Takes the kept open of `ino`, if any (it is kept again at its
    /// release).
    pub fn take(&mut self, ino: u64) -> Option<Kept<B>> {
        let e = self.lru.pop(&ino)?;
        self.unindex(ino, &e.object);
        Some(e.kept)
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
        let t0 = Instant::now();
        // Inodes 1 and 2 share object 7 (a hard link, another image).
        k.keep(1, open(7), id.clone(), t0);
        k.keep(2, open(7), id.clone(), t0);
        k.keep(3, open(8), id.clone(), t0);
        assert_eq!(k.len(), 3);
        assert!(k.take(2).is_some());
        assert!(k.take(2).is_none(), "taken once");
        k.keep(2, open(7), id.clone(), t0);
        // Full, and the least recently kept (inode 1) idle long enough: it goes.
        k.keep(4, open(9), id.clone(), t0 + MIN_IDLE);
        assert!(k.take(1).is_none());
        assert_eq!(k.len(), 3);
        // Object 7's file was unlinked: every inode kept for it goes.
        k.forget_objects(&[[7; 32]]);
        assert!(k.take(2).is_none());
        assert_eq!(k.len(), 2);
        assert!(!k.by_object.contains_key(&[7; 32]));
        // An inode kept again for another object moves in the index.
        k.keep(3, open(9), id.clone(), t0);
        k.forget_objects(&[[8; 32]]);
        assert!(k.take(3).is_some(), "inode 3 now reads object 9");
        // A file without an object (not a rootfs file) is never kept.
        let mut plain = (*open(1)).clone();
        plain.object = None;
        k.keep(5, Arc::new(plain), id, t0);
        assert!(k.take(5).is_none());
    }

    /// An open whose object was unlinked before its release (the store's
    /// notice came first) is not kept.
    #[test]
    fn an_unlinked_object_is_not_kept() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("object");
        std::fs::write(&path, b"content").unwrap();
        let f = Arc::new(OpenFile {
            content: Content::File(Arc::new(std::fs::File::open(&path).unwrap())),
            keep_cache: true,
            direct_io: false,
            object: Some([3; 32]),
        });
        let mut k: KeptOpens<()> = KeptOpens::with_cap(4);
        let t0 = Instant::now();
        k.keep(1, f.clone(), Arc::new(()), t0);
        assert!(k.take(1).is_some(), "linked: kept");
        std::fs::remove_file(&path).unwrap();
        k.keep(1, f, Arc::new(()), t0);
        assert!(k.take(1).is_none(), "unlinked: not kept");
    }

    /// Two passes over more files than the cap, as `tar` twice over a
    /// large tree: the second finds the first pass's first `cap` files
    /// (plain LRU would find none), and a working set idle for
    /// [`MIN_IDLE`] gives way to a new one.
    #[test]
    fn a_scan_larger_than_the_cap_keeps_its_first_files() {
        let (cap, files) = (100u64, 130u64);
        let mut k: KeptOpens<()> = KeptOpens::with_cap(cap as usize);
        let id = Arc::new(());
        let t0 = Instant::now();
        let pass = |k: &mut KeptOpens<()>, inos: std::ops::Range<u64>, at: Instant| {
            let mut hits = 0;
            for ino in inos {
                hits += usize::from(k.take(ino).is_some());
                k.keep(ino, open(ino as u8), id.clone(), at);
            }
            hits
        };
        assert_eq!(pass(&mut k, 0..files, t0), 0);
        assert_eq!(pass(&mut k, 0..files, t0), cap as usize);
        assert_eq!(k.len(), cap as usize);
        // Another image's files, once the first pass has been idle: they
        // replace it.
        let later = t0 + MIN_IDLE;
        assert_eq!(pass(&mut k, 1000..1000 + cap, later), 0);
        assert_eq!(pass(&mut k, 1000..1000 + cap, later), cap as usize);
        assert_eq!(
            pass(&mut k, 0..files, later),
            0,
            "the first set was replaced"
        );
    }
}
