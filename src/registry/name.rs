//! Names as the distribution spec and the containers tools define them:
//! registry hosts, repository path components, tags and digests, plus the
//! `docker.io/debian` → `docker.io/library/debian` rule.

/// A registry name is a host with a `.` or a `:port`, or `localhost`
/// (so `outbox` and other plain words can never be one).
pub fn is_registry(name: &str) -> bool {
    if name == "localhost" {
        return true;
    }
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (name, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    valid_host && (host.contains('.') || port.is_some() || host == "localhost")
}

/// One path component of a repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_repo_component(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 255 {
        return false;
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: ".", "_", "__", or "-+"
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// `sha256:<64 lowercase hex>`.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// Docker Hub, whose repository names are `<namespace>/<name>` and never
/// deeper (single-component names are `library/<name>`).
pub fn is_docker_hub(registry: &str) -> bool {
    registry == "docker.io"
}

/// The repository path a registry really serves: Docker Hub puts
/// single-component names under `library/`.
pub fn canonical_repo(registry: &str, repo: &str) -> String {
    if is_docker_hub(registry) && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo.to_string()
    }
}

/// A parsed `registry/repo[:tag][@digest]` reference as users type it
/// (`docker://` prefix allowed; a missing registry means docker.io).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host as shown in the tree (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path, canonical (`library/debian`).
    pub repo: String,
    /// Tag, if given.
    pub tag: Option<String>,
    /// Manifest digest, if given.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses a reference; `default_tag` fills a missing tag and digest.
    pub fn parse(s: &str, default_tag: Option<&str>) -> Result<ImageRef, String> {
        let s = s.strip_prefix("docker://").unwrap_or(s);
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.to_string())),
            None => (s, None),
        };
        if let Some(d) = &digest
            && !is_sha256_digest(d)
        {
            return Err(format!("invalid digest {d:?} in {s:?}"));
        }
        // a ':' after the last '/' is a tag separator
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_string()),
            ),
            None => (rest, None),
        };
        let (registry, repo) = match name.split_once('/') {
            Some((first, r)) if is_registry(first) => (first.to_string(), r.to_string()),
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if repo.is_empty() || !repo.split('/').all(is_repo_component) {
            return Err(format!("invalid repository name {repo:?} in {s:?}"));
        }
        if let Some(t) = &tag
            && !is_tag(t)
        {
            return Err(format!("invalid tag {t:?} in {s:?}"));
        }
        let tag = match (&tag, &digest) {
            (None, None) => default_tag.map(str::to_string),
            _ => tag,
        };
        let repo = canonical_repo(&registry, &repo);
        Ok(ImageRef {
            registry,
            repo,
            tag,
            digest,
        })
    }

    /// `registry/repo`, the `Name` skopeo prints.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names() {
        for ok in [
            "docker.io",
            "127.0.0.1:5000",
            "localhost",
            "localhost:5000",
            "quay.io",
            "a-b.example.com:443",
        ] {
            assert!(is_registry(ok), "{ok}");
        }
        for bad in [
            "outbox", "library", "debian", "", "a..b", "host:", "host:abc", "-a.com", "a/b",
        ] {
            assert!(!is_registry(bad), "{bad}");
        }
    }

    #[test]
    fn components_tags_digests() {
        assert!(is_repo_component("debian"));
        assert!(is_repo_component("a__b-c.d--e"));
        assert!(!is_repo_component("A"));
        assert!(!is_repo_component("a___b"));
        assert!(!is_repo_component("-a"));
        assert!(!is_repo_component("@sha256:00"));
        assert!(is_tag("v1.2.3-rc_1"));
        assert!(!is_tag(".hidden"));
        assert!(!is_tag(&"a".repeat(129)));
        assert!(is_sha256_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_sha256_digest(&format!("sha256:{}", "A".repeat(64))));
    }

    #[test]
    fn references() {
        let r = ImageRef::parse("debian", Some("latest")).unwrap();
        assert_eq!(r.name(), "docker.io/library/debian");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = ImageRef::parse("docker://127.0.0.1:5000/ns/img:v1", None).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str(), r.tag.as_deref()),
            ("127.0.0.1:5000", "ns/img", Some("v1"))
        );
        let d = format!("sha256:{}", "0".repeat(64));
        let r = ImageRef::parse(&format!("localhost:5000/x@{d}"), Some("latest")).unwrap();
        assert_eq!((r.tag, r.digest.as_deref()), (None, Some(d.as_str())));
        assert!(ImageRef::parse("127.0.0.1:5000/Bad", None).is_err());
    }
}
