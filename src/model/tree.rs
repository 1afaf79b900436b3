//! The operations on the tree: lookup, getattr, list, open.
//!
//! Caching by mutability:
//! - everything addressed by digest (manifests, configs, resolved images) is
//!   immutable: kept in memory and in the [`MetaStore`], trusted forever;
//! - tag lists, tag → image answers and catalogs change: trusted for
//!   `tag_ttl`, then asked again.
//!
//! Single-flight: concurrent lookups that need the same registry answer
//! share one request ([`Flights`]). No lock is held across an `.await`.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::hash::Hash;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::image::{Image, select_platform};
use super::node::{Inodes, MetaKind, Node, ROOT_INO};
use super::{Content, DirEntry, Entry, FsError, IMMUTABLE_TTL, Kind, OpenFile, Stat};
use crate::cfs::images::ImageStore;
use crate::inspect::{InspectInput, inspect_json};
use crate::layer::EntryKind;
use crate::registry::name::{
    canonical_repo, is_docker_hub, is_registry, is_repo_component, is_sha256_digest, is_tag,
};
use crate::registry::{MAX_METADATA_SIZE, RawManifest, RegistryClient, RegistryError};
use crate::rootfs::merge::MergedTree;
use crate::rootfs::{Layers, Rootfs};
use crate::singleflight::Flights;
use crate::store::MetaStore;

mod early;

type Res<T> = Result<T, FsError>;
type RepoKey = (Arc<str>, Arc<str>);
/// (registry, repository, tag or digest).
type RefKey = (Arc<str>, Arc<str>, Arc<str>);
type Catalog = Option<Arc<Vec<String>>>;
/// An opened, verified `image.cfs` and its size.
type CfsFile = (Arc<std::fs::File>, u64);

/// A cached answer and when it was fetched.
struct Timed<T> {
    at: Instant,
    value: T,
}

/// A map of answers that expire after a TTL.
struct TtlMap<K, V> {
    map: Mutex<HashMap<K, Timed<V>>>,
}

impl<K: Eq + Hash, V: Clone> TtlMap<K, V> {
    fn new() -> Self {
        TtlMap {
            map: Mutex::new(HashMap::new()),
        }
    }
    fn get(&self, k: &K, ttl: Duration) -> Option<V> {
        let m = self.map.lock().unwrap();
        m.get(k)
            .filter(|t| t.at.elapsed() < ttl)
            .map(|t| t.value.clone())
    }
    fn remove_if(&self, f: impl Fn(&K) -> bool) {
        self.map.lock().unwrap().retain(|k, _| !f(k));
    }
    fn put(&self, k: K, v: V) {
        self.map.lock().unwrap().insert(
            k,
            Timed {
                at: Instant::now(),
                value: v,
            },
        );
    }
}

/// The model's kind of a layer entry kind.
fn kind_of(k: EntryKind) -> Kind {
    match k {
        EntryKind::Dir => Kind::Dir,
        EntryKind::File | EntryKind::Hardlink => Kind::File,
        EntryKind::Symlink => Kind::Symlink,
        EntryKind::CharDev => Kind::CharDev,
        EntryKind::BlockDev => Kind::BlockDev,
        EntryKind::Fifo => Kind::Fifo,
    }
}

