//! Signed manifests: an agent with trusted keys refuses unsigned, tampered, wrongly signed
//! and replayed-old manifests (nothing applied), and accepts signed new versions and signed
//! rollbacks.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use deployer_tests::OutputExt;
use serde_json::Value;

use crate::agent::{App, Host, body, declare_hello};
use crate::fixture::Fixture;

#[test]
fn only_signed_newer_manifests_are_applied() {
    let mut fx = Fixture::file();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("ci.key");
    let public = fx
        .dm(&["keygen", "ci-2026", "--out", key.to_str().unwrap()])
        .ok()
        .stdout_str();
    assert!(public.starts_with("ci-2026:"), "{public}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = fx.dm(&["keygen", "ci-2026", "--out", key.to_str().unwrap()]);
    assert_ne!(again.code(), 0, "an existing key is never overwritten");
    let trusted = keys.path().join("trusted");
    std::fs::write(&trusted, format!("# deploy keys\n{public}")).unwrap();

    let mut host = Host::new();
    host.flags = vec!["--trusted-keys".into(), trusted.display().to_string()];
    fx.env
        .push(("DEPLOY_SIGNING_KEY".into(), key.display().to_string()));
    let app = App::new();
    let port = deployer_tests::free_port();
    declare_hello(&fx, port);
    app.set_version("v1", false);
    app.push(&fx);
    let shown: Value = serde_json::from_slice(&fx.dm(&["show"]).ok().stdout).unwrap();
    assert_eq!(shown["signature"]["key"], "ci-2026");
    let v1 = shown["version"].as_str().unwrap().to_owned();
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    let applied = host.state()["services"].clone();

    let store = PathBuf::from(fx.url.strip_prefix("file://").unwrap());
    let current = store.join("manifest.json");
    let good = std::fs::read(&current).unwrap();
    let refused = |needle: &str| {
        let out = host.run_once(&fx);
        assert_eq!(out.code(), 11, "{}", out.stderr_str());
        assert!(
            out.stderr_str().contains(needle),
            "{needle}: {}",
            out.stderr_str()
        );
        assert_eq!(host.state()["services"], applied, "nothing applied");
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
    };

    // Tampered with in the bucket.
    let mut m: Value = serde_json::from_slice(&good).unwrap();
    m["services"][0]["env"]["PORT"] = Value::String("1".into());
    std::fs::write(&current, m.to_string()).unwrap();
    refused("does not match its content");
    std::fs::write(&current, &good).unwrap();

    // Written without a key.
    let unsigned: Vec<(String, String)> = fx
        .env
        .iter()
        .filter(|(k, _)| k != "DEPLOY_SIGNING_KEY")
        .cloned()
        .collect();
    deployer_tests::run(
        "deploy-manifest",
        &["update-service", "hello", r#"{"env": {"X": "1"}}"#],
        &unsigned,
        None,
    )
    .ok();
    refused("is not signed");

    // Signed by a key this host does not trust.
    let other = keys.path().join("other.key");
    fx.dm(&["keygen", "ci-2026-rogue", "--out", other.to_str().unwrap()])
        .ok();
    let mut rogue = unsigned.clone();
    rogue.push(("DEPLOY_SIGNING_KEY".into(), other.display().to_string()));
    deployer_tests::run(
        "deploy-manifest",
        &["update-service", "hello", r#"{"env": {"X": "2"}}"#],
        &rogue,
        None,
    )
    .ok();
    refused("does not trust");

    // A signed v2 is applied; then the signed v1 replayed over manifest.json is refused.
    app.set_version("v2", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));
    let applied_v2 = host.state()["services"].clone();
    std::fs::copy(store.join(format!("manifests/{v1}.json")), &current).unwrap();
    let out = host.run_once(&fx);
    assert_eq!(out.code(), 11, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("refusing a downgrade"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(host.state()["services"], applied_v2);
    assert_eq!(body(port).as_deref(), Some("hello from v2\n"));

    // A signed rollback is a new version: applied.
    fx.dm(&["rollback", &format!("{v1}.json")]).ok();
    host.run_once(&fx).ok();
    assert_eq!(body(port).as_deref(), Some("hello from v1\n"));

    // A signing key others can read is refused, with the fix.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = fx.dm(&["update-service", "hello", r#"{"env": {"X": "3"}}"#]);
    assert_eq!(out.code(), 11);
    assert!(
        out.stderr_str().contains("chmod 600"),
        "{}",
        out.stderr_str()
    );
}
