//! Reading a layer once: decompress the stream, walk its tar entries, store
//! every regular file's content as an object, and return the index.
//!
//! This runs on a blocking thread and reads from a channel fed by the
//! network task (see `ChannelReader`), so a whole blob is never held in
//! memory: at most the channel's few chunks plus one copy buffer. The
//! compressed digest is checked by the feeder.
//!
//! Hashing file contents is a large cost (no SHA extensions on many
//! servers), so reading a layer is a pipeline: this thread decompresses and
//! parses the tar while a writer thread hashes and stores the contents,
//! with the feeder hashing the compressed bytes on a third.
//!
//! Contract (**bounded entries**): a regular file larger than the cache's
//! bound ([`ObjectStore::max_object`], `--cache-size`) is refused at its
//! header, before a byte of its content is read, by every pass (the
//! listing pass [`scan_layer`] included): [`StreamError::TooLarge`], and
//! the layer fails. A decompression bomb (gigabytes of zeros compressed to
//! kilobytes) thus costs neither time nor disk nor the rest of the cache.
//! GNU sparse entries (type `S`, whose header declares a real size the
//! layer need not hold) are refused as malformed, as `umoci unpack` (the
//! oracle), containerd and Docker refuse them. PAX sparse files (records
//! `GNU.sparse.*`, GNU tar's `--sparse --format=posix`) are expanded, as
//! umoci expands them ([`super::sparse`]); a map that does not check out is
//! malformed.

use std::io::{self, Read, Write};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, Bytes};

use super::gzindex::{IndexingDecoder, SpanDecoder, SpanIndex};
use super::sparse::{Expand, SparseMap};
use super::spill::{Spill, SpillError, Tee};
use super::{Compression, EntryKind, INDEX_VERSION, IndexEntry, LayerIndex, LayerMode};
use crate::cas::{ObjectId, ObjectStore};
use crate::rootfs::early::LiveLayer;

/// Why reading a layer failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The layer is not a valid (compressed) tar, or an entry is hostile
    /// (a path or hard link escaping the root).
    #[error("malformed layer: {0}")]
    Malformed(String),
    /// The network stream broke (the feeder reports the reason).
    #[error("layer stream interrupted: {0}")]
    Interrupted(String),
    /// Writing to the cache failed.
    #[error("cache write failed: {0}")]
    Local(io::Error),
    /// A file larger than the cache's bound: it could never be kept, so it
    /// is refused at its header, before its content is read.
    #[error(
        "{path}: a file of {size} bytes, larger than the cache bound of {bound} bytes (--cache-size); refused"
    )]
    TooLarge {
        /// The entry's path in the layer.
        path: String,
        /// Its size, as its header says.
        size: u64,
        /// The bound.
        bound: u64,
    },
}

/// An error that came from the network side of the channel.
#[derive(Debug)]
pub struct FetchError(pub String);

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FetchError {}

fn classify_read(e: io::Error) -> StreamError {
    if let Some(f) = e.get_ref().and_then(|i| i.downcast_ref::<FetchError>()) {
        return StreamError::Interrupted(f.0.clone());
    }
    if let Some(SpillError(l)) = e.get_ref().and_then(|i| i.downcast_ref::<SpillError>()) {
        return StreamError::Local(match l.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(l.kind(), l.to_string()),
        });
    }
    StreamError::Malformed(e.to_string())
}

/// `Read` over a file from an offset, by positioned reads (so several
/// readers can share one open file).
pub struct ReadAt<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl<'a> ReadAt<'a> {
    /// Reads `file` from byte `pos`.
    pub fn new(file: &'a std::fs::File, pos: u64) -> ReadAt<'a> {
        ReadAt { file, pos }
    }
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// `Read` over chunks arriving on a tokio channel (blocking receive).
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl ChannelReader {
    /// Reads what `rx` delivers until it closes.
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>) -> ChannelReader {
        ChannelReader {
            rx,
            cur: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(io::Error::other(FetchError(e))),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// Counts what passes through.
struct CountReader<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for CountReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Normalises a tar path: drops `.`, empty components and a leading `/`,
/// resolves `..`; an escape above the root is an error.
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "path {:?} escapes the root",
                        String::from_utf8_lossy(raw)
                    ));
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join(&b'/'))
}

/// Per-layer counters the `status` file shows.
#[derive(Debug, Default)]
pub struct Progress {
    /// Compressed bytes received from the registry.
    pub bytes_fetched: std::sync::atomic::AtomicU64,
    /// Objects written (or found already present).
    pub objects: std::sync::atomic::AtomicU64,
    /// Compressed bytes fetched again (by Range) for evicted content.
    pub bytes_refetched: std::sync::atomic::AtomicU64,
}

/// Counts compressed bytes the decoder has consumed, so each entry can
/// record how much of the blob a Range request must cover to reach it.
struct Counting<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Runs `f` over the decompressed stream of `raw`. With `spans`, a gzip
/// stream is decoded by the span-indexing decoder and its checkpoints are
/// stored there.
fn decoded<R: Read, T>(
    raw: R,
    compression: Compression,
    spans: Option<&mut Option<SpanIndex>>,
    f: impl FnOnce(&mut dyn Read) -> Result<T, StreamError>,
) -> Result<T, StreamError> {
    match (compression, spans) {
        (Compression::None, _) => f(&mut { raw }),
        (Compression::Gzip, Some(spans)) => {
            let mut d = IndexingDecoder::new(raw).map_err(StreamError::Local)?;
            let r = f(&mut d)?;
            *spans = Some(d.into_index());
            Ok(r)
        }
        (Compression::Gzip, None) => f(&mut flate2::read::MultiGzDecoder::new(raw)),
        (Compression::Zstd, _) => match zstd::stream::read::Decoder::new(raw) {
            Ok(mut d) => f(&mut d),
            Err(e) => Err(StreamError::Malformed(format!("zstd: {e}"))),
        },
    }
}

