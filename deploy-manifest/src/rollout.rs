//! Staged rollouts through the bucket, with no control plane.
//!
//! A service with a rollout policy (the manifest's `rollout.policy`, overridden field by
//! field by the service's `rollout`) reaches its hosts in waves. Each new version of a
//! service (its spec hash, [`spec_hash`]) has one rollout object,
//! `rollouts/<service>/<spec hash>.json` (a [`Record`]), in which every host records its
//! own outcome (healthy, failed, reverted) by compare-and-swap, only when it changes; and
//! an abort marker, `rollouts/<service>/<spec hash>.abort` ([`Abort`]), created with
//! `If-None-Match: *` so that concurrent writers agree on one reason.
//!
//! Everything else is computed, the same way by every reader: [`Policy::of`] resolves the
//! policy, [`assign`] puts each of the service's hosts in a wave (percentages by a hash of
//! service and host, so a host keeps its wave from one version to the next),
//! [`progress`] says where the rollout stands at a given time, and [`gate`] what one
//! host does. All of it is pure; the agent and `deploy-manifest rollout` call it with
//! what they read ([`read`]) and write back through [`update`] and [`write_abort`].
//!
//! The objects are not signed: they steer when a signed version is applied, never what is
//! applied. Someone who can write the bucket can speed up, stall or abort a rollout of a
//! signed version (and make hosts return to the version they ran before), no more.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;
use crate::model::{Manifest, OnDeadline, RolloutPolicy, Service};
use crate::repo::rfc3339;
use crate::store::{Fetched, ObjectStore, Precondition, StoreError};

pub const PREFIX: &str = "rollouts/";

/// How long a wave may take to become healthy, by default.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3600);

/// The identity of a service's manifest entry: any change to it is a new generation. The
/// rollout policy is not part of it (changing the policy restarts nothing).
pub fn spec_hash(service: &Service) -> String {
    let bytes = if service.rollout.is_some() {
        serde_json::to_vec(&Service {
            rollout: None,
            ..service.clone()
        })
    } else {
        serde_json::to_vec(service)
    };
    crate::hex(&Sha256::digest(bytes.expect("the model serialises")))
}

/// `rollouts/<service>/<spec hash>.json`.
pub fn record_key(service: &str, hash: &str) -> String {
    format!("{PREFIX}{service}/{hash}.json")
}

/// `rollouts/<service>/<spec hash>.abort`.
pub fn abort_key(service: &str, hash: &str) -> String {
    format!("{PREFIX}{service}/{hash}.abort")
}

/// A service's policy, resolved: the service's fields over the fleet's over the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub waves: Vec<crate::model::Wave>,
    pub bake: Duration,
    pub max_failures: u32,
    pub deadline: Duration,
    pub on_deadline: OnDeadline,
}

impl Policy {
    /// `None`: the service is not rolled out in waves (every host deploys at its next poll).
    pub fn of(manifest: &Manifest, service: &Service) -> Option<Policy> {
        let fleet = manifest.rollout.as_ref().and_then(|r| r.policy.as_ref());
        let own = service.rollout.as_ref();
        fn pick<'a, T>(
            own: Option<&'a RolloutPolicy>,
            fleet: Option<&'a RolloutPolicy>,
            f: impl Fn(&'a RolloutPolicy) -> Option<&'a T>,
        ) -> Option<&'a T> {
            own.and_then(&f).or_else(|| fleet.and_then(&f))
        }
        let waves = pick(own, fleet, |p| p.waves.as_ref())?;
        if waves.is_empty() {
            return None;
        }
        Some(Policy {
            waves: waves.clone(),
            bake: pick(own, fleet, |p| p.bake.as_ref()).map_or(Duration::ZERO, |s| s.get()),
            max_failures: pick(own, fleet, |p| p.max_failures.as_ref())
                .copied()
                .unwrap_or(1)
                .max(1),
            deadline: pick(own, fleet, |p| p.progress_deadline.as_ref())
                .map_or(DEFAULT_DEADLINE, |s| s.get()),
            on_deadline: pick(own, fleet, |p| p.on_deadline.as_ref())
                .copied()
                .unwrap_or(OnDeadline::Abort),
        })
    }
}

/// One wave's hosts, and how many of them must be healthy before the next wave starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Assigned {
    pub hosts: Vec<String>,
    pub min_healthy: usize,
}

