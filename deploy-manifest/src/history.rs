//! Deploy history through the store: what each host did, kept where anyone with read
//! access to the bucket can see it without ssh.
//!
//! An agent run that did something (a deploy, a rollback, a removal, a failure, a repair,
//! a rollout abort) writes one [`HistoryRecord`] to `history/<host>/<time>-<nonce>.json`:
//! created once (`If-None-Match: *`), never rewritten, signed with the host key like the
//! host's report; an idle run writes nothing. The agent keeps the newest N records of its
//! host and deletes older ones ([`prune`]). `deploy-manifest history` reads them newest
//! first ([`read`]), and notifications carry the same [`Event`] JSON.
//!
//! Nothing here holds a secret: errors are the agent's own messages and log lines are
//! masked on the host before they leave it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, stream};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::sign::{PublicKey, Signature, SignedJson};
use crate::status::Verification;
use crate::store::{Fetched, ObjectStore, Precondition};

pub const HISTORY_PREFIX: &str = "history/";

/// The history schema, as committed in `schemas/history.schema.json`.
pub const HISTORY_SCHEMA: &str = include_str!("../../schemas/history.schema.json");

/// How many records an agent keeps of its own host by default (`--history-keep`).
pub const DEFAULT_KEEP: usize = 200;

/// A deploy's phases, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// The artifact downloaded, verified and unpacked (nothing when it was here already).
    Fetch,
    /// What the service declares on its infrastructure: database and role, Redis index,
    /// templates resolved into its generated env file.
    Infrastructure,
    /// Its release command.
    Release,
    /// The unit written, systemd reloaded, the old generation stopped (in place) and the
    /// new one started.
    Restart,
    /// The health gate.
    Health,
    /// The proxy's routes switched to the new generation.
    Route,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Fetch,
        Phase::Infrastructure,
        Phase::Release,
        Phase::Restart,
        Phase::Health,
        Phase::Route,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Fetch => "fetch",
            Phase::Infrastructure => "infrastructure",
            Phase::Release => "release",
            Phase::Restart => "restart",
            Phase::Health => "health",
            Phase::Route => "route",
        }
    }
}

/// Seconds spent in each phase a deploy went through (a phase it skipped is absent).
pub type Phases = BTreeMap<Phase, f64>;

