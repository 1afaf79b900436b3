//! `outbox/`: the one writable part of the tree. Users copy a directory tree
//! to `outbox/<registry>/<namespace>/…/<image>/<tag>/`; it is staged on local
//! disk and, once it has settled, pushed as the one-layer image
//! `<registry>/<namespace>/…/<image>:<tag>` (module [`push`]).
//!
//! This module is the file-system model of the outbox: an inode table over
//! the staging directory, the path rules, and the status files. The FUSE
//! adapter routes every request for an outbox inode here; the registry tree
//! only hands over the `outbox` directory itself ([`Outbox::root_entry`]).
//!
//! ```text
//! <cache_dir>/outbox/                 mode 0700: staged files keep their modes and owners
//! ├── .lock                           flock: held by the one daemon serving this outbox
//! ├── tree/                           what users see as <mnt>/outbox/, exactly as written
//! │   └── <registry>/<repository…>/<tag>/…
//! ├── state/tag-<hash>.json           one per tag directory: the status file's content
//! ├── state/blob-homes.json           where each pushed layer lives (cross-repository mounts)
//! ├── state/outbox.json               staging errors and paths that cannot be pushed
//! └── tmp/                            layers being pushed (removed afterwards and at start)
//! ```
//!
//! Which directory is the tag. A path alone cannot say: in
//! `reg/ns/img/v1/etc/passwd`, `img`, `v1` and `etc` are all possible tags.
//! The rule: below `<registry>/`, directories made by plain `mkdir` that hold
//! only such directories are repository directories (namespaces and
//! images). The tag directory is the topmost directory at least two levels
//! below the registry that is something else: it holds a file, symlink,
//! device or a directory whose name is not a repository name, or its mode,
//! owner, times or extended attributes were set (what `cp -a`, `rsync -a`,
//! `tar -x` and `touch` do). That is decided when the outbox has settled and
//! then kept: from then on the directory is a tag (its status file appears
//! next to it), its parents are repository directories, and everything
//! inside it is the image. The metadata mark is kept as the extended
//! attribute `user.apt-layer.marked` on the staged directory (hidden from
//! users and from layers) so that a restart decides the same way.
//!
//! Path rules (errors users see): in `outbox/` only directories named like
//! a registry (`EINVAL` otherwise); in a registry directory only directories
//! named like a repository component; in a directory above a known tag only
//! directories named like a repository component or a tag. Names ending in
//! `.status` are reserved there for status files. Creating anything other
//! than a directory at those levels is `EPERM`. Moving a tag directory, or a
//! directory holding one, is `EXDEV` (so `mv` copies and removes), as is a
//! hard link between two tags. Removing a tag directory cancels its push.
//!
//! Status: `<tag>.status`, a read-only file next to each tag directory,
//! holds the tag's [`status::TagState`] as JSON: phase (pending, building,
//! pushing, pushed, failed), progress, the pushed manifest digest, the
//! error and when the next attempt starts.
//!
//! Inode numbers: `OUTBOX_BASE | st_ino` of the staged file (hard links
//! share an inode, numbers survive a restart); status files are
//! `OUTBOX_BASE | STATUS_BIT | n`. Each inode the kernel knows holds an
//! `O_PATH` descriptor of its staged file until the kernel forgets it, so
//! renames and hard links need no path bookkeeping.
//!
//! Locking: one `std::sync::Mutex` for the inode table and one for status
//! inode numbers, each held only to read or change the table. Staging I/O
//! is local and runs inline on the FUSE thread; nothing here waits for the
//! network.
//!
//! One daemon per outbox: the daemon holds an exclusive `flock` on
//! `.lock` while it runs (the kernel drops it if the daemon dies). A second
//! daemon on the same cache would push the same trees, blind to the writers
//! of the first (it could push a file still being written through the
//! other mount), so it is refused; `-o ro` shares the cache without an
//! outbox.
//!
//! Durability: staged data is in ordinary files under the cache directory
//! and survives a daemon restart (the tag decisions and push states too:
//! see [`push`]). Nothing staged is removed by the daemon.

pub mod layer;
pub mod push;
pub mod status;

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::model::{DirEntry, Entry, Kind, Stat};
use crate::registry::RegistryClient;
use crate::registry::name::{canonical_repo, is_registry, is_repo_component, is_tag};
use push::{FoundTag, Pusher, ScanResult, Touch, Unit};

/// First inode number of the outbox (the registry tree stays below 2^40,
/// rootfs trees below 2^62).
pub const OUTBOX_BASE: u64 = 1 << 62;
/// Marks status-file inode numbers within the outbox range.
const STATUS_BIT: u64 = 1 << 61;
/// The extended attribute that records "metadata was set here" on staged
/// directories that are not known tags yet.
const MARK_XATTR: &[u8] = b"user.apt-layer.marked";
/// Kernel cache time of outbox names and attributes (every change passes
/// through the daemon, so this only bounds staleness of status files,
/// which have none).
const TTL: Duration = Duration::from_secs(1);
/// Suffix of status files.
const STATUS_SUFFIX: &str = ".status";

