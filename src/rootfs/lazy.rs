//! Lazy layers (eStargz, zstd:chunked): the TOC is read by Range instead
//! of streaming the layer, and each file's chunks are fetched by Range the
//! first time the file is opened.
//!
//! Contracts:
//! - **Verification**: the TOC is used only after it matched the digest
//!   the manifest pins; a mismatch is an error for the image (EIO), never
//!   a fallback. Every chunk is checked against its `chunkDigest` and every
//!   file against its object id (by the store) before it is kept; a failure
//!   is EIO and leaves nothing behind. A file the TOC says is larger than
//!   the cache's bound is refused (EIO, log line) before any of it is
//!   fetched, and never fetched alongside another.
//! - **Pinned, not verified**: the blob is never checked against its
//!   digest in lazy mode, only the TOC against the annotation of the
//!   manifest that asked. So the index and chunk table made from it belong
//!   to that pin (format + TOC digest, [`super::LayerKey`]): they are
//!   persisted with it and serve, from disk or memory, only descriptors
//!   with the same pin. A descriptor without a pin, or with another, never
//!   uses them: it reads its own TOC or streams and checks the whole blob,
//!   and what it made replaces them on disk.
//! - **Fallback is loud**: a layer that claims a seekable format but whose
//!   footer or TOC location is unusable (or whose registry ignores Range)
//!   is streamed instead, with a log line giving the reason; `status`
//!   shows the mode actually used.
//! - **Single flight**: on-demand fetches are single-flighted per object by
//!   [`super::Layers::refetch`]; the landmark prefetch runs in the
//!   background on its own request, so on-demand reads never wait behind it.
//! - **Amplification**: a file is fetched whole, its chunks merged into as
//!   few Range requests as possible (at most [`MAX_SPAN`] each); tiny
//!   uncached files stored right around it ride along (a few KiB more). A
//!   neighbour that fails verification is skipped (logged), never stored.
//! - **Background fill**: after a lazy layer's first on-demand fetch, the
//!   rest of it is fetched in the background (unless `nobackground`), one
//!   layer at a time, in small groups, pausing while on-demand fetches run;
//!   a layer larger than half the cache bound is not filled.
//! - **Accounting**: every byte received by Range counts in the layer's
//!   `bytes_fetched`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use super::{LayerKey, LayerPhase, LayerState, Res};
use crate::cas::{ObjectId, ObjectStore};
use crate::layer::LayerIndex;
use crate::layer::seekable::{
    self, ChunkStore, ChunkTable, Format, Layout, SeekError, estargz, zstd_chunked,
};
use crate::model::FsError;
use crate::model::image::Descriptor;
use crate::registry::{RegistryClient, RegistryError};

/// Largest compressed span fetched by one Range request.
pub const MAX_SPAN: u64 = 32 << 20;
/// Chunks at most this far apart share a request.
pub const MERGE_GAP: u64 = 64 << 10;
/// Bytes read from the end of an eStargz blob at first: the footer and,
/// for small layers, the whole TOC in one request.
pub const TAIL: u64 = 64 << 10;
/// Compressed bytes around an opened file within which tiny neighbours
/// ride along.
pub const RIDE_ALONG: u64 = 16 << 10;
/// Largest file that rides along.
pub const RIDE_ALONG_FILE: u64 = 4 << 10;
/// Compressed bytes per background request (small, so on-demand reads
/// never queue behind a long one).
pub const FILL_SPAN: u64 = 4 << 20;

