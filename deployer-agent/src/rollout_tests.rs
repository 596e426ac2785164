//! Staged rollouts, decided on in-memory hosts that share one `file://` store: each
//! [`Bench`] is a host with its own state, and they poll in the order a test says. The
//! same scenarios run with real agents, systemd and S3 in `tests/e2e/rollout.rs`.

use std::path::Path;

use deploy_manifest::history::EventKind;
use deploy_manifest::model::Manifest;
use deploy_manifest::rollout::{self, HostState, Record};
use deploy_manifest::store::{Fetched, FileStore, ObjectStore};
use serde_json::{Value, json};

use crate::plan::{Reason, Step};
use crate::reconcile::Outcome;
use crate::reconcile_tests::{Bench, kinds, path};

struct Fleet {
    store: tempfile::TempDir,
    hosts: Vec<Bench>,
}

impl Fleet {
    fn new(names: &[&str]) -> Fleet {
        let store = tempfile::tempdir().unwrap();
        let hosts = names
            .iter()
            .map(|h| Bench::on(h, store.path(), false, tempfile::tempdir().unwrap()))
            .collect();
        Fleet { store, hosts }
    }

    fn host(&mut self, name: &str) -> &mut Bench {
        self.hosts
            .iter_mut()
            .find(|b| b.agent.config.host == name)
            .unwrap()
    }

    async fn run(&mut self, name: &str, m: &Manifest) -> (Vec<String>, Outcome, bool) {
        let (plan, report, rolling) = self.host(name).run_gated(m).await;
        (kinds(&plan), report.services["web"].clone(), rolling)
    }

    fn runs(&mut self, name: &str) -> String {
        let b = self.host(name);
        b.state.services["web"]
            .current
            .as_ref()
            .map(|c| c.path.clone())
            .unwrap_or_default()
    }

    async fn record(&self, m: &Manifest) -> Record {
        let store = FileStore::open(&format!("file://{}", self.store.path().display())).unwrap();
        let hash = rollout::spec_hash(m.service("web").unwrap());
        rollout::read(&store, "web", &hash)
            .await
            .unwrap()
            .record
            .unwrap()
    }

    async fn aborted(&self, m: &Manifest) -> Option<rollout::Abort> {
        let store = FileStore::open(&format!("file://{}", self.store.path().display())).unwrap();
        let hash = rollout::spec_hash(m.service("web").unwrap());
        rollout::read(&store, "web", &hash).await.unwrap().abort
    }
}

/// Service `web` at store path `artifact` on `hosts`, with rollout `policy` (null: none).
fn web(artifact: &str, hosts: &[&str], policy: Value) -> Manifest {
    let mut m = json!({
        "schemaVersion": 1,
        "version": format!("manifest-20261124T100000Z-{:08x}", artifact.bytes().map(u32::from).sum::<u32>()),
        "services": [{"name": "web", "artifact": {"storePath": artifact}, "hosts": hosts}],
    });
    if !policy.is_null() {
        m["rollout"] = json!({"policy": policy});
    }
    deploy_manifest::validate::manifest_from_value(m, "test").unwrap()
}

fn held(o: &Outcome) -> &str {
    match o {
        Outcome::Held { reason } => reason,
        other => panic!("not held: {other:?}"),
    }
}

/// Keep a copy of `m` as its version's immutable file (what a revert reads back).
fn publish_version(store: &Path, m: &Manifest) {
    let dir = store.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{}.json", m.version.as_deref().unwrap())),
        serde_json::to_vec(m).unwrap(),
    )
    .unwrap();
}

/// A fleet of `hosts` that all run v1 of `web` (deployed before any policy; v1 kept as
/// its version's file, as writers keep it), and v1.
async fn running_v1(hosts: &[&str]) -> (Fleet, Manifest) {
    let mut fleet = Fleet::new(hosts);
    let v1 = web("/nix/store/web-v1", hosts, Value::Null);
    publish_version(fleet.store.path(), &v1);
    for h in hosts {
        fleet.run(h, &v1).await;
    }
    (fleet, v1)
}

