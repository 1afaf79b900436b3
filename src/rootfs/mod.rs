//! `rootfs/`: an image's layers read once into the content store and
//! merged into one tree ([`merge`]).
//!
//! [`Layers`] owns every layer the daemon knows, shared by all images (two
//! images with a common layer read it once). Contracts:
//! - **Single flight**: one stream per layer however many readers wait;
//!   readers of other layers or images never wait behind it.
//! - **Durability**: a layer's index is persisted only after the whole
//!   layer arrived and matched its digest; then a restart never streams it
//!   again. A failed layer leaves no index and removes the objects it made.
//! - **Refetch**: an object evicted (or found damaged) is fetched again by
//!   re-reading its layer, once for all readers waiting on that layer.
//! - **Resume**: a layer stream the network cuts after some progress goes
//!   on from where it stopped with a Range request (`pump`), hashed as one
//!   stream; readers see no error.
//! - **Early answers** ([`early`]): while plain layers stream, their
//!   entries are published as the stream passes them, and a lookup or read
//!   the layers seen so far settle is answered before the merged tree
//!   exists (before the layer's digest is checked; `-o noearly` waits). A
//!   gzip layer is read in two passes over one download
//!   (`Layers::stream_spilled`): a listing pass that settles every name,
//!   and a storing pass that follows it; on-demand extraction serves files
//!   in between.
//! - **Bounded by the cache, not by what a layer claims**: a file larger
//!   than `--cache-size` fails its layer at the file's header, before its
//!   content is read ([`crate::layer::stream`]; the image answers `EIO`,
//!   with a log line naming the layer, the file and its size against the
//!   bound) and evicts nothing. A descriptor's size is a claim until the
//!   blob's bytes match it: a gzip layer claiming more than half the bound
//!   gets no spill (no room is made for it) and is read in one pass; its
//!   real bytes are then checked against its size and digest as always.
//! - **Lazy layers** (eStargz, zstd:chunked; [`lazy`]): the index is made
//!   from the verified TOC and persisted at once; file contents arrive per
//!   file on first open (the same refetch path), single-flighted per object.
//! - **A TOC pin is not a digest**: a layer is known by its [`LayerKey`],
//!   its digest plus the TOC pin of its descriptor (`None` for a layer read
//!   whole). States, single flights, live views and chunk tables are per
//!   key, so descriptors that disagree on the pin never share a build, an
//!   early answer or an index made from a TOC. An index made from the
//!   whole blob, checked against its digest, serves every key of that
//!   digest; one made from a TOC only its own pin
//!   ([`crate::layer::LayerIndex::serves`], checked on every load).
//! - **Memory**: a [`Rootfs`] keeps its merged tree while it is used; one
//!   unused for `-o tree_idle` leaves memory ([`RootfsCore::unload_if_idle`])
//!   and is merged again from the persisted layer indexes on its next use,
//!   with the same node (inode) numbers. A daemon that serves image after
//!   image for weeks thus holds the trees in use, not every tree it built.

pub mod ahead;
pub mod early;
pub mod lazy;
pub mod merge;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::cas::{ObjectId, ObjectStore};
use crate::layer::spill::{Finish, Spill};
use crate::layer::stream::{
    ChannelReader, Progress, StreamError, extract_spilled, index_layer, scan_layer,
};
use crate::layer::{Compression, IndexEntry, IndexStore, LayerIndex, LayerMode};
use crate::model::FsError;
use crate::model::image::{Descriptor, Image};
use crate::registry::{RegistryClient, RegistryError};
use crate::singleflight::Flights;
use merge::MergedTree;

type Res<T> = Result<T, FsError>;

/// Which layer a descriptor names, as far as trusting an index goes: the
/// blob digest and the descriptor's TOC pin (format and the TOC digest its
/// annotation gives; `None` when the layer is not seekable, or its TOC is
/// pinned by nothing, and is read whole). Two descriptors of one digest
/// with different pins are different layers until the blob itself was
/// read and checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LayerKey {
    /// The blob digest.
    pub digest: String,
    /// The TOC pin.
    pub pin: Option<String>,
}

impl LayerKey {
    /// The key of `desc`.
    pub fn of(desc: &Descriptor) -> LayerKey {
        LayerKey {
            digest: desc.digest.clone(),
            pin: lazy::pin(desc),
        }
    }
}

/// Where a layer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LayerPhase {
    /// Nothing fetched yet.
    NotFetched = 0,
    /// Being streamed.
    Streaming = 1,
    /// Index complete (persisted).
    Indexed = 2,
    /// The last attempt failed.
    Failed = 3,
}

impl LayerPhase {
    /// The word `status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerPhase::NotFetched => "not fetched",
            LayerPhase::Streaming => "streaming",
            LayerPhase::Indexed => "indexed",
            LayerPhase::Failed => "failed",
        }
    }
}

/// What is known about one layer.
#[derive(Debug, Default)]
pub struct LayerState {
    phase: AtomicU8,
    mode: AtomicU8,
    /// Bytes and objects so far.
    pub progress: Progress,
    /// The index while someone uses it; it lives on disk, not in memory,
    /// once every rootfs that needed it is built.
    index: Mutex<std::sync::Weak<LayerIndex>>,
    error: Mutex<Option<String>>,
    /// Its entries so far while it streams, until the images that wait for
    /// it are merged ([`early`]).
    live: Mutex<Option<Arc<early::LiveLayer>>>,
    /// Listed and checked, its contents still being stored and its index
    /// not saved yet: what a clean exit waits for ([`Layers::finish_storing`]).
    storing: std::sync::atomic::AtomicBool,
}

impl LayerState {
    /// Current phase.
    pub fn phase(&self) -> LayerPhase {
        match self.phase.load(Ordering::Relaxed) {
            1 => LayerPhase::Streaming,
            2 => LayerPhase::Indexed,
            3 => LayerPhase::Failed,
            _ => LayerPhase::NotFetched,
        }
    }
    fn set(&self, p: LayerPhase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }
    /// How the layer's content is reached (streamed until an index says
    /// otherwise).
    pub fn mode(&self) -> LayerMode {
        match self.mode.load(Ordering::Relaxed) {
            1 => LayerMode::SpanIndex,
            2 => LayerMode::Estargz,
            3 => LayerMode::ZstdChunked,
            _ => LayerMode::Streamed,
        }
    }
    fn set_mode(&self, m: LayerMode) {
        self.mode.store(m as u8, Ordering::Relaxed);
    }
    /// The last error, if the last attempt failed.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }
    /// The layer's entries seen so far, while it streams (or until merged).
    pub fn live(&self) -> Option<Arc<early::LiveLayer>> {
        self.live.lock().unwrap().clone()
    }
}

