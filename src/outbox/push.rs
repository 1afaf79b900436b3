//! Pushing staged trees: when (the settle rule), how (one layer, a config,
//! a manifest, like a good client), and what happens on failure (retries
//! with backoff, state kept on disk).
//!
//! Settle rule: a tag directory is pushed once no file under it is open for
//! writing and nothing under it has changed for the settle time
//! (`outbox_settle`, default 2 s). A change during a push does not disturb
//! it: if the change came while the layer was being written, that layer is
//! thrown away and the tree waits to settle again; if it came later, the
//! pushed image is a consistent snapshot and another push follows. Parts of
//! the outbox that are not yet known to be tags ("undecided", see the
//! module `outbox`) settle together; when they have, the tree is scanned
//! for new tag directories, which are then pushed at once.
//!
//! Locking: `Shared::undecided` is taken first whenever an operation picks
//! the unit it belongs to, and held while a scan's new tags are registered,
//! so that an operation either lands in a registered tag or makes that
//! registration wait for the next settle. Per-tag state is behind small
//! `std::sync::Mutex`es never held across an `.await`. Each tag has at most
//! one push task at a time (`TagUnit::running`).
//!
//! Durability: each tag's state is a file (`status` module); the change
//! from "pushed" to "pending" is written (and synced) on the first change
//! after a push, so a restart always knows what is unpushed. Layer files
//! live in `<cache_dir>/outbox/tmp/` only while a push needs them and are
//! cleared at start-up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::layer::{self, LAYER_MEDIA_TYPE, LayerError, LayerFile, LayerProgress};
use super::status::{self, Phase, Progress, Pushed, TagState, rfc3339};
use crate::registry::{RegistryClient, RegistryError};

/// Media type of the manifests apt-layer pushes.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of the configs apt-layer pushes.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Longest wait between two attempts of a failing push.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the settle loop looks at the tags.
const TICK: Duration = Duration::from_millis(100);

/// Why a push failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PushError {
    /// The layer could not be written from the tree.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The registry refused or could not be reached.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The tree changed while its layer was written; not a failure, the
    /// push starts again once the tree has settled.
    #[error(
        "the staged tree changed while its layer was written ({0}); pushing again once it settles"
    )]
    Superseded(String),
}

impl PushError {
    /// Whether retrying the same tree cannot succeed: the registry refused
    /// the request itself (an invalid name or manifest) or the registry is
    /// blocked by configuration. Outages, auth and local errors are retried.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            PushError::Registry(RegistryError::Rejected { .. } | RegistryError::Blocked { .. })
        )
    }
}

/// Finds new tag directories under a staging root, given the known ones.
pub type ScanFn = Box<dyn Fn(&Path, &BTreeSet<String>) -> ScanResult + Send + Sync>;
/// Told `(registry, repository)` after each successful push.
pub type PushedHook = Box<dyn Fn(&str, &str) + Send + Sync>;

/// What changes under a unit.
#[derive(Debug, Clone, Copy)]
pub enum Touch {
    /// Something changed.
    Change,
    /// A file was opened for writing (counts as a change too).
    OpenWriter,
}

/// Writers and changes of a part of the outbox.
#[derive(Debug)]
struct Activity {
    /// Bumped by every change.
    generation: u64,
    /// Handles open for writing.
    writers: u32,
    /// When the last change happened.
    last_change: Instant,
    /// The generation last pushed (tags) or scanned (undecided).
    done_gen: Option<u64>,
}

impl Activity {
    fn new(settled: bool) -> Activity {
        Activity {
            generation: 1,
            writers: 0,
            last_change: Instant::now(),
            done_gen: settled.then_some(1),
        }
    }
    fn touch(&mut self, t: Touch) {
        self.generation += 1;
        self.last_change = Instant::now();
        if let Touch::OpenWriter = t {
            self.writers += 1;
        }
    }
    fn settled(&self, settle: Duration) -> bool {
        self.done_gen != Some(self.generation)
            && self.writers == 0
            && self.last_change.elapsed() >= settle
    }
}