/// `d` in seconds, to the millisecond: what [`Phases`] holds.
pub fn seconds(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// `fetch 0.12s, restart 0.31s, health 1.20s`.
pub fn phases_text(p: &Phases) -> String {
    p.iter()
        .map(|(phase, s)| format!("{} {s:.2}s", phase.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What happened to one service on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EventKind {
    /// A new generation passed its health gate and serves.
    Deployed,
    /// Its staged rollout was aborted: the host went back to the generation it ran before.
    Reverted,
    /// The deploy failed (release, start or health gate) and what ran before was put back.
    RolledBack,
    /// It could not be deployed or removed and nothing changed (secrets file, fetch, a port,
    /// infrastructure); the next run tries again. Written when the error changes.
    Failed,
    /// A re-check found its current generation unhealthy, or it drifted and could not be
    /// put back. Written when the error changes.
    Unhealthy,
    /// It had drifted (stopped, unit file changed) and was put back as recorded.
    Repaired,
    /// No longer in the manifest: stopped, its unit removed (data kept).
    Removed,
    /// This host aborted the service's staged rollout (too many failures, or the progress
    /// deadline passed).
    RolloutAborted,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Deployed => "deployed",
            EventKind::Reverted => "reverted",
            EventKind::RolledBack => "rolledBack",
            EventKind::Failed => "failed",
            EventKind::Unhealthy => "unhealthy",
            EventKind::Repaired => "repaired",
            EventKind::Removed => "removed",
            EventKind::RolloutAborted => "rolloutAborted",
        }
    }

    /// A failure the operator should hear about.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            EventKind::RolledBack
                | EventKind::Failed
                | EventKind::Unhealthy
                | EventKind::RolloutAborted
        )
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One thing that happened: the JSON of a history entry and of a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    pub host: String,
    pub service: String,
    pub kind: EventKind,
    /// When the host finished it (RFC 3339).
    pub at: String,
    /// The manifest version it applied (for a revert: the version it went back to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Who wrote that version, and when (the manifest's `createdBy`, `createdAt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_at: Option<String>,
    /// The artifact it deployed (or tried to), and the one that ran before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Seconds per phase of the deploy, and in all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phases: Phases,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last lines the failed unit logged, secrets masked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

impl Event {
    /// What happened to `service` on `host`, at `at`, with nothing else said yet.
    pub fn new(host: &str, service: &str, kind: EventKind, at: String) -> Event {
        Event {
            host: host.to_owned(),
            service: service.to_owned(),
            kind,
            at,
            version: None,
            pushed_by: None,
            pushed_at: None,
            artifact: None,
            previous: None,
            phases: Phases::new(),
            seconds: None,
            error: None,
            log: Vec::new(),
        }
    }
}

/// `history/<host>/<time>-<nonce>.json`: what one run of one host did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryRecord {
    pub schema_version: u32,
    pub host: String,
    /// When the run wrote it (RFC 3339, milliseconds): also the time in its key, so a
    /// signed record copied under another time does not verify.
    pub written_at: String,
    pub events: Vec<Event>,
    /// The host key's signature over this record without the signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

impl SignedJson for HistoryRecord {
    fn signature(&self) -> Option<&Signature> {
        self.signature.as_ref()
    }
    fn signature_mut(&mut self) -> &mut Option<Signature> {
        &mut self.signature
    }
}

/// `history/<host>/`.
pub fn host_prefix(host: &str) -> String {
    format!("{HISTORY_PREFIX}{host}/")
}

/// A new record's key: `history/<host>/<YYYYMMDDTHHMMSS.mmmZ>-<8 hex>.json`, sortable by
/// time; the suffix keeps two records of the same millisecond apart.
pub fn record_key(host: &str, at: SystemTime, content: &[u8]) -> String {
    let stamp = stamp(at);
    format!(
        "{}{stamp}-{}.json",
        host_prefix(host),
        crate::repo::unique_suffix(at, content)
    )
}

/// `YYYYMMDDTHHMMSS.mmmZ`: how a key spells a time (sortable as text).
fn stamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at)
        .to_string()
        .replace(['-', ':'], "")
}

/// A record's `writtenAt` as its key spells it.
fn stamp_of(written_at: &str) -> Option<String> {
    humantime::parse_rfc3339(written_at).ok().map(stamp)
}

/// The host and time stamp a record key names, if it is one.
fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(HISTORY_PREFIX)?.strip_suffix(".json")?;
    let (host, name) = rest.split_once('/')?;
    let (stamp, _nonce) = name.rsplit_once('-')?;
    (!host.is_empty() && !stamp.is_empty() && !name.contains('/')).then_some((host, stamp))
}

/// Write `record` as a new object (never replacing one); its key.
pub async fn write(store: &impl ObjectStore, record: &HistoryRecord) -> Result<String, Error> {
    let bytes = serde_json::to_vec_pretty(record).expect("a record serialises");
    let at = humantime::parse_rfc3339(&record.written_at).unwrap_or_else(|_| SystemTime::now());
    let key = record_key(&record.host, at, &bytes);
    store.put(&key, bytes, Precondition::IfAbsent).await?;
    Ok(key)
}

/// Keep the newest `keep` records of `host`, delete the rest, and any key dated more than
/// a day ahead of now (no run of this host wrote it: it would push real records out);
/// how many were deleted.
pub async fn prune(store: &impl ObjectStore, host: &str, keep: usize) -> Result<usize, Error> {
    let horizon = stamp(SystemTime::now() + Duration::from_secs(86_400));
    let keys = record_keys(store, Some(host)).await?;
    let (ahead, keys): (Vec<String>, Vec<String>) = keys
        .into_iter()
        .partition(|k| parse_key(k).is_some_and(|(_, s)| s > horizon.as_str()));
    let old: Vec<&String> = keys.iter().skip(keep).chain(&ahead).collect();
    for key in &old {
        store.delete(key).await?;
    }
    Ok(old.len())
}

