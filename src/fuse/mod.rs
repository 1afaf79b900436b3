//! The kernel adapter. Each callback decodes its arguments, calls the model,
//! and replies; nothing else lives here.
//!
//! Never block an event loop: a model call is polled once on the FUSE
//! thread (answers that are in memory complete right there); if it would
//! wait (network, disk), the future moves to the tokio runtime, which replies
//! when it is done. Replies are `Send + 'static`, so that is safe.
//!
//! Handles: directory listings are snapshotted at `opendir` and file
//! contents at `open`, so readers see one consistent version even if a tag
//! moves meanwhile.

pub mod errno;

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

use crate::model::{Content, DirEntry, Entry, FsError, Kind, OpenFile, Stat, Tree};
use errno::errno;
use std::os::unix::fs::FileExt;

enum Handle {
    Dir(Arc<Vec<DirEntry>>),
    /// An open file; the backing id (passthrough) must live until release.
    File(
        Arc<OpenFile>,
        #[allow(dead_code)] Option<Arc<fuser::BackingId>>,
    ),
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
    backings: Arc<Mutex<HashMap<u64, std::sync::Weak<fuser::BackingId>>>>,
    /// Whether passthrough may be used at all (mount option).
    allow_passthrough: bool,
}

impl Fs {
    /// Turns FUSE passthrough off (on by default where the kernel has it).
    pub fn without_passthrough(mut self) -> Fs {
        self.allow_passthrough = false;
        self
    }

    /// Serves `tree`, running slow work on `rt`.
    pub fn new(tree: Arc<Tree>, rt: tokio::runtime::Handle) -> Fs {
        Fs {
            tree,
            rt,
            handles: Arc::new(Mutex::new(HashMap::new())),
            next_fh: AtomicU64::new(1),
            passthrough: false,
            backings: Arc::new(Mutex::new(HashMap::new())),
            allow_passthrough: true,
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
        let (tree, name) = (self.tree.clone(), name.to_owned());
        self.run(async move {
            match tree.lookup(parent.0, &name).await {
                Ok(e) => reply_entry(reply, &e),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let tree = self.tree.clone();
        self.run(async move {
            match tree.getattr(ino.0).await {
                Ok(e) => reply.attr(&e.attr_ttl, &attr(&e.stat)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let (tree, handles) = (self.tree.clone(), self.handles.clone());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.run(async move {
            match tree.list(ino.0).await {
                Ok(list) => {
                    handles
                        .lock()
                        .unwrap()
                        .insert(fh, Handle::Dir(Arc::new(list)));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
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
        mut reply: ReplyDirectory,
    ) {
        let Some(list) = self.dir_handle(fh) else {
            return reply.error(Errno::EBADF);
        };
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

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(list) = self.dir_handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        // "." and ".." carry no entry (the kernel ignores their attributes).
        let dot = Entry {
            stat: Stat {
                ino: ino.0,
                kind: Kind::Dir,
                size: 0,
                perm: 0o555,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                mtime: std::time::UNIX_EPOCH,
            },
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
            if reply.add(
                INodeNo(ino),
                (i + 1) as u64,
                name,
                &e.entry_ttl,
                &a,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
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
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(errno(&FsError::ReadOnly));
        }
        let (tree, handles) = (self.tree.clone(), self.handles.clone());
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let passthrough = self.passthrough;
        let backings = self.backings.clone();
        self.run(async move {
            match tree.open(ino.0).await {
                Ok(f) => {
                    let mut flags = FopenFlags::empty();
                    if f.keep_cache {
                        flags |= FopenFlags::FOPEN_KEEP_CACHE;
                    }
                    if f.direct_io {
                        flags |= FopenFlags::FOPEN_DIRECT_IO;
                    }
                    // Complete local objects: let the kernel read the file itself.
                    let backing = match (&f.content, passthrough) {
                        (Content::File(file), true) => {
                            let mut map = backings.lock().unwrap();
                            match map.get(&ino.0).and_then(std::sync::Weak::upgrade) {
                                Some(id) => Some(id),
                                None => match reply.open_backing(&**file) {
                                    Ok(id) => {
                                        let id = Arc::new(id);
                                        map.insert(ino.0, Arc::downgrade(&id));
                                        Some(id)
                                    }
                                    Err(e) => {
                                        tracing::debug!(error = %e, "passthrough unavailable for this open");
                                        None
                                    }
                                },
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
                            handles.lock().unwrap().insert(fh, Handle::File(f, Some(id.clone())));
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
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
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

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    // ----- writes: only outbox/ will take them --------------------------

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn symlink(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _l: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(&FsError::ReadOnly));
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&FsError::ReadOnly));
    }
}

impl Fs {
    fn dir_handle(&self, fh: FileHandle) -> Option<Arc<Vec<DirEntry>>> {
        match self.handles.lock().unwrap().get(&fh.0) {
            Some(Handle::Dir(d)) => Some(d.clone()),
            _ => None,
        }
    }
}
