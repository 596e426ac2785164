#!/usr/bin/env bash
# A run's cost against the number of services (issue 18), on a private systemd user manager,
# file:// store, release build. Each figure beside a reference measured in the same run:
#   1. first deploy of N small services (default 1,000), against systemd itself doing the same
#      work: the same unit files written, one daemon-reload, `systemctl start` of all of them;
#   2. idle poll (nothing changed) of a host with N services against a host with 10, the two
#      run alternately ROUNDS times (default 11), median of each and of the ratios;
#   3. no-op apply (the manifest changed elsewhere, every service kept) at N against 10, the
#      same way; fsyncs and state.json writes counted;
#   4. removing the N services, against `systemctl stop` of the reference's units, their
#      files removed and one daemon-reload.
# With BEFORE=<git revision>, that revision's agent is built too (its own worktree and target
# dir) and deploys and removes the same N services first, for a before/after ratio.
#
#   bench/scale.sh [N] [ROUNDS]        (needs root; runs beside a private systemd user manager)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${SDSANDBOX_DIR:-}" ]]; then
  exec bash scripts/systemd-sandbox.sh -- bash "$0" "$@"
fi
n="${1:-1000}"
rounds="${2:-11}"
source bench/lib.sh
units_dir="$XDG_RUNTIME_DIR/systemd/user"

before_bin=""
if [[ -n "${BEFORE:-}" ]]; then
  git worktree add --detach "$work/before" "$BEFORE" >/dev/null 2>&1
  (cd "$work/before" && CARGO_TARGET_DIR="$HOME/.cache/deployer-target-before" \
    cargo build --quiet --release -p deployer-agent)
  before_bin="$HOME/.cache/deployer-target-before/release/deployer-agent"
  trap 'git worktree remove --force "$work/before" >/dev/null 2>&1; rm -rf "$work"' EXIT
fi

