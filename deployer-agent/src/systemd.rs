//! The only module that talks to D-Bus: systemd's Manager, over the system bus or (with
//! `--user`) the session bus. No `systemctl` anywhere.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{OwnedObjectPath, Value};

use crate::unit::{PROBE_STOP_TIMEOUT, Property, TransientSpec, UnitError};

/// A row of `ListUnits*`: name, description, load state, active state, sub state, followed
/// unit, object path, job id, job type, job path.
type UnitRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    OwnedObjectPath,
    u32,
    String,
    OwnedObjectPath,
);

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
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<UnitRow>>;
    fn list_units_by_names(&self, names: &[&str]) -> zbus::Result<Vec<UnitRow>>;
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, &[(&str, Value<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;
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
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn description(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn fragment_path(&self) -> zbus::Result<String>;
    fn unref(&self) -> zbus::Result<()>;
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
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn exec_main_status(&self) -> zbus::Result<i32>;
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
    #[error("transient unit {unit}: {source}")]
    Spec {
        unit: String,
        #[source]
        source: UnitError,
    },
}

/// How the run of a one-shot unit (a probe, a release command) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// It ran to completion and exited 0.
    Done,
    /// It failed; how (`exited with status 3`, `killed by signal 9`, …).
    Failed(String),
    /// It was still running at its start timeout and was killed.
    Timeout,
    /// The job ended otherwise (systemd's job result: `canceled`, `dependency`, …).
    Other(String),
}

/// A string systemd reports, as an enum: the values the agent acts on, and what else a
/// newer systemd may say, kept as it said it.
macro_rules! systemd_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
            /// A value this agent does not know.
            Other(String),
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($text => Self::$variant,)*
                    _ => Self::Other(s),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $(Self::$variant => $text,)*
                    Self::Other(s) => s,
                })
            }
        }
    };
}

systemd_enum! {
    /// A unit's `ActiveState` (systemd.unit(5), "ActiveState").
    ActiveState {
        Active = "active",
        Reloading = "reloading",
        Inactive = "inactive",
        Failed = "failed",
        Activating = "activating",
        Deactivating = "deactivating",
        Maintenance = "maintenance",
        Refreshing = "refreshing",
    }
}

systemd_enum! {
    /// A unit's `LoadState`: whether systemd read its file.
    LoadState {
        Loaded = "loaded",
        /// No file for it (removed, or never written).
        NotFound = "not-found",
        Stub = "stub",
        BadSetting = "bad-setting",
        Error = "error",
        Merged = "merged",
        Masked = "masked",
    }
}

/// What systemd says about a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitStatus {
    pub load_state: LoadState,
    pub active_state: ActiveState,
    /// The unit type's own finer state (`running`, `exited`, `auto-restart`, …), for messages.
    pub sub_state: String,
    pub n_restarts: u32,
    pub main_pid: u32,
}

impl UnitStatus {
    pub fn is_active(&self) -> bool {
        self.active_state == ActiveState::Active
    }
}

/// The error of `LoadUnit` or of reading a property of the unit `unit` it loaded.
fn load_error(unit: &str) -> impl Fn(zbus::Error) -> SystemdError + Copy + '_ {
    move |source| SystemdError::Call {
        call: "LoadUnit",
        unit: unit.to_owned(),
        source: Box::new(source),
    }
}

/// What a unit name stands for in the manager: which unit it loads (an alias loads another)
/// and from which file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSource {
    /// The unit's own name (`Id`): another one when the name asked for is an alias.
    pub id: String,
    pub load_state: LoadState,
    /// The file it is loaded from (`FragmentPath`); empty for none.
    pub fragment_path: String,
    /// It runs (any state but `inactive`/`failed`): a unit whose file is gone may still run.
    pub running: bool,
    pub description: String,
}