/// One tag directory and its push.
pub struct TagUnit {
    /// The tag directory relative to the outbox root.
    pub path: String,
    /// Registry host.
    pub registry: String,
    /// Repository path.
    pub repo: String,
    /// Tag.
    pub tag: String,
    state_dir: PathBuf,
    act: Mutex<Activity>,
    state: Mutex<TagState>,
    running: AtomicBool,
    removed: AtomicBool,
    retry_at: Mutex<Option<Instant>>,
    /// The layer of generation `.0`, kept for retries.
    built: Mutex<Option<(u64, Arc<LayerFile>)>>,
    layer_progress: Arc<LayerProgress>,
    sent: Arc<AtomicU64>,
    /// Serialises state-file writes, each taking its snapshot under it, so
    /// that an older snapshot never lands after a newer one.
    save_lock: Mutex<()>,
}

impl TagUnit {
    fn new(state_dir: &Path, state: TagState, settled: bool) -> TagUnit {
        TagUnit {
            path: state.path.clone(),
            registry: state.registry.clone(),
            repo: state.repository.clone(),
            tag: state.tag.clone(),
            state_dir: state_dir.to_path_buf(),
            act: Mutex::new(Activity::new(settled)),
            state: Mutex::new(state),
            running: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            retry_at: Mutex::new(None),
            built: Mutex::new(None),
            layer_progress: Arc::new(LayerProgress::default()),
            sent: Arc::new(AtomicU64::new(0)),
            save_lock: Mutex::new(()),
        }
    }

    fn touch(&self, t: Touch) {
        let mut a = self.act.lock().unwrap();
        let was_clean = a.done_gen == Some(a.generation);
        a.touch(t);
        drop(a);
        if was_clean {
            // First change after a push: remember on disk that it is unpushed.
            self.update(true, |s| {
                if s.phase == Phase::Pushed {
                    s.phase = Phase::Pending;
                }
            });
        }
    }

    fn writer_closed(&self, wrote: bool) {
        let mut a = self.act.lock().unwrap();
        a.writers = a.writers.saturating_sub(1);
        if wrote {
            a.generation += 1;
        }
        a.last_change = Instant::now();
    }

    /// Changes the state and writes it (`sync` for phase changes).
    fn update(&self, sync: bool, f: impl FnOnce(&mut TagState)) {
        {
            let mut s = self.state.lock().unwrap();
            f(&mut s);
            s.updated = rfc3339(SystemTime::now());
        }
        self.persist(sync);
    }

    /// Writes the current state, with live progress, to its file.
    fn persist(&self, sync: bool) {
        let _order = self.save_lock.lock().unwrap();
        if self.removed.load(Relaxed) {
            return;
        }
        let snapshot = self.live_state();
        if let Err(e) = status::save(&self.state_dir, &snapshot, sync) {
            tracing::warn!(tag = %snapshot.reference, error = %e, "cannot save outbox state");
        }
    }

    /// The state with live progress (the status file's content).
    pub fn live_state(&self) -> TagState {
        let mut s = self.state.lock().unwrap().clone();
        match s.phase {
            Phase::Building => {
                s.progress = Some(Progress {
                    step: "layer".into(),
                    done: self.layer_progress.read.load(Relaxed),
                    total: self.layer_progress.total.load(Relaxed),
                });
            }
            Phase::Pushing => {
                if let Some(p) = s.progress.as_mut()
                    && p.step == "upload"
                {
                    p.done = self.sent.load(Relaxed);
                }
            }
            _ => {}
        }
        s
    }

    fn generation(&self) -> u64 {
        self.act.lock().unwrap().generation
    }

    fn due(&self, settle: Duration) -> bool {
        !self.running.load(Relaxed)
            && !self.removed.load(Relaxed)
            && self.act.lock().unwrap().settled(settle)
            && self
                .retry_at
                .lock()
                .unwrap()
                .is_none_or(|t| Instant::now() >= t)
    }
}

/// The part of the outbox an open file or operation belongs to.
#[derive(Clone)]
pub enum Unit {
    /// Not under a known tag directory (yet).
    Undecided(Arc<Shared>),
    /// Under this tag directory.
    Tag(Arc<TagUnit>),
}

