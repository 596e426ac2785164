//! A simulated fleet rolling out one service through a real store: each host runs the
//! agent's own rollout phase (`Agent::gather`, the gate, `Agent::record`) and the
//! manifest poll, with a deploy that succeeds at once in place of systemd. Hosts poll in
//! rounds (every host once per round, in a shuffled order, up to `CONCURRENCY` at once, as
//! jittered timers make real fleets do), so a round is one poll interval.
//!
//! `cargo run --release -p deployer-agent --example rollout_fleet -- STORE_URL HOSTS`
//! (bench/rollout.sh starts a real S3 server and runs it). Prints, for the same fleet and
//! store, the rollout through 4 waves against the same push without a policy (every host
//! deploys at its next poll): polls from push to the last host, store requests per host
//! per poll during the rollout and after it, and compare-and-swap retries.

use std::collections::BTreeMap;
use std::time::Duration;

use deploy_manifest::model::{Artifact, Manifest};
use deploy_manifest::repo::{CURRENT_KEY, Repo};
use deploy_manifest::rollout::Gate;
use deploy_manifest::store::{Counted, Fetched, ObjectStore, Store};
use deployer_agent::config::AgentConfig;
use deployer_agent::plan::{Plan, spec_hash};
use deployer_agent::reconcile::{Agent, Outcome, RunReport};
use deployer_agent::state::{Generation, Health, ServiceState, State};
use futures_util::{StreamExt, stream};

const CONCURRENCY: usize = 32;

struct SimHost {
    agent: Agent<Counted<Store>, ()>,
    state: State,
    /// The ETag of manifest.json this host remembers (none while a rollout goes on).
    etag: Option<String>,
    /// The requests of each poll.
    polls: Vec<u64>,
    /// Record writes that gave up after their compare-and-swap attempts.
    gave_up: u64,
}

fn config(host: &str, store: &str) -> AgentConfig {
    AgentConfig {
        store: store.to_owned(),
        host: host.to_owned(),
        state_dir: "/nonexistent".into(),
        secrets_dir: "/nonexistent".into(),
        unit_dir: "/nonexistent".into(),
        user: true,
        interval: Duration::from_secs(1),
        settle: Duration::ZERO,
        proxy: deployer_agent::proxy::ProxyConfig::None,
        port_range: (20000, 20001),
        drain: Duration::ZERO,
        metrics_file: None,
        trusted_keys: Vec::new(),
        nix_trusted_keys: Vec::new(),
        unpack_limits: deploy_manifest::archive::UnpackLimits::HOST_DEFAULT,
        store_deadline: Duration::from_secs(60),
        history_keep: deploy_manifest::history::DEFAULT_KEEP,
        notify: Default::default(),
        mode: None,
    }
}

fn generation(m: &Manifest) -> Generation {
    let s = &m.services[0];
    Generation {
        artifact: s.artifact.clone(),
        path: String::new(),
        spec_hash: spec_hash(s),
        infra_hash: None,
        version: m.version.clone(),
        deployed_at: String::new(),
        unit_hash: String::new(),
        env_files: Vec::new(),
        unit: None,
        route: None,
    }
}

impl SimHost {
    fn requests(&self) -> u64 {
        self.agent.store.requests().expect("a counted store")
    }

