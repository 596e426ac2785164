//! Declared infrastructure (seed 001, on systemd): the shared Postgres and Redis presets and
//! custom daemons run as `deployer-infra-<name>.service` with their data under
//! `<state>/infra/<name>`, or point at an `external` server; and the app layer on top:
//! `database: true` (a role and a database per service, marked as deployer's with a comment,
//! its password generated once and kept in the secrets directory; a role or database deployer
//! did not create is never touched), `redis: true` (a Redis DB index per service, never
//! reused, recorded in Redis itself), and env templates (`${host}`, `${port:name}`,
//! `${secret:name}`, the latter from the service's own secrets directory only).
//!
//! Everything an app gets from here goes into its generated env file
//! (`<secrets>/deployer/<service>.env`, mode 600), never into a unit file, a log or the state.
//!
//! # Layout
//! - this module: what a service needs ([`needs`], [`needed_on`]) and where it answers
//!   ([`endpoint`]).
//! - [`daemon`]: a provisioned daemon's command, unit file and data directory.
//! - [`postgres`]: the PostgreSQL binaries, and a service's role and database.
//! - [`redis`]: a service's Redis DB index, allocated in Redis itself.
//! - [`app`]: what a service gets: its generated env file, templates resolved.

pub mod app;
pub mod daemon;
pub mod postgres;
pub mod redis;

pub use app::{AppLayer, password_path};
pub use daemon::{prepare, unit_file};
pub use postgres::pg_bin;

use std::collections::BTreeMap;
use std::time::Duration;

use deploy_manifest::model::{InfraService, Manifest, Preset, Service};

use crate::AgentError;

/// Where an infrastructure service answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub host: String,
    pub ports: BTreeMap<String, u16>,
    /// Provisioned here (a unit of ours) rather than external.
    pub unit: Option<String>,
    pub preset: Option<Preset>,
    pub critical: bool,
    pub startup_timeout: Duration,
}

impl Endpoint {
    pub fn port(&self) -> Option<u16> {
        self.ports
            .get("tcp")
            .or_else(|| self.ports.values().next())
            .copied()
    }
}

fn err(what: &str, detail: impl Into<String>) -> AgentError {
    AgentError::Infra {
        what: what.to_owned(),
        detail: detail.into(),
    }
}

/// The infrastructure services `service` needs: the postgres preset for `database`, the
/// redis preset for `redis`, its own requirements (`<service>-<req>`) and what they depend
/// on.
pub fn needs(service: &Service, manifest: &Manifest) -> Result<Vec<String>, AgentError> {
    let eco = manifest.infrastructure.as_ref().map(|i| &i.services);
    let find = |preset: Preset| {
        eco.and_then(|s| {
            s.iter()
                .find(|(_, v)| v.preset == Some(preset))
                .map(|(k, _)| k.clone())
        })
    };
    let mut out = Vec::new();
    if let Some(infra) = &service.infrastructure {
        if infra.database == Some(true) {
            out.push(find(Preset::Postgres).ok_or_else(|| {
                err(
                    &service.name,
                    "declares \"database\": true but the manifest's infrastructure.services has no {\"preset\": \"postgres\"}",
                )
            })?);
        }
        if infra.redis == Some(true) {
            out.push(find(Preset::Redis).ok_or_else(|| {
                err(
                    &service.name,
                    "declares \"redis\": true but the manifest's infrastructure.services has no {\"preset\": \"redis\"}",
                )
            })?);
        }
        for (req, spec) in &infra.services {
            out.extend(spec.depends_on.iter().cloned());
            out.push(crate::names::owned_infra(&service.name, req));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Every infrastructure service the services declared for `host` need: what [`needs`]
/// says of each.
pub fn needed_on(
    manifest: &Manifest,
    host: &str,
) -> Result<std::collections::BTreeSet<String>, AgentError> {
    let mut needed = std::collections::BTreeSet::new();
    for service in crate::plan::desired(manifest, host) {
        needed.extend(needs(service, manifest)?);
    }
    Ok(needed)
}

fn default_ports(spec: &InfraService) -> BTreeMap<String, u16> {
    if !spec.ports.is_empty() {
        return spec.ports.clone();
    }
    match spec.preset {
        Some(Preset::Postgres) => [("tcp".to_owned(), 5432)].into(),
        Some(Preset::Redis) => [("tcp".to_owned(), 6379)].into(),
        None => BTreeMap::new(),
    }
}

/// Resolve where `name` answers (without starting anything).
pub fn endpoint(name: &str, spec: &InfraService) -> Endpoint {
    let (host, ports, unit) = match &spec.external {
        Some(ext) => (
            ext.host.clone(),
            if ext.ports.is_empty() {
                default_ports(spec)
            } else {
                ext.ports.clone()
            },
            None,
        ),
        None => (
            "127.0.0.1".to_owned(),
            default_ports(spec),
            Some(crate::names::infra_unit(name)),
        ),
    };
    Endpoint {
        name: name.to_owned(),
        host,
        ports,
        unit,
        preset: spec.preset,
        critical: spec.critical.unwrap_or(true),
        startup_timeout: spec
            .startup_timeout
            .as_ref()
            .map_or(Duration::from_secs(120), deploy_manifest::model::Span::get),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// What keeps infrastructure running: only this host's services, each one's presets,
    /// dependencies and own requirements.
    #[test]
    fn needed_on_a_host_is_what_its_services_need() {
        let m = deploy_manifest::validate::manifest_from_value(
            serde_json::json!({"schemaVersion": 1,
                "infrastructure": {"services": {
                    "db": {"preset": "postgres"}, "cache": {"preset": "redis"},
                    "queue": {"command": ["/bin/true"]}}},
                "services": [
                    {"name": "a", "artifact": {"storePath": "/nix/store/a"}, "hosts": ["biz"],
                     "infrastructure": {"database": true, "services": {
                         "search": {"command": ["/bin/true"], "dependsOn": ["queue"]}}}},
                    {"name": "b", "artifact": {"storePath": "/nix/store/b"}, "hosts": ["other"],
                     "infrastructure": {"redis": true}}]}),
            "test",
        )
        .unwrap();
        let needed = needed_on(&m, "biz").unwrap();
        assert_eq!(
            needed.iter().map(String::as_str).collect::<Vec<_>>(),
            ["a-search", "db", "queue"]
        );
        assert_eq!(
            needed_on(&m, "other")
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            ["cache"]
        );
        assert!(needed_on(&m, "nowhere").unwrap().is_empty());
    }
}
