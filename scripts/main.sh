#!/usr/bin/env bash
# Set up if needed, then run the main job (eval/main_job.py): the whole ALoRA workflow on the packaged SmolLM2.
# Flags go to eval/main_job.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python eval/main_job.py "$@"