/// A tar mtime (seconds, nanoseconds) as a time.
fn mtime_of(secs: i64, nsec: u32) -> std::time::SystemTime {
    if secs >= 0 {
        std::time::UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        std::time::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Linux `dev_t` encoding of a device number.
fn rdev_of(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

/// First inode number of rootfs trees; image slot `k` owns
/// `ROOTFS_BASE + k << 32 ..`, and its node `i` is that plus `i`.
pub const ROOTFS_BASE: u64 = 1 << 40;

/// Settings of the tree.
#[derive(Debug, Clone)]
pub struct TreeOptions {
    /// How long mutable answers (tags, catalogs) are trusted.
    pub tag_ttl: Duration,
    /// Registries listed at the top from configuration.
    pub configured: Vec<String>,
}

/// Where an inode stands relative to the rootfs trees ([`Tree::rootfs_place`]).
/// A rootfs is immutable content: one manifest's, and its inode numbers
/// are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsPlace {
    /// Not in any rootfs.
    Outside,
    /// A `rootfs/` itself: its attributes are a placeholder until its tree
    /// is built.
    Root,
    /// Below a `rootfs/`: answered early while the layers stream, with the
    /// attributes the built tree will show.
    Below,
}

/// A `rootfs/`: the directory showing it (0: none) and its platform
/// manifest digest.
type RootfsKey = (u64, Arc<str>);

/// The registry tree.
pub struct Tree {
    client: RegistryClient,
    meta: MetaStore,
    inodes: Inodes,
    opts: TreeOptions,
    started: SystemTime,
    /// Registries looked up (or configured) since mount.
    registries: Mutex<BTreeSet<Arc<str>>>,
    /// Repositories found since mount, per registry.
    known_repos: Mutex<BTreeSet<RepoKey>>,
    /// registry → catalog (`None`: the registry does not serve one).
    catalogs: TtlMap<Arc<str>, Option<Arc<Vec<String>>>>,
    /// (registry, repo) → tags, or the NotFound/Denied answer.
    tags: TtlMap<RepoKey, Res<Arc<Vec<String>>>>,
    /// (registry, repo, tag) → image.
    tag_images: TtlMap<RefKey, Arc<Image>>,
    /// (registry, repo, top digest) → image. Immutable.
    images: Mutex<HashMap<RefKey, Arc<Image>>>,
    /// Generated files (inspect.json) by inode, for `tag_ttl`.
    generated: TtlMap<u64, Bytes>,
    tag_flights: Flights<RepoKey, Res<Arc<Vec<String>>>>,
    catalog_flights: Flights<Arc<str>, Res<Catalog>>,
    image_flights: Flights<RefKey, Res<Arc<Image>>>,
    blob_flights: Flights<RefKey, Res<Bytes>>,
    /// Layers and the content store.
    layers: Arc<Layers>,
    /// Rootfs by slot (inode range), and by (directory showing it, platform
    /// manifest digest); directory 0 is none (`image.cfs` builds from it).
    rootfs_slots: RwLock<Vec<Arc<Rootfs>>>,
    rootfs_by_manifest: Mutex<HashMap<RootfsKey, Arc<Rootfs>>>,
    /// Built `image.cfs` files on disk.
    cfs_store: Arc<ImageStore>,
    /// One build per image (by platform manifest digest).
    cfs_flights: Flights<Arc<str>, Res<CfsFile>>,
    /// The entry of `outbox/`, when the writable outbox serves it.
    outbox_root: std::sync::OnceLock<OutboxRoot>,
}

/// Gives the current entry of the outbox directory (its own inode range).
pub type OutboxRoot = Box<dyn Fn() -> Entry + Send + Sync>;

/// An open of content object `id`: immutable, so the kernel keeps its pages.
fn object_open(f: std::fs::File, id: crate::cas::ObjectId) -> OpenFile {
    OpenFile {
        content: Content::File(Arc::new(f)),
        keep_cache: true,
        direct_io: false,
        object: Some(id),
    }
}

fn arc(s: &str) -> Arc<str> {
    Arc::from(s)
}

impl Tree {
    /// A tree over `client`, keeping metadata in `meta` and composefs
    /// images in `images`.
    pub fn new(
        client: RegistryClient,
        meta: MetaStore,
        images: Arc<ImageStore>,
        layers: Arc<Layers>,
        opts: TreeOptions,
    ) -> Tree {
        let registries = opts.configured.iter().map(|s| arc(s)).collect();
        Tree {
            client,
            meta,
            inodes: Inodes::new(),
            opts,
            started: SystemTime::now(),
            registries: Mutex::new(registries),
            known_repos: Mutex::new(BTreeSet::new()),
            catalogs: TtlMap::new(),
            tags: TtlMap::new(),
            tag_images: TtlMap::new(),
            images: Mutex::new(HashMap::new()),
            generated: TtlMap::new(),
            tag_flights: Flights::default(),
            catalog_flights: Flights::default(),
            image_flights: Flights::default(),
            blob_flights: Flights::default(),
            layers,
            rootfs_slots: RwLock::new(Vec::new()),
            rootfs_by_manifest: Mutex::new(HashMap::new()),
            cfs_store: images,
            cfs_flights: Flights::default(),
            outbox_root: std::sync::OnceLock::new(),
        }
    }

    /// Lets the writable outbox serve `outbox/`: `root` gives its entry.
    pub fn set_outbox_root(&self, root: OutboxRoot) {
        let _ = self.outbox_root.set(root);
    }

    /// Forgets what is cached about the tags of `registry/repo` (an image
    /// was just pushed there), so listings show the new tag at once.
    pub fn forget_tags(&self, registry: &str, repo: &str) {
        let same = |r: &str| canonical_repo(registry, r) == canonical_repo(registry, repo);
        self.tags
            .remove_if(|(reg, r)| &**reg == registry && same(r));
        self.tag_images
            .remove_if(|(reg, r, _)| &**reg == registry && same(r));
        self.catalogs.remove_if(|reg| &**reg == registry);
        self.known_repos
            .lock()
            .unwrap()
            .insert((arc(registry), arc(repo)));
        self.registries.lock().unwrap().insert(arc(registry));
    }

    /// The layers and content store.
    pub fn layers(&self) -> &Arc<Layers> {
        &self.layers
    }

    // ----- rootfs -----------------------------------------------------

    /// Where `ino` stands: outside every rootfs, a `rootfs/` itself, or
    /// below one.
    pub fn rootfs_place(&self, ino: u64) -> RootfsPlace {
        match self.rootfs_of(ino) {
            None => RootfsPlace::Outside,
            Some((_, 0)) => RootfsPlace::Root,
            Some(_) => RootfsPlace::Below,
        }
    }

    fn rootfs_of(&self, ino: u64) -> Option<(Arc<Rootfs>, u32)> {
        if ino < ROOTFS_BASE {
            return None;
        }
        let slot = ((ino - ROOTFS_BASE) >> 32) as usize;
        let rf = self.rootfs_slots.read().unwrap().get(slot)?.clone();
        let i = (ino - rf.base) as u32;
        Some((rf, i))
    }

    /// Lets the merged trees not used for `idle` leave memory (each comes
    /// back from the persisted layer indexes when used again, with the same
    /// inode numbers: [`crate::rootfs::RootfsCore::unload_if_idle`]). Returns how many left.
    pub fn unload_idle_trees(&self, idle: Duration) -> usize {
        let slots = self.rootfs_slots.read().unwrap().clone();
        let mut unloaded = 0;
        for rf in slots {
            if let Some(entries) = rf.unload_if_idle(idle, &self.layers) {
                unloaded += 1;
                tracing::info!(
                    image = %format!("{}/{}@{}", rf.registry, rf.repo, rf.image.manifest.digest),
                    entries,
                    idle_secs = idle.as_secs(),
                    "rootfs tree left memory (unused)"
                );
            }
        }
        if unloaded > 0 {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        unloaded
    }

    /// The rootfs of `image` (one per platform manifest) that no directory
    /// shows: what `image.cfs` is built from.
    pub fn rootfs_for(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        image: &Arc<Image>,
    ) -> Arc<Rootfs> {
        self.rootfs_in(0, registry, repo, image)
    }

    /// The `rootfs/` of `image` in directory `dir` (a tag or `@sha256:`
    /// directory): an inode range of its own over the image's one tree
    /// ([`Rootfs`] says why).
    fn rootfs_in(
        &self,
        dir: u64,
        registry: &Arc<str>,
        repo: &Arc<str>,
        image: &Arc<Image>,
    ) -> Arc<Rootfs> {
        let digest: Arc<str> = arc(&image.manifest.digest);
        let mut by = self.rootfs_by_manifest.lock().unwrap();
        if let Some(r) = by.get(&(dir, digest.clone())) {
            return r.clone();
        }
        let shared = by.get(&(0, digest.clone())).cloned();
        let mut slots = self.rootfs_slots.write().unwrap();
        let mut add = |dir: u64, make: &dyn Fn(u64) -> Rootfs| {
            let rf = Arc::new(make(ROOTFS_BASE + ((slots.len() as u64) << 32)));
            slots.push(rf.clone());
            by.insert((dir, digest.clone()), rf.clone());
            rf
        };
        let shared = shared.unwrap_or_else(|| {
            add(0, &|base| {
                Rootfs::new(base, registry.clone(), repo.clone(), image.clone())
            })
        });
        if dir == 0 {
            return shared;
        }
        add(dir, &|base| shared.view(base))
    }

    fn rootfs_stat(rf: &Rootfs, tree: &MergedTree, i: u32) -> Option<Stat> {
        let n = tree.node(i)?;
        Some(Stat {
            ino: rf.base + i as u64,
            kind: kind_of(n.kind),
            size: n.size,
            perm: (n.mode & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: rdev_of(n.major, n.minor),
            mtime: mtime_of(n.mtime, n.mtime_nsec),
        })
    }

    fn rootfs_entry(rf: &Rootfs, tree: &MergedTree, i: u32) -> Res<Entry> {
        let stat = Self::rootfs_stat(rf, tree, i).ok_or(FsError::Stale(rf.base + i as u64))?;
        Ok(Entry {
            stat,
            entry_ttl: IMMUTABLE_TTL,
            attr_ttl: IMMUTABLE_TTL,
        })
    }

    /// The `rootfs` entry of a tag directory: real attributes once built,
    /// else a placeholder the kernel must not cache (listing a tag must not
    /// start streaming layers).
    fn rootfs_root_entry(&self, rf: &Rootfs, entry_ttl: Duration) -> Entry {
        match rf.shown() {
            Some(t) => {
                let mut e = Self::rootfs_entry(rf, &t, 0).expect("root exists");
                e.entry_ttl = entry_ttl;
                e
            }
            None => {
                let mut stat = self.dir_stat(rf.base);
                stat.perm = 0o755;
                Entry {
                    stat,
                    entry_ttl,
                    attr_ttl: Duration::ZERO,
                }
            }
        }
    }

    // ----- image.cfs --------------------------------------------------

    /// The `image.cfs` of an image: built on first open (which streams the
    /// layers if needed), then kept in the cache by manifest digest. A
    /// lookup, `stat` or listing never builds it (see `entry_of`).
    async fn cfs_image(&self, registry: &Arc<str>, repo: &Arc<str>, top: &str) -> Res<CfsFile> {
        let image = self.pinned_image(registry, repo, top).await?;
        let rf = self.rootfs_for(registry, repo, &image);
        let key: Arc<str> = arc(&image.manifest.digest);
        self.cfs_flights
            .run(key, || async {
                match crate::cfs::image(&rf, &self.layers, &self.cfs_store).await {
                    Ok((file, size)) => Ok((Arc::new(file), size)),
                    Err(e) => {
                        tracing::error!(image = %format!("{registry}/{repo}@{top}"), error = %e, "cannot make image.cfs");
                        Err(e.into())
                    }
                }
            })
            .await
    }

    /// `readlink`.
    pub async fn readlink(&self, ino: u64) -> Res<Bytes> {
        let (rf, i) = self.rootfs_of(ino).ok_or(FsError::NotFound)?;
        self.rootfs_readlink(&rf, i).await
    }

    /// Extended attributes of `ino` (name, value).
    pub async fn xattrs(&self, ino: u64) -> Res<Vec<(Vec<u8>, Vec<u8>)>> {
        match self.rootfs_of(ino) {
            None => Ok(Vec::new()),
            Some((rf, i)) => self.rootfs_xattrs(&rf, i).await,
        }
    }

    async fn open_rootfs(&self, rf: &Arc<Rootfs>, i: u32) -> Res<OpenFile> {
        let store = self.layers.store().clone();
        // Early: the stream stored it moments ago (verified as written);
        // anything else goes through the tree below.
        if let Some(id) = self.early_object(rf, i).await?
            && let Ok(Some(f)) = store.get_verified(&id)
        {
            return Ok(object_open(f, id));
        }
        let (mut tree, i) = self.rootfs_node(rf, i).await?;
        let n = tree.node(i).ok_or(FsError::Stale(rf.base + i as u64))?;
        if n.kind == EntryKind::Dir {
            return Err(FsError::IsDir);
        }
        if tree.is_sketch() {
            // Contents are still being stored: the file's entry in its live
            // layer has its object, or it is extracted now.
            let id = self.sketch_object(rf, &tree, i).await?;
            if let Some(id) = id
                && let Ok(Some(f)) = store.get_verified(&id)
            {
                return Ok(object_open(f, id));
            }
            // Not verified in this process, or gone (evicted). A layer
            // indexed before is checked or fetched again below, as in the
            // built tree; one still being stored has no index to fetch by
            // yet: its file waits for the built tree (whose node numbers are
            // the sketch's).
            let indexed = rf.image.layers.get(n.layer as usize).is_some_and(|d| {
                self.layers.state(&crate::rootfs::LayerKey::of(d)).phase()
                    == crate::rootfs::LayerPhase::Indexed
            });
            if id.is_none() || !indexed {
                tree = rf.tree(&self.layers).await?;
            }
        }
        let n = tree.node(i).ok_or(FsError::Stale(rf.base + i as u64))?;
        let id = n.object;
        if !tree.is_sketch() {
            rf.ahead.opened(&tree, &store, i);
        }
        for attempt in 0..2 {
            // Verified before in this process: answer on this thread. Only
            // hashing (first open after a start, or a changed file) moves to
            // a blocking thread.
            let file = match store.get_verified(&id) {
                Ok(f) => f,
                Err(unverified) => {
                    let s = store.clone();
                    tokio::task::spawn_blocking(move || s.check(&id, unverified))
                        .await
                        .map_err(|e| FsError::Io {
                            reason: e.to_string(),
                            no_space: false,
                        })?
                }
            };
            if let Some(f) = file {
                return Ok(object_open(f, id));
            }
            if attempt == 0 {
                let desc = rf
                    .image
                    .layers
                    .get(n.layer as usize)
                    .ok_or(FsError::Stale(rf.base + i as u64))?;
                self.layers
                    .refetch(&rf.registry, &rf.repo, desc, id)
                    .await?;
            }
        }
        Err(FsError::Io {
            reason: format!(
                "object {} missing after reading its layer again",
                crate::cas::object_hex(&id)
            ),
            no_space: false,
        })
    }

    /// The registry client (for the CLI commands that share the model).
    pub fn client(&self) -> &RegistryClient {
        &self.client
    }

    fn node(&self, ino: u64) -> Res<Arc<Node>> {
        self.inodes.node(ino).ok_or(FsError::Stale(ino))
    }

    // ----- attributes -------------------------------------------------

    fn dir_stat(&self, ino: u64) -> Stat {
        Stat::made_dir(ino, self.started)
    }

    fn file_stat(&self, ino: u64, size: u64) -> Stat {
        Stat {
            ino,
            kind: Kind::File,
            size,
            perm: 0o444,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            mtime: self.started,
        }
    }

    /// The entry for `node`, with TTLs by mutability. `pinned` marks
    /// children of `@sha256:` directories, whose names never change.
    async fn entry_of(&self, node: Node, pinned: bool) -> Res<Entry> {
        if matches!(node, Node::Outbox)
            && let Some(root) = self.outbox_root.get()
        {
            return Ok(root());
        }
        let mutable = self.opts.tag_ttl;
        let (kind_dir, size, entry_ttl, attr_ttl) = match &node {
            Node::Root
            | Node::Outbox
            | Node::Registry { .. }
            | Node::Repo { .. }
            | Node::Tag { .. } => (true, 0, mutable, mutable),
            Node::Pinned { .. } => (true, 0, IMMUTABLE_TTL, IMMUTABLE_TTL),
            Node::Meta { size, .. } => (
                false,
                *size,
                if pinned { IMMUTABLE_TTL } else { mutable },
                IMMUTABLE_TTL,
            ),
            Node::Inspect { .. } | Node::Status { .. } => (false, 0, mutable, Duration::ZERO),
            // The real size once built; before, 0 with attributes the
            // kernel must not cache, so that once an open has built it the
            // next `stat` (or a read past the size the kernel holds) asks
            // again. Looking at a tag (`ls -l`, `find -ls`, `du`) must not
            // stream its layers.
            Node::Cfs {
                registry,
                repo,
                top,
            } => {
                let image = self.pinned_image(registry, repo, top).await?;
                let built = self.cfs_store.size(&image.manifest.digest);
                (
                    false,
                    built.unwrap_or(0),
                    if pinned { IMMUTABLE_TTL } else { mutable },
                    if built.is_some() {
                        IMMUTABLE_TTL
                    } else {
                        Duration::ZERO
                    },
                )
            }
        };
        let ino = self.inodes.ino(node.clone());
        let stat = if kind_dir {
            let mut s = self.dir_stat(ino);
            if matches!(node, Node::Outbox) {
                s.perm = 0o755;
            }
            s
        } else {
            let size = match &node {
                Node::Inspect { .. } | Node::Status { .. } => {
                    self.generate(ino, &node).await?.len() as u64
                }
                _ => size,
            };
            self.file_stat(ino, size)
        };
        Ok(Entry {
            stat,
            entry_ttl,
            attr_ttl,
        })
    }

    /// `getattr`.
    pub async fn getattr(&self, ino: u64) -> Res<Entry> {
        if let Some((rf, i)) = self.rootfs_of(ino) {
            return self.rootfs_getattr(&rf, i).await;
        }
        let node = self.node(ino)?;
        self.entry_of((*node).clone(), true).await
    }

    // ----- lookup -----------------------------------------------------

    /// `lookup(parent, name)`.
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Res<Entry> {
        if let Some((rf, i)) = self.rootfs_of(parent) {
            return self.rootfs_lookup(&rf, i, name.as_bytes()).await;
        }
        let parent_node = self.node(parent)?;
        let name = name.to_str().ok_or(FsError::NotFound)?;
        if name == "rootfs" {
            let (registry, repo, image, ttl) = match &*parent_node {
                Node::Tag {
                    registry,
                    repo,
                    tag,
                } => (
                    registry,
                    repo,
                    self.tag_image(registry, repo, tag).await?,
                    self.opts.tag_ttl,
                ),
                Node::Pinned {
                    registry,
                    repo,
                    digest,
                } => (
                    registry,
                    repo,
                    self.pinned_image(registry, repo, digest).await?,
                    IMMUTABLE_TTL,
                ),
                _ => return Err(FsError::NotFound),
            };
            let rf = self.rootfs_in(parent, registry, repo, &image);
            return Ok(self.rootfs_root_entry(&rf, ttl));
        }
        let (child, pinned) = match &*parent_node {
            Node::Root => (self.lookup_root(name).await?, false),
            Node::Outbox => return Err(FsError::NotFound),
            Node::Registry { registry } => {
                (self.lookup_repo_child(registry, None, name).await?, false)
            }
            Node::Repo { registry, path } => (
                self.lookup_repo_child(registry, Some(path), name).await?,
                false,
            ),
            Node::Tag {
                registry,
                repo,
                tag,
            } => {
                let image = self.tag_image(registry, repo, tag).await?;
                (
                    self.image_child(registry, repo, Some(tag), &image, name)?,
                    false,
                )
            }
            Node::Pinned {
                registry,
                repo,
                digest,
            } => {
                let image = self.pinned_image(registry, repo, digest).await?;
                (self.image_child(registry, repo, None, &image, name)?, true)
            }
            Node::Meta { .. } | Node::Inspect { .. } | Node::Status { .. } | Node::Cfs { .. } => {
                return Err(FsError::NotDir);
            }
        };
        self.entry_of(child, pinned).await
    }

    async fn lookup_root(&self, name: &str) -> Res<Node> {
        if name == "outbox" {
            // Only a mount with an outbox (not `ro`) has one.
            return match self.outbox_root.get() {
                Some(_) => Ok(Node::Outbox),
                None => Err(FsError::NotFound),
            };
        }
        if !is_registry(name) {
            return Err(FsError::NotFound);
        }
        let known = self.registries.lock().unwrap().contains(name);
        if !known {
            match self.client.ping(name).await {
                Ok(()) => {}
                Err(e @ RegistryError::Unavailable { .. }) => {
                    let e = e.into();
                    log_error(&e);
                    return Err(e);
                }
                Err(e) => {
                    tracing::info!(registry = name, error = %e, "not a registry");
                    return Err(FsError::NotFound);
                }
            }
            self.registries.lock().unwrap().insert(arc(name));
        }
        Ok(Node::Registry {
            registry: arc(name),
        })
    }

    /// Names under a registry or repository directory: tags of the
    /// repository, `@sha256:` pins, and deeper repository path components.
    async fn lookup_repo_child(
        &self,
        registry: &Arc<str>,
        parent: Option<&Arc<str>>,
        name: &str,
    ) -> Res<Node> {
        let path: Arc<str> = match parent {
            Some(p) => format!("{p}/{name}").into(),
            None => arc(name),
        };
        // Whether the parent is a repository (it has tags): then a child
        // that is neither one of them nor a repository is an unknown tag.
        let mut parent_is_repo = false;
        if let Some(p) = parent {
            if let Some(digest) = name.strip_prefix('@') {
                if !is_sha256_digest(digest) {
                    return Err(FsError::NotFound);
                }
                self.pinned_image(registry, p, digest).await?;
                return Ok(Node::Pinned {
                    registry: registry.clone(),
                    repo: p.clone(),
                    digest: arc(digest),
                });
            }
            if self.is_known_prefix(registry, &path) {
                return Ok(Node::Repo {
                    registry: registry.clone(),
                    path,
                });
            }
            if is_tag(name) {
                let tag_node = || Node::Tag {
                    registry: registry.clone(),
                    repo: p.clone(),
                    tag: arc(name),
                };
                match self.tags(registry, p).await {
                    Ok(tags) if tags.iter().any(|t| t == name) => return Ok(tag_node()),
                    Ok(_) => {
                        parent_is_repo = true;
                        // Perhaps pushed since the list was read.
                        match self.tag_image(registry, p, &arc(name)).await {
                            Ok(_) => return Ok(tag_node()),
                            Err(e) if is_absent(&e) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Err(e) if is_absent(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if !is_repo_component(name) {
            return Err(FsError::NotFound);
        }
        if self.is_known_prefix(registry, &path) {
            return Ok(Node::Repo {
                registry: registry.clone(),
                path,
            });
        }
        match self.tags(registry, &path).await {
            Ok(_) => {
                self.known_repos
                    .lock()
                    .unwrap()
                    .insert((registry.clone(), path.clone()));
                Ok(Node::Repo {
                    registry: registry.clone(),
                    path,
                })
            }
            Err(e) if is_absent(&e) => {
                // A namespace has no tags; only a catalog can tell it from
                // a name that does not exist.
                match self.catalog(registry, true).await? {
                    Some(_) if self.is_known_prefix(registry, &path) => Ok(Node::Repo {
                        registry: registry.clone(),
                        path,
                    }),
                    Some(_) => Err(e),
                    // Without a catalog, a name without tags is taken for
                    // a namespace, except where it cannot be one:
                    // - below a repository, it is an unknown tag (`ls
                    //   app/no-such-tag`, `test -d app/$TAG` say so); a
                    //   deeper repository there answers its own tags above;
                    // - on Docker Hub, whose names are `<namespace>/<name>`
                    //   and never deeper;
                    // - a tag's file below a repository that could not be
                    //   read (absent, or refused to a client without
                    //   credentials): `cat …/v1/manifest.json` says "No
                    //   such file", not "Is a directory".
                    None if parent_is_repo => Err(FsError::NotFound),
                    None if is_docker_hub(registry) && path.contains('/') => Err(FsError::NotFound),
                    None if parent.is_some() && TAG_FILES.contains(&name) => Err(FsError::NotFound),
                    None => Ok(Node::Repo {
                        registry: registry.clone(),
                        path,
                    }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Children of a tag or pinned directory.
    fn image_child(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        tag: Option<&Arc<str>>,
        image: &Image,
        name: &str,
    ) -> Res<Node> {
        let meta = |digest: &str, kind, size| Node::Meta {
            registry: registry.clone(),
            repo: repo.clone(),
            digest: arc(digest),
            kind,
            size,
        };
        Ok(match name {
            "manifest.json" => meta(
                &image.manifest.digest,
                MetaKind::Manifest,
                image.manifest.bytes.len() as u64,
            ),
            "index.json" => match &image.index {
                Some(i) => meta(&i.digest, MetaKind::Index, i.bytes.len() as u64),
                None => return Err(FsError::NotFound),
            },
            "config.json" => meta(&image.config.digest, MetaKind::Config, image.config.size),
            "digest" => meta(
                &image.manifest.digest,
                MetaKind::Digest,
                image.manifest.digest.len() as u64 + 1,
            ),
            "inspect.json" => Node::Inspect {
                registry: registry.clone(),
                repo: repo.clone(),
                tag: tag.cloned(),
                top: image.top_digest.clone(),
            },
            "status" => Node::Status {
                registry: registry.clone(),
                repo: repo.clone(),
                top: image.top_digest.clone(),
            },
            "image.cfs" => Node::Cfs {
                registry: registry.clone(),
                repo: repo.clone(),
                top: image.top_digest.clone(),
            },
            _ => return Err(FsError::NotFound),
        })
    }

    fn image_children(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        tag: Option<&Arc<str>>,
        image: &Image,
    ) -> Vec<(&'static str, Node)> {
        let mut names = vec!["manifest.json"];
        if image.index.is_some() {
            names.push("index.json");
        }
        names.extend([
            "config.json",
            "digest",
            "inspect.json",
            "status",
            "image.cfs",
        ]);
        names
            .into_iter()
            .filter_map(|n| {
                self.image_child(registry, repo, tag, image, n)
                    .ok()
                    .map(|node| (n, node))
            })
            .collect()
    }

    // ----- listing ----------------------------------------------------

    /// The whole listing of directory `ino` (without `.` and `..`).
    pub async fn list(&self, ino: u64) -> Res<Vec<DirEntry>> {
        if let Some((rf, d)) = self.rootfs_of(ino) {
            let (tree, i) = self.rootfs_node(&rf, d).await?;
            return tree
                .children(i)
                .map(|(name, c)| {
                    Ok(DirEntry {
                        name: OsString::from_vec(name.to_vec()),
                        entry: Self::rootfs_child_entry(&rf, &tree, d, name, c)?,
                    })
                })
                .collect();
        }
        let node = self.node(ino)?;
        let mut children: Vec<(String, Node)> = Vec::new();
        let mut pinned = false;
        let mut rootfs = None;
        match &*node {
            Node::Root => {
                let regs: Vec<Arc<str>> = self.registries.lock().unwrap().iter().cloned().collect();
                for r in regs {
                    children.push((r.to_string(), Node::Registry { registry: r }));
                }
                if self.outbox_root.get().is_some() {
                    children.push(("outbox".into(), Node::Outbox));
                }
            }
            Node::Outbox => {}
            Node::Registry { registry } => {
                for c in self.child_components(registry, None).await? {
                    children.push((
                        c.clone(),
                        Node::Repo {
                            registry: registry.clone(),
                            path: arc(&c),
                        },
                    ));
                }
            }
            Node::Repo { registry, path } => {
                let tags = match self.tags(registry, path).await {
                    Ok(t) => Some(t),
                    Err(e) if is_absent(&e) => None,
                    Err(e) => return Err(e),
                };
                let subs = self.child_components(registry, Some(path)).await?;
                if tags.is_none()
                    && subs.is_empty()
                    && self.catalog(registry, false).await?.is_some()
                {
                    return Err(FsError::NotFound);
                }
                for t in tags.iter().flat_map(|t| t.iter()) {
                    children.push((
                        t.clone(),
                        Node::Tag {
                            registry: registry.clone(),
                            repo: path.clone(),
                            tag: arc(t),
                        },
                    ));
                }
                for s in subs {
                    if !children.iter().any(|(n, _)| *n == s) {
                        let sub = format!("{path}/{s}");
                        children.push((
                            s,
                            Node::Repo {
                                registry: registry.clone(),
                                path: sub.into(),
                            },
                        ));
                    }
                }
            }
            Node::Tag {
                registry,
                repo,
                tag,
            } => {
                let image = self.tag_image(registry, repo, tag).await?;
                for (n, c) in self.image_children(registry, repo, Some(tag), &image) {
                    children.push((n.into(), c));
                }
                rootfs = Some((
                    self.rootfs_in(ino, registry, repo, &image),
                    self.opts.tag_ttl,
                ));
            }
            Node::Pinned {
                registry,
                repo,
                digest,
            } => {
                pinned = true;
                let image = self.pinned_image(registry, repo, digest).await?;
                for (n, c) in self.image_children(registry, repo, None, &image) {
                    children.push((n.into(), c));
                }
                rootfs = Some((self.rootfs_in(ino, registry, repo, &image), IMMUTABLE_TTL));
            }
            Node::Meta { .. } | Node::Inspect { .. } | Node::Status { .. } | Node::Cfs { .. } => {
                return Err(FsError::NotDir);
            }
        }
        let mut out = Vec::with_capacity(children.len());
        for (name, node) in children {
            let entry = self.entry_of(node, pinned).await?;
            out.push(DirEntry {
                name: OsString::from(name),
                entry,
            });
        }
        if let Some((rf, ttl)) = rootfs {
            out.push(DirEntry {
                name: "rootfs".into(),
                entry: self.rootfs_root_entry(&rf, ttl),
            });
        }
        Ok(out)
    }

    /// Next path components below `parent` (or the registry top) among the
    /// catalog and the repositories found since mount.
    async fn child_components(
        &self,
        registry: &Arc<str>,
        parent: Option<&Arc<str>>,
    ) -> Res<Vec<String>> {
        let catalog = self.catalog(registry, false).await?;
        let known: Vec<String> = self
            .known_repos
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| r == registry)
            .map(|(_, p)| p.to_string())
            .collect();
        let prefix = parent.map(|p| format!("{p}/")).unwrap_or_default();
        let mut set = BTreeSet::new();
        for repo in catalog.iter().flat_map(|c| c.iter()).chain(known.iter()) {
            if let Some(rest) = repo.strip_prefix(&prefix)
                && let Some(first) = rest.split('/').next()
                && !first.is_empty()
            {
                set.insert(first.to_string());
            }
        }
        Ok(set.into_iter().collect())
    }

    fn is_known_prefix(&self, registry: &Arc<str>, path: &str) -> bool {
        let matches = |repo: &str| {
            repo == path
                || (repo.starts_with(path) && repo.as_bytes().get(path.len()) == Some(&b'/'))
        };
        if self
            .known_repos
            .lock()
            .unwrap()
            .iter()
            .any(|(r, p)| r == registry && matches(p))
        {
            return true;
        }
        self.catalogs
            .get(registry, Duration::MAX)
            .flatten()
            .is_some_and(|c| c.iter().any(|r| matches(r)))
    }

    // ----- open / read ------------------------------------------------

    /// `open`: the whole content of a metadata or generated file.
    pub async fn open(&self, ino: u64) -> Res<OpenFile> {
        if let Some((rf, i)) = self.rootfs_of(ino) {
            return self.open_rootfs(&rf, i).await;
        }
        let node = self.node(ino)?;
        match &*node {
            Node::Meta {
                registry,
                repo,
                digest,
                kind,
                size,
            } => {
                let data = match kind {
                    MetaKind::Manifest | MetaKind::Index => {
                        self.manifest_bytes(registry, repo, digest).await?
                    }
                    MetaKind::Config => self.blob_bytes(registry, repo, digest).await?,
                    MetaKind::Digest => Bytes::from(format!("{digest}\n")),
                };
                // `stat` showed the descriptor's size, and the kernel reads
                // no further: a config of another length would be cut.
                if data.len() as u64 != *size {
                    let e = FsError::BadImage {
                        image: format!("{registry}/{repo}"),
                        reason: format!(
                            "{digest} has {} bytes, its descriptor says {size}",
                            data.len()
                        ),
                    };
                    log_error(&e);
                    return Err(e);
                }
                Ok(OpenFile {
                    content: Content::Bytes(data),
                    keep_cache: true,
                    direct_io: false,
                    object: None,
                })
            }
            Node::Cfs {
                registry,
                repo,
                top,
            } => {
                let (file, _) = self.cfs_image(registry, repo, top).await?;
                Ok(OpenFile {
                    content: Content::File(file),
                    keep_cache: true,
                    direct_io: false,
                    object: None,
                })
            }
            Node::Inspect { .. } | Node::Status { .. } => {
                let data = self.generate(ino, &node).await?;
                Ok(OpenFile {
                    content: Content::Bytes(data),
                    keep_cache: false,
                    direct_io: true,
                    object: None,
                })
            }
            _ => Err(FsError::IsDir),
        }
    }

    /// Content of generated files, cached for `tag_ttl`.
    async fn generate(&self, ino: u64, node: &Node) -> Res<Bytes> {
        let cacheable = matches!(node, Node::Inspect { .. });
        if cacheable && let Some(b) = self.generated.get(&ino, self.opts.tag_ttl) {
            return Ok(b);
        }
        let data = match node {
            Node::Inspect {
                registry,
                repo,
                tag,
                top,
            } => {
                let image = self.pinned_image(registry, repo, top).await?;
                let config = self
                    .blob_bytes(registry, repo, &image.config.digest)
                    .await?;
                let tags = self.tags(registry, repo).await?;
                let canonical = canonical_repo(registry, repo);
                let name = format!("{registry}/{canonical}");
                inspect_json(&InspectInput {
                    name: &name,
                    tag: tag.as_deref(),
                    digest: &image.top_digest,
                    repo_tags: &tags,
                    manifest: &image.manifest.bytes,
                    config: &config,
                })
                .map_err(|reason| FsError::BadImage {
                    image: name.clone(),
                    reason,
                })?
            }
            Node::Status {
                registry,
                repo,
                top,
            } => {
                let image = self.pinned_image(registry, repo, top).await?;
                let rf = self.rootfs_for(registry, repo, &image);
                status_json(&image, &self.layers, rf.state())
            }
            _ => return Err(FsError::IsDir),
        };
        let data = Bytes::from(data);
        if cacheable {
            self.generated.put(ino, data.clone());
        }
        Ok(data)
    }

    // ----- registry answers, cached -------------------------------------

    async fn tags(&self, registry: &Arc<str>, repo: &Arc<str>) -> Res<Arc<Vec<String>>> {
        let key = (registry.clone(), repo.clone());
        if let Some(t) = self.tags.get(&key, self.opts.tag_ttl) {
            return t;
        }
        self.tag_flights
            .run(key.clone(), || async {
                let canonical = canonical_repo(registry, repo);
                let r = self
                    .client
                    .list_tags(registry, &canonical)
                    .await
                    .map(Arc::new)
                    .map_err(FsError::from);
                match &r {
                    Ok(_) => self.tags.put(key, r.clone()),
                    Err(e) if is_absent(e) => {
                        if let FsError::Registry(RegistryError::Denied { .. }) = e {
                            // Absent, but the user may have meant a private
                            // repository: say why it shows as nothing.
                            tracing::info!(
                                "{e}: shown as absent (to a client without credentials, a \
                                 token registry refuses a repository that does not exist the \
                                 way it refuses a private one)"
                            );
                        }
                        self.tags.put(key, r.clone())
                    }
                    Err(e) => log_error(e),
                }
                r
            })
            .await
    }

    /// The catalog; `None` when the registry does not serve one. `fresh`
    /// re-reads a catalog older than a second.
    async fn catalog(&self, registry: &Arc<str>, fresh: bool) -> Res<Option<Arc<Vec<String>>>> {
        let ttl = if fresh {
            Duration::from_secs(1)
        } else {
            self.opts.tag_ttl
        };
        if let Some(c) = self.catalogs.get(registry, ttl) {
            return Ok(c);
        }
        self.catalog_flights
            .run(registry.clone(), || async {
                match self.client.catalog(registry).await {
                    Ok(c) => {
                        let c = Some(Arc::new(c));
                        self.catalogs.put(registry.clone(), c.clone());
                        Ok(c)
                    }
                    Err(e @ RegistryError::Unavailable { .. }) => {
                        log_error(&FsError::Registry(e.clone()));
                        Err(e.into())
                    }
                    Err(e) => {
                        tracing::debug!(%registry, error = %e, "no catalog");
                        self.catalogs.put(registry.clone(), None);
                        Ok(None)
                    }
                }
            })
            .await
    }

    /// The image a tag points at now (re-asked after `tag_ttl`).
    async fn tag_image(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        tag: &Arc<str>,
    ) -> Res<Arc<Image>> {
        let key = (registry.clone(), repo.clone(), tag.clone());
        if let Some(i) = self.tag_images.get(&key, self.opts.tag_ttl) {
            return Ok(i);
        }
        let before = self.tag_images.get(&key, Duration::MAX);
        let image = self
            .image_flights
            .run(key.clone(), || self.retag(registry, repo, tag, before))
            .await?;
        self.tag_images.put(key, image.clone());
        Ok(image)
    }

    /// Where `tag` points now. A tag resolved before is asked by a `HEAD`
    /// (not counted as a pull by registries that limit pulls), and its
    /// manifest read again only if it moved; a first resolution (or a
    /// registry that does not say the digest) reads the manifest by tag.
    async fn retag(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        tag: &Arc<str>,
        before: Option<Arc<Image>>,
    ) -> Res<Arc<Image>> {
        let logged = |e: FsError| {
            log_error(&e);
            e
        };
        if let Some(old) = before {
            let canonical = canonical_repo(registry, repo);
            match self
                .client
                .manifest_digest(registry, &canonical, tag)
                .await
                .map_err(|e| logged(e.into()))?
            {
                Some(d) if *d == *old.top_digest => return Ok(old),
                // (Its failures are logged where it resolves.)
                Some(d) => return self.pinned_image(registry, repo, &d).await,
                None => {}
            }
        }
        self.resolve_uncached(registry, repo, tag)
            .await
            .map_err(logged)
    }

    /// The image with top-level digest `digest` (immutable).
    async fn pinned_image(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        digest: &str,
    ) -> Res<Arc<Image>> {
        let key = (registry.clone(), repo.clone(), arc(digest));
        if let Some(i) = self.images.lock().unwrap().get(&key) {
            return Ok(i.clone());
        }
        self.resolve(registry, repo, &key.2).await
    }

    /// Fetches and resolves a tag or digest to an image (single-flight).
    async fn resolve(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        reference: &Arc<str>,
    ) -> Res<Arc<Image>> {
        let key = (registry.clone(), repo.clone(), reference.clone());
        self.image_flights
            .run(key, || async {
                let r = self.resolve_uncached(registry, repo, reference).await;
                if let Err(e) = &r {
                    log_error(e);
                }
                r
            })
            .await
    }

    async fn resolve_uncached(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        reference: &str,
    ) -> Res<Arc<Image>> {
        let top = self.manifest(registry, repo, reference).await?;
        let name = format!("{registry}/{repo}@{}", top.digest);
        let bad = |reason: String| FsError::BadImage {
            image: name.clone(),
            reason,
        };
        let image = if top.is_index {
            let digest = select_platform(&top).map_err(bad)?;
            let m = self.manifest(registry, repo, &digest).await?;
            if m.is_index {
                return Err(bad("index points at another index for this platform".into()));
            }
            Image::new(Some(top), m).map_err(bad)?
        } else {
            Image::new(None, top).map_err(bad)?
        };
        let image = Arc::new(image);
        self.images.lock().unwrap().insert(
            (registry.clone(), repo.clone(), image.top_digest.clone()),
            image.clone(),
        );
        Ok(image)
    }

    /// A manifest by tag or digest; by digest it comes from disk when kept.
    async fn manifest(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        reference: &str,
    ) -> Res<RawManifest> {
        if is_sha256_digest(reference)
            && let Some(bytes) = self.meta.get(reference)
            && let Ok((media_type, is_index)) = crate::registry::classify_manifest(&bytes)
        {
            return Ok(RawManifest {
                bytes,
                digest: reference.to_string(),
                media_type,
                is_index,
            });
        }
        let canonical = canonical_repo(registry, repo);
        let m = self
            .client
            .manifest(registry, &canonical, reference)
            .await?;
        self.meta.put(&m.digest, &m.bytes);
        Ok(m)
    }

    async fn manifest_bytes(
        &self,
        registry: &Arc<str>,
        repo: &Arc<str>,
        digest: &str,
    ) -> Res<Bytes> {
        Ok(self.manifest(registry, repo, digest).await?.bytes)
    }

    /// A small blob (config) by digest: disk, else registry (single-flight).
    async fn blob_bytes(&self, registry: &Arc<str>, repo: &Arc<str>, digest: &str) -> Res<Bytes> {
        if let Some(b) = self.meta.get(digest) {
            return Ok(b);
        }
        let key = (registry.clone(), repo.clone(), arc(digest));
        self.blob_flights
            .run(key, || async {
                let canonical = canonical_repo(registry, repo);
                let r = self
                    .client
                    .blob(registry, &canonical, digest, MAX_METADATA_SIZE)
                    .await;
                match r {
                    Ok(b) => {
                        self.meta.put(digest, &b);
                        Ok(b)
                    }
                    Err(e) => {
                        let e = FsError::from(e);
                        log_error(&e);
                        Err(e)
                    }
                }
            })
            .await
    }

    /// Whether `file`, an open of rootfs inode `ino` reading content
    /// object `object`, may serve that inode again (an open kept after its
    /// release): its image's merged tree is built (every layer checked
    /// against its digest; before that, and after a layer failed, opens
    /// take the usual path) and the file is still the verified object (one
    /// `fstat`, [`crate::cas::ObjectStore::still_verified`]).
    pub fn still_verified(
        &self,
        ino: u64,
        object: &crate::cas::ObjectId,
        file: &std::fs::File,
    ) -> bool {
        self.rootfs_of(ino)
            .is_some_and(|(rf, _)| rf.built().is_some())
            && self.layers.store().still_verified(object, file)
    }

    /// Calls `f` with objects whose files the content store unlinked or
    /// found gone ([`crate::cas::ObjectStore::on_unlinked`]).
    pub fn on_objects_unlinked(&self, f: impl Fn(&[crate::cas::ObjectId]) + Send + Sync + 'static) {
        self.layers.store().on_unlinked(f);
    }

    /// Whether `ino` is the root (for the FUSE layer's statfs and checks).
    pub fn is_root(ino: u64) -> bool {
        ino == ROOT_INO
    }
}

/// A tag directory's files whose names a namespace is unlikely to take
/// (a dot in them); `digest`, `status` and `rootfs` could be namespaces.
const TAG_FILES: &[&str] = &[
    "manifest.json",
    "index.json",
    "config.json",
    "inspect.json",
    "image.cfs",
];

/// "Does not exist" answers, as opposed to failures: NotFound, and an
/// anonymous 401 from a token-auth registry (Docker Hub's answer for
/// repositories that do not exist). A Basic-auth registry's 401 is a
/// refusal, shown as EACCES.
fn is_absent(e: &FsError) -> bool {
    matches!(
        e,
        FsError::NotFound
            | FsError::Registry(RegistryError::NotFound { .. })
            | FsError::Registry(RegistryError::Denied {
                anonymous: true,
                token_auth: true,
                ..
            })
    )
}

/// One log line per failure users see (absences are not failures).
fn log_error(e: &FsError) {
    match e {
        FsError::Registry(RegistryError::NotFound { .. }) | FsError::NotFound => {}
        FsError::Registry(RegistryError::Denied { .. }) => tracing::warn!("{e}"),
        FsError::Registry(RegistryError::DigestMismatch { .. }) => {
            tracing::error!("{e}; nothing was kept")
        }
        _ => tracing::warn!("{e}"),
    }
}

/// The `status` file: per layer, what it is and how much of it is here.
fn status_json(image: &Image, all: &Layers, rootfs: &str) -> Vec<u8> {
    use std::sync::atomic::Ordering::Relaxed;
    let layers: Vec<serde_json::Value> = image
        .layers
        .iter()
        .map(|l| {
            let key = crate::rootfs::LayerKey::of(l);
            let st = all.state(&key);
            // How it is read (DESIGN.md's words): files fetched on demand
            // from a TOC, or the layer streamed whole. Before the first
            // read, a pinned TOC says which it will be.
            let lazy = st.mode().is_lazy()
                || (st.phase() == crate::rootfs::LayerPhase::NotFetched && key.pin.is_some());
            let mut v = serde_json::json!({
                "digest": l.digest,
                "media_type": l.media_type,
                "size": l.size,
                "format": layer_format(&l.media_type),
                "read": if lazy { "lazy" } else { "streamed" },
                "mode": st.mode().as_str(),
                "state": st.phase().as_str(),
                "bytes_fetched": st.progress.bytes_fetched.load(Relaxed),
                "objects_cached": st.progress.objects.load(Relaxed),
                "bytes_refetched": st.progress.bytes_refetched.load(Relaxed),
            });
            if let Some(e) = st.error() {
                v["error"] = serde_json::Value::String(e);
            }
            v
        })
        .collect();
    let v = serde_json::json!({
        "manifest": image.manifest.digest,
        "top": &*image.top_digest,
        "rootfs": rootfs,
        "layers": layers,
    });
    let mut out = serde_json::to_vec_pretty(&v).expect("Value serialises");
    out.push(b'\n');
    out
}

/// Short name of a layer media type's format.
pub fn layer_format(media_type: &str) -> &'static str {
    if media_type.ends_with("tar+gzip")
        || media_type.ends_with(".tar.gzip")
        || media_type.ends_with("diff.tar.gzip")
    {
        "tar+gzip"
    } else if media_type.ends_with("tar+zstd") || media_type.ends_with(".tar.zstd") {
        "tar+zstd"
    } else if media_type.ends_with(".tar") || media_type.ends_with("layer.v1.tar") {
        "tar"
    } else {
        "unknown"
    }
}
