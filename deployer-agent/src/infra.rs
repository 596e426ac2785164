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

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

/// The newest PostgreSQL server binaries on this host (Debian layout), or `$DEPLOYER_PG_BIN`.
pub fn pg_bin() -> Result<PathBuf, AgentError> {
    if let Some(dir) = std::env::var_os("DEPLOYER_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).ok_or_else(|| {
        err(
            "postgres",
            "no PostgreSQL server found in /usr/lib/postgresql/*/bin; install it (apt-get install postgresql) or set DEPLOYER_PG_BIN",
        )
    })
}

/// uid and gid of a system account.
fn account(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn run(what: &str, cmd: &mut Command, stdin: Option<&[u8]>) -> Result<String, AgentError> {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(what, format!("cannot run {:?}: {e}", cmd.get_program())))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input)
            .map_err(|e| err(what, e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| err(what, e.to_string()))?;
    if !out.status.success() {
        // stderr only: it never echoes the SQL (and so the password) sent on stdin.
        return Err(err(
            what,
            format!(
                "{:?} failed ({}): {}",
                cmd.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The argv of a provisioned infrastructure service and its data directory. Acts on
/// nothing (it only looks for the PostgreSQL binaries), so a plan can render the unit.
pub fn command(
    name: &str,
    spec: &InfraService,
    ep: &Endpoint,
    state_dir: &Path,
) -> Result<(Vec<String>, PathBuf), AgentError> {
    let root = crate::names::infra_dir(state_dir, name);
    let data = root.join("data");
    let port = ep.port().unwrap_or(0).to_string();
    let argv = match spec.preset {
        Some(Preset::Postgres) => vec![
            "/usr/sbin/runuser".to_owned(),
            "-u".into(),
            "postgres".into(),
            "--".into(),
            pg_bin()?.join("postgres").display().to_string(),
            "-D".into(),
            data.display().to_string(),
            "-k".into(),
            root.join("run").display().to_string(),
            "-p".into(),
            port,
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
        ],
        Some(Preset::Redis) => vec![
            "/usr/bin/redis-server".to_owned(),
            "--port".into(),
            port,
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            data.display().to_string(),
            "--appendonly".into(),
            "yes".into(),
            "--daemonize".into(),
            "no".into(),
        ],
        None => {
            let argv = spec.command.clone().ok_or_else(|| {
                err(
                    name,
                    "a custom infrastructure service needs \"command\" (or \"external\")",
                )
            })?;
            if !argv[0].starts_with('/') {
                return Err(err(
                    name,
                    format!("command {:?} must be an absolute path", argv[0]),
                ));
            }
            argv
        }
    };
    Ok((argv, data))
}

/// The unit file of provisioned infrastructure service `name` (see [`command`]); acts on
/// nothing.
pub fn unit_file(
    name: &str,
    spec: &InfraService,
    state_dir: &Path,
    user: bool,
) -> Result<String, AgentError> {
    let ep = endpoint(name, spec);
    let unit = crate::names::infra_unit(name);
    let (argv, data) = command(name, spec, &ep, state_dir)?;
    Ok(crate::unit::UnitSpec {
        description: format!("deployer infrastructure: {name}"),
        exec_start: argv,
        working_directory: Some(data),
        user: None,
        group: None,
        environment: Default::default(),
        environment_files: Vec::new(),
        log_file: user.then(|| crate::names::log_file(&state_dir.join("logs"), &unit)),
        hardening: false,
        oneshot: false,
        start_timeout: None,
    }
    .render()?)
}

/// Prepare the data directory of a provisioned infrastructure service before it starts
/// (initdb on the first start of a postgres preset). Idempotent.
pub fn prepare(name: &str, spec: &InfraService, state_dir: &Path) -> Result<(), AgentError> {
    let root = crate::names::infra_dir(state_dir, name);
    let data = root.join("data");
    let mkdir = |p: &Path, mode: u32| -> Result<(), AgentError> {
        std::fs::create_dir_all(p).map_err(|e| err(name, format!("{}: {e}", p.display())))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| err(name, format!("{}: {e}", p.display())))
    };
    mkdir(&root, 0o755)?;
    mkdir(&data, 0o700)?;
    if spec.preset != Some(Preset::Postgres) {
        return Ok(());
    }
    let bin = pg_bin()?;
    let run_dir = root.join("run");
    mkdir(&run_dir, 0o755)?;
    let (uid, gid) = account("postgres").ok_or_else(|| {
        err(
            name,
            "no `postgres` system account; install PostgreSQL's server package",
        )
    })?;
    for p in [&data, &run_dir] {
        std::os::unix::fs::chown(p, Some(uid), Some(gid))
            .map_err(|e| err(name, format!("chown {}: {e}", p.display())))?;
    }
    if !data.join("PG_VERSION").exists() {
        tracing::info!(infra = name, "initialising the database cluster (initdb)");
        run(
            name,
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join("initdb"))
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                    "-D",
                ])
                .arg(&data),
            None,
        )?;
    }
    Ok(())
}

/// Where the agent keeps what it generates for services (env files, database passwords).
fn generated_dir(secrets_dir: &Path) -> PathBuf {
    secrets_dir.join("deployer")
}

/// Where the database password the agent generated for `service` is kept.
pub fn password_path(secrets_dir: &Path, service: &str) -> PathBuf {
    generated_dir(secrets_dir).join(format!("{service}.postgres-password"))
}

/// The connection URL env vars of `service` (`DATABASE_URL`, `REDIS_URL`), creating its
/// role and database, or assigning its Redis index, on the way.
pub struct AppLayer<'a> {
    pub secrets_dir: &'a Path,
    pub state_dir: &'a Path,
    /// Who must own the secret files the agent reads: root (the agent's own user with
    /// `--user`).
    pub owner_uid: u32,
}

