//! `state.json`: what this host runs, as the agent last left it. Written atomically (temp
//! file, fsync, rename), so a crash at any point leaves the old state or the new one, never
//! a torn file. The schema is `schemas/state.schema.json`. No secret is ever stored here.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use deploy_manifest::history::{Phase, Phases};
use deploy_manifest::model::Artifact;
use serde::{Deserialize, Serialize};

use crate::AgentError;

pub const STATE_FILE: &str = "state.json";

/// The state schema, as committed in `schemas/state.schema.json`.
pub const STATE_SCHEMA: &str = include_str!("../../schemas/state.schema.json");

/// Check a state document against the schema; the problems as `pointer: message`.
pub fn validate(state: &serde_json::Value) -> Result<(), Vec<String>> {
    let schema: serde_json::Value = serde_json::from_str(STATE_SCHEMA).expect("the schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the schema is valid");
    let problems: Vec<String> = validator
        .iter_errors(state)
        .map(|e| format!("{}: {e}", e.instance_path().as_str()))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}
const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct State {
    pub schema_version: u32,
    pub host: String,
    /// The manifest version last applied (fully or with per-service failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_version: Option<String>,
    /// When that manifest was written (information only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_created_at: Option<String>,
    /// Its signed sequence (see also `applied.json`, which outlives this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sequence: Option<u64>,
    /// Its signed expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_expires: Option<String>,
    /// Set while the newest manifest this host saw has expired (with trusted keys): the
    /// expiry that passed. The host keeps running what it runs and reports `expired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<String>,
    /// The ETag `manifest.json` had then: the next poll sends it as `If-None-Match`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When `status/<host>.json` was last written, and a hash of what it said (without
    /// times): it is rewritten when that changes, or as a heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_hash: Option<String>,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceState>,
    /// Infrastructure services this agent runs (their unit files).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub infra: BTreeMap<String, InfraState>,
    /// Redis DB index per service; kept after a service is removed so no other service
    /// ever gets its data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redis_indexes: BTreeMap<String, u32>,
    /// Data left behind by removed services (databases, Redis indexes): never dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orphans: Vec<String>,
    /// Per service, the last failure written to the history: a failure that repeats every
    /// run (a missing secrets file, an unreachable artifact) is told once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub told: BTreeMap<String, String>,
    /// `deployer_deploy_phase_seconds`: the phases of every deploy on this host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phase_histogram: BTreeMap<Phase, Histogram>,
}

