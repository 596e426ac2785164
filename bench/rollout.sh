#!/usr/bin/env bash
# Staged rollout at fleet scale: a simulated fleet of HOSTS (default 1000) hosts, each
# running the agent's own rollout code (deployer-agent/examples/rollout_fleet.rs: the
# manifest poll, Agent::gather, the gate, Agent::record; a deploy that succeeds at once in
# place of systemd), against a real S3 server (moto), rolling one service out through 4
# waves (1 %, 10 %, 50 %, 100 %). Printed against the same push to the same fleet without a
# policy (every host deploys at its next poll), measured in the same run: polls from push
# to the last host, store requests per host per poll during the rollout and after it.
#
#   bench/rollout.sh [HOSTS]
set -euo pipefail
cd "$(dirname "$0")/.."
hosts="${1:-1000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deployer-target}"
cargo build --quiet --release -p deployer-agent --example rollout_fleet
source bench/moto.sh
"$CARGO_TARGET_DIR/release/examples/rollout_fleet" s3://bench/rollout "$hosts"
