//! Shared harness for apt-layer's integration tests.
//!
//! Everything here drives real parts (DESIGN.md §6): Debian's CNCF
//! distribution registry (`docker-registry serve`), images built with `umoci`
//! and pushed with `skopeo`, `skopeo` as the oracle, and the real
//! `apt-layer` binary mounted through the kernel's FUSE. The only fake is
//! [`FaultServer`], a tiny HTTP server for faults a real registry will not
//! make (wrong bytes, stalls, cut connections, endless pagination).
//!
//! Every test owns its registries (free ports, storage in a tempdir), its
//! mount point and its cache, so tests run in parallel safely. Anything
//! missing from the environment is a panic, never a skip: a test that needs
//! FUSE or the registry must fail when they are absent.
//!
//! File-system calls into a mount go through [`within`] (or the wrappers
//! [`read`], [`list`], [`stat`]) so that a hung daemon fails one test after a
//! bounded time instead of hanging the whole suite.
#![allow(dead_code)]

pub mod edge;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

/// Tools the harness runs.
const REQUIRED_TOOLS: &[&str] = &[
    "docker-registry",
    "skopeo",
    "umoci",
    "htpasswd",
    "umount",
    "openssl",
];

/// Checks that everything the integration tests need is present: the
/// registry, skopeo, umoci, htpasswd, openssl (the token service signs
/// with it), `/dev/fuse` and root. Panics with the
/// list of what is missing — in CI (`CI` set) and locally alike: these tests
/// never skip.
pub fn require_env() {
    let mut missing = Vec::new();
    for tool in REQUIRED_TOOLS {
        if which(tool).is_none() {
            missing.push(format!("`{tool}` not found on PATH"));
        }
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse does not exist".to_string());
    }
    if unsafe { libc::geteuid() } != 0 {
        missing.push("not running as root (FUSE mounts and chown need root)".to_string());
    }
    if !missing.is_empty() {
        let ci = std::env::var_os("CI").is_some();
        panic!(
            "integration test environment incomplete{}:\n  - {}\n\
             Install: docker-registry skopeo umoci fuse3 apache2-utils openssl, run as root with /dev/fuse.",
            if ci {
                " (CI is set: tests must fail, not skip)"
            } else {
                ""
            },
            missing.join("\n  - ")
        );
    }
}

/// Finds `tool` on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// The OCI architecture name of this machine (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => panic!("no OCI architecture name known for {other}"),
    }
}

/// Runs `cmd`, panicking with its stderr when it fails. Returns stdout.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.stdout
}

/// `sha256` of `bytes` as lowercase hex (no `sha256:` prefix).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// Tail of a text, for panic messages.
pub fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Polls `cond` every 50 ms until it is true or `timeout` has passed.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Guarded file-system calls and errno helpers
// ---------------------------------------------------------------------------

/// Default bound for one file-system call into a mount.
pub const FS_GUARD: Duration = Duration::from_secs(60);

/// Runs `f` on its own thread and returns its result, panicking if it takes
/// longer than `limit` (the thread is left behind, stuck in the kernel; it is
/// released when the mount's daemon dies).
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    timed_within(limit, what, f).0
}

/// Like [`within`], also returning how long `f` took.
pub fn timed_within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    thread::Builder::new()
        .name(format!("fs-call {what}"))
        .spawn(move || {
            let r = f();
            let _ = tx.send((r, start.elapsed()));
        })
        .expect("spawn thread");
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => panic!("{what}: no answer after {limit:?} (hang)"),
    }
}

/// `std::fs::read`, bounded by [`FS_GUARD`].
pub fn read(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let p = path.as_ref().to_path_buf();
    within(FS_GUARD, &format!("read {}", p.display()), move || {
        fs::read(&p)
    })
}

/// `std::fs::read_to_string`, bounded by [`FS_GUARD`].
pub fn read_string(path: impl AsRef<Path>) -> io::Result<String> {
    let p = path.as_ref().to_path_buf();
    within(FS_GUARD, &format!("read {}", p.display()), move || {
        fs::read_to_string(&p)
    })
}

/// Lists a directory (`ls`): sorted names, the first error of opendir or
/// readdir. Bounded by [`FS_GUARD`].
pub fn list(path: impl AsRef<Path>) -> io::Result<Vec<String>> {
    let p = path.as_ref().to_path_buf();
    within(FS_GUARD, &format!("ls {}", p.display()), move || {
        list_now(&p)
    })
}

/// Unbounded [`list`], for use inside [`within`] / [`timed_within`].
pub fn list_now(p: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(p)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// `std::fs::symlink_metadata` (lstat), bounded by [`FS_GUARD`].
pub fn stat(path: impl AsRef<Path>) -> io::Result<fs::Metadata> {
    let p = path.as_ref().to_path_buf();
    within(FS_GUARD, &format!("stat {}", p.display()), move || {
        fs::symlink_metadata(&p)
    })
}

/// The errno of a failed call; panics when the call succeeded or failed
/// without an OS error.
pub fn errno_of<T>(res: io::Result<T>) -> i32 {
    match res {
        Ok(_) => panic!("expected an error, the call succeeded"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("error without errno: {e:?}")),
    }
}

/// Name of an errno, for messages.
pub fn errno_name(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// Asserts that `res` failed with `expected` errno, naming `what` on failure.
pub fn assert_errno<T>(res: io::Result<T>, expected: i32, what: &str) {
    match res {
        Ok(_) => panic!(
            "{what}: expected {} ({expected}), the call succeeded",
            errno_name(expected)
        ),
        Err(e) => {
            let got = e.raw_os_error();
            assert_eq!(
                got,
                Some(expected),
                "{what}: expected errno {expected} ({}), got {e:?}",
                errno_name(expected)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Minimal HTTP/1.1 client on std::net (for manifest PUTs and readiness)
// ---------------------------------------------------------------------------

/// A response read by [`http`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request to `host` ("127.0.0.1:PORT") with `Connection:
/// close`; `target` is the path and query. Handles Content-Length, chunked
/// and read-to-close bodies.
pub fn http(
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: apt-layer-tests\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "PUT" || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], head: bool) -> io::Result<HttpResponse> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head_text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let resp = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if head {
        return Ok(resp);
    }
    let body = if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(len) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { body, ..resp })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(data, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `Authorization: Basic …` value for `user:pass`.
pub fn basic_auth(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

// ---------------------------------------------------------------------------
// Registry: the real CNCF distribution registry
// ---------------------------------------------------------------------------

/// A running `docker-registry serve CONFIG` on 127.0.0.1 and a free port,
/// storage and log in its own tempdir. Killed on drop.
pub struct Registry {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    config: PathBuf,
    log_path: PathBuf,
    /// Basic credentials, when started with htpasswd.
    creds: Option<(String, String)>,
}

impl Registry {
    /// A plain registry without auth.
    pub fn start() -> Registry {
        Self::start_inner(None, None)
    }

    /// A registry requiring htpasswd Basic auth for `user`/`pass`.
    pub fn start_with_htpasswd(user: &str, pass: &str) -> Registry {
        Self::start_inner(Some((user, pass)), None)
    }

    /// A registry with token auth (`auth.token`: the bearer flow of Docker
    /// Hub, GHCR and Quay) whose tokens `tokens` issues; the registry itself
    /// checks each token's signature, issuer, audience, lifetime and
    /// access. [`Registry::creds`] are the token service's credentials.
    pub fn start_with_token(tokens: &TokenService) -> Registry {
        let auth = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            tokens.realm(),
            TokenService::SERVICE,
            TokenService::ISSUER,
            tokens.cert.display()
        );
        let mut r = Self::start_config(None, None, Some(auth));
        r.creds = Some((tokens.user.clone(), tokens.pass.clone()));
        r
    }

    /// A pull-through cache (`proxy.remoteurl`) of `remote_url`
    /// (e.g. `http://127.0.0.1:5000`): a registry mirror.
    pub fn start_proxy(remote_url: &str) -> Registry {
        Self::start_inner(None, Some(remote_url))
    }

    fn start_inner(auth: Option<(&str, &str)>, proxy: Option<&str>) -> Registry {
        Self::start_config(auth, proxy, None)
    }

    /// `auth`: htpasswd credentials; `auth_yaml`: an `auth:` section as is.
    fn start_config(
        auth: Option<(&str, &str)>,
        proxy: Option<&str>,
        auth_yaml: Option<String>,
    ) -> Registry {
        require_env();
        let dir = tempfile::Builder::new()
            .prefix("apt-layer-registry-")
            .tempdir()
            .expect("tempdir");
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).unwrap();
        let log_path = dir.path().join("registry.log");
        let config = dir.path().join("config.yml");
        let mut auth_yaml = auth_yaml.unwrap_or_default();
        if let Some((user, pass)) = auth {
            let line = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, &line).unwrap();
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: apt-layer-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let proxy_yaml = proxy
            .map(|url| format!("proxy:\n  remoteurl: {url}\n"))
            .unwrap_or_default();
        let mut last_err = String::new();
        let mut dir = dir;
        // A free port may be taken by a parallel test before the registry
        // binds it: retry with another.
        for _attempt in 0..4 {
            let port = free_port();
            let yaml = format!(
                r#"version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
{auth_yaml}{proxy_yaml}"#,
                storage = storage.display()
            );
            fs::write(&config, yaml).unwrap();
            let mut reg = Registry {
                dir,
                port,
                child: None,
                config: config.clone(),
                log_path: log_path.clone(),
                creds: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            };
            match reg.spawn_and_wait() {
                Ok(()) => return reg,
                Err(e) => {
                    last_err = e;
                    reg.stop();
                    dir = std::mem::replace(&mut reg.dir, TempDir::new().unwrap());
                }
            }
        }
        panic!("docker-registry did not start: {last_err}");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn docker-registry: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!(
                    "docker-registry exited with {status}; log:\n{}",
                    tail(&self.log(), 30)
                ));
            }
            if let Ok(r) = http("GET", &self.host(), "/v2/", &[], &[])
                && (r.status == 200 || r.status == 401)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no answer on /v2/ after 20 s; log:\n{}",
                    tail(&self.log(), 30)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The credentials, when started with htpasswd.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Where the registry stores its blobs and repositories.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The whole log (access-log lines like
    /// `"GET /v2/foo/manifests/latest HTTP/1.1" 200 …`).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Current length of the log, to look only at what comes later with
    /// [`Registry::log_since`].
    pub fn log_len(&self) -> usize {
        fs::metadata(&self.log_path)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// The log from byte `offset` on.
    pub fn log_since(&self, offset: usize) -> String {
        let all = fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(&all[offset.min(all.len())..]).into_owned()
    }

    /// Access-log request lines (`GET /v2/... HTTP/1.1`) from `offset` on.
    pub fn requests_since(&self, offset: usize) -> Vec<String> {
        self.log_since(offset)
            .lines()
            .filter_map(|l| {
                let start = l.find("\"")? + 1;
                let rest = &l[start..];
                let end = rest.find("\"")?;
                let req = &rest[..end];
                req.contains(" HTTP/").then(|| req.to_string())
            })
            .collect()
    }

    /// Kills the registry and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                // The old socket may linger for a moment.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("registry restart retry: {e}");
                    self.stop();
                    thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("registry restart failed: {e}"),
            }
        }
    }

    /// Whether the registry process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if thread::panicking() && self.child.is_some() {
            eprintln!(
                "---- registry {} log (tail) ----\n{}",
                self.host(),
                tail(&self.log(), 40)
            );
        }
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Images: umoci builds, skopeo pushes
// ---------------------------------------------------------------------------

/// What a file-system entry of a test layer is.
#[derive(Debug, Clone)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    /// Hard link to another path of the same layer tree (relative to its root).
    Hardlink(String),
    Fifo,
    CharDev(u32, u32),
    BlockDev(u32, u32),
    /// Delete the path from the lower layers (becomes a whiteout through
    /// `umoci repack`). Only in [`Layer::Tree`].
    Remove,
}

/// One entry of a test layer, path relative to the image root.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub mode: Option<u32>,
    pub owner: Option<(u32, u32)>,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Seconds since the epoch.
    pub mtime: Option<i64>,
}

