//! Fleet visibility through the store: every agent writes `status/<host>.json` (a
//! [`HostReport`], schema `schemas/status.schema.json`), and `deploy-manifest status` reads
//! them all. No server of our own: which version runs where is in the bucket.
//!
//! Anyone who can write the bucket can write a report, so each agent signs its own with a
//! host key named after the host (`<state dir>/host.key`); readers given the hosts' public
//! keys ([`verify_report`]) tell a report the host wrote from one written in its name.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::model::{Artifact, Manifest};
use crate::render::escape;
use crate::sign::{JsonSignatureError, PublicKey, Signature, SignedJson, verify_json};
use crate::store::{Fetched, Listed, ObjectStore};

pub const STATUS_PREFIX: &str = "status/";

/// The status schema, as committed in `schemas/status.schema.json`.
pub const STATUS_SCHEMA: &str = include_str!("../../schemas/status.schema.json");

/// What one host last reported. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostReport {
    pub schema_version: u32,
    pub host: String,
    pub agent_version: String,
    /// When this report was written (RFC 3339).
    pub reported_at: String,
    /// The agent's poll interval: a report older than 3 of them means the agent is silent.
    pub interval_seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Set while the newest manifest this host saw has expired (signed manifests): the
    /// expiry that passed. Nothing new is applied until a writer runs `deploy-manifest refresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<String>,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceReport>,
    /// The host key's signature over this report without the signature (see `sign.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

impl SignedJson for HostReport {
    fn signature(&self) -> Option<&Signature> {
        self.signature.as_ref()
    }
    fn signature_mut(&mut self) -> &mut Option<Signature> {
        &mut self.signature
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    /// The manifest version the running generation came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// healthy, unhealthy or unknown.
    pub health: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_at: Option<String>,
    /// The artifact of a deploy that failed and was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_artifact: Option<Artifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Seconds per phase of its last deploy (the one that failed, if it failed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phases: crate::history::Phases,
    /// The last lines the unit logged when its last deploy failed, secrets masked on
    /// the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

pub fn report_key(host: &str) -> String {
    format!("{STATUS_PREFIX}{host}.json")
}

/// Is this report the host's own? Checked against the host keys readers were given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verification {
    /// Signed by a key named after the host it claims to be, found at that host's object.
    Verified,
    /// No host keys were given: nothing was checked.
    Unchecked,
    /// Not signed.
    Unsigned,
    /// The host keys hold no key for the host it claims to be.
    NoHostKey,
    /// Signed by a key named after some other host (or no host).
    WrongKey,
    /// Found at another host's object (`status/<other>.json`).
    WrongObject,
    /// The signature does not match the content (tampered with) or was made by another key
    /// of the host's name.
    BadSignature,
    /// There is no report to check: the host never reported.
    NoReport,
}

impl Verification {
    pub fn is_verified(self) -> bool {
        self == Verification::Verified
    }
}

/// The readers' host keys by host: each document a host signs is checked against that
/// host's keys only (a fleet has many).
pub struct HostKeys<'a> {
    given: bool,
    by_host: BTreeMap<&'a str, Vec<PublicKey>>,
}

impl<'a> HostKeys<'a> {
    pub fn new(host_keys: Option<&'a [PublicKey]>) -> Self {
        let mut by_host: BTreeMap<&str, Vec<PublicKey>> = BTreeMap::new();
        for k in host_keys.unwrap_or_default() {
            by_host.entry(k.name.as_str()).or_default().push(k.clone());
        }
        HostKeys {
            given: host_keys.is_some(),
            by_host,
        }
    }

    /// `host`'s keys (none: it has none), or `None` when no host keys were given.
    pub fn of(&self, host: &str) -> Option<&[PublicKey]> {
        self.given
            .then(|| self.by_host.get(host).map_or(&[][..], |v| &v[..]))
    }
}

/// Check one report read from `object` against `host_keys` (`None`: none given).
pub fn verify_report(
    object: &str,
    r: &HostReport,
    host_keys: Option<&[PublicKey]>,
) -> Verification {
    verify_signed(object == report_key(&r.host), &r.host, r, host_keys)
}

