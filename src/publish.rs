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
//! Contract: the name never holds partial content. A name that exists
//! already is left alone by [`publish`], which says so and leaves the
//! temporary file to the caller (to drop, or to [`replace`] what is there).
//! A crash between the two steps leaves only the temporary file, which its
//! owner's start-up sweep removes.

use std::io;
use std::path::Path;

/// Gives `tmp`'s file the name `dst` (same filesystem) and removes `tmp`:
/// true then. False if `dst` exists: both are left as they are. Falls
/// back to `rename` on filesystems without hard links.
pub fn publish(tmp: &Path, dst: &Path) -> io::Result<bool> {
    match std::fs::hard_link(tmp, dst) {
        Ok(()) => std::fs::remove_file(tmp).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) if no_hard_links(&e) => std::fs::rename(tmp, dst).map(|()| true),
        Err(e) => Err(e),
    }
}

/// Like [`publish`], but an existing `dst` is replaced: removed first, so
/// a reader may find no file for a moment, never a partial one.
pub fn replace(tmp: &Path, dst: &Path) -> io::Result<()> {
    for _ in 0..3 {
        match std::fs::hard_link(tmp, dst) {
            Ok(()) => return std::fs::remove_file(tmp),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match std::fs::remove_file(dst) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
            Err(e) if no_hard_links(&e) => return std::fs::rename(tmp, dst),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} keeps being recreated", dst.display()),
    ))
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
        assert!(publish(&a, &dst).unwrap());
        assert!(!a.exists());
        assert_eq!(std::fs::read(&dst).unwrap(), b"one");
        std::fs::write(&b, b"two").unwrap();
        assert!(!publish(&b, &dst).unwrap(), "the name existed");
        assert!(b.exists(), "the temporary file is the caller's");
        assert_eq!(std::fs::read(&dst).unwrap(), b"one", "the name is kept");
        std::fs::remove_file(&b).unwrap();
        std::fs::write(&b, b"three").unwrap();
        replace(&b, &dst).unwrap();
        assert!(!b.exists());
        assert_eq!(std::fs::read(&dst).unwrap(), b"three", "replaced");
    }
}
