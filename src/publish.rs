//! Putting a finished temporary file under its final name without taking
//! the filesystem's rename lock.
//!
//! Why not `rename`: a rename between two directories takes the lock
//! of the whole filesystem (`s_vfs_rename_mutex`). overlayfs holds that
//! same lock of its upper filesystem while it copies a directory up, and
//! meanwhile it asks the lower filesystem for the directory's attributes.
//! With an overlay on `rootfs/` whose upper directory shares a filesystem
//! with the cache, the lower filesystem is this daemon: a request that waits
//! for a layer's objects, whose stream waits in `rename` for the lock the
//! overlay holds, hangs both for good. `link` then `unlink` locks only the
//! two directories, so a finished object always reaches its name.
//!
//! Contract: for names that identify their content (a digest, or a manifest
//! digest for what is built from it deterministically). A name that exists
//! already is kept and the temporary file is dropped: both hold the same
//! bytes. The name never holds partial content; a crash between the two
//! steps leaves only the temporary file, which its owner's start-up sweep
//! removes.

use std::io;
use std::path::Path;

/// Gives `tmp`'s file the name `dst` (same filesystem) and removes `tmp`.
/// An existing `dst` is kept. Falls back to `rename` on filesystems
/// without hard links.
pub fn publish(tmp: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::hard_link(tmp, dst) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if no_hard_links(&e) => return std::fs::rename(tmp, dst),
        Err(e) => return Err(e),
    }
    std::fs::remove_file(tmp)
}

/// Errors of `link` on a filesystem that has no hard links.
fn no_hard_links(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_and_keeps_an_existing_name() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, dst) = (d.path().join("a"), d.path().join("b"), d.path().join("dst"));
        std::fs::write(&a, b"one").unwrap();
        publish(&a, &dst).unwrap();
        assert!(!a.exists());
        assert_eq!(std::fs::read(&dst).unwrap(), b"one");
        std::fs::write(&b, b"two").unwrap();
        publish(&b, &dst).unwrap();
        assert!(!b.exists(), "the temporary file is removed");
        assert_eq!(std::fs::read(&dst).unwrap(), b"one", "the name is kept");
    }
}
