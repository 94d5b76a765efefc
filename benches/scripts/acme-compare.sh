#!/usr/bin/env bash
# ACME issuance against Pebble (PEBBLE_VA_NOSLEEP=1), Portcullis beside Caddy:
#  - Portcullis: time from `POST /v1/services` to the first HTTPS response served with the new
#    certificate (verified against Pebble's root), median of RUNS; then certificates per second
#    with BURST services created at once.
#  - Caddy (Debian caddy, acme_ca pointed at its own Pebble): time from process start to the
#    certificate on disk, median of CADDY_RUNS.
# Pebble resolves names through the Portcullis node's DNS (services answer 127.0.0.1).
#
#   benches/scripts/acme-compare.sh                 # RUNS=20 BURST=200 CADDY_RUNS=5
#
# Needs root for apt (pebble, caddy, curl) when they are missing. Everything runs on 127.0.0.1.
set -euo pipefail

RUNS=${RUNS:-20}
BURST=${BURST:-200}
CADDY_RUNS=${CADDY_RUNS:-5}
ZONE=app.bench.test
. "$(dirname "$0")/common.sh"
bench_start acme
DNS=25453 HTTP=25480 HTTPS=25443 ADMIN=25490
P_ACME=25401 P_MGMT=25402 P_TLS=25403
C_ACME=25411 C_MGMT=25412 C_TLS=25413 C_HTTP=25481 C_HTTPS=25444 C_ADMIN=25491

"$ROOT/scripts/deps.sh" pebble:pebble caddy:caddy curl:curl openssl:openssl
build_portcullis

