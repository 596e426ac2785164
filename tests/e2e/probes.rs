//! Health probes and release commands against a real systemd user manager: an exec probe
//! runs in a transient unit of its own (not in the agent's cgroup), and every probe and
//! release command is killed at its timeout, so a hanging one fails the deploy (the previous
//! generation keeps serving) instead of hanging the agent or counting as healthy.
//!
//! Under a user manager `User=` cannot be set, so a probe runs with the manager's uid (here,
//! as the agent's); that an exec probe runs as the service's `exec.user` with its sandbox is
//! asserted by the system-manager suite (issue #15).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use deployer_tests::{OutputExt, bin, eventually, free_port};
use serde_json::{Value, json};

use crate::agent::{App, Host, body};
use crate::fixture::Fixture;

/// Write an executable script into the app's artifact (`app/bin/<name>`).
fn script(app: &App, name: &str, text: &str) {
    let path = app.path().join("app/bin").join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{text}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A probe that passes once the service answers on the `$PORT` of its environment.
const ANSWERS: &str = "exec python3 -c 'import os, urllib.request; \
urllib.request.urlopen(\"http://127.0.0.1:%s/healthz\" % os.environ[\"PORT\"], timeout=1)'";

/// hello with an exec probe `bin/probe <out>` (and, given, a release command).
fn declare(fx: &Fixture, port: u16, out: &Path, timeout: &str, release: Option<Value>) {
    fx.dm(&["init"]).ok();
    let mut service = json!({
        "name": "hello", "namespace": "Examples/Hello.py",
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
        "env": {"PORT": port.to_string()},
        "http": {"domain": "hello.test", "internalPort": port},
        "health": {
            "exec": {"command": ["bin/probe", out.display().to_string()]},
            "timeout": timeout, "interval": "200ms"
        }
    });
    if let Some(r) = release {
        service["release"] = r;
    }
    fx.dm(&["add-service", &service.to_string()]).ok();
}

/// `deployer-agent run --once`, which must return within 30 s (a liveness bound, not a
/// timing assertion): killed and failed otherwise.
fn run_once_bounded(host: &Host, fx: &Fixture) -> Output {
    deployer_tests::output_within(
        Command::new(bin("deployer-agent"))
            .args(host.args(&["run", "--once"]))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("HOME", std::env::temp_dir())
            .envs(host.env(fx)),
        Duration::from_secs(30),
        "the agent (hung?)",
    )
}

/// The loaded units of the host's manager matching `pattern`.
fn units(host: &Host, pattern: &str) -> String {
    host.sandbox
        .systemctl(&["list-units", "--all", "--plain", "--no-legend", pattern])
        .stdout_str()
}

/// Processes whose command line contains `marker` (this test's own temp path).
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

/// Nothing of the probe or release is left: no unit loaded, no process running.
fn nothing_left(host: &Host, pattern: &str, marker: &str) {
    let left = eventually(5, || {
        let (u, p) = (units(host, pattern), processes_with(marker));
        (u.trim().is_empty() && p.is_empty()).then_some(())
    });
    assert!(
        left.is_some(),
        "left behind: units {:?}, processes {:?}",
        units(host, pattern),
        processes_with(marker)
    );
}

fn own_uid() -> String {
    Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout_str()
        .trim()
        .to_owned()
}

#[test]
fn an_exec_probe_runs_in_a_transient_unit_of_its_own() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = App::new();
    let port = free_port();
    let out = host.dir.path().join("probe-out");
    declare(&fx, port, &out, "20s", None);
    app.set_version("v1", false);
    // The honest probe: records where and as whom it ran, checks the artifact is its
    // working directory and the service answers on the port of the service's environment.
    script(
        &app,
        "probe",
        &format!(
            "cat /proc/self/cgroup > \"$1.tmp\"\nid -u >> \"$1.tmp\"\nmv \"$1.tmp\" \"$1\"\n\
             test -f bin/hello || exit 1\n{ANSWERS}"
        ),
    );
    app.push(&fx);

    run_once_bounded(&host, &fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    assert_eq!(
        host.state()["services"]["hello"]["health"],
        json!("healthy")
    );
    let recorded = std::fs::read_to_string(&out).expect("the probe ran");
    let (cgroup, uid) = recorded.trim_end().rsplit_once('\n').unwrap();
    assert!(
        cgroup.contains("/hello.probe-") && cgroup.contains(".service"),
        "the probe ran in a transient unit of its own: {cgroup}"
    );
    let agents = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    assert_ne!(cgroup.trim(), agents.trim(), "not in the agent's cgroup");
    // A user manager cannot switch users: the probe has the manager's uid.
    assert_eq!(uid, own_uid());
    nothing_left(&host, "*.probe-*", &out.display().to_string());
}

#[test]
fn a_hanging_exec_probe_is_killed_at_the_health_deadline_and_rolled_back() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = App::new();
    let port = free_port();
    let out = host.dir.path().join("probe-out");
    let marker = out.display().to_string();
    declare(&fx, port, &out, "2s", None);
    app.set_version("v1", false);
    script(&app, "probe", ANSWERS);
    app.push(&fx);
    run_once_bounded(&host, &fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));

    // v2 and v3 bring probes that never answer in time: one sleeps 45 s, one forever, one
    // also ignores SIGTERM (killed with SIGKILL after the stop timeout).
    for (version, probe) in [
        ("v2", "sleep 45"),
        ("v3", "sleep infinity"),
        ("v4", "trap '' TERM\nwhile true; do sleep infinity; done"),
    ] {
        app.set_version(version, false);
        script(&app, "probe", probe);
        app.push(&fx);
        let run = run_once_bounded(&host, &fx);
        assert_eq!(run.code(), 8, "{version}: {}", run.stderr_str());
        assert!(
            run.stderr_str().contains("and was killed"),
            "{version}: {}",
            run.stderr_str()
        );
        // Rolled back: v1 serves, healthy (its own probe passes), the failure says why.
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"), "{version}");
        let state = host.state();
        let hello = &state["services"]["hello"];
        assert_eq!(hello["health"], json!("healthy"), "{version}: {hello}");
        let error = hello["failed"]["error"].as_str().unwrap();
        assert!(
            error.contains("bin/probe") && error.contains("was still running after"),
            "{version}: {error}"
        );
        assert!(!error.contains("unhealthy too"), "{version}: {error}");
        nothing_left(&host, "*.probe-*", &marker);
    }
}

