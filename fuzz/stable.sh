#!/usr/bin/env bash
# Replay corpora several times and print the coverage each replay reaches,
# to tell coverage a corpus holds from coverage that comes and goes.
#
#   fuzz/stable.sh <target> <times> <corpus>...
#
# A <corpus> is a directory of inputs, an archive (.tar.gz), or
# `git:<rev>` for the target's archive `fuzz/grown/<target>.tar.gz` as
# committed at <rev>. The seeds (fuzz/corpus/<target>) are replayed with
# each. libFuzzer's `INITED` line counts the edges (`cov`) and features
# (`ft`) the inputs reached; a target whose runs are not deterministic (the
# http target's timing over loopback sockets, say) reaches a few more or
# fewer on each replay of the same inputs. The table gives, per corpus,
# the least, the median and the most of `times` replays: a corpus grew in
# coverage it keeps when its least exceeds the most of the one before.
# docs/fuzzing.md says how a session's plateau is judged from it.
set -euo pipefail

target="${1:?usage: fuzz/stable.sh <target> <times> <corpus>...}"
times="${2:?usage: fuzz/stable.sh <target> <times> <corpus>...}"
shift 2
(($# > 0)) || { echo "usage: fuzz/stable.sh <target> <times> <corpus>..." >&2; exit 2; }
# shellcheck source=fuzz/corpora.sh
source "$(dirname "$0")/corpora.sh"
# Paths are the caller's: made absolute before moving into fuzz/.
resolve_corpora "$@"
cd "$(dirname "$0")"
[[ -f "fuzz_targets/$target.rs" ]] || { echo "no fuzz target $target" >&2; exit 2; }
[[ "$times" =~ ^[1-9][0-9]*$ ]] || { echo "times must be a positive whole number, not '$times'" >&2; exit 2; }

host="$(rustc -vV | sed -n 's/^host: //p')"
bin="${CARGO_TARGET_DIR:-target}/$host/release/$target"
args=()
# As fuzz/session.sh runs it.
[[ "$target" == http ]] && args+=(-timeout=600)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
RUSTC_BOOTSTRAP=1 cargo fuzz build -s none "$target" >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }

# The inputs of corpus $1, in a directory of their own: its path on
# stdout. Called in a command substitution, where errexit is off, so each
# step's failure is returned.
inputs() {
  local corpus="$1" dir
  dir="$(mktemp -d "$work/corpus.XXXXXX")" || return 1
  extract_corpus "$target" "$corpus" "$dir" || return 1
  echo "$dir"
}

# "cov ft" of one replay of directory $1 with the seeds; fails when
# libFuzzer printed no INITED line (a crash, say).
replay() {
  local out status=0
  out="$(mktemp -d "$work/out.XXXXXX")"
  "$bin" "${args[@]}" -artifact_prefix="$work/" -runs=0 "$out" "$1" "corpus/$target" 2>&1 |
    awk '/INITED/ { for (i = 1; i <= NF; i++) { if ($i == "cov:") c = $(i + 1); if ($i == "ft:") f = $(i + 1) } }
         END { if (c == "") exit 1; print c, f }' || status=$?
  rm -rf "$out"
  return "$status"
}

# The least, median (the lower middle one of an even count) and most of
# the numbers on stdin.
spread() {
  sort -n | awk '{ v[NR] = $1 } END { printf "%d / %d / %d", v[1], v[int((NR + 1) / 2)], v[NR] }'
}

printf '| Corpus | Inputs | `cov` least / median / most | `ft` least / median / most |\n|---|---:|---:|---:|\n'
for corpus in "${corpora[@]}"; do
  dir="$(inputs "$corpus")" || { echo "cannot read corpus $corpus" >&2; exit 2; }
  results="$work/results"
  : >"$results"
  for _ in $(seq "$times"); do
    replay "$dir" >>"$results" || { echo "no INITED line replaying $corpus" >&2; exit 1; }
  done
  n="$(find "$dir" -type f | wc -l)"
  printf '| %s | %d | %s | %s |\n' "$corpus" "$n" "$(cut -d' ' -f1 "$results" | spread)" "$(cut -d' ' -f2 "$results" | spread)"
  rm -rf "$dir"
done