/// Why a lazy layer could not be indexed.
#[derive(Debug, thiserror::Error)]
enum LazyError {
    /// Not usable lazily; stream it (the reason is logged).
    #[error("{0}")]
    Fallback(String),
    /// The image is broken (EIO).
    #[error(transparent)]
    Fail(#[from] FsError),
}

/// Which seekable format a layer's descriptor claims.
#[derive(Debug)]
enum Claim {
    Estargz {
        toc_digest: String,
    },
    ZstdChunked {
        position: Option<String>,
        checksum: Option<String>,
        toc_digest: Option<String>,
    },
}

impl Claim {
    /// What a TOC read for this claim is checked against, as kept with its
    /// index: the format and the pinned digest. `None` when nothing pins
    /// the TOC (the layer is streamed).
    fn pin(&self) -> Option<String> {
        match self {
            Claim::Estargz { toc_digest } => Some(format!("estargz:{toc_digest}")),
            Claim::ZstdChunked {
                checksum: Some(c), ..
            } => Some(format!("zstd:chunked:manifest-checksum:{c}")),
            Claim::ZstdChunked {
                toc_digest: Some(t),
                ..
            } => Some(format!("zstd:chunked:toc:{t}")),
            Claim::ZstdChunked { .. } => None,
        }
    }
}

/// The TOC pin of `desc` (see [`super::LayerKey`]): `None` for a layer
/// that is not seekable or whose TOC nothing pins.
pub(super) fn pin(desc: &Descriptor) -> Option<String> {
    claim(desc).and_then(|c| c.pin())
}

fn claim(desc: &Descriptor) -> Option<Claim> {
    let ann = desc.annotations.as_ref()?;
    let get = |keys: &[&str]| keys.iter().find_map(|k| ann.get(*k).cloned());
    let toc_digest = get(&[estargz::TOC_DIGEST_ANNOTATION]);
    let position = get(&zstd_chunked::POSITION_ANNOTATIONS);
    let checksum = get(&zstd_chunked::CHECKSUM_ANNOTATIONS);
    let mt = desc.media_type.as_str();
    if mt.ends_with("+zstd") && (position.is_some() || checksum.is_some() || toc_digest.is_some()) {
        return Some(Claim::ZstdChunked {
            position,
            checksum,
            toc_digest,
        });
    }
    if (mt.ends_with("+gzip") || mt.ends_with(".gzip"))
        && let Some(toc_digest) = toc_digest
    {
        return Some(Claim::Estargz { toc_digest });
    }
    None
}

/// `index` (of a layer read whole) as `desc` shows it: without what a
/// seekable converter adds at the layer root (the eStargz TOC entry, the
/// prefetch landmarks) when `desc` claims a seekable format. They are not
/// part of the image (`umoci unpack` of the original has none), and a
/// lazily read layer never shows them either. `None` when there is nothing
/// to drop. The index is saved with them: it is the blob's, and serves
/// descriptors that claim nothing too.
pub(super) fn without_artifacts(desc: &Descriptor, index: &LayerIndex) -> Option<LayerIndex> {
    if !index.entries.iter().any(|e| is_artifact(desc, e)) {
        return None;
    }
    let mut shown = index.clone();
    shown.entries.retain(|e| !is_artifact(desc, e));
    Some(shown)
}

/// Whether `desc` does not show entry `e` of its layer read whole: what a
/// seekable converter adds, when `desc` claims a seekable format (see
/// [`without_artifacts`]).
pub(super) fn is_artifact(desc: &Descriptor, e: &crate::layer::IndexEntry) -> bool {
    (e.path == estargz::TOC_NAME.as_bytes()
        || e.path == seekable::PREFETCH_LANDMARK
        || e.path == seekable::NO_PREFETCH_LANDMARK)
        && claim(desc).is_some()
}

/// Where a fetch goes.
#[derive(Debug, Clone)]
struct Ctx {
    registry: String,
    repo: String,
    size: u64,
    /// Which layer (digest and TOC pin) the tables belong to.
    key: LayerKey,
}

impl Ctx {
    fn new(registry: &str, repo: &str, desc: &Descriptor) -> Ctx {
        Ctx {
            registry: registry.into(),
            repo: repo.into(),
            size: desc.size,
            key: LayerKey::of(desc),
        }
    }

    fn image(&self) -> String {
        format!("{}/{}", self.registry, self.repo)
    }