/// What to do after an entry.
enum Flow {
    Continue,
    Stop,
}

/// Walks the tar entries of `decoded`, calling `on_entry` for each. With
/// `drain`, reads the stream to its end afterwards (so the feeder sees the
/// whole blob). Returns the uncompressed size read.
fn walk(
    decoded: &mut dyn Read,
    drain: bool,
    mut on_entry: impl FnMut(
        &mut tar::Entry<'_, CountReader<&mut dyn Read>>,
    ) -> Result<Flow, StreamError>,
) -> Result<u64, StreamError> {
    let hashed = CountReader {
        inner: decoded,
        n: 0,
    };
    let mut archive = tar::Archive::new(hashed);
    for entry in archive.entries().map_err(classify_read)? {
        let mut entry = match entry {
            Ok(e) => e,
            // umoci's own layers end right after the last file's data, with
            // neither padding nor end-of-archive blocks; umoci accepts them
            // and so do we (the blob digest still covers every byte).
            Err(e) if e.to_string() == "unexpected EOF during skip" => break,
            Err(e) => return Err(classify_read(e)),
        };
        if let Flow::Stop = on_entry(&mut entry)? {
            break;
        }
    }
    let mut hashed = archive.into_inner();
    if drain {
        io::copy(&mut hashed, &mut io::sink()).map_err(classify_read)?;
    }
    Ok(hashed.n)
}

/// Where a regular file's content (the reader, and the size it must have)
/// goes: its object id now, or `None` when another thread stores it later.
type ContentFn<'a> = dyn FnMut(&mut dyn Read, u64) -> Result<Option<ObjectId>, StreamError> + 'a;

/// Size of the pieces file contents travel in to the writer thread.
const PIECE: usize = 256 << 10;

/// A message to the writer thread of [`index_layer`].
enum Msg {
    /// Content of entry `idx` follows; it must be `size` bytes.
    Start { idx: usize, size: u64 },
    /// The next piece of it: the first `.1` bytes of the buffer, which
    /// goes back to the reader afterwards (no allocation or zeroing per
    /// piece: measured 6% of a cold start before).
    Data(Vec<u8>, usize),
    /// That was all of it.
    End,
}

/// What a writer made (entry, object, created by it) and the first error
/// it met.
type Written = (Vec<(usize, ObjectId, bool)>, Option<StreamError>);

/// The writer thread of [`index_layer`]: stores the files that arrive on
/// `rx`, handing buffers back on `give_back`.
///
/// One writer, on purpose: two (files spread between them) interleaved
/// objects on disk, and a warm `tar` of minbase, which reads them in tree
/// order after a cache drop, measured ~1.75x of local disk against ~1.65x,
/// while the storing pass gained little.
fn write_objects(
    rx: std::sync::mpsc::Receiver<Msg>,
    give_back: std::sync::mpsc::Sender<Vec<u8>>,
    store: &ObjectStore,
    progress: &Progress,
    live: Option<&LiveLayer>,
) -> Written {
    let mut made: Vec<(usize, ObjectId, bool)> = Vec::new();
    let mut cur: Option<(usize, u64, crate::cas::ObjectWriter<'_>)> = None;
    for m in rx {
        let step = match m {
            Msg::Start { idx, size } => store.writer().map(|w| cur = Some((idx, size, w))),
            Msg::Data(d, n) => {
                let r = match cur.as_mut() {
                    Some((_, _, w)) => w.write_all(&d[..n]),
                    None => Ok(()),
                };
                let _ = give_back.send(d);
                r
            }
            Msg::End => match cur.take() {
                Some((idx, size, w)) if w.len() != size => {
                    return (
                        made,
                        Some(StreamError::Malformed(format!(
                            "entry {idx}: {} of {size} bytes before the stream ended",
                            w.len()
                        ))),
                    );
                }
                Some((idx, _, w)) => w.finish_new().map(|(id, _, new)| {
                    progress.objects.fetch_add(1, Ordering::Relaxed);
                    made.push((idx, id, new));
                    if let Some(l) = live {
                        l.stored(idx, id);
                    }
                }),
                None => Ok(()),
            },
        };
        if let Err(e) = step {
            return (made, Some(StreamError::Local(e)));
        }
    }
    (made, None)
}

/// Reads a whole layer from `raw` (the compressed bytes) into an index,
/// storing file contents in `store`, and publishing each entry and each
/// stored file to `live` as the stream passes them (early answers,
/// [`crate::rootfs::early`]). On error, objects this call created are
/// removed again.
pub fn index_layer<R: Read>(
    raw: R,
    digest: &str,
    compression: Compression,
    compressed_size: u64,
    store: &ObjectStore,
    progress: &Progress,
    live: Option<&LiveLayer>,
) -> Result<LayerIndex, StreamError> {
    let counter = Arc::new(AtomicU64::new(0));
    let raw = Counting {
        inner: raw,
        n: counter.clone(),
    };
    let mut entries = Vec::new();
    let mut budget = Budget::new(store.max_object());
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(64);
        let (give_back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
        // The writer hashes and stores contents; it reports what it made
        // (to undo on failure) and the first error it met.
        let writer = scope.spawn(move || write_objects(rx, give_back, store, progress, live));
        let stopped = || StreamError::Interrupted("object writer stopped".into());
        let mut spans = None;
        let walked = decoded(raw, compression, Some(&mut spans), |d| {
            walk(d, true, |entry| {
                let idx = entries.len();
                let mut content =
                    |r: &mut dyn Read, size: u64| -> Result<Option<ObjectId>, StreamError> {
                        tx.send(Msg::Start { idx, size }).map_err(|_| stopped())?;
                        let mut left = size;
                        while left > 0 {
                            let mut chunk = spare.try_recv().unwrap_or_else(|_| vec![0u8; PIECE]);
                            let want = left.min(PIECE as u64) as usize;
                            let n = r.read(&mut chunk[..want]).map_err(classify_read)?;
                            if n == 0 {
                                break;
                            }
                            left -= n as u64;
                            tx.send(Msg::Data(chunk, n)).map_err(|_| stopped())?;
                        }
                        tx.send(Msg::End).map_err(|_| stopped())?;
                        Ok(None)
                    };
                if let Some(e) = read_entry(entry, &mut content, &counter, &mut budget)? {
                    if let Some(l) = live {
                        l.push(entries.len(), &e);
                    }
                    entries.push(e);
                }
                Ok(Flow::Continue)
            })
        });
        drop(tx);
        let (made, write_err) = writer.join().unwrap_or_else(|_| {
            (
                Vec::new(),
                Some(StreamError::Interrupted("object writer panicked".into())),
            )
        });
        let result = match (write_err, walked) {
            (Some(e), _) => Err(e),
            (None, Err(e)) => Err(e),
            (None, Ok(n)) => Ok(n),
        };
        match result {
            Ok(uncompressed_size) => {
                for (idx, id, _) in made {
                    entries[idx].object = Some(id);
                }
                Ok(LayerIndex {
                    version: INDEX_VERSION,
                    digest: digest.to_string(),
                    // Read whole; the caller checks the blob's digest.
                    pin: None,
                    compression,
                    mode: if spans.is_some() {
                        LayerMode::SpanIndex
                    } else {
                        LayerMode::Streamed
                    },
                    compressed_size,
                    uncompressed_size,
                    entries: std::mem::take(&mut entries),
                    spans: spans.take(),
                })
            }
            Err(e) => {
                for (_, id, new) in made {
                    if new {
                        store.remove(&id);
                    }
                }
                Err(e)
            }
        }
    })
}

