//! `state.json`: what this host runs, as the agent last left it. Written atomically (temp
//! file, fsync, rename), so a crash at any point leaves the old state or the new one, never
//! a torn file. The schema is `schemas/state.schema.json`. No secret is ever stored here.
//!
//! The generated unit file of each recorded generation is kept beside it, in `units/`,
//! named by its sha256 ([`UnitTexts`]): `state.json` records the hash, so that a run that
//! changes nothing reads and writes a small file. A text is written (and synced) before
//! the state that names it, and removed once no saved state names it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use deploy_manifest::fsutil::FileStamp;
use deploy_manifest::history::{Phase, Phases};
use deploy_manifest::model::Artifact;
use serde::{Deserialize, Serialize};

use crate::AgentError;

pub const STATE_FILE: &str = "state.json";
/// The schema version this agent writes; an older `state.json` is migrated when loaded.
pub const SCHEMA_VERSION: u32 = 2;

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
    /// The host's mode (`--mode`) at the last full run: another one plans in full again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
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
    /// Unit files a schema 1 state held inline (hash → text), not yet in `units/`: a run
    /// records them under its lock ([`State::record_migrated`]); a read-only command
    /// (`plan`, `status`, `fetch`) writes nothing.
    #[serde(skip)]
    pub migrated: BTreeMap<String, String>,
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
    /// The ports it was started with, where the agent picked them (a dedicated server
    /// without a declared port keeps its port from run to run).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
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
    /// What its generated env file was made from beyond its spec
    /// ([`crate::infra::endpoints_hash`]); none when it uses no infrastructure (or was
    /// deployed by an older agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra_hash: Option<String>,
    /// The manifest version it came from.
    pub version: Option<String>,
    pub deployed_at: String,
    /// sha256 of its generated unit file (no secrets: those stay in the env file), whose
    /// text is `units/<unitHash>` in the state directory.
    pub unit_hash: String,
    /// The unit file's `EnvironmentFile=`s, checked every run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_files: Vec<crate::unit::EnvFile>,
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
    /// The endpoints it was to be connected to ([`Generation::infra_hash`]): when they
    /// change, it is tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra_hash: Option<String>,
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

    /// Read the state; a missing file is a fresh host. One written by an older agent
    /// (schema version 1, unit files inline) is migrated in memory: its unit files are in
    /// [`State::migrated`] until a run records them; the next save writes the current
    /// version. One written by a newer agent is refused.
    pub fn load(state_dir: &Path, host: &str) -> Result<State, AgentError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let invalid = |e: &dyn std::fmt::Display| AgentError::State {
                    path: path.display().to_string(),
                    detail: format!(
                        "{e}; it is not valid agent state: move it aside to start fresh (running services are kept, the next run re-deploys)"
                    ),
                };
                let mut state: State = match serde_json::from_slice(&bytes) {
                    Ok(state) => state,
                    Err(e) => match migrate_v1(&bytes) {
                        Some((value, migrated)) => State {
                            migrated,
                            ..serde_json::from_value(value).map_err(|e| invalid(&e))?
                        },
                        None => return Err(invalid(&e)),
                    },
                };
                // Version 1 without a unit file to move parses as it is.
                if state.schema_version > SCHEMA_VERSION {
                    return Err(invalid(&format_args!(
                        "schema version {} was written by a newer agent (this one writes {SCHEMA_VERSION}): run that agent instead",
                        state.schema_version
                    )));
                }
                state.schema_version = SCHEMA_VERSION;
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
                schema_version: SCHEMA_VERSION,
                host: host.to_owned(),
                ..State::default()
            }),
            Err(e) => Err(AgentError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Write the state atomically, readable by its owner only: it holds the failed units'
    /// log tails (masked, but a service's output all the same).
    /// Compact JSON (`jq . state.json` shows it indented): it is read and written every run.
    pub fn save(&self, state_dir: &Path) -> Result<(), AgentError> {
        let path = Self::path(state_dir);
        let mut bytes = serde_json::to_vec(self).expect("the state serialises");
        bytes.push(b'\n');
        deploy_manifest::fsutil::write_atomically(&path, &bytes, 0o600)
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
    }

    /// Keep the unit files a schema 1 state held inline ([`State::migrated`]) with `record`
    /// (under the run lock, before anything else is done).
    pub fn record_migrated(
        &mut self,
        record: impl Fn(&str) -> Result<String, AgentError>,
    ) -> Result<(), AgentError> {
        for text in std::mem::take(&mut self.migrated).into_values() {
            record(&text).map_err(|e| AgentError::State {
                path: STATE_FILE.into(),
                detail: format!("moving the unit files of a schema 1 state to units/: {e}"),
            })?;
        }
        Ok(())
    }

    /// The unit hashes the recorded generations name.
    pub fn unit_hashes(&self) -> std::collections::BTreeSet<&str> {
        self.services
            .values()
            .flat_map(|s| [&s.current, &s.previous])
            .flatten()
            .map(|g| g.unit_hash.as_str())
            .collect()
    }
}

