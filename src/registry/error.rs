//! What can go wrong talking to a registry ([`RegistryError`], one
//! variant per thing the user sees) and how oci-client's errors and
//! registries' error bodies are classified into it.

use super::*;

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
    pub(super) fn retryable(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

impl RegistryClient {
    /// [`Self::classify`] for answers to a push: a 4xx other than 401, 403
    /// and 429 (or a distribution error code about what was sent) is the
    /// registry rejecting our request, which no retry will fix.
    pub(super) fn classify_push(
        &self,
        host: &str,
        what: &str,
        e: OciDistributionError,
    ) -> RegistryError {
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

    pub(super) fn classify(
        &self,
        host: &str,
        what: &str,
        e: OciDistributionError,
    ) -> RegistryError {
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

pub(super) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    let mut msg = e.to_string();
    while let Some(next) = cur.source() {
        msg = next.to_string();
        cur = next;
    }
    msg
}
