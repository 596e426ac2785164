//! The `mysql` preset (MariaDB) and each `database: {"dialect": "mysql"}` service's user and
//! database: created only by deployer, recorded as its own in the server itself
//! (`deployer.owned`), never someone else's.
//!
//! MySQL has no comments on users, so ownership is a row per user and database in the
//! table `deployer.owned`, written before the object is created (a crash in between leaves
//! a row for something absent, which the next run creates) and readable only by the
//! server's administrator.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::daemon::run;
use super::postgres::{DatabaseFound, RoleFound};
use super::{AppLayer, Endpoint, err};
use crate::AgentError;

/// Where the MariaDB binaries are looked for: `$DEPLOYER_MYSQL_BIN`, else Debian's and
/// NixOS's places.
fn bin_dirs() -> Vec<PathBuf> {
    match std::env::var_os("DEPLOYER_MYSQL_BIN") {
        Some(dir) => vec![PathBuf::from(dir)],
        None => ["/usr/sbin", "/usr/bin", "/run/current-system/sw/bin"]
            .map(PathBuf::from)
            .to_vec(),
    }
}

/// The MariaDB program `name` (`mariadbd`, `mariadb-install-db`, `mariadb`).
pub fn tool(name: &str) -> Result<PathBuf, AgentError> {
    let dirs = bin_dirs();
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            err(
                "mysql",
                format!(
                    "{name} not found in {}; install MariaDB (apt-get install mariadb-server, or pkgs.mariadb) or set DEPLOYER_MYSQL_BIN",
                    dirs.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}

/// The server's socket in the preset's run directory.
pub fn socket(root: &Path) -> PathBuf {
    root.join("run").join("mysqld.sock")
}

/// The argv of the preset's server: no option file read (`--no-defaults`: only what is
/// here counts), loopback only, its socket and pid file in `<root>/run`. `as_user`: the
/// account the server switches to when started as root (a user manager runs it as root).
pub fn server_argv(
    root: &Path,
    data: &Path,
    port: u16,
    as_user: Option<&str>,
) -> Result<Vec<String>, AgentError> {
    let run = root.join("run");
    // A Unix socket's path holds at most 107 bytes.
    let sock = socket(root);
    if sock.as_os_str().len() > 107 {
        return Err(err(
            "mysql",
            format!(
                "its socket {} would be longer than a Unix socket path can be (107 bytes); use a shorter --state-dir or service name",
                sock.display()
            ),
        ));
    }
    let mut argv = vec![
        tool("mariadbd")?.display().to_string(),
        "--no-defaults".into(),
        format!("--datadir={}", data.display()),
        format!("--socket={}", socket(root).display()),
        format!("--pid-file={}", run.join("mysqld.pid").display()),
        format!("--port={port}"),
        "--bind-address=127.0.0.1".into(),
        "--skip-name-resolve".into(),
    ];
    argv.extend(as_user.map(|u| format!("--user={u}")));
    Ok(argv)
}

/// Make the system tables of a new server in `data` (owned by `account`): into a directory
/// beside it, renamed into place only when complete, so a run killed halfway leaves no
/// half-made server. Nothing to do when `data` holds them already. The administrator is
/// `root@localhost` by socket only (no password exists to leak); no test database.
pub fn install(name: &str, root: &Path, data: &Path, account: &str) -> Result<(), AgentError> {
    if data.join("mysql").is_dir() {
        return Ok(());
    }
    let fresh = root.join("data.new");
    let _ = std::fs::remove_dir_all(&fresh);
    tracing::info!(
        infra = name,
        "initialising the server's system tables (mariadb-install-db)"
    );
    run(
        name,
        Command::new(tool("mariadb-install-db")?)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", fresh.display()))
            .arg(format!("--user={account}"))
            .args(["--auth-root-authentication-method=socket", "--skip-test-db"]),
        None,
    )?;
    // The empty directory made before, if any, gives way; one with content is not ours to
    // replace.
    if data.exists() {
        std::fs::remove_dir(data).map_err(|e| {
            err(
                name,
                format!(
                    "{} holds files but no system tables (mysql/): {e}; move it aside and the next run makes a new server",
                    data.display()
                ),
            )
        })?;
    }
    std::fs::rename(&fresh, data).map_err(|e| err(name, format!("{}: {e}", data.display())))
}

/// A MySQL string literal (quote and backslash escaped).
fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A MySQL identifier.
fn sql_ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// A database name as a `GRANT … ON <db>.*` pattern: there `_` and `%` are wildcards
/// (`my_app` would also match `my-app`'s database, and `deploye_` the agent's own
/// `deployer`), so they are escaped to stand for themselves.
fn grant_db(s: &str) -> String {
    sql_ident(
        &s.replace('\\', "\\\\")
            .replace('_', "\\_")
            .replace('%', "\\%"),
    )
}

/// The account of a service: every host (`%`), so that an external server is reached
/// from this host too.
fn account(service: &str) -> String {
    format!("{}@'%'", sql_literal(service))
}

/// What to do in the server for one service (none of it carries the password).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MysqlPlan {
    /// Record the user as ours, then create it (locked until it has a password).
    pub create_user: bool,
    /// Record the database as ours, then create it.
    pub create_database: bool,
}

/// Decide what may be done for `service`, given what the server holds under its name: a
/// user or database deployer did not record is never touched (`Err` says why and what the
/// operator can do), nor a user with global privileges.
pub fn plan_mysql(
    service: &str,
    user: RoleFound,
    database: DatabaseFound,
) -> Result<MysqlPlan, String> {
    let adopt = |kind: &str| {
        format!(
            "INSERT INTO deployer.owned VALUES ({}, {})",
            sql_literal(kind),
            sql_literal(service)
        )
    };
    match user {
        RoleFound::Superuser => {
            return Err(format!(
                "user {service:?} exists with global privileges (on every database, or to manage the server); the agent never hands such a user to a service or changes its password; rename the service"
            ));
        }
        RoleFound::Unmarked => {
            return Err(format!(
                "user {service:?} exists and was not created by deployer (not in deployer.owned); the agent leaves it alone. Rename the service, or drop the user, or adopt it yourself (the agent then gives it a new password): {}",
                adopt("user")
            ));
        }
        _ => {}
    }
    if matches!(
        database,
        DatabaseFound::Foreign | DatabaseFound::OwnedByRole
    ) {
        return Err(format!(
            "database {service:?} exists and was not created by deployer (not in deployer.owned); the agent leaves it alone. Rename the service, or drop the database, or adopt it yourself: {}",
            adopt("database")
        ));
    }
    Ok(MysqlPlan {
        create_user: user == RoleFound::Absent,
        create_database: database == DatabaseFound::Absent,
    })
}

/// True for an account with any privilege at the global level (on every database, or over
/// the server itself): the privilege columns MariaDB's and MySQL's `mysql.user` share.
const GLOBAL_PRIVILEGE: &str = "GREATEST(Select_priv, Insert_priv, Update_priv, Delete_priv, Create_priv, Drop_priv, Reload_priv, Shutdown_priv, Process_priv, File_priv, Grant_priv, References_priv, Index_priv, Alter_priv, Show_db_priv, Super_priv, Create_tmp_table_priv, Lock_tables_priv, Execute_priv, Repl_slave_priv, Repl_client_priv, Create_view_priv, Show_view_priv, Create_routine_priv, Alter_routine_priv, Create_user_priv, Event_priv, Trigger_priv) = 'Y'";

/// Where ownership is recorded; made if missing.
const OWNED_TABLE: &str = "CREATE DATABASE IF NOT EXISTS deployer;\n\
     CREATE TABLE IF NOT EXISTS deployer.owned (kind VARCHAR(16) NOT NULL, name VARCHAR(128) NOT NULL, PRIMARY KEY (kind, name));\n";

/// The query that tells what the server holds under `service`'s name: lines
/// `user:<ours|unmarked|superuser>` and `database:<ours|foreign>`, none when absent.
fn probe_sql(service: &str) -> String {
    let n = sql_literal(service);
    let ours = |kind: &str| {
        format!("EXISTS (SELECT 1 FROM deployer.owned WHERE kind = '{kind}' AND name = {n})")
    };
    format!(
        "{OWNED_TABLE}\
         SELECT CONCAT('user:', CASE WHEN MAX({GLOBAL_PRIVILEGE}) THEN 'superuser' WHEN {} THEN 'ours' ELSE 'unmarked' END) FROM mysql.user WHERE User = {n} HAVING COUNT(*) > 0;\n\
         SELECT CONCAT('database:', IF({}, 'ours', 'foreign')) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = {n};\n",
        ours("user"),
        ours("database"),
    )
}

fn parse_probe(out: &str) -> Result<(RoleFound, DatabaseFound), String> {
    super::postgres::parse_found(out, "user", "mariadb")
}

/// The statements that carry out `plan` (no password in any of them): each object is
/// recorded as ours before it is made; a new user is locked until it has its password.
fn plan_sql(service: &str, plan: &MysqlPlan) -> String {
    let (n, q, a) = (sql_literal(service), sql_ident(service), account(service));
    let mut sql = String::new();
    if plan.create_user {
        sql.push_str(&format!(
            "INSERT IGNORE INTO deployer.owned VALUES ('user', {n});\nCREATE USER IF NOT EXISTS {a} ACCOUNT LOCK;\n"
        ));
    }
    if plan.create_database {
        sql.push_str(&format!(
            "INSERT IGNORE INTO deployer.owned VALUES ('database', {n});\nCREATE DATABASE IF NOT EXISTS {q};\n"
        ));
    }
    sql
}

impl AppLayer<'_> {
    /// The `mariadb` client as the server's administrator: root by socket for the preset,
    /// or, for an external server, `MYSQL_USER` and `MYSQL_PWD` from
    /// `<secrets>/infra-<name>.env` (checked like every secret file; no service can name
    /// it). Connecting gives up after 10 s, a statement waits 30 s at most for a lock.
    fn mariadb(&self, ep: &Endpoint, infra_name: &str) -> Result<Command, AgentError> {
        let mut cmd = Command::new(tool("mariadb")?);
        cmd.arg("--no-defaults");
        match &ep.unit {
            Some(_) => {
                let root = crate::names::infra_dir(self.state_dir, infra_name);
                cmd.args(["--protocol=socket", "-u", "root"])
                    .arg(format!("--socket={}", socket(&root).display()));
            }
            None => {
                let (_, admin) =
                    self.admin_credentials(infra_name, "MYSQL_USER=… and MYSQL_PWD=…")?;
                for (k, v) in &admin {
                    match k.as_str() {
                        "MYSQL_USER" => {
                            cmd.arg(format!("--user={v}"));
                        }
                        "MYSQL_PWD" => {
                            cmd.env("MYSQL_PWD", v);
                        }
                        _ => {}
                    }
                }
                cmd.args(["--protocol=tcp", "-h", &ep.host])
                    .arg(format!("--port={}", ep.port().unwrap_or(3306)));
            }
        }
        cmd.args([
            "--batch",
            "--skip-column-names",
            "--connect-timeout=10",
            "--init-command=SET SESSION lock_wait_timeout = 30",
        ]);
        Ok(cmd)
    }

    /// Create (idempotently) the user and database named after `service` in `ep`, and only
    /// if deployer created them; the password is sent once, to a user known to be ours,
    /// and kept in `<secrets>/deployer/<service>.mysql-password` only after it was set.
    pub fn mysql_url(
        &self,
        service: &str,
        ep: &Endpoint,
        infra_name: &str,
    ) -> Result<String, AgentError> {
        let what = format!("{service}: database");
        let dialect = deploy_manifest::model::Dialect::Mysql;
        if let Some(why) = deploy_manifest::validate::reserved_database_name(service, dialect) {
            return Err(err(
                &what,
                format!(
                    "a service named {service:?} cannot have a MySQL database: {why}; rename the service"
                ),
            ));
        }
        let kept = self.kept_password(service, dialect)?;
        let found = run(
            &what,
            &mut self.mariadb(ep, infra_name)?,
            Some(probe_sql(service).as_bytes()),
        )?;
        let (user, database) = parse_probe(&found).map_err(|e| err(&what, e))?;
        let plan = plan_mysql(service, user, database)
            .map_err(|e| err(&what, format!("in {infra_name}: {e}")))?;
        if plan != MysqlPlan::default() {
            tracing::info!(?plan, "creating the service's user and database");
            run(
                &what,
                &mut self.mariadb(ep, infra_name)?,
                Some(plan_sql(service, &plan).as_bytes()),
            )?;
        }
        // Both are ours now. Their password, unlock and grant are set at every deploy:
        // idempotent, and what a run killed halfway (or a user dropped and made again by
        // hand) left undone is done.
        let password = kept.map_or_else(super::app::new_password, Ok)?;
        run(
            &what,
            &mut self.mariadb(ep, infra_name)?,
            Some(access_sql(service, &password).as_bytes()),
        )
        .map_err(|e| super::app::redact(e, &password))?;
        self.keep_password(service, dialect, &password)?;
        Ok(format!(
            "mysql://{service}:{password}@{}:{}/{service}",
            ep.host,
            ep.port().unwrap_or(3306)
        ))
    }
}

