//! Persistent pins: objects the kernel reads behind our back.
//!
//! A composefs mount (`apt-layer mount-image`) makes the kernel read
//! objects straight from `objects/`; it outlives the process that made it,
//! and any process sharing the cache directory (the daemon, `cache gc`, a
//! second `mount-image`) may evict. So pins live on disk:
//!
//! ```text
//! <cache-dir>/pins/
//! ├── .lock                          flock: held while pins are written or honoured
//! └── <manifest hex>-<16 hex>.json   one per mount: {manifest, mountpoint, pid, objects}
//! ```
//!
//! Contract:
//! - **Honoured everywhere**: [`crate::cas::ObjectStore`] never unlinks an
//!   object named by a live pin. Eviction takes the lock, reads the pins
//!   and unlinks its victims before releasing it; a pin is written under
//!   the same lock. So once [`Pins::add`] returned, no eviction can remove
//!   a pinned object, and whoever pinned re-checks every object afterwards
//!   (`mount-image` verifies or refetches all of them before mounting).
//! - **Live** means: the process that wrote the pin is still running (it
//!   is preparing the mount), or `/proc/self/mountinfo` shows an overlay
//!   mounted at the pin's mountpoint over this cache's `objects/`. Mount
//!   namespaces are not crossed: a mount made in another namespace is not
//!   seen, so use one namespace for the mounts and the cache's users.
//! - **Stale pins are dropped** by whoever reads them (eviction, `cache
//!   gc`): after `umount DIR` the next eviction removes the pin file and
//!   the objects become evictable again.
//! - Reading is cheap: the parsed set is cached and reloaded only when the
//!   directory changes, or every few seconds to notice unmounts.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cas::ObjectId;

/// How often liveness is re-checked when the directory did not change.
const RECHECK: Duration = Duration::from_secs(2);

/// One pin: a mount (or a mount being prepared) and the objects it needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pin {
    /// `sha256:<hex>` of the mounted image's manifest.
    pub manifest: String,
    /// Where the overlay is (to be) mounted, absolute.
    pub mountpoint: PathBuf,
    /// The `objects/` directory the overlay reads (identifies the cache).
    pub objects_dir: PathBuf,
    /// The process preparing the mount.
    pub pid: u32,
    /// Hex ids of every object the image needs.
    pub objects: Vec<String>,
}

#[derive(Default)]
struct Cached {
    dir_stamp: Option<(i64, i64, u64)>,
    checked: Option<Instant>,
    ids: Arc<HashSet<ObjectId>>,
}

/// The pins of one cache directory.
pub struct Pins {
    dir: PathBuf,
    lock_file: File,
    cache: Mutex<Cached>,
}

/// Held while pins are written or honoured (an exclusive `flock`).
pub struct PinLock<'a> {
    _pins: &'a Pins,
    fd: i32,
}

impl Drop for PinLock<'_> {
    fn drop(&mut self) {
        // SAFETY: fd is the lock file's descriptor, open for the life of Pins.
        unsafe {
            libc::flock(self.fd, libc::LOCK_UN);
        }
    }
}

