//! Seekable layer formats (eStargz, zstd:chunked): a table of contents
//! (TOC) read by Range instead of streaming the layer, turned into the same
//! [`LayerIndex`] a streamed layer has, plus a [`ChunkTable`] that says where
//! each file's compressed chunks are.
//!
//! Contracts:
//! - **Verification**: a TOC is used only after its bytes matched the digest
//!   the manifest pins (annotation); every chunk is checked against its
//!   `chunkDigest` and every file against its `digest` (= its object id, so
//!   content dedups with streamed layers). Nothing unverified is returned.
//! - **Hostile TOCs**: offsets past the data, chunks that do not tile their
//!   file, absurd sizes and paths escaping the root are [`SeekError::Toc`]
//!   (the image is EIO), never trusted.
//! - **Semantics**: entries mean what a streamed tar's entries mean (paths
//!   normalised, whiteouts kept as `.wh.` files for the merge); landmark
//!   files (`.prefetch.landmark`, `.no.prefetch.landmark`) are not part of
//!   the image and are dropped.
//! - **Pinned**: an index and chunk table made from a TOC carry the pin it
//!   was checked against ([`Layout::pin`]); they serve only descriptors
//!   with that pin, never every descriptor of the blob digest (the blob
//!   itself is never checked in lazy mode; see [`crate::layer`]).
//!
//! ```text
//! <cache-dir>/layers/<64 hex>.chunks   postcard ChunkTable (sidecar of the .idx)
//! ```

pub mod estargz;
pub mod zstd_chunked;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::stream::normalize;
use super::{Compression, EntryKind, INDEX_VERSION, IndexEntry, LayerIndex, LayerMode};
use crate::cas::{ObjectId, Sha256};

/// Bump when the sidecar encoding changes; older tables are re-made.
pub const CHUNK_TABLE_VERSION: u32 = 2;
/// Largest uncompressed chunk accepted (estargz uses 4 MiB).
pub const MAX_CHUNK: u64 = 64 << 20;
/// Largest compressed span of one chunk accepted.
pub const MAX_COMPRESSED_CHUNK: u64 = 2 * MAX_CHUNK + (1 << 20);
/// Largest TOC accepted, compressed or not.
pub const MAX_TOC: u64 = 256 << 20;
/// Name of the landmark that ends the prioritised (prefetch) region.
pub const PREFETCH_LANDMARK: &[u8] = b".prefetch.landmark";
/// Name of the landmark saying there is no prioritised region.
pub const NO_PREFETCH_LANDMARK: &[u8] = b".no.prefetch.landmark";

/// Why a seekable layer could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SeekError {
    /// The footer or TOC location is missing or unusable; the layer can
    /// still be streamed (its digest verifies it).
    #[error("unusable footer: {0}")]
    Footer(String),
    /// The TOC lost information the layer has: JSON cannot carry names
    /// that are not UTF-8 (converters write U+FFFD instead). The layer can
    /// still be streamed.
    #[error("the TOC cannot represent {0}")]
    Lossy(String),
    /// The TOC bytes do not match the digest the manifest pins.
    #[error("TOC digest mismatch: expected {expected}, got {actual}")]
    TocDigest {
        /// From the annotation.
        expected: String,
        /// Of the bytes served.
        actual: String,
    },
    /// A (verified) TOC that is malformed or hostile.
    #[error("malformed TOC: {0}")]
    Toc(String),
    /// Chunk bytes that do not decompress as the TOC says.
    #[error("bad chunk at {offset}: {reason}")]
    Chunk {
        /// Compressed offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Chunk bytes that fail their digest.
    #[error("chunk at {offset}: digest mismatch: expected {expected}, got {actual}")]
    ChunkDigest {
        /// Compressed offset.
        offset: u64,
        /// From the TOC.
        expected: String,
        /// Of the bytes served.
        actual: String,
    },
}

