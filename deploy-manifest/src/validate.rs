//! Validation of manifests: the JSON Schema contract first, then the rules a schema cannot
//! say (unique names, references that must resolve). Every manifest read or written passes
//! through [`parse_manifest`] or [`check_manifest`].

use std::collections::BTreeSet;
use std::fmt;
use std::sync::LazyLock;

use serde_json::Value;

use crate::model::Manifest;

/// The manifest schema, as committed in `schemas/manifest.schema.json`.
pub const MANIFEST_SCHEMA: &str = include_str!("../../schemas/manifest.schema.json");

static SCHEMA: LazyLock<Value> =
    LazyLock::new(|| serde_json::from_str(MANIFEST_SCHEMA).expect("the embedded schema is JSON"));

static VALIDATOR: LazyLock<jsonschema::Validator> = LazyLock::new(|| {
    jsonschema::validator_for(&SCHEMA).expect("the embedded schema is a valid JSON Schema")
});

/// One problem found in a manifest: where (a readable field path) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `services[0] (ava).http.internalPort`; `(root)` for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Everything wrong with one manifest document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    /// Where the document came from (a file, a store key, "argument").
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid manifest ({}): ", self.origin)?;
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Invalid {
    /// `Ok` when there are no problems.
    fn check(origin: &str, problems: Vec<Problem>) -> Result<(), Invalid> {
        if problems.is_empty() {
            return Ok(());
        }
        Err(Invalid {
            origin: origin.to_owned(),
            problems,
        })
    }

    fn one(origin: &str, field: &str, message: impl Into<String>) -> Self {
        Invalid {
            origin: origin.to_owned(),
            problems: vec![Problem {
                field: field.to_owned(),
                message: message.into(),
            }],
        }
    }
}

/// Parse and fully validate a manifest document.
pub fn parse_manifest(bytes: &[u8], origin: &str) -> Result<Manifest, Invalid> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        Invalid::one(
            origin,
            "(document)",
            format!(
                "not valid JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    manifest_from_value(value, origin)
}

/// Validate an already-parsed JSON value and turn it into the model.
pub fn manifest_from_value(value: Value, origin: &str) -> Result<Manifest, Invalid> {
    check_schema(&value, origin)?;
    let manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| Invalid::one(origin, "(document)", e.to_string()))?;
    check_rules(&manifest, origin)?;
    Ok(manifest)
}

/// Validate a model value before it is written.
pub fn check_manifest(manifest: &Manifest, origin: &str) -> Result<(), Invalid> {
    let value = serde_json::to_value(manifest).expect("the model serialises");
    check_schema(&value, origin)?;
    check_rules(manifest, origin)
}

fn check_schema(value: &Value, origin: &str) -> Result<(), Invalid> {
    let problems: Vec<Problem> = VALIDATOR
        .iter_errors(value)
        .map(|e| Problem {
            field: field_path(value, e.instance_path().as_str()),
            message: explain(&e),
        })
        .collect();
    Invalid::check(origin, problems)
}

/// The validator's message, with the schema's own description of the expected form added
/// where the raw message would only show a regular expression or a list of alternatives.
fn explain(e: &jsonschema::ValidationError<'_>) -> String {
    let message = e.to_string();
    let schema_path = e.schema_path().as_str();
    let keyword = schema_path.rsplit('/').next().unwrap_or_default();
    if !matches!(keyword, "pattern" | "oneOf" | "not" | "propertyNames") {
        return message;
    }
    let parent = &schema_path[..schema_path.len() - keyword.len()].trim_end_matches('/');
    match SCHEMA
        .pointer(parent)
        .and_then(|s| s.get("description"))
        .and_then(Value::as_str)
    {
        Some(description) => format!("{message} (expected: {description})"),
        None => message,
    }
}

/// Turn a JSON pointer into the path an operator reads: `services[2] (ava).http.domain`.
fn field_path(document: &Value, pointer: &str) -> String {
    if pointer.is_empty() {
        return "(root)".to_owned();
    }
    let mut out = String::new();
    let mut node = Some(document);
    for raw in pointer.split('/').skip(1) {
        let token = raw.replace("~1", "/").replace("~0", "~");
        let next = node.and_then(|n| match n {
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get(i)),
            Value::Object(map) => map.get(&token),
            _ => None,
        });
        if matches!(node, Some(Value::Array(_))) {
            out.push_str(&format!("[{token}]"));
            if let Some(name) = next.and_then(|n| n.get("name")).and_then(Value::as_str) {
                out.push_str(&format!(" ({name})"));
            }
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&token);
        }
        node = next;
    }
    out
}

