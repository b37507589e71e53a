#!/usr/bin/env bash
# The quota stores side by side in one run (docs/benchmarks.md): the same
# release binary and metered traffic as the proxy-overhead benchmark
# (bench/overhead*.toml, every request admitted per tenant, never rejected),
# once per store: memory, SQLite with sync = "full", SQLite with
# sync = "normal", and Redis. Targets alternate within a round; the median
# of the rounds is printed, with each store's throughput over memory's.
#
#   cargo build --release
#   bench/stores.sh
#
# Needs nginx (the stand-in upstream from ../shared/bench/anchors), wrk,
# curl and redis-server. Uses the loopback ports 18001 and 18004-18035; where
# another benchmark holds them, run it in a network namespace of its own:
#   unshare -n bash -c 'ip link set lo up && bench/stores.sh'
# Env: BIN, ANCHORS, DUR (seconds per measurement, 8), CONNS (32), ROUNDS (3).
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/quotagate}
ANCHORS=${ANCHORS:-../shared/bench/anchors}
DUR=${DUR:-8}; CONNS=${CONNS:-32}; ROUNDS=${ROUNDS:-3}
for tool in nginx wrk curl redis-server; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
. bench/token.sh
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
sed "s#/tmp/#$work/#g" "$ANCHORS/upstream-nginx.conf" >"$work/upstream.conf"
nginx -c "$work/upstream.conf" -p "$work" & pids+=($!)
redis-server --port 18006 --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 & pids+=($!)
sed "s#/tmp/quotagate-bench/state.db#$work/full.db#" bench/overhead-sqlite.toml >"$work/sqlite-full.toml"
sed -e "s#/tmp/quotagate-bench/state.db#$work/normal.db#" -e 's#^backend = "sqlite"#backend = "sqlite"\nsync = "normal"#' \
  bench/overhead-sqlite.toml >"$work/sqlite-normal.toml"
targets=(memory:18004 sqlite-full:18014 sqlite-normal:18024 redis:18034)
configs=(bench/overhead.toml "$work/sqlite-full.toml" "$work/sqlite-normal.toml" bench/overhead-redis.toml)
for i in "${!targets[@]}"; do
  port=${targets[$i]#*:}
  "$BIN" --config "${configs[$i]}" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$((port + 1))" \
    >"$work/${targets[$i]%%:*}.log" 2>&1 & pids+=($!)
done
for t in "${targets[@]}"; do
  ok=0
  for _ in $(seq 150); do
    if curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${t#*:}/api/incidents" -H "Authorization: Bearer $TOKEN" | grep -q '^2'; then ok=1; break; fi
    sleep 0.1
  done
  ((ok)) || { echo "${t%%:*} did not answer 2xx on port ${t#*:}"; tail -5 "$work/${t%%:*}.log"; exit 1; }
done
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v*1000} else if (v ~ /s$/) {sub(/s$/,"",v); print v*1000000} else print v}' <<<"$1"; }
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    out=$(wrk -t1 -c"$CONNS" -d"${DUR}s" --latency -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:${t#*:}/api/incidents?\$top=10" 2>&1)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(to_us "$(awk '$1=="50%" {print $2}' <<<"$out")"); p99=$(to_us "$(awk '$1=="99%" {print $2}' <<<"$out")")
    bad=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    echo "${t%%:*} ${rps:-0} ${p50:-0} ${p99:-0} ${bad:-0}" >>"$work/rows"
  done
done
awk -v rounds="$ROUNDS" '
  function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
                                     return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
  { n[$1]++; rps[$1, n[$1]] = $2; p50[$1, n[$1]] = $3; p99[$1, n[$1]] = $4; bad[$1] += $5; if (!($1 in seen)) { seen[$1] = 1; order[++k] = $1 } }
  END {
    printf "%-14s %10s %9s %9s %8s %10s   (median of %d rounds)\n", "store", "req/s", "p50 us", "p99 us", "non-2xx", "/memory", rounds
    for (i = 1; i <= k; i++) { t = order[i]; delete a
      for (j = 1; j <= n[t]; j++) a[j] = rps[t, j]; R[t] = median(a, n[t])
      for (j = 1; j <= n[t]; j++) a[j] = p50[t, j]; P50 = median(a, n[t])
      for (j = 1; j <= n[t]; j++) a[j] = p99[t, j]; P99 = median(a, n[t])
      printf "%-14s %10.0f %9.0f %9.0f %8d %10.2f\n", t, R[t], P50, P99, bad[t], R[t] / R["memory"] }
  }' "$work/rows"
