#!/usr/bin/env bash
# Alias domains end to end, whole processes on loopback (release build), in a world that
# resolves like the Internet: Knot serves the customer zone, unbound resolves, the node verifies
# through unbound and Pebble (PEBBLE_VA_NOSLEEP=1) validates through it too.
#  1. `POST /v1/services/{id}/domains` to the first HTTPS response through the alias, served
#     with its own Pebble certificate (curl trusts Pebble's root only): median of RUNS
#     (target < 300 ms);
#  2. BURST aliases added at once, spread over BURST_SERVICES services: time until every one is
#     verified and has its certificate (target >= 100 domains/s).
# The customer zone holds a CNAME to its service for each burst name, and `* CNAME` to the
# first service for the timed runs.
#
#   benches/scripts/aliases.sh                      # RUNS=20 BURST=1000 BURST_SERVICES=1
#   BURST_SERVICES=50 benches/scripts/aliases.sh    # the burst over 50 services
set -euo pipefail

RUNS=${RUNS:-20}
BURST=${BURST:-1000}
BURST_SERVICES=${BURST_SERVICES:-1}
ZONE=app.bench.test
. "$(dirname "$0")/common.sh"
bench_start aliases
DNS=26653 HTTP=26680 HTTPS=26643 ADMIN=26690 KNOT=26654 RESOLVER=26655
P_ACME=26601 P_MGMT=26602 P_TLS=26603

"$ROOT/scripts/deps.sh" pebble:pebble curl:curl openssl:openssl knotd:knot unbound:unbound
build_portcullis

