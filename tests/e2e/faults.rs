//! Fault injection: the agent killed at every apply step, the store cut mid-run, a full
//! state disk, 20 pushes at once. In every case what was running keeps running, state.json
//! stays valid, and the next run converges.

use std::process::{Command, Output, Stdio};

use deployer_tests::{OutputExt, bin, eventually, free_port, run_in};
use serde_json::{Value, json};

use crate::agent::{App, Host, artifact_sha, body, declare_hello, hello_v1_running};
use crate::fixture::Fixture;

/// `deployer-agent run --once` with `DEPLOYER_FAULT` set.
pub(crate) fn run_with_fault(host: &Host, fx: &Fixture, fault: &str) -> Output {
    let args = host.args(&["run", "--once"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut env = host.env(fx);
    env.push(("DEPLOYER_FAULT".into(), fault.into()));
    deployer_tests::run("deployer-agent", &args, &env, None)
}

fn current_sha(host: &Host) -> String {
    host.state()["services"]["hello"]["current"]["artifact"]["archive"]["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn killed_at_every_apply_step_the_next_run_converges() {
    let fx = Fixture::file();
    let (host, app, port) = hello_v1_running(&fx);
    for (i, step) in [
        "manifest",
        "fetched",
        "unit-written",
        "restarted",
        "healthy",
        "saved",
    ]
    .iter()
    .enumerate()
    {
        let version = format!("v{}", i + 2);
        app.set_version(&version, false);
        app.push(&fx);
        let out = run_with_fault(&host, &fx, &format!("{step}:kill"));
        assert_eq!(
            out.status.code(),
            None,
            "{step}: killed by a signal: {}",
            out.stderr_str()
        );
        // state.json is whole and valid (Host::state checks the schema); the service answers.
        let _ = host.state();
        assert!(
            eventually(15, || body(port)).is_some(),
            "{step}: the service is down after the kill"
        );
        host.run_once(&fx).ok();
        assert_eq!(
            body(port),
            Some(format!("hello from {version}\n")),
            "after {step}"
        );
        assert_eq!(current_sha(&host), artifact_sha(&fx), "after {step}");
    }
}

#[test]
fn store_cut_mid_run_keeps_the_running_version() {
    let mut fx = Fixture::s3();
    let (host, app, port) = hello_v1_running(&fx);
    app.set_version("v2", false);
    app.push(&fx);

    // The agent fetched the manifest and waits; the store goes away; then it goes on.
    let mut env = host.env(&fx);
    env.push(("DEPLOYER_FAULT".into(), "manifest:pause=2000".into()));
    let child = Command::new(bin("deployer-agent"))
        .args(host.args(&["run", "--once"]))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    fx.stop_s3();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(8), "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("cannot reach the store"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    let state = host.state();
    assert!(
        state["services"]["hello"]["lastError"]
            .as_str()
            .unwrap()
            .contains("cannot reach")
    );
    assert!(
        state["services"]["hello"]["failed"].is_null(),
        "a store outage is retried, not blamed on v2"
    );
    assert!(
        state.get("manifestEtag").is_none(),
        "the next run plans again"
    );
}

/// A size-limited tmpfs mounted over a directory, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap()
            .ok();
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_state_disk_changes_nothing_until_there_is_room() {
    let fx = Fixture::file();
    let mut disk = None;
    let host = Host::new_with(|dir| disk = Some(Tmpfs::mount(&dir.join("state"), "4m")));
    let app = App::new();
    let port = free_port();
    declare_hello(&fx, port);
    app.set_version("v1", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    let before = host.state();

    // Fill the disk to the last byte.
    let filler = host.state_dir().join("filler");
    let _ = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", filler.display()),
            "bs=64k",
        ])
        .stderr(Stdio::null())
        .status();
    app.set_version("v2", false);
    app.push(&fx);
    let out = host.run_once(&fx);
    assert_ne!(
        out.code(),
        0,
        "a full disk is an error: {}",
        out.stderr_str()
    );
    assert!(
        out.stderr_str().contains("No space left on device"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    assert_eq!(
        host.state()["services"]["hello"]["current"],
        before["services"]["hello"]["current"]
    );
    assert!(
        !host.state_dir().join("store").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp-")),
        "no half-fetched artifact is left behind"
    );

    std::fs::remove_file(&filler).unwrap();
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
    // Stop the manager (and the service) before the disk goes.
    drop(host);
    drop(disk);
}

#[test]
fn twenty_pushes_at_once_all_land() {
    let fx = Fixture::s3();
    let repo = tempfile::tempdir().unwrap();
    let mut config = String::new();
    fx.dm(&["init"]).ok();
    for i in 0..20 {
        config.push_str(&format!(
            "[namespaces.\"Biz/S{i}.py\"]\ncommand = \"mkdir -p out{i} && echo {i} > out{i}/file\"\noutput = \"out{i}\"\n"
        ));
        let s = json!({"name": format!("s{i:02}"), "namespace": format!("Biz/S{i}.py"),
            "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": []});
        fx.dm(&["add-service", &s.to_string()]).ok();
    }
    std::fs::write(repo.path().join("deploy.toml"), config).unwrap();
    let before = fx.dm(&["list", "--json"]).ok().stdout;
    let before = serde_json::from_slice::<Value>(&before)
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    let outputs: Vec<Output> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let (dir, env) = (repo.path(), &fx.env);
                scope.spawn(move || run_in(dir, "push.sh", &[&format!("Biz/S{i}.py")], env))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for out in outputs {
        out.ok();
    }
    let m: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    let archives = m["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["artifact"]["archive"].is_object())
        .count();
    assert_eq!(archives, 20, "every push landed");
    let after = fx.dm(&["list", "--json"]).ok().stdout;
    let after = serde_json::from_slice::<Value>(&after)
        .unwrap()
        .as_array()
        .unwrap()
        .len();
    assert_eq!(after, before + 20);
}
