//! Early answers: files of a layer that is still streaming are served as
//! soon as the stream has passed them, before the merged tree exists.
//!
//! Why: the merged tree needs every entry of every layer, so without this a
//! reader of `/etc/os-release` waits for the whole image (seconds for a
//! large layer, CPU-bound on inflating and hashing). While a plain layer
//! streams, its entries are published here ([`LiveLayer`]) as the tar
//! walker meets them, and each file's object id as soon as the file is
//! stored; a lookup that the layers seen so far already decide is answered
//! from them.
//!
//! Contracts:
//! - **Only settled answers.** A name is answered early when the topmost
//!   layer that mentions it has shown its entry and every layer above that
//!   one is complete and does not hide it (whiteout, opaque directory). It
//!   is absent early when every layer from the top down to one that hides
//!   it (or to the bottom) is complete and none has it, not even as the
//!   parent of another entry. Anything else — a name not seen yet, an
//!   implicit directory, a directory listing — waits for the merged tree,
//!   which is then the only truth.
//! - **Complete** means every entry was seen and the blob matched its
//!   digest. A gzip layer is complete after a first pass that only lists
//!   it (and keeps its compressed bytes in an unlinked spill file,
//!   [`crate::layer::spill`]); its contents are stored by a second pass
//!   that follows the spill at low priority. A file the second pass has not
//!   reached yet is extracted on demand from the spill, resuming at the
//!   gzip checkpoint before it ([`LiveLayer::want`]), so a reader waits for
//!   its file, not for the layer. Other layers are listed and stored in one
//!   pass, and complete at its end.
//! - **Listings wait for a tree.** Once every layer is complete (listed
//!   and checked, or indexed before) and while contents are still being
//!   stored, names, attributes and listings come from a *sketch*: the
//!   merged tree made of the layers' entries ([`MergedTree::sketch`]),
//!   with the same node numbers the built tree will have and the kernel's
//!   long TTLs. A file of the sketch has its object if its layer was
//!   indexed before; else it finds its content through its entry in its
//!   live layer ([`MergedTree::origin`]): stored, or extracted on demand as
//!   above. Before that, a listing waits. Tried: listing from the live
//!   layers answered `ls rootfs/` of minbase at 0.7 s instead of 1.3 s,
//!   but a cold `find` took 2.5 s instead of 1.5-2 s (every early entry
//!   costs a lookup and a getattr round trip, with zero TTLs).
//! - **Inodes.** Early entries get inode numbers of their own
//!   ([`EarlyInodes`], above [`EARLY`] in the image's range) and zero
//!   TTLs; once a tree answers (the sketch, then the built tree, which
//!   number nodes alike) every early inode maps to its node by path. A
//!   name keeps the number it was first answered with: lookups and
//!   listings of the root or an early directory give a child its early
//!   number if it has one, the tree's otherwise. A number that changed
//!   would fail the kernel's revalidation of a dentry it holds, and an
//!   overlay mounted on `rootfs/` answers `ESTALE` for that. A hard link
//!   answered early takes its target's number (when the target's path
//!   shows the same entry), and once a tree answers every other name of a
//!   hard-linked file shows the early number too, so `tar` and `cp -a`
//!   still see one file. (Early, its link count is still 1.)
//! - **Trust.** A layer's blob digest is known only at its end, so an early
//!   read returns bytes before the digest check (each file is stored under
//!   its own sha256, so what is read is what the stream carried). Should
//!   the digest then fail, the layer's objects are removed and the image
//!   answers `EIO` from then on. `-o noearly` makes every read wait for the
//!   checked, merged tree instead.
//! - **Within one layer the last entry for a path wins**; an early answer
//!   is the entry seen so far (a later duplicate corrects it once the tree
//!   is built).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::sync::{Arc, Mutex};

use crate::cas::ObjectId;
use crate::layer::gzindex::Checkpoint;
use crate::layer::{EntryKind, IndexEntry};
use crate::rootfs::merge::MergedTree;