/// The comment that marks a role or database as created by deployer for `service`.
pub fn ownership_mark(service: &str) -> String {
    format!("deployer:{service}")
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn sql_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A role of a service's name, as found in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleFound {
    Absent,
    /// Carries deployer's mark for this service.
    Ours,
    /// Exists without the mark.
    Unmarked,
    Superuser,
}

/// A database of a service's name, as found in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseFound {
    Absent,
    Ours,
    /// No mark, but owned by the role of the same name.
    OwnedByRole,
    Foreign,
}

/// What to do in the cluster for one service (none of it carries the password).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DatabasePlan {
    pub create_role: bool,
    pub mark_role: bool,
    pub create_database: bool,
    pub mark_database: bool,
}

/// Decide what may be done for `service`, given what the cluster holds under its name and
/// whether this host already keeps a password the agent generated for it (then an unmarked
/// role was made by an earlier agent, before roles were marked). Never touches a role or
/// database deployer did not create: `Err` says why and what the operator can do.
pub fn plan_database(
    service: &str,
    role: RoleFound,
    database: DatabaseFound,
    has_password: bool,
) -> Result<DatabasePlan, String> {
    let mark = ownership_mark(service);
    let (q, m) = (sql_ident(service), sql_literal(&mark));
    match role {
        RoleFound::Superuser => {
            return Err(format!(
                "role {service:?} exists and is a superuser; the agent never hands a superuser to a service or changes its password; rename the service"
            ));
        }
        RoleFound::Unmarked if !has_password => {
            return Err(format!(
                "role {service:?} exists and was not created by deployer (no {mark:?} comment on it); the agent leaves it alone. Rename the service, or drop the role, or adopt it yourself (the agent then gives it a new password): COMMENT ON ROLE {q} IS {m}"
            ));
        }
        _ => {}
    }
    let ours = role == RoleFound::Ours || has_password;
    match database {
        DatabaseFound::Foreign => {
            return Err(format!(
                "database {service:?} exists and was not created by deployer (no {mark:?} comment, owned by another role); the agent leaves it alone. Rename the service, or drop the database, or adopt it yourself: ALTER DATABASE {q} OWNER TO {q}; COMMENT ON DATABASE {q} IS {m}"
            ));
        }
        DatabaseFound::OwnedByRole if !ours => {
            return Err(format!(
                "database {service:?} exists and was not created by deployer (no {mark:?} comment); the agent leaves it alone. Rename the service, or drop the database, or adopt it yourself: COMMENT ON DATABASE {q} IS {m}"
            ));
        }
        _ => {}
    }
    Ok(DatabasePlan {
        create_role: role == RoleFound::Absent,
        mark_role: matches!(role, RoleFound::Absent | RoleFound::Unmarked),
        create_database: database == DatabaseFound::Absent,
        mark_database: matches!(database, DatabaseFound::Absent | DatabaseFound::OwnedByRole),
    })
}