/// A schema version 1 state (`bytes`, which did not parse as the current one) as the
/// current version, and the unit files it held (hash → text): each generation's `unitFile`
/// replaced by its hash and env files. `None` when it is not a version 1 state.
fn migrate_v1(bytes: &[u8]) -> Option<(serde_json::Value, BTreeMap<String, String>)> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if value.get("schemaVersion") != Some(&serde_json::json!(1)) {
        return None;
    }
    let mut texts = BTreeMap::new();
    let services = value.get_mut("services").and_then(|s| s.as_object_mut());
    for service in services.into_iter().flat_map(|s| s.values_mut()) {
        for key in ["current", "previous"] {
            let Some(generation) = service.get_mut(key).and_then(|g| g.as_object_mut()) else {
                continue;
            };
            let Some(serde_json::Value::String(text)) = generation.remove("unitFile") else {
                continue;
            };
            let hash = crate::unit::text_hash(&text);
            let env_files = crate::unit::EnvFile::parse_all(&text);
            generation.insert("unitHash".into(), hash.clone().into());
            if !env_files.is_empty() {
                generation.insert("envFiles".into(), serde_json::json!(env_files));
            }
            texts.insert(hash, text);
        }
    }
    value["schemaVersion"] = SCHEMA_VERSION.into();
    Some((value, texts))
}

/// What each unit file of ours was ([`FileStamp`]) when it last matched what was recorded
/// for it, so that a run that finds a file's stamp unchanged need not read it again:
/// `<state dir>/unit-stamps.json`, a cache (losing it costs one read of each file). Only a
/// settled stamp is kept; a unit not checked is forgotten when it is written.
pub struct UnitStamps {
    path: PathBuf,
    /// unit → (the hash it matched, its stamp then); loaded on first use.
    known: Option<BTreeMap<String, (String, FileStamp)>>,
    /// The units checked so far.
    checked: std::collections::BTreeSet<String>,
    dirty: bool,
}

impl UnitStamps {
    pub const FILE: &str = "unit-stamps.json";

    pub fn new(state_dir: &Path) -> UnitStamps {
        UnitStamps {
            path: state_dir.join(Self::FILE),
            known: None,
            checked: Default::default(),
            dirty: false,
        }
    }

    /// Whether `unit`'s file at `path` is the text whose hash is `hash`: by its stamp when
    /// that is unchanged since it last matched, else by reading it.
    pub fn matches(&mut self, unit: &str, path: &Path, hash: &str) -> bool {
        self.checked.insert(unit.to_owned());
        let Ok(meta) = std::fs::metadata(path) else {
            self.dirty |= self.known().remove(unit).is_some();
            return false;
        };
        let stamp = FileStamp::of(&meta);
        if self
            .known()
            .get(unit)
            .is_some_and(|(h, s)| h == hash && *s == stamp)
        {
            return true;
        }
        // Read after the stamp was taken: a change made since moves it on.
        let matches =
            std::fs::read_to_string(path).is_ok_and(|text| crate::unit::text_hash(&text) == hash);
        if matches && stamp.settled(std::time::SystemTime::now()) {
            self.known()
                .insert(unit.to_owned(), (hash.to_owned(), stamp));
            self.dirty = true;
        } else {
            self.dirty |= self.known().remove(unit).is_some();
        }
        matches
    }

