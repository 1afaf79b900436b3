//! Keeps a daemon's object index in step with the objects other processes
//! store in, or evict from, the same cache directory: a `-o ro` daemon
//! beside the read-write one, `mount-image`, `export`, `cache gc`. Without
//! it a daemon fetches again what another process has just stored, and each
//! bounds only the objects it knows of, so together they hold several times
//! `--cache-size`.
//!
//! Contracts:
//! - **Events are hints**: an inotify event only names an object. Its file
//!   is then looked at, and the index made to agree with the disk
//!   (`ObjectStore::learn`), so events that arrive late, out of order, or
//!   from this process's own writes do no harm.
//! - **No gap**: the watches are in place before the store's first scan of
//!   `objects/`, and a new `<2 hex>/` directory is listed once it is
//!   watched, so no object is missed. A queue overflow rescans the store.
//! - **Objects from elsewhere are untrusted**: they enter the index
//!   unverified, so their first open here hashes them.
//! - **Bound**: when what it learned takes the store over its bound, the
//!   watcher first waits until the events stop for a moment (the other
//!   process evicts right after it stores), then evicts what is still over.
//! - One blocking thread per store, holding only a `Weak` of it: it ends
//!   at the first event after the store is dropped. An event after a quiet
//!   spell is read at once; while they keep coming they are read in
//!   batches (50 ms apart), so others' objects are known within about
//!   that long. Reading does not wait for it: an object the index lacks is
//!   looked for on disk before it is fetched (`ObjectStore::get_verified`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use crate::cas::{ObjectId, ObjectStore};

/// What a `<2 hex>/` directory is watched for: names appearing (`linkat`,
/// rename) and going.
const OBJECT_EVENTS: WatchMask = WatchMask::CREATE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::ONLYDIR);

/// How long events gather before they are read, while they keep coming.
const GATHER: Duration = Duration::from_millis(50);

/// How long the events must stop before what is over the bound is evicted.
const QUIET: Duration = Duration::from_millis(100);

/// The longest a pending eviction waits for quiet.
const QUIET_AT_MOST: Duration = Duration::from_secs(1);

/// The inotify watches over one store's `objects/`.
pub struct Watcher {
    inotify: Inotify,
    objects: PathBuf,
    top: WatchDescriptor,
    /// Watched `<2 hex>/` directories, by their first byte.
    dirs: HashMap<WatchDescriptor, u8>,
    /// A directory could not be watched, and the log said so.
    warned: bool,
}

/// What one event says happened to an object.
enum Seen {
    /// An object's name appeared (`true`) or went.
    Object(ObjectId, bool),
    Dir(u8),
    Overflow,
}

impl Watcher {
    /// Watches `objects` and the `<2 hex>/` directories already in it.
    pub fn new(objects: &Path) -> io::Result<Watcher> {
        let inotify = Inotify::init()?;
        let top = inotify.watches().add(
            objects,
            WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::ONLYDIR,
        )?;
        let mut w = Watcher {
            inotify,
            objects: objects.to_path_buf(),
            top,
            dirs: HashMap::new(),
            warned: false,
        };
        for d in std::fs::read_dir(objects)?.flatten() {
            if let Some(b) = dir_byte(&d.file_name()) {
                w.add_dir(b)?;
            }
        }
        Ok(w)
    }

    fn add_dir(&mut self, b: u8) -> io::Result<()> {
        let wd = self
            .inotify
            .watches()
            .add(dir_path(&self.objects, b), OBJECT_EVENTS)?;
        self.dirs.insert(wd, b);
        Ok(())
    }

    /// Follows the events on a thread of its own for as long as `store`
    /// lives.
    pub fn spawn(self, store: Weak<ObjectStore>) -> io::Result<()> {
        std::thread::Builder::new()
            .name("apt-layer-objwatch".into())
            .spawn(move || self.run(store))?;
        Ok(())
    }

