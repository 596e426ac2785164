//! A host in memory, for testing the reconcile decisions (plan and apply) without root,
//! systemd or a network: unit files in a map, a service manager that runs a unit unless its
//! file names a broken artifact, ports, routes, and a log of every change. Never a stand-in
//! for the real host in the end-to-end tests ([`super::system::SystemHost`] is tested
//! there).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use deploy_manifest::model::{Artifact, InfraService, Manifest, Service};
use deploy_manifest::store::ObjectStore;

use super::Host;
use crate::AgentError;
use crate::evidence::LogMark;
use crate::health::Probes;
use crate::proxy::{ProxyError, Route};
use crate::state::State;
use crate::systemd::{
    ActiveState, JobResult, ListedUnit, LoadState, ServiceManager, SystemdError, UnitSource,
    UnitStatus,
};
use crate::unit::{EnvFile, TransientSpec};

/// What the in-memory host holds; tests set it up and read it back.
#[derive(Debug, Default)]
pub struct World {
    /// The unit directory: unit → file text.
    pub files: BTreeMap<String, String>,
    /// The recorded generations' unit files: hash → text.
    pub texts: BTreeMap<String, String>,
    /// Recorded unit files removed behind the agent's back (by hash): not to be had until
    /// recorded again.
    pub lost_texts: BTreeSet<String>,
    /// Units the manager runs: unit → (active, description when started).
    pub units: BTreeMap<String, (bool, String)>,
    /// Ports something listens on.
    pub bound: BTreeSet<u16>,
    /// A unit whose file contains one of these exits at once (an artifact's path, see
    /// [`artifact_path`], or a command).
    pub broken: BTreeSet<String>,
    /// Artifact labels the store does not have.
    pub missing: BTreeSet<String>,
    /// Release commands fail.
    pub release_fails: bool,
    /// The next this many daemon-reloads fail.
    pub reload_fails: u32,
    /// Stopping this unit kills the agent (a panic: the test's kill -9).
    pub kill_on_stop: Option<String>,
    /// The unit directory cannot be changed: writing or removing a unit file fails.
    pub read_only: bool,
    /// Units that are active but fail their health probes.
    pub unhealthy: BTreeSet<String>,
    /// Units of the host's own, not the deployer's: name → what systemd says of it.
    pub foreign: BTreeMap<String, UnitSource>,
    /// Accounts this host does not have (every other one exists).
    pub missing_accounts: BTreeSet<String>,
    /// What each unit logged (every line, oldest first).
    pub unit_logs: BTreeMap<String, Vec<String>>,
    /// What a unit prints to its log each time it starts.
    pub prints: BTreeMap<String, Vec<String>>,
    /// The values each env file sets (by path); a path in `unreadable` cannot be read.
    pub env_values: BTreeMap<PathBuf, Vec<String>>,
    pub unreadable: BTreeSet<PathBuf>,
    /// The state as last saved, and how many times it was.
    pub saved: Option<State>,
    pub saves: u64,
    /// Calls to the manager of any kind (status, source, list, change).
    pub calls: u64,
    /// The proxy's routes.
    pub routes: Vec<Route>,
    /// Every change, in order: `write U`, `remove U`, `reload`, `restart U`, `stop U`,
    /// `prepare I`, `routes N`.
    pub log: Vec<String>,
}

impl World {
    /// With `read_only`, the error a change to the unit directory gets.
    fn check_writable(&self, what: &str) -> Result<(), AgentError> {
        if self.read_only {
            let e = std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem);
            return Err(AgentError::io(what.to_owned(), e));
        }
        Ok(())
    }

    fn load_state(&self, unit: &str) -> LoadState {
        if self.files.contains_key(unit) {
            LoadState::Loaded
        } else {
            LoadState::NotFound
        }
    }

    /// What the manager says of `unit`'s activity.
    fn active_state(&self, unit: &str) -> ActiveState {
        match self.units.get(unit) {
            Some((true, _)) => ActiveState::Active,
            Some((false, _)) => ActiveState::Failed,
            None => ActiveState::Inactive,
        }
    }
}

