//! Files written under a cache's `tmp/` and then given their final name:
//! crash safe, safe beside other processes on the same cache, and without
//! the filesystem's rename lock.
//!
//! Why unnamed: a [`TempFile`] is opened with `O_TMPFILE`, so while it is
//! written it has no name at all. A crash leaves nothing behind, and no
//! other process on the same cache (an `apt-layer cache` command, a second
//! daemon, `mount-image`) can take another's work in progress for a
//! leftover and remove it: a start-up sweep of named temporary files once
//! did exactly that to a daemon's objects in flight, which cost it a second
//! download of the layer.
//!
//! Why not `rename`: a rename between two directories takes the lock
//! of the whole filesystem (`s_vfs_rename_mutex`). overlayfs holds that
//! same lock of its upper filesystem while it copies a directory up, and
//! meanwhile it asks the lower filesystem for the directory's attributes.
//! With an overlay on `rootfs/` whose upper directory shares a filesystem
//! with the cache, the lower filesystem is this daemon: a request that waits
//! for a layer's objects, whose stream waits in `rename` for the lock the
//! overlay holds, hangs both for good. `linkat` locks only the target
//! directory, so a finished file always reaches its name.
//!
//! Contracts:
//! - **A name never holds partial content**: the file gets its name only
//!   once complete. [`TempFile::publish`] leaves an existing name alone
//!   and says so; [`TempFile::replace`] removes it first, so a reader may
//!   find no file for a moment, never a partial one.
//! - **Fallback** for filesystems without `O_TMPFILE` (NFS, some FUSE
//!   filesystems): a named `<pid>.<n>.tmp` file, held under an exclusive
//!   `flock` while it lives and removed when dropped. [`sweep`] removes
//!   only temporary files no process holds: a crash's leftovers.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A file being written in a directory, without a name until it is
/// published (see the module's contracts).
#[derive(Debug)]
pub struct TempFile {
    file: File,
    /// The fallback's name while it has one; `None` for an unnamed file.
    name: Option<PathBuf>,
}

impl TempFile {
    /// A new empty file in `dir` (which must be on the filesystem of the
    /// names it will be published under), open for reading and writing.
    pub fn new_in(dir: &Path) -> io::Result<TempFile> {
        match unnamed_in(dir, 0o666) {
            Ok(file) => return Ok(TempFile { file, name: None }),
            // No O_TMPFILE here (old kernels report EISDIR).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) => {}
            Err(e) => return Err(e),
        }
        Self::named_in(dir)
    }

    /// A [`TempFile::new_in`] holding `data`, flushed to the disk.
    pub fn with_data(dir: &Path, data: &[u8]) -> io::Result<TempFile> {
        use std::io::Write;
        let t = TempFile::new_in(dir)?;
        t.as_file().write_all(data)?;
        t.as_file().sync_all()?;
        Ok(t)
    }

    /// The fallback: a named file, locked while it lives.
    fn named_in(dir: &Path) -> io::Result<TempFile> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = dir.join(format!(
            "{}.{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&name)?;
        // SAFETY: a valid open fd.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_file(&name);
            return Err(e);
        }
        Ok(TempFile {
            file,
            name: Some(name),
        })
    }

