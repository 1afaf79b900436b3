//! Merging layer indexes into one tree with OCI semantics, the way `umoci
//! unpack` applies layers: bottom layer first; `.wh.<name>` removes a name
//! of a lower layer; `.wh..wh..opq` empties a directory of everything lower
//! layers put in it; a directory entry over an existing directory updates
//! its metadata and keeps its children; anything else replaces what was
//! there; a hard link names an existing node (also one of a lower layer).
//!
//! The result is frozen into a compact, immutable [`MergedTree`]: one
//! fixed-size node per inode, names in one arena, children of each
//! directory sorted for binary search. That keeps memory near 130 bytes an
//! entry, and lets rootfs/ and image.cfs come from the same value.

use std::collections::{BTreeMap, HashMap};

use crate::cas::ObjectId;
use crate::layer::{EntryKind, IndexEntry, LayerIndex};

/// An extended attribute: name, value.
pub type Xattr = (Box<[u8]>, Box<[u8]>);

/// One inode of the merged tree, as callers see it (built on access from
/// the compact node the tree stores).
#[derive(Debug, Clone)]
pub struct FNode {
    /// Entry type (never `Hardlink`: links share their target's node).
    pub kind: EntryKind,
    /// Index of the layer that provided the content (for refetching).
    pub layer: u16,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime seconds.
    pub mtime: i64,
    /// mtime nanoseconds.
    pub mtime_nsec: u32,
    /// Size (files: content; symlinks: target length).
    pub size: u64,
    /// Link count.
    pub nlink: u32,
    /// Device major.
    pub major: u32,
    /// Device minor.
    pub minor: u32,
    /// Content object (regular files).
    pub object: ObjectId,
}

/// What the tree keeps per inode: 72 bytes. Owner, mode and the xattr set
/// come from a table of the distinct (mode, uid, gid, xattrs) (an image has
/// few);
/// `a`/`b` are the children range (dirs), the target in the name arena
/// (symlinks) or the device numbers (devices).
#[derive(Debug, Clone)]
struct CNode {
    object: ObjectId,
    size: u64,
    mtime: i64,
    mtime_nsec: u32,
    nlink: u32,
    attr: u32,
    a: u32,
    b: u32,
    layer: u16,
    kind: EntryKind,
}

/// The merged, immutable tree. Node 0 is the root.
#[derive(Debug, Default)]
pub struct MergedTree {
    nodes: Vec<CNode>,
    /// Distinct (mode, uid, gid, xattr set: index + 1 into `xattrs`, or 0).
    attrs: Vec<(u32, u32, u32, u32)>,
    /// Children's names, back to back in `children` order: a name ends
    /// where the next child's begins.
    arena: Vec<u8>,
    /// Symlink targets.
    links: Vec<u8>,
    /// (name offset in `arena`, child node), per directory sorted by name.
    children: Vec<(u32, u32)>,
    xattrs: Vec<Vec<Xattr>>,
    /// A sketch only ([`MergedTree::sketch`]): per node, the number of the
    /// layer entry that made it (`u32::MAX` for implicit directories).
    origins: Vec<u32>,
}

/// Why layers could not be merged.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MergeError(pub String);

