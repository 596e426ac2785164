//! Is the new generation healthy? The unit must be active and not restarting, and every
//! declared probe (http, tcp, exec) must pass, before the deadline. Without probes the unit
//! must stay active for a settle period.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use deploy_manifest::model::{Health, Service};

use crate::systemd::ServiceManager;

/// The probes of one service, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probes {
    pub http: Option<(u16, String, u16)>,
    pub tcp: Option<u16>,
    pub exec: Option<(Vec<String>, PathBuf)>,
    pub timeout: Duration,
    pub interval: Duration,
}

fn duration(s: Option<&str>, default: Duration) -> Duration {
    s.and_then(|s| humantime::parse_duration(s).ok())
        .unwrap_or(default)
}

impl Probes {
    /// The probes of `service` running from `artifact`; with `port`, the generation listens
    /// there instead of `http.internalPort` (zero-downtime generations).
    pub fn of(service: &Service, artifact: &std::path::Path, port: Option<u16>) -> Probes {
        let h = service.health.clone().unwrap_or(Health {
            http: None,
            tcp: None,
            exec: None,
            timeout: None,
            interval: None,
        });
        let internal = service.http.as_ref().map(|h| h.internal_port);
        let default_port = port.or(internal);
        // A probe aimed at the internal port follows the generation to its own port.
        let moved = |p: u16| match port {
            Some(new) if Some(p) == internal => new,
            _ => p,
        };
        Probes {
            http: h.http.as_ref().and_then(|p| {
                let port = p.port.map(moved).or(default_port)?;
                Some((port, p.path.clone(), p.status.unwrap_or(200)))
            }),
            tcp: h.tcp.as_ref().map(|t| moved(t.port)),
            exec: h.exec.as_ref().map(|e| {
                let mut argv = e.command.clone();
                if let Some(first) = argv.first_mut()
                    && !first.starts_with('/')
                    && first.contains('/')
                {
                    *first = artifact.join(&*first).display().to_string();
                }
                (argv, artifact.to_path_buf())
            }),
            timeout: duration(h.timeout.as_deref(), Duration::from_secs(30)),
            interval: duration(h.interval.as_deref(), Duration::from_millis(500)),
        }
    }

    /// The probes of a health block on its own (an infrastructure service's healthCheck);
    /// `port` fills an http probe without one.
    pub fn from_health(
        h: &Health,
        port: Option<u16>,
        dir: &std::path::Path,
        timeout: Duration,
    ) -> Probes {
        Probes {
            http: h
                .http
                .as_ref()
                .and_then(|p| Some((p.port.or(port)?, p.path.clone(), p.status.unwrap_or(200)))),
            tcp: h.tcp.as_ref().map(|t| t.port),
            exec: h
                .exec
                .as_ref()
                .map(|e| (e.command.clone(), dir.to_path_buf())),
            timeout: duration(h.timeout.as_deref(), timeout),
            interval: duration(h.interval.as_deref(), Duration::from_millis(200)),
        }
    }

    fn any(&self) -> bool {
        self.http.is_some() || self.tcp.is_some() || self.exec.is_some()
    }

    /// Run every probe once; the first failure, described.
    async fn check(&self, client: &reqwest::Client) -> Result<(), String> {
        if let Some((port, path, want)) = &self.http {
            let url = format!("http://127.0.0.1:{port}{path}");
            let got = client
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?
                .status()
                .as_u16();
            if got != *want {
                return Err(format!("GET {url} answered {got}, expected {want}"));
            }
        }
        if let Some(port) = self.tcp {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("tcp 127.0.0.1:{port}: {e}"))?;
        }
        if let Some((argv, dir)) = &self.exec {
            let status = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .current_dir(dir)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .await
                .map_err(|e| format!("{}: {e}", argv[0]))?;
            if !status.success() {
                return Err(format!("{} exited with {status}", argv.join(" ")));
            }
        }
        Ok(())
    }
}

/// Wait until `unit` is healthy or say why it is not.
pub async fn wait_healthy(
    mgr: &impl ServiceManager,
    unit: &str,
    probes: &Probes,
    settle: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    let deadline = start + probes.timeout.max(settle);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let baseline = mgr
        .status(unit)
        .await
        .map_err(|e| e.to_string())?
        .n_restarts;
    let mut last;
    loop {
        let status = mgr.status(unit).await.map_err(|e| e.to_string())?;
        if status.active_state == "failed" || status.n_restarts > baseline {
            return Err(format!(
                "{unit} is {} ({}) after {} restart(s)",
                status.active_state,
                status.sub_state,
                status.n_restarts - baseline.min(status.n_restarts)
            ));
        }
        if status.is_active() {
            if probes.any() {
                match probes.check(&client).await {
                    Ok(()) => {
                        tracing::info!(elapsed = ?start.elapsed(), "healthy");
                        return Ok(());
                    }
                    Err(e) => last = e,
                }
            } else if start.elapsed() >= settle {
                tracing::info!(elapsed = ?start.elapsed(), "healthy: active for the settle period");
                return Ok(());
            } else {
                last = format!("{unit} has not been active for {} s yet", settle.as_secs());
            }
        } else {
            last = format!("{unit} is {} ({})", status.active_state, status.sub_state);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not healthy within {} s: {last}",
                probes.timeout.as_secs()
            ));
        }
        tokio::time::sleep(probes.interval).await;
    }
}
