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
pub mod garage;
pub mod mysql;
pub mod postgres;
pub mod redis;

pub use app::{AppLayer, password_path, password_paths, redis_password_path};
pub use daemon::{prepare, unit_file};
pub use postgres::pg_bin;

use std::collections::BTreeMap;
use std::time::Duration;

use deploy_manifest::model::{Dialect, InfraService, Manifest, Preset, Service};

use crate::AgentError;
use crate::state::InfraState;

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

/// The manifest as `host`'s infrastructure sees it: `infrastructure.overrides` entries that
/// name this host (or one of its labels) applied in order, a plain name's first (to the
/// shared service and every service's own requirement of that name), then
/// `<service>/<requirement>` ones (the more specific wins); a disabled one is gone. The
/// services' own specs (and so their spec hashes) are not what changes here: only
/// infrastructure declarations. Borrowed when nothing applies.
pub fn for_host<'m>(manifest: &'m Manifest, host: &str) -> std::borrow::Cow<'m, Manifest> {
    use std::borrow::Cow;
    let Some(infra) = &manifest.infrastructure else {
        return Cow::Borrowed(manifest);
    };
    let labels = manifest.rollout.as_ref().map(|r| &r.labels);
    let applies = |e: &&deploy_manifest::model::InfraOverrides| {
        e.hosts.iter().any(|h| h == host)
            || e.labels.iter().any(|l| {
                labels
                    .and_then(|ls| ls.get(l))
                    .is_some_and(|hs| hs.iter().any(|h| h == host))
            })
    };
    let entries: Vec<_> = infra.overrides.iter().filter(applies).collect();
    if entries.is_empty() {
        return Cow::Borrowed(manifest);
    }
    let mut m = manifest.clone();
    // (service or None for shared, name) → disabled, as the last entry that says says.
    let mut disabled: BTreeMap<(Option<String>, String), bool> = BTreeMap::new();
    for scoped in [false, true] {
        for entry in &entries {
            for (key, o) in entry
                .services
                .iter()
                .filter(|(k, _)| k.contains('/') == scoped)
            {
                let mut targets: Vec<(Option<String>, String)> = Vec::new();
                match key.split_once('/') {
                    Some((app, req)) => targets.push((Some(app.to_owned()), req.to_owned())),
                    None => {
                        targets.push((None, key.clone()));
                        for s in &m.services {
                            if s.infrastructure
                                .as_ref()
                                .is_some_and(|i| i.services.contains_key(key))
                            {
                                targets.push((Some(s.name.clone()), key.clone()));
                            }
                        }
                    }
                }
                for (app, name) in targets {
                    let Some(spec) =
                        declarations(&mut m, app.as_deref()).and_then(|d| d.get_mut(&name))
                    else {
                        continue;
                    };
                    if let Some(e) = &o.external {
                        spec.external = Some(e.clone());
                    }
                    if let Some(c) = &o.command {
                        spec.command = Some(c.clone());
                        spec.variants.clear();
                    }
                    if let Some(c) = &o.config {
                        spec.config = Some(deploy_manifest::model::merge_config(
                            spec.config.as_ref(),
                            c,
                        ));
                    }
                    if let Some(d) = o.disabled {
                        disabled.insert((app, name), d);
                    }
                }
            }
        }
    }
    for ((app, name), off) in disabled {
        if let Some(d) = declarations(&mut m, app.as_deref()).filter(|_| off) {
            d.remove(&name);
        }
    }
    Cow::Owned(m)
}

/// The infrastructure declarations of service `app`'s own requirements, or with `None` the
/// shared ones.
fn declarations<'m>(
    m: &'m mut Manifest,
    app: Option<&str>,
) -> Option<&'m mut BTreeMap<String, InfraService>> {
    match app {
        None => m.infrastructure.as_mut().map(|i| &mut i.services),
        Some(app) => m
            .service_mut(app)
            .and_then(|s| s.infrastructure.as_mut())
            .map(|i| &mut i.services),
    }
}

