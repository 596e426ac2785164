//! One reconcile pass, and the loop around it.
//!
//! `run_once`: lock → one conditional GET of `manifest.json` (`poll`) → unchanged: plan
//! drift repair from the state alone (no further store request) → changed: validate, check
//! trust, read the staged rollouts this host takes part in (`rollout::gather`), plan
//! ([`crate::plan`]) → apply the plan's steps (`apply`), each with its own error boundary,
//! saving the state after each → record this host's part in its rollouts
//! (`rollout::record`) → save → publish the host's report (`publish`), still under the lock.

mod apply;
mod deploy;
mod events;
mod poll;
mod publish;
mod rollout;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use deploy_manifest::repo::rfc3339;
use deploy_manifest::store::ObjectStore;
use serde::Serialize;
use tracing::Instrument;

pub use self::poll::Polled;
use crate::AgentError;
use crate::config::AgentConfig;
use crate::host::Host;
use crate::plan::{Plan, Step, plan, plan_unchanged};
use crate::state::{RunLock, State};
use crate::systemd::ServiceManager;

/// What one run did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// `manifest.json` was unchanged since the last run.
    pub unchanged: bool,
    pub manifest_version: Option<String>,
    /// The plan's steps this run executed, in order (`deployer-agent plan` printed them).
    pub steps: Vec<Step>,
    /// What happened to each service the run looked at.
    pub services: BTreeMap<String, Outcome>,
    /// What happened to each infrastructure service the run looked at.
    pub infra: BTreeMap<String, InfraOutcome>,
    /// The proxy routes could not be applied; retried on the next run.
    pub route_error: Option<String>,
    /// This host's part in a staged rollout could not be recorded; retried on the next run.
    pub rollout_error: Option<String>,
    /// Units of ours that no state recorded (left by a run killed mid-deploy), retired.
    pub retired: Vec<String>,
    /// Requests this run made to the store (an idle poll: 1), where counted.
    pub store_requests: Option<u64>,
    /// systemd calls this run made that change something (reload, restart, stop).
    pub systemd_changes: u64,
    /// Calls this run made to systemd of any kind (D-Bus method calls and property reads),
    /// where counted: a run that keeps every service makes the same few however many
    /// there are.
    pub systemd_calls: u64,
    /// Times this run wrote `state.json`: once for a run that changed nothing, plus once
    /// per step that changed something.
    pub state_writes: u64,
    /// What happened, as written to the store's history and sent to notifications.
    pub events: Vec<deploy_manifest::history::Event>,
}

/// What one run did to one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum Outcome {
    /// The manifest's spec was deployed and passed its health checks.
    Deployed,
    /// It already ran the manifest's spec, as recorded; left as it was.
    Kept,
    /// It had drifted (stopped, unit file changed) and the recorded generation was put back.
    Repaired,
    /// It had drifted and could not be put back, or systemd could not say how it runs.
    Drifted { error: String },
    /// It runs the manifest's spec, but a re-check of an earlier failure found it unhealthy.
    Unhealthy { error: String },
    /// Its deploy of this spec failed before; not retried until the manifest changes.
    Skipped,
    /// Its new version is rolled out in waves and this host's wave has not started (or the
    /// rollout was aborted); what ran keeps running.
    Held { reason: String },
    /// Not deployed (or not removed) and nothing changed on the host; the next run retries.
    Retrying { error: String },
    /// The deploy failed and what ran before was put back.
    RolledBack { error: String },
    /// No longer in the manifest: stopped, its unit removed.
    Removed,
    /// No longer in the manifest, and stopping it or removing its unit failed; the next run
    /// tries again.
    NotRemoved { error: String },
}

impl Outcome {
    /// Whether the service did not end as the manifest asks.
    pub fn failed(&self) -> bool {
        matches!(
            self,
            Self::Drifted { .. }
                | Self::Unhealthy { .. }
                | Self::Retrying { .. }
                | Self::RolledBack { .. }
                | Self::NotRemoved { .. }
        )
    }
}