/// Check a document a host signs (its report, its history records), claiming to be
/// `host`'s and found at `host`'s own object or not, against `host_keys` (`None`: none
/// given).
pub fn verify_signed<T: SignedJson>(
    at_own_object: bool,
    host: &str,
    doc: &T,
    host_keys: Option<&[PublicKey]>,
) -> Verification {
    let Some(keys) = host_keys else {
        return Verification::Unchecked;
    };
    if !at_own_object {
        return Verification::WrongObject;
    }
    let Some(sig) = doc.signature() else {
        return Verification::Unsigned;
    };
    if sig.key != host {
        return Verification::WrongKey;
    }
    match verify_json(doc, keys) {
        Ok(()) => Verification::Verified,
        Err(JsonSignatureError::Unsigned) => Verification::Unsigned,
        Err(JsonSignatureError::UnknownKey) => Verification::NoHostKey,
        Err(JsonSignatureError::BadSignature) => Verification::BadSignature,
    }
}

impl std::fmt::Display for Verification {
    /// What `deploy-manifest status` shows in its VERIFIED column.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verification::Verified => "yes",
            Verification::Unchecked => "unchecked",
            Verification::Unsigned => "NO: unsigned",
            Verification::NoHostKey => "NO: no key for this host",
            Verification::WrongKey => "NO: not signed by the host's key",
            Verification::WrongObject => "NO: not at status/<host>.json",
            Verification::BadSignature => "NO: bad signature",
            Verification::NoReport => "-",
        })
    }
}

/// A report as found in the store, with how it was judged.
#[derive(Debug, Clone)]
pub struct StoredReport {
    /// Its object key, `status/<host>.json`.
    pub object: String,
    pub report: HostReport,
    pub verification: Verification,
}

impl StoredReport {
    /// Why this report is not counted as its host's own, for messages (not escaped).
    pub fn why_unverified(&self) -> String {
        let r = &self.report;
        match self.verification {
            Verification::Verified | Verification::Unchecked | Verification::NoReport => {
                self.verification.to_string()
            }
            Verification::Unsigned => format!("{} is not signed", self.object),
            Verification::NoHostKey => format!("the host keys hold no key named {}", r.host),
            Verification::WrongKey => format!(
                "{} is signed by key {:?}, not by {}'s",
                self.object,
                r.signature.as_ref().map(|s| s.key.as_str()).unwrap_or(""),
                r.host
            ),
            Verification::WrongObject => {
                format!("{} claims to be host {}", self.object, r.host)
            }
            Verification::BadSignature => format!(
                "{}: its signature does not match its content (not written by {})",
                self.object, r.host
            ),
        }
    }
}

/// Every host's last report (unreadable ones are skipped with a warning).
pub async fn read_reports(store: &impl ObjectStore) -> Result<Vec<HostReport>, Error> {
    Ok(read_stored_reports(store, None)
        .await?
        .into_iter()
        .map(|s| s.report)
        .collect())
}

/// Every host's last report with its object key, each checked against `host_keys`
/// (`None`: not checked), sorted by host.
pub async fn read_stored_reports(
    store: &impl ObjectStore,
    host_keys: Option<&[PublicKey]>,
) -> Result<Vec<StoredReport>, Error> {
    let keys: Vec<String> = store
        .list(STATUS_PREFIX)
        .await?
        .into_iter()
        .filter(|k| k.ends_with(".json"))
        .collect();
    let fetched: Vec<(String, Fetched)> = stream::iter(keys.into_iter().map(|k| async move {
        let f = match store.get(&k, None).await {
            // One planted oversized report must not hide the others.
            Err(e @ crate::StoreError::TooLarge { .. }) => {
                tracing::warn!(key = %k, error = %e, "skipping an oversized host report");
                Fetched::NotFound
            }
            other => other?,
        };
        Ok::<_, Error>((k, f))
    }))
    .buffer_unordered(32)
    .try_collect()
    .await?;
    let by_host = HostKeys::new(host_keys);
    let mut reports: Vec<StoredReport> = fetched
        .into_iter()
        .filter_map(|(key, f)| match f {
            Fetched::Found { bytes, .. } => parse_report(key, &bytes, &by_host),
            _ => None,
        })
        .collect();
    reports.sort_by(|a, b| (&a.report.host, &a.object).cmp(&(&b.report.host, &b.object)));
    Ok(reports)
}

/// A report's bytes, parsed and checked; `None` (with a warning) when they do not parse.
fn parse_report(key: String, bytes: &[u8], by_host: &HostKeys<'_>) -> Option<StoredReport> {
    match serde_json::from_slice::<HostReport>(bytes) {
        Ok(report) => Some(StoredReport {
            verification: verify_report(&key, &report, by_host.of(&report.host)),
            object: key,
            report,
        }),
        Err(e) => {
            tracing::warn!(
                key = %escape(&key),
                error = %escape(&e.to_string()),
                "skipping an unreadable host report"
            );
            None
        }
    }
}

