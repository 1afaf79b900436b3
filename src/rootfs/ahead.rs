//! Inode readahead for the content store: when a file of a rootfs is
//! opened, the objects of the next files in the tree are `stat`ed on a
//! blocking thread, so their dentries and inodes are in memory by the time
//! they are opened.
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
//! (the window bookkeeping is a short lock; the stats run elsewhere), and
//! only reads metadata of objects already in the store. A reader that
//! jumps around or starts a new pass re-centres the window; one moving
//! forward extends it by half a window at a time, so each node is warmed
//! once per pass.
//!
//! (Opening the objects ahead and handing the open files to the FUSE open
//! was tried: it took ~5,000 `openat` + `statx` per tar pass off the FUSE
//! threads, but tar's own `openat` stayed at ~34 µs and the end-to-end time
//! did not move, so the simpler stat stays.)

use std::sync::{Arc, Mutex};

use crate::cas::ObjectStore;
use crate::layer::EntryKind;
use crate::rootfs::merge::MergedTree;

/// How many nodes past the opened one are warmed.
const WINDOW: u32 = 128;

/// The node opened last and the end of what is warmed after it.
#[derive(Debug, Default)]
pub struct Ahead {
    window: Mutex<(u32, u32)>,
}

impl Ahead {
    /// Node `i` of `tree` is being opened: warm the objects of the nodes
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
            // new window.
            let inside = i > last && i < hi;
            let end = i.saturating_add(WINDOW).min(len);
            let start = if inside {
                if i.saturating_add(WINDOW / 2) < hi {
                    w.0 = i;
                    return;
                }
                hi
            } else {
                i + 1
            };
            *w = (i, end.max(start));
            start..end
        };
        if range.is_empty() {
            return;
        }
        let (tree, store) = (tree.clone(), store.clone());
        tokio::task::spawn_blocking(move || {
            for n in range {
                if let Some(node) = tree.node(n)
                    && node.kind == EntryKind::File
                    && node.size > 0
                {
                    store.warm(&node.object);
                }
            }
        });
    }
}