/// Node numbers at and above this are early inodes (a merged tree has
/// fewer nodes).
pub const EARLY: u32 = 1 << 31;

/// The entries of one layer seen so far while it streams.
#[derive(Default)]
pub struct LiveLayer {
    inner: Mutex<LiveInner>,
    changed: Option<Arc<tokio::sync::Notify>>,
}

#[derive(Default)]
struct LiveInner {
    entries: Vec<IndexEntry>,
    /// Latest entry per path.
    paths: HashMap<Vec<u8>, u32>,
    /// Every entry has been seen (the layer was read to its end and
    /// matched its digest).
    ended: bool,
    /// Objects stored before their entry was published (the writer thread
    /// can finish a file before the walker publishes its entry).
    early_objects: HashMap<u32, ObjectId>,
    /// Every directory that is the parent of an entry (implicit
    /// directories exist in the tree without an entry of their own).
    dirs: HashSet<Vec<u8>>,
    /// The layer's compressed bytes so far, and the gzip checkpoints into
    /// them, while files can be extracted on demand.
    spill: Option<Arc<File>>,
    checkpoints: Vec<Checkpoint>,
    /// Entries extracted on demand, or being extracted (or that failed).
    wanted: HashSet<u32>,
    /// Objects the on-demand extraction created (removed if the layer
    /// fails).
    made: Vec<ObjectId>,
}

/// What to extract from a spill for [`LiveLayer::want`].
pub struct Extraction {
    /// The spill file (the blob's compressed bytes from offset 0).
    pub spill: Arc<File>,
    /// The checkpoint before the content (`None`: the blob's start).
    pub checkpoint: Option<Checkpoint>,
    /// Where the content lies in the uncompressed stream.
    pub at: crate::layer::stream::Placement,
}

impl std::fmt::Debug for LiveLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.inner.lock().unwrap();
        f.debug_struct("LiveLayer")
            .field("entries", &g.entries.len())
            .field("ended", &g.ended)
            .finish()
    }
}

impl LiveLayer {
    /// A live view that wakes `changed`'s waiters on every change.
    pub fn new(changed: Arc<tokio::sync::Notify>) -> LiveLayer {
        LiveLayer {
            inner: Mutex::default(),
            changed: Some(changed),
        }
    }

    fn wake(&self) {
        if let Some(n) = &self.changed {
            n.notify_waiters();
        }
    }

    /// Entry number `idx` of the layer (numbers are dense, in tar order).
    pub fn push(&self, idx: usize, e: &IndexEntry) {
        let mut g = self.inner.lock().unwrap();
        if g.entries.len() != idx {
            return; // only ever called in order; be safe rather than wrong
        }
        g.paths.insert(e.path.clone(), idx as u32);
        let mut parent = e.path.as_slice();
        while let Some(i) = parent.iter().rposition(|&b| b == b'/') {
            parent = &parent[..i];
            if !g.dirs.insert(parent.to_vec()) {
                break;
            }
        }
        let mut e = e.clone();
        if let Some(id) = g.early_objects.remove(&(idx as u32)) {
            e.object = Some(id);
        }
        g.entries.push(e);
        drop(g);
        self.wake();
    }

    /// Entry `idx`'s content is stored as object `id`.
    pub fn stored(&self, idx: usize, id: ObjectId) {
        let mut g = self.inner.lock().unwrap();
        match g.entries.get_mut(idx) {
            Some(e) => e.object = Some(id),
            None => {
                g.early_objects.insert(idx as u32, id);
            }
        }
        drop(g);
        self.wake();
    }

    /// Every entry has been seen and the layer checked.
    pub fn end(&self) {
        self.inner.lock().unwrap().ended = true;
        self.wake();
    }

    /// The layer's compressed bytes are being written to `spill`.
    pub fn spill(&self, spill: Arc<File>) {
        self.inner.lock().unwrap().spill = Some(spill);
    }

    /// A gzip checkpoint into the spill (they come in stream order).
    pub fn checkpoint(&self, cp: &Checkpoint) {
        self.inner.lock().unwrap().checkpoints.push(cp.clone());
    }

