#!/usr/bin/env bash
# Where a corpus's coverage lies, and where a later corpus gained over an
# earlier one: covered edges summed by origin (the gateway's src/, the
# checks and emulator, the TOML parser, other crates, the standard
# library), the gateway's functions whose covered edges changed, the
# crates whose covered edges changed, and the gateway's source lines where
# a function covered both times took new edges.
#
#   fuzz/where.sh <target> <before> <after>
#
# <before> and <after> are corpora as fuzz/stable.sh takes them (a
# directory, an archive, or git:<rev>); the seeds are replayed with each.
# libFuzzer names covered functions only with a sanitizer's runtime, so
# this builds the target with AddressSanitizer in its own target directory
# (/tmp/qg-fuzz-asan, or $ASAN_TARGET_DIR) and needs llvm-symbolizer. Its
# edge counts are the instrumented build's, higher than a session's `cov`.
# An edge that comes and goes between replays (see fuzz/stable.sh) shows up
# here as a change too: compare a corpus with itself to see how much.
set -euo pipefail

target="${1:?usage: fuzz/where.sh <target> <before> <after>}"
(($# == 3)) || { echo "usage: fuzz/where.sh <target> <before> <after>" >&2; exit 2; }
# shellcheck source=fuzz/corpora.sh
source "$(dirname "$0")/corpora.sh"
resolve_corpora "$2" "$3"
cd "$(dirname "$0")"
[[ -f "fuzz_targets/$target.rs" ]] || { echo "no fuzz target $target" >&2; exit 2; }
command -v llvm-symbolizer >/dev/null || { echo "llvm-symbolizer is needed (apt-get install llvm)" >&2; exit 2; }

host="$(rustc -vV | sed -n 's/^host: //p')"
dir="${ASAN_TARGET_DIR:-/tmp/qg-fuzz-asan}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
CARGO_TARGET_DIR="$dir" RUSTC_BOOTSTRAP=1 cargo fuzz build -s address "$target" >"$work/build.log" 2>&1 ||
  { cat "$work/build.log" >&2; exit 1; }
args=()
[[ "$target" == http ]] && args+=(-timeout=600)

# libFuzzer's coverage listing for corpus $1: a COVERED_FUNC line for
# every covered function, and an UNCOVERED_PC line ("file:line") for every
# edge a covered function has not taken.
coverage() {
  local corpus="$1" inputs out
  inputs="$(mktemp -d "$work/in.XXXXXX")" out="$(mktemp -d "$work/out.XXXXXX")"
  extract_corpus "$target" "$corpus" "$inputs" || return 1
  ASAN_OPTIONS=detect_leaks=0 "$dir/$host/release/$target" "${args[@]}" -artifact_prefix="$work/" -runs=0 -print_coverage=1 \
    "$out" "$inputs" "corpus/$target" 2>&1 | grep -E '^ *(COVERED_FUNC|UNCOVERED_PC):'
}

# "<edges> <function> <file>" for every covered function of listing $1.
covered() {
  awk '/^COVERED_FUNC:/ { split($5, e, "/"); name = $6; for (i = 7; i < NF; i++) name = name " " $i; print e[1], name, $NF }' "$1"
}

for i in 0 1; do
  file="$work/$([[ $i == 0 ]] && echo before || echo after)"
  coverage "${corpora[$i]}" >"$file.listing" || { echo "cannot replay ${corpora[$i]}" >&2; exit 1; }
  covered "$file.listing" >"$file"
  [[ -s "$file" ]] || { echo "no covered function replaying ${corpora[$i]} (is llvm-symbolizer working?)" >&2; exit 1; }
done

# The origin of a "file:line": the repository's src/ (absolute paths in
# the debug info), the checks and emulator (relative to fuzz/), crates from
# the registry, or the standard library (/rustc/<hash>/library, and the
# crates it vendors under /rust/deps).
root="$(cd .. && pwd)"
origin='function origin(path) {
  sub(/:[0-9]+$/, "", path)
  if (index(path, root "/src/") == 1) return "gateway src/"
  if (path ~ /(^|\/)checks\/[a-z_]+\.rs$|tests\/support\//) return "fuzz checks, emulator"
  if (path ~ /registry\/src\/[^\/]*\/(toml|winnow|serde_spanned)/) return "TOML parser crates"
  if (path ~ /registry\//) return "other crates"
  if (path ~ /^\/rustc\/|^\/rust\/deps\//) return "std, core, alloc"
  return "other"
}'
printf '| Origin | Edges before | Edges after | Change |\n|---|---:|---:|---:|\n'
awk -v root="$root" "$origin"'
  { g = origin($NF); if (FILENAME == ARGV[1]) b[g] += $1; else a[g] += $1; seen[g] = 1 }
  END { for (g in seen) { tb += b[g]; ta += a[g]; printf "| %s | %d | %d | %+d |\n", g, b[g], a[g], a[g] - b[g] | "sort" }
        close("sort"); printf "| all | %d | %d | %+d |\n", tb, ta, ta - tb }' "$work/before" "$work/after"
echo
echo "The gateway's functions whose covered edges changed:"
awk -v root="$root" "$origin"'
  origin($NF) == "gateway src/" { key = $0; sub(/^[0-9]+ /, "", key); if (FILENAME == ARGV[1]) b[key] += $1; else a[key] += $1; seen[key] = 1 }
  END { for (k in seen) if (a[k] != b[k]) printf "%+d\t%s\n", a[k] - b[k], k }' "$work/before" "$work/after" |
  sort -t$'\t' -k1,1gr | sed 's/^/  /'
echo
echo "The crates whose covered edges changed:"
awk '
  match($NF, /registry\/src\/[^\/]*\/[^\/]+\//) {
    c = substr($NF, RSTART, RLENGTH - 1); sub(/.*\//, "", c); sub(/-[0-9]+\.[0-9]+\.[0-9]+.*$/, "", c)
    if (FILENAME == ARGV[1]) b[c] += $1; else a[c] += $1; seen[c] = 1
  }
  END { for (c in seen) if (a[c] != b[c]) printf "%+d\t%s\n", a[c] - b[c], c }' "$work/before" "$work/after" |
  sort -t$'\t' -k1,1gr | sed 's/^/  /'
echo
# An edge of a function covered both times is listed as an UNCOVERED_PC
# before and not after: the lines it is on, with how many such edges each.
echo "The gateway's source lines with edges newly taken in functions covered both times:"
awk -v root="$root" '
  /UNCOVERED_PC:/ && index($2, root "/src/") == 1 { line = substr($2, length(root) + 2); if (FILENAME == ARGV[1]) b[line]++; else a[line]++ }
  END { for (l in b) if (b[l] > a[l]) printf "%+d\t%s\n", b[l] - a[l], l }' "$work/before.listing" "$work/after.listing" |
  sort -t$'\t' -k2,2V | sed 's/^/  /'