/// Every layer, shared by all images.
pub struct Layers {
    client: RegistryClient,
    store: Arc<ObjectStore>,
    indexes: IndexStore,
    states: Mutex<HashMap<LayerKey, Arc<LayerState>>>,
    flights: Flights<LayerKey, Res<Arc<LayerIndex>>>,
    refetch_flights: Flights<(LayerKey, ObjectId), Res<()>>,
    lazy: lazy::Lazy,
    /// Publish streaming layers' entries for early answers (`-o noearly`
    /// turns it off).
    early: std::sync::atomic::AtomicBool,
    /// Woken whenever a live layer or a rootfs changes (early answers wait
    /// on it).
    pub changed: Arc<tokio::sync::Notify>,
}

/// A layer's entries for a sketch of the tree.
enum Listed {
    /// Listed by a stream that is still storing the contents.
    Live(Vec<IndexEntry>),
    /// Indexed (contents stored or reachable by their object ids).
    Indexed(Arc<LayerIndex>),
}

impl Listed {
    fn entries(&self) -> &[IndexEntry] {
        match self {
            Listed::Live(e) => e,
            Listed::Indexed(i) => &i.entries,
        }
    }
}

/// Ends a layer's [`LayerState::storing`] when its read and the saving of
/// its index are over, however they end.
struct StoringDone<'a>(&'a LayerState);

impl Drop for StoringDone<'_> {
    fn drop(&mut self) {
        self.0.storing.store(false, Ordering::Release);
    }
}

