#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (unit, lm-eval, and real `axolotl train` end-to-end runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