    /// Whether every entry has been seen and the layer checked.
    pub fn is_ended(&self) -> bool {
        self.inner.lock().unwrap().ended
    }

    /// Every entry, once the layer is listed and checked (`None` before):
    /// what a sketch of the merged tree is made of
    /// ([`MergedTree::sketch`]).
    pub fn listed(&self) -> Option<Vec<IndexEntry>> {
        let g = self.inner.lock().unwrap();
        g.ended.then(|| g.entries.clone())
    }

    /// The object of entry `idx`, once stored or extracted.
    pub fn object(&self, idx: u32) -> Option<ObjectId> {
        self.inner.lock().unwrap().entries.get(idx as usize)?.object
    }

    /// Entry `idx`'s content should be extracted from the spill now: what
    /// to extract, once per entry (`None` when it is stored, asked for
    /// already, or there is no spill).
    pub fn want(&self, idx: u32) -> Option<Extraction> {
        let mut g = self.inner.lock().unwrap();
        let e = g.entries.get(idx as usize)?;
        if e.object.is_some() || e.kind != EntryKind::File || g.wanted.contains(&idx) {
            return None;
        }
        let at = crate::layer::stream::Placement::of(e);
        let offset = at.offset;
        let spill = g.spill.clone()?;
        let i = g.checkpoints.partition_point(|c| c.uncompressed <= offset);
        let checkpoint = i.checked_sub(1).map(|i| g.checkpoints[i].clone());
        g.wanted.insert(idx);
        Some(Extraction {
            spill,
            checkpoint,
            at,
        })
    }

    /// Entry `idx` was extracted on demand as object `id` (`new`: this
    /// extraction created it).
    pub fn extracted(&self, idx: u32, id: ObjectId, new: bool) {
        if new {
            self.inner.lock().unwrap().made.push(id);
        }
        self.stored(idx as usize, id);
    }

    /// The objects on-demand extraction created; they go when the layer
    /// fails.
    pub fn take_made(&self) -> Vec<ObjectId> {
        std::mem::take(&mut self.inner.lock().unwrap().made)
    }

    /// The spill is no longer needed (the contents are all stored).
    pub fn drop_spill(&self) {
        let mut g = self.inner.lock().unwrap();
        g.spill = None;
        g.checkpoints = Vec::new();
    }
}

/// What an early lookup found: the entry a path shows in the merged view.
#[derive(Debug, Clone)]
pub struct Found {
    /// The entry (a hard link's target entry, for hard links).
    pub entry: IndexEntry,
    /// The layer it is in.
    pub layer: Arc<LiveLayer>,
    /// Its entry number there.
    pub idx: u32,
}

/// A settled early answer for a path.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The path shows this entry.
    Shows(Found),
    /// No layer has the path, or one that has not hides it.
    Absent,
}

