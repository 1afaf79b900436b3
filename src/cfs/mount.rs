//! `apt-layer mount-image REF DIR`: a kernel composefs mount of an image.
//!
//! ```text
//! DIR                         overlay, ro, metacopy=on, redirect_dir=on
//! ├── lower:  <helper>        erofs of <cache>/images/<hex>.cfs (metadata)
//! └── data:   <cache>/objects data-only lower layer: file contents
//! ```
//!
//! Steps, and why in this order:
//! 1. The kernel is checked first (EROFS on a regular file needs ≥ 6.12,
//!    data-only overlay lowers ≥ 6.5), so a user learns that before any
//!    download.
//! 2. The merged tree and `image.cfs` are made (streaming layers once).
//! 3. The image's objects are pinned ([`crate::pins`]) — before they are
//!    checked, so no eviction can remove one between check and mount.
//! 4. Every object is opened through the store, which hashes it in this
//!    process: a missing or damaged object is fetched again. This is the
//!    integrity check: without fs-verity overlay does not verify data — an
//!    object damaged after mounting is served as it is on disk (tested),
//!    one removed gives `ENOENT` — see "fs-verity" below.
//! 5. EROFS is mounted on a private helper directory under
//!    `<cache>/mnt/`, the overlay on DIR, and the helper is detached at
//!    once (`umount -l`): the overlay keeps its own reference to the erofs
//!    superblock, so `umount DIR` is the only cleanup there is and leaves
//!    no mount behind. A helper whose process died before the detach (a
//!    `kill -9` mid-mount) is unmounted and removed by the next mount-image.
//!
//! fs-verity: the objects' filesystem here (ext4 without
//! `CONFIG_FS_VERITY`) cannot do it, so images are made without digests
//! and mounted without `verity=`; [`verity_supported`] says whether the
//! objects' filesystem could. Where it can, the path is: enable verity on
//! each object (`FS_IOC_ENABLE_VERITY`), measure it, build the image with
//! [`super::build::Verity::Digests`] and mount the overlay with
//! `verity=require`; composefs names redirects by the embedded digest, so
//! the data-only layer must then hold the objects under their fs-verity
//! names (hard links next to `objects/`). Not done yet: it cannot be tested
//! on this kernel, and an untested security path is worse than a clearly
//! insecure one; `mount-image` says which mode it used.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::CfsError;
use crate::pins::Pin;
use crate::rootfs::{Layers, Rootfs};

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // SAFETY: release is NUL-terminated by the kernel.
    let rel = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
    let mut it = rel.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Checks that this kernel can mount an EROFS file under an overlay with a
/// data-only lower layer; the error says what is missing.
pub fn check_kernel() -> Result<(), CfsError> {
    let (maj, min) = kernel_version()
        .ok_or_else(|| CfsError::Kernel("cannot read the kernel version".into()))?;
    if (maj, min) < (6, 12) {
        return Err(CfsError::Kernel(format!(
            "kernel {maj}.{min} is too old for mount-image: it needs 6.12 or later \
             (EROFS from a regular file; data-only overlay lower layers need 6.5). \
             On older kernels mount <cache>/images/<digest>.cfs through a loop device by hand."
        )));
    }
    Ok(())
}

/// Whether the filesystem holding `dir` supports fs-verity (probed by
/// measuring a file: `ENODATA` means supported but not enabled on it,
/// `EOPNOTSUPP`/`ENOTTY` means unsupported).
pub fn verity_supported(dir: &Path) -> bool {
    const FS_IOC_MEASURE_VERITY: libc::c_ulong = 0xc004_6686;
    let Ok(f) = std::fs::File::open(dir) else {
        return false;
    };
    #[repr(C)]
    struct Digest {
        alg: u16,
        size: u16,
        digest: [u8; 64],
    }
    let mut d = Digest {
        alg: 0,
        size: 64,
        digest: [0; 64],
    };
    // SAFETY: the ioctl reads/writes the struct we pass.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            FS_IOC_MEASURE_VERITY,
            &mut d,
        )
    };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODATA)
}

fn cstr(p: &Path) -> Result<CString, CfsError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| CfsError::Kernel(format!("{} contains a NUL byte", p.display())))
}

