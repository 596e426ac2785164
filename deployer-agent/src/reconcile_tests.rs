//! The reconcile decisions, table by table, on an in-memory host ([`MemoryHost`]): deploy,
//! keep, drift, recover, retire, remove, infrastructure. Each case plans, applies the plan
//! and checks both what was decided and what the host and the state look like after; every
//! run also checks that apply executed exactly the plan's steps. The same behaviours are
//! tested against real systemd, proxies and servers in `tests/e2e`.

use deploy_manifest::model::Manifest;
use deploy_manifest::store::FileStore;
use serde_json::{Value, json};

use crate::config::AgentConfig;
use crate::host::memory::{MemoryHost, artifact_path};
use crate::plan::{Condition, Deploy, Plan, Recovery, Step, Strategy, plan, plan_unchanged};
use crate::reconcile::{Agent, InfraOutcome, Outcome, RunReport};
use crate::state::{Health, State};

const ME: &str = "biz";

pub(crate) struct Bench {
    pub(crate) agent: Agent<FileStore, MemoryHost>,
    pub(crate) state: State,
    _dir: tempfile::TempDir,
}

fn config(dir: &std::path::Path, host: &str, store: &std::path::Path) -> AgentConfig {
    AgentConfig {
        store: format!("file://{}", store.display()),
        host: host.into(),
        state_dir: dir.join("state"),
        secrets_dir: dir.join("secrets"),
        unit_dir: dir.join("units"),
        user: false,
        interval: std::time::Duration::from_secs(300),
        settle: std::time::Duration::ZERO,
        proxy: crate::proxy::ProxyConfig::None,
        port_range: (20000, 20003),
        drain: std::time::Duration::ZERO,
        metrics_file: None,
        trusted_keys: Vec::new(),
        nix_trusted_keys: Vec::new(),
        unpack_limits: deploy_manifest::archive::UnpackLimits::HOST_DEFAULT,
        store_deadline: std::time::Duration::from_secs(10),
        history_keep: deploy_manifest::history::DEFAULT_KEEP,
        notify: Default::default(),
        mode: None,
    }
}

impl Bench {
    fn new(proxy: bool) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        Bench::on(ME, &store, proxy, dir)
    }

    /// Host `host` (its state in `dir`) polling the store directory `store`.
    pub(crate) fn on(
        host: &str,
        store: &std::path::Path,
        proxy: bool,
        dir: tempfile::TempDir,
    ) -> Bench {
        let config = config(dir.path(), host, store);
        let store = FileStore::open(&config.store).unwrap();
        Bench {
            agent: Agent {
                store,
                host: MemoryHost::new(proxy),
                config,
            },
            state: State::default(),
            _dir: dir,
        }
    }

    pub(crate) fn host(&self) -> &MemoryHost {
        &self.agent.host
    }

    async fn plan(&self, m: &Manifest) -> Plan {
        let none = crate::rollout::Rollouts::new();
        plan(m, &self.state, &self.agent.host, &self.agent.config, &none).await
    }

    /// A full run as `run_once` makes it, on this bench's state: read the rollouts, plan,
    /// apply (exactly the plan's steps), record this host's part. Returns whether a
    /// rollout is still going on (the next poll reads the manifest in full).
    pub(crate) async fn run_gated(&mut self, m: &Manifest) -> (Plan, RunReport, bool) {
        let rollouts = self.agent.gather(m, &self.state, true).await;
        let plan = plan(
            m,
            &self.state,
            &self.agent.host,
            &self.agent.config,
            &rollouts,
        )
        .await;
        let mut report = RunReport::default();
        self.agent
            .apply(&plan, Some(m), &mut self.state, &mut report)
            .await
            .unwrap();
        assert_eq!(report.steps, plan.steps, "apply executed the plan's steps");
        let rolling = self
            .agent
            .record(&plan, &rollouts, &mut self.state, &mut report)
            .await;
        (plan, report, rolling)
    }

    /// Plan and apply `m`; apply must execute exactly the plan's steps.
    async fn run(&mut self, m: &Manifest) -> (Plan, RunReport) {
        let plan = self.plan(m).await;
        let mut report = RunReport::default();
        self.agent
            .apply(&plan, Some(m), &mut self.state, &mut report)
            .await
            .unwrap();
        assert_eq!(report.steps, plan.steps, "apply executed the plan's steps");
        (plan, report)
    }

    /// Plan and apply for an unchanged manifest.
    async fn run_unchanged(&mut self) -> (Plan, RunReport) {
        let plan = plan_unchanged(&self.state, &self.agent.host).await;
        let mut report = RunReport::default();
        self.agent
            .apply(&plan, None, &mut self.state, &mut report)
            .await
            .unwrap();
        assert_eq!(report.steps, plan.steps);
        (plan, report)
    }

    /// A unit file and a running unit the state knows nothing of.
    fn plant(&self, unit: &str, text: &str) {
        let mut w = self.host().world();
        w.files.insert(unit.into(), text.into());
        w.units
            .insert(unit.into(), (true, "deployer: planted".into()));
    }

    fn active(&self, unit: &str) -> bool {
        self.host().is_active(unit)
    }

    fn file(&self, unit: &str) -> Option<String> {
        self.host().world().files.get(unit).cloned()
    }

    /// The unit hash of `service`'s current generation.
    fn unit_hash(&self, service: &str) -> String {
        let current = self.state.services[service].current.as_ref();
        current.expect("deployed").unit_hash.clone()
    }
}

/// A manifest of `services` (name, store path, extra fields) for host `biz`, with
/// `infrastructure` if not null.
fn manifest(services: &[(&str, &str, Value)], infrastructure: Value) -> Manifest {
    let services: Vec<Value> = services
        .iter()
        .map(|(name, path, extra)| {
            let mut s = json!({"name": name, "artifact": {"storePath": path}, "hosts": [ME]});
            if let Value::Object(extra) = extra {
                s.as_object_mut().unwrap().extend(extra.clone());
            }
            s
        })
        .collect();
    let mut m = json!({"schemaVersion": 1, "services": services});
    if !infrastructure.is_null() {
        m["infrastructure"] = infrastructure;
    }
    deploy_manifest::validate::manifest_from_value(m, "test").unwrap()
}

