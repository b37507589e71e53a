#!/usr/bin/env bash
# CPU time per proxied request (docs/benchmarks.md): nginx and HAProxy as the
# shared proxy-overhead script configures them, and the gateway on
# bench/overhead.toml, each driven in turn by the same wrk load against the
# same stand-in upstream. For each, the CPU its processes spent (user and
# system, from /proc) divided by the requests wrk completed: a steadier
# measure of a proxy's cost than requests per second, which moves with
# whatever else the two cores run.
#   bench/cpu-per-request.sh                 # ROUNDS=3 DUR=6 CONNS=32
#   GATEWAY_BIN=/path/to/quotagate bench/cpu-per-request.sh
#   BARE=1 bench/cpu-per-request.sh          # also examples/bare_proxy, the stack's floor,
#                                            # on hyper's server (bare) and on axum's (bare-axum)
# Needs: nginx, haproxy, wrk (Debian packages of those names).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}; DUR=${DUR:-6}; CONNS=${CONNS:-32}
anchors=${ANCHORS:-../shared/bench/anchors}
for tool in nginx haproxy wrk; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y nginx haproxy wrk" >&2; exit 2; }
done
[[ -d $anchors ]] || { echo "no anchor configs at $anchors (set ANCHORS)" >&2; exit 2; }
if [[ -z ${GATEWAY_BIN:-} ]]; then
  cargo build --release --quiet --bin quotagate
  GATEWAY_BIN=${CARGO_TARGET_DIR:-target}/release/quotagate
fi
if [[ -n ${BARE:-} && -z ${BARE_BIN:-} ]]; then
  cargo build --release --quiet --example bare_proxy
  BARE_BIN=${CARGO_TARGET_DIR:-target}/release/examples/bare_proxy
fi

. bench/token.sh
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for f in upstream-nginx.conf nginx-proxy.conf; do sed "s#/tmp/#$work/#g" "$anchors/$f" >"$work/$f"; done
nginx -c "$work/upstream-nginx.conf" -p "$work" & pids+=($!)
nginx -c "$work/nginx-proxy.conf" -p "$work" & nginx_proxy=$!; pids+=($nginx_proxy)
haproxy -f "$anchors/haproxy.cfg" -q & haproxy_pid=$!; pids+=($haproxy_pid)
"$GATEWAY_BIN" --config bench/overhead.toml >"$work/gateway.log" 2>&1 & gateway_pid=$!; pids+=($gateway_pid)
targets=(nginx:18002:$nginx_proxy haproxy:18003:$haproxy_pid gateway:18004:$gateway_pid)
if [[ -n ${BARE_BIN:-} ]]; then
  "$BARE_BIN" 127.0.0.1:18007 http://127.0.0.1:18001 >"$work/bare.log" 2>&1 & bare_pid=$!; pids+=($bare_pid)
  "$BARE_BIN" 127.0.0.1:18008 http://127.0.0.1:18001 "$(nproc)" axum >"$work/bare-axum.log" 2>&1 & bare_axum_pid=$!
  pids+=($bare_axum_pid)
  targets+=(bare:18007:$bare_pid bare-axum:18008:$bare_axum_pid)
fi
for t in "${targets[@]}"; do
  port=${t#*:}; port=${port%%:*}
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/api/incidents" -H "Authorization: Bearer $TOKEN" && break
    sleep 0.1
  done
done

# A proxy's processes: the process and its children (nginx's workers).
procs() { echo "$1"; pgrep -P "$1" || true; }
# CPU ticks (user + system) of every thread of the given processes.
ticks() {
  local t=0 p s f
  for p in "$@"; do
    for s in /proc/"$p"/task/*/stat; do
      read -ra f < <(sed 's/.*) //' "$s" 2>/dev/null) || continue
      t=$((t + f[11] + f[12]))
    done
  done
  echo "$t"
}
hz=$(getconf CLK_TCK)
printf '%-8s %8s %10s %14s\n' target round req/s "CPU us/req"
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    IFS=: read -r name port pid <<<"$t"
    mapfile -t ps < <(procs "$pid")
    before=$(ticks "${ps[@]}")
    out=$(wrk -t1 -c"$CONNS" -d"${DUR}s" -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$port/api/incidents?\$top=10")
    after=$(ticks "${ps[@]}")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out"); rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    us=$(awk -v a="$after" -v b="$before" -v n="$reqs" -v hz="$hz" 'BEGIN { printf "%.2f", (a - b) * 1e6 / hz / n }')
    printf '%-8s %8s %10.0f %14s\n' "$name" "$r" "$rps" "$us"
    echo "$name $us" >>"$work/rows"
  done
done
awk '{ s[$1] += $2; n[$1]++ } END {
  g = s["gateway"] / n["gateway"]; ng = s["nginx"] / n["nginx"]; h = s["haproxy"] / n["haproxy"]
  printf "mean CPU us/req: nginx %.2f, haproxy %.2f, gateway %.2f; gateway/nginx %.2f, gateway/haproxy %.2f\n", ng, h, g, g / ng, g / h
  if ("bare" in n) { b = s["bare"] / n["bare"]; a = s["bare-axum"] / n["bare-axum"]
    printf "bare proxy %.2f us/req: bare/nginx %.2f, bare/haproxy %.2f, gateway/bare %.2f\n", b, b / ng, b / h, g / b
    printf "bare proxy on axum %.2f us/req: bare-axum/bare %.2f, gateway/bare-axum %.2f\n", a, a / b, g / a }
}' "$work/rows"
