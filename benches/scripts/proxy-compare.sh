#!/usr/bin/env bash
# Portcullis, nginx and HAProxy as TLS-terminating reverse proxies, side by side in one run.
#
# 1. Requests: each proxy with one worker pinned to CPU 0 (backend and load generators on
#    CPU 1), then with two workers on both CPUs. Prints requests/s, p99 and the proxy's CPU
#    time per request (the fairer figure when the load generator shares the machine), with
#    ratios to nginx, for HTTP/1.1 keep-alive, HTTP/2 and a full handshake per request.
# 2. Memory per idle client connection: RSS growth over IDLE_CONNS TLS connections, after the
#    handshake alone and after one HTTP/1.1 request on each, each proxy freshly started.
# 3. Bulk: CPU seconds per GiB moved, downloading and uploading BULK_MIB bodies BULK_TIMES
#    times over HTTPS/1.1.
# 4. Reloads under load: wrk -c8 keep-alive for 8 s with two reloads in it (nginx: SIGHUP;
#    Portcullis: `POST /v1/node/reload`, a new process each time); wrk's socket errors and
#    non-2xx answers are the failed requests. (HAProxy's seamless reload needs its master-worker
#    mode and a listener-passing socket: not set up here.)
#
#   benches/scripts/proxy-compare.sh        # DURATION=10 CONNS=64 IDLE_CONNS=5000 BULK_MIB=256
#   PARTS="requests" benches/scripts/proxy-compare.sh   # any of: requests memory bulk reload
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
IDLE_CONNS=${IDLE_CONNS:-5000}
BULK_MIB=${BULK_MIB:-256}
BULK_TIMES=${BULK_TIMES:-4}
PARTS=${PARTS:-requests memory bulk reload}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

scripts/deps.sh nginx:nginx-light haproxy:haproxy wrk:wrk h2load:nghttp2-client openssl:openssl unshare:util-linux curl:curl
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/portcullis-target}
. benches/scripts/common.sh
bench_start proxy
build_portcullis
(cd "$ROOT" && cargo build --release --quiet -p portcullis-benches --bin idle_conns --bin bulk_backend)
TOOLS=$TARGET/release
ulimit -n "$(ulimit -Hn)"

BACKEND=127.0.0.1:18080
BULK_BACKEND=127.0.0.1:18082
P_HTTPS=18443 N_HTTPS=18444 H_HTTPS=18445
ticks=$(getconf CLK_TCK)

# --- backends --------------------------------------------------------------------------------
start_backend "$BACKEND" "$LOAD_CPU"
taskset -c "$LOAD_CPU" "$TOOLS/bulk_backend" --listen "$BULK_BACKEND" &
pids+=($!)
wait_port "${BULK_BACKEND##*:}"

# --- Portcullis: its state (and the service) made once, the process started per round --------
mkdir -p "$WORK/portcullis"
portcullis_conf() { # workers
  cat >"$WORK/portcullis/portcullis.toml" <<CONF
[node]
id = "bench"
public_ipv4 = ["127.0.0.1"]
workers = $1
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
}

start_portcullis() { # workers cpus
  portcullis_conf "$1"
  taskset -c "$2" "$BIN" serve --config "$WORK/portcullis/portcullis.toml" >>"$WORK/portcullis/out.log" 2>&1 &
  portcullis_pid=$!
  pids+=("$portcullis_pid")
  wait_port 18090
  wait_port "$P_HTTPS"
}

start_portcullis 1 "$PROXY_CPU"
domain=$("$BIN" --state-dir "$WORK/portcullis/state" service create --backend "$BACKEND" --json |
  sed -n 's/.*"canonical_domain": "\([^"]*\)".*/\1/p')
[ -n "$domain" ] || { echo "error: could not create the bench service" >&2; exit 1; }
id=${domain%%.*}
admin() { # method path body
  curl -sf -X "$1" -H "Authorization: Bearer $(cat "$WORK/portcullis/state/admin.token")" \
    -H 'content-type: application/json' -d "$3" "http://127.0.0.1:18090$2" >/dev/null
}
# The health checks would add their own requests to the backend: off for the benchmark.
admin PATCH "/v1/services/$id" '{"options":{"health_check":{"enabled":false}}}'
# The bulk backend under its own path prefix would need routing by path; a second service
# does it by name instead.
bulk_domain=$("$BIN" --state-dir "$WORK/portcullis/state" service create --backend "$BULK_BACKEND" --json |
  sed -n 's/.*"canonical_domain": "\([^"]*\)".*/\1/p')