impl Unit {
    /// Records a change.
    pub fn changed(&self) {
        match self {
            Unit::Undecided(s) => s.undecided.lock().unwrap().touch(Touch::Change),
            Unit::Tag(t) => t.touch(Touch::Change),
        }
    }

    /// A handle open for writing was closed; `wrote` if it wrote anything.
    pub fn writer_closed(&self, wrote: bool) {
        match self {
            Unit::Undecided(s) => {
                let mut a = s.undecided.lock().unwrap();
                a.writers = a.writers.saturating_sub(1);
                if wrote {
                    a.generation += 1;
                }
                a.last_change = Instant::now();
            }
            Unit::Tag(t) => t.writer_closed(wrote),
        }
    }

    /// Records a failure to write into the staged tree (shown in status).
    pub fn staging_error(&self, what: String) {
        match self {
            Unit::Undecided(s) => {
                tracing::warn!("outbox staging failed: {what}");
                *s.undecided_error.lock().unwrap() = Some(what);
                s.save_general();
            }
            Unit::Tag(t) => {
                tracing::warn!(tag = %t.path, "outbox staging failed: {what}");
                t.update(true, |s| s.staging_error = Some(what));
            }
        }
    }
}

/// A tag directory found by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundTag {
    /// Path relative to the outbox root.
    pub path: String,
    /// Registry host.
    pub registry: String,
    /// Repository path.
    pub repo: String,
    /// Tag.
    pub tag: String,
}

/// What scanning the undecided parts of the outbox found.
#[derive(Debug, Default)]
pub struct ScanResult {
    /// New tag directories.
    pub tags: Vec<FoundTag>,
    /// Staged paths that cannot be pushed, and why.
    pub unpushable: Vec<(String, String)>,
}

/// State shared by the pusher, its tasks and the file handles.
pub struct Shared {
    client: RegistryClient,
    tree_root: PathBuf,
    state_dir: PathBuf,
    tmp_dir: PathBuf,
    settle: Duration,
    tags: RwLock<BTreeMap<String, Arc<TagUnit>>>,
    undecided: Mutex<Activity>,
    undecided_error: Mutex<Option<String>>,
    unpushable: Mutex<Vec<(String, String)>>,
    scanning: AtomicBool,
    scan: ScanFn,
    on_pushed: OnceLock<PushedHook>,
    /// registry → blob digest → repositories we pushed it to (sources for
    /// cross-repository mounts).
    homes: Mutex<BTreeMap<String, BTreeMap<String, Vec<String>>>>,
}

/// Pushes settled tag directories; see the module documentation.
#[derive(Clone)]
pub struct Pusher {
    s: Arc<Shared>,
}

impl Pusher {
    /// A pusher for the staged trees under `tree_root`, keeping state in
    /// `state_dir` and layers in `tmp_dir`. `scan` finds new tag
    /// directories (the path rules live with the file system model). Tags
    /// with a saved state are loaded; those not pushed yet will be.
    pub fn open(
        client: RegistryClient,
        tree_root: &Path,
        state_dir: &Path,
        tmp_dir: &Path,
        settle: Duration,
        scan: ScanFn,
    ) -> std::io::Result<Pusher> {
        std::fs::create_dir_all(state_dir)?;
        std::fs::create_dir_all(tmp_dir)?;
        for e in std::fs::read_dir(tmp_dir)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let mut tags = BTreeMap::new();
        let (states, bad) = status::load_all(state_dir);
        for (p, e) in bad {
            tracing::warn!(file = %p.display(), error = %e, "unreadable outbox state ignored");
        }
        for mut st in states {
            if !tree_root.join(&st.path).is_dir() {
                tracing::warn!(tag = %st.reference, path = %st.path, "staged tree is gone; forgetting its state");
                status::remove(state_dir, &st.path);
                continue;
            }
            let settled = st.phase == Phase::Pushed;
            if !settled {
                st.phase = Phase::Pending;
                st.progress = None;
                st.next_retry = None;
            }
            let t = TagUnit::new(state_dir, st, settled);
            tags.insert(t.path.clone(), Arc::new(t));
        }
        let homes = std::fs::read(state_dir.join("blob-homes.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let s = Arc::new(Shared {
            client,
            tree_root: tree_root.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            tmp_dir: tmp_dir.to_path_buf(),
            settle,
            tags: RwLock::new(tags),
            // Scan once after start: trees staged just before a crash.
            undecided: Mutex::new(Activity::new(false)),
            undecided_error: Mutex::new(None),
            unpushable: Mutex::new(Vec::new()),
            scanning: AtomicBool::new(false),
            scan,
            on_pushed: OnceLock::new(),
            homes: Mutex::new(homes),
        });
        Ok(Pusher { s })
    }

