#!/usr/bin/env bash
# Run one fuzz target for a session and say whether it reached a plateau.
#
#   fuzz/session.sh <target> [seconds]      # default 3600
#
# The session starts from the corpus earlier sessions grew
# (fuzz/grown/<target>.tar.gz, when there is one) and the seeds
# (fuzz/corpus/<target>), grows it in /tmp/qg-corpus/<target>, and at the
# end prints libFuzzer's counts and the plateau criterion of
# docs/fuzzing.md: no new edge over the last half of the session's runs,
# nor for at least 20 minutes. `--save` afterwards merges what it grew into
# fuzz/grown/<target>.tar.gz, for the next session:
#
#   fuzz/session.sh --save <target>
set -euo pipefail
cd "$(dirname "$0")"

save=0
if [[ "${1:-}" == "--save" ]]; then
  save=1
  shift
fi
target="${1:?usage: fuzz/session.sh [--save] <target> [seconds]}"
seconds="${2:-3600}"
[[ -f "fuzz_targets/$target.rs" ]] || { echo "no fuzz target $target" >&2; exit 2; }

grown="/tmp/qg-corpus/$target"
bin="target/x86_64-unknown-linux-gnu/release/$target"
log="/tmp/qg-fuzz-$target.log"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
RUSTC_BOOTSTRAP=1 cargo fuzz build -s none "$target"

if ((save)); then
  # Keep the smallest set of inputs that covers what the grown corpus does.
  merged="$(mktemp -d)"
  "$bin" -merge=1 -dict="dict/$target.dict" "$merged" "$grown" "corpus/$target" >/dev/null 2>&1
  mkdir -p grown
  tar -czf "grown/$target.tar.gz" -C "$merged" .
  echo "grown/$target.tar.gz: $(find "$merged" -type f | wc -l) inputs, $(du -h "grown/$target.tar.gz" | cut -f1)"
  rm -rf "$merged"
  exit 0
fi

mkdir -p "$grown" "artifacts/$target"
[[ -f "grown/$target.tar.gz" ]] && tar -xzf "grown/$target.tar.gz" -C "$grown"
args=(-artifact_prefix="artifacts/$target/" -dict="dict/$target.dict" -max_total_time="$seconds" -print_final_stats=1)
if [[ "$target" == http ]]; then
  # A paused or starved machine must not fail an input that replays in
  # milliseconds: the check's own deadline and libFuzzer's are lengthened.
  export QG_FUZZ_HTTP_DEADLINE_S=300
  args+=(-timeout=600)
fi
started=$(date +%s)
status=0
nice -n 19 "$bin" "${args[@]}" "$grown" "corpus/$target" >"$log" 2>&1 || status=$?
ended=$(date +%s)

# libFuzzer's status lines: "#RUNS <event> cov: C ft: F ...".
awk -v secs=$((ended - started)) -v status="$status" -v logfile="$log" '
  match($0, /^#[0-9]+/) && / cov: / {
    runs = substr($0, 2, RLENGTH - 1) + 0
    for (i = 1; i <= NF; i++) { if ($i == "cov:") cov = $(i + 1) + 0; if ($i == "ft:") ft = $(i + 1) + 0 }
    n++; r[n] = runs; c[n] = cov
  }
  END {
    if (n == 0) { print "no libFuzzer status in " logfile; exit 1 }
    last = r[n]; top = c[n]; since = last
    for (i = n; i >= 1 && c[i] == top; i--) since = r[i]
    half = 0; for (i = 1; i <= n && r[i] <= last / 2; i++) half = c[i]
    printf "runs %d in %d s, cov %d, ft %d, exit status %d\n", last, secs, top, ft, status
    printf "cov first reached at run %d: %.1f%% of the runs since (about %.0f minutes at the mean rate); %+d edges over the last half of the runs\n", since, 100 * (last - since) / last, (last - since) / last * secs / 60, top - half
    print "log: " logfile
  }' "$log"
ls "artifacts/$target" | sed 's/^/artifact: /'
