//! The rootfs operations of [`Tree`] while an image's tree is not built
//! yet: answered early from the layers streaming so far where they settle
//! the answer ([`crate::rootfs::early`] has the rules), else from the tree
//! that answers (its sketch once every layer is listed, or the built tree,
//! [`Rootfs::answering`]), with early inode numbers mapped to tree nodes by
//! path.

use std::sync::Arc;
use std::time::Duration;

use super::{Res, Tree, kind_of, mtime_of, rdev_of};
use crate::layer::{EntryKind, IndexEntry};
use crate::model::{Entry, FsError, Stat};
use crate::rootfs::Rootfs;
use crate::rootfs::early::{Answer, EARLY, Found, LiveLayer, resolve, resolve_found};
use crate::rootfs::merge::MergedTree;

/// The entry of early inode `i` showing layer entry `e`. Zero TTLs: the
/// kernel asks again, and gets the tree's answer once it is built.
fn early_entry(rf: &Rootfs, i: u32, e: &IndexEntry) -> Entry {
    let dev = matches!(e.kind, EntryKind::CharDev | EntryKind::BlockDev);
    Entry {
        stat: Stat {
            ino: rf.base + i as u64,
            kind: kind_of(e.kind),
            size: match e.kind {
                EntryKind::File => e.size,
                // As the tree (and lstat on disk) has it.
                EntryKind::Symlink => e.link.len() as u64,
                _ => 0,
            },
            perm: (e.mode & 0o7777) as u16,
            nlink: if e.kind == EntryKind::Dir { 2 } else { 1 },
            uid: e.uid,
            gid: e.gid,
            rdev: if dev { rdev_of(e.major, e.minor) } else { 0 },
            mtime: mtime_of(e.mtime, e.mtime_nsec),
        },
        entry_ttl: Duration::ZERO,
        attr_ttl: Duration::ZERO,
    }
}

impl Tree {
    /// Whether node `i` of `rf` may be answered early.
    fn early_on(&self, rf: &Rootfs, i: u32) -> bool {
        self.layers.early() && !rf.answers_from_tree() && (i == 0 || i >= EARLY)
    }

    /// Waits until `f` answers from the live layers (`Some`) or a tree
    /// answers (`None`: ask the tree; built, or sketched once every layer is
    /// listed), starting the build if needed. `f` returns `None` while
    /// unsettled.
    async fn settle<T>(
        &self,
        rf: &Arc<Rootfs>,
        f: impl Fn(&[Option<Arc<LiveLayer>>]) -> Option<T>,
    ) -> Res<Option<T>> {
        rf.start(&self.layers);
        let f = &f;
        self.layers
            .until(move || async move {
                if rf.answers_from_tree() {
                    return Some(Ok(None));
                }
                if let Some(e) = rf.build_error() {
                    return Some(Err(e));
                }
                if let Some(x) = f(&self.layers.live_views(&rf.image)) {
                    return Some(Ok(Some(x)));
                }
                rf.sketch_now(&self.layers).await.map(|_| Ok(None))
            })
            .await
    }

    /// `path` of early node `i` joined with `name`.
    fn early_path(rf: &Rootfs, i: u32, name: &[u8]) -> Option<Vec<u8>> {
        let mut p = rf.early.path(i)?;
        if !name.is_empty() {
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(name);
        }
        Some(p)
    }

    /// Node `i` (a tree node or an early inode) in the tree that answers
    /// ([`Rootfs::answering`]: built, or sketched).
    pub(super) async fn rootfs_node(
        &self,
        rf: &Arc<Rootfs>,
        i: u32,
    ) -> Res<(Arc<MergedTree>, u32)> {
        let tree = rf.answering(&self.layers).await?;
        let n = rf
            .early
            .to_tree(&tree, i)
            .ok_or(FsError::Stale(rf.base + i as u64))?;
        Ok((tree, n))
    }

    /// `lookup` in a rootfs directory.
    pub(super) async fn rootfs_lookup(&self, rf: &Arc<Rootfs>, pi: u32, name: &[u8]) -> Res<Entry> {
        if self.early_on(rf, pi) {
            let path = Self::early_path(rf, pi, name).ok_or(FsError::NotFound)?;
            match self.settle(rf, |v| resolve(v, &path)).await? {
                Some(Answer::Shows(f)) => {
                    let k = if f.entry.path != path && self.target_shows(rf, &f) {
                        rf.early.link(pi, name, &f.entry.path)
                    } else {
                        rf.early.child(pi, name)
                    };
                    return Ok(early_entry(rf, k, &f.entry));
                }
                Some(Answer::Absent) => return Err(FsError::NotFound),
                None => {}
            }
        }
        let (tree, p) = self.rootfs_node(rf, pi).await.map_err(|e| match e {
            FsError::Stale(_) => FsError::NotFound,
            e => e,
        })?;
        let c = tree.lookup(p, name).ok_or(FsError::NotFound)?;
        Self::rootfs_child_entry(rf, &tree, pi, name, c)
    }

    /// Whether `f`, found through a hard link, is also what its target's
    /// path shows now (an upper layer may have put another file there): then
    /// the link and the target are one inode early, as in the tree.
    fn target_shows(&self, rf: &Rootfs, f: &Found) -> bool {
        resolve_found(&self.layers.live_views(&rf.image), &f.entry.path)
            .is_some_and(|t| Arc::ptr_eq(&t.layer, &f.layer) && t.idx == f.idx)
    }

