//! Blobs: whole small ones (configs) verified against their digest,
//! streams and ranges of layers, and the guards on a body as it arrives
//! (a minimum rate; the part of a whole body a range asked for).

use super::*;

impl RegistryClient {
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
        // The whole body is part of each attempt: a cut connection mid-body
        // is retried like one that failed to start.
        let (ep, bytes) = self
            .blob_attempts(registry, repo, digest, &what, |r| async move {
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
        let (ep, res) = self
            .blob_attempts(registry, repo, digest, &what, |r| async move {
                self.inner
                    .oci
                    .pull_blob_stream_partial(&r, digest, offset, len)
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

    /// Runs `attempt` for blob `digest` on each endpoint serving
    /// `registry`/`repo` (mirrors first, [`Self::pull`]), retried
    /// ([`Self::retrying`]), with the endpoint's credentials handed to
    /// oci-client before each try. The endpoint that answered, and what
    /// `attempt` made of its answer.
    async fn blob_attempts<T, F, Fut>(
        &self,
        registry: &str,
        repo: &str,
        digest: &str,
        what: &str,
        attempt: F,
    ) -> Result<(Endpoint, T), RegistryError>
    where
        F: Fn(Reference) -> Fut,
        Fut: std::future::Future<Output = Result<T, OciDistributionError>>,
    {
        let attempt = &attempt;
        // Boxed: nested in the callers' futures, the unboxed state machine
        // overflows the compiler's layout depth.
        Box::pin(self.pull(registry, repo, what, |ep| async move {
            let r = Reference::with_digest(ep.host.clone(), ep.repo.clone(), digest.into());
            let auth = self.registry_auth(&ep.host);
            self.retrying(&ep.host, what, || async {
                self.inner
                    .oci
                    .store_auth_if_needed(r.resolve_registry(), &auth)
                    .await;
                attempt(r.clone()).await
            })
            .await
        }))
        .await
    }
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
