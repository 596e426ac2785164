//! Manifest versions in a store: read the current one, write new ones by compare-and-swap,
//! list them, roll back.
//!
//! Layout: `manifest.json` is a copy of the newest version; `manifests/<version>.json` are
//! immutable. A write reads `manifest.json` with its ETag, applies the edit, writes the new
//! immutable version (`If-None-Match: *`), then replaces `manifest.json` only if its ETag is
//! unchanged (`If-Match`). On conflict it re-reads, re-applies the edit and tries again, so
//! concurrent writers never lose an update. A version that lost the race is deleted; one
//! left behind by a crash is never current and `list` marks it as such.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, TryStreamExt, stream};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::Error;
use crate::model::Manifest;
use crate::sign::{self, PublicKey, SecretKey};
use crate::store::{Fetched, ObjectStore, Precondition, StoreError};
use crate::validate::{check_manifest, parse_manifest};

pub const CURRENT_KEY: &str = "manifest.json";
pub const VERSIONS_PREFIX: &str = "manifests/";

/// How many times a write re-reads and retries after losing a race.
const MAX_ATTEMPTS: u32 = 100;

/// The current manifest and the ETag it was read with.
#[derive(Debug, Clone)]
pub struct Current {
    pub manifest: Manifest,
    pub etag: String,
}

/// One row of `deploy-manifest list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub version: String,
    pub created_at: Option<String>,
    pub created_by: Option<String>,
    pub summary: Option<String>,
    pub parent: Option<String>,
    pub services: usize,
    /// This is what `manifest.json` holds now.
    pub current: bool,
    /// Not an ancestor of the current version: written by a writer that crashed before it
    /// could make it current. Never applied by agents; kept for inspection.
    pub orphan: bool,
}

fn version_info(name: &str, m: &Manifest, head: Option<&str>, orphan: bool) -> VersionInfo {
    VersionInfo {
        version: name.to_owned(),
        created_at: m.created_at.clone(),
        created_by: m.created_by.clone(),
        summary: m.summary.clone(),
        parent: m.parent.clone(),
        services: m.services.len(),
        current: head == Some(name),
        orphan,
    }
}

/// Who is writing: recorded as `createdBy`.
pub fn default_author() -> String {
    if let Ok(a) = std::env::var("DEPLOY_AUTHOR")
        && !a.trim().is_empty()
    {
        return a.trim().to_owned();
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(user_from_passwd);
    format!("{user}@{}", hostname())
}

/// The name of this process's user from `/etc/passwd`, or `uid<N>`.
fn user_from_passwd() -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(uid) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return "unknown".to_owned();
    };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                (fields.nth(1)? == uid.to_string()).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// This machine's host name (`/proc/sys/kernel/hostname`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Accept `manifest-….json`, `manifests/manifest-….json` or the bare version.
pub fn normalize_version(arg: &str) -> String {
    let arg = arg.trim();
    let arg = arg.strip_prefix(VERSIONS_PREFIX).unwrap_or(arg);
    arg.strip_suffix(".json").unwrap_or(arg).to_owned()
}

/// `manifests/<version>.json`: the immutable copy of a version.
pub fn version_key(version: &str) -> String {
    format!("{VERSIONS_PREFIX}{version}.json")
}

/// `manifest-YYYYMMDDTHHMMSSZ-<8hex>`: sortable by time; the suffix keeps two versions
/// written in the same second apart.
fn new_version_name(now: SystemTime, content: &[u8]) -> String {
    format!(
        "manifest-{}-{}",
        compact_timestamp(now),
        unique_suffix(now, content)
    )
}

/// 8 hex digits that tell apart two names made at the same `now` (from the content, the
/// time to the nanosecond, the process and a counter).
pub fn unique_suffix(now: SystemTime, content: &[u8]) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = Sha256::new();
    h.update(content);
    h.update(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    crate::hex(&h.finalize()[..4])
}

/// RFC 3339, UTC, whole seconds: `2026-11-22T14:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn compact_timestamp(t: SystemTime) -> String {
    rfc3339(t).replace(['-', ':'], "")
}

/// How long a signed version stays acceptable to agents by default (`--expires`).
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(30 * 24 * 3600);