/// What outbox operations fail with. Errno values are chosen in one place,
/// `fuse::errno`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboxError {
    /// A system call on the staging directory failed; users see its errno
    /// (`ENOSPC` for a full disk, `ENOENT`, `EEXIST`, `ENOTEMPTY` …).
    #[error("{op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Os {
        /// The operation.
        op: &'static str,
        /// The errno.
        errno: i32,
    },
    /// A name that is not allowed at this level of the outbox. `EINVAL`.
    #[error("invalid name {name:?}: {why}")]
    InvalidName {
        /// The name.
        name: String,
        /// What this level takes.
        why: &'static str,
    },
    /// Not allowed here (a file above the tag level, writing a status
    /// file, an own extended attribute). `EPERM`.
    #[error("not permitted: {0}")]
    NotPermitted(&'static str),
    /// A move or hard link that would cross tag directories, or move one.
    /// `EXDEV`.
    #[error("cross-tag operation: {0}")]
    CrossTag(&'static str),
    /// An inode the kernel should not have. `ESTALE`.
    #[error("stale inode {0}")]
    Stale(u64),
}

type Res<T> = Result<T, OutboxError>;

fn os(op: &'static str) -> OutboxError {
    OutboxError::Os {
        op,
        errno: std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    }
}

fn os_err(op: &'static str, e: &std::io::Error) -> OutboxError {
    OutboxError::Os {
        op,
        errno: e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Who asks (new files belong to them).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Attribute changes of a `setattr`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// New size (truncate).
    pub size: Option<u64>,
    /// Access time (`None`: keep; `Some(None)`: now).
    pub atime: Option<Option<SystemTime>>,
    /// Modification time (`None`: keep; `Some(None)`: now).
    pub mtime: Option<Option<SystemTime>>,
}

/// A staged file opened through the mount.
pub struct OpenedFile {
    file: File,
    unit: Unit,
    writable: bool,
    wrote: AtomicBool,
    /// Its path relative to the outbox root, for messages.
    rel: String,
}

impl Drop for OpenedFile {
    fn drop(&mut self) {
        if self.writable {
            self.unit.writer_closed(self.wrote.load(Relaxed));
        }
    }
}

/// What `open` gives.
pub enum Opened {
    /// A staged file.
    File(Arc<OpenedFile>),
    /// A status file's content.
    Status(bytes::Bytes),
}

/// File-system statistics of the staging disk.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Block size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

struct Inode {
    fd: Arc<OwnedFd>,
    nlookup: u64,
}

/// Where a directory is, by its path below the outbox root.
enum Place {
    /// `outbox/` itself.
    Root,
    /// `outbox/<registry>`.
    Registry,
    /// A repository-level directory, `depth` components below the registry.
    Repo {
        depth: usize,
        /// A known tag lies below it.
        above_tag: bool,
    },
    /// A tag directory or inside one.
    Tag,
}

/// The outbox model. See the module documentation.
pub struct Outbox {
    /// The staging root (canonical path).
    root: PathBuf,
    root_fd: Arc<OwnedFd>,
    root_st_ino: u64,
    inodes: Mutex<HashMap<u64, Inode>>,
    /// Status inode numbers ↔ tag paths.
    status_inos: Mutex<(HashMap<String, u64>, HashMap<u64, String>)>,
    pusher: Pusher,
    started: SystemTime,
    /// The outbox's `.lock`, held for the daemon's life.
    _lock: File,
}

/// Takes `base/.lock` for this process (see the module's "one daemon per
/// outbox"), waiting up to 5 s for a daemon that is exiting, and writes
/// its pid there for the next one's error message.
fn lock_outbox(base: &Path) -> std::io::Result<File> {
    use std::io::{Read, Seek, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(base.join(".lock"))?;
    // A daemon just unmounted may take a moment to exit (and let go).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    // SAFETY: a valid open fd; the lock goes with `f`.
    while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            // A filesystem without locks: serve, unguarded, rather than not.
            tracing::warn!(error = %e, dir = %base.display(), "cannot lock the outbox; a second daemon on this cache would not be refused");
            return Ok(f);
        }
        if std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let pid = pid.trim();
        let who = if pid.is_empty() {
            String::new()
        } else {
            format!(" (pid {pid})")
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!(
                "served by another apt-layer daemon{who}; give this mount another --cache-dir, \
                 or mount it with -o ro to share the cache without an outbox"
            ),
        ));
    }
    f.set_len(0)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// A repository path component as the outbox takes it.
fn is_outbox_component(n: &str) -> bool {
    is_repo_component(n) && !n.ends_with(STATUS_SUFFIX)
}

/// A tag as the outbox takes it.
fn is_outbox_tag(n: &str) -> bool {
    is_tag(n) && !n.ends_with(STATUS_SUFFIX)
}

fn cstr(name: &OsStr) -> Res<CString> {
    CString::new(name.as_bytes()).map_err(|_| OutboxError::InvalidName {
        name: name.to_string_lossy().into(),
        why: "a name cannot hold NUL",
    })
}

fn proc_path(fd: &OwnedFd) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

fn fstat(fd: &OwnedFd) -> Res<libc::stat> {
    // SAFETY: zeroed stat is valid; the fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(os("stat"));
    }
    Ok(st)
}

fn open_path_at(dir: &OwnedFd, name: &CString) -> Res<OwnedFd> {
    // SAFETY: valid fd and C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(os("lookup"));
    }
    // SAFETY: openat just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFCHR => Kind::CharDev,
        libc::S_IFBLK => Kind::BlockDev,
        libc::S_IFSOCK => Kind::Socket,
        _ => Kind::File,
    }
}

fn time_of(secs: i64, nsec: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn stat_of(st: &libc::stat) -> Stat {
    let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
    Stat {
        ino: OUTBOX_BASE | st.st_ino,
        kind: kind_of(st.st_mode),
        size: st.st_size as u64,
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12),
        mtime: time_of(st.st_mtime, st.st_mtime_nsec),
    }
}

fn entry(stat: Stat) -> Entry {
    Entry {
        stat,
        entry_ttl: TTL,
        attr_ttl: TTL,
    }
}