    fn seek_error(&self, e: SeekError) -> FsError {
        match e {
            SeekError::TocDigest { expected, actual } => RegistryError::DigestMismatch {
                registry: self.registry.clone(),
                what: format!("TOC of layer {}", self.key.digest),
                expected,
                actual,
            }
            .into(),
            SeekError::ChunkDigest {
                offset,
                expected,
                actual,
            } => RegistryError::DigestMismatch {
                registry: self.registry.clone(),
                what: format!("chunk at {offset} of layer {}", self.key.digest),
                expected,
                actual,
            }
            .into(),
            e => FsError::BadImage {
                image: self.image(),
                reason: format!("layer {}: {e}", self.key.digest),
            },
        }
    }
}

fn local(e: std::io::Error) -> FsError {
    FsError::Io {
        no_space: e.raw_os_error() == Some(libc::ENOSPC),
        reason: format!("cache write failed: {e}"),
    }
}

fn joined(e: tokio::task::JoinError) -> FsError {
    FsError::Io {
        reason: e.to_string(),
        no_space: false,
    }
}

/// Lazy layer access, shared by all images (cheap to clone).
#[derive(Clone)]
pub struct Lazy {
    inner: Arc<Inner>,
}

struct Inner {
    client: RegistryClient,
    store: Arc<ObjectStore>,
    chunks: ChunkStore,
    /// Chunk tables by layer and TOC pin.
    tables: Mutex<HashMap<LayerKey, Arc<ChunkTable>>>,
    background: AtomicBool,
    /// Layers whose background fill was started.
    filling: Mutex<HashSet<LayerKey>>,
    /// One layer filled at a time.
    fill_gate: tokio::sync::Semaphore,
    /// On-demand fetches running now (the fill waits while any are).
    on_demand: AtomicUsize,
}

impl Lazy {
    /// Lazy access through `client`, storing into `store`, tables in `chunks`.
    pub fn new(client: RegistryClient, store: Arc<ObjectStore>, chunks: ChunkStore) -> Lazy {
        Lazy {
            inner: Arc::new(Inner {
                client,
                store,
                chunks,
                tables: Mutex::new(HashMap::new()),
                background: AtomicBool::new(true),
                filling: Mutex::new(HashSet::new()),
                fill_gate: tokio::sync::Semaphore::new(1),
                on_demand: AtomicUsize::new(0),
            }),
        }
    }

    /// Turns the background fill on or off.
    pub fn set_background(&self, on: bool) {
        self.inner.background.store(on, Ordering::Relaxed);
    }

    /// The index of `desc` built from its TOC, or `None` when the layer is
    /// not seekable (or must be streamed, logged). The chunk table is
    /// persisted before this returns; the prioritised region starts
    /// downloading in the background.
    pub(super) async fn index(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
        st: &Arc<LayerState>,
    ) -> Res<Option<LayerIndex>> {
        let Some(claim) = claim(desc) else {
            return Ok(None);
        };
        let ctx = Ctx::new(registry, repo, desc);
        st.progress.bytes_fetched.store(0, Ordering::Relaxed);
        let built = self.read_toc(&ctx, desc, &claim, st).await;
        let (index, table) = match built {
            Ok(b) => b,
            Err(LazyError::Fallback(reason)) => {
                tracing::warn!(layer = %desc.digest, image = %ctx.image(), %reason, ?claim, "layer claims a seekable format but cannot be read lazily; streaming it instead");
                return Ok(None);
            }
            Err(LazyError::Fail(e)) => {
                st.set(LayerPhase::Failed);
                *st.error.lock().unwrap() = Some(e.to_string());
                tracing::error!(layer = %desc.digest, image = %ctx.image(), error = %e, "seekable layer failed; nothing of it was kept");
                return Err(e);
            }
        };
        let table = Arc::new(table);
        let (chunks, t) = (self.inner.chunks.clone(), table.clone());
        tokio::task::spawn_blocking(move || chunks.save(&t))
            .await
            .map_err(joined)?
            .map_err(local)?;
        self.inner
            .tables
            .lock()
            .unwrap()
            .insert(ctx.key.clone(), table.clone());
        st.set(LayerPhase::Indexed);
        st.set_mode(index.mode);
        *st.error.lock().unwrap() = None;
        tracing::info!(layer = %desc.digest, mode = index.mode.as_str(), entries = index.entries.len(), files = table.files.len(), toc_bytes = st.progress.bytes_fetched.load(Ordering::Relaxed), "seekable layer indexed from its TOC");
        self.spawn_prefetch(ctx, table, st.clone());
        Ok(Some(index))
    }