/// Rules beyond the schema.
fn check_rules(m: &Manifest, origin: &str) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    let mut routes = std::collections::BTreeMap::new();
    let ecosystem: BTreeSet<&str> = m
        .infrastructure
        .iter()
        .flat_map(|i| i.services.keys().map(String::as_str))
        .collect();
    for (i, s) in m.services.iter().enumerate() {
        let at = format!("services[{i}] ({})", s.name);
        if !names.insert(s.name.as_str()) {
            problems.push(Problem {
                field: format!("{at}.name"),
                message: format!("duplicate service name {:?}: names must be unique", s.name),
            });
        }
        if let Some(http) = &s.http {
            if http.path.split('/').any(|seg| seg == "." || seg == "..") {
                problems.push(Problem {
                    field: format!("{at}.http.path"),
                    message: format!(
                        "{:?} has a \".\" or \"..\" segment; write the path it stands for",
                        http.path
                    ),
                });
            }
            let path = route_path(&http.path);
            for host in &s.hosts {
                let route = (
                    host.as_str(),
                    http.domain.to_ascii_lowercase(),
                    path.clone(),
                );
                if let Some(other) = routes.insert(route, s.name.as_str()) {
                    problems.push(Problem {
                        field: format!("{at}.http"),
                        message: format!(
                            "route {}{path} on host {host} is already service {other:?}'s; one service per domain and path",
                            http.domain
                        ),
                    });
                }
            }
        }
        isolation_rules(s, &at, &mut problems);
        if let Some(exec) = &s.exec {
            sandbox_rules(exec, &s.name, &format!("{at}.exec"), &mut problems);
        }
        if let Some(infra) = &s.infrastructure {
            for (name, req) in &infra.services {
                for dep in &req.depends_on {
                    if !ecosystem.contains(dep.as_str()) && !infra.services.contains_key(dep) {
                        problems.push(Problem {
                            field: format!("{at}.infrastructure.services.{name}.dependsOn"),
                            message: format!("unknown infrastructure service {dep:?}"),
                        });
                    }
                }
            }
        }
    }
    // A service's own requirement `<req>` runs as infrastructure service `<service>-<req>`
    // (unit, data directory, credentials): it must not be another one's name.
    let mut infra_names: std::collections::BTreeMap<String, String> = ecosystem
        .iter()
        .map(|n| (n.to_string(), format!("infrastructure.services.{n}")))
        .collect();
    for (i, s) in m.services.iter().enumerate() {
        let Some(infra) = &s.infrastructure else {
            continue;
        };
        // A dedicated server runs as `<service>-<preset>`.
        let owned = infra
            .dedicated()
            .into_iter()
            .map(|p| {
                let what = match p {
                    crate::model::Preset::Redis => "redis",
                    _ => "database",
                };
                let here = format!("services[{i}] ({}).infrastructure.{what}", s.name);
                (p.name(), here)
            })
            .chain(infra.services.keys().map(|req| {
                let here = format!("services[{i}] ({}).infrastructure.services.{req}", s.name);
                (req.as_str(), here)
            }));
        for (req, here) in owned {
            let full = format!("{}-{req}", s.name);
            if let Some(other) = infra_names.insert(full.clone(), here.clone()) {
                problems.push(Problem {
                    field: here,
                    message: format!(
                        "runs as infrastructure service {full:?}, which is also {other}; rename one of them"
                    ),
                });
            }
        }
    }
    // Preset settings, wherever a preset is declared.
    let with_database: BTreeSet<&str> = m
        .services
        .iter()
        .filter(|s| {
            s.infrastructure
                .as_ref()
                .and_then(|i| i.database())
                .is_some()
        })
        .map(|s| s.name.as_str())
        .collect();
    let shared = m
        .infrastructure
        .iter()
        .flat_map(|i| &i.services)
        .map(|(n, spec)| (format!("infrastructure.services.{n}"), spec));
    let owned = m.services.iter().enumerate().flat_map(|(i, s)| {
        s.infrastructure.iter().flat_map(move |inf| {
            inf.services.iter().map(move |(r, spec)| {
                (
                    format!("services[{i}] ({}).infrastructure.services.{r}", s.name),
                    spec,
                )
            })
        })
    });
    for (at, spec) in shared.chain(owned) {
        preset_config_rules(&format!("{at}.config"), spec, &with_database, &mut problems);
        for (mode, v) in &spec.variants {
            if !v.command.first().is_some_and(|c| c.starts_with('/')) {
                problems.push(Problem {
                    field: format!("{at}.variants.{mode}.command"),
                    message: "must start with an absolute path".into(),
                });
            }
        }
    }
    overrides_rules(m, &with_database, &mut problems);
    if let Some(cycle) = dependency_cycle(m) {
        problems.push(Problem {
            field: "infrastructure".into(),
            message: format!(
                "dependsOn goes round in a circle ({}); nothing in it could start first",
                cycle.join(" -> ")
            ),
        });
    }
    let labels = m.rollout.as_ref().map(|r| &r.labels);
    if let Some(policy) = m.rollout.as_ref().and_then(|r| r.policy.as_ref()) {
        rollout_rules(policy, labels, "rollout.policy", &mut problems);
    }
    for (i, s) in m.services.iter().enumerate() {
        if let Some(policy) = &s.rollout {
            let at = format!("services[{i}] ({}).rollout", s.name);
            rollout_rules(policy, labels, &at, &mut problems);
        }
    }
    if let Some(infra) = &m.infrastructure {
        for (name, svc) in &infra.services {
            for dep in &svc.depends_on {
                if !ecosystem.contains(dep.as_str()) {
                    problems.push(Problem {
                        field: format!("infrastructure.services.{name}.dependsOn"),
                        message: format!("unknown infrastructure service {dep:?}"),
                    });
                }
            }
        }
    }
    Invalid::check(origin, problems)
}

/// `infrastructure.overrides`: each entry says which hosts (names, or labels that exist),
/// each key names infrastructure that exists (`<name>`: shared, or some service's own
/// requirement; `<service>/<requirement>`), and what it sets is checked like the
/// declaration it changes.
fn overrides_rules(m: &Manifest, with_database: &BTreeSet<&str>, problems: &mut Vec<Problem>) {
    let Some(infra) = &m.infrastructure else {
        return;
    };
    let labels = m.rollout.as_ref().map(|r| &r.labels);
    for (i, entry) in infra.overrides.iter().enumerate() {
        let at = format!("infrastructure.overrides[{i}]");
        let problem = |problems: &mut Vec<Problem>, field: String, message: String| {
            problems.push(Problem { field, message })
        };
        if entry.hosts.is_empty() && entry.labels.is_empty() {
            problem(
                problems,
                at.clone(),
                "give hosts or labels: the hosts it applies to".into(),
            );
        }
        for label in &entry.labels {
            if !labels.is_some_and(|l| l.contains_key(label)) {
                problem(
                    problems,
                    format!("{at}.labels"),
                    format!("unknown label {label:?}: define it in rollout.labels"),
                );
            }
        }
        for (key, o) in &entry.services {
            let field = format!("{at}.services.{key}");
            // What the key names: (where, its declaration).
            let targets: Vec<&crate::model::InfraService> = match key.split_once('/') {
                Some((app, req)) => m
                    .service(app)
                    .and_then(|s| s.infrastructure.as_ref())
                    .and_then(|i| i.services.get(req))
                    .into_iter()
                    .collect(),
                None => infra
                    .services
                    .get(key)
                    .into_iter()
                    .chain(
                        m.services
                            .iter()
                            .filter_map(|s| s.infrastructure.as_ref()?.services.get(key)),
                    )
                    .collect(),
            };
            if targets.is_empty() {
                problem(
                    problems,
                    field.clone(),
                    format!(
                        "names no infrastructure: {key:?} is neither a shared one nor a service's own requirement{}",
                        if key.contains('/') {
                            " (<service>/<requirement>)"
                        } else {
                            ""
                        }
                    ),
                );
            }
            if o.disabled == Some(true) && o.external.is_some() {
                problem(
                    problems,
                    field.clone(),
                    "disabled and external at once: give one".into(),
                );
            }
            if let Some(cmd) = &o.command
                && !cmd.first().is_some_and(|c| c.starts_with('/'))
            {
                problem(
                    problems,
                    format!("{field}.command"),
                    "must start with an absolute path".into(),
                );
            }
            if o.config.is_some() {
                for t in targets {
                    let changed = crate::model::InfraService {
                        config: o
                            .config
                            .as_ref()
                            .map(|c| crate::model::merge_config(t.config.as_ref(), c)),
                        ..t.clone()
                    };
                    preset_config_rules(
                        &format!("{field}.config"),
                        &changed,
                        with_database,
                        problems,
                    );
                }
            }
        }
    }
}

