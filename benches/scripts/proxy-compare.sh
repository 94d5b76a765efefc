#!/usr/bin/env bash
# Portcullis, nginx and HAProxy as TLS-terminating reverse proxies, side by side in one run.
#
# Each proxy gets one worker, pinned to CPU 0; the backend (a one-worker nginx answering a fixed
# body) and the load generators share CPU 1. On 2 cores the load generator can be the
# bottleneck, so besides requests/s and latency this prints the proxy's CPU time per 1,000
# requests, the fairer figure, and ratios to nginx.
#
#   benches/scripts/proxy-compare.sh            # DURATION=10 CONNS=64 by default
#
# Needs root (apt for nginx, haproxy, wrk and h2load when missing; a private mount namespace so
# the load generators resolve the test name to loopback without touching /etc/hosts).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-10}
NEWCONN_CONNS=${NEWCONN_CONNS:-16}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

scripts/deps.sh nginx:nginx-light haproxy:haproxy wrk:wrk h2load:nghttp2-client openssl:openssl unshare:util-linux
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/portcullis-target}
. benches/scripts/common.sh
bench_start proxy
build_portcullis

BACKEND=127.0.0.1:18080
P_HTTPS=18443 N_HTTPS=18444 H_HTTPS=18445

# --- the backend -----------------------------------------------------------------------------
start_backend "$BACKEND" "$LOAD_CPU"

# --- Portcullis ------------------------------------------------------------------------------
mkdir -p "$WORK/portcullis"
cat >"$WORK/portcullis/portcullis.toml" <<CONF
[node]
id = "bench"
public_ipv4 = ["127.0.0.1"]
workers = 1
[listen]
dns = ["127.0.0.1:0"]
http = "127.0.0.1:18081"
https = "127.0.0.1:$P_HTTPS"
admin = "127.0.0.1:18090"
[zone]
name = "bench.test"
[store]
path = "$WORK/portcullis/state"
[log]
level = "warn"
access = false
CONF
taskset -c "$PROXY_CPU" "$BIN" serve --config "$WORK/portcullis/portcullis.toml" >"$WORK/portcullis/out.log" 2>&1 &
portcullis_pid=$!
pids+=("$portcullis_pid")
wait_port 18090
domain=$("$BIN" --state-dir "$WORK/portcullis/state" service create --backend "$BACKEND" --json |
  sed -n 's/.*"canonical_domain": "\([^"]*\)".*/\1/p')
[ -n "$domain" ] || { echo "error: could not create the bench service" >&2; exit 1; }
# The health checks would add their own requests to the backend: off for the benchmark.
id=${domain%%.*}
curl -sf -X PATCH -H "Authorization: Bearer $(cat "$WORK/portcullis/state/admin.token")" \
  -H 'content-type: application/json' -d '{"options":{"health_check":{"enabled":false}}}' \
  "http://127.0.0.1:18090/v1/services/$id" >/dev/null

# --- one certificate for nginx and HAProxy, same kind as Portcullis's (ECDSA P-256) ----------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=$domain" -addext "subjectAltName=DNS:$domain" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/combined.pem"

# --- nginx -----------------------------------------------------------------------------------
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  ssl_session_cache shared:SSL:10m;
  upstream backend { server $BACKEND; keepalive 128; }
  server {
    listen 127.0.0.1:$N_HTTPS ssl http2;
    server_name $domain;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
CONF
taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
nginx_pid=$!
pids+=("$nginx_pid")

# --- HAProxy ---------------------------------------------------------------------------------
cat >"$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option forwardfor
  http-reuse always
frontend fe
  bind 127.0.0.1:$H_HTTPS ssl crt $WORK/combined.pem alpn h2,http/1.1
  default_backend be
backend be
  server b1 $BACKEND
CONF
taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=("$haproxy_pid")
wait_port "$N_HTTPS"
wait_port "$H_HTTPS"

# --- measuring -------------------------------------------------------------------------------
printf '127.0.0.1 localhost\n127.0.0.1 %s\n' "$domain" >"$WORK/hosts"
# Runs a load generator pinned to the load CPU, resolving $domain to loopback.
load() {
  unshare -m sh -c 'mount --bind "$0" /etc/hosts && cpu=$1 && shift && exec taskset -c "$cpu" "$@"' \
    "$WORK/hosts" "$LOAD_CPU" "$@"
}

# CPU seconds (user + system) used so far by a process and its children threads/processes.
cpu_of() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    if [ -r "/proc/$pid/stat" ]; then
      # Fields 14 and 15: utime and stime, in clock ticks.
      total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    fi
  done
  echo "$total"
}
ticks=$(getconf CLK_TCK)

