#!/usr/bin/env bash
# Agent benchmarks, each printed with a reference measured in the same run:
#   1. idle poll: requests, wall, CPU, peak RSS of `deployer-agent run --once` when nothing
#      changed, against `curl` of the same manifest.json (SigV4-signed) from the same server;
#   2. fetch + verify + unpack: see bench/fetch.sh (against the streaming reference);
#   3. plan over a 1,000-service manifest against `jq` reading it;
#   4. a no-op apply of 100 deployed services: time and systemd calls that change anything;
#   5. push-to-serving latency of a small service with a forced run.
#
#   bench/agent.sh [SIZE_MIB]     (needs root; runs beside a private systemd user manager;
#                                  SIZE_MIB sizes the deployed artifact, default 512)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${SDSANDBOX_DIR:-}" ]]; then
  exec bash scripts/systemd-sandbox.sh -- bash "$0" "$@"
fi
size_mib="${1:-512}"
source bench/lib.sh
source bench/moto.sh
measure() {  # "<wall> <user+sys> <peak KiB>" of a command (its stdout to $work/out)
  /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" > "$work/out"
  read -r e u s m < "$work/time"; echo "$e $(calc "$u + $s") $m"
}
mkdir -p "$work/secrets" && chmod 700 "$work/secrets"
agent=(deployer-agent --user --host bench --state-dir "$work/state" --secrets-dir "$work/secrets")

