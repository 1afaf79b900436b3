//! Layers: what a layer contains (its [`LayerIndex`]), how one is read
//! once from a stream into that index plus content objects ([`stream`]),
//! and where indexes are kept so a restart never streams a layer again.
//!
//! ```text
//! <cache-dir>/layers/<64 hex>.idx   postcard-encoded LayerIndex (metadata, never evicted)
//! ```
//!
//! Contract (**trust**): an index made by reading the whole blob and
//! checking it against its digest (pin `None`) is the truth for that digest
//! and serves every descriptor of it. One made from a seekable layer's TOC
//! (eStargz, zstd:chunked) was checked only against the TOC digest one
//! manifest pinned, never the blob: it keeps that pin and serves only the
//! descriptors that carry the same one ([`LayerIndex::serves`]), on disk
//! ([`IndexStore::load`]) as in memory. There is one file per digest; the
//! index a descriptor had to make for itself replaces one it could not use.

pub mod gzindex;
pub mod seekable;
pub mod sparse;
pub mod spill;
pub mod stream;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cas::ObjectId;

/// Bump when the encoding changes; older indexes are re-made.
pub const INDEX_VERSION: u32 = 6;

/// A layer's compression, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// Uncompressed tar.
    None,
    /// gzip (also Docker's `diff.tar.gzip`).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// From an OCI or Docker layer media type; `None` if not a tar layer.
    pub fn from_media_type(mt: &str) -> Option<Compression> {
        match mt {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }
}

/// How a layer's content is reached after its index is known; `status`
/// shows it per layer, so a fallback is never silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[repr(u8)]
pub enum LayerMode {
    /// Read once from start to end; evicted content is fetched again by a
    /// Range for the prefix that holds it.
    #[default]
    Streamed = 0,
    /// Plain gzip with a span index: evicted content is one Range per span.
    SpanIndex = 1,
    /// eStargz: the TOC was read by Range, files are fetched on demand.
    Estargz = 2,
    /// zstd:chunked: the manifest was read by Range, files on demand.
    ZstdChunked = 3,
}

impl LayerMode {
    /// The word `status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerMode::Streamed => "streamed",
            LayerMode::SpanIndex => "span-index",
            LayerMode::Estargz => "estargz",
            LayerMode::ZstdChunked => "zstd:chunked",
        }
    }

    /// Whether files are fetched on demand from a TOC ([`seekable`]).
    pub fn is_lazy(self) -> bool {
        matches!(self, LayerMode::Estargz | LayerMode::ZstdChunked)
    }
}

/// Entry types a layer can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// Directory.
    Dir,
    /// Regular file (content in an object).
    File,
    /// Symbolic link (`link` is the target).
    Symlink,
    /// Hard link to `link` (a path in the merged tree).
    Hardlink,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// Named pipe.
    Fifo,
}

/// One tar entry, as needed to merge layers and serve files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Path relative to the root, normalised (no `.`/`..`, no leading `/`);
    /// empty for the root itself. Raw bytes: names need not be UTF-8.
    pub path: Vec<u8>,
    /// Entry type.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Modification time, nanoseconds (from PAX `mtime`).
    pub mtime_nsec: u32,
    /// Content size for regular files.
    pub size: u64,
    /// Symlink target, or normalised hard-link target path.
    pub link: Vec<u8>,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
    /// Extended attributes from PAX `SCHILY.xattr.*`.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// sha256 of the content, for regular files.
    pub object: Option<ObjectId>,
    /// Offset of the content in the uncompressed tar stream.
    pub offset: u64,
    /// For a sparse file (GNU's PAX form), where its data regions lie:
    /// the stream then holds [`sparse::SparseMap::extent`] bytes at
    /// `offset`, not `size`.
    pub sparse: Option<Box<sparse::SparseMap>>,
    /// Compressed bytes the decoder had consumed when this entry's content
    /// was complete: a Range of `0..compressed_end` reaches it.
    pub compressed_end: u64,
}

impl IndexEntry {
    /// An entry of `kind` at `path` with every other field zero or empty
    /// (for building indexes by hand: tests, benchmarks).
    pub fn new(path: impl Into<Vec<u8>>, kind: EntryKind) -> IndexEntry {
        IndexEntry {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            link: Vec::new(),
            major: 0,
            minor: 0,
            xattrs: Vec::new(),
            object: None,
            offset: 0,
            sparse: None,
            compressed_end: 0,
        }
    }

    /// Bytes of the uncompressed stream its content takes from `offset`.
    pub fn extent(&self) -> u64 {
        self.sparse.as_ref().map_or(self.size, |m| m.extent())
    }
}

