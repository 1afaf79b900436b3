//! Talking to registries: every network operation of apt-layer goes through
//! [`RegistryClient`], which applies the user's configuration (credentials,
//! insecure hosts, mirrors, location rewrites, blocked registries), bounds
//! every operation by the fetch timeout with a few retries for transient
//! failures, and verifies every byte it returns against its digest.
//!
//! Contract: a method either returns verified data or a [`RegistryError`]
//! whose variant says what the user should see; it never hangs longer than
//! the configured timeout (plus retry backoff inside that same budget).

pub mod list;
pub mod name;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use list::ListKind;
use sha2::{Digest as _, Sha256};

use crate::config::registries::Endpoint;
use crate::config::{AuthFile, RegistriesConf};

/// Media types we accept for manifests, most specific first.
pub const MANIFEST_ACCEPT: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Longest `<registry host>/<repository>` a registry takes (distribution
/// spec).
pub const MAX_NAME_LENGTH: usize = 255;
/// Largest manifest or config we accept (the spec's advice is 4 MiB).
pub const MAX_METADATA_SIZE: u64 = 16 << 20;

/// What went wrong talking to a registry, classified by what the user sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The repository, tag, manifest or blob does not exist (HTTP 404,
    /// `NAME_UNKNOWN`, `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`). Shown as `ENOENT`.
    #[error("{what} not found on {registry}")]
    NotFound {
        /// Registry host asked.
        registry: String,
        /// What was asked for.
        what: String,
    },
    /// The registry refused our credentials or demands some (401/403).
    /// Shown as `EACCES`.
    #[error("registry {registry} refused access to {what} ({auth_source})")]
    Denied {
        /// Registry host asked.
        registry: String,
        /// What was asked for.
        what: String,
        /// Where credentials came from, or which files were searched.
        auth_source: String,
        /// True when no credentials were sent.
        anonymous: bool,
        /// True when the registry issues bearer tokens: an anonymous 401
        /// there can also mean "no such repository" (Docker Hub does this).
        token_auth: bool,
    },
    /// The registry could not be reached, timed out or kept failing (5xx)
    /// after retries. Shown as `EIO`.
    #[error("registry {registry} unavailable for {what}: {reason}")]
    Unavailable {
        /// Registry host asked.
        registry: String,
        /// What was asked for.
        what: String,
        /// The last failure.
        reason: String,
    },
    /// Bytes that do not hash to the digest they were asked by. Nothing is
    /// kept. Shown as `EIO`.
    #[error("digest mismatch for {what} from {registry}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Registry host asked.
        registry: String,
        /// What was asked for.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A response that breaks the distribution spec (bad JSON, a tag list
    /// that never ends, a wrong status). Shown as `EIO`.
    #[error("malformed answer from {registry} for {what}: {reason}")]
    Malformed {
        /// Registry host asked.
        registry: String,
        /// What was asked for.
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// The registry answered a Range request from a non-zero offset with
    /// the whole blob. Callers that fetch many ranges (lazy layers) stream
    /// the layer once instead. Shown as `EIO`.
    #[error("registry {registry} ignored the Range request for {what}")]
    RangeIgnored {
        /// Registry host asked.
        registry: String,
        /// What was asked for.
        what: String,
    },
    /// The registry refused what we sent it (a push): an invalid repository
    /// name or tag, a manifest or blob it will not take (HTTP 4xx other than
    /// 401/403/429). Retrying the same request will not help. Shown as
    /// `EINVAL`.
    #[error("registry {registry} rejected {what}: {reason}")]
    Rejected {
        /// Registry host asked.
        registry: String,
        /// What was sent.
        what: String,
        /// The registry's reason (its error codes and messages).
        reason: String,
    },
    /// registries.conf blocks this registry or repository. Shown as `EACCES`.
    #[error("{what} on {registry} is blocked by registries.conf")]
    Blocked {
        /// Registry host asked.
        registry: String,
        /// What was asked for.
        what: String,
    },
}

impl RegistryError {
    fn retryable(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

/// A blob body arriving from the network.
pub type BlobBody = futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>;

/// The names of a list the registry sent that are valid as path names
/// here: one invalid name (`a/b`, empty, too long) would make the kernel
/// fail the whole directory listing (`EIO`), so it is left out and named
/// in the log instead.
fn valid_names(names: Vec<String>, what: &str, valid: impl Fn(&str) -> bool) -> Vec<String> {
    let (ok, bad): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| valid(n));
    if let Some(first) = bad.first() {
        tracing::warn!(list = what, left_out = bad.len(), first = %first.escape_debug(), "the registry listed invalid names; they are not shown");
    }
    ok
}

/// A manifest or index exactly as served, with its verified digest.
#[derive(Debug, Clone)]
pub struct RawManifest {
    /// The bytes as served (hash these, never re-serialised JSON).
    pub bytes: Bytes,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// `mediaType` from the body, or inferred from its shape.
    pub media_type: String,
    /// True for an image index / manifest list.
    pub is_index: bool,
}

/// The registry client shared by the whole daemon (cheap to clone).
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    oci: Client,
    conf: RegistriesConf,
    auth: AuthFile,
    timeout: Duration,
    http: reqwest::Client,
    /// host → whether `GET /v2/` challenges with `Bearer`.
    token_auth: std::sync::Mutex<std::collections::HashMap<String, bool>>,
    /// (host, repository) → the pull token of our own `GET`s (`None`:
    /// Basic or anonymous), and when it was fetched.
    tokens: std::sync::Mutex<std::collections::HashMap<(String, String), Token>>,
}

/// A pull token and when it was fetched.
type Token = (Option<String>, Instant);

/// How long a pull token is reused. Registries issue them for minutes
/// (Docker Hub: 300 s); one refused anyway is fetched again once.
const TOKEN_REUSE: Duration = Duration::from_secs(60);

/// The host that serves `host`'s registry API: Docker Hub's images are
/// named `docker.io/…` but served by `index.docker.io` (as oci-client
/// resolves it for its own requests).
fn api_host(host: &str) -> String {
    Reference::with_tag(host.into(), "x".into(), "x".into())
        .resolve_registry()
        .to_string()
}

/// Whether `host` (`name` or `name:port`) resolves to an address, asked
/// within a few seconds.
async fn resolves(host: &str) -> bool {
    let with_port = match host.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => host.to_string(),
        _ => format!("{host}:443"),
    };
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(with_port)).await {
        Ok(Ok(mut addrs)) => addrs.next().is_some(),
        _ => false,
    }
}

