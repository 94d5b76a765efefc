#!/usr/bin/env bash
# Authoritative DNS side by side: Portcullis, Knot and NSD serve the same zone of N services
# (A, AAAA, HTTPS each), one worker each pinned to CPU 0; dnsperf on CPU 1 sends A queries,
# HTTPS queries, and NXDOMAIN queries for random names. Prints QPS, the server's CPU time per
# query (the fair figure when the load generator shares the machine) and ratios to Knot.
#
#   benches/scripts/dns-compare.sh            # N=10000, 10 s per run
#   N=1000 SECONDS_PER_RUN=5 benches/scripts/dns-compare.sh
#
# Needs root for apt (dnsperf, knot, nsd) when they are missing. Everything runs on 127.0.0.1.
set -euo pipefail

N=${N:-10000}
RUN=${SECONDS_PER_RUN:-10}
ZONE=app.bench.test
. "$(dirname "$0")/common.sh"
bench_start dns
PORT_P=25353 PORT_K=25354 PORT_N=25355 ADMIN=25380

"$ROOT/scripts/deps.sh" dnsperf:dnsperf knotd:knot nsd:nsd curl:curl
build_portcullis

wait_udp() { # port
  for _ in $(seq 1 200); do
    dig +time=1 +tries=1 +short -p "$1" @127.0.0.1 "$ZONE" SOA >/dev/null 2>&1 && \
      [ -n "$(dig +time=1 +tries=1 +short -p "$1" @127.0.0.1 "$ZONE" SOA)" ] && return 0
    sleep 0.05
  done
  echo "server on port $1 did not answer" >&2
  exit 1
}

# Busy time of CPU 0, where only the server under test runs: user, system, irq and softirq
# ticks. Counts a server's work whatever process or thread does it (NSD serves from a
# grandchild process whose own counters stay at 0 here).
cpu_ticks() {
  awk '$1 == "cpu0" {print $2 + $3 + $4 + $7 + $8}' /proc/stat
}

# --- Portcullis, with N services created through its API ---------------------------------
mkdir -p "$WORK/p"
cat >"$WORK/p/node.toml" <<EOF
[node]
id = "bench"
workers = 1
public_ipv4 = ["192.0.2.10"]
public_ipv6 = ["2001:db8::10"]
[listen]
dns = ["127.0.0.1:$PORT_P"]
http = "127.0.0.1:0"
https = "127.0.0.1:0"
admin = "127.0.0.1:$ADMIN"
[zone]
name = "$ZONE"
nameservers = ["ns1.$ZONE"]
[store]
path = "$WORK/p/state"
[log]
level = "warn"
access = false
[dns]
udp_workers = 1
EOF
taskset -c 0 "$BIN" serve --config "$WORK/p/node.toml" >"$WORK/p/log" 2>&1 &
pids+=($!)
PID_P=$!
wait_udp $PORT_P
TOKEN=$(cat "$WORK/p/state/admin.token")
# Health checks off: 10,000 backends probed every 5 s are the proxy's work, not DNS's, and
# they would run on CPU 0 during the DNS runs.
echo "creating $N services through the admin API..." >&2
mkdir -p "$WORK/created"
seq 1 "$N" | xargs -P 4 -I{} curl -s -o "$WORK/created/{}.json" -X POST \
  -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
  -d '{"backends":["127.0.0.1:9"],"options":{"health_check":{"enabled":false}}}' \
  "http://127.0.0.1:$ADMIN/v1/services"
python3 -c '
import json, pathlib, sys
for f in pathlib.Path(sys.argv[1]).glob("*.json"):
    print(json.loads(f.read_text())["id"])
' "$WORK/created" >"$WORK/ids"
got=$(wc -l <"$WORK/ids")
[ "$got" -ge "$N" ] || { echo "only $got services created" >&2; exit 1; }