/// A manifest repository: the versions under one store URL.
pub struct Repo<S> {
    store: S,
    author: String,
    signing_key: Option<SecretKey>,
    trusted: Vec<PublicKey>,
    expires_in: Duration,
    seen: Option<crate::seen::Seen>,
}

/// What a write builds on.
#[derive(Debug, Clone)]
enum Base {
    /// The current manifest, which must verify (when keys are trusted) and, unless
    /// `allow_expired` (refresh, rollback), must not have expired.
    Current { allow_expired: bool },
    /// Recovery from a current manifest that does not verify: the new version continues
    /// the newest verified version (`parent`, `sequence`) instead.
    Recover {
        parent: Option<String>,
        sequence: u64,
    },
}

/// Why a writer will not build on the current manifest.
#[derive(Debug, Clone)]
enum Refusal {
    /// It does not verify, or it is older than a version already seen or in the store.
    Untrusted(String),
    /// Its expiry (this one) has passed.
    Expired(String),
}

/// One row of `deploy-manifest verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verified {
    pub version: String,
    pub sequence: Option<u64>,
    /// The key that signed it, if signed.
    pub key: Option<String>,
    pub current: bool,
    pub verified: bool,
    /// Why it does not verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Its expiry has passed (only said of verified versions).
    pub expired: bool,
}

impl<S: ObjectStore> Repo<S> {
    pub fn new(store: S, author: impl Into<String>) -> Self {
        Repo {
            store,
            author: author.into(),
            signing_key: None,
            trusted: Vec::new(),
            expires_in: DEFAULT_EXPIRY,
            seen: None,
        }
    }

    /// Sign every version this repo writes.
    pub fn with_signing_key(mut self, key: Option<SecretKey>) -> Self {
        self.signing_key = key;
        self
    }

    /// Verify what every write builds on against these keys. Without any, a repo with a
    /// signing key trusts that key alone; a repo with neither verifies nothing.
    pub fn with_trusted_keys(mut self, keys: Vec<PublicKey>) -> Self {
        self.trusted = keys;
        self
    }

    /// How long the versions this repo signs stay acceptable to agents.
    pub fn with_expiry(mut self, expires_in: Duration) -> Self {
        self.expires_in = expires_in;
        self
    }

    /// Remember the newest sequence this writer has seen of the store, in `seen` (a local
    /// file), and refuse a current manifest older than that (a replayed `manifest.json`).
    pub fn with_seen(mut self, seen: Option<crate::seen::Seen>) -> Self {
        self.seen = seen;
        self
    }

