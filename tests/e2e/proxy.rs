//! Routes through a real Caddy (admin API) and a real nginx (generated config), switched
//! only once the new generation is healthy; a client loop through the proxy during a deploy
//! and a failed deploy counts zero failed requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use deployer_tests::{Caddy, Nginx, OutputExt, eventually, free_port, http_get_host};
use serde_json::{Value, json};

use crate::agent::{App, Host, body};
use crate::fixture::Fixture;

/// hello, routed at hello.test, healthy on /healthz, listening on $PORT when `zero`.
pub(crate) fn declare(fx: &Fixture, port: u16, zero: bool) {
    fx.dm(&["init"]).ok();
    let service = json!({
        "name": "hello", "namespace": "Examples/Hello.py",
        "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["biz"],
        "env": {"PORT": port.to_string()},
        "http": {"domain": "hello.test", "internalPort": port, "zeroDowntime": zero},
        "health": {"http": {"path": "/healthz"}, "timeout": "20s", "interval": "100ms"}
    });
    fx.dm(&["add-service", &service.to_string()]).ok();
}

/// A host routing through `nginx`, draining old generations for `drain`.
pub(crate) fn nginx_host(nginx: &Nginx, drain: &str) -> Host {
    let mut host = Host::new();
    host.flags = vec![
        "--proxy".into(),
        "openresty".into(),
        "--nginx-config".into(),
        nginx.config_file().display().to_string(),
        "--nginx-listen".into(),
        format!("127.0.0.1:{}", nginx.port),
        "--nginx-reload".into(),
        nginx.reload_command(),
        "--drain".into(),
        drain.into(),
        "--port-range".into(),
        port_range(),
    ];
    host
}

/// The agent's flags for routing through `caddy`.
pub(crate) fn caddy_flags(caddy: &Caddy) -> Vec<String> {
    vec![
        "--proxy".into(),
        "caddy".into(),
        "--caddy-admin".into(),
        caddy.admin(),
        "--caddy-listen".into(),
        format!("127.0.0.1:{}", caddy.http_port),
    ]
}

/// [`caddy_flags`], with a 1 s drain and [`port_range`]: zero-downtime generations.
pub(crate) fn caddy_zero_downtime_flags(caddy: &Caddy) -> Vec<String> {
    let mut flags = caddy_flags(caddy);
    flags.extend([
        "--drain".into(),
        "1s".into(),
        "--port-range".into(),
        port_range(),
    ]);
    flags
}

fn caddy_host(caddy: &Caddy) -> Host {
    let mut host = Host::new();
    host.flags = caddy_zero_downtime_flags(caddy);
    host
}

/// Twenty ports for zero-downtime generations, apart from other tests' (the agent skips
/// any that is in use).
fn port_range() -> String {
    let base = deployer_tests::free_ports(20);
    format!("{base}-{}", base + 19)
}

/// A client hitting the proxy as fast as it can until stopped; counts what it saw and says
/// how each failed request failed.
pub(crate) struct Client {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    bodies: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    pub(crate) fn start(port: u16, host: &'static str) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let bodies = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let (s, o, f, b) = (stop.clone(), ok.clone(), failures.clone(), bodies.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most 10 minutes, then it stops by itself.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
            while !s.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let started = std::time::Instant::now();
                match http_get_host(port, host, "/") {
                    Some((200, body)) => {
                        o.fetch_add(1, Ordering::Relaxed);
                        b.lock().unwrap().insert(body);
                    }
                    other => {
                        let how = match other {
                            Some((status, body)) => format!("{status}: {}", body.trim()),
                            None => "no answer (refused, reset or 5 s timeout)".to_owned(),
                        };
                        let after = started.elapsed();
                        f.lock().unwrap().push(format!("{how}, after {after:?}"));
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        Client {
            stop,
            ok,
            failures,
            bodies,
            thread: Some(thread),
        }
    }

    /// Stop, asserting that not one request failed (each failure says how); (successes,
    /// distinct bodies).
    pub(crate) fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let ok = self.ok.load(Ordering::Relaxed);
        let failed = std::mem::take(&mut *self.failures.lock().unwrap());
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {failed:?}",
            failed.len(),
            ok + failed.len() as u64
        );
        (ok, self.bodies.lock().unwrap().iter().cloned().collect())
    }
}

pub(crate) fn via_caddy(caddy: &Caddy) -> Option<String> {
    http_get_host(caddy.http_port, "hello.test", "/")
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
}