/// The first pass over a gzip layer (see [`crate::rootfs::early`]): lists
/// its entries into `live` as the stream passes them, without storing any
/// content, and appends the compressed bytes to `spill`, publishing the
/// gzip checkpoints, so any file the stream has passed can be extracted on
/// demand. Every byte goes to `spill` before the decoder sees it. A file
/// larger than `max_file` (the store's [`ObjectStore::max_object`]) fails
/// the pass at its header, before its content is read. Returns the number
/// of entries.
pub fn scan_layer<R: Read>(
    raw: R,
    spill: &Spill,
    live: &Arc<LiveLayer>,
    max_file: u64,
) -> Result<usize, StreamError> {
    let counter = Arc::new(AtomicU64::new(0));
    let raw = Counting {
        inner: Tee { inner: raw, spill },
        n: counter.clone(),
    };
    let sink = live.clone();
    let mut d = IndexingDecoder::new(raw)
        .map_err(StreamError::Local)?
        .with_sink(Box::new(move |cp| sink.checkpoint(cp)));
    let mut n = 0;
    // Large reads: each one is a call into the inflater.
    let mut buf = vec![0u8; PIECE];
    let mut budget = Budget::new(max_file);
    walk(&mut d, true, |entry| {
        // The content is read past (not stored) before the entry is
        // published, so its bytes are in the spill by then.
        let mut content = |r: &mut dyn Read, size: u64| -> Result<Option<ObjectId>, StreamError> {
            let mut got = 0u64;
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => got += k as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(classify_read(e)),
                }
            }
            if got != size {
                return Err(StreamError::Malformed(format!(
                    "entry {n}: {got} of {size} bytes before the stream ended"
                )));
            }
            Ok(None)
        };
        if let Some(e) = read_entry(entry, &mut content, &counter, &mut budget)? {
            live.push(n, &e);
            n += 1;
        }
        Ok(Flow::Continue)
    })?;
    Ok(n)
}

/// Where a file's content lies in a layer's uncompressed stream: `size`
/// bytes at `offset`, or, for a sparse file, its map and data regions
/// there (see [`IndexEntry::extent`]).
#[derive(Debug, Clone)]
pub struct Placement {
    /// Offset of the entry's data.
    pub offset: u64,
    /// The file's size.
    pub size: u64,
    /// A sparse file's map.
    pub sparse: Option<Box<SparseMap>>,
}

impl Placement {
    /// Where entry `e`'s content lies.
    pub fn of(e: &IndexEntry) -> Placement {
        Placement {
            offset: e.offset,
            size: e.size,
            sparse: e.sparse.clone(),
        }
    }
}

/// Stores a file's content from the spill of [`scan_layer`] (decoding from
/// checkpoint `cp`, or the blob's start): the first pass's on-demand
/// extraction. Returns the object and whether this call created it.
pub fn extract_spilled(
    spill: &std::fs::File,
    cp: Option<&super::gzindex::Checkpoint>,
    at: &Placement,
    store: &ObjectStore,
) -> Result<(ObjectId, bool), StreamError> {
    let from = cp.map_or(0, |c| c.fetch_from());
    let raw = io::BufReader::with_capacity(64 << 10, ReadAt::new(spill, from));
    let mut d = SpanDecoder::new(raw, cp).map_err(classify_read)?;
    let pos = d.position();
    store_at(&mut d, pos, at, store)
}