    /// One poll: the manifest (a 304 while nothing changed and no rollout goes on), then
    /// the rollout phase, a deploy that succeeds at once when the gate says go.
    async fn poll(&mut self) {
        let before = self.requests();
        let fetched = self
            .agent
            .store
            .get(CURRENT_KEY, self.etag.as_deref())
            .await
            .expect("the store answers");
        let (manifest, etag) = match fetched {
            Fetched::Found { bytes, etag } => (
                deploy_manifest::validate::parse_manifest(&bytes, "manifest.json").unwrap(),
                etag,
            ),
            _ => {
                self.polls.push(self.requests() - before);
                return;
            }
        };
        let views = self.agent.gather(&manifest, &self.state, true).await;
        let mut report = RunReport::default();
        let mut rollouts = Vec::new();
        let current = self.state.services["web"].current.clone().unwrap();
        let wanted = generation(&manifest);
        let runs = current.spec_hash == wanted.spec_hash;
        match views.get("web") {
            None if !runs => self.deploy(wanted, &mut report),
            None => {}
            Some(v) => {
                let gated = v.gated("web", runs);
                if gated.gate == Gate::Go {
                    self.deploy(wanted, &mut report);
                } else if runs {
                    report.services.insert("web".into(), Outcome::Kept);
                }
                rollouts.push(gated);
            }
        }
        let plan = Plan {
            manifest_version: manifest.version.clone(),
            unchanged: false,
            steps: Vec::new(),
            rollouts,
        };
        let rolling = self
            .agent
            .record(&plan, &views, &mut self.state, &mut report)
            .await;
        // A write that gave up (other hosts kept winning the compare-and-swap) is retried
        // at the next poll, as a real agent does; counted.
        if report.rollout_error.is_some() {
            self.gave_up += 1;
        }
        self.etag = (!rolling).then_some(etag);
        self.polls.push(self.requests() - before);
    }

    fn deploy(&mut self, g: Generation, report: &mut RunReport) {
        let e = self.state.services.get_mut("web").unwrap();
        e.previous = e.current.replace(g);
        e.health = Health::Healthy;
        report.services.insert("web".into(), Outcome::Deployed);
    }

    fn runs(&self, artifact: &Artifact) -> bool {
        self.state.services["web"]
            .current
            .as_ref()
            .is_some_and(|c| &c.artifact == artifact)
    }
}

/// What one push to the fleet cost.
struct Figures {
    /// Rounds (polls of every host) from push to the last host running it.
    rounds: usize,
    /// Store requests per host per poll from push until every host is idle again.
    per_poll: f64,
    /// The same in the round after.
    idle: f64,
    total: u64,
    /// Record writes that gave up (retried at the host's next poll).
    gave_up: u64,
    /// The size of the rollout record at the end.
    record_bytes: usize,
}

/// Push `artifact` (with `policy`), then poll in rounds until every host runs it; then
/// one more round after the end.
async fn rollout(
    url: &str,
    hosts: usize,
    policy: Option<serde_json::Value>,
    seed: &mut u64,
) -> Figures {
    let store = Store::open(url).await.unwrap();
    let repo = Repo::new(store, "bench");
    repo.init().await.unwrap();
    let names: Vec<String> = (0..hosts).map(|i| format!("h{i:04}")).collect();
    let service = serde_json::json!({"name": "web", "artifact": {"storePath": "/nix/store/aaaa-web-v1"}, "hosts": names});
    repo.update(|m| deploy_manifest::edit::add_service(m, &service))
        .await
        .unwrap();
    let v1 = repo.current().await.unwrap().manifest;
    let mut fleet = Vec::new();
    for h in &names {
        let mut state = State {
            host: h.clone(),
            ..State::default()
        };
        state.services.insert(
            "web".into(),
            ServiceState {
                unit: "web.service".into(),
                current: Some(generation(&v1)),
                health: Health::Healthy,
                ..ServiceState::default()
            },
        );
        fleet.push(SimHost {
            agent: Agent {
                store: Counted::new(Store::open(url).await.unwrap()),
                host: (),
                config: config(h, url),
            },
            state,
            etag: None,
            polls: Vec::new(),
            gave_up: 0,
        });
    }
    // Every host polls v1 once: the fleet is idle at v1.
    round(&mut fleet, seed).await;
    if let Some(policy) = &policy {
        let rollout = serde_json::json!({"policy": policy});
        repo.update(|m| deploy_manifest::edit::set_rollout(m, &rollout))
            .await
            .unwrap();
        round(&mut fleet, seed).await;
    }
    for h in &mut fleet {
        h.polls.clear();
    }
    let v2 = Artifact::StorePath("/nix/store/bbbb-web-v2".into());
    repo.update(|m| deploy_manifest::edit::set_artifact(m, "web", "/nix/store/bbbb-web-v2"))
        .await
        .unwrap();
    let mut rounds = 0;
    while !fleet.iter().all(|h| h.runs(&v2)) {
        round(&mut fleet, seed).await;
        rounds += 1;
        assert!(rounds < 100, "the rollout does not end");
    }
    // Until every host knows the rollout is done, then one idle round.
    let mut settle = 0;
    while fleet.iter().any(|h| h.etag.is_none()) {
        round(&mut fleet, seed).await;
        settle += 1;
        assert!(settle < 10, "hosts keep polling in full after the rollout");
    }
    let during: Vec<u64> = fleet.iter().flat_map(|h| h.polls.clone()).collect();
    let per_poll = during.iter().sum::<u64>() as f64 / during.len() as f64;
    for h in &mut fleet {
        h.polls.clear();
    }
    round(&mut fleet, seed).await;
    let after: Vec<u64> = fleet.iter().flat_map(|h| h.polls.clone()).collect();
    let idle = after.iter().sum::<u64>() as f64 / after.len() as f64;
    let total: u64 = during.iter().sum();
    let v2 = repo.current().await.unwrap().manifest;
    let key = deploy_manifest::rollout::record_key("web", &spec_hash(&v2.services[0]));
    let record_bytes = match repo.store().get(&key, None).await.unwrap() {
        Fetched::Found { bytes, .. } => bytes.len(),
        _ => 0,
    };
    Figures {
        rounds,
        per_poll,
        idle,
        total,
        gave_up: fleet.iter().map(|h| h.gave_up).sum(),
        record_bytes,
    }
}

