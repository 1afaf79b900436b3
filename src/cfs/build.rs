//! Turning a [`MergedTree`] into an EROFS composefs image (format V1,
//! byte-compatible with `mkcomposefs --min-version=1`).
//!
//! The composefs tree is built from exactly the value `rootfs/` serves, not
//! with composefs-oci's `create_filesystem` (which empties `/run`, copies
//! `/usr`'s metadata onto `/`, drops xattrs and rounds mtimes): the mounted
//! image must equal `umoci unpack`, as `rootfs/` does.
//!
//! Regular files larger than [`INLINE_MAX`] bytes become overlay redirects
//! to `/<2 hex>/<62 hex>` in the data-only lower layer — our object store's
//! layout, objects named by their sha256. Without fs-verity
//! ([`Verity::Off`]) the metacopy xattr carries no digest
//! (`ExternalNoVerity`); with it ([`Verity::Digests`]) each redirect carries
//! the object's fs-verity digest so overlay can `verity=require`.
//! Smaller files are stored inline, read from the object store first.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use composefs::fsverity::{FsVerityHashValue, Sha256HashValue};
use composefs::generic_tree::{self, LeafId};
use composefs::tree::{Directory, FileSystem, Inode, LeafContent, RegularFile, Stat};

use super::CfsError;
use crate::cas::ObjectId;
use crate::layer::EntryKind;
use crate::rootfs::merge::{FNode, MergedTree};

/// Files up to this size are stored in the image itself (as composefs does).
pub const INLINE_MAX: u64 = 64;

/// Whether redirects carry fs-verity digests.
pub enum Verity<'a> {
    /// No digest: the objects' filesystem has no fs-verity (insecure mode).
    Off,
    /// The fs-verity digest of each external object (by sha256).
    Digests(&'a HashMap<ObjectId, Sha256HashValue>),
}

/// Objects of the small files whose bytes go into the image.
pub fn inline_objects(tree: &MergedTree) -> Vec<(ObjectId, u16, u64)> {
    let mut v: Vec<_> = tree
        .objects()
        .filter(|&(_, _, size)| size > 0 && size <= INLINE_MAX)
        .collect();
    v.sort_unstable();
    v.dedup_by_key(|o| o.0);
    v
}

/// Objects the kernel reads from `objects/` (one per distinct content).
pub fn external_objects(tree: &MergedTree) -> Vec<(ObjectId, u16, u64)> {
    let mut v: Vec<_> = tree
        .objects()
        .filter(|&(_, _, size)| size > INLINE_MAX)
        .collect();
    v.sort_unstable();
    v.dedup_by_key(|o| o.0);
    v
}

/// The EROFS image of `tree`. `inline` holds the bytes of every object
/// [`inline_objects`] names.
pub fn build_image(
    tree: &MergedTree,
    inline: &HashMap<ObjectId, Box<[u8]>>,
    verity: &Verity<'_>,
) -> Result<Vec<u8>, CfsError> {
    let root_node = tree
        .node(0)
        .ok_or_else(|| CfsError::Build("empty tree".into()))?;
    let mut b = Builder {
        tree,
        inline,
        verity,
        leaves: Vec::new(),
        leaf_of: HashMap::new(),
    };
    let root = b.dir(0, &root_node, 0)?;
    let fs: FileSystem<Sha256HashValue> = FileSystem {
        root,
        leaves: b.leaves,
    };
    let v = composefs::erofs::writer::ValidatedFileSystem::new(fs)
        .map_err(|e| CfsError::Build(format!("{e:#}")))?;
    Ok(composefs::erofs::writer::mkfs_erofs(&v).into_vec())
}

struct Builder<'a> {
    tree: &'a MergedTree,
    inline: &'a HashMap<ObjectId, Box<[u8]>>,
    verity: &'a Verity<'a>,
    leaves: Vec<composefs::tree::Leaf<Sha256HashValue>>,
    /// Merged-tree node → leaf, so hard links share one inode.
    leaf_of: HashMap<u32, LeafId>,
}

