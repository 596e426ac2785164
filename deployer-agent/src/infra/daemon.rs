//! A provisioned infrastructure daemon (`deployer-infra-<name>.service`): its command, its
//! unit file, and its data directory under `<state>/infra/<name>`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use deploy_manifest::model::{InfraService, Preset};

use super::postgres::cluster_bin;
use super::{Endpoint, endpoint, err};
use crate::AgentError;

pub(super) fn run(
    what: &str,
    cmd: &mut Command,
    stdin: Option<&[u8]>,
) -> Result<String, AgentError> {
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

/// The system account a preset runs as (its unit's `User=` and `Group=`, the owner of its
/// data), as its Debian or NixOS package makes it.
fn preset_account(preset: Option<Preset>) -> Option<&'static str> {
    match preset {
        Some(Preset::Postgres) => Some("postgres"),
        Some(Preset::Redis) => Some("redis"),
        Some(Preset::Mysql) => Some("mysql"),
        // No distribution packages Garage with an account: root, sandboxed.
        Some(Preset::Garage) | None => None,
    }
}

/// The command a custom service runs on a host in `mode`: its variant for that mode, or,
/// on a host without a mode, `command`. A mode no variant names is an error (never another
/// mode's command: a testnet node must not start on mainnet).
fn variant(name: &str, spec: &InfraService, mode: Option<&str>) -> Result<Vec<String>, AgentError> {
    let known = || spec.variants.keys().cloned().collect::<Vec<_>>().join(", ");
    match mode {
        Some(m) if !spec.variants.is_empty() => spec
            .variants
            .get(m)
            .map(|v| v.command.clone())
            .ok_or_else(|| {
                err(
                    name,
                    format!(
                        "this host's mode is {m:?} and the service has no variant for it (it has: {}); add one, or run the host in one of those modes (--mode)",
                        known()
                    ),
                )
            }),
        _ => spec.command.clone().ok_or_else(|| match spec.variants.is_empty() {
            true => err(
                name,
                "a custom infrastructure service needs \"command\" (or \"external\")",
            ),
            false => err(
                name,
                format!(
                    "it has command variants ({}) and no \"command\" for a host without a mode; give this host one (--mode)",
                    known()
                ),
            ),
        }),
    }
}

/// The PostgreSQL major version a postgres preset's config asks for.
fn version(spec: &InfraService) -> Result<Option<String>, AgentError> {
    let config = spec.postgres_config().map_err(|e| err("postgres", e))?;
    Ok(config.version)
}

/// `redis-server` options from a redis preset's config (checked by validation).
fn redis_options(spec: &InfraService) -> Result<Vec<String>, AgentError> {
    let config = spec.redis_config().map_err(|e| err("redis", e))?;
    let mut out = Vec::new();
    if let Some(m) = config.maxmemory {
        out.extend(["--maxmemory".to_owned(), m]);
    }
    if let Some(p) = config.maxmemory_policy {
        out.extend(["--maxmemory-policy".to_owned(), p]);
    }
    Ok(out)
}

/// The config file of a password-protected Redis: it holds the password, so it is the
/// server's account's alone (0600), in its directory, never on a command line.
fn redis_conf(root: &Path) -> PathBuf {
    root.join("redis.conf")
}

/// `lchown` everything under `dir` (never following a symlink).
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        if entry.file_type()?.is_dir() {
            chown_tree(&path, uid, gid)?;
        }
    }
    Ok(())
}

