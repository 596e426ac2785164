//! deploy-manifest: the manifest model, its schema, the object store that holds it, and the
//! versioned edits behind the `deploy-manifest` command. `push` and `deployer-agent`
//! depend on this crate; it is the one place the manifest's shape lives.
//!
//! - [`model`]: the serde types (`Manifest`, `Service`, `Artifact`, …).
//! - [`validate`]: the JSON Schema contract plus cross-field rules; errors name the field.
//! - [`store`]: the [`store::ObjectStore`] trait, `file://` and `s3://` backends.
//! - [`repo`]: versions, compare-and-swap updates, list, rollback.
//! - [`edit`]: the service edits (`add-service`, `update-service`, …) as pure functions.
//! - [`diff`]: what changed between two versions, env values redacted.
//! - [`render`]: human tables for the CLI.
//! - [`status`]: host reports in the store and the fleet view of `deploy-manifest status`.
//! - [`history`]: what each host did (deploys, rollbacks, failures), kept in the store.
//! - [`rollout`]: staged rollouts: policy, waves, the rollout objects, the gate (pure).
//! - [`archive`]: deterministic, hashed packing and safe unpacking of artifact archives.

pub mod archive;
pub mod cli;
pub mod diff;
pub mod edit;
pub mod fsutil;
pub mod history;
pub mod model;
pub mod render;
pub mod repo;
pub mod rollout;
pub mod seen;
pub mod sign;
pub mod status;
pub mod store;
pub mod template;
pub mod validate;

pub use model::Manifest;
pub use repo::Repo;
pub use store::{ObjectStore, Store, StoreError};
pub use validate::Invalid;

/// Exit codes of the `deploy-manifest` command (documented in the README).
pub mod exit {
    pub const OK: i32 = 0;
    /// Anything not listed below (local I/O, an unexpected server answer).
    pub const FAILURE: i32 = 1;
    /// Bad command line or argument.
    pub const USAGE: i32 = 2;
    /// The manifest (or a JSON argument) is invalid, or an object in the store is over its
    /// size cap (a manifest over `DEPLOY_MAX_OBJECT_BYTES`, a download over its declared
    /// size); nothing was written.
    pub const INVALID: i32 = 3;
    /// A version, service or the store's manifest does not exist.
    pub const NOT_FOUND: i32 = 4;
    /// The store cannot be used: unreachable, did not answer in time, no credentials, access
    /// denied, no bucket, or (file://) a symlink inside it.
    pub const STORE: i32 = 5;
    /// Concurrent writers kept winning; nothing was written.
    pub const CONFLICT: i32 = 6;
    /// A signing key is unusable; a version does not verify against the trusted keys (a
    /// writer refuses to build on it); or (agent) a manifest is unsigned, wrongly signed,
    /// not newer than the one applied, or expired.
    pub const UNTRUSTED: i32 = 11;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no manifest at {url}: run `deploy-manifest --store {url} init` first")]
    NotInitialized { url: String },
    #[error("unknown version {version:?} at {url}; `deploy-manifest list` shows the versions")]
    UnknownVersion { version: String, url: String },
    #[error(
        "no service named {name:?} in the current manifest; `deploy-manifest show | jq '.services[].name'` lists them"
    )]
    UnknownService { name: String },
    #[error(
        "no host {host:?}: it has no report in the store and the manifest does not name it; `deploy-manifest status` lists the hosts"
    )]
    UnknownHost { host: String },
    #[error(
        "service {name:?} already exists; change it with `deploy-manifest update-service {name} '<json>'`"
    )]
    DuplicateService { name: String },
    #[error("{0}")]
    BadArgument(String),
    #[error(transparent)]
    Trust(#[from] sign::TrustError),
    #[error("{version} does not verify: {problem}; nothing was written. {remedy}")]
    UntrustedBase {
        version: String,
        problem: String,
        remedy: String,
    },
    #[error(
        "gave up after {attempts} attempts: the manifest kept changing underneath; nothing was written, try again"
    )]
    Conflict { attempts: u32 },
    #[error(
        "gave up after {attempts} attempts to change {key}: other hosts kept writing it; nothing was written, the next run retries"
    )]
    RolloutConflict { key: String, attempts: u32 },
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Store(e) => match e {
                StoreError::InvalidUrl { .. } | StoreError::InvalidKey { .. } => exit::USAGE,
                StoreError::Unreachable { .. }
                | StoreError::Credentials { .. }
                | StoreError::AccessDenied { .. }
                | StoreError::NoSuchBucket { .. }
                | StoreError::Timeout { .. }
                | StoreError::Unsafe { .. } => exit::STORE,
                // An object no honest writer makes: like an invalid manifest.
                StoreError::TooLarge { .. } | StoreError::LargerThanDeclared { .. } => {
                    exit::INVALID
                }
                StoreError::PreconditionFailed { .. } => exit::CONFLICT,
                StoreError::Io { .. } | StoreError::Other { .. } => exit::FAILURE,
            },
            Error::Invalid(_) => exit::INVALID,
            Error::NotInitialized { .. }
            | Error::UnknownVersion { .. }
            | Error::UnknownService { .. }
            | Error::UnknownHost { .. } => exit::NOT_FOUND,
            Error::BadArgument(_) => exit::USAGE,
            Error::Trust(_) | Error::UntrustedBase { .. } => exit::UNTRUSTED,
            Error::DuplicateService { .. } => exit::INVALID,
            Error::Conflict { .. } | Error::RolloutConflict { .. } => exit::CONFLICT,
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]])
        .map(char::from)
        .collect()
}
