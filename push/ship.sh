#!/usr/bin/env bash
# ship.sh <namespace> [push options]: push, then wait until every host that runs the service
# serves the new artifact healthy (seed 004's Omni/Ide/ship.sh). Exit codes are push's:
# 0 every host serves it (a service rolled out in waves: every wave has its healthy hosts),
# 8 a host failed the deploy (rolled back), 10 timed out, 12 the rollout was aborted,
# 13 a wave missed its progress deadline and the rollout aborted.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: ship.sh <namespace> [--service NAME] [--store URL] [--timeout 10m]" >&2
  exit 2
fi
exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/push.sh" "$@" --wait