impl Layers {
    /// Layers fetched with `client`, stored in `store`, indexed in `indexes`.
    pub fn new(client: RegistryClient, store: Arc<ObjectStore>, indexes: IndexStore) -> Layers {
        let chunks = crate::layer::seekable::ChunkStore::new(indexes.dir());
        Layers {
            lazy: lazy::Lazy::new(client.clone(), store.clone(), chunks),
            client,
            store,
            indexes,
            states: Mutex::new(HashMap::new()),
            flights: Flights::default(),
            refetch_flights: Flights::default(),
            early: std::sync::atomic::AtomicBool::new(true),
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Whether files of a streaming layer are served before it ends.
    pub fn set_early(&self, on: bool) {
        self.early.store(on, Ordering::Relaxed);
    }

    /// See [`Layers::set_early`].
    pub fn early(&self) -> bool {
        self.early.load(Ordering::Relaxed)
    }

    /// The live views of `image`'s layers (bottom first); `None` for a
    /// layer that has none (indexed before, lazy, or not started).
    pub fn live_views(&self, image: &Image) -> Vec<Option<Arc<early::LiveLayer>>> {
        image
            .layers
            .iter()
            .map(|d| self.state(&LayerKey::of(d)).live())
            .collect()
    }

    /// Whether lazy layers are filled in the background after first use.
    pub fn set_background(&self, on: bool) {
        self.lazy.set_background(on);
    }

    /// The object store.
    pub fn store(&self) -> &Arc<ObjectStore> {
        &self.store
    }

    /// Waits, at most `limit`, until no layer that was listed and checked is
    /// still being stored: a clean exit lets them finish (local work, the
    /// download is over), so that the next start finds their indexes and
    /// fetches nothing again. Layers still downloading are not waited for.
    pub async fn finish_storing(&self, limit: std::time::Duration) {
        let storing = || {
            let states = self.states.lock().unwrap();
            states
                .values()
                .filter(|s| s.storing.load(Ordering::Acquire))
                .count()
        };
        let n = storing();
        if n == 0 {
            return;
        }
        tracing::info!(
            layers = n,
            "storing layers already downloaded before exiting"
        );
        let deadline = tokio::time::Instant::now() + limit;
        while storing() > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    layers = storing(),
                    "exiting before every downloaded layer was stored; the next start reads them again"
                );
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Waits until `check` answers (`Some`), looking again whenever a live
    /// layer or a rootfs changes ([`Layers::changed`]). The wake-up is armed
    /// before each look, so a change between the look and the wait is never
    /// missed.
    pub async fn until<T, F>(&self, mut check: impl FnMut() -> F) -> T
    where
        F: std::future::Future<Output = Option<T>>,
    {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(x) = check().await {
                return x;
            }
            notified.await;
        }
    }

    /// The state of layer `key` (created on first ask, `Indexed` if an
    /// index it may use is on disk).
    ///
    /// Only the head of the index on disk is read ([`IndexStore::summary`],
    /// a few hundred bytes: the entries are decoded once, when the index is
    /// used), and without holding the map's lock, through which every
    /// layer's state goes. Two first asks may both read it; the first to
    /// insert wins.
    pub fn state(&self, key: &LayerKey) -> Arc<LayerState> {
        if let Some(s) = self.states.lock().unwrap().get(key) {
            return s.clone();
        }
        let s = LayerState::default();
        if let Some(i) = self.indexes.summary(&key.digest, key.pin.as_deref()) {
            // A lazy layer was fetched only in part; counting starts again.
            let (fetched, objects) = if i.mode.is_lazy() {
                (0, 0)
            } else {
                (i.compressed_size, i.objects)
            };
            s.progress.bytes_fetched.store(fetched, Ordering::Relaxed);
            s.progress.objects.store(objects, Ordering::Relaxed);
            s.set(LayerPhase::Indexed);
            s.set_mode(i.mode);
        }
        let mut m = self.states.lock().unwrap();
        m.entry(key.clone()).or_insert_with(|| Arc::new(s)).clone()
    }

    /// The index of `key` saved on disk, if it may use it (read on a
    /// blocking thread: a large one takes a while to decode).
    async fn saved_index(&self, key: &LayerKey) -> Option<LayerIndex> {
        let indexes = self.indexes.clone();
        let (digest, pin) = (key.digest.clone(), key.pin.clone());
        tokio::task::spawn_blocking(move || indexes.load(&digest, pin.as_deref()))
            .await
            .ok()
            .flatten()
    }

    /// The index of layer `desc`: from memory, from disk, or by reading
    /// it (its TOC, or the whole blob). Only an index `desc`'s key may use
    /// (see the module's contracts); one it may not is replaced.
    pub async fn index(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
    ) -> Res<Arc<LayerIndex>> {
        let key = LayerKey::of(desc);
        let st = self.state(&key);
        if let Some(i) = st.index.lock().unwrap().upgrade() {
            return Ok(i);
        }
        self.flights
            .run(key.clone(), || async {
                if let Some(i) = st.index.lock().unwrap().upgrade() {
                    return Ok(i);
                }
                if st.phase() == LayerPhase::Indexed
                    && let Some(i) = self.saved_index(&key).await
                {
                    st.set_mode(i.mode);
                    let i = Arc::new(lazy::without_artifacts(desc, &i).unwrap_or(i));
                    *st.index.lock().unwrap() = Arc::downgrade(&i);
                    return Ok(i);
                }
                let _stored = StoringDone(&st);
                let (saved, idx) = match self.lazy.index(registry, repo, desc, &st).await? {
                    Some(i) => {
                        let i = Arc::new(i);
                        (i.clone(), i)
                    }
                    None => {
                        // Saved as the blob is (the truth for its digest,
                        // whoever asks next); shown as `desc` means it.
                        let i = self.stream(registry, repo, desc, &st).await?;
                        let shown = lazy::without_artifacts(desc, &i).map(Arc::new);
                        let i = Arc::new(i);
                        (i.clone(), shown.unwrap_or(i))
                    }
                };
                st.set_mode(idx.mode);
                self.persist(desc, &st, saved).await;
                *st.index.lock().unwrap() = Arc::downgrade(&idx);
                Ok(idx)
            })
            .await
    }

    /// Saves a streamed layer's index (off the runtime's threads), then
    /// marks the layer `Indexed`: the status never promises a layer that a
    /// crash would fetch again. A failed save is logged; the layer is whole
    /// in memory and serves this process.
    async fn persist(&self, desc: &Descriptor, st: &LayerState, idx: Arc<LayerIndex>) {
        let (indexes, store) = (self.indexes.clone(), self.store.clone());
        // A full disk evicts objects for the index, as for any write to the
        // cache: without its index, a later read of an evicted file would
        // stream the whole layer again.
        let saved = tokio::task::spawn_blocking(move || {
            crate::cas::when_full(|| store.make_room(0), || indexes.save(&idx))
        })
        .await;
        if let Ok(Err(e)) = saved {
            tracing::warn!(layer = %desc.digest, error = %e, "cannot persist layer index");
        }
        st.set(LayerPhase::Indexed);
    }

    /// Fetches object `id` of layer `desc` (evicted, damaged, or never
    /// fetched in a lazy layer): one Range request, located by the layer's
    /// persisted index — the file's chunks (eStargz, zstd:chunked), the span
    /// from the gzip checkpoint before it, its exact bytes (plain tar), or
    /// the blob's prefix (zstd) — and the content checked against `id`.
    /// One flight per object, however many readers wait for it.
    pub async fn refetch(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
        id: ObjectId,
    ) -> Res<()> {
        self.refetch_flights
            .run((LayerKey::of(desc), id), || async {
                self.refetch_inner(registry, repo, desc, id).await
            })
            .await
    }

    async fn refetch_inner(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
        id: ObjectId,
    ) -> Res<()> {
        let key = LayerKey::of(desc);
        let st = self.state(&key);
        if st.mode().is_lazy() {
            return self.lazy.fetch(registry, repo, desc, id, &st).await;
        }
        let compression = layer_compression(registry, repo, desc)?;
        let index = self.saved_index(&key).await;
        // Made from the TOC this descriptor pins (by another daemon on the
        // cache, say): its files are fetched by their chunks.
        if index.as_ref().is_some_and(|i| i.mode.is_lazy()) {
            return self.lazy.fetch(registry, repo, desc, id, &st).await;
        }
        let Some(index) = index else {
            tracing::info!(layer = %desc.digest, "no index on disk this layer may use; reading the layer again");
            let _stored = StoringDone(&st);
            let idx = self.stream(registry, repo, desc, &st).await?;
            self.persist(desc, &st, Arc::new(idx)).await;
            return Ok(());
        };
        let entry = index
            .entries
            .iter()
            .find(|e| e.object == Some(id))
            .ok_or_else(|| FsError::Io {
                reason: format!(
                    "layer {} has no object {}",
                    desc.digest,
                    crate::cas::object_hex(&id)
                ),
                no_space: false,
            })?;
        let name = crate::cas::object_hex(&id);
        let at = crate::layer::stream::Placement::of(entry);
        let offset = at.offset;
        // Where the bytes holding the content start and end in the blob,
        // and how to decode from there.
        let (start, end, how) = match (compression, &index.spans) {
            // Uncompressed: exactly the content.
            (Compression::None, _) => (offset, offset + entry.extent(), Refetch::Plain),
            // gzip with a span index: from the checkpoint before the
            // content (the decoder reads at most one input buffer past it).
            (Compression::Gzip, Some(spans)) => {
                let cp = spans.locate(offset).cloned();
                let start = cp.as_ref().map_or(0, |c| c.fetch_from());
                (start, entry.compressed_end + (64 << 10), Refetch::Span(cp))
            }
            // Otherwise the prefix of the blob up to the content.
            _ => (0, entry.compressed_end + (64 << 10), Refetch::Prefix),
        };
        let end = end.min(desc.size).max(start + 1);
        tracing::info!(layer = %desc.digest, object = %name, from = start, bytes = end - start, "fetching evicted content again");
        let canonical = crate::registry::name::canonical_repo(registry, repo);
        let body = self
            .client
            .blob_range_or_skip(registry, &canonical, &desc.digest, start, end - start)
            .await?;
        let (rx, feeder) = pump(body, None, end - start, None);
        let store = self.store.clone();
        let found = tokio::task::spawn_blocking(move || {
            use crate::layer::stream as s;
            let raw = ChannelReader::new(rx);
            match how {
                Refetch::Plain => s::extract_at(&mut { raw }, start, &at, &id, &store).map(|_| 1),
                Refetch::Span(cp) => {
                    s::extract_gzip_span(raw, cp.as_ref(), &at, &id, &store).map(|_| 1)
                }
                Refetch::Prefix => {
                    let wanted: HashMap<u64, ObjectId> = HashMap::from([(offset, id)]);
                    s::extract_objects(raw, compression, &wanted, &store)
                }
            }
        })
        .await
        .map_err(lost)?;
        let (_, n, net_error) = feeder.await.map_err(lost)?;
        st.progress.bytes_refetched.fetch_add(n, Ordering::Relaxed);
        match found {
            Ok(1) => Ok(()),
            Ok(_) => Err(match net_error {
                Some(reason) => RegistryError::Unavailable {
                    registry: registry.into(),
                    what: format!("layer {}", desc.digest),
                    reason,
                }
                .into(),
                None => FsError::BadImage {
                    image: format!("{registry}/{repo}"),
                    reason: format!(
                        "layer {}: content not found where its index says",
                        desc.digest
                    ),
                },
            }),
            Err(e) => {
                if let StreamError::Malformed(reason) = &e {
                    tracing::error!(layer = %desc.digest, %reason, "refetched bytes do not match the layer index; nothing kept");
                }
                Err(stream_error(e, registry, repo, desc))
            }
        }
    }

    /// Streams one layer through the indexer; see the module contracts.
    async fn stream(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
        st: &Arc<LayerState>,
    ) -> Res<LayerIndex> {
        let compression =
            Compression::from_media_type(&desc.media_type).ok_or_else(|| FsError::BadImage {
                image: format!("{registry}/{repo}"),
                reason: format!(
                    "layer {} has unsupported media type {:?}",
                    desc.digest, desc.media_type
                ),
            })?;
        st.set(LayerPhase::Streaming);
        st.progress.bytes_fetched.store(0, Ordering::Relaxed);
        // Early answers only on a layer's first attempt: one that failed
        // (its digest, its gzip, its tar) is read to its end and checked
        // before anything of it is served again.
        let live = (self.early() && st.error().is_none())
            .then(|| Arc::new(early::LiveLayer::new(self.changed.clone())));
        *st.live.lock().unwrap() = live.clone();
        let r = self
            .stream_inner(registry, repo, desc, st, compression, live)
            .await;
        match &r {
            // `Indexed` is set once the index is saved (`Layers::persist`).
            Ok(_) => {
                *st.error.lock().unwrap() = None;
                if let Some(l) = st.live() {
                    l.end();
                }
            }
            Err(e) => {
                *st.live.lock().unwrap() = None;
                self.changed.notify_waiters();
                let key = LayerKey::of(desc);
                st.set(if self.indexes.serves(&key.digest, key.pin.as_deref()) {
                    LayerPhase::Indexed
                } else {
                    LayerPhase::Failed
                });
                *st.error.lock().unwrap() = Some(e.to_string());
                tracing::error!(layer = %desc.digest, image = %format!("{registry}/{repo}"), error = %e, "layer failed; nothing of it was kept");
            }
        }
        r
    }

    async fn stream_inner(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
        st: &Arc<LayerState>,
        compression: Compression,
        live: Option<Arc<early::LiveLayer>>,
    ) -> Res<LayerIndex> {
        let size = desc.size;
        // The spill counts against --cache-size while it lives; a layer
        // that claims more than the bound can spare reads in one pass
        // (the claim is not trusted to evict anything).
        let room = match (compression, &live) {
            (Compression::Gzip, Some(_)) => {
                let room = self.store.reserve_spill(size);
                if room.is_none() {
                    tracing::info!(layer = %desc.digest, size, max_spill = self.store.max_spill(), "layer larger than the cache can spare for its spill: read in one pass");
                }
                room
            }
            _ => None,
        };
        if let (Some(room), Some(live)) = (room, &live) {
            let (rx, feeder) = self.open_blob(registry, repo, desc, st).await?;
            let spilled = self
                .stream_spilled(registry, repo, desc, st, rx, feeder, live.clone())
                .await?;
            drop(room);
            if let Some(idx) = spilled {
                return Ok(idx);
            }
            // No room on disk for the spill: read the layer again, in one
            // pass.
            st.progress.bytes_fetched.store(0, Ordering::Relaxed);
        }
        let (rx, feeder) = self.open_blob(registry, repo, desc, st).await?;
        let store = self.store.clone();
        let digest = desc.digest.clone();
        let st3 = st.clone();
        let consumer = tokio::task::spawn_blocking(move || {
            index_layer(
                ChannelReader::new(rx),
                &digest,
                compression,
                size,
                &store,
                &st3.progress,
                live.as_deref(),
            )
        });
        let consumed = consumer.await.map_err(lost)?;
        let fed = fetched(registry, repo, desc, feeder.await.map_err(lost)?);
        match (consumed, fed) {
            (Ok(idx), Ok(n)) if n == size => Ok(idx),
            (Ok(idx), fed) => {
                // The blob failed its check, or was shorter than its
                // descriptor: its (unchecked) objects are not kept.
                self.remove_objects(idx.objects());
                Err(match fed {
                    Err(e) => e,
                    Ok(n) => ended_early(registry, repo, desc, n),
                })
            }
            (Err(_), Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(stream_error(e, registry, repo, desc)),
        }
    }

    /// Removes `ids` from the store (objects of a layer that failed).
    fn remove_objects(&self, ids: impl IntoIterator<Item = ObjectId>) {
        for id in ids {
            self.store.remove(&id);
        }
    }

    /// Starts fetching `desc`'s blob: its bytes on a channel for a blocking
    /// reader, and the feeder task that hashes and counts them ([`pump`]).
    async fn open_blob(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
        st: &Arc<LayerState>,
    ) -> Res<(
        tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
        tokio::task::JoinHandle<Pumped>,
    )> {
        let canonical = crate::registry::name::canonical_repo(registry, repo);
        let body = self
            .client
            .blob_stream(registry, &canonical, &desc.digest)
            .await?;
        let (client, registry, digest, size) = (
            self.client.clone(),
            registry.to_string(),
            desc.digest.clone(),
            desc.size,
        );
        // A registry that ignores Range sends the blob again from its
        // start: skipped to the offset, still no seam for the reader.
        let resume: Resume = Box::new(move |offset| {
            let (client, registry, repo, digest) = (
                client.clone(),
                registry.clone(),
                canonical.clone(),
                digest.clone(),
            );
            Box::pin(async move {
                client
                    .blob_range_or_skip(&registry, &repo, &digest, offset, size - offset)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        Ok(pump(body, Some(st.clone()), desc.size, Some(resume)))
    }
}

impl Layers {
    /// A gzip layer read in two passes for early answers
    /// ([`early`]'s contracts): list it into `live` while spilling its
    /// compressed bytes, check its digest (then every name in it is
    /// settled), and store its contents from the spill in a second pass
    /// behind readers. Files are extracted from the spill on demand in
    /// between ([`Layers::extract_early`]).
    ///
    /// `None` when the spill could not be written (a full disk): nothing
    /// of the layer is kept, and the caller reads it again in one pass.
    #[allow(clippy::too_many_arguments)]
    async fn stream_spilled(
        &self,
        registry: &str,
        repo: &str,
        desc: &Descriptor,
        st: &Arc<LayerState>,
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
        feeder: tokio::task::JoinHandle<Pumped>,
        live: Arc<early::LiveLayer>,
    ) -> Res<Option<LayerIndex>> {
        let size = desc.size;
        let t0 = std::time::Instant::now();
        let no_room = |e: &std::io::Error| {
            tracing::warn!(layer = %desc.digest, error = %e, "no room for the layer's spill (or the cache disk failed); reading it again in one pass");
        };
        let spill = match self.store.spill_file() {
            Ok(f) => {
                let store = self.store.clone();
                Arc::new(Spill::new(f).on_full(move |n| store.make_room(n)))
            }
            Err(e) => {
                no_room(&e);
                return Ok(None);
            }
        };
        live.spill(spill.file().clone());
        // The second pass follows the spill from its start, behind the
        // first (on a slow network it is done soon after the download).
        let (tx, stored) = tokio::sync::oneshot::channel();
        let (store, digest, st2, l2, s2) = (
            self.store.clone(),
            desc.digest.clone(),
            st.clone(),
            live.clone(),
            spill.clone(),
        );
        std::thread::Builder::new()
            .name("layer-store".into())
            .spawn(move || {
                // Behind the first pass, readers and their on-demand
                // extractions. Nice values are per thread on Linux, and
                // this thread (and the writer it starts, which inherits
                // it) ends with the pass.
                // SAFETY: setpriority has no memory effects.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
                hold_for_tests();
                let raw = std::io::BufReader::with_capacity(1 << 20, s2.tail(0));
                // Only the reader keeps the spill: it must be gone by the
                // time the result is, or a one-pass retry after a full
                // disk would find its room still taken.
                drop(s2);
                let r = index_layer(
                    raw,
                    &digest,
                    Compression::Gzip,
                    size,
                    &store,
                    &st2.progress,
                    Some(&l2),
                );
                let _ = tx.send(r);
            })
            .map_err(|e| stream_error(StreamError::Local(e), registry, repo, desc))?;
        let second = async {
            stored.await.unwrap_or_else(|_| {
                Err(StreamError::Interrupted(
                    "the second pass over the layer stopped".into(),
                ))
            })
        };
        // Whatever fails, objects extracted on demand go, and so do those
        // of a second pass that read the whole (unchecked) spill.
        let undo = |second: Option<LayerIndex>| {
            self.remove_objects(live.take_made());
            self.remove_objects(second.iter().flat_map(|i| i.objects()));
        };
        let (l1, s1) = (live.clone(), spill.clone());
        let max_file = self.store.max_object();
        let scanned = tokio::task::spawn_blocking(move || {
            let unfinished = Finish(&s1);
            let r = scan_layer(ChannelReader::new(rx), &s1, &l1, max_file);
            s1.finish(r.is_ok());
            drop(unfinished);
            r
        })
        .await
        .map_err(lost);
        let failed = match (
            fetched(registry, repo, desc, feeder.await.map_err(lost)?),
            scanned,
        ) {
            (Err(e), _) | (_, Err(e)) => Some(e),
            (Ok(_), Ok(Err(StreamError::Local(e)))) => {
                no_room(&e);
                undo(second.await.ok());
                live.drop_spill();
                return Ok(None);
            }
            (Ok(_), Ok(Err(e))) => Some(stream_error(e, registry, repo, desc)),
            (Ok(n), Ok(Ok(_))) if n != size => Some(ended_early(registry, repo, desc, n)),
            (Ok(_), Ok(Ok(_))) => None,
        };
        if let Some(e) = failed {
            // A first pass that stopped early makes the second fail too.
            spill.finish(false);
            undo(second.await.ok());
            return Err(e);
        }
        // Listed and checked: every name of the layer is settled now.
        st.storing.store(true, Ordering::Release);
        live.end();
        tracing::info!(layer = %desc.digest, elapsed = ?t0.elapsed(), "layer listed and checked; storing its contents");
        let stored = second.await;
        live.drop_spill();
        match stored {
            Ok(idx) => {
                tracing::info!(layer = %desc.digest, elapsed = ?t0.elapsed(), "layer contents stored");
                Ok(Some(idx))
            }
            // The disk filled while the spill took room: the one-pass read
            // needs none (its objects are evicted down to the bound).
            Err(StreamError::Local(e)) => {
                no_room(&e);
                undo(None);
                Ok(None)
            }
            Err(e) => {
                undo(None);
                Err(stream_error(e, registry, repo, desc))
            }
        }
    }

    /// Extracts entry `idx` of `layer` from its spill on a blocking
    /// thread ([`early::LiveLayer::want`] said what); readers waiting for
    /// it are woken when it is stored. On failure they wait for the second
    /// pass instead.
    pub fn extract_early(&self, layer: Arc<early::LiveLayer>, idx: u32, x: early::Extraction) {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            match extract_spilled(&x.spill, x.checkpoint.as_ref(), &x.at, &store) {
                Ok((id, new)) => layer.extracted(idx, id, new),
                Err(e) => {
                    tracing::warn!(error = %e, offset = x.at.offset, "on-demand extraction failed; the reader waits for the layer")
                }
            }
        });
    }
}

/// How refetched bytes are decoded.
enum Refetch {
    /// Uncompressed content, exactly.
    Plain,
    /// gzip resumed at a checkpoint (or the start).
    Span(Option<crate::layer::gzindex::Checkpoint>),
    /// The blob's prefix, walked as a tar.
    Prefix,
}

/// A blocking task that did not come back (panicked or cancelled).
fn lost(e: tokio::task::JoinError) -> FsError {
    FsError::Io {
        reason: e.to_string(),
        no_space: false,
    }
}

/// What the feeder of a layer read saw: the bytes it passed, or the error
/// that comes before anything the reader met: a wrong digest (the whole
/// blob arrived), then a broken network.
fn fetched(registry: &str, repo: &str, desc: &Descriptor, pumped: Pumped) -> Res<u64> {
    let (actual, n, net_error) = pumped;
    if n == desc.size && actual != desc.digest {
        return Err(RegistryError::DigestMismatch {
            registry: registry.into(),
            what: format!("layer of {repo}"),
            expected: desc.digest.clone(),
            actual,
        }
        .into());
    }
    if let Some(reason) = net_error {
        return Err(RegistryError::Unavailable {
            registry: registry.into(),
            what: format!("layer {}", desc.digest),
            reason,
        }
        .into());
    }
    Ok(n)
}

/// A layer read that ended after `n` of its bytes.
fn ended_early(registry: &str, repo: &str, desc: &Descriptor, n: u64) -> FsError {
    FsError::BadImage {
        image: format!("{registry}/{repo}"),
        reason: format!(
            "layer {} ended after {n} of {} bytes",
            desc.digest, desc.size
        ),
    }
}

/// For tests only: while the path in `APT_LAYER_TEST_HOLD_STORING` exists,
/// a spilled layer's storing pass waits before it starts, so that a test
/// can see what is answered between the listing pass and the stored tree
/// (on a fast machine that is a fraction of a second). Unset, it costs one
/// lookup of the environment per layer.
fn hold_for_tests() {
    let Some(path) = std::env::var_os("APT_LAYER_TEST_HOLD_STORING") else {
        return;
    };
    while std::path::Path::new(&path).exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What a failed layer read means for the user.
fn stream_error(e: StreamError, registry: &str, repo: &str, desc: &Descriptor) -> FsError {
    match e {
        StreamError::Local(e) => FsError::Io {
            no_space: e.raw_os_error() == Some(libc::ENOSPC),
            reason: format!("cache write failed: {e}"),
        },
        StreamError::Interrupted(reason) => RegistryError::Unavailable {
            registry: registry.into(),
            what: format!("layer {}", desc.digest),
            reason,
        }
        .into(),
        StreamError::Malformed(reason) => FsError::BadImage {
            image: format!("{registry}/{repo}"),
            reason: format!("layer {}: {reason}", desc.digest),
        },
        e @ StreamError::TooLarge { .. } => FsError::BadImage {
            image: format!("{registry}/{repo}"),
            reason: format!("layer {}: {e}", desc.digest),
        },
    }
}

/// The compression of a layer, or a clear error for unsupported types.
fn layer_compression(registry: &str, repo: &str, desc: &Descriptor) -> Res<Compression> {
    Compression::from_media_type(&desc.media_type).ok_or_else(|| FsError::BadImage {
        image: format!("{registry}/{repo}"),
        reason: format!(
            "layer {} has unsupported media type {:?}",
            desc.digest, desc.media_type
        ),
    })
}

/// What [`pump`] saw: (sha256 digest, bytes, network error).
type Pumped = (String, u64, Option<String>);

/// Asks for the rest of a blob from a byte offset (a Range request): how a
/// stream cut by the network goes on where it stopped.
type Resume = Box<
    dyn Fn(
            u64,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<crate::registry::BlobBody, String>> + Send>,
        > + Send
        + Sync,
>;

/// How many times one blob's stream is resumed after a cut.
const RESUMES: u32 = 3;

/// Moves a network body into a bounded channel for a blocking reader,
/// hashing and counting as it goes (at most `limit` bytes are accepted).
/// A body cut short after making progress is resumed from where it stopped
/// with `resume` (up to [`RESUMES`] times), so a network hiccup late in a
/// large layer costs one Range request, not the layer; the reader never
/// sees the seam.
/// The task's result is (sha256 digest, bytes, network error).
fn pump(
    mut body: futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>,
    progress: Option<Arc<LayerState>>,
    limit: u64,
    resume: Option<Resume>,
) -> (
    tokio::sync::mpsc::Receiver<Result<Bytes, String>>,
    tokio::task::JoinHandle<Pumped>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(16);
    let task = tokio::spawn(async move {
        let mut hasher = crate::cas::Sha256::new();
        let mut n = 0u64;
        let mut net_error = None;
        let (mut resumes, mut resumed_at) = (0, 0u64);
        loop {
            let chunk = match body.next().await {
                None => break,
                // Only a stream that made progress since it (re)started: a
                // registry that stalls or fails at once gets no more tries
                // (its fetch timeout, not a multiple of it, is what a
                // reader waits).
                Some(Err(e))
                    if n < limit && n > resumed_at && resumes < RESUMES && resume.is_some() =>
                {
                    resumes += 1;
                    resumed_at = n;
                    tracing::warn!(offset = n, size = limit, error = %e, "blob stream cut; resuming with a Range request");
                    match (resume.as_ref().expect("checked"))(n).await {
                        Ok(rest) => {
                            body = rest;
                            continue;
                        }
                        Err(why) => Some(Err(std::io::Error::other(format!(
                            "{e}; resuming at {n} failed: {why}"
                        )))),
                    }
                }
                c => c,
            };
            let Some(chunk) = chunk else { break };
            match chunk {
                Ok(b) => {
                    hasher.update(&b);
                    n += b.len() as u64;
                    if let Some(st) = &progress {
                        st.progress.bytes_fetched.store(n, Ordering::Relaxed);
                    }
                    if n > limit {
                        let _ = tx
                            .send(Err("more bytes than the descriptor's size".into()))
                            .await;
                        break;
                    }
                    if tx.send(Ok(b)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string())).await;
                    net_error = Some(e.to_string());
                    break;
                }
            }
        }
        (
            format!("sha256:{}", hex::encode(hasher.finish())),
            n,
            net_error,
        )
    });
    (rx, task)
}

/// One image's rootfs as one directory shows it: an inode range over the
/// image's [`RootfsCore`], which every directory showing the image shares.
///
/// Each `rootfs/` (of each tag, and of the `@sha256:` directory) gets a
/// range of its own, so the kernel sees separate trees: with one range, a
/// directory would be one dentry with several parents, and the kernel moves
/// such a dentry to wherever it was looked up last, taking with it the
/// mounts on it (a chroot's `/proc`) and the path of any cwd in it.
pub struct Rootfs {
    /// Inode number of the root; node `i` is `base + i`.
    pub base: u64,
    core: Arc<RootfsCore>,
}

impl std::ops::Deref for Rootfs {
    type Target = RootfsCore;
    fn deref(&self) -> &RootfsCore {
        &self.core
    }
}

/// What the directories showing one image share: the image, its merged
/// tree (built once, single-flight) and its early answers (numbered within
/// the range, the same in every [`Rootfs`] of it).
pub struct RootfsCore {
    /// Registry to fetch from.
    pub registry: Arc<str>,
    /// Repository to fetch from.
    pub repo: Arc<str>,
    /// The image.
    pub image: Arc<Image>,
    tree: Mutex<Option<Arc<MergedTree>>>,
    flight: Flights<(), Res<Arc<MergedTree>>>,
    /// The tree made from the layers' listings while their contents are
    /// still being stored ([`RootfsCore::answering`]); gone once the tree
    /// is built, or its build failed.
    sketch: Mutex<Option<Arc<MergedTree>>>,
    sketch_flight: Flights<(), Option<Arc<MergedTree>>>,
    /// The layers' entries did not merge: no sketch.
    sketch_failed: std::sync::atomic::AtomicBool,
    /// Inode readahead of the objects of files opened one after another.
    pub ahead: ahead::Ahead,
    /// Inode numbers handed out before the tree was built.
    pub early: early::EarlyInodes,
    /// A detached build of the tree is running ([`Rootfs::start`]).
    building: std::sync::atomic::AtomicBool,
    /// Why the last detached build failed.
    build_error: Mutex<Option<FsError>>,
    /// The tree was built once (it may have left memory since).
    ever_built: std::sync::atomic::AtomicBool,
    /// When the tree was last asked for ([`now_secs`]).
    last_used: AtomicU64,
}

/// Seconds since the process started (a coarse clock for idleness).
fn now_secs() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
}

impl Rootfs {
    /// A rootfs for `image` at inode `base`.
    pub fn new(base: u64, registry: Arc<str>, repo: Arc<str>, image: Arc<Image>) -> Rootfs {
        Rootfs {
            base,
            core: Arc::new(RootfsCore {
                registry,
                repo,
                image,
                tree: Mutex::new(None),
                flight: Flights::default(),
                sketch: Mutex::new(None),
                sketch_flight: Flights::default(),
                sketch_failed: std::sync::atomic::AtomicBool::new(false),
                ahead: ahead::Ahead::default(),
                early: early::EarlyInodes::default(),
                building: std::sync::atomic::AtomicBool::new(false),
                build_error: Mutex::new(None),
                ever_built: std::sync::atomic::AtomicBool::new(false),
                last_used: AtomicU64::new(now_secs()),
            }),
        }
    }

    /// The same image under another inode range (another directory's
    /// `rootfs/`): it shares the tree, its build and the early answers.
    pub fn view(&self, base: u64) -> Rootfs {
        Rootfs {
            base,
            core: self.core.clone(),
        }
    }

    /// Starts building the tree on the runtime unless that is under way,
    /// so that early answers can return while it goes on (a build is never
    /// the future of a caller that may stop waiting). When it ends,
    /// `layers.changed` wakes the waiters.
    pub fn start(&self, layers: &Arc<Layers>) {
        self.core.start(layers)
    }

    /// The tree to answer names, attributes and listings from: the built
    /// one, or, while contents are still being stored, the sketch made from
    /// the layers' listings once every layer is listed and checked (its
    /// files' contents are found through their entries in the live layers,
    /// [`MergedTree::origin`]). Waits for whichever comes first.
    pub async fn answering(&self, layers: &Arc<Layers>) -> Res<Arc<MergedTree>> {
        if !layers.early() || self.was_built() {
            return self.tree(layers).await;
        }
        self.core.start(layers);
        layers
            .until(|| async {
                if let Some(t) = self.shown() {
                    return Some(Ok(t));
                }
                if let Some(e) = self.build_error() {
                    return Some(Err(e));
                }
                self.sketch_now(layers).await.map(Ok)
            })
            .await
    }
}

impl RootfsCore {
    /// Whether the tree was built once: from then on every answer comes
    /// from it (rebuilt from the persisted indexes if it left memory), never
    /// early.
    pub fn was_built(&self) -> bool {
        self.ever_built.load(Ordering::Acquire)
    }

    /// Lets the tree leave memory if it was not asked for in `idle`, no
    /// request holds it, and every layer's index is on disk (so it comes
    /// back without the network, with the same node numbers: the merge is
    /// deterministic). Returns the number of entries freed.
    pub fn unload_if_idle(&self, idle: std::time::Duration, layers: &Layers) -> Option<usize> {
        if self.built().is_none()
            || now_secs().saturating_sub(self.last_used.load(Ordering::Relaxed)) < idle.as_secs()
        {
            return None;
        }
        if !self.image.layers.iter().all(|d| {
            let key = LayerKey::of(d);
            layers.state(&key).phase() == LayerPhase::Indexed
                && layers.indexes.serves(&key.digest, key.pin.as_deref())
        }) {
            return None;
        }
        let mut slot = self.tree.lock().unwrap();
        let n = slot.as_ref().filter(|t| Arc::strong_count(t) == 1)?.len();
        *slot = None;
        Some(n)
    }

    fn start(self: &Arc<Self>, layers: &Arc<Layers>) {
        if self.built().is_some() || self.building.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.build_error.lock().unwrap() = None;
        let (rf, layers) = (self.clone(), layers.clone());
        tokio::spawn(async move {
            let r = rf.tree(&layers).await;
            if let Err(e) = r {
                *rf.build_error.lock().unwrap() = Some(e);
            }
            rf.building.store(false, Ordering::Release);
            layers.changed.notify_waiters();
        });
    }

    /// Where the merged tree is, as `status` shows it: `ready` (built),
    /// `listed` (every layer listed: answered from the sketch while
    /// contents are still being stored), `failed` (the last build failed)
    /// or `pending`.
    pub fn state(&self) -> &'static str {
        if self.was_built() {
            "ready"
        } else if self.sketch.lock().unwrap().is_some() {
            "listed"
        } else if self.build_error().is_some() {
            "failed"
        } else {
            "pending"
        }
    }

    /// The error of the last detached build, once it has ended.
    pub fn build_error(&self) -> Option<FsError> {
        if self.building.load(Ordering::Acquire) {
            return None;
        }
        self.build_error.lock().unwrap().clone()
    }

    /// The merged tree if already built.
    pub fn built(&self) -> Option<Arc<MergedTree>> {
        self.tree.lock().unwrap().clone()
    }

    /// The tree answers are taken from now, if any: the built one, else
    /// the sketch.
    pub fn shown(&self) -> Option<Arc<MergedTree>> {
        self.built().or_else(|| self.sketch.lock().unwrap().clone())
    }

    /// Whether names are answered from a tree (built or sketched), no
    /// longer early from the live layers.
    pub fn answers_from_tree(&self) -> bool {
        self.was_built() || self.sketch.lock().unwrap().is_some()
    }

    /// Sketches the tree if every layer of the image is listed and checked
    /// and the tree is not built (once, however many ask).
    pub async fn sketch_now(&self, layers: &Layers) -> Option<Arc<MergedTree>> {
        if self.was_built() {
            return None;
        }
        if let Some(t) = self.sketch.lock().unwrap().clone() {
            return Some(t);
        }
        let states: Vec<Arc<LayerState>> = self
            .image
            .layers
            .iter()
            .map(|d| layers.state(&LayerKey::of(d)))
            .collect();
        // Each layer listed and checked: live and ended, or indexed (its
        // index in memory: the build holds it); one at least still storing.
        let ready = |st: &LayerState| match st.live() {
            Some(l) => l.is_ended(),
            None => st.index.lock().unwrap().strong_count() > 0,
        };
        if self.sketch_failed.load(Ordering::Relaxed)
            || !states.iter().all(|st| ready(st))
            || states.iter().all(|st| st.live().is_none())
        {
            return None;
        }
        self.sketch_flight
            .run((), || async {
                if let Some(t) = self.sketch.lock().unwrap().clone() {
                    return Some(t);
                }
                let listed: Vec<Listed> = states
                    .iter()
                    .map(|st| match st.live() {
                        Some(l) => l.listed().map(Listed::Live),
                        None => st.index.lock().unwrap().upgrade().map(Listed::Indexed),
                    })
                    .collect::<Option<_>>()?;
                let image = self.image.clone();
                let t = tokio::task::spawn_blocking(move || {
                    let refs: Vec<(&str, &[IndexEntry])> = image
                        .layers
                        .iter()
                        .zip(&listed)
                        .map(|(d, l)| (d.digest.as_str(), l.entries()))
                        .collect();
                    // As the built tree shows each layer (`Layers::index`).
                    MergedTree::sketch(&refs, |li, e| !lazy::is_artifact(&image.layers[li], e))
                })
                .await
                .ok()?;
                // The build meets the same error and reports it; until then
                // the sketch is not tried again.
                let Ok(t) = t else {
                    self.sketch_failed.store(true, Ordering::Relaxed);
                    return None;
                };
                let t = Arc::new(t);
                let mut slot = self.sketch.lock().unwrap();
                // Checked under the slot's lock: a build that ends now
                // clears the slot after this.
                if self.built().is_some() {
                    return None;
                }
                tracing::info!(
                    image = %format!("{}/{}@{}", self.registry, self.repo, self.image.manifest.digest),
                    entries = t.len(),
                    "rootfs listed; contents are still being stored"
                );
                *slot = Some(t.clone());
                drop(slot);
                layers.changed.notify_waiters();
                Some(t)
            })
            .await
    }

    /// The merged tree, streaming and merging layers first if needed.
    pub async fn tree(&self, layers: &Layers) -> Res<Arc<MergedTree>> {
        self.last_used.store(now_secs(), Ordering::Relaxed);
        if let Some(t) = self.built() {
            return Ok(t);
        }
        let r = self
            .flight
            .run((), || async {
                if let Some(t) = self.built() {
                    return Ok(t);
                }
                let futs = self
                    .image
                    .layers
                    .iter()
                    .map(|d| layers.index(&self.registry, &self.repo, d));
                let indexes = futures_util::future::try_join_all(futs).await?;
                let name = format!(
                    "{}/{}@{}",
                    self.registry, self.repo, self.image.manifest.digest
                );
                let tree = tokio::task::spawn_blocking(move || {
                    let refs: Vec<&LayerIndex> = indexes.iter().map(|i| &**i).collect();
                    MergedTree::build(&refs)
                })
                .await
                .map_err(lost)?
                .map_err(|e| {
                    tracing::error!(image = %name, error = %e, "cannot merge layers");
                    FsError::BadImage {
                        image: name.clone(),
                        reason: e.0,
                    }
                })?;
                let tree = Arc::new(tree);
                // The tree answers from now on: its sketch and the live
                // views of its layers go (before the trim below, which
                // returns them too).
                *self.tree.lock().unwrap() = Some(tree.clone());
                self.ever_built.store(true, Ordering::Release);
                if let Some(s) = self.sketch.lock().unwrap().take()
                    && s.len() != tree.len()
                {
                    // Cannot happen: both merge the same entries.
                    tracing::error!(image = %name, sketched = s.len(), built = tree.len(), "the built tree differs from its sketch");
                }
                self.drop_live_views(layers);
                // Streaming and merging freed far more than the tree keeps;
                // hand it back to the system rather than hold it as RSS.
                #[cfg(target_env = "gnu")]
                // SAFETY: malloc_trim has no preconditions.
                unsafe {
                    libc::malloc_trim(0);
                }
                tracing::info!(image = %name, entries = tree.len(), "rootfs ready");
                Ok(tree)
            })
            .await;
        // Failed (a layer, or the merge): nothing of the image may be
        // answered early any more. Built or failed, early waiters look again.
        if r.is_err() {
            self.drop_live_views(layers);
            *self.sketch.lock().unwrap() = None;
        }
        layers.changed.notify_waiters();
        r
    }

    /// Forgets the live views of the image's layers ([`early`]).
    fn drop_live_views(&self, layers: &Layers) {
        for d in &self.image.layers {
            *layers.state(&LayerKey::of(d)).live.lock().unwrap() = None;
        }
    }
}