/// The query that tells what the cluster holds under `service`'s name: lines
/// `role:<ours|unmarked|superuser>` and `database:<ours|owned|foreign>`, none when absent.
fn probe_sql(service: &str) -> String {
    let (n, m) = (sql_literal(service), sql_literal(&ownership_mark(service)));
    format!(
        "SELECT 'role:' || CASE WHEN rolsuper THEN 'superuser' WHEN shobj_description(oid, 'pg_authid') = {m} THEN 'ours' ELSE 'unmarked' END FROM pg_roles WHERE rolname = {n};\n\
         SELECT 'database:' || CASE WHEN shobj_description(oid, 'pg_database') = {m} THEN 'ours' WHEN pg_get_userbyid(datdba) = {n} THEN 'owned' ELSE 'foreign' END FROM pg_database WHERE datname = {n};\n"
    )
}

fn parse_probe(out: &str) -> Result<(RoleFound, DatabaseFound), String> {
    let (mut role, mut database) = (RoleFound::Absent, DatabaseFound::Absent);
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line {
            "role:ours" => role = RoleFound::Ours,
            "role:unmarked" => role = RoleFound::Unmarked,
            "role:superuser" => role = RoleFound::Superuser,
            "database:ours" => database = DatabaseFound::Ours,
            "database:owned" => database = DatabaseFound::OwnedByRole,
            "database:foreign" => database = DatabaseFound::Foreign,
            other => return Err(format!("unexpected answer from psql: {other:?}")),
        }
    }
    Ok((role, database))
}

/// The statements that carry out `plan` (no password in any of them). A new role gets its
/// mark in the same transaction, so a crash never leaves an unmarked role of ours.
fn plan_sql(service: &str, plan: &DatabasePlan) -> String {
    let (q, m) = (sql_ident(service), sql_literal(&ownership_mark(service)));
    let mut sql = String::new();
    if plan.create_role {
        sql.push_str(&format!(
            "BEGIN;\nCREATE ROLE {q} LOGIN;\nCOMMENT ON ROLE {q} IS {m};\nCOMMIT;\n"
        ));
    } else if plan.mark_role {
        sql.push_str(&format!("COMMENT ON ROLE {q} IS {m};\n"));
    }
    if plan.create_database {
        sql.push_str(&format!("CREATE DATABASE {q} OWNER {q};\n"));
    }
    if plan.mark_database {
        sql.push_str(&format!("COMMENT ON DATABASE {q} IS {m};\n"));
    }
    sql
}