/// Which seekable format a layer is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    /// One gzip member per chunk.
    Estargz,
    /// One zstd frame per chunk.
    ZstdChunked,
}

impl Format {
    /// The layer mode `status` shows.
    pub fn mode(self) -> LayerMode {
        match self {
            Format::Estargz => LayerMode::Estargz,
            Format::ZstdChunked => LayerMode::ZstdChunked,
        }
    }
}

/// One chunk of a file: compressed bytes `offset..end` of the blob
/// decompress to `inner_offset` bytes to skip, then `size` bytes of the
/// file starting at `chunk_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Compressed start in the blob.
    pub offset: u64,
    /// Compressed end (exclusive): next distinct offset, or the TOC.
    pub end: u64,
    /// Decompressed bytes to skip before the chunk's data.
    pub inner_offset: u64,
    /// Where the chunk's data goes in the file.
    pub chunk_offset: u64,
    /// Uncompressed size.
    pub size: u64,
    /// sha256 of the uncompressed chunk, when the TOC gives one.
    pub digest: Option<ObjectId>,
    /// A hole (zstd:chunked `chunkType: zeros`): `size` zero bytes, nothing fetched.
    pub zeros: bool,
}

/// One file's content: its object and its chunks in file order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileChunks {
    /// sha256 of the whole content.
    pub object: ObjectId,
    /// Content size.
    pub size: u64,
    /// Chunks tiling `0..size`, in file (and blob) order.
    pub chunks: Vec<Chunk>,
}

/// Where every file of a seekable layer is, from its verified TOC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkTable {
    /// [`CHUNK_TABLE_VERSION`].
    pub version: u32,
    /// The layer's digest.
    pub digest: String,
    /// The TOC pin it was checked against ([`Layout::pin`]).
    pub pin: String,
    /// Its format.
    pub format: Format,
    /// Files with content, one per object.
    pub files: Vec<FileChunks>,
    /// End of the prioritised region (the prefetch landmark's offset).
    pub prefetch_end: Option<u64>,
}

impl ChunkTable {
    /// The file whose content is `id`.
    pub fn file(&self, id: &ObjectId) -> Option<&FileChunks> {
        self.files.iter().find(|f| &f.object == id)
    }
}

/// Sidecar files next to the layer indexes.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
}

impl ChunkStore {
    /// Tables kept in `dir` (the layer index directory).
    pub fn new(dir: &Path) -> ChunkStore {
        ChunkStore {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{}.chunks", digest.trim_start_matches("sha256:")))
    }

    /// The table of layer `digest`, if present, current and made from the
    /// TOC that `pin` names (a table made from another descriptor's TOC is
    /// none of this one's business).
    pub fn load(&self, digest: &str, pin: &str) -> Option<ChunkTable> {
        let data = std::fs::read(self.path(digest)).ok()?;
        if postcard::take_from_bytes::<u32>(&data).ok()?.0 != CHUNK_TABLE_VERSION {
            return None;
        }
        match postcard::from_bytes::<ChunkTable>(&data) {
            Ok(t) if t.digest == digest && t.pin == pin => Some(t),
            _ => None,
        }
    }

    /// Persists `t` (temporary file, then rename).
    pub fn save(&self, t: &ChunkTable) -> std::io::Result<()> {
        let data = postcard::to_stdvec(t).map_err(std::io::Error::other)?;
        let path = self.path(&t.digest);
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, &data)?;
        std::fs::rename(&tmp, &path)
    }
}

/// One TOC entry; the union of eStargz's and zstd:chunked's fields.
#[derive(Debug, Deserialize)]
pub struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    modtime: Option<String>,
    #[serde(default, rename = "linkName")]
    link_name: String,
    #[serde(default)]
    mode: u64,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default, rename = "devMajor")]
    dev_major: u32,
    #[serde(default, rename = "devMinor")]
    dev_minor: u32,
    #[serde(default)]
    xattrs: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    offset: u64,
    #[serde(default, rename = "endOffset")]
    end_offset: u64,
    #[serde(default, rename = "innerOffset")]
    inner_offset: u64,
    #[serde(default, rename = "chunkOffset")]
    chunk_offset: u64,
    #[serde(default, rename = "chunkSize")]
    chunk_size: u64,
    #[serde(default, rename = "chunkDigest")]
    chunk_digest: String,
    #[serde(default, rename = "chunkType")]
    chunk_type: String,
}

