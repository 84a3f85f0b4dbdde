#!/usr/bin/env bash
# Set up if needed, then lint (ruff) and test on both Axolotl versions:
#   Axolotl 0.19.0 (Python 3.11, .venv): the whole suite (unit, lm-eval, real `axolotl train` runs on CPU);
#   Axolotl 0.21.0 (Python 3.12, .venv-axolotl021): the end-to-end ALoRA tests (scripts/test-axolotl021.sh).
# The 0.21 venv's downloads overlap the 0.19 set-up, and the two lanes run side by side: an `axolotl train` run
# spends seconds starting up on one core, which the other lane fills. The 0.21 lane's output follows the 0.19 one's.
# With arguments, they go to pytest and only the 0.19 suite runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -gt 0 ]; then
    source scripts/env.sh
    .venv/bin/ruff check .
    exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
fi

bash scripts/setup.sh 0.21 deps > .setup-axolotl021.log 2>&1 &
deps021=$!
source scripts/env.sh
.venv/bin/ruff check .
wait "$deps021" || { cat .setup-axolotl021.log >&2; exit 1; }
bash scripts/setup.sh 0.21  # the rest (this package, editable) before any test runs: no build beside a running test

# each lane in its own temporary root, so neither cleans up the other's
PYTEST_DEBUG_TEMPROOT=$(mktemp -d) bash scripts/test-axolotl021.sh > .test-axolotl021.log 2>&1 &
lane021=$!
trap 'kill "$lane021" 2>/dev/null || true' EXIT
rc019=0
.venv/bin/python -m pytest -q -p no:cacheprovider || rc019=$?
rc021=0
wait "$lane021" || rc021=$?
trap - EXIT
cat .test-axolotl021.log
echo "[test] Axolotl 0.19 lane: exit $rc019; Axolotl 0.21 lane: exit $rc021"
[ "$rc019" -eq 0 ] && [ "$rc021" -eq 0 ]
