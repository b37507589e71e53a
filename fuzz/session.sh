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
# nor for at least 20 minutes. It keeps a copy of the corpus as it stood
# at half the session (/tmp/qg-corpus/<target>.half), and replays that and
# the end's corpus $REPLAYS times each (5 by default; 0 skips it) with
# fuzz/stable.sh, for the stable criterion: whether the last half found
# coverage that a replay reaches reliably, not only edges that come and go.
# It exits with libFuzzer's status (non-zero when it found a crash or a
# failed property). `--save` afterwards merges
# what it grew, with what the archive already holds, into
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
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "seconds must be a positive whole number, not '$seconds'" >&2; exit 2; }

grown="/tmp/qg-corpus/$target"
host="$(rustc -vV | sed -n 's/^host: //p')"
bin="${CARGO_TARGET_DIR:-target}/$host/release/$target"
log="/tmp/qg-fuzz-$target.log"
args=(-artifact_prefix="artifacts/$target/" -dict="dict/$target.dict")
replays="${REPLAYS:-5}"
[[ "$replays" =~ ^(0|[1-9][0-9]*)$ ]] || { echo "REPLAYS must be a whole number, not '$replays'" >&2; exit 2; }
if [[ "$target" == http ]]; then
  # A paused or starved machine must not make a slow unit of an input that
  # replays in milliseconds (the check's own deadline is on its paused
  # clock, which stands still then).
  args+=(-timeout=600)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
RUSTC_BOOTSTRAP=1 cargo fuzz build -s none "$target"
mkdir -p "artifacts/$target"

if ((save)); then
  [[ -d "$grown" ]] || { echo "nothing to save: $grown does not exist (run a session first)" >&2; exit 1; }
  # Keep the smallest set of inputs that covers what the archive, the
  # session's corpus and the seeds do together.
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  mkdir "$work/merged" "$work/kept"
  [[ -f "grown/$target.tar.gz" ]] && tar -xzf "grown/$target.tar.gz" -C "$work/kept"
  if ! nice -n 19 "$bin" "${args[@]}" -merge=1 "$work/merged" "$work/kept" "$grown" "corpus/$target" >"$log.merge" 2>&1; then
    echo "the merge failed; see $log.merge" >&2
    exit 1
  fi
  mkdir -p grown
  # Written beside the archive, then renamed over it: never half a file.
  next="$(mktemp "grown/.$target.XXXXXX")"
  trap 'rm -rf "$work" "$next"' EXIT
  tar -czf "$next" -C "$work/merged" .
  chmod 644 "$next"
  mv "$next" "grown/$target.tar.gz"
  echo "grown/$target.tar.gz: $(find "$work/merged" -type f | wc -l) inputs, $(du -h "grown/$target.tar.gz" | cut -f1)"
  exit 0
fi

mkdir -p "$grown"
[[ -f "grown/$target.tar.gz" ]] && tar -xzf "grown/$target.tar.gz" -C "$grown"
half="$grown.half"
rm -rf "$half"
stamp="$(mktemp)"
fuzzer=
snapshot=
# The fuzzer runs in a session of its own (below), out of reach of the
# terminal's Ctrl-C: this script passes SIGINT and SIGTERM on, so
# libFuzzer stops as it would in the foreground and the summary still
# prints; and the fuzzer gets SIGTERM should this script die.
trap '[[ -n $fuzzer ]] && kill -INT "$fuzzer" 2>/dev/null' INT TERM
trap '[[ -n $fuzzer ]] && kill "$fuzzer" 2>/dev/null; [[ -n $snapshot ]] && kill "$snapshot" 2>/dev/null; rm -f "$stamp"' EXIT
started=$(date +%s)
status=0
# In a session of its own, so that its low priority holds against other
# work: where the kernel groups processes by session for scheduling
# (autogroup), nice ranks a process only within its session, and a
# fuzzer started from a shell would take as much of the cores as that
# shell's builds and tests together. Its session's group gets the same
# low weight (allowed for one's own processes).
setsid setpriv --pdeathsig TERM nice -n 19 "$bin" "${args[@]}" -max_total_time="$seconds" \
  -print_final_stats=1 "$grown" "corpus/$target" >"$log" 2>&1 &
