#!/usr/bin/env bash
# `deploy-manifest status` over synthetic host reports, each figure against a reference
# measured in the same run:
#   1. HOSTS reports (default 100,000) in a file:// store: wall time and peak RSS of
#      `status --json` and of the table, against `cat` of the same files;
#   2. S3_HOSTS reports (default 10,000) on moto: HTTP requests (counted in moto's access
#      log) and wall time of a first `status --json` and of a second one over the unchanged
#      fleet (reports read from the ETag cache), against `curl` of the LIST pages alone.
#
#   bench/status.sh [HOSTS] [S3_HOSTS]
set -euo pipefail
cd "$(dirname "$0")/.."
hosts="${1:-100000}"
s3_hosts="${2:-10000}"
source bench/lib.sh
export MOTO_LOG="$work/moto.log"
source bench/moto.sh
measure() {  # prints "<seconds> <peak KiB>"
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >/dev/null
  cat "$work/time"
}
declare_fleet() {
  "$bin/deploy-manifest" init >/dev/null
  "$bin/deploy-manifest" add-service '{"name": "api", "artifact": {"storePath": "/nix/store/00000000000000000000000000000000-api"}, "hosts": []}' >/dev/null
  "$bin/deploy-manifest" add-service '{"name": "web", "artifact": {"storePath": "/nix/store/00000000000000000000000000000000-web"}, "hosts": []}' >/dev/null
}
# Reports as agents write them: two services, one host in 97 unhealthy.
reports() {  # DIR N: N reports as files in DIR
  python3 - "$1" "$2" <<'PY'
import json, os, sys, datetime
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
for i in range(n):
    host = f"host-{i:06d}"
    svc = lambda name, healthy: {"artifact": {"storePath": f"/nix/store/00000000000000000000000000000000-{name}"},
                                 "health": "healthy" if healthy else "unhealthy", "deployedAt": now}
    report = {"schemaVersion": 1, "host": host, "agentVersion": "0.1.0", "reportedAt": now,
              "intervalSeconds": 300, "lastPoll": now, "lastSuccess": now,
              "services": {"api": svc("api", i % 97 != 0), "web": svc("web", True)}}
    with open(os.path.join(out, host + ".json"), "w") as f:
        json.dump(report, f, indent=2)
PY
}

# --- 1: file://, HOSTS reports.
export DEPLOY_STORE="file://$work/store"
declare_fleet
reports "$work/store/status" "$hosts"
read -r cat_s cat_kb < <(measure sh -c "find '$work/store/status' -name '*.json' -print0 | xargs -0 cat")
read -r json_s json_kb < <(measure "$bin/deploy-manifest" status --json)
read -r table_s table_kb < <(measure "$bin/deploy-manifest" status)
"$bin/deploy-manifest" status --json | python3 -c "import json,sys; n=len(json.load(sys.stdin)); assert n == $hosts, n"

# --- 2: S3 (moto), S3_HOSTS reports, uploaded with the venv's boto3.
export DEPLOY_STORE=s3://bench/deploy DEPLOY_CACHE_DIR="$work/cache"
declare_fleet
reports "$work/s3-reports" "$s3_hosts"
"$(dirname "$moto")/python" - "$work/s3-reports" "$AWS_ENDPOINT_URL" <<'PY'
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
s3 = boto3.client("s3", endpoint_url=sys.argv[2])
names = os.listdir(sys.argv[1])
def put(name):
    with open(os.path.join(sys.argv[1], name), "rb") as f:
        s3.put_object(Bucket="bench", Key=f"deploy/status/{name}", Body=f.read())
list(ThreadPoolExecutor(16).map(put, names))
PY
requests() { grep -c ' HTTP/1\.' "$MOTO_LOG" || true; }
r0=$(requests)
read -r s3a_s s3a_kb < <(measure "$bin/deploy-manifest" status --json)
r1=$(requests)
read -r s3b_s s3b_kb < <(measure "$bin/deploy-manifest" status --json)
r2=$(requests)
list_ref() {  # the LIST pages alone, with curl
  local token="" args
  while :; do
    args=(--data-urlencode "list-type=2" --data-urlencode "prefix=deploy/status/")
    [[ -n "$token" ]] && args+=(--data-urlencode "continuation-token=$token")
    token=$("${s3curl[@]}" -G "${args[@]}" "http://127.0.0.1:$port/bench" | python3 -c "
import sys, xml.etree.ElementTree as E
t = E.parse(sys.stdin).getroot(); ns = {'s': t.tag.split('}')[0][1:]}
n = t.find('s:NextContinuationToken', ns); print(n.text if n is not None else '')")
    [[ -z "$token" ]] && break
  done
}
r3=$(requests)
read -r list_s list_kb < <(measure bash -c "$(declare -f list_ref); s3curl=(${s3curl[*]}); port=$port; list_ref")
r4=$(requests)

ratio() { python3 -c "print(f'{max($1, 0.001) / max($2, 0.001):.2f}')"; }
printf '%s host reports on file:// (%s MiB)\n' "$hosts" "$(du -sm "$work/store/status" | cut -f1)"
printf '  cat of every report          %6.2f s  %7d KiB peak\n' "$cat_s" "$cat_kb"
printf '  status --json                %6.2f s  %7d KiB peak   ratio %s (status/cat)\n' "$json_s" "$json_kb" "$(ratio "$json_s" "$cat_s")"
printf '  status (table)               %6.2f s  %7d KiB peak   ratio %s (status/cat)\n' "$table_s" "$table_kb" "$(ratio "$table_s" "$cat_s")"
printf '%s host reports on S3 (moto)\n' "$s3_hosts"
printf '  first status --json          %6.2f s  %7d requests\n' "$s3a_s" "$((r1 - r0))"
printf '  second, fleet unchanged      %6.2f s  %7d requests   ratio %s (second/LIST alone)\n' "$s3b_s" "$((r2 - r1))" "$(ratio "$s3b_s" "$list_s")"
printf '  reference: the LIST pages    %6.2f s  %7d requests\n' "$list_s" "$((r4 - r3))"
