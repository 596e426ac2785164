#!/usr/bin/env bash
# Install the agent on a non-NixOS host (run as root from a checkout):
#   scripts/install.sh s3://bucket/prefix     # or file:///var/lib/deployer/store
# Builds the release binaries, installs them to /usr/local/bin, installs deployer.service and
# deployer.timer, writes /etc/deployer/deployer.env (mode 600) if absent, and starts the timer.
set -euo pipefail
cd "$(dirname "$0")/.."
store="${1:?usage: scripts/install.sh STORE_URL}"
cargo build --release --locked -p deployer-agent -p deploy-manifest -p push
target="${CARGO_TARGET_DIR:-target}/release"
install -m 755 "$target/deployer-agent" "$target/deploy-manifest" "$target/push" /usr/local/bin/
install -m 644 packaging/deployer.service packaging/deployer.timer /etc/systemd/system/
install -d -m 755 /etc/deployer /var/lib/deployer
install -d -m 700 /var/lib/deployer-secrets
if [[ ! -e /etc/deployer/deployer.env ]]; then
  install -m 600 /dev/null /etc/deployer/deployer.env
  printf 'DEPLOY_STORE=%s\n# AWS_REGION=…\n# AWS_ACCESS_KEY_ID=…\n# AWS_SECRET_ACCESS_KEY=…\n' "$store" > /etc/deployer/deployer.env
fi
systemctl daemon-reload
systemctl enable --now deployer.timer
echo "installed; deploy now with: systemctl start deployer"