/// [`for_host`] of `manifest` with `service` in it: the manifest's own, or an earlier
/// version of it that a revert returns to (whose requirements the overrides change too).
pub fn with_service_for_host(manifest: &Manifest, service: &Service, host: &str) -> Manifest {
    let mut m = manifest.clone();
    match m.service_mut(&service.name) {
        Some(s) => *s = service.clone(),
        None => m.services.push(service.clone()),
    }
    for_host(&m, host).into_owned()
}

/// Which infrastructure service gives `service` what it asks for (seed 001's shorthands).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Binding {
    /// `database`: the server (a shared preset, or its own `<service>-<preset>`) and its
    /// dialect.
    pub database: Option<(String, Dialect)>,
    /// `redis`: the server (the shared preset, or its own `<service>-redis`) and whether it
    /// is the service's own (then the whole server, behind a password).
    pub redis: Option<(String, bool)>,
    /// `s3`: the object store (the shared `garage` preset).
    pub s3: Option<String>,
    /// Its own requirements: `(req, <service>-<req>)`.
    pub owned: Vec<(String, String)>,
}

impl Binding {
    /// Every infrastructure service it is bound to, with the dialect a database speaks.
    pub fn servers(&self) -> impl Iterator<Item = (&String, Option<Dialect>)> {
        let database = self.database.iter().map(|(n, d)| (n, Some(*d)));
        let redis = self.redis.iter().map(|(n, _)| (n, None));
        let s3 = self.s3.iter().map(|n| (n, None));
        let owned = self.owned.iter().map(|(_, n)| (n, None));
        database.chain(redis).chain(s3).chain(owned)
    }
}

/// The name of `service`'s dedicated server of `preset` (`<service>-postgres`,
/// `-mysql`, `-redis`), infrastructure of its own like its requirements; by preset, so
/// that another dialect is another server with its own data directory.
pub fn dedicated_name(service: &str, preset: Preset) -> String {
    crate::names::owned_infra(service, preset.name())
}

/// The shared infrastructure service of `preset`: the first one the manifest declares.
fn shared(manifest: &Manifest, preset: Preset) -> Option<(&String, &InfraService)> {
    manifest
        .infrastructure
        .as_ref()?
        .services
        .iter()
        .find(|(_, s)| s.preset == Some(preset))
}

/// What gives `service` its database, Redis and requirements; an error when a shorthand
/// needs a shared preset the manifest does not declare.
pub fn binding(service: &Service, manifest: &Manifest) -> Result<Binding, AgentError> {
    let mut out = Binding::default();
    let Some(infra) = &service.infrastructure else {
        return Ok(out);
    };
    let missing = |what: &str, preset: &str| {
        let own = match what {
            "s3" => String::new(),
            _ => format!(", or give the service its own (\"{what}\": {{\"dedicated\": true}})"),
        };
        err(
            &service.name,
            format!(
                "declares a shared {what} but there is no {{\"preset\": \"{preset}\"}} for this host (none in infrastructure.services, or disabled here by infrastructure.overrides); declare one{own}"
            ),
        )
    };
    if let Some(db) = infra.database() {
        let dialect = db.dialect();
        let preset = dialect.preset();
        let name = if db.dedicated() {
            dedicated_name(&service.name, preset)
        } else {
            shared(manifest, preset)
                .ok_or_else(|| missing("database", preset.name()))?
                .0
                .clone()
        };
        out.database = Some((name, dialect));
    }
    if let Some(redis) = infra.redis() {
        let name = if redis.dedicated() {
            dedicated_name(&service.name, Preset::Redis)
        } else {
            shared(manifest, Preset::Redis)
                .ok_or_else(|| missing("redis", "redis"))?
                .0
                .clone()
        };
        out.redis = Some((name, redis.dedicated()));
    }
    if infra.s3().is_some() {
        let name = shared(manifest, Preset::Garage)
            .ok_or_else(|| missing("s3", "garage"))?
            .0
            .clone();
        out.s3 = Some(name);
    }
    out.owned = infra
        .services
        .keys()
        .map(|req| (req.clone(), crate::names::owned_infra(&service.name, req)))
        .collect();
    Ok(out)
}