    /// Calls `f(registry, repository)` after each successful push (the
    /// registry view forgets its cached tag list).
    pub fn on_pushed(&self, f: PushedHook) {
        let _ = self.s.on_pushed.set(f);
    }

    /// Starts the settle loop on `rt`.
    pub fn start(&self, rt: &tokio::runtime::Handle) {
        let s = self.s.clone();
        rt.spawn(async move {
            loop {
                s.tick();
                tokio::time::sleep(TICK).await;
            }
        });
    }

    /// The unit of directory `rel` (a path relative to the outbox root),
    /// recording `touch` there in the same step (see the locking contract).
    pub fn touch(&self, rel: &str, touch: Option<Touch>) -> Unit {
        let mut u = self.s.undecided.lock().unwrap();
        if let Some(t) = self.tag_of(rel) {
            drop(u);
            if let Some(x) = touch {
                t.touch(x);
            }
            return Unit::Tag(t);
        }
        if let Some(x) = touch {
            u.touch(x);
        }
        Unit::Undecided(self.s.clone())
    }

    /// The tag directory `rel` is in or is, if any.
    pub fn tag_of(&self, rel: &str) -> Option<Arc<TagUnit>> {
        let tags = self.s.tags.read().unwrap();
        let mut end = 0;
        // Try each prefix that ends at a component boundary.
        loop {
            let next = rel[end..].find('/').map(|i| end + i).unwrap_or(rel.len());
            if let Some(t) = tags.get(&rel[..next]) {
                return Some(t.clone());
            }
            if next >= rel.len() {
                return None;
            }
            end = next + 1;
        }
    }

    /// Whether some tag directory lies strictly below `rel`.
    pub fn has_tag_below(&self, rel: &str) -> bool {
        let prefix = format!("{rel}/");
        self.s
            .tags
            .read()
            .unwrap()
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix))
    }

    /// The tag directories that are direct children of `rel`.
    pub fn tags_in(&self, rel: &str) -> Vec<Arc<TagUnit>> {
        let prefix = if rel.is_empty() {
            String::new()
        } else {
            format!("{rel}/")
        };
        self.s
            .tags
            .read()
            .unwrap()
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/'))
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// The tag directory `rel` was removed: its push is cancelled and its
    /// state forgotten.
    pub fn removed(&self, rel: &str) {
        let t = self.s.tags.write().unwrap().remove(rel);
        if let Some(t) = t {
            t.removed.store(true, Relaxed);
            status::remove(&self.s.state_dir, rel);
            tracing::info!(tag = %rel, "tag directory removed from the outbox; its push is cancelled");
        }
    }

    /// Every tag's live state, and the problems of undecided parts.
    pub fn states(&self) -> Vec<TagState> {
        self.s
            .tags
            .read()
            .unwrap()
            .values()
            .map(|t| t.live_state())
            .collect()
    }
}