    /// The keys writes verify against (see [`Repo::with_trusted_keys`]).
    pub fn trusted_keys(&self) -> Vec<PublicKey> {
        match (&self.signing_key, self.trusted.is_empty()) {
            (Some(key), true) => vec![key.public()],
            _ => self.trusted.clone(),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Create the first, empty version. Returns `None` when the store already has one.
    pub async fn init(&self) -> Result<Option<Manifest>, Error> {
        if self.read_current().await?.is_some() {
            return Ok(None);
        }
        let mut manifest = Manifest::empty();
        manifest.summary = Some("init".to_owned());
        self.stamp(&mut manifest, None, 0);
        let bytes = version_bytes(&manifest)?;
        match self
            .store
            .put(CURRENT_KEY, bytes.clone(), Precondition::IfAbsent)
            .await
        {
            Ok(_) => {
                self.keep_version(&manifest, bytes).await;
                Ok(Some(manifest))
            }
            // Someone else initialised it at the same moment: theirs stands.
            Err(StoreError::PreconditionFailed { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The current manifest, or `None` if the store has never been initialised.
    pub async fn read_current(&self) -> Result<Option<Current>, Error> {
        match self.store.get(CURRENT_KEY, None).await? {
            Fetched::Found { bytes, etag } => {
                let origin = format!("{}/{CURRENT_KEY}", self.store.url());
                Ok(Some(Current {
                    manifest: parse_manifest(&bytes, &origin)?,
                    etag,
                }))
            }
            Fetched::NotFound => Ok(None),
            Fetched::NotModified => unreachable!("no If-None-Match was sent"),
        }
    }

    /// The current manifest as the base of a write. One that no longer passes validation
    /// (written before a rule existed, e.g. an `envFile` outside the service's secrets) is
    /// still read, with a warning, so that an edit can fix it: what is written is always
    /// validated in full, and with trusted keys the base must verify all the same.
    async fn current_for_write(&self) -> Result<Current, Error> {
        let (bytes, etag) = match self.store.get(CURRENT_KEY, None).await? {
            Fetched::Found { bytes, etag } => (bytes, etag),
            _ => {
                return Err(Error::NotInitialized {
                    url: self.store.url().to_owned(),
                });
            }
        };
        let origin = format!("{}/{CURRENT_KEY}", self.store.url());
        let manifest = match parse_manifest(&bytes, &origin) {
            Ok(m) => m,
            Err(invalid) => match serde_json::from_slice::<Manifest>(&bytes) {
                Ok(m) => {
                    tracing::warn!(
                        "{invalid}; building on it anyway: the new version must fix this"
                    );
                    m
                }
                Err(_) => return Err(invalid.into()),
            },
        };
        Ok(Current { manifest, etag })
    }

    /// The current manifest; an uninitialised store is an error that says what to run.
    pub async fn current(&self) -> Result<Current, Error> {
        self.read_current()
            .await?
            .ok_or_else(|| Error::NotInitialized {
                url: self.store.url().to_owned(),
            })
    }

    /// One version, by any of the names [`normalize_version`] accepts; `current` (or
    /// `manifest.json`) means the current one.
    pub async fn version(&self, name: &str) -> Result<Manifest, Error> {
        let version = normalize_version(name);
        if version == "current" || version == "manifest" {
            return Ok(self.current().await?.manifest);
        }
        if !version.starts_with("manifest-") {
            return Err(Error::UnknownVersion {
                version,
                url: self.store.url().to_owned(),
            });
        }
        let key = version_key(&version);
        match self.store.get(&key, None).await? {
            Fetched::Found { bytes, .. } => Ok(parse_manifest(
                &bytes,
                &format!("{}/{key}", self.store.url()),
            )?),
            _ => {
                // A writer that stopped between making a version current and keeping its
                // immutable copy leaves only manifest.json; the next write repairs it.
                if let Ok(Some(c)) = self.read_current().await
                    && c.manifest.version.as_deref() == Some(version.as_str())
                {
                    return Ok(c.manifest);
                }
                Err(Error::UnknownVersion {
                    version,
                    url: self.store.url().to_owned(),
                })
            }
        }
    }

    /// Apply `edit` to the current manifest and write the result as a new version, by
    /// compare-and-swap. `edit` may run several times (once per attempt) and returns the
    /// one-line summary recorded with the version; an error from it ends the update with
    /// nothing written. With trusted keys, the current manifest must verify first: a
    /// writer never signs what it has not checked.
    pub async fn update<F>(&self, edit: F) -> Result<Manifest, Error>
    where
        F: Fn(&mut Manifest) -> Result<String, Error>,
    {
        self.write_next(
            Base::Current {
                allow_expired: false,
            },
            edit,
        )
        .await
    }

    /// The current manifest, checked as a write would check its base (for a writer that
    /// acts on it before it writes, like `push` choosing its service, or `push --wait`
    /// choosing its hosts).
    pub async fn current_verified(&self) -> Result<Current, Error> {
        let current = self.current_for_write().await?;
        self.check_base(&current.manifest, false).await?;
        Ok(current)
    }

    async fn write_next<F>(&self, base: Base, edit: F) -> Result<Manifest, Error>
    where
        F: Fn(&mut Manifest) -> Result<String, Error>,
    {
        for attempt in 0..MAX_ATTEMPTS {
            let current = self.current_for_write().await?;
            let (parent, sequence) = match &base {
                Base::Current { allow_expired } => {
                    match self.check_base(&current.manifest, *allow_expired).await {
                        Err(Error::Store(StoreError::PreconditionFailed { .. })) => {
                            backoff(attempt).await;
                            continue;
                        }
                        checked => checked?,
                    }
                    self.keep_missing_copy(&current.manifest).await?;
                    (
                        current.manifest.version.clone(),
                        current.manifest.sequence.unwrap_or(0),
                    )
                }
                Base::Recover { parent, sequence } => (parent.clone(), *sequence),
            };
            let mut next = current.manifest.clone();
            next.rolled_back_from = None;
            next.rolled_back_to = None;
            let summary = edit(&mut next)?;
            next.summary = Some(summary);
            self.stamp(&mut next, parent, sequence);
            // A service whose spec becomes current again (a rollback, a setting changed
            // back) starts a fresh staged rollout: the objects of an earlier rollout of that
            // spec (a timed-out record, an abort marker) must not decide for it. No host acts
            // on that spec before the commit below makes it current.
            for s in &next.services {
                let hash = crate::rollout::spec_hash(s);
                let before = current
                    .manifest
                    .service(&s.name)
                    .map(crate::rollout::spec_hash);
                if before.as_deref() != Some(hash.as_str()) {
                    crate::rollout::forget(&self.store, &s.name, &hash).await?;
                }
            }
            match self.commit(&next, &current.etag).await {
                Ok(()) => {
                    self.remember(&next);
                    return Ok(next);
                }
                Err(Error::Store(StoreError::PreconditionFailed { .. })) => {
                    tracing::debug!(attempt, "manifest.json changed underneath; retrying");
                    backoff(attempt).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict {
            attempts: MAX_ATTEMPTS,
        })
    }

    /// With trusted keys: `m` (the current manifest) verifies; it is not older than what
    /// this writer saw before, nor than a verified version in the store (every version file
    /// was current once: `manifest.json` was replaced with an older version); and it has not
    /// expired (unless `allow_expired`). Otherwise the error names the newest version that
    /// verifies and the command that restores it. The check reads the versions whose names
    /// are not older than `m`'s (normally none), so a newer version written by a writer whose clock
    /// was behind is not looked at; the local record (`seen`) and the agents' floors remain.
    async fn check_base(&self, m: &Manifest, allow_expired: bool) -> Result<(), Error> {
        match self.refusal(m, allow_expired).await? {
            None => Ok(()),
            Some(refusal) => Err(self.refused(m, refusal).await),
        }
    }

    /// Why `m` cannot be built on, if it cannot (see [`Repo::check_base`]); `None` records
    /// it as seen. A newer version made current since `m` was read is a race, not a replay:
    /// `Err(PreconditionFailed)`, and the caller reads the head again.
    async fn refusal(&self, m: &Manifest, allow_expired: bool) -> Result<Option<Refusal>, Error> {
        let trusted = self.trusted_keys();
        if trusted.is_empty() {
            return Ok(None);
        }
        let sequence = m.sequence.unwrap_or(0);
        if let Err(e) = sign::verify(m, &trusted) {
            return Ok(Some(Refusal::Untrusted(e.to_string())));
        }
        if let Some(newer) = self
            .seen
            .as_ref()
            .and_then(|s| s.check(self.store.url(), m))
        {
            return Ok(Some(Refusal::Untrusted(format!(
                "it has sequence {sequence}, but this writer already saw {} (sequence {}) current: manifest.json was replaced with an older version",
                newer.version, newer.sequence
            ))));
        }
        if let Some(newer) = self.newer_than(m).await? {
            let head = self.current_for_write().await?.manifest.version;
            if head != m.version {
                return Err(Error::Store(StoreError::PreconditionFailed {
                    key: CURRENT_KEY.to_owned(),
                }));
            }
            return Ok(Some(Refusal::Untrusted(format!(
                "it has sequence {sequence}, but {} (sequence {}) was current after it: manifest.json was replaced with an older version",
                newer.version,
                newer.sequence.unwrap_or(0)
            ))));
        }
        if let Some(expires) = sign::expired_at(m, SystemTime::now()).filter(|_| !allow_expired) {
            return Ok(Some(Refusal::Expired(expires)));
        }
        self.remember(m);
        Ok(None)
    }

    /// The error for a refused base, with what to do about it.
    async fn refused(&self, m: &Manifest, refusal: Refusal) -> Error {
        let version = m.version.clone().unwrap_or_else(|| "(unversioned)".into());
        match refusal {
            Refusal::Expired(expires) => Error::UntrustedBase {
                version,
                problem: format!("it expired at {expires}"),
                remedy: "agents refuse it and whatever is built on it; sign its content again first with `deploy-manifest refresh`".into(),
            },
            Refusal::Untrusted(problem) => Error::UntrustedBase {
                version,
                problem,
                remedy: self.remedy().await,
            },
        }
    }

    /// The newest verified version written (by its name's time) no earlier than `m`, if its
    /// sequence is above `m`'s.
    async fn newer_than(&self, m: &Manifest) -> Result<Option<Verified>, Error> {
        let Some(name) = m.version.as_deref() else {
            return Ok(None);
        };
        let later: Vec<String> = self
            .version_names()
            .await?
            .into_iter()
            .filter(|n| written_no_earlier(n, name))
            .collect();
        let trusted = self.trusted_keys();
        let now = SystemTime::now();
        let rows: Vec<Verified> = stream::iter(later.into_iter().map(|n| {
            let trusted = &trusted;
            async move { self.check_version(n, trusted, None, now).await }
        }))
        .buffer_unordered(16)
        .collect()
        .await;
        Ok(rows
            .into_iter()
            .filter(|r| r.verified && r.sequence.unwrap_or(0) > m.sequence.unwrap_or(0))
            .max_by_key(|r| r.sequence))
    }

    /// What to do about a current manifest that cannot be built on.
    async fn remedy(&self) -> String {
        let seen = self.seen.as_ref().and_then(|s| s.last(self.store.url()));
        match (self.newest_verified().await, seen) {
            (Ok(Some(good)), _) => format!(
                "the newest version that verifies is {v} (sequence {n}): review it with `deploy-manifest show {v}`, then restore it with `deploy-manifest rollback {v}`",
                v = good.version,
                n = good.sequence.unwrap_or(0)
            ),
            (Ok(None), Some(seen)) => format!(
                "no version in the store verifies, but this writer saw {} (sequence {}) there: the store's history was deleted or replaced; restore manifests/ from a backup",
                seen.version, seen.sequence
            ),
            (Ok(None), None) => "no version in the store verifies; if this store was written before signing was enabled, review `deploy-manifest show`, then adopt it with `deploy-manifest refresh --accept-unverified`".to_owned(),
            (Err(e), _) => format!("(listing the versions to find one that verifies failed: {e})"),
        }
    }

    fn remember(&self, m: &Manifest) {
        // Only verified sequences are worth remembering.
        if let Some(seen) = self
            .seen
            .as_ref()
            .filter(|_| !self.trusted_keys().is_empty())
        {
            seen.record(self.store.url(), m);
        }
    }

    /// Every version in the store, checked against the trusted keys: newest sequence
    /// first. Versions that cannot be read are listed with the reason.
    pub async fn verify_all(&self) -> Result<Vec<Verified>, Error> {
        let trusted = self.trusted_keys();
        let head = self.current_for_write().await?.manifest.version;
        let names = self.version_names().await?;
        let now = SystemTime::now();
        let mut rows: Vec<Verified> = stream::iter(names.into_iter().map(|name| {
            let trusted = &trusted;
            let head = head.as_deref();
            async move { self.check_version(name, trusted, head, now).await }
        }))
        .buffer_unordered(16)
        .collect()
        .await;
        rows.sort_by(|a, b| (b.sequence, &b.version).cmp(&(a.sequence, &a.version)));
        Ok(rows)
    }

    /// One version file checked (see [`judge`]); one that cannot be read is a row with the
    /// reason.
    async fn check_version(
        &self,
        name: String,
        trusted: &[PublicKey],
        head: Option<&str>,
        now: SystemTime,
    ) -> Verified {
        let current = head == Some(name.as_str());
        match self.version(&name).await {
            Ok(m) => judge(Some(&name), &m, trusted, now, current),
            Err(e) => Verified {
                current,
                version: name,
                sequence: None,
                key: None,
                verified: false,
                problem: Some(e.to_string()),
                expires: None,
                expired: false,
            },
        }
    }

    /// The verified version with the highest sequence, if any.
    pub async fn newest_verified(&self) -> Result<Option<Verified>, Error> {
        Ok(self.verify_all().await?.into_iter().find(|r| r.verified))
    }

    /// Check the current manifest alone against the trusted keys (and its expiry).
    pub async fn verify_current(&self) -> Result<Verified, Error> {
        let m = self.current_for_write().await?.manifest;
        Ok(judge(
            None,
            &m,
            &self.trusted_keys(),
            SystemTime::now(),
            true,
        ))
    }

    /// Make the content of `target` current again (default: the parent of the current
    /// version), as a new version that records where it came from. With trusted keys the
    /// target must verify; when the current manifest does not, only a named target is
    /// accepted (the restore the error of every other write suggests), and the new version
    /// continues the newest verified one.
    pub async fn rollback(&self, target: Option<&str>) -> Result<Manifest, Error> {
        let current = self.current_for_write().await?.manifest;
        let trusted = self.trusted_keys();
        // Checked once: it decides what a bare rollback may follow and what the new version
        // continues (the write checks the head again, as every write does).
        let refusal = match self.refusal(&current, true).await {
            Ok(r) => r,
            Err(e) if target.is_none() => return Err(e),
            // Another writer made a version current meanwhile: continue from the newest
            // verified version, as after a refusal.
            Err(e) => Some(Refusal::Untrusted(e.to_string())),
        };
        let target_name = match target {
            Some(t) => normalize_version(t),
            None => {
                // The parent pointer is only as good as the manifest that holds it.
                if let Some(r) = refusal {
                    return Err(self.refused(&current, r).await);
                }
                current.parent.clone().ok_or_else(|| {
                    Error::BadArgument(
                        "the current version has no parent to roll back to; name a version (see `deploy-manifest list`)"
                            .to_owned(),
                    )
                })?
            }
        };
        let target = self.version(&target_name).await?;
        if !trusted.is_empty() {
            let row = judge(
                Some(&target_name),
                &target,
                &trusted,
                SystemTime::now(),
                false,
            );
            if let Some(problem) = row.problem {
                return Err(Error::UntrustedBase {
                    version: target_name,
                    problem,
                    remedy: "nothing was written; pick a version that verifies: `deploy-manifest verify --all`".into(),
                });
            }
        }
        let base = if refusal.is_none() {
            Base::Current {
                allow_expired: true,
            }
        } else {
            self.recovery_base().await?
        };
        let content = target.content();
        self.write_next(base, |m| {
            let from = m.version.take();
            *m = content.clone();
            m.rolled_back_from = from;
            m.rolled_back_to = target.version.clone();
            Ok(format!("rollback to {target_name}"))
        })
        .await
    }

    /// Sign the current content again as a new version with a fresh expiry. With
    /// `accept_unverified`, a current manifest that does not verify is adopted as it is
    /// (the one-time step when signing is enabled on an existing store; review it first).
    pub async fn refresh(&self, accept_unverified: bool) -> Result<Manifest, Error> {
        let base = if accept_unverified {
            // Only for a store that never had a verified version, as far as anyone here
            // knows: otherwise the current content may be an attacker's.
            if let Some(good) = self.newest_verified().await? {
                return Err(Error::BadArgument(format!(
                    "--accept-unverified refused: {} (sequence {}) verifies; restore it with `deploy-manifest rollback {}` instead",
                    good.version,
                    good.sequence.unwrap_or(0),
                    good.version
                )));
            }
            if let Some(seen) = self.seen.as_ref().and_then(|s| s.last(self.store.url())) {
                return Err(Error::BadArgument(format!(
                    "--accept-unverified refused: this writer saw {} (sequence {}) in this store: its history was deleted or replaced; restore manifests/ from a backup",
                    seen.version, seen.sequence
                )));
            }
            self.recovery_base().await?
        } else {
            Base::Current {
                allow_expired: true,
            }
        };
        self.write_next(base, |_| Ok("refresh".to_owned())).await
    }

    /// Continue from the newest verified version (or from nothing, sequence 0).
    async fn recovery_base(&self) -> Result<Base, Error> {
        let good = if self.trusted_keys().is_empty() {
            None
        } else {
            self.newest_verified().await?
        };
        // Never below what this writer saw: deleting newer versions must not lower it.
        let seen = self
            .seen
            .as_ref()
            .and_then(|s| s.last(self.store.url()))
            .map_or(0, |s| s.sequence);
        Ok(match good {
            Some(g) => Base::Recover {
                sequence: g.sequence.unwrap_or(0).max(seen),
                parent: Some(g.version),
            },
            None => Base::Recover {
                parent: None,
                sequence: seen,
            },
        })
    }

    async fn version_names(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .store
            .list(VERSIONS_PREFIX)
            .await?
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix(VERSIONS_PREFIX)
                    .and_then(|k| k.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .collect())
    }

    /// Versions newest first: the current one, its parent, and so on down the chain (clock
    /// skew between writers cannot reorder it); then versions that were never current.
    /// With `limit`, only the newest `limit` versions of the chain are read.
    pub async fn list(&self, limit: Option<usize>) -> Result<Vec<VersionInfo>, Error> {
        let current = self.current().await?.manifest;
        let head = current.version.clone();
        if let Some(limit) = limit {
            let mut out = Vec::new();
            let mut cursor = head.clone();
            while let Some(v) = cursor.filter(|_| out.len() < limit) {
                let m = self.version(&v).await?;
                cursor = m.parent.clone();
                out.push(version_info(&v, &m, head.as_deref(), false));
            }
            return Ok(out);
        }
        let mut names = self.version_names().await?;
        // A current version whose copy was not kept yet is read from manifest.json.
        if let Some(h) = &head
            && !names.contains(h)
        {
            names.push(h.clone());
        }
        let manifests: Vec<Manifest> = stream::iter(names.iter().map(|n| self.version(n)))
            .buffered(16)
            .try_collect()
            .await?;
        let mut by_name: BTreeMap<&str, &Manifest> = names
            .iter()
            .map(String::as_str)
            .zip(manifests.iter())
            .collect();
        let mut out = Vec::with_capacity(names.len());
        let mut cursor = head.as_deref();
        while let Some(m) = cursor.and_then(|v| by_name.remove(v)) {
            let v = cursor.expect("found by name");
            out.push(version_info(v, m, head.as_deref(), false));
            cursor = m.parent.as_deref();
        }
        // What is left never became current: planted, or left by an older writer that
        // wrote the version file before making it current and crashed in between.
        for (v, m) in by_name.into_iter().rev() {
            out.push(version_info(v, m, head.as_deref(), true));
        }
        Ok(out)
    }

    /// Give `m` its version record: name, time, author, parent, sequence (the base's + 1),
    /// and with a signing key an expiry and the signature over all of it.
    fn stamp(&self, m: &mut Manifest, parent: Option<String>, base_sequence: u64) {
        let now = SystemTime::now();
        let content = serde_json::to_vec(&m.content()).expect("the model serialises");
        m.version = Some(new_version_name(now, &content));
        // Information only: agents order versions by `sequence`, never by clocks.
        m.created_at = Some(humantime::format_rfc3339_millis(now).to_string());
        m.created_by = Some(self.author.clone());
        m.parent = parent;
        m.sequence = Some(base_sequence + 1);
        match &self.signing_key {
            Some(key) => {
                m.expires = Some(rfc3339(now + self.expires_in));
                key.sign(m)
            }
            None => {
                m.expires = None;
                m.signature = None
            }
        }
    }

    /// Make `m` current if `manifest.json` still has `etag`, then keep its immutable copy.
    /// In this order, every version file in the store was current once: a verified
    /// version above the current one's sequence proves that `manifest.json` was replaced
    /// with an older version (see `check_base`), and a writer that loses the race leaves
    /// nothing behind.
    async fn commit(&self, m: &Manifest, etag: &str) -> Result<(), Error> {
        let bytes = version_bytes(m)?;
        self.store
            .put(
                CURRENT_KEY,
                bytes.clone(),
                Precondition::IfMatch(etag.to_owned()),
            )
            .await?;
        self.keep_version(m, bytes).await;
        Ok(())
    }

    /// The current version's immutable copy, written if a writer stopped between making it
    /// current and keeping it (one HEAD request per write). Only for a base that passed
    /// `check_base`.
    async fn keep_missing_copy(&self, current: &Manifest) -> Result<(), Error> {
        let Some(version) = current.version.as_deref() else {
            return Ok(());
        };
        if self.store.head(&version_key(version)).await?.is_none() {
            tracing::warn!(%version, "the current version has no copy under manifests/ (a writer stopped between its two writes); writing it");
            match version_bytes(current) {
                Ok(bytes) => self.keep_version(current, bytes).await,
                Err(e) => {
                    tracing::warn!(%version, error = %e, "not kept: it does not pass validation")
                }
            }
        }
        Ok(())
    }

    /// Write the immutable copy of a version that is (or was just made) current. Best
    /// effort: the write is done once `manifest.json` holds it; a missing copy is written
    /// by the next write that builds on it.
    async fn keep_version(&self, m: &Manifest, bytes: Vec<u8>) {
        let version = m.version.as_deref().expect("stamped");
        match self
            .store
            .put(&version_key(version), bytes, Precondition::IfAbsent)
            .await
        {
            Ok(_) | Err(StoreError::PreconditionFailed { .. }) => {}
            Err(e) => {
                tracing::warn!(%version, error = %e, "made current, but its copy under manifests/ was not written; the next write retries")
            }
        }
    }
}

/// `m` judged against the trusted keys: signed by one of them, and (when `stored_as` is
/// given) holding the version it is stored as. The one place a version's verdict is made
/// (`verify`, `verify --all`, the replay check, `rollback`'s target).
fn judge(
    stored_as: Option<&str>,
    m: &Manifest,
    trusted: &[PublicKey],
    now: SystemTime,
    current: bool,
) -> Verified {
    let checked = match stored_as {
        Some(name) if m.version.as_deref() != Some(name) => Err(format!(
            "stored as {name} but says it is {}: moved or copied",
            m.version.as_deref().unwrap_or("(unversioned)")
        )),
        _ => sign::verify(m, trusted).map_err(|e| e.to_string()),
    };
    Verified {
        current,
        version: stored_as
            .map(str::to_owned)
            .or_else(|| m.version.clone())
            .unwrap_or_default(),
        sequence: m.sequence,
        key: m.signature.as_ref().map(|s| s.key.clone()),
        verified: checked.is_ok(),
        expired: checked.is_ok() && sign::expired_at(m, now).is_some(),
        problem: checked.err(),
        expires: m.expires.clone(),
    }
}

/// Whether version `n` (another than `than`) was written no earlier than `than`, by the
/// writers' clocks. Names carry the time to the second, then a random suffix: only the time
/// is compared, so a version written in the same second counts.
fn written_no_earlier(n: &str, than: &str) -> bool {
    let stamp = |v: &str| v.rsplit_once('-').map_or(v, |(t, _)| t).to_owned();
    n != than && stamp(n) >= stamp(than)
}

/// The bytes of a version, validated in full before anything is written.
fn version_bytes(m: &Manifest) -> Result<Vec<u8>, Error> {
    let version = m.version.as_deref().expect("stamped");
    check_manifest(m, version)?;
    let mut bytes = serde_json::to_vec_pretty(m).expect("the model serialises");
    bytes.push(b'\n');
    Ok(bytes)
}

/// Jittered exponential backoff: 10 ms doubling to at most 500 ms.
/// A pause before attempt `attempt + 1` of a compare-and-swap: growing, spread out.
pub(crate) async fn backoff(attempt: u32) {
    let base = 10u64 << attempt.min(6);
    let cap = base.min(500);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64;
    tokio::time::sleep(Duration::from_millis(cap / 2 + nanos % (cap / 2 + 1))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_the_same_second_count_as_newer_whatever_their_suffix() {
        let head = "manifest-20261123T120000Z-ffffffff";
        assert!(written_no_earlier(
            "manifest-20261123T120000Z-00000000",
            head
        ));
        assert!(written_no_earlier(
            "manifest-20261123T120001Z-00000000",
            head
        ));
        assert!(!written_no_earlier(
            "manifest-20261123T115959Z-ffffffff",
            head
        ));
        assert!(!written_no_earlier(head, head));
    }
}