impl std::fmt::Display for Outcome {
    /// The operator's line: what happened, and for a failure why and what comes next.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Deployed => f.write_str("deployed"),
            Self::Kept => f.write_str("kept"),
            Self::Repaired => f.write_str("drifted; put back as recorded"),
            Self::Drifted { error } => write!(f, "{error} (drifted; the next run retries)"),
            Self::Unhealthy { error } => write!(f, "unhealthy: {error}"),
            Self::Skipped => {
                f.write_str("its deploy failed before; not retried until the manifest changes")
            }
            Self::Held { reason } => write!(f, "held: {reason}"),
            Self::Retrying { error } => {
                write!(f, "{error} (nothing changed; the next run retries)")
            }
            Self::RolledBack { error } => write!(f, "{error} (rolled back)"),
            Self::Removed => f.write_str("removed"),
            Self::NotRemoved { error } => write!(f, "{error} (not removed; the next run retries)"),
        }
    }
}

/// What one run did to one infrastructure service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum InfraOutcome {
    /// It ran as recorded; left as it was.
    Running,
    /// Started for the first time, or restarted with a changed declaration.
    Started,
    /// Recorded, found stopped or its unit file changed, and put back as recorded.
    Repaired,
    /// systemd could not say whether it runs; left as it was.
    Unknown { error: String },
    /// Not running or not ready; the services that need it waited.
    Failed { error: String },
    /// No service here needs it any more: stopped, its data kept.
    Stopped,
}

impl RunReport {
    /// Every service and infrastructure service ended as the plan meant, and the routes
    /// were applied.
    pub fn ok(&self) -> bool {
        self.failures().next().is_none()
    }

    /// Every failure of the run, one line each, as the operator reads them: the route error,
    /// then each failed service, then each failed infrastructure service.
    pub fn failures(&self) -> impl Iterator<Item = String> + '_ {
        let services = self
            .services
            .iter()
            .filter(|(_, o)| o.failed())
            .map(|(s, o)| format!("{s}: {o}"));
        let infra = self.infra.iter().filter_map(|(n, o)| match o {
            InfraOutcome::Failed { error } | InfraOutcome::Unknown { error } => {
                Some(format!("infrastructure {n}: {error}"))
            }
            _ => None,
        });
        self.route_error
            .iter()
            .chain(&self.rollout_error)
            .cloned()
            .chain(services)
            .chain(infra)
    }

    /// A failure on this host's side (secrets file, fetch, a free port, infrastructure that
    /// did not start or stop) left something undone with nothing changed: the next run plans
    /// again in full.
    pub fn retry(&self) -> bool {
        self.services
            .values()
            .any(|o| matches!(o, Outcome::Retrying { .. } | Outcome::NotRemoved { .. }))
            || self
                .infra
                .values()
                .any(|o| matches!(o, InfraOutcome::Failed { .. }))
    }

    /// What failed, one line for the host's `lastError`: the route error, or the first
    /// failed service or infrastructure (and how many more).
    pub fn failure(&self) -> Option<String> {
        let all: Vec<String> = self.failures().collect();
        let first = all.first()?;
        Some(match all.len() {
            1 => first.clone(),
            n => format!("{first} (and {} more failures)", n - 1),
        })
    }

    /// The services with outcome `pick`, in name order.
    pub fn services_where(&self, pick: impl Fn(&Outcome) -> bool) -> Vec<&str> {
        self.services
            .iter()
            .filter(|(_, o)| pick(o))
            .map(|(s, _)| s.as_str())
            .collect()
    }
}

pub struct Agent<S, H> {
    pub store: S,
    pub host: H,
    pub config: AgentConfig,
}

pub(crate) fn now() -> String {
    rfc3339(SystemTime::now())
}

impl<S: ObjectStore, H: Host> Agent<S, H> {
    /// The ETag to poll with: none (a full plan) when this host's mode changed since the
    /// last full run, which picks other command variants from the same manifest.
    fn etag(&self, state: &State) -> Option<String> {
        match state.mode == self.config.mode {
            true => state.manifest_etag.clone(),
            false => None,
        }
    }