admin PATCH "/v1/services/${bulk_domain%%.*}" '{"options":{"health_check":{"enabled":false}}}'
stop_portcullis() {
  kill "$portcullis_pid" 2>/dev/null || true
  wait "$portcullis_pid" 2>/dev/null || true
}
stop_portcullis

# --- one certificate for nginx and HAProxy, same kind as Portcullis's (ECDSA P-256) ----------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=$domain" -addext "subjectAltName=DNS:$domain,DNS:$bulk_domain" \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/combined.pem"

start_nginx() { # workers cpus
  mkdir -p "$WORK/nginx"
  cat >"$WORK/nginx/nginx.conf" <<CONF
worker_processes $1;
worker_rlimit_nofile 20000;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 16384; }
http {
  access_log off;
  keepalive_requests 1000000;
  ssl_session_cache shared:SSL:10m;
  server_names_hash_bucket_size 128;
  # Bodies stream, through buffers sized for bulk rather than to temporary files.
  client_max_body_size 0;
  client_body_buffer_size 64k;
  proxy_request_buffering off;
  proxy_buffers 16 64k;
  proxy_busy_buffers_size 128k;
  proxy_max_temp_file_size 0;
  upstream backend { server $BACKEND; keepalive 128; }
  upstream bulk { server $BULK_BACKEND; keepalive 16; }
  server {
    listen 127.0.0.1:$N_HTTPS ssl http2 reuseport;
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
  server {
    listen 127.0.0.1:$N_HTTPS ssl http2;
    server_name $bulk_domain;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    location / {
      proxy_pass http://bulk;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
    }
  }
}
CONF
  taskset -c "$2" nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
  nginx_pid=$!
  pids+=("$nginx_pid")
  wait_port "$N_HTTPS"
}
stop_nginx() {
  kill -QUIT "$nginx_pid" 2>/dev/null || true
  wait "$nginx_pid" 2>/dev/null || true
}

start_haproxy() { # workers cpus
  cat >"$WORK/haproxy.cfg" <<CONF
global
  nbthread $1
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
  use_backend bulk if { req.hdr(host) -m beg $bulk_domain }
  default_backend be
backend be
  server b1 $BACKEND
backend bulk
  server b1 $BULK_BACKEND
CONF
  taskset -c "$2" haproxy -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 &
  haproxy_pid=$!
  pids+=("$haproxy_pid")
  wait_port "$H_HTTPS"
}
stop_haproxy() {
  kill "$haproxy_pid" 2>/dev/null || true
  wait "$haproxy_pid" 2>/dev/null || true
}

start_proxy() { # name workers cpus
  "start_$1" "$2" "$3"
}
stop_proxy() { "stop_$1"; }
pid_of() { # name
  case $1 in
    nginx) echo "$nginx_pid" ;;
    haproxy) echo "$haproxy_pid" ;;
    portcullis) echo "$portcullis_pid" ;;
  esac
}
port_of() { # name
  case $1 in
    nginx) echo "$N_HTTPS" ;;
    haproxy) echo "$H_HTTPS" ;;
    portcullis) echo "$P_HTTPS" ;;
  esac
}

printf '127.0.0.1 localhost\n127.0.0.1 %s\n127.0.0.1 %s\n' "$domain" "$bulk_domain" >"$WORK/hosts"
# Runs a load generator on CPUs $cpus, resolving the test names to loopback.
load() { # cpus command...
  unshare -m sh -c 'mount --bind "$0" /etc/hosts && cpu=$1 && shift && exec taskset -c "$cpu" "$@"' \
    "$WORK/hosts" "$@"
}

# CPU clock ticks (user + system) used so far by a process and its child processes (nginx's
# workers), threads included.
cpu_of() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    if [ -r "/proc/$pid/stat" ]; then
      total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    fi
  done
  echo "$total"
}

# Resident memory (KiB) of a process and its child processes.
rss_of() {
  local total=0 pid kb
  for pid in "$1" $(pgrep -P "$1" || true); do
    kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total=$((total + ${kb:-0}))
  done
  echo "$total"
}

