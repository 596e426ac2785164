//! The agent in its production mode against a real `systemd --system` (issue #15): root, the
//! system bus, units in `/run/systemd/system`, journald, and the default paths
//! (`/var/lib/deployer/state.json`, `/var/lib/deployer-secrets/<service>.env`), with no
//! `--user`, `--state-dir` or `--secrets-dir`.
//!
//! Covered: first deploy, upgrade, health-gated rollback, drift repair, removal, secrets
//! (`the_production_path_…`); Postgres and Redis presets as their own accounts, a release
//! command, SIGKILL at each stage (`presets_…`); the sandbox, accounts and limits
//! (`the_sandbox_holds_…`); zero downtime through Caddy; `scripts/install.sh` with the shipped
//! units and `systemctl start/status deployer`; the NixOS module's units; `scripts/demo.sh`;
//! unit names: a host's own refused, an older agent's moved (`a_unit_name_the_host_owns_…`).
//!
//! Each test re-runs itself inside a fresh `scripts/systemd-system-sandbox.sh` (systemd as PID
//! 1 of its own namespaces, a private `/run`, copy-on-write `/etc` and `/var` thrown away at
//! the end), and its body runs there; see [`on_system_manager`].

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use deployer_tests::{OutputExt, bin, eventually, free_port, output_within, repo_root, run_in};
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
    on_system_manager_with(&[], test)
}

/// [`on_system_manager`], with more options for `scripts/systemd-system-sandbox.sh` (e.g.
/// `--overlay /usr/local`).
fn on_system_manager_with(sandbox_args: &[&str], test: impl FnOnce()) {
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
            .args(sandbox_args)
            .arg("--")
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", &name, "--nocapture", "--test-threads=1"])
            .env(INSIDE, "1")
            .env(deployer_tests::PORTS_ENV, deployer_tests::port_block(400)),
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

/// `journalctl -u <name> -o cat`: what the journal has of the unit `name` names.
fn journal(name: &str) -> String {
    let out = Command::new("journalctl")
        .args(["-u", name, "--no-pager", "-o", "cat"])
        .output()
        .unwrap();
    out.stdout_str()
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
        let unit = "hello.service";
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
        crate::observe::leaky_crash(&app, "v3", "HELLO_TOKEN");
        app.push(&fx);
        let out = run_checked(|args| agent(&fx, args));
        out.fails_with(8, "(rolled back)");
        assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
        // `journalctl -u hello`, as seed 004 types it.
        let journal_text = journal("hello");
        assert!(journal_text.contains("broken release"));
        assert!(
            journal_text.contains("token s3cr3t-token"),
            "it did print its secret"
        );
        // The same lines without ssh, from the journal, the secret masked; nowhere in
        // the store.
        let status = fx
            .dm(&["status", "biz", "--service", "hello"])
            .ok()
            .stdout_str();
        assert!(status.contains("| broken release"), "{status}");
        assert!(status.contains("| starting with token ***"), "{status}");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut texts: Vec<String> = runtime
            .block_on(crate::observe::store_texts(&fx))
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        texts.push(std::fs::read_to_string("/var/lib/deployer/state.json").unwrap());
        texts.push(status);
        deployer_tests::assert_not_leaked("s3cr3t-token", &texts);

        // `systemctl restart hello`: the service's own name.
        let pid = systemctl(&["show", "-p", "MainPID", "--value", unit]);
        let restart = Command::new("systemctl")
            .args(["restart", "hello"])
            .status();
        assert!(restart.unwrap().success());
        assert_ne!(systemctl(&["show", "-p", "MainPID", "--value", unit]), pid);
        assert!(eventually(10, || body(port)).is_some());

        // Drift: the operator stops it; the next run starts it again.
        systemctl(&["stop", "hello"]);
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
        // Each preset runs as its own account (`User=`), not as root through runuser.
        for (unit, account) in [
            ("deployer-infra-db.service", "postgres"),
            ("deployer-infra-cache.service", "redis"),
        ] {
            assert_eq!(systemctl(&["is-active", unit]), "active", "{unit}");
            let id = Command::new("id").args(["-u", account]).output().unwrap();
            assert_eq!(main_process(unit).0, id.stdout_str().trim(), "{unit}");
            let file =
                std::fs::read_to_string(Path::new("/run/systemd/system").join(unit)).unwrap();
            assert!(file.contains(&format!("User={account}\n")), "{file}");
            assert!(!file.contains("runuser"), "{file}");
        }
        // The release made the table and the app wrote to it, in the cluster under the
        // default state directory.
        let socket = Path::new("/var/lib/deployer/infra/db/run");
        let visits = psql_at(socket, pg, "app", "select version from visits");
        assert_eq!(visits.stdout_str().trim(), "v1");
        let (_, environ) = main_process("app.service");
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
            "app*",
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
                "app.service",
                "deployer-infra-cache.service",
                "deployer-infra-db.service"
            ],
            "{units}"
        );
    });
}

