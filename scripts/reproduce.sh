#!/usr/bin/env bash
# Set up if needed, then run eval/alora_bench/reproduce.py (the paper's Table 1/2 and Figures 6-7 with the product).
# Flags go to eval/alora_bench/reproduce.py (--help lists them; docs/REPRODUCE.md explains them).
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec .venv/bin/python -m alora_bench.reproduce "$@"
