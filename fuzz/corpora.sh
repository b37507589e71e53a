# Corpus arguments, as fuzz/stable.sh and fuzz/where.sh take them: a
# directory of inputs, an archive (.tar.gz), or `git:<rev>` for the
# target's archive fuzz/grown/<target>.tar.gz as committed at <rev>.
# Sourced, not run.

# Resolve "$@" against the caller's directory into the array `corpora`
# (call before moving into fuzz/); exits on a path that does not exist.
resolve_corpora() {
  corpora=()
  local corpus path
  for corpus in "$@"; do
    case "$corpus" in
      git:*) corpora+=("$corpus") ;;
      *)
        path="$(realpath -e -- "$corpus")" || { echo "no such corpus: $corpus" >&2; exit 2; }
        corpora+=("$path") ;;
    esac
  done
}

# Put the inputs of corpus $2 of target $1 into directory $3 (from fuzz/).
# Each step's failure is returned: callers run it where errexit is off.
extract_corpus() {
  local target="$1" corpus="$2" dir="$3"
  case "$corpus" in
    git:*) git show "${corpus#git:}:fuzz/grown/$target.tar.gz" | tar -xz -C "$dir" || return 1 ;;
    *.tar.gz) tar -xzf "$corpus" -C "$dir" || return 1 ;;
    *) [[ -d "$corpus" ]] && cp -r "$corpus/." "$dir" || return 1 ;;
  esac
}
