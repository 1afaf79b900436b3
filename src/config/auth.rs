//! Credentials from the auth files shared by podman, skopeo, buildah and
//! docker, looked up in the same order they use:
//!
//! 1. `--authfile FILE` or `$REGISTRY_AUTH_FILE`, and then that file alone;
//! 2. `$XDG_RUNTIME_DIR/containers/auth.json`;
//! 3. `~/.config/containers/auth.json`;
//! 4. `~/.docker/config.json`.
//!
//! The first file that has an entry for a registry wins. Secrets never leave
//! this module except as a [`Credential`], whose `Debug` hides them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

/// A user name and secret for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// User name (may be empty for identity tokens).
    pub username: String,
    /// Password or token. Never logged.
    pub password: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credential {{ username: {:?}, password: <redacted> }}",
            self.username
        )
    }
}

#[derive(Deserialize, Default)]
struct RawFile {
    #[serde(default)]
    auths: BTreeMap<String, RawEntry>,
}

#[derive(Deserialize, Default)]
struct RawEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The merged view of every auth file that applies, with where each
/// credential came from (for error messages that name the file).
#[derive(Debug, Default, Clone)]
pub struct AuthFile {
    /// registry host → (credential, file it came from)
    entries: BTreeMap<String, (Credential, PathBuf)>,
    /// The files consulted, in order, for messages like "no credentials in …".
    searched: Vec<PathBuf>,
}

impl AuthFile {
    /// Loads credentials. `explicit` is `--authfile`; when it (or
    /// `$REGISTRY_AUTH_FILE`) is given, only that file is read.
    pub fn load(explicit: Option<&Path>) -> Result<AuthFile, String> {
        let explicit = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("REGISTRY_AUTH_FILE").map(PathBuf::from));
        let files: Vec<PathBuf> = match explicit {
            Some(p) => vec![p],
            None => default_files(),
        };
        let mut out = AuthFile {
            entries: BTreeMap::new(),
            searched: files.clone(),
        };
        let only_one = files.len() == 1;
        for path in files {
            let text = match std::fs::read(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !only_one => continue,
                Err(e) => return Err(format!("cannot read auth file {}: {e}", path.display())),
            };
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let raw: RawFile = serde_json::from_slice(&text)
                .map_err(|e| format!("auth file {} is not valid JSON: {e}", path.display()))?;
            for (key, entry) in raw.auths {
                let host = normalize_key(&key);
                if out.entries.contains_key(&host) {
                    continue;
                }
                if let Some(cred) = decode(&entry) {
                    out.entries.insert(host, (cred, path.clone()));
                }
            }
        }
        Ok(out)
    }

    /// The credential for a registry host, if any file has one.
    pub fn get(&self, registry: &str) -> Option<&Credential> {
        self.entries.get(registry).map(|(c, _)| c)
    }

    /// Human-readable source of credentials for `registry`, for log lines:
    /// the file that had them, or the files that were searched.
    pub fn source(&self, registry: &str) -> String {
        match self.entries.get(registry) {
            Some((_, p)) => format!("credentials from {}", p.display()),
            None if self.searched.is_empty() => "no auth file".to_string(),
            None => format!(
                "no credentials for {registry} in {}",
                self.searched
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Registry hosts that have credentials (they are listed at the top).
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
}

fn default_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        v.push(PathBuf::from(x).join("containers/auth.json"));
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        v.push(home.join(".config/containers/auth.json"));
        v.push(home.join(".docker/config.json"));
    }
    v
}

/// Auth file keys may be `host`, `host/namespace`, or docker's
/// `https://index.docker.io/v1/`; reduce them to the registry host.
fn normalize_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        h => h.to_string(),
    }
}

fn decode(e: &RawEntry) -> Option<Credential> {
    if let Some(auth) = e.auth.as_deref().filter(|a| !a.is_empty()) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()?;
        let s = String::from_utf8(bytes).ok()?;
        let (u, p) = s.split_once(':')?;
        return Some(Credential {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    match (&e.username, &e.password) {
        (Some(u), Some(p)) => Some(Credential {
            username: u.clone(),
            password: p.clone(),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_base64_and_names_source() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("auth.json");
        std::fs::write(&p, r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},"https://index.docker.io/v1/":{"username":"a","password":"b"}}}"#).unwrap();
        let a = AuthFile::load(Some(&p)).unwrap();
        let c = a.get("127.0.0.1:5000").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(a.get("docker.io").unwrap().username, "a");
        assert!(a.source("127.0.0.1:5000").contains("auth.json"));
        assert!(!format!("{c:?}").contains("pa:ss"));
        assert!(
            a.source("quay.io")
                .starts_with("no credentials for quay.io in")
        );
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        assert!(AuthFile::load(Some(Path::new("/nonexistent/auth.json"))).is_err());
    }
}
