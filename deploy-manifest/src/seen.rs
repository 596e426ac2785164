//! What a writer has seen: the newest verified manifest sequence per store, in a small
//! local file. A `manifest.json` replaced with an older signed version verifies, but its
//! sequence is below what this writer saw, so the writer refuses to build on it (agents
//! refuse it by their own record; this keeps an honest writer from re-signing old content).
//!
//! Location: `$DEPLOY_STATE_DIR`, else `$XDG_STATE_HOME/deployer`, else
//! `~/.local/state/deployer`; one file per store URL under `seen/`. Losing it only loses
//! this check (agents keep theirs).

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::model::Manifest;
use crate::sign::Applied;

#[derive(Debug, Clone)]
pub struct Seen {
    dir: PathBuf,
}

impl Seen {
    pub fn at(dir: impl Into<PathBuf>) -> Seen {
        Seen { dir: dir.into() }
    }

    /// The default location, if this process has a home or a state directory.
    pub fn default_location() -> Option<Seen> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        var("DEPLOY_STATE_DIR")
            .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("deployer")))
            .or_else(|| var("HOME").map(|h| h.join(".local/state/deployer")))
            .map(Seen::at)
    }

    /// One file per store: its URL and, for S3, the endpoint it is reached at.
    fn path(&self, url: &str) -> PathBuf {
        let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
        let digest = Sha256::digest(format!("{url}\n{endpoint}").as_bytes());
        self.dir
            .join("seen")
            .join(format!("{}.json", crate::hex(&digest[..12])))
    }

    /// The newest version this writer saw of the store at `url`.
    pub fn last(&self, url: &str) -> Option<Applied> {
        self.read(url)
    }

    fn read(&self, url: &str) -> Option<Applied> {
        let bytes = std::fs::read(self.path(url)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The newer version this writer saw, if `m` is older than it (same sequence and
    /// version is the same manifest, not older).
    pub fn check(&self, url: &str, m: &Manifest) -> Option<Applied> {
        crate::sign::check_sequence(m, self.read(url).as_ref())
            .err()
            .and_then(|_| self.read(url))
    }

    /// Record `m` if it is newer than what was seen. Failures are logged, never fatal.
    pub fn record(&self, url: &str, m: &Manifest) {
        let (Some(version), Some(sequence)) = (m.version.clone(), m.sequence) else {
            return;
        };
        if self.read(url).is_some_and(|s| s.sequence >= sequence) {
            return;
        }
        let path = self.path(url);
        let entry = Applied { version, sequence };
        let result = std::fs::create_dir_all(path.parent().expect("has a parent")).and_then(|()| {
            crate::fsutil::write_atomically(
                &path,
                &serde_json::to_vec(&entry).expect("serialises"),
                0o600,
            )
        });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "could not record the newest manifest sequence seen");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_manifest_than_seen_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Seen::at(dir.path());
        let m = |v: &str, n: u64| {
            let mut m = Manifest::empty();
            m.version = Some(v.into());
            m.sequence = Some(n);
            m
        };
        let url = "file:///store";
        assert!(
            seen.check(url, &m("manifest-a", 1)).is_none(),
            "nothing seen yet"
        );
        seen.record(url, &m("manifest-b", 5));
        assert!(
            seen.check(url, &m("manifest-b", 5)).is_none(),
            "the same one"
        );
        assert!(seen.check(url, &m("manifest-c", 6)).is_none());
        let newer = seen.check(url, &m("manifest-a", 4)).unwrap();
        assert_eq!(newer.version, "manifest-b");
        assert!(seen.check("file:///other", &m("manifest-a", 4)).is_none());
        seen.record(url, &m("manifest-a", 4));
        assert_eq!(seen.read(url).unwrap().sequence, 5, "never lowered");
    }
}