/// A TOC document.
#[derive(Debug, Deserialize)]
pub struct Toc {
    /// Format version (1).
    #[serde(default)]
    pub version: u32,
    /// Entries in layer order.
    pub entries: Vec<TocEntry>,
}

/// Parses TOC JSON (already verified against its digest).
pub fn parse_toc(json: &[u8]) -> Result<Toc, SeekError> {
    serde_json::from_slice(json).map_err(|e| SeekError::Toc(format!("json: {e}")))
}

/// sha256 of `data` as `sha256:<hex>`.
pub fn digest_of(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    format!("sha256:{}", hex::encode(h.finish()))
}

/// `sha256:<64 hex>` as an object id.
pub fn parse_digest(s: &str) -> Option<ObjectId> {
    let hex = s.strip_prefix("sha256:")?;
    let mut id = [0u8; 32];
    hex::decode_to_slice(hex, &mut id).ok()?;
    Some(id)
}

/// The object id of empty content.
pub fn empty_object() -> ObjectId {
    Sha256::new().finish()
}

/// What a layer's index is built from besides its TOC.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The layer digest.
    pub digest: String,
    /// What the TOC was checked against: its format and the digest the
    /// descriptor's annotation pins (kept in the index and the table).
    pub pin: String,
    /// Its format.
    pub format: Format,
    /// Compressed size of the blob.
    pub compressed_size: u64,
    /// Uncompressed size, when an annotation says (else 0).
    pub uncompressed_size: u64,
    /// Where file data ends (the TOC's start).
    pub data_end: u64,
}

/// RFC 3339 time (`modtime`) as (seconds, nanoseconds).
fn parse_time(s: &str) -> Result<(i64, u32), SeekError> {
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map_err(|e| SeekError::Toc(format!("modtime {s:?}: {e}")))?;
    Ok((t.timestamp(), t.timestamp_subsec_nanos()))
}

