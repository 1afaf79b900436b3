//! Turning a directory into one OCI layer: a tar stream compressed with
//! gzip (flate2, zlib-rs backend), written once to a temporary file while
//! the sha256 of both the compressed bytes (the blob digest) and the tar
//! (the config's `diff_id`) are computed. The layer is never held in memory
//! and never written twice.
//!
//! Determinism contract: the same tree always gives the same bytes, hence
//! the same digests. Entries are visited depth-first with the children of
//! each directory sorted by their name bytes; headers are POSIX ustar with
//! fixed fields (no user or group names, no atime/ctime, zero for unused
//! numbers) and PAX records, in a fixed order, only for what ustar cannot
//! hold (long names and link targets, large ids or sizes, negative or
//! sub-second mtimes) and for extended attributes (`SCHILY.xattr.<name>`,
//! sorted by name); the gzip header has mtime 0 and OS 255.
//!
//! Compression runs on every core, the way pigz does it, and still yields
//! one ordinary gzip member: the tar stream is cut into 1 MiB chunks, each
//! deflated on its own with the previous chunk's last 32 KiB as dictionary
//! and ended by a sync flush, so the pieces concatenate into one deflate
//! stream. Chunk boundaries depend only on byte offsets, never on the
//! number of threads, so the digest does not either.
//!
//! What goes in: modes including setuid/setgid/sticky, owners as numbers,
//! mtimes to the nanosecond, extended attributes (except
//! `security.selinux`, which belongs to the host, and apt-layer's own
//! `user.apt-layer.*` markers), symlinks, devices, fifos, and hard links
//! (the first path in visiting order carries the data, later ones link to
//! it). Sockets cannot be represented in tar and are skipped (and named in
//! [`LayerFile::skipped`]). The root directory itself is the entry `./`.
//!
//! A file that disappears or changes while it is read makes the build fail
//! with [`LayerError::Vanished`] or [`LayerError::Changed`]; a layer is
//! never written with contents that do not match its headers.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::cas::Sha256;
use flate2::{Compress, Compression, FlushCompress, Status};

/// Prefix of the extended attributes apt-layer keeps for itself on staged
/// directories; never part of a layer and never shown to users.
pub const OWN_XATTR_PREFIX: &[u8] = b"user.apt-layer.";

/// Media type of the layers apt-layer writes.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Why a layer could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LayerError {
    /// Reading the tree or writing the temporary file failed.
    #[error("{op} {path}: {reason}")]
    Io {
        /// What was being done (`read`, `list`, `write layer` …).
        op: &'static str,
        /// The path involved.
        path: String,
        /// The OS error.
        reason: String,
        /// The disk is full.
        no_space: bool,
    },
    /// A file or directory went away while the layer was written.
    #[error("{path} vanished while the layer was written")]
    Vanished {
        /// The path, relative to the tree.
        path: String,
    },
    /// A file changed (size, inode, mtime) while it was read.
    #[error("{path} changed while the layer was written")]
    Changed {
        /// The path, relative to the tree.
        path: String,
    },
}

impl LayerError {
    /// The same error with its path shown relative to `root`.
    fn relative_to(self, root: &Path) -> LayerError {
        let strip = |p: String| match Path::new(&p).strip_prefix(root) {
            Ok(r) if r.as_os_str().is_empty() => "./".to_string(),
            Ok(r) => r.display().to_string(),
            Err(_) => p,
        };
        match self {
            LayerError::Io {
                op,
                path,
                reason,
                no_space,
            } => LayerError::Io {
                op,
                path: strip(path),
                reason,
                no_space,
            },
            LayerError::Vanished { path } => LayerError::Vanished { path: strip(path) },
            LayerError::Changed { path } => LayerError::Changed { path: strip(path) },
        }
    }

    fn io(op: &'static str, path: &Path, e: &io::Error) -> LayerError {
        if e.kind() == io::ErrorKind::NotFound {
            return LayerError::Vanished {
                path: path.display().to_string(),
            };
        }
        LayerError::Io {
            op,
            path: path.display().to_string(),
            reason: e.to_string(),
            no_space: e.raw_os_error() == Some(libc::ENOSPC),
        }
    }
}

/// Counters a caller may watch while a layer is written.
#[derive(Debug, Default)]
pub struct LayerProgress {
    /// Bytes of file contents read so far.
    pub read: AtomicU64,
    /// Bytes of file contents in the tree (known after the walk).
    pub total: AtomicU64,
}

