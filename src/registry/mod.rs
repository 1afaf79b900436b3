//! Talking to registries: every network operation of apt-layer goes through
//! [`RegistryClient`], which applies the user's configuration (credentials,
//! insecure hosts, mirrors, location rewrites, blocked registries), bounds
//! every operation by the fetch timeout with a few retries for transient
//! failures, and verifies every byte it returns against its digest.
//!
//! Contract: a method either returns verified data or a [`RegistryError`]
//! whose variant says what the user should see; it never hangs longer than
//! the configured timeout (plus retry backoff inside that same budget).
//!
//! Here: the client, its endpoints and the retry loop every operation runs
//! in. Beside it, one job each: `error` (what the user sees, and how
//! oci-client's errors map to it), `doc` (tag lists, the catalog, manifests
//! and the pull tokens of our own requests), [`list`] (pages of a list),
//! `blob` (configs, layer streams and ranges), `push` (outbox, `export`)
//! and [`name`] (what names are valid).

mod blob;
mod doc;
mod error;
pub mod list;
pub mod name;
mod push;

pub use doc::classify_manifest;
pub use error::RegistryError;
use error::root_cause;

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
}