now_ms() { date +%s%3N; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# --- Pebble's own TLS -------------------------------------------------------------------------
pebble_tls

# --- the node ----------------------------------------------------------------------------------
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
[verify]
resolvers = ["127.0.0.1:$RESOLVER"]
[limits]
domains_per_service = $((BURST + RUNS + 10))
[log]
level = "warn"
access = false
EOF
"$BIN" serve --config "$WORK/p/node.toml" >"$WORK/p/log" 2>&1 &
pids+=($!)
wait_port $ADMIN
for _ in $(seq 1 200); do [ -s "$WORK/p/state/admin.token" ] && break; sleep 0.025; done
TOKEN=$(cat "$WORK/p/state/admin.token")
api() { # method path [body]
  curl -sS -X "$1" -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    ${3:+-d "$3"} "http://127.0.0.1:$ADMIN$2"
}
SERVICE='{"backends":["127.0.0.1:9"],"options":{"health_check":{"enabled":false}}}'
new_service() { api POST /v1/services "$SERVICE" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }
id=$(new_service)
services=("$id")
for _ in $(seq 2 "$BURST_SERVICES"); do services+=("$(new_service)"); done

# --- Knot: the customer zone -------------------------------------------------------------------
mkdir -p "$WORK/knot"
cat >"$WORK/knot/example.com.zone" <<EOF
\$ORIGIN example.com.
\$TTL 60
@ SOA ns.example.com. hostmaster.example.com. 1 60 60 600 1
@ NS ns.example.com.
ns A 127.0.0.1
* CNAME $id.$ZONE.
EOF
for i in $(seq 1 "$BURST"); do
  echo "b$i CNAME ${services[$((i % BURST_SERVICES))]}.$ZONE." >>"$WORK/knot/example.com.zone"
done
cat >"$WORK/knot/knot.conf" <<EOF
server:
    rundir: "$WORK/knot"
    listen: 127.0.0.1@$KNOT
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/knot/db"
zone:
  - domain: example.com
    storage: "$WORK/knot"
    file: "example.com.zone"
    journal-content: none
EOF
knotd -c "$WORK/knot/knot.conf" >"$WORK/knot/log" 2>&1 &
pids+=($!)

# --- unbound, as the Internet's resolver -------------------------------------------------------
mkdir -p "$WORK/unbound"
cat >"$WORK/unbound/unbound.conf" <<EOF
server:
  interface: 127.0.0.1
  port: $RESOLVER
  do-ip6: no
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  username: ""
  chroot: ""
  directory: "$WORK/unbound"
  pidfile: "$WORK/unbound/unbound.pid"
  use-syslog: no
  logfile: ""
  module-config: "iterator"
  qname-minimisation: no
  local-zone: "test." nodefault
  local-zone: "com." nodefault
remote-control:
  control-enable: no
stub-zone:
  name: "example.com"
  stub-addr: 127.0.0.1@$KNOT
stub-zone:
  name: "$ZONE"
  stub-addr: 127.0.0.1@$DNS
EOF
unbound -d -c "$WORK/unbound/unbound.conf" >"$WORK/unbound/log" 2>&1 &
pids+=($!)
for _ in $(seq 1 400); do
  dig +short @127.0.0.1 -p $RESOLVER probe.example.com A | grep -q 127.0.0.1 && break
  sleep 0.025
done

# --- Pebble, resolving through unbound ---------------------------------------------------------
cat >"$WORK/pebble.json" <<EOF
{"pebble": {"listenAddress": "127.0.0.1:$P_ACME", "managementListenAddress": "127.0.0.1:$P_MGMT",
  "certificate": "$WORK/pebble.pem", "privateKey": "$WORK/pebble.key",
  "httpPort": $HTTP, "tlsPort": $P_TLS, "ocspResponderURL": "", "externalAccountBindingRequired": false}}
EOF
PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 pebble -config "$WORK/pebble.json" \
  -dnsserver "127.0.0.1:$RESOLVER" >"$WORK/pebble.log" 2>&1 &
pids+=($!)
wait_port $P_ACME
wait_port $P_MGMT
curl -sS --cacert "$WORK/ca.pem" "https://127.0.0.1:$P_MGMT/roots/0" >"$WORK/root.pem"
# The services' own certificates first, so the account exists before the timed runs.
for _ in $(seq 1 2400); do
  [ "$(api GET /v1/certificates | grep -o '"status":"active"' | wc -l)" -ge "$BURST_SERVICES" ] && break
  sleep 0.025
done

echo "add-domain to the first HTTPS response through the alias, $RUNS runs..." >&2
: >"$WORK/first"
for i in $(seq 1 "$RUNS"); do
  host="r$i.example.com"
  t0=$(now_ms)
  api POST "/v1/services/$id/domains" "{\"name\":\"$host\"}" >/dev/null
  until curl -s -o /dev/null --max-time 2 --cacert "$WORK/root.pem" \
    --resolve "$host:$HTTPS:127.0.0.1" "https://$host:$HTTPS/"; do
    [ $(($(now_ms) - t0)) -lt 30000 ] || { echo "$host not served in 30 s" >&2; api GET "/v1/domains/$host" >&2; exit 1; }
    sleep 0.005
  done
  echo $(($(now_ms) - t0)) >>"$WORK/first"
done
FIRST=$(median <"$WORK/first")

echo "$BURST aliases added at once..." >&2
for i in $(seq 1 "$BURST"); do
  [ "$i" = 1 ] || echo next
  printf 'url = "http://127.0.0.1:%s/v1/services/%s/domains"\nrequest = "POST"\noutput = "/dev/null"\n' "$ADMIN" "${services[$((i % BURST_SERVICES))]}"
  printf 'header = "Authorization: Bearer %s"\nheader = "content-type: application/json"\n' "$TOKEN"
  printf 'data = "{\\"name\\":\\"b%s.example.com\\"}"\n' "$i"
done >"$WORK/burst.curl"
before=$(api GET /v1/certificates | grep -o '"status":"active"' | wc -l)
want=$((before + BURST))
t0=$(now_ms)
curl -sS --parallel --parallel-max 8 -K "$WORK/burst.curl"
ADDED_MS=$(($(now_ms) - t0))
verified_at=""
until [ "$(api GET /v1/certificates | grep -o '"status":"active"' | wc -l)" -ge "$want" ]; do
  if [ -z "$verified_at" ] && curl -sS "http://127.0.0.1:$ADMIN/metrics" |
    grep -q "^portcullis_domains{status=\"verified\"} $((BURST + RUNS))\$"; then
    verified_at=$(($(now_ms) - t0))
  fi
  [ $(($(now_ms) - t0)) -lt 600000 ] || { echo "burst not done in 600 s" >&2; exit 1; }
  sleep 0.1
done
BURST_MS=$(($(now_ms) - t0))
[ -n "$verified_at" ] || verified_at=$BURST_MS
# Spot-check that the last names are served with their own certificates.
for i in $BURST $((BURST - 1)); do
  curl -sS -o /dev/null --max-time 2 --cacert "$WORK/root.pem" \
    --resolve "b$i.example.com:$HTTPS:127.0.0.1" "https://b$i.example.com:$HTTPS/" ||
    { echo "b$i.example.com is not served" >&2; exit 1; }
done

echo
printf "%-62s %10s\n" "measure" "value"
printf "%-62s %8s ms\n" "add-domain -> first HTTPS through the alias (median of $RUNS)" "$FIRST"
printf "%-62s %8s ms\n" "$BURST add-domain requests answered" "$ADDED_MS"
printf "%-62s %8s ms\n" "$BURST aliases verified" "$verified_at"
awk -v n="$BURST" -v s="$BURST_SERVICES" -v ms="$BURST_MS" \
  'BEGIN { printf "%-62s %8.1f /s\n", "verified and certified per second (" n " at once, " s " services)", n * 1000 / ms }'