impl MergedTree {
    /// Number of nodes (inodes).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree has only its root... or nothing.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: u32) -> Option<FNode> {
        let n = self.nodes.get(i as usize)?;
        let (mode, uid, gid, _) = self.attrs[n.attr as usize];
        let dev = matches!(n.kind, EntryKind::CharDev | EntryKind::BlockDev);
        Some(FNode {
            kind: n.kind,
            layer: n.layer,
            mode,
            uid,
            gid,
            mtime: n.mtime,
            mtime_nsec: n.mtime_nsec,
            size: n.size,
            nlink: n.nlink,
            major: if dev { n.a } else { 0 },
            minor: if dev { n.b } else { 0 },
            object: n.object,
        })
    }

    fn cnode(&self, i: u32) -> Option<&CNode> {
        self.nodes.get(i as usize)
    }

    /// The name of `children[k]`.
    fn child_name(&self, k: usize) -> &[u8] {
        let start = self.children[k].0 as usize;
        let end = self
            .children
            .get(k + 1)
            .map_or(self.arena.len(), |c| c.0 as usize);
        &self.arena[start..end]
    }

    /// Children of directory `i`, sorted by name.
    pub fn children(&self, i: u32) -> impl Iterator<Item = (&[u8], u32)> + '_ {
        let (start, len) = match self.cnode(i) {
            Some(n) if n.kind == EntryKind::Dir => (n.a as usize, n.b as usize),
            _ => (0, 0),
        };
        (start..start + len).map(|k| (self.child_name(k), self.children[k].1))
    }

    /// The child `name` of directory `i`.
    pub fn lookup(&self, i: u32, name: &[u8]) -> Option<u32> {
        let n = self.cnode(i)?;
        if n.kind != EntryKind::Dir {
            return None;
        }
        let (mut lo, mut hi) = (n.a as usize, (n.a + n.b) as usize);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.child_name(mid).cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.children[mid].1),
            }
        }
        None
    }

    /// Symlink target of node `i`.
    pub fn readlink(&self, i: u32) -> Option<&[u8]> {
        let n = self.cnode(i)?;
        (n.kind == EntryKind::Symlink).then(|| &self.links[n.a as usize..(n.a + n.b) as usize])
    }

    /// Extended attributes of node `i`.
    pub fn xattrs(&self, i: u32) -> &[Xattr] {
        match self.cnode(i).map(|n| self.attrs[n.attr as usize].3) {
            Some(x) if x > 0 => &self.xattrs[x as usize - 1],
            _ => &[],
        }
    }

    /// Every regular file's object with the layer providing it (once per node).
    pub fn objects(&self) -> impl Iterator<Item = (ObjectId, u16, u64)> + '_ {
        self.nodes
            .iter()
            .filter(|n| n.kind == EntryKind::File)
            .map(|n| (n.object, n.layer, n.size))
    }

    /// Merges `layers` (bottom first).
    pub fn build(layers: &[&LayerIndex]) -> Result<MergedTree, MergeError> {
        let mut b = Builder::new(false);
        for (li, layer) in layers.iter().enumerate() {
            b.apply(li as u16, layer.entries.iter().enumerate())
                .map_err(|e| MergeError(format!("layer {}: {e}", layer.digest)))?;
        }
        Ok(b.freeze())
    }

    /// Merges the entries of layers whose contents may not all be stored
    /// yet (bottom first, each with its digest), leaving out those `shown`
    /// (given the layer's position) says no: the tree [`MergedTree::build`]
    /// makes of the same entries, with the same node numbers, except that a
    /// file's object may be unknown (all zeros). Each node remembers the
    /// entry that made it ([`MergedTree::origin`]), through which its
    /// content is found meanwhile.
    pub fn sketch(
        layers: &[(&str, &[IndexEntry])],
        shown: impl Fn(usize, &IndexEntry) -> bool,
    ) -> Result<MergedTree, MergeError> {
        let mut b = Builder::new(true);
        for (li, (digest, entries)) in layers.iter().enumerate() {
            let entries = entries.iter().enumerate().filter(|(_, e)| shown(li, e));
            b.apply(li as u16, entries)
                .map_err(|e| MergeError(format!("layer {digest}: {e}")))?;
        }
        Ok(b.freeze())
    }

    /// Whether this is a sketch ([`MergedTree::sketch`]).
    pub fn is_sketch(&self) -> bool {
        !self.origins.is_empty()
    }

    /// Of a sketch's file node `i`: the layer and the number of the entry
    /// (in that layer) whose content it shows.
    pub fn origin(&self, i: u32) -> Option<(u16, u32)> {
        let n = self.cnode(i).filter(|n| n.kind == EntryKind::File)?;
        let e = *self.origins.get(i as usize)?;
        (e != u32::MAX).then_some((n.layer, e))
    }
}

struct BNode {
    kind: EntryKind,
    layer: u16,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    size: u64,
    major: u32,
    minor: u32,
    link: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    object: Option<ObjectId>,
    /// The number of the entry (in `layer`) that made the node.
    entry: u32,
    /// name → (node, layer that put the name here)
    children: BTreeMap<Vec<u8>, (u32, u16)>,
}