/// A unit the manager has loaded (`ListUnitsByPatterns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedUnit {
    pub name: String,
    pub description: String,
    pub load_state: LoadState,
    pub active_state: ActiveState,
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
    /// What the name `unit` stands for (`LoadUnit`, then its `Id`, `LoadState` and
    /// `FragmentPath`).
    fn source(&self, unit: &str) -> impl Future<Output = Result<UnitSource, SystemdError>>;
    /// Start a transient one-shot unit (`StartTransientUnit`) and wait until it has finished
    /// or was killed at its timeout (a stuck one is stopped). systemd collects it afterwards.
    fn run_transient(
        &self,
        spec: &TransientSpec,
    ) -> impl Future<Output = Result<JobResult, SystemdError>>;
    /// Start the one-shot `unit` (from its unit file, with its own `TimeoutStartSec=`) and
    /// wait for it for up to `wait`; still running then, it is stopped. A failed unit is
    /// reset, so it does not linger as `failed`.
    fn run_oneshot(
        &self,
        unit: &str,
        wait: Duration,
    ) -> impl Future<Output = Result<JobResult, SystemdError>>;
    /// The units loaded now whose names match the glob `pattern`, in any state.
    fn list_units(
        &self,
        pattern: &str,
    ) -> impl Future<Output = Result<Vec<ListedUnit>, SystemdError>>;
    /// How each of `units` stands (each loaded if it was not: one with no file is
    /// `not-found`), in one call (`ListUnitsByNames`) however many there are.
    fn unit_states(
        &self,
        units: &[&str],
    ) -> impl Future<Output = Result<Vec<ListedUnit>, SystemdError>>;
    /// How many times systemd restarted each of the loaded `units` on its own
    /// (`NRestarts`), whatever their state: for the metrics file. Units it cannot tell are
    /// left out.
    fn restarts(&self, units: &[&str]) -> impl Future<Output = BTreeMap<String, u32>>;
    /// Calls so far that change something (reload, restart, stop), where counted.
    fn changes(&self) -> u64 {
        0
    }
    /// Calls so far to the manager of any kind (each D-Bus method call or property read),
    /// where counted.
    fn calls(&self) -> u64 {
        0
    }
}

/// A connection to a systemd manager.
pub struct Systemd {
    changes: AtomicU64,
    calls: AtomicU64,
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
            calls: Default::default(),
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
        match self.job_result(call, unit, self.job_timeout, start).await? {
            Some(result) if result == "done" => Ok(()),
            Some(result) => Err(SystemdError::Job {
                call,
                unit: unit.to_owned(),
                result,
            }),
            None => Err(SystemdError::Timeout {
                call,
                unit: unit.to_owned(),
                secs: self.job_timeout.as_secs(),
            }),
        }
    }

    /// Run a job-returning call and wait up to `wait` for its JobRemoved signal: the job's
    /// result (`done`, `failed`, …), or `None` without one in time.
    async fn job_result<F, Fut>(
        &self,
        call: &'static str,
        unit: &str,
        wait: Duration,
        start: F,
    ) -> Result<Option<String>, SystemdError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = zbus::Result<OwnedObjectPath>>,
    {
        let call_err = |source| SystemdError::Call {
            call,
            unit: unit.to_owned(),
            source: Box::new(source),
        };
        let mut removed = self.bus().receive_job_removed().await.map_err(call_err)?;
        let job = start().await.map_err(call_err)?;
        let removed = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Some(args.result.clone());
                }
            }
            None
        };
        Ok(tokio::time::timeout(wait, removed).await.ok().flatten())
    }

    /// A one-shot unit's job result, told apart: a failed start is a timeout when the
    /// unit's `Result` says so (the unit must still be loaded: referenced or failed); no
    /// result within the wait (`None`) is a timeout too, and the unit is stopped.
    async fn outcome(&self, unit: &str, job_result: Option<String>) -> JobResult {
        let Some(job_result) = job_result else {
            self.stop_stuck(unit).await;
            return JobResult::Timeout;
        };
        match job_result.as_str() {
            "done" => JobResult::Done,
            "timeout" => JobResult::Timeout,
            "failed" => match self.service_result(unit).await {
                Some((result, _)) if result == "timeout" => JobResult::Timeout,
                Some((result, status)) => JobResult::Failed(match result.as_str() {
                    "exit-code" if status == 203 => {
                        "could not be executed (status 203/EXEC)".to_owned()
                    }
                    "exit-code" => format!("exited with status {status}"),
                    "signal" | "core-dump" => format!("killed by signal {status}"),
                    other => other.to_owned(),
                }),
                None => JobResult::Failed("failed".to_owned()),
            },
            other => JobResult::Other(other.to_owned()),
        }
    }

    /// The service unit at `path`, its properties read fresh on every call.
    async fn service_at(&self, path: OwnedObjectPath) -> zbus::Result<ServiceProxy<'static>> {
        ServiceProxy::builder(&self.conn)
            .path(path)?
            .cache_properties(CacheProperties::No)
            .build()
            .await
    }

    /// A loaded service unit's `Result` and `ExecMainStatus`.
    async fn service_result(&self, unit: &str) -> Option<(String, i32)> {
        let path = self.bus().get_unit(unit).await.ok()?;
        let s = self.service_at(path).await.ok()?;
        self.count(2);
        let result = s.result().await.ok()?;
        Some((result, s.exec_main_status().await.unwrap_or(0)))
    }

    /// `unit`, loaded (`LoadUnit`), with its properties read fresh on every call.
    async fn unit(&self, unit: &str) -> Result<UnitProxy<'_>, SystemdError> {
        let call_err = load_error(unit);
        let path = self.bus().load_unit(unit).await.map_err(call_err)?;
        UnitProxy::builder(&self.conn)
            .path(path)
            .map_err(call_err)?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(call_err)
    }

    /// Stop a unit that is still running past its wait (errors are logged: the caller
    /// already reports the timeout).
    async fn stop_stuck(&self, unit: &str) {
        tracing::warn!(%unit, "still running past its timeout; stopping it");
        if let Err(e) = self
            .job("StopUnit", unit, || self.bus().stop_unit(unit, "replace"))
            .await
        {
            tracing::warn!(%unit, error = %e, "could not stop it");
        }
    }
}