/// The statements that give `service`'s user (ours) its password and its database (ours),
/// and only that database.
fn access_sql(service: &str, password: &str) -> String {
    let a = account(service);
    format!(
        "ALTER USER {a} IDENTIFIED BY {} ACCOUNT UNLOCK;\nGRANT ALL PRIVILEGES ON {}.* TO {a};\n",
        sql_literal(password),
        grant_db(service)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_` in a database name is a wildcard in a grant: escaped, a service's grant covers
    /// its own database only (`my_app` not `my-app`'s, `deploye_` not `deployer`).
    #[test]
    fn a_grant_names_one_database() {
        assert_eq!(grant_db("my_app"), r"`my\_app`");
        assert_eq!(grant_db("a%b"), r"`a\%b`");
        assert_eq!(grant_db("plain-name"), "`plain-name`");
        let sql = access_sql("deploye_", "p4ss");
        assert!(
            sql.contains(r"GRANT ALL PRIVILEGES ON `deploye\_`.* TO 'deploye_'@'%'"),
            "{sql}"
        );
        assert!(sql.contains("IDENTIFIED BY 'p4ss' ACCOUNT UNLOCK"), "{sql}");
    }

    #[test]
    fn mysql_plans_touch_only_what_deployer_made() {
        use DatabaseFound as D;
        use RoleFound as R;
        let all = MysqlPlan {
            create_user: true,
            create_database: true,
        };
        assert_eq!(plan_mysql("app", R::Absent, D::Absent), Ok(all));
        assert_eq!(
            plan_mysql("app", R::Ours, D::Ours),
            Ok(MysqlPlan::default())
        );
        // Recorded, then a crash before it was made: made now.
        assert_eq!(
            plan_mysql("app", R::Ours, D::Absent),
            Ok(MysqlPlan {
                create_database: true,
                ..Default::default()
            })
        );
        let e = plan_mysql("alice", R::Unmarked, D::Absent).unwrap_err();
        assert!(
            e.contains("user \"alice\" exists and was not created by deployer")
                && e.contains("INSERT INTO deployer.owned VALUES ('user', 'alice')"),
            "{e}"
        );
        for user in [R::Absent, R::Ours] {
            let e = plan_mysql("app", user, D::Foreign).unwrap_err();
            assert!(
                e.contains("database \"app\" exists and was not created"),
                "{e}"
            );
        }
        let e = plan_mysql("app", R::Superuser, D::Absent).unwrap_err();
        assert!(e.contains("global privileges"), "{e}");
        // No statement carries anything but names; a new user is locked until its
        // password is set, and recorded before it exists.
        let sql = plan_sql("app", &all);
        assert!(!sql.to_ascii_uppercase().contains("IDENTIFIED"), "{sql}");
        assert!(
            sql.contains("CREATE USER IF NOT EXISTS 'app'@'%' ACCOUNT LOCK"),
            "{sql}"
        );
        assert!(
            sql.find("INSERT IGNORE INTO deployer.owned VALUES ('user'") < sql.find("CREATE USER"),
            "{sql}"
        );
        assert!(!sql.contains("GRANT"), "granted with the password: {sql}");
    }

    #[test]
    fn probe_answers_parse_and_quoting_holds() {
        assert_eq!(
            parse_probe(""),
            Ok((RoleFound::Absent, DatabaseFound::Absent))
        );
        assert_eq!(
            parse_probe("user:ours\ndatabase:foreign\n"),
            Ok((RoleFound::Ours, DatabaseFound::Foreign))
        );
        assert!(parse_probe("user:what\n").is_err());
        assert!(parse_probe("role:ours\n").is_err(), "MySQL speaks of users");
        assert_eq!(sql_literal(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(sql_ident("a`b"), "`a``b`");
        let probe = probe_sql("app");
        assert!(probe.contains("WHERE User = 'app'"), "{probe}");
        assert!(!probe.to_ascii_uppercase().contains("IDENTIFIED"));
    }
}
