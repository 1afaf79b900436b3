//! The kernel adapter. Each callback decodes its arguments, calls the model,
//! and replies; nothing else lives here.
//!
//! Never block an event loop: a model call is polled once on the FUSE
//! thread (answers that are in memory complete right there); if it would
//! wait (network, disk), the future moves to the tokio runtime, which replies
//! when it is done. Replies are `Send + 'static`, so that is safe.
//!
//! Handles: directory listings are snapshotted once per handle (at
//! `opendir`; below `rootfs/` at the first `readdir`, see `opendir`) and file
//! contents at `open`, so readers see one consistent version even if a tag
//! moves meanwhile.
//!
//! Passthrough: a complete object is opened with a backing id, so the
//! kernel reads the object file itself. The kernel takes one backing file
//! per inode while any open of it lives, so later opens share it
//! (`shared_backing`), but only while it still holds the verified bytes:
//! an object damaged on disk while open is never handed to a later open.
//! A released passthrough open is kept for the file's next open
//! (module `kept`).
//!
//! Inodes at or above [`crate::outbox::OUTBOX_BASE`] belong to the writable outbox
//! ([`crate::outbox`]); every request for them goes there (local disk I/O,
//! answered inline). Writes anywhere else are `EROFS`.

pub mod errno;
mod kept;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::model::{Content, DirEntry, Entry, FsError, Kind, OpenFile, RootfsPlace, Stat, Tree};
use crate::outbox::{Caller, Opened, OpenedFile, Outbox, OutboxError, SetAttr};
use errno::{errno, outbox_errno};
use std::os::unix::fs::FileExt;

enum Handle {
    /// A directory: its entries once listed.
    Dir(Listing),
    /// An open file; the backing id (passthrough) must live until release.
    File(
        Arc<OpenFile>,
        #[allow(dead_code)] Option<Arc<fuser::BackingId>>,
    ),
    /// A staged outbox file.
    Outbox(Arc<OpenedFile>),
}

/// A directory handle's entries, listed once (at `opendir`, or at the first
/// `readdir` below `rootfs/`).
type Listing = Arc<tokio::sync::OnceCell<Arc<Vec<DirEntry>>>>;

fn listed(list: Vec<DirEntry>) -> Listing {
    Arc::new(tokio::sync::OnceCell::new_with(Some(Arc::new(list))))
}

/// A live passthrough backing of an inode, and the object file it reads.
struct Backing {
    id: std::sync::Weak<fuser::BackingId>,
    file: std::sync::Weak<std::fs::File>,
}

/// The FUSE filesystem: a model plus the runtime that runs its waits.
pub struct Fs {
    tree: Arc<Tree>,
    rt: tokio::runtime::Handle,
    handles: Arc<Mutex<HashMap<u64, Handle>>>,
    next_fh: AtomicU64,
    /// The kernel reads local objects directly (FUSE passthrough, ≥ 6.9).
    passthrough: bool,
    /// The kernel allows one backing file per inode at a time: opens of an
    /// inode share its backing id while any of them is open.
    backings: Arc<Mutex<HashMap<u64, Backing>>>,
    /// Whether passthrough may be used at all (mount option).
    allow_passthrough: bool,
    /// The writable outbox, when mounted with one.
    outbox: Option<Arc<Outbox>>,
    /// Released passthrough opens of rootfs files, for their next open
    /// (module `kept`); `None` when the descriptor limit is too low.
    kept: Option<Arc<Mutex<kept::KeptOpens>>>,
}

impl Fs {
    /// Turns FUSE passthrough off (on by default where the kernel has it).
    pub fn without_passthrough(mut self) -> Fs {
        self.allow_passthrough = false;
        self
    }

    /// Keeps released opens of rootfs files for their next open (module
    /// `kept`), as many as a quarter of `fd_limit`, the process's
    /// descriptor limit, allows (none if that is too few).
    pub fn with_kept_opens(mut self, fd_limit: u64) -> Fs {
        let kept = kept::KeptOpens::for_fd_limit(fd_limit).map(|k| Arc::new(Mutex::new(k)));
        if let Some(k) = &kept {
            let k = k.clone();
            self.tree
                .on_objects_unlinked(move |ids| k.lock().unwrap().forget_objects(ids));
        }
        self.kept = kept;
        self
    }

    /// Routes the outbox's inodes to `outbox`.
    pub fn with_outbox(mut self, outbox: Arc<Outbox>) -> Fs {
        self.outbox = Some(outbox);
        self
    }

