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
