//! What each inode is, and the table that gives inode numbers to nodes.
//!
//! A node is identified by its value (registry, repository path, tag or
//! digest, file kind), so the same path always gets the same inode number
//! for the life of the mount, and content addressed by digest is shared by
//! every path that leads to it.
//!
//! Locking: the table is one `std::sync::Mutex`, held only to insert or
//! read a node, never across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The fixed inode of the mount's root.
pub const ROOT_INO: u64 = 1;

/// A file under a tag or `@sha256:` directory whose content is addressed by
/// a digest (and therefore never changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaKind {
    /// `manifest.json`: the platform image manifest.
    Manifest,
    /// `index.json`: the multi-platform index.
    Index,
    /// `config.json`: the config blob.
    Config,
    /// `digest`: `sha256:<hex>\n` of `manifest.json`.
    Digest,
}

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    /// The mount root: registries and `outbox`.
    Root,
    /// `outbox/`: where trees are copied to be pushed.
    Outbox,
    /// `<registry>/`.
    Registry {
        /// Registry host.
        registry: Arc<str>,
    },
    /// `<registry>/<path>/`: a repository, a namespace, or both.
    Repo {
        /// Registry host.
        registry: Arc<str>,
        /// Repository path (as typed; canonicalised when asking).
        path: Arc<str>,
    },
    /// `<registry>/<repo>/<tag>/`.
    Tag {
        /// Registry host.
        registry: Arc<str>,
        /// Repository path.
        repo: Arc<str>,
        /// Tag name.
        tag: Arc<str>,
    },
    /// `<registry>/<repo>/@sha256:<hex>/`.
    Pinned {
        /// Registry host.
        registry: Arc<str>,
        /// Repository path.
        repo: Arc<str>,
        /// The top-level manifest digest.
        digest: Arc<str>,
    },
    /// An immutable metadata file.
    Meta {
        /// Registry host (where to fetch from).
        registry: Arc<str>,
        /// Repository path (where to fetch from).
        repo: Arc<str>,
        /// Digest of the content (for `Digest`: of the manifest).
        digest: Arc<str>,
        /// Which file.
        kind: MetaKind,
        /// Its size in bytes.
        size: u64,
    },
    /// `inspect.json` of a tag (`tag: Some`) or pinned digest.
    Inspect {
        /// Registry host.
        registry: Arc<str>,
        /// Repository path.
        repo: Arc<str>,
        /// Tag, for tag directories.
        tag: Option<Arc<str>>,
        /// Top-level manifest digest.
        top: Arc<str>,
    },
    /// `image.cfs` of an image: its composefs (EROFS) image.
    Cfs {
        /// Registry host.
        registry: Arc<str>,
        /// Repository path.
        repo: Arc<str>,
        /// Top-level manifest digest.
        top: Arc<str>,
    },
    /// `status` of an image.
    Status {
        /// Registry host.
        registry: Arc<str>,
        /// Repository path.
        repo: Arc<str>,
        /// Top-level manifest digest.
        top: Arc<str>,
    },
}

/// Inode numbers for nodes, both ways.
#[derive(Default)]
pub struct Inodes {
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_node: HashMap<Arc<Node>, u64>,
    nodes: Vec<Arc<Node>>,
}

impl Inodes {
    /// A table with the root at inode 1.
    pub fn new() -> Inodes {
        let t = Inodes::default();
        let root = t.ino(Node::Root);
        debug_assert_eq!(root, ROOT_INO);
        t
    }

    /// The inode number of `node`, allocating one on first sight.
    pub fn ino(&self, node: Node) -> u64 {
        let mut t = self.inner.lock().unwrap();
        if let Some(&i) = t.by_node.get(&node) {
            return i;
        }
        let node = Arc::new(node);
        t.nodes.push(node.clone());
        let ino = t.nodes.len() as u64;
        t.by_node.insert(node, ino);
        ino
    }

    /// The node behind `ino`.
    pub fn node(&self, ino: u64) -> Option<Arc<Node>> {
        let t = self.inner.lock().unwrap();
        t.nodes.get((ino as usize).checked_sub(1)?).cloned()
    }
}
