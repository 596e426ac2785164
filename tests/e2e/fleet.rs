//! Several agents (own sandbox, state and name each) against one real S3 server: host
//! reports, `deploy-manifest status`, `push --wait`, silent agents, metrics.

use std::os::unix::fs::PermissionsExt;

use deployer_tests::{OutputExt, eventually, free_port, run_in};
use serde_json::{Value, json};

use crate::agent::{App, Host, body, spawn_agent};
use crate::fixture::Fixture;

fn host(name: &str, port: u16) -> Host {
    let mut h = Host::new();
    h.name = name.to_owned();
    h.flags = vec![
        "--metrics-file".into(),
        h.dir
            .path()
            .join("metrics/deployer.prom")
            .display()
            .to_string(),
    ];
    // Both hosts are this machine: each gives the service its own port through its
    // secrets file (EnvironmentFile= overrides Environment=).
    let env = h.dir.path().join("secrets/hello.env");
    std::fs::write(&env, format!("PORT={port}\n")).unwrap();
    std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600)).unwrap();
    h
}

fn status(fx: &Fixture) -> Vec<Value> {
    let out = fx.dm(&["status", "--json"]).ok();
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn fleet_status_push_wait_silent_hosts_and_metrics() {
    let fx = Fixture::s3();
    let (pa, pb) = (free_port(), free_port());
    let (a, b) = (host("host-a", pa), host("host-b", pb));
    fx.dm(&["init"]).ok();
    fx.dm(&[
        "add-service",
        r#"{"name": "hello", "namespace": "Examples/Hello.py", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["host-a", "host-b"]}"#,
    ])
    .ok();
    let app = App::new();
    app.set_version("v1", false);
    app.push(&fx);
    a.run_once(&fx).ok();
    b.run_once(&fx).ok();
    assert_eq!(body(pa).as_deref(), Some("hello from v1\n"));
    assert_eq!(body(pb).as_deref(), Some("hello from v1\n"));

    let hosts = status(&fx);
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    for (h, name) in hosts.iter().zip(["host-a", "host-b"]) {
        assert_eq!(h["host"], json!(name));
        assert_eq!(h["state"], json!("ok"), "{h}");
        assert_eq!(h["services"][0]["service"], json!("hello"));
        assert_eq!(h["services"][0]["health"], json!("healthy"));
        assert_eq!(h["services"][0]["current"], json!(true));
    }
    let table = fx.dm(&["status"]).ok().stdout_str();
    assert!(
        table.contains("host-a") && table.contains("host-b") && table.contains("healthy"),
        "{table}"
    );

    let metrics = std::fs::read_to_string(a.dir.path().join("metrics/deployer.prom")).unwrap();
    assert!(
        metrics.contains("deployer_service_healthy{service=\"hello\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("deployer_deploys_total{service=\"hello\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE deployer_rollbacks_total counter"),
        "{metrics}"
    );
    let last = metrics
        .lines()
        .find_map(|l| l.strip_prefix("deployer_last_successful_poll_timestamp_seconds "))
        .unwrap();
    assert!(last.parse::<u64>().unwrap() > 1_700_000_000, "{last}");

    // Both agents poll every second; push --wait returns once both run v2 healthy.
    let mut agents = [
        spawn_agent(&a, &fx, &["run", "--interval", "1s"]),
        spawn_agent(&b, &fx, &["run", "--interval", "1s"]),
    ];
    app.set_version("v2", false);
    let out = run_in(
        app.path(),
        "push.sh",
        &["Examples/Hello.py", "--wait", "--timeout", "90s"],
        &fx.env,
    )
    .ok();
    assert!(
        out.stdout_str()
            .contains("every host running hello reports it healthy"),
        "{}",
        out.stdout_str()
    );
    assert_eq!(body(pa).as_deref(), Some("hello from v2\n"));
    assert_eq!(body(pb).as_deref(), Some("hello from v2\n"));

    // A broken v3: --wait fails with what the hosts reported.
    app.set_version("v3", true);
    let out = run_in(
        app.path(),
        "push.sh",
        &["Examples/Hello.py", "--wait", "--timeout", "90s"],
        &fx.env,
    );
    assert_eq!(out.code(), 8, "{}", out.stderr_str());
    let err = out.stderr_str();
    assert!(err.contains("hello failed on host-"), "{err}");
    assert!(err.contains("health check failed"), "{err}");

    // host-a's agent dies: after 3 of its intervals it shows as silent, not as failing.
    agents[0].kill().unwrap();
    agents[0].wait().unwrap();
    let silent = eventually(20, || {
        let hosts = status(&fx);
        (hosts[0]["state"] == json!("silent")).then_some(hosts)
    });
    let hosts = silent.expect("host-a shows as silent");
    assert_ne!(
        hosts[1]["state"],
        json!("silent"),
        "host-b still reports: {}",
        hosts[1]
    );
    agents[1].kill().unwrap();
    agents[1].wait().unwrap();
}
