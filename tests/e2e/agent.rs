//! `deployer-agent` against a real systemd user manager (D-Bus), a real S3 server and
//! file://: deploy, upgrade, a broken release rolled back and not retried, removal, drift
//! repair, kill -9 mid-apply, bad manifests and unreachable stores.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use deployer_tests::{OutputExt, SystemdSandbox, bin, eventually, free_port, http_get, run_in};
use serde_json::{Value, json};

use crate::fixture::Fixture;
use crate::infra::main_pid;

const HELLO: &str = include_str!("../../examples/hello/bin/hello");

/// A host: a systemd sandbox, a state dir, a secrets dir, and the store it polls.
pub(crate) struct Host {
    pub(crate) sandbox: SystemdSandbox,
    pub(crate) dir: tempfile::TempDir,
    /// Extra agent flags on every run (e.g. the proxy's).
    pub(crate) flags: Vec<String>,
    /// Its name in the manifest's hosts.
    pub(crate) name: String,
}

impl Host {
    pub(crate) fn new() -> Host {
        Self::new_with(|_| {})
    }

    /// A host whose directory `setup` prepares before its systemd manager starts (a mount
    /// made later would not be seen inside the manager's private mount namespace).
    pub(crate) fn new_with(setup: impl FnOnce(&Path)) -> Host {
        let dir = tempfile::tempdir().unwrap();
        setup(dir.path());
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::set_permissions(
            dir.path().join("secrets"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        Host {
            sandbox: SystemdSandbox::start(),
            dir,
            flags: Vec::new(),
            name: "biz".to_owned(),
        }
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub(crate) fn env(&self, fx: &Fixture) -> Vec<(String, String)> {
        let mut env = fx.env.clone();
        env.extend(self.sandbox.env.iter().cloned());
        env
    }

    pub(crate) fn args<'a>(&'a self, extra: &[&'a str]) -> Vec<String> {
        let mut args = vec![
            "--user".to_owned(),
            "--host".to_owned(),
            self.name.clone(),
            "--state-dir".to_owned(),
            self.state_dir().display().to_string(),
            "--secrets-dir".to_owned(),
            self.dir.path().join("secrets").display().to_string(),
        ];
        args.extend(self.flags.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub(crate) fn agent(&self, fx: &Fixture, extra: &[&str]) -> Output {
        let args = self.args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        deployer_tests::run("deployer-agent", &args, &self.env(fx), None)
    }

    /// `run --once --json`, after `plan --json`: see [`run_checked`].
    pub(crate) fn run_once(&self, fx: &Fixture) -> Output {
        run_checked(|args| self.agent(fx, args))
    }

    /// [`Host::run_once`]'s report.
    pub(crate) fn run_report(&self, fx: &Fixture) -> Value {
        let out = self.run_once(fx);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", out.stdout_str(), out.stderr_str()))
    }

    /// The unit file the state records as `hash` (`units/<hash>` beside it).
    pub(crate) fn recorded_unit(&self, hash: &str) -> String {
        std::fs::read_to_string(self.state_dir().join("units").join(hash)).unwrap()
    }

    /// The names in `units/` beside the state.
    pub(crate) fn recorded_units(&self) -> Vec<String> {
        std::fs::read_dir(self.state_dir().join("units"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn state(&self) -> Value {
        let bytes = std::fs::read(self.state_dir().join("state.json")).expect("state.json exists");
        let state: Value = serde_json::from_slice(&bytes).expect("state.json is valid JSON");
        // Every state the agent leaves behind matches schemas/state.schema.json.
        if let Err(problems) = deployer_agent::state::validate(&state) {
            panic!("state.json does not match its schema: {problems:?}\n{state:#}");
        }
        state
    }

    /// The file of unit `<name>.service` (a service's, or `deployer-infra-<name>`).
    pub(crate) fn unit_file(&self, service: &str) -> PathBuf {
        Path::new(self.sandbox.var("XDG_RUNTIME_DIR"))
            .join(format!("systemd/user/{service}.service"))
    }

    pub(crate) fn is_active(&self, service: &str) -> String {
        let unit = format!("{service}.service");
        self.sandbox
            .systemctl(&["is-active", &unit])
            .stdout_str()
            .trim()
            .to_owned()
    }
}

/// `run --once --json`, after `plan --json`, through `agent` (the agent with a host's flags):
/// the run must execute exactly the steps the plan printed (or fail as the plan did). Every
/// e2e scenario goes through here, so each one checks that `deployer-agent plan` shows what
/// `run` does.
pub(crate) fn run_checked(agent: impl Fn(&[&str]) -> Output) -> Output {
    let plan = agent(&["--json", "plan"]);
    let run = agent(&["--json", "run", "--once"]);
    if !plan.status.success() {
        assert_eq!(
            run.code(),
            plan.code(),
            "plan failed, and run did otherwise:\n{}\n{}",
            plan.stderr_str(),
            run.stderr_str()
        );
        return run;
    }
    let planned: Value = serde_json::from_slice(&plan.stdout)
        .unwrap_or_else(|e| panic!("plan --json: {e}: {}", plan.stdout_str()));
    assert!(planned["steps"].is_array(), "{planned}");
    match serde_json::from_slice::<Value>(&run.stdout) {
        Ok(report) => assert_eq!(
            report["steps"],
            planned["steps"],
            "run did not execute the steps plan printed\nplan: {planned:#}\nrun: {report:#}\n{}",
            run.stderr_str()
        ),
        Err(_) => assert!(
            !run.status.success(),
            "run printed no report: {}",
            run.stdout_str()
        ),
    }
    run
}

/// A developer's repository that builds the hello service with a given version.
pub(crate) struct App {
    dir: tempfile::TempDir,
}

impl App {
    pub(crate) fn new() -> App {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("deploy.toml"),
            "[namespaces.\"Examples/Hello.py\"]\ncommand = \"true\"\noutput = \"app\"\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("app/bin")).unwrap();
        App { dir }
    }

    /// Build `version`; `crash` makes the program exit at once (a broken release).
    pub(crate) fn set_version(&self, version: &str, crash: bool) {
        let bin = self.dir.path().join("app/bin/hello");
        let program = if crash {
            "#!/bin/sh\necho 'broken release' >&2\nexit 3\n".to_owned()
        } else {
            HELLO.to_owned()
        };
        std::fs::write(&bin, program).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(self.dir.path().join("app/VERSION"), version).unwrap();
    }

    /// Build `version` so that it exits at once on a host whose environment has `var`
    /// set (its secrets file), and runs as usual elsewhere.
    pub(crate) fn set_version_broken_where(&self, version: &str, var: &str) {
        self.set_version(version, false);
        let bin = self.dir.path().join("app/bin");
        std::fs::rename(bin.join("hello"), bin.join("hello.py")).unwrap();
        let wrapper = format!(
            "#!/bin/sh\nif [ -n \"${var}\" ]; then echo 'broken here' >&2; exit 3; fi\nexec \"$(dirname \"$0\")/hello.py\" \"$@\"\n"
        );
        std::fs::write(bin.join("hello"), wrapper).unwrap();
        std::fs::set_permissions(bin.join("hello"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn push(&self, fx: &Fixture) {
        run_in(self.dir.path(), "push.sh", &["Examples/Hello.py"], &fx.env).ok();
    }
}

pub(crate) fn declare_hello(fx: &Fixture, port: u16) {
    fx.dm(&["init"]).ok();
    let service = json!({
        "name": "hello", "namespace": "Examples/Hello.py",
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
        "env": {"PORT": port.to_string()},
        "http": {"domain": "hello.test", "internalPort": port},
        "health": {"http": {"path": "/healthz"}, "timeout": "20s", "interval": "200ms"}
    });
    fx.dm(&["add-service", &service.to_string()]).ok();
}

/// A host running hello v1 from `fx`, the app that built it, and its port.
pub(crate) fn hello_v1_running(fx: &Fixture) -> (Host, App, u16) {
    let host = Host::new();
    let app = App::new();
    let port = free_port();
    declare_hello(fx, port);
    app.set_version("v1", false);
    app.push(fx);
    host.run_once(fx).ok();
    (host, app, port)
}

/// Start the agent in the background (to kill it, or to let it loop).
pub(crate) fn spawn_agent(host: &Host, fx: &Fixture, extra: &[&str]) -> std::process::Child {
    Command::new(bin("deployer-agent"))
        .args(host.args(extra))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .envs(host.env(fx))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

pub(crate) fn body(port: u16) -> Option<String> {
    http_get(port, "/")
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
}

fn lifecycle(fx: &Fixture) {
    // v1: deployed, healthy, reachable.
    let (host, app, port) = hello_v1_running(fx);
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    assert_eq!(host.is_active("hello"), "active");
    let state = host.state();
    assert_eq!(state["services"]["hello"]["health"], json!("healthy"));
    let v1_artifact = state["services"]["hello"]["current"]["artifact"].clone();
    let v1_sha = v1_artifact["archive"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let unit = std::fs::read_to_string(host.unit_file("hello")).unwrap();
    assert!(unit.contains("Environment=\"PORT="), "{unit}");

    // Nothing changed: one conditional GET, nothing redeployed.
    let report = host.run_report(fx);
    assert_eq!(report["unchanged"], json!(true), "{report}");
    assert_eq!(report["services"], json!({"hello": {"outcome": "kept"}}));
    assert_eq!(
        report["storeRequests"],
        json!(1),
        "an idle poll is one request: {report}"
    );
    assert_eq!(report["systemdChanges"], json!(0), "{report}");

    // v2 replaces v1.
    app.set_version("v2", false);
    app.push(fx);
    // Pre-fetch: the new artifact is downloaded and verified, nothing else changes.
    let fetched = host.agent(fx, &["fetch"]).ok().stdout_str();
    let path = fetched
        .trim()
        .strip_prefix("hello\t")
        .expect("one line per service");
    assert!(Path::new(path).join("bin/hello").exists(), "{fetched}");
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    let plan = host.agent(fx, &["plan"]).ok().stdout_str();
    assert!(
        plan.contains("deploy  hello") && plan.contains("new artifact"),
        "{plan}"
    );
    host.run_once(fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
    let state = host.state();
    assert_eq!(
        state["services"]["hello"]["previous"]["artifact"],
        v1_artifact
    );

    // A broken v3: fails its health check, v2 is restored and keeps serving, the failure is
    // recorded, and v3 is not retried on the next polls.
    app.set_version("v3", true);
    app.push(fx);
    let out = host.run_once(fx);
    out.fails_with(8, "hello:");
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
    let state = host.state();
    let hello = &state["services"]["hello"];
    assert!(
        hello["failed"]["error"]
            .as_str()
            .unwrap()
            .contains("health check failed"),
        "{hello}"
    );
    assert!(hello["current"]["path"].as_str().unwrap() != "", "{hello}");
    assert_eq!(hello["health"], json!("healthy"), "v2 runs again: {hello}");
    let failed_artifact = hello["failed"]["artifact"].clone();
    assert_ne!(failed_artifact, hello["current"]["artifact"]);
    // The unit file recorded for each generation is kept beside the state, named by its
    // hash: v2's is what the unit directory has; v3's, which no generation names, is gone.
    let unit_v2 = std::fs::read_to_string(host.unit_file("hello")).unwrap();
    let recorded = |g: &str| host.recorded_unit(hello[g]["unitHash"].as_str().unwrap());
    assert_eq!(unit_v2, recorded("current"));
    assert!(
        recorded("previous").contains(&v1_sha),
        "v1 is kept to roll back to"
    );
    assert_eq!(
        host.recorded_units().len(),
        2,
        "only the texts of current and previous"
    );

    // Touch the manifest (another service's change): v3 is still skipped.
    fx.dm(&["add-service", r#"{"name": "elsewhere", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["other"]}"#])
        .ok();
    let report = host.run_report(fx);
    assert_eq!(
        report["services"]["hello"]["outcome"],
        json!("skipped"),
        "{report}"
    );
    assert_eq!(
        report["systemdChanges"],
        json!(0),
        "nothing to change: {report}"
    );
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));

    // Drift: someone stops the unit; the next (idle) run starts it again.
    host.sandbox.systemctl(&["stop", "hello.service"]).ok();
    assert!(body(port).is_none());
    let report = host.run_report(fx);
    assert_eq!(
        report["services"]["hello"]["outcome"],
        json!("repaired"),
        "{report}"
    );
    assert!(eventually(10, || body(port)).is_some());

    // Removed from the manifest: unit stopped and gone, artifacts kept.
    fx.dm(&["remove-service", "hello"]).ok();
    host.run_once(fx).ok();
    assert!(!host.unit_file("hello").exists());
    assert_ne!(host.is_active("hello"), "active");
    assert!(body(port).is_none());
    assert!(host.state()["services"].get("hello").is_none());
    assert!(
        host.state_dir().join("store").read_dir().unwrap().count() >= 2,
        "artifacts kept"
    );

    let status = host.agent(fx, &["status"]).ok().stdout_str();
    assert!(status.contains("host biz"), "{status}");
}

#[test]
fn lifecycle_on_file_store() {
    lifecycle(&Fixture::file());
}

#[test]
fn lifecycle_on_s3() {
    lifecycle(&Fixture::s3());
}

#[test]
fn kill_9_mid_apply_then_the_next_run_converges() {
    let fx = Fixture::file();
    let (host, app, port) = hello_v1_running(&fx);
    app.set_version("v2", false);
    app.push(&fx);

    // Start a run and kill it while it waits for v2's health check (the unit is written
    // and restarted, state.json still says v1).
    let mut child = spawn_agent(&host, &fx, &["run", "--once"]);
    let unit_path = host.unit_file("hello");
    let v2_sha = artifact_sha(&fx);
    let written = eventually(30, || {
        std::fs::read_to_string(&unit_path)
            .ok()
            .filter(|u| u.contains(&v2_sha))
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(written.is_some(), "the run got as far as writing v2's unit");

    // The state is still valid JSON of the old generation, and the next run converges.
    let state = host.state();
    assert!(state["services"]["hello"]["current"]["artifact"].is_object());
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
    let state = host.state();
    let current = &state["services"]["hello"]["current"];
    assert!(
        current["path"].as_str().unwrap().contains(&v2_sha),
        "{current}"
    );
    assert!(state["services"]["hello"]["failed"].is_null());
}

/// An agent upgraded over a state an older one wrote (schema version 1: each generation's
/// unit file inline) migrates it as it loads it: the unit files go to `units/`, nothing is
/// restarted, and the state it writes is the current version.
#[test]
fn an_older_agents_state_is_migrated_and_nothing_restarts() {
    let fx = Fixture::file();
    let (host, _app, port) = hello_v1_running(&fx);
    let pid = main_pid(&host, "hello");
    let unit = std::fs::read_to_string(host.unit_file("hello")).unwrap();
    // The state as the older agent wrote it.
    let mut state = host.state();
    let current = state["services"]["hello"]["current"]
        .as_object_mut()
        .unwrap();
    current.remove("unitHash").unwrap();
    current.remove("envFiles").unwrap();
    current.insert("unitFile".into(), json!(unit));
    state["schemaVersion"] = json!(1);
    std::fs::write(host.state_dir().join("state.json"), state.to_string()).unwrap();
    std::fs::remove_dir_all(host.state_dir().join("units")).unwrap();
    // A command that takes no lock (plan, status) migrates in memory only.
    host.agent(&fx, &["plan"]).ok();
    host.agent(&fx, &["status"]).ok();
    assert!(!host.state_dir().join("units").exists());

    let report = host.run_report(&fx);
    assert_eq!(report["unchanged"], json!(true), "{report}");
    assert_eq!(report["services"], json!({"hello": {"outcome": "kept"}}));
    assert_eq!(report["systemdChanges"], json!(0), "{report}");
    assert_eq!(main_pid(&host, "hello"), pid, "not restarted");
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    let state = host.state();
    assert_eq!(state["schemaVersion"], json!(2));
    let current = &state["services"]["hello"]["current"];
    assert!(current.get("unitFile").is_none(), "{current}");
    assert_eq!(
        host.recorded_unit(current["unitHash"].as_str().unwrap()),
        unit
    );
    assert_eq!(
        current["envFiles"],
        json!([format!(
            "-{}/hello.env",
            host.dir.path().join("secrets").display()
        )]),
        "{current}"
    );
}

/// The unit file recorded for a generation is gone (removed by hand) and the unit file on
/// the host was edited: it cannot be put back, so the run says so, changes nothing, and
/// the next one deploys the manifest's spec again.
#[test]
fn a_changed_unit_whose_recorded_file_is_gone_is_deployed_again() {
    let fx = Fixture::file();
    let (host, _app, port) = hello_v1_running(&fx);
    std::fs::remove_dir_all(host.state_dir().join("units")).unwrap();
    let unit_path = host.unit_file("hello");
    let generated = std::fs::read_to_string(&unit_path).unwrap();
    std::fs::write(&unit_path, format!("{generated}# edited by hand\n")).unwrap();

    let out = host.run_once(&fx);
    out.fails_with(8, "the next run deploys it again from the manifest");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["services"]["hello"]["outcome"],
        json!("retrying"),
        "{report}"
    );
    assert_eq!(report["systemdChanges"], json!(0), "{report}");
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));

    let report = host.run_report(&fx);
    assert_eq!(
        report["unchanged"],
        json!(false),
        "planned in full: {report}"
    );
    assert_eq!(
        report["services"]["hello"]["outcome"],
        json!("deployed"),
        "{report}"
    );
    assert_eq!(std::fs::read_to_string(&unit_path).unwrap(), generated);
    let state = host.state();
    let hash = state["services"]["hello"]["current"]["unitHash"]
        .as_str()
        .unwrap();
    assert_eq!(host.recorded_unit(hash), generated);
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
}

/// The sha256 of the hello artifact the manifest names now.
pub(crate) fn artifact_sha(fx: &Fixture) -> String {
    let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    m["services"][0]["artifact"]["archive"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn bad_manifests_and_unreachable_stores_change_nothing() {
    let fx = Fixture::file();
    let (host, _app, port) = hello_v1_running(&fx);
    let before = host.state()["services"].clone();

    // A schema-invalid manifest.json (written behind the tools' back).
    let store_dir = PathBuf::from(fx.url.strip_prefix("file://").unwrap());
    let good = std::fs::read(store_dir.join("manifest.json")).unwrap();
    std::fs::write(
        store_dir.join("manifest.json"),
        r#"{"schemaVersion": 1, "services": [{"name": "hello", "hosts": "biz"}]}"#,
    )
    .unwrap();
    let out = host.run_once(&fx);
    out.fails_with(3, "services[0] (hello)");
    assert_eq!(host.state()["services"], before);
    assert!(
        host.state()["lastError"]
            .as_str()
            .unwrap()
            .contains("invalid manifest")
    );
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    std::fs::write(store_dir.join("manifest.json"), good).unwrap();

    // An unreachable S3 store.
    let closed = free_port();
    let mut env = host.sandbox.env.clone();
    env.extend([
        ("DEPLOY_STORE".to_owned(), "s3://deploy".to_owned()),
        (
            "AWS_ENDPOINT_URL".to_owned(),
            format!("http://127.0.0.1:{closed}"),
        ),
        ("AWS_ACCESS_KEY_ID".to_owned(), "x".to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), "x".to_owned()),
    ]);
    let args = host.args(&["run", "--once"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = deployer_tests::run("deployer-agent", &args, &env, None);
    assert_eq!(out.code(), 5, "{}", out.stderr_str());
    assert!(out.stderr_str().contains("cannot reach the store"));
    assert_eq!(host.state()["services"], before);
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
}

#[test]
fn secrets_file_with_wrong_mode_is_refused_with_the_fix() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = App::new();
    let port = free_port();
    declare_hello(&fx, port);
    let secrets = host.dir.path().join("secrets/hello.env");
    std::fs::write(&secrets, "API_TOKEN=s3cr3t-value\n").unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    app.set_version("v1", false);
    app.push(&fx);
    let out = host.run_once(&fx);
    assert_eq!(out.code(), 8);
    assert!(
        out.stderr_str().contains("chmod 600"),
        "{}",
        out.stderr_str()
    );
    assert!(!host.unit_file("hello").exists(), "nothing was installed");

    // Fixed on the host, nothing changed in the manifest: the next run deploys, the unit
    // references the file, and the value is nowhere but there.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = host.run_once(&fx).ok();
    assert!(body(port).is_some());
    let unit = std::fs::read_to_string(host.unit_file("hello")).unwrap();
    assert!(
        unit.contains(&format!("EnvironmentFile=-{}", secrets.display())),
        "{unit}"
    );
    // Every place the agent writes: unit file, state, its host report in the store, output.
    let store = PathBuf::from(fx.url.strip_prefix("file://").unwrap());
    deployer_tests::assert_not_leaked(
        "s3cr3t-value",
        &[
            unit,
            std::fs::read_to_string(host.state_dir().join("state.json")).unwrap(),
            std::fs::read_to_string(store.join("status/biz.json")).unwrap(),
            out.stdout_str(),
            out.stderr_str(),
        ],
    );
}

#[test]
fn nix_artifact_is_fetched_from_the_store_cache_and_run() {
    let fx = Fixture::s3();
    let host = Host::new();
    let port = free_port();
    declare_hello(&fx, port);
    // A Nix-built hello: its closure goes to the store's nix-cache/ and is then removed
    // from this machine's /nix/store, so the agent has to fetch and import it.
    let repo = tempfile::tempdir().unwrap();
    let (path, stamp) = push_nix_hello(&fx, repo.path(), "nix", &[]);
    assert!(
        !Path::new(&path).exists(),
        "{path} is gone from this machine"
    );

    host.run_once(&fx).ok();
    assert!(Path::new(&path).exists(), "the agent imported {path}");
    assert_eq!(body(port), Some(format!("hello from {stamp}\n")));
    let unit = std::fs::read_to_string(host.unit_file("hello")).unwrap();
    assert!(
        unit.contains(&format!("ExecStart=\"{path}/bin/hello\"")),
        "{unit}"
    );
}

#[test]
fn the_loop_mode_polls_and_deploys_without_being_asked() {
    let fx = Fixture::file();
    let host = Host::new();
    let app = App::new();
    let port = free_port();
    declare_hello(&fx, port);
    app.set_version("v1", false);
    app.push(&fx);
    let mut agent = spawn_agent(&host, &fx, &["run", "--interval", "1s"]);
    let v1 = eventually(60, || body(port).filter(|b| b.contains("v1")));
    app.set_version("v2", false);
    app.push(&fx);
    let v2 = eventually(60, || body(port).filter(|b| b.contains("v2")));
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(v1.is_some() && v2.is_some(), "v1 {v1:?}, v2 {v2:?}");
}

#[test]
fn nix_closures_must_be_signed_by_a_trusted_key() {
    let fx = Fixture::file();
    let mut host = Host::new();
    let port = free_port();
    declare_hello(&fx, port);
    let repo = tempfile::tempdir().unwrap();
    let keys = repo.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    for name in ["good", "other"] {
        run_in(
            &keys,
            "nix-store",
            &[
                "--generate-binary-cache-key",
                &format!("{name}-1"),
                &format!("{name}.sk"),
                &format!("{name}.pk"),
            ],
            &[],
        )
        .ok();
    }
    let secret = keys.join("good.sk").display().to_string();
    let (path, stamp) = push_nix_hello(
        &fx,
        repo.path(),
        "signed",
        &[("DEPLOY_NIX_SECRET_KEY", &secret)],
    );

    // Trusting another key: the closure is refused and nothing is imported.
    host.flags = vec![
        "--nix-trusted-keys".into(),
        keys.join("other.pk").display().to_string(),
    ];
    let out = host.run_once(&fx);
    out.fails_with(8, "no valid signature");
    assert!(!Path::new(&path).exists(), "nothing was imported");
    assert!(body(port).is_none());

    // Trusting the signer: imported and serving.
    host.flags = vec![
        "--nix-trusted-keys".into(),
        keys.join("good.pk").display().to_string(),
    ];
    host.run_once(&fx).ok();
    assert!(Path::new(&path).exists());
    assert_eq!(body(port), Some(format!("hello from {stamp}\n")));
}

/// Build hello with the nix builder in `repo` (content unique to this run), push it with
/// `env`, then delete the store path from this machine so an agent has to fetch it.
/// Returns the store path and the version the service will answer with.
fn push_nix_hello(
    fx: &Fixture,
    repo: &Path,
    label: &str,
    env: &[(&str, &str)],
) -> (String, String) {
    let stamp = format!("{label} {:?}", std::time::SystemTime::now());
    std::fs::create_dir_all(repo.join("src/bin")).unwrap();
    std::fs::write(repo.join("src/bin/hello"), HELLO).unwrap();
    std::fs::set_permissions(
        repo.join("src/bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(repo.join("src/VERSION"), &stamp).unwrap();
    std::fs::write(
        repo.join("deploy.toml"),
        "[namespaces.\"Examples/Hello.py\"]\nbuilder = \"nix\"\ncommand = \"true\"\noutput = \"src\"\n",
    )
    .unwrap();
    let mut all = fx.env.clone();
    all.push((
        "DEPLOY_NIX_STAGING".into(),
        repo.join(".staging").display().to_string(),
    ));
    all.push(("NIX_CONFIG".into(), "substituters =".into()));
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    run_in(repo, "push.sh", &["Examples/Hello.py"], &all).ok();
    let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    let path = m["services"][0]["artifact"]["storePath"]
        .as_str()
        .unwrap()
        .to_owned();
    run_in(repo, "nix-store", &["--delete", &path], &[]).ok();
    (path, stamp)
}