#[test]
fn a_hanging_release_command_is_killed_at_its_timeout() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = App::new();
    let port = free_port();
    let out = host.dir.path().join("probe-out");
    let ran = host.dir.path().join("released");
    declare(
        &fx,
        port,
        &out,
        "20s",
        Some(json!({"command": format!("bin/migrate {}", ran.display()), "timeout": "2s"})),
    );
    app.set_version("v1", false);
    script(&app, "probe", ANSWERS);
    script(&app, "migrate", "echo v1 > \"$1\"");
    app.push(&fx);
    run_once_bounded(&host, &fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "v1\n");
    let unit = std::fs::read_to_string(host.unit_file("hello")).unwrap();
    assert!(!unit.contains("TimeoutStartSec"), "{unit}");

    // v2's migration hangs: killed at 2 s, the release fails, v1 keeps serving.
    app.set_version("v2", false);
    script(&app, "migrate", "echo started > \"$1\"\nsleep 600");
    app.push(&fx);
    let run = run_once_bounded(&host, &fx);
    assert_eq!(run.code(), 8, "{}", run.stderr_str());
    let stderr = run.stderr_str();
    assert!(
        stderr.contains("release command failed") && stderr.contains("timeout of 2s"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "started\n");
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    let state = host.state();
    let hello = &state["services"]["hello"];
    let error = hello["failed"]["error"].as_str().unwrap();
    assert!(
        error.contains("bin/migrate") && error.contains("was killed"),
        "{error}"
    );
    assert_eq!(hello["health"], json!("healthy"), "{hello}");
    assert!(
        hello["current"]["path"].as_str().unwrap() != "",
        "v1 is still the current generation: {hello}"
    );
    assert!(
        !host
            .unit_file("hello")
            .with_file_name("hello.release.service")
            .exists()
    );
    nothing_left(&host, "hello.release.service", &ran.display().to_string());
}

