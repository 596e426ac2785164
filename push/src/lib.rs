//! `push`: build a namespace, upload its artifact to the store, and point the manifest's
//! service at it, through the manifest library's compare-and-swap.
//!
//! Order matters for "bad input changes nothing": the service is looked up before the
//! build, the artifact is uploaded before the manifest changes, and the manifest changes
//! in one compare-and-swap that re-checks the service exists.

pub mod build;
pub mod config;
pub mod progress;
pub mod upload;

use std::path::PathBuf;

use deploy_manifest::model::{Artifact, Manifest};
use deploy_manifest::repo::Repo;
use deploy_manifest::sign::PublicKey;
use deploy_manifest::store::{ObjectStore, StoreError};
use deploy_manifest::{archive::ArchiveError, exit};
use serde::Serialize;

use build::Built;
use config::{Build, Config};
use upload::Uploaded;

/// Exit code for a failed build (beside `deploy_manifest::exit`).
pub const EXIT_BUILD: i32 = 7;
/// `--wait`: a host reported that the new artifact failed (and was rolled back).
pub const EXIT_WAIT_FAILED: i32 = 8;
/// `--wait`: not every host reported the new artifact healthy in time.
pub const EXIT_WAIT_TIMEOUT: i32 = 10;
/// `--wait`, a service rolled out in waves: the rollout was aborted (a host failed, or by
/// hand).
pub const EXIT_ROLLOUT_ABORTED: i32 = 12;
/// `--wait`, a service rolled out in waves: a wave missed its progress deadline and the
/// policy aborted the rollout.
pub const EXIT_ROLLOUT_DEADLINE: i32 = 13;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error(
        "unknown namespace {namespace:?}: add [namespaces.\"{namespace}\"] (or [defaults]) to {config}"
    )]
    UnknownNamespace { namespace: String, config: String },
    #[error(
        "no service is built from namespace {namespace:?}: set \"namespace\": \"{namespace}\" on it (deploy-manifest update-service NAME '{{\"namespace\": \"{namespace}\"}}'), or pass --service"
    )]
    NoServiceForNamespace { namespace: String },
    #[error("build of {namespace} failed: {detail}")]
    BuildFailed { namespace: String, detail: String },
    #[error("nix: {0}")]
    Nix(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Manifest(#[from] deploy_manifest::Error),
    #[error("{service} failed on {}", .failures.iter().map(|(h, e)| format!("{h}: {e}")).collect::<Vec<_>>().join("; "))]
    WaitFailed {
        service: String,
        failures: Vec<(String, String)>,
    },
    #[error("{service}: not every host runs the new artifact healthy after {secs} s: {}", .pending.iter().map(|(h, e)| format!("{h}: {e}")).collect::<Vec<_>>().join("; "))]
    WaitTimeout {
        service: String,
        secs: u64,
        pending: Vec<(String, String)>,
    },
    #[error("{service}: the rollout was aborted by {by}: {reason}")]
    RolloutAborted {
        service: String,
        cause: deploy_manifest::rollout::Cause,
        by: String,
        reason: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<StoreError> for PushError {
    fn from(e: StoreError) -> Self {
        PushError::Manifest(e.into())
    }
}

impl PushError {
    pub fn exit_code(&self) -> i32 {
        match self {
            PushError::Config { .. } | PushError::UnknownNamespace { .. } => exit::USAGE,
            PushError::NoServiceForNamespace { .. } => exit::NOT_FOUND,
            PushError::BuildFailed { .. } | PushError::Nix(_) => EXIT_BUILD,
            PushError::Manifest(e) => e.exit_code(),
            PushError::Archive(_) | PushError::Io { .. } => exit::FAILURE,
            PushError::WaitFailed { .. } => EXIT_WAIT_FAILED,
            PushError::WaitTimeout { .. } => EXIT_WAIT_TIMEOUT,
            PushError::RolloutAborted { cause, .. } => match cause {
                deploy_manifest::rollout::Cause::Deadline => EXIT_ROLLOUT_DEADLINE,
                _ => EXIT_ROLLOUT_ABORTED,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub namespace: String,
    /// The service to update; default: the one whose `namespace` matches.
    pub service: Option<String>,
    /// Build and report, upload nothing, write nothing.
    pub dry_run: bool,
    /// Where `nix copy` stages the closure before upload.
    pub nix_staging: PathBuf,
}

/// What a push did (printed with `--json`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PushReport {
    pub namespace: String,
    pub service: String,
    pub artifact: Artifact,
    pub uploaded: Uploaded,
    /// The new manifest version; `None` when nothing changed or on a dry run.
    pub version: Option<String>,
    /// The service already had this artifact.
    pub unchanged: bool,
    pub dry_run: bool,
}

/// The service a namespace updates.
fn find_service(m: &Manifest, namespace: &str, service: Option<&str>) -> Result<String, PushError> {
    if let Some(name) = service {
        return m.service(name).map(|s| s.name.clone()).ok_or_else(|| {
            deploy_manifest::Error::UnknownService {
                name: name.to_owned(),
            }
            .into()
        });
    }
    let matching: Vec<&str> = m
        .services
        .iter()
        .filter(|s| s.namespace.as_deref() == Some(namespace))
        .map(|s| s.name.as_str())
        .collect();
    match matching.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Err(PushError::NoServiceForNamespace {
            namespace: namespace.to_owned(),
        }),
        many => Err(PushError::Config {
            path: "manifest".into(),
            message: format!(
                "services {} all have namespace {namespace:?}; pass --service",
                many.join(", ")
            ),
        }),
    }
}

/// Build, upload, update the manifest.
pub async fn push<S: ObjectStore>(
    repo: &Repo<S>,
    config: &Config,
    opts: &PushOptions,
) -> Result<PushReport, PushError> {
    let span = tracing::info_span!("push", namespace = %opts.namespace);
    let _enter = span.enter();
    let namespace = opts.namespace.as_str();
    let build_plan = config.build(namespace)?;
    let wanted = opts
        .service
        .clone()
        .or_else(|| config.namespace(namespace).ok().and_then(|n| n.service));
    // Fail before building when the manifest does not verify (with trusted keys) or has
    // no service for this namespace.
    let current = repo.current_verified().await?.manifest;
    let service = find_service(&current, namespace, wanted.as_deref())?;

    let (dir, plan) = (config.dir.clone(), build_plan.clone());
    let ns = namespace.to_owned();
    let built = tokio::task::spawn_blocking(move || build::build(&ns, &dir, &plan))
        .await
        .expect("the build does not panic")?;

    let (artifact, uploaded) = match (&built, &build_plan) {
        (Built::Directory(dir), Build::Archive { format, .. }) => {
            upload::upload_archive(repo.store(), dir, &service, *format, opts.dry_run).await?
        }
        (Built::StorePath(path), _) => {
            let report =
                upload::upload_nix_closure(repo.store(), path, &opts.nix_staging, opts.dry_run)
                    .await?;
            (Artifact::StorePath(path.clone()), report)
        }
        (Built::Directory(_), _) => unreachable!("only archive builds produce directories"),
    };

    let unchanged = current.service(&service).map(|s| &s.artifact) == Some(&artifact);
    let mut report = PushReport {
        namespace: namespace.to_owned(),
        service: service.clone(),
        artifact: artifact.clone(),
        uploaded,
        version: None,
        unchanged,
        dry_run: opts.dry_run,
    };
    if opts.dry_run || unchanged {
        return Ok(report);
    }
    let label = artifact.label();
    let written = repo
        .update(|m| {
            // The base the write verified must still send this namespace to the service
            // the build was made for: a manifest changed during the build (by anyone) must
            // not put this artifact into another service.
            let again = find_service(m, namespace, wanted.as_deref())
                .map_err(|e| deploy_manifest::Error::BadArgument(e.to_string()))?;
            if again != service {
                return Err(deploy_manifest::Error::BadArgument(format!(
                    "the manifest changed during the build: namespace {namespace:?} now belongs to service {again:?}, not {service:?}; nothing was written, run push again"
                )));
            }
            let s =
                m.service_mut(&service)
                    .ok_or_else(|| deploy_manifest::Error::UnknownService {
                        name: service.clone(),
                    })?;
            s.artifact = artifact.clone();
            if s.namespace.is_none() {
                s.namespace = Some(namespace.to_owned());
            }
            Ok(format!("push {namespace}: {service} -> {label}"))
        })
        .await?;
    report.version = written.version;
    Ok(report)
}

/// `push --wait`'s per-host progress: a line on stderr each time what a host is doing
/// changes (`push: <service>: <host>: <what>`).
struct HostProgress<'a> {
    service: &'a str,
    said: std::collections::BTreeMap<String, String>,
}

impl<'a> HostProgress<'a> {
    fn new(service: &'a str) -> Self {
        HostProgress {
            service,
            said: Default::default(),
        }
    }

    fn say(&mut self, host: &str, what: &str) {
        if self.said.get(host).map(String::as_str) != Some(what) {
            eprintln!(
                "push: {}: {}: {what}",
                self.service,
                deploy_manifest::render::escape(host)
            );
            self.said.insert(host.to_owned(), what.to_owned());
        }
    }
}

/// `push --wait`: poll the hosts' reports until every host that runs `service` reports
/// `artifact` healthy. A host that reports this artifact failed ends the wait at once.
/// Returns the line that says how it ended.
///
/// A service rolled out in waves is followed through its rollout instead: each change of
/// wave or phase is printed; it ends when every wave has its healthy hosts, or with
/// [`PushError::RolloutAborted`] when the rollout stops (a host failing is the rollout's
/// to judge, by its `maxFailures`).
///
/// Given `host_keys`, only a report the host signed itself counts (see
/// [`deploy_manifest::status::verify_report`]): any other is as if the host had not
/// reported, and is named in the progress and in the timeout's message. Text from reports
/// is escaped in every message.
pub async fn wait_for<S: ObjectStore>(
    repo: &Repo<S>,
    service: &str,
    artifact: &Artifact,
    timeout: std::time::Duration,
    host_keys: Option<&[PublicKey]>,
) -> Result<String, PushError> {
    use deploy_manifest::render::escape;
    use deploy_manifest::rollout::{self, Phase, Policy};
    use deploy_manifest::status::{StoredReport, report_key};
    let deadline = std::time::Instant::now() + timeout;
    let manifest = repo.current_verified().await?.manifest;
    let staged = manifest
        .service(service)
        .is_some_and(|s| Policy::of(&manifest, s).is_some());
    let mut said = String::new();
    let hosts = manifest
        .service(service)
        .map(|s| s.hosts.clone())
        .unwrap_or_default();
    // Hosts whose report was not counted, and why (said once per change, not every poll).
    let mut unverified: std::collections::BTreeMap<String, String> = Default::default();
    // What each host was last said to be doing: a line per host when it changes.
    let mut progress = HostProgress::new(service);
    loop {
        if staged {
            let now = std::time::SystemTime::now();
            let (status, _) = rollout::status(repo.store(), &manifest, service, now).await?;
            let p = &status.progress;
            let waves = p.waves.len();
            let line = match &p.phase {
                Phase::Deploying { wave } => format!(
                    "wave {} of {waves} deploying: {} of {} hosts healthy",
                    wave + 1,
                    p.waves[*wave].healthy,
                    p.waves[*wave].min_healthy
                ),
                Phase::Baking { wave, until } => {
                    format!("wave {} of {waves} healthy, baking until {until}", wave + 1)
                }
                Phase::Done => {
                    return Ok(format!(
                        "the rollout of {service} is done: every wave ({waves}) has its healthy hosts"
                    ));
                }
                Phase::Aborting { cause, reason } => {
                    return Err(PushError::RolloutAborted {
                        service: service.to_owned(),
                        cause: *cause,
                        by: "its policy".into(),
                        reason: escape(reason).into_owned(),
                    });
                }
                Phase::Aborted {
                    by, cause, reason, ..
                } => {
                    return Err(PushError::RolloutAborted {
                        service: service.to_owned(),
                        cause: *cause,
                        by: escape(by).into_owned(),
                        reason: escape(reason).into_owned(),
                    });
                }
            };
            if line != said {
                eprintln!("push: {service}: {line}");
                said = line;
            }
            for (i, w) in p.waves.iter().enumerate() {
                for h in &w.hosts {
                    let what = match (&h.state, &h.error) {
                        (None, _) => "waiting for its wave or its next poll".to_owned(),
                        (Some(state), Some(error)) => format!("{state}: {}", escape(error)),
                        (Some(state), None) => state.to_string(),
                    };
                    progress.say(&h.host, &format!("wave {}: {what}", i + 1));
                }
            }
            if std::time::Instant::now() >= deadline {
                let pending = p
                    .waves
                    .iter()
                    .flat_map(|w| &w.hosts)
                    .filter(|h| h.state != Some(rollout::HostState::Healthy))
                    .map(|h| (h.host.clone(), "not healthy with it yet".to_owned()))
                    .collect();
                return Err(PushError::WaitTimeout {
                    service: service.to_owned(),
                    secs: timeout.as_secs(),
                    pending,
                });
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        }
        let reports = deploy_manifest::status::read_stored_reports(repo.store(), host_keys).await?;
        let mut pending = Vec::new();
        let mut failures = Vec::new();
        for host in &hosts {
            let found: Option<&StoredReport> = match host_keys {
                None => reports.iter().find(|s| &s.report.host == host),
                // With keys, a host's report is the one at its own object.
                Some(_) => reports.iter().find(|s| s.object == report_key(host)),
            };
            let Some(stored) = found else {
                progress.say(host, "no report yet");
                pending.push((host.clone(), "no report yet".to_owned()));
                continue;
            };
            if host_keys.is_some() && !stored.verification.is_verified() {
                let why = escape(&stored.why_unverified()).into_owned();
                if unverified.get(host) != Some(&why) {
                    tracing::warn!(
                        "{host}: report not verified, not counted ({why}); waiting for one the host signed"
                    );
                    unverified.insert(host.clone(), why.clone());
                }
                progress.say(host, &format!("report not verified: {why}"));
                pending.push((host.clone(), format!("report not verified: {why}")));
                continue;
            }
            unverified.remove(host);
            let r = &stored.report;
            match r.services.get(service) {
                Some(s) if s.artifact.as_ref() == Some(artifact) && s.health == "healthy" => {
                    let took = match s.phases.values().sum::<f64>() {
                        0.0 => String::new(),
                        secs => format!(
                            " (deployed in {secs:.1}s: {})",
                            deploy_manifest::history::phases_text(&s.phases)
                        ),
                    };
                    progress.say(host, &format!("healthy{took}"));
                }
                Some(s) if s.failed_artifact.as_ref() == Some(artifact) => {
                    let error = escape(s.last_error.as_deref().unwrap_or("failed")).into_owned();
                    progress.say(host, &format!("failed: {error}"));
                    failures.push((host.clone(), error));
                }
                Some(s) => {
                    let runs = escape(&format!(
                        "runs {} ({})",
                        s.artifact
                            .as_ref()
                            .map(Artifact::label)
                            .unwrap_or_else(|| "nothing".into()),
                        s.health
                    ))
                    .into_owned();
                    progress.say(host, &format!("{runs}, not the new artifact yet"));
                    pending.push((host.clone(), runs));
                }
                None => {
                    progress.say(host, "not deployed yet");
                    pending.push((host.clone(), "not deployed yet".to_owned()));
                }
            }
        }
        if !failures.is_empty() {
            return Err(PushError::WaitFailed {
                service: service.to_owned(),
                failures,
            });
        }
        if pending.is_empty() {
            return Ok(format!("every host running {service} reports it healthy"));
        }
        if std::time::Instant::now() >= deadline {
            return Err(PushError::WaitTimeout {
                service: service.to_owned(),
                secs: timeout.as_secs(),
                pending,
            });
        }
        tracing::info!(waiting_for = pending.len(), "waiting for hosts");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
