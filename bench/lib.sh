# Sourced by the benchmarks: this checkout's release binaries, built into a target dir
# outside the checkout (the one .ci/run uses), in $bin and first on PATH; a work dir $work,
# removed at exit (bench/moto.sh, sourced after this, removes it too); small helpers.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deployer-target}"
cargo build --quiet --release -p deployer-agent -p deploy-manifest -p push
bin="$CARGO_TARGET_DIR/release"
export PATH="$bin:$PWD/push:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
calc() { python3 -c "print($1)"; }
now() { date +%s.%N; }
secs() {  # wall seconds of "$@", to the millisecond
  local t0 t1
  t0=$(now); "$@"; t1=$(now)
  calc "f'{$t1 - $t0:.3f}'"
}
needs() {  # needs TOOL...: stop with a clear message if one is missing
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$0 needs $tool" >&2; exit 2; }
  done
}