/// A preset's `config`: only what that preset knows, each value checked (it reaches a
/// command line or SQL); a custom service has none.
fn preset_config_rules(
    at: &str,
    spec: &crate::model::InfraService,
    with_database: &BTreeSet<&str>,
    problems: &mut Vec<Problem>,
) {
    use crate::model::Preset;
    let mut problem = |message: String| {
        problems.push(Problem {
            field: at.to_owned(),
            message,
        })
    };
    let Some(config) = &spec.config else {
        return;
    };
    let name_like = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    match spec.preset {
        Some(Preset::Postgres) => match spec.postgres_config() {
            Err(e) => problem(format!(
                "{e} (a postgres preset takes databases, extensions, version)"
            )),
            Ok(c) => {
                for db in c.databases.keys() {
                    if !name_like(db) {
                        problem(format!(
                            "database name {db:?}: lower-case letters, digits, '_' and '-', at most 63"
                        ));
                    } else if let Some(why) =
                        reserved_database_name(db, crate::model::Dialect::Postgres)
                    {
                        problem(format!("database name {db:?}: {why}"));
                    } else if with_database.contains(db.as_str()) {
                        problem(format!(
                            "database {db:?} is also the database of service {db:?}; name it otherwise"
                        ));
                    }
                }
                for ext in &c.extensions {
                    if !name_like(ext) {
                        problem(format!(
                            "extension {ext:?}: lower-case letters, digits, '_' and '-', at most 63"
                        ));
                    }
                }
                if let Some(v) = &c.version
                    && !((1..=3).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
                {
                    problem(format!(
                        "version {v:?}: a PostgreSQL major version, e.g. \"15\""
                    ));
                }
            }
        },
        Some(Preset::Redis) => match spec.redis_config() {
            Err(e) => problem(format!(
                "{e} (a redis preset takes maxmemory, maxmemoryPolicy, password)"
            )),
            Ok(c) => {
                if let Some(m) = &c.maxmemory {
                    let lower = m.to_ascii_lowercase();
                    let digits = lower.trim_end_matches(['b', 'k', 'm', 'g']);
                    let unit = &lower[digits.len()..];
                    if digits.is_empty()
                        || !digits.bytes().all(|b| b.is_ascii_digit())
                        || !["", "b", "k", "kb", "m", "mb", "g", "gb"].contains(&unit)
                    {
                        problem(format!("maxmemory {m:?}: a size such as 256mb or 1gb"));
                    }
                }
                const POLICIES: [&str; 8] = [
                    "noeviction",
                    "allkeys-lru",
                    "allkeys-lfu",
                    "allkeys-random",
                    "volatile-lru",
                    "volatile-lfu",
                    "volatile-random",
                    "volatile-ttl",
                ];
                if let Some(p) = &c.maxmemory_policy
                    && !POLICIES.contains(&p.as_str())
                {
                    problem(format!(
                        "maxmemoryPolicy {p:?}: one of {}",
                        POLICIES.join(", ")
                    ));
                }
            }
        },
        Some(Preset::Garage) => match spec.garage_config() {
            Err(e) => problem(format!("{e} (a garage preset takes buckets)")),
            Ok(c) => {
                for b in &c.buckets {
                    if !crate::model::is_bucket_name(b) {
                        problem(format!("bucket {b:?}: 3 to 63 of a-z, 0-9, '-' and '.'"));
                    }
                }
            }
        },
        Some(Preset::Mysql) | None => {
            if config.as_object().is_some_and(|o| !o.is_empty()) {
                problem(match spec.preset {
                    Some(_) => "the mysql preset takes no settings yet".to_owned(),
                    None => "config is for presets; a custom service has none".to_owned(),
                });
            }
        }
    }
}

/// A circle in the infrastructure's `dependsOn` (shared services by name, a service's own
/// requirements as `<service>-<req>`: [`Manifest::dependency_name`]), if any.
fn dependency_cycle(m: &Manifest) -> Option<Vec<String>> {
    let mut edges: std::collections::BTreeMap<String, Vec<String>> = m
        .infrastructure
        .iter()
        .flat_map(|i| &i.services)
        .map(|(n, s)| (n.clone(), s.depends_on.clone()))
        .collect();
    for s in &m.services {
        for infra in s.infrastructure.iter() {
            for (req, spec) in &infra.services {
                let deps = spec.depends_on.iter().map(|d| m.dependency_name(s, d));
                edges.insert(format!("{}-{req}", s.name), deps.collect());
            }
        }
    }
    // Depth first; `path` is the chain being walked, `done` what has no circle below it.
    fn walk(
        n: &str,
        edges: &std::collections::BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_owned());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for d in edges.get(n).into_iter().flatten() {
            if let Some(c) = walk(d, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| walk(n, &edges, &mut Vec::new(), &mut done))
}

/// A rollout policy's waves: each says which hosts it takes in exactly one way, names only
/// labels the manifest defines, and shares grow from wave to wave (they are cumulative).
fn rollout_rules(
    policy: &crate::model::RolloutPolicy,
    labels: Option<&std::collections::BTreeMap<String, Vec<String>>>,
    at: &str,
    problems: &mut Vec<Problem>,
) {
    let mut share = 0;
    for (i, wave) in policy.waves.iter().flatten().enumerate() {
        let field = format!("{at}.waves[{i}]");
        let ways = usize::from(!wave.hosts.is_empty())
            + usize::from(!wave.labels.is_empty())
            + usize::from(wave.percent.is_some());
        if ways != 1 {
            problems.push(Problem {
                field: field.clone(),
                message: "give exactly one of hosts, labels or percent".into(),
            });
        }
        for label in &wave.labels {
            if !labels.is_some_and(|l| l.contains_key(label)) {
                problems.push(Problem {
                    field: format!("{field}.labels"),
                    message: format!(
                        "unknown label {label:?}: define it in rollout.labels (label -> hosts)"
                    ),
                });
            }
        }
        if let Some(p) = wave.percent {
            if p <= share {
                problems.push(Problem {
                    field: format!("{field}.percent"),
                    message: format!(
                        "{p} is not above the {share} % an earlier wave reached; percentages count all the waves so far"
                    ),
                });
            }
            share = share.max(p);
        }
    }
}

/// A route's path as the proxies match it: repeated `/` collapsed, no trailing `/` (but `/`
/// itself). `/api/`, `//api` and `/api` are one route.
pub fn route_path(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    format!("/{}", segments.join("/"))
}

/// Why a service may not be called `name`, if it may not. A service's units are named after
/// it (`<name>.service`), so: `deployer` is the agent's own unit (and the directory of its
/// generated files, `<secrets>/deployer/`), `deployer-*` the names of units an older agent
/// gave services (and of the dynamic accounts), `infra-*` the infrastructure's admin
/// credentials (`<secrets>/infra-<name>.env`), `systemd-*`, `dbus` and `syslog` the
/// system's own units. Any other name a host's unit already has is refused by the agent on
/// that host.
pub fn reserved_service_name(name: &str) -> Option<&'static str> {
    if name == "deployer" {
        Some(
            "\"deployer\" is reserved: it is the agent's own unit (deployer.service) and names its generated files (<secrets>/deployer/)",
        )
    } else if name.starts_with("deployer-") {
        Some(
            "names starting with \"deployer-\" are reserved: they name the agent's units and accounts (deployer-infra-<name>.service, deployer-<service>)",
        )
    } else if name.starts_with("infra-") {
        Some(
            "names starting with \"infra-\" are reserved: they name the infrastructure's admin credentials (<secrets>/infra-<name>.env)",
        )
    } else if name.starts_with("systemd-") || name == "dbus" || name == "syslog" {
        Some(
            "reserved: it names one of the system's own units (a service's unit is <name>.service)",
        )
    } else {
        None
    }
}

/// Why a service with a database of `dialect` may not be called `name` (its user and
/// database are named after it), if it may not: the server's own users and databases.
pub fn reserved_database_name(name: &str, dialect: crate::model::Dialect) -> Option<&'static str> {
    if dialect == crate::model::Dialect::Mysql {
        return match name {
            "mysql" | "sys" | "information_schema" | "performance_schema" => {
                Some("it is one of MySQL's own databases")
            }
            "root" => Some("\"root\" is MySQL's administrator"),
            _ if name.starts_with("mariadb") => {
                Some("names starting with \"mariadb\" are MariaDB's own accounts")
            }
            _ => None,
        };
    }
    if name == "postgres" {
        Some("\"postgres\" is the PostgreSQL superuser and its maintenance database")
    } else if name.starts_with("template") {
        Some("names starting with \"template\" are PostgreSQL's template databases")
    } else if name.starts_with("pg_") {
        Some("names starting with \"pg_\" are reserved by PostgreSQL")
    } else {
        None
    }
}