fn deploy(plan: &Plan, service: &str) -> Deploy {
    plan.steps
        .iter()
        .find_map(|s| match s {
            Step::Deploy(d) if d.service == service => Some((**d).clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no deploy of {service} in {plan:#?}"))
}

/// A short name for each step, for comparing whole plans.
pub(crate) fn kinds(plan: &Plan) -> Vec<String> {
    plan.steps
        .iter()
        .map(|s| {
            let kind = match s {
                Step::Retire { .. } => "retire",
                Step::Infra(_) => "infra",
                Step::Deploy(_) => "deploy",
                Step::Keep { .. } => "keep",
                Step::Rename { .. } => "rename",
                Step::Skip { .. } => "skip",
                Step::Hold { .. } => "hold",
                Step::Wait { .. } => "wait",
                Step::Remove { .. } => "remove",
                Step::StopInfra { .. } => "stop-infra",
                Step::Routes => "routes",
            };
            format!("{kind} {}", s.subject())
        })
        .collect()
}

pub(crate) fn path(p: &str) -> String {
    artifact_path(&deploy_manifest::model::Artifact::StorePath(p.into()))
        .display()
        .to_string()
}

#[tokio::test]
async fn deploys_keeps_skips_and_removes() {
    let mut b = Bench::new(false);
    let v1 = manifest(
        &[
            ("a", "/nix/store/a-v1", json!({})),
            ("b", "/nix/store/b-v1", json!({})),
        ],
        Value::Null,
    );
    let (plan, report) = b.run(&v1).await;
    assert_eq!(kinds(&plan), ["deploy a", "deploy b"]);
    let a = deploy(&plan, "a");
    assert_eq!(a.strategy, Strategy::InPlace);
    assert_eq!(a.unit, "a.service");
    assert_eq!(a.on_failure, Recovery::RemoveNew, "nothing to restore");
    assert_eq!(
        report.services_where(|o| *o == Outcome::Deployed),
        ["a", "b"]
    );
    assert!(b.active("a.service") && b.active("b.service"));
    assert!(
        b.file("a.service")
            .unwrap()
            .contains(&path("/nix/store/a-v1"))
    );

    // b gets a new artifact that crashes; a is removed from the manifest; c is new.
    b.host().world().broken.insert(path("/nix/store/b-v2"));
    let v2 = manifest(
        &[
            ("b", "/nix/store/b-v2", json!({})),
            ("c", "/nix/store/c-v1", json!({})),
        ],
        Value::Null,
    );
    let (plan, report) = b.run(&v2).await;
    assert_eq!(kinds(&plan), ["deploy b", "deploy c", "remove a"]);
    assert_eq!(deploy(&plan, "b").on_failure, Recovery::RestorePrevious);
    assert!(
        matches!(report.services["b"], Outcome::RolledBack { .. }),
        "{report:?}"
    );
    assert_eq!(report.services["c"], Outcome::Deployed);
    assert_eq!(report.services["a"], Outcome::Removed);
    // b runs v1 again, from its v1 unit file; its v2 spec is recorded as failed.
    assert!(b.active("b.service"));
    assert!(
        b.file("b.service")
            .unwrap()
            .contains(&path("/nix/store/b-v1"))
    );
    assert!(b.state.services["b"].failed.is_some());
    assert_eq!(b.state.services["b"].health, Health::Healthy);
    assert!(b.file("a.service").is_none() && !b.active("a.service"));

    // The same manifest again: b's failed spec is skipped, c kept; nothing changes.
    let changes = b.host().world().log.len();
    let (plan, _) = b.run(&v2).await;
    assert_eq!(kinds(&plan), ["skip b", "keep c"]);
    assert_eq!(
        b.host().world().log.len(),
        changes,
        "a plan that keeps changes nothing"
    );
}

#[tokio::test]
async fn a_failed_first_deploy_leaves_nothing_behind() {
    let mut b = Bench::new(false);
    b.host().world().broken.insert(path("/nix/store/a-v1"));
    let m = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    let (_, report) = b.run(&m).await;
    assert!(
        matches!(report.services["a"], Outcome::RolledBack { .. }),
        "the new generation failed: not retried: {report:?}"
    );
    assert!(b.file("a.service").is_none());
    assert!(!b.active("a.service"));
    assert_eq!(b.state.services["a"].health, Health::Unknown);
}

/// state.json lost: the unit of ours found on the host may be what serves, so a failed
/// deploy over it puts it back instead of removing it.
#[tokio::test]
async fn a_failed_deploy_over_a_unit_the_state_lost_puts_it_back() {
    let mut b = Bench::new(false);
    let v1 = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    b.run(&v1).await;
    let serving = b.file("a.service").unwrap();
    b.state = State::default();
    b.host().world().broken.insert(path("/nix/store/a-v2"));
    let v2 = manifest(&[("a", "/nix/store/a-v2", json!({}))], Value::Null);
    let (plan, report) = b.run(&v2).await;
    assert_eq!(deploy(&plan, "a").on_failure, Recovery::RestoreFound);
    let Outcome::RolledBack { error } = &report.services["a"] else {
        panic!("{report:?}");
    };
    assert!(error.contains("found on the host was put back"), "{error}");
    assert_eq!(b.file("a.service").unwrap(), serving);
    assert!(b.active("a.service"), "what served runs again");
    // Not a's: b's unit copied under a's name (which would run b's program with b's
    // secrets as a) is not put back.
    let mut other = Bench::new(false);
    let b_v1 = manifest(&[("b", "/nix/store/b-v1", json!({}))], Value::Null);
    other.run(&b_v1).await;
    let b_unit = other.file("b.service").unwrap();
    let mut b = Bench::new(false);
    b.plant("a.service", &b_unit);
    b.host().world().broken.insert(path("/nix/store/a-v2"));
    let (plan, _) = b.run(&v2).await;
    assert_eq!(deploy(&plan, "a").on_failure, Recovery::RemoveNew);
    assert!(b.file("a.service").is_none() && !b.active("a.service"));
    // Not ours: a file someone else wrote under a's unit name is neither overwritten nor
    // removed; a waits, saying whose the name is.
    let mut b = Bench::new(false);
    let theirs = "[Service]\nExecStart=/bin/theirs\n";
    b.plant("a.service", theirs);
    let (plan, report) = b.run(&v2).await;
    assert!(
        matches!(&plan.steps[..], [Step::Wait { reason, .. }] if reason.contains("the unit name is taken")),
        "{plan:?}"
    );
    assert!(matches!(&report.services["a"], Outcome::Retrying { .. }));
    assert_eq!(b.file("a.service").as_deref(), Some(theirs));
    // The found unit is a first deploy killed before it was recorded, and fails too: put
    // back, it does not stay up, so it is removed like any failed new unit.
    let mut first = Bench::new(false);
    first.run(&v1).await;
    let killed = first.file("a.service").unwrap();
    let mut b = Bench::new(false);
    b.plant("a.service", &killed);
    for broken in ["/nix/store/a-v1", "/nix/store/a-v2"] {
        b.host().world().broken.insert(path(broken));
    }
    let (plan, report) = b.run(&v2).await;
    assert_eq!(deploy(&plan, "a").on_failure, Recovery::RestoreFound);
    let Outcome::RolledBack { error } = &report.services["a"] else {
        panic!("{report:?}");
    };
    assert!(error.contains("did not stay up"), "{error}");
    assert!(b.file("a.service").is_none() && !b.active("a.service"));
}

#[tokio::test]
async fn a_missing_artifact_changes_nothing_and_is_retried() {
    let mut b = Bench::new(false);
    let v1 = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    b.run(&v1).await;
    b.host().world().missing.insert("/nix/store/a-v2".into());
    let v2 = manifest(&[("a", "/nix/store/a-v2", json!({}))], Value::Null);
    let changes = b.host().world().log.len();
    let (_, report) = b.run(&v2).await;
    assert!(report.retry(), "{report:?}");
    assert!(matches!(report.services["a"], Outcome::Retrying { .. }));
    assert_eq!(b.host().world().log.len(), changes, "nothing was touched");
    assert!(b.state.services["a"].failed.is_none(), "not marked failed");
    // Once the artifact is there, the next run deploys it.
    b.host().world().missing.clear();
    let (_, report) = b.run(&v2).await;
    assert_eq!(report.services["a"], Outcome::Deployed);
    assert!(report.ok() && !report.retry());
    assert!(b.state.services["a"].last_error.is_none());
}

#[tokio::test]
async fn an_account_the_host_lacks_changes_nothing_and_is_retried() {
    let mut b = Bench::new(false);
    let v1 = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    b.run(&v1).await;
    let before = b.file("a.service").unwrap();
    b.host().world().missing_accounts.insert("app".into());
    let v2 = manifest(
        &[(
            "a",
            "/nix/store/a-v2",
            json!({"exec": {"command": null, "user": "app"}}),
        )],
        Value::Null,
    );
    let changes = b.host().world().log.len();
    let (_, report) = b.run(&v2).await;
    match &report.services["a"] {
        Outcome::Retrying { error } => assert!(error.contains("no account \"app\""), "{error}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.host().world().log.len(), changes, "nothing was touched");
    assert_eq!(b.file("a.service").unwrap(), before, "v1 still runs");
    assert!(b.active("a.service"));
    // The operator creates the account: the next run deploys, as that account.
    b.host().world().missing_accounts.clear();
    let (_, report) = b.run(&v2).await;
    assert_eq!(report.services["a"], Outcome::Deployed);
    assert!(b.file("a.service").unwrap().contains("User=app\n"));
}

/// A file at a recorded unit's path that no longer starts with our header is not ours to
/// overwrite (someone replaced it): left alone, reported as drift with the reason.
#[tokio::test]
async fn a_recorded_units_file_replaced_by_someone_else_is_left_alone() {
    let mut b = Bench::new(false);
    let m = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    b.run(&m).await;
    let theirs = "[Service]\nExecStart=/bin/theirs\n";
    b.host()
        .world()
        .files
        .insert("a.service".into(), theirs.into());
    b.host().world().log.clear();
    let (plan, report) = b.run_unchanged().await;
    assert!(
        matches!(
            &plan.steps[..],
            [Step::Keep {
                condition: Condition::Taken(_),
                ..
            }]
        ),
        "{plan:?}"
    );
    assert!(matches!(&report.services["a"], Outcome::Drifted { .. }));
    assert_eq!(b.file("a.service").as_deref(), Some(theirs));
    assert!(b.host().world().log.is_empty());
}

#[tokio::test]
async fn drift_is_repaired_from_the_state() {
    // (what happens to the unit, the condition the plan sees, what the repair does)
    type Drift = fn(&MemoryHost);
    let cases: [(&str, Drift, Condition, &str); 3] = [
        (
            "stopped",
            |h| {
                h.world().units.remove("a.service");
            },
            Condition::Stopped,
            "restart a.service",
        ),
        (
            "file edited",
            |h| {
                let edited = format!("{}[Service]\nExecStart=/bin/edited\n", crate::unit::HEADER);
                h.world().files.insert("a.service".into(), edited);
            },
            Condition::Changed,
            "write a.service",
        ),
        (
            "file deleted",
            |h| {
                h.world().files.remove("a.service");
            },
            Condition::Changed,
            "write a.service",
        ),
    ];
    for (what, drift, condition, repair) in cases {
        let mut b = Bench::new(false);
        let m = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
        b.run(&m).await;
        let recorded = b.file("a.service").unwrap();
        drift(b.host());
        b.host().world().log.clear();
        let (plan, report) = b.run_unchanged().await;
        assert!(
            matches!(&plan.steps[..], [Step::Keep { condition: c, .. }] if *c == condition),
            "{what}: {plan:?}"
        );
        assert_eq!(report.services["a"], Outcome::Repaired, "{what}");
        assert!(b.host().world().log.contains(&repair.to_owned()), "{what}");
        assert_eq!(b.file("a.service").unwrap(), recorded, "{what}");
        assert!(b.active("a.service"), "{what}");
        // Repaired: the next plan sees it running and does nothing.
        let (plan, _) = b.run_unchanged().await;
        assert!(
            matches!(
                &plan.steps[..],
                [Step::Keep {
                    condition: Condition::Running,
                    ..
                }]
            ),
            "{what}: {plan:?}"
        );
    }
}

#[tokio::test]
async fn drift_that_cannot_be_put_back_is_a_failure_the_next_run_retries() {
    let mut b = Bench::new(false);
    let m = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    b.run(&m).await;
    b.host().world().files.remove("a.service");
    b.host().world().read_only = true;
    let (_, report) = b.run_unchanged().await;
    let Outcome::Drifted { error } = &report.services["a"] else {
        panic!("not put back: {report:?}");
    };
    assert!(error.contains("a.service"), "{error}");
    assert!(!report.ok(), "a failed run: {report:?}");
    assert_eq!(b.state.services["a"].last_error.as_ref(), Some(error));
    b.host().world().read_only = false;
    let (_, report) = b.run_unchanged().await;
    assert_eq!(report.services["a"], Outcome::Repaired, "{report:?}");
    assert!(report.ok() && b.state.services["a"].last_error.is_none());
}

#[tokio::test]
async fn a_removal_that_fails_is_a_failure_the_next_full_run_retries() {
    let mut b = Bench::new(false);
    b.run(&manifest(
        &[("a", "/nix/store/a-v1", json!({}))],
        Value::Null,
    ))
    .await;
    let none = manifest(&[], Value::Null);
    b.host().world().read_only = true;
    let (_, report) = b.run(&none).await;
    assert!(
        matches!(&report.services["a"], Outcome::NotRemoved { error } if error.contains("a.service")),
        "{report:?}"
    );
    assert!(report.retry() && !report.ok());
    assert!(b.state.services.contains_key("a"), "still recorded");
    b.host().world().read_only = false;
    let (_, report) = b.run(&none).await;
    assert_eq!(report.services["a"], Outcome::Removed);
    assert!(b.file("a.service").is_none() && !b.state.services.contains_key("a"));
}

#[tokio::test]
async fn zero_downtime_runs_side_by_side_and_a_failure_stops_only_the_new_one() {
    let mut b = Bench::new(true);
    let http = json!({"http": {"domain": "a.test", "internalPort": 8000, "zeroDowntime": true}});
    // Something else listens on the first port of the range.
    b.host().world().bound.insert(20000);
    let v1 = manifest(&[("a", "/nix/store/a-v1", http.clone())], Value::Null);
    let (plan, _) = b.run(&v1).await;
    assert_eq!(kinds(&plan), ["deploy a", "routes routes"]);
    let d = deploy(&plan, "a");
    assert_eq!((d.strategy, d.port), (Strategy::SideBySide, Some(20001)));
    assert_eq!(d.unit, "a.20001.service");
    assert_eq!(d.route.as_ref().map(|r| r.port), Some(20001));
    assert_eq!(b.host().world().routes[0].port, 20001);

    // v2 starts beside v1, takes the route, and v1 goes.
    let v2 = manifest(&[("a", "/nix/store/a-v2", http.clone())], Value::Null);
    let (plan, _) = b.run(&v2).await;
    let d = deploy(&plan, "a");
    assert_eq!(d.port, Some(20002));
    assert_eq!(d.replaces.as_deref(), Some("a.20001.service"));
    assert!(d.drain);
    assert_eq!(d.on_failure, Recovery::StopNew);
    assert!(b.active("a.20002.service"));
    assert!(!b.active("a.20001.service"));
    assert!(b.file("a.20001.service").is_none());
    assert_eq!(b.host().world().routes[0].port, 20002);

    // A broken v3 is stopped; v2 never stopped and keeps the route.
    b.host().world().broken.insert(path("/nix/store/a-v3"));
    let v3 = manifest(&[("a", "/nix/store/a-v3", http)], Value::Null);
    let (plan, report) = b.run(&v3).await;
    let d = deploy(&plan, "a");
    assert!(matches!(report.services["a"], Outcome::RolledBack { .. }));
    assert!(!b.active(&d.unit) && b.file(&d.unit).is_none());
    assert!(b.active("a.20002.service"));
    assert!(
        !b.host()
            .world()
            .log
            .contains(&"stop a.20002.service".to_owned())
    );
    assert_eq!(b.host().world().routes[0].port, 20002);
}

#[tokio::test]
async fn no_free_port_waits_for_the_next_run() {
    let mut b = Bench::new(true);
    b.host().world().bound.extend(20000..=20003);
    let http = json!({"http": {"domain": "a.test", "internalPort": 8000, "zeroDowntime": true}});
    let m = manifest(&[("a", "/nix/store/a-v1", http)], Value::Null);
    let (plan, report) = b.run(&m).await;
    assert!(
        matches!(&plan.steps[0], Step::Wait { reason, .. } if reason.contains("20000-20003")),
        "{plan:?}"
    );
    assert!(report.retry(), "{report:?}");
    assert!(matches!(report.services["a"], Outcome::Retrying { .. }));
    assert!(b.host().world().files.is_empty());
}

#[tokio::test]
async fn untracked_units_are_retired_unless_they_may_serve() {
    let header = crate::unit::HEADER;
    let ours = |unit: &str| {
        (
            unit.to_owned(),
            format!("{header}\n[Unit]\nDescription=deployer: x\n"),
        )
    };
    // (unit planted, retired now, retired after the new generation is healthy)
    let cases = [
        // A generation of a service whose healthy current the state records.
        ("a.20007.service", true, false),
        // A release unit left by a crashed run.
        ("a.release.service", true, false),
        // A service no longer declared.
        ("gone.service", true, false),
        // Infrastructure nothing needs.
        ("deployer-infra-old.service", true, false),
        // b is declared but has no healthy generation on record (state lost): its unit
        // may be what serves; it goes once the new generation is healthy.
        ("b.20009.service", false, true),
    ];
    for (unit, now, after) in cases {
        let mut b = Bench::new(false);
        let m = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
        b.run(&m).await;
        let (name, text) = ours(unit);
        b.host().world().files.insert(name.clone(), text);
        b.host()
            .world()
            .units
            .insert(name, (true, "deployer: x".into()));
        let m2 = manifest(
            &[
                ("a", "/nix/store/a-v1", json!({})),
                ("b", "/nix/store/b-v1", json!({})),
            ],
            Value::Null,
        );
        let (plan, report) = b.run(&m2).await;
        let retired_now = plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::Retire { unit: u } if u == unit));
        assert_eq!(retired_now, now, "{unit}: {plan:#?}");
        assert_eq!(
            deploy(&plan, "b").retire_after.contains(&unit.to_owned()),
            after,
            "{unit}"
        );
        assert!(report.retired.contains(&unit.to_owned()), "{unit}");
        assert!(!b.active(unit), "{unit} still runs");
        assert!(b.file(unit).is_none(), "{unit}'s file is still there");
        assert!(b.active("a.service") && b.active("b.service"));
    }
}

#[tokio::test]
async fn a_unit_loaded_with_its_file_gone_is_found_too() {
    let mut b = Bench::new(false);
    let m = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    b.run(&m).await;
    b.host()
        .world()
        .units
        .insert("a.20005.service".into(), (true, "deployer: a".into()));
    // Not ours by description (not exactly what ours of that name would say): left alone.
    for (unit, description) in [
        ("x.service", "someone else's"),
        ("ci-runner.service", "deployer-ci runner"),
        ("gone.service", "deployer: other"),
    ] {
        b.host()
            .world()
            .units
            .insert(unit.into(), (true, description.into()));
    }
    let m2 = manifest(&[("a", "/nix/store/a-v2", json!({}))], Value::Null);
    let (plan, _) = b.run(&m2).await;
    assert_eq!(kinds(&plan), ["deploy a", "retire a.20005.service"]);
    assert!(!b.active("a.20005.service"));
    assert!(b.active("x.service") && b.active("ci-runner.service") && b.active("gone.service"));
}

#[tokio::test]
async fn release_runs_once_per_artifact_and_a_failed_one_changes_nothing() {
    let mut b = Bench::new(false);
    let release = json!({"release": {"command": "bin/migrate"}});
    let v1 = manifest(&[("a", "/nix/store/a-v1", release.clone())], Value::Null);
    let (plan, _) = b.run(&v1).await;
    assert!(deploy(&plan, "a").release);
    assert!(
        b.host()
            .world()
            .log
            .contains(&"run a.release.service".to_owned())
    );
    assert!(
        b.file("a.release.service").is_none(),
        "release unit removed"
    );

    // Same artifact, other settings: the release does not run again.
    let mut settings = release.clone();
    settings["env"] = json!({"X": "1"});
    let v1b = manifest(&[("a", "/nix/store/a-v1", settings)], Value::Null);
    let (plan, _) = b.run(&v1b).await;
    assert!(!deploy(&plan, "a").release);

    // A failing release: the spec is failed, the running generation never stopped.
    b.host().world().release_fails = true;
    b.host().world().log.clear();
    let v2 = manifest(&[("a", "/nix/store/a-v2", release)], Value::Null);
    let (_, report) = b.run(&v2).await;
    assert!(
        matches!(report.services["a"], Outcome::RolledBack { .. }),
        "{report:?}"
    );
    assert!(!report.ok() && !report.retry());
    assert!(b.active("a.service"));
    let log = b.host().world().log.clone();
    assert!(
        !log.iter()
            .any(|l| l == "restart a.service" || l == "stop a.service"),
        "{log:?}"
    );
    assert_eq!(
        b.state.services["a"]
            .released
            .as_ref()
            .map(|a| a.label())
            .as_deref(),
        Some("/nix/store/a-v1")
    );
}

#[tokio::test]
async fn infrastructure_starts_before_its_dependants_is_repaired_and_stopped_when_unused() {
    let mut b = Bench::new(false);
    let needs =
        json!({"infrastructure": {"services": {"worker": {"command": ["/bin/sleep", "600"]}}}});
    let m = manifest(&[("a", "/nix/store/a-v1", needs.clone())], Value::Null);
    let (plan, report) = b.run(&m).await;
    assert_eq!(kinds(&plan), ["infra a-worker", "deploy a"]);
    assert_eq!(deploy(&plan, "a").infra, ["a-worker"]);
    assert_eq!(report.infra["a-worker"], InfraOutcome::Started);
    let unit = "deployer-infra-a-worker.service";
    assert!(b.active(unit));
    assert!(b.state.infra.contains_key("a-worker"));
    let log = b.host().world().log.clone();
    let started = log
        .iter()
        .position(|l| l == &format!("restart {unit}"))
        .unwrap();
    let deployed = log.iter().position(|l| l == "restart a.service").unwrap();
    assert!(started < deployed, "infrastructure first: {log:?}");

    // Stopped behind our back: an unchanged manifest starts it again.
    b.host().world().units.remove(unit);
    let (_, report) = b.run_unchanged().await;
    assert_eq!(
        report.infra["a-worker"],
        InfraOutcome::Repaired,
        "{report:?}"
    );
    assert_eq!(report.services["a"], Outcome::Kept, "{report:?}");
    assert!(b.active(unit));

    // Its declaration changes with a deploy that needs it: started anew, not "repaired".
    let changed =
        json!({"infrastructure": {"services": {"worker": {"command": ["/bin/sleep", "700"]}}}});
    let m = manifest(&[("a", "/nix/store/a-v1b", changed)], Value::Null);
    let (_, report) = b.run(&m).await;
    assert_eq!(
        report.infra["a-worker"],
        InfraOutcome::Started,
        "{report:?}"
    );
    assert!(b.file(unit).unwrap().contains("700"));

    // No service needs it any more, but it cannot be stopped yet: a failure the next run
    // plans again in full (no cheap 304 that would put it back as recorded).
    let m2 = manifest(&[("a", "/nix/store/a-v2", json!({}))], Value::Null);
    b.host().world().read_only = true;
    let (plan, report) = b.run(&m2).await;
    assert_eq!(kinds(&plan), ["deploy a", "stop-infra a-worker"]);
    assert!(
        matches!(report.infra["a-worker"], InfraOutcome::Failed { .. }),
        "{report:?}"
    );
    assert!(report.retry() && !report.ok(), "{report:?}");
    assert!(
        matches!(report.services["a"], Outcome::Retrying { .. }),
        "a unit file that could not be written changed nothing: {report:?}"
    );
    b.host().world().read_only = false;
    // Then: stopped, unit removed, its data noted as kept.
    let (plan, report) = b.run(&m2).await;
    assert_eq!(kinds(&plan), ["deploy a", "stop-infra a-worker"]);
    assert_eq!(report.infra["a-worker"], InfraOutcome::Stopped);
    assert!(!b.active(unit) && b.file(unit).is_none());
    assert!(!b.state.infra.contains_key("a-worker"));
    assert!(b.state.orphans.iter().any(|o| o.contains("a-worker")));
}

/// `dependsOn` orders the start (and readiness) of infrastructure, transitively: a service
/// needs what its infrastructure needs, and each starts after what it depends on, whatever
/// the names' order.
#[tokio::test]
async fn infrastructure_starts_in_dependency_order() {
    let mut b = Bench::new(false);
    let shared = json!({"services": {
        "db": {"command": ["/bin/db"], "dependsOn": ["vault"]},
        "vault": {"command": ["/bin/vault"]},
        "unused": {"command": ["/bin/unused"]}}});
    let own = json!({"infrastructure": {"services": {
        "a-side": {"command": ["/bin/side"], "dependsOn": ["b-side"]},
        "b-side": {"command": ["/bin/b"], "dependsOn": ["db"]}}}});
    let m = manifest(&[("a", "/nix/store/a-v1", own)], shared);
    let (plan, report) = b.run(&m).await;
    assert_eq!(
        kinds(&plan),
        [
            "infra vault",
            "infra db",
            "infra a-b-side",
            "infra a-a-side",
            "deploy a"
        ]
    );
    assert_eq!(
        deploy(&plan, "a").infra,
        ["a-a-side", "a-b-side", "db", "vault"]
    );
    assert!(report.ok(), "{report:?}");
    let log = b.host().world().log.clone();
    let at = |unit: &str| {
        log.iter()
            .position(|l| l == &format!("restart {unit}"))
            .unwrap_or_else(|| panic!("{unit} started: {log:?}"))
    };
    assert!(at("deployer-infra-vault.service") < at("deployer-infra-db.service"));
    assert!(at("deployer-infra-db.service") < at("deployer-infra-a-b-side.service"));
    assert!(at("deployer-infra-a-a-side.service") < at("a.service"));
    assert!(!b.active("deployer-infra-unused.service"));
}

/// A dedicated server (`redis: {"dedicated": true}`) is infrastructure of the service's
/// own: its port is picked once from the free range, kept in the state, and the service
/// is connected to that port, run after run; two services get two servers.
#[tokio::test]
async fn a_dedicated_server_gets_a_port_once_and_keeps_it() {
    let mut b = Bench::new(false);
    let own = |v: &str| json!({"env": {"V": v}, "infrastructure": {"redis": {"dedicated": true}}});
    let m = manifest(
        &[
            ("a", "/nix/store/a-v1", own("1")),
            ("b", "/nix/store/b-v1", own("1")),
        ],
        Value::Null,
    );
    let (plan, report) = b.run(&m).await;
    assert_eq!(
        kinds(&plan),
        ["infra a-redis", "infra b-redis", "deploy a", "deploy b"]
    );
    assert!(report.ok(), "{report:?}");
    let port = |b: &Bench, name: &str| b.state.infra[name].ports["tcp"];
    let (pa, pb) = (port(&b, "a-redis"), port(&b, "b-redis"));
    assert_ne!(pa, pb, "two servers, two ports");
    let printed = plan.to_string();
    assert!(
        printed.contains(&format!("start (port {pa}, picked once and kept)")),
        "{printed}"
    );
    assert!((20000..=20003).contains(&pa) && (20000..=20003).contains(&pb));
    let unit = b.file("deployer-infra-a-redis.service").unwrap();
    assert!(unit.contains(&format!("\"--port\" \"{pa}\"")), "{unit}");
    assert!(unit.contains("redis.conf"), "password-protected: {unit}");
    let log = b.host().world().log.clone();
    assert!(
        log.contains(&format!("env a: redis a-redis:{pa}")),
        "{log:?}"
    );
    assert!(
        log.contains(&format!("env b: redis b-redis:{pb}")),
        "{log:?}"
    );

    // Another deploy of a: the same server, on the same port, untouched.
    b.host().world().log.clear();
    let m = manifest(
        &[
            ("a", "/nix/store/a-v1", own("2")),
            ("b", "/nix/store/b-v1", own("1")),
        ],
        Value::Null,
    );
    let (plan, report) = b.run(&m).await;
    assert_eq!(
        kinds(&plan),
        ["infra a-redis", "infra b-redis", "deploy a", "keep b"]
    );
    assert_eq!(report.infra["a-redis"], InfraOutcome::Running, "{report:?}");
    assert_eq!(port(&b, "a-redis"), pa);
    let log = b.host().world().log.clone();
    assert!(
        log.contains(&format!("env a: redis a-redis:{pa}")),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("restart deployer-infra")),
        "{log:?}"
    );

    // Without it, the server stops (its data stays) and its port is free again.
    let m = manifest(
        &[
            ("a", "/nix/store/a-v1", json!({})),
            ("b", "/nix/store/b-v1", own("1")),
        ],
        Value::Null,
    );
    let (plan, _) = b.run(&m).await;
    assert!(
        kinds(&plan).contains(&"stop-infra a-redis".to_owned()),
        "{plan:?}"
    );
    assert!(!b.state.infra.contains_key("a-redis"));
}

/// The phantom-endpoint janitor: a service's env file is made from its infrastructure's
/// endpoints; when one moves, the services connected to it (and only those) are deployed
/// again, once, so none keeps a stale address.
#[tokio::test]
async fn a_moved_endpoint_redeploys_its_users_once() {
    let mut b = Bench::new(false);
    let shared =
        |port: u16| json!({"services": {"cache": {"preset": "redis", "ports": {"tcp": port}}}});
    let services = [
        (
            "a",
            "/nix/store/a-v1",
            json!({"infrastructure": {"redis": true}}),
        ),
        ("b", "/nix/store/b-v1", json!({})),
    ];
    let (_, report) = b.run(&manifest(&services, shared(6379))).await;
    assert!(report.ok(), "{report:?}");
    let first = b.state.services["a"]
        .current
        .as_ref()
        .unwrap()
        .infra_hash
        .clone();
    assert!(first.is_some());
    assert!(
        b.state.services["b"]
            .current
            .as_ref()
            .unwrap()
            .infra_hash
            .is_none()
    );

    let (plan, report) = b.run(&manifest(&services, shared(6390))).await;
    assert_eq!(kinds(&plan), ["infra cache", "deploy a", "keep b"]);
    assert_eq!(deploy(&plan, "a").reason, crate::plan::Reason::InfraChanged);
    assert!(report.ok(), "{report:?}");
    let log = b.host().world().log.clone();
    assert!(
        log.contains(&"env a: redis cache:6390".to_owned()),
        "{log:?}"
    );
    assert_ne!(
        b.state.services["a"].current.as_ref().unwrap().infra_hash,
        first
    );

    // Once: the next run keeps it.
    let (plan, _) = b.run(&manifest(&services, shared(6390))).await;
    assert_eq!(kinds(&plan), ["infra cache", "keep a", "keep b"]);

    // Moved again while a is broken: that deploy fails and is not retried as long as
    // nothing changes; when the endpoint moves once more, it is tried again.
    b.host().world().unhealthy.insert("a.service".into());
    let (_, report) = b.run(&manifest(&services, shared(6391))).await;
    assert!(!report.ok(), "{report:?}");
    let (plan, _) = b.run(&manifest(&services, shared(6391))).await;
    assert_eq!(kinds(&plan), ["infra cache", "skip a", "keep b"]);
    b.host().world().unhealthy.clear();
    let (plan, report) = b.run(&manifest(&services, shared(6392))).await;
    assert_eq!(kinds(&plan), ["infra cache", "deploy a", "keep b"]);
    assert!(report.ok(), "{report:?}");
}

/// `infrastructure.overrides` (seed 001's serviceOverrides): on the hosts an entry names,
/// a shared service becomes external, every service's requirement of a name gets another
/// command, and `<service>/<requirement>` disables one service's only; other hosts keep
/// the declarations.
#[tokio::test]
async fn overrides_change_infrastructure_on_the_hosts_they_name() {
    let shared = json!({
        "services": {"search": {"command": ["/bin/search"], "ports": {"http": 9200}}},
        "overrides": [{"hosts": [ME], "services": {
            "search": {"external": {"host": "10.0.1.5", "ports": {"http": 9200}}},
            "cache": {"command": ["/bin/cache-dev"]},
            "b/cache": {"disabled": true}}}]});
    let own = json!({"infrastructure": {"services": {
        "cache": {"command": ["/bin/cache"], "dependsOn": ["search"]}}}});
    let services = [
        ("a", "/nix/store/a-v1", own.clone()),
        ("b", "/nix/store/b-v1", own),
    ];
    let m = manifest(&services, shared);

    let mut b = Bench::new(false);
    let (plan, report) = b.run(&m).await;
    assert_eq!(kinds(&plan), ["infra a-cache", "deploy a", "deploy b"]);
    assert!(report.ok(), "{report:?}");
    assert_eq!(deploy(&plan, "a").infra, ["a-cache", "search"]);
    assert!(
        deploy(&plan, "b").infra.is_empty(),
        "b's cache is disabled here"
    );
    let unit = b.file("deployer-infra-a-cache.service").unwrap();
    assert!(unit.contains("/bin/cache-dev"), "{unit}");
    assert!(!b.active("deployer-infra-search.service"), "external here");

    // Another host: the declarations as they are.
    let dir = tempfile::tempdir().unwrap();
    let store = b
        .agent
        .config
        .store
        .trim_start_matches("file://")
        .to_owned();
    let mut other = Bench::on("other", std::path::Path::new(&store), false, dir);
    let m = deploy_manifest::validate::manifest_from_value(
        {
            let mut v = serde_json::to_value(&m).unwrap();
            for s in v["services"].as_array_mut().unwrap() {
                s["hosts"] = json!(["other"]);
            }
            v
        },
        "test",
    )
    .unwrap();
    let (plan, report) = other.run(&m).await;
    assert!(report.ok(), "{report:?}");
    assert_eq!(
        kinds(&plan),
        [
            "infra search",
            "infra a-cache",
            "infra b-cache",
            "deploy a",
            "deploy b"
        ]
    );
    let unit = other.file("deployer-infra-a-cache.service").unwrap();
    assert!(unit.contains("\"/bin/cache\""), "{unit}");
}

/// A host whose mode changes runs the other variant from the next full run: the service
/// that uses it is deployed again with it (never the old mode's command left running).
#[tokio::test]
async fn a_new_mode_replaces_the_running_variant() {
    let own = json!({"infrastructure": {"services": {"node": {"variants": {
        "regtest": {"command": ["/bin/node", "--regtest"]},
        "mainnet": {"command": ["/bin/node", "--mainnet"]}}}}}});
    let m = manifest(&[("a", "/nix/store/a-v1", own)], Value::Null);
    let mut b = Bench::new(false);
    b.agent.config.mode = Some("regtest".into());
    b.run(&m).await;
    b.agent.config.mode = Some("mainnet".into());
    let (plan, report) = b.run(&m).await;
    assert_eq!(kinds(&plan), ["infra a-node", "deploy a"]);
    assert_eq!(deploy(&plan, "a").reason, crate::plan::Reason::InfraChanged);
    assert!(report.ok(), "{report:?}");
    let unit = b.file("deployer-infra-a-node.service").unwrap();
    assert!(
        unit.contains("--mainnet") && !unit.contains("--regtest"),
        "{unit}"
    );
    let (plan, _) = b.run(&m).await;
    assert_eq!(kinds(&plan), ["infra a-node", "keep a"]);
}

/// A shared server a running service is bound to, disabled on this host by an override:
/// the service keeps running and the run says why, every run, until the manifest agrees
/// with itself again.
#[tokio::test]
async fn a_disabled_server_its_service_is_bound_to_is_reported() {
    let shared = json!({"services": {"cache": {"preset": "redis"}}});
    let a = [(
        "a",
        "/nix/store/a-v1",
        json!({"infrastructure": {"redis": true}}),
    )];
    let mut b = Bench::new(false);
    let (_, report) = b.run(&manifest(&a, shared.clone())).await;
    assert!(report.ok(), "{report:?}");
    let mut disabled = shared;
    disabled["overrides"] = json!([{"hosts": [ME], "services": {"cache": {"disabled": true}}}]);
    let (plan, report) = b.run(&manifest(&a, disabled)).await;
    // What the host needs cannot be told while it disagrees: nothing is stopped either.
    assert_eq!(kinds(&plan), ["wait a"]);
    let text = format!("{report:?}");
    assert!(
        text.contains("disabled here by infrastructure.overrides"),
        "{text}"
    );
    assert!(!report.ok());
    assert!(b.active("a.service"), "it keeps running");
}

/// An override's `config` changes the keys it names and keeps the others: a shared Redis
/// that asks for a password keeps it where an override sets its memory.
#[tokio::test]
async fn an_override_config_keeps_what_it_does_not_name() {
    let shared = json!({
        "services": {"cache": {"preset": "redis", "config": {"password": true}}},
        "overrides": [{"hosts": [ME], "services": {"cache": {"config": {"maxmemory": "64mb"}}}}]});
    let m = manifest(
        &[(
            "a",
            "/nix/store/a-v1",
            json!({"infrastructure": {"redis": true}}),
        )],
        shared,
    );
    let mut b = Bench::new(false);
    let (_, report) = b.run(&m).await;
    assert!(report.ok(), "{report:?}");
    let unit = b.file("deployer-infra-cache.service").unwrap();
    assert!(
        unit.contains("redis.conf") && unit.contains("\"64mb\""),
        "{unit}"
    );
}

/// Command variants (seed 001's networkMode): the host's mode picks one; a mode without a
/// variant starts nothing (never another mode's command) and holds back its dependant.
#[tokio::test]
async fn the_hosts_mode_picks_a_command_variant() {
    let own = json!({"infrastructure": {"services": {"node": {"variants": {
        "regtest": {"command": ["/bin/node", "--regtest"]},
        "mainnet": {"command": ["/bin/node", "--mainnet"]}}}}}});
    let m = manifest(&[("a", "/nix/store/a-v1", own)], Value::Null);
    for (mode, expect) in [
        (Some("regtest"), Ok("--regtest")),
        (Some("mainnet"), Ok("--mainnet")),
        (Some("testnet"), Err("no variant for it")),
        (None, Err("give this host one (--mode)")),
    ] {
        let mut b = Bench::new(false);
        b.agent.config.mode = mode.map(str::to_owned);
        let (plan, report) = b.run(&m).await;
        assert_eq!(kinds(&plan), ["infra a-node", "deploy a"]);
        match expect {
            Ok(arg) => {
                assert!(report.ok(), "{mode:?}: {report:?}");
                let unit = b.file("deployer-infra-a-node.service").unwrap();
                assert!(unit.contains(arg), "{mode:?}: {unit}");
            }
            Err(says) => {
                assert!(!report.ok(), "{mode:?}");
                let text = format!("{report:?}");
                assert!(text.contains(says), "{mode:?}: {text}");
                assert!(b.file("deployer-infra-a-node.service").is_none());
                assert!(!b.active("a.service"), "its dependant waits");
            }
        }
    }
}

#[tokio::test]
async fn infrastructure_that_does_not_start_holds_back_its_dependants_only() {
    let mut b = Bench::new(false);
    b.host().world().broken.insert("/bin/false".into());
    let needs = json!({"infrastructure": {"services": {"worker": {"command": ["/bin/false"]}}}});
    let m = manifest(
        &[
            ("a", "/nix/store/a-v1", needs),
            ("b", "/nix/store/b-v1", json!({})),
        ],
        Value::Null,
    );
    let (_, report) = b.run(&m).await;
    let Outcome::Retrying { error } = &report.services["a"] else {
        panic!("a waits for its worker: {report:?}");
    };
    assert!(error.contains("a-worker"), "{report:?}");
    assert!(matches!(
        report.infra["a-worker"],
        InfraOutcome::Failed { .. }
    ));
    assert_eq!(report.services["b"], Outcome::Deployed);
    assert!(b.file("a.service").is_none(), "a was never touched");
    assert!(
        b.state.services["a"].failed.is_none(),
        "retried, not marked failed"
    );
}

#[tokio::test]
async fn a_failure_is_cleared_once_the_manifests_spec_runs_healthily() {
    let mut b = Bench::new(false);
    let v1 = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    b.run(&v1).await;
    b.host().world().broken.insert(path("/nix/store/a-v2"));
    let v2 = manifest(&[("a", "/nix/store/a-v2", json!({}))], Value::Null);
    b.run(&v2).await;
    assert!(b.state.services["a"].failed.is_some());
    // The operator rolls back to v1, which runs already but fails its probe meanwhile: an
    // unhealthy service, and a failed run that says so.
    b.host().world().unhealthy.insert("a.service".into());
    let (_, report) = b.run(&v1).await;
    assert!(
        matches!(&report.services["a"], Outcome::Unhealthy { error } if error.contains("probe fails")),
        "{report:?}"
    );
    assert!(!report.ok() && report.failure().unwrap().starts_with("a: unhealthy"));
    assert!(b.state.services["a"].failed.is_some());
    b.host().world().unhealthy.clear();
    // Healthy again: kept, probed, and the failure recorded for v2 is history.
    let (plan, report) = b.run(&v1).await;
    assert_eq!(report.services["a"], Outcome::Kept);
    assert!(report.ok() && report.failure().is_none());
    assert!(
        matches!(&plan.steps[..], [Step::Keep { recheck: true, .. }]),
        "{plan:?}"
    );
    let a = &b.state.services["a"];
    assert!(a.failed.is_none() && a.last_error.is_none(), "{a:?}");
    assert_eq!(a.health, Health::Healthy);
    // Nothing left to clear: the next plan does not probe.
    let (plan, _) = b.run(&v1).await;
    assert!(matches!(
        &plan.steps[..],
        [Step::Keep { recheck: false, .. }]
    ));
}

#[tokio::test]
async fn plan_acts_on_nothing() {
    let b = Bench::new(true);
    let http = json!({"http": {"domain": "a.test", "internalPort": 8000, "zeroDowntime": true}});
    let needs =
        json!({"infrastructure": {"services": {"worker": {"command": ["/bin/sleep", "600"]}}}});
    let m = manifest(
        &[
            ("a", "/nix/store/a-v1", http),
            ("b", "/nix/store/b-v1", needs),
        ],
        Value::Null,
    );
    b.host()
        .world()
        .files
        .insert("gone.service".into(), crate::unit::HEADER.into());
    let plan = b.plan(&m).await;
    assert_eq!(
        kinds(&plan),
        [
            "infra b-worker",
            "deploy a",
            "deploy b",
            "routes routes",
            "retire gone.service"
        ]
    );
    assert!(
        b.host().world().log.is_empty(),
        "{:?}",
        b.host().world().log
    );
    // And it prints: the human form names each decision.
    let text = plan.to_string();
    for needle in [
        "side by side as a.20000.service on port 20000",
        "needs b-worker",
        "retire  gone.service",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

#[tokio::test]
async fn an_untracked_generation_goes_only_after_the_routes_moved_off_it() {
    // A run killed during its drain: the route went to generation 20001, the state still
    // records 20000. The next run redeploys (on another port: never under the name of a
    // unit it is about to retire); 20001 is stopped only after the routes were applied
    // from the state, never while the proxy may still send traffic to it.
    let mut b = Bench::new(true);
    let http = json!({"http": {"domain": "a.test", "internalPort": 8000, "zeroDowntime": true}});
    let v1 = manifest(&[("a", "/nix/store/a-v1", http.clone())], Value::Null);
    b.run(&v1).await;
    let text = b.file("a.20000.service").unwrap().replace("a-v1", "a-v2");
    b.host()
        .world()
        .files
        .insert("a.20001.service".into(), text);
    b.host()
        .world()
        .units
        .insert("a.20001.service".into(), (true, "deployer: a".into()));
    b.host().world().log.clear();
    let v2 = manifest(&[("a", "/nix/store/a-v2", http)], Value::Null);
    let (plan, _) = b.run(&v2).await;
    assert_eq!(
        kinds(&plan),
        ["deploy a", "routes routes", "retire a.20001.service"]
    );
    let log = b.host().world().log.clone();
    let stopped = log
        .iter()
        .position(|l| l == "stop a.20001.service")
        .unwrap();
    let routed = log.iter().rposition(|l| l.starts_with("routes")).unwrap();
    assert!(routed < stopped, "{log:?}");
    assert_eq!(b.host().world().routes[0].port, 20002);
}

#[tokio::test]
async fn recorded_infrastructure_changes_only_with_a_deploy_that_needs_it() {
    let mut b = Bench::new(false);
    let shared = |port: u16| json!({"services": {"cache": {"command": ["/bin/cache", "--port", port.to_string()], "ports": {"tcp": port}}}});
    let uses = |v: &str| json!({"env": {"V": v}, "infrastructure": {"services": {"side": {"command": ["/bin/side"], "dependsOn": ["cache"]}}}});
    let m1 = manifest(
        &[
            ("a", "/nix/store/a-v1", uses("1")),
            ("b", "/nix/store/b-v1", json!({})),
        ],
        shared(7000),
    );
    b.run(&m1).await;
    let unit = "deployer-infra-cache.service";
    assert!(b.file(unit).unwrap().contains("7000"));
    // The shared daemon's declaration changes, and only b is redeployed: the daemon a uses
    // is not restarted under it (a would keep settings for the old one).
    let m2 = manifest(
        &[
            ("a", "/nix/store/a-v1", uses("1")),
            ("b", "/nix/store/b-v2", json!({})),
        ],
        shared(7001),
    );
    b.host().world().log.clear();
    let (plan, _) = b.run(&m2).await;
    assert!(
        plan.steps.iter().any(|s| matches!(s, Step::Infra(i) if i.name == "cache" && i.condition == Condition::Running && !i.ready)),
        "{plan:#?}"
    );
    assert!(b.file(unit).unwrap().contains("7000"));
    assert!(!b.host().world().log.contains(&format!("restart {unit}")));
    // a deploys: now the daemon is rewritten and restarted first, and waited for.
    let m3 = manifest(
        &[
            ("a", "/nix/store/a-v1", uses("2")),
            ("b", "/nix/store/b-v2", json!({})),
        ],
        shared(7001),
    );
    let (plan, _) = b.run(&m3).await;
    assert!(
        plan.steps.iter().any(|s| matches!(s, Step::Infra(i) if i.name == "cache" && i.condition == Condition::Changed && i.ready)),
        "{plan:#?}"
    );
    assert!(b.file(unit).unwrap().contains("7001"));
    assert!(b.active(unit));
}

#[tokio::test]
async fn a_kept_service_retires_untracked_units_once_it_is_healthy_again() {
    let stray = "a.20009.service";
    for healthy in [true, false] {
        let mut b = Bench::new(false);
        let m = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
        b.run(&m).await;
        // The recorded health is unknown (a restored state.json, say), and an untracked
        // generation of a runs: it may be what serves until a is known healthy.
        b.state.services.get_mut("a").unwrap().health = Health::Unknown;
        b.plant(stray, &format!("{}\n", crate::unit::HEADER));
        if !healthy {
            b.host().world().broken.insert(path("/nix/store/a-v1"));
            b.host().world().units.remove("a.service");
        }
        let (plan, report) = b.run(&m).await;
        assert!(
            matches!(&plan.steps[..], [Step::Keep { recheck: true, retire_after, .. }] if retire_after == &[stray.to_owned()]),
            "{plan:#?}"
        );
        // Retired once a passes its checks; otherwise it stays.
        assert_eq!(report.retired == [stray], healthy, "{report:?}");
        assert_eq!(b.active(stray), !healthy);
    }
}

/// What an older agent left: `a` deployed from `m`, its unit `deployer-a.service`, recorded
/// so; the unit file's text.
async fn legacy_bench(m: &Manifest) -> (Bench, String) {
    let mut b = Bench::new(false);
    b.run(m).await;
    let text = b.file("a.service").unwrap();
    {
        let mut w = b.host().world();
        let running = w.units.remove("a.service").unwrap();
        w.files.remove("a.service");
        w.files.insert("deployer-a.service".into(), text.clone());
        w.units.insert("deployer-a.service".into(), running);
        w.log.clear();
    }
    b.state.services.get_mut("a").unwrap().unit = "deployer-a.service".into();
    (b, text)
}

/// The next full run moves the recorded generation to `a.service` as it is (the old unit
/// stopped first: it holds the port), removes the old unit and records the new name; the
/// run after that keeps it.
#[tokio::test]
async fn a_unit_an_older_agent_named_is_renamed_in_place() {
    let v1 = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    let (mut b, text) = legacy_bench(&v1).await;
    let deploys = b.state.services["a"].deploys;
    let (plan, report) = b.run(&v1).await;
    assert_eq!(
        plan.steps,
        [Step::Rename {
            service: "a".into(),
            from: "deployer-a.service".into(),
            to: "a.service".into()
        }]
    );
    assert_eq!(report.services["a"], Outcome::Kept);
    let log = b.host().world().log.clone();
    let at = |entry: &str| {
        log.iter()
            .position(|l| l == entry)
            .unwrap_or_else(|| panic!("{entry}: {log:?}"))
    };
    assert!(
        at("stop deployer-a.service") < at("restart a.service"),
        "{log:?}"
    );
    assert!(b.active("a.service") && !b.active("deployer-a.service"));
    assert_eq!(b.file("a.service").as_deref(), Some(text.as_str()));
    assert!(b.file("deployer-a.service").is_none());
    assert_eq!(b.state.services["a"].unit, "a.service");
    assert_eq!(
        b.state.services["a"].deploys, deploys,
        "the same generation"
    );
    let (plan, _) = b.run(&v1).await;
    assert_eq!(kinds(&plan), ["keep a"]);

    // Killed after it wrote a.service, before the state named it: the next run renames
    // again and does not retire the unrecorded a.service at its end.
    let (mut b, text) = legacy_bench(&v1).await;
    b.host()
        .world()
        .files
        .insert("a.service".into(), text.clone());
    let (plan, _) = b.run(&v1).await;
    assert_eq!(kinds(&plan), ["rename a"]);
    assert!(b.active("a.service") && b.file("a.service").is_some());
    assert!(b.file("deployer-a.service").is_none());

    // The new name is taken on this host: it stays as it is, kept (and put back if it
    // drifted).
    let (mut b, _) = legacy_bench(&v1).await;
    b.host().world().foreign.insert(
        "a.service".into(),
        crate::systemd::UnitSource {
            id: "a.service".into(),
            load_state: crate::systemd::LoadState::Loaded,
            fragment_path: "/etc/systemd/system/a.service".into(),
            running: true,
            description: "theirs".into(),
        },
    );
    b.host().world().units.remove("deployer-a.service");
    let (plan, report) = b.run(&v1).await;
    assert_eq!(kinds(&plan), ["keep a"]);
    assert_eq!(report.services["a"], Outcome::Repaired);
    assert!(b.active("deployer-a.service") && b.file("a.service").is_none());
}

/// A rename whose new unit does not come up: the new unit goes, the old one (its file never
/// touched) runs again and stays recorded; the next run retries. A deploy of a changed spec
/// over an older agent's unit that fails does the same.
#[tokio::test]
async fn a_failed_rename_starts_the_old_unit_again() {
    let v1 = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    let (mut b, text) = legacy_bench(&v1).await;
    b.host().world().unhealthy.insert("a.service".into());
    let (_, report) = b.run(&v1).await;
    let Outcome::Retrying { error } = &report.services["a"] else {
        panic!("{report:?}");
    };
    assert!(
        error.contains("deployer-a.service was started again"),
        "{error}"
    );
    assert!(b.active("deployer-a.service") && !b.active("a.service"));
    assert_eq!(b.file("deployer-a.service").as_deref(), Some(text.as_str()));
    assert!(b.file("a.service").is_none());
    assert_eq!(b.state.services["a"].unit, "deployer-a.service");
    b.host().world().unhealthy.clear();
    let (plan, _) = b.run(&v1).await;
    assert_eq!(kinds(&plan), ["rename a"]);
    assert!(b.active("a.service") && b.file("deployer-a.service").is_none());

    let (mut b, text) = legacy_bench(&v1).await;
    b.host().world().broken.insert(path("/nix/store/a-v2"));
    let v2 = manifest(&[("a", "/nix/store/a-v2", json!({}))], Value::Null);
    let (plan, report) = b.run(&v2).await;
    let d = deploy(&plan, "a");
    assert_eq!(
        (d.strategy, d.on_failure),
        (Strategy::InPlace, Recovery::StartReplaced)
    );
    assert_eq!(d.replaces.as_deref(), Some("deployer-a.service"));
    assert!(
        matches!(&report.services["a"], Outcome::RolledBack { .. }),
        "{report:?}"
    );
    assert!(b.active("deployer-a.service") && !b.active("a.service"));
    assert_eq!(b.file("deployer-a.service").as_deref(), Some(text.as_str()));
    assert!(b.file("a.service").is_none());
    assert_eq!(b.state.services["a"].unit, "deployer-a.service");
}

/// A recorded unit whose name now stands for a unit of the host's (an alias enabled since,
/// say `sshd.service` for `ssh.service`): removing the service does not stop it, and a
/// drifted one is not written or started.
#[tokio::test]
async fn a_recorded_name_the_host_took_since_is_not_stopped_or_started() {
    use crate::systemd::{LoadState, UnitSource};
    let v1 = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    let alias = UnitSource {
        id: "ssh.service".into(),
        load_state: LoadState::Loaded,
        fragment_path: "/lib/systemd/system/ssh.service".into(),
        running: true,
        description: "OpenBSD Secure Shell server".into(),
    };
    let mut b = Bench::new(false);
    b.run(&v1).await;
    b.host().world().files.remove("a.service");
    b.host()
        .world()
        .foreign
        .insert("a.service".into(), alias.clone());
    b.host().world().log.clear();
    let (plan, report) = b.run(&v1).await;
    assert!(
        matches!(&plan.steps[..], [Step::Keep { condition: Condition::Taken(why), .. }] if why.contains("another name of ssh.service")),
        "{plan:?}"
    );
    assert!(matches!(&report.services["a"], Outcome::Drifted { .. }));
    assert!(
        b.host().world().log.is_empty(),
        "{:?}",
        b.host().world().log
    );

    let mut b = Bench::new(false);
    b.run(&v1).await;
    b.host().world().foreign.insert("a.service".into(), alias);
    b.host().world().log.clear();
    let (_, report) = b.run(&manifest(&[], Value::Null)).await;
    assert_eq!(report.services["a"], Outcome::Removed);
    let log = b.host().world().log.clone();
    assert!(!log.contains(&"stop a.service".to_owned()), "{log:?}");
    assert!(b.file("a.service").is_none(), "our file goes");
}

/// A unit name systemd gives to something that is not ours (a unit of the host's, an
/// alias of one, a masked name) is never written: the service waits, saying whose it is,
/// and nothing on the host changes; once the name is free, the next run deploys.
#[tokio::test]
async fn a_unit_name_the_host_uses_is_refused() {
    use crate::systemd::{LoadState, UnitSource};
    let v1 = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    let cases = [
        (
            UnitSource {
                id: "a.service".into(),
                load_state: LoadState::Loaded,
                fragment_path: "/lib/systemd/system/a.service".into(),
                running: true,
                description: "theirs".into(),
            },
            "a.service is a unit of this host's, from /lib/systemd/system/a.service",
        ),
        (
            UnitSource {
                id: "ssh.service".into(),
                load_state: LoadState::Loaded,
                fragment_path: "/lib/systemd/system/ssh.service".into(),
                running: true,
                description: "OpenBSD Secure Shell server".into(),
            },
            "a.service is another name of ssh.service",
        ),
        (
            UnitSource {
                id: "a.service".into(),
                load_state: LoadState::Masked,
                fragment_path: "/etc/systemd/system/a.service".into(),
                running: false,
                description: "theirs".into(),
            },
            "a.service is masked",
        ),
    ];
    for (source, needle) in cases {
        let mut b = Bench::new(false);
        b.host().world().foreign.insert("a.service".into(), source);
        let (plan, report) = b.run(&v1).await;
        assert!(
            matches!(&plan.steps[..], [Step::Wait { reason, .. }] if reason.contains(needle) && reason.contains("rename the service")),
            "{plan:?}"
        );
        assert!(matches!(&report.services["a"], Outcome::Retrying { .. }));
        assert!(
            b.host().world().log.is_empty(),
            "{:?}",
            b.host().world().log
        );
        b.host().world().foreign.clear();
        let (_, report) = b.run(&v1).await;
        assert_eq!(report.services["a"], Outcome::Deployed);
    }
    // The release unit's name too.
    let mut b = Bench::new(false);
    let with_release = manifest(
        &[(
            "a",
            "/nix/store/a-v1",
            json!({"release": {"command": "bin/migrate"}}),
        )],
        Value::Null,
    );
    b.host().world().foreign.insert(
        "a.release.service".into(),
        UnitSource {
            id: "a.release.service".into(),
            load_state: LoadState::Loaded,
            fragment_path: "/etc/systemd/system/a.release.service".into(),
            running: false,
            description: "theirs".into(),
        },
    );
    let (plan, _) = b.run(&with_release).await;
    assert_eq!(kinds(&plan), ["wait a"]);
}

/// What each run tells the history: a deploy with its phases, a rollback with the unit's
/// log masked with the service's secret values, a removal; a failure that repeats every
/// run is told once, and again after the service was fine in between.
#[tokio::test]
async fn events_say_what_happened_once_with_phases_and_a_masked_log() {
    use deploy_manifest::history::{EventKind, Phase};
    let mut b = Bench::new(false);
    let kinds = |r: &RunReport| -> Vec<(String, EventKind)> {
        r.events
            .iter()
            .map(|e| (e.service.clone(), e.kind))
            .collect()
    };
    let v1 = manifest(
        &[
            ("a", "/nix/store/a-v1", json!({})),
            ("b", "/nix/store/b-v1", json!({})),
        ],
        Value::Null,
    );
    let (_, report) = b.run(&v1).await;
    assert_eq!(
        kinds(&report),
        [
            ("a".into(), EventKind::Deployed),
            ("b".into(), EventKind::Deployed)
        ]
    );
    let e = &report.events[0];
    assert_eq!(e.host, ME);
    assert_eq!(e.artifact.as_deref(), Some("/nix/store/a-v1"));
    assert!(e.previous.is_none() && e.error.is_none() && e.log.is_empty());
    for phase in [
        Phase::Fetch,
        Phase::Infrastructure,
        Phase::Restart,
        Phase::Health,
    ] {
        assert!(e.phases.contains_key(&phase), "{phase:?} in {:?}", e.phases);
    }
    assert!(
        !e.phases.contains_key(&Phase::Release),
        "no release command"
    );
    assert_eq!(
        b.state.services["a"].phases, e.phases,
        "kept for the report"
    );
    assert_eq!(b.state.phase_histogram[&Phase::Restart].count, 2);

    // Unchanged: nothing to tell.
    let (_, report) = b.run(&v1).await;
    assert!(report.events.is_empty(), "{:?}", report.events);

    // a's v2 crashes and prints its secret; b's v2 is not in the store.
    {
        let mut w = b.host().world();
        w.broken.insert(path("/nix/store/a-v2"));
        w.missing.insert("/nix/store/b-v2".into());
        w.env_values.insert(
            "/mem/secrets/a.env".into(),
            crate::evidence::secret_values("API_TOKEN=tok-SECRET-42\n"),
        );
        w.unit_logs
            .insert("a.service".into(), vec!["v1 started".into()]);
        w.prints.insert(
            "a.service".into(),
            vec!["starting with token tok-SECRET-42".into(), "exit 3".into()],
        );
    }
    let v2 = manifest(
        &[
            ("a", "/nix/store/a-v2", json!({})),
            ("b", "/nix/store/b-v2", json!({})),
        ],
        Value::Null,
    );
    let (_, report) = b.run(&v2).await;
    assert_eq!(
        kinds(&report),
        [
            ("a".into(), EventKind::RolledBack),
            ("b".into(), EventKind::Failed)
        ]
    );
    let rolled = &report.events[0];
    assert_eq!(rolled.previous.as_deref(), Some("/nix/store/a-v1"));
    assert!(rolled.error.is_some());
    assert_eq!(
        rolled.log,
        ["starting with token ***", "exit 3"],
        "only what it logged since the deploy began, the secret masked"
    );
    let json = serde_json::to_string(&report.events).unwrap();
    assert!(!json.contains("tok-SECRET-42"), "{json}");
    assert_eq!(
        b.state.services["a"].failed.as_ref().unwrap().log,
        rolled.log
    );
    let state_json = serde_json::to_string(&b.state).unwrap();
    assert!(!state_json.contains("tok-SECRET-42"));

    // Next run: b still cannot fetch (the same failure: not told again); a is skipped.
    let (_, report) = b.run(&v2).await;
    assert!(report.events.is_empty(), "{:?}", report.events);
    // A run that could not read the manifest (kept what runs) proves nothing: the same
    // failure after it is still not news.
    let (_, report) = b.run_unchanged().await;
    assert!(report.events.is_empty(), "{:?}", report.events);
    let (_, report) = b.run(&v2).await;
    assert!(report.events.is_empty(), "{:?}", report.events);
    // b deploys; when it fails the same way later, that is news again.
    b.host().world().missing.clear();
    let (_, report) = b.run(&v2).await;
    assert_eq!(kinds(&report), [("b".into(), EventKind::Deployed)]);

    // A secrets file that cannot be read: the log is withheld, not sent unmasked.
    b.host().world().broken.insert(path("/nix/store/b-v3"));
    b.host()
        .world()
        .unreadable
        .insert("/mem/secrets/b.env".into());
    let v3 = manifest(
        &[
            ("a", "/nix/store/a-v2", json!({})),
            ("b", "/nix/store/b-v3", json!({})),
        ],
        Value::Null,
    );
    let (_, report) = b.run(&v3).await;
    let e = report.events.iter().find(|e| e.service == "b").unwrap();
    assert_eq!(e.kind, EventKind::RolledBack);
    assert_eq!(e.log.len(), 1);
    assert!(e.log[0].starts_with("(log withheld: "), "{:?}", e.log);

    // A crash loop is repaired every run: told once (until a run that read the manifest
    // finds it kept as it was, as for a failure above).
    let repaired = |b: &mut Bench| {
        b.host().world().units.remove("a.service");
    };
    repaired(&mut b);
    let (_, report) = b.run_unchanged().await;
    assert_eq!(kinds(&report), [("a".into(), EventKind::Repaired)]);
    repaired(&mut b);
    let (_, report) = b.run_unchanged().await;
    assert!(report.events.is_empty(), "{:?}", report.events);

    // Removed from the manifest.
    let (_, report) = b.run(&manifest(&[], Value::Null)).await;
    assert_eq!(
        kinds(&report),
        [
            ("a".into(), EventKind::Removed),
            ("b".into(), EventKind::Removed)
        ]
    );
}

/// A run's cost grows with what changed, not with what exists: keeping 3 or 30 services
/// costs the same calls to the manager and no state write, one drifted service costs one
/// write, and the plan asked about every unit at once.
#[tokio::test]
async fn keeping_services_costs_no_write_and_the_same_calls_however_many() {
    async fn costs(n: usize) -> [u64; 4] {
        let mut b = Bench::new(false);
        let paths: Vec<String> = (0..n).map(|i| format!("/nix/store/s{i}-v1")).collect();
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let services: Vec<(&str, &str, Value)> = names
            .iter()
            .zip(&paths)
            .map(|(name, path)| (name.as_str(), path.as_str(), json!({})))
            .collect();
        let m = manifest(&services, Value::Null);
        b.run(&m).await;
        let count = |b: &Bench| {
            let w = b.host().world();
            (w.calls, w.saves)
        };
        // A full plan that keeps everything (the manifest changed elsewhere).
        let (calls, saves) = count(&b);
        let (_, report) = b.run(&m).await;
        assert_eq!(report.services_where(|o| *o == Outcome::Kept).len(), n);
        let full = count(&b);
        // An unchanged manifest: drift repair only.
        b.run_unchanged().await;
        let idle = count(&b);
        // One service drifted: one write, whatever the rest.
        b.host().world().units.remove("s0.service");
        let (_, report) = b.run_unchanged().await;
        assert_eq!(report.services["s0"], Outcome::Repaired);
        let drift = count(&b);
        [
            full.0 - calls,
            (full.1 - saves) + 10 * (idle.1 - full.1),
            idle.0 - full.0,
            drift.1 - idle.1,
        ]
    }
    let small = costs(3).await;
    // Calls: found units (1) and every unit's state at once (1); no write for keeping.
    assert_eq!(
        small,
        [2, 0, 1, 1],
        "full calls, writes, idle calls, drift writes"
    );
    assert_eq!(costs(30).await, small, "30 services cost what 3 do");
}

/// Deploys go as one batch: every unit file written, one reload, then started; a service
/// that fails is undone alone (its own recovery, its own reload) while the others deploy,
/// and removals go with one reload too.
#[tokio::test]
async fn a_batch_of_deploys_reloads_once_and_a_failure_is_undone_alone() {
    let mut b = Bench::new(false);
    let reloads = |b: &Bench| {
        b.host()
            .world()
            .log
            .iter()
            .filter(|l| *l == "reload")
            .count()
    };
    let names: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let version = |v: &str| -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.clone(), format!("/nix/store/{n}-{v}")))
            .collect()
    };
    let manifest_of = |specs: &[(String, String)]| {
        let services: Vec<(&str, &str, Value)> = specs
            .iter()
            .map(|(n, p)| (n.as_str(), p.as_str(), json!({})))
            .collect();
        manifest(&services, Value::Null)
    };
    // First deploy: s2 crashes; it is removed alone, the five others run.
    b.host().world().broken.insert(path("/nix/store/s2-v1"));
    let (_, report) = b.run(&manifest_of(&version("v1"))).await;
    assert_eq!(
        report.services_where(|o| *o == Outcome::Deployed),
        ["s0", "s1", "s3", "s4", "s5"]
    );
    assert!(matches!(report.services["s2"], Outcome::RolledBack { .. }));
    assert!(b.file("s2.service").is_none() && !b.active("s2.service"));
    assert_eq!(reloads(&b), 2, "the batch's reload, and s2's removal");
    let log = b.host().world().log.clone();
    let first_restart = log.iter().position(|l| l.starts_with("restart")).unwrap();
    let last_write = log.iter().rposition(|l| l.starts_with("write")).unwrap();
    assert!(
        last_write < first_restart,
        "all written before any starts: {log:?}"
    );

    // Upgrade: s4 crashes and gets v1 back; the others run v2.
    b.host().world().log.clear();
    b.host().world().broken.insert(path("/nix/store/s4-v2"));
    let (_, report) = b.run(&manifest_of(&version("v2"))).await;
    assert!(matches!(report.services["s4"], Outcome::RolledBack { .. }));
    assert!(b.active("s4.service"));
    assert!(
        b.file("s4.service")
            .unwrap()
            .contains(&path("/nix/store/s4-v1"))
    );
    assert!(
        b.file("s0.service")
            .unwrap()
            .contains(&path("/nix/store/s0-v2"))
    );
    assert_eq!(reloads(&b), 2, "the batch's reload, and s4's restore");
    assert_eq!(b.state.services["s0"].health, Health::Healthy);

    // Everything removed: one reload.
    b.host().world().log.clear();
    let (plan, report) = b.run(&manifest(&[], Value::Null)).await;
    assert!(
        kinds(&plan).iter().all(|k| k.starts_with("remove")),
        "{plan:?}"
    );
    assert_eq!(report.services_where(|o| *o == Outcome::Removed), names);
    assert_eq!(reloads(&b), 1);
    assert!(b.host().world().files.is_empty());
}

/// A daemon-reload that fails once is retried; one that keeps failing starts nothing: each
/// unit file goes back as it was, what ran keeps running, and no spec is blamed (the next
/// run deploys them).
#[tokio::test]
async fn a_failing_reload_starts_nothing_and_blames_no_spec() {
    let mut b = Bench::new(false);
    let names = ["s0", "s1", "s2"];
    let m = |v: &str| {
        let paths: Vec<String> = names
            .iter()
            .map(|n| format!("/nix/store/{n}-{v}"))
            .collect();
        let services: Vec<(&str, &str, Value)> = names
            .iter()
            .zip(&paths)
            .map(|(n, p)| (*n, p.as_str(), json!({})))
            .collect();
        manifest(&services, Value::Null)
    };
    b.run(&m("v1")).await;
    // Once: retried, and the batch deploys.
    b.host().world().reload_fails = 1;
    let (_, report) = b.run(&m("v2")).await;
    assert_eq!(report.services_where(|o| *o == Outcome::Deployed), names);
    // Twice: nothing starts, and the unit files go back to v2.
    b.host().world().reload_fails = 2;
    b.host().world().log.clear();
    let (_, report) = b.run(&m("v3")).await;
    assert_eq!(
        report.services_where(|o| matches!(o, Outcome::Retrying { .. })),
        names,
        "{:?}",
        report.services
    );
    let log = b.host().world().log.clone();
    assert!(
        !log.iter()
            .any(|l| l.starts_with("restart") || l.starts_with("stop")),
        "{log:?}"
    );
    for n in names {
        let unit = format!("{n}.service");
        assert!(b.active(&unit));
        assert!(
            b.file(&unit)
                .unwrap()
                .contains(&path(&format!("/nix/store/{n}-v2")))
        );
        assert!(b.state.services[n].failed.is_none(), "no spec blamed");
    }
    // The next run deploys v3.
    let (_, report) = b.run(&m("v3")).await;
    assert_eq!(report.services_where(|o| *o == Outcome::Deployed), names);
}

/// The agent is killed while a batch stops the generations it replaced: the state saved
/// before that already records every new generation, so the next run keeps them, retires
/// what is left of the old ones, and every route points at a generation that runs.
#[tokio::test]
async fn a_kill_while_a_batch_stops_the_old_generations_loses_no_new_one() {
    use futures_util::FutureExt;
    let mut b = Bench::new(true);
    b.agent.config.port_range = (20000, 20019);
    let http = |d: &str| json!({"http": {"domain": d, "internalPort": 8000, "zeroDowntime": true}});
    let m = |v: &str| {
        manifest(
            &[
                ("a", &format!("/nix/store/a-{v}"), http("a.test")),
                ("b", &format!("/nix/store/b-{v}"), http("b.test")),
            ],
            Value::Null,
        )
    };
    b.run(&m("v1")).await;
    let (a_v1, b_v1) = (
        b.state.services["a"].unit.clone(),
        b.state.services["b"].unit.clone(),
    );
    b.host().world().kill_on_stop = Some(b_v1.clone());
    let v2 = m("v2");
    let plan = b.plan(&v2).await;
    let mut report = RunReport::default();
    let run = b.agent.apply(&plan, Some(&v2), &mut b.state, &mut report);
    let killed = std::panic::AssertUnwindSafe(run).catch_unwind().await;
    assert!(killed.is_err(), "the kill happened");
    b.host().world().kill_on_stop = None;
    // The next run starts from state.json as saved.
    let saved = b.host().world().saved.clone().unwrap();
    b.state = saved;
    for s in ["a", "b"] {
        let unit = &b.state.services[s].unit;
        assert!(
            unit != &a_v1 && unit != &b_v1 && b.active(unit),
            "{s}: {unit}"
        );
    }
    let (plan, _) = b.run(&v2).await;
    assert!(kinds(&plan).contains(&format!("retire {b_v1}")), "{plan:?}");
    assert!(!b.active(&b_v1) && !b.active(&a_v1));
    let routes = b.host().world().routes.clone();
    assert_eq!(routes.len(), 2);
    for route in routes {
        let unit = format!("{}.{}.service", route.service, route.port);
        assert!(b.active(&unit), "{route:?} points at {unit}, which runs");
    }
}

#[tokio::test]
async fn a_changed_unit_whose_recorded_file_is_gone_is_deployed_again() {
    let mut b = Bench::new(false);
    let m = manifest(&[("a", "/nix/store/a-v1", json!({}))], Value::Null);
    b.run(&m).await;
    let generated = b.file("a.service").unwrap();
    let lost = b.unit_hash("a");
    b.host().world().lost_texts.insert(lost);
    // Only stopped: the file on the host is still the one to start, nothing is missing.
    b.host().world().units.remove("a.service");
    let (_, report) = b.run_unchanged().await;
    assert_eq!(report.services["a"], Outcome::Repaired, "{report:?}");

    b.host()
        .world()
        .files
        .insert("a.service".into(), format!("{generated}# edited\n"));
    b.host().world().log.clear();
    let (_, report) = b.run_unchanged().await;
    let Outcome::Retrying { error } = &report.services["a"] else {
        panic!("nothing to put back: {report:?}");
    };
    assert!(error.contains("deploys it again"), "{error}");
    assert!(report.retry(), "the next run plans in full");
    assert!(
        b.host().world().log.is_empty(),
        "nothing changed on the host"
    );

    let (plan, report) = b.run(&m).await;
    assert!(
        matches!(&plan.steps[..], [Step::Deploy(d)] if d.reason == crate::plan::Reason::RecordLost),
        "{plan:?}"
    );
    assert_eq!(report.services["a"], Outcome::Deployed, "{report:?}");
    assert_eq!(b.file("a.service").unwrap(), generated);
    let hash = b.unit_hash("a");
    assert_eq!(
        crate::host::Host::recorded_unit_text(b.host(), &hash).unwrap(),
        generated
    );
}

#[tokio::test]
async fn a_rollback_whose_recorded_file_is_gone_uses_the_hosts_if_it_is_that_text() {
    let mut b = Bench::new(false);
    b.run(&manifest(
        &[("a", "/nix/store/a-v1", json!({}))],
        Value::Null,
    ))
    .await;
    let v1 = b.file("a.service").unwrap();
    let lost = b.unit_hash("a");
    b.host().world().lost_texts.insert(lost.clone());
    b.host().world().broken.insert(path("/nix/store/a-v2"));
    let v2 = manifest(&[("a", "/nix/store/a-v2", json!({}))], Value::Null);
    let (_, report) = b.run(&v2).await;
    assert!(
        matches!(&report.services["a"], Outcome::RolledBack { .. }),
        "{report:?}"
    );
    assert_eq!(b.file("a.service").unwrap(), v1, "v1 put back");
    assert!(b.active("a.service"));
    assert!(
        !b.host().world().lost_texts.contains(&lost),
        "recorded again"
    );

    // Lost, and the host's file is not that text either: nothing is touched.
    b.host().world().lost_texts.insert(lost);
    b.host()
        .world()
        .files
        .insert("a.service".into(), format!("{v1}# edited\n"));
    b.host().world().log.clear();
    let v3 = manifest(&[("a", "/nix/store/a-v3", json!({}))], Value::Null);
    let (_, report) = b.run(&v3).await;
    let Outcome::Retrying { error } = &report.services["a"] else {
        panic!("not deployed without a way back: {report:?}");
    };
    assert!(error.contains("units/"), "{error}");
    assert!(
        b.host().world().log.is_empty(),
        "{:?}",
        b.host().world().log
    );
}
