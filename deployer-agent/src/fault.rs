//! Fault injection for the tests and benchmarks: `DEPLOYER_FAULT=<step>:kill` makes the
//! agent SIGKILL itself when it reaches `<step>`, `DEPLOYER_FAULT=<step>:pause=<ms>` makes it
//! wait there (so a test can cut the store or fill the disk at that exact point). Steps:
//! `manifest` (fetched and validated), `fetched` (artifact on disk), `unit-written`,
//! `restarted`, `healthy`, `saved` (state.json written after a service), `publish` (the
//! run done, its report not yet written; the run lock is still held). Unset, it costs
//! one environment lookup per process.

use std::sync::LazyLock;
use std::time::Duration;

static FAULT: LazyLock<Option<(String, String)>> = LazyLock::new(|| {
    let v = std::env::var("DEPLOYER_FAULT").ok()?;
    let (step, action) = v.split_once(':')?;
    Some((step.to_owned(), action.to_owned()))
});

pub fn point(step: &str) {
    let Some((at, action)) = FAULT.as_ref() else {
        return;
    };
    if at != step {
        return;
    }
    if action == "kill" {
        tracing::warn!(step, "DEPLOYER_FAULT: killing this process");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        std::process::abort();
    }
    if let Some(ms) = action.strip_prefix("pause=").and_then(|m| m.parse().ok()) {
        tracing::warn!(step, ms, "DEPLOYER_FAULT: pausing");
        std::thread::sleep(Duration::from_millis(ms));
    }
}