    /// Fetches object `id` of lazy layer `desc` (all its chunks, verified)
    /// into the store.
    pub(super) async fn fetch(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
        id: ObjectId,
        st: &Arc<LayerState>,
    ) -> Res<()> {
        let ctx = Ctx::new(registry, repo, desc);
        if id == seekable::empty_object() {
            let store = self.inner.store.clone();
            return tokio::task::spawn_blocking(move || store.writer()?.finish().map(|_| ()))
                .await
                .map_err(joined)?
                .map_err(local);
        }
        let table = self.table(&ctx, desc, st).await?;
        let Some(f) = table.files.iter().position(|f| f.object == id) else {
            return Err(FsError::Io {
                reason: format!(
                    "layer {} has no object {}",
                    desc.digest,
                    crate::cas::object_hex(&id)
                ),
                no_space: false,
            });
        };
        tracing::debug!(layer = %desc.digest, object = %crate::cas::object_hex(&id), "fetching file chunks");
        let files = self.with_neighbours(&table, f);
        self.inner.on_demand.fetch_add(1, Ordering::SeqCst);
        let r = self
            .fetch_files(ctx.clone(), table.clone(), files, Some(f), st.clone())
            .await;
        self.inner.on_demand.fetch_sub(1, Ordering::SeqCst);
        self.spawn_fill(ctx, table, st.clone());
        r
    }

    /// File `f` plus the tiny files stored right around it that are not
    /// cached yet: they ride along in the same request for a few KiB.
    fn with_neighbours(&self, table: &ChunkTable, f: usize) -> Vec<usize> {
        let span = |fc: &seekable::FileChunks| {
            fc.chunks
                .iter()
                .filter(|c| !c.zeros)
                .fold((u64::MAX, 0), |(a, b), c| (a.min(c.offset), b.max(c.end)))
        };
        let (a, b) = span(&table.files[f]);
        let (lo, hi) = (a.saturating_sub(RIDE_ALONG), b + RIDE_ALONG);
        let mut out = vec![f];
        out.extend(table.files.iter().enumerate().filter_map(|(i, fc)| {
            let (s, e) = span(fc);
            (i != f
                && fc.size <= RIDE_ALONG_FILE
                && s >= lo
                && e <= hi
                && !self.inner.store.contains(&fc.object))
            .then_some(i)
        }));
        out
    }

    /// Fills the rest of a layer in the background, once per layer.
    fn spawn_fill(&self, ctx: Ctx, table: Arc<ChunkTable>, st: Arc<LayerState>) {
        if !self.inner.background.load(Ordering::Relaxed)
            || !self.inner.filling.lock().unwrap().insert(ctx.key.clone())
        {
            return;
        }
        let total: u64 = table.files.iter().map(|f| f.size).sum();
        // The cache bound (the largest object it can hold), read without
        // the store's lock.
        let limit = self.inner.store.max_object();
        if total > limit / 2 {
            tracing::info!(layer = %ctx.key.digest, bytes = total, cache_limit = limit, "layer too large for the cache to fill in the background; files stay on demand");
            return;
        }
        let lazy = self.clone();
        tokio::spawn(async move {
            let Ok(_gate) = lazy.inner.fill_gate.acquire().await else {
                return;
            };
            let missing: Vec<usize> = (0..table.files.len())
                .filter(|&i| !lazy.inner.store.contains(&table.files[i].object))
                .collect();
            let n = missing.len();
            let mut groups: Vec<Vec<usize>> = Vec::new();
            let mut span_start = u64::MAX;
            for i in missing {
                let f = &table.files[i];
                let (a, b) = f
                    .chunks
                    .iter()
                    .filter(|c| !c.zeros)
                    .fold((u64::MAX, 0), |(a, b), c| (a.min(c.offset), b.max(c.end)));
                match groups.last_mut() {
                    Some(g) if b.saturating_sub(span_start) <= FILL_SPAN && a >= span_start => {
                        g.push(i)
                    }
                    _ => {
                        span_start = a;
                        groups.push(vec![i]);
                    }
                }
            }
            for g in groups {
                while lazy.inner.on_demand.load(Ordering::SeqCst) > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                let g: Vec<usize> = g
                    .into_iter()
                    .filter(|&i| !lazy.inner.store.contains(&table.files[i].object))
                    .collect();
                if g.is_empty() {
                    continue;
                }
                if let Err(e) = lazy
                    .fetch_files(ctx.clone(), table.clone(), g, None, st.clone())
                    .await
                {
                    tracing::warn!(layer = %ctx.key.digest, error = %e, "background fill stopped; files stay on demand");
                    return;
                }
            }
            tracing::info!(layer = %ctx.key.digest, files = n, "background fill complete");
        });
    }

