#!/usr/bin/env bash
# One node growing to a million services (or as far as MAX_SECONDS allows), through the admin
# API with concurrent keep-alive clients, with the dev issuer so every service gets its
# certificate. For each tenth of the way it prints creates per second, the node's RSS per
# service and state.redb bytes per service; then the restart-to-ready time, and DNS queries per
# second and HTTPS CPU per request at the final size against the same at 1,000 services.
#
#   benches/scripts/scale.sh                 # SERVICES=1000000 MAX_SECONDS=1200 CLIENTS=16
#   SERVICES=100000 benches/scripts/scale.sh
#
# Needs root (apt for nginx, wrk and dnsperf when missing; a private mount namespace so wrk
# resolves the bench name to loopback without touching /etc/hosts).
set -euo pipefail
cd "$(dirname "$0")/../.."

SERVICES=${SERVICES:-1000000}
MAX_SECONDS=${MAX_SECONDS:-1200}
CLIENTS=${CLIENTS:-16}
MEASURE_SECONDS=${MEASURE_SECONDS:-5}
BASELINE=1000

scripts/deps.sh nginx:nginx-light wrk:wrk dnsperf:dnsperf curl:curl unshare:util-linux
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/portcullis-target}
. benches/scripts/common.sh
bench_start scale
build_portcullis

BACKEND=127.0.0.1:19080
ADMIN=127.0.0.1:19090
DNS_PORT=19053
HTTPS_PORT=19443

# --- a backend for the measured service ------------------------------------------------------
start_backend "$BACKEND"

# --- the node --------------------------------------------------------------------------------
mkdir -p "$WORK/node"
cat >"$WORK/node/portcullis.toml" <<CONF
[node]
id = "scale"
public_ipv4 = ["127.0.0.1"]
[listen]
dns = ["127.0.0.1:$DNS_PORT"]
http = "127.0.0.1:19081"
https = "127.0.0.1:$HTTPS_PORT"
admin = "$ADMIN"
[zone]
name = "scale.test"
[store]
path = "$WORK/node/state"
[log]
level = "warn"
access = false
CONF
node_pid=
start_node() {
  "$BIN" serve --config "$WORK/node/portcullis.toml" >>"$WORK/node/out.log" 2>&1 &
  node_pid=$!
  pids+=("$node_pid")
}
ready() { curl -sf -o /dev/null "http://$ADMIN/readyz"; }
start_node
wait_port 19090
until ready; do sleep 0.05; done
TOKEN=$(cat "$WORK/node/state/admin.token")

# Creates $1 services with $CLIENTS parallel keep-alive connections; prints failures, if any.
create() { # count
  local count=$1 per=$(( ($1 + CLIENTS - 1) / CLIENTS )) i
  for i in $(seq 1 "$CLIENTS"); do
    local n=$(( count - (i - 1) * per )); [ "$n" -gt "$per" ] && n=$per; [ "$n" -le 0 ] && continue
    {
      for _ in $(seq 1 "$n"); do
        printf 'url = "http://%s/v1/services"\noutput = "/dev/null"\n' "$ADMIN"
      done
    } >"$WORK/urls.$i"
    curl -s -w '%{http_code}\n' -X POST \
      -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
      --data '{"backends":["127.0.0.1:9"]}' -K "$WORK/urls.$i" >"$WORK/codes.$i" &
  done
  wait_creates
}
wait_creates() {
  local job
  for job in $(jobs -p); do
    case " ${pids[*]} " in *" $job "*) ;; *) wait "$job" ;; esac
  done
  local bad
  bad=$(cat "$WORK"/codes.* | grep -vc '^201$' || true)
  [ "$bad" = 0 ] || echo "  $bad creates did not answer 201" >&2
  rm -f "$WORK"/codes.* "$WORK"/urls.*
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$node_pid/status"; }
file_bytes() { stat -c %s "$WORK/node/state/state.redb"; }
now_ms() { date +%s%3N; }
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# The measured service, with a real backend.
measured=$(curl -sf -X POST -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  --data "{\"backends\":[\"$BACKEND\"]}" "http://$ADMIN/v1/services" |
  sed -n 's/.*"canonical_domain":"\([^"]*\)".*/\1/p')
[ -n "$measured" ] || { echo "error: could not create the measured service" >&2; exit 1; }
printf '127.0.0.1 localhost\n127.0.0.1 %s\n' "$measured" >"$WORK/hosts"
echo "$measured A" >"$WORK/queries"

