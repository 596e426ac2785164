//! The real host: systemd over D-Bus ([`crate::systemd`]), unit files in the unit
//! directory, the state and secrets directories, loopback ports, Caddy or nginx.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use deploy_manifest::model::{Artifact, InfraService, Manifest, Service};
use deploy_manifest::store::ObjectStore;

use super::Host;
use crate::AgentError;
use crate::config::{AgentConfig, current_uid};
use crate::evidence::LogMark;
use crate::health::Probes;
use crate::proxy::{Proxy, ProxyError, Route};
use crate::state::{State, UnitStamps, UnitTexts};
use crate::systemd::ServiceManager;
use crate::unit::{EnvFile, check_unit_name};
use crate::{fetch, infra, secrets};

pub struct SystemHost<M> {
    pub manager: M,
    pub proxy: Proxy,
    pub config: AgentConfig,
    /// Times `state.json` was written.
    writes: std::sync::atomic::AtomicU64,
    texts: UnitTexts,
    stamps: std::sync::Mutex<UnitStamps>,
}

impl<M> SystemHost<M> {
    pub fn new(manager: M, config: &AgentConfig) -> SystemHost<M> {
        SystemHost {
            manager,
            proxy: Proxy::new(config.proxy.clone()),
            config: config.clone(),
            writes: Default::default(),
            texts: UnitTexts::new(&config.state_dir),
            stamps: std::sync::Mutex::new(UnitStamps::new(&config.state_dir)),
        }
    }

    /// Whom secret files must belong to: root, or with --user the agent's own user.
    fn owner_uid(&self) -> u32 {
        if self.config.user { current_uid() } else { 0 }
    }
}

impl<M> SystemHost<M> {
    /// A unit's log file under a user manager (`<state>/logs/<unit>.log`).
    fn log_path(&self, unit: &str) -> PathBuf {
        crate::names::log_file(&self.config.state_dir.join("logs"), unit)
    }
}

/// The newest lines of `path` past `offset` (from the start if the file is now shorter:
/// it was replaced), reading at most the last 64 KiB.
fn tail_file(path: &Path, offset: u64) -> Result<Vec<String>, String> {
    use std::io::{Read, Seek, SeekFrom};
    // Not following a symlink, not waiting on a FIFO: only the unit's own regular file.
    let (mut file, meta) = match secrets::open_regular(path) {
        Ok(opened) => opened,
        Err(secrets::Refusal::Missing) => return Ok(Vec::new()),
        Err(secrets::Refusal::NotRegular) => {
            return Err(format!("{} is not a regular file", path.display()));
        }
        Err(e) => return Err(format!("{}: {}", path.display(), e.explain(path, 0))),
    };
    let len = meta.len();
    let from = if offset > len { 0 } else { offset };
    let from = from.max(len.saturating_sub(64 * 1024));
    file.seek(SeekFrom::Start(from))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(len - from)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(crate::evidence::lines_of(&bytes))
}