/// Everything known about one layer after it was read once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerIndex {
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// The layer's (compressed) digest.
    pub digest: String,
    /// What the index was checked against: `None` when the whole blob
    /// matched `digest`; for an index made from a TOC, the pin of the
    /// descriptor that asked for it (format and TOC digest, see
    /// [`crate::rootfs::LayerKey`]). Right after `digest` so that
    /// [`IndexStore::serves`] reads only the head of the file.
    pub pin: Option<String>,
    /// Its compression.
    pub compression: Compression,
    /// How its content is reached.
    pub mode: LayerMode,
    /// Compressed size.
    pub compressed_size: u64,
    /// Uncompressed (tar) size.
    pub uncompressed_size: u64,
    /// Entries in tar order.
    pub entries: Vec<IndexEntry>,
    /// Gzip checkpoints (mode [`LayerMode::SpanIndex`]).
    pub spans: Option<gzindex::SpanIndex>,
}

impl LayerIndex {
    /// Whether a descriptor of this layer with TOC pin `pin` may use this
    /// index: a verified one serves all; one made from a TOC only the
    /// descriptors carrying its pin (see the module's trust contract).
    pub fn serves(&self, pin: Option<&str>) -> bool {
        serves(self.pin.as_deref(), pin)
    }

    /// The objects of its files (one per file with content).
    pub fn objects(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.entries.iter().filter_map(|e| e.object)
    }

    /// An uncompressed layer of `entries`, read whole (for tests).
    #[cfg(test)]
    pub fn of_entries(entries: Vec<IndexEntry>) -> LayerIndex {
        LayerIndex {
            version: 1,
            digest: "sha256:x".into(),
            pin: None,
            compression: Compression::None,
            mode: Default::default(),
            compressed_size: 0,
            uncompressed_size: 0,
            entries,
            spans: None,
        }
    }
}

fn serves(made_with: Option<&str>, asked: Option<&str>) -> bool {
    made_with.is_none() || made_with == asked
}

/// How a [`LayerIndex`] is saved: its head ([`Summary`], which counts
/// its objects, so that [`IndexStore::summary`] reads only the start of
/// the file), then its entries and spans. ([`Saved`] reads it back:
/// postcard writes a nested struct's fields in line, and a slice as a
/// `Vec`.)
#[derive(Serialize)]
struct Saving<'a> {
    head: Summary,
    entries: &'a [IndexEntry],
    spans: &'a Option<gzindex::SpanIndex>,
}

/// A saved index, read back (see [`Saving`]).
#[derive(Deserialize)]
struct Saved {
    head: Summary,
    entries: Vec<IndexEntry>,
    spans: Option<gzindex::SpanIndex>,
}

/// The head of a saved index: what `status` shows of a layer indexed
/// before, without decoding its entries.
#[derive(Debug, Serialize, Deserialize)]
pub struct Summary {
    version: u32,
    digest: String,
    pin: Option<String>,
    /// Its compression.
    pub compression: Compression,
    /// How its content is reached.
    pub mode: LayerMode,
    /// Compressed size.
    pub compressed_size: u64,
    /// Uncompressed (tar) size.
    pub uncompressed_size: u64,
    /// Files with content (one object each).
    pub objects: u64,
}

/// Where layer indexes live.
#[derive(Debug, Clone)]
pub struct IndexStore {
    dir: PathBuf,
}

impl IndexStore {
    /// Opens (creating) `<cache-dir>/layers`.
    pub fn open(cache_dir: &Path) -> std::io::Result<IndexStore> {
        let dir = cache_dir.join("layers");
        std::fs::create_dir_all(&dir)?;
        Ok(IndexStore { dir })
    }