# One tiny artifact, N services of host "big" and 10 of host "small" using it.
export DEPLOY_STORE="file://$work/store"
deploy-manifest init >/dev/null
mkdir -p "$work/tiny/out/bin" "$work/secrets" && chmod 700 "$work/secrets"
printf '#!/bin/sh\nexec sleep infinity\n' > "$work/tiny/out/bin/tiny"; chmod +x "$work/tiny/out/bin/tiny"
printf '[namespaces."Bench/Tiny"]\ncommand = "true"\noutput = "out"\n' > "$work/tiny/deploy.toml"
deploy-manifest add-service '{"name": "tiny", "namespace": "Bench/Tiny", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["nowhere"], "exec": {"command": "bin/tiny"}}' >/dev/null
(cd "$work/tiny" && push.sh Bench/Tiny --json) > "$work/tiny.json" 2>/dev/null
artifact=$(jq -c .artifact "$work/tiny.json")
declare_services() {  # declare_services BIG SMALL: that many services on hosts big and small
  python3 - "$work/store/manifest.json" "$artifact" "$1" "$2" <<'PY'
import json, sys
path, artifact, big, small = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = json.load(open(path))
svc = lambda name, host: {"name": name, "artifact": artifact, "hosts": [host], "exec": {"command": "bin/tiny"}}
m["services"] = [svc(f"big-{i:05d}", "big") for i in range(big)] + [svc(f"small-{i:02d}", "small") for i in range(small)]
m["summary"] = f"{big} + {small} tiny services"
json.dump(m, open(path, "w"))
PY
}
printf 'settle = "100ms"\n' > "$work/agent.toml"
# Two agents beside one manager, each with its own unit directory (both on the manager's
# search path), so that neither takes the other's units for its own.
unit_dir() { if [[ $1 == big ]]; then echo "$units_dir"; else echo "$SDSANDBOX_UNIT_DIR"; fi; }
agent() {  # agent HOST [BINARY] ARGS...: the agent as host HOST
  local host=$1; shift
  local binary=deployer-agent
  if [[ "${1:-}" == /* ]]; then binary=$1; shift; fi
  "$binary" --user --host "$host" --config "$work/agent.toml" --state-dir "$work/state-$host" \
    --secrets-dir "$work/secrets" --unit-dir "$(unit_dir "$host")" "$@"
}
timed() {  # seconds a command takes (its output to $work/out)
  local t0 t1; t0=$(now); "$@" > "$work/out" 2> "$work/err" || true; t1=$(now); calc "$t1 - $t0"
}

# --- before (optional): the given revision deploys and removes the N services.
if [[ -n "$before_bin" ]]; then
  declare_services "$n" 0
  b_deploy=$(timed agent big "$before_bin" run --once)
  declare_services 0 0
  b_remove=$(timed agent big "$before_bin" run --once)
  rm -rf "$work/state-big"
fi

# --- 1: first deploy of N services (and 10 on the small host).
declare_services "$n" 10
deploy=$(timed agent big --json run --once)
deployed=$(jq '[.services[] | select(.outcome == "deployed")] | length' "$work/out" 2>/dev/null || echo 0)
[[ "$deployed" != 0 ]] || { echo "the first deploy failed:" >&2; tail -20 "$work/err" >&2; exit 1; }
agent small run --once >/dev/null 2>&1
# The reference: the same unit files under other names, one reload, one `systemctl start`.
for i in $(seq -f '%05g' 0 $((n - 1))); do
  # Without our header: not a unit of the agent's (it would retire it).
  sed "1d; s/big-00000/ref-$i/g" "$units_dir/big-00000.service" > "$units_dir/ref-$i.service"
done
ref_units=$(seq -f 'ref-%05g.service' 0 $((n - 1)))
t0=$(now)
systemctl --user daemon-reload
# shellcheck disable=SC2086
systemctl --user start $ref_units
t1=$(now)
ref_deploy=$(calc "$t1 - $t0")
ref_active=$(systemctl --user list-units --state=active 'ref-*' --no-legend | wc -l)

# --- 2 and 3: idle poll and no-op apply, N against 10, alternately.
agent big run --once >/dev/null 2>&1; agent small run --once >/dev/null 2>&1   # reports settled
python3 - "$rounds" "$work" "$units_dir" "$SDSANDBOX_UNIT_DIR" <<'PY'
import json, statistics, subprocess, sys, time
rounds, work = int(sys.argv[1]), sys.argv[2]
unit_dirs = {"big": sys.argv[3], "small": sys.argv[4]}
def agent(host, *args):
    argv = ["deployer-agent", "--user", "--host", host, "--config", f"{work}/agent.toml",
            "--state-dir", f"{work}/state-{host}", "--secrets-dir", f"{work}/secrets",
            "--unit-dir", unit_dirs[host], "--json", "run", "--once"]
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True)
    took = time.perf_counter() - t0
    return took, json.loads(out.stdout)
def touch(i):
    subprocess.run(["deploy-manifest", "add-service", json.dumps(
        {"name": f"elsewhere-{i}", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["other"]})],
        check=True, capture_output=True)
result = {"idle": [], "noop": []}
for i in range(rounds):
    big, rb = agent("big"); small, rs = agent("small")
    assert rb["unchanged"] and rs["unchanged"], (rb, rs)
    result["idle"].append((big, small, rb["systemdCalls"], rb["stateWrites"], rb["storeRequests"]))
    touch(i)
    big, rb = agent("big"); small, rs = agent("small")
    assert not rb["unchanged"] and rb["systemdChanges"] == 0, rb
    result["noop"].append((big, small, rb["systemdCalls"], rb["stateWrites"], rb["storeRequests"]))
json.dump(result, open(f"{work}/alternate.json", "w"))
PY
# fsyncs of one no-op apply at N (strace counts; its own run, not timed).
deploy-manifest add-service '{"name": "elsewhere-strace", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": ["other"]}' >/dev/null
strace -f -c -e trace=fsync,fdatasync -o "$work/strace" \
  deployer-agent --user --host big --config "$work/agent.toml" --state-dir "$work/state-big" \
  --secrets-dir "$work/secrets" --unit-dir "$units_dir" run --once >/dev/null 2>&1
fsyncs=$(awk '$NF ~ /^(fsync|fdatasync)$/ {s += $4} END {print s + 0}' "$work/strace")

# --- 4: removal of the N services, against the reference's units stopped and removed.
declare_services 0 10
remove=$(timed agent big --json run --once)
removed=$(jq '[.services[] | select(.outcome == "removed")] | length' "$work/out")
t0=$(now)
# shellcheck disable=SC2086
systemctl --user stop $ref_units
rm -f "$units_dir"/ref-*.service
systemctl --user daemon-reload
t1=$(now)
ref_remove=$(calc "$t1 - $t0")

python3 - "$work/alternate.json" "$n" "$deploy" "$deployed" "$ref_deploy" "$ref_active" \
  "$remove" "$removed" "$ref_remove" "$fsyncs" "${b_deploy:-}" "${b_remove:-}" "${BEFORE:-}" <<'PY'
import json, statistics as st, sys
alt = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
deploy, deployed, ref_deploy, ref_active = float(sys.argv[3]), sys.argv[4], float(sys.argv[5]), sys.argv[6]
remove, removed, ref_remove, fsyncs = float(sys.argv[7]), sys.argv[8], float(sys.argv[9]), sys.argv[10]
b_deploy, b_remove, before = sys.argv[11], sys.argv[12], sys.argv[13]
med = st.median
print(f"\n{n} small services (sleep infinity, settle 100ms), private systemd user manager, file:// store")
print(f"{'first deploy of %d services' % n:52} {deploy:8.2f} s   {deployed} deployed")
print(f"{'  reference: daemon-reload + systemctl start of all':52} {ref_deploy:8.2f} s   {ref_active} active   ratio {deploy / ref_deploy:.1f}")
if b_deploy:
    print(f"{'  before (%s)' % before[:12]:52} {float(b_deploy):8.2f} s   after/before {deploy / float(b_deploy):.3f} ({float(b_deploy) / deploy:.1f}x faster)")
for key, what in (("idle", "idle poll"), ("noop", "no-op apply (manifest changed elsewhere)")):
    rows = alt[key]
    big, small = [r[0] for r in rows], [r[1] for r in rows]
    ratios = [b / s for b, s in zip(big, small)]
    calls, writes, requests = rows[-1][2], rows[-1][3], rows[-1][4]
    print(f"{what + ' at %d services' % n:52} {med(big) * 1000:8.1f} ms  (min {min(big) * 1000:.1f}, max {max(big) * 1000:.1f})   "
          f"{calls} systemd calls, {writes} state writes, {requests} store requests")
    print(f"{'  reference: the same at 10 services':52} {med(small) * 1000:8.1f} ms  (min {min(small) * 1000:.1f}, max {max(small) * 1000:.1f})   "
          f"ratio {med(ratios):.2f} (median of {len(ratios)} alternating pairs; {min(ratios):.2f}-{max(ratios):.2f})")
print(f"{'  fsyncs of one no-op apply at %d services' % n:52} {fsyncs:>8}")
print(f"{'removal of %d services' % n:52} {remove:8.2f} s   {removed} removed")
print(f"{'  reference: systemctl stop + rm + daemon-reload':52} {ref_remove:8.2f} s   ratio {remove / ref_remove:.1f}")
if b_remove:
    print(f"{'  before (%s)' % before[:12]:52} {float(b_remove):8.2f} s   after/before {remove / float(b_remove):.3f} ({float(b_remove) / remove:.1f}x faster)")
PY
