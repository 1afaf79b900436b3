//! What users see of a push, and how it survives a restart.
//!
//! Every tag directory of the outbox has one [`TagState`]: it is the JSON of
//! the read-only `<tag>.status` file next to the tag directory, and it is
//! persisted as `<cache_dir>/outbox/state/tag-<key>.json` so that `apt-layer
//! outbox status` can read it without the daemon and a restarted daemon knows
//! which staged trees still have to be pushed.
//!
//! Durability: a state file is replaced atomically (written to a temporary
//! name, then renamed); phase changes are also synced to disk. Progress
//! counters are written at most a few times a second while a push runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Where a tag is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Staged changes wait for the tree to settle (no writer, no change for
    /// the settle time).
    Pending,
    /// The layer is being written (tar+gzip to a temporary file).
    Building,
    /// Blobs and the manifest are being sent.
    Pushing,
    /// The registry has the manifest of the staged tree as it is now.
    Pushed,
    /// The last attempt failed; another follows at `next_retry` (none when
    /// the registry refused the push: then after the next change).
    Failed,
}

impl Phase {
    /// The word shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Building => "building",
            Phase::Pushing => "pushing",
            Phase::Pushed => "pushed",
            Phase::Failed => "failed",
        }
    }
}

/// Progress of the running step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// `layer` (reading the tree), `upload`, `config` or `manifest`.
    pub step: String,
    /// Bytes done in this step.
    pub done: u64,
    /// Bytes this step has in all (0 when unknown).
    pub total: u64,
}

/// The last successful push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    /// `sha256:` digest of the pushed manifest.
    pub manifest: String,
    /// `sha256:` digest of the layer blob (tar+gzip).
    pub layer: String,
    /// Size of the layer blob.
    pub layer_size: u64,
    /// `sha256:` of the uncompressed layer (the config's diff_id).
    pub diff_id: String,
    /// When the registry confirmed it (RFC 3339, UTC).
    pub at: String,
    /// How the layer got there: `uploaded`, `present` (the registry had
    /// it) or `mounted from <repo>`.
    pub layer_source: String,
}

/// Everything the status file shows about one tag directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagState {
    /// `<registry>/<repository>:<tag>`.
    pub reference: String,
    /// Registry host.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Tag.
    pub tag: String,
    /// The tag directory, relative to the outbox root
    /// (`<registry>/<repository>/<tag>`).
    pub path: String,
    /// Current phase.
    pub phase: Phase,
    /// Progress of the running step (building, pushing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The last successful push, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<Pushed>,
    /// Why the last attempt failed (cleared by a success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last failure writing into the staged tree (for example a full
    /// disk); cleared by the next successful push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_error: Option<String>,
    /// Failed attempts since the last success.
    #[serde(default)]
    pub attempts: u32,
    /// When the next attempt starts (RFC 3339), while failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<String>,
    /// Something users should know that is not a failure (files skipped,
    /// a push restarted because the tree changed meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Pushes that completed for this directory since it was first staged.
    #[serde(default)]
    pub pushes: u64,
    /// Last change of this state (RFC 3339).
    pub updated: String,
}

impl TagState {
    /// A new, pending state.
    pub fn new(path: &str, registry: &str, repository: &str, tag: &str) -> TagState {
        TagState {
            reference: format!("{registry}/{repository}:{tag}"),
            registry: registry.into(),
            repository: repository.into(),
            tag: tag.into(),
            path: path.into(),
            phase: Phase::Pending,
            progress: None,
            pushed: None,
            error: None,
            staging_error: None,
            attempts: 0,
            next_retry: None,
            note: None,
            pushes: 0,
            updated: rfc3339(SystemTime::now()),
        }
    }

    /// Pretty JSON with a final newline (the status file's content).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("state serialises");
        v.push(b'\n');
        v
    }

    /// One line for `apt-layer outbox status`.
    pub fn line(&self) -> String {
        let mut s = format!("{:<9} {}", self.phase.as_str(), self.reference);
        if let Some(p) = &self.progress
            && matches!(self.phase, Phase::Building | Phase::Pushing)
        {
            if p.total > 0 {
                s += &format!(
                    "  {} {}/{} ({}%)",
                    p.step,
                    p.done,
                    p.total,
                    p.done * 100 / p.total.max(1)
                );
            } else {
                s += &format!("  {} {}", p.step, p.done);
            }
        }
        if let Some(p) = &self.pushed {
            s += &format!("  {}", p.manifest);
        }
        if let Some(e) = &self.error {
            s += &format!("  error: {e}");
            if let Some(n) = &self.next_retry {
                s += &format!(" (retry at {n})");
            }
        }
        if let Some(e) = &self.staging_error {
            s += &format!("  staging error: {e}");
        }
        s
    }
}

/// The state file name of the tag directory `path` (a hash: paths may be
/// long and hold any character a tag allows).
pub fn state_key(path: &str) -> String {
    hex::encode(&Sha256::digest(path.as_bytes())[..16])
}

/// The state file of tag directory `path` in `dir`.
fn state_file(dir: &Path, path: &str) -> PathBuf {
    dir.join(format!("tag-{}.json", state_key(path)))
}

/// Writes `state` to `<dir>/tag-<key>.json` atomically; `sync` also flushes
/// it to disk (phase changes).
pub fn save(dir: &Path, state: &TagState, sync: bool) -> std::io::Result<()> {
    write_atomic(&state_file(dir, &state.path), &state.to_json(), sync)
}

/// Removes the state of tag directory `path`.
pub fn remove(dir: &Path, path: &str) {
    let _ = std::fs::remove_file(state_file(dir, path));
}

/// Every state in `dir`, sorted by reference. Unreadable files are named in
/// the second list.
pub fn load_all(dir: &Path) -> (Vec<TagState>, Vec<(PathBuf, String)>) {
    let mut states = Vec::new();
    let mut bad = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (states, bad);
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("tag-") && name.ends_with(".json")) {
            continue;
        }
        match std::fs::read(&p)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<TagState>(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => states.push(s),
            Err(e) => bad.push((p, e)),
        }
    }
    states.sort_by(|a, b| a.reference.cmp(&b.reference));
    (states, bad)
}

/// Writes `data` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8], sync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        if sync {
            f.sync_data()?;
        }
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// `t` as RFC 3339 in UTC with whole seconds (`2024-05-01T12:00:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = TagState::new("r:5000/a/b/v1", "r:5000", "a/b", "v1");
        s.error = Some("boom".into());
        save(dir.path(), &s, true).unwrap();
        let (all, bad) = load_all(dir.path());
        assert!(bad.is_empty());
        assert_eq!(all, vec![s.clone()]);
        assert!(s.line().contains("pending") && s.line().contains("error: boom"));
        remove(dir.path(), &s.path);
        assert!(load_all(dir.path()).0.is_empty());
    }
}