/// Re-reads part of a layer (a prefix fetched by Range) and stores only the
/// `wanted` objects (entry data offset → object id from the verified
/// index). Each is checked against its id: the index, pinned by the layer
/// digest, is what verifies a range. Stops as soon as all are stored.
/// Returns how many were stored.
pub fn extract_objects<R: Read>(
    raw: R,
    compression: Compression,
    wanted: &std::collections::HashMap<u64, ObjectId>,
    store: &ObjectStore,
) -> Result<usize, StreamError> {
    let counter = Arc::new(AtomicU64::new(0));
    let raw = Counting {
        inner: raw,
        n: counter.clone(),
    };
    let mut found = 0;
    let mut budget = Budget::new(store.max_object());
    let mut buf = vec![0u8; 256 << 10];
    decoded(raw, compression, None, |d| {
        walk(d, false, |entry| {
            let Some(id) = wanted.get(&entry.raw_file_position()) else {
                return Ok(Flow::Continue);
            };
            let mut new = false;
            let mut content =
                |r: &mut dyn Read, size: u64| -> Result<Option<ObjectId>, StreamError> {
                    let mut w = store.writer().map_err(StreamError::Local)?;
                    loop {
                        let n = r.read(&mut buf).map_err(classify_read)?;
                        if n == 0 {
                            break;
                        }
                        w.write_all(&buf[..n]).map_err(StreamError::Local)?;
                    }
                    if w.len() != size {
                        return Err(StreamError::Malformed(
                            "content shorter than its header".into(),
                        ));
                    }
                    let (id, _, made) = w.finish_new().map_err(StreamError::Local)?;
                    new = made;
                    Ok(Some(id))
                };
            let e = read_entry(entry, &mut content, &counter, &mut budget)?;
            match e.and_then(|e| e.object) {
                Some(got) if got == *id => found += 1,
                got => {
                    // Only what this call made goes; an object that was
                    // already there belongs to another layer.
                    if let Some(g) = got.filter(|_| new) {
                        store.remove(&g);
                    }
                    return Err(StreamError::Malformed(format!(
                        "refetched content at offset {} does not match the layer index",
                        entry.raw_file_position()
                    )));
                }
            }
            Ok(if found == wanted.len() {
                Flow::Stop
            } else {
                Flow::Continue
            })
        })
    })?;
    Ok(found)
}

/// Stores one file's content from a decompressed stream positioned at
/// uncompressed offset `pos`: skips to the content `at` places, takes it,
/// and keeps it only if it hashes to `id` (the digest-verified index's id).
pub fn extract_at(
    decoded: &mut dyn Read,
    pos: u64,
    at: &Placement,
    id: &ObjectId,
    store: &ObjectStore,
) -> Result<(), StreamError> {
    let (got, new) = store_at(decoded, pos, at, store)?;
    if got != *id {
        // Wrong bytes never stay; an object that was already there (of
        // another layer) is someone else's and stays.
        if new {
            store.remove(&got);
        }
        return Err(StreamError::Malformed(format!(
            "content at offset {} does not match the layer index",
            at.offset
        )));
    }
    Ok(())
}

/// Skips `decoded` (at uncompressed offset `pos`) to the content `at`
/// places and stores it as an object (a sparse file expanded): its id, and
/// whether it is new.
fn store_at(
    decoded: &mut dyn Read,
    pos: u64,
    at: &Placement,
    store: &ObjectStore,
) -> Result<(ObjectId, bool), StreamError> {
    let (offset, size) = (at.offset, at.size);
    // A sparse file's data follows its map (read when it was listed).
    let data = offset + at.sparse.as_ref().map_or(0, |m| m.map_len);
    let skip = data.checked_sub(pos).ok_or_else(|| {
        StreamError::Malformed(format!(
            "content at {offset} lies before resume point {pos}"
        ))
    })?;
    if size > store.max_object() {
        return Err(StreamError::TooLarge {
            path: format!("content at offset {offset}"),
            size,
            bound: store.max_object(),
        });
    }
    let skipped = io::copy(&mut decoded.take(skip), &mut io::sink()).map_err(classify_read)?;
    if skipped != skip {
        return Err(StreamError::Malformed(
            "stream ended before the content".into(),
        ));
    }
    let mut w = store.writer().map_err(StreamError::Local)?;
    let copied = match &at.sparse {
        None => io::copy(&mut decoded.take(size), &mut w),
        Some(m) => io::copy(
            &mut Expand::new(decoded.take(m.data_len()), m, size),
            &mut w,
        ),
    }
    .map_err(|e| {
        if e.get_ref().is_some_and(|i| i.is::<FetchError>()) {
            classify_read(e)
        } else if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::UnexpectedEof
        {
            StreamError::Malformed(e.to_string())
        } else {
            StreamError::Local(e)
        }
    })?;
    if copied != size {
        return Err(StreamError::Malformed(
            "stream ended inside the content".into(),
        ));
    }
    let (got, _, new) = w.finish_new().map_err(StreamError::Local)?;
    Ok((got, new))
}

/// [`extract_at`] over the compressed bytes of a gzip layer fetched from
/// checkpoint `cp` (or from the blob start).
pub fn extract_gzip_span<R: Read>(
    raw: R,
    cp: Option<&super::gzindex::Checkpoint>,
    at: &Placement,
    id: &ObjectId,
    store: &ObjectStore,
) -> Result<(), StreamError> {
    let mut d = SpanDecoder::new(raw, cp).map_err(classify_read)?;
    let pos = d.position();
    extract_at(&mut d, pos, at, id, store)
}

