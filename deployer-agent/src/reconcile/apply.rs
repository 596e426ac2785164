//! Executing a plan ([`crate::plan`]): each step as written, in order, with its own error
//! boundary, the state saved after each. Nothing here decides what to do; it does what the
//! step says and records how it went.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use deploy_manifest::model::{Manifest, Release, Service};
use deploy_manifest::store::ObjectStore;
use tracing::Instrument;

use super::{Agent, InfraOutcome, Outcome, RunReport, now};
use crate::AgentError;
use crate::health::{ExecProbe, Probes};
use crate::host::Host;
use crate::names;
use crate::plan::{Condition, Deploy, InfraStep, Plan, Recovery, Step, Strategy, spec_hash};
use crate::proxy::Route;
use crate::state::{Failure, Generation, Health, InfraState, RouteState, ServiceState, State};
use crate::systemd::{JobResult, ServiceManager};
use crate::unit::{EnvFile, UnitSpec, split_command};

/// How a deploy that did not complete ended.
enum Failed {
    /// Nothing changed on the host (or what changed was undone without a verdict on the
    /// spec): the next run tries again.
    Retry(String),
    /// The new generation failed; it was undone as the step's recovery rule says and its
    /// spec is not tried again.
    RolledBack(String),
}

/// How far a deploy got before it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing on the host changed (secrets file, fetch, unit rendering): retried next run.
    Untouched,
    /// The release command failed: the spec is marked failed, the old generation never
    /// stopped.
    ReleaseFailed,
    /// The unit was written and restarted: the step's recovery rule undoes it.
    Touched,
}

impl<S: ObjectStore, H: Host> Agent<S, H> {
    /// Execute `plan`: every step, in order, saving the state after each (a crash loses at
    /// most the step in progress). `manifest` is what a full plan was made from.
    pub(crate) async fn apply(
        &self,
        plan: &Plan,
        manifest: Option<&Manifest>,
        state: &mut State,
        report: &mut RunReport,
    ) -> Result<(), AgentError> {
        // Infrastructure that failed this run, and why: the deploys that need it wait.
        let mut infra_failed = BTreeMap::new();
        for step in &plan.steps {
            let span = tracing::info_span!("step", subject = %step.subject());
            self.step(step, manifest, state, report, &mut infra_failed)
                .instrument(span)
                .await;
            report.steps.push(step.clone());
            // A crash after this point loses nothing that is done.
            self.host.save_state(state)?;
            crate::fault::point("saved");
        }
        Ok(())
    }