impl Pins {
    /// The pins under `cache_dir` (creating `pins/`).
    pub fn open(cache_dir: &Path) -> io::Result<Pins> {
        let dir = cache_dir.join("pins");
        std::fs::create_dir_all(&dir)?;
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))?;
        Ok(Pins {
            dir,
            lock_file,
            cache: Mutex::new(Cached::default()),
        })
    }

    /// Takes the lock (blocking).
    pub fn lock(&self) -> io::Result<PinLock<'_>> {
        let fd = self.lock_file.as_raw_fd();
        loop {
            // SAFETY: fd is a valid open descriptor.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
                return Ok(PinLock { _pins: self, fd });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn file_name(manifest: &str, mountpoint: &Path) -> String {
        let hex = manifest.strip_prefix("sha256:").unwrap_or(manifest);
        let mut h = crate::cas::Sha256::new();
        h.update(mountpoint.as_os_str().as_encoded_bytes());
        format!("{hex}-{}.json", &hex::encode(h.finish())[..16])
    }

    /// Writes `pin` (replacing one for the same image and mountpoint);
    /// returns its path.
    pub fn add(&self, pin: &Pin) -> io::Result<PathBuf> {
        let _l = self.lock()?;
        let path = self
            .dir
            .join(Self::file_name(&pin.manifest, &pin.mountpoint));
        let tmp = self.dir.join(format!(".tmp.{}", std::process::id()));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(pin).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        self.cache.lock().unwrap().dir_stamp = None;
        Ok(path)
    }

    /// Removes a pin file (the mount it was for failed or is gone).
    pub fn remove(&self, path: &Path) {
        let _l = self.lock();
        let _ = std::fs::remove_file(path);
        self.cache.lock().unwrap().dir_stamp = None;
    }

    /// Every pin on disk with whether it is live.
    pub fn list(&self) -> Vec<(PathBuf, Pin, bool)> {
        let mounts = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(pin) = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice::<Pin>(&b).ok())
            else {
                continue;
            };
            let live = pid_alive(pin.pid) || overlay_mounted(&mounts, &pin);
            out.push((p, pin, live));
        }
        out
    }

    /// The objects of every live pin; stale pin files are removed. The
    /// caller holds the lock while it acts on the answer.
    pub fn pinned(&self, _lock: &PinLock<'_>) -> Arc<HashSet<ObjectId>> {
        let stamp = std::fs::metadata(&self.dir)
            .ok()
            .map(|m| (m.mtime(), m.mtime_nsec(), m.ino()));
        let mut c = self.cache.lock().unwrap();
        let fresh = c.dir_stamp.is_some()
            && c.dir_stamp == stamp
            && c.checked.is_some_and(|t| t.elapsed() < RECHECK);
        if fresh {
            return c.ids.clone();
        }
        let mut ids = HashSet::new();
        for (path, pin, live) in self.list() {
            if !live {
                tracing::info!(pin = %path.display(), mountpoint = %pin.mountpoint.display(), "dropping stale pin (not mounted any more)");
                let _ = std::fs::remove_file(&path);
                continue;
            }
            for h in &pin.objects {
                let mut id = [0u8; 32];
                if hex::decode_to_slice(h, &mut id).is_ok() {
                    ids.insert(id);
                }
            }
        }
        // Stamp after the removals above, so they do not force a reload.
        c.dir_stamp = std::fs::metadata(&self.dir)
            .ok()
            .map(|m| (m.mtime(), m.mtime_nsec(), m.ino()));
        c.checked = Some(Instant::now());
        c.ids = Arc::new(ids);
        c.ids.clone()
    }
}

fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Undoes the octal escapes (`\040`) of /proc/self/mountinfo fields.
pub fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// One line of /proc/self/mountinfo: (mount point, fs type, source, super options).
pub fn parse_mountinfo_line(line: &str) -> Option<(Vec<u8>, &str, &str, &str)> {
    let (pre, post) = line.split_once(" - ")?;
    let mountpoint = unescape_mountinfo(pre.split(' ').nth(4)?);
    let mut p = post.splitn(3, ' ');
    Some((mountpoint, p.next()?, p.next()?, p.next().unwrap_or("")))
}

fn overlay_mounted(mountinfo: &[u8], pin: &Pin) -> bool {
    let mp = pin.mountpoint.as_os_str().as_encoded_bytes();
    let objects = pin.objects_dir.to_string_lossy();
    String::from_utf8_lossy(mountinfo).lines().any(|l| {
        parse_mountinfo_line(l).is_some_and(|(m, fstype, _, opts)| {
            m == mp && fstype == "overlay" && {
                let opts = String::from_utf8_lossy(&unescape_mountinfo(opts)).replace("\\:", ":");
                opts.contains(&*objects)
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_pins_are_dropped_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let pins = Pins::open(d.path()).unwrap();
        let id = [7u8; 32];
        let live = Pin {
            manifest: "sha256:aa".into(),
            mountpoint: "/nowhere/a".into(),
            objects_dir: d.path().join("objects"),
            pid: std::process::id(),
            objects: vec![hex::encode(id)],
        };
        let stale = Pin {
            mountpoint: "/nowhere/b".into(),
            pid: 0,
            objects: vec![hex::encode([8u8; 32])],
            ..live.clone()
        };
        pins.add(&live).unwrap();
        let stale_path = pins.add(&stale).unwrap();
        let set = pins.pinned(&pins.lock().unwrap());
        assert!(set.contains(&id));
        assert!(!set.contains(&[8u8; 32]));
        assert!(!stale_path.exists());
    }

    #[test]
    fn mountinfo_lines() {
        let l = "36 35 0:30 / /mnt/with\\040space rw,relatime shared:1 - overlay overlay ro,lowerdir=/a::/c/objects,metacopy=on";
        let (m, t, s, o) = parse_mountinfo_line(l).unwrap();
        assert_eq!(m, b"/mnt/with space");
        assert_eq!((t, s), ("overlay", "overlay"));
        assert!(o.contains("/c/objects"));
    }
}
