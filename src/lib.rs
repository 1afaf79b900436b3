//! apt-layer: container registries as a filesystem.
//!
//! The crate is drawn in layers, each depending only on the ones above it:
//!
//! ```text
//! config    what the user configured: mount options, auth files, registries.conf
//! registry  talking to registries: names, auth, mirrors, timeouts, retries, digests
//! store     what is kept on disk: metadata blobs by digest (never evicted)
//! cas       the content store: file contents as objects by sha256, LRU-bounded
//! objindex  the store's compact in-memory index (LRU order, ~60 B per object)
//! objwatch  a daemon's store following other processes on the same cache
//! pins      objects kept for kernel mounts, honoured by every process's eviction
//! publish   naming a finished file without the filesystem-wide rename lock
//! layer     reading a layer once into an index plus objects; indexes on disk
//! rootfs    merging layer indexes into an image's tree, fetching on demand
//! cfs       composefs: image.cfs from the merged tree, kernel mounts of it
//! inspect   the JSON skopeo prints, computed from manifest + config + tags
//! model     the tree users see: nodes, inodes, TTLs, listings, file contents
//! outbox    the writable outbox/: staging trees on disk, layers, pushing them
//! fuse      the thin kernel adapter: decode a request, call the model, reply
//! daemon    mounting, daemonising, readiness and clean shutdown
//! ```
#![warn(missing_docs)]

pub mod cas;
pub mod cfs;
pub mod config;
pub mod daemon;
pub mod fuse;
pub mod inspect;
pub mod layer;
pub mod model;
pub mod objindex;
pub mod objwatch;
pub mod outbox;
pub mod pins;
pub mod publish;
pub mod registry;
pub mod rootfs;
pub mod singleflight;
pub mod stamps;
pub mod store;
