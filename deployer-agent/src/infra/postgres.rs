//! PostgreSQL: the server binaries, and each `database: true` service's role and database
//! (created only by deployer, marked as its own, never someone else's).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::daemon::run;
use super::{AppLayer, Endpoint, err};
use crate::AgentError;
use crate::secrets::Refusal;
use deploy_manifest::model::{Dialect, PostgresConfig};

/// Where Debian installs PostgreSQL: `<major>/bin/` for each installed major version.
const PG_ROOT: &str = "/usr/lib/postgresql";

/// The newest PostgreSQL server binaries on this host (Debian layout), or `$DEPLOYER_PG_BIN`.
/// For the client tools (`psql`, `pg_isready`), and `initdb` of a new cluster.
pub fn pg_bin() -> Result<PathBuf, AgentError> {
    bin_override().map_or_else(|| server_bin(Path::new(PG_ROOT), None, None), Ok)
}

/// The server binaries for the cluster in `data`: the major version its `initdb` ran
/// (`PG_VERSION`), since a server refuses another major's data directory; for a new cluster,
/// `version` (the preset's `config.version`) or else the newest. `$DEPLOYER_PG_BIN` overrides
/// all of it.
pub fn cluster_bin(data: &Path, version: Option<&str>) -> Result<PathBuf, AgentError> {
    let wanted = version
        .map(|v| {
            v.parse::<u32>()
                .map_err(|_| err("postgres", format!("version {v:?} is not a major version")))
        })
        .transpose()?;
    bin_override().map_or_else(|| server_bin(Path::new(PG_ROOT), Some(data), wanted), Ok)
}

fn bin_override() -> Option<PathBuf> {
    std::env::var_os("DEPLOYER_PG_BIN").map(PathBuf::from)
}

fn server_bin(
    root: &Path,
    data: Option<&Path>,
    wanted: Option<u32>,
) -> Result<PathBuf, AgentError> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
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
    let found = match data.map(cluster_major).transpose() {
        Ok(major) => major.flatten(),
        Err(e) => return Err(err("postgres", e)),
    };
    if let (Some(found), Some(wanted)) = (found, wanted)
        && found != wanted
    {
        return Err(err(
            "postgres",
            format!(
                "the cluster's data is PostgreSQL {found} and the preset's config asks for {wanted}; upgrade the cluster (pg_upgrade) to {wanted} first, or set \"version\": \"{found}\""
            ),
        ));
    }
    let major = found.or(wanted);
    match major {
        Some(major) => versions
            .into_iter()
            .find(|(v, _)| *v == major)
            .map(|(_, b)| b)
            .ok_or_else(|| {
                err(
                    "postgres",
                    format!(
                        "PostgreSQL {major} is wanted (the cluster's data, or the preset's config.version) and {}/{major}/bin/postgres is not installed; install it (apt-get install postgresql-{major}), or upgrade the cluster to an installed one (pg_upgrade) first",
                        root.display()
                    ),
                )
            }),
        None => versions.pop().map(|(_, b)| b).ok_or_else(|| {
            err(
                "postgres",
                format!(
                    "no PostgreSQL server found in {}/*/bin; install it (apt-get install postgresql) or set DEPLOYER_PG_BIN",
                    root.display()
                ),
            )
        }),
    }
}

/// The major version in `<data>/PG_VERSION`; `None` for a new cluster (no file yet). The
/// data directory belongs to the `postgres` account, so the file is opened without following
/// a symlink or blocking on a FIFO, must be a regular file, and only its first bytes are
/// read; what it holds is repeated only if it is a version number.
fn cluster_major(data: &Path) -> Result<Option<u32>, String> {
    use std::io::Read;
    let path = data.join("PG_VERSION");
    let not_a_version = || {
        format!(
            "{} is not a regular file holding a PostgreSQL major version; the cluster's data directory was changed by someone else: check it",
            path.display()
        )
    };
    let file = match crate::secrets::open_regular(&path) {
        Ok((file, _)) => file,
        Err(Refusal::Missing) => return Ok(None),
        Err(Refusal::Io(e)) => return Err(format!("{}: {e}", path.display())),
        Err(_) => return Err(not_a_version()),
    };
    let mut text = String::new();
    file.take(16)
        .read_to_string(&mut text)
        .map_err(|_| not_a_version())?;
    text.trim()
        .parse::<u32>()
        .map(Some)
        .map_err(|_| not_a_version())
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
    parse_found(out, "role", "psql")
}