/// The service's hosts, wave by wave. A wave takes, of the hosts no earlier wave took, the
/// ones it lists, the ones with one of its labels, or (`percent`) as many as bring the
/// waves so far to that share of the service's hosts (rounded up), in the order of
/// sha256(service, host): the same for every version. Hosts no wave takes form a last wave;
/// a wave that takes none of the service's hosts is left out.
pub fn assign(manifest: &Manifest, service: &Service, policy: &Policy) -> Vec<Assigned> {
    let labels = manifest.rollout.as_ref().map(|r| &r.labels);
    let mut ranked: Vec<(String, &String)> = service
        .hosts
        .iter()
        .map(|h| {
            let key = format!("{}\0{h}", service.name);
            (crate::hex(&Sha256::digest(key.as_bytes())), h)
        })
        .collect();
    ranked.sort();
    let total = service.hosts.len();
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    let mut waves = Vec::new();
    for wave in &policy.waves {
        let hosts: Vec<String> = if !wave.hosts.is_empty() {
            service
                .hosts
                .iter()
                .filter(|h| wave.hosts.contains(h) && !taken.contains(h.as_str()))
                .cloned()
                .collect()
        } else if !wave.labels.is_empty() {
            service
                .hosts
                .iter()
                .filter(|h| !taken.contains(h.as_str()))
                .filter(|h| {
                    wave.labels.iter().any(|l| {
                        labels
                            .and_then(|m| m.get(l))
                            .is_some_and(|hosts| hosts.contains(h))
                    })
                })
                .cloned()
                .collect()
        } else {
            let share = usize::from(wave.percent.unwrap_or(100).min(100));
            let target = (total * share).div_ceil(100);
            let need = target.saturating_sub(taken.len());
            ranked
                .iter()
                .map(|(_, h)| *h)
                .filter(|h| !taken.contains(h.as_str()))
                .take(need)
                .cloned()
                .collect()
        };
        taken.extend(
            service
                .hosts
                .iter()
                .filter(|h| hosts.contains(h))
                .map(String::as_str),
        );
        let min_healthy = wave
            .min_healthy
            .map_or(hosts.len(), |m| (m as usize).min(hosts.len()));
        // A wave that takes none of this service's hosts is no wave of its rollout (it would
        // only bake).
        if !hosts.is_empty() {
            waves.push(Assigned { hosts, min_healthy });
        }
    }
    let rest: Vec<String> = service
        .hosts
        .iter()
        .filter(|h| !taken.contains(h.as_str()))
        .cloned()
        .collect();
    if !rest.is_empty() {
        waves.push(Assigned {
            min_healthy: rest.len(),
            hosts: rest,
        });
    }
    waves
}

/// The wave `host` is in.
pub fn wave_of(waves: &[Assigned], host: &str) -> Option<usize> {
    waves.iter().position(|w| w.hosts.iter().any(|h| h == host))
}

/// `rollouts/<service>/<spec hash>.json`: where one version's rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Record {
    pub service: String,
    pub spec_hash: String,
    /// When the first host saw this version (the first wave's deadline counts from here).
    pub started_at: String,
    /// Waves below this index skip their bake (`rollout promote`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub promoted: u32,
    /// Set by `rollout resume`: deadlines count from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<String>,
    /// Raised by every `rollout resume`: failures and abort markers of an earlier epoch are
    /// forgiven (a counter, not a time: no clock decides it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u32,
    /// Each host's outcome with this version.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostRecord>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Record {
    pub fn new(service: &str, hash: &str, now: SystemTime) -> Record {
        Record {
            service: service.to_owned(),
            spec_hash: hash.to_owned(),
            started_at: rfc3339(now),
            promoted: 0,
            resumed_at: None,
            epoch: 0,
            hosts: BTreeMap::new(),
        }
    }
}

/// One host's outcome with a version, as it recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostRecord {
    pub state: HostState,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The record's epoch when the host wrote this.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Runs the version and passed its health checks.
    Healthy,
    /// Its health-gated deploy failed; it runs what it ran before.
    Failed,
    /// Ran the version, and returned to the one before when the rollout was aborted.
    Reverted,
}

/// The word for `value` its serde name gives (`healthy`, `failures`, `baking`, …).
fn word<T: Serialize>(value: &T, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => f.write_str(&s),
        _ => Err(std::fmt::Error),
    }
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        word(self, f)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        word(self, f)
    }
}

impl std::fmt::Display for WaveState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        word(self, f)
    }
}

/// `rollouts/<service>/<spec hash>.abort`: the rollout of that version stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Abort {
    /// The host (`host <name>`) or the person (`user@host`) that aborted it.
    pub by: String,
    pub cause: Cause,
    pub reason: String,
    pub at: String,
    /// The record's epoch the writer saw: a marker of an earlier epoch (written by a host
    /// that decided before a `resume`) is ignored.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u32,
}

/// Why a rollout stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Cause {
    /// `max_failures` hosts failed their health-gated deploy.
    Failures,
    /// A wave missed its progress deadline (policy `abort`).
    Deadline,
    /// `deploy-manifest rollout abort`.
    Manual,
}

/// Where one rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "phase")]
pub enum Phase {
    /// Wave `wave` is deploying: it does not have its healthy hosts yet.
    Deploying { wave: usize },
    /// Wave `wave` has its healthy hosts and bakes until `until`.
    Baking { wave: usize, until: String },
    /// Every wave has its healthy hosts.
    Done,
    /// It must stop, and nobody wrote the abort marker yet: what the marker gets.
    Aborting { cause: Cause, reason: String },
    /// The abort marker exists.
    Aborted {
        by: String,
        cause: Cause,
        reason: String,
        at: String,
    },
}

impl Phase {
    pub fn stopped(&self) -> bool {
        matches!(self, Phase::Aborting { .. } | Phase::Aborted { .. })
    }

    /// The reason it stopped.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Phase::Aborting { reason, .. } | Phase::Aborted { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum WaveState {
    /// An earlier wave is not done.
    Waiting,
    /// Its hosts deploy; not enough of them are healthy yet.
    Deploying,
    /// Enough hosts are healthy; the bake time runs.
    Baking,
    /// Done: the next wave may start.
    Ready,
    /// It missed its progress deadline and the policy says to continue.
    Skipped,
    /// It missed its progress deadline and the policy says to abort.
    Stalled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveProgress {
    pub state: WaveState,
    pub hosts: Vec<HostProgress>,
    pub healthy: usize,
    pub min_healthy: usize,
    /// When it started (the previous wave was done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Deploying: when its progress deadline passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Baking: seconds of bake left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bake_left_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostProgress {
    pub host: String,
    /// What the host recorded; none: it has not reported an outcome with this version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<HostState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A failure from before the last `resume`: it no longer counts.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub forgiven: bool,
}

/// Where a rollout stands at `now`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    #[serde(flatten)]
    pub phase: Phase,
    /// Waves whose hosts may deploy: every wave before the first one not done, and it.
    pub open: usize,
    pub waves: Vec<WaveProgress>,
    /// Hosts whose deploy failed (since the last resume), with their errors.
    pub failures: Vec<(String, String)>,
}

