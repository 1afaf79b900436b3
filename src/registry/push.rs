//! Pushing (outbox, `apt-layer export`): the push target, blobs by
//! existence check, cross-repository mount or upload, and manifests.

use super::*;

impl RegistryClient {
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
}
