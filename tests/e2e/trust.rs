//! The signed chain, from the attacker's seat: someone who can write the bucket but holds
//! no signing key. Each test tampers through the store, then lets honest people run their
//! normal commands (push, deploy-manifest edits, rollback, the agent), and asserts that the
//! attacker's effect never happens and that the honest path still works.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use deploy_manifest::Manifest;
use deploy_manifest::sign::SecretKey;
use deployer_tests::OutputExt;
use serde_json::{Value, json};

use crate::agent::{App, Host, body, declare_hello};
use crate::fixture::Fixture;

/// A team with a signing key, a host that trusts it, and hello v1 deployed through both.
struct Signed {
    fx: Fixture,
    host: Host,
    app: App,
    port: u16,
    keys: tempfile::TempDir,
    key: PathBuf,
    trusted: PathBuf,
    /// The attacker's proof of effect: the file their command would write.
    marker: PathBuf,
}

impl Signed {
    fn new() -> Signed {
        let mut fx = Fixture::file();
        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("ci.key");
        let public = fx
            .dm(&["keygen", "ci-2026", "--out", key.to_str().unwrap()])
            .ok()
            .stdout_str();
        assert!(public.starts_with("ci-2026:"), "{public}");
        let trusted = keys.path().join("trusted");
        std::fs::write(&trusted, format!("# deploy keys\n{public}")).unwrap();
        // Writers and agents read the same trusted-keys file.
        fx.env
            .push(("DEPLOY_SIGNING_KEY".into(), key.display().to_string()));
        fx.env
            .push(("DEPLOY_TRUSTED_KEYS".into(), trusted.display().to_string()));
        let mut host = Host::new();
        host.flags = vec!["--trusted-keys".into(), trusted.display().to_string()];
        let app = App::new();
        let port = deployer_tests::free_port();
        declare_hello(&fx, port);
        app.set_version("v1", false);
        app.push(&fx);
        host.run_once(&fx).ok();
        assert_eq!(body(port).as_deref(), Some("hello from v1\n"));
        let marker = host.dir.path().join("attacker-was-here");
        Signed {
            fx,
            host,
            app,
            port,
            keys,
            key,
            trusted,
            marker,
        }
    }

    fn store_dir(&self) -> PathBuf {
        PathBuf::from(self.fx.url.strip_prefix("file://").unwrap())
    }

    fn current(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.store_dir().join("manifest.json")).unwrap())
            .unwrap()
    }

    fn current_version(&self) -> String {
        self.current()["version"].as_str().unwrap().to_owned()
    }

    /// What the attacker writes, straight into the bucket.
    fn plant(&self, key: &str, value: &Value) {
        std::fs::write(
            self.store_dir().join(key),
            serde_json::to_vec_pretty(value).unwrap(),
        )
        .unwrap();
    }

    /// `m` plus a service that runs the attacker's command on the host (as uid 0 on a
    /// system manager), reusing hello's artifact so that it would really start.
    fn with_evil_service(&self, mut m: Value) -> Value {
        let hello = m["services"][0].clone();
        let mut evil = hello.clone();
        evil["name"] = json!("evil");
        evil.as_object_mut().unwrap().remove("http");
        evil.as_object_mut().unwrap().remove("health");
        evil.as_object_mut().unwrap().remove("namespace");
        evil["exec"] = json!({"command": format!(
            "/bin/sh -c 'id -u > {}; exec sleep 1000'",
            self.marker.display()
        )});
        m["services"].as_array_mut().unwrap().push(evil);
        m
    }

    /// The agent refuses what is in the store (exit 11, `needle` in its error), and the
    /// host still serves `serving`; the attacker's command never ran.
    fn agent_refuses(&self, needle: &str, serving: &str) {
        let out = self.host.run_once(&self.fx);
        assert_eq!(out.code(), 11, "{}", out.stderr_str());
        assert!(
            out.stderr_str().contains(needle),
            "{needle}: {}",
            out.stderr_str()
        );
        self.assert_serving(serving);
    }

    fn assert_serving(&self, serving: &str) {
        assert_eq!(body(self.port).as_deref(), Some(serving));
        assert!(
            !self.marker.exists(),
            "the attacker's command ran: {:?}",
            std::fs::read_to_string(&self.marker)
        );
        assert!(
            self.host.state()["services"].get("evil").is_none(),
            "the attacker's service is in the state"
        );
    }

    /// An honest writer's normal command, refused before anything is written: exit 11 and
    /// a message that names `good` and the command that restores it.
    fn writer_refuses(&self, args: &[&str], good: &str) {
        let before = self.current();
        let out = self.fx.dm(args);
        assert_eq!(out.code(), 11, "{args:?}: {}", out.stderr_str());
        let err = out.stderr_str();
        assert!(err.contains("does not verify"), "{err}");
        assert!(
            err.contains(&format!("deploy-manifest rollback {good}")),
            "the message names the restore command: {err}"
        );
        assert_eq!(self.current(), before, "nothing was written");
    }
}