/// The parent of `path` and its last component.
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + name.len() + 1);
    if !dir.is_empty() {
        p.extend_from_slice(dir);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Whether layer `g` hides `path` from the layers below it: a whiteout of
/// the path or of an ancestor, an opaque ancestor directory, or an
/// ancestor that is not a directory in this layer.
fn hides(g: &LiveInner, path: &[u8]) -> bool {
    let mut end = 0;
    loop {
        let next = path[end..].iter().position(|&b| b == b'/');
        let prefix_end = next.map_or(path.len(), |i| end + i);
        let prefix = &path[..prefix_end];
        let (dir, name) = split(prefix);
        let mut wh = b".wh.".to_vec();
        wh.extend_from_slice(name);
        if g.paths.contains_key(&join(dir, &wh)) {
            return true;
        }
        if g.paths.contains_key(&join(dir, b".wh..wh..opq")) {
            return true;
        }
        if prefix_end < path.len()
            && let Some(&i) = g.paths.get(prefix)
            && g.entries[i as usize].kind != EntryKind::Dir
        {
            return true;
        }
        match next {
            Some(_) => end = prefix_end + 1,
            None => return false,
        }
    }
}

/// What `path` shows in the merged view of `views` (bottom layer first),
/// when the layers seen so far already settle it; `None` while unsettled.
pub fn resolve(views: &[Option<Arc<LiveLayer>>], path: &[u8]) -> Option<Answer> {
    resolve_depth(views, path, 0)
}

/// [`resolve`], positive answers only.
pub fn resolve_found(views: &[Option<Arc<LiveLayer>>], path: &[u8]) -> Option<Found> {
    match resolve(views, path)? {
        Answer::Shows(f) => Some(f),
        Answer::Absent => None,
    }
}

fn resolve_depth(views: &[Option<Arc<LiveLayer>>], path: &[u8], depth: u8) -> Option<Answer> {
    let (_, name) = split(path);
    if path.is_empty() || name.starts_with(b".wh.") || depth > 8 {
        return None;
    }
    for view in views.iter().rev() {
        let layer = view.as_ref()?;
        let g = layer.inner.lock().unwrap();
        if let Some(&i) = g.paths.get(path) {
            let e = g.entries[i as usize].clone();
            drop(g);
            if e.kind == EntryKind::Hardlink {
                // A link to nothing is the tree's to judge.
                return match resolve_depth(views, &e.link, depth + 1)? {
                    Answer::Shows(f) => Some(Answer::Shows(f)),
                    Answer::Absent => None,
                };
            }
            return Some(Answer::Shows(Found {
                entry: e,
                layer: layer.clone(),
                idx: i,
            }));
        }
        if !g.ended || g.dirs.contains(path) {
            return None;
        }
        if hides(&g, path) {
            return Some(Answer::Absent);
        }
    }
    Some(Answer::Absent)
}

/// Early inode numbers of one image: (parent node, name) pairs, the
/// parent being the root (0) or another early inode.
#[derive(Default)]
pub struct EarlyInodes {
    inner: Mutex<EarlyInner>,
}

#[derive(Default)]
struct EarlyInner {
    /// Early inode `EARLY + k`: parent node, name, and its tree node once
    /// resolved.
    nodes: Vec<(u32, Box<[u8]>, Option<u32>)>,
    /// Every name an early number was answered for (a hard link's names
    /// share their target's number).
    by_key: HashMap<(u32, Box<[u8]>), u32>,
    /// Once the tree is built: the first early number of each tree node,
    /// for the first `.1` early numbers.
    by_tree: (HashMap<u32, u32>, usize),
}

impl EarlyInodes {
    /// The early node for `name` in directory `parent` (0 or early).
    pub fn child(&self, parent: u32, name: &[u8]) -> u32 {
        Self::child_locked(&mut self.inner.lock().unwrap(), parent, name)
    }

    fn child_locked(g: &mut EarlyInner, parent: u32, name: &[u8]) -> u32 {
        let key = (parent, Box::<[u8]>::from(name));
        if let Some(&k) = g.by_key.get(&key) {
            return EARLY + k;
        }
        let k = g.nodes.len() as u32;
        g.nodes.push((parent, key.1.clone(), None));
        g.by_key.insert(key, k);
        EARLY + k
    }

    /// The early node for `name` in directory `parent` that is a hard link
    /// to `target` (a path from the root): the target's node, so that every
    /// name of the file shows one inode. A name answered before keeps its
    /// number.
    pub fn link(&self, parent: u32, name: &[u8], target: &[u8]) -> u32 {
        let mut g = self.inner.lock().unwrap();
        if let Some(&k) = g.by_key.get(&(parent, Box::<[u8]>::from(name))) {
            return EARLY + k;
        }
        let mut node = 0;
        for part in target.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            node = Self::child_locked(&mut g, node, part);
        }
        if node < EARLY {
            // No target path (never a file's): a number of its own.
            return Self::child_locked(&mut g, parent, name);
        }
        g.by_key.insert((parent, name.into()), node - EARLY);
        node
    }

    /// The early number first handed out for node `n` of the built `tree`,
    /// if any: the number the other names of a hard-linked file must show.
    pub fn of_tree_node(&self, tree: &MergedTree, n: u32) -> Option<u32> {
        let (len, done) = {
            let g = self.inner.lock().unwrap();
            (g.nodes.len(), g.by_tree.1)
        };
        let found: Vec<(u32, u32)> = (done..len)
            .filter_map(|k| {
                let i = EARLY + k as u32;
                Some((self.to_tree(tree, i)?, i))
            })
            .collect();
        let mut g = self.inner.lock().unwrap();
        if g.by_tree.1 == done {
            for (t, i) in found {
                g.by_tree.0.entry(t).or_insert(i);
            }
            g.by_tree.1 = len;
        }
        g.by_tree.0.get(&n).copied()
    }

    /// The early node handed out for `name` in directory `parent`, if one
    /// was (only the root and early directories have such children).
    pub fn get(&self, parent: u32, name: &[u8]) -> Option<u32> {
        if parent != 0 && parent < EARLY {
            return None;
        }
        let g = self.inner.lock().unwrap();
        g.by_key
            .get(&(parent, Box::<[u8]>::from(name)))
            .map(|&k| EARLY + k)
    }

    /// The path of node `i` (0 or early) from the root; `None` for an
    /// unknown early number.
    pub fn path(&self, i: u32) -> Option<Vec<u8>> {
        let g = self.inner.lock().unwrap();
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = i;
        while cur >= EARLY {
            let (parent, name, _) = g.nodes.get((cur - EARLY) as usize)?;
            parts.push(name);
            cur = *parent;
        }
        let mut p = Vec::new();
        for (n, part) in parts.iter().rev().enumerate() {
            if n > 0 {
                p.push(b'/');
            }
            p.extend_from_slice(part);
        }
        Some(p)
    }

    /// Node `i` (tree node or early inode) as a node of the built `tree`.
    pub fn to_tree(&self, tree: &MergedTree, i: u32) -> Option<u32> {
        if i < EARLY {
            return Some(i);
        }
        let (parent, name) = {
            let g = self.inner.lock().unwrap();
            let (parent, name, done) = g.nodes.get((i - EARLY) as usize)?;
            if let Some(d) = done {
                return Some(*d);
            }
            (*parent, name.clone())
        };
        let p = self.to_tree(tree, parent)?;
        let n = tree.lookup(p, &name)?;
        if let Some(slot) = self
            .inner
            .lock()
            .unwrap()
            .nodes
            .get_mut((i - EARLY) as usize)
        {
            slot.2 = Some(n);
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, link: &str) -> IndexEntry {
        IndexEntry {
            link: link.as_bytes().to_vec(),
            ..IndexEntry::new(path, kind)
        }
    }

    fn layer(entries: &[IndexEntry], ended: bool) -> Option<Arc<LiveLayer>> {
        let l = LiveLayer::default();
        for (i, e) in entries.iter().enumerate() {
            l.push(i, e);
        }
        if ended {
            l.end();
        }
        Some(Arc::new(l))
    }

    fn found(views: &[Option<Arc<LiveLayer>>], p: &str) -> Option<String> {
        resolve_found(views, p.as_bytes()).map(|f| String::from_utf8(f.entry.link).unwrap())
    }

    fn absent(views: &[Option<Arc<LiveLayer>>], p: &str) -> bool {
        matches!(resolve(views, p.as_bytes()), Some(Answer::Absent))
    }

    #[test]
    fn settles_only_what_upper_layers_cannot_change() {
        use EntryKind::*;
        let bottom = layer(
            &[
                entry("etc", Dir, ""),
                entry("etc/os-release", File, "bottom"),
                entry("etc/gone", File, "bottom"),
                entry("opt/app/x", File, "bottom"),
                entry("data/f", File, "bottom"),
            ],
            false,
        );
        // Upper layer still streaming: nothing below it is settled, but what
        // it has shown is.
        let upper = layer(&[entry("etc/new", File, "upper")], false);
        let v = vec![bottom.clone(), upper];
        assert_eq!(found(&v, "etc/new").as_deref(), Some("upper"));
        assert_eq!(found(&v, "etc/os-release"), None);
        assert!(!absent(&v, "nowhere"), "upper may still bring it");

        // Upper complete, with whiteouts and an opaque directory.
        let upper = layer(
            &[
                entry("etc/.wh.gone", File, ""),
                entry("opt/app", Dir, ""),
                entry("opt/app/.wh..wh..opq", File, ""),
                entry("data", File, "upper-file"),
            ],
            true,
        );
        let v = vec![bottom.clone(), upper.clone()];
        assert_eq!(found(&v, "etc/os-release").as_deref(), Some("bottom"));
        assert!(absent(&v, "etc/gone"), "whited out");
        assert!(absent(&v, "opt/app/x"), "under an opaque dir");
        assert!(absent(&v, "data/f"), "parent replaced by a file");
        assert_eq!(
            found(&v, "etc/.wh.gone"),
            None,
            "whiteouts are never visible"
        );
        assert!(
            !absent(&v, "nowhere"),
            "the bottom layer is still streaming"
        );
        assert!(!absent(&v, "opt"), "an implicit directory is the tree's");

        // Everything complete: absent names are settled, implicit
        // directories still are not.
        bottom.as_ref().unwrap().end();
        assert!(absent(&v, "nowhere"));
        assert!(absent(&v, "etc/nowhere"));
        assert!(!absent(&v, "opt"), "implicit directory");
        assert!(!absent(&v, "etc/.wh.gone"));
        assert_eq!(found(&v, "etc/os-release").as_deref(), Some("bottom"));
    }

    #[test]
    fn a_layer_without_a_live_view_is_unknown() {
        let top = layer(&[entry("a", EntryKind::File, "top")], true);
        assert_eq!(found(&[None, top.clone()], "a").as_deref(), Some("top"));
        assert_eq!(found(&[None, top], "b"), None);
    }

    #[test]
    fn hard_links_resolve_to_their_target() {
        use EntryKind::*;
        let mut t = entry("bin/true", File, "target");
        t.size = 7;
        let l = layer(&[t, entry("usr/true", Hardlink, "bin/true")], false);
        let f = resolve_found(&[l], b"usr/true").unwrap();
        assert_eq!(f.entry.size, 7);
        assert_eq!(f.entry.path, b"bin/true");
    }

    #[test]
    fn early_inodes_keep_paths_and_map_to_the_tree() {
        let ino = EarlyInodes::default();
        let usr = ino.child(0, b"usr");
        let bin = ino.child(usr, b"bin");
        assert_eq!(ino.child(0, b"usr"), usr, "one number per name");
        assert!(usr >= EARLY && bin >= EARLY);
        assert_eq!(ino.path(bin).unwrap(), b"usr/bin");
        assert_eq!(ino.path(0).unwrap(), b"");
        assert_eq!(ino.path(EARLY + 99), None);
        // What was handed out is found again; nothing else is made up.
        assert_eq!(ino.get(0, b"usr"), Some(usr));
        assert_eq!(ino.get(usr, b"bin"), Some(bin));
        assert_eq!(ino.get(usr, b"lib"), None);
        assert_eq!(ino.get(7, b"bin"), None, "tree directories have none");
    }

    #[test]
    fn a_hard_link_shares_its_targets_early_number() {
        let ino = EarlyInodes::default();
        let usr = ino.child(0, b"usr");
        let link = ino.link(usr, b"perl", b"usr/bin/perl5");
        assert_eq!(ino.path(link).unwrap(), b"usr/bin/perl5");
        let bin = ino
            .get(usr, b"bin")
            .expect("the target's directories are made");
        assert_eq!(
            ino.child(bin, b"perl5"),
            link,
            "the target looked up itself"
        );
        assert_eq!(ino.get(usr, b"perl"), Some(link));
        assert_eq!(
            ino.link(usr, b"perl", b"usr/bin/other"),
            link,
            "a name keeps its number"
        );
        let own = ino.link(0, b"odd", b"");
        assert_eq!(ino.path(own).unwrap(), b"odd");
    }
}