/// The sha256 `Docker-Content-Digest` an answer names, if any.
fn content_digest(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get("Docker-Content-Digest")
        .and_then(|h| h.to_str().ok())
        .filter(|d| name::is_sha256_digest(d))
        .map(str::to_string)
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

impl RegistryClient {
    /// Builds a client; `timeout` bounds each operation.
    pub fn new(conf: RegistriesConf, auth: AuthFile, timeout: Duration) -> Result<Self, String> {
        let insecure = conf.insecure_hosts();
        let cfg = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            read_timeout: Some(timeout),
            connect_timeout: Some(timeout.min(Duration::from_secs(10))),
            user_agent: concat!("apt-layer/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        };
        let oci = Client::try_from(cfg).map_err(|e| format!("registry client: {e}"))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("apt-layer/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                oci,
                conf,
                auth,
                timeout,
                http,
                token_auth: Default::default(),
                tokens: Default::default(),
            }),
        })
    }

    /// The configuration in force.
    pub fn conf(&self) -> &RegistriesConf {
        &self.inner.conf
    }

    /// The credentials in force.
    pub fn auth(&self) -> &AuthFile {
        &self.inner.auth
    }

    /// The per-operation timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn registry_auth(&self, host: &str) -> RegistryAuth {
        match self.inner.auth.get(host) {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// `scheme://host`: plain HTTP for the insecure registries.
    fn base_url(&self, host: &str) -> String {
        let scheme = if self.inner.conf.is_insecure_host(host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", api_host(host))
    }

    /// Checks that `host` answers the distribution API at all (`GET /v2/`).
    /// Used before showing a registry nobody configured.
    pub async fn ping(&self, host: &str) -> Result<(), RegistryError> {
        let url = format!("{}/v2/", self.base_url(host));
        let r = tokio::time::timeout(self.inner.timeout, self.inner.http.get(&url).send()).await;
        match r {
            Ok(Ok(resp)) if resp.status().is_success() || resp.status().as_u16() == 401 => Ok(()),
            Ok(Ok(resp)) => Err(RegistryError::NotFound {
                registry: host.into(),
                what: format!("registry API (GET /v2/ answered {})", resp.status()),
            }),
            // A host that exists but does not answer is a registry that is
            // down (EIO); only a name that does not resolve is unknown.
            Ok(Err(e)) if e.is_connect() && resolves(&api_host(host)).await => {
                Err(RegistryError::Unavailable {
                    registry: host.into(),
                    what: "GET /v2/".into(),
                    reason: format!("cannot connect: {}", root_cause(&e)),
                })
            }
            Ok(Err(e)) => Err(RegistryError::NotFound {
                registry: host.into(),
                what: format!("registry ({e})"),
            }),
            Err(_) => Err(RegistryError::Unavailable {
                registry: host.into(),
                what: "GET /v2/".into(),
                reason: "timed out".into(),
            }),
        }
    }

    /// Whether `host` challenges with `Bearer` (cached; false when unsure).
    async fn is_token_auth(&self, host: &str) -> bool {
        if let Some(&b) = self.inner.token_auth.lock().unwrap().get(host) {
            return b;
        }
        let url = format!("{}/v2/", self.base_url(host));
        let bearer = match tokio::time::timeout(
            self.inner.timeout,
            self.inner.http.get(&url).send(),
        )
        .await
        {
            Ok(Ok(resp)) => resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|h| h.to_str().ok())
                .is_some_and(|h| h.trim_start().to_ascii_lowercase().starts_with("bearer")),
            _ => return false,
        };
        self.inner
            .token_auth
            .lock()
            .unwrap()
            .insert(host.to_string(), bearer);
        bearer
    }

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
    /// from oci-client's challenge flow (reused for [`TOKEN_REUSE`],
    /// fetched again once if refused), else Basic credentials from the auth
    /// file.
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
        for fresh in [false, true] {
            let token = self.pull_token(host, what, reference, &auth, fresh).await?;
            let got = self
                .retrying(host, what, || {
                    self.request_capped(method.clone(), url, accept, max, token.as_deref(), &auth)
                })
                .await;
            match got {
                Err(RegistryError::Denied { .. }) if token.is_some() && !fresh => {}
                r => return r,
            }
        }
        unreachable!("the second round returns")
    }

    /// The bearer token for pulling `reference`'s repository (`None` where
    /// the registry takes Basic credentials or none), reused while younger
    /// than [`TOKEN_REUSE`] unless `fresh`.
    async fn pull_token(
        &self,
        host: &str,
        what: &str,
        reference: &Reference,
        auth: &RegistryAuth,
        fresh: bool,
    ) -> Result<Option<String>, RegistryError> {
        let key = (host.to_string(), reference.repository().to_string());
        if !fresh
            && let Some((token, at)) = self.inner.tokens.lock().unwrap().get(&key)
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
        let mut tokens = self.inner.tokens.lock().unwrap();
        // One entry per repository read lately: a walk of many
        // repositories leaves no trail of stale tokens.
        if tokens.len() >= 1024 {
            tokens.retain(|_, (_, at)| at.elapsed() < TOKEN_REUSE);
        }
        tokens.insert(key, (token.clone(), Instant::now()));
        Ok(token)
    }

    /// One request (`GET`, `HEAD`) for a small document: its headers and
    /// its body, read up to `max` bytes (an error beyond). Failures are
    /// classified as oci-client's own (so [`Self::retrying`] treats them
    /// alike).
    async fn request_capped(
        &self,
        method: reqwest::Method,
        url: &reqwest::Url,
        accept: &str,
        max: u64,
        token: Option<&str>,
        auth: &RegistryAuth,
    ) -> Result<(reqwest::header::HeaderMap, Bytes), OciDistributionError> {
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
            401 => Err(OciDistributionError::UnauthorizedError { url: u }),
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

    /// A whole small blob (a config), verified against `digest`, at most
    /// `max` bytes. Tries mirrors first.
    pub async fn blob(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
        max: u64,
    ) -> Result<Bytes, RegistryError> {
        self.check(registry, repo)?;
        let what = format!("blob {digest} of {repo}");
        let w = &what;
        let (ep, bytes) = self
            .pull(registry, repo, w, |ep| async move {
                let r = Reference::with_digest(ep.host.clone(), ep.repo.clone(), digest.into());
                let auth = self.registry_auth(&ep.host);
                // The whole body is part of each attempt: a cut connection
                // mid-body is retried like one that failed to start.
                self.retrying(&ep.host, w, || async {
                    self.inner
                        .oci
                        .store_auth_if_needed(r.resolve_registry(), &auth)
                        .await;
                    let mut s = self.inner.oci.pull_blob_stream(&r, digest).await?;
                    let mut buf = Vec::new();
                    while let Some(chunk) = s.next().await {
                        let chunk = chunk?;
                        if buf.len() as u64 + chunk.len() as u64 > max {
                            return Err(OciDistributionError::SpecViolationError(format!(
                                "blob larger than {max} bytes"
                            )));
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    Ok(Bytes::from(buf))
                })
                .await
            })
            .await?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                registry: ep.host,
                what,
                expected: digest.into(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// A streaming body of blob `digest` (a layer). The caller verifies the
    /// digest as it consumes the stream (the blob is never held whole).
    /// Mirrors are tried first; connection set-up is retried.
    pub async fn blob_stream(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
    ) -> Result<BlobBody, RegistryError> {
        // "Range: bytes=0-": the registry answers 206 and oci-client does
        // not hash the stream a second time.
        self.blob_from(registry, repo, digest, 0, None, true).await
    }

    /// Bytes `offset..offset+len` of blob `digest`, by a Range request. The
    /// caller verifies them against an index pinned by the blob's digest.
    /// A registry that ignores Range sends the whole blob: from offset 0
    /// that is still a correct stream (logged); from elsewhere it is
    /// [`RegistryError::RangeIgnored`], so lazy readers can choose to stream
    /// the layer once instead of downloading it for every file.
    pub async fn blob_range(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<BlobBody, RegistryError> {
        self.blob_from(registry, repo, digest, offset, Some(len), false)
            .await
    }

    /// [`Self::blob_range`], but from a registry that ignores Range the
    /// whole blob is read and skipped to the range (logged): for a one-off
    /// read such as refetching one evicted file.
    pub async fn blob_range_or_skip(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<BlobBody, RegistryError> {
        self.blob_from(registry, repo, digest, offset, Some(len), true)
            .await
    }

    /// Blob `digest` from `offset` (to the end, or `len` bytes); `skip`:
    /// whether a whole-blob answer to a Range from `offset > 0` is skipped
    /// to the range rather than refused.
    async fn blob_from(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
        offset: u64,
        len: Option<u64>,
        skip: bool,
    ) -> Result<BlobBody, RegistryError> {
        self.check(registry, repo)?;
        let what = match len {
            Some(len) => format!("range {offset}+{len} of blob {digest} of {repo}"),
            None => format!("blob {digest} of {repo}"),
        };
        let w = &what;
        let (ep, res) = self
            .pull(registry, repo, w, |ep| async move {
                let r = Reference::with_digest(ep.host.clone(), ep.repo.clone(), digest.into());
                let auth = self.registry_auth(&ep.host);
                self.retrying(&ep.host, w, || async {
                    self.inner
                        .oci
                        .store_auth_if_needed(r.resolve_registry(), &auth)
                        .await;
                    self.inner
                        .oci
                        .pull_blob_stream_partial(&r, digest, offset, len)
                        .await
                })
                .await
            })
            .await?;
        let window = self.timeout();
        match res {
            oci_client::client::BlobResponse::Partial(s) => Ok(min_rate(s.stream, window)),
            oci_client::client::BlobResponse::Full(_) if offset > 0 && !skip => {
                Err(RegistryError::RangeIgnored {
                    registry: ep.host,
                    what,
                })
            }
            oci_client::client::BlobResponse::Full(s) => {
                if len.is_some() || offset > 0 {
                    tracing::warn!(registry = %ep.host, digest, offset, "registry ignored a Range request; reading the whole blob and skipping to the range");
                }
                Ok(skip_take(min_rate(s.stream, window), offset, len))
            }
        }
    }

    /// Runs `step` on each pull endpoint of `registry/repo` (mirrors first,
    /// the primary last) until one succeeds; the endpoint that answered and
    /// its value, or the last endpoint's error.
    async fn pull<T, Fut>(
        &self,
        registry: &str,
        repo: &str,
        what: &str,
        mut step: impl FnMut(Endpoint) -> Fut,
    ) -> Result<(Endpoint, T), RegistryError>
    where
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let endpoints = self.inner.conf.pull_endpoints(registry, repo);
        let several = endpoints.len() > 1;
        let mut last_err = None;
        for ep in endpoints {
            match step(ep.clone()).await {
                Ok(v) => return Ok((ep, v)),
                Err(e) => {
                    if several {
                        tracing::debug!(endpoint = %ep.host, %what, error = %e, "read failed on endpoint");
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.expect("at least the primary endpoint"))
    }

    // ----- pushing (outbox, `apt-layer export`) ---------------------------

    /// The primary endpoint of `registry/repo` as a push target: blocked
    /// registries refuse, location rewrites apply, mirrors never take pushes.
    /// The credentials of the auth file are stored in the client so that
    /// every push request authenticates (Basic, or a Bearer token with the
    /// `pull,push` scope, which oci-client asks for on push requests).
    async fn push_target(
        &self,
        registry: &str,
        repo: &str,
    ) -> Result<(Endpoint, Reference), RegistryError> {
        let ep = self.check(registry, repo)?;
        // The distribution spec's limit on `<host>/<name>`; registries
        // answer a longer name with an error that says nothing (distribution
        // 2.8: 500 UNKNOWN), so say it here.
        let full = ep.host.len() + 1 + ep.repo.len();
        if full > MAX_NAME_LENGTH {
            return Err(RegistryError::Rejected {
                registry: ep.host.clone(),
                what: format!("repository {}", ep.repo),
                reason: format!(
                    "the name is {full} characters with the registry host; registries take at most {MAX_NAME_LENGTH}"
                ),
            });
        }
        let reference = Reference::with_tag(ep.host.clone(), ep.repo.clone(), "latest".into());
        let auth = self.registry_auth(&ep.host);
        self.inner
            .oci
            .store_auth_if_needed(reference.resolve_registry(), &auth)
            .await;
        Ok((ep, reference))
    }

    /// Whether `registry/repo` already has blob `digest` (`HEAD`).
    pub async fn blob_exists(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
    ) -> Result<bool, RegistryError> {
        let (ep, r) = self.push_target(registry, repo).await?;
        let what = format!("HEAD blob {digest} of {}", ep.repo);
        self.retrying_as(&ep.host, &what, true, || {
            self.inner.oci.blob_exists(&r, digest)
        })
        .await
    }

    /// Asks the registry to mount blob `digest` from `from_repo` into
    /// `repo` (cross-repository mount). `Ok(false)` when it did not (the
    /// registry does not have it there, or answered with an upload session
    /// instead): the caller uploads then.
    pub async fn mount_blob(
        &self,
        registry: &str,
        repo: &str,
        from_repo: &str,
        digest: &str,
    ) -> Result<bool, RegistryError> {
        let (ep, r) = self.push_target(registry, repo).await?;
        let from = self.inner.conf.primary(registry, from_repo);
        let source = Reference::with_tag(ep.host.clone(), from.repo, "latest".into());
        let what = format!("mount of blob {digest} into {}", ep.repo);
        let res = self
            .retrying_as(&ep.host, &what, true, || {
                self.inner.oci.mount_blob(&r, &source, digest)
            })
            .await;
        match res {
            Ok(()) => Ok(true),
            Err(RegistryError::Unavailable { .. } | RegistryError::Denied { .. }) => {
                // Fall back to uploading; a real outage shows up there.
                Ok(false)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cross-repository mount refused");
                Ok(false)
            }
        }
    }

    /// Uploads a small blob (a config) held in memory.
    pub async fn push_blob_bytes(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
        data: Bytes,
    ) -> Result<(), RegistryError> {
        let (ep, r) = self.push_target(registry, repo).await?;
        let what = format!("upload of blob {digest} to {}", ep.repo);
        self.retrying_as(&ep.host, &what, true, || {
            self.inner.oci.push_blob(&r, data.clone(), digest)
        })
        .await
        .map(|_| ())
    }

    /// Uploads the blob in file `path` (`size` bytes, digest `digest`),
    /// streaming it in chunks of at most 4 MiB: it is never whole in memory.
    /// `sent` counts the bytes handed to the connection (progress). There is
    /// no overall time limit (layers can be large), but an upload that makes
    /// no progress for the operation timeout fails as `Unavailable`.
    pub async fn push_blob_file(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
        path: &std::path::Path,
        size: u64,
        sent: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<(), RegistryError> {
        use std::sync::atomic::Ordering::Relaxed;
        let (ep, r) = self.push_target(registry, repo).await?;
        let what = format!("upload of blob {digest} to {}", ep.repo);
        let mut attempt = 0;
        loop {
            attempt += 1;
            sent.store(0, Relaxed);
            let file =
                tokio::fs::File::open(path)
                    .await
                    .map_err(|e| RegistryError::Unavailable {
                        registry: ep.host.clone(),
                        what: what.clone(),
                        reason: format!("cannot read {}: {e}", path.display()),
                    })?;
            let counter = sent.clone();
            let stream = futures_util::stream::unfold(file, move |mut f| {
                let counter = counter.clone();
                async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 4 << 20];
                    let mut got = 0;
                    while got < buf.len() {
                        match f.read(&mut buf[got..]).await {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) => return Some((Err(OciDistributionError::IoError(e)), f)),
                        }
                    }
                    if got == 0 {
                        return None;
                    }
                    buf.truncate(got);
                    counter.fetch_add(got as u64, Relaxed);
                    Some((Ok(Bytes::from(buf)), f))
                }
            });
            let upload = self
                .inner
                .oci
                .push_blob_stream(&r, stream, digest, Some(size));
            let stall = self.inner.timeout;
            let watchdog = async {
                let mut last = (sent.load(Relaxed), Instant::now());
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let now = sent.load(Relaxed);
                    if now != last.0 {
                        last = (now, Instant::now());
                    } else if last.1.elapsed() > stall {
                        return;
                    }
                }
            };
            let err = tokio::select! {
                r = upload => match r {
                    Ok(_) => return Ok(()),
                    Err(e) => self.classify_push(&ep.host, &what, e),
                },
                () = watchdog => RegistryError::Unavailable {
                    registry: ep.host.clone(),
                    what: what.clone(),
                    reason: format!("no progress for {stall:?}"),
                },
            };
            if !err.retryable() || attempt >= 2 {
                return Err(err);
            }
            tracing::debug!(registry = %ep.host, error = %err, "retrying upload");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Puts manifest `bytes` (media type `media_type`) as `repo:tag`, then
    /// reads it back by digest from the registry: `Ok` means the registry
    /// has it. Returns the manifest digest.
    pub async fn push_manifest(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<String, RegistryError> {
        let (ep, _) = self.push_target(registry, repo).await?;
        let tagged = Reference::with_tag(ep.host.clone(), ep.repo.clone(), tag.into());
        let digest = sha256_digest(&bytes);
        let what = format!("manifest {}:{tag}", ep.repo);
        let content_type = reqwest::header::HeaderValue::from_str(media_type).map_err(|e| {
            RegistryError::Malformed {
                registry: ep.host.clone(),
                what: what.clone(),
                reason: e.to_string(),
            }
        })?;
        self.retrying_as(&ep.host, &what, true, || {
            self.inner
                .oci
                .push_manifest_raw(&tagged, bytes.clone(), content_type.clone())
        })
        .await?;
        let pinned = Reference::with_digest(ep.host.clone(), ep.repo.clone(), digest.clone());
        let auth = self.registry_auth(&ep.host);
        let check = format!("manifest {}@{digest}", ep.repo);
        let accept = [media_type];
        let (back, _) = self
            .retrying(&ep.host, &check, || {
                self.inner.oci.pull_manifest_raw(&pinned, &auth, &accept)
            })
            .await?;
        let actual = sha256_digest(&back);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                registry: ep.host,
                what: check,
                expected: digest,
                actual,
            });
        }
        Ok(digest)
    }

    /// Applies `blocked` and returns the primary endpoint.
    fn check(&self, registry: &str, repo: &str) -> Result<Endpoint, RegistryError> {
        if self.inner.conf.is_blocked(registry, repo) {
            return Err(RegistryError::Blocked {
                registry: registry.into(),
                what: repo.into(),
            });
        }
        Ok(self.inner.conf.primary(registry, repo))
    }

    /// Runs `op` with the overall timeout, retrying transient failures with
    /// backoff while time remains.
    async fn retrying<T, F, Fut>(&self, host: &str, what: &str, op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        self.retrying_as(host, what, false, op).await
    }

    /// [`Self::retrying`]; `push` classifies failures as answers to a push
    /// (a 4xx is the registry rejecting what we sent).
    async fn retrying_as<T, F, Fut>(
        &self,
        host: &str,
        what: &str,
        push: bool,
        mut op: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match tokio::time::timeout(left, op()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if push => self.classify_push(host, what, e),
                Ok(Err(e)) => self.classify(host, what, e),
                Err(_) => RegistryError::Unavailable {
                    registry: host.into(),
                    what: what.into(),
                    reason: format!("no answer within {:?}", self.inner.timeout),
                },
            };
            let err = match err {
                RegistryError::Denied {
                    registry,
                    what,
                    auth_source,
                    anonymous: true,
                    ..
                } => {
                    let token_auth = self.is_token_auth(&registry).await;
                    RegistryError::Denied {
                        registry,
                        what,
                        auth_source,
                        anonymous: true,
                        token_auth,
                    }
                }
                e => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if !err.retryable() || attempt >= 3 || left <= backoff {
                return Err(err);
            }
            tracing::debug!(registry = host, what, attempt, error = %err, "retrying");
            tokio::time::sleep(backoff).await;
            backoff *= 3;
        }
    }

    /// [`Self::classify`] for answers to a push: a 4xx other than 401, 403
    /// and 429 (or a distribution error code about what was sent) is the
    /// registry rejecting our request, which no retry will fix.
    fn classify_push(&self, host: &str, what: &str, e: OciDistributionError) -> RegistryError {
        let rejected = |reason: String| RegistryError::Rejected {
            registry: host.to_string(),
            what: what.to_string(),
            reason,
        };
        match &e {
            OciDistributionError::ServerError { code, message, .. }
                if (400..500).contains(code) && !matches!(code, 401 | 403 | 429) =>
            {
                rejected(format!("HTTP {code}: {}", error_envelope_summary(message)))
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|c| {
                    matches!(
                        c.code,
                        OciErrorCode::NameInvalid
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::TagInvalid
                            | OciErrorCode::ManifestInvalid
                            | OciErrorCode::ManifestBlobUnknown
                            | OciErrorCode::DigestInvalid
                            | OciErrorCode::SizeInvalid
                            | OciErrorCode::BlobUploadInvalid
                            | OciErrorCode::Unsupported
                    )
                }) =>
            {
                rejected(envelope.to_string())
            }
            OciDistributionError::RequestError(re)
                if re.status().is_some_and(|s| matches!(s.as_u16(), 401 | 403)) =>
            {
                // A HEAD answer (no body): the same refusal as a 401 with one.
                RegistryError::Denied {
                    registry: host.to_string(),
                    what: what.to_string(),
                    auth_source: self.inner.auth.source(host),
                    anonymous: self.inner.auth.get(host).is_none(),
                    token_auth: false,
                }
            }
            OciDistributionError::RequestError(re)
                if re.status().is_some_and(|s| {
                    s.is_client_error() && !matches!(s.as_u16(), 401 | 403 | 429)
                }) =>
            {
                rejected(format!("HTTP {}", re.status().expect("checked")))
            }
            _ => self.classify(host, what, e),
        }
    }

    fn classify(&self, host: &str, what: &str, e: OciDistributionError) -> RegistryError {
        let registry = host.to_string();
        let what = what.to_string();
        let denied = |registry: String, what: String| RegistryError::Denied {
            auth_source: self.inner.auth.source(&registry),
            anonymous: self.inner.auth.get(&registry).is_none(),
            token_auth: false,
            registry,
            what,
        };
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => denied(registry, what),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    denied(registry, what)
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::NameUnknown
                            | OciErrorCode::ManifestUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NameInvalid
                            | OciErrorCode::TagInvalid
                    )
                }) {
                    RegistryError::NotFound { registry, what }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Toomanyrequests))
                {
                    RegistryError::Unavailable {
                        registry,
                        what,
                        reason: envelope.to_string(),
                    }
                } else {
                    RegistryError::Malformed {
                        registry,
                        what,
                        reason: envelope.to_string(),
                    }
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 | 403 => denied(registry, what),
                404 => RegistryError::NotFound { registry, what },
                429 | 500..=599 => RegistryError::Unavailable {
                    registry,
                    what,
                    reason: format!("HTTP {code}"),
                },
                _ => RegistryError::Malformed {
                    registry,
                    what,
                    reason: format!(
                        "HTTP {code}: {}",
                        message.chars().take(200).collect::<String>()
                    ),
                },
            },
            OciDistributionError::ImageManifestNotFoundError(_) => {
                RegistryError::NotFound { registry, what }
            }
            OciDistributionError::RequestError(e) => {
                let reason = if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    format!("cannot connect: {}", root_cause(&e))
                } else {
                    root_cause(&e)
                };
                RegistryError::Unavailable {
                    registry,
                    what,
                    reason,
                }
            }
            OciDistributionError::IoError(e) => RegistryError::Unavailable {
                registry,
                what,
                reason: e.to_string(),
            },
            OciDistributionError::DigestError(e) => RegistryError::DigestMismatch {
                registry,
                what,
                expected: String::new(),
                actual: e.to_string(),
            },
            other => RegistryError::Malformed {
                registry,
                what,
                reason: other.to_string(),
            },
        }
    }
}

