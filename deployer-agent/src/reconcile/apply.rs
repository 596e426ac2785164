//! Executing a plan ([`crate::plan`]): each step as written, in order, with its own error
//! boundary, the state saved after each step that changed it. Nothing here decides what to
//! do; it does what the step says and records how it went.

use std::collections::BTreeMap;
use std::time::Duration;

use deploy_manifest::model::{Manifest, Service};
use deploy_manifest::store::ObjectStore;
use futures_util::StreamExt;
use tracing::Instrument;

use super::deploy::{Failed, Job, Replaced, STARTING_AT_ONCE};
use super::events::{Detail, event_of};
use super::{Agent, InfraOutcome, Outcome, RunReport, now};
use crate::AgentError;
use crate::health::{ExecProbe, Probes};
use crate::host::Host;
use crate::names;
use crate::plan::{Condition, InfraStep, Plan, Step};
use crate::proxy::Route;
use crate::state::{Health, InfraState, RouteState, ServiceState, State};
use crate::systemd::ServiceManager;

impl<S: ObjectStore, H: Host> Agent<S, H> {
    /// Execute `plan`: every step, in order, saving the state after each that changed it (a
    /// crash loses at most the step in progress; a step that changed nothing costs no write).
    /// Consecutive deploys go as one batch ([`Agent::deploy_all`]: one reload, started and
    /// health-checked several at once), and consecutive removals too (one reload); the
    /// state is saved once after each batch. `manifest` is what a full plan was made from.
    pub(crate) async fn apply(
        &self,
        plan: &Plan,
        manifest: Option<&Manifest>,
        state: &mut State,
        report: &mut RunReport,
    ) -> Result<(), AgentError> {
        // Infrastructure that failed this run, and why: the deploys that need it wait.
        let mut infra_failed = BTreeMap::new();
        #[cfg(debug_assertions)]
        let mut last_saved = state.clone();
        let mut at = 0;
        while at < plan.steps.len() {
            let rest = &plan.steps[at..];
            let batch = |pick: fn(&Step) -> bool| rest.iter().take_while(|s| pick(s)).count();
            // A deploy that runs a release command goes alone: it starts right after its
            // migration.
            let deploys = match rest.first() {
                Some(Step::Deploy(d)) if d.release => 1,
                _ => batch(|s| matches!(s, Step::Deploy(d) if !d.release)),
            };
            let removals = batch(|s| matches!(s, Step::Remove { .. }));
            let group = &rest[..deploys.max(removals).max(1)];
            at += group.len();
            let before: Vec<Touched> = group.iter().map(|s| Touched::of(s, state)).collect();
            let started = std::time::Instant::now();
            let mut replaced = None;
            let details: Vec<(Option<Detail>, Duration)> = if deploys > 0 {
                let (details, r) = self
                    .deploy_steps(group, manifest, state, report, &infra_failed)
                    .await;
                replaced = Some(r);
                details
            } else if removals > 0 {
                self.remove_all(group, state, report).await;
                group.iter().map(|_| (None, started.elapsed())).collect()
            } else {
                let step = &group[0];
                let span = tracing::info_span!("step", subject = %step.subject());
                let detail = self
                    .step(step, manifest, state, report, &mut infra_failed)
                    .instrument(span)
                    .await;
                vec![(detail, started.elapsed())]
            };
            for (step, (detail, took)) in group.iter().zip(details) {
                if let Some(service) = step.service()
                    && let Some(outcome) = report.services.get(service)
                    && let Some(event) = event_of(
                        &self.config.host,
                        service,
                        outcome,
                        detail,
                        took,
                        manifest,
                        state,
                    )
                {
                    report.events.push(event);
                }
                report.steps.push(step.clone());
            }
            if group.iter().zip(&before).any(|(s, b)| b.changes(s, state)) {
                // A crash after this point loses nothing that is done.
                self.host.save_state(state)?;
                crate::fault::point("saved");
                #[cfg(debug_assertions)]
                last_saved.clone_from(state);
            } else {
                #[cfg(debug_assertions)]
                assert!(
                    last_saved == *state,
                    "step {} changed the state, but Touched did not see it",
                    group[0].subject()
                );
            }
            // Only once the state records the new generations: what they replaced stops.
            if let Some(replaced) = replaced {
                self.retire_replaced(replaced, report).await;
            }
        }
        Ok(())
    }