/// Builds the layer index and chunk table from a verified TOC.
pub fn build(toc: Toc, layout: &Layout) -> Result<(LayerIndex, ChunkTable), SeekError> {
    use base64::Engine as _;
    let bad = |m: String| Err(SeekError::Toc(m));
    // Every distinct chunk start, to find each chunk's compressed end.
    let mut starts: BTreeSet<u64> = BTreeSet::new();
    for e in &toc.entries {
        let has_data = match e.kind.as_str() {
            "reg" => e.size > 0,
            "chunk" => e.chunk_type != "zeros",
            _ => false,
        };
        if has_data {
            if e.offset >= layout.data_end {
                return bad(format!(
                    "{:?}: offset {} is past the data end {}",
                    e.name, e.offset, layout.data_end
                ));
            }
            starts.insert(e.offset);
        }
    }
    let end_of = |e: &TocEntry| -> Result<u64, SeekError> {
        let end = if e.end_offset > 0 {
            e.end_offset
        } else {
            starts
                .range(e.offset + 1..)
                .next()
                .copied()
                .unwrap_or(layout.data_end)
        };
        if end <= e.offset || end > layout.data_end || end - e.offset > MAX_COMPRESSED_CHUNK {
            return Err(SeekError::Toc(format!(
                "{:?}: chunk {}..{end} is out of bounds",
                e.name, e.offset
            )));
        }
        Ok(end)
    };
    let mut entries: Vec<IndexEntry> = Vec::with_capacity(toc.entries.len());
    let mut files: Vec<FileChunks> = Vec::new();
    let mut by_object: HashMap<ObjectId, usize> = HashMap::new();
    // (index entry, file being assembled, next file offset)
    let mut open: Option<(usize, FileChunks)> = None;
    let mut prefetch_end = None;
    let close = |open: &mut Option<(usize, FileChunks)>,
                 entries: &mut Vec<IndexEntry>,
                 files: &mut Vec<FileChunks>,
                 by_object: &mut HashMap<ObjectId, usize>|
     -> Result<(), SeekError> {
        if let Some((idx, f)) = open.take() {
            let have: u64 = f.chunks.iter().map(|c| c.size).sum();
            if have != f.size {
                return Err(SeekError::Toc(format!(
                    "{:?}: chunks cover {have} of {} bytes",
                    String::from_utf8_lossy(&entries[idx].path),
                    f.size
                )));
            }
            if let Some(c) = f.chunks.iter().rev().find(|c| !c.zeros) {
                entries[idx].compressed_end = c.end;
            }
            if let std::collections::hash_map::Entry::Vacant(v) = by_object.entry(f.object) {
                v.insert(files.len());
                files.push(f);
            }
        }
        Ok(())
    };
    for e in toc.entries {
        if e.kind == "chunk" {
            let Some((idx, f)) = open.as_mut() else {
                return bad(format!("{:?}: chunk without a file", e.name));
            };
            let next: u64 = f.chunks.iter().map(|c| c.size).sum();
            let name_ok =
                normalize(e.name.as_bytes()).ok().as_deref() == Some(&entries[*idx].path[..]);
            if !name_ok || e.chunk_offset != next {
                return bad(format!(
                    "{:?}: chunk at file offset {} does not follow the previous one ({next})",
                    e.name, e.chunk_offset
                ));
            }
            let size = if e.chunk_size > 0 {
                e.chunk_size
            } else {
                f.size.saturating_sub(e.chunk_offset)
            };
            let zeros = e.chunk_type == "zeros";
            let prev_end = f.chunks.iter().rev().find(|c| !c.zeros).map(|c| c.offset);
            if !zeros && prev_end.is_some_and(|p| e.offset <= p) {
                return bad(format!("{:?}: chunks go backwards in the blob", e.name));
            }
            let end = if zeros { e.offset } else { end_of(&e)? };
            push_chunk(f, &e, end, size, zeros)?;
            continue;
        }
        close(&mut open, &mut entries, &mut files, &mut by_object)?;
        let lossy = |s: &str| s.contains(char::REPLACEMENT_CHARACTER);
        if lossy(&e.name) || lossy(&e.link_name) || e.xattrs.iter().flatten().any(|(k, _)| lossy(k))
        {
            return Err(SeekError::Lossy(format!(
                "the name {:?} (not UTF-8 in the layer?)",
                e.name
            )));
        }
        let path = normalize(e.name.as_bytes()).map_err(SeekError::Toc)?;
        if path == PREFETCH_LANDMARK {
            prefetch_end = Some(e.offset);
            continue;
        }
        if path == NO_PREFETCH_LANDMARK {
            continue;
        }
        let kind = match e.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::File,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::CharDev,
            "block" => EntryKind::BlockDev,
            "fifo" => EntryKind::Fifo,
            other => return bad(format!("{:?}: unknown entry type {other:?}", e.name)),
        };
        let (mtime, mtime_nsec) = match e.modtime.as_deref() {
            Some(t) if !t.is_empty() => parse_time(t)?,
            _ => (0, 0),
        };
        let mut xattrs = Vec::new();
        for (k, v) in e.xattrs.iter().flatten() {
            let v = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|err| SeekError::Toc(format!("{:?}: xattr {k}: {err}", e.name)))?;
            xattrs.push((k.as_bytes().to_vec(), v));
        }
        let link = match kind {
            EntryKind::Symlink => e.link_name.as_bytes().to_vec(),
            EntryKind::Hardlink => normalize(e.link_name.as_bytes())
                .map_err(|m| SeekError::Toc(format!("hard link: {m}")))?,
            _ => Vec::new(),
        };
        let mut object = None;
        if kind == EntryKind::File {
            let id = if e.size == 0 {
                empty_object()
            } else {
                parse_digest(&e.digest).ok_or_else(|| {
                    SeekError::Toc(format!(
                        "{:?}: bad or missing digest {:?}",
                        e.name, e.digest
                    ))
                })?
            };
            object = Some(id);
        }
        entries.push(IndexEntry {
            path,
            kind,
            mode: (e.mode & 0o7777) as u32,
            uid: e.uid,
            gid: e.gid,
            mtime,
            mtime_nsec,
            size: if kind == EntryKind::File { e.size } else { 0 },
            link,
            major: e.dev_major,
            minor: e.dev_minor,
            xattrs,
            object,
            offset: 0,
            sparse: None,
            compressed_end: 0,
        });
        if kind == EntryKind::File && e.size > 0 {
            let mut f = FileChunks {
                object: object.expect("set above"),
                size: e.size,
                chunks: Vec::new(),
            };
            if e.chunk_offset != 0 {
                return bad(format!(
                    "{:?}: first chunk at file offset {}",
                    e.name, e.chunk_offset
                ));
            }
            let size = if e.chunk_size > 0 {
                e.chunk_size
            } else {
                e.size
            };
            let zeros = e.chunk_type == "zeros";
            let end = if zeros { e.offset } else { end_of(&e)? };
            push_chunk(&mut f, &e, end, size, zeros)?;
            open = Some((entries.len() - 1, f));
        }
    }
    close(&mut open, &mut entries, &mut files, &mut by_object)?;
    let index = LayerIndex {
        version: INDEX_VERSION,
        digest: layout.digest.clone(),
        pin: Some(layout.pin.clone()),
        compression: match layout.format {
            Format::Estargz => Compression::Gzip,
            Format::ZstdChunked => Compression::Zstd,
        },
        mode: layout.format.mode(),
        compressed_size: layout.compressed_size,
        uncompressed_size: layout.uncompressed_size,
        entries,
        spans: None,
    };
    let table = ChunkTable {
        version: CHUNK_TABLE_VERSION,
        digest: layout.digest.clone(),
        pin: layout.pin.clone(),
        format: layout.format,
        files,
        prefetch_end,
    };
    Ok((index, table))
}