#[test]
fn caddy_zero_downtime_deploys_and_rollbacks() {
    let fx = Fixture::file();
    let mut caddy = Caddy::start();
    let host = caddy_host(&caddy);
    let app = App::new();
    let internal = free_port();
    declare(&fx, internal, true);

    app.set_version("v1", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    assert_eq!(via_caddy(&caddy).as_deref(), Some("hello from v1\n"));
    let (status, route) = caddy.api("GET", "/id/deployer-hello", None);
    assert_eq!(status, 200, "{route}");
    let route: Value = serde_json::from_str(&route).unwrap();
    assert_eq!(route["match"], json!([{"host": ["hello.test"]}]));

    // A route the agent does not own.
    let foreign = r#"{"@id": "someone-else", "match": [{"host": ["other.test"]}], "handle": [{"handler": "static_response", "body": "other"}], "terminal": true}"#;
    let (status, _) = caddy.api(
        "POST",
        "/config/apps/http/servers/deployer/routes",
        Some(foreign),
    );
    assert_eq!(status, 200);

    // v2 and a broken v3 while a client hammers the proxy: not one request fails.
    let client = Client::start(caddy.http_port, "hello.test");
    app.set_version("v2", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    app.set_version("v3", true);
    app.push(&fx);
    let out = host.run_once(&fx);
    assert_eq!(out.code(), 8, "{}", out.stderr_str());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (ok, bodies) = client.finish();
    assert!(ok > 50, "the client made {ok} requests");
    assert_eq!(bodies, ["hello from v1\n", "hello from v2\n"]);
    assert_eq!(via_caddy(&caddy).as_deref(), Some("hello from v2\n"));
    let state = host.state();
    let hello = &state["services"]["hello"];
    let port = hello["current"]["route"]["port"].as_u64().unwrap() as u16;
    assert_ne!(
        port, internal,
        "zero-downtime generations run on their own port"
    );
    assert!(
        hello["unit"]
            .as_str()
            .unwrap()
            .ends_with(&format!(".{port}.service"))
    );
    // Only the serving generation runs: v1's unit is gone, v3's was never kept.
    let units = std::fs::read_dir(host.unit_file("hello").parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("hello")
        })
        .count();
    assert_eq!(units, 1);
    assert_eq!(
        caddy.api("GET", "/id/someone-else", None).0,
        200,
        "foreign route untouched"
    );

    // Caddy restarts with an empty config: the next (idle) run puts the route back.
    caddy.restart_empty();
    assert!(via_caddy(&caddy).is_none());
    host.run_once(&fx).ok();
    assert_eq!(via_caddy(&caddy).as_deref(), Some("hello from v2\n"));

    // Removed: the route goes with the service.
    fx.dm(&["remove-service", "hello"]).ok();
    host.run_once(&fx).ok();
    assert_eq!(caddy.api("GET", "/id/deployer-hello", None).0, 404);
}

#[test]
fn caddy_down_does_not_block_deploys_and_heals_later() {
    let fx = Fixture::file();
    let mut caddy = Caddy::start();
    let host = caddy_host(&caddy);
    let app = App::new();
    let internal = free_port();
    declare(&fx, internal, false);
    caddy.stop();

    app.set_version("v1", false);
    app.push(&fx);
    let out = host.run_once(&fx);
    out.fails_with(8, "caddy admin API");
    assert_eq!(
        body(internal).as_deref(),
        Some("hello from v1\n"),
        "deployed anyway"
    );
    assert!(
        host.state()["lastError"]
            .as_str()
            .unwrap()
            .contains("caddy")
    );

    // Caddy is back (same ports, empty): the next run, with nothing new in the manifest,
    // creates the server and the route.
    caddy.restart_empty();
    host.run_once(&fx).ok();
    assert_eq!(via_caddy(&caddy).as_deref(), Some("hello from v1\n"));
    assert!(host.state().get("lastError").is_none());
}

#[test]
fn nginx_config_is_checked_installed_and_reloaded() {
    let fx = Fixture::file();
    let nginx = Nginx::start();
    let host = nginx_host(&nginx, "1s");
    let app = App::new();
    let internal = free_port();
    declare(&fx, internal, true);
    app.set_version("v1", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    let via_nginx = || {
        http_get_host(nginx.port, "hello.test", "/")
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b)
    };
    assert_eq!(
        eventually(10, &via_nginx).as_deref(),
        Some("hello from v1\n")
    );
    let config = std::fs::read_to_string(nginx.config_file()).unwrap();
    assert!(config.contains("server_name hello.test;"), "{config}");

    // Zero-downtime switch through nginx.
    let client = Client::start(nginx.port, "hello.test");
    app.set_version("v2", false);
    app.push(&fx);
    host.run_once(&fx).ok();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (_, bodies) = client.finish();
    assert!(bodies.contains(&"hello from v2\n".to_owned()), "{bodies:?}");

    // A config nginx refuses is never installed: the old one stays and keeps serving.
    let installed = std::fs::read_to_string(nginx.config_file()).unwrap();
    let mut bad = host.flags.clone();
    let i = bad.iter().position(|f| f == "--nginx-listen").unwrap();
    bad[i + 1] = "not-a-host.invalid:0".into();
    let broken = Host { flags: bad, ..host };
    let out = broken.run_once(&fx);
    out.fails_with(8, "nginx -t refused");
    assert_eq!(
        std::fs::read_to_string(nginx.config_file()).unwrap(),
        installed
    );
    assert_eq!(via_nginx().as_deref(), Some("hello from v2\n"));
}
