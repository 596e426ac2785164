//! One reconcile pass, and the loop around it.
//!
//! `run_once`: lock → one conditional GET of `manifest.json` → unchanged: repair drift from
//! the state alone (no further store request) → changed: validate, plan, apply each step
//! with its own error boundary, saving the state after each → remove what is no longer
//! declared → save. A failed deploy restores the previous unit (and so the previous
//! artifact) and records the failure so the same spec is not retried.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use deploy_manifest::model::{Manifest, Service};
use deploy_manifest::repo::{CURRENT_KEY, rfc3339};
use deploy_manifest::store::{Fetched, ObjectStore};
use deploy_manifest::validate::parse_manifest;
use serde::Serialize;
use tracing::Instrument;

use crate::AgentError;
use crate::config::{AgentConfig, current_uid};
use crate::health::{ExecProbe, Probes, wait_healthy};
use crate::names;
use crate::plan::{Step, plan, spec_hash};
use crate::proxy::{Proxy, Route};
use crate::state::{Failure, Generation, Health, RouteState, RunLock, ServiceState, State};
use crate::systemd::{JobResult, ServiceManager, SystemdError};
use crate::unit::{EnvFile, UnitSpec, check_unit_name, split_command};
use crate::{fetch, infra, secrets};

/// What one run did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunReport {
    /// `manifest.json` was unchanged since the last run.
    pub unchanged: bool,
    pub manifest_version: Option<String>,
    pub deployed: Vec<String>,
    pub kept: Vec<String>,
    pub repaired: Vec<String>,
    pub skipped: Vec<String>,
    pub removed: Vec<String>,
    /// Service → why its deploy failed (it was rolled back).
    pub failed: Vec<(String, String)>,
    /// A failure on this host's side (secrets file, fetch) that the next run retries.
    pub retry: bool,
    /// The services of `failed` whose deploy stopped before anything changed on the host
    /// (nothing to roll back); the next run retries them. The others were rolled back.
    pub retrying: Vec<String>,
    /// The proxy routes could not be applied; retried on the next run.
    pub route_error: Option<String>,
    /// Units of ours that no state recorded (left by a run killed mid-deploy), retired.
    pub retired: Vec<String>,
    /// Infrastructure no service here needs any more, stopped (its data is kept).
    pub stopped_infra: Vec<String>,
    /// Requests this run made to the store (an idle poll: 1), where counted.
    pub store_requests: Option<u64>,
    /// systemd calls this run made that change something (reload, restart, stop).
    pub systemd_changes: u64,
}

pub struct Agent<S, M> {
    pub store: S,
    pub manager: M,
    pub proxy: Proxy,
    pub config: AgentConfig,
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

impl<S: ObjectStore, M> Agent<S, M> {
    /// Fetch the current manifest and check it exactly as `run` does (for `plan` and
    /// `fetch`): valid, and with trusted keys signed, newer than the applied one and not
    /// expired.
    pub async fn fetch_manifest(&self) -> Result<Manifest, AgentError> {
        match self.store.get(CURRENT_KEY, None).await? {
            Fetched::Found { bytes, .. } => {
                let m = parse_manifest(&bytes, &self.manifest_origin())?;
                let state = State::load(&self.config.state_dir, &self.config.host)?;
                self.trust(&m, &state)?;
                Ok(m)
            }
            _ => Err(deploy_manifest::Error::NotInitialized {
                url: self.store.url().to_owned(),
            }
            .into()),
        }
    }

    fn manifest_origin(&self) -> String {
        format!("{}/{CURRENT_KEY}", self.store.url())
    }

    /// With trusted keys configured: the manifest must be signed by one of them, its
    /// sequence above the one this host applied (a replayed old version is not), and its
    /// expiry not passed (a frozen view of the store is not served forever).
    fn trust(&self, m: &Manifest, state: &State) -> Result<(), AgentError> {
        if self.config.trusted_keys.is_empty() {
            return Ok(());
        }
        use deploy_manifest::sign;
        let floor = crate::state::applied_floor(&self.config.state_dir, state)?;
        sign::verify(m, &self.config.trusted_keys)
            .and_then(|()| sign::check_sequence(m, floor.as_ref()))
            .and_then(|()| sign::check_expiry(m, SystemTime::now()))
            .map_err(|e| AgentError::Manifest(e.into()))
    }

    /// Accept `m`: raise this host's sequence floor to it before anything is applied, so
    /// that no older manifest is ever accepted again, even if `state.json` is lost.
    fn accept(&self, m: &Manifest, state: &mut State) -> Result<(), AgentError> {
        state.expired = None;
        if self.config.trusted_keys.is_empty() {
            return Ok(());
        }
        let (Some(version), sequence) = (m.version.clone(), m.sequence.unwrap_or(0)) else {
            return Ok(());
        };
        crate::state::record_applied(
            &self.config.state_dir,
            &deploy_manifest::sign::Applied { version, sequence },
        )
    }
}

impl<S: ObjectStore, M: ServiceManager> Agent<S, M> {
    fn unit_path(&self, unit: &str) -> PathBuf {
        self.config.unit_dir.join(unit)
    }

