//! The agent in its production mode against a real `systemd --system` (issue #15): root, the
//! system bus, units in `/run/systemd/system`, journald, and the default paths
//! (`/var/lib/deployer/state.json`, `/var/lib/deployer-secrets/<service>.env`), with no
//! `--user`, `--state-dir` or `--secrets-dir`.
//!
//! Each test re-runs itself inside a fresh `scripts/systemd-system-sandbox.sh` (systemd as PID
//! 1 of its own namespaces, a private `/run`, copy-on-write `/etc` and `/var` thrown away at
//! the end), and its body runs there; see [`on_system_manager`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use deployer_tests::{OutputExt, eventually, free_port, output_within, repo_root, run_in};
use serde_json::{Value, json};

use crate::agent::{App, body, declare_hello, run_checked};
use crate::fixture::Fixture;
use crate::infra::{build, psql_at};

/// Set inside the sandbox: the test body runs.
const INSIDE: &str = "DEPLOYER_TEST_ON_SYSTEM_MANAGER";

/// Run `test` next to a real system manager. Outside the sandbox, this test re-executes
/// itself (the same test binary, `--exact` its own name) inside a fresh one and asserts it
/// passed there; inside, `test` runs.
fn on_system_manager(test: impl FnOnce()) {
    if std::env::var_os(INSIDE).is_some() {
        return test();
    }
    let name = std::thread::current()
        .name()
        .expect("libtest names a test's thread after the test")
        .to_owned();
    let out = output_within(
        Command::new("bash")
            .arg(repo_root().join("scripts/systemd-system-sandbox.sh"))
            .arg("--")
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--nocapture", "--test-threads=1"])
            .env(INSIDE, "1"),
        Duration::from_secs(300),
        "the system-manager sandbox",
    );
    let stdout = out.stdout_str();
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name}, inside the system-manager sandbox:\n{stdout}\n{}",
        out.stderr_str()
    );
}

/// The agent as the shipped unit runs it: root, the system manager, default paths.
fn agent(fx: &Fixture, args: &[&str]) -> Output {
    let mut all = vec!["--host", "biz"];
    all.extend_from_slice(args);
    deployer_tests::run("deployer-agent", &all, &fx.env, None)
}

fn systemctl(args: &[&str]) -> String {
    let out = Command::new("systemctl").args(args).output().unwrap();
    out.stdout_str().trim().to_owned()
}

fn state() -> Value {
    let bytes = std::fs::read("/var/lib/deployer/state.json").expect("the default state file");
    serde_json::from_slice(&bytes).unwrap()
}

