//! Documents: tag lists and the catalog (every page), manifests and
//! their digests by our own capped, authenticated requests, and the pull
//! tokens those requests carry.

use super::*;

impl RegistryClient {
    /// Every tag of `registry/repo`, following every page ([`list`]). Tag
    /// lists always go to the primary location, never to a mirror.
    pub async fn list_tags(
        &self,
        registry: &str,
        repo: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let ep = self.check(registry, repo)?;
        let what = format!("tag list of {repo}");
        let reference = Reference::with_tag(ep.host.clone(), ep.repo.clone(), "latest".into());
        let path = format!("/v2/{}/tags/list", ep.repo);
        self.list_all(&ep.host, &reference, &path, ListKind::Tags, &what)
            .await
            .map(|tags| valid_names(tags, &what, name::is_tag))
    }

    /// Every repository `/v2/_catalog` lists (registries that do not serve
    /// the catalog give an error, which callers treat as "unknown").
    pub async fn catalog(&self, registry: &str) -> Result<Vec<String>, RegistryError> {
        let ep = self.inner.conf.primary(registry, "x");
        let reference = Reference::with_tag(ep.host.clone(), "x".into(), "latest".into());
        self.list_all(
            &ep.host,
            &reference,
            "/v2/_catalog",
            ListKind::Catalog,
            "catalog",
        )
        .await
        .map(|repos| {
            valid_names(repos, "catalog", |r| {
                r.split('/').all(name::is_repo_component)
            })
        })
    }

    /// Follows a paginated list (tags, catalog) from `path` on `host` to
    /// its end, authenticated as a pull of `reference`'s repository. The
    /// bounds and the order of names are [`list`]'s contracts.
    async fn list_all(
        &self,
        host: &str,
        reference: &Reference,
        path: &str,
        kind: ListKind,
        what: &str,
    ) -> Result<Vec<String>, RegistryError> {
        let malformed = |reason: String| RegistryError::Malformed {
            registry: host.into(),
            what: what.into(),
            reason,
        };
        let first = reqwest::Url::parse(&format!("{}{path}", self.base_url(host)))
            .map_err(|e| malformed(format!("bad list URL: {e}")))?;
        let (mut names, mut seen, mut total) = (Vec::new(), std::collections::HashSet::new(), 0);
        let mut next = Some(first);
        for _ in 0..list::MAX_PAGES {
            let Some(url) = next.take() else {
                return Ok(names);
            };
            let (headers, body) = self
                .ask_doc(
                    reqwest::Method::GET,
                    host,
                    what,
                    reference,
                    &url,
                    "application/json",
                    list::MAX_PAGE_BODY,
                )
                .await?;
            total += body.len() as u64;
            if total > list::MAX_LIST_BYTES {
                return Err(malformed(format!(
                    "the list is larger than {} MiB",
                    list::MAX_LIST_BYTES >> 20
                )));
            }
            let page = list::page_names(kind, &body).map_err(malformed)?;
            let new: Vec<String> = page
                .into_iter()
                .filter(|n| seen.insert(n.clone()))
                .collect();
            if new.is_empty() {
                return Ok(names);
            }
            names.extend(new);
            next = list::next_link(&headers, &url).map_err(malformed)?;
        }
        Err(malformed(format!(
            "the list did not end after {} pages",
            list::MAX_PAGES
        )))
    }

    /// A small document (a list page, a manifest) by our own `GET` (or
    /// only its headers, by `HEAD`), read up to `max` bytes as it streams,
    /// authenticated as a pull of `reference`'s repository: a bearer token
    /// from oci-client's challenge flow (reused for [`TOKEN_REUSE`]), else
    /// Basic credentials from the auth file. Refused with a `Bearer`
    /// challenge, it fetches one token for exactly the scope the challenge
    /// names and asks once more: the catalog wants `registry:catalog:*`,
    /// not a repository's pull, and a token may have been revoked.
    #[allow(clippy::too_many_arguments)]
    async fn ask_doc(
        &self,
        method: reqwest::Method,
        host: &str,
        what: &str,
        reference: &Reference,
        url: &reqwest::Url,
        accept: &str,
        max: u64,
    ) -> Result<(reqwest::header::HeaderMap, Bytes), RegistryError> {
        let auth = self.registry_auth(host);
        let challenge = std::sync::Mutex::new(None);
        let mut token = self.pull_token(host, what, reference, &auth).await?;
        let mut challenged = false;
        loop {
            let got = self
                .retrying(host, what, || {
                    let ask = Ask {
                        method: method.clone(),
                        url,
                        accept,
                        max,
                        token: token.as_deref(),
                        auth: &auth,
                    };
                    self.request_capped(ask, Some(&challenge))
                })
                .await;
            match got {
                Err(RegistryError::Denied { .. }) if !challenged => {
                    let Some(c) = challenge.lock().unwrap().take() else {
                        return got;
                    };
                    challenged = true;
                    token = Some(
                        self.challenge_token(host, what, reference, &c, &auth)
                            .await?,
                    );
                }
                r => return r,
            }
        }
    }

