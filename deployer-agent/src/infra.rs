//! Declared infrastructure (seed 001, on systemd): the shared Postgres and Redis presets and
//! custom daemons run as `deployer-infra-<name>.service` with their data under
//! `<state>/infra/<name>`, or point at an `external` server; and the app layer on top:
//! `database: true` (a role and a database per service, its password generated once and kept
//! in the secrets directory), `redis: true` (a Redis DB index per service, never reused), and
//! env templates (`${host}`, `${port:name}`, `${secret:name}`).
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

pub fn infra_unit(name: &str) -> String {
    format!("deployer-infra-{name}.service")
}

fn err(what: &str, detail: impl Into<String>) -> AgentError {
    AgentError::Infra {
        what: what.to_owned(),
        detail: detail.into(),
    }
}

/// The ecosystem services `service` needs: the postgres preset for `database`, the redis
/// preset for `redis`, and what its own requirements depend on.
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
        for req in infra.services.values() {
            out.extend(req.depends_on.iter().cloned());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
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
            Some(infra_unit(name)),
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
            .as_deref()
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(120)),
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

/// The argv of a provisioned infrastructure service, preparing its data directory first
/// (initdb on the first start of a postgres preset).
pub fn prepare(
    name: &str,
    spec: &InfraService,
    ep: &Endpoint,
    state_dir: &Path,
) -> Result<(Vec<String>, PathBuf), AgentError> {
    let root = state_dir.join("infra").join(name);
    let data = root.join("data");
    let mkdir = |p: &Path, mode: u32| -> Result<(), AgentError> {
        std::fs::create_dir_all(p).map_err(|e| err(name, format!("{}: {e}", p.display())))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| err(name, format!("{}: {e}", p.display())))
    };
    let port = ep.port().unwrap_or(0).to_string();
    match spec.preset {
        Some(Preset::Postgres) => {
            let bin = pg_bin()?;
            let run_dir = root.join("run");
            mkdir(&root, 0o755)?;
            mkdir(&data, 0o700)?;
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
            let argv = vec![
                "/usr/sbin/runuser".to_owned(),
                "-u".into(),
                "postgres".into(),
                "--".into(),
                bin.join("postgres").display().to_string(),
                "-D".into(),
                data.display().to_string(),
                "-k".into(),
                run_dir.display().to_string(),
                "-p".into(),
                port,
                "-c".into(),
                "listen_addresses=127.0.0.1".into(),
            ];
            Ok((argv, data))
        }
        Some(Preset::Redis) => {
            mkdir(&root, 0o755)?;
            mkdir(&data, 0o700)?;
            let argv = vec![
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
            ];
            Ok((argv, data))
        }
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
            mkdir(&root, 0o755)?;
            mkdir(&data, 0o700)?;
            Ok((argv, data))
        }
    }
}

/// The connection URL env vars of `service` (`DATABASE_URL`, `REDIS_URL`), creating its
/// role and database, or assigning its Redis index, on the way.
pub struct AppLayer<'a> {
    pub secrets_dir: &'a Path,
    pub state_dir: &'a Path,
}

