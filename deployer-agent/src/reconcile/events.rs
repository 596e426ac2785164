//! What a run tells the outside beyond its report: an [`Event`] for each thing that
//! happened to a service (pure: [`event_of`]), written as one signed record to the store's
//! history (`history/<host>/…`) and handed to the notifications.
//!
//! A record the store did not take (unreachable, out of time) waits in
//! `<state>/history-spool/` and is written by the next run; an idle run with an empty
//! spool costs no store request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use deploy_manifest::history::{self, Event, EventKind, HistoryRecord, Phases};
use deploy_manifest::model::Manifest;
use deploy_manifest::store::ObjectStore;

use super::{Agent, Outcome, now};
use crate::host::Host;
use crate::state::State;

/// The directory of history records not yet written.
pub const SPOOL_DIR: &str = "history-spool";
/// The most records kept waiting there (the oldest go first).
const SPOOL_MAX: usize = 100;

/// What a deploy step adds to its event.
#[derive(Debug, Clone, Default)]
pub(super) struct Detail {
    pub phases: Phases,
    pub log: Vec<String>,
    /// The artifact it deployed and the one that ran before (labels).
    pub artifact: Option<String>,
    pub previous: Option<String>,
    /// A revert of a staged rollout: the version it went back to.
    pub reverted_to: Option<Option<String>>,
}

/// The event `outcome` makes for `service`, if it is news. A failure (or a repair) that is
/// the same as the last one told for this service (`state.told`, compared without the
/// numbers and paths that differ from run to run) is not: it repeats every run until
/// something changes. A run that read the manifest and kept the service as it was forgets
/// what was told (a run that could not read it proves nothing).
pub(super) fn event_of(
    host: &str,
    service: &str,
    outcome: &Outcome,
    detail: Option<Detail>,
    took: Duration,
    manifest: Option<&Manifest>,
    state: &mut State,
) -> Option<Event> {
    let detail = detail.unwrap_or_default();
    let (kind, error) = match outcome {
        Outcome::Deployed if detail.reverted_to.is_some() => (EventKind::Reverted, None),
        Outcome::Deployed => (EventKind::Deployed, None),
        Outcome::Repaired => (EventKind::Repaired, None),
        Outcome::Removed => (EventKind::Removed, None),
        Outcome::RolledBack { error } => (EventKind::RolledBack, Some(error)),
        Outcome::Retrying { error } | Outcome::NotRemoved { error } => {
            (EventKind::Failed, Some(error))
        }
        Outcome::Drifted { error } | Outcome::Unhealthy { error } => {
            (EventKind::Unhealthy, Some(error))
        }
        Outcome::Kept => {
            if manifest.is_some() {
                state.told.remove(service);
            }
            return None;
        }
        Outcome::Skipped | Outcome::Held { .. } => return None,
    };
    // A rollback is news every time (its spec is not tried again); a failure, or a
    // repair (a crash loop is repaired every run), that repeats is told once.
    let repeats = match (error, kind) {
        (_, EventKind::RolledBack) => None,
        (Some(error), _) => Some(format!("{kind}: {}", gist(error))),
        (None, EventKind::Repaired) => Some(kind.to_string()),
        (None, _) => None,
    };
    match repeats {
        Some(told) if state.told.get(service) == Some(&told) => return None,
        Some(told) => {
            state.told.insert(service.to_owned(), told);
        }
        None if kind == EventKind::RolledBack => {
            state.told.insert(service.to_owned(), kind.to_string());
        }
        None => {
            state.told.remove(service);
        }
    }
    let deployed = matches!(
        kind,
        EventKind::Deployed | EventKind::Reverted | EventKind::RolledBack
    );
    let (version, pushed) = match &detail.reverted_to {
        Some(version) => (version.clone(), None),
        None => (
            manifest.and_then(|m| m.version.clone()),
            manifest.filter(|_| deployed || kind == EventKind::Failed),
        ),
    };
    Some(Event {
        version: version.filter(|_| kind != EventKind::Removed),
        pushed_by: pushed.and_then(|m| m.created_by.clone()),
        pushed_at: pushed.and_then(|m| m.created_at.clone()),
        artifact: detail.artifact,
        previous: detail.previous,
        phases: detail.phases,
        seconds: deployed.then(|| history::seconds(took)),
        error: error.cloned(),
        log: detail.log,
        ..Event::new(host, service, kind, now())
    })
}

/// What stays the same when a failure repeats: its words, without the numbers (restart
/// counts, sizes, seconds) and paths (temporary files) that differ from run to run.
fn gist(error: &str) -> String {
    error
        .split_whitespace()
        .map(|w| if w.contains('/') { "…" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
        .replace(|c: char| c.is_ascii_digit(), "")
}

impl<S: ObjectStore, H: Host> Agent<S, H> {
    /// Write this run's events as one signed history record, after any records an earlier
    /// run could not write; prune the host's history to `--history-keep`. A record the
    /// store does not take waits in the spool. Failures are logged, not fatal.
    pub(super) async fn write_history(&self, events: &[Event]) {
        let spool = self.config.state_dir.join(SPOOL_DIR);
        let mut waiting = spooled(&spool);
        if events.is_empty() && waiting.is_empty() {
            return;
        }
        if !events.is_empty() {
            let mut record = HistoryRecord {
                schema_version: 1,
                host: self.config.host.clone(),
                written_at: humantime::format_rfc3339_millis(std::time::SystemTime::now())
                    .to_string(),
                events: events.to_vec(),
                signature: None,
            };
            match crate::report::host_key(&self.config.state_dir, &self.config.host) {
                Ok(key) => key.sign_json(&mut record),
                Err(e) => tracing::warn!(error = %e, "writing this history record unsigned"),
            }
            match spool_record(&spool, &record) {
                Ok(path) => waiting.push(path),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %spool.display(), "could not spool the history record; writing it directly");
                    if let Err(e) = history::write(&self.store, &record).await {
                        tracing::warn!(error = %e, "could not write the history record; its events are lost from the history");
                    }
                }
            }
        }
        let mut wrote = false;
        for path in waiting {
            let record = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<HistoryRecord>(&b).ok());
            let Some(record) = record else {
                tracing::warn!(path = %path.display(), "dropping an unreadable spooled history record");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            match history::write(&self.store, &record).await {
                Ok(key) => {
                    tracing::debug!(%key, "history written");
                    let _ = std::fs::remove_file(&path);
                    wrote = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not write to the history; the next run retries");
                    break;
                }
            }
        }
        if wrote
            && let Err(e) =
                history::prune(&self.store, &self.config.host, self.config.history_keep).await
        {
            tracing::warn!(error = %e, "could not prune this host's history");
        }
    }
}

/// The spooled records, oldest first.
fn spooled(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
}

/// Keep `record` in the spool (mode 600, atomically) until the store takes it; the
/// oldest records beyond [`SPOOL_MAX`] are dropped.
fn spool_record(dir: &Path, record: &HistoryRecord) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let existing = spooled(dir);
    for old in existing
        .iter()
        .take((existing.len() + 1).saturating_sub(SPOOL_MAX))
    {
        tracing::warn!(path = %old.display(), "the history spool is full: dropping its oldest record");
        let _ = std::fs::remove_file(old);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let path = dir.join(format!("{nanos:024}.json"));
    let bytes = serde_json::to_vec(record).expect("a record serialises");
    deploy_manifest::fsutil::write_atomically(&path, &bytes, 0o600)?;
    Ok(path)
}
