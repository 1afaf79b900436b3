//! Mount options: the command-line flags of `apt-layer mount` merged with
//! `-o key=value,...` (the only way options reach us through `mount -t
//! fuse.apt-layer` and `/etc/fstab`). Unknown generic mount options that
//! fstab passes (`defaults`, `_netdev`, `nofail`, …) are accepted and ignored.

use std::path::PathBuf;
use std::time::Duration;

/// Every setting of a mount, after defaults are applied.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Where the tree is mounted.
    pub mountpoint: PathBuf,
    /// Cache directory (objects, metadata, outbox staging).
    pub cache_dir: PathBuf,
    /// Upper bound of evictable objects, in bytes.
    pub cache_size: u64,
    /// `--authfile` / `authfile=`.
    pub authfile: Option<PathBuf>,
    /// `--registries-conf` / `registries_conf=`.
    pub registries_conf: Option<PathBuf>,
    /// Hosts reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Let other users see the mount (`allow_other`).
    pub allow_other: bool,
    /// Let root see a mount made by another user (`allow_root`).
    pub allow_root: bool,
    /// Honour setuid bits in rootfs (`suid`, default on; `nosuid` turns off).
    pub suid: bool,
    /// Device nodes in rootfs work (`dev`, default on; `nodev` turns off).
    pub dev: bool,
    /// How long tag lists and tag → digest answers are trusted.
    pub tag_ttl: Duration,
    /// Upper bound for one registry operation before `EIO`.
    pub timeout: Duration,
    /// Quiet time before a staged outbox tree is pushed.
    pub outbox_settle: Duration,
    /// FUSE worker threads.
    pub threads: usize,
    /// Let the kernel read cached objects directly (FUSE passthrough).
    pub passthrough: bool,
    /// Fill the rest of a lazy (eStargz, zstd:chunked) layer in the
    /// background after its first use (`nobackground` turns it off).
    pub background: bool,
    /// Serve files of a streaming plain layer as soon as the stream has
    /// passed them, before the layer's digest is checked (`noearly` makes
    /// reads wait for the checked, merged tree).
    pub early: bool,
    /// Read-only superblock and no `outbox/` (`ro`). The kernel then keeps
    /// file attributes across reads instead of asking again after each
    /// one (it invalidates atime on a writable mount).
    pub read_only: bool,
    /// Log file when daemonised (default `<cache_dir>/apt-layer.log`).
    pub log_file: Option<PathBuf>,
    /// A merged tree not used for this long leaves memory (it is rebuilt
    /// from the persisted layer indexes when used again); zero keeps every
    /// tree for the daemon's life.
    pub tree_idle: Duration,
}

impl MountOptions {
    /// Defaults for `mountpoint`.
    pub fn new(mountpoint: PathBuf) -> MountOptions {
        MountOptions {
            mountpoint,
            cache_dir: default_cache_dir(),
            cache_size: 10 << 30,
            authfile: None,
            registries_conf: None,
            insecure_registries: Vec::new(),
            allow_other: false,
            allow_root: false,
            suid: true,
            dev: true,
            tag_ttl: Duration::from_secs(30),
            timeout: Duration::from_secs(30),
            outbox_settle: Duration::from_secs(2),
            tree_idle: Duration::from_secs(600),
            threads: 4,
            log_file: None,
            passthrough: true,
            background: true,
            read_only: false,
            early: true,
        }
    }

    /// Applies one `-o` string (comma separated).
    pub fn apply_o<'a>(&mut self, opts: &'a str) -> Result<(), String> {
        for opt in opts.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let need =
                |v: Option<&'a str>| v.ok_or_else(|| format!("mount option {k} needs a value"));
            match k {
                "cache_dir" => self.cache_dir = PathBuf::from(need(v)?),
                "cache_size" => self.cache_size = parse_size(need(v)?)?,
                "authfile" => self.authfile = Some(PathBuf::from(need(v)?)),
                "registries_conf" => self.registries_conf = Some(PathBuf::from(need(v)?)),
                "insecure_registry" => self.insecure_registries.push(need(v)?.to_string()),
                "allow_other" => self.allow_other = true,
                "allow_root" => self.allow_root = true,
                "suid" => self.suid = true,
                "nosuid" => self.suid = false,
                "dev" => self.dev = true,
                "nodev" => self.dev = false,
                "tag_ttl" => self.tag_ttl = parse_duration(need(v)?)?,
                "timeout" => self.timeout = parse_duration(need(v)?)?,
                "outbox_settle" => self.outbox_settle = parse_duration(need(v)?)?,
                "tree_idle" => self.tree_idle = parse_duration(need(v)?)?,
                "threads" => {
                    self.threads = need(v)?.parse().map_err(|_| format!("bad threads={v:?}"))?
                }
                "passthrough" => self.passthrough = true,
                "nopassthrough" => self.passthrough = false,
                "background" => self.background = true,
                "nobackground" => self.background = false,
                "log" | "log_file" => self.log_file = Some(PathBuf::from(need(v)?)),
                "early" => self.early = true,
                "noearly" => self.early = false,
                "ro" => self.read_only = true,
                "rw" => self.read_only = false,
                // Generic options mount(8) and fstab hand to every helper.
                "defaults"
                | "auto"
                | "noauto"
                | "user"
                | "nouser"
                | "users"
                | "_netdev"
                | "nofail"
                | "exec"
                | "noexec"
                | "atime"
                | "noatime"
                | "relatime"
                | "strictatime"
                | "nostrictatime"
                | "lazytime"
                | "nolazytime"
                | "diratime"
                | "nodiratime"
                | "sync"
                | "async"
                | "silent"
                | "loud"
                // Always on: the kernel checks modes.
                | "default_permissions" => {}
                "comment" => {}
                x if x.starts_with("x-") => {}
                other => return Err(format!("unknown mount option {other:?}")),
            }
        }
        Ok(())
    }
}

fn default_cache_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/cache/apt-layer")
    } else if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(x).join("apt-layer")
    } else {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/apt-layer")
    }
}

/// Parses `10G`, `512M`, `100k`, `4096` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let m: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return Err(format!("bad size {s:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    Ok((n * mult as f64) as u64)
}

/// Parses `30`, `30s`, `500ms`, `2m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("bad duration {s:?}");
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| bad());
    }
    let (n, mult) = if let Some(m) = s.strip_suffix('m') {
        (m, 60.0)
    } else {
        (s.strip_suffix('s').unwrap_or(s), 1.0)
    };
    let v: f64 = n.parse().map_err(|_| bad())?;
    Ok(Duration::from_secs_f64(v * mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_options() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        let mut o = MountOptions::new("/m".into());
        o.apply_o("allow_other,cache_dir=/c,cache_size=1G,insecure_registry=a:1,insecure_registry=b:2,timeout=500ms,nofail,_netdev,nosuid").unwrap();
        assert!(o.allow_other && !o.suid && o.dev);
        assert_eq!(o.cache_dir, PathBuf::from("/c"));
        assert_eq!(o.insecure_registries, vec!["a:1", "b:2"]);
        assert_eq!(o.timeout, Duration::from_millis(500));
        assert!(o.apply_o("bogus=1").is_err());
        let mut o = MountOptions::new("/m".into());
        o.apply_o("allow_root,nodiratime,lazytime,sync,default_permissions,comment=x")
            .unwrap();
        assert!(o.allow_root && !o.allow_other);
    }
}
