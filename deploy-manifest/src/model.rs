//! The manifest model: the one place its shape lives in Rust.
//!
//! `schemas/manifest.schema.json` is the contract; these types mirror it field for field
//! (`#[serde(deny_unknown_fields)]` everywhere, so serde and the schema reject the same
//! typos). The `schema_drift` test fails when the two disagree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// A whole manifest: what every host should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// `manifest-YYYYMMDDTHHMMSSZ-<8hex>`; set when the version is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// RFC 3339 UTC time the version was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// `user@host` of whoever wrote the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The version that was current when this one was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Signed order of versions: the parent's sequence + 1. Agents refuse a manifest whose
    /// sequence is not above the one they applied (clocks play no part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// RFC 3339 UTC time after which agents that check signatures refuse this version for
    /// any change (a frozen view of the store cannot be served forever); see `refresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// One line saying what changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// Set on a rollback: the version that was current before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<String>,
    /// Set on a rollback: the version whose content this one restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<String>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<Infrastructure>,
    /// Staged rollouts: host labels and the fleet's default policy (see [`crate::rollout`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<FleetRollout>,
    /// ed25519 signature over the manifest without this field (see `sign`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<ManifestSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ManifestSignature {
    /// The signing key's name (`name` of `name:base64`).
    pub key: String,
    /// Base64 of the 64-byte ed25519 signature.
    pub value: String,
}

impl Manifest {
    /// An empty manifest, as `deploy-manifest init` writes it.
    pub fn empty() -> Self {
        Manifest {
            schema_version: SCHEMA_VERSION,
            version: None,
            created_at: None,
            created_by: None,
            parent: None,
            sequence: None,
            expires: None,
            summary: None,
            rolled_back_from: None,
            rolled_back_to: None,
            services: Vec::new(),
            infrastructure: None,
            rollout: None,
            signature: None,
        }
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The infrastructure service `dep`, in a `dependsOn` of one of `service`'s own
    /// requirements, names: the shared one of that name if there is one (as it always
    /// has), else the service's own requirement `<service>-<dep>`.
    pub fn dependency_name(&self, service: &Service, dep: &str) -> String {
        let shared = self
            .infrastructure
            .as_ref()
            .is_some_and(|i| i.services.contains_key(dep));
        let own = service
            .infrastructure
            .as_ref()
            .is_some_and(|i| i.services.contains_key(dep));
        if own && !shared {
            format!("{}-{dep}", service.name)
        } else {
            dep.to_owned()
        }
    }

    pub fn service_mut(&mut self, name: &str) -> Option<&mut Service> {
        self.services.iter_mut().find(|s| s.name == name)
    }

    /// The manifest without its version record (version, time, author, parent, sequence,
    /// expiry, summary, rollback fields): what a rollback restores and what `diff` compares.
    pub fn content(&self) -> Manifest {
        Manifest {
            version: None,
            created_at: None,
            created_by: None,
            parent: None,
            sequence: None,
            expires: None,
            summary: None,
            rolled_back_from: None,
            rolled_back_to: None,
            signature: None,
            ..self.clone()
        }
    }
}

/// One deployable service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// The build namespace `push` builds for this service, e.g. `Biz/MyService.py`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub artifact: Artifact,
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Exec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Host-local secrets file; default `/var/lib/deployer-secrets/<name>.env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Release>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<ServiceInfrastructure>,
    /// How a new version of this service reaches its hosts, field by field over the
    /// fleet's default (`rollout.policy`). Not part of the service's generation: changing
    /// it restarts nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutPolicy>,
}

/// The manifest's `rollout`: labels that waves can name, and the default policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FleetRollout {
    /// Host labels: label → host names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, Vec<String>>,
    /// The policy of every service that does not override a field of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<RolloutPolicy>,
}

/// How a service's new version is rolled out; every field optional (a service's policy
/// overrides the fleet's field by field).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutPolicy {
    /// The waves, in order. No waves (or `[]`): every host deploys at its next poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<Wave>>,
    /// How long a wave must stay healthy before the next starts (default 0s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<Span>,
    /// Hosts whose health-gated deploy may fail before the rollout aborts (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    /// How long a wave may take to become healthy (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<Span>,
    /// What a missed deadline does (default `abort`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_deadline: Option<OnDeadline>,
}

/// One wave: exactly one of `hosts`, `labels` or `percent` says which of the service's
/// hosts it takes (of those no earlier wave took).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Wave {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The service's hosts this wave and the earlier ones cover together, in percent
    /// (rounded up), picked in an order fixed by a hash of service and host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Healthy hosts the wave needs before the next one starts (default: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadline {
    /// Abort the rollout: no further wave starts, hosts that run the version roll back.
    Abort,
    /// Go on as if the wave were healthy.
    Continue,
}

/// What to run: a Nix store path (closure in the store's binary cache) or a
/// content-addressed archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Artifact {
    StorePath(String),
    Archive(ArchiveRef),
}

impl Artifact {
    /// A short human label: the store path, or `<name>@<sha256 prefix>`.
    pub fn label(&self) -> String {
        match self {
            Artifact::StorePath(p) => p.clone(),
            Artifact::Archive(a) => {
                format!("{}@{}", a.name, a.sha256.get(..12).unwrap_or(&a.sha256))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArchiveRef {
    pub sha256: String,
    pub name: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ArchiveFormat>,
}

impl ArchiveRef {
    /// The object key under the store prefix: `artifacts/<sha256>-<name>.<ext>`.
    pub fn key(&self) -> String {
        let ext = self.format.unwrap_or_default().extension();
        format!("artifacts/{}-{}.{}", self.sha256, self.name, ext)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArchiveFormat {
    #[default]
    #[serde(rename = "tar.gz")]
    TarGz,
    #[serde(rename = "tar.zst")]
    TarZst,
}

impl ArchiveFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ArchiveFormat::TarGz => "tar.gz",
            ArchiveFormat::TarZst => "tar.zst",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Exec {
    /// `null` means `<artifact>/bin/<name>`.
    #[serde(default)]
    pub command: Option<String>,
    /// The account the service runs as: left out, root; `null`, a dynamic user systemd makes
    /// for the service while it runs (`DynamicUser=yes`). See [`Exec::run_as`].
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub user: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Paths the sandbox leaves writable (`ReadWritePaths=`); everything else but the
    /// service's state directory and its private /tmp is read-only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub writable_paths: Vec<String>,
    /// `MemoryMax=`: bytes with an optional K, M, G or T suffix (base 1024), a percentage
    /// of the host's memory, or `infinity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<String>,
    /// `CPUQuota=`: a percentage of one CPU (`200%` is two CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota: Option<String>,
    /// `TasksMax=`: the most processes and threads the service may have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_max: Option<u64>,
}

