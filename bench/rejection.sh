#!/usr/bin/env bash
# Cost of a local rejection (docs/benchmarks.md): requests per second the
# release gateway answers with its own 429 on an exhausted key, against
# references measured in the same run with the same wrk load:
#
#   upstream          the nginx stand-in upstream alone (../shared/bench/anchors)
#   nginx-reject      nginx limit_req (1 r/m per Authorization) answering 429
#   gateway-reject    the gateway, /api/incidents on an exhausted key: local 429
#   gateway-forward   the same gateway process, /api/alerts: metered, admitted,
#                     forwarded to the stand-in upstream
#
#   cargo build --release
#   bench/rejection.sh        # or: unshare -n bash -c 'ip link set lo up && bench/rejection.sh'
#
# Targets alternate within a round; the median of the rounds is printed with
# each target's throughput over gateway-reject's, and the share of non-2xx
# answers (the reject targets' 429s; none for the others). Before measuring,
# the script spends each rejecting target's key and checks that the next
# answer is a 429, the gateway's marked x-quotagate-throttled-by: gateway.
# Needs nginx, wrk and curl. Uses the loopback ports 18101-18104.
# Env: BIN, ANCHORS, DUR (seconds per measurement, 8), CONNS (32), ROUNDS (3).
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/quotagate}
ANCHORS=${ANCHORS:-../shared/bench/anchors}
DUR=${DUR:-8}; CONNS=${CONNS:-32}; ROUNDS=${ROUNDS:-3}
for tool in nginx wrk curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y nginx wrk curl" >&2; exit 2; }
done
[[ -x $BIN ]] || { echo "no gateway binary at $BIN: cargo build --release" >&2; exit 2; }
. bench/token.sh
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
sed -e "s#/tmp/#$work/#g" -e 's#127.0.0.1:18001#127.0.0.1:18101#' "$ANCHORS/upstream-nginx.conf" >"$work/upstream.conf"
cat >"$work/reject.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/reject.pid;
error_log $work/reject.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  limit_req_zone \$http_authorization zone=tenants:10m rate=1r/m;
  limit_req_status 429;
  limit_req_log_level info;
  upstream defender { server 127.0.0.1:18101; keepalive 64; }
  server {
    listen 127.0.0.1:18102;
    location / {
      limit_req zone=tenants;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://defender;
    }
  }
}
NGINX
nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
nginx -c "$work/reject.conf" -p "$work" & pids+=($!)
"$BIN" --config bench/rejection.toml >"$work/gateway.log" 2>&1 & pids+=($!)
targets=(upstream:18101:/api/incidents nginx-reject:18102:/api/incidents gateway-reject:18103:/api/incidents gateway-forward:18103:/api/alerts)
status() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1$2" -H "Authorization: Bearer $TOKEN"; }
for t in upstream:18101 gateway:18104; do
  ok=0
  for _ in $(seq 150); do
    if curl -s -o /dev/null "http://127.0.0.1:${t#*:}/"; then ok=1; break; fi
    sleep 0.1
  done
  ((ok)) || { echo "${t%%:*} did not start on port ${t#*:}"; tail -5 "$work/gateway.log"; exit 1; }
done
# Spend the key: the first call of each rejecting target goes through, every later one is refused.
for t in nginx-reject:18102 gateway-reject:18103; do
  first=$(status "${t#*:}" /api/incidents); then=$(status "${t#*:}" /api/incidents)
  [[ $first == 200 && $then == 429 ]] || { echo "${t%%:*}: expected 200 then 429, got $first then $then" >&2; exit 1; }
done
by=$(curl -s -D - -o /dev/null "http://127.0.0.1:18103/api/incidents" -H "Authorization: Bearer $TOKEN" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-quotagate-throttled-by" {print $2}')
[[ $by == gateway ]] || { echo "gateway-reject: the 429 did not come from the gateway ($by)" >&2; exit 1; }
[[ $(status 18103 /api/alerts) == 200 ]] || { echo "gateway-forward: not 200" >&2; exit 1; }
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000000} else print v}' <<<"$1"; }
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    IFS=: read -r name port path <<<"$t"
    out=$(wrk -t1 -c"$CONNS" -d"${DUR}s" --latency -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$port$path?\$top=10" 2>&1)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    p50=$(to_us "$(awk '$1=="50%" {print $2}' <<<"$out")"); p99=$(to_us "$(awk '$1=="99%" {print $2}' <<<"$out")")
    bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    echo "$name ${rps:-0} ${p50:-0} ${p99:-0} ${total:-0} ${bad:-0}" >>"$work/rows"
  done
done
curl -s "http://127.0.0.1:18104/metrics" | grep -E '^quotagate_local_rejections_total' | awk '$2 > 0' >"$work/rejections"
awk -v rounds="$ROUNDS" -v conns="$CONNS" '
  function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
                                     return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
  { n[$1]++; rps[$1, n[$1]] = $2; p50[$1, n[$1]] = $3; p99[$1, n[$1]] = $4; total[$1] += $5; bad[$1] += $6
    if (!($1 in seen)) { seen[$1] = 1; order[++k] = $1 } }
  END {
    printf "Median of %d rounds, %d connections; non-2xx are the 429s of the reject targets (nginx at 1 r/m lets one call a minute through).\n\n", rounds, conns
    print "| Target | req/s | p50 µs | p99 µs | Answers | Non-2xx | Share non-2xx | /gateway-reject |"
    print "|---|---|---|---|---|---|---|---|"
    for (i = 1; i <= k; i++) { t = order[i]; delete a
      for (j = 1; j <= n[t]; j++) a[j] = rps[t, j]; R[t] = median(a, n[t])
      for (j = 1; j <= n[t]; j++) a[j] = p50[t, j]; P50[t] = median(a, n[t])
      for (j = 1; j <= n[t]; j++) a[j] = p99[t, j]; P99[t] = median(a, n[t]) }
    for (i = 1; i <= k; i++) { t = order[i]
      printf "| %s | %.0f | %.0f | %.0f | %d | %d | %.3f%% | %.2f |\n", t, R[t], P50[t], P99[t], total[t], bad[t], 100 * bad[t] / (total[t] ? total[t] : 1), R[t] / R["gateway-reject"] }
    printf "\ngateway-reject over nginx-reject %.2f, over gateway-forward %.2f\n", R["gateway-reject"] / R["nginx-reject"], R["gateway-reject"] / R["gateway-forward"]
  }' "$work/rows"
echo
sed 's/^/the gateway counted: /' "$work/rejections"
