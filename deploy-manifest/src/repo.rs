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

fn version_key(version: &str) -> String {
    format!("{VERSIONS_PREFIX}{version}.json")
}

/// `manifest-YYYYMMDDTHHMMSSZ-<8hex>`: sortable by time; the suffix keeps two versions
/// written in the same second apart.
fn new_version_name(now: SystemTime, content: &[u8]) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let stamp = compact_timestamp(now);
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
    let digest = h.finalize();
    format!("manifest-{stamp}-{}", crate::hex(&digest[..4]))
}

/// RFC 3339, UTC, whole seconds: `2026-11-22T14:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn compact_timestamp(t: SystemTime) -> String {
    rfc3339(t).replace(['-', ':'], "")
}

/// A manifest repository: the versions under one store URL.
pub struct Repo<S> {
    store: S,
    author: String,
    signing_key: Option<crate::sign::SecretKey>,
}

impl<S: ObjectStore> Repo<S> {
    pub fn new(store: S, author: impl Into<String>) -> Self {
        Repo {
            store,
            author: author.into(),
            signing_key: None,
        }
    }

    /// Sign every version this repo writes.
    pub fn with_signing_key(mut self, key: Option<crate::sign::SecretKey>) -> Self {
        self.signing_key = key;
        self
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
        self.stamp(&mut manifest, None);
        let bytes = self.write_version(&manifest).await?;
        match self
            .store
            .put(CURRENT_KEY, bytes, Precondition::IfAbsent)
            .await
        {
            Ok(_) => Ok(Some(manifest)),
            Err(StoreError::PreconditionFailed { .. }) => {
                // Someone else initialised it at the same moment: theirs stands.
                self.discard(&manifest).await;
                Ok(None)
            }
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
            _ => Err(Error::UnknownVersion {
                version,
                url: self.store.url().to_owned(),
            }),
        }
    }

    /// Apply `edit` to the current manifest and write the result as a new version, by
    /// compare-and-swap. `edit` may run several times (once per attempt) and returns the
    /// one-line summary recorded with the version; an error from it ends the update with
    /// nothing written.
    pub async fn update<F>(&self, edit: F) -> Result<Manifest, Error>
    where
        F: Fn(&mut Manifest) -> Result<String, Error>,
    {
        for attempt in 0..MAX_ATTEMPTS {
            let current = self.current().await?;
            let mut next = current.manifest.clone();
            next.rolled_back_from = None;
            next.rolled_back_to = None;
            let summary = edit(&mut next)?;
            next.summary = Some(summary);
            self.stamp(&mut next, current.manifest.version.clone());
            match self.commit(&next, &current.etag).await {
                Ok(()) => return Ok(next),
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

    /// Make the content of `target` current again (default: the parent of the current
    /// version), as a new version that records where it came from.
    pub async fn rollback(&self, target: Option<&str>) -> Result<Manifest, Error> {
        let current = self.current().await?.manifest;
        let target_name = match target {
            Some(t) => normalize_version(t),
            None => current.parent.clone().ok_or_else(|| {
                Error::BadArgument(
                    "the current version has no parent to roll back to; name a version (see `deploy-manifest list`)"
                        .to_owned(),
                )
            })?,
        };
        let target = self.version(&target_name).await?;
        let content = target.content();
        self.update(|m| {
            let from = m.version.take();
            *m = content.clone();
            m.rolled_back_from = from;
            m.rolled_back_to = target.version.clone();
            Ok(format!("rollback to {target_name}"))
        })
        .await
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
        let names: Vec<String> = self
            .store
            .list(VERSIONS_PREFIX)
            .await?
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix(VERSIONS_PREFIX)
                    .and_then(|k| k.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .collect();
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
        // What is left never became current (the writer crashed between its two writes).
        for (v, m) in by_name.into_iter().rev() {
            out.push(version_info(v, m, head.as_deref(), true));
        }
        Ok(out)
    }

    fn stamp(&self, m: &mut Manifest, parent: Option<String>) {
        let now = SystemTime::now();
        let content = serde_json::to_vec(&m.content()).expect("the model serialises");
        m.version = Some(new_version_name(now, &content));
        // Milliseconds: versions written within one second still have an order (the agent's
        // anti-downgrade check compares them).
        m.created_at = Some(humantime::format_rfc3339_millis(now).to_string());
        m.created_by = Some(self.author.clone());
        m.parent = parent;
        match &self.signing_key {
            Some(key) => key.sign(m),
            None => m.signature = None,
        }
    }

    /// Write the immutable version object; returns the bytes written.
    async fn write_version(&self, m: &Manifest) -> Result<Vec<u8>, Error> {
        let version = m.version.as_deref().expect("stamped");
        check_manifest(m, version)?;
        let mut bytes = serde_json::to_vec_pretty(m).expect("the model serialises");
        bytes.push(b'\n');
        self.store
            .put(&version_key(version), bytes.clone(), Precondition::IfAbsent)
            .await?;
        Ok(bytes)
    }

    /// Write `m` as a new version and make it current if `manifest.json` still has `etag`.
    async fn commit(&self, m: &Manifest, etag: &str) -> Result<(), Error> {
        let bytes = self.write_version(m).await?;
        match self
            .store
            .put(CURRENT_KEY, bytes, Precondition::IfMatch(etag.to_owned()))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                if matches!(e, StoreError::PreconditionFailed { .. }) {
                    self.discard(m).await;
                }
                Err(e.into())
            }
        }
    }

    /// Remove a version that never became current (best effort: `list` marks leftovers).
    async fn discard(&self, m: &Manifest) {
        if let Some(v) = &m.version
            && let Err(e) = self.store.delete(&version_key(v)).await
        {
            tracing::warn!(version = %v, error = %e, "could not remove a version that lost a concurrent write");
        }
    }
}

/// Jittered exponential backoff: 10 ms doubling to at most 500 ms.
async fn backoff(attempt: u32) {
    let base = 10u64 << attempt.min(6);
    let cap = base.min(500);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u64;
    tokio::time::sleep(Duration::from_millis(cap / 2 + nanos % (cap / 2 + 1))).await;
}