/// Who a service runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAs<'a> {
    /// No `exec.user`: root, in the sandbox.
    Root,
    /// `exec.user` names an account, which must exist on the host.
    Account(&'a str),
    /// `"user": null`: `DynamicUser=yes`.
    Dynamic,
}

impl Exec {
    pub fn run_as(&self) -> RunAs<'_> {
        match &self.user {
            None => RunAs::Root,
            Some(Some(name)) => RunAs::Account(name),
            Some(None) => RunAs::Dynamic,
        }
    }
}

/// A field that tells "left out" (`None`, by `#[serde(default)]`) from `null` (`Some(None)`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Http {
    pub domain: String,
    #[serde(default = "default_path")]
    pub path: String,
    pub internal_port: u16,
    /// The service listens on `$PORT`: with a proxy, generations switch without downtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_downtime: Option<bool>,
}

fn default_path() -> String {
    "/".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Health {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    /// Deadline for the service to become healthy, e.g. `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Span>,
    /// Time between probes, e.g. `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Span>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpProbe {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpProbe {
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecProbe {
    pub command: Vec<String>,
}

/// A duration as a manifest writes it (`500ms`, `30s`, `1m30s`): parsed when the manifest is
/// read, so a value that does not parse is refused there, never replaced by a default where
/// it is used; written back as it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    text: String,
    value: std::time::Duration,
}

/// Why a duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration such as 500ms, 30s, 5m, 1h or 1m30s: {reason}")]
pub struct SpanError {
    pub text: String,
    pub reason: String,
}

impl Span {
    pub fn parse(text: &str) -> Result<Span, SpanError> {
        humantime::parse_duration(text)
            .map(|value| Span {
                text: text.to_owned(),
                value,
            })
            .map_err(|e| SpanError {
                text: text.to_owned(),
                reason: e.to_string(),
            })
    }

    pub fn get(&self) -> std::time::Duration {
        self.value
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Span, D::Error> {
        let text = String::deserialize(d)?;
        Span::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Release {
    pub command: String,
    /// Longest the command may run, e.g. `10m` (default [`Release::DEFAULT_TIMEOUT`], at
    /// least 1 s); still running then, it is killed and the release fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Span>,
}

impl Release {
    pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

    /// `timeout`, or the default; never under 1 s (systemd reads 0 as "no timeout").
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
            .as_ref()
            .map_or(Self::DEFAULT_TIMEOUT, Span::get)
            .max(std::time::Duration::from_secs(1))
    }
}

/// What a service needs from the host's infrastructure (seed 001's app layer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceInfrastructure {
    /// `true`: a database and user named after the service in the shared Postgres; or how
    /// (`dedicated`, `dialect`). Injects `DATABASE_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Need<DatabaseNeed>>,
    /// `true`: a Redis DB index of its own in the shared Redis; or `{"dedicated": true}`.
    /// Injects `REDIS_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<Need<RedisNeed>>,
    /// `true`: a bucket of its own (named after the service) on the shared object store
    /// (the `garage` preset); or `{"bucket": "uploads", "quota": "10gb"}`. Injects
    /// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (a key that reaches
    /// that bucket only), `AWS_REGION` and `S3_BUCKET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<Need<S3Need>>,
    /// Custom requirements (seed 001's `IServiceRequirement`), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, InfraService>,
}

impl ServiceInfrastructure {
    /// The presets of the dedicated servers it asks for: a server of its own runs as
    /// infrastructure `<service>-<preset>` (so a change of dialect is another server, never
    /// the other one's data directory).
    pub fn dedicated(&self) -> Vec<Preset> {
        let database = self
            .database()
            .filter(DatabaseNeed::dedicated)
            .map(|d| d.dialect().preset());
        let redis = self
            .redis()
            .filter(RedisNeed::dedicated)
            .map(|_| Preset::Redis);
        database.into_iter().chain(redis).collect()
    }

    /// The database it asks for, if any (`true` is the defaults).
    pub fn database(&self) -> Option<DatabaseNeed> {
        self.database.as_ref().and_then(Need::wanted)
    }

    /// The Redis it asks for, if any.
    pub fn redis(&self) -> Option<RedisNeed> {
        self.redis.as_ref().and_then(Need::wanted)
    }

    /// The bucket it asks for, if any.
    pub fn s3(&self) -> Option<S3Need> {
        self.s3.as_ref().and_then(Need::wanted)
    }
}

/// A shorthand of seed 001's app layer: `true`/`false`, or an object saying how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Need<T> {
    Flag(bool),
    Spec(T),
}

impl<T: Clone + Default> Need<T> {
    /// What is asked for: nothing for `false`, the defaults for `true`.
    pub fn wanted(&self) -> Option<T> {
        match self {
            Need::Flag(false) => None,
            Need::Flag(true) => Some(T::default()),
            Need::Spec(spec) => Some(spec.clone()),
        }
    }
}

/// `database: {…}`: which server, shared or the service's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatabaseNeed {
    /// A server of its own (its own unit, data directory and port) instead of a database
    /// in the shared one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedicated: Option<bool>,
    /// `postgres` (default) or `mysql` (the `mysql` preset: MariaDB or MySQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dialect: Option<Dialect>,
    /// The dedicated server's port; by default the agent picks a free one and keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl DatabaseNeed {
    pub fn dedicated(&self) -> bool {
        self.dedicated == Some(true)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect.unwrap_or(Dialect::Postgres)
    }
}

