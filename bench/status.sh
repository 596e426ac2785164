#!/usr/bin/env bash
# `deploy-manifest status` over N synthetic host reports (default 10,000) in a file:// store:
# wall time and peak RSS, against `cat` of the same files measured in the same run.
#
#   bench/status.sh [HOSTS]
set -euo pipefail
cd "$(dirname "$0")/.."
hosts="${1:-10000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deployer-target}"
cargo build --quiet --release -p deploy-manifest
bin="$CARGO_TARGET_DIR/release/deploy-manifest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export DEPLOY_STORE="file://$work/store"
"$bin" init >/dev/null
"$bin" add-service '{"name": "api", "artifact": {"storePath": "/nix/store/00000000000000000000000000000000-api"}, "hosts": []}' >/dev/null
"$bin" add-service '{"name": "web", "artifact": {"storePath": "/nix/store/00000000000000000000000000000000-web"}, "hosts": []}' >/dev/null
python3 - "$work/store/status" "$hosts" <<'PY'
import json, os, sys, datetime
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
for i in range(n):
    host = f"host-{i:05d}"
    svc = lambda name, healthy: {"artifact": {"storePath": f"/nix/store/00000000000000000000000000000000-{name}"},
                                 "health": "healthy" if healthy else "unhealthy", "deployedAt": now}
    report = {"schemaVersion": 1, "host": host, "agentVersion": "0.1.0", "reportedAt": now,
              "intervalSeconds": 300, "lastPoll": now, "lastSuccess": now,
              "services": {"api": svc("api", i % 97 != 0), "web": svc("web", True)}}
    with open(os.path.join(out, host + ".json"), "w") as f:
        json.dump(report, f, indent=2)
PY
measure() {  # prints "<seconds> <peak KiB>"
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null
  cat "$work/time"
}
read -r cat_s cat_kb < <(measure sh -c "find '$work/store/status' -name '*.json' -print0 | xargs -0 cat")
read -r json_s json_kb < <(measure "$bin" status --json)
read -r table_s table_kb < <(measure "$bin" status)
ratio() { python3 -c "print(f'{max($1, 0.001) / max($cat_s, 0.001):.1f}')"; }
printf '%s host reports (%s MiB)\n' "$hosts" "$(du -sm "$work/store/status" | cut -f1)"
printf 'cat of every report        %6.2f s  %7d KiB peak\n' "$cat_s" "$cat_kb"
printf 'status --json              %6.2f s  %7d KiB peak   ratio %s (status/cat)\n' "$json_s" "$json_kb" "$(ratio "$json_s")"
printf 'status (table)             %6.2f s  %7d KiB peak   ratio %s (status/cat)\n' "$table_s" "$table_kb" "$(ratio "$table_s")"