/// A time read from a record, never later than `now`: a host whose clock runs ahead (or a
/// forged record) cannot push a bake or a deadline into the future.
fn parse_time(t: &str, now: SystemTime) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(t).ok().map(|t| t.min(now))
}

fn seconds(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Where the rollout of one version stands at `now`, from the policy, the waves, the
/// record (none: no host recorded anything yet, the rollout starts now) and the abort marker.
///
/// A wave is done when `min_healthy` of its hosts recorded `healthy` and the bake time
/// passed since the last of those did (no bake after the last wave, nor for promoted
/// waves). A wave starts when the one before is done; if it does not have its healthy
/// hosts by its progress deadline, the policy skips it or aborts the rollout. `max_failures`
/// failed hosts abort it too.
pub fn progress(
    policy: &Policy,
    waves: &[Assigned],
    record: Option<&Record>,
    abort: Option<&Abort>,
    now: SystemTime,
) -> Progress {
    let recorded = |h: &str| record.and_then(|r| r.hosts.get(h));
    let epoch = record.map_or(0, |r| r.epoch);
    let forgiven = |r: &HostRecord| r.state == HostState::Failed && r.epoch < epoch;
    let started = record
        .and_then(|r| parse_time(&r.started_at, now))
        .unwrap_or(now);
    let resumed = record
        .and_then(|r| r.resumed_at.as_deref())
        .and_then(|t| parse_time(t, now));
    let promoted = record.map_or(0, |r| r.promoted as usize);
    let mut at = resumed.map_or(started, |r| r.max(started));
    let mut phase = None;
    let mut open = 0;
    let mut out = Vec::new();
    let last = waves.len().saturating_sub(1);
    for (i, wave) in waves.iter().enumerate() {
        let hosts: Vec<HostProgress> = wave
            .hosts
            .iter()
            .map(|h| {
                let r = recorded(h);
                HostProgress {
                    host: h.clone(),
                    state: r.map(|r| r.state),
                    at: r.map(|r| r.at.clone()),
                    error: r.and_then(|r| r.error.clone()),
                    forgiven: r.is_some_and(forgiven),
                }
            })
            .collect();
        let mut healthy_at: Vec<SystemTime> = wave
            .hosts
            .iter()
            .filter_map(|h| recorded(h))
            .filter(|r| r.state == HostState::Healthy)
            .map(|r| parse_time(&r.at, now).unwrap_or(now))
            .collect();
        healthy_at.sort();
        let mut progress = WaveProgress {
            state: WaveState::Waiting,
            healthy: healthy_at.len(),
            min_healthy: wave.min_healthy,
            hosts,
            started_at: None,
            deadline: None,
            bake_left_seconds: None,
        };
        if phase.is_none() {
            open = i + 1;
            progress.started_at = Some(rfc3339(at));
            if healthy_at.len() >= wave.min_healthy {
                let reached = match wave.min_healthy {
                    0 => at,
                    n => healthy_at[n - 1].max(at),
                };
                let bake = if i < promoted || i == last {
                    Duration::ZERO
                } else {
                    policy.bake
                };
                let ready = reached + bake;
                if now >= ready {
                    progress.state = WaveState::Ready;
                    at = ready;
                } else {
                    progress.state = WaveState::Baking;
                    progress.bake_left_seconds = Some(
                        ready
                            .duration_since(now)
                            .unwrap_or_default()
                            .as_secs()
                            .max(1),
                    );
                    phase = Some(Phase::Baking {
                        wave: i,
                        until: rfc3339(ready),
                    });
                }
            } else {
                let deadline = at + policy.deadline;
                progress.deadline = Some(rfc3339(deadline));
                if now < deadline {
                    progress.state = WaveState::Deploying;
                    phase = Some(Phase::Deploying { wave: i });
                } else if policy.on_deadline == OnDeadline::Continue {
                    progress.state = WaveState::Skipped;
                    at = deadline;
                } else {
                    progress.state = WaveState::Stalled;
                    let missing: Vec<&str> = wave
                        .hosts
                        .iter()
                        .filter(|h| recorded(h).is_none_or(|r| r.state != HostState::Healthy))
                        .map(String::as_str)
                        .collect();
                    phase = Some(Phase::Aborting {
                        cause: Cause::Deadline,
                        reason: format!(
                            "wave {} missed its progress deadline ({}): {} of {} hosts healthy; not healthy: {}",
                            i + 1,
                            seconds(policy.deadline),
                            healthy_at.len(),
                            wave.min_healthy,
                            missing.join(", ")
                        ),
                    });
                }
            }
        }
        out.push(progress);
    }
    let failures: Vec<(String, String)> = waves
        .iter()
        .flat_map(|w| &w.hosts)
        .filter_map(|h| recorded(h).map(|r| (h, r)))
        .filter(|(_, r)| r.state == HostState::Failed && !forgiven(r))
        .map(|(h, r)| (h.clone(), r.error.clone().unwrap_or_default()))
        .collect();
    let mut phase = phase.unwrap_or(Phase::Done);
    if failures.len() >= policy.max_failures as usize && !matches!(phase, Phase::Done) {
        let (host, error) = &failures[failures.len() - 1];
        phase = Phase::Aborting {
            cause: Cause::Failures,
            reason: match failures.len() {
                1 => format!("host {host} failed: {error}"),
                n => format!("{n} hosts failed; the last, {host}: {error}"),
            },
        };
    }
    if let Some(a) = abort.filter(|a| a.epoch >= epoch) {
        phase = Phase::Aborted {
            by: a.by.clone(),
            cause: a.cause,
            reason: a.reason.clone(),
            at: a.at.clone(),
        };
    }
    Progress {
        phase,
        open,
        waves: out,
        failures,
    }
}

/// What one host does with a service's new version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "gate")]
pub enum Gate {
    /// Its wave is open: deploy the version now.
    Go,
    /// Keep what runs: an earlier wave is not done, or the rollout stopped.
    Hold { reason: String },
    /// It runs the version and the rollout stopped: return to the version it ran before.
    Revert { reason: String },
    /// It runs the version; the rollout is not done (an abort would still bring it back).
    Watch,
    /// It runs the version and every wave is done.
    Done,
}

/// The gate of the host in wave `wave` that runs the version (`runs`) or not.
pub fn gate(progress: &Progress, wave: usize, runs: bool) -> Gate {
    if let Some(reason) = progress.phase.reason() {
        let reason = format!("rollout aborted: {reason}");
        return if runs {
            Gate::Revert { reason }
        } else {
            Gate::Hold { reason }
        };
    }
    if runs {
        return match progress.phase {
            Phase::Done => Gate::Done,
            _ => Gate::Watch,
        };
    }
    if wave < progress.open {
        return Gate::Go;
    }
    Gate::Hold {
        reason: waiting_for(progress),
    }
}

/// What the first wave not done waits for, in words.
fn waiting_for(progress: &Progress) -> String {
    let Some((i, w)) = progress
        .waves
        .iter()
        .enumerate()
        .find(|(_, w)| matches!(w.state, WaveState::Deploying | WaveState::Baking))
    else {
        return "waiting for an earlier wave".to_owned();
    };
    match w.state {
        // Times as instants, not as time left: the same words from one reader to the next.
        WaveState::Baking => match &progress.phase {
            Phase::Baking { until, .. } => {
                format!("waiting for wave {} to bake until {until}", i + 1)
            }
            _ => format!("waiting for wave {} to bake", i + 1),
        },
        _ => {
            let pending: Vec<&str> = w
                .hosts
                .iter()
                .filter(|h| h.state != Some(HostState::Healthy))
                .map(|h| h.host.as_str())
                .collect();
            // No deadline here: before the first host creates the record, each reader
            // counts it from its own now (`rollout status` shows it).
            format!(
                "waiting for wave {}: {} of {} hosts healthy (not yet: {})",
                i + 1,
                w.healthy,
                w.min_healthy,
                pending.join(", "),
            )
        }
    }
}

/// A rollout's objects as read from the store, with the record's ETag for the next
/// compare-and-swap.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub record: Option<Record>,
    pub etag: Option<String>,
    pub abort: Option<Abort>,
}

