//! What the agent tells the outside after a run: `status/<host>.json` in the store and a
//! Prometheus text file. Both are built from `state.json`, which holds no secret.
//!
//! The report is signed with this host's key, `<state dir>/host.key` (made on first use,
//! mode 600, named after the host), so that readers given its public half
//! (`deployer-agent host-key`) can tell it from one written in the host's name.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use deploy_manifest::repo::rfc3339;
use deploy_manifest::sign::{SecretKey, TrustError};
use deploy_manifest::status::{HostReport, ServiceReport};
use sha2::{Digest, Sha256};

use crate::AgentError;
use crate::state::{Health, State};

/// The host key's file name in the state directory.
pub const HOST_KEY_FILE: &str = "host.key";

/// This host's report signing key, `<state_dir>/host.key`, named `host`; made (mode 600,
/// never replaced) when missing. Refused: a key others can read or write, a file not owned
/// by this user, a symlink, or a key named after another host.
pub fn host_key(state_dir: &Path, host: &str) -> Result<SecretKey, AgentError> {
    use std::os::unix::fs::MetadataExt;
    let path = state_dir.join(HOST_KEY_FILE);
    let bad = |detail: String| {
        AgentError::Manifest(
            TrustError::BadKey {
                what: format!("host key {}", path.display()),
                detail,
            }
            .into(),
        )
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            match generate_host_key(state_dir, &path, host) {
                Ok(key) => return Ok(key),
                // Another process made it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::symlink_metadata(&path).map_err(|e| bad(e.to_string()))?
                }
                Err(e) => {
                    return Err(AgentError::io(
                        format!("making this host's key {}", path.display()),
                        e,
                    ));
                }
            }
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    if !meta.file_type().is_file() {
        return Err(bad("not a regular file (a symlink is not accepted)".into()));
    }
    let uid = crate::config::current_uid();
    if meta.uid() != uid {
        return Err(bad(format!(
            "owned by uid {}, not by this agent's uid {uid}; fix: chown {uid} {}",
            meta.uid(),
            path.display()
        )));
    }
    // Refuses a mode that lets others read it, with the chmod that fixes it.
    let key = SecretKey::load(&path).map_err(|e| AgentError::Manifest(e.into()))?;
    if key.name != host {
        return Err(bad(format!(
            "it is named {name:?}, but this host is {host:?}: readers verify a report only by the key named after its host; move it aside (mv {path} {path}.old) so that a new key is made, and give readers the new public key (deployer-agent host-key)",
            name = key.name,
            path = path.display()
        )));
    }
    Ok(key)
}

/// Make the key in a temporary file (mode 600) and link it into place: a crash never leaves
/// half a key, and an existing key is never replaced (`AlreadyExists`).
fn generate_host_key(state_dir: &Path, path: &Path, host: &str) -> std::io::Result<SecretKey> {
    use std::io::Write;
    std::fs::create_dir_all(state_dir)?;
    let key = SecretKey::generate(host)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".host.key.")
        .tempfile_in(state_dir)?;
    writeln!(tmp, "{}", key.to_text())?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(path).map_err(|e| e.error)?;
    tracing::info!(
        public_key = %key.public().to_text(),
        path = %path.display(),
        "made this host's key for signing its reports; give the public key to readers (deploy-manifest status --host-keys, push --wait --host-keys)"
    );
    Ok(key)
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Unhealthy => "unhealthy",
        Health::Unknown => "unknown",
    }
}

/// The most bytes of failure logs one report carries, all services together: a report
/// stays far below the readers' object cap however many services fail at once (the
/// services past it report their error without the log; `state.json` and the history
/// keep it).
pub const REPORT_LOG_BUDGET: usize = 512 * 1024;

pub fn host_report(state: &State, interval: Duration) -> HostReport {
    let mut budget = REPORT_LOG_BUDGET;
    let mut log_of = |s: &crate::state::ServiceState| {
        let log = s.failed.as_ref().map(|f| f.log.clone()).unwrap_or_default();
        let size: usize = log.iter().map(String::len).sum();
        if size > budget {
            return vec!["(log left out: this report carries at most 512 KiB of logs; see deploy-manifest history --logs)".to_owned()];
        }
        budget -= size;
        log
    };
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
        expired: state.expired.clone(),
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
                        phases: s.phases.clone(),
                        log: log_of(s),
                    },
                )
            })
            .collect(),
        signature: None,
    }
}