# --- 1. requests -----------------------------------------------------------------------------
results=()
run() { # workers name scenario load-cpus
  local workers=$1 name=$2 scenario=$3 cpus=$4 pid port out before after reqs rps p99 cpu
  pid=$(pid_of "$name")
  port=$(port_of "$name")
  before=$(cpu_of "$pid")
  case $scenario in
    h1)
      out=$(load "$cpus" wrk -t"$workers" -c"$CONNS" -d"${DURATION}s" --latency "https://$domain:$port/")
      reqs=$(echo "$out" | awk '/requests in/ {print $1}')
      rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
      p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
      ;;
    newconn)
      out=$(load "$cpus" wrk -t"$workers" -c"$NEWCONN_CONNS" -d"${DURATION}s" --latency -H 'Connection: close' "https://$domain:$port/")
      reqs=$(echo "$out" | awk '/requests in/ {print $1}')
      rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
      p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
      ;;
    h2)
      out=$(load "$cpus" h2load -t"$workers" -c"$H2_CLIENTS" -m"$H2_STREAMS" -D"$DURATION" "https://$domain:$port/")
      reqs=$(echo "$out" | awk '/^requests:/ {print $4}')
      rps=$(echo "$out" | awk '/^finished in/ {print $4}')
      # h2load reports min, max and mean, not percentiles: show the mean and the max.
      p99=$(echo "$out" | awk '/^time for request:/ {print "mean:" $6 "/max:" $5}')
      ;;
  esac
  after=$(cpu_of "$pid")
  cpu=$(awk -v b="$before" -v a="$after" -v t="$ticks" -v r="$reqs" 'BEGIN { if (r > 0) printf "%.1f", (a - b) / t / r * 1000 * 1000; else print "-" }')
  results+=("w$workers $scenario $name ${rps:-0} ${p99:--} $cpu")
}

if [[ " $PARTS " == *" requests "* ]]; then
  for workers in 1 2; do
    if [ "$workers" = 1 ]; then cpus=$PROXY_CPU loadcpus=$LOAD_CPU; else cpus=0,1 loadcpus=0,1; fi
    for name in nginx haproxy portcullis; do
      start_proxy "$name" "$workers" "$cpus"
      for scenario in h1 h2 newconn; do
        run "$workers" "$name" "$scenario" "$loadcpus"
      done
      stop_proxy "$name"
    done
  done
  echo
  echo "HTTPS proxy. w1: one worker each on CPU $PROXY_CPU, backend and load on CPU $LOAD_CPU; w2: two workers each, sharing both CPUs with the load. ${DURATION}s per run"
  echo "h1: wrk -c$CONNS keep-alive; h2: h2load -c$H2_CLIENTS -m$H2_STREAMS; newconn: wrk -c$NEWCONN_CONNS, Connection: close (a full TLS handshake per request)"
  printf '%-3s %-8s %-10s %12s %22s %14s %10s %12s\n' w scenario proxy "req/s" "p99 (h2: mean/max)" "CPU µs/req" "req/s÷nginx" "CPU÷nginx"
  for workers in w1 w2; do
    for scenario in h1 h2 newconn; do
      base=$(printf '%s\n' "${results[@]}" | awk -v w="$workers" -v s="$scenario" '$1 == w && $2 == s && $3 == "nginx" {print $4, $6}')
      printf '%s\n' "${results[@]}" | awk -v w="$workers" -v s="$scenario" -v base="$base" '
        BEGIN { split(base, b, " ") }
        $1 == w && $2 == s {
          r = (b[1] > 0) ? sprintf("%.2f", $4 / b[1]) : "-";
          c = (b[2] > 0 && $6 != "-") ? sprintf("%.2f", $6 / b[2]) : "-";
          printf "%-3s %-8s %-10s %12s %22s %14s %10s %12s\n", $1, $2, $3, $4, $5, $6, r, c
        }'
    done
  done
fi

# --- 2. memory per idle connection -----------------------------------------------------------
if [[ " $PARTS " == *" memory "* ]]; then
  memory=()
  for name in nginx haproxy portcullis; do
    for mode in handshake request; do
      start_proxy "$name" 1 "$PROXY_CPU"
      pid=$(pid_of "$name")
      port=$(port_of "$name")
      flag=""
      [ "$mode" = request ] && flag="--request"
      # One connection first, so what every process sets up once is in the baseline.
      printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$domain" |
        timeout 5 openssl s_client -quiet -connect "127.0.0.1:$port" -servername "$domain" >/dev/null 2>&1 || true
      sleep 0.5
      before=$(rss_of "$pid")
      mkfifo "$WORK/hold"
      taskset -c "$LOAD_CPU" "$TOOLS/idle_conns" --addr "127.0.0.1:$port" --host "$domain" \
        --count "$IDLE_CONNS" $flag <"$WORK/hold" >"$WORK/idle.out" &
      idle_pid=$!
      exec 7>"$WORK/hold"
      for _ in $(seq 1 600); do grep -q ready "$WORK/idle.out" 2>/dev/null && break; sleep 0.1; done
      # Let the allocators settle (freed buffers go back) before reading the figure.
      sleep 1
      after=$(rss_of "$pid")
      exec 7>&-
      wait "$idle_pid" || true
      rm -f "$WORK/hold"
      memory+=("$name $mode $(awk -v b="$before" -v a="$after" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (a - b) / n }')")
      stop_proxy "$name"
    done
  done
  echo
  echo "Memory per idle client connection: RSS growth (KB) over $IDLE_CONNS TLS connections, one worker each"
  printf '%-10s %16s %22s\n' proxy "handshake only" "after one request"
  for name in nginx haproxy portcullis; do
    hs=$(printf '%s\n' "${memory[@]}" | awk -v n="$name" '$1 == n && $2 == "handshake" {print $3}')
    rq=$(printf '%s\n' "${memory[@]}" | awk -v n="$name" '$1 == n && $2 == "request" {print $3}')
    printf '%-10s %16s %22s\n' "$name" "$hs" "$rq"
  done
