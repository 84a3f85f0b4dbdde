#!/usr/bin/env bash
# Set up if needed, then run the main job (eval/alora_bench/main_job.py): the whole ALoRA workflow on the packaged SmolLM2.
# Flags go to eval/alora_bench/main_job.py (--help lists them).
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec .venv/bin/python -m alora_bench.main_job "$@"
