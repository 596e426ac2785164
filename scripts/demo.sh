#!/usr/bin/env bash
# The main job on the embedded default, a file:// store: seed 004's workflow as far as it is
# built (init, add-service, push.sh of an example service, show | jq, set-artifact, list,
# diff, rollback), with every command printed before it runs. Safe to re-run: the demo
# store is made fresh under .demo/.
#
#   scripts/demo.sh                      # store: file://$PWD/.demo/store; the user's manager
#   scripts/demo.sh --system             # as root: the system manager, the agent's default
#                                        # paths (/var/lib/deployer, /var/lib/deployer-secrets)
#   DEPLOY_STORE=s3://bucket/prefix scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deployer-target}"
system=0
if [[ ${1:-} == --system ]]; then system=1; fi
if (( system )) && [[ $(id -u) != 0 ]]; then
  echo "demo.sh --system: run as root (the agent drives the system manager as root)" >&2
  exit 2
fi

if [[ -z ${DEMO_READY:-} ]]; then
  need=()
  for tool in jq curl dbus-daemon; do command -v $tool >/dev/null || need+=("$tool"); done
  if (( ${#need[@]} )); then
    echo "installing ${need[*]} (apt-get)"
    apt-get update -qq && apt-get install -y -qq jq curl dbus systemd
  fi
  # Cargo's own progress (a bar on a terminal, a line per crate otherwise): the first build on
  # a cold machine compiles about 300 crates, several minutes on 2 cores.
  echo "building the binaries into $CARGO_TARGET_DIR (several minutes the first time, seconds after)"
  cargo build --workspace
  export DEMO_READY=1
fi

if (( system )); then
  # The real system manager: the host's own if systemd is PID 1, else a private one
  # (systemd --system as PID 1 of its own namespaces; /etc and /var are thrown away after).
  if [[ $(cat /proc/1/comm 2>/dev/null) != systemd && -z ${SYSBOX_DIR:-} ]]; then
    echo "systemd is not PID 1 here: running the demo beside a private system manager (scripts/systemd-system-sandbox.sh)"
    exec bash scripts/systemd-system-sandbox.sh -- bash "$0" "$@"
  fi
elif ! systemctl --user is-system-running >/dev/null 2>&1 && [[ -z "${SDSANDBOX_DIR:-}" ]]; then
  # The agent drives the user's systemd manager. Where there is none (systemd not PID 1, as
  # in containers and CI), run the whole demo beside a private one.
  echo "no user systemd manager here: running the demo beside a private one (scripts/systemd-sandbox.sh)"
  exec bash scripts/systemd-sandbox.sh -- bash "$0" "$@"
fi

export PATH="$CARGO_TARGET_DIR/debug:$PWD/push:$PATH"

if [[ -z "${DEPLOY_STORE:-}" ]]; then
  rm -rf .demo
  export DEPLOY_STORE="file://$PWD/.demo/store"
fi
run() { printf '\n$ %s\n' "$*"; bash -c "$*"; }
echo "store: $DEPLOY_STORE"

run deploy-manifest init
run "deploy-manifest add-service '{
\"name\": \"my-service\",
\"artifact\": {\"storePath\": \"/nix/store/placeholder\"},
\"hosts\": [\"biz\"],
\"exec\": {\"command\": null, \"user\": \"root\", \"group\": \"root\"},
\"env\": {\"PORT\": \"8080\"},
\"envFile\": \"/var/lib/deployer-secrets/my-service.env\",
\"http\": {\"domain\": \"my.example.com\", \"path\": \"/\", \"internalPort\": 8080}
}'"
run "deploy-manifest show | jq '.services[] | select(.name == \"my-service\")'"

printf '\npush.sh builds a namespace, uploads its artifact and points the manifest at it:\n'
run "deploy-manifest add-service '{\"name\": \"hello\", \"namespace\": \"Examples/Hello.py\", \"artifact\": {\"storePath\": \"/nix/store/placeholder\"}, \"hosts\": [\"$(hostname)\"], \"env\": {\"PORT\": \"18080\"}, \"http\": {\"domain\": \"hello.localhost\", \"internalPort\": 18080}, \"health\": {\"http\": {\"path\": \"/healthz\"}, \"timeout\": \"20s\"}}'"
run "cd examples && push.sh Examples/Hello.py"
run "cd examples && push.sh Examples/Hello.py   # the same build again: nothing to upload"
run "deploy-manifest show | jq '.services[] | select(.name == \"hello\") | .artifact'"

if (( system )); then
  printf '\nthe agent converges this host as root on the system manager, with its default paths:\n'
  install -d -m 700 /var/lib/deployer-secrets
  agent="deployer-agent"
else
  printf '\nthe agent converges this host (the user manager, state in .demo/state):\n'
  mkdir -p .demo/secrets && chmod 700 .demo/secrets
  agent="deployer-agent --user --state-dir $PWD/.demo/state --secrets-dir $PWD/.demo/secrets"
fi
run "$agent plan"
run "$agent run --once"
run "curl -s http://127.0.0.1:18080/"
run "$agent status"
if (( system )); then
  run "systemctl status hello --no-pager | head -4"
  run "cat /var/lib/deployer/state.json | jq '.services.hello | {unit, health, deploys}'"
fi
run "$agent run --once   # nothing changed: one conditional GET"
run deploy-manifest set-artifact my-service /nix/store/0c0hpb5bblw0gb2k1s2a5j7bn3ldf5r8-my-service
run "deploy-manifest update-service my-service '{\"env\": {\"LOG_LEVEL\": \"debug\"}}'"
run "deploy-manifest show | jq '.services[] | .artifact.storePath'"
run deploy-manifest list
previous=$(deploy-manifest list --json | jq -r '.[2].version')  # before set-artifact
run deploy-manifest diff "$previous"
run deploy-manifest rollback "$previous.json"
run "deploy-manifest show | jq '{version, parent, rolledBackFrom, rolledBackTo, summary}'"
run deploy-manifest list
printf '\nbad input is refused and changes nothing:\n'
run "deploy-manifest add-service '{\"name\": \"Bad Name\", \"artifact\": {\"storePath\": \"/nix/store/x\"}, \"hosts\": [\"biz\"]}' || echo \"(exit \$?)\""