    fn known(&mut self) -> &mut BTreeMap<String, (String, FileStamp)> {
        let path = &self.path;
        self.known.get_or_insert_with(|| {
            std::fs::read(path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .unwrap_or_default()
        })
    }

    /// Write what changed, without the units not checked (a service gone), once the units
    /// of a run were checked; the next check (the next run, in loop mode) starts afresh
    /// from the file. A failure is logged: the next run reads the unit files again.
    pub fn flush(&mut self) {
        let Some(mut known) = self.known.take() else {
            return;
        };
        let checked = std::mem::take(&mut self.checked);
        let before = known.len();
        known.retain(|unit, _| checked.contains(unit));
        if !std::mem::take(&mut self.dirty) && known.len() == before {
            return;
        }
        let bytes = serde_json::to_vec(&known).expect("stamps serialise");
        if let Err(e) = deploy_manifest::fsutil::write_atomically(&self.path, &bytes, 0o600) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not write the unit file stamps");
        }
    }
}

/// The recorded generations' unit files, `<state dir>/units/<sha256>`: written before the
/// state that names them, checked against their name when read back.
pub struct UnitTexts {
    dir: PathBuf,
    /// A text was written since the directory was last synced.
    unsynced: std::sync::atomic::AtomicBool,
}

impl UnitTexts {
    pub const DIR: &str = "units";

