#!/usr/bin/env bash
# Quota-efficiency benchmark (docs/benchmarks.md): N clients at F times the
# call quota for H scaled hours, through the gateway, straight to the
# emulator with a Graph-SDK-style retry loop, and through nginx limit_req.
# Needs nginx on PATH. Arguments pass through:
#   bench/quota-efficiency.sh --clients 10 --factor 5 --hours 3 --hour-secs 12
#   bench/quota-efficiency.sh --modes gateway --probe 5   # where the running time goes
#   bench/quota-efficiency.sh --modes gateway --costs 0.005,0.01,0.02,0.05   # another mix of hunting costs
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nginx >/dev/null || { echo "nginx is missing: apt-get install -y nginx" >&2; exit 1; }
# The gateway runs as the release binary at $QUOTAGATE_BIN, by default the
# build this makes; the clients and the emulator in the example's process.
cargo build --release --quiet --bin quotagate
export QUOTAGATE_BIN="${QUOTAGATE_BIN:-${CARGO_TARGET_DIR:-target}/release/quotagate}"
exec cargo run --quiet --example quota_efficiency -- "$@"