fn push_chunk(
    f: &mut FileChunks,
    e: &TocEntry,
    end: u64,
    size: u64,
    zeros: bool,
) -> Result<(), SeekError> {
    let covered: u64 = f.chunks.iter().map(|c| c.size).sum();
    if size == 0 || size > MAX_CHUNK || covered + size > f.size {
        return Err(SeekError::Toc(format!(
            "{:?}: chunk of {size} bytes at file offset {covered} does not fit a {}-byte file",
            e.name, f.size
        )));
    }
    if e.inner_offset > MAX_CHUNK {
        return Err(SeekError::Toc(format!(
            "{:?}: inner offset {} is absurd",
            e.name, e.inner_offset
        )));
    }
    let digest = if e.chunk_digest.is_empty() {
        None
    } else {
        Some(parse_digest(&e.chunk_digest).ok_or_else(|| {
            SeekError::Toc(format!(
                "{:?}: bad chunk digest {:?}",
                e.name, e.chunk_digest
            ))
        })?)
    };
    f.chunks.push(Chunk {
        offset: e.offset,
        end,
        inner_offset: e.inner_offset,
        chunk_offset: covered,
        size,
        digest,
        zeros,
    });
    Ok(())
}

/// Decompresses one chunk from its compressed bytes (`data` is exactly
/// `chunk.offset..chunk.end` of the blob) and checks its digest.
pub fn decode_chunk(format: Format, data: &[u8], chunk: &Chunk) -> Result<Vec<u8>, SeekError> {
    if chunk.zeros {
        return Ok(vec![0; chunk.size as usize]);
    }
    let bad = |reason: String| SeekError::Chunk {
        offset: chunk.offset,
        reason,
    };
    let mut reader: Box<dyn Read + '_> = match format {
        Format::Estargz => Box::new(flate2::bufread::MultiGzDecoder::new(data)),
        Format::ZstdChunked => Box::new(
            zstd::stream::read::Decoder::with_buffer(data).map_err(|e| bad(e.to_string()))?,
        ),
    };
    let skipped = std::io::copy(
        &mut (&mut reader).take(chunk.inner_offset),
        &mut std::io::sink(),
    )
    .map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::with_capacity(chunk.size as usize);
    (&mut reader)
        .take(chunk.size)
        .read_to_end(&mut out)
        .map_err(|e| bad(e.to_string()))?;
    if skipped != chunk.inner_offset || out.len() as u64 != chunk.size {
        return Err(bad(format!(
            "decompressed to {} bytes, the TOC says {}",
            skipped + out.len() as u64,
            chunk.inner_offset + chunk.size
        )));
    }
    if let Some(want) = chunk.digest {
        let mut h = Sha256::new();
        h.update(&out);
        let got = h.finish();
        if got != want {
            return Err(SeekError::ChunkDigest {
                offset: chunk.offset,
                expected: format!("sha256:{}", hex::encode(want)),
                actual: format!("sha256:{}", hex::encode(got)),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const D: &str = "sha256:8e3b219d0f2b71146d2b90b497fb3e68de8a21488ca93c9657b228430e1909a6";

    fn layout() -> Layout {
        Layout {
            digest: "sha256:layer".into(),
            pin: "estargz:sha256:toc".into(),
            format: Format::Estargz,
            compressed_size: 10_000,
            uncompressed_size: 0,
            data_end: 9_000,
        }
    }

    fn build_json(entries: &str) -> Result<(LayerIndex, ChunkTable), SeekError> {
        let toc = parse_toc(format!(r#"{{"version":1,"entries":[{entries}]}}"#).as_bytes())?;
        build(toc, &layout())
    }

    /// Index and table keep the pin they were made with; a saved table is
    /// loaded only for that pin.
    #[test]
    fn tables_keep_their_pin() {
        let (idx, t) = build_json(r#"{"name":"etc/","type":"dir"}"#).unwrap();
        assert_eq!(idx.pin.as_deref(), Some("estargz:sha256:toc"));
        assert!(idx.serves(Some("estargz:sha256:toc")));
        assert!(!idx.serves(None) && !idx.serves(Some("estargz:sha256:other")));
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::new(dir.path());
        store.save(&t).unwrap();
        assert!(store.load("sha256:layer", "estargz:sha256:toc").is_some());
        assert!(store.load("sha256:layer", "estargz:sha256:other").is_none());
        assert!(store.load("sha256:other", "estargz:sha256:toc").is_none());
    }

    #[test]
    fn builds_entries_and_chunks() {
        let (idx, t) = build_json(&format!(
            r#"{{"name":"etc/","type":"dir","mode":493,"modtime":"2020-01-02T03:04:05Z"}},
               {{"name":"etc/a","type":"reg","size":10,"offset":100,"digest":"{D}","chunkSize":6,"mode":2541,"uid":7,"xattrs":{{"user.x":"YmFy"}}}},
               {{"name":"etc/a","type":"chunk","offset":200,"chunkOffset":6,"digest":"{D}"}},
               {{"name":".prefetch.landmark","type":"reg","size":1,"offset":300,"digest":"{D}"}},
               {{"name":"etc/.wh.gone","type":"reg","size":0}},
               {{"name":"etc/l","type":"hardlink","linkName":"/etc/a"}},
               {{"name":"dev/null","type":"char","devMajor":1,"devMinor":3}}"#
        ))
        .unwrap();
        let paths: Vec<&[u8]> = idx.entries.iter().map(|e| &e.path[..]).collect();
        assert_eq!(
            paths,
            [
                &b"etc"[..],
                b"etc/a",
                b"etc/.wh.gone",
                b"etc/l",
                b"dev/null"
            ]
        );
        let a = &idx.entries[1];
        assert_eq!((a.mode, a.uid, a.size), (0o4755, 7, 10));
        assert_eq!(a.xattrs, vec![(b"user.x".to_vec(), b"bar".to_vec())]);
        assert_eq!(idx.entries[0].mtime, 1_577_934_245);
        assert_eq!(idx.entries[2].object, Some(empty_object()));
        assert_eq!(idx.entries[3].link, b"etc/a");
        assert_eq!(idx.entries[4].major, 1);
        assert_eq!(idx.mode, LayerMode::Estargz);
        assert_eq!(t.prefetch_end, Some(300));
        let c = &t.files[0].chunks;
        assert_eq!((c[0].offset, c[0].end, c[0].size), (100, 200, 6));
        assert_eq!((c[1].offset, c[1].end, c[1].size), (200, 300, 4));
    }

    #[test]
    fn rejects_lying_tocs() {
        let reg = |extra: &str| {
            format!(r#"{{"name":"f","type":"reg","size":10,"digest":"{D}",{extra}}}"#)
        };
        for (what, entries) in [
            ("offset past the data", reg(r#""offset":9000"#)),
            (
                "path escape",
                r#"{"name":"../../etc/x","type":"dir"}"#.to_string(),
            ),
            (
                "hard link escape",
                r#"{"name":"l","type":"hardlink","linkName":"../../x"}"#.to_string(),
            ),
            (
                "negative size",
                r#"{"name":"f","type":"reg","size":-1}"#.to_string(),
            ),
            ("huge chunk", reg(r#""offset":1,"chunkSize":999999999999"#)),
            (
                "chunks short of the size",
                reg(r#""offset":1,"chunkSize":4"#),
            ),
            (
                "chunk gap",
                reg(
                    r#""offset":1,"chunkSize":4},{"name":"f","type":"chunk","offset":50,"chunkOffset":5"#,
                ),
            ),
            (
                "chunks going backwards",
                reg(
                    r#""offset":100,"chunkSize":4},{"name":"f","type":"chunk","offset":50,"chunkOffset":4"#,
                ),
            ),
            ("end past the data", reg(r#""offset":1,"endOffset":99999"#)),
            (
                "no digest",
                r#"{"name":"f","type":"reg","size":3,"offset":1}"#.to_string(),
            ),
            (
                "bad mtime",
                r#"{"name":"d","type":"dir","modtime":"yesterday"}"#.to_string(),
            ),
            (
                "unknown type",
                r#"{"name":"d","type":"socket"}"#.to_string(),
            ),
        ] {
            let r = build_json(&entries);
            assert!(matches!(r, Err(SeekError::Toc(_))), "{what}: {r:?}");
        }
        let r = build_json(r#"{"name":"caf\ufffd","type":"dir"}"#);
        assert!(matches!(r, Err(SeekError::Lossy(_))), "{r:?}");
    }

    #[test]
    fn chunk_digest_is_checked() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"xxhello").unwrap();
        let data = gz.finish().unwrap();
        let mut h = Sha256::new();
        h.update(b"hello");
        let mut c = Chunk {
            offset: 0,
            end: data.len() as u64,
            inner_offset: 2,
            chunk_offset: 0,
            size: 5,
            digest: Some(h.finish()),
            zeros: false,
        };
        assert_eq!(decode_chunk(Format::Estargz, &data, &c).unwrap(), b"hello");
        c.digest = Some([0; 32]);
        assert!(matches!(
            decode_chunk(Format::Estargz, &data, &c),
            Err(SeekError::ChunkDigest { .. })
        ));
        c.size = 50;
        c.digest = None;
        assert!(matches!(
            decode_chunk(Format::Estargz, &data, &c),
            Err(SeekError::Chunk { .. })
        ));
    }
}
