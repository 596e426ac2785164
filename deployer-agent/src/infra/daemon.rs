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

/// uid and gid of a system account.
fn account(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

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

/// The argv of a provisioned infrastructure service and its data directory. Acts on
/// nothing (it only looks for the PostgreSQL binaries and the cluster's `PG_VERSION`), so a
/// plan can render the unit.
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
            cluster_bin(&data)?.join("postgres").display().to_string(),
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
    let bin = cluster_bin(&data)?;
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