impl Entry {
    fn new(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.trim_start_matches('/').to_string(),
            kind,
            mode: None,
            owner: None,
            xattrs: Vec::new(),
            mtime: None,
        }
    }
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Entry {
        Self::new(path, Kind::File(data.into()))
    }
    pub fn dir(path: &str) -> Entry {
        Self::new(path, Kind::Dir)
    }
    pub fn symlink(path: &str, target: &str) -> Entry {
        Self::new(path, Kind::Symlink(target.to_string()))
    }
    pub fn hardlink(path: &str, target: &str) -> Entry {
        Self::new(
            path,
            Kind::Hardlink(target.trim_start_matches('/').to_string()),
        )
    }
    pub fn fifo(path: &str) -> Entry {
        Self::new(path, Kind::Fifo)
    }
    pub fn chardev(path: &str, major: u32, minor: u32) -> Entry {
        Self::new(path, Kind::CharDev(major, minor))
    }
    pub fn blockdev(path: &str, major: u32, minor: u32) -> Entry {
        Self::new(path, Kind::BlockDev(major, minor))
    }
    pub fn remove(path: &str) -> Entry {
        Self::new(path, Kind::Remove)
    }
    /// Permission bits including setuid/setgid/sticky (e.g. `0o4755`).
    pub fn mode(mut self, mode: u32) -> Entry {
        self.mode = Some(mode);
        self
    }
    pub fn owner(mut self, uid: u32, gid: u32) -> Entry {
        self.owner = Some((uid, gid));
        self
    }
    pub fn xattr(mut self, name: &str, value: impl Into<Vec<u8>>) -> Entry {
        self.xattrs.push((name.to_string(), value.into()));
        self
    }
    pub fn mtime(mut self, secs: i64) -> Entry {
        self.mtime = Some(secs);
        self
    }
}

/// One layer of a test image.
#[derive(Debug, Clone)]
pub enum Layer {
    /// Entries written on top of the image so far. Without [`Kind::Remove`]
    /// they are added with `umoci insert SRC /`; with removals, by `umoci
    /// unpack`, edit, `umoci repack` (deletions become whiteouts).
    Tree(Vec<Entry>),
    /// `umoci insert --opaque SRC TARGET`: TARGET replaced by `entries`
    /// (paths relative to TARGET), an opaque directory.
    Opaque { target: String, entries: Vec<Entry> },
    /// `umoci insert --whiteout TARGET`.
    Whiteout(String),
}

/// A test image: layers and config edits, made by [`make_image`].
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub tag: String,
    pub layers: Vec<Layer>,
    pub labels: Vec<(String, String)>,
    pub env: Vec<String>,
    pub author: Option<String>,
    pub architecture: Option<String>,
    pub os: Option<String>,
    pub cmd: Vec<String>,
}

impl ImageSpec {
    pub fn new(tag: &str) -> ImageSpec {
        ImageSpec {
            tag: tag.to_string(),
            layers: Vec::new(),
            labels: Vec::new(),
            env: Vec::new(),
            author: None,
            architecture: None,
            os: None,
            cmd: Vec::new(),
        }
    }
    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }
    /// A [`Layer::Tree`] layer.
    pub fn tree(self, entries: Vec<Entry>) -> Self {
        self.layer(Layer::Tree(entries))
    }
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.to_string(), v.to_string()));
        self
    }
    /// `KEY=VALUE`.
    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.to_string());
        self
    }
    pub fn author(mut self, a: &str) -> Self {
        self.author = Some(a.to_string());
        self
    }
    pub fn architecture(mut self, a: &str) -> Self {
        self.architecture = Some(a.to_string());
        self
    }
    pub fn os(mut self, o: &str) -> Self {
        self.os = Some(o.to_string());
        self
    }
    pub fn cmd(mut self, c: &[&str]) -> Self {
        self.cmd = c.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// Builds `spec` into the OCI layout `dir/oci` (created with `umoci init`
/// if missing; several tags may share one layout) and returns the layout
/// path. Reference it as [`layout_ref`]`(&layout, &spec.tag)`.
pub fn make_image(dir: &Path, spec: &ImageSpec) -> PathBuf {
    require_env();
    let layout = dir.join("oci");
    if !layout.join("index.json").exists() {
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(&layout));
    }
    let image = layout_ref(&layout, &spec.tag);
    run(Command::new("umoci").args(["new", "--image", &image]));
    let work = tempfile::Builder::new()
        .prefix("layer-")
        .tempdir_in(dir)
        .unwrap();
    for (i, layer) in spec.layers.iter().enumerate() {
        match layer {
            Layer::Tree(entries) if entries.iter().any(|e| matches!(e.kind, Kind::Remove)) => {
                let bundle = work.path().join(format!("bundle{i}"));
                run(Command::new("umoci")
                    .args(["unpack", "--image", &image])
                    .arg(&bundle));
                write_entries(&bundle.join("rootfs"), entries);
                run(Command::new("umoci")
                    .args(["repack", "--image", &image])
                    .arg(&bundle));
                fs::remove_dir_all(&bundle).unwrap();
            }
            Layer::Tree(entries) => {
                let src = work.path().join(format!("src{i}"));
                fs::create_dir(&src).unwrap();
                fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
                write_entries(&src, entries);
                run(Command::new("umoci")
                    .args(["insert", "--image", &image])
                    .arg(&src)
                    .arg("/"));
            }
            Layer::Opaque { target, entries } => {
                let src = work.path().join(format!("src{i}"));
                fs::create_dir(&src).unwrap();
                fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
                write_entries(&src, entries);
                run(Command::new("umoci")
                    .args(["insert", "--opaque", "--image", &image])
                    .arg(&src)
                    .arg(format!("/{}", target.trim_start_matches('/'))));
            }
            Layer::Whiteout(target) => {
                run(Command::new("umoci")
                    .args(["insert", "--whiteout", "--image", &image])
                    .arg(format!("/{}", target.trim_start_matches('/'))));
            }
        }
    }
    let mut cfg = Command::new("umoci");
    cfg.args(["config", "--image", &image]);
    let mut any = false;
    for (k, v) in &spec.labels {
        cfg.arg(format!("--config.label={k}={v}"));
        any = true;
    }
    for e in &spec.env {
        cfg.arg(format!("--config.env={e}"));
        any = true;
    }
    for c in &spec.cmd {
        cfg.arg(format!("--config.cmd={c}"));
        any = true;
    }
    if let Some(a) = &spec.author {
        cfg.arg(format!("--author={a}"));
        any = true;
    }
    if let Some(a) = &spec.architecture {
        cfg.arg(format!("--architecture={a}"));
        any = true;
    }
    if let Some(o) = &spec.os {
        cfg.arg(format!("--os={o}"));
        any = true;
    }
    if any {
        run(&mut cfg);
    }
    layout
}

/// `LAYOUT:TAG`, the `--image` / `oci:` reference of a tag in a layout.
pub fn layout_ref(layout: &Path, tag: &str) -> String {
    format!("{}:{tag}", layout.display())
}

/// The manifest digest of `tag` in an OCI layout (from its index.json).
pub fn layout_digest(layout: &Path, tag: &str) -> String {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {}", layout.display()))["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Writes `entries` under `root`, creating parents (0755) as needed.
pub fn write_entries(root: &Path, entries: &[Entry]) {
    for e in entries {
        let p = root.join(&e.path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        match &e.kind {
            Kind::Remove => {
                let md = fs::symlink_metadata(&p)
                    .unwrap_or_else(|err| panic!("remove {}: {err}", p.display()));
                if md.is_dir() {
                    fs::remove_dir_all(&p).unwrap();
                } else {
                    fs::remove_file(&p).unwrap();
                }
                continue;
            }
            Kind::File(data) => {
                fs::write(&p, data).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
            }
            Kind::Dir => {
                fs::create_dir_all(&p).unwrap();
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            }
            Kind::Symlink(target) => std::os::unix::fs::symlink(target, &p).unwrap(),
            Kind::Hardlink(target) => fs::hard_link(root.join(target), &p).unwrap(),
            Kind::Fifo => mknod(&p, libc::S_IFIFO | 0o644, 0),
            Kind::CharDev(ma, mi) => mknod(&p, libc::S_IFCHR | 0o644, libc::makedev(*ma, *mi)),
            Kind::BlockDev(ma, mi) => mknod(&p, libc::S_IFBLK | 0o644, libc::makedev(*ma, *mi)),
        }
        let c = cpath(&p);
        let is_link = matches!(e.kind, Kind::Symlink(_));
        if let Some((uid, gid)) = e.owner {
            assert_eq!(
                unsafe { libc::lchown(c.as_ptr(), uid, gid) },
                0,
                "lchown {}",
                p.display()
            );
        }
        if let Some(mode) = e.mode
            && !is_link
        {
            // After chown, which clears setuid/setgid.
            assert_eq!(
                unsafe { libc::chmod(c.as_ptr(), mode as libc::mode_t) },
                0,
                "chmod {}",
                p.display()
            );
        }
        for (name, value) in &e.xattrs {
            let n = std::ffi::CString::new(name.as_str()).unwrap();
            let r = unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            assert_eq!(
                r,
                0,
                "lsetxattr {name} on {}: {}",
                p.display(),
                io::Error::last_os_error()
            );
        }
        if let Some(t) = e.mtime {
            let ts = [
                libc::timespec {
                    tv_sec: t,
                    tv_nsec: 0,
                },
                libc::timespec {
                    tv_sec: t,
                    tv_nsec: 0,
                },
            ];
            let r = unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            assert_eq!(r, 0, "utimensat {}", p.display());
        }
    }
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) {
    let c = cpath(p);
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

/// Manifest format for [`push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Keep the OCI manifest.
    Oci,
    /// `skopeo copy --format v2s2`: Docker v2 schema 2.
    V2s2,
}

fn docker_ref(r: &str) -> String {
    if r.starts_with("docker://") {
        r.to_string()
    } else {
        format!("docker://{r}")
    }
}

/// Pushes `layout_ref` (`LAYOUT:TAG`) to `dest` (`HOST/REPO:TAG` or
/// `HOST/REPO@sha256:…`) with skopeo; returns the pushed manifest digest.
pub fn push(layout_ref: &str, dest: &str, format: Format) -> String {
    push_with_creds(layout_ref, dest, format, None)
}

/// [`push`] with `--dest-creds user:pass`.
pub fn push_with_creds(
    layout_ref: &str,
    dest: &str,
    format: Format,
    creds: Option<(&str, &str)>,
) -> String {
    let digestfile = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
        .arg(digestfile.path());
    if format == Format::V2s2 {
        cmd.args(["--format", "v2s2"]);
    }
    if let Some((u, p)) = creds {
        cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
    }
    cmd.arg(format!("oci:{layout_ref}")).arg(docker_ref(dest));
    run(&mut cmd);
    fs::read_to_string(digestfile.path())
        .unwrap()
        .trim()
        .to_string()
}

/// Builds a small image with a distinct file and labels, pushes it to
/// `HOST/REPO:TAG` in `format`, returns the manifest digest. `dir` holds the
/// layout.
pub fn push_simple(dir: &Path, dest: &str, format: Format) -> String {
    let tag = format!("t{}", sha256_hex(dest.as_bytes()).get(..12).unwrap());
    let spec = ImageSpec::new(&tag)
        .tree(vec![
            Entry::file("etc/hello", format!("hello from {dest}\n")),
            Entry::dir("usr/bin"),
        ])
        .tree(vec![
            Entry::file("etc/second", "second layer\n").mode(0o600),
        ])
        .label("org.example.dest", dest)
        .env("APT_LAYER_TEST=1")
        .author("apt-layer tests");
    let layout = make_image(dir, &spec);
    push(&layout_ref(&layout, &tag), dest, format)
}

/// The manifest at `HOST/REPO:REF` as the registry serves it:
/// (bytes, Content-Type). `reference` is a tag or digest.
pub fn get_manifest(
    host: &str,
    repo: &str,
    reference: &str,
    creds: Option<(&str, &str)>,
) -> (Vec<u8>, String) {
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                  application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json";
    let auth = creds.map(|(u, p)| basic_auth(u, p));
    let mut headers = vec![("Accept", accept)];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let r = http(
        "GET",
        host,
        &format!("/v2/{repo}/manifests/{reference}"),
        &headers,
        &[],
    )
    .expect("GET manifest");
    assert_eq!(
        r.status,
        200,
        "GET manifest {host}/{repo}:{reference}: {}",
        String::from_utf8_lossy(&r.body)
    );
    let ct = r.header("content-type").unwrap_or_default().to_string();
    (r.body, ct)
}

/// PUTs `bytes` as the manifest `HOST/REPO:REFERENCE` with `content_type`;
/// returns the registry's `Docker-Content-Digest`.
pub fn put_manifest(
    host: &str,
    repo: &str,
    reference: &str,
    content_type: &str,
    bytes: &[u8],
    creds: Option<(&str, &str)>,
) -> String {
    let auth = creds.map(|(u, p)| basic_auth(u, p));
    let mut headers = vec![("Content-Type", content_type)];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let r = http(
        "PUT",
        host,
        &format!("/v2/{repo}/manifests/{reference}"),
        &headers,
        bytes,
    )
    .expect("PUT manifest");
    assert_eq!(
        r.status,
        201,
        "PUT manifest {host}/{repo}:{reference}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.header("docker-content-digest")
        .unwrap_or_default()
        .to_string()
}

/// Gives the manifest of `HOST/REPO:base_tag` every tag of `tags` (same
/// bytes, PUT by tag): a repository with many tags, cheaply.
pub fn push_many_tags(host: &str, repo: &str, base_tag: &str, tags: &[String]) {
    let (bytes, ct) = get_manifest(host, repo, base_tag, None);
    for t in tags {
        put_manifest(host, repo, t, &ct, &bytes, None);
    }
}

/// One platform of a multi-platform image pushed by [`push_multi_platform`].
#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub architecture: String,
    pub digest: String,
    pub manifest: Vec<u8>,
}

/// A multi-platform tag: the index and its platform manifests.
#[derive(Debug, Clone)]
pub struct MultiPlatform {
    pub index: Vec<u8>,
    pub index_digest: String,
    pub platforms: Vec<PlatformImage>,
}

impl MultiPlatform {
    pub fn platform(&self, arch: &str) -> &PlatformImage {
        self.platforms
            .iter()
            .find(|p| p.architecture == arch)
            .unwrap_or_else(|| panic!("no {arch} platform"))
    }
}

/// Builds one single-platform image per architecture (linux, distinct
/// content), pushes each by digest to `HOST/REPO`, then PUTs an OCI image
/// index naming them as `HOST/REPO:TAG`. The index JSON is hand made: no tool
/// here makes one.
pub fn push_multi_platform(
    dir: &Path,
    host: &str,
    repo: &str,
    tag: &str,
    archs: &[&str],
) -> MultiPlatform {
    let mut platforms = Vec::new();
    let mut descriptors = Vec::new();
    for arch in archs {
        let t = format!("{tag}-{arch}");
        let spec = ImageSpec::new(&t)
            .tree(vec![Entry::file("etc/arch", format!("{arch}\n"))])
            .label("org.example.arch", arch)
            .architecture(arch)
            .os("linux");
        let layout = make_image(dir, &spec);
        let digest = layout_digest(&layout, &t);
        let pushed = push(
            &layout_ref(&layout, &t),
            &format!("{host}/{repo}@{digest}"),
            Format::Oci,
        );
        assert_eq!(pushed, digest, "skopeo kept the OCI manifest bytes");
        let (manifest, ct) = get_manifest(host, repo, &digest, None);
        assert_eq!(sha256_digest(&manifest), digest);
        descriptors.push(json!({
            "mediaType": if ct.is_empty() { "application/vnd.oci.image.manifest.v1+json".to_string() } else { ct },
            "digest": digest,
            "size": manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
        platforms.push(PlatformImage {
            architecture: arch.to_string(),
            digest,
            manifest,
        });
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descriptors,
    }))
    .unwrap();
    let index_digest = put_manifest(
        host,
        repo,
        tag,
        "application/vnd.oci.image.index.v1+json",
        &index,
        None,
    );
    assert_eq!(index_digest, sha256_digest(&index));
    MultiPlatform {
        index,
        index_digest,
        platforms,
    }
}

// ---------------------------------------------------------------------------
// skopeo as the oracle
// ---------------------------------------------------------------------------

/// Runs `skopeo ARGS` and returns stdout (panics on failure).
pub fn skopeo(args: &[&str]) -> Vec<u8> {
    run(Command::new("skopeo").args(args))
}

/// `skopeo inspect --tls-verify=false docker://REF`.
pub fn skopeo_inspect(reference: &str) -> Value {
    serde_json::from_slice(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &docker_ref(reference),
    ]))
    .unwrap()
}

/// `skopeo inspect --raw --config`: the config blob bytes.
pub fn skopeo_inspect_raw_config(reference: &str) -> Vec<u8> {
    skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        "--config",
        &docker_ref(reference),
    ])
}