/// What a probe query printed (by `tool`): lines `<account>:<ours|unmarked|superuser>` and
/// `database:<ours|owned|foreign>`, none for what is absent; anything else is an error.
pub(super) fn parse_found(
    out: &str,
    account: &str,
    tool: &str,
) -> Result<(RoleFound, DatabaseFound), String> {
    let (mut role, mut database) = (RoleFound::Absent, DatabaseFound::Absent);
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let unexpected = || format!("unexpected answer from {tool}: {line:?}");
        let (what, found) = line.split_once(':').ok_or_else(unexpected)?;
        match (what == account, what, found) {
            (true, _, "ours") => role = RoleFound::Ours,
            (true, _, "unmarked") => role = RoleFound::Unmarked,
            (true, _, "superuser") => role = RoleFound::Superuser,
            (false, "database", "ours") => database = DatabaseFound::Ours,
            (false, "database", "owned") => database = DatabaseFound::OwnedByRole,
            (false, "database", "foreign") => database = DatabaseFound::Foreign,
            _ => return Err(unexpected()),
        }
    }
    Ok((role, database))
}

/// The schema a service's extensions go into, in its database: the administrator's, the
/// service may use it and not create in it.
pub const EXTENSION_SCHEMA: &str = "deployer_extensions";

/// The statements that create `extensions` in `service`'s database, run there as the
/// administrator. Not into `public`, which the service owns: an extension's install script
/// runs as superuser, and objects the service planted where the script looks would run
/// with it. They go into [`EXTENSION_SCHEMA`], the administrator's (refused if someone
/// else made a schema of that name), which the service's role has on its `search_path`.
fn extensions_sql(service: &str, extensions: &[String]) -> String {
    let (s, q) = (sql_ident(EXTENSION_SCHEMA), sql_ident(service));
    let mut sql = format!(
        "CREATE SCHEMA IF NOT EXISTS {s} AUTHORIZATION CURRENT_USER;\n\
         DO $$ BEGIN IF (SELECT nspowner FROM pg_namespace WHERE nspname = {name}) <> (SELECT oid FROM pg_roles WHERE rolname = current_user) THEN RAISE EXCEPTION 'schema {EXTENSION_SCHEMA} is not the administrator''s (someone else made it): drop it'; END IF; END $$;\n\
         REVOKE ALL ON SCHEMA {s} FROM PUBLIC;\n\
         GRANT USAGE ON SCHEMA {s} TO {q};\n\
         ALTER ROLE {q} IN DATABASE {q} SET search_path = \"$user\", public, {s};\n",
        name = sql_literal(EXTENSION_SCHEMA)
    );
    for x in extensions {
        sql.push_str(&format!(
            "CREATE EXTENSION IF NOT EXISTS {} SCHEMA {s};\n",
            sql_ident(x)
        ));
    }
    sql
}