    /// Consecutive deploy steps as one batch ([`Agent::deploy_all`]), each outcome in the
    /// report: for each, what it measured and saw, and how long it took; and what the new
    /// generations replaced, to stop once the state is saved.
    async fn deploy_steps(
        &self,
        steps: &[Step],
        manifest: Option<&Manifest>,
        state: &mut State,
        report: &mut RunReport,
        infra_failed: &BTreeMap<String, String>,
    ) -> (Vec<(Option<Detail>, Duration)>, Replaced) {
        let Some(m) = manifest else {
            let none = steps.iter().map(|_| (None, Duration::ZERO)).collect();
            return (none, Replaced::default());
        };
        // A revert deploys the service as this host ran it before.
        let jobs: Vec<Job<'_>> = steps
            .iter()
            .filter_map(|step| match step {
                Step::Deploy(d) => Some(d),
                _ => None,
            })
            .filter_map(|d| {
                let spec = d
                    .revert
                    .as_ref()
                    .map(|r| &r.0)
                    .or_else(|| m.service(&d.service));
                Some(Job { d, service: spec? })
            })
            .collect();
        let previous: Vec<Option<String>> = jobs
            .iter()
            .map(|job| {
                let entry = state.services.get(&job.d.service)?;
                Some(entry.current.as_ref()?.artifact.label())
            })
            .collect();
        let (results, replaced) = self.deploy_all(&jobs, m, state, infra_failed).await;
        let mut details: BTreeMap<&str, (Option<Detail>, Duration)> = BTreeMap::new();
        for ((job, previous), (result, trace)) in jobs.iter().zip(previous).zip(results) {
            let outcome = match result {
                Ok(()) => Outcome::Deployed,
                Err(Failed::Retry(error)) => {
                    tracing::error!(service = %job.d.service, %error, "not deployed, nothing changed; the next run retries");
                    Outcome::Retrying { error }
                }
                Err(Failed::RolledBack(error)) => {
                    tracing::error!(service = %job.d.service, %error, "deploy failed and was rolled back");
                    Outcome::RolledBack { error }
                }
            };
            report.services.insert(job.d.service.clone(), outcome);
            let took = trace.took;
            let detail = Detail {
                phases: trace.phases,
                log: trace.log,
                artifact: Some(job.service.artifact.label()),
                previous,
                reverted_to: job.d.revert.as_ref().map(|r| r.1.clone()),
            };
            details.insert(&job.d.service, (Some(detail), took));
        }
        let details = steps
            .iter()
            .map(|step| {
                step.service()
                    .and_then(|s| details.remove(s))
                    .unwrap_or((None, Duration::ZERO))
            })
            .collect();
        (details, replaced)
    }

    /// Consecutive remove steps: each service's unit stopped and its file removed, one
    /// reload for all, each outcome recorded.
    async fn remove_all(&self, steps: &[Step], state: &mut State, report: &mut RunReport) {
        let removals: Vec<(&String, &String)> = steps
            .iter()
            .filter_map(|step| match step {
                Step::Remove { service, unit } => Some((service, unit)),
                _ => None,
            })
            .collect();
        let units: Vec<String> = removals.iter().map(|(_, u)| (*u).clone()).collect();
        let retired = self.retire_all(&units).await;
        for ((service, _), (_, result)) in removals.into_iter().zip(retired) {
            let outcome = match result {
                Ok(()) => {
                    self.forget(service, state);
                    Outcome::Removed
                }
                Err(error) => {
                    tracing::error!(%service, %error, "could not remove it; the next run retries");
                    Outcome::NotRemoved { error }
                }
            };
            report.services.insert(service.clone(), outcome);
        }
    }