    /// The entry of child `c`, named `name`, of directory `d` (a tree node
    /// or an early inode) in the built tree: under the early number it was
    /// answered with while the image streamed, if it was, so the kernel's
    /// dentries stay valid; a hard-linked file with an early number shows it
    /// under every name; else the tree's number.
    pub(super) fn rootfs_child_entry(
        rf: &Rootfs,
        tree: &MergedTree,
        d: u32,
        name: &[u8],
        c: u32,
    ) -> Res<Entry> {
        let mut e = Self::rootfs_entry(rf, tree, c)?;
        let linked = || {
            let n = tree.node(c)?;
            (n.nlink > 1 && n.kind != EntryKind::Dir)
                .then(|| rf.early.of_tree_node(tree, c))
                .flatten()
        };
        if let Some(k) = rf.early.get(d, name).or_else(linked) {
            e.stat.ino = rf.base + k as u64;
        }
        Ok(e)
    }

    /// What `pick` makes of the entry early inode `i`'s path shows, once
    /// the live layers settle it; `None` when the answer has to come from
    /// the tree (not an early inode, early answers off, or the tree was
    /// built meanwhile, or `pick` declines).
    async fn early_answer<T>(
        &self,
        rf: &Arc<Rootfs>,
        i: u32,
        pick: impl Fn(Found) -> Option<T>,
    ) -> Res<Option<T>> {
        if i < EARLY || !self.early_on(rf, i) {
            return Ok(None);
        }
        let path = Self::early_path(rf, i, b"").ok_or(FsError::Stale(rf.base + i as u64))?;
        self.settle(rf, |v| pick(resolve_found(v, &path)?)).await
    }

    /// `getattr` of a rootfs node.
    pub(super) async fn rootfs_getattr(&self, rf: &Arc<Rootfs>, i: u32) -> Res<Entry> {
        if !rf.answers_from_tree() {
            if i == 0 {
                return Ok(self.rootfs_root_entry(rf, crate::model::IMMUTABLE_TTL));
            }
            let early = self.early_answer(rf, i, |f| Some(early_entry(rf, i, &f.entry)));
            if let Some(e) = early.await? {
                return Ok(e);
            }
        }
        let (tree, n) = self.rootfs_node(rf, i).await?;
        let mut e = Self::rootfs_entry(rf, &tree, n)?;
        // The kernel knows this inode by the number it was given.
        e.stat.ino = rf.base + i as u64;
        Ok(e)
    }

    /// The object of early file `i`, once the stream has stored it or it
    /// was extracted on demand (`None` when the answer has to come from
    /// the tree).
    pub(super) async fn early_object(
        &self,
        rf: &Arc<Rootfs>,
        i: u32,
    ) -> Res<Option<crate::cas::ObjectId>> {
        self.early_answer(rf, i, |f| match f.entry.kind {
            EntryKind::Dir => Some(Err(FsError::IsDir)),
            EntryKind::File => match f.entry.object {
                Some(id) => Some(Ok(id)),
                None => {
                    if let Some(x) = f.layer.want(f.idx) {
                        self.layers.extract_early(f.layer.clone(), f.idx, x);
                    }
                    None
                }
            },
            _ => None,
        })
        .await?
        .transpose()
    }

    /// The object of file node `n` of a sketch, once stored by the layer's
    /// storing pass or extracted on demand from its spill (asked for here);
    /// `None` when the answer has to come from the built tree.
    pub(super) async fn sketch_object(
        &self,
        rf: &Arc<Rootfs>,
        tree: &MergedTree,
        n: u32,
    ) -> Res<Option<crate::cas::ObjectId>> {
        // Of a layer indexed before: known.
        if let Some(f) = tree.node(n)
            && f.object != [0; 32]
        {
            return Ok(Some(f.object));
        }
        let Some((li, k)) = tree.origin(n) else {
            return Ok(None);
        };
        self.layers
            .until(move || async move {
                if rf.was_built() {
                    return Some(Ok(None));
                }
                if let Some(e) = rf.build_error() {
                    return Some(Err(e));
                }
                let views = self.layers.live_views(&rf.image);
                let layer = views.get(li as usize)?.as_ref()?;
                if let Some(id) = layer.object(k) {
                    return Some(Ok(Some(id)));
                }
                if let Some(x) = layer.want(k) {
                    self.layers.extract_early(layer.clone(), k, x);
                }
                None
            })
            .await
    }

    /// `readlink` of a rootfs node.
    pub(super) async fn rootfs_readlink(&self, rf: &Arc<Rootfs>, i: u32) -> Res<bytes::Bytes> {
        let early = self.early_answer(rf, i, |f| {
            (f.entry.kind == EntryKind::Symlink).then_some(f.entry.link)
        });
        if let Some(link) = early.await? {
            return Ok(bytes::Bytes::from(link));
        }
        let (tree, n) = self.rootfs_node(rf, i).await?;
        tree.readlink(n)
            .map(bytes::Bytes::copy_from_slice)
            .ok_or(FsError::NotFound)
    }

    /// Extended attributes of a rootfs node.
    pub(super) async fn rootfs_xattrs(
        &self,
        rf: &Arc<Rootfs>,
        i: u32,
    ) -> Res<Vec<(Vec<u8>, Vec<u8>)>> {
        if let Some(x) = self.early_answer(rf, i, |f| Some(f.entry.xattrs)).await? {
            return Ok(x);
        }
        // Like its attributes (`rootfs_getattr`), the root's extended
        // attributes are a placeholder until the tree is built: `ls -l
        // <tag>` asks for them, and looking at a tag must not stream it.
        if i == 0 && !rf.answers_from_tree() {
            return Ok(Vec::new());
        }
        let (tree, n) = self.rootfs_node(rf, i).await?;
        Ok(tree
            .xattrs(n)
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect())
    }
}
