# Sourced by the benchmarks that need S3: a moto server on a free loopback port for this
# run, stopped at exit (with "$work", if the caller set it, removed), the AWS environment
# pointing at it, `s3curl` (curl signed with SigV4 for it), and an empty bucket `bench`.
moto="${DEPLOYER_MOTO:-$PWD/.venv-s3/bin/moto_server}"
[[ -x "$moto" ]] || { echo "no moto server: run scripts/test.sh first" >&2; exit 2; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_start() {  # a moto server on $port, its pid in $moto_pid, once it answers
  "$moto" -H 127.0.0.1 -p "$port" >/dev/null 2>>"${MOTO_LOG:-/dev/null}" &   # MOTO_LOG: keep its access log
  moto_pid=$!
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port" && break; sleep 0.1; done
}
moto_start
trap 'kill $moto_pid 2>/dev/null; [[ -n "${work:-}" ]] && rm -rf "$work"' EXIT
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_EC2_METADATA_DISABLED=true
s3curl=(curl -s --aws-sigv4 "aws:amz:us-east-1:s3" --user "bench:bench")
"${s3curl[@]}" -X PUT "http://127.0.0.1:$port/bench" >/dev/null
moto_restart() {  # a fresh, empty server on the same port: moto keeps every object in memory,
  # and an upload to a server holding the last one's half a GiB runs measurably slower
  kill "$moto_pid" 2>/dev/null; wait "$moto_pid" 2>/dev/null || true
  moto_start
}
