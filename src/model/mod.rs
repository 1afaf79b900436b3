//! The tree users see, independent of FUSE: what each path is ([`node`]),
//! which image a tag or digest resolves to ([`image`]), and the operations
//! the kernel adapter calls ([`tree`]): lookup, getattr, list, open, read.
//!
//! Every operation is an `async fn` that completes without awaiting when the
//! answer is in memory, so the FUSE layer can answer inline and only hand
//! real network work to the runtime.

pub mod image;
pub mod node;
pub mod tree;

use std::time::{Duration, SystemTime};

pub use tree::{RootfsPlace, Tree};

use crate::registry::RegistryError;

/// Everything the model can fail with. The FUSE layer maps each variant to
/// an errno in one place (`fuse::errno`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    /// No such name here (bad syntax, unknown tag, a file this directory
    /// does not have). `ENOENT`.
    #[error("no such entry")]
    NotFound,
    /// The registry said something; its variant decides the errno.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The registry served something that is not a usable image (bad
    /// manifest structure, no platform for this host). `EIO`.
    #[error("bad image {image}: {reason}")]
    BadImage {
        /// Which image.
        image: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Write outside `outbox/`. `EROFS`.
    #[error("read-only file system")]
    ReadOnly,
    /// An operation that needs a directory got something else. `ENOTDIR`.
    #[error("not a directory")]
    NotDir,
    /// An operation that needs a file got a directory. `EISDIR`.
    #[error("is a directory")]
    IsDir,
    /// An inode number the kernel should not have. `ESTALE`.
    #[error("stale inode {0}")]
    Stale(u64),
    /// Local I/O failed (cache disk). `EIO`, or `ENOSPC` when `no_space`.
    #[error("local I/O error: {reason}")]
    Io {
        /// What failed.
        reason: String,
        /// The disk is full.
        no_space: bool,
    },
}

/// File types the tree has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
    /// Unix socket.
    Socket,
}

/// The attributes of one inode.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// Inode number.
    pub ino: u64,
    /// File type.
    pub kind: Kind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits including setuid/setgid/sticky.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Modification time (also used for ctime/atime).
    pub mtime: SystemTime,
}

impl Stat {
    /// A directory the daemon makes up (not from an image): root's,
    /// read-only, modified at `mtime`.
    pub fn made_dir(ino: u64, mtime: SystemTime) -> Stat {
        Stat {
            ino,
            kind: Kind::Dir,
            size: 0,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            mtime,
        }
    }
}

/// A lookup answer: attributes plus how long the kernel may trust the name
/// (`entry_ttl`) and the attributes (`attr_ttl`).
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Attributes.
    pub stat: Stat,
    /// How long the name → inode binding may be cached.
    pub entry_ttl: Duration,
    /// How long the attributes may be cached.
    pub attr_ttl: Duration,
}

/// One directory entry of a listing snapshot.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Name in the directory.
    pub name: std::ffi::OsString,
    /// Its entry (readdirplus gives the kernel the attributes too).
    pub entry: Entry,
}

/// Where an open file's bytes come from.
#[derive(Debug, Clone)]
pub enum Content {
    /// Held in memory (metadata and generated files).
    Bytes(bytes::Bytes),
    /// A verified object in the content store.
    File(std::sync::Arc<std::fs::File>),
}

/// An opened file.
#[derive(Debug, Clone)]
pub struct OpenFile {
    /// Contents.
    pub content: Content,
    /// Immutable content: the kernel may keep its page cache across opens.
    pub keep_cache: bool,
    /// Generated content whose size may differ from `getattr`: bypass the
    /// page cache so readers see exactly `data`.
    pub direct_io: bool,
    /// The content-store object a rootfs file reads (`content` is its
    /// verified file): the open may be kept and used again after its
    /// release while its image stays built and the object the one verified
    /// ([`Tree::still_verified`]).
    pub object: Option<crate::cas::ObjectId>,
}

/// How long immutable (digest-addressed) names and attributes are cached.
pub const IMMUTABLE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