/// The statements that carry out `plan`, run at every deploy. A new role gets its mark
/// and its `password` (the only statement that carries one) in the same transaction, so a
/// crash never leaves an unmarked role of ours, or one without its password. The database
/// is closed to every other role (PostgreSQL lets `PUBLIC` connect), also one made by an
/// earlier agent, or left open by a run killed after it was made.
fn plan_sql(service: &str, plan: &DatabasePlan, password: Option<&str>) -> String {
    let (q, m) = (sql_ident(service), sql_literal(&ownership_mark(service)));
    let mut sql = String::new();
    if plan.create_role {
        let with = password
            .map(|p| format!(" PASSWORD {}", sql_literal(p)))
            .unwrap_or_default();
        sql.push_str(&format!(
            "BEGIN;\nCREATE ROLE {q} LOGIN{with};\nCOMMENT ON ROLE {q} IS {m};\nCOMMIT;\n"
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
    sql.push_str(&format!("REVOKE ALL ON DATABASE {q} FROM PUBLIC;\n"));
    sql
}

impl AppLayer<'_> {
    /// The databases the preset's `config.databases` names, made if absent (owned by the
    /// administrator, marked `deployer:preset`); one of that name made by someone else is
    /// left as it is: it exists, as asked.
    fn preset_databases(
        &self,
        ep: &Endpoint,
        infra_name: &str,
        config: &PostgresConfig,
    ) -> Result<(), AgentError> {
        if config.databases.is_empty() {
            return Ok(());
        }
        let what = format!("{infra_name}: config.databases");
        let names: Vec<String> = config.databases.keys().map(|d| sql_literal(d)).collect();
        let found = run(
            &what,
            &mut self.psql(ep, infra_name)?,
            Some(
                format!(
                    "SELECT datname FROM pg_database WHERE datname IN ({});\n",
                    names.join(", ")
                )
                .as_bytes(),
            ),
        )?;
        let found: std::collections::BTreeSet<&str> = found.lines().map(str::trim).collect();
        let sql: String = config
            .databases
            .keys()
            .filter(|d| !found.contains(d.as_str()))
            .map(|d| {
                format!(
                    "CREATE DATABASE {q};\nCOMMENT ON DATABASE {q} IS 'deployer:preset';\n",
                    q = sql_ident(d)
                )
            })
            .collect();
        if !sql.is_empty() {
            tracing::info!(
                infra = infra_name,
                "creating the databases its config names"
            );
            run(&what, &mut self.psql(ep, infra_name)?, Some(sql.as_bytes()))?;
        }
        Ok(())
    }

    /// psql connected as the cluster's administrator to the `postgres` database: peer
    /// authentication over the preset's socket, or, for an external server, the admin
    /// credentials in `<secrets>/infra-<name>.env` (checked like every secret file; no
    /// service can name that file).
    fn psql(&self, ep: &Endpoint, infra_name: &str) -> Result<Command, AgentError> {
        self.psql_in(ep, infra_name, "postgres")
    }

    /// [`Self::psql`] connected to `database`.
    fn psql_in(
        &self,
        ep: &Endpoint,
        infra_name: &str,
        database: &str,
    ) -> Result<Command, AgentError> {
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
                let (_, admin) = self.admin_credentials(infra_name, "PGUSER=… and PGPASSWORD=…")?;
                let mut c = Command::new("psql");
                for (k, v) in admin.iter().filter(|(k, _)| k.starts_with("PG")) {
                    c.env(k, v);
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
            database,
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
        config: &PostgresConfig,
    ) -> Result<String, AgentError> {
        let what = format!("{service}: database");
        if let Some(why) = deploy_manifest::validate::reserved_database_name(
            service,
            deploy_manifest::model::Dialect::Postgres,
        ) {
            return Err(err(
                &what,
                format!(
                    "a service named {service:?} cannot have a database: {why}; rename the service"
                ),
            ));
        }
        let kept = self.kept_password(service, Dialect::Postgres)?;
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
        }
        // A password is sent only to a role known to be ours: one created now, in the
        // transaction that creates it (the kept one, if this host has one: a new server for
        // an old service), or one whose password file was lost.
        let (password, fresh) = match kept {
            Some(p) if !plan.create_role => (p, false),
            kept => (kept.map_or_else(super::app::new_password, Ok)?, true),
        };
        let sql = plan_sql(
            service,
            &plan,
            plan.create_role.then_some(password.as_str()),
        );
        run(&what, &mut self.psql(ep, infra_name)?, Some(sql.as_bytes()))
            .map_err(|e| super::app::redact(e, &password))?;
        if fresh && !plan.create_role {
            let sql = format!(
                "ALTER ROLE {} PASSWORD {};\n",
                sql_ident(service),
                sql_literal(&password)
            );
            run(&what, &mut self.psql(ep, infra_name)?, Some(sql.as_bytes()))
                .map_err(|e| super::app::redact(e, &password))?;
        }
        if fresh {
            self.keep_password(service, Dialect::Postgres, &password)?;
        }
        self.preset_databases(ep, infra_name, config)?;
        if !config.extensions.is_empty() {
            run(
                &what,
                &mut self.psql_in(ep, infra_name, service)?,
                Some(extensions_sql(service, &config.extensions).as_bytes()),
            )
            .map_err(|e| {
                err(
                    &what,
                    format!(
                        "creating the extensions {:?} of {infra_name}'s config: {e}; install the server's extension packages (postgresql-contrib) or remove them from the config",
                        config.extensions
                    ),
                )
            })?;
        }
        Ok(format!(
            "postgres://{service}:{password}@{}:{}/{service}",
            ep.host,
            ep.port().unwrap_or(5432)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // No statement of a plan carries anything but names and the mark, but a new role's
        // password, in the transaction that creates it.
        let sql = plan_sql("app", &all, None);
        assert!(sql.contains("CREATE ROLE \"app\" LOGIN;"), "{sql}");
        assert!(
            sql.contains("REVOKE ALL ON DATABASE \"app\" FROM PUBLIC;"),
            "{sql}"
        );
        assert!(!sql.to_ascii_uppercase().contains("PASSWORD"), "{sql}");
        assert!(
            sql.contains("COMMENT ON DATABASE \"app\" IS 'deployer:app'"),
            "{sql}"
        );
        let sql = plan_sql("app", &all, Some("pw"));
        assert!(
            sql.contains("BEGIN;\nCREATE ROLE \"app\" LOGIN PASSWORD 'pw';\nCOMMENT ON ROLE"),
            "{sql}"
        );
        // Nothing to create: the database is still closed to other roles, every time.
        assert_eq!(
            plan_sql("app", &DatabasePlan::default(), None),
            "REVOKE ALL ON DATABASE \"app\" FROM PUBLIC;\n"
        );
    }

    #[test]
    fn extensions_go_into_the_administrators_schema() {
        let sql = extensions_sql("app", &["pgcrypto".into()]);
        assert!(
            sql.contains(
                "CREATE EXTENSION IF NOT EXISTS \"pgcrypto\" SCHEMA \"deployer_extensions\";"
            ),
            "{sql}"
        );
        assert!(sql.contains("AUTHORIZATION CURRENT_USER"), "{sql}");
        assert!(
            sql.contains("GRANT USAGE ON SCHEMA \"deployer_extensions\" TO \"app\""),
            "{sql}"
        );
        assert!(!sql.contains("GRANT CREATE"), "{sql}");
        assert!(sql.contains("is not the administrator"), "{sql}");
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

    /// A cluster keeps the major version that made it: a newer install does not move it.
    #[test]
    fn a_cluster_runs_on_the_major_version_that_made_it() {
        let root = tempfile::tempdir().unwrap();
        for v in ["14", "15", "not-a-version"] {
            std::fs::create_dir_all(root.path().join(v).join("bin")).unwrap();
            std::fs::write(root.path().join(v).join("bin/postgres"), "").unwrap();
        }
        let bin = |v: &str| root.path().join(v).join("bin");
        let data = tempfile::tempdir().unwrap();
        let server = |data| server_bin(root.path(), data, None).map_err(|e| e.to_string());
        let wanting = |data, v| server_bin(root.path(), data, Some(v)).map_err(|e| e.to_string());
        assert_eq!(server(None).unwrap(), bin("15"), "the newest for the tools");
        assert_eq!(
            server(Some(data.path())).unwrap(),
            bin("15"),
            "a new cluster"
        );
        // config.version picks a new cluster's major, or says it is missing.
        assert_eq!(wanting(Some(data.path()), 14).unwrap(), bin("14"));
        let e = wanting(Some(data.path()), 16).unwrap_err();
        assert!(
            e.contains("PostgreSQL 16") && e.contains("postgresql-16"),
            "{e}"
        );
        std::fs::write(data.path().join("PG_VERSION"), "14\n").unwrap();
        assert_eq!(server(Some(data.path())).unwrap(), bin("14"));
        assert_eq!(wanting(Some(data.path()), 14).unwrap(), bin("14"));
        // A cluster is never run by another major than its own, whatever the config says.
        let e = wanting(Some(data.path()), 15).unwrap_err();
        assert!(
            e.contains("PostgreSQL 14") && e.contains("asks for 15") && e.contains("pg_upgrade"),
            "{e}"
        );
        std::fs::write(data.path().join("PG_VERSION"), "13\n").unwrap();
        let e = server(Some(data.path())).unwrap_err();
        assert!(
            e.contains("PostgreSQL 13") && e.contains("postgresql-13"),
            "{e}"
        );
        // The data directory is the postgres account's: what it plants there is not read
        // through, and never repeated.
        let version = data.path().join("PG_VERSION");
        let secret = data.path().join("secret");
        std::fs::write(&secret, "root:$6$hash:19000:0:99999:7:::\n").unwrap();
        std::fs::remove_file(&version).unwrap();
        std::os::unix::fs::symlink(&secret, &version).unwrap();
        let e = server(Some(data.path())).unwrap_err();
        assert!(
            e.contains("not a regular file") && !e.contains("hash"),
            "{e}"
        );
        std::fs::remove_file(&version).unwrap();
        std::fs::copy(&secret, &version).unwrap();
        let e = server(Some(data.path())).unwrap_err();
        assert!(!e.contains("hash"), "{e}");
        std::fs::remove_file(&version).unwrap();
        let fifo = std::ffi::CString::new(version.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let e = server(Some(data.path())).unwrap_err();
        assert!(
            e.contains("not a regular file"),
            "a FIFO does not block: {e}"
        );
    }
}