/// The codes and messages of a distribution error body
/// (`{"errors":[{"code":…,"message":…}]}`), or the body's start.
fn error_envelope_summary(body: &str) -> String {
    let parsed: Option<Vec<String>> = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("errors")?.as_array().map(|errs| {
                errs.iter()
                    .map(|e| {
                        let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("?");
                        let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
                        format!("{code}: {msg}")
                    })
                    .collect()
            })
        });
    match parsed {
        Some(v) if !v.is_empty() => v.join("; "),
        _ => body.trim().chars().take(200).collect(),
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    let mut msg = e.to_string();
    while let Some(next) = cur.source() {
        msg = next.to_string();
        cur = next;
    }
    msg
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

/// The slowest a blob may arrive, in bytes per second of waiting for it.
/// A 64 kbit/s link is 8 KB/s; this only catches a registry that drips.
pub const MIN_RATE: u64 = 1024;

/// `body`, failing (`TimedOut`, which the caller reports as `EIO`) once it
/// has been waited on for `window` and brought less than [`MIN_RATE`] per
/// second of that. The read timeout catches a registry that stops; this
/// one catches a registry that sends a byte now and then (each byte resets
/// a read timeout, so a reader would wait forever). Only time spent waiting
/// for the registry counts, not time the reader took between reads.
fn min_rate(body: BlobBody, window: Duration) -> BlobBody {
    Box::pin(MinRate {
        inner: body,
        window,
        waiting_since: None,
        waited: Duration::ZERO,
        bytes: 0,
    })
}

struct MinRate {
    inner: BlobBody,
    window: Duration,
    waiting_since: Option<Instant>,
    waited: Duration,
    bytes: u64,
}

impl futures_util::Stream for MinRate {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        let since = *this.waiting_since.get_or_insert_with(Instant::now);
        let item = std::task::ready!(this.inner.poll_next_unpin(cx));
        this.waiting_since = None;
        this.waited += since.elapsed();
        if let Some(Ok(b)) = &item {
            this.bytes += b.len() as u64;
        }
        if this.waited >= this.window {
            let rate = this.bytes as f64 / this.waited.as_secs_f64();
            if item.is_some() && rate < MIN_RATE as f64 {
                return std::task::Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the registry sent {} bytes in {:.1}s of waiting (less than {MIN_RATE} bytes/s)",
                        this.bytes,
                        this.waited.as_secs_f64()
                    ),
                ))));
            }
            this.waited = Duration::ZERO;
            this.bytes = 0;
        }
        std::task::Poll::Ready(item)
    }
}

