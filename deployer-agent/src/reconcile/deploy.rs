//! The `deploy` step: secrets checked, artifact fetched, release run, unit written and
//! restarted, health gate, route switch; and when it fails, the step's recovery rule
//! (`restore` the previous generation, put back a found unit, or stop the new one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deploy_manifest::history::{self, Phase, Phases};

use deploy_manifest::model::{Exec, Manifest, Release, RunAs, Service};
use deploy_manifest::store::ObjectStore;
use futures_util::StreamExt;
use tracing::Instrument;

use super::{Agent, RunReport, now};
use crate::AgentError;
use crate::evidence::LogMark;
use crate::health::Probes;
use crate::host::Host;
use crate::names;
use crate::plan::{Deploy, Recovery, Strategy, spec_hash};
use crate::state::{
    Failure, Generation, Health, RolloutMark, RolloutStage, RouteState, ServiceState, State,
};
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
    /// The deploy's own time: made ready, started, health-checked, undone if it failed.
    pub took: Duration,
}

/// Add the time since `since` to `phase`.
fn timed(phases: &mut Phases, phase: Phase, since: Instant) {
    *phases.entry(phase).or_default() += history::seconds(since.elapsed());
}

/// How many new generations start and are health-checked at once (and units stopped at
/// once): systemd runs their jobs in parallel, and a batch of 1,000 small services does not
/// wait 1,000 health gates one after another.
pub(super) const STARTING_AT_ONCE: usize = 32;

/// One deploy of a batch: the step, and the service as it deploys (the manifest's, or for a
/// revert, as this host ran it before).
pub(super) struct Job<'a> {
    pub d: &'a Deploy,
    pub service: &'a Service,
}

/// A deploy made ready by its first pass: fetched, its release run, its unit file rendered.
struct Ready {
    /// What is recorded once it is healthy.
    generation: Generation,
    /// Its unit file (recorded beside the state as `generation.unit_hash`).
    unit_file: String,
    env_files: Vec<EnvFile>,
    probes: Probes,
}

/// How a deploy that did not complete ended, before it is recorded.
enum Undone {
    /// Not tried: infrastructure it needs failed, the host lacks its account, or its
    /// settings could not be provisioned. The next run retries.
    Refused(String),
    /// Nothing on the host changed (secrets file, fetch, the unit's name taken), or the new
    /// generation was given up without a verdict on its spec: the next run retries.
    Retry(String),
    /// The new generation (or its release command) failed and was undone as its recovery
    /// rule says; its spec is not tried again. The message, and the service's health now.
    RolledBack { message: String, health: Health },
}

/// A deploy's new generation, healthy, or how it did not get there.
type Ended = Result<Generation, Undone>;

