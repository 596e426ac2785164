//! The NixOS module (parsed and evaluated against a stand-in module system with real Nix)
//! and the shipped deployer.service / deployer.timer (run under a real systemd user
//! manager: `systemctl --user start deployer` deploys).

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use deployer_tests::{
    OutputExt, SystemdSandbox, bin, eventually, free_port, http_get, repo_root, run_in,
};
use serde_json::{Value, json};

use crate::fixture::Fixture;

/// The module evaluated with `settings` (a Nix attribute set) by `nixos-module/tests/eval.nix`.
pub(crate) fn eval(settings: &str) -> Output {
    Command::new("nix-instantiate")
        .current_dir(repo_root())
        .args([
            "--eval",
            "--strict",
            "--json",
            "nixos-module/tests/eval.nix",
            "--arg",
            "settings",
            settings,
        ])
        .output()
        .expect("nix-instantiate runs")
}

fn eval_ok(settings: &str) -> Value {
    let out = eval(settings).ok();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout_str()))
}

#[test]
fn module_and_flake_parse() {
    for file in [
        "nixos-module/default.nix",
        "flake.nix",
        "nixos-module/tests/eval.nix",
    ] {
        Command::new("nix-instantiate")
            .current_dir(repo_root())
            .args(["--parse", file])
            .output()
            .unwrap()
            .ok();
    }
}