impl AppLayer<'_> {
    fn generated_dir(&self) -> Result<PathBuf, AgentError> {
        let dir = self.secrets_dir.join("deployer");
        std::fs::create_dir_all(&dir).map_err(|e| err("secrets", e.to_string()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err("secrets", e.to_string()))?;
        Ok(dir)
    }

    /// The service's database password: generated once, kept in the secrets directory.
    fn password(&self, service: &str) -> Result<(String, bool), AgentError> {
        let path = self
            .generated_dir()?
            .join(format!("{service}.postgres-password"));
        if let Ok(p) = std::fs::read_to_string(&path) {
            let p = p.trim().to_owned();
            if !p.is_empty() {
                return Ok((p, false));
            }
        }
        let mut bytes = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .map_err(|e| err(service, format!("reading /dev/urandom: {e}")))?;
        let password = deploy_manifest::hex(&bytes);
        deploy_manifest::fsutil::write_atomically(&path, password.as_bytes(), 0o600)
            .map_err(|e| err(service, format!("{}: {e}", path.display())))?;
        Ok((password, true))
    }

    /// Create (idempotently) the role and database named after `service` in `ep`.
    pub fn database_url(
        &self,
        service: &str,
        ep: &Endpoint,
        infra_name: &str,
    ) -> Result<String, AgentError> {
        let (password, fresh) = self.password(service)?;
        let port = ep.port().unwrap_or(5432);
        let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let mut sql = format!(
            "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', {n}, {p}) WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {n})\\gexec\n",
            n = lit(service),
            p = lit(&password)
        );
        if fresh {
            sql.push_str(&format!(
                "SELECT format('ALTER ROLE %I PASSWORD %L', {n}, {p})\\gexec\n",
                n = lit(service),
                p = lit(&password)
            ));
        }
        sql.push_str(&format!(
            "SELECT format('CREATE DATABASE %I OWNER %I', {n}, {n}) WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {n})\\gexec\n",
            n = lit(service)
        ));
        let mut cmd = match &ep.unit {
            Some(_) => {
                let run_dir = self.state_dir.join("infra").join(infra_name).join("run");
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--", "psql", "-h"])
                    .arg(run_dir)
                    .arg("-p")
                    .arg(port.to_string());
                c
            }
            None => {
                // External: admin credentials (PGUSER, PGPASSWORD, …) from the secrets dir.
                let admin = self.secrets_dir.join(format!("infra-{infra_name}.env"));
                let text = std::fs::read_to_string(&admin).map_err(|e| {
                    err(infra_name, format!("admin credentials {}: {e}; write PGUSER=… and PGPASSWORD=… there (mode 600)", admin.display()))
                })?;
                let mut c = Command::new("psql");
                for line in text.lines() {
                    if let Some((k, v)) = line.split_once('=')
                        && k.starts_with("PG")
                    {
                        c.env(k.trim(), v.trim().trim_matches('"'));
                    }
                }
                c.args(["-h", &ep.host, "-p", &port.to_string()]);
                c
            }
        };
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"]);
        run(
            &format!("{service}: database"),
            &mut cmd,
            Some(sql.as_bytes()),
        )?;
        Ok(format!(
            "postgres://{service}:{password}@{}:{port}/{service}",
            ep.host
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
/// ports (absent for a service's own env); secrets are read from the secrets directory.
pub fn resolve(
    service: &str,
    key: &str,
    value: &str,
    ep: Option<&Endpoint>,
    secrets: &BTreeMap<String, String>,
    secrets_dir: &Path,
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
                let file = secrets
                    .get(name)
                    .cloned()
                    .unwrap_or_else(|| name.to_owned());
                if file.contains('/') || file.starts_with('.') {
                    return Err(format!("secret {name:?} names an unsafe file {file:?}"));
                }
                let path = secrets_dir.join(&file);
                std::fs::read_to_string(&path)
                    .map(|s| s.trim_end_matches('\n').to_owned())
                    .map_err(|e| {
                        format!(
                            "secret {name:?}: {}: {e}; create it (mode 600)",
                            path.display()
                        )
                    })
            }
        }
    };
    expand(value, &mut lookup).map_err(|detail| err(&format!("{service}: env {key}"), detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_resolve_or_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("search_api_key"), "k3y\n").unwrap();
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
        let r = |v: &str| resolve("app", "K", v, Some(&ep), &secrets, dir.path());
        assert_eq!(
            r("http://${host}:${port:http}").unwrap(),
            ("http://127.0.0.1:9200".into(), false)
        );
        assert_eq!(r("${secret:apiKey}").unwrap(), ("k3y".into(), true));
        for bad in ["${port:grpc}", "${nope}", "${secret:missing}", "${host"] {
            let e = r(bad).unwrap_err().to_string();
            assert!(e.contains("app: env K"), "{bad}: {e}");
        }
        assert!(resolve("app", "K", "${host}", None, &secrets, dir.path()).is_err());
        assert!(
            resolve(
                "app",
                "K",
                "${secret:../x}",
                None,
                &[("../x".to_owned(), "../x".to_owned())].into(),
                dir.path()
            )
            .is_err()
        );
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