/// `s3: {…}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Need {
    /// The bucket's name as the service sees it (default: the service's name). It is the
    /// service's own: another service's bucket of the same name is another bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// The most the bucket may hold, e.g. `10gb` (SI units: kb, mb, gb, tb; or kib, mib,
    /// gib, tib).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
}

impl S3Need {
    /// The bucket's name for `service`.
    pub fn bucket(&self, service: &str) -> String {
        self.bucket.clone().unwrap_or_else(|| service.to_owned())
    }
}

/// A size such as `10gb` or `512MiB`, in bytes; `None` if it is not one.
pub fn parse_size(s: &str) -> Option<u64> {
    let lower = s.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = lower[digits.len()..].trim();
    let n: u64 = digits.trim().parse().ok()?;
    let factor: u64 = match unit {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// `redis: {…}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisNeed {
    /// A Redis server of its own, password-protected, instead of an index in the shared one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedicated: Option<bool>,
    /// The dedicated server's port; by default the agent picks a free one and keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl RedisNeed {
    pub fn dedicated(&self) -> bool {
        self.dedicated == Some(true)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    Postgres,
    Mysql,
}

impl Dialect {
    /// How operators call it.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::Mysql => "MySQL",
        }
    }

    /// The preset that serves this dialect.
    pub fn preset(self) -> Preset {
        match self {
            Dialect::Postgres => Preset::Postgres,
            Dialect::Mysql => Preset::Mysql,
        }
    }
}