    async fn step(
        &self,
        step: &Step,
        manifest: Option<&Manifest>,
        state: &mut State,
        report: &mut RunReport,
        infra_failed: &mut BTreeMap<String, String>,
    ) -> Option<Detail> {
        let service = |name: &str| manifest.and_then(|m| m.service(name));
        match step {
            Step::Retire { unit } => {
                self.retire_untracked(std::slice::from_ref(unit), report)
                    .await
            }
            Step::Infra(infra) => {
                let outcome = match self.infra(infra, state).await {
                    Ok(outcome) => outcome,
                    Err(e) => {
                        tracing::error!(error = %e, "infrastructure not running");
                        infra_failed.insert(infra.name.clone(), e.to_string());
                        InfraOutcome::Failed {
                            error: e.to_string(),
                        }
                    }
                };
                report.infra.insert(infra.name.clone(), outcome);
            }
            Step::Keep {
                service: name,
                unit,
                condition,
                recheck,
                retire_after,
                ..
            } => {
                let mut outcome = self.keep(name, unit, condition, state).await;
                if *recheck && let Some(s) = service(name) {
                    match self.clear_failure(s, state).await {
                        Ok(true) => self.retire_untracked(retire_after, report).await,
                        Ok(false) => {}
                        Err(error) if outcome == Outcome::Kept => {
                            outcome = Outcome::Unhealthy { error }
                        }
                        Err(_) => {}
                    }
                }
                report.services.insert(name.clone(), outcome);
            }
            Step::Rename {
                service: name,
                from,
                to,
            } => {
                let s = service(name)?;
                let outcome = match self.rename(s, from, to, state).await {
                    Ok(()) => Outcome::Kept,
                    Err(error) => {
                        tracing::error!(%error, "not renamed; it runs under its old name");
                        Outcome::Retrying { error }
                    }
                };
                report.services.insert(name.clone(), outcome);
            }
            Step::Hold { service, reason } => {
                tracing::info!(%reason, "held by its rollout; what runs keeps running");
                // The Keep step before it may have found drift it could not repair.
                if report.services.get(service).is_none_or(|o| !o.failed()) {
                    report.services.insert(
                        service.clone(),
                        Outcome::Held {
                            reason: reason.clone(),
                        },
                    );
                }
            }
            Step::Skip { service, reason } => {
                tracing::warn!(%reason, "not retrying a deploy that failed");
                report.services.insert(service.clone(), Outcome::Skipped);
            }
            Step::Wait { service, reason } => {
                tracing::error!(%reason, "cannot deploy it on this run; the next run retries");
                if let Some(entry) = state.services.get_mut(service) {
                    entry.last_error = Some(reason.clone());
                }
                report.services.insert(
                    service.clone(),
                    Outcome::Retrying {
                        error: reason.clone(),
                    },
                );
            }
            Step::Deploy(_) | Step::Remove { .. } => {
                unreachable!("deploys and removals go in batches")
            }
            Step::StopInfra { name, unit } => match self.retire(unit).await {
                Ok(()) => {
                    tracing::info!("no service here needs it: stopped; its data is kept");
                    state.infra.remove(name);
                    state.orphans.push(format!(
                        "infrastructure {name}: stopped, no service on this host needs it; its data is kept in {}",
                        names::infra_dir(&self.config.state_dir, name).display()
                    ));
                    state.orphans.sort();
                    state.orphans.dedup();
                    report.infra.insert(name.clone(), InfraOutcome::Stopped);
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not stop it");
                    let error =
                        format!("no service here needs it, and it could not be stopped: {e}");
                    report
                        .infra
                        .insert(name.clone(), InfraOutcome::Failed { error });
                }
            },
            Step::Routes => report.route_error = self.sync_routes(state).await,
        }
        None
    }

