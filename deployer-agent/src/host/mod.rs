//! Every side effect a run has on the host, behind one trait: unit files, the service
//! manager (systemd jobs and status), ports, artifacts, the files under the state and
//! secrets directories (secrets checks, infrastructure data, generated env files), health
//! probes and the proxy's routes.
//!
//! [`system::SystemHost`] is the real one (systemd over D-Bus, the file system, Caddy or
//! nginx), tested end to end; `memory::MemoryHost` (tests only) keeps it all in memory so
//! that the reconcile decisions can be tested table-driven without root.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use deploy_manifest::model::{Artifact, InfraService, Manifest, Service};
use deploy_manifest::store::ObjectStore;

use crate::AgentError;
use crate::evidence::LogMark;
use crate::health::Probes;
use crate::proxy::{ProxyError, Route};
use crate::state::State;
use crate::systemd::ServiceManager;
use crate::unit::EnvFile;

#[cfg(test)]
pub mod memory;
pub mod system;

/// The host a run converges.
pub trait Host {
    type Manager: ServiceManager;

    /// The service manager (systemd).
    fn manager(&self) -> &Self::Manager;

    /// Where `unit`'s file is in the unit directory.
    fn unit_path(&self, unit: &str) -> PathBuf;
    /// The text of `unit`'s file in the unit directory, if there is one.
    fn read_unit(&self, unit: &str) -> Option<String>;
    /// Write `unit`'s file (atomically); the manager sees it after a reload.
    fn write_unit(&self, unit: &str, text: &str) -> Result<(), AgentError>;
    /// Remove `unit`'s file, if there is one.
    fn remove_unit(&self, unit: &str) -> Result<(), AgentError>;
    /// The files in the unit directory that start with our header ([`crate::unit::HEADER`]).
    fn our_unit_files(&self) -> Vec<String>;

    /// Whether `unit`'s file in the unit directory is the text whose hash is `hash`
    /// ([`crate::unit::text_hash`]).
    fn unit_matches(&self, unit: &str, hash: &str) -> bool {
        self.read_unit(unit)
            .is_some_and(|text| crate::unit::text_hash(&text) == hash)
    }
    /// Keep a generation's unit file beside the state ([`crate::state::UnitTexts`]): its
    /// hash, which the state records.
    fn record_unit_text(&self, text: &str) -> Result<String, AgentError>;
    /// The unit file kept as `hash`, or why it cannot be had.
    fn recorded_unit_text(&self, hash: &str) -> Result<String, AgentError>;
    /// Forget the unit files no generation of `state` (saved) names.
    fn prune_unit_texts(&self, state: &State);

    /// Write `state.json` (atomically: [`State::save`]), after the unit files it names.
    fn save_state(&self, state: &State) -> Result<(), AgentError>;
    /// Times [`Host::save_state`] wrote it so far.
    fn state_writes(&self) -> u64;

    /// Nothing listens on this loopback port.
    fn port_free(&self, port: u16) -> bool;

    /// The artifact, fetched and verified if it is not here yet: where it is.
    fn fetch<S: ObjectStore>(
        &self,
        store: &S,
        artifact: &Artifact,
    ) -> impl Future<Output = Result<PathBuf, AgentError>>;

    /// The operator's secrets file of `service`, checked ([`crate::secrets::env_file`]).
    fn env_file(&self, service: &str, declared: Option<&str>) -> Result<EnvFile, AgentError>;
    /// What is wrong with the env files a deployed unit names (checked every run), if
    /// anything.
    fn env_warning(&self, files: &[EnvFile]) -> Option<String>;

    /// What `service`'s `exec` asks of this host is here (its account and group, its
    /// writable paths, none of them the agent's own), or what is missing and how to fix it.
    fn check_exec(&self, service: &Service) -> Result<(), String>;

    /// Prepare an infrastructure service's data directory before it starts.
    fn prepare_infra(&self, name: &str, spec: &InfraService) -> Result<(), AgentError>;
    /// Provision what `service` declares on top of its infrastructure (database and role,
    /// Redis index, resolved templates) and write its generated env file; that file, if
    /// there is anything in it. `infra`: this host's infrastructure as it runs
    /// ([`crate::infra::host_specs`]); `indexes` is the state's copy of the Redis indexes.
    fn app_env(
        &self,
        service: &Service,
        manifest: &Manifest,
        infra: &std::collections::BTreeMap<String, crate::infra::HostSpec>,
        indexes: &mut std::collections::BTreeMap<String, u32>,
    ) -> Result<Option<PathBuf>, AgentError>;
    /// Whether a database of `service`'s was provisioned here (its password is kept).
    fn has_database(&self, service: &str) -> bool;

    /// Wait until `unit` passes `probes` (or has been active for `settle`), or say why not.
    fn wait_healthy(
        &self,
        unit: &str,
        probes: &Probes,
        settle: Duration,
    ) -> impl Future<Output = Result<(), String>>;

    /// Where `unit`'s log ends now: [`Host::unit_log`] reads what comes after.
    fn log_mark(&self, unit: &str) -> LogMark;
    /// The newest lines (at most [`crate::evidence::LOG_LINES`]) `unit` logged after
    /// `mark`, as written (not yet masked): the journal under the system manager, the
    /// unit's log file under a user manager.
    fn unit_log(
        &self,
        unit: &str,
        mark: &LogMark,
    ) -> impl Future<Output = Result<Vec<String>, String>>;
    /// Every secret value of `service`: what its env files `files` set (its own secrets
    /// file and its generated one), the content of each file in its secrets directory (what
    /// `${secret:…}` reads, whole and line by line) and its database password: what is
    /// masked in its log. An existing file that cannot be read (a refused mode or owner) is
    /// an error: its values could not be masked.
    fn secret_values(&self, service: &str, files: &[EnvFile]) -> Result<Vec<String>, String>;

    /// A reverse proxy is configured.
    fn has_proxy(&self) -> bool;
    /// Make the proxy's routes exactly `routes`.
    fn apply_routes(&self, routes: &[Route]) -> impl Future<Output = Result<(), ProxyError>>;
}
