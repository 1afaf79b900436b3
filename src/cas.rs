//! The content store: file contents as objects named by their sha256, in the
//! composefs repository layout, bounded by size.
//!
//! ```text
//! <cache-dir>/objects/<2 hex>/<62 hex>   one file per distinct content
//! <cache-dir>/tmp/                       objects being written
//! ```
//!
//! Contracts:
//! - **Crash safety**: an object is written under `tmp/`, unnamed, while it
//!   is hashed, then linked to its name ([`crate::publish`]: no
//!   filesystem-wide rename lock); a name never holds partial content, and
//!   a crash leaves nothing in `tmp/` that another process could mistake.
//! - **Verification**: an object read back is verified against its name
//!   the first time it is opened and again whenever its inode, size, mtime
//!   or ctime change (so a damaged or replaced file is caught: any write,
//!   truncate, `chmod`, `touch` or replacement moves its ctime, which no
//!   caller can set back); a bad object is deleted and reported missing,
//!   never served. What was verified is kept across restarts
//!   ([`crate::stamps`]; [`ObjectStore::save_verified`], by a daemon within
//!   a few seconds of verifying objects and at its clean exit, and by
//!   `cache verify`), so a restarted daemon does not
//!   hash every object again on first open (for the Debian image, ~1 s of a
//!   first `tar` after a restart).
//! - **Bound**: the total size of objects, plus the spills of layers being
//!   read ([`ObjectStore::reserve_spill`]), stays under the limit by evicting
//!   the least recently used objects. A full disk evicts too: a write that
//!   meets `ENOSPC` makes room ([`ObjectStore::make_room`]) and retries,
//!   else fails. Eviction only unlinks, so readers holding an object open
//!   keep reading it, and its disk comes back when they close it: with
//!   nothing left to evict, `make_room` waits up to a second after the
//!   last eviction for that. The most recently used object always stays,
//!   even if it alone exceeds the bound (while spills hold part of it).
//! - **Nothing is evicted for what can never fit**: no object is larger
//!   than the limit ([`ObjectStore::max_object`]); a writer whose object
//!   would grow past it fails at once (`FileTooLarge`), before writing or
//!   evicting anything, and `make_room` refuses a want larger than the
//!   limit. A spill reserves at most half the limit: a larger one is
//!   refused (its layer is read in one pass, without a spill), so a size a
//!   manifest claims can never empty the cache before a byte arrived.
//! - **Sharing**: a daemon's store ([`ObjectStore::open_shared`]) follows
//!   the objects other processes store in and evict from the same cache
//!   ([`crate::objwatch`]): it uses theirs (verified on first open, as any
//!   object found on disk) and counts them against its bound, so daemons
//!   sharing a cache stay under it together. The spills of other
//!   processes are not counted.
//! - **Pins**: objects pinned in this process ([`ObjectStore::pin`]) and
//!   objects of live persistent pins ([`crate::pins`]: kernel composefs
//!   mounts, in any process) are never evicted. Eviction holds the pins lock
//!   from reading the pins until its last unlink. Pinned objects may take
//!   the store over its bound.
//! - **Locking**: one `std::sync::Mutex` over the LRU, never held across
//!   I/O of object contents or an `.await`; another makes `make_room`
//!   calls take turns (held across the unlinks of one eviction).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::objindex::{Info, ObjIndex};
use crate::publish::TempFile;
use crate::stamps::{self, Stamp};

/// sha256 of an object's content.
pub type ObjectId = [u8; 32];

/// Hex name of an object id.
pub fn object_hex(id: &ObjectId) -> String {
    hex::encode(id)
}

struct State {
    lru: ObjIndex,
    total: u64,
    pinned: HashMap<ObjectId, u32>,
    /// An object was verified since the stamps were last saved
    /// ([`ObjectStore::save_verified_if_new`]).
    unsaved: bool,
}

/// Counters for `cache stats` and `status`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    /// Objects present.
    pub objects: u64,
    /// Bytes of objects present.
    pub bytes: u64,
    /// The size bound.
    pub limit: u64,
    /// Objects evicted since start.
    pub evicted: u64,
}

/// The object store.
pub struct ObjectStore {
    root: PathBuf,
    limit: u64,
    state: Mutex<State>,
    evicted: AtomicU64,
    /// Held by [`ObjectStore::make_room`].
    making_room: Mutex<()>,
    pins: crate::pins::Pins,
    /// Bytes of the bound held by spills ([`ObjectStore::reserve_spill`]).
    reserved: AtomicU64,
    /// Told of objects whose files went ([`ObjectStore::on_unlinked`]).
    unlinked: std::sync::OnceLock<Unlinked>,
    /// When this store last unlinked an object or found one gone
    /// ([`ObjectStore::make_room`] waits a moment for its disk).
    last_unlinked: Mutex<Option<Instant>>,
}

/// How long after an object was unlinked a full disk with nothing left to
/// evict waits for that object's space ([`ObjectStore::make_room`]).
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// What to tell when objects' files are unlinked or found gone.
type Unlinked = Box<dyn Fn(&[ObjectId]) + Send + Sync>;

/// Room in the bound for one layer's spill, given back when dropped.
pub struct SpillRoom {
    store: std::sync::Arc<ObjectStore>,
    bytes: u64,
}

