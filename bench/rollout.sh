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
moto="${DEPLOYER_MOTO:-$PWD/.venv-s3/bin/moto_server}"
[[ -x "$moto" ]] || { echo "no moto server: run scripts/test.sh first" >&2; exit 2; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$moto" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port" && break; sleep 0.1; done
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_EC2_METADATA_DISABLED=true
curl -s --aws-sigv4 "aws:amz:us-east-1:s3" --user "bench:bench" -X PUT "http://127.0.0.1:$port/bench" >/dev/null
"$CARGO_TARGET_DIR/release/examples/rollout_fleet" s3://bench/rollout "$hosts"
