//! What the agent tells the outside after a run: `status/<host>.json` in the store and a
//! Prometheus text file. Both are built from `state.json`, which holds no secret.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use deploy_manifest::repo::rfc3339;
use deploy_manifest::status::{HostReport, ServiceReport};
use sha2::{Digest, Sha256};

use crate::state::{Health, State};

fn health(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
        Health::Unknown => "unknown",
    }
}

pub fn host_report(state: &State, interval: Duration) -> HostReport {
    HostReport {
        schema_version: 1,
        host: state.host.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        reported_at: rfc3339(SystemTime::now()),
        interval_seconds: interval.as_secs(),
        manifest_version: state.manifest_version.clone(),
        last_poll: state.last_poll.clone(),
        last_success: state.last_success.clone(),
        last_error: state.last_error.clone(),
        services: state
            .services
            .iter()
            .map(|(name, s)| {
                (
                    name.clone(),
                    ServiceReport {
                        artifact: s.current.as_ref().map(|g| g.artifact.clone()),
                        version: s.current.as_ref().and_then(|g| g.version.clone()),
                        health: health(s.health).to_owned(),
                        deployed_at: s.current.as_ref().map(|g| g.deployed_at.clone()),
                        failed_artifact: s.failed.as_ref().map(|f| f.artifact.clone()),
                        last_error: s.last_error.clone(),
                    },
                )
            })
            .collect(),
    }
}

/// A hash of what a report says, leaving out the times that change on every run.
pub fn report_hash(r: &HostReport) -> String {
    let mut r = r.clone();
    r.reported_at.clear();
    r.last_poll = None;
    r.last_success = None;
    let bytes = serde_json::to_vec(&r).expect("the report serialises");
    deploy_manifest::hex(&Sha256::digest(bytes))
}

/// The Prometheus text exposition of the last run, written atomically (what the
/// node_exporter textfile collector expects).
pub fn write_metrics(
    path: &Path,
    state: &State,
    restarts: &BTreeMap<String, u32>,
    took: Duration,
) -> std::io::Result<()> {
    let mut m = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(m, "{name}{labels} {value}");
        }
    };
    let last_success = state
        .last_success
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    family(
        "deployer_last_successful_poll_timestamp_seconds",
        "gauge",
        "Unix time of the last run that completed without errors.",
        vec![(String::new(), last_success.to_string())],
    );
    family(
        "deployer_run_duration_seconds",
        "gauge",
        "How long the last run took.",
        vec![(String::new(), format!("{:.3}", took.as_secs_f64()))],
    );
    let per_service = |f: &dyn Fn(&str, &crate::state::ServiceState) -> String| {
        state
            .services
            .iter()
            .map(|(name, s)| (format!("{{service=\"{name}\"}}"), f(name, s)))
            .collect::<Vec<_>>()
    };
    family(
        "deployer_service_healthy",
        "gauge",
        "1 if the service's current generation is healthy.",
        per_service(&|_, s| u8::from(s.health == Health::Healthy).to_string()),
    );
    family(
        "deployer_service_restarts",
        "gauge",
        "Automatic restarts of the service's unit since it was last started (systemd NRestarts).",
        per_service(&|name, _| restarts.get(name).copied().unwrap_or(0).to_string()),
    );
    family(
        "deployer_deploys_total",
        "counter",
        "Successful deploys of the service on this host.",
        per_service(&|_, s| s.deploys.to_string()),
    );
    family(
        "deployer_rollbacks_total",
        "counter",
        "Deploys of the service that failed and were rolled back on this host.",
        per_service(&|_, s| s.rollbacks.to_string()),
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    deploy_manifest::fsutil::write_atomically(path, m.as_bytes(), 0o644)
}