#[test]
fn an_infrastructure_health_check_is_killed_at_its_timeout() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = App::new();
    let (port, sp) = (free_port(), free_port());
    let marker = host.dir.path().join("probe-marker").display().to_string();
    fx.dm(&["init"]).ok();
    // A custom daemon whose readiness check never returns.
    let service = json!({
        "name": "hello", "namespace": "Examples/Hello.py",
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
        "env": {"PORT": port.to_string()},
        "http": {"domain": "hello.test", "internalPort": port},
        "health": {"http": {"path": "/healthz"}, "timeout": "20s", "interval": "200ms"},
        "infrastructure": {"services": {"search": {
            "type": "daemon",
            "command": ["/usr/bin/python3", "-m", "http.server", sp.to_string(), "--bind", "127.0.0.1"],
            "ports": {"http": sp},
            "startupTimeout": "2s",
            "healthCheck": {"exec": {"command": ["sh", "-c", "sleep infinity", &marker]}}
        }}}
    });
    fx.dm(&["add-service", &service.to_string()]).ok();
    app.set_version("v1", false);
    app.push(&fx);
    let run = run_once_bounded(&host, &fx);
    assert_eq!(run.code(), 8, "{}", run.stderr_str());
    let stderr = run.stderr_str();
    assert!(
        stderr.contains("not ready") && stderr.contains("and was killed"),
        "{stderr}"
    );
    assert!(body(port).is_none(), "hello waits for its infrastructure");
    nothing_left(&host, "*.probe-*", &marker);

    // The honest check: the daemon answers; the next run deploys.
    let check = format!(
        "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{sp}/', timeout=1)"
    );
    let patch = json!({"infrastructure": {"services": {"search": {
        "healthCheck": {"exec": {"command": ["python3", "-c", check]}}
    }}}});
    fx.dm(&["update-service", "hello", &patch.to_string()]).ok();
    run_once_bounded(&host, &fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    assert_eq!(host.is_active("deployer-infra-hello-search"), "active");
    nothing_left(&host, "*.probe-*", &marker);
}

/// Under the real system manager (scripts/systemd-system-sandbox.sh: `systemd --system` as
/// PID 1 of its own namespaces), with the agent as root in its production mode: the exec
/// probe runs as the service's `exec.user`, not as root, and inside the service's sandbox
/// (`ProtectSystem=strict`: it cannot write /etc), like the service itself.
#[test]
fn an_exec_probe_runs_as_the_service_user_under_the_system_manager() {
    let fx = Fixture::file();
    let app = App::new();
    let port = free_port();
    fx.dm(&["init"]).ok();
    let service = json!({
        "name": "hello", "namespace": "Examples/Hello.py",
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
        "exec": {"command": null, "user": "probeuser", "group": "probeuser"},
        "env": {"PORT": port.to_string()},
        "health": {
            "http": {"path": "/healthz", "port": port},
            "exec": {"command": ["/bin/sh", "-c",
                "id -u > \"$STATE_DIRECTORY/probe-uid\"; if touch /etc/probe-was-here 2>/dev/null; then echo writable; else echo read-only; fi > \"$STATE_DIRECTORY/probe-etc\""]},
            "timeout": "30s", "interval": "200ms"
        }
    });
    fx.dm(&["add-service", &service.to_string()]).ok();
    app.set_version("v1", false);
    app.push(&fx);

    // Everything below runs inside the sandbox; units see /srv/sysbox-share, not our /tmp.
    let inside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        inside.path(),
        format!(
            r#"set -u
useradd --system --no-create-home --user-group --shell /usr/sbin/nologin probeuser
mkdir -p "$SYSBOX_SHARE/secrets" && chmod 700 "$SYSBOX_SHARE/secrets"
{agent} --host biz --state-dir "$SYSBOX_SHARE/state" --secrets-dir "$SYSBOX_SHARE/secrets" --store {store} run --once
echo "agent-exit=$?"
echo "agent-uid=$(id -u)"
echo "user-uid=$(id -u probeuser)"
echo "probe-uid=$(cat /var/lib/deployer-hello/probe-uid)"
echo "probe-etc=$(cat /var/lib/deployer-hello/probe-etc)"
pid=$(systemctl show -p MainPID --value hello.service)
echo "service-uid=$(awk '/^Uid:/ {{print $2}}' /proc/$pid/status)"
echo "probe-units=$(systemctl list-units --all --no-legend '*.probe-*' | wc -l)"
"#,
            agent = bin("deployer-agent").display(),
            store = fx.url,
        ),
    )
    .unwrap();
    let sandbox = deployer_tests::repo_root().join("scripts/systemd-system-sandbox.sh");
    let out = deployer_tests::output_within(
        Command::new("bash")
            .arg(&sandbox)
            .args(["--", "bash"])
            .arg(inside.path()),
        Duration::from_secs(180),
        "the system-manager sandbox",
    );
    let text = out.stdout_str();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing:\n{text}\n{}", out.stderr_str()))
            .trim()
            .to_owned()
    };
    assert_eq!(value("agent-exit"), "0", "{text}\n{}", out.stderr_str());
    assert_eq!(value("agent-uid"), "0", "the agent runs as root");
    let user = value("user-uid");
    assert_ne!(user, "0");
    assert_eq!(value("probe-uid"), user, "the probe runs as exec.user");
    assert_eq!(value("service-uid"), user, "and so does the service");
    assert_eq!(value("probe-etc"), "read-only", "the probe is sandboxed");
    assert_eq!(value("probe-units"), "0", "no probe unit is left behind");
}