/// Escapes a path for an overlay option value.
fn ovl_escape(p: &Path) -> String {
    let mut s = String::new();
    for c in p.to_string_lossy().chars() {
        if matches!(c, ',' | ':' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

fn sys_mount(
    src: &Path,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
    what: &str,
) -> Result<(), CfsError> {
    let (s, t) = (cstr(src)?, cstr(target)?);
    let fs = CString::new(fstype).expect("no NUL");
    let d = CString::new(data).map_err(|_| CfsError::Kernel("NUL in mount options".into()))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            fs.as_ptr(),
            flags,
            d.as_ptr().cast(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    let hint = match source.raw_os_error() {
        Some(libc::ENODEV) => format!(" (the kernel has no {fstype}: modprobe {fstype})"),
        Some(libc::EPERM) => " (mounting needs root)".into(),
        _ => String::new(),
    };
    Err(CfsError::Mount {
        what: format!("{what}{hint}"),
        target: target.display().to_string(),
        source,
    })
}

/// Lazily unmounts `p`; whether something was mounted there.
fn detach(p: &Path) -> bool {
    match cstr(p) {
        // SAFETY: c is a valid path.
        Ok(c) => unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 },
        Err(_) => false,
    }
}

/// Removes helpers (`<stem>.<pid>` under `helper_root`) whose `mount-image`
/// process is gone: one killed between mounting EROFS and detaching it left
/// that mount behind. Helpers of live processes are theirs, mid-mount.
fn sweep_helpers(helper_root: &Path) {
    let Ok(dir) = std::fs::read_dir(helper_root) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.rsplit_once('.'))
            .and_then(|(_, pid)| pid.parse::<libc::pid_t>().ok())
            .filter(|&pid| pid > 0)
        else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if alive {
            continue;
        }
        let path = e.path();
        if detach(&path) {
            tracing::warn!(helper = %path.display(), "unmounted a helper an interrupted mount-image left behind");
        }
        let _ = std::fs::remove_dir(&path);
    }
}

/// Mounts `image` (an EROFS file) with `objects` as the data-only layer on
/// `target`, read-only. The EROFS helper mount under `helper_root` is
/// detached before returning, so unmounting `target` cleans up everything.
pub fn mount_composefs(
    image: &Path,
    objects: &Path,
    target: &Path,
    helper_root: &Path,
) -> Result<(), CfsError> {
    std::fs::create_dir_all(helper_root).map_err(CfsError::io("creating the helper directory"))?;
    sweep_helpers(helper_root);
    let helper = helper_root.join(format!(
        "{}.{}",
        image.file_stem().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir_all(&helper).map_err(CfsError::io("creating the helper directory"))?;
    let r = (|| {
        sys_mount(
            image,
            &helper,
            "erofs",
            libc::MS_RDONLY,
            "",
            "the EROFS image",
        )?;
        let opts = format!(
            "metacopy=on,redirect_dir=on,lowerdir={}::{}",
            ovl_escape(&helper),
            ovl_escape(objects)
        );
        let over = sys_mount(
            Path::new("overlay"),
            target,
            "overlay",
            libc::MS_RDONLY,
            &opts,
            "the overlay",
        );
        detach(&helper);
        over
    })();
    let _ = std::fs::remove_dir(&helper);
    r
}

/// What [`mount_image`] reports as it goes.
pub trait Progress {
    /// A new phase (`layers`, `image`, `objects`, `mount`) of `total` bytes.
    fn phase(&self, name: &str, total: u64);
    /// `done` bytes of the phase so far.
    fn advance(&self, done: u64);
}

/// What a finished mount is.
#[derive(Debug)]
pub struct Mounted {
    /// Manifest digest of the image.
    pub manifest: String,
    /// Entries of the tree.
    pub entries: usize,
    /// Distinct objects the kernel reads.
    pub objects: usize,
    /// Objects fetched again (missing or damaged).
    pub refetched: usize,
    /// The image file.
    pub image: PathBuf,
    /// Whether fs-verity protects the data (never yet; see the module docs).
    pub verity: bool,
}

/// Builds the tree and image of `rf`, pins and checks every object, and
/// mounts on `target` (see the module docs for the order).
pub async fn mount_image(
    cache_dir: &Path,
    layers: &Layers,
    rf: &Rootfs,
    target: &Path,
    progress: &dyn Progress,
) -> Result<Mounted, CfsError> {
    check_kernel()?;
    let target = std::fs::canonicalize(target)
        .map_err(CfsError::io(format!("mount point {}", target.display())))?;
    if !target.is_dir() {
        return Err(CfsError::Kernel(format!(
            "{} is not a directory",
            target.display()
        )));
    }
    let images = Arc::new(
        super::images::ImageStore::open(cache_dir).map_err(CfsError::io("cache directory"))?,
    );
    let store = layers.store();
    let objects_dir =
        std::fs::canonicalize(store.objects_dir()).map_err(CfsError::io("objects directory"))?;
    let manifest = rf.image.manifest.digest.clone();
    let layer_bytes = rf.image.layers.iter().map(|l| l.size).sum();

    progress.phase("layers", layer_bytes);
    let tree = rf.tree(layers).await?;
    progress.advance(layer_bytes);
    progress.phase("image", tree.len() as u64);
    let (_, _) = super::image(rf, layers, &images).await?;
    progress.advance(tree.len() as u64);

    let external = super::build::external_objects(&tree);
    let mut all: Vec<String> = tree.objects().map(|(id, _, _)| hex::encode(id)).collect();
    all.sort_unstable();
    all.dedup();
    let pin = Pin {
        manifest: manifest.clone(),
        mountpoint: target.clone(),
        objects_dir: objects_dir.clone(),
        pid: std::process::id(),
        objects: all,
    };
    let pin_path = store
        .pins()
        .add(&pin)
        .map_err(CfsError::io("writing the pin"))?;
    let r = async {
        let total: u64 = external.iter().map(|o| o.2).sum();
        progress.phase("objects", total);
        let mut done = 0;
        let mut refetched = 0;
        for &(id, layer, size) in &external {
            let (_verified, again) = super::object(rf, layers, id, layer).await?;
            refetched += again as usize;
            done += size;
            progress.advance(done);
        }
        progress.phase("mount", 0);
        mount_composefs(
            &images.path(&manifest),
            &objects_dir,
            &target,
            &cache_dir.join("mnt"),
        )?;
        Ok::<_, CfsError>(refetched)
    }
    .await;
    match r {
        Ok(refetched) => Ok(Mounted {
            manifest,
            entries: tree.len(),
            objects: external.len(),
            refetched,
            image: images.path(&pin.manifest),
            verity: false,
        }),
        Err(e) => {
            store.pins().remove(&pin_path);
            Err(e)
        }
    }
}
