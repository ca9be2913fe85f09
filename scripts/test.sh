#!/usr/bin/env bash
# Runs the whole test suite on a fresh or prepared machine.
#   scripts/test.sh                 # everything
#   scripts/test.sh tests/unit -k lru   # any pytest arguments
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
source scripts/setup_env.sh

set +e
python -m pytest -p no:cacheprovider -ra "${@:-tests}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "ERROR: pytest collected no tests; refusing to report success" >&2
  exit 1
fi
exit "$rc"