/// What the process of `unit` runs as, and its environment.
fn main_process(unit: &str) -> (String, String) {
    let pid = systemctl(&["show", "-p", "MainPID", "--value", unit]);
    assert_ne!(pid, "0", "{unit} runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    (uid, String::from_utf8_lossy(&environ).replace('\0', "\n"))
}

/// Seed 004's host side, as an operator does it: the secrets file in
/// `/var/lib/deployer-secrets/<service>.env` (600, root); `run --once` (what
/// `systemctl start deployer` runs); `cat /var/lib/deployer/state.json`; the unit in
/// `/run/systemd/system`; the service's output in the journal. Through an upgrade, a broken
/// release rolled back by the health gate, drift repaired, and removal.
#[test]
fn the_production_path_deploys_upgrades_rolls_back_repairs_and_removes() {
    on_system_manager(|| {
        let fx = Fixture::file();
        let app = App::new();
        let port = free_port();
        declare_hello(&fx, port);
        let secrets = Path::new("/var/lib/deployer-secrets");
        std::fs::create_dir_all(secrets).unwrap();
        std::fs::set_permissions(secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
        let env_file = secrets.join("hello.env");
        std::fs::write(&env_file, "HELLO_TOKEN=s3cr3t-token\n").unwrap();
        std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).unwrap();

        app.set_version("v1", false);
        app.push(&fx);
        let out = run_checked(|args| agent(&fx, args));
        assert!(out.status.success(), "{}", out.stderr_str());
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
        let unit = "deployer-hello.service";
        let unit_file = std::fs::read_to_string(Path::new("/run/systemd/system").join(unit))
            .expect("the unit in /run/systemd/system");
        assert!(
            unit_file.contains("EnvironmentFile=-/var/lib/deployer-secrets/hello.env"),
            "{unit_file}"
        );
        assert!(unit_file.contains("ProtectSystem=strict"), "{unit_file}");
        let (uid, environ) = main_process(unit);
        assert_eq!(uid, "0", "no exec.user: root, sandboxed");
        assert!(
            environ.contains("HELLO_TOKEN=s3cr3t-token"),
            "systemd read the secrets file"
        );
        let hello = &state()["services"]["hello"];
        assert_eq!(hello["health"], "healthy", "{hello}");
        // The secret is in the service's environment only.
        let state_text = std::fs::read_to_string("/var/lib/deployer/state.json").unwrap();
        deployer_tests::assert_not_leaked("s3cr3t-token", &[unit_file, state_text]);

        // Upgrade.
        app.set_version("v2", false);
        app.push(&fx);
        assert!(run_checked(|args| agent(&fx, args)).status.success());
        assert_eq!(body(port).as_deref(), Some("hello from v2\n"));

        // A broken release: the health gate fails it, v2 is put back; its output is in the
        // journal under the service's unit.
        app.set_version("v3", true);
        app.push(&fx);
        let out = run_checked(|args| agent(&fx, args));
        assert_eq!(out.code(), 8, "{}", out.stderr_str());
        assert!(
            out.stderr_str().contains("(rolled back)"),
            "{}",
            out.stderr_str()
        );
        assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
        let journal = Command::new("journalctl")
            .args(["-u", unit, "--no-pager", "-o", "cat"])
            .output()
            .unwrap()
            .stdout_str();
        assert!(journal.contains("broken release"), "{journal}");

        // Drift: the operator stops it; the next run starts it again.
        systemctl(&["stop", unit]);
        assert!(body(port).is_none());
        let out = run_checked(|args| agent(&fx, args));
        assert_eq!(out.code(), 0, "{}", out.stderr_str());
        assert!(eventually(10, || body(port)).is_some());

        // Removed from the manifest: stopped, unit gone, the secrets file kept.
        fx.dm(&["remove-service", "hello"]).ok();
        assert!(run_checked(|args| agent(&fx, args)).status.success());
        assert!(!Path::new("/run/systemd/system").join(unit).exists());
        assert_ne!(systemctl(&["is-active", unit]), "active");
        assert!(env_file.exists(), "secrets are the operator's");
    });
}

/// The Postgres and Redis presets and a release command, as units of the system manager
/// with their data under `/var/lib/deployer/infra`; then the agent is killed (SIGKILL) at
/// each stage of an upgrade, and the next run converges every time.
#[test]
fn presets_a_release_and_kill_9_mid_apply_on_the_system_manager() {
    on_system_manager(|| {
        let fx = Fixture::file();
        let repo = tempfile::tempdir().unwrap();
        let (pg, rp, port) = (free_port(), free_port(), free_port());
        fx.dm(&["init"]).ok();
        let infra = json!({"services": {
            "db": {"preset": "postgres", "ports": {"tcp": pg}},
            "cache": {"preset": "redis", "ports": {"tcp": rp}}
        }});
        fx.dm(&["set-infrastructure", &infra.to_string()]).ok();
        let service = json!({
            "name": "app", "namespace": "Biz/App.py",
            "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
            "exec": {"command": "bin/app"},
            "env": {"PORT": port.to_string()},
            "http": {"domain": "app.test", "internalPort": port},
            "health": {"http": {"path": "/healthz"}, "timeout": "30s", "interval": "200ms"},
            "infrastructure": {"database": true, "redis": true},
            "release": {"command": "bin/migrate"}
        });
        fx.dm(&["add-service", &service.to_string()]).ok();
        let push = |version: &str| {
            build(repo.path(), version, false);
            run_in(repo.path(), "push.sh", &["Biz/App.py"], &fx.env).ok();
        };
        push("v1");
        let out = run_checked(|args| agent(&fx, args));
        assert!(out.status.success(), "{}", out.stderr_str());
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
        for unit in ["deployer-infra-db.service", "deployer-infra-cache.service"] {
            assert_eq!(systemctl(&["is-active", unit]), "active", "{unit}");
        }
        // The release made the table and the app wrote to it, in the cluster under the
        // default state directory.
        let socket = Path::new("/var/lib/deployer/infra/db/run");
        let visits = psql_at(socket, pg, "app", "select version from visits");
        assert_eq!(visits.stdout_str().trim(), "v1");
        let (_, environ) = main_process("deployer-app.service");
        assert!(
            environ.contains("DATABASE_URL=postgres://app:"),
            "{environ}"
        );
        assert!(environ.contains(&format!("REDIS_URL=redis://127.0.0.1:{rp}/")));

        for (i, stage) in ["fetched", "unit-written", "restarted", "healthy"]
            .iter()
            .enumerate()
        {
            let version = format!("v{}", i + 2);
            push(&version);
            let mut env = fx.env.clone();
            env.push(("DEPLOYER_FAULT".into(), format!("{stage}:kill")));
            let out = deployer_tests::run(
                "deployer-agent",
                &["--host", "biz", "run", "--once"],
                &env,
                None,
            );
            assert_eq!(
                out.status.code(),
                None,
                "{stage}: killed: {}",
                out.stderr_str()
            );
            let out = run_checked(|args| agent(&fx, args));
            assert!(out.status.success(), "after {stage}: {}", out.stderr_str());
            assert_eq!(
                eventually(15, || body(port).filter(|b| b.contains(&version))),
                Some(format!("hello from {version}\n")),
                "after {stage}"
            );
            assert_eq!(state()["services"]["app"]["health"], "healthy");
        }
        // Nothing of ours runs untracked after all that.
        let units = systemctl(&[
            "list-units",
            "--all",
            "--plain",
            "--no-legend",
            "deployer-*",
        ]);
        let active: Vec<&str> = units
            .lines()
            .filter(|l| l.contains(" active "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(
            active,
            [
                "deployer-app.service",
                "deployer-infra-cache.service",
                "deployer-infra-db.service"
            ],
            "{units}"
        );
    });
}