    /// A token for the scope a `Bearer` challenge names (else the pull of
    /// `reference`'s repository), from its realm (Basic credentials from
    /// the auth file, if any), kept as that repository's token.
    async fn challenge_token(
        &self,
        host: &str,
        what: &str,
        reference: &Reference,
        challenge: &str,
        auth: &RegistryAuth,
    ) -> Result<String, RegistryError> {
        let bad = |reason: String| RegistryError::Malformed {
            registry: host.into(),
            what: what.into(),
            reason,
        };
        let params = bearer_params(challenge)
            .ok_or_else(|| bad(format!("unreadable challenge {challenge:?}")))?;
        let realm = params
            .get("realm")
            .ok_or_else(|| bad(format!("a challenge without a realm: {challenge:?}")))?;
        let mut url = reqwest::Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| bad(format!("token realm {realm:?} is not an HTTP URL")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = params.get("service") {
                q.append_pair("service", service);
            }
            // A challenge without a scope (some registries leave it out)
            // means the pull of the repository asked for.
            let pull = format!("repository:{}:pull", reference.repository());
            let scopes = params.get("scope").unwrap_or(&pull);
            for scope in scopes.split(' ').filter(|s| !s.is_empty()) {
                q.append_pair("scope", scope);
            }
        }
        // The token service's answer is a small document like any other.
        let (_, body) = self
            .retrying(host, what, || {
                let ask = Ask {
                    method: reqwest::Method::GET,
                    url: &url,
                    accept: "application/json",
                    max: 1 << 20,
                    token: None,
                    auth,
                };
                self.request_capped(ask, None)
            })
            .await?;
        let token = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let t = v.get("token").or_else(|| v.get("access_token"))?;
                t.as_str().map(str::to_string)
            })
            .ok_or_else(|| bad("the token service's answer holds no token".into()))?;
        self.keep_token(host, reference, Some(token.clone()));
        Ok(token)
    }

    /// The bearer token for pulling `reference`'s repository (`None` where
    /// the registry takes Basic credentials or none), reused while younger
    /// than [`TOKEN_REUSE`].
    async fn pull_token(
        &self,
        host: &str,
        what: &str,
        reference: &Reference,
        auth: &RegistryAuth,
    ) -> Result<Option<String>, RegistryError> {
        let key = (host.to_string(), reference.repository().to_string());
        if let Some((token, at)) = self.inner.tokens.lock().unwrap().get(&key)
            && at.elapsed() < TOKEN_REUSE
        {
            return Ok(token.clone());
        }
        let token = self
            .retrying(host, what, || {
                self.inner
                    .oci
                    .auth(reference, auth, RegistryOperation::Pull)
            })
            .await?;
        self.keep_token(host, reference, token.clone());
        Ok(token)
    }

    /// Keeps `token` as the one for `reference`'s repository on `host`.
    fn keep_token(&self, host: &str, reference: &Reference, token: Option<String>) {
        let key = (host.to_string(), reference.repository().to_string());
        let mut tokens = self.inner.tokens.lock().unwrap();
        // One entry per repository read lately: a walk of many
        // repositories leaves no trail of stale tokens.
        if tokens.len() >= 1024 {
            tokens.retain(|_, (_, at)| at.elapsed() < TOKEN_REUSE);
        }
        tokens.insert(key, (token, Instant::now()));
    }

    /// One request (`GET`, `HEAD`) for a small document: its headers and
    /// its body, read up to `max` bytes (an error beyond). Failures are
    /// classified as oci-client's own (so [`Self::retrying`] treats them
    /// alike); `challenge`, if given, receives a 401's `Bearer` challenge.
    async fn request_capped(
        &self,
        ask: Ask<'_>,
        challenge: Option<&std::sync::Mutex<Option<String>>>,
    ) -> Result<(reqwest::header::HeaderMap, Bytes), OciDistributionError> {
        let Ask {
            method,
            url,
            accept,
            max,
            token,
            auth,
        } = ask;
        let mut req = self
            .inner
            .http
            .request(method, url.clone())
            .header(reqwest::header::ACCEPT, accept);
        req = match (token, auth) {
            (Some(t), _) => req.bearer_auth(t),
            (None, RegistryAuth::Basic(u, p)) => req.basic_auth(u, Some(p)),
            (None, _) => req,
        };
        let mut resp = req.send().await?;
        let status = resp.status();
        // Enough of an error body to say what it was.
        let cap = if status.is_success() { max } else { 64 << 10 };
        let too_large = || {
            OciDistributionError::SpecViolationError(format!(
                "{} is larger than {} MiB",
                url.path(),
                max >> 20
            ))
        };
        if status.is_success() && resp.content_length().is_some_and(|n| n > max) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() as u64 + chunk.len() as u64 > cap {
                if status.is_success() {
                    return Err(too_large());
                }
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let u = url.as_str().to_string();
        match status.as_u16() {
            200 => Ok((resp.headers().clone(), Bytes::from(body))),
            401 => {
                let bearer = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .filter(|h| bearer_params(h).is_some());
                if let Some(c) = challenge {
                    *c.lock().unwrap() = bearer.map(str::to_string);
                }
                Err(OciDistributionError::UnauthorizedError { url: u })
            }
            s if status.is_success() => Err(OciDistributionError::SpecViolationError(format!(
                "expected HTTP 200 for {}, got {s}",
                url.path()
            ))),
            s => Err(
                match serde_json::from_slice::<oci_client::errors::OciEnvelope>(&body) {
                    Ok(envelope) if status.is_client_error() => {
                        OciDistributionError::RegistryError { envelope, url: u }
                    }
                    _ => OciDistributionError::ServerError {
                        code: s,
                        url: u,
                        message: String::from_utf8_lossy(&body).into_owned(),
                    },
                },
            ),
        }
    }

    /// A manifest or index by tag or digest, verified: by digest the bytes
    /// must hash to it; by tag they must hash to the `Docker-Content-Digest`
    /// the registry sent, if any. Tries mirrors first.
    pub async fn manifest(
        &self,
        registry: &str,
        repo: &str,
        reference: &str,
    ) -> Result<RawManifest, RegistryError> {
        self.check(registry, repo)?;
        let by_digest = name::is_sha256_digest(reference);
        let what = format!("manifest {repo}:{reference}");
        // A digest mismatch from a mirror is worth trying the next endpoint
        // (the primary) for, so the check is part of the per-endpoint step.
        let w = &what;
        let (ep, (bytes, digest)) = self
            .pull(registry, repo, w, |ep| async move {
                let (headers, bytes) = self
                    .ask_manifest(reqwest::Method::GET, &ep, reference, w)
                    .await?;
                let digest = sha256_digest(&bytes);
                // By digest the bytes must hash to it; by tag, to the
                // digest the registry says it sent, if it says one.
                let expected = if by_digest {
                    Some(reference.to_string())
                } else {
                    content_digest(&headers)
                };
                if let Some(expected) = expected
                    && digest != expected
                {
                    return Err(RegistryError::DigestMismatch {
                        registry: ep.host.clone(),
                        what: w.clone(),
                        expected,
                        actual: digest,
                    });
                }
                Ok((bytes, digest))
            })
            .await?;
        let (media_type, is_index) =
            classify_manifest(&bytes).map_err(|reason| RegistryError::Malformed {
                registry: ep.host.clone(),
                what: what.clone(),
                reason,
            })?;
        Ok(RawManifest {
            bytes,
            digest,
            media_type,
            is_index,
        })
    }

    /// `GET` (or `HEAD`) of manifest `reference` at endpoint `ep`, capped
    /// at [`MAX_METADATA_SIZE`] as it streams: a hostile registry cannot
    /// make the daemon hold more of it.
    async fn ask_manifest(
        &self,
        method: reqwest::Method,
        ep: &Endpoint,
        reference: &str,
        what: &str,
    ) -> Result<(reqwest::header::HeaderMap, Bytes), RegistryError> {
        let r = Reference::with_tag(ep.host.clone(), ep.repo.clone(), "latest".into());
        let url = reqwest::Url::parse(&format!(
            "{}/v2/{}/manifests/{reference}",
            self.base_url(&ep.host),
            ep.repo
        ))
        .map_err(|e| RegistryError::Malformed {
            registry: ep.host.clone(),
            what: what.into(),
            reason: format!("bad manifest URL: {e}"),
        })?;
        let accept = MANIFEST_ACCEPT.join(", ");
        self.ask_doc(method, &ep.host, what, &r, &url, &accept, MAX_METADATA_SIZE)
            .await
    }

    /// The digest `tag` of `registry/repo` points at, by a `HEAD` (which
    /// registries do not count as a pull: Docker Hub's rate limit counts
    /// `GET`s of manifests). `None` when the registry does not say (no
    /// sha256 `Docker-Content-Digest`): the caller reads the manifest.
    pub async fn manifest_digest(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
    ) -> Result<Option<String>, RegistryError> {
        self.check(registry, repo)?;
        let what = format!("digest of {repo}:{tag}");
        let w = &what;
        let digest = self
            .pull(registry, repo, w, |ep| async move {
                let (headers, _) = self
                    .ask_manifest(reqwest::Method::HEAD, &ep, tag, w)
                    .await?;
                Ok(content_digest(&headers))
            })
            .await;
        match digest {
            Ok((_, d)) => Ok(d),
            // A registry that answers HEAD oddly (405, another status) may
            // still serve the GET.
            Err(e @ RegistryError::Malformed { .. }) => {
                tracing::debug!(error = %e, "HEAD of a manifest failed; reading it instead");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// One request of [`RegistryClient::request_capped`].
struct Ask<'a> {
    method: reqwest::Method,
    url: &'a reqwest::Url,
    accept: &'a str,
    max: u64,
    token: Option<&'a str>,
    auth: &'a RegistryAuth,
}

/// The parameters of a `Bearer` challenge (`WWW-Authenticate: Bearer
/// realm="…",service="…",scope="…"`), keys in lower case; `None` for
/// another scheme or a header that does not parse.
fn bearer_params(header: &str) -> Option<std::collections::HashMap<String, String>> {
    let (scheme, mut rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = std::collections::HashMap::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return Some(out);
        }
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => {
                let mut v = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => v.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        c => v.push(c),
                    }
                }
                (v, &quoted[end?..])
            }
            None => {
                let e = after.find(',').unwrap_or(after.len());
                (after[..e].trim().to_string(), &after[e..])
            }
        };
        out.insert(key.trim().to_ascii_lowercase(), value);
        let tail = tail.trim_start();
        rest = match tail.strip_prefix(',') {
            Some(t) => t,
            None if tail.is_empty() => tail,
            None => return None,
        };
    }
}