/// A plain file name for a secret: `[A-Za-z0-9_.-]+`, not starting with `.` (so no `..`, no
/// hidden file, no path).
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `path` is absolute and normalised: `/` then non-empty segments, none `.` or `..`,
/// no trailing `/`.
pub fn is_normalised_absolute(path: &str) -> bool {
    path.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
    })
}

/// Whether `path` can be the secrets file of `service` as far as the manifest shows:
/// absolute, normalised, named `<service>.env` or directly in a directory named `<service>`.
/// (The agent checks the rest: that it is in its secrets directory.)
pub fn env_file_fits(service: &str, path: &str) -> bool {
    if !is_normalised_absolute(path) {
        return false;
    }
    let mut segments = path.rsplit('/');
    let file = segments.next().unwrap_or_default();
    let parent = segments.next().unwrap_or_default();
    file == format!("{service}.env") || parent == service
}

/// The names of the `${secret:NAME}` placeholders in `value` (a malformed placeholder is
/// the agent's to report; this only looks for secrets).
fn secret_names(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${secret:") {
        let after = &rest[start + "${secret:".len()..];
        let end = after.find('}').unwrap_or(after.len());
        out.push(&after[..end]);
        rest = &after[end..];
    }
    out
}

/// Directories a service's sandbox never makes writable, nor anything above or under them:
/// the system's own, and the deployer's (its state, the secrets, the units it writes).
pub const PROTECTED_PATHS: [&str; 16] = [
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib64",
    "/nix",
    "/proc",
    "/root",
    "/run/systemd",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib/deployer",
    "/var/lib/deployer-secrets",
    "/var/lib/private",
];

/// Whether `a` is `b` or a directory above or under it, segment by segment.
pub fn paths_overlap(a: &str, b: &str) -> bool {
    let within = |x: &str, y: &str| x == y || x.strip_prefix(y).is_some_and(|r| r.starts_with('/'));
    within(a, b) || within(b, a) || a == "/" || b == "/"
}

/// Where a service's writable paths may be: data directories, never system, deployer or
/// other services' state directories.
pub const WRITABLE_ROOTS: [&str; 5] = ["/data", "/mnt", "/srv", "/var/cache", "/var/www"];

/// Why `path` may not be a writable path of a service, if it may not: it must be a directory
/// below one of [`WRITABLE_ROOTS`] and overlap none of `protected` (the agent adds its own
/// configured directories to [`PROTECTED_PATHS`]). Symlinks are the agent's to refuse.
pub fn writable_path_problem(path: &str, protected: &[&str]) -> Option<String> {
    if !is_normalised_absolute(path) {
        return Some(format!(
            "{path:?} must be an absolute, normalised path (no '.', '..', '//' or trailing '/')"
        ));
    }
    let below = |root: &str| {
        path.strip_prefix(root)
            .is_some_and(|r| r.len() > 1 && r.starts_with('/'))
    };
    if !WRITABLE_ROOTS.iter().any(|r| below(r)) {
        return Some(format!(
            "{path:?} is not below {}: a service writes only its state directory ($STATE_DIRECTORY) and data directories there, e.g. /srv/<name>",
            WRITABLE_ROOTS.join(", ")
        ));
    }
    PROTECTED_PATHS
        .iter()
        .chain(protected)
        .map(|p| p.trim_end_matches('/'))
        .find(|p| paths_overlap(path, p))
        .map(|p| {
            format!(
                "{path:?} overlaps {p}, which a service may never write; use a directory of its own, e.g. /srv/<name>"
            )
        })
}

/// The longest service name with a dynamic user: `deployer-<name>` is at most 31 characters.
pub const MAX_DYNAMIC_NAME: usize = 22;

/// Accounts a service may not run as: the presets' (Postgres trusts its account as its
/// superuser over the local socket) and the deployer's (`deployer-*`: the dynamic users of
/// other services).
pub fn reserved_account(name: &str) -> bool {
    name == "postgres" || name == "redis" || name.starts_with("deployer")
}

/// The sandbox a service asks for: writable paths only in data directories, an account of
/// its own, no group for a dynamic user (whose name must fit).
fn sandbox_rules(exec: &crate::model::Exec, name: &str, at: &str, problems: &mut Vec<Problem>) {
    for (i, path) in exec.writable_paths.iter().enumerate() {
        if let Some(message) = writable_path_problem(path, &[]) {
            problems.push(Problem {
                field: format!("{at}.writablePaths[{i}]"),
                message,
            });
        }
    }
    match exec.run_as() {
        crate::model::RunAs::Account(name) if reserved_account(name) => problems.push(Problem {
            field: format!("{at}.user"),
            message: format!(
                "{name:?} is not a service's account: postgres and redis own the provisioned databases (Postgres trusts its account as superuser) and deployer-* are the deployer's; create an account for the service"
            ),
        }),
        crate::model::RunAs::Dynamic if name.len() > MAX_DYNAMIC_NAME => problems.push(Problem {
            field: format!("{at}.user"),
            message: format!(
                "a dynamic user is named deployer-{name}, and an account name has at most 31 characters: shorten the service name to {MAX_DYNAMIC_NAME} characters or name an account"
            ),
        }),
        _ => {}
    }
    if exec.run_as() == crate::model::RunAs::Dynamic && exec.group.is_some() {
        problems.push(Problem {
            field: format!("{at}.group"),
            message: "a dynamic user (\"user\": null) gets a group of its own; leave group out"
                .to_owned(),
        });
    }
}