results=()
run() { # name pid port scenario
  local name=$1 pid=$2 port=$3 scenario=$4 out before after reqs rps p99 cpu
  before=$(cpu_of "$pid")
  case $scenario in
    h1)
      out=$(load wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "https://$domain:$port/")
      reqs=$(echo "$out" | awk '/requests in/ {print $1}')
      rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
      p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
      ;;
    newconn)
      out=$(load wrk -t1 -c"$NEWCONN_CONNS" -d"${DURATION}s" --latency -H 'Connection: close' "https://$domain:$port/")
      reqs=$(echo "$out" | awk '/requests in/ {print $1}')
      rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
      p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
      ;;
    h2)
      out=$(load h2load -c"$H2_CLIENTS" -m"$H2_STREAMS" -D"$DURATION" "https://$domain:$port/")
      reqs=$(echo "$out" | awk '/^requests:/ {print $4}')
      rps=$(echo "$out" | awk '/^finished in/ {print $4}')
      # h2load reports min, max and mean, not percentiles: show the mean and the max.
      p99=$(echo "$out" | awk '/^time for request:/ {print "mean:" $6 "/max:" $5}')
      ;;
  esac
  after=$(cpu_of "$pid")
  cpu=$(awk -v b="$before" -v a="$after" -v t="$ticks" -v r="$reqs" 'BEGIN { if (r > 0) printf "%.1f", (a - b) / t / r * 1000 * 1000; else print "-" }')
  results+=("$scenario $name ${rps:-0} ${p99:--} $cpu")
}

for scenario in h1 h2 newconn; do
  run nginx "$nginx_pid" "$N_HTTPS" "$scenario"
  run haproxy "$haproxy_pid" "$H_HTTPS" "$scenario"
  run portcullis "$portcullis_pid" "$P_HTTPS" "$scenario"
done

echo
echo "HTTPS proxy, one worker each on CPU $PROXY_CPU; backend and load on CPU $LOAD_CPU; ${DURATION}s per run"
echo "h1: wrk -c$CONNS keep-alive; h2: h2load -c$H2_CLIENTS -m$H2_STREAMS; newconn: wrk -c$NEWCONN_CONNS, Connection: close (a full TLS handshake per request)"
printf '%-8s %-10s %12s %22s %14s %10s %12s\n' scenario proxy "req/s" "p99 (h2: mean/max)" "CPU ms/1k req" "req/s÷nginx" "CPU÷nginx"
for scenario in h1 h2 newconn; do
  base=$(printf '%s\n' "${results[@]}" | awk -v s="$scenario" '$1 == s && $2 == "nginx" {print $3, $5}')
  printf '%s\n' "${results[@]}" | awk -v s="$scenario" -v base="$base" '
    BEGIN { split(base, b, " ") }
    $1 == s {
      r = (b[1] > 0) ? sprintf("%.2f", $3 / b[1]) : "-";
      c = (b[2] > 0 && $5 != "-") ? sprintf("%.2f", $5 / b[2]) : "-";
      printf "%-8s %-10s %12s %22s %14s %10s %12s\n", $1, $2, $3, $4, $5, r, c
    }'
done