    /// One reconcile pass.
    pub async fn run_once(&self) -> Result<RunReport, AgentError> {
        let span = tracing::info_span!("run", host = %self.config.host);
        let started = std::time::Instant::now();
        self.store.start_run();
        let (requests, changes) = (self.store.requests(), self.manager.changes());
        let dir = &self.config.state_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
        // Held until the report is published: publishing saves state.json too.
        let _lock = RunLock::acquire(dir)?;
        let mut result = self.run_once_inner().instrument(span.clone()).await;
        self.publish(started.elapsed()).instrument(span).await;
        if let Ok(report) = &mut result {
            report.store_requests = self
                .store
                .requests()
                .zip(requests)
                .map(|(after, before)| after - before);
            report.systemd_changes = self.manager.changes() - changes;
        }
        result
    }

    /// After a run: write the metrics file, and `status/<host>.json` when what it says
    /// changed or the last one is older than two intervals (a heartbeat, so that
    /// `deploy-manifest status` can tell a silent agent). Failures are logged, not fatal.
    async fn publish(&self, took: Duration) {
        crate::fault::point("publish");
        let dir = &self.config.state_dir;
        let Ok(mut state) = State::load(dir, &self.config.host) else {
            return;
        };
        let mut restarts = std::collections::BTreeMap::new();
        for (name, s) in &state.services {
            if s.current.is_some()
                && let Ok(status) = self.manager.status(&s.unit).await
            {
                restarts.insert(name.clone(), status.n_restarts);
            }
        }
        if let Some(path) = &self.config.metrics_file
            && let Err(e) = crate::report::write_metrics(path, &state, &restarts, took)
        {
            tracing::warn!(error = %e, path = %path.display(), "could not write metrics");
        }
        let mut report = crate::report::host_report(&state, self.config.interval);
        match crate::report::host_key(dir, &self.config.host) {
            Ok(key) => key.sign_json(&mut report),
            Err(e) => tracing::warn!(
                error = %e,
                "publishing this report unsigned: readers given host keys will not count it"
            ),
        }
        let hash = crate::report::report_hash(&report);
        let heartbeat_due = state
            .reported_at
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_none_or(|age| age >= 2 * self.config.interval);
        if state.report_hash.as_deref() == Some(hash.as_str()) && !heartbeat_due {
            return;
        }
        let bytes = serde_json::to_vec_pretty(&report).expect("the report serialises");
        let key = deploy_manifest::status::report_key(&self.config.host);
        match self
            .store
            .put(&key, bytes, deploy_manifest::store::Precondition::None)
            .await
        {
            Ok(_) => {
                state.reported_at = Some(report.reported_at.clone());
                state.report_hash = Some(hash);
                if let Err(e) = state.save(dir) {
                    tracing::warn!(error = %e, "could not record the report in state.json");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not write {key}; retrying after the next run")
            }
        }
    }

    /// The run, under the run lock.
    async fn run_once_inner(&self) -> Result<RunReport, AgentError> {
        let dir = &self.config.state_dir;
        if self.config.user {
            // Units of a user manager log to files here (there is no journal for them).
            let logs = dir.join("logs");
            std::fs::create_dir_all(&logs)
                .map_err(|e| AgentError::io(format!("creating {}", logs.display()), e))?;
        }
        let mut state = State::load(dir, &self.config.host)?;
        state.host = self.config.host.clone();
        state.last_poll = Some(now());

        let fetched = self
            .store
            .get(CURRENT_KEY, state.manifest_etag.as_deref())
            .await;
        let (manifest, etag) = match fetched {
            Ok(Fetched::NotModified) => {
                if !self.config.trusted_keys.is_empty() {
                    state.expired = state
                        .manifest_expires
                        .clone()
                        .filter(|e| deploy_manifest::sign::has_expired(e, SystemTime::now()));
                    if let Some(e) = &state.expired {
                        tracing::warn!(expires = %e, "the applied manifest has expired: no newer one will be accepted until a writer runs `deploy-manifest refresh`");
                    }
                }
                let mut report = self.repair_drift(&mut state).await;
                report.route_error = self.sync_routes(&state).await;
                tracing::info!(
                    kept = report.kept.len(),
                    repaired = report.repaired.len(),
                    "manifest unchanged"
                );
                state.last_error = report.route_error.clone();
                if report.route_error.is_none() {
                    state.last_success = Some(now());
                }
                state.save(dir)?;
                return Ok(report);
            }
            Ok(Fetched::Found { bytes, etag }) => {
                match parse_manifest(&bytes, &self.manifest_origin())
                    .map_err(AgentError::from)
                    .and_then(|m| self.trust(&m, &state).map(|()| m))
                    .and_then(|m| self.accept(&m, &mut state).map(|()| m))
                {
                    Ok(m) => (m, etag),
                    Err(e) => {
                        if let AgentError::Manifest(deploy_manifest::Error::Trust(
                            deploy_manifest::sign::TrustError::Expired { expires, .. },
                        )) = &e
                        {
                            state.expired = Some(expires.clone());
                        }
                        return self.fail_run(&mut state, e).await;
                    }
                }
            }
            Ok(Fetched::NotFound) => {
                let e = deploy_manifest::Error::NotInitialized {
                    url: self.store.url().to_owned(),
                };
                return self.fail_run(&mut state, e.into()).await;
            }
            Err(e) => return self.fail_run(&mut state, e.into()).await,
        };

        crate::fault::point("manifest");
        let mut report = RunReport {
            manifest_version: manifest.version.clone(),
            ..RunReport::default()
        };
        let steps = plan(&manifest, &state, &self.config.host);
        for step in &steps {
            let name = step.service().to_owned();
            let span = tracing::info_span!("service", service = %name);
            async {
                match step {
                    Step::Keep { .. } => {
                        if self.ensure_running(&name, &mut state).await {
                            report.repaired.push(name.clone());
                        } else {
                            report.kept.push(name.clone());
                        }
                        let service = manifest.service(&name).expect("planned from it");
                        self.clear_failure(service, &mut state).await;
                    }
                    Step::Skip { reason, .. } => {
                        tracing::warn!(%reason, "not retrying a deploy that failed");
                        report.skipped.push(name.clone());
                    }
                    Step::Remove { .. } => match self.remove(&name, &mut state).await {
                        Ok(()) => report.removed.push(name.clone()),
                        Err(e) => {
                            report.retrying.push(name.clone());
                            report.failed.push((name.clone(), e.to_string()));
                        }
                    },
                    Step::Deploy { .. } => {
                        let service = manifest.service(&name).expect("planned from it");
                        match self.deploy(service, &manifest, &mut state).await {
                            Ok(()) => report.deployed.push(name.clone()),
                            Err((e, retry)) => {
                                report.retry |= retry;
                                if retry {
                                    report.retrying.push(name.clone());
                                }
                                report.failed.push((name.clone(), e));
                            }
                        }
                    }
                }
            }
            .instrument(span)
            .await;
            // A crash after this point loses nothing that is done.
            state.save(dir)?;
            crate::fault::point("saved");
        }

        report.stopped_infra = self.retire_unused_infra(&manifest, &mut state).await;
        report.repaired.extend(self.repair_infra(&mut state).await);
        report.retired = self.retire_unknown(&manifest, &state).await;
        // Re-assert every route: heals a proxy that lost its config, drops removed services.
        report.route_error = self.sync_routes(&state).await;
        state.manifest_version = manifest.version.clone();
        state.manifest_created_at = manifest.created_at.clone();
        state.manifest_sequence = manifest.sequence;
        state.manifest_expires = manifest.expires.clone();
        // Remembering the ETag makes the next poll a cheap 304; forget it when a host-side
        // problem (secrets file, fetch) should be retried with a full plan.
        state.manifest_etag = (!report.retry).then_some(etag);
        state.last_error = report.route_error.clone();
        if report.failed.is_empty() && report.route_error.is_none() {
            state.last_success = Some(now());
        }
        state.save(dir)?;
        for (service, error) in &report.failed {
            if report.retrying.contains(service) {
                tracing::error!(%service, %error, "not deployed, nothing changed; the next run retries");
            } else {
                tracing::error!(%service, %error, "deploy failed and was rolled back");
            }
        }
        Ok(report)
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
    async fn sync_routes(&self, state: &State) -> Option<String> {
        if self.proxy.is_none() {
            return None;
        }
        let result = self.proxy.apply(&Self::routes(state, None)).await;
        result.err().map(|e| {
            tracing::error!(error = %e, "routes not applied; retrying on the next run");
            e.to_string()
        })
    }

    /// A port in the configured range that no generation uses and nothing listens on.
    fn allocate_port(&self, state: &State) -> Result<u16, AgentError> {
        let used: std::collections::BTreeSet<u16> = state
            .services
            .values()
            .flat_map(|s| [s.current.as_ref(), s.previous.as_ref()])
            .flatten()
            .filter_map(|g| g.route.as_ref().map(|r| r.port))
            .collect();
        let (first, last) = self.config.port_range;
        (first..=last)
            .find(|p| !used.contains(p) && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            .ok_or(AgentError::NoFreePort { first, last })
    }

    /// No manifest to act on (unreachable store, invalid or refused manifest): nothing new
    /// is applied; what runs keeps running (drift repaired from the state alone).
    async fn fail_run(&self, state: &mut State, e: AgentError) -> Result<RunReport, AgentError> {
        tracing::error!(error = %e, "run failed; nothing new was applied, keeping what runs");
        let repaired = self.repair_drift(state).await.repaired;
        if !repaired.is_empty() {
            tracing::warn!(?repaired, "restored services that had drifted");
        }
        let _ = self.sync_routes(state).await;
        state.last_error = Some(e.to_string());
        state.save(&self.config.state_dir)?;
        Err(e)
    }

    /// With an unchanged manifest: every deployed unit is in place and running.
    async fn repair_drift(&self, state: &mut State) -> RunReport {
        let mut report = RunReport {
            unchanged: true,
            manifest_version: state.manifest_version.clone(),
            ..RunReport::default()
        };
        report.repaired = self.repair_infra(state).await;
        let names: Vec<String> = state.services.keys().cloned().collect();
        for name in names {
            let span = tracing::info_span!("service", service = %name);
            if self.ensure_running(&name, state).instrument(span).await {
                report.repaired.push(name);
            } else {
                report.kept.push(name);
            }
        }
        report
    }

    /// Every infrastructure unit the state records is as recorded and running (a stopped
    /// Postgres is started again). Returns the repaired ones, as `infra-<name>`.
    async fn repair_infra(&self, state: &mut State) -> Vec<String> {
        let mut repaired = Vec::new();
        for (name, infra) in &state.infra {
            let span = tracing::info_span!("infra", infra = %name);
            let (file_ok, active) = self
                .drift(&infra.unit, &infra.unit_file)
                .instrument(span.clone())
                .await;
            let active = match active {
                Ok(active) => active,
                Err(e) => {
                    tracing::warn!(parent: &span, error = %e, "cannot tell whether it runs");
                    continue;
                }
            };
            if file_ok && active {
                continue;
            }
            tracing::warn!(parent: &span, file_ok, active, "drift: starting it again as recorded");
            let result = self
                .put_back(&infra.unit, &infra.unit_file, file_ok)
                .instrument(span.clone())
                .await;
            match result {
                Ok(()) => repaired.push(names::infra_owner(name)),
                Err(e) => tracing::error!(parent: &span, error = %e, "could not start it again"),
            }
        }
        repaired
    }

    /// Infrastructure that no service declared for this host needs any more: stopped and its
    /// unit removed; its data stays (listed in the state's orphans). Nothing is stopped
    /// when what the services need cannot be told.
    async fn retire_unused_infra(&self, manifest: &Manifest, state: &mut State) -> Vec<String> {
        let Ok(needed) = infra::needed_on(manifest, &self.config.host) else {
            return Vec::new();
        };
        let unused: Vec<String> = state
            .infra
            .keys()
            .filter(|name| !needed.contains(*name))
            .cloned()
            .collect();
        let mut stopped = Vec::new();
        for name in unused {
            let unit = state.infra[&name].unit.clone();
            let span = tracing::info_span!("infra", infra = %name);
            match self.retire(&unit).instrument(span.clone()).await {
                Ok(()) => {
                    tracing::info!(parent: &span, "no service here needs it: stopped; its data is kept");
                    state.infra.remove(&name);
                    state.orphans.push(format!(
                        "infrastructure {name}: stopped, no service on this host needs it; its data is kept in {}",
                        names::infra_dir(&self.config.state_dir, &name).display()
                    ));
                    stopped.push(name);
                }
                Err(e) => tracing::error!(parent: &span, error = %e, "could not stop it"),
            }
        }
        state.orphans.sort();
        state.orphans.dedup();
        stopped
    }

    /// After a run that applied `manifest`: units of ours that no record in the state knows,
    /// such as a zero-downtime generation whose run was killed before it was recorded, or a
    /// release unit of a crashed run, are stopped and their files removed, so nothing of ours
    /// runs untracked. A unit is ours when its name reads as one of ours
    /// ([`names::parse_unit`]) and its file in the unit directory starts with our header, or
    /// (loaded, its file gone) its description is ours.
    ///
    /// What may still serve is left alone: the units of a declared service that has no
    /// healthy generation on record (a lost state.json whose redeploy has not succeeded),
    /// and infrastructure a declared service needs. Only full runs sweep, never a run that
    /// refused its manifest.
    async fn retire_unknown(&self, manifest: &Manifest, state: &State) -> Vec<String> {
        use crate::names::{UnitRole, parse_unit};
        let declared: Vec<&Service> = crate::plan::desired(manifest, &self.config.host);
        // Unknown when a service's needs cannot be told: then no infrastructure goes.
        let needed = infra::needed_on(manifest, &self.config.host).ok();
        let ours = |name: &str| match parse_unit(name) {
            None | Some(UnitRole::Probe(_)) => false,
            Some(UnitRole::Infra(infra)) => needed.as_ref().is_some_and(|n| !n.contains(&infra)),
            Some(
                UnitRole::Service(service)
                | UnitRole::Release(service)
                | UnitRole::Generation { service, .. },
            ) => {
                let is_declared = declared.iter().any(|s| s.name == service);
                let settled = state
                    .services
                    .get(&service)
                    .is_some_and(|s| s.current.is_some() && s.health == Health::Healthy);
                !is_declared || settled
            }
        };
        let known: std::collections::BTreeSet<&str> = state
            .services
            .values()
            .flat_map(|s| {
                [
                    Some(s.unit.as_str()),
                    s.current.as_ref().and_then(|g| g.unit.as_deref()),
                ]
            })
            .flatten()
            .chain(state.infra.values().map(|i| i.unit.as_str()))
            .collect();
        let mut found = std::collections::BTreeSet::new();
        if let Ok(dir) = std::fs::read_dir(&self.config.unit_dir) {
            for entry in dir.flatten() {
                let Ok(name) = entry.file_name().into_string() else {
                    continue;
                };
                let header = std::fs::read_to_string(entry.path())
                    .is_ok_and(|t| t.starts_with(crate::unit::HEADER));
                if ours(&name) && header {
                    found.insert(name);
                }
            }
        }
        match self.manager.list_units("deployer-*.service").await {
            Ok(units) => found.extend(
                units
                    .into_iter()
                    .filter(|u| {
                        ours(&u.name)
                            && u.load_state == "not-found"
                            && u.active_state != "inactive"
                            && u.description.starts_with("deployer")
                    })
                    .map(|u| u.name),
            ),
            Err(e) => tracing::warn!(error = %e, "cannot list the units of ours systemd has"),
        }
        let mut retired = Vec::new();
        for unit in found {
            if known.contains(unit.as_str()) {
                continue;
            }
            tracing::warn!(%unit, "a unit of ours that no state records: stopping it and removing its file");
            match self.retire(&unit).await {
                Ok(()) => retired.push(unit),
                Err(e) => tracing::error!(%unit, error = %e, "could not retire it"),
            }
        }
        retired
    }

    /// The manifest's spec runs (a `Keep`): a failure recorded for another spec (a version
    /// rolled back since), or for this one before the host was fixed (a missing artifact),
    /// is history once the running generation passes its health checks.
    async fn clear_failure(&self, service: &Service, state: &mut State) {
        let Some(entry) = state.services.get_mut(&service.name) else {
            return;
        };
        let Some(current) = &entry.current else {
            return;
        };
        if entry.failed.is_none() && entry.last_error.is_none() && entry.health == Health::Healthy {
            return;
        }
        let unit = entry.unit.clone();
        let healthy = match self.restored_probes(service, current) {
            Ok(probes) => wait_healthy(&self.manager, &unit, &probes, Duration::ZERO).await,
            Err(e) => Err(e.to_string()),
        };
        match healthy {
            Ok(()) => {
                tracing::info!("runs the manifest's spec healthily: earlier failure cleared");
                entry.failed = None;
                entry.last_error = None;
                entry.health = Health::Healthy;
            }
            Err(e) => {
                tracing::warn!(error = %e, "runs the manifest's spec, but not healthily");
                entry.health = Health::Unhealthy;
                entry.last_error = Some(format!("unhealthy: {e}"));
            }
        }
    }

    /// Make sure a deployed service's unit file is as recorded and the unit is active.
    /// Returns whether anything had to be repaired.
    async fn ensure_running(&self, name: &str, state: &mut State) -> bool {
        let Some(entry) = state.services.get_mut(name) else {
            return false;
        };
        let Some(current) = entry.current.clone() else {
            return false;
        };
        // A secrets file created or changed since the deploy is read at the next restart.
        let owner = if self.config.user { current_uid() } else { 0 };
        entry.warning = EnvFile::parse_all(&current.unit_file)
            .iter()
            .find_map(|f| secrets::recheck(f, owner).err());
        if let Some(w) = &entry.warning {
            tracing::warn!(warning = %w, "fix it before the service restarts");
        }
        let (file_ok, active) = self.drift(&entry.unit, &current.unit_file).await;
        let active = match active {
            Ok(active) => active,
            Err(e) => {
                entry.last_error = Some(e.to_string());
                return false;
            }
        };
        if file_ok && active {
            return false;
        }
        tracing::warn!(file_ok, active, "drift: restoring the recorded generation");
        let result = self
            .put_back(&entry.unit, &current.unit_file, file_ok)
            .await;
        entry.last_error = result.err().map(|e| e.to_string());
        entry.health = if entry.last_error.is_none() {
            Health::Healthy
        } else {
            Health::Unhealthy
        };
        entry.updated_at = Some(now());
        true
    }

    /// How `unit` stands against what was recorded: whether its file holds `unit_file`, and
    /// whether systemd says it is active.
    async fn drift(&self, unit: &str, unit_file: &str) -> (bool, Result<bool, SystemdError>) {
        let on_disk = std::fs::read_to_string(self.unit_path(unit)).ok();
        let file_ok = on_disk.as_deref() == Some(unit_file);
        let active = self.manager.status(unit).await.map(|s| s.is_active());
        (file_ok, active)
    }

    /// Put `unit` back as recorded: rewrite its file (and reload) unless `file_ok`, then
    /// (re)start it.
    async fn put_back(&self, unit: &str, unit_file: &str, file_ok: bool) -> Result<(), AgentError> {
        if !file_ok {
            self.write_unit(unit, unit_file)?;
            self.manager.reload().await?;
        }
        self.manager.restart(unit).await?;
        Ok(())
    }

    fn write_unit(&self, unit: &str, content: &str) -> Result<(), AgentError> {
        check_unit_name(unit)?;
        let dir = &self.config.unit_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
        let path = self.unit_path(unit);
        deploy_manifest::fsutil::write_atomically(&path, content.as_bytes(), 0o644)
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
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
        release: Option<&deploy_manifest::model::Release>,
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
        let mut environment: std::collections::BTreeMap<String, String> = service
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

    /// The probes of a restored previous generation: its exec probe runs in the service's
    /// sandbox with the environment files its own unit file names.
    fn restored_probes(&self, service: &Service, prev: &Generation) -> Result<Probes, AgentError> {
        let env_files = EnvFile::parse_all(&prev.unit_file);
        let artifact = Path::new(&prev.path);
        // A zero-downtime generation listens on the port it was given.
        let port = prev.unit.as_ref().and(prev.route.as_ref()).map(|r| r.port);
        let spec = self.unit_spec(service, artifact, &env_files, port, None)?;
        Ok(Probes::of(service, artifact, port, &spec))
    }

    /// Start (or keep) an infrastructure service and wait until it is ready; an external
    /// one is only resolved. Its unit is restarted only when its unit file changed or it is
    /// not running, so applying the same manifest again changes nothing.
    async fn ensure_infra(
        &self,
        name: &str,
        spec: &deploy_manifest::model::InfraService,
        state: &mut State,
    ) -> Result<infra::Endpoint, AgentError> {
        let ep = infra::endpoint(name, spec);
        let Some(unit) = ep.unit.clone() else {
            return Ok(ep);
        };
        let (argv, data) = infra::prepare(name, spec, &ep, &self.config.state_dir)?;
        let unit_file = UnitSpec {
            description: format!("deployer infrastructure: {name}"),
            exec_start: argv,
            working_directory: Some(data),
            user: None,
            group: None,
            environment: Default::default(),
            environment_files: Vec::new(),
            log_file: self
                .config
                .user
                .then(|| names::log_file(&self.config.state_dir.join("logs"), &unit)),
            hardening: false,
            oneshot: false,
            start_timeout: None,
        }
        .render()?;
        let (file_ok, active) = self.drift(&unit, &unit_file).await;
        if !file_ok || !active.unwrap_or(false) {
            tracing::info!(infra = name, "starting");
            self.put_back(&unit, &unit_file, file_ok).await?;
        }
        state.infra.insert(
            name.to_owned(),
            crate::state::InfraState {
                unit: unit.clone(),
                unit_file,
            },
        );
        let ready_exec = match spec.preset {
            Some(deploy_manifest::model::Preset::Postgres) => Some(ExecProbe::infrastructure(
                name,
                vec![
                    infra::pg_bin()?.join("pg_isready").display().to_string(),
                    "-q".into(),
                    "-h".into(),
                    names::infra_dir(&self.config.state_dir, name)
                        .join("run")
                        .display()
                        .to_string(),
                    "-p".into(),
                    ep.port().unwrap_or(5432).to_string(),
                ],
                &self.config.state_dir,
            )),
            _ => None,
        };
        let probes = match &spec.health_check {
            // A custom service's own healthCheck (seed 001's tcp / http / command).
            Some(h) => Probes::from_health(
                name,
                h,
                ep.port(),
                &self.config.state_dir,
                ep.startup_timeout,
            ),
            None => Probes {
                http: None,
                tcp: ep.port(),
                exec: ready_exec,
                timeout: ep.startup_timeout,
                interval: Duration::from_millis(200),
            },
        };
        // The readiness gate: a critical service must be up before dependants start.
        if let Err(e) = wait_healthy(&self.manager, &unit, &probes, Duration::ZERO).await {
            if ep.critical {
                return Err(AgentError::Infra {
                    what: name.to_owned(),
                    detail: format!("not ready within {} s: {e}", ep.startup_timeout.as_secs()),
                });
            }
            tracing::warn!(infra = name, error = %e, "not ready; it is not critical, going on");
        }
        Ok(ep)
    }

    /// Provision what `service` declares and write its generated env file (connection URLs,
    /// resolved templates). Returns that file, if there is anything in it.
    async fn infrastructure(
        &self,
        service: &Service,
        manifest: &Manifest,
        state: &mut State,
    ) -> Result<Option<PathBuf>, AgentError> {
        use deploy_manifest::model::Preset;
        // A reserved name (`deployer`, `infra-*`) would reach the agent's own files.
        secrets::check_service_name(&service.name, &self.config.secrets_dir)?;
        let eco = manifest.infrastructure.as_ref().map(|i| &i.services);
        let mut endpoints = Vec::new();
        for name in infra::needs(service, manifest)? {
            let spec = eco
                .and_then(|e| e.get(&name))
                .ok_or_else(|| AgentError::Infra {
                    what: name.clone(),
                    detail: "is not declared in the manifest's infrastructure.services".into(),
                })?;
            endpoints.push((name.clone(), self.ensure_infra(&name, spec, state).await?));
        }
        let find = |preset: Preset| endpoints.iter().find(|(_, e)| e.preset == Some(preset));
        // Secret files must be owned by root (by the agent's own user with --user).
        let owner_uid = if self.config.user { current_uid() } else { 0 };
        let layer = infra::AppLayer {
            secrets_dir: &self.config.secrets_dir,
            state_dir: &self.config.state_dir,
            owner_uid,
        };
        let mut vars = std::collections::BTreeMap::new();
        if let Some(req) = &service.infrastructure {
            if req.database == Some(true)
                && let Some((name, ep)) = find(Preset::Postgres)
            {
                vars.insert(
                    "DATABASE_URL".to_owned(),
                    layer.database_url(&service.name, ep, name)?,
                );
            }
            if req.redis == Some(true)
                && let Some((_, ep)) = find(Preset::Redis)
            {
                // Kept in Redis itself; state.json holds a copy (Redis wins).
                let (index, in_redis) =
                    infra::redis_index(ep, &service.name, &state.redis_indexes)?;
                for (name, i) in in_redis {
                    if name == service.name || state.redis_indexes.contains_key(&name) {
                        state.redis_indexes.insert(name, i);
                    }
                }
                vars.insert(
                    "REDIS_URL".to_owned(),
                    infra::AppLayer::redis_url(ep, index),
                );
            }
            for (rname, spec) in &req.services {
                let full = names::owned_infra(&service.name, rname);
                let ep = self.ensure_infra(&full, spec, state).await?;
                for (k, v) in &spec.env {
                    let (value, _) = infra::resolve(
                        &service.name,
                        k,
                        v,
                        Some(&ep),
                        &spec.secrets,
                        &self.config.secrets_dir,
                        owner_uid,
                    )?;
                    vars.insert(k.clone(), value);
                }
            }
        }
        for (k, v) in &service.env {
            if v.contains("${") {
                let (value, _) = infra::resolve(
                    &service.name,
                    k,
                    v,
                    None,
                    &Default::default(),
                    &self.config.secrets_dir,
                    owner_uid,
                )?;
                vars.insert(k.clone(), value);
            }
        }
        layer.write_env(&service.name, &vars)
    }

    /// Deploy one service; on failure, restore what ran before and record why. A failure of
    /// the new generation itself (it did not start or was unhealthy) marks its spec as
    /// failed, not to be retried; a failure before anything was touched (secrets file,
    /// fetch), or of the route switch, is retried by the next run (`Err((why, true))`).
    ///
    /// With a proxy and `http.zeroDowntime`, the new generation starts beside the old one on
    /// a fresh port (`$PORT`), the route switches once it is healthy, and the old one is
    /// stopped after the drain period; a failure only stops the new one. Otherwise the unit
    /// is restarted in place and, on failure, the previous unit file is restored.
    async fn deploy(
        &self,
        service: &Service,
        manifest: &Manifest,
        state: &mut State,
    ) -> Result<(), (String, bool)> {
        let default_unit = names::service_unit(&service.name);
        let zero = !self.proxy.is_none()
            && service.http.as_ref().and_then(|h| h.zero_downtime) == Some(true);
        let port = if zero {
            Some(
                self.allocate_port(state)
                    .map_err(|e| (e.to_string(), true))?,
            )
        } else {
            None
        };
        let unit = match port {
            Some(p) => names::generation_unit(&service.name, p),
            None => default_unit.clone(),
        };
        state
            .services
            .entry(service.name.clone())
            .or_insert_with(|| ServiceState {
                unit: default_unit.clone(),
                ..ServiceState::default()
            });
        let generated = self.infrastructure(service, manifest, state).await;
        let entry = state
            .services
            .get_mut(&service.name)
            .expect("inserted above");
        let generated = match generated {
            Ok(g) => g,
            Err(e) => {
                entry.last_error = Some(e.to_string());
                tracing::error!(error = %e, "infrastructure not ready; the next run retries");
                return Err((e.to_string(), true));
            }
        };
        let previous = entry.current.clone();
        let old_unit = entry.unit.clone();
        let side_by_side = unit != old_unit;
        let hash = spec_hash(service);
        let run_release =
            service.release.is_some() && entry.released.as_ref() != Some(&service.artifact);
        let launch = Launch {
            unit: &unit,
            port,
            generated_env: generated,
            run_release,
        };
        let mut outcome = self.try_deploy(service, &launch, &hash, manifest).await;

        // Switch the route to the healthy new generation (before the old one stops).
        if let Ok(generation) = &outcome
            && !self.proxy.is_none()
        {
            let routes = Self::routes(state, Some((&service.name, generation.route.as_ref())));
            if let Err(e) = self.proxy.apply(&routes).await {
                if side_by_side {
                    // The old generation still has the route: give up the new one, retry later.
                    outcome = Err((AgentError::Proxy(e), Stage::Touched));
                } else {
                    // Restarted in place: the service runs; the route is retried next run.
                    tracing::error!(error = %e, "deployed, but the route was not applied");
                }
            }
        }

        let entry = state
            .services
            .get_mut(&service.name)
            .expect("inserted above");
        entry.updated_at = Some(now());
        match outcome {
            Ok(generation) => {
                if side_by_side && previous.is_some() {
                    if zero {
                        tokio::time::sleep(self.config.drain).await;
                    }
                    if let Err(e) = self.retire(&old_unit).await {
                        tracing::warn!(error = %e, unit = %old_unit, "could not stop the previous generation");
                    }
                }
                tracing::info!(artifact = %generation.artifact.label(), %unit, "deployed and healthy");
                entry.unit = unit;
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
                    let _ = self.retire(&unit).await;
                }
                let error = error.to_string();
                tracing::error!(%error, "deploy not completed; the next run retries");
                entry.last_error = Some(error.clone());
                Err((error, true))
            }
            Err((error, stage)) => {
                let error = error.to_string();
                tracing::error!(%error, "deploy failed; restoring the previous generation");
                let mut message = error.clone();
                let restored = if stage == Stage::ReleaseFailed {
                    // The service's unit was never touched: what ran still runs.
                    Ok(())
                } else if side_by_side {
                    // The old generation never stopped: only the new one goes.
                    self.retire(&unit).await
                } else {
                    self.restore(&unit, previous.as_ref()).await
                };
                entry.health = match (restored, &previous) {
                    (Ok(()), Some(_)) if side_by_side || stage == Stage::ReleaseFailed => {
                        entry.health
                    }
                    (Ok(()), Some(prev)) => {
                        // Probe the restored generation (with the manifest's health settings).
                        let healthy = match self.restored_probes(service, prev) {
                            Ok(probes) => {
                                wait_healthy(&self.manager, &unit, &probes, self.config.settle)
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
                    (Ok(()), None) => Health::Unknown,
                    (Err(e), _) => {
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
                Err((message, false))
            }
        }
    }

    /// The deploy steps. The error says how far they got (and so what must be undone).
    async fn try_deploy(
        &self,
        service: &Service,
        launch: &Launch<'_>,
        hash: &str,
        manifest: &Manifest,
    ) -> Result<Generation, (AgentError, Stage)> {
        let untouched = |e: AgentError| (e, Stage::Untouched);
        let owner = if self.config.user { current_uid() } else { 0 };
        let env_file = secrets::env_file(
            &service.name,
            service.env_file.as_deref(),
            &self.config.secrets_dir,
            owner,
        )
        .map_err(untouched)?;
        let artifact = fetch::ensure(
            &self.store,
            &service.artifact,
            &self.config.state_dir,
            &self.config.nix_trusted_keys,
            self.config.unpack_limits,
        )
        .await
        .map_err(untouched)?;
        crate::fault::point("fetched");
        // Generated settings first, the operator's secrets file last (it wins).
        let env_files: Vec<EnvFile> = launch
            .generated_env
            .iter()
            .map(EnvFile::required)
            .chain([env_file])
            .collect();
        let spec = self
            .unit_spec(service, &artifact, &env_files, launch.port, None)
            .map_err(untouched)?;
        let unit_file = spec.render().map_err(|e| untouched(e.into()))?;
        if self.config.user {
            let logs = self.config.state_dir.join("logs");
            std::fs::create_dir_all(&logs).map_err(|e| {
                untouched(AgentError::io(format!("creating {}", logs.display()), e))
            })?;
        }
        if launch.run_release
            && let Some(release) = &service.release
        {
            let release_unit = names::release_unit(&service.name);
            let text = self
                .unit_spec(service, &artifact, &env_files, launch.port, Some(release))
                .and_then(|spec| Ok(spec.render()?))
                .map_err(untouched)?;
            self.write_unit(&release_unit, &text).map_err(untouched)?;
            self.manager
                .reload()
                .await
                .map_err(|e| untouched(e.into()))?;
            let timeout = release.timeout();
            tracing::info!(command = %release.command, ?timeout, "running the release command");
            // systemd kills it at TimeoutStartSec=; waiting longer than that plus its
            // TimeoutStopSec= (30 s) is only for a manager that does not answer.
            let wait = timeout + Duration::from_secs(45);
            let ran = self.manager.run_oneshot(&release_unit, wait).await;
            let _ = self.retire(&release_unit).await;
            let failed = |why: String| (AgentError::Release(why), Stage::ReleaseFailed);
            match ran {
                Ok(JobResult::Done) => {}
                Ok(JobResult::Failed(how)) => {
                    return Err(failed(format!("{:?} {how}", release.command)));
                }
                Ok(JobResult::Timeout) => {
                    return Err(failed(format!(
                        "{:?} was still running after its timeout of {} and was killed",
                        release.command,
                        humantime::format_duration(timeout)
                    )));
                }
                Ok(JobResult::Other(result)) => {
                    return Err(failed(format!(
                        "{:?}: its systemd job ended with {result:?}",
                        release.command
                    )));
                }
                Err(e) => return Err(failed(e.to_string())),
            }
        }
        let touched = |e: AgentError| (e, Stage::Touched);
        let unit = launch.unit;
        self.write_unit(unit, &unit_file).map_err(touched)?;
        crate::fault::point("unit-written");
        self.manager.reload().await.map_err(|e| touched(e.into()))?;
        self.manager
            .restart(unit)
            .await
            .map_err(|e| touched(e.into()))?;
        crate::fault::point("restarted");
        let probes = Probes::of(service, &artifact, launch.port, &spec);
        wait_healthy(&self.manager, unit, &probes, self.config.settle)
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
            unit: launch.port.map(|_| unit.to_owned()),
            route: service.http.as_ref().map(|h| RouteState {
                domain: h.domain.to_ascii_lowercase(),
                path: deploy_manifest::validate::route_path(&h.path),
                port: launch.port.unwrap_or(h.internal_port),
            }),
        })
    }

    /// Stop a unit and remove its file.
    async fn retire(&self, unit: &str) -> Result<(), AgentError> {
        let _ = self.manager.stop(unit).await;
        let path = self.unit_path(unit);
        if path.exists() {
            std::fs::remove_file(&path)
                .map_err(|e| AgentError::io(format!("removing {}", path.display()), e))?;
        }
        self.manager.reload().await?;
        Ok(())
    }

    /// Put the previous generation back (or, for a first deploy, stop and remove the unit).
    async fn restore(&self, unit: &str, previous: Option<&Generation>) -> Result<(), AgentError> {
        // Stop first: a failed unit may have an automatic restart pending, which would
        // otherwise fire after the previous generation is back.
        let _ = self.manager.stop(unit).await;
        match previous {
            Some(g) => self.put_back(unit, &g.unit_file, false).await?,
            None => self.retire(unit).await?,
        }
        Ok(())
    }

    /// Stop and remove a service no longer declared for this host. Its artifacts, data and
    /// secrets stay.
    async fn remove(&self, name: &str, state: &mut State) -> Result<(), AgentError> {
        let unit = state
            .services
            .get(name)
            .map(|s| s.unit.clone())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| names::service_unit(name));
        if self.unit_path(&unit).exists() {
            self.retire(&unit).await?;
        }
        state.services.remove(name);
        // Its data stays: say what is left behind.
        let generated = self.config.secrets_dir.join("deployer");
        if generated.join(format!("{name}.postgres-password")).exists() {
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

    /// `deployer-agent run`: reconcile every `interval` (with up to 10 % jitter), backing
    /// off after failures, until the process is stopped.
    pub async fn run_forever(&self) -> ! {
        let mut failures: u32 = 0;
        loop {
            let wait = match self.run_once().await {
                Ok(report) if report.failed.is_empty() => {
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

/// How far a deploy got before it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing on the host changed (secrets file, fetch, unit rendering): retried next run.
    Untouched,
    /// The release command failed: the spec is marked failed, the old generation never
    /// stopped.
    ReleaseFailed,
    /// The unit was written and restarted: the previous generation must be put back.
    Touched,
}

/// What a deploy launches.
struct Launch<'a> {
    unit: &'a str,
    port: Option<u16>,
    generated_env: Option<PathBuf>,
    run_release: bool,
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