fi

# --- 3. bulk transfers -----------------------------------------------------------------------
if [[ " $PARTS " == *" bulk "* ]]; then
  bytes=$((BULK_MIB * 1024 * 1024))
  head -c "$bytes" /dev/zero >"$WORK/upload.bin"
  bulk=()
  for name in nginx haproxy portcullis; do
    start_proxy "$name" 1 "$PROXY_CPU"
    pid=$(pid_of "$name")
    port=$(port_of "$name")
    for direction in download upload; do
      before=$(cpu_of "$pid")
      start=$(date +%s.%N)
      for _ in $(seq 1 "$BULK_TIMES"); do
        if [ "$direction" = download ]; then
          taskset -c "$LOAD_CPU" curl -sfk --http1.1 --resolve "$bulk_domain:$port:127.0.0.1" \
            -o /dev/null "https://$bulk_domain:$port/big?bytes=$bytes"
        else
          taskset -c "$LOAD_CPU" curl -sfk --http1.1 --resolve "$bulk_domain:$port:127.0.0.1" \
            -H 'Expect:' -T "$WORK/upload.bin" -o /dev/null "https://$bulk_domain:$port/upload"
        fi
      done
      end=$(date +%s.%N)
      after=$(cpu_of "$pid")
      bulk+=("$name $direction $(awk -v b="$before" -v a="$after" -v t="$ticks" -v n="$BULK_TIMES" -v m="$BULK_MIB" -v s="$start" -v e="$end" 'BEGIN { gib = n * m / 1024; printf "%.2f %.0f", (a - b) / t / gib, n * m * 1.048576 / (e - s) }')")
    done
    stop_proxy "$name"
  done
  echo
  echo "Bulk over HTTPS/1.1: ${BULK_MIB} MiB x $BULK_TIMES each way, one worker each; CPU seconds per GiB (MB/s)"
  printf '%-10s %20s %20s\n' proxy download upload
  for name in nginx haproxy portcullis; do
    dl=$(printf '%s\n' "${bulk[@]}" | awk -v n="$name" '$1 == n && $2 == "download" {print $3 " (" $4 ")"}')
    ul=$(printf '%s\n' "${bulk[@]}" | awk -v n="$name" '$1 == n && $2 == "upload" {print $3 " (" $4 ")"}')
    printf '%-10s %20s %20s\n' "$name" "$dl" "$ul"
  done
fi

# --- 4. reloads under load -------------------------------------------------------------------
if [[ " $PARTS " == *" reload "* ]]; then
  reloaded=()
  for name in nginx portcullis; do
    start_proxy "$name" 1 "$PROXY_CPU"
    port=$(port_of "$name")
    load "$LOAD_CPU" wrk -t1 -c8 -d8s "https://$domain:$port/" >"$WORK/reload-$name.out" 2>&1 &
    wrk_pid=$!
    for _ in 1 2; do
      sleep 2.5
      case $name in
        nginx) kill -HUP "$nginx_pid" ;;
        portcullis)
          admin POST /v1/node/reload '{}'
          # The node is a new process now: it is the one to stop at the end.
          portcullis_pid=$(cat "$WORK/portcullis/state/portcullis.pid")
          pids+=("$portcullis_pid")
          ;;
      esac
    done
    wait "$wrk_pid" || true
    out=$(cat "$WORK/reload-$name.out")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    errors=$(echo "$out" | awk '/Socket errors/ {gsub(",", ""); print $4 + $6 + $8 + $10}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
    reloaded+=("$name ${reqs:-0} ${errors:-0} ${non2xx:-0}")
    stop_proxy "$name"
  done
  echo
  echo "Two reloads during 8 s of wrk -c8 keep-alive, one worker each"
  printf '%-10s %10s %16s %10s\n' proxy requests "socket errors" "non-2xx"
  for row in "${reloaded[@]}"; do
    # shellcheck disable=SC2086
    printf '%-10s %10s %16s %10s\n' $row
  done
fi
