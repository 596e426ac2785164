//! The `deploy` step: secrets checked, artifact fetched, release run, unit written and
//! restarted, health gate, route switch; and when it fails, the step's recovery rule
//! (`restore` the previous generation, put back a found unit, or stop the new one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deploy_manifest::history::{self, Phase, Phases};

use deploy_manifest::model::{Exec, Manifest, Release, RunAs, Service};
use deploy_manifest::store::ObjectStore;

use super::{Agent, RunReport, now};
use crate::AgentError;
use crate::evidence::LogMark;
use crate::health::Probes;
use crate::host::Host;
use crate::names;
use crate::plan::{Deploy, Recovery, Strategy, spec_hash};
use crate::state::{Failure, Generation, Health, RolloutMark, RolloutStage, ServiceState, State};
use crate::systemd::{JobResult, ServiceManager};
use crate::unit::{EnvFile, Limits, Sandbox, UnitSpec, split_command};

/// How a deploy that did not complete ended.
pub(super) enum Failed {
    /// Nothing changed on the host (or what changed was undone without a verdict on the
    /// spec): the next run tries again.
    Retry(String),
    /// The new generation failed; it was undone as the step's recovery rule says and its
    /// spec is not tried again.
    RolledBack(String),
}

/// What a deploy step measured and saw: seconds per phase, and when it failed, the log
/// its unit left (masked, bounded: [`crate::evidence`]).
#[derive(Debug, Clone, Default)]
pub(super) struct Trace {
    pub phases: Phases,
    pub log: Vec<String>,
}