/// Reads one entry's metadata; a regular file's content goes to `content`,
/// which returns its object id now, or `None` when it is stored later. A
/// file larger than `max_file` is refused before `content` sees it, and a
/// GNU sparse entry before anything is read (see the module contract); a
/// PAX sparse file's map is read here and `content` sees the file expanded.
fn read_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    content: &mut ContentFn<'_>,
    compressed: &AtomicU64,
    budget: &mut Budget,
) -> Result<Option<IndexEntry>, StreamError> {
    let max_file = budget.max_file;
    use tar::EntryType as T;
    let bad = |what: &str, e: io::Error| StreamError::Malformed(format!("{what}: {e}"));
    let h = entry.header();
    let kind = match h.entry_type() {
        T::GNUSparse => {
            let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            return Err(StreamError::Malformed(format!(
                "{path}: a GNU sparse entry (type 'S', real size {} bytes), which umoci, \
                 containerd and Docker refuse too",
                entry.size()
            )));
        }
        T::Regular | T::Continuous => EntryKind::File,
        T::Directory => EntryKind::Dir,
        T::Symlink => EntryKind::Symlink,
        T::Link => EntryKind::Hardlink,
        T::Char => EntryKind::CharDev,
        T::Block => EntryKind::BlockDev,
        T::Fifo => EntryKind::Fifo,
        other => {
            tracing::debug!(?other, "skipping tar entry type");
            return Ok(None);
        }
    };
    let mode = h.mode().unwrap_or(0) & 0o7777;
    let mut uid = h.uid().unwrap_or(0) as u32;
    let mut gid = h.gid().unwrap_or(0) as u32;
    // Empty numeric fields read as 0, as GNU tar does.
    let mut mtime = h.mtime().unwrap_or(0) as i64;
    let mut mtime_nsec = 0u32;
    let major = h.device_major().ok().flatten().unwrap_or(0);
    let minor = h.device_minor().ok().flatten().unwrap_or(0);
    let mut path = normalize(&entry.path_bytes()).map_err(StreamError::Malformed)?;
    let link = match kind {
        EntryKind::Symlink => entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default(),
        EntryKind::Hardlink => {
            let l = entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default();
            normalize(&l).map_err(|e| StreamError::Malformed(format!("hard link: {e}")))?
        }
        _ => Vec::new(),
    };
    let mut xattrs = Vec::new();
    let mut sparse = super::sparse::Records::default();
    if let Some(exts) = entry.pax_extensions().map_err(|e| bad("pax", e))? {
        for ext in exts {
            let ext = ext.map_err(|e| bad("pax", e))?;
            let key = ext.key_bytes();
            let val = ext.value_bytes();
            let num = || {
                std::str::from_utf8(val)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            };
            match key {
                b"uid" => uid = num().unwrap_or(uid as u64) as u32,
                b"gid" => gid = num().unwrap_or(gid as u64) as u32,
                b"mtime" => {
                    if let Some((s, ns)) = parse_pax_time(val) {
                        mtime = s;
                        mtime_nsec = ns;
                    }
                }
                k if k.starts_with(b"SCHILY.xattr.") => {
                    xattrs.push((k[13..].to_vec(), val.to_vec()))
                }
                _ => sparse.take(key, val),
            }
        }
    }
    let sparse_bad = |path: &[u8], e: &dyn std::fmt::Display| {
        StreamError::Malformed(format!("{}: {e}", String::from_utf8_lossy(path)))
    };
    let sparse = match sparse.finish() {
        None => None,
        Some(Err(e)) => return Err(sparse_bad(&path, &e)),
        Some(Ok(_)) if kind != EntryKind::File => {
            return Err(sparse_bad(
                &path,
                &"sparse records on an entry that is not a file",
            ));
        }
        Some(Ok(s)) => {
            // The header's name is `GNUSparseFile.<pid>/<name>`.
            if let Some(n) = &s.name {
                path = normalize(n).map_err(StreamError::Malformed)?;
            }
            Some(s)
        }
    };
    let offset = entry.raw_file_position();
    let mut size = 0;
    let mut object = None;
    let mut map = None;
    if kind == EntryKind::File {
        size = sparse.as_ref().map_or(entry.size(), |s| s.size);
        if size > max_file {
            return Err(StreamError::TooLarge {
                path: String::from_utf8_lossy(&path).into_owned(),
                size,
                bound: max_file,
            });
        }
        match sparse {
            None => object = content(entry, size)?,
            Some(s) => {
                let stored = entry.size();
                let m = s
                    .resolve(entry, stored)
                    .map_err(|e| sparse_bad(&path, &e))?;
                budget.regions = budget.regions.checked_sub(m.regions.len()).ok_or_else(|| {
                    sparse_bad(
                        &path,
                        &format_args!(
                            "the layer's sparse maps pass {} regions",
                            super::sparse::MAX_LAYER_REGIONS
                        ),
                    )
                })?;
                object = content(&mut Expand::new(&mut *entry, &m, size), size)?;
                map = Some(Box::new(m));
            }
        }
    }
    let compressed_end = compressed.load(Ordering::Relaxed);
    Ok(Some(IndexEntry {
        path,
        kind,
        mode,
        uid,
        gid,
        mtime,
        mtime_nsec,
        size,
        link,
        major,
        minor,
        xattrs,
        object,
        offset,
        sparse: map,
        compressed_end,
    }))
}