#[tokio::test]
async fn a_good_release_goes_wave_by_wave_to_every_host() {
    let hosts = ["h1", "h2", "h3"];
    let mut fleet = Fleet::new(&hosts);
    let policy = json!({"waves": [{"hosts": ["h1"]}]});
    let v1 = web("/nix/store/web-v1", &hosts, Value::Null);
    for h in hosts {
        fleet.run(h, &v1).await;
    }
    let v2 = web("/nix/store/web-v2", &hosts, policy);

    // h2 polls first: the canary wave has not started, it keeps v1.
    let (steps, outcome, rolling) = fleet.run("h2", &v2).await;
    assert_eq!(steps, ["keep web", "hold web"]);
    assert!(held(&outcome).contains("waiting for wave 1: 0 of 1 hosts healthy (not yet: h1)"));
    assert!(rolling, "the next poll reads the manifest in full");
    assert_eq!(fleet.runs("h2"), path("/nix/store/web-v1"));
    assert!(
        fleet.record(&v2).await.hosts.is_empty(),
        "created, nobody done"
    );

    // The canary deploys and records itself healthy; then the rest may go.
    let (steps, outcome, _) = fleet.run("h1", &v2).await;
    assert_eq!(
        (steps, outcome),
        (vec!["deploy web".to_owned()], Outcome::Deployed)
    );
    assert_eq!(
        fleet.record(&v2).await.hosts["h1"].state,
        HostState::Healthy
    );
    for h in ["h3", "h2"] {
        let (_, outcome, rolling) = fleet.run(h, &v2).await;
        assert_eq!(outcome, Outcome::Deployed, "{h}");
        assert!(rolling);
        assert_eq!(fleet.runs(h), path("/nix/store/web-v2"));
    }
    // Done: each host notices once, then reads the rollout no more.
    let (steps, outcome, rolling) = fleet.run("h1", &v2).await;
    assert_eq!(
        (steps, outcome, rolling),
        (vec!["keep web".to_owned()], Outcome::Kept, false)
    );
    let (plan, _, _) = fleet.host("h1").run_gated(&v2).await;
    assert!(plan.rollouts.is_empty(), "not read: {:?}", plan.rollouts);
}

#[tokio::test]
async fn a_release_that_fails_on_a_canary_aborts_and_the_canaries_return() {
    let hosts = ["h1", "h2", "h3"];
    let (mut fleet, v1) = running_v1(&hosts).await;
    let v2 = web(
        "/nix/store/web-v2",
        &hosts,
        json!({"waves": [{"hosts": ["h1", "h2"]}], "bake": "1h"}),
    );
    // Healthy on h1, broken on h2.
    fleet
        .host("h2")
        .host()
        .world()
        .broken
        .insert(path("/nix/store/web-v2"));
    let (_, outcome, _) = fleet.run("h1", &v2).await;
    assert_eq!(outcome, Outcome::Deployed);
    let (_, report, rolling) = fleet.host("h2").run_gated(&v2).await;
    let outcome = &report.services["web"];
    assert!(matches!(outcome, Outcome::RolledBack { .. }), "{outcome:?}");
    assert!(rolling);
    // Told as it happened: the rollback, then the abort this host wrote.
    let told: Vec<EventKind> = report.events.iter().map(|e| e.kind).collect();
    assert_eq!(told, [EventKind::RolledBack, EventKind::RolloutAborted]);
    let error = report.events[1].error.as_deref().unwrap_or_default();
    assert!(error.contains("host h2 failed"), "{error}");
    let abort = fleet.aborted(&v2).await.expect("the abort marker");
    assert_eq!(abort.by, "host h2");
    assert!(
        abort.reason.starts_with("host h2 failed: "),
        "{}",
        abort.reason
    );
    let record = fleet.record(&v2).await;
    assert_eq!(record.hosts["h2"].state, HostState::Failed);

    // The next wave never starts; h3 has nothing to tell.
    let (plan, report, _) = fleet.host("h3").run_gated(&v2).await;
    assert!(report.events.is_empty(), "{:?}", report.events);
    let (steps, outcome) = (kinds(&plan), report.services["web"].clone());
    assert_eq!(steps, ["keep web", "hold web"]);
    assert!(held(&outcome).contains("rollout aborted: host h2 failed"));
    assert_eq!(fleet.runs("h3"), path("/nix/store/web-v1"));

    // h1 ran it: its next poll returns to v1 (the version it ran before).
    let (plan, report, _) = fleet.host("h1").run_gated(&v2).await;
    assert!(
        matches!(&plan.steps[..], [Step::Deploy(d)] if d.reason == Reason::Reverted),
        "{plan}"
    );
    assert_eq!(report.services["web"], Outcome::Deployed);
    assert_eq!(report.events[0].kind, EventKind::Reverted);
    assert_eq!(report.events[0].version, v1.version, "it went back to v1");
    assert_eq!(fleet.runs("h1"), path("/nix/store/web-v1"));
    assert_eq!(
        fleet.host("h1").state.services["web"]
            .current
            .as_ref()
            .unwrap()
            .version,
        v1.version,
        "the generation says where it came from"
    );
    assert_eq!(
        fleet.record(&v2).await.hosts["h1"].state,
        HostState::Reverted
    );
    // And stays there.
    let (steps, outcome, rolling) = fleet.run("h1", &v2).await;
    assert_eq!(steps, ["keep web", "hold web"]);
    assert!(held(&outcome).contains("rollout aborted"));
    assert!(
        rolling,
        "an aborted rollout may be resumed: hosts keep reading it"
    );
    assert_eq!(fleet.runs("h2"), path("/nix/store/web-v1"));
}

