//! `registries.conf` version 2, the file podman and skopeo read: which
//! registries are `insecure` (plain HTTP or unverified TLS), which are
//! `blocked`, where a prefix really lives (`location` rewrites), and which
//! `[[registry.mirror]]`s serve image reads. Tag lists always go to the
//! primary location, as in the containers tools.
//!
//! Matching follows containers-registries.conf(5): the entry whose `prefix`
//! (default: its `location`) is the longest match of `host/repo` wins.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One mirror of a registry entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port][/path]` of the mirror.
    pub location: String,
    /// Plain HTTP / unverified TLS allowed for this mirror.
    #[serde(default)]
    pub insecure: bool,
}

/// One `[[registry]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct RegistryEntry {
    /// What references this entry applies to (`host` or `host/ns/...`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Where the matching references really live.
    #[serde(default)]
    pub location: String,
    /// Plain HTTP / unverified TLS allowed.
    #[serde(default)]
    pub insecure: bool,
    /// References matching this entry are refused.
    #[serde(default)]
    pub blocked: bool,
    /// Mirrors tried in order for image reads, before the primary.
    #[serde(default, rename = "mirror")]
    pub mirrors: Vec<Mirror>,
}

impl RegistryEntry {
    fn prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or(&self.location)
    }
}

#[derive(Deserialize, Default)]
struct RawConf {
    #[serde(default)]
    registry: Vec<RegistryEntry>,
}

/// The parsed configuration; empty when no file exists.
#[derive(Debug, Clone, Default)]
pub struct RegistriesConf {
    entries: Vec<RegistryEntry>,
    /// The file it came from, for messages.
    pub path: Option<PathBuf>,
}

/// Where one repository's reads go, after applying the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Registry host to contact.
    pub host: String,
    /// Repository path on that host.
    pub repo: String,
    /// Whether plain HTTP is allowed.
    pub insecure: bool,
}