#[test]
fn module_options_defaults_and_units() {
    let v = eval_ok(r#"{ enable = true; store = "s3://bucket/prefix"; }"#);
    let mut options: Vec<&str> = v["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    options.sort();
    assert_eq!(
        options,
        [
            "caddyAdmin",
            "enable",
            "environmentFile",
            "extraArgs",
            "historyKeep",
            "hostName",
            "interval",
            "metricsFile",
            "mode",
            "nixTrustedKeysFile",
            "notifyCommand",
            "notifyUrl",
            "openrestyConfig",
            "openrestyReload",
            "package",
            "proxy",
            "secretsDir",
            "stateDir",
            "store",
            "trustedKeysFile"
        ]
    );
    let d = &v["defaults"];
    assert_eq!(d["interval"], json!("5min"));
    assert_eq!(
        d["hostName"],
        json!("biz"),
        "defaults to networking.hostName"
    );
    assert_eq!(d["stateDir"], json!("/var/lib/deployer"));
    assert_eq!(d["secretsDir"], json!("/var/lib/deployer-secrets"));
    assert_eq!(d["proxy"], json!("none"));
    assert_eq!(d["environmentFile"], Value::Null);
    assert_eq!(v["failedAssertions"], json!([]));

    let service = &v["config"]["systemd"]["services"]["deployer"];
    assert_eq!(service["serviceConfig"]["Type"], json!("oneshot"));
    let exec = service["serviceConfig"]["ExecStart"].as_str().unwrap();
    assert!(exec.starts_with("'/nix/store/00000000000000000000000000000000-deployer-agent/bin/deployer-agent' '--store' 's3://bucket/prefix' '--host' 'biz'"), "{exec}");
    assert!(exec.ends_with("'run' '--once'"), "{exec}");
    assert_eq!(service["after"], json!(["network-online.target"]));
    assert_eq!(service["wants"], json!(["network-online.target"]));
    assert!(service["serviceConfig"].get("EnvironmentFile").is_none());
    let timer = &v["config"]["systemd"]["timers"]["deployer"];
    assert_eq!(timer["wantedBy"], json!(["timers.target"]));
    assert_eq!(timer["timerConfig"]["OnUnitActiveSec"], json!("5min"));
    assert_eq!(timer["timerConfig"]["OnBootSec"], json!("1min"));
    assert_eq!(timer["timerConfig"]["Persistent"], json!(true));
    assert!(
        v["config"]["systemd"]["tmpfiles"]["rules"]
            .as_array()
            .unwrap()
            .contains(&json!("d /var/lib/deployer-secrets 0700 root root -"))
    );
}

#[test]
fn module_settings_flow_into_the_units() {
    let v = eval_ok(
        r#"{ enable = true; store = "file:///srv/store"; hostName = "web-1"; interval = "10min";
             environmentFile = "/run/keys/deployer.env"; extraArgs = [ "--unit-dir" "/run/x y" ]; }"#,
    );
    let sc = &v["config"]["systemd"]["services"]["deployer"]["serviceConfig"];
    assert_eq!(sc["EnvironmentFile"], json!("/run/keys/deployer.env"));
    let exec = sc["ExecStart"].as_str().unwrap();
    assert!(
        exec.contains("'--host' 'web-1'")
            && exec.contains("'--unit-dir' '/run/x y' 'run' '--once'"),
        "{exec}"
    );
    assert_eq!(
        v["config"]["systemd"]["timers"]["deployer"]["timerConfig"]["OnUnitActiveSec"],
        json!("10min")
    );

    // Disabled: nothing is defined.
    let off = eval_ok(r#"{ store = "s3://b/p"; }"#);
    assert_eq!(off["enabled"], json!(false));
    assert_eq!(off["config"], json!({}));
    // The proxy settings become agent flags.
    let caddy = eval_ok(
        r#"{ enable = true; store = "s3://b/p"; proxy = "caddy"; caddyAdmin = "http://127.0.0.1:2020"; }"#,
    );
    let exec = caddy["config"]["systemd"]["services"]["deployer"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    assert!(
        exec.contains("'--proxy' 'caddy' '--caddy-admin' 'http://127.0.0.1:2020'"),
        "{exec}"
    );
    let nginx = eval_ok(r#"{ enable = true; store = "s3://b/p"; proxy = "openresty"; }"#);
    let service = &nginx["config"]["systemd"]["services"]["deployer"];
    let exec = service["serviceConfig"]["ExecStart"].as_str().unwrap();
    assert!(
        exec.contains("'--proxy' 'openresty' '--nginx-config' '/etc/nginx/conf.d/deployer.conf' '--nginx-reload' 'nginx -s reload'"),
        "{exec}"
    );
    assert_eq!(
        service["path"].as_array().unwrap().len(),
        3,
        "nix, systemd (journalctl) and nginx are on the agent's PATH"
    );
    // Trust settings become flags.
    let signed = eval_ok(
        r#"{ enable = true; store = "s3://b/p"; trustedKeysFile = "/etc/deployer/keys"; nixTrustedKeysFile = "/etc/deployer/nix-keys"; }"#,
    );
    let exec = signed["config"]["systemd"]["services"]["deployer"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    assert!(
        exec.contains("'--trusted-keys' '/etc/deployer/keys' '--nix-trusted-keys' '/etc/deployer/nix-keys' '--history-keep' '200' 'run' '--once'"),
        "{exec}"
    );
    // Notifications, history and metrics settings become flags.
    let told = eval_ok(
        r#"{ enable = true; store = "s3://b/p"; notifyCommand = "logger -t deployer"; notifyUrl = "http://127.0.0.1:9/hook"; historyKeep = 50; metricsFile = "/var/lib/m/deployer.prom"; mode = "regtest"; }"#,
    );
    let exec = told["config"]["systemd"]["services"]["deployer"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    assert!(
        exec.contains("'--history-keep' '50' '--notify-command' 'logger -t deployer' '--notify-url' 'http://127.0.0.1:9/hook' '--metrics-file' '/var/lib/m/deployer.prom' '--mode' 'regtest' 'run' '--once'"),
        "{exec}"
    );
    // An empty store is an assertion failure.
    let empty = eval_ok(r#"{ enable = true; store = ""; }"#);
    assert!(
        empty["failedAssertions"][0]
            .as_str()
            .unwrap()
            .contains("store")
    );
}

#[test]
fn module_rejects_bad_settings() {
    for (settings, needle) in [
        (
            r#"{ enable = true; store = "s3://b/p"; proxy = "haproxy"; }"#,
            "services.deployer.proxy",
        ),
        (
            r#"{ enable = true; store = "s3://b/p"; intervall = "1m"; }"#,
            "unknown options: services.deployer.intervall",
        ),
        (r#"{ enable = true; }"#, "options without a value: store"),
        (
            r#"{ enable = true; store = 3; }"#,
            "services.deployer.store",
        ),
        (
            r#"{ enable = true; store = "s3://b/p"; historyKeep = 0; }"#,
            "services.deployer.historyKeep",
        ),
        (
            r#"{ enable = true; store = "s3://b/p"; mode = "Main Net"; }"#,
            "services.deployer.mode",
        ),
    ] {
        let out = eval(settings);
        assert!(!out.status.success(), "{settings} was accepted");
        assert!(
            out.stderr_str().contains(needle),
            "{settings}: {}",
            out.stderr_str()
        );
    }
}

/// The shipped units, with the sandbox's paths: the built binary and a test env file.
fn install_units(sandbox: &SystemdSandbox, env_file: &std::path::Path) {
    let unit_dir = std::path::Path::new(sandbox.var("XDG_CONFIG_HOME")).join("systemd/user");
    std::fs::create_dir_all(&unit_dir).unwrap();
    let service = std::fs::read_to_string(repo_root().join("packaging/deployer.service"))
        .unwrap()
        .replace(
            "/usr/local/bin/deployer-agent",
            &bin("deployer-agent").display().to_string(),
        )
        .replace(
            "/etc/deployer/deployer.env",
            &env_file.display().to_string(),
        );
    assert!(service.contains("Type=oneshot") && service.contains("run --once"));
    std::fs::write(unit_dir.join("deployer.service"), service).unwrap();
    std::fs::copy(
        repo_root().join("packaging/deployer.timer"),
        unit_dir.join("deployer.timer"),
    )
    .unwrap();
    sandbox.systemctl(&["daemon-reload"]).ok();
}

#[test]
fn systemctl_start_deployer_deploys_at_once() {
    let fx = Fixture::file();
    let sandbox = SystemdSandbox::start();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = dir.path().join("state");

    // A service, pushed by a developer.
    let port = free_port();
    fx.dm(&["init"]).ok();
    let service = json!({"name": "hello", "namespace": "Examples/Hello.py",
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
        "env": {"PORT": port.to_string()}, "http": {"domain": "hello.test", "internalPort": port},
        "health": {"http": {"path": "/healthz"}, "timeout": "20s"}});
    fx.dm(&["add-service", &service.to_string()]).ok();
    run_in(
        &repo_root().join("examples"),
        "push.sh",
        &["Examples/Hello.py"],
        &fx.env,
    )
    .ok();

    let env_file = dir.path().join("deployer.env");
    std::fs::write(
        &env_file,
        format!(
            "DEPLOY_STORE={}\nDEPLOYER_HOST=biz\nDEPLOYER_STATE_DIR={}\nDEPLOYER_SECRETS_DIR={}\nDEPLOYER_USER_MANAGER=true\n",
            fx.url,
            state.display(),
            secrets.display()
        ),
    )
    .unwrap();
    install_units(&sandbox, &env_file);

    // Seed 004: "Force Immediate Deploy: systemctl start deployer".
    sandbox.systemctl(&["start", "deployer"]).ok();
    let got = eventually(10, || http_get(port, "/"));
    assert_eq!(got, Some((200, "hello from v1\n".to_owned())));
    let state_json: Value =
        serde_json::from_slice(&std::fs::read(state.join("state.json")).unwrap()).unwrap();
    assert_eq!(state_json["services"]["hello"]["health"], json!("healthy"));
    // The oneshot finished and reported success.
    let result = sandbox
        .systemctl(&["show", "-p", "Result", "deployer.service"])
        .ok();
    assert_eq!(result.stdout_str().trim(), "Result=success");

    // The timer loads and is scheduled.
    sandbox.systemctl(&["start", "deployer.timer"]).ok();
    let active = sandbox.systemctl(&["is-active", "deployer.timer"]);
    assert_eq!(active.stdout_str().trim(), "active");
}