/// The record keys of `host` (or every host), newest first.
async fn record_keys(store: &impl ObjectStore, host: Option<&str>) -> Result<Vec<String>, Error> {
    let prefix = host.map_or_else(|| HISTORY_PREFIX.to_owned(), host_prefix);
    let mut keys: Vec<String> = store
        .list(&prefix)
        .await?
        .into_iter()
        .filter(|k| parse_key(k).is_some_and(|(h, _)| host.is_none_or(|want| want == h)))
        .collect();
    keys.sort_by(|a, b| {
        let stamp = |k: &str| parse_key(k).map(|(_, s)| s.to_owned()).unwrap_or_default();
        (stamp(b), b).cmp(&(stamp(a), a))
    });
    Ok(keys)
}

/// Which events [`read`] returns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub host: Option<String>,
    pub service: Option<String>,
    /// At most this many events (the newest).
    pub limit: usize,
}

/// An event as found in the store, with how its record was judged.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredEvent {
    #[serde(flatten)]
    pub event: Event,
    /// The record it came from.
    pub object: String,
    pub verification: Verification,
}

/// What [`read`] found: the events, newest first, and what it left out.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Found {
    pub events: Vec<StoredEvent>,
    /// Records not counted: unreadable, oversized, or (given host keys) not signed by
    /// their host; one line each, not escaped.
    pub skipped: Vec<String>,
}

/// The most records one [`read`] looks at beyond its limit: planted empty or filtered-out
/// records cannot make it read the whole bucket.
pub const READ_SLACK: usize = 1000;