/// A finished layer in a temporary file, removed when this is dropped.
#[derive(Debug)]
pub struct LayerFile {
    /// The temporary file.
    pub path: PathBuf,
    /// `sha256:` of the compressed bytes (the blob).
    pub digest: String,
    /// `sha256:` of the tar (the config's diff_id).
    pub diff_id: String,
    /// Size of the blob.
    pub size: u64,
    /// Size of the tar.
    pub uncompressed: u64,
    /// Entries written.
    pub entries: u64,
    /// Paths that could not be put in the layer (sockets).
    pub skipped: Vec<String>,
}

impl Drop for LayerFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the walk records of one path (lstat).
struct Item {
    /// Name in the archive (`./` for the root, `dir/` for directories).
    name: Vec<u8>,
    /// Path on disk.
    full: PathBuf,
    meta: std::fs::Metadata,
}

/// Writes the layer of the tree at `src` into a new file in `tmp_dir`.
/// Paths in errors are relative to `src` (`./` for the root).
pub fn build(
    src: &Path,
    tmp_dir: &Path,
    progress: &LayerProgress,
) -> Result<LayerFile, LayerError> {
    build_in(src, tmp_dir, progress).map_err(|e| e.relative_to(src))
}

fn build_in(src: &Path, tmp_dir: &Path, progress: &LayerProgress) -> Result<LayerFile, LayerError> {
    let mut items = Vec::new();
    let root_meta = std::fs::symlink_metadata(src).map_err(|e| LayerError::io("stat", src, &e))?;
    if !root_meta.is_dir() {
        return Err(LayerError::Io {
            op: "read",
            path: src.display().to_string(),
            reason: "not a directory".into(),
            no_space: false,
        });
    }
    items.push(Item {
        name: b"./".to_vec(),
        full: src.to_path_buf(),
        meta: root_meta,
    });
    walk(src, &[], &mut items)?;
    let total: u64 = items
        .iter()
        .filter(|i| i.meta.is_file())
        .map(|i| i.meta.size())
        .sum();
    progress.total.store(total, Relaxed);

    std::fs::create_dir_all(tmp_dir).map_err(|e| LayerError::io("create", tmp_dir, &e))?;
    let path = tmp_dir.join(format!(
        "layer-{}-{}.tar.gz",
        std::process::id(),
        NEXT.fetch_add(1, Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| LayerError::io("create", &path, &e))?;
    // From here on the file is removed on every error (LayerFile's drop).
    let mut out = LayerFile {
        path,
        digest: String::new(),
        diff_id: String::new(),
        size: 0,
        uncompressed: 0,
        entries: 0,
        skipped: Vec::new(),
    };
    let werr = |e: io::Error, p: &Path| LayerError::io("write layer", p, &e);
    let compressed = HashWriter::new(BufWriter::with_capacity(1 << 20, file));
    let gz = ParallelGz::new(compressed).map_err(|e| werr(e, &out.path))?;
    let mut tar = HashWriter::new(gz);
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; 256 << 10];
    for item in &items {
        let m = &item.meta;
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let rel = || String::from_utf8_lossy(&item.name).into_owned();
        if ft.is_socket() {
            out.skipped.push(rel());
            continue;
        }
        let xattrs =
            read_xattrs(&item.full).map_err(|e| LayerError::io("read xattrs", &item.full, &e))?;
        let mut h = Hdr {
            name: item.name.clone(),
            mode: m.mode() & 0o7777,
            uid: m.uid() as u64,
            gid: m.gid() as u64,
            size: 0,
            mtime: m.mtime(),
            nsec: m.mtime_nsec() as u32,
            typeflag: b'0',
            link: Vec::new(),
            major: 0,
            minor: 0,
        };
        let mut data = None;
        if ft.is_dir() {
            h.typeflag = b'5';
        } else if ft.is_symlink() {
            h.typeflag = b'2';
            h.link = std::fs::read_link(&item.full)
                .map_err(|e| LayerError::io("readlink", &item.full, &e))?
                .into_os_string()
                .into_encoded_bytes();
        } else if let Some(first) = (m.nlink() > 1)
            .then(|| links.get(&(m.dev(), m.ino())))
            .flatten()
        {
            h.typeflag = b'1';
            h.link = first.clone();
        } else {
            if m.nlink() > 1 {
                links.insert((m.dev(), m.ino()), item.name.clone());
            }
            if ft.is_file() {
                h.size = m.size();
                data = Some(open_same(item, &rel())?);
            } else if ft.is_fifo() {
                h.typeflag = b'6';
            } else {
                h.typeflag = if ft.is_char_device() { b'3' } else { b'4' };
                h.major = libc::major(m.rdev());
                h.minor = libc::minor(m.rdev());
            }
        }
        tar.write_all(&h.encode(&xattrs))
            .map_err(|e| werr(e, &out.path))?;
        if let Some(mut f) = data {
            let mut left = h.size;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = match f.read(&mut buf[..want]) {
                    Ok(0) => return Err(LayerError::Changed { path: rel() }),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(LayerError::io("read", &item.full, &e)),
                };
                tar.write_all(&buf[..n]).map_err(|e| werr(e, &out.path))?;
                left -= n as u64;
                progress.read.fetch_add(n as u64, Relaxed);
            }
            let after = f
                .metadata()
                .map_err(|e| LayerError::io("stat", &item.full, &e))?;
            if after.size() != h.size
                || after.mtime() != m.mtime()
                || after.mtime_nsec() != m.mtime_nsec()
            {
                return Err(LayerError::Changed { path: rel() });
            }
            let pad = (512 - (h.size % 512) as usize) % 512;
            tar.write_all(&[0u8; 512][..pad])
                .map_err(|e| werr(e, &out.path))?;
        }
        out.entries += 1;
    }
    tar.write_all(&[0u8; 1024])
        .map_err(|e| werr(e, &out.path))?;
    let (gz, diff_id, uncompressed) = tar.finish();
    let compressed = gz.finish().map_err(|e| werr(e, &out.path))?;
    let (mut buffered, digest, size) = compressed.finish();
    buffered.flush().map_err(|e| werr(e, &out.path))?;
    out.digest = digest;
    out.diff_id = diff_id;
    out.size = size;
    out.uncompressed = uncompressed;
    Ok(out)
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Opens a regular file seen by the walk and checks it is still the same
/// one, with the same size and mtime.
fn open_same(item: &Item, rel: &str) -> Result<File, LayerError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&item.full)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => LayerError::Changed { path: rel.into() },
            Some(libc::ENOENT) => LayerError::Vanished { path: rel.into() },
            _ => LayerError::io("open", &item.full, &e),
        })?;
    let now = f
        .metadata()
        .map_err(|e| LayerError::io("stat", &item.full, &e))?;
    let m = &item.meta;
    if (now.dev(), now.ino()) != (m.dev(), m.ino())
        || now.size() != m.size()
        || now.mtime() != m.mtime()
        || now.mtime_nsec() != m.mtime_nsec()
    {
        return Err(LayerError::Changed { path: rel.into() });
    }
    Ok(f)
}

