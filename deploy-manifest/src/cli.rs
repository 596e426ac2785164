//! What every deployer binary does before its own work: logs to stderr, a runtime.

/// Log to stderr (journald picks it up) with the filter in `DEPLOY_LOG`, default `default`.
pub fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEPLOY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}

/// A single-threaded runtime: the binaries do one thing at a time, with I/O concurrency.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts")
}

/// How a writer (`deploy-manifest`, `push`) signs and what it trusts: the same flags and
/// environment in both.
#[derive(Debug, Clone, clap::Args)]
pub struct WriterTrust {
    /// Sign every version written with this ed25519 key file (see `deploy-manifest keygen`).
    #[arg(long, global = true, env = "DEPLOY_SIGNING_KEY", value_name = "FILE")]
    pub signing_key: Option<std::path::PathBuf>,
    /// Public keys (NAME:BASE64 per line) that what a write builds on must be signed by:
    /// the agents' file. Default with a signing key: that key alone.
    #[arg(long, global = true, env = "DEPLOY_TRUSTED_KEYS", value_name = "FILE")]
    pub trusted_keys: Option<std::path::PathBuf>,
    /// How long a signed version stays acceptable to agents, e.g. 30d or 12h.
    #[arg(long, global = true, env = "DEPLOY_MANIFEST_EXPIRES", value_name = "DURATION",
          value_parser = humantime::parse_duration, default_value = "30d")]
    pub expires: std::time::Duration,
}

impl WriterTrust {
    /// A repository over `store` with these settings (keys loaded and checked).
    pub fn repo<S: crate::ObjectStore>(
        &self,
        store: S,
        author: impl Into<String>,
    ) -> Result<crate::Repo<S>, crate::Error> {
        use crate::sign::{PublicKey, SecretKey};
        let signing_key = self
            .signing_key
            .as_deref()
            .map(SecretKey::load)
            .transpose()?;
        let trusted = self
            .trusted_keys
            .as_deref()
            .map(PublicKey::load_all)
            .transpose()?
            .unwrap_or_default();
        Ok(crate::Repo::new(store, author)
            .with_signing_key(signing_key)
            .with_trusted_keys(trusted)
            .with_expiry(self.expires)
            .with_seen(crate::seen::Seen::default_location()))
    }
}