/// A property as a D-Bus value of the type systemd expects.
fn dbus_value(p: &Property) -> Value<'_> {
    match p {
        Property::Bool(b) => Value::from(*b),
        Property::Str(s) => Value::from(s.as_str()),
        Property::Strs(v) => Value::from(v.clone()),
        Property::Exec(argv) => Value::from(vec![(
            argv.first().cloned().unwrap_or_default(),
            argv.clone(),
            false,
        )]),
        Property::Files(files) => Value::from(files.clone()),
        Property::Micros(us) => Value::from(*us),
    }
}

impl Systemd {
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// The manager, for one call (counted).
    fn bus(&self) -> &ManagerProxy<'static> {
        self.count(1);
        &self.manager
    }

    /// `n` calls made other than through [`Systemd::bus`] (property reads).
    fn count(&self, n: u64) {
        self.calls.fetch_add(n, Ordering::Relaxed);
    }
}

/// A `ListUnits*` row as a [`ListedUnit`].
fn listed((name, description, load_state, active_state, ..): UnitRow) -> ListedUnit {
    ListedUnit {
        name,
        description,
        load_state: load_state.into(),
        active_state: active_state.into(),
    }
}

impl ServiceManager for Systemd {
    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn reload(&self) -> Result<(), SystemdError> {
        self.changed();
        self.bus()
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
        let _ = self.bus().reset_failed_unit(unit).await;
        self.job("RestartUnit", unit, || {
            self.bus().restart_unit(unit, "replace")
        })
        .await
    }

