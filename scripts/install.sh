#!/usr/bin/env bash
# Install the agent on a non-NixOS host (run as root from a checkout):
#   scripts/install.sh s3://bucket/prefix     # or file:///var/lib/deployer/store
#   scripts/install.sh --bin-dir DIR STORE    # install DIR's binaries instead of building
# Builds the release binaries (or takes deployer-agent, deploy-manifest and push from
# --bin-dir), installs them to /usr/local/bin, installs deployer.service and deployer.timer
# unchanged to /etc/systemd/system, writes /etc/deployer/deployer.env (mode 600) if absent,
# and starts the timer. Idempotent: run it again to upgrade; deployer.env is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir=
if [[ ${1:-} == --bin-dir ]]; then
  bin_dir=${2:?--bin-dir needs a directory}
  shift 2
fi
store="${1:?usage: scripts/install.sh [--bin-dir DIR] STORE_URL}"
[[ $(id -u) == 0 ]] || { echo "install.sh: run as root (it installs to /usr/local and /etc)" >&2; exit 2; }
if [[ -z $bin_dir ]]; then
  echo "install.sh: building the release binaries (a few minutes on a cold machine)" >&2
  cargo build --release --locked -p deployer-agent -p deploy-manifest -p push
  bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
for b in deployer-agent deploy-manifest push; do
  [[ -x $bin_dir/$b ]] || { echo "install.sh: $bin_dir/$b: no such executable" >&2; exit 2; }
done
install -m 755 "$bin_dir/deployer-agent" "$bin_dir/deploy-manifest" "$bin_dir/push" /usr/local/bin/
install -m 644 packaging/deployer.service packaging/deployer.timer /etc/systemd/system/
install -d -m 755 /etc/deployer /var/lib/deployer
install -d -m 700 /var/lib/deployer-secrets
if [[ ! -e /etc/deployer/deployer.env ]]; then
  install -m 600 /dev/null /etc/deployer/deployer.env
  printf 'DEPLOY_STORE=%s\n# DEPLOYER_HOST=%s\n# AWS_REGION=…\n# AWS_ACCESS_KEY_ID=…\n# AWS_SECRET_ACCESS_KEY=…\n' \
    "$store" "$(hostname)" > /etc/deployer/deployer.env
fi
systemctl daemon-reload
systemctl enable --now deployer.timer
echo "installed; deploy now with: systemctl start deployer"
