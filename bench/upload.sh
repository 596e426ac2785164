#!/usr/bin/env bash
# Upload throughput of `push` for a 512 MiB artifact, against `curl --upload-file` of the
# same bytes to the same S3 server (moto on loopback), measured in the same rounds.
#
#   bench/upload.sh [SIZE_MIB] [ROUNDS]   (default 512 and 5; needs scripts/test.sh's .venv-s3)
#
# Each round runs, in turn: curl's upload, push as one PUT, push as a multipart upload (each
# into a fresh bucket). Prints the medians of push's upload phase and of push end to end
# (build + pack + sha256 + upload + manifest compare-and-swap), and the median of the
# per-round ratios against curl. Random data, so compression cannot help push. moto
# assembles multipart uploads in Python, which makes the multipart figure a worst case;
# against AWS S3 parts go up in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib="${1:-512}"
rounds="${2:-5}"
source bench/lib.sh
source bench/moto.sh

mkdir -p "$work/repo/out"
head -c "$((size_mib << 20))" /dev/urandom > "$work/repo/out/blob"
cat > "$work/repo/deploy.toml" <<TOML
[namespaces."Bench/Blob"]
command = "true"
output = "out"
TOML


# One push into a fresh bucket; prints "<upload phase s> <end-to-end s>".
push_once() {
  local bucket=$1
  curl -s -X PUT "http://127.0.0.1:$port/$bucket" >/dev/null
  export DEPLOY_STORE="s3://$bucket/deploy"
  "$bin/deploy-manifest" init >/dev/null
  "$bin/deploy-manifest" add-service '{"name": "blob", "namespace": "Bench/Blob", "artifact": {"storePath": "/nix/store/placeholder"}, "hosts": []}' >/dev/null
  local t0 t1
  t0=$(now)
  (cd "$work/repo" && "$bin/push" Bench/Blob --json) > "$work/report.json" 2> "$work/push.log" || { cat "$work/push.log" >&2; exit 1; }
  t1=$(now)
  echo "$(sed -n 's/.*uploading artifacts\/.*: .* in \([0-9.]*\) s.*/\1/p' "$work/push.log") $(calc "$t1 - $t0")"
}

# curl uploads the same amount of data (the raw blob; the packed archive is 0.004% larger).
curl_once() {  # into a fresh bucket, as each push goes
  local t0 t1
  curl -s -X PUT "http://127.0.0.1:$port/$1" >/dev/null
  t0=$(now)
  curl -s -o /dev/null --upload-file "$work/repo/out/blob" "http://127.0.0.1:$port/$1/copy"
  t1=$(now)
  calc "$t1 - $t0"
}

: > "$work/rounds"
# moto keeps what it received in memory, and the second of two uploads to one server
# measured up to 1.5x slower than the first, whichever client sent it: each measurement
# gets a fresh server.
for r in $(seq "$rounds"); do
  moto_restart; c=$(curl_once "curl-$r")
  moto_restart; read -r su st < <(DEPLOY_S3_MULTIPART_MIB=1048576 push_once "single-$r")
  moto_restart; read -r mu mt < <(push_once "multi-$r")
  echo "$c $su $st $mu $mt" | tee -a "$work/rounds" | sed "s/^/round $r: curl, single upload, total, multipart upload, total: /" >&2
done

python3 - "$work/rounds" "$size_mib" "$(jq .artifact.archive.size "$work/report.json")" <<'PY'
import statistics as st, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
print(f"artifact: {sys.argv[2]} MiB of random data, packed to {sys.argv[3]} bytes; {len(rows)} rounds, medians")
curl = [r[0] for r in rows]
print(f"{'curl --upload-file (one PUT)':34} {st.median(curl):8.2f} s   ({min(curl):.2f}-{max(curl):.2f})")
for col, what in ((1, "push upload, one PUT"), (3, "push upload, multipart 16 MiB x4"),
                  (2, "push end to end, one PUT"), (4, "push end to end, multipart")):
    xs = [r[col] for r in rows]
    ratios = [r[col] / r[0] for r in rows]
    print(f"{what:34} {st.median(xs):8.2f} s   ratio {st.median(ratios):.2f} (push/curl; {min(ratios):.2f}-{max(ratios):.2f})")
PY