    /// The chunk table of `desc`'s pin: from memory, from its sidecar, or
    /// from the TOC again.
    async fn table(
        &self,
        ctx: &Ctx,
        desc: &Descriptor,
        st: &Arc<LayerState>,
    ) -> Res<Arc<ChunkTable>> {
        if let Some(t) = self.inner.tables.lock().unwrap().get(&ctx.key) {
            return Ok(t.clone());
        }
        let (chunks, digest) = (self.inner.chunks.clone(), ctx.key.digest.clone());
        let pin = ctx.key.pin.clone();
        let loaded = tokio::task::spawn_blocking(move || chunks.load(&digest, pin.as_deref()?))
            .await
            .map_err(joined)?;
        let table = match loaded {
            Some(t) => Arc::new(t),
            None => {
                let claim = claim(desc).ok_or_else(|| FsError::BadImage {
                    image: ctx.image(),
                    reason: format!("layer {} is no longer seekable", ctx.key.digest),
                })?;
                let (_, t) = self
                    .read_toc(ctx, desc, &claim, st)
                    .await
                    .map_err(|e| match e {
                        LazyError::Fail(e) => e,
                        LazyError::Fallback(reason) => FsError::BadImage {
                            image: ctx.image(),
                            reason: format!("layer {}: TOC unusable: {reason}", ctx.key.digest),
                        },
                    })?;
                let _ = self.inner.chunks.save(&t);
                Arc::new(t)
            }
        };
        self.inner
            .tables
            .lock()
            .unwrap()
            .insert(ctx.key.clone(), table.clone());
        Ok(table)
    }

    /// Downloads the prioritised region (files before the prefetch
    /// landmark) in the background.
    fn spawn_prefetch(&self, ctx: Ctx, table: Arc<ChunkTable>, st: Arc<LayerState>) {
        let Some(end) = table.prefetch_end else {
            return;
        };
        let files: Vec<usize> = table
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| {
                f.chunks.iter().all(|c| c.zeros || c.end <= end)
                    && !self.inner.store.contains(&f.object)
            })
            .map(|(i, _)| i)
            .collect();
        if files.is_empty() {
            return;
        }
        let lazy = self.clone();
        tokio::spawn(async move {
            let n = files.len();
            let digest = ctx.key.digest.clone();
            match lazy.fetch_files(ctx, table, files, None, st).await {
                Ok(()) => {
                    tracing::info!(layer = %digest, files = n, "prefetched the prioritised region")
                }
                Err(e) => {
                    tracing::warn!(layer = %digest, error = %e, "prefetch of the prioritised region failed; files will be fetched on demand")
                }
            }
        });
    }