impl Shared {
    /// One look at everything: start due scans and pushes.
    fn tick(self: &Arc<Self>) {
        let scan_due = {
            let u = self.undecided.lock().unwrap();
            u.settled(self.settle).then_some(u.generation)
        };
        if let Some(generation) = scan_due
            && !self.scanning.swap(true, Relaxed)
        {
            let s = self.clone();
            tokio::spawn(async move {
                let known: BTreeSet<String> = s.tags.read().unwrap().keys().cloned().collect();
                let s2 = s.clone();
                let res =
                    tokio::task::spawn_blocking(move || (s2.scan)(&s2.tree_root, &known)).await;
                match res {
                    Ok(found) => s.register(generation, found),
                    Err(e) => tracing::error!(error = %e, "outbox scan failed"),
                }
                s.scanning.store(false, Relaxed);
            });
        }
        let due: Vec<Arc<TagUnit>> = self
            .tags
            .read()
            .unwrap()
            .values()
            .filter(|t| t.due(self.settle))
            .cloned()
            .collect();
        for t in due {
            t.running.store(true, Relaxed);
            let s = self.clone();
            tokio::spawn(async move {
                s.push_tag(&t).await;
                t.running.store(false, Relaxed);
            });
        }
    }

    /// Registers the tags a scan of generation `generation` found, unless the
    /// undecided parts changed since (then the next settle scans again).
    fn register(&self, generation: u64, found: ScanResult) {
        let mut u = self.undecided.lock().unwrap();
        if u.generation != generation || u.writers > 0 {
            return;
        }
        u.done_gen = Some(generation);
        let mut tags = self.tags.write().unwrap();
        for f in found.tags {
            if tags.contains_key(&f.path) {
                continue;
            }
            let st = TagState::new(&f.path, &f.registry, &f.repo, &f.tag);
            if let Err(e) = status::save(&self.state_dir, &st, true) {
                tracing::warn!(error = %e, "cannot save outbox state");
            }
            tracing::info!(tag = %st.reference, path = %f.path, "new tag directory in the outbox");
            let t = TagUnit::new(&self.state_dir, st, false);
            // It has settled already (the scan waited for that).
            t.act.lock().unwrap().last_change = Instant::now() - self.settle;
            tags.insert(f.path.clone(), Arc::new(t));
        }
        drop(tags);
        drop(u);
        for (p, why) in &found.unpushable {
            tracing::warn!(path = %p, "staged in the outbox but cannot be pushed: {why}");
        }
        *self.unpushable.lock().unwrap() = found.unpushable;
        self.save_general();
    }

    /// Writes `outbox.json`: what no tag's status can show.
    fn save_general(&self) {
        let v = serde_json::json!({
            "undecided_error": *self.undecided_error.lock().unwrap(),
            "unpushable": self.unpushable.lock().unwrap().iter()
                .map(|(p, w)| serde_json::json!({"path": p, "reason": w}))
                .collect::<Vec<_>>(),
        });
        let _ = status::write_atomic(
            &self.state_dir.join("outbox.json"),
            &serde_json::to_vec_pretty(&v).expect("json"),
            false,
        );
    }

    /// One attempt at pushing `t`.
    async fn push_tag(self: &Arc<Self>, t: &Arc<TagUnit>) {
        let gen0 = t.generation();
        *t.retry_at.lock().unwrap() = None;
        let saver = self.clone().progress_saver(t.clone());
        let res = self.attempt(t, gen0).await;
        saver.abort();
        if t.removed.load(Relaxed) {
            return;
        }
        match res {
            Ok(p) => {
                {
                    let mut a = t.act.lock().unwrap();
                    a.done_gen = Some(gen0);
                }
                let still_clean = t.generation() == gen0;
                tracing::info!(tag = %t.path, manifest = %p.manifest, layer = %p.layer, "pushed");
                t.update(true, |s| {
                    s.phase = if still_clean {
                        Phase::Pushed
                    } else {
                        Phase::Pending
                    };
                    s.progress = None;
                    s.error = None;
                    s.staging_error = None;
                    s.attempts = 0;
                    s.next_retry = None;
                    s.pushes += 1;
                    s.pushed = Some(p.clone());
                });
                *t.built.lock().unwrap() = None;
                self.add_home(&t.registry, &p.layer, &t.repo);
                if let Some(f) = self.on_pushed.get() {
                    f(&t.registry, &t.repo);
                }
            }
            Err(PushError::Superseded(why)) => {
                tracing::info!(tag = %t.path, "push restarts later: {why}");
                t.update(true, |s| {
                    s.phase = Phase::Pending;
                    s.progress = None;
                    s.note = Some(format!(
                        "the staged tree changed during a push ({why}); it is pushed again once it settles"
                    ));
                });
            }
            Err(e) if e.is_permanent() => {
                // Retrying cannot help (the registry refused the name or the
                // manifest): wait for the tree to change instead of knocking
                // every 30 s. Nothing staged is dropped.
                t.act.lock().unwrap().done_gen = Some(gen0);
                let attempts = t.state.lock().unwrap().attempts + 1;
                tracing::warn!(tag = %t.path, "push refused: {e}; not retried until the tree changes");
                t.update(true, |s| {
                    s.phase = Phase::Failed;
                    s.progress = None;
                    s.attempts = attempts;
                    s.error = Some(e.to_string());
                    s.next_retry = None;
                    s.note = Some(
                        "the registry refused this push; it is tried again when the tree changes (or the tag directory is renamed)".into(),
                    );
                });
            }
            Err(e) => {
                let attempts = t.state.lock().unwrap().attempts + 1;
                let delay = backoff(attempts);
                *t.retry_at.lock().unwrap() = Some(Instant::now() + delay);
                tracing::warn!(tag = %t.path, attempt = attempts, retry_in = ?delay, "push failed: {e}");
                t.update(true, |s| {
                    s.phase = Phase::Failed;
                    s.progress = None;
                    s.attempts = attempts;
                    s.error = Some(e.to_string());
                    s.next_retry = Some(rfc3339(SystemTime::now() + delay));
                });
            }
        }
    }