impl Drop for SpillRoom {
    fn drop(&mut self) {
        self.store.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl ObjectStore {
    /// Opens the store under `cache_dir`, indexing the objects already
    /// there (oldest mtime = least recently used) and removing leftovers of
    /// interrupted writes. For a process that does not live long (the cache
    /// commands): what other processes store meanwhile stays unknown to it.
    pub fn open(cache_dir: &Path, limit: u64) -> io::Result<ObjectStore> {
        let objects = cache_dir.join("objects");
        std::fs::create_dir_all(&objects)?;
        let tmp = cache_dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        crate::publish::sweep(&tmp);
        let mut found: Vec<(i64, ObjectId, u64)> = Vec::new();
        for (id, m) in scan(&objects)? {
            found.push((m.mtime(), id, m.len()));
        }
        found.sort();
        let mut state = State {
            lru: ObjIndex::new(),
            total: 0,
            pinned: HashMap::new(),
            unsaved: false,
        };
        for (_, id, size) in found {
            state.total += size;
            state.lru.put(id, Info { size, verified: 0 });
        }
        let known = stamps::apply(&stamps::read(cache_dir), &mut state.lru);
        if known > 0 {
            tracing::debug!(objects = known, "verified stamps read from the cache");
        }
        let store = ObjectStore {
            root: cache_dir.to_path_buf(),
            limit,
            state: Mutex::new(state),
            evicted: AtomicU64::new(0),
            making_room: Mutex::new(()),
            pins: crate::pins::Pins::open(cache_dir)?,
            reserved: AtomicU64::new(0),
            unlinked: std::sync::OnceLock::new(),
            last_unlinked: Mutex::new(None),
        };
        store.evict_to(limit);
        Ok(store)
    }

    /// [`ObjectStore::open`] for a daemon: it also follows what other
    /// processes store in and evict from the same cache
    /// ([`crate::objwatch`]), so it uses their objects and, with them,
    /// keeps the whole cache under `limit`. If the cache cannot be watched
    /// (no inotify), it says so and bounds only its own objects.
    pub fn open_shared(cache_dir: &Path, limit: u64) -> io::Result<Arc<ObjectStore>> {
        let objects = cache_dir.join("objects");
        std::fs::create_dir_all(&objects)?;
        // Watching starts before the scan, so no object falls in between.
        let watcher = crate::objwatch::Watcher::new(&objects)
            .inspect_err(|e| {
                tracing::warn!(
                    error = %e,
                    "cannot watch the cache for other processes' objects: this daemon \
                     bounds only its own"
                )
            })
            .ok();
        let store = Arc::new(Self::open(cache_dir, limit)?);
        if let Some(w) = watcher {
            w.spawn(Arc::downgrade(&store))?;
        }
        Ok(store)
    }

    /// Makes the index agree with the disk about object `id`, which another
    /// process may have stored or evicted ([`crate::objwatch`]): added
    /// unverified if its file is there and unknown, dropped if known and
    /// its file is gone. `appeared` is what the event said (its name came
    /// or went): an event that agrees with the index (most are this
    /// process's own) costs no `stat`.
    pub(crate) fn learn(&self, id: &ObjectId, appeared: bool) {
        if appeared == self.contains(id) {
            return;
        }
        let size = match std::fs::symlink_metadata(self.path(id)) {
            Ok(m) if m.is_file() => Some(m.len()),
            _ => None,
        };
        if !appeared && size.is_some() {
            // Removed, and stored again before this event was read: the
            // name stays known, but whoever keeps the removed file open
            // must let it go, or its disk is never freed.
            self.tell_unlinked(std::slice::from_ref(id));
        }
        self.agree(id, size);
    }

    /// Makes the index say what the disk says of object `id`: a file of
    /// `size` bytes (added unverified if unknown), or none (dropped).
    fn agree(&self, id: &ObjectId, size: Option<u64>) {
        let mut st = self.state.lock().unwrap();
        match size {
            Some(size) if !st.lru.contains(id) => {
                st.lru.put(*id, Info { size, verified: 0 });
                st.total += size;
            }
            Some(_) => {}
            None => {
                drop(st);
                self.forget(id);
            }
        }
    }

    /// [`ObjectStore::learn`] for every object in directory `objects/<b>`
    /// (one just created, whose first objects came before its watch), and
    /// for every object of it the index has and the directory has not: one
    /// another process removed before the watch was there.
    pub(crate) fn learn_dir(&self, b: u8) {
        let dir = crate::objwatch::dir_path(&self.objects_dir(), b);
        let mut present = std::collections::HashSet::new();
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if let Some(id) = crate::objwatch::object_id(b, &f.file_name()) {
                self.learn(&id, true);
                present.insert(id);
            }
        }
        let gone: Vec<ObjectId> = {
            let st = self.state.lock().unwrap();
            st.lru
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| id[0] == b && !present.contains(id))
                .collect()
        };
        for id in gone {
            self.learn(&id, false);
        }
    }

