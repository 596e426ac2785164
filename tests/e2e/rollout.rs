//! Staged rollouts through the bucket: several real agents (each its own host name,
//! systemd manager and state) against one real S3 server, gated by the rollout objects
//! only. Each test runs the agents one poll at a time, in the order it says, and asserts
//! order and outcome (never wall time).

use std::os::unix::fs::PermissionsExt;

use deployer_tests::{OutputExt, eventually, free_port};
use serde_json::{Value, json};

use crate::agent::{App, Host, body};
use crate::fixture::Fixture;

/// A host named `name` whose services listen on the ports given (service → port), with
/// `extra` lines in hello's secrets file.
fn host(name: &str, ports: &[(&str, u16)], extra: &str) -> Host {
    let mut h = Host::new();
    h.name = name.to_owned();
    for (service, port) in ports {
        let env = h.dir.path().join(format!("secrets/{service}.env"));
        let more = if *service == "hello" { extra } else { "" };
        std::fs::write(&env, format!("PORT={port}\n{more}")).unwrap();
        std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    h
}

struct Fleet {
    fx: Fixture,
    hosts: Vec<(Host, u16)>,
    app: App,
}

impl Fleet {
    /// Hosts a, b, c run hello v1 (pushed, deployed everywhere before any policy), with
    /// `extra` in the named host's secrets file.
    fn new(extra: &[(&str, &str)]) -> Fleet {
        let fx = Fixture::s3();
        let names = ["a", "b", "c"];
        let hosts: Vec<(Host, u16)> = names
            .iter()
            .map(|n| {
                let port = free_port();
                let more = extra.iter().find(|(h, _)| h == n).map_or("", |(_, e)| *e);
                (host(n, &[("hello", port)], more), port)
            })
            .collect();
        fx.dm(&["init"]).ok();
        let service = json!({
            "name": "hello", "namespace": "Examples/Hello.py",
            "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": names,
            "health": {"http": {"path": "/healthz"}, "timeout": "10s", "interval": "200ms"},
        });
        fx.dm(&["add-service", &service.to_string()]).ok();
        let app = App::new();
        app.set_version("v1", false);
        app.push(&fx);
        let fleet = Fleet { fx, hosts, app };
        for n in names {
            fleet.run(n);
        }
        for n in names {
            assert_eq!(fleet.body(n).as_deref(), Some("hello from v1\n"), "{n}");
        }
        fleet
    }

    fn host(&self, name: &str) -> &(Host, u16) {
        self.hosts.iter().find(|(h, _)| h.name == name).unwrap()
    }

    /// One poll of host `name`: its report (`run --once --json`, checked against `plan`).
    fn run(&self, name: &str) -> Value {
        self.host(name).0.run_report(&self.fx)
    }

    fn body(&self, name: &str) -> Option<String> {
        body(self.host(name).1)
    }

    fn rollout(&self, policy: Value) {
        self.fx
            .dm(&["set-rollout", &json!({"policy": policy}).to_string()])
            .ok();
    }

    fn push(&self, version: &str) {
        self.app.set_version(version, false);
        self.app.push(&self.fx);
    }

    fn status(&self) -> Value {
        let out = self.fx.dm(&["rollout", "status", "--json"]).ok();
        let all: Value = serde_json::from_slice(&out.stdout).unwrap();
        all[0].clone()
    }
}

fn outcome(report: &Value, service: &str) -> String {
    report["services"][service]["outcome"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn reason(report: &Value, service: &str) -> String {
    report["services"][service]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_good_release_goes_canary_then_waves_then_everywhere() {
    let f = Fleet::new(&[]);
    f.rollout(json!({"waves": [{"hosts": ["a"]}, {"hosts": ["b"]}]}));
    // Outside a rollout, an idle poll is one request (a policy alone changes nothing).
    f.run("c");
    assert_eq!(f.run("c")["storeRequests"], json!(1));
    f.push("v2");

    // c (wave 3) and b (wave 2) poll first: they hold v1.
    for n in ["c", "b"] {
        let r = f.run(n);
        assert_eq!(outcome(&r, "hello"), "held", "{n}: {r}");
        assert!(
            reason(&r, "hello").contains("waiting for wave 1: 0 of 1 hosts healthy (not yet: a)"),
            "{r}"
        );
        assert_eq!(f.body(n).as_deref(), Some("hello from v1\n"));
    }
    // A held poll reads the manifest, the abort marker and the record: 3 requests, no LIST.
    let r = f.run("c");
    assert_eq!(r["storeRequests"], json!(3), "{r}");
    let s = f.status();
    assert_eq!(s["progress"]["phase"], json!("deploying"));
    assert_eq!(s["progress"]["wave"], json!(0));

    // The canary goes; then wave 2; c still holds until b is healthy.
    assert_eq!(outcome(&f.run("a"), "hello"), "deployed");
    assert_eq!(f.body("a").as_deref(), Some("hello from v2\n"));
    assert_eq!(outcome(&f.run("c"), "hello"), "held");
    assert_eq!(outcome(&f.run("b"), "hello"), "deployed");
    assert_eq!(outcome(&f.run("c"), "hello"), "deployed");
    for n in ["a", "b", "c"] {
        assert_eq!(f.body(n).as_deref(), Some("hello from v2\n"), "{n}");
    }
    let s = f.status();
    assert_eq!(s["progress"]["phase"], json!("done"), "{s}");
    let table = f.fx.dm(&["rollout", "status"]).ok().stdout_str();
    assert!(
        table.contains("done: every wave has its healthy hosts"),
        "{table}"
    );
    assert!(
        table.contains("a healthy") && table.contains("c healthy"),
        "{table}"
    );

    // Each host notices the end once; then its polls are one request again.
    for n in ["a", "b", "c"] {
        f.run(n);
        let r = f.run(n);
        assert_eq!(r["unchanged"], json!(true), "{n}: {r}");
        assert_eq!(r["storeRequests"], json!(1), "{n}: {r}");
    }
}

#[test]
fn a_release_failing_on_one_canary_never_leaves_the_canary_wave() {
    // v2 is healthy on a, but exits at once on b (its secrets file sets BREAK_V2).
    let f = Fleet::new(&[("b", "BREAK_V2=1\n")]);
    f.rollout(json!({"waves": [{"hosts": ["a", "b"]}], "bake": "1h"}));
    f.app.set_version_broken_where("v2", "BREAK_V2");
    f.app.push(&f.fx);

    assert_eq!(outcome(&f.run("a"), "hello"), "deployed");
    assert_eq!(f.body("a").as_deref(), Some("hello from v2\n"));
    let r = f.run("b");
    assert_eq!(outcome(&r, "hello"), "rolledBack", "{r}");
    assert_eq!(f.body("b").as_deref(), Some("hello from v1\n"));

    // The status says who failed and why.
    let s = f.status();
    assert_eq!(s["progress"]["phase"], json!("aborted"), "{s}");
    assert_eq!(s["progress"]["by"], json!("host b"));
    assert_eq!(s["progress"]["cause"], json!("failures"));
    let why = s["progress"]["reason"].as_str().unwrap();
    assert!(why.starts_with("host b failed: "), "{why}");

    // The next wave never starts; the canary that runs v2 returns to v1 on its next poll.
    let r = f.run("c");
    assert!(
        reason(&r, "hello").contains("rollout aborted: host b failed"),
        "{r}"
    );
    assert_eq!(f.body("c").as_deref(), Some("hello from v1\n"));
    let r = f.run("a");
    assert_eq!(outcome(&r, "hello"), "deployed", "{r}");
    assert_eq!(r["steps"][0]["reason"], json!("reverted"), "{r}");
    assert_eq!(f.body("a").as_deref(), Some("hello from v1\n"));
    for n in ["a", "b", "c"] {
        let r = f.run(n);
        assert_eq!(outcome(&r, "hello"), "held", "{n}: {r}");
        assert_eq!(f.body(n).as_deref(), Some("hello from v1\n"), "{n}");
    }
    let table = f.fx.dm(&["rollout", "status"]).ok().stdout_str();
    assert!(
        table.contains("a reverted") && table.contains("b failed: "),
        "{table}"
    );
}

#[test]
fn promote_abort_and_resume_by_hand() {
    let f = Fleet::new(&[]);
    f.rollout(json!({"waves": [{"hosts": ["a"]}], "bake": "1h"}));
    f.push("v2");
    assert_eq!(outcome(&f.run("a"), "hello"), "deployed");
    let r = f.run("b");
    assert!(
        reason(&r, "hello").contains("waiting for wave 1 to bake until 20"),
        "{r}"
    );
    let s = f.status();
    assert_eq!(s["progress"]["phase"], json!("baking"));
    assert!(
        s["progress"]["waves"][0]["bakeLeftSeconds"]
            .as_u64()
            .unwrap()
            > 3000
    );

    // Promote: the bake is skipped.
    let out = f.fx.dm(&["rollout", "promote", "hello"]).ok();
    assert!(out.stdout_str().contains("wave 1"), "{}", out.stdout_str());
    assert_eq!(outcome(&f.run("b"), "hello"), "deployed");
    assert_eq!(outcome(&f.run("c"), "hello"), "deployed");

    // v3: abort it by hand once the canary runs it.
    f.push("v3");
    assert_eq!(outcome(&f.run("a"), "hello"), "deployed");
    assert_eq!(f.body("a").as_deref(), Some("hello from v3\n"));
    let out =
        f.fx.dm(&["rollout", "abort", "hello", "--reason", "error rate up"])
            .ok();
    assert!(
        out.stdout_str().contains("error rate up"),
        "{}",
        out.stdout_str()
    );
    // Promote refuses an aborted rollout; abort again keeps the first reason.
    let out = f.fx.dm(&["rollout", "promote", "hello"]);
    assert_eq!(out.code(), 2, "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("rollout resume hello"),
        "{}",
        out.stderr_str()
    );
    let r = f.run("a");
    assert_eq!(r["steps"][0]["reason"], json!("reverted"), "{r}");
    assert_eq!(f.body("a").as_deref(), Some("hello from v2\n"));
    assert!(reason(&f.run("b"), "hello").contains("error rate up"));
    let s = f.status();
    assert_eq!(s["progress"]["cause"], json!("manual"));

    // Resume: the canary goes again, then the rest.
    f.fx.dm(&["rollout", "resume", "hello"]).ok();
    assert_eq!(outcome(&f.run("a"), "hello"), "deployed");
    assert_eq!(f.body("a").as_deref(), Some("hello from v3\n"));
    f.fx.dm(&["rollout", "promote", "hello"]).ok();
    for n in ["b", "c"] {
        assert_eq!(outcome(&f.run(n), "hello"), "deployed", "{n}");
        assert_eq!(f.body(n).as_deref(), Some("hello from v3\n"));
    }
    let out = f.fx.dm(&["rollout", "resume", "hello"]);
    assert_eq!(out.code(), 2, "nothing to resume: {}", out.stderr_str());
}

#[test]
fn a_silent_canary_stalls_its_wave_until_the_deadline_then_it_aborts() {
    let f = Fleet::new(&[]);
    f.rollout(json!({"waves": [{"hosts": ["a"]}], "progressDeadline": "3s"}));
    f.push("v2");
    // a never polls. b holds and says for whom.
    let r = f.run("b");
    assert!(reason(&r, "hello").contains("not yet: a"), "{r}");
    let table = f.fx.dm(&["rollout", "status"]).ok().stdout_str();
    assert!(table.contains("a pending (last report"), "{table}");
    // Once the deadline passed (the status says so), the next poll of a waiting host
    // aborts the rollout.
    let stalled = eventually(20, || {
        let s = f.status();
        (s["progress"]["waves"][0]["state"] == json!("stalled")).then_some(s)
    });
    let s = stalled.expect("the wave stalls at its deadline");
    assert_eq!(s["progress"]["phase"], json!("aborting"), "{s}");
    let r = f.run("b");
    assert!(
        reason(&r, "hello").contains("missed its progress deadline"),
        "{r}"
    );
    assert!(reason(&r, "hello").contains("not healthy: a"), "{r}");
    let s = f.status();
    assert_eq!(s["progress"]["cause"], json!("deadline"), "{s}");
    assert_eq!(s["progress"]["by"], json!("host b"));
    // a comes back: it converges on its first poll (the rollout stopped: it keeps v1).
    let r = f.run("a");
    assert_eq!(outcome(&r, "hello"), "held", "{r}");
    assert_eq!(f.body("a").as_deref(), Some("hello from v1\n"));
    for n in ["b", "c"] {
        assert_eq!(f.body(n).as_deref(), Some("hello from v1\n"));
    }
}

#[test]
fn two_services_roll_out_at_once_each_in_its_own_waves() {
    let f = Fleet::new(&[]);
    // greet: the same artifact as hello on other ports, canary c (hello's canary is a).
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    for (n, p) in [("a", pa), ("b", pb), ("c", pc)] {
        let env = f.host(n).0.dir.path().join("secrets/greet.env");
        std::fs::write(&env, format!("PORT={p}\n")).unwrap();
        std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let m: Value = serde_json::from_slice(&f.fx.dm(&["show"]).ok().stdout).unwrap();
    let artifact = m["services"][0]["artifact"].clone();
    let greet = json!({
        "name": "greet", "artifact": artifact, "hosts": ["a", "b", "c"],
        "exec": {"command": "bin/hello"},
        "health": {"http": {"path": "/healthz"}, "timeout": "10s", "interval": "200ms"},
        "rollout": {"waves": [{"hosts": ["c"]}]},
    });
    f.fx.dm(&["add-service", &greet.to_string()]).ok();
    for n in ["a", "b", "c"] {
        f.run(n);
    }
    f.rollout(json!({"waves": [{"hosts": ["a"]}]}));
    // One push changes both (greet follows hello's artifact).
    f.push("v2");
    let m: Value = serde_json::from_slice(&f.fx.dm(&["show"]).ok().stdout).unwrap();
    let patch = json!({"artifact": m["services"][0]["artifact"]});
    f.fx.dm(&["update-service", "greet", &patch.to_string()])
        .ok();

    let r = f.run("b");
    assert_eq!(
        (outcome(&r, "hello"), outcome(&r, "greet")),
        ("held".into(), "held".into())
    );
    let r = f.run("c");
    assert_eq!(
        (outcome(&r, "hello"), outcome(&r, "greet")),
        ("held".into(), "deployed".into())
    );
    let r = f.run("a");
    assert_eq!(
        (outcome(&r, "hello"), outcome(&r, "greet")),
        ("deployed".into(), "deployed".into()),
        "a is hello's canary, and greet's first wave (c) is healthy: {r}"
    );
    let r = f.run("b");
    assert_eq!(
        (outcome(&r, "hello"), outcome(&r, "greet")),
        ("deployed".into(), "deployed".into())
    );
    let r = f.run("c");
    assert_eq!(outcome(&r, "hello"), "deployed", "{r}");
    let all: Value =
        serde_json::from_slice(&f.fx.dm(&["rollout", "status", "--json"]).ok().stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    for s in all.as_array().unwrap() {
        assert_eq!(s["progress"]["phase"], json!("done"), "{s}");
    }
}

#[test]
fn push_wait_follows_the_waves_and_exits_by_how_the_rollout_ended() {
    let f = Fleet::new(&[("c", "BREAK_V3=1\n")]);
    f.rollout(json!({"waves": [{"hosts": ["a"]}, {"hosts": ["b"]}]}));
    let mut agents: Vec<std::process::Child> = ["a", "b", "c"]
        .iter()
        .map(|n| crate::agent::spawn_agent(&f.host(n).0, &f.fx, &["run", "--interval", "1s"]))
        .collect();
    let wait = |f: &Fleet| {
        deployer_tests::run_in(
            f.app.path(),
            "push.sh",
            &["Examples/Hello.py", "--wait", "--timeout", "120s"],
            &f.fx.env,
        )
    };

    // A good release: done, wave after wave.
    f.app.set_version("v2", false);
    let out = wait(&f);
    assert_eq!(out.code(), 0, "{}", out.stderr_str());
    assert!(
        out.stdout_str()
            .contains("the rollout of hello is done: every wave (3) has its healthy hosts"),
        "{}",
        out.stdout_str()
    );
    let err = out.stderr_str();
    let first = err.find("hello: wave 1 of 3 deploying").expect(&err);
    let third = err.find("hello: wave 3 of 3 deploying").expect(&err);
    assert!(first < third, "{err}");
    for n in ["a", "b", "c"] {
        assert_eq!(f.body(n).as_deref(), Some("hello from v2\n"), "{n}");
    }

    // v3 fails on c (the last wave): the rollout aborts, exit 12.
    f.app.set_version_broken_where("v3", "BREAK_V3");
    let out = wait(&f);
    assert_eq!(out.code(), 12, "{}\n{}", out.stdout_str(), out.stderr_str());
    assert!(
        out.stderr_str()
            .contains("hello: the rollout was aborted by host c: host c failed: "),
        "{}",
        out.stderr_str()
    );
    // a and b ran v3; they come back to v2.
    for n in ["a", "b", "c"] {
        let back = eventually(30, || {
            (f.body(n).as_deref() == Some("hello from v2\n")).then_some(())
        });
        assert!(back.is_some(), "{n} returns to v2");
    }

    // v4 while the canary's agent is stopped: its wave misses the deadline, exit 13.
    // (A short deadline only now: a loaded machine may take longer than that to deploy.)
    agents[0].kill().unwrap();
    agents[0].wait().unwrap();
    f.rollout(json!({"waves": [{"hosts": ["a"]}, {"hosts": ["b"]}], "progressDeadline": "5s"}));
    f.app.set_version("v4", false);
    let out = wait(&f);
    assert_eq!(out.code(), 13, "{}\n{}", out.stdout_str(), out.stderr_str());
    assert!(
        out.stderr_str()
            .contains("wave 1 missed its progress deadline (5s)"),
        "{}",
        out.stderr_str()
    );
    for n in ["b", "c"] {
        assert_eq!(f.body(n).as_deref(), Some("hello from v2\n"), "{n}");
    }
    for a in &mut agents[1..] {
        a.kill().unwrap();
        a.wait().unwrap();
    }
}