/// What one pass over a layer may still take: files up to the cache's
/// bound each, and sparse regions up to
/// [`super::sparse::MAX_LAYER_REGIONS`] for the whole layer.
struct Budget {
    max_file: u64,
    regions: usize,
}

impl Budget {
    fn new(max_file: u64) -> Budget {
        Budget {
            max_file,
            regions: super::sparse::MAX_LAYER_REGIONS,
        }
    }
}

/// PAX times are decimal seconds with an optional fraction.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut ns = 0u32;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        ns += (c - b'0') as u32 * 10u32.pow(8 - i as u32);
    }
    Some((secs, ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize(b"./a//b/./c").unwrap(), b"a/b/c");
        assert_eq!(normalize(b"/etc/x").unwrap(), b"etc/x");
        assert_eq!(normalize(b"a/../b").unwrap(), b"b");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert!(normalize(b"../x").is_err());
        assert!(normalize(b"a/../../x").is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1700000000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
    }

    #[test]
    fn indexes_a_gzip_tar() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path(), 1 << 30).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, "etc/", io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o4755);
        h.set_size(5);
        h.set_mtime(1234);
        b.append_data(&mut h, "etc/hello", &b"hello"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let idx = index(&tar, &store).unwrap();
        assert_eq!(idx.entries.len(), 2);
        let f = &idx.entries[1];
        assert_eq!(
            (f.path.as_slice(), f.mode, f.mtime, f.size),
            (&b"etc/hello"[..], 0o4755, 1234, 5)
        );
        assert_eq!(store.stats().objects, 1);
        assert_eq!(idx.uncompressed_size, tar.len() as u64);
        // a truncated stream is malformed and leaves no new object behind
        let store2 = ObjectStore::open(&d.path().join("b"), 1 << 30).unwrap();
        let (gz, p) = (gz(&tar), Progress::default());
        assert!(
            index_layer(
                &gz[..gz.len() / 2],
                "sha256:x",
                Compression::Gzip,
                0,
                &store2,
                &p,
                None
            )
            .is_err()
        );
        assert_eq!(store2.stats().objects, 0);
    }

    fn gz(tar: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).unwrap();
        gz.finish().unwrap()
    }

    /// `etc/ok` (5 bytes), then `path` with `header` (size and type set by
    /// the caller) and `data`.
    fn tar_with(path: &str, mut header: tar::Header, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(5);
        b.append_data(&mut h, "etc/ok", &b"fine\n"[..5]).unwrap();
        header.set_path(path).unwrap();
        header.set_mode(0o644);
        header.set_cksum();
        b.append(&header, data).unwrap();
        b.into_inner().unwrap()
    }

    /// A file of `size` zeros after `etc/ok`.
    fn zeros(size: usize) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_size(size as u64);
        tar_with("z/bomb", h, &vec![0; size])
    }

    /// A regular entry whose header claims `size` bytes the layer does not
    /// hold (a few follow, then the stream ends).
    fn claims(size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        let mut t = tar_with("z/claims", h, &[]);
        t.truncate(t.len() - 1024);
        t.extend_from_slice(&[0; 4096]);
        t
    }

    /// A GNU sparse entry of real size `real` holding 512 bytes at its end.
    fn sparse(real: u64) -> Vec<u8> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(512);
        let g = h.as_gnu_mut().unwrap();
        g.sparse[0].set_offset(real - 512);
        g.sparse[0].set_length(512);
        g.set_real_size(real);
        tar_with("s/sparse", h, &[b'x'; 512])
    }

    fn index(tar: &[u8], store: &ObjectStore) -> Result<LayerIndex, StreamError> {
        let gz = gz(tar);
        let p = Progress::default();
        index_layer(
            &gz[..],
            "sha256:x",
            Compression::Gzip,
            gz.len() as u64,
            store,
            &p,
            None,
        )
    }

    fn scan(tar: &[u8], store: &ObjectStore) -> Result<usize, StreamError> {
        let spill = Spill::new(store.spill_file().unwrap());
        let live = Arc::new(LiveLayer::default());
        scan_layer(&gz(tar)[..], &spill, &live, store.max_object())
    }

    /// A file larger than the store's bound fails both passes with
    /// `TooLarge` naming it, and the storing pass leaves nothing behind;
    /// one of exactly the bound is stored.
    #[test]
    fn a_file_larger_than_the_bound_is_refused_by_both_passes() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path(), 1 << 20).unwrap();
        for r in [
            index(&zeros((1 << 20) + 1), &store).map(|_| 0),
            scan(&zeros((1 << 20) + 1), &store),
        ] {
            match r {
                Err(StreamError::TooLarge { path, size, bound }) => {
                    assert_eq!(
                        (path.as_str(), size, bound),
                        ("z/bomb", (1 << 20) + 1, 1 << 20)
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(store.stats().objects, 0, "etc/ok stayed");
        let idx = index(&zeros(1 << 20), &store).unwrap();
        assert_eq!(idx.entries[1].size, 1 << 20);
        assert!(scan(&zeros(1 << 20), &store).is_ok());
    }

    /// The size is checked at the header, before the content is read: an
    /// entry claiming 2^62 bytes the layer does not hold is `TooLarge`,
    /// not a stream that ended inside it.
    #[test]
    fn the_bound_is_checked_before_the_content_is_read() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert!(matches!(
            index(&claims(1 << 62), &store),
            Err(StreamError::TooLarge { .. })
        ));
        assert!(matches!(
            scan(&claims(1 << 62), &store),
            Err(StreamError::TooLarge { .. })
        ));
    }

    /// A PAX sparse file (GNU tar's `--format=posix` sparse, version 1.0):
    /// a PAX header with `GNU.sparse.*` records, then a regular entry
    /// holding the map (`map`, padded to a block) and `data`; then a file
    /// `s/after` holding `after`.
    fn pax_sparse(map: &str, data: &[u8]) -> Vec<u8> {
        let record = |k: &str, v: &str| {
            let body = format!(" {k}={v}\n");
            let mut n = body.len() + 1;
            while format!("{n}{body}").len() != n {
                n += 1;
            }
            format!("{n}{body}")
        };
        let pax: String = [
            record("GNU.sparse.major", "1"),
            record("GNU.sparse.minor", "0"),
            record("GNU.sparse.name", "s/pax-sparse"),
            record("GNU.sparse.realsize", "1048576"),
        ]
        .concat();
        let mut b = tar::Builder::new(Vec::new());
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(pax.len() as u64);
        x.set_path("s/PaxHeaders/pax-sparse").unwrap();
        x.set_mode(0o644);
        x.set_cksum();
        b.append(&x, pax.as_bytes()).unwrap();
        let mut body = map.as_bytes().to_vec();
        body.resize(512, 0);
        body.extend_from_slice(data);
        let mut h = tar::Header::new_ustar();
        h.set_size(body.len() as u64);
        h.set_path("s/GNUSparseFile.0/pax-sparse").unwrap();
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &body[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(5);
        h.set_mode(0o644);
        b.append_data(&mut h, "s/after", &b"after"[..]).unwrap();
        b.into_inner().unwrap()
    }

    /// A hole, 512 bytes of data, a hole, 512 more at the end.
    const MAP: &str = "2\n4096\n512\n1048064\n512\n";

    fn pax_sparse_content() -> Vec<u8> {
        let mut v = vec![0u8; 1 << 20];
        v[4096..4608].fill(b'x');
        v[1048064..].fill(b'y');
        v
    }

    fn pax_sparse_data() -> Vec<u8> {
        [[b'x'; 512], [b'y'; 512]].concat()
    }

    /// A PAX sparse file is shown expanded, as umoci shows it, by the
    /// storing pass, by the listing pass's extraction from the spill, and
    /// by both ways of fetching evicted content again; the entry after it
    /// is read from the right place.
    #[test]
    fn pax_sparse_files_are_expanded_by_every_pass() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(&d.path().join("a"), u64::MAX).unwrap();
        let tar = pax_sparse(MAP, &pax_sparse_data());
        let want = pax_sparse_content();
        let idx = index(&tar, &store).unwrap();
        let paths: Vec<_> = idx.entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(paths, [&b"s/pax-sparse"[..], b"s/after"]);
        let e = &idx.entries[0];
        assert_eq!((e.size, e.extent()), (1 << 20, 512 + 1024));
        let id = e.object.unwrap();
        assert_eq!(std::fs::read(store.path(&id)).unwrap(), want);
        let after = idx.entries[1].object.unwrap();
        assert_eq!(std::fs::read(store.path(&after)).unwrap(), b"after");

        // Evicted, then fetched again: from the uncompressed stream, and
        // by walking the blob's prefix.
        let again = ObjectStore::open(&d.path().join("b"), u64::MAX).unwrap();
        extract_at(&mut &tar[..], 0, &Placement::of(e), &id, &again).unwrap();
        assert_eq!(std::fs::read(again.path(&id)).unwrap(), want);
        let walked = ObjectStore::open(&d.path().join("c"), u64::MAX).unwrap();
        let wanted = std::collections::HashMap::from([(e.offset, id)]);
        assert_eq!(
            extract_objects(&gz(&tar)[..], Compression::Gzip, &wanted, &walked).unwrap(),
            1
        );
        assert_eq!(std::fs::read(walked.path(&id)).unwrap(), want);

        // The listing pass, then extraction from its spill.
        let early = ObjectStore::open(&d.path().join("d"), u64::MAX).unwrap();
        let spill = Spill::new(early.spill_file().unwrap());
        let live = Arc::new(LiveLayer::default());
        live.spill(spill.file().clone());
        assert_eq!(
            scan_layer(&gz(&tar)[..], &spill, &live, u64::MAX).unwrap(),
            2
        );
        for (i, want_id) in [(0, id), (1, after)] {
            let x = live.want(i).unwrap();
            let (got, _) = extract_spilled(&x.spill, x.checkpoint.as_ref(), &x.at, &early).unwrap();
            assert_eq!(got, want_id, "entry {i}");
        }
    }

    /// The sparse maps of one layer are bounded together: past the
    /// layer's budget of regions an entry is malformed.
    #[test]
    fn a_layers_sparse_maps_are_bounded_together() {
        let one = pax_sparse(MAP, &pax_sparse_data());
        let tar = [one.clone(), one].concat();
        let mut archive = tar::Archive::new(&tar[..]);
        // Two archives back to back: read past the first one's end.
        archive.set_ignore_zeros(true);
        // Room for the first file's two regions, not for the second's.
        let mut budget = Budget {
            max_file: u64::MAX,
            regions: 3,
        };
        let counter = AtomicU64::new(0);
        let mut content = |r: &mut dyn Read, _: u64| -> Result<Option<ObjectId>, StreamError> {
            io::copy(r, &mut io::sink()).map_err(classify_read)?;
            Ok(None)
        };
        let mut got = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            got.push(
                read_entry(&mut entry, &mut content, &counter, &mut budget)
                    .map(|e| e.unwrap().path),
            );
        }
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(matches!(&got[0], Ok(p) if p == b"s/pax-sparse"), "{got:?}");
        assert!(matches!(&got[1], Ok(p) if p == b"s/after"), "{got:?}");
        assert!(
            matches!(&got[2], Err(StreamError::Malformed(m)) if m.contains("sparse maps pass")),
            "{got:?}"
        );
    }

    /// A map that does not match what the entry holds is malformed for
    /// both passes, and nothing is stored.
    #[test]
    fn pax_sparse_files_whose_map_lies_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path(), u64::MAX).unwrap();
        for tar in [
            // data shorter than the map says
            pax_sparse(MAP, &[b'x'; 700]),
            // a region past the real size
            pax_sparse("1\n1048064\n1024\n", &[b'x'; 1024]),
            // regions out of order
            pax_sparse("2\n1048064\n512\n4096\n512\n", &pax_sparse_data()),
        ] {
            for r in [index(&tar, &store).map(|_| 0), scan(&tar, &store)] {
                match r {
                    Err(StreamError::Malformed(m)) => {
                        assert!(m.contains("s/pax-sparse: sparse file"), "{m}")
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(store.stats().objects, 0);
    }

    /// A GNU sparse entry is malformed whatever its size, and one of a real
    /// size near 2^63 fails at once (its zeros are never read), even
    /// with no bound at all.
    #[test]
    fn gnu_sparse_entries_are_refused_at_once() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path(), u64::MAX).unwrap();
        for real in [4096, (1 << 63) - 512] {
            let t = std::time::Instant::now();
            for r in [
                index(&sparse(real), &store).map(|_| 0),
                scan(&sparse(real), &store),
            ] {
                match r {
                    Err(StreamError::Malformed(m)) => {
                        assert!(m.contains("s/sparse") && m.contains("GNU sparse"), "{m}")
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
        }
        assert_eq!(store.stats().objects, 0);
    }
}

#[cfg(test)]
mod spill_tests {
    use super::*;
    use crate::rootfs::early::LiveLayer;

    /// Text that compresses only by half (a xorshift stream over 16
    /// letters): Huffman blocks, whose ends are where checkpoints go
    /// (stored blocks have no end-of-block code to stop at).
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x % 16) as u8
            })
            .collect()
    }

    #[test]
    fn every_file_listed_by_the_first_pass_extracts_from_the_spill() {
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path(), 1 << 30).unwrap();
        // Files on both sides of several 4 MiB checkpoints.
        let files: Vec<(String, Vec<u8>)> = (0..12)
            .map(|i| (format!("f/{i:02}"), noise(i, (i as usize % 4) << 20 | 777)))
            .collect();
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in &files {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        // Level 6, as registries' tools write (level 1 in zlib-rs makes
        // blocks too long to checkpoint often).
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();

        let spill = Spill::new(store.spill_file().unwrap());
        let live = Arc::new(LiveLayer::default());
        live.spill(spill.file().clone());
        let n = scan_layer(&gz[..], &spill, &live, u64::MAX).unwrap();
        assert_eq!(n, files.len());
        assert_eq!(store.stats().objects, 0, "the first pass stores nothing");
        let mut resumed = 0;
        for (i, (_, data)) in files.iter().enumerate() {
            let x = live.want(i as u32).expect("a listed file can be extracted");
            resumed += usize::from(x.checkpoint.is_some());
            assert!(live.want(i as u32).is_none(), "asked for once");
            let (id, new) =
                extract_spilled(&x.spill, x.checkpoint.as_ref(), &x.at, &store).unwrap();
            assert!(new);
            assert_eq!(std::fs::read(store.path(&id)).unwrap(), *data, "file {i}");
            live.extracted(i as u32, id, new);
            assert!(live.want(i as u32).is_none(), "stored now");
        }
        assert!(resumed >= 6, "only {resumed} files resumed at a checkpoint");
        assert_eq!(live.take_made().len(), files.len());

        // A stream cut short lists what it passed and then fails.
        let cut = &gz[..gz.len() / 2];
        let spill = Spill::new(store.spill_file().unwrap());
        let live = Arc::new(LiveLayer::default());
        assert!(matches!(
            scan_layer(cut, &spill, &live, u64::MAX),
            Err(StreamError::Malformed(_))
        ));
        assert_eq!(spill.file().metadata().unwrap().len(), cut.len() as u64);
    }
}