    /// Reads, verifies and parses the TOC of `desc`.
    async fn read_toc(
        &self,
        ctx: &Ctx,
        desc: &Descriptor,
        claim: &Claim,
        st: &LayerState,
    ) -> Result<(LayerIndex, ChunkTable), LazyError> {
        let uncompressed = desc
            .annotations
            .as_ref()
            .and_then(|a| a.get(estargz::UNCOMPRESSED_SIZE_ANNOTATION))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut layout = Layout {
            digest: ctx.key.digest.clone(),
            // A claim that pins nothing falls back below, before anything
            // is built.
            pin: claim.pin().unwrap_or_default(),
            format: Format::Estargz,
            compressed_size: ctx.size,
            uncompressed_size: uncompressed,
            data_end: 0,
        };
        let json = match claim {
            Claim::Estargz { toc_digest } => {
                let (off, toc) = self.estargz_toc(ctx, st).await?;
                layout.data_end = off;
                let expected = toc_digest.clone();
                let json = tokio::task::spawn_blocking(move || estargz::read_toc(&toc, &expected))
                    .await
                    .map_err(joined)?;
                json.map_err(|e| self.toc_error(ctx, e))?
            }
            Claim::ZstdChunked {
                position,
                checksum,
                toc_digest,
            } => {
                layout.format = Format::ZstdChunked;
                let pos = match position {
                    Some(p) => zstd_chunked::parse_position(p, ctx.size)
                        .map_err(|e| LazyError::Fallback(e.to_string()))?,
                    None => {
                        let n = zstd_chunked::FOOTER_SIZE;
                        if ctx.size < n {
                            return Err(LazyError::Fallback("layer too small for a footer".into()));
                        }
                        let tail = self.range(ctx, ctx.size - n, n, st).await?;
                        let p = zstd_chunked::parse_footer(&tail, ctx.size).map_err(|e| {
                            LazyError::Fallback(format!("no manifest-position annotation and {e}"))
                        })?;
                        tracing::info!(layer = %ctx.key.digest, "no manifest-position annotation; the manifest was located by the zstd:chunked footer");
                        p
                    }
                };
                let pin = match (checksum, toc_digest) {
                    (Some(c), _) => zstd_chunked::Pin::Compressed(c),
                    (None, Some(t)) => zstd_chunked::Pin::Json(t),
                    (None, None) => {
                        return Err(LazyError::Fallback(
                            "no manifest-checksum annotation: the manifest cannot be verified"
                                .into(),
                        ));
                    }
                };
                let pin_owned = match pin {
                    zstd_chunked::Pin::Compressed(c) => (true, c.to_string()),
                    zstd_chunked::Pin::Json(t) => (false, t.to_string()),
                };
                layout.data_end = pos.offset - zstd_chunked::SKIPPABLE_HEADER;
                let bytes = self.range(ctx, pos.offset, pos.length, st).await?;
                let json = tokio::task::spawn_blocking(move || {
                    let pin = if pin_owned.0 {
                        zstd_chunked::Pin::Compressed(&pin_owned.1)
                    } else {
                        zstd_chunked::Pin::Json(&pin_owned.1)
                    };
                    zstd_chunked::read_manifest(&bytes, pos, pin)
                })
                .await
                .map_err(joined)?;
                json.map_err(|e| self.toc_error(ctx, e))?
            }
        };
        let built = tokio::task::spawn_blocking(move || {
            seekable::parse_toc(&json).and_then(|toc| seekable::build(toc, &layout))
        })
        .await
        .map_err(joined)?;
        built.map_err(|e| self.toc_error(ctx, e))
    }

    fn toc_error(&self, ctx: &Ctx, e: SeekError) -> LazyError {
        match e {
            SeekError::Footer(reason) => LazyError::Fallback(reason),
            e @ SeekError::Lossy(_) => LazyError::Fallback(e.to_string()),
            e => LazyError::Fail(ctx.seek_error(e)),
        }
    }