# --- 1 and 2: one S3 store with a service whose artifact is SIZE_MIB of random data.
export DEPLOY_STORE=s3://bench/deploy
deploy-manifest init >/dev/null
big=$(free=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'); echo "$free")
deploy-manifest add-service "{\"name\": \"big\", \"namespace\": \"Bench/Big\", \"artifact\": {\"storePath\": \"/nix/store/placeholder\"}, \"hosts\": [\"bench\"], \"exec\": {\"command\": \"bin/hello\"}, \"env\": {\"PORT\": \"$big\"}, \"health\": {\"http\": {\"path\": \"/healthz\", \"port\": $big}}}" >/dev/null
mkdir -p "$work/repo/out/bin"
cp examples/hello/bin/hello "$work/repo/out/bin/hello"; echo big > "$work/repo/out/VERSION"
head -c "$((size_mib << 20))" /dev/urandom > "$work/repo/out/blob"
printf '[namespaces."Bench/Big"]\ncommand = "true"\noutput = "out"\n' > "$work/repo/deploy.toml"
(cd "$work/repo" && push.sh Bench/Big --json) > "$work/push.json" 2>/dev/null


"${agent[@]}" run --once >/dev/null 2>&1            # deploy it
"${agent[@]}" run --once >/dev/null 2>&1            # settle the report heartbeat
read -r i_wall i_cpu i_rss < <(measure "${agent[@]}" --json run --once)
requests=$(jq .storeRequests "$work/out")
read -r c_wall c_cpu c_rss < <(measure "${s3curl[@]}" -o /dev/null "http://127.0.0.1:$port/bench/deploy/manifest.json")

# --- 3: plan over 1,000 services (file:// store).
export DEPLOY_STORE="file://$work/plan-store"
deploy-manifest init >/dev/null
python3 - "$work/services.json" <<'PY'
import json, sys
json.dump({"services": [{"name": f"svc-{i:04d}", "artifact": {"storePath": f"/nix/store/{i:032d}-svc"},
           "hosts": ["bench"], "env": {"PORT": str(20000 + i)},
           "http": {"domain": f"svc-{i}.test", "internalPort": 20000 + i}} for i in range(1000)]}, open(sys.argv[1], "w"))
PY
jq -c '.services' "$work/services.json" > /dev/null
manifest="$work/plan-store/manifest.json"
jq --slurpfile s "$work/services.json" '.services = $s[0].services' "$manifest" > "$work/m.json"
cp "$work/m.json" "$manifest"
read -r p_wall p_cpu p_rss < <(measure "${agent[@]}" --json plan)
steps=$(jq ".steps | length" "$work/out")
read -r j_wall j_cpu j_rss < <(measure jq length "$manifest")

# --- 4: no-op apply of 100 deployed services (file:// store, tiny services).
export DEPLOY_STORE="file://$work/noop-store"
deploy-manifest init >/dev/null
mkdir -p "$work/tiny/out/bin"; printf '#!/bin/sh\nexec sleep infinity\n' > "$work/tiny/out/bin/tiny"; chmod +x "$work/tiny/out/bin/tiny"
printf '[namespaces."Bench/Tiny"]\ncommand = "true"\noutput = "out"\n' > "$work/tiny/deploy.toml"
deploy-manifest add-service '{"name": "tiny-000", "namespace": "Bench/Tiny", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["bench"], "exec": {"command": "bin/tiny"}}' >/dev/null
(cd "$work/tiny" && push.sh Bench/Tiny --json) > "$work/tiny.json" 2>/dev/null
artifact=$(jq -c .artifact "$work/tiny.json")
python3 - "$work/noop-store/manifest.json" "$artifact" <<'PY'
import json, sys
path, artifact = sys.argv[1], json.loads(sys.argv[2])
m = json.load(open(path))
m["services"] = [{"name": f"tiny-{i:03d}", "artifact": artifact, "hosts": ["bench"], "exec": {"command": "bin/tiny"}} for i in range(100)]
m["summary"] = "100 tiny services"
json.dump(m, open(path, "w"))
PY
printf 'settle = "100ms"\n' > "$work/agent.toml"
rm -rf "$work/state"
"${agent[@]}" --config "$work/agent.toml" run --once >/dev/null 2>&1
deploy-manifest add-service '{"name": "elsewhere", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["other"]}' >/dev/null
read -r n_wall n_cpu n_rss < <(measure "${agent[@]}" --config "$work/agent.toml" --json run --once)
changes=$(jq .systemdChanges "$work/out"); kept=$(jq '[.services[] | select(.outcome == "kept")] | length' "$work/out")

# --- 5: push-to-serving latency (small service, forced run).
hello_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
deploy-manifest add-service "{\"name\": \"hello\", \"namespace\": \"Examples/Hello.py\", \"artifact\": {\"storePath\": \"/nix/store/placeholder\"}, \"hosts\": [\"bench\"], \"env\": {\"PORT\": \"$hello_port\"}, \"health\": {\"http\": {\"path\": \"/healthz\", \"port\": $hello_port}, \"interval\": \"50ms\"}}" >/dev/null
t0=$(date +%s.%N)
(cd examples && push.sh Examples/Hello.py >/dev/null 2>&1)
t1=$(date +%s.%N)
"${agent[@]}" --config "$work/agent.toml" run --once > /dev/null 2> "$work/run.log"
t2=$(date +%s.%N)
curl -sf "http://127.0.0.1:$hello_port/" >/dev/null
start=$(sed 's/\x1b\[[0-9;]*m//g' "$work/run.log" | sed -n 's/.*healthy elapsed=\([0-9.]*\)\(m\?s\).*/\1 \2/p' | tail -1)
start_s=$(python3 -c "v,u='$start'.split(); print(float(v)/(1000 if u=='ms' else 1))")

printf '\n%-44s %9s %9s %10s\n' "" wall cpu "peak RSS"
printf '%-44s %8.3fs %8.3fs %7d KiB   store requests: %s\n' "idle poll: deployer-agent run --once" "$i_wall" "$i_cpu" "$i_rss" "$requests"
printf '%-44s %8.3fs %8.3fs %7d KiB   ratio %.1f (agent/curl)\n' "  reference: curl of manifest.json" "$c_wall" "$c_cpu" "$c_rss" "$(calc "max($i_wall,0.001)/max($c_wall,0.001)")"
printf '%-44s %8.3fs %8.3fs %7d KiB   %s steps\n' "plan over 1,000 services" "$p_wall" "$p_cpu" "$p_rss" "$steps"
printf '%-44s %8.3fs %8.3fs %7d KiB   ratio %.1f (plan/jq)\n' "  reference: jq reading the manifest" "$j_wall" "$j_cpu" "$j_rss" "$(calc "max($p_wall,0.001)/max($j_wall,0.001)")"
printf '%-44s %8.3fs %8.3fs %7d KiB   %s kept, %s systemd calls that change anything\n' "no-op apply of 100 deployed services" "$n_wall" "$n_cpu" "$n_rss" "$kept" "$changes"
printf '%-44s %8.3fs   (push %.3fs + forced run %.3fs, of which the service took %.3fs to answer)\n' "push-to-serving, small service" "$(calc "$t2-$t0")" "$(calc "$t1-$t0")" "$(calc "$t2-$t1")" "$start_s"
printf '%-44s %8.3fs\n' "  excluding the service's own start" "$(calc "$t2-$t0-$start_s")"