/// A Prometheus histogram: counts per bucket of [`Histogram::BUCKETS`] (cumulative, as
/// exposed: `le`), their count and sum.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    /// Upper bounds in seconds (`+Inf` is `count`).
    pub const BUCKETS: [f64; 11] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

    pub fn observe(&mut self, seconds: f64) {
        self.buckets.resize(Self::BUCKETS.len(), 0);
        for (count, bound) in self.buckets.iter_mut().zip(Self::BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InfraState {
    pub unit: String,
    pub unit_file: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceState {
    /// The unit it runs as, e.g. `hello.service` (`deployer-hello.service` from an older
    /// agent, until the next full run renames it).
    pub unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Generation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Generation>,
    pub health: Health,
    /// A deploy that failed; its spec is not tried again until the manifest changes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// What is wrong without stopping the service (a secrets file others may read), as of
    /// the last run; every run checks again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// The artifact whose release command last succeeded (it runs once per artifact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Artifact>,
    /// Seconds per phase of its last deploy (the one that failed, if it failed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phases: Phases,
    /// Its part in the staged rollout of a version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutMark>,
    /// Successful deploys and rolled-back ones on this host (metrics counters).
    #[serde(default)]
    pub deploys: u64,
    #[serde(default)]
    pub rollbacks: u64,
}

/// A service's part in the staged rollout of one version (its spec hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutMark {
    pub spec_hash: String,
    pub stage: RolloutStage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RolloutStage {
    /// Deployed through its gate over a generation that ran here: the host watches the
    /// rollout until it is done, and an abort returns it to that generation.
    Deployed,
    /// Deployed through its gate as the service's first generation here: an abort removes it.
    First,
    /// The rollout is done (or this host's part in it ended): its objects are not read again.
    Done,
}

/// One deployed generation of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Generation {
    pub artifact: Artifact,
    /// Where the artifact is on this host.
    pub path: String,
    /// sha256 of the service's manifest entry: any change to it is a new generation.
    pub spec_hash: String,
    /// The manifest version it came from.
    pub version: Option<String>,
    pub deployed_at: String,
    /// The generated unit file (no secrets: those stay in the env file).
    pub unit_file: String,
    /// The unit it runs as, when not the service's default `<name>.service`
    /// (zero-downtime generations run as `<name>.<port>.service`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The proxy route to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteState {
    pub domain: String,
    pub path: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Failure {
    pub spec_hash: String,
    pub artifact: Artifact,
    pub version: Option<String>,
    pub error: String,
    pub at: String,
    /// The last lines the failed unit logged, secrets masked ([`crate::evidence`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
    #[default]
    Unknown,
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Read the state; a missing file is a fresh host.
    pub fn load(state_dir: &Path, host: &str) -> Result<State, AgentError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut state: State =
                    serde_json::from_slice(&bytes).map_err(|e| AgentError::State {
                        path: path.display().to_string(),
                        detail: format!(
                            "{e}; it is not valid agent state: move it aside to start fresh (running services are kept, the next run re-deploys)"
                        ),
                    })?;
                // Written by an agent that named a service's unit `deployer-<service>.service`:
                // the next run plans in full (not a 304 poll), which renames those units (not
                // with an expired manifest, which a full poll would refuse).
                if state.expired.is_none()
                    && state
                        .services
                        .iter()
                        .any(|(name, s)| s.unit == crate::names::legacy_service_unit(name))
                {
                    state.manifest_etag = None;
                }
                Ok(state)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(State {
                schema_version: 1,
                host: host.to_owned(),
                ..State::default()
            }),
            Err(e) => Err(AgentError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Write the state atomically, readable by its owner only: it holds the failed units'
    /// log tails (masked, but a service's output all the same).
    pub fn save(&self, state_dir: &Path) -> Result<(), AgentError> {
        let path = Self::path(state_dir);
        let mut bytes = serde_json::to_vec_pretty(self).expect("the state serialises");
        bytes.push(b'\n');
        deploy_manifest::fsutil::write_atomically(&path, &bytes, 0o600)
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
    }
}

/// `applied.json`, beside `state.json`: the newest manifest sequence this host accepted
/// with trusted keys. It is the floor for the next one (anti-replay) and is kept apart so
/// that moving a corrupt `state.json` aside does not lower it.
pub const APPLIED_FILE: &str = "applied.json";

/// The floor a manifest's sequence must exceed: the higher of `applied.json` and the
/// state's record.
pub fn applied_floor(
    state_dir: &Path,
    state: &State,
) -> Result<Option<deploy_manifest::sign::Applied>, AgentError> {
    let path = state_dir.join(APPLIED_FILE);
    let file = match std::fs::read(&path) {
        Ok(bytes) => Some(
            serde_json::from_slice::<deploy_manifest::sign::Applied>(&bytes).map_err(|e| {
                AgentError::State {
                    path: path.display().to_string(),
                    detail: format!(
                        "{e}; it holds the newest manifest sequence this host accepted (replay protection): restore it from a backup, or write {{\"version\": \"<applied version>\", \"sequence\": <its sequence>}} from `deploy-manifest verify --all`"
                    ),
                }
            })?,
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(AgentError::io(format!("reading {}", path.display()), e)),
    };
    let from_state = state
        .manifest_version
        .clone()
        .zip(state.manifest_sequence)
        .map(|(version, sequence)| deploy_manifest::sign::Applied { version, sequence });
    Ok([file, from_state]
        .into_iter()
        .flatten()
        .max_by_key(|a| a.sequence))
}

/// Raise the floor to `applied` (never lowers it).
pub fn record_applied(
    state_dir: &Path,
    applied: &deploy_manifest::sign::Applied,
) -> Result<(), AgentError> {
    let path = state_dir.join(APPLIED_FILE);
    let current = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<deploy_manifest::sign::Applied>(&b).ok());
    if current.is_some_and(|c| c.sequence >= applied.sequence) {
        return Ok(());
    }
    let bytes = serde_json::to_vec_pretty(applied).expect("serialises");
    deploy_manifest::fsutil::write_atomically(&path, &bytes, 0o644)
        .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
}

/// An exclusive lock on the state directory: one run at a time. Held until dropped.
pub struct RunLock(#[allow(dead_code)] File);

impl RunLock {
    pub fn acquire(state_dir: &Path) -> Result<RunLock, AgentError> {
        let path = state_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| AgentError::io(format!("opening {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::Busy {
                lock: path.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(AgentError::io(format!("locking {}", path.display()), e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploy_manifest::model::ArchiveRef;

    /// Every field set, struct literals without `..`: a new field must be added here, and
    /// then the schema must allow it.
    /// A state an older agent wrote (a service's unit `deployer-<service>.service`) is
    /// planned in full on the next run, which renames the unit: its ETag is forgotten.
    #[test]
    fn a_state_naming_units_the_old_way_forgets_its_etag() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State {
            manifest_etag: Some("\"e\"".into()),
            ..State::default()
        };
        state.services.insert(
            "a".into(),
            ServiceState {
                unit: "a.service".into(),
                ..ServiceState::default()
            },
        );
        state.save(dir.path()).unwrap();
        let loaded = State::load(dir.path(), "biz").unwrap();
        assert_eq!(loaded.manifest_etag.as_deref(), Some("\"e\""));
        state.services.get_mut("a").unwrap().unit = "deployer-a.service".into();
        state.save(dir.path()).unwrap();
        let loaded = State::load(dir.path(), "biz").unwrap();
        assert_eq!(loaded.manifest_etag, None);
        assert_eq!(loaded.services["a"].unit, "deployer-a.service");
    }

    #[test]
    fn a_full_state_matches_the_schema() {
        let generation = Generation {
            artifact: Artifact::Archive(ArchiveRef {
                sha256: "a".repeat(64),
                name: "hello".into(),
                size: 1,
                format: None,
            }),
            path: "/var/lib/deployer/store/x".into(),
            spec_hash: "b".repeat(64),
            version: Some("manifest-20261122T140000Z-3f2a9c1d".into()),
            deployed_at: "2026-11-22T14:00:00Z".into(),
            unit_file: "[Unit]\n".into(),
            unit: Some("deployer-hello-20000.service".into()),
            route: Some(RouteState {
                domain: "hello.test".into(),
                path: "/".into(),
                port: 20000,
            }),
        };
        let state = State {
            schema_version: 1,
            host: "biz".into(),
            manifest_version: Some("manifest-20261122T140000Z-3f2a9c1d".into()),
            manifest_etag: Some("\"e\"".into()),
            manifest_created_at: Some("2026-11-22T14:00:00Z".into()),
            manifest_sequence: Some(7),
            manifest_expires: Some("2026-12-22T14:00:00Z".into()),
            expired: Some("2026-12-22T14:00:00Z".into()),
            last_poll: Some("2026-11-22T14:00:00Z".into()),
            last_success: Some("2026-11-22T14:00:00Z".into()),
            last_error: Some("x".into()),
            reported_at: Some("2026-11-22T14:00:00Z".into()),
            report_hash: Some("h".into()),
            services: [(
                "hello".to_owned(),
                ServiceState {
                    unit: "deployer-hello.service".into(),
                    current: Some(generation.clone()),
                    previous: Some(generation.clone()),
                    health: Health::Unhealthy,
                    failed: Some(Failure {
                        spec_hash: "c".repeat(64),
                        artifact: Artifact::StorePath("/nix/store/x".into()),
                        version: None,
                        error: "unhealthy".into(),
                        at: "2026-11-22T14:00:00Z".into(),
                        log: vec!["boom".into()],
                    }),
                    warning: Some("w".into()),
                    last_error: Some("unhealthy".into()),
                    updated_at: Some("2026-11-22T14:00:00Z".into()),
                    deploys: 3,
                    rollbacks: 1,
                    released: Some(Artifact::StorePath("/nix/store/x".into())),
                    rollout: Some(RolloutMark {
                        spec_hash: "b".repeat(64),
                        stage: RolloutStage::Deployed,
                    }),
                    phases: [(Phase::Fetch, 0.5), (Phase::Health, 2.0)].into(),
                },
            )]
            .into(),
            infra: [(
                "db".to_owned(),
                InfraState {
                    unit: "deployer-infra-db.service".into(),
                    unit_file: "[Unit]\n".into(),
                },
            )]
            .into(),
            redis_indexes: [("hello".to_owned(), 1)].into(),
            orphans: vec!["database gone (in db)".into()],
            told: [("hello".to_owned(), "failed: x".to_owned())].into(),
            phase_histogram: [(Phase::Restart, {
                let mut h = Histogram::default();
                h.observe(0.3);
                h
            })]
            .into(),
        };
        let value = serde_json::to_value(&state).unwrap();
        assert_eq!(validate(&value), Ok(()));
        let mut extra = value.clone();
        extra["services"]["hello"]["typo"] = serde_json::json!(1);
        assert!(
            validate(&extra).is_err(),
            "the schema rejects unknown fields"
        );
        assert_eq!(serde_json::from_value::<State>(value).unwrap(), state);
    }
}