#[tokio::test]
async fn a_revert_needs_the_spec_the_host_ran_and_nothing_else() {
    let hosts = ["h1", "h2"];
    let (mut fleet, v1) = running_v1(&hosts).await;
    // Someone who writes the bucket puts another spec under v1's version name.
    let mut forged = v1.clone();
    forged.services[0].artifact =
        deploy_manifest::model::Artifact::StorePath("/nix/store/evil".into());
    publish_version(fleet.store.path(), &forged);
    let v2 = web(
        "/nix/store/web-v2",
        &hosts,
        json!({"waves": [{"hosts": ["h1"]}]}),
    );
    fleet.run("h1", &v2).await;
    let store = FileStore::open(&format!("file://{}", fleet.store.path().display())).unwrap();
    let hash = rollout::spec_hash(v2.service("web").unwrap());
    rollout::write_abort(
        &store,
        "web",
        &hash,
        rollout::Abort {
            by: "mallory".into(),
            cause: rollout::Cause::Manual,
            epoch: 0,
            reason: "x".into(),
            at: "2026-11-24T10:00:00Z".into(),
        },
    )
    .await
    .unwrap();
    let (steps, outcome, _) = fleet.run("h1", &v2).await;
    assert_eq!(steps, ["wait web"]);
    assert!(
        matches!(&outcome, Outcome::Retrying { error } if error.contains("does not hold the spec")),
        "{outcome:?}"
    );
    assert_eq!(
        fleet.runs("h1"),
        path("/nix/store/web-v2"),
        "keeps what runs"
    );
    assert!(
        !fleet
            .host("h1")
            .host()
            .world()
            .files
            .values()
            .any(|f| f.contains("evil")),
        "the forged spec is never written"
    );
}

#[tokio::test]
async fn a_silent_canary_stalls_its_wave_until_the_deadline() {
    let hosts = ["h1", "h2"];
    for (on_deadline, goes) in [("abort", false), ("continue", true)] {
        let (mut fleet, _) = running_v1(&hosts).await;
        // h1 never polls. A deadline of 0s has passed at once.
        let v2 = web(
            "/nix/store/web-v2",
            &hosts,
            json!({"waves": [{"hosts": ["h1"]}], "progressDeadline": "0s", "onDeadline": on_deadline}),
        );
        let (_, outcome, _) = fleet.run("h2", &v2).await;
        if goes {
            assert_eq!(outcome, Outcome::Deployed);
            assert!(fleet.aborted(&v2).await.is_none());
        } else {
            assert!(
                held(&outcome).contains("wave 1 missed its progress deadline"),
                "{outcome:?}"
            );
            assert!(held(&outcome).contains("not healthy: h1"));
            let abort = fleet.aborted(&v2).await.expect("marker");
            assert_eq!(abort.by, "host h2");
        }
    }
}

#[tokio::test]
async fn an_idle_poll_outside_a_rollout_reads_nothing_more() {
    // Counted by the store: a policy with no change reads nothing after the rollout.
    let mut fleet = Fleet::new(&["h1"]);
    let v1 = web(
        "/nix/store/web-v1",
        &["h1"],
        json!({"waves": [{"percent": 100}]}),
    );
    let (_, outcome, rolling) = fleet.run("h1", &v1).await;
    assert_eq!(outcome, Outcome::Deployed);
    assert!(rolling);
    let (_, _, rolling) = fleet.run("h1", &v1).await;
    assert!(!rolling, "done once its only wave is healthy");
    let store = &fleet.host("h1").agent.store;
    let hash = rollout::spec_hash(v1.service("web").unwrap());
    assert!(matches!(
        store
            .get(&rollout::record_key("web", &hash), None)
            .await
            .unwrap(),
        Fetched::Found { .. }
    ));
}

fn store_of(fleet: &Fleet) -> FileStore {
    FileStore::open(&format!("file://{}", fleet.store.path().display())).unwrap()
}