#[cfg(test)]
mod perf {
    use super::*;

    /// `APT_LAYER_BLOB=/path/to/layer.tar.gz cargo test --release -- --ignored index_real_blob --nocapture`
    #[test]
    #[ignore]
    fn index_real_blob() {
        let Ok(path) = std::env::var("APT_LAYER_BLOB") else {
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(d.path(), u64::MAX).unwrap();
        let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path).unwrap());
        let t = std::time::Instant::now();
        let p = Progress::default();
        let idx = index_layer(f, "sha256:x", Compression::Gzip, 0, &store, &p, None).unwrap();
        eprintln!("indexed {} entries in {:?}", idx.entries.len(), t.elapsed());
        let t = std::time::Instant::now();
        let spill = crate::layer::spill::Spill::new(store.spill_file().unwrap());
        let live = Arc::new(LiveLayer::default());
        let f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path).unwrap());
        let n = scan_layer(f, &spill, &live, u64::MAX).unwrap();
        eprintln!("listed {n} entries in {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let mut dec = flate2::read::MultiGzDecoder::new(std::fs::File::open(&path).unwrap());
        let n = std::io::copy(&mut dec, &mut std::io::sink()).unwrap();
        eprintln!("gunzip alone {n} bytes in {:?}", t.elapsed());
    }
}