/// Records every path below `dir` (children sorted by name bytes,
/// depth-first) into `out`.
fn walk(dir: &Path, prefix: &[u8], out: &mut Vec<Item>) -> Result<(), LayerError> {
    let rd = std::fs::read_dir(dir).map_err(|e| LayerError::io("list", dir, &e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| LayerError::io("list", dir, &e))?;
        names.push(e.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for n in names {
        let full = dir.join(&n);
        let meta =
            std::fs::symlink_metadata(&full).map_err(|e| LayerError::io("stat", &full, &e))?;
        let mut name = prefix.to_vec();
        name.extend_from_slice(n.as_bytes());
        let is_dir = meta.is_dir();
        if is_dir {
            name.push(b'/');
        }
        out.push(Item {
            name: name.clone(),
            full: full.clone(),
            meta,
        });
        if is_dir {
            walk(&full, &name, out)?;
        }
    }
    Ok(())
}

/// Extended attributes of `p` (not following symlinks), sorted by name,
/// without `security.selinux` and apt-layer's own.
pub fn read_xattrs(p: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut names = vec![0u8; 1024];
    let len = loop {
        // SAFETY: c is NUL-terminated; names is a valid buffer of its length.
        let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    };
    names.truncate(len);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(OWN_XATTR_PREFIX) || name == b"security.selinux" {
            continue;
        }
        let cn = CString::new(name).expect("no NUL inside a listed name");
        let mut value = vec![0u8; 256];
        let vlen = loop {
            // SAFETY: valid C strings and a buffer of the given length.
            let n = unsafe {
                libc::lgetxattr(
                    c.as_ptr(),
                    cn.as_ptr(),
                    value.as_mut_ptr().cast(),
                    value.len(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => value.resize(value.len() * 4, 0),
                Some(libc::ENODATA) => break usize::MAX,
                _ => return Err(e),
            }
        };
        if vlen == usize::MAX {
            continue; // removed meanwhile
        }
        value.truncate(vlen);
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// One tar header before encoding.
struct Hdr {
    name: Vec<u8>,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: i64,
    nsec: u32,
    typeflag: u8,
    link: Vec<u8>,
    major: u32,
    minor: u32,
}

impl Hdr {
    /// The PAX extended header (if needed) followed by the ustar header.
    fn encode(&self, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut b = [0u8; 512];
        if self.name.len() <= 100 {
            b[..self.name.len()].copy_from_slice(&self.name);
        } else {
            pax.push((b"path".to_vec(), self.name.clone()));
            b[..100].copy_from_slice(&self.name[..100]);
        }
        octal(&mut b[100..108], self.mode as u64);
        if !octal(&mut b[108..116], self.uid) {
            pax.push((b"uid".to_vec(), self.uid.to_string().into_bytes()));
            octal(&mut b[108..116], 0);
        }
        if !octal(&mut b[116..124], self.gid) {
            pax.push((b"gid".to_vec(), self.gid.to_string().into_bytes()));
            octal(&mut b[116..124], 0);
        }
        if !octal(&mut b[124..136], self.size) {
            pax.push((b"size".to_vec(), self.size.to_string().into_bytes()));
            octal(&mut b[124..136], 0);
        }
        let whole = self.mtime >= 0 && octal(&mut b[136..148], self.mtime as u64);
        if !whole || self.nsec != 0 {
            if !whole {
                octal(&mut b[136..148], 0);
            }
            pax.push((
                b"mtime".to_vec(),
                pax_time(self.mtime, self.nsec).into_bytes(),
            ));
        }
        b[156] = self.typeflag;
        if self.link.len() <= 100 {
            b[157..157 + self.link.len()].copy_from_slice(&self.link);
        } else {
            pax.push((b"linkpath".to_vec(), self.link.clone()));
            b[157..257].copy_from_slice(&self.link[..100]);
        }
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        octal(&mut b[329..337], self.major as u64);
        octal(&mut b[337..345], self.minor as u64);
        checksum(&mut b);
        for (k, v) in xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax.push((key, v.clone()));
        }
        let mut out = Vec::with_capacity(512 * 3);
        if !pax.is_empty() {
            let mut records = Vec::new();
            for (k, v) in &pax {
                records.extend_from_slice(&pax_record(k, v));
            }
            let mut x = [0u8; 512];
            let name = b"././@PaxHeader";
            x[..name.len()].copy_from_slice(name);
            octal(&mut x[100..108], 0o644);
            octal(&mut x[108..116], 0);
            octal(&mut x[116..124], 0);
            octal(&mut x[124..136], records.len() as u64);
            octal(&mut x[136..148], 0);
            x[156] = b'x';
            x[257..263].copy_from_slice(b"ustar\0");
            x[263..265].copy_from_slice(b"00");
            octal(&mut x[329..337], 0);
            octal(&mut x[337..345], 0);
            checksum(&mut x);
            out.extend_from_slice(&x);
            out.extend_from_slice(&records);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&b);
        out
    }
}

/// Writes `v` as zero-padded octal with a final NUL; false if it does not fit.
fn octal(field: &mut [u8], v: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

fn checksum(b: &mut [u8; 512]) {
    b[148..156].copy_from_slice(b"        ");
    let sum: u32 = b.iter().map(|&x| x as u32).sum();
    let s = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(s.as_bytes());
}

/// A PAX time: seconds, and a fraction without trailing zeros.
fn pax_time(secs: i64, nsec: u32) -> String {
    let (neg, mut s, mut n) = (secs < 0, secs.unsigned_abs(), nsec);
    if neg && n > 0 {
        // -2 s + 0.5 s = -1.5 s
        s -= 1;
        n = 1_000_000_000 - n;
    }
    let sign = if neg { "-" } else { "" };
    if n == 0 {
        return format!("{sign}{s}");
    }
    let frac = format!("{n:09}");
    format!("{sign}{s}.{}", frac.trim_end_matches('0'))
}

/// `"<len> <key>=<value>\n"`, where len counts the whole record.
fn pax_record(k: &[u8], v: &[u8]) -> Vec<u8> {
    let body = k.len() + v.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(k);
    r.push(b'=');
    r.extend_from_slice(v);
    r.push(b'\n');
    r
}

/// Uncompressed bytes per independently deflated chunk.
const CHUNK: usize = 1 << 20;
/// The deflate window: how much of the previous chunk primes the next.
const WINDOW: usize = 32 << 10;
/// Compression level (zlib's default: size close to what other tools push).
const LEVEL: u32 = 6;

/// One chunk to deflate.
struct Job {
    seq: u64,
    data: Vec<u8>,
    dict: Vec<u8>,
    last: bool,
}

/// A gzip writer that deflates 1 MiB chunks on worker threads and writes
/// them in order (see the module documentation).
struct ParallelGz<W: Write> {
    out: W,
    buf: Vec<u8>,
    /// The last `WINDOW` bytes handed out (the next chunk's dictionary).
    dict: Vec<u8>,
    crc: flate2::Crc,
    jobs: Option<std::sync::mpsc::SyncSender<Job>>,
    done: std::sync::mpsc::Receiver<(u64, io::Result<Vec<u8>>)>,
    ready: std::collections::BTreeMap<u64, Vec<u8>>,
    submitted: u64,
    written: u64,
    max_in_flight: u64,
    /// Dropped with the job sender, they finish their chunk and end.
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl<W: Write> ParallelGz<W> {
    fn new(mut out: W) -> io::Result<Self> {
        // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=255
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff])?;
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(threads * 2);
        let (tx, done) = std::sync::mpsc::channel();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let (rx, tx) = (rx.clone(), tx.clone());
                std::thread::Builder::new()
                    .name("apt-layer-gzip".into())
                    .spawn(move || {
                        loop {
                            let job = rx.lock().unwrap().recv();
                            let Ok(job) = job else { return };
                            if tx.send((job.seq, deflate_chunk(&job))).is_err() {
                                return;
                            }
                        }
                    })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ParallelGz {
            out,
            buf: Vec::with_capacity(CHUNK),
            dict: Vec::new(),
            crc: flate2::Crc::new(),
            jobs: Some(jobs),
            done,
            ready: Default::default(),
            submitted: 0,
            written: 0,
            max_in_flight: threads as u64 * 3,
            workers,
        })
    }

    fn submit(&mut self, data: Vec<u8>, last: bool) -> io::Result<()> {
        let dict = std::mem::take(&mut self.dict);
        self.dict = data[data.len().saturating_sub(WINDOW)..].to_vec();
        if self.dict.len() < WINDOW && !dict.is_empty() {
            // A short chunk (only the last one): keep the window whole.
            let need = WINDOW - self.dict.len();
            let mut d = dict[dict.len().saturating_sub(need)..].to_vec();
            d.extend_from_slice(&self.dict);
            self.dict = d;
        }
        let job = Job {
            seq: self.submitted,
            data,
            dict,
            last,
        };
        self.submitted += 1;
        self.jobs
            .as_ref()
            .expect("not finished")
            .send(job)
            .map_err(|_| io::Error::other("compression thread gone"))?;
        while self.submitted - self.written >= self.max_in_flight {
            self.collect_one()?;
        }
        Ok(())
    }

    /// Waits for one finished chunk and writes every chunk now in order.
    fn collect_one(&mut self) -> io::Result<()> {
        let (seq, res) = self
            .done
            .recv()
            .map_err(|_| io::Error::other("compression thread gone"))?;
        self.ready.insert(seq, res?);
        while let Some(data) = self.ready.remove(&self.written) {
            self.out.write_all(&data)?;
            self.written += 1;
        }
        Ok(())
    }

    /// Compresses what is left, writes the gzip trailer, returns the sink.
    fn finish(mut self) -> io::Result<W> {
        let rest = std::mem::take(&mut self.buf);
        self.submit(rest, true)?;
        self.jobs = None;
        while self.written < self.submitted {
            self.collect_one()?;
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let (crc, size) = (self.crc.sum(), self.crc.amount());
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.write_all(&size.to_le_bytes())?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ParallelGz<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.crc.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let take = rest.len().min(CHUNK - self.buf.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == CHUNK {
                let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
                self.submit(chunk, false)?;
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raw deflate of one chunk: primed with `dict`, ended by a sync flush
/// (byte-aligned, not final) or, for the last chunk, by the final block.
fn deflate_chunk(job: &Job) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(Compression::new(LEVEL), false);
    if !job.dict.is_empty() {
        c.set_dictionary(&job.dict).map_err(io::Error::other)?;
    }
    let flush = if job.last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(job.data.len() / 2 + (64 << 10));
    loop {
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(64 << 10));
        }
        let from = c.total_in() as usize;
        let status = c
            .compress_vec(&job.data[from..], &mut out, flush)
            .map_err(io::Error::other)?;
        let all_in = c.total_in() as usize == job.data.len();
        match status {
            Status::StreamEnd => break,
            Status::BufError if all_in => break,
            _ if !job.last && all_in && out.len() < out.capacity() => break,
            _ => {}
        }
    }
    Ok(out)
}

/// A writer that hashes (sha256) and counts what passes through.
struct HashWriter<W> {
    inner: W,
    hash: Sha256,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hash: Sha256::new(),
            count: 0,
        }
    }
    /// The inner writer, `sha256:<hex>` and the byte count.
    fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex::encode(self.hash.finish())),
            self.count,
        )
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn pax_records_count_themselves() {
        assert_eq!(pax_record(b"path", b"a"), b"9 path=a\n");
        let r = pax_record(b"k", &[b'x'; 95]);
        assert_eq!(r.len(), 102);
        assert!(r.starts_with(b"102 "));
        let r = pax_record(b"k", &[b'x'; 94]);
        assert_eq!(r.len(), 101);
        assert!(r.starts_with(b"101 "));
        assert_eq!(pax_time(5, 0), "5");
        assert_eq!(pax_time(5, 500_000_000), "5.5");
        assert_eq!(pax_time(-2, 500_000_000), "-1.5");
    }

    #[test]
    fn same_tree_same_digest_and_tar_reads_back() {
        let src = tempfile::tempdir().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let r = src.path();
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("d/f"), b"hello").unwrap();
        std::fs::hard_link(r.join("d/f"), r.join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", r.join("s")).unwrap();
        let long = "x".repeat(150);
        // Compressible and not: several 1 MiB chunks, back-references
        // across chunk boundaries.
        let mut data = Vec::new();
        let mut x: u32 = 1;
        for i in 0..(3 << 20) {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            data.push(if i % 3 == 0 {
                (x >> 16) as u8
            } else {
                b"abcdefgh"[i % 8]
            });
        }
        std::fs::write(r.join(&long), &data).unwrap();
        std::fs::set_permissions(r.join("d/f"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        let p = LayerProgress::default();
        let a = build(r, tmp.path(), &p).unwrap();
        let b = build(r, tmp.path(), &p).unwrap();
        assert_eq!((&a.digest, &a.diff_id), (&b.digest, &b.diff_id));
        assert_ne!(a.path, b.path);
        let gz = std::fs::read(&a.path).unwrap();
        assert_eq!(crate::registry::sha256_digest(&gz), a.digest);
        // One gzip member (GzDecoder stops after the first), several chunks.
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut tar_bytes)
            .unwrap();
        assert_eq!(tar_bytes.len() as u64, a.uncompressed);
        assert!(
            a.uncompressed > 3 * CHUNK as u64,
            "test a multi-chunk layer"
        );
        assert_eq!(crate::registry::sha256_digest(&tar_bytes), a.diff_id);
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&gz[..]));
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let path = e.path().unwrap().into_owned();
            let kind = e.header().entry_type();
            let mode = e.header().mode().unwrap();
            let link = e.link_name().unwrap().map(|l| l.into_owned());
            seen.push((path.display().to_string(), kind, mode, link));
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(names, vec!["./", "d/", "d/f", "g", "s", long.as_str()]);
        assert_eq!(seen[2].2, 0o4755);
        assert_eq!(seen[3].1, tar::EntryType::Link);
        assert_eq!(seen[3].3.as_deref(), Some(Path::new("d/f")));
        assert_eq!(seen[4].1, tar::EntryType::Symlink);
        let path = a.path.clone();
        drop(a);
        assert!(!path.exists(), "dropping a LayerFile removes it");
    }
}