async fn forge_abort(fleet: &Fleet, m: &Manifest) {
    let hash = rollout::spec_hash(m.service("web").unwrap());
    let marker = rollout::Abort {
        by: "mallory".into(),
        cause: rollout::Cause::Manual,
        reason: "forged".into(),
        at: "2026-11-24T10:00:00Z".into(),
        epoch: 0,
    };
    rollout::write_abort(&store_of(fleet), "web", &hash, marker)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_version_deployed_before_the_policy_is_not_part_of_a_rollout() {
    let hosts = ["h1", "h2"];
    let mut fleet = Fleet::new(&hosts);
    let v0 = web("/nix/store/web-v0", &hosts, Value::Null);
    publish_version(fleet.store.path(), &v0);
    let v1 = web("/nix/store/web-v1", &hosts, Value::Null);
    for m in [&v0, &v1] {
        for h in hosts {
            fleet.run(h, m).await;
        }
    }
    // The policy comes later (same spec); someone who writes the bucket adds a marker.
    let staged = web(
        "/nix/store/web-v1",
        &hosts,
        json!({"waves": [{"hosts": ["h2"]}]}),
    );
    forge_abort(&fleet, &staged).await;
    for h in hosts {
        let (plan, report, rolling) = fleet.host(h).run_gated(&staged).await;
        assert!(
            plan.rollouts.is_empty(),
            "nothing read: {:?}",
            plan.rollouts
        );
        assert_eq!(report.services["web"], Outcome::Kept);
        assert!(!rolling);
        assert_eq!(fleet.runs(h), path("/nix/store/web-v1"), "{h} stays on v1");
    }
}

#[tokio::test]
async fn resume_forgives_a_failure_and_the_failed_host_tries_again() {
    let hosts = ["h1", "h2", "h3"];
    let (mut fleet, _) = running_v1(&hosts).await;
    let v2 = web(
        "/nix/store/web-v2",
        &hosts,
        json!({"waves": [{"hosts": ["h1", "h2"]}]}),
    );
    let v2_path = path("/nix/store/web-v2");
    fleet
        .host("h2")
        .host()
        .world()
        .broken
        .insert(v2_path.clone());
    fleet.run("h1", &v2).await;
    let (_, outcome, _) = fleet.run("h2", &v2).await;
    assert!(matches!(outcome, Outcome::RolledBack { .. }));
    assert!(fleet.aborted(&v2).await.is_some());
    // h1 reverts; a kill -9 right after loses its "reverted" record: the next poll writes it.
    fleet.run("h1", &v2).await;
    assert_eq!(fleet.runs("h1"), path("/nix/store/web-v1"));
    let store = store_of(&fleet);
    let hash = rollout::spec_hash(v2.service("web").unwrap());
    let read = rollout::read(&store, "web", &hash).await.unwrap();
    rollout::update(
        &store,
        "web",
        &hash,
        Some((read.record, read.etag)),
        std::time::SystemTime::now(),
        |r| {
            r.hosts.get_mut("h1").unwrap().state = HostState::Healthy;
            true
        },
    )
    .await
    .unwrap();
    fleet.run("h1", &v2).await;
    assert_eq!(
        fleet.record(&v2).await.hosts["h1"].state,
        HostState::Reverted
    );

    // Fixed on h2; the operator resumes: h2's failure no longer counts and h2 tries again.
    fleet.host("h2").host().world().broken.clear();
    rollout::resume(&store, &v2, "web", std::time::SystemTime::now())
        .await
        .unwrap();
    let (_, outcome, _) = fleet.run("h2", &v2).await;
    assert_eq!(outcome, Outcome::Deployed, "the forgiven host retries");
    fleet.run("h1", &v2).await;
    fleet.run("h3", &v2).await;
    for h in hosts {
        assert_eq!(fleet.runs(h), v2_path, "{h}");
    }
    let record = fleet.record(&v2).await;
    assert_eq!(record.epoch, 1);
    assert!(
        record
            .hosts
            .values()
            .all(|h| h.state == HostState::Healthy && h.epoch == 1)
    );
}

#[tokio::test]
async fn a_revert_that_fails_is_reported_as_a_failure() {
    let hosts = ["h1", "h2"];
    let (mut fleet, _) = running_v1(&hosts).await;
    let v2 = web(
        "/nix/store/web-v2",
        &hosts,
        json!({"waves": [{"hosts": ["h1"]}]}),
    );
    fleet.run("h1", &v2).await;
    // v1 no longer starts on h1; the rollout is aborted.
    fleet
        .host("h1")
        .host()
        .world()
        .broken
        .insert(path("/nix/store/web-v1"));
    forge_abort(&fleet, &v2).await;
    let (_, outcome, _) = fleet.run("h1", &v2).await;
    assert!(matches!(outcome, Outcome::RolledBack { .. }), "{outcome:?}");
    assert_eq!(fleet.runs("h1"), path("/nix/store/web-v2"), "v2 put back");
    let (steps, outcome, rolling) = fleet.run("h1", &v2).await;
    assert_eq!(steps, ["wait web"]);
    assert!(
        matches!(&outcome, Outcome::Retrying { error } if error.contains("returning to the version it ran before failed")),
        "{outcome:?}"
    );
    assert!(outcome.failed() && rolling);
}
