#!/usr/bin/env bash
# push's packing on a real tree, against GNU tar piped into zstd on every CPU at the same
# level, measured in the same rounds (file:// store, so no upload):
#   pack:      `push --dry-run` (walk, tar, zstd -3 on every CPU, sha256, temp file; a fresh
#              cache each time, so it always packs)
#   reference: tar -cf - | zstd -T0 -3 > file
# and the archive sizes (hard links kept as links by both). Then an unchanged re-push of the
# same tree (nothing to pack: the tree's stamp matches the last push) against the same
# re-push of a one-file tree: the difference is what the tree's size still costs.
#
# The tree: TREE (default /usr/lib/x86_64-linux-gnu) copied twice into out/, the second
# copy hard-linked to the first (`cp -al`), as build outputs with shared files are.
#
#   bench/pack.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-5}"
tree="${TREE:-/usr/lib/x86_64-linux-gnu}"
source bench/lib.sh
needs tar zstd jq

export DEPLOY_STORE="file://$work/store"
"$bin/deploy-manifest" init >/dev/null
for ns in Bench/Tree Bench/Tiny; do
  "$bin/deploy-manifest" add-service "{\"name\": \"$(echo "${ns#Bench/}" | tr A-Z a-z)\", \"namespace\": \"$ns\", \"artifact\": {\"storePath\": \"/nix/store/placeholder\"}, \"hosts\": []}" >/dev/null
done
mkdir -p "$work/repo/out" "$work/tiny/out"
cp -a "$tree" "$work/repo/out/a"
cp -al "$work/repo/out/a" "$work/repo/out/b"
echo tiny > "$work/tiny/out/file"
printf '[namespaces."Bench/Tree"]\ncommand = "true"\noutput = "out"\n' > "$work/repo/deploy.toml"
printf '[namespaces."Bench/Tiny"]\ncommand = "true"\noutput = "out"\n' > "$work/tiny/deploy.toml"

pack() {
  rm -rf "$work/cache"
  (cd "$work/repo" && DEPLOY_CACHE_DIR="$work/cache" "$bin/push" Bench/Tree --dry-run --json) > "$work/pack.json" 2>/dev/null
}
reference() { tar -cf - -C "$work/repo/out" . | zstd -T0 -3 -q > "$work/ref.tar.zst"; }
pack; reference   # warm-up: the tree in the page cache
printf 'tree: %s MiB in %s names (%s), the second half hard links to the first\n' \
  "$(du -sm "$work/repo/out" | cut -f1)" "$(find "$work/repo/out" | wc -l)" "$tree"
printf '%-6s %9s %10s\n' round pack reference
for r in $(seq "$rounds"); do
  p=$(secs pack); t=$(secs reference)
  printf '%-6s %8ss %9ss\n' "$r" "$p" "$t"
  echo "$p $t" >> "$work/rounds"
done
ours=$(jq .artifact.archive.size "$work/pack.json")
theirs=$(stat -c %s "$work/ref.tar.zst")

# Unchanged re-pushes: the first real push packs and remembers, the next ones do not pack.
export DEPLOY_CACHE_DIR="$work/push-cache"
sleep 2.1   # a tree changed in the last 2 s is never remembered
repush() { (cd "$work/$1" && "$bin/push" "$2") >/dev/null 2>"$work/repush.log"; }
repush repo Bench/Tree; repush tiny Bench/Tiny
for r in $(seq "$rounds"); do
  u=$(secs repush repo Bench/Tree)
  grep -q "is unchanged since it was packed" "$work/repush.log" || { cat "$work/repush.log" >&2; exit 1; }
  s=$(secs repush tiny Bench/Tiny)
  echo "$u $s" >> "$work/repush"
done
python3 - "$work/rounds" "$work/repush" "$ours" "$theirs" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
p, t = (statistics.median(c) for c in zip(*rows))
print(f"median {p:8.3f}s {t:9.3f}s")
print(f"reference / pack = {statistics.median(r[1] / r[0] for r in rows):.2f} (issue 18 target >= 0.9)")
ours, theirs = int(sys.argv[3]), int(sys.argv[4])
print(f"archive: {ours / 2**20:.1f} MiB, reference {theirs / 2**20:.1f} MiB, ratio {ours / theirs:.3f}")
rep = [list(map(float, l.split())) for l in open(sys.argv[2])]
u, s = (statistics.median(c) for c in zip(*rep))
print(f"unchanged re-push of the tree: {u:.3f}s; of a one-file tree: {s:.3f}s; "
      f"difference {u - s:.3f}s (target <= 0.1 s)")
PY