    /// Infrastructure as the step says: started (its data directory prepared) when it is
    /// stopped or its unit changed, recorded, and with `ready`, waited for.
    async fn infra(&self, step: &InfraStep, state: &mut State) -> Result<InfraOutcome, AgentError> {
        let name = &step.name;
        let fail = |detail: String| AgentError::Infra {
            what: name.clone(),
            detail,
        };
        if let Some(e) = &step.error {
            return Err(fail(e.clone()));
        }
        // Its data directory is prepared (modes, owner, initdb) before it starts, and before
        // a deploy that needs it.
        let starts = matches!(step.condition, Condition::Stopped | Condition::Changed);
        if let Some(spec) = step.spec.as_ref().filter(|_| starts || step.ready) {
            self.host.prepare_infra(name, spec)?;
        }
        let outcome = match &step.condition {
            Condition::Running => InfraOutcome::Running,
            Condition::Unknown(e) | Condition::Taken(e) => {
                tracing::warn!(error = %e, "cannot tell whether it runs; left as it is");
                InfraOutcome::Unknown { error: e.clone() }
            }
            Condition::Stopped | Condition::Changed => {
                tracing::info!(condition = %step.condition, "starting it");
                let file_ok = step.condition == Condition::Stopped;
                let text = (!file_ok).then_some(step.unit_file.as_str());
                self.put_back(&step.unit, text).await?;
                // Put back as recorded, or started anew (first time, or a changed declaration).
                match state.infra.get(name) {
                    Some(recorded) if recorded.unit_file == step.unit_file => {
                        InfraOutcome::Repaired
                    }
                    _ => InfraOutcome::Started,
                }
            }
        };
        // What it runs from is known unless systemd could not tell.
        if !matches!(step.condition, Condition::Unknown(_)) {
            state.infra.insert(
                name.clone(),
                InfraState {
                    unit: step.unit.clone(),
                    unit_file: step.unit_file.clone(),
                    ports: step.keep_ports.clone(),
                },
            );
        }
        let Some(spec) = step.spec.as_ref().filter(|_| step.ready) else {
            return Ok(outcome);
        };
        let ep = crate::infra::endpoint(name, spec);
        let probes = self.infra_probes(name, spec, &ep)?;
        // The readiness gate: a critical service must be up before dependants start.
        if let Err(e) = self
            .host
            .wait_healthy(&step.unit, &probes, Duration::ZERO)
            .await
        {
            if ep.critical {
                return Err(fail(format!(
                    "not ready within {} s: {e}",
                    ep.startup_timeout.as_secs()
                )));
            }
            tracing::warn!(error = %e, "not ready; it is not critical, going on");
        }
        Ok(outcome)
    }

    /// How to tell that infrastructure service `name` is ready: its own healthCheck, else
    /// its port answers (and a postgres preset's pg_isready).
    fn infra_probes(
        &self,
        name: &str,
        spec: &deploy_manifest::model::InfraService,
        ep: &crate::infra::Endpoint,
    ) -> Result<Probes, AgentError> {
        let dir = &self.config.state_dir;
        if let Some(h) = &spec.health_check {
            return Ok(Probes::from_health(
                name,
                h,
                ep.port(),
                dir,
                ep.startup_timeout,
            ));
        }
        let exec = match spec.preset {
            Some(deploy_manifest::model::Preset::Postgres) => {
                let socket_dir = names::infra_dir(dir, name).join("run");
                let argv = vec![
                    crate::infra::pg_bin()?
                        .join("pg_isready")
                        .display()
                        .to_string(),
                    "-q".into(),
                    "-h".into(),
                    socket_dir.display().to_string(),
                    "-p".into(),
                    ep.port().unwrap_or(5432).to_string(),
                ];
                Some(ExecProbe::infrastructure(name, argv, dir))
            }
            _ => None,
        };
        // Garage's admin API is a socket; its S3 port says it runs.
        let tcp = match spec.preset {
            Some(deploy_manifest::model::Preset::Garage) => ep.ports.get("s3").copied(),
            _ => ep.port(),
        };
        Ok(Probes {
            http: None,
            tcp,
            exec,
            timeout: ep.startup_timeout,
            interval: Duration::from_millis(200),
        })
    }

    /// A deployed service as the `Keep` step says: put back as recorded if it drifted.
    async fn keep(
        &self,
        name: &str,
        unit: &str,
        condition: &Condition,
        state: &mut State,
    ) -> Outcome {
        let Some(entry) = state.services.get_mut(name) else {
            return Outcome::Kept;
        };
        let Some(current) = &entry.current else {
            return Outcome::Kept;
        };
        let unit_hash = current.unit_hash.clone();
        // A secrets file created or changed since the deploy is read at the next restart.
        entry.warning = self.host.env_warning(&current.env_files);
        if let Some(w) = &entry.warning {
            tracing::warn!(warning = %w, "fix it before the service restarts");
        }
        match condition {
            Condition::Running => Outcome::Kept,
            Condition::Unknown(e) | Condition::Taken(e) => {
                entry.last_error = Some(e.clone());
                Outcome::Drifted { error: e.clone() }
            }
            Condition::Stopped | Condition::Changed => {
                tracing::warn!(%condition, "drift: restoring the recorded generation");
                let text = match condition {
                    Condition::Stopped => None,
                    _ => match self.host.recorded_unit_text(&unit_hash) {
                        Ok(text) => Some(text),
                        // Nothing to put back: a full plan deploys the manifest's spec again.
                        Err(e) => {
                            let error = format!(
                                "its unit file changed on the host and the copy recorded to put it back is gone ({e}); the next run deploys it again from the manifest"
                            );
                            entry.last_error = Some(error.clone());
                            return Outcome::Retrying { error };
                        }
                    },
                };
                let result = self.put_back(unit, text.as_deref()).await;
                entry.updated_at = Some(now());
                match result {
                    Ok(()) => {
                        entry.last_error = None;
                        entry.health = Health::Healthy;
                        Outcome::Repaired
                    }
                    Err(e) => {
                        let error = format!("could not put the recorded generation back: {e}");
                        entry.last_error = Some(error.clone());
                        entry.health = Health::Unhealthy;
                        Outcome::Drifted { error }
                    }
                }
            }
        }
    }