    /// Makes the whole index agree with the disk (after events were lost),
    /// from one scan of it.
    pub(crate) fn rescan(&self) {
        let Ok(on_disk) = scan(&self.objects_dir()) else {
            return;
        };
        let present: HashMap<ObjectId, u64> =
            on_disk.iter().map(|(id, m)| (*id, m.len())).collect();
        let gone: Vec<ObjectId> = {
            let st = self.state.lock().unwrap();
            st.lru
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| !present.contains_key(id))
                .collect()
        };
        for id in &gone {
            self.agree(id, None);
        }
        for (id, &size) in &present {
            self.agree(id, Some(size));
        }
    }

    /// Whether the objects take more than the bound.
    pub(crate) fn over_bound(&self) -> bool {
        self.state.lock().unwrap().total > self.bound()
    }

    /// Evicts down to the bound.
    pub(crate) fn evict_to_bound(&self) {
        self.evict_to(self.bound());
    }

    /// Where object `id` lives.
    pub fn path(&self, id: &ObjectId) -> PathBuf {
        let h = object_hex(id);
        self.root.join("objects").join(&h[..2]).join(&h[2..])
    }

    /// The `objects/` directory (the composefs data-only layer).
    pub fn objects_dir(&self) -> PathBuf {
        self.root.join("objects")
    }

    /// Brings object `id`'s dentry and inode into memory (a `stat`), so a
    /// later open does not wait for the disk. A hint: errors are ignored.
    pub fn warm(&self, id: &ObjectId) {
        let _ = std::fs::symlink_metadata(self.path(id));
    }

    /// Whether `id` is present (without verifying it).
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.state.lock().unwrap().lru.contains(id)
    }

    /// The largest object the store takes: its limit (`--cache-size`).
    /// Readers of layers refuse a larger file at its header, before its
    /// content is read; [`ObjectWriter`] refuses to grow past it.
    pub fn max_object(&self) -> u64 {
        self.limit
    }

    /// Starts writing a new object.
    pub fn writer(&self) -> io::Result<ObjectWriter<'_>> {
        Ok(ObjectWriter {
            store: self,
            tmp: Some(TempFile::new_in(&self.root.join("tmp"))?),
            hasher: Some(Sha256::new()),
            size: 0,
        })
    }

    /// An unnamed file under `tmp/` (gone when closed, even after a
    /// crash): a streaming layer's compressed bytes while its contents are
    /// stored ([`crate::layer::stream::scan_layer`]). Not counted against
    /// the cache size; it lives only while its layer is read.
    pub fn spill_file(&self) -> io::Result<File> {
        crate::publish::unnamed_in(&self.root.join("tmp"), 0o600)
    }

    /// Opens object `id` for reading, verified; `None` when it is absent
    /// or was damaged (then it is removed).
    pub fn get(&self, id: &ObjectId) -> Option<File> {
        match self.get_verified(id) {
            Ok(f) => f,
            Err(file) => self.check(id, file),
        }
    }

    /// [`ObjectStore::get`] without hashing: `Ok(Some(file))` when the file
    /// on disk is the one this process verified (an open and an fstat —
    /// cheap enough for a FUSE thread), `Ok(None)` when absent, and
    /// `Err(file)` when it must be hashed first ([`ObjectStore::check`],
    /// on a blocking thread).
    pub fn get_verified(&self, id: &ObjectId) -> Result<Option<File>, File> {
        let known = {
            let mut st = self.state.lock().unwrap();
            st.lru.get(id).map(|i| i.verified)
        };
        let Some(verified) = known else {
            // Unknown here, but another process may have stored it a moment
            // ago (before the watcher told this one): taken, and hashed
            // before it is used, like any object found on disk.
            return match File::open(self.path(id)).and_then(|f| Ok((f.metadata()?, f))) {
                Ok((m, file)) => {
                    self.agree(id, Some(m.len()));
                    Err(file)
                }
                Err(_) => Ok(None),
            };
        };
        let file = match File::open(self.path(id)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(id);
                return Ok(None);
            }
            // Not a sign the object is gone (out of descriptors, a failing
            // disk): not served now, but not forgotten either.
            Err(e) => {
                tracing::warn!(object = %object_hex(id), error = %e, "cannot open object");
                return Ok(None);
            }
        };
        match file.metadata() {
            Ok(m) if Stamp::of(&m).fingerprint() == verified => Ok(Some(file)),
            Ok(_) => Err(file),
            Err(_) => Ok(None),
        }
    }

    /// Hashes object `id`'s open `file`: the file (at its start) if it is
    /// intact, else `None` (a damaged file is removed).
    pub fn check(&self, id: &ObjectId, file: File) -> Option<File> {
        let path = self.path(id);
        match self.hash_and_mark(id, &file) {
            Ok(actual) if &actual == id => {
                // Hashing read it to the end; hand it back at the start.
                io::Seek::seek(&mut &file, io::SeekFrom::Start(0)).ok()?;
                Some(file)
            }
            Ok(actual) => {
                tracing::error!(
                    path = %path.display(),
                    expected = %object_hex(id),
                    actual = %object_hex(&actual),
                    "object damaged on disk; removing it and fetching again"
                );
                let _ = std::fs::remove_file(&path);
                self.forget(id);
                None
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read object");
                None
            }
        }
    }

    /// Hashes object `id`'s open `file` (its sha256) and, if it matches,
    /// marks the object verified with the file's stamp, taken before
    /// hashing: a change while hashing leaves a stamp that no longer
    /// matches.
    fn hash_and_mark(&self, id: &ObjectId, file: &File) -> io::Result<ObjectId> {
        let stamp = Stamp::of(&file.metadata()?);
        let actual = hash_file(file)?;
        if &actual == id {
            let mut st = self.state.lock().unwrap();
            if let Some(i) = st.lru.peek_mut(id) {
                i.verified = stamp.fingerprint();
                st.unsaved = true;
            }
        }
        Ok(actual)
    }

    fn forget(&self, id: &ObjectId) {
        {
            let mut st = self.state.lock().unwrap();
            if let Some(i) = st.lru.pop(id) {
                st.total -= i.size;
            }
        }
        self.tell_unlinked(std::slice::from_ref(id));
    }

    /// Calls `f` with the objects whose files this store unlinks (evicted,
    /// damaged, removed) or finds gone (another process evicted them),
    /// after the fact and with no lock of the store held: whoever keeps
    /// such a file open should let it go, or its disk is not freed. Set
    /// once; later calls are ignored.
    pub fn on_unlinked(&self, f: impl Fn(&[ObjectId]) + Send + Sync + 'static) {
        let _ = self.unlinked.set(Box::new(f));
    }

    fn tell_unlinked(&self, ids: &[ObjectId]) {
        if ids.is_empty() {
            return;
        }
        *self.last_unlinked.lock().unwrap() = Some(Instant::now());
        if let Some(f) = self.unlinked.get() {
            f(ids);
        }
    }

    /// Whether `file`, opened from object `id` when it was verified, is
    /// still the file the store has verified under that name: one `fstat`,
    /// no open, no hashing. A damaged, replaced or evicted object is not.
    /// Marks the object used.
    pub fn still_verified(&self, id: &ObjectId, file: &File) -> bool {
        let verified = self.state.lock().unwrap().lru.get(id).map(|i| i.verified);
        match (verified, file.metadata()) {
            (Some(v), Ok(m)) => v != 0 && m.nlink() > 0 && Stamp::of(&m).fingerprint() == v,
            _ => false,
        }
    }

    /// Keeps `ids` from eviction until unpinned (an image mounted by the
    /// kernel reads them behind our back).
    pub fn pin(&self, ids: &[ObjectId]) {
        let mut st = self.state.lock().unwrap();
        for id in ids {
            *st.pinned.entry(*id).or_insert(0) += 1;
        }
    }

    /// Undoes one [`ObjectStore::pin`].
    pub fn unpin(&self, ids: &[ObjectId]) {
        let mut st = self.state.lock().unwrap();
        for id in ids {
            if let Some(n) = st.pinned.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    st.pinned.remove(id);
                }
            }
        }
        drop(st);
        self.evict_to(self.bound());
    }

    /// After `ENOSPC` on the cache disk: evicts least recently used objects
    /// (sparing pinned ones, as always) worth `want` bytes or a quarter of
    /// what is stored, whichever is more. False if none could go: then the
    /// caller's `ENOSPC` stands. One call at a time: two writers that fill
    /// the disk together (a spill and the objects stored from it) each get
    /// room, where the second used to find the first had just evicted what
    /// it meant to, return false, and fail its write. A want larger than
    /// the limit can never be met: false at once, nothing evicted.
    ///
    /// With nothing left to evict, an eviction a moment ago may still free
    /// room: an evicted object keeps its disk until its last descriptor
    /// closes (a reader's, a kept open, the kernel's passthrough backing
    /// file, which goes when the FUSE release arrives, asynchronously), and
    /// a write in flight, once stored, makes the object before it
    /// evictable. So until a second after the last unlink, it waits
    /// for the disk's free space to grow or for an object to evict.
    pub fn make_room(&self, want: u64) -> bool {
        if want > self.limit {
            return false;
        }
        let _one = self.making_room.lock().unwrap();
        if self.evict_some(want) {
            return true;
        }
        let Some(unlinked) = *self.last_unlinked.lock().unwrap() else {
            return false;
        };
        let Ok(root) = File::open(&self.root) else {
            return false;
        };
        let free = || free_bytes(&root).unwrap_or(0);
        let start = free();
        while Instant::now() < unlinked + RELEASE_WAIT {
            std::thread::sleep(Duration::from_millis(10));
            let now = free();
            if now > start {
                tracing::info!(
                    freed = now - start,
                    "cache disk full: evicted objects were closed, their room came back"
                );
                return true;
            }
            if self.evict_some(want) {
                return true;
            }
        }
        false
    }

    /// [`ObjectStore::make_room`]'s eviction; whether it evicted anything.
    fn evict_some(&self, want: u64) -> bool {
        let stored = self.stats().bytes;
        let before = self.evicted.load(Ordering::Relaxed);
        self.evict_to(stored.saturating_sub(want.max(stored / 4)));
        let freed = self.evicted.load(Ordering::Relaxed) > before;
        if freed {
            tracing::warn!(
                stored,
                now = self.stats().bytes,
                "cache disk full: evicted least recently used objects to make room"
            );
        }
        freed
    }

    /// What objects may take: the limit less the spills' room.
    fn bound(&self) -> u64 {
        self.limit
            .saturating_sub(self.reserved.load(Ordering::SeqCst))
    }

    /// Room for a layer's spill of `bytes` (its compressed bytes, on disk
    /// under `tmp/` while it is read in two passes), counted against the
    /// bound: objects are evicted to make it. `None`, and nothing evicted,
    /// for a spill larger than [`ObjectStore::max_spill`]: `bytes` is what a
    /// manifest claims before anything arrived, and emptying the cache for
    /// it would cost every image; such a layer is read in one pass instead.
    pub fn reserve_spill(self: &std::sync::Arc<Self>, bytes: u64) -> Option<SpillRoom> {
        if bytes > self.max_spill() {
            return None;
        }
        self.reserved.fetch_add(bytes, Ordering::SeqCst);
        self.evict_to(self.bound());
        Some(SpillRoom {
            store: self.clone(),
            bytes,
        })
    }

    /// The largest spill [`ObjectStore::reserve_spill`] makes room for:
    /// half the limit.
    pub fn max_spill(&self) -> u64 {
        self.limit / 2
    }

    /// The persistent pins of this cache directory.
    pub fn pins(&self) -> &crate::pins::Pins {
        &self.pins
    }

    /// Evicts least recently used objects until at most `target` bytes
    /// remain, sparing pinned ones (see the module contract).
    pub fn evict_to(&self, target: u64) {
        if self.state.lock().unwrap().total <= target {
            return;
        }
        let lock = match self.pins.lock() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lock the pins; not evicting");
                return;
            }
        };
        let persistent = self.pins.pinned(&lock);
        let mut victims = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            let mut keep = Vec::new();
            while st.total > target && st.lru.len() > 1 {
                let Some((id, info)) = st.lru.pop_lru() else {
                    break;
                };
                if st.pinned.contains_key(&id) || persistent.contains(&id) {
                    keep.push((id, info));
                    continue;
                }
                st.total -= info.size;
                victims.push(id);
            }
            for (id, info) in keep {
                st.lru.put(id, info);
                // pinned objects go back as most recent; order among them is moot
            }
        }
        for id in &victims {
            let _ = std::fs::remove_file(self.path(id));
        }
        drop(lock);
        self.tell_unlinked(&victims);
        if !victims.is_empty() {
            self.evicted
                .fetch_add(victims.len() as u64, Ordering::Relaxed);
            tracing::debug!(count = victims.len(), "evicted objects");
        }
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let st = self.state.lock().unwrap();
        Stats {
            objects: st.lru.len() as u64,
            bytes: st.total,
            limit: self.limit,
            evicted: self.evicted.load(Ordering::Relaxed),
        }
    }

    /// Hashes every object; removes and returns the paths of bad ones, and
    /// marks the good ones verified (for [`ObjectStore::save_verified`]).
    pub fn verify_all(&self) -> Vec<PathBuf> {
        let ids: Vec<ObjectId> = self
            .state
            .lock()
            .unwrap()
            .lru
            .iter()
            .map(|(k, _)| *k)
            .collect();
        let mut bad = Vec::new();
        for id in ids {
            let path = self.path(&id);
            let ok = File::open(&path)
                .and_then(|f| self.hash_and_mark(&id, &f))
                .is_ok_and(|h| h == id);
            if !ok {
                let _ = std::fs::remove_file(&path);
                self.forget(&id);
                bad.push(path);
            }
        }
        bad
    }

    /// Writes what this process has verified (each object's stamp
    /// fingerprint) to `<cache-dir>/verified`, replacing the file whole, so
    /// the next process trusts those objects while their files stay as
    /// they are (module doc). What the file said of objects this process
    /// has not verified (another daemon on the cache saved it) is kept.
    /// Returns how many were written.
    pub fn save_verified(&self) -> io::Result<usize> {
        let before = stamps::read(&self.root);
        let (data, n) = {
            let mut st = self.state.lock().unwrap();
            st.unsaved = false;
            stamps::apply(&before, &mut st.lru);
            stamps::encode(st.lru.iter().map(|(id, i)| (id, i.verified)))
        };
        let saved = TempFile::with_data(&self.root.join("tmp"), &data)
            .and_then(|mut t| t.replace(&self.root.join(stamps::FILE)));
        if saved.is_err() {
            self.state.lock().unwrap().unsaved = true;
        }
        saved.map(|()| n)
    }

    /// [`ObjectStore::save_verified`] if an object was verified since the
    /// last save (`None` if not). A daemon calls it every few seconds, so
    /// one killed later does not leave the next start to hash again what
    /// it verified.
    pub fn save_verified_if_new(&self) -> io::Result<Option<usize>> {
        if !self.state.lock().unwrap().unsaved {
            return Ok(None);
        }
        self.save_verified().map(Some)
    }

    /// Removes object `id` (one a failed layer created).
    pub fn remove(&self, id: &ObjectId) {
        let Ok(lock) = self.pins.lock() else { return };
        if !self.state.lock().unwrap().pinned.contains_key(id)
            && !self.pins.pinned(&lock).contains(id)
        {
            let _ = std::fs::remove_file(self.path(id));
            self.forget(id);
        }
    }

    /// Puts a finished temporary file in place; true if the object is new.
    fn insert(&self, mut tmp: TempFile, id: ObjectId, size: u64) -> io::Result<bool> {
        let path = self.path(&id);
        if self.contains(&id) && path.exists() {
            self.state.lock().unwrap().lru.promote(&id);
            return Ok(false);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A file already under the name that this process does not know
        // (another process wrote it, or it outlived its index entry) is kept
        // if it holds the content, else replaced by the one just written.
        if !tmp.publish(&path)? {
            let intact = File::open(&path)
                .and_then(|f| hash_file(&f))
                .is_ok_and(|h| h == id);
            if !intact {
                tmp.replace(&path)?;
            }
        }
        let stamp = std::fs::metadata(&path).map(|m| Stamp::of(&m)).ok();
        {
            let mut st = self.state.lock().unwrap();
            if st
                .lru
                .put(
                    id,
                    Info {
                        size,
                        verified: stamp.map_or(0, |s| s.fingerprint()),
                    },
                )
                .is_none()
            {
                st.total += size;
            }
            st.unsaved |= stamp.is_some();
        }
        self.evict_to(self.bound());
        Ok(true)
    }
}