    /// The eStargz TOC offset and the bytes from there to the footer.
    async fn estargz_toc(&self, ctx: &Ctx, st: &LayerState) -> Result<(u64, Vec<u8>), LazyError> {
        let size = ctx.size;
        if size < estargz::FOOTER_SIZE {
            return Err(LazyError::Fallback("layer too small for a footer".into()));
        }
        let tail_len = size.min(TAIL);
        let tail_start = size - tail_len;
        let tail = self.range(ctx, tail_start, tail_len, st).await?;
        let (off, footer) =
            estargz::parse_footer(&tail).map_err(|e| LazyError::Fallback(e.to_string()))?;
        let footer_start = size - footer;
        if off >= footer_start || footer_start - off > seekable::MAX_TOC {
            return Err(LazyError::Fallback(format!(
                "footer says the TOC is at {off}, outside the {size}-byte layer"
            )));
        }
        let toc = if off >= tail_start {
            tail[(off - tail_start) as usize..(footer_start - tail_start) as usize].to_vec()
        } else {
            self.range(ctx, off, footer_start - off, st).await?
        };
        Ok((off, toc))
    }

    /// Bytes `offset..offset+len` of the layer, counted in `bytes_fetched`.
    /// A registry that ignores Range is a fallback reason.
    async fn range(
        &self,
        ctx: &Ctx,
        offset: u64,
        len: u64,
        st: &LayerState,
    ) -> Result<Vec<u8>, LazyError> {
        self.range_bytes(ctx, offset, len, st)
            .await
            .map_err(|e| match e {
                FsError::Registry(e @ RegistryError::RangeIgnored { .. }) => {
                    LazyError::Fallback(format!("the registry ignores Range requests ({e})"))
                }
                e => LazyError::Fail(e),
            })
    }