/// One service may reach only its own secrets, database and files: its name is not
/// reserved, its `envFile` is its own, every `${secret:…}` names a plain file.
fn isolation_rules(s: &crate::model::Service, at: &str, problems: &mut Vec<Problem>) {
    let mut problem = |field: String, message: String| problems.push(Problem { field, message });
    if let Some(why) = reserved_service_name(&s.name) {
        problem(
            format!("{at}.name"),
            format!(
                "service name {:?} is not allowed: {why}; rename the service",
                s.name
            ),
        );
    }
    let database = s.infrastructure.as_ref().and_then(|i| i.database());
    if let Some(db) = &database
        && let Some(why) = reserved_database_name(&s.name, db.dialect())
    {
        problem(
            format!("{at}.infrastructure.database"),
            format!(
                "a service named {:?} cannot have a {} database: {why}; rename the service",
                s.name,
                db.dialect().name()
            ),
        );
    }
    if let Some(s3) = s.infrastructure.as_ref().and_then(|i| i.s3()) {
        let bucket = s3.bucket(&s.name);
        if !crate::model::is_bucket_name(&bucket) {
            problem(
                format!("{at}.infrastructure.s3.bucket"),
                match &s3.bucket {
                    Some(_) => {
                        format!("{bucket:?} is not a bucket name: 3 to 63 of a-z, 0-9, '-' and '.'")
                    }
                    None => format!(
                        "the service's name {bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-' and '.'): give s3.bucket"
                    ),
                },
            );
        }
        if let Some(q) = &s3.quota
            && crate::model::parse_size(q).is_none_or(|n| n == 0)
        {
            problem(
                format!("{at}.infrastructure.s3.quota"),
                format!("{q:?} is not a size such as 10gb or 512MiB"),
            );
        }
    }
    let redis = s.infrastructure.as_ref().and_then(|i| i.redis());
    let shared_port = [
        (
            "database",
            database.as_ref().map(|d| (d.dedicated(), d.port)),
        ),
        ("redis", redis.as_ref().map(|r| (r.dedicated(), r.port))),
    ];
    for (what, need) in shared_port {
        if let Some((false, Some(_))) = need {
            problem(
                format!("{at}.infrastructure.{what}.port"),
                "a port is for a dedicated server (\"dedicated\": true); a shared one's port is its preset's".into(),
            );
        }
    }
    if let Some(path) = &s.env_file
        && !env_file_fits(&s.name, path)
    {
        problem(
            format!("{at}.envFile"),
            format!(
                "{path:?} is not this service's own secrets file: it must be an absolute, normalised path (no '.', '..' or '//') named {name}.env or inside a directory named {name}, e.g. /var/lib/deployer-secrets/{name}.env or /var/lib/deployer-secrets/{name}/env (or leave envFile out for the default)",
                name = s.name
            ),
        );
    }
    let mut check_secret = |field: String, name: &str, what: &str| {
        if !is_plain_file_name(name) {
            problem(
                field,
                format!(
                    "{what} {name:?} is not a plain file name ([A-Za-z0-9_.-], not starting with '.'): a secret is a file in the service's own directory <secrets>/{}/",
                    s.name
                ),
            );
        }
    };
    for (key, value) in &s.env {
        for name in secret_names(value) {
            check_secret(format!("{at}.env.{key}"), name, "secret");
        }
    }
    for (rname, req) in s.infrastructure.iter().flat_map(|i| &i.services) {
        let base = format!("{at}.infrastructure.services.{rname}");
        for (logical, file) in &req.secrets {
            check_secret(format!("{base}.secrets.{logical}"), file, "secret file");
        }
        for (key, value) in &req.env {
            for name in secret_names(value) {
                if !req.secrets.contains_key(name) {
                    check_secret(format!("{base}.env.{key}"), name, "secret");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed_service() -> Value {
        // The service of seed 004's "Adding New Service", verbatim.
        json!({
            "name": "my-service",
            "artifact": {"storePath": "/nix/store/placeholder"},
            "hosts": ["biz"],
            "exec": {"command": null, "user": "root", "group": "root"},
            "env": {"PORT": "8080"},
            "envFile": "/var/lib/deployer-secrets/my-service.env",
            "http": {"domain": "my.example.com", "path": "/", "internalPort": 8080}
        })
    }

    fn manifest_with(service: Value) -> Value {
        json!({"schemaVersion": 1, "services": [service]})
    }

    fn problems(v: Value) -> Vec<String> {
        match manifest_from_value(v, "test") {
            Ok(_) => vec![],
            Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn seed_service_is_valid() {
        assert_eq!(
            problems(manifest_with(seed_service())),
            Vec::<String>::new()
        );
    }

    #[test]
    fn durations_are_parsed_when_the_manifest_is_read() {
        let mut s = seed_service();
        s["health"] = json!({"timeout": "1m30s"});
        let m = manifest_from_value(manifest_with(s.clone()), "test").unwrap();
        let timeout = m.services[0]
            .health
            .as_ref()
            .unwrap()
            .timeout
            .as_ref()
            .unwrap();
        assert_eq!(timeout.get(), std::time::Duration::from_secs(90));
        // Written back as given.
        assert_eq!(serde_json::to_value(timeout).unwrap(), json!("1m30s"));
        // The schema's form, but more than a duration holds: refused here, not replaced by a
        // default where it is used.
        s["health"] = json!({"timeout": "99999999999999999999h"});
        let p = problems(manifest_with(s));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("is not a duration"), "{p:?}");
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = seed_service();
        s["http"]["internalPort"] = json!(70000);
        let p = problems(manifest_with(s));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("services[0] (my-service).http.internalPort: 70000"),
            "{p:?}"
        );
    }

    #[test]
    fn typo_is_reported_as_unexpected_field() {
        let mut s = seed_service();
        s["evn"] = json!({});
        let p = problems(manifest_with(s));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("services[0] (my-service)") && p[0].contains("evn"),
            "{p:?}"
        );
    }

    #[test]
    fn injection_in_env_value_domain_and_name_is_rejected() {
        let cases = [
            ("/env/PORT", json!("8080\nExecStartPre=/bin/evil")),
            ("/http/domain", json!("a.com { }")),
            ("/http/path", json!("/x\" ; evil")),
            ("/name", json!("Bad Name")),
            ("/envFile", json!("/var/lib/../../etc/shadow")),
        ];
        for (pointer, bad) in cases {
            let mut s = seed_service();
            *s.pointer_mut(pointer).unwrap() = bad.clone();
            let p = problems(manifest_with(s));
            assert!(!p.is_empty(), "{pointer} = {bad} was accepted");
        }
        let mut s = seed_service();
        s["env"]["bad key"] = json!("x");
        assert!(!problems(manifest_with(s)).is_empty());
    }

    #[test]
    fn pattern_errors_carry_the_expected_form() {
        let mut s = seed_service();
        s["name"] = json!("Bad Name");
        let p = problems(manifest_with(s));
        assert!(p[0].contains("expected: Lower-case letters"), "{p:?}");
    }

    #[test]
    fn duplicate_names_and_routes_are_rejected() {
        let a = seed_service();
        let mut b = seed_service();
        b["http"]["internalPort"] = json!(9000);
        let p = problems(json!({"schemaVersion": 1, "services": [a, b]}));
        assert!(
            p.iter().any(|m| m.contains("duplicate service name")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("already service")), "{p:?}");
    }

    /// `/api/`, `//api` and `/api` are one route (a path `//` once became Caddy matcher
    /// `["", "/*"]` and took the whole domain); the error names the service holding it.
    #[test]
    fn routes_are_compared_normalised() {
        for (first, second) in [("/api", "/api/"), ("/", "//"), ("/a/b", "/a//b/")] {
            let mut a = seed_service();
            a["name"] = json!("first");
            a["envFile"] = json!("/var/lib/deployer-secrets/first.env");
            a["http"]["path"] = json!(first);
            let mut b = seed_service();
            b["name"] = json!("second");
            b["envFile"] = json!("/var/lib/deployer-secrets/second.env");
            b["http"]["path"] = json!(second);
            let p = problems(json!({"schemaVersion": 1, "services": [a, b]}));
            assert_eq!(
                p,
                [format!(
                    "services[1] (second).http: route my.example.com{} on host biz is already service \"first\"'s; one service per domain and path",
                    route_path(first)
                )],
                "{first} vs {second}"
            );
        }
        assert_eq!(route_path("//"), "/");
        assert_eq!(route_path("/api//v1/"), "/api/v1");
        let mut a = seed_service();
        a["http"]["path"] = json!("/x/../admin");
        assert!(
            problems(manifest_with(a))
                .iter()
                .any(|m| m.contains("http.path") && m.contains("\"..\" segment")),
        );
    }

    /// Service `a`'s requirement `b-c` and service `a-b`'s requirement `c` would both be
    /// infrastructure service `a-b-c` (one unit, one data directory).
    #[test]
    fn own_infrastructure_names_cannot_collide() {
        let with_req = |name: &str, req: &str| {
            let mut s = seed_service();
            s["name"] = json!(name);
            s["envFile"] = json!(format!("/var/lib/deployer-secrets/{name}.env"));
            s["http"]["domain"] = json!(format!("{name}.example.com"));
            s["infrastructure"] = json!({"services": {req: {"command": ["/bin/true"]}}});
            s
        };
        let p = problems(
            json!({"schemaVersion": 1, "services": [with_req("a", "b-c"), with_req("a-b", "c")]}),
        );
        assert_eq!(
            p,
            [
                "services[1] (a-b).infrastructure.services.c: runs as infrastructure service \"a-b-c\", which is also services[0] (a).infrastructure.services.b-c; rename one of them"
            ]
        );
        let p = problems(json!({"schemaVersion": 1, "services": [with_req("a", "b")],
            "infrastructure": {"services": {"a-b": {"command": ["/bin/true"]}}}}));
        assert_eq!(
            p,
            [
                "services[0] (a).infrastructure.services.b: runs as infrastructure service \"a-b\", which is also infrastructure.services.a-b; rename one of them"
            ]
        );
    }

    /// The shorthand objects: a dedicated server is `<service>-<preset>`
    /// (so it cannot share a name with a requirement), a port is for a dedicated server
    /// only, and a MySQL database may not take MySQL's own names.
    #[test]
    fn database_and_redis_objects() {
        let with = |name: &str, infra: Value| {
            let mut s = seed_service();
            s["name"] = json!(name);
            s["envFile"] = json!(format!("/var/lib/deployer-secrets/{name}.env"));
            s["infrastructure"] = infra;
            json!({"schemaVersion": 1, "services": [s]})
        };
        let ok = with(
            "a",
            json!({"database": {"dedicated": true, "dialect": "mysql", "port": 3307},
                   "redis": {"dedicated": true}}),
        );
        assert_eq!(problems(ok), Vec::<String>::new());
        let p = problems(with(
            "a",
            json!({"database": {"dedicated": true},
                   "services": {"postgres": {"command": ["/bin/true"]}}}),
        ));
        assert_eq!(
            p,
            [
                "services[0] (a).infrastructure.services.postgres: runs as infrastructure service \"a-postgres\", which is also services[0] (a).infrastructure.database; rename one of them"
            ]
        );
        let p = problems(with("a", json!({"redis": {"port": 6380}})));
        assert_eq!(
            p,
            [
                "services[0] (a).infrastructure.redis.port: a port is for a dedicated server (\"dedicated\": true); a shared one's port is its preset's"
            ]
        );
        for name in ["mysql", "sys", "root", "mariadb-sys"] {
            let p = problems(with(name, json!({"database": {"dialect": "mysql"}})));
            assert!(
                p.iter().any(|m| m.contains("cannot have a MySQL database")),
                "{name}: {p:?}"
            );
        }
        // `postgres` is fine for MySQL, not for PostgreSQL.
        assert!(problems(with("postgres", json!({"database": {"dialect": "mysql"}}))).is_empty());
        assert!(!problems(with("postgres", json!({"database": true}))).is_empty());
        // Neither form takes what it does not know.
        for bad in [
            json!({"database": {"dedicate": true}}),
            json!({"redis": "yes"}),
            json!({"database": {"dialect": "oracle"}}),
        ] {
            assert!(!problems(with("a", bad.clone())).is_empty(), "{bad}");
        }
    }

    /// A preset's settings reach a command line or SQL: only what the preset knows, each
    /// value checked.
    #[test]
    fn preset_settings_are_checked() {
        let with = |preset: &str, config: Value| {
            let mut s = seed_service();
            s["infrastructure"] = json!({"database": true});
            json!({"schemaVersion": 1, "services": [s],
                "infrastructure": {"services": {"x": {"preset": preset, "config": config}}}})
        };
        let name = seed_service()["name"].as_str().unwrap().to_owned();
        for ok in [
            with(
                "postgres",
                json!({"databases": {"main": {}, "ledger": {}}, "extensions": ["pgcrypto", "uuid-ossp"], "version": "15"}),
            ),
            with(
                "redis",
                json!({"maxmemory": "256mb", "maxmemoryPolicy": "allkeys-lru"}),
            ),
            with("redis", json!({"maxmemory": "1GB", "password": true})),
            with("mysql", json!({})),
        ] {
            assert_eq!(problems(ok.clone()), Vec::<String>::new(), "{ok}");
        }
        for (bad, says) in [
            (
                with("postgres", json!({"databases": ["main"]})),
                "invalid type",
            ),
            (with("postgres", json!({"database": {}})), "unknown field"),
            (
                with("postgres", json!({"databases": {"main": {"owner": "x"}}})),
                "unknown field",
            ),
            (
                with("postgres", json!({"databases": {"Main; DROP": {}}})),
                "database name",
            ),
            (
                with("postgres", json!({"databases": {"postgres": {}}})),
                "superuser",
            ),
            (
                with("postgres", json!({"databases": {name.clone(): {}}})),
                "also the database of service",
            ),
            (
                with("postgres", json!({"extensions": ["x\"; drop"]})),
                "extension",
            ),
            (
                with("postgres", json!({"version": "15.4"})),
                "major version",
            ),
            (with("redis", json!({"maxmemory": "lots"})), "a size"),
            (with("redis", json!({"maxmemory": "10 --save x"})), "a size"),
            (with("redis", json!({"maxmemoryPolicy": "lru"})), "one of"),
            (with("mysql", json!({"databases": {}})), "no settings"),
        ] {
            let p = problems(bad.clone());
            assert!(
                p.iter()
                    .any(|m| m.contains("infrastructure.services.x.config") && m.contains(says)),
                "{bad}: {p:?}"
            );
        }
        let mut s = seed_service();
        s["infrastructure"] =
            json!({"services": {"side": {"command": ["/bin/side"], "config": {"a": 1}}}});
        let p = problems(json!({"schemaVersion": 1, "services": [s]}));
        assert!(
            p.iter().any(|m| m.contains("config is for presets")),
            "{p:?}"
        );
    }

    /// `infrastructure.overrides` names hosts or labels that exist and infrastructure that
    /// exists, and what it sets is checked like the declaration it changes.
    #[test]
    fn overrides_are_checked() {
        let mut s = seed_service();
        s["infrastructure"] = json!({"services": {"side": {"command": ["/bin/side"]}}});
        let name = s["name"].as_str().unwrap().to_owned();
        let with = |overrides: Value| {
            json!({"schemaVersion": 1, "services": [s.clone()],
                "rollout": {"labels": {"eu": ["biz"]}},
                "infrastructure": {"services": {"db": {"preset": "postgres"}}, "overrides": overrides}})
        };
        let ok = with(json!([
            {"hosts": ["biz"], "services": {"db": {"external": {"host": "10.0.0.1"}}, "side": {"disabled": true}}},
            {"labels": ["eu"], "services": {format!("{name}/side"): {"command": ["/bin/side", "--dev"]},
                                             "db": {"config": {"extensions": ["citext"]}}}}
        ]));
        assert_eq!(problems(ok), Vec::<String>::new());
        for (bad, says) in [
            (
                json!([{"services": {"db": {"disabled": true}}}]),
                "give hosts or labels",
            ),
            (
                json!([{"labels": ["us"], "services": {"db": {"disabled": true}}}]),
                "unknown label \"us\"",
            ),
            (
                json!([{"hosts": ["biz"], "services": {"search": {"disabled": true}}}]),
                "names no infrastructure",
            ),
            (
                json!([{"hosts": ["biz"], "services": {"other/side": {"disabled": true}}}]),
                "names no infrastructure",
            ),
            (
                json!([{"hosts": ["biz"], "services": {"db": {"disabled": true, "external": {"host": "h"}}}}]),
                "at once",
            ),
            (
                json!([{"hosts": ["biz"], "services": {"side": {"command": ["side"]}}}]),
                "absolute path",
            ),
            (
                json!([{"hosts": ["biz"], "services": {"db": {"config": {"version": "x"}}}}]),
                "major version",
            ),
            (
                json!([{"hosts": ["biz"], "services": {"db": {"port": 1}}}]),
                "not allowed",
            ),
        ] {
            let p = problems(with(bad.clone()));
            assert!(p.iter().any(|m| m.contains(says)), "{bad}: {p:?}");
        }
    }

    #[test]
    fn dependency_circles_are_refused() {
        let p = problems(json!({"schemaVersion": 1, "services": [],
            "infrastructure": {"services": {
                "a": {"command": ["/bin/a"], "dependsOn": ["b"]},
                "b": {"command": ["/bin/b"], "dependsOn": ["a"]}}}}));
        assert_eq!(
            p,
            [
                "infrastructure: dependsOn goes round in a circle (a -> b -> a); nothing in it could start first"
            ]
        );
        let mut s = seed_service();
        s["infrastructure"] = json!({"services": {
            "x": {"command": ["/bin/x"], "dependsOn": ["y"]},
            "y": {"command": ["/bin/y"], "dependsOn": ["x"]}}});
        let p = problems(json!({"schemaVersion": 1, "services": [s]}));
        assert!(p.iter().any(|m| m.contains("circle")), "{p:?}");
    }

    #[test]
    fn unknown_dependency_is_rejected() {
        let v = json!({"schemaVersion": 1, "services": [],
            "infrastructure": {"services": {"db": {"preset": "postgres", "dependsOn": ["nope"]}}}});
        let p = problems(v);
        assert!(
            p[0].contains("infrastructure.services.db.dependsOn"),
            "{p:?}"
        );
    }

    /// Problems of the seed service after `edit`, as `field: message` strings.
    fn problems_after(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut s = seed_service();
        edit(&mut s);
        problems(manifest_with(s))
    }

    #[test]
    fn sandbox_requests_are_checked() {
        let exec = |extra: Value| {
            problems_after(|s| {
                for (k, v) in extra.as_object().unwrap() {
                    s["exec"][k] = v.clone();
                }
            })
        };
        let fine = exec(json!({
            "writablePaths": ["/srv/my-service", "/var/cache/my-service"],
            "memoryMax": "512M", "cpuQuota": "150%",
            "tasksMax": 64
        }));
        assert_eq!(fine, Vec::<String>::new());
        for (bad, field) in [
            (json!({"writablePaths": ["/"]}), "writablePaths[0]"),
            (json!({"writablePaths": ["/var"]}), "writablePaths[0]"),
            (
                json!({"writablePaths": ["/etc/cron.d"]}),
                "writablePaths[0]",
            ),
            (json!({"writablePaths": ["/usr"]}), "writablePaths[0]"),
            (
                json!({"writablePaths": ["/var/lib/deployer-secrets"]}),
                "writablePaths[0]",
            ),
            (
                json!({"writablePaths": ["/var/lib/deployer/x"]}),
                "writablePaths[0]",
            ),
            (
                json!({"writablePaths": ["/srv/../etc"]}),
                "writablePaths[0]",
            ),
            (json!({"writablePaths": ["srv"]}), "writablePaths[0]"),
            (json!({"writablePaths": ["/srv/a b"]}), "writablePaths[0]"),
            (json!({"writablePaths": ["/srv"]}), "writablePaths[0]"),
            (
                json!({"writablePaths": ["/var/spool/cron/crontabs"]}),
                "writablePaths[0]",
            ),
            (
                json!({"writablePaths": ["/var/lib/dpkg"]}),
                "writablePaths[0]",
            ),
            (
                json!({"writablePaths": ["/var/lib/deployer-other"]}),
                "writablePaths[0]",
            ),
            (
                json!({"writablePaths": ["/run/udev/rules.d"]}),
                "writablePaths[0]",
            ),
            (json!({"user": "postgres", "group": "app"}), "user"),
            (json!({"user": "redis", "group": "app"}), "user"),
            (json!({"user": "deployer-other", "group": "app"}), "user"),
            (json!({"stateDirectory": "x"}), "stateDirectory"),
            (json!({"memoryMax": "512MB"}), "memoryMax"),
            (json!({"memoryMax": "0"}), "memoryMax"),
            (json!({"cpuQuota": "50"}), "cpuQuota"),
            (json!({"tasksMax": 0}), "tasksMax"),
            (json!({"user": null}), "group"),
        ] {
            let p = exec(bad.clone());
            assert!(
                p.len() == 1 && p[0].contains(field),
                "{bad}: expected one problem at {field}, got {p:?}"
            );
        }
        // A dynamic user's name, deployer-<name>, fits an account name.
        let mut s = seed_service();
        s["name"] = json!("a".repeat(MAX_DYNAMIC_NAME + 1));
        s.as_object_mut().unwrap().remove("envFile");
        s["exec"] = json!({"command": null, "user": null});
        let p = problems(manifest_with(s.clone()));
        assert!(
            p.len() == 1 && p[0].contains("at most 31 characters"),
            "{p:?}"
        );
        s["name"] = json!("a".repeat(MAX_DYNAMIC_NAME));
        assert_eq!(problems(manifest_with(s)), Vec::<String>::new());
        // A dynamic user without a group is fine; `null` survives a round trip.
        let mut s = seed_service();
        s["exec"] = json!({"command": null, "user": null});
        let m = manifest_from_value(manifest_with(s), "test").unwrap();
        let exec = m.services[0].exec.as_ref().unwrap();
        assert_eq!(exec.run_as(), crate::model::RunAs::Dynamic);
        let back = serde_json::to_value(exec).unwrap();
        assert_eq!(back["user"], Value::Null);
        assert!(back.as_object().unwrap().contains_key("user"));
        let mut s = seed_service();
        s["exec"] = json!({"command": null});
        let m = manifest_from_value(manifest_with(s), "test").unwrap();
        let exec = m.services[0].exec.as_ref().unwrap();
        assert_eq!(exec.run_as(), crate::model::RunAs::Root);
        assert!(
            !serde_json::to_value(exec)
                .unwrap()
                .as_object()
                .unwrap()
                .contains_key("user")
        );
    }

    #[test]
    fn env_file_must_be_the_services_own() {
        for bad in [
            "/var/lib/deployer-secrets/other.env",
            "/var/lib/deployer-secrets/infra-db.env",
            "/var/lib/deployer-secrets/deployer/other.env",
            "/var/lib/deployer-secrets/deployer/my-service.postgres-password",
            "/etc/shadow",
            "/var/lib/deployer-secrets/my-service.env/../other.env",
            "/var/lib/deployer-secrets/./my-service.env",
            "/var/lib/deployer-secrets//my-service.env",
            "/var/lib/deployer-secrets/my-service/",
            "var/lib/deployer-secrets/my-service.env",
            "/var/lib/deployer-secrets/my-service.env.bak",
            "/var/lib/deployer-secrets/my-service-2.env",
        ] {
            let p = problems_after(|s| s["envFile"] = json!(bad));
            assert!(
                p.iter()
                    .any(|m| m.starts_with("services[0] (my-service).envFile")),
                "{bad} was accepted: {p:?}"
            );
        }
        // The rule itself, without the schema's pattern in front of it.
        for bad in [
            "/a/./my-service.env",
            "/a//my-service.env",
            "/a/../my-service/x",
            "x/my-service.env",
            "/a/my-service/",
        ] {
            assert!(!env_file_fits("my-service", bad), "{bad}");
        }
        let p = problems_after(|s| s["envFile"] = json!("/var/lib/deployer-secrets/other.env"));
        assert!(
            p[0].contains("my-service.env"),
            "says what is expected: {p:?}"
        );
        for good in [
            "/var/lib/deployer-secrets/my-service.env",
            "/var/lib/deployer-secrets/my-service/env",
            "/var/lib/deployer-secrets/my-service/app.env",
            "/run/keys/my-service.env",
        ] {
            assert_eq!(
                problems_after(|s| s["envFile"] = json!(good)),
                Vec::<String>::new(),
                "{good}"
            );
        }
    }

    #[test]
    fn secret_names_are_plain_file_names() {
        for bad in ["../a.env", "a/b", ".hidden", "..", "/etc/shadow", "a b"] {
            let p = problems_after(|s| s["env"]["K"] = json!(format!("x${{secret:{bad}}}")));
            assert!(
                p.iter()
                    .any(|m| m.starts_with("services[0] (my-service).env.K: secret")),
                "{bad} was accepted: {p:?}"
            );
            let p = problems_after(|s| {
                s["infrastructure"] = json!({"services": {"search": {
                    "command": ["/bin/true"],
                    "env": {"KEY": format!("${{secret:{bad}}}")}
                }}})
            });
            assert!(
                p.iter()
                    .any(|m| m.contains("infrastructure.services.search.env.KEY")),
                "{bad} was accepted in a requirement: {p:?}"
            );
        }
        // The secrets map's file names: the schema's pattern and the rule.
        for bad in ["../a.env", ".a", "a/b"] {
            let p = problems_after(|s| {
                s["infrastructure"] = json!({"services": {"search": {
                    "command": ["/bin/true"],
                    "env": {"KEY": "${secret:apiKey}"},
                    "secrets": {"apiKey": bad}
                }}})
            });
            assert!(
                p.iter()
                    .any(|m| m.contains("infrastructure.services.search.secrets.apiKey")),
                "{bad} was accepted: {p:?}"
            );
        }
        for good in ["api_key", "a.env", "infra-db.env", "KEY-1"] {
            assert!(is_plain_file_name(good), "{good}");
        }
        assert_eq!(
            problems_after(|s| {
                s["env"]["K"] = json!("${secret:api_key}:${secret:other.env}");
                s["infrastructure"] = json!({"services": {"search": {
                    "command": ["/bin/true"],
                    "env": {"KEY": "${secret:apiKey}", "K2": "${secret:plain}"},
                    "secrets": {"apiKey": "search_api_key"}
                }}});
            }),
            Vec::<String>::new()
        );
    }

    #[test]
    fn reserved_names_are_refused() {
        for name in [
            "deployer",
            "deployer-web",
            "infra-db",
            "infra-x",
            "systemd-journald",
            "dbus",
            "syslog",
        ] {
            let p = problems_after(|s| s["name"] = json!(name));
            assert!(
                p.iter()
                    .any(|m| m.contains(".name: service name") && m.contains("reserved")),
                "{name}: {p:?}"
            );
        }
        for name in ["postgres", "template1", "template0", "pg_monitor", "pg_x"] {
            let p = problems_after(|s| {
                s["name"] = json!(name);
                s["envFile"] = json!(format!("/var/lib/deployer-secrets/{name}.env"));
                s["infrastructure"] = json!({"database": true});
            });
            assert!(
                p.iter()
                    .any(|m| m.contains(&format!("services[0] ({name}).infrastructure.database"))),
                "{name}: {p:?}"
            );
            // Without a database, the name is only a unit name.
            let p = problems_after(|s| {
                s["name"] = json!(name);
                s["envFile"] = json!(format!("/var/lib/deployer-secrets/{name}.env"));
            });
            assert_eq!(p, Vec::<String>::new(), "{name}");
        }
        for name in [
            "deployers",
            "my-infra-db",
            "postgres-app",
            "pgx",
            "my-systemd",
            "dbus2",
        ] {
            let p = problems_after(|s| {
                s["name"] = json!(name);
                s["envFile"] = json!(format!("/var/lib/deployer-secrets/{name}.env"));
                s["infrastructure"] = json!({"database": true});
            });
            assert_eq!(p, Vec::<String>::new(), "{name}");
        }
    }

    #[test]
    fn rollout_policies_are_checked() {
        let with = |edit: &dyn Fn(&mut Value)| {
            let mut m = manifest_with(seed_service());
            edit(&mut m);
            problems(m)
        };
        let found = with(&|m| {
            m["rollout"] = json!({
                "labels": {"canary": ["biz"]},
                "policy": {"waves": [
                    {"labels": ["canary"]},
                    {"percent": 50},
                    {"percent": 50},
                    {"hosts": ["a"], "percent": 10},
                    {},
                ]},
            });
            m["services"][0]["rollout"] = json!({"waves": [{"labels": ["nowhere"]}]});
        });
        let text = found.join("\n");
        assert!(
            text.contains("rollout.policy.waves[2].percent: 50 is not above the 50 %"),
            "{text}"
        );
        assert!(
            text.contains("rollout.policy.waves[3]: give exactly one of hosts, labels or percent"),
            "{text}"
        );
        assert!(
            text.contains("rollout.policy.waves[4]: give exactly one"),
            "{text}"
        );
        assert!(
            text.contains(
                "services[0] (my-service).rollout.waves[0].labels: unknown label \"nowhere\""
            ),
            "{text}"
        );
        assert_eq!(found.len(), 5, "{text}");
        let found = with(&|m| {
            m["rollout"] = json!({"policy": {"waves": [{"percent": 101}], "maxFailures": 0, "onDeadline": "wait"}});
        });
        assert_eq!(found.len(), 3, "{found:?}");
    }

    #[test]
    fn bad_json_reports_line_and_column() {
        let e = parse_manifest(b"{\"schemaVersion\": 1,\n \"services\": [}", "f.json").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_schema_version_is_rejected() {
        let p = problems(json!({"schemaVersion": 2, "services": []}));
        assert!(p[0].starts_with("schemaVersion"), "{p:?}");
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn the_example_manifest_is_valid() {
        let bytes = include_bytes!("../../examples/manifest.json");
        let m = super::parse_manifest(bytes, "examples/manifest.json")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.services.len(), 2);
    }
}
