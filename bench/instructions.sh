#!/usr/bin/env bash
# Instructions per proxied request (docs/benchmarks.md), for comparing
# builds: a count that does not move with whatever else the machine runs.
# Each gateway binary runs with one worker under callgrind on
# bench/overhead.toml, in front of the proxy-overhead script's stand-in
# upstream (nginx on 18001). After a warm-up the counters are zeroed, wrk
# drives it, and the counters are dumped; instructions are divided by the
# requests wrk completed. The binaries take turns, ROUNDS times.
#   bench/instructions.sh BIN [BIN...]     # ROUNDS=2 DUR=15 CONNS=4 WARMUP=3
#   bench/instructions.sh /tmp/before/quotagate target/release/quotagate
# Needs: valgrind, nginx, wrk (Debian packages of those names).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}; DUR=${DUR:-15}; CONNS=${CONNS:-4}; WARMUP=${WARMUP:-3}
anchors=${ANCHORS:-../shared/bench/anchors}
(($# > 0)) || { echo "usage: bench/instructions.sh BIN [BIN...]" >&2; exit 2; }
for tool in valgrind callgrind_control nginx wrk; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y valgrind nginx wrk" >&2; exit 2; }
done
[[ -d $anchors ]] || { echo "no anchor configs at $anchors (set ANCHORS)" >&2; exit 2; }
for bin in "$@"; do [[ -x $bin ]] || { echo "not an executable: $bin" >&2; exit 2; }; done

. bench/token.sh
URL="http://127.0.0.1:18004/api/incidents?\$top=10"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
sed "s#/tmp/#$work/#g" "$anchors/upstream-nginx.conf" >"$work/upstream-nginx.conf"
nginx -c "$work/upstream-nginx.conf" -p "$work" & pids+=($!)

printf '%-6s %-40s %10s %14s\n' round binary requests instr/req
for r in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    out="$work/callgrind.out"
    rm -f "$out"*
    valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --config bench/overhead.toml --workers 1 \
      >"$work/gateway.log" 2>&1 &
    vg=$!
    up=0
    for _ in $(seq 300); do
      curl -s -o /dev/null "$URL" -H "Authorization: Bearer $TOKEN" && { up=1; break; }
      sleep 0.1
    done
    ((up)) || { echo "$bin did not come up under callgrind; its log:" >&2; cat "$work/gateway.log" >&2; exit 1; }
    wrk -t1 -c"$CONNS" -d"${WARMUP}s" -H "Authorization: Bearer $TOKEN" "$URL" >/dev/null
    callgrind_control -z "$vg" >/dev/null 2>&1
    reqs=$(wrk -t1 -c"$CONNS" -d"${DUR}s" -H "Authorization: Bearer $TOKEN" "$URL" | awk '/requests in/ {print $1}')
    callgrind_control -d "$vg" >/dev/null 2>&1
    kill "$vg"; wait "$vg" 2>/dev/null || true
    # The dump after zeroing is the one with the highest part number.
    dump=$(ls -1 "$out".* 2>/dev/null | sort -t. -k3 -n | tail -1)
    ir=$(awk '/^summary:|^totals:/ {print $2; exit}' "$dump")
    per=$(awk -v i="$ir" -v n="$reqs" 'BEGIN { printf "%.0f", i / n }')
    printf '%-6s %-40s %10s %14s\n' "$r" "$bin" "$reqs" "$per"
  done
done
