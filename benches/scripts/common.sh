# Sourced by the compare scripts: the repository root, a work directory removed on exit with
# every process the script started, the release binary, and waiting for a port.
#
#   . "$(dirname "$0")/common.sh"; bench_start NAME

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# PORTCULLIS_BIN runs another build (an older commit's, for a before-and-after figure) as is.
BIN=${PORTCULLIS_BIN:-$TARGET/release/portcullis}
pids=()

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}

# Makes $WORK and arranges the cleanup.
bench_start() { # name
  WORK=$(mktemp -d "/tmp/portcullis-$1-bench.XXXXXX")
  trap bench_cleanup EXIT
}

build_portcullis() {
  [ -n "${PORTCULLIS_BIN:-}" ] && return 0
  (cd "$ROOT" && cargo build --release --quiet --bin portcullis)
}

wait_port() { # port
  for _ in $(seq 1 400); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.025
  done
  echo "nothing listens on port $1" >&2
  exit 1
}

# A one-worker nginx answering a fixed body at ADDR (ip:port), as a backend; runs on CPU $2 when
# given. Its process joins the cleanup.
start_backend() { # addr [cpu]
  mkdir -p "$WORK/backend"
  cat >"$WORK/backend/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen $1 reuseport;
    location / { default_type text/plain; return 200 "hello from the backend\n"; }
  }
}
CONF
  if [ -n "${2:-}" ]; then
    taskset -c "$2" nginx -c "$WORK/backend/nginx.conf" -p "$WORK/backend" &
  else
    nginx -c "$WORK/backend/nginx.conf" -p "$WORK/backend" &
  fi
  pids+=($!)
  wait_port "${1##*:}"
}

# Pebble's own TLS: a CA ($WORK/ca.pem, for issuer.trust_roots and curl) and a certificate for
# 127.0.0.1 signed by it ($WORK/pebble.pem and .key).
pebble_tls() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=pebble bench CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=pebble" \
    -keyout "$WORK/pebble.key" -out "$WORK/pebble.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$WORK/san.ext"
  openssl x509 -req -in "$WORK/pebble.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/san.ext" -out "$WORK/pebble.pem" 2>/dev/null
}
