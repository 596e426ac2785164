#!/usr/bin/env bash
# Fuzz the manifest parser/validator, the env-template expander and the archive unpacker
# with cargo fuzz (libFuzzer), each for SECONDS (default 20), starting from fuzz/corpus/.
# This machine has only a stable toolchain: RUSTC_BOOTSTRAP lets cargo fuzz pass its -Z
# flags; the sanitizer is off (coverage-guided fuzzing with panics and assertions as the
# oracle). New inputs land in a scratch copy of the corpus, not in the repository.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/deployer-target}-fuzz"
export RUSTC_BOOTSTRAP=1
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in manifest template archive; do
  mkdir -p "$scratch/$target"
  cp -r "fuzz/corpus/$target/." "$scratch/$target/"
  echo "== fuzz $target for ${seconds}s"
  cargo fuzz run --fuzz-dir fuzz --sanitizer none "$target" "$scratch/$target" -- \
    -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 2>&1 | tail -4
done
echo "fuzz: 3 targets ran ${seconds}s each without a finding"
