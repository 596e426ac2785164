#!/usr/bin/env bash
# Upload throughput of `push` for a 512 MiB artifact, against `curl --upload-file` of the
# same bytes to the same S3 server (moto on loopback), measured in the same run.
#
#   bench/upload.sh [SIZE_MIB]     (default 512; needs scripts/test.sh's .venv-s3)
#
# Prints push's upload phase and push end to end (build + pack + sha256 + upload + manifest
# compare-and-swap), each as one PUT and as a multipart upload, against curl. Random data,
# so compression cannot help push. moto assembles multipart uploads in Python, which makes
# the multipart figure a worst case; against AWS S3 parts go up in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib="${1:-512}"
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

read -r multi_upload multi_total < <(push_once multipart)
read -r single_upload single_total < <(DEPLOY_S3_MULTIPART_MIB=1048576 push_once single)

# curl uploads the same amount of data (the raw blob; the packed archive is 0.004% larger).
t2=$(now)
curl -s -o /dev/null --upload-file "$work/repo/out/blob" "http://127.0.0.1:$port/bench/curl-copy"
t3=$(now)
curl_upload=$(calc "$t3 - $t2")

ratio() { printf '%8.2f s   ratio %.2f (push/curl)' "$1" "$(calc "$1 / $curl_upload")"; }
printf 'artifact: %s MiB of random data, packed to %s bytes\n' "$size_mib" "$(jq .artifact.archive.size "$work/report.json")"
printf 'curl --upload-file (one PUT)      %8.2f s\n' "$curl_upload"
printf 'push upload, one PUT              %s\n' "$(ratio "$single_upload")"
printf 'push upload, multipart 16 MiB x4  %s\n' "$(ratio "$multi_upload")"
printf 'push end to end, one PUT          %s\n' "$(ratio "$single_total")"
printf 'push end to end, multipart        %s\n' "$(ratio "$multi_total")"
