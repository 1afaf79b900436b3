//! Open-ahead for the content store: when a file of a rootfs is opened,
//! the objects of the next files in the tree are opened (and checked to be
//! the verified ones) on a blocking thread, so the FUSE open of each is a
//! map lookup rather than a path walk, an inode read and an fstat.
//!
//! Why: reading a tree (`tar`, `cp -a`, `rsync`, `grep -r`) opens files one
//! after another. Each open through FUSE opens the file's object in
//! `objects/`; on a cold dentry/inode cache that open waits for a disk read
//! of the object's directory block and inode, synchronously, on the
//! reader's critical path (measured: 33 µs per open against 3 µs on the
//! unpacked tree, where `lstat` had already read the inode; the daemon's
//! open of an object fell from 13 to 7 µs with the inodes warmed). Nodes are
//! numbered breadth-first, so a directory's files are consecutive node
//! numbers: warming the nodes after the one opened warms its later
//! siblings, in the order a tree walker opens them.
//!
//! Contract: this is a hint. It never fails a read, never blocks an open
//! (the bookkeeping is short locks; the opens run elsewhere), and holds at
//! most [`HELD`] files per image, each verified exactly as an open would
//! (`ObjectStore::get_verified`); what is not there is opened as before. A
//! reader that jumps around re-centres the window and drops what was held;
//! one moving forward extends it by half a window at a time, so each node
//! is opened ahead once per pass.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use crate::cas::ObjectStore;
use crate::layer::EntryKind;
use crate::rootfs::merge::MergedTree;

/// How many nodes past the opened one are opened ahead.
const WINDOW: u32 = 128;

/// At most this many files are held open ahead per image.
pub const HELD: usize = 128;

/// The node opened last and the end of what is opened ahead after it, and
/// the files not taken yet, by node.
#[derive(Debug, Default)]
pub struct Ahead {
    window: Mutex<(u32, u32)>,
    held: Arc<Mutex<HashMap<u32, File>>>,
}

impl Ahead {
    /// The verified object file of node `i`, if it was opened ahead.
    pub fn take(&self, i: u32) -> Option<File> {
        self.held.lock().unwrap().remove(&i)
    }

    /// Node `i` of `tree` is being opened: open the objects of the nodes
    /// after it unless that is already done (or under way).
    pub fn opened(&self, tree: &Arc<MergedTree>, store: &Arc<ObjectStore>, i: u32) {
        let len = tree.len() as u32;
        let range = {
            let mut w = self.window.lock().unwrap();
            let (last, hi) = *w;
            if i == last && hi > 0 {
                return; // the same file again
            }
            // Moving forward inside the window: extend it when half used.
            // Anything else (a jump, a step back, a second pass) starts a
            // new window and drops what the old one held.
            let inside = i > last && i < hi;
            let end = i.saturating_add(WINDOW).min(len);
            let start = if inside {
                if i.saturating_add(WINDOW / 2) < hi {
                    w.0 = i;
                    return;
                }
                hi
            } else {
                self.held.lock().unwrap().clear();
                i + 1
            };
            *w = (i, end.max(start));
            start..end
        };
        if range.is_empty() {
            return;
        }
        let (tree, store, held) = (tree.clone(), store.clone(), self.held.clone());
        tokio::task::spawn_blocking(move || {
            for n in range {
                if let Some(node) = tree.node(n)
                    && node.kind == EntryKind::File
                    && node.size > 0
                    && held.lock().unwrap().len() < HELD
                    && let Ok(Some(f)) = store.get_verified(&node.object)
                {
                    held.lock().unwrap().insert(n, f);
                }
            }
        });
    }
}