    async fn range_bytes(&self, ctx: &Ctx, offset: u64, len: u64, st: &LayerState) -> Res<Vec<u8>> {
        let canonical = crate::registry::name::canonical_repo(&ctx.registry, &ctx.repo);
        let mut body = self
            .inner
            .client
            .blob_range(&ctx.registry, &canonical, &ctx.key.digest, offset, len)
            .await?;
        let want = len as usize;
        let mut buf = Vec::with_capacity(want);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| RegistryError::Unavailable {
                registry: ctx.registry.clone(),
                what: format!("range {offset}+{len} of layer {}", ctx.key.digest),
                reason: e.to_string(),
            })?;
            st.progress
                .bytes_fetched
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let take = chunk.len().min(want - buf.len());
            buf.extend_from_slice(&chunk[..take]);
            if buf.len() == want {
                if take < chunk.len() {
                    tracing::warn!(layer = %ctx.key.digest, offset, len, "registry sent more than the Range asked for; the rest is ignored");
                }
                break;
            }
        }
        if buf.len() != want {
            return Err(RegistryError::Unavailable {
                registry: ctx.registry.clone(),
                what: format!("range {offset}+{len} of layer {}", ctx.key.digest),
                reason: format!("ended after {} bytes", buf.len()),
            }
            .into());
        }
        Ok(buf)
    }

    /// Fetches files `files` of `table` (indexes) into the store: chunks in
    /// blob order, neighbours merged into one request, each chunk and file
    /// verified. A file that fails verification is never stored; it is an
    /// error only if it is `must` (the one a reader waits for), else it is
    /// logged and skipped. Runs on a blocking thread; network reads go back
    /// to the runtime.
    async fn fetch_files(
        &self,
        ctx: Ctx,
        table: Arc<ChunkTable>,
        files: Vec<usize>,
        must: Option<usize>,
        st: Arc<LayerState>,
    ) -> Res<()> {
        let lazy = self.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            lazy.fetch_blocking(&rt, &ctx, &table, files, must, &st)
        })
        .await
        .map_err(joined)?
    }

    fn fetch_blocking(
        &self,
        rt: &tokio::runtime::Handle,
        ctx: &Ctx,
        table: &ChunkTable,
        mut files: Vec<usize>,
        must: Option<usize>,
        st: &LayerState,
    ) -> Res<()> {
        let store = &self.inner.store;
        let first = |f: usize| {
            table.files[f]
                .chunks
                .iter()
                .find(|c| !c.zeros)
                .map_or(0, |c| c.offset)
        };
        files.sort_by_key(|&f| first(f));
        files.dedup();
        // A file larger than the cache's bound could never be kept: it is
        // refused before any of it is fetched, written or evicted for.
        let max = store.max_object();
        if let Some(f) = must.filter(|&f| table.files[f].size > max) {
            let refused = crate::layer::stream::StreamError::TooLarge {
                path: format!("object {}", crate::cas::object_hex(&table.files[f].object)),
                size: table.files[f].size,
                bound: max,
            };
            let e = FsError::BadImage {
                image: ctx.image(),
                reason: format!("layer {}: {refused}", ctx.key.digest),
            };
            tracing::error!(layer = %ctx.key.digest, error = %e, "file refused");
            return Err(e);
        }
        files.retain(|&f| table.files[f].size <= max);
        let items: Vec<(usize, usize)> = files
            .iter()
            .flat_map(|&f| (0..table.files[f].chunks.len()).map(move |c| (f, c)))
            .collect();
        let mut writers: HashMap<usize, crate::cas::ObjectWriter<'_>> = HashMap::new();
        let mut failed: HashSet<usize> = HashSet::new();
        let mut i = 0;
        while i < items.len() {
            let (mut start, mut end) = (u64::MAX, 0u64);
            let mut j = i;
            while j < items.len() {
                let c = &table.files[items[j].0].chunks[items[j].1];
                if !c.zeros {
                    if start != u64::MAX
                        && (c.offset < start
                            || c.end > start + MAX_SPAN
                            || c.offset > end + MERGE_GAP)
                    {
                        break;
                    }
                    start = start.min(c.offset);
                    end = end.max(c.end);
                }
                j += 1;
            }
            let data = if start == u64::MAX {
                Vec::new()
            } else {
                rt.block_on(self.range_bytes(ctx, start, end - start, st))?
            };
            for &(f, ci) in &items[i..j] {
                if failed.contains(&f) {
                    continue;
                }
                let file = &table.files[f];
                let c = &file.chunks[ci];
                let piece = if c.zeros {
                    &[][..]
                } else {
                    &data[(c.offset - start) as usize..(c.end - start) as usize]
                };
                let bytes = match seekable::decode_chunk(table.format, piece, c) {
                    Ok(b) => b,
                    Err(e) => {
                        let e = ctx.seek_error(e);
                        tracing::error!(layer = %ctx.key.digest, error = %e, "chunk rejected; nothing of its file was kept");
                        if must == Some(f) {
                            return Err(e);
                        }
                        writers.remove(&f);
                        failed.insert(f);
                        continue;
                    }
                };
                let w = match writers.entry(f) {
                    Entry::Occupied(o) => o.into_mut(),
                    Entry::Vacant(v) => v.insert(store.writer().map_err(local)?),
                };
                w.write_all(&bytes).map_err(local)?;
                if ci + 1 == file.chunks.len() {
                    let w = writers.remove(&f).expect("inserted above");
                    let (got, _, new) = w.finish_new().map_err(local)?;
                    if got != file.object {
                        if new {
                            store.remove(&got);
                        }
                        let e: FsError = RegistryError::DigestMismatch {
                            registry: ctx.registry.clone(),
                            what: format!("file content of layer {}", ctx.key.digest),
                            expected: format!("sha256:{}", hex::encode(file.object)),
                            actual: format!("sha256:{}", hex::encode(got)),
                        }
                        .into();
                        tracing::error!(layer = %ctx.key.digest, error = %e, "file rejected; nothing kept");
                        if must == Some(f) {
                            return Err(e);
                        }
                        failed.insert(f);
                        continue;
                    }
                    st.progress.objects.fetch_add(1, Ordering::Relaxed);
                }
            }
            i = j;
        }
        if !failed.is_empty() {
            tracing::warn!(layer = %ctx.key.digest, files = failed.len(), "files failed verification and were skipped; reading them is EIO");
        }
        Ok(())
    }
}
