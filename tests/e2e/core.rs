//! The agent core's defects, each from the seat of the operator who met it: generated names
//! that collided, units left running untracked, failure state that never cleared, a secrets
//! file created after the deploy, infrastructure that drifted or outlived its services, and
//! a report published outside the run lock. Real systemd user manager, real nginx and Redis.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use deployer_tests::{Nginx, OutputExt, bin, eventually, free_port, http_get_host};
use serde_json::{Value, json};

use crate::agent::{Host, body, declare_hello, hello_v1_running};
use crate::faults::run_with_fault;
use crate::fixture::Fixture;
use crate::infra::first_artifact;
use crate::proxy::nginx_host;

/// A hello service `name` on `port` running `artifact`, saying `version` at `<version>.test`.
fn hello(name: &str, port: u16, artifact: &Value, version: &str) -> Value {
    let mut s = crate::infra::hello(name, port, artifact);
    s["env"]["HELLO_VERSION"] = json!(version);
    s["http"]["domain"] = json!(format!("{version}.test"));
    s
}

/// Units matching `pattern` the manager has loaded and running.
fn active_units(host: &Host, pattern: &str) -> Vec<String> {
    let out = host.sandbox.systemctl(&[
        "list-units",
        "--no-legend",
        "--plain",
        "--state=active",
        pattern,
    ]);
    out.stdout_str()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Service `app-release` was `app`'s release unit: `app`'s release command overwrote its
/// unit file, ran it as a one-shot and deleted it.
#[test]
fn a_release_command_leaves_a_service_named_like_its_unit_alone() {
    let fx = Fixture::file();
    let (host, _app, port) = hello_v1_running(&fx);
    let other = free_port();
    let artifact = first_artifact(&fx);
    fx.dm(&[
        "add-service",
        &hello("hello-release", other, &artifact, "other").to_string(),
    ])
    .ok();
    host.run_once(&fx).ok();
    assert_eq!(body(other).as_deref(), Some("hello from other\n"));
    let unit_before = std::fs::read_to_string(host.unit_file("hello-release")).unwrap();

    fx.dm(&[
        "update-service",
        "hello",
        r#"{"release": {"command": "/bin/true"}}"#,
    ])
    .ok();
    let report = host.run_report(&fx);
    assert_eq!(
        report["services"]["hello"]["outcome"],
        json!("deployed"),
        "{report}"
    );
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    assert_eq!(host.is_active("hello-release"), "active");
    assert_eq!(body(other).as_deref(), Some("hello from other\n"));
    assert_eq!(
        std::fs::read_to_string(host.unit_file("hello-release")).unwrap(),
        unit_before,
        "hello-release's unit file is its own"
    );
}

/// nginx: `a-b` and `a_b` shared upstream `deployer_a_b`; nginx -t refused the file and no
/// route changed again. Now each has its own, and both are reachable.
#[test]
fn services_whose_names_differ_by_dash_and_underscore_get_their_own_routes() {
    let fx = Fixture::file();
    let nginx = Nginx::start();
    let host = nginx_host(&nginx, "0s");
    let port = free_port();
    declare_hello(&fx, port);
    let app = crate::agent::App::new();
    app.set_version("v1", false);
    app.push(&fx);
    let artifact = first_artifact(&fx);
    let (p1, p2) = (free_port(), free_port());
    fx.dm(&[
        "add-service",
        &hello("a-b", p1, &artifact, "dash").to_string(),
    ])
    .ok();
    fx.dm(&[
        "add-service",
        &hello("a_b", p2, &artifact, "underscore").to_string(),
    ])
    .ok();
    host.run_once(&fx).ok();
    // nginx reloads once per deploy: wait until the last config answers (a worker of an
    // earlier one sends an unknown domain to the first server block).
    let serves = |domain: &str, expected: &str| {
        eventually(10, || {
            http_get_host(nginx.port, domain, "/").filter(|(s, b)| *s == 200 && b == expected)
        })
        .is_some()
    };
    assert!(serves("dash.test", "hello from dash\n"));
    assert!(
        serves("underscore.test", "hello from underscore\n"),
        "{}",
        std::fs::read_to_string(nginx.config_file()).unwrap()
    );
    // Each upstream is its own: the one config serves both.
    assert!(serves("dash.test", "hello from dash\n"));
}

/// state.json moved aside (corrupt, or lost): the agent no longer knows what serves, but the
/// unit file of ours it finds is what did. A failed deploy over it puts it back, instead of
/// removing the only thing serving.
#[test]
fn a_failed_deploy_after_state_json_was_lost_puts_back_what_served() {
    let fx = Fixture::file();
    let (host, app, port) = hello_v1_running(&fx);
    let state = host.state_dir().join("state.json");
    std::fs::rename(&state, host.state_dir().join("state.json.corrupt")).unwrap();
    app.set_version("v2", true);
    app.push(&fx);
    let out = host.run_once(&fx);
    out.fails_with(8, "found on the host was put back");
    assert_eq!(
        eventually(10, || body(port)).as_deref(),
        Some("hello from v1\n")
    );
    assert_eq!(host.is_active("hello"), "active");
}

/// After a failed v2 was rolled back, `deploy-manifest rollback` to v1 and a run left
/// `failed`/`lastError` set forever while v1 served. A failure before anything changed (a
/// missing artifact) was logged as rolled back. Both now say what happened, and clear once
/// the manifest's spec runs healthily.
#[test]
fn failure_state_clears_once_the_manifest_spec_runs_healthily() {
    let fx = Fixture::file();
    let (host, app, port) = hello_v1_running(&fx);

    app.set_version("v2", true);
    app.push(&fx);
    let out = host.run_once(&fx);
    out.fails_with(8, "(rolled back)");
    assert!(host.state()["services"]["hello"]["failed"].is_object());

    fx.dm(&["rollback"]).ok();
    let report = host.run_report(&fx);
    assert_eq!(
        report["services"]["hello"]["outcome"],
        json!("kept"),
        "{report}"
    );
    let hello = &host.state()["services"]["hello"];
    assert!(hello.get("failed").is_none(), "{hello}");
    assert!(hello.get("lastError").is_none(), "{hello}");
    assert_eq!(hello["health"], json!("healthy"));
    let status = host.agent(&fx, &["status"]).ok().stdout_str();
    assert!(!status.contains("failed"), "{status}");

    // v3's artifact is missing from the store: nothing changes on the host, and the
    // message says so (not "rolled back").
    app.set_version("v3", false);
    app.push(&fx);
    let sha = first_artifact(&fx)["archive"]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = fx.url.strip_prefix("file://").unwrap();
    let artifacts = std::path::Path::new(store).join("artifacts");
    let moved = tempfile::tempdir().unwrap();
    let file = std::fs::read_dir(&artifacts)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&sha))
        .unwrap()
        .path();
    let aside = moved.path().join("artifact");
    std::fs::rename(&file, &aside).unwrap();
    let out = host.run_once(&fx);
    assert_eq!(out.code(), 8, "{}", out.stderr_str());
    let err = out.stderr_str();
    assert!(
        err.contains("(nothing changed; the next run retries)") && !err.contains("rolled back"),
        "{err}"
    );
    assert!(host.state()["services"]["hello"]["lastError"].is_string());
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    // The operator puts the artifact back: the next run deploys v3 and the error is gone.
    std::fs::rename(&aside, &file).unwrap();
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v3\n"));
    let hello = &host.state()["services"]["hello"];
    assert!(hello.get("lastError").is_none(), "{hello}");
}

