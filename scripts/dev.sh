#!/usr/bin/env bash
# `make run`: a dev node, a demo backend, a demo service, and how to reach it.
# State lives in ./.portcullis; run it again and the same service is reused.
set -euo pipefail

bin=${1:?usage: dev.sh PATH-TO-PORTCULLIS}
state=${PORTCULLIS_STATE_DIR:-.portcullis}
backend=${PORTCULLIS_DEMO_BACKEND:-127.0.0.1:3000}

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin" demo-backend --listen "$backend" &
pids+=($!)

rm -f "$state/admin.url"
"$bin" serve --dev --state-dir "$state" &
node=$!
pids+=("$node")

# Poll for the node's admin URL, with a deadline.
for _ in $(seq 300); do
  [ -s "$state/admin.url" ] && break
  kill -0 "$node" 2>/dev/null || { echo "error: the dev node exited; see its log above" >&2; exit 1; }
  sleep 0.1
done
[ -s "$state/admin.url" ] || { echo "error: the dev node did not start within 30 s" >&2; exit 1; }

cli=("$bin" --state-dir "$state")
# Reuse the demo service of an earlier run: the table's columns are ID STATUS CERT BACKENDS DOMAIN.
id=$("${cli[@]}" service list | awk -v b="$backend" 'NR > 1 { n = split($4, bs, ","); for (i = 1; i <= n; i++) if (bs[i] == b) { print $1; exit } }')
if [ -z "$id" ]; then
  id=$("${cli[@]}" service create --backend "$backend" | awk '/^created service / { print $3; exit }')
fi
[ -n "$id" ] || { echo "error: could not create the demo service" >&2; exit 1; }

admin=$(cat "$state/admin.url")
cat <<MSG

Demo service $id is routed to the demo backend at $backend.
$("${cli[@]}" service show "$id")

Reach it over HTTPS, with the dev CA's certificate (names under .localhost resolve to loopback):
  curl --cacert $state/dev-ca/root.pem https://$id.app.localhost:8443/

Plain HTTP redirects there:
  curl -i http://$id.app.localhost:8080/

Manage services with the CLI, or the admin API at $admin:
  $bin --state-dir $state service list

Ctrl-C stops the node and the demo backend.
MSG
wait "$node"