/// FUSE's device number encoding back to (major, minor).
fn decode_dev(rdev: u32) -> libc::dev_t {
    let major = (rdev >> 8) & 0xfff;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

fn timespec(t: Option<Option<SystemTime>>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(None) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(Some(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos() as i64;
                if nsec > 0 {
                    secs -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                libc::timespec {
                    tv_sec: secs as libc::time_t,
                    tv_nsec: nsec as libc::c_long,
                }
            }
        },
    }
}

impl Outbox {
    /// Opens (creating if needed) the outbox under `cache_dir` and its
    /// pusher, which pushes through `client` once trees have been quiet for
    /// `settle`. Call [`Outbox::start`] to begin pushing.
    pub fn load(
        cache_dir: &Path,
        client: RegistryClient,
        settle: Duration,
    ) -> std::io::Result<Arc<Outbox>> {
        use std::os::unix::fs::PermissionsExt;
        let base = cache_dir.join("outbox");
        std::fs::create_dir_all(&base)?;
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700))?;
        let lock = lock_outbox(&base)?;
        let tree = base.join("tree");
        if !tree.exists() {
            std::fs::create_dir(&tree)?;
            std::fs::set_permissions(&tree, std::fs::Permissions::from_mode(0o755))?;
        }
        let root = std::fs::canonicalize(&tree)?;
        let c = CString::new(root.as_os_str().as_bytes())?;
        // SAFETY: valid C string.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: open just returned it.
        let root_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let st = fstat(&root_fd).map_err(|e| std::io::Error::other(e.to_string()))?;
        let _ = crate::daemon::raise_fd_limit();
        let pusher = Pusher::open(
            client,
            &root,
            &base.join("state"),
            &base.join("tmp"),
            settle,
            Box::new(scan),
        )?;
        Ok(Arc::new(Outbox {
            root,
            root_fd,
            root_st_ino: st.st_ino,
            inodes: Mutex::new(HashMap::new()),
            status_inos: Mutex::new((HashMap::new(), HashMap::new())),
            pusher,
            started: SystemTime::now(),
            _lock: lock,
        }))
    }

    /// Starts pushing (the settle loop) on `rt`.
    pub fn start(&self, rt: &tokio::runtime::Handle) {
        self.pusher.start(rt);
    }

    /// Calls `f(registry, repository)` after each successful push.
    pub fn on_pushed(&self, f: push::PushedHook) {
        self.pusher.on_pushed(f);
    }

    /// Whether `ino` is an outbox inode.
    pub fn owns(ino: u64) -> bool {
        ino >= OUTBOX_BASE
    }

    /// Every tag's current state (for the daemon's log and tests).
    pub fn states(&self) -> Vec<status::TagState> {
        self.pusher.states()
    }

    fn root_ino(&self) -> u64 {
        OUTBOX_BASE | self.root_st_ino
    }

    /// The entry of `outbox/` (what the registry tree shows at the root).
    pub fn root_entry(&self) -> Entry {
        match fstat(&self.root_fd) {
            Ok(st) => entry(stat_of(&st)),
            Err(_) => entry(Stat {
                ino: self.root_ino(),
                kind: Kind::Dir,
                size: 0,
                perm: 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                mtime: self.started,
            }),
        }
    }

    // ----- inodes ------------------------------------------------------

    fn fd(&self, ino: u64) -> Res<Arc<OwnedFd>> {
        if ino == self.root_ino() {
            return Ok(self.root_fd.clone());
        }
        self.inodes
            .lock()
            .unwrap()
            .get(&(ino & !OUTBOX_BASE))
            .map(|i| i.fd.clone())
            .ok_or(OutboxError::Stale(ino))
    }

    /// Records one kernel lookup of the file behind `fd`.
    fn remember(&self, fd: OwnedFd, st: &libc::stat) -> Res<Entry> {
        if st.st_ino >= STATUS_BIT {
            return Err(OutboxError::Os {
                op: "inode number too large",
                errno: libc::EOVERFLOW,
            });
        }
        if st.st_ino != self.root_st_ino {
            let mut t = self.inodes.lock().unwrap();
            t.entry(st.st_ino)
                .and_modify(|i| i.nlookup += 1)
                .or_insert_with(|| Inode {
                    fd: Arc::new(fd),
                    nlookup: 1,
                });
        }
        Ok(entry(stat_of(st)))
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino & STATUS_BIT != 0 || ino == self.root_ino() {
            return;
        }
        let mut t = self.inodes.lock().unwrap();
        let key = ino & !OUTBOX_BASE;
        if let Some(i) = t.get_mut(&key) {
            i.nlookup = i.nlookup.saturating_sub(n);
            if i.nlookup == 0 {
                t.remove(&key);
            }
        }
    }

    /// The path of `fd` relative to the staging root ("" for the root).
    fn rel_of(&self, fd: &OwnedFd) -> Res<String> {
        let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| os_err("path", &e))?;
        let rel = p.strip_prefix(&self.root).map_err(|_| OutboxError::Os {
            op: "path outside the outbox",
            errno: libc::ESTALE,
        })?;
        Ok(rel.to_string_lossy().into_owned())
    }

    /// The directory (relative path) a non-directory `ino` is in, or the
    /// directory itself.
    fn unit_rel(&self, fd: &OwnedFd, st: &libc::stat) -> Res<String> {
        let rel = self.rel_of(fd)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Ok(rel);
        }
        Ok(match rel.rfind('/') {
            Some(i) => rel[..i].to_string(),
            None => String::new(),
        })
    }

    fn place(&self, rel: &str) -> Place {
        if rel.is_empty() {
            return Place::Root;
        }
        if self.pusher.tag_of(rel).is_some() {
            return Place::Tag;
        }
        let depth = rel.split('/').count() - 1;
        if depth == 0 {
            return Place::Registry;
        }
        Place::Repo {
            depth,
            above_tag: self.pusher.has_tag_below(rel),
        }
    }

    /// The path rules for a new `name` in directory `prel`.
    fn check_new(&self, prel: &str, name: &OsStr, is_dir: bool) -> Res<()> {
        let n = name.to_str().unwrap_or("");
        let invalid = |why| {
            Err(OutboxError::InvalidName {
                name: name.to_string_lossy().into(),
                why,
            })
        };
        match self.place(prel) {
            Place::Tag
            | Place::Repo {
                depth: 2..,
                above_tag: false,
            } => Ok(()),
            Place::Root if !is_dir => Err(OutboxError::NotPermitted(
                "outbox/ holds only registry directories",
            )),
            Place::Root if is_registry(n) => Ok(()),
            Place::Root => invalid(
                "outbox/ holds registry directories (a host with a '.' or ':port', or localhost)",
            ),
            _ if !is_dir => Err(OutboxError::NotPermitted(
                "files belong inside a tag directory: <registry>/<repository>/<tag>/",
            )),
            Place::Registry if is_outbox_component(n) => Ok(()),
            Place::Registry => invalid(
                "a registry directory holds repository names ([a-z0-9] with . _ __ - separators)",
            ),
            Place::Repo { .. } if is_outbox_component(n) || is_outbox_tag(n) => Ok(()),
            Place::Repo { .. } => invalid(
                "a repository directory holds repository names or tags (not ending in .status)",
            ),
        }
    }

    /// Marks directory `fd` as "metadata set" while it is not a known tag.
    fn mark_if_undecided(&self, fd: &OwnedFd, st: &libc::stat, rel: &str) {
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return;
        }
        if let Place::Repo {
            depth: 2..,
            above_tag: false,
        } = self.place(rel)
        {
            let name = CString::new(MARK_XATTR).expect("no NUL");
            // SAFETY: valid C strings and buffer.
            let r = unsafe {
                libc::setxattr(
                    proc_path(fd).as_ptr(),
                    name.as_ptr(),
                    b"1".as_ptr().cast(),
                    1,
                    0,
                )
            };
            if r != 0 {
                tracing::debug!(dir = rel, error = %std::io::Error::last_os_error(), "cannot mark outbox directory");
            }
        }
    }

    fn touch(&self, rel: &str, t: Touch) -> Unit {
        self.pusher.touch(rel, Some(t))
    }

    /// Reports `e` as a staging error of `unit` if it is a local disk failure.
    fn staging(&self, unit: &Unit, what: &str, e: OutboxError) -> OutboxError {
        if let OutboxError::Os { errno, .. } = &e
            && matches!(*errno, libc::ENOSPC | libc::EDQUOT | libc::EIO)
        {
            unit.staging_error(format!("{what}: {e}"));
        }
        e
    }

    // ----- status files --------------------------------------------------

    fn status_ino(&self, tag_path: &str) -> u64 {
        let mut m = self.status_inos.lock().unwrap();
        if let Some(&i) = m.0.get(tag_path) {
            return i;
        }
        let i = OUTBOX_BASE | STATUS_BIT | (m.0.len() as u64 + 1);
        m.0.insert(tag_path.to_string(), i);
        m.1.insert(i, tag_path.to_string());
        i
    }

    fn status_bytes(&self, ino: u64) -> Res<(String, Vec<u8>)> {
        let path = self
            .status_inos
            .lock()
            .unwrap()
            .1
            .get(&ino)
            .cloned()
            .ok_or(OutboxError::Stale(ino))?;
        let t = self
            .pusher
            .tag_of(&path)
            .filter(|t| t.path == path)
            .ok_or(OutboxError::Os {
                op: "status",
                errno: libc::ENOENT,
            })?;
        Ok((path, t.live_state().to_json()))
    }

    fn status_entry(&self, ino: u64) -> Res<Entry> {
        let (_, data) = self.status_bytes(ino)?;
        Ok(Entry {
            stat: Stat {
                ino,
                kind: Kind::File,
                size: data.len() as u64,
                perm: 0o444,
                nlink: 1,
                uid: 0,
                gid: 0,
                rdev: 0,
                mtime: SystemTime::now(),
            },
            entry_ttl: Duration::ZERO,
            attr_ttl: Duration::ZERO,
        })
    }

    /// The tag path whose status file `name` in directory `prel` is.
    fn status_name(&self, prel: &str, name: &OsStr) -> Option<String> {
        let stem = name.to_str()?.strip_suffix(STATUS_SUFFIX)?;
        if !is_outbox_tag(stem) || prel.is_empty() {
            return None;
        }
        let path = format!("{prel}/{stem}");
        self.pusher
            .tag_of(&path)
            .filter(|t| t.path == path)
            .map(|t| t.path.clone())
    }

    // ----- operations ------------------------------------------------------

    /// `lookup(parent, name)`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Res<Entry> {
        let pfd = self.fd(parent)?;
        let c = cstr(name)?;
        match open_path_at(&pfd, &c) {
            Ok(fd) => {
                let st = fstat(&fd)?;
                self.remember(fd, &st)
            }
            Err(e) => {
                let prel = self.rel_of(&pfd)?;
                match self.status_name(&prel, name) {
                    Some(tag) => self.status_entry(self.status_ino(&tag)),
                    None => Err(e),
                }
            }
        }
    }

    /// `getattr`.
    pub fn getattr(&self, ino: u64) -> Res<Entry> {
        if ino & STATUS_BIT != 0 {
            return self.status_entry(ino);
        }
        Ok(entry(stat_of(&fstat(&*self.fd(ino)?)?)))
    }

    /// `setattr`: owner first (it clears setuid/setgid), then size, mode
    /// and times, as a local file system applies them.
    pub fn setattr(&self, ino: u64, a: SetAttr, fh: Option<&OpenedFile>) -> Res<Entry> {
        if ino & STATUS_BIT != 0 {
            return Err(OutboxError::NotPermitted("status files are read-only"));
        }
        let fd = self.fd(ino)?;
        let st = fstat(&fd)?;
        let rel = self.unit_rel(&fd, &st)?;
        let unit = self.touch(&rel, Touch::Change);
        let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if a.uid.is_some() || a.gid.is_some() {
            // SAFETY: valid fd; -1 keeps an id.
            let r = unsafe {
                libc::fchownat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    a.uid.unwrap_or(u32::MAX),
                    a.gid.unwrap_or(u32::MAX),
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r != 0 {
                return Err(os("chown"));
            }
        }
        if let Some(size) = a.size {
            let r = match fh {
                Some(h) => h.file.set_len(size),
                None => std::fs::OpenOptions::new()
                    .write(true)
                    .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .and_then(|f| f.set_len(size)),
            };
            r.map_err(|e| self.staging(&unit, "truncate", os_err("truncate", &e)))?;
        }
        if let Some(mode) = a.mode {
            if is_link {
                return Err(OutboxError::Os {
                    op: "chmod",
                    errno: libc::EOPNOTSUPP,
                });
            }
            // SAFETY: valid C string.
            let r =
                unsafe { libc::chmod(proc_path(&fd).as_ptr(), (mode & 0o7777) as libc::mode_t) };
            if r != 0 {
                return Err(os("chmod"));
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            let ts = [timespec(a.atime), timespec(a.mtime)];
            // SAFETY: valid fd and array of two timespecs.
            let r = unsafe {
                libc::utimensat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    ts.as_ptr(),
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r != 0 {
                return Err(os("utimens"));
            }
        }
        self.mark_if_undecided(&fd, &st, &rel);
        self.getattr(ino)
    }

    /// `readlink`.
    pub fn readlink(&self, ino: u64) -> Res<Vec<u8>> {
        let fd = self.fd(ino)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: valid fd and buffer.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(os("readlink"));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Gives a new entry `name` in `pfd` to `caller` with permission bits
    /// `perm` (a setgid directory passes on its group, and to directories
    /// its setgid bit), then looks it up.
    fn finish_new(
        &self,
        pfd: &OwnedFd,
        name: &CString,
        caller: Caller,
        perm: Option<u32>,
    ) -> Res<Entry> {
        let pst = fstat(pfd)?;
        let mut gid = caller.gid;
        let mut perm = perm;
        if pst.st_mode & libc::S_ISGID != 0 {
            gid = pst.st_gid;
        }
        let fd = open_path_at(pfd, name)?;
        let st = fstat(&fd)?;
        if pst.st_mode & libc::S_ISGID != 0
            && st.st_mode & libc::S_IFMT == libc::S_IFDIR
            && let Some(p) = perm.as_mut()
        {
            *p |= libc::S_ISGID;
        }
        if (st.st_uid, st.st_gid) != (caller.uid, gid) {
            // SAFETY: valid fd.
            let r = unsafe {
                libc::fchownat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    caller.uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r != 0 && unsafe { libc::geteuid() } == 0 {
                return Err(os("chown"));
            }
        }
        if let Some(p) = perm {
            // SAFETY: valid C string.
            if unsafe { libc::chmod(proc_path(&fd).as_ptr(), p as libc::mode_t) } != 0 {
                return Err(os("chmod"));
            }
        }
        let st = fstat(&fd)?;
        self.remember(fd, &st)
    }

    fn new_entry_prologue(
        &self,
        parent: u64,
        name: &OsStr,
        is_dir: bool,
    ) -> Res<(Arc<OwnedFd>, CString, String)> {
        let pfd = self.fd(parent)?;
        let prel = self.rel_of(&pfd)?;
        if self.status_name(&prel, name).is_some() {
            return Err(OutboxError::Os {
                op: "create",
                errno: libc::EEXIST,
            });
        }
        self.check_new(&prel, name, is_dir)?;
        Ok((pfd, cstr(name)?, prel))
    }

    /// `mkdir`.
    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Res<Entry> {
        let (pfd, c, prel) = self.new_entry_prologue(parent, name, true)?;
        let unit = self.touch(&prel, Touch::Change);
        // SAFETY: valid fd and C string.
        if unsafe { libc::mkdirat(pfd.as_raw_fd(), c.as_ptr(), 0o700) } != 0 {
            return Err(self.staging(&unit, "mkdir", os("mkdir")));
        }
        self.finish_new(&pfd, &c, caller, Some(mode & 0o7777))
    }

    /// `mknod`: regular files, devices, fifos and sockets.
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Res<Entry> {
        let (pfd, c, prel) = self.new_entry_prologue(parent, name, false)?;
        let unit = self.touch(&prel, Touch::Change);
        let fmt = mode & libc::S_IFMT;
        // SAFETY: valid fd and C string.
        let r =
            unsafe { libc::mknodat(pfd.as_raw_fd(), c.as_ptr(), fmt | 0o600, decode_dev(rdev)) };
        if r != 0 {
            return Err(self.staging(&unit, "mknod", os("mknod")));
        }
        self.finish_new(&pfd, &c, caller, Some(mode & 0o7777))
    }

    /// `symlink`.
    pub fn symlink(&self, parent: u64, name: &OsStr, target: &Path, caller: Caller) -> Res<Entry> {
        let (pfd, c, prel) = self.new_entry_prologue(parent, name, false)?;
        let unit = self.touch(&prel, Touch::Change);
        let t = cstr(target.as_os_str())?;
        // SAFETY: valid C strings and fd.
        if unsafe { libc::symlinkat(t.as_ptr(), pfd.as_raw_fd(), c.as_ptr()) } != 0 {
            return Err(self.staging(&unit, "symlink", os("symlink")));
        }
        self.finish_new(&pfd, &c, caller, None)
    }

    /// `link`: a hard link, within one tag directory.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Res<Entry> {
        let fd = self.fd(ino)?;
        let st = fstat(&fd)?;
        let src_rel = self.unit_rel(&fd, &st)?;
        let (pfd, c, prel) = self.new_entry_prologue(newparent, newname, false)?;
        if !self.same_unit(&src_rel, &prel) {
            return Err(OutboxError::CrossTag(
                "hard links stay within one tag directory",
            ));
        }
        let unit = self.touch(&prel, Touch::Change);
        // SAFETY: valid C strings and fds.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                proc_path(&fd).as_ptr(),
                pfd.as_raw_fd(),
                c.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r != 0 {
            return Err(self.staging(&unit, "link", os("link")));
        }
        let nfd = open_path_at(&pfd, &c)?;
        let nst = fstat(&nfd)?;
        self.remember(nfd, &nst)
    }

    fn same_unit(&self, a: &str, b: &str) -> bool {
        match (self.pusher.tag_of(a), self.pusher.tag_of(b)) {
            (Some(x), Some(y)) => x.path == y.path,
            (None, None) => true,
            _ => false,
        }
    }

    /// `unlink`.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Res<()> {
        let pfd = self.fd(parent)?;
        let prel = self.rel_of(&pfd)?;
        if self.status_name(&prel, name).is_some() {
            return Err(OutboxError::NotPermitted("status files cannot be removed"));
        }
        let c = cstr(name)?;
        self.touch(&prel, Touch::Change);
        // SAFETY: valid fd and C string.
        if unsafe { libc::unlinkat(pfd.as_raw_fd(), c.as_ptr(), 0) } != 0 {
            return Err(os("unlink"));
        }
        Ok(())
    }

    /// `rmdir`; removing a tag directory cancels its push.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Res<()> {
        let pfd = self.fd(parent)?;
        let prel = self.rel_of(&pfd)?;
        let c = cstr(name)?;
        self.touch(&prel, Touch::Change);
        // SAFETY: valid fd and C string.
        if unsafe { libc::unlinkat(pfd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) } != 0 {
            return Err(os("rmdir"));
        }
        let rel = if prel.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{prel}/{}", name.to_string_lossy())
        };
        self.pusher.removed(&rel);
        Ok(())
    }

    /// `rename` (flags: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Res<()> {
        let pfd = self.fd(parent)?;
        let npfd = self.fd(newparent)?;
        let prel = self.rel_of(&pfd)?;
        let nprel = self.rel_of(&npfd)?;
        if self.status_name(&prel, name).is_some() || self.status_name(&nprel, newname).is_some() {
            return Err(OutboxError::NotPermitted("status files cannot be moved"));
        }
        let c = cstr(name)?;
        let nc = cstr(newname)?;
        let kind = |dir: &OwnedFd, n: &CString| -> Option<bool> {
            let fd = open_path_at(dir, n).ok()?;
            fstat(&fd)
                .ok()
                .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        };
        let join = |p: &str, n: &OsStr| {
            if p.is_empty() {
                n.to_string_lossy().into_owned()
            } else {
                format!("{p}/{}", n.to_string_lossy())
            }
        };
        let holds_tag = |rel: &str| {
            self.pusher.tag_of(rel).is_some_and(|t| t.path == rel) || self.pusher.has_tag_below(rel)
        };
        let src_dir = kind(&pfd, &c).ok_or(OutboxError::Os {
            op: "rename",
            errno: libc::ENOENT,
        })?;
        let (src_rel, dst_rel) = (join(&prel, name), join(&nprel, newname));
        if holds_tag(&src_rel) || holds_tag(&dst_rel) {
            return Err(OutboxError::CrossTag(
                "a tag directory, or one holding tags, cannot be moved or replaced",
            ));
        }
        self.check_new(&nprel, newname, src_dir)?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst_dir = kind(&npfd, &nc).unwrap_or(false);
            self.check_new(&prel, name, dst_dir)?;
        }
        self.touch(&prel, Touch::Change);
        let unit = self.touch(&nprel, Touch::Change);
        // SAFETY: valid fds and C strings.
        let r = unsafe {
            libc::renameat2(
                pfd.as_raw_fd(),
                c.as_ptr(),
                npfd.as_raw_fd(),
                nc.as_ptr(),
                flags,
            )
        };
        if r != 0 {
            return Err(self.staging(&unit, "rename", os("rename")));
        }
        Ok(())
    }

    /// `open` of a staged file or a status file.
    pub fn open(&self, ino: u64, flags: i32) -> Res<Opened> {
        let acc = flags & libc::O_ACCMODE;
        if ino & STATUS_BIT != 0 {
            if acc != libc::O_RDONLY {
                return Err(OutboxError::NotPermitted("status files are read-only"));
            }
            return Ok(Opened::Status(self.status_bytes(ino)?.1.into()));
        }
        let fd = self.fd(ino)?;
        let st = fstat(&fd)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(OutboxError::Os {
                op: "open",
                errno: libc::EISDIR,
            });
        }
        let writable = acc != libc::O_RDONLY;
        let keep = flags & (libc::O_SYNC | libc::O_DSYNC);
        let file = std::fs::OpenOptions::new()
            .read(acc != libc::O_WRONLY)
            .write(writable)
            .custom_flags(keep)
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| os_err("open", &e))?;
        let rel = self.rel_of(&fd)?;
        let dir = self.unit_rel(&fd, &st)?;
        let unit = if writable {
            self.touch(&dir, Touch::OpenWriter)
        } else {
            self.pusher.touch(&dir, None)
        };
        Ok(Opened::File(Arc::new(OpenedFile {
            file,
            unit,
            writable,
            wrote: AtomicBool::new(false),
            rel,
        })))
    }

    /// `create`: a new regular file, opened.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Res<(Entry, Arc<OpenedFile>)> {
        let (pfd, c, prel) = self.new_entry_prologue(parent, name, false)?;
        let acc = flags & libc::O_ACCMODE;
        let writable = acc != libc::O_RDONLY;
        let unit = self.touch(
            &prel,
            if writable {
                Touch::OpenWriter
            } else {
                Touch::Change
            },
        );
        // The writer was counted with the unit (see push's locking
        // contract); an error below uncounts it.
        let fail = |e: OutboxError| {
            if writable {
                unit.writer_closed(false);
            }
            e
        };
        let oflags = acc
            | libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | (flags & (libc::O_SYNC | libc::O_DSYNC));
        // SAFETY: valid fd and C string.
        let raw =
            unsafe { libc::openat(pfd.as_raw_fd(), c.as_ptr(), oflags, 0o600 as libc::c_uint) };
        let created = raw >= 0;
        let raw = if !created
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST)
            && flags & libc::O_EXCL == 0
        {
            // Created meanwhile by someone else: open it as it is.
            // SAFETY: as above.
            unsafe {
                libc::openat(
                    pfd.as_raw_fd(),
                    c.as_ptr(),
                    acc | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                )
            }
        } else {
            raw
        };
        if raw < 0 {
            return Err(fail(self.staging(&unit, "create", os("create"))));
        }
        // SAFETY: openat just returned it.
        let file = unsafe { File::from_raw_fd(raw) };
        let e = if created {
            self.finish_new(&pfd, &c, caller, Some(mode & 0o7777))
        } else {
            self.lookup(parent, name)
        }
        .map_err(fail)?;
        let opened = OpenedFile {
            file,
            unit: unit.clone(),
            writable,
            wrote: AtomicBool::new(false),
            rel: join_rel(&prel, name),
        };
        Ok((e, Arc::new(opened)))
    }

    /// `read` from an open staged file.
    pub fn read(&self, f: &OpenedFile, offset: u64, size: u32) -> Res<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(os_err("read", &e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// `write` to an open staged file.
    pub fn write(&self, f: &OpenedFile, offset: u64, data: &[u8]) -> Res<u32> {
        f.wrote.store(true, Relaxed);
        f.unit.changed();
        f.file.write_all_at(data, offset).map_err(|e| {
            self.staging(&f.unit, &format!("writing {}", f.rel), os_err("write", &e))
        })?;
        Ok(data.len() as u32)
    }

    /// `fsync` of an open staged file.
    pub fn fsync(&self, f: &OpenedFile, datasync: bool) -> Res<()> {
        let r = if datasync {
            f.file.sync_data()
        } else {
            f.file.sync_all()
        };
        r.map_err(|e| os_err("fsync", &e))
    }

    /// The listing of directory `ino` (names and kinds; readdirplus looks
    /// each one up).
    pub fn list(&self, ino: u64) -> Res<Vec<DirEntry>> {
        let fd = self.fd(ino)?;
        let rel = self.rel_of(&fd)?;
        let rd = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| os_err("opendir", &e))?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| os_err("readdir", &e))?;
            use std::os::unix::fs::DirEntryExt;
            let ft = e.file_type().map_err(|e| os_err("readdir", &e))?;
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_char_device() {
                Kind::CharDev
            } else if ft.is_block_device() {
                Kind::BlockDev
            } else if ft.is_socket() {
                Kind::Socket
            } else {
                Kind::File
            };
            out.push(DirEntry {
                name: e.file_name(),
                entry: entry(Stat {
                    ino: OUTBOX_BASE | e.ino(),
                    kind,
                    size: 0,
                    perm: 0,
                    nlink: 1,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    mtime: UNIX_EPOCH,
                }),
            });
        }
        if !rel.is_empty() {
            for t in self.pusher.tags_in(&rel) {
                let ino = self.status_ino(&t.path);
                out.push(DirEntry {
                    name: OsString::from(format!("{}{STATUS_SUFFIX}", t.tag_name())),
                    entry: entry(Stat {
                        ino,
                        kind: Kind::File,
                        size: 0,
                        perm: 0o444,
                        nlink: 1,
                        uid: 0,
                        gid: 0,
                        rdev: 0,
                        mtime: UNIX_EPOCH,
                    }),
                });
            }
        }
        out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Ok(out)
    }

    /// A path naming `ino` for the xattr system calls, and whether it is a
    /// symlink (then the l* calls on its real path; otherwise the
    /// following calls on `/proc/self/fd/N`).
    fn xattr_path(&self, ino: u64) -> Res<(CString, bool, Arc<OwnedFd>, libc::stat)> {
        let fd = self.fd(ino)?;
        let st = fstat(&fd)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|e| os_err("path", &e))?;
            let c = CString::new(p.into_os_string().into_vec()).expect("no NUL in a path");
            return Ok((c, true, fd, st));
        }
        Ok((proc_path(&fd), false, fd, st))
    }

    /// `getxattr` (the whole value).
    pub fn getxattr(&self, ino: u64, name: &OsStr) -> Res<Vec<u8>> {
        let nodata = OutboxError::Os {
            op: "getxattr",
            errno: libc::ENODATA,
        };
        if ino & STATUS_BIT != 0 || name.as_bytes().starts_with(layer::OWN_XATTR_PREFIX) {
            return Err(nodata);
        }
        let (p, link, _fd, _) = self.xattr_path(ino)?;
        let n = cstr(name)?;
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: valid C strings and buffer.
            let r = unsafe {
                if link {
                    libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                } else {
                    libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                }
            };
            if r >= 0 {
                buf.truncate(r as usize);
                return Ok(buf);
            }
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
                && buf.len() < 1 << 20
            {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            return Err(os("getxattr"));
        }
    }

    /// `listxattr`: NUL-terminated names, without apt-layer's own.
    pub fn listxattr(&self, ino: u64) -> Res<Vec<u8>> {
        if ino & STATUS_BIT != 0 {
            return Ok(Vec::new());
        }
        let (p, link, _fd, _) = self.xattr_path(ino)?;
        let mut buf = vec![0u8; 4096];
        let len = loop {
            // SAFETY: valid C string and buffer.
            let r = unsafe {
                if link {
                    libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                } else {
                    libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                }
            };
            if r >= 0 {
                break r as usize;
            }
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
                && buf.len() < 1 << 20
            {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            return Err(os("listxattr"));
        };
        let mut out = Vec::new();
        for n in buf[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if !n.starts_with(layer::OWN_XATTR_PREFIX) {
                out.extend_from_slice(n);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// `setxattr` (`flags`: `XATTR_CREATE`, `XATTR_REPLACE`).
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Res<()> {
        if ino & STATUS_BIT != 0 || name.as_bytes().starts_with(layer::OWN_XATTR_PREFIX) {
            return Err(OutboxError::NotPermitted("reserved extended attribute"));
        }
        let (p, link, fd, st) = self.xattr_path(ino)?;
        let rel = self.unit_rel(&fd, &st)?;
        let unit = self.touch(&rel, Touch::Change);
        let n = cstr(name)?;
        // SAFETY: valid C strings and buffer.
        let r = unsafe {
            if link {
                libc::lsetxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            } else {
                libc::setxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            }
        };
        if r != 0 {
            return Err(self.staging(&unit, "setxattr", os("setxattr")));
        }
        self.mark_if_undecided(&fd, &st, &rel);
        Ok(())
    }

    /// `removexattr`.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Res<()> {
        if ino & STATUS_BIT != 0 || name.as_bytes().starts_with(layer::OWN_XATTR_PREFIX) {
            return Err(OutboxError::Os {
                op: "removexattr",
                errno: libc::ENODATA,
            });
        }
        let (p, link, fd, st) = self.xattr_path(ino)?;
        let rel = self.unit_rel(&fd, &st)?;
        self.touch(&rel, Touch::Change);
        let n = cstr(name)?;
        // SAFETY: valid C strings.
        let r = unsafe {
            if link {
                libc::lremovexattr(p.as_ptr(), n.as_ptr())
            } else {
                libc::removexattr(p.as_ptr(), n.as_ptr())
            }
        };
        if r != 0 {
            return Err(os("removexattr"));
        }
        self.mark_if_undecided(&fd, &st, &rel);
        Ok(())
    }

    /// `statfs` of the staging disk.
    pub fn statfs(&self) -> Res<StatFs> {
        // SAFETY: zeroed statvfs is valid; valid fd.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatvfs(self.root_fd.as_raw_fd(), &mut s) } != 0 {
            return Err(os("statfs"));
        }
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
        })
    }
}

