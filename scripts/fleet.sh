#!/usr/bin/env bash
# `make fleet`: a three-member etcd cluster and three nodes on loopback, one platform.
# Nodes: 127.0.0.11, .12, .13 (HTTPS 8443, HTTP 8080, DNS 8053 on each; admin 9081-9083).
# etcd: clients on 127.0.0.1:22379, 22479, 22579. State lives in ./.portcullis-fleet.
set -euo pipefail

bin=${1:?usage: fleet.sh PATH-TO-PORTCULLIS}
dir=${PORTCULLIS_FLEET_DIR:-.portcullis-fleet}
backend=${PORTCULLIS_DEMO_BACKEND:-127.0.0.1:3000}
mkdir -p "$dir"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Poll `$@` until it succeeds, for at most 30 s.
until_ok() {
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

cluster=n1=http://127.0.0.1:22380,n2=http://127.0.0.1:22480,n3=http://127.0.0.1:22580
endpoints=()
for i in 1 2 3; do
  c=$((22279 + 100 * i)); p=$((c + 1))
  endpoints+=("\"127.0.0.1:$c\"")
  etcd --name "n$i" --data-dir "$dir/etcd-n$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-token portcullis-fleet --initial-cluster-state new \
    --logger zap --log-outputs "$dir/etcd-n$i.log" &
  pids+=($!)
done
etcd_endpoints=127.0.0.1:22379,127.0.0.1:22479,127.0.0.1:22579
until_ok env ETCDCTL_API=3 etcdctl --endpoints=$etcd_endpoints endpoint health \
  || { echo "error: etcd did not become healthy; see $dir/etcd-n*.log" >&2; exit 1; }

[ -s "$dir/store.key" ] || "$bin" store new-key --id fleet-demo > "$dir/store.key"
chmod 600 "$dir/store.key"

"$bin" demo-backend --listen "$backend" &
pids+=($!)

joined=$(IFS=,; echo "${endpoints[*]}")
for i in 1 2 3; do
  name=$(printf "node-%s" "$(echo abc | cut -c$i)")
  ip=127.0.0.1$i
  state="$dir/$name"
  mkdir -p "$state"
  cat > "$dir/$name.toml" <<TOML
[node]
id = "$name"
public_ipv4 = ["$ip"]

[listen]
dns = ["$ip:8053"]
http = "$ip:8080"
https = "$ip:8443"
admin = "127.0.0.1:908$i"

[zone]
name = "app.localhost"

[dns]
policy = "fleet"

[store]
kind = "etcd"
path = "$state"
encryption_key_file = "$dir/store.key"

[store.etcd]
endpoints = [$joined]
prefix = "/portcullis-fleet/"
TOML
  rm -f "$state/admin.url"
  "$bin" serve --config "$dir/$name.toml" 2> "$dir/$name.log" &
  pids+=($!)
  until_ok test -s "$state/admin.url" \
    || { echo "error: $name did not start; see $dir/$name.log" >&2; exit 1; }
done

# Each node issues with its own dev CA; a name's certificate comes from whichever node
# ordered it, so clients trust all three roots.
cat "$dir"/node-*/dev-ca/root.pem > "$dir/roots.pem"

a=("$bin" --state-dir "$dir/node-a")
id=$("${a[@]}" service create --backend "$backend" --wait | awk '/^created service / { print $3; exit }')
[ -n "$id" ] || { echo "error: could not create the demo service" >&2; exit 1; }

cat <<MSG

A fleet of three nodes on one etcd cluster is up.
$("${a[@]}" node list)

Service $id was created through node-a. Every node serves it:
  curl --cacert $dir/roots.pem --resolve $id.app.localhost:8443:127.0.0.12 https://$id.app.localhost:8443/
  dig @127.0.0.13 -p 8053 +short $id.app.localhost A      # every live node's address

Change it through any node, and watch the others follow:
  $bin --state-dir $dir/node-c service set-backends $id --backend 127.0.0.1:3001

Kill a node (kill -9 the process of $dir/node-b.toml) and it leaves DNS answers within its
lease (10 s); stop etcd members and the nodes keep serving, refusing changes with 503.

Ctrl-C stops the nodes, etcd and the demo backend.
MSG
wait "${pids[@]}"