    fn run(mut self, store: Weak<ObjectStore>) {
        let mut buf = vec![0u8; 64 * 1024];
        // When the store went over its bound through objects learned here.
        let mut over_since: Option<Instant> = None;
        let mut last_read = Instant::now() - GATHER;
        loop {
            let wait = over_since.map(|_| QUIET);
            if !readable(&self.inotify, wait) {
                // Quiet: what is still over the bound goes now.
                if let (Some(s), Some(_)) = (store.upgrade(), over_since.take()) {
                    s.evict_to_bound();
                }
                continue;
            }
            let seen = match self.read(&mut buf) {
                Ok(seen) => seen,
                Err(e) => {
                    tracing::warn!(error = %e, "stopped watching the cache for other processes' objects");
                    return;
                }
            };
            // Most events are this process's own objects, thousands a
            // second while a layer is stored: while they keep coming,
            // gather them rather than wake for each one (the storing needs
            // the cores). An event after a quiet spell is read at once.
            let busy = last_read.elapsed() < GATHER;
            last_read = Instant::now();
            let Some(store) = store.upgrade() else { return };
            for s in seen {
                match s {
                    Seen::Object(id, appeared) => store.learn(&id, appeared),
                    Seen::Dir(b) => {
                        if let Err(e) = self.add_dir(b)
                            && !std::mem::replace(&mut self.warned, true)
                        {
                            // Once: it fails alike for every directory
                            // after (most often fs.inotify.max_user_watches).
                            tracing::warn!(
                                error = %e,
                                dir = %dir_path(&self.objects, b).display(),
                                "cannot watch an objects directory (raise \
                                 fs.inotify.max_user_watches?): objects other processes \
                                 store there are not counted against this daemon's \
                                 --cache-size"
                            );
                        }
                        store.learn_dir(b);
                    }
                    Seen::Overflow => store.rescan(),
                }
            }
            if store.over_bound() {
                let since = *over_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= QUIET_AT_MOST {
                    store.evict_to_bound();
                    over_since = None;
                }
            } else {
                over_since = None;
            }
            drop(store);
            if busy {
                std::thread::sleep(GATHER);
            }
        }
    }

    /// Reads one batch of events.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<Vec<Seen>> {
        let events = loop {
            match self.inotify.read_events(buf) {
                Ok(ev) => break ev,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Vec::new()),
                Err(e) => return Err(e),
            }
        };
        let mut seen = Vec::new();
        for ev in events {
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                seen.push(Seen::Overflow);
                continue;
            }
            let Some(name) = ev.name else { continue };
            if ev.wd == self.top {
                if let Some(b) = dir_byte(name) {
                    seen.push(Seen::Dir(b));
                }
            } else if let Some(id) = self.dirs.get(&ev.wd).and_then(|&b| object_id(b, name)) {
                let appeared = ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO);
                seen.push(Seen::Object(id, appeared));
            }
        }
        Ok(seen)
    }
}

/// Waits until the inotify fd has events (`true`), at most `wait` (`None`:
/// for ever).
fn readable(inotify: &Inotify, wait: Option<Duration>) -> bool {
    let mut pfd = libc::pollfd {
        fd: inotify.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n >= 0 {
            return n > 0;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return true; // let the read report it
        }
    }
}

/// Directory `objects/<2 hex>` of byte `b`.
pub(crate) fn dir_path(objects: &Path, b: u8) -> PathBuf {
    objects.join(format!("{b:02x}"))
}

/// The byte a `<2 hex>` directory name stands for.
pub(crate) fn dir_byte(name: &OsStr) -> Option<u8> {
    let mut b = [0u8; 1];
    (name.len() == 2 && hex::decode_to_slice(name.as_bytes(), &mut b).is_ok()).then_some(b[0])
}

/// The object a `<62 hex>` file in directory `b` is.
pub(crate) fn object_id(b: u8, name: &OsStr) -> Option<ObjectId> {
    let mut id = [0u8; 32];
    id[0] = b;
    (name.len() == 62 && hex::decode_to_slice(name.as_bytes(), &mut id[1..]).is_ok()).then_some(id)
}