# DNS queries per second and HTTPS CPU µs per request, now.
measure() { # label
  local out qps before after reqs cpu
  out=$(dnsperf -s 127.0.0.1 -p "$DNS_PORT" -d "$WORK/queries" -l "$MEASURE_SECONDS" -c 8 -Q 200000 2>&1)
  qps=$(echo "$out" | awk '/Queries per second/ {print $4}')
  until curl -sfk -o /dev/null --resolve "$measured:$HTTPS_PORT:127.0.0.1" "https://$measured:$HTTPS_PORT/"; do sleep 0.1; done
  before=$(cpu_ticks "$node_pid")
  out=$(unshare -m sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$WORK/hosts" \
    wrk -t1 -c32 -d"${MEASURE_SECONDS}s" "https://$measured:$HTTPS_PORT/")
  after=$(cpu_ticks "$node_pid")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  cpu=$(awk -v b="$before" -v a="$after" -v t="$ticks" -v r="$reqs" 'BEGIN { printf "%.1f", (a - b) / t / r * 1e6 }')
  echo "$1 ${qps:-0} $cpu"
}

create $((BASELINE - 1))
base_rss=$(rss_kib)
baseline=$(measure "$BASELINE")

step=$(( SERVICES / 10 ))
total=$BASELINE
started=$(now_ms)
echo
echo "creating up to $SERVICES services, $CLIENTS clients, at most ${MAX_SECONDS}s"
printf '%12s %12s %14s %16s\n' services "creates/s" "RSS B/service" "redb B/service"
while [ "$total" -lt "$SERVICES" ]; do
  n=$step; [ $((total + n)) -gt "$SERVICES" ] && n=$((SERVICES - total))
  t0=$(now_ms)
  # In chunks, so the time limit is checked as it goes.
  done_now=0
  while [ "$done_now" -lt "$n" ]; do
    chunk=$(( n - done_now )); [ "$chunk" -gt 20000 ] && chunk=20000
    create "$chunk"
    done_now=$((done_now + chunk))
    [ $(( $(now_ms) - started )) -gt $((MAX_SECONDS * 1000)) ] && break
  done
  t1=$(now_ms)
  total=$((total + done_now))
  rate=$(awk -v n="$done_now" -v ms=$((t1 - t0)) 'BEGIN { printf "%.0f", n / (ms / 1000) }')
  rss=$(rss_kib)
  printf '%12d %12s %14.0f %16.0f\n' "$total" "$rate" \
    "$(awk -v r="$rss" -v b="$base_rss" -v n="$total" -v b0="$BASELINE" 'BEGIN { print (r - b) * 1024 / (n - b0) }')" \
    "$(awk -v f="$(file_bytes)" -v n="$total" 'BEGIN { print f / n }')"
  [ $(( $(now_ms) - started )) -gt $((MAX_SECONDS * 1000)) ] && { echo "(time limit reached)"; break; }
done

# Let the issuer finish every certificate before the restart and the final figures.
echo "waiting for certificates to settle"
for _ in $(seq 1 600); do
  pending=$(curl -sf "http://$ADMIN/metrics" | awk '/^portcullis_certificates\{status="(pending|ordering|validating|issuing)"\}/ {s += $2} END {print s + 0}')
  [ "$pending" = 0 ] && break
  sleep 1
done
rss=$(rss_kib)
echo "after issuance: RSS $(awk -v r="$rss" -v n="$total" 'BEGIN { printf "%.0f", r * 1024 / n }') B/service overall, state.redb $(awk -v f="$(file_bytes)" -v n="$total" 'BEGIN { printf "%.0f", f / n }') B/service"

kill -TERM "$node_pid"; wait "$node_pid" 2>/dev/null || true
t0=$(now_ms)
start_node
until ready; do sleep 0.02; done
t1=$(now_ms)
echo "restart to ready with $total services: $((t1 - t0)) ms; RSS after restart $(awk -v r="$(rss_kib)" -v n="$total" 'BEGIN { printf "%.0f", r * 1024 / n }') B/service"
final=$(measure "$total")

echo
printf '%12s %12s %18s\n' services "DNS q/s" "HTTPS CPU µs/req"
for row in "$baseline" "$final"; do
  set -- $row
  printf '%12s %12s %18s\n' "$1" "$2" "$3"
done