/// `skopeo inspect --raw`: the manifest (or index) bytes as served.
pub fn skopeo_raw_manifest(reference: &str) -> Vec<u8> {
    skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &docker_ref(reference),
    ])
}

/// `skopeo list-tags --tls-verify=false docker://REPO`.
pub fn skopeo_list_tags(repo: &str) -> Value {
    serde_json::from_slice(&skopeo(&[
        "list-tags",
        "--tls-verify=false",
        &docker_ref(repo),
    ]))
    .unwrap()
}

/// The tags of `skopeo list-tags`, sorted.
pub fn skopeo_tags(repo: &str) -> Vec<String> {
    let v = skopeo_list_tags(repo);
    let mut tags: Vec<String> = v["Tags"]
        .as_array()
        .expect("Tags array")
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    tags.sort();
    tags
}

/// The fields Debian's skopeo 1.9.3 prints in `inspect` (REFERENCE.md).
pub const SKOPEO_INSPECT_FIELDS: &[&str] = &[
    "Name",
    "Digest",
    "RepoTags",
    "Created",
    "DockerVersion",
    "Labels",
    "Architecture",
    "Os",
    "Layers",
    "Env",
];

/// Asserts that `ours` (apt-layer's inspect JSON) equals `oracle` (skopeo's)
/// on every field skopeo 1.9.3 prints, and that `LayersData`, when present,
/// matches the layers of `manifest` (MIMEType, Digest, Size).
pub fn assert_inspect_matches(ours: &Value, oracle: &Value, manifest: &[u8], what: &str) {
    for field in SKOPEO_INSPECT_FIELDS {
        assert!(
            oracle.get(*field).is_some(),
            "skopeo printed no {field}: {oracle}"
        );
        assert_eq!(
            ours.get(*field),
            oracle.get(*field),
            "{what}: inspect field {field} differs from skopeo\nours:   {ours}\nskopeo: {oracle}"
        );
    }
    if let Some(ld) = ours.get("LayersData") {
        let m: Value = serde_json::from_slice(manifest).expect("manifest JSON");
        let layers = m["layers"].as_array().expect("manifest layers");
        let ld = ld
            .as_array()
            .unwrap_or_else(|| panic!("{what}: LayersData is not an array: {ld}"));
        assert_eq!(
            ld.len(),
            layers.len(),
            "{what}: LayersData length vs manifest layers"
        );
        for (d, l) in ld.iter().zip(layers) {
            assert_eq!(d["MIMEType"], l["mediaType"], "{what}: LayersData MIMEType");
            assert_eq!(d["Digest"], l["digest"], "{what}: LayersData Digest");
            assert_eq!(d["Size"], l["size"], "{what}: LayersData Size");
        }
    }
}

// ---------------------------------------------------------------------------
// The apt-layer binary
// ---------------------------------------------------------------------------

/// Path of the `apt-layer` binary cargo built for these tests, or
/// `$APT_LAYER_BIN` when set (a copy, when several worktrees share one
/// target directory and would overwrite each other's binary).
pub fn apt_layer_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("APT_LAYER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_apt-layer").into())
    })
}

/// Output of a finished `apt-layer` command.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl CliOutput {
    /// stdout parsed as JSON; panics (with stderr) on failure or bad JSON.
    pub fn json(&self) -> Value {
        assert!(
            self.status.success(),
            "apt-layer failed with {}:\n{}",
            self.status,
            self.stderr
        );
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "apt-layer printed no JSON ({e}):\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&self.stdout),
                self.stderr
            )
        })
    }
}

/// Runs `apt-layer ARGS` (RUST_LOG=info), killed after `limit`.
pub fn apt_layer(args: &[&str], limit: Duration) -> CliOutput {
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(apt_layer_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("REGISTRY_AUTH_FILE")
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap())
        .spawn()
        .expect("spawn apt-layer");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "apt-layer {args:?} did not finish within {limit:?}; stderr:\n{}",
                fs::read_to_string(err.path()).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    CliOutput {
        status,
        stdout: fs::read(out.path()).unwrap(),
        stderr: String::from_utf8_lossy(&fs::read(err.path()).unwrap()).into_owned(),
    }
}

/// An auth file (`{"auths":{HOST:{"auth":base64(user:pass)}}}`) in `dir`.
pub fn write_authfile(dir: &Path, entries: &[(&str, &str, &str)]) -> PathBuf {
    let mut auths = serde_json::Map::new();
    for (host, user, pass) in entries {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        auths.insert(host.to_string(), json!({ "auth": b64 }));
    }
    let p = dir.join(format!("auth-{}.json", free_port()));
    fs::write(
        &p,
        serde_json::to_vec_pretty(&json!({ "auths": auths })).unwrap(),
    )
    .unwrap();
    p
}

// ---------------------------------------------------------------------------
// Mount: the real daemon on a real FUSE mount
// ---------------------------------------------------------------------------