    /// The directory (sidecars such as [`seekable::ChunkStore`] live here too).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{}.idx", digest.trim_start_matches("sha256:")))
    }

    /// The persisted index of `digest`, if present, readable and one a
    /// descriptor with TOC pin `pin` may use ([`LayerIndex::serves`]).
    pub fn load(&self, digest: &str, pin: Option<&str>) -> Option<LayerIndex> {
        let data = std::fs::read(self.path(digest)).ok()?;
        // An older encoding is made again, not misread.
        if postcard::take_from_bytes::<u32>(&data).ok()?.0 != INDEX_VERSION {
            return None;
        }
        let loaded = postcard::from_bytes::<Saved>(&data).map(|s| LayerIndex {
            version: s.head.version,
            digest: s.head.digest,
            pin: s.head.pin,
            compression: s.head.compression,
            mode: s.head.mode,
            compressed_size: s.head.compressed_size,
            uncompressed_size: s.head.uncompressed_size,
            entries: s.entries,
            spans: s.spans,
        });
        match loaded {
            Ok(i) if i.digest == digest && i.serves(pin) => Some(i),
            Ok(i) if i.digest == digest => {
                tracing::info!(digest, made_with = ?i.pin, asked = ?pin, "the saved index of this layer was made from a TOC this descriptor does not pin; it makes its own");
                None
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(digest, error = %e, "layer index unreadable; the layer will be read again");
                None
            }
        }
    }

    /// Whether an index of `digest` that a descriptor with TOC pin `pin`
    /// may use is on disk (reads only the head of the file).
    pub fn serves(&self, digest: &str, pin: Option<&str>) -> bool {
        self.summary(digest, pin).is_some()
    }

    /// The head of the saved index of `digest`, if it is one a descriptor
    /// with TOC pin `pin` may use (reads only the head of the file).
    pub fn summary(&self, digest: &str, pin: Option<&str>) -> Option<Summary> {
        use std::io::Read;
        let mut head = Vec::with_capacity(4096);
        std::fs::File::open(self.path(digest))
            .and_then(|f| f.take(4096).read_to_end(&mut head))
            .ok()?;
        let (h, _) = postcard::take_from_bytes::<Summary>(&head).ok()?;
        (h.version == INDEX_VERSION && h.digest == digest && serves(h.pin.as_deref(), pin))
            .then_some(h)
    }

    /// Persists `index` (temporary file, then rename).
    pub fn save(&self, index: &LayerIndex) -> std::io::Result<()> {
        let saving = Saving {
            head: Summary {
                version: index.version,
                digest: index.digest.clone(),
                pin: index.pin.clone(),
                compression: index.compression,
                mode: index.mode,
                compressed_size: index.compressed_size,
                uncompressed_size: index.uncompressed_size,
                objects: index.objects().count() as u64,
            },
            entries: &index.entries,
            spans: &index.spans,
        };
        let data = postcard::to_stdvec(&saving).map_err(std::io::Error::other)?;
        let path = self.path(&index.digest);
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        // A failed write (a full disk) leaves nothing behind.
        if let Err(e) = std::fs::write(&tmp, &data) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path)
    }

    /// Number of indexed layers (for `cache stats`).
    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".idx"))
                    .count()
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn index(pin: Option<&str>) -> LayerIndex {
        LayerIndex {
            version: INDEX_VERSION,
            digest: X.into(),
            pin: pin.map(str::to_string),
            compression: Compression::Gzip,
            mode: if pin.is_some() {
                LayerMode::Estargz
            } else {
                LayerMode::SpanIndex
            },
            compressed_size: 1,
            uncompressed_size: 2,
            entries: vec![IndexEntry::new("etc", EntryKind::Dir)],
            spans: None,
        }
    }

    /// A saved index made from a TOC is loaded only for its own pin; one
    /// made from the verified blob for every descriptor; the one saved
    /// last replaces the other.
    #[test]
    fn saved_pin_decides_who_may_load_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = IndexStore::open(dir.path()).unwrap();
        let (p, q) = (Some("estargz:sha256:aa"), Some("estargz:sha256:bb"));
        store.save(&index(p)).unwrap();
        assert_eq!(store.load(X, p).unwrap().pin.as_deref(), p);
        assert!(store.serves(X, p));
        for other in [None, q, Some("zstd:chunked:toc:sha256:aa")] {
            assert!(store.load(X, other).is_none(), "{other:?}");
            assert!(!store.serves(X, other), "{other:?}");
        }
        // Made whole and checked: the truth for X, whatever the pin.
        store.save(&index(None)).unwrap();
        for any in [None, p, q] {
            assert!(store.load(X, any).unwrap().pin.is_none(), "{any:?}");
            assert!(store.serves(X, any), "{any:?}");
        }
        assert!(store.load(&X.replace('0', "f"), None).is_none());
    }

    /// An index of an older encoding is not misread (it is made again).
    #[test]
    fn older_index_versions_are_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = IndexStore::open(dir.path()).unwrap();
        let old = LayerIndex {
            version: INDEX_VERSION - 1,
            ..index(None)
        };
        store.save(&old).unwrap();
        assert!(store.load(X, None).is_none());
        assert!(!store.serves(X, None));
    }

    /// A saved index's head says what `status` shows of it (read without
    /// its entries), and the whole index reads back as it was saved.
    #[test]
    fn a_saved_index_summarises_itself_in_its_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = IndexStore::open(dir.path()).unwrap();
        let mut i = index(None);
        let mut f = IndexEntry::new("etc/f", EntryKind::File);
        f.object = Some([7; 32]);
        f.sparse = Some(Box::new(sparse::SparseMap {
            map_len: 512,
            regions: vec![(4096, 10)],
        }));
        i.entries
            .extend([f.clone(), f, IndexEntry::new("etc/empty", EntryKind::File)]);
        i.entries
            .extend((0..10_000).map(|n| IndexEntry::new(format!("d/{n}"), EntryKind::Dir)));
        store.save(&i).unwrap();
        let s = store.summary(X, None).unwrap();
        assert_eq!(
            (s.mode, s.compressed_size, s.uncompressed_size, s.objects),
            (LayerMode::SpanIndex, 1, 2, 2)
        );
        assert!(store.summary(X, Some("estargz:sha256:aa")).is_some());
        let back = store.load(X, None).unwrap();
        assert_eq!(back.entries.len(), i.entries.len());
        assert_eq!(back.objects().count(), 2);
        assert_eq!(back.entries[1].sparse, i.entries[1].sparse);
        assert_eq!(back.entries.last().unwrap().path, b"d/9999");
    }
}