/// `journalctl -u UNIT --since @T -n 50 -o cat`, bounded in time (the journal is asked to
/// flush first, so the lines a crashing process wrote last are in).
async fn journal_tail(unit: &str, since: std::time::SystemTime) -> Result<Vec<String>, String> {
    let since = since
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let limit = Duration::from_secs(10);
    let mut sync = tokio::process::Command::new("journalctl");
    sync.arg("--sync")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let _ = tokio::time::timeout(limit, sync.status()).await;
    let mut read = tokio::process::Command::new("journalctl");
    read.arg(format!("--unit={unit}"))
        .arg(format!(
            "--since=@{}.{:06}",
            since.as_secs(),
            since.subsec_micros()
        ))
        .arg(format!("--lines={}", crate::evidence::LOG_LINES))
        .args(["--output=cat", "--no-pager", "--quiet"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(limit, read.output()).await {
        Err(_) => return Err(format!("journalctl did not answer within {limit:?}")),
        Ok(Err(e)) => return Err(format!("running journalctl: {e}")),
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        return Err(format!(
            "journalctl {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(crate::evidence::lines_of(&out.stdout))
}

impl<M: ServiceManager> Host for SystemHost<M> {
    type Manager = M;

    fn manager(&self) -> &M {
        &self.manager
    }

    fn unit_path(&self, unit: &str) -> PathBuf {
        self.config.unit_dir.join(unit)
    }

    fn read_unit(&self, unit: &str) -> Option<String> {
        std::fs::read_to_string(self.unit_path(unit)).ok()
    }

    fn unit_matches(&self, unit: &str, hash: &str) -> bool {
        let path = self.unit_path(unit);
        let mut stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        stamps.matches(unit, &path, hash)
    }

    fn write_unit(&self, unit: &str, text: &str) -> Result<(), AgentError> {
        check_unit_name(unit)?;
        let dir = &self.config.unit_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
        if self.config.user {
            // Units of a user manager log to files there (there is no journal for them).
            let logs = self.config.state_dir.join("logs");
            std::fs::create_dir_all(&logs)
                .map_err(|e| AgentError::io(format!("creating {}", logs.display()), e))?;
        }
        let path = self.unit_path(unit);
        not_foreign(&path)?;
        deploy_manifest::fsutil::write_atomically(&path, text.as_bytes(), 0o644)
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
    }

    fn remove_unit(&self, unit: &str) -> Result<(), AgentError> {
        check_unit_name(unit)?;
        let path = self.unit_path(unit);
        not_foreign(&path)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(AgentError::io(format!("removing {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    fn our_unit_files(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.config.unit_dir) else {
            return Vec::new();
        };
        let mut found: Vec<String> = dir
            .flatten()
            .filter(|entry| {
                std::fs::read_to_string(entry.path())
                    .is_ok_and(|t| t.starts_with(crate::unit::HEADER))
            })
            .filter_map(|entry| entry.file_name().into_string().ok())
            .collect();
        found.sort();
        found
    }

    fn record_unit_text(&self, text: &str) -> Result<String, AgentError> {
        self.texts.record(text)
    }

    fn recorded_unit_text(&self, hash: &str) -> Result<String, AgentError> {
        self.texts.read(hash)
    }

    fn prune_unit_texts(&self, state: &State) {
        self.texts.prune(state)
    }

    fn save_state(&self, state: &State) -> Result<(), AgentError> {
        self.texts.sync()?;
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        state.save(&self.config.state_dir)?;
        self.stamps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
        Ok(())
    }

    fn state_writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn port_free(&self, port: u16) -> bool {
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    }

    async fn fetch<S: ObjectStore>(
        &self,
        store: &S,
        artifact: &Artifact,
    ) -> Result<PathBuf, AgentError> {
        fetch::ensure(
            store,
            artifact,
            &self.config.state_dir,
            &self.config.nix_trusted_keys,
            self.config.unpack_limits,
        )
        .await
    }

    fn env_file(&self, service: &str, declared: Option<&str>) -> Result<EnvFile, AgentError> {
        secrets::env_file(
            service,
            declared,
            &self.config.secrets_dir,
            self.owner_uid(),
        )
    }

    fn env_warning(&self, files: &[EnvFile]) -> Option<String> {
        let owner = self.owner_uid();
        files.iter().find_map(|f| secrets::recheck(f, owner).err())
    }

    fn check_exec(&self, service: &Service) -> Result<(), String> {
        let Some(exec) = &service.exec else {
            return Ok(());
        };
        if self.config.user {
            // A user manager runs everything as its user, without a sandbox.
            return Ok(());
        }
        let dirs = [
            &self.config.state_dir,
            &self.config.secrets_dir,
            &self.config.unit_dir,
        ];
        let protected: Vec<&str> = dirs.iter().filter_map(|d| d.to_str()).collect();
        crate::accounts::check_exec(
            exec,
            &protected,
            |u| crate::accounts::user(u).is_some(),
            crate::accounts::group_exists,
            crate::accounts::plain_dir,
        )
    }

    fn prepare_infra(&self, name: &str, spec: &InfraService) -> Result<(), AgentError> {
        infra::prepare(
            name,
            spec,
            &self.config.state_dir,
            &self.config.secrets_dir,
            self.owner_uid(),
            !self.config.user,
        )
    }

    fn app_env(
        &self,
        service: &Service,
        manifest: &Manifest,
        infra: &BTreeMap<String, infra::HostSpec>,
        indexes: &mut BTreeMap<String, u32>,
    ) -> Result<Option<PathBuf>, AgentError> {
        let layer = infra::AppLayer {
            secrets_dir: &self.config.secrets_dir,
            state_dir: &self.config.state_dir,
            owner_uid: self.owner_uid(),
        };
        layer.app_env(service, manifest, infra, indexes)
    }

    fn has_database(&self, service: &str) -> bool {
        infra::password_paths(&self.config.secrets_dir, service)
            .iter()
            .any(|p| p.exists())
    }

    async fn wait_healthy(
        &self,
        unit: &str,
        probes: &Probes,
        settle: Duration,
    ) -> Result<(), String> {
        crate::health::wait_healthy(&self.manager, unit, probes, settle).await
    }

    fn log_mark(&self, unit: &str) -> LogMark {
        let offset = if self.config.user {
            std::fs::metadata(self.log_path(unit)).map_or(0, |m| m.len())
        } else {
            0
        };
        LogMark {
            at: std::time::SystemTime::now(),
            offset,
        }
    }

    async fn unit_log(&self, unit: &str, mark: &LogMark) -> Result<Vec<String>, String> {
        if self.config.user {
            return tail_file(&self.log_path(unit), mark.offset);
        }
        journal_tail(unit, mark.at).await
    }

    fn secret_values(&self, service: &str, files: &[EnvFile]) -> Result<Vec<String>, String> {
        let owner = self.owner_uid();
        let read = |path: &Path| match secrets::read_checked(path, owner) {
            Ok(text) => Ok(Some(text)),
            Err(secrets::Refusal::Missing) => Ok(None),
            Err(r) => Err(format!(
                "{} could not be read to mask its values: {}",
                path.display(),
                r.explain(path, owner)
            )),
        };
        let mut values = Vec::new();
        for f in files {
            if let Some(text) = read(&f.path)? {
                values.extend(crate::evidence::secret_values(&text));
            }
        }
        // The files `${secret:NAME}` reads (and an envFile kept there), and the database
        // password: each value may be printed on its own.
        let dir = self.config.secrets_dir.join(service);
        let mut own: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        // Its database password, and its own Redis's.
        own.extend(infra::password_paths(&self.config.secrets_dir, service));
        own.push(infra::redis_password_path(
            &self.config.secrets_dir,
            &infra::dedicated_name(service, deploy_manifest::model::Preset::Redis),
        ));
        for path in own {
            if let Some(text) = read(&path)? {
                values.extend(crate::evidence::secret_values(&text));
                values.push(text.trim().to_owned());
                values.extend(text.lines().map(|l| l.trim().to_owned()));
            }
        }
        values.retain(|v| !v.is_empty());
        Ok(values)
    }

    fn has_proxy(&self) -> bool {
        !self.proxy.is_none()
    }

    async fn apply_routes(&self, routes: &[Route]) -> Result<(), ProxyError> {
        self.proxy.apply(routes).await
    }
}

/// A file in the unit directory that is not ours (no header) is never overwritten or
/// removed: the unit directory is shared with the host's own runtime units.
fn not_foreign(path: &Path) -> Result<(), AgentError> {
    use std::io::Read;
    let header = crate::unit::HEADER.as_bytes();
    let mut head = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|f| f.take(header.len() as u64).read_to_end(&mut head));
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(_) if head == header => Ok(()),
        _ => Err(AgentError::ForeignUnit(format!(
            "{} is not the deployer's (it does not start with {:?}): left alone; rename the service in the manifest, or remove that file",
            path.display(),
            crate::unit::HEADER.trim_end()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unlucky operator's (or a service's) FIFO or symlink where a unit's log file
    /// should be: refused at once, never waited on or followed.
    #[test]
    fn a_log_tail_reads_only_the_units_own_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hello.log");
        std::fs::write(&log, "old run\nnew 1\nnew 2\n").unwrap();
        assert_eq!(tail_file(&log, 8).unwrap(), ["new 1", "new 2"]);
        assert_eq!(
            tail_file(&log, 1 << 20).unwrap().len(),
            3,
            "shorter than the mark: replaced, read from the start"
        );
        assert!(
            tail_file(&dir.path().join("missing.log"), 0)
                .unwrap()
                .is_empty()
        );

        let fifo = dir.path().join("fifo.log");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = tail_file(&fifo, 0).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");

        let secret = dir.path().join("host.key");
        std::fs::write(&secret, "key material\n").unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let err = tail_file(&link, 0).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