/// Options of a [`Mount`] before it starts.
#[derive(Debug, Clone)]
pub struct MountBuilder {
    insecure: Vec<String>,
    authfile: Option<PathBuf>,
    registries_conf: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    timeout_secs: u64,
    tag_ttl_secs: u64,
    options: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl MountBuilder {
    /// Adds `--insecure-registry HOST`.
    pub fn insecure(mut self, host: &str) -> Self {
        self.insecure.push(host.to_string());
        self
    }
    /// `--authfile PATH` (default: an empty `{}` file of the mount).
    pub fn authfile(mut self, p: &Path) -> Self {
        self.authfile = Some(p.to_path_buf());
        self
    }
    /// `--registries-conf PATH` (default: an empty file of the mount).
    pub fn registries_conf(mut self, p: &Path) -> Self {
        self.registries_conf = Some(p.to_path_buf());
        self
    }
    /// `--cache-dir PATH` (default: a fresh directory of the mount), e.g. to
    /// remount over the same cache.
    pub fn cache_dir(mut self, p: &Path) -> Self {
        self.cache_dir = Some(p.to_path_buf());
        self
    }
    /// `-o timeout=SECS` (default 5).
    pub fn timeout(mut self, secs: u64) -> Self {
        self.timeout_secs = secs;
        self
    }
    /// `-o tag_ttl=SECS` (default 300).
    pub fn tag_ttl(mut self, secs: u64) -> Self {
        self.tag_ttl_secs = secs;
        self
    }
    /// One more `-o` option (`key=value` or flag).
    pub fn option(mut self, o: &str) -> Self {
        self.options.push(o.to_string());
        self
    }
    /// One more command-line argument, after the others.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    /// An environment variable of the daemon (default `RUST_LOG=info`).
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
    /// Starts the daemon and waits until the mount is served.
    pub fn start(self) -> Mount {
        Mount::start_with(self)
    }
}

/// `apt-layer mount MNT --foreground …` running, its mount point, cache,
/// auth file and log in its own tempdir. Stopped (SIGTERM, then lazy umount
/// and SIGKILL) on drop.
pub struct Mount {
    dir: Option<TempDir>,
    mnt: PathBuf,
    cache: PathBuf,
    log_path: PathBuf,
    authfile: PathBuf,
    registries_conf: PathBuf,
    child: Option<Child>,
    exit: Option<ExitStatus>,
}

impl Mount {
    pub fn builder() -> MountBuilder {
        MountBuilder {
            insecure: Vec::new(),
            authfile: None,
            registries_conf: None,
            cache_dir: None,
            timeout_secs: 5,
            tag_ttl_secs: 300,
            options: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A mount with defaults and `--insecure-registry` for each host.
    pub fn start(insecure: &[&str]) -> Mount {
        let mut b = Self::builder();
        for h in insecure {
            b = b.insecure(h);
        }
        b.start()
    }

    fn start_with(b: MountBuilder) -> Mount {
        require_env();
        let dir = tempfile::Builder::new()
            .prefix("apt-layer-mount-")
            .tempdir()
            .expect("tempdir");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let cache = b
            .cache_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("cache"));
        fs::create_dir_all(&cache).unwrap();
        let authfile = b.authfile.clone().unwrap_or_else(|| {
            let p = dir.path().join("auth.json");
            fs::write(&p, "{}\n").unwrap();
            p
        });
        let registries_conf = b.registries_conf.clone().unwrap_or_else(|| {
            let p = dir.path().join("registries.conf");
            fs::write(&p, "").unwrap();
            p
        });
        let log_path = dir.path().join("daemon.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut opts = vec![
            format!("timeout={}", b.timeout_secs),
            format!("tag_ttl={}", b.tag_ttl_secs),
        ];
        opts.extend(b.options.iter().cloned());
        let mut cmd = Command::new(apt_layer_bin());
        cmd.arg("mount")
            .arg(&mnt)
            .arg("--foreground")
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--registries-conf")
            .arg(&registries_conf)
            .arg("--authfile")
            .arg(&authfile);
        for h in &b.insecure {
            cmd.arg("--insecure-registry").arg(h);
        }
        cmd.arg("-o").arg(opts.join(","));
        cmd.args(&b.args);
        cmd.env("RUST_LOG", "info").env_remove("REGISTRY_AUTH_FILE");
        for (k, v) in &b.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut m = Mount {
            dir: Some(dir),
            mnt,
            cache,
            log_path,
            authfile,
            registries_conf,
            child: Some(child),
            exit: None,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if m.is_mounted() {
                return m;
            }
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                m.exit = Some(status);
                panic!(
                    "apt-layer mount exited with {status} before {} was mounted; command {cmd:?}\nlog:\n{}",
                    m.mnt.display(),
                    m.log()
                );
            }
            if Instant::now() > deadline {
                let log = m.log();
                m.stop();
                panic!(
                    "{} not mounted as fuse.apt-layer after 15 s; command {cmd:?}\nlog:\n{log}",
                    m.mnt.display()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `MNT/rel`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    pub fn authfile_path(&self) -> &Path {
        &self.authfile
    }

    pub fn registries_conf_path(&self) -> &Path {
        &self.registries_conf
    }

    /// The daemon's stdout+stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Whether `needle` shows in the daemon's log within `timeout` (a
    /// line written a moment after what the test saw happen).
    pub fn log_shows_within(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => match c.try_wait().unwrap() {
                None => true,
                Some(s) => {
                    self.exit = Some(s);
                    self.child = None;
                    false
                }
            },
        }
    }

    /// How the daemon exited, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// Whether /proc/self/mountinfo shows the mount point as `fuse.apt-layer`.
    pub fn is_mounted(&self) -> bool {
        mount_fstype(&self.mnt).as_deref() == Some("fuse.apt-layer")
    }

    /// SIGKILL, as a crash would: no clean shutdown, the kernel's FUSE
    /// connection dies with the process; then the dead mount is detached.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
            self.exit = child.wait().ok();
        }
        if mount_fstype(&self.mnt).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }

    /// SIGTERM, wait ≤ 10 s; then `umount -l` and SIGKILL. Leaves nothing
    /// mounted. Returns the exit status when the daemon exited by itself.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut status = None;
            while Instant::now() < deadline {
                if let Some(s) = child.try_wait().unwrap() {
                    status = Some(s);
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            if status.is_none() {
                eprintln!("apt-layer did not exit 10 s after SIGTERM; umount -l and SIGKILL");
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
                let _ = child.wait();
            } else {
                self.exit = status;
            }
        }
        if mount_fstype(&self.mnt).is_some() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        self.exit
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- apt-layer daemon log {} (tail) ----\n{}",
                self.log_path.display(),
                tail(&self.log(), 80)
            );
        }
        self.stop();
        if mount_fstype(&self.mnt).is_some() {
            // Never let TempDir's remove_dir_all walk into a live mount.
            eprintln!("{} still mounted; leaking its tempdir", self.mnt.display());
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}

/// The fields of the line of /proc/self/mountinfo for the mount at `path`
/// (the last one mounted there), if any.
fn mountinfo_fields(path: &Path) -> Option<Vec<String>> {
    let want = path.to_string_lossy().replace(' ', "\\040");
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .map(|l| l.split(' ').map(String::from).collect::<Vec<_>>())
        .rfind(|f| f.get(4) == Some(&want))
}

/// The fstype of the mount at `path` in /proc/self/mountinfo (the last one
/// mounted there), if any.
pub fn mount_fstype(path: &Path) -> Option<String> {
    let fields = mountinfo_fields(path)?;
    let sep = fields.iter().position(|f| f == "-")?;
    fields.get(sep + 1).cloned()
}

/// The per-mount options (`ro`, `nosuid`, `nodev`, ...) of the mount at
/// `path` in /proc/self/mountinfo (the last one mounted there), if any.
pub fn mount_options(path: &Path) -> Option<Vec<String>> {
    let fields = mountinfo_fields(path)?;
    Some(fields.get(5)?.split(',').map(String::from).collect())
}

// ---------------------------------------------------------------------------
// FaultServer: an in-process HTTP server for faults real registries don't make
// ---------------------------------------------------------------------------

/// What the [`FaultServer`] does with one request.
#[derive(Debug, Clone)]
pub enum FaultReply {
    /// Answer with this status, headers and body (Content-Length and
    /// `Connection: close` are added; HEAD gets no body).
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Read the request, never answer, keep the socket open.
    Stall,
    /// Answer 200 with `body` (its full Content-Length), but send only its
    /// first `first` bytes until `gate` opens: a layer that is still
    /// streaming, for as long as the test wants.
    Trickle {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        first: usize,
        gate: Gate,
    },
    /// Answer 200 with `body`'s full Content-Length, then send it one
    /// byte every `every`: a registry that drips (each byte resets a read
    /// timeout).
    Drip {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        every: Duration,
    },
    /// Read the request and cut the connection without answering.
    Close,
    /// A blob served as a registry serves it: 206 with the part a `Range:
    /// bytes=A-B` (or `A-`) header asks for, else 200 with all of `body`.
    /// For a registry whose bytes lie, Range requests included.
    Ranged {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Answer 200 with `body`'s full Content-Length, send its first
    /// `first` bytes, then cut the connection: a network failure mid-blob.
    Cut {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        first: usize,
    },
    /// The default: `GET /v2/` → 200 `{}`, anything else → 404 registry error.
    Default,
}

impl FaultReply {
    /// A JSON answer.
    pub fn json(status: u16, body: &str) -> FaultReply {
        Self::bytes(status, "application/json", body.as_bytes().to_vec())
    }
    /// An answer with a Content-Type.
    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> FaultReply {
        FaultReply::Respond {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body,
        }
    }
    /// A blob that honours Range ([`FaultReply::Ranged`]).
    pub fn ranged(content_type: &str, body: Vec<u8>) -> FaultReply {
        FaultReply::Ranged {
            headers: vec![("Content-Type".into(), content_type.into())],
            body,
        }
    }
    /// Adds a header to a `Respond` or `Ranged`.
    pub fn with_header(self, k: &str, v: &str) -> FaultReply {
        match self {
            FaultReply::Ranged { mut headers, body } => {
                headers.push((k.to_string(), v.to_string()));
                FaultReply::Ranged { headers, body }
            }
            FaultReply::Respond {
                status,
                mut headers,
                body,
            } => {
                headers.push((k.to_string(), v.to_string()));
                FaultReply::Respond {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }
}

/// A request's headers: (name in lower case, value).
pub type Headers = [(String, String)];

type Handler = dyn Fn(&str, &str, &Headers) -> FaultReply + Send + Sync + 'static;

/// A gate a test opens once; [`FaultReply::Trickle`] answers wait for it.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    /// Lets every held answer go on (and every later one through at once).
    pub fn open(&self) {
        *self.0.0.lock().unwrap() = true;
        self.0.1.notify_all();
    }

    fn wait(&self) {
        let mut open = self.0.0.lock().unwrap();
        while !*open {
            open = self.0.1.wait(open).unwrap();
        }
    }
}

/// A tiny HTTP/1.1 server on 127.0.0.1 and a free port, answering each
/// request with `handler(method, target)` (`target` is the path with its
/// query string, e.g. `/v2/x/tags/list?n=10&last=a`). Every request is
/// recorded. Stalled sockets stay open until the server drops.
pub struct FaultServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl FaultServer {
    pub fn start(
        handler: impl Fn(&str, &str) -> FaultReply + Send + Sync + 'static,
    ) -> FaultServer {
        Self::start_with_headers(move |method, target, _| handler(method, target))
    }

    /// [`FaultServer::start`] with a handler that also sees the request's
    /// headers (e.g. to demand `Authorization`).
    pub fn start_with_headers(
        handler: impl Fn(&str, &str, &Headers) -> FaultReply + Send + Sync + 'static,
    ) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault server");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (stop2, req2, held2) = (stop.clone(), requests.clone(), held.clone());
        let thread = thread::Builder::new()
            .name(format!("fault-server-{port}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    let (h, r, k, s) =
                        (handler.clone(), req2.clone(), held2.clone(), stop2.clone());
                    thread::spawn(move || serve_conn(stream, &*h, &r, &k, &s));
                }
            })
            .unwrap();
        FaultServer {
            port,
            stop,
            thread: Some(thread),
            requests,
            held,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every (method, target) received so far.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().unwrap().clone()
    }

    /// How many requests had a target starting with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.starts_with(prefix))
            .count()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in self.held.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn serve_conn(
    mut stream: TcpStream,
    handler: &Handler,
    requests: &Mutex<Vec<(String, String)>>,
    held: &Mutex<Vec<TcpStream>>,
    stop: &AtomicBool,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = Vec::new();
    // Keep-alive: serve requests on this connection until it closes.
    loop {
        let end = loop {
            if let Some(e) = find(&buf, b"\r\n\r\n") {
                break e;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split_whitespace();
        let method = first.next().unwrap_or_default().to_string();
        let target = first.next().unwrap_or_default().to_string();
        let mut content_length = 0usize;
        let mut close = false;
        let mut range = None;
        let mut headers = Vec::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                if k.trim().eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
                if k.trim().eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse().unwrap_or(0);
                }
                if k.trim().eq_ignore_ascii_case("connection")
                    && v.trim().eq_ignore_ascii_case("close")
                {
                    close = true;
                }
            }
        }
        buf.drain(..end + 4);
        while buf.len() < content_length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..content_length);
        requests
            .lock()
            .unwrap()
            .push((method.clone(), target.clone()));
        let reply = match handler(&method, &target, &headers) {
            FaultReply::Default => default_reply(&method, &target),
            r => r,
        };
        match reply {
            FaultReply::Stall => {
                held.lock().unwrap().push(stream);
                return;
            }
            FaultReply::Close => {
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            FaultReply::Trickle {
                headers,
                body,
                first,
                gate,
            } => {
                let first = first.min(body.len());
                if !send_first(&mut stream, &headers, &body, first, close) {
                    return;
                }
                gate.wait();
                if stream.write_all(&body[first..]).is_err() || close {
                    return;
                }
            }
            FaultReply::Drip {
                headers,
                body,
                every,
            } => {
                if !send_first(&mut stream, &headers, &body, 0, close) {
                    return;
                }
                for b in &body {
                    std::thread::sleep(every);
                    if stream.write_all(std::slice::from_ref(b)).is_err() {
                        return;
                    }
                }
                if close {
                    return;
                }
            }
            FaultReply::Cut {
                headers,
                body,
                first,
            } => {
                send_first(&mut stream, &headers, &body, first.min(body.len()), close);
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            FaultReply::Default => unreachable!(),
            FaultReply::Ranged { mut headers, body } => {
                let total = body.len();
                let part = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(a, b)| {
                        let a: usize = a.parse().ok()?;
                        let b: usize = if b.is_empty() {
                            total.checked_sub(1)?
                        } else {
                            b.parse::<usize>().ok()?.min(total.checked_sub(1)?)
                        };
                        (a <= b).then_some((a, b))
                    });
                let (status, body) = match part {
                    Some((a, b)) => {
                        headers.push(("Content-Range".into(), format!("bytes {a}-{b}/{total}")));
                        (206, body[a..=b].to_vec())
                    }
                    None => (200, body),
                };
                let mut bytes = response_head(status, &headers, body.len(), close).into_bytes();
                if method != "HEAD" {
                    bytes.extend_from_slice(&body);
                }
                if stream.write_all(&bytes).is_err() || close {
                    return;
                }
            }
            FaultReply::Respond {
                status,
                headers,
                body,
            } => {
                let mut bytes = response_head(status, &headers, body.len(), close).into_bytes();
                if method != "HEAD" {
                    bytes.extend_from_slice(&body);
                }
                if stream.write_all(&bytes).is_err() || close {
                    return;
                }
            }
        }
    }
}

/// Sends a 200 with `body`'s full Content-Length but only its first
/// `first` bytes (flushed); false if the client has gone.
fn send_first(
    stream: &mut TcpStream,
    headers: &[(String, String)],
    body: &[u8],
    first: usize,
    close: bool,
) -> bool {
    let out = response_head(200, headers, body.len(), close);
    let sent = stream.write_all(out.as_bytes()).is_ok() && stream.write_all(&body[..first]).is_ok();
    let _ = stream.flush();
    sent
}

/// Status line and headers of an answer with a `len`-byte body (a JSON
/// Content-Type unless `headers` has one).
fn response_head(status: u16, headers: &[(String, String)], len: usize, close: bool) -> String {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    let mut has_ct = false;
    for (k, v) in headers {
        has_ct |= k.eq_ignore_ascii_case("content-type");
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_ct {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str("Docker-Distribution-Api-Version: registry/2.0\r\n");
    out.push_str(&format!("Content-Length: {len}\r\n"));
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out
}

fn default_reply(method: &str, target: &str) -> FaultReply {
    let path = target.split('?').next().unwrap_or_default();
    if (method == "GET" || method == "HEAD") && (path == "/v2/" || path == "/v2") {
        FaultReply::json(200, "{}")
    } else {
        FaultReply::json(
            404,
            r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#,
        )
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        206 => "Partial Content",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Splits a request target into path and query parameters.
pub fn split_target(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params = query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    (path.to_string(), params)
}

// ---------------------------------------------------------------------------
// rootfs: tree comparison against `umoci unpack`, hand-written tar layers,
// raw pushes, the content cache
// ---------------------------------------------------------------------------

use std::ffi::OsStr;
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

/// Bound for walking (and reading every file of) a tree inside a mount.
pub const TREE_GUARD: Duration = Duration::from_secs(600);

/// What [`snapshot_tree`] records of one path (lstat, never following
/// symlinks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// `file`, `dir`, `symlink`, `char`, `block`, `fifo` or `socket`.
    pub kind: &'static str,
    /// Permission bits incl. setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    /// sha256 hex of a regular file's content.
    pub sha256: Option<String>,
    /// A symlink's target bytes.
    pub link: Option<Vec<u8>>,
    /// (major, minor) of a device.
    pub rdev: Option<(u32, u32)>,
    /// Extended attributes except `security.selinux`.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// mtime, whole seconds.
    pub mtime: i64,
    /// (st_dev, st_ino), for hard-link groups.
    pub ino: (u64, u64),
}

/// A walked tree: every path (bytes, relative to the root; `""` is the root
/// itself) and the errors met on the way.
#[derive(Debug, Clone, Default)]
pub struct TreeSnapshot {
    pub nodes: BTreeMap<Vec<u8>, NodeInfo>,
    pub errors: Vec<String>,
}

/// A path of a snapshot for messages: `"/"` for the root, otherwise escaped
/// (non-UTF-8 bytes as `\xNN`, newlines as `\n`).
pub fn show_path(p: &[u8]) -> String {
    if p.is_empty() {
        "\"/\"".to_string()
    } else {
        format!("{:?}", OsStr::from_bytes(p))
    }
}

fn join_rel(rel: &[u8], name: &[u8]) -> Vec<u8> {
    if rel.is_empty() {
        name.to_vec()
    } else {
        let mut v = rel.to_vec();
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

/// The extended attributes of `p` (not following symlinks), without
/// `security.selinux`. A file system without xattr support has none.
pub fn lxattrs(p: &Path) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let c = cpath(p);
    let mut out = BTreeMap::new();
    let len = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) | Some(libc::ENOSYS) => Ok(out),
            _ => Err(e),
        };
    }
    if len == 0 {
        return Ok(out);
    }
    let mut buf = vec![0u8; len as usize + 1024];
    let len = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    for name in buf.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name == b"security.selinux" {
            continue;
        }
        let cname = std::ffi::CString::new(name).unwrap();
        let vlen = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if vlen < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut value = vec![0u8; vlen as usize + 1024];
        let vlen = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if vlen < 0 {
            return Err(io::Error::last_os_error());
        }
        value.truncate(vlen as usize);
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

fn sha256_of_file(p: &Path) -> io::Result<String> {
    let mut f = fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Walks `root` with lstat, reading and hashing every regular file and
/// reading every symlink and xattr. Unbounded: wrap in [`within`] for a
/// mount. Errors are recorded (with their path), never fatal.
pub fn snapshot_tree(root: &Path) -> TreeSnapshot {
    let mut snap = TreeSnapshot::default();
    let mut stack: Vec<Vec<u8>> = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(&rel))
        };
        let md = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                snap.errors.push(format!("lstat {}: {e}", show_path(&rel)));
                continue;
            }
        };
        let ft = md.file_type();
        let kind = if ft.is_file() {
            "file"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let sha256 = if ft.is_file() {
            match sha256_of_file(&p) {
                Ok(h) => Some(h),
                Err(e) => {
                    snap.errors.push(format!("read {}: {e}", show_path(&rel)));
                    None
                }
            }
        } else {
            None
        };
        let link = if ft.is_symlink() {
            match fs::read_link(&p) {
                Ok(t) => Some(t.into_os_string().into_vec()),
                Err(e) => {
                    snap.errors
                        .push(format!("readlink {}: {e}", show_path(&rel)));
                    None
                }
            }
        } else {
            None
        };
        let rdev = (ft.is_char_device() || ft.is_block_device())
            .then(|| (libc::major(md.rdev()), libc::minor(md.rdev())));
        let xattrs = match lxattrs(&p) {
            Ok(x) => x,
            Err(e) => {
                snap.errors.push(format!("xattrs {}: {e}", show_path(&rel)));
                BTreeMap::new()
            }
        };
        snap.nodes.insert(
            rel.clone(),
            NodeInfo {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: md.size(),
                nlink: md.nlink(),
                sha256,
                link,
                rdev,
                xattrs,
                mtime: md.mtime(),
                ino: (md.dev(), md.ino()),
            },
        );
        if ft.is_dir() {
            let rd = match fs::read_dir(&p) {
                Ok(rd) => rd,
                Err(e) => {
                    snap.errors
                        .push(format!("opendir {}: {e}", show_path(&rel)));
                    continue;
                }
            };
            for entry in rd {
                match entry {
                    Ok(entry) => stack.push(join_rel(&rel, entry.file_name().as_bytes())),
                    Err(e) => {
                        snap.errors
                            .push(format!("readdir {}: {e}", show_path(&rel)));
                        break;
                    }
                }
            }
        }
    }
    snap
}

fn show_xattrs(x: &BTreeMap<Vec<u8>, Vec<u8>>) -> String {
    let v: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{}={:?}", String::from_utf8_lossy(k), OsStr::from_bytes(v)))
        .collect();
    format!("{{{}}}", v.join(", "))
}

/// Differences between two snapshots (see [`compare_trees`]).
pub fn compare_snapshots(ours: &TreeSnapshot, oracle: &TreeSnapshot) -> Vec<String> {
    let mut diffs: Vec<String> = ours.errors.iter().map(|e| format!("ours: {e}")).collect();
    diffs.extend(oracle.errors.iter().map(|e| format!("oracle: {e}")));
    for (path, o) in &oracle.nodes {
        let Some(u) = ours.nodes.get(path) else {
            diffs.push(format!(
                "{}: missing in ours (oracle has a {})",
                show_path(path),
                o.kind
            ));
            continue;
        };
        let sp = show_path(path);
        if u.kind != o.kind {
            diffs.push(format!("{sp}: type {} vs oracle {}", u.kind, o.kind));
            continue;
        }
        if u.mode != o.mode {
            diffs.push(format!(
                "{sp}: mode {:04o} vs oracle {:04o}",
                u.mode, o.mode
            ));
        }
        if (u.uid, u.gid) != (o.uid, o.gid) {
            diffs.push(format!(
                "{sp}: owner {}:{} vs oracle {}:{}",
                u.uid, u.gid, o.uid, o.gid
            ));
        }
        if o.kind != "dir" {
            if u.size != o.size {
                diffs.push(format!("{sp}: size {} vs oracle {}", u.size, o.size));
            }
            if u.nlink != o.nlink {
                diffs.push(format!("{sp}: nlink {} vs oracle {}", u.nlink, o.nlink));
            }
        }
        if u.sha256 != o.sha256 {
            diffs.push(format!(
                "{sp}: content sha256 {:?} vs oracle {:?}",
                u.sha256, o.sha256
            ));
        }
        if u.link != o.link {
            diffs.push(format!(
                "{sp}: symlink target {:?} vs oracle {:?}",
                u.link.as_deref().map(OsStr::from_bytes),
                o.link.as_deref().map(OsStr::from_bytes)
            ));
        }
        if u.rdev != o.rdev {
            diffs.push(format!("{sp}: rdev {:?} vs oracle {:?}", u.rdev, o.rdev));
        }
        if u.xattrs != o.xattrs {
            diffs.push(format!(
                "{sp}: xattrs {} vs oracle {}",
                show_xattrs(&u.xattrs),
                show_xattrs(&o.xattrs)
            ));
        }
        // The root is the mount's rootfs directory on one side and umoci's
        // bundle directory on the other: its mtime is not the image's.
        if !path.is_empty() && u.mtime != o.mtime {
            diffs.push(format!("{sp}: mtime {} vs oracle {}", u.mtime, o.mtime));
        }
    }
    for (path, u) in &ours.nodes {
        if !oracle.nodes.contains_key(path) {
            diffs.push(format!("{}: extra in ours (a {})", show_path(path), u.kind));
        }
    }
    // Hard-link groups: non-directories sharing an inode, over the paths
    // both trees have.
    let groups = |snap: &TreeSnapshot| {
        let mut by_ino: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
        for (p, n) in &snap.nodes {
            if n.kind != "dir" && ours.nodes.contains_key(p) && oracle.nodes.contains_key(p) {
                by_ino.entry(n.ino).or_default().push(p.clone());
            }
        }
        let mut of_path: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
        for g in by_ino.into_values() {
            for p in &g {
                of_path.insert(p.clone(), g.clone());
            }
        }
        of_path
    };
    let (gu, go) = (groups(ours), groups(oracle));
    let mut reported = std::collections::BTreeSet::new();
    for (p, og) in &go {
        let Some(ug) = gu.get(p) else { continue };
        if ug != og && reported.insert(og.clone()) && reported.insert(ug.clone()) {
            let show = |g: &Vec<Vec<u8>>| g.iter().map(|p| show_path(p)).collect::<Vec<_>>();
            diffs.push(format!(
                "{}: hard-link group {:?} vs oracle {:?}",
                show_path(p),
                show(ug),
                show(og)
            ));
        }
    }
    diffs
}

/// Compares the tree `ours` (typically `MNT/…/<tag>/rootfs`) with `oracle`
/// (typically [`umoci_unpack`]'s rootfs), walking both with lstat. Per path:
/// file type, mode incl. setuid/setgid/sticky, uid, gid, size and link
/// count (non-directories), sha256 of regular files, symlink target bytes,
/// rdev, xattrs (without `security.selinux`, which umoci refuses to set),
/// mtime in seconds (except the root directory's), and hard-link groups
/// (paths sharing an inode in one tree must share one in the other).
///
/// Directory mtimes are compared: umoci restores every directory's mtime
/// from its tar entry, even after upper layers changed the directory. Only
/// directories without any tar entry (created implicitly as parents) get
/// the time of the unpack, so test images must give every directory an
/// entry. The walk of `ours` is bounded by [`TREE_GUARD`]. Returns the
/// differences; empty means equal.
pub fn compare_trees(ours: &Path, oracle: &Path) -> Vec<String> {
    let oracle_snap = snapshot_tree(oracle);
    assert!(
        oracle_snap.errors.is_empty(),
        "walking the oracle {}: {:?}",
        oracle.display(),
        oracle_snap.errors
    );
    let o = ours.to_path_buf();
    let ours_snap = within(TREE_GUARD, &format!("walk {}", ours.display()), move || {
        snapshot_tree(&o)
    });
    compare_snapshots(&ours_snap, &oracle_snap)
}

/// Panics with the differences (the first 60) when `ours` differs from
/// `oracle`.
pub fn assert_trees_equal(ours: &Path, oracle: &Path, what: &str) {
    let diffs = compare_trees(ours, oracle);
    assert!(
        diffs.is_empty(),
        "{what}: {} differs from umoci unpack {} in {} ways:\n  {}",
        ours.display(),
        oracle.display(),
        diffs.len(),
        diffs
            .iter()
            .take(60)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

/// `umoci unpack --image LAYOUT:TAG DEST`; returns `DEST/rootfs`. `dest`
/// must not exist yet.
pub fn umoci_unpack(layout_ref: &str, dest: &Path) -> PathBuf {
    require_env();
    run(Command::new("umoci")
        .args(["unpack", "--image", layout_ref])
        .arg(dest));
    dest.join("rootfs")
}

/// How a [`TarEntry`] longer than the 100-byte ustar fields is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongName {
    /// GNU `L` / `K` entries (what the tar crate and GNU tar write).
    Gnu,
    /// PAX `path` / `linkpath` records (what Go, hence umoci, writes).
    Pax,
}

/// What a [`TarEntry`] is.
#[derive(Debug, Clone)]
pub enum TarKind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    /// Hard link; the target is written as given (archive path).
    Hardlink(Vec<u8>),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
}

/// One entry of a hand-written tar layer: name bytes exactly as they go
/// into the archive (`..`, absolute, non-UTF-8 and long names included).
#[derive(Debug, Clone)]
pub struct TarEntry {
    pub path: Vec<u8>,
    pub kind: TarKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// `SCHILY.xattr.<name>` PAX records.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Further PAX records (`mtime`, `uid`, `gid`, …), written as given.
    pub pax: Vec<(String, Vec<u8>)>,
    pub long_name: LongName,
}

/// Default mtime of [`TarEntry`]s: 2017-07-14.
pub const TAR_MTIME: u64 = 1_500_000_000;

impl TarEntry {
    fn new(path: impl AsRef<[u8]>, kind: TarKind, mode: u32) -> TarEntry {
        TarEntry {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: TAR_MTIME,
            xattrs: Vec::new(),
            pax: Vec::new(),
            long_name: LongName::Gnu,
        }
    }
    /// A regular file, 0644.
    pub fn file(path: impl AsRef<[u8]>, data: impl Into<Vec<u8>>) -> TarEntry {
        Self::new(path, TarKind::File(data.into()), 0o644)
    }
    /// A directory, 0755 (write the name with a trailing `/`).
    pub fn dir(path: impl AsRef<[u8]>) -> TarEntry {
        Self::new(path, TarKind::Dir, 0o755)
    }
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> TarEntry {
        Self::new(path, TarKind::Symlink(target.as_ref().to_vec()), 0o777)
    }
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> TarEntry {
        Self::new(path, TarKind::Hardlink(target.as_ref().to_vec()), 0o644)
    }
    pub fn chardev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> TarEntry {
        Self::new(path, TarKind::CharDev(major, minor), 0o666)
    }
    pub fn blockdev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> TarEntry {
        Self::new(path, TarKind::BlockDev(major, minor), 0o660)
    }
    pub fn fifo(path: impl AsRef<[u8]>) -> TarEntry {
        Self::new(path, TarKind::Fifo, 0o644)
    }
    /// `<dir>/.wh.<name>` (dir `""` for the root): deletes `name` of the
    /// lower layers.
    pub fn whiteout(dir: &str, name: &str) -> TarEntry {
        let p = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{}/.wh.{name}", dir.trim_end_matches('/'))
        };
        Self::new(p, TarKind::File(Vec::new()), 0o644)
    }
    /// `<dir>/.wh..wh..opq`: hides everything of the lower layers in `dir`.
    pub fn opaque(dir: &str) -> TarEntry {
        Self::new(
            format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            TarKind::File(Vec::new()),
            0o644,
        )
    }
    pub fn mode(mut self, mode: u32) -> TarEntry {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> TarEntry {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, secs: u64) -> TarEntry {
        self.mtime = secs;
        self
    }
    pub fn xattr(mut self, name: &str, value: impl Into<Vec<u8>>) -> TarEntry {
        self.xattrs.push((name.to_string(), value.into()));
        self
    }
    /// An extra PAX record.
    pub fn pax(mut self, key: &str, value: impl Into<Vec<u8>>) -> TarEntry {
        self.pax.push((key.to_string(), value.into()));
        self
    }
    /// Long names and link targets as PAX records instead of GNU entries.
    pub fn pax_long_names(mut self) -> TarEntry {
        self.long_name = LongName::Pax;
        self
    }
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = base + 1;
    while len != base + len.to_string().len() {
        len = base + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    assert_eq!(r.len(), len);
    r
}

fn put_field(field: &mut [u8], value: &[u8]) {
    assert!(value.len() <= field.len(), "tar field overflow");
    field.fill(0);
    field[..value.len()].copy_from_slice(value);
}

/// A tar archive (ustar headers, PAX `x` and GNU `L`/`K` extensions where
/// needed, two zero blocks at the end) of exactly `entries`, in order.
pub fn tar_bytes(entries: &[TarEntry]) -> Vec<u8> {
    use tar::{EntryType, Header};
    let mut b = tar::Builder::new(Vec::new());
    let gnu_long = |b: &mut tar::Builder<Vec<u8>>, ty: u8, data: &[u8]| {
        let mut h = Header::new_gnu();
        put_field(&mut h.as_old_mut().name, b"././@LongLink");
        h.set_mode(0o644);
        h.set_size(data.len() as u64 + 1);
        h.set_entry_type(EntryType::new(ty));
        h.set_cksum();
        let mut d = data.to_vec();
        d.push(0);
        b.append(&h, &d[..]).unwrap();
    };
    for (i, e) in entries.iter().enumerate() {
        let mut records: Vec<(String, Vec<u8>)> = e.pax.clone();
        for (k, v) in &e.xattrs {
            records.push((format!("SCHILY.xattr.{k}"), v.clone()));
        }
        let mut name: &[u8] = &e.path;
        if name.len() > 100 {
            match e.long_name {
                LongName::Gnu => gnu_long(&mut b, b'L', &e.path),
                LongName::Pax => records.push(("path".into(), e.path.clone())),
            }
            name = &e.path[..100];
        }
        let target: Option<&Vec<u8>> = match &e.kind {
            TarKind::Symlink(t) | TarKind::Hardlink(t) => Some(t),
            _ => None,
        };
        let mut link: &[u8] = target.map(|t| &t[..]).unwrap_or(b"");
        if link.len() > 100 {
            match e.long_name {
                LongName::Gnu => gnu_long(&mut b, b'K', link),
                LongName::Pax => records.push(("linkpath".into(), link.to_vec())),
            }
            link = &link[..100];
        }
        if !records.is_empty() {
            let data: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
            let mut h = Header::new_ustar();
            put_field(
                &mut h.as_old_mut().name,
                format!("PaxHeaders.0/entry{i}").as_bytes(),
            );
            h.set_mode(0o644);
            h.set_mtime(e.mtime);
            h.set_size(data.len() as u64);
            h.set_entry_type(EntryType::XHeader);
            h.set_cksum();
            b.append(&h, &data[..]).unwrap();
        }
        let mut h = Header::new_ustar();
        put_field(&mut h.as_old_mut().name, name);
        put_field(&mut h.as_old_mut().linkname, link);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        let (ty, data): (EntryType, &[u8]) = match &e.kind {
            TarKind::File(d) => (EntryType::Regular, d),
            TarKind::Dir => (EntryType::Directory, b""),
            TarKind::Symlink(_) => (EntryType::Symlink, b""),
            TarKind::Hardlink(_) => (EntryType::Link, b""),
            TarKind::CharDev(..) => (EntryType::Char, b""),
            TarKind::BlockDev(..) => (EntryType::Block, b""),
            TarKind::Fifo => (EntryType::Fifo, b""),
        };
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        if let TarKind::CharDev(ma, mi) | TarKind::BlockDev(ma, mi) = e.kind {
            h.set_device_major(ma).unwrap();
            h.set_device_minor(mi).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// gzip of `bytes` (flate2, default level).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// gzip of `bytes` in stored (uncompressed) deflate blocks: the size depends
/// only on the input size.
pub fn gzip_stored(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// Decompresses (all members of) a gzip stream.
pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gunzip");
    out
}

/// Builds the image `tag` in the OCI layout `dir/oci` from hand-written
/// layers: `umoci new`, then `umoci raw add-layer` of each tar (umoci
/// gzips it, entries verbatim). Returns the layout path.
pub fn make_tar_image(dir: &Path, tag: &str, layers: &[Vec<TarEntry>]) -> PathBuf {
    require_env();
    let layout = dir.join("oci");
    if !layout.join("index.json").exists() {
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(&layout));
    }
    let image = layout_ref(&layout, tag);
    run(Command::new("umoci").args(["new", "--image", &image]));
    for layer in layers {
        add_tar_layer(&image, &tar_bytes(layer));
    }
    layout
}

/// An image of hand-written tar layers ([`make_tar_image`]), its `umoci
/// unpack` (the oracle) and a registry of its own serving it: the setup
/// most rootfs tests share, in one place so that each test shows only its
/// layers, where they are pushed and what it checks. The tempdir (layout,
/// unpack, and whatever else the test keeps in `work`) and the registry
/// live as long as this does.
pub struct PushedImage {
    /// Holds the OCI layout (`oci/`) and the unpack (`bundle/`).
    pub work: TempDir,
    /// The OCI layout.
    pub layout: PathBuf,
    /// `LAYOUT:NAME`, the image in the layout.
    pub image: String,
    /// `umoci unpack` of the image: what its `rootfs/` must equal.
    pub oracle: PathBuf,
    pub reg: Registry,
    /// `reg.host()`.
    pub host: String,
    /// The manifest digest of the push.
    pub digest: String,
}

impl PushedImage {
    /// Makes image `name` of `layers`, unpacks it, and pushes it (OCI) to a
    /// new registry as `HOST/DEST` (`DEST` is `repo:tag`).
    pub fn new(name: &str, layers: &[Vec<TarEntry>], dest: &str) -> PushedImage {
        require_env();
        let work = tempfile::Builder::new()
            .prefix("apt-layer-image-")
            .tempdir()
            .unwrap();
        let layout = make_tar_image(work.path(), name, layers);
        let image = layout_ref(&layout, name);
        let oracle = umoci_unpack(&image, &work.path().join("bundle"));
        let reg = Registry::start();
        let host = reg.host();
        let digest = push(&image, &format!("{host}/{dest}"), Format::Oci);
        PushedImage {
            work,
            layout,
            image,
            oracle,
            reg,
            host,
            digest,
        }
    }
}

/// `umoci raw add-layer --image LAYOUT:TAG` of the tar `bytes`.
pub fn add_tar_layer(image: &str, tar: &[u8]) {
    let f = tempfile::Builder::new()
        .prefix("layer-")
        .suffix(".tar")
        .tempfile()
        .unwrap();
    fs::write(f.path(), tar).unwrap();
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image", image])
        .arg(f.path()));
}

/// The manifest (parsed) of `tag` in an OCI layout and a blob reader.
pub fn layout_manifest(layout: &Path, tag: &str) -> Value {
    serde_json::from_slice(&layout_blob(layout, &layout_digest(layout, tag))).unwrap()
}

/// The bytes of blob `digest` of an OCI layout.
pub fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
}

/// Digests of the layers of a manifest.
pub fn manifest_layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// Uploads `bytes` as a blob of `HOST/REPO` (monolithic POST + PUT) and
/// returns its digest.
pub fn upload_blob(host: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256_digest(bytes);
    let r = http(
        "POST",
        host,
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        &[],
    )
    .expect("POST blob upload");
    assert_eq!(
        r.status,
        202,
        "start upload: {}",
        String::from_utf8_lossy(&r.body)
    );
    let loc = r.header("location").expect("upload Location").to_string();
    let path = match loc.find("/v2/") {
        Some(i) => loc[i..].to_string(),
        None => loc,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = http(
        "PUT",
        host,
        &format!("{path}{sep}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        bytes,
    )
    .expect("PUT blob");
    assert_eq!(
        r.status,
        201,
        "PUT blob: {}",
        String::from_utf8_lossy(&r.body)
    );
    digest
}

/// One layer of [`push_raw_image`].
#[derive(Debug, Clone)]
pub struct RawLayer {
    pub media_type: String,
    pub bytes: Vec<u8>,
    /// `sha256:` of the uncompressed tar, for the config's `diff_ids`.
    pub diff_id: String,
}

impl RawLayer {
    /// A `tar+gzip` layer of `tar` (OCI media type).
    pub fn gzip(tar: &[u8]) -> RawLayer {
        RawLayer {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            bytes: gzip(tar),
            diff_id: sha256_digest(tar),
        }
    }
    /// An uncompressed `tar` layer (OCI media type).
    pub fn plain(tar: &[u8]) -> RawLayer {
        RawLayer {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            bytes: tar.to_vec(),
            diff_id: sha256_digest(tar),
        }
    }
}

/// The config JSON of a hand-made linux image with `diff_ids`.
pub fn raw_config(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "created": "2020-01-01T00:00:00Z",
        "architecture": host_arch(),
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// The OCI manifest of a hand-made image: `(config, layers)` descriptors.
pub fn raw_manifest(config: &[u8], layers: &[(String, String, usize)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256_digest(config),
            "size": config.len(),
        },
        "layers": layers.iter().map(|(mt, d, s)| json!({"mediaType": mt, "digest": d, "size": s})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// Uploads `layers` and a config naming them, then PUTs an OCI manifest as
/// `HOST/REPO:TAG`: images no tool would make (plain tar layers, broken
/// layers). Returns (manifest bytes, manifest digest).
pub fn push_raw_image(host: &str, repo: &str, tag: &str, layers: &[RawLayer]) -> (Vec<u8>, String) {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    push_raw_image_with_config(host, repo, tag, &raw_config(&diff_ids), layers)
}

/// [`push_raw_image`] with a given config blob.
pub fn push_raw_image_with_config(
    host: &str,
    repo: &str,
    tag: &str,
    config: &[u8],
    layers: &[RawLayer],
) -> (Vec<u8>, String) {
    upload_blob(host, repo, config);
    let mut descs = Vec::new();
    for l in layers {
        let d = upload_blob(host, repo, &l.bytes);
        descs.push((l.media_type.clone(), d, l.bytes.len()));
    }
    let manifest = raw_manifest(config, &descs);
    let digest = put_manifest(
        host,
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
        None,
    );
    assert_eq!(digest, sha256_digest(&manifest));
    (manifest, digest)
}

/// Pushes `LAYOUT:TAG` to `HOST/REPO:DEST_TAG` with every gzip layer
/// decompressed (media type `…layer.v1.tar`), same config (its diff_ids
/// are the uncompressed digests already). Returns the manifest digest.
pub fn push_layout_uncompressed(
    layout: &Path,
    tag: &str,
    host: &str,
    repo: &str,
    dest_tag: &str,
) -> String {
    let m = layout_manifest(layout, tag);
    let config = layout_blob(layout, m["config"]["digest"].as_str().unwrap());
    let layers: Vec<RawLayer> = manifest_layer_digests(&m)
        .iter()
        .map(|d| RawLayer::plain(&gunzip(&layout_blob(layout, d))))
        .collect();
    push_raw_image_with_config(host, repo, dest_tag, &config, &layers).1
}

/// Pushes with `skopeo copy --dest-compress-format zstd` (layers recompressed
/// as `tar+zstd`); returns the manifest digest.
pub fn push_zstd(layout_ref: &str, dest: &str) -> String {
    let digestfile = tempfile::NamedTempFile::new().unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .args(["--dest-compress-format", "zstd", "--digestfile"])
        .arg(digestfile.path())
        .arg(format!("oci:{layout_ref}"))
        .arg(docker_ref(dest)));
    fs::read_to_string(digestfile.path())
        .unwrap()
        .trim()
        .to_string()
}

/// The busybox-static test image `tag` in `dir/oci`: `/bin/busybox` from
/// the host's busybox-static package, `/bin/{sh,echo,cat,ls,true}` symlinks
/// to it, `/etc/motd`, `/tmp` (1777). Every directory has a tar entry.
pub fn busybox_image(dir: &Path, tag: &str) -> PathBuf {
    let busybox = fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian package busybox-static) is needed for the chroot test");
    let mut layer = vec![
        TarEntry::dir("./"),
        TarEntry::dir("bin/"),
        TarEntry::file("bin/busybox", busybox).mode(0o755),
    ];
    for applet in ["sh", "echo", "cat", "ls", "true"] {
        layer.push(TarEntry::symlink(format!("bin/{applet}"), "busybox"));
    }
    layer.push(TarEntry::dir("etc/"));
    layer.push(TarEntry::file("etc/motd", "hello from a busybox image\n"));
    layer.push(TarEntry::dir("tmp/").mode(0o1777));
    make_tar_image(dir, tag, &[layer])
}

/// Deterministic, incompressible test bytes.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Every object file under `CACHE/objects` (recursively), sorted.
pub fn object_files(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![cache.join("objects")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// `CACHE/objects/<2 hex>/<62 hex>` of content with sha256 `hex`.
pub fn object_path(cache: &Path, hex: &str) -> PathBuf {
    cache.join("objects").join(&hex[..2]).join(&hex[2..])
}

/// The sha256 hex an object file is named by (`<2 hex>` dir + `<62 hex>`).
pub fn object_name(p: &Path) -> String {
    format!(
        "{}{}",
        p.parent().unwrap().file_name().unwrap().to_string_lossy(),
        p.file_name().unwrap().to_string_lossy()
    )
}

/// `apt-layer cache ARGS --cache-dir CACHE` (stats, verify, gc).
pub fn cache_cmd(cache: &Path, args: &[&str]) -> CliOutput {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.insert(0, "cache".into());
    v.push("--cache-dir".into());
    v.push(cache.display().to_string());
    let refs: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
    apt_layer(&refs, Duration::from_secs(120))
}

/// `apt-layer cache stats --cache-dir CACHE` parsed.
pub fn cache_stats(cache: &Path) -> Value {
    cache_cmd(cache, &["stats"]).json()
}

/// Flips one byte (bitwise not) of `p` at `offset`.
pub fn flip_byte(p: &Path, offset: u64) {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    b[0] = !b[0];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// The tests of one binary run in parallel, and dropping the kernel's
/// caches is system-wide: a test asserting what the kernel kept holds
/// [`caches_kept`] while it looks, and [`drop_caches`] waits for it.
static KERNEL_CACHES: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// While held, no test of this binary drops the kernel's caches.
pub fn caches_kept() -> std::sync::RwLockReadGuard<'static, ()> {
    KERNEL_CACHES.read().unwrap_or_else(|e| e.into_inner())
}

/// Drops the kernel's clean page cache (and dentries/inodes), so that the
/// next read of a FUSE file goes to the daemon.
pub fn drop_caches() {
    let _alone = KERNEL_CACHES.write().unwrap_or_else(|e| e.into_inner());
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", "3\n").expect("write /proc/sys/vm/drop_caches");
}

/// Waits (at most 60 s) until `repo:tag`'s tree is built, its layers
/// stored and their indexes saved (`"rootfs": "ready"` in its `status`).
/// A walk of `rootfs/` can end before that: once every layer is listed it
/// is answered from a sketch of the tree while a gzip layer's second pass
/// still stores its contents. What storing leaves behind (objects, layer
/// modes and states, cache commands' output, evictions and the log lines
/// they write) is only settled once the tree is ready.
pub fn wait_ready(m: &Mount, host: &str, repo: &str, tag: &str) {
    let status = || -> Value {
        serde_json::from_slice(&read(m.join(format!("{host}/{repo}/{tag}/status"))).unwrap())
            .unwrap()
    };
    let ready = wait_until(Duration::from_secs(60), || status()["rootfs"] == "ready");
    assert!(ready, "{repo}:{tag} not ready: {}", status());
}

/// Makes sure the registry's access log has caught up: sends a request with
/// a unique marker and waits until its access-log line appears. Requests
/// the registry finished before the marker are in the log afterwards.
pub fn registry_log_barrier(reg: &Registry) {
    let marker = format!("/v2/?apt-layer-barrier={}", free_port());
    let _ = http("GET", &reg.host(), &marker, &[], &[]);
    assert!(
        wait_until(Duration::from_secs(10), || reg.log().contains(&marker)),
        "registry access log never showed {marker}"
    );
}

/// `GET` request lines (`GET /v2/… HTTP/1.1`) of the registry log from
/// `offset` on that fetch blob `digest`.
pub fn blob_gets_since(reg: &Registry, offset: usize, digest: &str) -> usize {
    reg.requests_since(offset)
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains(&format!("/blobs/{digest}")))
        .count()
}

// ---------------------------------------------------------------------------
// Seekable layers: a private containerd for ctr-remote's converter
// ---------------------------------------------------------------------------

/// The seekable layer formats ctr-remote converts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seekable {
    /// `--estargz`: gzip members per chunk, TOC + 51-byte footer.
    Estargz,
    /// `--zstdchunked`: zstd frames per chunk, manifest in a skippable frame.
    ZstdChunked,
}

impl Seekable {
    /// The converter flag.
    pub fn flag(self) -> &'static str {
        match self {
            Seekable::Estargz => "--estargz",
            Seekable::ZstdChunked => "--zstdchunked",
        }
    }
    /// What `status` shows as the layer mode.
    pub fn mode(self) -> &'static str {
        match self {
            Seekable::Estargz => "estargz",
            Seekable::ZstdChunked => "zstd:chunked",
        }
    }
}

/// A containerd of the test's own (root, state, socket under a temp dir,
/// CRI off), for `ctr content fetch`, `ctr-remote image convert` and
/// `ctr image push`. Killed on drop.
pub struct Containerd {
    dir: TempDir,
    child: Option<Child>,
    sock: PathBuf,
}

impl Containerd {
    /// Starts containerd and waits until it answers.
    pub fn start() -> Containerd {
        require_env();
        for tool in ["containerd", "ctr", "ctr-remote"] {
            assert!(which(tool).is_some(), "{tool} is not installed");
        }
        let dir = tempfile::Builder::new()
            .prefix("apt-layer-ctd-")
            .tempdir()
            .expect("tempdir");
        let sock = dir.path().join("ctd.sock");
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = sock.display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let c = Containerd {
            dir,
            child: Some(child),
            sock,
        };
        let up = wait_until(Duration::from_secs(20), || {
            Command::new("ctr")
                .arg("-a")
                .arg(&c.sock)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(
            up,
            "containerd did not answer; log:\n{}",
            tail(
                &fs::read_to_string(c.dir.path().join("containerd.log")).unwrap_or_default(),
                30
            )
        );
        c
    }

    /// Runs `tool -a SOCK args…` (tool is `ctr` or `ctr-remote`); panics
    /// with its output on failure.
    pub fn run(&self, tool: &str, args: &[&str]) -> Vec<u8> {
        run(Command::new(tool).arg("-a").arg(&self.sock).args(args))
    }

    /// Fetches `src` (`HOST/REPO:TAG`, plain HTTP) into containerd's
    /// content store, converts it to `kind` as `dst` and pushes `dst`.
    /// `record` is a `--estargz-record-in` file (prioritised files).
    pub fn convert_and_push(&self, src: &str, dst: &str, kind: Seekable, record: Option<&Path>) {
        self.run("ctr", &["content", "fetch", "--plain-http", src]);
        let mut args = vec!["image", "convert", "--oci", kind.flag()];
        let rec;
        if let Some(r) = record {
            rec = r.display().to_string();
            args.extend(["--estargz-record-in", rec.as_str()]);
        }
        args.extend([src, dst]);
        self.run("ctr-remote", &args);
        self.run("ctr", &["image", "push", "--plain-http", dst]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sum of the bytes the registry sent for `GET`s of blob `digest` since
/// access-log `offset`, and how many such requests there were.
pub fn blob_bytes_since(reg: &Registry, offset: usize, digest: &str) -> (u64, usize) {
    let blob = format!("/blobs/{digest} ");
    let mut total = (0u64, 0usize);
    for l in reg.log_since(offset).lines() {
        let Some(start) = l.find('"').map(|s| s + 1) else {
            continue;
        };
        let rest = &l[start..];
        let Some(end) = rest.find('"') else { continue };
        let req = &rest[..end];
        if !(req.starts_with("GET ") && req.contains(&blob) && req.contains(" HTTP/")) {
            continue;
        }
        let mut it = rest[end + 1..].split_whitespace();
        let _status = it.next();
        if let Some(n) = it.next().and_then(|n| n.parse::<u64>().ok()) {
            total.0 += n;
            total.1 += 1;
        }
    }
    total
}

/// Where the registry keeps blob `digest` on disk.
pub fn registry_blob_path(reg: &Registry, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    reg.storage_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// The layer descriptors of the manifest `HOST/REPO:TAG`.
pub fn manifest_layers(host: &str, repo: &str, tag: &str) -> Vec<Value> {
    let (bytes, _) = get_manifest(host, repo, tag, None);
    let m: Value = serde_json::from_slice(&bytes).unwrap();
    m["layers"].as_array().unwrap().clone()
}

/// The TOC entries of a seekable layer blob (`desc` is its descriptor):
/// eStargz from its footer, zstd:chunked from its position annotation.
pub fn seekable_toc(blob: &[u8], desc: &Value) -> Vec<Value> {
    let json: Vec<u8> = if let Some(pos) =
        desc["annotations"]["io.containers.zstd-chunked.manifest-position"].as_str()
    {
        let n: Vec<usize> = pos.split(':').map(|p| p.parse().unwrap()).collect();
        zstd::bulk::decompress(&blob[n[0]..n[0] + n[1]], n[2]).unwrap()
    } else {
        let footer = &blob[blob.len() - 51..];
        let off = u64::from_str_radix(std::str::from_utf8(&footer[16..32]).unwrap(), 16).unwrap();
        let gz = flate2::read::GzDecoder::new(&blob[off as usize..]);
        let mut ar = tar::Archive::new(gz);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let mut j = Vec::new();
        e.read_to_end(&mut j).unwrap();
        j
    };
    let v: Value = serde_json::from_slice(&json).unwrap();
    v["entries"].as_array().unwrap().clone()
}

/// A tmpfs mounted at a path until dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=`) at `p`.
    pub fn mount(p: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(p).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(p));
        Tmpfs(p.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

// ---------------------------------------------------------------------------
// Kernel mounts made by tests
// ---------------------------------------------------------------------------

/// Whether something is mounted at `p`.
pub fn is_mountpoint(p: &Path) -> bool {
    mount_fstype(p).is_some()
}

/// A kernel mount made by a test; unmounted (lazily if busy) on drop.
pub struct KernelMount(pub PathBuf);

impl KernelMount {
    /// Unmounts it; fails the test (with `umount`'s reason) if it cannot.
    /// Tried a few times: in one full-suite run an `umount` right after a
    /// walk of the tree failed once (no reason kept then; 4 reruns passed).
    pub fn umount(&mut self) {
        let mut err = String::new();
        for _ in 0..5 {
            let out = Command::new("umount").arg(&self.0).output().unwrap();
            if out.status.success() {
                return;
            }
            err = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("umount {}: {err}", self.0.display());
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        for _ in 0..4 {
            if !is_mountpoint(&self.0) {
                return;
            }
            let _ = Command::new("umount").arg(&self.0).status();
        }
        if is_mountpoint(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// An overlay with a writable upper directory on `lower` (a `rootfs/`):
/// `upper/`, `work/` and `merged/` made under `dir`. Unmounted on drop.
pub struct Overlay {
    pub upper: PathBuf,
    pub merged: PathBuf,
    _mount: KernelMount,
}

impl Overlay {
    /// Mounts it; the colons of `HOST:PORT` in `lower` are escaped, as
    /// overlay's option syntax needs (else `ENOENT`).
    pub fn mount(lower: &Path, dir: &Path) -> Overlay {
        let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap();
        }
        let lower = lower.to_str().unwrap().replace(':', "\\:");
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -t overlay -o {opts}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Overlay {
            upper,
            _mount: KernelMount(merged.clone()),
            merged,
        }
    }
}

// ---------------------------------------------------------------------------
// What the kernel asks of a mount
// ---------------------------------------------------------------------------

/// Counts the FUSE requests the kernel sends one mount, by opcode (the
/// `fuse:fuse_request_send` tracepoint). How a test sees what the kernel
/// caches: a request that never reaches the daemon was answered from the
/// kernel's caches (readdir cache, passthrough, attribute TTLs).
///
/// Each trace has a tracefs instance of its own, filtered on the mount's
/// connection, so tests running in parallel do not see each other's
/// requests. tracefs and the FUSE tracepoints are required, like FUSE itself.
pub struct FuseTrace {
    dir: PathBuf,
}

impl FuseTrace {
    /// Starts counting the requests sent to the FUSE mount at `mnt`.
    pub fn start(mnt: &Path) -> FuseTrace {
        let tracefs = Path::new("/sys/kernel/tracing");
        if !tracefs.join("instances").is_dir() {
            let _ = Command::new("mount")
                .args(["-t", "tracefs", "nodev"])
                .arg(tracefs)
                .status();
        }
        let event = "events/fuse/fuse_request_send";
        assert!(
            tracefs.join(event).is_dir(),
            "tracefs has no {event} at {}: the FUSE tracepoints are needed to see what the kernel caches",
            tracefs.display()
        );
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = tracefs.join("instances").join(format!(
            "apt-layer-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let trace = FuseTrace { dir };
        // The tracepoint's `connection` is the kernel's dev_t of the mount.
        let dev = fs::metadata(mnt).unwrap().dev();
        let kdev = (libc::major(dev) << 20) | libc::minor(dev);
        let ev = trace.dir.join(event);
        fs::write(ev.join("filter"), format!("connection == {kdev}")).unwrap();
        fs::write(ev.join("enable"), "1").unwrap();
        trace
    }

    /// Stops counting: how many requests of each opcode (`FUSE_READDIR`,
    /// `FUSE_READ`, ...) were sent since [`FuseTrace::start`].
    pub fn stop(self) -> BTreeMap<String, usize> {
        let ev = self.dir.join("events/fuse/fuse_request_send");
        fs::write(ev.join("enable"), "0").unwrap();
        let text = fs::read_to_string(self.dir.join("trace")).unwrap();
        let mut counts = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some(op) = line
                .split_once(" (")
                .and_then(|(_, rest)| rest.split_once(')'))
                .map(|(op, _)| op)
            {
                *counts.entry(op.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }
}

impl Drop for FuseTrace {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("events/fuse/fuse_request_send/enable"), "0");
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A token service for [`Registry::start_with_token`]: an in-process HTTP
/// server answering `GET /token?service=…&scope=…` with a JWT signed
/// (RS256, by `openssl`) with a key whose self-signed certificate the
/// registry trusts (`x5c` in the token's header). Basic `user`/`pass` on
/// the token request get every action a scope asks for; a request without
/// credentials gets a token that grants nothing (the registry then answers
/// 401), or, from a public service ([`TokenService::start_public`]), only
/// the pull of repositories, as Docker Hub grants; wrong credentials get
/// 401 here. Every request is recorded
/// ([`TokenService::requests`]).
pub struct TokenService {
    server: FaultServer,
    _dir: TempDir,
    cert: PathBuf,
    user: String,
    pass: String,
}

impl TokenService {
    /// The `service` (token audience) the registry expects.
    pub const SERVICE: &'static str = "apt-layer-test-registry";
    /// The issuer the registry trusts.
    pub const ISSUER: &'static str = "apt-layer-test-tokens";

    pub fn start(user: &str, pass: &str) -> TokenService {
        Self::start_with(user, pass, false)
    }

    /// A service that grants anyone the pull of any repository (and
    /// nothing else without credentials): public images, as on Docker Hub.
    pub fn start_public(user: &str, pass: &str) -> TokenService {
        Self::start_with(user, pass, true)
    }

    fn start_with(user: &str, pass: &str, public: bool) -> TokenService {
        require_env();
        let dir = tempfile::Builder::new()
            .prefix("apt-layer-tokens-")
            .tempdir()
            .unwrap();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        run(Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=apt-layer test token service", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let der = run(Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert));
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        let server = FaultServer::start_with_headers(move |_method, target, headers| {
            let authz = headers
                .iter()
                .find(|(k, _)| k == "authorization")
                .map(|(_, v)| v.as_str());
            let granted = match authz {
                None => false,
                Some(a) if a == basic => true,
                Some(_) => {
                    return FaultReply::Respond {
                        status: 401,
                        headers: vec![],
                        body: br#"{"details":"wrong credentials"}"#.to_vec(),
                    };
                }
            };
            let scopes: Vec<String> = target
                .split_once('?')
                .map(|(_, q)| q)
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.strip_prefix("scope="))
                .map(|v| {
                    v.replace("%3A", ":")
                        .replace("%2F", "/")
                        .replace("%2C", ",")
                })
                .collect();
            let access: Vec<Value> = scopes
                .iter()
                .filter_map(|s| {
                    let (kind, rest) = s.split_once(':')?;
                    let (name, actions) = rest.rsplit_once(':')?;
                    let actions: Vec<&str> = actions
                        .split(',')
                        .filter(|a| granted || (public && kind == "repository" && *a == "pull"))
                        .collect();
                    (!actions.is_empty())
                        .then(|| json!({ "type": kind, "name": name, "actions": actions }))
                })
                .collect();
            let token = jwt(&key, &x5c, &access);
            FaultReply::Respond {
                status: 200,
                headers: vec![("Content-Type".into(), "application/json".into())],
                body: serde_json::to_vec(
                    &json!({ "token": token, "access_token": token, "expires_in": 300 }),
                )
                .unwrap(),
            }
        });
        TokenService {
            server,
            _dir: dir,
            cert,
            user: user.into(),
            pass: pass.into(),
        }
    }

    /// `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.server.host())
    }

    /// The targets of the token requests it answered, decoded (`:`, `/`
    /// and `,` in scopes), oldest first.
    pub fn asked(&self) -> Vec<String> {
        self.server
            .requests()
            .into_iter()
            .map(|(_, t)| {
                t.replace("%3A", ":")
                    .replace("%2F", "/")
                    .replace("%2C", ",")
            })
            .collect()
    }
}

/// A JWT granting `access`, signed with the RSA key at `key`.
fn jwt(key: &Path, x5c: &str, access: &[Value]) -> String {
    let b64 = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = json!({ "typ": "JWT", "alg": "RS256", "x5c": [x5c] });
    let claims = json!({
        "iss": TokenService::ISSUER,
        "sub": "apt-layer-test",
        "aud": TokenService::SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", free_port()),
        "access": access,
    });
    let signing_input = format!("{}.{}", b64(&header), b64(&claims));
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl dgst");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign failed");
    format!(
        "{signing_input}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out.stdout)
    )
}