/// Add the time since `since` to `phase`.
fn timed(phases: &mut Phases, phase: Phase, since: Instant) {
    *phases.entry(phase).or_default() += history::seconds(since.elapsed());
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
        let run_as = exec.map_or(RunAs::Root, Exec::run_as);
        let (user, dynamic_user) = match run_as {
            _ if !system => (None, false),
            RunAs::Root => (None, false),
            RunAs::Account(name) => (Some(name.to_owned()), false),
            RunAs::Dynamic => (Some(names::dynamic_user(&service.name)), true),
        };
        let sandbox = system.then(|| Sandbox {
            state_directory: Some(names::state_directory(&service.name)),
            writable: exec
                .map(|e| e.writable_paths.iter().map(PathBuf::from).collect())
                .unwrap_or_default(),
            hidden: self.config.hidden_from_services(),
        });
        Ok(UnitSpec {
            description: format!("{}{suffix}", names::description(&service.name)),
            exec_start: argv,
            working_directory: Some(artifact.to_path_buf()),
            user,
            group: exec.and_then(|e| e.group.clone()).filter(|_| system),
            dynamic_user,
            environment,
            environment_files: env_files.to_vec(),
            log_file: self
                .config
                .user
                .then(|| names::log_file(&self.config.state_dir.join("logs"), &unit)),
            sandbox,
            limits: Limits {
                memory_max: exec.and_then(|e| e.memory_max.clone()),
                cpu_quota: exec.and_then(|e| e.cpu_quota.clone()),
                tasks_max: exec.and_then(|e| e.tasks_max),
            },
            oneshot: release.is_some(),
            start_timeout: release.map(|r| r.timeout()),
        })
    }

    /// The probes of a recorded generation: its exec probe runs in the service's sandbox
    /// with the environment files its own unit file names.
    pub(super) fn restored_probes(
        &self,
        service: &Service,
        prev: &Generation,
    ) -> Result<Probes, AgentError> {
        let env_files = EnvFile::parse_all(&prev.unit_file);
        let artifact = Path::new(&prev.path);
        // A zero-downtime generation listens on the port it was given.
        let port = prev.unit.as_ref().and(prev.route.as_ref()).map(|r| r.port);
        let spec = self.unit_spec(service, artifact, &env_files, port, None)?;
        Ok(Probes::of(service, artifact, port, &spec))
    }

    /// Deploy one service as the step says; on failure, undo what its recovery rule says
    /// and record why. What it measured and saw goes into `trace`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn deploy(
        &self,
        d: &Deploy,
        service: &Service,
        manifest: &Manifest,
        state: &mut State,
        infra_failed: &BTreeMap<String, String>,
        report: &mut RunReport,
        trace: &mut Trace,
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
        if let Err(error) = self.host.check_exec(service) {
            entry.last_error = Some(error.clone());
            return Err(Failed::Retry(error));
        }
        let provisioning = Instant::now();
        let generated = self
            .host
            .app_env(service, manifest, &mut state.redis_indexes);
        timed(&mut trace.phases, Phase::Infrastructure, provisioning);
        let generated = match generated {
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
            .try_deploy(service, d, generated.as_deref(), &hash, manifest, trace)
            .await;

        // Switch the route to the healthy new generation (before the old one stops).
        if let Ok(generation) = &outcome
            && self.host.has_proxy()
        {
            let routes = Self::routes(state, Some((&service.name, generation.route.as_ref())));
            let switching = Instant::now();
            let applied = self.host.apply_routes(&routes).await;
            timed(&mut trace.phases, Phase::Route, switching);
            if let Err(e) = applied {
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
            Ok(mut generation) => {
                if let Some(revert) = &d.revert {
                    generation.version = revert.1.clone();
                }
                // Through its rollout's gate: watched until the rollout is done. Over
                // nothing that ran here (no generation, no unit found), an abort removes it.
                let first = previous.is_none() && d.found_unit.is_none() && d.replaces.is_none();
                entry.rollout = d.rollout.as_ref().map(|hash| RolloutMark {
                    spec_hash: hash.clone(),
                    stage: if first {
                        RolloutStage::First
                    } else {
                        RolloutStage::Deployed
                    },
                });
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
                entry.phases = trace.phases.clone();
                observe(&mut state.phase_histogram, &trace.phases);
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
                    (_, Recovery::StartReplaced, _) => self
                        .start_replaced(&d.unit, d.restored_unit())
                        .await
                        .map(|()| previous.as_ref()),
                    (_, Recovery::RestoreFound, _) => {
                        message
                            .push_str(&self.restore_found(&d.unit, d.found_unit.as_deref()).await);
                        Ok(None)
                    }
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
                                    .wait_healthy(d.restored_unit(), &probes, self.config.settle)
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
                    log: trace.log.clone(),
                });
                entry.last_error = Some(message.clone());
                entry.phases = trace.phases.clone();
                observe(&mut state.phase_histogram, &trace.phases);
                Err(Failed::RolledBack(message))
            }
        }
    }

    /// [`Step::Rename`](crate::plan::Step::Rename): `service`'s recorded generation, running
    /// as `from`, moved as it is to `to`. Nothing is fetched or provisioned: `to` is written
    /// from the recorded unit file. On failure `to` is removed, `from` (whose file was never
    /// touched) started again, and the error says so.
    pub(super) async fn rename(
        &self,
        service: &Service,
        from: &str,
        to: &str,
        state: &mut State,
    ) -> Result<(), String> {
        let Some(entry) = state.services.get_mut(&service.name) else {
            return Ok(());
        };
        let Some(current) = entry.current.clone() else {
            return Ok(());
        };
        tracing::info!(%from, %to, "moving the service to its own unit name");
        let moved = match self.restored_probes(service, &current) {
            Ok(probes) => {
                let mut phases = Phases::new();
                self.start_unit(to, &current.unit_file, Some(from), &probes, &mut phases)
                    .await
            }
            Err(e) => Err((e, Stage::Untouched)),
        };
        match moved {
            Ok(()) => {
                entry.unit = to.to_owned();
                if let Err(e) = self.retire(from).await {
                    tracing::warn!(error = %e, unit = %from, "could not remove the old unit");
                }
                Ok(())
            }
            Err((e, Stage::Untouched | Stage::ReleaseFailed)) => Err(format!(
                "not renamed to {to}: {e}; it runs as {from}, the next run retries"
            )),
            Err((e, Stage::Touched)) => {
                let back = match self.start_replaced(to, from).await {
                    Ok(()) => format!("{from} was started again"),
                    Err(r) => format!("starting {from} again failed too: {r}"),
                };
                Err(format!(
                    "renaming {from} to {to} failed: {e}; {back}, the next run retries"
                ))
            }
        }
    }

    /// [`Recovery::StartReplaced`]: `new` stopped and removed, `old` started again.
    async fn start_replaced(&self, new: &str, old: &str) -> Result<(), AgentError> {
        self.retire(new).await?;
        self.host.manager().restart(old).await?;
        Ok(())
    }

    /// [`Recovery::RestoreFound`]: put back the unit file found (what served before the state
    /// was lost) and check that it stays up; one that does not (say, a first deploy killed
    /// before it was recorded) is removed like any failed new unit. What happened, for the
    /// error message.
    async fn restore_found(&self, unit: &str, found: Option<&str>) -> String {
        let Some(found) = found else {
            return match self.restore(unit, None).await {
                Ok(()) => String::new(),
                Err(e) => format!("; removing the new unit failed too: {e}"),
            };
        };
        // Stopped first, as `restore` does: a pending automatic restart must not fire later.
        let _ = self.host.manager().stop(unit).await;
        // Unless the new file could not even be written: then the found one is still there.
        let file_ok = self.host.read_unit(unit).as_deref() == Some(found);
        let stays_up = Probes {
            http: None,
            tcp: None,
            exec: None,
            timeout: self.config.settle + Duration::from_secs(30),
            interval: Duration::from_millis(200),
        };
        let outcome = match self.put_back(unit, found, file_ok).await {
            Ok(()) => {
                self.host
                    .wait_healthy(unit, &stays_up, self.config.settle)
                    .await
            }
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => {
                "; the unit file found on the host was put back and runs (no state records it)"
                    .to_owned()
            }
            Err(e) => {
                let removed = match self.retire(unit).await {
                    Ok(()) => "it was removed".to_owned(),
                    Err(r) => format!("removing it failed too: {r}"),
                };
                format!(
                    "; the unit file found on the host was put back but did not stay up ({e}), so {removed}"
                )
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
        trace: &mut Trace,
    ) -> Result<Generation, (AgentError, Stage)> {
        let untouched = |e: AgentError| (e, Stage::Untouched);
        let env_file = self
            .host
            .env_file(&service.name, service.env_file.as_deref())
            .map_err(untouched)?;
        let fetching = Instant::now();
        let artifact = self.host.fetch(&self.store, &service.artifact).await;
        timed(&mut trace.phases, Phase::Fetch, fetching);
        let artifact = artifact.map_err(untouched)?;
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
            let unit = names::release_unit(&service.name);
            let mark = self.host.log_mark(&unit);
            let releasing = Instant::now();
            let released = self.run_release(service, release, &text).await;
            timed(&mut trace.phases, Phase::Release, releasing);
            match released {
                Ok(()) => {}
                Err(e @ AgentError::Release(_)) => {
                    trace.log = self.evidence(service, &unit, &mark, &env_files).await;
                    return Err((e, Stage::ReleaseFailed));
                }
                Err(e) => return Err(untouched(e)),
            }
        }
        let probes = Probes::of(service, &artifact, d.port, &spec);
        let in_place_of = d
            .replaces
            .as_deref()
            .filter(|_| d.strategy == Strategy::InPlace);
        let mark = self.host.log_mark(&d.unit);
        let started = self
            .start_unit(&d.unit, &unit_file, in_place_of, &probes, &mut trace.phases)
            .await;
        if let Err((_, Stage::Touched)) = &started {
            trace.log = self.evidence(service, &d.unit, &mark, &env_files).await;
        }
        started?;
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

    /// Write `unit` as `text`, start it (after stopping `in_place_of`, which holds the
    /// service's port) and wait until it passes `probes`. The error says whether the host
    /// was touched: the name not ours (checked again here: a fetch or a release may have
    /// taken long since the plan) or a write that failed (atomic: the old file stays) leave
    /// everything as it was.
    async fn start_unit(
        &self,
        unit: &str,
        text: &str,
        in_place_of: Option<&str>,
        probes: &Probes,
        phases: &mut Phases,
    ) -> Result<(), (AgentError, Stage)> {
        let untouched = |e: AgentError| (e, Stage::Untouched);
        let touched = |e: AgentError| (e, Stage::Touched);
        let manager = self.host.manager();
        let restarting = Instant::now();
        if let Some(why) = crate::plan::foreign(&self.host, unit).await {
            return Err(untouched(AgentError::ForeignUnit(why)));
        }
        self.host.write_unit(unit, text).map_err(untouched)?;
        crate::fault::point("unit-written");
        manager.reload().await.map_err(|e| touched(e.into()))?;
        if let Some(old) = in_place_of {
            // One that is not loaded (a reboot cleared /run) has nothing to stop.
            if let Err(e) = manager.stop(old).await {
                tracing::warn!(error = %e, unit = %old, "could not stop the unit it replaces");
            }
        }
        let restarted = manager.restart(unit).await;
        timed(phases, Phase::Restart, restarting);
        restarted.map_err(|e| touched(e.into()))?;
        crate::fault::point("restarted");
        let checking = Instant::now();
        let healthy = self
            .host
            .wait_healthy(unit, probes, self.config.settle)
            .await;
        timed(phases, Phase::Health, checking);
        healthy.map_err(|detail| touched(AgentError::Unhealthy(detail)))
    }

    /// The log `unit` left after `mark`, masked with the values of `env_files` (the
    /// service's secrets) and bounded; a line saying why when it cannot be had. A log
    /// whose secrets cannot be read is withheld, not sent unmasked.
    async fn evidence(
        &self,
        service: &Service,
        unit: &str,
        mark: &LogMark,
        env_files: &[EnvFile],
    ) -> Vec<String> {
        let secrets = match self.host.secret_values(&service.name, env_files) {
            Ok(values) => values,
            Err(e) => return vec![format!("(log withheld: {e})")],
        };
        match self.host.unit_log(unit, mark).await {
            Ok(lines) => crate::evidence::evidence(lines, &secrets),
            Err(e) => vec![format!("(no log: {e})")],
        }
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
}

/// Count a deploy's phases into `deployer_deploy_phase_seconds`.
fn observe(histogram: &mut BTreeMap<Phase, crate::state::Histogram>, phases: &Phases) {
    for (phase, seconds) in phases {
        histogram.entry(*phase).or_default().observe(*seconds);
    }
}