/// The ecosystem layer: infrastructure shared by the services of a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Infrastructure {
    #[serde(default)]
    pub services: BTreeMap<String, InfraService>,
    /// What differs on some hosts (seed 001's per-stack `serviceOverrides`), in order: a
    /// later entry wins where two set the same field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<InfraOverrides>,
}

/// The infrastructure of some hosts: those named, and those of the labels named
/// (`rollout.labels`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InfraOverrides {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// By infrastructure name: a shared one, and every service's own requirement of that
    /// name; or `<service>/<requirement>`, that service's only (which wins over the plain
    /// name).
    pub services: BTreeMap<String, ServiceOverride>,
}

/// How one infrastructure service differs on those hosts (seed 001's `IServiceOverride`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceOverride {
    /// Not provisioned there: not started, its env not given, nothing waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// An existing server there instead of provisioning one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<External>,
    /// Another command (a custom service's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Other preset settings: its keys replace the declaration's of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
}

/// An override's `config` over the declaration's: its keys replace the declaration's of the
/// same name, the others stay (an override of `maxmemory` keeps `password`).
pub fn merge_config(base: Option<&Value>, over: &Value) -> Value {
    match (base, over) {
        (Some(Value::Object(b)), Value::Object(o)) => {
            let mut out = b.clone();
            out.extend(o.clone());
            Value::Object(out)
        }
        _ => over.clone(),
    }
}

/// One of a custom service's command variants (seed 001's `networkMode` variants), picked
/// by the host's mode (`deployer-agent --mode`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Variant {
    pub command: Vec<String>,
}

/// One infrastructure service: a preset (`postgres`, `redis`) or a full requirement in
/// seed 001's `IServiceRequirement` shape; either may point at an `external` server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InfraService {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Preset-specific settings, passed through to the provisioner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<InfraKind>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Health>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Logical secret name → key in the host's secrets directory.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Default true: dependants wait for it to be healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<bool>,
    /// How long dependants wait, e.g. `120s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_timeout: Option<Span>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<External>,
    /// Commands by host mode (`regtest`, `testnet`, …): the host's mode picks one. A host
    /// without a mode runs `command`; one whose mode no variant names runs nothing (it is an
    /// error, never another mode's command).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, Variant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Postgres,
    Redis,
    /// MariaDB (or MySQL): `mariadbd`, else `mysqld`.
    Mysql,
    /// Garage, a self-hosted S3 server: `s3: true`.
    Garage,
}

/// `config` of a `postgres` preset (seed 001: databases, extensions, version).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostgresConfig {
    /// Databases made in the cluster besides each service's own (`{"main": {}}`).
    #[serde(default)]
    pub databases: BTreeMap<String, NamedDatabase>,
    /// Extensions created in the database of each service that uses this server.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// The PostgreSQL major version to run (`"15"`): its server binaries must be installed.
    #[serde(default)]
    pub version: Option<String>,
}

/// A database named in a preset's `databases`; no settings yet (`{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedDatabase {}

/// `config` of a `garage` preset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GarageConfig {
    /// Buckets made on the server besides each service's own (global names, no key: the
    /// operator's to hand out).
    #[serde(default)]
    pub buckets: Vec<String>,
}