impl AppLayer<'_> {
    /// Everything `service` gets from its infrastructure, resolved (the infrastructure
    /// itself started already): `DATABASE_URL` (creating its role and database),
    /// `REDIS_URL` (assigning its index; `indexes` is the state's copy, Redis wins), the
    /// env of its own requirements and its templated env values, written to its generated
    /// env file. That file, if there is anything in it.
    pub fn app_env(
        &self,
        service: &Service,
        manifest: &Manifest,
        indexes: &mut BTreeMap<String, u32>,
    ) -> Result<Option<PathBuf>, AgentError> {
        // A reserved name (`deployer`, `infra-*`) would reach the agent's own files.
        crate::secrets::check_service_name(&service.name, self.secrets_dir)?;
        let eco = manifest.infrastructure.as_ref().map(|i| &i.services);
        let find = |preset: Preset| {
            eco.and_then(|e| e.iter().find(|(_, s)| s.preset == Some(preset)))
                .map(|(name, spec)| (name, endpoint(name, spec)))
        };
        let mut vars = BTreeMap::new();
        if let Some(req) = &service.infrastructure {
            if req.database == Some(true)
                && let Some((name, ep)) = find(Preset::Postgres)
            {
                vars.insert(
                    "DATABASE_URL".to_owned(),
                    self.database_url(&service.name, &ep, name)?,
                );
            }
            if req.redis == Some(true)
                && let Some((_, ep)) = find(Preset::Redis)
            {
                let (index, in_redis) = redis_index(&ep, &service.name, indexes)?;
                for (name, i) in in_redis {
                    if name == service.name || indexes.contains_key(&name) {
                        indexes.insert(name, i);
                    }
                }
                vars.insert("REDIS_URL".to_owned(), AppLayer::redis_url(&ep, index));
            }
            for (rname, spec) in &req.services {
                let ep = endpoint(&crate::names::owned_infra(&service.name, rname), spec);
                for (k, v) in &spec.env {
                    let (value, _) = resolve(
                        &service.name,
                        k,
                        v,
                        Some(&ep),
                        &spec.secrets,
                        self.secrets_dir,
                        self.owner_uid,
                    )?;
                    vars.insert(k.clone(), value);
                }
            }
        }
        for (k, v) in &service.env {
            if v.contains("${") {
                let (value, _) = resolve(
                    &service.name,
                    k,
                    v,
                    None,
                    &Default::default(),
                    self.secrets_dir,
                    self.owner_uid,
                )?;
                vars.insert(k.clone(), value);
            }
        }
        self.write_env(&service.name, &vars)
    }

    fn generated_dir(&self) -> Result<PathBuf, AgentError> {
        let dir = generated_dir(self.secrets_dir);
        std::fs::create_dir_all(&dir).map_err(|e| err("secrets", e.to_string()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err("secrets", e.to_string()))?;
        Ok(dir)
    }

    fn password_file(&self, service: &str) -> Result<PathBuf, AgentError> {
        self.generated_dir()?;
        Ok(password_path(self.secrets_dir, service))
    }

    /// The password this host's agent generated for `service`, if it keeps one.
    fn kept_password(&self, service: &str) -> Result<Option<String>, AgentError> {
        let path = self.password_file(service)?;
        match crate::secrets::read_checked(&path, self.owner_uid) {
            Ok(p) => Ok(Some(p.trim().to_owned()).filter(|p| !p.is_empty())),
            Err(crate::secrets::Refusal::Missing) => Ok(None),
            Err(r) => Err(err(
                service,
                format!("{}: {}", path.display(), r.explain(&path, self.owner_uid)),
            )),
        }
    }

    /// psql connected as the cluster's administrator to the `postgres` database: peer
    /// authentication over the preset's socket, or, for an external server, the admin
    /// credentials in `<secrets>/infra-<name>.env` (checked like every secret file; no
    /// service can name that file).
    fn psql(&self, ep: &Endpoint, infra_name: &str) -> Result<Command, AgentError> {
        let port = ep.port().unwrap_or(5432).to_string();
        let mut cmd = match &ep.unit {
            Some(_) => {
                let run_dir = crate::names::infra_dir(self.state_dir, infra_name).join("run");
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--", "psql", "-h"])
                    .arg(run_dir)
                    .arg("-p")
                    .arg(&port);
                c
            }
            None => {
                // External: admin credentials (PGUSER, PGPASSWORD, …) from the secrets dir.
                let admin = self.secrets_dir.join(format!("infra-{infra_name}.env"));
                let text = crate::secrets::read_checked(&admin, self.owner_uid).map_err(|r| {
                    err(
                        infra_name,
                        format!(
                            "admin credentials {}: {}; write PGUSER=… and PGPASSWORD=… there (mode 600)",
                            admin.display(),
                            r.explain(&admin, self.owner_uid)
                        ),
                    )
                })?;
                let mut c = Command::new("psql");
                for line in text.lines() {
                    if let Some((k, v)) = line.split_once('=')
                        && k.trim().starts_with("PG")
                    {
                        c.env(k.trim(), v.trim().trim_matches('"'));
                    }
                }
                c.args(["-h", &ep.host, "-p", &port]);
                c
            }
        };
        cmd.args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            "postgres",
        ]);
        // A server that does not answer, or a statement stuck on a lock, does not hold the
        // run (the admin credentials file may set its own).
        if cmd.get_envs().all(|(k, _)| k != "PGCONNECT_TIMEOUT") {
            cmd.env("PGCONNECT_TIMEOUT", "10");
        }
        if cmd.get_envs().all(|(k, _)| k != "PGOPTIONS") {
            cmd.env("PGOPTIONS", "-c statement_timeout=60s -c lock_timeout=30s");
        }
        Ok(cmd)
    }

    /// Create (idempotently) the role and database named after `service` in `ep`, and only
    /// if deployer created them: a role or database of that name made by someone else is
    /// refused, and so are Postgres's own names. The checks run first, in statements
    /// without the password; the password is sent once, to a role known to be ours, and
    /// kept in `<secrets>/deployer/<service>.postgres-password` only after it was set.
    pub fn database_url(
        &self,
        service: &str,
        ep: &Endpoint,
        infra_name: &str,
    ) -> Result<String, AgentError> {
        let what = format!("{service}: database");
        if let Some(why) = deploy_manifest::validate::reserved_database_name(service) {
            return Err(err(
                &what,
                format!(
                    "a service named {service:?} cannot have a database: {why}; rename the service"
                ),
            ));
        }
        let kept = self.kept_password(service)?;
        let found = run(
            &what,
            &mut self.psql(ep, infra_name)?,
            Some(probe_sql(service).as_bytes()),
        )?;
        let (role, database) = parse_probe(&found).map_err(|e| err(&what, e))?;
        let plan = plan_database(service, role, database, kept.is_some())
            .map_err(|e| err(&what, format!("in {infra_name}: {e}")))?;
        if plan != DatabasePlan::default() {
            tracing::info!(?plan, "creating or marking the service's role and database");
            run(
                &what,
                &mut self.psql(ep, infra_name)?,
                Some(plan_sql(service, &plan).as_bytes()),
            )?;
        }
        // A password is sent only to a role known to be ours: one just created (with the
        // kept password if there is one) or one whose password file was lost.
        let password = match kept {
            Some(p) if !plan.create_role => p,
            kept => {
                let password = match kept {
                    Some(p) => p,
                    None => {
                        let mut bytes = [0u8; 24];
                        std::fs::File::open("/dev/urandom")
                            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
                            .map_err(|e| err(service, format!("reading /dev/urandom: {e}")))?;
                        deploy_manifest::hex(&bytes)
                    }
                };
                let sql = format!(
                    "ALTER ROLE {} PASSWORD {};\n",
                    sql_ident(service),
                    sql_literal(&password)
                );
                run(&what, &mut self.psql(ep, infra_name)?, Some(sql.as_bytes()))?;
                let path = self.password_file(service)?;
                deploy_manifest::fsutil::write_atomically(&path, password.as_bytes(), 0o600)
                    .map_err(|e| err(service, format!("{}: {e}", path.display())))?;
                password
            }
        };
        Ok(format!(
            "postgres://{service}:{password}@{}:{}/{service}",
            ep.host,
            ep.port().unwrap_or(5432)
        ))
    }

    pub fn redis_url(ep: &Endpoint, index: u32) -> String {
        format!("redis://{}:{}/{index}", ep.host, ep.port().unwrap_or(6379))
    }

    /// Write the generated env file of `service` (mode 600); `None` when there is nothing.
    pub fn write_env(
        &self,
        service: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<Option<PathBuf>, AgentError> {
        let path = self.generated_dir()?.join(format!("{service}.env"));
        if vars.is_empty() {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let mut text = String::from(
            "# Generated by deployer-agent: connection settings and resolved secrets.\n",
        );
        for (k, v) in vars {
            text.push_str(&format!("{k}={}\n", env_file_quote(v)?));
        }
        deploy_manifest::fsutil::write_atomically(&path, text.as_bytes(), 0o600)
            .map_err(|e| err(service, format!("{}: {e}", path.display())))?;
        Ok(Some(path))
    }
}

/// The hash in Redis's DB 0 that holds the DB index of every service: field = service
/// name, value = index. It lives beside the data it protects, so losing `state.json` cannot
/// hand one service's index to another.
pub const REDIS_INDEX_KEY: &str = "deployer:db-index";
/// The indexes given to services (DB 0 holds [`REDIS_INDEX_KEY`]).
pub const REDIS_INDEXES: std::ops::RangeInclusive<u32> = 1..=15;
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Decide `service`'s index from what Redis holds (`in_redis`, which wins) and the copy in
/// `state.json` (`known`): an assignment only the state knows (made by an older agent) is
/// written to Redis first, unless Redis already gives that index to another service; a
/// service without one gets the lowest index neither holds. Returns the index and the
/// assignments to write.
pub fn assign_redis_index(
    service: &str,
    in_redis: &BTreeMap<String, u32>,
    known: &BTreeMap<String, u32>,
) -> Result<(u32, Vec<(String, u32)>), String> {
    let mut used: std::collections::BTreeSet<u32> = in_redis.values().copied().collect();
    let mut writes = Vec::new();
    for (name, &i) in known {
        if !in_redis.contains_key(name) && REDIS_INDEXES.contains(&i) && used.insert(i) {
            writes.push((name.clone(), i));
        }
    }
    if let Some(&i) = in_redis.get(service) {
        return Ok((i, writes));
    }
    if let Some(&(_, i)) = writes.iter().find(|(n, _)| n == service) {
        return Ok((i, writes));
    }
    used.extend(known.values().copied());
    let i = REDIS_INDEXES.clone().find(|i| !used.contains(i)).ok_or_else(|| {
        format!(
            "all {} DB indexes are taken (removed services keep theirs; see HGETALL {REDIS_INDEX_KEY} in DB 0)",
            REDIS_INDEXES.count()
        )
    })?;
    writes.push((service.to_owned(), i));
    Ok((i, writes))
}

fn parse_index_hash(reply: crate::resp::Reply) -> Result<BTreeMap<String, u32>, String> {
    use crate::resp::Reply;
    let Reply::Array(Some(items)) = reply else {
        return Err(format!(
            "HGETALL {REDIS_INDEX_KEY} did not answer with an array"
        ));
    };
    let text = |r: &Reply| match r {
        Reply::Bulk(Some(b)) => String::from_utf8(b.clone()).ok(),
        _ => None,
    };
    let mut out = BTreeMap::new();
    for pair in items.chunks(2) {
        let (Some(field), Some(value)) = (pair.first().and_then(text), pair.get(1).and_then(text))
        else {
            return Err(format!(
                "HGETALL {REDIS_INDEX_KEY}: an odd or non-text answer"
            ));
        };
        let index = value
            .parse::<u32>()
            .ok()
            .filter(|i| REDIS_INDEXES.contains(i))
            .ok_or_else(|| {
                format!(
                    "{REDIS_INDEX_KEY} gives {field:?} the index {value:?}, not one of 1-15; fix it in DB 0 (HSET {REDIS_INDEX_KEY} {field} <index>)"
                )
            })?;
        out.insert(field, index);
    }
    Ok(out)
}

/// The Redis DB index of `service`, kept in Redis itself ([`REDIS_INDEX_KEY`] in DB 0), and
/// every assignment Redis holds (for the copy in `state.json`). Allocation is optimistic:
/// `WATCH` the hash, read it, and write with `HSETNX` inside `MULTI`/`EXEC`, which Redis
/// aborts if anyone changed the hash in between (then it is read again); so two writers
/// never give one index twice. Every connect, read and write has a timeout.
pub fn redis_index(
    ep: &Endpoint,
    service: &str,
    known: &BTreeMap<String, u32>,
) -> Result<(u32, BTreeMap<String, u32>), AgentError> {
    use crate::resp::{Conn, Reply};
    let port = ep.port().unwrap_or(6379);
    let fail = |detail: String| err(&format!("{service}: redis index"), detail);
    let mut conn = Conn::connect(&ep.host, port, REDIS_TIMEOUT).map_err(|e| fail(e.to_string()))?;
    let mut call = |args: &[&str]| conn.call(args).map_err(|e| fail(e.to_string()));
    for _ in 0..10 {
        call(&["WATCH", REDIS_INDEX_KEY])?;
        let mut in_redis = parse_index_hash(call(&["HGETALL", REDIS_INDEX_KEY])?).map_err(fail)?;
        let (index, writes) = assign_redis_index(service, &in_redis, known).map_err(fail)?;
        if writes.is_empty() {
            call(&["UNWATCH"])?;
            return Ok((index, in_redis));
        }
        call(&["MULTI"])?;
        for (name, i) in &writes {
            call(&["HSETNX", REDIS_INDEX_KEY, name, &i.to_string()])?;
        }
        match call(&["EXEC"])? {
            // Someone changed the hash meanwhile: read it again.
            Reply::Array(None) => continue,
            Reply::Array(Some(results)) if results.iter().all(|r| *r == Reply::Int(1)) => {
                for (name, i) in writes {
                    tracing::info!(service = %name, index = i, "Redis DB index recorded in {REDIS_INDEX_KEY}");
                    in_redis.insert(name, i);
                }
                return Ok((index, in_redis));
            }
            // A field appeared although the hash was watched (it cannot, but then the
            // next round reads what is there).
            Reply::Array(Some(_)) => continue,
            other => return Err(fail(format!("EXEC answered {other:?}"))),
        }
    }
    Err(fail(format!(
        "{REDIS_INDEX_KEY} kept changing while this agent allocated an index; the next run retries"
    )))
}

/// A value for a systemd EnvironmentFile: double-quoted, `\ " $` and backtick escaped; a
/// control character is refused.
fn env_file_quote(v: &str) -> Result<String, AgentError> {
    if v.chars().any(|c| c.is_control()) {
        return Err(err(
            "env",
            "a value with a control character cannot go into an env file",
        ));
    }
    let mut out = String::from("\"");
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// Resolve `${host}`, `${port:name}` and `${secret:name}` in `value`. `ep` gives host and
/// ports (absent for a service's own env). `${secret:name}` is the file
/// `<secrets>/<service>/<file>`, where `file` is what the requirement's `secrets` map gives
/// for `name` (or `name` itself): only the service's own secrets, checked like every secret
/// file ([`crate::secrets::read_secret`]).
pub fn resolve(
    service: &str,
    key: &str,
    value: &str,
    ep: Option<&Endpoint>,
    secrets: &BTreeMap<String, String>,
    secrets_dir: &Path,
    owner_uid: u32,
) -> Result<(String, bool), AgentError> {
    use deploy_manifest::template::{Placeholder, expand};
    let mut lookup = |p: Placeholder<'_>| -> Result<String, String> {
        match p {
            Placeholder::Host => ep
                .map(|e| e.host.clone())
                .ok_or_else(|| "${host} has no infrastructure service here".to_owned()),
            Placeholder::Port(name) => ep
                .and_then(|e| e.ports.get(name))
                .map(u16::to_string)
                .ok_or_else(|| format!("unknown port {name:?}")),
            Placeholder::Secret(name) => {
                let file = secrets.get(name).map(String::as_str).unwrap_or(name);
                crate::secrets::read_secret(service, file, secrets_dir, owner_uid)
                    .map_err(|e| format!("secret {name:?}: {e}"))
            }
        }
    };
    expand(value, &mut lookup).map_err(|detail| err(&format!("{service}: env {key}"), detail))
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

    #[test]
    fn templates_resolve_or_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).unwrap());
        std::fs::create_dir(dir.path().join("app")).unwrap();
        for (file, text) in [
            ("app/search_api_key", "k3y\n"),
            ("other.env", "x\n"),
            ("infra-db.env", "PGPASSWORD=x\n"),
        ] {
            std::fs::write(dir.path().join(file), text).unwrap();
            std::fs::set_permissions(
                dir.path().join(file),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        let ep = Endpoint {
            name: "search".into(),
            host: "127.0.0.1".into(),
            ports: [("http".to_owned(), 9200)].into(),
            unit: None,
            preset: None,
            critical: true,
            startup_timeout: Duration::from_secs(1),
        };
        let secrets = [("apiKey".to_owned(), "search_api_key".to_owned())].into();
        let r = |v: &str| resolve("app", "K", v, Some(&ep), &secrets, dir.path(), uid);
        assert_eq!(
            r("http://${host}:${port:http}").unwrap(),
            ("http://127.0.0.1:9200".into(), false)
        );
        assert_eq!(r("${secret:apiKey}").unwrap(), ("k3y".into(), true));
        for bad in [
            "${port:grpc}",
            "${nope}",
            "${secret:missing}",
            "${host",
            // Another service's or the infrastructure's secrets, however they are named.
            "${secret:other.env}",
            "${secret:infra-db.env}",
            "${secret:../other.env}",
            "${secret:../app/search_api_key}",
        ] {
            let e = r(bad).unwrap_err().to_string();
            assert!(e.contains("app: env K"), "{bad}: {e}");
        }
        assert!(resolve("app", "K", "${host}", None, &secrets, dir.path(), uid).is_err());
        for file in ["../other.env", "../infra-db.env", ".hidden"] {
            let e = resolve(
                "app",
                "K",
                "${secret:x}",
                None,
                &[("x".to_owned(), file.to_owned())].into(),
                dir.path(),
                uid,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("plain file name"), "{file}: {e}");
        }
    }

    #[test]
    fn database_plans_touch_only_what_deployer_made() {
        use DatabaseFound as D;
        use RoleFound as R;
        let all = DatabasePlan {
            create_role: true,
            mark_role: true,
            create_database: true,
            mark_database: true,
        };
        // New: create both, marked.
        assert_eq!(plan_database("app", R::Absent, D::Absent, false), Ok(all));
        // Ours already: nothing to do.
        assert_eq!(
            plan_database("app", R::Ours, D::Ours, true),
            Ok(DatabasePlan::default())
        );
        assert_eq!(
            plan_database("app", R::Ours, D::Ours, false),
            Ok(DatabasePlan::default())
        );
        // Made by an earlier agent (it keeps the password): mark both.
        assert_eq!(
            plan_database("app", R::Unmarked, D::OwnedByRole, true),
            Ok(DatabasePlan {
                mark_role: true,
                mark_database: true,
                ..Default::default()
            })
        );
        // Someone else's role or database: refused, saying what to do.
        let e = plan_database("alice", R::Unmarked, D::Absent, false).unwrap_err();
        assert!(
            e.contains("role \"alice\" exists and was not created by deployer")
                && e.contains("Rename the service")
                && e.contains("COMMENT ON ROLE \"alice\" IS 'deployer:alice'"),
            "{e}"
        );
        for (role, db, kept) in [
            (R::Absent, D::Foreign, false),
            (R::Ours, D::Foreign, true),
            (R::Unmarked, D::Foreign, true),
            (R::Absent, D::OwnedByRole, false),
        ] {
            let e = plan_database("app", role, db, kept).unwrap_err();
            assert!(
                e.contains("database \"app\" exists and was not created by deployer"),
                "{e}"
            );
        }
        for kept in [false, true] {
            let e = plan_database("app", R::Superuser, D::Absent, kept).unwrap_err();
            assert!(e.contains("superuser"), "{e}");
        }
        // No statement of a plan carries anything but names and the mark.
        let sql = plan_sql("app", &all);
        assert!(sql.contains("CREATE ROLE \"app\" LOGIN;"), "{sql}");
        assert!(!sql.to_ascii_uppercase().contains("PASSWORD"), "{sql}");
        assert!(
            sql.contains("COMMENT ON DATABASE \"app\" IS 'deployer:app'"),
            "{sql}"
        );
    }

    #[test]
    fn probe_answers_parse() {
        assert_eq!(
            parse_probe(""),
            Ok((RoleFound::Absent, DatabaseFound::Absent))
        );
        assert_eq!(
            parse_probe("role:unmarked\ndatabase:owned\n"),
            Ok((RoleFound::Unmarked, DatabaseFound::OwnedByRole))
        );
        assert_eq!(
            parse_probe("role:superuser\n"),
            Ok((RoleFound::Superuser, DatabaseFound::Absent))
        );
        assert!(parse_probe("role:what\n").is_err());
        assert!(!probe_sql("app").to_ascii_uppercase().contains("PASSWORD"));
    }

    #[test]
    fn redis_indexes_come_from_redis_first() {
        let map = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(n, i)| (n.to_string(), *i)).collect()
        };
        // Redis knows: its answer, whatever the state says.
        assert_eq!(
            assign_redis_index(
                "a",
                &map(&[("a", 1), ("b", 2)]),
                &map(&[("a", 2), ("b", 1)])
            ),
            Ok((1, vec![]))
        );
        // State lost: Redis still knows.
        assert_eq!(
            assign_redis_index("b", &map(&[("a", 1), ("b", 2)]), &map(&[])),
            Ok((2, vec![]))
        );
        // An older agent's assignments (state only) go to Redis first.
        assert_eq!(
            assign_redis_index("b", &map(&[]), &map(&[("a", 1), ("b", 2)])),
            Ok((2, vec![("a".into(), 1), ("b".into(), 2)]))
        );
        // New: the lowest index nobody holds (removed services keep theirs).
        assert_eq!(
            assign_redis_index("c", &map(&[("a", 1)]), &map(&[("gone", 2)])),
            Ok((3, vec![("gone".into(), 2), ("c".into(), 3)]))
        );
        // The state's copy disagrees with Redis: Redis wins, the clash is not written.
        assert_eq!(
            assign_redis_index("c", &map(&[("a", 1)]), &map(&[("x", 1)])),
            Ok((2, vec![("c".into(), 2)]))
        );
        let full: BTreeMap<String, u32> = (1..=15).map(|i| (format!("s{i}"), i)).collect();
        assert!(
            assign_redis_index("new", &full, &map(&[]))
                .unwrap_err()
                .contains("taken")
        );
    }

    #[test]
    fn the_index_hash_is_read_strictly() {
        use crate::resp::Reply;
        let bulk = |s: &str| Reply::Bulk(Some(s.as_bytes().to_vec()));
        assert_eq!(
            parse_index_hash(Reply::Array(Some(vec![bulk("a"), bulk("3")]))),
            Ok([("a".to_owned(), 3)].into())
        );
        for bad in [
            vec![bulk("a"), bulk("0")],
            vec![bulk("a"), bulk("16")],
            vec![bulk("a")],
            vec![bulk("a"), bulk("x")],
        ] {
            assert!(
                parse_index_hash(Reply::Array(Some(bad.clone()))).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn env_file_values_are_quoted() {
        assert_eq!(
            env_file_quote(r#"a"b$c`d\e"#).unwrap(),
            r#""a\"b\$c\`d\\e""#
        );
        assert!(env_file_quote("a\nb").is_err());
    }
}
