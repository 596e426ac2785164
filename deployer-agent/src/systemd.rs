//! The only module that talks to D-Bus: systemd's Manager, over the system bus or (with
//! `--user`) the session bus. No `systemctl` anywhere.

use std::time::Duration;

use futures_util::StreamExt;
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to the {bus} bus: {source}; is systemd running{hint}?")]
    Connect {
        bus: &'static str,
        hint: &'static str,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("systemd {call} {unit}: {source}")]
    Call {
        call: &'static str,
        unit: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("systemd {call} {unit}: the job ended with {result:?}")]
    Job {
        call: &'static str,
        unit: String,
        result: String,
    },
    #[error("systemd {call} {unit}: no answer within {secs} s")]
    Timeout {
        call: &'static str,
        unit: String,
        secs: u64,
    },
}

/// What systemd says about a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitStatus {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub n_restarts: u32,
    pub main_pid: u32,
}

impl UnitStatus {
    pub fn is_active(&self) -> bool {
        self.active_state == "active"
    }
}

/// The service-manager operations the agent needs.
pub trait ServiceManager {
    /// `daemon-reload`: pick up changed unit files.
    fn reload(&self) -> impl Future<Output = Result<(), SystemdError>>;
    /// Restart (or start) a unit and wait for its job to finish.
    fn restart(&self, unit: &str) -> impl Future<Output = Result<(), SystemdError>>;
    /// Stop a unit and wait for its job to finish.
    fn stop(&self, unit: &str) -> impl Future<Output = Result<(), SystemdError>>;
    fn status(&self, unit: &str) -> impl Future<Output = Result<UnitStatus, SystemdError>>;
    /// Calls so far that change something (reload, restart, stop), where counted.
    fn changes(&self) -> u64 {
        0
    }
}

/// A connection to a systemd manager.
pub struct Systemd {
    changes: std::sync::atomic::AtomicU64,
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    job_timeout: Duration,
}

impl Systemd {
    /// The system manager, or with `user` the user manager on the session bus.
    pub async fn connect(user: bool) -> Result<Systemd, SystemdError> {
        let (bus, hint) = if user {
            (
                "session",
                " as a user manager, with DBUS_SESSION_BUS_ADDRESS set",
            )
        } else {
            ("system", "")
        };
        let connect_err = |source| SystemdError::Connect {
            bus,
            hint,
            source: Box::new(source),
        };
        let conn = if user {
            zbus::Connection::session().await
        } else {
            zbus::Connection::system().await
        }
        .map_err(connect_err)?;
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(connect_err)?;
        manager.subscribe().await.map_err(connect_err)?;
        Ok(Systemd {
            changes: Default::default(),
            conn,
            manager,
            job_timeout: Duration::from_secs(120),
        })
    }

    /// Run a job-returning call and wait for its JobRemoved signal (subscribed before the
    /// call, so it cannot be missed).
    async fn job<F, Fut>(
        &self,
        call: &'static str,
        unit: &str,
        start: F,
    ) -> Result<(), SystemdError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        let call_err = |source| SystemdError::Call {
            call,
            unit: unit.to_owned(),
            source: Box::new(source),
        };
        let mut removed = self.manager.receive_job_removed().await.map_err(call_err)?;
        let job = start().await.map_err(call_err)?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Some(args.result.clone());
                }
            }
            None
        };
        match tokio::time::timeout(self.job_timeout, wait).await {
            Ok(Some(result)) if result == "done" => Ok(()),
            Ok(Some(result)) => Err(SystemdError::Job {
                call,
                unit: unit.to_owned(),
                result,
            }),
            Ok(None) | Err(_) => Err(SystemdError::Timeout {
                call,
                unit: unit.to_owned(),
                secs: self.job_timeout.as_secs(),
            }),
        }
    }
}

impl Systemd {
    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ServiceManager for Systemd {
    fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn reload(&self) -> Result<(), SystemdError> {
        self.changed();
        self.manager
            .reload()
            .await
            .map_err(|source| SystemdError::Call {
                call: "Reload",
                unit: String::new(),
                source: Box::new(source),
            })
    }

    async fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        self.changed();
        // A unit that hit its start limit or failed stays "failed" until reset.
        let _ = self.manager.reset_failed_unit(unit).await;
        self.job("RestartUnit", unit, || {
            self.manager.restart_unit(unit, "replace")
        })
        .await
    }

    async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        self.changed();
        self.job("StopUnit", unit, || self.manager.stop_unit(unit, "replace"))
            .await
    }

    async fn status(&self, unit: &str) -> Result<UnitStatus, SystemdError> {
        let call_err = |source| SystemdError::Call {
            call: "LoadUnit",
            unit: unit.to_owned(),
            source: Box::new(source),
        };
        let path = self.manager.load_unit(unit).await.map_err(call_err)?;
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .map_err(call_err)?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(call_err)?;
        let s = ServiceProxy::builder(&self.conn)
            .path(path)
            .map_err(call_err)?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(call_err)?;
        Ok(UnitStatus {
            load_state: u.load_state().await.map_err(call_err)?,
            active_state: u.active_state().await.map_err(call_err)?,
            sub_state: u.sub_state().await.map_err(call_err)?,
            n_restarts: s.n_restarts().await.unwrap_or(0),
            main_pid: s.main_pid().await.unwrap_or(0),
        })
    }
}