/// What a batch's new generations replace: stopped once the state records them.
#[derive(Debug, Default)]
pub(super) struct Replaced {
    /// Wait the drain period first (a zero-downtime generation took over a route).
    drain: bool,
    /// The units they replace.
    units: Vec<String>,
    /// Units no state records that may have served before them.
    untracked: Vec<String>,
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
        let env_files = &prev.env_files;
        let artifact = Path::new(&prev.path);
        // A zero-downtime generation listens on the port it was given.
        let port = prev.unit.as_ref().and(prev.route.as_ref()).map(|r| r.port);
        let spec = self.unit_spec(service, artifact, env_files, port, None)?;
        Ok(Probes::of(service, artifact, port, &spec))
    }

    /// The deploy steps `jobs` (consecutive in the plan; a deploy that runs a release
    /// command goes alone, so that it starts right after its migration) as one batch:
    /// 1. one by one, each made ready: infrastructure and account checked, its settings
    ///    provisioned, secrets file checked, artifact fetched, release command run, unit
    ///    rendered (a failure here changed nothing, or only ran a release that failed);
    /// 2. the unit files written, then one daemon-reload for all (retried once; if it still
    ///    fails, the files are put back as they were and the next run retries);
    /// 3. up to [`STARTING_AT_ONCE`] at a time: each started and health-checked, and if it
    ///    fails, undone right away by its own recovery rule;
    /// 4. the routes of every generation that passed switched at once (one by one if the
    ///    proxy refuses them together);
    /// 5. each outcome recorded in `state`, in order.
    ///
    /// Each job's outcome and what it measured and saw, and what to stop once the state
    /// records them ([`Agent::retire_replaced`]: the caller saves the state first, so that a
    /// crash while they stop loses no new generation).
    pub(super) async fn deploy_all(
        &self,
        jobs: &[Job<'_>],
        manifest: &Manifest,
        state: &mut State,
        infra_failed: &BTreeMap<String, String>,
    ) -> (Vec<(Result<(), Failed>, Trace)>, Replaced) {
        let mut traces = vec![Trace::default(); jobs.len()];
        let mut outcomes: Vec<Option<Ended>> = Vec::new();
        let mut ready = Vec::new();
        // This host's infrastructure as it runs now (a dedicated server's port as the
        // infrastructure steps before recorded it).
        // The infrastructure as this host has it (`infrastructure.overrides` applied).
        let eff = crate::infra::for_host(manifest, &self.config.host);
        let infra: BTreeMap<String, crate::infra::HostSpec> =
            crate::infra::host_specs(&eff, &self.config.host, &state.infra)
                .into_iter()
                .map(|h| (h.name.clone(), h))
                .collect();
        for (i, job) in jobs.iter().enumerate() {
            let preparing = Instant::now();
            let prepared = self
                .prepare(
                    job,
                    manifest,
                    (&eff, &infra),
                    state,
                    infra_failed,
                    &mut traces[i],
                )
                .await;
            traces[i].took += preparing.elapsed();
            outcomes.push(match prepared {
                Ok(r) => {
                    ready.push((i, r));
                    None
                }
                Err(undone) => Some(Err(undone)),
            });
        }
        // The unit files, written together just before the reload that loads them.
        let writing = Instant::now();
        let mut written = Vec::new();
        for (i, r) in ready {
            match self.write_new(&jobs[i].d.unit, &r.unit_file).await {
                Ok(()) => written.push((i, r)),
                Err(e) => outcomes[i] = Some(Err(Undone::Retry(e.to_string()))),
            }
        }
        if !written.is_empty() {
            let manager = self.host.manager();
            let mut reloaded = manager.reload().await;
            if let Err(e) = &reloaded {
                tracing::warn!(error = %e, "daemon-reload failed; trying once more");
                reloaded = manager.reload().await;
            }
            for (i, _) in &written {
                timed(&mut traces[*i].phases, Phase::Restart, writing);
                traces[*i].took += writing.elapsed();
            }
            match reloaded {
                Err(e) => {
                    // Nothing was started: each unit file goes back to what it was.
                    let error = format!(
                        "{}; nothing was started, the next run retries",
                        AgentError::from(e)
                    );
                    for (i, _) in written {
                        let d = jobs[i].d;
                        let before = state
                            .services
                            .get(&d.service)
                            .and_then(|e| e.current.as_ref());
                        self.unwrite(d, before);
                        outcomes[i] = Some(Err(Undone::Retry(error.clone())));
                    }
                }
                Ok(()) => {
                    let activations = written.into_iter().map(|(i, r)| {
                        let job = &jobs[i];
                        let entry = state.services.get(&job.service.name);
                        let before = entry.and_then(|e| e.current.clone());
                        let health = entry.map_or(Health::Unknown, |e| e.health);
                        let mut trace = std::mem::take(&mut traces[i]);
                        async move {
                            let starting = Instant::now();
                            let started = self
                                .activate(job, r, before, health, &mut trace)
                                .instrument(tracing::info_span!("step", subject = %job.d.service))
                                .await;
                            trace.took += starting.elapsed();
                            (i, started, trace)
                        }
                    });
                    let started: Vec<_> = futures_util::stream::iter(activations)
                        .buffer_unordered(STARTING_AT_ONCE)
                        .collect()
                        .await;
                    for (i, outcome, trace) in started {
                        outcomes[i] = Some(outcome);
                        traces[i] = trace;
                    }
                }
            }
        }
        let mut outcomes: Vec<Ended> = outcomes
            .into_iter()
            .map(|o| o.expect("every job has an outcome"))
            .collect();
        self.switch_routes(jobs, &mut outcomes, state, &mut traces)
            .await;
        // What the new generations replace, and units no state records that may have
        // served before them: stopped once they serve and the state says so.
        let done: Vec<&Deploy> = jobs
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| o.is_ok())
            .map(|(job, _)| job.d)
            .collect();
        let replaced = Replaced {
            drain: done.iter().any(|d| d.drain && d.replaces.is_some()),
            units: done.iter().filter_map(|d| d.replaces.clone()).collect(),
            untracked: done
                .iter()
                .flat_map(|d| d.retire_after.iter().cloned())
                .collect(),
        };
        let results = jobs
            .iter()
            .zip(outcomes)
            .zip(traces)
            .map(|((job, outcome), trace)| {
                let result = self.finish(job, manifest, state, outcome, &trace);
                (result, trace)
            })
            .collect();
        (results, replaced)
    }

    /// Stop what a batch's new generations replaced (after the drain period), with one
    /// reload, and the units no state recorded that may have served before them. Called
    /// once the state recording the new generations is saved: a crash before or during
    /// this leaves the old units to the next run, which retires units no state records.
    pub(super) async fn retire_replaced(&self, replaced: Replaced, report: &mut RunReport) {
        if replaced.drain {
            tokio::time::sleep(self.config.drain).await;
        }
        for (unit, result) in self.retire_all(&replaced.units).await {
            if let Err(e) = result {
                tracing::warn!(error = %e, %unit, "could not stop the previous generation");
            }
        }
        self.retire_untracked(&replaced.untracked, report).await;
    }

    /// Put `d`'s unit file back as it was before this deploy wrote it (nothing was started
    /// from it): the previous generation's, the one found on the host, or none.
    fn unwrite(&self, d: &Deploy, previous: Option<&Generation>) {
        let put_back = match (d.on_failure, previous, &d.found_unit) {
            (Recovery::RestorePrevious, Some(prev), _) => {
                Some(self.host.recorded_unit_text(&prev.unit_hash))
            }
            (Recovery::RestoreFound, _, Some(found)) => Some(Ok(found.clone())),
            _ => None,
        };
        let result = match put_back {
            Some(Ok(text)) => self.host.write_unit(&d.unit, &text),
            Some(Err(e)) => Err(e),
            None => self.host.remove_unit(&d.unit),
        };
        if let Err(e) = result {
            tracing::warn!(unit = %d.unit, error = %e, "could not put the unit file back");
        }
    }

    /// Switch the routes of every new generation that passed its health checks, at once;
    /// if the proxy refuses them together, one service at a time, so that one bad route
    /// costs only its own deploy. A side-by-side generation whose route was refused is
    /// given up (the old one still has the route; the next run retries); one restarted in
    /// place keeps running (its route is retried on the next run).
    async fn switch_routes(
        &self,
        jobs: &[Job<'_>],
        outcomes: &mut [Ended],
        state: &State,
        traces: &mut [Trace],
    ) {
        if !self.host.has_proxy() {
            return;
        }
        let healthy: Vec<usize> = (0..jobs.len()).filter(|i| outcomes[*i].is_ok()).collect();
        if healthy.is_empty() {
            return;
        }
        let route_of = |i: usize| {
            let route = outcomes[i].as_ref().ok().and_then(|g| g.route.as_ref());
            (jobs[i].service.name.as_str(), route)
        };
        let all: Vec<(&str, Option<&RouteState>)> = healthy.iter().map(|i| route_of(*i)).collect();
        let switching = Instant::now();
        let mut refused = Vec::new();
        if let Err(e) = self.host.apply_routes(&Self::routes(state, &all)).await {
            tracing::warn!(error = %e, "the proxy refused the batch's routes; applying them one service at a time");
            let mut accepted: Vec<(&str, Option<&RouteState>)> = Vec::new();
            for i in &healthy {
                accepted.push(route_of(*i));
                if let Err(e) = self
                    .host
                    .apply_routes(&Self::routes(state, &accepted))
                    .await
                {
                    accepted.pop();
                    refused.push((*i, AgentError::Proxy(e).to_string()));
                }
            }
        }
        for i in &healthy {
            timed(&mut traces[*i].phases, Phase::Route, switching);
            traces[*i].took += switching.elapsed();
        }
        let mut given_up = Vec::new();
        for (i, error) in refused {
            if jobs[i].d.strategy == Strategy::SideBySide {
                given_up.push(jobs[i].d.unit.clone());
                outcomes[i] = Err(Undone::Retry(error));
            } else {
                tracing::error!(service = %jobs[i].d.service, %error, "deployed, but the route was not applied");
            }
        }
        for (unit, result) in self.retire_all(&given_up).await {
            if let Err(e) = result {
                tracing::warn!(error = %e, %unit, "could not stop the new generation");
            }
        }
    }

    /// A deploy's first pass (one at a time: provisioning, fetches and release commands do
    /// not overlap): everything that can fail before the service's unit is touched, ending
    /// with its unit file written (loaded by the batch's one reload).
    async fn prepare(
        &self,
        job: &Job<'_>,
        manifest: &Manifest,
        (eff, infra): (&Manifest, &BTreeMap<String, crate::infra::HostSpec>),
        state: &mut State,
        infra_failed: &BTreeMap<String, String>,
        trace: &mut Trace,
    ) -> Result<Box<Ready>, Undone> {
        let (d, service) = (job.d, job.service);
        state
            .services
            .entry(service.name.clone())
            .or_insert_with(|| ServiceState {
                unit: names::service_unit(&service.name),
                ..ServiceState::default()
            });
        if let Some(error) = d.infra.iter().find_map(|n| infra_failed.get(n)) {
            return Err(Undone::Refused(error.clone()));
        }
        if let Err(error) = self.host.check_exec(service) {
            return Err(Undone::Refused(error));
        }
        let provisioning = Instant::now();
        // The service as this host has it; a version being returned to is not the
        // manifest's, and gets the overrides too.
        let returned;
        let (eff, own) = match manifest.service(&service.name) == Some(service) {
            true => (eff, eff.service(&service.name).unwrap_or(service)),
            false => {
                returned =
                    crate::infra::with_service_for_host(manifest, service, &self.config.host);
                let own = returned.service(&service.name).unwrap_or(service);
                (&returned, own)
            }
        };
        let generated = self.host.app_env(own, eff, infra, &mut state.redis_indexes);
        timed(&mut trace.phases, Phase::Infrastructure, provisioning);
        let generated = match generated {
            Ok(g) => g,
            Err(e) => return Err(Undone::Refused(e.to_string())),
        };
        let untouched = |e: AgentError| Err(Undone::Retry(e.to_string()));
        // What a failure puts back must be at hand before anything is touched.
        if d.on_failure == Recovery::RestorePrevious
            && let Some(previous) = &state.services[&service.name].current
            && let Err(e) = self.ensure_recorded(&d.unit, previous)
        {
            return untouched(e);
        }
        let env_file = match self
            .host
            .env_file(&service.name, service.env_file.as_deref())
        {
            Ok(f) => f,
            Err(e) => return untouched(e),
        };
        let fetching = Instant::now();
        let artifact = self.host.fetch(&self.store, &service.artifact).await;
        timed(&mut trace.phases, Phase::Fetch, fetching);
        let artifact = match artifact {
            Ok(a) => a,
            Err(e) => return untouched(e),
        };
        crate::fault::point("fetched");
        // Generated settings first, the operator's secrets file last (it wins).
        let env_files: Vec<EnvFile> = generated
            .as_deref()
            .map(EnvFile::required)
            .into_iter()
            .chain([env_file])
            .collect();
        let rendered = self
            .unit_spec(service, &artifact, &env_files, d.port, None)
            .and_then(|spec| Ok((spec.render()?, spec)));
        let (unit_file, spec) = match rendered {
            Ok(r) => r,
            Err(e) => return untouched(e),
        };
        if d.release
            && let Some(release) = &service.release
        {
            let text = match self
                .unit_spec(service, &artifact, &env_files, d.port, Some(release))
                .and_then(|spec| Ok(spec.render()?))
            {
                Ok(t) => t,
                Err(e) => return untouched(e),
            };
            let unit = names::release_unit(&service.name);
            let mark = self.host.log_mark(&unit);
            let releasing = Instant::now();
            let released = self.run_release(service, release, &text).await;
            timed(&mut trace.phases, Phase::Release, releasing);
            match released {
                Ok(()) => {}
                Err(e @ AgentError::Release(_)) => {
                    trace.log = self.evidence(service, &unit, &mark, &env_files).await;
                    // The service's unit was never touched: what ran still runs.
                    let entry = &state.services[&service.name];
                    let health = match entry.current {
                        Some(_) => entry.health,
                        None => Health::Unknown,
                    };
                    return Err(Undone::RolledBack {
                        message: e.to_string(),
                        health,
                    });
                }
                Err(e) => return untouched(e),
            }
        }
        let probes = Probes::of(service, &artifact, d.port, &spec);
        let unit_hash = match self.host.record_unit_text(&unit_file) {
            Ok(hash) => hash,
            Err(e) => return untouched(e),
        };
        Ok(Box::new(Ready {
            generation: Generation {
                artifact: service.artifact.clone(),
                path: artifact.display().to_string(),
                spec_hash: spec_hash(service),
                infra_hash: d.infra_hash.clone(),
                version: manifest.version.clone(),
                deployed_at: String::new(),
                unit_hash,
                env_files: EnvFile::parse_all(&unit_file),
                unit: d.port.map(|_| d.unit.clone()),
                route: d.route.clone(),
            },
            unit_file,
            env_files,
            probes,
        }))
    }

    /// A deploy's second pass (several at once): its written and loaded unit started (after
    /// the one it replaces in place is stopped) and health-checked; if that fails, the log
    /// it left is kept and its recovery rule undoes it. `before`: the generation recorded
    /// before, and `health`, its health.
    async fn activate(
        &self,
        job: &Job<'_>,
        ready: Box<Ready>,
        before: Option<Generation>,
        health: Health,
        trace: &mut Trace,
    ) -> Ended {
        let (d, service) = (job.d, job.service);
        let in_place_of = d
            .replaces
            .as_deref()
            .filter(|_| d.strategy == Strategy::InPlace);
        let mark = self.host.log_mark(&d.unit);
        let started = self
            .start_written(&d.unit, in_place_of, &ready.probes, &mut trace.phases)
            .await;
        let error = match started {
            Ok(()) => {
                crate::fault::point("healthy");
                let mut generation = ready.generation;
                generation.deployed_at = now();
                if let Some(revert) = &d.revert {
                    generation.version = revert.1.clone();
                }
                return Ok(generation);
            }
            Err(error) => error,
        };
        trace.log = self
            .evidence(service, &d.unit, &mark, &ready.env_files)
            .await;
        Err(self.undo(d, service, before.as_ref(), health, error).await)
    }

    /// Undo a new generation that failed after its unit was touched, as `d`'s recovery rule
    /// says, and probe what runs again: the error message (with what the recovery found)
    /// and the service's health now.
    async fn undo(
        &self,
        d: &Deploy,
        service: &Service,
        previous: Option<&Generation>,
        health: Health,
        error: String,
    ) -> Undone {
        tracing::error!(service = %d.service, %error, recovery = ?d.on_failure, "deploy failed; undoing it");
        let mut message = error;
        let restored = match (d.on_failure, previous) {
            (Recovery::RestorePrevious, Some(prev)) => {
                self.restore(&d.unit, Some(prev)).await.map(|()| Some(prev))
            }
            (Recovery::StopNew, _) => self.retire(&d.unit).await.map(|()| None),
            (Recovery::StartReplaced, _) => self
                .start_replaced(&d.unit, d.restored_unit())
                .await
                .map(|()| previous),
            (Recovery::RestoreFound, _) => {
                message.push_str(&self.restore_found(&d.unit, d.found_unit.as_deref()).await);
                Ok(None)
            }
            (Recovery::RemoveNew | Recovery::RestorePrevious, _) => {
                self.restore(&d.unit, None).await.map(|()| None)
            }
        };
        let health = match restored {
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
            Ok(None) if previous.is_some() => health,
            Ok(None) => Health::Unknown,
            Err(e) => {
                message = format!("{message}; restoring the previous generation also failed: {e}");
                Health::Unhealthy
            }
        };
        Undone::RolledBack { message, health }
    }

    /// Record how a deploy ended in `state`.
    fn finish(
        &self,
        job: &Job<'_>,
        manifest: &Manifest,
        state: &mut State,
        outcome: Ended,
        trace: &Trace,
    ) -> Result<(), Failed> {
        let (d, service) = (job.d, job.service);
        let entry = state
            .services
            .get_mut(&service.name)
            .expect("made ready first");
        match outcome {
            Err(Undone::Refused(error)) => {
                entry.last_error = Some(error.clone());
                Err(Failed::Retry(error))
            }
            Ok(generation) => {
                entry.updated_at = Some(now());
                // Through its rollout's gate: watched until the rollout is done. Over
                // nothing that ran here (no generation, no unit found), an abort removes it.
                let first =
                    entry.current.is_none() && d.found_unit.is_none() && d.replaces.is_none();
                entry.rollout = d.rollout.as_ref().map(|hash| RolloutMark {
                    spec_hash: hash.clone(),
                    stage: if first {
                        RolloutStage::First
                    } else {
                        RolloutStage::Deployed
                    },
                });
                tracing::info!(service = %d.service, artifact = %generation.artifact.label(), unit = %d.unit, "deployed and healthy");
                entry.unit = d.unit.clone();
                entry.previous = entry.current.take();
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
            Err(Undone::Retry(error)) => {
                entry.updated_at = Some(now());
                entry.last_error = Some(error.clone());
                Err(Failed::Retry(error))
            }
            Err(Undone::RolledBack { message, health }) => {
                entry.updated_at = Some(now());
                entry.health = health;
                entry.rollbacks += 1;
                entry.failed = Some(Failure {
                    spec_hash: spec_hash(service),
                    infra_hash: d.infra_hash.clone(),
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
        // Err((why, touched)).
        let moved = match self.restored_probes(service, &current) {
            Err(e) => Err((e.to_string(), false)),
            Ok(probes) => match self.write_recorded(to, &current).await {
                Err(e) => Err((e.to_string(), false)),
                Ok(()) => match self.host.manager().reload().await {
                    Err(e) => Err((AgentError::from(e).to_string(), true)),
                    Ok(()) => self
                        .start_written(to, Some(from), &probes, &mut Phases::new())
                        .await
                        .map_err(|e| (e, true)),
                },
            },
        };
        match moved {
            Ok(()) => {
                entry.unit = to.to_owned();
                if let Err(e) = self.retire(from).await {
                    tracing::warn!(error = %e, unit = %from, "could not remove the old unit");
                }
                Ok(())
            }
            Err((e, false)) => Err(format!(
                "not renamed to {to}: {e}; it runs as {from}, the next run retries"
            )),
            Err((e, true)) => {
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
        let outcome = match self.put_back(unit, (!file_ok).then_some(found)).await {
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

    /// Make sure the unit file recorded for `generation`, which runs as `unit`, can be had:
    /// if its copy in `units/` is gone but `unit`'s file on the host is still that text, it
    /// is recorded again.
    fn ensure_recorded(&self, unit: &str, generation: &Generation) -> Result<(), AgentError> {
        let Err(lost) = self.host.recorded_unit_text(&generation.unit_hash) else {
            return Ok(());
        };
        let text = self
            .host
            .read_unit(unit)
            .filter(|t| crate::unit::text_hash(t) == generation.unit_hash)
            .ok_or(lost)?;
        tracing::warn!(%unit, "its recorded unit file was gone: recorded again from the host's");
        self.host.record_unit_text(&text).map(drop)
    }

    /// Write `unit`'s file as recorded for `generation`.
    async fn write_recorded(&self, unit: &str, generation: &Generation) -> Result<(), AgentError> {
        let text = self.host.recorded_unit_text(&generation.unit_hash)?;
        self.write_new(unit, &text).await
    }

    /// Write `unit` as `text`, unless its name is not ours now (checked again here: a fetch
    /// or a release may have taken long since the plan). If it fails, nothing was touched
    /// (the write is atomic: the old file stays). The manager loads it at the next reload.
    async fn write_new(&self, unit: &str, text: &str) -> Result<(), AgentError> {
        if let Some(why) = crate::plan::foreign(&self.host, unit).await {
            return Err(AgentError::ForeignUnit(why));
        }
        self.host.write_unit(unit, text)?;
        crate::fault::point("unit-written");
        Ok(())
    }

    /// Start `unit`, written and loaded (after stopping `in_place_of`, which holds the
    /// service's port), and wait until it passes `probes`. An error means the host was
    /// touched.
    async fn start_written(
        &self,
        unit: &str,
        in_place_of: Option<&str>,
        probes: &Probes,
        phases: &mut Phases,
    ) -> Result<(), String> {
        let manager = self.host.manager();
        let restarting = Instant::now();
        if let Some(old) = in_place_of {
            // One that is not loaded (a reboot cleared /run) has nothing to stop.
            if let Err(e) = manager.stop(old).await {
                tracing::warn!(error = %e, unit = %old, "could not stop the unit it replaces");
            }
        }
        let restarted = manager.restart(unit).await;
        timed(phases, Phase::Restart, restarting);
        restarted.map_err(|e| AgentError::from(e).to_string())?;
        crate::fault::point("restarted");
        let checking = Instant::now();
        let healthy = self
            .host
            .wait_healthy(unit, probes, self.config.settle)
            .await;
        timed(phases, Phase::Health, checking);
        healthy.map_err(|detail| AgentError::Unhealthy(detail).to_string())
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
        let text = previous
            .map(|g| self.host.recorded_unit_text(&g.unit_hash))
            .transpose()?;
        let _ = self.host.manager().stop(unit).await;
        match text {
            Some(text) => self.put_back(unit, Some(&text)).await,
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
