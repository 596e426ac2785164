//! End-to-end tests: the workspace's binaries against real servers on loopback.
//! One test binary (ripgrep-style); one module per capability.

mod agent;
mod core;
mod faults;
mod fixture;
mod fleet;
mod infra;
mod limits;
mod manifest_cli;
mod manifest_concurrency;
mod observe;
mod packaging;
mod probes;
mod proxy;
mod push;
mod rollout;
mod scale;
mod system;
mod trust;