/// The argv of a provisioned infrastructure service and its data directory. Acts on
/// nothing (it only looks for the PostgreSQL binaries and the cluster's `PG_VERSION`), so a
/// plan can render the unit.
fn command(
    name: &str,
    spec: &InfraService,
    ep: &Endpoint,
    state_dir: &Path,
    system: bool,
    mode: Option<&str>,
) -> Result<(Vec<String>, PathBuf), AgentError> {
    let root = crate::names::infra_dir(state_dir, name);
    let data = root.join("data");
    let port = ep.port().unwrap_or(0).to_string();
    let argv = match spec.preset {
        Some(Preset::Postgres) => vec![
            cluster_bin(&data, version(spec)?.as_deref())?
                .join("postgres")
                .display()
                .to_string(),
            "-D".into(),
            data.display().to_string(),
            "-k".into(),
            root.join("run").display().to_string(),
            "-p".into(),
            port,
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
        ],
        Some(Preset::Redis) => ["/usr/bin/redis-server".to_owned()]
            .into_iter()
            .chain(
                super::redis::password_wanted(spec)
                    .then(|| redis_conf(&root).display().to_string()),
            )
            .chain([
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
            ])
            .chain(redis_options(spec)?)
            .collect(),
        // A user manager runs it as root: the server switches to its account itself.
        Some(Preset::Mysql) => super::mysql::server_argv(
            &root,
            &data,
            ep.port().unwrap_or(0),
            (!system).then_some("mysql"),
        )?,
        Some(Preset::Garage) => super::garage::server_argv(&root)?,
        None => {
            let argv = variant(name, spec, mode)?;
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
/// nothing. On the system manager a preset runs as its own account (`User=`), sandboxed,
/// only its directory writable; on a user manager (which refuses `User=`) as the manager's
/// user, Postgres through `runuser`. A custom daemon runs as its operator wrote it: as root,
/// without a sandbox.
pub fn unit_file(
    name: &str,
    spec: &InfraService,
    config: &crate::config::AgentConfig,
) -> Result<String, AgentError> {
    let ep = endpoint(name, spec);
    let unit = crate::names::infra_unit(name);
    let system = !config.user;
    let (mut argv, data) = command(
        name,
        spec,
        &ep,
        &config.state_dir,
        system,
        config.mode.as_deref(),
    )?;
    let account = preset_account(spec.preset);
    if !system && spec.preset == Some(Preset::Postgres) {
        // initdb and postgres refuse to run as root.
        let runuser = ["/usr/sbin/runuser", "-u", "postgres", "--"];
        argv.splice(0..0, runuser.map(str::to_owned));
    }
    let garage = spec.preset == Some(Preset::Garage);
    let sandbox = (system && (account.is_some() || garage)).then(|| crate::unit::Sandbox {
        state_directory: None,
        writable: vec![crate::names::infra_dir(&config.state_dir, name)],
        hidden: config.hidden_from_services(),
    });
    let account = account.filter(|_| system).map(str::to_owned);
    Ok(crate::unit::UnitSpec {
        description: crate::names::infra_description(name),
        exec_start: argv,
        working_directory: Some(data),
        user: account.clone(),
        group: account,
        dynamic_user: false,
        environment: match spec.preset {
            Some(Preset::Garage) => super::garage::unit_environment(spec),
            _ => Default::default(),
        },
        environment_files: Vec::new(),
        log_file: config
            .user
            .then(|| crate::names::log_file(&config.state_dir.join("logs"), &unit)),
        sandbox,
        limits: Default::default(),
        oneshot: false,
        start_timeout: None,
    }
    .render()?)
}

/// Prepare the data directory of a provisioned infrastructure service before it starts:
/// owned by the preset's account where it runs as that account (Postgres and MariaDB
/// always, Redis on the system manager), initdb or mariadb-install-db on the first start,
/// a password-protected Redis's password (kept in the secrets directory) and config file.
/// Idempotent.
pub fn prepare(
    name: &str,
    spec: &InfraService,
    state_dir: &Path,
    secrets_dir: &Path,
    owner_uid: u32,
    system: bool,
) -> Result<(), AgentError> {
    let root = crate::names::infra_dir(state_dir, name);
    let data = root.join("data");
    let mkdir = |p: &Path, mode: u32| -> Result<(), AgentError> {
        std::fs::create_dir_all(p).map_err(|e| err(name, format!("{}: {e}", p.display())))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| err(name, format!("{}: {e}", p.display())))
    };
    mkdir(&root, 0o755)?;
    mkdir(&data, 0o700)?;
    if spec.preset == Some(Preset::Garage) {
        return super::garage::prepare(name, spec, &root, (secrets_dir, owner_uid));
    }
    let postgres = spec.preset == Some(Preset::Postgres);
    let mysql = spec.preset == Some(Preset::Mysql);
    let redis_password = spec.preset == Some(Preset::Redis) && super::redis::password_wanted(spec);
    let owner = preset_account(spec.preset).filter(|_| system || postgres || mysql);
    if redis_password {
        write_redis_conf(name, &root, (secrets_dir, owner_uid), owner)?;
    }
    let Some(owner) = owner else {
        return Ok(());
    };
    let run_dir = root.join("run");
    let (uid, gid) = crate::accounts::user(owner).ok_or_else(|| {
        err(
            name,
            format!(
                "no `{owner}` system account; install the server package ({})",
                if owner == "postgres" {
                    "postgresql"
                } else {
                    "redis-server"
                }
            ),
        )
    })?;
    use std::os::unix::fs::MetadataExt;
    let chown = |p: &Path| {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid))
            .map_err(|e| err(name, format!("chown {}: {e}", p.display())))
    };
    // Data a root-run Redis wrote (before presets ran as their account) is handed over
    // once, while only root has written in it; after that the account owns what it writes.
    let handed_over = std::fs::symlink_metadata(&data).is_ok_and(|m| m.uid() == uid);
    if !handed_over && !postgres {
        chown_tree(&data, uid, gid).map_err(|e| err(name, format!("handing over data: {e}")))?;
    }
    chown(&data)?;
    if mysql {
        mkdir(&run_dir, 0o755)?;
        chown(&run_dir)?;
        return super::mysql::install(name, &root, &data, owner);
    }
    if !postgres {
        return Ok(());
    }
    mkdir(&run_dir, 0o755)?;
    chown(&run_dir)?;
    let bin = cluster_bin(&data, version(spec)?.as_deref())?;
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

/// The password of a password-protected Redis (made once, kept in
/// `<secrets>/deployer/infra-<name>.redis-password`, mode 600) and the config file that
/// makes the server require it (rewritten when it differs), the server account's alone.
fn write_redis_conf(
    name: &str,
    root: &Path,
    (secrets_dir, owner_uid): (&Path, u32),
    owner: Option<&str>,
) -> Result<(), AgentError> {
    let path = super::redis_password_path(secrets_dir, name);
    let conf = redis_conf(root);
    // The password file lost: the running server's is in its config file (root's to
    // read), and is kept, so that the server and its clients keep agreeing.
    let in_conf = || {
        let text = std::fs::read_to_string(&conf).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("requirepass \""))
            .and_then(|p| p.strip_suffix('"'))
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned)
    };
    let password = match super::app::read_password(&path, owner_uid)? {
        Some(p) => p,
        None => {
            let p = in_conf().map_or_else(super::app::new_password, Ok)?;
            super::app::keep_generated(&path, &p, name)?;
            p
        }
    };
    let text = format!("# Written by deployer-agent.\nrequirepass \"{password}\"\n");
    super::app::write_if_changed(&conf, &text, name)?;
    if let Some(owner) = owner {
        let (uid, gid) = crate::accounts::user(owner)
            .ok_or_else(|| err(name, format!("no `{owner}` system account")))?;
        std::os::unix::fs::lchown(&conf, Some(uid), Some(gid))
            .map_err(|e| err(name, format!("chown {}: {e}", conf.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Redis password file moved aside (or lost): the password the running server has,
    /// in its config file, is taken back, never a new one the server would refuse.
    #[test]
    fn a_lost_redis_password_is_taken_back_from_the_servers_config() {
        let dir = tempfile::tempdir().unwrap();
        let (root, secrets) = (dir.path().join("infra/c"), dir.path().join("secrets"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&secrets).unwrap();
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).unwrap());
        write_redis_conf("c", &root, (&secrets, uid), None).unwrap();
        let path = super::super::redis_password_path(&secrets, "c");
        let first = std::fs::read_to_string(&path).unwrap();
        let conf = std::fs::read_to_string(redis_conf(&root)).unwrap();
        assert!(conf.contains(&format!("requirepass \"{first}\"")), "{conf}");
        std::fs::rename(&path, dir.path().join("aside")).unwrap();
        write_redis_conf("c", &root, (&secrets, uid), None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        assert_eq!(std::fs::read_to_string(redis_conf(&root)).unwrap(), conf);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