/// Returns the media type and whether `bytes` is an index, from the body's
/// `mediaType` or, where that is absent (allowed for OCI), from its shape.
pub fn classify_manifest(bytes: &[u8]) -> Result<(String, bool), String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if obj.get("schemaVersion").and_then(|s| s.as_i64()) != Some(2) {
        return Err("schemaVersion is not 2 (schema 1 is not supported)".into());
    }
    let mt = obj
        .get("mediaType")
        .and_then(|m| m.as_str())
        .map(str::to_string);
    let is_index = match mt.as_deref() {
        Some("application/vnd.oci.image.index.v1+json")
        | Some("application/vnd.docker.distribution.manifest.list.v2+json") => true,
        Some("application/vnd.oci.image.manifest.v1+json")
        | Some("application/vnd.docker.distribution.manifest.v2+json") => false,
        Some(other) => return Err(format!("unsupported manifest media type {other}")),
        None if obj.contains_key("manifests") => true,
        None if obj.contains_key("layers") && obj.contains_key("config") => false,
        None => return Err("neither an image manifest nor an index".into()),
    };
    let has_parts = obj.get("layers").is_some_and(|l| l.is_array())
        && obj.get("config").is_some_and(|c| c.is_object());
    if !is_index && !has_parts {
        return Err("image manifest without config and layers".into());
    }
    if is_index && !obj.get("manifests").is_some_and(|m| m.is_array()) {
        return Err("index without manifests".into());
    }
    let media_type = mt.unwrap_or_else(|| {
        if is_index {
            "application/vnd.oci.image.index.v1+json"
        } else {
            "application/vnd.oci.image.manifest.v1+json"
        }
        .into()
    });
    Ok((media_type, is_index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bearer_challenges() {
        let p = bearer_params(
            r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        )
        .unwrap();
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "reg");
        assert_eq!(
            p["scope"], "repository:a/b:pull,push",
            "a comma inside quotes"
        );
        assert_eq!(p["error"], "insufficient_scope");
        let p = bearer_params(r#"bearer Realm="r\"q", scope=registry:catalog:*"#).unwrap();
        assert_eq!(
            (p["realm"].as_str(), p["scope"].as_str()),
            ("r\"q", "registry:catalog:*")
        );
        assert!(bearer_params(r#"Basic realm="x""#).is_none());
        assert!(bearer_params(r#"Bearer realm="unterminated"#).is_none());
        assert!(bearer_params(r#"Bearer realm="a" junk"#).is_none());
    }

    #[test]
    fn classifies_manifests() {
        assert!(
            classify_manifest(br#"{"schemaVersion":2,"manifests":[]}"#)
                .unwrap()
                .1
        );
        assert!(
            !classify_manifest(br#"{"schemaVersion":2,"config":{},"layers":[]}"#)
                .unwrap()
                .1
        );
        assert!(classify_manifest(b"not json").is_err());
        assert!(classify_manifest(br#"{"schemaVersion":1}"#).is_err());
        assert!(classify_manifest(br#"{"schemaVersion":2,"mediaType":"text/plain"}"#).is_err());
    }
}