impl Stored {
    /// Where the rollout these objects describe stands at `now` ([`progress`]).
    pub fn progress(&self, policy: &Policy, waves: &[Assigned], now: SystemTime) -> Progress {
        progress(
            policy,
            waves,
            self.record.as_ref(),
            self.abort.as_ref(),
            now,
        )
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::BadArgument(format!(
            "{key} is not a rollout object ({e}); the deployer never writes one like it: delete that object (hosts then start its record again)"
        ))
    })
}

/// Read one version's rollout objects: two GETs. The marker first: `resume` writes the
/// record (failures forgiven) before it deletes the marker, so a reader that finds no
/// marker reads a record at least that new, and never aborts again on the old failures.
pub async fn read(store: &impl ObjectStore, service: &str, hash: &str) -> Result<Stored, Error> {
    let key = abort_key(service, hash);
    let abort = match store.get(&key, None).await? {
        Fetched::Found { bytes, .. } => Some(parse::<Abort>(&key, &bytes)?),
        _ => None,
    };
    let key = record_key(service, hash);
    let (record, etag) = match store.get(&key, None).await? {
        Fetched::Found { bytes, etag } => (Some(parse::<Record>(&key, &bytes)?), Some(etag)),
        _ => (None, None),
    };
    Ok(Stored {
        record,
        etag,
        abort,
    })
}