now_ms() { date +%s%3N; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# --- Pebble's own TLS: a CA and a certificate for 127.0.0.1 -----------------------------------
pebble_tls

start_pebble() { # name acme-port mgmt-port tls-port http-port
  cat >"$WORK/$1.json" <<EOF
{"pebble": {"listenAddress": "127.0.0.1:$2", "managementListenAddress": "127.0.0.1:$3",
  "certificate": "$WORK/pebble.pem", "privateKey": "$WORK/pebble.key",
  "httpPort": $5, "tlsPort": $4, "ocspResponderURL": "", "externalAccountBindingRequired": false}}
EOF
  PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 pebble -config "$WORK/$1.json" \
    -dnsserver "127.0.0.1:$DNS" >"$WORK/$1.log" 2>&1 &
  pids+=($!)
  wait_port "$2"
  wait_port "$3"
}

# --- Portcullis with its Pebble ----------------------------------------------------------------
mkdir -p "$WORK/p"
cat >"$WORK/p/node.toml" <<EOF
[node]
id = "bench"
public_ipv4 = ["127.0.0.1"]
[listen]
dns = ["127.0.0.1:$DNS"]
http = "127.0.0.1:$HTTP"
https = "127.0.0.1:$HTTPS"
admin = "127.0.0.1:$ADMIN"
[zone]
name = "$ZONE"
nameservers = ["ns1.$ZONE"]
[store]
path = "$WORK/p/state"
[issuer]
kind = "acme"
directory_url = "https://127.0.0.1:$P_ACME/dir"
trust_roots = ["$WORK/ca.pem"]
[log]
level = "warn"
access = false
EOF
start_pebble pebble-p $P_ACME $P_MGMT $P_TLS $HTTP
"$BIN" serve --config "$WORK/p/node.toml" >"$WORK/p/log" 2>&1 &
pids+=($!)
wait_port $ADMIN
for _ in $(seq 1 200); do [ -s "$WORK/p/state/admin.token" ] && break; sleep 0.025; done
TOKEN=$(cat "$WORK/p/state/admin.token")
curl -sS --cacert "$WORK/ca.pem" "https://127.0.0.1:$P_MGMT/roots/0" >"$WORK/root-p.pem"
api() { # method path [body]
  curl -sS -X "$1" -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    ${3:+-d "$3"} "http://127.0.0.1:$ADMIN$2"
}
SERVICE='{"backends":["127.0.0.1:9"],"options":{"health_check":{"enabled":false}}}'

# One service first, so the account exists before the timed runs (as on a running platform).
id=$(api POST /v1/services "$SERVICE" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 1 400); do
  api GET "/v1/services/$id" | grep -q '"status":"active","issuer"' && break
  sleep 0.025
done

echo "Portcullis: POST /v1/services to the first verified HTTPS response, $RUNS runs..." >&2
: >"$WORK/first"
for _ in $(seq 1 "$RUNS"); do
  t0=$(now_ms)
  id=$(api POST /v1/services "$SERVICE" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  host="$id.$ZONE"
  until curl -s -o /dev/null --max-time 2 --cacert "$WORK/root-p.pem" \
    --resolve "$host:$HTTPS:127.0.0.1" "https://$host:$HTTPS/"; do
    [ $(($(now_ms) - t0)) -lt 30000 ] || { echo "no certificate for $host in 30 s" >&2; exit 1; }
    sleep 0.005
  done
  echo $(($(now_ms) - t0)) >>"$WORK/first"
done
FIRST=$(median <"$WORK/first")

echo "Portcullis: $BURST services created at once..." >&2
before=$(api GET /v1/certificates | grep -o '"status":"active"' | wc -l)
# One curl process sends every request, 8 at a time: a process per request (xargs) cost more
# CPU than the node and Pebble together on 2 cores, and so measured the load generator.
for i in $(seq 1 "$BURST"); do
  [ "$i" = 1 ] || echo next
  printf 'url = "http://127.0.0.1:%s/v1/services"\nrequest = "POST"\noutput = "/dev/null"\n' "$ADMIN"
  printf 'header = "Authorization: Bearer %s"\nheader = "content-type: application/json"\n' "$TOKEN"
  printf 'data = "%s"\n' "${SERVICE//\"/\\\"}"
done >"$WORK/burst.curl"
t0=$(now_ms)
curl -sS --parallel --parallel-max 8 -K "$WORK/burst.curl"
want=$((before + BURST))
until [ "$(api GET /v1/certificates | grep -o '"status":"active"' | wc -l)" -ge "$want" ]; do
  [ $(($(now_ms) - t0)) -lt 300000 ] || { echo "burst not done in 300 s" >&2; exit 1; }
  sleep 0.1
done
BURST_MS=$(($(now_ms) - t0))

# --- Caddy with its own Pebble (validating on Caddy's HTTP port) --------------------------------
start_pebble pebble-c $C_ACME $C_MGMT $C_TLS $C_HTTP
# A name our DNS answers with 127.0.0.1: a Portcullis service's canonical domain.
id=$(api POST /v1/services "$SERVICE" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
CADDY_HOST="$id.$ZONE"
echo "Caddy: process start to certificate on disk, $CADDY_RUNS runs..." >&2
: >"$WORK/caddy"
for i in $(seq 1 "$CADDY_RUNS"); do
  dir="$WORK/c$i"
  mkdir -p "$dir"
  cat >"$dir/Caddyfile" <<EOF
{
  admin 127.0.0.1:$C_ADMIN
  http_port $C_HTTP
  https_port $C_HTTPS
  storage file_system $dir/storage
  acme_ca https://127.0.0.1:$C_ACME/dir
  acme_ca_root $WORK/ca.pem
  email ops@example.test
}
$CADDY_HOST {
  respond "ok"
}
EOF
  t0=$(now_ms)
  HOME=$dir XDG_DATA_HOME=$dir XDG_CONFIG_HOME=$dir caddy run --config "$dir/Caddyfile" \
    --adapter caddyfile >"$dir/log" 2>&1 &
  cpid=$!
  until find "$dir/storage" -name "$CADDY_HOST.crt" 2>/dev/null | grep -q .; do
    [ $(($(now_ms) - t0)) -lt 60000 ] || { echo "Caddy got no certificate in 60 s" >&2; cat "$dir/log" >&2; exit 1; }
    sleep 0.005
  done
  echo $(($(now_ms) - t0)) >>"$WORK/caddy"
  kill $cpid; wait $cpid 2>/dev/null || true
done
CADDY=$(median <"$WORK/caddy")

echo
printf "%-58s %10s\n" "measure" "value"
printf "%-58s %8s ms\n" "Portcullis: POST /v1/services -> first HTTPS (median of $RUNS)" "$FIRST"
awk -v n="$BURST" -v ms="$BURST_MS" \
  'BEGIN { printf "%-58s %8.1f /s\n", "Portcullis: certificates per second (" n " at once)", n * 1000 / ms }'
printf "%-58s %8s ms\n" "Caddy 2.6: start -> certificate on disk (median of $CADDY_RUNS)" "$CADDY"
awk -v a="$FIRST" -v b="$CADDY" 'BEGIN { printf "%-58s %8.2f x\n", "Caddy time / Portcullis time", b / a }'