/// Whether `name` is an S3 bucket name: 3 to 63 of lower-case letters, digits, '-' and
/// '.', starting and ending with a letter or digit.
pub fn is_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// `config` of a `redis` preset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisConfig {
    /// `maxmemory`, e.g. `256mb`.
    #[serde(default)]
    pub maxmemory: Option<String>,
    /// `maxmemory-policy`, e.g. `allkeys-lru`.
    #[serde(default)]
    pub maxmemory_policy: Option<String>,
    /// The server requires a password (the agent makes it; a dedicated Redis always does).
    #[serde(default)]
    pub password: Option<bool>,
}

impl InfraService {
    /// Its `config` read as a `postgres` preset's (`{}` when absent).
    pub fn postgres_config(&self) -> Result<PostgresConfig, String> {
        preset_config(self.config.as_ref())
    }

    /// Its `config` read as a `garage` preset's (`{}` when absent).
    pub fn garage_config(&self) -> Result<GarageConfig, String> {
        preset_config(self.config.as_ref())
    }

    /// Its `config` read as a `redis` preset's (`{}` when absent).
    pub fn redis_config(&self) -> Result<RedisConfig, String> {
        preset_config(self.config.as_ref())
    }
}

fn preset_config<T: Default + serde::de::DeserializeOwned>(v: Option<&Value>) -> Result<T, String> {
    match v {
        None => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| e.to_string()),
    }
}

impl Preset {
    /// Its name in a manifest (`postgres`, `redis`, `mysql`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Postgres => "postgres",
            Preset::Redis => "redis",
            Preset::Mysql => "mysql",
            Preset::Garage => "garage",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InfraKind {
    Database,
    Cache,
    Daemon,
    Gateway,
    Storage,
    Sidecar,
    Tool,
}

/// An existing server to use instead of provisioning one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct External {
    pub host: String,
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
}

/// The serde model and `schemas/manifest.schema.json` must describe the same documents.
/// The maximal manifests below set every field (struct literals without `..`, so a new
/// field does not compile until it is added here); the test then checks both directions:
/// every field the model writes is allowed by the schema, and every property the schema
/// defines is written by the model.
#[cfg(test)]
mod schema_drift {
    use super::*;
    use crate::validate::{MANIFEST_SCHEMA, manifest_from_value};
    use std::collections::BTreeSet;

    fn health() -> Health {
        Health {
            http: Some(HttpProbe {
                path: "/healthz".into(),
                port: Some(8080),
                status: Some(200),
            }),
            tcp: Some(TcpProbe { port: 8080 }),
            exec: Some(ExecProbe {
                command: vec!["bin/check".into()],
            }),
            timeout: Some(Span::parse("30s").unwrap()),
            interval: Some(Span::parse("1s").unwrap()),
        }
    }

    fn infra_service() -> InfraService {
        InfraService {
            preset: Some(Preset::Postgres),
            config: Some(serde_json::json!({"databases": {"main": {}}})),
            description: Some("search".into()),
            kind: Some(InfraKind::Daemon),
            ports: [("http".to_owned(), 9200)].into(),
            env: [(
                "SEARCH_URL".to_owned(),
                "http://${host}:${port:http}".to_owned(),
            )]
            .into(),
            health_check: Some(health()),
            command: Some(vec!["bin/search".into()]),
            depends_on: vec!["db".into()],
            secrets: [("apiKey".to_owned(), "search_api_key".to_owned())].into(),
            version: Some("8.11".into()),
            critical: Some(true),
            startup_timeout: Some(Span::parse("120s").unwrap()),
            external: Some(External {
                host: "10.0.1.5".into(),
                ports: [("http".to_owned(), 9200)].into(),
            }),
            variants: [(
                "regtest".to_owned(),
                Variant {
                    command: vec!["/usr/bin/search".into(), "--regtest".into()],
                },
            )]
            .into(),
        }
    }

