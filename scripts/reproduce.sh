#!/usr/bin/env bash
# Set up if needed, then run eval/reproduce.py (the paper's Table 1/2 and Figures 6-7 with the product).
# Flags go to eval/reproduce.py (--help lists them; docs/REPRODUCE.md explains them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python eval/reproduce.py "$@"