    async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        self.changed();
        self.job("StopUnit", unit, || self.bus().stop_unit(unit, "replace"))
            .await
    }

    async fn run_transient(&self, spec: &TransientSpec) -> Result<JobResult, SystemdError> {
        let unit = spec.name.as_str();
        let properties = spec.properties().map_err(|source| SystemdError::Spec {
            unit: unit.to_owned(),
            source,
        })?;
        // AddRef: this connection holds a reference, so the finished unit stays loaded until
        // its result is read (then Unref; CollectMode= lets systemd collect it, even failed).
        let values: Vec<(&str, Value<'_>)> = properties
            .iter()
            .map(|(k, v)| (*k, dbus_value(v)))
            .chain([("AddRef", Value::from(true))])
            .collect();
        // systemd kills the probe at its timeout; this wait is only the belt to its braces.
        let wait = spec.timeout + PROBE_STOP_TIMEOUT + Duration::from_secs(5);
        let result = self
            .job_result("StartTransientUnit", unit, wait, || {
                self.bus().start_transient_unit(unit, "fail", &values, &[])
            })
            .await?;
        let outcome = self.outcome(unit, result).await;
        if let Ok(path) = self.bus().get_unit(unit).await
            && let Ok(u) = UnitProxy::builder(&self.conn).path(path)
            && let Ok(u) = u.cache_properties(CacheProperties::No).build().await
            && let Err(e) = {
                self.count(1);
                u.unref().await
            }
        {
            tracing::warn!(%unit, error = %e, "could not release the transient unit");
        }
        Ok(outcome)
    }

    async fn run_oneshot(&self, unit: &str, wait: Duration) -> Result<JobResult, SystemdError> {
        self.changed();
        let _ = self.bus().reset_failed_unit(unit).await;
        let result = self
            .job_result("RestartUnit", unit, wait, || {
                self.bus().restart_unit(unit, "replace")
            })
            .await?;
        let outcome = self.outcome(unit, result).await;
        let _ = self.bus().reset_failed_unit(unit).await;
        Ok(outcome)
    }

    async fn list_units(&self, pattern: &str) -> Result<Vec<ListedUnit>, SystemdError> {
        let units = self
            .bus()
            .list_units_by_patterns(&[], &[pattern])
            .await
            .map_err(|source| SystemdError::Call {
                call: "ListUnitsByPatterns",
                unit: pattern.to_owned(),
                source: Box::new(source),
            })?;
        Ok(units.into_iter().map(listed).collect())
    }

    async fn unit_states(&self, units: &[&str]) -> Result<Vec<ListedUnit>, SystemdError> {
        if units.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .bus()
            .list_units_by_names(units)
            .await
            .map_err(|source| SystemdError::Call {
                call: "ListUnitsByNames",
                unit: format!("({} units)", units.len()),
                source: Box::new(source),
            })?;
        Ok(rows.into_iter().map(listed).collect())
    }

    async fn restarts(&self, units: &[&str]) -> BTreeMap<String, u32> {
        let rows = match self.bus().list_units_by_names(units).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the units' restart counts");
                return BTreeMap::new();
            }
        };
        // One property read per loaded unit (a crash loop's too), at its object path; 32
        // in flight.
        let reads = rows.into_iter().filter(|row| row.2 == "loaded").map(
            |(name, .., path, _, _, _)| async move {
                let s = self.service_at(path).await.ok()?;
                self.count(1);
                Some((name, s.n_restarts().await.ok()?))
            },
        );
        futures_util::stream::iter(reads)
            .buffer_unordered(32)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    async fn source(&self, unit: &str) -> Result<UnitSource, SystemdError> {
        let call_err = load_error(unit);
        let u = self.unit(unit).await?;
        self.count(4);
        let active: ActiveState = u.active_state().await.map_err(call_err)?.into();
        Ok(UnitSource {
            id: u.id().await.map_err(call_err)?,
            load_state: u.load_state().await.map_err(call_err)?.into(),
            fragment_path: u.fragment_path().await.map_err(call_err)?,
            running: !matches!(active, ActiveState::Inactive | ActiveState::Failed),
            description: u.description().await.map_err(call_err)?,
        })
    }

    async fn status(&self, unit: &str) -> Result<UnitStatus, SystemdError> {
        let call_err = load_error(unit);
        let u = self.unit(unit).await?;
        let path = u.inner().path().to_owned().into();
        let s = self.service_at(path).await.map_err(call_err)?;
        self.count(5);
        Ok(UnitStatus {
            load_state: u.load_state().await.map_err(call_err)?.into(),
            active_state: u.active_state().await.map_err(call_err)?.into(),
            sub_state: u.sub_state().await.map_err(call_err)?,
            n_restarts: s.n_restarts().await.unwrap_or(0),
            main_pid: s.main_pid().await.unwrap_or(0),
        })
    }
}