    fn service(name: &str, artifact: Artifact) -> Service {
        Service {
            name: name.into(),
            namespace: Some("Biz/MyService.py".into()),
            artifact,
            hosts: vec!["biz".into()],
            exec: Some(Exec {
                command: Some("bin/server --port 8080".into()),
                user: Some(Some("root".into())),
                group: Some("root".into()),
                writable_paths: vec!["/srv/data".into()],
                memory_max: Some("512M".into()),
                cpu_quota: Some("50%".into()),
                tasks_max: Some(64),
            }),
            env: [("PORT".to_owned(), "8080".to_owned())].into(),
            env_file: Some(format!("/var/lib/deployer-secrets/{name}.env")),
            http: Some(Http {
                domain: format!("{name}.example.com"),
                path: "/".into(),
                internal_port: 8080,
                zero_downtime: Some(true),
            }),
            health: Some(health()),
            release: Some(Release {
                command: "bin/migrate".into(),
                timeout: Some(Span::parse("10m").unwrap()),
            }),
            infrastructure: Some(ServiceInfrastructure {
                database: Some(if name == "nix" {
                    Need::Spec(DatabaseNeed {
                        dedicated: Some(true),
                        dialect: Some(Dialect::Mysql),
                        port: Some(3307),
                    })
                } else {
                    Need::Flag(true)
                }),
                redis: Some(if name == "nix" {
                    Need::Spec(RedisNeed {
                        dedicated: Some(true),
                        port: Some(6380),
                    })
                } else {
                    Need::Flag(true)
                }),
                s3: Some(if name == "nix" {
                    Need::Spec(S3Need {
                        bucket: Some("uploads".into()),
                        quota: Some("10gb".into()),
                    })
                } else {
                    Need::Flag(true)
                }),
                services: [("search".to_owned(), infra_service())].into(),
            }),
            rollout: Some(policy()),
        }
    }

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            waves: Some(vec![
                Wave {
                    hosts: vec!["biz".into()],
                    labels: vec![],
                    percent: None,
                    min_healthy: Some(1),
                },
                Wave {
                    hosts: vec![],
                    labels: vec!["eu".into()],
                    percent: None,
                    min_healthy: None,
                },
                Wave {
                    hosts: vec![],
                    labels: vec![],
                    percent: Some(50),
                    min_healthy: None,
                },
            ]),
            bake: Some(Span::parse("10m").unwrap()),
            max_failures: Some(1),
            progress_deadline: Some(Span::parse("1h").unwrap()),
            on_deadline: Some(OnDeadline::Continue),
        }
    }

    fn maximal() -> Manifest {
        Manifest {
            schema_version: SCHEMA_VERSION,
            version: Some("manifest-20261122T140000Z-3f2a9c1d".into()),
            created_at: Some("2026-11-22T14:00:00Z".into()),
            created_by: Some("ben@laptop".into()),
            parent: Some("manifest-20261121T093000Z-aa01bb02".into()),
            sequence: Some(7),
            expires: Some("2026-12-22T14:00:00Z".into()),
            summary: Some("rollback".into()),
            rolled_back_from: Some("manifest-20261122T130000Z-00000000".into()),
            rolled_back_to: Some("manifest-20261121T093000Z-aa01bb02".into()),
            services: vec![
                service("nix", Artifact::StorePath("/nix/store/abc-nix".into())),
                service(
                    "archive",
                    Artifact::Archive(ArchiveRef {
                        sha256: "0".repeat(64),
                        name: "archive".into(),
                        size: 42,
                        format: Some(ArchiveFormat::TarZst),
                    }),
                ),
            ],
            infrastructure: Some(Infrastructure {
                // Not depending on itself (the requirement's `dependsOn` names it).
                services: [(
                    "db".to_owned(),
                    InfraService {
                        depends_on: vec![],
                        ..infra_service()
                    },
                )]
                .into(),
                overrides: vec![InfraOverrides {
                    hosts: vec!["biz".into()],
                    labels: vec!["eu".into()],
                    services: [
                        (
                            "db".to_owned(),
                            ServiceOverride {
                                disabled: Some(false),
                                external: Some(External {
                                    host: "10.0.1.6".into(),
                                    ports: [("tcp".to_owned(), 5433)].into(),
                                }),
                                command: Some(vec!["/usr/bin/db".into()]),
                                config: Some(serde_json::json!({"databases": {"main": {}}})),
                            },
                        ),
                        ("nix/search".to_owned(), ServiceOverride::default()),
                    ]
                    .into(),
                }],
            }),
            rollout: Some(FleetRollout {
                labels: [("eu".to_owned(), vec!["biz".to_owned()])].into(),
                policy: Some(policy()),
            }),
            signature: Some(ManifestSignature {
                key: "ci-2026".into(),
                value: "c2lnbmF0dXJl".into(),
            }),
        }
    }

    /// Walk `instance` along `schema`; record every object schema visited and every schema
    /// property the instance does not have.
    fn walk(
        root: &Value,
        node: &Value,
        pointer: String,
        instance: &Value,
        visited: &mut BTreeSet<String>,
        missing: &mut Vec<String>,
    ) {
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            let target = r.trim_start_matches('#').to_owned();
            let next = root.pointer(&target).expect("refs resolve");
            return walk(root, next, target, instance, visited, missing);
        }
        for key in ["oneOf", "anyOf"] {
            for (i, alt) in node
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let fits = match alt.get("required").and_then(Value::as_array) {
                    Some(req) => req
                        .iter()
                        .all(|k| instance.get(k.as_str().unwrap()).is_some()),
                    None => alt.get("$ref").is_some() || alt.get("properties").is_some(),
                };
                if fits && instance.is_object() {
                    walk(
                        root,
                        alt,
                        format!("{pointer}/{key}/{i}"),
                        instance,
                        visited,
                        missing,
                    );
                }
            }
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            visited.insert(pointer.clone());
            for (name, sub) in props {
                match instance.get(name) {
                    Some(v) => walk(
                        root,
                        sub,
                        format!("{pointer}/properties/{name}"),
                        v,
                        visited,
                        missing,
                    ),
                    None => missing.push(format!("{pointer}/properties/{name}")),
                }
                if instance.get(name).is_some() {
                    missing.push(format!("+{pointer}/properties/{name}"));
                }
            }
        }
        if let (Some(sub), Some(map)) = (node.get("additionalProperties"), instance.as_object())
            && sub.is_object()
        {
            for v in map.values() {
                walk(
                    root,
                    sub,
                    format!("{pointer}/additionalProperties"),
                    v,
                    visited,
                    missing,
                );
            }
        }
        if let (Some(sub), Some(items)) = (node.get("items"), instance.as_array()) {
            for v in items {
                walk(root, sub, format!("{pointer}/items"), v, visited, missing);
            }
        }
    }

    /// Every schema location that defines `properties`.
    fn object_schemas(node: &Value, pointer: String, out: &mut BTreeSet<String>) {
        match node {
            Value::Object(map) => {
                if map.get("properties").is_some_and(Value::is_object) {
                    out.insert(pointer.clone());
                }
                for (k, v) in map {
                    if k != "properties" || v.is_object() {
                        object_schemas(v, format!("{pointer}/{k}"), out);
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    object_schemas(v, format!("{pointer}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn model_and_schema_agree() {
        let schema: Value = serde_json::from_str(MANIFEST_SCHEMA).unwrap();
        let m = maximal();
        let value = serde_json::to_value(&m).unwrap();

        // Model → schema: everything the model writes validates (no unknown fields).
        let parsed =
            manifest_from_value(value.clone(), "maximal").unwrap_or_else(|e| panic!("{e}"));
        // Round trip: nothing is lost between the model and JSON.
        assert_eq!(parsed, m);

        // Schema → model: every property the schema defines is written by the model.
        let (mut visited, mut missing) = (BTreeSet::new(), Vec::new());
        walk(
            &schema,
            &schema,
            String::new(),
            &value,
            &mut visited,
            &mut missing,
        );
        // A property counts as written when some instance has it (a wave has one of
        // hosts, labels or percent; the maximal manifest has a wave of each).
        let written: BTreeSet<&str> = missing.iter().filter_map(|m| m.strip_prefix('+')).collect();
        let never: BTreeSet<&str> = missing
            .iter()
            .filter(|m| !m.starts_with('+') && !written.contains(m.as_str()))
            .map(String::as_str)
            .collect();
        assert_eq!(
            never,
            BTreeSet::new(),
            "schema properties the model never writes"
        );
        let mut all = BTreeSet::new();
        object_schemas(&schema, String::new(), &mut all);
        let unvisited: Vec<_> = all.difference(&visited).collect();
        assert!(
            unvisited.is_empty(),
            "schema objects no model value reaches: {unvisited:?}"
        );
    }
}