impl BNode {
    fn implicit_dir(layer: u16) -> BNode {
        BNode {
            kind: EntryKind::Dir,
            layer,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            major: 0,
            minor: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            object: None,
            entry: u32::MAX,
            children: BTreeMap::new(),
        }
    }
}

struct Builder {
    nodes: Vec<BNode>,
    /// Sketching: files may have no object yet, and nodes keep their entry.
    sketch: bool,
}

const WH: &[u8] = b".wh.";
const OPQ: &[u8] = b".wh..wh..opq";

impl Builder {
    fn new(sketch: bool) -> Builder {
        Builder {
            nodes: vec![BNode::implicit_dir(0)],
            sketch,
        }
    }

    fn walk(&self, path: &[u8]) -> Option<u32> {
        let mut cur = 0u32;
        if path.is_empty() {
            return Some(0);
        }
        for c in path.split(|&b| b == b'/') {
            cur = self.nodes[cur as usize].children.get(c)?.0;
        }
        Some(cur)
    }

    /// The directory at `path`, creating missing (or replacing non-directory)
    /// components as implicit directories.
    fn ensure_dir(&mut self, path: &[u8], layer: u16) -> u32 {
        let mut cur = 0u32;
        if path.is_empty() {
            return 0;
        }
        for c in path.split(|&b| b == b'/') {
            let next = match self.nodes[cur as usize].children.get(c) {
                Some(&(n, _)) if self.nodes[n as usize].kind == EntryKind::Dir => n,
                _ => {
                    let n = self.nodes.len() as u32;
                    self.nodes.push(BNode::implicit_dir(layer));
                    self.nodes[cur as usize]
                        .children
                        .insert(c.to_vec(), (n, layer));
                    n
                }
            };
            cur = next;
        }
        cur
    }

    /// Applies layer `li`'s entries, each with its number in the layer.
    fn apply<'a>(
        &mut self,
        li: u16,
        entries: impl Iterator<Item = (usize, &'a IndexEntry)>,
    ) -> Result<(), String> {
        for (k, e) in entries {
            let (parent, name) = match e.path.iter().rposition(|&b| b == b'/') {
                Some(i) => (&e.path[..i], &e.path[i + 1..]),
                None => (&[][..], &e.path[..]),
            };
            if e.path.is_empty() {
                if e.kind == EntryKind::Dir {
                    let root = &mut self.nodes[0];
                    set_meta(root, e, li);
                }
                continue;
            }
            if name == OPQ {
                let d = self.ensure_dir(parent, li);
                self.nodes[d as usize]
                    .children
                    .retain(|_, &mut (_, l)| l >= li);
                continue;
            }
            if let Some(target) = name.strip_prefix(WH) {
                if let Some(d) = self.walk(parent)
                    && self.nodes[d as usize].kind == EntryKind::Dir
                {
                    let lower = self.nodes[d as usize]
                        .children
                        .get(target)
                        .is_some_and(|&(_, l)| l < li);
                    if lower {
                        self.nodes[d as usize].children.remove(target);
                    }
                }
                continue;
            }
            let d = self.ensure_dir(parent, li);
            let existing = self.nodes[d as usize].children.get(name).map(|&(n, _)| n);
            let node = match e.kind {
                EntryKind::Hardlink => {
                    let t = self.walk(&e.link).ok_or_else(|| {
                        format!(
                            "hard link {:?} to missing {:?}",
                            lossy(&e.path),
                            lossy(&e.link)
                        )
                    })?;
                    if self.nodes[t as usize].kind == EntryKind::Dir {
                        return Err(format!("hard link {:?} to a directory", lossy(&e.path)));
                    }
                    t
                }
                EntryKind::Dir
                    if existing.is_some_and(|n| self.nodes[n as usize].kind == EntryKind::Dir) =>
                {
                    let n = existing.unwrap();
                    set_meta(&mut self.nodes[n as usize], e, li);
                    n
                }
                _ => {
                    let mut n = BNode::implicit_dir(li);
                    n.kind = e.kind;
                    set_meta(&mut n, e, li);
                    n.size = match e.kind {
                        EntryKind::File => e.size,
                        EntryKind::Symlink => e.link.len() as u64,
                        _ => 0,
                    };
                    n.link = if e.kind == EntryKind::Symlink {
                        e.link.clone()
                    } else {
                        Vec::new()
                    };
                    n.object = e.object;
                    n.entry = k as u32;
                    if e.kind == EntryKind::File && e.object.is_none() && !self.sketch {
                        return Err(format!("file {:?} has no content", lossy(&e.path)));
                    }
                    let id = self.nodes.len() as u32;
                    self.nodes.push(n);
                    id
                }
            };
            self.nodes[d as usize]
                .children
                .insert(name.to_vec(), (node, li));
        }
        Ok(())
    }

