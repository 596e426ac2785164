#!/usr/bin/env bash
# push.sh <namespace> [push options]: what a developer types (seed 004's Omni/Ide/push.sh).
# Builds the namespace, caches its artifact in the store, and updates the manifest.
# Uses `push` from PATH, or $DEPLOYER_PUSH.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: push.sh <namespace> [--service NAME] [--store URL] [--dry-run]" >&2
  exit 2
fi
exec "${DEPLOYER_PUSH:-push}" "$@"