    /// Units of ours that no state records: stopped, their files removed.
    pub(super) async fn retire_untracked(&self, units: &[String], report: &mut RunReport) {
        for unit in units {
            tracing::warn!(%unit, "a unit of ours that no state records: stopping it and removing its file");
            match self.retire(unit).await {
                Ok(()) => report.retired.push(unit.clone()),
                Err(e) => tracing::error!(%unit, error = %e, "could not retire it"),
            }
        }
    }

    /// The manifest's spec runs (a `Keep` with `recheck`): a failure recorded for another
    /// spec (a version rolled back since), or for this one before the host was fixed (a
    /// missing artifact), is history once the running generation passes its health checks.
    /// `Ok(true)` when it passed, `Ok(false)` when there is no generation to probe, `Err`
    /// with why it is not healthy.
    async fn clear_failure(&self, service: &Service, state: &mut State) -> Result<bool, String> {
        let Some(entry) = state.services.get_mut(&service.name) else {
            return Ok(false);
        };
        let Some(current) = &entry.current else {
            return Ok(false);
        };
        let healthy = match self.restored_probes(service, current) {
            Ok(probes) => {
                self.host
                    .wait_healthy(&entry.unit, &probes, Duration::ZERO)
                    .await
            }
            Err(e) => Err(e.to_string()),
        };
        match healthy {
            Ok(()) => {
                tracing::info!("runs the manifest's spec healthily: earlier failure cleared");
                entry.failed = None;
                entry.last_error = None;
                entry.health = Health::Healthy;
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(error = %e, "runs the manifest's spec, but not healthily");
                entry.health = Health::Unhealthy;
                entry.last_error = Some(format!("unhealthy: {e}"));
                Err(e)
            }
        }
    }

    /// Put `unit` back: rewrite its file as `unit_file` (and reload) if given, then
    /// (re)start it.
    pub(super) async fn put_back(
        &self,
        unit: &str,
        unit_file: Option<&str>,
    ) -> Result<(), AgentError> {
        let manager = self.host.manager();
        if let Some(text) = unit_file {
            self.host.write_unit(unit, text)?;
            manager.reload().await?;
        }
        manager.restart(unit).await?;
        Ok(())
    }

    /// The routes of every deployed generation, with those of the services in `changed`
    /// replaced by theirs.
    pub(super) fn routes(state: &State, changed: &[(&str, Option<&RouteState>)]) -> Vec<Route> {
        let changed_names: std::collections::BTreeSet<&str> =
            changed.iter().map(|(name, _)| *name).collect();
        let mut routes: Vec<Route> = state
            .services
            .iter()
            .filter(|(name, _)| !changed_names.contains(name.as_str()))
            .filter_map(|(name, s)| {
                let r = s.current.as_ref()?.route.as_ref()?;
                Some((name.as_str(), r))
            })
            .chain(changed.iter().filter_map(|(name, r)| r.map(|r| (*name, r))))
            .map(|(name, r)| Route {
                service: name.to_owned(),
                domain: r.domain.to_ascii_lowercase(),
                path: deploy_manifest::validate::route_path(&r.path),
                port: r.port,
            })
            .collect();
        routes.sort();
        routes
    }

