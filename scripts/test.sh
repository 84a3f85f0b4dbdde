#!/usr/bin/env bash
# Set up if needed, then lint (ruff) and run the whole test suite (unit, lm-eval, and real `axolotl train`
# end-to-end runs on CPU).
set -euo pipefail
source "$(dirname "$0")/env.sh"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
