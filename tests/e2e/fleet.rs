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

/// Two hosts that run hello (not deployed yet), and the app, built at v1 and pushed.
fn two_hosts_and_hello_v1(fx: &Fixture) -> (Host, Host, u16, u16, App) {
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
    app.push(fx);
    (a, b, pa, pb, app)
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
    let (a, b, pa, pb, app) = two_hosts_and_hello_v1(&fx);
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

/// An object of the store as JSON (what anyone with read access sees).
fn get_json(fx: &Fixture, key: &str) -> Value {
    use deploy_manifest::store::{Fetched, ObjectStore};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        match fx.store().await.get(key, None).await.unwrap() {
            Fetched::Found { bytes, .. } => serde_json::from_slice(&bytes).unwrap(),
            _ => panic!("{key} is not in the store"),
        }
    })
}

/// Write an object straight into the store, as anyone with write access can.
fn put_json(fx: &Fixture, key: &str, value: &Value) {
    use deploy_manifest::store::{ObjectStore, Precondition};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bytes = serde_json::to_vec_pretty(value).unwrap();
        fx.store()
            .await
            .put(key, bytes, Precondition::None)
            .await
            .unwrap();
    });
}

fn status_with_keys(fx: &Fixture, keys: &std::path::Path) -> Vec<Value> {
    let out = fx
        .dm(&["status", "--json", "--host-keys", keys.to_str().unwrap()])
        .ok();
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// `deployer-agent host-key` of `h`: its public key, HOST:BASE64.
fn host_key(h: &Host, fx: &Fixture) -> String {
    h.agent(fx, &["host-key"])
        .ok()
        .stdout_str()
        .trim()
        .to_owned()
}

#[test]
fn signed_host_reports_count_and_spoofed_ones_do_not() {
    let fx = Fixture::s3();
    let (a, b, pa, pb, app) = two_hosts_and_hello_v1(&fx);

    // host-a's key is made by `host-key` before its first run, host-b's by its first run.
    let key_a = host_key(&a, &fx);
    assert!(key_a.starts_with("host-a:"), "{key_a}");
    let key_file = a.state_dir().join("host.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", key_file.display());
    assert_eq!(host_key(&a, &fx), key_a, "the key is made once, then kept");
    a.run_once(&fx).ok();
    let first_run = b.run_once(&fx).ok();
    let key_b = host_key(&b, &fx);
    assert!(key_b.starts_with("host-b:"), "{key_b}");
    assert!(
        first_run.stderr_str().contains(&key_b),
        "the run that made the key logs its public half: {}",
        first_run.stderr_str()
    );
    assert_eq!(body(pb).as_deref(), Some("hello from v1\n"));
    let report = get_json(&fx, "status/host-a.json");
    assert_eq!(report["signature"]["key"], json!("host-a"), "{report}");

    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("host-keys");
    std::fs::write(
        &keys,
        format!("# what `deployer-agent host-key` printed on each host\n{key_a}\n\n{key_b}\n"),
    )
    .unwrap();
    let keys_arg = keys.to_str().unwrap();
    for h in status_with_keys(&fx, &keys) {
        assert_eq!(h["verification"], json!("verified"), "{h}");
        assert_eq!(h["signedBy"], h["host"], "{h}");
    }
    for h in status(&fx) {
        assert_eq!(h["verification"], json!("unchecked"), "{h}");
    }
    let table = fx
        .dm(&["status", "--host-keys", keys_arg])
        .ok()
        .stdout_str();
    assert!(table.starts_with("HOST    VERIFIED"), "{table}");
    assert!(table.contains("host-a  yes"), "{table}");
    assert!(table.contains("host-b  yes"), "{table}");

    // v2 is pushed; host-a's agent runs it, host-b's agent is down.
    let mut agent_a = spawn_agent(&a, &fx, &["run", "--interval", "1s"]);
    app.set_version("v2", false);
    app.push(&fx);
    let manifest: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    let v2 = manifest["services"][0]["artifact"].clone();

    // The attacker copies host-b's real report and edits it to say host-b runs v2 healthy.
    let mut spoof = get_json(&fx, "status/host-b.json");
    spoof["manifestVersion"] = manifest["version"].clone();
    spoof["services"]["hello"]["artifact"] = v2.clone();
    spoof["services"]["hello"]["version"] = manifest["version"].clone();
    spoof["services"]["hello"]["health"] = json!("healthy");
    put_json(&fx, "status/host-b.json", &spoof);
    // And plants another object claiming to be host-b.
    let mut planted = spoof.clone();
    planted.as_object_mut().unwrap().remove("signature");
    put_json(&fx, "status/host-b-copy.json", &planted);

    // Without host keys the spoof is believed (the attack, as before): exit 0.
    let out = run_in(
        app.path(),
        "push.sh",
        &["Examples/Hello.py", "--wait", "--timeout", "90s"],
        &fx.env,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert_eq!(body(pa).as_deref(), Some("hello from v2\n"));
    assert_eq!(
        body(pb).as_deref(),
        Some("hello from v1\n"),
        "host-b never ran v2"
    );

    // With the hosts' keys it is not counted: the wait times out on host-b alone.
    let out = run_in(
        app.path(),
        "push.sh",
        &[
            "Examples/Hello.py",
            "--wait",
            "--timeout",
            "5s",
            "--host-keys",
            keys_arg,
        ],
        &fx.env,
    );
    assert_eq!(out.code(), 10, "{}", out.stderr_str());
    let err = out.stderr_str();
    assert!(
        err.contains("host-b: report not verified: status/host-b.json: its signature does not match its content"),
        "{err}"
    );
    let error = err
        .lines()
        .find(|l| l.starts_with("push: error:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        !error.contains("host-a"),
        "host-a's own report counts: {err}"
    );
    assert!(
        err.contains("push: hello: host-a: healthy (deployed in "),
        "each host's progress: {err}"
    );

    let hosts = status_with_keys(&fx, &keys);
    let verification = |object: &str| by_object(&hosts, object)["verification"].clone();
    assert_eq!(verification("status/host-a.json"), json!("verified"));
    assert_eq!(verification("status/host-b.json"), json!("bad-signature"));
    assert_eq!(
        verification("status/host-b-copy.json"),
        json!("wrong-object")
    );
    let table = fx
        .dm(&["status", "--host-keys", keys_arg])
        .ok()
        .stdout_str();
    assert!(table.contains("host-b  NO: bad signature"), "{table}");

    // The honest path: host-b's agent runs v2 and signs its report; the wait succeeds.
    b.run_once(&fx).ok();
    assert_eq!(body(pb).as_deref(), Some("hello from v2\n"));
    let mut env = fx.env.clone();
    env.push(("DEPLOY_HOST_KEYS".into(), keys_arg.to_owned()));
    let out = run_in(
        app.path(),
        "push.sh",
        &["Examples/Hello.py", "--wait", "--timeout", "90s"],
        &env,
    )
    .ok();
    assert!(
        out.stdout_str()
            .contains("every host running hello reports it healthy"),
        "{}",
        out.stdout_str()
    );
    assert_eq!(
        by_object(&status_with_keys(&fx, &keys), "status/host-b.json")["verification"],
        json!("verified")
    );
    agent_a.kill().unwrap();
    agent_a.wait().unwrap();
}

/// The entry of `deploy-manifest status --json` read from `object`.
fn by_object(hosts: &[Value], object: &str) -> Value {
    hosts
        .iter()
        .find(|h| h["object"] == json!(object))
        .unwrap_or_else(|| panic!("{object} in {hosts:?}"))
        .clone()
}

#[test]
fn report_text_reaches_the_terminal_escaped() {
    let fx = Fixture::file();
    fx.dm(&["init"]).ok();
    fx.dm(&[
        "add-service",
        r#"{"name": "hello", "namespace": "Examples/Hello.py", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["host-c"]}"#,
    ])
    .ok();
    let app = App::new();
    app.set_version("v1", false);
    app.push(&fx);
    let manifest: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    let artifact = manifest["services"][0]["artifact"].clone();

    // A report, written into the store, whose errors carry a colour code and a newline.
    let evil = "\u{1b}[31mred\nsecond line";
    let report = json!({
        "schemaVersion": 1, "host": "host-c", "agentVersion": "0.1.0",
        "reportedAt": deploy_manifest::repo::rfc3339(std::time::SystemTime::now()),
        "intervalSeconds": 300, "lastError": evil,
        "services": {"hello": {
            "artifact": artifact, "health": "unhealthy", "failedArtifact": artifact,
            "lastError": evil
        }}
    });
    put_json(&fx, "status/host-c.json", &report);

    let out = fx.dm(&["status"]).ok();
    assert!(!out.stdout.contains(&0x1b), "{:?}", out.stdout_str());
    let text = out.stdout_str();
    assert_eq!(text.lines().count(), 2, "a header and one row: {text:?}");
    let row = text.lines().find(|l| l.starts_with("host-c")).unwrap();
    assert!(
        row.ends_with("\\x1b[31mred\\nsecond line"),
        "the field is escaped on its own line: {row:?}"
    );
    // JSON keeps the exact text, escaped by JSON itself.
    let out = fx.dm(&["status", "--json"]).ok();
    assert!(!out.stdout.contains(&0x1b));
    let hosts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hosts[0]["lastError"], json!(evil));

    // push --wait's message about the failed host.
    let out = run_in(
        app.path(),
        "push.sh",
        &["Examples/Hello.py", "--wait", "--timeout", "30s"],
        &fx.env,
    );
    assert_eq!(out.code(), 8, "{}", out.stderr_str());
    assert!(!out.stderr.contains(&0x1b) && !out.stdout.contains(&0x1b));
    let err = out.stderr_str();
    assert!(
        err.contains("hello failed on host-c: \\x1b[31mred\\nsecond line"),
        "{err}"
    );
}

/// A host report as an agent writes it (unsigned), `health` for its one service.
fn synthetic_report(host: &str, health: &str) -> Value {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    json!({"schemaVersion": 1, "host": host, "agentVersion": "0.1.0", "reportedAt": now,
           "intervalSeconds": 300, "lastPoll": now,
           "services": {"api": {"artifact": {"storePath": "/nix/store/00000000000000000000000000000000-api"},
                                "health": health}}})
}

#[test]
fn a_second_status_over_an_unchanged_s3_fleet_costs_only_the_listing() {
    let fx = Fixture::s3();
    fx.dm(&["init"]).ok();
    let hosts: Vec<String> = (0..40).map(|i| format!("host-{i:02}")).collect();
    for h in &hosts {
        put_json(
            &fx,
            &format!("status/{h}.json"),
            &synthetic_report(h, "healthy"),
        );
    }
    let cache = tempfile::tempdir().unwrap();
    let mut env = fx.env.clone();
    env.push((
        "DEPLOY_CACHE_DIR".into(),
        cache.path().display().to_string(),
    ));
    // The requests one `status --json` makes, and what it shows: host → health.
    let status = || {
        let before = fx.s3_requests().len();
        let out = deployer_tests::run("deploy-manifest", &["status", "--json"], &env, None).ok();
        let made = fx.s3_requests()[before..].to_vec();
        let view: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        let health: Vec<(String, String)> = view
            .iter()
            .map(|h| {
                (
                    h["host"].as_str().unwrap().to_owned(),
                    h["services"][0]["health"]
                        .as_str()
                        .unwrap_or("-")
                        .to_owned(),
                )
            })
            .collect();
        (made, health)
    };
    let gets = |made: &[String]| {
        made.iter()
            .filter(|r| r.starts_with("GET /deploy/prod/status/"))
            .count()
    };

    let (made, first) = status();
    assert_eq!(first.len(), 40, "{first:?}");
    assert!(first.iter().all(|(_, h)| h == "healthy"));
    assert_eq!(gets(&made), 40, "{made:#?}");
    // Unchanged: the manifest and the listing, no report fetched again.
    let (made, second) = status();
    assert_eq!(second, first);
    assert_eq!(gets(&made), 0, "{made:#?}");
    assert!(made.len() <= 3, "{made:#?}");

    // A host's report changes (as its agent rewrites it): that one is fetched, and shown.
    put_json(
        &fx,
        "status/host-07.json",
        &synthetic_report("host-07", "unhealthy"),
    );
    let (made, third) = status();
    assert_eq!(gets(&made), 1, "{made:#?}");
    assert_eq!(third[7], ("host-07".to_owned(), "unhealthy".to_owned()));
    // A report removed from the store is gone from the view and from the cache.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use deploy_manifest::store::ObjectStore;
        fx.store()
            .await
            .delete("status/host-03.json")
            .await
            .unwrap()
    });
    let (made, fourth) = status();
    assert_eq!(gets(&made), 0, "{made:#?}");
    assert_eq!(fourth.len(), 39);
    assert!(!fourth.iter().any(|(h, _)| h == "host-03"));
    let cached: usize = walk_files(cache.path());
    assert_eq!(cached, 39, "one cached report per listed one");
    // Without the cache directory the answer is the same, fetched again.
    let (made, fifth) = {
        std::fs::remove_dir_all(cache.path()).unwrap();
        status()
    };
    assert_eq!(fifth, fourth);
    assert_eq!(gets(&made), 39);
}

fn walk_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}