/// A hash of what a report says, leaving out the times that change on every run.
pub fn report_hash(r: &HostReport) -> String {
    let mut r = r.clone();
    r.reported_at.clear();
    r.last_poll = None;
    r.last_success = None;
    // Which key signed it counts (a newly signed report is news); the value changes with
    // the times and does not.
    if let Some(sig) = &mut r.signature {
        sig.value.clear();
    }
    let bytes = serde_json::to_vec(&r).expect("the report serialises");
    deploy_manifest::hex(&Sha256::digest(bytes))
}

/// A label value as the exposition format wants it: `\`, `"` and newlines escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
        "deployer_manifest_expired",
        "gauge",
        "1 while the newest signed manifest this host saw has expired (nothing new is applied; run `deploy-manifest refresh`).",
        vec![(String::new(), u8::from(state.expired.is_some()).to_string())],
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
    family(
        "deployer_service_info",
        "gauge",
        "1 per service: the manifest version and artifact its current generation runs.",
        state
            .services
            .iter()
            .filter_map(|(name, s)| {
                let g = s.current.as_ref()?;
                Some((
                    format!(
                        "{{service=\"{name}\",version=\"{}\",artifact=\"{}\"}}",
                        label_value(g.version.as_deref().unwrap_or("")),
                        label_value(&g.artifact.label())
                    ),
                    "1".to_owned(),
                ))
            })
            .collect(),
    );
    family(
        "deployer_last_deploy_phase_seconds",
        "gauge",
        "Seconds each phase of the service's last deploy took.",
        state
            .services
            .iter()
            .flat_map(|(name, s)| {
                s.phases.iter().map(move |(phase, secs)| {
                    (
                        format!("{{service=\"{name}\",phase=\"{}\"}}", phase.name()),
                        format!("{secs:.3}"),
                    )
                })
            })
            .collect(),
    );
    let mut buckets = Vec::new();
    for (phase, h) in &state.phase_histogram {
        let p = phase.name();
        for (bound, count) in crate::state::Histogram::BUCKETS.iter().zip(&h.buckets) {
            buckets.push((
                format!("_bucket{{phase=\"{p}\",le=\"{bound}\"}}"),
                count.to_string(),
            ));
        }
        buckets.push((
            format!("_bucket{{phase=\"{p}\",le=\"+Inf\"}}"),
            h.count.to_string(),
        ));
        buckets.push((format!("_sum{{phase=\"{p}\"}}"), format!("{:.3}", h.sum)));
        buckets.push((format!("_count{{phase=\"{p}\"}}"), h.count.to_string()));
    }
    family(
        "deployer_deploy_phase_seconds",
        "histogram",
        "Seconds per phase (fetch, infrastructure, release, restart, health, route) of every deploy on this host.",
        buckets,
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    deploy_manifest::fsutil::write_atomically(path, m.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn refused(state_dir: &Path, host: &str) -> String {
        match host_key(state_dir, host) {
            Ok(_) => panic!("the key at {} was accepted", state_dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_host_key_is_made_once_private_and_named_after_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let key = host_key(&state_dir, "host-a").unwrap();
        assert_eq!(key.name, "host-a");
        let path = state_dir.join(HOST_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = host_key(&state_dir, "host-a").unwrap();
        assert_eq!(again.public(), key.public(), "kept, not replaced");

        // Signs reports that verify with its public half, named after the host.
        let state = State::load(&state_dir, "host-a").unwrap();
        let mut report = host_report(&state, Duration::from_secs(300));
        let unsigned_hash = report_hash(&report);
        key.sign_json(&mut report);
        assert_ne!(report_hash(&report), unsigned_hash, "signing is news");
        let keys = [key.public()];
        assert_eq!(
            deploy_manifest::status::verify_report("status/host-a.json", &report, Some(&keys)),
            deploy_manifest::status::Verification::Verified
        );

        let err = refused(&state_dir, "host-b");
        assert!(
            err.contains("named \"host-a\"") && err.contains("mv "),
            "{err}"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = refused(&state_dir, "host-a");
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

        let link_dir = dir.path().join("other");
        std::fs::create_dir(&link_dir).unwrap();
        std::os::unix::fs::symlink(&path, link_dir.join(HOST_KEY_FILE)).unwrap();
        let err = refused(&link_dir, "host-a");
        assert!(err.contains("symlink"), "{err}");
    }
}