/// The bytes `offset..offset+len` (or to the end) of a whole-blob body, for
/// a registry that answered a Range request with the whole blob.
fn skip_take(body: BlobBody, offset: u64, len: Option<u64>) -> BlobBody {
    use futures_util::StreamExt;
    if offset == 0 && len.is_none() {
        return body;
    }
    let end = len.map_or(u64::MAX, |l| offset.saturating_add(l));
    body.scan(0u64, move |pos, chunk| {
        let out = match chunk {
            Err(e) => Some(Err(e)),
            Ok(_) if *pos >= end => None,
            Ok(b) => {
                let (from, to) = (*pos, *pos + b.len() as u64);
                *pos = to;
                let lo = offset.clamp(from, to) - from;
                let hi = end.clamp(from, to) - from;
                Some(Ok(b.slice(lo as usize..hi as usize)))
            }
        };
        futures_util::future::ready(out)
    })
    .filter(|c| futures_util::future::ready(!matches!(c, Ok(b) if b.is_empty())))
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_is_asked_at_its_api_host() {
        assert_eq!(api_host("docker.io"), "index.docker.io");
        assert_eq!(api_host("ghcr.io"), "ghcr.io");
        assert_eq!(api_host("127.0.0.1:5000"), "127.0.0.1:5000");
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

    /// `n` chunks of `size` bytes, each `every` after the previous one.
    fn drip(n: usize, size: usize, every: Duration) -> BlobBody {
        Box::pin(futures_util::stream::unfold(0, move |i| async move {
            if i == n {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(Bytes::from(vec![0u8; size])), i + 1))
        }))
    }

    async fn drain(mut body: BlobBody, pause: Duration) -> Result<u64, std::io::Error> {
        let mut n = 0;
        while let Some(c) = body.next().await {
            n += c?.len() as u64;
            tokio::time::sleep(pause).await;
        }
        Ok(n)
    }

    #[tokio::test]
    async fn a_registry_that_drips_fails_and_a_slow_reader_does_not() {
        let window = Duration::from_millis(300);
        let ms = Duration::from_millis;
        // A byte every 120 ms: 3 bytes in the window, far below the rate.
        let e = drain(min_rate(drip(10, 1, ms(120)), window), ms(0)).await;
        assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        // 4 KiB every 120 ms: well above it.
        let ok = drain(min_rate(drip(6, 4096, ms(120)), window), ms(0)).await;
        assert_eq!(ok.unwrap(), 6 * 4096);
        // Bytes ready at once, a reader pausing 400 ms between reads: the
        // reader's time does not count against the registry.
        let ok = drain(min_rate(drip(3, 1, ms(0)), window), ms(400)).await;
        assert_eq!(ok.unwrap(), 3);
    }
}
