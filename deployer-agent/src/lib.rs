//! deployer-agent: the agent on each host. One run ([`reconcile::Agent::run_once`]) polls
//! the manifest with one conditional GET, computes a plan that is the whole decision
//! ([`plan`]), and executes its steps against the host ([`host::Host`]): fetch and verify
//! artifacts, write units and apply them over D-Bus, gate on health, switch routes, undo
//! what fails as the step says, and record it all in `state.json` ([`state`]).
//!
//! # Layout
//!
//! - [`reconcile`]: the run. `poll` (fetch + trust, shared by run, plan and fetch), `apply`
//!   (executes a plan's steps, decides nothing), `deploy` (the deploy step and its recovery),
//!   `rollout` (the staged rollouts' objects: read before the plan, written after),
//!   `publish` (report and metrics), the loop.
//! - [`rollout`]: what a host read of a staged rollout and the gate it gives (plan data).
//! - [`plan`]: pure decisions over the manifest, the state and what the host shows.
//! - [`host`]: the `Host` trait, every side effect; `system` (the real one), `memory`
//!   (tests).
//! - [`systemd`] (the only D-Bus code), [`unit`](mod@unit) (unit files, every value checked or
//!   escaped), [`health`] (probes), [`fetch`] (artifacts and Nix closures), [`secrets`]
//!   (a service's own secrets only), [`infra`] (`daemon`: presets and custom daemons, `postgres`,
//!   `redis`, `app`: what a service gets), [`proxy`] (`caddy`, `nginx`), [`resp`] (a small Redis client).
//! - [`evidence`]: a failed unit's log tail, secrets masked and bounded. [`notify`]: the
//!   notification command and webhook.
//! - [`names`]: every generated name. [`state`]: state.json and the run lock.
//!   [`report`]: the host report and metrics. [`config`]: settings. [`fault`]: the
//!   fault-injection hook. [`accounts`]: system users and groups (NSS).

pub mod accounts;
pub mod config;
pub mod evidence;
pub mod fault;
pub mod fetch;
pub mod health;
pub mod host;
pub mod infra;
pub mod names;
pub mod notify;
pub mod plan;
pub mod proxy;
pub mod reconcile;
#[cfg(test)]
mod reconcile_tests;
pub mod report;
pub mod resp;
pub mod rollout;
#[cfg(test)]
mod rollout_tests;
pub mod secrets;
pub mod state;
pub mod systemd;
pub mod unit;

use deploy_manifest::exit;

/// Every HTTP client of the agent (health probes, Caddy's admin API, webhooks) starts here:
/// TLS (for https:// webhooks) through rustls with ring, the provider the S3 client uses
/// too, installed once per process.
pub(crate) fn http_client() -> reqwest::ClientBuilder {
    static TLS: std::sync::Once = std::sync::Once::new();
    TLS.call_once(|| {
        // Refused only if another provider was installed first: that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// An error and its causes, `outer: inner: …` (reqwest's own message is only the outer
/// one: "error sending request for url …", without why).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Manifest(#[from] deploy_manifest::Error),
    #[error(transparent)]
    Systemd(#[from] systemd::SystemdError),
    #[error(transparent)]
    Unit(#[from] unit::UnitError),
    #[error("{service}: secrets file {path}: {detail}")]
    Secrets {
        service: String,
        path: String,
        detail: String,
    },
    #[error("artifact {artifact}: {detail}")]
    Fetch { artifact: String, detail: String },
    #[error("health check failed: {0}")]
    Unhealthy(String),
    #[error("state {path}: {detail}")]
    State { path: String, detail: String },
    #[error("another run holds {lock}; try again when it is done")]
    Busy { lock: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error("infrastructure {what}: {detail}")]
    Infra { what: String, detail: String },
    #[error("release command failed: {0}; the previous generation keeps running")]
    Release(String),
    #[error("{0}")]
    ForeignUnit(String),
    #[error("no free port in {first}-{last} for a new generation; widen --port-range")]
    NoFreePort { first: u16, last: u16 },
}

impl From<deploy_manifest::StoreError> for AgentError {
    fn from(e: deploy_manifest::StoreError) -> Self {
        AgentError::Manifest(e.into())
    }
}

impl From<deploy_manifest::Invalid> for AgentError {
    fn from(e: deploy_manifest::Invalid) -> Self {
        AgentError::Manifest(e.into())
    }
}

/// Exit code when some services failed to deploy (the others were applied), or the proxy
/// routes could not be applied (retried on the next run).
pub const EXIT_SERVICES_FAILED: i32 = 8;
/// Exit code when another run holds the lock.
pub const EXIT_BUSY: i32 = 9;

impl AgentError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            what: what.into(),
            source,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Manifest(e) => e.exit_code(),
            AgentError::Busy { .. } => EXIT_BUSY,
            _ => exit::FAILURE,
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("error sending request")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_chain_says_why() {
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(
            super::error_chain(&e),
            "error sending request: connection refused"
        );
    }
}
