//! Seeing what happened without ssh (issue #17), on a real systemd user manager, a real S3
//! server (moto) and a real HTTP receiver on loopback: a failed deploy's log in the
//! status (its secret masked, and nowhere in the store, the state, the metrics or any
//! notification), the history, the metrics, notifications that never hold a deploy back,
//! hosts that never reported, `status --watch` and `push --wait`'s per-host progress.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use deployer_tests::{OutputExt, bin, eventually, free_port, run_in};
use serde_json::Value;

use crate::agent::{App, Host, declare_hello};
use crate::fixture::Fixture;

/// A webhook receiver on loopback: records each POST's body; answers 204. With `hold`, the
/// first request is held unanswered until the test says so.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<String>>>,
    /// Sends when a held request has arrived.
    arrived: mpsc::Receiver<()>,
    release: mpsc::Sender<()>,
}

impl Receiver {
    fn start(hold: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (arrived_tx, arrived) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let kept = bodies.clone();
        std::thread::spawn(move || {
            let mut first = hold;
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let Some(body) = read_request(&mut conn) else {
                    continue;
                };
                if first {
                    first = false;
                    let _ = arrived_tx.send(());
                    let _ = release_rx.recv();
                }
                kept.lock().unwrap().push(body);
                let _ = conn.write_all(
                    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Receiver {
            url,
            bodies,
            arrived,
            release,
        }
    }

    fn events(&self) -> Vec<Value> {
        let bodies = self.bodies.lock().unwrap();
        bodies
            .iter()
            .map(|b| serde_json::from_str(b).unwrap_or_else(|e| panic!("{e}: {b}")))
            .collect()
    }

    fn texts(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

/// One HTTP request's body (headers, then Content-Length bytes).
fn read_request(conn: &mut std::net::TcpStream) -> Option<String> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return Some(body.to_owned());
            }
        }
    }
}

/// Every object in the store, as text.
pub(crate) async fn store_texts(fx: &Fixture) -> Vec<(String, String)> {
    use deploy_manifest::store::{Fetched, ObjectStore};
    let store = fx.store().await;
    let mut all = Vec::new();
    for key in store.list("").await.unwrap() {
        if let Fetched::Found { bytes, .. } = store.get(&key, None).await.unwrap() {
            all.push((key, String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    all
}

/// The hello app as a version that prints its secret (env var `var`), then fails (a
/// broken release that logs what it should not).
pub(crate) fn leaky_crash(app: &App, version: &str, var: &str) {
    let bin = app.path().join("app/bin/hello");
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\necho \"starting with token ${var}\"\necho 'broken release' >&2\nexit 3\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(app.path().join("app/VERSION"), version).unwrap();
}

fn write_secret(host: &Host, secret: &str) {
    let env_file = host.dir.path().join("secrets/hello.env");
    std::fs::write(&env_file, format!("API_TOKEN={secret}\n")).unwrap();
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A broken release that prints the service's secret: the status shows the log it left
/// with the secret masked; the secret is nowhere in the store, state.json, the metrics
/// file or any notification (command or webhook). The history says who pushed what, when
/// the host applied it, each phase, and the outcome; the metrics carry the version and
/// the phases; an idle poll still costs one request and tells nobody anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_deploy_leaves_its_masked_log_in_the_status_and_the_history() {
    let fx = Fixture::s3();
    let mut host = Host::new();
    let receiver = Receiver::start(false);
    let notified = host.dir.path().join("notified.jsonl");
    let metrics = host.dir.path().join("metrics/deployer.prom");
    host.flags.extend([
        "--notify-url".to_owned(),
        receiver.url.clone(),
        "--notify-command".to_owned(),
        format!("cat >> {0}; echo >> {0}", notified.display()),
        "--metrics-file".to_owned(),
        metrics.display().to_string(),
    ]);
    let secret = format!("tok-{}-SECRET", free_port());
    write_secret(&host, &secret);
    let port = free_port();
    declare_hello(&fx, port);
    // A host the manifest names that never reports.
    fx.dm(&["update-service", "hello", r#"{"hosts": ["biz", "ghost"]}"#])
        .ok();
    let app = App::new();
    app.set_version("v1", false);
    app.push(&fx);
    let v1 = host.run_report(&fx);
    assert_eq!(v1["services"]["hello"]["outcome"], "deployed", "{v1:#}");
    let v1_version = v1["manifestVersion"].as_str().unwrap().to_owned();

    leaky_crash(&app, "v2", "API_TOKEN");
    app.push(&fx);
    let out = host.run_once(&fx);
    out.fails_with(8, "(rolled back)");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    let v2_version = run["manifestVersion"].as_str().unwrap().to_owned();

    // `deploy-manifest status biz --service hello`: the log, masked.
    let status = fx.dm(&["status", "biz", "--service", "hello"]).ok();
    let text = status.stdout_str();
    assert!(text.contains("host biz: failing"), "{text}");
    assert!(text.contains("| starting with token ***"), "{text}");
    assert!(text.contains("| broken release"), "{text}");
    assert!(text.contains("last deploy       fetch "), "{text}");
    assert!(text.contains("health "), "{text}");
    let json: Value = serde_json::from_slice(
        &fx.dm(&["--json", "status", "biz", "--service", "hello"])
            .ok()
            .stdout,
    )
    .unwrap();
    let log = json["services"][0]["log"].as_array().unwrap();
    assert!(
        log.len() <= 50 && log.iter().any(|l| l == "broken release"),
        "{json:#}"
    );
    assert!(
        json["services"][0]["phases"]["health"].as_f64().is_some(),
        "{json:#}"
    );

    // The fleet view names the host that never reported.
    let fleet = fx.dm(&["status"]).ok().stdout_str();
    let ghost = fleet
        .lines()
        .find(|l| l.starts_with("ghost "))
        .unwrap_or_else(|| panic!("{fleet}"));
    assert!(ghost.contains(" never "), "{fleet}");
    fx.dm(&["status", "nobody"])
        .fails_with(4, "no host \"nobody\"");

    // The history: newest first, who pushed which version, the phases, the outcome.
    let history: Value =
        serde_json::from_slice(&fx.dm(&["--json", "history", "--host", "biz"]).ok().stdout)
            .unwrap();
    let events = history.as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["rolledBack", "deployed"], "{history:#}");
    let (failed, deployed) = (&events[0], &events[1]);
    assert_eq!(failed["version"], v2_version.as_str());
    assert_eq!(deployed["version"], v1_version.as_str());
    assert!(
        failed["pushedBy"].as_str().is_some_and(|b| b.contains('@')),
        "{failed:#}"
    );
    assert_eq!(failed["previous"], deployed["artifact"]);
    assert!(
        failed["log"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "starting with token ***")
    );
    for phase in ["fetch", "restart", "health"] {
        assert!(deployed["phases"][phase].as_f64().is_some(), "{deployed:#}");
    }
    let table = fx.dm(&["history", "--logs"]).ok().stdout_str();
    assert!(table.starts_with("APPLIED "), "{table}");
    assert!(
        table.contains("rolledBack") && table.contains("deployed"),
        "{table}"
    );
    assert!(table.contains("    | starting with token ***"), "{table}");
    let one: Value = serde_json::from_slice(
        &fx.dm(&["--json", "history", "--service", "hello", "--limit", "1"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(one.as_array().unwrap().len(), 1);

    // Notifications: both events, to the command and to the webhook, before `run --once`
    // returned.
    let hooked: Vec<String> = receiver
        .events()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hooked, ["deployed", "rolledBack"]);
    let commanded = std::fs::read_to_string(&notified).unwrap();
    let commanded: Vec<Value> = commanded
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(commanded.len(), 2);
    assert_eq!(commanded[1]["kind"], "rolledBack");
    assert_eq!(commanded[1]["host"], "biz");

    // Metrics: the version it runs, the phases, the last successful poll.
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains(&format!(
            "deployer_service_info{{service=\"hello\",version=\"{v1_version}\""
        )),
        "{prom}"
    );
    assert!(
        prom.contains("deployer_deploy_phase_seconds_count{phase=\"health\"} 2"),
        "{prom}"
    );
    assert!(
        prom.contains("deployer_deploy_phase_seconds_bucket{phase=\"fetch\",le=\"+Inf\"} 2"),
        "{prom}"
    );
    assert!(
        prom.contains("deployer_last_deploy_phase_seconds{service=\"hello\",phase=\"health\"}"),
        "{prom}"
    );
    assert!(
        prom.contains("deployer_last_successful_poll_timestamp_seconds "),
        "{prom}"
    );

    // The secret is nowhere but the host's secrets file and the service's own output.
    let mut texts: Vec<String> = store_texts(&fx).await.into_iter().map(|(_, t)| t).collect();
    assert!(
        texts.len() > 5,
        "the store holds the manifest, versions, report, history"
    );
    texts.push(std::fs::read_to_string(host.state_dir().join("state.json")).unwrap());
    texts.push(prom);
    texts.push(std::fs::read_to_string(&notified).unwrap());
    texts.extend(receiver.texts());
    texts.push(out.stdout_str());
    texts.push(out.stderr_str());
    texts.push(text);
    texts.push(table);
    let log_file = host.state_dir().join("logs/hello.log");
    assert!(
        std::fs::read_to_string(&log_file)
            .unwrap()
            .contains(&secret),
        "the service did print it: the masking is what kept it in"
    );
    deployer_tests::assert_not_leaked(&secret, &texts);

    // Idle polls: nothing told, no history written; one request each (the first may
    // still rewrite the report: the host's last error cleared).
    let records = store_texts(&fx).await.len();
    host.run_report(&fx);
    let idle = host.run_report(&fx);
    assert_eq!(idle["storeRequests"], 1, "{idle:#}");
    assert_eq!(idle["events"], Value::Array(vec![]), "{idle:#}");
    assert_eq!(store_texts(&fx).await.len(), records);
    assert_eq!(receiver.events().len(), 2);
}

/// A webhook that does not answer never holds a deploy back: while the receiver holds the
/// first notification, the deploy is done, reported and in the history; the one-shot run
/// exits once the receiver answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_webhook_does_not_hold_the_deploy() {
    let fx = Fixture::file();
    let mut host = Host::new();
    let receiver = Receiver::start(true);
    host.flags
        .extend(["--notify-url".to_owned(), receiver.url.clone()]);
    let port = free_port();
    declare_hello(&fx, port);
    let app = App::new();
    app.set_version("v1", false);
    app.push(&fx);
    let mut agent = Command::new(bin("deployer-agent"))
        .args(host.args(&["run", "--once"]))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .envs(host.env(&fx))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    receiver
        .arrived
        .recv_timeout(Duration::from_secs(120))
        .expect("the notification arrived");
    // Held: the deploy is already done and published.
    assert_eq!(crate::agent::body(port).as_deref(), Some("hello from v1\n"));
    let status: Value =
        serde_json::from_slice(&fx.dm(&["--json", "status", "biz"]).ok().stdout).unwrap();
    assert_eq!(status["services"][0]["health"], "healthy", "{status:#}");
    let history = fx.dm(&["history"]).ok().stdout_str();
    assert!(history.contains("deployed"), "{history}");
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the run waits for its notification"
    );
    receiver.release.send(()).unwrap();
    let exited = eventually(60, || agent.try_wait().unwrap());
    assert_eq!(exited.map(|s| s.code()), Some(Some(0)));
    assert_eq!(receiver.events()[0]["kind"], "deployed");
}

/// `status --watch` (not on a terminal: a table per change) keeps going while a host is
/// still converging and exits once every host is settled; `push --wait` says what each
/// host is doing as it changes.
#[test]
fn status_watch_ends_when_the_fleet_settles_and_push_wait_shows_each_host() {
    let fx = Fixture::file();
    let host = Host::new();
    let port = free_port();
    declare_hello(&fx, port);
    let app = App::new();
    app.set_version("v1", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    app.set_version("v2", false);
    app.push(&fx);

    let out_file = host.dir.path().join("watch.out");
    let mut watch = Command::new(bin("deploy-manifest"))
        .args(["status", "--watch"])
        .env_clear()
        .envs(fx.env.clone())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = eventually(30, || {
        std::fs::read_to_string(&out_file)
            .ok()
            .filter(|t| t.contains("behind"))
    });
    assert!(first.is_some(), "the first table shows the host behind");
    assert!(watch.try_wait().unwrap().is_none(), "still watching");
    host.run_once(&fx).ok();
    let exited = eventually(60, || watch.try_wait().unwrap());
    assert_eq!(exited.map(|s| s.code()), Some(Some(0)));
    let text = std::fs::read_to_string(&out_file).unwrap();
    let behind = text.find("behind").unwrap();
    let ok = text.rfind(" ok ").unwrap_or_else(|| panic!("{text}"));
    assert!(behind < ok, "behind, then ok: {text}");

    // push --wait: a line per host as what it does changes.
    app.set_version("v3", false);
    let mut agent = crate::agent::spawn_agent(&host, &fx, &["run", "--interval", "1s"]);
    let out = run_in(
        app.path(),
        "push.sh",
        &["Examples/Hello.py", "--wait", "--timeout", "120s"],
        &fx.env,
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let err = out.stderr_str();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("push: hello: biz: healthy (deployed in "),
        "{err}"
    );
}

/// From a bucket writer's seat: a signed history record copied under a later time, and an
/// unsigned one claiming a rollback. Readers given the host keys see neither, and the
/// agent's next eventful run prunes by real time: the copies go, the real records stay.
#[tokio::test(flavor = "multi_thread")]
async fn forged_history_neither_shows_nor_pushes_real_records_out() {
    use deploy_manifest::store::{Fetched, ObjectStore, Precondition};
    let fx = Fixture::file();
    let mut host = Host::new();
    host.flags
        .extend(["--history-keep".to_owned(), "2".to_owned()]);
    let port = free_port();
    declare_hello(&fx, port);
    let app = App::new();
    for v in ["v1", "v2"] {
        app.set_version(v, false);
        app.push(&fx);
        host.run_once(&fx).ok();
    }
    let keys_file = host.dir.path().join("host-keys");
    let key = host.agent(&fx, &["host-key"]).ok().stdout_str();
    std::fs::write(&keys_file, key).unwrap();
    let keys = keys_file.to_str().unwrap();
    let verified = |fx: &Fixture| -> Vec<String> {
        let out = fx.dm(&["--json", "history", "--host-keys", keys]).ok();
        let events: Value = serde_json::from_slice(&out.stdout).unwrap();
        events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["kind"].as_str().unwrap(),
                    e["artifact"].as_str().unwrap()
                )
            })
            .collect()
    };
    let honest = verified(&fx);
    assert_eq!(honest.len(), 2, "{honest:?}");

    // The attacker's copies.
    let store = fx.store().await;
    let mut records = store.list("history/biz/").await.unwrap();
    records.sort();
    let newest = records.last().unwrap().clone();
    let Fetched::Found { bytes, .. } = store.get(&newest, None).await.unwrap() else {
        panic!("{newest}");
    };
    let mut forged: Value = serde_json::from_slice(&bytes).unwrap();
    for (i, key) in [
        "99991231T000000.000Z-00000000",
        "99991231T000000.000Z-11111111",
    ]
    .iter()
    .enumerate()
    {
        if i == 1 {
            forged["events"][0]["kind"] = "rolledBack".into();
            forged.as_object_mut().unwrap().remove("signature");
        }
        let body = if i == 0 {
            bytes.clone()
        } else {
            serde_json::to_vec(&forged).unwrap()
        };
        store
            .put(&format!("history/biz/{key}.json"), body, Precondition::None)
            .await
            .unwrap();
    }
    let out = fx.dm(&["history", "--host-keys", keys]).ok();
    assert_eq!(verified(&fx), honest, "the copies do not count");
    assert!(
        out.stderr_str()
            .contains("99991231T000000.000Z-00000000.json: not counted"),
        "{}",
        out.stderr_str()
    );

    // An honest deploy: its run prunes to 2 by real time.
    app.set_version("v3", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    let left = store.list("history/biz/").await.unwrap();
    assert!(!left.iter().any(|k| k.contains("9999")), "{left:?}");
    let now = verified(&fx);
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(
        now[1], honest[0],
        "the newest real record before it is kept"
    );
    assert!(now.iter().all(|e| e.starts_with("deployed ")), "{now:?}");
}