#[derive(Debug, Default)]
pub struct MemoryHost {
    world: Mutex<World>,
    /// A reverse proxy is configured.
    pub proxy: bool,
}

/// Where an artifact is "fetched" to.
pub fn artifact_path(artifact: &Artifact) -> PathBuf {
    PathBuf::from("/mem/artifacts").join(artifact.label().replace('/', "_"))
}

impl MemoryHost {
    pub fn new(proxy: bool) -> MemoryHost {
        MemoryHost {
            world: Mutex::default(),
            proxy,
        }
    }

    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().expect("not poisoned")
    }

    fn log(&self, what: String) {
        self.world().log.push(what);
    }

    /// The world, for one call to the manager (counted).
    fn call(&self) -> MutexGuard<'_, World> {
        let mut w = self.world();
        w.calls += 1;
        w
    }

    /// Whether `unit` runs.
    pub fn is_active(&self, unit: &str) -> bool {
        self.world().units.get(unit).is_some_and(|(a, _)| *a)
    }
}

fn job_error(call: &'static str, unit: &str, result: &str) -> SystemdError {
    SystemdError::Job {
        call,
        unit: unit.to_owned(),
        result: result.to_owned(),
    }
}

impl ServiceManager for MemoryHost {
    async fn reload(&self) -> Result<(), SystemdError> {
        let mut w = self.call();
        w.log.push("reload".into());
        if w.reload_fails > 0 {
            w.reload_fails -= 1;
            return Err(job_error("reload", "-", "timeout"));
        }
        Ok(())
    }

    async fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        let mut w = self.call();
        w.log.push(format!("restart {unit}"));
        let Some(text) = w.files.get(unit).cloned() else {
            return Err(job_error("restart", unit, "not loaded"));
        };
        let broken = w.broken.iter().any(|needle| text.contains(needle.as_str()));
        let description = text
            .lines()
            .find_map(|l| l.strip_prefix("Description="))
            .unwrap_or_default()
            .to_owned();
        w.units.insert(unit.to_owned(), (!broken, description));
        let printed = w.prints.get(unit).cloned().unwrap_or_default();
        w.unit_logs
            .entry(unit.to_owned())
            .or_default()
            .extend(printed);
        Ok(())
    }

    async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        let mut w = self.call();
        if w.kill_on_stop.as_deref() == Some(unit) {
            drop(w);
            panic!("killed while stopping {unit}");
        }
        w.log.push(format!("stop {unit}"));
        match w.units.remove(unit) {
            Some(_) => Ok(()),
            None => Err(job_error("stop", unit, "not loaded")),
        }
    }

    async fn status(&self, unit: &str) -> Result<UnitStatus, SystemdError> {
        let w = self.call();
        Ok(UnitStatus {
            load_state: w.load_state(unit),
            active_state: w.active_state(unit),
            sub_state: String::new(),
            n_restarts: 0,
            main_pid: 0,
        })
    }

    async fn source(&self, unit: &str) -> Result<UnitSource, SystemdError> {
        let w = self.call();
        if let Some(source) = w.foreign.get(unit) {
            return Ok(source.clone());
        }
        let load_state = w.load_state(unit);
        let (running, description) = match w.units.get(unit) {
            Some((active, description)) => (*active, description.clone()),
            None => (false, String::new()),
        };
        Ok(UnitSource {
            id: unit.to_owned(),
            fragment_path: match load_state {
                LoadState::Loaded => self.unit_path(unit).display().to_string(),
                _ => String::new(),
            },
            load_state,
            running,
            description,
        })
    }

    async fn run_transient(&self, _spec: &TransientSpec) -> Result<JobResult, SystemdError> {
        Ok(JobResult::Done)
    }

    async fn run_oneshot(&self, unit: &str, _wait: Duration) -> Result<JobResult, SystemdError> {
        self.call().log.push(format!("run {unit}"));
        Ok(if self.world().release_fails {
            JobResult::Failed("exited with status 1".into())
        } else {
            JobResult::Done
        })
    }

    async fn list_units(&self, pattern: &str) -> Result<Vec<ListedUnit>, SystemdError> {
        let prefix = pattern.trim_end_matches("*.service");
        let w = self.call();
        Ok(w.units
            .iter()
            .filter(|(name, _)| name.starts_with(prefix) && name.ends_with(".service"))
            .map(|(name, (active, description))| ListedUnit {
                name: name.clone(),
                description: description.clone(),
                load_state: w.load_state(name),
                active_state: if *active {
                    ActiveState::Active
                } else {
                    ActiveState::Failed
                },
            })
            .collect())
    }

    async fn unit_states(&self, units: &[&str]) -> Result<Vec<ListedUnit>, SystemdError> {
        let w = self.call();
        Ok(units
            .iter()
            .map(|unit| ListedUnit {
                name: (*unit).to_owned(),
                description: w.units.get(*unit).map(|u| u.1.clone()).unwrap_or_default(),
                load_state: w.load_state(unit),
                active_state: w.active_state(unit),
            })
            .collect())
    }

    async fn restarts(&self, units: &[&str]) -> BTreeMap<String, u32> {
        let w = self.call();
        units
            .iter()
            .filter(|u| w.load_state(u) == LoadState::Loaded)
            .map(|u| ((*u).to_owned(), 0))
            .collect()
    }

    fn calls(&self) -> u64 {
        self.world().calls
    }
}