/// The objects under `objects/`, with their metadata.
fn scan(objects: &Path) -> io::Result<Vec<(ObjectId, std::fs::Metadata)>> {
    let mut found = Vec::new();
    for d in std::fs::read_dir(objects)?.flatten() {
        let Some(b) = crate::objwatch::dir_byte(&d.file_name()) else {
            continue;
        };
        if !d.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for f in std::fs::read_dir(d.path())?.flatten() {
            if let (Some(id), Ok(m)) = (crate::objwatch::object_id(b, &f.file_name()), f.metadata())
            {
                found.push((id, m));
            }
        }
    }
    Ok(found)
}

/// An object being written: hashed as it goes, named when finished.
///
/// Zeros are not written where they can be left as holes: a write's
/// leading and trailing zeros, and whole blocks of zeros ([`HOLE_BLOCK`],
/// block-aligned) within it. Bytes are written at their offsets, so what
/// is skipped reads as zeros, and [`ObjectWriter::finish`] sets the
/// length. A file of zeros (a `lastlog` of a high uid, a preallocated
/// image) or an expanded PAX sparse file thus reads the same and takes no
/// disk for its zeros, whatever sizes the writes come in. The object
/// still counts at its full length against the store's bound.
pub struct ObjectWriter<'a> {
    store: &'a ObjectStore,
    /// `None` once finished.
    tmp: Option<TempFile>,
    hasher: Option<Sha256>,
    size: u64,
}

