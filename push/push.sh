#!/usr/bin/env bash
# push.sh <namespace> [push options]: what a developer types (seed 004's Omni/Ide/push.sh).
# Builds the namespace, caches its artifact in the store, and updates the manifest.
# Uses $DEPLOYER_PUSH, else `push` from PATH, else the one this checkout built
# ($CARGO_TARGET_DIR or target/, release before debug).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: push.sh <namespace> [--service NAME] [--store URL] [--wait] [--dry-run]" >&2
  exit 2
fi
find_push() {
  if [[ -n ${DEPLOYER_PUSH:-} ]]; then echo "$DEPLOYER_PUSH"; return; fi
  if command -v push >/dev/null 2>&1; then command -v push; return; fi
  local here root target
  here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
  root=$(dirname "$here")
  for target in ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR"} "$root/target"; do
    for profile in release debug; do
      if [[ -x $target/$profile/push ]]; then echo "$target/$profile/push"; return; fi
    done
  done
  return 1
}
if ! push=$(find_push); then
  echo "push.sh: the push binary was not found (not on PATH, DEPLOYER_PUSH unset, not built in this checkout); build it with: cargo build --release -p push (from $(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")), or set DEPLOYER_PUSH=/path/to/push" >&2
  exit 127
fi
exec "$push" "$@"