    /// What the next run would do, acting on nothing: the same poll (the ETag the last
    /// run saw, the same trust checks) and the same plan as `run_once`.
    pub async fn next_plan(&self) -> Result<Plan, AgentError> {
        let state = State::load(&self.config.state_dir, &self.config.host)?;
        Ok(
            match self.poll(&state, self.etag(&state).as_deref()).await? {
                Polled::Unchanged => plan_unchanged(&state, &self.host).await,
                Polled::Changed { manifest, .. } => {
                    let rollouts = self.gather(&manifest, &state, false).await;
                    plan(&manifest, &state, &self.host, &self.config, &rollouts).await
                }
            },
        )
    }

    /// One reconcile pass.
    pub async fn run_once(&self) -> Result<RunReport, AgentError> {
        let span = tracing::info_span!("run", host = %self.config.host);
        let started = std::time::Instant::now();
        self.store.start_run();
        let manager = self.host.manager();
        let (requests, changes, calls, writes) = (
            self.store.requests(),
            manager.changes(),
            manager.calls(),
            self.host.state_writes(),
        );
        let dir = &self.config.state_dir;
        // With a user manager, units log to files under logs/ (there is no journal for them).
        let logs = dir.join("logs");
        let dirs = if self.config.user { &logs } else { dir };
        std::fs::create_dir_all(dirs)
            .map_err(|e| AgentError::io(format!("creating {}", dirs.display()), e))?;
        // Held until the report is published: publishing saves state.json too.
        let _lock = RunLock::acquire(dir)?;
        let mut events = Vec::new();
        let mut state = State::load(dir, &self.config.host)?;
        state.record_migrated(|text| self.host.record_unit_text(text))?;
        let mut result = self
            .run_once_inner(&mut state, &mut events)
            .instrument(span.clone())
            .await;
        self.publish(&mut state, started.elapsed())
            .instrument(span.clone())
            .await;
        self.write_history(&events).instrument(span).await;
        self.config.notify.spawn(events);
        if let Ok(report) = &mut result {
            report.store_requests = self
                .store
                .requests()
                .zip(requests)
                .map(|(after, before)| after - before);
            report.systemd_changes = manager.changes() - changes;
            report.systemd_calls = manager.calls() - calls;
            report.state_writes = self.host.state_writes() - writes;
        }
        result
    }

    /// The run, under the run lock; what happened also goes to `events` (a run that fails
    /// may still have repaired drift).
    async fn run_once_inner(
        &self,
        state: &mut State,
        events: &mut Vec<deploy_manifest::history::Event>,
    ) -> Result<RunReport, AgentError> {
        state.host = self.config.host.clone();
        state.last_poll = Some(now());
        let etag = self.etag(state);
        let polled = self.poll(state, etag.as_deref()).await;
        let (manifest, etag) = match polled {
            Ok(Polled::Changed { manifest, etag }) => match self.accept(&manifest, state) {
                Ok(()) => (manifest, etag),
                Err(e) => return self.fail_run(state, e, events).await,
            },
            Ok(Polled::Unchanged) => return self.run_unchanged(state, events).await,
            Err(e) => {
                if let AgentError::Manifest(deploy_manifest::Error::Trust(
                    deploy_manifest::sign::TrustError::Expired { expires, .. },
                )) = &e
                {
                    state.expired = Some(expires.clone());
                }
                return self.fail_run(state, e, events).await;
            }
        };

        crate::fault::point("manifest");
        let rollouts = self.gather(&manifest, state, true).await;
        let plan = plan(&manifest, state, &self.host, &self.config, &rollouts).await;
        let mut report = RunReport {
            manifest_version: manifest.version.clone(),
            ..RunReport::default()
        };
        let applied = self.apply(&plan, Some(&manifest), state, &mut report).await;
        // What was done is told even if the state could not be saved after it.
        events.clone_from(&report.events);
        applied?;
        let rolling = self.record(&plan, &rollouts, state, &mut report).await;
        events.clone_from(&report.events);
        state.manifest_version = manifest.version.clone();
        state.manifest_created_at = manifest.created_at.clone();
        state.manifest_sequence = manifest.sequence;
        state.manifest_expires = manifest.expires.clone();
        // Remembering the ETag makes the next poll a cheap 304; forget it when a host-side
        // problem (secrets file, fetch) should be retried with a full plan, or while a
        // staged rollout this host takes part in goes on (its gates change without the
        // manifest).
        state.manifest_etag = (!report.retry() && !rolling).then_some(etag);
        state.mode = self.config.mode.clone();
        state.last_error = report.failure();
        if report.ok() {
            state.last_success = Some(now());
        }
        self.host.save_state(state)?;
        // Only now that no saved state names them: the unit files of generations gone.
        self.host.prune_unit_texts(state);
        Ok(report)
    }