fn join_rel(prel: &str, name: &OsStr) -> String {
    if prel.is_empty() {
        name.to_string_lossy().into_owned()
    } else {
        format!("{prel}/{}", name.to_string_lossy())
    }
}

impl push::TagUnit {
    /// The tag directory's own name.
    pub fn tag_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

// ----- deciding tag directories ---------------------------------------------

fn sorted_children(dir: &Path) -> Vec<(OsString, std::fs::FileType)> {
    let mut v: Vec<(OsString, std::fs::FileType)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| Some((e.file_name(), e.file_type().ok()?)))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    v
}

/// Whether `dir` (named `name`) is "something else" than a repository
/// directory (see the module documentation).
/// A directory whose name can only be a tag counts once it holds
/// something: `mkdir …/Latest` alone pushes nothing.
fn is_content(dir: &Path, name: &str) -> bool {
    if xattr_present(dir, MARK_XATTR) {
        return true;
    }
    let children = sorted_children(dir);
    (!is_outbox_component(name) && !children.is_empty())
        || children
            .iter()
            .any(|(n, ft)| !ft.is_dir() || !n.to_str().is_some_and(is_outbox_component))
}

fn xattr_present(p: &Path, name: &[u8]) -> bool {
    let (Ok(c), Ok(n)) = (CString::new(p.as_os_str().as_bytes()), CString::new(name)) else {
        return false;
    };
    // SAFETY: valid C strings; a null buffer asks for the size.
    unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) >= 0 }
}

