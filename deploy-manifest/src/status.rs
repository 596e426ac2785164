//! Fleet visibility through the store: every agent writes `status/<host>.json` (a
//! [`HostReport`], schema `schemas/status.schema.json`), and `deploy-manifest status` reads
//! them all. No server of our own: which version runs where is in the bucket.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, TryStreamExt, stream};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::model::{Artifact, Manifest};
use crate::store::{Fetched, ObjectStore};

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
    #[serde(default)]
    pub services: BTreeMap<String, ServiceReport>,
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
}

pub fn report_key(host: &str) -> String {
    format!("{STATUS_PREFIX}{host}.json")
}

/// Every host's last report (unreadable ones are skipped with a warning).
pub async fn read_reports(store: &impl ObjectStore) -> Result<Vec<HostReport>, Error> {
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
    let mut reports: Vec<HostReport> = fetched
        .into_iter()
        .filter_map(|(key, f)| match f {
            Fetched::Found { bytes, .. } => match serde_json::from_slice(&bytes) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "skipping an unreadable host report");
                    None
                }
            },
            _ => None,
        })
        .collect();
    reports.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(reports)
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
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostView {
    pub host: String,
    pub state: HostState,
    /// Seconds since the report was written.
    pub age_seconds: u64,
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
}

fn age(reported_at: &str, now: SystemTime) -> u64 {
    humantime::parse_rfc3339(reported_at)
        .ok()
        .and_then(|t| now.duration_since(t).ok())
        .unwrap_or(Duration::MAX)
        .as_secs()
}

/// Hosts × services, judged against `manifest` at `now`.
pub fn fleet(
    reports: &[HostReport],
    manifest: Option<&Manifest>,
    now: SystemTime,
) -> Vec<HostView> {
    reports
        .iter()
        .map(|r| {
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
                    }
                })
                .collect();
            let silent = age_seconds > 3 * r.interval_seconds.max(1);
            let failing = r.services.values().any(|s| {
                s.health == "unhealthy" || s.failed_artifact.is_some() || s.last_error.is_some()
            });
            let behind = r.last_error.is_some()
                || services.iter().any(|s| !s.current)
                || manifest.is_some_and(|m| r.manifest_version != m.version);
            HostView {
                host: r.host.clone(),
                state: if silent {
                    HostState::Silent
                } else if failing {
                    HostState::Failing
                } else if behind {
                    HostState::Behind
                } else {
                    HostState::Ok
                },
                age_seconds,
                manifest_version: r.manifest_version.clone(),
                services,
                last_error: r.last_error.clone(),
            }
        })
        .collect()
}

/// `deploy-manifest status`: one line per host and service.
pub fn render(view: &[HostView]) -> String {
    let mut rows = Vec::new();
    for h in view {
        let state = format!("{:?}", h.state).to_lowercase();
        let age =
            humantime::format_duration(Duration::from_secs(h.age_seconds.min(10 * 365 * 86400)))
                .to_string();
        let age = age.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        if h.services.is_empty() {
            rows.push(vec![
                h.host.clone(),
                state.clone(),
                age.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                h.last_error.clone().unwrap_or_default(),
            ]);
        }
        for s in &h.services {
            rows.push(vec![
                h.host.clone(),
                state.clone(),
                age.clone(),
                s.service.clone(),
                format!(
                    "{}{}",
                    s.artifact.clone().unwrap_or_else(|| "-".into()),
                    if s.current { "" } else { " (not current)" }
                ),
                s.health.clone(),
                s.last_error
                    .clone()
                    .or(h.last_error.clone())
                    .unwrap_or_default(),
            ]);
        }
    }
    crate::render::table(
        &[
            "HOST", "STATE", "REPORTED", "SERVICE", "ARTIFACT", "HEALTH", "ERROR",
        ],
        &rows,
    )
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
            services: [(
                "ava".to_owned(),
                ServiceReport {
                    artifact: Some(Artifact::StorePath(artifact.into())),
                    version: None,
                    health: health.into(),
                    deployed_at: None,
                    failed_artifact: None,
                    last_error: None,
                },
            )]
            .into(),
        }
    }

    #[test]
    fn hosts_are_ok_failing_behind_or_silent() {
        let mut m = Manifest::empty();
        m.version = Some("manifest-20261122T140000Z-3f2a9c1d".into());
        crate::edit::add_service(
            &mut m,
            &serde_json::json!({"name": "ava", "artifact": {"storePath": "/nix/store/new"}, "hosts": ["a", "b", "c", "d"]}),
        )
        .unwrap();
        m.version = Some("manifest-20261122T140000Z-3f2a9c1d".into());
        let reports = [
            report("a", 10, "healthy", "/nix/store/new"),
            report("b", 10, "unhealthy", "/nix/store/new"),
            report("c", 10, "healthy", "/nix/store/old"),
            report("d", 3 * 300 + 1, "healthy", "/nix/store/new"),
        ];
        let view = fleet(&reports, Some(&m), SystemTime::now());
        let states: Vec<HostState> = view.iter().map(|h| h.state).collect();
        assert_eq!(
            states,
            [
                HostState::Ok,
                HostState::Failing,
                HostState::Behind,
                HostState::Silent
            ]
        );
        let text = render(&view);
        assert!(text.contains("(not current)"), "{text}");
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
        let value = serde_json::to_value(&r).unwrap();
        let problems: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert_eq!(problems, Vec::<String>::new());
        let mut extra = value.clone();
        extra["services"]["ava"]["typo"] = serde_json::json!(1);
        assert!(!validator.is_valid(&extra));
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