    pub fn new(state_dir: &Path) -> UnitTexts {
        UnitTexts {
            dir: state_dir.join(Self::DIR),
            unsynced: Default::default(),
        }
    }

    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(hash)
    }

    /// Keep `text` (unless it is kept already); its hash. The file is synced; the
    /// directory entry is made durable by [`UnitTexts::sync`], before a state names it.
    pub fn record(&self, text: &str) -> Result<String, AgentError> {
        use std::os::unix::fs::DirBuilderExt;
        let hash = crate::unit::text_hash(text);
        let path = self.path(&hash);
        // Even a text already there: the process that wrote it may have died before the
        // directory was synced.
        self.unsynced
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if self.read(&hash).is_ok() {
            return Ok(hash);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .and_then(|()| deploy_manifest::fsutil::write_replacing(&path, text.as_bytes(), 0o600))
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))?;
        Ok(hash)
    }

    /// Make the texts recorded so far durable (one sync of the directory).
    pub fn sync(&self) -> Result<(), AgentError> {
        if self
            .unsynced
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| AgentError::io(format!("syncing {}", self.dir.display()), e))?;
        }
        Ok(())
    }

    /// The text recorded as `hash`, if it is there and still is what was recorded.
    pub fn read(&self, hash: &str) -> Result<String, AgentError> {
        let path = self.path(hash);
        let problem = match std::fs::read_to_string(&path) {
            Ok(text) if crate::unit::text_hash(&text) == hash => return Ok(text),
            Ok(_) => "it no longer holds the text recorded under that name".to_owned(),
            Err(e) => e.to_string(),
        };
        Err(AgentError::State {
            path: path.display().to_string(),
            detail: format!(
                "{problem}; it is the unit file recorded for a deployed generation, kept to put the service back or roll back to (units/ goes with state.json: back them up and restore them together)"
            ),
        })
    }

    /// Remove the texts no generation of `state` names (after that state was saved).
    pub fn prune(&self, state: &State) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let keep = state.unit_hashes();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !keep.contains(name.as_ref())
                && let Err(e) = std::fs::remove_file(entry.path())
            {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not remove a unit file no generation names");
            }
        }
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

    /// A version 1 state (unit files inline) loads as the current version: each unit file
    /// kept in `units/` under its hash, its env files recorded; saved, it matches the schema.
    #[test]
    fn a_version_1_state_is_migrated_as_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        let unit = "[Service]\nEnvironmentFile=/run/app.env\nEnvironmentFile=-/s/a.env\n";
        let generation = serde_json::json!({
            "artifact": {"storePath": "/nix/store/a"}, "path": "/nix/store/a",
            "specHash": "b".repeat(64), "version": null, "deployedAt": "2026-11-22T14:00:00Z",
            "unitFile": unit,
        });
        let v1 = serde_json::json!({
            "schemaVersion": 1, "host": "biz",
            "services": {"a": {"unit": "a.service", "current": generation,
                               "previous": generation, "health": "healthy"}},
        });
        std::fs::write(dir.path().join(STATE_FILE), v1.to_string()).unwrap();
        let mut state = State::load(dir.path(), "biz").unwrap();
        assert_eq!(state.schema_version, SCHEMA_VERSION);
        assert!(
            !dir.path().join(UnitTexts::DIR).exists(),
            "loading writes nothing"
        );
        let texts = UnitTexts::new(dir.path());
        state.record_migrated(|t| texts.record(t)).unwrap();
        assert!(state.migrated.is_empty());
        let current = state.services["a"].current.clone().unwrap();
        assert_eq!(current.unit_hash, crate::unit::text_hash(unit));
        assert_eq!(
            current.env_files,
            vec![
                crate::unit::EnvFile::required("/run/app.env"),
                crate::unit::EnvFile::from("-/s/a.env")
            ]
        );
        assert_eq!(state.services["a"].previous.as_ref(), Some(&current));
        assert_eq!(
            UnitTexts::new(dir.path()).read(&current.unit_hash).unwrap(),
            unit
        );
        state.save(dir.path()).unwrap();
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(validate(&saved), Ok(()));
        assert_eq!(State::load(dir.path(), "biz").unwrap(), state);

        // Version 1 with no unit file to move (infrastructure only) is version 2 once
        // loaded; a newer version is refused, saying so.
        let infra_only = serde_json::json!({
            "schemaVersion": 1, "host": "biz",
            "infra": {"db": {"unit": "deployer-infra-db.service", "unitFile": "[Unit]\n"}},
        });
        std::fs::write(dir.path().join(STATE_FILE), infra_only.to_string()).unwrap();
        let state = State::load(dir.path(), "biz").unwrap();
        assert_eq!(state.schema_version, SCHEMA_VERSION);
        let mut newer = infra_only.clone();
        newer["schemaVersion"] = serde_json::json!(3);
        std::fs::write(dir.path().join(STATE_FILE), newer.to_string()).unwrap();
        let e = State::load(dir.path(), "biz").unwrap_err().to_string();
        assert!(
            e.contains("newer agent") && e.contains("move it aside"),
            "{e}"
        );
        // Not a state of either shape: refused with the advice.
        let mut bad = v1.clone();
        bad["schemaVersion"] = serde_json::json!(7);
        std::fs::write(dir.path().join(STATE_FILE), bad.to_string()).unwrap();
        let e = State::load(dir.path(), "biz").unwrap_err().to_string();
        assert!(e.contains("move it aside"), "{e}");
    }

    /// A kept unit file is read back only as it was recorded; the texts no saved state
    /// names are removed.
    #[test]
    fn unit_texts_are_checked_when_read_and_pruned_when_unnamed() {
        let dir = tempfile::tempdir().unwrap();
        let texts = UnitTexts::new(dir.path());
        let (a, b) = (texts.record("a\n").unwrap(), texts.record("b\n").unwrap());
        texts.sync().unwrap();
        assert_eq!(texts.record("a\n").unwrap(), a, "named by content");
        std::fs::write(texts.path(&b), "tampered\n").unwrap();
        let e = texts.read(&b).unwrap_err().to_string();
        assert!(
            e.contains("no longer holds the text") && e.contains("back them up"),
            "{e}"
        );
        assert_eq!(
            texts.record("b\n").unwrap(),
            b,
            "a damaged text is written again"
        );
        assert_eq!(texts.read(&b).unwrap(), "b\n");

        let mut state = State::default();
        let mut generation = Generation {
            artifact: Artifact::StorePath("/nix/store/a".into()),
            path: "/nix/store/a".into(),
            spec_hash: "s".into(),
            infra_hash: None,
            version: None,
            deployed_at: String::new(),
            unit_hash: a.clone(),
            env_files: Vec::new(),
            unit: None,
            route: None,
        };
        state.services.insert(
            "a".into(),
            ServiceState {
                current: Some(generation.clone()),
                ..ServiceState::default()
            },
        );
        texts.prune(&state);
        assert!(texts.read(&a).is_ok() && texts.read(&b).is_err());
        generation.unit_hash = b;
        state.services.get_mut("a").unwrap().previous = Some(generation);
        texts.prune(&state);
        assert!(texts.read(&a).is_ok(), "a generation still names it");
    }

    /// A unit file's stamp stands for its content only once it matched and settled; any
    /// change to the file (or a different recorded hash) makes the next check read it.
    #[test]
    fn unit_stamps_stand_for_a_settled_file_that_matched() {
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("a.service");
        let (text, hash) = ("[Unit]\n", crate::unit::text_hash("[Unit]\n"));
        std::fs::write(&unit, text).unwrap();
        let check = |hash: &str| {
            let mut stamps = UnitStamps::new(dir.path());
            let matched = stamps.matches("a.service", &unit, hash);
            stamps.flush();
            matched
        };
        let known = || std::fs::read_to_string(dir.path().join(UnitStamps::FILE)).ok();
        assert!(check(&hash));
        assert!(
            known().is_none(),
            "a file written just now is not trusted by its stamp"
        );
        // Settled: nothing changed it for 2 s (the change time cannot be set back).
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert!(check(&hash));
        assert!(known().unwrap().contains(&hash));
        // The stamp on record stands for the content: a cache that says the file is another
        // text is believed (which is why it lives in the root-only state directory).
        let other = "f".repeat(64);
        let forged = known().unwrap().replace(&hash, &other);
        std::fs::write(dir.path().join(UnitStamps::FILE), forged).unwrap();
        assert!(check(&other), "not read again");
        std::fs::write(
            dir.path().join(UnitStamps::FILE),
            known().unwrap().replace(&other, &hash),
        )
        .unwrap();
        assert!(
            !check(&"0".repeat(64)),
            "another recorded text does not match"
        );
        assert!(
            known().is_none_or(|k| !k.contains("a.service")),
            "forgotten"
        );
        assert!(check(&hash));
        // Edited in place, same size, its mtime put back: the change time still moved.
        let mtime = std::fs::metadata(&unit).unwrap().modified().unwrap();
        std::fs::write(&unit, "[Unix]\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&unit)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert!(!check(&hash), "the edit is seen");
        std::fs::remove_file(&unit).unwrap();
        assert!(!check(&hash), "a missing file does not match");
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
            infra_hash: Some("d".repeat(64)),
            version: Some("manifest-20261122T140000Z-3f2a9c1d".into()),
            deployed_at: "2026-11-22T14:00:00Z".into(),
            unit_hash: "d".repeat(64),
            env_files: vec![crate::unit::EnvFile::from(
                "-/var/lib/deployer-secrets/hello.env",
            )],
            unit: Some("deployer-hello-20000.service".into()),
            route: Some(RouteState {
                domain: "hello.test".into(),
                path: "/".into(),
                port: 20000,
            }),
        };
        let state = State {
            schema_version: SCHEMA_VERSION,
            host: "biz".into(),
            manifest_version: Some("manifest-20261122T140000Z-3f2a9c1d".into()),
            manifest_etag: Some("\"e\"".into()),
            mode: Some("regtest".into()),
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
                        infra_hash: Some("e".repeat(64)),
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
                    ports: [("tcp".to_owned(), 20001)].into(),
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
            // Never written.
            migrated: BTreeMap::new(),
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