/// Finds the tag directories of the staged tree under `root` that are not
/// in `known` yet (see the module documentation for the rule).
pub fn scan(root: &Path, known: &BTreeSet<String>) -> ScanResult {
    let mut r = ScanResult::default();
    for (reg, ft) in sorted_children(root) {
        let reg = reg.to_string_lossy().into_owned();
        if !ft.is_dir() || !is_registry(&reg) {
            r.unpushable.push((reg, "not a registry directory".into()));
            continue;
        }
        scan_dir(&root.join(&reg), &reg, &[], known, &mut r);
    }
    r
}

fn has_known_below(known: &BTreeSet<String>, rel: &str) -> bool {
    let prefix = format!("{rel}/");
    known
        .range(prefix.clone()..)
        .next()
        .is_some_and(|k| k.starts_with(&prefix))
}

fn scan_dir(
    dir: &Path,
    registry: &str,
    comps: &[String],
    known: &BTreeSet<String>,
    r: &mut ScanResult,
) {
    let rel = std::iter::once(registry.to_string())
        .chain(comps.iter().cloned())
        .collect::<Vec<_>>()
        .join("/");
    for (name, ft) in sorted_children(dir) {
        let name = name.to_string_lossy().into_owned();
        let child_rel = format!("{rel}/{name}");
        if !ft.is_dir() {
            r.unpushable
                .push((child_rel, "a file above the tag level".into()));
            continue;
        }
        if known.contains(&child_rel) {
            continue;
        }
        let depth = comps.len() + 1;
        let path = dir.join(&name);
        if depth >= 2 && !has_known_below(known, &child_rel) && is_content(&path, &name) {
            if is_outbox_tag(&name) && comps.iter().all(|c| is_outbox_component(c)) {
                let repo = canonical_repo(registry, &comps.join("/"));
                r.tags.push(FoundTag {
                    path: child_rel,
                    registry: registry.to_string(),
                    repo,
                    tag: name,
                });
            } else {
                r.unpushable.push((
                    child_rel,
                    "holds an image but its name is not a valid tag".into(),
                ));
            }
            continue;
        }
        if !is_outbox_component(&name) {
            if depth < 2 || !is_outbox_tag(&name) {
                r.unpushable
                    .push((child_rel, "not a repository name".into()));
            }
            // else: an empty directory that can only become a tag.
            continue;
        }
        let mut next = comps.to_vec();
        next.push(name);
        scan_dir(&path, registry, &next, known, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_the_topmost_content_directory() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        // cp -a TREE reg/ns/img/v1: v1 holds dirs only, but cp set its mode.
        std::fs::create_dir_all(r.join("r.io/ns/img/v1/bin")).unwrap();
        std::fs::write(r.join("r.io/ns/img/v1/bin/sh"), b"x").unwrap();
        let c = CString::new(r.join("r.io/ns/img/v1").as_os_str().as_bytes()).unwrap();
        let n = CString::new(MARK_XATTR).unwrap();
        assert_eq!(
            unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), b"1".as_ptr().cast(), 1, 0) },
            0
        );
        // A file straight in the tag directory.
        std::fs::create_dir_all(r.join("r.io/app/latest")).unwrap();
        std::fs::write(r.join("r.io/app/latest/f"), b"x").unwrap();
        // Plain mkdir -p without content: nothing to push, even when the
        // name can only be a tag.
        std::fs::create_dir_all(r.join("r.io/empty/v1")).unwrap();
        std::fs::create_dir_all(r.join("r.io/empty/Latest")).unwrap();
        let found = scan(r, &BTreeSet::new());
        assert!(found.unpushable.is_empty(), "{:?}", found.unpushable);
        let tags: Vec<(&str, &str, &str)> = found
            .tags
            .iter()
            .map(|t| (t.path.as_str(), t.repo.as_str(), t.tag.as_str()))
            .collect();
        assert_eq!(
            tags,
            vec![
                ("r.io/app/latest", "app", "latest"),
                ("r.io/ns/img/v1", "ns/img", "v1")
            ]
        );
        // Known tags are skipped, and their parents never become tags.
        let known: BTreeSet<String> = ["r.io/ns/img/v1".to_string()].into();
        std::fs::create_dir_all(r.join("r.io/ns/img/v2/x")).unwrap();
        std::fs::write(r.join("r.io/ns/img/v2/x/f"), b"x").unwrap();
        let found = scan(r, &known);
        let paths: Vec<&str> = found.tags.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, vec!["r.io/app/latest", "r.io/ns/img/v2/x"]);
    }

    #[test]
    fn names() {
        assert!(is_outbox_component("img"));
        assert!(!is_outbox_component("v1.status"));
        assert!(is_outbox_tag("V1"));
        assert!(!is_outbox_tag("v1.status"));
        assert_eq!(decode_dev(((8 & 0xfff) << 8) | 1), libc::makedev(8, 1));
    }
}