/// The newest events matching `filter`, reading records newest first (8 at a time) until
/// it has `filter.limit`, or has read `limit + READ_SLACK` records. Given `host_keys`, only
/// records their host signed count, each once.
pub async fn read(
    store: &impl ObjectStore,
    filter: &Filter,
    host_keys: Option<&[PublicKey]>,
) -> Result<Found, Error> {
    let keys = record_keys(store, filter.host.as_deref()).await?;
    let by_host = crate::status::HostKeys::new(host_keys);
    let mut found = Found::default();
    let budget = filter.limit.saturating_add(READ_SLACK);
    let more = keys.len() > budget;
    let mut records = stream::iter(keys.into_iter().take(budget).map(|key| async move {
        let fetched = store.get(&key, None).await;
        (key, fetched)
    }))
    .buffered(8);
    let mut signatures = std::collections::BTreeSet::new();
    while let Some((key, fetched)) = records.next().await {
        if found.events.len() >= filter.limit {
            return Ok(found);
        }
        let bytes = match fetched {
            Ok(Fetched::Found { bytes, .. }) => bytes,
            Ok(_) => continue,
            // One planted oversized record must not hide the others.
            Err(e @ crate::StoreError::TooLarge { .. }) => {
                found.skipped.push(format!("{key}: {e}"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let record: HistoryRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                found
                    .skipped
                    .push(format!("{key}: not a history record: {e}"));
                continue;
            }
        };
        let (object_host, object_stamp) = parse_key(&key).unwrap_or_default();
        // The key must name the host and the time the record says (both signed).
        let at_own_object = object_host == record.host
            && stamp_of(&record.written_at).as_deref() == Some(object_stamp);
        let mut verification = crate::status::verify_signed(
            at_own_object,
            &record.host,
            &record,
            by_host.of(&record.host),
        );
        // Every event must be of the host that signed the record.
        if record.events.iter().any(|e| e.host != record.host) {
            verification = Verification::WrongObject;
        }
        if host_keys.is_some() && !verification.is_verified() {
            found
                .skipped
                .push(format!("{key}: not counted, {verification}"));
            continue;
        }
        // A signed record copied under another name counts once.
        if let Some(sig) = &record.signature
            && !signatures.insert(sig.value.clone())
        {
            found
                .skipped
                .push(format!("{key}: a copy of another record"));
            continue;
        }
        let matching = record
            .events
            .into_iter()
            .rev()
            .filter(|e| filter.service.as_ref().is_none_or(|s| &e.service == s));
        for event in matching {
            if found.events.len() >= filter.limit {
                break;
            }
            found.events.push(StoredEvent {
                event,
                object: key.clone(),
                verification,
            });
        }
    }
    if more && found.events.len() < filter.limit {
        found.skipped.push(format!(
            "stopped after reading {budget} records; narrow it with --host or --service"
        ));
    }
    Ok(found)
}

/// `deploy-manifest history`: one line per event, newest first; every cell escaped.
pub fn render(events: &[StoredEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|s| {
            let e = &s.event;
            let detail = match (&e.error, e.phases.is_empty()) {
                (Some(error), _) => error.clone(),
                (None, false) => phases_text(&e.phases),
                (None, true) => String::new(),
            };
            vec![
                e.at.clone(),
                e.host.clone(),
                e.service.clone(),
                e.kind.to_string(),
                e.version.clone().unwrap_or_else(|| "-".into()),
                e.artifact.clone().unwrap_or_else(|| "-".into()),
                e.pushed_by.clone().unwrap_or_else(|| "-".into()),
                e.seconds.map_or_else(|| "-".into(), |s| format!("{s:.2}s")),
                detail,
            ]
        })
        .collect();
    crate::render::table(
        &[
            "APPLIED",
            "HOST",
            "SERVICE",
            "EVENT",
            "VERSION",
            "ARTIFACT",
            "PUSHED BY",
            "TOOK",
            "DETAIL",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileStore;

    fn event(host: &str, service: &str, kind: EventKind) -> Event {
        Event {
            version: Some("manifest-20261124T095900Z-3f2a9c1d".into()),
            pushed_by: Some("ben@laptop".into()),
            pushed_at: Some("2026-11-24T09:59:00Z".into()),
            artifact: Some("/nix/store/abc-hello".into()),
            phases: [(Phase::Fetch, 0.25), (Phase::Health, 1.5)].into(),
            seconds: Some(1.8),
            ..Event::new(host, service, kind, "2026-11-24T10:00:00Z".into())
        }
    }

    /// Every event in the store, newest first.
    async fn all(store: &FileStore, host_keys: Option<&[PublicKey]>) -> Found {
        let filter = Filter {
            limit: 10,
            ..Filter::default()
        };
        read(store, &filter, host_keys).await.unwrap()
    }

    /// A record written when its last event happened.
    fn record(host: &str, events: Vec<Event>) -> HistoryRecord {
        HistoryRecord {
            schema_version: 1,
            host: host.into(),
            written_at: events
                .last()
                .map_or("2026-11-24T10:00:00Z".into(), |e| e.at.clone()),
            events,
            signature: None,
        }
    }

    async fn store() -> (tempfile::TempDir, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&format!("file://{}/store", dir.path().display())).unwrap();
        (dir, store)
    }

    #[test]
    fn keys_sort_by_time_and_name_their_host() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123);
        let key = record_key("web-1", t, b"x");
        assert!(
            key.starts_with("history/web-1/20260921T141320.123Z-"),
            "{key}"
        );
        assert_eq!(parse_key(&key).map(|(h, _)| h), Some("web-1"));
        let later = record_key("web-1", t + Duration::from_millis(1), b"x");
        assert!(later > key);
        assert_eq!(parse_key("history/a/b/c-d.json"), None);
        assert_eq!(parse_key("status/a.json"), None);
    }

    #[tokio::test]
    async fn read_returns_the_newest_first_filtered_and_prune_keeps_the_newest() {
        let (_dir, store) = store().await;
        for (i, host) in ["a", "b", "a", "a"].iter().enumerate() {
            let mut e = event(
                host,
                if i == 2 { "web" } else { "api" },
                EventKind::Deployed,
            );
            e.at = format!("2026-11-24T10:00:0{i}Z");
            write(&store, &record(host, vec![e])).await.unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let newest_first = all(&store, None).await;
        let ats: Vec<&str> = newest_first
            .events
            .iter()
            .map(|s| s.event.at.as_str())
            .collect();
        assert_eq!(
            ats,
            [
                "2026-11-24T10:00:03Z",
                "2026-11-24T10:00:02Z",
                "2026-11-24T10:00:01Z",
                "2026-11-24T10:00:00Z"
            ]
        );
        let filter = Filter {
            host: Some("a".into()),
            service: Some("api".into()),
            limit: 1,
        };
        let one = read(&store, &filter, None).await.unwrap();
        assert_eq!(one.events.len(), 1);
        assert_eq!(one.events[0].event.at, "2026-11-24T10:00:03Z");

        assert_eq!(prune(&store, "a", 1).await.unwrap(), 2);
        let left = all(&store, None).await;
        let left: Vec<(&str, &str)> = left
            .events
            .iter()
            .map(|s| (s.event.host.as_str(), s.event.at.as_str()))
            .collect();
        assert_eq!(
            left,
            [("a", "2026-11-24T10:00:03Z"), ("b", "2026-11-24T10:00:01Z")]
        );
    }

    #[tokio::test]
    async fn with_host_keys_only_records_their_host_signed_count() {
        let (_dir, store) = store().await;
        let key = crate::sign::SecretKey::generate("a").unwrap();
        let mut good = record("a", vec![event("a", "api", EventKind::Deployed)]);
        key.sign_json(&mut good);
        write(&store, &good).await.unwrap();
        // A bucket writer's: unsigned, signed by another key of that name, an event of
        // another host inside a signed record, and a record put under another host's path.
        let mut forged = record("a", vec![event("a", "api", EventKind::RolledBack)]);
        write(&store, &forged).await.unwrap();
        crate::sign::SecretKey::generate("a")
            .unwrap()
            .sign_json(&mut forged);
        write(&store, &forged).await.unwrap();
        let mut smuggled = record("a", vec![event("b", "api", EventKind::Removed)]);
        key.sign_json(&mut smuggled);
        write(&store, &smuggled).await.unwrap();
        let bytes = serde_json::to_vec(&good).unwrap();
        store
            .put(
                "history/b/20261124T100000.000Z-00000000.json",
                bytes.clone(),
                Precondition::None,
            )
            .await
            .unwrap();
        // The host's own signed record, copied under a later time: it would show as the
        // newest, and push real records out of the history.
        store
            .put(
                "history/a/99991231T000000.000Z-00000000.json",
                bytes,
                Precondition::None,
            )
            .await
            .unwrap();
        let keys = [key.public()];
        let found = all(&store, Some(&keys)).await;
        let kinds: Vec<(&str, EventKind)> = found
            .events
            .iter()
            .map(|s| (s.event.host.as_str(), s.event.kind))
            .collect();
        assert_eq!(kinds, [("a", EventKind::Deployed)]);
        assert_eq!(found.skipped.len(), 5, "{:?}", found.skipped);
        assert!(
            found.skipped[0].starts_with("history/a/99991231T"),
            "{:?}",
            found.skipped
        );
        // Without keys, everything shows, marked unchecked, each signed record once (the
        // two copies of the good one as one).
        let everything = all(&store, None).await;
        assert_eq!(everything.events.len(), 4);
        assert!(
            everything
                .events
                .iter()
                .all(|s| s.verification != Verification::Verified)
        );
        // Pruning to 10 keeps the real records and drops the one dated ahead.
        assert_eq!(prune(&store, "a", 10).await.unwrap(), 1);
        let keys = record_keys(&store, Some("a")).await.unwrap();
        assert_eq!(keys.len(), 4);
        assert!(!keys.iter().any(|k| k.contains("9999")), "{keys:?}");
    }

    #[test]
    fn the_table_escapes_what_records_say() {
        let mut e = event("a\u{1b}[2J", "api", EventKind::RolledBack);
        e.error = Some("boom\n\u{1b}]0;title\u{7}".into());
        let text = render(&[StoredEvent {
            event: e,
            object: "history/a/x-y.json".into(),
            verification: Verification::Unchecked,
        }]);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn a_record_matches_the_schema() {
        let schema: serde_json::Value = serde_json::from_str(HISTORY_SCHEMA).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let mut e = event("a", "api", EventKind::RolledBack);
        e.error = Some("health".into());
        e.log = vec!["line".into()];
        e.previous = Some("/nix/store/old".into());
        let mut r = record("a", vec![e, event("a", "web", EventKind::Deployed)]);
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
        extra["events"][0]["typo"] = serde_json::json!(1);
        assert!(!validator.is_valid(&extra));
        let mut bad = value;
        bad["events"][0]["phases"]["nap"] = serde_json::json!(1);
        assert!(!validator.is_valid(&bad));
    }
}