/// Read one listed report: from `cache` when the listing's ETag says it is unchanged, else
/// from the store (and into the cache). `None` when it vanished or is over the size cap.
async fn fetch_report(
    store: &impl ObjectStore,
    listed: &Listed,
    cache: Option<&ReportCache>,
) -> Result<Option<Vec<u8>>, Error> {
    if let (Some(cache), Some(etag)) = (cache, listed.etag.as_deref())
        && let Some(bytes) = cache.get(&listed.key, etag)
    {
        return Ok(Some(bytes));
    }
    match store.get(&listed.key, None).await {
        Ok(Fetched::Found { bytes, etag }) => {
            if let Some(cache) = cache {
                cache.put(&listed.key, &etag, &bytes);
            }
            Ok(Some(bytes))
        }
        Ok(_) => Ok(None),
        // One planted oversized report must not hide the others.
        Err(e @ crate::StoreError::TooLarge { .. }) => {
            tracing::warn!(key = %listed.key, error = %e, "skipping an oversized host report");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The host a report's key names: `status/<host>.json` → `<host>`.
fn key_host(key: &str) -> &str {
    let name = key.strip_prefix(STATUS_PREFIX).unwrap_or(key);
    name.strip_suffix(".json").unwrap_or(name)
}

/// The fleet as `status` shows it, one host at a time and in bounded memory: every report
/// is fetched (32 at once, in order), parsed, checked against `host_keys` and judged against
/// `manifest`, then handed to `each` and dropped. Hosts come sorted by the host their
/// object names, with every host the manifest names that has no object of its own (`never`)
/// in its place. With `cache`, reports whose ETag the listing shows unchanged are read
/// from it: a second `status` over an unchanged S3 fleet costs only the LIST requests.
pub async fn scan<E: From<Error>>(
    store: &impl ObjectStore,
    host_keys: Option<&[PublicKey]>,
    manifest: Option<&Manifest>,
    now: SystemTime,
    cache: Option<&ReportCache>,
    mut each: impl FnMut(HostView) -> Result<(), E>,
) -> Result<(), E> {
    let mut listed: Vec<Listed> = store
        .list_etags(STATUS_PREFIX)
        .await
        .map_err(Error::from)?
        .into_iter()
        .filter(|l| l.key.ends_with(".json"))
        .collect();
    listed.sort_by(|a, b| (key_host(&a.key), &a.key).cmp(&(key_host(&b.key), &b.key)));
    if let Some(cache) = cache {
        cache.retain(listed.iter().map(|l| l.key.as_str()));
    }
    let own: std::collections::BTreeSet<&str> = listed.iter().map(|l| key_host(&l.key)).collect();
    let named: std::collections::BTreeSet<&str> = manifest
        .into_iter()
        .flat_map(|m| &m.services)
        .flat_map(|s| &s.hosts)
        .map(String::as_str)
        .collect();
    let mut never = named
        .iter()
        .copied()
        .filter(|h| !own.contains(h))
        .collect::<Vec<&str>>()
        .into_iter()
        .peekable();
    let by_host = HostKeys::new(host_keys);
    let mut reports = stream::iter(
        listed
            .iter()
            .map(|l| async move { Ok::<_, Error>((l, fetch_report(store, l, cache).await?)) }),
    )
    .buffered(32);
    while let Some(next) = reports.next().await {
        let (listed, bytes) = next?;
        let host = key_host(&listed.key);
        while let Some(h) = never.next_if(|h| *h < host) {
            each(never_view(h))?;
        }
        let stored = bytes.and_then(|b| parse_report(listed.key.clone(), &b, &by_host));
        let its_own = stored.as_ref().is_some_and(|s| s.report.host == host);
        if let Some(stored) = stored {
            each(judge(&stored, manifest, now))?;
        }
        // An object that vanished, does not parse, is too large or claims another host is
        // no report of the host it names: that host still shows, as never reported.
        if !its_own && named.contains(host) {
            each(never_view(host))?;
        }
    }
    for h in never {
        each(never_view(h))?;
    }
    Ok(())
}

/// Reports `status` read from an S3 store, each under its key with the ETag it had, in a
/// private directory per store (`$DEPLOY_CACHE_DIR`, else `$XDG_CACHE_HOME/deployer`, else
/// `~/.cache/deployer`; then `status/<hash of the store URL and endpoint>`). A cached report is only
/// used while LIST shows the same ETag, and is verified like a fetched one: the cache saves
/// requests, it is not trusted more than the store.
#[derive(Debug)]
pub struct ReportCache {
    dir: std::path::PathBuf,
}

impl ReportCache {
    /// The cache for the store `identity` names (its URL and endpoint), created 0700;
    /// `None` (with a warning) if it cannot be.
    pub fn open(identity: &str) -> Option<ReportCache> {
        use sha2::{Digest, Sha256};
        let hash = crate::hex(&Sha256::digest(identity.as_bytes()));
        let dir = crate::fsutil::private_cache_dir(&format!("status/{}", &hash[..16]))?;
        Some(ReportCache { dir })
    }

    fn path(&self, key: &str) -> std::path::PathBuf {
        use sha2::{Digest, Sha256};
        self.dir.join(crate::hex(&Sha256::digest(key.as_bytes())))
    }

    /// The cached bytes of `key` if they were cached with `etag`. Entry format: the ETag,
    /// a newline, the report.
    fn get(&self, key: &str, etag: &str) -> Option<Vec<u8>> {
        let file = std::fs::File::open(self.path(key)).ok()?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, crate::store::max_object_bytes() + 1024),
            &mut bytes,
        )
        .ok()?;
        let newline = bytes.iter().position(|b| *b == b'\n')?;
        (&bytes[..newline] == etag.as_bytes()).then(|| bytes.split_off(newline + 1))
    }

    fn put(&self, key: &str, etag: &str, bytes: &[u8]) {
        if etag.contains('\n') {
            return;
        }
        let mut entry = Vec::with_capacity(etag.len() + 1 + bytes.len());
        entry.extend_from_slice(etag.as_bytes());
        entry.push(b'\n');
        entry.extend_from_slice(bytes);
        if let Err(e) = crate::fsutil::write_atomically(&self.path(key), &entry, 0o600) {
            tracing::debug!(key, error = %e, "could not cache a host report");
        }
    }

    /// Forget the reports whose keys are no longer listed.
    fn retain<'k>(&self, keys: impl Iterator<Item = &'k str>) {
        let keep: std::collections::HashSet<std::path::PathBuf> =
            keys.map(|k| self.path(k)).collect();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if !keep.contains(&entry.path()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// How a host looks from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Reporting, and every service it runs is healthy on the manifest's artifact.
    Ok,
    /// Reporting, but a service failed its last deploy or is unhealthy.
    Failing,
    /// Reporting, still converging to the manifest (or its last run failed).
    Behind,
    /// No report for more than 3 poll intervals: the agent is down or cut off.
    Silent,
    /// The newest signed manifest it saw has expired: it applies nothing new until a
    /// writer runs `deploy-manifest refresh`.
    Expired,
    /// The manifest names it, and it never reported (no agent runs there, or it cannot
    /// reach the store).
    Never,
}

impl HostState {
    pub fn name(self) -> &'static str {
        match self {
            HostState::Ok => "ok",
            HostState::Failing => "failing",
            HostState::Behind => "behind",
            HostState::Silent => "silent",
            HostState::Expired => "expired",
            HostState::Never => "never",
        }
    }

    /// Nothing more will change without a new push or someone acting: what `status
    /// --watch` waits for. A host still converging (`behind`) is not settled.
    pub fn settled(self) -> bool {
        self != HostState::Behind
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostView {
    pub host: String,
    /// Where the report was found, `status/<host>.json`.
    pub object: String,
    /// Whether the report is the host's own (`unchecked` without host keys).
    pub verification: Verification,
    /// The name of the key that signed it, if signed.
    pub signed_by: Option<String>,
    pub state: HostState,
    /// Seconds since the report was written (`null`: never reported).
    pub age_seconds: Option<u64>,
    /// Seconds since the host's last run without errors (`null`: none reported).
    pub last_success_age_seconds: Option<u64>,
    pub manifest_version: Option<String>,
    pub services: Vec<ServiceView>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub service: String,
    pub artifact: Option<String>,
    pub health: String,
    /// The host runs what the current manifest says.
    pub current: bool,
    pub deployed_at: Option<String>,
    pub last_error: Option<String>,
    /// Seconds per phase of its last deploy.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub phases: crate::history::Phases,
    /// The last lines the unit logged when its last deploy failed (secrets masked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

/// Seconds since `reported_at` (`u64::MAX` if it does not parse or lies ahead).
pub fn age(reported_at: &str, now: SystemTime) -> u64 {
    humantime::parse_rfc3339(reported_at)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .unwrap_or(Duration::MAX)
        .as_secs()
}

/// One host's report judged against `manifest` at `now`.
pub fn judge(stored: &StoredReport, manifest: Option<&Manifest>, now: SystemTime) -> HostView {
    let r = &stored.report;
    let age_seconds = age(&r.reported_at, now);
    let services: Vec<ServiceView> = r
        .services
        .iter()
        .map(|(name, s)| {
            let wanted = manifest.and_then(|m| m.service(name)).map(|s| &s.artifact);
            ServiceView {
                service: name.clone(),
                artifact: s.artifact.as_ref().map(Artifact::label),
                health: s.health.clone(),
                current: wanted.is_some() && wanted == s.artifact.as_ref(),
                deployed_at: s.deployed_at.clone(),
                last_error: s.last_error.clone(),
                phases: s.phases.clone(),
                log: s.log.clone(),
            }
        })
        .collect();
    let silent = age_seconds > 3 * r.interval_seconds.max(1);
    let failing = r
        .services
        .values()
        .any(|s| s.health == "unhealthy" || s.failed_artifact.is_some() || s.last_error.is_some());
    let behind = r.last_error.is_some()
        || services.iter().any(|s| !s.current)
        || manifest.is_some_and(|m| r.manifest_version != m.version);
    HostView {
        host: r.host.clone(),
        object: stored.object.clone(),
        verification: stored.verification,
        signed_by: r.signature.as_ref().map(|s| s.key.clone()),
        state: if silent {
            HostState::Silent
        } else if r.expired.is_some() {
            HostState::Expired
        } else if failing {
            HostState::Failing
        } else if behind {
            HostState::Behind
        } else {
            HostState::Ok
        },
        age_seconds: Some(age_seconds),
        last_success_age_seconds: r.last_success.as_deref().map(|t| age(t, now)),
        manifest_version: r.manifest_version.clone(),
        services,
        last_error: r.last_error.clone(),
    }
}

/// A host the manifest names that never reported.
fn never_view(host: &str) -> HostView {
    HostView {
        host: host.to_owned(),
        object: report_key(host),
        verification: Verification::NoReport,
        signed_by: None,
        state: HostState::Never,
        age_seconds: None,
        last_success_age_seconds: None,
        manifest_version: None,
        services: Vec::new(),
        last_error: None,
    }
}

/// `3h 20m`: the first two units of `secs`, or `never`.
pub fn ago(secs: Option<u64>) -> String {
    let Some(secs) = secs else {
        return "never".into();
    };
    let age =
        humantime::format_duration(Duration::from_secs(secs.min(10 * 365 * 86400))).to_string();
    age.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// `deploy-manifest status`: one line per host and service. Every cell is escaped
/// (`render::table`): text from a report never reaches the terminal as control characters.
pub fn render(view: &[HostView]) -> String {
    let mut table = fleet_table();
    for h in view {
        table_rows(h, &mut table);
    }
    table.to_string()
}

/// The fleet table, empty: [`table_rows`] adds each host.
pub fn fleet_table() -> crate::render::Table {
    crate::render::Table::new(&[
        "HOST", "VERIFIED", "STATE", "REPORTED", "SERVICE", "ARTIFACT", "HEALTH", "ERROR",
    ])
}

/// One host's rows in the fleet table: one per service, or one for a host without any.
pub fn table_rows(h: &HostView, table: &mut crate::render::Table) {
    let verified = h.verification.to_string();
    let age = ago(h.age_seconds);
    let head = [h.host.as_str(), &verified, h.state.name(), &age];
    if h.services.is_empty() {
        let error = h.last_error.as_deref().unwrap_or_default();
        table.push(head.into_iter().chain(["-", "-", "-", error]));
    }
    for s in &h.services {
        let artifact = format!(
            "{}{}",
            s.artifact.as_deref().unwrap_or("-"),
            if s.current { "" } else { " (not current)" }
        );
        let error = s
            .last_error
            .as_deref()
            .or(h.last_error.as_deref())
            .unwrap_or_default();
        table.push(
            head.into_iter()
                .chain([s.service.as_str(), &artifact, &s.health, error]),
        );
    }
}

/// `deploy-manifest status HOST [--service S]`: one host in full, each service with the
/// phases of its last deploy and, when that deploy failed, the log its unit left. Every
/// value is escaped: a report's text never reaches the terminal as control characters.
pub fn render_host(h: &HostView, service: Option<&str>) -> String {
    use std::fmt::Write;
    let e = |t: &str| escape(t).into_owned();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "host {}: {} (reported {} ago, verified: {})",
        e(&h.host),
        h.state.name(),
        ago(h.age_seconds),
        h.verification
    );
    if h.state == HostState::Never {
        let _ = writeln!(
            out,
            "  the manifest names this host, but it never reported to the store: is an agent installed there, with --host {}?",
            e(&h.host)
        );
    }
    let field = |out: &mut String, indent: &str, name: &str, value: Option<&str>| {
        if let Some(v) = value {
            let _ = writeln!(out, "{indent}{name:<18}{}", e(v));
        }
    };
    field(
        &mut out,
        "  ",
        "manifest version",
        h.manifest_version.as_deref(),
    );
    if h.age_seconds.is_some() {
        let success = match h.last_success_age_seconds {
            Some(_) => format!("{} ago", ago(h.last_success_age_seconds)),
            None => "never".into(),
        };
        field(&mut out, "  ", "last success", Some(&success));
    }
    field(&mut out, "  ", "error", h.last_error.as_deref());
    for s in h
        .services
        .iter()
        .filter(|s| service.is_none_or(|want| s.service == want))
    {
        let _ = writeln!(out, "\n  service {}", e(&s.service));
        let artifact = format!(
            "{}{}",
            s.artifact.as_deref().unwrap_or("-"),
            if s.current { "" } else { " (not current)" }
        );
        field(&mut out, "    ", "artifact", Some(&artifact));
        field(&mut out, "    ", "health", Some(&s.health));
        field(&mut out, "    ", "deployed at", s.deployed_at.as_deref());
        if !s.phases.is_empty() {
            field(
                &mut out,
                "    ",
                "last deploy",
                Some(&crate::history::phases_text(&s.phases)),
            );
        }
        field(&mut out, "    ", "error", s.last_error.as_deref());
        if !s.log.is_empty() {
            let _ = writeln!(
                out,
                "    log (its last {} lines when the deploy failed, secrets masked):",
                s.log.len()
            );
            out.push_str(&crate::render::log_lines(&s.log, "      "));
        }
    }
    if let Some(want) = service
        && !h.services.iter().any(|s| s.service == want)
    {
        let _ = writeln!(out, "\n  service {}: not reported by this host", e(want));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(host: &str, age_secs: u64, health: &str, artifact: &str) -> HostReport {
        let reported = SystemTime::now() - Duration::from_secs(age_secs);
        HostReport {
            schema_version: 1,
            host: host.into(),
            agent_version: "0.1.0".into(),
            reported_at: crate::repo::rfc3339(reported),
            interval_seconds: 300,
            manifest_version: Some("manifest-20261122T140000Z-3f2a9c1d".into()),
            last_poll: None,
            last_success: None,
            last_error: None,
            expired: None,
            services: [(
                "ava".to_owned(),
                ServiceReport {
                    artifact: Some(Artifact::StorePath(artifact.into())),
                    version: None,
                    health: health.into(),
                    deployed_at: None,
                    failed_artifact: None,
                    last_error: None,
                    phases: Default::default(),
                    log: Vec::new(),
                },
            )]
            .into(),
            signature: None,
        }
    }

    fn stored(r: HostReport) -> StoredReport {
        StoredReport {
            object: report_key(&r.host),
            report: r,
            verification: Verification::Unchecked,
        }
    }

    /// The fleet view `status` shows for `reports`, each at its own object in a store.
    async fn scanned(reports: &[HostReport], manifest: Option<&Manifest>) -> Vec<HostView> {
        use crate::store::{FileStore, Precondition};
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&format!("file://{}/store", dir.path().display())).unwrap();
        for r in reports {
            let bytes = serde_json::to_vec(r).unwrap();
            store
                .put(&report_key(&r.host), bytes, Precondition::None)
                .await
                .unwrap();
        }
        let mut view = Vec::new();
        scan(&store, None, manifest, SystemTime::now(), None, |h| {
            view.push(h);
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
        view
    }

    #[tokio::test]
    async fn hosts_are_ok_failing_behind_or_silent() {
        let mut m = Manifest::empty();
        m.version = Some("manifest-20261122T140000Z-3f2a9c1d".into());
        crate::edit::add_service(
            &mut m,
            &serde_json::json!({"name": "ava", "artifact": {"storePath": "/nix/store/new"}, "hosts": ["a", "b", "c", "d", "e"]}),
        )
        .unwrap();
        m.version = Some("manifest-20261122T140000Z-3f2a9c1d".into());
        let reports = [
            report("a", 10, "healthy", "/nix/store/new"),
            report("b", 10, "unhealthy", "/nix/store/new"),
            report("c", 10, "healthy", "/nix/store/old"),
            report("d", 3 * 300 + 1, "healthy", "/nix/store/new"),
        ];
        let view = scanned(&reports, Some(&m)).await;
        let states: Vec<HostState> = view.iter().map(|h| h.state).collect();
        assert_eq!(
            states,
            [
                HostState::Ok,
                HostState::Failing,
                HostState::Behind,
                HostState::Silent,
                HostState::Never
            ]
        );
        assert_eq!(view[4].host, "e", "named in the manifest, never reported");
        assert_eq!(view[4].age_seconds, None);
        let text = render(&view);
        assert!(text.contains("e     -          never    never"), "{text}");
        assert!(text.contains("(not current)"), "{text}");
        assert!(text.starts_with("HOST  VERIFIED   STATE"), "{text}");
        assert!(text.contains("a     unchecked  ok"), "{text}");
    }

    #[test]
    fn signed_reports_verify_and_spoofs_do_not() {
        let key = crate::sign::SecretKey::generate("host-a").unwrap();
        let keys = [key.public()];
        let check = |object: &str, r: &HostReport| verify_report(object, r, Some(&keys));
        let mut r = report("host-a", 0, "healthy", "/nix/store/new");
        let object = report_key("host-a");
        assert_eq!(check(&object, &r), Verification::Unsigned);
        key.sign_json(&mut r);
        assert_eq!(check(&object, &r), Verification::Verified, "round trip");
        assert_eq!(
            verify_report(&object, &r, None),
            Verification::Unchecked,
            "no host keys: nothing checked"
        );
        // Through JSON, as readers see it.
        let json = serde_json::to_vec_pretty(&r).unwrap();
        let read: HostReport = serde_json::from_slice(&json).unwrap();
        assert_eq!(check(&object, &read), Verification::Verified);

        // Tampered: healthy at another artifact, or any other field.
        let mut tampered = r.clone();
        tampered.services.get_mut("ava").unwrap().artifact =
            Some(Artifact::StorePath("/nix/store/evil".into()));
        assert_eq!(check(&object, &tampered), Verification::BadSignature);
        let mut tampered = r.clone();
        tampered.last_error = Some("x".into());
        assert_eq!(check(&object, &tampered), Verification::BadSignature);

        // Moved to another host's object, or claiming another host.
        assert_eq!(check("status/host-b.json", &r), Verification::WrongObject);
        let mut renamed = r.clone();
        renamed.host = "host-b".into();
        assert_eq!(
            check("status/host-b.json", &renamed),
            Verification::WrongKey,
            "signed by host-a's key but claims host-b"
        );

        // A key not named after the host is refused even if the readers trust it.
        let wrong = crate::sign::SecretKey::generate("ops").unwrap();
        let mut by_wrong = r.clone();
        wrong.sign_json(&mut by_wrong);
        let both = [key.public(), wrong.public()];
        assert_eq!(
            verify_report(&object, &by_wrong, Some(&both)),
            Verification::WrongKey
        );

        // Signed by another key that claims the host's name (the attacker's own "host-a").
        let forger = crate::sign::SecretKey::generate("host-a").unwrap();
        let mut forged = r.clone();
        forger.sign_json(&mut forged);
        assert_eq!(check(&object, &forged), Verification::BadSignature);

        // No key for this host among the readers'.
        let other = [crate::sign::SecretKey::generate("host-b").unwrap().public()];
        assert_eq!(
            verify_report(&object, &r, Some(&other)),
            Verification::NoHostKey
        );
    }

    #[test]
    fn report_text_is_escaped_in_the_table() {
        let mut r = report("h\u{1b}]0;x\u{7}", 0, "healthy", "/nix/store/new");
        r.last_error = Some("\u{1b}[31mred\nsecond line".into());
        let svc = r.services.remove("ava").unwrap();
        r.services.insert("a\u{1b}[2Jva".into(), svc);
        let view = [judge(&stored(r), None, SystemTime::now())];
        let text = render(&view);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 2, "{text:?}");
        assert!(text.contains("\\x1b[31mred\\nsecond line"), "{text}");
        assert!(text.contains("a\\x1b[2Jva"), "{text}");
    }

    #[test]
    fn one_host_in_full_shows_phases_and_the_log_escaped() {
        let mut r = report("a", 0, "unhealthy", "/nix/store/new");
        let s = r.services.get_mut("ava").unwrap();
        s.last_error = Some("not healthy within 20s".into());
        s.phases = [
            (crate::history::Phase::Fetch, 0.5),
            (crate::history::Phase::Health, 20.0),
        ]
        .into();
        s.log = vec![
            "starting".into(),
            "\u{1b}]0;owned\u{7}password=*** rejected".into(),
        ];
        let view = [judge(&stored(r), None, SystemTime::now())];
        let text = render_host(&view[0], Some("ava"));
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert!(
            text.contains("last deploy       fetch 0.50s, health 20.00s"),
            "{text}"
        );
        assert!(
            text.contains("      | \\x1b]0;owned\\x07password=*** rejected"),
            "{text}"
        );
        assert!(text.contains("its last 2 lines"), "{text}");
        let other = render_host(&view[0], Some("bob"));
        assert!(other.contains("service bob: not reported"), "{other}");
        assert!(!other.contains("starting"), "{other}");
    }

    #[test]
    fn a_full_report_matches_the_schema() {
        let schema: serde_json::Value = serde_json::from_str(STATUS_SCHEMA).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let mut r = report("a", 0, "healthy", "/nix/store/x");
        r.last_poll = Some(r.reported_at.clone());
        r.last_success = Some(r.reported_at.clone());
        r.last_error = Some("e".into());
        let s = r.services.get_mut("ava").unwrap();
        s.version = r.manifest_version.clone();
        s.deployed_at = Some(r.reported_at.clone());
        s.failed_artifact = Some(Artifact::StorePath("/nix/store/y".into()));
        s.last_error = Some("e".into());
        s.phases = [(crate::history::Phase::Restart, 0.25)].into();
        s.log = vec!["line".into()];
        crate::sign::SecretKey::generate("a")
            .unwrap()
            .sign_json(&mut r);
        let value = serde_json::to_value(&r).unwrap();
        let problems: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert_eq!(problems, Vec::<String>::new());
        let mut extra = value.clone();
        extra["services"]["ava"]["typo"] = serde_json::json!(1);
        assert!(!validator.is_valid(&extra));
        let mut extra = value.clone();
        extra["signature"]["typo"] = serde_json::json!(1);
        assert!(!validator.is_valid(&extra));
    }

    #[tokio::test]
    async fn a_named_host_without_a_readable_report_of_its_own_still_shows_as_never() {
        use crate::store::{FileStore, Precondition};
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&format!("file://{}/store", dir.path().display())).unwrap();
        let put = |key: String, bytes: Vec<u8>| {
            let store = store.clone();
            async move { store.put(&key, bytes, Precondition::None).await.unwrap() }
        };
        let json = |r: &HostReport| serde_json::to_vec(r).unwrap();
        put(
            report_key("a"),
            json(&report("a", 0, "healthy", "/nix/store/x")),
        )
        .await;
        put(report_key("b"), b"{not json".to_vec()).await;
        // Planted at c's object, in d's name.
        put(
            report_key("c"),
            json(&report("d", 0, "healthy", "/nix/store/x")),
        )
        .await;
        let mut m = Manifest::empty();
        crate::edit::add_service(
            &mut m,
            &serde_json::json!({"name": "ava", "artifact": {"storePath": "/nix/store/x"}, "hosts": ["a", "b", "c", "e"]}),
        )
        .unwrap();
        let mut seen = Vec::new();
        scan(&store, None, Some(&m), SystemTime::now(), None, |h| {
            seen.push((h.host, h.object, h.state));
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
        let never = |h: &str| (h.to_owned(), report_key(h), HostState::Never);
        assert_eq!(
            seen,
            [
                ("a".to_owned(), report_key("a"), HostState::Behind),
                never("b"),
                ("d".to_owned(), report_key("c"), HostState::Behind),
                never("c"),
                never("e"),
            ]
        );
    }

    #[tokio::test]
    async fn an_oversized_report_is_skipped_not_fatal() {
        use crate::store::{FileStore, Precondition};
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&format!("file://{}/store", dir.path().display())).unwrap();
        let good = serde_json::to_vec(&report("a", 0, "healthy", "/nix/store/x")).unwrap();
        store
            .put(&report_key("a"), good, Precondition::None)
            .await
            .unwrap();
        let big = std::fs::File::create(store.root().join("status/b.json")).unwrap();
        big.set_len(1 << 30).unwrap();
        let reports = read_reports(&store).await.unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].host, "a");
    }
}
