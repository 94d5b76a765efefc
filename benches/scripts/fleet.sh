#!/usr/bin/env bash
# The fleet on etcd, whole processes on loopback (release build):
#  1. propagation: 1,000 changes written through node A's API, each timed until node C's DNS
#     answers it (p50/p99/max; target p99 < 50 ms);
#  2. writes per second through one node's API, on etcd and on the embedded store;
#  3. a node joining a fleet of JOIN_SERVICES services (each with its certificate): time from
#     start to ready (target < 10 s) and its memory per service (target <= 2 KiB).
#
#   benches/scripts/fleet.sh                        # JOIN_SERVICES=100000
#   JOIN_SERVICES=20000 WRITE_SECONDS=5 benches/scripts/fleet.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

JOIN_SERVICES=${JOIN_SERVICES:-100000}
WRITE_SECONDS=${WRITE_SECONDS:-10}
CLIENTS=${CLIENTS:-16}
CHANGES=${CHANGES:-1000}

scripts/deps.sh etcd:etcd-server etcdctl:etcd-client curl:curl
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/portcullis-target}
. benches/scripts/common.sh
bench_start fleet
build_portcullis
(cd "$ROOT" && cargo build --release --quiet -p portcullis-benches --bin fleet_probe)
PROBE=$TARGET/release/fleet_probe

now_ms() { date +%s%3N; }
until_ok() { for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }

# --- three etcd members -----------------------------------------------------------------------
cluster=n1=http://127.0.0.1:23380,n2=http://127.0.0.1:23480,n3=http://127.0.0.1:23580
for i in 1 2 3; do
  c=$((23279 + 100 * i)); p=$((c + 1))
  etcd --name "n$i" --data-dir "$WORK/etcd-n$i" --quota-backend-bytes 8589934592 \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-token bench --initial-cluster-state new \
    --logger zap --log-outputs "$WORK/etcd-n$i.log" &
  pids+=($!)
done
until_ok env ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:23379 endpoint health
"$BIN" store new-key --id bench > "$WORK/store.key"

# node NAME IP ADMIN_PORT KIND: writes its config.
node_config() {
  local name=$1 ip=$2 admin=$3 kind=$4
  mkdir -p "$WORK/$name"
  cat >"$WORK/$name/portcullis.toml" <<CONF
[node]
id = "$name"
public_ipv4 = ["$ip"]
[listen]
dns = ["$ip:24053"]
http = "$ip:24080"
https = "$ip:24443"
admin = "127.0.0.1:$admin"
[zone]
name = "fleet.test"
[dns]
policy = "fleet"
[store]
kind = "$kind"
path = "$WORK/$name/state"
encryption_key_file = "$WORK/store.key"
[store.etcd]
endpoints = ["127.0.0.1:23379", "127.0.0.1:23479", "127.0.0.1:23579"]
[log]
level = "warn"
access = false
CONF
}
declare -A node_pids
start() { # name
  "$BIN" serve --config "$WORK/$1/portcullis.toml" >>"$WORK/$1/out.log" 2>&1 &
  node_pids[$1]=$!
  pids+=($!)
}
ready() { curl -sf -o /dev/null "http://127.0.0.1:$1/readyz"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

node_config a 127.0.0.21 24091 etcd
node_config c 127.0.0.23 24093 etcd
start a; start c
until_ok ready 24091; until_ok ready 24093
TOKEN_A=$(cat "$WORK/a/state/admin.token")

echo "== propagation"
"$PROBE" propagation --admin http://127.0.0.1:24091 --token "$TOKEN_A" \
  --dns 127.0.0.23:24053 --zone fleet.test --count "$CHANGES"

echo "== writes per second through one node's API ($CLIENTS clients, ${WRITE_SECONDS}s)"
node_config e 127.0.0.25 24095 embedded
start e; until_ok ready 24095
TOKEN_E=$(cat "$WORK/e/state/admin.token")
# Records: one write each. Services: one write each, then about eight more in the background
# as each is certified (order lock, slot, status steps, certificate), which the creates share
# the store with.
for what in records services; do
  flag=; [ "$what" = records ] && flag=--records
  printf '%-8s on etcd (3 members):   ' "$what"
  "$PROBE" writes --admin http://127.0.0.1:24091 --token "$TOKEN_A" --clients "$CLIENTS" --seconds "$WRITE_SECONDS" $flag
  printf '%-8s on the embedded store: ' "$what"
  "$PROBE" writes --admin http://127.0.0.1:24095 --token "$TOKEN_E" --clients "$CLIENTS" --seconds "$WRITE_SECONDS" $flag
done
kill "${node_pids[e]}"

echo "== a node joining a fleet of $JOIN_SERVICES services"
have=$(curl -sf "http://127.0.0.1:24091/readyz" | sed -E 's/.*"services":([0-9]+).*/\1/')
left=$(( JOIN_SERVICES - have ))
if [ "$left" -gt 0 ]; then
  # Through A: the writes take a while at the rate above; the issuer certifies each.
  secs=$(( left / 300 + 10 ))
  t0=$(now_ms)
  while :; do
    have=$(curl -sf "http://127.0.0.1:24091/readyz" | sed -E 's/.*"services":([0-9]+).*/\1/')
    [ "$have" -ge "$JOIN_SERVICES" ] && break
    "$PROBE" writes --admin http://127.0.0.1:24091 --token "$TOKEN_A" --clients "$CLIENTS" --seconds 5 >/dev/null
  done
  echo "created in $(( ($(now_ms) - t0) / 1000 )) s"
fi
# Issuance goes on in the background (on etcd about a tenth of the create rate per node here):
# wait at most SETTLE_SECONDS for it, and say how far it got.
echo "waiting up to ${SETTLE_SECONDS:-120} s for certificates to settle"
for _ in $(seq 1 "${SETTLE_SECONDS:-120}"); do
  pending=$(curl -sf "http://127.0.0.1:24091/metrics" | awk '/^portcullis_certificates\{status="(pending|ordering|validating|issuing)"\}/ {s += $2} END {print s + 0}')
  [ "$pending" = 0 ] && break
  sleep 1
done
total=$(curl -sf "http://127.0.0.1:24091/readyz" | sed -E 's/.*"services":([0-9]+).*/\1/')
active=$(curl -sf "http://127.0.0.1:24091/metrics" | awk '/^portcullis_certificates\{status="active"\}/ {print $2}')
# The baseline: an empty node's memory.
node_config z 127.0.0.26 24096 embedded
start z; until_ok ready 24096; base=$(rss_kib "${node_pids[z]}"); kill "${node_pids[z]}"
node_config b 127.0.0.22 24092 etcd
join() { # label
  rm -rf "$WORK/b/state"
  local t0 t1 rss
  t0=$(now_ms)
  start b
  until ready 24092; do sleep 0.02; done
  t1=$(now_ms)
  rss=$(rss_kib "${node_pids[b]}")
  echo "joined $1 a fleet of $total services ($active certificates active): ready in $((t1 - t0)) ms," \
    "RSS $((rss / 1024)) MiB, $(awk -v r="$rss" -v b="$base" -v n="$total" 'BEGIN { printf "%.0f", (r - b) * 1024 / n }') B/service over an empty node"
  kill "${node_pids[b]}"; wait "${node_pids[b]}" 2>/dev/null || true
}
join "while the fleet issues,"
# The same with the other nodes paused: the join alone.
kill -STOP "${node_pids[a]}" "${node_pids[c]}"
join "with the fleet quiet,"
kill -CONT "${node_pids[a]}" "${node_pids[c]}"