    async fn step(
        &self,
        step: &Step,
        manifest: Option<&Manifest>,
        state: &mut State,
        report: &mut RunReport,
        infra_failed: &mut BTreeMap<String, String>,
    ) {
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
                let outcome = self.keep(name, unit, condition, state).await;
                report.services.insert(name.clone(), outcome);
                if *recheck
                    && let Some(s) = service(name)
                    && self.clear_failure(s, state).await
                {
                    self.retire_untracked(retire_after, report).await;
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
            Step::Deploy(d) => {
                let (Some(s), Some(m)) = (service(&d.service), manifest) else {
                    return;
                };
                let outcome = match self.deploy(d, s, m, state, infra_failed, report).await {
                    Ok(()) => Outcome::Deployed,
                    Err(Failed::Retry(error)) => {
                        tracing::error!(%error, "not deployed, nothing changed; the next run retries");
                        Outcome::Retrying { error }
                    }
                    Err(Failed::RolledBack(error)) => {
                        tracing::error!(%error, "deploy failed and was rolled back");
                        Outcome::RolledBack { error }
                    }
                };
                report.services.insert(d.service.clone(), outcome);
            }
            Step::Remove { service, unit } => {
                let outcome = match self.remove(service, unit, state).await {
                    Ok(()) => Outcome::Removed,
                    Err(e) => {
                        tracing::error!(error = %e, "could not remove it; the next run retries");
                        Outcome::Retrying {
                            error: e.to_string(),
                        }
                    }
                };
                report.services.insert(service.clone(), outcome);
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
            Condition::Unknown(e) => {
                tracing::warn!(error = %e, "cannot tell whether it runs; left as it is");
                InfraOutcome::Unknown { error: e.clone() }
            }
            Condition::Stopped | Condition::Changed => {
                tracing::info!(condition = %step.condition, "starting it");
                let file_ok = step.condition == Condition::Stopped;
                self.put_back(&step.unit, &step.unit_file, file_ok).await?;
                if state.infra.contains_key(name) {
                    InfraOutcome::Repaired
                } else {
                    InfraOutcome::Started
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
        Ok(Probes {
            http: None,
            tcp: ep.port(),
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
        let Some(current) = entry.current.clone() else {
            return Outcome::Kept;
        };
        // A secrets file created or changed since the deploy is read at the next restart.
        entry.warning = self
            .host
            .env_warning(&EnvFile::parse_all(&current.unit_file));
        if let Some(w) = &entry.warning {
            tracing::warn!(warning = %w, "fix it before the service restarts");
        }
        match condition {
            Condition::Running => Outcome::Kept,
            Condition::Unknown(e) => {
                entry.last_error = Some(e.clone());
                Outcome::Drifted { error: e.clone() }
            }
            Condition::Stopped | Condition::Changed => {
                tracing::warn!(%condition, "drift: restoring the recorded generation");
                let file_ok = *condition == Condition::Stopped;
                let result = self.put_back(unit, &current.unit_file, file_ok).await;
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
    async fn retire_untracked(&self, units: &[String], report: &mut RunReport) {
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
    /// Returns whether it did.
    async fn clear_failure(&self, service: &Service, state: &mut State) -> bool {
        let Some(entry) = state.services.get_mut(&service.name) else {
            return false;
        };
        let Some(current) = &entry.current else {
            return false;
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
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "runs the manifest's spec, but not healthily");
                entry.health = Health::Unhealthy;
                entry.last_error = Some(format!("unhealthy: {e}"));
                false
            }
        }
    }

    /// Put `unit` back as `unit_file`: rewrite its file (and reload) unless `file_ok`,
    /// then (re)start it.
    async fn put_back(&self, unit: &str, unit_file: &str, file_ok: bool) -> Result<(), AgentError> {
        let manager = self.host.manager();
        if !file_ok {
            self.host.write_unit(unit, unit_file)?;
            manager.reload().await?;
        }
        manager.restart(unit).await?;
        Ok(())
    }

    /// The routes of every deployed generation, with `service`'s replaced by `route`.
    fn routes(state: &State, service: Option<(&str, Option<&RouteState>)>) -> Vec<Route> {
        let mut routes: Vec<Route> = state
            .services
            .iter()
            .filter(|(name, _)| service.is_none_or(|(s, _)| s != name.as_str()))
            .filter_map(|(name, s)| {
                let r = s.current.as_ref()?.route.as_ref()?;
                Some((name.as_str(), r))
            })
            .chain(service.and_then(|(name, r)| r.map(|r| (name, r))))
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
        let result = self.host.apply_routes(&Self::routes(state, None)).await;
        result.err().map(|e| {
            tracing::error!(error = %e, "routes not applied; retrying on the next run");
            e.to_string()
        })
    }

    /// The unit for `service` running the artifact at `artifact` (with `release`, the
    /// one-shot unit that runs that release command instead); also the sandbox of the
    /// service's exec probes.
    fn unit_spec(
        &self,
        service: &Service,
        artifact: &Path,
        env_files: &[EnvFile],
        port: Option<u16>,
        release: Option<&Release>,
    ) -> Result<UnitSpec, AgentError> {
        let exec = service.exec.as_ref();
        let command = release.map(|r| r.command.as_str());
        let mut argv = match (command, exec.and_then(|e| e.command.as_deref())) {
            (Some(line), _) | (None, Some(line)) => split_command(line)?,
            (None, None) => vec![format!("bin/{}", service.name)],
        };
        if !argv[0].starts_with('/') {
            argv[0] = artifact.join(&argv[0]).display().to_string();
        }
        let system = !self.config.user;
        // Values with templates are resolved into the generated env file, not written here.
        let mut environment: BTreeMap<String, String> = service
            .env
            .iter()
            .filter(|(_, v)| !v.contains("${"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(p) = port {
            environment.insert("PORT".to_owned(), p.to_string());
        }
        let unit = match release {
            Some(_) => names::release_unit(&service.name),
            None => names::service_unit(&service.name),
        };
        let suffix = if release.is_some() { " release" } else { "" };
        Ok(UnitSpec {
            description: format!("deployer: {}{suffix}", service.name),
            exec_start: argv,
            working_directory: Some(artifact.to_path_buf()),
            user: exec.and_then(|e| e.user.clone()).filter(|_| system),
            group: exec.and_then(|e| e.group.clone()).filter(|_| system),
            environment,
            environment_files: env_files.to_vec(),
            log_file: self
                .config
                .user
                .then(|| names::log_file(&self.config.state_dir.join("logs"), &unit)),
            hardening: system,
            oneshot: release.is_some(),
            start_timeout: release.map(|r| r.timeout()),
        })
    }

    /// The probes of a recorded generation: its exec probe runs in the service's sandbox
    /// with the environment files its own unit file names.
    fn restored_probes(&self, service: &Service, prev: &Generation) -> Result<Probes, AgentError> {
        let env_files = EnvFile::parse_all(&prev.unit_file);
        let artifact = Path::new(&prev.path);
        // A zero-downtime generation listens on the port it was given.
        let port = prev.unit.as_ref().and(prev.route.as_ref()).map(|r| r.port);
        let spec = self.unit_spec(service, artifact, &env_files, port, None)?;
        Ok(Probes::of(service, artifact, port, &spec))
    }

    /// Deploy one service as the step says; on failure, undo what its recovery rule says
    /// and record why.
    async fn deploy(
        &self,
        d: &Deploy,
        service: &Service,
        manifest: &Manifest,
        state: &mut State,
        infra_failed: &BTreeMap<String, String>,
        report: &mut RunReport,
    ) -> Result<(), Failed> {
        let entry = state
            .services
            .entry(service.name.clone())
            .or_insert_with(|| ServiceState {
                unit: names::service_unit(&service.name),
                ..ServiceState::default()
            });
        if let Some(error) = d.infra.iter().find_map(|n| infra_failed.get(n)) {
            entry.last_error = Some(error.clone());
            return Err(Failed::Retry(error.clone()));
        }
        let generated = match self
            .host
            .app_env(service, manifest, &mut state.redis_indexes)
        {
            Ok(g) => g,
            Err(e) => {
                let error = e.to_string();
                state
                    .services
                    .get_mut(&service.name)
                    .expect("inserted")
                    .last_error = Some(error.clone());
                return Err(Failed::Retry(error));
            }
        };
        let entry = state.services.get_mut(&service.name).expect("inserted");
        let previous = entry.current.clone();
        let hash = spec_hash(service);
        let side_by_side = d.strategy == Strategy::SideBySide;
        let mut outcome = self
            .try_deploy(service, d, generated.as_deref(), &hash, manifest)
            .await;

        // Switch the route to the healthy new generation (before the old one stops).
        if let Ok(generation) = &outcome
            && self.host.has_proxy()
        {
            let routes = Self::routes(state, Some((&service.name, generation.route.as_ref())));
            if let Err(e) = self.host.apply_routes(&routes).await {
                if side_by_side {
                    // The old generation still has the route: give up the new one, retry later.
                    outcome = Err((AgentError::Proxy(e), Stage::Touched));
                } else {
                    // Restarted in place: the service runs; the route is retried next run.
                    tracing::error!(error = %e, "deployed, but the route was not applied");
                }
            }
        }

        let entry = state.services.get_mut(&service.name).expect("inserted");
        entry.updated_at = Some(now());
        match outcome {
            Ok(generation) => {
                if let Some(old) = &d.replaces {
                    if d.drain {
                        tokio::time::sleep(self.config.drain).await;
                    }
                    if let Err(e) = self.retire(old).await {
                        tracing::warn!(error = %e, unit = %old, "could not stop the previous generation");
                    }
                }
                self.retire_untracked(&d.retire_after, report).await;
                tracing::info!(artifact = %generation.artifact.label(), unit = %d.unit, "deployed and healthy");
                entry.unit = d.unit.clone();
                entry.previous = previous;
                entry.current = Some(generation);
                entry.deploys += 1;
                if service.release.is_some() {
                    entry.released = Some(service.artifact.clone());
                }
                entry.health = Health::Healthy;
                entry.failed = None;
                entry.last_error = None;
                Ok(())
            }
            Err((error, stage))
                if stage == Stage::Untouched
                    || side_by_side && matches!(error, AgentError::Proxy(_)) =>
            {
                if stage == Stage::Touched {
                    let _ = self.retire(&d.unit).await;
                }
                let error = error.to_string();
                entry.last_error = Some(error.clone());
                Err(Failed::Retry(error))
            }
            Err((error, stage)) => {
                let error = error.to_string();
                tracing::error!(%error, recovery = ?d.on_failure, "deploy failed; undoing it");
                let mut message = error.clone();
                let restored = match (stage, d.on_failure, &previous) {
                    // The service's unit was never touched: what ran still runs.
                    (Stage::ReleaseFailed, _, _) => Ok(None),
                    (_, Recovery::RestorePrevious, Some(prev)) => {
                        self.restore(&d.unit, Some(prev)).await.map(|()| Some(prev))
                    }
                    (_, Recovery::StopNew, _) => self.retire(&d.unit).await.map(|()| None),
                    (_, Recovery::RestoreFound, _) => match &d.found_unit {
                        Some(found) => {
                            message.push_str("; the unit file found on the host was put back");
                            let _ = self.host.manager().stop(&d.unit).await;
                            self.put_back(&d.unit, found, false).await.map(|()| None)
                        }
                        None => self.restore(&d.unit, None).await.map(|()| None),
                    },
                    (_, Recovery::RemoveNew | Recovery::RestorePrevious, _) => {
                        self.restore(&d.unit, None).await.map(|()| None)
                    }
                };
                entry.health = match restored {
                    // Probe the restored generation (with the manifest's health settings).
                    Ok(Some(prev)) => {
                        let healthy = match self.restored_probes(service, prev) {
                            Ok(probes) => {
                                self.host
                                    .wait_healthy(&d.unit, &probes, self.config.settle)
                                    .await
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        match healthy {
                            Ok(()) => Health::Healthy,
                            Err(e) => {
                                message = format!(
                                    "{message}; the restored previous generation is unhealthy too: {e}"
                                );
                                Health::Unhealthy
                            }
                        }
                    }
                    // What ran before never stopped.
                    Ok(None) if previous.is_some() => entry.health,
                    Ok(None) => Health::Unknown,
                    Err(e) => {
                        message = format!(
                            "{message}; restoring the previous generation also failed: {e}"
                        );
                        Health::Unhealthy
                    }
                };
                entry.rollbacks += 1;
                entry.failed = Some(Failure {
                    spec_hash: hash,
                    artifact: service.artifact.clone(),
                    version: manifest.version.clone(),
                    error: message.clone(),
                    at: now(),
                });
                entry.last_error = Some(message.clone());
                Err(Failed::RolledBack(message))
            }
        }
    }

    /// The deploy's actions. The error says how far they got (and so what must be undone).
    async fn try_deploy(
        &self,
        service: &Service,
        d: &Deploy,
        generated_env: Option<&Path>,
        hash: &str,
        manifest: &Manifest,
    ) -> Result<Generation, (AgentError, Stage)> {
        let untouched = |e: AgentError| (e, Stage::Untouched);
        let env_file = self
            .host
            .env_file(&service.name, service.env_file.as_deref())
            .map_err(untouched)?;
        let artifact = self
            .host
            .fetch(&self.store, &service.artifact)
            .await
            .map_err(untouched)?;
        crate::fault::point("fetched");
        // Generated settings first, the operator's secrets file last (it wins).
        let env_files: Vec<EnvFile> = generated_env
            .map(EnvFile::required)
            .into_iter()
            .chain([env_file])
            .collect();
        let spec = self
            .unit_spec(service, &artifact, &env_files, d.port, None)
            .map_err(untouched)?;
        let unit_file = spec.render().map_err(|e| untouched(e.into()))?;
        if d.release
            && let Some(release) = &service.release
        {
            let text = self
                .unit_spec(service, &artifact, &env_files, d.port, Some(release))
                .and_then(|spec| Ok(spec.render()?))
                .map_err(untouched)?;
            self.run_release(service, release, &text)
                .await
                .map_err(|e| match e {
                    AgentError::Release(_) => (e, Stage::ReleaseFailed),
                    e => untouched(e),
                })?;
        }
        let touched = |e: AgentError| (e, Stage::Touched);
        let manager = self.host.manager();
        self.host.write_unit(&d.unit, &unit_file).map_err(touched)?;
        crate::fault::point("unit-written");
        manager.reload().await.map_err(|e| touched(e.into()))?;
        manager
            .restart(&d.unit)
            .await
            .map_err(|e| touched(e.into()))?;
        crate::fault::point("restarted");
        let probes = Probes::of(service, &artifact, d.port, &spec);
        self.host
            .wait_healthy(&d.unit, &probes, self.config.settle)
            .await
            .map_err(|detail| touched(AgentError::Unhealthy(detail)))?;
        crate::fault::point("healthy");
        Ok(Generation {
            artifact: service.artifact.clone(),
            path: artifact.display().to_string(),
            spec_hash: hash.to_owned(),
            version: manifest.version.clone(),
            deployed_at: now(),
            unit_file,
            unit: d.port.map(|_| d.unit.clone()),
            route: d.route.clone(),
        })
    }

    /// Run `service`'s release command as its one-shot release unit (from `text`), which
    /// is removed afterwards. A command that fails is `AgentError::Release`.
    async fn run_release(
        &self,
        service: &Service,
        release: &Release,
        text: &str,
    ) -> Result<(), AgentError> {
        let unit = names::release_unit(&service.name);
        let manager = self.host.manager();
        self.host.write_unit(&unit, text)?;
        manager.reload().await?;
        let timeout = release.timeout();
        tracing::info!(command = %release.command, ?timeout, "running the release command");
        // systemd kills it at TimeoutStartSec=; waiting longer than that plus its
        // TimeoutStopSec= (30 s) is only for a manager that does not answer.
        let wait = timeout + Duration::from_secs(45);
        let ran = manager.run_oneshot(&unit, wait).await;
        let _ = self.retire(&unit).await;
        let command = &release.command;
        let why = match ran {
            Ok(JobResult::Done) => return Ok(()),
            Ok(JobResult::Failed(how)) => format!("{command:?} {how}"),
            Ok(JobResult::Timeout) => format!(
                "{command:?} was still running after its timeout of {} and was killed",
                humantime::format_duration(timeout)
            ),
            Ok(JobResult::Other(result)) => {
                format!("{command:?}: its systemd job ended with {result:?}")
            }
            Err(e) => e.to_string(),
        };
        Err(AgentError::Release(why))
    }

    /// Stop a unit and remove its file.
    pub(crate) async fn retire(&self, unit: &str) -> Result<(), AgentError> {
        let manager = self.host.manager();
        let _ = manager.stop(unit).await;
        self.host.remove_unit(unit)?;
        manager.reload().await?;
        Ok(())
    }

    /// Put the previous generation back (or, for a first deploy, stop and remove the unit).
    async fn restore(&self, unit: &str, previous: Option<&Generation>) -> Result<(), AgentError> {
        // Stop first: a failed unit may have an automatic restart pending, which would
        // otherwise fire after the previous generation is back.
        let _ = self.host.manager().stop(unit).await;
        match previous {
            Some(g) => self.put_back(unit, &g.unit_file, false).await,
            None => self.retire(unit).await,
        }
    }

    /// Stop and remove a service no longer declared for this host. Its artifacts, data and
    /// secrets stay.
    async fn remove(&self, name: &str, unit: &str, state: &mut State) -> Result<(), AgentError> {
        self.retire(unit).await?;
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
        tracing::info!("removed (artifacts, data and secrets are kept)");
        Ok(())
    }
}