    async fn attempt(&self, t: &Arc<TagUnit>, gen0: u64) -> Result<Pushed, PushError> {
        let reuse = t
            .built
            .lock()
            .unwrap()
            .as_ref()
            .filter(|(g, _)| *g == gen0)
            .map(|(_, l)| l.clone());
        let layer = match reuse {
            Some(l) => l,
            None => {
                *t.built.lock().unwrap() = None;
                t.layer_progress.read.store(0, Relaxed);
                t.layer_progress.total.store(0, Relaxed);
                // A note about the attempt before (superseded, refused)
                // stays while this one builds: it says why it runs.
                t.update(true, |s| s.phase = Phase::Building);
                let src = self.tree_root.join(&t.path);
                let tmp = self.tmp_dir.clone();
                let prog = t.layer_progress.clone();
                let built = tokio::task::spawn_blocking(move || layer::build(&src, &tmp, &prog))
                    .await
                    .map_err(|e| LayerError::Io {
                        op: "build layer",
                        path: t.path.clone(),
                        reason: e.to_string(),
                        no_space: false,
                    })?;
                if t.generation() != gen0 || t.act.lock().unwrap().writers > 0 {
                    let why = match &built {
                        Err(e) => e.to_string(),
                        Ok(_) => "a change while its layer was written".into(),
                    };
                    return Err(PushError::Superseded(why));
                }
                let l = Arc::new(built?);
                *t.built.lock().unwrap() = Some((gen0, l.clone()));
                l
            }
        };
        let skipped = (!layer.skipped.is_empty()).then(|| {
            format!(
                "not in the layer (tar cannot hold sockets): {}",
                layer.skipped.join(", ")
            )
        });
        t.update(true, |s| {
            s.phase = Phase::Pushing;
            s.note = skipped;
        });
        let homes = self.homes_of(&t.registry, &layer.digest);
        let step = |name: &str, total: u64| {
            t.update(false, |s| {
                s.progress = Some(Progress {
                    step: name.into(),
                    done: 0,
                    total,
                })
            })
        };
        Ok(push_image(
            &self.client,
            &t.registry,
            &t.repo,
            &t.tag,
            &layer,
            &homes,
            &t.sent,
            &step,
        )
        .await?)
    }

