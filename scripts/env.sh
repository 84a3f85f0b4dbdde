# Sourced by the scripts: set up if needed, then the environment every run shares (no telemetry, offline hubs).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