/// The block size holes are made of inside a write: the page and the
/// usual filesystem block, so a block skipped is a block not allocated.
pub const HOLE_BLOCK: usize = 4096;

/// Whether `b` is all zeros (16 bytes at a time).
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

/// How many bytes `b` starts with that are zero.
fn zero_prefix(b: &[u8]) -> usize {
    let whole = b.chunks_exact(16).take_while(|c| is_zero(c)).count() * 16;
    whole + b[whole..].iter().take_while(|&&x| x == 0).count()
}

/// How many bytes `b` ends with that are zero.
fn zero_suffix(b: &[u8]) -> usize {
    let whole = b.rchunks_exact(16).take_while(|c| is_zero(c)).count() * 16;
    whole
        + b[..b.len() - whole]
            .iter()
            .rev()
            .take_while(|&&x| x == 0)
            .count()
}

/// The next step of writing `buf` at `offset`: `(n, true)` to skip `n`
/// bytes of whole aligned blocks of zeros (a hole), else `(n, false)` to
/// write `n` bytes, up to where such a block starts.
fn next_step(offset: u64, buf: &[u8]) -> (usize, bool) {
    let head = (HOLE_BLOCK - (offset % HOLE_BLOCK as u64) as usize) % HOLE_BLOCK;
    if head == 0 {
        let z = buf
            .chunks_exact(HOLE_BLOCK)
            .take_while(|b| is_zero(b))
            .count()
            * HOLE_BLOCK;
        if z > 0 {
            return (z, true);
        }
    }
    let mut at = head;
    while at + HOLE_BLOCK <= buf.len() && !is_zero(&buf[at..at + HOLE_BLOCK]) {
        at += HOLE_BLOCK;
    }
    if at + HOLE_BLOCK > buf.len() {
        at = buf.len();
    }
    (at, false)
}

impl Write for ObjectWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let store = self.store;
        // An object that can never fit fails before it takes disk, or
        // evicts a byte (see the module contract).
        if self.size.saturating_add(buf.len() as u64) > store.max_object() {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "an object of more than {} bytes, the cache bound (--cache-size)",
                    store.max_object()
                ),
            ));
        }
        let file = self.tmp.as_ref().expect("open until finished").as_file();
        let start = self.size;
        let mut at = zero_prefix(buf);
        let end = if at == buf.len() {
            at
        } else {
            buf.len() - zero_suffix(buf)
        };
        while at < end {
            let (n, hole) = next_step(start + at as u64, &buf[at..end]);
            if !hole {
                let (data, off) = (&buf[at..at + n], start + at as u64);
                when_full(
                    || store.make_room(n as u64),
                    || file.write_all_at(data, off),
                )?;
            }
            at += n;
        }
        self.hasher
            .as_mut()
            .expect("open until finished")
            .update(buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter<'_> {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Names the object by its hash and puts it in place (or drops it if
    /// the store already has it). Returns its id and size.
    pub fn finish(self) -> io::Result<(ObjectId, u64)> {
        self.finish_new().map(|(id, n, _)| (id, n))
    }

    /// Like [`ObjectWriter::finish`], also telling whether the object is new.
    pub fn finish_new(mut self) -> io::Result<(ObjectId, u64, bool)> {
        let tmp = self.tmp.take().expect("finished once");
        // Zeros at the end were not written.
        tmp.as_file().set_len(self.size)?;
        let id = self.hasher.take().expect("finished once").finish();
        let new = self.store.insert(tmp, id, self.size)?;
        Ok((id, self.size, new))
    }
}