    /// The open file.
    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// Gives the file the name `dst` (same filesystem): true then. False if
    /// `dst` exists: that name and this file are left as they are.
    pub fn publish(&mut self, dst: &Path) -> io::Result<bool> {
        let linked = match &self.name {
            None => link_unnamed(&self.file, dst),
            Some(name) => match std::fs::hard_link(name, dst) {
                Err(e) if no_hard_links(&e) => {
                    if dst.symlink_metadata().is_ok() {
                        return Ok(false);
                    }
                    std::fs::rename(name, dst)?;
                    self.name = None;
                    return Ok(true);
                }
                r => r,
            },
        };
        match linked {
            Ok(()) => {
                if let Some(name) = self.name.take() {
                    std::fs::remove_file(name)?;
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Like [`TempFile::publish`], but an existing `dst` is replaced.
    pub fn replace(&mut self, dst: &Path) -> io::Result<()> {
        for _ in 0..3 {
            if self.publish(dst)? {
                return Ok(());
            }
            match std::fs::remove_file(dst) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} keeps being recreated", dst.display()),
        ))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let _ = std::fs::remove_file(name);
        }
    }
}

/// A file in `dir` with no name (`O_TMPFILE`), open for reading and
/// writing: gone when closed, even after a crash.
pub fn unnamed_in(dir: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(mode)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
}

/// `linkat` of an `O_TMPFILE` file: through `/proc/self/fd` (any user),
/// else with `AT_EMPTY_PATH` (needs `CAP_DAC_READ_SEARCH`) where `/proc`
/// is not mounted.
fn link_unnamed(file: &File, dst: &Path) -> io::Result<()> {
    let dst = CString::new(dst.as_os_str().as_bytes())?;
    let fd = file.as_raw_fd();
    let proc = CString::new(format!("/proc/self/fd/{fd}"))?;
    // SAFETY: valid C strings and fd.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() != io::ErrorKind::NotFound || Path::new("/proc/self/fd").exists() {
        return Err(e);
    }
    // SAFETY: as above; "" with AT_EMPTY_PATH names `fd` itself.
    let r = unsafe {
        libc::linkat(
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes the files in `dir` that no process holds locked: temporary
/// files of writers that crashed (the fallback's, and those of older
/// versions). Unnamed files never need this. Errors are ignored: a
/// leftover costs only disk space.
pub fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = e.path();
        let Ok(f) = File::open(&path) else { continue };
        // SAFETY: a valid open fd. The lock goes with `f`.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let _ = std::fs::remove_file(&path);
        }
    }
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
    use std::io::Write;

    fn assert_only_dst(dir: &Path) {
        let names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["dst"], "nothing but the published name");
    }

    fn temp_with(dir: &Path, data: &[u8]) -> TempFile {
        let t = TempFile::new_in(dir).unwrap();
        t.as_file().write_all(data).unwrap();
        t
    }

    #[test]
    fn publishes_and_keeps_an_existing_name() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("dst");
        let mut a = temp_with(d.path(), b"one");
        assert!(a.publish(&dst).unwrap());
        assert_eq!(std::fs::read(&dst).unwrap(), b"one");
        let mut b = temp_with(d.path(), b"two");
        assert!(!b.publish(&dst).unwrap(), "the name existed");
        assert_eq!(std::fs::read(&dst).unwrap(), b"one", "the name is kept");
        let mut c = temp_with(d.path(), b"three");
        c.replace(&dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"three", "replaced");
        drop((a, b, c));
        assert_only_dst(d.path());
    }

    #[test]
    fn the_named_fallback_publishes_replaces_and_is_spared_while_held() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("dst");
        let named = |data: &[u8]| {
            let t = TempFile::named_in(d.path()).unwrap();
            t.as_file().write_all(data).unwrap();
            t
        };
        let mut a = named(b"one");
        sweep(d.path());
        assert!(a.name.as_ref().unwrap().exists(), "swept while held");
        assert!(a.publish(&dst).unwrap());
        assert!(a.name.is_none());
        let mut b = named(b"two");
        assert!(!b.publish(&dst).unwrap());
        b.replace(&dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"two");
        let c = named(b"dropped");
        drop((a, b, c));
        assert_only_dst(d.path());
    }

    #[test]
    fn a_file_being_written_has_no_name_and_a_sweep_spares_it() {
        let d = tempfile::tempdir().unwrap();
        let t = temp_with(d.path(), b"in flight");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        // A crash's leftover (named, nobody holds it) goes; a held one stays.
        std::fs::write(d.path().join("obj.1.2"), b"left over").unwrap();
        let held = d.path().join("9.9.tmp");
        let f = File::create(&held).unwrap();
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        sweep(d.path());
        assert!(!d.path().join("obj.1.2").exists(), "leftover not swept");
        assert!(held.exists(), "a file some writer holds was swept");
        drop(f);
        sweep(d.path());
        assert!(!held.exists());
        drop(t);
    }
}