    /// `manifest.json` unchanged: repair drift from the state alone.
    async fn run_unchanged(
        &self,
        state: &mut State,
        events: &mut Vec<deploy_manifest::history::Event>,
    ) -> Result<RunReport, AgentError> {
        if !self.config.trusted_keys.is_empty() {
            state.expired = state
                .manifest_expires
                .clone()
                .filter(|e| deploy_manifest::sign::has_expired(e, SystemTime::now()));
            if let Some(e) = &state.expired {
                tracing::warn!(expires = %e, "the applied manifest has expired: no newer one will be accepted until a writer runs `deploy-manifest refresh`");
            }
        }
        let plan = plan_unchanged(state, &self.host).await;
        let mut report = RunReport {
            unchanged: true,
            manifest_version: state.manifest_version.clone(),
            ..RunReport::default()
        };
        let applied = self.apply(&plan, None, state, &mut report).await;
        events.clone_from(&report.events);
        applied?;
        // What could not be repaired from the state alone is planned in full next time
        // (not with an expired manifest, which a full poll would refuse).
        if report.retry() && state.expired.is_none() {
            state.manifest_etag = None;
        }
        tracing::info!(
            repaired = ?report.services_where(|o| *o == Outcome::Repaired),
            "manifest unchanged"
        );
        state.last_error = report.failure();
        if report.ok() {
            state.last_success = Some(now());
        }
        self.host.save_state(state)?;
        Ok(report)
    }

    /// No manifest to act on (unreachable store, invalid or refused manifest): nothing new
    /// is applied; what runs keeps running (drift repaired from the state alone).
    async fn fail_run(
        &self,
        state: &mut State,
        e: AgentError,
        events: &mut Vec<deploy_manifest::history::Event>,
    ) -> Result<RunReport, AgentError> {
        tracing::error!(error = %e, "run failed; nothing new was applied, keeping what runs");
        let plan = plan_unchanged(state, &self.host).await;
        let mut report = RunReport::default();
        let applied = self.apply(&plan, None, state, &mut report).await;
        *events = std::mem::take(&mut report.events);
        applied?;
        let repaired = report.services_where(|o| *o == Outcome::Repaired);
        if !repaired.is_empty() {
            tracing::warn!(?repaired, "restored services that had drifted");
        }
        state.last_error = Some(e.to_string());
        self.host.save_state(state)?;
        Err(e)
    }

    /// `deployer-agent run`: reconcile every `interval` (with up to 10 % jitter), backing
    /// off after failures, until the process is stopped.
    pub async fn run_forever(&self) -> ! {
        let mut failures: u32 = 0;
        loop {
            let wait = match self.run_once().await {
                Ok(report) if report.ok() => {
                    failures = 0;
                    self.config.interval
                }
                Ok(_) => self.config.interval,
                Err(e) => {
                    failures += 1;
                    let backoff = Duration::from_secs(5u64 << failures.min(6));
                    tracing::error!(error = %e, retry_in = ?backoff.min(self.config.interval), "run failed");
                    backoff.min(self.config.interval)
                }
            };
            tokio::time::sleep(jitter(wait)).await;
        }
    }
}

/// `d` plus up to 10 %.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos() as u128;
    let extra = d.as_millis() / 10 * nanos / 1_000_000_000;
    d + Duration::from_millis(extra as u64)
}