/// Every host polls once, in a shuffled order, `CONCURRENCY` at a time.
async fn round(fleet: &mut [SimHost], seed: &mut u64) {
    let mut order: Vec<usize> = (0..fleet.len()).collect();
    for i in (1..order.len()).rev() {
        // xorshift: a fixed seed, the same order on every run of the bench.
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        order.swap(i, (*seed % (i as u64 + 1)) as usize);
    }
    let mut slots: BTreeMap<usize, &mut SimHost> = fleet.iter_mut().enumerate().collect();
    let hosts: Vec<&mut SimHost> = order.iter().map(|i| slots.remove(i).unwrap()).collect();
    stream::iter(hosts)
        .for_each_concurrent(CONCURRENCY, |h| async move { h.poll().await })
        .await;
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (base, hosts) = match &args[..] {
        [_, url, hosts] => (url.clone(), hosts.parse::<usize>().expect("HOSTS")),
        _ => {
            eprintln!("usage: rollout_fleet STORE_URL HOSTS");
            std::process::exit(2);
        }
    };
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let waves = serde_json::json!({"waves": [{"percent": 1}, {"percent": 10}, {"percent": 50}, {"percent": 100}]});
    let started = std::time::Instant::now();
    let r = rollout(&format!("{base}/staged"), hosts, Some(waves), &mut seed).await;
    let r_secs = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let p = rollout(&format!("{base}/plain"), hosts, None, &mut seed).await;
    let p_secs = started.elapsed().as_secs_f64();
    println!("fleet of {hosts} hosts, one service, polls in rounds ({CONCURRENCY} hosts at once)");
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "", "4 waves", "no policy", "ratio"
    );
    let row = |what: &str, a: f64, b: f64| {
        println!("{what:<44} {a:>12.2} {b:>12.2} {:>8.2}", a / b);
    };
    row(
        "polls from push to the last host",
        r.rounds as f64,
        p.rounds as f64,
    );
    row(
        "store requests per host per poll, during",
        r.per_poll,
        p.per_poll,
    );
    row("store requests per host per poll, after", r.idle, p.idle);
    row(
        "store requests, all hosts, push to idle",
        r.total as f64,
        p.total as f64,
    );
    row("wall seconds of the simulation", r_secs, p_secs);
    println!(
        "record writes that gave up (retried at the next poll): {}; the record at the end: {} bytes",
        r.gave_up, r.record_bytes
    );
}
