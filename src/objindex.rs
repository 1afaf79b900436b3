//! The content store's in-memory index: which objects exist, their sizes
//! and verified stamps, in least-recently-used order — about 60 bytes per
//! object.
//!
//! Why not the `lru` crate: it boxes every entry (key, value and two links
//! in a separate allocation, plus a hash-map slot pointing at it), which
//! measured ~145 bytes per object here; a daemon serving a 100k-file image
//! kept 14 MB just to remember which objects it has. Here entries live in one
//! dense `Vec` linked by `u32` indices, and a `hashbrown::HashTable<u32>`
//! finds them by id. Object ids are sha256 digests, so their first 8 bytes
//! are already a good hash.
//!
//! Removal swaps the last slot into the hole (fixing its links and its table
//! entry), so the slab stays dense and needs no free list.

use hashbrown::HashTable;

use crate::cas::ObjectId;

const NIL: u32 = u32::MAX;

/// What the store keeps per object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    /// Bytes.
    pub size: u64,
    /// Fingerprint of the file stamp (inode, size, times) last verified in
    /// this process; 0 when not verified yet.
    pub verified: u64,
}

#[derive(Debug)]
struct Slot {
    id: ObjectId,
    info: Info,
    /// Towards the most recently used end.
    prev: u32,
    /// Towards the least recently used end.
    next: u32,
}

/// Objects by id, in LRU order.
#[derive(Debug)]
pub struct ObjIndex {
    slots: Vec<Slot>,
    table: HashTable<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
}

impl Default for ObjIndex {
    fn default() -> Self {
        Self::new()
    }
}

fn hash(id: &ObjectId) -> u64 {
    u64::from_le_bytes(id[..8].try_into().expect("8 bytes"))
}

impl ObjIndex {
    /// An empty index.
    pub fn new() -> ObjIndex {
        ObjIndex {
            slots: Vec::new(),
            table: HashTable::new(),
            head: NIL,
            tail: NIL,
        }
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn find(&self, id: &ObjectId) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash(id), |&i| slots[i as usize].id == *id)
            .copied()
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.slots[o as usize].prev = i,
        }
        self.head = i;
    }

    /// Whether `id` is present (order unchanged).
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.find(id).is_some()
    }

    /// Inserts or replaces `id` as the most recently used; the old value if
    /// it was present.
    pub fn put(&mut self, id: ObjectId, info: Info) -> Option<Info> {
        if let Some(i) = self.find(&id) {
            let old = std::mem::replace(&mut self.slots[i as usize].info, info);
            self.unlink(i);
            self.push_front(i);
            return Some(old);
        }
        let i = u32::try_from(self.slots.len()).expect("fewer than 4G objects");
        self.slots.push(Slot {
            id,
            info,
            prev: NIL,
            next: NIL,
        });
        let slots = &self.slots;
        self.table
            .insert_unique(hash(&id), i, |&j| hash(&slots[j as usize].id));
        self.push_front(i);
        None
    }

    /// The info of `id`, marking it most recently used.
    pub fn get(&mut self, id: &ObjectId) -> Option<&Info> {
        let i = self.find(id)?;
        self.unlink(i);
        self.push_front(i);
        Some(&self.slots[i as usize].info)
    }

    /// The info of `id` to change, order unchanged.
    pub fn peek_mut(&mut self, id: &ObjectId) -> Option<&mut Info> {
        let i = self.find(id)?;
        Some(&mut self.slots[i as usize].info)
    }

    /// Marks `id` most recently used.
    pub fn promote(&mut self, id: &ObjectId) {
        if let Some(i) = self.find(id) {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Removes `id`.
    pub fn pop(&mut self, id: &ObjectId) -> Option<Info> {
        let i = self.find(id)?;
        Some(self.remove_at(i).1)
    }

    /// Removes and returns the least recently used object.
    pub fn pop_lru(&mut self) -> Option<(ObjectId, Info)> {
        match self.tail {
            NIL => None,
            t => Some(self.remove_at(t)),
        }
    }

    fn remove_at(&mut self, i: u32) -> (ObjectId, Info) {
        self.unlink(i);
        let id = self.slots[i as usize].id;
        if let Ok(e) = self.table.find_entry(hash(&id), |&x| x == i) {
            e.remove();
        }
        let last = (self.slots.len() - 1) as u32;
        if i != last {
            // The last slot moves into the hole: repoint its neighbours, the
            // ends, and its table entry.
            let moved_id = self.slots[last as usize].id;
            if let Some(x) = self.table.find_mut(hash(&moved_id), |&x| x == last) {
                *x = i;
            }
            let (prev, next) = {
                let s = &self.slots[last as usize];
                (s.prev, s.next)
            };
            match prev {
                NIL => self.head = i,
                p => self.slots[p as usize].next = i,
            }
            match next {
                NIL => self.tail = i,
                n => self.slots[n as usize].prev = i,
            }
        }
        let s = self.slots.swap_remove(i as usize);
        if self.slots.is_empty() {
            self.head = NIL;
            self.tail = NIL;
        }
        (s.id, s.info)
    }

    /// Every object, most recently used first.
    pub fn iter(&self) -> impl Iterator<Item = (&ObjectId, &Info)> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let s = &self.slots[cur as usize];
            cur = s.next;
            Some((&s.id, &s.info))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ObjectId {
        // Ids sharing their first 8 bytes collide in the table on purpose
        // for small n: the equality check must tell them apart.
        let mut x = [0u8; 32];
        x[..4].copy_from_slice(&(n % 3).to_le_bytes());
        x[28..].copy_from_slice(&n.to_le_bytes());
        x
    }

    fn info(n: u64) -> Info {
        Info {
            size: n,
            verified: n * 7,
        }
    }

    /// Differential test against the `lru` crate under a pseudo-random mix
    /// of every operation.
    #[test]
    fn behaves_like_an_lru_cache() {
        let mut ours = ObjIndex::new();
        let mut theirs: lru::LruCache<ObjectId, Info> = lru::LruCache::unbounded();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = id((x % 300) as u32);
            match (x >> 20) % 7 {
                0 | 1 => assert_eq!(ours.put(k, info(step)), theirs.put(k, info(step))),
                2 => assert_eq!(ours.get(&k).copied(), theirs.get(&k).copied()),
                3 => assert_eq!(ours.pop(&k), theirs.pop(&k)),
                4 => assert_eq!(ours.pop_lru(), theirs.pop_lru()),
                5 => {
                    ours.promote(&k);
                    theirs.promote(&k);
                }
                _ => {
                    if let (Some(a), Some(b)) = (ours.peek_mut(&k), theirs.peek_mut(&k)) {
                        a.verified = step;
                        b.verified = step;
                    }
                }
            }
            assert_eq!(ours.len(), theirs.len());
            assert_eq!(ours.contains(&k), theirs.contains(&k));
            if step % 997 == 0 {
                let a: Vec<_> = ours.iter().map(|(k, v)| (*k, *v)).collect();
                let b: Vec<_> = theirs.iter().map(|(k, v)| (*k, *v)).collect();
                assert_eq!(a, b, "order at step {step}");
            }
        }
        while let Some(a) = ours.pop_lru() {
            assert_eq!(Some(a), theirs.pop_lru());
        }
        assert!(ours.is_empty() && theirs.is_empty());
    }
}