/// The infrastructure services `service` needs: what gives it its database and Redis, its
/// own requirements (`<service>-<req>`), and everything those depend on, transitively.
pub fn needs(service: &Service, manifest: &Manifest) -> Result<Vec<String>, AgentError> {
    let mut todo: Vec<String> = binding(service, manifest)?
        .servers()
        .map(|(n, _)| n.clone())
        .collect();
    let own = service
        .infrastructure
        .iter()
        .flat_map(|i| &i.services)
        .collect::<BTreeMap<_, _>>();
    // What is not declared for this host (disabled by an override) is not needed.
    let declared = |dep: &String| {
        own.contains_key(dep)
            || manifest
                .infrastructure
                .as_ref()
                .is_some_and(|i| i.services.contains_key(dep))
    };
    let mut out = std::collections::BTreeSet::new();
    while let Some(name) = todo.pop() {
        if !out.insert(name.clone()) {
            continue;
        }
        // An own requirement's `dependsOn` names a shared one, else a sibling
        // ([`Manifest::dependency_name`]); a shared one's names shared ones.
        let sibling = own
            .iter()
            .find(|(req, _)| crate::names::owned_infra(&service.name, req) == name);
        match sibling {
            Some((_, spec)) => todo.extend(
                spec.depends_on
                    .iter()
                    .filter(|d| declared(d))
                    .map(|dep| manifest.dependency_name(service, dep)),
            ),
            None => todo.extend(
                manifest
                    .infrastructure
                    .iter()
                    .filter_map(|i| i.services.get(&name))
                    .flat_map(|s| s.depends_on.iter().filter(|d| declared(d)).cloned()),
            ),
        }
    }
    Ok(out.into_iter().collect())
}

/// One infrastructure service that may run on a host, as it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSpec {
    pub name: String,
    pub spec: InfraService,
    /// A dedicated server without a declared port: the plan picks a free one the first
    /// time (`spec.ports` is empty until then), and the state keeps it.
    pub keeps_port: bool,
}

/// The spec of `service`'s dedicated server of `preset`: its declared port, else the one
/// it was given when it first started (`recorded`), else none yet. A dedicated Redis is
/// password-protected (the whole server is the service's).
fn dedicated_spec(
    name: String,
    preset: Preset,
    port: Option<u16>,
    recorded: Option<&InfraState>,
) -> HostSpec {
    let ports = match (port, recorded) {
        (Some(p), _) => [("tcp".to_owned(), p)].into(),
        (None, Some(r)) => r.ports.clone(),
        (None, None) => BTreeMap::new(),
    };
    HostSpec {
        name,
        keeps_port: port.is_none(),
        spec: InfraService {
            preset: Some(preset),
            ports,
            config: (preset == Preset::Redis).then(|| serde_json::json!({"password": true})),
            ..InfraService::default()
        },
    }
}

/// Every infrastructure service that may run on `host`, as it runs: the shared ones, then
/// for each service declared here its own requirements (`<service>-<req>`) and dedicated
/// servers; in start order (what one depends on before it, else as listed). `recorded`
/// gives a dedicated server without a declared port the one it has.
pub fn host_specs(
    manifest: &Manifest,
    host: &str,
    recorded: &BTreeMap<String, InfraState>,
) -> Vec<HostSpec> {
    let spec = |name: String, spec: &InfraService| HostSpec {
        name,
        spec: spec.clone(),
        keeps_port: false,
    };
    let mut all: Vec<(HostSpec, Vec<String>)> = manifest
        .infrastructure
        .iter()
        .flat_map(|i| &i.services)
        .map(|(name, s)| (spec(name.clone(), s), s.depends_on.clone()))
        .collect();
    for s in crate::plan::desired(manifest, host) {
        let Some(infra) = &s.infrastructure else {
            continue;
        };
        for (req, s_req) in &infra.services {
            let deps = s_req
                .depends_on
                .iter()
                .map(|dep| manifest.dependency_name(s, dep))
                .collect();
            all.push((spec(crate::names::owned_infra(&s.name, req), s_req), deps));
        }
        let declared_port = |p: Preset| match p {
            Preset::Redis => infra.redis().and_then(|r| r.port),
            _ => infra.database().and_then(|d| d.port),
        };
        for preset in infra.dedicated() {
            let port = declared_port(preset);
            let name = dedicated_name(&s.name, preset);
            let recorded = recorded.get(&name);
            all.push((dedicated_spec(name, preset, port, recorded), Vec::new()));
        }
    }
    start_order(all)
}