/// A service's sandbox and account under the real manager (#15): a root service cannot
/// write /usr, read /root, the host key or another service's secrets, and writes only its
/// state directory and the paths its manifest declares; its resource limits are the unit's
/// (read back over D-Bus with `systemctl show`; the sandbox's cgroup does not enforce
/// them); `exec.user` runs it as that account, `"user": null` as a dynamic one, and an
/// account the host lacks is a clear error that leaves the rest deployed.
#[test]
fn the_sandbox_holds_accounts_are_real_and_limits_reach_the_unit() {
    on_system_manager(|| {
        let fx = Fixture::file();
        let app = App::new();
        fx.dm(&["init"]).ok();
        let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
        let service = |name: &str, port: u16, exec: Value| {
            json!({
                "name": name, "namespace": "Examples/Hello.py",
                "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
                "exec": exec,
                "env": {"PORT": port.to_string()},
                "health": {"http": {"path": "/healthz", "port": port}, "timeout": "20s",
                           "interval": "200ms"}
            })
        };
        let services = [
            service(
                "sandboxed",
                ports[0],
                json!({"command": "bin/check", "writablePaths": ["/srv/sandboxed-data"],
                       "memoryMax": "256M", "cpuQuota": "50%", "tasksMax": 32}),
            ),
            service(
                "named",
                ports[1],
                json!({"command": "bin/check", "user": "appuser", "group": "appuser"}),
            ),
            service(
                "dynamic",
                ports[2],
                json!({"command": "bin/check", "user": null}),
            ),
            service(
                "ghost",
                ports[3],
                json!({"command": "bin/hello", "user": "nosuchuser"}),
            ),
        ];
        for s in &services {
            fx.dm(&["add-service", &s.to_string()]).ok();
        }
        app.set_version("v1", false);
        let check = r#"#!/bin/sh
# What this service's sandbox lets it do, for the test to read.
{
if touch /usr/deployer-was-here 2>/dev/null; then echo usr=writable; else echo usr=denied; fi
if touch /etc/deployer-was-here 2>/dev/null; then echo etc=writable; else echo etc=denied; fi
echo "root-marker=$(cat /root/marker 2>/dev/null)"
echo "host-key-bytes=$(cat /var/lib/deployer/host.key 2>/dev/null | wc -c)"
echo "other-secret=$(cat /var/lib/deployer-secrets/other.env 2>/dev/null)"
echo "own-secret=${OWN_TOKEN:-}"
if touch /srv/sandboxed-data/x 2>/dev/null; then echo data=writable; else echo data=denied; fi
if touch /var/lib/deployer/x 2>/dev/null; then echo state=writable; else echo state=denied; fi
if touch /tmp/x && [ ! -e /tmp/deployer-host-tmp ]; then echo tmp=private; else echo tmp=shared; fi
} > "$STATE_DIRECTORY/report"
echo "check: starts as $(id -un)"
exec "$(dirname "$0")/hello"
"#;
        let bin = app.path().join("app/bin/check");
        std::fs::write(&bin, check).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        for name in ["sandboxed", "named", "dynamic", "ghost"] {
            let args = ["Examples/Hello.py", "--service", name];
            run_in(app.path(), "push.sh", &args, &fx.env).ok();
        }

        // The host as an operator prepared it: an account, a data directory, secrets.
        let sh = |script: &str| {
            let out = Command::new("sh").args(["-ec", script]).output().unwrap();
            assert!(out.status.success(), "{script}: {}", out.stderr_str());
        };
        sh(
            "useradd --system --no-create-home --user-group --shell /usr/sbin/nologin appuser
            mkdir -p /srv/sandboxed-data /var/lib/deployer-secrets
            chmod 700 /var/lib/deployer-secrets
            echo root-only > /root/marker
            touch /tmp/deployer-host-tmp
            printf 'OWN_TOKEN=mine\n' > /var/lib/deployer-secrets/sandboxed.env
            printf 'OTHER_TOKEN=theirs\n' > /var/lib/deployer-secrets/other.env
            chmod 600 /var/lib/deployer-secrets/*.env",
        );
        // The host key exists before the service starts (a later run would make it anyway).
        assert!(agent(&fx, &["host-key"]).status.success());

        let out = run_checked(|args| agent(&fx, args));
        let stderr = out.stderr_str();
        assert_eq!(out.code(), 8, "ghost cannot deploy: {stderr}");
        assert!(
            stderr.contains("no account \"nosuchuser\"") && stderr.contains("useradd"),
            "{stderr}"
        );
        assert_ne!(systemctl(&["is-active", "ghost.service"]), "active");
        for (name, port) in ["sandboxed", "named", "dynamic"].iter().zip(&ports) {
            assert_eq!(
                body(*port).as_deref(),
                Some("hello from v1\n"),
                "{name}: {stderr}"
            );
        }

        let report = |name: &str| -> std::collections::BTreeMap<String, String> {
            let dir = match name {
                "dynamic" => "/var/lib/private/deployer-dynamic".to_owned(),
                other => format!("/var/lib/deployer-{other}"),
            };
            let text = std::fs::read_to_string(format!("{dir}/report"))
                .unwrap_or_else(|e| panic!("{name}'s report in {dir}: {e}"));
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        };
        // Root, but in the sandbox. (What it must not see is there, outside it.)
        for (path, want) in [
            ("/var/lib/deployer/host.key", None),
            (
                "/var/lib/deployer-secrets/other.env",
                Some("OTHER_TOKEN=theirs"),
            ),
            ("/root/marker", Some("root-only")),
        ] {
            let text = std::fs::read_to_string(path).unwrap();
            assert!(
                !text.is_empty() && want.is_none_or(|w| text.contains(w)),
                "{path}"
            );
        }
        let r = report("sandboxed");
        let (uid, _) = main_process("sandboxed.service");
        assert_eq!(uid, "0");
        assert_eq!(r["usr"], "denied", "{r:?}");
        assert_eq!(r["etc"], "denied", "{r:?}");
        assert_eq!(r["root-marker"], "", "/root is hidden: {r:?}");
        assert_eq!(r["host-key-bytes"], "0", "the host key is hidden: {r:?}");
        assert_eq!(
            r["other-secret"], "",
            "another service's secrets are hidden: {r:?}"
        );
        assert_eq!(
            r["own-secret"], "mine",
            "its own reach it through systemd: {r:?}"
        );
        assert_eq!(r["data"], "writable", "{r:?}");
        assert_eq!(
            r["state"], "denied",
            "the agent's state is read-only: {r:?}"
        );
        assert_eq!(r["tmp"], "private", "{r:?}");
        assert!(!Path::new("/usr/deployer-was-here").exists());
        assert!(!Path::new("/var/lib/deployer/x").exists());
        // Its limits, as the manager holds them (read over D-Bus).
        let show = systemctl(&[
            "show",
            "-p",
            "MemoryMax,CPUQuotaPerSecUSec,TasksMax",
            "sandboxed.service",
        ]);
        for want in [
            "MemoryMax=268435456",
            "CPUQuotaPerSecUSec=500ms",
            "TasksMax=32",
        ] {
            assert!(show.lines().any(|l| l == want), "{want} in:\n{show}");
        }

        // exec.user: that account, and only its own files.
        let appuser = Command::new("id")
            .args(["-u", "appuser"])
            .output()
            .unwrap()
            .stdout_str()
            .trim()
            .to_owned();
        let (uid, _) = main_process("named.service");
        assert_eq!(uid, appuser, "runs as exec.user");
        // Its output is in the journal under its own name (`journalctl -u named`), also for
        // a service that does not run as root.
        assert!(
            eventually(10, || journal("named")
                .contains("check: starts as appuser")
                .then_some(()))
            .is_some(),
            "{}",
            journal("named")
        );

        // "user": null: an account of its own, made while it runs.
        let (uid, _) = main_process("dynamic.service");
        let uid: u32 = uid.parse().unwrap();
        assert!((61184..=65519).contains(&uid), "a dynamic uid, got {uid}");
        assert_eq!(report("dynamic")["usr"], "denied");

        // The operator creates the account: the next run deploys ghost too.
        sh("useradd --system --no-create-home --user-group --shell /usr/sbin/nologin nosuchuser");
        let out = run_checked(|args| agent(&fx, args));
        assert_eq!(out.code(), 0, "{}", out.stderr_str());
        assert_eq!(body(ports[3]).as_deref(), Some("hello from v1\n"));
    });
}

/// A service's units carry its name (`systemctl restart hello`, `journalctl -u hello` are
/// in `the_production_path_…`). A name the host's own units have is never taken: a vendor
/// unit (`rescue.service`, in /lib, which a file of ours in /run would override), one the
/// operator wrote in /etc, and an alias of it are refused with the reason, and left as they
/// were, while the other services deploy; once the operator frees a name, the next run
/// deploys it. A service an older agent deployed as `deployer-<service>.service` is moved to
/// its own name at the next run, though the manifest did not change.
#[test]
fn a_unit_name_the_host_owns_is_refused_and_old_names_are_moved() {
    on_system_manager(|| {
        let fx = Fixture::file();
        let app = App::new();
        let port = free_port();
        declare_hello(&fx, port);
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let names = ["rescue", "web", "www"];
        for (name, port) in names.iter().zip(&ports) {
            let service = json!({
                "name": name, "namespace": "Examples/Hello.py",
                "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
                "exec": {"command": "bin/hello"},
                "env": {"PORT": port.to_string()},
                "health": {"http": {"path": "/healthz", "port": port}, "timeout": "20s",
                           "interval": "200ms"}
            });
            fx.dm(&["add-service", &service.to_string()]).ok();
        }
        app.set_version("v1", false);
        for name in ["hello", "rescue", "web", "www"] {
            let args = ["Examples/Hello.py", "--service", name];
            run_in(app.path(), "push.sh", &args, &fx.env).ok();
        }
        let etc = Path::new("/etc/systemd/system");
        std::fs::write(
            etc.join("web.service"),
            "[Unit]\nDescription=the host's own web\n[Service]\nExecStart=/bin/sleep infinity\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(etc.join("web.service"), etc.join("www.service")).unwrap();
        systemctl(&["daemon-reload"]);
        systemctl(&["start", "web.service"]);
        assert_eq!(systemctl(&["is-active", "web.service"]), "active");

        let out = run_checked(|args| agent(&fx, args));
        let stderr = out.stderr_str();
        assert_eq!(out.code(), 8, "{stderr}");
        for needle in [
            "the unit name is taken: rescue.service is a unit of this host's, from ",
            "/lib/systemd/system/rescue.service; rename the service in the manifest",
            "the unit name is taken: web.service is a unit of this host's, from /etc/systemd/system/web.service",
            "the unit name is taken: www.service is another name of web.service",
        ] {
            assert!(stderr.contains(needle), "{needle} in:\n{stderr}");
        }
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"), "{stderr}");
        for name in names {
            let ours = Path::new("/run/systemd/system").join(format!("{name}.service"));
            assert!(!ours.exists(), "{} written", ours.display());
        }
        assert_eq!(
            systemctl(&["show", "-p", "Description", "web.service"]),
            "Description=the host's own web"
        );
        assert_eq!(systemctl(&["is-active", "web.service"]), "active");
        let rescue = systemctl(&["show", "-p", "FragmentPath", "rescue.service"]);
        assert!(
            rescue.ends_with("/lib/systemd/system/rescue.service"),
            "{rescue}"
        );
        assert!(ports.iter().all(|p| body(*p).is_none()));

        // The operator frees web's and www's names; rescue is dropped from the manifest.
        systemctl(&["stop", "web.service"]);
        std::fs::remove_file(etc.join("www.service")).unwrap();
        std::fs::remove_file(etc.join("web.service")).unwrap();
        systemctl(&["daemon-reload"]);
        fx.dm(&["remove-service", "rescue"]).ok();
        let out = run_checked(|args| agent(&fx, args));
        assert_eq!(out.code(), 0, "{}", out.stderr_str());
        for p in &ports[1..] {
            assert_eq!(body(*p).as_deref(), Some("hello from v1\n"));
        }
        assert_eq!(
            systemctl(&["show", "-p", "Description", "web.service"]),
            "Description=deployer: web"
        );

        // What an older agent left: hello running as deployer-hello.service, recorded so.
        let run = Path::new("/run/systemd/system");
        systemctl(&["stop", "hello.service"]);
        std::fs::rename(
            run.join("hello.service"),
            run.join("deployer-hello.service"),
        )
        .unwrap();
        let mut old = state();
        old["services"]["hello"]["unit"] = json!("deployer-hello.service");
        std::fs::write("/var/lib/deployer/state.json", old.to_string()).unwrap();
        systemctl(&["daemon-reload"]);
        systemctl(&["start", "deployer-hello.service"]);
        assert!(eventually(10, || body(port)).is_some());
        let out = run_checked(|args| agent(&fx, args));
        assert_eq!(out.code(), 0, "{}", out.stderr_str());
        assert_eq!(state()["services"]["hello"]["unit"], "hello.service");
        assert_eq!(systemctl(&["is-active", "hello.service"]), "active");
        assert_ne!(
            systemctl(&["is-active", "deployer-hello.service"]),
            "active"
        );
        assert!(!run.join("deployer-hello.service").exists());
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    });
}

/// Where the sandbox's units and this test both see the same files.
fn share() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("SYSBOX_SHARE").expect("inside the sandbox"))
}

/// `systemctl ARGS`, its exit status and its output (stdout and stderr).
fn systemctl_status(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemctl").args(args).output().unwrap();
    (
        out.status.success(),
        format!("{}{}", out.stdout_str(), out.stderr_str()),
    )
}

/// hello v1 pushed to a store in the share (where the manager's units see it too); the
/// store, the app that built it and its port.
fn hello_v1_in_share() -> (Fixture, App, u16) {
    let fx = Fixture::file_in(&share());
    let app = App::new();
    let port = free_port();
    declare_hello(&fx, port);
    app.set_version("v1", false);
    app.push(&fx);
    (fx, app, port)
}

/// The operator's settings for the agent, written before the units are installed (a timer
/// firing at once must not run without the host's name).
fn write_agent_env(fx: &Fixture) {
    std::fs::create_dir_all("/etc/deployer").unwrap();
    let env = Path::new("/etc/deployer/deployer.env");
    std::fs::write(env, format!("DEPLOY_STORE={}\nDEPLOYER_HOST=biz\n", fx.url)).unwrap();
    std::fs::set_permissions(env, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Seed 004's host commands with the agent as `scripts/install.sh` installs it: the shipped
/// `deployer.service` and `deployer.timer` unchanged in /etc/systemd/system, the binaries in
/// /usr/local/bin; `systemctl start deployer` deploys; `systemctl status deployer` tells a run
/// that deployed everything (`status=0/SUCCESS`) from one where a service failed (`failed`,
/// `status=8`), and `journalctl -u deployer` says which and why.
#[test]
fn install_sh_then_systemctl_start_deployer_and_its_status() {
    on_system_manager_with(&["--overlay", "/usr/local"], || {
        let (fx, app, port) = hello_v1_in_share();
        write_agent_env(&fx);

        let bin_dir = bin("deployer-agent").parent().unwrap().to_owned();
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/install.sh"))
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg(&fx.url)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", out.stderr_str());
        for unit in ["deployer.service", "deployer.timer"] {
            let installed = std::fs::read(Path::new("/etc/systemd/system").join(unit)).unwrap();
            let shipped = std::fs::read(repo_root().join("packaging").join(unit)).unwrap();
            assert_eq!(installed, shipped, "{unit} is installed unchanged");
        }
        assert!(Path::new("/usr/local/bin/deployer-agent").exists());
        let env = std::fs::read_to_string("/etc/deployer/deployer.env").unwrap();
        assert!(
            env.contains("DEPLOYER_HOST=biz"),
            "an existing env file is kept"
        );
        assert_eq!(systemctl(&["is-active", "deployer.timer"]), "active");

        // "Force Immediate Deploy".
        let (ok, text) = systemctl_status(&["start", "deployer"]);
        assert!(ok, "{text}");
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
        let (_, status) = systemctl_status(&["status", "deployer", "--no-pager"]);
        assert!(status.contains("status=0/SUCCESS"), "{status}");
        assert_eq!(state()["services"]["hello"]["health"], "healthy");

        // The timer stays out of the rest (it could run between a start and a status).
        systemctl(&["stop", "deployer.timer"]);
        app.set_version("v2", true);
        app.push(&fx);
        let (ok, text) = systemctl_status(&["start", "deployer"]);
        assert!(!ok, "a run whose deploy failed fails the start: {text}");
        let (_, status) = systemctl_status(&["status", "deployer", "--no-pager"]);
        assert!(
            status.contains("failed") && status.contains("status=8"),
            "{status}"
        );
        let journal = Command::new("journalctl")
            .args(["-u", "deployer", "--no-pager", "-o", "cat"])
            .output()
            .unwrap()
            .stdout_str();
        assert!(
            journal.contains("hello: ") && journal.contains("(rolled back)"),
            "{journal}"
        );
        assert_eq!(
            body(port).as_deref(),
            Some("hello from v1\n"),
            "v1 still serves"
        );
    });
}

/// NixOS's rendering of one `systemd.services.<name>` or `systemd.timers.<name>` attribute
/// set from the module's evaluation (the keys the module uses): `description`, `after`,
/// `wants`, `wantedBy`, `path` (PATH, with NixOS's default packages standing in as /usr/bin
/// and /bin), and `serviceConfig` / `timerConfig` verbatim.
fn nixos_unit(unit: &Value, section: &str, config_key: &str) -> String {
    let words = |v: &Value| -> String {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let mut text = String::from("[Unit]\n");
    if let Some(d) = unit["description"].as_str() {
        text += &format!("Description={d}\n");
    }
    for (key, nix) in [("After", "after"), ("Wants", "wants")] {
        if unit.get(nix).is_some() {
            text += &format!("{key}={}\n", words(&unit[nix]));
        }
    }
    text += &format!("\n[{section}]\n");
    if let Some(path) = unit["path"].as_array() {
        let mut dirs: Vec<String> = path
            .iter()
            .flat_map(|p| {
                let p = p.as_str().unwrap();
                [format!("{p}/bin"), format!("{p}/sbin")]
            })
            .collect();
        dirs.extend(["/usr/bin".to_owned(), "/bin".to_owned()]);
        text += &format!("Environment=\"PATH={}\"\n", dirs.join(":"));
    }
    for (key, value) in unit[config_key].as_object().unwrap() {
        let value = match value {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            other => other.to_string(),
        };
        text += &format!("{key}={value}\n");
    }
    if unit.get("wantedBy").is_some() {
        text += &format!("\n[Install]\nWantedBy={}\n", words(&unit["wantedBy"]));
    }
    text
}

/// The NixOS module's units, as its evaluation gives them, under the real manager:
/// `systemctl start deployer` deploys, and the timer loads.
#[test]
fn the_nixos_modules_units_deploy_under_the_system_manager() {
    on_system_manager(|| {
        let (fx, _app, port) = hello_v1_in_share();
        // The package: a directory with bin/deployer-agent, where the manager can see it.
        let package = tempfile::tempdir_in(share()).unwrap();
        std::fs::create_dir(package.path().join("bin")).unwrap();
        std::fs::copy(
            bin("deployer-agent"),
            package.path().join("bin/deployer-agent"),
        )
        .unwrap();
        let settings = format!(
            r#"{{ enable = true; store = "{}"; package = "{}"; }}"#,
            fx.url,
            package.path().display()
        );
        let out = crate::packaging::eval(&settings);
        assert!(out.status.success(), "{}", out.stderr_str());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let config = &v["config"]["systemd"];
        let units = Path::new("/etc/systemd/system");
        let service = nixos_unit(&config["services"]["deployer"], "Service", "serviceConfig");
        let timer = nixos_unit(&config["timers"]["deployer"], "Timer", "timerConfig");
        std::fs::write(units.join("deployer.service"), &service).unwrap();
        std::fs::write(units.join("deployer.timer"), &timer).unwrap();
        let rules: Vec<&str> = config["tmpfiles"]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        std::fs::write("/etc/tmpfiles.d/deployer.conf", rules.join("\n") + "\n").unwrap();
        let tmpfiles = Command::new("systemd-tmpfiles")
            .args(["--create", "/etc/tmpfiles.d/deployer.conf"])
            .output()
            .unwrap();
        assert!(tmpfiles.status.success(), "{}", tmpfiles.stderr_str());
        let secrets = std::fs::metadata("/var/lib/deployer-secrets").unwrap();
        assert_eq!(secrets.permissions().mode() & 0o777, 0o700);
        systemctl(&["daemon-reload"]);

        let (ok, text) = systemctl_status(&["start", "deployer"]);
        assert!(ok, "{text}\n{service}");
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
        assert_eq!(state()["services"]["hello"]["health"], "healthy");
        let (ok, text) = systemctl_status(&["start", "deployer.timer"]);
        assert!(ok, "{text}\n{timer}");
        assert_eq!(systemctl(&["is-active", "deployer.timer"]), "active");
    });
}

/// `scripts/demo.sh`, the README's first command, in both its modes: beside a user manager,
/// and with `--system` as root on a real system manager (a private one: systemd is not PID 1
/// here) with the agent's default paths. Built already, so `DEMO_READY` skips its build.
#[test]
fn the_demo_runs_on_a_user_and_on_the_system_manager() {
    let target = bin("deployer-agent")
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_owned();
    for args in [&[][..], &["--system"][..]] {
        let checkout = tempfile::tempdir().unwrap();
        // A copy of the checkout's scripts and examples: the demo writes .demo/ beside them.
        for dir in ["scripts", "examples", "push"] {
            let out = Command::new("cp")
                .arg("-r")
                .arg(repo_root().join(dir))
                .arg(checkout.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", out.stderr_str());
        }
        let out = output_within(
            Command::new("bash")
                .arg(checkout.path().join("scripts/demo.sh"))
                .args(args)
                .env("CARGO_TARGET_DIR", &target)
                .env("DEMO_READY", "1")
                .env_remove("DEPLOY_STORE"),
            Duration::from_secs(300),
            "scripts/demo.sh",
        );
        let text = out.stdout_str();
        assert!(
            out.status.success(),
            "{args:?}\n{text}\n{}",
            out.stderr_str()
        );
        assert!(text.contains("\nhello from v1\n"), "{args:?}: {text}");
        assert!(text.contains("(exit 3)"), "bad input refused: {text}");
        if args == ["--system"] {
            assert!(text.contains("on the system manager"), "{text}");
            assert!(text.contains("\"unit\": \"hello.service\""), "{text}");
        }
    }
}

/// Zero downtime through a real Caddy with the agent in its production mode: generations
/// are units of the system manager on ports of their own; while a client hits Caddy, an
/// upgrade and a broken release fail not one request, and only the serving generation is left.
#[test]
fn zero_downtime_through_caddy_on_the_system_manager() {
    on_system_manager(|| {
        let fx = Fixture::file();
        let caddy = deployer_tests::Caddy::start();
        let app = App::new();
        let internal = free_port();
        crate::proxy::declare(&fx, internal, true);
        let flags = crate::proxy::caddy_zero_downtime_flags(&caddy);
        let run = || {
            run_checked(|args| {
                let mut all: Vec<&str> = flags.iter().map(String::as_str).collect();
                all.extend_from_slice(args);
                agent(&fx, &all)
            })
        };
        app.set_version("v1", false);
        app.push(&fx);
        let out = run();
        assert!(out.status.success(), "{}", out.stderr_str());
        assert_eq!(
            crate::proxy::via_caddy(&caddy).as_deref(),
            Some("hello from v1\n")
        );

        let client = crate::proxy::Client::start(caddy.http_port, "hello.test");
        app.set_version("v2", false);
        app.push(&fx);
        assert!(run().status.success());
        app.set_version("v3", true);
        app.push(&fx);
        assert_eq!(run().code(), 8);
        std::thread::sleep(Duration::from_millis(300));
        let (ok, bodies) = client.finish();
        assert!(ok > 50, "the client made {ok} requests");
        assert_eq!(bodies, ["hello from v1\n", "hello from v2\n"]);

        let hello = &state()["services"]["hello"];
        let unit = hello["unit"].as_str().unwrap().to_owned();
        let port = hello["current"]["route"]["port"].as_u64().unwrap();
        assert_ne!(port, u64::from(internal), "a generation has its own port");
        assert_eq!(unit, format!("hello.{port}.service"));
        assert_eq!(systemctl(&["is-active", &unit]), "active");
        let ours: Vec<String> = std::fs::read_dir("/run/systemd/system")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("hello"))
            .collect();
        assert_eq!(ours, [unit], "only the serving generation is left");
    });
}

/// A repository whose `Biz/App.py` builds `app/`: the hello server, `VERSION` v1 and
/// `scripts` (path, text), executable.
fn app_repo(scripts: &[(&str, &str)]) -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let app = repo.path().join("app");
    let hello = ("bin/hello", include_str!("../../examples/hello/bin/hello"));
    for (rel, text) in [hello, ("VERSION", "v1")].iter().chain(scripts) {
        let p = app.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(
        repo.path().join("deploy.toml"),
        "[namespaces.\"Biz/App.py\"]\ncommand = \"true\"\noutput = \"app\"\n",
    )
    .unwrap();
    repo
}

/// Connect to the MySQL database of `url` (`mysql://user:password@host:port/db`) as its user
/// and run `sql`.
fn mysql_as(url: &str, db: &str, sql: &str) -> Output {
    let rest = url.strip_prefix("mysql://").expect("a mysql:// URL");
    let (auth, at) = rest.split_once('@').unwrap();
    let (user, password) = auth.split_once(':').unwrap();
    let (hostport, _) = at.split_once('/').unwrap();
    let (host, port) = hostport.split_once(':').unwrap();
    Command::new("mariadb")
        .args([
            "--no-defaults",
            "--batch",
            "--skip-column-names",
            "-h",
            host,
            "-P",
            port,
            "-u",
            user,
            db,
            "-e",
            sql,
        ])
        .env("MYSQL_PWD", password)
        .output()
        .unwrap()
}

/// The value of `key` in the environment of `unit`'s main process.
fn env_of(unit: &str, key: &str) -> String {
    let (_, environ) = main_process(unit);
    environ
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{unit} has no {key}"))
        .to_owned()
}

/// Seed 001's shorthands beyond `true`, with the real servers under the system manager:
/// `database: {"dialect": "mysql"}` (a MariaDB preset, a user and database per service),
/// `database: {"dedicated": true}` (a PostgreSQL server of the service's own) and
/// `redis: {"dedicated": true}` (a Redis of its own, behind a password). Each service writes
/// through the env it was given; a second full run restarts nothing and keeps every
/// credential; with its own credentials, one service reaches neither another's MySQL
/// database nor its Redis; a MySQL user deployer did not make is refused and left as it is.
#[test]
fn mysql_and_dedicated_servers_on_the_system_manager() {
    on_system_manager(|| {
        let fx = Fixture::file();
        let my = free_port();
        let (p_shop, p_crm, p_ledger) = (free_port(), free_port(), free_port());
        let p_vault = free_port();
        fx.dm(&["init"]).ok();
        let infra = json!({"services": {"my": {"preset": "mysql", "ports": {"tcp": my}}}});
        fx.dm(&["set-infrastructure", &infra.to_string()]).ok();
        let repo = app_repo(&[
            // Split mysql://user:password@host:port/db the way a shell can.
            (
                "bin/mysql-app",
                "#!/bin/sh\nset -e\nu=${DATABASE_URL#mysql://}\nuser=${u%%:*}; r=${u#*:}; pw=${r%%@*}; r=${r#*@}\nhost=${r%%:*}; r=${r#*:}; port=${r%%/*}; db=${r#*/}\nMYSQL_PWD=$pw mariadb --no-defaults -h \"$host\" -P \"$port\" -u \"$user\" \"$db\" -e \"create table if not exists visits (v varchar(20)); insert into visits values ('$(cat VERSION)')\"\nexec python3 bin/hello\n",
            ),
            (
                "bin/ledger-app",
                "#!/bin/sh\nset -e\npsql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -q -c \"create table if not exists entries (v text); insert into entries values ('$(cat VERSION)')\"\nredis-cli -u \"$REDIS_URL\" --no-auth-warning set greeting \"hi from $(cat VERSION)\" | grep -qx OK\nexec python3 bin/hello\n",
            ),
        ]);
        let services = [
            (
                "shop",
                p_shop,
                "bin/mysql-app",
                json!({"database": {"dialect": "mysql"}}),
            ),
            (
                "sh_p",
                p_crm,
                "bin/mysql-app",
                json!({"database": {"dialect": "mysql"}}),
            ),
            (
                "ledger",
                p_ledger,
                "bin/ledger-app",
                json!({"database": {"dedicated": true}, "redis": {"dedicated": true}}),
            ),
            (
                "vault",
                p_vault,
                "bin/mysql-app",
                json!({"database": {"dedicated": true, "dialect": "mysql"}}),
            ),
        ];
        for (name, port, cmd, infra) in &services {
            let s = json!({
                "name": name, "namespace": if *name == "shop" { "Biz/App.py" } else { "Biz/Other.py" },
                "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
                "exec": {"command": cmd},
                "env": {"PORT": port.to_string()},
                "health": {"http": {"path": "/healthz"}, "timeout": "60s", "interval": "200ms"},
                "infrastructure": infra
            });
            fx.dm(&["add-service", &s.to_string()]).ok();
        }
        run_in(repo.path(), "push.sh", &["Biz/App.py"], &fx.env).ok();
        let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
        let artifact = m["services"][0]["artifact"].to_string();
        for name in ["sh_p", "ledger", "vault"] {
            fx.dm(&["set-artifact", name, &artifact]).ok();
        }

        let out = run_checked(|args| agent(&fx, args));
        assert!(out.status.success(), "{}", out.stderr_str());
        for (name, port, _, _) in &services {
            assert_eq!(body(*port).as_deref(), Some("hello from v1\n"), "{name}");
        }
        // MariaDB runs as its own account; each service wrote through its DATABASE_URL.
        let id = Command::new("id").args(["-u", "mysql"]).output().unwrap();
        assert_eq!(
            main_process("deployer-infra-my.service").0,
            id.stdout_str().trim()
        );
        let url = |svc: &str| env_of(&format!("{svc}.service"), "DATABASE_URL");
        let (shop_url, crm_url) = (url("shop"), url("sh_p"));
        assert!(
            shop_url.starts_with("mysql://shop:")
                && shop_url.ends_with(&format!("@127.0.0.1:{my}/shop")),
            "{shop_url}"
        );
        let visits = mysql_as(&shop_url, "shop", "select v from visits");
        assert_eq!(visits.stdout_str().trim(), "v1", "{}", visits.stderr_str());
        // With its own credentials, sh_p reaches neither shop's database nor its tables (`_`
        // is a wildcard in a MySQL grant: `sh_p`'s must not cover `shop`).
        let denied = mysql_as(&crm_url, "shop", "select v from visits");
        assert!(
            !denied.status.success() && denied.stderr_str().contains("Access denied"),
            "{}",
            denied.stderr_str()
        );
        let denied = mysql_as(&crm_url, "sh_p", "select v from shop.visits");
        assert!(!denied.status.success(), "{}", denied.stdout_str());

        // vault: a MariaDB of its own, on a port the agent picked.
        let vault_port = state()["infra"]["vault-mysql"]["ports"]["tcp"]
            .as_u64()
            .expect("a picked port");
        let vault_url = url("vault");
        assert!(
            vault_url.ends_with(&format!("@127.0.0.1:{vault_port}/vault")),
            "{vault_url}"
        );
        assert_ne!(vault_port, u64::from(my));
        let visits = mysql_as(&vault_url, "vault", "select v from visits");
        assert_eq!(visits.stdout_str().trim(), "v1", "{}", visits.stderr_str());

        // ledger: a PostgreSQL and a Redis of its own, on ports the agent picked and kept.
        let st = state();
        let pg = st["infra"]["ledger-postgres"]["ports"]["tcp"]
            .as_u64()
            .expect("a picked port");
        let rp = st["infra"]["ledger-redis"]["ports"]["tcp"]
            .as_u64()
            .expect("a picked port");
        let ledger_url = url("ledger");
        assert!(
            ledger_url.ends_with(&format!("@127.0.0.1:{pg}/ledger")),
            "{ledger_url}"
        );
        let entries = psql_at(
            Path::new("/var/lib/deployer/infra/ledger-postgres/run"),
            pg as u16,
            "ledger",
            "select v from entries",
        );
        assert_eq!(
            entries.stdout_str().trim(),
            "v1",
            "{}",
            entries.stderr_str()
        );
        let redis_url = env_of("ledger.service", "REDIS_URL");
        assert!(
            redis_url.starts_with("redis://default:")
                && redis_url.ends_with(&format!("@127.0.0.1:{rp}/0")),
            "{redis_url}"
        );
        let redis = |args: &[&str]| {
            Command::new("redis-cli")
                .args(["-p", &rp.to_string(), "--no-auth-warning"])
                .args(args)
                .output()
                .unwrap()
                .stdout_str()
                .trim()
                .to_owned()
        };
        // Without its password (what any other service has), its Redis answers nothing.
        assert!(redis(&["get", "greeting"]).contains("NOAUTH"));
        let password = redis_url
            .trim_start_matches("redis://default:")
            .split('@')
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(redis(&["-a", &password, "get", "greeting"]), "hi from v1");
        // The password is in no unit file and not in the state.
        let unit =
            std::fs::read_to_string("/run/systemd/system/deployer-infra-ledger-redis.service")
                .unwrap();
        deployer_tests::assert_not_leaked(
            &password,
            &[
                unit,
                serde_json::to_string(&st).unwrap(),
                out.stdout_str(),
                out.stderr_str(),
            ],
        );

        // A full run again (another service's env changed): nothing restarts, every
        // credential and port stays.
        let pids = || -> Vec<String> {
            [
                "deployer-infra-my",
                "deployer-infra-ledger-postgres",
                "deployer-infra-ledger-redis",
                "deployer-infra-vault-mysql",
                "shop",
                "ledger",
                "vault",
            ]
            .iter()
            .map(|u| systemctl(&["show", "-p", "MainPID", "--value", &format!("{u}.service")]))
            .collect()
        };
        let before = pids();
        fx.dm(&[
            "update-service",
            "sh_p",
            r#"{"env": {"GREETING": "again"}}"#,
        ])
        .ok();
        let out = run_checked(|args| agent(&fx, args));
        assert!(out.status.success(), "{}", out.stderr_str());
        assert_eq!(before, pids());
        assert_eq!(
            url("sh_p"),
            crm_url,
            "sh_p redeployed with the same credentials"
        );
        assert_eq!(url("shop"), shop_url);
        assert_eq!(
            state()["infra"]["ledger-postgres"]["ports"]["tcp"].as_u64(),
            Some(pg)
        );

        // A MySQL user made by hand is someone else's: refused, left as it is.
        let root = |sql: &str| {
            Command::new("mariadb")
                .args([
                    "--no-defaults",
                    "--socket=/var/lib/deployer/infra/my/run/mysqld.sock",
                    "-u",
                    "root",
                    "--batch",
                    "--skip-column-names",
                    "-e",
                    sql,
                ])
                .output()
                .unwrap()
        };
        root("CREATE USER 'alien'@'%' IDENTIFIED BY 'theirs'").ok();
        let s = json!({
            "name": "alien", "artifact": m["services"][0]["artifact"].clone(), "hosts": ["biz"],
            "exec": {"command": "bin/mysql-app"}, "env": {"PORT": free_port().to_string()},
            "infrastructure": {"database": {"dialect": "mysql"}}
        });
        fx.dm(&["add-service", &s.to_string()]).ok();
        let out = agent(&fx, &["run", "--once"]);
        out.fails_with(8, "user \"alien\" exists and was not created by deployer");
        let still = mysql_as(
            "mysql://alien:theirs@127.0.0.1:0/x"
                .replace(":0/", &format!(":{my}/"))
                .as_str(),
            "",
            "select 1",
        );
        assert_eq!(
            still.stdout_str().trim(),
            "1",
            "its password is untouched: {}",
            still.stderr_str()
        );
        assert_eq!(
            root("select count(*) from information_schema.SCHEMATA where SCHEMA_NAME = 'alien'")
                .stdout_str()
                .trim(),
            "0"
        );
    });
}