/// Deeper than any path the kernel accepts (PATH_MAX / 2).
const MAX_DEPTH: usize = 2048;

/// Longest name (of a file or an xattr) Linux and EROFS take.
const NAME_MAX: usize = 255;
/// Longest xattr value EROFS stores (its length field is 16 bits).
const XATTR_VALUE_MAX: usize = u16::MAX as usize;
/// Largest device numbers a Linux `dev_t` (and EROFS) holds.
const MAJOR_MAX: u32 = 0xfff;
const MINOR_MAX: u32 = 0xf_ffff;

impl Builder<'_> {
    /// The EROFS inode attributes of node `i`. What EROFS cannot hold (the
    /// writer would truncate it, or panic) is refused, never written.
    fn stat(&self, i: u32, n: &FNode) -> Result<Stat, CfsError> {
        let xattrs = self.tree.xattrs(i);
        if let Some((k, v)) = xattrs
            .iter()
            .find(|(k, v)| k.len() > NAME_MAX || v.len() > XATTR_VALUE_MAX)
        {
            return Err(CfsError::Build(format!(
                "node {i} has an xattr EROFS cannot hold ({} byte name {:?}, {} byte value)",
                k.len(),
                String::from_utf8_lossy(&k[..k.len().min(64)]),
                v.len()
            )));
        }
        Ok(Stat {
            st_mode: n.mode & 0o7777,
            st_uid: n.uid,
            st_gid: n.gid,
            st_mtim_sec: n.mtime,
            st_mtim_nsec: n.mtime_nsec,
            xattrs: xattrs
                .iter()
                .map(|(k, v)| (Box::<OsStr>::from(OsStr::from_bytes(k)), v.clone()))
                .collect(),
        })
    }

    fn dir(
        &mut self,
        i: u32,
        n: &FNode,
        depth: usize,
    ) -> Result<Directory<Sha256HashValue>, CfsError> {
        if depth > MAX_DEPTH {
            return Err(CfsError::Build("directories nested too deep".into()));
        }
        let mut d = Directory::new(self.stat(i, n)?);
        let tree = self.tree;
        for (name, c) in tree.children(i) {
            if name.len() > NAME_MAX {
                return Err(CfsError::Build(format!(
                    "a name of {} bytes (at most {NAME_MAX}): {:?}…",
                    name.len(),
                    String::from_utf8_lossy(&name[..64])
                )));
            }
            let cn = tree
                .node(c)
                .ok_or_else(|| CfsError::Build(format!("dangling node {c}")))?;
            let inode = if cn.kind == EntryKind::Dir {
                Inode::Directory(Box::new(self.dir(c, &cn, depth + 1)?))
            } else {
                Inode::leaf(self.leaf(c, &cn)?)
            };
            d.insert(OsStr::from_bytes(name), inode);
        }
        Ok(d)
    }

    fn leaf(&mut self, i: u32, n: &FNode) -> Result<LeafId, CfsError> {
        if let Some(&id) = self.leaf_of.get(&i) {
            return Ok(id);
        }
        if matches!(n.kind, EntryKind::CharDev | EntryKind::BlockDev)
            && (n.major > MAJOR_MAX || n.minor > MINOR_MAX)
        {
            return Err(CfsError::Build(format!(
                "node {i} is device {}:{}, beyond what Linux numbers",
                n.major, n.minor
            )));
        }
        let dev = || libc::makedev(n.major, n.minor);
        let content: LeafContent<Sha256HashValue> = match n.kind {
            EntryKind::File if n.size == 0 => {
                LeafContent::Regular(RegularFile::Inline(Box::new([])))
            }
            EntryKind::File if n.size <= INLINE_MAX => {
                let data = self.inline.get(&n.object).ok_or_else(|| {
                    CfsError::Build(format!(
                        "content of small object {} not read",
                        crate::cas::object_hex(&n.object)
                    ))
                })?;
                if data.len() as u64 != n.size {
                    return Err(CfsError::Build(format!(
                        "object {} has {} bytes, the tree says {}",
                        crate::cas::object_hex(&n.object),
                        data.len(),
                        n.size
                    )));
                }
                LeafContent::Regular(RegularFile::Inline(data.clone()))
            }
            EntryKind::File => {
                let sha = Sha256HashValue::from_hex(crate::cas::object_hex(&n.object))
                    .expect("32 bytes of hex");
                LeafContent::Regular(match self.verity {
                    // The redirect path is the object's name in our store
                    // (its sha256); no digest for overlay to check.
                    Verity::Off => RegularFile::ExternalNoVerity(sha, n.size),
                    Verity::Digests(d) => {
                        // composefs derives the redirect from the id it
                        // embeds, so with verity the objects must also be
                        // reachable under their fs-verity digest.
                        let v = d.get(&n.object).cloned().ok_or_else(|| {
                            CfsError::Build(format!(
                                "no fs-verity digest for {}",
                                crate::cas::object_hex(&n.object)
                            ))
                        })?;
                        RegularFile::External(v, n.size)
                    }
                })
            }
            EntryKind::Symlink => LeafContent::Symlink(Box::from(OsStr::from_bytes(
                self.tree.readlink(i).unwrap_or_default(),
            ))),
            EntryKind::CharDev => LeafContent::CharacterDevice(dev()),
            EntryKind::BlockDev => LeafContent::BlockDevice(dev()),
            EntryKind::Fifo => LeafContent::Fifo,
            EntryKind::Dir | EntryKind::Hardlink => {
                return Err(CfsError::Build(format!("node {i} is not a leaf")));
            }
        };
        let id = LeafId(self.leaves.len());
        self.leaves.push(generic_tree::Leaf {
            stat: self.stat(i, n)?,
            content,
        });
        self.leaf_of.insert(i, id);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{IndexEntry, LayerIndex};

    fn image_of(entries: Vec<IndexEntry>) -> Result<Vec<u8>, CfsError> {
        let layer = LayerIndex::of_entries(entries);
        let tree = MergedTree::build(&[&layer]).unwrap();
        build_image(&tree, &HashMap::new(), &Verity::Off)
    }

    fn dir(path: &str) -> IndexEntry {
        IndexEntry {
            mode: 0o755,
            ..IndexEntry::new(path, EntryKind::Dir)
        }
    }

    #[test]
    fn what_erofs_cannot_hold_is_refused_not_truncated() {
        assert!(image_of(vec![dir("a")]).is_ok());
        let with_xattr = |k: Vec<u8>, v: Vec<u8>| IndexEntry {
            xattrs: vec![(k, v)],
            ..dir("a")
        };
        assert!(image_of(vec![with_xattr(b"user.k".to_vec(), vec![7; 1000])]).is_ok());
        let long_value = image_of(vec![with_xattr(b"user.k".to_vec(), vec![7; 70_000])]);
        assert!(matches!(long_value, Err(CfsError::Build(ref m)) if m.contains("xattr")));
        let mut long_name = b"user.".to_vec();
        long_name.extend([b'n'; 300]);
        assert!(image_of(vec![with_xattr(long_name, b"v".to_vec())]).is_err());
        assert!(image_of(vec![dir(&"d".repeat(300))]).is_err());
        let dev = |major, minor| IndexEntry {
            mode: 0o600,
            major,
            minor,
            ..IndexEntry::new("dev", EntryKind::CharDev)
        };
        assert!(image_of(vec![dev(1, 3)]).is_ok());
        assert!(image_of(vec![dev(5000, 1)]).is_err());
        assert!(image_of(vec![dev(1, 0x10_0000)]).is_err());
    }
}