/// `specs` ordered so that each comes after what it depends on (a stable topological
/// order; a cycle, which validation refuses, keeps the rest as listed).
fn start_order(mut rest: Vec<(HostSpec, Vec<String>)>) -> Vec<HostSpec> {
    let mut out = Vec::with_capacity(rest.len());
    while !rest.is_empty() {
        let names: std::collections::BTreeSet<&str> =
            rest.iter().map(|(s, _)| s.name.as_str()).collect();
        let next = rest
            .iter()
            .position(|(_, deps)| deps.iter().all(|d| !names.contains(d.as_str())))
            .unwrap_or(0);
        out.push(rest.remove(next).0);
    }
    out
}

/// What `service`'s generated env file is made from, beyond the service's own spec: where
/// each infrastructure service it is bound to answers (host, ports, external or not, whether
/// a password is asked), the preset's config (what a deploy makes in it, e.g. extensions)
/// and, for its requirements, their env and secrets: hashed. `None`
/// when it uses no infrastructure. A kept port (a dedicated server's, picked once) is left
/// out: it does not change while the server is kept. When this changes (a shared server
/// moved, a requirement's endpoint gone), the service is deployed again, so no stale or
/// phantom endpoint stays in its env file.
pub fn endpoints_hash(
    service: &Service,
    manifest: &Manifest,
    specs: &BTreeMap<String, HostSpec>,
    mode: Option<&str>,
) -> Option<String> {
    let b = binding(service, manifest).ok()?;
    let mut parts = Vec::new();
    for (name, dialect) in b.servers() {
        let dialect = dialect.map(Dialect::name);
        let Some(h) = specs.get(name) else {
            parts.push(serde_json::json!({"name": name, "missing": true}));
            continue;
        };
        let ep = endpoint(name, &h.spec);
        let mut part = serde_json::json!({
            "name": name,
            "dialect": dialect,
            "host": ep.host,
            "ports": if h.keeps_port { BTreeMap::new() } else { ep.ports },
            "external": h.spec.external.is_some(),
            "password": redis::password_wanted(&h.spec),
            "env": h.spec.env,
            "secrets": h.spec.secrets,
        });
        // What the preset makes for its users (named databases, extensions), and what a
        // custom one runs (an override's command, the variant of this host's mode): a
        // change to either is made with its users' next deploy, so it is one.
        if let Some(c) = &h.spec.config {
            part["config"] = c.clone();
        }
        if h.spec.preset.is_none() {
            part["command"] = serde_json::json!(h.spec.command);
            if !h.spec.variants.is_empty() {
                part["variant"] = serde_json::json!(mode.and_then(|m| h.spec.variants.get(m)));
            }
        }
        parts.push(part);
    }
    (!parts.is_empty())
        .then(|| crate::unit::text_hash(&serde_json::Value::Array(parts).to_string()))
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
        Some(Preset::Mysql) => [("tcp".to_owned(), 3306)].into(),
        Some(Preset::Garage) => garage::default_ports(),
        None => BTreeMap::new(),
    }
}

/// Where the infrastructure service of `h` answers; an error for a dedicated server whose
/// port has not been picked yet (never the preset's default port, which is the shared
/// server's).
pub fn endpoint_of(name: &str, h: &HostSpec) -> Result<Endpoint, AgentError> {
    if h.keeps_port && h.spec.ports.is_empty() {
        return Err(err(
            name,
            "has no port yet (it is picked when the server first starts); the next run retries",
        ));
    }
    Ok(endpoint(name, &h.spec))
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
        // In a's requirements, `queue` names the shared one; `search`, a's own.
        let a = &m.services[0];
        assert_eq!(m.dependency_name(a, "queue"), "queue");
        assert_eq!(m.dependency_name(a, "search"), "a-search");
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