# --- the same zone as a file, for Knot and NSD -------------------------------------------
SERIAL=$(dig +short -p $PORT_P @127.0.0.1 "$ZONE" SOA | awk '{print $3}')
{
  echo "\$ORIGIN $ZONE."
  echo "@ 3600 IN SOA ns1.$ZONE. hostmaster.$ZONE. $SERIAL 14400 3600 1209600 300"
  echo "@ 3600 IN NS ns1.$ZONE."
  echo "ns1 300 IN A 192.0.2.10"
  echo "ns1 300 IN AAAA 2001:db8::10"
  while read -r id; do
    echo "$id 300 IN A 192.0.2.10"
    echo "$id 300 IN AAAA 2001:db8::10"
    echo "$id 3600 IN HTTPS 1 . alpn=\"h2,http/1.1\" ipv4hint=192.0.2.10 ipv6hint=2001:db8::10"
  done <"$WORK/ids"
} >"$WORK/$ZONE.zone"

mkdir -p "$WORK/k"
cat >"$WORK/k/knot.conf" <<EOF
server:
    rundir: "$WORK/k"
    listen: 127.0.0.1@$PORT_K
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$WORK/k"
log:
  - target: stderr
    any: error
zone:
  - domain: $ZONE
    storage: "$WORK"
    file: "$ZONE.zone"
    journal-content: none
    zonefile-sync: -1
EOF
taskset -c 0 knotd -c "$WORK/k/knot.conf" 2>"$WORK/k/log" &
pids+=($!)
PID_K=$!
wait_udp $PORT_K

mkdir -p "$WORK/n"
cat >"$WORK/n/nsd.conf" <<EOF
server:
    ip-address: 127.0.0.1@$PORT_N
    server-count: 1
    zonesdir: "$WORK"
    pidfile: "$WORK/n/nsd.pid"
    database: ""
    zonelistfile: "$WORK/n/zone.list"
    xfrdfile: "$WORK/n/xfrd.state"
    username: ""
    verbosity: 0
    # NSD limits responses per client by default; Knot and Portcullis do not here.
    rrl-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: $ZONE
    zonefile: "$ZONE.zone"
EOF
taskset -c 0 nsd -d -c "$WORK/n/nsd.conf" 2>"$WORK/n/log" &
pids+=($!)
PID_N=$!
wait_udp $PORT_N

# --- query files ----------------------------------------------------------------------------
shuf -r -n 200000 "$WORK/ids" | sed "s/\$/.$ZONE A/" >"$WORK/q-a"
shuf -r -n 200000 "$WORK/ids" | sed "s/\$/.$ZONE HTTPS/" >"$WORK/q-https"
# Random names, distinct: every query a miss for any cache of answers.
python3 -c "
import random, string
r = random.Random(7)
for _ in range(1000000):
    print(''.join(r.choices(string.ascii_lowercase + string.digits, k=12)) + '.$ZONE A')
" >"$WORK/q-nx"

run() { # name pid port workload -> "qps us_per_query"
  local before after qps queries
  before=$(cpu_ticks "$2")
  out=$(taskset -c 1 dnsperf -s 127.0.0.1 -p "$3" -d "$WORK/q-$4" -l "$RUN" -c 8 -q 200 2>&1)
  after=$(cpu_ticks "$2")
  qps=$(echo "$out" | awk '/Queries per second/ {print $4}')
  queries=$(echo "$out" | awk '/Queries completed/ {print $3}')
  tick=$(getconf CLK_TCK)
  awk -v t=$((after - before)) -v hz="$tick" -v q="$queries" -v qps="$qps" \
    'BEGIN { printf "%.0f %.2f\n", qps, (t / hz) * 1e6 / q }'
}

printf "\n%-10s %-11s %10s %12s %10s %10s\n" workload server "QPS" "CPU us/q" "QPS/Knot" "CPU/Knot"
for w in ${WORKLOADS:-a https nx}; do
  read -r kq kc <<<"$(run knot $PID_K $PORT_K $w)"
  for s in portcullis knot nsd; do
    case $s in
      portcullis) read -r q c <<<"$(run $s $PID_P $PORT_P $w)" ;;
      knot) q=$kq c=$kc ;;
      nsd) read -r q c <<<"$(run $s $PID_N $PORT_N $w)" ;;
    esac
    awk -v w=$w -v s=$s -v q="$q" -v c="$c" -v kq="$kq" -v kc="$kc" \
      'BEGIN { printf "%-10s %-11s %10d %12.2f %10.2f %10.2f\n", w, s, q, c, q / kq, c / kc }'
  done
done
echo
echo "N=$N services; ${RUN}s per run; servers on CPU 0, dnsperf on CPU 1 (-c 8 -q 200)."