    /// Writes the live progress of `t` to its state file twice a second.
    fn progress_saver(self: Arc<Self>, t: Arc<TagUnit>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                t.persist(false);
            }
        })
    }

    fn homes_of(&self, registry: &str, digest: &str) -> Vec<String> {
        self.homes
            .lock()
            .unwrap()
            .get(registry)
            .and_then(|m| m.get(digest))
            .cloned()
            .unwrap_or_default()
    }

    fn add_home(&self, registry: &str, digest: &str, repo: &str) {
        let data = {
            let mut h = self.homes.lock().unwrap();
            let repos = h
                .entry(registry.to_string())
                .or_default()
                .entry(digest.to_string())
                .or_default();
            if repos.iter().any(|r| r == repo) {
                return;
            }
            repos.insert(0, repo.to_string());
            repos.truncate(8);
            serde_json::to_vec(&*h).expect("json")
        };
        let _ = status::write_atomic(&self.state_dir.join("blob-homes.json"), &data, false);
    }
}

/// Delay before attempt `n + 1` after `n` failures: 1 s, 2 s, 4 s … 30 s.
pub fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(5);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// The OCI image config of a one-layer image built on this host.
pub fn image_config(diff_id: &str, created: &str) -> Vec<u8> {
    let v = serde_json::json!({
        "created": created,
        "architecture": crate::model::image::host_arch(),
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "apt-layer outbox"}],
    });
    serde_json::to_vec(&v).expect("json")
}

/// The OCI image manifest for `config` and one layer.
pub fn image_manifest(config: &[u8], layer: &LayerFile) -> Vec<u8> {
    let v = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": crate::registry::sha256_digest(config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": layer.digest,
            "size": layer.size,
        }],
    });
    serde_json::to_vec(&v).expect("json")
}

/// Pushes `layer` as the one-layer image `registry/repo:tag`, like a good
/// client: the layer only if the registry lacks it (`HEAD`), by a
/// cross-repository mount from one of `homes` where possible, else streamed
/// from its file (`sent` counts the bytes); then the config, then the
/// manifest, which is read back. `step(name, total)` announces each step.
#[allow(clippy::too_many_arguments)]
pub async fn push_image(
    client: &RegistryClient,
    registry: &str,
    repo: &str,
    tag: &str,
    layer: &LayerFile,
    homes: &[String],
    sent: &Arc<AtomicU64>,
    step: &(dyn Fn(&str, u64) + Sync),
) -> Result<Pushed, RegistryError> {
    let created = rfc3339(SystemTime::now());
    let config = image_config(&layer.diff_id, &created);
    let config_digest = crate::registry::sha256_digest(&config);
    let manifest = image_manifest(&config, layer);

    step("upload", layer.size);
    sent.store(0, Relaxed);
    let mut source = "uploaded".to_string();
    if client.blob_exists(registry, repo, &layer.digest).await? {
        source = "present".into();
    } else {
        let mut mounted = false;
        for from in homes.iter().filter(|h| *h != repo) {
            if client
                .mount_blob(registry, repo, from, &layer.digest)
                .await?
            {
                source = format!("mounted from {from}");
                mounted = true;
                break;
            }
        }
        if !mounted {
            client
                .push_blob_file(
                    registry,
                    repo,
                    &layer.digest,
                    &layer.path,
                    layer.size,
                    sent.clone(),
                )
                .await?;
        }
    }
    sent.store(layer.size, Relaxed);

    step("config", config.len() as u64);
    if !client.blob_exists(registry, repo, &config_digest).await? {
        client
            .push_blob_bytes(registry, repo, &config_digest, Bytes::from(config))
            .await?;
    }
    step("manifest", manifest.len() as u64);
    let digest = client
        .push_manifest(
            registry,
            repo,
            tag,
            Bytes::from(manifest),
            MANIFEST_MEDIA_TYPE,
        )
        .await?;
    Ok(Pushed {
        manifest: digest,
        layer: layer.digest.clone(),
        layer_size: layer.size,
        diff_id: layer.diff_id.clone(),
        at: rfc3339(SystemTime::now()),
        layer_source: source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    #[test]
    fn settle_needs_quiet_and_no_writer() {
        let mut a = Activity::new(true);
        assert!(!a.settled(Duration::ZERO), "nothing to do when pushed");
        a.touch(Touch::OpenWriter);
        assert!(!a.settled(Duration::ZERO), "a writer holds it");
        a.writers = 0;
        assert!(a.settled(Duration::ZERO));
        assert!(!a.settled(Duration::from_secs(60)), "too recent");
    }
}
