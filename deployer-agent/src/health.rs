//! Is the new generation healthy? The unit must be active and not restarting, and every
//! declared probe (http, tcp, exec) must pass, before the deadline. Without probes the unit
//! must stay active for a settle period.
//!
//! No probe outlives the deadline: http and tcp probes are cut at the time left, and an exec
//! probe runs as a transient unit of its own (never in the agent's process or cgroup) with
//! the service's user, sandbox and environment, which systemd kills at the time left.

use std::path::Path;
use std::time::{Duration, Instant};

use deploy_manifest::model::{Health, Service};

use crate::systemd::{ActiveState, JobResult, ServiceManager};
use crate::unit::{TransientSpec, UnitSpec};

/// The probes of one service, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probes {
    pub http: Option<(u16, String, u16)>,
    pub tcp: Option<u16>,
    pub exec: Option<ExecProbe>,
    pub timeout: Duration,
    pub interval: Duration,
}

/// An exec probe: its command and the unit it runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecProbe {
    /// The unit the probe runs as: the service's own (user, group, sandbox, environment,
    /// working directory = the artifact), or root for infrastructure. Its `exec_start` is
    /// the probe's argv.
    pub unit: UnitSpec,
    /// Whose probe it is (a service name, or `names::infra_owner`): names its transient units
    /// (`names::probe_unit`).
    pub label: String,
}

impl ExecProbe {
    /// An infrastructure service's probe (its healthCheck, Postgres's `pg_isready`): the
    /// operator declared it, so it runs as root without a sandbox, in `dir`, but in its own
    /// transient unit and killed at its timeout like any other.
    pub fn infrastructure(label: &str, argv: Vec<String>, dir: &Path) -> ExecProbe {
        ExecProbe {
            unit: UnitSpec {
                description: format!("deployer probe: infrastructure {label}"),
                exec_start: resolve_program(argv),
                working_directory: Some(dir.to_path_buf()),
                user: None,
                group: None,
                dynamic_user: false,
                environment: Default::default(),
                environment_files: Vec::new(),
                log_file: None,
                sandbox: None,
                limits: Default::default(),
                oneshot: true,
                start_timeout: None,
            },
            label: crate::names::infra_owner(label),
        }
    }

    /// The transient unit for one run of this probe, killed after `timeout`.
    pub fn transient(&self, timeout: Duration) -> TransientSpec {
        TransientSpec {
            name: crate::names::probe_unit(&self.label, &random_hex()),
            unit: self.unit.clone(),
            timeout,
        }
    }

    fn command(&self) -> String {
        self.unit.exec_start.join(" ")
    }
}

/// 16 random hex digits (from the kernel; the clock and a counter if that fails), so two
/// probe units never share a name.
fn random_hex() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes = (nanos ^ (u64::from(std::process::id()) << 32) ^ n).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A bare program name (`curl`) is looked up on the agent's PATH, as it was when probes
/// ran as the agent's children; left as it is when not found (systemd then searches its
/// own default path).
fn resolve_program(mut argv: Vec<String>) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(first) = argv.first_mut()
        && !first.is_empty()
        && !first.contains('/')
        && let Some(found) = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .filter(|dir| dir.is_absolute())
                .map(|dir| dir.join(&*first))
                .find(|p| {
                    p.metadata()
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                })
        })
    {
        *first = found.display().to_string();
    }
    argv
}

fn duration(s: Option<&deploy_manifest::model::Span>, default: Duration) -> Duration {
    s.map_or(default, deploy_manifest::model::Span::get)
}

impl Probes {
    /// The probes of `service` running from `artifact`; with `port`, the generation listens
    /// there instead of `http.internalPort` (zero-downtime generations). `sandbox` is the
    /// service's own unit: an exec probe runs as its user, with its sandbox and environment.
    pub fn of(service: &Service, artifact: &Path, port: Option<u16>, sandbox: &UnitSpec) -> Probes {
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
                ExecProbe {
                    unit: UnitSpec {
                        description: format!("deployer probe: {}", service.name),
                        exec_start: resolve_program(argv),
                        working_directory: Some(artifact.to_path_buf()),
                        oneshot: true,
                        start_timeout: None,
                        ..sandbox.clone()
                    },
                    label: service.name.clone(),
                }
            }),
            timeout: duration(h.timeout.as_ref(), Duration::from_secs(30)),
            interval: duration(h.interval.as_ref(), Duration::from_millis(500)),
        }
    }

    /// The probes of a health block on its own (infrastructure service `label`'s
    /// healthCheck); `port` fills an http probe without one.
    pub fn from_health(
        label: &str,
        h: &Health,
        port: Option<u16>,
        dir: &Path,
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
                .map(|e| ExecProbe::infrastructure(label, e.command.clone(), dir)),
            timeout: duration(h.timeout.as_ref(), timeout),
            interval: duration(h.interval.as_ref(), Duration::from_millis(200)),
        }
    }

    fn any(&self) -> bool {
        self.http.is_some() || self.tcp.is_some() || self.exec.is_some()
    }

    /// Run every probe once, none past `deadline`; the first failure, described.
    async fn check(
        &self,
        mgr: &impl ServiceManager,
        client: &reqwest::Client,
        deadline: Instant,
    ) -> Result<(), String> {
        let left = || deadline.saturating_duration_since(Instant::now());
        if let Some((port, path, want)) = &self.http {
            let url = format!("http://127.0.0.1:{port}{path}");
            let got = client
                .get(&url)
                .timeout(left().min(HTTP_TIMEOUT))
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
            match tokio::time::timeout(left(), tokio::net::TcpStream::connect(("127.0.0.1", port)))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("tcp 127.0.0.1:{port}: {e}")),
                Err(_) => return Err(format!("tcp 127.0.0.1:{port}: no answer in time")),
            }
        }
        if let Some(exec) = &self.exec {
            let timeout = left();
            let command = exec.command();
            if timeout.is_zero() {
                return Err(format!("{command}: no time left to run it"));
            }
            let spec = exec.transient(timeout);
            match mgr.run_transient(&spec).await {
                Ok(JobResult::Done) => {}
                Ok(JobResult::Failed(how)) => return Err(format!("{command} {how}")),
                Ok(JobResult::Timeout) => {
                    return Err(format!(
                        "{command} was still running after {:.1} s (the time left before \
                         the health deadline) and was killed",
                        timeout.as_secs_f64()
                    ));
                }
                Ok(JobResult::Other(result)) => {
                    return Err(format!("{command}: its systemd job ended with {result:?}"));
                }
                Err(e) => return Err(format!("{command}: {e}")),
            }
        }
        Ok(())
    }
}

/// The most an http probe waits for an answer (less when the deadline is nearer).
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Wait until `unit` is healthy or say why it is not.
pub async fn wait_healthy(
    mgr: &impl ServiceManager,
    unit: &str,
    probes: &Probes,
    settle: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    let deadline = start + probes.timeout.max(settle);
    let client = crate::http_client()
        .timeout(HTTP_TIMEOUT)
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
        if status.active_state == ActiveState::Failed || status.n_restarts > baseline {
            return Err(format!(
                "{unit} is {} ({}) after {} restart(s)",
                status.active_state,
                status.sub_state,
                status.n_restarts - baseline.min(status.n_restarts)
            ));
        }
        if status.is_active() {
            if probes.any() {
                match probes.check(mgr, &client, deadline).await {
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
        tokio::time::sleep(
            probes
                .interval
                .min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
}