impl Host for MemoryHost {
    type Manager = MemoryHost;

    fn manager(&self) -> &MemoryHost {
        self
    }

    fn unit_path(&self, unit: &str) -> PathBuf {
        PathBuf::from("/mem/units").join(unit)
    }

    fn read_unit(&self, unit: &str) -> Option<String> {
        self.world().files.get(unit).cloned()
    }

    fn write_unit(&self, unit: &str, text: &str) -> Result<(), AgentError> {
        let mut w = self.world();
        w.check_writable(&format!("writing {unit}"))?;
        w.log.push(format!("write {unit}"));
        w.files.insert(unit.to_owned(), text.to_owned());
        Ok(())
    }

    fn remove_unit(&self, unit: &str) -> Result<(), AgentError> {
        let mut w = self.world();
        w.check_writable(&format!("removing {unit}"))?;
        if w.files.remove(unit).is_some() {
            w.log.push(format!("remove {unit}"));
        }
        Ok(())
    }

    fn our_unit_files(&self) -> Vec<String> {
        let w = self.world();
        w.files
            .iter()
            .filter(|(_, text)| text.starts_with(crate::unit::HEADER))
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn record_unit_text(&self, text: &str) -> Result<String, AgentError> {
        let hash = crate::unit::text_hash(text);
        let mut w = self.world();
        w.lost_texts.remove(&hash);
        w.texts.insert(hash.clone(), text.to_owned());
        Ok(hash)
    }

    fn recorded_unit_text(&self, hash: &str) -> Result<String, AgentError> {
        let w = self.world();
        let kept = w.texts.get(hash).filter(|_| !w.lost_texts.contains(hash));
        kept.cloned().ok_or_else(|| AgentError::State {
            path: format!("units/{hash}"),
            detail: "no unit file recorded as this".into(),
        })
    }

    fn prune_unit_texts(&self, state: &State) {
        let keep = state.unit_hashes();
        self.world().texts.retain(|h, _| keep.contains(h.as_str()));
    }

    fn save_state(&self, state: &State) -> Result<(), AgentError> {
        let mut w = self.world();
        for hash in state.unit_hashes() {
            assert!(
                w.texts.contains_key(hash),
                "a saved state names unit file {hash}, which was not recorded"
            );
        }
        w.saved = Some(state.clone());
        w.saves += 1;
        Ok(())
    }

    fn state_writes(&self) -> u64 {
        self.world().saves
    }

    fn port_free(&self, port: u16) -> bool {
        !self.world().bound.contains(&port)
    }

    async fn fetch<S: ObjectStore>(
        &self,
        _store: &S,
        artifact: &Artifact,
    ) -> Result<PathBuf, AgentError> {
        if self.world().missing.contains(&artifact.label()) {
            return Err(AgentError::Fetch {
                artifact: artifact.label(),
                detail: "not in the store".into(),
            });
        }
        Ok(artifact_path(artifact))
    }

    fn env_file(&self, service: &str, _declared: Option<&str>) -> Result<EnvFile, AgentError> {
        Ok(EnvFile {
            path: PathBuf::from(format!("/mem/secrets/{service}.env")),
            optional: true,
        })
    }

    fn env_warning(&self, _files: &[EnvFile]) -> Option<String> {
        None
    }

    fn check_exec(&self, service: &Service) -> Result<(), String> {
        let Some(exec) = &service.exec else {
            return Ok(());
        };
        let w = self.world();
        let exists = |name: &str| !w.missing_accounts.contains(name);
        crate::accounts::check_exec(exec, &[], exists, exists, |_| true)
    }

    fn prepare_infra(&self, name: &str, _spec: &InfraService) -> Result<(), AgentError> {
        self.log(format!("prepare {name}"));
        Ok(())
    }

    /// Logs where the service's database and Redis answer (`env <service>: database
    /// <name>:<port>`), as the real host would connect.
    fn app_env(
        &self,
        service: &Service,
        manifest: &Manifest,
        infra: &BTreeMap<String, crate::infra::HostSpec>,
        _indexes: &mut BTreeMap<String, u32>,
    ) -> Result<Option<PathBuf>, AgentError> {
        let binding = crate::infra::binding(service, manifest)?;
        let at = |name: &String| {
            let port = infra
                .get(name)
                .and_then(|h| crate::infra::endpoint_of(name, h).ok())
                .and_then(|ep| ep.port());
            format!(
                "{name}:{}",
                port.map_or("none".to_owned(), |p| p.to_string())
            )
        };
        if let Some((name, _)) = &binding.database {
            self.log(format!("env {}: database {}", service.name, at(name)));
        }
        if let Some((name, _)) = &binding.redis {
            self.log(format!("env {}: redis {}", service.name, at(name)));
        }
        Ok(None)
    }

    fn has_database(&self, _service: &str) -> bool {
        false
    }

    async fn wait_healthy(
        &self,
        unit: &str,
        _probes: &Probes,
        _settle: Duration,
    ) -> Result<(), String> {
        if !self.is_active(unit) {
            Err(format!("{unit} is failed"))
        } else if self.world().unhealthy.contains(unit) {
            Err(format!("{unit}: its probe fails"))
        } else {
            Ok(())
        }
    }

    fn log_mark(&self, unit: &str) -> LogMark {
        let lines = self.world().unit_logs.get(unit).map_or(0, Vec::len);
        LogMark {
            at: std::time::SystemTime::now(),
            offset: lines as u64,
        }
    }

    async fn unit_log(&self, unit: &str, mark: &LogMark) -> Result<Vec<String>, String> {
        let w = self.world();
        let lines = w.unit_logs.get(unit).map(Vec::as_slice).unwrap_or_default();
        let after = lines.get(mark.offset as usize..).unwrap_or_default();
        Ok(after.to_vec())
    }

    fn secret_values(&self, _service: &str, files: &[EnvFile]) -> Result<Vec<String>, String> {
        let w = self.world();
        let mut values = Vec::new();
        for f in files {
            if w.unreadable.contains(&f.path) {
                return Err(format!("{} cannot be read", f.path.display()));
            }
            values.extend(w.env_values.get(&f.path).cloned().unwrap_or_default());
        }
        Ok(values)
    }

    fn has_proxy(&self) -> bool {
        self.proxy
    }

    async fn apply_routes(&self, routes: &[Route]) -> Result<(), ProxyError> {
        let mut w = self.world();
        w.log.push(format!("routes {}", routes.len()));
        w.routes = routes.to_vec();
        Ok(())
    }
}