#[test]
fn writers_never_sign_what_they_did_not_verify() {
    let t = Signed::new();
    let good = t.current_version();

    // The attacker adds a service to manifest.json: the agent refuses it...
    t.plant("manifest.json", &t.with_evil_service(t.current()));
    t.agent_refuses("does not match its content", "hello from v1\n");
    // ...and honest writers refuse to build on it instead of re-signing it.
    t.writer_refuses(
        &["update-service", "hello", r#"{"env": {"A": "1"}}"#],
        &good,
    );
    t.writer_refuses(&["remove-service", "hello"], &good);
    t.writer_refuses(&["refresh"], &good);
    t.app.set_version("v2", false);
    let out = deployer_tests::run_in(t.app.path(), "push.sh", &["Examples/Hello.py"], &t.fx.env);
    assert_eq!(out.code(), 11, "push: {}", out.stderr_str());
    assert!(out.stderr_str().contains(&good), "{}", out.stderr_str());
    // `rollback` with no argument follows the head's parent, which the attacker controls.
    t.writer_refuses(&["rollback"], &good);
    t.agent_refuses("does not match its content", "hello from v1\n");

    // The operator does what the message says: the named restore works.
    t.fx.dm(&["rollback", &good]).ok();
    t.fx.dm(&["verify"]).ok();
    t.app.push(&t.fx);
    t.host.run_once(&t.fx).ok();
    t.assert_serving("hello from v2\n");
    let v2 = t.current_version();

    // The attacker points the head's `parent` at a planted unsigned version for a
    // `deploy-manifest rollback` to restore.
    let planted = "manifest-20261101T000000Z-deadbeef";
    let mut evil = t.with_evil_service(t.current());
    evil["version"] = json!(planted);
    evil.as_object_mut().unwrap().remove("signature");
    t.plant(&format!("manifests/{planted}.json"), &evil);
    let mut head = t.current();
    head["parent"] = json!(planted);
    t.plant("manifest.json", &head);
    t.writer_refuses(&["rollback"], &v2);
    t.agent_refuses("does not match its content", "hello from v2\n");
    t.fx.dm(&["rollback", &v2]).ok();

    // Or overwrites the real parent's immutable version file with its own content.
    let parent = t.current()["parent"].as_str().unwrap().to_owned();
    let mut forged = t.with_evil_service(t.current());
    forged["version"] = json!(parent);
    t.plant(&format!("manifests/{parent}.json"), &forged);
    let out = t.fx.dm(&["rollback"]);
    assert_eq!(out.code(), 11, "{}", out.stderr_str());
    assert!(
        out.stderr_str()
            .contains(&format!("{parent} does not verify")),
        "{}",
        out.stderr_str()
    );
    // An explicit target that does not verify is refused the same way.
    let out = t.fx.dm(&["rollback", planted]);
    assert_eq!(out.code(), 11, "{}", out.stderr_str());

    // `verify --all` tells the operator which versions are forged.
    let out = t.fx.dm(&["verify", "--all", "--json"]).ok();
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = |v: &str| rows.iter().find(|r| r["version"] == v).unwrap().clone();
    assert_eq!(row(planted)["verified"], false);
    assert_eq!(
        row(&parent)["verified"],
        false,
        "the forged copy of {parent}"
    );
    let current = rows.iter().find(|r| r["current"] == true).unwrap();
    assert_eq!(current["verified"], true);
    let human = t.fx.dm(&["verify", "--all"]).ok().stdout_str();
    assert!(human.contains("NOT VERIFIED"), "{human}");

    // The honest path still works end to end.
    t.fx.dm(&["update-service", "hello", r#"{"env": {"A": "1"}}"#])
        .ok();
    t.host.run_once(&t.fx).ok();
    t.assert_serving("hello from v2\n");
    let unit = std::fs::read_to_string(t.host.unit_file("hello")).unwrap();
    assert!(unit.contains("A=1"), "{unit}");
}

#[test]
fn agents_refuse_unsigned_forged_and_replayed_manifests() {
    let t = Signed::new();
    let good = std::fs::read(t.store_dir().join("manifest.json")).unwrap();
    let restore = || std::fs::write(t.store_dir().join("manifest.json"), &good).unwrap();

    // The signature stripped.
    let mut unsigned = t.with_evil_service(t.current());
    unsigned.as_object_mut().unwrap().remove("signature");
    t.plant("manifest.json", &unsigned);
    t.agent_refuses("is not signed", "hello from v1\n");
    restore();

    // Signed by a key of the attacker's own: under the trusted key's name (a bad
    // signature), or under a name the host does not know.
    for (name, needle) in [
        ("ci-2026", "does not match its content"),
        ("rogue", "does not trust"),
    ] {
        let key = SecretKey::generate(name).unwrap();
        t.plant(
            "manifest.json",
            &sign(&t.with_evil_service(t.current()), &key),
        );
        t.agent_refuses(needle, "hello from v1\n");
        restore();
    }

    // A signed v2 is applied; the signed v1 replayed over manifest.json is refused...
    let v1 = t.current_version();
    t.app.set_version("v2", false);
    t.app.push(&t.fx);
    t.host.run_once(&t.fx).ok();
    t.assert_serving("hello from v2\n");
    let v2_bytes = std::fs::read(t.store_dir().join("manifest.json")).unwrap();
    let v1_bytes = std::fs::read(t.store_dir().join(format!("manifests/{v1}.json"))).unwrap();
    std::fs::write(t.store_dir().join("manifest.json"), &v1_bytes).unwrap();
    t.agent_refuses("not above", "hello from v2\n");
    // ...also after the operator moves a corrupt state.json aside (the sequence this host
    // applied is kept in applied.json, beside it).
    let state = t.host.state_dir().join("state.json");
    std::fs::rename(&state, t.host.state_dir().join("state.json.corrupt")).unwrap();
    let out = t.host.run_once(&t.fx);
    out.fails_with(11, "not above");
    assert_eq!(body(t.port).as_deref(), Some("hello from v2\n"));
    // ...and an honest writer does not build on the replayed head either: it has seen v2.
    let out =
        t.fx.dm(&["update-service", "hello", r#"{"env": {"B": "1"}}"#]);
    out.fails_with(11, "already saw");
    std::fs::write(t.store_dir().join("manifest.json"), &v2_bytes).unwrap();

    // A rollback is a new, higher version: applied.
    t.fx.dm(&["rollback", &v1]).ok();
    t.host.run_once(&t.fx).ok();
    t.assert_serving("hello from v1\n");
    let applied: Value =
        serde_json::from_slice(&std::fs::read(t.host.state_dir().join("applied.json")).unwrap())
            .unwrap();
    assert_eq!(applied["sequence"], t.current()["sequence"]);

    // `plan` applies the same checks as `run`.
    std::fs::write(t.store_dir().join("manifest.json"), &v1_bytes).unwrap();
    let out = t.host.agent(&t.fx, &["plan"]);
    assert_eq!(out.code(), 11, "{}", out.stderr_str());

    // A signing key others can read is refused, with the fix.
    std::fs::set_permissions(&t.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out =
        t.fx.dm(&["update-service", "hello", r#"{"env": {"X": "3"}}"#]);
    assert_eq!(out.code(), 11);
    assert!(
        out.stderr_str().contains("chmod 600"),
        "{}",
        out.stderr_str()
    );
}

/// `m` signed by `key`, as an attacker holding `key` would write it.
fn sign(m: &Value, key: &SecretKey) -> Value {
    let mut m: Manifest = serde_json::from_value(m.clone()).unwrap();
    key.sign(&mut m);
    serde_json::to_value(&m).unwrap()
}

/// libfaketime: run a binary as if the clock were `offset` away ("+1d", "+40d").
fn faked_clock(env: &mut Vec<(String, String)>, offset: &str) {
    let lib = ["x86_64", "aarch64"]
        .iter()
        .map(|a| PathBuf::from(format!("/usr/lib/{a}-linux-gnu/faketime/libfaketime.so.1")))
        .find(|p| p.exists())
        .expect("libfaketime is installed (scripts/test.sh installs the faketime package)");
    env.push(("LD_PRELOAD".into(), lib.display().to_string()));
    env.push(("FAKETIME".into(), offset.to_owned()));
    env.push(("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()));
}

fn clock_removed(env: &mut Vec<(String, String)>) {
    env.retain(|(k, _)| {
        !["LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC"].contains(&k.as_str())
    });
}

#[test]
fn clocks_do_not_order_versions() {
    let mut t = Signed::new();
    // A writer whose clock is a day ahead.
    faked_clock(&mut t.fx.env, "+1d");
    t.fx.dm(&["update-service", "hello", r#"{"env": {"A": "1"}}"#])
        .ok();
    clock_removed(&mut t.fx.env);
    let ahead = t.current();
    t.host.run_once(&t.fx).ok();
    // Later versions from writers with a right clock are "older" by createdAt, but higher
    // in sequence: applied, rollback included.
    t.fx.dm(&["update-service", "hello", r#"{"env": {"A": "2"}}"#])
        .ok();
    assert!(t.current()["createdAt"].as_str() < ahead["createdAt"].as_str());
    t.host.run_once(&t.fx).ok();
    let unit = std::fs::read_to_string(t.host.unit_file("hello")).unwrap();
    assert!(unit.contains("A=2"), "{unit}");
    t.fx.dm(&["rollback", ahead["version"].as_str().unwrap()])
        .ok();
    t.host.run_once(&t.fx).ok();
    let unit = std::fs::read_to_string(t.host.unit_file("hello")).unwrap();
    assert!(unit.contains("A=1"), "{unit}");
    t.assert_serving("hello from v1\n");
}

#[test]
fn expired_manifests_are_refused_until_refreshed() {
    let mut t = Signed::new();
    let metrics = t.host.dir.path().join("deployer.prom");
    t.host
        .flags
        .extend(["--metrics-file".into(), metrics.display().to_string()]);
    let v1 = t.current();
    t.app.set_version("v2", false);
    t.app.push(&t.fx);
    let v2 = t.current();
    assert!(v2["expires"].as_str().unwrap() > v2["createdAt"].as_str().unwrap());

    // 40 days later (the default expiry is 30), nobody refreshed: the store looks frozen.
    faked_clock(&mut t.fx.env, "+40d");
    let out = t.host.run_once(&t.fx);
    out.fails_with(11, "expired");
    assert!(
        out.stderr_str().contains("deploy-manifest refresh"),
        "{}",
        out.stderr_str()
    );
    t.assert_serving("hello from v1\n");
    let state = t.host.state();
    assert_eq!(state["expired"], v2["expires"]);
    assert_eq!(state["manifestVersion"], v1["version"]);
    let out = t.fx.dm(&["verify"]);
    assert_eq!(out.code(), 11, "{}", out.stderr_str());
    assert!(out.stdout_str().contains("EXPIRED"), "{}", out.stdout_str());
    // Writers do not build on an expired head either (refresh does, on purpose).
    let out =
        t.fx.dm(&["update-service", "hello", r#"{"env": {"A": "1"}}"#]);
    out.fails_with(11, "deploy-manifest refresh");
    // Seen without ssh: the host report, the fleet view and the metrics say so.
    let report: Value =
        serde_json::from_slice(&std::fs::read(t.store_dir().join("status/biz.json")).unwrap())
            .unwrap();
    assert_eq!(report["expired"], v2["expires"]);
    let fleet: Value = serde_json::from_slice(&t.fx.dm(&["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(fleet[0]["state"], "expired", "{fleet:#}");
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains("deployer_manifest_expired 1"), "{prom}");

    // A writer refreshes (from a timer): the same content, a new version, a new expiry.
    t.fx.dm(&["refresh"]).ok();
    let refreshed = t.current();
    assert_eq!(refreshed["services"], v2["services"]);
    assert!(refreshed["sequence"].as_u64() > v2["sequence"].as_u64());
    t.fx.dm(&["verify"]).ok();
    t.host.run_once(&t.fx).ok();
    t.assert_serving("hello from v2\n");
    assert!(t.host.state().get("expired").is_none());
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains("deployer_manifest_expired 0"), "{prom}");
    clock_removed(&mut t.fx.env);
}

#[test]
fn keys_rotate_and_a_retired_key_is_refused() {
    let mut t = Signed::new();
    let old_public = std::fs::read_to_string(&t.trusted).unwrap();
    let new_key = t.keys.path().join("ci-2027.key");
    let new_public =
        t.fx.dm(&["keygen", "ci-2027", "--out", new_key.to_str().unwrap()])
            .ok()
            .stdout_str();
    // 1. Trust both (agents and writers read the same file).
    std::fs::write(&t.trusted, format!("{old_public}\n{new_public}")).unwrap();
    // 2. Writers switch to the new key: they build on the old key's version, which verifies.
    for (k, v) in t.fx.env.iter_mut() {
        if k == "DEPLOY_SIGNING_KEY" {
            *v = new_key.display().to_string();
        }
    }
    t.app.set_version("v2", false);
    t.app.push(&t.fx);
    assert_eq!(t.current()["signature"]["key"], "ci-2027");
    t.host.run_once(&t.fx).ok();
    t.assert_serving("hello from v2\n");
    let v2 = t.current_version();
    // 3. The old key is removed everywhere.
    std::fs::write(&t.trusted, &new_public).unwrap();
    t.fx.dm(&["verify"]).ok();

    // The retired key leaks; the attacker signs a new version with it.
    let leaked = SecretKey::load(&t.key).unwrap();
    let mut evil = t.with_evil_service(t.current());
    evil["sequence"] = json!(t.current()["sequence"].as_u64().unwrap() + 1);
    t.plant("manifest.json", &sign(&evil, &leaked));
    t.agent_refuses("does not trust", "hello from v2\n");
    t.writer_refuses(&["update-service", "hello", r#"{"env": {"A": "1"}}"#], &v2);

    t.fx.dm(&["rollback", &v2]).ok();
    t.host.run_once(&t.fx).ok();
    t.assert_serving("hello from v2\n");
    assert_eq!(t.current()["signature"]["key"], "ci-2027");
}

/// The fleet's newest signed version copied back over `manifest.json`: writers that never
/// saw the store (a fresh CI runner) must not build on the old head either, or a few blind
/// writes would push its sequence above the agents' floor and revert a fix.
#[test]
fn a_replayed_head_is_refused_by_writers_that_never_saw_the_store() {
    let t = Signed::new();
    let v1 = t.current_version();
    t.app.set_version("v2", false);
    t.app.push(&t.fx);
    t.host.run_once(&t.fx).ok();
    let v2 = t.current_version();
    let v1_bytes = std::fs::read(t.store_dir().join(format!("manifests/{v1}.json"))).unwrap();
    std::fs::write(t.store_dir().join("manifest.json"), &v1_bytes).unwrap();

    // A CI runner: same keys, no memory of the store.
    let fresh = tempfile::tempdir().unwrap();
    let mut ci = t.fx.env.clone();
    ci.retain(|(k, _)| k != "DEPLOY_STATE_DIR");
    ci.push((
        "DEPLOY_STATE_DIR".into(),
        fresh.path().display().to_string(),
    ));
    for _ in 0..3 {
        let out = deployer_tests::run(
            "deploy-manifest",
            &["update-service", "hello", r#"{"env": {"A": "1"}}"#],
            &ci,
            None,
        );
        assert_eq!(out.code(), 11, "{}", out.stderr_str());
        let err = out.stderr_str();
        assert!(err.contains(&format!("{v2} (sequence")), "{err}");
        assert!(
            err.contains(&format!("deploy-manifest rollback {v2}")),
            "{err}"
        );
    }
    let out = deployer_tests::run_in(t.app.path(), "push.sh", &["Examples/Hello.py"], &ci);
    assert_eq!(out.code(), 11, "{}", out.stderr_str());
    t.agent_refuses("not above", "hello from v2\n");

    // The writer that saw v2 is told the same, and the remedy it names works (it does
    // not refuse itself again).
    let out =
        t.fx.dm(&["update-service", "hello", r#"{"env": {"A": "1"}}"#]);
    out.fails_with(11, "already saw");
    t.fx.dm(&["rollback", &v2]).ok();
    let restored = t.current();
    assert!(restored["sequence"].as_u64() > Some(2));
    let out = deployer_tests::run(
        "deploy-manifest",
        &["update-service", "hello", r#"{"env": {"A": "1"}}"#],
        &ci,
        None,
    );
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    t.host.run_once(&t.fx).ok();
    t.assert_serving("hello from v2\n");

    // Adopting unverified content is refused while a version verifies.
    t.plant("manifest.json", &t.with_evil_service(t.current()));
    let out = t.fx.dm(&["refresh", "--accept-unverified"]);
    assert_ne!(out.code(), 0, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("deploy-manifest rollback"),
        "{}",
        out.stderr_str()
    );
    // ...and, with every version deleted, for a writer that saw the store before.
    for entry in std::fs::read_dir(t.store_dir().join("manifests")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let out =
        t.fx.dm(&["update-service", "hello", r#"{"env": {"B": "1"}}"#]);
    out.fails_with(11, "backup");
    assert!(
        !out.stderr_str().contains("accept-unverified"),
        "{}",
        out.stderr_str()
    );
    let out = t.fx.dm(&["refresh", "--accept-unverified"]);
    assert_ne!(out.code(), 0, "{}", out.stderr_str());
    t.agent_refuses("does not match its content", "hello from v2\n");
}

/// `push` reads the manifest to choose its service before it builds: a forged head is
/// refused there, before the build runs (so the attacker cannot choose where the build
/// lands), and `push --wait` takes its hosts from a verified manifest only.
#[test]
fn push_refuses_a_forged_head_before_building() {
    let t = Signed::new();
    let good = t.current_version();
    let mut forged = t.current();
    forged["services"][0]["namespace"] = json!("Other/Thing.py");
    t.plant("manifest.json", &forged);
    let built = t.host.dir.path().join("built");
    std::fs::write(
        t.app.path().join("deploy.toml"),
        format!(
            "[namespaces.\"Examples/Hello.py\"]\ncommand = \"touch {}\"\noutput = \"app\"\n",
            built.display()
        ),
    )
    .unwrap();
    let out = deployer_tests::run_in(t.app.path(), "push.sh", &["Examples/Hello.py"], &t.fx.env);
    out.fails_with(11, &good);
    assert!(!built.exists(), "the build ran on a forged manifest");
}