/// With no secrets file at deploy time the unit named none, so the seed's "edit secrets,
/// restart the service" did nothing. Now the default file is named optionally, and every
/// run checks a file that appeared later.
#[test]
fn a_secrets_file_created_after_the_deploy_is_read_at_restart() {
    let fx = Fixture::file();
    let (host, _app, port) = hello_v1_running(&fx);
    let secrets = host.dir.path().join("secrets/hello.env");
    std::fs::write(&secrets, "HELLO_VERSION=from-secrets\n").unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    host.sandbox.systemctl(&["restart", "hello.service"]).ok();
    assert_eq!(
        eventually(10, || body(port)).as_deref(),
        Some("hello from from-secrets\n")
    );
    // Made readable by others: the run says so, and how to fix it.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).unwrap();
    host.run_once(&fx).ok();
    let warning = host.state()["services"]["hello"]["warning"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(warning.contains("chmod 600"), "{warning}");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    host.run_once(&fx).ok();
    assert!(host.state()["services"]["hello"].get("warning").is_none());
}

/// A zero-downtime upgrade killed once its new generation was healthy left its generation
/// (then `deployer-hello-<port>.service`) running untracked, forever, even after the service
/// was removed. Units of ours are now found from systemd and retired when no state knows them.
#[test]
fn a_generation_left_by_a_killed_run_is_retired() {
    let fx = Fixture::file();
    let nginx = Nginx::start();
    let host = nginx_host(&nginx, "0s");
    let port = free_port();
    declare_hello(&fx, port);
    fx.dm(&[
        "update-service",
        "hello",
        r#"{"http": {"zeroDowntime": true}}"#,
    ])
    .ok();
    let app = crate::agent::App::new();
    app.set_version("v1", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    assert_eq!(active_units(&host, "hello.*").len(), 1);

    app.set_version("v2", false);
    app.push(&fx);
    let killed = run_with_fault(&host, &fx, "healthy:kill");
    assert!(!killed.status.success());
    let left = active_units(&host, "hello.*");
    assert_eq!(left.len(), 2, "the killed run's generation runs: {left:?}");

    let report = host.run_report(&fx);
    let recorded = host.state()["services"]["hello"]["unit"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        active_units(&host, "hello.*"),
        std::slice::from_ref(&recorded),
        "{report}"
    );
    assert!(
        report["retired"]
            .as_array()
            .is_some_and(|r| !r.is_empty() && !r.contains(&json!(recorded))),
        "{report}"
    );

    // Removed from the manifest: nothing of it runs.
    fx.dm(&["remove-service", "hello"]).ok();
    host.run_once(&fx).ok();
    assert_eq!(active_units(&host, "hello*"), Vec::<String>::new());
}

/// `state.infra` was written and never read: a stopped Redis stayed stopped on idle runs,
/// and infrastructure no service needed any more ran forever. Now drift is repaired and
/// unused infrastructure stopped, its data kept.
#[test]
fn infrastructure_drift_is_repaired_and_unused_infrastructure_stopped() {
    let fx = Fixture::file();
    let (host, _app, port) = hello_v1_running(&fx);
    let rp = free_port();
    fx.dm(&[
        "set-infrastructure",
        &json!({"services": {"cache": {"preset": "redis", "ports": {"tcp": rp}}}}).to_string(),
    ])
    .ok();
    fx.dm(&[
        "update-service",
        "hello",
        r#"{"infrastructure": {"redis": true}}"#,
    ])
    .ok();
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    assert_eq!(
        active_units(&host, "deployer-infra-cache.service"),
        ["deployer-infra-cache.service"]
    );

    host.sandbox
        .systemctl(&["stop", "deployer-infra-cache.service"])
        .ok();
    let report = host.run_report(&fx);
    assert_eq!(report["unchanged"], json!(true), "{report}");
    assert_eq!(
        report["infra"]["cache"]["outcome"],
        json!("repaired"),
        "{report}"
    );
    assert!(
        eventually(10, || std::net::TcpStream::connect(("127.0.0.1", rp)).ok()).is_some(),
        "redis answers again"
    );

    fx.dm(&["update-service", "hello", r#"{"infrastructure": null}"#])
        .ok();
    let report = host.run_report(&fx);
    assert_eq!(
        report["infra"]["cache"]["outcome"],
        json!("stopped"),
        "{report}"
    );
    assert_eq!(
        active_units(&host, "deployer-infra-cache.service"),
        Vec::<String>::new()
    );
    let state = host.state();
    assert!(state["infra"].get("cache").is_none(), "{state}");
    assert!(
        state["orphans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o.as_str().unwrap().contains("infrastructure cache")),
        "{state}"
    );
    assert!(
        host.state_dir().join("infra/cache").exists(),
        "its data is kept"
    );
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
}

/// `publish` reloaded and rewrote state.json after the run lock was released, so a second
/// run could interleave with it. The lock is now held until the report is out.
#[test]
fn the_report_is_published_under_the_run_lock() {
    let fx = Fixture::file();
    let (host, _app, _port) = hello_v1_running(&fx);
    let log = tempfile::NamedTempFile::new().unwrap();
    let args = host.args(&["run", "--once"]);
    let mut env = host.env(&fx);
    env.push(("DEPLOYER_FAULT".into(), "publish:pause=20000".into()));
    let mut first = Command::new(bin("deployer-agent"))
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .envs(env)
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let paused = eventually(30, || {
        std::fs::read_to_string(log.path())
            .ok()
            .filter(|t| t.contains("DEPLOYER_FAULT: pausing"))
    });
    assert!(paused.is_some(), "the first run reaches its report");
    let second = host.run_once(&fx);
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(
        second.code(),
        deployer_agent::EXIT_BUSY,
        "{}",
        second.stderr_str()
    );
}

/// Caddy: each new route with a path was inserted first, so `/api` added after `/api/v1`
/// came before it and took `/api/v1/…`. A longer path now stays before a shorter one it is
/// under, whichever came first; and a path spelled `/api/` is the route `/api`.
#[test]
fn nested_caddy_routes_go_to_the_longest_path() {
    let fx = Fixture::file();
    let caddy = deployer_tests::Caddy::start();
    let mut host = Host::new();
    host.flags = crate::proxy::caddy_flags(&caddy);
    let port = free_port();
    declare_hello(&fx, port);
    let app = crate::agent::App::new();
    app.set_version("root", false);
    app.push(&fx);
    let artifact = first_artifact(&fx);
    let routed = |name: &str, port: u16, version: &str, path: &str| {
        let mut s = hello(name, port, &artifact, version);
        s["http"]["domain"] = json!("hello.test");
        s["http"]["path"] = json!(path);
        s.to_string()
    };
    let (p1, p2) = (free_port(), free_port());
    fx.dm(&["add-service", &routed("v1", p1, "api-v1", "/api/v1/")])
        .ok();
    host.run_once(&fx).ok();
    fx.dm(&["add-service", &routed("api", p2, "api", "/api")])
        .ok();
    host.run_once(&fx).ok();
    let via = |path: &'static str| {
        let port = caddy.http_port;
        move || {
            http_get_host(port, "hello.test", path)
                .filter(|(s, _)| *s == 200)
                .map(|(_, b)| b)
        }
    };
    assert_eq!(
        eventually(10, via("/api/v1/x")).as_deref(),
        Some("hello from api-v1\n")
    );
    assert_eq!(via("/api/v1")().as_deref(), Some("hello from api-v1\n"));
    assert_eq!(via("/api/x")().as_deref(), Some("hello from api\n"));
    assert_eq!(via("/apiary")().as_deref(), Some("hello from root\n"));
    assert_eq!(via("/")().as_deref(), Some("hello from root\n"));

    // A bucket writer plants a manifest in which the root service is replaced by one on
    // path `//` (once a matcher that Caddy put first and that took the whole domain). It is
    // the root path: it gets `/`, and nothing under /api moves.
    let store = std::path::PathBuf::from(fx.url.strip_prefix("file://").unwrap());
    let mut planted: Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    let services = planted["services"].as_array_mut().unwrap();
    services.retain(|s| s["name"] != "hello");
    let p3 = free_port();
    services.push(serde_json::from_str(&routed("evil", p3, "evil", "//")).unwrap());
    std::fs::write(
        store.join("manifest.json"),
        serde_json::to_vec(&planted).unwrap(),
    )
    .unwrap();
    host.run_once(&fx).ok();
    assert_eq!(
        eventually(10, via("/")).as_deref(),
        Some("hello from evil\n")
    );
    assert_eq!(via("/api/x")().as_deref(), Some("hello from api\n"));
    assert_eq!(via("/api/v1/x")().as_deref(), Some("hello from api-v1\n"));
}