    /// Apply every route the state knows; the error, if any, for the report.
    pub(crate) async fn sync_routes(&self, state: &State) -> Option<String> {
        if !self.host.has_proxy() {
            return None;
        }
        let result = self.host.apply_routes(&Self::routes(state, &[])).await;
        result.err().map(|e| {
            tracing::error!(error = %e, "routes not applied; retrying on the next run");
            e.to_string()
        })
    }

    /// Stop a unit and remove its file.
    pub(crate) async fn retire(&self, unit: &str) -> Result<(), AgentError> {
        self.stop_and_remove(unit).await?;
        self.host.manager().reload().await?;
        Ok(())
    }

    /// Stop units and remove their files, several at once, with one reload for all: what
    /// came of each, in order.
    pub(crate) async fn retire_all(&self, units: &[String]) -> Vec<(String, Result<(), String>)> {
        if units.is_empty() {
            return Vec::new();
        }
        let stops = units.iter().enumerate().map(|(i, unit)| async move {
            (
                i,
                self.stop_and_remove(unit).await.map_err(|e| e.to_string()),
            )
        });
        let mut done: Vec<_> = futures_util::stream::iter(stops)
            .buffer_unordered(STARTING_AT_ONCE)
            .collect()
            .await;
        done.sort_by_key(|(i, _)| *i);
        let reloaded = self.host.manager().reload().await;
        units
            .iter()
            .zip(done)
            .map(|(unit, (_, result))| {
                let result = result.and_then(|()| match &reloaded {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.to_string()),
                });
                (unit.clone(), result)
            })
            .collect()
    }

    /// Stop a unit and remove its file; the manager sees the file gone at the next reload.
    async fn stop_and_remove(&self, unit: &str) -> Result<(), AgentError> {
        // A name that now stands for a unit of the host's (an alias made since, a file in
        // a directory that takes precedence) is not stopped: only our file goes.
        match crate::plan::foreign(&self.host, unit).await {
            None => {
                let _ = self.host.manager().stop(unit).await;
            }
            Some(why) => tracing::warn!(%unit, %why, "not stopping it: the name is not ours now"),
        }
        self.host.remove_unit(unit)
    }

    /// A service no longer declared for this host, whose unit is gone: forgotten. Its
    /// artifacts, data and secrets stay.
    fn forget(&self, name: &str, state: &mut State) {
        state.services.remove(name);
        // Its data stays: say what is left behind.
        if self.host.has_database(name) {
            state.orphans.push(format!(
                "database {name} (role {name}) of removed service {name}"
            ));
        }
        if let Some(i) = state.redis_indexes.get(name) {
            state.orphans.push(format!(
                "redis index {i} of removed service {name} (kept reserved)"
            ));
        }
        state.orphans.sort();
        state.orphans.dedup();
        tracing::info!(service = %name, "removed (artifacts, data and secrets are kept)");
    }
}

/// The part of the state a step that may change nothing can touch, as it was before the
/// step: compared after it to tell whether the state must be written. Cheap (one entry), so
/// that a run that keeps 1,000 services costs no write per service. Debug builds check the
/// whole state against the last write, so a step touching more than this says so.
#[derive(PartialEq)]
enum Touched {
    /// A step that changes the state whenever it runs (a deploy, a rename, a removal,
    /// infrastructure stopped): always written.
    Always,
    Service(Option<Box<ServiceState>>, Option<String>),
    Infra(Option<InfraState>),
    /// Changes the host only (a unit retired, the routes applied).
    Nothing,
}

impl Touched {
    fn of(step: &Step, state: &State) -> Touched {
        match step {
            Step::Deploy(_)
            | Step::Rename { .. }
            | Step::Remove { .. }
            | Step::StopInfra { .. } => Touched::Always,
            Step::Keep { service, .. }
            | Step::Hold { service, .. }
            | Step::Skip { service, .. }
            | Step::Wait { service, .. } => Touched::Service(
                state.services.get(service).cloned().map(Box::new),
                state.told.get(service).cloned(),
            ),
            Step::Infra(i) => Touched::Infra(state.infra.get(&i.name).cloned()),
            Step::Retire { .. } | Step::Routes => Touched::Nothing,
        }
    }

    /// Whether `step` changed the state since this was taken.
    fn changes(&self, step: &Step, state: &State) -> bool {
        *self == Touched::Always || *self != Touched::of(step, state)
    }
}