/// Change one version's record by compare-and-swap: `edit` returns whether it changed
/// anything (nothing is written otherwise; a missing record is created). Starts from
/// `known` (what [`read`] found, record and ETag, or none) and reads again only when
/// another writer got there first. Returns the record as it is now, and its ETag.
pub async fn update(
    store: &impl ObjectStore,
    service: &str,
    hash: &str,
    known: Option<(Option<Record>, Option<String>)>,
    now: SystemTime,
    mut edit: impl FnMut(&mut Record) -> bool,
) -> Result<(Record, String), Error> {
    const ATTEMPTS: u32 = 40;
    let key = record_key(service, hash);
    let mut known = known;
    for attempt in 0..ATTEMPTS {
        let (record, etag) = match known.take() {
            Some(k) => k,
            None => match store.get(&key, None).await? {
                Fetched::Found { bytes, etag } => {
                    (Some(parse::<Record>(&key, &bytes)?), Some(etag))
                }
                _ => (None, None),
            },
        };
        let mut record = record.unwrap_or_else(|| Record::new(service, hash, now));
        let condition = match etag {
            Some(e) if !edit(&mut record) => return Ok((record, e)),
            Some(e) => Precondition::IfMatch(e),
            None => {
                edit(&mut record);
                Precondition::IfAbsent
            }
        };
        let body = serde_json::to_vec_pretty(&record).expect("a record serialises");
        match store.put(&key, body, condition).await {
            Ok(etag) => return Ok((record, etag)),
            // Another host wrote first: read again, after a growing, spread-out pause.
            Err(StoreError::PreconditionFailed { .. }) => crate::repo::backoff(attempt).await,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::RolloutConflict {
        key,
        attempts: ATTEMPTS,
    })
}

/// Create the abort marker, unless one of this epoch exists: the first reason stays (a
/// marker of an earlier epoch, which readers ignore, is replaced by compare-and-swap).
/// Returns the marker that is in the store.
pub async fn write_abort(
    store: &impl ObjectStore,
    service: &str,
    hash: &str,
    abort: Abort,
) -> Result<Abort, Error> {
    let key = abort_key(service, hash);
    let body = serde_json::to_vec_pretty(&abort).expect("an abort serialises");
    let mut condition = Precondition::IfAbsent;
    for _ in 0..3 {
        match store.put(&key, body.clone(), condition).await {
            Ok(_) => return Ok(abort),
            Err(StoreError::PreconditionFailed { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        condition = match store.get(&key, None).await? {
            Fetched::Found { bytes, etag } => match parse::<Abort>(&key, &bytes) {
                Ok(there) if there.epoch >= abort.epoch => return Ok(there),
                _ => Precondition::IfMatch(etag),
            },
            _ => Precondition::IfAbsent,
        };
    }
    Err(Error::Conflict { attempts: 3 })
}

/// Delete a version's rollout objects: a spec that becomes current again (a rollback, a
/// setting changed back) starts a fresh rollout, not the end of an earlier one.
pub async fn forget(store: &impl ObjectStore, service: &str, hash: &str) -> Result<(), Error> {
    store.delete(&abort_key(service, hash)).await?;
    store.delete(&record_key(service, hash)).await?;
    Ok(())
}

/// One service's rollout of its current version, as `deploy-manifest rollout` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub service: String,
    pub spec_hash: String,
    pub artifact: String,
    /// When the first host saw this version; none: no host has polled since it was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// Waves below this index skip their bake.
    pub promoted: u32,
    pub progress: Progress,
}

/// A service's rollout policy, waves and current spec hash; an error if it has none.
fn resolve<'m>(
    manifest: &'m Manifest,
    service: &str,
) -> Result<(&'m Service, Policy, Vec<Assigned>, String), Error> {
    let s = manifest
        .service(service)
        .ok_or_else(|| Error::UnknownService {
            name: service.to_owned(),
        })?;
    let policy = Policy::of(manifest, s).ok_or_else(|| {
        Error::BadArgument(format!(
            "service {service:?} has no rollout policy (no waves): every host deploys it at its next poll"
        ))
    })?;
    let waves = assign(manifest, s, &policy);
    Ok((s, policy, waves, spec_hash(s)))
}

/// Where the rollout of `service`'s current version stands, and what was read.
pub async fn status(
    store: &impl ObjectStore,
    manifest: &Manifest,
    service: &str,
    now: SystemTime,
) -> Result<(Status, Stored), Error> {
    let (s, policy, waves, hash) = resolve(manifest, service)?;
    let stored = read(store, service, &hash).await?;
    let progress = stored.progress(&policy, &waves, now);
    let status = Status {
        service: service.to_owned(),
        spec_hash: hash,
        artifact: s.artifact.label(),
        started_at: stored.record.as_ref().map(|r| r.started_at.clone()),
        promoted: stored.record.as_ref().map_or(0, |r| r.promoted),
        progress,
    };
    Ok((status, stored))
}

/// Every service of `manifest` with a rollout policy, or only `only`.
pub async fn statuses(
    store: &impl ObjectStore,
    manifest: &Manifest,
    only: Option<&str>,
    now: SystemTime,
) -> Result<Vec<Status>, Error> {
    let mut out = Vec::new();
    for s in &manifest.services {
        if only.is_some_and(|o| o != s.name)
            || (only.is_none() && Policy::of(manifest, s).is_none())
        {
            continue;
        }
        out.push(status(store, manifest, &s.name, now).await?.0);
    }
    if let Some(name) = only
        && out.is_empty()
    {
        return Err(Error::UnknownService {
            name: name.to_owned(),
        });
    }
    Ok(out)
}

/// `rollout promote`: the wave deploying or baking now (and those before it) skip their
/// bake; the next wave starts as soon as this one has its healthy hosts.
pub async fn promote(
    store: &impl ObjectStore,
    manifest: &Manifest,
    service: &str,
    now: SystemTime,
) -> Result<usize, Error> {
    let (status, stored) = status(store, manifest, service, now).await?;
    let wave = match &status.progress.phase {
        Phase::Deploying { wave } | Phase::Baking { wave, .. } => *wave,
        Phase::Done => {
            return Err(Error::BadArgument(format!(
                "the rollout of {service} is done: every wave has its healthy hosts"
            )));
        }
        Phase::Aborting { .. } | Phase::Aborted { .. } => {
            return Err(Error::BadArgument(format!(
                "the rollout of {service} was aborted ({}); `deploy-manifest rollout resume {service}` first",
                status.progress.phase.reason().unwrap_or_default()
            )));
        }
    };
    let target = wave as u32 + 1;
    update(
        store,
        service,
        &status.spec_hash,
        Some((stored.record, stored.etag)),
        now,
        |r| {
            let changed = r.promoted < target;
            r.promoted = r.promoted.max(target);
            changed
        },
    )
    .await?;
    Ok(wave)
}

/// `rollout abort`: create the abort marker (the first one stays). Returns the marker in
/// the store.
pub async fn abort(
    store: &impl ObjectStore,
    manifest: &Manifest,
    service: &str,
    by: &str,
    reason: &str,
    now: SystemTime,
) -> Result<Abort, Error> {
    let (status, stored) = status(store, manifest, service, now).await?;
    if status.progress.phase == Phase::Done {
        return Err(Error::BadArgument(format!(
            "the rollout of {service} is done; to go back, `deploy-manifest rollback`"
        )));
    }
    let marker = Abort {
        by: by.to_owned(),
        cause: Cause::Manual,
        reason: reason.to_owned(),
        at: rfc3339(now),
        epoch: stored.record.as_ref().map_or(0, |r| r.epoch),
    };
    write_abort(store, service, &status.spec_hash, marker).await
}

/// `rollout resume`: a new epoch in the record (the failures and abort markers so far no
/// longer count; the deadline counts from now), then the abort marker removed. Hosts that
/// returned to their previous version, and hosts whose own deploy failed, deploy this one
/// again when their wave is open.
pub async fn resume(
    store: &impl ObjectStore,
    manifest: &Manifest,
    service: &str,
    now: SystemTime,
) -> Result<(), Error> {
    let (status, stored) = status(store, manifest, service, now).await?;
    if !status.progress.phase.stopped() {
        return Err(Error::BadArgument(format!(
            "the rollout of {service} is not aborted; nothing to resume"
        )));
    }
    update(
        store,
        service,
        &status.spec_hash,
        Some((stored.record, stored.etag)),
        now,
        |r| {
            r.resumed_at = Some(rfc3339(now));
            r.epoch += 1;
            true
        },
    )
    .await?;
    store.delete(&abort_key(service, &status.spec_hash)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FleetRollout, Span, Wave};

    fn service(name: &str, hosts: &[&str]) -> Service {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "artifact": {"storePath": "/nix/store/abc-x"},
            "hosts": hosts,
        }))
        .unwrap()
    }

    fn wave_hosts(h: &[&str]) -> Wave {
        Wave {
            hosts: h.iter().map(|s| s.to_string()).collect(),
            ..Wave::default()
        }
    }

    fn percent(p: u8) -> Wave {
        Wave {
            percent: Some(p),
            ..Wave::default()
        }
    }

    fn manifest(policy: RolloutPolicy) -> Manifest {
        Manifest {
            rollout: Some(FleetRollout {
                labels: [("eu".to_owned(), vec!["h3".to_owned(), "h4".to_owned()])].into(),
                policy: Some(policy),
            }),
            ..Manifest::empty()
        }
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    /// Record `state` for `host` at `time`, in the record's epoch.
    fn put(r: &mut Record, host: &str, state: HostState, time: &str, error: Option<&str>) {
        let entry = HostRecord {
            state,
            at: time.into(),
            error: error.map(str::to_owned),
            epoch: r.epoch,
        };
        r.hosts.insert(host.into(), entry);
    }

    fn healthy(r: &mut Record, host: &str, t: u64) {
        put(r, host, HostState::Healthy, &rfc3339(at(t)), None);
    }

    #[test]
    fn the_policy_is_the_services_over_the_fleets() {
        let m = manifest(RolloutPolicy {
            waves: Some(vec![wave_hosts(&["h1"])]),
            bake: Some(Span::parse("10m").unwrap()),
            ..RolloutPolicy::default()
        });
        let mut s = service("web", &["h1", "h2"]);
        let p = Policy::of(&m, &s).unwrap();
        assert_eq!(p.bake, Duration::from_secs(600));
        assert_eq!((p.max_failures, p.deadline), (1, DEFAULT_DEADLINE));
        s.rollout = Some(RolloutPolicy {
            bake: Some(Span::parse("1m").unwrap()),
            max_failures: Some(3),
            ..RolloutPolicy::default()
        });
        let p = Policy::of(&m, &s).unwrap();
        assert_eq!((p.bake, p.max_failures), (Duration::from_secs(60), 3));
        assert_eq!(p.waves, vec![wave_hosts(&["h1"])], "waves from the fleet");
        s.rollout = Some(RolloutPolicy {
            waves: Some(vec![]),
            ..RolloutPolicy::default()
        });
        assert_eq!(Policy::of(&m, &s), None, "[] opts out");
        assert_eq!(Policy::of(&Manifest::empty(), &service("w", &["h"])), None);
    }

    #[test]
    fn the_policy_is_not_part_of_the_generation() {
        let mut s = service("web", &["h1"]);
        let before = spec_hash(&s);
        s.rollout = Some(RolloutPolicy {
            bake: Some(Span::parse("1m").unwrap()),
            ..RolloutPolicy::default()
        });
        assert_eq!(spec_hash(&s), before);
        s.hosts.push("h2".into());
        assert_ne!(spec_hash(&s), before);
    }

    #[test]
    fn hosts_are_assigned_by_list_label_and_share() {
        let policy = RolloutPolicy {
            waves: Some(vec![
                wave_hosts(&["h2", "elsewhere"]),
                Wave {
                    labels: vec!["eu".into()],
                    ..Wave::default()
                },
                percent(50),
            ]),
            ..RolloutPolicy::default()
        };
        let m = manifest(policy);
        let hosts: Vec<String> = (1..=10).map(|i| format!("h{i}")).collect();
        let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let s = service("web", &refs);
        let p = Policy::of(&m, &s).unwrap();
        let waves = assign(&m, &s, &p);
        assert_eq!(waves[0].hosts, vec!["h2"]);
        assert_eq!(waves[1].hosts, vec!["h3", "h4"]);
        assert_eq!(
            waves[2].hosts.len(),
            2,
            "50 % of 10 is 5 hosts, 3 taken already"
        );
        assert_eq!(waves[3].hosts.len(), 5, "the rest form a last wave");
        let all: BTreeSet<&String> = waves.iter().flat_map(|w| &w.hosts).collect();
        assert_eq!(all.len(), 10, "every host exactly once");
        // Stable: a new version (other spec) or another host order gives the same waves.
        let mut other = s.clone();
        other.hosts.reverse();
        other.env.insert("X".into(), "1".into());
        let again = assign(&m, &other, &p);
        for (a, b) in waves.iter().zip(&again) {
            let (a, b): (BTreeSet<_>, BTreeSet<_>) =
                (a.hosts.iter().collect(), b.hosts.iter().collect());
            assert_eq!(a, b);
        }
        // Another service spreads its hosts differently.
        let s2 = Service {
            name: "api".into(),
            ..s.clone()
        };
        let w2 = assign(&m, &s2, &p);
        assert_eq!(w2[0].hosts, vec!["h2"]);
        assert_ne!(
            w2[2].hosts, waves[2].hosts,
            "the share depends on the service"
        );
    }

    fn two_waves(bake: &str) -> (Policy, Vec<Assigned>) {
        let m = manifest(RolloutPolicy {
            waves: Some(vec![wave_hosts(&["h1"])]),
            bake: Some(Span::parse(bake).unwrap()),
            progress_deadline: Some(Span::parse("30m").unwrap()),
            ..RolloutPolicy::default()
        });
        let s = service("web", &["h1", "h2", "h3"]);
        let p = Policy::of(&m, &s).unwrap();
        let w = assign(&m, &s, &p);
        (p, w)
    }

    #[test]
    fn a_wave_opens_when_the_one_before_is_healthy_and_baked() {
        let (p, w) = two_waves("10m");
        assert_eq!(w.len(), 2);
        let mut r = Record::new("web", "x", at(0));
        let now = at(60);
        let pr = progress(&p, &w, Some(&r), None, now);
        assert_eq!(pr.phase, Phase::Deploying { wave: 0 });
        assert_eq!(gate(&pr, 0, false), Gate::Go, "the canary goes");
        assert!(
            matches!(gate(&pr, 1, false), Gate::Hold { reason } if reason.contains("not yet: h1")),
        );
        healthy(&mut r, "h1", 100);
        let pr = progress(&p, &w, Some(&r), None, at(400));
        assert!(matches!(pr.phase, Phase::Baking { wave: 0, .. }));
        assert_eq!(pr.waves[0].bake_left_seconds, Some(300));
        let until = rfc3339(at(700));
        assert!(
            matches!(gate(&pr, 1, false), Gate::Hold { reason } if reason.ends_with(&format!("bake until {until}")))
        );
        assert_eq!(gate(&pr, 0, true), Gate::Watch);
        let pr = progress(&p, &w, Some(&r), None, at(700));
        assert_eq!(gate(&pr, 1, false), Gate::Go);
        assert_eq!(pr.phase, Phase::Deploying { wave: 1 });
        // Promoted: no bake.
        r.promoted = 1;
        let pr = progress(&p, &w, Some(&r), None, at(101));
        assert_eq!(gate(&pr, 1, false), Gate::Go);
        healthy(&mut r, "h2", 200);
        healthy(&mut r, "h3", 300);
        let pr = progress(&p, &w, Some(&r), None, at(301));
        assert_eq!(pr.phase, Phase::Done, "no bake after the last wave");
        assert_eq!(gate(&pr, 1, true), Gate::Done);
    }

    #[test]
    fn a_failure_aborts_and_hosts_that_run_the_version_revert() {
        let (p, w) = two_waves("0s");
        let mut r = Record::new("web", "x", at(0));
        put(
            &mut r,
            "h1",
            HostState::Failed,
            &rfc3339(at(10)),
            Some("health check failed"),
        );
        let pr = progress(&p, &w, Some(&r), None, at(20));
        assert_eq!(
            pr.phase,
            Phase::Aborting {
                cause: Cause::Failures,
                reason: "host h1 failed: health check failed".into()
            }
        );
        assert!(
            matches!(gate(&pr, 1, false), Gate::Hold { reason } if reason.contains("h1 failed"))
        );
        assert!(matches!(gate(&pr, 0, true), Gate::Revert { .. }));
        // A marker wins over everything.
        let mut abort = Abort {
            by: "ops@laptop".into(),
            cause: Cause::Manual,
            reason: "by hand".into(),
            at: rfc3339(at(5)),
            epoch: 0,
        };
        let pr = progress(&p, &w, Some(&r), Some(&abort), at(21));
        assert!(matches!(&pr.phase, Phase::Aborted { reason, .. } if reason == "by hand"));
        // Resumed (a new epoch): the failure is forgiven, whatever the clocks say, the
        // deadline counts again, and a marker of the old epoch (written late by a host
        // that decided before the resume) is ignored.
        r.resumed_at = Some(rfc3339(at(3000)));
        r.epoch = 1;
        r.hosts.get_mut("h1").unwrap().at = rfc3339(at(9000));
        let pr = progress(&p, &w, Some(&r), Some(&abort), at(3001));
        assert_eq!(pr.phase, Phase::Deploying { wave: 0 });
        assert!(pr.waves[0].hosts[0].forgiven);
        abort.epoch = 1;
        let pr = progress(&p, &w, Some(&r), Some(&abort), at(3001));
        assert!(pr.phase.stopped(), "a marker of this epoch counts");
    }

    #[test]
    fn a_silent_host_stalls_its_wave_until_the_deadline() {
        let (mut p, w) = two_waves("0s");
        let r = Record::new("web", "x", at(0));
        let pr = progress(&p, &w, Some(&r), None, at(1799));
        assert!(matches!(gate(&pr, 1, false), Gate::Hold { reason } if reason.contains("h1")));
        let pr = progress(&p, &w, Some(&r), None, at(1800));
        assert!(
            matches!(&pr.phase, Phase::Aborting { cause: Cause::Deadline, reason } if reason.contains("wave 1 missed its progress deadline (30m)") && reason.contains("h1")),
            "{:?}",
            pr.phase
        );
        assert_eq!(pr.waves[0].state, WaveState::Stalled);
        p.on_deadline = OnDeadline::Continue;
        let pr = progress(&p, &w, Some(&r), None, at(1800));
        assert_eq!(pr.waves[0].state, WaveState::Skipped);
        assert_eq!(gate(&pr, 1, false), Gate::Go);
        // The next wave's deadline counts from the skip.
        let pr = progress(&p, &w, Some(&r), None, at(3599));
        assert_eq!(pr.phase, Phase::Deploying { wave: 1 });
    }

    #[test]
    fn min_healthy_lets_a_wave_finish_without_every_host() {
        let m = manifest(RolloutPolicy {
            waves: Some(vec![Wave {
                hosts: vec!["h1".into(), "h2".into()],
                min_healthy: Some(1),
                ..Wave::default()
            }]),
            ..RolloutPolicy::default()
        });
        let s = service("web", &["h1", "h2", "h3"]);
        let p = Policy::of(&m, &s).unwrap();
        let w = assign(&m, &s, &p);
        let mut r = Record::new("web", "x", at(0));
        healthy(&mut r, "h2", 5);
        let pr = progress(&p, &w, Some(&r), None, at(6));
        assert_eq!(gate(&pr, 1, false), Gate::Go);
        assert_eq!(
            gate(&pr, 0, false),
            Gate::Go,
            "h1 still goes: its wave is open"
        );
    }

    #[test]
    fn a_wave_without_hosts_of_the_service_is_left_out() {
        // The fleet's canary label names a host that does not run this service.
        let m = Manifest {
            rollout: Some(FleetRollout {
                labels: [("canary".to_owned(), vec!["elsewhere".to_owned()])].into(),
                policy: Some(RolloutPolicy {
                    waves: Some(vec![
                        Wave {
                            labels: vec!["canary".into()],
                            ..Wave::default()
                        },
                        percent(50),
                        percent(50),
                    ]),
                    bake: Some(Span::parse("1h").unwrap()),
                    ..RolloutPolicy::default()
                }),
            }),
            ..Manifest::empty()
        };
        let s = service("web", &["h1", "h2"]);
        let p = Policy::of(&m, &s).unwrap();
        let w = assign(&m, &s, &p);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!((w[0].hosts.len(), w[1].hosts.len()), (1, 1));
        // So the first real wave opens at once, and no empty wave bakes.
        let pr = progress(&p, &w, None, None, at(0));
        assert_eq!(gate(&pr, 0, false), Gate::Go);
    }

    #[test]
    fn times_ahead_of_now_count_as_now() {
        let (p, w) = two_waves("10m");
        let mut r = Record::new("web", "x", at(0));
        // A forged (or skewed) healthy time far ahead would bake forever.
        put(
            &mut r,
            "h1",
            HostState::Healthy,
            "9999-01-01T00:00:00Z",
            None,
        );
        let pr = progress(&p, &w, Some(&r), None, at(100));
        assert_eq!(pr.waves[0].bake_left_seconds, Some(600));
        assert_eq!(
            gate(&pr, 1, false),
            Gate::Hold {
                reason: format!("waiting for wave 1 to bake until {}", rfc3339(at(700)))
            }
        );
    }

    #[tokio::test]
    async fn a_spec_that_becomes_current_again_starts_a_fresh_rollout() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::FileStore::open(&format!("file://{}", dir.path().display())).unwrap();
        let repo = crate::Repo::new(store.clone(), "t");
        repo.init().await.unwrap();
        let web = serde_json::json!({"name": "web", "artifact": {"storePath": "/nix/store/a-v2"}, "hosts": ["h1"]});
        repo.update(|m| crate::edit::add_service(m, &web))
            .await
            .unwrap();
        let v2 = repo.current().await.unwrap().manifest;
        let hash = spec_hash(v2.service("web").unwrap());
        // v2's rollout timed out and was aborted; then v3; then a rollback to v2.
        update(&store, "web", &hash, None, at(0), |_| false)
            .await
            .unwrap();
        let marker = Abort {
            by: "host h1".into(),
            cause: Cause::Deadline,
            reason: "old".into(),
            at: rfc3339(at(0)),
            epoch: 0,
        };
        write_abort(&store, "web", &hash, marker).await.unwrap();
        repo.update(|m| crate::edit::set_artifact(m, "web", "/nix/store/b-v3"))
            .await
            .unwrap();
        let stored = read(&store, "web", &hash).await.unwrap();
        assert!(
            stored.record.is_some(),
            "an unrelated spec keeps its objects"
        );
        repo.rollback(v2.version.as_deref()).await.unwrap();
        let stored = read(&store, "web", &hash).await.unwrap();
        assert!(
            stored.record.is_none() && stored.abort.is_none(),
            "{stored:?}"
        );
    }
}