    fn freeze(self) -> MergedTree {
        let mut out = MergedTree::default();
        // Breadth-first renumbering of reachable nodes over sorted names;
        // hard links map to the first number their node got. The numbers
        // depend only on the merged tree, so merging the same indexes again
        // gives the same inode numbers (an idle tree that left memory comes
        // back under the numbers the kernel holds: `RootfsCore::unload_if_idle`).
        let mut new_id: HashMap<u32, u32> = HashMap::new();
        let mut names: Vec<u32> = vec![0; 1]; // link counts by new id
        let mut order: Vec<u32> = vec![0];
        new_id.insert(0, 0);
        let mut i = 0;
        while i < order.len() {
            let old = order[i];
            for &(c, _) in self.nodes[old as usize].children.values() {
                match new_id.get(&c) {
                    Some(&n) => names[n as usize] += 1,
                    None => {
                        let n = order.len() as u32;
                        new_id.insert(c, n);
                        order.push(c);
                        names.push(1);
                    }
                }
            }
            i += 1;
        }
        out.nodes.reserve_exact(order.len());
        let mut attr_ids: HashMap<(u32, u32, u32, u32), u32> = HashMap::new();
        for (newi, &old) in order.iter().enumerate() {
            let b = &self.nodes[old as usize];
            if self.sketch {
                out.origins.push(b.entry);
            }
            let (a, len) = match b.kind {
                EntryKind::Dir => {
                    let start = out.children.len() as u32;
                    for (name, &(c, _)) in &b.children {
                        let off = out.arena.len() as u32;
                        out.arena.extend_from_slice(name);
                        out.children.push((off, new_id[&c]));
                    }
                    (start, b.children.len() as u32)
                }
                EntryKind::Symlink => {
                    let off = out.links.len() as u32;
                    out.links.extend_from_slice(&b.link);
                    (off, b.link.len() as u32)
                }
                EntryKind::CharDev | EntryKind::BlockDev => (b.major, b.minor),
                _ => (0, 0),
            };

            let nlink = if b.kind == EntryKind::Dir {
                2 + b
                    .children
                    .values()
                    .filter(|&&(c, _)| self.nodes[c as usize].kind == EntryKind::Dir)
                    .count() as u32
            } else {
                names[newi]
            };
            let xattr = if b.xattrs.is_empty() {
                0
            } else {
                out.xattrs.push(
                    b.xattrs
                        .iter()
                        .map(|(k, v)| (k.clone().into(), v.clone().into()))
                        .collect(),
                );
                out.xattrs.len() as u32
            };
            let key = (b.mode, b.uid, b.gid, xattr);
            let attr = *attr_ids.entry(key).or_insert_with(|| {
                out.attrs.push(key);
                (out.attrs.len() - 1) as u32
            });
            out.nodes.push(CNode {
                kind: b.kind,
                layer: b.layer,
                attr,
                mtime: b.mtime,
                mtime_nsec: b.mtime_nsec,
                size: b.size,
                nlink,
                a,
                b: len,
                object: b.object.unwrap_or([0; 32]),
            });
        }
        out.arena.shrink_to_fit();
        out.links.shrink_to_fit();
        out.children.shrink_to_fit();
        out
    }
}

