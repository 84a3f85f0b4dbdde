# Sourced by the scripts: set up if needed, then the environment every run shares (no telemetry, offline hubs).
# ALORA_LANE=0.21 sets up and uses the Axolotl 0.21 venv (.venv-axolotl021) instead of .venv (Axolotl 0.19).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh "${ALORA_LANE:-0.19}"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