    /// The outbox, if `ino` is one of its inodes.
    fn ob(&self, ino: INodeNo) -> Option<&Arc<Outbox>> {
        self.outbox.as_ref().filter(|_| Outbox::owns(ino.0))
    }

    /// Stores an open handle and returns its number.
    fn put_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, h);
        fh
    }

    fn outbox_file(&self, fh: FileHandle) -> Option<Arc<OpenedFile>> {
        match self.handles.lock().unwrap().get(&fh.0) {
            Some(Handle::Outbox(f)) => Some(f.clone()),
            _ => None,
        }
    }

    /// Runs an outbox change that answers with nothing; `EROFS` outside
    /// the outbox.
    fn outbox_change(
        &self,
        ino: INodeNo,
        reply: ReplyEmpty,
        change: impl FnOnce(&Outbox) -> Result<(), OutboxError>,
    ) {
        match self.ob(ino).map(|ob| change(ob)) {
            Some(Ok(())) => reply.ok(),
            Some(Err(e)) => reply.error(outbox_errno(&e)),
            None => reply.error(errno(&FsError::ReadOnly)),
        }
    }

    /// Runs an outbox change that makes an entry; `EROFS` outside the
    /// outbox.
    fn outbox_make(
        &self,
        parent: INodeNo,
        reply: ReplyEntry,
        make: impl FnOnce(&Outbox) -> Result<Entry, OutboxError>,
    ) {
        match self.ob(parent).map(|ob| make(ob)) {
            Some(Ok(e)) => reply_entry(reply, &e),
            Some(Err(e)) => reply.error(outbox_errno(&e)),
            None => reply.error(errno(&FsError::ReadOnly)),
        }
    }

    /// Serves `tree`, running slow work on `rt`.
    pub fn new(tree: Arc<Tree>, rt: tokio::runtime::Handle) -> Fs {
        Fs {
            kept: None,
            tree,
            rt,
            handles: Arc::new(Mutex::new(HashMap::new())),
            next_fh: AtomicU64::new(1),
            passthrough: false,
            backings: Arc::new(Mutex::new(HashMap::new())),
            allow_passthrough: true,
            outbox: None,
        }
    }

    /// Polls `fut` once here; if it is not done, hands it to the runtime.
    fn run<F: Future<Output = ()> + Send + 'static>(&self, fut: F) {
        let _enter = self.rt.enter();
        let mut fut = Box::pin(fut);
        if fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) == Poll::Pending {
            self.rt.spawn(fut);
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

fn attr(s: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(s.ino),
        size: s.size,
        blocks: s.size.div_ceil(512),
        atime: s.mtime,
        mtime: s.mtime,
        ctime: s.mtime,
        crtime: s.mtime,
        kind: file_type(s.kind),
        perm: s.perm,
        nlink: s.nlink,
        uid: s.uid,
        gid: s.gid,
        rdev: s.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// xattr replies: the size when asked with 0, else the data if it fits.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

fn reply_entry(reply: ReplyEntry, e: &Entry) {
    reply.entry_with_ttls(&e.attr_ttl, &e.entry_ttl, &attr(&e.stat), Generation(0));
}

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_ASYNC_READ;
        if let Err(unsupported) = config.add_capabilities(wanted) {
            tracing::debug!(?unsupported, "kernel lacks some FUSE capabilities");
        }
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        if self.allow_passthrough
            && config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.passthrough = true;
        }
        tracing::info!(passthrough = self.passthrough, "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Some(ob) = self.ob(parent) {
            return match ob.lookup(parent.0, name) {
                Ok(e) => reply_entry(reply, &e),
                Err(e) => reply.error(outbox_errno(&e)),
            };
        }
        let (tree, name) = (self.tree.clone(), name.to_owned());
        self.run(async move {
            match tree.lookup(parent.0, &name).await {
                Ok(e) => reply_entry(reply, &e),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Some(ob) = self.ob(ino) {
            ob.forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(ob) = self.ob(ino) {
            return match ob.getattr(ino.0) {
                Ok(e) => reply.attr(&e.attr_ttl, &attr(&e.stat)),
                Err(e) => reply.error(outbox_errno(&e)),
            };
        }
        let tree = self.tree.clone();
        self.run(async move {
            match tree.getattr(ino.0).await {
                Ok(e) => reply.attr(&e.attr_ttl, &attr(&e.stat)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// Below `rootfs/` the listing waits for the first `readdir`: it may
    /// wait for the image's layers, and an `opendir` must not. overlayfs
    /// opens a lower directory (for its attributes) while it copies it up,
    /// holding its upper filesystem's rename lock; every rename on that
    /// filesystem would wait for the layers too. `rootfs/` itself (never
    /// copied up) lists at `opendir`: its attributes are a placeholder until
    /// the tree is built, and `tar` compares the `fstat` it makes after
    /// opening a directory with the one after reading it.
    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if let Some(ob) = self.ob(ino) {
            return match ob.list(ino.0) {
                Ok(list) => {
                    let fh = self.put_handle(Handle::Dir(listed(list)));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(outbox_errno(&e)),
            };
        }
        let place = self.tree.rootfs_place(ino.0);
        // A rootfs directory never changes: the kernel may keep its listing
        // across opens (a second walk of the tree asks nothing of us).
        let flags = if place == RootfsPlace::Outside {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        };
        if place == RootfsPlace::Below {
            let fh = self.put_handle(Handle::Dir(Listing::default()));
            return reply.opened(FileHandle(fh), flags);
        }
        let (tree, handles) = (self.tree.clone(), self.handles.clone());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.run(async move {
            match tree.list(ino.0).await {
                Ok(list) => {
                    handles
                        .lock()
                        .unwrap()
                        .insert(fh, Handle::Dir(listed(list)));
                    reply.opened(FileHandle(fh), flags);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let Some(listing) = self.dir_handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        let tree = self.tree.clone();
        self.run(async move {
            match entries(&tree, ino, &listing).await {
                Ok(list) => fill_readdir(ino, list, offset, reply),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let Some(listing) = self.dir_handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        if let Some(ob) = self.ob(ino) {
            let list = listing.get().cloned().unwrap_or_default();
            return outbox_readdirplus(ob, ino, &list, offset, reply);
        }
        let tree = self.tree.clone();
        self.run(async move {
            match entries(&tree, ino, &listing).await {
                Ok(list) => fill_readdirplus(ino, list, offset, reply),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Some(ob) = self.ob(ino) {
            return match ob.open(ino.0, flags.0) {
                Ok(Opened::File(f)) => {
                    let fh = self.put_handle(Handle::Outbox(f));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Ok(Opened::Status(data)) => {
                    let f = OpenFile {
                        content: Content::Bytes(data),
                        keep_cache: false,
                        direct_io: true,
                        object: None,
                    };
                    let fh = self.put_handle(Handle::File(Arc::new(f), None));
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
                }
                Err(e) => reply.error(outbox_errno(&e)),
            };
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(errno(&FsError::ReadOnly));
        }
        // Opened before and still the verified object: its kept open and
        // backing id serve again, for one fstat.
        let kept = self.kept.as_ref().filter(|_| self.passthrough);
        if let Some(k) = kept.and_then(|k| k.lock().unwrap().take(ino.0))
            && let (Content::File(file), Some(object)) = (&k.file.content, &k.file.object)
            && self.tree.still_verified(ino.0, object, file)
        {
            let fh = self.put_handle(Handle::File(k.file.clone(), Some(k.id.clone())));
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &k.id);
        }
        let (tree, handles) = (self.tree.clone(), self.handles.clone());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let passthrough = self.passthrough;
        let backings = self.backings.clone();
        self.run(async move {
            match tree.open(ino.0).await {
                Ok(f) => {
                    // Read-only: nothing to flush on close, so spare every
                    // close() a round trip to the daemon.
                    let mut flags = FopenFlags::FOPEN_NOFLUSH;
                    if f.keep_cache {
                        flags |= FopenFlags::FOPEN_KEEP_CACHE;
                    }
                    if f.direct_io {
                        flags |= FopenFlags::FOPEN_DIRECT_IO;
                    }
                    // Complete local objects: let the kernel read the file itself.
                    let backing = match (&f.content, passthrough) {
                        (Content::File(file), true) => {
                            match shared_backing(&backings, ino.0, file).await {
                                Ok(id) => {
                                    id.or_else(|| new_backing(&backings, ino.0, file, &reply))
                                }
                                Err(e) => return reply.error(errno(&e)),
                            }
                        }
                        _ => None,
                    };
                    let f = Arc::new(f);
                    match backing {
                        Some(id) => {
                            // The kernel refuses KEEP_CACHE with passthrough
                            // (the backing file's page cache is used instead).
                            flags.remove(FopenFlags::FOPEN_KEEP_CACHE);
                            handles
                                .lock()
                                .unwrap()
                                .insert(fh, Handle::File(f, Some(id.clone())));
                            reply.opened_passthrough(FileHandle(fh), flags, &id);
                        }
                        None => {
                            handles.lock().unwrap().insert(fh, Handle::File(f, None));
                            reply.opened(FileHandle(fh), flags);
                        }
                    }
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let file = match self.handles.lock().unwrap().get(&fh.0) {
            Some(Handle::File(f, _)) => f.clone(),
            Some(Handle::Outbox(f)) => {
                let f = f.clone();
                let ob = self
                    .outbox
                    .as_ref()
                    .expect("outbox handles come from the outbox");
                return match ob.read(&f, offset, size) {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(outbox_errno(&e)),
                };
            }
            _ => return reply.error(Errno::EBADF),
        };
        match &file.content {
            Content::Bytes(data) => {
                let len = data.len() as u64;
                let start = offset.min(len) as usize;
                let end = (offset.saturating_add(size as u64)).min(len) as usize;
                reply.data(&data[start..end]);
            }
            Content::File(f) => {
                // A local, verified object: a pread is not network I/O.
                let mut buf = vec![0u8; size as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "reading object failed");
                            return reply.error(Errno::EIO);
                        }
                    }
                }
                reply.data(&buf[..got]);
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = self.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
        // A rootfs file read through passthrough: kept for its next open.
        if let (Some(Handle::File(f, Some(id))), Some(k)) = (h, &self.kept)
            && f.object.is_some()
        {
            k.lock()
                .unwrap()
                .keep(ino.0, f, id, std::time::Instant::now());
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        if let Some(ob) = self.ob(ino) {
            return match ob.readlink(ino.0) {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(outbox_errno(&e)),
            };
        }
        let tree = self.tree.clone();
        self.run(async move {
            match tree.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(FsError::NotFound) => reply.error(Errno::EINVAL),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if let Some(ob) = self.ob(ino) {
            return match ob.getxattr(ino.0, name) {
                Ok(v) => reply_xattr(reply, size, &v),
                Err(e) => reply.error(outbox_errno(&e)),
            };
        }
        let (tree, name) = (self.tree.clone(), name.as_encoded_bytes().to_vec());
        self.run(async move {
            match tree.xattrs(ino.0).await {
                Ok(x) => match x.iter().find(|(k, _)| *k == name) {
                    Some((_, v)) => reply_xattr(reply, size, v),
                    None => reply.error(Errno::ENODATA),
                },
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if let Some(ob) = self.ob(ino) {
            return match ob.listxattr(ino.0) {
                Ok(v) => reply_xattr(reply, size, &v),
                Err(e) => reply.error(outbox_errno(&e)),
            };
        }
        let tree = self.tree.clone();
        self.run(async move {
            match tree.xattrs(ino.0).await {
                Ok(x) => {
                    let mut names = Vec::new();
                    for (k, _) in &x {
                        names.extend_from_slice(k);
                        names.push(0);
                    }
                    reply_xattr(reply, size, &names);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        if let Some(ob) = self.ob(ino) {
            return match ob.statfs() {
                Ok(s) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                ),
                Err(e) => reply.error(outbox_errno(&e)),
            };
        }
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    // ----- writes: only outbox/ takes them -------------------------------

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(ob) = self.ob(ino) else {
            return reply.error(errno(&FsError::ReadOnly));
        };
        let time = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::SpecificTime(t) => Some(t),
                TimeOrNow::Now => None,
            })
        };
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time(atime),
            mtime: time(mtime),
        };
        let file = fh.and_then(|fh| self.outbox_file(fh));
        match ob.setattr(ino.0, a, file.as_deref()) {
            Ok(e) => reply.attr(&e.attr_ttl, &attr(&e.stat)),
            Err(e) => reply.error(outbox_errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.outbox_make(parent, reply, |ob| {
            ob.mknod(parent.0, name, mode, rdev, caller(req))
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.outbox_make(parent, reply, |ob| {
            ob.mkdir(parent.0, name, mode, caller(req))
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.outbox_change(parent, reply, |ob| ob.unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.outbox_change(parent, reply, |ob| ob.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.outbox_make(parent, reply, |ob| {
            ob.symlink(parent.0, name, target, caller(req))
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match (self.ob(parent), self.ob(newparent)) {
            (Some(ob), Some(_)) => {
                match ob.rename(parent.0, name, newparent.0, newname, flags.bits()) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(outbox_errno(&e)),
                }
            }
            // Into the outbox from the read-only tree: `mv` copies instead.
            (None, Some(_)) => reply.error(Errno::EXDEV),
            _ => reply.error(errno(&FsError::ReadOnly)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match (self.ob(ino), self.ob(newparent)) {
            (Some(ob), Some(_)) => match ob.link(ino.0, newparent.0, newname) {
                Ok(e) => reply_entry(reply, &e),
                Err(e) => reply.error(outbox_errno(&e)),
            },
            (None, Some(_)) => reply.error(Errno::EXDEV),
            _ => reply.error(errno(&FsError::ReadOnly)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (Some(f), Some(ob)) = (self.outbox_file(fh), self.outbox.as_ref()) else {
            return reply.error(errno(&FsError::ReadOnly));
        };
        match ob.write(&f, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(outbox_errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match (self.outbox_file(fh), self.outbox.as_ref()) {
            (Some(f), Some(ob)) => match ob.fsync(&f, datasync) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(outbox_errno(&e)),
            },
            _ => reply.ok(),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(ob) = self.ob(parent) else {
            return reply.error(errno(&FsError::ReadOnly));
        };
        match ob.create(parent.0, name, mode, flags, caller(req)) {
            Ok((e, f)) => {
                let fh = self.put_handle(Handle::Outbox(f));
                reply.created(
                    &e.entry_ttl,
                    &attr(&e.stat),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(outbox_errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.outbox_change(ino, reply, |ob| ob.setxattr(ino.0, name, value, flags));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.outbox_change(ino, reply, |ob| ob.removexattr(ino.0, name));
    }

    /// No file here is a terminal or device: every ioctl is
    /// "inappropriate". The kernel does not remember this one, and every
    /// `isatty()` sends it (Python's `open()` of any file here does), so it
    /// is answered without fuser's default warning in the log.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    // Not offered, quietly: after one ENOSYS the kernel remembers and does
    // the generic thing itself (SEEK_DATA/SEEK_HOLE over a file without
    // holes, poll as always ready, copy by read and write; fallocate gives
    // EOPNOTSUPP).

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        _flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }
}

/// The backing id of an open of `ino` that is still open, if any: the
/// kernel takes no other while it lives. It reads the object file that
/// was verified when it was made; if the object's file has changed since
/// (evicted and fetched again, or damaged on disk and replaced), it is
/// shared only if it still holds the same bytes as `file`, the one just
/// verified. Otherwise this open fails (`EIO`) until the others close.
async fn shared_backing(
    backings: &Mutex<HashMap<u64, Backing>>,
    ino: u64,
    file: &Arc<std::fs::File>,
) -> Result<Option<Arc<fuser::BackingId>>, FsError> {
    let live = backings
        .lock()
        .unwrap()
        .get(&ino)
        .and_then(|b| Some((b.id.upgrade()?, b.file.upgrade()?)));
    let Some((id, old)) = live else {
        return Ok(None);
    };
    if crate::cas::same_file(&old, file).unwrap_or(false) {
        return Ok(Some(id));
    }
    let (a, b) = (old.clone(), file.clone());
    let same = tokio::task::spawn_blocking(move || crate::cas::same_content(&a, &b))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match same {
        Ok(true) => Ok(Some(id)),
        Ok(false) => {
            tracing::error!(
                ino,
                "an object was damaged on disk while its file was open; other opens fail until it is closed"
            );
            Err(FsError::Io {
                reason: "object damaged while open".into(),
                no_space: false,
            })
        }
        Err(reason) => Err(FsError::Io {
            reason,
            no_space: false,
        }),
    }
}

/// A new backing id for `ino` reading `file` (or the one another open
/// made meanwhile); `None` if the kernel refuses passthrough for it.
fn new_backing(
    backings: &Mutex<HashMap<u64, Backing>>,
    ino: u64,
    file: &Arc<std::fs::File>,
    reply: &ReplyOpen,
) -> Option<Arc<fuser::BackingId>> {
    let mut map = backings.lock().unwrap();
    if let Some(id) = map.get(&ino).and_then(|b| b.id.upgrade()) {
        return Some(id);
    }
    match reply.open_backing(&**file) {
        Ok(id) => {
            let id = Arc::new(id);
            map.insert(
                ino,
                Backing {
                    id: Arc::downgrade(&id),
                    file: Arc::downgrade(file),
                },
            );
            Some(id)
        }
        Err(e) => {
            tracing::debug!(error = %e, "passthrough unavailable for this open");
            None
        }
    }
}

/// The caller of a request (new outbox files belong to them).
fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// The entries of a directory handle, listed now if they were not yet.
async fn entries<'a>(
    tree: &Tree,
    ino: INodeNo,
    listing: &'a Listing,
) -> Result<&'a Arc<Vec<DirEntry>>, FsError> {
    listing
        .get_or_try_init(|| async { tree.list(ino.0).await.map(Arc::new) })
        .await
}

/// Answers a `readdir` from `list`, from `offset` on.
fn fill_readdir(ino: INodeNo, list: &[DirEntry], offset: u64, mut reply: ReplyDirectory) {
    let dots = [
        (ino.0, FileType::Directory, OsStr::new(".")),
        (ino.0, FileType::Directory, OsStr::new("..")),
    ];
    let entries = dots.into_iter().chain(list.iter().map(|d| {
        (
            d.entry.stat.ino,
            file_type(d.entry.stat.kind),
            d.name.as_os_str(),
        )
    }));
    for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
        if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
            break;
        }
    }
    reply.ok();
}

/// Answers a `readdirplus` from `list`, from `offset` on.
fn fill_readdirplus(ino: INodeNo, list: &[DirEntry], offset: u64, mut reply: ReplyDirectoryPlus) {
    // "." and ".." carry no entry (the kernel ignores their attributes).
    let dot = Entry {
        stat: Stat::made_dir(ino.0, std::time::UNIX_EPOCH),
        entry_ttl: Duration::ZERO,
        attr_ttl: Duration::ZERO,
    };
    let dots = [(OsStr::new("."), dot), (OsStr::new(".."), dot)];
    let entries = dots
        .into_iter()
        .chain(list.iter().map(|d| (d.name.as_os_str(), d.entry)));
    for (i, (name, e)) in entries.enumerate().skip(offset as usize) {
        let ino = if i < 2 { ino.0 } else { e.stat.ino };
        let mut a = attr(&e.stat);
        a.ino = INodeNo(ino);
        // One TTL for the name and its attributes: the shorter, so that a
        // file whose size is not known yet (`image.cfs` before it is
        // built, `status`) is asked for again, as a lookup would be.
        if reply.add(
            INodeNo(ino),
            (i + 1) as u64,
            name,
            &e.entry_ttl.min(e.attr_ttl),
            &a,
            Generation(0),
        ) {
            break;
        }
    }
    reply.ok();
}

/// readdirplus of an outbox directory: each entry sent is a lookup the
/// kernel will forget later, so it is looked up (counted) as it is added,
/// and uncounted if the reply buffer was full.
fn outbox_readdirplus(
    ob: &Outbox,
    ino: INodeNo,
    list: &[DirEntry],
    offset: u64,
    mut reply: ReplyDirectoryPlus,
) {
    let dot = match ob.getattr(ino.0) {
        Ok(e) => e,
        Err(e) => return reply.error(outbox_errno(&e)),
    };
    for i in (offset as usize)..(list.len() + 2) {
        let full = if i < 2 {
            let name = if i == 0 { "." } else { ".." };
            reply.add(
                ino,
                (i + 1) as u64,
                name,
                &Duration::ZERO,
                &attr(&dot.stat),
                Generation(0),
            )
        } else {
            let d = &list[i - 2];
            let Ok(e) = ob.lookup(ino.0, &d.name) else {
                continue; // removed since opendir
            };
            let full = reply.add(
                INodeNo(e.stat.ino),
                (i + 1) as u64,
                &d.name,
                &e.entry_ttl,
                &attr(&e.stat),
                Generation(0),
            );
            if full {
                ob.forget(e.stat.ino, 1);
            }
            full
        };
        if full {
            break;
        }
    }
    reply.ok();
}

impl Fs {
    fn dir_handle(&self, fh: FileHandle) -> Option<Listing> {
        match self.handles.lock().unwrap().get(&fh.0) {
            Some(Handle::Dir(d)) => Some(d.clone()),
            _ => None,
        }
    }
}