fn set_meta(n: &mut BNode, e: &crate::layer::IndexEntry, layer: u16) {
    n.mode = e.mode;
    n.uid = e.uid;
    n.gid = e.gid;
    n.mtime = e.mtime;
    n.mtime_nsec = e.mtime_nsec;
    n.major = e.major;
    n.minor = e.minor;
    n.xattrs = e.xattrs.clone();
    n.layer = layer;
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
mod tests {

    #[test]
    fn nodes_stay_compact() {
        // The RSS target (under 200 bytes per entry with the store's index)
        // depends on it.
        assert!(
            std::mem::size_of::<CNode>() <= 72,
            "{}",
            std::mem::size_of::<CNode>()
        );
    }
    use super::*;
    use crate::layer::IndexEntry;

    fn e(path: &str, kind: EntryKind) -> IndexEntry {
        IndexEntry {
            mtime: 1,
            object: (kind == EntryKind::File).then_some([path.len() as u8; 32]),
            ..IndexEntry::new(path, kind)
        }
    }

    fn layer(entries: Vec<IndexEntry>) -> LayerIndex {
        LayerIndex::of_entries(entries)
    }

    fn ls(t: &MergedTree, path: &str) -> Vec<String> {
        let mut cur = 0;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            cur = t.lookup(cur, c.as_bytes()).unwrap();
        }
        t.children(cur)
            .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
            .collect()
    }

    #[test]
    fn whiteouts_opaque_and_hardlinks() {
        let mut hl = e("b/link", EntryKind::Hardlink);
        hl.link = b"a/f".to_vec();
        let l1 = layer(vec![
            e("a", EntryKind::Dir),
            e("a/f", EntryKind::File),
            e("a/g", EntryKind::File),
            e("d", EntryKind::Dir),
            e("d/old", EntryKind::File),
            e("gone", EntryKind::Dir),
            e("gone/x", EntryKind::File),
        ]);
        let l2 = layer(vec![
            e("a/.wh.g", EntryKind::File),
            e("d/.wh..wh..opq", EntryKind::File),
            e("d/new", EntryKind::File),
            e("b", EntryKind::Dir),
            hl,
            e(".wh.gone", EntryKind::File),
        ]);
        let l3 = layer(vec![
            e("gone", EntryKind::Dir),
            e("gone/y", EntryKind::File),
        ]);
        let t = MergedTree::build(&[&l1, &l2, &l3]).unwrap();
        assert_eq!(ls(&t, ""), ["a", "b", "d", "gone"]);
        assert_eq!(ls(&t, "a"), ["f"]);
        assert_eq!(ls(&t, "d"), ["new"]);
        assert_eq!(ls(&t, "gone"), ["y"]);
        let f = t.lookup(t.lookup(0, b"a").unwrap(), b"f").unwrap();
        let l = t.lookup(t.lookup(0, b"b").unwrap(), b"link").unwrap();
        assert_eq!(f, l);
        assert_eq!(t.node(f).unwrap().nlink, 2);
        assert_eq!(t.node(0).unwrap().nlink, 2 + 4);
    }

    #[test]
    fn merging_again_gives_the_same_numbers() {
        let mut hl = e("z/link", EntryKind::Hardlink);
        hl.link = b"m/f9".to_vec();
        let mut entries: Vec<IndexEntry> = (0..50)
            .flat_map(|d| {
                let dir = format!("d{}", (d * 37) % 50);
                [
                    e(&dir, EntryKind::Dir),
                    e(&format!("{dir}/f{d}"), EntryKind::File),
                ]
            })
            .collect();
        entries.extend([
            e("m", EntryKind::Dir),
            e("m/f9", EntryKind::File),
            e("z", EntryKind::Dir),
            hl,
        ]);
        let l = layer(entries);
        let numbers = |t: &MergedTree| -> Vec<(Vec<u8>, u32)> {
            let mut out = Vec::new();
            let mut stack = vec![(Vec::new(), 0u32)];
            while let Some((path, i)) = stack.pop() {
                for (name, c) in t.children(i) {
                    let mut p = path.clone();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    out.push((p.clone(), c));
                    stack.push((p, c));
                }
            }
            out.sort();
            out
        };
        let a = MergedTree::build(&[&l]).unwrap();
        let b = MergedTree::build(&[&l]).unwrap();
        assert_eq!(numbers(&a), numbers(&b));
        assert_eq!(numbers(&a).len(), 50 + 50 + 4);
    }

    #[test]
    fn a_sketch_numbers_nodes_as_the_tree_and_knows_their_entries() {
        let mut hl = e("b/link", EntryKind::Hardlink);
        hl.link = b"a/f".to_vec();
        let lower = vec![
            e("a", EntryKind::Dir),
            e("a/f", EntryKind::File),
            e("a/g", EntryKind::File),
            e("a/f", EntryKind::File), // a duplicate: the last one wins
        ];
        let upper = vec![
            e("a/.wh.g", EntryKind::File),
            e("b", EntryKind::Dir),
            hl,
            e("c/deep/h", EntryKind::File), // implicit parents
        ];
        let tree = MergedTree::build(&[&layer(lower.clone()), &layer(upper.clone())]).unwrap();
        // The listing pass has not stored a single file yet.
        let unstored = |v: &[IndexEntry]| -> Vec<IndexEntry> {
            v.iter()
                .map(|x| IndexEntry {
                    object: None,
                    ..x.clone()
                })
                .collect()
        };
        let (lo, up) = (unstored(&lower), unstored(&upper));
        assert!(MergedTree::build(&[&layer(lo.clone())]).is_err());
        let sketch = MergedTree::sketch(&[("lower", &lo), ("upper", &up)], |_, _| true).unwrap();
        // Entries left out are not in it, and the others keep their numbers.
        let without_g = MergedTree::sketch(&[("lower", &lo)], |_, e| e.path != b"a/g").unwrap();
        assert_eq!(ls(&without_g, "a"), ["f"]);
        assert_eq!(
            without_g.origin(without_g.lookup(1, b"f").unwrap()),
            Some((0, 3))
        );
        assert!(sketch.is_sketch() && !tree.is_sketch());
        assert_eq!(sketch.len(), tree.len());
        for i in 0..tree.len() as u32 {
            let (t, s) = (tree.node(i).unwrap(), sketch.node(i).unwrap());
            assert_eq!(
                (t.kind, t.layer, t.nlink, t.size),
                (s.kind, s.layer, s.nlink, s.size)
            );
            let names = |m: &MergedTree| {
                m.children(i)
                    .map(|(n, c)| (n.to_vec(), c))
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(&tree), names(&sketch));
            assert_eq!(tree.origin(i), None);
        }
        let at = |t: &MergedTree, p: &[&str]| {
            p.iter().fold(0, |d, c| t.lookup(d, c.as_bytes()).unwrap())
        };
        assert_eq!(sketch.origin(at(&sketch, &["a", "f"])), Some((0, 3)));
        assert_eq!(sketch.origin(at(&sketch, &["b", "link"])), Some((0, 3)));
        assert_eq!(
            sketch.origin(at(&sketch, &["c", "deep", "h"])),
            Some((1, 3))
        );
        assert_eq!(sketch.origin(at(&sketch, &["c", "deep"])), None);
        assert_eq!(
            sketch.node(at(&sketch, &["a", "f"])).unwrap().object,
            [0; 32]
        );
    }

    #[test]
    fn same_layer_whiteout_does_not_remove_same_layer_entry() {
        let l1 = layer(vec![e("x", EntryKind::File)]);
        let l2 = layer(vec![e("x", EntryKind::Dir), e(".wh.x", EntryKind::File)]);
        let t = MergedTree::build(&[&l1, &l2]).unwrap();
        assert_eq!(ls(&t, ""), ["x"]);
        assert_eq!(
            t.node(t.lookup(0, b"x").unwrap()).unwrap().kind,
            EntryKind::Dir
        );
    }

    #[test]
    fn hardlink_to_missing_is_an_error() {
        let mut hl = e("l", EntryKind::Hardlink);
        hl.link = b"nope".to_vec();
        assert!(MergedTree::build(&[&layer(vec![hl])]).is_err());
    }
}
