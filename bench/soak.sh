#!/usr/bin/env bash
# Soak (docs/benchmarks.md): the release gateway for 10 minutes of mixed,
# over-demand traffic with injected faults (upstream resets, stalls, garbage
# and 429s, clients leaving while queued and mid-stream, config reloads by
# file change and SIGHUP), then checks that RSS stayed flat after warm-up,
# queues and running-time reservations went back to zero, every request got
# an answer and none was malformed, and the log holds no panic. Prints the
# tables; exits 1 when a criterion fails. Arguments pass through:
#   bench/soak.sh                      # 10 minutes
#   bench/soak.sh --minutes 2          # --rate R --sample-secs S --warmup-percent P
#   bench/soak.sh --store redis --tls --forward-proxy
# --store redis runs its own redis-server (on a free port, killed for 4 s
# every minute; --on-outage fail-closed|local), --tls serves the proxy
# listener over HTTPS, --forward-proxy sends a third of the calls through
# the HTTPS forward proxy to the Microsoft host names.
# Runs the gateway at $QUOTAGATE_BIN, by default the release build it makes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin quotagate
export QUOTAGATE_BIN="${QUOTAGATE_BIN:-${CARGO_TARGET_DIR:-target}/release/quotagate}"
exec cargo run --release --quiet --example soak -- "$@"