/// `curl` an S3 request signed with the credentials in `env` (a service's environment).
fn s3_as(env: &str, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}"))
            .to_owned()
    };
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}", "-X", method])
        .args(["--aws-sigv4", &format!("aws:amz:{}:s3", var("AWS_REGION"))])
        .args([
            "--user",
            &format!(
                "{}:{}",
                var("AWS_ACCESS_KEY_ID"),
                var("AWS_SECRET_ACCESS_KEY")
            ),
        ])
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg(format!("{}{path}", var("AWS_ENDPOINT_URL")));
    let file = tempfile::NamedTempFile::new().unwrap();
    if let Some(b) = body {
        std::fs::write(file.path(), b).unwrap();
        cmd.arg("--data-binary")
            .arg(format!("@{}", file.path().display()));
    }
    let out = cmd.output().unwrap().stdout_str();
    let (text, code) = out.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), text.to_owned())
}

/// `s3: {"bucket": …, "quota": …}` and `s3: true` on a real Garage run by the agent under
/// the system manager: each service writes to its bucket through the env it was given
/// (`AWS_*`, `S3_BUCKET`); the quota is enforced by the server; one service's key reaches
/// no other service's bucket, even one of the same name; a second full run restarts nothing
/// and keeps the credentials; the secret key is in no unit file and not in the state.
#[test]
fn s3_buckets_on_garage_on_the_system_manager() {
    on_system_manager(|| {
        let fx = Fixture::file();
        let (s3, rpc) = (free_port(), free_port());
        let (p_shop, p_media) = (free_port(), free_port());
        fx.dm(&["init"]).ok();
        let infra = json!({"services": {"store": {"preset": "garage",
            "ports": {"s3": s3, "rpc": rpc}, "config": {"buckets": ["shared-assets"]}}}});
        fx.dm(&["set-infrastructure", &infra.to_string()]).ok();
        let repo = app_repo(&[
            // The service writes one object to its bucket with what it was given.
            (
                "bin/s3-app",
                "#!/bin/sh\nset -e\ncat VERSION > /tmp/visit\ncode=$(curl -s -o /dev/null -w '%{http_code}' -X PUT --aws-sigv4 \"aws:amz:$AWS_REGION:s3\" --user \"$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY\" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' --data-binary @/tmp/visit \"$AWS_ENDPOINT_URL/$S3_BUCKET/visit\")\n[ \"$code\" = 200 ] || { echo \"PUT answered $code\" >&2; exit 1; }\nexec python3 bin/hello\n",
            ),
        ]);
        for (name, port, s3_need) in [
            ("shop", p_shop, json!({"bucket": "uploads", "quota": "3kb"})),
            ("media", p_media, json!(true)),
        ] {
            let s = json!({
                "name": name, "namespace": if name == "shop" { "Biz/App.py" } else { "Biz/Other.py" },
                "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
                "exec": {"command": "bin/s3-app"},
                "env": {"PORT": port.to_string()},
                "health": {"http": {"path": "/healthz"}, "timeout": "60s", "interval": "200ms"},
                "infrastructure": {"s3": s3_need}
            });
            fx.dm(&["add-service", &s.to_string()]).ok();
        }
        run_in(repo.path(), "push.sh", &["Biz/App.py"], &fx.env).ok();
        let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
        fx.dm(&[
            "set-artifact",
            "media",
            &m["services"][0]["artifact"].to_string(),
        ])
        .ok();

        let out = run_checked(|args| agent(&fx, args));
        assert!(out.status.success(), "{}", out.stderr_str());
        assert_eq!(body(p_shop).as_deref(), Some("hello from v1\n"));
        assert_eq!(body(p_media).as_deref(), Some("hello from v1\n"));
        let (_, shop) = main_process("shop.service");
        let (_, media) = main_process("media.service");
        assert!(shop.contains("S3_BUCKET=uploads\n") && media.contains("S3_BUCKET=media\n"));
        assert!(
            shop.contains(&format!("AWS_ENDPOINT_URL=http://127.0.0.1:{s3}\n")),
            "{shop}"
        );
        // Each wrote to its own bucket.
        assert_eq!(
            s3_as(&shop, "GET", "/uploads/visit", None),
            (200, "v1".into())
        );
        assert_eq!(
            s3_as(&media, "GET", "/media/visit", None),
            (200, "v1".into())
        );
        // The quota holds: 3 kB in all.
        let (code, text) = s3_as(&shop, "PUT", "/uploads/big", Some(&[7u8; 3500]));
        assert_eq!(code, 403, "{text}");
        assert!(text.contains("quota"), "{text}");
        assert_eq!(
            s3_as(&shop, "PUT", "/uploads/small", Some(&[7u8; 1000])).0,
            200
        );
        // media's key reaches neither shop's bucket nor its objects.
        let (code, _) = s3_as(&media, "GET", "/uploads/visit", None);
        assert!(code == 403 || code == 404, "{code}");
        let (code, _) = s3_as(&media, "GET", "/uploads?list-type=2", None);
        assert!(code == 403 || code == 404, "{code}");
        // The preset's config made its bucket (asked through the admin API, a socket only
        // root reaches).
        let kept = std::fs::read_to_string("/var/lib/deployer-secrets/deployer/infra-store.garage")
            .unwrap();
        let token = kept
            .lines()
            .find_map(|l| l.strip_prefix("admin_token="))
            .unwrap();
        let socket = "/var/lib/deployer/infra/store/admin/admin.sock";
        let asked = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--unix-socket",
                socket,
            ])
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .arg("http://localhost/v2/GetBucketInfo?globalAlias=shared-assets")
            .output()
            .unwrap();
        let mode = std::fs::metadata("/var/lib/deployer/infra/store/admin")
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "only root reaches the admin socket");
        assert_eq!(asked.stdout_str(), "200");

        // The secret key stays out of unit files and the state.
        let secret = shop
            .lines()
            .find_map(|l| l.strip_prefix("AWS_SECRET_ACCESS_KEY="))
            .unwrap()
            .to_owned();
        let unit = std::fs::read_to_string("/run/systemd/system/shop.service").unwrap();
        deployer_tests::assert_not_leaked(
            &secret,
            &[
                unit,
                serde_json::to_string(&state()).unwrap(),
                out.stdout_str(),
                out.stderr_str(),
            ],
        );

        // A full run again: nothing restarts, the credentials stay.
        let pids = || -> Vec<String> {
            ["deployer-infra-store", "shop", "media"]
                .iter()
                .map(|u| systemctl(&["show", "-p", "MainPID", "--value", &format!("{u}.service")]))
                .collect()
        };
        let before = pids();
        fx.dm(&[
            "set-artifact",
            "media",
            &m["services"][0]["artifact"].to_string(),
        ])
        .ok();
        fx.dm(&["update-service", "media", r#"{"env": {"AGAIN": "1"}}"#])
            .ok();
        let out = run_checked(|args| agent(&fx, args));
        assert!(out.status.success(), "{}", out.stderr_str());
        let after = pids();
        assert_eq!(before[..2], after[..2], "the server and shop run on");
        let (_, media2) = main_process("media.service");
        let key = |env: &str| {
            env.lines()
                .find(|l| l.starts_with("AWS_ACCESS_KEY_ID="))
                .unwrap()
                .to_owned()
        };
        assert_eq!(key(&media2), key(&media), "the same key");
        assert_eq!(
            s3_as(&media2, "GET", "/media/visit", None),
            (200, "v1".into())
        );
    });
}
