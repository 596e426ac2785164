#!/usr/bin/env bash
# Set up everything the tests need on a bare Debian 12 machine, then run them all:
# format check, clippy, unit tests and the end-to-end tests against real servers.
#
#   scripts/test.sh            # what .ci/run runs
#   CARGO_TARGET_DIR=...       # reuse a warm target dir (default ~/.cache/deployer-target)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deployer-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s\n' "$*"; }

step "system packages"
need=()
command -v jq >/dev/null || need+=(jq)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v nix-store >/dev/null || need+=(nix-bin)
command -v dbus-daemon >/dev/null || need+=(dbus)
[[ -x /lib/systemd/systemd ]] || need+=(systemd)
command -v curl >/dev/null || need+=(curl)
command -v caddy >/dev/null || need+=(caddy)
command -v nginx >/dev/null || need+=(nginx)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
# MariaDB: the mysql preset (its server, mariadb-install-db and the client).
[[ -x /usr/sbin/mariadbd ]] || need+=(mariadb-server)
command -v mariadb >/dev/null || need+=(mariadb-client)
# libfaketime: the trust tests run writers and agents with a clock that is off.
ls /usr/lib/*-linux-gnu/faketime/libfaketime.so.1 >/dev/null 2>&1 || need+=(faketime)
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The packages' own services are not started: the tests run their servers themselves,
  # on ports of their own (policy-rc.d answers 101, "not allowed", to invoke-rc.d).
  policy=/usr/sbin/policy-rc.d made=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made=1
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq "${need[@]}"
  if [[ -n $made ]]; then
    rm -f "$policy"
    trap - EXIT
  fi
fi
echo "ok"

step "S3-compatible server (moto, in .venv-s3)"
if ! .venv-s3/bin/moto_server --help >/dev/null 2>&1; then
  rm -rf .venv-s3
  python3 -m venv .venv-s3
  .venv-s3/bin/pip install --quiet --disable-pip-version-check 'moto[server]==5.2.1'
fi
export DEPLOYER_MOTO="$PWD/.venv-s3/bin/moto_server"
echo "ok: $DEPLOYER_MOTO"

step "Garage (the garage preset's S3 server), built once into a cache"
garage_version=2.5.0
tools="${DEPLOYER_TOOLS:-$HOME/.cache/deployer-tools}"
garage="$tools/garage-$garage_version/bin/garage"
if [[ ! -x $garage ]]; then
  echo "building garage $garage_version (once; about 6 minutes on 2 cores)"
  CARGO_TARGET_DIR="$tools/garage-build" cargo install garage --version "$garage_version" \
    --locked --no-default-features --features bundled-libs,lmdb \
    --root "$tools/garage-$garage_version" --quiet
  rm -rf "$tools/garage-build"
fi
# Where the agent looks for it (a service's sandbox hides /root).
cmp -s "$garage" /usr/local/bin/garage || install -m 755 "$garage" /usr/local/bin/garage
echo "ok: $(/usr/local/bin/garage --version | head -1)"

step "rust components"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo --version

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the end-to-end tests run the binaries)"
cargo build --workspace --locked

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

step "fuzz (a short run of each target; scripts/fuzz.sh SECONDS for longer)"
bash scripts/fuzz.sh "${FUZZ_SECONDS:-10}"

# One closing line for the whole run: the sum of every test binary's result line.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
