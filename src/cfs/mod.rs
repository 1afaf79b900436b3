//! composefs: every image as an EROFS `image.cfs` whose files redirect to
//! the content store, and kernel mounts of it (`apt-layer mount-image`).
//!
//! Why: the content store already has the composefs repository layout
//! (`objects/<2 hex>/<62 hex>`), so an image made of metadata only plus an
//! overlay with `objects/` as data-only lower layer gives a kernel
//! filesystem with the page cache shared by every image — no FUSE round
//! trips, no copies.
//!
//! - [`build`]: the merged tree → EROFS bytes (the same tree `rootfs/` serves).
//! - [`images`]: built images persisted by manifest digest, verified.
//! - [`mount`]: the kernel mount (erofs + overlay) and its preconditions.
//! - Pinning the objects of a mount lives with the store ([`crate::pins`]).
//!
//! This module's functions are shared by the FUSE tree (`<tag>/image.cfs`)
//! and the `mount-image` command.

pub mod build;
pub mod images;
pub mod mount;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use crate::cas::ObjectId;
use crate::model::FsError;
use crate::rootfs::{Layers, Rootfs};
use images::ImageStore;

/// What can go wrong making or mounting a composefs image.
#[derive(Debug, thiserror::Error)]
pub enum CfsError {
    /// Fetching layers or objects failed (carries the model's error, and
    /// with it the errno users see).
    #[error(transparent)]
    Fetch(#[from] FsError),
    /// The tree cannot be expressed as an EROFS image.
    #[error("cannot build image.cfs: {0}")]
    Build(String),
    /// Local I/O on the cache.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel cannot do what the mount needs.
    #[error("{0}")]
    Kernel(String),
    /// A mount system call failed.
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        /// Which mount (erofs image, overlay).
        what: String,
        /// Where.
        target: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
}

impl CfsError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CfsError {
        let what = what.into();
        move |source| CfsError::Io { what, source }
    }
}

impl From<CfsError> for FsError {
    fn from(e: CfsError) -> FsError {
        match e {
            CfsError::Fetch(e) => e,
            CfsError::Io { what, source } => FsError::Io {
                no_space: source.raw_os_error() == Some(libc::ENOSPC),
                reason: format!("{what}: {source}"),
            },
            other => FsError::Io {
                reason: other.to_string(),
                no_space: false,
            },
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> CfsError {
    CfsError::Build(format!("worker failed: {e}"))
}

/// Opens object `id` of layer `layer` of `rf`, verified, refetching it
/// once if it is missing or damaged; also says whether it was refetched.
pub async fn object(
    rf: &Rootfs,
    layers: &Layers,
    id: ObjectId,
    layer: u16,
) -> Result<(File, bool), CfsError> {
    for attempt in 0..2 {
        let store = layers.store().clone();
        if let Some(f) = tokio::task::spawn_blocking(move || store.get(&id))
            .await
            .map_err(join_error)?
        {
            return Ok((f, attempt > 0));
        }
        if attempt == 0 {
            let desc = rf.image.layers.get(layer as usize).ok_or_else(|| {
                CfsError::Build(format!("object of layer {layer}, which the image lacks"))
            })?;
            layers.refetch(&rf.registry, &rf.repo, desc, id).await?;
        }
    }
    Err(FsError::Io {
        reason: format!(
            "object {} missing after reading its layer again",
            crate::cas::object_hex(&id)
        ),
        no_space: false,
    }
    .into())
}

/// The `image.cfs` of `rf`: from `images` if built before, else built from
/// the merged tree (streaming layers if needed) and stored.
pub async fn image(
    rf: &Rootfs,
    layers: &Layers,
    images: &Arc<ImageStore>,
) -> Result<(File, u64), CfsError> {
    let manifest = rf.image.manifest.digest.clone();
    {
        let (images, m) = (images.clone(), manifest.clone());
        if let Some(found) = tokio::task::spawn_blocking(move || images.get(&m))
            .await
            .map_err(join_error)?
        {
            return Ok(found);
        }
    }
    let tree = rf.tree(layers).await?;
    let started = std::time::Instant::now();
    let mut inline: HashMap<ObjectId, Box<[u8]>> = HashMap::new();
    for (id, layer, size) in build::inline_objects(&tree) {
        let (mut f, _) = object(rf, layers, id, layer).await?;
        let mut buf = Vec::with_capacity(size as usize);
        f.read_to_end(&mut buf)
            .map_err(CfsError::io("reading a small object"))?;
        inline.insert(id, buf.into_boxed_slice());
    }
    let (images, t) = (images.clone(), tree.clone());
    let entries = tree.len();
    let name = format!("{}/{}@{manifest}", rf.registry, rf.repo);
    let r = tokio::task::spawn_blocking(move || {
        let bytes = build::build_image(&t, &inline, &build::Verity::Off)?;
        images
            .put(&manifest, &bytes)
            .map_err(CfsError::io("storing image.cfs"))
    })
    .await
    .map_err(join_error)?;
    if let Ok((_, size)) = &r {
        tracing::info!(image = %name, entries, bytes = size, ms = started.elapsed().as_millis() as u64, "image.cfs built");
    }
    r
}