/// Runs `op`; while it fails with `ENOSPC` and `make_room` freed
/// something, runs it again (`op` must be safe to repeat, e.g. a write at
/// a fixed offset or one that wrote nothing).
pub fn when_full<T>(
    make_room: impl Fn() -> bool,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && make_room() => {}
            r => return r,
        }
    }
}

/// Free bytes (for an unprivileged writer) on the filesystem of `dir`.
fn free_bytes(dir: &File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed statvfs is a valid value to fill; `dir` is open.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Whether two open files are the same file (device and inode).
pub fn same_file(a: &File, b: &File) -> io::Result<bool> {
    let (ma, mb) = (a.metadata()?, b.metadata()?);
    Ok(same_inode(&ma, &mb))
}

fn same_inode(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// Whether two object files hold the same bytes: at once if they are the
/// same file, else by reading both (a rare path: an object's file changed
/// while an earlier open of it lives).
pub fn same_content(a: &File, b: &File) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let (ma, mb) = (a.metadata()?, b.metadata()?);
    if same_inode(&ma, &mb) {
        return Ok(true);
    }
    if ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0u8; 256 << 10], vec![0u8; 256 << 10]);
    let mut off = 0u64;
    while off < ma.len() {
        let n = a.read_at(&mut x, off)?;
        if n == 0 {
            return Ok(false);
        }
        b.read_exact_at(&mut y[..n], off)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

/// sha256 of a whole file.
pub fn hash_file(mut f: &File) -> io::Result<ObjectId> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Incremental SHA-256 (aws-lc's assembly implementation).
pub struct Sha256(aws_lc_rs::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256 {
    /// A fresh hash.
    pub fn new() -> Sha256 {
        Sha256(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The digest.
    pub fn finish(self) -> ObjectId {
        self.0
            .finish()
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(data: &[u8]) -> ObjectId {
        let mut h = Sha256::new();
        h.update(data);
        h.finish()
    }

    fn put(s: &ObjectStore, data: &[u8]) -> ObjectId {
        let mut w = s.writer().unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap().0
    }

    #[test]
    fn same_content_compares_files_by_identity_then_bytes() {
        let d = tempfile::tempdir().unwrap();
        let data = vec![7u8; 600 << 10];
        let (a, b, c, e) = (
            d.path().join("a"),
            d.path().join("b"),
            d.path().join("c"),
            d.path().join("e"),
        );
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        let mut other = data.clone();
        other[500 << 10] ^= 1;
        std::fs::write(&c, &other).unwrap();
        std::fs::write(&e, &data[..1000]).unwrap();
        let open = |p: &Path| File::open(p).unwrap();
        assert!(same_file(&open(&a), &open(&a)).unwrap());
        assert!(!same_file(&open(&a), &open(&b)).unwrap());
        assert!(same_content(&open(&a), &open(&b)).unwrap());
        assert!(!same_content(&open(&a), &open(&c)).unwrap());
        assert!(!same_content(&open(&a), &open(&e)).unwrap());
    }

    #[test]
    fn stores_dedups_verifies_and_evicts() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path(), 25).unwrap();
        let a = put(&s, b"aaaaaaaaaa");
        let a2 = put(&s, b"aaaaaaaaaa");
        assert_eq!(a, a2);
        assert_eq!(s.stats().objects, 1);
        let b = put(&s, b"bbbbbbbbbb");
        assert!(s.get(&a).is_some()); // a is now most recent
        let _c = put(&s, b"cccccccccc"); // 30 > 25: evict b (least recent)
        assert!(s.get(&b).is_none());
        assert!(s.get(&a).is_some());
        assert!(s.stats().bytes <= 25);

        // damage a: detected on the next open, removed
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(s.path(&a), b"aaaaaaaaab").unwrap();
        assert!(s.get(&a).is_none());
        assert!(!s.path(&a).exists());

        // restart: objects are found again and verified on first open
        drop(s);
        let s = ObjectStore::open(d.path(), 25).unwrap();
        assert_eq!(s.stats().objects, 1);
        assert!(s.verify_all().is_empty());
    }

    /// What one process verified, saved, is trusted by the next while the
    /// object's file stays as it is; a file written meanwhile (its ctime
    /// moves) is hashed again and, damaged, removed; a malformed stamps
    /// file marks nothing.
    #[test]
    fn verified_stamps_survive_a_restart_but_not_a_change() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let a = put(&s, b"aaaaaaaaaa");
        let b = put(&s, b"bbbbbbbbbb");
        assert_eq!(s.save_verified().unwrap(), 2);
        drop(s);

        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert!(
            matches!(s.get_verified(&a), Ok(Some(_))),
            "a saved stamp spares the hash"
        );
        // Written while no process watched (same size, same mtime set back:
        // only the ctime tells).
        let m = std::fs::metadata(s.path(&b)).unwrap();
        std::fs::write(s.path(&b), b"bbbbbbbbbc").unwrap();
        let f = File::options().write(true).open(s.path(&b)).unwrap();
        f.set_modified(m.modified().unwrap()).unwrap();
        drop((s, f));
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert!(
            s.get_verified(&b).is_err(),
            "a changed file is hashed again"
        );
        assert!(s.get(&b).is_none(), "and, damaged, not served");
        assert!(!s.path(&b).exists());
        assert!(s.get(&a).is_some());
        drop(s);

        // Without the file, or with a damaged one: hashed on first open.
        for bad in [&b"apt-layer verified 1\nshort"[..], b"other"] {
            std::fs::write(d.path().join(stamps::FILE), bad).unwrap();
            let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
            assert!(s.get_verified(&a).is_err(), "{bad:?}");
        }
        std::fs::remove_file(d.path().join(stamps::FILE)).unwrap();
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert!(s.get_verified(&a).is_err());
        // `cache verify` marks what it hashed.
        assert!(s.verify_all().is_empty());
        assert_eq!(s.save_verified().unwrap(), 1);
        drop(s);
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert!(matches!(s.get_verified(&a), Ok(Some(_))));
    }

    /// The periodic save writes only when something was verified since
    /// the last one: a stored object, or one hashed on its first open.
    #[test]
    fn stamps_are_saved_again_only_after_a_new_verification() {
        let d = tempfile::tempdir().unwrap();
        let stamps = d.path().join(stamps::FILE);
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.save_verified_if_new().unwrap(), None, "nothing verified");
        let a = put(&s, b"aaaaaaaaaa");
        assert_eq!(s.save_verified_if_new().unwrap(), Some(1), "a stored");
        std::fs::remove_file(&stamps).unwrap();
        assert_eq!(s.save_verified_if_new().unwrap(), None, "saved already");
        assert!(!stamps.exists());
        drop(s);

        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.save_verified_if_new().unwrap(), None);
        assert!(s.get(&a).is_some(), "hashed on its first open");
        assert_eq!(s.save_verified_if_new().unwrap(), Some(1), "a hashed");
        drop(s);
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert!(matches!(s.get_verified(&a), Ok(Some(_))));
    }

    /// A full disk with nothing left to evict, a moment after an eviction:
    /// `make_room` waits instead of failing the write, for an evicted
    /// object whose file a reader still holds (its room comes back when the
    /// reader closes it) or for a write in flight (stored, it makes the
    /// object before it evictable).
    #[test]
    fn a_full_disk_waits_for_room_an_eviction_a_moment_ago_frees() {
        const BIG: usize = 32 << 20;
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path(), 1 << 30).unwrap();
        let big = put(&s, &vec![7u8; BIG]);
        let held = s.get(&big).unwrap();
        put(&s, b"the most recently used object stays");
        assert!(s.make_room(0), "the large object is evicted");
        assert!(!s.path(&big).exists());
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        assert!(
            s.make_room(0),
            "nothing left to evict, but the evicted object's room comes back"
        );
        reader.join().unwrap();
        // An object stored meanwhile (a write in flight) makes the one
        // before it evictable.
        let s = Arc::new(s);
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                put(&s, b"a write that was in flight")
            })
        };
        assert!(s.make_room(0), "the object before the new one is evicted");
        writer.join().unwrap();
    }

    /// Two processes on one cache: the one that saves last keeps what the
    /// other saved of objects it did not verify itself.
    #[test]
    fn saving_verified_stamps_keeps_another_process_s() {
        let d = tempfile::tempdir().unwrap();
        let s1 = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let a = put(&s1, b"aaaaaaaaaa");
        let s2 = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let b = put(&s2, b"bbbbbbbbbb");
        assert!(s2.get_verified(&a).is_err(), "s2 never verified a");
        assert_eq!(s1.save_verified().unwrap(), 1);
        assert_eq!(s2.save_verified().unwrap(), 2);
        drop((s1, s2));
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        assert!(matches!(s.get_verified(&a), Ok(Some(_))));
        assert!(matches!(s.get_verified(&b), Ok(Some(_))));
    }

    /// A daemon's store follows another process on the same cache: it
    /// learns the objects stored there (unverified: a damaged one is not
    /// served), forgets the ones evicted there, and keeps the two within
    /// its bound.
    #[test]
    fn a_shared_store_follows_another_process_on_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let daemon = ObjectStore::open_shared(d.path(), 30).unwrap();
        let own = put(&daemon, b"0123456789");
        let other = ObjectStore::open(d.path(), 1 << 20).unwrap();
        // In a directory the daemon already watches, and in new ones.
        let same_dir = (0u32..)
            .map(|i| i.to_le_bytes())
            .find(|c| sha256(c)[0] == own[0] && sha256(c) != own)
            .unwrap();
        let ids: Vec<ObjectId> = [&same_dir[..], b"b", b"c"]
            .iter()
            .map(|c| put(&other, c))
            .collect();
        let settle = |what: &str, cond: &dyn Fn() -> bool| {
            let t = std::time::Instant::now();
            while !cond() {
                assert!(t.elapsed().as_secs() < 5, "{what}");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        settle("learned the other's objects", &|| {
            ids.iter().all(|id| daemon.contains(id))
        });
        assert_eq!(daemon.stats().bytes, 10 + 4 + 1 + 1);
        std::fs::write(other.path(&ids[1]), b"x").unwrap();
        assert!(daemon.get(&ids[1]).is_none(), "served a damaged object");
        other.remove(&ids[2]);
        settle("forgot an object the other evicted", &|| {
            !daemon.contains(&ids[2])
        });
        assert!(daemon.contains(&ids[0]));

        // 10 (own) + 4 + 20 from elsewhere > 30: the daemon evicts its
        // least recently used object.
        let big = put(&other, &[b'z'; 20]);
        settle("evicted down to the bound", &|| {
            !daemon.path(&own).exists() && daemon.stats().bytes <= 30
        });
        assert!(daemon.contains(&big));
    }

    /// An object larger than the limit is refused as it grows past it,
    /// before anything is evicted for it; so is a spill larger than half
    /// the limit, and a want `make_room` could never meet.
    #[test]
    fn what_can_never_fit_evicts_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = Arc::new(ObjectStore::open(d.path(), 100).unwrap());
        let a = put(&s, &[b'a'; 40]);
        let b = put(&s, &[b'b'; 40]);
        let mut w = s.writer().unwrap();
        w.write_all(&[0; 60]).unwrap();
        let e = w.write_all(&[0; 41]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
        assert_eq!(w.len(), 60);
        drop(w);
        assert!(!s.make_room(101));
        assert!(s.reserve_spill(51).is_none());
        assert!(s.reserve_spill(u64::MAX).is_none());
        assert!(s.get(&a).is_some() && s.get(&b).is_some());
        assert_eq!(s.stats().evicted, 0);
        // Exactly the limit fits (alone).
        let c = put(&s, &[b'c'; 100]);
        assert!(s.get(&c).is_some());
        // Half the limit is reserved, evicting down to the rest.
        let room = s.reserve_spill(50).expect("half the limit");
        assert!(s.stats().bytes <= 50 || s.stats().objects == 1);
        drop(room);
    }

    /// After lost events (a queue overflow) the index is made to agree
    /// with the disk again.
    #[test]
    fn a_rescan_finds_what_changed_behind_the_index() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let gone = put(&s, b"gone");
        let other = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let new = put(&other, b"new!");
        std::fs::remove_file(s.path(&gone)).unwrap();
        assert!(s.contains(&gone) && !s.contains(&new));
        s.rescan();
        assert!(!s.contains(&gone) && s.contains(&new));
        assert_eq!(s.stats().bytes, 4);
    }

    /// Only a missing file makes an object absent: an open that fails for
    /// another reason (here ENOTDIR; out of descriptors alike) serves
    /// nothing but keeps the object in the index.
    #[test]
    fn an_object_that_cannot_be_opened_now_is_not_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let id = put(&s, b"kept in the index");
        let dir = s.path(&id).parent().unwrap().to_path_buf();
        let aside = d.path().join("aside");
        std::fs::rename(&dir, &aside).unwrap();
        std::fs::write(&dir, b"not a directory").unwrap();
        assert!(matches!(s.get_verified(&id), Ok(None)));
        assert!(
            s.contains(&id),
            "forgotten for an error that is not absence"
        );
        std::fs::remove_file(&dir).unwrap();
        std::fs::rename(&aside, &dir).unwrap();
        assert!(matches!(s.get_verified(&id), Ok(Some(_))));
        std::fs::remove_file(s.path(&id)).unwrap();
        assert!(matches!(s.get_verified(&id), Ok(None)));
        assert!(!s.contains(&id), "a missing file is absent");
    }

    /// A directory watched late is listed both ways: objects that came
    /// before its watch are learned, and objects another process removed
    /// before it are forgotten (and told to whoever keeps them open).
    #[test]
    fn learning_a_directory_finds_objects_removed_before_its_watch() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        s.on_unlinked(move |ids| t.lock().unwrap().extend_from_slice(ids));
        let gone = put(&s, b"gone");
        let kept = put(&s, b"kept");
        std::fs::remove_file(s.path(&gone)).unwrap();
        s.learn_dir(gone[0]);
        assert!(!s.contains(&gone));
        assert_eq!(*told.lock().unwrap(), vec![gone]);
        s.learn_dir(kept[0]);
        assert!(s.contains(&kept), "an object still on disk stays");
        assert_eq!(s.stats().bytes, 4);
    }

    /// An object another process removed and that was stored again before
    /// the removal was read stays known, and whoever keeps the removed
    /// file open is told to let it go.
    #[test]
    fn an_object_removed_and_stored_again_is_told_as_unlinked() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        s.on_unlinked(move |ids| t.lock().unwrap().extend_from_slice(ids));
        let id = put(&s, b"again");
        let held = std::fs::File::open(s.path(&id)).unwrap();
        std::fs::remove_file(s.path(&id)).unwrap();
        std::fs::write(s.path(&id), b"again").unwrap();
        s.learn(&id, false);
        assert!(s.contains(&id), "the name is there again");
        assert_eq!(*told.lock().unwrap(), vec![id]);
        assert_eq!(held.metadata().unwrap().nlink(), 0);
        // An event that agrees with the disk tells nobody.
        s.learn(&id, true);
        assert_eq!(told.lock().unwrap().len(), 1);
    }

    /// A file under an object's name that the store does not know is kept
    /// only if it holds the content; a damaged one is replaced.
    #[test]
    fn an_unknown_file_under_the_name_is_checked_when_stored() {
        let d = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(d.path(), 1 << 20).unwrap();
        let id = sha256(b"content");
        std::fs::create_dir_all(s.path(&id).parent().unwrap()).unwrap();
        std::fs::write(s.path(&id), b"damaged").unwrap();
        assert_eq!(put(&s, b"content"), id);
        assert_eq!(std::fs::read(s.path(&id)).unwrap(), b"content");
        let mut got = Vec::new();
        s.get(&id).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, b"content");

        // An intact one is kept (same inode).
        let other = sha256(b"other");
        std::fs::create_dir_all(s.path(&other).parent().unwrap()).unwrap();
        std::fs::write(s.path(&other), b"other").unwrap();
        let ino = std::fs::metadata(s.path(&other)).unwrap().ino();
        assert_eq!(put(&s, b"other"), other);
        assert_eq!(std::fs::metadata(s.path(&other)).unwrap().ino(), ino);
        assert!(s.get(&other).is_some());
    }

    #[test]
    fn next_step_skips_only_whole_aligned_blocks_of_zeros() {
        const B: usize = HOLE_BLOCK;
        let zeros = vec![0u8; 3 * B];
        assert_eq!(next_step(0, &zeros), (3 * B, true));
        assert_eq!(next_step(0, &zeros[..B - 1]), (B - 1, false));
        // Unaligned: data up to the boundary, then the hole.
        assert_eq!(next_step(10, &zeros), (B - 10, false));
        assert_eq!(next_step(B as u64, &zeros[..2 * B + 5]), (2 * B, true));
        let mut mixed = vec![0u8; 4 * B];
        mixed[B + 7] = 1;
        assert_eq!(next_step(0, &mixed), (B, true));
        assert_eq!(next_step(B as u64, &mixed[B..]), (B, false));
        mixed[3 * B - 1] = 1;
        assert_eq!(next_step(B as u64, &mixed[B..]), (2 * B, false));
        assert_eq!(next_step(0, &[]), (0, false));
    }

    /// Objects with runs of zeros read back the same, and the runs take
    /// no disk, whatever the sizes of the writes.
    #[test]
    fn zeros_are_stored_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let s = ObjectStore::open(dir.path(), 1 << 30).unwrap();
        let mut data = vec![7u8; 100];
        data.resize(100 + (1 << 20), 0);
        data.extend(std::iter::repeat_n(9u8, 5000));
        data.resize(data.len() + (64 << 10), 0);
        for chunk in [1usize, 777, 4096, 65536, data.len()] {
            let mut w = s.writer().unwrap();
            for c in data.chunks(chunk) {
                w.write_all(c).unwrap();
            }
            let (id, size) = w.finish().unwrap();
            assert_eq!((id, size), (sha256(&data), data.len() as u64));
            let path = s.path(&id);
            assert_eq!(std::fs::read(&path).unwrap(), data, "writes of {chunk}");
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!(m.len(), data.len() as u64);
            assert!(
                m.blocks() * 512 <= 5 * HOLE_BLOCK as u64,
                "writes of {chunk}: {} bytes allocated",
                m.blocks() * 512
            );
            s.remove(&id);
        }
        // All zeros: no block at all, the length still right.
        let zeros = vec![0u8; 8 << 20];
        let id = put(&s, &zeros);
        let m = std::fs::metadata(s.path(&id)).unwrap();
        assert_eq!((m.len(), m.blocks()), (8 << 20, 0));
        assert_eq!(hash_file(&File::open(s.path(&id)).unwrap()).unwrap(), id);
        assert_eq!(s.stats().bytes, 8 << 20, "counted at its full size");
    }
}