impl RegistriesConf {
    /// Reads `explicit`, else `$CONTAINERS_REGISTRIES_CONF`, else
    /// `~/.config/containers/registries.conf`, else
    /// `/etc/containers/registries.conf`. A missing default file is empty.
    pub fn load(explicit: Option<&Path>) -> Result<RegistriesConf, String> {
        let candidates: Vec<PathBuf> = match explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("CONTAINERS_REGISTRIES_CONF").map(PathBuf::from))
        {
            Some(p) => vec![p],
            None => {
                let mut v = Vec::new();
                if let Some(h) = std::env::var_os("HOME") {
                    v.push(PathBuf::from(h).join(".config/containers/registries.conf"));
                }
                v.push(PathBuf::from("/etc/containers/registries.conf"));
                v
            }
        };
        let explicit = candidates.len() == 1;
        for path in candidates {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let mut c =
                        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                    c.path = Some(path);
                    return Ok(c);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => continue,
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            }
        }
        Ok(RegistriesConf::default())
    }

    /// Parses the TOML text of a v2 file (v1 tables are ignored).
    pub fn parse(text: &str) -> Result<RegistriesConf, String> {
        let raw: RawConf = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(RegistriesConf {
            entries: raw.registry,
            path: None,
        })
    }

    /// Adds `--insecure-registry HOST`.
    pub fn add_insecure(&mut self, host: &str) {
        match self.entries.iter_mut().find(|e| e.prefix() == host) {
            Some(e) => e.insecure = true,
            None => self.entries.push(RegistryEntry {
                prefix: None,
                location: host.to_string(),
                insecure: true,
                blocked: false,
                mirrors: Vec::new(),
            }),
        }
    }

    /// The entry that applies to `host/repo`, by longest prefix.
    pub fn find(&self, host: &str, repo: &str) -> Option<&RegistryEntry> {
        let full = format!("{host}/{repo}");
        self.entries
            .iter()
            .filter(|e| {
                let p = e.prefix();
                full == p || full.starts_with(&format!("{p}/")) || p == host
            })
            .max_by_key(|e| e.prefix().len())
    }

    /// Whether `host` is allowed over plain HTTP.
    pub fn is_insecure_host(&self, host: &str) -> bool {
        self.entries.iter().any(|e| {
            (e.insecure && location_host(&e.location) == host)
                || e.mirrors
                    .iter()
                    .any(|m| m.insecure && location_host(&m.location) == host)
        })
    }

    /// Whether references under `host/repo` are blocked.
    pub fn is_blocked(&self, host: &str, repo: &str) -> bool {
        self.find(host, repo).is_some_and(|e| e.blocked)
    }

    /// The primary endpoint for `host/repo` (tag lists, catalog, pushes).
    pub fn primary(&self, host: &str, repo: &str) -> Endpoint {
        match self.find(host, repo) {
            Some(e) => rewrite(e.prefix(), &e.location, e.insecure, host, repo),
            None => Endpoint {
                host: host.to_string(),
                repo: repo.to_string(),
                insecure: false,
            },
        }
    }

    /// Endpoints for image reads: each mirror in order, then the primary.
    pub fn pull_endpoints(&self, host: &str, repo: &str) -> Vec<Endpoint> {
        let mut v = Vec::new();
        if let Some(e) = self.find(host, repo) {
            for m in &e.mirrors {
                v.push(rewrite(e.prefix(), &m.location, m.insecure, host, repo));
            }
        }
        v.push(self.primary(host, repo));
        v
    }

    /// Registry hosts named in the file (listed at the top of the tree).
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| location_host(e.prefix()))
    }

    /// Every host that must be reached over plain HTTP.
    pub fn insecure_hosts(&self) -> Vec<String> {
        let mut v = Vec::new();
        for e in &self.entries {
            if e.insecure {
                v.push(location_host(&e.location).to_string());
            }
            for m in &e.mirrors {
                if m.insecure {
                    v.push(location_host(&m.location).to_string());
                }
            }
        }
        v
    }
}

fn location_host(loc: &str) -> &str {
    loc.split('/').next().unwrap_or(loc)
}

/// Replaces `prefix` in `host/repo` with `location`.
fn rewrite(prefix: &str, location: &str, insecure: bool, host: &str, repo: &str) -> Endpoint {
    let full = format!("{host}/{repo}");
    let rest = full.strip_prefix(prefix).unwrap_or(&full[host.len()..]);
    let target = format!("{location}{rest}");
    let (h, r) = target.split_once('/').unwrap_or((&target, ""));
    Endpoint {
        host: h.to_string(),
        repo: r.to_string(),
        insecure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
unqualified-search-registries = ["docker.io"]
[[registry]]
location = "127.0.0.1:5000"
insecure = true
[[registry.mirror]]
location = "127.0.0.1:5001"
insecure = true

[[registry]]
prefix = "example.com/foo"
location = "127.0.0.1:6000/bar"

[[registry]]
location = "evil.example"
blocked = true
"#;

    #[test]
    fn mirrors_rewrites_and_blocks() {
        let c = RegistriesConf::parse(CONF).unwrap();
        let eps = c.pull_endpoints("127.0.0.1:5000", "a/b");
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].host, "127.0.0.1:5001");
        assert_eq!(eps[0].repo, "a/b");
        assert_eq!(eps[1].host, "127.0.0.1:5000");
        let p = c.primary("example.com", "foo/x");
        assert_eq!(
            (p.host.as_str(), p.repo.as_str()),
            ("127.0.0.1:6000", "bar/x")
        );
        assert_eq!(c.primary("example.com", "other").host, "example.com");
        assert!(c.is_blocked("evil.example", "x"));
        assert!(!c.is_blocked("127.0.0.1:5000", "x"));
        assert!(c.is_insecure_host("127.0.0.1:5001"));
        assert!(!c.is_insecure_host("example.com"));
    }
}
