#!/usr/bin/env bash
# Set up if needed, then lint (ruff) and test on both Axolotl versions:
#   Axolotl 0.19.0 (Python 3.11, .venv): the whole suite (unit, lm-eval, real `axolotl train` runs on CPU);
#   Axolotl 0.21.0 (Python 3.12, .venv-axolotl021): the end-to-end ALoRA tests (scripts/test-axolotl021.sh).
# With arguments, they go to pytest and only the 0.19 suite runs.
set -euo pipefail
source "$(dirname "$0")/env.sh"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then exec bash scripts/test-axolotl021.sh; fi