fuzzer=$!
# Only once it leads its own session (field 6 of its stat is the session
# id): before that, its group is this shell's. The kernel refuses a
# second change of a group's priority within 100 ms, so it is retried.
leads() { [[ "$(sed 's/.*) //' "/proc/$fuzzer/stat" 2>/dev/null | cut -d' ' -f4)" == "$fuzzer" ]]; }
for _ in $(seq 200); do leads && break; sleep 0.01; done
lowered=0
if [[ -e /proc/$fuzzer/autogroup ]]; then
  for _ in $(seq 20); do
    if leads && echo 19 >"/proc/$fuzzer/autogroup" 2>/dev/null; then
      lowered=1
      break
    fi
    sleep 0.2
  done
  ((lowered)) || echo "warning: could not lower the fuzzer's scheduling group; it competes with other work at full weight" >&2
fi
# The corpus at half the session, for the stable criterion. Hard links:
# made in milliseconds, and an input libFuzzer replaces meanwhile keeps its
# content. Written beside it, then renamed: never half a copy. Stopped
# while it sleeps (its sleep with it), never while it copies.
(
  trap 'kill "$nap" 2>/dev/null; exit 143' TERM
  sleep $((seconds / 2)) &
  nap=$!
  wait "$nap"
  trap '' TERM
  # One retry: an input removed between listing and linking fails a copy.
  for _ in 1 2; do
    rm -rf "$half.part"
    if cp -al "$grown" "$half.part" 2>/dev/null; then
      mv -T "$half.part" "$half"
      exit 0
    fi
  done
  rm -rf "$half.part"
  echo "warning: could not keep the half-way corpus; the stable criterion will not be checked" >&2
) &
snapshot=$!
# A wait a passed-on signal interrupts is waited again, for the real status.
while kill -0 "$fuzzer" 2>/dev/null; do
  status=0
  wait "$fuzzer" || status=$?
done
fuzzer=
ended=$(date +%s)
# From here on a signal stops this script, the replays below included.
trap - INT TERM
kill "$snapshot" 2>/dev/null || true
wait "$snapshot" 2>/dev/null || true
snapshot=

# libFuzzer's status lines: "#RUNS <event> cov: C ft: F ...".
awk -v secs=$((ended - started)) -v status="$status" -v logfile="$log" '
  match($0, /^#[0-9]+/) && / cov: / {
    runs = substr($0, 2, RLENGTH - 1) + 0
    for (i = 1; i <= NF; i++) { if ($i == "cov:") cov = $(i + 1) + 0; if ($i == "ft:") ft = $(i + 1) + 0 }
    n++; r[n] = runs; c[n] = cov
  }
  END {
    if (n == 0) { print "no libFuzzer status in " logfile " (exit status " status ")"; exit }
    last = r[n]; top = c[n]; since = last
    for (i = n; i >= 1 && c[i] == top; i--) since = r[i]
    half = c[1]; for (i = 1; i <= n && r[i] <= last / 2; i++) half = c[i]
    printf "runs %d in %d s, cov %d, ft %d, exit status %d\n", last, secs, top, ft, status
    printf "cov first reached at run %d: %.1f%% of the runs since (about %.0f minutes at the mean rate); %+d edges over the last half of the runs\n", since, 100 * (last - since) / last, (last - since) / last * secs / 60, top - half
    print "log: " logfile
  }' "$log"
find "artifacts/$target" -type f -newer "$stamp" | sed 's/^/artifact: /'

# The stable criterion: the corpus at half the session against the end's,
# each replayed $replays times by the same build.
if ((status == 0 && replays > 0)) && [[ -d "$half" ]]; then
  table="$(./stable.sh "$target" "$replays" "$half" "$grown")" || { echo "stable.sh failed" >&2; exit 1; }
  echo "$table"
  # Rows 3 and 4: half, end; column 4 is "least / median / most" of cov.
  echo "$table" | awk -F'|' 'NR == 3 { split($4, h, " / ") } NR == 4 { split($4, e, " / ") }
    END {
      if (e[2] + 0 <= h[3] + 0) printf "stable criterion met: the end corpus replays to a median of %d edges, no more than the most the half-way corpus reached (%d-%d)\n", e[2], h[1], h[3]
      else printf "stable criterion not met: the end corpus replays to a median of %d edges, %+d over the most the half-way corpus reached (%d)\n", e[2], e[2] - h[3], h[3]
    }'
elif ((status == 0 && replays > 0)); then
  echo "no half-way corpus (the session ended early): stable criterion not checked"
fi
exit "$status"
